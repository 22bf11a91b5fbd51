//! Controller backup and restore end to end (issue 19): a real controller
//! and real node daemons in network namespaces. An online backup is taken
//! while a bounded loop keeps changing the policy; the controller is
//! stopped and the backup restored into a fresh data dir; the restored
//! controller, on the same address, serves the same nodes, keys and the
//! policy in force at backup time, the nodes reconnect, traffic flows and
//! the audit chain verifies. Needs root and the `ztmesh`,
//! `ztmesh-controller` and `ztm-echo` binaries.
//!
//! ```text
//!          underlay: switch ns, bridge br0 (198.18.0.0/24)
//!   ┌────────────────┬────────────────┐
//!  bk-controller    bk-laptop        bk-web (tag:web: echo on 22 and 443)
//!  198.18.0.1       198.18.0.2       198.18.0.3
//!  :8443            (tag:laptop)
//!
//!  policy rev N:  laptop → web:22 always; laptop → web:443 when N is odd
//! ```
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::Value;
use ztmesh_tests::natlab::{
    admin, admin_ok, join, overlay_v4, run_cli, set_policy, start_controller, NodeDirs,
};
use ztmesh_tests::{bin_path, require_root_or_skip, wait_until, Netns, Proc, TempDir, Topology};

const CONTROLLER: &str = "bk-controller";
const LAPTOP: &str = "bk-laptop";
const WEB: &str = "bk-web";

/// Policy revision `rev`: ssh always, https on odd revisions.
fn policy(rev: u32) -> String {
    let https = if rev % 2 == 1 {
        r#"{"action": "accept", "src": ["tag:laptop"], "dst": ["tag:web:443"]},"#
    } else {
        ""
    };
    format!(
        r#"// backup e2e policy rev-{rev}-end
{{
  "tagOwners": {{"tag:web": [], "tag:laptop": []}},
  "acls": [
    {{"action": "accept", "src": ["tag:laptop"], "dst": ["tag:web:22"]}},
    {https}
  ],
}}"#
    )
}

/// The revision a policy text carries.
fn rev_of(text: &str) -> Option<u32> {
    let rest = &text[text.find("rev-")? + 4..];
    rest[..rest.find("-end")?].parse().ok()
}

/// Generous liveness bounds (no timed assertions).
const RECONNECT: Duration = Duration::from_secs(90);
/// The policy loop's bound on iterations.
const MAX_REVS: u32 = 400;

/// The daemon is declared first so it stops before its state dir is removed.
struct Node {
    _daemon: Proc,
    dirs: NodeDirs,
}

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// (id, name, machine key, wireguard key) of every node.
fn nodes(ns: &Netns, data: &Path) -> BTreeSet<(u64, String, String, String)> {
    let v = json(&admin_ok(ns, data, &["nodes", "list", "-o", "json"]));
    v.as_array()
        .expect("a list")
        .iter()
        .map(|n| {
            (
                n["id"].as_u64().expect("id"),
                n["name"].as_str().expect("name").to_owned(),
                n["machine_key"].as_str().expect("machine key").to_owned(),
                n["wg_key"].as_str().expect("wg key").to_owned(),
            )
        })
        .collect()
}

/// The key ids of `keys list` / `apikeys list`.
fn key_ids(ns: &Netns, data: &Path, group: &str) -> BTreeSet<String> {
    let v = json(&admin_ok(ns, data, &[group, "list", "-o", "json"]));
    v.as_array()
        .expect("a list")
        .iter()
        .map(|k| k["key_id"].as_str().expect("key_id").to_owned())
        .collect()
}

fn all_online(ns: &Netns, data: &Path) -> bool {
    let v = json(&admin_ok(ns, data, &["nodes", "list", "-o", "json"]));
    v.as_array()
        .is_some_and(|a| a.iter().all(|n| n["online"].as_bool() == Some(true)))
}

