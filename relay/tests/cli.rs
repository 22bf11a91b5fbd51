//! The `ztmesh-relay` binary: `serve` prints its identity and writes its
//! files with the right modes, `identity` and `stats` print them, SIGTERM
//! stops it cleanly, a second relay on the same data dir is refused.
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::Value;
use ztmesh_proto::keys::SigningKey;

const BIN: &str = env!("CARGO_BIN_EXE_ztmesh-relay");

fn serve(dir: &Path, key_args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(["serve", "--name", "cli-relay", "--data-dir"])
        .arg(dir)
        .args([
            "--quic-listen",
            "127.0.0.1:0",
            "--tcp-listen",
            "127.0.0.1:0",
            "--stun-listen",
            "127.0.0.1:0",
        ])
        .args(key_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn run(args: &[&str], dir: &Path) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .expect("runs")
}

/// Waits (bounded) for the child to exit.
fn wait(child: &mut Child) -> std::process::ExitStatus {
    for _ in 0..200 {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    panic!("the relay did not exit");
}

#[test]
fn serve_prints_its_identity_and_identity_and_stats_print_the_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let key = SigningKey::generate(&mut StdRng::seed_from_u64(1)).public();
    let key_file = tmp.path().join("controller.pub");
    std::fs::write(&key_file, format!("{key}\n")).unwrap();

    let mut child = serve(&dir, &["--controller-key-file", key_file.to_str().unwrap()])
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let printed: Value = serde_json::from_str(&line).expect("one JSON line");
    assert_eq!(printed["name"], "cli-relay");
    assert_eq!(printed["cert_sha256"].as_str().unwrap().len(), 64);
    assert_eq!(printed["stun_addrs"].as_array().unwrap().len(), 1);
    assert!(!printed["quic_addr"].as_str().unwrap().ends_with(":0"));

    let out = run(&["identity"], &dir);
    assert!(out.status.success(), "{out:?}");
    let identity: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(identity, printed);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);

    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.join("tls.key")), 0o600);
    assert_eq!(mode(&dir), 0o700);

    let mut stats = None;
    for _ in 0..100 {
        let out = run(&["stats"], &dir);
        if out.status.success() {
            stats = Some(serde_json::from_slice::<Value>(&out.stdout).unwrap());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let stats = stats.expect("stats appear within seconds");
    assert_eq!(stats["name"], "cli-relay");
    assert_eq!(stats["sessions"], serde_json::json!([]));

    // A second relay on the same data dir is refused at once.
    let second = serve(&dir, &["--controller-key", &key.to_string()])
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("another relay is running"),
        "{second:?}"
    );

    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(wait(&mut child).success());

    // Restarted, it keeps its certificate.
    let mut child = serve(&dir, &["--controller-key", &key.to_string()])
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let again: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(again["cert_sha256"], printed["cert_sha256"]);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(wait(&mut child).success());
}

#[test]
fn bad_arguments_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = serve(tmp.path(), &["--controller-key", "not-a-key"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("controller key"),
        "{out:?}"
    );
    let out = serve(tmp.path(), &[]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--controller-key"));
    let out = run(&["identity"], &tmp.path().join("none"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("serve"));
}
