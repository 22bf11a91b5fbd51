//! The MagicDNS server shell: UDP and TCP listeners on one address, the
//! forwarder, the per-source rate limit and the counters.
//!
//! Every query goes through the same steps: the source's token bucket
//! ([`RateLimiter`]; over the limit → dropped), then the pure
//! [`decide`](super::decide) on the current [`Zone`] → the answer is sent,
//! or the query is forwarded, or it is dropped — each outcome counted
//! ([`DnsStats`]).
//!
//! Forwarding: at most [`DnsConfig::max_in_flight`] forwards at once
//! (beyond that the query is dropped and counted: the client retries). A
//! forward sends the query, under a fresh random id, from a fresh socket
//! (a random source port) to every chosen resolver at once; the first
//! good answer wins (a SERVFAIL or REFUSED is kept only if nothing better
//! comes), and only an answer whose id and question match is accepted.
//! Each try waits [`DnsConfig::forward_timeout`]; after
//! [`DnsConfig::forward_tries`] tries the client gets SERVFAIL. A
//! truncated answer is asked again over TCP from the resolver that sent
//! it. The answer is relayed with the client's id, cut down to a
//! TC=1 header and question when it exceeds the client's UDP size.
//!
//! TCP (RFC 7766 framing: a two-byte length before each message): at most
//! [`DnsConfig::max_tcp_connections`] connections (more are closed at
//! once and counted), each closed after
//! [`DnsConfig::tcp_idle_timeout`] without a complete query or after
//! [`DnsConfig::tcp_max_queries`] queries; a length over
//! [`MAX_MESSAGE_BYTES`] closes the connection.
//!
//! The listening sockets set `IP_FREEBIND`, so the server can start before
//! 100.100.100.100 is on the tunnel interface.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, trace};

use super::limit::{RateLimiter, DEFAULT_BURST, DEFAULT_MAX_SOURCES, DEFAULT_RATE};
use super::{
    decide, error_response, fit_udp, is_truncated, message_id, rcode, response_matches, with_id,
    Decision, DropReason, Zone, MAX_MESSAGE_BYTES,
};

/// Limits and timeouts of a [`DnsServer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// How long one forwarding try waits for an answer.
    pub forward_timeout: Duration,
    /// Tries before the client gets SERVFAIL (each to every resolver).
    pub forward_tries: u32,
    /// Sustained queries per second per source address.
    pub rate: u32,
    /// Burst per source address.
    pub burst: u32,
    /// Source addresses whose buckets are tracked.
    pub max_sources: usize,
    /// Forwards outstanding at once; beyond, queries are dropped.
    pub max_in_flight: usize,
    /// Open TCP connections; beyond, new ones are closed at once.
    pub max_tcp_connections: usize,
    /// A TCP connection without a complete query for this long is closed.
    pub tcp_idle_timeout: Duration,
    /// Queries served on one TCP connection before it is closed.
    pub tcp_max_queries: usize,
}

impl Default for DnsConfig {
    fn default() -> DnsConfig {
        DnsConfig {
            forward_timeout: Duration::from_secs(2),
            forward_tries: 2,
            rate: DEFAULT_RATE,
            burst: DEFAULT_BURST,
            max_sources: DEFAULT_MAX_SOURCES,
            max_in_flight: 256,
            max_tcp_connections: 64,
            tcp_idle_timeout: Duration::from_secs(10),
            tcp_max_queries: 256,
        }
    }
}

/// The server's counters, read by [`DnsServer::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DnsStats {
    /// Messages received (UDP datagrams and TCP frames).
    pub queries: u64,
    /// Answered from the zone or by the core's error answers (FORMERR,
    /// NOTIMP, REFUSED, SERVFAIL without resolvers).
    pub answered_local: u64,
    /// Of `answered_local`: FORMERR answers to malformed queries.
    pub formerr: u64,
    /// Handed to resolvers.
    pub forwarded: u64,
    /// Of `forwarded`: no resolver answered in time; the client got SERVFAIL.
    pub forward_failed: u64,
    /// Dropped: shorter than a DNS header.
    pub dropped_malformed: u64,
    /// Dropped: a response, not a query.
    pub dropped_response: u64,
    /// Dropped: longer than [`MAX_MESSAGE_BYTES`].
    pub dropped_oversized: u64,
    /// Dropped: the source's token bucket was empty.
    pub dropped_rate_limited: u64,
    /// Dropped: [`DnsConfig::max_in_flight`] forwards were outstanding.
    pub dropped_overloaded: u64,
    /// TCP connections closed at once: [`DnsConfig::max_tcp_connections`] were open.
    pub tcp_refused: u64,
}

