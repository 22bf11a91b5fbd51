//! The inbound packet filter: compiled rules, default deny, and connection
//! tracking so that replies to flows this node opened are admitted. Pure: no
//! I/O, no clock (time comes in as `now`), no allocation per packet except when
//! a new flow is recorded.
//!
//! Semantics:
//! - `Filter::new(None)` is *standalone* mode: every packet a configured peer
//!   sends is accepted (cryptokey routing is still enforced by the tunnel).
//! - `Filter::new(Some(rules))` is *managed* mode: default deny. An inbound
//!   packet is accepted when it is a reply to (or an ICMP error about) a flow
//!   this node opened *with the same peer*, or when a rule matches it.
//! - A rule matches when the source is in one of its prefixes, the protocol is
//!   in its list (an empty list means TCP, UDP, ICMP and ICMPv6), and, for TCP,
//!   UDP and SCTP, the destination port is in one of its ranges (an empty list
//!   means any port). ICMP and other portless protocols ignore the port list.
//! - Non-first fragments are accepted only if their first fragment was.
//! - Flows are keyed by the peer, so one peer cannot ride another's connection.

pub mod packet;

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use self::packet::{
    Fragment, Transport, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
};
use self::packet::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

/// An inbound rule: which sources may reach this node, with which protocols and ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Source prefixes (overlay addresses of the permitted peers).
    pub src: Vec<IpNet>,
    /// IP protocol numbers; empty means TCP, UDP, ICMP and ICMPv6.
    pub protocols: Vec<u8>,
    /// Inclusive destination port ranges; empty means any port.
    pub ports: Vec<(u16, u16)>,
    /// Identifier of the policy rule this came from, for flow logs and `explain`.
    pub rule_id: String,
}

/// Why a packet was dropped by the filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// The packet could not be parsed (fail closed).
    Unparseable,
    /// No rule admits the source and protocol.
    NoRule,
    /// A rule admits the source and protocol, but not the destination port.
    PortNotAllowed,
    /// A non-first fragment whose first fragment was not admitted.
    OrphanFragment,
}

impl Reason {
    /// All reasons, in counter order.
    pub const ALL: [Reason; 4] = [
        Reason::Unparseable,
        Reason::NoRule,
        Reason::PortNotAllowed,
        Reason::OrphanFragment,
    ];

    /// A stable snake_case name for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Unparseable => "unparseable",
            Reason::NoRule => "no_rule",
            Reason::PortNotAllowed => "port_not_allowed",
            Reason::OrphanFragment => "orphan_fragment",
        }
    }
}

/// The filter's decision for one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver the packet.
    Allow,
    /// Drop the packet, for this reason.
    Deny(Reason),
}

/// Size limits and timeouts of the connection tracker.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Maximum tracked flows; beyond it the oldest sampled entry is evicted.
    pub max_flows: usize,
    /// Maximum tracked fragment chains.
    pub max_fragments: usize,
    /// Idle timeout of a TCP flow seen in both directions.
    pub tcp_established: Duration,
    /// Idle timeout of a TCP flow that is opening or closing.
    pub tcp_transitory: Duration,
    /// Idle timeout of a UDP (or SCTP) flow.
    pub udp: Duration,
    /// Idle timeout of an ICMP echo flow.
    pub icmp: Duration,
    /// Lifetime of a fragment chain.
    pub fragment: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_flows: 65_536,
            max_fragments: 1024,
            tcp_established: Duration::from_secs(2 * 3600),
            tcp_transitory: Duration::from_secs(60),
            udp: Duration::from_secs(120),
            icmp: Duration::from_secs(30),
            fragment: Duration::from_secs(30),
        }
    }
}

/// Identifies the peer a packet came from or goes to (the tunnel's peer index).
pub type PeerId = u32;

/// The packet filter and its connection tracker.
#[derive(Debug)]
pub struct Filter {
    rules: Option<Vec<Compiled>>,
    flows: HashMap<FlowKey, Flow>,
    fragments: HashMap<FragKey, Instant>,
    limits: Limits,
    drops: [u64; Reason::ALL.len()],
    last_sweep: Option<Instant>,
    denied: HashMap<DeniedFlow, u64>,
}

/// At most this many distinct denied flows are summarized between two
/// [`Filter::take_denied`] calls; beyond it only the per-reason counters grow,
/// so a flood of spoofed ports cannot grow memory.
pub const MAX_DENIED_FLOWS: usize = 1024;

