//! The I/O shell around [`Device`]: a Linux TUN device (tun-rs), UDP sockets
//! on IPv4 and IPv6, the timer, and the UAPI socket.
//!
//! One thread owns the `Device`, the TUN and the sockets, so the hot path
//! takes no lock and allocates nothing: buffers are allocated once at start.
//! The thread runs a plain epoll loop (mio), not an async runtime: a packet
//! on an idle tunnel costs one `epoll_wait` and the reads and writes it needs,
//! with no task wake-up, scheduler or select in between (tokio's share of an
//! idle echo was about a third of the tunnel's user time, see BENCHMARKS.md).
//! Each event reads a batch, hands its packets to the device one by one and
//! writes the outputs in as few syscalls as the kernel allows:
//! - TUN readable: one read of up to 64 KiB (TSO super-packet, split into
//!   segments by tun-rs) → `handle_tun` per segment, encrypted back to back
//!   into one buffer → one UDP GSO send per run of datagrams to one peer;
//! - UDP readable: one `recvmmsg` whose buffers hold up to 64 datagrams each
//!   (UDP GRO) → `handle_udp` per datagram → the plaintexts coalesced per
//!   flow (TUN GRO) → one TUN write per flow.
//!
//! Control calls ([`DataPlane::set_peers`], [`DataPlane::set_filter`],
//! [`DataPlane::set_stun_servers`], [`DataPlane::set_local_addresses`]) and
//! UAPI requests travel over a channel and ring an eventfd in the epoll set;
//! they are applied between batches. The relay link (QUIC, TLS) runs as tasks
//! on the caller's tokio runtime and hands received datagrams over a bounded
//! channel and the same eventfd.
//!
//! Endpoint discovery shares the WireGuard sockets: Binding requests go out
//! of them (so a STUN server reports the NAT mapping peers must use), and on
//! receive one [`is_stun`] check per datagram sends STUN answers to the pure
//! [`Discovery`] instead of the `Device`. That check is all it costs the
//! WireGuard path.

pub mod hostroute;
mod ifaddrs;
mod relay;
mod tun;
mod udp;

pub use self::ifaddrs::interface_addresses;
pub use self::relay::{RelaySetup, RelayState};

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use ipnet::IpNet;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use quinn_udp::RecvMeta;
use tokio::sync::mpsc;
use tun_rs::SyncDevice;
use ztmesh_proto::keys::{WgPrivateKey, WgPublicKey};
use ztmesh_proto::stun::is_stun;

use self::relay::RelayLink;
use self::tun::{TunRx, TunTx};
use self::udp::{unmap, TxBatch, Udp};
use crate::filter::Ruleset;
use crate::nat::discovery::{Discovery, Response as StunResponse};
use crate::tunnel::{
    Destination, Device, DropReason, Output, PeerConfig, PeerStatus, Transmit, MIN_BUFFER, OVERHEAD,
};
use crate::uapi;

/// Default inner MTU: safe for WireGuard over IPv6 paths with a 1280-byte minimum.
pub const DEFAULT_MTU: u16 = 1280;
/// Default TUN interface name.
pub const DEFAULT_INTERFACE: &str = "ztm0";
/// Default directory of UAPI sockets (as wireguard-go).
pub const DEFAULT_UAPI_DIR: &str = "/var/run/wireguard";
/// Buffer size: the largest IP packet plus WireGuard overhead.
const BUF: usize = 65_536 + 64;
/// Receive buffer of the UDP sockets: about 10 ms at 10 Gbit/s, so a burst
/// that arrives while the task encrypts is queued, not dropped. Set with
/// `SO_RCVBUFFORCE` when privileged (above net.core.rmem_max), else capped.
const SOCKET_RECV_BUFFER: usize = 16 << 20;
/// Send buffer: about 2 ms at 10 Gbit/s (GSO sends are up to 64 KiB each).
const SOCKET_SEND_BUFFER: usize = 4 << 20;
/// Receive buffers per `recvmmsg`, each large enough for a GRO batch.
const UDP_RX_BUFFERS: usize = 8;
/// Bytes of one UDP receive buffer: the largest GRO batch the kernel builds.
const UDP_RX_BUFFER: usize = 65_536;
/// Packets gathered from one source before they are written out: a full GSO
/// send (64 segments) of small packets.
const DRAIN_PACKETS: usize = 64;
/// `recvmmsg` calls per UDP batch: enough for [`DRAIN_PACKETS`] datagrams
/// without GRO (8 × 8), and the bound on a batch whose datagrams decrypt to
/// nothing (junk, STUN, handshakes), which never fill the TUN batch: without
/// it a flood the loop cannot outrun would keep it on one socket for good.
const UDP_RECV_CALLS: usize = 8;
/// How often the stats snapshot behind [`DataPlane::stats`] is refreshed.
const STATS_INTERVAL: Duration = Duration::from_secs(1);
/// How long a send waits for room in a full socket buffer before its
/// datagrams are dropped (as the kernel drops on a full queue).
const SEND_WAIT: Duration = Duration::from_millis(100);
/// Turns in a row that may end in a read error before the source is treated
/// as drained (it is read again at its next readiness edge): a device gone
/// bad must not spin the thread.
const ERROR_TURNS: u8 = 8;
/// Commands and relayed datagrams taken per turn, so neither starves the
/// sockets.
const INBOX_BATCH: usize = 64;

const TUN: Token = Token(0);
const UDP4: Token = Token(1);
const UDP6: Token = Token(2);
const WAKE: Token = Token(3);

/// What the data plane needs to start.
#[derive(Debug, Clone)]
pub struct DataPlaneConfig {
    /// TUN interface name (e.g. `ztm0`); also names the UAPI socket.
    pub interface: String,
    /// Inner MTU of the TUN device.
    pub mtu: u16,
    /// This node's WireGuard private key.
    pub private_key: WgPrivateKey,
    /// UDP port to listen on (0: pick one; see [`DataPlane::local_port`]).
    pub listen_port: u16,
    /// Addresses assigned to the TUN device, with their prefix length.
    pub addresses: Vec<IpNet>,
    /// Prefixes routed into the TUN device (e.g. 100.64.0.0/10 and the ULA /48).
    pub routes: Vec<IpNet>,
    /// Directory for the UAPI socket `IFACE.sock` (`None`: no UAPI socket).
    pub uapi_dir: Option<PathBuf>,
    /// True when the controller manages the interface: UAPI `set` is refused.
    pub managed: bool,
}

