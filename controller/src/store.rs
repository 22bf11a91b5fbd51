//! Durable state behind the [`Store`] trait; [`SqliteStore`] is the embedded default.
//!
//! The controller keeps its working set in memory ([`crate::mesh`]) and writes
//! every change through to the store before acknowledging it, so a `kill -9`
//! loses nothing that was acknowledged (SQLite WAL, `synchronous=FULL`). The
//! trait is synchronous and narrow so that a PostgreSQL implementation (several
//! controllers) can follow without touching callers. Every query is
//! parameterized.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

pub use crate::model::NodeRow;
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
    /// The auth key cannot be used (unknown, wrong secret, revoked, expired or used).
    #[error("auth key refused: {0}")]
    KeyRefused(&'static str),
}

pub type Result<T> = std::result::Result<T, StoreError>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserRow {
    pub id: u64,
    pub login: String,
    pub created_ms: UnixMs,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthKeyRow {
    pub id: u64,
    pub key_id: String,
    pub secret_hash: [u8; 32],
    pub user: Option<String>,
    pub tags: Vec<String>,
    pub reusable: bool,
    pub ephemeral: bool,
    pub created_ms: UnixMs,
    pub expires_ms: UnixMs,
    pub used_count: u64,
    pub revoked: bool,
    pub created_by: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKeyRow {
    pub id: u64,
    pub key_id: String,
    pub secret_hash: [u8; 32],
    pub description: String,
    pub created_ms: UnixMs,
    pub expires_ms: UnixMs,
    pub revoked: bool,
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

    fn create_user(&self, login: &str, now: UnixMs) -> Result<UserRow>;
    fn users(&self) -> Result<Vec<UserRow>>;
    /// Deletes the user and every node it owns; returns the deleted node ids.
    fn delete_user(&self, login: &str) -> Result<Vec<u64>>;

    fn create_auth_key(&self, key: &AuthKeyRow) -> Result<AuthKeyRow>;
    fn auth_keys(&self) -> Result<Vec<AuthKeyRow>>;
    fn revoke_auth_key(&self, key_id: &str) -> Result<()>;

    /// Checks and consumes the auth key and inserts the node, in one transaction:
    /// of two concurrent enrollments with one single-use key, exactly one succeeds.
    /// `check` sees the key row and may refuse it (secret, expiry, revocation).
    fn enroll(
        &self,
        key_id: &str,
        check: &dyn Fn(&AuthKeyRow) -> std::result::Result<(), &'static str>,
        node: NewNode,
    ) -> Result<NodeRow>;
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

    fn create_api_key(&self, key: &ApiKeyRow) -> Result<ApiKeyRow>;
    fn api_keys(&self) -> Result<Vec<ApiKeyRow>>;
    fn revoke_api_key(&self, key_id: &str) -> Result<()>;

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
    fn prune_audit(&self, older_than_ms: UnixMs, max_flow_rows: u64) -> Result<u64>;
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
];

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
    s.parse().map_err(|_| corrupt(col, "address"))
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
                         ephemeral, created_ms, last_seen_ms, expiry_ms, endpoints, key_revoked";
const KEY_COLS: &str = "id, key_id, secret_hash, user_login, tags, reusable, ephemeral, \
                        created_ms, expires_ms, used_count, revoked, created_by";

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
    })
}

