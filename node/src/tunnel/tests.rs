//! Two (or three) `Device`s exchanging datagrams in memory on a virtual clock.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::filter::packet::build;
use crate::filter::packet::{PROTO_ICMP, PROTO_UDP};
use crate::filter::{Rule, Ruleset};

/// A managed filter for a node owning `ip`.
fn managed(ip: Ipv4Addr, rules: Vec<Rule>) -> Option<Ruleset> {
    Some(Ruleset {
        local: vec![IpNet::from(std::net::IpAddr::V4(ip))],
        rules,
    })
}

const BUF: usize = 2048;

struct Node {
    dev: Device,
    key: WgPrivateKey,
    addr: SocketAddr,
    ip: Ipv4Addr,
    tun_rx: Vec<Vec<u8>>,
}

/// A virtual network: nodes, in-flight datagrams and a clock.
struct Net {
    nodes: Vec<Node>,
    wire: VecDeque<(SocketAddr, Destination, Vec<u8>)>,
    now: Instant,
    captured: Vec<(Destination, Vec<u8>)>,
    /// Underlay addresses that drop everything sent to them (a dead path).
    blackholed: Vec<SocketAddr>,
    /// Datagrams the relay carried.
    relayed: usize,
}

fn key(seed: u8) -> WgPrivateKey {
    let mut rng = StdRng::seed_from_u64(u64::from(seed));
    WgPrivateKey::generate(&mut rng)
}

fn peer_of(n: &Node, allowed: &[&str], keepalive: Option<u16>) -> PeerConfig {
    PeerConfig {
        public_key: n.key.public(),
        preshared_key: None,
        allowed_ips: allowed.iter().map(|s| s.parse().unwrap()).collect(),
        endpoint: Some(n.addr),
        candidates: Vec::new(),
        relay: None,
        persistent_keepalive: keepalive,
    }
}

impl Net {
    /// Nodes i = 0.. with overlay 100.64.0.(i+1) and underlay 198.18.0.(i+1):51820.
    fn new(n: u8) -> Self {
        let now = Instant::now();
        let nodes = (0..n)
            .map(|i| {
                let key = key(i + 1);
                Node {
                    dev: Device::new(&key, None, now),
                    key,
                    addr: SocketAddr::from(([198, 18, 0, i + 1], 51820)),
                    ip: Ipv4Addr::new(100, 64, 0, i + 1),
                    tun_rx: Vec::new(),
                }
            })
            .collect();
        Self {
            nodes,
            wire: VecDeque::new(),
            now,
            captured: Vec::new(),
            blackholed: Vec::new(),
            relayed: 0,
        }
    }

    /// Configures a full mesh where node i owns 100.64.0.(i+1)/32.
    fn mesh(n: u8) -> Self {
        let mut net = Self::new(n);
        for i in 0..n as usize {
            let peers = (0..n as usize)
                .filter(|j| *j != i)
                .map(|j| {
                    let ip = format!("{}/32", net.nodes[j].ip);
                    peer_of(&net.nodes[j], &[&ip], None)
                })
                .collect();
            let now = net.now;
            net.nodes[i].dev.set_peers(peers, now);
        }
        net
    }

    fn index_of(&self, addr: SocketAddr) -> Option<usize> {
        self.nodes.iter().position(|n| n.addr == addr)
    }

    /// Writes an IP packet into node `i`'s TUN.
    fn send_ip(&mut self, i: usize, packet: &[u8]) -> Result<(), DropReason> {
        let mut out = [0u8; BUF];
        let now = self.now;
        let from = self.nodes[i].addr;
        match self.nodes[i].dev.handle_tun(now, packet, &mut out) {
            Output::Network(t) => self.wire.push_back((from, t.to, t.packet.to_vec())),
            Output::Dropped(r) => return Err(r),
            _ => {}
        }
        self.drain(i);
        Ok(())
    }

    fn drain(&mut self, i: usize) {
        let mut out = [0u8; BUF];
        let now = self.now;
        let from = self.nodes[i].addr;
        let mut guard = 0;
        while let Some(t) = self.nodes[i].dev.poll_transmit(now, &mut out) {
            self.wire.push_back((from, t.to, t.packet.to_vec()));
            guard += 1;
            assert!(guard < 1000, "poll_transmit does not terminate");
        }
    }

    /// Delivers one datagram, returning the receiver's verdict.
    fn deliver_one(&mut self) -> Option<Result<(), DropReason>> {
        let (from, to, data) = self.wire.pop_front()?;
        self.captured.push((to, data.clone()));
        match to {
            Destination::Udp(to) => {
                if self.blackholed.contains(&to) || self.blackholed.contains(&from) {
                    return Some(Ok(()));
                }
                let Some(i) = self.index_of(to) else {
                    return Some(Ok(()));
                };
                Some(self.inject(i, from, &data))
            }
            // The relay: node i is peer id i + 1; the source is the sender's id.
            Destination::Relay(id) => {
                self.relayed += 1;
                let i = usize::try_from(id).ok()?.checked_sub(1)?;
                let src = self.index_of(from)? as u64 + 1;
                Some(self.inject_relay(i, src, &data))
            }
        }
    }