/// A snapshot of the data plane for `status`, metrics and `wg show`.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// This node's public key (`None` before the first snapshot).
    pub public_key: Option<WgPublicKey>,
    /// The UDP port in use.
    pub listen_port: u16,
    /// Per-peer state, in public key order.
    pub peers: Vec<PeerStats>,
    /// Drop counters by reason (`spoofed_source`, `no_rule`, `replay`, …), fixed order.
    pub drops: Vec<(&'static str, u64)>,
    /// Denied inbound flows not yet taken by [`DataPlane::take_flows`]
    /// (at most [`crate::filter::MAX_DENIED_FLOWS`] distinct ones).
    pub denied_flows: std::collections::BTreeMap<crate::filter::DeniedFlow, u64>,
    /// This node's endpoint candidates (local first, then reflexive), see
    /// [`Discovery::candidates`].
    pub candidates: Vec<SocketAddr>,
    /// Each STUN server and the reflexive address it last reported.
    pub stun: Vec<(SocketAddr, Option<SocketAddr>)>,
    /// The relay link (name empty: none).
    pub relay: RelayState,
    /// Handshakes completed since the data plane started.
    pub handshakes: u64,
    /// Inbound packets the filter allowed (its denials are among `drops`).
    pub filter_allowed: u64,
    /// Inbound packets the filter denied (the sum of its reasons in `drops`).
    pub filter_denied: u64,
}

/// One peer in [`Stats`].
#[derive(Debug, Clone)]
pub struct PeerStats {
    /// The peer's public key.
    pub public_key: WgPublicKey,
    /// Current endpoint.
    pub endpoint: Option<SocketAddr>,
    /// Where data for the peer goes now (a UDP address or the relay).
    pub destination: Option<Destination>,
    /// True while a direct path is fresh.
    pub direct: bool,
    /// The path the last authenticated packet from the peer came by.
    pub last_rx: Option<Destination>,
    /// Wall-clock time of the last completed handshake.
    pub last_handshake: Option<SystemTime>,
    /// Bytes received (WireGuard datagrams).
    pub rx_bytes: u64,
    /// Bytes sent (WireGuard datagrams).
    pub tx_bytes: u64,
    /// The peer's AllowedIPs.
    pub allowed_ips: Vec<IpNet>,
    /// Persistent keepalive interval in seconds.
    pub persistent_keepalive: Option<u16>,
}

/// The flows the filter saw since the last [`DataPlane::take_flows`].
#[derive(Debug, Clone, Default)]
pub struct FlowLog {
    /// Allowed inbound flows that carried traffic, with wall-clock times.
    pub allowed: Vec<AllowedFlow>,
    /// Allowed flows not summarized because too many were pending (a total
    /// since the data plane started).
    pub allowed_overflow: u64,
    /// Denied inbound flows and their packet counts.
    pub denied: Vec<(crate::filter::DeniedFlow, u64)>,
    /// Verified handshake initiations from keys that are not peers.
    pub unknown_handshakes: Vec<([u8; 32], u64)>,
}

/// One allowed flow in a [`FlowLog`].
#[derive(Debug, Clone)]
pub struct AllowedFlow {
    pub key: crate::filter::AllowedKey,
    pub packets: u64,
    pub bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
}

enum Command {
    Peers(Vec<PeerConfig>),
    /// Take the flow log; `false`: denied flows and unknown handshakes
    /// only (the early report), the allowed flows stay for the next one.
    TakeFlows(tokio::sync::oneshot::Sender<FlowLog>, bool),
    Filter(Option<Ruleset>),
    StunServers(Vec<SocketAddr>),
    LocalAddresses(Vec<IpAddr>),
    Relay(Option<RelaySetup>),
    Uapi(uapi::Request),
    Shutdown,
}

/// A running data plane: TUN device, UDP sockets, the device task and the UAPI socket.
pub struct DataPlane {
    commands: mpsc::UnboundedSender<Command>,
    /// Rings the data-plane thread's epoll after each command.
    waker: Arc<Waker>,
    stats: Arc<Mutex<Stats>>,
    port: u16,
    thread: Option<std::thread::JoinHandle<()>>,
    uapi: Option<uapi::Server>,
}

