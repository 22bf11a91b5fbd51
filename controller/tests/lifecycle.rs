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
use ztmesh_controller::mesh::{DeviceClaim, Mesh, MeshConfig, Update, UserUpdate};
use ztmesh_controller::roles::Role;
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
    enroll_with(m, &machine, &wg, key, host, now)
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
        tagged_key_ttl_ms: 60_000,
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
    m.create_user("admin", "alice@example.com", Role::Member, T0)
        .unwrap();
    m.create_user("admin", "mallory@example.com", Role::Member, T0)
        .unwrap();
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
        .create_key("admin", KeyDetail::api("ci", Role::Admin), None, T0)
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
        m.check_api_key(&api_text, T0).unwrap().name,
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
            row("admin", "apikey.create", &p, "role=admin ci"),
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
        .create_key("admin", KeyDetail::api("ci", Role::Admin), None, T0)
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
        .create_key("admin", KeyDetail::api("ci", Role::Admin), Some(60_000), T0)
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
        KeyDetail::api("x", Role::Admin),
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
    assert!(m
        .create_user("admin", "bob'--@example.com", Role::Member, T0)
        .is_err());
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
        ..Default::default()
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

fn enroll_with(
    m: &Mesh,
    machine: &SigningKey,
    wg: &WgPrivateKey,
    key: &str,
    host: &str,
    now: i64,
) -> Result<pb::EnrollResponse, Error> {
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

const DAY: i64 = 86_400_000;

/// Sessions expire on the controller's clock: a user's device gets the
/// default lifetime (or the user's own), drops out of every map when it
/// passes, and the same person signing in again brings the same node back
/// (same id and addresses). Another person cannot take it over.
#[test]
fn a_signed_in_device_expires_and_its_owner_re_authenticates_it() {
    let m = mesh(MeshConfig::default());
    m.set_policy(
        "admin",
        "p.hujson",
        r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}"#,
        T0,
    )
    .unwrap();
    m.create_user("admin", "alice@example.com", Role::Member, T0)
        .unwrap();
    m.create_user("admin", "bob@example.com", Role::Member, T0)
        .unwrap();
    let claim = |i: u8| DeviceClaim {
        machine_key: *SigningKey::generate(&mut OsRng).public().as_bytes(),
        wg_key: [i; 32],
        hostname: format!("laptop{i}"),
    };
    let laptop = claim(7);
    let first = m.enroll_device("alice@example.com", &laptop, T0).unwrap();
    assert!(!first.reauth);
    assert_eq!(first.node.expiry_ms, T0 + 30 * DAY, "the default: 30 days");
    assert_eq!(first.node.user.as_deref(), Some("alice@example.com"));
    // Bob's device joined a day later: it outlives alice's.
    let other = m
        .enroll_device("bob@example.com", &claim(8), T0 + DAY)
        .unwrap();
    assert_eq!(m.netmap(other.node.id, T0 + DAY).unwrap().peers.len(), 1);

    // Expired: out of bob's map, and its own map is gone.
    let after = T0 + 30 * DAY;
    m.tick(after);
    assert!(m.netmap(first.node.id, after).is_none());
    let expired = m.store().audit_log(10).unwrap();
    assert!(
        expired
            .iter()
            .any(|a| a.action == "node.key-expired" && a.target == first.node.name),
        "the expiry is audited: {expired:?}"
    );
    assert!(m.netmap(other.node.id, after).unwrap().peers.is_empty());

    // Bob cannot sign alice's machine in as his.
    let e = m
        .enroll_device("bob@example.com", &laptop, after)
        .unwrap_err();
    assert!(matches!(e, Error::Forbidden(_)), "{e}");
    // A different WireGuard key under the same machine key is refused.
    let swapped = DeviceClaim {
        wg_key: [9; 32],
        ..laptop.clone()
    };
    let e = m
        .enroll_device("alice@example.com", &swapped, after)
        .unwrap_err();
    assert!(matches!(e, Error::Conflict(_)), "{e}");

    // Alice signs in again, with a per-user lifetime of 7 days now.
    m.update_user(
        "admin",
        "alice@example.com",
        &UserUpdate {
            key_expiry_ms: Some(Some(7 * DAY)),
            ..UserUpdate::default()
        },
        &mut OsRng,
        after,
    )
    .unwrap();
    let again = m
        .enroll_device("alice@example.com", &laptop, after)
        .unwrap();
    assert!(again.reauth);
    assert_eq!(again.node.id, first.node.id);
    assert_eq!(
        (again.node.ipv4, again.node.ipv6),
        (first.node.ipv4, first.node.ipv6)
    );
    assert_eq!(again.node.expiry_ms, after + 7 * DAY);
    assert_eq!(m.netmap(other.node.id, after).unwrap().peers.len(), 1);

    // An admin's expiry is lifted by the next sign-in too.
    m.expire_node("admin", &first.node.name, after + 1).unwrap();
    assert!(m.netmap(first.node.id, after + 1).is_none());
    m.enroll_device("alice@example.com", &laptop, after + 2)
        .unwrap();
    assert!(m.netmap(first.node.id, after + 2).is_some());
    let actions: Vec<String> = m
        .store()
        .audit_log(100)
        .unwrap()
        .into_iter()
        .map(|a| a.action)
        .collect();
    assert!(actions.iter().filter(|a| *a == "node.reauth").count() >= 2);
}

