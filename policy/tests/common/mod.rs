//! Shared fixtures for the policy integration tests.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::IpAddr;

use ztmesh_policy::{Compiled, NodeInfo, Policy};

/// Groups, tag owners and hosts every table case builds on.
pub const PRELUDE: &str = r#"
  "groups": {
    "group:eng": ["alice@example.com", "bob@example.com"],
    "group:admins": ["carol@example.com"],
  },
  "tagOwners": {
    "tag:web": ["group:eng"],
    "tag:db": ["group:admins"],
  },
  "hosts": {
    "lab": "198.18.0.0/24",
    "one": "100.64.0.5",
    "v6net": "fd00:1::/64",
  },
"#;

pub fn node(id: u64, name: &str, user: Option<&str>, tags: &[&str], addrs: &[&str]) -> NodeInfo {
    NodeInfo {
        id,
        name: name.to_string(),
        user: user.map(str::to_string),
        tags: tags.iter().map(|t| t.to_string()).collect::<BTreeSet<_>>(),
        addresses: addrs
            .iter()
            .map(|a| a.parse::<IpAddr>().expect("test address"))
            .collect(),
        ..NodeInfo::default()
    }
}

/// `node(...)` serving the subnet routes `routes` (canonical CIDRs).
pub fn router(id: u64, name: &str, tags: &[&str], addrs: &[&str], routes: &[&str]) -> NodeInfo {
    NodeInfo {
        routes: routes
            .iter()
            .map(|r| r.parse().expect("test route"))
            .collect(),
        ..node(id, name, None, tags, addrs)
    }
}

/// Whether some node's compiled rules admit a packet from any address of
/// `src` to the address `to` (a node's own, in a route, or on the internet).
pub fn admitted_anywhere(c: &Compiled, src: u64, to: IpAddr, proto: u8, port: u16) -> bool {
    c.nodes()
        .any(|d| admitted_at(c, src, d.id, to, proto, port))
}

/// alice (laptop, desktop), bob, carol, a web server enrolled by alice, a db
/// server, an unowned node in the lab range, and a v6-only node.
pub fn fleet() -> Vec<NodeInfo> {
    vec![
        node(
            1,
            "alice-laptop",
            Some("alice@example.com"),
            &[],
            &["100.64.0.1", "fd00::1"],
        ),
        node(
            2,
            "bob-laptop",
            Some("bob@example.com"),
            &[],
            &["100.64.0.2"],
        ),
        node(
            3,
            "web1",
            Some("alice@example.com"),
            &["tag:web"],
            &["100.64.0.3", "fd00::3"],
        ),
        node(4, "db1", None, &["tag:db"], &["100.64.0.4"]),
        node(
            5,
            "carol-laptop",
            Some("carol@example.com"),
            &[],
            &["100.64.0.5"],
        ),
        node(
            6,
            "alice-desktop",
            Some("alice@example.com"),
            &[],
            &["100.64.0.6"],
        ),
        node(7, "lab-box", None, &[], &["198.18.0.7"]),
        node(8, "v6-box", Some("dave@example.com"), &[], &["fd00:1::8"]),
    ]
}

/// A policy with the prelude and the given `acls` entries.
pub fn with_acls(acls: &str) -> String {
    format!("{{{PRELUDE} \"acls\": [{acls}],\n}}")
}

pub fn parse(text: &str) -> Policy {
    match Policy::parse("p.hujson", text) {
        Ok(p) => p,
        Err(e) => panic!("policy should parse:\n{e}\n---\n{text}"),
    }
}

pub fn parse_err(text: &str) -> String {
    match Policy::parse("p.hujson", text) {
        Ok(_) => panic!("policy should be rejected:\n{text}"),
        Err(e) => e.to_string(),
    }
}

/// Whether the compiled rules of `dst` admit a packet from any address of
/// `src` to any address of `dst`.
pub fn admitted(c: &Compiled, src: u64, dst: u64, proto: u8, port: u16) -> bool {
    let Some(d) = c.nodes().find(|n| n.id == dst) else {
        return false;
    };
    d.addresses
        .iter()
        .any(|to| admitted_at(c, src, dst, *to, proto, port))
}

/// Whether the compiled rules of `dst` admit a packet from any address of
/// `src` to the address `to`.
pub fn admitted_at(c: &Compiled, src: u64, dst: u64, to: IpAddr, proto: u8, port: u16) -> bool {
    let Some(view) = c.view(dst) else {
        return false;
    };
    let Some(s) = c.nodes().find(|n| n.id == src) else {
        return false;
    };
    s.addresses
        .iter()
        .any(|a| view.admits(*a, to, proto, port).is_some())
}
