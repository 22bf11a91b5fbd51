//! Least privilege of the running daemon (real binary, as root):
//! - after start-up every thread keeps only `CAP_NET_ADMIN` and `CAP_NET_BIND_SERVICE` (effective,
//!   permitted and bounding sets; nothing inheritable or ambient);
//! - the local API checks the caller's credentials (`SO_PEERCRED`,
//!   `SO_PEERGROUPS`): a real unprivileged uid may read `status` but not run
//!   `down` or `wg-config --include-private-key`, unless it is in the
//!   operator group.
//!
//! The daemon is not enrolled, so it opens no TUN device and sends nothing.
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `nobody` and its group on Debian; the operator group needs no name.
const NOBODY: u32 = 65534;
const OPERATORS: u32 = 65533;
const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_BIND_SERVICE: u32 = 10;

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

mod common;
use common::{Daemon, Scratch};

fn start_daemon(dir: &Path, extra: &[&str]) -> (Daemon, PathBuf) {
    let socket = dir.join("ztmesh.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_ztmesh"))
        .arg("daemon")
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--socket")
        .arg(&socket)
        .arg("--uapi-dir")
        .arg(dir.join("uapi"))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the daemon");
    let mut d = Daemon(child);
    // Ready when it answers (the socket exists a little earlier, before the
    // capabilities are dropped).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = d.0.try_wait() {
            panic!("the daemon exited early: {status}");
        }
        if socket.exists()
            && as_root(&["status", "--socket", &socket.to_string_lossy()])
                .status
                .success()
        {
            break;
        }
        assert!(Instant::now() < deadline, "the daemon never became ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    (d, socket)
}

/// A `/proc/.../status` capability field as a bit set.
fn cap_field(status: &str, field: &str) -> u64 {
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in status"));
    u64::from_str_radix(line.trim(), 16).expect("hex capability set")
}

#[test]
fn every_daemon_thread_keeps_only_cap_net_admin_and_bind_service() {
    if !require_root_or_skip() {
        return;
    }
    let dir = Scratch::new("caps");
    let (d, _socket) = start_daemon(&dir.0, &[]);
    let tasks = PathBuf::from(format!("/proc/{}/task", d.0.id()));
    let mut threads = 0;
    for task in std::fs::read_dir(&tasks).expect("task dir") {
        let status = std::fs::read_to_string(task.expect("task").path().join("status"))
            .expect("thread status");
        for field in ["CapEff:", "CapPrm:", "CapBnd:"] {
            assert_eq!(
                cap_field(&status, field),
                (1 << CAP_NET_ADMIN) | (1 << CAP_NET_BIND_SERVICE),
                "{field} of every thread is exactly CAP_NET_ADMIN + CAP_NET_BIND_SERVICE (DNS on port 53)"
            );
        }
        assert_eq!(cap_field(&status, "CapInh:"), 0);
        assert_eq!(cap_field(&status, "CapAmb:"), 0);
        threads += 1;
    }
    assert!(threads > 1, "the async runtime's threads are checked too");
}

/// Runs the CLI as `nobody` with the given supplementary groups.
fn as_nobody(groups: &str, args: &[&str]) -> Output {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={NOBODY}"))
        .arg(format!("--regid={NOBODY}"));
    if groups.is_empty() {
        c.arg("--clear-groups");
    } else {
        c.arg(format!("--groups={groups}"));
    }
    c.arg(env!("CARGO_BIN_EXE_ztmesh"))
        .args(args)
        .output()
        .expect("run setpriv")
}

fn as_root(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ztmesh"))
        .args(args)
        .output()
        .expect("run the cli")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn local_api_lets_any_user_read_but_only_root_or_operators_change() {
    if !require_root_or_skip() {
        return;
    }
    let dir = Scratch::new("peercred");
    let (_d, socket) = start_daemon(
        &dir.0,
        &[
            "--socket-group",
            &NOBODY.to_string(),
            "--operator-group",
            &OPERATORS.to_string(),
        ],
    );
    let s = socket.to_str().expect("utf-8 path");

    let status = as_nobody("", &["status", "--socket", s, "-o", "json"]);
    assert!(
        status.status.success(),
        "status is read-only: {}",
        stderr(&status)
    );

    for cmd in [
        vec!["down", "--socket", s],
        vec!["wg-config", "--include-private-key", "--socket", s],
        vec!["logout", "--socket", s],
    ] {
        let o = as_nobody("", &cmd);
        let e = stderr(&o);
        assert!(!o.status.success(), "{cmd:?} must be refused");
        assert!(
            e.contains("permission denied")
                && e.contains(&format!("requires root or group {OPERATORS}")),
            "{cmd:?}: {e}"
        );
    }
    // Without the private key, the config is readable by anyone allowed on
    // the socket (here it fails only because the node is not enrolled).
    let o = as_nobody("", &["wg-config", "--socket", s]);
    assert!(!stderr(&o).contains("permission denied"), "{}", stderr(&o));

    // A member of the operator group (supplementary, via SO_PEERGROUPS) may.
    let o = as_nobody(&format!("{NOBODY},{OPERATORS}"), &["down", "--socket", s]);
    assert!(o.status.success(), "operator may run down: {}", stderr(&o));
    let o = as_root(&["down", "--socket", s]);
    assert!(o.status.success(), "root may run down: {}", stderr(&o));
}
