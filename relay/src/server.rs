//! The relay server (shell): a quinn endpoint, a TLS-over-TCP acceptor and
//! STUN sockets around the pure [`Core`]. It reads the clock, owns the
//! sockets and moves bytes; every decision is the core's.
//!
//! A connection: handshake (QUIC or TLS) and `HELLO` within the handshake
//! deadline → [`Core::hello`] → `WELCOME` or `REFUSED` → frames from the
//! stream (`DATA`, `MAP`) and, on QUIC, datagrams. A datagram for a peer
//! goes through [`Core::route`] to the destination's [`Link`]: a QUIC
//! datagram when it fits the path, else a `DATA` frame on the destination's
//! stream. Malformed frames are counted and end the connection; malformed
//! QUIC datagrams are counted and dropped. Stats are written to
//! `DATA_DIR/stats.json` every second.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;
use ztmesh_proto::keys::PublicKey;
use ztmesh_proto::relay::{
    decode_datagram, decode_frame, encode_data, encode_datagram, Frame, PEER_ID_LEN,
};
use ztmesh_proto::stun::binding_response;
use ztmesh_proto::time::now_ms;
use ztmesh_proto::UnixMs;

use crate::core::{Config, ConnId, Core, DropReason, NodeId, Snapshot, Verifier};
use crate::datadir::{load_or_create_tls, write_atomic, DataDir, DirLock, Identity};
use crate::limiter::{FailureLimiter, LimiterConfig, LimiterStats, Source};
use crate::wire::{
    from_client, read_frame, server_tls, transport, tune_tcp, ReadError, OUT_QUEUE, READ_CHUNK,
    WRITE_BATCH,
};

/// What `serve` is given.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub name: String,
    pub data_dir: DataDir,
    pub quic_listen: SocketAddr,
    pub tcp_listen: SocketAddr,
    /// One or two STUN sockets (two let clients tell a destination-dependent
    /// NAT mapping from an independent one).
    pub stun_listen: Vec<SocketAddr>,
    pub controller_key: PublicKey,
    pub max_nodes: usize,
    pub memory_budget: u64,
    /// Transport handshake plus `HELLO` must finish within this.
    pub handshake_timeout: Duration,
    /// Open connections per source (an IPv4 address or an IPv6 /64), QUIC
    /// and TCP together.
    pub max_conns_per_source: usize,
    /// When a source that sends invalid `HELLO`s is blocked.
    pub hello_limiter: LimiterConfig,
}

impl ServeConfig {
    /// Defaults for everything but the name, dir, addresses and key.
    pub fn new(
        name: &str,
        data_dir: DataDir,
        quic_listen: SocketAddr,
        tcp_listen: SocketAddr,
        stun_listen: Vec<SocketAddr>,
        controller_key: PublicKey,
    ) -> Self {
        Self {
            name: name.to_string(),
            data_dir,
            quic_listen,
            tcp_listen,
            stun_listen,
            controller_key,
            max_nodes: DEFAULT_MAX_NODES,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            handshake_timeout: Duration::from_secs(10),
            max_conns_per_source: 32,
            hello_limiter: LimiterConfig::default(),
        }
    }
}

/// Default `--max-nodes`.
pub const DEFAULT_MAX_NODES: usize = 10_000;
/// Default `--memory-budget`: 1 GiB.
pub const DEFAULT_MEMORY_BUDGET: u64 = 1 << 30;

/// The stats file: the core's snapshot plus the transports' counters.
#[derive(Debug, Serialize)]
pub struct Stats {
    pub name: String,
    pub written_at_ms: UnixMs,
    #[serde(flatten)]
    pub core: Snapshot,
    pub transport: TransportStats,
    /// The failure limiter for invalid `HELLO`s.
    pub limiter: LimiterStats,
}

/// Counters the shell keeps (the core does not see these events).
#[derive(Debug, Default, Serialize)]
pub struct TransportStats {
    pub quic_connections: u64,
    pub tcp_connections: u64,
    pub handshake_timeouts: u64,
    pub handshake_failures: u64,
    pub over_source_cap: u64,
    /// Datagrams sent to QUIC clients as `DATA` frames because they did not
    /// fit the path's datagram size.
    pub datagrams_on_stream: u64,
    pub stun_answered: u64,
    pub stun_dropped: u64,
}