/// A running MagicDNS server (UDP and TCP on one address).
///
/// Dropping it stops it, as [`DnsServer::shutdown`] does.
#[derive(Debug)]
pub struct DnsServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl DnsServer {
    /// Starts serving on `listen` (UDP and TCP) with [`DnsConfig::default`]
    /// and an empty [`Zone`] (mesh names NXDOMAIN, everything else
    /// SERVFAIL) until [`DnsServer::set_zone`].
    ///
    /// Must be called inside a Tokio runtime. With port 0, UDP and TCP get
    /// the same free port ([`DnsServer::local_addr`]).
    ///
    /// # Errors
    /// Binding either socket failed (the port is taken, or no runtime).
    pub fn start(listen: SocketAddr) -> io::Result<DnsServer> {
        DnsServer::start_with(listen, DnsConfig::default())
    }

    /// [`DnsServer::start`] with explicit limits and timeouts.
    ///
    /// # Errors
    /// As [`DnsServer::start`].
    pub fn start_with(listen: SocketAddr, config: DnsConfig) -> io::Result<DnsServer> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(io::Error::other("the DNS server needs a Tokio runtime"));
        }
        let (udp, tcp) = bind_pair(listen)?;
        let udp = Arc::new(UdpSocket::from_std(udp)?);
        let tcp = TcpListener::from_std(tcp)?;
        let addr = udp.local_addr()?;
        let shared = Arc::new(Shared {
            zone: RwLock::new(Arc::new(Zone::default())),
            limiter: Mutex::new(RateLimiter::new(
                config.rate,
                config.burst,
                config.max_sources,
            )),
            forwards: Arc::new(Semaphore::new(config.max_in_flight.max(1))),
            tcp_conns: Arc::new(Semaphore::new(config.max_tcp_connections.max(1))),
            counters: Counters::default(),
            config,
        });
        let (stop, stop_rx) = watch::channel(false);
        let tasks = vec![
            tokio::spawn(udp_loop(Arc::clone(&shared), udp, stop_rx.clone())),
            tokio::spawn(tcp_loop(Arc::clone(&shared), tcp, stop_rx)),
        ];
        debug!(%addr, "magic dns listening");
        Ok(DnsServer {
            shared,
            addr,
            stop,
            tasks,
        })
    }

    /// The address served (UDP and TCP).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the zone; queries decided after this call use it.
    pub fn set_zone(&self, zone: Zone) {
        *self
            .shared
            .zone
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(zone);
    }

    /// The counters so far.
    pub fn stats(&self) -> DnsStats {
        self.shared.counters.snapshot()
    }

    /// Stops the listeners and every query in progress. Idempotent.
    pub fn shutdown(&self) {
        // Every task watches this channel; aborting the listeners as well
        // frees the port without waiting for them to be polled.
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What the listeners share.
#[derive(Debug)]
struct Shared {
    zone: RwLock<Arc<Zone>>,
    limiter: Mutex<RateLimiter>,
    forwards: Arc<Semaphore>,
    tcp_conns: Arc<Semaphore>,
    counters: Counters,
    config: DnsConfig,
}

/// The outcome of the common steps for one query.
enum Step {
    Reply(Vec<u8>),
    Forward {
        to: Vec<SocketAddr>,
        query: Vec<u8>,
        _permit: OwnedSemaphorePermit,
    },
    Nothing,
}

impl Shared {
    /// Rate limit, decide, count.
    fn step(&self, msg: &[u8], src: IpAddr) -> Step {
        let c = &self.counters;
        bump(&c.queries);
        let allowed = self
            .limiter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .allow(src, now());
        if !allowed {
            bump(&c.dropped_rate_limited);
            return Step::Nothing;
        }
        let zone = Arc::clone(&self.zone.read().unwrap_or_else(PoisonError::into_inner));
        match decide(msg, &zone) {
            Decision::Answer(bytes) => {
                bump(&c.answered_local);
                if rcode(&bytes) == Some(u16::from(ResponseCode::FormErr) as u8) {
                    bump(&c.formerr);
                }
                Step::Reply(bytes)
            }
            Decision::Forward { to, query } => {
                match Arc::clone(&self.forwards).try_acquire_owned() {
                    Ok(permit) => {
                        bump(&c.forwarded);
                        Step::Forward {
                            to,
                            query,
                            _permit: permit,
                        }
                    }
                    Err(_) => {
                        bump(&c.dropped_overloaded);
                        Step::Nothing
                    }
                }
            }
            Decision::Drop(reason) => {
                bump(match reason {
                    DropReason::Malformed => &c.dropped_malformed,
                    DropReason::Response => &c.dropped_response,
                    DropReason::Oversized => &c.dropped_oversized,
                });
                trace!(%src, ?reason, "dns query dropped");
                Step::Nothing
            }
        }
    }

    /// Forwards `query`; the answer with the client's id, or SERVFAIL.
    async fn forward(&self, query: &[u8], to: &[SocketAddr]) -> Option<Vec<u8>> {
        match forward(query, to, &self.config).await {
            Some(answer) => Some(answer),
            None => {
                bump(&self.counters.forward_failed);
                error_response(query, ResponseCode::ServFail)
            }
        }
    }
}

async fn udp_loop(shared: Arc<Shared>, sock: Arc<UdpSocket>, mut stop: watch::Receiver<bool>) {
    // One byte more than the largest query: a longer datagram arrives cut
    // to this length and is dropped as oversized.
    let mut buf = vec![0u8; MAX_MESSAGE_BYTES + 1];
    loop {
        let (n, src) = tokio::select! {
            _ = stop.changed() => return,
            r = sock.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    debug!(error = %e, "magic dns udp receive failed");
                    continue;
                }
            },
        };
        match shared.step(&buf[..n], src.ip()) {
            Step::Reply(bytes) => {
                let _ = sock.send_to(&bytes, src).await;
            }
            Step::Forward { to, query, _permit } => {
                let shared = Arc::clone(&shared);
                let sock = Arc::clone(&sock);
                let mut stop = stop.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = stop.changed() => {}
                        answer = shared.forward(&query, &to) => {
                            if let Some(answer) = answer {
                                let _ = sock.send_to(&fit_udp(&query, answer), src).await;
                            }
                        }
                    }
                    drop(_permit);
                });
            }
            Step::Nothing => {}
        }
    }
}

