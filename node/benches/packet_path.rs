//! The user-space cost of one full-size packet (1420-byte tunnel MTU), piece
//! by piece, without the kernel: what `dataplane.sh`'s "tunnel cores per
//! Gbit/s" is made of besides the system calls (issue 21).
//!
//! - `aead_1424/seal_open`: ChaCha20-Poly1305 (ring, the AEAD boringtun
//!   uses) sealing and opening one padded payload: the crypto both tunnel
//!   ends must do per packet, the floor of any WireGuard data plane;
//! - `device_1420/*`: one IP packet through the sender's `Device::handle_tun`
//!   and the receiver's `Device::handle_udp` (routing, boringtun, session and
//!   path bookkeeping; `filtered`: the receiver also runs the inbound filter
//!   and connection tracking, as in agent mode);
//! - `offload/*`: tun-rs's TSO split of one 64 KiB super-packet read from
//!   the TUN (sender; it checksums every segment) and its GRO of those
//!   segments before the TUN write (receiver).
//!
//! Throughput is per core; cores per Gbit/s is 1 / (Gbit/s), i.e.
//! 1 / (8 × GiB/s × 1.074) with criterion's GiB/s.
//!
//! Run: `cargo bench -p ztmesh-node --bench packet_path -- --warm-up-time 1 --measurement-time 5`
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "benchmarks build inputs from the real clock"
)]

use std::hint::black_box;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use tun_rs::{
    gso_split, TcpGROTable, UdpGROTable, VirtioNetHdr, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_LEN,
};
use ztmesh_node::filter::{Rule, Ruleset};
use ztmesh_node::tunnel::Output;

#[path = "../tests/common/packets.rs"]
mod packets;
use packets::{gro, tcp_segment, Csum, Pair};

/// The tunnel MTU every benchmark script uses.
const MTU: usize = 1420;
/// TCP payload of a full-size segment (IPv4, no options).
const MSS: usize = MTU - 40;
/// Segments of one TSO super-packet: as many as fit 64 KiB.
const SEGMENTS: usize = 46;

fn aead(c: &mut Criterion) {
    let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &[7u8; 32]).expect("key"));
    // A 1420-byte packet padded to a multiple of 16, as WireGuard sends it.
    let mut buf = vec![0x5au8; MTU.next_multiple_of(16)];
    let mut g = c.benchmark_group("aead_1424");
    g.throughput(Throughput::Bytes(MTU as u64));
    g.bench_function("seal_open", |b| {
        let mut counter = 0u64;
        b.iter(|| {
            counter += 1;
            let mut n = [0u8; 12];
            n[4..].copy_from_slice(&counter.to_le_bytes());
            let tag = key
                .seal_in_place_separate_tag(Nonce::assume_unique_for_key(n), Aad::empty(), &mut buf)
                .expect("seal");
            key.open_in_place_separate_tag(
                Nonce::assume_unique_for_key(n),
                Aad::empty(),
                tag,
                &mut buf,
                0..,
            )
            .expect("open");
            black_box(&buf);
        })
    });
    g.finish();
}

/// A and B with a session; `filtered`: B runs agent mode's inbound filter
/// with a rule for A's flow.
fn pair(filtered: bool) -> Pair {
    let rules = filtered.then(|| Ruleset {
        local: vec!["100.64.0.2/32".parse().expect("net")],
        rules: vec![Rule {
            src: vec!["100.64.0.1/32".parse().expect("net")],
            dst: vec!["100.64.0.2/32".parse().expect("net")],
            protocols: vec![6],
            ports: vec![(5201, 5201)],
            rule_id: "iperf".into(),
        }],
    });
    let mut pair = Pair::new(None, rules);
    pair.establish(&tcp_segment(0, 100, Csum::Full));
    pair
}

fn device(c: &mut Criterion) {
    let mut g = c.benchmark_group("device_1420");
    g.throughput(Throughput::Bytes(MTU as u64));
    for (name, filtered) in [("standalone", false), ("filtered", true)] {
        let Pair {
            mut a, mut b, ea, ..
        } = pair(filtered);
        let packet = tcp_segment(0, MSS, Csum::Full);
        let mut wire = vec![0u8; 2048];
        let mut out = vec![0u8; 2048];
        let now = Instant::now();
        g.bench_function(name, |bench| {
            bench.iter(|| {
                let n = match a.handle_tun(now, &packet, &mut wire) {
                    Output::Network(t) => t.packet.len(),
                    _ => panic!("A did not encrypt"),
                };
                match b.handle_udp(now, ea, &wire[..n], &mut out) {
                    Output::Tunnel(p) => {
                        black_box(p);
                    }
                    _ => panic!("B did not deliver"),
                }
            })
        });
    }
    g.finish();
}

fn offload(c: &mut Criterion) {
    let mut g = c.benchmark_group("offload");
    g.throughput(Throughput::Bytes((SEGMENTS * MTU) as u64));

    // Sender: a TSO read (virtio header + one 64 KiB segment), split.
    let hdr = VirtioNetHdr {
        flags: 1, // NEEDS_CSUM
        gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
        hdr_len: 40,
        gso_size: MSS as u16,
        csum_start: 20,
        csum_offset: 16,
    };
    let super_packet = tcp_segment(0, SEGMENTS * MSS, Csum::Partial);
    let mut out: Vec<Vec<u8>> = (0..tun_rs::IDEAL_BATCH_SIZE)
        .map(|_| vec![0u8; MTU + 64])
        .collect();
    let mut sizes = vec![0usize; out.len()];
    g.bench_function("tso_split_64k", |b| {
        b.iter_batched_ref(
            || super_packet.clone(),
            |input| {
                let n = gso_split(input, hdr, &mut out, &mut sizes, 0, false).expect("split");
                assert_eq!(n, SEGMENTS);
            },
            BatchSize::LargeInput,
        )
    });

    // Receiver: the decrypted segments of one flow, coalesced for one write.
    let segments: Vec<Vec<u8>> = (0..SEGMENTS)
        .map(|i| tcp_segment((i * MSS) as u32, MSS, Csum::Full))
        .collect();
    let mut bufs: Vec<Vec<u8>> = (0..SEGMENTS)
        .map(|_| Vec::with_capacity(VIRTIO_NET_HDR_LEN + 65_536))
        .collect();
    let mut tcp = TcpGROTable::default();
    let mut udp = UdpGROTable::default();
    let mut to_write = Vec::with_capacity(SEGMENTS);
    g.bench_function("gro_46", |b| {
        b.iter(|| {
            gro(&mut bufs, &segments, &mut tcp, &mut udp, &mut to_write).expect("GRO");
            assert_eq!(to_write.len(), 1, "one coalesced write");
        })
    });
    g.finish();
}

criterion_group!(benches, aead, device, offload);
criterion_main!(benches);
