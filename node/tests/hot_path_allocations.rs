//! The per-packet path allocates nothing once a session and its flow exist
//! (as Tailscale's filter `TestNoAllocs`): a counting allocator wraps the
//! system one and counts allocations made by this thread.
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::SocketAddr;
use std::time::Instant;

use ztmesh_node::filter::{Rule, Ruleset};
use ztmesh_node::tunnel::{Device, Output};

#[path = "common/packets.rs"]
mod packets;
use packets::{gro, tcp_segment, udp_packet, Csum, Pair};

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: delegates to the system allocator; the counter is a thread-local Cell.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCS.with(Cell::get)
}

/// A and B with a session; `managed`: A runs the inbound filter with a rule
/// for B's UDP flow to port 9000.
fn pair(managed: bool) -> Pair {
    let rules = managed.then(|| Ruleset {
        local: vec!["100.64.0.1/32".parse().unwrap()],
        rules: vec![Rule {
            src: vec!["100.64.0.2/32".parse().unwrap()],
            dst: vec!["100.64.0.1/32".parse().unwrap()],
            protocols: vec![17],
            ports: vec![(9000, 9000)],
            rule_id: "r".into(),
        }],
    });
    let mut pair = Pair::new(rules, None);
    pair.establish(&udp_packet([100, 64, 0, 1], [100, 64, 0, 2], 5000, 9000));
    pair
}

/// Sends `pkt` from `from`'s TUN to `to`, returning what `to` writes to its TUN.
fn carry(
    now: Instant,
    from: &mut Device,
    to: &mut Device,
    from_addr: SocketAddr,
    pkt: &[u8],
    wire: &mut [u8],
    out: &mut [u8],
) -> bool {
    let n = match from.handle_tun(now, pkt, wire) {
        Output::Network(t) => t.packet.len(),
        _ => return false,
    };
    matches!(
        to.handle_udp(now, from_addr, &wire[..n], out),
        Output::Tunnel(_)
    )
}

fn steady_state_allocations(managed: bool) -> u64 {
    let Pair {
        mut a,
        mut b,
        ea,
        eb,
    } = pair(managed);
    let now = Instant::now();
    let mut wire = vec![0u8; 2048];
    let mut out = vec![0u8; 2048];
    let ab = udp_packet([100, 64, 0, 1], [100, 64, 0, 2], 5000, 9000);
    let ba = udp_packet([100, 64, 0, 2], [100, 64, 0, 1], 9000, 5000);
    // Warm up: the flow is recorded, sessions are current.
    for _ in 0..4 {
        assert!(carry(now, &mut a, &mut b, ea, &ab, &mut wire, &mut out));
        assert!(carry(now, &mut b, &mut a, eb, &ba, &mut wire, &mut out));
    }
    // The instrument works: a Vec is counted.
    let probe = allocations();
    let v = std::hint::black_box(vec![1u8; 16]);
    assert!(allocations() > probe);
    drop(v);
    let before = allocations();
    for _ in 0..1000 {
        assert!(carry(now, &mut a, &mut b, ea, &ab, &mut wire, &mut out));
        assert!(carry(now, &mut b, &mut a, eb, &ba, &mut wire, &mut out));
    }
    allocations() - before
}

#[test]
fn data_packets_allocate_nothing_in_standalone_mode() {
    assert_eq!(steady_state_allocations(false), 0);
}

#[test]
fn data_packets_allocate_nothing_with_filter_and_conntrack() {
    assert_eq!(steady_state_allocations(true), 0);
}

/// The TUN write side: tun-rs's GRO, which coalesces the decrypted segments
/// of a flow before the write, allocates nothing per packet once its tables
/// are warm (the refill of the buffers is counted too: it stays within
/// their capacity). Upstream tun-rs 2.8.16 copied every packet into a fresh `Vec`
/// (32 allocations for this batch); `patches/tun-rs` reuses one buffer.
#[test]
fn tun_gro_allocates_nothing_per_packet() {
    use tun_rs::{TcpGROTable, UdpGROTable, VIRTIO_NET_HDR_LEN};
    const SEGMENTS: u32 = 32;
    const PAYLOAD: usize = 1000;
    let segments: Vec<Vec<u8>> = (0..SEGMENTS)
        .map(|i| tcp_segment(i * PAYLOAD as u32, PAYLOAD, Csum::Full))
        .collect();
    let mut bufs: Vec<Vec<u8>> = (0..SEGMENTS)
        .map(|_| Vec::with_capacity(VIRTIO_NET_HDR_LEN + 65_536))
        .collect();
    let mut tcp = TcpGROTable::default();
    let mut udp = UdpGROTable::default();
    let mut to_write = Vec::with_capacity(SEGMENTS as usize);
    let mut batch = |count: &mut u64| {
        let before = allocations();
        gro(&mut bufs, &segments, &mut tcp, &mut udp, &mut to_write).expect("GRO of a valid batch");
        *count = allocations() - before;
        // One super-packet: the first buffer holds every payload.
        assert_eq!(to_write, [0], "the batch coalesced into one write");
        assert_eq!(
            bufs[0].len(),
            VIRTIO_NET_HDR_LEN + 40 + SEGMENTS as usize * PAYLOAD
        );
    };
    let mut warm = 0;
    batch(&mut warm);
    let mut steady = 0;
    batch(&mut steady);
    assert_eq!(
        steady, 0,
        "GRO allocated {steady} times for {SEGMENTS} packets"
    );
}
