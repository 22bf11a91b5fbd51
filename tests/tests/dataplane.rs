//! Data-plane end-to-end tests: `ztmesh tunnel` (standalone mode) against
//! itself and against wireguard-go, in network namespaces. Needs root, the
//! `ztmesh` and `ztm-echo` binaries, `wireguard-go` and `wg` (scripts/setup.sh).
//!
//! ```text
//!        ┌──────────── switch ns: br0 ────────────┐
//!        └──┬───────────────┬───────────────┬─────┘
//!      eth0 │ 198.18.0.1    │ 198.18.0.2    │ 198.18.0.3
//!      ┌────┴─────┐    ┌────┴─────┐    ┌────┴─────┐
//!      │ a        │    │ b        │    │ c        │
//!      │ ztmesh   │    │ ztmesh / │    │ wg-go    │
//!      │ tunnel   │    │ wg-go    │    │ attacker │
//!      └──────────┘    └──────────┘    └──────────┘
//!   overlay: a 100.64.0.1 fd7a:115c:a1e0::1, b 100.64.0.2 …::2, c 100.64.0.3
//!   (a's config gives c the overlapping 100.64.0.0/16 as in netns.sh)
//! ```
//!
//! Interface names embed the test process id: the UAPI socket directory
//! /var/run/wireguard is shared by all namespaces on the host.
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{RwLock, RwLockReadGuard};
use std::time::Duration;

use ztmesh_tests::{bin_path, require_root_or_skip, wait_until, Netns, Proc, TempDir, Topology};

const PORT: u16 = 51820;
const UAPI_DIR: &str = "/var/run/wireguard";
const ECHO_PORT: u16 = 7000;

static IFACE_COUNTER: AtomicU32 = AtomicU32::new(0);

/// The flood test keeps both cores busy for seconds: it runs alone (write
/// lock), the other tests of this file together (read locks), so their
/// timing bounds hold.
static CPU_HEAVY: RwLock<()> = RwLock::new(());

fn not_flooded() -> RwLockReadGuard<'static, ()> {
    CPU_HEAVY.read().unwrap_or_else(|e| e.into_inner())
}

/// A unique interface name (at most 15 bytes), so UAPI sockets never collide.
fn iface(tag: &str) -> String {
    let n = IFACE_COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut s = format!("z{}{}{}", std::process::id() % 100_000, tag, n);
    s.truncate(15);
    s
}

struct Keys {
    private: String,
    public: String,
}

fn keys() -> Keys {
    let out = Command::new("wg")
        .arg("genkey")
        .output()
        .expect("wg genkey (install wireguard-tools)");
    let private = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("wg pubkey");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(private.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    Keys {
        private,
        public: String::from_utf8(out.stdout).unwrap().trim().to_owned(),
    }
}

fn has_tools() -> bool {
    ["wg", "wireguard-go", "ping"].iter().all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

struct PeerSpec<'a> {
    public: &'a str,
    allowed: &'a str,
    endpoint: Option<String>,
}

/// A `ztmesh tunnel` process and its interface.
struct Ztmesh {
    iface: String,
    proc: Proc,
    _dir: TempDir,
}

impl Ztmesh {
    fn start(ns: &Netns, keys: &Keys, addresses: &str, peers: &[PeerSpec<'_>]) -> Self {
        let iface = iface("t");
        let dir = TempDir::new("ztmesh-conf");
        let mut conf = format!(
            "[Interface]\nPrivateKey = {}\nAddress = {addresses}\nListenPort = {PORT}\n",
            keys.private
        );
        for p in peers {
            conf.push_str(&format!(
                "\n[Peer]\nPublicKey = {}\nAllowedIPs = {}\n",
                p.public, p.allowed
            ));
            if let Some(e) = &p.endpoint {
                conf.push_str(&format!("Endpoint = {e}\n"));
            }
        }
        let path = dir.join("tunnel.conf");
        std::fs::write(&path, conf).unwrap();
        let bin = bin_path("ztmesh");
        let mut cmd = ns.command(&bin);
        cmd.args(["tunnel", "--config"])
            .arg(&path)
            .args(["--interface", &iface, "--uapi-dir", UAPI_DIR])
            .env("ZTMESH_LOG", "debug");
        let mut proc = Proc::spawn(&format!("{}/ztmesh", ns.tag()), cmd);
        let sock = PathBuf::from(UAPI_DIR).join(format!("{iface}.sock"));
        let up = wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
            sock.exists() && ns.run(["ip", "link", "show", &iface]).status.success()
                || !proc.is_running()
        });
        assert!(
            up.is_ok() && proc.is_running(),
            "ztmesh did not come up\n{}",
            proc.logs()
        );
        Ztmesh {
            iface,
            proc,
            _dir: dir,
        }
    }

    /// Stops the process and returns the drop counters it logs on exit.
    fn stop_and_drops(&mut self) -> String {
        self.proc.stop();
        let err = self.proc.stderr();
        err.lines()
            .rev()
            .find(|l| l.contains("data plane stopped"))
            .unwrap_or_else(|| panic!("no drop counters in the log\n{err}"))
            .to_owned()
    }
}

