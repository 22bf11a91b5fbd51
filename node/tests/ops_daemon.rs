//! The node as installed software, through the real binary in a network
//! namespace: `daemon` takes its settings from a config file and speaks
//! systemd's notify protocol (ready once its local API answers, watchdog
//! keep-alives, stopping); the CLI finds the socket from the same file or
//! from `--socket` before the subcommand; `--json`; JSON logs; a broken file
//! names FILE:LINE:COL; the packaged node.toml is current.
//!
//! ```text
//!   [netns ztm-ops-PID]  ztmesh --config node.toml daemon
//!        │ NOTIFY_SOCKET (a unix datagram socket in the test's temp dir)
//!   test ┘
//! ```
#![allow(
    clippy::disallowed_methods,
    reason = "integration tests read the real clock"
)]

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ztmesh");

fn require_root_or_skip() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        return true;
    }
    if matches!(
        std::env::var("ZTMESH_SKIP_NETNS").ok().as_deref(),
        Some("1" | "true" | "yes")
    ) {
        eprintln!("skipped: needs root (ZTMESH_SKIP_NETNS=1 is set)");
        return false;
    }
    panic!("this test needs root (euid is {euid}); run as root or set ZTMESH_SKIP_NETNS=1");
}

/// A network namespace removed on drop.
struct Netns(String);

impl Netns {
    fn new() -> Self {
        let ns = Netns(format!("ztm-ops-{}", std::process::id()));
        let out = Command::new("ip")
            .args(["netns", "add", &ns.0])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The CLI with no config file but the one a test names.
fn cli() -> Command {
    let mut c = Command::new(BIN);
    for var in ["ZTMESH_SOCKET", "ZTMESH_LOG", "ZTMESH_LOG_FORMAT"] {
        c.env_remove(var);
    }
    c.env("ZTMESH_NODE_CONFIG", "");
    c
}

fn run(c: &mut Command) -> Output {
    c.output().unwrap()
}

fn next_notice(sock: &UnixDatagram, within: Duration) -> Option<String> {
    sock.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).ok()?;
    Some(text(&buf[..n]))
}

#[test]
fn the_daemon_runs_from_its_config_file_under_the_notify_protocol() {
    if !require_root_or_skip() {
        return;
    }
    let ns = Netns::new();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let socket = dir.join("api.sock");
    let conf = dir.join("node.toml");
    std::fs::write(
        &conf,
        format!(
            "state-dir = {:?}\nsocket = {socket:?}\nuapi-dir = {:?}\nresolv-conf = {:?}\n\
             interface = \"ztmops0\"\nport = 0\nlog-format = \"json\"\n",
            dir.join("state"),
            dir.join("uapi"),
            dir.join("resolv.conf"),
        ),
    )
    .unwrap();
    let notify_path = dir.join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let log_path = dir.join("daemon.log");
    let mut daemon = Killed(
        Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .arg(BIN)
            .arg("--config")
            .arg(&conf)
            .arg("daemon")
            .env("ZTMESH_NODE_CONFIG", "")
            .env_remove("ZTMESH_SOCKET")
            .env("NOTIFY_SOCKET", &notify_path)
            .env("WATCHDOG_USEC", "2000000")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
    );

    // READY=1 comes once the local API answers (liveness bound).
    let ready = next_notice(&notify, Duration::from_secs(60)).expect("no READY=1 within 60 s");
    assert_eq!(
        ready,
        format!("READY=1\nSTATUS=local API on {}", socket.display())
    );
    // The CLI finds the socket in the same file…
    let status = run(cli().arg("--config").arg(&conf).args(["status", "--json"]));
    assert!(status.status.success(), "{}", text(&status.stderr));
    let s: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(s["enrolled"], false);
    // …or from --socket, before or after the subcommand; `-o json` and
    // `--json` print the same.
    let before = run(cli()
        .arg("--socket")
        .arg(&socket)
        .args(["status", "-o", "json"]));
    let after = run(cli().args(["status", "--json", "--socket"]).arg(&socket));
    assert!(before.status.success() && after.status.success());
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&before.stdout).unwrap()["enrolled"],
        serde_json::from_slice::<serde_json::Value>(&after.stdout).unwrap()["enrolled"],
    );
    let both = run(cli()
        .arg("--socket")
        .arg(&socket)
        .args(["status", "--json", "-o", "text"]));
    assert!(!both.status.success(), "--json and -o conflict");

    let started = Instant::now();
    let mut keepalives = 0;
    while keepalives < 3 && started.elapsed() < Duration::from_secs(30) {
        match next_notice(&notify, Duration::from_secs(10)) {
            Some(n) if n == "WATCHDOG=1" => keepalives += 1,
            Some(other) => panic!("unexpected notification {other:?}"),
            None => break,
        }
    }
    assert_eq!(keepalives, 3, "three keep-alives within 30 s (1 s apart)");

    // `ip netns exec` execs the daemon: the child's PID is the daemon's.
    let pid = daemon.0.id().to_string();
    assert!(run(Command::new("kill").args(["-TERM", &pid]))
        .status
        .success());
    assert_eq!(
        next_notice(&notify, Duration::from_secs(30)).as_deref(),
        Some("STOPPING=1")
    );
    let exit = daemon.0.wait().unwrap();
    assert!(exit.success(), "{exit}");
    let log = std::fs::read_to_string(&log_path).unwrap();
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        assert!(v["level"].is_string(), "{line}");
    }
    assert!(log.contains("\"message\":\"daemon ready\""), "{log}");
}

