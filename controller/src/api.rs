//! tonic services: the node-facing Control API and the Admin API.
//!
//! Thin shells: they read the clock, authenticate, and call [`Mesh`].
//! `StreamNetMap` is served by [`ControlRouter`] directly on HTTP/2 (see there).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;
use prost::Message;
use tokio_stream::wrappers::WatchStream;
use tokio_stream::Stream;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};
use ztmesh_policy::AttrValue;
use ztmesh_proto::admin::{self as apb, admin_server::Admin};
use ztmesh_proto::control::{
    self as pb,
    control_server::{Control, ControlServer},
};
use ztmesh_proto::keys::{PublicKey, SigningKey, WgPublicKey};
use ztmesh_proto::protocol;

use crate::backup;
use crate::error::Error;
use crate::mesh::{Actor, Mesh, Subscriber, Update, UserUpdate};
use crate::metrics::{failure_reason, refusal_reason, EnrollMethod};
use crate::model::PeerPaths;
use crate::nodelimit::Call;
use crate::now_ms;
use crate::ratelimit::SharedLimiter;
use crate::roles::{Access, Role};
use crate::secrets::{KeyDetail, SecretKind, SecretRecord};
use crate::store::UserRow;
use crate::store::{FlowQuery, NodeRow};

use ztmesh_proto::auth::methods::{
    LOGOUT as M_LOGOUT, NETMAP_APPLIED as M_APPLIED, REPORT_ENDPOINTS as M_ENDPOINTS,
    REPORT_FLOWS as M_FLOWS, REPORT_POSTURE as M_POSTURE, SET_ROUTES as M_ROUTES,
    STREAM_NETMAP as M_STREAM,
};

/// The node-facing service.
#[derive(Clone)]
pub struct ControlService {
    pub mesh: Arc<Mesh>,
    /// Devices waiting for a person to confirm them (interactive login).
    pub logins: Arc<crate::web::LoginHub>,
    /// Failures per source on the unauthenticated paths (shared with the
    /// remote admin service).
    pub limiter: Arc<SharedLimiter>,
}

type MapStream = Pin<Box<dyn Stream<Item = Result<pb::SignedNetMap, Status>> + Send>>;

impl ControlService {
    /// Authenticates a node call. A source over its failure limit is still
    /// served when the proof verifies (see [`Mesh::authenticate_from`]).
    fn node<T>(&self, req: &Request<T>, method: &str) -> Result<NodeRow, Status> {
        let now = now_ms();
        let src = req.remote_addr().map(|a| a.ip());
        let limited = !self.limiter.allowed(src, now);
        self.mesh
            .authenticate_from(req.metadata(), method, now, limited)
            .map_err(|e| {
                if !matches!(e, Error::RateLimited) {
                    self.limiter.record_failure(src, now);
                }
                self.mesh.metrics().call_refused(refusal_reason(&e));
                let reason = match &e {
                    Error::NodeAuth { reason, .. } => reason.as_str(),
                    _ => "rate-limited",
                };
                tracing::info!(source = ?src, method, reason, error = %e, "node authentication failed");
                if !matches!(e, Error::RateLimited) {
                    self.mesh
                        .audit_refusal(now, &source_actor(src), "node.refused", method, reason);
                }
                Status::from(e)
            })
    }
}

/// How long a new stream waits for a previous stream of the same node to be
/// seen closed (a reconnect racing the old connection's teardown), in steps.
const SESSION_WAIT_STEPS: u32 = 10;
const SESSION_WAIT_STEP: std::time::Duration = std::time::Duration::from_millis(200);

impl ControlService {
    /// Charges a stream open to `node` and opens its session. If another
    /// session of the node is live, waits briefly (bounded) for it to end:
    /// a reconnect often races the teardown of the old connection.
    async fn open_session(
        &self,
        node: &NodeRow,
        src: Option<std::net::SocketAddr>,
        deltas: bool,
    ) -> Result<Subscriber, Status> {
        self.mesh.throttle(node.id, Call::StreamOpen, now_ms())?;
        for _ in 0..SESSION_WAIT_STEPS {
            if !self.mesh.has_live_session(node.id) {
                break;
            }
            tokio::time::sleep(SESSION_WAIT_STEP).await;
        }
        Ok(self.mesh.open_stream_from(node.id, src, deltas, now_ms())?)
    }

    /// Refuses a report unless it comes from the connection that holds the
    /// node's live session (a copy of the node's key elsewhere cannot speak
    /// for it); waits briefly (bounded) for a session that is being opened.
    async fn session_owner(
        &self,
        node: &NodeRow,
        src: Option<std::net::SocketAddr>,
    ) -> Result<(), Status> {
        for _ in 0..SESSION_WAIT_STEPS {
            if self.mesh.check_session_owner(node.id, src).is_ok() {
                break;
            }
            tokio::time::sleep(SESSION_WAIT_STEP).await;
        }
        Ok(self.mesh.check_session_owner(node.id, src)?)
    }
}

/// The `:authority` a node called the controller by.
#[derive(Clone, Debug)]
struct RequestAuthority(String);

