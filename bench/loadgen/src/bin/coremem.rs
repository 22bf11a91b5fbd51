//! What the netmap core keeps in memory per node, counted by the allocator.
//!
//! Builds `ztmesh_controller::netcore::NetCore` for N nodes in tag groups
//! (the control-plane benchmark's shape: each node sees its group), counts
//! the bytes live in the heap before and after, then applies the changes a
//! running mesh sees (every node reports endpoints, the policy changes, the
//! clock ticks) and counts again. Also counts the policy compiler's part
//! alone (`ztmesh_policy::Compiled`) so the core's own share is visible.
//!
//!   cargo run --release -p ztmesh-loadgen --bin ztmesh-coremem -- --nodes 5000 --nodes 10000
//!
//! Prints one JSON line per size.
#![allow(
    clippy::disallowed_types,
    reason = "a benchmark makes real keys from OS entropy"
)]

#[path = "../shape.rs"]
mod shape;

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicIsize, Ordering};

use clap::Parser;
use ztmesh_controller::model::NodeRow;
use ztmesh_controller::netcore::{policy_node, Change, CoreConfig, NetCore};
use ztmesh_policy::{Compiled, NodeInfo, Policy};

/// Bytes currently allocated through the global allocator.
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// SAFETY: every call forwards to `System` with the caller's arguments; the
// counter is bookkeeping only.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

#[derive(Parser)]
#[command(about = "Heap bytes the netmap core keeps per node")]
struct Args {
    /// Node counts to measure (repeatable).
    #[arg(long = "nodes", default_values_t = [5000, 10000])]
    nodes: Vec<usize>,
    /// Nodes per tag group; each node sees the others of its group.
    #[arg(long, default_value_t = 100)]
    group_size: usize,
}

const T0: i64 = 1_800_000_000_000;

fn row(i: usize, group: usize) -> NodeRow {
    let n = u32::try_from(i).expect("fewer than 2^32 nodes");
    let [_, b, c, d] = n.to_be_bytes();
    NodeRow {
        id: u64::from(n) + 1,
        name: format!("node-{i:05}"),
        hostname: format!("node-{i:05}"),
        machine_key: [(i % 251) as u8; 32],
        wg_key: [(i % 241) as u8; 32],
        ipv4: Ipv4Addr::new(100, 64 + b, c, d),
        ipv6: Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, (n >> 16) as u16, n as u16),
        user: None,
        tags: vec![format!("tag:lg{}", i / group)],
        ephemeral: false,
        created_ms: T0,
        last_seen_ms: T0,
        expiry_ms: T0 + 180 * 86_400_000,
        key_revoked: false,
        endpoints: Vec::new(),
        routes: Default::default(),
        posture: Default::default(),
        quarantine: None,
    }
}

fn measure(n: usize, group: usize) -> serde_json::Value {
    let groups = n.div_ceil(group);
    let parse = |marker| {
        Policy::parse("bench.hujson", &shape::policy(groups, marker)).expect("bench policy parses")
    };
    let rows: Vec<NodeRow> = (0..n).map(|i| row(i, group)).collect();
    let cfg = CoreConfig {
        netmap_ttl_ms: 3_600_000,
        dns_domain: "ztmesh.internal".into(),
        persistent_keepalive: 25,
        relays: Vec::new(),
        posture_ttl_ms: 600_000,
        controllers: Vec::new(),
    };

    // The policy compiler's share, alone.
    let infos: Vec<NodeInfo> = rows.iter().map(|r| policy_node(r, &[], false)).collect();
    let p = parse(9000);
    let before = live();
    let compiled = Compiled::new(p, infos);
    let compiled_bytes = live() - before;
    drop(compiled);

    // The whole core: the rows move in, so they count.
    let p = parse(9000);
    let before = live();
    let mut core = NetCore::new(cfg, p, rows, T0);
    let built = live() - before;

    // What a running mesh does to it: endpoints, a policy change, time.
    for id in 1..=n as u64 {
        let endpoints = vec![format!("198.18.{}.{}:41641", id / 250 % 250, id % 250 + 1)];
        core.apply(Change::Endpoints {
            node: id,
            endpoints,
        });
    }
    core.apply(Change::Policy(parse(9001)));
    core.apply(Change::Clock(T0 + 60_000));
    let steady = live() - before;
    let map = core.encode(1, 1, T0 + 60_000).map_or(0, |b| b.len());
    drop(core);

    let per = |b: isize| b / n as isize;
    serde_json::json!({
        "nodes": n,
        "group_size": group,
        "peers_per_node": group - 1,
        "core_bytes": steady,
        "core_bytes_per_node": per(steady),
        "core_bytes_per_node_at_build": per(built),
        "compiled_policy_bytes_per_node": per(compiled_bytes),
        "netmap_bytes_one_node": map,
    })
}

fn main() {
    let args = Args::parse();
    for &n in &args.nodes {
        println!("{}", measure(n, args.group_size));
    }
}