impl std::fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlane")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl DataPlane {
    /// Creates the TUN device, assigns addresses and routes, binds the UDP
    /// sockets, starts the device task and the UAPI socket. Starts with no
    /// peers and the filter in standalone mode (accept all from peers) unless
    /// `managed`, in which case it starts with deny-all until [`DataPlane::set_filter`].
    ///
    /// # Errors
    /// Creating the TUN device (needs CAP_NET_ADMIN), binding the port,
    /// adding routes, or creating the UAPI socket failed.
    pub async fn start(cfg: DataPlaneConfig) -> anyhow::Result<DataPlane> {
        let stats = Arc::new(Mutex::new(Stats::default()));
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (uapi_tx, uapi_rx) = mpsc::unbounded_channel();
        // Relay links → forwarder (on this runtime) → data-plane thread.
        let (relay_tx, relay_fwd_rx) = mpsc::channel(relay::OUT_QUEUE);
        let (relay_fwd_tx, relay_rx) = mpsc::channel(relay::OUT_QUEUE);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let thread = {
            let cfg = cfg.clone();
            let stats = stats.clone();
            let inbox = Inbox {
                commands: command_rx,
                relay: relay_rx,
                relay_tx,
                runtime: tokio::runtime::Handle::current(),
            };
            std::thread::Builder::new()
                .name("ztmesh-dataplane".into())
                .spawn(move || run_thread(cfg, inbox, stats, ready_tx))
                .context("spawning the data plane thread")?
        };
        let (port, waker) = match ready_rx.await {
            Ok(Ok(ready)) => ready,
            Ok(Err(e)) => {
                let _ = tokio::task::spawn_blocking(move || thread.join()).await;
                return Err(e);
            }
            Err(_) => anyhow::bail!("the data plane thread exited during start"),
        };
        tokio::spawn(forward_relay(relay_fwd_rx, relay_fwd_tx, waker.clone()));
        tokio::spawn(forward_uapi(uapi_rx, commands.clone(), waker.clone()));
        let mut plane = DataPlane {
            commands,
            waker,
            stats,
            port,
            thread: Some(thread),
            uapi: None,
        };
        if let Some(dir) = &cfg.uapi_dir {
            match uapi::Server::start(dir, &cfg.interface, cfg.managed, uapi_tx) {
                Ok(server) => plane.uapi = Some(server),
                Err(e) => {
                    plane.shutdown().await;
                    return Err(e).with_context(|| format!("UAPI socket in {}", dir.display()));
                }
            }
        }
        tracing::info!(interface = %cfg.interface, port, mtu = cfg.mtu, managed = cfg.managed, "data plane up");
        Ok(plane)
    }

    /// Replaces the peer set, applied as a diff: unchanged peers keep their
    /// sessions; removed peers' sessions and conntrack entries go at once.
    pub fn set_peers(&self, peers: Vec<PeerConfig>) {
        self.command(Command::Peers(peers));
    }

    /// Replaces the inbound filter: `None` accepts all traffic from peers
    /// (standalone); `Some(vec![])` denies all inbound flows but still admits
    /// replies to flows this node opened.
    pub fn set_filter(&self, rules: Option<Ruleset>) {
        self.command(Command::Filter(rules));
    }

    /// Sets the STUN servers asked for this node's reflexive address, from
    /// the data-plane sockets: at once when the set changes, then every
    /// [`crate::nat::discovery::STUN_INTERVAL`]. An empty set stops it.
    pub fn set_stun_servers(&self, servers: Vec<SocketAddr>) {
        self.command(Command::StunServers(servers));
    }

    /// Sets this node's interface addresses (most preferred first), the
    /// local endpoint candidates (with the data-plane port).
    pub fn set_local_addresses(&self, addrs: Vec<IpAddr>) {
        self.command(Command::LocalAddresses(addrs));
    }

    /// Sets the relay link: `Some` with the map's relays, this node's
    /// machine key and the signed map (connects to the first relay, or
    /// pushes the map to the one already connected); `None` closes it.
    pub fn set_relay(&self, setup: Option<RelaySetup>) {
        self.command(Command::Relay(setup));
    }

    /// This node's endpoint candidates, as of the latest snapshot.
    pub fn candidates(&self) -> Vec<SocketAddr> {
        self.stats
            .lock()
            .map(|s| s.candidates.clone())
            .unwrap_or_default()
    }

    /// The latest snapshot (refreshed every second and after each change).
    pub fn stats(&self) -> Stats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Takes the allowed and denied flows the filter summarized since the
    /// last call (empty if the data plane has stopped).
    pub async fn take_flows(&self, with_allowed: bool) -> FlowLog {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if !self.command(Command::TakeFlows(tx, with_allowed)) {
            return FlowLog::default();
        }
        rx.await.unwrap_or_default()
    }

    /// The UDP port the data plane listens on.
    pub fn local_port(&self) -> u16 {
        self.port
    }

    /// Stops the data plane thread; the TUN device disappears with its file
    /// descriptor, the sockets close and the UAPI socket file is removed.
    pub async fn shutdown(mut self) {
        self.command(Command::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        if let Some(u) = self.uapi.take() {
            u.stop();
        }
    }

    /// Queues a command and wakes the data-plane thread; false if it has stopped.
    fn command(&self, c: Command) -> bool {
        let sent = self.commands.send(c).is_ok();
        if let Err(e) = self.waker.wake() {
            tracing::debug!(error = %e, "waking the data plane failed");
        }
        sent
    }
}

/// Dropped without [`DataPlane::shutdown`]: the thread is told to stop. (A
/// closed channel would not tell it: the UAPI forwarder holds a sender for
/// as long as the UAPI server runs.)
impl Drop for DataPlane {
    fn drop(&mut self) {
        self.command(Command::Shutdown);
    }
}

/// Relayed datagrams from the relay link's tasks into the data plane's
/// queue, waking it for each; the queue's bound holds the link back.
async fn forward_relay(
    mut from: mpsc::Receiver<(u64, Vec<u8>)>,
    to: mpsc::Sender<(u64, Vec<u8>)>,
    waker: Arc<Waker>,
) {
    while let Some(d) = from.recv().await {
        if to.send(d).await.is_err() {
            break;
        }
        let _ = waker.wake();
    }
}

/// UAPI requests (`wg show`, `wg set`) into the command queue.
async fn forward_uapi(
    mut from: mpsc::UnboundedReceiver<uapi::Request>,
    to: mpsc::UnboundedSender<Command>,
    waker: Arc<Waker>,
) {
    while let Some(r) = from.recv().await {
        if to.send(Command::Uapi(r)).is_err() {
            break;
        }
        let _ = waker.wake();
    }
}

/// What reaches the data-plane thread from elsewhere: commands (control
/// calls and UAPI requests) and datagrams the relay link received. Both ring
/// the thread's [`Waker`].
struct Inbox {
    commands: mpsc::UnboundedReceiver<Command>,
    relay: mpsc::Receiver<(u64, Vec<u8>)>,
    /// Given to each relay link for the datagrams it receives.
    relay_tx: mpsc::Sender<(u64, Vec<u8>)>,
    /// The runtime of [`DataPlane::start`]'s caller: the relay link's tasks run there.
    runtime: tokio::runtime::Handle,
}

