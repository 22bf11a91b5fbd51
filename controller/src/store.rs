//! Durable state behind the [`Store`] trait; [`SqliteStore`] is the embedded default.
//!
//! The controller keeps its working set in memory ([`crate::mesh`]) and writes
//! every change through to the store before acknowledging it, so a `kill -9`
//! loses nothing that was acknowledged (SQLite WAL, `synchronous=FULL`). The
//! trait is synchronous and narrow so that a PostgreSQL implementation (several
//! controllers) can follow without touching callers. Every query is
//! parameterized.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::Mutex;

use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use ztmesh_policy::AttrValue;
use ztmesh_proto::keys::{PublicKey, SigningKey};

use crate::auditchain::{
    ChainError, ChainRow, Checkpoint, Hash, Mark, RowFields, Verified, Verifier, GENESIS,
};
pub use crate::model::{NodePosture, NodeRoutes, NodeRow, Quarantine};
use crate::roles::Role;
use crate::secrets::{KeyDetail, SecretKind, SecretRecord};
use crate::UnixMs;

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened, read or written, or a stored value
    /// does not parse (corruption or a newer schema).
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    /// A unique name, key or address is already taken.
    #[error("{0} already exists")]
    Conflict(String),
    /// The referenced row does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The auth key cannot be used; the message is the enrollment check's
    /// verdict (unknown, revoked, expired, used up, not allowed).
    #[error("auth key refused: {0}")]
    KeyRefused(String),
    /// The audit chain does not verify where the store was about to prune
    /// or sign: it refuses to vouch for rows it did not write. Run `audit
    /// verify` and investigate.
    #[error("audit chain broken at {0}")]
    Chain(ChainError),
    /// The database's schema is not the one this binary writes: open it
    /// read-write once (`serve`) to migrate, or use the matching binary.
    #[error("database schema: {0}")]
    Schema(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserRow {
    pub id: u64,
    pub login: String,
    pub created_ms: UnixMs,
    pub role: Role,
    /// Lifetime of the keys of this user's nodes, overriding the
    /// controller's default; `Some(0)` = they never expire.
    pub key_expiry_ms: Option<UnixMs>,
    /// Signs in with a built-in password (else only through SSO).
    pub has_password: bool,
    /// Has a TOTP second factor enrolled.
    pub has_totp: bool,
}

/// What a built-in account signs in with (see [`crate::accounts`]).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub login: String,
    pub role: Role,
    /// argon2id PHC string.
    pub password_hash: Option<String>,
    pub totp_secret: Option<Vec<u8>>,
    /// The last TOTP step accepted (a code works once).
    pub totp_last_step: i64,
    /// SHA-256 (hex) of each unused recovery code.
    pub recovery: Vec<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("login", &self.login)
            .field("role", &self.role)
            .field("password", &self.password_hash.is_some())
            .field("totp", &self.totp_secret.is_some())
            .field("recovery_codes", &self.recovery.len())
            .finish()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyRow {
    pub version: u64,
    pub file_name: String,
    pub text: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRow {
    pub id: u64,
    pub time_ms: UnixMs,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: String,
}

/// An audit record to write (the store assigns the id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    pub time_ms: UnixMs,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: String,
}

/// The audit action of node-reported rows, the ones capped by count.
pub const FLOW_AUDIT_ACTION: &str = "flow.denied";

/// A flow a node reported: allowed (with the rule that admitted it) or
/// denied (with the reason), as its receiver saw it over one report window.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct FlowRow {
    /// Assigned by the store (0 when writing).
    pub id: u64,
    /// When the controller received the report.
    pub time_ms: UnixMs,
    /// The reporting node (the flow's receiver), by id and by its name then.
    pub node_id: u64,
    pub node_name: String,
    pub src: String,
    pub dst: String,
    pub proto: u8,
    pub dst_port: u16,
    pub allowed: bool,
    /// Allowed flows: the ACL entry, "FILE:LINE".
    pub rule_id: String,
    /// Denied flows: why.
    pub reason: String,
    pub packets: u64,
    pub bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// The node's clock, clamped by the controller (see `Mesh::record_flows`).
    pub first_seen_ms: UnixMs,
    pub last_seen_ms: UnixMs,
}

/// Which flow records to read, newest first.
#[derive(Clone, Debug, Default)]
pub struct FlowQuery {
    /// Only the ones this node reported.
    pub node_id: Option<u64>,
    /// Only the ones a node of this name reported (e.g. a deleted node).
    pub node_name: Option<String>,
    /// Only the ones older than this record (paging: the last id seen).
    pub before_id: Option<u64>,
    /// Only the ones received at or after this time.
    pub since_ms: UnixMs,
    /// Only allowed (`Some(true)`) or only denied (`Some(false)`) flows.
    pub allowed: Option<bool>,
    pub limit: u32,
}

/// A node to insert at enrollment; the store assigns the id.
#[derive(Clone, Debug)]
pub struct NewNode {
    pub name: String,
    pub hostname: String,
    pub machine_key: [u8; 32],
    pub wg_key: [u8; 32],
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub created_ms: UnixMs,
    pub expiry_ms: UnixMs,
}

/// Everything the controller persists.
pub trait Store: Send + Sync {
    fn meta(&self, key: &str) -> Result<Option<String>>;
    fn set_meta(&self, key: &str, value: &str) -> Result<()>;

    fn create_user(&self, login: &str, role: Role, now: UnixMs) -> Result<UserRow>;
    fn users(&self) -> Result<Vec<UserRow>>;
    fn set_user_role(&self, login: &str, role: Role) -> Result<()>;
    /// `None`: the controller's default key lifetime for this user's nodes.
    fn set_user_key_expiry(&self, login: &str, ms: Option<UnixMs>) -> Result<()>;
    fn credentials(&self, login: &str) -> Result<Option<Credentials>>;
    /// Sets (or with `None` removes) the user's password hash.
    fn set_password(&self, login: &str, phc: Option<&str>) -> Result<()>;
    /// Enrols (or with `None` removes) a TOTP secret with new recovery code
    /// hashes; the last accepted step starts again at `last_step`.
    fn set_totp(
        &self,
        login: &str,
        secret: Option<&[u8]>,
        recovery: &[String],
        last_step: i64,
    ) -> Result<()>;
    /// Enrols a TOTP secret only if the user has none, atomically: `false`
    /// when one is enrolled already (two enrolments racing: one wins).
    fn enroll_totp(
        &self,
        login: &str,
        secret: &[u8],
        recovery: &[String],
        last_step: i64,
    ) -> Result<bool>;
    /// Records TOTP `step` as used, atomically: `false` when this step (or a
    /// later one) was already used, so of two logins racing with one code
    /// exactly one gets through.
    fn use_totp_step(&self, login: &str, step: i64) -> Result<bool>;
    /// Removes one recovery code hash, atomically: `false` when it was
    /// already gone.
    fn use_recovery_code(&self, login: &str, hash: &str) -> Result<bool>;
    /// The login an SSO identity (issuer, subject) is linked to.
    fn identity_login(&self, issuer: &str, subject: &str) -> Result<Option<String>>;
    /// The SSO identities (issuer, subject) linked to a user.
    fn identities(&self, login: &str) -> Result<Vec<(String, String)>>;
    /// Forgets every SSO identity linked to a user; returns how many.
    fn unlink_identities(&self, login: &str) -> Result<usize>;
    /// Links an SSO identity to a user, for good (the user's deletion
    /// removes the link).
    fn link_identity(&self, issuer: &str, subject: &str, login: &str, now: UnixMs) -> Result<()>;
    /// Deletes the user and every node it owns; returns the deleted node ids.
    fn delete_user(&self, login: &str) -> Result<Vec<u64>>;

    /// Stores a new auth or API key; the store assigns its id, counted per kind.
    ///
    /// # Errors
    /// `NotFound` for an auth key's unknown user, `Conflict` for a key id
    /// already taken by a key of the same kind.
    fn create_key(&self, key: &SecretRecord) -> Result<SecretRecord>;
    /// The keys of one kind, by id.
    fn keys(&self, kind: SecretKind) -> Result<Vec<SecretRecord>>;
    /// The key of `kind` with this key id, if any.
    fn find_key(&self, kind: SecretKind, key_id: &str) -> Result<Option<SecretRecord>>;
    /// Marks a key revoked, for good.
    ///
    /// # Errors
    /// `NotFound` when no key of `kind` has this key id.
    fn revoke_key(&self, kind: SecretKind, key_id: &str) -> Result<()>;

    /// Checks and consumes the auth key and inserts the node, in one transaction:
    /// of two concurrent enrollments with one single-use key, exactly one succeeds.
    /// `check` sees the auth key stored under `key_id` (or `None`) and
    /// decides (secret, revocation, expiry, use, ownership); only a key it
    /// accepts is consumed.
    ///
    /// # Errors
    /// `KeyRefused` with the check's message; `Conflict` when the node's keys,
    /// name or addresses are taken (the key is then not consumed).
    fn enroll(
        &self,
        key_id: &str,
        check: &dyn Fn(Option<&SecretRecord>) -> std::result::Result<(), String>,
        node: NewNode,
    ) -> Result<NodeRow>;
    /// Checks and consumes an auth key without enrolling a node (a
    /// re-authentication), in one transaction like [`Store::enroll`].
    ///
    /// # Errors
    /// `KeyRefused` with the check's message.
    fn consume_key(
        &self,
        key_id: &str,
        check: &dyn Fn(Option<&SecretRecord>) -> std::result::Result<(), String>,
    ) -> Result<()>;
    /// Inserts a node owned by `user`, enrolled by an interactive login.
    ///
    /// # Errors
    /// `NotFound` for an unknown user; `Conflict` as [`Store::enroll`].
    fn enroll_for_user(&self, user: &str, node: NewNode) -> Result<NodeRow>;
    /// A node's owner signed in again: a new key expiry, the key no longer
    /// revoked; id, keys and addresses stay.
    fn reauth_node(&self, id: u64, expiry_ms: UnixMs) -> Result<()>;
    fn nodes(&self) -> Result<Vec<NodeRow>>;
    fn delete_node(&self, id: u64) -> Result<()>;
    /// Revokes a node's key as of `at`: it stays expired whatever the
    /// clock later reads.
    fn revoke_node_key(&self, id: u64, at: UnixMs) -> Result<()>;
    fn rename_node(&self, id: u64, name: &str) -> Result<()>;
    fn set_node_seen(&self, id: u64, last_seen_ms: UnixMs) -> Result<()>;
    /// Many `last_seen` updates at once (one transaction where the store has them).
    fn set_nodes_seen(&self, seen: &[(u64, UnixMs)]) -> Result<()> {
        seen.iter()
            .try_for_each(|&(id, ms)| self.set_node_seen(id, ms))
    }
    fn set_node_endpoints(&self, id: u64, endpoints: &[String]) -> Result<()>;
    /// Replaces a node's advertised and approved routes.
    fn set_node_routes(&self, id: u64, routes: &NodeRoutes) -> Result<()>;
    /// Replaces a node's posture attributes (reported and custom) and the
    /// time of its last report.
    fn set_node_posture(&self, id: u64, posture: &NodePosture) -> Result<()>;

    /// Stores a new policy version and returns it.
    fn set_policy(&self, file_name: &str, text: &str, now: UnixMs) -> Result<PolicyRow>;
    fn policy(&self) -> Result<Option<PolicyRow>>;

