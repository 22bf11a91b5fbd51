//! The sans-IO WireGuard device: peers, one boringtun [`Tunn`] per peer,
//! AllowedIPs longest-prefix match, receiver-index lookup, strict cryptokey
//! routing, the inbound filter, and timers. Pure: it owns no socket and reads no
//! clock; the I/O shell passes packets and `now` in and writes the outputs.
//!
//! Driving it (quinn-proto style):
//! - a packet read from the TUN: [`Device::handle_tun`];
//! - a UDP datagram: [`Device::handle_udp`]; a datagram from the relay:
//!   [`Device::handle_relay`] (the same decapsulation, cryptokey routing and
//!   filter: the receiver enforces policy on relayed traffic too);
//! - when [`Device::poll_timeout`] passes: [`Device::handle_timeout`];
//! - after each of those: [`Device::poll_transmit`] until it returns `None`
//!   (queued packets flushed after a handshake, handshakes and keepalives from timers).
//!
//! boringtun reads its own monotonic clock inside `Tunn` (handshake retries,
//! session expiry, passive keepalives). Persistent keepalives, the initiator's
//! rekey after [`REKEY_AFTER`], handshake timestamps for stats and the 250 ms
//! timer cadence are kept here on the caller's clock, so they are deterministic
//! in tests.
//!
//! Each peer has a [`Path`] (`crate::path`): outputs name a [`Destination`],
//! a UDP address or the relay, and the timer pass sends the probes that
//! punch holes and keep a direct path warm.

mod admission;
mod allowed_ips;
pub mod initiation;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;
use ipnet::IpNet;
use ztmesh_proto::keys::{WgPrivateKey, WgPublicKey};

pub use self::admission::{Admission, Admissions};
pub use self::allowed_ips::AllowedIps;
use crate::filter::{self, Filter, Verdict};
pub use crate::path::Destination;
use crate::path::{Path, PathCounters, Probe};

/// How often boringtun's per-peer timers are driven (as boringtun's own device does).
pub const TIMER_TICK: Duration = Duration::from_millis(250);
/// The initiator starts a new handshake once a session is this old and data was sent.
pub const REKEY_AFTER: Duration = Duration::from_secs(120);
/// How long to wait for a rekey before asking again.
const REKEY_RETRY: Duration = Duration::from_secs(5);
/// Maximum number of peers (the slot part of a receiver index is 16 bits).
pub const MAX_PEERS: usize = 1 << 16;
/// Bytes a data message adds to an IP packet.
pub const OVERHEAD: usize = 32;
/// Smallest output buffer boringtun accepts (a handshake initiation).
pub const MIN_BUFFER: usize = 148;

/// A peer as configured by the netmap, a wg-quick file or UAPI.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// The peer's WireGuard public key.
    pub public_key: WgPublicKey,
    /// Optional preshared key (never printed).
    pub preshared_key: Option<[u8; 32]>,
    /// Inner addresses this peer may use as source, and that route to it.
    pub allowed_ips: Vec<IpNet>,
    /// Where to send to until the peer is heard from another address.
    pub endpoint: Option<SocketAddr>,
    /// More candidate endpoints to probe (the netmap's other endpoints).
    pub candidates: Vec<SocketAddr>,
    /// The peer's id at the relay, when a relay can reach it.
    pub relay: Option<u64>,
    /// Persistent keepalive interval in seconds (`None` or 0: off).
    pub persistent_keepalive: Option<u16>,
}

impl PeerConfig {
    /// The addresses a path probes: the endpoint, then the other candidates.
    pub fn path_candidates(&self) -> Vec<SocketAddr> {
        self.endpoint
            .iter()
            .chain(self.candidates.iter())
            .copied()
            .collect()
    }
}

impl fmt::Debug for PeerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerConfig")
            .field("public_key", &self.public_key)
            .field("preshared_key", &self.preshared_key.map(|_| "<redacted>"))
            .field("allowed_ips", &self.allowed_ips)
            .field("endpoint", &self.endpoint)
            .field("candidates", &self.candidates)
            .field("relay", &self.relay)
            .field("persistent_keepalive", &self.persistent_keepalive)
            .finish()
    }
}

/// Why the device dropped a packet (besides filter verdicts, see [`filter::Reason`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// A UDP datagram that is not a WireGuard message.
    Malformed,
    /// A message for a receiver index no peer owns.
    UnknownIndex,
    /// A handshake initiation from a key that is not a configured peer.
    UnknownPeer,
    /// A handshake message that failed authentication, or an unexpected one.
    HandshakeFailed,
    /// A handshake from a source that used up its budgets, cookie-proven one
    /// included (see [`Admissions`]).
    UnderLoad,
    /// A data message that failed decryption.
    Decrypt,
    /// A data message whose counter was already seen or is too old.
    Replay,
    /// A data message for a session that no longer exists.
    NoSession,
    /// A decrypted packet whose inner source does not route back to its sender.
    SpoofedSource,
    /// An outbound packet whose destination matches no peer's AllowedIPs.
    NoRoute,
    /// An outbound packet for a peer with no known endpoint.
    NoEndpoint,
    /// An outbound packet too large for the output buffer.
    TooLarge,
    /// A datagram from the relay whose claimed source peer id is not the
    /// peer the datagram belongs to (or no relay peer at all).
    RelayMismatch,
    /// The inbound filter denied the packet.
    Filtered(filter::Reason),
}