#[derive(Default)]
struct Counters {
    quic_connections: AtomicU64,
    tcp_connections: AtomicU64,
    handshake_timeouts: AtomicU64,
    handshake_failures: AtomicU64,
    over_source_cap: AtomicU64,
    datagrams_on_stream: AtomicU64,
    stun_answered: AtomicU64,
    stun_dropped: AtomicU64,
}

impl Counters {
    fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn read(&self) -> TransportStats {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        TransportStats {
            quic_connections: r(&self.quic_connections),
            tcp_connections: r(&self.tcp_connections),
            handshake_timeouts: r(&self.handshake_timeouts),
            handshake_failures: r(&self.handshake_failures),
            over_source_cap: r(&self.over_source_cap),
            datagrams_on_stream: r(&self.datagrams_on_stream),
            stun_answered: r(&self.stun_answered),
            stun_dropped: r(&self.stun_dropped),
        }
    }
}

/// A connection as the core holds it: how to send to that node.
#[derive(Clone)]
pub struct Link {
    out: mpsc::Sender<Out>,
    quic: Option<quinn::Connection>,
    kill: Arc<Notify>,
}

enum Out {
    Frame(Vec<u8>),
    /// Send `REFUSED {reason}` and end the connection.
    Close(String),
}

impl Link {
    /// Sends a datagram from `src` to this node; false if it was dropped
    /// because the queue is full.
    fn deliver(&self, src: NodeId, datagram: &[u8], counters: &Counters) -> bool {
        if let Some(conn) = &self.quic {
            if conn
                .max_datagram_size()
                .is_some_and(|max| PEER_ID_LEN + datagram.len() <= max)
            {
                let mut buf = Vec::with_capacity(PEER_ID_LEN + datagram.len());
                if encode_datagram(src, datagram, &mut buf).is_ok()
                    && conn.send_datagram(Bytes::from(buf)).is_ok()
                {
                    return true;
                }
            }
            Counters::inc(&counters.datagrams_on_stream);
        }
        let mut frame = Vec::with_capacity(13 + datagram.len());
        if encode_data(src, datagram, &mut frame).is_err() {
            return false;
        }
        self.out.try_send(Out::Frame(frame)).is_ok()
    }

    /// Tells the connection why it ends, and ends it.
    fn close(&self, reason: String) {
        let _ = self.out.try_send(Out::Close(reason));
        self.kill.notify_one();
    }
}

struct Shared {
    core: Mutex<Core<Link>>,
    /// The core's stateless checks, run outside its lock.
    verifier: Verifier,
    next_conn: AtomicU64,
    counters: Counters,
    per_source: Mutex<HashMap<Source, usize>>,
    limiter: Mutex<FailureLimiter>,
    max_per_source: usize,
    handshake_timeout: Duration,
    shutdown: watch::Receiver<bool>,
}

impl Shared {
    fn core(&self) -> MutexGuard<'_, Core<Link>> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn limiter(&self) -> MutexGuard<'_, FailureLimiter> {
        self.limiter.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a connection slot for `source`, or `None` while the source is
    /// blocked by the failure limiter (counted there) or over the
    /// per-source cap.
    fn slot(self: &Arc<Self>, source: Source) -> Option<SourceSlot> {
        if self.limiter().check(source, now_ms()).is_err() {
            return None;
        }
        let mut m = self.per_source.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(source).or_default();
        if *n >= self.max_per_source {
            drop(m);
            Counters::inc(&self.counters.over_source_cap);
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            shared: self.clone(),
            source,
        })
    }

    /// Counts an invalid `HELLO` from `source`.
    fn hello_failed(&self, source: Source) {
        if let Some(b) = self.limiter().failure(source, now_ms()) {
            tracing::info!(
                ?source,
                until_ms = b.until_ms,
                "source blocked after invalid HELLOs"
            );
        }
    }

    fn stats(&self, name: &str) -> Stats {
        Stats {
            name: name.to_string(),
            written_at_ms: now_ms(),
            core: self.core().snapshot(),
            transport: self.counters.read(),
            limiter: self.limiter().stats(now_ms()),
        }
    }
}