    fn audit(
        &self,
        time_ms: UnixMs,
        actor: &str,
        action: &str,
        target: &str,
        detail: &str,
    ) -> Result<()>;
    /// Many audit records in one transaction (where the store has them).
    fn audit_batch(&self, rows: &[AuditEntry]) -> Result<()> {
        rows.iter()
            .try_for_each(|r| self.audit(r.time_ms, &r.actor, &r.action, &r.target, &r.detail))
    }
    fn audit_log(&self, limit: u32) -> Result<Vec<AuditRow>>;
    /// Deletes audit rows older than `older_than_ms`, and [`FLOW_AUDIT_ACTION`]
    /// rows beyond the newest `max_flow_rows` (0 = no cap); returns how many.
    ///
    /// The chain stays verifiable: the rows around the deleted ones are
    /// verified first, and every run of deleted rows is recorded in a gap
    /// checkpoint signed with `key` as of `now` (see [`crate::auditchain`]).
    ///
    /// # Errors
    /// [`StoreError::Chain`] (nothing deleted) when the rows to prune or
    /// their neighbours do not verify.
    fn prune_audit(
        &self,
        older_than_ms: UnixMs,
        max_flow_rows: u64,
        now: UnixMs,
        key: &SigningKey,
    ) -> Result<u64>;
    /// Signs the chain head with `key` as of `now` if rows were written
    /// since the last signed head, after verifying those rows; returns the
    /// signed row id.
    ///
    /// # Errors
    /// [`StoreError::Chain`] (nothing signed) when those rows do not verify.
    fn sign_audit_head(&self, now: UnixMs, key: &SigningKey) -> Result<Option<u64>>;
    /// Verifies the whole audit chain with the controller's public key, in
    /// one snapshot; the outer error is a store failure, the inner one the
    /// first broken row.
    fn verify_audit(&self, key: &PublicKey) -> Result<std::result::Result<Verified, ChainError>>;
    /// Calls `each` with the rows written at or after `since_ms`, with their
    /// hashes, in id order, until it returns `false`.
    fn audit_rows(&self, since_ms: UnixMs, each: &mut dyn FnMut(&ChainRow) -> bool) -> Result<()>;

    /// Stores the flows of one report, in one transaction.
    fn record_flows(&self, rows: &[FlowRow]) -> Result<()>;
    /// Flow records matching `q`, newest first.
    fn flows(&self, q: &FlowQuery) -> Result<Vec<FlowRow>>;
    /// Deletes flow records received before `older_than_ms`, then each
    /// node's oldest beyond its newest `max_per_node`, then the oldest
    /// beyond the newest `max_rows` (0 = no cap); returns how many.
    fn prune_flows(&self, older_than_ms: UnixMs, max_per_node: u64, max_rows: u64) -> Result<u64>;

    /// Quarantines node `id` (`Some`) or releases it (`None`).
    fn set_node_quarantine(&self, id: u64, q: Option<&Quarantine>) -> Result<()>;
    /// Records a detection (its `id` is ignored); returns the id given.
    fn record_detection(&self, d: &DetectionRow) -> Result<u64>;
    /// Sets the alert state of detection `id` ("pending", "sent", "failed: …").
    fn set_detection_alert(&self, id: u64, alert: &str) -> Result<()>;
    /// Detections, newest first: at most `limit`, with ids below `before_id`.
    fn detections(&self, limit: u32, before_id: Option<u64>) -> Result<Vec<DetectionRow>>;
    /// Deletes detections recorded before `older_than_ms`; returns how many.
    fn prune_detections(&self, older_than_ms: UnixMs) -> Result<u64>;
}

/// One decision of the detectors, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DetectionRow {
    pub id: u64,
    pub time_ms: UnixMs,
    pub node_id: u64,
    pub node_name: String,
    /// The detectors that fired, JSON ([`crate::detect::Fired`] list).
    pub detectors: String,
    /// What was done ([`crate::detect::Action::label`]).
    pub action: String,
    /// The reporters' testimonies, JSON.
    pub evidence: String,
    /// The alert's state: "none", "pending", "sent", "failed: …".
    pub alert: String,
}

/// Schema migrations, applied in order; `PRAGMA user_version` records progress.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE users (
    id INTEGER PRIMARY KEY,
    login TEXT NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL
);
CREATE TABLE auth_keys (
    id INTEGER PRIMARY KEY,
    key_id TEXT NOT NULL UNIQUE,
    secret_hash BLOB NOT NULL,
    user_login TEXT REFERENCES users(login) ON DELETE CASCADE,
    tags TEXT NOT NULL,
    reusable INTEGER NOT NULL,
    ephemeral INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    used_count INTEGER NOT NULL DEFAULT 0,
    revoked INTEGER NOT NULL DEFAULT 0,
    created_by TEXT NOT NULL
);
CREATE TABLE nodes (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    hostname TEXT NOT NULL,
    machine_key BLOB NOT NULL UNIQUE,
    wg_key BLOB NOT NULL UNIQUE,
    ipv4 TEXT NOT NULL UNIQUE,
    ipv6 TEXT NOT NULL UNIQUE,
    user_login TEXT REFERENCES users(login) ON DELETE CASCADE,
    tags TEXT NOT NULL,
    ephemeral INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    expiry_ms INTEGER NOT NULL,
    endpoints TEXT NOT NULL DEFAULT '',
    auth_key_id TEXT NOT NULL
);
CREATE TABLE api_keys (
    id INTEGER PRIMARY KEY,
    key_id TEXT NOT NULL UNIQUE,
    secret_hash BLOB NOT NULL,
    description TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE policies (
    version INTEGER PRIMARY KEY,
    file_name TEXT NOT NULL,
    text TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY,
    time_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL
);
"#,
    r#"
CREATE INDEX audit_time ON audit (time_ms);
CREATE INDEX audit_action_id ON audit (action, id);
"#,
    r#"
ALTER TABLE nodes ADD COLUMN key_revoked INTEGER NOT NULL DEFAULT 0;
"#,
    // One table for auth keys and API keys (one lifecycle: `secrets`). Ids
    // stay counted per kind, so every id and key id is kept; API keys learn
    // who created them from the audit log, where it still has the row.
    r#"
CREATE TABLE secret_keys (
    kind TEXT NOT NULL CHECK (kind IN ('auth', 'api')),
    id INTEGER NOT NULL,
    key_id TEXT NOT NULL,
    secret_hash BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0,
    created_by TEXT NOT NULL,
    user_login TEXT REFERENCES users(login) ON DELETE CASCADE,
    tags TEXT NOT NULL DEFAULT '',
    reusable INTEGER NOT NULL DEFAULT 0,
    ephemeral INTEGER NOT NULL DEFAULT 0,
    used_count INTEGER NOT NULL DEFAULT 0,
    description TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (kind, id),
    UNIQUE (kind, key_id)
);
INSERT INTO secret_keys (kind, id, key_id, secret_hash, created_ms, expires_ms, revoked,
                         created_by, user_login, tags, reusable, ephemeral, used_count)
    SELECT 'auth', id, key_id, secret_hash, created_ms, expires_ms, revoked,
           created_by, user_login, tags, reusable, ephemeral, used_count
    FROM auth_keys;
INSERT INTO secret_keys (kind, id, key_id, secret_hash, created_ms, expires_ms, revoked,
                         created_by, description)
    SELECT 'api', id, key_id, secret_hash, created_ms, expires_ms, revoked,
           COALESCE((SELECT actor FROM audit
                     WHERE action = 'apikey.create' AND target = api_keys.key_id
                     ORDER BY id LIMIT 1), ''),
           description
    FROM api_keys;
DROP TABLE auth_keys;
DROP TABLE api_keys;
"#,
    // Subnet routes and exit nodes (issue 12): comma-separated canonical
    // prefixes, as advertised by the node and as approved.
    r#"
ALTER TABLE nodes ADD COLUMN routes_advertised TEXT NOT NULL DEFAULT '';
ALTER TABLE nodes ADD COLUMN routes_approved TEXT NOT NULL DEFAULT '';
ALTER TABLE nodes ADD COLUMN exit_advertised INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN exit_approved INTEGER NOT NULL DEFAULT 0;
"#,
    // Identity (issue 13): roles for users and API keys (API keys issued
    // before were full admins, and stay so), built-in credentials, per-user
    // key lifetime, SSO identities linked by (issuer, subject).
    r#"
ALTER TABLE users ADD COLUMN role TEXT NOT NULL DEFAULT 'member';
ALTER TABLE users ADD COLUMN key_expiry_ms INTEGER;
ALTER TABLE users ADD COLUMN password_hash TEXT;
ALTER TABLE users ADD COLUMN totp_secret BLOB;
ALTER TABLE users ADD COLUMN totp_last_step INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN recovery_codes TEXT NOT NULL DEFAULT '';
ALTER TABLE secret_keys ADD COLUMN role TEXT NOT NULL DEFAULT 'admin';
CREATE TABLE identities (
    issuer TEXT NOT NULL,
    subject TEXT NOT NULL,
    user_login TEXT NOT NULL REFERENCES users(login) ON DELETE CASCADE,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (issuer, subject)
);
"#,
    // Device posture (issue 14): the node's last report (a JSON object of
    // node:* attributes) and when it came, and the admin-set custom:*
    // attributes (a JSON object).
    r#"
ALTER TABLE nodes ADD COLUMN posture_reported TEXT NOT NULL DEFAULT '{}';
ALTER TABLE nodes ADD COLUMN posture_reported_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN posture_custom TEXT NOT NULL DEFAULT '{}';
"#,
    // Tamper-evident audit (issue 15): each row's prev_hash and hash (see
    // `auditchain`; existing rows are chained in id order right after this
    // migration, by `chain_existing_audit`), the chain head as last written,
    // and the signed checkpoints: heads, and gaps left by pruning.
    r#"
ALTER TABLE audit ADD COLUMN prev_hash BLOB;
ALTER TABLE audit ADD COLUMN hash BLOB;
CREATE TABLE audit_head (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    id INTEGER NOT NULL,
    hash BLOB NOT NULL
);
CREATE TABLE audit_checkpoints (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('head', 'gap')),
    before_id INTEGER,
    before_hash BLOB,
    head_id INTEGER NOT NULL,
    head_hash BLOB NOT NULL,
    time_ms INTEGER NOT NULL,
    signature BLOB NOT NULL
);
CREATE INDEX audit_checkpoints_kind_head ON audit_checkpoints (kind, head_id);
"#,
    // Flow logs (issue 15): allowed and denied flows as nodes report them,
    // kept for a retention period and up to a row cap (not in the audit
    // chain: they are node-reported telemetry, pruned freely).
    r#"
CREATE TABLE flows (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time_ms INTEGER NOT NULL,
    node_id INTEGER NOT NULL,
    node_name TEXT NOT NULL,
    src TEXT NOT NULL,
    dst TEXT NOT NULL,
    proto INTEGER NOT NULL,
    dst_port INTEGER NOT NULL,
    allowed INTEGER NOT NULL,
    rule_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    packets INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    reply_packets INTEGER NOT NULL,
    reply_bytes INTEGER NOT NULL,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL
);
CREATE INDEX flows_time ON flows (time_ms);
CREATE INDEX flows_node ON flows (node_id, id);
CREATE INDEX flows_node_name ON flows (node_name, id);
"#,
    // Respond (issue 16): quarantined nodes, and what the detectors found.
    r#"
ALTER TABLE nodes ADD COLUMN quarantined_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN quarantine_reason TEXT NOT NULL DEFAULT '';
CREATE TABLE detections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time_ms INTEGER NOT NULL,
    node_id INTEGER NOT NULL,
    node_name TEXT NOT NULL,
    detectors TEXT NOT NULL,
    action TEXT NOT NULL,
    evidence TEXT NOT NULL,
    alert TEXT NOT NULL
);
CREATE INDEX detections_node ON detections (node_id, id);
"#,
];