impl DropReason {
    const DEVICE: [DropReason; 13] = [
        DropReason::Malformed,
        DropReason::UnknownIndex,
        DropReason::UnknownPeer,
        DropReason::HandshakeFailed,
        DropReason::UnderLoad,
        DropReason::Decrypt,
        DropReason::Replay,
        DropReason::NoSession,
        DropReason::SpoofedSource,
        DropReason::NoRoute,
        DropReason::NoEndpoint,
        DropReason::TooLarge,
        DropReason::RelayMismatch,
    ];

    /// A stable snake_case name for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::UnknownIndex => "unknown_index",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::HandshakeFailed => "handshake_failed",
            DropReason::UnderLoad => "under_load",
            DropReason::Decrypt => "decrypt",
            DropReason::Replay => "replay",
            DropReason::NoSession => "no_session",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::NoRoute => "no_route",
            DropReason::NoEndpoint => "no_endpoint",
            DropReason::TooLarge => "too_large",
            DropReason::RelayMismatch => "relay_mismatch",
            DropReason::Filtered(r) => r.as_str(),
        }
    }

    fn slot(self) -> Option<usize> {
        Self::DEVICE.iter().position(|r| *r == self)
    }
}

/// A datagram to send.
#[derive(Debug)]
pub struct Transmit<'a> {
    /// Where it goes: a UDP address or the relay.
    pub to: Destination,
    /// The datagram, borrowed from the caller's buffer.
    pub packet: &'a [u8],
}

/// What to do with the result of one input.
#[derive(Debug)]
pub enum Output<'a> {
    /// Send a datagram (over UDP or through the relay).
    Network(Transmit<'a>),
    /// Write an IP packet to the TUN device.
    Tunnel(&'a [u8]),
    /// Nothing to write (keepalive received, cookie stored, packet queued).
    Done,
    /// The input was dropped and counted.
    Dropped(DropReason),
}

/// A peer's state for `status`, `wg show` and metrics.
#[derive(Debug, Clone)]
pub struct PeerStatus {
    /// The configuration the peer was set with.
    pub config: PeerConfig,
    /// The current UDP endpoint: the last address an authenticated packet
    /// came from, else the configured one.
    pub endpoint: Option<SocketAddr>,
    /// Where data for the peer goes now.
    pub destination: Option<Destination>,
    /// True while a direct path is fresh (authenticated UDP within
    /// [`crate::path::DIRECT_TIMEOUT`]).
    pub direct: bool,
    /// The path the last authenticated packet from the peer came by.
    pub last_rx: Option<Destination>,
    /// Probe rounds, upgrades and fallbacks.
    pub path: PathCounters,
    /// When the last handshake completed, on the caller's clock.
    pub last_handshake: Option<Instant>,
    /// Bytes received from the peer (whole WireGuard datagrams, as wireguard-go counts).
    pub rx_bytes: u64,
    /// Bytes sent to the peer.
    pub tx_bytes: u64,
}

struct Peer {
    config: PeerConfig,
    /// The WireGuard state machine, built on first use: a `Tunn` is about
    /// 11 KiB, and most peers of a large mesh never exchange a packet.
    tunn: Option<Box<Tunn>>,
    /// The 24-bit index boringtun puts in the top bits of our receiver indexes.
    index: u32,
    path: Path,
    last_rx: Option<Destination>,
    last_handshake: Option<Instant>,
    initiator: bool,
    last_data_sent: Option<Instant>,
    last_traffic: Instant,
    rekey_requested: Option<Instant>,
    rx_bytes: u64,
    tx_bytes: u64,
}

enum Out {
    Net(Destination, Range<usize>),
    Tun(Range<usize>),
    Done,
    Drop(DropReason),
}

/// The WireGuard device state machine.
pub struct Device {
    private: x25519::StaticSecret,
    public: x25519::PublicKey,
    /// MAC1 checks only (never "under load"); every `Tunn` shares it, so
    /// admission is decided here, per source, before a `Tunn` sees a handshake.
    mac1: Arc<RateLimiter>,
    /// Always "under load": checks MAC2 against our cookie for the source and
    /// formats cookie replies. Used for sources over their budget.
    cookies: RateLimiter,
    admissions: Admissions,
    peers: Vec<Option<Peer>>,
    generations: Vec<u8>,
    free: Vec<usize>,
    by_key: HashMap<WgPublicKey, usize>,
    routes: AllowedIps<usize>,
    filter: Filter,
    drops: [u64; DropReason::DEVICE.len()],
    /// Handshakes completed, with any peer (metrics).
    handshakes: u64,
    /// Verified initiations from keys that are not peers (evidence for the
    /// controller's detectors).
    unknown: initiation::Unknown,
    flush: Option<usize>,
    timer_cursor: usize,
    /// Whether the peer at `timer_cursor` already ran its timers this pass
    /// (its probes come next).
    timers_done: bool,
    /// A probe round in progress: the peer's slot and the next target.
    probing: Option<(usize, usize)>,
    /// The probe datagram of that round, and its length.
    probe: [u8; MIN_BUFFER],
    probe_len: usize,
    /// The address of a round that only keeps the direct path warm.
    pending_direct: Option<SocketAddr>,
    relay_up: bool,
    next_tick: Instant,
    next_sweep: Instant,
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Device")
            .field("public_key", &WgPublicKey(self.public.to_bytes()))
            .field("peers", &self.by_key.len())
            .finish_non_exhaustive()
    }
}

