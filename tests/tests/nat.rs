//! NAT traversal end to end (issue 11): `ztmesh netcheck` and the daemon's
//! endpoint discovery behind real nftables NAT routers, against the
//! `ztm-stun` responder. Needs root, `nft` (scripts/setup.sh) and the
//! `ztmesh`, `ztmesh-controller` and `ztm-stun` binaries.
//!
//! ```text
//!                 internet: switch ns, bridge br0 (198.18.0.0/24)
//!    ┌───────────────┬─────────────────────┬──────────────────────┬─────────────┐
//!   stun            home-router           sym-router             controller
//!   198.18.0.1      198.18.0.2            198.18.0.3             198.18.0.4
//!   ztm-stun        eth1 198.19.1.1/24    eth1 198.19.2.1/24     :8443 (only
//!   :3478 :3479     masquerade            masquerade fully-random  the daemon
//!                    │ (endpoint-          │ (endpoint-dependent    test)
//!                    │  independent)       │  mapping)
//!                   home                  sym
//!                   198.19.1.2/24         198.19.2.2/24
//!                   (default via .1)      (default via .1)
//! ```
//!
//! Every namespace is unique to the test and removed when it ends, also
//! when it fails (processes first, then the inner namespaces, then the
//! topology).
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use serde_json::Value;
use ztmesh_tests::{bin_path, require_root_or_skip, wait_until, Netns, Proc, TempDir, Topology};

const STUN: &str = "stun";
const HOME_ROUTER: &str = "home-router";
const SYM_ROUTER: &str = "sym-router";
const CONTROLLER: &str = "controller";
const STUN_PORTS: [u16; 2] = [3478, 3479];
const CONTROLLER_PORT: u16 = 8443;
const WG_PORT: u16 = 41641;
/// How long a command may run before the test gives up on it.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// netcheck
// ---------------------------------------------------------------------------

/// Behind plain masquerade, both servers see the router's outside address
/// with one port: no variation by destination.
#[test]
fn netcheck_behind_masquerade_reports_the_router_address_and_a_stable_mapping() {
    if !require_root_or_skip() {
        return;
    }
    let lab = NatLab::new(false);
    let report = lab.netcheck_json(&lab.home);
    assert_eq!(report["udp"], true, "{report:#}");
    let outside = lab.topo.addr(HOME_ROUTER).to_string();
    let reflexive = addresses(&report["reflexive"]);
    assert_eq!(
        reflexive.len(),
        1,
        "one mapping for both servers: {report:#}"
    );
    assert_eq!(reflexive[0].ip().to_string(), outside, "{report:#}");
    assert_eq!(report["mapping_varies"], false, "{report:#}");
    for s in report["servers"].as_array().expect("servers") {
        assert!(s["rtt_us"].is_u64(), "a round trip per server: {report:#}");
    }

    // The text report says the same.
    let out = lab.netcheck(&lab.home, &[]);
    assert!(out.status.success(), "{out}");
    assert!(out.stdout.contains("UDP: yes"), "{out}");
    // A fresh socket per run: the same outside address, its own port.
    assert!(
        out.stdout
            .contains(&format!("reflexive address: {outside}:")),
        "{out}"
    );
    assert!(
        out.stdout.contains("mapping varies by destination: no"),
        "{out}"
    );
}

/// Behind `masquerade fully-random`, each destination gets its own mapping:
/// netcheck reports the variation (symmetric NAT).
#[test]
fn netcheck_behind_fully_random_masquerade_sees_the_mapping_vary() {
    if !require_root_or_skip() {
        return;
    }
    let lab = NatLab::new(false);
    let report = lab.netcheck_json(&lab.sym);
    assert_eq!(report["udp"], true, "{report:#}");
    let outside = lab.topo.addr(SYM_ROUTER).to_string();
    let reflexive = addresses(&report["reflexive"]);
    assert_eq!(reflexive.len(), 2, "a mapping per server: {report:#}");
    assert!(
        reflexive.iter().all(|a| a.ip().to_string() == outside),
        "{report:#}"
    );
    assert_eq!(report["mapping_varies"], true, "{report:#}");
    let out = lab.netcheck(&lab.sym, &[]);
    assert!(out.stdout.contains("symmetric NAT"), "{out}");
}

