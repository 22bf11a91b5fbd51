//! Node lifecycle on the controller's pure core (`Mesh` on an in-memory
//! store, virtual time): ephemeral nodes, key expiry, tag ownership, rate
//! limiting. No sockets and no clock: `now` is an argument everywhere.
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

use std::sync::Arc;

use rand_core::OsRng;
use ztmesh_controller::error::Error;
use ztmesh_controller::mesh::{Mesh, MeshConfig, Update};
use ztmesh_controller::secrets::{KeyDetail, SecretKind};
use ztmesh_controller::store::{SqliteStore, Store};
use ztmesh_proto::auth;
use ztmesh_proto::control as pb;
use ztmesh_proto::keys::{SigningKey, WgPrivateKey};

const T0: i64 = 1_800_000_000_000;
const FP: [u8; 32] = [7; 32];

const POLICY: &str = r#"{
  "groups": {"group:eng": ["alice@example.com"]},
  "tagOwners": {"tag:web": ["group:eng"], "tag:db": []},
  "acls": [{"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"]}],
}"#;

fn mesh(cfg: MeshConfig) -> Mesh {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().unwrap());
    Mesh::load(
        store,
        SigningKey::generate(&mut OsRng),
        FP,
        Mesh::random_ula(),
        cfg,
        T0,
    )
    .unwrap()
}

/// A fresh auth key for `tag`, issued at `T0`.
fn tag_key(m: &Mesh, tag: &str, reusable: bool, ephemeral: bool) -> String {
    m.create_key(
        "admin",
        KeyDetail::auth(None, &[tag.into()], reusable, ephemeral),
        None,
        T0,
    )
    .unwrap()
    .1
}

fn enroll(m: &Mesh, key: &str, host: &str, now: i64) -> Result<pb::EnrollResponse, Error> {
    let machine = SigningKey::generate(&mut OsRng);
    let wg = WgPrivateKey::generate(&mut OsRng);
    let mk = machine.public().as_bytes().to_vec();
    let wk = wg.public().as_bytes().to_vec();
    let proof = machine
        .sign(&auth::enroll_message(key, &mk, &wk, host, now))
        .to_vec();
    m.enroll(
        &pb::EnrollRequest {
            auth_key: key.into(),
            machine_key: mk,
            wg_key: wk,
            hostname: host.into(),
            timestamp_ms: now,
            proof,
        },
        now,
    )
}

#[test]
fn ephemeral_nodes_are_deleted_after_the_offline_timeout() {
    let m = mesh(MeshConfig {
        ephemeral_timeout_ms: 5 * 60_000,
        ..MeshConfig::default()
    });
    m.set_policy("admin", "p.hujson", POLICY, T0).unwrap();
    let eph = tag_key(&m, "tag:web", true, true);
    let db = tag_key(&m, "tag:db", false, false);
    let e = enroll(&m, &eph, "runner", T0).unwrap();
    let d = enroll(&m, &db, "db", T0).unwrap();
    let (_conn, mut rx) = m.subscribe(d.node_id, T0).unwrap();
    rx.borrow_and_update();

    m.tick(T0 + 4 * 60_000);
    assert!(m.find_node(&e.name).is_ok(), "still within the timeout");
    m.tick(T0 + 5 * 60_000 + 1);
    assert!(m.find_node(&e.name).is_err(), "deleted after 5 min offline");
    assert!(m.store().nodes().unwrap().iter().all(|n| n.id != e.node_id));
    // The db node's peer set lost it, and it was told.
    assert!(rx.has_changed().unwrap());
    let Update::Map(signed) = rx.borrow_and_update().clone() else {
        panic!("expected a map");
    };
    let map = ztmesh_proto::netmap::verify_signature(&m.controller_key(), &signed).unwrap();
    assert!(map.peers.is_empty());
    // The non-ephemeral node is never deleted for being offline.
    m.tick(T0 + 24 * 3_600_000);
    assert!(m.find_node(&d.name).is_ok());
}