/// The events of an interactive login.
pub type LoginStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::LoginEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Control for ControlService {
    async fn enroll(
        &self,
        req: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let now = now_ms();
        let src = req.remote_addr().map(|a| a.ip());
        self.limiter.check(src, now).inspect_err(|_| {
            self.mesh.metrics().enrollment_failed("rate_limited");
        })?;
        match self.mesh.enroll(req.get_ref(), now) {
            Ok(resp) => {
                self.mesh.metrics().enrolled(EnrollMethod::AuthKey);
                Ok(Response::new(resp))
            }
            Err(e) => {
                self.mesh.metrics().enrollment_failed(failure_reason(&e));
                if matches!(
                    e,
                    Error::Unauthenticated(_) | Error::Invalid(_) | Error::NodeAuth { .. }
                ) {
                    self.limiter.record_failure(src, now);
                }
                tracing::info!(source = ?src, error = %e, "enrollment refused");
                self.mesh.audit_refusal(
                    now,
                    &source_actor(src),
                    "node.enroll.refused",
                    "Enroll",
                    &e.to_string(),
                );
                Err(e.into())
            }
        }
    }

    type LoginStream = LoginStream;

    async fn login(&self, req: Request<pb::LoginRequest>) -> Result<Response<LoginStream>, Status> {
        let now = now_ms();
        let src = req.remote_addr().map(|a| a.ip());
        self.limiter.check(src, now).inspect_err(|_| {
            self.mesh.metrics().enrollment_failed("rate_limited");
        })?;
        let (claim, os) = self.mesh.check_login(req.get_ref(), now).map_err(|e| {
            self.mesh.metrics().enrollment_failed(failure_reason(&e));
            self.limiter.record_failure(src, now);
            tracing::info!(source = ?src, error = %e, "login refused");
            self.mesh.audit_refusal(
                now,
                &source_actor(src),
                "node.login.refused",
                "Login",
                &e.to_string(),
            );
            Status::from(e)
        })?;
        let base = match &self.logins.public_url {
            Some(u) => u.clone(),
            None => {
                let authority = req
                    .extensions()
                    .get::<RequestAuthority>()
                    .map(|a| a.0.clone())
                    .ok_or_else(|| {
                        Status::failed_precondition(
                            "the controller does not know its own address: start it with --public-url",
                        )
                    })?;
                format!("https://{authority}")
            }
        };
        let (waiter, done) = tokio::sync::oneshot::channel();
        let hostname = claim.hostname.clone();
        let (code, expires_ms) = self
            .logins
            .start(claim, &os, src, waiter, now)
            .map_err(|e| Status::resource_exhausted(e.to_string()))?;
        let shown = crate::device::display_code(&code);
        tracing::info!(host = %hostname, source = ?src, "interactive login waiting for confirmation");
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::LoginEvent, Status>>(2);
        let prompt = pb::LoginEvent {
            event: Some(pb::login_event::Event::Prompt(pb::LoginPrompt {
                url: format!("{base}/device?code={shown}"),
                code: shown,
                expires_ms,
            })),
        };
        let _ = tx.send(Ok(prompt)).await;
        let logins = self.logins.clone();
        let mesh = self.mesh.clone();
        tokio::spawn(async move {
            let left = u64::try_from(expires_ms.saturating_sub(now_ms())).unwrap_or(0);
            let outcome = tokio::select! {
                r = done => Some(r),
                _ = tx.closed() => None,
                _ = tokio::time::sleep(std::time::Duration::from_millis(left)) => {
                    mesh.metrics().enrollment_failed("login_expired");
                    let _ = tx.send(Err(Status::deadline_exceeded(
                        "the login code expired before anyone confirmed this device; run `ztmesh up` again",
                    ))).await;
                    None
                }
            };
            match outcome {
                Some(Ok(Ok(resp))) => {
                    mesh.metrics().enrolled(EnrollMethod::Login);
                    let _ = tx
                        .send(Ok(pb::LoginEvent {
                            event: Some(pb::login_event::Event::Enrolled(resp)),
                        }))
                        .await;
                }
                Some(Ok(Err(why))) => {
                    mesh.metrics().enrollment_failed("login_denied");
                    let _ = tx.send(Err(Status::permission_denied(why))).await;
                }
                // The registry dropped it (a newer login of this machine).
                Some(Err(_)) => {
                    let _ = tx
                        .send(Err(Status::aborted(
                            "a newer login of this device replaced this one",
                        )))
                        .await;
                }
                None => {}
            }
            logins.cancel(&code);
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type StreamNetMapStream = MapStream;

    async fn stream_net_map(
        &self,
        req: Request<pb::StreamNetMapRequest>,
    ) -> Result<Response<MapStream>, Status> {
        let node = self.node(&req, M_STREAM)?;
        let deltas = req.get_ref().accept_deltas;
        let sub = self.open_session(&node, req.remote_addr(), deltas).await?;
        tracing::info!(node = %node.name, deltas, "netmap stream opened");
        Ok(Response::new(Box::pin(MapFeed::new(
            self.mesh.clone(),
            &node,
            sub,
        ))))
    }

    async fn report_endpoints(
        &self,
        req: Request<pb::ReportEndpointsRequest>,
    ) -> Result<Response<pb::ReportEndpointsResponse>, Status> {
        let node = self.node(&req, M_ENDPOINTS)?;
        self.mesh
            .throttle(node.id, Call::ReportEndpoints, now_ms())?;
        self.session_owner(&node, req.remote_addr()).await?;
        self.mesh
            .report_endpoints(node.id, &req.get_ref().endpoints, now_ms())?;
        Ok(Response::new(pb::ReportEndpointsResponse {}))
    }

    async fn report_posture(
        &self,
        req: Request<pb::ReportPostureRequest>,
    ) -> Result<Response<pb::ReportPostureResponse>, Status> {
        let node = self.node(&req, M_POSTURE)?;
        self.mesh.throttle(node.id, Call::ReportPosture, now_ms())?;
        // Only the connection holding the node's session speaks for it (as
        // for endpoints): a copy of the key elsewhere cannot vouch for the
        // device that is connected.
        self.session_owner(&node, req.remote_addr()).await?;
        let clipped = self
            .mesh
            .report_posture(node.id, &req.get_ref().attributes, now_ms())?;
        Ok(Response::new(pb::ReportPostureResponse { clipped }))
    }

    async fn set_routes(
        &self,
        req: Request<pb::SetRoutesRequest>,
    ) -> Result<Response<pb::SetRoutesResponse>, Status> {
        let node = self.node(&req, M_ROUTES)?;
        self.mesh.throttle(node.id, Call::SetRoutes, now_ms())?;
        let r = req.get_ref();
        let row = self
            .mesh
            .set_routes(node.id, &r.routes, r.exit_node, now_ms())?;
        Ok(Response::new(pb::SetRoutesResponse {
            approved: row
                .routes
                .active()
                .iter()
                .map(ToString::to_string)
                .collect(),
            exit_node_approved: row.routes.exit_node(),
        }))
    }

    async fn report_flows(
        &self,
        req: Request<pb::ReportFlowsRequest>,
    ) -> Result<Response<pb::ReportFlowsResponse>, Status> {
        let node = self.node(&req, M_FLOWS)?;
        self.mesh.throttle(node.id, Call::ReportFlows, now_ms())?;
        let flows = &req.get_ref().flows;
        if flows.len() > 10_000 {
            return Err(Status::invalid_argument(
                "at most 10000 flow summaries per report",
            ));
        }
        let handshakes = &req.get_ref().unknown_handshakes;
        if handshakes.len() > 256 {
            return Err(Status::invalid_argument(
                "at most 256 unknown-handshake entries per report",
            ));
        }
        // One line per report: the flows themselves go to the flow log (and
        // the denied ones to the audit table), clipped and bounded; a node
        // cannot flood the log with its strings.
        tracing::info!(
            node = %node.name,
            flows = flows.len(),
            denied = flows.iter().filter(|f| !f.allowed).count(),
            "flow report"
        );
        let now = now_ms();
        if let Some(paths) = &req.get_ref().paths {
            self.mesh.record_paths(node.id, paths, now);
        }
        let dropped = self.mesh.record_flows(&node, flows, now);
        if dropped > 0 {
            tracing::debug!(node = %node.name, dropped, "flow summaries dropped (malformed or beyond the cap)");
        }
        self.mesh.record_denied_flows(&node, flows, now);
        self.mesh.observe_report(&node, flows, handshakes, now);
        Ok(Response::new(pb::ReportFlowsResponse {}))
    }

    async fn net_map_applied(
        &self,
        req: Request<pb::NetMapAppliedRequest>,
    ) -> Result<Response<pb::NetMapAppliedResponse>, Status> {
        let node = self.node(&req, M_APPLIED)?;
        self.mesh.throttle(node.id, Call::NetMapApplied, now_ms())?;
        self.mesh
            .netmap_applied(node.id, req.get_ref().serial, now_ms());
        Ok(Response::new(pb::NetMapAppliedResponse {}))
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

/// The Control service as mounted on the TLS listener: `StreamNetMap` is
/// answered by [`ControlService::stream_raw`], every other method by the
/// generated [`ControlServer`].
///
/// Why: tonic encodes each streamed message into a per-stream buffer that
/// keeps the capacity of the largest message for the life of the stream,
/// i.e. one netmap-sized allocation per connected node even when idle. Here
/// every map is encoded once into an exactly-sized gRPC frame that is freed
/// as soon as HTTP/2 has written it. The wire format is unchanged.
#[derive(Clone)]
pub struct ControlRouter {
    svc: ControlService,
    generated: ControlServer<ControlService>,
}

impl ControlRouter {
    pub fn new(svc: ControlService) -> Self {
        Self {
            generated: ControlServer::new(svc.clone()),
            svc,
        }
    }
}

impl NamedService for ControlRouter {
    const NAME: &'static str = <ControlServer<ControlService> as NamedService>::NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl tower::Service<http::Request<Body>> for ControlRouter {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        // Every control call passes here: the node's protocol version is
        // checked before anything else, and every answer carries ours.
        let ours = protocol::Version::CURRENT;
        let offered = req.headers().get(protocol::HEADER).map(|v| v.as_bytes());
        if let Err(refused) = protocol::negotiate(offered, ours) {
            // The peer address as tonic reads it (TCP, or TLS over TCP).
            let mut probe = Request::new(());
            *probe.extensions_mut() = req.extensions().clone();
            let src = probe.remote_addr();
            tracing::info!(source = ?src, path = req.uri().path(), error = %refused, "node protocol version refused");
            self.svc.mesh.metrics().call_refused("protocol_version");
            let resp = refused.status(ours).into_http();
            return Box::pin(async move { Ok(resp) });
        }
        // The address the node used, for the login URL it is shown.
        let authority = req.uri().authority().map(|a| a.as_str().to_string());
        if let Some(a) =
            authority.filter(|a| a.len() <= 255 && a.bytes().all(|b| b.is_ascii_graphic()))
        {
            req.extensions_mut().insert(RequestAuthority(a));
        }
        let svc = self.svc.clone();
        let mut generated = self.generated.clone();
        Box::pin(async move {
            let mut resp = if req.uri().path() == M_STREAM {
                svc.stream_raw(req).await
            } else {
                generated.call(req).await?
            };
            resp.headers_mut().insert(
                protocol::HEADER,
                http::HeaderValue::from_str(&ours.to_string()).expect("digits and a dot"),
            );
            Ok(resp)
        })
    }
}

/// Largest `StreamNetMapRequest` frame accepted (the message is a few bytes).
const MAX_STREAM_REQUEST: usize = 4096;

/// The 5-byte gRPC message header (uncompressed) followed by `msg`.
fn grpc_frame(msg: &impl Message) -> Bytes {
    let len = msg.encoded_len();
    let mut buf = Vec::with_capacity(5 + len);
    buf.push(0);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    msg.encode(&mut buf).expect("the buffer was sized to fit");
    Bytes::from(buf)
}

/// Reads and decodes the single request message of a server-streaming call.
async fn read_unary<M: Message + Default>(body: Body) -> Result<M, Status> {
    let data = http_body_util::Limited::new(body, MAX_STREAM_REQUEST)
        .collect()
        .await
        .map_err(|_| Status::invalid_argument("request body too large or unreadable"))?
        .to_bytes();
    let (flag, rest) = data
        .split_first()
        .ok_or_else(|| Status::invalid_argument("missing request message"))?;
    if *flag != 0 {
        return Err(Status::unimplemented(
            "compressed requests are not supported",
        ));
    }
    let len = rest
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(|| Status::invalid_argument("truncated request message"))?;
    let msg = rest
        .get(4..)
        .filter(|m| m.len() == len)
        .ok_or_else(|| Status::invalid_argument("request message length mismatch"))?;
    M::decode(msg).map_err(|_| Status::invalid_argument("malformed request message"))
}

/// The response body of a raw netmap stream: the feed's maps as gRPC
/// frames, then the trailers with its status.
struct FrameBody {
    feed: MapFeed,
    done: bool,
}

impl http_body::Body for FrameBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let status = match std::task::ready!(Pin::new(&mut self.feed).poll_next(cx)) {
            Some(Ok(m)) => return Poll::Ready(Some(Ok(Frame::data(grpc_frame(&m))))),
            Some(Err(status)) => status,
            None => Status::ok(""),
        };
        self.done = true;
        let mut trailers = http::HeaderMap::new();
        let _ = status.add_header(&mut trailers);
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

impl ControlService {
    /// `StreamNetMap` on plain HTTP/2: the same authentication and the same
    /// messages as the generated handler, without tonic's per-stream buffer.
    async fn stream_raw(self, req: http::Request<Body>) -> http::Response<Body> {
        let (parts, body) = req.into_parts();
        let msg: pb::StreamNetMapRequest = match read_unary(body).await {
            Ok(m) => m,
            Err(status) => return status.into_http(),
        };
        let req = Request::from_http(http::Request::from_parts(parts, msg));
        let node = match self.node(&req, M_STREAM) {
            Ok(n) => n,
            Err(status) => return status.into_http(),
        };
        let deltas = req.get_ref().accept_deltas;
        let sub = match self.open_session(&node, req.remote_addr(), deltas).await {
            Ok(s) => s,
            Err(status) => return status.into_http(),
        };
        tracing::info!(node = %node.name, deltas, "netmap stream opened");
        let feed = MapFeed::new(self.mesh.clone(), &node, sub);
        let mut resp = http::Response::new(Body::new(FrameBody { feed, done: false }));
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        resp
    }
}

/// What a stream sends for a map from its channel: the delta when the map
/// carries one (only streams that take deltas get them) and it is the
/// smaller, else the full map.
fn wire_form(m: pb::SignedNetMap) -> pb::SignedNetMap {
    match m.delta {
        Some(d) if d.encoded_len() < m.netmap.len() => pb::SignedNetMap {
            netmap: Vec::new(),
            signature: Vec::new(),
            delta: Some(d),
        },
        _ => pb::SignedNetMap { delta: None, ..m },
    }
}

/// A node's netmap stream: each new map of its subscription, taken out of
/// the channel as it is sent (so an idle stream holds no copy of its last
/// map), until the controller ends the stream with a reason. Dropping it
/// (the client went away) unsubscribes. It is polled by the stream's own
/// response body: no task and no channel per stream.
struct MapFeed {
    mesh: Arc<Mesh>,
    node: u64,
    name: String,
    changes: WatchStream<Update>,
    /// `None` once the stream has ended.
    sub: Option<Subscriber>,
}

impl MapFeed {
    fn new(mesh: Arc<Mesh>, node: &NodeRow, sub: Subscriber) -> Self {
        Self {
            mesh,
            node: node.id,
            name: node.name.clone(),
            changes: WatchStream::new(sub.rx.clone()),
            sub: Some(sub),
        }
    }

    /// Unsubscribes, once. The mesh work runs on a task of its own: it
    /// waits for the publisher's turn, which must not stall the
    /// connection that drops the stream.
    fn end(&mut self) {
        let Some(sub) = self.sub.take() else {
            return;
        };
        let (mesh, node, name) = (self.mesh.clone(), self.node, std::mem::take(&mut self.name));
        let unsubscribe = move || {
            mesh.unsubscribe(node, sub.conn, now_ms());
            tracing::info!(node = %name, "netmap stream closed");
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn(async move { unsubscribe() })),
            Err(_) => unsubscribe(),
        }
    }
}

impl Stream for MapFeed {
    type Item = Result<pb::SignedNetMap, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.sub.is_none() {
                return Poll::Ready(None);
            }
            // The update is dropped at the end of this statement, so the
            // map's only other holder is the channel and `take` moves it.
            let closed = match std::task::ready!(Pin::new(&mut self.changes).poll_next(cx)) {
                None => Some(None),
                Some(Update::Closed(reason, why)) => Some(Some((reason, why))),
                Some(Update::Map(_) | Update::Delivered) => None,
            };
            match closed {
                Some(reason) => {
                    let Some((reason, why)) = reason else {
                        self.end();
                        return Poll::Ready(None);
                    };
                    tracing::info!(
                        node = %self.name,
                        reason = reason.as_str(),
                        "netmap stream ended by the controller"
                    );
                    self.end();
                    return Poll::Ready(Some(Err(Status::from(Error::node_auth(reason, why)))));
                }
                None => {
                    let Some(m) = self.sub.as_ref().and_then(Subscriber::take) else {
                        continue;
                    };
                    let m = wire_form(m);
                    self.mesh.netmap_sent(m.encoded_len(), m.delta.is_some());
                    return Poll::Ready(Some(Ok(m)));
                }
            }
        }
    }
}

impl Drop for MapFeed {
    fn drop(&mut self) {
        self.end();
    }
}

/// The person signed in to the admin console, for the calls its pages make
/// in-process (never from the network: a request extension no client can
/// set). The call then goes through the same role check and audit as an
/// API key's.
#[derive(Clone, Debug)]
pub struct ConsoleActor(pub Actor);

/// The admin service. `local` instances (the unix socket) are authorized by the
/// socket's file permissions; remote ones need an API key.
#[derive(Clone)]
pub struct AdminService {
    pub mesh: Arc<Mesh>,
    pub local: bool,
    /// Failures per source (remote instances only).
    pub limiter: Arc<SharedLimiter>,
    /// The data dir, for `Backup`.
    pub layout: Arc<crate::recovery::Layout>,
}

impl AdminService {
    /// [`node_pb`] with what the mesh knows now.
    fn node_pb(&self, n: &NodeRow, online: bool) -> apb::Node {
        node_pb(
            n,
            online,
            &self.mesh.primary_routes(n.id),
            &self.mesh.posture_checks(n.id),
            self.mesh.peer_paths(n.id),
        )
    }

    /// The TLS certificates held, as the admin API shows them.
    fn tls_status(&self) -> Result<apb::TlsStatus, Status> {
        let h = self
            .mesh
            .tls_state()
            .ok_or_else(|| Status::failed_precondition("this controller keeps no TLS files"))?;
        let hex = |c: &crate::tlscerts::TlsCert| ztmesh_proto::auth::hex(&c.fingerprint);
        Ok(apb::TlsStatus {
            current: hex(&h.current),
            next: h.next.as_ref().map(hex).unwrap_or_default(),
            previous: h
                .previous
                .as_ref()
                .map(|p| hex(&p.cert))
                .unwrap_or_default(),
            previous_switched_ms: h.previous.as_ref().map_or(0, |p| p.switched_ms),
            previous_until_ms: h.previous.as_ref().map_or(0, |p| p.until_ms),
        })
    }

    /// Who is calling `method`, refused unless their role allows `access`.
    ///
    /// Audited: a caller refused for a missing or bad API key (`api.refused`,
    /// at most once per source per minute), a role refused (`api.denied`,
    /// at most once per actor per minute), and every read that goes through
    /// (`api.read`); changes are audited by the mesh with what they did.
    fn actor<T>(&self, req: &Request<T>, access: Access, method: &str) -> Result<Actor, Status> {
        let now = now_ms();
        let actor = if let Some(ConsoleActor(a)) = req.extensions().get::<ConsoleActor>() {
            a.clone()
        } else if self.local {
            Actor::local()
        } else {
            let src = req.remote_addr().map(|a| a.ip());
            self.limiter.check(src, now)?;
            let refused = |why: &str| {
                self.limiter.record_failure(src, now);
                self.mesh
                    .audit_refusal(now, &source_actor(src), "api.refused", method, why);
            };
            let key = req
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .ok_or_else(|| {
                    refused("missing API key");
                    Status::unauthenticated("missing API key (authorization: Bearer ztma1...)")
                })?;
            self.mesh.check_api_key(key, now).map_err(|e| {
                refused(&e.to_string());
                tracing::info!(source = ?src, "admin authentication failed");
                Status::from(e)
            })?
        };
        if !actor.role.allows(access) {
            let needs = match access {
                Access::Read => "auditor, network-admin or admin",
                Access::Network => "network-admin or admin",
                Access::Identity => "admin",
            };
            self.mesh.audit_refusal(
                now,
                &actor.name,
                "api.denied",
                method,
                &format!("role {} (needs {needs})", actor.role),
            );
            return Err(Status::permission_denied(format!(
                "{} has the {} role; this call needs {needs}",
                actor.name, actor.role
            )));
        }
        if access == Access::Read {
            self.mesh.audit_read(now, &actor.name, method, "");
        }
        Ok(actor)
    }

    /// A user as the admin API shows it, with its linked SSO identities.
    fn user_pb(&self, u: UserRow) -> apb::User {
        let ids = self
            .mesh
            .store()
            .identities(&u.login)
            .unwrap_or_default()
            .into_iter()
            .map(|(i, s)| format!("{i} {s}"))
            .collect();
        user_pb(u, ids)
    }

    /// Issues a key of either kind for `actor` (`expiry_secs` 0: the
    /// kind's default).
    fn create_key(
        &self,
        actor: &str,
        detail: KeyDetail,
        expiry_secs: u64,
    ) -> Result<(SecretRecord, String), Status> {
        Ok(self
            .mesh
            .create_key(actor, detail, expiry(expiry_secs), now_ms())?)
    }

    /// The keys of one kind, as `pb` shows them.
    fn list_keys<T, M>(
        &self,
        req: &Request<T>,
        method: &str,
        kind: SecretKind,
        pb: fn(&SecretRecord) -> Option<M>,
    ) -> Result<Vec<M>, Status> {
        self.actor(req, Access::Read, method)?;
        Ok(self.mesh.keys(kind)?.iter().filter_map(pb).collect())
    }

    fn revoke_key(
        &self,
        req: &Request<apb::KeyRef>,
        method: &str,
        kind: SecretKind,
    ) -> Result<apb::RevokeKeyResponse, Status> {
        let access = match kind {
            SecretKind::AuthKey => Access::Network,
            SecretKind::ApiKey => Access::Identity,
        };
        let actor = self.actor(req, access, method)?;
        self.mesh
            .revoke_key(&actor.name, kind, &req.get_ref().key_id, now_ms())?;
        Ok(apb::RevokeKeyResponse {})
    }
}

/// The audit actor of an unauthenticated caller: its source address.
/// How many of the newest audit events a filtered `ListAudit` searches.
pub const AUDIT_SEARCH_WINDOW: u32 = 10_000;

/// `ListAudit`'s filters (see admin.proto).
struct AuditFilter {
    actor: String,
    action: String,
    text: String,
    since_ms: i64,
    before_id: u64,
}

impl AuditFilter {
    fn new(r: &apb::ListAuditRequest) -> Result<Self, Status> {
        for (field, v) in [
            ("actor", &r.actor),
            ("action", &r.action),
            ("text", &r.text),
        ] {
            limit_len(field, v, 256)?;
        }
        Ok(Self {
            actor: r.actor.trim().to_string(),
            action: r.action.trim().to_string(),
            text: r.text.trim().to_lowercase(),
            since_ms: r.since_ms,
            before_id: r.before_id,
        })
    }

    fn is_empty(&self) -> bool {
        self.actor.is_empty()
            && self.action.is_empty()
            && self.text.is_empty()
            && self.since_ms == 0
            && self.before_id == 0
    }

    fn matches(&self, a: &crate::store::AuditRow) -> bool {
        /// Exactly, or as a prefix when `pattern` ends in `*`.
        fn like(value: &str, pattern: &str) -> bool {
            match pattern.strip_suffix('*') {
                _ if pattern.is_empty() => true,
                Some(prefix) => value.starts_with(prefix),
                None => value == pattern,
            }
        }
        like(&a.actor, &self.actor)
            && like(&a.action, &self.action)
            && (self.text.is_empty()
                || a.target.to_lowercase().contains(&self.text)
                || a.detail.to_lowercase().contains(&self.text))
            && a.time_ms >= self.since_ms
            && (self.before_id == 0 || a.id < self.before_id)
    }
}

fn source_actor(src: Option<std::net::IpAddr>) -> String {
    match src {
        Some(ip) => format!("source:{ip}"),
        None => "source:unknown".into(),
    }
}

fn attr_pb(key: &str, v: &AttrValue) -> apb::Attribute {
    use apb::attribute::Value;
    apb::Attribute {
        key: key.to_string(),
        value: Some(match v {
            AttrValue::Str(s) => Value::Text(s.clone()),
            AttrValue::Int(n) => Value::Number(*n),
            AttrValue::Bool(b) => Value::Flag(*b),
        }),
    }
}

/// A node as the admin API shows it: its row, whether it is connected, the
/// routes it is primary for, its posture results, and its peers by path as
/// it last reported them.
fn node_pb(
    n: &NodeRow,
    online: bool,
    primary: &[ipnet::IpNet],
    checks: &[ztmesh_policy::PostureCheck],
    paths: PeerPaths,
) -> apb::Node {
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
        advertised_routes: n
            .routes
            .advertised
            .iter()
            .map(ToString::to_string)
            .collect(),
        approved_routes: n.routes.approved.iter().map(ToString::to_string).collect(),
        exit_node_advertised: n.routes.exit_advertised,
        exit_node_approved: n.routes.exit_approved,
        primary_routes: primary.iter().map(ToString::to_string).collect(),
        attributes: n
            .posture
            .values()
            .iter()
            .map(|(k, v)| attr_pb(k, v))
            .collect(),
        posture_reported_ms: n.posture.reported_ms,
        posture: checks
            .iter()
            .map(|c| apb::PostureResult {
                name: c.name.clone(),
                passed: c.passed,
                detail: c.detail.clone(),
            })
            .collect(),
        quarantined_since_ms: n.quarantine.as_ref().map_or(0, |q| q.since_ms),
        quarantine_reason: n
            .quarantine
            .as_ref()
            .map(|q| q.reason.clone())
            .unwrap_or_default(),
        peers_direct: paths.direct,
        peers_relayed: paths.relayed,
        peers_no_path: paths.none,
        paths_reported_ms: paths.reported_ms,
    }
}

