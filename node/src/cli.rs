//! The node CLI: `daemon` and the commands that drive it over the local socket
//! (`up`, `down`, `status`, `ip`, `ping`, `logout`, `wg-config`), and
//! `netcheck`, which needs no daemon.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use clap::Subcommand;
use ztmesh_proto::ops::{Output, OutputArg};

use crate::agent::DaemonConfig;
use crate::localapi::{call, call_with_progress, Progress, Request};

/// Agent subcommands (flattened into the top-level `ztmesh` command).
#[derive(Subcommand, Debug)]
pub enum AgentCmd {
    /// Run the node daemon (data plane + controller connection + local API).
    Daemon {
        /// Keys, enrollment, preferences and the last verified netmap
        /// (mode 0700).
        #[arg(long, default_value = "/var/lib/ztmesh")]
        state_dir: PathBuf,
        /// Name of the TUN interface.
        #[arg(long, default_value = "ztm0")]
        interface: String,
        /// UDP port for WireGuard (0 = any free port).
        #[arg(long, default_value_t = 41641)]
        port: u16,
        /// MTU of the TUN interface (WireGuard adds 80 bytes over IPv6).
        #[arg(long, default_value_t = 1280)]
        mtu: u16,
        /// Directory of the wireguard UAPI socket (`wg show` works against it).
        #[arg(long, default_value = "/var/run/wireguard")]
        uapi_dir: PathBuf,
        /// Numeric group id allowed to use the local socket (default: root only).
        #[arg(long)]
        socket_group: Option<u32>,
        /// Numeric group id whose members may also run `up`, `down`, `logout`
        /// and `wg-config --include-private-key` (default: root only).
        #[arg(long)]
        operator_group: Option<u32>,
        /// A STUN server (IP:PORT) asked for this node's public address from
        /// the WireGuard socket, besides the relays of the netmap; repeatable.
        #[arg(long = "stun", value_name = "IP:PORT")]
        stun: Vec<SocketAddr>,
        /// The resolver configuration MagicDNS takes over while up (unless
        /// `up --accept-dns=false`) and restores on `down`.
        #[arg(long, default_value = "/etc/resolv.conf")]
        resolv_conf: PathBuf,
        /// Serve OpenMetrics on plain HTTP at `GET /metrics` on this address
        /// (off without the flag; the flag alone listens on 127.0.0.1:9465).
        /// No authentication: keep it on loopback or a monitoring network.
        #[arg(long, value_name = "ADDR", num_args = 0..=1,
              default_missing_value = crate::agent::DEFAULT_METRICS_LISTEN)]
        metrics_listen: Option<SocketAddr>,
    },
    /// Enroll (if needed) and connect; returns once the first netmap is applied.
    ///
    /// Without --auth-key, a node that is not enrolled (or whose key
    /// expired) signs in interactively: this prints a URL and a code for a
    /// person to open and confirm in a browser, and waits. `login` is the
    /// same command.
    #[command(visible_alias = "login")]
    Up {
        /// Controller URL, e.g. https://198.18.0.1:8443; several,
        /// comma-separated, when several controllers serve the mesh (the
        /// node enrolls at the first and fails over to the others).
        #[arg(long)]
        controller: Option<String>,
        /// Auth key from `ztmesh-controller keys create`.
        #[arg(long, env = "ZTMESH_AUTH_KEY", hide_env_values = true)]
        auth_key: Option<String>,
        /// The controller's TLS certificate fingerprint (SHA256:HEX, hex with
        /// or without colons), pinned by an interactive login; `ztmesh-controller
        /// serve` prints it. Not needed with --auth-key (the key carries it).
        #[arg(long, value_name = "SHA256HEX", value_parser = fingerprint_arg)]
        fingerprint: Option<String>,
        #[arg(long)]
        hostname: Option<String>,
        /// Sign in again (interactively, or with --auth-key) although the
        /// node's key has not expired: the same node gets a new key expiry.
        #[arg(long)]
        force_reauth: bool,
        /// Give up after this many seconds: each of the wait for a person to
        /// sign in (default 600 without --auth-key) and the wait for the
        /// first netmap (default 30).
        #[arg(long)]
        timeout: Option<u64>,
        #[command(flatten)]
        prefs: UpPrefs,
    },
    /// Take the tunnel down (stays enrolled).
    Down,
    /// Deregister from the controller and wipe the node's keys.
    Logout,
    /// Show this node, the controller connection, the netmap and peers.
    Status {
        #[command(flatten)]
        output: OutputArg,
    },
    /// Print this node's overlay addresses.
    Ip {
        #[arg(short = '4', long)]
        ipv4: bool,
        #[arg(short = '6', long)]
        ipv6: bool,
    },
    /// Ping a peer (by name or overlay IP) through the mesh.
    Ping {
        target: String,
        #[arg(short, long, default_value_t = 4)]
        count: u32,
        /// Seconds to wait for each reply.
        #[arg(long, default_value_t = 2)]
        timeout: u64,
        /// Keep pinging (up to --count, default 60 then) until a reply
        /// arrives over a direct path; fails if none does.
        #[arg(long)]
        until_direct: bool,
    },
    /// Probe this network with STUN (no daemon needed): UDP reachability,
    /// the public (reflexive) address, whether the NAT mapping varies by
    /// destination, and the round trip to each server (a relay's latency).
    /// Exits 0 with the report even when UDP is blocked.
    Netcheck {
        /// A STUN server, HOST:PORT; repeat for several (two or more tell
        /// whether the mapping varies by destination). Default: the STUN
        /// addresses of the relays in this node's last netmap.
        #[arg(long = "stun", value_name = "HOST:PORT")]
        stun: Vec<String>,
        /// The daemon's state dir, where the last netmap is (without --stun).
        #[arg(long, default_value = "/var/lib/ztmesh")]
        state_dir: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print this node's view as a wg-quick config.
    WgConfig {
        #[arg(long)]
        include_private_key: bool,
    },
}