async fn tcp_loop(shared: Arc<Shared>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.changed() => return,
            r = listener.accept() => match r {
                Ok(r) => r,
                Err(e) => {
                    // Out of descriptors and the like: pause instead of spinning.
                    debug!(error = %e, "magic dns tcp accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&shared.tcp_conns).try_acquire_owned() else {
            bump(&shared.counters.tcp_refused);
            drop(stream);
            continue;
        };
        let shared = Arc::clone(&shared);
        let mut stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.changed() => {}
                _ = tcp_conn(&shared, stream, peer) => {}
            }
            drop(permit);
        });
    }
}

/// Serves one TCP connection until it idles, errs, sends an oversized
/// length or reaches the query limit.
async fn tcp_conn(shared: &Shared, mut stream: TcpStream, peer: SocketAddr) {
    let idle = shared.config.tcp_idle_timeout;
    for _ in 0..shared.config.tcp_max_queries {
        let len = match tokio::time::timeout(idle, stream.read_u16()).await {
            Ok(Ok(len)) => usize::from(len),
            _ => return,
        };
        if len > MAX_MESSAGE_BYTES {
            bump(&shared.counters.queries);
            bump(&shared.counters.dropped_oversized);
            return;
        }
        let mut msg = vec![0u8; len];
        if !matches!(
            tokio::time::timeout(idle, stream.read_exact(&mut msg)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let reply = match shared.step(&msg, peer.ip()) {
            Step::Reply(bytes) => Some(bytes),
            Step::Forward { to, query, _permit } => shared.forward(&query, &to).await,
            Step::Nothing => None,
        };
        let Some(reply) = reply else {
            continue;
        };
        let Ok(len) = u16::try_from(reply.len()) else {
            continue;
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&reply);
        if !matches!(
            tokio::time::timeout(idle, stream.write_all(&framed)).await,
            Ok(Ok(()))
        ) {
            return;
        }
    }
}

/// Asks `to` for `query` (see the module doc); the answer carries the
/// client's id. `None` when no resolver answered in any try.
async fn forward(query: &[u8], to: &[SocketAddr], config: &DnsConfig) -> Option<Vec<u8>> {
    let client_id = message_id(query)?;
    for _ in 0..config.forward_tries.max(1) {
        let sent = with_id(query, random_id());
        let Some((resolver, answer)) = udp_race(&sent, to, config.forward_timeout).await else {
            continue;
        };
        let answer = if is_truncated(&answer) {
            tcp_exchange(resolver, &sent, config.forward_timeout)
                .await
                .unwrap_or(answer)
        } else {
            answer
        };
        return Some(with_id(&answer, client_id));
    }
    None
}

/// Sends `query` to every resolver at once: the first answer that is not
/// SERVFAIL or REFUSED, else the last such answer, else `None`.
async fn udp_race(
    query: &[u8],
    to: &[SocketAddr],
    timeout: Duration,
) -> Option<(SocketAddr, Vec<u8>)> {
    let mut set = JoinSet::new();
    for &resolver in to {
        let query = query.to_vec();
        set.spawn(async move { udp_exchange(resolver, query, timeout).await });
    }
    let mut fallback = None;
    while let Some(joined) = set.join_next().await {
        let Ok(Some((resolver, answer))) = joined else {
            continue;
        };
        let code = rcode(&answer);
        let failed = code == Some(u16::from(ResponseCode::ServFail) as u8)
            || code == Some(u16::from(ResponseCode::Refused) as u8);
        if !failed {
            // Dropping the set cancels the slower exchanges.
            return Some((resolver, answer));
        }
        fallback = Some((resolver, answer));
    }
    fallback
}

/// One UDP exchange from a fresh socket connected to `to`, within `timeout`.
async fn udp_exchange(
    to: SocketAddr,
    query: Vec<u8>,
    timeout: Duration,
) -> Option<(SocketAddr, Vec<u8>)> {
    /// Stray datagrams (not answering this query) tolerated per exchange.
    const MAX_STRAYS: usize = 16;
    let bind: SocketAddr = match to {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let exchange = async {
        let sock = UdpSocket::bind(bind).await.ok()?;
        sock.connect(to).await.ok()?;
        sock.send(&query).await.ok()?;
        let mut buf = vec![0u8; usize::from(u16::MAX)];
        for _ in 0..MAX_STRAYS {
            // An ICMP unreachable surfaces as an error: give up on this
            // resolver at once rather than wait out the timeout.
            let n = sock.recv(&mut buf).await.ok()?;
            if response_matches(&query, &buf[..n]) {
                return Some(buf[..n].to_vec());
            }
        }
        None
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Some(answer)) => Some((to, answer)),
        _ => {
            trace!(resolver = %to, "no dns answer over udp");
            None
        }
    }
}

/// One TCP exchange with `to`, within `timeout`.
async fn tcp_exchange(to: SocketAddr, query: &[u8], timeout: Duration) -> Option<Vec<u8>> {
    let exchange = async {
        let mut stream = TcpStream::connect(to).await.ok()?;
        let len = u16::try_from(query.len()).ok()?;
        let mut framed = Vec::with_capacity(query.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(query);
        stream.write_all(&framed).await.ok()?;
        let len = stream.read_u16().await.ok()?;
        let mut answer = vec![0u8; usize::from(len)];
        stream.read_exact(&mut answer).await.ok()?;
        response_matches(query, &answer).then_some(answer)
    };
    tokio::time::timeout(timeout, exchange).await.ok().flatten()
}

/// Binds UDP and TCP on `listen`; with port 0, on one port free for both.
fn bind_pair(listen: SocketAddr) -> io::Result<(std::net::UdpSocket, std::net::TcpListener)> {
    /// Attempts at finding a port free for both protocols.
    const PORT_TRIES: usize = 16;
    if listen.port() != 0 {
        return Ok((bind_udp(listen)?, bind_tcp(listen)?));
    }
    let mut last = io::Error::other("no port free for both UDP and TCP");
    for _ in 0..PORT_TRIES {
        let udp = bind_udp(listen)?;
        match bind_tcp(udp.local_addr()?) {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn socket(addr: SocketAddr, ty: Type, protocol: Protocol) -> io::Result<Socket> {
    let sock = Socket::new(Domain::for_address(addr), ty, Some(protocol))?;
    match addr {
        SocketAddr::V4(_) => sock.set_freebind(true)?,
        SocketAddr::V6(_) => {
            sock.set_only_v6(true)?;
            sock.set_freebind_ipv6(true)?;
        }
    }
    sock.set_nonblocking(true)?;
    Ok(sock)
}

fn bind_udp(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let sock = socket(addr, Type::DGRAM, Protocol::UDP)?;
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

fn bind_tcp(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let sock = socket(addr, Type::STREAM, Protocol::TCP)?;
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    sock.listen(128)?;
    Ok(sock.into())
}

#[expect(
    clippy::disallowed_methods,
    reason = "the DNS server shell feeds the real clock to the pure rate limiter"
)]
fn now() -> Instant {
    Instant::now()
}

#[expect(
    clippy::disallowed_methods,
    reason = "the forwarder draws each upstream query id from the thread RNG"
)]
fn random_id() -> u16 {
    rand::random()
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

#[derive(Debug, Default)]
struct Counters {
    queries: AtomicU64,
    answered_local: AtomicU64,
    formerr: AtomicU64,
    forwarded: AtomicU64,
    forward_failed: AtomicU64,
    dropped_malformed: AtomicU64,
    dropped_response: AtomicU64,
    dropped_oversized: AtomicU64,
    dropped_rate_limited: AtomicU64,
    dropped_overloaded: AtomicU64,
    tcp_refused: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> DnsStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DnsStats {
            queries: get(&self.queries),
            answered_local: get(&self.answered_local),
            formerr: get(&self.formerr),
            forwarded: get(&self.forwarded),
            forward_failed: get(&self.forward_failed),
            dropped_malformed: get(&self.dropped_malformed),
            dropped_response: get(&self.dropped_response),
            dropped_oversized: get(&self.dropped_oversized),
            dropped_rate_limited: get(&self.dropped_rate_limited),
            dropped_overloaded: get(&self.dropped_overloaded),
            tcp_refused: get(&self.tcp_refused),
        }
    }
}

#[cfg(test)]
mod tests {
    //! Real sockets on 127.0.0.1: the server under test, tiny upstream
    //! resolvers written here, and clients. Waits are bounded and poll for
    //! the expected state; no assertion depends on timing.

    use std::future::Future;

    use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, RData, Record, RecordType};
    use ztmesh_proto::control as pb;

    use super::*;

    /// A generous bound for anything the test waits for.
    const WAIT: Duration = Duration::from_secs(10);

    fn localhost() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    fn query_with(id: u16, name: &str, edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    fn query(id: u16, name: &str) -> Vec<u8> {
        query_with(id, name, None)
    }

    /// `n` A records for the question of `q`, answered with `q`'s id.
    fn answer_with(q: &[u8], first: u8, n: u8, truncated: bool) -> Vec<u8> {
        let q = Message::from_vec(q).unwrap();
        let mut r = Message::response(q.metadata.id, OpCode::Query);
        r.metadata.truncation = truncated;
        r.add_queries(q.queries.iter().cloned());
        for i in 0..n {
            r.add_answer(Record::from_rdata(
                q.queries[0].name().clone(),
                300,
                RData::A(A(Ipv4Addr::new(198, 18, first, i))),
            ));
        }
        r.to_vec().unwrap()
    }

    fn a_records(answer: &[u8]) -> Vec<Ipv4Addr> {
        Message::from_vec(answer)
            .unwrap()
            .answers
            .iter()
            .filter_map(|r| match r.data {
                RData::A(A(ip)) => Some(ip),
                _ => None,
            })
            .collect()
    }

    fn decoded(answer: &[u8]) -> Message {
        Message::from_vec(answer).unwrap()
    }

    /// A zone with web (100.64.0.2) and, when given, split DNS and upstreams.
    fn zone(split: Vec<pb::SplitDns>, upstreams: Vec<SocketAddr>) -> Zone {
        let map = pb::NetMap {
            dns_domain: "ztmesh.internal".into(),
            self_node: Some(pb::NodeInfo {
                name: "laptop".into(),
                addresses: vec!["100.64.0.1/32".into()],
                ..Default::default()
            }),
            peers: vec![pb::Peer {
                id: 2,
                name: "web".into(),
                allowed_ips: vec!["100.64.0.2/32".into()],
                ..Default::default()
            }],
            split_dns: split,
            ..Default::default()
        };
        Zone::from_netmap(&map, upstreams)
    }

    /// A UDP resolver on 127.0.0.1 that answers every query with
    /// `reply(query)` (`None`: stay silent), for at most 64 queries.
    async fn upstream(
        reply: impl Fn(&[u8]) -> Option<Vec<u8>> + Send + 'static,
    ) -> (SocketAddr, JoinHandle<()>) {
        let sock = UdpSocket::bind(localhost()).await.unwrap();
        let addr = sock.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            for _ in 0..64 {
                let Ok((n, src)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                if let Some(r) = reply(&buf[..n]) {
                    let _ = sock.send_to(&r, src).await;
                }
            }
        });
        (addr, task)
    }

    async fn ask_udp(server: SocketAddr, q: &[u8]) -> Vec<u8> {
        let sock = UdpSocket::bind(localhost()).await.unwrap();
        sock.send_to(q, server).await.unwrap();
        let mut buf = vec![0u8; 65535];
        let n = tokio::time::timeout(WAIT, sock.recv(&mut buf))
            .await
            .expect("an answer in time")
            .unwrap();
        buf.truncate(n);
        buf
    }

    async fn ask_tcp(stream: &mut TcpStream, q: &[u8]) -> Vec<u8> {
        let mut framed = (q.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(q);
        stream.write_all(&framed).await.unwrap();
        let len = tokio::time::timeout(WAIT, stream.read_u16())
            .await
            .expect("an answer in time")
            .unwrap();
        let mut buf = vec![0u8; usize::from(len)];
        stream.read_exact(&mut buf).await.unwrap();
        buf
    }

    /// Polls `cond` every 10 ms until it holds (at most [`WAIT`]).
    async fn until(mut cond: impl FnMut() -> bool) {
        for _ in 0..(WAIT.as_millis() / 10) {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition not reached within {WAIT:?}");
    }

    async fn within<T>(f: impl Future<Output = T>) -> T {
        tokio::time::timeout(WAIT, f).await.expect("in time")
    }

    #[tokio::test]
    async fn answers_mesh_names_over_udp_and_tcp() {
        let server = DnsServer::start(localhost()).unwrap();
        server.set_zone(zone(Vec::new(), Vec::new()));
        let addr = server.local_addr();

        let a = ask_udp(addr, &query(7, "web.ztmesh.internal.")).await;
        assert_eq!(message_id(&a), Some(7));
        assert_eq!(a_records(&a), [Ipv4Addr::new(100, 64, 0, 2)]);

        let mut tcp = within(TcpStream::connect(addr)).await.unwrap();
        let a = ask_tcp(&mut tcp, &query(8, "web.ztmesh.internal.")).await;
        assert_eq!(message_id(&a), Some(8));
        assert_eq!(a_records(&a), [Ipv4Addr::new(100, 64, 0, 2)]);
        // Several queries on one connection.
        let a = ask_tcp(&mut tcp, &query(9, "nope.ztmesh.internal.")).await;
        assert_eq!(decoded(&a).metadata.response_code, ResponseCode::NXDomain);

        let s = server.stats();
        assert_eq!((s.queries, s.answered_local, s.forwarded), (3, 3, 0));
    }

    #[tokio::test]
    async fn set_zone_swaps_the_names_live() {
        let server = DnsServer::start(localhost()).unwrap();
        let addr = server.local_addr();
        // Before the first map: no names.
        let a = ask_udp(addr, &query(1, "web.ztmesh.internal.")).await;
        assert_eq!(decoded(&a).metadata.response_code, ResponseCode::NXDomain);
        server.set_zone(zone(Vec::new(), Vec::new()));
        let a = ask_udp(addr, &query(2, "web.ztmesh.internal.")).await;
        assert_eq!(a_records(&a), [Ipv4Addr::new(100, 64, 0, 2)]);
    }

    #[tokio::test]
    async fn forwards_other_names_and_relays_with_the_client_id() {
        let (up, _task) = upstream(|q| Some(answer_with(q, 1, 1, false))).await;
        let server = DnsServer::start(localhost()).unwrap();
        server.set_zone(zone(Vec::new(), vec![up]));
        for id in [0x4242, 0x0001] {
            let a = ask_udp(server.local_addr(), &query(id, "example.org.")).await;
            assert_eq!(message_id(&a), Some(id));
            assert_eq!(a_records(&a), [Ipv4Addr::new(198, 18, 1, 0)]);
        }
        let mut tcp = within(TcpStream::connect(server.local_addr()))
            .await
            .unwrap();
        let a = ask_tcp(&mut tcp, &query(0x99, "example.org.")).await;
        assert_eq!(message_id(&a), Some(0x99));
        assert_eq!(a_records(&a), [Ipv4Addr::new(198, 18, 1, 0)]);
        let s = server.stats();
        assert_eq!((s.queries, s.forwarded, s.forward_failed), (3, 3, 0));
    }

    #[tokio::test]
    async fn split_dns_names_go_to_their_resolvers() {
        let (general, _g) = upstream(|q| Some(answer_with(q, 1, 1, false))).await;
        let (corp, _c) = upstream(|q| Some(answer_with(q, 2, 1, false))).await;
        let server = DnsServer::start(localhost()).unwrap();
        server.set_zone(zone(
            vec![pb::SplitDns {
                suffix: "example.corp".into(),
                resolvers: vec![corp.to_string()],
            }],
            vec![general],
        ));
        let a = ask_udp(server.local_addr(), &query(1, "intranet.example.corp.")).await;
        assert_eq!(a_records(&a), [Ipv4Addr::new(198, 18, 2, 0)]);
        let a = ask_udp(server.local_addr(), &query(2, "example.org.")).await;
        assert_eq!(a_records(&a), [Ipv4Addr::new(198, 18, 1, 0)]);
    }

    #[tokio::test]
    async fn a_good_answer_beats_a_servfail_from_another_resolver() {
        let (failing, _f) = upstream(|q| error_response(q, ResponseCode::ServFail)).await;
        // The good resolver answers second (after a pause), so the race
        // has to pass over the SERVFAIL; the assertion holds either way.
        let sock = UdpSocket::bind(localhost()).await.unwrap();
        let good = sock.local_addr().unwrap();
        let _g = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            for _ in 0..4 {
                let Ok((n, src)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = sock
                    .send_to(&answer_with(&buf[..n], 3, 1, false), src)
                    .await;
            }
        });
        let server = DnsServer::start(localhost()).unwrap();
        server.set_zone(zone(Vec::new(), vec![failing, good]));
        let a = ask_udp(server.local_addr(), &query(5, "example.org.")).await;
        assert_eq!(decoded(&a).metadata.response_code, ResponseCode::NoError);
        assert_eq!(a_records(&a), [Ipv4Addr::new(198, 18, 3, 0)]);
    }

    #[tokio::test]
    async fn truncated_upstream_answers_are_retried_over_tcp() {
        // The resolver's UDP side truncates; its TCP side (same port)
        // gives 40 records (~660 bytes).
        // The UDP port the kernel picks may be taken for TCP by another
        // test running at the same time: pick again (bounded).
        let mut pair = None;
        for _ in 0..50 {
            let udp = UdpSocket::bind(localhost()).await.unwrap();
            let up = udp.local_addr().unwrap();
            if let Ok(tcp) = TcpListener::bind(up).await {
                pair = Some((udp, up, tcp));
                break;
            }
        }
        let (udp, up, tcp) = pair.expect("a port free for both UDP and TCP");
        let _u = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            for _ in 0..8 {
                let Ok((n, src)) = udp.recv_from(&mut buf).await else {
                    return;
                };
                let _ = udp.send_to(&answer_with(&buf[..n], 4, 0, true), src).await;
            }
        });
        let _t = tokio::spawn(async move {
            for _ in 0..8 {
                let Ok((mut s, _)) = tcp.accept().await else {
                    return;
                };
                let Ok(len) = s.read_u16().await else {
                    continue;
                };
                let mut q = vec![0u8; usize::from(len)];
                if s.read_exact(&mut q).await.is_err() {
                    continue;
                }
                let a = answer_with(&q, 4, 40, false);
                let mut framed = (a.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&a);
                let _ = s.write_all(&framed).await;
            }
        });
        let server = DnsServer::start(localhost()).unwrap();
        server.set_zone(zone(Vec::new(), vec![up]));
        // A client with EDNS 4096 gets all 40 records over UDP.
        let a = ask_udp(
            server.local_addr(),
            &query_with(6, "big.example.org.", Some(4096)),
        )
        .await;
        assert!(!is_truncated(&a));
        assert_eq!(a_records(&a).len(), 40);
        // A client without EDNS (512 bytes) is told to retry over TCP…
        let a = ask_udp(server.local_addr(), &query(7, "big.example.org.")).await;
        assert!(is_truncated(&a));
        assert_eq!(message_id(&a), Some(7));
        assert!(a_records(&a).is_empty());
        // …and gets them there.
        let mut s = within(TcpStream::connect(server.local_addr()))
            .await
            .unwrap();
        let a = ask_tcp(&mut s, &query(8, "big.example.org.")).await;
        assert_eq!(a_records(&a).len(), 40);
    }

    #[tokio::test]
    async fn a_silent_upstream_gives_servfail_after_the_tries() {
        let (silent, _s) = upstream(|_| None).await;
        let config = DnsConfig {
            forward_timeout: Duration::from_millis(100),
            forward_tries: 2,
            ..DnsConfig::default()
        };
        let server = DnsServer::start_with(localhost(), config).unwrap();
        server.set_zone(zone(Vec::new(), vec![silent]));
        let a = ask_udp(server.local_addr(), &query(3, "example.org.")).await;
        let m = decoded(&a);
        assert_eq!(
            (m.metadata.id, m.metadata.response_code),
            (3, ResponseCode::ServFail)
        );
        let s = server.stats();
        assert_eq!((s.forwarded, s.forward_failed), (1, 1));
    }

    #[tokio::test]
    async fn answers_that_do_not_match_the_query_are_ignored() {
        // The resolver sends an answer with the wrong id, then one to
        // another question, then the real one.
        let sock = UdpSocket::bind(localhost()).await.unwrap();
        let up = sock.local_addr().unwrap();
        let _task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            for _ in 0..4 {
                let Ok((n, src)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                let q = buf[..n].to_vec();
                let id = message_id(&q).unwrap();
                let good = answer_with(&q, 5, 1, false);
                let other = with_id(&answer_with(&query(0, "other.example."), 6, 1, false), id);
                for datagram in [with_id(&good, id.wrapping_add(1)), other, good] {
                    let _ = sock.send_to(&datagram, src).await;
                }
            }
        });
        let server = DnsServer::start(localhost()).unwrap();
        server.set_zone(zone(Vec::new(), vec![up]));
        let a = ask_udp(server.local_addr(), &query(11, "example.org.")).await;
        assert_eq!(a_records(&a), [Ipv4Addr::new(198, 18, 5, 0)]);
    }

    #[tokio::test]
    async fn bad_input_is_counted_and_answered_formerr_only_with_a_header() {
        let server = DnsServer::start(localhost()).unwrap();
        server.set_zone(zone(Vec::new(), Vec::new()));
        let addr = server.local_addr();
        let client = UdpSocket::bind(localhost()).await.unwrap();
        // Too short for a header; a response; 5000 bytes: no answers.
        client.send_to(&[1, 2, 3], addr).await.unwrap();
        let mut resp = query(1, "web.ztmesh.internal.");
        resp[2] |= 0x80;
        client.send_to(&resp, addr).await.unwrap();
        client.send_to(&vec![0u8; 5000], addr).await.unwrap();
        // A header and garbage: FORMERR, the only datagram to come back.
        let mut garbage = query(0x77, "web.ztmesh.internal.");
        garbage.truncate(16);
        client.send_to(&garbage, addr).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = within(client.recv(&mut buf)).await.unwrap();
        let m = decoded(&buf[..n]);
        assert_eq!(
            (m.metadata.id, m.metadata.response_code),
            (0x77, ResponseCode::FormErr)
        );
        until(|| server.stats().queries == 4).await;
        let s = server.stats();
        assert_eq!(
            (
                s.dropped_malformed,
                s.dropped_response,
                s.dropped_oversized,
                s.formerr,
                s.answered_local
            ),
            (1, 1, 1, 1, 1)
        );
        // An oversized TCP frame closes the connection.
        let mut tcp = within(TcpStream::connect(addr)).await.unwrap();
        tcp.write_all(&5000u16.to_be_bytes()).await.unwrap();
        let mut rest = Vec::new();
        let closed = within(tcp.read_to_end(&mut rest)).await;
        assert!(closed.is_err() || rest.is_empty());
        until(|| server.stats().dropped_oversized == 2).await;
        // The server still answers.
        let a = ask_udp(addr, &query(2, "web.ztmesh.internal.")).await;
        assert_eq!(a_records(&a).len(), 1);
    }

    #[tokio::test]
    async fn a_flooding_source_is_limited_by_its_token_bucket() {
        let config = DnsConfig {
            rate: 1,
            burst: 5,
            ..DnsConfig::default()
        };
        let server = DnsServer::start_with(localhost(), config).unwrap();
        server.set_zone(zone(Vec::new(), Vec::new()));
        let client = UdpSocket::bind(localhost()).await.unwrap();
        let q = query(1, "web.ztmesh.internal.");
        let started = Instant::now();
        for _ in 0..50 {
            client.send_to(&q, server.local_addr()).await.unwrap();
        }
        until(|| server.stats().queries == 50).await;
        let elapsed = started.elapsed();
        let s = server.stats();
        assert_eq!(s.answered_local + s.dropped_rate_limited, 50);
        // The burst, plus one token per second that passed meanwhile.
        assert!(s.answered_local >= 5);
        assert!(
            s.answered_local <= 5 + elapsed.as_secs() + 1,
            "{s:?} after {elapsed:?}"
        );
    }

    #[tokio::test]
    async fn forwards_in_flight_are_bounded() {
        let (silent, _s) = upstream(|_| None).await;
        let config = DnsConfig {
            max_in_flight: 1,
            forward_timeout: WAIT,
            forward_tries: 1,
            ..DnsConfig::default()
        };
        let server = DnsServer::start_with(localhost(), config).unwrap();
        server.set_zone(zone(Vec::new(), vec![silent]));
        let client = UdpSocket::bind(localhost()).await.unwrap();
        for id in 0..3 {
            client
                .send_to(&query(id, "example.org."), server.local_addr())
                .await
                .unwrap();
        }
        until(|| server.stats().queries == 3).await;
        let s = server.stats();
        assert_eq!((s.forwarded, s.dropped_overloaded), (1, 2));
        // A mesh name needs no forward and is still answered.
        let a = ask_udp(server.local_addr(), &query(9, "web.ztmesh.internal.")).await;
        assert_eq!(a_records(&a).len(), 1);
    }

    #[tokio::test]
    async fn tcp_connections_are_bounded_and_idle_ones_closed() {
        let config = DnsConfig {
            max_tcp_connections: 1,
            tcp_idle_timeout: Duration::from_millis(200),
            ..DnsConfig::default()
        };
        let server = DnsServer::start_with(localhost(), config).unwrap();
        server.set_zone(zone(Vec::new(), Vec::new()));
        let addr = server.local_addr();
        let mut first = within(TcpStream::connect(addr)).await.unwrap();
        let a = ask_tcp(&mut first, &query(1, "web.ztmesh.internal.")).await;
        assert_eq!(a_records(&a).len(), 1);
        // The second connection is closed at once.
        let mut second = within(TcpStream::connect(addr)).await.unwrap();
        let mut rest = Vec::new();
        let _ = within(second.read_to_end(&mut rest)).await;
        assert!(rest.is_empty());
        until(|| server.stats().tcp_refused == 1).await;
        // The first, left idle, is closed by the server…
        let _ = within(first.read_to_end(&mut rest)).await;
        assert!(rest.is_empty());
        // …which frees its slot.
        let mut conn = None;
        for _ in 0..100 {
            let mut s = within(TcpStream::connect(addr)).await.unwrap();
            let q = query(2, "web.ztmesh.internal.");
            let framed = [&(q.len() as u16).to_be_bytes()[..], &q].concat();
            if s.write_all(&framed).await.is_ok() {
                if let Ok(Ok(len)) = tokio::time::timeout(WAIT, s.read_u16()).await {
                    conn = Some(len);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            conn.is_some(),
            "a new connection is served once the idle one is closed"
        );
    }

    #[tokio::test]
    async fn shutdown_stops_serving() {
        let server = DnsServer::start(localhost()).unwrap();
        let addr = server.local_addr();
        assert!(within(TcpStream::connect(addr)).await.is_ok());
        server.shutdown();
        server.shutdown();
        // The listener goes away once its task is gone.
        let mut refused = false;
        for _ in 0..500 {
            if within(TcpStream::connect(addr)).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(refused);
        // The port can be bound again (once the UDP task is gone too).
        drop(server);
        let mut again = DnsServer::start(addr);
        for _ in 0..500 {
            if again.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            again = DnsServer::start(addr);
        }
        assert!(again.is_ok(), "{:?}", again.err());
    }

    #[test]
    fn start_outside_a_runtime_is_an_error() {
        assert!(DnsServer::start(localhost()).is_err());
    }
}
