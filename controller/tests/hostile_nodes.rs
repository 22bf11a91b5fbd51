//! Hostile enrolled nodes and lifecycle robustness on the controller's pure
//! core (`Mesh` on SQLite, virtual time): endpoint validation, weak keys,
//! duplicate sessions, flow-report arithmetic, audit pruning, restarts and
//! clock jumps. No sockets and no clock: `now` is an argument everywhere.
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

use std::sync::Arc;

use rand_core::OsRng;
use ztmesh_controller::error::Error;
use ztmesh_controller::mesh::{Mesh, MeshConfig, Update};
use ztmesh_controller::roles::Role;
use ztmesh_controller::secrets::KeyDetail;
use ztmesh_controller::store::{SqliteStore, Store};
use ztmesh_proto::auth;
use ztmesh_proto::control as pb;
use ztmesh_proto::keys::{SigningKey, WgPrivateKey};
use ztmesh_proto::refusal::AuthReason;

const T0: i64 = 1_800_000_000_000;
const FP: [u8; 32] = [7; 32];
const MIN: i64 = 60_000;

const POLICY: &str = r#"{
  "tagOwners": {"tag:web": [], "tag:db": []},
  "acls": [{"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"]}],
}"#;

fn load(store: Arc<dyn Store>, cfg: MeshConfig, now: i64) -> Mesh {
    load_with(store, SigningKey::generate(&mut OsRng), cfg, now)
}

fn load_with(store: Arc<dyn Store>, signer: SigningKey, cfg: MeshConfig, now: i64) -> Mesh {
    Mesh::load(
        store,
        signer,
        FP,
        "fd00:1:2::/48".parse().unwrap(),
        cfg,
        now,
    )
    .unwrap()
}

fn mesh(cfg: MeshConfig) -> Mesh {
    load(Arc::new(SqliteStore::in_memory().unwrap()), cfg, T0)
}

fn request(
    key: &str,
    machine: &SigningKey,
    wg: [u8; 32],
    host: &str,
    ts: i64,
) -> pb::EnrollRequest {
    let mk = machine.public().as_bytes().to_vec();
    let wk = wg.to_vec();
    let proof = machine
        .sign(&auth::enroll_message(key, &mk, &wk, host, ts))
        .to_vec();
    pb::EnrollRequest {
        auth_key: key.into(),
        machine_key: mk,
        wg_key: wk,
        hostname: host.into(),
        timestamp_ms: ts,
        proof,
    }
}

fn enroll(m: &Mesh, key: &str, host: &str, now: i64) -> pb::EnrollResponse {
    let machine = SigningKey::generate(&mut OsRng);
    let wg = *WgPrivateKey::generate(&mut OsRng).public().as_bytes();
    m.enroll(&request(key, &machine, wg, host, now), now)
        .unwrap()
}

fn key(m: &Mesh, tag: &str, ephemeral: bool) -> String {
    m.create_key(
        "admin",
        KeyDetail::auth(None, &[tag.into()], true, ephemeral),
        None,
        T0,
    )
    .unwrap()
    .1
}

fn code(e: Error) -> (tonic::Code, String) {
    let s = tonic::Status::from(e);
    (s.code(), s.message().to_string())
}

// ---- endpoints -----------------------------------------------------------

#[test]
fn reported_endpoints_refuse_unroutable_addresses_and_port_zero_naming_the_entry() {
    let m = mesh(MeshConfig::default());
    let k = key(&m, "tag:web", false);
    let n = enroll(&m, &k, "web", T0);
    let bad = [
        "127.0.0.1:51820",
        "[::1]:51820",
        "0.0.0.0:51820",
        "[::]:51820",
        "224.0.0.1:51820",
        "[ff02::1]:51820",
        "169.254.10.1:51820",
        "255.255.255.255:51820",
        "198.18.0.1:0",
        "[::ffff:127.0.0.1]:51820",
        "[fe80::1]:51820",
    ];
    for b in bad {
        let e = m
            .report_endpoints(n.node_id, &["198.18.0.1:51820".into(), b.into()], T0)
            .unwrap_err();
        let (c, msg) = code(e);
        assert_eq!(c, tonic::Code::InvalidArgument, "{b}: {msg}");
        assert!(msg.contains(b), "{b}: message does not name it: {msg}");
    }
    assert!(
        m.find_node("web").unwrap().endpoints.is_empty(),
        "nothing stored"
    );
    let many: Vec<String> = (1..=17).map(|i| format!("198.18.0.{i}:51820")).collect();
    let (c, msg) = code(m.report_endpoints(n.node_id, &many, T0).unwrap_err());
    assert_eq!(c, tonic::Code::InvalidArgument);
    assert!(msg.contains("16"), "{msg}");
    m.report_endpoints(
        n.node_id,
        &["198.18.0.1:51820".into(), "[fd00::1]:51820".into()],
        T0,
    )
    .unwrap();
    assert_eq!(m.find_node("web").unwrap().endpoints.len(), 2);
}

