//! The embedded SQLite engine: one connection, WAL, `synchronous=FULL`; its
//! write transactions are `BEGIN IMMEDIATE`, so a second writer (in this
//! process or another) waits for the first.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use super::sql::{Backend, Conn, DbError, DbResult, Row, Value};
use super::{chain_existing_audit, Result, Snapshot, SqlStore, StoreError};

/// The store on SQLite, the embedded default.
pub type SqliteStore = SqlStore<Sqlite>;

pub(super) const MIGRATIONS: &[&str] = &[
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

/// The SQLite engine behind [`SqliteStore`].
pub struct Sqlite {
    conn: Mutex<Connection>,
}

impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> Self {
        match &e {
            rusqlite::Error::SqliteFailure(f, _)
                if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY =>
            {
                Self::ForeignKey
            }
            rusqlite::Error::SqliteFailure(f, _)
                if f.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Self::Unique
            }
            _ => Self::Other(e.to_string()),
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        DbError::from(e).into()
    }
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Self::Null => ValueRef::Null,
            Self::Int(v) => ValueRef::Integer(*v),
            Self::Real(v) => ValueRef::Real(*v),
            Self::Text(v) => ValueRef::Text(v.as_bytes()),
            Self::Blob(v) => ValueRef::Blob(v),
        }))
    }
}

/// A connection or transaction (a transaction derefs to its connection).
struct SqliteConn<'a>(&'a Connection);

impl Conn for SqliteConn<'_> {
    fn exec(&mut self, sql: &str, args: &[Value]) -> DbResult<u64> {
        let n = self
            .0
            .prepare_cached(sql)?
            .execute(rusqlite::params_from_iter(args))?;
        Ok(n as u64)
    }

    fn query(
        &mut self,
        sql: &str,
        args: &[Value],
        each: &mut dyn FnMut(Row) -> DbResult<bool>,
    ) -> DbResult<()> {
        let mut st = self.0.prepare_cached(sql)?;
        let cols = st.column_count();
        let mut rows = st.query(rusqlite::params_from_iter(args))?;
        while let Some(r) = rows.next()? {
            let mut vals = Vec::with_capacity(cols);
            for i in 0..cols {
                vals.push(match r.get_ref(i)? {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(v) => Value::Int(v),
                    ValueRef::Real(v) => Value::Real(v),
                    // Not UTF-8: not text (a text read names it corrupt; the
                    // audit chain reader, altered).
                    ValueRef::Text(t) => match std::str::from_utf8(t) {
                        Ok(t) => Value::Text(t.to_string()),
                        Err(_) => Value::Blob(t.to_vec()),
                    },
                    ValueRef::Blob(b) => Value::Blob(b.to_vec()),
                });
            }
            if !each(Row(vals))? {
                break;
            }
        }
        Ok(())
    }

    fn batch(&mut self, sql: &str) -> DbResult<()> {
        Ok(self.0.execute_batch(sql)?)
    }
}

impl Backend for Sqlite {
    const LOCK_ROW: &'static str = "";
    /// One process serves a SQLite file: nobody follows its changes.
    const CHANGE_LOG: bool = false;

    fn origin(&self) -> &str {
        ""
    }

    fn with<T>(&self, f: impl FnOnce(&mut dyn Conn) -> Result<T>) -> Result<T> {
        f(&mut SqliteConn(&self.lock()))
    }

    fn write<T>(&self, f: impl FnOnce(&mut dyn Conn) -> Result<T>) -> Result<T> {
        let mut c = self.lock();
        // IMMEDIATE takes the write lock up front: a second writer (in this
        // or another process) waits here and then sees the first one's rows.
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&mut SqliteConn(&tx))?;
        tx.commit()?;
        Ok(out)
    }

    fn snapshot<T>(&self, f: impl FnOnce(&mut dyn Conn) -> Result<T>) -> Result<T> {
        let mut c = self.lock();
        let tx = c.transaction_with_behavior(TransactionBehavior::Deferred)?;
        f(&mut SqliteConn(&tx))
    }

    /// SQLite's online backup from a connection of its own, so the store's
    /// connection (and with it every write) is never held: all pages are
    /// copied in one step, inside one read transaction, which in WAL mode
    /// sees one consistent state while writers carry on. An in-memory
    /// database (tests) is copied from the store's connection.
    fn online_backup(&self, dest: &Path) -> Result<Snapshot> {
        let file = self
            .lock()
            .path()
            .filter(|p| !p.is_empty())
            .map(std::path::PathBuf::from);
        let mut dst = Connection::open(dest)?;
        match file {
            Some(src) => {
                let src = Connection::open_with_flags(
                    src,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                src.busy_timeout(std::time::Duration::from_secs(5))?;
                copy_all(&src, &mut dst)?;
            }
            None => copy_all(&self.lock(), &mut dst)?,
        }
        // A self-contained file: no WAL beside it.
        dst.pragma_update(None, "journal_mode", "DELETE")?;
        let schema_version: u32 = dst.pragma_query_value(None, "user_version", |r| r.get(0))?;
        Ok(Snapshot::Sqlite { schema_version })
    }
}