/// The migration (index into [`MIGRATIONS`]) that adds the audit chain.
const AUDIT_CHAIN_MIGRATION: usize = 7;

/// Posture attributes as a JSON object (strings, integers, booleans).
fn attrs_json(attrs: &BTreeMap<String, AttrValue>) -> String {
    let map: serde_json::Map<String, serde_json::Value> = attrs
        .iter()
        .map(|(k, v)| {
            let v = match v {
                AttrValue::Str(s) => serde_json::Value::from(s.as_str()),
                AttrValue::Int(n) => serde_json::Value::from(*n),
                AttrValue::Bool(b) => serde_json::Value::from(*b),
            };
            (k.clone(), v)
        })
        .collect();
    serde_json::Value::Object(map).to_string()
}

/// The inverse of [`attrs_json`].
fn json_attrs(r: &rusqlite::Row<'_>, col: usize) -> rusqlite::Result<BTreeMap<String, AttrValue>> {
    let text: String = r.get(col)?;
    let Ok(serde_json::Value::Object(map)) = serde_json::from_str(&text) else {
        return Err(corrupt(col, "posture attributes"));
    };
    map.into_iter()
        .map(|(k, v)| {
            let v = match v {
                serde_json::Value::String(s) => AttrValue::Str(s),
                serde_json::Value::Bool(b) => AttrValue::Bool(b),
                serde_json::Value::Number(n) => {
                    AttrValue::Int(n.as_i64().ok_or_else(|| corrupt(col, "posture number"))?)
                }
                _ => return Err(corrupt(col, "posture attribute")),
            };
            Ok((k, v))
        })
        .collect()
}

/// The embedded SQLite store: one connection, WAL, `synchronous=FULL`.
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

fn join_list(v: &[String]) -> String {
    v.join(",")
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .filter(|x| !x.is_empty())
        .map(str::to_string)
        .collect()
}

/// A stored value that does not parse: corruption or a newer schema.
fn corrupt(col: usize, what: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        col,
        rusqlite::types::Type::Text,
        format!("corrupt stored {what}").into(),
    )
}

fn key32(r: &rusqlite::Row<'_>, col: usize) -> rusqlite::Result<[u8; 32]> {
    let v: Vec<u8> = r.get(col)?;
    v.try_into().map_err(|_| corrupt(col, "32-byte key"))
}

fn parsed<T: std::str::FromStr>(r: &rusqlite::Row<'_>, col: usize) -> rusqlite::Result<T> {
    let s: String = r.get(col)?;
    s.parse().map_err(|_| corrupt(col, "value"))
}

fn list(r: &rusqlite::Row<'_>, col: usize) -> rusqlite::Result<Vec<String>> {
    Ok(split_list(&r.get::<_, String>(col)?))
}

fn conflict(e: rusqlite::Error, what: &str) -> StoreError {
    match e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            StoreError::Conflict(what.to_string())
        }
        other => StoreError::Db(other),
    }
}

const NODE_COLS: &str = "id, name, hostname, machine_key, wg_key, ipv4, ipv6, user_login, tags, \
                         ephemeral, created_ms, last_seen_ms, expiry_ms, endpoints, key_revoked, \
                         routes_advertised, routes_approved, exit_advertised, exit_approved, \
                         posture_reported, posture_reported_ms, posture_custom, \
                         quarantined_ms, quarantine_reason";
const KEY_COLS: &str = "kind, id, key_id, secret_hash, created_ms, expires_ms, revoked, \
                        created_by, user_login, tags, reusable, ephemeral, used_count, \
                        description, role";

fn node_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<NodeRow> {
    Ok(NodeRow {
        id: r.get(0)?,
        name: r.get(1)?,
        hostname: r.get(2)?,
        machine_key: key32(r, 3)?,
        wg_key: key32(r, 4)?,
        ipv4: parsed(r, 5)?,
        ipv6: parsed(r, 6)?,
        user: r.get(7)?,
        tags: list(r, 8)?,
        ephemeral: r.get(9)?,
        created_ms: r.get(10)?,
        last_seen_ms: r.get(11)?,
        expiry_ms: r.get(12)?,
        endpoints: list(r, 13)?,
        key_revoked: r.get(14)?,
        routes: NodeRoutes {
            advertised: prefixes(r, 15)?,
            approved: prefixes(r, 16)?,
            exit_advertised: r.get(17)?,
            exit_approved: r.get(18)?,
        },
        posture: NodePosture {
            reported: json_attrs(r, 19)?,
            reported_ms: r.get(20)?,
            custom: json_attrs(r, 21)?,
        },
        quarantine: match r.get::<_, i64>(22)? {
            0 => None,
            since_ms => Some(Quarantine {
                since_ms,
                reason: r.get(23)?,
            }),
        },
    })
}

/// A comma-separated list of prefixes (a `routes_*` column).
fn prefixes(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Vec<ipnet::IpNet>> {
    list(r, i)?
        .iter()
        .map(|p| p.parse().map_err(|_| corrupt(i, "route prefix")))
        .collect()
}

/// A `secret_keys` row ([`KEY_COLS`]): the kind decides which of the
/// kind-specific columns make up the detail.
fn key_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SecretRecord> {
    let kind: String = r.get(0)?;
    let detail = match SecretKind::from_stored(&kind).ok_or_else(|| corrupt(0, "key kind"))? {
        SecretKind::AuthKey => KeyDetail::Auth {
            user: r.get(8)?,
            tags: list(r, 9)?,
            reusable: r.get(10)?,
            ephemeral: r.get(11)?,
            used_count: r.get(12)?,
        },
        SecretKind::ApiKey => KeyDetail::Api {
            description: r.get(13)?,
            role: parsed(r, 14)?,
        },
    };
    Ok(SecretRecord {
        id: r.get(1)?,
        key_id: r.get(2)?,
        secret_hash: key32(r, 3)?,
        created_ms: r.get(4)?,
        expires_ms: r.get(5)?,
        revoked: r.get(6)?,
        created_by: r.get(7)?,
        detail,
    })
}

/// The auth key stored under `key_id`, read inside `tx`.
fn auth_key_in(tx: &rusqlite::Transaction<'_>, key_id: &str) -> Result<Option<SecretRecord>> {
    Ok(tx
        .query_row(
            &format!("SELECT {KEY_COLS} FROM secret_keys WHERE kind = 'auth' AND key_id = ?1"),
            [key_id],
            key_row,
        )
        .optional()?)
}

/// Inserts an enrolled node inside `tx`; `auth_key_id` records how it
/// joined (an auth key's id, or `login`).
fn insert_node(
    tx: &rusqlite::Transaction<'_>,
    n: NewNode,
    user: Option<String>,
    tags: Vec<String>,
    ephemeral: bool,
    auth_key_id: &str,
) -> Result<NodeRow> {
    tx.execute(
        "INSERT INTO nodes (name, hostname, machine_key, wg_key, ipv4, ipv6, user_login, tags,
                            ephemeral, created_ms, last_seen_ms, expiry_ms, auth_key_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10, ?11, ?12)",
        params![
            n.name,
            n.hostname,
            n.machine_key.as_slice(),
            n.wg_key.as_slice(),
            n.ipv4.to_string(),
            n.ipv6.to_string(),
            user,
            join_list(&tags),
            ephemeral,
            n.created_ms,
            n.expiry_ms,
            auth_key_id
        ],
    )
    .map_err(|e| {
        conflict(
            e,
            "node with this machine key, WireGuard key, name or address",
        )
    })?;
    Ok(NodeRow {
        id: tx.last_insert_rowid() as u64,
        name: n.name,
        hostname: n.hostname,
        machine_key: n.machine_key,
        wg_key: n.wg_key,
        ipv4: n.ipv4,
        ipv6: n.ipv6,
        user,
        tags,
        ephemeral,
        created_ms: n.created_ms,
        last_seen_ms: n.created_ms,
        expiry_ms: n.expiry_ms,
        endpoints: Vec::new(),
        key_revoked: false,
        routes: NodeRoutes::default(),
        posture: NodePosture::default(),
        quarantine: None,
    })
}

/// The chain head as last written: (0, [`GENESIS`]) before the first row.
fn audit_head_in(c: &Connection) -> Result<(u64, Hash)> {
    let row: Option<(u64, Vec<u8>)> = c
        .query_row("SELECT id, hash FROM audit_head WHERE one = 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    match row {
        None => Ok((0, GENESIS)),
        Some((id, hash)) => Ok((
            id,
            hash.try_into()
                .map_err(|_| StoreError::Db(corrupt(1, "audit head hash")))?,
        )),
    }
}

fn set_audit_head(c: &Connection, id: u64, hash: &Hash) -> Result<()> {
    c.execute(
        "INSERT INTO audit_head (one, id, hash) VALUES (1, ?1, ?2)
         ON CONFLICT(one) DO UPDATE SET id = excluded.id, hash = excluded.hash",
        params![id, hash.as_slice()],
    )?;
    Ok(())
}

