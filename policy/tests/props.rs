//! Property tests against the naive reference (`explain`, which walks the
//! ACL list directly): for random policies and node sets,
//! - the compiled inbound rules of the destination admit a flow iff the
//!   direct evaluation allows it;
//! - a node's peer set is exactly the nodes with a permitted flow either way;
//! - incremental upserts and removals give the same views as a full
//!   recompile, and report exactly the views that changed;
//! - compilation does not depend on node order;
//! - with subnet routers and exit nodes: some node's rules admit a flow to
//!   an address in a route (or on the internet) iff direct evaluation
//!   allows it, and a node's peer routes are exactly the routes (and exit
//!   nodes) through which direct evaluation allows it some flow;
//! - with random postures (`srcPosture`, `defaultSrcPosture`, postures
//!   without conditions) and random, possibly stale, node attributes, all
//!   of the above, including upserts that change only a node's attributes.
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use proptest::prelude::*;
use ztmesh_policy::{AttrValue, Attributes, Compiled, NodeInfo, Policy};

const USERS: usize = 4;
const TAGS: usize = 3;
/// Protocols and ports that probe every distinct behaviour of the generated
/// policies (their port sets are `*`, `22`, `80,443` and `1000-2000`).
const PROTOS: [u8; 5] = [1, 6, 17, 58, 132];
const PORTS: [u16; 6] = [1, 22, 80, 443, 1000, 2001];
/// Subnet routes a generated node may serve (nested, disjoint, IPv6).
const ROUTES: [&str; 4] = [
    "198.19.50.0/24",
    "198.19.50.128/25",
    "198.19.51.0/24",
    "fd00:50::/64",
];
/// Address destinations that overlap the routes: every non-empty
/// intersection of one of these with a route holds a probe.
const ROUTE_LITERALS: [&str; 5] = [
    "198.19.50.10",
    "198.19.50.0/25",
    "198.19.0.0/16",
    "198.19.50.200/32",
    "fd00:50::/120",
];
/// Addresses probed inside the routes.
const PROBES: [&str; 4] = [
    "198.19.50.10",
    "198.19.50.200",
    "198.19.51.7",
    "fd00:50::10",
];
/// An internet address no generated route or literal covers.
const INTERNET: &str = "198.18.7.7";
/// Conditions a generated posture picks from, over the attributes that
/// [`attributes`] generates.
const CONDITIONS: [&str; 10] = [
    "custom:c == true",
    "custom:c",
    "custom:c != false",
    "custom:n >= 5",
    "custom:n IN [1, 2, 3]",
    "custom:n IS SET",
    "node:os IN ['linux', 'macos']",
    "node:os != 'windows'",
    "node:tsVersion >= '1.40'",
    "custom:c NOT SET",
];
/// Number of generated postures (`posture:q0` ...).
const POSTURES: usize = 3;

#[derive(Debug, Clone)]
struct Spec {
    groups: [Vec<usize>; 2],
    host: String,
    /// Per posture, indexes into [`CONDITIONS`] (empty: passes everyone).
    postures: [Vec<usize>; POSTURES],
    default_posture: Option<Vec<usize>>,
    entries: Vec<EntrySpec>,
    nodes: Vec<NodeSpec>,
}

#[derive(Debug, Clone)]
struct EntrySpec {
    src: Vec<String>,
    dst: Vec<(String, &'static str)>,
    proto: Option<&'static str>,
    posture: Option<Vec<usize>>,
}

#[derive(Debug, Clone)]
struct NodeSpec {
    user: Option<usize>,
    tags: Vec<usize>,
    v6: bool,
    no_addr: bool,
    routes: Vec<usize>,
    exit: bool,
    attrs: Attributes,
}

fn literal() -> impl Strategy<Value = String> {
    prop_oneof![
        (1u8..14, 28u8..=32).prop_map(|(x, len)| format!("100.64.0.{x}/{len}")),
        (1u8..14).prop_map(|x| format!("100.64.0.{x}")),
        (1u16..14, 124u8..=128).prop_map(|(x, len)| format!("fd00::{x:x}/{len}")),
    ]
}

fn alias() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("*".to_string()),
        (0..USERS).prop_map(|u| format!("u{u}@example.com")),
        (0..2usize).prop_map(|g| format!("group:g{g}")),
        (0..TAGS).prop_map(|t| format!("tag:t{t}")),
        Just("autogroup:member".to_string()),
        Just("autogroup:tagged".to_string()),
        Just("h0".to_string()),
        literal(),
    ]
}

