//! The NAT lab shared by `tests/tests/nat.rs` and `tests/tests/relay_paths.rs`:
//! home LANs behind nftables NAT routers on a [`Topology`]'s "internet", a
//! `ztmesh-controller` (optionally with a `--relay-file`), node daemons and
//! bounded CLI runs.
//!
//! A home LAN `n` is 198.19.n.0/24: the router's `eth1` is 198.19.n.1, the
//! home namespace's `eth0` is 198.19.n.2 with its default route via the router,
//! and the router masquerades everything leaving its internet side (`eth0`).

use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::CliOut;
use crate::{bin_path, wait_until, Netns, Proc, TempDir};

/// The controller's TLS port in the lab.
pub const CONTROLLER_PORT: u16 = 8443;
/// The WireGuard port of every node daemon in the lab.
pub const WG_PORT: u16 = 41641;
/// How long a command may run before the test gives up on it.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------

/// Runs a command to completion in `ns`, killing it after [`CLI_TIMEOUT`].
///
/// # Panics
/// If it does not finish in time (its output is in the message).
pub fn run_cli(ns: &Netns, args: &[&str]) -> CliOut {
    ns.run_bounded("cli", args, CLI_TIMEOUT)
}

/// Runs `nft` commands in `ns`.
///
/// # Panics
/// If one fails.
pub fn nft(ns: &Netns, commands: &[&[&str]]) {
    for c in commands {
        let mut args = vec!["nft"];
        args.extend_from_slice(c);
        ns.run_ok(args);
    }
}

// ---------------------------------------------------------------------------
// NAT routers
// ---------------------------------------------------------------------------

/// How a router maps its LAN's flows onto its outside address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Masquerade {
    /// `masquerade`: the source port is kept when free, one mapping per
    /// local socket whatever the destination (endpoint-independent).
    Plain,
    /// `masquerade fully-random`: a random port per flow, so each
    /// destination sees another mapping (endpoint-dependent, "symmetric").
    FullyRandom,
}

/// Links `lan` behind `router` (198.19.`n`.0/24) and makes the router NAT it
/// onto the internet with nftables masquerade; the router refuses new
/// connections from the internet to itself, as home routers do.
pub fn nat_router(router: &Netns, lan: &Netns, n: u8, masquerade: Masquerade) {
    router.run_ok([
        "ip",
        "link",
        "add",
        "eth1",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        lan.name(),
    ]);
    router.run_ok([
        "ip",
        "addr",
        "add",
        &format!("198.19.{n}.1/24"),
        "dev",
        "eth1",
    ]);
    router.set_link("eth1", true);
    router.run_ok(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
    lan.run_ok([
        "ip",
        "addr",
        "add",
        &format!("{}/24", lan_addr(n)),
        "dev",
        "eth0",
    ]);
    lan.set_link("eth0", true);
    lan.run_ok([
        "ip",
        "route",
        "add",
        "default",
        "via",
        &format!("198.19.{n}.1"),
    ]);
    let mut rule = vec![
        "add",
        "rule",
        "ip",
        "nat",
        "post",
        "oifname",
        "eth0",
        "masquerade",
    ];
    if masquerade == Masquerade::FullyRandom {
        rule.push("fully-random");
    }
    nft(
        router,
        &[
            &["add", "table", "ip", "nat"],
            &[
                "add",
                "chain",
                "ip",
                "nat",
                "post",
                "{ type nat hook postrouting priority 100 ; policy accept ; }",
            ],
            &rule,
            // Like any home router's firewall, nothing from the internet
            // may open a connection to the router itself. Without it, a
            // peer's hole-punching probe that arrives before this side's
            // own probe left would be accepted for local delivery (port
            // unreachable) and its conntrack entry would hold the outside
            // port, so masquerade would give this side's probe another
            // port and the two never meet (seen in relay_paths.rs). Dropped
            // in `input`, the entry is never confirmed.
            &["add", "table", "inet", "wan"],
            &[
                "add",
                "chain",
                "inet",
                "wan",
                "input",
                "{ type filter hook input priority 0 ; policy accept ; }",
            ],
            &[
                "add", "rule", "inet", "wan", "input", "iifname", "eth0", "ct", "state", "new",
                "drop",
            ],
        ],
    );
}

/// The address of the home namespace of LAN `n`: 198.19.`n`.2.
pub fn lan_addr(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, n, 2)
}

/// Makes `router` drop every UDP packet it forwards, both ways (a network
/// that blocks UDP). Undo with [`unblock_udp`].
pub fn block_udp(router: &Netns) {
    nft(
        router,
        &[
            &["add", "table", "inet", "udpblock"],
            &[
                "add",
                "chain",
                "inet",
                "udpblock",
                "drop_udp",
                "{ type filter hook forward priority 0 ; policy accept ; }",
            ],
            &[
                "add", "rule", "inet", "udpblock", "drop_udp", "meta", "l4proto", "udp", "drop",
            ],
        ],
    );
}