#[test]
fn connected_ephemeral_nodes_are_kept() {
    let m = mesh(MeshConfig::default());
    let eph = tag_key(&m, "tag:web", false, true);
    let e = enroll(&m, &eph, "runner", T0).unwrap();
    let _sub = m.subscribe(e.node_id, T0).unwrap();
    m.tick(T0 + 3_600_000);
    assert!(m.find_node(&e.name).is_ok());
}

#[test]
fn expired_nodes_are_refused_and_dropped_from_peer_maps() {
    let m = mesh(MeshConfig {
        node_key_ttl_ms: 60_000,
        ..MeshConfig::default()
    });
    m.set_policy("admin", "p.hujson", POLICY, T0).unwrap();
    let web = tag_key(&m, "tag:web", false, false);
    let db = tag_key(&m, "tag:db", false, false);
    let w = enroll(&m, &web, "web", T0).unwrap();
    let d = enroll(&m, &db, "db", T0 + 30_000).unwrap();
    assert_eq!(m.netmap(d.node_id, T0 + 30_000).unwrap().peers.len(), 1);
    // web's map never outlives its key.
    assert_eq!(m.netmap(w.node_id, T0).unwrap().not_after_ms, T0 + 60_000);
    m.tick(T0 + 60_000);
    assert!(m.netmap(w.node_id, T0 + 60_000).is_none());
    assert!(m.netmap(d.node_id, T0 + 60_000).unwrap().peers.is_empty());
}

#[test]
fn user_keys_may_only_carry_tags_the_user_owns() {
    let m = mesh(MeshConfig::default());
    m.set_policy("admin", "p.hujson", POLICY, T0).unwrap();
    m.create_user("admin", "alice@example.com", T0).unwrap();
    m.create_user("admin", "mallory@example.com", T0).unwrap();
    m.create_key(
        "admin",
        KeyDetail::auth(Some("alice@example.com"), &["tag:web".into()], false, false),
        None,
        T0,
    )
    .unwrap();
    let e = m
        .create_key(
            "admin",
            KeyDetail::auth(
                Some("mallory@example.com"),
                &["tag:web".into()],
                false,
                false,
            ),
            None,
            T0,
        )
        .unwrap_err();
    assert!(matches!(e, Error::Forbidden(_)), "{e}");
    let e = m
        .create_key(
            "admin",
            KeyDetail::auth(Some("alice@example.com"), &["tag:db".into()], false, false),
            None,
            T0,
        )
        .unwrap_err();
    assert!(matches!(e, Error::Forbidden(_)), "{e}");
    let e = m
        .create_key(
            "admin",
            KeyDetail::auth(None, &["web".into()], false, false),
            None,
            T0,
        )
        .unwrap_err();
    assert!(matches!(e, Error::Invalid(_)), "{e}");
    let e = m
        .create_key("admin", KeyDetail::auth(None, &[], false, false), None, T0)
        .unwrap_err();
    assert!(matches!(e, Error::Invalid(_)), "{e}");
}

/// The parts of a key text: `[prefix, key id, secret, (fingerprint)]`.
fn parts(text: &str) -> Vec<String> {
    text.split('.').map(str::to_string).collect()
}