struct SourceSlot {
    shared: Arc<Shared>,
    source: Source,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut m = self
            .shared
            .per_source
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.source);
            }
        }
    }
}

/// A running relay.
pub struct Running {
    pub identity: Identity,
    pub fingerprint: [u8; 32],
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Stops the relay: closes every connection, writes the last stats,
    /// releases the sockets and the data dir.
    ///
    /// # Errors
    /// What the relay's task failed with.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        self.task.await.context("relay task panicked")?
    }

    /// Runs until `signal` completes, then stops.
    ///
    /// # Errors
    /// As [`Running::stop`].
    pub async fn run_until(
        self,
        signal: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        signal.await;
        self.stop().await
    }
}

/// Binds every socket, writes `identity.json` and starts serving.
///
/// # Errors
/// The data dir is locked or unreadable, or a socket cannot be bound.
pub async fn start(cfg: ServeConfig) -> anyhow::Result<Running> {
    anyhow::ensure!(
        !cfg.name.is_empty() && cfg.name.len() <= 64,
        "relay name must be 1 to 64 characters"
    );
    anyhow::ensure!(
        cfg.stun_listen.len() <= 2,
        "at most two --stun-listen addresses"
    );
    let dir = cfg.data_dir.clone();
    dir.create()?;
    let lock = DirLock::acquire(&dir.lock_file())?;
    let tls = load_or_create_tls(&dir)?;
    let server_cfg = server_tls(tls.cert.clone(), tls.key.clone_key())
        .context("building the TLS configuration")?;
    let quic_crypto = quinn::crypto::rustls::QuicServerConfig::try_from(server_cfg.clone())
        .context("building the QUIC TLS configuration")?;
    let mut quic_cfg = quinn::ServerConfig::with_crypto(Arc::new(quic_crypto));
    quic_cfg.transport_config(Arc::new(transport(1, None)));
    let endpoint = quinn::Endpoint::server(quic_cfg, cfg.quic_listen)
        .with_context(|| format!("binding QUIC on {}", cfg.quic_listen))?;
    let tcp = TcpListener::bind(cfg.tcp_listen)
        .await
        .with_context(|| format!("binding TCP on {}", cfg.tcp_listen))?;
    let mut stun = Vec::new();
    for addr in &cfg.stun_listen {
        stun.push(
            UdpSocket::bind(addr)
                .await
                .with_context(|| format!("binding STUN on {addr}"))?,
        );
    }
    let identity = Identity::new(
        &cfg.name,
        endpoint.local_addr()?.to_string(),
        tcp.local_addr()?.to_string(),
        stun.iter()
            .map(|s| s.local_addr().map(|a| a.to_string()))
            .collect::<Result<_, _>>()?,
        &tls.fingerprint,
    );
    write_atomic(&dir.identity(), &serde_json::to_vec(&identity)?)?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let core = Core::new(Config {
        relay_name: cfg.name.clone(),
        controller_key: cfg.controller_key,
        max_nodes: cfg.max_nodes,
        memory_budget: cfg.memory_budget,
    });
    let shared = Arc::new(Shared {
        verifier: core.verifier(),
        core: Mutex::new(core),
        next_conn: AtomicU64::new(0),
        counters: Counters::default(),
        per_source: Mutex::new(HashMap::new()),
        limiter: Mutex::new(FailureLimiter::new(cfg.hello_limiter)),
        max_per_source: cfg.max_conns_per_source,
        handshake_timeout: cfg.handshake_timeout,
        shutdown: shutdown_rx.clone(),
    });
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let name = cfg.name.clone();
    let task = tokio::spawn(async move {
        let _lock = lock;
        let mut loops = JoinSet::new();
        loops.spawn(quic_accept(shared.clone(), endpoint.clone()));
        loops.spawn(tcp_accept(shared.clone(), tcp, acceptor));
        for sock in stun {
            loops.spawn(stun_loop(shared.clone(), sock));
        }
        loops.spawn(stats_loop(shared.clone(), dir.clone(), name.clone()));
        let mut shutdown = shutdown_rx;
        let _ = shutdown.wait_for(|stop| *stop).await;
        loops.abort_all();
        while loops.join_next().await.is_some() {}
        endpoint.close(quinn::VarInt::from_u32(0), b"relay stopping");
        // Sessions see the shutdown and end; bounded wait for them.
        for _ in 0..40 {
            if shared.core().sessions() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        write_stats(&shared, &dir, &name);
        Ok(())
    });
    Ok(Running {
        identity,
        fingerprint: tls.fingerprint,
        shutdown: shutdown_tx,
        task,
    })
}

async fn quic_accept(shared: Arc<Shared>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        let Some(slot) = shared.slot(incoming.remote_address().ip().into()) else {
            incoming.refuse();
            continue;
        };
        tokio::spawn(quic_conn(shared.clone(), incoming, slot));
    }
}

