//! The tamper-evident audit log on a real SQLite file: rows written through
//! the mesh, then the file changed behind the controller's back with
//! rusqlite (a row altered, deleted, two rows swapped, the last rows cut):
//! verification names the row; untouched, and after pruning, it passes.
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::Connection;
use ztmesh_controller::auditchain::ChainError;
use ztmesh_controller::mesh::{Mesh, MeshConfig};
use ztmesh_controller::roles::Role;
use ztmesh_controller::store::{SqliteStore, Store};
use ztmesh_proto::keys::SigningKey;

const T0: i64 = 1_750_000_000_000;
const DAY: i64 = 86_400_000;

/// A data dir with a controller key and a database of `rows` audit rows
/// (users u1.. created one second apart), the head signed after the first
/// `signed` of them.
struct Fixture {
    _dir: tempfile::TempDir,
    db: PathBuf,
    key: PathBuf,
}

impl Fixture {
    fn new(rows: u64, signed: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("ztmesh.db");
        let key = dir.path().join("controller.key");
        SigningKey::load_or_generate(&key).unwrap();
        let m = mesh(&db, &key, MeshConfig::default());
        for i in 1..=rows {
            let now = T0 + i as i64 * 1000;
            m.create_user(
                "local-admin",
                &format!("u{i}@example.com"),
                Role::Member,
                now,
            )
            .unwrap();
            if i == signed {
                m.sign_audit_head(now);
            }
        }
        Self { _dir: dir, db, key }
    }

    /// Changes the file directly, as someone with write access would.
    fn tamper(&self, sql: &str) {
        Connection::open(&self.db)
            .unwrap()
            .execute_batch(sql)
            .unwrap();
    }

    /// Verifies offline, read-only, with the data dir's key.
    fn verify(&self) -> Result<ztmesh_controller::auditchain::Verified, ChainError> {
        let key = SigningKey::load(&self.key).unwrap().public();
        SqliteStore::open_read_only(&self.db)
            .unwrap()
            .verify_audit(&key)
            .unwrap()
    }
}

fn mesh(db: &Path, key: &Path, cfg: MeshConfig) -> Mesh {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(db).unwrap());
    Mesh::load(
        store,
        SigningKey::load(key).unwrap(),
        [7; 32],
        "fd00:1:2::/48".parse().unwrap(),
        cfg,
        T0,
    )
    .unwrap()
}

#[test]
fn an_untouched_log_verifies_with_its_signed_head() {
    let f = Fixture::new(8, 8);
    let v = f.verify().unwrap();
    assert_eq!(v.rows, 8);
    assert_eq!(v.signed_head.map(|(id, _)| id), Some(8));
    assert_eq!(v.unsigned_rows, 0);
}

#[test]
fn a_changed_row_is_named_altered() {
    let f = Fixture::new(8, 8);
    f.tamper("UPDATE audit SET detail = 'role=admin' WHERE id = 3");
    let e = f.verify().unwrap_err();
    assert_eq!(e, ChainError::Altered { id: 3 });
    assert!(e.to_string().starts_with("row #3: altered"), "{e}");
}

#[test]
fn a_deleted_row_is_named_missing() {
    let f = Fixture::new(8, 8);
    f.tamper("DELETE FROM audit WHERE id = 4");
    assert_eq!(
        f.verify().unwrap_err(),
        ChainError::Missing { first: 4, last: 4 }
    );
}

#[test]
fn two_swapped_rows_are_named_reordered() {
    let f = Fixture::new(8, 8);
    f.tamper(
        "CREATE TEMP TABLE t AS SELECT * FROM audit WHERE id IN (2, 6);
         UPDATE audit SET (time_ms, actor, action, target, detail) =
             (SELECT time_ms, actor, action, target, detail FROM t WHERE t.id = 8 - audit.id)
         WHERE id IN (2, 6);",
    );
    let e = f.verify().unwrap_err();
    assert_eq!(e, ChainError::Reordered { id: 2, from: 6 });
    assert_eq!(e.kind(), "reordered");
}

#[test]
fn cut_last_rows_are_named_against_the_signed_head() {
    let f = Fixture::new(8, 8);
    f.tamper("DELETE FROM audit WHERE id > 5");
    let e = f.verify().unwrap_err();
    assert_eq!(e.row(), 6, "{e}");
    assert_eq!(e.kind(), "missing");
    // Covering tracks by rewinding the recorded head does not help: the
    // signature names row #8.
    f.tamper("UPDATE audit_head SET id = 5, hash = (SELECT hash FROM audit WHERE id = 5)");
    assert!(matches!(
        f.verify().unwrap_err(),
        ChainError::Truncated {
            first: 6,
            head: 8,
            signed_ms: Some(_)
        }
    ));
}

#[test]
fn unsigned_rows_cut_are_named_by_the_recorded_head_and_signing_catches_up() {
    let f = Fixture::new(8, 5);
    assert_eq!(f.verify().unwrap().unsigned_rows, 3);
    f.tamper("DELETE FROM audit WHERE id > 6");
    assert_eq!(f.verify().unwrap_err().row(), 7);
}

