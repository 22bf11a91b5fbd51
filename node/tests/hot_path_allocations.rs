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
use ztmesh_node::tunnel::{Device, Output, PeerConfig};
use ztmesh_proto::keys::WgPrivateKey;

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

fn udp_packet(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut p = vec![0u8; 28 + 1000];
    let len = p.len() as u16;
    p[0] = 0x45;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    p[24..26].copy_from_slice(&(len - 20).to_be_bytes());
    p
}

fn pair(managed: bool) -> (Device, Device, SocketAddr, SocketAddr) {
    let now = Instant::now();
    let ka: WgPrivateKey = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
        .parse()
        .unwrap();
    let kb: WgPrivateKey = "KCkqKywtLi8wMTIzNDU2Nzg5Ojs8PT4/QEFCQ0RFRkc="
        .parse()
        .unwrap();
    let (ea, eb): (SocketAddr, SocketAddr) = (
        "198.18.0.1:51820".parse().unwrap(),
        "198.18.0.2:51820".parse().unwrap(),
    );
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
    let mut a = Device::new(&ka, rules, now);
    let mut b = Device::new(&kb, None, now);
    let peer = |k: &WgPrivateKey, ip: &str, e| PeerConfig {
        public_key: k.public(),
        preshared_key: None,
        allowed_ips: vec![ip.parse().unwrap()],
        endpoint: Some(e),
        candidates: Vec::new(),
        relay: None,
        persistent_keepalive: None,
    };
    a.set_peers(vec![peer(&kb, "100.64.0.2/32", eb)], now);
    b.set_peers(vec![peer(&ka, "100.64.0.1/32", ea)], now);
    (a, b, ea, eb)
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

fn establish(a: &mut Device, b: &mut Device, ea: SocketAddr, eb: SocketAddr) {
    let now = Instant::now();
    let mut wire = vec![0u8; 2048];
    let mut out = vec![0u8; 2048];
    let mut reply = vec![0u8; 2048];
    let first = udp_packet([100, 64, 0, 1], [100, 64, 0, 2], 5000, 9000);
    let Output::Network(t) = a.handle_tun(now, &first, &mut wire) else {
        panic!("expected a handshake initiation")
    };
    let init = t.packet.to_vec();
    let Output::Network(t) = b.handle_udp(now, ea, &init, &mut reply) else {
        panic!("expected a handshake response")
    };
    let resp = t.packet.to_vec();
    let _ = a.handle_udp(now, eb, &resp, &mut out);
    while let Some(t) = a.poll_transmit(now, &mut out) {
        let d = t.packet.to_vec();
        let _ = b.handle_udp(now, ea, &d, &mut reply);
    }
}

fn steady_state_allocations(managed: bool) -> u64 {
    let (mut a, mut b, ea, eb) = pair(managed);
    establish(&mut a, &mut b, ea, eb);
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

/// One's-complement sum of `data` added to `sum` (RFC 1071), unfolded.
fn sum16(data: &[u8], mut sum: u32) -> u32 {
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A TCP segment of one bulk flow (100.64.0.1:40000 → 100.64.0.2:5201, ACK
/// only, valid checksums): the `i`-th of back-to-back `payload`-byte segments.
fn tcp_segment(i: u32, payload: usize) -> Vec<u8> {
    let mut p = vec![0u8; 40 + payload];
    let len = p.len() as u16;
    p[0] = 0x45;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&[100, 64, 0, 1]);
    p[16..20].copy_from_slice(&[100, 64, 0, 2]);
    let ip = fold(sum16(&p[..20], 0));
    p[10..12].copy_from_slice(&ip.to_be_bytes());
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&5201u16.to_be_bytes());
    let seq = 1000 + i * payload as u32;
    p[24..28].copy_from_slice(&seq.to_be_bytes());
    p[28..32].copy_from_slice(&1u32.to_be_bytes());
    p[32] = 5 << 4;
    p[33] = 0x10; // ACK
    p[34..36].copy_from_slice(&0xffffu16.to_be_bytes());
    for (k, b) in p[40..].iter_mut().enumerate() {
        *b = (k as u32 + i) as u8;
    }
    let mut pseudo = [0u8; 12];
    pseudo[..8].copy_from_slice(&p[12..20]);
    pseudo[9] = 6;
    pseudo[10..12].copy_from_slice(&(len - 20).to_be_bytes());
    let tcp = fold(sum16(&p[20..], sum16(&pseudo, 0)));
    p[36..38].copy_from_slice(&tcp.to_be_bytes());
    p
}

/// The TUN write side: tun-rs's GRO, which coalesces the decrypted segments
/// of a flow before the write, allocates nothing per packet once its tables
/// are warm. Upstream tun-rs 2.8.16 copied every packet into a fresh `Vec`
/// (32 allocations for this batch); `patches/tun-rs` reuses one buffer.
#[test]
fn tun_gro_allocates_nothing_per_packet() {
    use tun_rs::{handle_gro, TcpGROTable, UdpGROTable, VIRTIO_NET_HDR_LEN};
    const SEGMENTS: u32 = 32;
    const PAYLOAD: usize = 1000;
    let segments: Vec<Vec<u8>> = (0..SEGMENTS).map(|i| tcp_segment(i, PAYLOAD)).collect();
    let mut bufs: Vec<Vec<u8>> = (0..SEGMENTS)
        .map(|_| Vec::with_capacity(VIRTIO_NET_HDR_LEN + 65_536))
        .collect();
    let mut tcp = TcpGROTable::default();
    let mut udp = UdpGROTable::default();
    let mut to_write = Vec::with_capacity(SEGMENTS as usize);
    let mut batch = |count: &mut u64| {
        for (buf, seg) in bufs.iter_mut().zip(&segments) {
            buf.clear();
            buf.resize(VIRTIO_NET_HDR_LEN, 0);
            buf.extend_from_slice(seg);
        }
        tcp.reset();
        udp.reset();
        to_write.clear();
        let before = allocations();
        handle_gro(
            &mut bufs,
            VIRTIO_NET_HDR_LEN,
            &mut tcp,
            &mut udp,
            false,
            &mut to_write,
        )
        .expect("GRO of a valid batch");
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