/// Appends `rows` to the chain inside a write transaction: each gets the
/// next id after the head (ids are never reused, even after the newest rows
/// were pruned) and is chained to the row before.
fn append_audit(tx: &Connection, rows: &[AuditEntry]) -> Result<()> {
    let (head_id, mut prev) = audit_head_in(tx)?;
    // Rows written behind the controller's back keep their ids (verification
    // names them); new rows go after them.
    let max: Option<u64> = tx.query_row("SELECT MAX(id) FROM audit", [], |r| r.get(0))?;
    let mut id = head_id.max(max.unwrap_or(0));
    let mut st = tx.prepare_cached(
        "INSERT INTO audit (id, time_ms, actor, action, target, detail, prev_hash, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?;
    for r in rows {
        id += 1;
        let hash = RowFields {
            id,
            time_ms: r.time_ms,
            actor: &r.actor,
            action: &r.action,
            target: &r.target,
            detail: &r.detail,
        }
        .hash(&prev);
        st.execute(params![
            id,
            r.time_ms,
            r.actor,
            r.action,
            r.target,
            r.detail,
            prev.as_slice(),
            hash.as_slice()
        ])?;
        prev = hash;
    }
    set_audit_head(tx, id, &prev)
}

/// Chains the rows written before the chain existed, in id order (holes
/// left by earlier pruning are linked over: those rows were never covered).
fn chain_existing_audit(tx: &Connection) -> Result<()> {
    let mut rows = Vec::new();
    for_rows(tx, "1", [], &mut |r| {
        rows.push(r.clone());
        true
    })?;
    let mut prev = GENESIS;
    let mut last = 0;
    {
        let mut st = tx.prepare("UPDATE audit SET prev_hash = ?2, hash = ?3 WHERE id = ?1")?;
        for r in &rows {
            let hash = r.fields().hash(&prev);
            st.execute(params![r.id, prev.as_slice(), hash.as_slice()])?;
            prev = hash;
            last = r.id;
        }
    }
    tx.execute(
        "INSERT INTO audit_head (one, id, hash) VALUES (1, ?1, ?2)",
        params![last, prev.as_slice()],
    )?;
    Ok(())
}

const CHAIN_COLS: &str = "id, time_ms, actor, action, target, detail, prev_hash, hash";

/// A stored audit row as the chain sees it. Columns of an unexpected type
/// (written behind the controller's back) do not fail the read: the row
/// comes back with an empty hash, which verification names as altered.
fn chain_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ChainRow> {
    let mut sound = true;
    let mut text = |i: usize| -> rusqlite::Result<String> {
        Ok(match r.get_ref(i)? {
            ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
            _ => {
                sound = false;
                String::new()
            }
        })
    };
    let actor = text(2)?;
    let action = text(3)?;
    let target = text(4)?;
    let detail = text(5)?;
    let blob = |i: usize| -> rusqlite::Result<Vec<u8>> {
        Ok(match r.get_ref(i)? {
            ValueRef::Blob(b) => b.to_vec(),
            _ => Vec::new(),
        })
    };
    let time_ms = match r.get_ref(1)? {
        ValueRef::Integer(t) => t,
        _ => {
            sound = false;
            0
        }
    };
    Ok(ChainRow {
        id: r.get(0)?,
        time_ms,
        actor,
        action,
        target,
        detail,
        prev_hash: blob(6)?,
        hash: if sound { blob(7)? } else { Vec::new() },
    })
}

/// Calls `each` with the audit rows matching `cond`, in id order, until it
/// returns `false`.
fn for_rows<P: rusqlite::Params>(
    c: &Connection,
    cond: &str,
    p: P,
    each: &mut dyn FnMut(&ChainRow) -> bool,
) -> Result<()> {
    let mut st = c.prepare(&format!(
        "SELECT {CHAIN_COLS} FROM audit WHERE {cond} ORDER BY id"
    ))?;
    let mut rows = st.query(p)?;
    while let Some(r) = rows.next()? {
        if !each(&chain_row(r)?) {
            break;
        }
    }
    Ok(())
}

/// A 32-byte hash column; anything else reads as zeros (the checkpoint
/// then fails its signature check, as a forged one would).
fn hash_col(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Hash> {
    Ok(match r.get_ref(i)? {
        ValueRef::Blob(b) => b.try_into().unwrap_or([0; 32]),
        _ => [0; 32],
    })
}

/// The checkpoints matching `cond`, in id order.
fn checkpoints_where<P: rusqlite::Params>(
    c: &Connection,
    cond: &str,
    p: P,
) -> Result<Vec<Checkpoint>> {
    let mut st = c.prepare(&format!(
        "SELECT kind, before_id, before_hash, head_id, head_hash, time_ms, signature
         FROM audit_checkpoints WHERE {cond} ORDER BY id"
    ))?;
    let rows = st.query_map(p, |r| {
        let kind: String = r.get(0)?;
        let head_id: u64 = r.get(3)?;
        let head_hash = hash_col(r, 4)?;
        let mark = if kind == "gap" {
            Mark::Gap {
                before_id: r.get::<_, Option<u64>>(1)?.unwrap_or(0),
                before_hash: hash_col(r, 2)?,
                last_id: head_id,
                last_hash: head_hash,
            }
        } else {
            Mark::Head {
                id: head_id,
                hash: head_hash,
            }
        };
        Ok(Checkpoint {
            mark,
            time_ms: r.get(5)?,
            signature: match r.get_ref(6)? {
                ValueRef::Blob(b) => b.to_vec(),
                _ => Vec::new(),
            },
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

fn insert_checkpoint(c: &Connection, cp: &Checkpoint) -> Result<()> {
    let (kind, before_id, before_hash, head_id, head_hash) = match &cp.mark {
        Mark::Head { id, hash } => ("head", None, None, *id, hash),
        Mark::Gap {
            before_id,
            before_hash,
            last_id,
            last_hash,
        } => (
            "gap",
            Some(*before_id),
            Some(before_hash.as_slice()),
            *last_id,
            last_hash,
        ),
    };
    c.execute(
        "INSERT INTO audit_checkpoints (kind, before_id, before_hash, head_id, head_hash,
                                        time_ms, signature)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            kind,
            before_id,
            before_hash,
            head_id,
            head_hash.as_slice(),
            cp.time_ms,
            cp.signature
        ],
    )?;
    Ok(())
}

/// The newest validly signed head whose row is still there unchanged
/// (verification of new rows starts after it), else the start of the chain.
fn trusted_head(c: &Connection, key: &PublicKey) -> Result<(u64, Hash)> {
    let cps = checkpoints_where(
        c,
        "kind = 'head' AND EXISTS (SELECT 1 FROM audit a
             WHERE a.id = audit_checkpoints.head_id AND a.hash = audit_checkpoints.head_hash)
         AND id IN (SELECT id FROM audit_checkpoints WHERE kind = 'head'
                    ORDER BY head_id DESC LIMIT 16)",
        [],
    )?;
    Ok(cps
        .iter()
        .rev()
        .filter(|c| c.verifies(key))
        .find_map(|c| match c.mark {
            Mark::Head { id, hash } => Some((id, hash)),
            Mark::Gap { .. } => None,
        })
        .unwrap_or((0, GENESIS)))
}

/// The rows around a range about to be pruned: the kept row before it
/// (or the start), the kept row after it (or the end: the recorded head).
struct Span {
    start: (u64, Hash),
    after: Option<u64>,
    head: (u64, Hash),
}

impl Span {
    /// The span around ids `lo..=hi`.
    fn around(c: &Connection, lo: u64, hi: u64) -> Result<Self> {
        let start: Option<(u64, Vec<u8>)> = c
            .query_row(
                "SELECT id, hash FROM audit WHERE id < ?1 ORDER BY id DESC LIMIT 1",
                [lo],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get::<_, Option<Vec<u8>>>(1)?.unwrap_or_default(),
                    ))
                },
            )
            .optional()?;
        let start = match start {
            None => (0, GENESIS),
            Some((id, hash)) => match Hash::try_from(hash) {
                Ok(h) => (id, h),
                Err(_) => return Err(StoreError::Chain(ChainError::Altered { id })),
            },
        };
        let after = c.query_row("SELECT MIN(id) FROM audit WHERE id > ?1", [hi], |r| {
            r.get(0)
        })?;
        Ok(Self {
            start,
            after,
            head: audit_head_in(c)?,
        })
    }

    /// The end of the span: the kept row after it, or past the head.
    fn end(&self) -> u64 {
        self.after.unwrap_or(self.head.0.saturating_add(1))
    }

    /// Verifies the rows of the span (the kept row after it included).
    fn verify(&self, c: &Connection, key: &PublicKey) -> Result<()> {
        let (from, end) = (self.start.0, self.end());
        let cps = checkpoints_where(c, "head_id >= ?1 AND head_id <= ?2", params![from, end])?;
        let recorded = self.after.is_none().then_some(self.head);
        let mut v = Verifier::new(key, &cps, recorded).starting_after(from, self.start.1);
        for_rows(c, "id > ?1 AND id <= ?2", params![from, end], &mut |r| {
            v.push(r);
            !v.is_decided()
        })?;
        let verdict = if self.after.is_some() {
            v.segment().map(|_| ())
        } else {
            v.finish().map(|_| ())
        };
        verdict.map_err(StoreError::Chain)
    }

    /// After the deletion: one signed gap checkpoint per run of deleted rows
    /// in the span (replacing those the span had), and signed heads of
    /// deleted rows dropped (except the newest, which marks the chain's end).
    fn reseal(&self, c: &Connection, now: UnixMs, key: &SigningKey) -> Result<()> {
        let (from, end) = (self.start.0, self.end());
        let mut links: Vec<(u64, Vec<u8>, Vec<u8>)> = Vec::new();
        {
            let mut st = c.prepare(
                "SELECT id, prev_hash, hash FROM audit WHERE id > ?1 AND id < ?2 ORDER BY id",
            )?;
            let rows = st.query_map(params![from, end], |r| {
                Ok((
                    r.get(0)?,
                    r.get::<_, Option<Vec<u8>>>(1)?.unwrap_or_default(),
                    r.get::<_, Option<Vec<u8>>>(2)?.unwrap_or_default(),
                ))
            })?;
            for row in rows {
                links.push(row?);
            }
        }
        let last_link = match self.after {
            Some(id) => c.query_row("SELECT prev_hash FROM audit WHERE id = ?1", [id], |r| {
                r.get::<_, Option<Vec<u8>>>(0)
                    .map(Option::unwrap_or_default)
            })?,
            None => self.head.1.to_vec(),
        };
        links.push((end, last_link, Vec::new()));
        c.execute(
            "DELETE FROM audit_checkpoints WHERE kind = 'gap' AND head_id >= ?1 AND head_id < ?2",
            params![from, end],
        )?;
        let (mut before_id, mut before_hash) = self.start;
        for (id, prev, hash) in links {
            if prev[..] != before_hash[..] {
                let last_hash = Hash::try_from(&prev[..])
                    .map_err(|_| StoreError::Chain(ChainError::Altered { id }))?;
                let mark = Mark::Gap {
                    before_id,
                    before_hash,
                    last_id: id - 1,
                    last_hash,
                };
                insert_checkpoint(c, &Checkpoint::signed(mark, now, &|m| key.sign(m)))?;
            }
            if id == end {
                break;
            }
            before_id = id;
            before_hash = Hash::try_from(&hash[..])
                .map_err(|_| StoreError::Chain(ChainError::Altered { id }))?;
        }
        c.execute(
            "DELETE FROM audit_checkpoints
             WHERE kind = 'head' AND head_id > ?1 AND head_id < ?2
               AND NOT EXISTS (SELECT 1 FROM audit WHERE audit.id = audit_checkpoints.head_id)
               AND head_id < (SELECT MAX(head_id) FROM audit_checkpoints WHERE kind = 'head')",
            params![from, end],
        )?;
        Ok(())
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and applies migrations.
    ///
    /// # Errors
    /// [`StoreError::Db`] if the file cannot be opened or migrated.
    ///
    /// The database and its `-wal`/`-shm` files are made 0600 whatever the
    /// umask: SQLite creates the latter with the database file's mode, so
    /// the file is created 0600 before SQLite opens it.
    pub fn open(path: &Path) -> Result<Self> {
        private_file(path)?;
        for suffix in ["-wal", "-shm", "-journal"] {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            let p = std::path::PathBuf::from(p);
            if p.exists() {
                private_file(&p)?;
            }
        }
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    /// Opens an existing database read-only, without migrating (for
    /// offline reads such as `audit verify`; safe while the controller runs,
    /// which keeps writing in WAL mode).
    ///
    /// # Errors
    /// [`StoreError::Db`] if it cannot be opened; [`StoreError::Schema`] if
    /// it is not at this binary's schema.
    pub fn open_read_only(path: &Path) -> Result<Self> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version != MIGRATIONS.len() {
            return Err(StoreError::Schema(format!(
                "{} is at version {version}, this binary reads version {} (run `serve` once to migrate)",
                path.display(),
                MIGRATIONS.len()
            )));
        }
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    /// An in-memory database, for tests.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn in_memory() -> Result<Self> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Self> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version) {
            tx.execute_batch(m)?;
            if i == AUDIT_CHAIN_MIGRATION {
                chain_existing_audit(&tx)?;
            }
            tx.pragma_update(None, "user_version", i + 1)?;
        }
        tx.commit()?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    /// `UPDATE users SET {set} WHERE login = ?1`; `NotFound` if no such user.
    fn update_user(&self, login: &str, set: &str, p: &[&dyn rusqlite::ToSql]) -> Result<()> {
        let n = self
            .conn()
            .execute(&format!("UPDATE users SET {set} WHERE login = ?1"), p)?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("user {login}")));
        }
        Ok(())
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite itself consistent (every
        // write is a transaction), so a poisoned lock is safe to reuse.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Creates `path` if missing, and makes it 0600 either way.
fn private_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |e: std::io::Error| {
        StoreError::Db(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
            Some(format!("{}: {e}", path.display())),
        ))
    };
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)
}