#[test]
fn a_broken_node_config_names_file_line_and_column() {
    let tmp = tempfile::tempdir().unwrap();
    let conf = tmp.path().join("node.toml");
    for (body, want) in [
        ("port = 41641\nprot = 1\n", "2:1: unknown key `prot`"),
        ("port = 70000\n", "1:8: `port`: invalid value '70000'"),
        (
            "stun = \"198.18.0.1\"\n",
            "1:8: `stun`: invalid value '198.18.0.1'",
        ),
        (
            "state_dir = \"/x\"\n",
            "1:1: unknown key `state_dir`; did you mean `state-dir`?",
        ),
    ] {
        std::fs::write(&conf, body).unwrap();
        let want = format!("error: {}:{want}", conf.display());
        for args in [&["daemon"][..], &["config", "check"], &["status"]] {
            let out = run(cli().arg("--config").arg(&conf).args(args));
            assert!(!out.status.success(), "{args:?} {body:?}");
            assert!(
                text(&out.stderr).starts_with(&want),
                "{args:?} {body:?}: {}",
                text(&out.stderr)
            );
        }
    }
    // Help, the version and `config example` work with the broken file, to
    // fix it with.
    for args in [
        &["help"][..],
        &["help", "up"],
        &["version"],
        &["config", "example"],
        &["up", "--help"],
    ] {
        let out = run(cli().arg("--config").arg(&conf).args(args));
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    }
    std::fs::write(&conf, "port = 0\nstun = [\"198.18.0.1:3478\"]\n").unwrap();
    let ok = run(cli().arg("--config").arg(&conf).args(["config", "check"]));
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    assert!(text(&ok.stdout).contains("ok (2 keys;"));
}

#[test]
fn the_packaged_node_config_is_current_and_documents_every_daemon_flag() {
    let example = run(cli().args(["config", "example"]));
    assert!(example.status.success());
    let example = text(&example.stdout);
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/node.toml"),
    )
    .unwrap();
    assert_eq!(
        shipped, example,
        "deploy/config/node.toml is stale: regenerate it with `ztmesh config example`"
    );
    let help = run(cli().args(["daemon", "--help"]));
    // The options list: lines that begin with a flag (`-o, --output <..>`,
    // `--port <PORT>`).
    let help = text(&help.stdout);
    let flags: Vec<&str> = help
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with('-'))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("--")))
        .map(|w| w.trim_end_matches(','))
        .filter(|f| !["help", "config"].contains(f))
        .collect();
    assert!(flags.len() >= 10, "{flags:?}");
    for flag in flags {
        assert!(
            example.contains(&format!("\n#{flag} = ")) || example.contains(&format!("\n{flag} = ")),
            "--{flag} is not documented in node.toml"
        );
    }
}

#[test]
fn tunnel_keeps_its_own_config_flag_for_the_wg_quick_file() {
    let tmp = tempfile::tempdir().unwrap();
    let wg = tmp.path().join("wg0.conf");
    std::fs::write(&wg, "[Interface]\nPrivateKey = garbage\n").unwrap();
    // Not read as node.toml: the wg-quick parser names its own line.
    let out = run(cli().args(["tunnel", "--config"]).arg(&wg));
    assert!(!out.status.success());
    assert_eq!(
        text(&out.stderr).trim(),
        format!(
            "error: {}: line 2: PrivateKey is not base64 of 32 bytes",
            wg.display()
        )
    );
}