async fn quic_conn(shared: Arc<Shared>, incoming: quinn::Incoming, slot: SourceSlot) {
    let handshake = async {
        let conn = incoming.await.ok()?;
        let (send, mut recv) = conn.accept_bi().await.ok()?;
        let (hello, held) = read_hello(&shared, slot.source, &mut recv).await?;
        Some((conn, send, recv, hello, held))
    };
    let Some((conn, send, recv, hello, held)) = handshake_within(&shared, handshake).await else {
        return;
    };
    Counters::inc(&shared.counters.quic_connections);
    session(shared, recv, send, Some(conn), hello, held, slot.source).await;
}

async fn tcp_accept(
    shared: Arc<Shared>,
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
) {
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            // Out of file descriptors or similar: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Some(slot) = shared.slot(peer.ip().into()) else {
            continue;
        };
        if let Err(e) = tune_tcp(&tcp) {
            tracing::debug!(error = %e, "cannot set TCP keepalive; closing");
            continue;
        }
        tokio::spawn(tcp_conn(shared.clone(), tcp, acceptor.clone(), slot));
    }
}

async fn tcp_conn(
    shared: Arc<Shared>,
    tcp: tokio::net::TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    slot: SourceSlot,
) {
    let handshake = async {
        let tls = acceptor.accept(tcp).await.ok()?;
        let (mut recv, send) = tokio::io::split(tls);
        let (hello, held) = read_hello(&shared, slot.source, &mut recv).await?;
        Some((recv, send, hello, held))
    };
    let Some((recv, send, hello, held)) = handshake_within(&shared, handshake).await else {
        return;
    };
    Counters::inc(&shared.counters.tcp_connections);
    session(shared, recv, send, None, hello, held, slot.source).await;
}

/// Budget bytes held for the `HELLO` buffer of a client not yet welcomed;
/// returned when dropped.
struct Unauthenticated {
    shared: Arc<Shared>,
    source: Source,
    bytes: u64,
}

impl Unauthenticated {
    fn grow(&mut self, n: usize) -> bool {
        let ok = self
            .shared
            .core()
            .reserve_unauthenticated(self.source, n as u64)
            .is_ok();
        if ok {
            self.bytes += n as u64;
        }
        ok
    }
}

impl Drop for Unauthenticated {
    fn drop(&mut self) {
        self.shared
            .core()
            .release_unauthenticated(self.source, self.bytes);
    }
}

/// Reads the first frame of a client; its buffer is reserved from the
/// unauthenticated share of the memory budget as it grows. `None` for a
/// stream that ended before a frame.
async fn read_hello<R: AsyncRead + Unpin>(
    shared: &Arc<Shared>,
    source: Source,
    recv: &mut R,
) -> Option<(Result<Vec<u8>, ReadError>, Unauthenticated)> {
    let mut held = Unauthenticated {
        shared: shared.clone(),
        source,
        bytes: 0,
    };
    let mut hello = Vec::new();
    let read = read_frame(recv, &mut hello, from_client, &mut |n| held.grow(n)).await;
    match read {
        Ok(true) => Some((Ok(hello), held)),
        Ok(false) => None,
        Err(e) => Some((Err(e), held)),
    }
}

/// Runs a handshake under the deadline, counting timeouts and failures.
async fn handshake_within<T>(
    shared: &Shared,
    handshake: impl std::future::Future<Output = Option<T>>,
) -> Option<T> {
    match tokio::time::timeout(shared.handshake_timeout, handshake).await {
        Ok(Some(t)) => Some(t),
        Ok(None) => {
            Counters::inc(&shared.counters.handshake_failures);
            None
        }
        Err(_) => {
            Counters::inc(&shared.counters.handshake_timeouts);
            None
        }
    }
}

