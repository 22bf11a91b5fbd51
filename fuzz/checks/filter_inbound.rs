//! Fuzzes the stateful filter with a stream of packets in both directions:
//! no panics, and the flow table stays within its bound.
//! Shared by the fuzz target `filter_inbound` and the corpus replay test in
//! `node/tests/fuzz_corpus.rs`.

use std::time::{Duration, Instant};

use ztmesh_node::filter::{Filter, Limits, Rule, Ruleset};

pub fn run(data: &[u8]) {
    let limits = Limits {
        max_flows: 32,
        max_flows_per_peer: 12,
        max_fragments: 8,
        max_fragments_per_peer: 4,
        ..Limits::default()
    };
    let rules = vec![Rule {
        src: vec![
            "100.64.0.0/10".parse().unwrap(),
            "fd00::/8".parse().unwrap(),
        ],
        dst: vec![
            "100.64.0.1/32".parse().unwrap(),
            "fd00::1/128".parse().unwrap(),
        ],
        protocols: vec![],
        ports: vec![(22, 22), (8000, 8100)],
        rule_id: "fuzz".into(),
    }];
    // Wide local prefixes, so that fuzzed destinations reach the rules and
    // conntrack as well as the destination check.
    let local = vec![
        "100.64.0.0/10".parse().unwrap(),
        "fd00::/8".parse().unwrap(),
    ];
    let mut filter = Filter::with_limits(Some(Ruleset { local, rules }), limits);
    let start = Instant::now();
    // Records: [control byte][len byte][len bytes]; control picks direction,
    // peer and a clock step.
    let mut rest = data;
    let mut now = start;
    while rest.len() >= 2 {
        let (ctl, len) = (rest[0], usize::from(rest[1]));
        rest = &rest[2..];
        let take = len.min(rest.len());
        let (pkt, tail) = rest.split_at(take);
        rest = tail;
        now += Duration::from_secs(u64::from(ctl >> 4));
        let peer = u32::from(ctl & 0x3);
        if ctl & 0x4 == 0 {
            let _ = filter.inbound(now, peer, pkt);
        } else {
            filter.outbound(now, peer, pkt);
        }
        if ctl & 0x8 != 0 {
            filter.expire(now);
        }
        assert!(filter.flow_count() <= 32);
    }
}
