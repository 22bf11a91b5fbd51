//! The real `ztmesh-controller` binary: durability across SIGKILL, private
//! files, one-line errors, and the policy commands (check, explain, plan, set).
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

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

/// `ztmesh-controller --data-dir DIR serve` on a free loopback port.
fn serve_command(dir: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("--data-dir")
        .arg(dir)
        .args(["serve", "--listen", "127.0.0.1:0"]);
    cmd
}

fn start(dir: &Path) -> Killed {
    let child = Killed(
        serve_command(dir)
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
fn fingerprint_and_controller_key_print_what_nodes_and_relays_pin_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    // Before the first `serve`: a clear error naming the file, nothing created.
    let err = admin(&dir, &["controller-key"]).unwrap_err();
    assert!(err.contains("controller.key"), "{err}");
    assert!(err.contains("has `serve` run"), "{err}");
    assert!(!dir.join("controller.key").exists());

    let log = tmp.path().join("serve.out");
    let mut child = Killed(
        serve_command(&dir)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let printed = |label: &str| {
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .find_map(|l| l.trim().strip_prefix(label).map(|v| v.trim().to_owned()))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while printed("controller key:").is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let served_key = printed("controller key:").expect("serve prints its controller key");
    let served_fp = printed("fingerprint:").expect("serve prints its fingerprint");
    let _ = child.0.kill();
    let _ = child.0.wait();

    // Offline, with the controller stopped: the same values, one line each.
    let key = admin(&dir, &["controller-key"]).unwrap();
    assert_eq!(key.trim(), served_key);
    assert_eq!(key.lines().count(), 1, "{key}");
    let fp = admin(&dir, &["fingerprint"]).unwrap();
    assert_eq!(fp.trim(), served_fp);
    assert_eq!(fp.trim().len(), 64, "{fp}");
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

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

const BROKEN: &str = "{\n  \"acls\": [\n    {\"action\": \"accept\", \"src\": [\"group:ghosts\"], \"dst\": [\"*:22\"]},\n  ],\n}\n";

#[test]
fn policy_check_accepts_the_example_and_names_file_line_col_on_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/policy.hujson");
    let ok = admin(tmp.path(), &["policy", "check", example]).unwrap();
    assert!(ok.contains("ok"), "{ok}");
    let bad = write(tmp.path(), "broken.hujson", BROKEN);
    let err = admin(tmp.path(), &["policy", "check", bad.to_str().unwrap()]).unwrap_err();
    let want = format!("{}:3:", bad.display());
    assert!(err.contains(&want), "{err}");
    assert!(err.contains("group:ghosts"), "{err}");
}

#[test]
fn policy_explain_works_offline_and_names_the_deciding_rule() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(
        tmp.path(),
        "p.hujson",
        "{\n  \"tagOwners\": {\"tag:web\": []},\n  \"acls\": [\n    {\"action\": \"accept\", \"src\": [\"alice@example.com\"], \"dst\": [\"tag:web:443\"]},\n  ],\n}\n",
    );
    let p = p.to_str().unwrap();
    let allow = admin(
        tmp.path(),
        &[
            "policy",
            "explain",
            "--policy",
            p,
            "--src",
            "alice@example.com",
            "--dst",
            "tag:web:443",
        ],
    )
    .unwrap();
    assert!(allow.starts_with("ALLOW"), "{allow}");
    assert!(allow.contains("p.hujson:4"), "{allow}");
    let deny = admin(
        tmp.path(),
        &[
            "policy",
            "explain",
            "--policy",
            p,
            "--src",
            "alice@example.com",
            "--dst",
            "tag:web:22",
        ],
    )
    .unwrap();
    assert!(deny.starts_with("DENY"), "{deny}");
}

#[test]
fn policy_plan_shows_changes_and_set_refuses_a_broken_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let _ctl = start(&dir);
    let v1 = write(
        tmp.path(),
        "v1.hujson",
        "{\"tagOwners\": {\"tag:web\": [], \"tag:db\": []}, \"acls\": []}",
    );
    admin(&dir, &["policy", "set", v1.to_str().unwrap()]).unwrap();
    let v2 = write(
        tmp.path(),
        "v2.hujson",
        "{\"tagOwners\": {\"tag:web\": [], \"tag:db\": []},\n \"acls\": [{\"action\": \"accept\", \"src\": [\"tag:web\"], \"dst\": [\"tag:db:5432\"], \"proto\": \"tcp\"}]}",
    );
    // No nodes yet: nothing changes for any pair.
    let plan = admin(&dir, &["policy", "plan", v2.to_str().unwrap()]).unwrap();
    assert!(plan.contains("no changes"), "{plan}");
    let bad = write(tmp.path(), "broken.hujson", BROKEN);
    let err = admin(&dir, &["policy", "set", bad.to_str().unwrap()]).unwrap_err();
    assert!(err.contains(":3:"), "{err}");
    let current = admin(&dir, &["policy", "get"]).unwrap();
    assert!(
        current.contains("\"acls\": []"),
        "old policy stays in force: {current}"
    );
}

#[test]
fn a_second_controller_on_the_same_data_dir_exits_naming_the_lock_and_its_holder() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let first = start(&dir);
    let mut second = Killed(
        serve_command(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Liveness bound: the refusal is immediate; 20 s is generous.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = second.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the second controller kept running"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(second.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("ztmesh.lock"), "{err}");
    assert!(err.contains(&first.0.id().to_string()), "{err}");
    // The first one still serves its admin socket.
    admin(&dir, &["users", "list"]).unwrap();
}

#[test]
fn database_wal_and_shm_files_are_private_under_umask_022() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let child = Command::new("sh")
        .args(["-c", "umask 022 && exec \"$0\" \"$@\""])
        .arg(BIN)
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
        .unwrap();
    let _ctl = Killed(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while admin(&dir, &["users", "list"]).is_err() {
        assert!(Instant::now() < deadline, "controller did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    admin(&dir, &["keys", "create", "--tags", "tag:web"]).unwrap();
    for f in ["ztmesh.db", "ztmesh.db-wal", "ztmesh.db-shm"] {
        let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f} is {mode:o}");
    }
}

/// Every admin subcommand group answers in its text table and in `-o json`
/// with the same fields (the CLI's output is an interface scripts rely on).
#[test]
fn every_admin_group_prints_its_text_table_and_json_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let _ctl = start(&dir);
    let json = |args: &[&str]| -> serde_json::Value {
        let out = admin(&dir, args).unwrap();
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"))
    };

    let created = admin(&dir, &["users", "create", "alice@example.com"]).unwrap();
    assert!(
        created.starts_with("created user alice@example.com (id "),
        "{created}"
    );
    let users = json(&["users", "list", "-o", "json"]);
    assert_eq!(users[0]["login"], "alice@example.com", "{users}");
    for field in ["id", "created_ms"] {
        assert!(users[0].get(field).is_some(), "users: no {field}: {users}");
    }
    let text = admin(&dir, &["users", "list"]).unwrap();
    assert!(text.starts_with("ID     LOGIN"), "{text}");
    assert!(text.contains("alice@example.com"), "{text}");

    let secret = admin(
        &dir,
        &[
            "keys",
            "create",
            "--user",
            "alice@example.com",
            "--reusable",
        ],
    )
    .unwrap();
    assert_eq!(secret.trim_end().lines().count(), 1, "{secret}");
    let keys = json(&["keys", "list", "-o", "json"]);
    for field in [
        "key_id",
        "user",
        "tags",
        "reusable",
        "ephemeral",
        "created_ms",
        "expires_ms",
        "used",
        "revoked",
        "created_by",
    ] {
        assert!(keys[0].get(field).is_some(), "keys: no {field}: {keys}");
    }
    assert_eq!(keys[0]["reusable"], true, "{keys}");
    let key_id = keys[0]["key_id"].as_str().unwrap().to_string();
    let text = admin(&dir, &["keys", "list"]).unwrap();
    assert!(text.starts_with("KEY ID"), "{text}");
    assert!(text.contains(&key_id), "{text}");
    assert_eq!(
        admin(&dir, &["keys", "revoke", &key_id]).unwrap(),
        format!("revoked auth key {key_id}\n")
    );

    assert_eq!(
        json(&["nodes", "list", "-o", "json"]),
        serde_json::json!([])
    );
    let text = admin(&dir, &["nodes", "list"]).unwrap();
    assert!(text.starts_with("ID    NAME"), "{text}");
    let err = admin(&dir, &["nodes", "show", "nope", "-o", "json"]).unwrap_err();
    assert!(err.starts_with("error: "), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");

    let api = admin(&dir, &["apikeys", "create", "--description", "ci"]).unwrap();
    assert_eq!(api.trim_end().lines().count(), 1, "{api}");
    let apikeys = json(&["apikeys", "list", "-o", "json"]);
    let mine = apikeys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["description"] == "ci")
        .unwrap_or_else(|| panic!("no key described ci: {apikeys}"));
    for field in ["key_id", "created_ms", "expires_ms", "revoked"] {
        assert!(mine.get(field).is_some(), "apikeys: no {field}: {apikeys}");
    }
    let text = admin(&dir, &["apikeys", "list"]).unwrap();
    assert!(text.starts_with("KEY ID         DESCRIPTION"), "{text}");
    let api_id = mine["key_id"].as_str().unwrap().to_string();
    assert_eq!(
        admin(&dir, &["apikeys", "revoke", &api_id]).unwrap(),
        format!("revoked API key {api_id}\n")
    );
    // Each group revokes only its own kind of key.
    let err = admin(&dir, &["apikeys", "revoke", &key_id]).unwrap_err();
    assert!(
        err.contains(&format!("API key {key_id} not found")),
        "{err}"
    );
    let err = admin(&dir, &["keys", "revoke", &api_id]).unwrap_err();
    assert!(
        err.contains(&format!("auth key {api_id} not found")),
        "{err}"
    );

    let audit = json(&["audit", "--limit", "50", "-o", "json"]);
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(!actions.is_empty(), "{audit}");
    for field in ["id", "time_ms", "actor", "action", "target", "detail"] {
        assert!(audit[0].get(field).is_some(), "audit: no {field}: {audit}");
    }
    let text = admin(&dir, &["audit"]).unwrap();
    // The JSON listing is itself audited (`api.read`), one row more.
    assert_eq!(text.lines().count(), (actions.len() + 1).min(50), "{text}");
    assert!(text.lines().next().unwrap().contains("api.read"), "{text}");
    // Filters: by action (a prefix with `*`), actor, text and time.
    let f = json(&[
        "audit",
        "--action",
        "api.*",
        "--actor",
        "local-admin",
        "-o",
        "json",
    ]);
    let rows = f.as_array().unwrap();
    assert!(!rows.is_empty(), "{f}");
    assert!(
        rows.iter()
            .all(|e| e["action"].as_str().unwrap().starts_with("api.")
                && e["actor"] == "local-admin"),
        "{f}"
    );
    let none = json(&[
        "audit",
        "--grep",
        "no such text anywhere",
        "--since",
        "1h",
        "-o",
        "json",
    ]);
    assert_eq!(none.as_array().unwrap().len(), 0, "{none}");
}

#[test]
fn serve_refuses_a_bad_relay_file_naming_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let file = tmp.path().join("relays.jsonl");
    let fp = "ab".repeat(32);
    std::fs::write(
        &file,
        format!(
            "# one relay per line, as `ztmesh-relay identity` prints it\n\
             {{\"name\":\"r1\",\"quic_addr\":\"0.0.0.0:7443\",\"tcp_addr\":\"198.18.0.9:443\",\"stun_addrs\":[],\"cert_sha256\":\"{fp}\"}}\n"
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args([
            "--data-dir",
            dir.to_str().unwrap(),
            "serve",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--relay-file")
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let want = format!(
        "{}:2: quic_addr \"0.0.0.0:7443\" cannot be dialled",
        file.display()
    );
    assert!(err.contains(&want), "{err}");
    assert!(
        !dir.join("ztmesh.db").exists(),
        "nothing was created before the check"
    );
}

#[test]
fn audit_verify_and_export_read_the_data_dir_and_verify_names_a_changed_row() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let ctl = start(&dir);
    admin(&dir, &["users", "create", "alice@example.com"]).unwrap();
    // While the controller runs.
    let out = admin(&dir, &["audit", "verify"]).unwrap();
    assert!(out.starts_with("audit chain ok: "), "{out}");
    let export = admin(&dir, &["audit", "export", "--format", "jsonl"]).unwrap();
    let rows: Vec<serde_json::Value> = export
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for pair in rows.windows(2) {
        assert_eq!(pair[1]["prev_hash"], pair[0]["hash"], "{export}");
        assert_eq!(pair[0]["hash"].as_str().unwrap().len(), 64);
    }
    // Reads are audited too (start() polls `users list`).
    assert!(
        rows.iter()
            .any(|r| r["action"] == "api.read" && r["target"] == "ListUsers"),
        "{export}"
    );
    let created = rows
        .iter()
        .find(|r| r["action"] == "user.create" && r["target"] == "alice@example.com")
        .expect("the user.create row")["id"]
        .as_u64()
        .unwrap();
    let recent = admin(&dir, &["audit", "export", "--since", "1h"]).unwrap();
    assert!(recent.lines().count() >= rows.len(), "{recent}");
    let none = admin(&dir, &["audit", "export", "--since", "0s"]).unwrap();
    assert!(none.lines().count() < rows.len(), "{none}");
    drop(ctl);

    // Changed behind the controller's back: named, exit 1.
    rusqlite::Connection::open(dir.join("ztmesh.db"))
        .unwrap()
        .execute(
            "UPDATE audit SET detail = 'role=admin' WHERE id = ?1",
            [created],
        )
        .unwrap();
    let err = admin(&dir, &["audit", "verify"]).unwrap_err();
    assert!(
        err.contains(&format!("audit chain broken at row #{created}: altered")),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}