/// A wireguard-go interface configured with `wg` and `ip`.
struct WgGo {
    iface: String,
    _proc: Proc,
    _dir: TempDir,
}

impl WgGo {
    fn start(ns: &Netns, keys: &Keys, addresses: &[&str], peers: &[PeerSpec<'_>]) -> Self {
        let iface = iface("g");
        let mut cmd = ns.command("wireguard-go");
        cmd.args(["-f", &iface])
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            .env("LOG_LEVEL", "verbose");
        let mut proc = Proc::spawn(&format!("{}/wireguard-go", ns.tag()), cmd);
        let sock = PathBuf::from(UAPI_DIR).join(format!("{iface}.sock"));
        let up = wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
            sock.exists() || !proc.is_running()
        });
        assert!(
            up.is_ok() && proc.is_running(),
            "wireguard-go did not start\n{}",
            proc.logs()
        );
        let dir = TempDir::new("wggo");
        let key_path = dir.join("private.key");
        std::fs::write(&key_path, &keys.private).unwrap();
        ns.run_ok([
            "wg",
            "set",
            &iface,
            "private-key",
            key_path.to_str().unwrap(),
            "listen-port",
            &PORT.to_string(),
        ]);
        for p in peers {
            let mut args = vec![
                "wg",
                "set",
                &iface,
                "peer",
                p.public,
                "allowed-ips",
                p.allowed,
            ];
            if let Some(e) = &p.endpoint {
                args.extend(["endpoint", e.as_str()]);
            }
            ns.run_ok(args);
        }
        for a in addresses {
            ns.run_ok(["ip", "addr", "add", a, "dev", &iface]);
        }
        ns.run_ok(["ip", "link", "set", &iface, "up"]);
        for p in peers {
            for net in p.allowed.split(',') {
                let family = if net.contains(':') { "-6" } else { "-4" };
                ns.run_ok(["ip", family, "route", "replace", net, "dev", &iface]);
            }
        }
        WgGo {
            iface,
            _proc: proc,
            _dir: dir,
        }
    }
}

/// Pings `addr` from `ns` until one reply (the first handshake), bounded in time.
fn ping_until_up(ns: &Netns, addr: &str) {
    let r = wait_until(Duration::from_secs(15), Duration::from_millis(100), || {
        ns.run(["ping", "-c", "1", "-W", "1", addr])
            .status
            .success()
    });
    assert!(r.is_ok(), "no ping reply from {addr} in {}", ns.name());
}

fn ping_once(ns: &Netns, addr: &str) -> bool {
    ns.run(["ping", "-c", "2", "-i", "0.2", "-W", "1", addr])
        .status
        .success()
}

fn tcp(from: &Netns, addr: &str) {
    from.tcp_check(addr, ECHO_PORT, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("TCP echo to {addr} from {}: {e}", from.name()));
}

fn skip() -> bool {
    if !require_root_or_skip() {
        return true;
    }
    assert!(
        has_tools(),
        "wg, wireguard-go and ping are needed: run scripts/setup.sh"
    );
    false
}