/// `up`'s routing and DNS flags; each one given replaces the stored
/// choice, the others stay as the last `up` left them.
#[derive(clap::Args, Debug, Default)]
pub struct UpPrefs {
    /// Offer these subnets behind this node to the mesh (comma-separated
    /// CIDRs, e.g. 198.19.50.0/24); an admin or the policy's autoApprovers
    /// must approve them. An empty value withdraws them all.
    #[arg(long, value_name = "CIDR,...")]
    advertise_routes: Option<String>,
    /// Offer this node as an exit node (needs approval too).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    advertise_exit_node: Option<bool>,
    /// Send all non-mesh traffic through this exit node (a peer's name or
    /// overlay IP); the controller and relays stay outside the tunnel. An
    /// empty value stops using one.
    #[arg(long, value_name = "NAME|IP")]
    exit_node: Option<String>,
    /// With --exit-node: keep reaching the local networks directly.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    exit_node_allow_lan_access: Option<bool>,
    /// As a subnet router: rewrite forwarded traffic's source to this
    /// node's address (default true; false needs a route back to the
    /// overlay in the subnet).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    snat_subnet_routes: Option<bool>,
    /// Answer DNS for mesh names on 100.100.100.100 and point the host's
    /// resolver at it (default true).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    accept_dns: Option<bool>,
    /// Report this node's device posture (OS and kernel versions, host
    /// firewall, disk encryption, pending security updates) to the
    /// controller (default true). These attributes are self-asserted. With
    /// false, no more reports go out: the controller lets the last one go
    /// stale, and a stale report fails every posture check.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    report_posture: Option<bool>,
}

impl From<UpPrefs> for crate::routing::PrefsUpdate {
    fn from(p: UpPrefs) -> Self {
        Self {
            advertise_routes: p.advertise_routes,
            advertise_exit_node: p.advertise_exit_node,
            exit_node: p.exit_node,
            exit_node_allow_lan_access: p.exit_node_allow_lan_access,
            snat_subnet_routes: p.snat_subnet_routes,
            accept_dns: p.accept_dns,
            report_posture: p.report_posture,
        }
    }
}

