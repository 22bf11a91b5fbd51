//! In-process gRPC tests: a real controller (TLS listener on 127.0.0.1, admin
//! unix socket, SQLite file in a temp dir) driven through real tonic clients.
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

use std::time::Duration;

use rand_core::OsRng;
use tonic::Code;
use ztmesh_controller::cli::{self, ConnArgs};
use ztmesh_controller::mesh::MeshConfig;
use ztmesh_controller::now_ms;
use ztmesh_controller::secrets::KeyDetail;
use ztmesh_proto::admin as apb;
use ztmesh_proto::auth::{self, methods, signed_request};
use ztmesh_proto::control as pb;
use ztmesh_proto::keys::{SigningKey, WgPrivateKey};
use ztmesh_proto::netmap;

mod common;
use common::{enroll, enroll_request, open_stream, Ctl, TestNode};

/// A node as the admin API shows it.
async fn admin_node(ctl: &Ctl, name: &str) -> apb::Node {
    ctl.admin()
        .await
        .get_node(apb::NodeRef { node: name.into() })
        .await
        .unwrap()
        .into_inner()
}

/// A node's overlay IPv4 address.
async fn node_v4(ctl: &Ctl, name: &str) -> String {
    admin_node(ctl, name)
        .await
        .addresses
        .into_iter()
        .find(|a| !a.contains(':'))
        .unwrap()
}

/// Sets a policy under which every `tag:db` node reaches every other on 5432.
async fn db_to_db_policy(ctl: &Ctl) {
    ctl.admin()
        .await
        .set_policy(apb::SetPolicyRequest {
            file_name: "p.hujson".into(),
            text: r#"{"tagOwners": {"tag:db": []},
                      "acls": [{"action": "accept", "src": ["tag:db"], "dst": ["tag:db:5432"]}]}"#
                .into(),
            if_version: None,
        })
        .await
        .unwrap();
}

/// A remote admin client over TLS with a fresh API key of `role`.
async fn remote_as(ctl: &Ctl, role: &str) -> cli::Client {
    let secret = ctl
        .admin()
        .await
        .create_api_key(apb::CreateApiKeyRequest {
            description: format!("{role} key"),
            expiry_secs: 0,
            role: role.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .secret;
    cli::connect(&ConnArgs {
        data_dir: "/nonexistent".into(),
        server: Some(ctl.url.clone()),
        api_key: Some(secret),
        fingerprint: Some(auth::hex(&ctl.fp)),
    })
    .await
    .unwrap()
}

const POLICY: &str = r#"{
  "groups": {"group:eng": ["alice@example.com", "bob@example.com"]},
  "tagOwners": {"tag:web": ["group:eng"], "tag:db": []},
  "acls": [
    {"action": "accept", "src": ["group:eng"], "dst": ["tag:web:443"]},
    {"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"]},
  ],
}"#;

async fn next_map(ctl: &Ctl, s: &mut tonic::Streaming<pb::SignedNetMap>, have: u64) -> pb::NetMap {
    let signed = tokio::time::timeout(Duration::from_secs(1), s.message())
        .await
        .expect("a netmap within 1 s")
        .unwrap()
        .expect("stream open");
    netmap::verify(&ctl.mesh.controller_key(), &signed, have, now_ms())
        .expect("valid signed netmap")
}

fn peer_names(m: &pb::NetMap) -> Vec<String> {
    m.peers.iter().map(|p| p.name.clone()).collect()
}

#[tokio::test]
async fn enrolls_with_user_tag_and_reusable_keys() {
    let ctl = Ctl::start().await;
    ctl.set_policy(POLICY).await;
    ctl.admin()
        .await
        .create_user(apb::CreateUserRequest {
            login: "alice@example.com".into(),
            role: String::new(),
        })
        .await
        .unwrap();
    let k_user = ctl.key("alice@example.com", &[], false).await;
    let k_tag = ctl.key("", &["tag:web"], false).await;
    let k_reuse = ctl.key("", &["tag:db"], true).await;
    let a = enroll(&ctl, &k_user, "Alice's Laptop").await.unwrap();
    assert_eq!(a.name, "alice-s-laptop");
    let w = enroll(&ctl, &k_tag, "web").await.unwrap();
    let d1 = enroll(&ctl, &k_reuse, "db").await.unwrap();
    let d2 = enroll(&ctl, &k_reuse, "db").await.unwrap();
    assert_eq!(d2.name, "db-2", "names are made unique");
    let nodes = ctl
        .admin()
        .await
        .list_nodes(apb::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    assert_eq!(nodes.len(), 4);
    let web = nodes.iter().find(|n| n.id == w.id).unwrap();
    assert_eq!(web.tags, vec!["tag:web".to_string()]);
    assert!(web.addresses[0].starts_with("100.64."));
    assert!(web.addresses[1].starts_with("fd"));
    let alice = nodes.iter().find(|n| n.id == a.id).unwrap();
    assert_eq!(alice.user, "alice@example.com");
    assert_ne!(d1.id, d2.id);
    ctl.stop().await;
}

#[tokio::test]
async fn single_use_key_wins_exactly_one_concurrent_enrollment() {
    let ctl = Ctl::start().await;
    let key = ctl.key("", &["tag:web"], false).await;
    let (a, b) = tokio::join!(enroll(&ctl, &key, "a"), enroll(&ctl, &key, "b"));
    assert_eq!(
        [a.is_ok(), b.is_ok()].iter().filter(|x| **x).count(),
        1,
        "exactly one enrollment succeeds"
    );
    ctl.stop().await;
}

#[tokio::test]
async fn refuses_reused_expired_and_revoked_keys_with_clear_messages() {
    let ctl = Ctl::start().await;
    let key = ctl.key("", &["tag:web"], false).await;
    enroll(&ctl, &key, "first").await.unwrap();
    let e = enroll(&ctl, &key, "second").await.err().unwrap();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("already used"), "{}", e.message());

    let revoked = ctl.key("", &["tag:web"], true).await;
    let key_id = revoked.split('.').nth(1).unwrap().to_string();
    ctl.admin()
        .await
        .revoke_auth_key(apb::KeyRef { key_id })
        .await
        .unwrap();
    let e = enroll(&ctl, &revoked, "x").await.err().unwrap();
    assert!(e.message().contains("revoked"), "{}", e.message());

    let (row, expired) = ctl
        .mesh
        .create_key(
            "test",
            KeyDetail::auth(None, &["tag:web".into()], true, false),
            Some(1),
            now_ms() - 10,
        )
        .unwrap();
    assert!(row.expires_ms < now_ms());
    let e = enroll(&ctl, &expired, "y").await.err().unwrap();
    assert!(e.message().contains("expired"), "{}", e.message());

    let e = enroll(&ctl, "ztmk1.garbage", "z").await.err().unwrap();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("malformed"), "{}", e.message());
    // The first refusal of this source is audited with its reason; the
    // others within the minute are not (a refusal flood stays one row).
    let refused = audit_rows(&ctl, "node.enroll.refused").await;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(refused[0].detail.contains("already used"), "{refused:?}");
    ctl.stop().await;
}

#[tokio::test]
async fn refuses_wrong_stale_and_replayed_proofs() {
    let ctl = Ctl::start().await;
    let key = ctl.key("", &["tag:web"], true).await;
    let a = enroll(&ctl, &key, "a").await.unwrap();
    let mut c = ctl.control().await;

    // No proof at all.
    let e = c
        .stream_net_map(pb::StreamNetMapRequest::default())
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Code::Unauthenticated);

    // A proof by a key that is not enrolled.
    let stranger = SigningKey::generate(&mut OsRng);
    let req = signed_request(
        &stranger,
        methods::STREAM_NETMAP,
        pb::StreamNetMapRequest::default(),
        now_ms(),
        &mut OsRng,
    );
    assert_eq!(
        c.stream_net_map(req).await.err().unwrap().code(),
        Code::Unauthenticated
    );

    // A proof made for another method.
    let req = signed_request(
        &a.machine,
        methods::LOGOUT,
        pb::StreamNetMapRequest::default(),
        now_ms(),
        &mut OsRng,
    );
    assert_eq!(
        c.stream_net_map(req).await.err().unwrap().code(),
        Code::Unauthenticated
    );

    // A stale proof.
    let req = signed_request(
        &a.machine,
        methods::STREAM_NETMAP,
        pb::StreamNetMapRequest::default(),
        now_ms() - 120_000,
        &mut OsRng,
    );
    let e = c.stream_net_map(req).await.err().unwrap();
    assert!(e.message().contains("window"), "{}", e.message());

    // The same proof twice.
    let req = signed_request(
        &a.machine,
        methods::STREAM_NETMAP,
        pb::StreamNetMapRequest::default(),
        now_ms(),
        &mut OsRng,
    );
    let proof = req.metadata().get(auth::PROOF_HEADER).unwrap().clone();
    c.stream_net_map(req).await.unwrap();
    let mut replay = tonic::Request::new(pb::StreamNetMapRequest::default());
    replay.metadata_mut().insert(auth::PROOF_HEADER, proof);
    let e = c.stream_net_map(replay).await.err().unwrap();
    assert!(e.message().contains("replay"), "{}", e.message());

    // Refusals are audited, one row per source per minute.
    let refused = audit_rows(&ctl, "node.refused").await;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0].actor.starts_with("source:127.0.0.1"),
        "{refused:?}"
    );
    assert_eq!(refused[0].target, methods::STREAM_NETMAP);
    ctl.stop().await;
}

