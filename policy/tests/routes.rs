//! Subnet routes, exit nodes and `autoApprovers`: what a router's inbound
//! rules hold, which routes a client is given, what `explain` and the
//! `tests` section answer for addresses behind routers and on the
//! internet, and which nodes the auto-approvers select.
//!
//! The fleet: alice's laptop, bob's laptop, a subnet router `r1` serving
//! 198.19.50.0/24, a router `r2` serving 198.19.60.0/24, and an exit node
//! `x1`. 198.18.0.0/15 stands for "the internet".
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

mod common;

use std::collections::BTreeMap;

use ipnet::IpNet;
use ztmesh_policy::{internet_prefixes, Compiled, NodeInfo, Policy};

const TCP: u8 = 6;

const HEAD: &str = r#"
  "groups": {"group:netops": ["carol@example.com"]},
  "tagOwners": {
    "tag:router": ["group:netops"],
    "tag:exit": ["group:netops"],
  },
"#;

fn net(s: &str) -> IpNet {
    s.parse().expect("test prefix")
}

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|s| net(s)).collect()
}

fn fleet() -> Vec<NodeInfo> {
    let mut exit = common::node(5, "x1", None, &["tag:exit"], &["100.64.0.5", "fd00::5"]);
    exit.exit_node = true;
    vec![
        common::node(
            1,
            "alice-laptop",
            Some("alice@example.com"),
            &[],
            &["100.64.0.1", "fd00::1"],
        ),
        common::node(
            2,
            "bob-laptop",
            Some("bob@example.com"),
            &[],
            &["100.64.0.2"],
        ),
        common::router(
            3,
            "r1",
            &["tag:router"],
            &["100.64.0.3"],
            &["198.19.50.0/24"],
        ),
        common::router(
            4,
            "r2",
            &["tag:router"],
            &["100.64.0.4"],
            &["198.19.60.0/24"],
        ),
        exit,
    ]
}

fn policy(acls: &str) -> Policy {
    common::parse(&format!("{{{HEAD} \"acls\": [{acls}],\n}}"))
}

fn compiled(acls: &str) -> Compiled {
    Compiled::new(policy(acls), fleet())
}

/// `(dst, ports)` of every inbound rule of `id`.
fn rule_dsts(c: &Compiled, id: u64) -> Vec<Vec<IpNet>> {
    c.view(id)
        .expect("view")
        .inbound
        .iter()
        .map(|r| r.dst.clone())
        .collect()
}

fn peer_routes(c: &Compiled, id: u64) -> BTreeMap<u64, Vec<IpNet>> {
    c.view(id).expect("view").peer_routes.clone()
}

#[test]
fn router_rule_dst_is_the_intersection_of_route_and_destination() {
    let c = compiled(
        r#"{"action": "accept", "src": ["alice@example.com"], "proto": "tcp", "dst": ["198.19.50.10/32:443"]},
           {"action": "accept", "src": ["bob@example.com"], "proto": "tcp", "dst": ["198.19.0.0/16:22"]}"#,
    );
    let view = c.view(3).expect("router view");
    assert_eq!(view.inbound.len(), 2);
    // A host inside the route: the router enforces exactly that host.
    assert_eq!(view.inbound[0].dst, nets(&["198.19.50.10/32"]));
    assert_eq!(
        *view.inbound[0].src,
        nets(&["100.64.0.1/32", "fd00::1/128"])
    );
    assert_eq!(view.inbound[0].rule_id, "p.hujson:7");
    // A prefix holding the route: the whole route, not the /16.
    assert_eq!(view.inbound[1].dst, nets(&["198.19.50.0/24"]));
    assert_eq!(rule_dsts(&c, 4), [nets(&["198.19.60.0/24"])]);
    let alice = "100.64.0.1".parse().expect("addr");
    let inside = "198.19.50.10".parse().expect("addr");
    let other = "198.19.50.11".parse().expect("addr");
    assert!(view.admits(alice, inside, TCP, 443).is_some());
    assert!(view.admits(alice, inside, TCP, 22).is_none());
    assert!(view.admits(alice, other, TCP, 443).is_none());
    // Neither router's own address is reachable.
    assert!(view
        .admits(alice, "100.64.0.3".parse().expect("addr"), TCP, 443)
        .is_none());
}

