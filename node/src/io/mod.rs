//! The I/O shell around [`Device`]: a Linux TUN device (tun-rs), UDP sockets
//! on IPv4 and IPv6, the timer, and the UAPI socket.
//!
//! One tokio task owns the `Device`, the TUN and the sockets, so the hot path
//! takes no lock and allocates nothing: each event (a TUN packet, a datagram, a
//! timer, a command) is read into a buffer allocated once at start, handed to
//! the device, and its outputs are written before the next event. Control
//! calls ([`DataPlane::set_peers`], [`DataPlane::set_filter`]) travel over a
//! channel and are applied between packets. Batching (recvmmsg/sendmmsg,
//! GSO/GRO, TUN offload) fits in the same shape: read N, hand N to the device,
//! write the outputs in one call.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use ipnet::IpNet;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tun_rs::AsyncDevice;
use ztmesh_proto::keys::{WgPrivateKey, WgPublicKey};

use crate::filter::Rule;
use crate::tunnel::{Device, Output, PeerConfig, PeerStatus, Transmit};
use crate::uapi;

/// Default inner MTU: safe for WireGuard over IPv6 paths with a 1280-byte minimum.
pub const DEFAULT_MTU: u16 = 1280;
/// Default TUN interface name.
pub const DEFAULT_INTERFACE: &str = "ztm0";
/// Default directory of UAPI sockets (as wireguard-go).
pub const DEFAULT_UAPI_DIR: &str = "/var/run/wireguard";
/// Buffer size: the largest IP packet plus WireGuard overhead.
const BUF: usize = 65_536 + 64;
/// Socket buffer sizes requested (best effort; capped by net.core.*mem_max).
const SOCKET_BUFFER: usize = 4 << 20;
/// How often the stats snapshot behind [`DataPlane::stats`] is refreshed.
const STATS_INTERVAL: Duration = Duration::from_secs(1);

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
}

/// One peer in [`Stats`].
#[derive(Debug, Clone)]
pub struct PeerStats {
    /// The peer's public key.
    pub public_key: WgPublicKey,
    /// Current endpoint.
    pub endpoint: Option<SocketAddr>,
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

enum Command {
    Peers(Vec<PeerConfig>),
    Filter(Option<Vec<Rule>>),
    Shutdown,
}

/// A running data plane: TUN device, UDP sockets, the device task and the UAPI socket.
pub struct DataPlane {
    commands: mpsc::UnboundedSender<Command>,
    stats: Arc<Mutex<Stats>>,
    port: u16,
    task: JoinHandle<()>,
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
        let (udp4, udp6) = bind_udp(cfg.listen_port)?;
        let port = udp4.local_addr()?.port();
        let tun = create_tun(&cfg).with_context(|| format!("creating TUN {}", cfg.interface))?;
        let now = Instant::now();
        let rules = if cfg.managed { Some(Vec::new()) } else { None };
        let device = Device::new(&cfg.private_key, rules.clone(), now);
        let stats = Arc::new(Mutex::new(Stats::default()));
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (uapi_tx, uapi_rx) = mpsc::unbounded_channel();
        let uapi = match &cfg.uapi_dir {
            Some(dir) => Some(
                uapi::Server::start(dir, &cfg.interface, cfg.managed, uapi_tx)
                    .with_context(|| format!("UAPI socket in {}", dir.display()))?,
            ),
            None => None,
        };
        let worker = Worker {
            device,
            private_key: cfg.private_key.clone(),
            rules,
            tun,
            udp4,
            udp6,
            port,
            commands: command_rx,
            uapi: uapi_rx,
            stats: stats.clone(),
        };
        worker.publish_stats();
        let task = tokio::spawn(worker.run());
        tracing::info!(interface = %cfg.interface, port, mtu = cfg.mtu, managed = cfg.managed, "data plane up");
        Ok(DataPlane {
            commands,
            stats,
            port,
            task,
            uapi,
        })
    }

