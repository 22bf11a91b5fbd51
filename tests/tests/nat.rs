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
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use ztmesh_tests::natlab::{
    admin_ok, block_udp, controller_url, lan_addr, nat_router, node_cli, run_cli, start_controller,
    start_daemon, up, CliOut, Masquerade, NodeDirs, WG_PORT,
};
use ztmesh_tests::{bin_path, require_root_or_skip, wait_until, Netns, Proc, TempDir, Topology};

const STUN: &str = "stun";
const HOME_ROUTER: &str = "home-router";
const SYM_ROUTER: &str = "sym-router";
const CONTROLLER: &str = "controller";
const STUN_PORTS: [u16; 2] = [3478, 3479];

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
    block_udp(lab.topo.ns(HOME_ROUTER));
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
    let out = run_cli(&lab.home, &args);
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

impl NatLab {
    fn new(with_controller: bool) -> Self {
        let mut names = vec![STUN, HOME_ROUTER, SYM_ROUTER];
        if with_controller {
            names.push(CONTROLLER);
        }
        let topo = Topology::new(&names);
        let home = Netns::new("home");
        let sym = Netns::new("sym");
        nat_router(topo.ns(HOME_ROUTER), &home, 1, Masquerade::Plain);
        nat_router(topo.ns(SYM_ROUTER), &sym, 2, Masquerade::FullyRandom);
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
        run_cli(ns, &args)
    }

    fn netcheck_json(&self, ns: &Netns) -> Value {
        let out = self.netcheck(ns, &["--json"]);
        assert!(out.status.success(), "{out}");
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("netcheck --json is not JSON ({e}): {out}"))
    }

    fn data_dir(&self) -> PathBuf {
        self.controller_dir.join("data")
    }

    /// Starts `ztmesh-controller serve` (with `--relay-file` when given) and
    /// waits until it answers.
    fn start_controller(&mut self, relay_file: Option<&std::path::Path>) {
        let proc = start_controller(
            self.topo.ns(CONTROLLER),
            self.topo.addr(CONTROLLER),
            &self.data_dir(),
            relay_file,
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
        let daemon = start_daemon(&self.home, node, extra);
        up(
            &self.home,
            node,
            &controller_url(self.topo.addr(CONTROLLER)),
            &key,
            "home",
        );
        daemon
    }

    /// Waits until the controller lists `home`'s LAN endpoint and the home
    /// router's outside address, both with the WireGuard port; returns them.
    fn wait_home_endpoints(&self, daemon: &Proc) -> (String, String) {
        let lan = format!("{}:{WG_PORT}", lan_addr(1));
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
        let out = node_cli(&self.home, node, &["status", "-o", "json"]);
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("status -o json ({e}): {out}"))
    }

    fn admin_ok(&self, args: &[&str]) -> String {
        admin_ok(self.topo.ns(CONTROLLER), &self.data_dir(), args)
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