#[test]
fn a_backup_taken_under_policy_churn_restores_the_controller_nodes_reconnect_to() {
    if !require_root_or_skip() {
        return;
    }
    let topo = Topology::new(&[CONTROLLER, LAPTOP, WEB]);
    let ns = topo.ns(CONTROLLER);
    let work = TempDir::new("bk-work");
    let old_dir = TempDir::new("bk-old");
    let data: PathBuf = old_dir.join("data");
    let mut controller = start_controller(ns, topo.addr(CONTROLLER), &data, None);
    let policy_file = work.join("policy.hujson");
    set_policy(ns, &data, &policy_file, &policy(0));
    let enroll = |name: &str, tag: &str| {
        let (daemon, dirs) = join(&topo, CONTROLLER, &data, name, tag);
        Node {
            _daemon: daemon,
            dirs,
        }
    };
    let laptop = enroll(LAPTOP, "tag:laptop");
    let web = enroll(WEB, "tag:web");
    let _echo = topo.ns(WEB).spawn_echo(&["22", "443"]);
    let web_ip = overlay_v4(topo.ns(WEB), &web.dirs);
    let flow =
        |port: u16, within: Duration| topo.ns(LAPTOP).tcp_check(&web_ip, port, within).is_ok();
    assert!(
        wait_until(RECONNECT, Duration::from_millis(200), || flow(
            22,
            Duration::from_secs(2)
        ))
        .is_ok(),
        "laptop → web:22 before the backup\n{}",
        controller.logs()
    );

    // Keys that must survive: a reusable auth key, and API keys of two roles.
    admin_ok(
        ns,
        &data,
        &["keys", "create", "--tags", "tag:web", "--reusable"],
    );
    let admin_key = admin_ok(ns, &data, &["apikeys", "create", "--role", "admin"])
        .trim()
        .to_owned();
    let auditor_key = admin_ok(ns, &data, &["apikeys", "create", "--role", "auditor"])
        .trim()
        .to_owned();
    let nodes_before = nodes(ns, &data);
    assert_eq!(nodes_before.len(), 2);
    let auth_keys = key_ids(ns, &data, "keys");
    let api_keys = key_ids(ns, &data, "apikeys");
    let fingerprint = admin_ok(ns, &data, &["fingerprint"]).trim().to_owned();
    let controller_key = admin_ok(ns, &data, &["controller-key"]).trim().to_owned();

    // A backup identity, and a passphrase file.
    let identity = work.join("backup.id");
    let recipient = admin_ok(
        ns,
        &data,
        &[
            "backup",
            "keygen",
            "--out",
            identity.to_str().expect("utf-8"),
        ],
    )
    .trim()
    .to_owned();
    assert!(recipient.starts_with("ztmr1."), "{recipient}");
    let pass = work.join("pass");
    std::fs::write(&pass, "correct horse battery staple\n").expect("passphrase file");

    // The policy keeps changing while the backup runs.
    let revs = AtomicU32::new(0);
    let stop_after = AtomicU32::new(MAX_REVS);
    let backup_file = work.join("ctl.ztmbackup");
    let backup_out = std::thread::scope(|s| {
        let churn = s.spawn(|| {
            let file = work.join("churn.hujson");
            for rev in 1..=MAX_REVS {
                if rev > stop_after.load(Ordering::SeqCst) {
                    break;
                }
                set_policy(ns, &data, &file, &policy(rev));
                revs.store(rev, Ordering::SeqCst);
            }
        });
        wait_until(Duration::from_secs(120), Duration::from_millis(20), || {
            revs.load(Ordering::SeqCst) >= 3 || churn.is_finished()
        })
        .expect("the policy loop got going");
        let out = admin(
            ns,
            &data,
            &[
                "backup",
                backup_file.to_str().expect("utf-8"),
                "--recipient",
                &recipient,
            ],
        );
        // Three more changes after the backup, then stop.
        stop_after.store(revs.load(Ordering::SeqCst) + 3, Ordering::SeqCst);
        churn.join().expect("policy loop");
        out
    });
    assert!(backup_out.status.success(), "backup: {backup_out}");
    println!("{}", backup_out.stdout.trim());
    let final_rev = revs.load(Ordering::SeqCst);
    let meta = std::fs::metadata(&backup_file).expect("backup written");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    println!("backup size: {} bytes", meta.len());

    // Refused: an existing file without --force; a role below admin; a
    // restore over the running controller.
    let again = admin(
        ns,
        &data,
        &[
            "backup",
            backup_file.to_str().expect("utf-8"),
            "--passphrase-file",
            pass.to_str().expect("utf-8"),
        ],
    );
    assert!(
        !again.status.success() && again.stderr.contains("exists"),
        "{again}"
    );
    let url = format!("https://{}:8443", topo.addr(CONTROLLER));
    let remote = |key: &str, file: &Path| {
        let bin = bin_path("ztmesh-controller");
        run_cli(
            ns,
            &[
                bin.to_str().expect("utf-8"),
                "--server",
                &url,
                "--api-key",
                key,
                "--fingerprint",
                &fingerprint,
                "backup",
                file.to_str().expect("utf-8"),
                "--passphrase-file",
                pass.to_str().expect("utf-8"),
            ],
        )
    };
    let denied = remote(&auditor_key, &work.join("auditor.ztmbackup"));
    assert!(
        !denied.status.success() && denied.stderr.contains("needs admin"),
        "{denied}"
    );
    assert!(!work.join("auditor.ztmbackup").exists());
    let by_passphrase = work.join("remote.ztmbackup");
    let remote_out = remote(&admin_key, &by_passphrase);
    assert!(remote_out.status.success(), "remote backup: {remote_out}");
    let over_running = admin(
        ns,
        &data,
        &[
            "restore",
            backup_file.to_str().expect("utf-8"),
            "--identity",
            identity.to_str().expect("utf-8"),
            "--force",
        ],
    );
    assert!(
        !over_running.status.success()
            && over_running
                .stderr
                .contains("another controller is running"),
        "{over_running}"
    );
    let audit = json(&admin_ok(
        ns,
        &data,
        &["audit", "--limit", "10000", "-o", "json"],
    ));
    let backups: Vec<&Value> = audit
        .as_array()
        .expect("a list")
        .iter()
        .filter(|e| e["action"] == "controller.backup")
        .collect();
    assert!(
        backups
            .iter()
            .any(|e| e["target"] == "x25519" && e["actor"] == "local-admin"),
        "{backups:#?}"
    );
    assert!(
        backups.iter().any(|e| e["target"] == "passphrase"
            && e["actor"]
                .as_str()
                .is_some_and(|a| a.starts_with("apikey:"))),
        "{backups:#?}"
    );

    // Stop the controller; restore into a fresh data dir.
    controller.stop();
    let new_dir = TempDir::new("bk-new");
    let restored: PathBuf = new_dir.join("data");
    let wrong = admin(
        ns,
        &restored,
        &[
            "restore",
            backup_file.to_str().expect("utf-8"),
            "--passphrase-file",
            pass.to_str().expect("utf-8"),
        ],
    );
    assert!(
        !wrong.status.success() && wrong.stderr.contains("give --identity"),
        "{wrong}"
    );
    let out = admin_ok(
        ns,
        &restored,
        &[
            "restore",
            backup_file.to_str().expect("utf-8"),
            "--identity",
            identity.to_str().expect("utf-8"),
        ],
    );
    println!("{}", out.trim());
    assert!(out.contains("audit chain ok"), "{out}");
    let verify = admin_ok(ns, &restored, &["audit", "verify"]);
    assert!(verify.contains("audit chain ok"), "{verify}");
    // The passphrase backup restores too (into another fresh dir).
    let other = TempDir::new("bk-other");
    admin_ok(
        ns,
        &other.join("data"),
        &[
            "restore",
            by_passphrase.to_str().expect("utf-8"),
            "--passphrase-file",
            pass.to_str().expect("utf-8"),
        ],
    );
    // A second restore into the same dir is refused without --force.
    let twice = admin(
        ns,
        &restored,
        &[
            "restore",
            backup_file.to_str().expect("utf-8"),
            "--identity",
            identity.to_str().expect("utf-8"),
        ],
    );
    assert!(
        !twice.status.success() && twice.stderr.contains("--force"),
        "{twice}"
    );

    // The restored controller, same address.
    let controller = start_controller(ns, topo.addr(CONTROLLER), &restored, None);
    let logs = || format!("==== restored controller\n{}", controller.logs());
    assert_eq!(
        admin_ok(ns, &restored, &["controller-key"]).trim(),
        controller_key
    );
    assert_eq!(
        admin_ok(ns, &restored, &["fingerprint"]).trim(),
        fingerprint
    );
    assert_eq!(
        nodes(ns, &restored),
        nodes_before,
        "nodes (ids, names, keys)"
    );
    assert_eq!(key_ids(ns, &restored, "keys"), auth_keys, "auth keys");
    assert_eq!(key_ids(ns, &restored, "apikeys"), api_keys, "API keys");
    let text = admin_ok(ns, &restored, &["policy", "get"]);
    let rev = rev_of(&text).unwrap_or_else(|| panic!("no revision in the policy:\n{text}"));
    println!("policy at backup time: rev {rev} (revisions made: {final_rev})");
    assert!(
        (3..final_rev).contains(&rev),
        "the backup holds rev {rev}: one set before it finished and older than the last ({final_rev})"
    );
    // The restored audit log agrees: the policy changes up to rev (rev 0
    // is version 1), none after it. The audit row follows the policy row
    // in its own transaction, so the newest one may be just outside.
    let audit = json(&admin_ok(
        ns,
        &restored,
        &["audit", "--limit", "10000", "-o", "json"],
    ));
    let versions: Vec<u32> = audit
        .as_array()
        .expect("a list")
        .iter()
        .filter(|e| e["action"] == "policy.set")
        .filter_map(|e| {
            e["detail"]
                .as_str()?
                .strip_prefix("version=")?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert!(
        versions.iter().all(|v| *v <= rev + 1)
            && (versions.len() as u32 == rev || versions.len() as u32 == rev + 1),
        "policy.set rows in the restored audit log (rev {rev}): {versions:?}"
    );
    assert!(
        audit
            .as_array()
            .expect("a list")
            .iter()
            .any(|e| e["action"] == "controller.restore"),
        "the restore is audited"
    );

    // The nodes reconnect and get the restored policy: https follows its
    // revision's parity, ssh always works.
    assert!(
        wait_until(RECONNECT, Duration::from_millis(500), || all_online(
            ns, &restored
        ))
        .is_ok(),
        "nodes did not reconnect\n{}",
        logs()
    );
    let https = rev % 2 == 1;
    let ok = wait_until(RECONNECT, Duration::from_millis(300), || {
        flow(443, Duration::from_millis(800)) == https
    });
    assert!(
        ok.is_ok(),
        "laptop → web:443 should be {https} under rev {rev}\n{}",
        logs()
    );
    assert!(
        wait_until(RECONNECT, Duration::from_millis(200), || flow(
            22,
            Duration::from_secs(2)
        ))
        .is_ok(),
        "laptop → web:22 through the tunnel after the restore\n{}",
        logs()
    );
    let verify = admin_ok(ns, &restored, &["audit", "verify"]);
    assert!(verify.contains("audit chain ok"), "{verify}");
    drop(laptop);
}