    fn inject_relay(&mut self, i: usize, src: u64, data: &[u8]) -> Result<(), DropReason> {
        self.inject_from(i, Destination::Relay(src), data)
    }

    fn inject(&mut self, i: usize, from: SocketAddr, data: &[u8]) -> Result<(), DropReason> {
        self.inject_from(i, Destination::Udp(from), data)
    }

    /// Hands node `i` a datagram that came by UDP from an address or through
    /// the relay from a peer id, and routes what it outputs.
    fn inject_from(&mut self, i: usize, from: Destination, data: &[u8]) -> Result<(), DropReason> {
        let mut out = [0u8; BUF];
        let now = self.now;
        let me = self.nodes[i].addr;
        let dev = &mut self.nodes[i].dev;
        let output = match from {
            Destination::Udp(addr) => dev.handle_udp(now, addr, data, &mut out),
            Destination::Relay(id) => dev.handle_relay(now, id, data, &mut out),
        };
        let r = match output {
            Output::Network(t) => {
                self.wire.push_back((me, t.to, t.packet.to_vec()));
                Ok(())
            }
            Output::Tunnel(p) => {
                self.nodes[i].tun_rx.push(p.to_vec());
                Ok(())
            }
            Output::Done => Ok(()),
            Output::Dropped(r) => Err(r),
        };
        self.drain(i);
        r
    }

    /// Delivers everything in flight (bounded).
    fn run(&mut self) -> Vec<DropReason> {
        let mut drops = Vec::new();
        for _ in 0..1000 {
            match self.deliver_one() {
                Some(Err(r)) => drops.push(r),
                Some(Ok(())) => {}
                None => return drops,
            }
        }
        panic!("network did not settle");
    }

    /// Advances the clock by `d` in timer ticks, running timers and the network.
    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.now = (self.now + TIMER_TICK).min(end);
            for i in 0..self.nodes.len() {
                let now = self.now;
                self.nodes[i].dev.handle_timeout(now);
                self.drain(i);
            }
            self.run();
        }
    }

    fn ping(&self, from: usize, to: usize, id: u16) -> Vec<u8> {
        build::v4(
            self.nodes[from].ip,
            self.nodes[to].ip,
            PROTO_ICMP,
            &build::icmp(8, id),
        )
    }
}

fn receiver_index(datagram: &[u8]) -> u32 {
    u32::from_le_bytes([datagram[4], datagram[5], datagram[6], datagram[7]])
}

#[test]
fn handshake_then_data_both_ways() {
    let mut net = Net::mesh(2);
    let p = net.ping(0, 1, 1);
    net.send_ip(0, &p).unwrap();
    assert_eq!(
        net.wire.front().map(|w| w.2[0]),
        Some(1),
        "handshake initiation first"
    );
    assert!(net.run().is_empty());
    // The queued ping was flushed after the handshake.
    assert_eq!(net.nodes[1].tun_rx, vec![p]);
    let back = net.ping(1, 0, 2);
    net.send_ip(1, &back).unwrap();
    assert!(net.run().is_empty());
    assert_eq!(net.nodes[0].tun_rx, vec![back]);

    let now = net.now;
    for n in &net.nodes {
        let st = n.dev.peers(net.now);
        assert_eq!(st.len(), 1);
        assert_eq!(st[0].last_handshake, Some(now));
        assert!(st[0].rx_bytes > 0 && st[0].tx_bytes > 0);
    }
}

#[test]
fn learns_the_endpoint_only_from_authenticated_packets() {
    let mut net = Net::mesh(2);
    let p = net.ping(0, 1, 1);
    net.send_ip(0, &p).unwrap();
    net.run();
    let roamed: SocketAddr = "[fd00::9]:4000".parse().unwrap();
    // Garbage from a new address does not move the endpoint.
    let mut junk = vec![4u8, 0, 0, 0];
    junk.extend_from_slice(&[0; 40]);
    let _ = net.inject(1, roamed, &junk);
    assert_eq!(
        net.nodes[1].dev.peers(net.now)[0].endpoint,
        Some(net.nodes[0].addr)
    );
    // A real packet replayed from a new address is dropped too (replay window).
    let (_, data) = net.captured.last().unwrap().clone();
    assert_eq!(net.inject(1, roamed, &data), Err(DropReason::Replay));
    assert_eq!(
        net.nodes[1].dev.peers(net.now)[0].endpoint,
        Some(net.nodes[0].addr)
    );
}

