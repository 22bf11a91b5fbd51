//! tonic services: the node-facing Control API and the Admin API.
//!
//! Thin shells: they read the clock, authenticate, and call [`Mesh`].

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use ztmesh_proto::admin::{self as apb, admin_server::Admin};
use ztmesh_proto::control::{self as pb, control_server::Control};
use ztmesh_proto::keys::{PublicKey, WgPublicKey};

use crate::error::Error;
use crate::mesh::{Mesh, Update};
use crate::now_ms;
use crate::store::{AuthKeyRow, NodeRow};

use ztmesh_proto::auth::methods::{
    LOGOUT as M_LOGOUT, REPORT_ENDPOINTS as M_ENDPOINTS, REPORT_FLOWS as M_FLOWS,
    STREAM_NETMAP as M_STREAM,
};

/// The node-facing service.
#[derive(Clone)]
pub struct ControlService {
    pub mesh: Arc<Mesh>,
}

type MapStream = Pin<Box<dyn Stream<Item = Result<pb::SignedNetMap, Status>> + Send>>;

impl ControlService {
    fn node<T>(&self, req: &Request<T>, method: &str) -> Result<NodeRow, Status> {
        let now = now_ms();
        let src = req.remote_addr().map(|a| a.ip());
        self.mesh.check_rate(src, now)?;
        self.mesh
            .authenticate(req.metadata(), method, now)
            .map_err(|e| {
                self.mesh.record_failure(src, now);
                tracing::info!(source = ?src, method, error = %e, "node authentication failed");
                Status::from(e)
            })
    }
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn enroll(
        &self,
        req: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let now = now_ms();
        let src = req.remote_addr().map(|a| a.ip());
        self.mesh.check_rate(src, now)?;
        match self.mesh.enroll(req.get_ref(), now) {
            Ok(resp) => Ok(Response::new(resp)),
            Err(e) => {
                if matches!(e, Error::Unauthenticated(_) | Error::Invalid(_)) {
                    self.mesh.record_failure(src, now);
                }
                tracing::info!(source = ?src, error = %e, "enrollment refused");
                Err(e.into())
            }
        }
    }

    type StreamNetMapStream = MapStream;

    async fn stream_net_map(
        &self,
        req: Request<pb::StreamNetMapRequest>,
    ) -> Result<Response<MapStream>, Status> {
        let node = self.node(&req, M_STREAM)?;
        let (conn, mut rx) = self.mesh.subscribe(node.id, now_ms())?;
        tracing::info!(node = %node.name, "netmap stream opened");
        let (tx, out) = tokio::sync::mpsc::channel::<Result<pb::SignedNetMap, Status>>(4);
        let mesh = self.mesh.clone();
        tokio::spawn(async move {
            loop {
                let update = rx.borrow_and_update().clone();
                match update {
                    Update::Map(m) => {
                        if tx.send(Ok((*m).clone())).await.is_err() {
                            break;
                        }
                    }
                    Update::Closed(why) => {
                        let _ = tx.send(Err(Status::unauthenticated(why))).await;
                        break;
                    }
                }
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { break },
                    _ = tx.closed() => break,
                }
            }
            mesh.unsubscribe(node.id, conn, now_ms());
            tracing::info!(node = %node.name, "netmap stream closed");
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }

    async fn report_endpoints(
        &self,
        req: Request<pb::ReportEndpointsRequest>,
    ) -> Result<Response<pb::ReportEndpointsResponse>, Status> {
        let node = self.node(&req, M_ENDPOINTS)?;
        self.mesh
            .report_endpoints(node.id, &req.get_ref().endpoints, now_ms())?;
        Ok(Response::new(pb::ReportEndpointsResponse {}))
    }

    async fn report_flows(
        &self,
        req: Request<pb::ReportFlowsRequest>,
    ) -> Result<Response<pb::ReportFlowsResponse>, Status> {
        let node = self.node(&req, M_FLOWS)?;
        let flows = &req.get_ref().flows;
        if flows.len() > 10_000 {
            return Err(Status::invalid_argument(
                "at most 10000 flow summaries per report",
            ));
        }
        for f in flows.iter().filter(|f| !f.allowed) {
            tracing::info!(
                node = %node.name, src = %f.src, dst = %f.dst, proto = f.protocol,
                port = f.dst_port, reason = %f.reason, packets = f.packets, "denied flow"
            );
        }
        Ok(Response::new(pb::ReportFlowsResponse {}))
    }

    async fn logout(
        &self,
        req: Request<pb::LogoutRequest>,
    ) -> Result<Response<pb::LogoutResponse>, Status> {
        let node = self.node(&req, M_LOGOUT)?;
        self.mesh.logout(&node, now_ms())?;
        Ok(Response::new(pb::LogoutResponse {}))
    }
}

/// The admin service. `local` instances (the unix socket) are authorized by the
/// socket's file permissions; remote ones need an API key.
#[derive(Clone)]
pub struct AdminService {
    pub mesh: Arc<Mesh>,
    pub local: bool,
}

impl AdminService {
    fn actor<T>(&self, req: &Request<T>) -> Result<String, Status> {
        if self.local {
            return Ok("local-admin".into());
        }
        let now = now_ms();
        let src = req.remote_addr().map(|a| a.ip());
        self.mesh.check_rate(src, now)?;
        let key = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                self.mesh.record_failure(src, now);
                Status::unauthenticated("missing API key (authorization: Bearer ztma1...)")
            })?;
        self.mesh.check_api_key(key, now).map_err(|e| {
            self.mesh.record_failure(src, now);
            tracing::info!(source = ?src, "admin authentication failed");
            Status::from(e)
        })
    }
}