/// The audit rows with `action`, newest first.
async fn audit_rows(ctl: &Ctl, action: &str) -> Vec<apb::AuditEvent> {
    ctl.admin()
        .await
        .list_audit(apb::ListAuditRequest {
            limit: 10_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events
        .into_iter()
        .filter(|e| e.action == action)
        .collect()
}

#[tokio::test]
async fn a_node_only_ever_receives_its_own_map() {
    let ctl = Ctl::start().await;
    ctl.set_policy(POLICY).await;
    let kw = ctl.key("", &["tag:web"], false).await;
    let kd = ctl.key("", &["tag:db"], false).await;
    let w = enroll(&ctl, &kw, "web").await.unwrap();
    let d = enroll(&ctl, &kd, "db").await.unwrap();
    let mut s = open_stream(&ctl, &w).await.unwrap();
    let m = next_map(&ctl, &mut s, 0).await;
    let me = m.self_node.clone().unwrap();
    assert_eq!(me.id, w.id);
    assert_eq!(me.wg_key, w.wg.public().as_bytes().to_vec());
    assert_eq!(peer_names(&m), vec![d.name.clone()]);

    // Claiming A's key in the proof but signing with B's key fails.
    let mut proof =
        auth::NodeProof::create(&d.machine, methods::STREAM_NETMAP, now_ms(), &mut OsRng);
    proof.machine_key = w.machine.public();
    let mut req = tonic::Request::new(pb::StreamNetMapRequest::default());
    req.metadata_mut()
        .insert(auth::PROOF_HEADER, proof.to_string().parse().unwrap());
    let e = ctl.control().await.stream_net_map(req).await.err().unwrap();
    assert_eq!(e.code(), Code::Unauthenticated);
    ctl.stop().await;
}

#[tokio::test]
async fn maps_are_signed_serials_increase_and_changes_arrive_within_a_second() {
    let ctl = Ctl::start().await;
    let kw = ctl.key("", &["tag:web"], false).await;
    let kd = ctl.key("", &["tag:db"], true).await;
    let w = enroll(&ctl, &kw, "web").await.unwrap();
    let d = enroll(&ctl, &kd, "db").await.unwrap();
    let mut sw = open_stream(&ctl, &w).await.unwrap();
    let mut sd = open_stream(&ctl, &d).await.unwrap();
    let m0 = next_map(&ctl, &mut sw, 0).await;
    assert!(m0.peers.is_empty(), "no policy: deny all, no peers");
    assert!(m0.inbound_rules.is_empty());
    let d0 = next_map(&ctl, &mut sd, 0).await;

    ctl.set_policy(POLICY).await;
    let m1 = next_map(&ctl, &mut sw, m0.serial).await;
    assert!(m1.serial > m0.serial);
    assert_eq!(peer_names(&m1), vec!["db".to_string()]);
    let d1 = next_map(&ctl, &mut sd, d0.serial).await;
    assert!(!d1.inbound_rules.is_empty());
    for r in &d1.inbound_rules {
        assert!(!r.protocols.is_empty());
        if r.protocols.iter().any(|p| *p == 6 || *p == 17) {
            assert!(
                r.ports.iter().all(|p| p.first == 5432 && p.last == 5432),
                "{r:?}"
            );
        }
        assert_eq!(
            r.rule_id, "policy.hujson:6",
            "rules carry the ACL entry's file:line"
        );
    }

    // A second db joins: web learns it; the first db (no flow with db-2) gets nothing.
    let d2 = enroll(&ctl, &kd, "db").await.unwrap();
    let m2 = next_map(&ctl, &mut sw, m1.serial).await;
    assert_eq!(peer_names(&m2), vec!["db".to_string(), d2.name.clone()]);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sd.message())
            .await
            .is_err(),
        "an unaffected node receives nothing"
    );

    // Deleting db-2 removes it from web's map within a second.
    ctl.admin()
        .await
        .delete_node(apb::NodeRef {
            node: d2.name.clone(),
        })
        .await
        .unwrap();
    let m3 = next_map(&ctl, &mut sw, m2.serial).await;
    assert_eq!(peer_names(&m3), vec!["db".to_string()]);
    ctl.stop().await;
}

#[tokio::test]
async fn deleted_and_expired_nodes_are_refused_and_vanish() {
    let ctl = Ctl::start().await;
    ctl.set_policy(POLICY).await;
    let kw = ctl.key("", &["tag:web"], false).await;
    let kd = ctl.key("", &["tag:db"], false).await;
    let w = enroll(&ctl, &kw, "web").await.unwrap();
    let d = enroll(&ctl, &kd, "db").await.unwrap();
    let mut sd = open_stream(&ctl, &d).await.unwrap();
    let m = next_map(&ctl, &mut sd, 0).await;
    assert_eq!(peer_names(&m), vec!["web".to_string()]);

    ctl.admin()
        .await
        .expire_node(apb::NodeRef {
            node: w.name.clone(),
        })
        .await
        .unwrap();
    let m2 = next_map(&ctl, &mut sd, m.serial).await;
    assert!(m2.peers.is_empty(), "expired node vanishes from maps");
    let e = open_stream(&ctl, &w).await.err().unwrap();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("expired"), "{}", e.message());

    ctl.admin()
        .await
        .delete_node(apb::NodeRef {
            node: d.id.to_string(),
        })
        .await
        .unwrap();
    // The deleted node's own stream ends.
    let end = tokio::time::timeout(Duration::from_secs(1), sd.message())
        .await
        .unwrap();
    assert!(
        end.is_err(),
        "stream of a deleted node is closed with an error"
    );
    assert!(open_stream(&ctl, &d).await.is_err());
    ctl.stop().await;
}

#[tokio::test]
async fn invalid_policy_is_refused_and_the_old_one_stays() {
    let ctl = Ctl::start().await;
    ctl.set_policy(POLICY).await;
    let e = ctl
        .admin()
        .await
        .set_policy(apb::SetPolicyRequest {
            file_name: "bad.hujson".into(),
            text: "{\n  \"acls\": [ {\"action\": \"accept\", \"src\": [\"group:nope\"], \"dst\": [\"*:*\"]} ]\n}".into(),
            if_version: None,
        })
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("bad.hujson:2:"), "{}", e.message());
    let p = ctl
        .admin()
        .await
        .get_policy(apb::GetPolicyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.text, POLICY);
    ctl.stop().await;
}

#[tokio::test]
async fn remote_admin_needs_a_valid_api_key() {
    let ctl = Ctl::start().await;
    let secret = ctl
        .admin()
        .await
        .create_api_key(apb::CreateApiKeyRequest {
            description: "ci".into(),
            expiry_secs: 0,
            role: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .secret;
    let remote = |key: Option<&str>| ConnArgs {
        data_dir: "/nonexistent".into(),
        server: Some(ctl.url.clone()),
        api_key: key.map(str::to_string),
        fingerprint: Some(auth::hex(&ctl.fp)),
    };
    let mut good = cli::connect(&remote(Some(&secret))).await.unwrap();
    good.list_nodes(apb::ListNodesRequest {}).await.unwrap();

    let forged = format!("{}AAAA", &secret[..secret.len() - 4]);
    let mut bad = cli::connect(&remote(Some(&forged))).await.unwrap();
    let e = bad
        .list_nodes(apb::ListNodesRequest {})
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Code::Unauthenticated);

    // No key at all.
    let ch = ztmesh_proto::tls::connect(&ctl.url, ctl.fp, Duration::from_secs(5))
        .await
        .unwrap();
    let mut none = apb::admin_client::AdminClient::new(ch);
    let e = none
        .list_nodes(apb::ListNodesRequest {})
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Code::Unauthenticated);

    // Wrong pin: the TLS handshake fails before any request.
    let e = ztmesh_proto::tls::connect(&ctl.url, [0; 32], Duration::from_secs(5))
        .await
        .expect_err("a wrong pin fails the handshake");
    assert!(
        e.to_string().contains("does not match the pinned"),
        "the error names the pin mismatch: {e}"
    );

    // Both refusals came from one source within a minute: one row. The
    // good key's read is audited with its actor.
    let refused = audit_rows(&ctl, "api.refused").await;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].target, "ListNodes");
    let reads = audit_rows(&ctl, "api.read").await;
    assert!(
        reads
            .iter()
            .any(|r| r.target == "ListNodes" && r.actor.starts_with("apikey:")),
        "{reads:?}"
    );
    ctl.stop().await;
}

