//! The core's contract: after any sequence of changes, every node's map is
//! the one a full rebuild from the same facts gives, and every node whose
//! map changed is in the change set the coordinator publishes to.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;

use super::*;

const T0: UnixMs = 1_800_000_000_000;
const SERIAL: u64 = 7;
const IDS: u64 = 8;

const PRELUDE: &str = r#"
  "groups": {"group:eng": ["alice@example.com", "bob@example.com"]},
  "tagOwners": {"tag:a": [], "tag:b": ["group:eng"]},
"#;

/// The policies a sequence switches between: deny all, tagged servers,
/// people to their own devices and to servers, everyone to everything.
const ACLS: [&str; 7] = [
    "",
    r#"{"action": "accept", "src": ["tag:a"], "dst": ["tag:a:22,443"]}"#,
    r#"{"action": "accept", "src": ["group:eng"], "dst": ["autogroup:self:*"]},
       {"action": "accept", "src": ["alice@example.com"], "dst": ["tag:b:80"]}"#,
    r#"{"action": "accept", "src": ["*"], "dst": ["*:*"]}"#,
    r#"{"action": "accept", "src": ["tag:b"], "dst": ["tag:a:80", "100.64.0.3:22"]},
       {"action": "accept", "src": ["bob@example.com"], "proto": "icmp", "dst": ["tag:a:*"]}"#,
    r#"{"action": "accept", "src": ["alice@example.com"], "dst": ["198.19.50.0/25:443", "autogroup:internet:*"]},
       {"action": "accept", "src": ["tag:b"], "dst": ["198.19.51.0/24:22"]}"#,
    // With a split DNS route (see `policy`).
    r#"{"action": "accept", "src": ["tag:a"], "dst": ["tag:a:22,443"]}"#,
];

/// The routes a node advertises (all approved): bit 0 198.19.50.0/24, bit 1
/// 198.19.51.0/24, bit 2 the exit-node role.
fn node_routes(bits: u8) -> crate::model::NodeRoutes {
    let mut advertised = Vec::new();
    if bits & 1 != 0 {
        advertised.push("198.19.50.0/24".parse().unwrap());
    }
    if bits & 2 != 0 {
        advertised.push("198.19.51.0/24".parse().unwrap());
    }
    crate::model::NodeRoutes {
        approved: advertised.clone(),
        advertised,
        exit_advertised: bits & 4 != 0,
        exit_approved: bits & 4 != 0,
    }
}

fn policy(i: usize) -> Policy {
    let dns = if i % ACLS.len() == 6 {
        r#", "dns": {"split": {"example.corp": ["198.19.50.53"]}}"#
    } else {
        ""
    };
    let text = format!("{{{PRELUDE} \"acls\": [{}]{dns}}}", ACLS[i % ACLS.len()]);
    Policy::parse("p.hujson", &text).expect("test policy parses")
}

fn cfg() -> CoreConfig {
    CoreConfig {
        netmap_ttl_ms: 3_600_000,
        dns_domain: "ztmesh.internal".into(),
        persistent_keepalive: 25,
        relays: vec![],
        posture_ttl_ms: 60_000,
        controllers: vec![],
    }
}

/// Who owns a node: alice, bob, tag:a, tag:b, or both tags.
fn owner(o: u8) -> (Option<String>, Vec<String>) {
    match o % 5 {
        0 => (Some("alice@example.com".into()), vec![]),
        1 => (Some("bob@example.com".into()), vec![]),
        2 => (None, vec!["tag:a".into()]),
        3 => (None, vec!["tag:b".into()]),
        _ => (None, vec!["tag:a".into(), "tag:b".into()]),
    }
}

fn expiry(e: Option<i8>) -> UnixMs {
    e.map_or(0, |k| T0 + i64::from(k) * 1000)
}

fn row(id: u64, o: u8, e: Option<i8>) -> NodeRow {
    let (user, tags) = owner(o);
    NodeRow {
        id,
        name: format!("n{id}"),
        hostname: format!("n{id}"),
        machine_key: [id as u8; 32],
        wg_key: [id as u8 + 100; 32],
        ipv4: Ipv4Addr::new(100, 64, 0, id as u8),
        ipv6: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, id as u16),
        user,
        tags,
        ephemeral: false,
        created_ms: T0,
        last_seen_ms: T0,
        expiry_ms: expiry(e),
        endpoints: vec![],
        key_revoked: false,
        routes: Default::default(),
        posture: Default::default(),
        quarantine: None,
    }
}

