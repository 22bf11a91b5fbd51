//! Endpoint discovery: the addresses peers may reach this node's WireGuard
//! socket at. Pure: no I/O, no clock, no randomness of its own — the data
//! plane passes `now`, fresh transaction ids and the datagrams it received,
//! and sends the Binding requests this returns from its own socket, so the
//! reflexive address learned is the NAT mapping WireGuard itself uses.
//!
//! Candidates come in two kinds, in this order:
//! - local: the node's interface addresses with the data-plane port (for
//!   peers on the same LAN, so they need no hairpinning); the first one is
//!   the address the agent already reports (the route toward the
//!   controller) and is never cut by the bound;
//! - reflexive: what each STUN server saw as the source of a Binding
//!   request, refreshed every [`STUN_INTERVAL`] and forgotten after
//!   [`REFLEXIVE_TTL`] without an answer.
//!
//! Loopback, link-local, unspecified, multicast and broadcast addresses are
//! never candidates: the controller refuses a report that holds one.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ztmesh_proto::control::Relay;
use ztmesh_proto::stun;

/// How often each STUN server is asked again (NAT mappings for UDP live at
/// least 30 s on common routers; the request also refreshes the mapping).
pub const STUN_INTERVAL: Duration = Duration::from_secs(25);
/// How long an unanswered Binding request waits before it is sent again.
pub const STUN_RETRY: Duration = Duration::from_secs(3);
/// Binding requests per server and round (the first and its retransmissions).
pub const STUN_ATTEMPTS: u32 = 3;
/// How long a reflexive address stays a candidate without a fresh answer:
/// three rounds, so one lost round does not withdraw it.
pub const REFLEXIVE_TTL: Duration = Duration::from_secs(80);
/// Most candidates reported (the controller accepts 16).
pub const MAX_CANDIDATES: usize = 8;
/// Most reflexive candidates among them (distinct NAT mappings).
pub const MAX_REFLEXIVE: usize = 3;
/// Most STUN servers asked; the rest of a longer list is ignored.
pub const MAX_SERVERS: usize = 8;

/// One STUN server and what it told us.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Server {
    addr: SocketAddr,
    /// When the next round starts (when not waiting for an answer).
    due: Instant,
    pending: Option<Pending>,
    /// The last reflexive address it reported, and when.
    mapped: Option<(SocketAddr, Instant)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pending {
    txid: [u8; 12],
    sent: Instant,
    attempt: u32,
}

/// What became of a STUN datagram handed to [`Discovery::handle_response`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    /// A server's answer; `changed` when its reflexive address is new.
    Answer { changed: bool },
    /// Not an answer to an outstanding request of a current server (wrong
    /// source, unknown or stale transaction id): dropped and counted.
    Unsolicited,
    /// Not a usable Binding response: dropped and counted.
    Malformed(stun::StunError),
}

/// The endpoint candidates of one data-plane socket.
#[derive(Debug, Clone)]
pub struct Discovery {
    port: u16,
    local: Vec<IpAddr>,
    servers: Vec<Server>,
    unsolicited: u64,
    malformed: u64,
}

impl Discovery {
    /// Discovery for the data-plane socket bound to `port`, with no local
    /// addresses and no servers yet.
    pub fn new(port: u16) -> Self {
        Self {
            port,
            local: Vec::new(),
            servers: Vec::new(),
            unsolicited: 0,
            malformed: 0,
        }
    }

    /// Sets the local interface addresses, most preferred first; returns
    /// whether the candidates changed. Unusable addresses are skipped and
    /// duplicates dropped.
    pub fn set_local(&mut self, addrs: &[IpAddr]) -> bool {
        let mut local: Vec<IpAddr> = Vec::new();
        for ip in addrs {
            if usable(*ip) && !local.contains(ip) {
                local.push(*ip);
            }
        }
        let changed = local != self.local;
        self.local = local;
        changed
    }