/// An auth key as the admin API shows it; `None` for an API key.
fn auth_key_pb(k: &SecretRecord) -> Option<apb::AuthKey> {
    let KeyDetail::Auth {
        user,
        tags,
        reusable,
        ephemeral,
        used_count,
    } = &k.detail
    else {
        return None;
    };
    Some(apb::AuthKey {
        id: k.id,
        key_id: k.key_id.clone(),
        user: user.clone().unwrap_or_default(),
        tags: tags.clone(),
        reusable: *reusable,
        ephemeral: *ephemeral,
        created_ms: k.created_ms,
        expires_ms: k.expires_ms,
        used: *used_count > 0,
        revoked: k.revoked,
        created_by: k.created_by.clone(),
    })
}

/// An API key as the admin API shows it; `None` for an auth key.
fn api_key_pb(k: &SecretRecord) -> Option<apb::ApiKey> {
    let KeyDetail::Api { description, role } = &k.detail else {
        return None;
    };
    Some(apb::ApiKey {
        role: role.to_string(),
        id: k.id,
        key_id: k.key_id.clone(),
        description: description.clone(),
        created_ms: k.created_ms,
        expires_ms: k.expires_ms,
        revoked: k.revoked,
    })
}

fn user_pb(u: UserRow, sso_identities: Vec<String>) -> apb::User {
    apb::User {
        sso_identities,
        id: u.id,
        login: u.login,
        created_ms: u.created_ms,
        role: u.role.to_string(),
        key_expiry_ms: u.key_expiry_ms,
        has_password: u.has_password,
        has_totp: u.has_totp,
    }
}