/// One client, from its `HELLO` to its end.
async fn session<R, W>(
    shared: Arc<Shared>,
    mut reader: R,
    mut writer: W,
    quic: Option<quinn::Connection>,
    hello: Result<Vec<u8>, ReadError>,
    held: Unauthenticated,
    source: Source,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let conn_id = shared.conn_id();
    let hello = match hello {
        Ok(bytes) => bytes,
        Err(ReadError::OverBudget { len }) => {
            // Counted by the core as an `over_memory_budget` refusal.
            drop(held);
            let reason = format!(
                "relay over its memory budget: no room for a {len}-byte HELLO now; \
                 try again later or another relay"
            );
            refuse(&mut writer, quic.as_ref(), reason).await;
            return;
        }
        Err(ReadError::Io(e)) => {
            // The client went away mid-HELLO (a slow uplink gave up, a
            // laptop changed networks): not evidence of an attack, so the
            // failure limiter does not count it.
            shared.core().count_drop(DropReason::MalformedFrame);
            tracing::debug!(conn = conn_id, error = %e, "HELLO cut short");
            return;
        }
        Err(e) => {
            shared.core().count_drop(DropReason::MalformedFrame);
            shared.hello_failed(source);
            refuse(&mut writer, quic.as_ref(), format!("malformed HELLO: {e}")).await;
            return;
        }
    };
    // Blocked while this connection was in its handshake: refused before
    // the proof and the map are verified.
    let blocked = shared.limiter().check(source, now_ms());
    if let Err(b) = blocked {
        let secs = (b.until_ms - now_ms()).max(0) / 1_000 + 1;
        let reason = format!("too many invalid HELLOs from this address; try again in {secs} s");
        refuse(&mut writer, quic.as_ref(), reason).await;
        return;
    }
    let (proof, map) = match decode_frame(&hello) {
        Ok(Frame::Hello { proof, map }) => (proof, map),
        Ok(_) => {
            shared.core().count_drop(DropReason::UnexpectedFrame);
            shared.hello_failed(source);
            refuse(&mut writer, quic.as_ref(), "expected HELLO".into()).await;
            return;
        }
        Err(e) => {
            shared.core().count_drop(DropReason::MalformedFrame);
            shared.hello_failed(source);
            refuse(&mut writer, quic.as_ref(), format!("malformed HELLO: {e}")).await;
            return;
        }
    };
    drop(hello);
    let (tx, rx) = mpsc::channel(OUT_QUEUE);
    let kill = Arc::new(Notify::new());
    let link = Link {
        out: tx,
        quic: quic.clone(),
        kill: kill.clone(),
    };
    // The HELLO is decoded: its buffer no longer counts, so the admission
    // check below does not see this client's own bytes.
    drop(held);
    // The expensive checks (a hash of the whole map, an Ed25519
    // verification) run outside the core's lock, on the blocking pool: a
    // stranger's large HELLO must not stall the datagrams of everyone else.
    let verifier = shared.verifier.clone();
    let verified = tokio::task::spawn_blocking(move || {
        let checked = verifier.hello(&proof, &map, now_ms());
        (proof, checked)
    })
    .await;
    let Ok((proof, checked)) = verified else {
        refuse(&mut writer, quic.as_ref(), "relay stopping".into()).await;
        return;
    };
    // Every later MAP of this session is checked against this key.
    let machine_key = proof.machine_key;
    let welcome = match checked {
        Ok(checked) => shared
            .core()
            .admit(conn_id, link.clone(), &proof, checked, now_ms()),
        Err(r) => {
            shared.core().count_refusal(&r);
            Err(r)
        }
    };
    let node = match welcome {
        Ok(w) => {
            if let Some(old) = w.replaced {
                old.close("replaced by a newer session of this node".into());
            }
            w.node
        }
        Err(r) => {
            tracing::debug!(conn = conn_id, reason = r.name(), "HELLO refused");
            if r.is_clients_fault() {
                shared.hello_failed(source);
            }
            refuse(&mut writer, quic.as_ref(), r.to_string()).await;
            return;
        }
    };
    tracing::debug!(node, conn = conn_id, quic = quic.is_some(), "session open");
    let welcome = Frame::Welcome { node_id: node }
        .to_vec()
        .expect("WELCOME always encodes");
    if writer.write_all(&welcome).await.is_err() || writer.flush().await.is_err() {
        shared.core().disconnect(node, conn_id, now_ms());
        return;
    }
    let writer_task = tokio::spawn(write_loop(writer, rx));
    let datagrams = quic
        .clone()
        .map(|c| tokio::spawn(datagram_loop(shared.clone(), node, conn_id, c)));
    let mut shutdown = shared.shutdown.clone();
    let mut buf = Vec::new();
    let mut big = BigBuffer::default();
    let mut refused = false;
    loop {
        big.shrink(&shared, &mut buf);
        let mut grow = |n| big.grow(&shared, n);
        let read = tokio::select! {
            r = read_frame(&mut reader, &mut buf, from_client, &mut grow) => r,
            _ = kill.notified() => { refused = true; break }
            _ = shutdown.wait_for(|stop| *stop) => {
                link.close("relay stopping".into());
                refused = true;
                break;
            }
        };
        let reason = match read {
            // A session's buffer is never refused (`BigBuffer::grow`).
            Ok(false) | Err(ReadError::Io(_) | ReadError::OverBudget { .. }) => break,
            Err(ReadError::Frame(e)) => {
                shared.core().count_drop(DropReason::MalformedFrame);
                format!("malformed frame: {e}")
            }
            Ok(true) => match decode_frame(&buf) {
                Ok(Frame::Data { peer, datagram }) => {
                    forward(&shared, node, conn_id, peer, datagram);
                    continue;
                }
                Ok(Frame::Map(map)) => {
                    // Checked outside the core's lock, as the HELLO was.
                    let verifier = shared.verifier.clone();
                    let checked = tokio::task::spawn_blocking(move || {
                        verifier.map(&machine_key, &map, now_ms())
                    })
                    .await;
                    let applied = match checked {
                        Ok(Ok(c)) => shared.core().apply_map(node, conn_id, c, now_ms()),
                        Ok(Err(r)) => {
                            shared.core().count_refusal(&r);
                            Err(r)
                        }
                        Err(_) => break,
                    };
                    match applied {
                        Ok(()) => continue,
                        Err(r) => r.to_string(),
                    }
                }
                Ok(_) => {
                    shared.core().count_drop(DropReason::UnexpectedFrame);
                    "unexpected frame".into()
                }
                Err(e) => {
                    shared.core().count_drop(DropReason::MalformedFrame);
                    format!("malformed frame: {e}")
                }
            },
        };
        link.close(reason);
        refused = true;
        break;
    }
    shared.core().disconnect(node, conn_id, now_ms());
    big.release(&shared);
    tracing::debug!(node, conn = conn_id, "session closed");
    if let Some(t) = datagrams {
        t.abort();
    }
    drop(link);
    // The writer sends a queued REFUSED and ends; it also ends when every
    // sender is gone. Bounded either way.
    let abort = writer_task.abort_handle();
    if tokio::time::timeout(Duration::from_secs(2), writer_task)
        .await
        .is_err()
    {
        abort.abort();
    }
    if let Some(conn) = quic {
        if refused {
            // Let the REFUSED frame arrive before the connection goes.
            let _ = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
        }
        conn.close(quinn::VarInt::from_u32(0), b"session ended");
    }
}