#[test]
fn a_flapping_node_causes_at_most_one_republish_per_interval_and_the_latest_wins() {
    let m = mesh(MeshConfig {
        endpoint_publish_interval_ms: 5_000,
        ..MeshConfig::default()
    });
    m.set_policy("admin", "p.hujson", POLICY, T0).unwrap();
    let web = enroll(&m, &key(&m, "tag:web", false), "web", T0);
    let db = enroll(&m, &key(&m, "tag:db", false), "db", T0);
    let sub = m.open_stream(db.node_id, T0).unwrap();
    sub.take().unwrap();
    let before = m.maps_signed();
    // 100 reports within one second: one immediate republish, the rest coalesced.
    for i in 0..100i64 {
        let ep = format!("198.18.1.{}:{}", i % 200 + 1, 40_000 + i);
        m.report_endpoints(web.node_id, &[ep], T0 + i * 10).unwrap();
        m.tick(T0 + i * 10);
    }
    let during = m.maps_signed() - before;
    assert!(during <= 1, "{during} maps signed while flapping");
    // Once the interval has passed, the peer gets the latest value, once.
    m.tick(T0 + 5_000 + 990);
    m.tick(T0 + 5_000 + 995);
    assert_eq!(m.maps_signed() - before, 2);
    let map = sub.take().expect("the coalesced map");
    let map = ztmesh_proto::netmap::verify_signature(&m.controller_key(), &map).unwrap();
    assert_eq!(
        map.peers[0].endpoints,
        vec!["198.18.1.100:40099".to_string()]
    );
    assert_eq!(
        m.find_node("web").unwrap().endpoints,
        vec!["198.18.1.100:40099".to_string()]
    );
}

#[test]
fn per_node_call_limits_refuse_bursts_with_a_precise_message_and_recover() {
    use ztmesh_controller::nodelimit::Call;
    let m = mesh(MeshConfig::default());
    let a = enroll(&m, &key(&m, "tag:web", false), "a", T0);
    let b = enroll(&m, &key(&m, "tag:web", false), "b", T0);
    for call in [Call::ReportEndpoints, Call::ReportFlows, Call::StreamOpen] {
        let mut refused = None;
        for i in 0..1_000 {
            if let Err(e) = m.throttle(a.node_id, call, T0) {
                refused = Some((i, e));
                break;
            }
        }
        let (n, e) = refused.expect("a burst is refused");
        assert!(
            (5..=60).contains(&n),
            "{call:?}: {n} calls allowed in a burst"
        );
        let (c, msg) = code(e);
        assert_eq!(c, tonic::Code::ResourceExhausted);
        assert!(msg.contains(call.name()) && msg.contains("retry"), "{msg}");
        // Another node is not affected; the node recovers with time.
        m.throttle(b.node_id, call, T0).unwrap();
        m.throttle(a.node_id, call, T0 + 60_000).unwrap();
    }
}

// ---- keys ---------------------------------------------------------------

/// Small-order x25519 points (RFC 7748 §6.1 / libsodium's list), with and
/// without the ignored top bit.
fn small_order_x25519() -> Vec<[u8; 32]> {
    let mut v = vec![[0u8; 32]];
    let mut one = [0u8; 32];
    one[0] = 1;
    v.push(one);
    v.push([
        0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4,
        0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49,
        0xb8, 0x00,
    ]);
    v.push([
        0x5f, 0x9c, 0x95, 0xbc, 0xa3, 0x50, 0x8c, 0x24, 0xb1, 0xd0, 0xb1, 0x55, 0x9c, 0x83, 0xef,
        0x5b, 0x04, 0x44, 0x5c, 0xc4, 0x58, 0x1c, 0x8e, 0x86, 0xd8, 0x22, 0x4e, 0xdd, 0xd0, 0x9f,
        0x11, 0x57,
    ]);
    for low in [0xec, 0xed, 0xee] {
        // p - 1, p, p + 1
        let mut p = [0xffu8; 32];
        p[0] = low;
        p[31] = 0x7f;
        v.push(p);
    }
    let high: Vec<[u8; 32]> = v
        .iter()
        .map(|k| {
            let mut k = *k;
            k[31] |= 0x80;
            k
        })
        .collect();
    v.extend(high);
    v
}