impl Device {
    /// Creates a device with no peers. `rules` as for [`Filter::new`]: `None`
    /// accepts all traffic from peers, `Some(ruleset)` is default deny.
    pub fn new(private_key: &WgPrivateKey, rules: Option<filter::Ruleset>, now: Instant) -> Self {
        let private = private_key.to_dalek();
        let public = x25519::PublicKey::from(&private);
        Self {
            mac1: Arc::new(RateLimiter::new(&public, u64::MAX)),
            cookies: RateLimiter::new(&public, 0),
            admissions: Admissions::new(now),
            private,
            public,
            peers: Vec::new(),
            generations: Vec::new(),
            free: Vec::new(),
            by_key: HashMap::new(),
            routes: AllowedIps::default(),
            filter: Filter::new(rules),
            drops: [0; DropReason::DEVICE.len()],
            handshakes: 0,
            unknown: initiation::Unknown::default(),
            flush: None,
            timer_cursor: usize::MAX,
            timers_done: false,
            probing: None,
            probe: [0; MIN_BUFFER],
            probe_len: 0,
            pending_direct: None,
            relay_up: true,
            next_tick: now,
            next_sweep: now,
        }
    }

    /// This device's public key.
    pub fn public_key(&self) -> WgPublicKey {
        WgPublicKey(self.public.to_bytes())
    }

    /// Applies a new peer set as a diff.
    ///
    /// Peers whose key and preshared key are unchanged keep their sessions;
    /// their AllowedIPs, endpoint and keepalive are updated. Removed peers lose
    /// their sessions and conntrack entries at once. A peer with this device's
    /// own key is ignored, as is any peer beyond [`MAX_PEERS`]. When two peers
    /// list the same prefix, the later one owns it.
    pub fn set_peers(&mut self, peers: Vec<PeerConfig>, now: Instant) {
        let own = self.public_key();
        let mut wanted: HashMap<WgPublicKey, PeerConfig> = HashMap::new();
        let mut order = Vec::new();
        for p in peers {
            if p.public_key != own && !wanted.contains_key(&p.public_key) {
                order.push(p.public_key);
            }
            if p.public_key != own {
                wanted.insert(p.public_key, p);
            }
        }
        let stale: Vec<WgPublicKey> = self
            .by_key
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for key in stale {
            self.remove_peer(&key);
        }
        for key in order {
            let Some(config) = wanted.remove(&key) else {
                continue;
            };
            match self.by_key.get(&key).copied() {
                Some(slot) => {
                    let peer = self.peers[slot]
                        .as_mut()
                        .expect("by_key points at live slots");
                    if peer.config.preshared_key != config.preshared_key {
                        // Sessions under the old key end; the next use builds a new `Tunn`.
                        peer.tunn = None;
                        peer.last_handshake = None;
                    }
                    if config.endpoint.is_some() && config.endpoint != peer.config.endpoint {
                        // As WireGuard: a newly configured endpoint replaces
                        // the learned one.
                        peer.path.forget_direct();
                    }
                    peer.path
                        .update(&config.path_candidates(), config.relay, now);
                    peer.config = config;
                }
                None => {
                    let _ = self.add_peer(config, now);
                }
            }
        }
        self.rebuild_routes();
    }

    /// Tells every peer's path whether the relay link is up (while it is
    /// down, data goes to a UDP candidate rather than into a dead link).
    pub fn set_relay_up(&mut self, up: bool) {
        if self.relay_up == up {
            return;
        }
        self.relay_up = up;
        for p in self.peers.iter_mut().flatten() {
            p.path.set_relay_up(up);
        }
    }

    /// Replaces the inbound filter rules (`None`: accept all from peers).
    pub fn set_filter(&mut self, rules: Option<filter::Ruleset>) {
        self.filter.set_rules(rules);
    }

