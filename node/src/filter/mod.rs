//! The inbound packet filter: compiled rules, default deny, and connection
//! tracking so that replies to flows this node opened are admitted. Pure: no
//! I/O, no clock (time comes in as `now`), no allocation per packet except when
//! a new flow is recorded.
//!
//! Semantics:
//! - `Filter::new(None)` is *standalone* mode: every packet a configured peer
//!   sends is accepted (cryptokey routing is still enforced by the tunnel).
//! - `Filter::new(Some(ruleset))` is *managed* mode: default deny. A packet
//!   whose destination is not one of this node's own addresses
//!   ([`Ruleset::local`]) is dropped first, whatever else matches: a peer must
//!   not reach the node's other interfaces, or anything it forwards to, by
//!   routing them into its own tunnel. Otherwise an inbound packet is
//!   accepted when it is a reply to (or an ICMP error about) a flow this node
//!   opened *with the same peer*, or when a rule matches it.
//! - A rule matches when the source is in one of its prefixes, the
//!   destination in one of its destination prefixes (an empty list means any
//!   local address), the protocol is in its list (an empty list means TCP,
//!   UDP, ICMP and ICMPv6), and, for TCP, UDP and SCTP, the destination port
//!   is in one of its ranges (an empty list means any port). ICMP and other
//!   portless protocols ignore the port list.
//! - Non-first fragments are accepted only if their first fragment was.
//! - Flows are keyed by the peer, so one peer cannot ride another's connection.

pub mod packet;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use self::packet::{
    Fragment, Transport, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
};
use self::packet::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

/// An inbound rule: which sources may reach which of this node's addresses,
/// with which protocols and ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Source prefixes (overlay addresses of the permitted peers).
    pub src: Vec<IpNet>,
    /// Destination prefixes; empty means any of [`Ruleset::local`].
    pub dst: Vec<IpNet>,
    /// IP protocol numbers; empty means TCP, UDP, ICMP and ICMPv6.
    pub protocols: Vec<u8>,
    /// Inclusive destination port ranges; empty means any port.
    pub ports: Vec<(u16, u16)>,
    /// Identifier of the policy rule this came from, for flow logs and `explain`.
    pub rule_id: String,
}

/// What a managed filter enforces: the node's own addresses, and the rules
/// admitting traffic to them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    /// The addresses this node owns (its overlay addresses; later, routes it
    /// serves). Nothing else is ever delivered from the tunnel.
    pub local: Vec<IpNet>,
    /// Inbound rules, first match wins.
    pub rules: Vec<Rule>,
}

/// Why a packet was dropped by the filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// The packet could not be parsed (fail closed).
    Unparseable,
    /// The destination is not one of this node's own addresses: a peer
    /// tried to reach another interface of this node, or a network behind it.
    ForeignDestination,
    /// No rule admits the source and protocol.
    NoRule,
    /// A rule admits the source and protocol, but not the destination port.
    PortNotAllowed,
    /// A non-first fragment whose first fragment was not admitted.
    OrphanFragment,
    /// A non-first fragment that overlaps its first fragment: it would
    /// rewrite the headers the filter checked (RFC 1858, RFC 5722).
    OverlappingFragment,
}

impl Reason {
    /// All reasons, in counter order.
    pub const ALL: [Reason; 6] = [
        Reason::Unparseable,
        Reason::ForeignDestination,
        Reason::NoRule,
        Reason::PortNotAllowed,
        Reason::OrphanFragment,
        Reason::OverlappingFragment,
    ];

    /// A stable snake_case name for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Unparseable => "unparseable",
            Reason::ForeignDestination => "foreign_destination",
            Reason::NoRule => "no_rule",
            Reason::PortNotAllowed => "port_not_allowed",
            Reason::OrphanFragment => "orphan_fragment",
            Reason::OverlappingFragment => "overlapping_fragment",
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
    /// Maximum tracked flows of one peer; beyond it one of that peer's own
    /// flows is evicted, so one peer cannot push out everyone else's.
    pub max_flows_per_peer: usize,
    /// Maximum tracked fragment chains.
    pub max_fragments: usize,
    /// Maximum tracked fragment chains of one peer; beyond it that peer's
    /// new chains are not tracked (their later fragments are dropped).
    pub max_fragments_per_peer: usize,
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
            max_flows_per_peer: 16_384,
            max_fragments: 1024,
            max_fragments_per_peer: 64,
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
    /// The ruleset `rules` was compiled from: installing the same one again
    /// (a netmap that changed only peers) is a no-op.
    source: Option<Ruleset>,
    /// This node's own addresses (managed mode).
    local: Prefixes,
    flows: HashMap<FlowKey, Flow>,
    fragments: HashMap<FragKey, FragChain>,
    /// Per peer: how many entries of `flows` and `fragments` it holds.
    usage: HashMap<PeerId, Usage>,
    limits: Limits,
    drops: [u64; Reason::ALL.len()],
    /// Inbound packets allowed (a plain add on the allow path: metrics).
    accepted: u64,
    last_sweep: Option<Instant>,
    denied: HashMap<DeniedFlow, u64>,
    /// Allowed-flow summaries folded from tracked flows, until taken.
    allowed: AllowedLog,
}

/// At most this many distinct denied flows are summarized between two
/// [`Filter::take_denied`] calls; beyond it only the per-reason counters grow,
/// so a flood of spoofed ports cannot grow memory.
pub const MAX_DENIED_FLOWS: usize = 1024;

/// At most this many distinct allowed flows are summarized between two
/// [`Filter::take_allowed`] calls; beyond it a flow's traffic is only counted
/// in [`Filter::allowed_overflow`].
pub const MAX_ALLOWED_FLOWS: usize = 1024;

/// An allowed inbound flow (opened by a peer and admitted by a rule),
/// summarized over the source ports for flow logs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllowedKey {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    /// Destination port (0 for protocols without ports).
    pub dst_port: u16,
    /// The rule that admitted the flow's latest packet ([`Rule::rule_id`]).
    pub rule_id: Arc<str>,
}

/// What flowed in an allowed flow: packets and bytes (IP packet lengths)
/// from the peer, and replies from this node, since the last take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// When the flow was first seen (it may predate the last take).
    pub first_seen: Instant,
    /// Its latest packet, either way.
    pub last_seen: Instant,
}

impl Traffic {
    fn new(now: Instant) -> Self {
        Self {
            packets: 0,
            bytes: 0,
            reply_packets: 0,
            reply_bytes: 0,
            first_seen: now,
            last_seen: now,
        }
    }

    fn is_idle(&self) -> bool {
        self.packets == 0 && self.reply_packets == 0
    }

    fn add(&mut self, other: &Traffic) {
        self.packets = self.packets.saturating_add(other.packets);
        self.bytes = self.bytes.saturating_add(other.bytes);
        self.reply_packets = self.reply_packets.saturating_add(other.reply_packets);
        self.reply_bytes = self.reply_bytes.saturating_add(other.reply_bytes);
        self.first_seen = self.first_seen.min(other.first_seen);
        self.last_seen = self.last_seen.max(other.last_seen);
    }

