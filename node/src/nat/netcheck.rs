//! `ztmesh netcheck`'s probe: Binding requests to a few STUN servers from
//! one fresh UDP socket, and the report built from the answers. Pure: the
//! CLI shell owns the socket and the clock, and passes the RNG in.
//!
//! Every attempt carries its own transaction id, so a round-trip time is
//! always measured against the attempt that was answered (an answer to a
//! retransmission is never timed from the first send).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand_core::RngCore;
use serde::Serialize;
use ztmesh_proto::stun;

/// How long the whole probe may take.
pub const NETCHECK_TIMEOUT: Duration = Duration::from_secs(3);
/// Time between attempts to one server that has not answered.
pub const NETCHECK_RETRY: Duration = Duration::from_millis(750);
/// Attempts per server (the first and its retransmissions).
pub const NETCHECK_ATTEMPTS: usize = 3;
/// Most servers probed at once.
pub const NETCHECK_MAX_SERVERS: usize = 16;

/// The probe of a set of STUN servers, driven by the shell.
#[derive(Debug)]
pub struct Netcheck {
    start: Instant,
    servers: Vec<Target>,
}

#[derive(Debug)]
struct Target {
    addr: SocketAddr,
    relay: Option<String>,
    /// (transaction id, sent at) per attempt.
    attempts: Vec<([u8; 12], Instant)>,
    answer: Option<(SocketAddr, Duration)>,
}

/// One server's line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerReport {
    /// The STUN server.
    pub server: SocketAddr,
    /// The relay that runs it, when it came from the netmap.
    pub relay: Option<String>,
    /// The address it saw the probe come from (`None`: no answer).
    pub reflexive: Option<SocketAddr>,
    /// Round-trip time of the answered attempt, in microseconds.
    pub rtt_us: Option<u64>,
    /// Binding requests sent to it.
    pub attempts: usize,
}

/// What `ztmesh netcheck` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Whether any server answered: UDP leaves this network and comes back.
    pub udp: bool,
    /// The distinct reflexive addresses, in server order.
    pub reflexive: Vec<SocketAddr>,
    /// Whether servers saw different addresses (endpoint-dependent mapping,
    /// "symmetric NAT"); `None` when fewer than two servers of one address
    /// family answered, so it cannot be told.
    pub mapping_varies: Option<bool>,
    /// Per server, in the order given.
    pub servers: Vec<ServerReport>,
}

impl Netcheck {
    /// A probe of `servers` (deduplicated, at most
    /// [`NETCHECK_MAX_SERVERS`]) starting at `start`.
    pub fn new(servers: &[SocketAddr], start: Instant) -> Self {
        let mut targets: Vec<Target> = Vec::new();
        for s in servers {
            if targets.len() < NETCHECK_MAX_SERVERS && !targets.iter().any(|t| t.addr == *s) {
                targets.push(Target {
                    addr: *s,
                    relay: None,
                    attempts: Vec::new(),
                    answer: None,
                });
            }
        }
        Self {
            start,
            servers: targets,
        }
    }

    /// Names the relay that runs `server` (the report shows it: the round
    /// trip to a relay's STUN port is the relay's latency).
    pub fn label(&mut self, server: SocketAddr, relay: &str) {
        if let Some(t) = self.servers.iter_mut().find(|t| t.addr == server) {
            t.relay = Some(relay.to_string());
        }
    }

    /// The next request to send at `now`, if one is due; the transaction id
    /// is drawn from `rng`. Call until it returns `None`.
    pub fn poll_transmit(
        &mut self,
        now: Instant,
        rng: &mut impl RngCore,
    ) -> Option<(SocketAddr, [u8; stun::HEADER_LEN])> {
        if self.is_done(now) {
            return None;
        }
        for t in &mut self.servers {
            if t.answer.is_some() || t.attempts.len() >= NETCHECK_ATTEMPTS {
                continue;
            }
            let due = t
                .attempts
                .last()
                .map_or(self.start, |(_, sent)| *sent + NETCHECK_RETRY);
            if due <= now {
                let mut txid = [0u8; 12];
                rng.fill_bytes(&mut txid);
                t.attempts.push((txid, now));
                return Some((t.addr, stun::binding_request(txid)));
            }
        }
        None
    }

    /// When the shell should call [`Netcheck::poll_transmit`] again, or give up.
    pub fn poll_timeout(&self) -> Instant {
        let deadline = self.start + NETCHECK_TIMEOUT;
        self.servers
            .iter()
            .filter(|t| t.answer.is_none() && t.attempts.len() < NETCHECK_ATTEMPTS)
            .map(|t| {
                t.attempts
                    .last()
                    .map_or(self.start, |(_, sent)| *sent + NETCHECK_RETRY)
            })
            .min()
            .map_or(deadline, |t| t.min(deadline))
    }

