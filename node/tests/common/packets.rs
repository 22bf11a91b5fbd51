//! Packets and a connected pair of `Device`s, shared by the hot-path
//! allocation guard (`tests/hot_path_allocations.rs`) and the packet-path
//! benchmark (`benches/packet_path.rs`, which includes this file by path).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Instant;

use ztmesh_node::filter::Ruleset;
use ztmesh_node::tunnel::{Device, Output, PeerConfig};
use ztmesh_proto::keys::WgPrivateKey;

/// A's underlay endpoint.
pub const EA: &str = "198.18.0.1:51820";
/// B's underlay endpoint.
pub const EB: &str = "198.18.0.2:51820";

/// One's-complement sum of `data` added to `sum` (RFC 1071), unfolded.
pub fn sum16(data: &[u8], mut sum: u32) -> u32 {
    for pair in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    sum
}

/// `sum` folded to 16 bits (not complemented).
pub fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// An IPv4 UDP packet with a 1000-byte payload (checksum 0: none).
pub fn udp_packet(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
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

/// What a TCP segment's checksum field holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Csum {
    /// The full checksum: a segment as it travels.
    Full,
    /// The pseudo-header sum only: a TSO super-packet as the TUN hands it
    /// over (`VIRTIO_NET_HDR_F_NEEDS_CSUM`).
    Partial,
}

/// An IPv4 TCP segment of one bulk flow 100.64.0.1:40000 → 100.64.0.2:5201
/// (ACK, DF), `payload` bytes at sequence offset `seq`.
pub fn tcp_segment(seq: u32, payload: usize, csum: Csum) -> Vec<u8> {
    let mut p = vec![0u8; 40 + payload];
    let len = p.len() as u16;
    p[0] = 0x45;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&[100, 64, 0, 1]);
    p[16..20].copy_from_slice(&[100, 64, 0, 2]);
    let ip = !fold(sum16(&p[..20], 0));
    p[10..12].copy_from_slice(&ip.to_be_bytes());
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&5201u16.to_be_bytes());
    p[24..28].copy_from_slice(&(1000 + seq).to_be_bytes());
    p[28..32].copy_from_slice(&1u32.to_be_bytes());
    p[32] = 5 << 4;
    p[33] = 0x10; // ACK
    p[34..36].copy_from_slice(&0xffffu16.to_be_bytes());
    for (k, b) in p[40..].iter_mut().enumerate() {
        *b = (k as u32 + seq) as u8;
    }
    let mut pseudo = [0u8; 12];
    pseudo[..8].copy_from_slice(&p[12..20]);
    pseudo[9] = 6;
    pseudo[10..12].copy_from_slice(&(len - 20).to_be_bytes());
    let value = match csum {
        Csum::Full => !fold(sum16(&p[20..], sum16(&pseudo, 0))),
        Csum::Partial => fold(sum16(&pseudo, 0)),
    };
    p[36..38].copy_from_slice(&value.to_be_bytes());
    p
}

/// Two devices, A (100.64.0.1) and B (100.64.0.2), each the other's only
/// peer, with the given filters (`None`: standalone).
pub struct Pair {
    pub a: Device,
    pub b: Device,
    pub ea: SocketAddr,
    pub eb: SocketAddr,
}

impl Pair {
    pub fn new(a_rules: Option<Ruleset>, b_rules: Option<Ruleset>) -> Self {
        let now = Instant::now();
        let ka: WgPrivateKey = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
            .parse()
            .expect("key");
        let kb: WgPrivateKey = "KCkqKywtLi8wMTIzNDU2Nzg5Ojs8PT4/QEFCQ0RFRkc="
            .parse()
            .expect("key");
        let (ea, eb): (SocketAddr, SocketAddr) =
            (EA.parse().expect("addr"), EB.parse().expect("addr"));
        let mut a = Device::new(&ka, a_rules, now);
        let mut b = Device::new(&kb, b_rules, now);
        let peer = |k: &WgPrivateKey, ip: &str, e| PeerConfig {
            public_key: k.public(),
            preshared_key: None,
            allowed_ips: vec![ip.parse().expect("net")],
            endpoint: Some(e),
            candidates: Vec::new(),
            relay: None,
            persistent_keepalive: None,
        };
        a.set_peers(vec![peer(&kb, "100.64.0.2/32", eb)], now);
        b.set_peers(vec![peer(&ka, "100.64.0.1/32", ea)], now);
        Self { a, b, ea, eb }
    }

    /// The handshake A starts with `first` (an A → B packet): initiation,
    /// response, then A's queued packet, which confirms the session at B.
    pub fn establish(&mut self, first: &[u8]) {
        let now = Instant::now();
        let mut wire = vec![0u8; 2048];
        let mut reply = vec![0u8; 2048];
        let Output::Network(t) = self.a.handle_tun(now, first, &mut wire) else {
            panic!("expected a handshake initiation")
        };
        let init = t.packet.to_vec();
        let Output::Network(t) = self.b.handle_udp(now, self.ea, &init, &mut reply) else {
            panic!("expected a handshake response")
        };
        let resp = t.packet.to_vec();
        let _ = self.a.handle_udp(now, self.eb, &resp, &mut wire);
        while let Some(t) = self.a.poll_transmit(now, &mut wire) {
            let d = t.packet.to_vec();
            let _ = self.b.handle_udp(now, self.ea, &d, &mut reply);
        }
    }
}

/// One TUN write's worth of GRO: `segments` copied into `bufs` behind a
/// zeroed virtio header (as the decryption leaves them), the tables reset,
/// then tun-rs's `handle_gro`; `to_write` gets the indexes of the buffers
/// to write. Allocates nothing once `bufs` have the capacity.
pub fn gro(
    bufs: &mut [Vec<u8>],
    segments: &[Vec<u8>],
    tcp: &mut tun_rs::TcpGROTable,
    udp: &mut tun_rs::UdpGROTable,
    to_write: &mut Vec<usize>,
) -> std::io::Result<()> {
    use tun_rs::VIRTIO_NET_HDR_LEN;
    for (buf, seg) in bufs.iter_mut().zip(segments) {
        buf.clear();
        buf.resize(VIRTIO_NET_HDR_LEN, 0);
        buf.extend_from_slice(seg);
    }
    tcp.reset();
    udp.reset();
    to_write.clear();
    tun_rs::handle_gro(bufs, VIRTIO_NET_HDR_LEN, tcp, udp, false, to_write)
}