    /// Starts a new reporting window: the counts go, the times stay.
    fn reset(&mut self) {
        self.packets = 0;
        self.bytes = 0;
        self.reply_packets = 0;
        self.reply_bytes = 0;
    }
}

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
    /// Creates a filter: `None` accepts everything (standalone), `Some(ruleset)` is default deny.
    pub fn new(rules: Option<Ruleset>) -> Self {
        Self::with_limits(rules, Limits::default())
    }

    /// Like [`Filter::new`] with explicit limits.
    pub fn with_limits(rules: Option<Ruleset>, limits: Limits) -> Self {
        let local = Prefixes::new(rules.iter().flat_map(|r| &r.local));
        Self {
            rules: rules
                .as_ref()
                .map(|r| r.rules.iter().map(Compiled::new).collect()),
            source: rules,
            local,
            flows: HashMap::new(),
            fragments: HashMap::new(),
            usage: HashMap::new(),
            limits,
            drops: [0; Reason::ALL.len()],
            accepted: 0,
            last_sweep: None,
            denied: HashMap::new(),
            allowed: AllowedLog::default(),
        }
    }

    /// Replaces the rules. Flows this node opened stay tracked; flows admitted
    /// by a rule are re-evaluated against the new rules on their next packet
    /// (and at once for the flow log: a flow no rule admits any more logs
    /// none of its later replies as allowed).
    pub fn set_rules(&mut self, rules: Option<Ruleset>) {
        if rules == self.source {
            return;
        }
        // Traffic so far is summarized under the rules that admitted it.
        self.fold_all();
        if rules.is_none() {
            self.flows.clear();
            self.fragments.clear();
            self.usage.clear();
        }
        self.local = Prefixes::new(rules.iter().flat_map(|r| &r.local));
        self.rules = rules
            .as_ref()
            .map(|r| r.rules.iter().map(Compiled::new).collect());
        self.source = rules;
        let compiled = self.rules.as_deref().unwrap_or(&[]);
        for (key, flow) in &mut self.flows {
            if flow.origin == Origin::Remote {
                let port = has_ports(key.proto).then_some(key.local_port);
                flow.rule = evaluate_parts(compiled, key.proto, key.remote, key.local, port)
                    .unwrap_or(REVOKED);
            }
        }
    }

    /// True in standalone mode (no rules: accept all).
    pub fn is_open(&self) -> bool {
        self.rules.is_none()
    }

    /// Decides whether an inbound packet from `peer` may be delivered.
    pub fn inbound(&mut self, now: Instant, peer: PeerId, buf: &[u8]) -> Verdict {
        let verdict = self.decide_inbound(now, peer, buf);
        match verdict {
            Verdict::Allow => self.accepted = self.accepted.wrapping_add(1),
            Verdict::Deny(r) => {
                self.drops[r as usize] += 1;
                self.note_denied(buf, r);
            }
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

    /// Allowed inbound flows that carried traffic since the last call
    /// (those still tracked and those that ended meanwhile), summarized over
    /// source ports, sorted. Costs one pass over the tracked flows.
    pub fn take_allowed(&mut self) -> Vec<(AllowedKey, Traffic)> {
        self.fold_all();
        self.allowed.per_source.clear();
        let mut v: Vec<_> = self.allowed.flows.drain().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Allowed flows whose traffic went unsummarized because
    /// [`MAX_ALLOWED_FLOWS`] were pending (a total since start).
    pub fn allowed_overflow(&self) -> u64 {
        self.allowed.overflow
    }

    /// Folds the traffic of every tracked flow into the summaries.
    fn fold_all(&mut self) {
        let rules = self.rules.as_deref().unwrap_or(&[]);
        for (key, flow) in &mut self.flows {
            fold(&mut self.allowed, rules, key, flow);
        }
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
        if let Transport::Echo { id, request: false } = p.transport {
            // A reply to a peer's echo request (a flow it opened): for the log.
            let key = FlowKey {
                peer,
                proto: p.proto,
                local: p.src,
                remote: p.dst,
                local_port: id,
                remote_port: 1,
            };
            if let Some(flow) = self.flows.get_mut(&key) {
                flow.reply(now, buf.len());
            }
            return;
        }
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
            flow.reply(now, buf.len());
            return;
        }
        let opens = p.proto != PROTO_TCP || (flags & TCP_SYN != 0 && flags & TCP_ACK == 0);
        if opens {
            self.insert_flow(now, key, Flow::new(now, Origin::Local, p.proto, &limits));
        }
    }

    /// Drops every flow and fragment chain of `peer` (the peer was removed).
    pub fn remove_peer(&mut self, peer: PeerId) {
        let rules = self.rules.as_deref().unwrap_or(&[]);
        let allowed = &mut self.allowed;
        self.flows.retain(|k, f| {
            let keep = k.peer != peer;
            if !keep {
                fold(allowed, rules, k, f);
            }
            keep
        });
        self.fragments.retain(|k, _| k.peer != peer);
        self.usage.remove(&peer);
    }

    /// Removes expired flows and fragment chains. Call about once a second.
    pub fn expire(&mut self, now: Instant) {
        let usage = &mut self.usage;
        let rules = self.rules.as_deref().unwrap_or(&[]);
        let allowed = &mut self.allowed;
        self.flows.retain(|k, f| {
            let keep = f.expires > now;
            if !keep {
                fold(allowed, rules, k, f);
                Usage::release(usage, k.peer, |u| &mut u.flows);
            }
            keep
        });
        self.fragments.retain(|k, c| {
            let keep = c.expires > now;
            if !keep {
                Usage::release(usage, k.peer, |u| &mut u.fragments);
            }
            keep
        });
        self.last_sweep = Some(now);
    }

    /// Number of tracked flows.
    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    /// Inbound packets allowed so far.
    pub fn allowed(&self) -> u64 {
        self.accepted
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
        if !self.local.contains(p.dst) {
            return Verdict::Deny(Reason::ForeignDestination);
        }
        if let Fragment::Later { id, offset } = p.fragment {
            let key = FragKey::new(peer, &p, id);
            return match self.fragments.get(&key) {
                Some(c) if c.expires > now && offset < c.first_len => {
                    Verdict::Deny(Reason::OverlappingFragment)
                }
                Some(c) if c.expires > now => Verdict::Allow,
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
                        Origin::Local => Ok(None),
                        Origin::Remote => evaluate(rules, &p).map(Some),
                    };
                    let verdict = match verdict {
                        Ok(rule) => {
                            flow.touch(now, flags, true, &limits);
                            if let (Some(rule), Some(t)) = (rule, &mut flow.traffic) {
                                flow.rule = rule;
                                t.packets += 1;
                                t.bytes += buf.len() as u64;
                                t.last_seen = now;
                            }
                            Verdict::Allow
                        }
                        // No rule admits it now: its replies are not logged
                        // as allowed either, until a rule admits it again.
                        Err(reason) if flow.origin == Origin::Remote => {
                            if flow.rule != REVOKED {
                                fold(&mut self.allowed, rules, key, flow);
                                flow.rule = REVOKED;
                            }
                            Verdict::Deny(reason)
                        }
                        Err(reason) => Verdict::Deny(reason),
                    };
                    return self.admit_fragment(now, peer, &p, verdict);
                }
            }
        }
        let verdict = evaluate(rules, &p);
        let opens = matches!(
            p.transport,
            Transport::Ports { .. } | Transport::Echo { request: true, .. }
        );
        if let (Ok(rule), true, Some(key)) = (verdict, opens, track_key) {
            // Remember that the remote opened this flow, so that our replies do
            // not later count as flows this node opened.
            let mut flow = Flow::new(now, Origin::Remote, p.proto, &limits);
            flow.rule = rule;
            let mut t = Traffic::new(now);
            t.packets = 1;
            t.bytes = buf.len() as u64;
            flow.traffic = Some(Box::new(t));
            self.insert_flow(now, key, flow);
        }
        let verdict = match verdict {
            Ok(_) => Verdict::Allow,
            Err(reason) => Verdict::Deny(reason),
        };
        self.admit_fragment(now, peer, &p, verdict)
    }

    fn admit_fragment(
        &mut self,
        now: Instant,
        peer: PeerId,
        p: &packet::Packet,
        verdict: Verdict,
    ) -> Verdict {
        if let (Verdict::Allow, Fragment::First { id, len }) = (verdict, p.fragment) {
            let key = FragKey::new(peer, p, id);
            let chain = FragChain {
                expires: now + self.limits.fragment,
                first_len: len,
            };
            if let Some(c) = self.fragments.get_mut(&key) {
                *c = chain;
                return verdict;
            }
            let full = |f: &Self| {
                f.fragments.len() >= f.limits.max_fragments
                    || f.usage.get(&peer).map_or(0, |u| u.fragments)
                        >= f.limits.max_fragments_per_peer
            };
            if full(self) {
                let usage = &mut self.usage;
                self.fragments.retain(|k, c| {
                    let keep = c.expires > now;
                    if !keep {
                        Usage::release(usage, k.peer, |u| &mut u.fragments);
                    }
                    keep
                });
            }
            if !full(self) {
                self.fragments.insert(key, chain);
                self.usage.entry(peer).or_default().fragments += 1;
            }
        }
        verdict
    }

    fn insert_flow(&mut self, now: Instant, key: FlowKey, flow: Flow) {
        if self.usage.get(&key.peer).map_or(0, |u| u.flows) >= self.limits.max_flows_per_peer {
            // The peer is at its share: it pays with one of its own flows.
            self.evict_one(Some(key.peer));
        }
        if self.flows.len() >= self.limits.max_flows {
            // Sweep at most once a second; under a flood, evict instead.
            if self
                .last_sweep
                .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
            {
                self.expire(now);
            }
            if self.flows.len() >= self.limits.max_flows {
                self.evict_one(None);
            }
        }
        match self.flows.insert(key, flow) {
            None => self.usage.entry(key.peer).or_default().flows += 1,
            // An expired flow replaced by a new one: its traffic is summarized.
            Some(mut old) => {
                let rules = self.rules.as_deref().unwrap_or(&[]);
                fold(&mut self.allowed, rules, &key, &mut old);
            }
        }
    }

    /// Evicts the entry that expires first among a small sample (of `peer`'s
    /// flows, or of all), preferring flows that are closing or were never
    /// answered.
    fn evict_one(&mut self, peer: Option<PeerId>) {
        let victim = self
            .flows
            .iter()
            .filter(|(k, _)| peer.is_none_or(|p| k.peer == p))
            .take(16)
            .min_by_key(|(_, f)| (f.established, f.expires))
            .map(|(k, _)| *k);
        if let Some(k) = victim {
            if let Some(mut f) = self.flows.remove(&k) {
                let rules = self.rules.as_deref().unwrap_or(&[]);
                fold(&mut self.allowed, rules, &k, &mut f);
            }
            Usage::release(&mut self.usage, k.peer, |u| &mut u.flows);
        }
    }
}