/// A tagged server re-authenticates with an auth key that grants exactly
/// what it is; a key for other tags, or for a user, cannot take it over.
#[test]
fn an_auth_key_re_authenticates_only_the_node_it_could_have_enrolled() {
    let m = mesh(MeshConfig {
        tagged_key_ttl_ms: DAY,
        ..MeshConfig::default()
    });
    m.set_policy("admin", "p.hujson", POLICY, T0).unwrap();
    let machine = SigningKey::generate(&mut OsRng);
    let wg = WgPrivateKey::generate(&mut OsRng);
    let web = m
        .create_key(
            "admin",
            KeyDetail::auth(None, &["tag:web".into()], true, false),
            Some(10 * DAY),
            T0,
        )
        .unwrap()
        .1;
    let first = enroll_with(&m, &machine, &wg, &web, "web", T0).unwrap();
    assert_eq!(first.key_expiry_ms, T0 + DAY);
    let later = T0 + DAY + 1;
    m.tick(later);
    assert!(m.netmap(first.node_id, later).is_none(), "expired");

    let db = m
        .create_key(
            "admin",
            KeyDetail::auth(None, &["tag:db".into()], false, false),
            Some(10 * DAY),
            T0,
        )
        .unwrap()
        .1;
    let e = enroll_with(&m, &machine, &wg, &db, "web", later).unwrap_err();
    assert!(e.to_string().contains("another owner or other tags"), "{e}");
    let again = enroll_with(&m, &machine, &wg, &web, "web", later).unwrap();
    assert_eq!(again.node_id, first.node_id);
    assert_eq!(again.addresses, first.addresses);
    assert_eq!(again.key_expiry_ms, later + DAY);
    assert!(m.netmap(first.node_id, later).is_some());
    // Another WireGuard key under this machine key: refused.
    let e = enroll_with(
        &m,
        &machine,
        &WgPrivateKey::generate(&mut OsRng),
        &web,
        "web",
        later,
    )
    .unwrap_err();
    assert!(matches!(e, Error::Conflict(_)), "{e}");
}

/// Tagged servers can be exempt from expiry when the admin says so, for
/// all tags or per tag (the shortest of a node's overrides wins).
#[test]
fn tagged_nodes_never_expire_when_configured_so() {
    let m = mesh(MeshConfig {
        tagged_key_ttl_ms: 0,
        ..MeshConfig::default()
    });
    m.set_policy("admin", "p.hujson", POLICY, T0).unwrap();
    let n = enroll(&m, &tag_key(&m, "tag:db", false, false), "db", T0).unwrap();
    assert_eq!(n.key_expiry_ms, 0);

    let m = mesh(MeshConfig {
        tag_key_ttl_ms: [("tag:db".to_string(), 0), ("tag:web".to_string(), DAY)]
            .into_iter()
            .collect(),
        ..MeshConfig::default()
    });
    m.set_policy("admin", "p.hujson", POLICY, T0).unwrap();
    let db = enroll(&m, &tag_key(&m, "tag:db", false, false), "db", T0).unwrap();
    assert_eq!(db.key_expiry_ms, 0, "tag:db never expires");
    let web = enroll(&m, &tag_key(&m, "tag:web", false, false), "web", T0).unwrap();
    assert_eq!(web.key_expiry_ms, T0 + DAY);
    let both = m
        .create_key(
            "admin",
            KeyDetail::auth(None, &["tag:db".into(), "tag:web".into()], false, false),
            None,
            T0,
        )
        .unwrap()
        .1;
    let n = enroll(&m, &both, "both", T0).unwrap();
    assert_eq!(n.key_expiry_ms, T0 + DAY, "the shortest override wins");
}

/// SSO links a person to a user once, by verified email, and never takes
/// over a built-in account (an admin opts it in by removing its password);
/// mixed-case logins are refused (sign-in compares lowercase).
#[test]
fn sso_links_by_verified_email_but_never_takes_over_a_built_in_account() {
    let m = mesh(MeshConfig::default());
    m.create_user("admin", "boss@example.com", Role::Admin, T0)
        .unwrap();
    m.update_user(
        "admin",
        "boss@example.com",
        &UserUpdate {
            password: Some(Some("a long admin password".into())),
            ..UserUpdate::default()
        },
        &mut OsRng,
        T0,
    )
    .unwrap();
    let iss = "https://idp.example.com";
    let e = m
        .sso_user(iss, "attacker", Some("boss@example.com"), true, T0)
        .unwrap_err();
    assert!(matches!(e, Error::Forbidden(_)), "{e}");
    assert!(m.store().identities("boss@example.com").unwrap().is_empty());

    // Unknown user: created (as a member) only when allowed.
    assert!(m
        .sso_user(iss, "s1", Some("new@example.com"), false, T0)
        .is_err());
    let u = m
        .sso_user(iss, "s1", Some("new@example.com"), true, T0)
        .unwrap();
    assert_eq!(u.role, Role::Member);
    // Linked for good: the subject finds the user even with another email.
    let again = m
        .sso_user(iss, "s1", Some("other@example.com"), true, T0)
        .unwrap();
    assert_eq!(again.login, "new@example.com");
    let stamp = m.credential_stamp("new@example.com").unwrap();
    m.update_user(
        "admin",
        "new@example.com",
        &UserUpdate {
            unlink_sso: true,
            ..UserUpdate::default()
        },
        &mut OsRng,
        T0,
    )
    .unwrap();
    assert_ne!(
        m.credential_stamp("new@example.com").unwrap(),
        stamp,
        "unlinking ends the SSO sessions"
    );
    assert!(
        m.sso_user(iss, "s1", None, true, T0).is_err(),
        "no email: no link"
    );

    let e = m
        .create_user("admin", "Bob@example.com", Role::Member, T0)
        .unwrap_err();
    assert!(e.to_string().contains("lowercase"), "{e}");
}