#[tokio::test]
async fn plan_lists_node_pairs_that_gain_and_lose_flows_and_changes_nothing() {
    let ctl = Ctl::start().await;
    ctl.set_policy(POLICY).await;
    let kw = ctl.key("", &["tag:web"], false).await;
    let kd = ctl.key("", &["tag:db"], false).await;
    enroll(&ctl, &kw, "web").await.unwrap();
    enroll(&ctl, &kd, "db").await.unwrap();
    let next = POLICY.replace("tag:db:5432", "tag:db:6379");
    let changes = ctl
        .admin()
        .await
        .plan_policy(apb::PlanPolicyRequest {
            file_name: "next.hujson".into(),
            text: next,
        })
        .await
        .unwrap()
        .into_inner()
        .changes;
    let web_db = changes
        .iter()
        .find(|c| c.src == "web" && c.dst == "db")
        .unwrap_or_else(|| panic!("no web -> db change in {changes:?}"));
    assert!(
        web_db.gained.iter().any(|g| g.contains("6379")),
        "{web_db:?}"
    );
    assert!(web_db.lost.iter().any(|l| l.contains("5432")), "{web_db:?}");
    let p = ctl
        .admin()
        .await
        .get_policy(apb::GetPolicyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.text, POLICY, "plan changes nothing");

    let e = ctl
        .admin()
        .await
        .explain_policy(apb::ExplainPolicyRequest {
            src: "web".into(),
            dst: "db".into(),
            port: 5432,
            proto: "tcp".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(e.allowed, "{e:?}");
    assert_eq!(e.rule_id, "policy.hujson:6");
    ctl.stop().await;
}

async fn report_endpoints(ctl: &Ctl, node: &TestNode, eps: &[String]) -> Result<(), tonic::Status> {
    let req = signed_request(
        &node.machine,
        methods::REPORT_ENDPOINTS,
        pb::ReportEndpointsRequest {
            endpoints: eps.to_vec(),
        },
        now_ms(),
        &mut OsRng,
    );
    ctl.control().await.report_endpoints(req).await.map(|_| ())
}

#[tokio::test]
async fn a_flapping_node_is_throttled_and_its_peers_maps_are_re_signed_a_bounded_number_of_times() {
    const INTERVAL_MS: u64 = 1_000;
    let ctl = Ctl::start_with(MeshConfig {
        endpoint_publish_interval_ms: INTERVAL_MS as i64,
        ..MeshConfig::default()
    })
    .await;
    ctl.set_policy(POLICY).await;
    let kw = ctl.key("", &["tag:web"], false).await;
    let kd = ctl.key("", &["tag:db"], false).await;
    let w = enroll(&ctl, &kw, "web").await.unwrap();
    let d = enroll(&ctl, &kd, "db").await.unwrap();
    let mut sd = open_stream(&ctl, &d).await.unwrap();
    let m0 = next_map(&ctl, &mut sd, 0).await;
    assert_eq!(peer_names(&m0), vec!["web".to_string()]);

    let before = ctl.mesh.maps_signed();
    let start = std::time::Instant::now();
    let (mut accepted, mut refused) = (Vec::new(), 0);
    for i in 0..40u32 {
        let ep = format!("198.18.2.{}:{}", i + 1, 40_000 + i);
        match report_endpoints(&ctl, &w, std::slice::from_ref(&ep)).await {
            Ok(()) => accepted.push(ep),
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                assert!(
                    s.message().contains("ReportEndpoints") && s.message().contains("retry"),
                    "{}",
                    s.message()
                );
                refused += 1;
            }
        }
    }
    let elapsed = start.elapsed().as_millis() as u64;
    let signed = ctl.mesh.maps_signed() - before;
    assert!(refused > 0, "a burst of 40 reports was not throttled");
    assert!(
        accepted.len() >= 5,
        "only {} reports accepted",
        accepted.len()
    );
    // One immediate republish, then at most one per interval (plus one
    // partial interval at the end) — never one per report.
    let bound = 2 + elapsed / INTERVAL_MS;
    assert!(
        signed <= bound,
        "{signed} maps signed for {} accepted reports in {elapsed} ms (bound {bound})",
        accepted.len()
    );
    // The peer ends up with the latest accepted value (liveness bound, 20 s).
    let last = accepted.last().unwrap().clone();
    let mut have = m0.serial;
    let mut seen = Vec::new();
    for _ in 0..20 {
        let Ok(Ok(Some(signed))) = tokio::time::timeout(Duration::from_secs(1), sd.message()).await
        else {
            continue;
        };
        let m = netmap::verify(&ctl.mesh.controller_key(), &signed, have, now_ms()).unwrap();
        have = m.serial;
        seen = m.peers[0].endpoints.clone();
        if seen == vec![last.clone()] {
            break;
        }
    }
    assert_eq!(seen, vec![last]);
    ctl.stop().await;
}

#[tokio::test]
async fn low_order_wireguard_keys_are_refused_with_invalid_argument() {
    let ctl = Ctl::start().await;
    let k = ctl.key("", &["tag:web"], true).await;
    let machine = SigningKey::generate(&mut OsRng);
    let wg = WgPrivateKey::generate(&mut OsRng);
    let mut req = enroll_request(&k, &machine, &wg, "zero");
    req.wg_key = vec![0; 32];
    req.proof = machine
        .sign(&auth::enroll_message(
            &k,
            &req.machine_key,
            &req.wg_key,
            "zero",
            req.timestamp_ms,
        ))
        .to_vec();
    let e = ctl.control().await.enroll(req).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("low-order"), "{}", e.message());
    assert!(enroll(&ctl, &k, "good").await.is_ok());
    ctl.stop().await;
}