#[test]
fn auth_keys_and_api_keys_share_one_lifecycle_and_keep_their_audit_names() {
    let m = mesh(MeshConfig::default());
    let (auth_row, auth_text) = m
        .create_key(
            "admin",
            KeyDetail::auth(None, &["tag:web".into(), "tag:web".into()], true, false),
            None,
            T0,
        )
        .unwrap();
    let (api_row, api_text) = m
        .create_key("admin", KeyDetail::api("ci"), None, T0)
        .unwrap();
    assert_eq!(
        auth_row.expires_ms,
        T0 + MeshConfig::default().auth_key_ttl_ms
    );
    assert_eq!(api_row.expires_ms, T0 + 90 * 24 * 3_600_000);
    assert_eq!(
        auth_row.detail,
        KeyDetail::auth(None, &["tag:web".into()], true, false),
        "tags deduplicated"
    );
    assert_eq!(m.keys(SecretKind::AuthKey).unwrap(), vec![auth_row.clone()]);
    assert_eq!(m.keys(SecretKind::ApiKey).unwrap(), vec![api_row.clone()]);

    let n = enroll(&m, &auth_text, "web", T0).unwrap();
    assert_eq!(
        m.check_api_key(&api_text, T0).unwrap(),
        format!("apikey:{}", api_row.key_id)
    );
    // Revoking names the kind: a key id of the other kind is not found.
    let e = m
        .revoke_key("admin", SecretKind::ApiKey, &auth_row.key_id, T0)
        .unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e}");
    m.revoke_key("admin", SecretKind::AuthKey, &auth_row.key_id, T0)
        .unwrap();
    m.revoke_key("admin", SecretKind::ApiKey, &api_row.key_id, T0)
        .unwrap();
    assert_eq!(
        enroll(&m, &auth_text, "web2", T0).unwrap_err().to_string(),
        "auth key was revoked"
    );
    assert_eq!(
        m.check_api_key(&api_text, T0).unwrap_err().to_string(),
        "API key was revoked"
    );

    let mut audit: Vec<_> = m
        .store()
        .audit_log(100)
        .unwrap()
        .into_iter()
        .map(|a| (a.actor, a.action, a.target, a.detail))
        .collect();
    audit.reverse();
    let (a, p) = (auth_row.key_id.clone(), api_row.key_id.clone());
    let row = |actor: &str, action: &str, target: &str, detail: &str| {
        (actor.into(), action.into(), target.into(), detail.into())
    };
    assert_eq!(
        audit,
        vec![
            row(
                "admin",
                "authkey.create",
                &a,
                "user=- tags=tag:web reusable=true ephemeral=false"
            ),
            row("admin", "apikey.create", &p, "ci"),
            row(
                &format!("authkey:{a}"),
                "node.enroll",
                &n.name,
                &format!(
                    "id={} ipv4={} ipv6={}",
                    n.node_id, n.addresses[0], n.addresses[1]
                )
            ),
            row("admin", "authkey.revoke", &a, ""),
            row("admin", "apikey.revoke", &p, ""),
        ]
    );
}

#[test]
fn a_key_of_one_kind_never_passes_as_the_other() {
    let m = mesh(MeshConfig::default());
    let auth_text = tag_key(&m, "tag:web", true, false);
    let (_, api_text) = m
        .create_key("admin", KeyDetail::api("ci"), None, T0)
        .unwrap();
    // As they are: the wrong format for the other use.
    assert_eq!(
        enroll(&m, &api_text, "x", T0).unwrap_err().to_string(),
        "malformed auth key"
    );
    assert_eq!(
        m.check_api_key(&auth_text, T0).unwrap_err().to_string(),
        "malformed API key"
    );
    // Rewrapped in the other format, with the right id and secret: unknown.
    let api = parts(&api_text);
    let as_auth = format!(
        "{}.{}.{}.{}",
        auth::AUTH_KEY_PREFIX,
        api[1],
        api[2],
        auth::hex(&FP)
    );
    assert_eq!(
        enroll(&m, &as_auth, "x", T0).unwrap_err().to_string(),
        "unknown auth key"
    );
    let a = parts(&auth_text);
    let as_api = format!("{}.{}.{}", auth::API_KEY_PREFIX, a[1], a[2]);
    assert_eq!(
        m.check_api_key(&as_api, T0).unwrap_err().to_string(),
        "unknown API key"
    );
    assert!(m.store().nodes().unwrap().is_empty());
}

#[test]
fn api_keys_expire_and_refuse_wrong_secrets() {
    let m = mesh(MeshConfig::default());
    let (row, text) = m
        .create_key("admin", KeyDetail::api("ci"), Some(60_000), T0)
        .unwrap();
    assert!(m.check_api_key(&text, T0 + 59_999).is_ok());
    assert_eq!(
        m.check_api_key(&text, T0 + 60_000).unwrap_err().to_string(),
        "API key has expired"
    );
    let mut p = parts(&text);
    p[2] = "A".repeat(p[2].len()); // another secret, same id
    assert_eq!(
        m.check_api_key(&p.join("."), T0).unwrap_err().to_string(),
        "unknown API key"
    );
    // Lifetimes are bounded the same for both kinds.
    for detail in [
        KeyDetail::api("x"),
        KeyDetail::auth(None, &["tag:web".into()], false, false),
    ] {
        let e = m
            .create_key("admin", detail, Some(11 * 365 * 24 * 3_600_000), T0)
            .unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e}");
    }
    assert_eq!(m.keys(SecretKind::ApiKey).unwrap(), vec![row]);
}

