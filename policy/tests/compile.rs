//! Table tests for compilation: exact per-node views, determinism,
//! incremental updates, policy replacement and `plan`.
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

mod common;

use std::collections::BTreeSet;

use common::{fleet, node, parse, with_acls};
use ipnet::IpNet;
use ztmesh_policy::{plan, Compiled, FlowChange, InboundRule, NodeView, PortRange};

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter()
        .map(|s| s.parse().expect("test prefix"))
        .collect()
}

fn ids(list: &[u64]) -> BTreeSet<u64> {
    list.iter().copied().collect()
}

fn rule(
    src: &[&str],
    dst: &[&str],
    protocols: &[u8],
    ports: &[(u16, u16)],
    rule_id: &str,
) -> InboundRule {
    InboundRule {
        src: nets(src).into(),
        dst: nets(dst),
        protocols: protocols.to_vec(),
        ports: ports
            .iter()
            .map(|&(first, last)| PortRange { first, last })
            .collect(),
        rule_id: rule_id.to_string(),
    }
}

/// `FILE:LINE` of the first line of `text` containing `needle`.
fn rule_id(text: &str, needle: &str) -> String {
    let line = text
        .lines()
        .position(|l| l.contains(needle))
        .expect("needle")
        + 1;
    format!("p.hujson:{line}")
}

/// Rules carry destinations: a named destination admits every address of
/// the node, an address destination only itself, and its ports never spill
/// over to the node's other addresses.
#[test]
fn rules_carry_the_destination_addresses_they_select() {
    let text = with_acls(
        r#"
    {"action": "accept", "src": ["bob@example.com"], "proto": "tcp", "dst": ["100.64.0.3:22", "tag:web:443"]},"#,
    );
    let c = Compiled::new(parse(&text), fleet());
    let id = rule_id(&text, "100.64.0.3:22");
    let web1 = c.view(3).expect("web1");
    assert_eq!(
        web1.inbound,
        vec![
            rule(
                &["100.64.0.2/32"],
                &["100.64.0.3/32", "fd00::3/128"],
                &[6],
                &[(443, 443)],
                &id
            ),
            rule(
                &["100.64.0.2/32"],
                &["100.64.0.3/32"],
                &[6],
                &[(22, 22)],
                &id
            ),
        ]
    );
    let bob: std::net::IpAddr = "100.64.0.2".parse().unwrap();
    let v4: std::net::IpAddr = "100.64.0.3".parse().unwrap();
    let v6: std::net::IpAddr = "fd00::3".parse().unwrap();
    let other: std::net::IpAddr = "198.18.9.9".parse().unwrap();
    assert!(web1.admits(bob, v4, 6, 22).is_some());
    assert!(
        web1.admits(bob, v6, 6, 22).is_none(),
        "22 is for the v4 address only"
    );
    assert!(web1.admits(bob, v6, 6, 443).is_some());
    assert!(
        web1.admits(bob, other, 6, 443).is_none(),
        "not an address of web1"
    );
}

