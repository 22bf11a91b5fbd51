//! Metrics end to end (issue 15): a real controller and two real node
//! daemons serve `/metrics`, a real Prometheus scrapes them while the nodes
//! exchange traffic, and every expression of the Grafana dashboard
//! (`deploy/grafana/ztmesh-dashboard.json`) must return data. Each endpoint
//! also passes `promtool check metrics`.
//!
//! ```text
//!              underlay: switch ns, bridge br0 (198.18.0.0/24)
//!   ┌──────────────────┬──────────────────┬──────────────────┐
//!  controller         alpha              beta               monitor
//!  198.18.0.1         198.18.0.2         198.18.0.3         198.18.0.4
//!  :8443 TLS          ztm0               ztm0 + ztm-echo    prometheus on
//!  :9464 /metrics     :9465 /metrics     :9465 /metrics     127.0.0.1:9090
//!                                                           (scrapes all three, 1 s)
//!  policy: everyone reaches everyone; traffic: alpha pings beta, TCP echo.
//! ```
//!
//! Needs root, the `ztmesh`, `ztmesh-controller` and `ztm-echo` binaries,
//! `curl`, and Debian's `prometheus` package (`prometheus`, `promtool`).
//! Without the last the test is skipped, unless `ZTMESH_REQUIRE_PROMETHEUS`
//! is set (scripts/test.sh sets it): then it fails. Every namespace and
//! process is the test's own and is removed or stopped (by PID) when it
//! ends, also when it fails.
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use ztmesh_tests::natlab::{
    admin_ok, controller_url, overlay_v4, set_policy, start_controller_with, start_daemon, up,
    NodeDirs,
};
use ztmesh_tests::{require_root_or_skip, wait_until, Netns, Proc, TempDir, Topology};

const CONTROLLER: &str = "controller";
const ALPHA: &str = "alpha";
const BETA: &str = "beta";
const MONITOR: &str = "monitor";
const CONTROLLER_METRICS_PORT: u16 = 9464;
const NODE_METRICS_PORT: u16 = 9465;
const PROMETHEUS: &str = "127.0.0.1:9090";
const ECHO_PORT: u16 = 7000;

/// How long Prometheus may take to start and to have scraped every target.
const SCRAPE_BOUND: Duration = Duration::from_secs(60);
/// How long one dashboard expression may take to return data (rates need
/// two scrapes after the traffic).
const QUERY_BOUND: Duration = Duration::from_secs(30);
/// The window the test puts in place of Grafana's `$__rate_interval`.
const RATE_WINDOW: &str = "30s";

const POLICY: &str = r#"{
  "acls": [
    {"action": "accept", "src": ["*"], "dst": ["*:*"]},
  ],
}"#;

/// What a key series' value must satisfy.
type Check = fn(f64) -> bool;

/// Whether `program --version` runs.
fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `curl` in `ns`, bounded; the body, or `None` on any failure.
fn curl(ns: &Netns, args: &[&str]) -> Option<String> {
    let mut full = vec!["curl", "-sS", "--fail", "--max-time", "5"];
    full.extend_from_slice(args);
    let out = ns.run_bounded("curl", &full, Duration::from_secs(10));
    out.status.success().then_some(out.stdout)
}

/// An instant query against the test's Prometheus: the result vector.
fn query(ns: &Netns, expr: &str) -> Option<Vec<Value>> {
    let url = format!("http://{PROMETHEUS}/api/v1/query");
    let body = curl(
        ns,
        &["-G", &url, "--data-urlencode", &format!("query={expr}")],
    )?;
    let v: Value = serde_json::from_str(&body).ok()?;
    if v["status"] != "success" {
        return None;
    }
    v["data"]["result"].as_array().cloned()
}

/// The numeric value of a vector sample (`"NaN"` and the like parse too).
fn value(sample: &Value) -> f64 {
    sample["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Every panel target's `expr` in the dashboard, with its panel title.
fn dashboard_exprs() -> Vec<(String, String)> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/ztmesh-dashboard.json"
    );
    let text = std::fs::read_to_string(path).expect("read the dashboard");
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut out = Vec::new();
    let mut panels: Vec<&Value> = dash["panels"].as_array().expect("panels").iter().collect();
    while let Some(p) = panels.pop() {
        if let Some(inner) = p["panels"].as_array() {
            panels.extend(inner);
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("a target has an expr");
            let title = p["title"].as_str().unwrap_or("?");
            out.push((title.to_owned(), expr.to_owned()));
        }
    }
    out
}

/// A dashboard expression as Grafana would send it with "All" nodes.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", RATE_WINDOW)
        .replace("$node", ".+")
}