    /// Takes a datagram received at `now` from `from`; returns whether it
    /// answered one of our requests (anything else is ignored).
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) -> bool {
        let Ok((txid, mapped)) = stun::parse_binding_response(datagram) else {
            return false;
        };
        let Some(t) = self
            .servers
            .iter_mut()
            .find(|t| t.addr == from && t.answer.is_none())
        else {
            return false;
        };
        let Some((_, sent)) = t.attempts.iter().find(|(id, _)| *id == txid) else {
            return false;
        };
        t.answer = Some((mapped, now.saturating_duration_since(*sent)));
        true
    }

    /// Whether the probe is over: every server answered, or time is up.
    pub fn is_done(&self, now: Instant) -> bool {
        now >= self.start + NETCHECK_TIMEOUT || self.servers.iter().all(|t| t.answer.is_some())
    }

    /// The report of what was learned so far.
    pub fn report(&self) -> Report {
        let servers: Vec<ServerReport> = self
            .servers
            .iter()
            .map(|t| ServerReport {
                server: t.addr,
                relay: t.relay.clone(),
                reflexive: t.answer.map(|(a, _)| a),
                rtt_us: t
                    .answer
                    .map(|(_, rtt)| u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX)),
                attempts: t.attempts.len(),
            })
            .collect();
        let mut reflexive: Vec<SocketAddr> = Vec::new();
        for a in servers.iter().filter_map(|s| s.reflexive) {
            if !reflexive.contains(&a) {
                reflexive.push(a);
            }
        }
        let mut mapping_varies = None;
        for v6 in [false, true] {
            let seen: Vec<SocketAddr> = servers
                .iter()
                .filter(|s| s.server.is_ipv6() == v6)
                .filter_map(|s| s.reflexive)
                .collect();
            if seen.len() >= 2 {
                let varies = seen.iter().any(|a| *a != seen[0]);
                mapping_varies = Some(mapping_varies.unwrap_or(false) || varies);
            }
        }
        Report {
            udp: servers.iter().any(|s| s.reflexive.is_some()),
            reflexive,
            mapping_varies,
            servers,
        }
    }
}

impl Report {
    /// The human-readable report (`ztmesh netcheck` without `--json`).
    pub fn text(&self) -> String {
        let mut out = String::new();
        if self.udp {
            out.push_str("UDP: yes\n");
        } else {
            out.push_str(&format!(
                "UDP: blocked (no STUN server answered within {} s)\n",
                NETCHECK_TIMEOUT.as_secs()
            ));
        }
        for a in &self.reflexive {
            out.push_str(&format!("reflexive address: {a}\n"));
        }
        out.push_str(match self.mapping_varies {
            Some(true) => {
                "mapping varies by destination: yes (symmetric NAT / endpoint-dependent mapping)\n"
            }
            Some(false) => "mapping varies by destination: no\n",
            None => "mapping varies by destination: unknown (needs answers from two servers)\n",
        });
        for s in &self.servers {
            let server = match &s.relay {
                Some(name) => format!("{name} {}", s.server),
                None => s.server.to_string(),
            };
            match (s.reflexive, s.rtt_us) {
                (Some(a), Some(us)) => out.push_str(&format!(
                    "  {server:<40} {:<40} {:.1} ms\n",
                    a.to_string(),
                    us as f64 / 1000.0
                )),
                _ => out.push_str(&format!(
                    "  {server:<40} no answer ({} attempts)\n",
                    s.attempts
                )),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;

    fn sa(d: u8, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, d)), port)
    }

    fn drain(n: &mut Netcheck, now: Instant, rng: &mut StdRng) -> Vec<(SocketAddr, [u8; 20])> {
        let mut out = Vec::new();
        while let Some(t) = n.poll_transmit(now, rng) {
            out.push(t);
            assert!(out.len() <= NETCHECK_MAX_SERVERS);
        }
        out
    }

    #[test]
    fn two_servers_seeing_one_mapping_mean_no_variation() {
        let mut rng = StdRng::seed_from_u64(1);
        let t0 = Instant::now();
        let mut n = Netcheck::new(&[sa(1, 3478), sa(1, 3479), sa(1, 3478)], t0);
        let sent = drain(&mut n, t0, &mut rng);
        assert_eq!(sent.len(), 2, "duplicates are probed once");
        let mapped = sa(2, 40_000);
        let t1 = t0 + Duration::from_millis(3);
        for (to, req) in &sent {
            let resp = stun::binding_response(req, mapped).unwrap();
            assert!(n.handle_datagram(t1, *to, &resp));
        }
        assert!(n.is_done(t1));
        let r = n.report();
        assert!(r.udp);
        assert_eq!(r.reflexive, vec![mapped]);
        assert_eq!(r.mapping_varies, Some(false));
        assert_eq!(r.servers[0].rtt_us, Some(3000));
        assert!(r.text().contains("mapping varies by destination: no"));
        assert_eq!(r.servers[0].relay, None);
        n.label(sa(1, 3479), "relay1");
        let r = n.report();
        assert_eq!(r.servers[1].relay.as_deref(), Some("relay1"));
        assert!(r.text().contains("relay1 198.18.0.1:3479"), "{}", r.text());
    }