/// Default `--timeout` for the wait for the first netmap (and enrollment
/// with an auth key), seconds.
const UP_TIMEOUT_SECS: u64 = 30;
/// Default `--timeout` for the wait for a person to sign in, seconds.
const LOGIN_TIMEOUT_SECS: u64 = 600;

/// Checks `--fingerprint` and passes it on in lowercase hex.
fn fingerprint_arg(s: &str) -> Result<String, String> {
    crate::control::login::parse_fingerprint_arg(s)
        .map(|fp| ztmesh_proto::auth::hex(&fp))
        .map_err(|e| e.to_string())
}

/// What `up` prints when the daemon reports progress.
fn progress_text(p: &Progress, now_ms: i64) -> String {
    match p {
        Progress::Login {
            url,
            code,
            expires_ms,
            fingerprint,
        } => {
            let left = crate::control::login::span_text(expires_ms.saturating_sub(now_ms));
            format!(
                "To sign in, open: {url}\n\
                 and check that the page shows the code {code} (valid for {left}).\n\
                 The controller's certificate fingerprint is {fingerprint}; your browser should show the same.\n\
                 Waiting for the sign-in..."
            )
        }
    }
}

async fn ask(socket: &std::path::Path, req: Request) -> anyhow::Result<serde_json::Value> {
    let r = call(socket, &req).await?;
    if !r.ok {
        bail!("{}", printable(&r.error));
    }
    Ok(r.data)
}

/// The daemon's settings, if `cmd` is `daemon`.
pub fn daemon_config(cmd: &AgentCmd, socket: &std::path::Path) -> Option<DaemonConfig> {
    match cmd {
        AgentCmd::Daemon {
            state_dir,
            interface,
            port,
            mtu,
            uapi_dir,
            socket_group,
            operator_group,
            stun,
            resolv_conf,
            metrics_listen,
        } => Some(DaemonConfig {
            state_dir: state_dir.clone(),
            socket: socket.to_path_buf(),
            interface: interface.clone(),
            listen_port: *port,
            mtu: *mtu,
            uapi_dir: Some(uapi_dir.clone()),
            socket_gid: *socket_group,
            operator_gid: *operator_group,
            stun_servers: stun.clone(),
            resolv_conf: resolv_conf.clone(),
            metrics_listen: *metrics_listen,
        }),
        _ => None,
    }
}

/// Runs an agent subcommand. `daemon` runs with the privileges it has; the
/// `ztmesh` binary instead prepares it and drops capabilities before its
/// runtime starts (see `main.rs`).
pub async fn run(cmd: AgentCmd, socket: &std::path::Path) -> anyhow::Result<()> {
    let socket = socket.to_path_buf();
    match cmd {
        AgentCmd::Daemon { .. } => {
            let cfg = daemon_config(&cmd, &socket).expect("a daemon command");
            let prepared = crate::agent::prepare(&cfg)?;
            crate::agent::run(cfg, prepared).await
        }
        AgentCmd::Up {
            controller,
            auth_key,
            fingerprint,
            hostname,
            force_reauth,
            timeout,
            prefs,
        } => {
            let secs = |default: u64| timeout.unwrap_or(default).saturating_mul(1000);
            let req = Request::Up {
                controller,
                auth_key,
                hostname,
                timeout_ms: secs(UP_TIMEOUT_SECS),
                prefs: prefs.into(),
                fingerprint,
                login_timeout_ms: Some(secs(LOGIN_TIMEOUT_SECS)),
                force_reauth,
                progress: true,
            };
            let r = call_with_progress(&socket, &req, |p| {
                println!("{}", progress_text(&p, ztmesh_proto::time::now_ms()));
            })
            .await?;
            if !r.ok {
                bail!("{}", printable(&r.error));
            }
            let s = r.data;
            let name = s["self"]["name"].as_str().unwrap_or("?");
            let addrs: Vec<&str> = s["self"]["addresses"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
                .unwrap_or_default();
            println!("up: {name} {}", addrs.join(" "));
            Ok(())
        }
        AgentCmd::Down => {
            ask(&socket, Request::Down).await?;
            println!("down (still enrolled; `ztmesh up` to reconnect)");
            Ok(())
        }
        AgentCmd::Logout => {
            let r = ask(&socket, Request::Logout).await?;
            println!("logged out: {}", r["controller"].as_str().unwrap_or(""));
            Ok(())
        }
        AgentCmd::Status { output } => {
            let s = ask(&socket, Request::Status).await?;
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_status(&s);
            }
            Ok(())
        }
        AgentCmd::Ip { ipv4, ipv6 } => {
            let s = ask(&socket, Request::Status).await?;
            let addrs = s["self"]["addresses"]
                .as_array()
                .ok_or_else(|| anyhow!("not enrolled"))?;
            for a in addrs.iter().filter_map(|a| a.as_str()) {
                let ip = a.split('/').next().unwrap_or(a);
                let is6 = ip.contains(':');
                if (!ipv4 && !ipv6) || (ipv4 && !is6) || (ipv6 && is6) {
                    println!("{ip}");
                }
            }
            Ok(())
        }
        AgentCmd::Ping {
            target,
            count,
            timeout,
            until_direct,
        } => {
            // `--until-direct` without `--count`: up to 60 pings.
            let count = if until_direct && count == 4 {
                60
            } else {
                count
            };
            ping(
                &socket,
                &target,
                count.clamp(1, 1000),
                Duration::from_secs(timeout.clamp(1, 60)),
                until_direct,
            )
            .await
        }
        AgentCmd::Netcheck {
            stun,
            state_dir,
            json,
        } => netcheck(&stun, &state_dir, json).await,
        AgentCmd::WgConfig {
            include_private_key,
        } => {
            let c = ask(
                &socket,
                Request::WgConfig {
                    include_private_key,
                },
            )
            .await?;
            print!("{}", c.as_str().unwrap_or_default());
            Ok(())
        }
    }
}