/// Fetches `/metrics` at `target` from `ns` in the text format and runs
/// `promtool check metrics` on it; also checks the OpenMetrics variant.
fn promtool_check(ns: &Netns, target: &str) -> String {
    let url = format!("http://{target}/metrics");
    let script =
        format!("set -o pipefail; curl -sS --fail --max-time 5 {url} | promtool check metrics");
    let out = ns.run_bounded(
        "promtool",
        &["bash", "-c", &script],
        Duration::from_secs(20),
    );
    assert!(
        out.status.success(),
        "promtool check metrics on {url} failed: {out}"
    );
    let om = curl(
        ns,
        &[
            "-H",
            "Accept: application/openmetrics-text; version=1.0.0",
            &url,
        ],
    )
    .unwrap_or_else(|| panic!("GET {url} (OpenMetrics) failed"));
    assert!(om.ends_with("# EOF\n"), "OpenMetrics from {url}:\n{om}");
    curl(ns, &[&url]).unwrap_or_else(|| panic!("GET {url} failed"))
}

/// The daemon is declared first so it stops before its state dir is removed.
struct Node {
    _daemon: Proc,
    dirs: NodeDirs,
}

#[test]
fn prometheus_scrapes_the_mesh_and_every_dashboard_panel_has_data() {
    if !require_root_or_skip() {
        return;
    }
    if !(have("prometheus") && have("promtool")) {
        assert!(
            std::env::var_os("ZTMESH_REQUIRE_PROMETHEUS").is_none(),
            "ZTMESH_REQUIRE_PROMETHEUS is set but prometheus/promtool are missing \
             (scripts/setup.sh installs Debian's prometheus package)"
        );
        eprintln!(
            "skipped: prometheus/promtool not installed (scripts/setup.sh installs them; \
             set ZTMESH_REQUIRE_PROMETHEUS=1 to make this a failure)"
        );
        return;
    }
    let topo = Topology::new(&[CONTROLLER, ALPHA, BETA, MONITOR]);
    let controller_dir = TempDir::new("metrics-controller");
    let data = controller_dir.join("data");
    let cns = topo.ns(CONTROLLER);
    let controller_metrics = format!("{}:{CONTROLLER_METRICS_PORT}", topo.addr(CONTROLLER));
    let controller = start_controller_with(
        cns,
        topo.addr(CONTROLLER),
        &data,
        &["--metrics-listen".into(), controller_metrics.clone()],
    );
    admin_ok(cns, &data, &["users", "create", "alice@example.com"]);
    let policy = controller_dir.join("policy.hujson");
    set_policy(cns, &data, &policy, POLICY);

    let mut nodes = Vec::new();
    let mut targets = vec![controller_metrics.clone()];
    for name in [ALPHA, BETA] {
        let ns = topo.ns(name);
        let key = admin_ok(
            cns,
            &data,
            &["keys", "create", "--user", "alice@example.com"],
        );
        let dirs = NodeDirs::new(name);
        let listen = format!("{}:{NODE_METRICS_PORT}", topo.addr(name));
        let daemon = start_daemon(ns, &dirs, &["--metrics-listen".into(), listen.clone()]);
        up(
            ns,
            &dirs,
            &controller_url(topo.addr(CONTROLLER)),
            key.trim(),
            name,
        );
        targets.push(listen);
        nodes.push(Node {
            _daemon: daemon,
            dirs,
        });
    }

    // Prometheus in its own namespace, on its loopback, scraping the three
    // endpoints over the underlay.
    let prom_dir = TempDir::new("prometheus");
    let config = prom_dir.join("prometheus.yml");
    let quoted: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: ztmesh\n    static_configs:\n      - targets: [{}]\n",
            quoted.join(", ")
        ),
    )
    .expect("write prometheus.yml");
    let monitor = topo.ns(MONITOR);
    monitor.run_ok(["ip", "link", "set", "lo", "up"]);
    let config_arg = format!("--config.file={}", config.display());
    let tsdb_arg = format!("--storage.tsdb.path={}", prom_dir.join("tsdb").display());
    let listen_arg = format!("--web.listen-address={PROMETHEUS}");
    let mut prometheus = monitor.spawn(
        "prometheus",
        [
            "prometheus",
            config_arg.as_str(),
            tsdb_arg.as_str(),
            listen_arg.as_str(),
            "--log.level=warn",
        ],
    );

    // Traffic through the overlay while Prometheus starts: pings and TCP
    // echo round trips, bounded in count and time.
    let beta_ip = overlay_v4(topo.ns(BETA), &nodes[1].dirs);
    let _echo = topo
        .ns(BETA)
        .spawn_echo(&[&format!("{beta_ip}:{ECHO_PORT}")]);
    let alpha = topo.ns(ALPHA);
    let reached = wait_until(Duration::from_secs(20), Duration::from_millis(200), || {
        alpha
            .tcp_check(&beta_ip, ECHO_PORT, Duration::from_secs(2))
            .is_ok()
    });
    assert!(reached.is_ok(), "alpha never reached beta's echo port");
    let ping = alpha.run_bounded(
        "ping",
        &["ping", "-c", "10", "-i", "0.2", "-W", "1", &beta_ip],
        Duration::from_secs(20),
    );
    assert!(ping.status.success(), "ping alpha → beta: {ping}");

    // promtool on every endpoint, from the monitor namespace.
    for t in &targets {
        promtool_check(monitor, t);
    }

    // Every target scraped and up.
    let started = Instant::now();
    let ready = wait_until(SCRAPE_BOUND, Duration::from_millis(500), || {
        !prometheus.is_running()
            || query(monitor, "up == 1").is_some_and(|r| r.len() == targets.len())
    });
    assert!(
        ready.is_ok() && prometheus.is_running(),
        "prometheus did not scrape all of {targets:?} within {SCRAPE_BOUND:?}: up = {:?}\n{}",
        query(monitor, "up"),
        prometheus.logs()
    );
    println!("all targets up after {:?}", started.elapsed());

    // More traffic now that scrapes run, so rates over the window see it.
    for _ in 0..5 {
        let _ = alpha.tcp_check(&beta_ip, ECHO_PORT, Duration::from_secs(2));
    }
    // A policy change both nodes must apply: the propagation samples (the
    // stream's first maps are not samples).
    set_policy(cns, &data, &policy, &POLICY.replace("*:*", "*:1-65535"));

    // Key series, non-zero after the traffic.
    let checks: &[(&str, Check)] = &[
        (r#"sum(ztmesh_controller_nodes{state="online"})"#, |v| {
            v == 2.0
        }),
        ("sum(ztmesh_controller_streams)", |v| v == 2.0),
        (
            r#"sum(ztmesh_controller_enrollments_total{method="authkey"})"#,
            |v| v == 2.0,
        ),
        ("sum(ztmesh_controller_netmap_builds_total)", |v| v > 0.0),
        ("sum(ztmesh_controller_netmap_sent_bytes_total)", |v| {
            v > 0.0
        }),
        (
            "sum(ztmesh_controller_netmap_propagation_seconds_count)",
            |v| v >= 2.0,
        ),
        ("sum(ztmesh_controller_netmap_acks_ignored_total)", |v| {
            v == 0.0
        }),
        (
            "sum(ztmesh_controller_store_operation_seconds_count)",
            |v| v > 0.0,
        ),
        ("sum(ztmesh_node_peers)", |v| v == 2.0),
        ("sum(ztmesh_node_peer_receive_bytes_total)", |v| v > 0.0),
        ("sum(ztmesh_node_peer_transmit_bytes_total)", |v| v > 0.0),
        ("sum(ztmesh_node_handshakes_total)", |v| v > 0.0),
        (
            r#"sum(ztmesh_node_filter_decisions_total{decision="allow"})"#,
            |v| v > 0.0,
        ),
        ("sum(ztmesh_node_controller_connected)", |v| v == 2.0),
        (r#"sum(ztmesh_node_peers_by_path{path="direct"})"#, |v| {
            v >= 1.0
        }),
        ("min(ztmesh_node_netmap_serial)", |v| v > 0.0),
    ];
    for (expr, ok) in checks {
        let mut last = None;
        let got = wait_until(QUERY_BOUND, Duration::from_millis(500), || {
            last = query(monitor, expr);
            last.as_ref()
                .and_then(|r| r.first())
                .is_some_and(|s| ok(value(s)))
        });
        assert!(got.is_ok(), "{expr}: {last:?}");
    }
    let mean = query(
        monitor,
        "sum(ztmesh_controller_netmap_propagation_seconds_sum) \
         / sum(ztmesh_controller_netmap_propagation_seconds_count)",
    );
    println!(
        "mean netmap propagation (change → node applied): {:?} s",
        mean.as_ref().and_then(|r| r.first()).map(value)
    );
    // Peer names label the bytes (never keys): alpha's row for beta.
    let named = query(
        monitor,
        r#"ztmesh_node_peer_receive_bytes_total{peer="beta"}"#,
    )
    .unwrap_or_default();
    assert_eq!(named.len(), 1, "{named:?}");

    // Every dashboard expression returns data.
    let exprs = dashboard_exprs();
    assert!(exprs.len() >= 15, "too few dashboard targets: {exprs:?}");
    for (title, expr) in &exprs {
        let q = substitute(expr);
        let mut last = None;
        // Data, and at least one finite value (an empty histogram window
        // gives NaN: no data to draw).
        let got = wait_until(QUERY_BOUND, Duration::from_millis(500), || {
            last = query(monitor, &q);
            last.as_ref()
                .is_some_and(|r| r.iter().any(|s| value(s).is_finite()))
        });
        assert!(
            got.is_ok(),
            "dashboard panel {title:?}: {q} returned no finite data: {last:?}"
        );
        println!("panel {title:?}: {} series", last.map_or(0, |r| r.len()));
    }

    drop(prometheus);
    drop(nodes);
    drop(controller);
}