#[test]
fn two_ztmesh_tunnels_carry_ping_and_tcp_both_ways_and_answer_wg_show() {
    if skip() {
        return;
    }
    let _cpu = not_flooded();
    let topo = Topology::new(&["a", "b"]);
    let (ka, kb) = (keys(), keys());
    let a = topo.ns("a");
    let b = topo.ns("b");
    let mut za = Ztmesh::start(
        a,
        &ka,
        "100.64.0.1/32, fd7a:115c:a1e0::1/128",
        &[PeerSpec {
            public: &kb.public,
            allowed: "100.64.0.2/32, fd7a:115c:a1e0::2/128",
            endpoint: Some(format!("{}:{PORT}", topo.addr("b"))),
        }],
    );
    let _zb = Ztmesh::start(
        b,
        &kb,
        "100.64.0.2/32, fd7a:115c:a1e0::2/128",
        &[PeerSpec {
            public: &ka.public,
            allowed: "100.64.0.1/32, fd7a:115c:a1e0::1/128",
            // b reaches a over the IPv6 underlay; a learns b's IPv6 endpoint.
            endpoint: Some(format!("[{}]:{PORT}", topo.addr6("a"))),
        }],
    );
    let _echo_a = a.spawn_echo(&["100.64.0.1:7000", "[fd7a:115c:a1e0::1]:7000"]);
    let _echo_b = b.spawn_echo(&["100.64.0.2:7000", "[fd7a:115c:a1e0::2]:7000"]);

    ping_until_up(b, "100.64.0.1");
    assert!(ping_once(a, "100.64.0.2"));
    assert!(ping_once(a, "fd7a:115c:a1e0::2"));
    tcp(a, "100.64.0.2");
    tcp(b, "100.64.0.1");
    tcp(a, "fd7a:115c:a1e0::2");
    tcp(b, "fd7a:115c:a1e0::1");

    // wg (wireguard-tools) against our UAPI socket.
    let show = a.run_ok(["wg", "show", &za.iface]);
    assert!(show.contains(&format!("peer: {}", kb.public)), "{show}");
    assert!(show.contains("latest handshake:"), "{show}");
    assert!(show.contains("transfer:"), "{show}");
    assert!(
        show.contains(&format!("endpoint: [{}]:{PORT}", topo.addr6("b"))),
        "the endpoint is learned from authenticated packets: {show}"
    );
    let dump = a.run_ok(["wg", "show", &za.iface, "dump"]);
    let peer_line: Vec<&str> = dump.lines().nth(1).unwrap().split('\t').collect();
    let handshake: u64 = peer_line[4].parse().unwrap();
    let (rx, tx): (u64, u64) = (peer_line[5].parse().unwrap(), peer_line[6].parse().unwrap());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        now.abs_diff(handshake) < 60,
        "handshake {handshake} vs now {now}"
    );
    assert!(rx > 1000 && tx > 1000, "transfer rx {rx} tx {tx}");
    // The socket is private to root.
    use std::os::unix::fs::PermissionsExt;
    let sock = PathBuf::from(UAPI_DIR).join(format!("{}.sock", za.iface));
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Standalone mode accepts `wg set`.
    a.run_ok([
        "wg",
        "set",
        &za.iface,
        "peer",
        &kb.public,
        "persistent-keepalive",
        "25",
    ]);
    let show = a.run_ok(["wg", "showconf", &za.iface]);
    assert!(show.contains("PersistentKeepalive = 25"), "{show}");
    assert!(ping_once(a, "100.64.0.2"), "tunnel still up after wg set");

    let drops = za.stop_and_drops();
    assert!(drops.contains("spoofed_source=0"), "{drops}");
    assert!(!sock.exists(), "UAPI socket removed on exit");
    assert!(
        !a.run(["ip", "link", "show", &za.iface]).status.success(),
        "TUN removed on exit"
    );
}