fn print_status(s: &serde_json::Value) {
    if !s["enrolled"].as_bool().unwrap_or(false) {
        if s["login"] == "pending" {
            println!("not enrolled yet: `ztmesh up` is waiting for someone to sign in");
        } else {
            println!(
                "not enrolled: run `ztmesh up --controller URL --auth-key KEY`, or \
                 `ztmesh up --controller URL --fingerprint SHA256HEX` to sign in in a browser"
            );
        }
        return;
    }
    let me = &s["self"];
    println!(
        "{} ({})",
        me["name"].as_str().unwrap_or("?"),
        me["addresses"]
            .as_array()
            .map(|a| a
                .iter()
                .filter_map(|x| x.as_str())
                .collect::<Vec<_>>()
                .join(", "))
            .unwrap_or_default()
    );
    println!(
        "controller: {} {} {}",
        s["controller"]["url"].as_str().unwrap_or("-"),
        s["controller"]["state"].as_str().unwrap_or("-"),
        s["controller"]["detail"].as_str().unwrap_or("")
    );
    if let Some(w) = login_warning(s, ztmesh_proto::time::now_ms()) {
        println!("WARNING: {w}");
    }
    if let Some(q) = s["quarantine"].as_object() {
        println!(
            "QUARANTINED by the controller since {}: {} — no peers until an admin runs \
             `ztmesh-controller nodes release {}`",
            crate::posture::clock_text(
                q["since_ms"].as_i64().unwrap_or(0),
                utc_offset_s(ztmesh_proto::time::now_ms())
            ),
            printable(q["reason"].as_str().unwrap_or("")),
            printable(me["name"].as_str().unwrap_or("?")),
        );
    }
    if let Some(eps) = s["endpoints"].as_array().filter(|a| !a.is_empty()) {
        let eps: Vec<&str> = eps.iter().filter_map(|e| e.as_str()).collect();
        println!("endpoints: {}", eps.join(" "));
    }
    match s["netmap"].as_object() {
        Some(m) => println!(
            "netmap: serial {} ({}s old, {} inbound rules)",
            m["serial"], m["age_secs"], m["inbound_rules"]
        ),
        None => println!("netmap: none (no peers)"),
    }
    if let Some(r) = s["relay"].as_object() {
        let state = match r["transport"].as_str() {
            Some(t) if !t.is_empty() => format!("connected ({t})"),
            _ => format!("down: {}", r["error"].as_str().unwrap_or("connecting")),
        };
        println!("relay: {} {state}", r["name"].as_str().unwrap_or("-"));
    }
    let now = ztmesh_proto::time::now_ms();
    for line in crate::posture::status_lines(&s["posture"], utc_offset_s(now)) {
        println!("{}", printable(&line));
    }
    println!(
        "{:<20} {:<36} {:<28} {:>10} {:>12} {:>12}",
        "PEER", "ADDRESSES", "PATH", "HANDSHAKE", "RX", "TX"
    );
    for p in s["peers"].as_array().into_iter().flatten() {
        let hs = p["last_handshake_secs_ago"]
            .as_u64()
            .map(|x| format!("{x}s ago"))
            .unwrap_or_else(|| "never".into());
        println!(
            "{:<20} {:<36} {:<28} {:>10} {:>12} {:>12}",
            p["name"].as_str().unwrap_or("?"),
            p["addresses"]
                .as_array()
                .map(|a| a
                    .iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(","))
                .unwrap_or_default(),
            p["path"]
                .as_str()
                .or_else(|| p["endpoint"].as_str())
                .unwrap_or("-"),
            hs,
            p["rx_bytes"],
            p["tx_bytes"]
        );
    }
}

