//! [`TimedStore`]: a [`Store`] that times every call into the
//! `ztmesh_controller_store_operation_seconds{op}` histogram. The one place
//! store latency is measured: the coordinator holds a `dyn Store` and never
//! knows it is timed.
//!
//! A shell (it reads the monotonic clock); the label is the trait method's
//! name, a fixed set.

use std::sync::Arc;
use std::time::Instant;

use ztmesh_proto::keys::{PublicKey, SigningKey};

use crate::auditchain::{ChainError, ChainRow, Verified};
use crate::metrics::Metrics;
use crate::roles::Role;
use crate::secrets::{SecretKind, SecretRecord};
use crate::store::{
    AuditEntry, AuditRow, ChangeBatch, Credentials, DetectionRow, FlowQuery, FlowRow, NewNode,
    NodePosture, NodeRoutes, NodeRow, PolicyRow, Quarantine, Result, Snapshot, Store, UserRow,
};
use crate::UnixMs;

/// Times each call of the store it wraps.
pub struct TimedStore<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S: Store> TimedStore<S> {
    pub fn new(inner: S, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    #[expect(
        clippy::disallowed_methods,
        reason = "the store shell times its own calls"
    )]
    fn timed<T>(&self, op: &'static str, call: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = call();
        self.metrics.store_op(op, start.elapsed());
        out
    }
}