#[test]
fn low_order_wireguard_keys_are_refused_at_enrollment() {
    let m = mesh(MeshConfig::default());
    let k = key(&m, "tag:web", true);
    for (i, wg) in small_order_x25519().into_iter().enumerate() {
        let machine = SigningKey::generate(&mut OsRng);
        let e = m
            .enroll(&request(&k, &machine, wg, &format!("n{i}"), T0), T0)
            .unwrap_err();
        let (c, msg) = code(e);
        assert_eq!(c, tonic::Code::InvalidArgument, "#{i}: {msg}");
        assert!(msg.contains("wg_key") && msg.contains("low-order"), "{msg}");
    }
    assert!(m.nodes().is_empty());
    enroll(&m, &k, "good", T0);
}

#[test]
fn weak_ed25519_machine_keys_are_refused_at_enrollment() {
    let m = mesh(MeshConfig::default());
    let k = key(&m, "tag:web", true);
    let wg = WgPrivateKey::generate(&mut OsRng);
    let mut identity = [0u8; 32];
    identity[0] = 1; // the neutral element, y = 1
    let mut order2 = [0xffu8; 32]; // y = -1
    order2[0] = 0xec;
    order2[31] = 0x7f;
    for weak in [identity, order2, [0u8; 32]] {
        let mut req = request(
            &k,
            &SigningKey::generate(&mut OsRng),
            *wg.public().as_bytes(),
            "w",
            T0,
        );
        req.machine_key = weak.to_vec();
        let (c, msg) = code(m.enroll(&req, T0).unwrap_err());
        assert_eq!(c, tonic::Code::InvalidArgument, "{msg}");
        assert!(msg.contains("machine_key"), "{msg}");
    }
    assert!(m.nodes().is_empty());
}

#[test]
fn extreme_enrollment_timestamps_are_refused_without_overflow() {
    let m = mesh(MeshConfig::default());
    let k = key(&m, "tag:web", true);
    for ts in [i64::MIN, i64::MAX, i64::MIN + 1] {
        let machine = SigningKey::generate(&mut OsRng);
        let wg = *WgPrivateKey::generate(&mut OsRng).public().as_bytes();
        let e = m
            .enroll(&request(&k, &machine, wg, "t", ts), T0)
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::NodeAuth {
                    reason: AuthReason::ClockSkew,
                    ..
                }
            ),
            "{e}"
        );
    }
}

// ---- duplicate sessions ---------------------------------------------------

#[test]
fn a_second_live_session_of_one_node_is_refused_and_audited() {
    let m = mesh(MeshConfig::default());
    let n = enroll(&m, &key(&m, "tag:web", false), "web", T0);
    let first = m.open_stream(n.node_id, T0).unwrap();
    let (c, msg) = code(m.open_stream(n.node_id, T0 + 1).err().unwrap());
    assert_eq!(c, tonic::Code::FailedPrecondition, "{msg}");
    assert!(
        msg.contains("another session of this node is live"),
        "{msg}"
    );
    // The first session was not disturbed.
    assert!(!matches!(*first.rx.borrow(), Update::Closed(..)));
    let log = m.store().audit_log(100).unwrap();
    assert!(
        log.iter()
            .any(|a| a.action == "node.duplicate_session" && a.target == "web"),
        "{log:?}"
    );
    // A genuine reconnect after the old stream ended works.
    m.unsubscribe(n.node_id, first.conn, T0 + 2);
    let second = m.open_stream(n.node_id, T0 + 3).unwrap();
    // And so does one after the old stream's receiver vanished without
    // unsubscribing (its transport task is gone).
    drop(second);
    m.open_stream(n.node_id, T0 + 4).unwrap();
}

// ---- flow reports ----------------------------------------------------------