/// The local time zone's offset from UTC at `unix_ms`, in seconds east (0
/// when the C library cannot tell).
fn utc_offset_s(unix_ms: i64) -> i64 {
    let t = libc::time_t::try_from(unix_ms.div_euclid(1000)).unwrap_or_default();
    // SAFETY: `tm` is plain data (integers and a pointer), valid zeroed.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call; `localtime_r` writes
    // only into `tm`.
    let r = unsafe { libc::localtime_r(&t, &mut tm) };
    #[allow(
        clippy::useless_conversion,
        reason = "c_long is i64 here but i32 on 32-bit targets"
    )]
    let offset = i64::from(tm.tm_gmtoff);
    if r.is_null() {
        0
    } else {
        offset
    }
}

/// The login warning of a status answer: the key expired (the daemon's
/// word), or expires soon ([`crate::control::login::expiry_warning`] at
/// `now_ms`).
fn login_warning(status: &serde_json::Value, now_ms: i64) -> Option<String> {
    if status["login"] == "expired" {
        return Some(
            status["login_message"]
                .as_str()
                .unwrap_or(crate::control::login::EXPIRED_MESSAGE)
                .to_string(),
        );
    }
    let expiry = status["key_expiry_ms"].as_i64()?;
    crate::control::login::expiry_warning(expiry, now_ms)
}