    /// Replaces the peer set, applied as a diff: unchanged peers keep their
    /// sessions; removed peers' sessions and conntrack entries go at once.
    pub fn set_peers(&self, peers: Vec<PeerConfig>) {
        let _ = self.commands.send(Command::Peers(peers));
    }

    /// Replaces the inbound filter: `None` accepts all traffic from peers
    /// (standalone); `Some(vec![])` denies all inbound flows but still admits
    /// replies to flows this node opened.
    pub fn set_filter(&self, rules: Option<Vec<Rule>>) {
        let _ = self.commands.send(Command::Filter(rules));
    }

    /// The latest snapshot (refreshed every second and after each change).
    pub fn stats(&self) -> Stats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The UDP port the data plane listens on.
    pub fn local_port(&self) -> u16 {
        self.port
    }

    /// Stops the task; the TUN device disappears with its file descriptor,
    /// the sockets close and the UAPI socket file is removed.
    pub async fn shutdown(self) {
        let _ = self.commands.send(Command::Shutdown);
        let _ = self.task.await;
        if let Some(u) = self.uapi {
            u.stop();
        }
    }
}

struct Worker {
    device: Device,
    private_key: WgPrivateKey,
    rules: Option<Vec<Rule>>,
    tun: AsyncDevice,
    udp4: UdpSocket,
    udp6: Option<UdpSocket>,
    port: u16,
    commands: mpsc::UnboundedReceiver<Command>,
    uapi: mpsc::UnboundedReceiver<uapi::Request>,
    stats: Arc<Mutex<Stats>>,
}

enum Event {
    Tun(io::Result<usize>),
    Udp(io::Result<(usize, SocketAddr)>),
    Udp6(io::Result<(usize, SocketAddr)>),
    Timer,
    Command(Option<Command>),
    Uapi(Option<uapi::Request>),
}