#[test]
fn flow_report_packet_sums_saturate() {
    use ztmesh_controller::mesh::MAX_FLOW_ROWS_PER_REPORT;
    let m = mesh(MeshConfig::default());
    let n = enroll(&m, &key(&m, "tag:web", false), "web", T0);
    let node = m.find_node(&n.name).unwrap();
    let flows: Vec<_> = (0..(MAX_FLOW_ROWS_PER_REPORT as u32 + 3))
        .map(|port| pb::FlowSummary {
            src: "100.64.0.9".into(),
            dst: "100.64.0.1".into(),
            protocol: 6,
            dst_port: port,
            allowed: false,
            reason: "no_rule".into(),
            packets: u64::MAX,
            ..Default::default()
        })
        .collect();
    m.record_denied_flows(&node, &flows, T0);
    let log = m.store().audit_log(10_000).unwrap();
    assert!(
        log.iter()
            .any(|a| a.detail == format!("3 more denied flows, {} packets", u64::MAX)),
        "{log:?}"
    );
}

#[test]
fn the_audit_table_is_pruned_by_age_and_by_flow_row_count_in_a_real_sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("db.sqlite")).unwrap());
    for i in 0..50 {
        store
            .audit(T0 - 100 * 86_400_000 + i, "admin", "user.create", "old", "")
            .unwrap();
        store
            .audit(T0 + i, "admin", "user.create", "new", "")
            .unwrap();
    }
    for i in 0..300 {
        store
            .audit(T0 + i, "node:web", "flow.denied", "f", &i.to_string())
            .unwrap();
    }
    let key_file = dir.path().join("controller.key");
    let signer = SigningKey::load_or_generate(&key_file).unwrap();
    let deleted = store
        .prune_audit(T0 - 90 * 86_400_000, 100, T0, &signer)
        .unwrap();
    assert!(
        store.verify_audit(&signer.public()).unwrap().is_ok(),
        "pruned rows leave signed gaps"
    );
    assert_eq!(deleted, 250);
    let log = store.audit_log(10_000).unwrap();
    assert_eq!(log.iter().filter(|a| a.target == "old").count(), 0);
    assert_eq!(
        log.iter().filter(|a| a.target == "new").count(),
        50,
        "admin rows are not evicted by flow rows"
    );
    let flows: Vec<_> = log.iter().filter(|a| a.action == "flow.denied").collect();
    assert_eq!(flows.len(), 100);
    assert!(
        flows
            .iter()
            .all(|a| a.detail.parse::<u32>().unwrap() >= 200),
        "the newest are kept"
    );
    drop(store);

    // The mesh prunes on its own, with the configured limits.
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("db.sqlite")).unwrap());
    let m = load_with(
        store.clone(),
        SigningKey::load(&key_file).unwrap(),
        MeshConfig {
            audit_max_age_ms: 86_400_000,
            audit_max_flow_rows: 10,
            ..MeshConfig::default()
        },
        T0 + 2 * 86_400_000,
    );
    m.tick(T0 + 2 * 86_400_000);
    m.prune_audit(T0 + 2 * 86_400_000);
    assert!(store.audit_log(10_000).unwrap().is_empty());
    m.create_user(
        "admin",
        "alice@example.com",
        Role::Member,
        T0 + 2 * 86_400_000,
    )
    .unwrap();
    assert_eq!(store.audit_log(10_000).unwrap().len(), 1);
    let v = m.verify_audit().unwrap().unwrap();
    assert_eq!(v.rows, 1);
}

// ---- restarts and clock jumps -------------------------------------------------

#[test]
fn a_connected_ephemeral_node_survives_a_controller_restart_and_last_seen_stays_fresh() {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().unwrap());
    let cfg = MeshConfig {
        ephemeral_timeout_ms: 5 * MIN,
        ..MeshConfig::default()
    };
    let m = load(store.clone(), cfg.clone(), T0);
    let k = key(&m, "tag:web", true);
    let e = enroll(&m, &k, "runner", T0);
    let _sub = m.open_stream(e.node_id, T0).unwrap();
    // Connected for an hour; the ticker runs and flushes.
    for t in (0..=120).map(|i| T0 + i * 30_000) {
        m.tick(t);
        m.flush();
    }
    let seen = store.nodes().unwrap()[0].last_seen_ms;
    assert!(
        seen >= T0 + 60 * MIN - 2 * MIN,
        "last_seen is stale: {}",
        seen - T0
    );
    // The controller is killed (no unsubscribe) and comes back 3 minutes later.
    drop(m);
    let restart = T0 + 63 * MIN;
    let m = load(store.clone(), cfg.clone(), restart);
    m.tick(restart);
    m.tick(restart + 30_000);
    assert!(
        m.find_node("runner").is_ok(),
        "deleted before it could reconnect"
    );
    let _sub = m.open_stream(e.node_id, restart + 40_000).unwrap();
    m.tick(restart + 60 * MIN);
    assert!(m.find_node("runner").is_ok());
    drop(m);

    // One that never comes back is deleted a full timeout after the start.
    let m = load(store.clone(), cfg, restart + 61 * MIN);
    m.tick(restart + 61 * MIN);
    m.tick(restart + 65 * MIN);
    assert!(m.find_node("runner").is_ok(), "within the grace period");
    m.tick(restart + 66 * MIN + 1);
    assert!(m.find_node("runner").is_err(), "deleted after the timeout");
}