#[derive(Debug, Clone)]
enum Op {
    Join {
        id: u64,
        owner: u8,
        expiry: Option<i8>,
    },
    Leave(u64),
    Rename(u64, u8),
    Retag(u64, u8),
    Rekey(u64, u8),
    Endpoints(u64, u8),
    Expiry(u64, Option<i8>),
    /// An admin expires the key at the current clock.
    Revoke(u64),
    Policy(usize),
    /// Seconds the clock moves, forward or back.
    Clock(i8),
    /// Advertised and approved routes ([`node_routes`]).
    Routes(u64, u8),
    /// A node connects or goes away.
    Online(u64, bool),
    /// A detector quarantines the node (`true`) or an admin releases it.
    Quarantine(u64, bool),
}

fn op() -> impl Strategy<Value = Op> {
    let id = 1..=IDS;
    let exp = proptest::option::of(-3i8..6);
    prop_oneof![
        4 => (id.clone(), any::<u8>(), exp.clone())
            .prop_map(|(id, owner, expiry)| Op::Join { id, owner, expiry }),
        2 => id.clone().prop_map(Op::Leave),
        1 => (id.clone(), any::<u8>()).prop_map(|(id, n)| Op::Rename(id, n)),
        2 => (id.clone(), any::<u8>()).prop_map(|(id, o)| Op::Retag(id, o)),
        1 => (id.clone(), any::<u8>()).prop_map(|(id, k)| Op::Rekey(id, k)),
        2 => (id.clone(), 0u8..4).prop_map(|(id, e)| Op::Endpoints(id, e)),
        2 => (id.clone(), exp).prop_map(|(id, e)| Op::Expiry(id, e)),
        1 => id.clone().prop_map(Op::Revoke),
        2 => (0..ACLS.len()).prop_map(Op::Policy),
        2 => (-4i8..5).prop_map(Op::Clock),
        3 => (id.clone(), 0u8..8).prop_map(|(id, r)| Op::Routes(id, r)),
        3 => (id.clone(), any::<bool>()).prop_map(|(id, on)| Op::Online(id, on)),
        2 => (id, any::<bool>()).prop_map(|(id, q)| Op::Quarantine(id, q)),
    ]
}

/// The facts, kept the simple way: a map of rows, a policy, a clock.
struct Model {
    nodes: BTreeMap<u64, NodeRow>,
    policy: usize,
    clock: UnixMs,
    online: BTreeSet<u64>,
    /// The primaries as [`routes::primaries`] chooses them step by step.
    primaries: BTreeMap<IpNet, u64>,
}

impl Model {
    /// Applies `op` to the model; returns the change the coordinator would
    /// hand the core, or `None` for an op on a node that is not there.
    fn step(&mut self, op: &Op) -> Option<Change> {
        let edit = |m: &mut Model, id: u64, f: &dyn Fn(&mut NodeRow)| {
            let n = m.nodes.get_mut(&id)?;
            f(n);
            Some(Change::Upsert(n.clone()))
        };
        match *op {
            Op::Join { id, owner, expiry } => {
                let r = row(id, owner, expiry);
                self.nodes.insert(id, r.clone());
                Some(Change::Upsert(r))
            }
            Op::Leave(id) => self.nodes.remove(&id).map(|_| Change::Remove(id)),
            Op::Rename(id, n) => edit(self, id, &|r| r.name = format!("n{id}-{n}")),
            Op::Retag(id, o) => edit(self, id, &|r| (r.user, r.tags) = owner(o)),
            Op::Rekey(id, k) => edit(self, id, &|r| r.wg_key = [k; 32]),
            Op::Expiry(id, e) => edit(self, id, &|r| r.expiry_ms = expiry(e)),
            Op::Revoke(id) => {
                let at = self.clock;
                edit(self, id, &|r| {
                    r.expiry_ms = at;
                    r.key_revoked = true;
                })
            }
            Op::Endpoints(id, e) => {
                let n = self.nodes.get_mut(&id)?;
                let endpoints: Vec<String> = (0..e)
                    .map(|i| format!("198.18.0.{}:51820", i + 1))
                    .collect();
                n.endpoints = endpoints.clone();
                Some(Change::Endpoints {
                    node: id,
                    endpoints,
                })
            }
            Op::Policy(i) => {
                self.policy = i;
                Some(Change::Policy(policy(i)))
            }
            Op::Clock(s) => {
                self.clock = self.clock.saturating_add(i64::from(s) * 1000);
                Some(Change::Clock(self.clock))
            }
            Op::Routes(id, r) => edit(self, id, &|n| n.routes = node_routes(r)),
            Op::Quarantine(id, q) => {
                let at = self.clock;
                edit(self, id, &|n| {
                    n.quarantine = q.then(|| crate::model::Quarantine {
                        since_ms: at,
                        reason: "scan_ports (detection 1)".into(),
                    })
                })
            }
            Op::Online(node, online) => {
                if online {
                    self.online.insert(node);
                } else {
                    self.online.remove(&node);
                }
                Some(Change::Online { node, online })
            }
        }
    }