#[test]
fn exact_views_for_a_small_fleet() {
    let text = with_acls(
        r#"
    {"action": "accept", "src": ["group:eng"], "dst": ["tag:db:22,5432", "tag:db:5433"]},
    {"action": "accept", "src": ["tag:web", "lab"], "proto": "tcp", "dst": ["tag:db:*"]},
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},"#,
    );
    let c = Compiled::new(parse(&text), fleet());
    let eng = rule_id(&text, "group:eng\"], \"dst");
    let web = rule_id(&text, "tag:web\", \"lab");
    let own = rule_id(&text, "autogroup:self");
    assert_eq!(
        c.view(4),
        Some(&NodeView {
            peers: ids(&[1, 2, 3, 6, 7]),
            inbound: vec![
                // alice's laptop (v4 + v6) and desktop, bob; ports merged; ICMP split off.
                rule(
                    &[
                        "100.64.0.1/32",
                        "100.64.0.2/32",
                        "100.64.0.6/32",
                        "fd00::1/128"
                    ],
                    &["100.64.0.4/32"],
                    &[6, 17],
                    &[(22, 22), (5432, 5433)],
                    &eng
                ),
                rule(
                    &[
                        "100.64.0.1/32",
                        "100.64.0.2/32",
                        "100.64.0.6/32",
                        "fd00::1/128"
                    ],
                    &["100.64.0.4/32"],
                    &[1, 58],
                    &[(0, 65535)],
                    &eng
                ),
                rule(
                    &["100.64.0.3/32", "198.18.0.0/24", "fd00::3/128"],
                    &["100.64.0.4/32"],
                    &[6],
                    &[(0, 65535)],
                    &web
                ),
            ],
            ..NodeView::default()
        })
    );
    // alice's desktop: only her own devices reach it.
    assert_eq!(
        c.view(6),
        Some(&NodeView {
            peers: ids(&[1, 4]),
            inbound: vec![rule(
                &["100.64.0.1/32", "100.64.0.6/32", "fd00::1/128"],
                &["100.64.0.6/32"],
                &[1, 6, 17, 58],
                &[(0, 65535)],
                &own
            )],
            ..NodeView::default()
        })
    );
    // web1 receives nothing but may reach db1: still a peer of it.
    assert_eq!(
        c.view(3),
        Some(&NodeView {
            peers: ids(&[4]),
            inbound: vec![],
            ..NodeView::default()
        })
    );
    // The lab box only sends.
    assert_eq!(
        c.view(7),
        Some(&NodeView {
            peers: ids(&[4]),
            inbound: vec![],
            ..NodeView::default()
        })
    );
    assert_eq!(c.view(99), None);
}

#[test]
fn adjacent_sources_are_aggregated_and_literals_cover_nodes() {
    let text = with_acls(
        r#"{"action": "accept", "src": ["group:eng", "100.64.0.0/30"], "proto": "udp", "dst": ["tag:db:53"]}"#,
    );
    let c = Compiled::new(parse(&text), fleet());
    let v = c.view(4).expect("db1");
    assert_eq!(v.inbound.len(), 1);
    // .1 and .2 lie in the /30; .6 and fd00::1 do not.
    assert_eq!(
        *v.inbound[0].src,
        nets(&["100.64.0.0/30", "100.64.0.6/32", "fd00::1/128"])
    );
    assert_eq!(v.peers, ids(&[1, 2, 3, 6]));
}

#[test]
fn output_is_deterministic_whatever_the_node_order() {
    let text = with_acls(
        r#"{"action": "accept", "src": ["*"], "dst": ["tag:web:443"]},
           {"action": "accept", "src": ["group:eng", "tag:web"], "dst": ["tag:db:5432"]},
           {"action": "accept", "src": ["group:eng"], "dst": ["autogroup:self:22"]}"#,
    );
    let p = parse(&text);
    let a = Compiled::new(p.clone(), fleet());
    let mut reversed = fleet();
    reversed.reverse();
    let b = Compiled::new(p, reversed);
    for n in fleet() {
        assert_eq!(a.view(n.id), b.view(n.id), "node {}", n.name);
    }
    assert_eq!(format!("{:?}", a.view(4)), format!("{:?}", b.view(4)));
}