/// The data plane thread: an epoll loop that owns the TUN, the sockets and
/// the `Device`. A thread of its own keeps the hot path off the control
/// plane's runtime: no work stealing, no cross-thread wake-ups, and the
/// control loop's TLS and gRPC work never delays a packet.
#[expect(
    clippy::disallowed_methods,
    reason = "the data-plane shell starts the Device at the real time"
)]
fn run_thread(
    cfg: DataPlaneConfig,
    inbox: Inbox,
    stats: Arc<Mutex<Stats>>,
    ready: tokio::sync::oneshot::Sender<anyhow::Result<(u16, Arc<Waker>)>>,
) {
    // Relay links spawn their tasks on the caller's runtime.
    let runtime = inbox.runtime.clone();
    let _runtime = runtime.enter();
    let setup = || -> anyhow::Result<(Worker, Arc<Waker>)> {
        let (udp4, udp6) = bind_udp(cfg.listen_port)?;
        let port = udp4.local_addr()?.port();
        let tun = create_tun(&cfg).with_context(|| format!("creating TUN {}", cfg.interface))?;
        tun.set_nonblocking(true).context("TUN non-blocking")?;
        let poll = Poll::new().context("epoll")?;
        let registry = poll.registry();
        // Readable only: a writable edge after every send would wake the loop for nothing.
        registry.register(&mut SourceFd(&tun.as_raw_fd()), TUN, Interest::READABLE)?;
        registry.register(&mut SourceFd(&udp4.as_raw_fd()), UDP4, Interest::READABLE)?;
        if let Some(u) = &udp6 {
            registry.register(&mut SourceFd(&u.as_raw_fd()), UDP6, Interest::READABLE)?;
        }
        let waker = Arc::new(Waker::new(registry, WAKE).context("eventfd")?);
        let rules = if cfg.managed {
            Some(Ruleset::default())
        } else {
            None
        };
        let worker = Worker {
            relay: None,
            inbox,
            discovery: Discovery::new(port),
            stun_deadline: None,
            stun_dirty: false,
            device: Device::new(&cfg.private_key, rules.clone(), Instant::now()),
            private_key: cfg.private_key.clone(),
            rules,
            poll,
            tun,
            udp4,
            udp6,
            port,
            mtu: usize::from(cfg.mtu),
            stats,
        };
        Ok((worker, waker))
    };
    match setup() {
        Ok((mut worker, waker)) => {
            worker.publish_stats();
            if ready.send(Ok((worker.port, waker))).is_ok() {
                worker.run();
            }
        }
        Err(e) => {
            let _ = ready.send(Err(e));
        }
    }
}

struct Worker {
    device: Device,
    relay: Option<RelayLink>,
    inbox: Inbox,
    discovery: Discovery,
    /// [`Discovery::poll_timeout`], kept so a turn of the loop does not recompute it.
    stun_deadline: Option<Instant>,
    /// Set when discovery's state changed (a command, an answer): its
    /// deadline and the published candidates are brought up to date.
    stun_dirty: bool,
    private_key: WgPrivateKey,
    rules: Option<Ruleset>,
    poll: Poll,
    tun: SyncDevice,
    udp4: Udp,
    udp6: Option<Udp>,
    port: u16,
    mtu: usize,
    stats: Arc<Mutex<Stats>>,
}

/// How a batch from one source ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drained {
    /// The source is empty (a read found nothing): wait for its next edge.
    Empty,
    /// Stopped at a batch bound: more may be queued.
    More,
    /// A read failed; the next one may succeed.
    Error,
}

/// The readiness of one edge-triggered source: set by epoll, kept until a
/// read finds the source empty, since epoll reports only new arrivals.
#[derive(Debug, Default)]
struct Ready {
    set: bool,
    errors: u8,
}

impl Ready {
    fn after(&mut self, batch: Drained) {
        match batch {
            Drained::Empty => *self = Ready::default(),
            Drained::More => self.errors = 0,
            Drained::Error => {
                self.errors += 1;
                if self.errors >= ERROR_TURNS {
                    tracing::warn!("reads keep failing; waiting for new packets");
                    *self = Ready::default();
                }
            }
        }
    }
}

/// The buffers of the hot path, allocated once.
struct Buffers {
    tun_rx: TunRx,
    tun_tx: TunTx,
    udp_tx: TxBatch,
    udp_rx: Vec<Vec<u8>>,
    udp_meta: Vec<RecvMeta>,
    /// Handshakes, cookies and timer output.
    out: Vec<u8>,
}

impl Buffers {
    fn new(mtu: usize) -> Self {
        // Room for a whole TUN read (IDEAL_BATCH_SIZE segments) of encrypted datagrams.
        let datagram = mtu + OVERHEAD;
        Self {
            tun_rx: TunRx::new(mtu),
            tun_tx: TunTx::new(),
            udp_tx: TxBatch::new(
                tun_rs::IDEAL_BATCH_SIZE * datagram + BUF,
                tun_rs::IDEAL_BATCH_SIZE,
            ),
            udp_rx: (0..UDP_RX_BUFFERS)
                .map(|_| vec![0; UDP_RX_BUFFER])
                .collect(),
            udp_meta: vec![RecvMeta::default(); UDP_RX_BUFFERS],
            out: vec![0; BUF],
        }
    }
}