/// Removes what [`block_udp`] added.
pub fn unblock_udp(router: &Netns) {
    nft(router, &[&["delete", "table", "inet", "udpblock"]]);
}

// ---------------------------------------------------------------------------
// The controller
// ---------------------------------------------------------------------------

/// Starts `ztmesh-controller serve` in `ns` on `data_dir` (with
/// `--relay-file` when given) and waits until its TLS port at `addr` and its
/// admin socket answer.
///
/// # Panics
/// If it is not ready within 30 s (its logs are in the message).
pub fn start_controller(
    ns: &Netns,
    addr: Ipv4Addr,
    data_dir: &Path,
    relay_file: Option<&Path>,
) -> Proc {
    let extra: Vec<String> = relay_file
        .map(|f| vec!["--relay-file".into(), f.to_string_lossy().into_owned()])
        .unwrap_or_default();
    start_controller_with(ns, addr, data_dir, &extra)
}

/// [`start_controller`] with `extra` flags of `serve`.
///
/// # Panics
/// If it is not ready within 30 s (its logs are in the message).
pub fn start_controller_with(
    ns: &Netns,
    addr: Ipv4Addr,
    data_dir: &Path,
    extra: &[String],
) -> Proc {
    let bin = bin_path("ztmesh-controller");
    let mut cmd = ns.command(&bin);
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--listen", &format!("[::]:{CONTROLLER_PORT}")])
        .args(extra)
        .env("ZTMESH_LOG", log_level());
    let mut proc = Proc::spawn(&format!("{}/ztmesh-controller", ns.tag()), cmd);
    let addr = addr.to_string();
    let ready = wait_until(Duration::from_secs(30), Duration::from_millis(50), || {
        !proc.is_running()
            || (ns
                .tcp_connect(&addr, CONTROLLER_PORT, Duration::from_millis(200))
                .is_ok()
                && admin(ns, data_dir, &["nodes", "list", "-o", "json"])
                    .status
                    .success())
    });
    assert!(
        ready.is_ok() && proc.is_running(),
        "controller not ready\n{}",
        proc.logs()
    );
    proc
}

/// The controller's netmap signing key, from the `controller key:` line
/// `serve` prints (what `ztmesh-relay serve --controller-key` takes).
pub fn controller_key(controller: &Proc) -> Option<String> {
    controller.stdout().lines().find_map(|l| {
        l.trim()
            .strip_prefix("controller key:")
            .map(|k| k.trim().to_owned())
    })
}

/// `https://ADDR:PORT` of a lab controller.
pub fn controller_url(addr: Ipv4Addr) -> String {
    format!("https://{addr}:{CONTROLLER_PORT}")
}

/// An admin subcommand against the controller with `data_dir` (its unix
/// socket), run in `ns`.
pub fn admin(ns: &Netns, data_dir: &Path, args: &[&str]) -> CliOut {
    let bin = bin_path("ztmesh-controller");
    let mut full: Vec<&str> = vec![bin.to_str().expect("utf-8 path")];
    full.extend_from_slice(args);
    full.extend(["--data-dir", data_dir.to_str().expect("utf-8 temp path")]);
    run_cli(ns, &full)
}

/// Writes `text` to `file` and makes it the controller's policy
/// (`policy set FILE`: rule ids then name `file`).
///
/// # Panics
/// If the file cannot be written or the policy is refused.
pub fn set_policy(ns: &Netns, data_dir: &Path, file: &Path, text: &str) {
    std::fs::write(file, text).expect("write the policy");
    admin_ok(
        ns,
        data_dir,
        &["policy", "set", file.to_str().expect("utf-8 path")],
    );
}

/// Like [`admin`], but fails the test unless the command succeeds; returns stdout.
pub fn admin_ok(ns: &Netns, data_dir: &Path, args: &[&str]) -> String {
    let out = admin(ns, data_dir, args);
    assert!(out.status.success(), "ztmesh-controller {args:?}: {out}");
    out.stdout
}

// ---------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------

/// A node's state dir, local socket and UAPI dir, removed at the end.
#[derive(Debug)]
pub struct NodeDirs {
    /// `--state-dir`.
    pub state: PathBuf,
    /// `--socket`.
    pub socket: PathBuf,
    /// `--uapi-dir`.
    pub uapi: PathBuf,
    _dir: TempDir,
}

impl NodeDirs {
    /// Fresh directories for node `tag`.
    pub fn new(tag: &str) -> Self {
        let dir = TempDir::new(&format!("node-{tag}"));
        Self {
            state: dir.join("state"),
            socket: dir.join("ztmesh.sock"),
            uapi: dir.join("uapi"),
            _dir: dir,
        }
    }