#[test]
fn repeated_failures_from_one_source_are_rate_limited() {
    let m = ztmesh_controller::ratelimit::SharedLimiter::default();
    let src = Some("198.18.0.66".parse().unwrap());
    for _ in 0..10 {
        m.check(src, T0).unwrap();
        m.record_failure(src, T0);
    }
    assert!(matches!(m.check(src, T0 + 1), Err(Error::RateLimited)));
    assert!(m
        .check(Some("198.18.0.67".parse().unwrap()), T0 + 1)
        .is_ok());
    assert!(m.check(src, T0 + 60_001).is_ok());
}

#[test]
fn hostile_names_are_sanitized_or_refused() {
    let m = mesh(MeshConfig::default());
    let k = tag_key(&m, "tag:web", true, false);
    let n = enroll(&m, &k, "x'; DROP TABLE nodes;--\n\u{7}", T0).unwrap();
    assert_eq!(n.name, "x---drop-table-nodes");
    assert_eq!(m.store().nodes().unwrap().len(), 1);
    assert!(enroll(&m, &k, "", T0).is_err());
    assert!(enroll(&m, &k, &"a".repeat(300), T0).is_err());
    assert!(m.create_user("admin", "bob'--@example.com", T0).is_err());
    assert!(m.rename_node("admin", &n.name, "Bad Name", T0).is_err());
}

#[test]
fn serials_never_go_backwards_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    let key = || SigningKey::generate(&mut OsRng);
    let open = |now| {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
        Mesh::load(
            store,
            key(),
            FP,
            "fd00:1:2::/48".parse().unwrap(),
            MeshConfig::default(),
            now,
        )
        .unwrap()
    };
    let m = open(T0);
    let k = tag_key(&m, "tag:web", true, false);
    let n = enroll(&m, &k, "n", T0).unwrap();
    let _sub = m.subscribe(n.node_id, T0).unwrap();
    let before = m.serial();
    drop(m);
    // Restart with a clock that went backwards: serials still grow.
    let m = open(T0 - 3_600_000);
    let map = m.netmap(n.node_id, T0 - 3_600_000).unwrap();
    assert!(map.serial > before, "{} <= {before}", map.serial);
}

#[test]
fn denied_flow_reports_are_audited_with_bounded_rows_and_text() {
    use ztmesh_controller::mesh::MAX_FLOW_ROWS_PER_REPORT;
    let m = mesh(MeshConfig::default());
    let k = tag_key(&m, "tag:web", false, false);
    let n = enroll(&m, &k, "web", T0).unwrap();
    let node = m.find_node(&n.name).unwrap();
    let flow = |port: u32| pb::FlowSummary {
        src: "100.64.0.9\n".repeat(20),
        dst: "100.64.0.1".into(),
        protocol: 6,
        dst_port: port,
        allowed: false,
        reason: "no_rule".into(),
        packets: 2,
    };
    let flows: Vec<_> = (0..(MAX_FLOW_ROWS_PER_REPORT as u32 + 50))
        .map(flow)
        .collect();
    m.record_denied_flows(&node, &flows, T0);
    let log = m.store().audit_log(10_000).unwrap();
    let denied: Vec<_> = log.iter().filter(|a| a.action == "flow.denied").collect();
    assert_eq!(denied.len(), MAX_FLOW_ROWS_PER_REPORT + 1);
    assert!(denied.iter().all(|a| a.actor == "node:web"));
    assert!(denied
        .iter()
        .all(|a| !a.target.contains('\n') && a.target.len() < 100));
    assert!(denied
        .iter()
        .any(|a| a.detail == "50 more denied flows, 100 packets"));
}