impl Worker {
    /// The loop: wait for readiness or the next deadline, then one batch
    /// from each ready source, the device's timers and transmits, discovery
    /// and the stats. Sources that may hold more keep the next wait at zero.
    #[expect(
        clippy::disallowed_methods,
        reason = "the data-plane event loop reads the clock once per turn and passes it in"
    )]
    fn run(mut self) {
        let mut bufs = Buffers::new(self.mtu);
        let mut events = Events::with_capacity(8);
        let mut next_stats = Instant::now() + STATS_INTERVAL;
        // Everything is read once at start: packets may predate the registration.
        let mut tun = Ready {
            set: true,
            errors: 0,
        };
        let mut udp4 = Ready {
            set: true,
            errors: 0,
        };
        let mut udp6 = Ready {
            set: self.udp6.is_some(),
            errors: 0,
        };
        let mut inbox = true;
        let mut now = Instant::now();
        loop {
            // One clock read per turn: the wait is measured from the start
            // of the last turn, so a timer may fire that turn's work late (µs).
            let timeout = if tun.set || udp4.set || udp6.set || inbox {
                Duration::ZERO
            } else {
                let mut deadline = self.device.poll_timeout().min(next_stats);
                if let Some(stun) = self.stun_deadline {
                    deadline = deadline.min(stun);
                }
                deadline.saturating_duration_since(now)
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::warn!(error = %e, "epoll_wait failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            for event in &events {
                match event.token() {
                    TUN => tun.set = true,
                    UDP4 => udp4.set = true,
                    UDP6 => udp6.set = true,
                    _ => inbox = true,
                }
            }
            now = Instant::now();
            if inbox {
                match self.inbox(now, &mut bufs) {
                    Some(more) => inbox = more,
                    None => break,
                }
            }
            if udp4.set {
                udp4.after(self.udp_batch(now, false, &mut bufs));
            }
            if udp6.set {
                udp6.after(self.udp_batch(now, true, &mut bufs));
            }
            if tun.set {
                tun.after(self.tun_batch(now, &mut bufs));
            }
            if now >= self.device.poll_timeout() {
                self.device.handle_timeout(now);
            }
            while let Some(t) = self.device.poll_transmit(now, &mut bufs.out) {
                self.send(&t);
            }
            if self.stun_dirty || self.stun_deadline.is_some_and(|d| d <= now) {
                self.stun_poll(now);
            }
            if now >= next_stats {
                next_stats = now + STATS_INTERVAL;
                self.publish_stats();
            }
        }
        let drops: Vec<String> = self
            .device
            .drops()
            .into_iter()
            .map(|(r, n)| format!("{}={n}", r.as_str()))
            .collect();
        tracing::info!(drops = %drops.join(" "), "data plane stopped");
    }

    /// Commands and relayed datagrams, at most [`INBOX_BATCH`] of each:
    /// `Some(true)` when more may wait, `None` to stop (a `Shutdown`, or the
    /// [`DataPlane`] is gone).
    fn inbox(&mut self, now: Instant, bufs: &mut Buffers) -> Option<bool> {
        let mut more_commands = true;
        for _ in 0..INBOX_BATCH {
            let command = match self.inbox.commands.try_recv() {
                Ok(c) => c,
                Err(mpsc::error::TryRecvError::Empty) => {
                    more_commands = false;
                    break;
                }
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
            };
            match command {
                Command::Shutdown => return None,
                Command::Peers(p) => {
                    self.device.set_peers(p, now);
                    self.publish_stats();
                }
                Command::TakeFlows(reply, with_allowed) => {
                    let _ = reply.send(self.take_flows(now, with_allowed));
                }
                Command::Filter(r) => {
                    self.rules = r.clone();
                    self.device.set_filter(r);
                }
                Command::StunServers(servers) => {
                    self.discovery.set_servers(&servers, now);
                    self.stun_dirty = true;
                }
                Command::Relay(setup) => self.set_relay(setup),
                Command::LocalAddresses(addrs) => {
                    self.discovery.set_local(&addrs);
                    self.stun_dirty = true;
                }
                Command::Uapi(req) => self.uapi_request(req, now),
            }
        }
        for _ in 0..INBOX_BATCH {
            match self.inbox.relay.try_recv() {
                Ok((peer, datagram)) => self.relay_datagram(now, peer, &datagram, bufs),
                // The worker holds a sender: never disconnected while it runs.
                Err(_) => return Some(more_commands),
            }
        }
        Some(true)
    }

    /// TUN reads, encrypted back to back, then sent with GSO. A super-packet
    /// (TSO, up to 64 KiB) is a batch of its own and goes out at once; single
    /// packets are gathered until the TUN is empty or [`DRAIN_PACKETS`] wait,
    /// and at most [`DRAIN_PACKETS`] reads are made (packets that go nowhere —
    /// no route, no session — never fill the batch).
    fn tun_batch(&mut self, now: Instant, bufs: &mut Buffers) -> Drained {
        let mut n = 0;
        let mut drained = Drained::More;
        let mut reads = 0;
        while n <= 1 && bufs.udp_tx.len() < DRAIN_PACKETS && reads < DRAIN_PACKETS {
            reads += 1;
            n = match bufs.tun_rx.try_recv(&self.tun) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drained = Drained::Empty;
                    break;
                }
                Err(e) => {
                    // A malformed offload header drops that read only.
                    tracing::trace!(error = %e, "TUN read failed");
                    drained = Drained::Error;
                    break;
                }
            };
            for i in 0..n {
                let packet = bufs.tun_rx.packet(i);
                if bufs.udp_tx.remaining() < packet.len() + OVERHEAD + MIN_BUFFER {
                    self.flush_udp(&mut bufs.udp_tx);
                }
                let free = bufs.udp_tx.free();
                let base = free.as_ptr() as usize;
                match self.device.handle_tun(now, packet, free) {
                    Output::Network(t) => {
                        let start = t.packet.as_ptr() as usize - base;
                        let range = start..start + t.packet.len();
                        match t.to {
                            Destination::Udp(to) => bufs.udp_tx.push(to, range),
                            Destination::Relay(peer) => {
                                // Relayed datagrams leave the batch at once.
                                let packet = &bufs.udp_tx.free()[range];
                                Self::relay_send_on(self.relay.as_ref(), peer, packet);
                            }
                        }
                    }
                    Output::Tunnel(_) | Output::Done => {}
                    Output::Dropped(reason) => {
                        tracing::trace!(reason = reason.as_str(), "dropped");
                    }
                }
            }
        }
        self.flush_udp(&mut bufs.udp_tx);
        drained
    }

    /// `recvmmsg` calls (each buffer a GRO batch) until the socket is empty,
    /// [`DRAIN_PACKETS`] packets wait or [`UDP_RECV_CALLS`] calls were made,
    /// decrypted into the TUN batch, written with GRO.
    fn udp_batch(&mut self, now: Instant, v6: bool, bufs: &mut Buffers) -> Drained {
        let sock = match (v6, self.udp6.as_ref()) {
            (false, _) => &self.udp4,
            (true, Some(s)) => s,
            (true, None) => return Drained::Empty,
        };
        let mut drained = Drained::More;
        for _ in 0..UDP_RECV_CALLS {
            if bufs.tun_tx.len() >= DRAIN_PACKETS {
                break;
            }
            let n = {
                let mut slices: [IoSliceMut<'_>; UDP_RX_BUFFERS] = {
                    let mut it = bufs.udp_rx.iter_mut();
                    std::array::from_fn(|_| {
                        IoSliceMut::new(it.next().expect("UDP_RX_BUFFERS buffers"))
                    })
                };
                match sock.try_recv(&mut slices, &mut bufs.udp_meta) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        drained = Drained::Empty;
                        break;
                    }
                    Err(e) => {
                        // ICMP port unreachable and the like surface here; keep going.
                        tracing::trace!(error = %e, "UDP receive error");
                        drained = Drained::Error;
                        break;
                    }
                }
            };
            for (meta, buf) in bufs.udp_meta[..n].iter().zip(&bufs.udp_rx) {
                let from = unmap(meta.addr);
                let stride = meta.stride.max(1);
                for datagram in buf[..meta.len.min(buf.len())].chunks(stride) {
                    if is_stun(datagram) {
                        match self.discovery.handle_response(now, from, datagram) {
                            StunResponse::Answer { changed } => {
                                tracing::debug!(%from, changed, "STUN answer");
                                self.stun_dirty = true;
                            }
                            // Counted; a flood of these costs no more than
                            // the check and the count (no stats publish).
                            StunResponse::Unsolicited => {
                                tracing::trace!(%from, "unsolicited STUN datagram dropped");
                            }
                            StunResponse::Malformed(e) => {
                                tracing::trace!(%from, error = %e, "malformed STUN datagram dropped");
                            }
                        }
                        continue;
                    }
                    if bufs.tun_tx.is_full() {
                        bufs.tun_tx.flush(&self.tun);
                    }
                    let out = bufs.tun_tx.slot(datagram.len().max(MIN_BUFFER));
                    let base = out.as_ptr() as usize;
                    match self.device.handle_udp(now, from, datagram, out) {
                        Output::Tunnel(p) => {
                            let start = p.as_ptr() as usize - base;
                            let end = start + p.len();
                            bufs.tun_tx.commit(start, end);
                        }
                        Output::Network(t) => {
                            // A handshake response or cookie: rare, sent at once.
                            let (to, len) = (t.to, t.packet.len());
                            let start = t.packet.as_ptr() as usize - base;
                            let packet = &bufs.tun_tx.current()[start..start + len];
                            self.send_to(to, packet);
                        }
                        Output::Done => {}
                        Output::Dropped(reason) => {
                            tracing::trace!(reason = reason.as_str(), "dropped");
                        }
                    }
                }
            }
        }
        bufs.tun_tx.flush(&self.tun);
        drained
    }

    fn flush_udp(&self, batch: &mut TxBatch) {
        if batch.is_empty() {
            return;
        }
        self.udp4.send_batch(batch, false);
        if let Some(v6) = &self.udp6 {
            v6.send_batch(batch, true);
        }
        batch.clear();
    }

    fn send(&self, t: &Transmit<'_>) {
        self.send_to(t.to, t.packet);
    }

    fn send_to(&self, to: Destination, packet: &[u8]) {
        match to {
            Destination::Udp(addr) => send_on(&self.udp4, self.udp6.as_ref(), addr, packet),
            Destination::Relay(peer) => self.relay_send(peer, packet),
        }
    }

    fn relay_send(&self, peer: u64, packet: &[u8]) {
        Self::relay_send_on(self.relay.as_ref(), peer, packet);
    }

    fn relay_send_on(relay: Option<&RelayLink>, peer: u64, packet: &[u8]) {
        match relay {
            Some(link) => link.send(peer, packet),
            None => tracing::trace!(peer, "no relay link; datagram dropped"),
        }
    }

    /// A datagram from the relay: the same device path as a UDP one.
    fn relay_datagram(&mut self, now: Instant, peer: u64, datagram: &[u8], bufs: &mut Buffers) {
        let out = bufs.tun_tx.slot(datagram.len().max(MIN_BUFFER));
        let base = out.as_ptr() as usize;
        match self.device.handle_relay(now, peer, datagram, out) {
            Output::Tunnel(p) => {
                let start = p.as_ptr() as usize - base;
                let end = start + p.len();
                bufs.tun_tx.commit(start, end);
                bufs.tun_tx.flush(&self.tun);
            }
            Output::Network(t) => {
                let (to, len) = (t.to, t.packet.len());
                let start = t.packet.as_ptr() as usize - base;
                let packet = &bufs.tun_tx.current()[start..start + len];
                self.send_to(to, packet);
            }
            Output::Done => {}
            Output::Dropped(reason) => {
                tracing::trace!(reason = reason.as_str(), peer, "relayed datagram dropped");
            }
        }
    }

    fn set_relay(&mut self, setup: Option<RelaySetup>) {
        match setup {
            Some(s) if s.relays.is_empty() => self.relay = None,
            Some(s) => match &self.relay {
                Some(link) if link.serves(&s.relays) => link.push_map(s.map),
                _ => self.relay = RelayLink::start(s, self.inbox.relay_tx.clone()),
            },
            None => self.relay = None,
        }
    }

    /// Discovery's turn: expires stale reflexive addresses, sends the
    /// Binding requests that are due, and publishes the candidates when
    /// anything changed.
    fn stun_poll(&mut self, now: Instant) {
        let expired = self.discovery.handle_timeout(now);
        let before = self.discovery.candidates();
        // One request per server at most per turn (MAX_SERVERS bounds it).
        for _ in 0..crate::nat::discovery::MAX_SERVERS {
            let Some((to, request)) = self.discovery.poll_request(now, fresh_txid()) else {
                break;
            };
            tracing::trace!(server = %to, "STUN binding request");
            send_on(&self.udp4, self.udp6.as_ref(), to, &request);
        }
        self.stun_deadline = self.discovery.poll_timeout();
        if self.stun_dirty || expired || self.discovery.candidates() != before {
            self.stun_dirty = false;
            self.publish_stats();
        }
    }

    fn uapi_request(&mut self, req: uapi::Request, now: Instant) {
        match req {
            uapi::Request::Get(reply) => {
                let peers = self.device.peers(now);
                let state = uapi::State {
                    private_key: self.private_key.clone(),
                    listen_port: self.port,
                    peers: peers
                        .into_iter()
                        .map(|p| {
                            let hs = p.last_handshake.map(|t| wall_clock(now, t));
                            (p, hs)
                        })
                        .collect(),
                };
                let _ = reply.send(state);
            }
            uapi::Request::Set(set, reply) => {
                let current: Vec<PeerConfig> = self
                    .device
                    .peers(now)
                    .into_iter()
                    .map(|p| p.config)
                    .collect();
                let result = set.apply(&current, self.port).map(|(key, peers)| {
                    if let Some(key) = key {
                        if key.public() != self.private_key.public() {
                            self.device = Device::new(&key, self.rules.clone(), now);
                            self.private_key = key;
                        }
                    }
                    self.device.set_peers(peers, now);
                });
                self.publish_stats();
                let _ = reply.send(result);
            }
        }
    }

    fn take_flows(&mut self, now: Instant, with_allowed: bool) -> FlowLog {
        let mut denied = self
            .stats
            .lock()
            .map(|mut s| std::mem::take(&mut s.denied_flows))
            .unwrap_or_default();
        merge_denied(&mut denied, self.device.take_denied_flows());
        let unix_s = wall_clock(now, now)
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let unknown_handshakes = self.device.take_unknown_handshakes(unix_s);
        let (allowed, allowed_overflow) = if with_allowed {
            self.device.take_allowed_flows()
        } else {
            (Vec::new(), 0)
        };
        FlowLog {
            allowed: allowed
                .into_iter()
                .map(|(key, t)| AllowedFlow {
                    key,
                    packets: t.packets,
                    bytes: t.bytes,
                    reply_packets: t.reply_packets,
                    reply_bytes: t.reply_bytes,
                    first_seen: wall_clock(now, t.first_seen),
                    last_seen: wall_clock(now, t.last_seen),
                })
                .collect(),
            allowed_overflow,
            denied: denied.into_iter().collect(),
            unknown_handshakes,
        }
    }

    #[expect(clippy::disallowed_methods, reason = "stats are stamped in the shell")]
    fn publish_stats(&mut self) {
        let now = Instant::now();
        let relay_state = self
            .relay
            .as_ref()
            .map(RelayLink::state)
            .unwrap_or_default();
        // Checked once a second: data avoids a relay link that is down.
        self.device.set_relay_up(!relay_state.transport.is_empty());
        let denied = self.device.take_denied_flows();
        let device_drops = self.device.drops();
        let snapshot = Stats {
            public_key: Some(self.device.public_key()),
            listen_port: self.port,
            peers: self
                .device
                .peers(now)
                .into_iter()
                .map(|p: PeerStatus| PeerStats {
                    public_key: p.config.public_key,
                    endpoint: p.endpoint,
                    destination: p.destination,
                    direct: p.direct,
                    last_rx: p.last_rx,
                    last_handshake: p.last_handshake.map(|t| wall_clock(now, t)),
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                    allowed_ips: p.config.allowed_ips,
                    persistent_keepalive: p.config.persistent_keepalive,
                })
                .collect(),
            handshakes: self.device.handshakes(),
            filter_allowed: self.device.filter_allowed(),
            filter_denied: device_drops
                .iter()
                .filter(|(r, _)| matches!(r, DropReason::Filtered(_)))
                .map(|(_, n)| n)
                .sum(),
            drops: {
                let (unsolicited, malformed) = self.discovery.dropped();
                let mut drops: Vec<(&'static str, u64)> = device_drops
                    .into_iter()
                    .map(|(r, n)| (r.as_str(), n))
                    .collect();
                drops.push(("stun_unsolicited", unsolicited));
                drops.push(("stun_malformed", malformed));
                drops
            },
            denied_flows: Default::default(),
            candidates: self.discovery.candidates(),
            stun: self.discovery.reflexive(),
            relay: relay_state,
        };
        if let Ok(mut s) = self.stats.lock() {
            let mut pending = std::mem::take(&mut s.denied_flows);
            merge_denied(&mut pending, denied);
            *s = snapshot;
            s.denied_flows = pending;
        }
    }
}