#[tokio::test]
async fn a_second_machine_with_the_same_identity_is_refused_while_the_first_is_live() {
    let ctl = Ctl::start().await;
    ctl.set_policy(POLICY).await;
    let kw = ctl.key("", &["tag:web"], false).await;
    let kd = ctl.key("", &["tag:db"], false).await;
    let w = enroll(&ctl, &kw, "web").await.unwrap();
    let _d = enroll(&ctl, &kd, "db").await.unwrap();
    // The real machine: its stream and its reports share one connection.
    let mut real = ctl.control().await;
    let req = signed_request(
        &w.machine,
        methods::STREAM_NETMAP,
        pb::StreamNetMapRequest {
            have_serial: 0,
            accept_deltas: false,
        },
        now_ms(),
        &mut OsRng,
    );
    let mut first = real.stream_net_map(req).await.unwrap().into_inner();
    let m0 = next_map(&ctl, &mut first, 0).await;
    let req = signed_request(
        &w.machine,
        methods::REPORT_ENDPOINTS,
        pb::ReportEndpointsRequest {
            endpoints: vec!["198.18.3.1:51820".into()],
        },
        now_ms(),
        &mut OsRng,
    );
    real.report_endpoints(req).await.unwrap();

    // The clone: same machine key, another connection.
    let e = open_stream(&ctl, &w).await.err().unwrap();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("another session of this node is live"),
        "{}",
        e.message()
    );
    let audit = ctl
        .admin()
        .await
        .list_audit(apb::ListAuditRequest {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(audit
        .iter()
        .any(|a| a.action == "node.duplicate_session" && a.target == "web"));
    // Nor can it steer the real machine's peers to its own endpoint.
    let e = report_endpoints(&ctl, &w, &["198.18.3.2:51820".into()])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let nodes = ctl
        .admin()
        .await
        .list_nodes(apb::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    let web = nodes.iter().find(|n| n.id == w.id).unwrap();
    assert_eq!(web.endpoints, vec!["198.18.3.1:51820".to_string()]);

    // The first session is undisturbed: it still receives changes.
    ctl.admin()
        .await
        .rename_node(apb::RenameNodeRequest {
            node: "db".into(),
            new_name: "db-renamed".into(),
        })
        .await
        .unwrap();
    let m1 = next_map(&ctl, &mut first, m0.serial).await;
    assert_eq!(peer_names(&m1), vec!["db-renamed".to_string()]);
    assert!(m1.serial > m0.serial);

    // Its connection dies; the same machine reconnects (bounded retries).
    drop(first);
    let mut reconnected = None;
    for _ in 0..50 {
        match open_stream(&ctl, &w).await {
            Ok(s) => {
                reconnected = Some(s);
                break;
            }
            Err(e) => {
                assert!(
                    matches!(e.code(), Code::FailedPrecondition | Code::ResourceExhausted),
                    "{e:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let mut s = reconnected.expect("a genuine reconnect is accepted");
    next_map(&ctl, &mut s, 0).await;
    ctl.stop().await;
}

#[tokio::test]
async fn reported_paths_show_in_the_admin_api_clipped_and_forgotten_with_the_node() {
    let ctl = Ctl::start().await;
    db_to_db_policy(&ctl).await;
    let k = ctl.key("", &["tag:db"], true).await;
    let a = enroll(&ctl, &k, "a").await.unwrap();
    let b = enroll(&ctl, &k, "b").await.unwrap();
    let c = enroll(&ctl, &k, "c").await.unwrap();
    let report = |n: &TestNode, paths: Option<pb::PeerPaths>| {
        signed_request(
            &n.machine,
            methods::REPORT_FLOWS,
            pb::ReportFlowsRequest {
                paths,
                ..Default::default()
            },
            now_ms(),
            &mut OsRng,
        )
    };
    let paths = |direct, relayed, none| {
        Some(pb::PeerPaths {
            direct,
            relayed,
            none,
        })
    };
    let shown = |n: &apb::Node| (n.peers_direct, n.peers_relayed, n.peers_no_path);
    assert_eq!(admin_node(&ctl, &a.name).await.paths_reported_ms, 0);

    // a has two peers (b and c): one direct, one through the relay.
    let before = now_ms();
    ctl.control()
        .await
        .report_flows(report(&a, paths(1, 1, 0)))
        .await
        .unwrap();
    let n = admin_node(&ctl, &a.name).await;
    assert_eq!(shown(&n), (1, 1, 0));
    assert!(
        (before..=now_ms()).contains(&n.paths_reported_ms),
        "stamped on receipt: {}",
        n.paths_reported_ms
    );
    let listed = ctl
        .admin()
        .await
        .list_nodes(apb::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    let by_name = |name: &str| listed.iter().find(|n| n.name == name).unwrap().clone();
    assert_eq!(shown(&by_name(&a.name)), (1, 1, 0));
    assert_eq!(by_name(&b.name).paths_reported_ms, 0, "b never reported");

    // Absurd counts show as at most its peer count; a report without
    // paths (an older node) leaves the last one standing.
    ctl.control()
        .await
        .report_flows(report(&a, paths(u32::MAX, 1_000, 3)))
        .await
        .unwrap();
    assert_eq!(shown(&admin_node(&ctl, &a.name).await), (2, 2, 2));
    ctl.control()
        .await
        .report_flows(report(&a, None))
        .await
        .unwrap();
    assert_eq!(shown(&admin_node(&ctl, &a.name).await), (2, 2, 2));

    // Deleted, the node's report goes with it (ids may be reused).
    ctl.control()
        .await
        .report_flows(report(&c, paths(0, 2, 0)))
        .await
        .unwrap();
    assert_eq!(shown(&admin_node(&ctl, &c.name).await), (0, 2, 0));
    ctl.admin()
        .await
        .delete_node(apb::NodeRef {
            node: c.name.clone(),
        })
        .await
        .unwrap();
    assert_eq!(ctl.mesh.peer_paths(c.id).reported_ms, 0);
    // a's peers are now only b: its counts are clipped to one.
    assert_eq!(shown(&admin_node(&ctl, &a.name).await), (1, 1, 1));
    ctl.stop().await;
}

#[tokio::test]
async fn flow_reports_and_stream_opens_are_limited_per_node() {
    let ctl = Ctl::start().await;
    let k = ctl.key("", &["tag:web"], true).await;
    let a = enroll(&ctl, &k, "a").await.unwrap();
    let b = enroll(&ctl, &k, "b").await.unwrap();
    let report = |n: &TestNode| {
        signed_request(
            &n.machine,
            methods::REPORT_FLOWS,
            pb::ReportFlowsRequest {
                flows: vec![],
                ..Default::default()
            },
            now_ms(),
            &mut OsRng,
        )
    };
    let mut refused = None;
    for i in 0..100 {
        if let Err(s) = ctl.control().await.report_flows(report(&a)).await {
            refused = Some((i, s));
            break;
        }
    }
    let (n, s) = refused.expect("a burst of flow reports is throttled");
    assert!(n >= 5, "only {n} reports accepted");
    assert_eq!(s.code(), Code::ResourceExhausted);
    assert!(s.message().contains("ReportFlows"), "{}", s.message());
    // Another node is unaffected.
    ctl.control().await.report_flows(report(&b)).await.unwrap();

    let mut refused = None;
    for i in 0..100 {
        match open_stream(&ctl, &a).await {
            Ok(s) => drop(s),
            Err(s) => {
                refused = Some((i, s));
                break;
            }
        }
    }
    let (n, s) = refused.expect("a burst of stream opens is throttled");
    assert!(n >= 5, "only {n} opens accepted");
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("StreamNetMap"), "{}", s.message());
    open_stream(&ctl, &b).await.unwrap();
    ctl.stop().await;
}

/// Protocol texts that probe the edges of the one protocol parser: every name
/// in the policy's table (any case), every number 0-255 (with and without
/// leading zeros), and near misses.
fn protocol_candidates() -> Vec<String> {
    let mut out = Vec::new();
    for (name, _) in ztmesh_policy::PROTOCOLS {
        out.push((*name).to_string());
        out.push(name.to_ascii_uppercase());
        out.push(format!("{name}x"));
    }
    for n in 0..=300u32 {
        out.push(n.to_string());
    }
    for odd in [
        "",
        " ",
        "06",
        "006",
        "0006",
        "+6",
        "-1",
        " 6",
        "6 ",
        "0x6",
        "1e2",
        "icmpv6",
        "ipv6",
        "tcpp",
        "any",
        "*",
        "udp,tcp",
        "t\u{0}cp",
        "ＴＣＰ",
    ] {
        out.push(odd.to_string());
    }
    out
}

#[tokio::test]
async fn explain_accepts_exactly_the_protocols_a_policy_accepts() {
    let ctl = Ctl::start().await;
    // One entry per protocol text the policy accepts, each to its own
    // destination address, so explain must map the text to the same number.
    let mut acls = String::new();
    let mut accepted = Vec::new();
    let mut rejected = Vec::new();
    for cand in protocol_candidates() {
        let entry = format!(
            r#"{{"action": "accept", "src": ["*"], "proto": {}, "dst": ["{{DST}}:*"]}}"#,
            serde_json::to_string(&cand).unwrap()
        );
        let alone = format!("{{\"acls\": [{}]}}", entry.replace("{DST}", "100.64.0.1"));
        if ztmesh_policy::Policy::parse("p.hujson", &alone).is_ok() {
            let i = accepted.len() + 1;
            let dst = format!("100.64.{}.{}", i / 250, i % 250 + 1);
            acls += &entry.replace("{DST}", &dst);
            acls += ",\n";
            accepted.push((cand, dst));
        } else {
            rejected.push(cand);
        }
    }
    // Every name in the table and every number 0-255 is a policy protocol.
    assert_eq!(
        accepted.len(),
        2 * ztmesh_policy::PROTOCOLS.len() + 256 + 2,
        "{accepted:?}"
    );
    ctl.set_policy(&format!("{{\"acls\": [\n{acls}]}}")).await;
    let mut admin = ctl.admin().await;
    let mut mismatches = Vec::new();
    for (cand, dst) in &accepted {
        let r = admin
            .explain_policy(apb::ExplainPolicyRequest {
                src: "198.18.0.9".into(),
                dst: dst.clone(),
                port: 1,
                proto: cand.clone(),
            })
            .await;
        match r {
            Ok(e) if e.get_ref().allowed => {}
            other => mismatches.push(format!("policy accepts {cand:?}, explain: {other:?}")),
        }
    }
    for cand in &rejected {
        // The empty text is explain's "not given" (TCP), not a protocol.
        if cand.is_empty() {
            continue;
        }
        let r = admin
            .explain_policy(apb::ExplainPolicyRequest {
                src: "198.18.0.9".into(),
                dst: "100.64.0.1".into(),
                port: 1,
                proto: cand.clone(),
            })
            .await;
        match r {
            Err(s) if s.code() == Code::InvalidArgument => {}
            other => mismatches.push(format!("policy rejects {cand:?}, explain: {other:?}")),
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    ctl.stop().await;
}

#[tokio::test]
async fn policies_with_validation_gaps_are_refused_and_the_old_one_stays() {
    let ctl = Ctl::start().await;
    ctl.set_policy(POLICY).await;
    let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy/tests/golden");
    for case in [
        "self_with_non_user_sources",
        "tests_without_assertions",
        "tests_cidr_destinations",
    ] {
        let file_name = format!("{case}.hujson");
        let text = std::fs::read_to_string(golden.join(&file_name)).unwrap();
        let want = std::fs::read_to_string(golden.join(format!("{case}.err"))).unwrap();
        let e = ctl
            .admin()
            .await
            .set_policy(apb::SetPolicyRequest {
                file_name: file_name.clone(),
                text,
                if_version: None,
            })
            .await
            .err()
            .unwrap_or_else(|| panic!("{case}: accepted"));
        assert_eq!(e.code(), Code::InvalidArgument, "{case}");
        assert_eq!(e.message(), want.trim_end(), "{case}");
        let p = ctl
            .admin()
            .await
            .get_policy(apb::GetPolicyRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(p.text, POLICY, "{case}: the old policy stays in force");
    }
    ctl.stop().await;
}

#[tokio::test]
async fn every_streamed_map_lists_the_configured_relays() {
    let relay = pb::Relay {
        name: "r1".into(),
        quic_addr: "198.18.0.9:7443".into(),
        tcp_addr: "198.18.0.9:443".into(),
        stun_addrs: vec!["198.18.0.9:3478".into(), "198.18.0.9:3479".into()],
        cert_sha256: vec![9; 32],
    };
    let ctl = Ctl::start_with(MeshConfig {
        relays: vec![relay.clone()],
        ..MeshConfig::default()
    })
    .await;
    ctl.set_policy(POLICY).await;
    let kw = ctl.key("", &["tag:web"], false).await;
    let w = enroll(&ctl, &kw, "web").await.unwrap();
    let mut client = ctl.control().await;
    let req = signed_request(
        &w.machine,
        methods::STREAM_NETMAP,
        pb::StreamNetMapRequest {
            have_serial: 0,
            accept_deltas: false,
        },
        now_ms(),
        &mut OsRng,
    );
    let mut stream = client.stream_net_map(req).await.unwrap().into_inner();
    let map = next_map(&ctl, &mut stream, 0).await;
    assert_eq!(map.relays, vec![relay]);
    ctl.stop().await;
}

async fn set_routes(
    ctl: &Ctl,
    node: &TestNode,
    routes: &[&str],
    exit_node: bool,
) -> Result<pb::SetRoutesResponse, tonic::Status> {
    let req = signed_request(
        &node.machine,
        methods::SET_ROUTES,
        pb::SetRoutesRequest {
            routes: routes.iter().map(|r| (*r).to_owned()).collect(),
            exit_node,
        },
        now_ms(),
        &mut OsRng,
    );
    ctl.control()
        .await
        .set_routes(req)
        .await
        .map(|r| r.into_inner())
}

/// A router advertises over the node API (a proof for SetRoutes, not
/// another method's); bad prefixes get INVALID_ARGUMENT naming the route;
/// an admin approves only what is advertised; autoApprovers approve on the
/// spot.
#[tokio::test]
async fn routes_are_advertised_by_the_node_and_approved_by_an_admin_or_the_policy() {
    let ctl = Ctl::start().await;
    ctl.set_policy(POLICY).await;
    let k = ctl.key("", &["tag:db"], true).await;
    let r = enroll(&ctl, &k, "router").await.unwrap();

    let e = set_routes(&ctl, &r, &["198.19.50.7/24"], false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("the prefix is 198.19.50.0/24"),
        "{e:?}"
    );
    // A proof for another method does not authorize SetRoutes.
    let wrong = signed_request(
        &r.machine,
        methods::REPORT_ENDPOINTS,
        pb::SetRoutesRequest {
            routes: vec!["198.19.50.0/24".into()],
            exit_node: false,
        },
        now_ms(),
        &mut OsRng,
    );
    let e = ctl.control().await.set_routes(wrong).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");

    let got = set_routes(&ctl, &r, &["198.19.50.0/24"], true)
        .await
        .unwrap();
    assert!(got.approved.is_empty() && !got.exit_node_approved);
    let mut admin = ctl.admin().await;
    let e = admin
        .set_node_routes(apb::SetNodeRoutesRequest {
            node: r.name.clone(),
            approve: vec!["198.19.60.0/24".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let n = admin
        .set_node_routes(apb::SetNodeRoutesRequest {
            node: r.name.clone(),
            approve: vec!["198.19.50.0/24".into()],
            approve_exit_node: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(n.approved_routes, vec!["198.19.50.0/24".to_string()]);
    assert!(n.exit_node_approved);
    let audit = admin
        .list_audit(apb::ListAuditRequest {
            limit: 20,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(
        audit
            .iter()
            .any(|a| a.action == "node.routes.approve" && a.target == r.name),
        "{audit:?}"
    );

    // autoApprovers: tag:db routers get 198.19.0.0/16 approved on advertise.
    ctl.set_policy(&POLICY.replace(
        r#""acls": ["#,
        r#""autoApprovers": {"routes": {"198.19.0.0/16": ["tag:db"]}}, "acls": ["#,
    ))
    .await;
    let got = set_routes(&ctl, &r, &["198.19.50.0/24", "198.19.70.0/24"], false)
        .await
        .unwrap();
    assert_eq!(got.approved, vec!["198.19.50.0/24", "198.19.70.0/24"]);
    ctl.stop().await;
}

/// API keys carry a role: an auditor reads and changes nothing, a network
/// admin changes the network but not who administers it, and nobody hands
/// out more than they hold. Every refusal is PERMISSION_DENIED naming the
/// role the call needs.
#[tokio::test]
async fn api_key_roles_limit_what_a_caller_may_do() {
    let ctl = Ctl::start().await;
    ctl.set_policy(POLICY).await;
    let key = |role: &'static str| {
        let ctl = &ctl;
        async move {
            ctl.admin()
                .await
                .create_api_key(apb::CreateApiKeyRequest {
                    description: role.into(),
                    expiry_secs: 0,
                    role: role.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .secret
        }
    };
    let remote = |key: &str| ConnArgs {
        data_dir: "/nonexistent".into(),
        server: Some(ctl.url.clone()),
        api_key: Some(key.to_string()),
        fingerprint: Some(auth::hex(&ctl.fp)),
    };
    let auditor = key("auditor").await;
    let netadmin = key("network-admin").await;
    let mut a = cli::connect(&remote(&auditor)).await.unwrap();
    a.list_nodes(apb::ListNodesRequest {}).await.unwrap();
    a.get_policy(apb::GetPolicyRequest {}).await.unwrap();
    a.list_audit(apb::ListAuditRequest {
        limit: 5,
        ..Default::default()
    })
    .await
    .unwrap();
    let e = a
        .set_policy(apb::SetPolicyRequest {
            file_name: "p.hujson".into(),
            text: POLICY.into(),
            if_version: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("auditor role") && e.message().contains("network-admin or admin"),
        "{}",
        e.message()
    );
    let e = a
        .create_user(apb::CreateUserRequest {
            login: "eve@example.com".into(),
            role: "admin".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Vouching for a device is a network admin's act, not an auditor's.
    let e = a
        .set_node_attributes(apb::SetNodeAttributesRequest {
            node: "web".into(),
            set: vec![apb::Attribute {
                key: "custom:compliant".into(),
                value: Some(apb::attribute::Value::Flag(true)),
            }],
            unset: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    // Audited: three refusals of one actor within a minute make one row;
    // its reads, one row each.
    let denied = audit_rows(&ctl, "api.denied").await;
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert_eq!(denied[0].target, "SetPolicy");
    assert!(denied[0].detail.contains("auditor"), "{denied:?}");
    let reads = audit_rows(&ctl, "api.read").await;
    let auditor_reads: Vec<&str> = reads
        .iter()
        .filter(|r| r.actor == denied[0].actor)
        .map(|r| r.target.as_str())
        .collect();
    assert_eq!(auditor_reads, ["ListAudit", "GetPolicy", "ListNodes"]);

    let mut n = cli::connect(&remote(&netadmin)).await.unwrap();
    n.create_auth_key(apb::CreateAuthKeyRequest {
        tags: vec!["tag:web".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    for e in [
        n.create_api_key(apb::CreateApiKeyRequest {
            description: "escalate".into(),
            expiry_secs: 0,
            role: "admin".into(),
        })
        .await
        .unwrap_err(),
        n.update_user(apb::UpdateUserRequest {
            login: "alice@example.com".into(),
            role: "admin".into(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
    ] {
        assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    }

    // An admin cannot issue a member key (a member has no admin access)
    // nor an unknown role.
    for role in ["member", "root"] {
        let e = ctl
            .admin()
            .await
            .create_api_key(apb::CreateApiKeyRequest {
                description: "x".into(),
                expiry_secs: 0,
                role: role.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{role}: {}", e.message());
    }
    // Listed with their roles; the refusals changed nothing.
    let keys = ctl
        .admin()
        .await
        .list_api_keys(apb::ListKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    let roles: Vec<&str> = keys.iter().map(|k| k.role.as_str()).collect();
    assert_eq!(roles, ["auditor", "network-admin"]);
    ctl.stop().await;
}

async fn report_posture(
    ctl: &Ctl,
    node: &TestNode,
    attributes: Vec<pb::PostureAttribute>,
) -> Result<Vec<String>, tonic::Status> {
    let req = signed_request(
        &node.machine,
        methods::REPORT_POSTURE,
        pb::ReportPostureRequest { attributes },
        now_ms(),
        &mut OsRng,
    );
    Ok(ctl
        .control()
        .await
        .report_posture(req)
        .await?
        .into_inner()
        .clipped)
}

#[tokio::test]
async fn posture_reports_are_node_authenticated_clipped_and_throttled() {
    use pb::posture_attribute::Value;
    let ctl = Ctl::start().await;
    ctl.set_policy(POLICY).await;
    let kw = ctl.key("", &["tag:web"], false).await;
    let w = enroll(&ctl, &kw, "web").await.unwrap();
    let attr = |k: &str, v: Value| pb::PostureAttribute {
        key: k.into(),
        value: Some(v),
    };

    // Without a proof, or with a proof for another call: refused.
    let mut c = ctl.control().await;
    let e = c
        .report_posture(pb::ReportPostureRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let req = signed_request(
        &w.machine,
        methods::REPORT_ENDPOINTS,
        pb::ReportPostureRequest::default(),
        now_ms(),
        &mut OsRng,
    );
    assert_eq!(
        c.report_posture(req).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    // A node's own claim to be compliant is dropped and said so.
    let clipped = report_posture(
        &ctl,
        &w,
        vec![
            attr("node:os", Value::Text("linux".into())),
            attr("custom:compliant", Value::Flag(true)),
        ],
    )
    .await
    .unwrap();
    assert_eq!(clipped.len(), 1, "{clipped:?}");
    assert!(clipped[0].contains("custom:compliant"), "{clipped:?}");
    let n = ctl
        .admin()
        .await
        .get_node(apb::NodeRef { node: "web".into() })
        .await
        .unwrap()
        .into_inner();
    let keys: Vec<&str> = n.attributes.iter().map(|a| a.key.as_str()).collect();
    assert_eq!(keys, ["node:os"]);
    assert!(n.posture_reported_ms > 0);

    // A burst is throttled with a message naming the call.
    let mut refused = None;
    for _ in 0..30 {
        if let Err(s) = report_posture(&ctl, &w, vec![]).await {
            refused = Some(s);
            break;
        }
    }
    let s = refused.expect("a burst of 30 reports was not throttled");
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("ReportPosture"), "{}", s.message());
    ctl.stop().await;
}

#[tokio::test]
async fn reported_flows_are_listed_by_node_kind_and_time_and_read_by_an_auditor() {
    let ctl = Ctl::start().await;
    let k = ctl.key("", &["tag:db"], true).await;
    let db = enroll(&ctl, &k, "db").await.unwrap();
    let web = enroll(&ctl, &k, "web").await.unwrap();
    let (db_ip, web_ip) = (
        node_v4(&ctl, &db.name).await,
        node_v4(&ctl, &web.name).await,
    );
    let flow = |dst: &str, allowed: bool, port: u32| pb::FlowSummary {
        src: "100.64.0.200".into(),
        dst: dst.into(),
        protocol: 6,
        dst_port: port,
        allowed,
        rule_id: if allowed {
            "p.hujson:7".into()
        } else {
            String::new()
        },
        reason: if allowed {
            String::new()
        } else {
            "no_rule".into()
        },
        packets: 4,
        bytes: 400,
        ..Default::default()
    };
    let report = |n: &TestNode, flows: Vec<pb::FlowSummary>| {
        signed_request(
            &n.machine,
            methods::REPORT_FLOWS,
            pb::ReportFlowsRequest {
                flows,
                ..Default::default()
            },
            now_ms(),
            &mut OsRng,
        )
    };
    let before = now_ms();
    ctl.control()
        .await
        .report_flows(report(
            &db,
            vec![
                flow(&db_ip, true, 5432),
                flow(&db_ip, false, 22),
                // A flow "to" another node is not db's to report.
                flow(&web_ip, false, 22),
            ],
        ))
        .await
        .unwrap();
    ctl.control()
        .await
        .report_flows(report(&web, vec![flow(&web_ip, true, 443)]))
        .await
        .unwrap();
    let list = |req: apb::ListFlowsRequest| {
        let ctl = &ctl;
        async move { ctl.admin().await.list_flows(req).await }
    };
    let all = list(apb::ListFlowsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .flows;
    assert_eq!(all.len(), 3);
    assert_eq!(all[0].node, "web", "newest first");
    let of_db = list(apb::ListFlowsRequest {
        node: db.name.clone(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .flows;
    assert_eq!(of_db.len(), 2);
    assert!(of_db.iter().all(|f| f.node_id == db.id));
    let denied = list(apb::ListFlowsRequest {
        denied_only: true,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .flows;
    assert_eq!(denied.len(), 1);
    assert_eq!(
        (denied[0].dst_port, denied[0].reason.as_str()),
        (22, "no_rule")
    );
    assert_eq!(denied[0].rule_id, "");
    assert_eq!(denied[0].dst, db_ip);
    let allowed = list(apb::ListFlowsRequest {
        allowed_only: true,
        node: db.id.to_string(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .flows;
    assert_eq!(allowed.len(), 1);
    assert_eq!(
        (
            allowed[0].rule_id.as_str(),
            allowed[0].packets,
            allowed[0].bytes
        ),
        ("p.hujson:7", 4, 400)
    );
    assert!(allowed[0].time_ms >= before);
    let later = list(apb::ListFlowsRequest {
        since_ms: now_ms() + 60_000,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .flows;
    assert!(later.is_empty());
    // Paging back from the newest record.
    let page = list(apb::ListFlowsRequest {
        before_id: all[0].id,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .flows;
    assert_eq!(page.len(), 2);
    assert!(page.iter().all(|f| f.id < all[0].id));
    // Precise refusals.
    let e = list(apb::ListFlowsRequest {
        denied_only: true,
        allowed_only: true,
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // A deleted node's records stay readable by its name or id.
    ctl.admin()
        .await
        .delete_node(apb::NodeRef {
            node: web.name.clone(),
        })
        .await
        .unwrap();
    for node in [web.name.clone(), web.id.to_string()] {
        let got = list(apb::ListFlowsRequest {
            node,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .flows;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].dst_port, 443);
    }
    // An auditor reads the flow log; the read is audited.
    let mut a = remote_as(&ctl, "auditor").await;
    let got = a
        .list_flows(apb::ListFlowsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .flows;
    assert_eq!(got.len(), 3);
    let reads = audit_rows(&ctl, "api.read").await;
    assert!(
        reads
            .iter()
            .any(|r| r.detail.contains("ListFlows") || r.target.contains("ListFlows")),
        "{reads:?}"
    );
    ctl.stop().await;
}

/// Respond over the wire: reports from two receivers quarantine a scanning
/// node (its stream's next map is empty and says why), an auditor lists the
/// detection but cannot release, an admin can; bad requests get precise
/// statuses.
#[tokio::test]
async fn receivers_reports_quarantine_a_scanner_and_release_is_an_admins_act() {
    let ctl = Ctl::start().await;
    let k = ctl.key("", &["tag:db"], true).await;
    let scanner = enroll(&ctl, &k, "scanner").await.unwrap();
    let a = enroll(&ctl, &k, "a").await.unwrap();
    let b = enroll(&ctl, &k, "b").await.unwrap();
    db_to_db_policy(&ctl).await;
    let scanner_ip = node_v4(&ctl, &scanner.name).await;
    let report = |n: &TestNode, flows: Vec<pb::FlowSummary>, hs: Vec<pb::UnknownHandshakes>| {
        signed_request(
            &n.machine,
            methods::REPORT_FLOWS,
            pb::ReportFlowsRequest {
                flows,
                unknown_handshakes: hs,
                paths: None,
            },
            now_ms(),
            &mut OsRng,
        )
    };
    let scan: Vec<pb::FlowSummary> = (1..=100)
        .map(|port| pb::FlowSummary {
            src: scanner_ip.clone(),
            dst: "100.64.0.250".into(),
            protocol: 6,
            dst_port: port,
            allowed: false,
            reason: "port_not_allowed".into(),
            packets: 1,
            ..Default::default()
        })
        .collect();
    // Too many handshake entries: refused whole, nothing recorded.
    let many = vec![pb::UnknownHandshakes::default(); 257];
    let e = ctl
        .control()
        .await
        .report_flows(report(&a, scan.clone(), many))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(admin_node(&ctl, &scanner.name).await.quarantined_since_ms == 0);
    for r in [&a, &b] {
        ctl.control()
            .await
            .report_flows(report(r, scan.clone(), vec![]))
            .await
            .unwrap();
    }
    let q = admin_node(&ctl, &scanner.name).await;
    assert!(q.quarantined_since_ms > 0, "{q:?}");
    assert!(q.quarantine_reason.contains("scan_ports"), "{q:?}");

    let mut auditor = remote_as(&ctl, "auditor").await;
    let found = auditor
        .list_detections(apb::ListDetectionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .detections;
    assert_eq!(found.len(), 1);
    assert_eq!(
        (found[0].node.as_str(), found[0].action.as_str()),
        ("scanner", "quarantine")
    );
    assert!(found[0]
        .evidence_json
        .contains("\"reporter_names\":[\"a\"]"));
    let e = auditor
        .release_node(apb::NodeRef {
            node: "scanner".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let released = ctl
        .admin()
        .await
        .release_node(apb::NodeRef {
            node: "scanner".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(released.quarantined_since_ms, 0);
    let e = ctl
        .admin()
        .await
        .release_node(apb::NodeRef {
            node: "scanner".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = ctl
        .admin()
        .await
        .release_node(apb::NodeRef {
            node: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let actions: Vec<String> = audit_rows(&ctl, "node.release")
        .await
        .into_iter()
        .map(|r| r.actor)
        .collect();
    assert_eq!(actions.len(), 1, "{actions:?}");
    ctl.stop().await;
}

/// Framing over the wire: one node reports, as loudly as the limits allow,
/// forged denied flows and handshakes "from" a victim; nobody is
/// quarantined and nothing is detected.
#[tokio::test]
async fn one_node_reporting_forged_flows_from_a_victim_frames_nobody() {
    let ctl = Ctl::start().await;
    let k = ctl.key("", &["tag:db"], true).await;
    let victim = enroll(&ctl, &k, "victim").await.unwrap();
    let liar = enroll(&ctl, &k, "liar").await.unwrap();
    let _bystander = enroll(&ctl, &k, "bystander").await.unwrap();
    db_to_db_policy(&ctl).await;
    let victim_ip = node_v4(&ctl, "victim").await;
    let forged: Vec<pb::FlowSummary> = (1..=9_000)
        .map(|port| pb::FlowSummary {
            src: victim_ip.clone(),
            dst: "100.64.0.250".into(),
            protocol: 6,
            dst_port: port,
            allowed: false,
            reason: "port_not_allowed".into(),
            packets: u64::MAX,
            ..Default::default()
        })
        .collect();
    let hs = vec![pb::UnknownHandshakes {
        wg_key: victim.wg.public().0.to_vec(),
        count: u64::MAX,
    }];
    let mut sent = 0;
    for _ in 0..12 {
        let req = signed_request(
            &liar.machine,
            methods::REPORT_FLOWS,
            pb::ReportFlowsRequest {
                flows: forged.clone(),
                unknown_handshakes: hs.clone(),
                paths: None,
            },
            now_ms(),
            &mut OsRng,
        );
        match ctl.control().await.report_flows(req).await {
            Ok(_) => sent += 1,
            Err(s) => assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}"),
        }
    }
    assert!(sent >= 10, "the liar got its reports in: {sent}");
    let v = admin_node(&ctl, "victim").await;
    assert_eq!(v.quarantined_since_ms, 0, "{v:?}");
    let found = ctl
        .admin()
        .await
        .list_detections(apb::ListDetectionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .detections;
    assert!(found.is_empty(), "{found:?}");
    ctl.stop().await;
}

#[tokio::test]
async fn a_stream_the_node_drops_ends_its_session_and_a_new_one_opens() {
    let ctl = Ctl::start().await;
    ctl.set_policy(POLICY).await;
    let kw = ctl.key("", &["tag:web"], false).await;
    let w = enroll(&ctl, &kw, "web").await.unwrap();
    for round in 0..3 {
        let mut s = open_stream(&ctl, &w)
            .await
            .unwrap_or_else(|e| panic!("round {round}: the earlier stream was not closed: {e:?}"));
        next_map(&ctl, &mut s, 0).await;
        assert!(
            is_online(&ctl, "web").await,
            "round {round}: online while streaming"
        );
        // The node goes away without a word: its stream (and its
        // connection) are dropped.
        drop(s);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while is_online(&ctl, "web").await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: still online 10 s after its stream was dropped"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    ctl.stop().await;
}

async fn is_online(ctl: &Ctl, name: &str) -> bool {
    ctl.admin()
        .await
        .list_nodes(apb::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes
        .iter()
        .any(|n| n.name == name && n.online)
}

/// Issue 19: the netmap signing key is replaced with a node connected. The
/// stream gets a map of the new key at once, carrying the hand-over a node
/// holding the old key verifies; only admins may rotate; a second rotation
/// waits for the grace period; the old key is gone from the data dir and
/// the audit chain (checkpoints of both keys) still verifies.
#[tokio::test]
async fn the_signing_key_is_rotated_with_a_node_connected() {
    let ctl = Ctl::start().await;
    ctl.set_policy(POLICY).await;
    let kw = ctl.key("", &["tag:web"], false).await;
    let w = enroll(&ctl, &kw, "web").await.unwrap();
    let mut sw = open_stream(&ctl, &w).await.unwrap();
    let old = ctl.mesh.controller_key();
    let m0 = next_map(&ctl, &mut sw, 0).await;
    assert!(m0.trust.is_none(), "nothing rotates yet");
    ctl.mesh.sign_audit_head(now_ms());
    let rotate = |grace_ms| apb::RotateSigningKeyRequest { grace_ms };

    for role in ["network-admin", "auditor"] {
        let e = remote_as(&ctl, role)
            .await
            .rotate_signing_key(rotate(60_000))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{role}: {}", e.message());
    }
    for bad in [0, -1, 400 * 24 * 3_600_000] {
        let e = ctl
            .admin()
            .await
            .rotate_signing_key(rotate(bad))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad}: {}", e.message());
    }
    assert_eq!(ctl.mesh.controller_key(), old, "refusals change nothing");

    let r = ctl
        .admin()
        .await
        .rotate_signing_key(rotate(60_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.old_key, old.to_string());
    let new = ctl.mesh.controller_key();
    assert_eq!(r.new_key, new.to_string());
    assert_ne!(new, old);
    assert_eq!(r.not_after_ms - r.valid_from_ms, 60_000);

    let signed = tokio::time::timeout(Duration::from_secs(1), sw.message())
        .await
        .expect("a map at once")
        .unwrap()
        .expect("stream open");
    assert_eq!(
        netmap::verify(&old, &signed, m0.serial, now_ms()),
        Err(netmap::NetMapError::BadSignature)
    );
    let (m1, adopted) = netmap::verify_rotating(&old, &signed, m0.serial, now_ms()).unwrap();
    assert_eq!(adopted, Some(new));
    assert_eq!(m1.peers, m0.peers, "only the key changed");

    let e = ctl
        .admin()
        .await
        .rotate_signing_key(rotate(60_000))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert_eq!(ctl.mesh.controller_key(), new);

    let rows = audit_rows(&ctl, "controller.rotate-signing").await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].target, new.to_string());
    assert!(rows[0].detail.contains(&old.to_string()), "{:?}", rows[0]);
    let on_disk = SigningKey::load(&ctl.data.signing_key()).unwrap().public();
    assert_eq!(on_disk, new, "the old private key is gone");
    assert!(ctl.data.root.join("handover.bin").exists());
    assert!(!ctl.data.root.join("controller.key.next").exists());

    // A node enrolling now learns the new key.
    let kd = ctl.key("", &["tag:db"], false).await;
    let machine = SigningKey::generate(&mut OsRng);
    let wg = WgPrivateKey::generate(&mut OsRng);
    let resp = ctl
        .control()
        .await
        .enroll(enroll_request(&kd, &machine, &wg, "db"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.controller_key, new.as_bytes().to_vec());

    ctl.mesh.sign_audit_head(now_ms() + 1);
    let verified = ctl.mesh.verify_audit().unwrap().expect("chain verifies");
    assert!(verified.signed_head.is_some());
    ctl.stop().await;
}

/// Control protocol versions (`x-ztmesh-protocol`): this controller (1.1)
/// serves nodes that send no version (1.0, the first release), 1.0, 1.1
/// and 1.2, and says its own version in every answer; it refuses others
/// with FAILED_PRECONDITION naming both versions and the side to upgrade,
/// and a malformed version with INVALID_ARGUMENT, on every control call
/// (the raw netmap stream and the login stream too), before anything else:
/// a refused enrollment does not use up the key.
#[tokio::test]
async fn control_calls_are_served_within_one_minor_version_and_refused_outside() {
    use ztmesh_proto::protocol::{Version, HEADER};
    use ztmesh_proto::refusal::{self, AuthReason};
    assert_eq!(
        Version::CURRENT.to_string(),
        "1.1",
        "the table below is for 1.1"
    );
    let ctl = Ctl::start().await;
    let single_use = ctl.key("", &["tag:web"], false).await;
    let reusable = ctl.key("", &["tag:web"], true).await;
    fn with<T>(version: Option<&str>, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(v) = version {
            r.metadata_mut().insert(HEADER, v.parse().unwrap());
        }
        r
    }
    let machine = SigningKey::generate(&mut OsRng);
    let wg = WgPrivateKey::generate(&mut OsRng);

    for (version, upgrade) in [
        ("0.9", "the node"),
        ("0.1", "the node"),
        ("1.3", "the controller"),
        ("2.0", "the controller"),
        ("2.1", "the controller"),
    ] {
        let e = ctl
            .control()
            .await
            .enroll(with(
                Some(version),
                enroll_request(&single_use, &machine, &wg, "old"),
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{version}: {e:?}");
        assert_eq!(
            e.message(),
            format!(
                "node speaks control protocol {version}; this controller (1.1) accepts 1.0 to 1.2: upgrade {upgrade}"
            )
        );
        assert_eq!(
            refusal::refusal(&e).reason,
            Some(Ok(AuthReason::Incompatible))
        );
        assert_eq!(e.metadata().get(HEADER).unwrap(), "1.1");
    }
    for garbage in ["garbage", "", "1", "1.1.1", "v1.1", "1.x", "99999999.1"] {
        let e = ctl
            .control()
            .await
            .enroll(with(
                Some(garbage),
                enroll_request(&single_use, &machine, &wg, "bad"),
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{garbage:?}: {e:?}");
        assert!(e.message().contains("x-ztmesh-protocol"), "{}", e.message());
    }

    // Served: the single-use key is still unused.
    let resp = ctl
        .control()
        .await
        .enroll(with(
            Some("1.2"),
            enroll_request(&single_use, &machine, &wg, "new"),
        ))
        .await
        .unwrap();
    assert_eq!(resp.metadata().get(HEADER).unwrap(), "1.1");
    let node = TestNode {
        machine,
        wg,
        id: resp.get_ref().node_id,
        name: resp.get_ref().name.clone(),
    };
    for version in [None, Some("1.0"), Some("1.1")] {
        let machine = SigningKey::generate(&mut OsRng);
        let wg = WgPrivateKey::generate(&mut OsRng);
        let resp = ctl
            .control()
            .await
            .enroll(with(
                version,
                enroll_request(&reusable, &machine, &wg, "peer"),
            ))
            .await
            .unwrap_or_else(|e| panic!("{version:?}: {e:?}"));
        assert_eq!(resp.metadata().get(HEADER).unwrap(), "1.1");
    }

    // The raw netmap stream: refused outside the range, served within.
    let stream_req = |version: Option<&str>| {
        let mut r = signed_request(
            &node.machine,
            methods::STREAM_NETMAP,
            pb::StreamNetMapRequest {
                have_serial: 0,
                accept_deltas: false,
            },
            now_ms(),
            &mut OsRng,
        );
        if let Some(v) = version {
            r.metadata_mut().insert(HEADER, v.parse().unwrap());
        }
        r
    };
    let e = ctl
        .control()
        .await
        .stream_net_map(stream_req(Some("2.0")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("upgrade the controller"), "{e:?}");
    let e = ctl
        .control()
        .await
        .stream_net_map(stream_req(Some("one")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let resp = ctl
        .control()
        .await
        .stream_net_map(stream_req(Some("1.2")))
        .await
        .unwrap();
    assert_eq!(resp.metadata().get(HEADER).unwrap(), "1.1");
    let mut stream = resp.into_inner();
    next_map(&ctl, &mut stream, 0).await;
    drop(stream);

    // The login stream and a node-authenticated report.
    let e = ctl
        .control()
        .await
        .login(with(Some("1.3"), pb::LoginRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let mut report = signed_request(
        &node.machine,
        methods::REPORT_ENDPOINTS,
        pb::ReportEndpointsRequest { endpoints: vec![] },
        now_ms(),
        &mut OsRng,
    );
    report.metadata_mut().insert(HEADER, "0.9".parse().unwrap());
    let e = ctl
        .control()
        .await
        .report_endpoints(report)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("upgrade the node"), "{e:?}");
    ctl.stop().await;
}

/// Connects a control client that accepts only `pins` (asking for the first).
async fn control_pinned(
    ctl: &Ctl,
    pins: &[[u8; 32]],
) -> Result<pb::control_client::ControlClient<tonic::transport::Channel>, String> {
    ztmesh_proto::tls::connect_any(&ctl.url, pins, Duration::from_secs(5))
        .await
        .map(pb::control_client::ControlClient::new)
        .map_err(|e| e.to_string())
}

fn hex32(s: &str) -> [u8; 32] {
    auth::parse_fingerprint(s).unwrap_or_else(|| panic!("not a fingerprint: {s:?}"))
}

#[tokio::test]
async fn tls_certificate_is_rotated_with_a_node_connected() {
    let ctl = Ctl::start().await;
    ctl.set_policy(POLICY).await;
    let old = ctl.fp;
    let kw = ctl.key("", &["tag:web"], false).await;
    let w = enroll(&ctl, &kw, "web").await.unwrap();
    let mut sw = open_stream(&ctl, &w).await.unwrap();
    let m0 = next_map(&ctl, &mut sw, 0).await;
    assert!(m0.trust.is_none(), "nothing rotates yet");
    // Minted before the switch: carries the old fingerprint.
    let before = ctl.key("", &["tag:db"], true).await;

    for role in ["network-admin", "auditor"] {
        let mut c = remote_as(&ctl, role).await;
        let e = c
            .stage_tls_cert(apb::StageTlsCertRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{role}: {}", e.message());
        let e = c
            .switch_tls_cert(apb::SwitchTlsCertRequest { grace_ms: 0 })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{role}: {}", e.message());
    }
    let e = ctl
        .admin()
        .await
        .switch_tls_cert(apb::SwitchTlsCertRequest { grace_ms: 60_000 })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::FailedPrecondition,
        "nothing staged: {}",
        e.message()
    );
    let e = ctl
        .admin()
        .await
        .stage_tls_cert(apb::StageTlsCertRequest {
            cert_pem: "not a certificate".into(),
            key_pem: "nor a key".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());

    // Stage: the connected node's next map lists both pins, current first.
    let staged = ctl
        .admin()
        .await
        .stage_tls_cert(apb::StageTlsCertRequest::default())
        .await
        .unwrap()
        .into_inner();
    let new = hex32(&staged.next);
    assert_eq!(hex32(&staged.current), old);
    assert_ne!(new, old);
    assert!(ctl.data.root.join("tls.next.key").exists());
    let m1 = next_map(&ctl, &mut sw, m0.serial).await;
    let pins = m1.trust.expect("the map carries the pins").tls_pins;
    assert_eq!(pins, vec![old.to_vec(), new.to_vec()]);
    // Presented before the switch only to a client that asks for it.
    control_pinned(&ctl, &[new]).await.unwrap();
    assert!(control_pinned(&ctl, &[[7; 32], new]).await.is_err());

    // Switch.
    let switched = ctl
        .admin()
        .await
        .switch_tls_cert(apb::SwitchTlsCertRequest { grace_ms: 60_000 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (hex32(&switched.current), hex32(&switched.previous)),
        (new, old)
    );
    assert!(switched.next.is_empty());
    assert_eq!(
        ctl.mesh.fingerprint(),
        new,
        "new auth keys carry the new pin"
    );
    let m2 = next_map(&ctl, &mut sw, m1.serial).await;
    assert_eq!(
        m2.trust
            .expect("pins while the old one is retained")
            .tls_pins,
        vec![new.to_vec(), old.to_vec()]
    );
    // Pinned only to the new certificate: connects, and an unknown hint
    // gets the current certificate.
    control_pinned(&ctl, &[new]).await.unwrap();
    control_pinned(&ctl, &[[7; 32], new]).await.unwrap();
    // Pinned only to the old one: connects through the ALPN hint while it
    // is retained.
    control_pinned(&ctl, &[old]).await.unwrap();
    // Keys minted before and after the switch both enroll.
    enroll(&ctl, &before, "db-before").await.unwrap();
    let after = ctl.key("", &["tag:db"], false).await;
    let presented = ztmesh_controller::secrets::Presented::parse(
        ztmesh_controller::secrets::SecretKind::AuthKey,
        &after,
    )
    .unwrap();
    assert_eq!(presented.fingerprint(), Some(new));
    let mut c = control_pinned(&ctl, &[new]).await.unwrap();
    let machine = SigningKey::generate(&mut OsRng);
    let wg = WgPrivateKey::generate(&mut OsRng);
    c.enroll(enroll_request(&after, &machine, &wg, "db-after"))
        .await
        .unwrap();

    // A second switch while the old one is retained is refused.
    ctl.admin()
        .await
        .stage_tls_cert(apb::StageTlsCertRequest::default())
        .await
        .unwrap();
    let e = ctl
        .admin()
        .await
        .switch_tls_cert(apb::SwitchTlsCertRequest { grace_ms: 0 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());

    let status = ctl
        .admin()
        .await
        .get_tls_status(apb::GetTlsStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hex32(&status.current), new);
    assert_eq!(hex32(&status.previous), old);
    for action in ["controller.tls-stage", "controller.tls-switch"] {
        let rows = audit_rows(&ctl, action).await;
        assert!(!rows.is_empty(), "{action} audited");
    }
    let rows = audit_rows(&ctl, "controller.tls-switch").await;
    assert_eq!(rows[0].target, auth::hex(&new));
    // A restart keeps what is held.
    let held = ztmesh_controller::tlscerts::TlsFiles::in_dir(&ctl.data.root)
        .load()
        .unwrap();
    assert_eq!(held.current.fingerprint, new);
    assert_eq!(held.previous.map(|p| p.cert.fingerprint), Some(old));
    assert_eq!(
        ztmesh_controller::server::fingerprint(&ctl.data).unwrap(),
        new
    );
}

#[tokio::test]
async fn tls_previous_certificate_goes_once_its_grace_and_its_keys_are_over() {
    let ctl = Ctl::start().await;
    let old = ctl.fp;
    let before = ctl.key("", &["tag:db"], true).await;
    let admin = || async { ctl.admin().await };
    admin()
        .await
        .stage_tls_cert(apb::StageTlsCertRequest::default())
        .await
        .unwrap();
    let s = admin()
        .await
        .switch_tls_cert(apb::SwitchTlsCertRequest { grace_ms: 0 })
        .await
        .unwrap()
        .into_inner();
    let new = hex32(&s.current);
    // The grace period is over, but a key minted before is live.
    ctl.mesh.tick_at(now_ms() + 1, 1);
    let held = ctl.mesh.tls_state().unwrap();
    assert_eq!(held.previous.map(|p| p.cert.fingerprint), Some(old));
    // Revoked: the old certificate goes, and with it its pin in maps.
    let key_id = before.split('.').nth(1).unwrap().to_string();
    admin()
        .await
        .revoke_auth_key(apb::KeyRef { key_id })
        .await
        .unwrap();
    ctl.mesh.tick_at(now_ms() + 2, 2);
    assert!(
        ctl.mesh.tls_state().unwrap().previous.is_some(),
        "the keys are listed again a minute later, not every tick"
    );
    ctl.mesh.tick_at(now_ms() + 61_000, 3);
    let held = ctl.mesh.tls_state().unwrap();
    assert!(held.previous.is_none());
    assert!(held.pins().is_empty());
    assert!(!ctl.data.root.join("tls.prev.crt").exists());
    assert_eq!(
        audit_rows(&ctl, "controller.tls-previous-end").await.len(),
        1
    );
    assert!(
        control_pinned(&ctl, &[old]).await.is_err(),
        "no longer presented"
    );
    control_pinned(&ctl, &[new]).await.unwrap();
}

/// The calls the admin console added: an admin's quarantine with a reason
/// (network admins may, auditors may not; a second one or an empty reason
/// gets a precise status), the policy graph (read access), and the audit
/// log's filters.
#[tokio::test]
async fn quarantine_by_hand_the_policy_graph_and_audit_filters() {
    let ctl = Ctl::start().await;
    ctl.set_policy(POLICY).await;
    let kw = ctl.key("", &["tag:web"], false).await;
    enroll(&ctl, &kw, "web").await.unwrap();
    let q = |reason: &str| apb::QuarantineNodeRequest {
        node: "web".into(),
        reason: reason.into(),
    };
    let e = remote_as(&ctl, "auditor")
        .await
        .quarantine_node(q("stolen"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    let mut na = remote_as(&ctl, "network-admin").await;
    let e = na.quarantine_node(q("  ")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    let e = na
        .quarantine_node(apb::QuarantineNodeRequest {
            node: "nope".into(),
            reason: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(ctl.mesh.find_node("web").unwrap().quarantine.is_none());
    let n = na.quarantine_node(q("stolen")).await.unwrap().into_inner();
    assert!(n.quarantined_since_ms > 0);
    assert!(
        n.quarantine_reason.ends_with(": stolen"),
        "{}",
        n.quarantine_reason
    );
    let e = na.quarantine_node(q("again")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    na.release_node(apb::NodeRef { node: "web".into() })
        .await
        .unwrap();

    let g = remote_as(&ctl, "auditor")
        .await
        .get_policy_graph(apb::GetPolicyGraphRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.version, 1);
    assert!(!g.edges.is_empty());
    assert!(g
        .edges
        .iter()
        .all(|e| e.rule_id.starts_with("policy.hujson:")));

    let audit = |r: apb::ListAuditRequest| {
        let ctl = &ctl;
        async move {
            ctl.admin()
                .await
                .list_audit(r)
                .await
                .map(|r| r.into_inner().events)
        }
    };
    let node_rows = audit(apb::ListAuditRequest {
        action: "node.*".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let actions: Vec<&str> = node_rows.iter().map(|e| e.action.as_str()).collect();
    assert!(
        actions.contains(&"node.quarantine") && actions.contains(&"node.release"),
        "{actions:?}"
    );
    assert!(
        actions.iter().all(|a| a.starts_with("node.")),
        "{actions:?}"
    );
    let stolen = audit(apb::ListAuditRequest {
        text: "STOLEN".into(),
        action: "node.quarantine".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(stolen.len(), 1);
    let newest = stolen[0].id;
    let older = audit(apb::ListAuditRequest {
        before_id: newest,
        limit: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(older.len() == 1 && older[0].id < newest);
    let future = audit(apb::ListAuditRequest {
        since_ms: now_ms() + 3_600_000,
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(future.is_empty());
    let e = audit(apb::ListAuditRequest {
        text: "x".repeat(300),
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    ctl.stop().await;
}

/// `SetPolicy` with `if_version` replaces only the version a plan was made
/// against: of two admins applying plans made against one version, the
/// second is refused and changes nothing.
#[tokio::test]
async fn a_policy_applied_over_a_stale_version_is_refused() {
    let ctl = Ctl::start().await;
    ctl.set_policy(POLICY).await;
    let set = |text: &str, if_version: Option<u64>| apb::SetPolicyRequest {
        file_name: "policy.hujson".into(),
        text: text.into(),
        if_version,
    };
    let mut a = ctl.admin().await;
    let v2 = a
        .set_policy(set(POLICY, Some(1)))
        .await
        .unwrap()
        .into_inner()
        .version;
    assert_eq!(v2, 2);
    let e = a.set_policy(set("{}", Some(1))).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(
        e.message().contains("version 2 is in force"),
        "{}",
        e.message()
    );
    let p = a
        .get_policy(apb::GetPolicyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((p.version, p.text.as_str()), (2, POLICY));
    assert_eq!(
        a.set_policy(set("{}", None))
            .await
            .unwrap()
            .into_inner()
            .version,
        3
    );
    ctl.stop().await;
}