#[test]
fn persistent_keepalive_runs_on_the_callers_clock() {
    let mut net = Net::new(2);
    let (a, b) = (&net.nodes[0], &net.nodes[1]);
    let to_b = peer_of(b, &["100.64.0.2/32"], Some(25));
    let to_a = peer_of(a, &["100.64.0.1/32"], None);
    let now = net.now;
    net.nodes[0].dev.set_peers(vec![to_b], now);
    net.nodes[1].dev.set_peers(vec![to_a], now);
    let p = net.ping(0, 1, 1);
    net.send_ip(0, &p).unwrap();
    net.run();
    let before = net.captured.len();
    net.advance(Duration::from_secs(24));
    let keepalives = |net: &Net, from: usize| {
        net.captured[before..]
            .iter()
            .filter(|(to, d)| {
                *to == Destination::Udp(net.nodes[1 - from].addr) && d[0] == 4 && d.len() == 32
            })
            .count()
    };
    assert_eq!(keepalives(&net, 0), 0, "no keepalive before the interval");
    net.advance(Duration::from_secs(2));
    assert_eq!(keepalives(&net, 0), 1, "one keepalive after 25 s");
    net.advance(Duration::from_secs(25));
    assert_eq!(keepalives(&net, 0), 2);
    // Keepalives are authenticated traffic: no drops, nothing on the TUN.
    assert_eq!(net.nodes[1].tun_rx.len(), 1);
}

#[test]
fn new_peer_with_keepalive_handshakes_on_the_first_tick() {
    // A daemon restarted from its stored netmap must re-key at once, not
    // wait for the remote side's stale session to time out.
    let mut net = Net::new(2);
    let (a, b) = (&net.nodes[0], &net.nodes[1]);
    let to_b = peer_of(b, &["100.64.0.2/32"], Some(25));
    let to_a = peer_of(a, &["100.64.0.1/32"], None);
    let now = net.now;
    net.nodes[0].dev.set_peers(vec![to_b], now);
    net.nodes[1].dev.set_peers(vec![to_a], now);
    net.advance(TIMER_TICK);
    assert!(
        net.nodes[0].dev.peers(net.now)[0].last_handshake.is_some(),
        "handshake completed within one timer tick"
    );
    // Without keepalive nothing is sent until there is traffic.
    let mut quiet = Net::new(2);
    let (a, b) = (&quiet.nodes[0], &quiet.nodes[1]);
    let to_b = peer_of(b, &["100.64.0.2/32"], None);
    let to_a = peer_of(a, &["100.64.0.1/32"], None);
    let now = quiet.now;
    quiet.nodes[0].dev.set_peers(vec![to_b], now);
    quiet.nodes[1].dev.set_peers(vec![to_a], now);
    quiet.advance(Duration::from_secs(5));
    assert!(quiet.captured.is_empty());
}

#[test]
fn initiator_rekeys_after_120_seconds() {
    let mut net = Net::mesh(2);
    let p = net.ping(0, 1, 1);
    net.send_ip(0, &p).unwrap();
    net.run();
    let first = receiver_index(&net.captured.last().unwrap().1);
    net.advance(Duration::from_secs(60));
    net.send_ip(0, &net.ping(0, 1, 2)).unwrap();
    net.run();
    assert_eq!(receiver_index(&net.captured.last().unwrap().1), first);
    let inits_before = net.captured.iter().filter(|(_, d)| d[0] == 1).count();
    net.advance(Duration::from_secs(61));
    net.send_ip(0, &net.ping(0, 1, 3)).unwrap();
    net.run();
    net.advance(Duration::from_secs(1));
    let inits = net.captured.iter().filter(|(_, d)| d[0] == 1).count();
    assert_eq!(inits, inits_before + 1, "one new handshake initiation");
    net.send_ip(0, &net.ping(0, 1, 4)).unwrap();
    net.run();
    let last = net.captured.last().unwrap().1.clone();
    assert_eq!(last[0], 4);
    assert_ne!(receiver_index(&last), first, "data uses the new session");
    assert_eq!(net.nodes[1].tun_rx.len(), 4);
    assert_eq!(
        net.nodes[0].dev.peers(net.now)[0].last_handshake,
        net.nodes[1].dev.peers(net.now)[0].last_handshake
    );
}

#[test]
fn replayed_data_packet_is_dropped() {
    let mut net = Net::mesh(2);
    net.send_ip(0, &net.ping(0, 1, 1)).unwrap();
    net.run();
    net.send_ip(0, &net.ping(0, 1, 2)).unwrap();
    let (from, _, data) = net.wire.front().cloned().unwrap();
    net.run();
    assert_eq!(net.inject(1, from, &data), Err(DropReason::Replay));
    assert_eq!(net.nodes[1].dev.drop_count(DropReason::Replay), 1);
    assert_eq!(net.nodes[1].tun_rx.len(), 2);
}