/// A denied inbound flow, summarized for flow reports (assume breach: every
/// denied flow is recorded by the controller).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeniedFlow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    /// Destination port (0 for protocols without ports).
    pub dst_port: u16,
    pub reason: Reason,
}

impl Filter {
    /// Creates a filter: `None` accepts everything (standalone), `Some(rules)` is default deny.
    pub fn new(rules: Option<Vec<Rule>>) -> Self {
        Self::with_limits(rules, Limits::default())
    }

    /// Like [`Filter::new`] with explicit limits.
    pub fn with_limits(rules: Option<Vec<Rule>>, limits: Limits) -> Self {
        Self {
            rules: rules.map(|r| r.iter().map(Compiled::new).collect()),
            flows: HashMap::new(),
            fragments: HashMap::new(),
            limits,
            drops: [0; Reason::ALL.len()],
            last_sweep: None,
            denied: HashMap::new(),
        }
    }

    /// Replaces the rules. Flows this node opened stay tracked; flows admitted
    /// by a rule are re-evaluated against the new rules on their next packet.
    pub fn set_rules(&mut self, rules: Option<Vec<Rule>>) {
        if rules.is_none() {
            self.flows.clear();
            self.fragments.clear();
        }
        self.rules = rules.map(|r| r.iter().map(Compiled::new).collect());
    }

    /// True in standalone mode (no rules: accept all).
    pub fn is_open(&self) -> bool {
        self.rules.is_none()
    }

    /// Decides whether an inbound packet from `peer` may be delivered.
    pub fn inbound(&mut self, now: Instant, peer: PeerId, buf: &[u8]) -> Verdict {
        let verdict = self.decide_inbound(now, peer, buf);
        if let Verdict::Deny(r) = verdict {
            self.drops[r as usize] += 1;
            self.note_denied(buf, r);
        }
        verdict
    }

    /// Summarizes a denied packet (the deny path only: the allowed hot path
    /// never gets here).
    fn note_denied(&mut self, buf: &[u8], reason: Reason) {
        let Ok(p) = packet::parse(buf) else { return };
        let dst_port = match p.transport {
            Transport::Ports { dst, .. } => dst,
            _ => 0,
        };
        let key = DeniedFlow {
            src: p.src,
            dst: p.dst,
            proto: p.proto,
            dst_port,
            reason,
        };
        if let Some(n) = self.denied.get_mut(&key) {
            *n += 1;
        } else if self.denied.len() < MAX_DENIED_FLOWS {
            self.denied.insert(key, 1);
        }
    }

    /// Denied flows (with packet counts) since the last call, sorted.
    pub fn take_denied(&mut self) -> Vec<(DeniedFlow, u64)> {
        let mut v: Vec<_> = self.denied.drain().collect();
        v.sort();
        v
    }

    /// Records an outbound packet to `peer`, so that its replies are admitted.
    ///
    /// Only packets that open a flow create state: a TCP SYN, any UDP/SCTP
    /// packet, an ICMP echo request. Outbound packets are never dropped here.
    pub fn outbound(&mut self, now: Instant, peer: PeerId, buf: &[u8]) {
        if self.rules.is_none() {
            return;
        }
        let Ok(p) = packet::parse(buf) else { return };
        let (key, flags) = match p.transport {
            Transport::Ports { src, dst, flags } => (
                FlowKey {
                    peer,
                    proto: p.proto,
                    local: p.src,
                    remote: p.dst,
                    local_port: src,
                    remote_port: dst,
                },
                flags,
            ),
            Transport::Echo { id, request: true } => (
                FlowKey {
                    peer,
                    proto: p.proto,
                    local: p.src,
                    remote: p.dst,
                    local_port: id,
                    remote_port: 0,
                },
                0,
            ),
            _ => return,
        };
        let limits = self.limits;
        if let Some(flow) = self.flows.get_mut(&key) {
            flow.touch(now, flags, false, &limits);
            return;
        }
        let opens = p.proto != PROTO_TCP || (flags & TCP_SYN != 0 && flags & TCP_ACK == 0);
        if opens {
            self.insert_flow(now, key, Flow::new(now, Origin::Local, p.proto, &limits));
        }
    }