    /// Sets the STUN servers (at most [`MAX_SERVERS`], in the order given).
    /// A changed set starts a round at `now` for every server; servers that
    /// stay keep their reflexive address until a new answer replaces it.
    /// Returns whether the candidates changed (a removed server's address
    /// goes with it).
    pub fn set_servers(&mut self, servers: &[SocketAddr], now: Instant) -> bool {
        let mut wanted: Vec<SocketAddr> = Vec::new();
        for s in servers {
            if !wanted.contains(s) && wanted.len() < MAX_SERVERS {
                wanted.push(*s);
            }
        }
        let current: Vec<SocketAddr> = self.servers.iter().map(|s| s.addr).collect();
        if wanted == current {
            return false;
        }
        let before = self.candidates();
        let mut old = std::mem::take(&mut self.servers);
        self.servers = wanted
            .into_iter()
            .map(|addr| {
                let mapped = old
                    .iter_mut()
                    .find(|s| s.addr == addr)
                    .and_then(|s| s.mapped.take());
                Server {
                    addr,
                    due: now,
                    pending: None,
                    mapped,
                }
            })
            .collect();
        self.candidates() != before
    }

    /// When [`Discovery::poll_request`] or [`Discovery::handle_timeout`]
    /// next has work: a round due, a retransmission, an address to expire.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.servers
            .iter()
            .flat_map(|s| {
                let send = match s.pending {
                    Some(p) => p.sent + STUN_RETRY,
                    None => s.due,
                };
                let expire = s.mapped.map(|(_, seen)| seen + REFLEXIVE_TTL);
                std::iter::once(send).chain(expire)
            })
            .min()
    }

    /// The next Binding request to send at `now`, if one is due: its
    /// destination and bytes. `txid` is a fresh random transaction id (used
    /// only when a new round starts; retransmissions repeat their id).
    /// Call until it returns `None`.
    pub fn poll_request(
        &mut self,
        now: Instant,
        txid: [u8; 12],
    ) -> Option<(SocketAddr, [u8; stun::HEADER_LEN])> {
        for s in &mut self.servers {
            match s.pending {
                Some(p) if p.sent + STUN_RETRY <= now => {
                    if p.attempt < STUN_ATTEMPTS {
                        s.pending = Some(Pending {
                            sent: now,
                            attempt: p.attempt + 1,
                            ..p
                        });
                        return Some((s.addr, stun::binding_request(p.txid)));
                    }
                    // No answer this round; the next one starts on schedule.
                    s.pending = None;
                }
                Some(_) => {}
                None if s.due <= now => {
                    s.due = now + STUN_INTERVAL;
                    s.pending = Some(Pending {
                        txid,
                        sent: now,
                        attempt: 1,
                    });
                    return Some((s.addr, stun::binding_request(txid)));
                }
                None => {}
            }
        }
        None
    }

    /// Takes a datagram that [`stun::is_stun`] accepted, from `from`.
    pub fn handle_response(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) -> Response {
        let (txid, mapped) = match stun::parse_binding_response(datagram) {
            Ok(r) => r,
            Err(e) => {
                self.malformed = self.malformed.saturating_add(1);
                return Response::Malformed(e);
            }
        };
        let server = self
            .servers
            .iter_mut()
            .find(|s| s.addr == from && s.pending.is_some_and(|p| p.txid == txid));
        let Some(server) = server else {
            self.unsolicited = self.unsolicited.saturating_add(1);
            return Response::Unsolicited;
        };
        let changed = server.mapped.map(|(a, _)| a) != Some(mapped);
        server.pending = None;
        server.mapped = Some((mapped, now));
        Response::Answer { changed }
    }

    /// Forgets reflexive addresses not confirmed for [`REFLEXIVE_TTL`];
    /// returns whether the candidates changed.
    pub fn handle_timeout(&mut self, now: Instant) -> bool {
        let before = self.candidates();
        for s in &mut self.servers {
            if s.mapped
                .is_some_and(|(_, seen)| seen + REFLEXIVE_TTL <= now)
            {
                s.mapped = None;
            }
        }
        self.candidates() != before
    }

    /// The candidates: local addresses first (in the order given), then
    /// reflexive ones (in server order), deduplicated, at most
    /// [`MAX_CANDIDATES`] of which at most [`MAX_REFLEXIVE`] reflexive.
    pub fn candidates(&self) -> Vec<SocketAddr> {
        let local: Vec<SocketAddr> = self
            .local
            .iter()
            .map(|ip| SocketAddr::new(*ip, self.port))
            .collect();
        let mut reflexive: Vec<SocketAddr> = Vec::new();
        for (addr, _) in self.servers.iter().filter_map(|s| s.mapped) {
            let fits = reflexive.len() < MAX_REFLEXIVE;
            if fits && usable_endpoint(addr) && !local.contains(&addr) && !reflexive.contains(&addr)
            {
                reflexive.push(addr);
            }
        }
        let room = MAX_CANDIDATES - reflexive.len();
        local.into_iter().take(room).chain(reflexive).collect()
    }

    /// Each server and the reflexive address it last reported, for status.
    pub fn reflexive(&self) -> Vec<(SocketAddr, Option<SocketAddr>)> {
        self.servers
            .iter()
            .map(|s| (s.addr, s.mapped.map(|(a, _)| a)))
            .collect()
    }

    /// Dropped STUN datagrams: (unsolicited, malformed).
    pub fn dropped(&self) -> (u64, u64) {
        (self.unsolicited, self.malformed)
    }
}