/// With UDP dropped by the router, netcheck says so and still exits 0
/// (the report is the result, not an error).
#[test]
fn netcheck_with_udp_blocked_reports_blocked_and_exits_zero() {
    if !require_root_or_skip() {
        return;
    }
    let lab = NatLab::new(false);
    nft(
        lab.topo.ns(HOME_ROUTER),
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
    let out = lab.netcheck(&lab.home, &[]);
    assert!(out.status.success(), "exit 0 with the report: {out}");
    assert!(out.stdout.contains("UDP: blocked"), "{out}");
    assert!(out.stdout.contains("no answer"), "{out}");
    let report = lab.netcheck_json(&lab.home);
    assert_eq!(report["udp"], false, "{report:#}");
    assert_eq!(report["mapping_varies"], Value::Null, "{report:#}");
    for s in report["servers"].as_array().expect("servers") {
        assert_eq!(s["reflexive"], Value::Null, "{report:#}");
        let attempts = s["attempts"].as_u64().unwrap_or(0);
        assert!((1..=3).contains(&attempts), "bounded retries: {report:#}");
    }
}

/// Bad input is refused with a clear message; no server at all (no --stun,
/// not enrolled) is an error.
#[test]
fn netcheck_without_servers_or_with_a_bad_one_fails_clearly() {
    let bin = bin_path("ztmesh");
    let nowhere = TempDir::new("not-enrolled");
    let out = std::process::Command::new(&bin)
        .arg("netcheck")
        .arg("--state-dir")
        .arg(nowhere.path())
        .output()
        .expect("run ztmesh netcheck");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--stun HOST:PORT"), "{err}");
    let out = std::process::Command::new(&bin)
        .args(["netcheck", "--stun", "no-port-here"])
        .output()
        .expect("run ztmesh netcheck");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-port-here"), "{err}");
}

// ---------------------------------------------------------------------------
// The daemon's endpoint discovery
// ---------------------------------------------------------------------------

/// A node behind a NAT router asks STUN from its WireGuard socket: the
/// controller learns its LAN address and the router's outside address with
/// the WireGuard port (plain masquerade keeps a free source port), which a
/// fresh socket would not have.
#[test]
fn daemon_behind_nat_reports_its_lan_and_reflexive_endpoints() {
    if !require_root_or_skip() {
        return;
    }
    let mut lab = NatLab::new(true);
    lab.start_controller(None);
    let node = NodeDirs::new("home");
    let mut extra = Vec::new();
    for s in lab.stun_servers() {
        extra.extend(["--stun".to_string(), s]);
    }
    let daemon = lab.enroll_home(&node, &extra);
    let (lan, reflexive) = lab.wait_home_endpoints(&daemon);

    // The node's own view: candidates, and what each server saw.
    let st = lab.home_status(&node);
    let endpoints: Vec<&str> = st["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(endpoints.first(), Some(&lan.as_str()), "LAN first: {st:#}");
    assert!(endpoints.contains(&reflexive.as_str()), "{st:#}");
    assert!(
        !endpoints.iter().any(|e| e.starts_with("100.")),
        "the overlay address is never a candidate: {st:#}"
    );
    let stun = st["stun"].as_array().expect("stun servers");
    assert_eq!(stun.len(), 2, "{st:#}");
    for s in stun {
        assert_eq!(s["reflexive"], reflexive.as_str(), "{st:#}");
    }
    drop(daemon);
}

/// Without `--stun`, the daemon asks the STUN addresses of the relays its
/// netmap lists, and `ztmesh netcheck` defaults to them too, naming the relay.
#[test]
fn netmap_relays_are_the_stun_servers_of_the_daemon_and_of_netcheck() {
    if !require_root_or_skip() {
        return;
    }
    let mut lab = NatLab::new(true);
    let servers = lab.stun_servers();
    // A relay entry as `ztmesh-relay identity` prints it; only its STUN
    // addresses are used here (they are the ztm-stun responder's).
    let relay_file = lab.controller_dir.join("relays.jsonl");
    std::fs::write(
        &relay_file,
        format!(
            "{{\"name\":\"relay1\",\"quic_addr\":\"{ip}:3340\",\"tcp_addr\":\"{ip}:443\",\
             \"stun_addrs\":[\"{}\",\"{}\"],\"cert_sha256\":\"{}\"}}\n",
            servers[0],
            servers[1],
            "ab".repeat(32),
            ip = lab.topo.addr(STUN),
        ),
    )
    .expect("write the relay file");
    lab.start_controller(Some(&relay_file));
    let node = NodeDirs::new("home");
    let daemon = lab.enroll_home(&node, &[]);
    let (_, reflexive) = lab.wait_home_endpoints(&daemon);
    let st = lab.home_status(&node);
    let asked: Vec<&str> = st["stun"]
        .as_array()
        .expect("stun servers")
        .iter()
        .filter_map(|s| s["server"].as_str())
        .collect();
    assert_eq!(asked, servers, "{st:#}");

    let bin = bin_path("ztmesh");
    let state = node.state.to_str().expect("utf-8 temp path");
    let args = [
        bin.to_str().expect("utf-8 path"),
        "netcheck",
        "--state-dir",
        state,
    ];
    let out = lab.run(&lab.home, &args);
    assert!(out.status.success(), "{out}");
    assert!(out.stdout.contains("UDP: yes"), "{out}");
    assert!(
        out.stdout.contains(&format!("relay1 {}", servers[0])),
        "{out}"
    );
    let outside = reflexive.split(':').next().expect("ip:port").to_string();
    assert!(
        out.stdout
            .contains(&format!("reflexive address: {outside}:")),
        "{out}"
    );
    drop(daemon);
}

// ---------------------------------------------------------------------------
// The lab
// ---------------------------------------------------------------------------

/// The topology drawn at the top of the file. Fields drop in declaration
/// order: processes, then the LAN namespaces, then the internet.
struct NatLab {
    controller: Option<Proc>,
    _stun: Proc,
    controller_dir: TempDir,
    home: Netns,
    sym: Netns,
    topo: Topology,
}

/// The captured result of one bounded command.
struct CliOut {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for CliOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit: {}\nstdout:\n{}\nstderr:\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// A node's state dir, local socket and UAPI dir, removed at the end.
struct NodeDirs {
    state: PathBuf,
    socket: PathBuf,
    uapi: PathBuf,
    _dir: TempDir,
}

impl NodeDirs {
    fn new(tag: &str) -> Self {
        let dir = TempDir::new(&format!("node-{tag}"));
        Self {
            state: dir.join("state"),
            socket: dir.join("ztmesh.sock"),
            uapi: dir.join("uapi"),
            _dir: dir,
        }
    }
}

impl NatLab {
    fn new(with_controller: bool) -> Self {
        let mut names = vec![STUN, HOME_ROUTER, SYM_ROUTER];
        if with_controller {
            names.push(CONTROLLER);
        }
        let topo = Topology::new(&names);
        let home = Netns::new("home");
        let sym = Netns::new("sym");
        nat_router(topo.ns(HOME_ROUTER), &home, 1, false);
        nat_router(topo.ns(SYM_ROUTER), &sym, 2, true);
        let stun_ip = topo.addr(STUN);
        let specs: Vec<String> = STUN_PORTS
            .iter()
            .map(|p| format!("{stun_ip}:{p}"))
            .collect();
        let bin = bin_path("ztm-stun");
        let mut args: Vec<&OsStr> = vec![bin.as_os_str()];
        args.extend(specs.iter().map(OsStr::new));
        let mut stun = topo.ns(STUN).spawn("ztm-stun", args);
        let ready = wait_until(Duration::from_secs(8), Duration::from_millis(20), || {
            stun.stdout()
                .lines()
                .filter(|l| l.starts_with("listening "))
                .count()
                == specs.len()
                || !stun.is_running()
        });
        assert!(
            ready.is_ok() && stun.is_running(),
            "ztm-stun did not start\n{}",
            stun.logs()
        );
        Self {
            controller: None,
            _stun: stun,
            controller_dir: TempDir::new("controller"),
            home,
            sym,
            topo,
        }
    }

    fn stun_servers(&self) -> Vec<String> {
        let ip = self.topo.addr(STUN);
        STUN_PORTS.iter().map(|p| format!("{ip}:{p}")).collect()
    }

    /// `ztmesh netcheck` against both servers from `ns`, plus `extra` flags.
    fn netcheck(&self, ns: &Netns, extra: &[&str]) -> CliOut {
        let bin = bin_path("ztmesh");
        let servers = self.stun_servers();
        let mut args: Vec<&str> = vec![bin.to_str().expect("utf-8 path"), "netcheck"];
        for s in &servers {
            args.extend(["--stun", s.as_str()]);
        }
        args.extend_from_slice(extra);
        self.run(ns, &args)
    }

    fn netcheck_json(&self, ns: &Netns) -> Value {
        let out = self.netcheck(ns, &["--json"]);
        assert!(out.status.success(), "{out}");
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("netcheck --json is not JSON ({e}): {out}"))
    }

    /// Runs a command to completion in `ns`, killing it after [`CLI_TIMEOUT`].
    fn run(&self, ns: &Netns, args: &[&str]) -> CliOut {
        let mut proc = ns.spawn("cli", args);
        match proc.wait_exit(CLI_TIMEOUT) {
            Some(status) => CliOut {
                status,
                stdout: proc.stdout(),
                stderr: proc.stderr(),
            },
            None => {
                let logs = proc.logs();
                proc.kill9();
                panic!(
                    "`{}` did not finish within {CLI_TIMEOUT:?}\n{logs}",
                    args.join(" ")
                );
            }
        }
    }

    /// Starts `ztmesh-controller serve` (with `--relay-file` when given) and
    /// waits until it answers.
    fn start_controller(&mut self, relay_file: Option<&std::path::Path>) {
        let bin = bin_path("ztmesh-controller");
        let mut cmd = self.topo.ns(CONTROLLER).command(&bin);
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(self.controller_dir.join("data"))
            .args(["--listen", &format!("[::]:{CONTROLLER_PORT}")])
            .env("ZTMESH_LOG", "debug");
        if let Some(f) = relay_file {
            cmd.arg("--relay-file").arg(f);
        }
        let mut proc = Proc::spawn("controller/ztmesh-controller", cmd);
        let addr = self.topo.addr(CONTROLLER).to_string();
        let ready = wait_until(Duration::from_secs(30), Duration::from_millis(50), || {
            !proc.is_running()
                || (self
                    .topo
                    .ns(CONTROLLER)
                    .tcp_connect(&addr, CONTROLLER_PORT, Duration::from_millis(200))
                    .is_ok()
                    && self
                        .admin(&["nodes", "list", "-o", "json"])
                        .status
                        .success())
        });
        assert!(
            ready.is_ok() && proc.is_running(),
            "controller not ready\n{}",
            proc.logs()
        );
        self.controller = Some(proc);
    }

    /// Starts a daemon in `home` (WireGuard port [`WG_PORT`], plus `extra`
    /// flags), enrolls it as `home` with a fresh key, and returns it.
    fn enroll_home(&self, node: &NodeDirs, extra: &[String]) -> Proc {
        self.admin_ok(&["users", "create", "alice@example.com"]);
        let key = self
            .admin_ok(&["keys", "create", "--user", "alice@example.com"])
            .trim()
            .to_owned();
        let bin = bin_path("ztmesh");
        let mut cmd = self.home.command(&bin);
        cmd.arg("daemon")
            .arg("--state-dir")
            .arg(&node.state)
            .arg("--socket")
            .arg(&node.socket)
            .args(["--interface", "ztm0", "--port", &WG_PORT.to_string()])
            .arg("--uapi-dir")
            .arg(&node.uapi)
            .args(extra)
            .env("ZTMESH_LOG", "debug");
        let mut daemon = Proc::spawn("home/ztmesh-daemon", cmd);
        let socket = node.socket.clone();
        let ready = wait_until(Duration::from_secs(20), Duration::from_millis(20), || {
            !daemon.is_running() || UnixStream::connect(&socket).is_ok()
        });
        assert!(
            ready.is_ok() && daemon.is_running(),
            "daemon did not open its socket\n{}",
            daemon.logs()
        );
        let url = format!("https://{}:{CONTROLLER_PORT}", self.topo.addr(CONTROLLER));
        let up = self.run(
            &self.home,
            &[
                bin.to_str().expect("utf-8 path"),
                "up",
                "--controller",
                &url,
                "--auth-key",
                &key,
                "--hostname",
                "home",
                "--socket",
                node.socket.to_str().expect("utf-8 temp path"),
            ],
        );
        assert!(up.status.success(), "ztmesh up: {up}\n{}", daemon.logs());
        daemon
    }

    /// Waits until the controller lists `home`'s LAN endpoint and the home
    /// router's outside address, both with the WireGuard port; returns them.
    fn wait_home_endpoints(&self, daemon: &Proc) -> (String, String) {
        let lan = format!("198.19.1.2:{WG_PORT}");
        let reflexive = format!("{}:{WG_PORT}", self.topo.addr(HOME_ROUTER));
        let reported = wait_until(Duration::from_secs(30), Duration::from_millis(250), || {
            let listed = self.admin_ok(&["nodes", "list", "-o", "json"]);
            listed.contains(&lan) && listed.contains(&reflexive)
        });
        match reported {
            Ok(took) => println!("endpoints at the controller {took:?} after `up` returned"),
            Err(e) => panic!(
                "controller never saw {lan} and {reflexive} ({e}):\n{}\n{}",
                self.admin_ok(&["nodes", "list", "-o", "json"]),
                daemon.logs()
            ),
        }
        (lan, reflexive)
    }

    /// `ztmesh status -o json` of the `home` daemon.
    fn home_status(&self, node: &NodeDirs) -> Value {
        let bin = bin_path("ztmesh");
        let out = self.run(
            &self.home,
            &[
                bin.to_str().expect("utf-8 path"),
                "status",
                "-o",
                "json",
                "--socket",
                node.socket.to_str().expect("utf-8 temp path"),
            ],
        );
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("status -o json ({e}): {out}"))
    }

    fn admin(&self, args: &[&str]) -> CliOut {
        let bin = bin_path("ztmesh-controller");
        let data = self.controller_dir.join("data");
        let mut full: Vec<&str> = vec![bin.to_str().expect("utf-8 path")];
        full.extend_from_slice(args);
        full.extend(["--data-dir", data.to_str().expect("utf-8 temp path")]);
        self.run(self.topo.ns(CONTROLLER), &full)
    }

    fn admin_ok(&self, args: &[&str]) -> String {
        let out = self.admin(args);
        assert!(out.status.success(), "ztmesh-controller {args:?}: {out}");
        out.stdout
    }
}

/// Links `lan` behind `router` (198.19.N.0/24) and makes the router NAT it
/// onto the internet with nftables masquerade.
fn nat_router(router: &Netns, lan: &Netns, n: u8, fully_random: bool) {
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
        &format!("198.19.{n}.2/24"),
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
    if fully_random {
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
        ],
    );
}

/// Runs `nft` commands in `ns`.
fn nft(ns: &Netns, commands: &[&[&str]]) {
    for c in commands {
        let mut args = vec!["nft"];
        args.extend_from_slice(c);
        ns.run_ok(args);
    }
}

fn addresses(v: &Value) -> Vec<SocketAddr> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|s| s.parse().expect("ip:port"))
        .collect()
}