#[test]
fn pruning_keeps_the_chain_verifiable_and_tampering_still_shows() {
    let f = Fixture::new(8, 8);
    // Flow rows interleaved with admin rows, capped from the oldest.
    let m = mesh(
        &f.db,
        &f.key,
        MeshConfig {
            audit_max_age_ms: DAY,
            audit_max_flow_rows: 2,
            ..MeshConfig::default()
        },
    );
    let store = SqliteStore::open(&f.db).unwrap();
    for i in 0..6 {
        store
            .audit(T0 + DAY + i, "node:web", "flow.denied", "f", &i.to_string())
            .unwrap();
        m.create_user(
            "local-admin",
            &format!("v{i}@example.com"),
            Role::Member,
            T0 + DAY + i,
        )
        .unwrap();
    }
    // Everything from the first day goes (rows 1..8), and the four oldest
    // flow rows from the middle of the chain.
    m.prune_audit(T0 + DAY + 10 * 1000);
    let log = store.audit_log(100).unwrap();
    assert_eq!(log.len(), 6 + 2);
    let v = f.verify().unwrap();
    assert_eq!(v.rows, 8);
    assert!(v.gaps >= 2, "{v:?}");
    assert_eq!(v.unsigned_rows, 0, "pruning signs the head");

    // A second prune over the first one's gaps still verifies.
    m.prune_audit(T0 + 2 * DAY + 10_000);
    assert!(store.audit_log(100).unwrap().is_empty());
    let v = f.verify().unwrap();
    assert_eq!(v.rows, 0);
    m.create_user("local-admin", "w@example.com", Role::Member, T0 + 3 * DAY)
        .unwrap();
    m.sign_audit_head(T0 + 3 * DAY);
    assert_eq!(f.verify().unwrap().rows, 1);

    // A deletion next to a signed gap is not excused by it.
    m.create_user(
        "local-admin",
        "x@example.com",
        Role::Member,
        T0 + 3 * DAY + 1,
    )
    .unwrap();
    m.sign_audit_head(T0 + 3 * DAY + 1);
    let first: u64 = Connection::open(&f.db)
        .unwrap()
        .query_row("SELECT MIN(id) FROM audit", [], |r| r.get(0))
        .unwrap();
    f.tamper(&format!("DELETE FROM audit WHERE id = {first}"));
    assert_eq!(f.verify().unwrap_err().row(), first);
}

#[test]
fn pruning_refuses_to_vouch_for_a_tampered_range() {
    let f = Fixture::new(8, 8);
    f.tamper("DELETE FROM audit WHERE id = 4");
    // Rows 1..=5 are old enough, but row 4 is already gone without a
    // trace: nothing is pruned, so no signed gap excuses the deletion.
    let store = SqliteStore::open(&f.db).unwrap();
    let key = SigningKey::load(&f.key).unwrap();
    let e = store.prune_audit(T0 + 5500, 0, T0 + DAY, &key).unwrap_err();
    assert!(
        e.to_string()
            .contains("audit chain broken at row #4: missing"),
        "{e}"
    );
    assert_eq!(store.audit_log(100).unwrap().len(), 7);
    assert_eq!(f.verify().unwrap_err().row(), 4);
}

#[test]
fn a_database_from_before_the_chain_is_chained_at_migration() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ztmesh.db");
    let key_file = dir.path().join("controller.key");
    let key = SigningKey::load_or_generate(&key_file).unwrap();
    let store = SqliteStore::open(&db).unwrap();
    store.audit(T0, "a", "user.create", "u1", "").unwrap();
    drop(store);
    // Back to schema 7, as if these rows predated the chain, with a hole
    // left by an old prune; reopening runs the chain migration over them.
    Connection::open(&db)
        .unwrap()
        .execute_batch(
            "DROP TABLE detections; ALTER TABLE nodes DROP COLUMN quarantined_ms;
             ALTER TABLE nodes DROP COLUMN quarantine_reason;
             DROP TABLE flows; DROP TABLE audit_head; DROP TABLE audit_checkpoints;
             ALTER TABLE audit DROP COLUMN prev_hash; ALTER TABLE audit DROP COLUMN hash;
             INSERT INTO audit (id, time_ms, actor, action, target, detail)
                 VALUES (3, 1, 'a', 'user.create', 'u3', '');
             PRAGMA user_version = 7;",
        )
        .unwrap();
    let store = SqliteStore::open(&db).unwrap();
    let v = store.verify_audit(&key.public()).unwrap().unwrap();
    assert_eq!(v.rows, 2);
    assert_eq!(v.last_id, 3);
    store.audit(T0, "a", "user.create", "u4", "").unwrap();
    assert_eq!(store.sign_audit_head(T0, &key).unwrap(), Some(4));
    assert!(store.verify_audit(&key.public()).unwrap().is_ok());
}
