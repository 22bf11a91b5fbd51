//! Respond end to end (issue 16): a real controller with its detectors on,
//! real node daemons in network namespaces, a webhook receiver.
//! Needs root and the `ztmesh`, `ztmesh-controller`, `ztm-echo` and
//! `ztm-webhook` binaries.
//!
//! ```text
//!          underlay: switch ns, bridge br0 (198.18.0.0/24)
//!   ┌─────────────┬──────────┬──────────┬──────────┐
//!  controller    intruder   web        db         laptop
//!  (+ webhook    (tag:      (tag:web:  (tag:db:   (tag:laptop; busy, then
//!   receiver on  laptop)    echo 22)   echo 5432)  roams to a new address)
//!   127.0.0.1)
//! ```
//!
//! The intruder, allowed web:22 and db:5432 like every laptop, scans ports
//! 1–100 on both. Web and db deny 99 ports each and report them; the
//! controller quarantines the intruder, its open connection to web:22 dies,
//! the laptop is untouched (it keeps working, roams, and is busy without a
//! finding), the webhook gets exactly one signed alert, and `nodes release`
//! brings the intruder back.
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use ztmesh_tests::natlab::{
    admin, admin_ok, join, node_cli, overlay_v4, set_policy, start_controller_with, NodeDirs,
};
use ztmesh_tests::{bin_path, require_root_or_skip, wait_for, Proc, TempDir, Topology};

const CONTROLLER: &str = "controller";
const INTRUDER: &str = "intruder";
const WEB: &str = "web";
const DB: &str = "db";
const LAPTOP: &str = "laptop";

const POLICY: &str = r#"{
  "tagOwners": {"tag:web": [], "tag:db": [], "tag:laptop": []},
  "acls": [
    {"action": "accept", "src": ["tag:laptop"], "dst": ["tag:web:22", "tag:db:5432"]},
  ],
}"#;

const WEBHOOK: &str = "127.0.0.1:9099";
const SECRET: &str = "a-webhook-secret-for-the-test-0123456789";

/// The issue asks for a quarantine within 5 s; the test's liveness bound is
/// five times that (the measured time is printed).
const QUARANTINE_BOUND: Duration = Duration::from_secs(25);

/// The daemon is declared first so it stops before its state dir is removed.
struct Node {
    _daemon: Proc,
    dirs: NodeDirs,
    ip: String,
}

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn quarantine(ns: &ztmesh_tests::Netns, data: &Path, node: &str) -> Value {
    json(&admin_ok(ns, data, &["nodes", "show", node, "-o", "json"]))["quarantine"].clone()
}

fn detections(ns: &ztmesh_tests::Netns, data: &Path) -> Vec<Value> {
    json(&admin_ok(ns, data, &["detections", "-o", "json"]))
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn alerts(file: &Path) -> Vec<Value> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(json)
        .collect()
}

