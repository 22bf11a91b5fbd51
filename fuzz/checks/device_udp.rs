//! Fuzzes `Device::handle_udp` with a live session: two devices complete a
//! handshake in memory, then the fuzz input is delivered as datagrams (raw,
//! or as a real datagram with bytes overwritten). Nothing may panic, and
//! nothing that is not authenticated may reach the TUN.
//! Shared by the fuzz target `device_udp` and the corpus replay test in
//! `node/tests/fuzz_corpus.rs`.

use std::net::SocketAddr;
use std::time::Instant;

use ztmesh_node::tunnel::{Device, Output, PeerConfig};
use ztmesh_proto::keys::{WgPrivateKey, WgPublicKey};

const A_KEY: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
const B_KEY: &str = "KCkqKywtLi8wMTIzNDU2Nzg5Ojs8PT4/QEFCQ0RFRkc=";

fn peer(key: WgPublicKey, allowed: &str, endpoint: SocketAddr) -> PeerConfig {
    PeerConfig {
        public_key: key,
        preshared_key: None,
        allowed_ips: vec![allowed.parse().unwrap()],
        endpoint: Some(endpoint),
        candidates: Vec::new(),
        relay: None,
        persistent_keepalive: None,
    }
}

/// An IPv4 ICMP echo request from 100.64.0.1 to 100.64.0.2.
fn ping() -> Vec<u8> {
    let mut p = vec![0u8; 28];
    p[0] = 0x45;
    p[3] = 28;
    p[8] = 64;
    p[9] = 1;
    p[12..16].copy_from_slice(&[100, 64, 0, 1]);
    p[16..20].copy_from_slice(&[100, 64, 0, 2]);
    p[20] = 8;
    p
}

pub fn run(data: &[u8]) {
    let now = Instant::now();
    let ka: WgPrivateKey = A_KEY.parse().unwrap();
    let kb: WgPrivateKey = B_KEY.parse().unwrap();
    let addr_a: SocketAddr = "198.18.0.1:51820".parse().unwrap();
    let addr_b: SocketAddr = "198.18.0.2:51820".parse().unwrap();
    let mut a = Device::new(&ka, None, now);
    let mut b = Device::new(
        &kb,
        if data.first() == Some(&0) {
            Some(ztmesh_node::filter::Ruleset {
                local: vec!["100.64.0.2/32".parse().unwrap()],
                rules: vec![],
            })
        } else {
            None
        },
        now,
    );
    a.set_peers(vec![peer(kb.public(), "100.64.0.2/32", addr_b)], now);
    b.set_peers(vec![peer(ka.public(), "100.64.0.1/32", addr_a)], now);

    // Handshake and one data packet, recording what A sent.
    let mut out = vec![0u8; 2048];
    let mut reply = vec![0u8; 2048];
    let mut sent: Vec<Vec<u8>> = Vec::new();
    if let Output::Network(t) = a.handle_tun(now, &ping(), &mut out) {
        sent.push(t.packet.to_vec());
    }
    for _ in 0..4 {
        let Some(d) = sent.last().cloned() else { break };
        if let Output::Network(t) = b.handle_udp(now, addr_a, &d, &mut reply) {
            let r = t.packet.to_vec();
            if let Output::Network(t) = a.handle_udp(now, addr_b, &r, &mut out) {
                sent.push(t.packet.to_vec());
            }
            while let Some(t) = a.poll_transmit(now, &mut out) {
                sent.push(t.packet.to_vec());
            }
        }
    }

    let mut rest = data;
    while rest.len() >= 2 {
        let (ctl, len) = (rest[0], usize::from(rest[1]));
        rest = &rest[2..];
        let take = len.min(rest.len());
        let (chunk, tail) = rest.split_at(take);
        rest = tail;
        let datagram = if ctl & 1 == 0 || sent.is_empty() {
            chunk.to_vec()
        } else {
            let mut d = sent[usize::from(ctl >> 1) % sent.len()].clone();
            for (i, byte) in chunk.iter().enumerate().take(d.len()) {
                let at = (usize::from(*byte) * 7 + i) % d.len();
                d[at] ^= byte | 1;
            }
            d
        };
        let from = if ctl & 2 == 0 {
            addr_a
        } else {
            "198.18.0.66:1".parse().unwrap()
        };
        if let Output::Tunnel(p) = b.handle_udp(now, from, &datagram, &mut out) {
            // Only A's genuine packets decrypt, and they come from A's range.
            assert_eq!(&p[12..16], &[100, 64, 0, 1]);
        }
        while b.poll_transmit(now, &mut out).is_some() {}
    }
}
