//! Fuzz check for the MagicDNS core (`ztmesh_node::dns`): the messages any
//! local program (or, through the tunnel, a peer) sends to
//! 100.100.100.100. Shared by the fuzz target `dns_query` and the corpus
//! replay test in `node/tests/fuzz_corpus.rs`.
//!
//! Properties: nothing panics; an answer is a response (QR=1) to the
//! query's id; a forward carries the query unchanged to at least one
//! resolver; messages over 4096 bytes, without a header or with QR=1 get
//! no answer at all; the forwarding helpers (`fit_udp`, `response_matches`,
//! `udp_limit`) accept any bytes, and `fit_udp` never grows past the
//! client's limit once it cuts.

use std::sync::OnceLock;

use ztmesh_node::dns::{self, Decision, DropReason, Zone, MAX_MESSAGE_BYTES};
use ztmesh_proto::control as pb;

/// laptop (this node), web, and split DNS for example.corp.
fn zone() -> &'static Zone {
    static ZONE: OnceLock<Zone> = OnceLock::new();
    ZONE.get_or_init(|| {
        let map = pb::NetMap {
            dns_domain: "ztmesh.internal".into(),
            self_node: Some(pb::NodeInfo {
                name: "laptop".into(),
                addresses: vec!["100.64.0.1/32".into(), "fd00:1:2::1/128".into()],
                ..Default::default()
            }),
            peers: vec![pb::Peer {
                id: 2,
                name: "web".into(),
                allowed_ips: vec!["100.64.0.2/32".into(), "fd00:1:2::2/128".into()],
                ..Default::default()
            }],
            split_dns: vec![pb::SplitDns {
                suffix: "example.corp".into(),
                resolvers: vec!["198.19.50.53".into()],
            }],
            ..Default::default()
        };
        Zone::from_netmap(&map, vec!["198.18.0.53:53".parse().expect("upstream")])
    })
}

pub fn run(data: &[u8]) {
    match dns::decide(data, zone()) {
        Decision::Answer(answer) => {
            assert!(data.len() >= 12 && data.len() <= MAX_MESSAGE_BYTES);
            assert!(answer.len() >= 12);
            assert_eq!(answer[..2], data[..2], "the answer carries the query id");
            assert_ne!(answer[2] & 0x80, 0, "the answer is a response");
        }
        Decision::Forward { to, query } => {
            assert_eq!(query, data);
            assert!(!to.is_empty());
        }
        Decision::Drop(reason) => match reason {
            DropReason::Oversized => assert!(data.len() > MAX_MESSAGE_BYTES),
            DropReason::Malformed => assert!(data.len() < 12),
            DropReason::Response => assert_ne!(data[2] & 0x80, 0),
        },
    }
    let limit = dns::udp_limit(data);
    assert!((512..=MAX_MESSAGE_BYTES).contains(&limit));
    let fitted = dns::fit_udp(data, data.to_vec());
    if fitted != data {
        assert!(fitted.len() <= 512);
    }
    let _ = dns::response_matches(data, data);
    let _ = dns::is_truncated(data);
}