#[test]
fn unknown_receiver_index_is_dropped() {
    let mut net = Net::mesh(2);
    net.send_ip(0, &net.ping(0, 1, 1)).unwrap();
    net.run();
    let (from, _, mut data) = {
        net.send_ip(0, &net.ping(0, 1, 2)).unwrap();
        net.wire.pop_front().unwrap()
    };
    data[4..8].copy_from_slice(&0x00ab_cd00u32.to_le_bytes());
    assert_eq!(net.inject(1, from, &data), Err(DropReason::UnknownIndex));
    assert_eq!(net.nodes[1].dev.drop_count(DropReason::UnknownIndex), 1);
}

#[test]
fn removed_peer_loses_session_and_flows_at_once() {
    let mut net = Net::mesh(2);
    let now = net.now;
    let deny_all = managed(net.nodes[1].ip, vec![]);
    net.nodes[1].dev.set_filter(deny_all);
    // B opens a UDP flow to A so that conntrack holds an entry for A.
    let q = build::v4(
        net.nodes[1].ip,
        net.nodes[0].ip,
        PROTO_UDP,
        &build::udp(5000, 53, b"q"),
    );
    net.send_ip(1, &q).unwrap();
    net.run();
    assert_eq!(net.nodes[1].dev.flow_count(), 1);
    net.nodes[1].dev.set_peers(vec![], now);
    assert_eq!(net.nodes[1].dev.flow_count(), 0);
    let drops = {
        net.send_ip(0, &net.ping(0, 1, 9)).unwrap();
        net.run()
    };
    assert_eq!(drops, vec![DropReason::UnknownIndex]);
    // Outbound to the removed peer has no route any more.
    assert_eq!(net.send_ip(1, &q), Err(DropReason::NoRoute));
}

#[test]
fn a_handshake_from_a_key_that_is_no_peer_is_verified_and_counted() {
    let mut net = Net::mesh(2);
    let now = net.now;
    // B no longer lists A; A still tries to reach B.
    net.nodes[1].dev.set_peers(vec![], now);
    net.send_ip(0, &net.ping(0, 1, 1)).unwrap();
    assert_eq!(net.run(), vec![DropReason::UnknownPeer]);
    let a_key = net.nodes[0].key.public().0;
    let unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(
        net.nodes[1].dev.take_unknown_handshakes(unix_s),
        vec![(a_key, 1)]
    );
    assert!(
        net.nodes[1].dev.take_unknown_handshakes(unix_s).is_empty(),
        "taken"
    );
    // The same initiation again (a replay) is not counted.
    let init = net
        .captured
        .iter()
        .find(|(_, d)| d.first() == Some(&1))
        .map(|(_, d)| d.clone())
        .expect("the initiation crossed the wire");
    let from = net.nodes[0].addr;
    assert_eq!(net.inject(1, from, &init), Err(DropReason::UnknownPeer));
    assert!(net.nodes[1].dev.take_unknown_handshakes(unix_s).is_empty());
}

#[test]
fn unchanged_peers_keep_their_session_across_set_peers() {
    let mut net = Net::mesh(3);
    net.send_ip(0, &net.ping(0, 1, 1)).unwrap();
    net.run();
    let inits = net.captured.iter().filter(|(_, d)| d[0] == 1).count();
    // Re-apply node 0's config without node 2: node 1's session survives.
    let now = net.now;
    let keep = peer_of(&net.nodes[1], &["100.64.0.2/32"], None);
    net.nodes[0].dev.set_peers(vec![keep], now);
    net.send_ip(0, &net.ping(0, 1, 2)).unwrap();
    net.run();
    assert_eq!(
        net.captured.iter().filter(|(_, d)| d[0] == 1).count(),
        inits
    );
    assert_eq!(net.nodes[1].tun_rx.len(), 2);
}

#[test]
fn spoofed_inner_source_is_dropped_even_inside_an_overlapping_range() {
    // Node 2 owns 100.64.0.0/16, node 1 the more specific 100.64.0.2/32 (netns.sh's case).
    let mut net = Net::new(3);
    let now = net.now;
    let peers0 = vec![
        peer_of(&net.nodes[1], &["100.64.0.2/32"], None),
        peer_of(&net.nodes[2], &["100.64.0.0/16"], None),
    ];
    net.nodes[0].dev.set_peers(peers0, now);
    for i in 1..3 {
        let p = peer_of(&net.nodes[0], &["100.64.0.0/10"], None);
        net.nodes[i].dev.set_peers(vec![p], now);
    }
    // Node 2 sends from node 1's address: inside its own /16, but node 1's /32 wins.
    let spoof = build::v4(
        Ipv4Addr::new(100, 64, 0, 2),
        net.nodes[0].ip,
        PROTO_ICMP,
        &build::icmp(8, 1),
    );
    net.send_ip(2, &spoof).unwrap();
    let drops = net.run();
    assert_eq!(drops, vec![DropReason::SpoofedSource]);
    // A source outside every AllowedIPs range.
    let outside = build::v4(
        Ipv4Addr::new(198, 18, 0, 99),
        net.nodes[0].ip,
        PROTO_ICMP,
        &build::icmp(8, 2),
    );
    net.send_ip(2, &outside).unwrap();
    assert_eq!(net.run(), vec![DropReason::SpoofedSource]);
    // Its own address inside the /16 is fine.
    let own = build::v4(
        Ipv4Addr::new(100, 64, 7, 7),
        net.nodes[0].ip,
        PROTO_ICMP,
        &build::icmp(8, 3),
    );
    net.send_ip(2, &own).unwrap();
    assert!(net.run().is_empty());
    assert_eq!(net.nodes[0].tun_rx, vec![own]);
    assert_eq!(net.nodes[0].dev.drop_count(DropReason::SpoofedSource), 2);
}