/// Resolves `target` (peer name or IP) against the daemon's netmap; returns the
/// overlay IP and the path (endpoint) the data plane uses for that peer.
fn resolve(status: &serde_json::Value, target: &str) -> anyhow::Result<(IpAddr, String, String)> {
    let peers = status["peers"].as_array().cloned().unwrap_or_default();
    let target_ip: Option<IpAddr> = target.parse().ok();
    for p in &peers {
        let name = p["name"].as_str().unwrap_or_default();
        let addrs: Vec<IpAddr> = p["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str())
            .filter_map(|a| a.split('/').next()?.parse().ok())
            .collect();
        let hit = match target_ip {
            Some(ip) => addrs.contains(&ip).then_some(ip),
            None => (name == target || name == target.split('.').next().unwrap_or_default())
                .then(|| addrs.first().copied())
                .flatten(),
        };
        if let Some(ip) = hit {
            let path = match (p["path"].as_str(), p["endpoint"].as_str()) {
                (Some(path), _) => path.to_string(),
                (None, Some(e)) if !e.is_empty() => format!("direct {e}"),
                _ => "no endpoint known".into(),
            };
            return Ok((ip, name.to_string(), path));
        }
    }
    bail!("{target:?} is not a peer of this node (the policy permits no flow with it)")
}

#[expect(
    clippy::disallowed_methods,
    reason = "ping measures round trips on the real clock"
)]
async fn ping(
    socket: &std::path::Path,
    target: &str,
    count: u32,
    timeout: Duration,
    until_direct: bool,
) -> anyhow::Result<()> {
    let status = ask(socket, Request::Status).await?;
    let (ip, name, path) = resolve(&status, target)?;
    let mut direct = false;
    let mut sent = 0u32;
    println!("PING {name} ({ip}) via {path}");
    let mut received = 0u32;
    let mut rtts = Vec::new();
    let sock = tokio::task::spawn_blocking(move || open_icmp(ip)).await??;
    let ident = (std::process::id() & 0xffff) as u16;
    for seq in 0..count {
        sent += 1;
        let start = Instant::now();
        let sock2 = sock.try_clone()?;
        let r = tokio::task::spawn_blocking(move || echo(&sock2, ip, ident, seq as u16, timeout))
            .await?;
        match r {
            Ok(()) => {
                let rtt = start.elapsed();
                received += 1;
                rtts.push(rtt);
                // The path the last authenticated packet from the peer took.
                let via = ask(socket, Request::Status)
                    .await
                    .ok()
                    .and_then(|s| last_rx_path(&s, &name))
                    .unwrap_or_else(|| "unknown path".into());
                println!(
                    "reply from {ip}: seq={seq} time={:.2} ms via {via}",
                    rtt.as_secs_f64() * 1000.0
                );
                if via.starts_with("direct") {
                    direct = true;
                    if until_direct {
                        println!("direct path to {name} after {} pings", seq + 1);
                        break;
                    }
                }
            }
            Err(e) => println!("no reply from {ip}: seq={seq} ({e})"),
        }
        if seq + 1 < count {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    println!("{sent} sent, {received} received");
    if received == 0 {
        bail!("no reply from {name} ({ip})");
    }
    if until_direct && !direct {
        bail!("no reply from {name} ({ip}) over a direct path after {count} pings");
    }
    Ok(())
}

/// The `last_rx_path` of peer `name` in a status answer.
fn last_rx_path(status: &serde_json::Value, name: &str) -> Option<String> {
    status["peers"]
        .as_array()?
        .iter()
        .find(|p| p["name"].as_str() == Some(name))?["last_rx_path"]
        .as_str()
        .map(str::to_string)
}

/// Resolves `HOST:PORT` STUN server names (each within a few seconds; the
/// first address of each name).
async fn resolve_stun_servers(names: &[String]) -> anyhow::Result<Vec<SocketAddr>> {
    let mut out = Vec::new();
    for name in names {
        let lookup = tokio::time::timeout(Duration::from_secs(3), tokio::net::lookup_host(name))
            .await
            .map_err(|_| anyhow!("resolving STUN server {name:?}: timed out"))?
            .map_err(|e| anyhow!("STUN server {name:?} is not HOST:PORT: {e}"))?;
        let addr = lookup
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("STUN server {name:?} has no address"))?;
        out.push(addr);
    }
    Ok(out)
}

/// `ztmesh netcheck`: Binding requests from a fresh UDP socket per address
/// family, driven by [`crate::nat::netcheck::Netcheck`] for at most
/// [`crate::nat::netcheck::NETCHECK_TIMEOUT`].
#[expect(
    clippy::disallowed_methods,
    reason = "netcheck's shell times round trips on the real clock"
)]
async fn netcheck(stun: &[String], state_dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    use crate::nat::netcheck::Netcheck;
    let (servers, relays) = if stun.is_empty() {
        let map = crate::agent::last_netmap(state_dir).map_err(|e| {
            anyhow!(
                "no STUN server: give --stun HOST:PORT, or run as a user who can read the \
                 state dir of an enrolled node (the relays of its last netmap are the default): {e:#}"
            )
        })?;
        let named = crate::nat::discovery::relay_stun_servers(&map.relays);
        if named.is_empty() {
            bail!("no STUN server: the last netmap lists no relay with a STUN address; give --stun HOST:PORT");
        }
        (named.iter().map(|(a, _)| *a).collect(), named)
    } else {
        (resolve_stun_servers(stun).await?, Vec::new())
    };
    let bind = |addr: &str| {
        let addr: SocketAddr = addr.parse().expect("a literal socket address");
        async move { tokio::net::UdpSocket::bind(addr).await.ok() }
    };
    let udp4 = if servers.iter().any(SocketAddr::is_ipv4) {
        bind("0.0.0.0:0").await
    } else {
        None
    };
    let udp6 = if servers.iter().any(SocketAddr::is_ipv6) {
        bind("[::]:0").await
    } else {
        None
    };
    let mut probe = Netcheck::new(&servers, Instant::now());
    for (server, relay) in &relays {
        probe.label(*server, relay);
    }
    let mut buf4 = vec![0u8; 2048];
    let mut buf6 = vec![0u8; 2048];
    // Time-bounded by the probe (3 s); the count bounds a flood of datagrams.
    for _ in 0..10_000 {
        let now = Instant::now();
        while let Some((to, request)) = probe.poll_transmit(now, &mut rand_core::OsRng) {
            let sock = if to.is_ipv4() { &udp4 } else { &udp6 };
            if let Some(sock) = sock {
                // An unreachable network shows as "no answer" in the report.
                let _ = sock.send_to(&request, to).await;
            }
        }
        if probe.is_done(now) {
            break;
        }
        let deadline = tokio::time::Instant::from_std(probe.poll_timeout());
        let received = tokio::select! {
            r = recv_opt(udp4.as_ref(), &mut buf4) => r.map(|(n, from)| (from, buf4[..n].to_vec())),
            r = recv_opt(udp6.as_ref(), &mut buf6) => r.map(|(n, from)| (from, buf6[..n].to_vec())),
            () = tokio::time::sleep_until(deadline) => None,
        };
        if let Some((from, datagram)) = received {
            let from = SocketAddr::new(from.ip().to_canonical(), from.port());
            probe.handle_datagram(Instant::now(), from, &datagram);
        }
    }
    let report = probe.report();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(())
}