fn node_pb(n: &NodeRow, online: bool) -> apb::Node {
    apb::Node {
        id: n.id,
        name: n.name.clone(),
        hostname: n.hostname.clone(),
        addresses: vec![n.ipv4.to_string(), n.ipv6.to_string()],
        user: n.user.clone().unwrap_or_default(),
        tags: n.tags.clone(),
        machine_key: PublicKey::from_slice(&n.machine_key)
            .map(|k| k.to_string())
            .unwrap_or_default(),
        wg_key: WgPublicKey(n.wg_key).to_string(),
        created_ms: n.created_ms,
        last_seen_ms: n.last_seen_ms,
        expiry_ms: n.expiry_ms,
        online,
        ephemeral: n.ephemeral,
        endpoints: n.endpoints.clone(),
        netmap_serial: 0,
    }
}

fn key_pb(k: &AuthKeyRow) -> apb::AuthKey {
    apb::AuthKey {
        id: k.id,
        key_id: k.key_id.clone(),
        user: k.user.clone().unwrap_or_default(),
        tags: k.tags.clone(),
        reusable: k.reusable,
        ephemeral: k.ephemeral,
        created_ms: k.created_ms,
        expires_ms: k.expires_ms,
        used: k.used_count > 0,
        revoked: k.revoked,
        created_by: k.created_by.clone(),
    }
}

fn expiry(secs: u64) -> Option<i64> {
    (secs > 0).then(|| (secs.min(i64::MAX as u64 / 1000) as i64) * 1000)
}

type R<T> = Result<Response<T>, Status>;

fn ok<T>(t: T) -> R<T> {
    Ok(Response::new(t))
}

