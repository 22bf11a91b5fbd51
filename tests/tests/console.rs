//! The admin console in a real headless Chromium (issue 20): an admin signs
//! in with a password and TOTP, creates an auth key that a real node then
//! enrolls with, edits the policy (a broken edit shows its FILE:LINE:COL
//! error in place and changes nothing; a good one shows the plan, then
//! applies and reaches the nodes), deletes a node, and finds each of those
//! actions in the audit view under their name. Every page keeps its CSP (no
//! violation, no script error). Screenshots of the main pages go to
//! `docs/screenshots/`.
//!
//! ```text
//!        underlay: switch ns, bridge br0 (198.18.0.0/24)
//!   ┌──────────────┬──────────────┬──────────────┐
//!  controller     desk           web            db
//!  (pages+gRPC)   Chromium       tag:web node   tag:db node
//! ```
//!
//! Needs root, the binaries, and what `scripts/setup.sh` installs (node,
//! chromium, tests/web/node_modules). Namespaces are removed at the end,
//! also on failure; every process is stopped by PID.
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use ztmesh_tests::natlab::{
    admin_ok, controller_url, node_cli, set_policy, start_controller_with, start_daemon, up,
    NodeDirs,
};
use ztmesh_tests::web::{Browser, TestCa, ViolationKind, WebTools};
use ztmesh_tests::{bin_path, require_root_or_skip, wait_until, TempDir, Topology};

const CONTROLLER: &str = "controller";
const DESK: &str = "desk";
const WEB: &str = "web";
const DB: &str = "db";
const ADMIN: &str = "root@example.com";
const PASSWORD: &str = "correct horse battery";

const POLICY: &str = r#"{
  "tagOwners": {"tag:web": [], "tag:db": []},
  "acls": [
    {"action": "accept", "src": ["tag:web"], "proto": "tcp", "dst": ["tag:db:5432"]},
  ],
}"#;

/// The edit the admin makes in the browser: web may also reach db on 6432.
const GOOD_EDIT: &str = r#"{
  "tagOwners": {"tag:web": [], "tag:db": []},
  "acls": [
    {"action": "accept", "src": ["tag:web"], "proto": "tcp", "dst": ["tag:db:5432,6432"]},
  ],
}"#;

/// The same edit with a typo in a tag: line 4 names an undefined tag.
const BROKEN_EDIT: &str = r#"{
  "tagOwners": {"tag:web": [], "tag:db": []},
  "acls": [
    {"action": "accept", "src": ["tag:web"], "proto": "tcp", "dst": ["tag:dbb:5432"]},
  ],
}"#;

fn totp(secret_b32: &str, step: u64) -> String {
    let mut key = Vec::new();
    let (mut buf, mut bits) = (0u32, 0u32);
    for c in secret_b32.trim().bytes() {
        let v = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
            .iter()
            .position(|x| *x == c)
            .expect("base32") as u32;
        buf = (buf << 5) | v;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            key.push((buf >> bits) as u8);
        }
    }
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &key);
    let h = ring::hmac::sign(&k, &step.to_be_bytes());
    let h = h.as_ref();
    let off = usize::from(h[19] & 0x0f);
    let bin = (u32::from(h[off] & 0x7f) << 24)
        | (u32::from(h[off + 1]) << 16)
        | (u32::from(h[off + 2]) << 8)
        | u32::from(h[off + 3]);
    format!("{:06}", bin % 1_000_000)
}

fn step_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
        / 30
}

fn screenshots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
        .join("docs/screenshots");
    std::fs::create_dir_all(&dir).expect("docs/screenshots");
    dir
}

fn shot(b: &mut Browser, name: &str) {
    b.screenshot(&screenshots().join(format!("{name}.png")))
        .expect("screenshot");
}

fn status(ns: &ztmesh_tests::Netns, dirs: &NodeDirs) -> Value {
    let out = node_cli(ns, dirs, &["status", "-o", "json"]);
    assert!(out.status.success(), "status: {out}");
    serde_json::from_str(&out.stdout).expect("status json")
}