/// A role from a request (`None` when empty).
fn parse_role(s: &str) -> Result<Option<Role>, Status> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|e: crate::roles::UnknownRole| Status::invalid_argument(e.to_string()))
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
        let actor = self.actor(&req, Access::Identity, "CreateUser")?;
        let r = req.get_ref();
        let role = parse_role(&r.role)?.unwrap_or(Role::Member);
        let u = self
            .mesh
            .create_user(&actor.name, &r.login, role, now_ms())?;
        ok(self.user_pb(u))
    }

    async fn list_users(&self, req: Request<apb::ListUsersRequest>) -> R<apb::ListUsersResponse> {
        self.actor(&req, Access::Read, "ListUsers")?;
        let users = self
            .mesh
            .users()?
            .into_iter()
            .map(|u| self.user_pb(u))
            .collect();
        ok(apb::ListUsersResponse { users })
    }

    async fn delete_user(
        &self,
        req: Request<apb::DeleteUserRequest>,
    ) -> R<apb::DeleteUserResponse> {
        let actor = self.actor(&req, Access::Identity, "DeleteUser")?;
        self.mesh
            .delete_user(&actor.name, &req.get_ref().login, now_ms())?;
        ok(apb::DeleteUserResponse {})
    }

    #[expect(
        clippy::disallowed_types,
        reason = "a password hash's salt comes from OS entropy"
    )]
    async fn update_user(&self, req: Request<apb::UpdateUserRequest>) -> R<apb::User> {
        use rand_core::OsRng;
        let actor = self.actor(&req, Access::Identity, "UpdateUser")?;
        let r = req.get_ref();
        limit_len("password", &r.password, crate::accounts::MAX_PASSWORD)?;
        if r.key_expiry_ms.is_some() && r.clear_key_expiry {
            return Err(Status::invalid_argument(
                "key_expiry_ms and clear_key_expiry are exclusive",
            ));
        }
        if !r.password.is_empty() && r.clear_password {
            return Err(Status::invalid_argument(
                "password and clear_password are exclusive",
            ));
        }
        let update = UserUpdate {
            role: parse_role(&r.role)?,
            key_expiry_ms: if r.clear_key_expiry {
                Some(None)
            } else {
                r.key_expiry_ms.map(Some)
            },
            password: if r.clear_password {
                Some(None)
            } else {
                (!r.password.is_empty()).then(|| Some(r.password.clone()))
            },
            reset_mfa: r.reset_mfa,
            unlink_sso: r.unlink_sso,
        };
        // A new password is hashed with argon2: off the async workers.
        let (mesh, login) = (self.mesh.clone(), r.login.clone());
        let u = tokio::task::spawn_blocking(move || {
            mesh.update_user(&actor.name, &login, &update, &mut OsRng, now_ms())
        })
        .await
        .map_err(|_| Status::internal("updating the user failed"))??;
        ok(self.user_pb(u))
    }

    async fn create_auth_key(
        &self,
        req: Request<apb::CreateAuthKeyRequest>,
    ) -> R<apb::CreateAuthKeyResponse> {
        let actor = self.actor(&req, Access::Network, "CreateAuthKey")?;
        let r = req.get_ref();
        if r.tags.len() > 64 {
            return Err(Status::invalid_argument("at most 64 tags"));
        }
        let user = (!r.user.is_empty()).then_some(r.user.as_str());
        let detail = KeyDetail::auth(user, &r.tags, r.reusable, r.ephemeral);
        let (row, secret) = self.create_key(&actor.name, detail, r.expiry_secs)?;
        ok(apb::CreateAuthKeyResponse {
            key: auth_key_pb(&row),
            secret,
        })
    }

    async fn list_auth_keys(
        &self,
        req: Request<apb::ListKeysRequest>,
    ) -> R<apb::ListAuthKeysResponse> {
        let keys = self.list_keys(&req, "ListAuthKeys", SecretKind::AuthKey, auth_key_pb)?;
        ok(apb::ListAuthKeysResponse { keys })
    }

    async fn revoke_auth_key(&self, req: Request<apb::KeyRef>) -> R<apb::RevokeKeyResponse> {
        ok(self.revoke_key(&req, "RevokeAuthKey", SecretKind::AuthKey)?)
    }

    async fn list_nodes(&self, req: Request<apb::ListNodesRequest>) -> R<apb::ListNodesResponse> {
        self.actor(&req, Access::Read, "ListNodes")?;
        self.mesh.sync(now_ms());
        let nodes = self
            .mesh
            .nodes()
            .iter()
            .map(|(n, online)| self.node_pb(n, *online))
            .collect();
        ok(apb::ListNodesResponse { nodes })
    }

    async fn get_node(&self, req: Request<apb::NodeRef>) -> R<apb::Node> {
        self.actor(&req, Access::Read, "GetNode")?;
        self.mesh.sync(now_ms());
        let n = self.mesh.find_node(&req.get_ref().node)?;
        let online = self.mesh.nodes().iter().any(|(x, o)| x.id == n.id && *o);
        ok(self.node_pb(&n, online))
    }

    async fn delete_node(&self, req: Request<apb::NodeRef>) -> R<apb::DeleteNodeResponse> {
        let actor = self.actor(&req, Access::Network, "DeleteNode")?;
        self.mesh.sync(now_ms());
        self.mesh
            .delete_node(&actor.name, &req.get_ref().node, now_ms())?;
        ok(apb::DeleteNodeResponse {})
    }

    async fn expire_node(&self, req: Request<apb::NodeRef>) -> R<apb::Node> {
        let actor = self.actor(&req, Access::Network, "ExpireNode")?;
        self.mesh.sync(now_ms());
        let n = self
            .mesh
            .expire_node(&actor.name, &req.get_ref().node, now_ms())?;
        ok(self.node_pb(&n, false))
    }

    async fn release_node(&self, req: Request<apb::NodeRef>) -> R<apb::Node> {
        let actor = self.actor(&req, Access::Network, "ReleaseNode")?;
        self.mesh.sync(now_ms());
        let n = self
            .mesh
            .release_node(&actor.name, &req.get_ref().node, now_ms())?;
        let online = self.mesh.has_live_session(n.id);
        ok(self.node_pb(&n, online))
    }

    async fn quarantine_node(&self, req: Request<apb::QuarantineNodeRequest>) -> R<apb::Node> {
        let actor = self.actor(&req, Access::Network, "QuarantineNode")?;
        let r = req.get_ref();
        self.mesh.sync(now_ms());
        let n = self
            .mesh
            .quarantine_node(&actor.name, &r.node, &r.reason, now_ms())?;
        let online = self.mesh.has_live_session(n.id);
        ok(self.node_pb(&n, online))
    }

    async fn get_policy_graph(
        &self,
        req: Request<apb::GetPolicyGraphRequest>,
    ) -> R<apb::PolicyGraph> {
        self.actor(&req, Access::Read, "GetPolicyGraph")?;
        let (edges, version) = self.mesh.policy_graph();
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let edges = edges
            .into_iter()
            .map(|e| apb::PolicyEdge {
                src: e.src,
                dst: e.dst,
                ports: e.ports,
                rule_id: e.rule_id,
                postures: e.postures,
                src_nodes: count(e.src_nodes),
                dst_nodes: count(e.dst_nodes),
            })
            .collect();
        ok(apb::PolicyGraph { edges, version })
    }

    #[expect(
        clippy::disallowed_types,
        reason = "the API shell draws the new signing key from OS entropy"
    )]
    async fn rotate_signing_key(
        &self,
        req: Request<apb::RotateSigningKeyRequest>,
    ) -> R<apb::RotateSigningKeyResponse> {
        use rand_core::OsRng;
        let actor = self.actor(&req, Access::Identity, "RotateSigningKey")?;
        let new = SigningKey::generate(&mut OsRng);
        let mesh = self.mesh.clone();
        let grace_ms = req.get_ref().grace_ms;
        // Files are written and synced, and every connected node gets a map.
        let h = tokio::task::spawn_blocking(move || {
            mesh.rotate_signing(&actor.name, new, grace_ms, now_ms())
        })
        .await
        .map_err(|e| Status::internal(format!("rotation task failed: {e}")))??;
        ok(apb::RotateSigningKeyResponse {
            old_key: h.old_key.to_string(),
            new_key: h.new_key.to_string(),
            valid_from_ms: h.valid_from_ms,
            not_after_ms: h.not_after_ms,
        })
    }

    async fn stage_tls_cert(&self, req: Request<apb::StageTlsCertRequest>) -> R<apb::TlsStatus> {
        let actor = self.actor(&req, Access::Identity, "StageTlsCert")?;
        let r = req.into_inner();
        limit_len("cert_pem", &r.cert_pem, 64 * 1024)?;
        limit_len("key_pem", &r.key_pem, 64 * 1024)?;
        let cert = if r.cert_pem.is_empty() && r.key_pem.is_empty() {
            crate::tlscerts::TlsCert::generate()
        } else {
            crate::tlscerts::TlsCert::from_pem(&r.cert_pem, &r.key_pem)
        }
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mesh = self.mesh.clone();
        tokio::task::spawn_blocking(move || mesh.tls_stage(&actor.name, cert, now_ms()))
            .await
            .map_err(|e| Status::internal(format!("staging task failed: {e}")))??;
        ok(self.tls_status()?)
    }

    async fn switch_tls_cert(&self, req: Request<apb::SwitchTlsCertRequest>) -> R<apb::TlsStatus> {
        let actor = self.actor(&req, Access::Identity, "SwitchTlsCert")?;
        let grace_ms = req.get_ref().grace_ms;
        let mesh = self.mesh.clone();
        tokio::task::spawn_blocking(move || mesh.tls_switch(&actor.name, grace_ms, now_ms()))
            .await
            .map_err(|e| Status::internal(format!("switch task failed: {e}")))??;
        ok(self.tls_status()?)
    }

    async fn get_tls_status(&self, req: Request<apb::GetTlsStatusRequest>) -> R<apb::TlsStatus> {
        self.actor(&req, Access::Read, "GetTlsStatus")?;
        ok(self.tls_status()?)
    }

    async fn list_detections(
        &self,
        req: Request<apb::ListDetectionsRequest>,
    ) -> R<apb::ListDetectionsResponse> {
        self.actor(&req, Access::Read, "ListDetections")?;
        let r = req.get_ref();
        // Up to 16 testimonies each: 500 stay well inside a response.
        let limit = match r.limit {
            0 => 100,
            n => n.min(500),
        };
        let detections = self
            .mesh
            .store()
            .detections(limit, (r.before_id > 0).then_some(r.before_id))
            .map_err(Error::from)?
            .into_iter()
            .map(|d| apb::Detection {
                id: d.id,
                time_ms: d.time_ms,
                node_id: d.node_id,
                node: d.node_name,
                detectors_json: d.detectors,
                action: d.action,
                evidence_json: d.evidence,
                alert: d.alert,
            })
            .collect();
        ok(apb::ListDetectionsResponse { detections })
    }

    async fn rename_node(&self, req: Request<apb::RenameNodeRequest>) -> R<apb::Node> {
        let actor = self.actor(&req, Access::Network, "RenameNode")?;
        self.mesh.sync(now_ms());
        let r = req.get_ref();
        let n = self
            .mesh
            .rename_node(&actor.name, &r.node, &r.new_name, now_ms())?;
        ok(self.node_pb(&n, false))
    }

    async fn set_node_routes(&self, req: Request<apb::SetNodeRoutesRequest>) -> R<apb::Node> {
        let actor = self.actor(&req, Access::Network, "SetNodeRoutes")?;
        self.mesh.sync(now_ms());
        let r = req.get_ref();
        if r.approve.len() + r.unapprove.len() > crate::routes::MAX_ROUTES * 2 {
            return Err(Status::invalid_argument("too many prefixes in one request"));
        }
        let change = crate::mesh::RouteApproval {
            approve: r.approve.clone(),
            unapprove: r.unapprove.clone(),
            approve_exit_node: r.approve_exit_node,
            unapprove_exit_node: r.unapprove_exit_node,
        };
        let n = self
            .mesh
            .approve_routes(&actor.name, &r.node, &change, now_ms())?;
        ok(self.node_pb(&n, false))
    }

    async fn set_node_attributes(
        &self,
        req: Request<apb::SetNodeAttributesRequest>,
    ) -> R<apb::Node> {
        let actor = self.actor(&req, Access::Network, "SetNodeAttributes")?;
        self.mesh.sync(now_ms());
        let r = req.get_ref();
        if r.set.len() + r.unset.len() > crate::nodeinput::MAX_CUSTOM_ATTRIBUTES {
            return Err(Status::invalid_argument(
                "too many attributes in one request",
            ));
        }
        let mut set = Vec::with_capacity(r.set.len());
        for a in &r.set {
            use apb::attribute::Value;
            let v = match &a.value {
                Some(Value::Text(t)) => AttrValue::Str(t.clone()),
                Some(Value::Number(n)) => AttrValue::Int(*n),
                Some(Value::Flag(b)) => AttrValue::Bool(*b),
                None => {
                    return Err(Status::invalid_argument(format!(
                        "attribute {:?} has no value",
                        a.key.chars().take(64).collect::<String>()
                    )))
                }
            };
            set.push((a.key.clone(), v));
        }
        let n = self
            .mesh
            .set_node_attributes(&actor.name, &r.node, &set, &r.unset, now_ms())?;
        ok(self.node_pb(&n, false))
    }

    async fn set_policy(&self, req: Request<apb::SetPolicyRequest>) -> R<apb::SetPolicyResponse> {
        let actor = self.actor(&req, Access::Network, "SetPolicy")?;
        let r = req.get_ref();
        limit_len("policy", &r.text, 4 << 20)?;
        limit_len("file_name", &r.file_name, 256)?;
        let version =
            self.mesh
                .set_policy_if(&actor.name, &r.file_name, &r.text, r.if_version, now_ms())?;
        ok(apb::SetPolicyResponse { version })
    }

    async fn get_policy(&self, req: Request<apb::GetPolicyRequest>) -> R<apb::GetPolicyResponse> {
        self.actor(&req, Access::Read, "GetPolicy")?;
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
        self.actor(&req, Access::Read, "PlanPolicy")?;
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
        self.actor(&req, Access::Read, "ExplainPolicy")?;
        let r = req.get_ref();
        let port = u16::try_from(r.port).map_err(|_| Status::invalid_argument("port > 65535"))?;
        // Empty means "not given": TCP, as in a policy's `tests`.
        let proto = if r.proto.is_empty() {
            ztmesh_policy::DEFAULT_TEST_PROTO
        } else {
            ztmesh_policy::parse_proto(&r.proto)
                .map_err(|e| Status::invalid_argument(e.to_string()))?
        };
        let e = self.mesh.explain(&r.src, &r.dst, port, proto);
        ok(apb::ExplainPolicyResponse {
            allowed: e.allowed,
            rule_id: e.rule_id.unwrap_or_default(),
            detail: e.detail,
            posture: e.posture,
        })
    }

    async fn create_api_key(
        &self,
        req: Request<apb::CreateApiKeyRequest>,
    ) -> R<apb::CreateApiKeyResponse> {
        let actor = self.actor(&req, Access::Identity, "CreateApiKey")?;
        let r = req.get_ref();
        let role = parse_role(&r.role)?.unwrap_or(actor.role);
        if !actor.role.may_grant(role) {
            return Err(Status::permission_denied(format!(
                "{} has the {} role and cannot issue a key with the {role} role",
                actor.name, actor.role
            )));
        }
        let detail = KeyDetail::api(&r.description, role);
        let (row, secret) = self.create_key(&actor.name, detail, r.expiry_secs)?;
        ok(apb::CreateApiKeyResponse {
            key: api_key_pb(&row),
            secret,
        })
    }

    async fn list_api_keys(
        &self,
        req: Request<apb::ListKeysRequest>,
    ) -> R<apb::ListApiKeysResponse> {
        let keys = self.list_keys(&req, "ListApiKeys", SecretKind::ApiKey, api_key_pb)?;
        ok(apb::ListApiKeysResponse { keys })
    }

    async fn revoke_api_key(&self, req: Request<apb::KeyRef>) -> R<apb::RevokeKeyResponse> {
        ok(self.revoke_key(&req, "RevokeApiKey", SecretKind::ApiKey)?)
    }

    async fn list_audit(&self, req: Request<apb::ListAuditRequest>) -> R<apb::ListAuditResponse> {
        self.actor(&req, Access::Read, "ListAudit")?;
        let r = req.get_ref();
        let limit = match r.limit {
            0 => 100,
            n => n.min(10_000),
        };
        let filter = AuditFilter::new(r)?;
        // Filters search the newest AUDIT_SEARCH_WINDOW events.
        let window = if filter.is_empty() {
            limit
        } else {
            AUDIT_SEARCH_WINDOW
        };
        let events = self
            .mesh
            .store()
            .audit_log(window)
            .map_err(Error::from)?
            .into_iter()
            .filter(|a| filter.matches(a))
            .take(limit as usize)
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

    async fn list_flows(&self, req: Request<apb::ListFlowsRequest>) -> R<apb::ListFlowsResponse> {
        self.actor(&req, Access::Read, "ListFlows")?;
        let r = req.get_ref();
        let allowed = match (r.denied_only, r.allowed_only) {
            (true, true) => {
                return Err(Status::invalid_argument(
                    "denied_only and allowed_only exclude each other",
                ))
            }
            (true, false) => Some(false),
            (false, true) => Some(true),
            (false, false) => None,
        };
        // A live node by name or id; else a deleted one's records, by the id
        // or the name it had.
        let (node_id, node_name) = match r.node.as_str() {
            "" => (None, None),
            n => match (self.mesh.find_node(n), n.parse::<u64>()) {
                (Ok(row), _) => (Some(row.id), None),
                (Err(_), Ok(id)) => (Some(id), None),
                (Err(_), Err(_)) => (None, Some(n.to_string())),
            },
        };
        let q = FlowQuery {
            node_id,
            node_name,
            before_id: (r.before_id > 0).then_some(r.before_id),
            since_ms: r.since_ms,
            allowed,
            limit: match r.limit {
                0 => 100,
                n => n.min(10_000),
            },
        };
        let flows = self
            .mesh
            .store()
            .flows(&q)
            .map_err(Error::from)?
            .into_iter()
            .map(|f| apb::FlowRecord {
                id: f.id,
                time_ms: f.time_ms,
                node: f.node_name,
                node_id: f.node_id,
                src: f.src,
                dst: f.dst,
                protocol: u32::from(f.proto),
                dst_port: u32::from(f.dst_port),
                allowed: f.allowed,
                rule_id: f.rule_id,
                reason: f.reason,
                packets: f.packets,
                bytes: f.bytes,
                reply_packets: f.reply_packets,
                reply_bytes: f.reply_bytes,
                first_seen_ms: f.first_seen_ms,
                last_seen_ms: f.last_seen_ms,
            })
            .collect();
        ok(apb::ListFlowsResponse { flows })
    }

    type BackupStream = BackupStream;

    /// Streams an encrypted backup; the copy and the encryption run on a
    /// blocking thread, each encrypted chunk sent as it is made (bounded
    /// channel: a slow client slows the backup, memory stays flat).
    #[expect(
        clippy::disallowed_types,
        reason = "a backup's file key, salts and ephemeral key come from OS entropy"
    )]
    async fn backup(&self, req: Request<apb::BackupRequest>) -> R<BackupStream> {
        use apb::backup_request::Seal as PbSeal;
        use rand_core::OsRng;
        // It holds the signing key: the full admin role only.
        let actor = self.actor(&req, Access::Identity, "Backup")?;
        let seal = match req.into_inner().seal {
            Some(PbSeal::Recipient(r)) => SealWith::Recipient(
                r.parse()
                    .map_err(|e: backup::FormatError| Status::invalid_argument(e.to_string()))?,
            ),
            Some(PbSeal::Passphrase(p)) if !p.is_empty() => {
                limit_len("passphrase", &p, 1024)?;
                SealWith::Passphrase(p)
            }
            _ => {
                return Err(Status::invalid_argument(
                    "a backup needs a recipient (ztmr1...) or a passphrase",
                ))
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mesh = self.mesh.clone();
        let layout = self.layout.clone();
        tokio::task::spawn_blocking(move || {
            let now = now_ms();
            let (kind, seal) = match &seal {
                SealWith::Recipient(r) => ("x25519", backup::Seal::To(r)),
                SealWith::Passphrase(p) => (
                    "passphrase",
                    backup::Seal::Passphrase(p.as_bytes(), backup::KdfParams::DEFAULT),
                ),
            };
            let mut sink = ChunkSink {
                tx: tx.clone(),
                sent: 0,
            };
            let announce = |m: &backup::Manifest| {
                let info = apb::BackupInfo {
                    store: m.store.as_str().into(),
                    schema_version: m.schema_version.unwrap_or(0),
                    controller_key: m.controller_key.clone(),
                    created_ms: m.created_ms,
                    files: m.files.iter().map(|f| f.name.clone()).collect(),
                };
                tx.blocking_send(Ok(apb::BackupChunk {
                    info: Some(info),
                    data: Vec::new(),
                }))
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            };
            let result = crate::recovery::write_backup(
                &layout,
                mesh.store(),
                &seal,
                &mut sink,
                announce,
                now,
                &mut OsRng,
            );
            let detail = match &result {
                Ok((sink, m)) => format!(
                    "size={} store={} schema={}",
                    sink.sent,
                    m.store.as_str(),
                    m.schema_version.map_or("-".into(), |v| v.to_string())
                ),
                Err(e) => format!("failed: {e:#}"),
            };
            tracing::info!(actor = %actor.name, seal = kind, detail = %detail, "controller backup");
            if let Err(e) =
                mesh.store()
                    .audit(now_ms(), &actor.name, "controller.backup", kind, &detail)
            {
                tracing::error!(error = %e, "cannot write audit record");
            }
            if let Err(e) = result {
                let _ = tx.blocking_send(Err(Status::internal(format!("backup failed: {e:#}"))));
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

type BackupStream = Pin<Box<dyn Stream<Item = Result<apb::BackupChunk, Status>> + Send>>;

/// What a backup is sealed with, owned by its blocking task.
enum SealWith {
    Recipient(backup::Recipient),
    Passphrase(String),
}

/// Sends each encrypted chunk to the client as a `BackupChunk`.
struct ChunkSink {
    tx: tokio::sync::mpsc::Sender<Result<apb::BackupChunk, Status>>,
    sent: u64,
}

impl std::io::Write for ChunkSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.tx
            .blocking_send(Ok(apb::BackupChunk {
                info: None,
                data: data.to_vec(),
            }))
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
        self.sent += data.len() as u64;
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