#[test]
fn client_allowed_one_host_in_a_route_gets_the_whole_route() {
    let c = compiled(
        r#"{"action": "accept", "src": ["alice@example.com"], "dst": ["198.19.50.10:443"]}"#,
    );
    assert_eq!(
        peer_routes(&c, 1),
        BTreeMap::from([(3, nets(&["198.19.50.0/24"]))])
    );
    assert!(c.view(1).expect("view").peers.contains(&3));
    assert!(c.view(3).expect("view").peers.contains(&1));
    // The router reaches alice only by her addresses: no routes for it.
    assert!(peer_routes(&c, 3).is_empty());
    // r2's route is disjoint from the destination.
    assert!(!c.view(1).expect("view").peers.contains(&4));
}

#[test]
fn client_with_no_rule_to_the_subnet_gets_no_route() {
    let c = compiled(
        r#"{"action": "accept", "src": ["alice@example.com"], "dst": ["198.19.50.10:443"]},
           {"action": "accept", "src": ["bob@example.com"], "dst": ["alice@example.com:22"]}"#,
    );
    assert!(peer_routes(&c, 2).is_empty());
    assert!(!c.view(2).expect("view").peers.contains(&3));
    assert!(c
        .view(3)
        .expect("view")
        .inbound
        .iter()
        .all(|r| !r.src.contains(&net("100.64.0.2/32"))));
}

#[test]
fn named_destinations_never_include_routes() {
    let c = compiled(
        r#"{"action": "accept", "src": ["alice@example.com"], "proto": "tcp", "dst": ["tag:router:22", "autogroup:tagged:80"]},
           {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]}"#,
    );
    assert_eq!(rule_dsts(&c, 3), [nets(&["100.64.0.3/32"])]);
    assert_eq!(rule_dsts(&c, 5), [nets(&["100.64.0.5/32", "fd00::5/128"])]);
    assert!(peer_routes(&c, 1).is_empty());
    assert!(c.view(1).expect("view").peers.contains(&3));
}