/// A session's frame buffer beyond [`READ_CHUNK`] (a large `MAP`): counted
/// in the memory estimate while held, freed after the frame.
#[derive(Default)]
struct BigBuffer {
    capacity: usize,
    counted: u64,
}

impl BigBuffer {
    fn grow(&mut self, shared: &Shared, n: usize) -> bool {
        self.capacity += n;
        let over = self.capacity.saturating_sub(READ_CHUNK) as u64;
        if over > self.counted {
            shared.core().hold_session_buffer(over - self.counted);
            self.counted = over;
        }
        true
    }

    /// Frees a buffer that grew beyond [`READ_CHUNK`].
    fn shrink(&mut self, shared: &Shared, buf: &mut Vec<u8>) {
        if buf.capacity() > READ_CHUNK {
            *buf = Vec::new();
            self.capacity = 0;
            self.release(shared);
        }
    }

    fn release(&mut self, shared: &Shared) {
        shared
            .core()
            .release_session_buffer(std::mem::take(&mut self.counted));
    }
}

/// Writes `REFUSED {reason}` and ends the stream (and the QUIC connection,
/// once the client has read it or after a second).
async fn refuse<W: AsyncWrite + Unpin>(
    w: &mut W,
    quic: Option<&quinn::Connection>,
    reason: String,
) {
    if let Ok(frame) = refused_frame(reason) {
        let _ = w.write_all(&frame).await;
    }
    let _ = w.shutdown().await;
    if let Some(conn) = quic {
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
        conn.close(quinn::VarInt::from_u32(1), b"refused");
    }
}