impl Worker {
    async fn run(mut self) {
        let mut tun_buf = vec![0u8; BUF];
        let mut udp_buf = vec![0u8; BUF];
        let mut udp6_buf = vec![0u8; BUF];
        let mut out = vec![0u8; BUF];
        let mut next_stats = Instant::now() + STATS_INTERVAL;
        loop {
            let deadline = tokio::time::Instant::from_std(self.device.poll_timeout());
            let event = tokio::select! {
                c = self.commands.recv() => Event::Command(c),
                r = self.uapi.recv() => Event::Uapi(r),
                r = self.udp4.recv_from(&mut udp_buf) => Event::Udp(r),
                r = recv6(self.udp6.as_ref(), &mut udp6_buf) => Event::Udp6(r),
                r = self.tun.recv(&mut tun_buf) => Event::Tun(r),
                () = tokio::time::sleep_until(deadline) => Event::Timer,
            };
            let now = Instant::now();
            match event {
                Event::Tun(Ok(n)) => {
                    let o = self.device.handle_tun(now, &tun_buf[..n], &mut out);
                    emit(&self.tun, &self.udp4, self.udp6.as_ref(), o).await;
                }
                Event::Udp(Ok((n, from))) | Event::Udp6(Ok((n, from))) => {
                    let buf = if from.is_ipv4() { &udp_buf } else { &udp6_buf };
                    let from = unmap(from);
                    let o = self.device.handle_udp(now, from, &buf[..n], &mut out);
                    emit(&self.tun, &self.udp4, self.udp6.as_ref(), o).await;
                }
                Event::Tun(Err(e)) => {
                    tracing::warn!(error = %e, "TUN read failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Event::Udp(Err(e)) | Event::Udp6(Err(e)) => {
                    // ICMP port unreachable and the like surface here; keep going.
                    tracing::trace!(error = %e, "UDP receive error");
                }
                Event::Timer => self.device.handle_timeout(now),
                Event::Command(None) | Event::Command(Some(Command::Shutdown)) => break,
                Event::Command(Some(Command::Peers(p))) => {
                    self.device.set_peers(p, now);
                    self.publish_stats();
                }
                Event::Command(Some(Command::Filter(r))) => {
                    self.rules = r.clone();
                    self.device.set_filter(r);
                }
                Event::Uapi(Some(req)) => self.uapi_request(req, now),
                Event::Uapi(None) => {}
            }
            while let Some(t) = self.device.poll_transmit(now, &mut out) {
                send(&self.udp4, self.udp6.as_ref(), &t).await;
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

    fn uapi_request(&mut self, req: uapi::Request, now: Instant) {
        match req {
            uapi::Request::Get(reply) => {
                let peers = self.device.peers();
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
                let current: Vec<PeerConfig> =
                    self.device.peers().into_iter().map(|p| p.config).collect();
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

    fn publish_stats(&self) {
        let now = Instant::now();
        let snapshot = Stats {
            public_key: Some(self.device.public_key()),
            listen_port: self.port,
            peers: self
                .device
                .peers()
                .into_iter()
                .map(|p: PeerStatus| PeerStats {
                    public_key: p.config.public_key,
                    endpoint: p.endpoint,
                    last_handshake: p.last_handshake.map(|t| wall_clock(now, t)),
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                    allowed_ips: p.config.allowed_ips,
                    persistent_keepalive: p.config.persistent_keepalive,
                })
                .collect(),
            drops: self
                .device
                .drops()
                .into_iter()
                .map(|(r, n)| (r.as_str(), n))
                .collect(),
        };
        if let Ok(mut s) = self.stats.lock() {
            *s = snapshot;
        }
    }
}

/// Converts a monotonic instant in the past to wall-clock time.
fn wall_clock(now: Instant, then: Instant) -> SystemTime {
    SystemTime::now() - now.saturating_duration_since(then)
}

async fn emit(tun: &AsyncDevice, udp4: &UdpSocket, udp6: Option<&UdpSocket>, o: Output<'_>) {
    match o {
        Output::Network(t) => send(udp4, udp6, &t).await,
        Output::Tunnel(p) => {
            if let Err(e) = tun.send(p).await {
                tracing::trace!(error = %e, "TUN write failed");
            }
        }
        Output::Done => {}
        Output::Dropped(reason) => tracing::trace!(reason = reason.as_str(), "dropped"),
    }
}

async fn send(udp4: &UdpSocket, udp6: Option<&UdpSocket>, t: &Transmit<'_>) {
    let r = match (t.to, udp6) {
        (SocketAddr::V4(_), _) => udp4.send_to(t.packet, t.to).await,
        (SocketAddr::V6(_), Some(s)) => s.send_to(t.packet, t.to).await,
        (SocketAddr::V6(_), None) => return,
    };
    if let Err(e) = r {
        tracing::trace!(error = %e, to = %t.to, "UDP send failed");
    }
}

async fn recv6(sock: Option<&UdpSocket>, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
    match sock {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

/// Treats an IPv4-mapped IPv6 source as the IPv4 address it is.
fn unmap(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, v6.port())),
            None => a,
        },
        a => a,
    }
}

fn bind_udp(port: u16) -> anyhow::Result<(UdpSocket, Option<UdpSocket>)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let make = |domain: Domain, addr: SocketAddr| -> io::Result<UdpSocket> {
        let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
        if domain == Domain::IPV6 {
            s.set_only_v6(true)?;
        }
        let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
        let _ = s.set_send_buffer_size(SOCKET_BUFFER);
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        UdpSocket::from_std(s.into())
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
    Ok((v4, v6))
}

fn create_tun(cfg: &DataPlaneConfig) -> anyhow::Result<AsyncDevice> {
    let mut builder = tun_rs::DeviceBuilder::new()
        .name(&cfg.interface)
        .mtu(cfg.mtu)
        .tx_queue_len(10_000);
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
    if let Some(first) = v4.first() {
        builder = builder.ipv4(first.addr(), first.prefix_len(), None);
    }
    for n in &v6 {
        builder = builder.ipv6(n.addr(), n.prefix_len());
    }
    let tun = builder.build_async()?;
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

fn ip(args: &[&str]) -> anyhow::Result<()> {
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