fn interop(ztmesh_initiates: bool) {
    if skip() {
        return;
    }
    let _cpu = not_flooded();
    let topo = Topology::new(&["a", "b"]);
    let (ka, kb) = (keys(), keys());
    let a = topo.ns("a");
    let b = topo.ns("b");
    // Only the initiator knows the other's endpoint: the responder learns it.
    let za = Ztmesh::start(
        a,
        &ka,
        "100.64.0.1/32",
        &[PeerSpec {
            public: &kb.public,
            allowed: "100.64.0.2/32",
            endpoint: ztmesh_initiates.then(|| format!("{}:{PORT}", topo.addr("b"))),
        }],
    );
    if ztmesh_initiates {
        // The first initiation goes nowhere (no wireguard-go yet): boringtun's
        // own REKEY_TIMEOUT retry, driven by our timer ticks, must recover.
        assert!(!a
            .run(["ping", "-c", "1", "-W", "1", "100.64.0.2"])
            .status
            .success());
    }
    let gb = WgGo::start(
        b,
        &kb,
        &["100.64.0.2/32"],
        &[PeerSpec {
            public: &ka.public,
            allowed: "100.64.0.1/32",
            endpoint: (!ztmesh_initiates).then(|| format!("{}:{PORT}", topo.addr("a"))),
        }],
    );
    let _echo_a = a.spawn_echo(&["100.64.0.1:7000"]);
    let _echo_b = b.spawn_echo(&["100.64.0.2:7000"]);
    if ztmesh_initiates {
        ping_until_up(a, "100.64.0.2");
        assert!(ping_once(b, "100.64.0.1"));
    } else {
        ping_until_up(b, "100.64.0.1");
        assert!(ping_once(a, "100.64.0.2"));
    }
    tcp(a, "100.64.0.2");
    tcp(b, "100.64.0.1");
    // Both sides report the handshake through the same protocol.
    for (ns, ifc) in [(a, &za.iface), (b, &gb.iface)] {
        let show = ns.run_ok(["wg", "show", ifc]);
        assert!(show.contains("latest handshake:"), "{show}");
    }
}

#[test]
fn ztmesh_initiates_to_wireguard_go() {
    interop(true);
}

#[test]
fn wireguard_go_initiates_to_ztmesh() {
    interop(false);
}

#[test]
fn spoofed_inner_sources_are_dropped_and_counted() {
    if skip() {
        return;
    }
    let _cpu = not_flooded();
    let topo = Topology::new(&["a", "b", "c"]);
    let (ka, kb, kc) = (keys(), keys(), keys());
    let (a, b, c) = (topo.ns("a"), topo.ns("b"), topo.ns("c"));
    let mut za = Ztmesh::start(
        a,
        &ka,
        "100.64.0.1/32",
        &[
            PeerSpec {
                public: &kb.public,
                allowed: "100.64.0.2/32",
                endpoint: Some(format!("{}:{PORT}", topo.addr("b"))),
            },
            // c owns a range that overlaps b's more specific /32.
            PeerSpec {
                public: &kc.public,
                allowed: "100.64.0.0/16",
                endpoint: Some(format!("{}:{PORT}", topo.addr("c"))),
            },
        ],
    );
    let _gb = WgGo::start(
        b,
        &kb,
        &["100.64.0.2/32"],
        &[PeerSpec {
            public: &ka.public,
            allowed: "100.64.0.1/32",
            endpoint: Some(format!("{}:{PORT}", topo.addr("a"))),
        }],
    );
    // The attacker also holds b's address and one outside every range on its
    // interface, so that its kernel sends from them.
    let gc = WgGo::start(
        c,
        &kc,
        &["100.64.0.3/32", "100.64.0.2/32", "100.127.0.9/32"],
        &[PeerSpec {
            public: &ka.public,
            allowed: "100.64.0.1/32",
            endpoint: Some(format!("{}:{PORT}", topo.addr("a"))),
        }],
    );
    // Honest traffic from both peers works.
    ping_until_up(b, "100.64.0.1");
    let r = wait_until(Duration::from_secs(15), Duration::from_millis(100), || {
        c.run([
            "ping",
            "-c",
            "1",
            "-W",
            "1",
            "-I",
            "100.64.0.3",
            "100.64.0.1",
        ])
        .status
        .success()
    });
    assert!(r.is_ok(), "the attacker's own address should work");
    // Spoofed: b's address (inside c's /16, but b's /32 is more specific) and
    // an address no peer owns. No reply may come back.
    for src in ["100.64.0.2", "100.127.0.9"] {
        let out = c.run([
            "ping",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "1",
            "-I",
            src,
            "100.64.0.1",
        ]);
        assert!(
            !out.status.success(),
            "spoofed ping from {src} was answered"
        );
    }
    let show = c.run_ok(["wg", "show", &gc.iface, "transfer"]);
    assert!(!show.is_empty());
    let drops = za.stop_and_drops();
    let spoofed: u64 = drops
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("spoofed_source="))
        .and_then(|n| n.trim_end_matches('"').parse().ok())
        .unwrap_or_else(|| panic!("no spoofed_source counter: {drops}"));
    assert!(
        spoofed >= 6,
        "expected at least 6 spoofed packets counted: {drops}"
    );
}