fn dst_alias() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => alias(),
        2 => Just("autogroup:self".to_string()),
        1 => (1u16..14).prop_map(|x| format!("[fd00::{x:x}]")),
        1 => prop::sample::select(&ROUTE_LITERALS[..]).prop_map(str::to_string),
        1 => Just("autogroup:internet".to_string()),
    ]
}

fn entry() -> impl Strategy<Value = EntrySpec> {
    let ports = prop_oneof![Just("*"), Just("22"), Just("80,443"), Just("1000-2000")];
    let proto = prop_oneof![
        3 => Just(None),
        1 => Just(Some("tcp")),
        1 => Just(Some("udp")),
        1 => Just(Some("icmp")),
        1 => Just(Some("58")),
    ];
    (
        prop::collection::vec(alias(), 1..3),
        prop::collection::vec((dst_alias(), ports), 1..3),
        proto,
        posture_refs(),
    )
        .prop_map(|(mut src, mut dst, proto, posture)| {
            // autogroup:self only accepts people as sources (tags, addresses
            // and `*` are rejected at parse time).
            if dst.iter().any(|(a, _)| a == "autogroup:self") {
                src.retain(|a| {
                    a.contains('@') || a.starts_with("group:") || a == "autogroup:member"
                });
                if src.is_empty() {
                    src.push("autogroup:member".to_string());
                }
            }
            if matches!(proto, Some("icmp" | "58")) {
                for d in &mut dst {
                    d.1 = "*";
                }
            }
            EntrySpec {
                src,
                dst,
                proto,
                posture,
            }
        })
}

/// A `srcPosture` / `defaultSrcPosture` list, or none.
fn posture_refs() -> impl Strategy<Value = Option<Vec<usize>>> {
    prop::option::weighted(0.4, prop::collection::vec(0..POSTURES, 1..3))
}

/// Attributes over the keys [`CONDITIONS`] test, each maybe unset or of
/// another type; sometimes stale.
fn attributes() -> impl Strategy<Value = Attributes> {
    let value = prop_oneof![
        Just(None),
        any::<bool>().prop_map(|b| Some(AttrValue::Bool(b))),
        (0i64..7).prop_map(|n| Some(AttrValue::Int(n))),
        prop::sample::select(
            &[
                "linux",
                "macos",
                "windows",
                "1.38.4",
                "1.40",
                "1.40.0-beta",
                "1.100",
                "x"
            ][..]
        )
        .prop_map(|s| Some(AttrValue::Str(s.to_string()))),
    ];
    (prop::bool::weighted(0.85), prop::collection::vec(value, 4)).prop_map(|(fresh, values)| {
        Attributes {
            values: ["custom:c", "custom:n", "node:os", "node:tsVersion"]
                .iter()
                .zip(values)
                .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
                .collect(),
            fresh,
        }
    })
}

fn node_spec() -> impl Strategy<Value = NodeSpec> {
    (
        prop::option::weighted(0.8, 0..USERS),
        prop::collection::vec(0..TAGS, 0..2),
        any::<bool>(),
        prop::bool::weighted(0.05),
        prop::collection::vec(0..ROUTES.len(), 0..3),
        prop::bool::weighted(0.2),
        attributes(),
    )
        .prop_map(|(user, tags, v6, no_addr, routes, exit, attrs)| NodeSpec {
            user,
            tags,
            v6,
            no_addr,
            routes,
            exit,
            attrs,
        })
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        prop::collection::vec(0..USERS, 0..3),
        prop::collection::vec(0..USERS, 0..3),
        literal(),
        (
            [
                prop::collection::vec(0..CONDITIONS.len(), 0..3),
                prop::collection::vec(0..CONDITIONS.len(), 0..3),
                prop::collection::vec(0..CONDITIONS.len(), 1..3),
            ],
            posture_refs(),
        ),
        prop::collection::vec(entry(), 0..6),
        prop::collection::vec(node_spec(), 0..10),
    )
        .prop_map(
            |(g0, g1, host, (postures, default_posture), entries, nodes)| Spec {
                groups: [g0, g1],
                host,
                postures,
                default_posture,
                entries,
                nodes,
            },
        )
}