/// One datagram from `sock`, or never when there is no socket. Receive
/// errors (ICMP unreachable from an earlier send) read as no datagram.
async fn recv_opt(
    sock: Option<&tokio::net::UdpSocket>,
    buf: &mut [u8],
) -> Option<(usize, SocketAddr)> {
    match sock {
        Some(s) => s.recv_from(buf).await.ok(),
        None => std::future::pending().await,
    }
}

fn open_icmp(ip: IpAddr) -> anyhow::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let (domain, proto) = match ip {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6),
    };
    Socket::new(domain, Type::RAW, Some(proto))
        .map_err(|e| anyhow!("cannot open an ICMP socket (needs root): {e}"))
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        let w = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
        sum = sum.wrapping_add(u32::from(w));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends one echo request and waits for the matching reply.
#[expect(
    clippy::disallowed_methods,
    reason = "the echo helper bounds its run on the real clock"
)]
fn echo(
    sock: &socket2::Socket,
    ip: IpAddr,
    ident: u16,
    seq: u16,
    timeout: Duration,
) -> anyhow::Result<()> {
    let v6 = ip.is_ipv6();
    let mut pkt = vec![if v6 { 128 } else { 8 }, 0, 0, 0];
    pkt.extend_from_slice(&ident.to_be_bytes());
    pkt.extend_from_slice(&seq.to_be_bytes());
    pkt.extend_from_slice(b"ztmesh-ping-0123456789abcdef0123");
    if !v6 {
        // The kernel fills in the ICMPv6 checksum; ICMPv4's is ours.
        let c = checksum(&pkt);
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
    }
    sock.send_to(&pkt, &SocketAddr::new(ip, 0).into())?;
    let deadline = Instant::now() + timeout;
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("timeout");
        }
        sock.set_read_timeout(Some(left))?;
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                bail!("timeout")
            }
            Err(e) => return Err(e.into()),
        };
        // SAFETY: recv_from initialised the first n bytes.
        let data: Vec<u8> = buf[..n]
            .iter()
            .map(|b| unsafe { b.assume_init() })
            .collect();
        if from.as_socket().map(|s| s.ip()) != Some(ip) {
            continue;
        }
        // Raw IPv4 sockets deliver the IP header; IPv6 ones do not.
        let icmp = if v6 {
            &data[..]
        } else {
            let ihl = usize::from(data.first().copied().unwrap_or(0) & 0x0f) * 4;
            data.get(ihl..).unwrap_or_default()
        };
        let reply_type = if v6 { 129 } else { 0 };
        if icmp.len() >= 8
            && icmp[0] == reply_type
            && u16::from_be_bytes([icmp[4], icmp[5]]) == ident
            && u16::from_be_bytes([icmp[6], icmp[7]]) == seq
        {
            return Ok(());
        }
    }
}