    /// Drops every flow and fragment chain of `peer` (the peer was removed).
    pub fn remove_peer(&mut self, peer: PeerId) {
        self.flows.retain(|k, _| k.peer != peer);
        self.fragments.retain(|k, _| k.peer != peer);
    }

    /// Removes expired flows and fragment chains. Call about once a second.
    pub fn expire(&mut self, now: Instant) {
        self.flows.retain(|_, f| f.expires > now);
        self.fragments.retain(|_, t| *t > now);
        self.last_sweep = Some(now);
    }

    /// Number of tracked flows.
    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    /// Drop counters, one per [`Reason`].
    pub fn drops(&self) -> Vec<(Reason, u64)> {
        Reason::ALL
            .iter()
            .map(|r| (*r, self.drops[*r as usize]))
            .collect()
    }

    fn decide_inbound(&mut self, now: Instant, peer: PeerId, buf: &[u8]) -> Verdict {
        let p = match packet::parse(buf) {
            Ok(p) => p,
            Err(_) => return Verdict::Deny(Reason::Unparseable),
        };
        if self.rules.is_none() {
            return Verdict::Allow;
        }
        if let Fragment::Later { id } = p.fragment {
            let key = FragKey::new(peer, &p, id);
            return match self.fragments.get(&key) {
                Some(expires) if *expires > now => Verdict::Allow,
                _ => Verdict::Deny(Reason::OrphanFragment),
            };
        }
        let limits = self.limits;
        // Replies to flows this node opened with this same peer.
        let reply_key = match p.transport {
            Transport::Ports { src, dst, .. } => Some(FlowKey {
                peer,
                proto: p.proto,
                local: p.dst,
                remote: p.src,
                local_port: dst,
                remote_port: src,
            }),
            Transport::Echo { id, request: false } => Some(FlowKey {
                peer,
                proto: p.proto,
                local: p.dst,
                remote: p.src,
                local_port: id,
                remote_port: 0,
            }),
            Transport::IcmpError(Some(inner)) => {
                // The quote is a packet this node sent: its source is local.
                let key = FlowKey {
                    peer,
                    proto: inner.proto,
                    local: inner.src,
                    remote: inner.dst,
                    local_port: inner.src_port,
                    remote_port: inner.dst_port,
                };
                if inner.src == p.dst && self.flows.get(&key).is_some_and(|f| f.expires > now) {
                    return self.admit_fragment(now, peer, &p, Verdict::Allow);
                }
                None
            }
            _ => None,
        };
        let flags = match p.transport {
            Transport::Ports { flags, .. } => flags,
            _ => 0,
        };
        // The flow this packet belongs to: a reply to one of ours, or (for a
        // rule-admitted flow) one the remote opened. Echo flows the remote
        // opened are keyed apart (remote_port 1) so that an inbound echo
        // *request* can never match our own echo flow.
        let track_key = match p.transport {
            Transport::Ports { .. } | Transport::Echo { request: false, .. } => reply_key,
            Transport::Echo { id, request: true } => Some(FlowKey {
                peer,
                proto: p.proto,
                local: p.dst,
                remote: p.src,
                local_port: id,
                remote_port: 1,
            }),
            _ => None,
        };
        let rules = self.rules.as_deref().unwrap_or(&[]);
        if let Some(key) = &track_key {
            if let Some(flow) = self.flows.get_mut(key) {
                if flow.expires > now {
                    // Flows the remote opened are re-evaluated on every packet,
                    // so that a rule change takes effect at once.
                    let verdict = match flow.origin {
                        Origin::Local => Verdict::Allow,
                        Origin::Remote => evaluate(rules, &p),
                    };
                    if verdict == Verdict::Allow {
                        flow.touch(now, flags, true, &limits);
                    }
                    return self.admit_fragment(now, peer, &p, verdict);
                }
            }
        }
        let verdict = evaluate(rules, &p);
        let opens = matches!(
            p.transport,
            Transport::Ports { .. } | Transport::Echo { request: true, .. }
        );
        if let (Verdict::Allow, true, Some(key)) = (verdict, opens, track_key) {
            // Remember that the remote opened this flow, so that our replies do
            // not later count as flows this node opened.
            let flow = Flow::new(now, Origin::Remote, p.proto, &limits);
            self.insert_flow(now, key, flow);
        }
        self.admit_fragment(now, peer, &p, verdict)
    }