#[test]
fn managed_filter_denies_new_inbound_flows_but_admits_replies() {
    let mut net = Net::mesh(2);
    let deny_all = managed(net.nodes[0].ip, vec![]);
    net.nodes[0].dev.set_filter(deny_all);
    // B pings A: denied by default.
    net.send_ip(1, &net.ping(1, 0, 1)).unwrap();
    assert_eq!(
        net.run(),
        vec![DropReason::Filtered(filter::Reason::NoRule)]
    );
    // A pings B, B answers: the reply is admitted.
    net.send_ip(0, &net.ping(0, 1, 7)).unwrap();
    net.run();
    let reply = build::v4(
        net.nodes[1].ip,
        net.nodes[0].ip,
        PROTO_ICMP,
        &build::icmp(0, 7),
    );
    net.send_ip(1, &reply).unwrap();
    assert!(net.run().is_empty());
    assert_eq!(net.nodes[0].tun_rx, vec![reply]);
    assert_eq!(
        net.nodes[0]
            .dev
            .drop_count(DropReason::Filtered(filter::Reason::NoRule)),
        1
    );
}

#[test]
fn handshake_flood_gets_cookie_replies() {
    let mut net = Net::mesh(2);
    net.send_ip(0, &net.ping(0, 1, 1)).unwrap();
    let (_, _, init) = net.wire.front().cloned().unwrap();
    net.run();
    let attacker: SocketAddr = "198.18.0.66:9999".parse().unwrap();
    let mut cookies = 0;
    for _ in 0..400 {
        let mut out = [0u8; BUF];
        let now = net.now;
        if let Output::Network(t) = net.nodes[1].dev.handle_udp(now, attacker, &init, &mut out) {
            if t.packet[0] == 3 {
                assert_eq!(
                    t.to,
                    Destination::Udp(attacker),
                    "cookies go to the packet's source"
                );
                cookies += 1;
            }
        }
    }
    assert!(cookies > 100, "got {cookies} cookie replies");
    // Replayed initiations never move the peer's endpoint.
    assert_eq!(
        net.nodes[1].dev.peers(net.now)[0].endpoint,
        Some(net.nodes[0].addr)
    );
    assert!(net.nodes[1].dev.drop_count(DropReason::HandshakeFailed) > 0);
}

#[test]
fn outbound_without_route_or_endpoint_is_counted() {
    let mut net = Net::new(2);
    let now = net.now;
    let mut p = peer_of(&net.nodes[1], &["100.64.0.2/32"], None);
    p.endpoint = None;
    net.nodes[0].dev.set_peers(vec![p], now);
    assert_eq!(
        net.send_ip(0, &net.ping(0, 1, 1)),
        Err(DropReason::NoEndpoint)
    );
    let stray = build::v4(
        net.nodes[0].ip,
        Ipv4Addr::new(100, 64, 9, 9),
        PROTO_ICMP,
        &build::icmp(8, 1),
    );
    assert_eq!(net.send_ip(0, &stray), Err(DropReason::NoRoute));
    assert_eq!(net.send_ip(0, &[0x45, 0]), Err(DropReason::Malformed));
}

#[test]
fn random_datagrams_never_panic_and_are_counted() {
    let mut net = Net::mesh(2);
    net.send_ip(0, &net.ping(0, 1, 1)).unwrap();
    net.run();
    let real: Vec<Vec<u8>> = net.captured.iter().map(|(_, d)| d.clone()).collect();
    let mut rng = StdRng::seed_from_u64(7);
    let from = net.nodes[0].addr;
    for i in 0..5000 {
        let mut d = if i % 2 == 0 {
            let n = rng.gen_range(0..200);
            (0..n).map(|_| rng.gen()).collect::<Vec<u8>>()
        } else {
            real[i % real.len()].clone()
        };
        if !d.is_empty() {
            let k = rng.gen_range(0..d.len());
            d[k] ^= rng.gen::<u8>() | 1;
            if rng.gen_bool(0.3) {
                d[0] = rng.gen_range(1..5);
            }
        }
        let _ = net.inject(1, from, &d);
    }
    let total: u64 = net.nodes[1].dev.drops().iter().map(|(_, n)| n).sum();
    assert!(total >= 4900, "drops counted: {total}");
}