/// Each STUN address the netmap's relays offer, with the relay's name, in
/// map order (an entry that is not `ip:port` is skipped: the controller
/// checked them, and a signed map is trusted no further than that).
pub fn relay_stun_servers(relays: &[Relay]) -> Vec<(SocketAddr, String)> {
    relays
        .iter()
        .flat_map(|r| {
            r.stun_addrs
                .iter()
                .filter_map(|a| a.parse().ok())
                .map(|a| (a, r.name.clone()))
        })
        .collect()
}

/// The STUN servers the data plane asks: `configured` (`ztmesh daemon
/// --stun`) first, then the relays', deduplicated, at most [`MAX_SERVERS`].
pub fn stun_servers(configured: &[SocketAddr], relays: &[Relay]) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    let from_relays = relay_stun_servers(relays).into_iter().map(|(a, _)| a);
    for a in configured.iter().copied().chain(from_relays) {
        if out.len() < MAX_SERVERS && !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

/// `candidates` with `primary` (the endpoint the agent reports today) first,
/// so it stays among the candidates whatever else they hold; bounded by
/// [`MAX_CANDIDATES`].
pub fn with_primary(primary: Option<SocketAddr>, candidates: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = primary
        .filter(|p| usable_endpoint(*p))
        .into_iter()
        .collect();
    for c in candidates {
        if out.len() == MAX_CANDIDATES {
            break;
        }
        if !out.contains(c) {
            out.push(*c);
        }
    }
    out
}

/// Least time between two endpoint reports of one session (the controller
/// refills a node's `ReportEndpoints` allowance every 6 s, with a burst of 10).
pub const REPORT_MIN_INTERVAL_MS: i64 = 5_000;

/// Decides when the agent reports its candidates to the controller: when
/// they differ from the last report, at most once per
/// [`REPORT_MIN_INTERVAL_MS`], never an empty list.
#[derive(Debug, Default, Clone)]
pub struct EndpointReporter {
    last: Option<Vec<SocketAddr>>,
    last_ms: Option<i64>,
}

impl EndpointReporter {
    /// The list to report at `now_ms`, if a report is due; the attempt is
    /// recorded (call [`EndpointReporter::failed`] if it does not go through).
    pub fn poll(&mut self, candidates: &[SocketAddr], now_ms: i64) -> Option<Vec<SocketAddr>> {
        if candidates.is_empty() || self.last.as_deref() == Some(candidates) {
            return None;
        }
        // A clock stepped backwards must not silence reports until it catches up.
        let waited = self
            .last_ms
            .is_none_or(|t| now_ms < t || now_ms - t >= REPORT_MIN_INTERVAL_MS);
        if !waited {
            return None;
        }
        self.last = Some(candidates.to_vec());
        self.last_ms = Some(now_ms);
        Some(candidates.to_vec())
    }

    /// The last report failed: report again once the interval has passed.
    pub fn failed(&mut self) {
        self.last = None;
    }
}

/// Whether peers elsewhere could send to `ip` (the controller's rules).
fn usable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            !(a.is_unspecified()
                || a.octets()[0] == 0
                || a.is_loopback()
                || a.is_link_local()
                || a.is_multicast()
                || a.is_broadcast())
        }
        IpAddr::V6(a) => {
            !(a.is_unspecified()
                || a.is_loopback()
                || a.is_multicast()
                || a.segments()[0] & 0xffc0 == 0xfe80)
        }
    }
}