fn render(spec: &Spec) -> String {
    let users = |g: &Vec<usize>| {
        g.iter()
            .map(|u| format!("\"u{u}@example.com\","))
            .collect::<String>()
    };
    let mut s = String::from("{\n  // generated\n  \"groups\": {\n");
    for (i, g) in spec.groups.iter().enumerate() {
        s += &format!("    \"group:g{i}\": [{}],\n", users(g));
    }
    s += "  },\n  \"tagOwners\": {";
    for t in 0..TAGS {
        s += &format!("\"tag:t{t}\": [\"group:g0\"], ");
    }
    s += &format!("}},\n  \"hosts\": {{\"h0\": \"{}\"}},\n", spec.host);
    s += "  \"postures\": {\n";
    for (i, conds) in spec.postures.iter().enumerate() {
        let list: Vec<String> = conds
            .iter()
            .map(|c| format!("\"{}\"", CONDITIONS[*c]))
            .collect();
        s += &format!("    \"posture:q{i}\": [{}],\n", list.join(", "));
    }
    s += "  },\n";
    if let Some(d) = &spec.default_posture {
        s += &format!("  \"defaultSrcPosture\": [{}],\n", posture_list(d));
    }
    s += "  \"acls\": [\n";
    for e in &spec.entries {
        let src: Vec<String> = e.src.iter().map(|a| format!("\"{a}\"")).collect();
        let dst: Vec<String> = e.dst.iter().map(|(a, p)| format!("\"{a}:{p}\"")).collect();
        s += &format!(
            "    {{\"action\": \"accept\", \"src\": [{}], ",
            src.join(", ")
        );
        if let Some(p) = e.proto {
            s += &format!("\"proto\": \"{p}\", ");
        }
        if let Some(list) = &e.posture {
            s += &format!("\"srcPosture\": [{}], ", posture_list(list));
        }
        s += &format!("\"dst\": [{}]}},\n", dst.join(", "));
    }
    s += "  ],\n}\n";
    s
}

fn posture_list(list: &[usize]) -> String {
    let names: Vec<String> = list.iter().map(|p| format!("\"posture:q{p}\"")).collect();
    names.join(", ")
}

fn nodes(spec: &Spec) -> Vec<NodeInfo> {
    spec.nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let i = i as u64 + 1;
            let mut addrs = Vec::new();
            if !n.no_addr {
                addrs.push(format!("100.64.0.{i}"));
                if n.v6 {
                    addrs.push(format!("fd00::{i:x}"));
                }
            }
            let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
            let tags: Vec<String> = n.tags.iter().map(|t| format!("tag:t{t}")).collect();
            let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
            let user = n.user.map(|u| format!("u{u}@example.com"));
            let mut node = common::node(i, &format!("n{i}"), user.as_deref(), &tags, &addrs);
            node.routes = n.routes.iter().map(|r| net(ROUTES[*r])).collect();
            node.routes.sort_unstable();
            node.routes.dedup();
            node.exit_node = n.exit;
            node.posture = n.attrs.clone();
            node
        })
        .collect()
}

fn policy(spec: &Spec) -> Policy {
    let text = render(spec);
    Policy::parse("gen.hujson", &text)
        .unwrap_or_else(|e| panic!("generated policy rejected:\n{e}\n{text}"))
}

/// A prefix, or an address as a host prefix.
fn net(s: &str) -> IpNet {
    s.parse()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .expect("test prefix or address")
}

/// Whether direct evaluation allows some probed flow from `s` to `dst`.
fn any_flow_to(p: &Policy, nodes: &[NodeInfo], s: &NodeInfo, dst: &str) -> bool {
    PROTOS.iter().any(|&proto| {
        PORTS
            .iter()
            .any(|&port| p.explain(nodes, &s.name, dst, port, proto).allowed)
    })
}

/// `nodes` where only `d` serves routes (`routes`) or is an exit node
/// (`!routes`): direct evaluation then answers for `d` alone.
fn only(nodes: &[NodeInfo], d: &NodeInfo, routes: bool) -> Vec<NodeInfo> {
    nodes
        .iter()
        .cloned()
        .map(|mut n| {
            let keep = n.id == d.id;
            if !(keep && routes) {
                n.routes.clear();
            }
            n.exit_node &= keep && !routes;
            n
        })
        .collect()
}

/// What direct evaluation lets `s` reach through router or exit node `d`:
/// `d`'s routes holding an allowed probe, and the default routes when `s`
/// may reach the internet through `d`. `None` when that is nothing.
fn naive_peer_routes(
    p: &Policy,
    nodes: &[NodeInfo],
    s: &NodeInfo,
    d: &NodeInfo,
) -> Option<Vec<IpNet>> {
    if d.addresses.is_empty() {
        return None;
    }
    let with_routes = only(nodes, d, true);
    let mut out: Vec<IpNet> = d
        .routes
        .iter()
        .filter(|r| {
            PROBES
                .iter()
                .any(|a| r.contains(&net(a)) && any_flow_to(p, &with_routes, s, a))
        })
        .copied()
        .collect();
    if d.exit_node && any_flow_to(p, &only(nodes, d, false), s, INTERNET) {
        out.extend([net("0.0.0.0/0"), net("::/0")]);
    }
    out.sort_unstable();
    (!out.is_empty()).then_some(out)
}