/// [`Flow::rule`] of a flow the peer opened that no rule admits any more.
const REVOKED: u32 = u32::MAX;

/// First-match evaluation of compiled rules (default deny): the index of
/// the rule that admits the packet, or why none does.
fn evaluate(rules: &[Compiled], p: &packet::Packet) -> Result<u32, Reason> {
    let port = match p.transport {
        Transport::Ports { dst, .. } if has_ports(p.proto) => Some(dst),
        _ => None,
    };
    evaluate_parts(rules, p.proto, p.src, p.dst, port)
}

/// [`evaluate`] on a packet's protocol, addresses and destination port.
fn evaluate_parts(
    rules: &[Compiled],
    proto: u8,
    src: IpAddr,
    dst: IpAddr,
    port: Option<u16>,
) -> Result<u32, Reason> {
    let mut best = Reason::NoRule;
    for (i, rule) in rules.iter().enumerate() {
        if !rule.protocol(proto) || !rule.src.contains(src) {
            continue;
        }
        if !rule.dst.is_empty() && !rule.dst.contains(dst) {
            continue;
        }
        match port {
            Some(port) if !rule.port(port) => best = Reason::PortNotAllowed,
            // At most `u32::MAX` rules: a map is far smaller.
            _ => return Ok(u32::try_from(i).unwrap_or(REVOKED)),
        }
    }
    Err(best)
}

/// Moves a tracked flow's traffic since the last fold into the allowed-flow
/// summaries (flows the remote opened only), under the rule that admitted
/// its latest packet.
fn fold(allowed: &mut AllowedLog, rules: &[Compiled], key: &FlowKey, flow: &mut Flow) {
    let Some(t) = flow.traffic.as_deref_mut() else {
        return;
    };
    if t.is_idle() {
        return;
    }
    let summary_key = AllowedKey {
        src: key.remote,
        dst: key.local,
        proto: key.proto,
        dst_port: if has_ports(key.proto) {
            key.local_port
        } else {
            0
        },
        rule_id: rules
            .get(flow.rule as usize)
            .map_or_else(|| Arc::from(""), |r| r.rule_id.clone()),
    };
    allowed.add(summary_key, t);
    t.reset();
}

/// Distinct destination ports (keys) one source may hold in the allowed-flow
/// summaries between two takes; the rest of its flows are summed in one
/// key per (destination, protocol, rule) with port 0 ("other ports"), so a
/// peer scanning allowed ports cannot push other peers' flows out.
pub const MAX_ALLOWED_FLOWS_PER_SOURCE: u32 = 64;

/// Room beyond [`MAX_ALLOWED_FLOWS`] for the "other ports" keys.
const MAX_OTHER_PORT_KEYS: usize = 256;

