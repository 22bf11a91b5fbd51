//! Who may reach whom, as a graph: one edge per source selector and
//! destination of each ACL entry, with its protocols and ports and how many
//! nodes each end selects now (pure: no I/O). The admin console draws it;
//! `policy graph` prints it.

use std::collections::{BTreeSet, HashMap};

use crate::compile::Compiled;
use crate::eval::owner;
use crate::policy::{proto_has_ports, proto_name, PortRange, SelKind};
use crate::NodeInfo;

/// One allowed direction: `src` may reach `dst` on `ports`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyEdge {
    /// The source selector as written (`group:eng`, `tag:web`, `*`).
    pub src: String,
    /// The destination selector as written, without its ports.
    pub dst: String,
    /// Protocols and ports: `tcp:443`, `tcp,udp:80,443`, `icmp`,
    /// `tcp,udp,icmp,ipv6-icmp:*`.
    pub ports: String,
    /// `FILE:LINE` of the ACL entry.
    pub rule_id: String,
    /// The postures a source must pass (one of them); empty: none.
    pub postures: Vec<String>,
    /// Nodes the source selector selects now.
    pub src_nodes: usize,
    /// Nodes the destination selects now (`autogroup:self`: every
    /// user-owned node, each reached only by its owner).
    pub dst_nodes: usize,
}

/// The edges of the policy in force over the nodes `compiled` knows, in
/// ACL order; an edge repeated by several entries appears once per entry.
pub fn graph(compiled: &Compiled) -> Vec<PolicyEdge> {
    let policy = compiled.policy();
    let nodes: Vec<&NodeInfo> = compiled.nodes().collect();
    // Each selector's nodes counted once, however many edges name it.
    let mut counted: HashMap<(String, bool), usize> = HashMap::new();
    let mut count = |text: &str, kind: &SelKind, dst: bool| {
        *counted
            .entry((text.to_string(), dst))
            .or_insert_with(|| nodes.iter().filter(|n| selects(kind, n, dst)).count())
    };
    let mut out = Vec::new();
    for e in &policy.entries {
        let postures: Vec<String> = e
            .gate
            .as_ref()
            .map(|g| {
                g.postures
                    .iter()
                    .map(|&i| policy.postures[i].name.clone())
                    .collect()
            })
            .unwrap_or_default();
        for s in &e.src {
            let src_nodes = count(&s.text, &s.kind, false);
            let mut seen = BTreeSet::new();
            for d in &e.dst {
                let ports = flows_text(&e.protocols, &d.ports);
                if !seen.insert((d.sel.text.clone(), ports.clone())) {
                    continue;
                }
                out.push(PolicyEdge {
                    src: s.text.clone(),
                    dst: d.sel.text.clone(),
                    ports,
                    rule_id: e.rule_id.clone(),
                    postures: postures.clone(),
                    src_nodes,
                    dst_nodes: count(&d.sel.text, &d.sel.kind, true),
                });
            }
        }
    }
    out
}

/// Whether a selector selects `node` (as a destination: also by its
/// routes, and exit nodes for `autogroup:internet`).
fn selects(kind: &SelKind, node: &NodeInfo, dst: bool) -> bool {
    match kind {
        SelKind::Any => true,
        SelKind::Users(users) => owner(node).is_some_and(|u| users.contains(u)),
        SelKind::Tag(t) => node.tags.contains(t),
        SelKind::Member | SelKind::SelfNodes => owner(node).is_some(),
        SelKind::Tagged => !node.tags.is_empty(),
        SelKind::Prefix(p) => {
            node.addresses.iter().any(|a| p.contains(a))
                || (dst && node.routes.iter().any(|r| p.contains(r) || r.contains(p)))
        }
        SelKind::Internet => dst && node.exit_node,
    }
}

/// `tcp:443`, `tcp,udp:80,443`, `icmp`, or both kinds joined by `; `.
fn flows_text(protocols: &[u8], ports: &[PortRange]) -> String {
    let (with, without): (Vec<u8>, Vec<u8>) =
        protocols.iter().copied().partition(|&p| proto_has_ports(p));
    let names = |ps: &[u8]| {
        ps.iter()
            .map(|&p| proto_name(p))
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut parts = Vec::new();
    if !with.is_empty() {
        let ports: Vec<String> = ports
            .iter()
            .map(|r| match (r.first, r.last) {
                _ if *r == PortRange::ALL => "*".to_string(),
                (a, b) if a == b => a.to_string(),
                (a, b) => format!("{a}-{b}"),
            })
            .collect();
        parts.push(format!("{}:{}", names(&with), ports.join(",")));
    }
    if !without.is_empty() {
        parts.push(names(&without));
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Policy;

    fn node(id: u64, user: Option<&str>, tags: &[&str], addr: &str) -> NodeInfo {
        NodeInfo {
            id,
            name: format!("n{id}"),
            user: user.map(str::to_string),
            tags: tags.iter().map(|t| (*t).to_string()).collect(),
            addresses: vec![addr.parse().unwrap()],
            routes: Vec::new(),
            exit_node: false,
            posture: Default::default(),
        }
    }

    #[test]
    fn graph_has_an_edge_per_selector_pair_with_ports_postures_and_counts() {
        let policy = Policy::check(
            "p.hujson",
            r#"{
              "groups": {"group:eng": ["alice@example.com", "bob@example.com"]},
              "tagOwners": {"tag:web": [], "tag:db": []},
              "postures": {"posture:ok": ["custom:ok == true"]},
              "acls": [
                {"action": "accept", "src": ["group:eng", "tag:web"], "proto": "tcp",
                 "dst": ["tag:db:5432", "tag:web:443,8000-8100"], "srcPosture": ["posture:ok"]},
                {"action": "accept", "src": ["*"], "dst": ["100.64.0.9:*"]},
                {"action": "accept", "src": ["autogroup:member"], "proto": "icmp",
                 "dst": ["autogroup:self:*"]},
              ],
            }"#,
        )
        .unwrap();
        let nodes = vec![
            node(1, Some("alice@example.com"), &[], "100.64.0.1"),
            node(2, Some("bob@example.com"), &[], "100.64.0.2"),
            node(3, Some("alice@example.com"), &["tag:web"], "100.64.0.3"),
            node(4, None, &["tag:db"], "100.64.0.4"),
        ];
        let edges = graph(&Compiled::new(policy, nodes));
        let flat: Vec<(&str, &str, &str, usize, usize)> = edges
            .iter()
            .map(|e| {
                (
                    e.src.as_str(),
                    e.dst.as_str(),
                    e.ports.as_str(),
                    e.src_nodes,
                    e.dst_nodes,
                )
            })
            .collect();
        assert_eq!(
            flat,
            vec![
                ("group:eng", "tag:db", "tcp:5432", 2, 1),
                ("group:eng", "tag:web", "tcp:443,8000-8100", 2, 1),
                ("tag:web", "tag:db", "tcp:5432", 1, 1),
                ("tag:web", "tag:web", "tcp:443,8000-8100", 1, 1),
                ("*", "100.64.0.9", "tcp,udp:*; icmp,ipv6-icmp", 4, 0),
                ("autogroup:member", "autogroup:self", "icmp", 2, 2),
            ]
        );
        assert_eq!(edges[0].postures, vec!["posture:ok".to_string()]);
        assert_eq!(edges[0].rule_id, "p.hujson:6");
        assert!(edges[4].postures.is_empty());
    }

    #[test]
    fn an_empty_policy_has_no_edges() {
        assert!(graph(&Compiled::new(Policy::empty(), Vec::new())).is_empty());
    }
}
