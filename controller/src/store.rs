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
use ztmesh_policy::AttrValue;
use ztmesh_proto::handover::TrustedKey;
use ztmesh_proto::keys::{PublicKey, SigningKey};

use crate::auditchain::{
    ChainError, ChainRow, Checkpoint, Hash, Mark, RowFields, Verified, Verifier, GENESIS,
};
pub use crate::model::{NodePosture, NodeRoutes, NodeRow, Quarantine};
use crate::roles::Role;
use crate::secrets::{KeyDetail, SecretKind, SecretRecord};
use crate::UnixMs;

#[cfg(test)]
mod history;
mod postgres;
pub mod sql;
mod sqlite;

/// The schema version this binary migrates a SQLite database to (its
/// `user_version`); older databases are migrated, newer ones refused.
pub const SQLITE_SCHEMA_VERSION: u64 = sqlite::MIGRATIONS.len() as u64;
/// The schema version this binary migrates a PostgreSQL database to
/// (`ztmesh_schema.version`).
pub const POSTGRES_SCHEMA_VERSION: u64 = postgres::MIGRATIONS.len() as u64;

pub use postgres::{is_postgres_url, PgOptions, PgStore, Postgres, Session};
use sql::{args, corrupt, join_list, split_list, Backend, Conn, DbError, DbResult, Row, Value};
pub use sqlite::{FileCheck, Sqlite, SqliteStore};

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened, read or written, or a stored value
    /// does not parse (corruption or a newer schema).
    #[error("database: {0}")]
    Db(String),
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
    /// Another controller holds the database (PostgreSQL): the message
    /// names it.
    #[error("{0}")]
    Busy(String),
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

/// What [`Store::online_backup`] made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Snapshot {
    /// The database was copied into the file; its schema version.
    Sqlite { schema_version: u32 },
    /// PostgreSQL: nothing copied (`pg_dump` backs it up).
    Postgres,
}

/// Everything the controller persists.
pub trait Store: Send + Sync {
    /// Copies the database into the new, empty file `dest`, consistently,
    /// while it keeps serving reads and writes (SQLite's online backup in
    /// one read transaction); PostgreSQL copies nothing.
    ///
    /// # Errors
    /// [`StoreError::Db`] if the copy fails.
    fn online_backup(&self, dest: &std::path::Path) -> Result<Snapshot>;
    fn meta(&self, key: &str) -> Result<Option<String>>;
    fn set_meta(&self, key: &str, value: &str) -> Result<()>;
    /// Stores `value` under `key` unless a value is there already; returns
    /// the stored one (of two controllers starting at once, one wins).
    fn init_meta(&self, key: &str, value: &str) -> Result<String>;

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
    /// Verifies the whole audit chain with the controller's public key (and
    /// the keys it replaced, by the stored hand-overs), in one snapshot; the outer error is a store failure, the inner one the
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

    /// A node's row, as stored now.
    fn node(&self, id: u64) -> Result<Option<NodeRow>>;

    /// The change log's newest entry (0: none yet, or no change log).
    fn change_head(&self) -> Result<u64>;

    /// Up to `limit` change-log entries after `after`, oldest first (none
    /// without a change log).
    fn changes_since(&self, after: u64, limit: u32) -> Result<ChangeBatch>;

    /// Deletes change-log entries older than `max_age_ms` by the database's
    /// clock (the one that stamped them); returns how many. A reader still
    /// behind them re-reads everything.
    fn prune_changes(&self, max_age_ms: i64) -> Result<u64>;

    /// The next netmap serial from the database: at least `floor`, and
    /// above every serial any controller on the database took before.
    /// `None`: the engine keeps no shared serial (one controller), and the
    /// caller keeps its own.
    fn take_serial(&self, floor: u64) -> Result<Option<u64>>;
}

/// One entry of the change log: what changed, not how (a reader reads the
/// current state, so applying an entry twice or late does no harm).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeRow {
    pub id: u64,
    /// The node whose row changed; `None`: the policy.
    pub node: Option<u64>,
    /// Written through this store (this process), which applied it already.
    pub own: bool,
}

/// Change-log entries after a reader's position.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangeBatch {
    pub rows: Vec<ChangeRow>,
    /// Entries up to this id were pruned: a reader whose position is below
    /// it may have missed some, and must re-read every node and the policy.
    pub pruned_to: u64,
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
fn json_attrs(r: &Row, col: usize) -> DbResult<BTreeMap<String, AttrValue>> {
    let text = r.text(col)?;
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

/// The store, on an engine ([`SqliteStore`], [`PgStore`]): every query is
/// written once, in the dialect both share ([`sql`]).
pub struct SqlStore<B> {
    db: B,
}

impl<B: Backend> SqlStore<B> {
    fn on(db: B) -> Self {
        Self { db }
    }

    /// `UPDATE users SET {set} WHERE login = ?1`; `NotFound` if no such user.
    fn update_user(&self, login: &str, set: &str, args: &[Value]) -> Result<()> {
        let n = self
            .db
            .with(|c| Ok(c.exec(&format!("UPDATE users SET {set} WHERE login = ?1"), args)?))?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("user {login}")));
        }
        Ok(())
    }

    /// `UPDATE nodes SET {set} WHERE id = ?1`; `NotFound` if no such node
    /// and `must_exist`.
    fn update_node(&self, id: u64, set: &str, args: &[Value], must_exist: bool) -> Result<()> {
        let n = self
            .db
            .write(|c| Ok(c.exec(&format!("UPDATE nodes SET {set} WHERE id = ?1"), args)?))?;
        if n == 0 && must_exist {
            return Err(StoreError::NotFound(format!("node {id}")));
        }
        Ok(())
    }
}