#[test]
fn a_forward_clock_jump_neither_deletes_ephemeral_nodes_nor_loses_expiring_ones() {
    let m = mesh(MeshConfig {
        ephemeral_timeout_ms: 5 * MIN,
        node_key_ttl_ms: 24 * 60 * MIN,
        tagged_key_ttl_ms: 24 * 60 * MIN,
        ..MeshConfig::default()
    });
    m.set_policy("admin", "p.hujson", POLICY, T0).unwrap();
    let web = enroll(&m, &key(&m, "tag:web", true), "web", T0);
    let db = enroll(&m, &key(&m, "tag:db", false), "db", T0);
    let sub = m.open_stream(web.node_id, T0).unwrap();
    m.unsubscribe(web.node_id, sub.conn, T0 + 1_000); // web goes offline
    let db_sub = m.open_stream(db.node_id, T0).unwrap();
    db_sub.take().unwrap();
    m.tick_at(T0 + 1_500, 1_500);
    // The wall clock jumps a year ahead for a few seconds, then returns.
    let year = 365 * 24 * 60 * MIN;
    m.tick_at(T0 + year, 2_000);
    m.tick_at(T0 + year + 500, 2_500);
    m.tick_at(T0 + 3_000, 3_000);
    m.tick_at(T0 + 3_500, 3_500);
    assert!(
        m.find_node("web").is_ok(),
        "ephemeral node deleted by a clock jump"
    );
    // db's key looked expired during the jump; with the clock back it is a
    // peer again, and web sees it.
    assert_eq!(m.netmap(web.node_id, T0 + 3_500).unwrap().peers.len(), 1);
    let map = db_sub.take().expect("db got a map after the jump");
    let map = ztmesh_proto::netmap::verify_signature(&m.controller_key(), &map).unwrap();
    assert_eq!(
        map.peers.len(),
        1,
        "db lost its peer after the clock returned"
    );
    // Real (monotonic) offline time still deletes it.
    m.tick_at(T0 + 5 * MIN + 1_001, 5 * 60_000 + 1_001);
    assert!(m.find_node("web").is_err());
}

