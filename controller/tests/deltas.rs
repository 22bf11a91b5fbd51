//! Netmap deltas through a real controller (TLS listener, SQLite, tonic
//! clients): a stream that takes deltas gets a full map first, then deltas
//! that rebuild exactly the maps the controller signed; a stream that does
//! not ask for them never gets one.
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

use std::time::Duration;

use prost::Message;
use ztmesh_controller::now_ms;
use ztmesh_proto::control as pb;
use ztmesh_proto::scrape::Format;
use ztmesh_proto::{delta, netmap};

mod common;
use common::{enroll, open_stream_with, Ctl};

const WAIT: Duration = Duration::from_secs(10);

const SERVERS: &str = r#"{"tagOwners": {"tag:srv": []},
  "acls": [{"action": "accept", "src": ["tag:srv"], "dst": ["tag:srv:22"]}]}"#;
const NONE: &str = r#"{"tagOwners": {"tag:srv": []}, "acls": []}"#;

/// What a node holds: its last map, and what arrived on the wire for it.
struct Held {
    map: pb::NetMap,
    wire_bytes: usize,
    was_delta: bool,
}

/// Reads the next message of `s` and applies it to `held` as the agent
/// does: a delta to the map held, a full map verified on its own.
async fn next(
    ctl: &Ctl,
    s: &mut tonic::Streaming<pb::SignedNetMap>,
    held: Option<&pb::NetMap>,
) -> Held {
    let signed = tokio::time::timeout(WAIT, s.message())
        .await
        .expect("a netmap in time")
        .expect("stream healthy")
        .expect("stream open");
    let key = ctl.mesh.controller_key();
    let wire_bytes = signed.encoded_len();
    match &signed.delta {
        Some(d) => {
            assert!(signed.netmap.is_empty() && signed.signature.is_empty());
            let base = held.expect("a delta only after a full map");
            let (map, full) = delta::apply(&key, base, d, now_ms()).expect("the delta applies");
            // The result is a map the controller signed, as a full map.
            netmap::verify(&key, &full, base.serial, now_ms()).unwrap();
            Held {
                map,
                wire_bytes,
                was_delta: true,
            }
        }
        None => {
            let map = netmap::verify(&key, &signed, held.map_or(0, |m| m.serial), now_ms())
                .expect("a valid full map");
            Held {
                map,
                wire_bytes,
                was_delta: false,
            }
        }
    }
}

fn peer_names(m: &pb::NetMap) -> Vec<&str> {
    m.peers.iter().map(|p| p.name.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_taking_deltas_rebuilds_every_signed_map_and_others_get_full_maps() {
    let ctl = Ctl::start().await;
    ctl.set_policy(SERVERS).await;
    let key = ctl.key("", &["tag:srv"], true).await;
    let a = enroll(&ctl, &key, "a").await.unwrap();
    let b = enroll(&ctl, &key, "b").await.unwrap();

    let mut sa = open_stream_with(&ctl, &a, true).await.unwrap();
    let mut sb = open_stream_with(&ctl, &b, false).await.unwrap();
    // The first map of a stream is full, deltas or not.
    let first = next(&ctl, &mut sa, None).await;
    assert!(!first.was_delta);
    assert_eq!(peer_names(&first.map), ["b"]);
    let full_size = first.wire_bytes;
    let fb = next(&ctl, &mut sb, None).await;
    assert!(!fb.was_delta);

    // One node joins: A gets a delta (the new peer and A's rules, which
    // now admit it), smaller than the full map; B, which did not ask for
    // deltas, gets the full map.
    let _c = enroll(&ctl, &key, "c").await.unwrap();
    let joined = next(&ctl, &mut sa, Some(&first.map)).await;
    assert!(joined.was_delta, "a one-node join is sent as a delta");
    assert_eq!(peer_names(&joined.map), ["b", "c"]);
    assert!(
        joined.wire_bytes < full_size + 200 && joined.wire_bytes < 1024,
        "the join delta is small: {} B (the full map before it: {full_size} B)",
        joined.wire_bytes
    );
    let fb2 = next(&ctl, &mut sb, Some(&fb.map)).await;
    assert!(!fb2.was_delta, "a stream that did not ask gets full maps");
    assert_eq!(peer_names(&fb2.map), ["a", "c"]);

    // Everything denied: the delta removes every peer and carries an empty
    // rule set, which is "deny all", not "unchanged".
    ctl.set_policy(NONE).await;
    let denied = next(&ctl, &mut sa, Some(&joined.map)).await;
    assert!(denied.map.peers.is_empty(), "{:?}", peer_names(&denied.map));
    assert!(denied.map.inbound_rules.is_empty());
    assert!(denied.map.serial > joined.map.serial);

    // And back: the same peers again.
    ctl.set_policy(SERVERS).await;
    let again = next(&ctl, &mut sa, Some(&denied.map)).await;
    assert_eq!(peer_names(&again.map), ["b", "c"]);
    assert!(!again.map.inbound_rules.is_empty());
    let sent = ctl
        .mesh
        .metrics()
        .render(ctl.mesh.gauges(now_ms()), Format::Text);
    assert!(
        sent.lines()
            .any(|l| l.starts_with("ztmesh_controller_netmap_deltas_total ") && !l.ends_with(" 0")),
        "deltas are counted:\n{sent}"
    );
}