    #[test]
    fn different_mappings_per_server_mean_symmetric_nat() {
        let mut rng = StdRng::seed_from_u64(2);
        let t0 = Instant::now();
        let mut n = Netcheck::new(&[sa(1, 3478), sa(3, 3478)], t0);
        for (i, (to, req)) in drain(&mut n, t0, &mut rng).iter().enumerate() {
            let port = 40_000 + u16::try_from(i).unwrap();
            let resp = stun::binding_response(req, sa(2, port)).unwrap();
            assert!(n.handle_datagram(t0, *to, &resp));
        }
        let r = n.report();
        assert_eq!(r.mapping_varies, Some(true));
        assert_eq!(r.reflexive.len(), 2);
        assert!(r.text().contains("symmetric NAT"));
    }

    #[test]
    fn silence_means_udp_blocked_after_bounded_retries() {
        let mut rng = StdRng::seed_from_u64(3);
        let t0 = Instant::now();
        let mut n = Netcheck::new(&[sa(1, 3478)], t0);
        let mut now = t0;
        let mut sent = 0;
        for _ in 0..100 {
            if n.is_done(now) {
                break;
            }
            sent += drain(&mut n, now, &mut rng).len();
            let next = n.poll_timeout();
            assert!(next > now || n.is_done(now), "the timeout moves forward");
            now = next;
        }
        assert!(n.is_done(now));
        assert_eq!(now, t0 + NETCHECK_TIMEOUT);
        assert_eq!(sent, NETCHECK_ATTEMPTS);
        let r = n.report();
        assert!(!r.udp);
        assert_eq!(r.mapping_varies, None);
        assert_eq!(r.servers[0].attempts, NETCHECK_ATTEMPTS);
        assert!(r.text().starts_with("UDP: blocked"));
        assert!(drain(&mut n, now, &mut rng).is_empty());
    }

    #[test]
    fn rtt_is_measured_from_the_attempt_that_was_answered() {
        let mut rng = StdRng::seed_from_u64(4);
        let t0 = Instant::now();
        let mut n = Netcheck::new(&[sa(1, 3478)], t0);
        let first = drain(&mut n, t0, &mut rng);
        let t1 = t0 + NETCHECK_RETRY;
        let second = drain(&mut n, t1, &mut rng);
        assert_ne!(first[0].1, second[0].1, "a fresh id per attempt");
        let resp = stun::binding_response(&second[0].1, sa(2, 1)).unwrap();
        assert!(n.handle_datagram(t1 + Duration::from_millis(5), sa(1, 3478), &resp));
        assert_eq!(n.report().servers[0].rtt_us, Some(5000));
    }

    #[test]
    fn strangers_and_forgeries_are_ignored() {
        let mut rng = StdRng::seed_from_u64(5);
        let t0 = Instant::now();
        let mut n = Netcheck::new(&[sa(1, 3478)], t0);
        let sent = drain(&mut n, t0, &mut rng);
        let resp = stun::binding_response(&sent[0].1, sa(2, 1)).unwrap();
        assert!(!n.handle_datagram(t0, sa(9, 3478), &resp), "wrong source");
        let forged = stun::binding_response(&stun::binding_request([7; 12]), sa(2, 1)).unwrap();
        assert!(!n.handle_datagram(t0, sa(1, 3478), &forged), "unknown id");
        assert!(!n.handle_datagram(t0, sa(1, 3478), &sent[0].1), "a request");
        assert!(!n.handle_datagram(t0, sa(1, 3478), b"\x01\0\0\0garbage"));
        assert!(!n.report().udp);
        assert!(n.handle_datagram(t0, sa(1, 3478), &resp));
        assert!(!n.handle_datagram(t0, sa(1, 3478), &resp), "answered once");
    }

    #[test]
    fn mapping_variation_compares_within_one_address_family() {
        let mut rng = StdRng::seed_from_u64(6);
        let t0 = Instant::now();
        let v6: SocketAddr = "[fd00:18::1]:3478".parse().unwrap();
        let mut n = Netcheck::new(&[sa(1, 3478), v6], t0);
        for (to, req) in drain(&mut n, t0, &mut rng) {
            let mapped = if to.is_ipv6() {
                "[fd00:18::2]:41641".parse().unwrap()
            } else {
                sa(2, 41641)
            };
            let resp = stun::binding_response(&req, mapped).unwrap();
            assert!(n.handle_datagram(t0, to, &resp));
        }
        let r = n.report();
        assert_eq!(r.reflexive.len(), 2);
        assert_eq!(r.mapping_varies, None, "one server per family");
    }
}