/// The allowed-flow summaries between two takes, bounded overall and per source.
#[derive(Debug, Default)]
struct AllowedLog {
    flows: HashMap<AllowedKey, Traffic>,
    /// Keys each source holds in `flows` (its "other ports" key excluded).
    per_source: HashMap<IpAddr, u32>,
    /// Flows not summarized at all (total since start).
    overflow: u64,
}

impl AllowedLog {
    fn add(&mut self, key: AllowedKey, t: &Traffic) {
        if let Some(sum) = self.flows.get_mut(&key) {
            sum.add(t);
            return;
        }
        let held = self.per_source.get(&key.src).copied().unwrap_or(0);
        if held < MAX_ALLOWED_FLOWS_PER_SOURCE && self.flows.len() < MAX_ALLOWED_FLOWS {
            *self.per_source.entry(key.src).or_default() += 1;
            self.flows.insert(key, *t);
            return;
        }
        let other = AllowedKey { dst_port: 0, ..key };
        if let Some(sum) = self.flows.get_mut(&other) {
            sum.add(t);
        } else if self.flows.len() < MAX_ALLOWED_FLOWS + MAX_OTHER_PORT_KEYS {
            self.flows.insert(other, *t);
        } else {
            self.overflow = self.overflow.saturating_add(1);
        }
    }
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

/// A fragment chain whose first fragment was admitted.
#[derive(Debug, Clone, Copy)]
struct FragChain {
    expires: Instant,
    /// Bytes the first fragment carried: later fragments start at or after it.
    first_len: u32,
}

/// What one peer holds in the connection tracker.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    flows: usize,
    fragments: usize,
}

