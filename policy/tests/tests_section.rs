//! The `tests` section: passing policies, failing assertions (location, flow,
//! expected vs actual), and the shipped example policy.
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

mod common;

use std::path::Path;

use common::{fleet, parse, with_acls};
use ztmesh_policy::{Compiled, Policy};

#[test]
fn passing_tests_are_accepted_by_check() {
    let text = with_acls(
        r#"{"action": "accept", "src": ["group:eng"], "dst": ["tag:web:443"]}],
        "tests": [
          {"src": "alice@example.com", "accept": ["tag:web:443"], "deny": ["tag:web:80", "tag:db:443"]},
          {"src": "group:eng", "proto": "tcp", "accept": ["tag:web:443"]},
          {"src": "carol@example.com", "deny": ["tag:web:443"]},
          {"src": "100.64.0.9", "deny": ["tag:web:443"]},"#,
    );
    let p = Policy::check("p.hujson", &text).expect("tests pass");
    assert!(p.run_tests().is_ok());
}

#[test]
fn failing_tests_name_location_flow_and_verdicts() {
    let text = r#"{
  "groups": {"group:eng": ["alice@example.com"]},
  "tagOwners": {"tag:web": [], "tag:db": []},
  "acls": [
    {"action": "accept", "src": ["group:eng"], "dst": ["tag:web:443", "tag:db:22"]},
  ],
  "tests": [
    {
      "src": "alice@example.com",
      "accept": ["tag:web:443", "tag:db:5432"],
      "deny": ["tag:db:22"],
    },
    {"src": "tag:web", "proto": "udp", "accept": ["tag:db:53"]},
  ],
}
"#;
    // `parse` does not run tests; `check` does.
    let p = Policy::parse("policy.hujson", text).expect("valid policy");
    let err = Policy::check("policy.hujson", text).expect_err("tests fail");
    assert_eq!(p.run_tests().expect_err("tests fail"), err);
    assert_eq!(
        err.to_string(),
        "policy.hujson:10:33: test failed (test at line 8): alice@example.com -> tag:db:5432 proto tcp: expected accept, got deny (no rule matches)\n\
         policy.hujson:11:16: test failed (test at line 8): alice@example.com -> tag:db:22 proto tcp: expected deny, got accept (by policy.hujson:5)\n\
         policy.hujson:13:51: test failed (test at line 13): tag:web -> tag:db:53 proto udp: expected accept, got deny (no rule matches)"
    );
}

#[test]
fn tests_with_hosts_self_and_addresses() {
    let text = r#"{
  "hosts": {"lab": "198.18.0.0/24", "box": "198.18.0.7"},
  "acls": [
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},
    {"action": "accept", "src": ["lab"], "dst": ["100.64.0.0/10:22"]},
  ],
  "tests": [
    {"src": "bob@example.com", "accept": ["bob@example.com:8080"], "deny": ["alice@example.com:8080"]},
    {"src": "box", "accept": ["100.64.0.1:22", "[fd00::1]:443"]},
  ],
}"#;
    let err = Policy::check("p.hujson", text).expect_err("the v6 assertion fails");
    assert_eq!(
        err.to_string(),
        "p.hujson:9:48: test failed (test at line 9): box -> [fd00::1]:443 proto tcp: expected accept, got deny (no rule matches)"
    );
}

#[test]
fn example_policy_is_valid_and_its_tests_pass() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policy.hujson");
    let text = std::fs::read_to_string(&path).expect("examples/policy.hujson");
    let p = Policy::check("policy.hujson", &text).unwrap_or_else(|e| panic!("{e}"));

    // Laptops reach the web tier on 443 only; web reaches db on 5432; admins SSH everywhere.
    let nodes = vec![
        common::node(
            1,
            "alice-laptop",
            Some("alice@example.com"),
            &[],
            &["100.64.0.1"],
        ),
        common::node(2, "web1", None, &["tag:web"], &["100.64.1.1", "fd00::11"]),
        common::node(3, "db1", None, &["tag:db"], &["100.64.2.1"]),
        common::node(
            4,
            "carol-laptop",
            Some("carol@example.com"),
            &[],
            &["100.64.0.4"],
        ),
    ];
    let c = Compiled::new(p.clone(), nodes.clone());
    let flows = [
        ("alice-laptop", "web1", 443, true),
        ("alice-laptop", "web1", 22, false),
        ("alice-laptop", "db1", 5432, false),
        ("web1", "db1", 5432, true),
        ("carol-laptop", "db1", 22, true),
        ("carol-laptop", "alice-laptop", 22, true),
    ];
    for (s, d, port, want) in flows {
        assert_eq!(
            p.explain(&nodes, s, d, port, 6).allowed,
            want,
            "{s} -> {d}:{port}"
        );
    }
    let peers = |id| {
        c.view(id)
            .expect("view")
            .peers
            .iter()
            .copied()
            .collect::<Vec<_>>()
    };
    assert_eq!(peers(1), [2, 4]);
    assert_eq!(peers(2), [1, 3, 4]);
    assert_eq!(peers(3), [2, 4]);
    assert_eq!(peers(4), [1, 2, 3]);
}

#[test]
fn fleet_fixture_is_usable_with_the_prelude() {
    // Guards the shared fixture: all prelude names resolve.
    let p = parse(&with_acls(
        r#"{"action": "accept", "src": ["lab", "one", "v6net"], "dst": ["tag:web:*", "tag:db:*"]}"#,
    ));
    let c = Compiled::new(p, fleet());
    assert_eq!(c.nodes().count(), 8);
    assert!(c.view(4).is_some_and(|v| v.peers.contains(&7)));
}
