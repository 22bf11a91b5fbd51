//! Durability: a controller killed with SIGKILL right after `keys create`
//! returned still knows the key after a restart.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ztmesh-controller");

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(dir: &Path) -> Killed {
    let child = Killed(
        Command::new(BIN)
            .args([
                "--data-dir",
                dir.to_str().unwrap(),
                "serve",
                "--listen",
                "127.0.0.1:0",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if admin(dir, &["users", "list"]).is_ok() {
            return child;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("controller did not come up within 20 s");
}

fn admin(dir: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn key_created_right_before_sigkill_survives_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut ctl = start(&dir);
    let key = admin(&dir, &["keys", "create", "--tags", "tag:web"]).unwrap();
    let key = key.trim().to_string();
    assert!(key.starts_with("ztmk1."), "{key}");
    ctl.0.kill().unwrap(); // SIGKILL
    ctl.0.wait().unwrap();
    drop(ctl);

    let _ctl = start(&dir);
    let list = admin(&dir, &["keys", "list", "-o", "json"]).unwrap();
    let key_id = key.split('.').nth(1).unwrap();
    assert!(
        list.contains(key_id),
        "key {key_id} missing after restart: {list}"
    );
}

#[test]
fn admin_errors_are_one_line_on_stderr_with_nonzero_exit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let _ctl = start(&dir);
    let err = admin(&dir, &["users", "create", "not an email"]).unwrap_err();
    assert!(err.starts_with("error: invalid user login"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let err = admin(&dir, &["nodes", "delete", "nope"]).unwrap_err();
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn data_dir_and_keys_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let _ctl = start(&dir);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("controller.key")), 0o600);
    assert_eq!(mode(&dir.join("tls.key")), 0o600);
    assert_eq!(mode(&dir.join("admin.sock")), 0o600);
}