#[test]
fn time_arithmetic_saturates_near_the_ends_of_the_clock() {
    let m = mesh(MeshConfig {
        node_key_ttl_ms: 0, // never expires, so maps are built at the end of time
        tagged_key_ttl_ms: 0,
        ..MeshConfig::default()
    });
    let k = key(&m, "tag:web", false);
    let n = enroll(&m, &k, "web", T0);
    let far = i64::MAX - 1_000;
    let before = m.netmap(n.node_id, T0).unwrap();
    m.tick(far);
    let map = m.netmap(n.node_id, far).unwrap();
    assert_eq!(map.not_after_ms, i64::MAX, "now + ttl saturates");
    assert!(map.serial > before.serial);
    let (row, _) = m
        .create_key(
            "admin",
            KeyDetail::auth(None, &["tag:web".into()], false, false),
            None,
            far,
        )
        .unwrap();
    assert_eq!(row.expires_ms, i64::MAX);
    let (row, _) = m
        .create_key("admin", KeyDetail::api("x", Role::Admin), None, far)
        .unwrap();
    assert_eq!(row.expires_ms, i64::MAX);
    // An enrollment stamped at the end of time is refused, not overflowed.
    let machine = SigningKey::generate(&mut OsRng);
    let wg = *WgPrivateKey::generate(&mut OsRng).public().as_bytes();
    let (_, k2) = m
        .create_key(
            "admin",
            KeyDetail::auth(None, &["tag:web".into()], false, false),
            None,
            T0,
        )
        .unwrap();
    let e = m
        .enroll(&request(&k2, &machine, wg, "x", i64::MIN), far)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::NodeAuth {
                reason: AuthReason::ClockSkew,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn an_admin_expiry_stays_final_when_the_clock_goes_back() {
    let m = mesh(MeshConfig::default());
    m.set_policy("admin", "p.hujson", POLICY, T0).unwrap();
    let _web = enroll(&m, &key(&m, "tag:web", false), "web", T0);
    let db = enroll(&m, &key(&m, "tag:db", false), "db", T0);
    assert_eq!(m.netmap(db.node_id, T0).unwrap().peers.len(), 1);
    m.expire_node("admin", "web", T0 + 60_000).unwrap();
    m.tick_at(T0 + 60_500, 60_500);
    // The clock steps back a minute: the expired node does not return.
    m.tick_at(T0 + 1_000, 61_000);
    m.tick_at(T0 + 1_500, 61_500);
    assert!(m.netmap(db.node_id, T0 + 1_500).unwrap().peers.is_empty());
}

/// Transactions committed to a WAL file: frames whose header carries the
/// database size after commit (nonzero only on a transaction's last frame).
fn wal_commits(wal: &std::path::Path) -> usize {
    let b = std::fs::read(wal).unwrap();
    if b.len() < 32 {
        return 0;
    }
    let page = u32::from_be_bytes([b[8], b[9], b[10], b[11]]) as usize;
    b[32..]
        .chunks(24 + page)
        .take_while(|f| f.len() == 24 + page)
        .filter(|f| f[4..8] != [0, 0, 0, 0])
        .count()
}

#[test]
fn a_flow_report_is_written_in_one_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&db).unwrap());
    let m = load(store.clone(), MeshConfig::default(), T0);
    let n = enroll(&m, &key(&m, "tag:web", false), "web", T0);
    let node = m.find_node(&n.name).unwrap();
    let flows: Vec<_> = (0..150u32)
        .map(|port| pb::FlowSummary {
            src: "100.64.0.9".into(),
            dst: "100.64.0.1".into(),
            protocol: 17,
            dst_port: port,
            allowed: false,
            reason: "no_rule".into(),
            packets: 1,
            ..Default::default()
        })
        .collect();
    let other = rusqlite::Connection::open(&db).unwrap();
    other
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    let wal = dir.path().join("db.sqlite-wal");
    assert_eq!(wal_commits(&wal), 0);
    m.record_denied_flows(&node, &flows, T0);
    assert_eq!(wal_commits(&wal), 1, "one report, one transaction");
    let rows: i64 = other
        .query_row(
            "SELECT count(*) FROM audit WHERE action = 'flow.denied'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(rows, 101);
}

// ---- device posture --------------------------------------------------------

const POSTURE_POLICY: &str = r#"{
  "tagOwners": {"tag:web": [], "tag:db": []},
  "postures": {"posture:compliant": ["custom:compliant == true", "node:os == 'linux'"]},
  "acls": [
    {"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"], "srcPosture": ["posture:compliant"]},
    {"action": "accept", "src": ["tag:web"], "dst": ["tag:db:22"]},
  ],
}"#;

fn attr(key: &str, v: pb::posture_attribute::Value) -> pb::PostureAttribute {
    pb::PostureAttribute {
        key: key.into(),
        value: Some(v),
    }
}

fn linux() -> Vec<pb::PostureAttribute> {
    vec![attr(
        "node:os",
        pb::posture_attribute::Value::Text("linux".into()),
    )]
}

/// The TCP ports of db's inbound rules whose sources include web's address.
fn db_ports_for_web(m: &Mesh, db: u64, web_v4: &str, now: i64) -> Vec<u32> {
    let map = m.netmap(db, now).unwrap();
    let mut ports: Vec<u32> = map
        .inbound_rules
        .iter()
        .filter(|r| {
            r.protocols.contains(&6)
                && r.src_prefixes
                    .iter()
                    .any(|p| p.split('/').next() == Some(web_v4))
        })
        .flat_map(|r| r.ports.iter().map(|p| p.first))
        .collect();
    ports.sort_unstable();
    ports
}

/// An admin marks `node` compliant (`custom:compliant=true`).
fn vouch(m: &Mesh, node: &str, now: i64) {
    m.set_node_attributes(
        "admin",
        node,
        &[(
            "custom:compliant".into(),
            ztmesh_policy::AttrValue::Bool(true),
        )],
        &[],
        now,
    )
    .unwrap();
}