#[test]
fn a_scanning_node_is_quarantined_on_its_receivers_word_and_released_by_an_admin() {
    if !require_root_or_skip() {
        return;
    }
    let topo = Topology::new(&[CONTROLLER, INTRUDER, WEB, DB, LAPTOP]);
    let dir = TempDir::new("respond");
    let data: PathBuf = dir.join("data");
    let ns = topo.ns(CONTROLLER);
    let secret_file = dir.join("webhook.secret");
    std::fs::write(&secret_file, SECRET).expect("write the secret");
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600))
        .expect("chmod the secret");
    let alert_file = dir.join("alerts.jsonl");
    let hook_bin = bin_path("ztm-webhook");
    let mut hook = ns.spawn(
        "webhook",
        [
            hook_bin.as_os_str(),
            WEBHOOK.as_ref(),
            alert_file.as_os_str(),
        ],
    );
    wait_for(Duration::from_secs(5), Duration::from_millis(20), || {
        hook.stdout().contains("listening").then_some(())
    })
    .unwrap_or_else(|e| panic!("webhook receiver: {e}\n{}", hook.logs()));
    let controller = start_controller_with(
        ns,
        topo.addr(CONTROLLER),
        &data,
        &[
            "--alert-webhook".into(),
            format!("http://{WEBHOOK}/ztmesh"),
            "--alert-webhook-secret-file".into(),
            secret_file.to_string_lossy().into_owned(),
        ],
    );
    let policy = dir.join("policy.hujson");
    set_policy(ns, &data, &policy, POLICY);
    let enroll = |name: &str, tag: &str| {
        let (daemon, dirs) = join(&topo, CONTROLLER, &data, name, tag);
        let ip = overlay_v4(topo.ns(name), &dirs);
        Node {
            _daemon: daemon,
            dirs,
            ip,
        }
    };
    let intruder = enroll(INTRUDER, "tag:laptop");
    let web = enroll(WEB, "tag:web");
    let db = enroll(DB, "tag:db");
    let laptop = enroll(LAPTOP, "tag:laptop");
    let _web_echo = topo.ns(WEB).spawn_echo(&["22"]);
    let _db_echo = topo.ns(DB).spawn_echo(&["5432"]);
    let logs = || format!("==== controller\n{}", controller.logs());
    let reach = |from: &str, ip: &str, port: u16, bound: Duration| {
        wait_for(bound, Duration::from_millis(100), || {
            topo.ns(from)
                .tcp_check(ip, port, Duration::from_secs(2))
                .ok()
        })
    };
    for (from, ip, port) in [
        (INTRUDER, &web.ip, 22),
        (INTRUDER, &db.ip, 5432),
        (LAPTOP, &web.ip, 22),
        (LAPTOP, &db.ip, 5432),
    ] {
        reach(from, ip, port, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{from} → {ip}:{port}: {e}\n{}", logs()));
    }

    // False positives: a busy laptop (many allowed connections) that then
    // roams to another address keeps working and is never a finding.
    for _ in 0..40 {
        topo.ns(LAPTOP)
            .tcp_check(&web.ip, 22, Duration::from_secs(2))
            .expect("allowed");
        topo.ns(LAPTOP)
            .tcp_check(&db.ip, 5432, Duration::from_secs(2))
            .expect("allowed");
    }
    let lns = topo.ns(LAPTOP);
    let old = format!("{}/24", topo.addr(LAPTOP));
    // (Deleting a primary address deletes the secondaries of its subnet:
    // the old one goes first.)
    lns.run_ok(["ip", "addr", "del", &old, "dev", "eth0"]);
    lns.run_ok(["ip", "addr", "add", "198.18.0.77/24", "dev", "eth0"]);
    reach(LAPTOP, &web.ip, 22, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("the roamed laptop → web:22: {e}\n{}", logs()));
    reach(LAPTOP, &db.ip, 5432, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("the roamed laptop → db:5432: {e}\n{}", logs()));

    // An established flow of the intruder's, alive before the scan.
    let echo = bin_path("ztm-echo");
    let mut held = topo.ns(INTRUDER).spawn(
        "held",
        [
            echo.as_os_str(),
            "stream".as_ref(),
            web.ip.as_ref(),
            "22".as_ref(),
            "600".as_ref(),
            "100".as_ref(),
            "3000".as_ref(),
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(held.is_running(), "the held stream runs\n{}", held.logs());

    let started = Instant::now();
    let scans: Vec<Proc> = [&web.ip, &db.ip]
        .iter()
        .map(|ip| {
            topo.ns(INTRUDER).spawn(
                "scan",
                [
                    echo.as_os_str(),
                    "scan".as_ref(),
                    ip.as_ref(),
                    "1".as_ref(),
                    "100".as_ref(),
                    "500".as_ref(),
                ],
            )
        })
        .collect();
    let (q, _) = wait_for(QUARANTINE_BOUND, Duration::from_millis(100), || {
        Some(quarantine(ns, &data, INTRUDER)).filter(|q| !q.is_null())
    })
    .unwrap_or_else(|e| panic!("the intruder is quarantined: {e}\n{}", logs()));
    let took = started.elapsed();
    println!("quarantined {took:?} after the scan started: {q}");
    assert!(
        q["reason"].as_str().unwrap_or("").contains("scan_ports"),
        "{q}"
    );
    drop(scans);

    // Its established flow stops; new ones too; everyone else is unaffected.
    let stopped = wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
        held.try_exit_status()
    })
    .unwrap_or_else(|e| panic!("the held stream did not stop: {e}\n{}", held.logs()))
    .0;
    assert!(
        !stopped.success(),
        "the held stream failed\n{}",
        held.logs()
    );
    assert!(topo
        .ns(INTRUDER)
        .tcp_check(&web.ip, 22, Duration::from_millis(1500))
        .is_err());
    for (ip, port) in [(&web.ip, 22), (&db.ip, 5432)] {
        topo.ns(LAPTOP)
            .tcp_check(ip, port, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("laptop → {ip}:{port} after the quarantine: {e}"));
    }
    let status = node_cli(topo.ns(INTRUDER), &intruder.dirs, &["status"]);
    assert!(status.stdout.contains("QUARANTINED"), "{status}");
    let status = node_cli(topo.ns(INTRUDER), &intruder.dirs, &["status", "-o", "json"]);
    assert!(json(&status.stdout)["quarantine"]["reason"].is_string());

    // One detection, on the receivers' word, and one signed alert.
    let found = detections(ns, &data);
    assert_eq!(found.len(), 1, "{found:#?}");
    let d = &found[0];
    assert_eq!(
        (d["node"].as_str(), d["action"].as_str()),
        (Some(INTRUDER), Some("quarantine"))
    );
    let mut witnesses: Vec<&str> = d["evidence"]
        .as_array()
        .expect("testimonies")
        .iter()
        .filter_map(|t| t["reporter_names"][0].as_str())
        .collect();
    witnesses.sort_unstable();
    assert_eq!(witnesses, vec![DB, WEB], "{d:#}");
    let (sent, _) = wait_for(Duration::from_secs(20), Duration::from_millis(200), || {
        Some(alerts(&alert_file)).filter(|a| !a.is_empty())
    })
    .unwrap_or_else(|e| panic!("no alert: {e}\n{}\n{}", hook.logs(), logs()));
    let a = &sent[0];
    let body = a["body"].as_str().expect("body");
    let ts = a["headers"]["x-ztmesh-timestamp"]
        .as_str()
        .expect("timestamp");
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("key");
    mac.update(format!("{ts}.{body}").as_bytes());
    let want: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        a["headers"]["x-ztmesh-signature"].as_str(),
        Some(format!("v1={want}").as_str()),
        "the alert is signed with the shared secret"
    );
    let alert = json(body);
    assert_eq!(alert["node"]["name"], INTRUDER);
    assert_eq!(alert["detection"], d["id"]);
    assert_eq!(a["path"], "/ztmesh");
    let delivered = wait_for(Duration::from_secs(10), Duration::from_millis(200), || {
        (detections(ns, &data)[0]["alert"] == "sent").then_some(())
    });
    assert!(delivered.is_ok(), "{:#?}", detections(ns, &data));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(alerts(&alert_file).len(), 1, "exactly one alert");
    let nodes = json(&admin_ok(ns, &data, &["nodes", "list", "-o", "json"]));
    for n in nodes.as_array().expect("nodes") {
        if n["name"] != INTRUDER {
            assert!(n["quarantine"].is_null(), "{n:#}");
        }
    }

    // Released by an admin (audited), it is back.
    admin_ok(ns, &data, &["nodes", "release", INTRUDER]);
    assert!(quarantine(ns, &data, INTRUDER).is_null());
    reach(INTRUDER, &web.ip, 22, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("released intruder → web:22: {e}\n{}", logs()));
    let again = admin(ns, &data, &["nodes", "release", INTRUDER]);
    assert!(
        !again.status.success() && again.stderr.contains("not quarantined"),
        "{again}"
    );
    let audit = json(&admin_ok(
        ns,
        &data,
        &["audit", "--limit", "500", "-o", "json"],
    ));
    let actions: Vec<&str> = audit
        .as_array()
        .expect("audit")
        .iter()
        .filter_map(|r| r["action"].as_str())
        .collect();
    assert!(actions.contains(&"detect.quarantine") && actions.contains(&"node.release"));
    assert_eq!(detections(ns, &data).len(), 1, "nothing else was found");
    drop(held);
    drop((web, db, laptop, intruder));
    hook.stop();
}
