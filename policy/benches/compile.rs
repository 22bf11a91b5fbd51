//! Policy engine benchmarks at the target size: 10,000 nodes,
//! 100 users, 50 groups, 200 tags, 1,000 ACL entries.
//!
//! Run: `cargo bench -p ztmesh-policy --bench compile -- --warm-up-time 1 --measurement-time 5`
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "benchmarks build inputs from the real clock and entropy"
)]

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use ztmesh_policy::{Compiled, NodeInfo, Policy};

const NODES: usize = 10_000;
const USERS: usize = 100;
const LAPTOPS_PER_USER: usize = 2;
const GROUPS: usize = 50;
const TAGS: usize = 200;
const ENTRIES: usize = 1_000;

/// xorshift64: deterministic input without a dependency on `rand`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A realistic large policy: groups of 2-10 users, every tag owned by a
/// group, entries from groups/tags (rarely `*` or a user) to 1-2 tags with
/// typical ports, plus `autogroup:self` for members.
fn policy_text() -> String {
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let mut s = String::from("{\n  \"groups\": {\n");
    for g in 0..GROUPS {
        let n = 2 + rng.below(9);
        let members: BTreeSet<usize> = (0..n).map(|_| rng.below(USERS)).collect();
        let list: Vec<String> = members
            .iter()
            .map(|u| format!("\"user{u}@example.com\""))
            .collect();
        let _ = writeln!(s, "    \"group:g{g}\": [{}],", list.join(", "));
    }
    s += "  },\n  \"tagOwners\": {\n";
    for t in 0..TAGS {
        let _ = writeln!(s, "    \"tag:t{t}\": [\"group:g{}\"],", t % GROUPS);
    }
    s += "  },\n  \"acls\": [\n";
    s += "    {\"action\": \"accept\", \"src\": [\"autogroup:member\"], \"dst\": [\"autogroup:self:*\"]},\n";
    let ports = [
        "22",
        "443",
        "80,443",
        "5432",
        "8000-8999",
        "*",
        "9100",
        "53",
    ];
    for e in 1..ENTRIES {
        let mut src = Vec::new();
        for _ in 0..1 + rng.below(2) {
            let sel = match rng.below(100) {
                0..=49 => format!("group:g{}", rng.below(GROUPS)),
                50..=92 => format!("tag:t{}", rng.below(TAGS)),
                93..=97 => format!("user{}@example.com", rng.below(USERS)),
                98 => "*".to_string(),
                _ => "autogroup:member".to_string(),
            };
            src.push(format!("\"{sel}\""));
        }
        let mut dst = Vec::new();
        for _ in 0..1 + rng.below(2) {
            let port = ports[rng.below(ports.len())];
            dst.push(format!("\"tag:t{}:{port}\"", rng.below(TAGS)));
        }
        let proto = if e % 3 == 0 {
            "\"proto\": \"tcp\", "
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "    {{\"action\": \"accept\", \"src\": [{}], {proto}\"dst\": [{}]}},",
            src.join(", "),
            dst.join(", ")
        );
    }
    s += "  ],\n}\n";
    s
}

fn node(i: usize) -> NodeInfo {
    let n = i as u32 + 1;
    let v4 = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + n);
    let v6 = Ipv6Addr::from(0xfd00_u128 << 112 | u128::from(n));
    let (user, tags) = if i < USERS * LAPTOPS_PER_USER {
        (
            Some(format!("user{}@example.com", i % USERS)),
            BTreeSet::new(),
        )
    } else {
        let mut tags = BTreeSet::from([format!("tag:t{}", i % TAGS)]);
        if i % 10 == 0 {
            tags.insert(format!("tag:t{}", (i / 10) % TAGS));
        }
        (None, tags)
    };
    NodeInfo {
        id: i as u64 + 1,
        name: format!("node{i}"),
        user,
        tags,
        addresses: vec![IpAddr::V4(v4), IpAddr::V6(v6)],
        ..NodeInfo::default()
    }
}

fn nodes() -> Vec<NodeInfo> {
    (0..NODES).map(node).collect()
}

fn bench(c: &mut Criterion) {
    let text = policy_text();
    let policy = Policy::parse("bench.hujson", &text).expect("generated policy is valid");
    let all = nodes();

    let mut g = c.benchmark_group("policy");
    g.sample_size(10);
    g.bench_function("parse_1000_entries", |b| {
        b.iter(|| Policy::parse("bench.hujson", black_box(&text)).expect("valid"))
    });
    g.bench_function("full_compile_10k_nodes", |b| {
        b.iter_batched(
            || (policy.clone(), all.clone()),
            |(p, n)| Compiled::new(p, n),
            BatchSize::LargeInput,
        )
    });

    // Join: 9,999 nodes compiled, then the 10,000th (a tagged server) joins.
    let mut base = Compiled::new(policy.clone(), all[..NODES - 1].to_vec());
    let joiner = all[NODES - 1].clone();
    g.bench_function("node_join_tagged", |b| {
        b.iter_custom(|iters| timed(iters, &mut base, &joiner))
    });
    // A user's laptop joining (touches autogroup:self and group rules).
    let laptop = NodeInfo {
        id: NODES as u64 + 1,
        name: "new-laptop".into(),
        ..node(7)
    };
    g.bench_function("node_join_laptop", |b| {
        b.iter_custom(|iters| timed(iters, &mut base, &laptop))
    });
    g.finish();

    let compiled = Compiled::new(policy, all);
    let joined_tagged = base.upsert_node(joiner.clone()).len();
    base.remove_node(joiner.id);
    let joined_laptop = base.upsert_node(laptop).len();
    let peers: usize = compiled
        .nodes()
        .map(|n| compiled.view(n.id).map_or(0, |v| v.peers.len()))
        .sum();
    let rules: usize = compiled
        .nodes()
        .map(|n| compiled.view(n.id).map_or(0, |v| v.inbound.len()))
        .sum();
    println!(
        "shape: {NODES} nodes, {ENTRIES} entries; mean peers/node {}, mean inbound rules/node {}; \
         views changed by a join: tagged server {joined_tagged}, laptop {joined_laptop}",
        peers / NODES,
        rules / NODES,
    );
}

/// Times `iters` joins of `node`, removing it again (untimed) after each.
fn timed(iters: u64, base: &mut Compiled, node: &NodeInfo) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let start = Instant::now();
        black_box(base.upsert_node(node.clone()));
        total += start.elapsed();
        base.remove_node(node.id);
    }
    total
}

criterion_group!(benches, bench);
criterion_main!(benches);