/// Adds `denied` to the flows not yet reported: at most
/// [`crate::filter::MAX_DENIED_FLOWS`] flows, counts saturating (a peer
/// controls how many packets it sends, and reports may be skipped).
fn merge_denied(
    pending: &mut std::collections::BTreeMap<crate::filter::DeniedFlow, u64>,
    denied: Vec<(crate::filter::DeniedFlow, u64)>,
) {
    for (flow, n) in denied {
        if pending.len() < crate::filter::MAX_DENIED_FLOWS || pending.contains_key(&flow) {
            let c = pending.entry(flow).or_default();
            *c = c.saturating_add(n);
        }
    }
}

/// A random STUN transaction id (a new Binding round, every 25 s per
/// server), drawn from the OS in the data-plane shell.
fn fresh_txid() -> [u8; 12] {
    use rand_core::RngCore as _;
    let mut txid = [0u8; 12];
    rand_core::OsRng.fill_bytes(&mut txid);
    txid
}

/// Converts a monotonic instant in the past to wall-clock time.
#[expect(
    clippy::disallowed_methods,
    reason = "the shell maps monotonic instants to wall-clock time for reports"
)]
fn wall_clock(now: Instant, then: Instant) -> SystemTime {
    SystemTime::now()
        .checked_sub(now.saturating_duration_since(then))
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn send_on(udp4: &Udp, udp6: Option<&Udp>, to: SocketAddr, packet: &[u8]) {
    match (to, udp6) {
        (SocketAddr::V4(_), _) => udp4.send(to, packet, None),
        (SocketAddr::V6(_), Some(s)) => s.send(to, packet, None),
        (SocketAddr::V6(_), None) => {}
    }
}

/// Waits up to [`SEND_WAIT`] for room in a socket's send buffer (the loop
/// registers for readability only): true when there is room. The thread
/// blocks meanwhile, as a blocking socket would; a full buffer is rare, since
/// a UDP send returns once the datagram is queued on the device.
fn wait_writable(fd: std::os::fd::RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    let ms = libc::c_int::try_from(SEND_WAIT.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid, initialized pollfd, and nfds 1 matches it.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    r > 0 && pfd.revents & libc::POLLOUT != 0
}

fn bind_udp(port: u16) -> anyhow::Result<(Udp, Option<Udp>)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let make = |domain: Domain, addr: SocketAddr| -> io::Result<Udp> {
        let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
        if domain == Domain::IPV6 {
            s.set_only_v6(true)?;
        }
        if force_buffer(&s, libc::SO_RCVBUFFORCE, SOCKET_RECV_BUFFER).is_err() {
            let _ = s.set_recv_buffer_size(SOCKET_RECV_BUFFER);
        }
        if force_buffer(&s, libc::SO_SNDBUFFORCE, SOCKET_SEND_BUFFER).is_err() {
            let _ = s.set_send_buffer_size(SOCKET_SEND_BUFFER);
        }
        // The exit-node policy routing sends marked packets by the main
        // table: the encrypted traffic never loops into its own tunnel.
        if let Err(e) = s.set_mark(hostroute::BYPASS_MARK) {
            tracing::debug!(error = %e, "SO_MARK unavailable");
        }
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        Udp::new(s.into())
    };
    let v4 = make(
        Domain::IPV4,
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)),
    )
    .with_context(|| format!("binding UDP port {port} (IPv4)"))?;
    let port = v4.local_addr()?.port();
    let v6 = match make(
        Domain::IPV6,
        SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0)),
    ) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, port, "no IPv6 UDP socket; IPv6 endpoints unreachable");
            None
        }
    };
    tracing::debug!(gro_segments = v4.gro_segments(), "UDP sockets bound");
    Ok((v4, v6))
}