fn limit_len(field: &str, s: &str, max: usize) -> Result<(), Status> {
    if s.len() > max {
        return Err(Status::invalid_argument(format!(
            "{field} is longer than {max} bytes"
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_user(&self, req: Request<apb::CreateUserRequest>) -> R<apb::User> {
        let actor = self.actor(&req)?;
        let u = self
            .mesh
            .create_user(&actor, &req.get_ref().login, now_ms())?;
        ok(apb::User {
            id: u.id,
            login: u.login,
            created_ms: u.created_ms,
        })
    }

    async fn list_users(&self, req: Request<apb::ListUsersRequest>) -> R<apb::ListUsersResponse> {
        self.actor(&req)?;
        let users = self
            .mesh
            .users()?
            .into_iter()
            .map(|u| apb::User {
                id: u.id,
                login: u.login,
                created_ms: u.created_ms,
            })
            .collect();
        ok(apb::ListUsersResponse { users })
    }

    async fn delete_user(
        &self,
        req: Request<apb::DeleteUserRequest>,
    ) -> R<apb::DeleteUserResponse> {
        let actor = self.actor(&req)?;
        self.mesh
            .delete_user(&actor, &req.get_ref().login, now_ms())?;
        ok(apb::DeleteUserResponse {})
    }

    async fn create_auth_key(
        &self,
        req: Request<apb::CreateAuthKeyRequest>,
    ) -> R<apb::CreateAuthKeyResponse> {
        let actor = self.actor(&req)?;
        let r = req.get_ref();
        if r.tags.len() > 64 {
            return Err(Status::invalid_argument("at most 64 tags"));
        }
        let user = (!r.user.is_empty()).then_some(r.user.as_str());
        let (row, secret) = self.mesh.create_auth_key(
            &actor,
            user,
            &r.tags,
            r.reusable,
            r.ephemeral,
            expiry(r.expiry_secs),
            now_ms(),
        )?;
        ok(apb::CreateAuthKeyResponse {
            key: Some(key_pb(&row)),
            secret,
        })
    }

    async fn list_auth_keys(
        &self,
        req: Request<apb::ListAuthKeysRequest>,
    ) -> R<apb::ListAuthKeysResponse> {
        self.actor(&req)?;
        let keys = self.mesh.auth_keys()?.iter().map(key_pb).collect();
        ok(apb::ListAuthKeysResponse { keys })
    }

    async fn revoke_auth_key(
        &self,
        req: Request<apb::RevokeAuthKeyRequest>,
    ) -> R<apb::RevokeAuthKeyResponse> {
        let actor = self.actor(&req)?;
        self.mesh
            .revoke_auth_key(&actor, &req.get_ref().key_id, now_ms())?;
        ok(apb::RevokeAuthKeyResponse {})
    }

    async fn list_nodes(&self, req: Request<apb::ListNodesRequest>) -> R<apb::ListNodesResponse> {
        self.actor(&req)?;
        let nodes = self
            .mesh
            .nodes()
            .iter()
            .map(|(n, online)| node_pb(n, *online))
            .collect();
        ok(apb::ListNodesResponse { nodes })
    }

    async fn get_node(&self, req: Request<apb::NodeRef>) -> R<apb::Node> {
        self.actor(&req)?;
        let n = self.mesh.find_node(&req.get_ref().node)?;
        let online = self.mesh.nodes().iter().any(|(x, o)| x.id == n.id && *o);
        ok(node_pb(&n, online))
    }

    async fn delete_node(&self, req: Request<apb::NodeRef>) -> R<apb::DeleteNodeResponse> {
        let actor = self.actor(&req)?;
        self.mesh
            .delete_node(&actor, &req.get_ref().node, now_ms())?;
        ok(apb::DeleteNodeResponse {})
    }

    async fn expire_node(&self, req: Request<apb::NodeRef>) -> R<apb::Node> {
        let actor = self.actor(&req)?;
        let n = self
            .mesh
            .expire_node(&actor, &req.get_ref().node, now_ms())?;
        ok(node_pb(&n, false))
    }

    async fn rename_node(&self, req: Request<apb::RenameNodeRequest>) -> R<apb::Node> {
        let actor = self.actor(&req)?;
        let r = req.get_ref();
        let n = self
            .mesh
            .rename_node(&actor, &r.node, &r.new_name, now_ms())?;
        ok(node_pb(&n, false))
    }

    async fn set_policy(&self, req: Request<apb::SetPolicyRequest>) -> R<apb::SetPolicyResponse> {
        let actor = self.actor(&req)?;
        let r = req.get_ref();
        limit_len("policy", &r.text, 4 << 20)?;
        limit_len("file_name", &r.file_name, 256)?;
        let version = self
            .mesh
            .set_policy(&actor, &r.file_name, &r.text, now_ms())?;
        ok(apb::SetPolicyResponse { version })
    }

    async fn get_policy(&self, req: Request<apb::GetPolicyRequest>) -> R<apb::GetPolicyResponse> {
        self.actor(&req)?;
        let p = self.mesh.policy_row();
        ok(apb::GetPolicyResponse {
            file_name: p.as_ref().map(|p| p.file_name.clone()).unwrap_or_default(),
            text: p.as_ref().map(|p| p.text.clone()).unwrap_or_default(),
            version: p.map(|p| p.version).unwrap_or(0),
        })
    }

    async fn plan_policy(
        &self,
        req: Request<apb::PlanPolicyRequest>,
    ) -> R<apb::PlanPolicyResponse> {
        self.actor(&req)?;
        let r = req.get_ref();
        limit_len("policy", &r.text, 4 << 20)?;
        let changes = self
            .mesh
            .plan_policy(&r.file_name, &r.text)?
            .into_iter()
            .map(|c| apb::FlowChange {
                src: c.src,
                dst: c.dst,
                gained: c.gained,
                lost: c.lost,
            })
            .collect();
        ok(apb::PlanPolicyResponse { changes })
    }

    async fn explain_policy(
        &self,
        req: Request<apb::ExplainPolicyRequest>,
    ) -> R<apb::ExplainPolicyResponse> {
        self.actor(&req)?;
        let r = req.get_ref();
        let port = u16::try_from(r.port).map_err(|_| Status::invalid_argument("port > 65535"))?;
        let proto = crate::cli::parse_proto(&r.proto).map_err(Status::invalid_argument)?;
        let e = self.mesh.explain(&r.src, &r.dst, port, proto);
        ok(apb::ExplainPolicyResponse {
            allowed: e.allowed,
            rule_id: e.rule_id.unwrap_or_default(),
            detail: e.detail,
        })
    }

    async fn create_api_key(
        &self,
        req: Request<apb::CreateApiKeyRequest>,
    ) -> R<apb::CreateApiKeyResponse> {
        let actor = self.actor(&req)?;
        let r = req.get_ref();
        let (row, secret) =
            self.mesh
                .create_api_key(&actor, &r.description, expiry(r.expiry_secs), now_ms())?;
        ok(apb::CreateApiKeyResponse {
            key: Some(apb::ApiKey {
                id: row.id,
                key_id: row.key_id,
                description: row.description,
                created_ms: row.created_ms,
                expires_ms: row.expires_ms,
                revoked: row.revoked,
            }),
            secret,
        })
    }

    async fn list_api_keys(
        &self,
        req: Request<apb::ListApiKeysRequest>,
    ) -> R<apb::ListApiKeysResponse> {
        self.actor(&req)?;
        let keys = self
            .mesh
            .api_keys()?
            .into_iter()
            .map(|k| apb::ApiKey {
                id: k.id,
                key_id: k.key_id,
                description: k.description,
                created_ms: k.created_ms,
                expires_ms: k.expires_ms,
                revoked: k.revoked,
            })
            .collect();
        ok(apb::ListApiKeysResponse { keys })
    }

    async fn revoke_api_key(
        &self,
        req: Request<apb::RevokeApiKeyRequest>,
    ) -> R<apb::RevokeApiKeyResponse> {
        let actor = self.actor(&req)?;
        self.mesh
            .revoke_api_key(&actor, &req.get_ref().key_id, now_ms())?;
        ok(apb::RevokeApiKeyResponse {})
    }

    async fn list_audit(&self, req: Request<apb::ListAuditRequest>) -> R<apb::ListAuditResponse> {
        self.actor(&req)?;
        let limit = match req.get_ref().limit {
            0 => 100,
            n => n.min(10_000),
        };
        let events = self
            .mesh
            .store()
            .audit_log(limit)
            .map_err(Error::from)?
            .into_iter()
            .map(|a| apb::AuditEvent {
                id: a.id,
                time_ms: a.time_ms,
                actor: a.actor,
                action: a.action,
                target: a.target,
                detail: a.detail,
            })
            .collect();
        ok(apb::ListAuditResponse { events })
    }
}