    /// Handles an IP packet read from the TUN device: route, encrypt, send.
    ///
    /// `out` must hold the packet plus [`OVERHEAD`] and at least [`MIN_BUFFER`] bytes.
    pub fn handle_tun<'a>(&mut self, now: Instant, packet: &[u8], out: &'a mut [u8]) -> Output<'a> {
        let r = self.tun_inner(now, packet, out);
        self.finish(r, out)
    }

    /// Handles a UDP datagram received from `from`.
    ///
    /// `out` must be at least as large as the datagram and [`MIN_BUFFER`].
    pub fn handle_udp<'a>(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        out: &'a mut [u8],
    ) -> Output<'a> {
        let r = self.udp_inner(now, Destination::Udp(from), datagram, out);
        self.finish(r, out)
    }

    /// Handles a WireGuard datagram the relay delivered from peer id `from`.
    ///
    /// Exactly as [`Device::handle_udp`] (decapsulation, cryptokey routing,
    /// the filter), and the claimed peer id must be the relay id of the peer
    /// the datagram belongs to, else it is dropped as
    /// [`DropReason::RelayMismatch`] before any decryption. A relayed packet
    /// never becomes the direct path.
    pub fn handle_relay<'a>(
        &mut self,
        now: Instant,
        from: u64,
        datagram: &[u8],
        out: &'a mut [u8],
    ) -> Output<'a> {
        let r = self.udp_inner(now, Destination::Relay(from), datagram, out);
        self.finish(r, out)
    }

    /// When [`Device::handle_timeout`] should be called next.
    pub fn poll_timeout(&self) -> Instant {
        self.next_tick
    }

    /// Runs timers: arms a pass over all peers that [`Device::poll_transmit`]
    /// walks, resets the handshake rate limiter and expires conntrack entries.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now < self.next_tick {
            return;
        }
        self.next_tick = now + TIMER_TICK;
        self.timer_cursor = 0;
        // The counter of the MAC1-only limiter is never compared to anything
        // reachable; resetting it keeps it far from wrapping.
        self.mac1.reset_count();
        if now >= self.next_sweep {
            self.filter.expire(now);
            self.admissions.sweep(now);
            self.next_sweep = now + Duration::from_secs(1);
        }
    }

    /// The next datagram to send that is not a direct answer to an input:
    /// packets flushed after a handshake, keepalives, handshake (re)initiations.
    pub fn poll_transmit<'a>(&mut self, now: Instant, out: &'a mut [u8]) -> Option<Transmit<'a>> {
        let (to, range) = self.poll_inner(now, out)?;
        Some(Transmit {
            to,
            packet: out.get(range)?,
        })
    }

    /// The state of every peer at `now`, in public key order.
    pub fn peers(&self, now: Instant) -> Vec<PeerStatus> {
        let mut v: Vec<PeerStatus> = self
            .peers
            .iter()
            .flatten()
            .map(|p| PeerStatus {
                config: p.config.clone(),
                endpoint: p.path.last_direct().or(p.config.endpoint),
                destination: p.path.peek(now),
                direct: p.path.fresh(now).is_some(),
                last_rx: p.last_rx,
                path: p.path.counters(),
                last_handshake: p.last_handshake,
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
            })
            .collect();
        v.sort_by_key(|p| p.config.public_key);
        v
    }

    /// Drop counters: device reasons, then filter reasons.
    pub fn drops(&self) -> Vec<(DropReason, u64)> {
        let mut v: Vec<(DropReason, u64)> = DropReason::DEVICE
            .iter()
            .enumerate()
            .map(|(i, r)| (*r, self.drops[i]))
            .collect();
        v.extend(
            self.filter
                .drops()
                .into_iter()
                .map(|(r, n)| (DropReason::Filtered(r), n)),
        );
        v
    }

    /// Handshakes completed so far (as responder or initiator).
    pub fn handshakes(&self) -> u64 {
        self.handshakes
    }

    /// Inbound packets the filter allowed so far.
    pub fn filter_allowed(&self) -> u64 {
        self.filter.allowed()
    }

    /// The count for one drop reason.
    pub fn drop_count(&self, reason: DropReason) -> u64 {
        match reason {
            DropReason::Filtered(r) => self
                .filter
                .drops()
                .into_iter()
                .find(|(x, _)| *x == r)
                .map_or(0, |(_, n)| n),
            r => r.slot().map_or(0, |i| self.drops[i]),
        }
    }

    /// Number of tracked flows in the filter.
    pub fn flow_count(&self) -> usize {
        self.filter.flow_count()
    }

    /// Denied inbound flows since the last call (see [`Filter::take_denied`]).
    pub fn take_denied_flows(&mut self) -> Vec<(filter::DeniedFlow, u64)> {
        self.filter.take_denied()
    }

    /// Verified handshake initiations from keys that are not peers, per
    /// key, since the last call, from keys whose newest initiation is fresh
    /// at `unix_s` (see [`initiation::Unknown::take`]).
    pub fn take_unknown_handshakes(&mut self, unix_s: u64) -> Vec<([u8; 32], u64)> {
        self.unknown.take(unix_s)
    }

    /// Allowed inbound flows with traffic since the last call (see
    /// [`Filter::take_allowed`]), and the total of flows that did not fit.
    pub fn take_allowed_flows(&mut self) -> (Vec<(filter::AllowedKey, filter::Traffic)>, u64) {
        (self.filter.take_allowed(), self.filter.allowed_overflow())
    }

    fn add_peer(&mut self, config: PeerConfig, now: Instant) -> Option<usize> {
        let slot = match self.free.pop() {
            Some(s) => s,
            None if self.peers.len() < MAX_PEERS => {
                self.peers.push(None);
                self.generations.push(0);
                self.peers.len() - 1
            }
            None => return None,
        };
        let index = (u32::from(self.generations[slot]) << 16) | slot as u32;
        // As WireGuard does when persistent keepalive is set: the first
        // keepalive (and so a handshake) goes out at once, not after the
        // interval. A node restarted from its stored netmap thereby re-keys
        // with its peers right away instead of waiting for their session to
        // time out.
        let keepalive = Duration::from_secs(u64::from(config.persistent_keepalive.unwrap_or(0)));
        let mut path = Path::new(&config.path_candidates(), config.relay, now);
        path.set_relay_up(self.relay_up);
        let last_traffic = match (path.peek(now), keepalive.is_zero()) {
            (Some(_), false) => now.checked_sub(keepalive).unwrap_or(now),
            _ => now,
        };
        self.by_key.insert(config.public_key, slot);
        self.peers[slot] = Some(Peer {
            path,
            last_rx: None,
            config,
            tunn: None,
            index,
            last_handshake: None,
            initiator: false,
            last_data_sent: None,
            last_traffic,
            rekey_requested: None,
            rx_bytes: 0,
            tx_bytes: 0,
        });
        Some(slot)
    }

    fn remove_peer(&mut self, key: &WgPublicKey) {
        let Some(slot) = self.by_key.remove(key) else {
            return;
        };
        if let Some(peer) = self.peers[slot].take() {
            self.filter.remove_peer(peer.index);
        }
        self.generations[slot] = self.generations[slot].wrapping_add(1);
        self.free.push(slot);
        if self.flush == Some(slot) {
            self.flush = None;
        }
        if self.probing.is_some_and(|(s, _)| s == slot) {
            self.probing = None;
        }
    }

    fn rebuild_routes(&mut self) {
        let mut entries = Vec::new();
        for (slot, peer) in self.peers.iter().enumerate() {
            if let Some(p) = peer {
                entries.extend(p.config.allowed_ips.iter().map(|n| (*n, slot)));
            }
        }
        self.routes = AllowedIps::build(entries);
    }

    fn finish<'a>(&mut self, r: Out, out: &'a [u8]) -> Output<'a> {
        let r = match r {
            // boringtun always answers inside the buffer it was given; should
            // that ever change, drop rather than panic.
            Out::Net(_, ref range) | Out::Tun(ref range) if out.get(range.clone()).is_none() => {
                Out::Drop(DropReason::Malformed)
            }
            r => r,
        };
        match r {
            Out::Net(to, range) => Output::Network(Transmit {
                to,
                packet: &out[range],
            }),
            Out::Tun(range) => Output::Tunnel(&out[range]),
            Out::Done => Output::Done,
            Out::Drop(reason) => {
                self.count(reason);
                Output::Dropped(reason)
            }
        }
    }

    fn count(&mut self, reason: DropReason) {
        // Filter verdicts are counted by the filter itself.
        if let Some(i) = reason.slot() {
            self.drops[i] = self.drops[i].saturating_add(1);
        }
    }

    fn tun_inner(&mut self, now: Instant, packet: &[u8], out: &mut [u8]) -> Out {
        let Some(dst) = filter::packet::destination(packet) else {
            return Out::Drop(DropReason::Malformed);
        };
        let Some(slot) = self.routes.lookup(dst) else {
            return Out::Drop(DropReason::NoRoute);
        };
        if out.len() < packet.len() + OVERHEAD || out.len() < MIN_BUFFER {
            return Out::Drop(DropReason::TooLarge);
        }
        let Some(peer) = self.peers[slot].as_mut() else {
            return Out::Drop(DropReason::NoRoute);
        };
        self.filter.outbound(now, peer.index, packet);
        let base = out.as_ptr() as usize;
        match peer
            .tunn(&self.private, &self.mac1)
            .encapsulate(packet, out)
        {
            TunnResult::WriteToNetwork(p) => {
                let range = range_in(base, p);
                peer.path.used(now);
                let Some(to) = peer.path.destination(now) else {
                    return Out::Drop(DropReason::NoEndpoint);
                };
                peer.tx_bytes = peer.tx_bytes.saturating_add(range.len() as u64);
                peer.last_traffic = now;
                if range.len() > OVERHEAD || !packet.is_empty() {
                    peer.last_data_sent = Some(now);
                }
                Out::Net(to, range)
            }
            TunnResult::Done => {
                peer.path.used(now);
                Out::Done
            }
            TunnResult::Err(_) => Out::Drop(DropReason::NoSession),
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => Out::Done,
        }
    }

    fn udp_inner(
        &mut self,
        now: Instant,
        from: Destination,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Out {
        if datagram.len() < 8 || out.len() < datagram.len().max(MIN_BUFFER) {
            return Out::Drop(DropReason::Malformed);
        }
        let source_ip = source_ip(from);
        let kind = datagram[0];
        if kind == 1 || kind == 2 {
            if let Err(out_early) = self.admit_handshake(now, from, source_ip, datagram, out) {
                return out_early;
            }
        }
        let slot = match kind {
            1 => {
                // Admitted above: find the peer before the Tunn's Diffie-Hellman.
                let Ok(Packet::HandshakeInit(init)) = Tunn::parse_incoming_packet(datagram) else {
                    return Out::Drop(DropReason::Malformed);
                };
                match parse_handshake_anon(&self.private, &self.public, &init) {
                    Ok(half) => match self.by_key.get(&WgPublicKey(half.peer_static_public)) {
                        Some(slot) => *slot,
                        None => {
                            // Admitted (MAC1, budgets) before this second
                            // Diffie-Hellman: a flood is answered by cookies.
                            if let Some((key, ts)) =
                                initiation::verify(&self.private, &self.public, datagram)
                            {
                                self.unknown.record(key, ts);
                            }
                            return Out::Drop(DropReason::UnknownPeer);
                        }
                    },
                    Err(_) => return Out::Drop(DropReason::HandshakeFailed),
                }
            }
            2..=4 => {
                // A handshake response carries its sender index first.
                let at = if kind == 2 { 8 } else { 4 };
                if datagram.len() < at + 4 {
                    return Out::Drop(DropReason::Malformed);
                }
                let receiver = u32::from_le_bytes([
                    datagram[at],
                    datagram[at + 1],
                    datagram[at + 2],
                    datagram[at + 3],
                ]);
                let index = receiver >> 8;
                let slot = (index & 0xffff) as usize;
                // A peer without a `Tunn` never took part in a handshake, so
                // nothing can be addressed to it yet.
                match self.peers.get(slot) {
                    Some(Some(p)) if p.index == index && p.tunn.is_some() => slot,
                    _ => return Out::Drop(DropReason::UnknownIndex),
                }
            }
            _ => return Out::Drop(DropReason::Malformed),
        };
        if let Destination::Relay(claimed) = from {
            // The relay names the sender; it must be the peer the datagram
            // belongs to (a data message's index, a handshake's static key).
            let owner = self.peers[slot].as_ref().and_then(|p| p.config.relay);
            if owner != Some(claimed) {
                return Out::Drop(DropReason::RelayMismatch);
            }
        }
        let Self {
            peers,
            routes,
            filter,
            flush,
            private,
            mac1,
            ..
        } = self;
        let peer = peers[slot].as_mut().expect("slot checked above");
        let base = out.as_ptr() as usize;
        match peer
            .tunn(private, mac1)
            .decapsulate(Some(source_ip), datagram, out)
        {
            TunnResult::WriteToNetwork(p) => {
                let range = range_in(base, p);
                let reply = out[range.start];
                if reply == 3 {
                    // A cookie reply under load: the sender is not authenticated yet.
                    return Out::Net(from, range);
                }
                peer.authenticated(now, from, datagram.len());
                if (kind == 1 && reply == 2) || kind == 2 {
                    self.handshakes = self.handshakes.wrapping_add(1);
                    peer.last_handshake = Some(now);
                    peer.initiator = kind == 2;
                    peer.rekey_requested = None;
                }
                peer.tx_bytes = peer.tx_bytes.saturating_add(range.len() as u64);
                *flush = Some(slot);
                Out::Net(from, range)
            }
            TunnResult::WriteToTunnelV4(p, src) => {
                let range = range_in(base, p);
                peer.authenticated(now, from, datagram.len());
                peer.path.used(now);
                tunnel_out(
                    routes,
                    filter,
                    now,
                    slot,
                    peer.index,
                    IpAddr::V4(src),
                    &out[range.clone()],
                )
                .map_or_else(Out::Drop, |()| Out::Tun(range))
            }
            TunnResult::WriteToTunnelV6(p, src) => {
                let range = range_in(base, p);
                peer.authenticated(now, from, datagram.len());
                peer.path.used(now);
                tunnel_out(
                    routes,
                    filter,
                    now,
                    slot,
                    peer.index,
                    IpAddr::V6(src),
                    &out[range.clone()],
                )
                .map_or_else(Out::Drop, |()| Out::Tun(range))
            }
            TunnResult::Done => {
                if kind == 4 {
                    // A keepalive: authenticated, nothing to deliver.
                    peer.authenticated(now, from, datagram.len());
                }
                Out::Done
            }
            TunnResult::Err(e) => Out::Drop(match e {
                WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter => {
                    DropReason::Replay
                }
                WireGuardError::InvalidAeadTag => DropReason::Decrypt,
                WireGuardError::NoCurrentSession | WireGuardError::WrongIndex => {
                    DropReason::NoSession
                }
                WireGuardError::UnderLoad => DropReason::UnderLoad,
                WireGuardError::InvalidPacket | WireGuardError::IncorrectPacketLength => {
                    DropReason::Malformed
                }
                _ => DropReason::HandshakeFailed,
            }),
        }
    }

    /// Checks MAC1 and the source's budget before any Diffie-Hellman. `Err`
    /// carries the early answer: a drop, or a cookie reply written to `out`.
    fn admit_handshake(
        &mut self,
        now: Instant,
        from: Destination,
        source_ip: IpAddr,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Result<(), Out> {
        let mut reply = [0u8; 64];
        match self
            .mac1
            .verify_packet(Some(source_ip), datagram, &mut reply)
        {
            Ok(Packet::HandshakeInit(_) | Packet::HandshakeResponse(_)) => {}
            Ok(_) => return Err(Out::Drop(DropReason::Malformed)),
            Err(TunnResult::Err(
                WireGuardError::InvalidPacket | WireGuardError::IncorrectPacketLength,
            )) => return Err(Out::Drop(DropReason::Malformed)),
            Err(_) => return Err(Out::Drop(DropReason::HandshakeFailed)),
        }
        if self.admissions.check(source_ip, now) == Admission::Admit {
            return Ok(());
        }
        match self
            .cookies
            .verify_packet(Some(source_ip), datagram, &mut reply)
        {
            Ok(_) if self.admissions.admit_with_cookie(source_ip, now) => Ok(()),
            Ok(_) => Err(Out::Drop(DropReason::UnderLoad)),
            Err(TunnResult::WriteToNetwork(c)) => {
                let n = c.len();
                match out.get_mut(..n) {
                    Some(dst) => {
                        dst.copy_from_slice(&reply[..n]);
                        Err(Out::Net(from, 0..n))
                    }
                    None => Err(Out::Drop(DropReason::TooLarge)),
                }
            }
            Err(_) => Err(Out::Drop(DropReason::HandshakeFailed)),
        }
    }

    fn poll_inner(&mut self, now: Instant, out: &mut [u8]) -> Option<(Destination, Range<usize>)> {
        if out.len() < MIN_BUFFER {
            return None;
        }
        while let Some(slot) = self.flush {
            let Some(peer) = self.peers[slot].as_mut() else {
                self.flush = None;
                break;
            };
            let Some(tunn) = peer.tunn.as_deref_mut() else {
                self.flush = None;
                break;
            };
            let base = out.as_ptr() as usize;
            match tunn.decapsulate(None, &[], out) {
                TunnResult::WriteToNetwork(p) => {
                    let range = range_in(base, p);
                    match peer.path.destination(now) {
                        Some(to) => {
                            peer.tx_bytes = peer.tx_bytes.saturating_add(range.len() as u64);
                            peer.last_data_sent = Some(now);
                            peer.last_traffic = now;
                            return Some((to, range));
                        }
                        None => self.count(DropReason::NoEndpoint),
                    }
                }
                _ => self.flush = None,
            }
        }
        if let Some(next) = self.next_probe_target(out) {
            return Some(next);
        }
        // Timer outputs are at most a handshake initiation: use a small scratch
        // buffer so that a peer with nothing to send does not hold `out`.
        let mut scratch = [0u8; MIN_BUFFER];
        while self.timer_cursor < self.peers.len() {
            let slot = self.timer_cursor;
            let Some(peer) = self.peers[slot].as_mut() else {
                self.timer_cursor += 1;
                self.timers_done = false;
                continue;
            };
            if !self.timers_done {
                self.timers_done = true;
                let n = peer.timers(now, &self.private, &self.mac1, &mut scratch);
                if n > 0 {
                    if let Some(to) = peer.path.destination(now) {
                        peer.tx_bytes = peer.tx_bytes.saturating_add(n as u64);
                        peer.last_traffic = now;
                        out[..n].copy_from_slice(&scratch[..n]);
                        return Some((to, 0..n));
                    }
                }
            }
            self.timer_cursor += 1;
            self.timers_done = false;
            if self.start_probe(slot, now) {
                if let Some(next) = self.next_probe_target(out) {
                    return Some(next);
                }
            }
        }
        None
    }

    /// Prepares the probe datagram of peer `slot` when its path asks for
    /// one: a keepalive when a session exists, else (only while the peer is
    /// in use) a new handshake initiation, sent to every target. A peer that
    /// never built its `Tunn` is never probed.
    fn start_probe(&mut self, slot: usize, now: Instant) -> bool {
        let Some(peer) = self.peers[slot].as_mut() else {
            return false;
        };
        if peer.tunn.is_none() {
            return false;
        }
        let probe = peer.path.poll_probe(now);
        if probe == Probe::None {
            return false;
        }
        let has_session = peer.tunn.as_deref().is_some_and(|t| t.stats().0.is_some());
        let in_use = peer.path.in_use(now);
        let (private, mac1) = (&self.private, &self.mac1);
        let tunn = peer.tunn(private, mac1);
        let r = if has_session {
            tunn.encapsulate(&[], &mut self.probe)
        } else if in_use && probe == Probe::Candidates {
            tunn.format_handshake_initiation(&mut self.probe, true)
        } else {
            return false;
        };
        let TunnResult::WriteToNetwork(p) = r else {
            return false;
        };
        self.probe_len = p.len();
        self.probing = Some((slot, 0));
        peer.last_traffic = now;
        if let Probe::Direct(addr) = probe {
            // One target: the direct path (index 0 of a one-address round).
            self.probing = Some((slot, usize::MAX));
            let n = self.probe_len;
            peer.tx_bytes = peer.tx_bytes.saturating_add(n as u64);
            self.pending_direct = Some(addr);
        }
        true
    }

    /// The next datagram of the probe round in progress.
    fn next_probe_target(&mut self, out: &mut [u8]) -> Option<(Destination, Range<usize>)> {
        let (slot, i) = self.probing?;
        let n = self.probe_len;
        let peer = self.peers.get_mut(slot).and_then(Option::as_mut);
        let (Some(peer), Some(dst)) = (peer, out.get_mut(..n)) else {
            self.probing = None;
            return None;
        };
        let to = if i == usize::MAX {
            self.probing = None;
            Destination::Udp(self.pending_direct.take()?)
        } else {
            match peer.path.probe_target(i) {
                Some(addr) => {
                    self.probing = Some((slot, i + 1));
                    Destination::Udp(addr)
                }
                None => {
                    self.probing = None;
                    // A handshake initiation also goes through the relay:
                    // it replaced any initiation in flight there.
                    match (self.probe[0], peer.path.relay()) {
                        (1, Some(id)) => Destination::Relay(id),
                        _ => return None,
                    }
                }
            }
        };
        if i != usize::MAX {
            peer.tx_bytes = peer.tx_bytes.saturating_add(n as u64);
        }
        dst.copy_from_slice(&self.probe[..n]);
        Some((to, 0..n))
    }
}

impl Peer {
    /// The peer's `Tunn`, built now if this is its first use.
    fn tunn(&mut self, private: &x25519::StaticSecret, limiter: &Arc<RateLimiter>) -> &mut Tunn {
        let (config, index) = (&self.config, self.index);
        self.tunn.get_or_insert_with(|| {
            Box::new(Tunn::new(
                private.clone(),
                x25519::PublicKey::from(config.public_key.0),
                config.preshared_key,
                None,
                index,
                Some(limiter.clone()),
            ))
        })
    }

    /// An authenticated packet from the peer arrived by `from`: only a UDP
    /// source becomes (or refreshes) the direct path.
    fn authenticated(&mut self, now: Instant, from: Destination, len: usize) {
        if let Destination::Udp(addr) = from {
            self.path.heard_udp(addr, now);
        }
        self.last_rx = Some(from);
        self.rx_bytes = self.rx_bytes.saturating_add(len as u64);
        self.last_traffic = now;
    }

    /// Our clock's timers, then boringtun's. Returns the length written to
    /// `scratch`, 0 when there is nothing to send.
    fn timers(
        &mut self,
        now: Instant,
        private: &x25519::StaticSecret,
        limiter: &Arc<RateLimiter>,
        scratch: &mut [u8; MIN_BUFFER],
    ) -> usize {
        let rekey_due = self.initiator
            && self
                .last_handshake
                .is_some_and(|t| now.duration_since(t) >= REKEY_AFTER)
            && self
                .last_data_sent
                .zip(self.last_handshake)
                .is_some_and(|(sent, hs)| sent > hs)
            && self
                .rekey_requested
                .is_none_or(|t| now.duration_since(t) >= REKEY_RETRY);
        if rekey_due {
            self.rekey_requested = Some(now);
            if let TunnResult::WriteToNetwork(p) = self
                .tunn(private, limiter)
                .format_handshake_initiation(scratch, false)
            {
                return p.len();
            }
        }
        let keepalive = self.config.persistent_keepalive.unwrap_or(0);
        // Without an endpoint the keepalive could not be sent: do not build
        // a `Tunn` for it.
        if keepalive > 0
            && self.path.peek(now).is_some()
            && now.duration_since(self.last_traffic) >= Duration::from_secs(u64::from(keepalive))
        {
            self.last_traffic = now;
            if let TunnResult::WriteToNetwork(p) =
                self.tunn(private, limiter).encapsulate(&[], scratch)
            {
                return p.len();
            }
        }
        // A peer that never built its `Tunn` has no timers to run.
        match self.tunn.as_deref_mut().map(|t| t.update_timers(scratch)) {
            Some(TunnResult::WriteToNetwork(p)) => p.len(),
            _ => 0,
        }
    }
}

/// Strict cryptokey routing, then the filter.
fn tunnel_out(
    routes: &AllowedIps<usize>,
    filter: &mut Filter,
    now: Instant,
    slot: usize,
    index: u32,
    src: IpAddr,
    packet: &[u8],
) -> Result<(), DropReason> {
    if routes.lookup(src) != Some(slot) {
        return Err(DropReason::SpoofedSource);
    }
    match filter.inbound(now, index, packet) {
        Verdict::Allow => Ok(()),
        Verdict::Deny(r) => Err(DropReason::Filtered(r)),
    }
}

/// The address admission and cookies key on: the UDP source, or for the
/// relay a per-peer address in its own /64 (fd00::/8, never on a wire), so
/// each relayed peer has its own handshake budget.
fn source_ip(from: Destination) -> IpAddr {
    match from {
        Destination::Udp(a) => a.ip(),
        Destination::Relay(id) => {
            let id = u128::from(id & 0x00ff_ffff_ffff_ffff);
            IpAddr::V6(Ipv6Addr::from((0xfd_u128 << 120) | (id << 64)))
        }
    }
}

/// The position of `part` inside the buffer starting at `base`. boringtun
/// returns sub-slices of the buffer it was given.
fn range_in(base: usize, part: &[u8]) -> Range<usize> {
    let start = (part.as_ptr() as usize).saturating_sub(base);
    start..start + part.len()
}
