//! Path selection for one peer: direct UDP or the relay, hole-punching
//! probes, upgrade and fallback. Pure: no socket, no clock (time is an
//! argument); the tunnel `Device` keeps one [`Path`] per peer and the I/O
//! shell sends what it returns.
//!
//! The rules:
//! - the **direct path** is the address the last *authenticated* UDP packet
//!   from the peer arrived from ([`Path::heard_udp`]); it is *fresh* while
//!   such packets keep arriving, at most [`DIRECT_TIMEOUT`] apart. Only the
//!   tunnel calls `heard_udp`, after a datagram decrypted (or a handshake
//!   verified), so a packet from an unknown address that does not
//!   authenticate never becomes the path;
//! - without a fresh direct path, data goes through the relay when one can
//!   reach the peer, and the node **probes** every candidate (the netmap's
//!   endpoints, and the last direct address): one WireGuard keepalive or
//!   handshake initiation to each, every [`PROBE_INTERVAL`] while the peer is
//!   in use, backing off to [`IDLE_PROBE_INTERVAL`] when it is idle, within a
//!   per-peer budget ([`PROBE_BURST`] rounds, refilled one per
//!   [`PROBE_INTERVAL`]). The first candidate that answers authenticated
//!   becomes direct (**upgrade**);
//! - while direct and in use, a keepalive goes on the direct path every
//!   [`DIRECT_KEEPALIVE`], so that the other side's direct path stays fresh
//!   too; when nothing authenticated arrives for [`DIRECT_TIMEOUT`], data
//!   **falls back** to the relay and probing resumes;
//! - without a relay (standalone WireGuard, or a map without relays) the
//!   destination is the last authenticated address, fresh or not, else the
//!   first candidate: classic WireGuard roaming;
//! - a new candidate set or relay ([`Path::update`], i.e. a new netmap) makes
//!   a probe round due at once: the controller publishes both peers' maps
//!   together, so both sides punch at about the same time.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// A direct path is fresh while authenticated UDP keeps arriving this often.
/// Both sides of a pair in use send at least a keepalive every
/// [`DIRECT_KEEPALIVE`] (up to a timer tick, 250 ms, later), so one lost
/// keepalive leaves a gap of at most 2.5 s and does not flap the path; a
/// dead direct path falls back to the relay within about 3 s (plus a tick).
pub const DIRECT_TIMEOUT: Duration = Duration::from_secs(3);
/// While in use and direct, a keepalive goes on the direct path this often
/// (a 32-byte WireGuard keepalive per second per active peer).
pub const DIRECT_KEEPALIVE: Duration = Duration::from_secs(1);
// One lost keepalive (two intervals, each up to a 250 ms tick late) must
// stay inside the freshness window.
const _: () = assert!(DIRECT_TIMEOUT.as_millis() > 2 * (DIRECT_KEEPALIVE.as_millis() + 250));
/// Probe rounds while the peer is in use and has no fresh direct path.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// The longest pause between probe rounds of an idle peer.
pub const IDLE_PROBE_INTERVAL: Duration = Duration::from_secs(30);
/// A peer is in use while data went either way within this time.
pub const IN_USE: Duration = Duration::from_secs(30);
/// Probe rounds a peer may spend at once (a token bucket, one token per
/// [`PROBE_INTERVAL`]): map updates in a burst cannot make it probe faster.
pub const PROBE_BURST: u32 = 3;
/// Candidates kept per peer (the netmap may list more: the rest are ignored).
pub const MAX_CANDIDATES: usize = 8;

/// Where a datagram for a peer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Destination {
    /// Straight to this UDP address.
    Udp(SocketAddr),
    /// Through the relay, addressed to this peer id (the netmap's id).
    Relay(u64),
}

/// What the shell should send for a peer now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Nothing.
    None,
    /// A keepalive on the fresh direct path.
    Direct(SocketAddr),
    /// A probe round: one keepalive (or handshake initiation) to every
    /// address of [`Path::probe_targets`].
    Candidates,
}