impl<S: Store> Store for TimedStore<S> {
    fn online_backup(&self, dest: &std::path::Path) -> Result<Snapshot> {
        self.timed("online_backup", || self.inner.online_backup(dest))
    }
    fn meta(&self, key: &str) -> Result<Option<String>> {
        self.timed("meta", || self.inner.meta(key))
    }
    fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.timed("set_meta", || self.inner.set_meta(key, value))
    }
    fn init_meta(&self, key: &str, value: &str) -> Result<String> {
        self.timed("init_meta", || self.inner.init_meta(key, value))
    }
    fn create_user(&self, login: &str, role: Role, now: UnixMs) -> Result<UserRow> {
        self.timed("create_user", || self.inner.create_user(login, role, now))
    }
    fn users(&self) -> Result<Vec<UserRow>> {
        self.timed("users", || self.inner.users())
    }
    fn set_user_role(&self, login: &str, role: Role) -> Result<()> {
        self.timed("set_user_role", || self.inner.set_user_role(login, role))
    }
    fn set_user_key_expiry(&self, login: &str, ms: Option<UnixMs>) -> Result<()> {
        self.timed("set_user_key_expiry", || {
            self.inner.set_user_key_expiry(login, ms)
        })
    }
    fn credentials(&self, login: &str) -> Result<Option<Credentials>> {
        self.timed("credentials", || self.inner.credentials(login))
    }
    fn set_password(&self, login: &str, phc: Option<&str>) -> Result<()> {
        self.timed("set_password", || self.inner.set_password(login, phc))
    }
    fn set_totp(
        &self,
        login: &str,
        secret: Option<&[u8]>,
        recovery: &[String],
        last_step: i64,
    ) -> Result<()> {
        self.timed("set_totp", || {
            self.inner.set_totp(login, secret, recovery, last_step)
        })
    }
    fn enroll_totp(
        &self,
        login: &str,
        secret: &[u8],
        recovery: &[String],
        last_step: i64,
    ) -> Result<bool> {
        self.timed("enroll_totp", || {
            self.inner.enroll_totp(login, secret, recovery, last_step)
        })
    }
    fn use_totp_step(&self, login: &str, step: i64) -> Result<bool> {
        self.timed("use_totp_step", || self.inner.use_totp_step(login, step))
    }
    fn use_recovery_code(&self, login: &str, hash: &str) -> Result<bool> {
        self.timed("use_recovery_code", || {
            self.inner.use_recovery_code(login, hash)
        })
    }
    fn identity_login(&self, issuer: &str, subject: &str) -> Result<Option<String>> {
        self.timed("identity_login", || {
            self.inner.identity_login(issuer, subject)
        })
    }
    fn identities(&self, login: &str) -> Result<Vec<(String, String)>> {
        self.timed("identities", || self.inner.identities(login))
    }
    fn unlink_identities(&self, login: &str) -> Result<usize> {
        self.timed("unlink_identities", || self.inner.unlink_identities(login))
    }
    fn link_identity(&self, issuer: &str, subject: &str, login: &str, now: UnixMs) -> Result<()> {
        self.timed("link_identity", || {
            self.inner.link_identity(issuer, subject, login, now)
        })
    }
    fn delete_user(&self, login: &str) -> Result<Vec<u64>> {
        self.timed("delete_user", || self.inner.delete_user(login))
    }
    fn create_key(&self, key: &SecretRecord) -> Result<SecretRecord> {
        self.timed("create_key", || self.inner.create_key(key))
    }
    fn keys(&self, kind: SecretKind) -> Result<Vec<SecretRecord>> {
        self.timed("keys", || self.inner.keys(kind))
    }
    fn find_key(&self, kind: SecretKind, key_id: &str) -> Result<Option<SecretRecord>> {
        self.timed("find_key", || self.inner.find_key(kind, key_id))
    }
    fn revoke_key(&self, kind: SecretKind, key_id: &str) -> Result<()> {
        self.timed("revoke_key", || self.inner.revoke_key(kind, key_id))
    }
    fn enroll(
        &self,
        key_id: &str,
        check: &dyn Fn(Option<&SecretRecord>) -> std::result::Result<(), String>,
        node: NewNode,
    ) -> Result<NodeRow> {
        self.timed("enroll", || self.inner.enroll(key_id, check, node))
    }
    fn consume_key(
        &self,
        key_id: &str,
        check: &dyn Fn(Option<&SecretRecord>) -> std::result::Result<(), String>,
    ) -> Result<()> {
        self.timed("consume_key", || self.inner.consume_key(key_id, check))
    }
    fn enroll_for_user(&self, user: &str, node: NewNode) -> Result<NodeRow> {
        self.timed("enroll_for_user", || self.inner.enroll_for_user(user, node))
    }
    fn reauth_node(&self, id: u64, expiry_ms: UnixMs) -> Result<()> {
        self.timed("reauth_node", || self.inner.reauth_node(id, expiry_ms))
    }
    fn nodes(&self) -> Result<Vec<NodeRow>> {
        self.timed("nodes", || self.inner.nodes())
    }
    fn delete_node(&self, id: u64) -> Result<()> {
        self.timed("delete_node", || self.inner.delete_node(id))
    }
    fn revoke_node_key(&self, id: u64, at: UnixMs) -> Result<()> {
        self.timed("revoke_node_key", || self.inner.revoke_node_key(id, at))
    }
    fn rename_node(&self, id: u64, name: &str) -> Result<()> {
        self.timed("rename_node", || self.inner.rename_node(id, name))
    }
    fn set_node_seen(&self, id: u64, last_seen_ms: UnixMs) -> Result<()> {
        self.timed("set_node_seen", || {
            self.inner.set_node_seen(id, last_seen_ms)
        })
    }
    fn set_nodes_seen(&self, seen: &[(u64, UnixMs)]) -> Result<()> {
        self.timed("set_nodes_seen", || self.inner.set_nodes_seen(seen))
    }
    fn set_node_endpoints(&self, id: u64, endpoints: &[String]) -> Result<()> {
        self.timed("set_node_endpoints", || {
            self.inner.set_node_endpoints(id, endpoints)
        })
    }
    fn set_node_routes(&self, id: u64, routes: &NodeRoutes) -> Result<()> {
        self.timed("set_node_routes", || self.inner.set_node_routes(id, routes))
    }
    fn set_node_posture(&self, id: u64, posture: &NodePosture) -> Result<()> {
        self.timed("set_node_posture", || {
            self.inner.set_node_posture(id, posture)
        })
    }
    fn set_policy(&self, file_name: &str, text: &str, now: UnixMs) -> Result<PolicyRow> {
        self.timed("set_policy", || self.inner.set_policy(file_name, text, now))
    }
    fn policy(&self) -> Result<Option<PolicyRow>> {
        self.timed("policy", || self.inner.policy())
    }
    fn audit(
        &self,
        time_ms: UnixMs,
        actor: &str,
        action: &str,
        target: &str,
        detail: &str,
    ) -> Result<()> {
        self.timed("audit", || {
            self.inner.audit(time_ms, actor, action, target, detail)
        })
    }
    fn audit_batch(&self, rows: &[AuditEntry]) -> Result<()> {
        self.timed("audit_batch", || self.inner.audit_batch(rows))
    }
    fn audit_log(&self, limit: u32) -> Result<Vec<AuditRow>> {
        self.timed("audit_log", || self.inner.audit_log(limit))
    }
    fn prune_audit(
        &self,
        older_than_ms: UnixMs,
        max_flow_rows: u64,
        now: UnixMs,
        key: &SigningKey,
    ) -> Result<u64> {
        self.timed("prune_audit", || {
            self.inner
                .prune_audit(older_than_ms, max_flow_rows, now, key)
        })
    }
    fn sign_audit_head(&self, now: UnixMs, key: &SigningKey) -> Result<Option<u64>> {
        self.timed("sign_audit_head", || self.inner.sign_audit_head(now, key))
    }
    fn verify_audit(&self, key: &PublicKey) -> Result<std::result::Result<Verified, ChainError>> {
        self.timed("verify_audit", || self.inner.verify_audit(key))
    }
    fn audit_rows(&self, since_ms: UnixMs, each: &mut dyn FnMut(&ChainRow) -> bool) -> Result<()> {
        self.timed("audit_rows", || self.inner.audit_rows(since_ms, each))
    }
    fn record_flows(&self, rows: &[FlowRow]) -> Result<()> {
        self.timed("record_flows", || self.inner.record_flows(rows))
    }
    fn flows(&self, q: &FlowQuery) -> Result<Vec<FlowRow>> {
        self.timed("flows", || self.inner.flows(q))
    }
    fn prune_flows(&self, older_than_ms: UnixMs, max_per_node: u64, max_rows: u64) -> Result<u64> {
        self.timed("prune_flows", || {
            self.inner
                .prune_flows(older_than_ms, max_per_node, max_rows)
        })
    }
    fn set_node_quarantine(&self, id: u64, q: Option<&Quarantine>) -> Result<()> {
        self.timed("set_node_quarantine", || {
            self.inner.set_node_quarantine(id, q)
        })
    }
    fn record_detection(&self, d: &DetectionRow) -> Result<u64> {
        self.timed("record_detection", || self.inner.record_detection(d))
    }
    fn set_detection_alert(&self, id: u64, alert: &str) -> Result<()> {
        self.timed("set_detection_alert", || {
            self.inner.set_detection_alert(id, alert)
        })
    }
    fn detections(&self, limit: u32, before_id: Option<u64>) -> Result<Vec<DetectionRow>> {
        self.timed("detections", || self.inner.detections(limit, before_id))
    }
    fn prune_detections(&self, older_than_ms: UnixMs) -> Result<u64> {
        self.timed("prune_detections", || {
            self.inner.prune_detections(older_than_ms)
        })
    }

    fn node(&self, id: u64) -> Result<Option<NodeRow>> {
        self.timed("node", || self.inner.node(id))
    }

    fn change_head(&self) -> Result<u64> {
        self.timed("change_head", || self.inner.change_head())
    }

    fn changes_since(&self, after: u64, limit: u32) -> Result<ChangeBatch> {
        self.timed("changes_since", || self.inner.changes_since(after, limit))
    }

    fn prune_changes(&self, max_age_ms: i64) -> Result<u64> {
        self.timed("prune_changes", || self.inner.prune_changes(max_age_ms))
    }

    fn take_serial(&self, floor: u64) -> Result<Option<u64>> {
        self.timed("take_serial", || self.inner.take_serial(floor))
    }
}