/// A daemon's (or, through it, the controller's) message made safe for a
/// terminal: control characters (escape sequences, OSC links, screen
/// clears) become `?`.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() && c != '\n' { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_the_terminal_without_escapes() {
        assert_eq!(
            printable("refused\u{1b}]8;;https://evil.example\u{7}open\u{1b}[2J"),
            "refused?]8;;https://evil.example?open?[2J"
        );
        assert_eq!(printable("two\nlines"), "two\nlines");
    }

    #[test]
    fn status_warns_about_expired_and_expiring_keys() {
        use serde_json::json;
        let now = 1_800_000_000_000_i64;
        let day = 86_400_000_i64;
        let expired = json!({"login": "expired", "login_message": "node key expired: run `ztmesh up` to sign in again", "key_expiry_ms": now - day});
        assert_eq!(
            login_warning(&expired, now).as_deref(),
            Some("node key expired: run `ztmesh up` to sign in again")
        );
        let soon = json!({"login": "ok", "key_expiry_ms": now + 2 * day + 3 * 3_600_000});
        assert_eq!(
            login_warning(&soon, now).as_deref(),
            Some("key expires in 2d 3h: run `ztmesh up --force-reauth` to extend")
        );
        for quiet in [
            json!({"login": "ok", "key_expiry_ms": 0}),
            json!({"login": "ok", "key_expiry_ms": now + 30 * day}),
            json!({"login": "ok", "key_expiry_ms": null}),
            json!({"login": "ok"}),
        ] {
            assert_eq!(login_warning(&quiet, now), None, "{quiet}");
        }
    }

    #[test]
    fn the_login_prompt_names_url_code_and_fingerprint() {
        let p = Progress::Login {
            url: "https://198.18.0.1:8443/device?code=KXQP-7RTM".into(),
            code: "KXQP-7RTM".into(),
            expires_ms: 1_000 + 600_000,
            fingerprint: format!("SHA256:{}", "0f".repeat(32)),
        };
        let text = progress_text(&p, 1_000);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "To sign in, open: https://198.18.0.1:8443/device?code=KXQP-7RTM"
        );
        assert!(
            lines[1].contains("KXQP-7RTM") && lines[1].contains("10m"),
            "{text}"
        );
        assert_eq!(
            lines[2],
            format!(
                "The controller's certificate fingerprint is SHA256:{}; your browser should show the same.",
                "0f".repeat(32)
            )
        );
        assert!(fingerprint_arg("sha256:xyz").is_err());
        assert_eq!(
            fingerprint_arg(&format!("SHA256:{}", "AB:".repeat(31) + "AB")).unwrap(),
            "ab".repeat(32)
        );
    }

    #[test]
    fn icmp_checksum_matches_a_known_packet() {
        // Echo request, id 1, seq 1, no payload: checksum 0xf7fd.
        let pkt = [8u8, 0, 0, 0, 0, 1, 0, 1];
        assert_eq!(checksum(&pkt), 0xf7fd);
    }

    #[test]
    fn resolves_peers_by_name_or_address_only() {
        let s = serde_json::json!({"peers": [
            {"name": "web", "addresses": ["100.64.0.2/32", "fd01::2/128"], "endpoint": "198.18.0.3:41641"}
        ]});
        let (ip, name, path) = resolve(&s, "web").unwrap();
        assert_eq!(ip, "100.64.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(name, "web");
        assert_eq!(path, "direct 198.18.0.3:41641");
        assert!(resolve(&s, "fd01::2").is_ok());
        assert!(resolve(&s, "db").is_err());
        assert!(resolve(&s, "100.64.0.9").is_err());
    }
}