/// One peer's path state.
#[derive(Debug, Clone)]
pub struct Path {
    candidates: Vec<SocketAddr>,
    relay: Option<u64>,
    /// Whether the relay link is up: while it is down, data goes to the
    /// last direct address or the first candidate instead.
    relay_up: bool,
    /// The source of the last authenticated UDP packet, and when it arrived.
    direct: Option<(SocketAddr, Instant)>,
    /// When data last went either way.
    used: Option<Instant>,
    next_probe: Instant,
    interval: Duration,
    tokens: u32,
    refilled: Instant,
    next_keepalive: Instant,
    rounds: u64,
    upgrades: u64,
    fallbacks: u64,
    /// Whether the last destination returned was a fresh direct path (for
    /// counting fallbacks).
    was_direct: bool,
}

impl Path {
    /// A path for a peer with these candidates, reachable through the relay
    /// as `relay` (the peer's netmap id) when a relay is configured.
    /// A probe round is due at once.
    pub fn new(candidates: &[SocketAddr], relay: Option<u64>, now: Instant) -> Self {
        Self {
            candidates: bounded(candidates),
            relay,
            relay_up: true,
            direct: None,
            used: None,
            next_probe: now,
            interval: PROBE_INTERVAL,
            tokens: PROBE_BURST,
            refilled: now,
            next_keepalive: now,
            rounds: 0,
            upgrades: 0,
            fallbacks: 0,
            was_direct: false,
        }
    }

    /// A new netmap: new candidates or relay. When they changed, a probe
    /// round is due at once (within the budget) and the backoff restarts;
    /// the direct path, if any, stays.
    pub fn update(&mut self, candidates: &[SocketAddr], relay: Option<u64>, now: Instant) {
        let candidates = bounded(candidates);
        if candidates != self.candidates || relay != self.relay {
            self.candidates = candidates;
            self.relay = relay;
            self.next_probe = now;
            self.interval = PROBE_INTERVAL;
        }
    }

    /// An authenticated UDP packet from the peer arrived from `from`: that
    /// address is the direct path from now on. Returns true when this is an
    /// upgrade (there was no fresh direct path, or it was another address).
    pub fn heard_udp(&mut self, from: SocketAddr, now: Instant) -> bool {
        let upgrade = self.fresh(now) != Some(from);
        if upgrade {
            self.upgrades = self.upgrades.saturating_add(1);
        }
        self.direct = Some((from, now));
        upgrade
    }

    /// Data went to or came from the peer: it is in use. Restarts fast
    /// probing of a peer that was idle and has no fresh direct path.
    pub fn used(&mut self, now: Instant) {
        let idle = self
            .used
            .is_none_or(|t| now.saturating_duration_since(t) >= IN_USE);
        self.used = Some(now);
        if idle && self.interval > PROBE_INTERVAL {
            self.interval = PROBE_INTERVAL;
            self.next_probe = self.next_probe.min(now);
        }
    }

    /// Where a datagram for the peer goes now (`None`: nowhere known).
    pub fn destination(&mut self, now: Instant) -> Option<Destination> {
        let fresh = self.fresh(now);
        if self.was_direct && fresh.is_none() {
            self.fallbacks = self.fallbacks.saturating_add(1);
            // Resume probing at once.
            self.next_probe = self.next_probe.min(now);
            self.interval = PROBE_INTERVAL;
        }
        self.was_direct = fresh.is_some();
        self.peek(now)
    }

    /// [`Path::destination`] without counting anything (for status).
    pub fn peek(&self, now: Instant) -> Option<Destination> {
        if let Some(addr) = self.fresh(now) {
            return Some(Destination::Udp(addr));
        }
        if let Some(id) = self.relay.filter(|_| self.relay_up) {
            return Some(Destination::Relay(id));
        }
        self.direct
            .map(|(a, _)| a)
            .or_else(|| self.candidates.first().copied())
            .map(Destination::Udp)
    }

    /// The fresh direct path, if any.
    pub fn fresh(&self, now: Instant) -> Option<SocketAddr> {
        self.direct
            .filter(|(_, t)| now.saturating_duration_since(*t) < DIRECT_TIMEOUT)
            .map(|(a, _)| a)
    }

    /// The last authenticated UDP address, fresh or not.
    pub fn last_direct(&self) -> Option<SocketAddr> {
        self.direct.map(|(a, _)| a)
    }

    /// Whether data went either way within [`IN_USE`].
    pub fn in_use(&self, now: Instant) -> bool {
        self.used
            .is_some_and(|t| now.saturating_duration_since(t) < IN_USE)
    }

    /// The relay link went up or down (the shell tells the device).
    pub fn set_relay_up(&mut self, up: bool) {
        self.relay_up = up;
    }