impl Usage {
    /// Counts one entry of `peer` less, forgetting peers that hold nothing.
    fn release(
        usage: &mut HashMap<PeerId, Usage>,
        peer: PeerId,
        field: impl FnOnce(&mut Usage) -> &mut usize,
    ) {
        if let Some(u) = usage.get_mut(&peer) {
            let n = field(u);
            *n = n.saturating_sub(1);
            if u.flows == 0 && u.fragments == 0 {
                usage.remove(&peer);
            }
        }
    }
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
    /// IPv4 reassembles by (src, dst, protocol, id); IPv6 by (src, dst, id)
    /// only, since a later fragment's next header names the first header of
    /// the fragmentable part, not the transport (RFC 8200 section 4.5).
    fn new(peer: PeerId, p: &packet::Packet, id: u32) -> Self {
        Self {
            peer,
            src: p.src,
            dst: p.dst,
            proto: if p.src.is_ipv4() { p.proto } else { 0 },
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

#[derive(Debug, Clone)]
struct Flow {
    origin: Origin,
    proto: u8,
    /// Seen in both directions.
    established: bool,
    /// TCP FIN or RST seen.
    closing: bool,
    /// Index of the rule that admitted the latest packet (`Origin::Remote`).
    rule: u32,
    expires: Instant,
    /// Traffic since the last fold, for flow logs (`Origin::Remote` only:
    /// flows this node opened are logged by the peer that admitted them).
    /// Boxed so that the tracker's entries for this node's own flows stay small.
    traffic: Option<Box<Traffic>>,
}

impl Flow {
    fn new(now: Instant, origin: Origin, proto: u8, limits: &Limits) -> Self {
        let mut f = Self {
            origin,
            proto,
            established: false,
            closing: false,
            rule: 0,
            expires: now,
            traffic: None,
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

    /// Counts a packet this node sent in a flow the peer opened (for the
    /// log), unless no rule admits the flow any more.
    fn reply(&mut self, now: Instant, len: usize) {
        if self.rule == REVOKED {
            return;
        }
        if let Some(t) = &mut self.traffic {
            t.reply_packets += 1;
            t.reply_bytes += len as u64;
            t.last_seen = now;
        }
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

/// A prefix list compiled to masks: membership costs a few AND/compares.
#[derive(Debug, Clone, Default)]
struct Prefixes {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl Prefixes {
    fn new<'a>(nets: impl IntoIterator<Item = &'a IpNet>) -> Self {
        let mut out = Self::default();
        for net in nets {
            match net.trunc() {
                IpNet::V4(n) => {
                    let mask = u32::from(n.netmask());
                    out.v4.push((u32::from(n.network()) & mask, mask));
                }
                IpNet::V6(n) => {
                    let mask = u128::from(n.netmask());
                    out.v6.push((u128::from(n.network()) & mask, mask));
                }
            }
        }
        out
    }

    fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    fn contains(&self, addr: IpAddr) -> bool {
        match addr {
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
}

/// A rule compiled for cheap evaluation: prefix masks, a protocol bitmap and
/// sorted, merged port ranges.
#[derive(Debug, Clone)]
struct Compiled {
    src: Prefixes,
    dst: Prefixes,
    protocols: [u64; 4],
    ports: Vec<(u16, u16)>,
    rule_id: Arc<str>,
}

impl Compiled {
    fn new(rule: &Rule) -> Self {
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
            src: Prefixes::new(&rule.src),
            dst: Prefixes::new(&rule.dst),
            protocols,
            ports: merged,
            rule_id: Arc::from(rule.rule_id.as_str()),
        }
    }

    fn protocol(&self, proto: u8) -> bool {
        self.protocols[usize::from(proto / 64)] & (1 << (proto % 64)) != 0
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
            dst: Vec::new(),
            protocols: protocols.to_vec(),
            ports: ports.to_vec(),
            rule_id: "r".into(),
        }
    }

    /// A managed ruleset for a node owning `ME` and `fd00::1`.
    fn managed(rules: Vec<Rule>) -> Option<Ruleset> {
        Some(Ruleset {
            local: vec![
                "100.64.0.1/32".parse().unwrap(),
                "fd00::1/128".parse().unwrap(),
            ],
            rules,
        })
    }

    fn t0() -> Instant {
        Instant::now()
    }

    #[test]
    fn rule_table() {
        let mut f = Filter::new(managed(vec![
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
        let mut f = Filter::new(managed(vec![rule(
            "100.64.0.2/32",
            &[PROTO_TCP],
            &[(22, 22)],
        )]));
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

    fn with_id(mut r: Rule, id: &str) -> Rule {
        r.rule_id = id.into();
        r
    }

    fn allowed_key(src: Ipv4Addr, port: u16, rule: &str) -> AllowedKey {
        AllowedKey {
            src: IpAddr::V4(src),
            dst: IpAddr::V4(ME),
            proto: PROTO_TCP,
            dst_port: port,
            rule_id: Arc::from(rule),
        }
    }

    #[test]
    fn allowed_flows_name_their_rule_and_count_both_directions() {
        let mut f = Filter::new(managed(vec![
            with_id(
                rule("100.64.0.3/32", &[PROTO_TCP], &[(22, 22)]),
                "p.hujson:4",
            ),
            with_id(
                rule("100.64.0.2/32", &[PROTO_TCP], &[(22, 22)]),
                "p.hujson:7",
            ),
        ]));
        let t = t0();
        let syn = v4(PEER, ME, PROTO_TCP, &tcp(4000, 22, TCP_SYN));
        let data = v4(PEER, ME, PROTO_TCP, &tcp(4000, 22, TCP_ACK));
        let reply = v4(ME, PEER, PROTO_TCP, &tcp(22, 4000, TCP_ACK));
        assert_eq!(f.inbound(t, 1, &syn), Verdict::Allow);
        f.outbound(t + Duration::from_millis(5), 1, &reply);
        let last = t + Duration::from_millis(9);
        assert_eq!(f.inbound(last, 1, &data), Verdict::Allow);
        // Another source port of the same flow: summarized together.
        let second = v4(PEER, ME, PROTO_TCP, &tcp(4001, 22, TCP_SYN));
        assert_eq!(f.inbound(t, 1, &second), Verdict::Allow);
        // A flow this node opened is the peer's to log, not ours.
        f.outbound(t, 1, &v4(ME, PEER, PROTO_TCP, &tcp(5000, 80, TCP_SYN)));
        f.inbound(
            t,
            1,
            &v4(PEER, ME, PROTO_TCP, &tcp(80, 5000, TCP_SYN | TCP_ACK)),
        );
        let taken = f.take_allowed();
        assert_eq!(taken.len(), 1, "{taken:?}");
        let (key, traffic) = &taken[0];
        assert_eq!(*key, allowed_key(PEER, 22, "p.hujson:7"));
        assert_eq!(traffic.packets, 3);
        assert_eq!(
            traffic.bytes,
            (syn.len() + data.len() + second.len()) as u64
        );
        assert_eq!(
            (traffic.reply_packets, traffic.reply_bytes),
            (1, reply.len() as u64)
        );
        assert_eq!((traffic.first_seen, traffic.last_seen), (t, last));
        assert!(
            f.take_allowed().is_empty(),
            "an idle flow is not reported again"
        );
        // More traffic: a new window with the flow's first-seen time kept.
        let later = t + Duration::from_secs(5);
        assert_eq!(f.inbound(later, 1, &data), Verdict::Allow);
        let taken = f.take_allowed();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].1.packets, 1);
        assert_eq!((taken[0].1.first_seen, taken[0].1.last_seen), (t, later));
    }

    #[test]
    fn allowed_traffic_survives_expiry_peer_removal_and_rule_changes() {
        let rules = |id: &str| {
            managed(vec![with_id(
                rule("100.64.0.2/32,100.64.0.3/32", &[PROTO_TCP], &[(22, 22)]),
                id,
            )])
        };
        let mut f = Filter::new(rules("old:1"));
        let t = t0();
        let flow = |src, sport| v4(src, ME, PROTO_TCP, &tcp(sport, 22, TCP_SYN));
        assert_eq!(f.inbound(t, 1, &flow(PEER, 1)), Verdict::Allow);
        assert_eq!(f.inbound(t, 2, &flow(OTHER, 1)), Verdict::Allow);
        // The first flow expires, the second's peer goes, then the rules change:
        // each one's traffic is still summarized, under the rule that admitted it.
        f.expire(t + Duration::from_secs(3600));
        assert_eq!(f.flow_count(), 0);
        let t2 = t + Duration::from_secs(3601);
        assert_eq!(f.inbound(t2, 1, &flow(PEER, 2)), Verdict::Allow);
        f.set_rules(rules("new:1"));
        assert_eq!(f.inbound(t2, 1, &flow(PEER, 2)), Verdict::Allow);
        f.remove_peer(1);
        let taken: Vec<_> = f
            .take_allowed()
            .into_iter()
            .map(|(k, t)| (k, t.packets))
            .collect();
        assert_eq!(
            taken,
            vec![
                (allowed_key(PEER, 22, "new:1"), 1),
                (allowed_key(PEER, 22, "old:1"), 2),
                (allowed_key(OTHER, 22, "old:1"), 1),
            ]
        );
    }

    #[test]
    fn flow_log_memory_per_tracked_flow_is_what_the_docs_say() {
        // ARCHITECTURE "Flow logs": the counters live in a 64-byte box, only
        // on flows a peer opened; every entry grows by 8 bytes (24 before).
        assert_eq!(std::mem::size_of::<Traffic>(), 64);
        assert!(
            std::mem::size_of::<Flow>() <= 40,
            "{}",
            std::mem::size_of::<Flow>()
        );
    }

    #[test]
    fn allowed_summaries_are_bounded_overall_and_per_source() {
        let mut f = Filter::new(managed(vec![rule("100.64.0.0/16", &[PROTO_TCP], &[])]));
        let t = t0();
        // One source scanning allowed ports: 64 ports of its own, the rest
        // summed under port 0 ("other ports"); nothing is lost.
        for port in 1..=1100u16 {
            let p = v4(PEER, ME, PROTO_TCP, &tcp(4000, port, TCP_SYN));
            assert_eq!(f.inbound(t, 1, &p), Verdict::Allow);
        }
        let taken = f.take_allowed();
        assert_eq!(taken.len(), MAX_ALLOWED_FLOWS_PER_SOURCE as usize + 1);
        assert_eq!(taken[0].0.dst_port, 0, "the other-ports key sorts first");
        assert_eq!(
            taken[0].1.packets,
            1100 - u64::from(MAX_ALLOWED_FLOWS_PER_SOURCE)
        );
        // Many sources: at most MAX_ALLOWED_FLOWS keys plus the other-ports
        // ones, and every packet is counted somewhere.
        let mut f = Filter::new(managed(vec![rule("100.64.0.0/16", &[PROTO_TCP], &[])]));
        let sources: Vec<Ipv4Addr> = (0..40u8).map(|i| Ipv4Addr::new(100, 64, 9, i)).collect();
        for (i, src) in sources.iter().enumerate() {
            for port in 1..=64u16 {
                let p = v4(*src, ME, PROTO_TCP, &tcp(4000, port, TCP_SYN));
                assert_eq!(f.inbound(t, i as u32, &p), Verdict::Allow);
            }
        }
        let taken = f.take_allowed();
        assert!(
            taken.len() <= MAX_ALLOWED_FLOWS + MAX_OTHER_PORT_KEYS,
            "{}",
            taken.len()
        );
        assert!(taken.len() >= MAX_ALLOWED_FLOWS);
        let packets: u64 = taken.iter().map(|(_, t)| t.packets).sum();
        assert_eq!(packets, 40 * 64);
        assert_eq!(f.allowed_overflow(), 0);
        assert!(f.take_allowed().is_empty(), "taken once");
    }

    #[test]
    fn a_flow_no_rule_admits_any_more_logs_no_more_allowed_traffic() {
        let admit = |id: &str, port| {
            managed(vec![with_id(
                rule("100.64.0.2/32", &[PROTO_TCP], &[(port, port)]),
                id,
            )])
        };
        let t = t0();
        let syn = v4(PEER, ME, PROTO_TCP, &tcp(4000, 22, TCP_SYN));
        let reply = v4(ME, PEER, PROTO_TCP, &tcp(22, 4000, TCP_ACK));
        // Revoked by a new ruleset: replies after it are not "allowed".
        let mut f = Filter::new(admit("a:1", 22));
        assert_eq!(f.inbound(t, 1, &syn), Verdict::Allow);
        f.set_rules(admit("b:1", 80));
        f.outbound(t, 1, &reply);
        let taken = f.take_allowed();
        assert_eq!(taken.len(), 1);
        assert_eq!(
            (taken[0].0.rule_id.as_ref(), taken[0].1.reply_packets),
            ("a:1", 0)
        );
        // A ruleset equal to the one in force changes nothing.
        let mut f = Filter::new(admit("a:1", 22));
        assert_eq!(f.inbound(t, 1, &syn), Verdict::Allow);
        f.set_rules(admit("a:1", 22));
        f.outbound(t, 1, &reply);
        let taken = f.take_allowed();
        assert_eq!((taken[0].1.packets, taken[0].1.reply_packets), (1, 1));
    }

    #[test]
    fn evicted_and_replaced_flows_keep_their_traffic_and_echo_flows_their_replies() {
        let limits = Limits {
            max_flows_per_peer: 2,
            ..Limits::default()
        };
        let mut f = Filter::with_limits(
            managed(vec![rule("100.64.0.2/32,fd00::2/128", &[], &[])]),
            limits,
        );
        let t = t0();
        for port in [1, 2, 3] {
            let p = v4(PEER, ME, PROTO_TCP, &tcp(4000, port, TCP_SYN));
            assert_eq!(f.inbound(t, 1, &p), Verdict::Allow);
        }
        assert_eq!(f.flow_count(), 2, "one flow was evicted");
        // An expired flow replaced by a new one with the same key.
        let udp_in = v4(PEER, ME, PROTO_UDP, &udp(5000, 53, b"q"));
        assert_eq!(f.inbound(t, 2, &udp_in), Verdict::Allow);
        let later = t + Duration::from_secs(600);
        assert_eq!(f.inbound(later, 2, &udp_in), Verdict::Allow);
        // Echo: the peer's request and this node's reply; IPv6 too.
        let ping = v4(PEER, ME, PROTO_ICMP, &icmp(8, 77));
        let pong = v4(ME, PEER, PROTO_ICMP, &icmp(0, 77));
        assert_eq!(f.inbound(t, 3, &ping), Verdict::Allow);
        f.outbound(t, 3, &pong);
        let v6_peer: std::net::Ipv6Addr = "fd00::2".parse().unwrap();
        let v6_me: std::net::Ipv6Addr = "fd00::1".parse().unwrap();
        let tcp6 = v6(v6_peer, v6_me, PROTO_TCP, &tcp(4000, 443, TCP_SYN));
        assert_eq!(f.inbound(t, 4, &tcp6), Verdict::Allow);
        let got: Vec<(IpAddr, u8, u16, u64, u64)> = f
            .take_allowed()
            .into_iter()
            .map(|(k, t)| (k.src, k.proto, k.dst_port, t.packets, t.reply_packets))
            .collect();
        let p4 = IpAddr::V4(PEER);
        assert_eq!(
            got,
            vec![
                (p4, PROTO_ICMP, 0, 1, 1),
                (p4, PROTO_TCP, 1, 1, 0),
                (p4, PROTO_TCP, 2, 1, 0),
                (p4, PROTO_TCP, 3, 1, 0),
                (p4, PROTO_UDP, 53, 2, 0),
                (IpAddr::V6(v6_peer), PROTO_TCP, 443, 1, 0),
            ]
        );
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
        let mut f = Filter::new(managed(vec![]));
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
        let mut f = Filter::new(managed(vec![]));
        let now = t0();
        f.outbound(now, 1, &v4(ME, PEER, PROTO_ICMP, &icmp(8, 9)));
        assert_eq!(
            f.inbound(now, 1, &v4(PEER, ME, PROTO_ICMP, &icmp(8, 9))),
            Verdict::Deny(Reason::NoRule)
        );
    }

    #[test]
    fn rule_admitted_flows_are_tracked_once_and_reevaluated() {
        let mut f = Filter::new(managed(vec![rule(
            "100.64.0.2/32",
            &[PROTO_TCP],
            &[(22, 22)],
        )]));
        let now = t0();
        let syn = v4(PEER, ME, PROTO_TCP, &tcp(4000, 22, TCP_SYN));
        let ack = v4(PEER, ME, PROTO_TCP, &tcp(4000, 22, TCP_ACK));
        assert_eq!(f.inbound(now, 1, &syn), Verdict::Allow);
        assert_eq!(f.inbound(now, 1, &ack), Verdict::Allow);
        assert_eq!(f.flow_count(), 1);
        f.set_rules(managed(vec![rule(
            "100.64.0.2/32",
            &[PROTO_TCP],
            &[(80, 80)],
        )]));
        assert_eq!(
            f.inbound(now, 1, &ack),
            Verdict::Deny(Reason::PortNotAllowed)
        );
    }

    #[test]
    fn tcp_non_syn_outbound_does_not_open_a_flow() {
        let mut f = Filter::new(managed(vec![]));
        let now = t0();
        f.outbound(now, 1, &v4(ME, PEER, PROTO_TCP, &tcp(22, 5000, TCP_ACK)));
        assert_eq!(
            f.inbound(now, 1, &v4(PEER, ME, PROTO_TCP, &tcp(5000, 22, TCP_ACK))),
            Verdict::Deny(Reason::NoRule)
        );
    }

    #[test]
    fn replies_to_inbound_flows_do_not_survive_rule_revocation() {
        let mut f = Filter::new(managed(vec![rule(
            "100.64.0.2/32",
            &[PROTO_UDP],
            &[(53, 53)],
        )]));
        let now = t0();
        let q = v4(PEER, ME, PROTO_UDP, &udp(5000, 53, b"q"));
        assert_eq!(f.inbound(now, 1, &q), Verdict::Allow);
        // Our reply must not turn the flow into one "we opened".
        f.outbound(now, 1, &v4(ME, PEER, PROTO_UDP, &udp(53, 5000, b"a")));
        f.set_rules(managed(vec![]));
        assert_eq!(f.inbound(now, 1, &q), Verdict::Deny(Reason::NoRule));
    }

    #[test]
    fn flows_expire_and_are_dropped_with_their_peer() {
        let mut f = Filter::new(managed(vec![]));
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
        let mut f = Filter::with_limits(managed(vec![]), limits);
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
        let mut f = Filter::new(managed(vec![rule(
            "100.64.0.2/32",
            &[PROTO_UDP],
            &[(53, 53)],
        )]));
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

    /// One peer opening flows without end (each admitted by a rule) cannot
    /// push another peer's flow out of the tracker: it pays with its own.
    #[test]
    fn one_peer_cannot_push_out_the_flows_of_another() {
        let limits = Limits {
            max_flows: 64,
            max_flows_per_peer: 16,
            ..Limits::default()
        };
        let mut f = Filter::with_limits(
            managed(vec![rule("100.64.0.2/32", &[PROTO_UDP], &[(53, 53)])]),
            limits,
        );
        let now = t0();
        // This node asks peer 2 something; its answer must still get in.
        f.outbound(now, 2, &v4(ME, OTHER, PROTO_UDP, &udp(5000, 9999, b"q")));
        for port in 0..1000u16 {
            let later = now + Duration::from_millis(u64::from(port));
            let flood = v4(PEER, ME, PROTO_UDP, &udp(10_000 + port, 53, b"x"));
            assert_eq!(f.inbound(later, 1, &flood), Verdict::Allow);
        }
        assert!(f.flow_count() <= 17, "{} flows", f.flow_count());
        let answer = v4(OTHER, ME, PROTO_UDP, &udp(9999, 5000, b"a"));
        assert_eq!(
            f.inbound(now + Duration::from_secs(1), 2, &answer),
            Verdict::Allow
        );
    }

    /// One peer's first fragments cannot fill the fragment table for all.
    #[test]
    fn one_peer_cannot_exhaust_the_fragment_table() {
        let limits = Limits {
            max_fragments: 8,
            max_fragments_per_peer: 4,
            ..Limits::default()
        };
        let mut f = Filter::with_limits(
            managed(vec![rule("100.64.0.0/24", &[PROTO_UDP], &[(53, 53)])]),
            limits,
        );
        let now = t0();
        let first = |src: Ipv4Addr, id: u16| {
            let mut p = v4(src, ME, PROTO_UDP, &udp(5000, 53, b"abcdefgh"));
            p[4..6].copy_from_slice(&id.to_be_bytes());
            p[6..8].copy_from_slice(&0x2000u16.to_be_bytes());
            p
        };
        let later = |src: Ipv4Addr, id: u16| {
            let mut p = v4(src, ME, PROTO_UDP, b"tail");
            p[4..6].copy_from_slice(&id.to_be_bytes());
            p[6..8].copy_from_slice(&2u16.to_be_bytes());
            p
        };
        for id in 0..100 {
            assert_eq!(f.inbound(now, 1, &first(PEER, id)), Verdict::Allow);
        }
        assert_eq!(f.inbound(now, 2, &first(OTHER, 7)), Verdict::Allow);
        assert_eq!(f.inbound(now, 2, &later(OTHER, 7)), Verdict::Allow);
        // The flooder's own early chains still work; its later ones were not tracked.
        assert_eq!(f.inbound(now, 1, &later(PEER, 0)), Verdict::Allow);
        assert_eq!(
            f.inbound(now, 1, &later(PEER, 99)),
            Verdict::Deny(Reason::OrphanFragment)
        );
    }

    /// A later fragment that starts inside its first fragment would rewrite
    /// the ports the filter checked: refused, in both families.
    #[test]
    fn fragments_overlapping_their_first_fragment_are_refused() {
        let mut f = Filter::new(managed(vec![rule(
            "100.64.0.2/32,fd00::2/128",
            &[PROTO_UDP, PROTO_TCP],
            &[(53, 53)],
        )]));
        let now = t0();
        let mut first = v4(PEER, ME, PROTO_UDP, &udp(5000, 53, b"abcdefgh"));
        first[4..6].copy_from_slice(&42u16.to_be_bytes());
        first[6..8].copy_from_slice(&0x2000u16.to_be_bytes());
        let mut overlap = v4(PEER, ME, PROTO_UDP, b"evil-ports");
        overlap[4..6].copy_from_slice(&42u16.to_be_bytes());
        overlap[6..8].copy_from_slice(&1u16.to_be_bytes()); // byte 8 < 16
        assert_eq!(f.inbound(now, 1, &first), Verdict::Allow);
        assert_eq!(
            f.inbound(now, 1, &overlap),
            Verdict::Deny(Reason::OverlappingFragment)
        );

        let (a, b) = ("fd00::2".parse().unwrap(), "fd00::1".parse().unwrap());
        let mut first6 = vec![PROTO_TCP, 0, 0, 1, 0, 0, 0, 9];
        first6.extend_from_slice(&tcp(1234, 53, TCP_SYN));
        assert_eq!(f.inbound(now, 1, &v6(a, b, 44, &first6)), Verdict::Allow);
        // Offset 8 bytes: inside the 20-byte TCP header of the first.
        let overlap6 = [PROTO_TCP, 0, 0, 8, 0, 0, 0, 9, 0, 22, 0, 0];
        assert_eq!(
            f.inbound(now, 1, &v6(a, b, 44, &overlap6)),
            Verdict::Deny(Reason::OverlappingFragment)
        );
        let tail6 = [PROTO_TCP, 0, 0, 24, 0, 0, 0, 9, 1, 2, 3, 4];
        assert_eq!(f.inbound(now, 1, &v6(a, b, 44, &tail6)), Verdict::Allow);
    }

    /// IPv6: extension headers after the fragment header do not orphan the
    /// later fragments (their next header is that extension header).
    #[test]
    fn ipv6_fragments_with_extension_headers_after_the_fragment_header_pass() {
        let mut f = Filter::new(managed(vec![rule(
            "fd00::2/128",
            &[PROTO_TCP],
            &[(443, 443)],
        )]));
        let now = t0();
        let (a, b) = ("fd00::2".parse().unwrap(), "fd00::1".parse().unwrap());
        let mut first = vec![60, 0, 0, 1, 0, 0, 0, 5];
        first.extend_from_slice(&[PROTO_TCP, 0, 1, 4, 0, 0, 0, 0]);
        first.extend_from_slice(&tcp(1234, 443, TCP_SYN));
        assert_eq!(f.inbound(now, 1, &v6(a, b, 44, &first)), Verdict::Allow);
        let later = [60, 0, 0, 32, 0, 0, 0, 5, 9, 9, 9, 9];
        assert_eq!(f.inbound(now, 1, &v6(a, b, 44, &later)), Verdict::Allow);
        // A port the rule does not admit: neither the first nor the rest.
        let mut denied = vec![60, 0, 0, 1, 0, 0, 0, 6];
        denied.extend_from_slice(&[PROTO_TCP, 0, 1, 4, 0, 0, 0, 0]);
        denied.extend_from_slice(&tcp(1234, 22, TCP_SYN));
        assert_eq!(
            f.inbound(now, 1, &v6(a, b, 44, &denied)),
            Verdict::Deny(Reason::PortNotAllowed)
        );
        let rest = [60, 0, 0, 32, 0, 0, 0, 6, 9, 9, 9, 9];
        assert_eq!(
            f.inbound(now, 1, &v6(a, b, 44, &rest)),
            Verdict::Deny(Reason::OrphanFragment)
        );
    }

    #[test]
    fn icmp_errors_about_our_flows_are_admitted() {
        let mut f = Filter::new(managed(vec![]));
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
    /// A peer allowed to reach this node's port 22 routes one of the node's
    /// other addresses (a container bridge, a LAN address, a network it
    /// forwards to) into its own tunnel: refused under its own reason, while
    /// the same flow to the overlay address is admitted.
    #[test]
    fn refuses_destinations_that_are_not_this_nodes_own() {
        let mut f = Filter::new(managed(vec![rule(
            "100.64.0.2/32",
            &[PROTO_TCP, PROTO_UDP, PROTO_ICMP],
            &[(22, 22)],
        )]));
        let now = t0();
        let lan = Ipv4Addr::new(198, 18, 7, 1);
        let neighbour = Ipv4Addr::new(100, 64, 0, 9);
        for dst in [
            lan,
            neighbour,
            Ipv4Addr::BROADCAST,
            Ipv4Addr::new(224, 0, 0, 1),
        ] {
            assert_eq!(
                f.inbound(now, 1, &v4(PEER, dst, PROTO_TCP, &tcp(1000, 22, TCP_SYN))),
                Verdict::Deny(Reason::ForeignDestination),
                "{dst}"
            );
        }
        assert_eq!(
            f.inbound(now, 1, &v4(PEER, lan, PROTO_ICMP, &icmp(8, 1))),
            Verdict::Deny(Reason::ForeignDestination)
        );
        assert_eq!(
            f.inbound(now, 1, &v4(PEER, ME, PROTO_TCP, &tcp(1000, 22, TCP_SYN))),
            Verdict::Allow
        );
        let drops: HashMap<Reason, u64> = f.drops().into_iter().collect();
        assert_eq!(drops[&Reason::ForeignDestination], 5);
        let denied = f.take_denied();
        assert!(denied
            .iter()
            .any(|(d, _)| d.dst == IpAddr::V4(lan) && d.reason == Reason::ForeignDestination));
    }

    /// A reply to a flow this node opened is still only delivered to a local
    /// address: conntrack never widens the destination check.
    #[test]
    fn conntrack_never_admits_a_foreign_destination() {
        let mut f = Filter::new(managed(vec![]));
        let now = t0();
        let lan = Ipv4Addr::new(198, 18, 7, 1);
        // Even if this node sent from a non-overlay address (it cannot: the
        // peer's cryptokey routing drops it), the reply is not delivered.
        f.outbound(now, 1, &v4(lan, PEER, PROTO_UDP, &udp(5000, 53, b"q")));
        assert_eq!(
            f.inbound(now, 1, &v4(PEER, lan, PROTO_UDP, &udp(53, 5000, b"a"))),
            Verdict::Deny(Reason::ForeignDestination)
        );
        f.outbound(now, 1, &v4(ME, PEER, PROTO_UDP, &udp(5000, 53, b"q")));
        assert_eq!(
            f.inbound(now, 1, &v4(PEER, ME, PROTO_UDP, &udp(53, 5000, b"a"))),
            Verdict::Allow
        );
    }

    /// A rule's destinations restrict it to some of the node's addresses:
    /// `100.64.0.1:22` does not open port 22 on the node's IPv6 address.
    #[test]
    fn rule_destinations_restrict_which_local_address_is_reached() {
        let mut r = rule("100.64.0.2/32,fd00::2/128", &[PROTO_TCP], &[(22, 22)]);
        r.dst = vec!["100.64.0.1/32".parse().unwrap()];
        let mut f = Filter::new(managed(vec![r]));
        let now = t0();
        assert_eq!(
            f.inbound(now, 1, &v4(PEER, ME, PROTO_TCP, &tcp(1000, 22, TCP_SYN))),
            Verdict::Allow
        );
        let six = v6(
            "fd00::2".parse().unwrap(),
            "fd00::1".parse().unwrap(),
            PROTO_TCP,
            &tcp(1000, 22, TCP_SYN),
        );
        assert_eq!(f.inbound(now, 1, &six), Verdict::Deny(Reason::NoRule));
    }

    /// A managed filter with no local addresses (no map yet) delivers nothing.
    #[test]
    fn no_local_addresses_means_nothing_is_delivered() {
        let mut f = Filter::new(Some(Ruleset {
            local: Vec::new(),
            rules: vec![rule("0.0.0.0/0", &[], &[])],
        }));
        assert_eq!(
            f.inbound(t0(), 1, &v4(PEER, ME, PROTO_UDP, &udp(1, 2, b""))),
            Verdict::Deny(Reason::ForeignDestination)
        );
    }

    /// The filter's semantics read literally: the destination is local, and
    /// some rule admits source, destination, protocol and port.
    fn naive(rules: &[Rule], src: IpAddr, dst: IpAddr, proto: u8, port: Option<u16>) -> bool {
        let local: [IpNet; 2] = [
            "100.64.0.1/32".parse().unwrap(),
            "fd00::1/128".parse().unwrap(),
        ];
        if !local.iter().any(|n| n.contains(&dst)) {
            return false;
        }
        rules.iter().any(|r| {
            let dst_ok = r.dst.is_empty() || r.dst.iter().any(|n| n.contains(&dst));
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
            proto_ok && src_ok && dst_ok && port_ok
        })
    }

    /// Destinations the property probes: this node, a neighbour in the
    /// overlay, and an underlay address this node might own or forward to.
    const DSTS: [Ipv4Addr; 3] = [
        ME,
        Ipv4Addr::new(100, 64, 9, 1),
        Ipv4Addr::new(198, 18, 0, 1),
    ];

    fn arb_rule() -> impl Strategy<Value = Rule> {
        (
            prop::collection::vec((0u8..4, 0u8..=32), 1..4),
            prop::collection::vec(prop::sample::select(vec![1u8, 6, 17, 58, 132]), 0..3),
            prop::collection::vec((0u16..64, 0u16..64), 0..4),
            prop::collection::vec(prop::sample::select(DSTS.to_vec()), 0..3),
        )
            .prop_map(|(srcs, protocols, ports, dst)| Rule {
                dst: dst
                    .into_iter()
                    .map(|d| IpNet::from(IpAddr::V4(d)))
                    .collect(),
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
            dst in prop::sample::select(DSTS.to_vec()),
        ) {
            let src = Ipv4Addr::new(100, 64, b, host);
            let l4 = match proto {
                PROTO_TCP => tcp(999, port, TCP_SYN),
                PROTO_UDP | PROTO_SCTP => udp(999, port, b""),
                PROTO_ICMP | PROTO_ICMPV6 => icmp(8, 1),
                _ => vec![0; 8],
            };
            let pkt = v4(src, dst, proto, &l4);
            let mut f = Filter::new(managed(rules.clone()));
            let got = f.inbound(Instant::now(), 1, &pkt) == Verdict::Allow;
            let want = naive(&rules, IpAddr::V4(src), IpAddr::V4(dst), proto, Some(port));
            prop_assert_eq!(got, want);
        }
    }
}