fn usable_endpoint(sa: SocketAddr) -> bool {
    sa.port() != 0 && usable(sa.ip())
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    const PORT: u16 = 41641;

    fn ip4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    fn sa(ip: IpAddr, port: u16) -> SocketAddr {
        SocketAddr::new(ip, port)
    }

    fn server(n: u8) -> SocketAddr {
        sa(ip4(198, 18, 0, n), 3478)
    }

    fn txid(n: u8) -> [u8; 12] {
        [n; 12]
    }

    /// Plays the STUN server: answers `request` as seen from `mapped`.
    fn answer(request: &[u8], mapped: SocketAddr) -> Vec<u8> {
        stun::binding_response(request, mapped).expect("a binding request")
    }

    /// Sends what is due and answers every request from `mapped`.
    fn round(d: &mut Discovery, now: Instant, mapped: SocketAddr) -> usize {
        let mut reqs = Vec::new();
        let mut n = 0u8;
        while let Some(r) = d.poll_request(now, txid(n)) {
            reqs.push(r);
            n += 1;
            assert!(n < 100, "poll_request never stops");
        }
        for (to, req) in &reqs {
            let resp = answer(req, mapped);
            assert!(matches!(
                d.handle_response(now, *to, &resp),
                Response::Answer { .. }
            ));
        }
        reqs.len()
    }

    #[test]
    fn local_candidates_skip_loopback_link_local_and_duplicates() {
        let mut d = Discovery::new(PORT);
        let v6: IpAddr = "fd00:18::2".parse().unwrap();
        let changed = d.set_local(&[
            ip4(198, 18, 0, 2),
            ip4(127, 0, 0, 1),
            ip4(169, 254, 1, 1),
            "fe80::1".parse().unwrap(),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip4(0, 0, 0, 0),
            ip4(224, 0, 0, 1),
            ip4(198, 18, 0, 2),
            v6,
        ]);
        assert!(changed);
        assert_eq!(
            d.candidates(),
            vec![sa(ip4(198, 18, 0, 2), PORT), sa(v6, PORT)]
        );
        assert!(!d.set_local(&[ip4(198, 18, 0, 2), v6]), "same set");
    }

    #[test]
    fn reflexive_address_follows_local_ones_and_dedups() {
        let now = Instant::now();
        let mut d = Discovery::new(PORT);
        d.set_local(&[ip4(198, 19, 1, 2)]);
        assert!(
            !d.set_servers(&[server(1), server(2)], now),
            "no address known yet"
        );
        let outside = sa(ip4(198, 18, 0, 2), 40_000);
        assert_eq!(round(&mut d, now, outside), 2);
        assert_eq!(
            d.candidates(),
            vec![sa(ip4(198, 19, 1, 2), PORT), outside],
            "both servers saw the same mapping: one candidate"
        );
        assert_eq!(
            d.reflexive(),
            vec![(server(1), Some(outside)), (server(2), Some(outside))]
        );
    }

    #[test]
    fn a_node_without_nat_gets_no_duplicate_reflexive_candidate() {
        let now = Instant::now();
        let mut d = Discovery::new(PORT);
        d.set_local(&[ip4(198, 18, 0, 5)]);
        d.set_servers(&[server(1)], now);
        round(&mut d, now, sa(ip4(198, 18, 0, 5), PORT));
        assert_eq!(d.candidates(), vec![sa(ip4(198, 18, 0, 5), PORT)]);
    }

    #[test]
    fn requests_are_sent_at_once_then_every_interval() {
        let t0 = Instant::now();
        let mut d = Discovery::new(PORT);
        assert_eq!(d.poll_timeout(), None);
        d.set_servers(&[server(1)], t0);
        assert_eq!(d.poll_timeout(), Some(t0));
        let mapped = sa(ip4(198, 18, 0, 9), 1234);
        assert_eq!(round(&mut d, t0, mapped), 1);
        assert_eq!(round(&mut d, t0, mapped), 0, "nothing due right after");
        // Next round on schedule (the address expires later than that).
        assert_eq!(d.poll_timeout(), Some(t0 + STUN_INTERVAL));
        let t1 = t0 + STUN_INTERVAL - Duration::from_millis(1);
        assert!(d.poll_request(t1, txid(9)).is_none());
        assert_eq!(round(&mut d, t0 + STUN_INTERVAL, mapped), 1);
    }

    #[test]
    fn unanswered_requests_are_retransmitted_with_the_same_txid_then_given_up() {
        let t0 = Instant::now();
        let mut d = Discovery::new(PORT);
        d.set_servers(&[server(1)], t0);
        let (_, first) = d.poll_request(t0, txid(1)).unwrap();
        assert!(d.poll_request(t0, txid(2)).is_none());
        assert_eq!(d.poll_timeout(), Some(t0 + STUN_RETRY));
        let mut t = t0;
        for _ in 1..STUN_ATTEMPTS {
            t += STUN_RETRY;
            let (to, again) = d.poll_request(t, txid(7)).unwrap();
            assert_eq!(to, server(1));
            assert_eq!(again, first, "a retransmission repeats the request");
        }
        t += STUN_RETRY;
        assert!(d.poll_request(t, txid(8)).is_none(), "round given up");
        // The next round starts on schedule with a fresh id.
        let (_, next) = d.poll_request(t0 + STUN_INTERVAL, txid(3)).unwrap();
        assert_eq!(next[8..20], txid(3));
        // A late answer to the abandoned round is not accepted.
        let late = answer(&first, sa(ip4(198, 18, 0, 9), 1));
        assert_eq!(
            d.handle_response(t0 + STUN_INTERVAL, server(1), &late),
            Response::Unsolicited
        );
    }

    #[test]
    fn answers_from_the_wrong_source_or_with_a_wrong_txid_are_unsolicited() {
        let t0 = Instant::now();
        let mut d = Discovery::new(PORT);
        d.set_servers(&[server(1), server(2)], t0);
        let (_, req1) = d.poll_request(t0, txid(1)).unwrap();
        let (_, _req2) = d.poll_request(t0, txid(2)).unwrap();
        let mapped = sa(ip4(198, 18, 0, 66), 6666);
        // server 1's id, but from server 2; from a stranger; an unknown id.
        let r1 = answer(&req1, mapped);
        assert_eq!(d.handle_response(t0, server(2), &r1), Response::Unsolicited);
        assert_eq!(d.handle_response(t0, server(3), &r1), Response::Unsolicited);
        let forged = answer(&stun::binding_request(txid(9)), mapped);
        assert_eq!(
            d.handle_response(t0, server(1), &forged),
            Response::Unsolicited
        );
        assert_eq!(d.dropped(), (3, 0));
        assert!(d.candidates().is_empty());
        // A request is not a response; a replayed answer is unsolicited.
        assert!(matches!(
            d.handle_response(t0, server(1), &req1),
            Response::Malformed(stun::StunError::NotBindingResponse)
        ));
        assert_eq!(
            d.handle_response(t0, server(1), &r1),
            Response::Answer { changed: true }
        );
        assert_eq!(d.handle_response(t0, server(1), &r1), Response::Unsolicited);
        assert_eq!(d.dropped(), (4, 1));
        assert_eq!(d.candidates(), vec![mapped]);
    }

    #[test]
    fn stale_reflexive_addresses_expire() {
        let t0 = Instant::now();
        let mut d = Discovery::new(PORT);
        d.set_servers(&[server(1)], t0);
        let mapped = sa(ip4(198, 18, 0, 2), 40_000);
        round(&mut d, t0, mapped);
        assert_eq!(d.candidates(), vec![mapped]);
        // The server stops answering: requests go out, nothing comes back.
        let mut t = t0;
        while t < t0 + REFLEXIVE_TTL {
            assert!(!d.handle_timeout(t));
            while d.poll_request(t, txid(5)).is_some() {}
            t += Duration::from_secs(1);
        }
        assert_eq!(d.poll_timeout().map(|x| x <= t), Some(true));
        assert!(d.handle_timeout(t0 + REFLEXIVE_TTL));
        assert!(d.candidates().is_empty());
    }

    #[test]
    fn a_new_mapping_replaces_the_old_one() {
        let t0 = Instant::now();
        let mut d = Discovery::new(PORT);
        d.set_servers(&[server(1)], t0);
        let (_, req) = d.poll_request(t0, txid(1)).unwrap();
        let a = sa(ip4(198, 18, 0, 2), 40_000);
        assert_eq!(
            d.handle_response(t0, server(1), &answer(&req, a)),
            Response::Answer { changed: true }
        );
        let t1 = t0 + STUN_INTERVAL;
        let (_, req) = d.poll_request(t1, txid(2)).unwrap();
        assert_eq!(
            d.handle_response(t1, server(1), &answer(&req, a)),
            Response::Answer { changed: false }
        );
        let t2 = t1 + STUN_INTERVAL;
        let (_, req) = d.poll_request(t2, txid(3)).unwrap();
        let b = sa(ip4(198, 18, 0, 2), 40_001);
        assert_eq!(
            d.handle_response(t2, server(1), &answer(&req, b)),
            Response::Answer { changed: true }
        );
        assert_eq!(d.candidates(), vec![b]);
    }

    #[test]
    fn changing_the_server_set_starts_a_round_and_drops_removed_servers() {
        let t0 = Instant::now();
        let mut d = Discovery::new(PORT);
        d.set_servers(&[server(1), server(2)], t0);
        round(&mut d, t0, sa(ip4(198, 18, 0, 2), 1000));
        // Two servers saw different mappings (endpoint-dependent NAT).
        let t1 = t0 + Duration::from_secs(1);
        assert!(!d.set_servers(&[server(1), server(2)], t1), "same set");
        assert!(d.poll_request(t1, txid(0)).is_none());
        d.servers[1].mapped = Some((sa(ip4(198, 18, 0, 2), 2000), t0));
        assert_eq!(d.candidates().len(), 2);
        assert!(d.set_servers(&[server(2), server(3)], t1), "server 1 left");
        assert_eq!(d.candidates(), vec![sa(ip4(198, 18, 0, 2), 2000)]);
        let mut sent = Vec::new();
        while let Some((to, _)) = d.poll_request(t1, txid(4)) {
            sent.push(to);
        }
        assert_eq!(sent, vec![server(2), server(3)]);
        assert!(d.set_servers(&[], t1));
        assert!(d.candidates().is_empty());
        assert_eq!(d.poll_timeout(), None);
    }

    #[test]
    fn candidates_are_bounded_with_room_for_reflexive_ones() {
        let t0 = Instant::now();
        let mut d = Discovery::new(PORT);
        let many: Vec<IpAddr> = (1..=20).map(|i| ip4(198, 19, 0, i)).collect();
        d.set_local(&many);
        assert_eq!(d.candidates().len(), MAX_CANDIDATES);
        assert_eq!(
            d.candidates()[0],
            sa(ip4(198, 19, 0, 1), PORT),
            "first kept"
        );
        let servers: Vec<SocketAddr> = (1..=20).map(server).collect();
        d.set_servers(&servers, t0);
        assert_eq!(d.servers.len(), MAX_SERVERS);
        let mut n = 0;
        let mut reqs = Vec::new();
        while let Some(r) = d.poll_request(t0, txid(n)) {
            reqs.push(r);
            n += 1;
        }
        assert_eq!(reqs.len(), MAX_SERVERS);
        for (i, (to, req)) in reqs.iter().enumerate() {
            let port = 50_000 + u16::try_from(i).unwrap();
            d.handle_response(t0, *to, &answer(req, sa(ip4(198, 18, 0, 2), port)));
        }
        let c = d.candidates();
        assert_eq!(c.len(), MAX_CANDIDATES);
        assert_eq!(c[0], sa(ip4(198, 19, 0, 1), PORT));
        assert_eq!(
            c[MAX_CANDIDATES - MAX_REFLEXIVE..],
            [
                sa(ip4(198, 18, 0, 2), 50_000),
                sa(ip4(198, 18, 0, 2), 50_001),
                sa(ip4(198, 18, 0, 2), 50_002)
            ]
        );
    }

    #[test]
    fn the_reported_endpoint_always_stays_first() {
        let primary = sa(ip4(198, 18, 0, 7), PORT);
        let others: Vec<SocketAddr> = (1..=10).map(|i| sa(ip4(198, 19, 0, i), PORT)).collect();
        let merged = with_primary(Some(primary), &others);
        assert_eq!(merged.len(), MAX_CANDIDATES);
        assert_eq!(merged[0], primary);
        let merged = with_primary(Some(others[3]), &others);
        assert_eq!(merged[0], others[3]);
        assert_eq!(merged.iter().filter(|c| **c == others[3]).count(), 1);
        assert_eq!(with_primary(None, &others[..2]), others[..2].to_vec());
        // A loopback primary would make the controller refuse the report.
        let lo = sa(ip4(127, 0, 0, 1), PORT);
        assert_eq!(with_primary(Some(lo), &others[..1]), others[..1].to_vec());
    }

    #[test]
    fn malformed_stun_is_counted_not_fatal() {
        let mut d = Discovery::new(PORT);
        let t0 = Instant::now();
        d.set_servers(&[server(1)], t0);
        let (_, req) = d.poll_request(t0, txid(1)).unwrap();
        let mut resp = answer(&req, sa(ip4(198, 18, 0, 2), 1));
        resp[HEADER_ATTR_FAMILY] = 9;
        assert_eq!(
            d.handle_response(t0, server(1), &resp),
            Response::Malformed(stun::StunError::BadAddress)
        );
        assert_eq!(d.dropped(), (0, 1));
    }

    #[test]
    fn reports_go_out_on_change_at_most_every_five_seconds() {
        let a = vec![sa(ip4(198, 18, 0, 2), PORT)];
        let b = vec![sa(ip4(198, 18, 0, 2), PORT), sa(ip4(198, 18, 0, 9), 40_000)];
        let mut r = EndpointReporter::default();
        assert_eq!(r.poll(&[], 0), None, "nothing to say");
        assert_eq!(r.poll(&a, 1_000), Some(a.clone()));
        assert_eq!(r.poll(&a, 60_000), None, "unchanged");
        assert_eq!(r.poll(&b, 60_001), Some(b.clone()));
        assert_eq!(r.poll(&a, 60_002), None, "too soon");
        assert_eq!(r.poll(&a, 65_000), None, "still too soon");
        assert_eq!(r.poll(&a, 65_001), Some(a.clone()));
        // A failed report is retried after the interval.
        r.failed();
        assert_eq!(r.poll(&a, 66_000), None);
        assert_eq!(r.poll(&a, 70_001), Some(a.clone()));
        // The clock steps back an hour: the next change is not held back.
        assert_eq!(r.poll(&b, 70_001 - 3_600_000), Some(b));
    }

    #[test]
    fn stun_servers_come_from_the_flag_then_the_netmap_relays() {
        let relay = |name: &str, stun: &[&str]| Relay {
            name: name.into(),
            quic_addr: "198.18.0.9:3340".into(),
            tcp_addr: "198.18.0.9:443".into(),
            stun_addrs: stun.iter().map(|s| (*s).to_string()).collect(),
            cert_sha256: vec![0; 32],
        };
        let relays = [
            relay("relay1", &["198.18.0.9:3478", "198.18.0.9:3479"]),
            relay("relay2", &["not an address", "[fd00:18::9]:3478"]),
            relay("relay3", &[]),
        ];
        let named = relay_stun_servers(&relays);
        assert_eq!(
            named,
            vec![
                (server(9), "relay1".to_string()),
                (sa(ip4(198, 18, 0, 9), 3479), "relay1".to_string()),
                ("[fd00:18::9]:3478".parse().unwrap(), "relay2".to_string()),
            ]
        );
        let all = stun_servers(&[server(1), server(9)], &relays);
        assert_eq!(all[0], server(1), "configured first");
        assert_eq!(all.len(), 4, "deduplicated: {all:?}");
        assert_eq!(stun_servers(&[], &[]), Vec::<SocketAddr>::new());
        let many: Vec<SocketAddr> = (1..=20).map(server).collect();
        assert_eq!(stun_servers(&many, &relays).len(), MAX_SERVERS);
    }

    /// Offset of the address family byte in a `binding_response`.
    const HEADER_ATTR_FAMILY: usize = stun::HEADER_LEN + 5;
}