/// `SO_RCVBUFFORCE` / `SO_SNDBUFFORCE`: a buffer size above net.core.*mem_max
/// (needs CAP_NET_ADMIN, which a process that creates a TUN has).
fn force_buffer(s: &socket2::Socket, option: libc::c_int, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: a valid socket descriptor, and a pointer to a c_int with its size.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Creates the TUN with offloads (IFF_VNET_HDR, TSO, USO where the kernel has
/// it); without them if the kernel refuses.
fn create_tun(cfg: &DataPlaneConfig) -> anyhow::Result<SyncDevice> {
    let v4: Vec<_> = cfg
        .addresses
        .iter()
        .filter_map(|a| match a {
            IpNet::V4(n) => Some(*n),
            IpNet::V6(_) => None,
        })
        .collect();
    let v6: Vec<_> = cfg
        .addresses
        .iter()
        .filter_map(|a| match a {
            IpNet::V6(n) => Some(*n),
            IpNet::V4(_) => None,
        })
        .collect();
    let build = |offload: bool| {
        let mut builder = tun_rs::DeviceBuilder::new()
            .name(&cfg.interface)
            .mtu(cfg.mtu)
            .tx_queue_len(10_000)
            .offload(offload);
        if let Some(first) = v4.first() {
            builder = builder.ipv4(first.addr(), first.prefix_len(), None);
        }
        for n in &v6 {
            builder = builder.ipv6(n.addr(), n.prefix_len());
        }
        builder.build_sync()
    };
    let tun = match build(true) {
        Ok(tun) => tun,
        Err(e) => {
            tracing::warn!(error = %e, "TUN offloads unavailable; one packet per syscall");
            build(false)?
        }
    };
    for n in v4.iter().skip(1) {
        ip(&["-4", "addr", "add", &n.to_string(), "dev", &cfg.interface])?;
    }
    for route in &cfg.routes {
        add_route(&cfg.interface, route)?;
    }
    Ok(tun)
}

/// Routes `net` into the interface with iproute2 (present wherever a TUN is).
fn add_route(interface: &str, net: &IpNet) -> anyhow::Result<()> {
    let family = if net.addr().is_ipv4() { "-4" } else { "-6" };
    ip(&[
        family,
        "route",
        "replace",
        &net.trunc().to_string(),
        "dev",
        interface,
    ])
}

/// Runs `ip ARGS` (iproute2), failing with its stderr.
///
/// # Errors
/// `ip` is missing or exits non-zero.
pub(crate) fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    anyhow::ensure!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::IpAddr;

    use super::*;
    use crate::filter::{DeniedFlow, Reason, MAX_DENIED_FLOWS};

    fn flow(port: u16) -> DeniedFlow {
        DeniedFlow {
            src: IpAddr::from([100, 64, 0, 2]),
            dst: IpAddr::from([100, 64, 0, 1]),
            proto: 6,
            dst_port: port,
            reason: Reason::NoRule,
        }
    }

    /// Edge-triggered sources: epoll reports only new arrivals, so a source
    /// that stopped at a batch bound must stay ready (else its queue waits
    /// for the next packet), and one whose reads keep failing must not spin.
    #[test]
    fn a_source_stays_ready_until_a_read_finds_it_empty() {
        let mut r = Ready {
            set: true,
            errors: 0,
        };
        r.after(Drained::More);
        assert!(r.set, "stopped at the batch bound: more may be queued");
        r.after(Drained::Error);
        assert!(r.set, "one failed read: the next may succeed");
        r.after(Drained::More);
        assert_eq!(r.errors, 0, "a good batch resets the error count");
        r.after(Drained::Empty);
        assert!(!r.set);

        let mut r = Ready {
            set: true,
            errors: 0,
        };
        for _ in 1..ERROR_TURNS {
            r.after(Drained::Error);
            assert!(r.set);
        }
        r.after(Drained::Error);
        assert!(!r.set, "failing reads stop after ERROR_TURNS turns");
        assert_eq!(r.errors, 0);
    }

    #[test]
    fn denied_flow_counts_saturate_and_the_table_stays_bounded() {
        let mut pending = BTreeMap::new();
        merge_denied(&mut pending, vec![(flow(22), u64::MAX - 1)]);
        merge_denied(&mut pending, vec![(flow(22), u64::MAX), (flow(22), 5)]);
        assert_eq!(pending[&flow(22)], u64::MAX);
        let many = (0..u16::MAX).map(|p| (flow(p), 1)).collect();
        merge_denied(&mut pending, many);
        assert_eq!(pending.len(), MAX_DENIED_FLOWS);
        assert_eq!(pending[&flow(22)], u64::MAX);
    }
}