/// A UNIQUE (or other integrity) violation is a [`StoreError::Conflict`]
/// over `what`.
fn conflict(e: DbError, what: &str) -> StoreError {
    match e {
        DbError::Unique | DbError::ForeignKey => StoreError::Conflict(what.to_string()),
        other => other.into(),
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

fn node_row(r: &Row) -> DbResult<NodeRow> {
    Ok(NodeRow {
        id: r.u64(0)?,
        name: r.text(1)?,
        hostname: r.text(2)?,
        machine_key: r.key32(3)?,
        wg_key: r.key32(4)?,
        ipv4: r.parsed(5)?,
        ipv6: r.parsed(6)?,
        user: r.opt_text(7)?,
        tags: r.list(8)?,
        ephemeral: r.bool(9)?,
        created_ms: r.i64(10)?,
        last_seen_ms: r.i64(11)?,
        expiry_ms: r.i64(12)?,
        endpoints: r.list(13)?,
        key_revoked: r.bool(14)?,
        routes: NodeRoutes {
            advertised: prefixes(r, 15)?,
            approved: prefixes(r, 16)?,
            exit_advertised: r.bool(17)?,
            exit_approved: r.bool(18)?,
        },
        posture: NodePosture {
            reported: json_attrs(r, 19)?,
            reported_ms: r.i64(20)?,
            custom: json_attrs(r, 21)?,
        },
        quarantine: match r.i64(22)? {
            0 => None,
            since_ms => Some(Quarantine {
                since_ms,
                reason: r.text(23)?,
            }),
        },
    })
}

/// A comma-separated list of prefixes (a `routes_*` column).
fn prefixes(r: &Row, i: usize) -> DbResult<Vec<ipnet::IpNet>> {
    r.list(i)?
        .iter()
        .map(|p| p.parse().map_err(|_| corrupt(i, "route prefix")))
        .collect()
}

/// A `secret_keys` row ([`KEY_COLS`]): the kind decides which of the
/// kind-specific columns make up the detail.
fn key_row(r: &Row) -> DbResult<SecretRecord> {
    let kind = r.text(0)?;
    let detail = match SecretKind::from_stored(&kind).ok_or_else(|| corrupt(0, "key kind"))? {
        SecretKind::AuthKey => KeyDetail::Auth {
            user: r.opt_text(8)?,
            tags: r.list(9)?,
            reusable: r.bool(10)?,
            ephemeral: r.bool(11)?,
            used_count: r.u64(12)?,
        },
        SecretKind::ApiKey => KeyDetail::Api {
            description: r.text(13)?,
            role: r.parsed(14)?,
        },
    };
    Ok(SecretRecord {
        id: r.u64(1)?,
        key_id: r.text(2)?,
        secret_hash: r.key32(3)?,
        created_ms: r.i64(4)?,
        expires_ms: r.i64(5)?,
        revoked: r.bool(6)?,
        created_by: r.text(7)?,
        detail,
    })
}

/// The auth key stored under `key_id`, read (and on PostgreSQL row-locked
/// until the transaction ends) inside a write transaction: a second
/// enrollment with the same key waits here and then sees the first's count.
fn auth_key_in<B: Backend>(tx: &mut dyn Conn, key_id: &str) -> Result<Option<SecretRecord>> {
    Ok(tx.opt(
        &format!(
            "SELECT {KEY_COLS} FROM secret_keys WHERE kind = 'auth' AND key_id = ?1{}",
            B::LOCK_ROW
        ),
        args![key_id],
        key_row,
    )?)
}

/// Inserts an enrolled node inside `tx`; `auth_key_id` records how it
/// joined (an auth key's id, or `login`).
fn insert_node(
    tx: &mut dyn Conn,
    n: NewNode,
    user: Option<String>,
    tags: Vec<String>,
    ephemeral: bool,
    auth_key_id: &str,
) -> Result<NodeRow> {
    let mut id = 0;
    tx.query(
        "INSERT INTO nodes (name, hostname, machine_key, wg_key, ipv4, ipv6, user_login, tags,
                            ephemeral, created_ms, last_seen_ms, expiry_ms, auth_key_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10, ?11, ?12)
         RETURNING id",
        args![
            n.name.as_str(),
            n.hostname.as_str(),
            n.machine_key.as_slice(),
            n.wg_key.as_slice(),
            n.ipv4.to_string(),
            n.ipv6.to_string(),
            user.as_deref(),
            join_list(&tags),
            ephemeral,
            n.created_ms,
            n.expiry_ms,
            auth_key_id
        ],
        &mut |r| {
            id = r.u64(0)?;
            Ok(false)
        },
    )
    .map_err(|e| {
        conflict(
            e,
            "node with this machine key, WireGuard key, name or address",
        )
    })?;
    Ok(NodeRow {
        id,
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
fn audit_head_in(c: &mut dyn Conn) -> Result<(u64, Hash)> {
    let row = c.opt("SELECT id, hash FROM audit_head WHERE one = 1", &[], |r| {
        Ok((r.u64(0)?, r.blob(1)?))
    })?;
    match row {
        None => Ok((0, GENESIS)),
        Some((id, hash)) => Ok((
            id,
            hash.try_into()
                .map_err(|_| StoreError::from(corrupt(1, "audit head hash")))?,
        )),
    }
}

fn set_audit_head(c: &mut dyn Conn, id: u64, hash: &Hash) -> Result<()> {
    c.exec(
        "INSERT INTO audit_head (one, id, hash) VALUES (1, ?1, ?2)
         ON CONFLICT(one) DO UPDATE SET id = excluded.id, hash = excluded.hash",
        args![id, hash.as_slice()],
    )?;
    Ok(())
}

/// Appends `rows` to the chain inside a write transaction: each gets the
/// next id after the head (ids are never reused, even after the newest rows
/// were pruned) and is chained to the row before.
fn append_audit(tx: &mut dyn Conn, rows: &[AuditEntry]) -> Result<()> {
    let (head_id, mut prev) = audit_head_in(tx)?;
    // Rows written behind the controller's back keep their ids (verification
    // names them); new rows go after them.
    let max = tx.one("SELECT MAX(id) FROM audit", &[], |r| r.opt_u64(0))?;
    let mut id = head_id.max(max.unwrap_or(0));
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
        tx.exec(
            "INSERT INTO audit (id, time_ms, actor, action, target, detail, prev_hash, hash)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            args![
                id,
                r.time_ms,
                r.actor.as_str(),
                r.action.as_str(),
                r.target.as_str(),
                r.detail.as_str(),
                prev.as_slice(),
                hash.as_slice()
            ],
        )?;
        prev = hash;
    }
    set_audit_head(tx, id, &prev)
}

/// Chains the rows written before the chain existed, in id order (holes
/// left by earlier pruning are linked over: those rows were never covered).
pub(crate) fn chain_existing_audit(tx: &mut dyn Conn) -> Result<()> {
    let mut rows = Vec::new();
    for_rows(tx, "TRUE", &[], &mut |r| {
        rows.push(r.clone());
        true
    })?;
    let mut prev = GENESIS;
    let mut last = 0;
    for r in &rows {
        let hash = r.fields().hash(&prev);
        tx.exec(
            "UPDATE audit SET prev_hash = ?2, hash = ?3 WHERE id = ?1",
            args![r.id, prev.as_slice(), hash.as_slice()],
        )?;
        prev = hash;
        last = r.id;
    }
    tx.exec(
        "INSERT INTO audit_head (one, id, hash) VALUES (1, ?1, ?2)",
        args![last, prev.as_slice()],
    )?;
    Ok(())
}

const CHAIN_COLS: &str = "id, time_ms, actor, action, target, detail, prev_hash, hash";

/// A stored audit row as the chain sees it. Columns of an unexpected type
/// (written behind the controller's back) do not fail the read: the row
/// comes back with an empty hash, which verification names as altered.
fn chain_row(r: &Row) -> DbResult<ChainRow> {
    let mut sound = true;
    let mut text = |i: usize| match r.value(i) {
        Value::Text(t) => t.clone(),
        _ => {
            sound = false;
            String::new()
        }
    };
    let actor = text(2);
    let action = text(3);
    let target = text(4);
    let detail = text(5);
    let blob = |i: usize| match r.value(i) {
        Value::Blob(b) => b.clone(),
        _ => Vec::new(),
    };
    let time_ms = match r.value(1) {
        Value::Int(t) => *t,
        _ => {
            sound = false;
            0
        }
    };
    Ok(ChainRow {
        id: r.u64(0)?,
        time_ms,
        actor,
        action,
        target,
        detail,
        prev_hash: blob(6),
        hash: if sound { blob(7) } else { Vec::new() },
    })
}

/// Calls `each` with the audit rows matching `cond`, in id order, until it
/// returns `false`.
fn for_rows(
    c: &mut dyn Conn,
    cond: &str,
    args: &[Value],
    each: &mut dyn FnMut(&ChainRow) -> bool,
) -> Result<()> {
    c.query(
        &format!("SELECT {CHAIN_COLS} FROM audit WHERE {cond} ORDER BY id"),
        args,
        &mut |r| Ok(each(&chain_row(&r)?)),
    )?;
    Ok(())
}

/// A 32-byte hash column; anything else reads as zeros (the checkpoint
/// then fails its signature check, as a forged one would).
fn hash_col(r: &Row, i: usize) -> Hash {
    match r.value(i) {
        Value::Blob(b) => b.as_slice().try_into().unwrap_or([0; 32]),
        _ => [0; 32],
    }
}

/// The checkpoints matching `cond`, in id order.
fn checkpoints_where(c: &mut dyn Conn, cond: &str, args: &[Value]) -> Result<Vec<Checkpoint>> {
    Ok(c.rows(
        &format!(
            "SELECT kind, before_id, before_hash, head_id, head_hash, time_ms, signature
             FROM audit_checkpoints WHERE {cond} ORDER BY id"
        ),
        args,
        |r| {
            let head_id = r.u64(3)?;
            let head_hash = hash_col(r, 4);
            let mark = if r.text(0)? == "gap" {
                Mark::Gap {
                    before_id: r.opt_u64(1)?.unwrap_or(0),
                    before_hash: hash_col(r, 2),
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
                time_ms: r.i64(5)?,
                signature: match r.value(6) {
                    Value::Blob(b) => b.clone(),
                    _ => Vec::new(),
                },
            })
        },
    )?)
}

fn insert_checkpoint(c: &mut dyn Conn, cp: &Checkpoint) -> Result<()> {
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
    c.exec(
        "INSERT INTO audit_checkpoints (kind, before_id, before_hash, head_id, head_hash,
                                        time_ms, signature)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        args![
            kind,
            before_id,
            before_hash,
            head_id,
            head_hash.as_slice(),
            cp.time_ms,
            cp.signature.as_slice()
        ],
    )?;
    Ok(())
}

/// The newest validly signed head whose row is still there unchanged
/// (verification of new rows starts after it), else the start of the chain.
/// The `meta` key of the signing-key hand-overs: one base64 `KeyHandover`
/// per line, oldest first, appended by the mesh when it rotates its key.
pub const SIGNING_HANDOVERS: &str = "signing_handovers";

/// The hand-overs stored under [`SIGNING_HANDOVERS`] (lines that do not
/// decode are skipped: [`lineage`](ztmesh_proto::handover::lineage) trusts
/// only what verifies anyway).
pub fn parse_handovers(text: &str) -> Vec<ztmesh_proto::control::KeyHandover> {
    use base64::Engine;
    use prost::Message;
    text.lines()
        .filter_map(|l| {
            base64::engine::general_purpose::STANDARD
                .decode(l.trim())
                .ok()
        })
        .filter_map(|b| ztmesh_proto::control::KeyHandover::decode(b.as_slice()).ok())
        .collect()
}

/// The keys audit checkpoints may be signed with: `current` and the keys
/// it replaced, proven by the stored hand-overs.
fn lineage_in(c: &mut dyn Conn, current: &PublicKey) -> Result<Vec<TrustedKey>> {
    let text = c.opt(
        "SELECT value FROM meta WHERE key = ?1",
        args![SIGNING_HANDOVERS],
        |r| r.text(0),
    )?;
    let handovers = parse_handovers(text.as_deref().unwrap_or(""));
    Ok(ztmesh_proto::handover::lineage(current, &handovers))
}

fn trusted_head(c: &mut dyn Conn, keys: &[TrustedKey]) -> Result<(u64, Hash)> {
    let cps = checkpoints_where(
        c,
        "kind = 'head' AND EXISTS (SELECT 1 FROM audit a
             WHERE a.id = audit_checkpoints.head_id AND a.hash = audit_checkpoints.head_hash)
         AND id IN (SELECT id FROM audit_checkpoints WHERE kind = 'head'
                    ORDER BY head_id DESC LIMIT 16)",
        &[],
    )?;
    Ok(cps
        .iter()
        .rev()
        .filter(|c| c.verifies_any(keys))
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
    fn around(c: &mut dyn Conn, lo: u64, hi: u64) -> Result<Self> {
        let start = c.opt(
            "SELECT id, hash FROM audit WHERE id < ?1 ORDER BY id DESC LIMIT 1",
            args![lo],
            |r| Ok((r.u64(0)?, r.opt_blob(1)?.unwrap_or_default())),
        )?;
        let start = match start {
            None => (0, GENESIS),
            Some((id, hash)) => match Hash::try_from(hash) {
                Ok(h) => (id, h),
                Err(_) => return Err(StoreError::Chain(ChainError::Altered { id })),
            },
        };
        let after = c.one("SELECT MIN(id) FROM audit WHERE id > ?1", args![hi], |r| {
            r.opt_u64(0)
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
    fn verify(&self, c: &mut dyn Conn, keys: &[TrustedKey]) -> Result<()> {
        let (from, end) = (self.start.0, self.end());
        let cps = checkpoints_where(c, "head_id >= ?1 AND head_id <= ?2", args![from, end])?;
        let recorded = self.after.is_none().then_some(self.head);
        let mut v = Verifier::new(keys, &cps, recorded).starting_after(from, self.start.1);
        for_rows(c, "id > ?1 AND id <= ?2", args![from, end], &mut |r| {
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
    fn reseal(&self, c: &mut dyn Conn, now: UnixMs, key: &SigningKey) -> Result<()> {
        let (from, end) = (self.start.0, self.end());
        let mut links: Vec<(u64, Vec<u8>, Vec<u8>)> = c.rows(
            "SELECT id, prev_hash, hash FROM audit WHERE id > ?1 AND id < ?2 ORDER BY id",
            args![from, end],
            |r| {
                Ok((
                    r.u64(0)?,
                    r.opt_blob(1)?.unwrap_or_default(),
                    r.opt_blob(2)?.unwrap_or_default(),
                ))
            },
        )?;
        let last_link = match self.after {
            Some(id) => c.one(
                "SELECT prev_hash FROM audit WHERE id = ?1",
                args![id],
                |r| Ok(r.opt_blob(0)?.unwrap_or_default()),
            )?,
            None => self.head.1.to_vec(),
        };
        links.push((end, last_link, Vec::new()));
        c.exec(
            "DELETE FROM audit_checkpoints WHERE kind = 'gap' AND head_id >= ?1 AND head_id < ?2",
            args![from, end],
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
        c.exec(
            "DELETE FROM audit_checkpoints
             WHERE kind = 'head' AND head_id > ?1 AND head_id < ?2
               AND NOT EXISTS (SELECT 1 FROM audit WHERE audit.id = audit_checkpoints.head_id)
               AND head_id < (SELECT MAX(head_id) FROM audit_checkpoints WHERE kind = 'head')",
            args![from, end],
        )?;
        Ok(())
    }
}

impl<B: Backend> Store for SqlStore<B> {
    fn online_backup(&self, dest: &std::path::Path) -> Result<Snapshot> {
        self.db.online_backup(dest)
    }
    fn meta(&self, key: &str) -> Result<Option<String>> {
        self.db.with(|c| {
            Ok(
                c.opt("SELECT value FROM meta WHERE key = ?1", args![key], |r| {
                    r.text(0)
                })?,
            )
        })
    }

    fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.db.with(|c| {
            c.exec(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                args![key, value],
            )?;
            Ok(())
        })
    }

    fn init_meta(&self, key: &str, value: &str) -> Result<String> {
        self.db.write(|tx| {
            tx.exec(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO NOTHING",
                args![key, value],
            )?;
            Ok(
                tx.one("SELECT value FROM meta WHERE key = ?1", args![key], |r| {
                    r.text(0)
                })?,
            )
        })
    }

    fn create_user(&self, login: &str, role: Role, now: UnixMs) -> Result<UserRow> {
        let id = self.db.with(|c| {
            c.one(
                "INSERT INTO users (login, created_ms, role) VALUES (?1, ?2, ?3) RETURNING id",
                args![login, now, role.as_str()],
                |r| r.u64(0),
            )
            .map_err(|e| conflict(e, &format!("user {login}")))
        })?;
        Ok(UserRow {
            id,
            login: login.to_string(),
            created_ms: now,
            role,
            key_expiry_ms: None,
            has_password: false,
            has_totp: false,
        })
    }

    fn users(&self) -> Result<Vec<UserRow>> {
        self.db.with(|c| {
            Ok(c.rows(
                "SELECT id, login, created_ms, role, key_expiry_ms,
                        CASE WHEN password_hash IS NULL THEN 0 ELSE 1 END,
                        CASE WHEN totp_secret IS NULL THEN 0 ELSE 1 END
                 FROM users ORDER BY login",
                &[],
                |r| {
                    Ok(UserRow {
                        id: r.u64(0)?,
                        login: r.text(1)?,
                        created_ms: r.i64(2)?,
                        role: r.parsed(3)?,
                        key_expiry_ms: r.opt_i64(4)?,
                        has_password: r.bool(5)?,
                        has_totp: r.bool(6)?,
                    })
                },
            )?)
        })
    }

    fn set_user_role(&self, login: &str, role: Role) -> Result<()> {
        self.update_user(login, "role = ?2", args![login, role.as_str()])
    }

    fn set_user_key_expiry(&self, login: &str, ms: Option<UnixMs>) -> Result<()> {
        self.update_user(login, "key_expiry_ms = ?2", args![login, ms])
    }

    fn credentials(&self, login: &str) -> Result<Option<Credentials>> {
        self.db.with(|c| {
            Ok(c.opt(
                "SELECT login, role, password_hash, totp_secret, totp_last_step, recovery_codes
                 FROM users WHERE login = ?1",
                args![login],
                |r| {
                    Ok(Credentials {
                        login: r.text(0)?,
                        role: r.parsed(1)?,
                        password_hash: r.opt_text(2)?,
                        totp_secret: r.opt_blob(3)?,
                        totp_last_step: r.i64(4)?,
                        recovery: r.list(5)?,
                    })
                },
            )?)
        })
    }

    fn set_password(&self, login: &str, phc: Option<&str>) -> Result<()> {
        self.update_user(login, "password_hash = ?2", args![login, phc])
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
            args![login, secret, join_list(recovery), last_step],
        )
    }

    fn enroll_totp(
        &self,
        login: &str,
        secret: &[u8],
        recovery: &[String],
        last_step: i64,
    ) -> Result<bool> {
        let n = self.db.with(|c| {
            Ok(c.exec(
                "UPDATE users SET totp_secret = ?2, recovery_codes = ?3, totp_last_step = ?4
                 WHERE login = ?1 AND totp_secret IS NULL",
                args![login, secret, join_list(recovery), last_step],
            )?)
        })?;
        Ok(n == 1)
    }

    fn use_totp_step(&self, login: &str, step: i64) -> Result<bool> {
        let n = self.db.with(|c| {
            Ok(c.exec(
                "UPDATE users SET totp_last_step = ?2 WHERE login = ?1 AND totp_last_step < ?2",
                args![login, step],
            )?)
        })?;
        Ok(n == 1)
    }

    fn use_recovery_code(&self, login: &str, hash: &str) -> Result<bool> {
        self.db.write(|tx| {
            let codes = tx.opt(
                &format!(
                    "SELECT recovery_codes FROM users WHERE login = ?1{}",
                    B::LOCK_ROW
                ),
                args![login],
                |r| r.text(0),
            )?;
            let mut codes = split_list(&codes.unwrap_or_default());
            let before = codes.len();
            codes.retain(|h| h != hash);
            if codes.len() == before {
                return Ok(false);
            }
            tx.exec(
                "UPDATE users SET recovery_codes = ?2 WHERE login = ?1",
                args![login, join_list(&codes)],
            )?;
            Ok(true)
        })
    }

    fn identity_login(&self, issuer: &str, subject: &str) -> Result<Option<String>> {
        self.db.with(|c| {
            Ok(c.opt(
                "SELECT user_login FROM identities WHERE issuer = ?1 AND subject = ?2",
                args![issuer, subject],
                |r| r.text(0),
            )?)
        })
    }

    fn identities(&self, login: &str) -> Result<Vec<(String, String)>> {
        self.db.with(|c| {
            Ok(c.rows(
                "SELECT issuer, subject FROM identities WHERE user_login = ?1
                 ORDER BY issuer, subject",
                args![login],
                |r| Ok((r.text(0)?, r.text(1)?)),
            )?)
        })
    }

    fn unlink_identities(&self, login: &str) -> Result<usize> {
        let n = self
            .db
            .with(|c| Ok(c.exec("DELETE FROM identities WHERE user_login = ?1", args![login])?))?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn link_identity(&self, issuer: &str, subject: &str, login: &str, now: UnixMs) -> Result<()> {
        self.db.with(|c| {
            c.exec(
                "INSERT INTO identities (issuer, subject, user_login, created_ms)
                 VALUES (?1, ?2, ?3, ?4)",
                args![issuer, subject, login, now],
            )
            .map_err(|e| match e {
                DbError::ForeignKey => StoreError::NotFound(format!("user {login}")),
                e => conflict(e, "SSO identity"),
            })?;
            Ok(())
        })
    }

    fn delete_user(&self, login: &str) -> Result<Vec<u64>> {
        self.db.write(|tx| {
            let ids = tx.rows(
                "SELECT id FROM nodes WHERE user_login = ?1 ORDER BY id",
                args![login],
                |r| r.u64(0),
            )?;
            tx.exec("DELETE FROM nodes WHERE user_login = ?1", args![login])?;
            // Only auth keys have an owner.
            tx.exec(
                "DELETE FROM secret_keys WHERE user_login = ?1",
                args![login],
            )?;
            let n = tx.exec("DELETE FROM users WHERE login = ?1", args![login])?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("user {login}")));
            }
            Ok(ids)
        })
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
        // A write transaction: the next id per kind is read and taken at once,
        // whichever controller creates a key.
        let id = self.db.write(|tx| {
            tx.one(
                "INSERT INTO secret_keys (kind, id, key_id, secret_hash, created_ms, expires_ms,
                                          revoked, created_by, user_login, tags, reusable,
                                          ephemeral, used_count, description, role)
                 VALUES (?1, (SELECT COALESCE(MAX(id), 0) + 1 FROM secret_keys WHERE kind = ?1),
                         ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
                 RETURNING id",
                args![
                    kind.as_str(),
                    k.key_id.as_str(),
                    k.secret_hash.as_slice(),
                    k.created_ms,
                    k.expires_ms,
                    k.revoked,
                    k.created_by.as_str(),
                    user,
                    join_list(tags),
                    reusable,
                    ephemeral,
                    used_count,
                    description,
                    role.as_str()
                ],
                |r| r.u64(0),
            )
            .map_err(|e| match e {
                DbError::ForeignKey => StoreError::NotFound(format!("user {}", user.unwrap_or(""))),
                e => conflict(e, &format!("{} id", kind.noun())),
            })
        })?;
        Ok(SecretRecord { id, ..k.clone() })
    }

    fn keys(&self, kind: SecretKind) -> Result<Vec<SecretRecord>> {
        self.db.with(|c| {
            Ok(c.rows(
                &format!("SELECT {KEY_COLS} FROM secret_keys WHERE kind = ?1 ORDER BY id"),
                args![kind.as_str()],
                key_row,
            )?)
        })
    }

    fn find_key(&self, kind: SecretKind, key_id: &str) -> Result<Option<SecretRecord>> {
        self.db.with(|c| {
            Ok(c.opt(
                &format!("SELECT {KEY_COLS} FROM secret_keys WHERE kind = ?1 AND key_id = ?2"),
                args![kind.as_str(), key_id],
                key_row,
            )?)
        })
    }

    fn revoke_key(&self, kind: SecretKind, key_id: &str) -> Result<()> {
        let n = self.db.with(|c| {
            Ok(c.exec(
                "UPDATE secret_keys SET revoked = 1 WHERE kind = ?1 AND key_id = ?2",
                args![kind.as_str(), key_id],
            )?)
        })?;
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
        self.db.write(|tx| {
            let key = auth_key_in::<B>(tx, key_id)?;
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
            tx.exec(
                "UPDATE secret_keys SET used_count = used_count + 1 WHERE kind = 'auth' AND id = ?1",
                args![key_row_id],
            )?;
            insert_node(tx, n, user, tags, ephemeral, key_id)
        })
    }

    fn consume_key(
        &self,
        key_id: &str,
        check: &dyn Fn(Option<&SecretRecord>) -> std::result::Result<(), String>,
    ) -> Result<()> {
        self.db.write(|tx| {
            let key = auth_key_in::<B>(tx, key_id)?;
            check(key.as_ref()).map_err(StoreError::KeyRefused)?;
            let Some(key) = key else {
                return Err(StoreError::KeyRefused("unknown auth key".into()));
            };
            tx.exec(
                "UPDATE secret_keys SET used_count = used_count + 1 WHERE kind = 'auth' AND id = ?1",
                args![key.id],
            )?;
            Ok(())
        })
    }

    fn enroll_for_user(&self, user: &str, n: NewNode) -> Result<NodeRow> {
        self.db.write(|tx| {
            let known = tx
                .opt(
                    &format!("SELECT id FROM users WHERE login = ?1{}", B::LOCK_ROW),
                    args![user],
                    |r| r.u64(0),
                )?
                .is_some();
            if !known {
                return Err(StoreError::NotFound(format!("user {user}")));
            }
            insert_node(tx, n, Some(user.to_string()), Vec::new(), false, "login")
        })
    }

    fn reauth_node(&self, id: u64, expiry_ms: UnixMs) -> Result<()> {
        self.update_node(
            id,
            "expiry_ms = ?2, key_revoked = 0",
            args![id, expiry_ms],
            true,
        )
    }

    fn nodes(&self) -> Result<Vec<NodeRow>> {
        self.db.with(|c| {
            Ok(c.rows(
                &format!("SELECT {NODE_COLS} FROM nodes ORDER BY id"),
                &[],
                node_row,
            )?)
        })
    }

    fn delete_node(&self, id: u64) -> Result<()> {
        let n = self
            .db
            .write(|c| Ok(c.exec("DELETE FROM nodes WHERE id = ?1", args![id])?))?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("node {id}")));
        }
        Ok(())
    }

    fn revoke_node_key(&self, id: u64, at: UnixMs) -> Result<()> {
        self.update_node(id, "expiry_ms = ?2, key_revoked = 1", args![id, at], false)
    }

    fn rename_node(&self, id: u64, name: &str) -> Result<()> {
        self.db.write(|c| {
            c.exec("UPDATE nodes SET name = ?2 WHERE id = ?1", args![id, name])
                .map_err(|e| conflict(e, &format!("node name {name}")))?;
            Ok(())
        })
    }

    fn set_node_seen(&self, id: u64, last_seen_ms: UnixMs) -> Result<()> {
        self.update_node(id, "last_seen_ms = ?2", args![id, last_seen_ms], false)
    }

    fn set_nodes_seen(&self, seen: &[(u64, UnixMs)]) -> Result<()> {
        self.db.write(|tx| {
            for (id, ms) in seen {
                tx.exec(
                    "UPDATE nodes SET last_seen_ms = ?2 WHERE id = ?1",
                    args![*id, *ms],
                )?;
            }
            Ok(())
        })
    }

    fn set_node_routes(&self, id: u64, routes: &NodeRoutes) -> Result<()> {
        let text = |v: &[ipnet::IpNet]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        self.update_node(
            id,
            "routes_advertised = ?2, routes_approved = ?3, exit_advertised = ?4, \
             exit_approved = ?5",
            args![
                id,
                join_list(&text(&routes.advertised)),
                join_list(&text(&routes.approved)),
                routes.exit_advertised,
                routes.exit_approved
            ],
            true,
        )
    }

    fn set_node_posture(&self, id: u64, posture: &NodePosture) -> Result<()> {
        self.update_node(
            id,
            "posture_reported = ?2, posture_reported_ms = ?3, posture_custom = ?4",
            args![
                id,
                attrs_json(&posture.reported),
                posture.reported_ms,
                attrs_json(&posture.custom)
            ],
            true,
        )
    }

    fn set_node_endpoints(&self, id: u64, endpoints: &[String]) -> Result<()> {
        self.update_node(id, "endpoints = ?2", args![id, join_list(endpoints)], false)
    }

    fn set_policy(&self, file_name: &str, text: &str, now: UnixMs) -> Result<PolicyRow> {
        let version = self.db.write(|c| {
            Ok(c.one(
                "INSERT INTO policies (file_name, text, created_ms) VALUES (?1, ?2, ?3)
                 RETURNING version",
                args![file_name, text, now],
                |r| r.u64(0),
            )?)
        })?;
        Ok(PolicyRow {
            version,
            file_name: file_name.to_string(),
            text: text.to_string(),
        })
    }

    fn policy(&self) -> Result<Option<PolicyRow>> {
        self.db.with(|c| {
            Ok(c.opt(
                "SELECT version, file_name, text FROM policies ORDER BY version DESC LIMIT 1",
                &[],
                |r| {
                    Ok(PolicyRow {
                        version: r.u64(0)?,
                        file_name: r.text(1)?,
                        text: r.text(2)?,
                    })
                },
            )?)
        })
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
        self.db.write(|tx| append_audit(tx, rows))
    }

    fn prune_audit(
        &self,
        older_than_ms: UnixMs,
        max_flow_rows: u64,
        now: UnixMs,
        key: &SigningKey,
    ) -> Result<u64> {
        self.db.write(|tx| {
            // Which rows go, as an id range to reseal.
            let (old_lo, old_hi) = tx.one(
                "SELECT MIN(id), MAX(id) FROM audit WHERE time_ms < ?1",
                args![older_than_ms],
                |r| Ok((r.opt_u64(0)?, r.opt_u64(1)?)),
            )?;
            let flow_hi = if max_flow_rows > 0 {
                tx.opt(
                    "SELECT id FROM audit WHERE action = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2",
                    args![FLOW_AUDIT_ACTION, max_flow_rows],
                    |r| r.u64(0),
                )?
            } else {
                None
            };
            let flow_lo = match flow_hi {
                Some(_) => tx.one(
                    "SELECT MIN(id) FROM audit WHERE action = ?1",
                    args![FLOW_AUDIT_ACTION],
                    |r| r.opt_u64(0),
                )?,
                None => None,
            };
            let lo = old_lo.into_iter().chain(flow_lo).min();
            let hi = old_hi.into_iter().chain(flow_hi).max();
            let (Some(lo), Some(hi)) = (lo, hi) else {
                return Ok(0);
            };
            let span = Span::around(tx, lo, hi)?;
            let keys = lineage_in(tx, &key.public())?;
            span.verify(tx, &keys)?;
            let mut n = tx.exec("DELETE FROM audit WHERE time_ms < ?1", args![older_than_ms])?;
            if let Some(flow_hi) = flow_hi {
                n += tx.exec(
                    "DELETE FROM audit WHERE action = ?1 AND id <= ?2",
                    args![FLOW_AUDIT_ACTION, flow_hi],
                )?;
            }
            span.reseal(tx, now, key)?;
            Ok(n)
        })
    }

    fn sign_audit_head(&self, now: UnixMs, key: &SigningKey) -> Result<Option<u64>> {
        self.db.write(|tx| {
            let (head_id, head_hash) = audit_head_in(tx)?;
            let newest = tx.one(
                "SELECT MAX(head_id) FROM audit_checkpoints WHERE kind = 'head'",
                &[],
                |r| r.opt_u64(0),
            )?;
            if head_id == 0 || newest.is_some_and(|n| n >= head_id) {
                return Ok(None);
            }
            let keys = lineage_in(tx, &key.public())?;
            let (from, from_hash) = trusted_head(tx, &keys)?;
            let cps = checkpoints_where(tx, "head_id > ?1", args![from])?;
            let mut v = Verifier::new(&keys, &cps, Some((head_id, head_hash)))
                .starting_after(from, from_hash);
            for_rows(tx, "id > ?1", args![from], &mut |r| {
                v.push(r);
                !v.is_decided()
            })?;
            v.finish().map_err(StoreError::Chain)?;
            // A head pruned away is vouched for by its gap already.
            let present = tx
                .opt(
                    "SELECT id FROM audit WHERE id = ?1 AND hash = ?2",
                    args![head_id, head_hash.as_slice()],
                    |r| r.u64(0),
                )?
                .is_some();
            if !present {
                return Ok(None);
            }
            let mark = Mark::Head {
                id: head_id,
                hash: head_hash,
            };
            insert_checkpoint(tx, &Checkpoint::signed(mark, now, &|m| key.sign(m)))?;
            Ok(Some(head_id))
        })
    }

    fn verify_audit(&self, key: &PublicKey) -> Result<std::result::Result<Verified, ChainError>> {
        // One read snapshot, whatever the controllers write meanwhile.
        self.db.snapshot(|tx| {
            let cps = checkpoints_where(tx, "TRUE", &[])?;
            let head = audit_head_in(tx)?;
            let keys = lineage_in(tx, key)?;
            let mut v = Verifier::new(&keys, &cps, Some(head));
            for_rows(tx, "TRUE", &[], &mut |r| {
                v.push(r);
                !v.is_decided()
            })?;
            Ok(v.finish())
        })
    }

    fn audit_rows(&self, since_ms: UnixMs, each: &mut dyn FnMut(&ChainRow) -> bool) -> Result<()> {
        self.db
            .with(|c| for_rows(c, "time_ms >= ?1", args![since_ms], each))
    }

    fn audit_log(&self, limit: u32) -> Result<Vec<AuditRow>> {
        self.db.with(|c| {
            Ok(c.rows(
                "SELECT id, time_ms, actor, action, target, detail FROM audit
                 ORDER BY id DESC LIMIT ?1",
                args![limit],
                |r| {
                    Ok(AuditRow {
                        id: r.u64(0)?,
                        time_ms: r.i64(1)?,
                        actor: r.text(2)?,
                        action: r.text(3)?,
                        target: r.text(4)?,
                        detail: r.text(5)?,
                    })
                },
            )?)
        })
    }

    fn record_flows(&self, rows: &[FlowRow]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        // Counts beyond i64::MAX saturate (`Value::from(u64)`).
        self.db.write(|tx| {
            for f in rows {
                tx.exec(
                    "INSERT INTO flows (time_ms, node_id, node_name, src, dst, proto, dst_port,
                       allowed, rule_id, reason, packets, bytes, reply_packets, reply_bytes,
                       first_seen_ms, last_seen_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15,
                             ?16)",
                    args![
                        f.time_ms,
                        f.node_id,
                        f.node_name.as_str(),
                        f.src.as_str(),
                        f.dst.as_str(),
                        f.proto,
                        f.dst_port,
                        f.allowed,
                        f.rule_id.as_str(),
                        f.reason.as_str(),
                        f.packets,
                        f.bytes,
                        f.reply_packets,
                        f.reply_bytes,
                        f.first_seen_ms,
                        f.last_seen_ms,
                    ],
                )?;
            }
            Ok(())
        })
    }

    fn flows(&self, q: &FlowQuery) -> Result<Vec<FlowRow>> {
        // Only the conditions asked for, so the engine can use the indices.
        let mut conds = vec!["time_ms >= ?1".to_string()];
        let mut args: Vec<Value> = vec![q.since_ms.into()];
        let mut cond = |sql: &str, v: Value| {
            args.push(v);
            conds.push(format!("{sql} ?{}", args.len()));
        };
        if let Some(n) = q.node_id {
            cond("node_id =", n.into());
        }
        if let Some(n) = &q.node_name {
            cond("node_name =", n.into());
        }
        if let Some(b) = q.before_id {
            cond("id <", b.into());
        }
        if let Some(a) = q.allowed {
            cond("allowed =", a.into());
        }
        args.push(q.limit.into());
        let sql = format!(
            "SELECT id, time_ms, node_id, node_name, src, dst, proto, dst_port, allowed,
                    rule_id, reason, packets, bytes, reply_packets, reply_bytes,
                    first_seen_ms, last_seen_ms
             FROM flows WHERE {} ORDER BY id DESC LIMIT ?{}",
            conds.join(" AND "),
            args.len()
        );
        // Negative counts (written behind the controller's back) read as 0.
        let n = |r: &Row, i: usize| -> DbResult<u64> { Ok(u64::try_from(r.i64(i)?).unwrap_or(0)) };
        self.db.with(|c| {
            Ok(c.rows(&sql, &args, |r| {
                Ok(FlowRow {
                    id: n(r, 0)?,
                    time_ms: r.i64(1)?,
                    node_id: n(r, 2)?,
                    node_name: r.text(3)?,
                    src: r.text(4)?,
                    dst: r.text(5)?,
                    proto: r.int(6)?,
                    dst_port: r.int(7)?,
                    allowed: r.bool(8)?,
                    rule_id: r.text(9)?,
                    reason: r.text(10)?,
                    packets: n(r, 11)?,
                    bytes: n(r, 12)?,
                    reply_packets: n(r, 13)?,
                    reply_bytes: n(r, 14)?,
                    first_seen_ms: r.i64(15)?,
                    last_seen_ms: r.i64(16)?,
                })
            })?)
        })
    }

    fn prune_flows(&self, older_than_ms: UnixMs, max_per_node: u64, max_rows: u64) -> Result<u64> {
        self.db.with(|c| {
            let mut n = c.exec("DELETE FROM flows WHERE time_ms < ?1", args![older_than_ms])?;
            if max_per_node > 0 {
                // One node's reports cannot push out everyone else's.
                let nodes = c.rows("SELECT DISTINCT node_id FROM flows", &[], |r| r.i64(0))?;
                for node in nodes {
                    n += c.exec(
                        "DELETE FROM flows WHERE node_id = ?1 AND id <= (SELECT id FROM flows
                           WHERE node_id = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
                        args![node, max_per_node],
                    )?;
                }
            }
            if max_rows > 0 {
                // The id of the oldest row kept; rows are only ever appended.
                n += c.exec(
                    "DELETE FROM flows WHERE id <= (SELECT id FROM flows ORDER BY id DESC
                       LIMIT 1 OFFSET ?1)",
                    args![max_rows],
                )?;
            }
            Ok(n)
        })
    }

    fn set_node_quarantine(&self, id: u64, q: Option<&Quarantine>) -> Result<()> {
        let (since, reason) = q.map_or((0, ""), |q| (q.since_ms, q.reason.as_str()));
        self.update_node(
            id,
            "quarantined_ms = ?2, quarantine_reason = ?3",
            args![id, since, reason],
            true,
        )
    }

    fn record_detection(&self, d: &DetectionRow) -> Result<u64> {
        self.db.with(|c| {
            Ok(c.one(
                "INSERT INTO detections (time_ms, node_id, node_name, detectors, action,
                                         evidence, alert)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) RETURNING id",
                args![
                    d.time_ms,
                    d.node_id,
                    d.node_name.as_str(),
                    d.detectors.as_str(),
                    d.action.as_str(),
                    d.evidence.as_str(),
                    d.alert.as_str()
                ],
                |r| r.u64(0),
            )?)
        })
    }

    fn set_detection_alert(&self, id: u64, alert: &str) -> Result<()> {
        self.db.with(|c| {
            c.exec(
                "UPDATE detections SET alert = ?2 WHERE id = ?1",
                args![id, alert],
            )?;
            Ok(())
        })
    }

    fn detections(&self, limit: u32, before_id: Option<u64>) -> Result<Vec<DetectionRow>> {
        let before = before_id.unwrap_or(u64::MAX);
        self.db.with(|c| {
            Ok(c.rows(
                "SELECT id, time_ms, node_id, node_name, detectors, action, evidence, alert
                 FROM detections WHERE id < ?1 ORDER BY id DESC LIMIT ?2",
                args![before, limit],
                |r| {
                    Ok(DetectionRow {
                        id: r.u64(0)?,
                        time_ms: r.i64(1)?,
                        node_id: r.u64(2)?,
                        node_name: r.text(3)?,
                        detectors: r.text(4)?,
                        action: r.text(5)?,
                        evidence: r.text(6)?,
                        alert: r.text(7)?,
                    })
                },
            )?)
        })
    }

    fn prune_detections(&self, older_than_ms: UnixMs) -> Result<u64> {
        self.db.with(|c| {
            Ok(c.exec(
                "DELETE FROM detections WHERE time_ms < ?1",
                args![older_than_ms],
            )?)
        })
    }

    fn node(&self, id: u64) -> Result<Option<NodeRow>> {
        self.db.with(|c| {
            Ok(c.opt(
                &format!("SELECT {NODE_COLS} FROM nodes WHERE id = ?1"),
                args![id],
                node_row,
            )?)
        })
    }

    fn change_head(&self) -> Result<u64> {
        if !B::CHANGE_LOG {
            return Ok(0);
        }
        // Where the log was pruned to, if that is past every entry left:
        // a reader starting there has missed nothing.
        self.db.snapshot(|c| {
            let pruned_to = c
                .opt(
                    "SELECT value FROM meta WHERE key = 'changes_pruned_to'",
                    &[],
                    |r| r.parsed::<u64>(0),
                )?
                .unwrap_or(0);
            let head = c.one(
                "SELECT COALESCE(MAX(id), 0) FROM ztmesh_changes",
                &[],
                |r| r.u64(0),
            )?;
            Ok(head.max(pruned_to))
        })
    }

    fn changes_since(&self, after: u64, limit: u32) -> Result<ChangeBatch> {
        if !B::CHANGE_LOG {
            return Ok(ChangeBatch::default());
        }
        let origin = self.db.origin();
        // One snapshot: a prune between the two reads cannot hide a gap.
        self.db.snapshot(|c| {
            let pruned_to = c
                .opt(
                    "SELECT value FROM meta WHERE key = 'changes_pruned_to'",
                    &[],
                    |r| r.parsed::<u64>(0),
                )?
                .unwrap_or(0);
            let rows = c.rows(
                "SELECT id, node_id, origin FROM ztmesh_changes WHERE id > ?1 ORDER BY id LIMIT ?2",
                args![after, limit],
                |r| {
                    Ok(ChangeRow {
                        id: r.u64(0)?,
                        node: r.opt_u64(1)?,
                        own: r.text(2)? == origin,
                    })
                },
            )?;
            Ok(ChangeBatch { rows, pruned_to })
        })
    }

    fn prune_changes(&self, max_age_ms: i64) -> Result<u64> {
        if !B::CHANGE_LOG {
            return Ok(0);
        }
        self.db.write(|tx| {
            // A prefix of the log: everything up to the newest old entry.
            let (n, last) = tx.one(
                "WITH gone AS (
                     DELETE FROM ztmesh_changes WHERE id <= (
                         SELECT COALESCE(MAX(id), 0) FROM ztmesh_changes
                         WHERE time_ms < (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT - ?1
                     ) RETURNING id)
                 SELECT COUNT(*), COALESCE(MAX(id), 0) FROM gone",
                args![max_age_ms],
                |r| Ok((r.u64(0)?, r.u64(1)?)),
            )?;
            let before = tx
                .opt(
                    "SELECT value FROM meta WHERE key = 'changes_pruned_to'",
                    &[],
                    |r| r.parsed::<u64>(0),
                )?
                .unwrap_or(0);
            if n > 0 && last > before {
                tx.exec(
                    "INSERT INTO meta (key, value) VALUES ('changes_pruned_to', ?1)
                     ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    args![last.to_string()],
                )?;
            }
            Ok(n)
        })
    }

    fn take_serial(&self, floor: u64) -> Result<Option<u64>> {
        if !B::CHANGE_LOG {
            return Ok(None);
        }
        let floor = i64::try_from(floor).unwrap_or(i64::MAX);
        // One statement, outside the write lock: the row lock orders the
        // takers, and a long write transaction does not hold maps back.
        self.db.with(|tx| {
            Ok(Some(tx.one(
                "UPDATE ztmesh_serial SET serial = GREATEST(serial + 1, ?1) WHERE one = 1
                 RETURNING serial",
                args![floor],
                |r| r.u64(0),
            )?))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use rusqlite::Connection;

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

    /// Each engine the suite runs on: SQLite in memory, and PostgreSQL
    /// (a fresh database) where the test cluster runs (`scripts/pg.sh`).
    fn engines() -> Vec<(&'static str, Arc<dyn Store>)> {
        let mut out: Vec<(&'static str, Arc<dyn Store>)> =
            vec![("sqlite", Arc::new(SqliteStore::in_memory().unwrap()))];
        if let Some(url) = postgres::tests::fresh_database() {
            let pg = PgStore::connect(PgOptions::parse(&url).unwrap()).unwrap();
            out.push(("postgres", Arc::new(pg)));
        }
        out
    }

    /// Runs `test` on each engine, naming the engine if it fails.
    fn on_each_engine(test: impl Fn(&dyn Store)) {
        for (engine, s) in engines() {
            eprintln!("engine: {engine}");
            test(s.as_ref());
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

    /// Two handles on one database, as two controllers have: SQLite opened
    /// twice (two connections), PostgreSQL connected twice (two pools).
    #[expect(
        clippy::type_complexity,
        reason = "a test helper: engine name, two handles, the SQLite file's dir"
    )]
    fn shared_engines() -> Vec<(&'static str, [Arc<dyn Store>; 2], Option<tempfile::TempDir>)> {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db.sqlite");
        let sqlite = |_| -> Arc<dyn Store> { Arc::new(SqliteStore::open(&db).unwrap()) };
        let mut out = vec![("sqlite", [0, 1].map(sqlite), Some(dir))];
        if let Some(url) = postgres::tests::fresh_database() {
            let pg = |_| -> Arc<dyn Store> {
                Arc::new(PgStore::connect(PgOptions::parse(&url).unwrap()).unwrap())
            };
            out.push(("postgres", [0, 1].map(pg), None));
        }
        out
    }

    #[test]
    fn single_use_key_enrolls_exactly_once_under_concurrency() {
        for (engine, stores, _dir) in shared_engines() {
            let (text, key) = stored(stores[0].as_ref(), auth_detail(None, false), 1);
            let handles: Vec<_> = (1..=8u8)
                .map(|i| {
                    let s = stores[usize::from(i % 2)].clone();
                    let (text, key_id) = (text.clone(), key.key_id.clone());
                    std::thread::spawn(move || s.enroll(&key_id, &verifies(&text), node(i)))
                })
                .collect();
            let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "{engine}");
            for e in results.into_iter().filter_map(|r| r.err()) {
                assert_eq!(
                    e.to_string(),
                    "auth key refused: single-use auth key was already used",
                    "{engine}"
                );
            }
            for s in &stores {
                assert_eq!(s.nodes().unwrap().len(), 1, "{engine}");
                assert_eq!(used_count(s.as_ref(), &key.key_id), 1, "{engine}");
            }
        }
    }

    /// Audit rows appended through both handles at once form one chain,
    /// and keys created through both get distinct ids.
    #[test]
    fn two_writers_keep_one_audit_chain_and_distinct_key_ids() {
        let signing = SigningKey::generate(&mut StdRng::seed_from_u64(9));
        for (engine, stores, _dir) in shared_engines() {
            let handles: Vec<_> = (0..4u64)
                .map(|t| {
                    let s = stores[usize::try_from(t % 2).unwrap()].clone();
                    std::thread::spawn(move || {
                        for i in 0..25 {
                            s.audit(i64::try_from(t * 100 + i).unwrap(), "a", "x", "t", "")
                                .unwrap();
                        }
                        let mut rng = StdRng::seed_from_u64(100 + t);
                        let detail = auth_detail(None, true);
                        let (_, rec) =
                            secrets::issue(detail, 1_000, "test", FP, 0, &mut rng).unwrap();
                        s.create_key(&rec).unwrap().id
                    })
                })
                .collect();
            let mut ids: Vec<u64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            ids.sort_unstable();
            assert_eq!(ids, [1, 2, 3, 4], "{engine}");
            let head = stores[1].sign_audit_head(1, &signing).unwrap();
            assert_eq!(head, Some(100), "{engine}");
            let verdict = stores[0].verify_audit(&signing.public()).unwrap();
            assert!(verdict.is_ok(), "{engine}: {verdict:?}");
            assert_eq!(stores[0].audit_log(500).unwrap().len(), 100, "{engine}");
        }
    }

    #[test]
    fn reusable_key_enrolls_many_and_check_can_refuse() {
        on_each_engine(|s| {
            let (text, key) = stored(s, auth_detail(None, true), 2);
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
            assert_eq!(used_count(s, &key.key_id), 2);
        });
    }

    #[test]
    fn an_unknown_key_enrolls_nothing_whatever_the_check_says() {
        on_each_engine(|s| {
            let (text, _) = stored(s, auth_detail(None, true), 3);
            let err = s
                .enroll("000000000000", &verifies(&text), node(1))
                .unwrap_err();
            assert_eq!(err.to_string(), "auth key refused: unknown auth key");
            let err = s.enroll("000000000000", &|_| Ok(()), node(1)).unwrap_err();
            assert!(matches!(err, StoreError::KeyRefused(_)), "{err}");
            // An API key's id is no auth key.
            let (_, api) = stored(
                s,
                KeyDetail::Api {
                    description: "ci".into(),
                    role: Role::Admin,
                },
                4,
            );
            assert!(s.enroll(&api.key_id, &|_| Ok(()), node(1)).is_err());
            assert!(s.nodes().unwrap().is_empty());
        });
    }

    #[test]
    fn duplicate_machine_key_is_a_conflict_and_consumes_nothing() {
        on_each_engine(|s| {
            let (text, key) = stored(s, auth_detail(None, true), 5);
            s.enroll(&key.key_id, &verifies(&text), node(1)).unwrap();
            let mut dup = node(2);
            dup.machine_key = [1; 32];
            assert!(matches!(
                s.enroll(&key.key_id, &verifies(&text), dup),
                Err(StoreError::Conflict(_))
            ));
            assert_eq!(used_count(s, &key.key_id), 1);
        });
    }

    #[test]
    fn deleting_a_user_deletes_its_nodes_and_keys() {
        on_each_engine(|s| {
            s.create_user("alice@example.com", Role::Member, 0).unwrap();
            let (text, key) = stored(s, auth_detail(Some("alice@example.com"), true), 6);
            let n = s.enroll(&key.key_id, &verifies(&text), node(1)).unwrap();
            assert_eq!(n.user.as_deref(), Some("alice@example.com"));
            assert_eq!(s.delete_user("alice@example.com").unwrap(), vec![n.id]);
            assert!(s.nodes().unwrap().is_empty());
            assert!(s.users().unwrap().is_empty());
            assert!(s.keys(SecretKind::AuthKey).unwrap().is_empty());
        });
    }

    #[test]
    fn an_auth_key_for_an_unknown_user_is_not_found() {
        on_each_engine(|s| {
            let mut rng = StdRng::seed_from_u64(7);
            let detail = auth_detail(Some("nobody@example.com"), false);
            let (_, rec) = secrets::issue(detail, 1_000, "test", FP, 0, &mut rng).unwrap();
            assert!(matches!(s.create_key(&rec), Err(StoreError::NotFound(_))));
        });
    }

    #[test]
    fn each_kind_is_counted_listed_found_and_revoked_apart() {
        on_each_engine(|s| {
            let api = |d: &str| KeyDetail::Api {
                description: d.into(),
                role: Role::Admin,
            };
            let (_, a1) = stored(s, auth_detail(None, false), 8);
            let (_, p1) = stored(s, api("ci"), 9);
            let (_, p2) = stored(s, api("ops"), 10);
            let (_, a2) = stored(s, auth_detail(None, true), 11);
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
        });
    }

    /// The schema before `secret_keys`: the first three migrations, as they
    /// were shipped (migrations are never edited).
    fn old_schema_db(path: &Path) {
        let c = Connection::open(path).unwrap();
        for m in &sqlite::MIGRATIONS[..3] {
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
            .raw()
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
            .raw()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, sqlite::MIGRATIONS.len());
    }

    #[test]
    fn node_routes_round_trip_and_an_unknown_node_is_not_found() {
        on_each_engine(|s| {
            let (text, key) = stored(s, auth_detail(None, true), 4);
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
        });
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
        on_each_engine(|s| {
            assert!(s.policy().unwrap().is_none());
            let a = s.set_policy("a.hujson", "{}", 0).unwrap();
            let b = s.set_policy("b.hujson", "{}", 1).unwrap();
            assert!(b.version > a.version);
            assert_eq!(s.policy().unwrap().unwrap().file_name, "b.hujson");
        });
    }

    #[test]
    fn flow_log_is_queried_newest_first_and_pruned_by_age_and_count() {
        on_each_engine(|s| {
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
            let times = |q: FlowQuery| -> Vec<i64> {
                s.flows(&q).unwrap().iter().map(|f| f.time_ms).collect()
            };
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
        });
    }
}