#[test]
fn peers_build_their_tunn_only_when_used() {
    let mut net = Net::mesh(3);
    let built = |n: &Node| -> Vec<bool> {
        n.dev
            .peers
            .iter()
            .flatten()
            .map(|p| p.tunn.is_some())
            .collect()
    };
    assert_eq!(built(&net.nodes[0]), vec![false, false]);
    // Timers over idle peers build nothing.
    net.now += TIMER_TICK;
    let now = net.now;
    net.nodes[0].dev.handle_timeout(now);
    let mut out = vec![0u8; BUF];
    assert!(net.nodes[0].dev.poll_transmit(now, &mut out).is_none());
    assert_eq!(built(&net.nodes[0]), vec![false, false]);

    net.send_ip(0, &net.ping(0, 1, 1)).unwrap();
    assert!(net.run().is_empty());
    assert_eq!(net.nodes[1].tun_rx.len(), 1);
    // Node 0 built the Tunn of node 1 only; node 1 that of node 0 only.
    assert_eq!(built(&net.nodes[0]).iter().filter(|b| **b).count(), 1);
    assert_eq!(built(&net.nodes[1]).iter().filter(|b| **b).count(), 1);
    assert_eq!(built(&net.nodes[2]), vec![false, false]);
}

#[test]
fn data_for_a_peer_that_never_handshaked_is_an_unknown_index() {
    let mut net = Net::mesh(2);
    net.send_ip(0, &net.ping(0, 1, 1)).unwrap();
    net.run();
    let (from, _, data) = {
        net.send_ip(0, &net.ping(0, 1, 2)).unwrap();
        net.wire.pop_front().unwrap()
    };
    // Node 1's receiver index for node 0, replayed against a fresh node 1
    // that has node 0 configured but never built its Tunn.
    let fresh_key = net.nodes[1].key.clone();
    let mut fresh = Device::new(&fresh_key, None, net.now);
    fresh.set_peers(
        vec![peer_of(&net.nodes[0], &["100.64.0.1/32"], None)],
        net.now,
    );
    let mut out = vec![0u8; BUF];
    assert!(matches!(
        fresh.handle_udp(net.now, from, &data, &mut out),
        Output::Dropped(DropReason::UnknownIndex)
    ));
    assert!(fresh.peers.iter().flatten().all(|p| p.tunn.is_none()));
}

#[test]
fn one_flooding_source_does_not_starve_another_peers_handshake() {
    // Node 1 is the victim; node 0's initiation is replayed by a flooder at
    // another address, far beyond any limit, all at one instant; node 2 then
    // handshakes with node 1 at that same instant.
    let mut net = Net::mesh(3);
    net.send_ip(0, &net.ping(0, 1, 1)).unwrap();
    let (_, _, init) = net.wire.front().cloned().unwrap();
    net.run();
    let flooder: SocketAddr = "198.18.0.66:9999".parse().unwrap();
    let (mut cookies, mut handshakes_tried) = (0, 0);
    for _ in 0..5_000 {
        let mut out = [0u8; BUF];
        let now = net.now;
        match net.nodes[1].dev.handle_udp(now, flooder, &init, &mut out) {
            Output::Network(t) if t.packet[0] == 3 => cookies += 1,
            Output::Dropped(DropReason::HandshakeFailed) => handshakes_tried += 1,
            _ => {}
        }
    }
    assert!(
        cookies > 4_000,
        "the flooder is asked for cookies ({cookies})"
    );
    assert!(
        handshakes_tried <= 2 * admission::SOURCE_BURST,
        "the flooder costs at most its own small budget of Diffie-Hellman ({handshakes_tried})"
    );

    let p = net.ping(2, 1, 7);
    net.send_ip(2, &p).unwrap();
    assert!(net.run().is_empty());
    assert_eq!(
        net.nodes[1].tun_rx.last(),
        Some(&p),
        "node 2 completed its handshake and its ping arrived"
    );
    assert!(net.nodes[1]
        .dev
        .peers(net.now)
        .iter()
        .any(|s| s.config.public_key == net.nodes[2].key.public() && s.last_handshake.is_some()));
}

