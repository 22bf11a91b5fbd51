//! One daemon per state directory: a second `ztmesh daemon` on the same state
//! dir exits at once with an error naming the lock file and the holder's PID,
//! and leaves the first one (and its socket) alone. Runs the real binary; no
//! privileges needed (a daemon that is not enrolled opens no TUN device).
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{Daemon, Scratch};

fn daemon(state: &Path, socket: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ztmesh"));
    c.arg("daemon")
        .arg("--state-dir")
        .arg(state)
        .arg("--socket")
        .arg(socket)
        .arg("--uapi-dir")
        .arg(state.join("uapi"));
    c
}

fn wait_for(path: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the first daemon exited early: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_second_daemon_on_the_same_state_dir_exits_naming_the_lock_and_holder() {
    let dir = Scratch::new("lock");
    let state = dir.0.join("state");
    let first_socket = dir.0.join("first.sock");
    let first = daemon(&state, &first_socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the first daemon");
    let mut first = Daemon(first);
    wait_for(&first_socket, &mut first.0);

    let mut second = daemon(&state, &dir.0.join("second.sock"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the second daemon");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = second.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = second.kill();
            let _ = second.wait();
            panic!("the second daemon kept running on a locked state dir");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    second
        .stderr
        .take()
        .expect("piped")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    assert!(!status.success(), "second daemon must fail: {stderr}");
    let lock = state.join("daemon.lock");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line in {stderr:?}"));
    assert!(
        line.contains(&lock.display().to_string()),
        "names the lock: {line}"
    );
    assert!(
        line.contains(&format!("pid {}", first.0.id())),
        "names the holder: {line}"
    );
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "one line: {stderr}"
    );
    // The first daemon is untouched: still running, socket still there.
    assert!(first.0.try_wait().expect("wait").is_none());
    assert!(first_socket.exists());
}