fn posture_mesh(ttl_ms: i64) -> (Mesh, u64, u64, String) {
    let m = mesh(MeshConfig {
        posture_ttl_ms: ttl_ms,
        ..MeshConfig::default()
    });
    m.set_policy("admin", "p.hujson", POSTURE_POLICY, T0)
        .unwrap();
    let web = enroll(&m, &key(&m, "tag:web", false), "web", T0);
    let db = enroll(&m, &key(&m, "tag:db", false), "db", T0);
    let web_v4 = web.addresses[0].split('/').next().unwrap().to_string();
    (m, web.node_id, db.node_id, web_v4)
}

#[test]
fn a_node_cannot_vouch_for_itself_and_an_oversized_report_is_clipped_and_audited() {
    use pb::posture_attribute::Value;
    let (m, web, db, web_v4) = posture_mesh(60_000);
    let mut attrs = linux();
    attrs.push(attr("custom:compliant", Value::Flag(true)));
    attrs.push(attr("node:kernel", Value::Text("6".repeat(1 << 20))));
    attrs.extend((0..1000).map(|i| attr(&format!("node:x{i}"), Value::Number(i))));
    let clipped = m.report_posture(web, &attrs, T0).unwrap();
    assert!(
        clipped.iter().any(|c| c.contains("\"custom:compliant\"")),
        "{clipped:?}"
    );
    assert!(
        clipped.iter().any(|c| c.contains("node:kernel")),
        "{clipped:?}"
    );
    assert!(
        clipped[0].starts_with("1003 attributes sent"),
        "{clipped:?}"
    );
    let row = m.find_node("web").unwrap();
    assert!(row.posture.custom.is_empty(), "a node cannot set custom:*");
    assert_eq!(
        row.posture.reported.len(),
        2,
        "node:os and the clipped kernel: {:?}",
        row.posture.reported.keys()
    );
    // Its own claim bought nothing: only the ungated port.
    assert_eq!(db_ports_for_web(&m, db, &web_v4, T0), vec![22]);
    let audit = m.store().audit_log(100).unwrap();
    let clip = audit
        .iter()
        .find(|a| a.action == "node.posture.clipped")
        .expect("clipping is audited");
    assert_eq!(clip.target, "web");
    assert!(clip.detail.len() < 64 * 1024, "the audit row is bounded");
}

#[test]
fn posture_decides_a_gated_flow_and_a_stale_report_loses_it_in_virtual_time() {
    const TTL: i64 = 30_000;
    let (m, web, db, web_v4) = posture_mesh(TTL);
    assert_eq!(
        db_ports_for_web(&m, db, &web_v4, T0),
        vec![22],
        "unset fails"
    );

    m.report_posture(web, &linux(), T0).unwrap();
    assert_eq!(db_ports_for_web(&m, db, &web_v4, T0), vec![22]);
    vouch(&m, "web", T0);
    assert_eq!(db_ports_for_web(&m, db, &web_v4, T0), vec![22, 5432]);
    let own = m.netmap(web, T0).unwrap();
    assert_eq!(own.posture_interval_ms, TTL / 3);
    assert!(own.posture_checks.iter().all(|c| c.passed), "{own:?}");

    // Reports keep it fresh...
    m.report_posture(web, &linux(), T0 + TTL - 1_000).unwrap();
    m.tick(T0 + TTL + 1_000);
    assert_eq!(
        db_ports_for_web(&m, db, &web_v4, T0 + TTL + 1_000),
        vec![22, 5432]
    );
    // ...until they stop: the admin's attribute alone is not enough.
    let later = T0 + 2 * TTL;
    m.tick(later);
    assert_eq!(db_ports_for_web(&m, db, &web_v4, later), vec![22]);
    let own = m.netmap(web, later).unwrap();
    let check = &own.posture_checks[0];
    assert!(!check.passed && check.detail.contains("stale"), "{check:?}");

    // A restart keeps attributes and report times (still stale), and a new
    // report brings the flow back.
    let audit = m.store().audit_log(100).unwrap();
    let actions: Vec<&str> = audit.iter().map(|a| a.action.as_str()).collect();
    for want in [
        "node.attributes",
        "node.posture.report",
        "node.posture.pass",
        "node.posture.fail",
    ] {
        assert!(actions.contains(&want), "{want} not audited: {actions:?}");
    }
    let fail = audit
        .iter()
        .find(|a| a.action == "node.posture.fail" && a.detail.contains("stale"))
        .expect("going stale is audited");
    assert_eq!(fail.target, "web");
    m.report_posture(web, &linux(), later).unwrap();
    assert_eq!(db_ports_for_web(&m, db, &web_v4, later), vec![22, 5432]);
}