#[test]
fn under_global_load_a_peer_completes_its_handshake_with_a_cookie() {
    // Many spoofed sources use up the global budget of free handshakes; node
    // 2 is then asked for a cookie, and its next initiation (carrying MAC2
    // for its real address) is admitted.
    let mut net = Net::mesh(3);
    net.send_ip(0, &net.ping(0, 1, 1)).unwrap();
    let (_, _, init) = net.wire.front().cloned().unwrap();
    net.run();
    for i in 0..(2 * admission::GLOBAL_RATE as u32) {
        let spoofed = SocketAddr::from((Ipv4Addr::from(0xc613_0000 | i), 51820));
        let mut out = [0u8; BUF];
        let now = net.now;
        let _ = net.nodes[1].dev.handle_udp(now, spoofed, &init, &mut out);
    }
    let p = net.ping(2, 1, 9);
    net.send_ip(2, &p).unwrap();
    let (from, to, first) = net.wire.pop_front().unwrap();
    assert_eq!(first[0], 1, "node 2 initiates");
    let mut out = [0u8; BUF];
    let now = net.now;
    let cookie = match net.nodes[1].dev.handle_udp(now, from, &first, &mut out) {
        Output::Network(t) => t.packet.to_vec(),
        other => panic!("expected a cookie reply, got {other:?}"),
    };
    assert_eq!(cookie[0], 3, "a cookie reply, not a handshake response");
    let Destination::Udp(to) = to else {
        panic!("a UDP destination");
    };
    assert_eq!(net.inject(2, to, &cookie), Ok(()));
    // boringtun would resend after its retry timer; force the resend now.
    let slot = net.nodes[2].dev.by_key[&net.nodes[1].key.public()];
    let mut init2 = [0u8; BUF];
    let n = match net.nodes[2].dev.peers[slot]
        .as_mut()
        .and_then(|p| p.tunn.as_deref_mut())
        .expect("node 2's tunn")
        .format_handshake_initiation(&mut init2, true)
    {
        TunnResult::WriteToNetwork(b) => b.len(),
        _ => panic!("no initiation"),
    };
    net.wire
        .push_back((from, Destination::Udp(to), init2[..n].to_vec()));
    assert!(net.run().is_empty());
    assert_eq!(
        net.nodes[1].tun_rx.last(),
        Some(&p),
        "the handshake completed"
    );
}

/// A full mesh where every peer is reachable through the relay as id
/// `index + 1`, with a dead LAN candidate listed first.
fn relay_mesh(n: u8) -> Net {
    let mut net = Net::new(n);
    for i in 0..n as usize {
        let peers = (0..n as usize)
            .filter(|j| *j != i)
            .map(|j| {
                let ip = format!("{}/32", net.nodes[j].ip);
                let mut p = peer_of(&net.nodes[j], &[&ip], None);
                p.endpoint = Some(SocketAddr::from(([198, 19, 9, j as u8 + 1], 51820)));
                p.candidates = vec![net.nodes[j].addr];
                p.relay = Some(j as u64 + 1);
                p
            })
            .collect();
        let now = net.now;
        net.nodes[i].dev.set_peers(peers, now);
    }
    net
}

fn destination(net: &Net, i: usize) -> Option<Destination> {
    net.nodes[i].dev.peers(net.now)[0].destination
}

#[test]
fn traffic_starts_on_the_relay_and_upgrades_to_the_candidate_that_answers() {
    let mut net = relay_mesh(2);
    assert_eq!(destination(&net, 0), Some(Destination::Relay(2)));
    let p = net.ping(0, 1, 1);
    net.send_ip(0, &p).unwrap();
    assert!(net.run().is_empty());
    assert_eq!(
        net.nodes[1].tun_rx,
        vec![p],
        "the handshake and the ping went via the relay"
    );
    assert!(net.relayed > 0);
    assert_eq!(
        net.nodes[1].dev.peers(net.now)[0].last_rx,
        Some(Destination::Relay(1))
    );
    // Probe rounds on the next timer passes; node 1 answers a probe and
    // both sides hold an authenticated UDP path.
    for id in 2..6 {
        let p = net.ping(0, 1, id);
        net.send_ip(0, &p).unwrap();
        let back = net.ping(1, 0, id);
        net.send_ip(1, &back).unwrap();
        net.advance(Duration::from_millis(500));
    }
    let direct_0 = Some(Destination::Udp(net.nodes[1].addr));
    let direct_1 = Some(Destination::Udp(net.nodes[0].addr));
    assert_eq!(destination(&net, 0), direct_0);
    assert_eq!(destination(&net, 1), direct_1);
    assert!(net.nodes[0].dev.peers(net.now)[0].direct);
    // Data now goes direct: nothing more through the relay.
    let relayed = net.relayed;
    let p = net.ping(0, 1, 9);
    net.send_ip(0, &p).unwrap();
    assert!(net.run().is_empty());
    assert_eq!(net.nodes[1].tun_rx.last(), Some(&p));
    assert_eq!(net.relayed, relayed);
    assert_eq!(
        net.nodes[1].dev.peers(net.now)[0].last_rx,
        Some(Destination::Udp(net.nodes[0].addr))
    );
    // The dead candidate was probed but never became the path.
    let dead = SocketAddr::from(([198, 19, 9, 2], 51820));
    assert!(net
        .captured
        .iter()
        .any(|(to, _)| *to == Destination::Udp(dead)));
}