    fn admit_fragment(
        &mut self,
        now: Instant,
        peer: PeerId,
        p: &packet::Packet,
        verdict: Verdict,
    ) -> Verdict {
        if let (Verdict::Allow, Fragment::First { id }) = (verdict, p.fragment) {
            if self.fragments.len() >= self.limits.max_fragments {
                self.fragments.retain(|_, t| *t > now);
            }
            if self.fragments.len() < self.limits.max_fragments {
                self.fragments
                    .insert(FragKey::new(peer, p, id), now + self.limits.fragment);
            }
        }
        verdict
    }

    fn insert_flow(&mut self, now: Instant, key: FlowKey, flow: Flow) {
        if self.flows.len() >= self.limits.max_flows {
            // Sweep at most once a second; under a flood, evict instead.
            if self
                .last_sweep
                .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
            {
                self.expire(now);
            }
            if self.flows.len() >= self.limits.max_flows {
                self.evict_one();
            }
        }
        self.flows.insert(key, flow);
    }

    /// Evicts the entry that expires first among a small sample, preferring
    /// flows that are closing or were never answered.
    fn evict_one(&mut self) {
        let victim = self
            .flows
            .iter()
            .take(16)
            .min_by_key(|(_, f)| (f.established, f.expires))
            .map(|(k, _)| *k);
        if let Some(k) = victim {
            self.flows.remove(&k);
        }
    }
}

/// First-match evaluation of compiled rules (default deny).
fn evaluate(rules: &[Compiled], p: &packet::Packet) -> Verdict {
    let port = match p.transport {
        Transport::Ports { dst, .. } if has_ports(p.proto) => Some(dst),
        _ => None,
    };
    let mut best = Reason::NoRule;
    for rule in rules {
        if !rule.protocol(p.proto) || !rule.source(p.src) {
            continue;
        }
        match port {
            Some(port) if !rule.port(port) => best = Reason::PortNotAllowed,
            _ => return Verdict::Allow,
        }
    }
    Verdict::Deny(best)
}