#[test]
fn nodes_without_addresses_are_isolated() {
    let text = with_acls(r#"{"action": "accept", "src": ["*"], "dst": ["*:*"]}"#);
    let mut nodes = fleet();
    nodes.push(node(9, "no-addr", Some("alice@example.com"), &[], &[]));
    let c = Compiled::new(parse(&text), nodes);
    assert_eq!(c.view(9), Some(&NodeView::default()));
    assert!(!c.view(1).expect("view").peers.contains(&9));
    assert_eq!(c.view(1).expect("view").peers.len(), 7);
}

#[test]
fn upsert_and_remove_report_exactly_the_changed_views() {
    let text = with_acls(
        r#"{"action": "accept", "src": ["group:eng"], "dst": ["tag:web:443"]},
           {"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"]}"#,
    );
    let p = parse(&text);
    let mut c = Compiled::new(p.clone(), fleet());

    // A second web server: eng laptops (1, 2, 6) and db1 (4) see it; carol does not.
    let web2 = node(10, "web2", None, &["tag:web"], &["100.64.0.10"]);
    let changed = c.upsert_node(web2.clone());
    assert_eq!(changed, ids(&[1, 2, 4, 6, 10]));
    assert_eq!(c.view(10).expect("web2").peers, ids(&[1, 2, 4, 6]));
    // db1's inbound source list now includes web2.
    assert!(c.view(4).expect("db1").inbound[0]
        .src
        .contains(&"100.64.0.10/32".parse().expect("net")));

    // Upserting the same node again changes nobody else.
    assert_eq!(c.upsert_node(web2.clone()), ids(&[10]));

    // Retag web2 as db: it now receives from web1 and stops being reachable from laptops.
    let mut as_db = web2.clone();
    as_db.tags = BTreeSet::from(["tag:db".to_string()]);
    let changed = c.upsert_node(as_db.clone());
    assert_eq!(changed, ids(&[1, 2, 3, 4, 6, 10]));
    let full = Compiled::new(p.clone(), c.nodes().cloned().collect());
    for n in full.nodes() {
        assert_eq!(c.view(n.id), full.view(n.id), "node {}", n.name);
    }

    assert_eq!(c.remove_node(10), ids(&[3, 10]));
    assert_eq!(c.view(10), None);
    assert_eq!(c.remove_node(10), ids(&[]));
    let full = Compiled::new(p, fleet());
    for n in fleet() {
        assert_eq!(c.view(n.id), full.view(n.id), "node {}", n.name);
    }
}

#[test]
fn set_policy_reports_changed_views_and_plan_lists_flows() {
    let old_text = with_acls(
        r#"{"action": "accept", "src": ["group:eng"], "dst": ["tag:web:80,443"]},
           {"action": "accept", "src": ["tag:web"], "proto": "udp", "dst": ["tag:db:53-54"]}"#,
    );
    let new_text = with_acls(
        r#"{"action": "accept", "src": ["group:eng"], "proto": "tcp", "dst": ["tag:web:443"]},
           {"action": "accept", "src": ["tag:web"], "proto": "udp", "dst": ["tag:db:53-54"]},
           {"action": "accept", "src": ["group:admins"], "proto": "tcp", "dst": ["tag:db:22"]}"#,
    );
    let old = Compiled::new(parse(&old_text), fleet());
    let mut new = old.clone();
    let changed = new.set_policy(parse(&new_text));
    // web1's rules changed (80 and UDP/ICMP dropped); db1 gained carol; carol gained db1.
    assert_eq!(changed, ids(&[3, 4, 5]));
    assert_eq!(new.policy(), &parse(&new_text));

    let changes = plan(&old, &new);
    let lost_web = vec![
        "icmp".to_string(),
        "tcp:80".to_string(),
        "udp:80".to_string(),
        "udp:443".to_string(),
        "ipv6-icmp".to_string(),
    ];
    assert_eq!(
        changes,
        vec![
            FlowChange {
                src: "alice-desktop".into(),
                dst: "web1".into(),
                gained: vec![],
                lost: lost_web.clone()
            },
            FlowChange {
                src: "alice-laptop".into(),
                dst: "web1".into(),
                gained: vec![],
                lost: lost_web.clone()
            },
            FlowChange {
                src: "bob-laptop".into(),
                dst: "web1".into(),
                gained: vec![],
                lost: lost_web
            },
            FlowChange {
                src: "carol-laptop".into(),
                dst: "db1".into(),
                gained: vec!["tcp:22".into()],
                lost: vec![]
            },
        ]
    );
    assert!(plan(&new, &new).is_empty());
    // udp:53-54 is unchanged, so web1 -> db1 is not listed.
    let back = plan(&new, &old);
    assert_eq!(back.len(), 4);
    assert_eq!(back[3].lost, vec!["tcp:22".to_string()]);
}