impl Store for SqliteStore {
    fn meta(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.conn().execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    fn create_user(&self, login: &str, role: Role, now: UnixMs) -> Result<UserRow> {
        let c = self.conn();
        c.execute(
            "INSERT INTO users (login, created_ms, role) VALUES (?1, ?2, ?3)",
            params![login, now, role.as_str()],
        )
        .map_err(|e| conflict(e, &format!("user {login}")))?;
        Ok(UserRow {
            id: c.last_insert_rowid() as u64,
            login: login.to_string(),
            created_ms: now,
            role,
            key_expiry_ms: None,
            has_password: false,
            has_totp: false,
        })
    }

    fn users(&self) -> Result<Vec<UserRow>> {
        let c = self.conn();
        let mut st = c.prepare(
            "SELECT id, login, created_ms, role, key_expiry_ms,
                    password_hash IS NOT NULL, totp_secret IS NOT NULL
             FROM users ORDER BY login",
        )?;
        let rows = st.query_map([], |r| {
            Ok(UserRow {
                id: r.get(0)?,
                login: r.get(1)?,
                created_ms: r.get(2)?,
                role: parsed(r, 3)?,
                key_expiry_ms: r.get(4)?,
                has_password: r.get(5)?,
                has_totp: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn set_user_role(&self, login: &str, role: Role) -> Result<()> {
        self.update_user(login, "role = ?2", params![login, role.as_str()])
    }

    fn set_user_key_expiry(&self, login: &str, ms: Option<UnixMs>) -> Result<()> {
        self.update_user(login, "key_expiry_ms = ?2", params![login, ms])
    }

    fn credentials(&self, login: &str) -> Result<Option<Credentials>> {
        let c = self.conn();
        Ok(c.query_row(
            "SELECT login, role, password_hash, totp_secret, totp_last_step, recovery_codes
             FROM users WHERE login = ?1",
            [login],
            |r| {
                Ok(Credentials {
                    login: r.get(0)?,
                    role: parsed(r, 1)?,
                    password_hash: r.get(2)?,
                    totp_secret: r.get(3)?,
                    totp_last_step: r.get(4)?,
                    recovery: list(r, 5)?,
                })
            },
        )
        .optional()?)
    }

    fn set_password(&self, login: &str, phc: Option<&str>) -> Result<()> {
        self.update_user(login, "password_hash = ?2", params![login, phc])
    }

    fn set_totp(
        &self,
        login: &str,
        secret: Option<&[u8]>,
        recovery: &[String],
        last_step: i64,
    ) -> Result<()> {
        self.update_user(
            login,
            "totp_secret = ?2, recovery_codes = ?3, totp_last_step = ?4",
            params![login, secret, join_list(recovery), last_step],
        )
    }

    fn enroll_totp(
        &self,
        login: &str,
        secret: &[u8],
        recovery: &[String],
        last_step: i64,
    ) -> Result<bool> {
        let n = self.conn().execute(
            "UPDATE users SET totp_secret = ?2, recovery_codes = ?3, totp_last_step = ?4
             WHERE login = ?1 AND totp_secret IS NULL",
            params![login, secret, join_list(recovery), last_step],
        )?;
        Ok(n == 1)
    }

    fn use_totp_step(&self, login: &str, step: i64) -> Result<bool> {
        let n = self.conn().execute(
            "UPDATE users SET totp_last_step = ?2 WHERE login = ?1 AND totp_last_step < ?2",
            params![login, step],
        )?;
        Ok(n == 1)
    }

    fn use_recovery_code(&self, login: &str, hash: &str) -> Result<bool> {
        let mut c = self.conn();
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let codes: Option<String> = tx
            .query_row(
                "SELECT recovery_codes FROM users WHERE login = ?1",
                [login],
                |r| r.get(0),
            )
            .optional()?;
        let mut codes = split_list(&codes.unwrap_or_default());
        let before = codes.len();
        codes.retain(|h| h != hash);
        if codes.len() == before {
            return Ok(false);
        }
        tx.execute(
            "UPDATE users SET recovery_codes = ?2 WHERE login = ?1",
            params![login, join_list(&codes)],
        )?;
        tx.commit()?;
        Ok(true)
    }

    fn identity_login(&self, issuer: &str, subject: &str) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT user_login FROM identities WHERE issuer = ?1 AND subject = ?2",
                [issuer, subject],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn identities(&self, login: &str) -> Result<Vec<(String, String)>> {
        let c = self.conn();
        let mut st = c.prepare(
            "SELECT issuer, subject FROM identities WHERE user_login = ?1 ORDER BY issuer, subject",
        )?;
        let rows = st.query_map([login], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn unlink_identities(&self, login: &str) -> Result<usize> {
        Ok(self
            .conn()
            .execute("DELETE FROM identities WHERE user_login = ?1", [login])?)
    }

    fn link_identity(&self, issuer: &str, subject: &str, login: &str, now: UnixMs) -> Result<()> {
        self.conn()
            .execute(
                "INSERT INTO identities (issuer, subject, user_login, created_ms)
                 VALUES (?1, ?2, ?3, ?4)",
                params![issuer, subject, login, now],
            )
            .map_err(|e| match e {
                rusqlite::Error::SqliteFailure(f, _)
                    if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY =>
                {
                    StoreError::NotFound(format!("user {login}"))
                }
                e => conflict(e, "SSO identity"),
            })?;
        Ok(())
    }

    fn delete_user(&self, login: &str) -> Result<Vec<u64>> {
        let mut c = self.conn();
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let ids: Vec<u64> = {
            let mut st = tx.prepare("SELECT id FROM nodes WHERE user_login = ?1 ORDER BY id")?;
            let rows = st.query_map([login], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        tx.execute("DELETE FROM nodes WHERE user_login = ?1", [login])?;
        // Only auth keys have an owner.
        tx.execute("DELETE FROM secret_keys WHERE user_login = ?1", [login])?;
        let n = tx.execute("DELETE FROM users WHERE login = ?1", [login])?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("user {login}")));
        }
        tx.commit()?;
        Ok(ids)
    }

    fn create_key(&self, k: &SecretRecord) -> Result<SecretRecord> {
        let kind = k.kind();
        let no_tags = Vec::new();
        let (user, tags, reusable, ephemeral, used_count, description, role) = match &k.detail {
            KeyDetail::Auth {
                user,
                tags,
                reusable,
                ephemeral,
                used_count,
            } => (
                user.as_deref(),
                tags,
                *reusable,
                *ephemeral,
                *used_count,
                "",
                Role::Member,
            ),
            KeyDetail::Api { description, role } => {
                (None, &no_tags, false, false, 0, description.as_str(), *role)
            }
        };
        let id = self
            .conn()
            .query_row(
                "INSERT INTO secret_keys (kind, id, key_id, secret_hash, created_ms, expires_ms,
                                          revoked, created_by, user_login, tags, reusable,
                                          ephemeral, used_count, description, role)
                 VALUES (?1, (SELECT COALESCE(MAX(id), 0) + 1 FROM secret_keys WHERE kind = ?1),
                         ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
                 RETURNING id",
                params![
                    kind.as_str(),
                    k.key_id,
                    k.secret_hash.as_slice(),
                    k.created_ms,
                    k.expires_ms,
                    k.revoked,
                    k.created_by,
                    user,
                    join_list(tags),
                    reusable,
                    ephemeral,
                    used_count,
                    description,
                    role.as_str()
                ],
                |r| r.get(0),
            )
            .map_err(|e| match e {
                rusqlite::Error::SqliteFailure(f, _)
                    if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY =>
                {
                    StoreError::NotFound(format!("user {}", user.unwrap_or("")))
                }
                e => conflict(e, &format!("{} id", kind.noun())),
            })?;
        Ok(SecretRecord { id, ..k.clone() })
    }

    fn keys(&self, kind: SecretKind) -> Result<Vec<SecretRecord>> {
        let c = self.conn();
        let mut st = c.prepare(&format!(
            "SELECT {KEY_COLS} FROM secret_keys WHERE kind = ?1 ORDER BY id"
        ))?;
        let keys = st.query_map([kind.as_str()], key_row)?;
        Ok(keys.collect::<rusqlite::Result<_>>()?)
    }

    fn find_key(&self, kind: SecretKind, key_id: &str) -> Result<Option<SecretRecord>> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {KEY_COLS} FROM secret_keys WHERE kind = ?1 AND key_id = ?2"),
                params![kind.as_str(), key_id],
                key_row,
            )
            .optional()?)
    }

    fn revoke_key(&self, kind: SecretKind, key_id: &str) -> Result<()> {
        let n = self.conn().execute(
            "UPDATE secret_keys SET revoked = 1 WHERE kind = ?1 AND key_id = ?2",
            params![kind.as_str(), key_id],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("{} {key_id}", kind.noun())));
        }
        Ok(())
    }

    fn enroll(
        &self,
        key_id: &str,
        check: &dyn Fn(Option<&SecretRecord>) -> std::result::Result<(), String>,
        n: NewNode,
    ) -> Result<NodeRow> {
        let mut c = self.conn();
        // IMMEDIATE takes the write lock up front: a second enrollment (in this
        // or another process) waits here and then sees used_count = 1.
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let key = auth_key_in(&tx, key_id)?;
        check(key.as_ref()).map_err(StoreError::KeyRefused)?;
        // Whatever the check says, no key enrolls nothing.
        let Some(SecretRecord {
            id: key_row_id,
            detail:
                KeyDetail::Auth {
                    user,
                    tags,
                    ephemeral,
                    ..
                },
            ..
        }) = key
        else {
            return Err(StoreError::KeyRefused("unknown auth key".into()));
        };
        tx.execute(
            "UPDATE secret_keys SET used_count = used_count + 1 WHERE kind = 'auth' AND id = ?1",
            [key_row_id],
        )?;
        let row = insert_node(&tx, n, user, tags, ephemeral, key_id)?;
        tx.commit()?;
        Ok(row)
    }

    fn consume_key(
        &self,
        key_id: &str,
        check: &dyn Fn(Option<&SecretRecord>) -> std::result::Result<(), String>,
    ) -> Result<()> {
        let mut c = self.conn();
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let key = auth_key_in(&tx, key_id)?;
        check(key.as_ref()).map_err(StoreError::KeyRefused)?;
        let Some(key) = key else {
            return Err(StoreError::KeyRefused("unknown auth key".into()));
        };
        tx.execute(
            "UPDATE secret_keys SET used_count = used_count + 1 WHERE kind = 'auth' AND id = ?1",
            [key.id],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn enroll_for_user(&self, user: &str, n: NewNode) -> Result<NodeRow> {
        let mut c = self.conn();
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let known: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM users WHERE login = ?1)",
            [user],
            |r| r.get(0),
        )?;
        if !known {
            return Err(StoreError::NotFound(format!("user {user}")));
        }
        let row = insert_node(&tx, n, Some(user.to_string()), Vec::new(), false, "login")?;
        tx.commit()?;
        Ok(row)
    }

    fn reauth_node(&self, id: u64, expiry_ms: UnixMs) -> Result<()> {
        let n = self.conn().execute(
            "UPDATE nodes SET expiry_ms = ?2, key_revoked = 0 WHERE id = ?1",
            params![id, expiry_ms],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("node {id}")));
        }
        Ok(())
    }