#[test]
fn a_dead_direct_path_falls_back_to_the_relay_and_returns_when_restored() {
    let mut net = relay_mesh(2);
    for id in 1..6 {
        net.send_ip(0, &net.ping(0, 1, id)).unwrap();
        net.send_ip(1, &net.ping(1, 0, id)).unwrap();
        net.advance(Duration::from_millis(500));
    }
    assert_eq!(
        destination(&net, 0),
        Some(Destination::Udp(net.nodes[1].addr))
    );
    // The NAT routers now drop UDP between them; traffic keeps flowing.
    net.blackholed = vec![net.nodes[0].addr, net.nodes[1].addr];
    let mut delivered = 0;
    for id in 10..30 {
        let p = net.ping(0, 1, id);
        net.send_ip(0, &p).unwrap();
        net.send_ip(1, &net.ping(1, 0, id)).unwrap();
        net.run();
        if net.nodes[1].tun_rx.last() == Some(&p) {
            delivered += 1;
        }
        net.advance(Duration::from_millis(500));
    }
    assert_eq!(destination(&net, 0), Some(Destination::Relay(2)));
    assert_eq!(destination(&net, 1), Some(Destination::Relay(1)));
    assert!(net.nodes[0].dev.peers(net.now)[0].path.fallbacks >= 1);
    // Lost only while the direct path timed out (at most DIRECT_TIMEOUT of 0.5 s steps).
    assert!(delivered >= 20 - 11, "{delivered} of 20 pings crossed");
    // Restored: direct again.
    net.blackholed.clear();
    for id in 40..46 {
        net.send_ip(0, &net.ping(0, 1, id)).unwrap();
        net.send_ip(1, &net.ping(1, 0, id)).unwrap();
        net.advance(Duration::from_millis(500));
    }
    assert_eq!(
        destination(&net, 0),
        Some(Destination::Udp(net.nodes[1].addr))
    );
}

#[test]
fn a_relayed_datagram_claiming_another_peer_is_dropped_and_counted() {
    let mut net = relay_mesh(3);
    net.send_ip(0, &net.ping(0, 1, 1)).unwrap();
    net.send_ip(2, &net.ping(2, 1, 1)).unwrap();
    assert!(net.run().is_empty());
    // Node 0's next data message to node 1, delivered by a lying relay as
    // coming from node 2 (id 3).
    let p = net.ping(0, 1, 2);
    let mut out = [0u8; BUF];
    let now = net.now;
    let Output::Network(t) = net.nodes[0].dev.handle_tun(now, &p, &mut out) else {
        panic!("an encrypted datagram");
    };
    let data = t.packet.to_vec();
    assert_eq!(
        net.inject_relay(1, 3, &data),
        Err(DropReason::RelayMismatch)
    );
    // An id that is no peer at all.
    assert_eq!(
        net.inject_relay(1, 77, &data),
        Err(DropReason::RelayMismatch)
    );
    assert_eq!(net.nodes[1].dev.drop_count(DropReason::RelayMismatch), 2);
    // The same datagram with the true id is delivered (and it was not
    // consumed by the refused attempts).
    assert_eq!(net.inject_relay(1, 1, &data), Ok(()));
    assert_eq!(net.nodes[1].tun_rx.last(), Some(&p));
    // Garbage claiming a real peer does not decrypt.
    let now = net.now;
    let Output::Network(t) = net.nodes[0].dev.handle_tun(now, &p, &mut out) else {
        panic!("an encrypted datagram");
    };
    let mut forged = t.packet.to_vec();
    forged[20] ^= 0xff;
    assert_eq!(net.inject_relay(1, 1, &forged), Err(DropReason::Decrypt));
    // Relayed packets never became a direct path.
    assert!(!net.nodes[1].dev.peers(net.now).iter().any(|s| s.direct));
}

#[test]
fn garbage_from_an_unknown_address_never_becomes_the_path() {
    let mut net = relay_mesh(2);
    net.send_ip(0, &net.ping(0, 1, 1)).unwrap();
    assert!(net.run().is_empty());
    let stranger: SocketAddr = "198.18.0.99:4444".parse().unwrap();
    let (_, data) = net.captured.last().unwrap().clone();
    let mut junk = data.clone();
    junk[30] ^= 1;
    let _ = net.inject(1, stranger, &junk);
    let _ = net.inject(1, stranger, &data);
    let st = &net.nodes[1].dev.peers(net.now)[0];
    assert!(!st.direct);
    assert_eq!(st.destination, Some(Destination::Relay(1)));
}

#[test]
fn the_receiver_filters_relayed_traffic_like_direct_traffic() {
    let mut net = relay_mesh(2);
    let ip1 = net.nodes[1].ip;
    net.nodes[1].dev.set_filter(managed(ip1, vec![]));
    let p = net.ping(0, 1, 1);
    net.send_ip(0, &p).unwrap();
    let drops = net.run();
    assert_eq!(drops, vec![DropReason::Filtered(filter::Reason::NoRule)]);
    assert!(net.nodes[1].tun_rx.is_empty());
    assert!(net.relayed > 0, "it came through the relay");
}

#[test]
fn idle_peers_without_a_session_are_never_probed() {
    let mut net = relay_mesh(3);
    net.advance(Duration::from_secs(120));
    assert!(net.captured.is_empty(), "{} datagrams", net.captured.len());
}