fn refused_frame(mut reason: String) -> Result<Vec<u8>, ztmesh_proto::relay::FrameError> {
    if reason.len() > ztmesh_proto::relay::MAX_REASON_LEN {
        let mut end = ztmesh_proto::relay::MAX_REASON_LEN;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    Frame::Refused {
        reason: reason.into(),
    }
    .to_vec()
}

/// Writes queued frames in batches; a `Close` writes `REFUSED` and ends.
async fn write_loop<W: AsyncWrite + Unpin>(mut w: W, mut rx: mpsc::Receiver<Out>) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    while let Some(first) = rx.recv().await {
        let mut close = None;
        let mut next = Some(first);
        while let Some(out) = next.take() {
            match out {
                Out::Frame(f) => batch.extend_from_slice(&f),
                Out::Close(reason) => {
                    close = Some(reason);
                    break;
                }
            }
            if batch.len() < WRITE_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            if w.write_all(&batch).await.is_err() || w.flush().await.is_err() {
                return;
            }
            batch.clear();
        }
        if let Some(reason) = close {
            if let Ok(frame) = refused_frame(reason) {
                let _ = w.write_all(&frame).await;
            }
            let _ = w.shutdown().await;
            return;
        }
    }
    let _ = w.shutdown().await;
}

async fn datagram_loop(
    shared: Arc<Shared>,
    node: NodeId,
    conn_id: ConnId,
    conn: quinn::Connection,
) {
    while let Ok(d) = conn.read_datagram().await {
        match decode_datagram(&d) {
            Ok((peer, datagram)) => forward(&shared, node, conn_id, peer, datagram),
            Err(_) => shared.core().count_drop(DropReason::MalformedDatagram),
        }
    }
}

fn forward(shared: &Shared, src: NodeId, conn_id: ConnId, dst: NodeId, datagram: &[u8]) {
    let link = shared
        .core()
        .route(src, conn_id, dst, datagram.len(), now_ms());
    if let Ok(link) = link {
        if !link.deliver(src, datagram, &shared.counters) {
            shared.core().count_drop(DropReason::Congested);
        }
    }
}

async fn stun_loop(shared: Arc<Shared>, sock: UdpSocket) {
    let mut buf = vec![0u8; 2_048];
    loop {
        let Ok((n, src)) = sock.recv_from(&mut buf).await else {
            // ICMP errors surface here on Linux; nothing to do but go on.
            Counters::inc(&shared.counters.stun_dropped);
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        };
        match binding_response(&buf[..n], src) {
            Some(response) => {
                if sock.send_to(&response, src).await.is_ok() {
                    Counters::inc(&shared.counters.stun_answered);
                }
            }
            None => Counters::inc(&shared.counters.stun_dropped),
        }
    }
}

async fn stats_loop(shared: Arc<Shared>, dir: DataDir, name: String) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        write_stats(&shared, &dir, &name);
    }
}

fn write_stats(shared: &Shared, dir: &DataDir, name: &str) {
    let stats = shared.stats(name);
    match serde_json::to_vec_pretty(&stats) {
        Ok(bytes) => {
            if let Err(e) = write_atomic(&dir.stats(), &bytes) {
                tracing::warn!(error = %e, "cannot write stats");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot encode stats"),
    }
}