#[test]
fn star_destination_includes_routes_but_not_the_internet() {
    let c = compiled(r#"{"action": "accept", "src": ["alice@example.com"], "dst": ["*:*"]}"#);
    assert_eq!(
        rule_dsts(&c, 3),
        [nets(&["100.64.0.3/32", "198.19.50.0/24"])]
    );
    // The exit node gets its own addresses only.
    assert_eq!(rule_dsts(&c, 5), [nets(&["100.64.0.5/32", "fd00::5/128"])]);
    assert_eq!(
        peer_routes(&c, 1),
        BTreeMap::from([
            (3, nets(&["198.19.50.0/24"])),
            (4, nets(&["198.19.60.0/24"])),
        ])
    );
}

#[test]
fn star_on_a_node_without_routes_keeps_one_rule_with_named_destinations() {
    // `*` and a tag in one entry share one rule on a node without routes
    // (ports merged); on a router they differ, so they are two rules.
    let c = compiled(
        r#"{"action": "accept", "src": ["alice@example.com"], "proto": "tcp", "dst": ["*:22", "tag:router:80", "tag:exit:80"]}"#,
    );
    let exit = &c.view(5).expect("view").inbound;
    assert_eq!(exit.len(), 1);
    assert_eq!(exit[0].ports.len(), 2);
    let router = &c.view(3).expect("view").inbound;
    assert_eq!(router.len(), 2);
    assert_eq!(router[0].dst, nets(&["100.64.0.3/32"]));
    assert_eq!(router[1].dst, nets(&["100.64.0.3/32", "198.19.50.0/24"]));
}

#[test]
fn autogroup_internet_selects_only_exit_nodes_with_the_internet_set() {
    let c = compiled(
        r#"{"action": "accept", "src": ["alice@example.com"], "dst": ["autogroup:internet:*"]}"#,
    );
    assert_eq!(rule_dsts(&c, 5), [internet_prefixes().to_vec()]);
    for id in [2, 3, 4] {
        assert!(rule_dsts(&c, id).is_empty(), "node {id}");
    }
    assert_eq!(
        peer_routes(&c, 1),
        BTreeMap::from([(5, nets(&["0.0.0.0/0", "::/0"]))])
    );
    assert_eq!(
        c.view(1)
            .expect("view")
            .peers
            .iter()
            .copied()
            .collect::<Vec<_>>(),
        [5]
    );
    assert!(peer_routes(&c, 2).is_empty());
    let view = c.view(5).expect("view");
    let alice = "100.64.0.1".parse().expect("addr");
    for (to, want) in [
        ("198.18.7.7", true),
        ("198.19.50.10", true),
        ("100.64.0.2", false),
        ("fd00::2", false),
        ("169.254.1.1", false),
        ("224.0.0.251", false),
    ] {
        let got = view
            .admits(alice, to.parse().expect("addr"), TCP, 443)
            .is_some();
        assert_eq!(got, want, "{to}");
    }
    // Without the approval the node is no exit node: nobody gets a rule.
    let mut nodes = fleet();
    nodes[4].exit_node = false;
    let c = Compiled::new(c.policy().clone(), nodes);
    assert!(rule_dsts(&c, 5).is_empty());
    assert!(peer_routes(&c, 1).is_empty());
}

#[test]
fn autogroup_internet_as_a_source_is_refused_with_its_position() {
    let text = format!(
        "{{{HEAD} \"acls\": [\n  {{\"action\": \"accept\", \"src\": [\"autogroup:internet\"], \"dst\": [\"*:*\"]}},\n],\n}}"
    );
    assert_eq!(
        common::parse_err(&text),
        "p.hujson:8:32: autogroup:internet is only allowed in \"dst\" (it grants use of exit nodes)"
    );
}

#[test]
fn incremental_route_changes_reach_the_clients_peer_routes() {
    let p =
        policy(r#"{"action": "accept", "src": ["alice@example.com"], "dst": ["198.19.0.0/16:*"]}"#);
    let mut nodes = fleet();
    nodes[2].routes.clear();
    let mut c = Compiled::new(p.clone(), nodes.clone());
    assert_eq!(
        peer_routes(&c, 1),
        BTreeMap::from([(4, nets(&["198.19.60.0/24"]))])
    );
    // r1's route is approved: alice and r1 change, nobody else.
    nodes[2].routes = nets(&["198.19.50.0/24"]);
    let changed = c.upsert_node(nodes[2].clone());
    assert_eq!(changed.into_iter().collect::<Vec<_>>(), [1, 3]);
    assert_eq!(
        peer_routes(&c, 1),
        BTreeMap::from([
            (3, nets(&["198.19.50.0/24"])),
            (4, nets(&["198.19.60.0/24"])),
        ])
    );
    // r2 leaves.
    let changed = c.remove_node(4);
    assert_eq!(changed.into_iter().collect::<Vec<_>>(), [1, 4]);
    let full = Compiled::new(p, c.nodes().cloned().collect());
    for n in c.nodes() {
        assert_eq!(c.view(n.id), full.view(n.id), "node {}", n.name);
    }
}

#[test]
fn explain_names_the_rule_and_router_for_an_address_in_a_route() {
    let p = policy(
        r#"{"action": "accept", "src": ["alice@example.com"], "dst": ["198.19.50.10:443"]},
           {"action": "accept", "src": ["bob@example.com"], "dst": ["*:22"]}"#,
    );
    let nodes = fleet();
    let e = p.explain(&nodes, "alice-laptop", "198.19.50.10", 443, TCP);
    assert!(e.allowed, "{}", e.detail);
    assert_eq!(e.rule_id.as_deref(), Some("p.hujson:7"));
    assert!(
        e.detail
            .ends_with("(198.19.50.10 is in route 198.19.50.0/24 of node r1)"),
        "{}",
        e.detail
    );
    assert!(
        !p.explain(&nodes, "alice-laptop", "198.19.50.10", 22, TCP)
            .allowed
    );
    assert!(
        !p.explain(&nodes, "alice-laptop", "198.19.50.11", 443, TCP)
            .allowed
    );
    // `*` reaches addresses in routes, not the internet.
    let e = p.explain(&nodes, "bob-laptop", "198.19.60.9", 22, TCP);
    assert!(e.allowed && e.detail.contains("of node r2"), "{}", e.detail);
    let e = p.explain(&nodes, "bob-laptop", "198.18.7.7", 22, TCP);
    assert!(!e.allowed, "{}", e.detail);
    assert!(e.detail.contains("in no route"), "{}", e.detail);
}

#[test]
fn explain_allows_internet_addresses_by_an_autogroup_internet_rule() {
    let p = policy(
        r#"{"action": "accept", "src": ["alice@example.com"], "dst": ["autogroup:internet:443"]}"#,
    );
    let nodes = fleet();
    let e = p.explain(&nodes, "alice-laptop", "198.18.7.7", 443, TCP);
    assert!(e.allowed, "{}", e.detail);
    assert_eq!(e.rule_id.as_deref(), Some("p.hujson:7"));
    assert!(e.detail.contains("through an exit node"), "{}", e.detail);
    assert!(
        !p.explain(&nodes, "alice-laptop", "198.18.7.7", 80, TCP)
            .allowed
    );
    assert!(
        !p.explain(&nodes, "bob-laptop", "198.18.7.7", 443, TCP)
            .allowed
    );
    // Mesh and private addresses are never "internet".
    assert!(
        !p.explain(&nodes, "alice-laptop", "100.64.0.2", 443, TCP)
            .allowed
    );
    assert!(!p.explain(&nodes, "alice-laptop", "x1", 443, TCP).allowed);
    // No exit node, no internet.
    let no_exit: Vec<NodeInfo> = nodes
        .iter()
        .cloned()
        .map(|mut n| {
            n.exit_node = false;
            n
        })
        .collect();
    let e = p.explain(&no_exit, "alice-laptop", "198.18.7.7", 443, TCP);
    assert!(!e.allowed);
    assert!(e.detail.contains("no node is an exit node"), "{}", e.detail);
}

#[test]
fn tests_section_handles_subnet_and_internet_destinations() {
    let text = format!(
        r#"{{{HEAD}
  "acls": [
    {{"action": "accept", "src": ["alice@example.com"], "dst": ["198.19.50.0/24:443", "autogroup:internet:443"]}},
  ],
  "tests": [
    {{"src": "alice@example.com", "accept": ["198.19.50.10:443", "198.18.7.7:443"], "deny": ["198.19.50.10:22", "100.64.0.2:443"]}},
    {{"src": "bob@example.com", "deny": ["198.19.50.10:443", "198.18.7.7:443"]}},
  ],
}}"#
    );
    Policy::check("p.hujson", &text).expect("tests pass");
    let failing = text.replace(
        r#""deny": ["198.19.50.10:22""#,
        r#""deny": ["198.18.7.7:443""#,
    );
    let err = Policy::check("p.hujson", &failing).expect_err("a failing test");
    assert_eq!(
        err.to_string(),
        "p.hujson:12:93: test failed (test at line 12): alice@example.com -> 198.18.7.7:443 proto tcp: expected deny, got accept (by p.hujson:9)"
    );
}

