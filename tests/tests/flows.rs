//! Flow logs end to end (issue 15): a real controller and real node daemons
//! in network namespaces; the receiver's filter summarizes the flows it
//! admitted (with the policy line of the rule) and the ones it denied (with
//! the reason), reports them, and `ztmesh-controller flows` lists them.
//! Needs root and the `ztmesh`, `ztmesh-controller` and `ztm-echo` binaries.
//!
//! ```text
//!          underlay: switch ns, bridge br0 (198.18.0.0/24)
//!   ┌──────────────┬──────────────┐
//!  controller     laptop         web (tag:web: echo on 22 and 443)
//!                 (tag:laptop)
//!
//!  laptop → web:22    allowed by the policy's line RULE_LINE
//!  laptop → web:443   denied (a rule admits laptop, not this port)
//! ```
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use ztmesh_tests::natlab::{
    admin, admin_ok, join, overlay_v4, set_policy, start_controller, NodeDirs,
};
use ztmesh_tests::{require_root_or_skip, wait_for, Proc, TempDir, Topology};

const CONTROLLER: &str = "controller";
const LAPTOP: &str = "laptop";
const WEB: &str = "web";

const POLICY: &str = r#"{
  "tagOwners": {"tag:web": [], "tag:laptop": []},
  "acls": [
    // The only rule: ssh from laptops to web servers.
    {"action": "accept", "src": ["tag:laptop"], "dst": ["tag:web:22"]},
  ],
}"#;

/// Nodes report every 5 s; the generous liveness bound for a flow to appear.
const REPORT_BOUND: Duration = Duration::from_secs(40);

/// The daemon is declared first so it stops before its state dir is removed.
struct Node {
    _daemon: Proc,
    dirs: NodeDirs,
}

#[test]
fn allowed_flows_name_their_rule_and_denied_ones_their_reason() {
    if !require_root_or_skip() {
        return;
    }
    let topo = Topology::new(&[CONTROLLER, LAPTOP, WEB]);
    let controller_dir = TempDir::new("controller");
    let data: PathBuf = controller_dir.join("data");
    let ns = topo.ns(CONTROLLER);
    let controller = start_controller(ns, topo.addr(CONTROLLER), &data, None);
    let policy = controller_dir.join("policy.hujson");
    set_policy(ns, &data, &policy, POLICY);
    let rule_line = POLICY
        .lines()
        .position(|l| l.contains("tag:web:22"))
        .expect("the rule's line")
        + 1;
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
    let laptop_ip = overlay_v4(topo.ns(LAPTOP), &laptop.dirs);
    let logs = || format!("==== controller\n{}", controller.logs());

    // The allowed flow works (the maps may take a moment), the denied one not.
    let reached = wait_for(Duration::from_secs(20), Duration::from_millis(100), || {
        topo.ns(LAPTOP)
            .tcp_check(&web_ip, 22, Duration::from_secs(2))
            .ok()
    });
    assert!(reached.is_ok(), "laptop → web:22 is allowed\n{}", logs());
    assert!(topo
        .ns(LAPTOP)
        .tcp_check(&web_ip, 443, Duration::from_millis(800))
        .is_err());

    let flows = |args: &[&str]| -> Vec<Value> {
        let mut full = vec!["flows", "-o", "json", "--since", "1h"];
        full.extend_from_slice(args);
        let out = admin(ns, &data, &full);
        assert!(out.status.success(), "flows {args:?}: {out}");
        serde_json::from_str::<Value>(&out.stdout)
            .expect("flows -o json is JSON")
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let to_port = |f: &Value, port: u64| {
        f["src"] == laptop_ip.as_str() && f["dst"] == web_ip.as_str() && f["dst_port"] == port
    };
    let (allowed, took) = wait_for(REPORT_BOUND, Duration::from_millis(500), || {
        flows(&["--node", WEB, "--allowed"])
            .into_iter()
            .find(|f| to_port(f, 22))
    })
    .unwrap_or_else(|e| panic!("the allowed flow is logged: {e}\n{}", logs()));
    println!("allowed flow listed by the controller {took:?} after it was made");
    assert_eq!(allowed["action"], "allow");
    assert_eq!(allowed["node"], WEB, "the receiver reports it");
    assert_eq!(allowed["proto"], "tcp");
    // FILE:LINE, the file as `policy set` was given it.
    let rule = format!("{}:{rule_line}", policy.display());
    assert_eq!(allowed["rule"].as_str(), Some(rule.as_str()), "{allowed:#}");
    assert!(allowed["reason"].is_null());
    for counter in ["packets", "bytes", "reply_packets", "reply_bytes"] {
        assert!(
            allowed[counter].as_u64().unwrap_or(0) > 0,
            "{counter}: {allowed:#}"
        );
    }
    let (first, last) = (
        allowed["first_seen_ms"].as_i64().unwrap_or(0),
        allowed["last_seen_ms"].as_i64().unwrap_or(0),
    );
    assert!(first > 0 && first <= last, "{allowed:#}");

    let (denied, _) = wait_for(REPORT_BOUND, Duration::from_millis(500), || {
        flows(&["--node", WEB, "--denied"])
            .into_iter()
            .find(|f| to_port(f, 443))
    })
    .unwrap_or_else(|e| panic!("the denied flow is logged: {e}\n{}", logs()));
    assert_eq!(denied["action"], "deny");
    assert_eq!(denied["reason"], "port_not_allowed", "{denied:#}");
    assert!(denied["rule"].is_null());
    assert!(denied["packets"].as_u64().unwrap_or(0) > 0);

    // The sender does not log its own outbound flows: the receiver decided.
    assert!(
        !flows(&["--node", LAPTOP]).iter().any(|f| to_port(f, 22)),
        "the laptop logged web's flow"
    );
    // The table view names the rule too.
    let table = admin_ok(ns, &data, &["flows", "--node", WEB, "--allowed"]);
    assert!(table.contains(&rule) && table.contains("/tcp"), "{table}");
}