    /// The socket path as text, for `--socket`.
    pub fn socket_arg(&self) -> &str {
        self.socket.to_str().expect("utf-8 temp path")
    }
}

/// Starts `ztmesh daemon` in `ns` (interface `ztm0`, WireGuard port
/// [`WG_PORT`], plus `extra` flags) and waits until its socket accepts.
///
/// # Panics
/// If the socket does not open within 20 s.
pub fn start_daemon(ns: &Netns, node: &NodeDirs, extra: &[String]) -> Proc {
    let bin = bin_path("ztmesh");
    let mut cmd = ns.command(&bin);
    cmd.arg("daemon")
        .arg("--state-dir")
        .arg(&node.state)
        .arg("--socket")
        .arg(&node.socket)
        .args(["--interface", "ztm0", "--port", &WG_PORT.to_string()])
        .arg("--uapi-dir")
        .arg(&node.uapi)
        .args(extra)
        .env("ZTMESH_LOG", log_level());
    let mut daemon = Proc::spawn(&format!("{}/ztmesh-daemon", ns.tag()), cmd);
    let socket = node.socket.clone();
    let ready = wait_until(Duration::from_secs(20), Duration::from_millis(20), || {
        !daemon.is_running() || UnixStream::connect(&socket).is_ok()
    });
    assert!(
        ready.is_ok() && daemon.is_running(),
        "daemon in {} did not open its socket\n{}",
        ns.name(),
        daemon.logs()
    );
    daemon
}

/// `ztmesh ARGS --socket S` in `ns`, bounded in time.
pub fn node_cli(ns: &Netns, node: &NodeDirs, args: &[&str]) -> CliOut {
    let bin = bin_path("ztmesh");
    let mut full: Vec<&str> = vec![bin.to_str().expect("utf-8 path")];
    full.extend_from_slice(args);
    full.extend(["--socket", node.socket_arg()]);
    run_cli(ns, &full)
}

/// The node's own overlay IPv4 address from a `ztmesh status -o json`
/// document (`self.addresses`, without the prefix length).
pub fn self_v4(status: &serde_json::Value) -> Option<String> {
    status["self"]["addresses"]
        .as_array()?
        .iter()
        .filter_map(serde_json::Value::as_str)
        .find(|a| !a.contains(':'))
        .map(|a| a.split('/').next().unwrap_or(a).to_owned())
}

/// The overlay IPv4 address of the node whose daemon listens on `node`'s
/// socket, from its `status`.
///
/// # Panics
/// If `status` fails or names no IPv4 address.
pub fn overlay_v4(ns: &Netns, node: &NodeDirs) -> String {
    let out = node_cli(ns, node, &["status", "-o", "json"]);
    assert!(out.status.success(), "status: {out}");
    let s: serde_json::Value = serde_json::from_str(&out.stdout).expect("status is JSON");
    self_v4(&s).unwrap_or_else(|| panic!("no overlay IPv4 address in {s:#}"))
}

/// Enrolls member `name` of `topo` as a `tag` server: an auth key from the
/// controller (member `controller`, data dir `data`), a daemon in `name`'s
/// namespace, `ztmesh up` with hostname `name`. The daemon is returned first
/// so a caller that keeps both in that order stops it before its dirs go.
///
/// # Panics
/// If any step fails.
pub fn join(
    topo: &crate::Topology,
    controller: &str,
    data: &Path,
    name: &str,
    tag: &str,
) -> (Proc, NodeDirs) {
    let key = admin_ok(
        topo.ns(controller),
        data,
        &["keys", "create", "--tags", tag],
    )
    .trim()
    .to_owned();
    let ns = topo.ns(name);
    let dirs = NodeDirs::new(name);
    let daemon = start_daemon(ns, &dirs, &[]);
    up(
        ns,
        &dirs,
        &controller_url(topo.addr(controller)),
        &key,
        name,
    );
    (daemon, dirs)
}

/// `ztmesh up` against the controller at `url` with `key` as `hostname`.
///
/// # Panics
/// If it fails.
pub fn up(ns: &Netns, node: &NodeDirs, url: &str, key: &str, hostname: &str) {
    let out = node_cli(
        ns,
        node,
        &[
            "up",
            "--controller",
            url,
            "--auth-key",
            key,
            "--hostname",
            hostname,
        ],
    );
    assert!(out.status.success(), "ztmesh up for {hostname}: {out}");
}

/// Log level of the controller and daemons: `$ZTMESH_LOG`, else debug (logs
/// are only printed when a test fails).
pub fn log_level() -> String {
    std::env::var("ZTMESH_LOG").unwrap_or_else(|_| "debug".to_owned())
}