    /// Forgets the direct address (a newly configured endpoint replaces it,
    /// as in WireGuard).
    pub fn forget_direct(&mut self) {
        self.direct = None;
    }

    /// The peer's relay id, when a relay can reach it.
    pub fn relay(&self) -> Option<u64> {
        self.relay
    }

    /// What to send for this peer now; call it on every timer pass.
    pub fn poll_probe(&mut self, now: Instant) -> Probe {
        let in_use = self.in_use(now);
        if let Some(addr) = self.fresh(now) {
            // Only against a relay does a direct path need holding: without
            // one, a stale direct address is still the destination.
            if in_use && self.relay.is_some() && now >= self.next_keepalive {
                self.next_keepalive = now + DIRECT_KEEPALIVE;
                return Probe::Direct(addr);
            }
            return Probe::None;
        }
        // Probing is an upgrade over the relay, or a choice between
        // several addresses; one address and no relay is plain WireGuard.
        let worth = self.relay.is_some() || self.probe_targets().nth(1).is_some();
        if now < self.next_probe || !worth || self.probe_targets().next().is_none() {
            return Probe::None;
        }
        self.refill(now);
        if self.tokens == 0 {
            self.next_probe = self.refilled + PROBE_INTERVAL;
            return Probe::None;
        }
        self.tokens -= 1;
        self.rounds = self.rounds.saturating_add(1);
        if !in_use {
            self.interval = (self.interval * 2).min(IDLE_PROBE_INTERVAL);
        }
        self.next_probe = now + self.interval;
        Probe::Candidates
    }

    /// The addresses a probe round goes to: every candidate, then the last
    /// direct address when it is not one of them. Allocates nothing.
    pub fn probe_targets(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        let extra = self
            .direct
            .map(|(a, _)| a)
            .filter(|a| !self.candidates.contains(a));
        self.candidates.iter().copied().chain(extra)
    }

    /// The `i`-th probe target (for a shell that sends them one at a time).
    pub fn probe_target(&self, i: usize) -> Option<SocketAddr> {
        self.probe_targets().nth(i)
    }

    /// Counters: probe rounds sent, upgrades to a direct path, fallbacks to
    /// the relay (or to the last address) after the direct path went silent.
    pub fn counters(&self) -> PathCounters {
        PathCounters {
            probe_rounds: self.rounds,
            upgrades: self.upgrades,
            fallbacks: self.fallbacks,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled);
        let n = elapsed.as_millis() / PROBE_INTERVAL.as_millis();
        if n > 0 {
            let n = u32::try_from(n).unwrap_or(u32::MAX);
            self.tokens = self.tokens.saturating_add(n).min(PROBE_BURST);
            self.refilled = if self.tokens == PROBE_BURST {
                now
            } else {
                self.refilled + PROBE_INTERVAL * n
            };
        }
    }
}

/// Path counters of one peer (see [`Path::counters`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathCounters {
    pub probe_rounds: u64,
    pub upgrades: u64,
    pub fallbacks: u64,
}