/// Copies every page of `src` into `dst` in one backup step (retrying,
/// bounded, while the source is busy).
fn copy_all(src: &Connection, dst: &mut Connection) -> Result<()> {
    use rusqlite::backup::{Backup, StepResult};
    let backup = Backup::new(src, dst)?;
    for _ in 0..BACKUP_BUSY_RETRIES {
        match backup.step(-1)? {
            StepResult::Done => return Ok(()),
            StepResult::More => {}
            StepResult::Busy | StepResult::Locked => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            _ => {}
        }
    }
    Err(StoreError::Db(
        "online backup: the database stayed busy; try again".into(),
    ))
}

/// How many times a busy source is retried (50 ms apart).
const BACKUP_BUSY_RETRIES: u32 = 200;

/// What [`SqliteStore::inspect`] found in a database file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileCheck {
    /// `PRAGMA user_version`.
    pub schema_version: u32,
    /// `PRAGMA integrity_check`: `["ok"]` when sound.
    pub integrity: Vec<String>,
    /// The `controller_key` meta value, if the file records one.
    pub controller_key: Option<String>,
}

impl Sqlite {
    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite itself consistent (every
        // write is a transaction), so a poisoned lock is safe to reuse.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl SqlStore<Sqlite> {
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
        Ok(Self::on(Sqlite {
            conn: Mutex::new(conn),
        }))
    }

    /// The schema version this binary writes (`PRAGMA user_version`).
    pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

    /// Reads a database file without changing it: its schema version, its
    /// integrity check, and the controller key it records (restore checks
    /// a backup's database with this before it is used).
    ///
    /// # Errors
    /// [`StoreError::Db`] if it cannot be opened or read as SQLite.
    pub fn inspect(path: &Path) -> Result<FileCheck> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let schema_version: u32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let mut integrity = Vec::new();
        conn.pragma_query(None, "integrity_check", |r| {
            integrity.push(r.get::<_, String>(0)?);
            Ok(())
        })?;
        let has_meta: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta')",
            [],
            |r| r.get(0),
        )?;
        let controller_key = if has_meta {
            use rusqlite::OptionalExtension;
            conn.query_row(
                "SELECT value FROM meta WHERE key = 'controller_key'",
                [],
                |r| r.get(0),
            )
            .optional()?
        } else {
            None
        };
        Ok(FileCheck {
            schema_version,
            integrity,
            controller_key,
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
        if version > MIGRATIONS.len() {
            return Err(StoreError::Schema(format!(
                "the database is at version {version}, this binary knows {}: \
                 use the newer binary",
                MIGRATIONS.len()
            )));
        }
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version) {
            tx.execute_batch(m)?;
            if i == AUDIT_CHAIN_MIGRATION {
                chain_existing_audit(&mut SqliteConn(&tx))?;
            }
            tx.pragma_update(None, "user_version", i + 1)?;
        }
        tx.commit()?;
        Ok(Self::on(Sqlite {
            conn: Mutex::new(conn),
        }))
    }

    /// The connection itself, for tests that write behind the store's back.
    #[cfg(test)]
    pub(crate) fn raw(&self) -> MutexGuard<'_, Connection> {
        self.db.lock()
    }
}

/// Creates `path` if missing, and makes it 0600 either way.
fn private_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |e: std::io::Error| StoreError::Db(format!("{}: {e}", path.display()));
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)
}