/// A hostile host floods a tunnel's IPv6 WireGuard socket with junk data
/// messages, faster than any receiver can reject them. The data plane reads
/// them in bounded batches, one batch per source per turn, so the flood
/// starves neither the peer on the IPv4 socket, nor the TUN, nor the UAPI
/// socket, and every datagram it read is counted. (A flood on the *same*
/// socket as a peer also fills the kernel's queue, which drops the peer's
/// datagrams with the junk: no receiver design avoids that.)
#[test]
fn a_junk_flood_on_one_socket_starves_neither_the_other_nor_the_tun_nor_control() {
    if skip() {
        return;
    }
    let _cpu = CPU_HEAVY.write().unwrap_or_else(|e| e.into_inner());
    let topo = Topology::new(&["a", "b", "c"]);
    let (ka, kb) = (keys(), keys());
    let (a, b, c) = (topo.ns("a"), topo.ns("b"), topo.ns("c"));
    let mut za = Ztmesh::start(
        a,
        &ka,
        "100.64.0.1/32",
        &[PeerSpec {
            public: &kb.public,
            allowed: "100.64.0.2/32",
            endpoint: Some(format!("{}:{PORT}", topo.addr("b"))),
        }],
    );
    let _zb = Ztmesh::start(
        b,
        &kb,
        "100.64.0.2/32",
        &[PeerSpec {
            public: &ka.public,
            allowed: "100.64.0.1/32",
            endpoint: Some(format!("{}:{PORT}", topo.addr("a"))),
        }],
    );
    ping_until_up(a, "100.64.0.2");
    // Bounded: at most 100 million datagrams, for at most 6 s.
    let echo = bin_path("ztm-echo");
    let a_addr = topo.addr6("a").to_string();
    let port = PORT.to_string();
    let mut flood = c.spawn(
        "flood",
        [
            echo.as_os_str(),
            "flood".as_ref(),
            a_addr.as_ref(),
            port.as_ref(),
            "100000000".as_ref(),
            "6000".as_ref(),
        ],
    );
    std::thread::sleep(Duration::from_millis(300));

    let ping = a.run(["ping", "-c", "5", "-i", "0.2", "-W", "2", "100.64.0.2"]);
    let ping_out = String::from_utf8_lossy(&ping.stdout).into_owned();
    let show = a.run(["timeout", "10", "wg", "show", &za.iface, "peers"]);
    let flooding = flood.is_running();
    let received: u32 = ping_out
        .split(',')
        .find_map(|p| p.trim().strip_suffix(" received"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        received >= 3,
        "tunnel pings during the flood: {received} of 5 answered\n{ping_out}"
    );
    assert!(
        show.status.success() && String::from_utf8_lossy(&show.stdout).contains(&kb.public),
        "wg show did not answer during the flood: {}",
        String::from_utf8_lossy(&show.stderr)
    );
    assert!(
        flooding,
        "the flood ended before the checks did: {}",
        flood.logs()
    );

    assert!(
        flood.wait_exit(Duration::from_secs(15)).is_some(),
        "the flood did not stop"
    );
    let sent: u64 = flood
        .stdout()
        .trim()
        .strip_prefix("sent ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count from the flood: {}", flood.logs()));
    let drops = za.stop_and_drops();
    let unknown: u64 = drops
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("unknown_index="))
        .and_then(|n| n.trim_end_matches('"').parse().ok())
        .unwrap_or_else(|| panic!("no unknown_index counter: {drops}"));
    // The socket may overflow under the flood (the kernel drops those);
    // everything the data plane read was rejected and counted.
    assert!(
        unknown > 0 && unknown <= sent,
        "{sent} junk datagrams sent, {unknown} counted: {drops}"
    );
    eprintln!("flood: {sent} sent, {unknown} read and dropped; {received}/5 pings answered");
}
