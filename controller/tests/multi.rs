//! Two real controllers (TLS listeners, admin sockets, the change feed and
//! the leader session) serving one real PostgreSQL database, driven through
//! real tonic clients: what one does, nodes streaming from the other see;
//! keys, names and addresses stay single across both; exactly one leads.
//!
//! Without the test cluster (`scripts/pg.sh`, `ZTMESH_TEST_PG`) these pass
//! without running, unless `ZTMESH_REQUIRE_POSTGRES` is set.
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use ztmesh_controller::now_ms;
use ztmesh_proto::admin as apb;
use ztmesh_proto::control as pb;
use ztmesh_proto::netmap;

mod common;
use common::{enroll, open_stream, Ctl};

/// Liveness bound for a change to cross controllers (the target is 1 s;
/// the feed also polls every 5 s without a notification).
const ACROSS: Duration = Duration::from_secs(25);

const ALL: &str = r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}"#;
const NONE: &str = r#"{"acls": []}"#;

/// The next map on `s` (signed by the shared key, serial above `have`).
async fn next_map(
    ctl: &Ctl,
    s: &mut tonic::Streaming<pb::SignedNetMap>,
    have: u64,
    within: Duration,
) -> pb::NetMap {
    let signed = tokio::time::timeout(within, s.message())
        .await
        .expect("a netmap in time")
        .unwrap()
        .expect("stream open");
    netmap::verify(&ctl.mesh.controller_key(), &signed, have, now_ms()).expect("valid netmap")
}

/// Maps on `s` until one satisfies `want`; how long that took.
async fn until_map(
    ctl: &Ctl,
    s: &mut tonic::Streaming<pb::SignedNetMap>,
    have: &mut u64,
    want: impl Fn(&pb::NetMap) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let left = ACROSS.saturating_sub(start.elapsed());
        let m = next_map(ctl, s, *have, left).await;
        *have = m.serial;
        if want(&m) {
            return start.elapsed();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_one_controller_changes_reaches_nodes_streaming_from_the_other() {
    let Some((a, b)) = Ctl::start_pair().await else {
        return;
    };
    assert_eq!(a.mesh.controller_key(), b.mesh.controller_key());
    a.admin()
        .await
        .create_user(apb::CreateUserRequest {
            login: "alice@example.com".into(),
            role: String::new(),
        })
        .await
        .unwrap();
    a.set_policy(NONE).await;
    // A key created on B enrolls through A, and the other way round.
    let key_b = b.key("", &["tag:web"], true).await;
    let key_a = a.key("alice@example.com", &[], true).await;
    let n1 = enroll(&a, &key_b, "n1").await.unwrap();
    let n2 = enroll(&b, &key_a, "n2").await.unwrap();
    assert_ne!(n1.id, n2.id);

    // n1 streams from B, n2 from A: each starts with no peers.
    let mut s1 = open_stream(&b, &n1).await.unwrap();
    let mut s2 = open_stream(&a, &n2).await.unwrap();
    let m1 = next_map(&b, &mut s1, 0, ACROSS).await;
    let m2 = next_map(&a, &mut s2, 0, ACROSS).await;
    assert!(m1.peers.is_empty() && m2.peers.is_empty());
    let (mut have1, mut have2) = (m1.serial, m2.serial);

    // A policy set on A reaches n1 on B, and n2 on A.
    let start = Instant::now();
    a.set_policy(ALL).await;
    until_map(&b, &mut s1, &mut have1, |m| {
        m.peers.iter().any(|p| p.name == n2.name)
    })
    .await;
    eprintln!(
        "policy set on A reached a node on B in {:?} (from the admin call)",
        start.elapsed()
    );
    until_map(&a, &mut s2, &mut have2, |m| {
        m.peers.iter().any(|p| p.name == n1.name)
    })
    .await;

    // A node renamed on B: n2 (on A) sees the new name.
    b.admin()
        .await
        .rename_node(apb::RenameNodeRequest {
            node: n1.name.clone(),
            new_name: "web-one".into(),
        })
        .await
        .unwrap();
    until_map(&a, &mut s2, &mut have2, |m| {
        m.peers.iter().any(|p| p.name == "web-one")
    })
    .await;

    // A policy set on B takes the peers away again.
    b.set_policy(NONE).await;
    until_map(&a, &mut s2, &mut have2, |m| m.peers.is_empty()).await;

    // A node deleted on A: its stream on B ends.
    a.admin()
        .await
        .delete_node(apb::NodeRef {
            node: "web-one".into(),
        })
        .await
        .unwrap();
    let ended = tokio::time::timeout(ACROSS, async {
        loop {
            match s1.message().await {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the deleted node's stream on B stays open");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_names_and_addresses_stay_single_across_both_controllers() {
    let Some((a, b)) = Ctl::start_pair().await else {
        return;
    };
    // A single-use key raced through both enrolls exactly one node.
    let once = a.key("", &["tag:web"], false).await;
    let tries: Vec<_> = (0..8)
        .map(|i| {
            let ctl = if i % 2 == 0 { &a } else { &b };
            enroll(ctl, &once, "racer")
        })
        .collect();
    let results = futures_join(tries).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);

    // Twelve nodes enrolled at once, half through each: all get in, with
    // names and addresses of their own (a lost race is retried).
    let many = b.key("", &["tag:web"], true).await;
    let tries: Vec<_> = (0..12)
        .map(|i| {
            let ctl = if i % 2 == 0 { &a } else { &b };
            enroll(ctl, &many, "same")
        })
        .collect();
    let results = futures_join(tries).await;
    let nodes: Vec<_> = results.into_iter().map(|r| r.unwrap()).collect();
    let names: BTreeSet<_> = nodes.iter().map(|n| n.name.clone()).collect();
    assert_eq!(names.len(), 12, "{names:?}");
    let listed = a
        .admin()
        .await
        .list_nodes(apb::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .nodes;
    let v4: BTreeSet<_> = listed
        .iter()
        .flat_map(|n| n.addresses.first().cloned())
        .collect();
    assert_eq!(listed.len(), 13);
    assert_eq!(v4.len(), 13, "{listed:?}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_controller_leads_and_the_other_takes_over() {
    let Some((a, b)) = Ctl::start_pair().await else {
        return;
    };
    // Liveness bound: the session tries for the lock every 2 s.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(a.mesh.is_leader() || b.mesh.is_leader()) {
        assert!(Instant::now() < deadline, "nobody leads");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        a.mesh.is_leader() != b.mesh.is_leader(),
        "exactly one leads"
    );
    let (leader, follower) = if a.mesh.is_leader() { (a, b) } else { (b, a) };
    leader.stop().await;
    let start = Instant::now();
    while !follower.mesh.is_leader() {
        assert!(start.elapsed() < Duration::from_secs(30), "no takeover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "the follower led {:?} after the leader stopped",
        start.elapsed()
    );
    follower.stop().await;
}

/// Runs `futs` concurrently on this task; their results in order.
async fn futures_join<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    use std::task::Poll;
    let mut futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *o = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}