#[test]
fn an_admin_runs_the_mesh_from_a_real_browser_and_every_action_is_audited() {
    if !require_root_or_skip() || !WebTools::require_or_skip() {
        return;
    }
    let topo = Topology::new(&[CONTROLLER, DESK, WEB, DB]);
    let dir = TempDir::new("console");
    let data = dir.join("data");
    let cns = topo.ns(CONTROLLER);
    let _controller = start_controller_with(cns, topo.addr(CONTROLLER), &data, &[]);
    set_policy(cns, &data, &dir.join("policy.hujson"), POLICY);
    let url = controller_url(topo.addr(CONTROLLER));
    let admin = |args: &[&str]| admin_ok(cns, &data, args);

    // The admin's built-in account (the password on stdin, never in argv).
    let mut cmd = cns.command(bin_path("ztmesh-controller"));
    cmd.args([
        "users",
        "create",
        ADMIN,
        "--role",
        "admin",
        "--password-stdin",
        "--data-dir",
    ])
    .arg(&data)
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("users create");
    writeln!(child.stdin.take().expect("stdin"), "{PASSWORD}").expect("password");
    assert!(child
        .wait_with_output()
        .expect("users create")
        .status
        .success());

    // A database server, enrolled from the CLI.
    let db_key = admin(&["keys", "create", "--tags", "tag:db"]);
    let db = NodeDirs::new(DB);
    let _db = start_daemon(topo.ns(DB), &db, &[]);
    up(topo.ns(DB), &db, &url, db_key.trim(), DB);

    let cert = std::fs::read_to_string(data.join("tls.crt")).expect("tls.crt");
    let spki = TestCa::spki_sha256_b64(&cert).expect("controller SPKI");
    let desk = topo.ns(DESK);
    let settled = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        !desk
            .run_ok(["ip", "-6", "addr", "show", "tentative"])
            .contains("inet6")
    });
    assert!(settled.is_ok(), "addresses in desk stay tentative");
    let mut b = Browser::launch(desk, &[spki]).expect("launch Chromium");
    b.set_timeout(Duration::from_secs(20));

    // Sign in: password, then a TOTP factor (enrolled at the first sign-in).
    let nav = b.goto(&format!("{url}/nodes")).expect("open the console");
    assert!(nav.url.ends_with("/login?next=/nodes"), "{}", nav.url);
    shot(&mut b, "sign-in");
    b.fill("#login", ADMIN).unwrap();
    b.fill("#password-input", PASSWORD).unwrap();
    b.click("#sign-in").unwrap();
    assert!(b.url().unwrap().ends_with("/mfa/enroll"));
    let secret = b.text("#totp-secret").unwrap();
    b.fill("#code", &totp(&secret, step_now())).unwrap();
    b.click("#enroll").unwrap();
    assert_eq!(b.count("#recovery-codes li").unwrap(), 10);
    b.click("#continue").unwrap();
    assert!(b.url().unwrap().ends_with("/nodes"), "back where it began");
    assert_eq!(b.text("#whoami").unwrap(), format!("{ADMIN} (admin)"));
    assert_eq!(b.count("tr[data-node=\"db\"]").unwrap(), 1);

    // An auth key, created in the browser and shown once; a real node
    // enrolls with it.
    b.goto(&format!("{url}/keys")).unwrap();
    b.fill("#tags", "tag:web").unwrap();
    b.click("#create").unwrap();
    let key = b.text("#new-key").unwrap();
    assert!(key.starts_with("ztmk1."), "{key}");
    shot(&mut b, "auth-keys");
    let web = NodeDirs::new(WEB);
    let _web = start_daemon(topo.ns(WEB), &web, &[]);
    up(topo.ns(WEB), &web, &url, &key, WEB);
    b.goto(&format!("{url}/nodes")).unwrap();
    assert_eq!(b.count("tr[data-node=\"web\"]").unwrap(), 1);
    let online = wait_until(Duration::from_secs(15), Duration::from_millis(300), || {
        b.reload().is_ok()
            && b.text("tr[data-node=\"web\"] td.state")
                .is_ok_and(|s| s.starts_with("online"))
    });
    assert!(online.is_ok(), "web shows online");
    shot(&mut b, "nodes");

    // A broken edit: its error at FILE:LINE:COL, the line marked, and the
    // policy in force unchanged.
    b.goto(&format!("{url}/policy")).unwrap();
    let in_force = || admin(&["policy", "get"]);
    assert_eq!(in_force().trim(), POLICY.trim());
    b.fill("#policy-text", BROKEN_EDIT).unwrap();
    b.click("#check").unwrap();
    let errors = b.text("#policy-errors").unwrap();
    assert!(errors.contains("policy.hujson:4:"), "{errors}");
    assert!(errors.contains("tag:dbb"), "{errors}");
    assert_eq!(b.count("#L4.bad").unwrap(), 1, "the line is marked");
    assert_eq!(b.count("#apply").unwrap(), 0, "nothing to apply");
    shot(&mut b, "policy-error");
    assert_eq!(
        in_force().trim(),
        POLICY.trim(),
        "a broken edit changes nothing"
    );

    // A good edit: the plan first (web gains 6432 to db), then apply.
    b.fill("#policy-text", GOOD_EDIT).unwrap();
    b.click("#check").unwrap();
    let plan = b.text("#plan").unwrap();
    assert!(plan.contains("web") && plan.contains("tcp:6432"), "{plan}");
    assert_eq!(in_force().trim(), POLICY.trim(), "a plan changes nothing");
    let serial = |s: &Value| s["netmap"]["serial"].as_u64().unwrap_or(0);
    let db_serial = serial(&status(topo.ns(DB), &db));
    shot(&mut b, "policy-plan");
    b.click("#apply").unwrap();
    assert!(b.text("#notice").unwrap().contains("Policy applied"));
    assert_eq!(in_force().trim(), GOOD_EDIT.trim());
    let reached = wait_until(Duration::from_secs(15), Duration::from_millis(200), || {
        serial(&status(topo.ns(DB), &db)) > db_serial
    });
    assert!(
        reached.is_ok(),
        "db got its new map: {}",
        status(topo.ns(DB), &db)
    );
    // Explain, on the same page.
    b.goto(&format!("{url}/policy")).unwrap();
    b.fill("#explain-src", WEB).unwrap();
    b.fill("#explain-dst", DB).unwrap();
    b.fill("#explain-port", "6432").unwrap();
    b.click("#explain").unwrap();
    assert!(b.text("#explain-result").unwrap().starts_with("Allowed"));
    b.goto(&format!("{url}/graph")).unwrap();
    assert_eq!(b.count("#graph g.edge").unwrap(), 1);
    shot(&mut b, "graph");

    // Delete a node (the box must be ticked first).
    b.goto(&format!("{url}/nodes")).unwrap();
    let href = b
        .attr("tr[data-node=\"db\"] a", "href")
        .unwrap()
        .expect("a link to the node");
    b.goto(&format!("{url}{href}")).unwrap();
    shot(&mut b, "node");
    b.click("#confirm-delete").unwrap();
    b.click("#delete").unwrap();
    assert!(b.url().unwrap().ends_with("/nodes?done=deleted"));
    assert_eq!(b.count("tr[data-node=\"db\"]").unwrap(), 0);
    let gone = wait_until(Duration::from_secs(15), Duration::from_millis(200), || {
        !status(topo.ns(WEB), &web)["peers"]
            .to_string()
            .contains("\"db\"")
    });
    assert!(gone.is_ok(), "db left web's map");

    // The audit view: each action, under the admin's name.
    b.goto(&format!("{url}/audit?actor=user%3A{ADMIN}"))
        .unwrap();
    for action in ["authkey.create", "policy.set", "node.delete"] {
        assert!(
            b.count(&format!("tr[data-action=\"{action}\"]")).unwrap() >= 1,
            "{action} in the audit view"
        );
    }
    shot(&mut b, "audit");
    for page in ["users", "flows"] {
        b.goto(&format!("{url}/{page}")).unwrap();
        shot(&mut b, page);
    }
    let bad: Vec<_> = b
        .violations()
        .expect("violations")
        .into_iter()
        .filter(|v| !matches!(v.kind, ViolationKind::Resource))
        .collect();
    assert!(bad.is_empty(), "pages broke their policy: {bad:?}");
    // The CLI sees the console's actions too.
    let audit = admin(&["audit", "--limit", "500", "-o", "json"]);
    assert!(audit.contains(&format!("user:{ADMIN}")));
}
