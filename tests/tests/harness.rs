//! Smoke test of the netns harness itself: namespaces, the bridged topology,
//! the veth pair, the echo helper, and cleanup.
//!
//! ```text
//!        switch ns: br0
//!        ┌───────┴───────┐
//!   ns "a" eth0     ns "b" eth0
//!   198.18.0.1/24   198.18.0.2/24     (echo server on b:7000)
//!
//!   pair "left" eth0 198.18.1.1/24 ── eth0 198.18.1.2/24 "right"  (echo on right:7001)
//! ```
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ztmesh_tests::{require_root_or_skip, wait_until, Netns, Topology, VethPair};

fn namespace_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn bridge_topology_carries_tcp_echo_and_is_removed_on_drop() {
    if !require_root_or_skip() {
        return;
    }
    let topo = Topology::new(&["a", "b"]);
    let names: Vec<String> = ["a", "b"]
        .iter()
        .map(|n| topo.ns(n).name().to_owned())
        .chain([topo.switch().name().to_owned()])
        .collect();
    assert!(names.iter().all(|n| namespace_exists(n)), "{names:?}");
    assert_eq!(topo.addr("a").to_string(), "198.18.0.1");
    assert_eq!(topo.addr("b").to_string(), "198.18.0.2");

    let mut echo = topo.ns("b").spawn_echo(&["7000"]);
    let echo_pid = echo.pid();
    let b = topo.addr("b").to_string();
    topo.ns("a")
        .tcp_check(&b, 7000, Duration::from_secs(3))
        .expect("a reaches b's echo server over the bridge (IPv4)");
    topo.ns("a")
        .tcp_check(&topo.addr6("b").to_string(), 7000, Duration::from_secs(3))
        .expect("a reaches b's echo server over the bridge (IPv6)");
    topo.ns("a")
        .tcp_connect(&b, 7000, Duration::from_secs(3))
        .expect("plain connect to b's echo server");
    let err = topo
        .ns("a")
        .tcp_check(&b, 7009, Duration::from_secs(1))
        .expect_err("nothing listens on 7009");
    assert!(err.contains("refused"), "{err}");

    // Unplugging b makes the check time out instead of succeeding.
    topo.set_connected("b", false);
    let err = topo
        .ns("a")
        .tcp_check(&b, 7000, Duration::from_millis(300))
        .expect_err("b is unplugged");
    assert!(!err.is_empty());
    topo.set_connected("b", true);
    wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        topo.ns("a")
            .tcp_check(&b, 7000, Duration::from_millis(300))
            .is_ok()
    })
    .expect("b reachable again once replugged");

    assert!(echo.is_running());
    assert!(echo.stdout().contains("echoed"), "{}", echo.logs());
    drop(echo);
    assert!(!process_exists(echo_pid), "echo server killed on drop");
    drop(topo);
    for n in &names {
        assert!(!namespace_exists(n), "{n} removed on drop");
    }
}

#[test]
fn namespaces_are_isolated_from_each_other() {
    if !require_root_or_skip() {
        return;
    }
    let a = Netns::new("iso-a");
    let b = Netns::new("iso-b");
    let _echo = b.spawn_echo(&["127.0.0.1:7002"]);
    assert!(a
        .tcp_check("127.0.0.1", 7002, Duration::from_millis(500))
        .is_err());
    b.tcp_check("127.0.0.1", 7002, Duration::from_secs(2))
        .expect("b reaches its own loopback listener");
}

#[test]
fn veth_pair_connects_two_namespaces_and_stream_survives_rounds() {
    if !require_root_or_skip() {
        return;
    }
    let pair = VethPair::new("left", "right");
    let _echo = pair.b.spawn_echo(&["7001"]);
    let right = pair.b_addr.to_string();
    pair.a
        .tcp_check(&right, 7001, Duration::from_secs(3))
        .expect("left reaches right");
    let echo = ztmesh_tests::bin_path("ztm-echo");
    let mut stream = pair.a.spawn(
        "stream",
        [
            echo.to_str().unwrap(),
            "stream",
            &right,
            "7001",
            "5",
            "10",
            "2000",
        ],
    );
    let status = stream
        .wait_exit(Duration::from_secs(10))
        .expect("stream finishes");
    assert!(status.success(), "{}", stream.logs());
    assert!(stream.stdout().contains("rounds=5"), "{}", stream.logs());
}

#[test]
fn namespace_drop_kills_processes_left_inside() {
    if !require_root_or_skip() {
        return;
    }
    let ns = Netns::new("leftover");
    let name = ns.name().to_owned();
    // A process the harness does not track: started through `ip netns exec`
    // and left running (its own child is reaped by this test afterwards).
    let mut child = Command::new("ip")
        .args(["netns", "exec", &name, "sleep", "30"])
        .spawn()
        .unwrap();
    let pid = child.id();
    wait_until(Duration::from_secs(2), Duration::from_millis(10), || {
        ns.pids().contains(&(pid as i32))
    })
    .expect("sleep runs inside the namespace");
    drop(ns);
    let status = child.wait().unwrap();
    assert!(!status.success(), "sleep was killed, not finished");
    assert!(!namespace_exists(&name));
}

#[test]
fn namespaces_and_processes_are_removed_when_a_test_panics() {
    if !require_root_or_skip() {
        return;
    }
    let mut seen = (Vec::new(), 0u32);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let topo = Topology::new(&["p", "q"]);
        let echo = topo.ns("q").spawn_echo(&["7003"]);
        seen = (
            vec![
                topo.ns("p").name().to_owned(),
                topo.ns("q").name().to_owned(),
                topo.switch().name().to_owned(),
            ],
            echo.pid(),
        );
        panic!("deliberate failure inside a test");
    }));
    assert!(result.is_err());
    let (names, pid) = seen;
    assert_eq!(names.len(), 3);
    for n in &names {
        assert!(!namespace_exists(n), "{n} left behind after a panic");
    }
    assert!(
        !process_exists(pid),
        "echo server {pid} left running after a panic"
    );
}

/// CI runs as root; a developer without root gets a clear failure, or a
/// visible skip when asking for it. Checked by running this very test binary
/// as `nobody`.
#[test]
fn non_root_run_fails_clearly_unless_skip_is_requested() {
    if !require_root_or_skip() {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let as_nobody = |skip: Option<&str>| {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&exe)
            .args([
                "--exact",
                "namespaces_are_isolated_from_each_other",
                "--nocapture",
            ])
            .env_remove("ZTMESH_SKIP_NETNS");
        if let Some(v) = skip {
            cmd.env("ZTMESH_SKIP_NETNS", v);
        }
        cmd.output().unwrap()
    };

    let refused = as_nobody(None);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "non-root run passed:\n{stderr}");
    assert!(
        stderr.contains("needs root") && stderr.contains("ZTMESH_SKIP_NETNS=1"),
        "{stderr}"
    );

    let skipped = as_nobody(Some("1"));
    let stderr = String::from_utf8_lossy(&skipped.stderr);
    assert!(
        skipped.status.success(),
        "skip requested but failed:\n{stderr}"
    );
    assert!(stderr.contains("skipped"), "{stderr}");
}