#[test]
fn posture_attributes_survive_a_restart_and_staleness_is_judged_by_the_stored_report_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ztmesh.db");
    let cfg = MeshConfig {
        posture_ttl_ms: 30_000,
        ..MeshConfig::default()
    };
    let (web, db, web_v4) = {
        let m = load(Arc::new(SqliteStore::open(&path).unwrap()), cfg.clone(), T0);
        m.set_policy("admin", "p.hujson", POSTURE_POLICY, T0)
            .unwrap();
        let web = enroll(&m, &key(&m, "tag:web", false), "web", T0);
        let db = enroll(&m, &key(&m, "tag:db", false), "db", T0);
        m.report_posture(web.node_id, &linux(), T0).unwrap();
        vouch(&m, "web", T0);
        let v4 = web.addresses[0].split('/').next().unwrap().to_string();
        (web.node_id, db.node_id, v4)
    };
    let m = load(
        Arc::new(SqliteStore::open(&path).unwrap()),
        cfg.clone(),
        T0 + 1_000,
    );
    assert_eq!(
        db_ports_for_web(&m, db, &web_v4, T0 + 1_000),
        vec![22, 5432]
    );
    let row = m.find_node("web").unwrap();
    assert_eq!(row.posture.reported_ms, T0);
    assert_eq!(
        row.posture.custom.get("custom:compliant"),
        Some(&ztmesh_policy::AttrValue::Bool(true))
    );
    drop(m);
    // Loaded after the TTL: stale from the start.
    let m = load(
        Arc::new(SqliteStore::open(&path).unwrap()),
        cfg,
        T0 + 60_000,
    );
    assert_eq!(db_ports_for_web(&m, db, &web_v4, T0 + 60_000), vec![22]);
    let _ = web;
}

#[test]
fn admins_set_only_custom_attributes_with_sane_names_and_values() {
    use ztmesh_policy::AttrValue;
    let (m, _web, _db, _) = posture_mesh(60_000);
    for (k, v) in [
        ("node:os", AttrValue::Str("linux".into())),
        ("custom:", AttrValue::Bool(true)),
        ("custom:a/b", AttrValue::Bool(true)),
        ("custom:big", AttrValue::Str("x".repeat(10_000))),
    ] {
        let (c, msg) = code(
            m.set_node_attributes("admin", "web", &[(k.into(), v)], &[], T0)
                .unwrap_err(),
        );
        assert_eq!(c, tonic::Code::InvalidArgument, "{k}: {msg}");
    }
    let many: Vec<(String, AttrValue)> = (0..65)
        .map(|i| (format!("custom:a{i}"), AttrValue::Int(i)))
        .collect();
    let (c, msg) = code(
        m.set_node_attributes("admin", "web", &many, &[], T0)
            .unwrap_err(),
    );
    assert_eq!(c, tonic::Code::InvalidArgument, "{msg}");
    assert!(m.find_node("web").unwrap().posture.custom.is_empty());
    let (c, _) = code(
        m.set_node_attributes("admin", "nope", &[], &["custom:x".into()], T0)
            .unwrap_err(),
    );
    assert_eq!(c, tonic::Code::NotFound);
}

#[test]
fn a_report_from_a_clock_that_was_stepped_back_is_not_believed() {
    const TTL: i64 = 30_000;
    const HOUR: i64 = 3_600_000;
    let (m, web, db, web_v4) = posture_mesh(TTL);
    vouch(&m, "web", T0);
    // The controller's clock ran an hour fast when the report came...
    m.tick(T0 + HOUR);
    m.report_posture(web, &linux(), T0 + HOUR).unwrap();
    assert_eq!(db_ports_for_web(&m, db, &web_v4, T0 + HOUR), vec![22, 5432]);
    // ...then NTP stepped it back: the report is not an hour of credit.
    m.tick(T0 + 1_000);
    assert_eq!(db_ports_for_web(&m, db, &web_v4, T0 + 1_000), vec![22]);
    // The next report counts again.
    m.report_posture(web, &linux(), T0 + 2_000).unwrap();
    assert_eq!(
        db_ports_for_web(&m, db, &web_v4, T0 + 2_000),
        vec![22, 5432]
    );
}