    /// After a step: the primaries follow the routers that are active now.
    fn reroute(&mut self) {
        let approved = approved_routes(self.nodes.values(), self.clock);
        self.primaries = routes::primaries(&approved, &self.online, &self.primaries);
    }

    fn rebuild(&self) -> NetCore {
        NetCore::with_routing(
            cfg(),
            policy(self.policy),
            self.nodes.values().cloned(),
            self.clock,
            self.online.clone(),
            &self.primaries,
        )
    }
}

fn maps(core: &NetCore, now: UnixMs) -> Vec<Option<Vec<u8>>> {
    (1..=IDS).map(|id| core.encode(id, SERIAL, now)).collect()
}

/// Each node's view at `now`: its map without the issue time and validity
/// end, which change with every clock tick for every node. A node whose view
/// is the same need not be sent a new map.
fn views(core: &NetCore, now: UnixMs) -> Vec<Option<NetMap>> {
    (1..=IDS)
        .map(|id| {
            core.netmap(id, SERIAL, now).map(|m| NetMap {
                issued_at_ms: 0,
                not_after_ms: 0,
                ..m
            })
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn incremental_changes_equal_a_full_rebuild(ops in proptest::collection::vec(op(), 1..40)) {
        let mut model = Model {
            nodes: BTreeMap::new(),
            policy: 1,
            clock: T0,
            online: BTreeSet::new(),
            primaries: BTreeMap::new(),
        };
        let mut core = model.rebuild();
        for (step, op) in ops.iter().enumerate() {
            let before = views(&core, model.clock);
            let Some(change) = model.step(op) else { continue };
            model.reroute();
            let changed = core.apply(change);
            prop_assert_eq!(core.primaries(), &model.primaries, "step {} ({:?})", step, op);
            let after = views(&core, model.clock);
            let full = maps(&model.rebuild(), model.clock);
            prop_assert_eq!(&maps(&core, model.clock), &full, "step {} ({:?}): incremental != rebuild", step, op);
            for id in 1..=IDS {
                let i = usize::try_from(id - 1).unwrap();
                prop_assert!(
                    before[i] == after[i] || changed.contains(&id),
                    "step {} ({:?}): node {}'s map changed but it is not in {:?}",
                    step, op, id, changed
                );
            }
        }
    }
}

fn core_with(nodes: &[NodeRow], acls: usize) -> NetCore {
    NetCore::new(cfg(), policy(acls), nodes.iter().cloned(), T0)
}

#[test]
fn an_endpoint_report_reaches_exactly_the_nodes_that_list_the_reporter() {
    // tag:a nodes 1, 2 see each other; tag:b node 3 sees nobody under ACLS[1].
    let mut core = core_with(&[row(1, 2, None), row(2, 2, None), row(3, 3, None)], 1);
    let changed = core.apply(Change::Endpoints {
        node: 1,
        endpoints: vec!["198.18.0.1:51820".into()],
    });
    assert_eq!(
        changed,
        BTreeSet::from([2]),
        "its own map does not show its endpoints"
    );
    let map = core.netmap(2, SERIAL, T0).unwrap();
    assert_eq!(map.peers[0].endpoints, vec!["198.18.0.1:51820".to_string()]);
    // The same report again changes nothing.
    let again = core.apply(Change::Endpoints {
        node: 1,
        endpoints: vec!["198.18.0.1:51820".into()],
    });
    assert!(again.is_empty());
}

#[test]
fn a_node_that_leaves_is_told_and_disappears_from_its_peers() {
    let mut core = core_with(&[row(1, 2, None), row(2, 2, None), row(3, 3, None)], 1);
    let changed = core.apply(Change::Remove(2));
    assert_eq!(changed, BTreeSet::from([1, 2]));
    assert!(core.encode(2, SERIAL, T0).is_none());
    assert!(core.netmap(1, SERIAL, T0).unwrap().peers.is_empty());
    assert!(core.apply(Change::Remove(2)).is_empty(), "twice is nothing");
}

#[test]
fn expiry_follows_the_clock_both_ways() {
    let mut core = core_with(&[row(1, 2, Some(2)), row(2, 2, None)], 1);
    assert_eq!(core.netmap(2, SERIAL, T0).unwrap().peers.len(), 1);
    let changed = core.apply(Change::Clock(T0 + 3_000));
    assert_eq!(changed, BTreeSet::from([1, 2]), "expired, and its peer");
    assert!(core.encode(1, SERIAL, T0 + 3_000).is_none());
    assert!(core.netmap(2, SERIAL, T0 + 3_000).unwrap().peers.is_empty());
    // The clock goes back: the key is valid again.
    let changed = core.apply(Change::Clock(T0));
    assert_eq!(changed, BTreeSet::from([1, 2]));
    assert_eq!(core.netmap(2, SERIAL, T0).unwrap().peers.len(), 1);
    assert!(
        core.apply(Change::Clock(T0 + 1)).is_empty(),
        "nothing flips"
    );
}

#[test]
fn a_revoked_key_stays_expired_when_the_clock_goes_back() {
    let mut core = core_with(&[row(1, 2, None), row(2, 2, None)], 1);
    let revoked = NodeRow {
        expiry_ms: T0 + 60_000,
        key_revoked: true,
        ..row(1, 2, None)
    };
    assert_eq!(core.apply(Change::Upsert(revoked)), BTreeSet::from([1, 2]));
    assert!(core.apply(Change::Clock(T0 - 60_000)).is_empty());
    assert!(core.encode(1, SERIAL, T0 - 60_000).is_none());
    assert!(core
        .netmap(2, SERIAL, T0 - 60_000)
        .unwrap()
        .peers
        .is_empty());
}

#[test]
fn a_quarantined_node_vanishes_from_every_map_and_its_own_is_empty() {
    let mut core = core_with(&[row(1, 2, None), row(2, 2, None), row(3, 2, None)], 1);
    let quarantined = NodeRow {
        quarantine: Some(crate::model::Quarantine {
            since_ms: T0,
            reason: "scan_ports (detection 7)".into(),
        }),
        ..row(1, 2, None)
    };
    assert_eq!(
        core.apply(Change::Upsert(quarantined)),
        BTreeSet::from([1, 2, 3]),
        "the node and both its peers"
    );
    let own = core.netmap(1, SERIAL, T0).expect("it still gets a map");
    assert!(own.peers.is_empty() && own.inbound_rules.is_empty());
    let q = own.quarantine.expect("the map says why");
    assert_eq!(
        (q.since_ms, q.reason.as_str()),
        (T0, "scan_ports (detection 7)")
    );
    for other in [2, 3] {
        let map = core.netmap(other, SERIAL, T0).unwrap();
        assert_eq!(map.peers.iter().map(|p| p.id).collect::<Vec<_>>().len(), 1);
        assert!(map.peers.iter().all(|p| p.id != 1), "{other} still lists 1");
        assert!(map.quarantine.is_none());
    }
    // The clock moving does not let it back in; a release does.
    assert!(core.apply(Change::Clock(T0 + 1_000)).is_empty());
    assert_eq!(
        core.apply(Change::Upsert(row(1, 2, None))),
        BTreeSet::from([1, 2, 3])
    );
    assert_eq!(core.netmap(1, SERIAL, T0).unwrap().peers.len(), 2);
}

#[test]
fn maps_are_prosts_own_encoding_and_end_at_the_key_expiry() {
    let core = core_with(&[row(1, 2, Some(5)), row(2, 2, None), row(3, 2, None)], 1);
    let body = core.encode(1, SERIAL, T0).unwrap();
    let map = NetMap::decode(body.as_slice()).unwrap();
    assert_eq!(map.encode_to_vec(), body, "byte-identical to prost");
    assert_eq!(map.serial, SERIAL);
    assert_eq!(map.not_after_ms, T0 + 5_000, "capped by the key expiry");
    let peers: Vec<u64> = map.peers.iter().map(|p| p.id).collect();
    assert_eq!(peers, vec![2, 3], "sorted by id");
    assert_eq!(
        map.inbound_rules.len(),
        2,
        "TCP/UDP on 22, 443 and ICMP: {:?}",
        map.inbound_rules
    );
    let map = core.netmap(2, SERIAL, T0).unwrap();
    assert_eq!(
        map.not_after_ms,
        T0 + 3_600_000,
        "the TTL without a key expiry"
    );
}

#[test]
fn every_map_lists_the_relays_and_stays_prosts_encoding() {
    let relay = pb::Relay {
        name: "r1".into(),
        quic_addr: "198.18.0.9:7443".into(),
        tcp_addr: "198.18.0.9:443".into(),
        stun_addrs: vec!["198.18.0.9:3478".into()],
        cert_sha256: vec![7; 32],
    };
    let controllers = vec![
        "https://[fd00::1]:8443".to_string(),
        "https://[fd00::2]:8443".into(),
    ];
    let cfg = CoreConfig {
        relays: vec![relay.clone()],
        controllers: controllers.clone(),
        ..cfg()
    };
    let core = NetCore::new(cfg, policy(1), [row(1, 2, None), row(2, 2, None)], T0);
    for id in [1, 2] {
        let body = core.encode(id, SERIAL, T0).unwrap();
        let map = NetMap::decode(body.as_slice()).unwrap();
        assert_eq!(map.encode_to_vec(), body, "byte-identical to prost");
        assert_eq!(map.relays, vec![relay.clone()]);
        assert_eq!(map.controllers, controllers);
    }
}

fn router(id: u64, bits: u8) -> NodeRow {
    NodeRow {
        routes: node_routes(bits),
        ..row(id, 3, None)
    }
}

fn allowed(core: &NetCore, viewer: u64, peer: u64) -> Vec<String> {
    core.netmap(viewer, SERIAL, T0)
        .unwrap()
        .peers
        .into_iter()
        .find(|p| p.id == peer)
        .map(|p| p.allowed_ips)
        .unwrap_or_default()
}

#[test]
fn a_router_entry_lists_the_routes_each_viewer_may_reach_and_nothing_else() {
    // ACLS[5]: alice may reach 198.19.50.0/25:443 and the internet; tag:b
    // may reach 198.19.51.0/24:22. Node 2 (tag:b) routes both /24s and is an
    // exit node.
    let alice = row(1, 0, None);
    let bob = row(3, 1, None);
    let core = core_with(&[alice, router(2, 7), bob, row(4, 3, None)], 5);
    assert_eq!(
        allowed(&core, 1, 2),
        [
            "100.64.0.2/32",
            "fd00::2/128",
            "0.0.0.0/0",
            "198.19.50.0/24",
            "::/0"
        ],
        "the whole route alice reaches part of, and the exit node"
    );
    assert_eq!(
        allowed(&core, 4, 2),
        ["100.64.0.2/32", "fd00::2/128", "198.19.51.0/24"],
        "tag:b: its route only, no internet"
    );
    assert!(
        allowed(&core, 3, 2).is_empty(),
        "bob has no rule: not a peer"
    );
    let me = core.netmap(2, SERIAL, T0).unwrap();
    let node = me.self_node.unwrap();
    assert_eq!(node.routes, ["198.19.50.0/24", "198.19.51.0/24"]);
    assert!(node.exit_node);
    let rule = me
        .inbound_rules
        .iter()
        .find(|r| r.src_prefixes.contains(&"100.64.0.1/32".to_string()) && r.ports[0].first == 443)
        .expect("alice's rule reaches the router");
    assert_eq!(
        rule.dst_prefixes,
        ["198.19.50.0/25"],
        "only the granted part"
    );
}

#[test]
fn a_route_fails_over_to_an_online_router_and_stays_there() {
    let alice = row(1, 0, None);
    let mut core = core_with(&[alice, router(2, 1), router(3, 1)], 5);
    assert_eq!(core.primaries().values().collect::<Vec<_>>(), [&2]);
    assert_eq!(allowed(&core, 1, 2).len(), 3);
    assert_eq!(allowed(&core, 1, 3).len(), 0, "not a peer: serves nothing");
    // Both connect; 2 stays primary.
    assert!(core
        .apply(Change::Online {
            node: 2,
            online: true
        })
        .is_empty());
    assert!(core
        .apply(Change::Online {
            node: 3,
            online: true
        })
        .is_empty());
    // 2 goes away: 3 takes over, and alice, 2 and 3 get new maps.
    let changed = core.apply(Change::Online {
        node: 2,
        online: false,
    });
    assert_eq!(changed, BTreeSet::from([1, 2, 3]));
    assert_eq!(allowed(&core, 1, 3)[2], "198.19.50.0/24");
    assert_eq!(
        core.netmap(3, SERIAL, T0)
            .unwrap()
            .self_node
            .unwrap()
            .routes,
        ["198.19.50.0/24"]
    );
    assert!(core
        .netmap(2, SERIAL, T0)
        .unwrap()
        .self_node
        .unwrap()
        .routes
        .is_empty());
    // 2 returns: no flap back.
    assert!(core
        .apply(Change::Online {
            node: 2,
            online: true
        })
        .is_empty());
    assert_eq!(core.primaries().values().collect::<Vec<_>>(), [&3]);
    // Approval withdrawn from 3: back to 2 at once.
    let changed = core.apply(Change::Upsert(router(3, 0)));
    assert!(changed.contains(&1) && changed.contains(&2));
    assert_eq!(core.primaries().values().collect::<Vec<_>>(), [&2]);
}

#[test]
fn a_split_dns_change_reaches_every_map_and_stays_prosts_encoding() {
    let mut core = core_with(&[row(1, 2, None), row(2, 2, None), row(3, 3, None)], 1);
    // ACLS[6] has ACLS[1]'s rule and a split DNS route: every node is told.
    let changed = core.apply(Change::Policy(policy(6)));
    assert_eq!(changed, BTreeSet::from([1, 2, 3]));
    let body = core.encode(3, SERIAL, T0).unwrap();
    let map = NetMap::decode(body.as_slice()).unwrap();
    assert_eq!(map.encode_to_vec(), body, "byte-identical to prost");
    assert_eq!(
        map.split_dns,
        vec![pb::SplitDns {
            suffix: "example.corp".into(),
            resolvers: vec!["198.19.50.53:53".into()],
        }]
    );
    assert!(
        core.apply(Change::Policy(policy(6))).is_empty(),
        "same policy"
    );
}

#[test]
fn a_group_rules_sources_are_formatted_once_and_dropped_with_the_rule() {
    // tag:a nodes 1, 2, 4 share one rule source under ACLS[1].
    let mut core = core_with(
        &[
            row(1, 2, None),
            row(2, 2, None),
            row(3, 3, None),
            row(4, 2, None),
        ],
        1,
    );
    let cached = |core: &NetCore| core.sources.0.lock().unwrap().len();
    let first: Vec<Vec<u8>> = [1, 2, 4]
        .iter()
        .map(|&id| core.encode(id, SERIAL, T0).unwrap())
        .collect();
    assert_eq!(cached(&core), 1, "one shared source, encoded once");
    // The cached bytes are prost's own encoding of the rule.
    for body in &first {
        let map = NetMap::decode(body.as_slice()).unwrap();
        assert_eq!(map.encode_to_vec(), *body, "byte-identical to prost");
        assert_eq!(
            map.inbound_rules[0].src_prefixes,
            vec![
                "100.64.0.1/32",
                "100.64.0.2/32",
                "100.64.0.4/32",
                "fd00::1/128",
                "fd00::2/128",
                "fd00::4/128"
            ],
        );
    }
    // Node 2 leaves tag:a: the group's source changes; the old one is no
    // longer held by any view and leaves the cache with the change.
    core.apply(Change::Upsert(row(2, 3, None)));
    assert_eq!(cached(&core), 0, "pruned with the change");
    let map = NetMap::decode(core.encode(1, SERIAL, T0).unwrap().as_slice()).unwrap();
    assert_eq!(
        map.inbound_rules[0].src_prefixes,
        vec![
            "100.64.0.1/32",
            "100.64.0.4/32",
            "fd00::1/128",
            "fd00::4/128"
        ],
        "the new source, not the cached old one"
    );
    assert_eq!(cached(&core), 1);
}