    fn nodes(&self) -> Result<Vec<NodeRow>> {
        let c = self.conn();
        let mut st = c.prepare(&format!("SELECT {NODE_COLS} FROM nodes ORDER BY id"))?;
        let nodes = st.query_map([], node_row)?;
        Ok(nodes.collect::<rusqlite::Result<_>>()?)
    }

    fn delete_node(&self, id: u64) -> Result<()> {
        let n = self
            .conn()
            .execute("DELETE FROM nodes WHERE id = ?1", [id])?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("node {id}")));
        }
        Ok(())
    }

    fn revoke_node_key(&self, id: u64, at: UnixMs) -> Result<()> {
        self.conn().execute(
            "UPDATE nodes SET expiry_ms = ?2, key_revoked = 1 WHERE id = ?1",
            params![id, at],
        )?;
        Ok(())
    }

    fn rename_node(&self, id: u64, name: &str) -> Result<()> {
        self.conn()
            .execute(
                "UPDATE nodes SET name = ?2 WHERE id = ?1",
                params![id, name],
            )
            .map_err(|e| conflict(e, &format!("node name {name}")))?;
        Ok(())
    }

    fn set_node_seen(&self, id: u64, last_seen_ms: UnixMs) -> Result<()> {
        self.conn().execute(
            "UPDATE nodes SET last_seen_ms = ?2 WHERE id = ?1",
            params![id, last_seen_ms],
        )?;
        Ok(())
    }

    fn set_nodes_seen(&self, seen: &[(u64, UnixMs)]) -> Result<()> {
        let mut c = self.conn();
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut st = tx.prepare("UPDATE nodes SET last_seen_ms = ?2 WHERE id = ?1")?;
            for (id, ms) in seen {
                st.execute(params![id, ms])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn set_node_routes(&self, id: u64, routes: &NodeRoutes) -> Result<()> {
        let text = |v: &[ipnet::IpNet]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        let n = self.conn().execute(
            "UPDATE nodes SET routes_advertised = ?2, routes_approved = ?3,
                              exit_advertised = ?4, exit_approved = ?5 WHERE id = ?1",
            params![
                id,
                join_list(&text(&routes.advertised)),
                join_list(&text(&routes.approved)),
                routes.exit_advertised,
                routes.exit_approved
            ],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("node {id}")));
        }
        Ok(())
    }

    fn set_node_posture(&self, id: u64, posture: &NodePosture) -> Result<()> {
        let n = self.conn().execute(
            "UPDATE nodes SET posture_reported = ?2, posture_reported_ms = ?3,
                              posture_custom = ?4 WHERE id = ?1",
            params![
                id,
                attrs_json(&posture.reported),
                posture.reported_ms,
                attrs_json(&posture.custom)
            ],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("node {id}")));
        }
        Ok(())
    }

    fn set_node_endpoints(&self, id: u64, endpoints: &[String]) -> Result<()> {
        self.conn().execute(
            "UPDATE nodes SET endpoints = ?2 WHERE id = ?1",
            params![id, join_list(endpoints)],
        )?;
        Ok(())
    }

    fn set_policy(&self, file_name: &str, text: &str, now: UnixMs) -> Result<PolicyRow> {
        let c = self.conn();
        c.execute(
            "INSERT INTO policies (file_name, text, created_ms) VALUES (?1, ?2, ?3)",
            params![file_name, text, now],
        )?;
        Ok(PolicyRow {
            version: c.last_insert_rowid() as u64,
            file_name: file_name.to_string(),
            text: text.to_string(),
        })
    }

    fn policy(&self) -> Result<Option<PolicyRow>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT version, file_name, text FROM policies ORDER BY version DESC LIMIT 1",
                [],
                |r| {
                    Ok(PolicyRow {
                        version: r.get(0)?,
                        file_name: r.get(1)?,
                        text: r.get(2)?,
                    })
                },
            )
            .optional()?)
    }

    fn audit(
        &self,
        time_ms: UnixMs,
        actor: &str,
        action: &str,
        target: &str,
        detail: &str,
    ) -> Result<()> {
        self.audit_batch(&[AuditEntry {
            time_ms,
            actor: actor.to_string(),
            action: action.to_string(),
            target: target.to_string(),
            detail: detail.to_string(),
        }])
    }

    fn audit_batch(&self, rows: &[AuditEntry]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut c = self.conn();
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        append_audit(&tx, rows)?;
        tx.commit()?;
        Ok(())
    }

    fn prune_audit(
        &self,
        older_than_ms: UnixMs,
        max_flow_rows: u64,
        now: UnixMs,
        key: &SigningKey,
    ) -> Result<u64> {
        let mut c = self.conn();
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Which rows go, as an id range to reseal.
        let (old_lo, old_hi): (Option<u64>, Option<u64>) = tx.query_row(
            "SELECT MIN(id), MAX(id) FROM audit WHERE time_ms < ?1",
            [older_than_ms],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let flow_hi: Option<u64> = if max_flow_rows > 0 {
            let keep = i64::try_from(max_flow_rows).unwrap_or(i64::MAX);
            tx.query_row(
                "SELECT id FROM audit WHERE action = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2",
                params![FLOW_AUDIT_ACTION, keep],
                |r| r.get(0),
            )
            .optional()?
        } else {
            None
        };
        let flow_lo: Option<u64> = match flow_hi {
            Some(_) => tx.query_row(
                "SELECT MIN(id) FROM audit WHERE action = ?1",
                [FLOW_AUDIT_ACTION],
                |r| r.get(0),
            )?,
            None => None,
        };
        let lo = old_lo.into_iter().chain(flow_lo).min();
        let hi = old_hi.into_iter().chain(flow_hi).max();
        let (Some(lo), Some(hi)) = (lo, hi) else {
            return Ok(0);
        };
        let span = Span::around(&tx, lo, hi)?;
        span.verify(&tx, &key.public())?;
        let mut n = tx.execute("DELETE FROM audit WHERE time_ms < ?1", [older_than_ms])?;
        if let Some(flow_hi) = flow_hi {
            n += tx.execute(
                "DELETE FROM audit WHERE action = ?1 AND id <= ?2",
                params![FLOW_AUDIT_ACTION, flow_hi],
            )?;
        }
        span.reseal(&tx, now, key)?;
        tx.commit()?;
        Ok(n as u64)
    }

    fn sign_audit_head(&self, now: UnixMs, key: &SigningKey) -> Result<Option<u64>> {
        let mut c = self.conn();
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (head_id, head_hash) = audit_head_in(&tx)?;
        let newest: Option<u64> = tx.query_row(
            "SELECT MAX(head_id) FROM audit_checkpoints WHERE kind = 'head'",
            [],
            |r| r.get(0),
        )?;
        if head_id == 0 || newest.is_some_and(|n| n >= head_id) {
            return Ok(None);
        }
        let public = key.public();
        let (from, from_hash) = trusted_head(&tx, &public)?;
        let cps = checkpoints_where(&tx, "head_id > ?1", params![from])?;
        let mut v = Verifier::new(&public, &cps, Some((head_id, head_hash)))
            .starting_after(from, from_hash);
        for_rows(&tx, "id > ?1", params![from], &mut |r| {
            v.push(r);
            !v.is_decided()
        })?;
        v.finish().map_err(StoreError::Chain)?;
        // A head pruned away is vouched for by its gap already.
        let present: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM audit WHERE id = ?1 AND hash = ?2)",
            params![head_id, head_hash.as_slice()],
            |r| r.get(0),
        )?;
        if !present {
            return Ok(None);
        }
        let mark = Mark::Head {
            id: head_id,
            hash: head_hash,
        };
        insert_checkpoint(&tx, &Checkpoint::signed(mark, now, &|m| key.sign(m)))?;
        tx.commit()?;
        Ok(Some(head_id))
    }

    fn verify_audit(&self, key: &PublicKey) -> Result<std::result::Result<Verified, ChainError>> {
        let mut c = self.conn();
        // One read transaction: a snapshot, whatever the controller writes
        // meanwhile.
        let tx = c.transaction_with_behavior(TransactionBehavior::Deferred)?;
        let cps = checkpoints_where(&tx, "1", [])?;
        let head = audit_head_in(&tx)?;
        let mut v = Verifier::new(key, &cps, Some(head));
        for_rows(&tx, "1", [], &mut |r| {
            v.push(r);
            !v.is_decided()
        })?;
        Ok(v.finish())
    }

    fn audit_rows(&self, since_ms: UnixMs, each: &mut dyn FnMut(&ChainRow) -> bool) -> Result<()> {
        let c = self.conn();
        for_rows(&c, "time_ms >= ?1", [since_ms], each)
    }

    fn audit_log(&self, limit: u32) -> Result<Vec<AuditRow>> {
        let c = self.conn();
        let mut st = c.prepare(
            "SELECT id, time_ms, actor, action, target, detail FROM audit
             ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = st.query_map([limit], |r| {
            Ok(AuditRow {
                id: r.get(0)?,
                time_ms: r.get(1)?,
                actor: r.get(2)?,
                action: r.get(3)?,
                target: r.get(4)?,
                detail: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn record_flows(&self, rows: &[FlowRow]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut c = self.conn();
        let tx = c.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO flows (time_ms, node_id, node_name, src, dst, proto, dst_port,
                   allowed, rule_id, reason, packets, bytes, reply_packets, reply_bytes,
                   first_seen_ms, last_seen_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
            )?;
            // SQLite integers are signed: counts beyond i64::MAX saturate.
            let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            for f in rows {
                st.execute(params![
                    f.time_ms,
                    n(f.node_id),
                    f.node_name,
                    f.src,
                    f.dst,
                    f.proto,
                    f.dst_port,
                    f.allowed,
                    f.rule_id,
                    f.reason,
                    n(f.packets),
                    n(f.bytes),
                    n(f.reply_packets),
                    n(f.reply_bytes),
                    f.first_seen_ms,
                    f.last_seen_ms,
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn flows(&self, q: &FlowQuery) -> Result<Vec<FlowRow>> {
        // Only the conditions asked for, so SQLite can use the indices.
        let big = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let mut conds = vec!["time_ms >= ?".to_string()];
        let mut args: Vec<rusqlite::types::Value> = vec![q.since_ms.into()];
        if let Some(n) = q.node_id {
            conds.push("node_id = ?".into());
            args.push(big(n).into());
        }
        if let Some(n) = &q.node_name {
            conds.push("node_name = ?".into());
            args.push(n.clone().into());
        }
        if let Some(b) = q.before_id {
            conds.push("id < ?".into());
            args.push(big(b).into());
        }
        if let Some(a) = q.allowed {
            conds.push("allowed = ?".into());
            args.push(i64::from(a).into());
        }
        args.push(i64::from(q.limit).into());
        let c = self.conn();
        let mut st = c.prepare_cached(&format!(
            "SELECT id, time_ms, node_id, node_name, src, dst, proto, dst_port, allowed,
                    rule_id, reason, packets, bytes, reply_packets, reply_bytes,
                    first_seen_ms, last_seen_ms
             FROM flows WHERE {} ORDER BY id DESC LIMIT ?",
            conds.join(" AND ")
        ))?;
        let n = |r: &rusqlite::Row<'_>, i: usize| -> rusqlite::Result<u64> {
            Ok(u64::try_from(r.get::<_, i64>(i)?).unwrap_or(0))
        };
        let rows = st.query_map(rusqlite::params_from_iter(args), |r| {
            Ok(FlowRow {
                id: n(r, 0)?,
                time_ms: r.get(1)?,
                node_id: n(r, 2)?,
                node_name: r.get(3)?,
                src: r.get(4)?,
                dst: r.get(5)?,
                proto: r.get(6)?,
                dst_port: r.get(7)?,
                allowed: r.get(8)?,
                rule_id: r.get(9)?,
                reason: r.get(10)?,
                packets: n(r, 11)?,
                bytes: n(r, 12)?,
                reply_packets: n(r, 13)?,
                reply_bytes: n(r, 14)?,
                first_seen_ms: r.get(15)?,
                last_seen_ms: r.get(16)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn prune_flows(&self, older_than_ms: UnixMs, max_per_node: u64, max_rows: u64) -> Result<u64> {
        let c = self.conn();
        let mut n = c.execute("DELETE FROM flows WHERE time_ms < ?1", [older_than_ms])?;
        if max_per_node > 0 {
            // One node's reports cannot push out everyone else's.
            let nodes: Vec<i64> = c
                .prepare_cached("SELECT DISTINCT node_id FROM flows")?
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let keep = i64::try_from(max_per_node).unwrap_or(i64::MAX);
            for node in nodes {
                n += c.execute(
                    "DELETE FROM flows WHERE node_id = ?1 AND id <= (SELECT id FROM flows
                       WHERE node_id = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
                    [node, keep],
                )?;
            }
        }
        if max_rows > 0 {
            // The id of the oldest row kept; rows are only ever appended.
            n += c.execute(
                "DELETE FROM flows WHERE id <= (SELECT id FROM flows ORDER BY id DESC
                   LIMIT 1 OFFSET ?1)",
                [i64::try_from(max_rows).unwrap_or(i64::MAX)],
            )?;
        }
        Ok(n as u64)
    }

    fn set_node_quarantine(&self, id: u64, q: Option<&Quarantine>) -> Result<()> {
        let (since, reason) = q.map_or((0, ""), |q| (q.since_ms, q.reason.as_str()));
        let n = self.conn().execute(
            "UPDATE nodes SET quarantined_ms = ?2, quarantine_reason = ?3 WHERE id = ?1",
            params![id, since, reason],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("node {id}")));
        }
        Ok(())
    }

    fn record_detection(&self, d: &DetectionRow) -> Result<u64> {
        let c = self.conn();
        c.execute(
            "INSERT INTO detections (time_ms, node_id, node_name, detectors, action, evidence, alert)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                d.time_ms,
                i64::try_from(d.node_id).unwrap_or(i64::MAX),
                d.node_name,
                d.detectors,
                d.action,
                d.evidence,
                d.alert
            ],
        )?;
        Ok(c.last_insert_rowid() as u64)
    }

    fn set_detection_alert(&self, id: u64, alert: &str) -> Result<()> {
        self.conn().execute(
            "UPDATE detections SET alert = ?2 WHERE id = ?1",
            params![i64::try_from(id).unwrap_or(i64::MAX), alert],
        )?;
        Ok(())
    }

    fn detections(&self, limit: u32, before_id: Option<u64>) -> Result<Vec<DetectionRow>> {
        let before = before_id.map_or(i64::MAX, |b| i64::try_from(b).unwrap_or(i64::MAX));
        let c = self.conn();
        let mut st = c.prepare_cached(
            "SELECT id, time_ms, node_id, node_name, detectors, action, evidence, alert
             FROM detections WHERE id < ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = st.query_map(params![before, limit], |r| {
            Ok(DetectionRow {
                id: r.get::<_, i64>(0)? as u64,
                time_ms: r.get(1)?,
                node_id: r.get::<_, i64>(2)? as u64,
                node_name: r.get(3)?,
                detectors: r.get(4)?,
                action: r.get(5)?,
                evidence: r.get(6)?,
                alert: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn prune_detections(&self, older_than_ms: UnixMs) -> Result<u64> {
        let n = self
            .conn()
            .execute("DELETE FROM detections WHERE time_ms < ?1", [older_than_ms])?;
        Ok(n as u64)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;
    use crate::secrets::{self, Presented};

    const FP: [u8; 32] = [7; 32];

    fn auth_detail(user: Option<&str>, reusable: bool) -> KeyDetail {
        KeyDetail::Auth {
            user: user.map(str::to_string),
            tags: if user.is_some() {
                Vec::new()
            } else {
                vec!["tag:web".into()]
            },
            reusable,
            ephemeral: false,
            used_count: 0,
        }
    }

    /// Issues and stores a key; returns its text and stored record.
    fn stored(s: &dyn Store, detail: KeyDetail, seed: u64) -> (String, SecretRecord) {
        let mut rng = StdRng::seed_from_u64(seed);
        let (text, rec) = secrets::issue(detail, 1_000, "test", FP, 0, &mut rng).unwrap();
        (text, s.create_key(&rec).unwrap())
    }

    /// The check `Mesh::enroll` makes of an auth key, as of time 0.
    fn verifies(text: &str) -> impl Fn(Option<&SecretRecord>) -> std::result::Result<(), String> {
        let presented = Presented::parse(SecretKind::AuthKey, text).unwrap();
        move |k| secrets::verify(&presented, k, 0).map_err(|r| r.message(SecretKind::AuthKey))
    }

    fn used_count(s: &dyn Store, key_id: &str) -> u64 {
        match s
            .find_key(SecretKind::AuthKey, key_id)
            .unwrap()
            .unwrap()
            .detail
        {
            KeyDetail::Auth { used_count, .. } => used_count,
            KeyDetail::Api { .. } => unreachable!("found as an auth key"),
        }
    }

    fn node(i: u8) -> NewNode {
        NewNode {
            name: format!("n{i}"),
            hostname: format!("n{i}"),
            machine_key: [i; 32],
            wg_key: [i; 32],
            ipv4: Ipv4Addr::new(100, 64, 0, i),
            ipv6: format!("fd00::{i}").parse().unwrap(),
            created_ms: 0,
            expiry_ms: 0,
        }
    }

    #[test]
    fn single_use_key_enrolls_exactly_once_under_concurrency() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("db.sqlite")).unwrap());
        let (text, key) = stored(store.as_ref(), auth_detail(None, false), 1);
        let handles: Vec<_> = (1..=8u8)
            .map(|i| {
                let s = store.clone();
                let (text, key_id) = (text.clone(), key.key_id.clone());
                std::thread::spawn(move || s.enroll(&key_id, &verifies(&text), node(i)))
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
        for e in results.into_iter().filter_map(|r| r.err()) {
            assert_eq!(
                e.to_string(),
                "auth key refused: single-use auth key was already used"
            );
        }
        assert_eq!(store.nodes().unwrap().len(), 1);
        assert_eq!(used_count(store.as_ref(), &key.key_id), 1);
    }

    #[test]
    fn reusable_key_enrolls_many_and_check_can_refuse() {
        let s = SqliteStore::in_memory().unwrap();
        let (text, key) = stored(&s, auth_detail(None, true), 2);
        s.enroll(&key.key_id, &verifies(&text), node(1)).unwrap();
        s.enroll(&key.key_id, &verifies(&text), node(2)).unwrap();
        let err = s
            .enroll(
                &key.key_id,
                &|_| Err("auth key has expired".into()),
                node(3),
            )
            .unwrap_err();
        assert!(err.to_string().contains("expired"));
        assert_eq!(s.nodes().unwrap().len(), 2);
        assert_eq!(used_count(&s, &key.key_id), 2);
    }

    #[test]
    fn an_unknown_key_enrolls_nothing_whatever_the_check_says() {
        let s = SqliteStore::in_memory().unwrap();
        let (text, _) = stored(&s, auth_detail(None, true), 3);
        let err = s
            .enroll("000000000000", &verifies(&text), node(1))
            .unwrap_err();
        assert_eq!(err.to_string(), "auth key refused: unknown auth key");
        let err = s.enroll("000000000000", &|_| Ok(()), node(1)).unwrap_err();
        assert!(matches!(err, StoreError::KeyRefused(_)), "{err}");
        // An API key's id is no auth key.
        let (_, api) = stored(
            &s,
            KeyDetail::Api {
                description: "ci".into(),
                role: Role::Admin,
            },
            4,
        );
        assert!(s.enroll(&api.key_id, &|_| Ok(()), node(1)).is_err());
        assert!(s.nodes().unwrap().is_empty());
    }

    #[test]
    fn duplicate_machine_key_is_a_conflict_and_consumes_nothing() {
        let s = SqliteStore::in_memory().unwrap();
        let (text, key) = stored(&s, auth_detail(None, true), 5);
        s.enroll(&key.key_id, &verifies(&text), node(1)).unwrap();
        let mut dup = node(2);
        dup.machine_key = [1; 32];
        assert!(matches!(
            s.enroll(&key.key_id, &verifies(&text), dup),
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(used_count(&s, &key.key_id), 1);
    }

    #[test]
    fn deleting_a_user_deletes_its_nodes_and_keys() {
        let s = SqliteStore::in_memory().unwrap();
        s.create_user("alice@example.com", Role::Member, 0).unwrap();
        let (text, key) = stored(&s, auth_detail(Some("alice@example.com"), true), 6);
        let n = s.enroll(&key.key_id, &verifies(&text), node(1)).unwrap();
        assert_eq!(n.user.as_deref(), Some("alice@example.com"));
        assert_eq!(s.delete_user("alice@example.com").unwrap(), vec![n.id]);
        assert!(s.nodes().unwrap().is_empty());
        assert!(s.users().unwrap().is_empty());
        assert!(s.keys(SecretKind::AuthKey).unwrap().is_empty());
    }

    #[test]
    fn an_auth_key_for_an_unknown_user_is_not_found() {
        let s = SqliteStore::in_memory().unwrap();
        let mut rng = StdRng::seed_from_u64(7);
        let detail = auth_detail(Some("nobody@example.com"), false);
        let (_, rec) = secrets::issue(detail, 1_000, "test", FP, 0, &mut rng).unwrap();
        assert!(matches!(s.create_key(&rec), Err(StoreError::NotFound(_))));
    }

    #[test]
    fn each_kind_is_counted_listed_found_and_revoked_apart() {
        let s = SqliteStore::in_memory().unwrap();
        let api = |d: &str| KeyDetail::Api {
            description: d.into(),
            role: Role::Admin,
        };
        let (_, a1) = stored(&s, auth_detail(None, false), 8);
        let (_, p1) = stored(&s, api("ci"), 9);
        let (_, p2) = stored(&s, api("ops"), 10);
        let (_, a2) = stored(&s, auth_detail(None, true), 11);
        assert_eq!((a1.id, a2.id, p1.id, p2.id), (1, 2, 1, 2));
        assert_eq!(s.keys(SecretKind::AuthKey).unwrap(), vec![a1.clone(), a2]);
        assert_eq!(s.keys(SecretKind::ApiKey).unwrap(), vec![p1.clone(), p2]);
        assert_eq!(
            s.find_key(SecretKind::ApiKey, &p1.key_id).unwrap(),
            Some(p1.clone())
        );
        assert_eq!(s.find_key(SecretKind::ApiKey, &a1.key_id).unwrap(), None);
        assert_eq!(s.find_key(SecretKind::AuthKey, &p1.key_id).unwrap(), None);

        let e = s.revoke_key(SecretKind::ApiKey, &a1.key_id).unwrap_err();
        assert_eq!(e.to_string(), format!("API key {} not found", a1.key_id));
        s.revoke_key(SecretKind::AuthKey, &a1.key_id).unwrap();
        let found = s
            .find_key(SecretKind::AuthKey, &a1.key_id)
            .unwrap()
            .unwrap();
        assert!(found.revoked);
        assert!(
            !s.find_key(SecretKind::ApiKey, &p1.key_id)
                .unwrap()
                .unwrap()
                .revoked
        );

        // A key id is unique within its kind.
        assert!(matches!(s.create_key(&a1), Err(StoreError::Conflict(_))));
    }

    /// The schema before `secret_keys`: the first three migrations, as they
    /// were shipped (migrations are never edited).
    fn old_schema_db(path: &Path) {
        let c = Connection::open(path).unwrap();
        for m in &MIGRATIONS[..3] {
            c.execute_batch(m).unwrap();
        }
        c.pragma_update(None, "user_version", 3).unwrap();
        c.execute_batch(
            "INSERT INTO users (login, created_ms) VALUES ('alice@example.com', 1);
             INSERT INTO auth_keys (id, key_id, secret_hash, user_login, tags, reusable,
                                    ephemeral, created_ms, expires_ms, used_count, revoked,
                                    created_by)
                 VALUES (1, 'aaaaaaaaaaaa', X'0101010101010101010101010101010101010101010101010101010101010101',
                         'alice@example.com', '', 0, 1, 10, 1000, 1, 0, 'local-admin'),
                        (4, 'bbbbbbbbbbbb', X'0202020202020202020202020202020202020202020202020202020202020202',
                         NULL, 'tag:a,tag:b', 1, 0, 20, 2000, 5, 1, 'apikey:cccccccccccc');
             INSERT INTO api_keys (id, key_id, secret_hash, description, created_ms,
                                   expires_ms, revoked)
                 VALUES (1, 'cccccccccccc', X'0303030303030303030303030303030303030303030303030303030303030303',
                         'ci', 30, 3000, 0),
                        (2, 'dddddddddddd', X'0404040404040404040404040404040404040404040404040404040404040404',
                         'old', 40, 4000, 1);
             INSERT INTO audit (time_ms, actor, action, target, detail)
                 VALUES (30, 'local-admin', 'apikey.create', 'cccccccccccc', 'ci'),
                        (31, 'local-admin', 'authkey.create', 'dddddddddddd', '');",
        )
        .unwrap();
    }

    #[test]
    fn migration_moves_both_old_key_tables_into_one_keeping_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        old_schema_db(&path);
        let s = SqliteStore::open(&path).unwrap();

        let auth = s.keys(SecretKind::AuthKey).unwrap();
        assert_eq!(
            auth,
            vec![
                SecretRecord {
                    id: 1,
                    key_id: "aaaaaaaaaaaa".into(),
                    secret_hash: [1; 32],
                    created_ms: 10,
                    expires_ms: 1000,
                    revoked: false,
                    created_by: "local-admin".into(),
                    detail: KeyDetail::Auth {
                        user: Some("alice@example.com".into()),
                        tags: vec![],
                        reusable: false,
                        ephemeral: true,
                        used_count: 1,
                    },
                },
                SecretRecord {
                    id: 4,
                    key_id: "bbbbbbbbbbbb".into(),
                    secret_hash: [2; 32],
                    created_ms: 20,
                    expires_ms: 2000,
                    revoked: true,
                    created_by: "apikey:cccccccccccc".into(),
                    detail: KeyDetail::Auth {
                        user: None,
                        tags: vec!["tag:a".into(), "tag:b".into()],
                        reusable: true,
                        ephemeral: false,
                        used_count: 5,
                    },
                },
            ]
        );
        let api = s.keys(SecretKind::ApiKey).unwrap();
        assert_eq!(
            api,
            vec![
                SecretRecord {
                    id: 1,
                    key_id: "cccccccccccc".into(),
                    secret_hash: [3; 32],
                    created_ms: 30,
                    expires_ms: 3000,
                    revoked: false,
                    created_by: "local-admin".into(),
                    detail: KeyDetail::Api {
                        description: "ci".into(),
                        role: Role::Admin,
                    },
                },
                SecretRecord {
                    id: 2,
                    key_id: "dddddddddddd".into(),
                    secret_hash: [4; 32],
                    created_ms: 40,
                    expires_ms: 4000,
                    revoked: true,
                    // No apikey.create row for it (an authkey row with its id does not count).
                    created_by: String::new(),
                    detail: KeyDetail::Api {
                        description: "old".into(),
                        role: Role::Admin,
                    },
                },
            ]
        );
        let old_tables: i64 = s
            .conn()
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name IN ('auth_keys', 'api_keys')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(old_tables, 0);

        // New keys continue each kind's ids; the owner reference still holds.
        let (_, a) = stored(&s, auth_detail(None, false), 12);
        let (_, p) = stored(
            &s,
            KeyDetail::Api {
                description: "new".into(),
                role: Role::Admin,
            },
            13,
        );
        assert_eq!((a.id, p.id), (5, 3));
        assert_eq!(
            s.delete_user("alice@example.com").unwrap(),
            Vec::<u64>::new()
        );
        assert!(s
            .find_key(SecretKind::AuthKey, "aaaaaaaaaaaa")
            .unwrap()
            .is_none());
        drop(s);

        // Opening again migrates nothing twice.
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.keys(SecretKind::AuthKey).unwrap().len(), 2);
        assert_eq!(s.keys(SecretKind::ApiKey).unwrap().len(), 3);
        let version: usize = s
            .conn()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len());
    }

    #[test]
    fn node_routes_round_trip_and_an_unknown_node_is_not_found() {
        let s = SqliteStore::in_memory().unwrap();
        let (text, key) = stored(&s, auth_detail(None, true), 4);
        let n = s.enroll(&key.key_id, &verifies(&text), node(1)).unwrap();
        assert_eq!(n.routes, NodeRoutes::default());
        let routes = NodeRoutes {
            advertised: vec![
                "198.19.50.0/24".parse().unwrap(),
                "fd00:50::/64".parse().unwrap(),
            ],
            approved: vec!["198.19.50.0/24".parse().unwrap()],
            exit_advertised: true,
            exit_approved: false,
        };
        s.set_node_routes(n.id, &routes).unwrap();
        let back = s.nodes().unwrap().remove(0);
        assert_eq!(back.routes, routes);
        assert_eq!(
            back.routes.active(),
            vec!["198.19.50.0/24".parse().unwrap()]
        );
        assert!(!back.routes.exit_node());
        assert!(matches!(
            s.set_node_routes(n.id + 100, &routes),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn quarantines_and_detections_persist_and_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("ztmesh.db");
        let s = SqliteStore::open(&db).unwrap();
        let (text, key) = stored(&s, auth_detail(None, true), 3);
        let n = s.enroll(&key.key_id, &verifies(&text), node(1)).unwrap();
        assert!(n.quarantine.is_none());
        let q = Quarantine {
            since_ms: 1_000,
            reason: "scan_ports (detection 1)".into(),
        };
        s.set_node_quarantine(n.id, Some(&q)).unwrap();
        let d = |time_ms| DetectionRow {
            id: 0,
            time_ms,
            node_id: n.id,
            node_name: "n1".into(),
            detectors: "[]".into(),
            action: "quarantine".into(),
            evidence: "[]".into(),
            alert: "pending".into(),
        };
        let first = s.record_detection(&d(1_000)).unwrap();
        let second = s.record_detection(&d(2_000)).unwrap();
        s.set_detection_alert(first, "sent").unwrap();
        drop(s);
        let s = SqliteStore::open(&db).unwrap();
        assert_eq!(s.nodes().unwrap()[0].quarantine.as_ref(), Some(&q));
        let all = s.detections(10, None).unwrap();
        assert_eq!(
            all.iter().map(|d| d.id).collect::<Vec<_>>(),
            [second, first]
        );
        assert_eq!(all[1].alert, "sent");
        assert_eq!(s.detections(10, Some(second)).unwrap()[0].id, first);
        assert_eq!(s.prune_detections(1_500).unwrap(), 1);
        assert_eq!(s.detections(10, None).unwrap()[0].id, second);
        s.set_node_quarantine(n.id, None).unwrap();
        assert!(s.nodes().unwrap()[0].quarantine.is_none());
        assert!(matches!(
            s.set_node_quarantine(9_999, None),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn policy_versions_increase() {
        let s = SqliteStore::in_memory().unwrap();
        assert!(s.policy().unwrap().is_none());
        let a = s.set_policy("a.hujson", "{}", 0).unwrap();
        let b = s.set_policy("b.hujson", "{}", 1).unwrap();
        assert!(b.version > a.version);
        assert_eq!(s.policy().unwrap().unwrap().file_name, "b.hujson");
    }

    #[test]
    fn flow_log_is_queried_newest_first_and_pruned_by_age_and_count() {
        let s = SqliteStore::in_memory().unwrap();
        let row = |time_ms, node_id, allowed| FlowRow {
            time_ms,
            node_id,
            node_name: format!("n{node_id}"),
            src: "100.64.0.2".into(),
            dst: "100.64.0.1".into(),
            proto: 6,
            dst_port: 22,
            allowed,
            packets: u64::MAX,
            ..FlowRow::default()
        };
        s.record_flows(&[row(100, 1, true), row(200, 2, false), row(300, 1, false)])
            .unwrap();
        let q = |node_id, since_ms, allowed| FlowQuery {
            node_id,
            since_ms,
            allowed,
            limit: 100,
            ..FlowQuery::default()
        };
        let times =
            |q: FlowQuery| -> Vec<i64> { s.flows(&q).unwrap().iter().map(|f| f.time_ms).collect() };
        assert_eq!(times(q(None, 0, None)), [300, 200, 100]);
        assert_eq!(times(q(Some(1), 0, None)), [300, 100]);
        assert_eq!(times(q(None, 150, None)), [300, 200]);
        assert_eq!(times(q(None, 0, Some(false))), [300, 200]);
        assert_eq!(times(q(Some(1), 0, Some(true))), [100]);
        assert_eq!(
            s.flows(&q(None, 0, Some(true))).unwrap()[0].packets,
            i64::MAX as u64,
            "counts beyond SQLite's integers saturate"
        );
        assert_eq!(
            s.flows(&FlowQuery {
                limit: 1,
                ..q(None, 0, None)
            })
            .unwrap()
            .len(),
            1
        );
        // By the name a node had, and paging back from an id.
        let by_name = FlowQuery {
            node_name: Some("n1".into()),
            ..q(None, 0, None)
        };
        assert_eq!(times(by_name), [300, 100]);
        let newest = s.flows(&q(None, 0, None)).unwrap()[0].id;
        let page = FlowQuery {
            before_id: Some(newest),
            ..q(None, 0, None)
        };
        assert_eq!(times(page), [200, 100]);
        // Age first, then each node's newest, then the newest `max_rows`.
        assert_eq!(s.prune_flows(150, 0, 0).unwrap(), 1);
        s.record_flows(&[row(400, 3, true), row(500, 3, true), row(600, 3, true)])
            .unwrap();
        assert_eq!(s.prune_flows(0, 2, 0).unwrap(), 1, "node 3's oldest");
        assert_eq!(times(q(None, 0, None)), [600, 500, 300, 200]);
        assert_eq!(s.prune_flows(0, 0, 2).unwrap(), 2);
        assert_eq!(times(q(None, 0, None)), [600, 500]);
        assert_eq!(s.prune_flows(0, 2, 2).unwrap(), 0);
        // Ids are never reused, even once the table is empty.
        assert_eq!(s.prune_flows(i64::MAX, 0, 0).unwrap(), 2);
        s.record_flows(&[row(700, 1, true)]).unwrap();
        assert!(s.flows(&q(None, 0, None)).unwrap()[0].id > newest);
    }
}