/// The first [`MAX_CANDIDATES`] distinct candidates, in order.
fn bounded(candidates: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut v: Vec<SocketAddr> = Vec::with_capacity(candidates.len().min(MAX_CANDIDATES));
    for c in candidates {
        if v.len() == MAX_CANDIDATES {
            break;
        }
        if !v.contains(c) {
            v.push(*c);
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(last: u8, port: u16) -> SocketAddr {
        SocketAddr::from(([198, 18, 1, last], port))
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn without_a_direct_path_data_goes_through_the_relay_and_probes_start_at_once() {
        let t0 = Instant::now();
        let mut p = Path::new(&[addr(1, 51820), addr(2, 51820)], Some(7), t0);
        assert_eq!(p.destination(t0), Some(Destination::Relay(7)));
        assert_eq!(p.poll_probe(t0), Probe::Candidates);
        let targets: Vec<_> = p.probe_targets().collect();
        assert_eq!(targets, vec![addr(1, 51820), addr(2, 51820)]);
        assert_eq!(p.poll_probe(t0), Probe::None, "one round per interval");
    }

    #[test]
    fn the_first_candidate_that_answers_authenticated_becomes_direct() {
        let t0 = Instant::now();
        let mut p = Path::new(&[addr(1, 51820), addr(2, 51820)], Some(7), t0);
        assert_eq!(p.poll_probe(t0), Probe::Candidates);
        let t1 = t0 + Duration::from_millis(30);
        assert!(p.heard_udp(addr(2, 51820), t1), "an upgrade");
        assert_eq!(p.destination(t1), Some(Destination::Udp(addr(2, 51820))));
        assert!(!p.heard_udp(addr(2, 51820), t1), "a refresh is no upgrade");
        assert_eq!(p.counters().upgrades, 1);
        // Direct and idle: no probes, no keepalives.
        assert_eq!(p.poll_probe(t1 + secs(1)), Probe::None);
    }

    #[test]
    fn a_silent_direct_path_falls_back_to_the_relay_and_probing_resumes() {
        let t0 = Instant::now();
        let mut p = Path::new(&[addr(1, 51820)], Some(7), t0);
        p.used(t0);
        assert_eq!(p.poll_probe(t0), Probe::Candidates);
        p.heard_udp(addr(1, 51820), t0);
        assert_eq!(p.destination(t0), Some(Destination::Udp(addr(1, 51820))));
        // Still fresh just before the timeout.
        let almost = t0 + DIRECT_TIMEOUT - Duration::from_millis(1);
        assert_eq!(
            p.destination(almost),
            Some(Destination::Udp(addr(1, 51820)))
        );
        let gone = t0 + DIRECT_TIMEOUT;
        assert_eq!(p.destination(gone), Some(Destination::Relay(7)));
        assert_eq!(p.counters().fallbacks, 1);
        assert_eq!(p.poll_probe(gone), Probe::Candidates, "probing resumes");
        // The peer answers again: direct again.
        p.heard_udp(addr(1, 51820), gone + secs(1));
        assert_eq!(
            p.destination(gone + secs(1)),
            Some(Destination::Udp(addr(1, 51820)))
        );
        assert_eq!(p.counters().upgrades, 2);
    }

    #[test]
    fn refreshes_keep_the_direct_path_alive_past_the_timeout() {
        let t0 = Instant::now();
        let mut p = Path::new(&[addr(1, 51820)], Some(7), t0);
        for s in 0..20 {
            p.heard_udp(addr(1, 51820), t0 + secs(s));
            assert_eq!(
                p.destination(t0 + secs(s) + Duration::from_millis(900)),
                Some(Destination::Udp(addr(1, 51820)))
            );
        }
        assert_eq!(p.counters().fallbacks, 0);
    }

    #[test]
    fn a_direct_path_in_use_is_kept_warm_by_keepalives() {
        let t0 = Instant::now();
        let mut p = Path::new(&[addr(1, 51820)], Some(7), t0);
        p.used(t0);
        p.heard_udp(addr(1, 51820), t0);
        assert_eq!(p.poll_probe(t0), Probe::Direct(addr(1, 51820)));
        let half = DIRECT_KEEPALIVE / 2;
        assert_eq!(p.poll_probe(t0 + half), Probe::None);
        let next = t0 + DIRECT_KEEPALIVE;
        p.heard_udp(addr(1, 51820), next);
        assert_eq!(p.poll_probe(next), Probe::Direct(addr(1, 51820)));
    }

    #[test]
    fn probes_are_paced_while_in_use_and_back_off_when_idle() {
        let t0 = Instant::now();
        let mut p = Path::new(&[addr(1, 51820)], Some(7), t0);
        p.used(t0);
        // In use: one round per second, polled every 250 ms for 10 s.
        let mut rounds = 0;
        for i in 0..40u32 {
            let now = t0 + Duration::from_millis(250) * i;
            p.used(now);
            if p.poll_probe(now) == Probe::Candidates {
                rounds += 1;
            }
        }
        assert_eq!(rounds, 10);
        // Idle for ten minutes: the gaps double up to the idle interval.
        let idle0 = t0 + secs(10) + IN_USE;
        let mut times = Vec::new();
        for i in 0..(600 * 4u32) {
            let now = idle0 + Duration::from_millis(250) * i;
            if p.poll_probe(now) == Probe::Candidates {
                times.push(now);
            }
        }
        let gaps: Vec<u64> = times.windows(2).map(|w| (w[1] - w[0]).as_secs()).collect();
        assert_eq!(&gaps[..5], &[2, 4, 8, 16, 30]);
        assert!(gaps[5..].iter().all(|g| *g == 30), "{gaps:?}");
        // Used again: back to fast probing at once.
        let back = idle0 + secs(600);
        p.used(back);
        assert_eq!(p.poll_probe(back), Probe::Candidates);
        assert_eq!(p.poll_probe(back + secs(1)), Probe::Candidates);
    }

    #[test]
    fn map_updates_make_probes_due_but_never_beyond_the_budget() {
        let t0 = Instant::now();
        let mut p = Path::new(&[addr(1, 51820)], Some(7), t0);
        let mut rounds = 0;
        // A hostile or flapping controller: a new candidate set every 10 ms for 10 s.
        for i in 0..1000u32 {
            let now = t0 + Duration::from_millis(10) * i;
            p.update(&[addr(1, 51820 + (i % 2) as u16)], Some(7), now);
            if p.poll_probe(now) == Probe::Candidates {
                rounds += 1;
            }
        }
        // The burst, then one per interval.
        assert!(rounds <= PROBE_BURST as usize + 10, "{rounds} rounds");
        assert!(rounds >= 10, "{rounds} rounds");
    }

    #[test]
    fn an_unchanged_map_does_not_restart_probing() {
        let t0 = Instant::now();
        let mut p = Path::new(&[addr(1, 51820)], Some(7), t0);
        assert_eq!(p.poll_probe(t0), Probe::Candidates);
        p.update(&[addr(1, 51820)], Some(7), t0);
        assert_eq!(p.poll_probe(t0), Probe::None);
        p.update(&[addr(1, 51820)], Some(8), t0);
        assert_eq!(
            p.poll_probe(t0),
            Probe::Candidates,
            "a new relay id is a change"
        );
    }

    #[test]
    fn without_a_relay_the_last_authenticated_address_stays_the_destination() {
        let t0 = Instant::now();
        let mut p = Path::new(&[addr(1, 51820)], None, t0);
        assert_eq!(p.destination(t0), Some(Destination::Udp(addr(1, 51820))));
        // The peer roamed: its authenticated packets come from elsewhere.
        p.heard_udp(addr(9, 4000), t0);
        let later = t0 + secs(600);
        assert_eq!(p.destination(later), Some(Destination::Udp(addr(9, 4000))));
        // And a probe round covers both the candidate and the stale address.
        let targets: Vec<_> = p.probe_targets().collect();
        assert_eq!(targets, vec![addr(1, 51820), addr(9, 4000)]);
    }

    #[test]
    fn while_the_relay_link_is_down_data_tries_the_candidates() {
        let t0 = Instant::now();
        let mut p = Path::new(&[addr(1, 51820)], Some(7), t0);
        p.set_relay_up(false);
        assert_eq!(p.destination(t0), Some(Destination::Udp(addr(1, 51820))));
        assert_eq!(p.poll_probe(t0), Probe::Candidates, "still probing");
        p.set_relay_up(true);
        assert_eq!(p.destination(t0), Some(Destination::Relay(7)));
    }

    #[test]
    fn nothing_known_means_no_destination_and_no_probes() {
        let t0 = Instant::now();
        let mut p = Path::new(&[], None, t0);
        assert_eq!(p.destination(t0), None);
        assert_eq!(p.poll_probe(t0), Probe::None);
        let mut r = Path::new(&[], Some(3), t0);
        assert_eq!(r.destination(t0), Some(Destination::Relay(3)));
        assert_eq!(r.poll_probe(t0), Probe::None);
    }

    #[test]
    fn candidates_are_deduplicated_and_bounded() {
        let t0 = Instant::now();
        let many: Vec<SocketAddr> = (0..40).map(|i| addr(1, 1000 + i % 20)).collect();
        let p = Path::new(&many, None, t0);
        assert_eq!(p.probe_targets().count(), MAX_CANDIDATES);
        assert_eq!(p.probe_target(0), Some(addr(1, 1000)));
        assert_eq!(p.probe_target(MAX_CANDIDATES), None);
    }

    #[test]
    fn time_going_backwards_neither_panics_nor_makes_a_path_fresh_forever() {
        let t0 = Instant::now() + secs(100);
        let mut p = Path::new(&[addr(1, 51820)], Some(7), t0);
        p.heard_udp(addr(1, 51820), t0);
        let earlier = t0 - secs(50);
        let _ = p.destination(earlier);
        let _ = p.poll_probe(earlier);
        p.used(earlier);
        assert_eq!(
            p.destination(t0 + DIRECT_TIMEOUT),
            Some(Destination::Relay(7))
        );
    }
}