fn key_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuthKeyRow> {
    Ok(AuthKeyRow {
        id: r.get(0)?,
        key_id: r.get(1)?,
        secret_hash: key32(r, 2)?,
        user: r.get(3)?,
        tags: list(r, 4)?,
        reusable: r.get(5)?,
        ephemeral: r.get(6)?,
        created_ms: r.get(7)?,
        expires_ms: r.get(8)?,
        used_count: r.get(9)?,
        revoked: r.get(10)?,
        created_by: r.get(11)?,
    })
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
            tx.pragma_update(None, "user_version", i + 1)?;
        }
        tx.commit()?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
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

    fn create_user(&self, login: &str, now: UnixMs) -> Result<UserRow> {
        let c = self.conn();
        c.execute(
            "INSERT INTO users (login, created_ms) VALUES (?1, ?2)",
            params![login, now],
        )
        .map_err(|e| conflict(e, &format!("user {login}")))?;
        Ok(UserRow {
            id: c.last_insert_rowid() as u64,
            login: login.to_string(),
            created_ms: now,
        })
    }

    fn users(&self) -> Result<Vec<UserRow>> {
        let c = self.conn();
        let mut st = c.prepare("SELECT id, login, created_ms FROM users ORDER BY login")?;
        let rows = st.query_map([], |r| {
            Ok(UserRow {
                id: r.get(0)?,
                login: r.get(1)?,
                created_ms: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
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
        tx.execute("DELETE FROM auth_keys WHERE user_login = ?1", [login])?;
        let n = tx.execute("DELETE FROM users WHERE login = ?1", [login])?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("user {login}")));
        }
        tx.commit()?;
        Ok(ids)
    }

    fn create_auth_key(&self, k: &AuthKeyRow) -> Result<AuthKeyRow> {
        let c = self.conn();
        c.execute(
            "INSERT INTO auth_keys (key_id, secret_hash, user_login, tags, reusable, ephemeral,
                                    created_ms, expires_ms, created_by)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                k.key_id,
                k.secret_hash.as_slice(),
                k.user,
                join_list(&k.tags),
                k.reusable,
                k.ephemeral,
                k.created_ms,
                k.expires_ms,
                k.created_by
            ],
        )
        .map_err(|e| match e {
            rusqlite::Error::SqliteFailure(f, _)
                if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY =>
            {
                StoreError::NotFound(format!("user {}", k.user.as_deref().unwrap_or("")))
            }
            e => conflict(e, "auth key id"),
        })?;
        let mut row = k.clone();
        row.id = c.last_insert_rowid() as u64;
        Ok(row)
    }

    fn auth_keys(&self) -> Result<Vec<AuthKeyRow>> {
        let c = self.conn();
        let mut st = c.prepare(&format!("SELECT {KEY_COLS} FROM auth_keys ORDER BY id"))?;
        let keys = st.query_map([], key_row)?;
        Ok(keys.collect::<rusqlite::Result<_>>()?)
    }

    fn revoke_auth_key(&self, key_id: &str) -> Result<()> {
        let n = self.conn().execute(
            "UPDATE auth_keys SET revoked = 1 WHERE key_id = ?1",
            [key_id],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("auth key {key_id}")));
        }
        Ok(())
    }

    fn enroll(
        &self,
        key_id: &str,
        check: &dyn Fn(&AuthKeyRow) -> std::result::Result<(), &'static str>,
        n: NewNode,
    ) -> Result<NodeRow> {
        let mut c = self.conn();
        // IMMEDIATE takes the write lock up front: a second enrollment (in this
        // or another process) waits here and then sees used_count = 1.
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let key = tx
            .query_row(
                &format!("SELECT {KEY_COLS} FROM auth_keys WHERE key_id = ?1"),
                [key_id],
                key_row,
            )
            .optional()?
            .ok_or(StoreError::KeyRefused("unknown auth key"))?;
        check(&key).map_err(StoreError::KeyRefused)?;
        if !key.reusable && key.used_count > 0 {
            return Err(StoreError::KeyRefused(
                "single-use auth key was already used",
            ));
        }
        tx.execute(
            "UPDATE auth_keys SET used_count = used_count + 1 WHERE id = ?1",
            [key.id],
        )?;
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
                key.user,
                join_list(&key.tags),
                key.ephemeral,
                n.created_ms,
                n.expiry_ms,
                key.key_id
            ],
        )
        .map_err(|e| {
            conflict(
                e,
                "node with this machine key, WireGuard key, name or address",
            )
        })?;
        let id = tx.last_insert_rowid() as u64;
        tx.commit()?;
        Ok(NodeRow {
            id,
            name: n.name,
            hostname: n.hostname,
            machine_key: n.machine_key,
            wg_key: n.wg_key,
            ipv4: n.ipv4,
            ipv6: n.ipv6,
            user: key.user,
            tags: key.tags,
            ephemeral: key.ephemeral,
            created_ms: n.created_ms,
            last_seen_ms: n.created_ms,
            expiry_ms: n.expiry_ms,
            endpoints: Vec::new(),
            key_revoked: false,
        })
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

    fn set_node_endpoints(&self, id: u64, endpoints: &[String]) -> Result<()> {
        self.conn().execute(
            "UPDATE nodes SET endpoints = ?2 WHERE id = ?1",
            params![id, join_list(endpoints)],
        )?;
        Ok(())
    }

    fn create_api_key(&self, k: &ApiKeyRow) -> Result<ApiKeyRow> {
        let c = self.conn();
        c.execute(
            "INSERT INTO api_keys (key_id, secret_hash, description, created_ms, expires_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                k.key_id,
                k.secret_hash.as_slice(),
                k.description,
                k.created_ms,
                k.expires_ms
            ],
        )
        .map_err(|e| conflict(e, "api key id"))?;
        let mut row = k.clone();
        row.id = c.last_insert_rowid() as u64;
        Ok(row)
    }

    fn api_keys(&self) -> Result<Vec<ApiKeyRow>> {
        let c = self.conn();
        let mut st = c.prepare(
            "SELECT id, key_id, secret_hash, description, created_ms, expires_ms, revoked
             FROM api_keys ORDER BY id",
        )?;
        let keys = st.query_map([], |r| {
            Ok(ApiKeyRow {
                id: r.get(0)?,
                key_id: r.get(1)?,
                secret_hash: key32(r, 2)?,
                description: r.get(3)?,
                created_ms: r.get(4)?,
                expires_ms: r.get(5)?,
                revoked: r.get(6)?,
            })
        })?;
        Ok(keys.collect::<rusqlite::Result<_>>()?)
    }

    fn revoke_api_key(&self, key_id: &str) -> Result<()> {
        let n = self.conn().execute(
            "UPDATE api_keys SET revoked = 1 WHERE key_id = ?1",
            [key_id],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("api key {key_id}")));
        }
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
        self.conn().execute(
            "INSERT INTO audit (time_ms, actor, action, target, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![time_ms, actor, action, target, detail],
        )?;
        Ok(())
    }

    fn audit_batch(&self, rows: &[AuditEntry]) -> Result<()> {
        let mut c = self.conn();
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut st = tx.prepare(
                "INSERT INTO audit (time_ms, actor, action, target, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for r in rows {
                st.execute(params![r.time_ms, r.actor, r.action, r.target, r.detail])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn prune_audit(&self, older_than_ms: UnixMs, max_flow_rows: u64) -> Result<u64> {
        let mut c = self.conn();
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut n = tx.execute("DELETE FROM audit WHERE time_ms < ?1", [older_than_ms])?;
        if max_flow_rows > 0 {
            let keep = i64::try_from(max_flow_rows).unwrap_or(i64::MAX);
            n += tx.execute(
                "DELETE FROM audit WHERE action = ?1 AND id <= (
                     SELECT id FROM audit WHERE action = ?1
                     ORDER BY id DESC LIMIT 1 OFFSET ?2)",
                params![FLOW_AUDIT_ACTION, keep],
            )?;
        }
        tx.commit()?;
        Ok(n as u64)
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
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn key(key_id: &str, reusable: bool) -> AuthKeyRow {
        AuthKeyRow {
            id: 0,
            key_id: key_id.into(),
            secret_hash: [1; 32],
            user: None,
            tags: vec!["tag:web".into()],
            reusable,
            ephemeral: false,
            created_ms: 0,
            expires_ms: 1_000,
            used_count: 0,
            revoked: false,
            created_by: "test".into(),
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
        let dir = std::env::temp_dir().join(format!("ztm-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = Arc::new(SqliteStore::open(&dir.join("db.sqlite")).unwrap());
        store.create_auth_key(&key("aaaaaaaaaaaa", false)).unwrap();
        let handles: Vec<_> = (1..=8u8)
            .map(|i| {
                let s = store.clone();
                std::thread::spawn(move || s.enroll("aaaaaaaaaaaa", &|_| Ok(()), node(i)))
            })
            .collect();
        let ok = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(Result::is_ok)
            .count();
        assert_eq!(ok, 1);
        assert_eq!(store.nodes().unwrap().len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reusable_key_enrolls_many_and_check_can_refuse() {
        let s = SqliteStore::in_memory().unwrap();
        s.create_auth_key(&key("bbbbbbbbbbbb", true)).unwrap();
        s.enroll("bbbbbbbbbbbb", &|_| Ok(()), node(1)).unwrap();
        s.enroll("bbbbbbbbbbbb", &|_| Ok(()), node(2)).unwrap();
        let err = s
            .enroll("bbbbbbbbbbbb", &|_| Err("auth key expired"), node(3))
            .unwrap_err();
        assert!(err.to_string().contains("expired"));
        assert_eq!(s.nodes().unwrap().len(), 2);
        assert_eq!(s.auth_keys().unwrap()[0].used_count, 2);
    }

    #[test]
    fn duplicate_machine_key_is_a_conflict_and_consumes_nothing() {
        let s = SqliteStore::in_memory().unwrap();
        s.create_auth_key(&key("cccccccccccc", true)).unwrap();
        s.enroll("cccccccccccc", &|_| Ok(()), node(1)).unwrap();
        let mut dup = node(2);
        dup.machine_key = [1; 32];
        assert!(matches!(
            s.enroll("cccccccccccc", &|_| Ok(()), dup),
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(s.auth_keys().unwrap()[0].used_count, 1);
    }

    #[test]
    fn deleting_a_user_deletes_its_nodes() {
        let s = SqliteStore::in_memory().unwrap();
        s.create_user("alice@example.com", 0).unwrap();
        let mut k = key("dddddddddddd", true);
        k.user = Some("alice@example.com".into());
        k.tags.clear();
        s.create_auth_key(&k).unwrap();
        let n = s.enroll("dddddddddddd", &|_| Ok(()), node(1)).unwrap();
        assert_eq!(s.delete_user("alice@example.com").unwrap(), vec![n.id]);
        assert!(s.nodes().unwrap().is_empty());
        assert!(s.users().unwrap().is_empty());
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
}