/// Whether some probed flow from `s` to `d` (its addresses, routes or, as
/// an exit node, the internet) is allowed by direct evaluation.
fn any_flow(p: &Policy, nodes: &[NodeInfo], s: &NodeInfo, d: &NodeInfo) -> bool {
    any_flow_to(p, nodes, s, &d.name) || naive_peer_routes(p, nodes, s, d).is_some()
}

fn assert_same_views(a: &Compiled, b: &Compiled) -> Result<(), TestCaseError> {
    let ia: Vec<u64> = a.nodes().map(|n| n.id).collect();
    let ib: Vec<u64> = b.nodes().map(|n| n.id).collect();
    prop_assert_eq!(&ia, &ib);
    for id in ia {
        prop_assert_eq!(a.view(id), b.view(id), "node {}", id);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn compiled_rules_admit_exactly_what_direct_evaluation_allows(spec in spec()) {
        let p = policy(&spec);
        let nodes = nodes(&spec);
        let c = Compiled::new(p.clone(), nodes.clone());
        for s in &nodes {
            for d in &nodes {
                for proto in PROTOS {
                    for port in PORTS {
                        let naive = p.explain(&nodes, &s.name, &d.name, port, proto);
                        let compiled = common::admitted(&c, s.id, d.id, proto, port);
                        prop_assert_eq!(
                            compiled, naive.allowed,
                            "{} -> {} proto {} port {}: {}\n{}", s.name, d.name, proto, port, naive.detail, render(&spec)
                        );
                    }
                }
                if s.id == d.id {
                    continue;
                }
                // Per destination address: the naive reading of a node that
                // owns only `to` decides whether `to` may be reached.
                for to in &d.addresses {
                    let mut only = nodes.clone();
                    if let Some(n) = only.iter_mut().find(|n| n.id == d.id) {
                        n.addresses = vec![*to];
                    }
                    for proto in PROTOS {
                        for port in PORTS {
                            let naive = p.explain(&only, &s.name, &d.name, port, proto);
                            let compiled = common::admitted_at(&c, s.id, d.id, *to, proto, port);
                            prop_assert_eq!(
                                compiled, naive.allowed,
                                "{} -> {} at {} proto {} port {}: {}\n{}", s.name, d.name, to, proto, port, naive.detail, render(&spec)
                            );
                        }
                    }
                }
            }
            // Addresses behind routers and on the internet. An address in
            // no route is only reachable as internet (textual address
            // rules naming it select no node), so only the internet probe,
            // which no generated literal covers, is checked outside routes.
            let routed: Vec<IpNet> = nodes
                .iter()
                .filter(|n| !n.addresses.is_empty())
                .flat_map(|n| n.routes.clone())
                .collect();
            let probes = PROBES
                .iter()
                .filter(|a| routed.iter().any(|r| r.contains(&net(a))))
                .chain([&INTERNET]);
            for to in probes {
                let addr: IpAddr = to.parse().expect("probe");
                for proto in PROTOS {
                    for port in PORTS {
                        let naive = p.explain(&nodes, &s.name, to, port, proto);
                        let compiled = common::admitted_anywhere(&c, s.id, addr, proto, port);
                        prop_assert_eq!(
                            compiled, naive.allowed,
                            "{} -> {} proto {} port {}: {}\n{}", s.name, to, proto, port, naive.detail, render(&spec)
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn peers_are_exactly_the_nodes_with_a_flow_either_way(spec in spec()) {
        let p = policy(&spec);
        let nodes = nodes(&spec);
        let c = Compiled::new(p.clone(), nodes.clone());
        for d in &nodes {
            let want: BTreeSet<u64> = nodes
                .iter()
                .filter(|n| n.id != d.id && (any_flow(&p, &nodes, n, d) || any_flow(&p, &nodes, d, n)))
                .map(|n| n.id)
                .collect();
            let view = c.view(d.id).expect("view for every node");
            prop_assert_eq!(&view.peers, &want, "peers of {}\n{}", d.name, render(&spec));
            let want_routes: BTreeMap<u64, Vec<IpNet>> = nodes
                .iter()
                .filter(|r| r.id != d.id)
                .filter_map(|r| naive_peer_routes(&p, &nodes, d, r).map(|v| (r.id, v)))
                .collect();
            prop_assert_eq!(&view.peer_routes, &want_routes, "peer routes of {}\n{}", d.name, render(&spec));
            for peer in &view.peers {
                prop_assert!(c.view(*peer).expect("peer view").peers.contains(&d.id), "asymmetric");
            }
        }
    }

    #[test]
    fn incremental_updates_match_a_full_recompile(
        spec in spec(),
        initial in 0usize..10,
        ops in prop::collection::vec((0u8..3, 0usize..10, node_spec()), 0..12),
    ) {
        let p = policy(&spec);
        let all = nodes(&spec);
        let initial = initial.min(all.len());
        let mut c = Compiled::new(p.clone(), all[..initial].to_vec());
        let mut steps: Vec<(u8, NodeInfo)> = all[initial..].iter().map(|n| (1, n.clone())).collect();
        for (kind, i, ns) in ops {
            // Remove (0) or upsert (1) an existing or fresh id with new
            // attributes, or (2) change only the posture attributes of
            // a node when it is applied.
            let mut one = spec.clone();
            one.nodes = vec![ns; i + 1];
            let n = nodes(&one).pop().expect("one node");
            steps.push((kind, n));
        }
        for (kind, mut n) in steps {
            if kind == 2 {
                let Some(old) = c.nodes().find(|x| x.id == n.id) else {
                    continue;
                };
                n = NodeInfo { posture: n.posture, ..old.clone() };
            }
            let upsert = kind != 0;
            let before: Vec<(u64, Option<ztmesh_policy::NodeView>)> =
                c.nodes().map(|x| (x.id, c.view(x.id).cloned())).collect();
            let id = n.id;
            let changed = if upsert { c.upsert_node(n) } else { c.remove_node(id) };
            let full = Compiled::new(p.clone(), c.nodes().cloned().collect());
            assert_same_views(&c, &full)?;
            let mut want: BTreeSet<u64> = before
                .iter()
                .filter(|(x, v)| c.view(*x) != v.as_ref())
                .map(|(x, _)| *x)
                .collect();
            if upsert {
                want.insert(id);
            }
            prop_assert_eq!(changed, want);
        }
        let mut d = Compiled::new(Policy::empty(), c.nodes().cloned().collect());
        d.set_policy(p);
        assert_same_views(&c, &d)?;
    }

    #[test]
    fn compilation_is_independent_of_node_order(spec in spec(), seed in any::<u64>()) {
        let p = policy(&spec);
        let mut ns = nodes(&spec);
        let a = Compiled::new(p.clone(), ns.clone());
        // Deterministic shuffle from the seed.
        let mut x = seed | 1;
        for i in (1..ns.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ns.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let b = Compiled::new(p, ns);
        assert_same_views(&a, &b)?;
    }
}

/// Fragments that make near-valid policies, so mutations reach deep code.
const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"",
    "//",
    "/*",
    "*/",
    "\n",
    " ",
    "\\u",
    "\\",
    "-",
    "0",
    "1e9",
    "\"acls\"",
    "\"src\"",
    "\"dst\"",
    "\"action\"",
    "\"accept\"",
    "\"tests\"",
    "\"accept\":",
    "\"groups\"",
    "\"group:a\"",
    "\"tagOwners\"",
    "\"tag:x\"",
    "\"hosts\"",
    "\"h\"",
    "\"*:*\"",
    "\"tag:x:22\"",
    "\"[fd00::1]:80\"",
    "\"fd00::/64:1-2\"",
    "\"a@b\"",
    "\"100.64.0.1\"",
    "\"proto\"",
    "\"icmp\"",
    "\"autogroup:self:*\"",
    "true",
    "null",
    "é",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn parse_never_panics_and_errors_are_one_line_each(parts in prop::collection::vec(prop::sample::select(TOKENS), 0..60)) {
        let text: String = parts.concat();
        match Policy::check("f.hujson", &text) {
            Ok(p) => {
                let c = Compiled::new(p, Vec::new());
                prop_assert_eq!(c.nodes().count(), 0);
            }
            Err(e) => {
                prop_assert!(!e.diagnostics().is_empty());
                for line in e.to_string().lines() {
                    prop_assert!(line.starts_with("f.hujson:"), "{}", line);
                }
            }
        }
    }
}