const APPROVERS: &str = r#"
  "autoApprovers": {
    "routes": {
      "198.19.0.0/16": ["tag:router"],
      "198.19.50.0/24": ["group:netops", "alice@example.com"],
      "198.18.100.0/24": ["autogroup:member"],
    },
    "exitNode": ["tag:exit", "bob@example.com"],
  },
"#;

fn approvers() -> Policy {
    common::parse(&format!("{{{HEAD} {APPROVERS} }}"))
}

#[test]
fn auto_approves_routes_inside_an_approver_cidr_for_the_nodes_it_selects() {
    let p = approvers();
    let nodes = fleet();
    let (alice, bob, r1) = (&nodes[0], &nodes[1], &nodes[2]);
    let carol = common::node(
        6,
        "carol-box",
        Some("carol@example.com"),
        &[],
        &["100.64.0.6"],
    );
    // A tagged node by its tags: nested routes inside the /16.
    assert!(p.auto_approves_route(r1, net("198.19.0.0/16")));
    assert!(p.auto_approves_route(r1, net("198.19.50.0/24")));
    assert!(p.auto_approves_route(r1, net("198.19.77.128/25")));
    // Not a route holding the approver CIDR, nor a disjoint one.
    assert!(!p.auto_approves_route(r1, net("198.18.0.0/15")));
    assert!(!p.auto_approves_route(r1, net("198.18.50.0/24")));
    // Untagged nodes by user, group and autogroup:member.
    assert!(p.auto_approves_route(alice, net("198.19.50.0/24")));
    assert!(p.auto_approves_route(alice, net("198.19.50.64/26")));
    assert!(!p.auto_approves_route(alice, net("198.19.51.0/24")));
    assert!(p.auto_approves_route(&carol, net("198.19.50.0/24")));
    assert!(!p.auto_approves_route(bob, net("198.19.50.0/24")));
    assert!(p.auto_approves_route(bob, net("198.18.100.0/24")));
    // A tagged node is not selected by the user who enrolled it.
    let mut tagged_alice = alice.clone();
    tagged_alice.tags.insert("tag:exit".to_string());
    assert!(!p.auto_approves_route(&tagged_alice, net("198.19.50.0/24")));
    assert!(!p.auto_approves_route(&tagged_alice, net("198.18.100.0/24")));
    // Exit nodes.
    assert!(p.auto_approves_exit(&nodes[4]));
    assert!(p.auto_approves_exit(bob));
    assert!(!p.auto_approves_exit(alice));
    assert!(!p.auto_approves_exit(r1));
    assert!(p.auto_approves_exit(&tagged_alice));
    // A policy without the section approves nothing.
    assert!(!Policy::empty().auto_approves_route(r1, net("198.19.50.0/24")));
    assert!(!Policy::empty().auto_approves_exit(&nodes[4]));
}

#[test]
fn auto_approvers_errors_name_file_line_col_and_refuse_the_policy() {
    let text = r#"{
  "tagOwners": {"tag:router": []},
  "autoApprovers": {
    "routes": {"198.19.50.1/24": ["tag:router"], "198.19.60.0/24": ["tag:nope", "group:x"]},
    "exitnode": ["autogroup:self"],
    "ipsets": [],
  },
}"#;
    assert_eq!(
        common::parse_err(text),
        [
            "p.hujson:4:16: route \"198.19.50.1/24\" has host bits set: write \"198.19.50.0/24\"",
            "p.hujson:4:69: tag \"tag:nope\" is not defined in tagOwners",
            "p.hujson:4:81: undefined group \"group:x\"",
            "p.hujson:5:18: invalid approver \"autogroup:self\": expected a user, group, tag or autogroup:member",
            "p.hujson:6:5: unknown key \"ipsets\" in autoApprovers; expected routes or exitNode",
        ]
        .join("\n")
    );
}