fn has_ports(proto: u8) -> bool {
    matches!(proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowKey {
    peer: PeerId,
    proto: u8,
    local: IpAddr,
    remote: IpAddr,
    local_port: u16,
    remote_port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FragKey {
    peer: PeerId,
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    id: u32,
}

impl FragKey {
    fn new(peer: PeerId, p: &packet::Packet, id: u32) -> Self {
        Self {
            peer,
            src: p.src,
            dst: p.dst,
            proto: p.proto,
            id,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// This node sent the first packet.
    Local,
    /// The peer sent the first packet and a rule admitted it.
    Remote,
}

#[derive(Debug, Clone, Copy)]
struct Flow {
    origin: Origin,
    proto: u8,
    /// Seen in both directions.
    established: bool,
    /// TCP FIN or RST seen.
    closing: bool,
    expires: Instant,
}

impl Flow {
    fn new(now: Instant, origin: Origin, proto: u8, limits: &Limits) -> Self {
        let mut f = Self {
            origin,
            proto,
            established: false,
            closing: false,
            expires: now,
        };
        f.expires = now + f.timeout(limits);
        f
    }

    /// Refreshes the flow on a packet; `reply` is true for a packet travelling
    /// opposite to the flow's first packet.
    fn touch(&mut self, now: Instant, flags: u8, inbound: bool, limits: &Limits) {
        let reply = inbound == (self.origin == Origin::Local);
        if reply {
            self.established = true;
        }
        if self.proto == PROTO_TCP && flags & (TCP_FIN | TCP_RST) != 0 {
            self.closing = true;
        }
        self.expires = now + self.timeout(limits);
    }

    fn timeout(&self, limits: &Limits) -> Duration {
        match self.proto {
            PROTO_TCP if self.established && !self.closing => limits.tcp_established,
            PROTO_TCP => limits.tcp_transitory,
            PROTO_ICMP | PROTO_ICMPV6 => limits.icmp,
            _ => limits.udp,
        }
    }
}

/// A rule compiled for cheap evaluation: prefix masks, a protocol bitmap and
/// sorted, merged port ranges.
#[derive(Debug, Clone)]
struct Compiled {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
    protocols: [u64; 4],
    ports: Vec<(u16, u16)>,
}

impl Compiled {
    fn new(rule: &Rule) -> Self {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for net in &rule.src {
            match net.trunc() {
                IpNet::V4(n) => {
                    let mask = u32::from(n.netmask());
                    v4.push((u32::from(n.network()) & mask, mask));
                }
                IpNet::V6(n) => {
                    let mask = u128::from(n.netmask());
                    v6.push((u128::from(n.network()) & mask, mask));
                }
            }
        }
        let mut protocols = [0u64; 4];
        let list: &[u8] = if rule.protocols.is_empty() {
            &[PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6]
        } else {
            &rule.protocols
        };
        for p in list {
            protocols[usize::from(*p / 64)] |= 1 << (p % 64);
        }
        let mut ports: Vec<(u16, u16)> = rule
            .ports
            .iter()
            .map(|&(a, b)| (a.min(b), a.max(b)))
            .collect();
        ports.sort_unstable();
        let mut merged: Vec<(u16, u16)> = Vec::with_capacity(ports.len());
        for (lo, hi) in ports {
            match merged.last_mut() {
                Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        if rule.ports.is_empty() {
            merged.push((0, u16::MAX));
        }
        Self {
            v4,
            v6,
            protocols,
            ports: merged,
        }
    }

    fn protocol(&self, proto: u8) -> bool {
        self.protocols[usize::from(proto / 64)] & (1 << (proto % 64)) != 0
    }

    fn source(&self, src: IpAddr) -> bool {
        match src {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4.iter().any(|&(net, mask)| a & mask == net)
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6.iter().any(|&(net, mask)| a & mask == net)
            }
        }
    }

    fn port(&self, port: u16) -> bool {
        // Ranges are sorted and disjoint: find the last range starting at or below `port`.
        let i = self.ports.partition_point(|&(lo, _)| lo <= port);
        i > 0 && self.ports[i - 1].1 >= port
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use proptest::prelude::*;

    use super::packet::build::*;
    use super::*;

    const ME: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
    const PEER: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
    const OTHER: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 3);

    fn rule(src: &str, protocols: &[u8], ports: &[(u16, u16)]) -> Rule {
        Rule {
            src: src.split(',').map(|s| s.parse().unwrap()).collect(),
            protocols: protocols.to_vec(),
            ports: ports.to_vec(),
            rule_id: "r".into(),
        }
    }

    fn t0() -> Instant {
        Instant::now()
    }

    #[test]
    fn rule_table() {
        let mut f = Filter::new(Some(vec![
            rule("100.64.0.2/32", &[PROTO_TCP], &[(22, 22), (8000, 8999)]),
            rule("100.64.0.0/24", &[PROTO_UDP], &[]),
            rule("fd00::/64", &[], &[(443, 443)]),
        ]));
        let now = t0();
        let cases: Vec<(Vec<u8>, Verdict)> = vec![
            (
                v4(PEER, ME, PROTO_TCP, &tcp(1000, 22, TCP_SYN)),
                Verdict::Allow,
            ),
            (
                v4(PEER, ME, PROTO_TCP, &tcp(1000, 8500, TCP_SYN)),
                Verdict::Allow,
            ),
            (
                v4(PEER, ME, PROTO_TCP, &tcp(1000, 23, TCP_SYN)),
                Verdict::Deny(Reason::PortNotAllowed),
            ),
            (
                v4(OTHER, ME, PROTO_TCP, &tcp(1000, 22, TCP_SYN)),
                Verdict::Deny(Reason::NoRule),
            ),
            (v4(OTHER, ME, PROTO_UDP, &udp(1, 9999, b"")), Verdict::Allow),
            (
                v4(OTHER, ME, PROTO_ICMP, &icmp(8, 1)),
                Verdict::Deny(Reason::NoRule),
            ),
            (
                v6(
                    "fd00::2".parse().unwrap(),
                    "fd00::1".parse().unwrap(),
                    PROTO_ICMPV6,
                    &icmp(128, 1),
                ),
                Verdict::Allow,
            ),
            (
                v6(
                    "fd00::2".parse().unwrap(),
                    "fd00::1".parse().unwrap(),
                    PROTO_TCP,
                    &tcp(1, 80, TCP_SYN),
                ),
                Verdict::Deny(Reason::PortNotAllowed),
            ),
            (vec![0x45, 0, 0], Verdict::Deny(Reason::Unparseable)),
        ];
        for (i, (pkt, want)) in cases.iter().enumerate() {
            assert_eq!(f.inbound(now, 1, pkt), *want, "case {i}");
        }
        let drops: u64 = f.drops().iter().map(|(_, n)| n).sum();
        assert_eq!(drops, 5);
    }

    #[test]
    fn denied_flows_are_summarized_bounded_and_taken_once() {
        let mut f = Filter::new(Some(vec![rule("100.64.0.2/32", &[PROTO_TCP], &[(22, 22)])]));
        let now = t0();
        let allowed = v4(PEER, ME, PROTO_TCP, &tcp(4000, 22, TCP_SYN));
        let denied = v4(PEER, ME, PROTO_TCP, &tcp(4000, 5432, TCP_SYN));
        assert_eq!(f.inbound(now, 1, &allowed), Verdict::Allow);
        for _ in 0..3 {
            assert_eq!(
                f.inbound(now, 1, &denied),
                Verdict::Deny(Reason::PortNotAllowed)
            );
        }
        assert_eq!(
            f.inbound(now, 1, &[0x45]),
            Verdict::Deny(Reason::Unparseable)
        );
        let taken = f.take_denied();
        assert_eq!(
            taken,
            vec![(
                DeniedFlow {
                    src: IpAddr::V4(PEER),
                    dst: IpAddr::V4(ME),
                    proto: PROTO_TCP,
                    dst_port: 5432,
                    reason: Reason::PortNotAllowed,
                },
                3
            )],
            "allowed and unparseable packets are not summarized"
        );
        assert!(f.take_denied().is_empty(), "taken once");
        // A port scan cannot grow the summary without bound.
        for port in 0..(MAX_DENIED_FLOWS as u16 + 500) {
            f.inbound(now, 1, &v4(PEER, ME, PROTO_TCP, &tcp(4000, port, TCP_SYN)));
        }
        assert_eq!(f.take_denied().len(), MAX_DENIED_FLOWS);
    }

    #[test]
    fn standalone_accepts_everything_parseable() {
        let mut f = Filter::new(None);
        assert_eq!(
            f.inbound(t0(), 1, &v4(OTHER, ME, PROTO_TCP, &tcp(1, 2, 0))),
            Verdict::Allow
        );
        assert_eq!(
            f.inbound(t0(), 1, &[0x60]),
            Verdict::Deny(Reason::Unparseable)
        );
    }

    #[test]
    fn empty_rules_deny_all_but_admit_replies_to_our_flows() {
        let mut f = Filter::new(Some(vec![]));
        let now = t0();
        let syn = v4(ME, PEER, PROTO_TCP, &tcp(40000, 80, TCP_SYN));
        let synack = v4(PEER, ME, PROTO_TCP, &tcp(80, 40000, TCP_SYN | TCP_ACK));
        assert_eq!(f.inbound(now, 1, &synack), Verdict::Deny(Reason::NoRule));
        f.outbound(now, 1, &syn);
        assert_eq!(f.inbound(now, 1, &synack), Verdict::Allow);
        // Another peer cannot ride the same 4-tuple.
        assert_eq!(f.inbound(now, 2, &synack), Verdict::Deny(Reason::NoRule));
        // UDP and ICMP echo.
        f.outbound(now, 1, &v4(ME, PEER, PROTO_UDP, &udp(5000, 53, b"q")));
        assert_eq!(
            f.inbound(now, 1, &v4(PEER, ME, PROTO_UDP, &udp(53, 5000, b"a"))),
            Verdict::Allow
        );
        f.outbound(now, 1, &v4(ME, PEER, PROTO_ICMP, &icmp(8, 9)));
        assert_eq!(
            f.inbound(now, 1, &v4(PEER, ME, PROTO_ICMP, &icmp(0, 9))),
            Verdict::Allow
        );
        assert_eq!(
            f.inbound(now, 1, &v4(PEER, ME, PROTO_ICMP, &icmp(0, 10))),
            Verdict::Deny(Reason::NoRule)
        );
    }

    #[test]
    fn our_echo_flow_does_not_admit_inbound_echo_requests() {
        let mut f = Filter::new(Some(vec![]));
        let now = t0();
        f.outbound(now, 1, &v4(ME, PEER, PROTO_ICMP, &icmp(8, 9)));
        assert_eq!(
            f.inbound(now, 1, &v4(PEER, ME, PROTO_ICMP, &icmp(8, 9))),
            Verdict::Deny(Reason::NoRule)
        );
    }

    #[test]
    fn rule_admitted_flows_are_tracked_once_and_reevaluated() {
        let mut f = Filter::new(Some(vec![rule("100.64.0.2/32", &[PROTO_TCP], &[(22, 22)])]));
        let now = t0();
        let syn = v4(PEER, ME, PROTO_TCP, &tcp(4000, 22, TCP_SYN));
        let ack = v4(PEER, ME, PROTO_TCP, &tcp(4000, 22, TCP_ACK));
        assert_eq!(f.inbound(now, 1, &syn), Verdict::Allow);
        assert_eq!(f.inbound(now, 1, &ack), Verdict::Allow);
        assert_eq!(f.flow_count(), 1);
        f.set_rules(Some(vec![rule("100.64.0.2/32", &[PROTO_TCP], &[(80, 80)])]));
        assert_eq!(
            f.inbound(now, 1, &ack),
            Verdict::Deny(Reason::PortNotAllowed)
        );
    }

    #[test]
    fn tcp_non_syn_outbound_does_not_open_a_flow() {
        let mut f = Filter::new(Some(vec![]));
        let now = t0();
        f.outbound(now, 1, &v4(ME, PEER, PROTO_TCP, &tcp(22, 5000, TCP_ACK)));
        assert_eq!(
            f.inbound(now, 1, &v4(PEER, ME, PROTO_TCP, &tcp(5000, 22, TCP_ACK))),
            Verdict::Deny(Reason::NoRule)
        );
    }

    #[test]
    fn replies_to_inbound_flows_do_not_survive_rule_revocation() {
        let mut f = Filter::new(Some(vec![rule("100.64.0.2/32", &[PROTO_UDP], &[(53, 53)])]));
        let now = t0();
        let q = v4(PEER, ME, PROTO_UDP, &udp(5000, 53, b"q"));
        assert_eq!(f.inbound(now, 1, &q), Verdict::Allow);
        // Our reply must not turn the flow into one "we opened".
        f.outbound(now, 1, &v4(ME, PEER, PROTO_UDP, &udp(53, 5000, b"a")));
        f.set_rules(Some(vec![]));
        assert_eq!(f.inbound(now, 1, &q), Verdict::Deny(Reason::NoRule));
    }

    #[test]
    fn flows_expire_and_are_dropped_with_their_peer() {
        let mut f = Filter::new(Some(vec![]));
        let now = t0();
        f.outbound(now, 1, &v4(ME, PEER, PROTO_UDP, &udp(5000, 53, b"q")));
        f.outbound(now, 2, &v4(ME, OTHER, PROTO_UDP, &udp(5000, 53, b"q")));
        assert_eq!(f.flow_count(), 2);
        f.remove_peer(1);
        assert_eq!(f.flow_count(), 1);
        let later = now + Duration::from_secs(121);
        assert_eq!(
            f.inbound(later, 2, &v4(OTHER, ME, PROTO_UDP, &udp(53, 5000, b"a"))),
            Verdict::Deny(Reason::NoRule)
        );
        f.expire(later);
        assert_eq!(f.flow_count(), 0);
    }

    #[test]
    fn conntrack_is_bounded() {
        let limits = Limits {
            max_flows: 64,
            ..Limits::default()
        };
        let mut f = Filter::with_limits(Some(vec![]), limits);
        let now = t0();
        for port in 0..1000u16 {
            f.outbound(now, 1, &v4(ME, PEER, PROTO_UDP, &udp(port, 53, b"")));
        }
        assert!(f.flow_count() <= 64);
        // The newest flow is tracked.
        assert_eq!(
            f.inbound(now, 1, &v4(PEER, ME, PROTO_UDP, &udp(53, 999, b""))),
            Verdict::Allow
        );
    }

    #[test]
    fn fragments_follow_their_first_fragment() {
        let mut f = Filter::new(Some(vec![rule("100.64.0.2/32", &[PROTO_UDP], &[(53, 53)])]));
        let now = t0();
        let mut first = v4(PEER, ME, PROTO_UDP, &udp(5000, 53, b"abcdefgh"));
        first[4..6].copy_from_slice(&42u16.to_be_bytes());
        first[6..8].copy_from_slice(&0x2000u16.to_be_bytes());
        let mut later = v4(PEER, ME, PROTO_UDP, b"tail");
        later[4..6].copy_from_slice(&42u16.to_be_bytes());
        later[6..8].copy_from_slice(&2u16.to_be_bytes());
        let mut orphan = later.clone();
        orphan[4..6].copy_from_slice(&43u16.to_be_bytes());
        assert_eq!(
            f.inbound(now, 1, &later),
            Verdict::Deny(Reason::OrphanFragment)
        );
        assert_eq!(f.inbound(now, 1, &first), Verdict::Allow);
        assert_eq!(f.inbound(now, 1, &later), Verdict::Allow);
        assert_eq!(
            f.inbound(now, 1, &orphan),
            Verdict::Deny(Reason::OrphanFragment)
        );
        assert_eq!(
            f.inbound(now, 2, &later),
            Verdict::Deny(Reason::OrphanFragment)
        );
    }

    #[test]
    fn icmp_errors_about_our_flows_are_admitted() {
        let mut f = Filter::new(Some(vec![]));
        let now = t0();
        let sent = v4(ME, PEER, PROTO_UDP, &udp(5000, 53, b"q"));
        f.outbound(now, 1, &sent);
        let mut err = icmp(3, 0);
        err.extend_from_slice(&sent[..28]);
        assert_eq!(
            f.inbound(now, 1, &v4(PEER, ME, PROTO_ICMP, &err)),
            Verdict::Allow
        );
        let other = v4(ME, PEER, PROTO_UDP, &udp(5001, 53, b"q"));
        let mut err = icmp(3, 0);
        err.extend_from_slice(&other[..28]);
        assert_eq!(
            f.inbound(now, 1, &v4(PEER, ME, PROTO_ICMP, &err)),
            Verdict::Deny(Reason::NoRule)
        );
    }

    /// The obvious reading of the rule semantics, with no compilation.
    fn naive(rules: &[Rule], src: IpAddr, proto: u8, port: Option<u16>) -> bool {
        rules.iter().any(|r| {
            let proto_ok = if r.protocols.is_empty() {
                [PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6].contains(&proto)
            } else {
                r.protocols.contains(&proto)
            };
            let src_ok = r.src.iter().any(|n| n.contains(&src));
            let port_ok = match port {
                Some(p) if has_ports(proto) => {
                    r.ports.is_empty()
                        || r.ports.iter().any(|&(a, b)| a.min(b) <= p && p <= a.max(b))
                }
                _ => true,
            };
            proto_ok && src_ok && port_ok
        })
    }

    fn arb_rule() -> impl Strategy<Value = Rule> {
        (
            prop::collection::vec((0u8..4, 0u8..=32), 1..4),
            prop::collection::vec(prop::sample::select(vec![1u8, 6, 17, 58, 132]), 0..3),
            prop::collection::vec((0u16..64, 0u16..64), 0..4),
        )
            .prop_map(|(srcs, protocols, ports)| Rule {
                src: srcs
                    .into_iter()
                    .map(|(b, len)| {
                        IpNet::new(IpAddr::V4(Ipv4Addr::new(100, 64, b, 1)), len)
                            .unwrap()
                            .trunc()
                    })
                    .collect(),
                protocols,
                ports,
                rule_id: String::new(),
            })
    }

    proptest! {
        #[test]
        fn compiled_rules_agree_with_naive_matcher(
            rules in prop::collection::vec(arb_rule(), 0..5),
            b in 0u8..4, host in 0u8..4,
            proto in prop::sample::select(vec![1u8, 6, 17, 58, 132, 47]),
            port in 0u16..64,
        ) {
            let src = Ipv4Addr::new(100, 64, b, host);
            let l4 = match proto {
                PROTO_TCP => tcp(999, port, TCP_SYN),
                PROTO_UDP | PROTO_SCTP => udp(999, port, b""),
                PROTO_ICMP | PROTO_ICMPV6 => icmp(8, 1),
                _ => vec![0; 8],
            };
            let pkt = v4(src, ME, proto, &l4);
            let mut f = Filter::new(Some(rules.clone()));
            let got = f.inbound(Instant::now(), 1, &pkt) == Verdict::Allow;
            let want = naive(&rules, IpAddr::V4(src), proto, Some(port));
            prop_assert_eq!(got, want);
        }
    }
}
