//! Compilation of a policy against a node set into per-node views (peer set
//! and inbound rules), with incremental updates (pure: no I/O).
//!
//! Index structures, so that neither a full compile nor a node join loops
//! over node pairs:
//! - a selector index (user / tag / autogroup / prefix → ACL entries), so a
//!   node's *membership* (the entries whose src or dst select it) costs a few
//!   hash lookups;
//! - per entry, the node sets its src selects (`src_all`, and `src_named` for
//!   nodes selected by identity rather than address) and its dst selects,
//!   plus its aggregated source prefixes;
//! - per user, the untagged nodes it owns (for `autogroup:self`).
//!
//! A node's view depends only on its membership, so views are computed once
//! per distinct membership ("class": e.g. all `tag:web` servers) and cloned.
//! A node's peers are the union of the `src_all` sets of the entries that
//! target it and of the dst sets of the entries whose src selects it.
//! Its peer routes come from the (few) routers and exit nodes among them:
//! per router, the destination scopes of the entries whose src selects the
//! node.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::eval::owner;
use crate::policy::{proto_has_ports, Entry, Policy, PortRange, SelKind};
use crate::routes::{default_routes, internet_prefixes, intersect};
use crate::NodeInfo;

/// One inbound filter rule of a node: traffic from `src` to one of `dst` on
/// one of `protocols` and `ports` is allowed.
///
/// `dst` holds what of the node the ACL entry's destination selects: its
/// own addresses for a named destination (`tag:web:443`, a user,
/// `autogroup:self`); its addresses and subnet routes for `*`; for an
/// address destination (`100.64.0.5:22`, `198.19.50.10/32:443`), its
/// addresses inside the prefix plus the intersection of each route with the
/// prefix; the internet prefix set for `autogroup:internet` on an exit
/// node. A receiver delivers (or forwards) nothing else.
///
/// `ports` only restrict protocols that carry ports (TCP, UDP, SCTP); a rule
/// whose protocols include others (ICMP) always has `ports == [0-65535]`,
/// because the compiler splits port-less protocols into their own rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InboundRule {
    /// Source prefixes, sorted and aggregated (no overlaps). Shared by
    /// every rule that comes from the same ACL entry (all nodes a group
    /// rule reaches hold one copy), so a view costs a pointer here.
    pub src: Arc<[IpNet]>,
    /// Destination prefixes: this node's addresses (host prefixes), parts
    /// of its routes, or the internet set; sorted.
    pub dst: Vec<IpNet>,
    /// IP protocol numbers, sorted.
    pub protocols: Vec<u8>,
    /// Destination port ranges, sorted and merged.
    pub ports: Vec<PortRange>,
    /// `FILE:LINE` of the ACL entry this rule comes from.
    pub rule_id: String,
}

/// What one node receives: who it may talk to, and what may reach it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeView {
    /// Nodes with at least one permitted flow to or from this node.
    pub peers: BTreeSet<u64>,
    /// Inbound rules, in ACL order.
    pub inbound: Vec<InboundRule>,
    /// Per peer that is a subnet router or exit node: the whole routes
    /// through which this node may reach at least one address under some
    /// rule, sorted; plus `0.0.0.0/0` and `::/0` when this node may use the
    /// peer as an exit node (the node routes those only through the exit
    /// node its user chose). Peers reached only at their own addresses have
    /// no entry.
    pub peer_routes: BTreeMap<u64, Vec<IpNet>>,
}

impl NodeView {
    /// The first inbound rule admitting a packet from `src` to `dst`, if any.
    ///
    /// A reference for the node's packet filter (which compiles the rules
    /// into its own lookup structure); the port is ignored for protocols
    /// without ports.
    pub fn admits(&self, src: IpAddr, dst: IpAddr, proto: u8, port: u16) -> Option<&InboundRule> {
        self.inbound.iter().find(|r| {
            r.protocols.contains(&proto)
                && (!proto_has_ports(proto) || r.ports.iter().any(|p| p.contains(port)))
                && r.src.iter().any(|n| n.contains(&src))
                && r.dst.iter().any(|n| n.contains(&dst))
        })
    }
}

/// A policy compiled against a node set: every node's [`NodeView`], kept up
/// to date incrementally as nodes join, change and leave.
#[derive(Debug, Clone)]
pub struct Compiled {
    policy: Policy,
    index: Index,
    nodes: BTreeMap<u64, NodeInfo>,
    members: HashMap<u64, Membership>,
    /// Per entry: nodes its src selects (by identity or by address).
    src_all: Vec<BTreeSet<u64>>,
    /// Per entry: nodes its src selects by identity (user, group, tag,
    /// autogroup); their addresses go into the entry's source prefixes.
    src_named: Vec<BTreeSet<u64>>,
    /// Per entry: nodes its non-`autogroup:self` destinations select.
    dst: Vec<BTreeSet<u64>>,
    /// Per entry: aggregated source prefixes (named nodes' addresses plus literals).
    prefixes: Vec<Arc<[IpNet]>>,
    /// Untagged nodes (with addresses) per owning user.
    user_nodes: HashMap<String, BTreeSet<u64>>,
    /// Nodes with subnet routes or approved as exit nodes.
    routers: BTreeSet<u64>,
    views: BTreeMap<u64, NodeView>,
}

/// Which entries select a node, and how: everything a view depends on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Membership {
    /// Entries whose src selects the node; `true` when selected by identity.
    src: Vec<(u32, bool)>,
    inbound: InKey,
    outbound: OutKey,
    owner: Option<String>,
}

/// What of a node a group of destination elements selects (see
/// [`InboundRule::dst`]); [`scope_dst`] turns it into prefixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Scope {
    /// The node's own addresses: a named selector, or `*` on a node without
    /// routes (so that its rules are what they were before routes existed).
    Own,
    /// Own addresses and routes: `*` on a subnet router.
    All,
    /// Own addresses and route parts inside the prefix.
    Prefix(IpNet),
    /// The internet prefix set: `autogroup:internet` on an exit node.
    Internet,
}

/// The part of a membership that determines inbound rules and inbound peers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
struct InKey {
    /// Entries whose regular dst selects the node, per destination scope,
    /// with the merged ports.
    dst: Vec<(u32, Scope, Vec<PortRange>)>,
    /// Entries whose `autogroup:self` dst applies to the node, with ports
    /// (scope: all the node's addresses).
    self_dst: Vec<(u32, Scope, Vec<PortRange>)>,
    /// The owner, when `self_dst` is not empty.
    self_owner: Option<String>,
}

/// The part of a membership that determines outbound peers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
struct OutKey {
    src: Vec<u32>,
    /// The owner, when one of `src` has an `autogroup:self` destination.
    self_owner: Option<String>,
}

/// Selector → entries, for one side (src or dst) of the ACL list.
#[derive(Debug, Clone, Default)]
struct SelIndex<T> {
    any: Vec<T>,
    users: HashMap<String, Vec<T>>,
    tags: HashMap<String, Vec<T>>,
    member: Vec<T>,
    tagged: Vec<T>,
    prefix: Vec<(IpNet, T)>,
    self_nodes: Vec<T>,
    internet: Vec<T>,
}

impl<T: Copy> SelIndex<T> {
    fn add(&mut self, kind: &SelKind, t: T) {
        match kind {
            SelKind::Any => self.any.push(t),
            SelKind::Users(users) => {
                for u in users {
                    self.users.entry(u.clone()).or_default().push(t);
                }
            }
            SelKind::Tag(tag) => self.tags.entry(tag.clone()).or_default().push(t),
            SelKind::Member => self.member.push(t),
            SelKind::Tagged => self.tagged.push(t),
            SelKind::Prefix(p) => self.prefix.push((*p, t)),
            SelKind::SelfNodes => self.self_nodes.push(t),
            SelKind::Internet => self.internet.push(t),
        }
    }

    /// Calls `f(t, by_identity)` for every selector selecting `node`
    /// (`autogroup:self` excluded). On the destination side (`dst`), a
    /// prefix also selects a node by its routes, and `autogroup:internet`
    /// selects exit nodes.
    fn each_match(&self, node: &NodeInfo, dst: bool, mut f: impl FnMut(T, bool)) {
        for &t in &self.any {
            f(t, false);
        }
        if let Some(user) = owner(node) {
            for &t in self.users.get(user).into_iter().flatten() {
                f(t, true);
            }
            for &t in &self.member {
                f(t, true);
            }
        }
        if !node.tags.is_empty() {
            for tag in &node.tags {
                for &t in self.tags.get(tag).into_iter().flatten() {
                    f(t, true);
                }
            }
            for &t in &self.tagged {
                f(t, true);
            }
        }
        for (p, t) in &self.prefix {
            if node.addresses.iter().any(|a| p.contains(a))
                || (dst && node.routes.iter().any(|r| intersect(r, p).is_some()))
            {
                f(*t, false);
            }
        }
        if dst && node.exit_node {
            for &t in &self.internet {
                f(t, false);
            }
        }
    }
}

/// The policy's entries indexed by selector.
#[derive(Debug, Clone, Default)]
struct Index {
    src: SelIndex<u32>,
    /// (entry, dst element).
    dst: SelIndex<(u32, u32)>,
    /// Per entry: literal source prefixes (`*` is 0.0.0.0/0 and ::/0).
    literal: Vec<Vec<IpNet>>,
    /// Per entry: whether a destination is `autogroup:self`.
    has_self: Vec<bool>,
    /// Per entry: whether a source must pass a posture ([`Entry::gate`]).
    gated: Vec<bool>,
}

impl Index {
    fn new(entries: &[Entry]) -> Index {
        let mut index = Index::default();
        for (e, entry) in entries.iter().enumerate() {
            let e = e as u32;
            let mut literal = Vec::new();
            for s in &entry.src {
                index.src.add(&s.kind, e);
                match s.kind {
                    SelKind::Any => literal.extend(default_routes()),
                    SelKind::Prefix(p) => literal.push(p),
                    _ => {}
                }
            }
            index.literal.push(IpNet::aggregate(&literal));
            for (d, elem) in entry.dst.iter().enumerate() {
                index.dst.add(&elem.sel.kind, (e, d as u32));
            }
            index
                .has_self
                .push(entry.dst.iter().any(|d| d.sel.kind == SelKind::SelfNodes));
            index.gated.push(entry.gate.is_some());
        }
        index
    }
}

/// Memoised per-class results while building views.
#[derive(Default)]
struct Memo {
    rules: HashMap<InKey, Vec<(Scope, InboundRule)>>,
    routes: HashMap<OutKey, BTreeMap<u64, Vec<IpNet>>>,
    in_peers: HashMap<InKey, Vec<u64>>,
    out_peers: HashMap<OutKey, Vec<u64>>,
    peers: HashMap<(InKey, OutKey), BTreeSet<u64>>,
}

impl Compiled {
    /// Compiles `policy` against `nodes`: every node's peers and inbound rules.
    ///
    /// A node without addresses can neither send nor receive, so it gets an
    /// empty view and is nobody's peer.
    pub fn new(policy: Policy, nodes: Vec<NodeInfo>) -> Compiled {
        let index = Index::new(&policy.entries);
        let n = policy.entries.len();
        let mut c = Compiled {
            policy,
            index,
            nodes: BTreeMap::new(),
            members: HashMap::with_capacity(nodes.len()),
            src_all: vec![BTreeSet::new(); n],
            src_named: vec![BTreeSet::new(); n],
            dst: vec![BTreeSet::new(); n],
            prefixes: vec![Arc::from([]); n],
            user_nodes: HashMap::new(),
            routers: BTreeSet::new(),
            views: BTreeMap::new(),
        };
        for node in nodes {
            if let Some(old) = c.nodes.remove(&node.id) {
                // A repeated id: the last one wins, as with `upsert_node`.
                let m = c.members.remove(&old.id).unwrap_or_default();
                c.unlink(old.id, &m);
            }
            let m = c.membership(&node);
            c.link(node.id, &m);
            c.members.insert(node.id, m);
            c.nodes.insert(node.id, node);
        }
        c.routers = c
            .nodes
            .values()
            .filter(|n| is_router(n))
            .map(|n| n.id)
            .collect();
        for e in 0..n {
            c.prefixes[e] = c.entry_prefixes(e);
        }
        let mut memo = Memo::default();
        let ids: Vec<u64> = c.nodes.keys().copied().collect();
        for id in ids {
            let view = c.compute_view(id, &mut memo);
            c.views.insert(id, view);
        }
        c
    }

    /// The view of node `node`, or `None` for an unknown node.
    pub fn view(&self, node: u64) -> Option<&NodeView> {
        self.views.get(&node)
    }

    /// The policy compiled.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The nodes, in id order.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeInfo> {
        self.nodes.values()
    }

    /// Adds or replaces a node; recomputes only the views it can affect.
    ///
    /// Returns the ids whose view changed; the upserted node is always included.
    pub fn upsert_node(&mut self, node: NodeInfo) -> BTreeSet<u64> {
        let id = node.id;
        let new_m = self.membership(&node);
        let was_router = if is_router(&node) {
            !self.routers.insert(id)
        } else {
            self.routers.remove(&id)
        };
        self.nodes.insert(id, node);
        self.replace_membership(id, Some(new_m), was_router)
    }

    /// Removes a node; recomputes only the views it affected.
    ///
    /// Returns the ids whose view changed, including `id` if it existed.
    pub fn remove_node(&mut self, id: u64) -> BTreeSet<u64> {
        if self.nodes.remove(&id).is_none() {
            return BTreeSet::new();
        }
        let was_router = self.routers.remove(&id);
        self.replace_membership(id, None, was_router)
    }

    /// Replaces the policy: compiles once, then diffs every node's view.
    ///
    /// Returns the ids whose view changed.
    pub fn set_policy(&mut self, policy: Policy) -> BTreeSet<u64> {
        let nodes: Vec<NodeInfo> = self.nodes.values().cloned().collect();
        let new = Compiled::new(policy, nodes);
        let changed = new
            .views
            .iter()
            .filter(|(id, v)| self.views.get(id) != Some(v))
            .map(|(id, _)| *id)
            .collect();
        *self = new;
        changed
    }

    /// Swaps node `id`'s membership (`None`: the node left) and repairs the
    /// views that depend on it. `self.nodes` and `self.routers` already hold
    /// the new state; `was_router`: whether the node had routes or was an
    /// exit node before.
    fn replace_membership(
        &mut self,
        id: u64,
        new_m: Option<Membership>,
        was_router: bool,
    ) -> BTreeSet<u64> {
        let old_m = self.members.remove(&id).unwrap_or_default();
        let old_peers = self
            .views
            .get(&id)
            .map(|v| v.peers.clone())
            .unwrap_or_default();
        self.unlink(id, &old_m);
        if let Some(m) = &new_m {
            self.link(id, m);
        }
        let empty = Membership::default();
        let new_ref = new_m.as_ref().unwrap_or(&empty);

        // Entries whose source prefixes may change: the node is (or was)
        // selected by identity or in a posture-gated entry, so its
        // addresses are (or were) in them.
        let mut touched: BTreeSet<u32> = BTreeSet::new();
        let mut rules_dirty: BTreeSet<u64> = BTreeSet::from([id]);
        for &(e, named) in old_m.src.iter().chain(&new_ref.src) {
            if self.index.has_self[e as usize] {
                for owner in [&old_m.owner, &new_ref.owner].into_iter().flatten() {
                    if let Some(set) = self.user_nodes.get(owner) {
                        rules_dirty.extend(set);
                    }
                }
            }
            if named || self.index.gated[e as usize] {
                touched.insert(e);
            }
        }
        for e in touched {
            let p = self.entry_prefixes(e as usize);
            if *p != *self.prefixes[e as usize] {
                self.prefixes[e as usize] = p;
                rules_dirty.extend(&self.dst[e as usize]);
            }
        }

        let mut changed = BTreeSet::from([id]);
        let mut memo = Memo::default();
        let new_peers = match new_m {
            Some(m) => {
                self.members.insert(id, m);
                let view = self.compute_view(id, &mut memo);
                let peers = view.peers.clone();
                self.views.insert(id, view);
                peers
            }
            None => {
                self.views.remove(&id);
                BTreeSet::new()
            }
        };
        for other in old_peers.symmetric_difference(&new_peers) {
            if let Some(v) = self.views.get_mut(other) {
                if new_peers.contains(other) {
                    v.peers.insert(id);
                } else {
                    v.peers.remove(&id);
                }
                changed.insert(*other);
            }
        }
        // A router's routes and destination scopes are in its peers' peer
        // routes (and only theirs: peer routes name peers).
        if was_router || self.routers.contains(&id) {
            for &other in old_peers.union(&new_peers) {
                let Some(m) = self.members.get(&other) else {
                    continue;
                };
                let routes = self.routes_memo(&m.outbound, other, &mut memo);
                if let Some(v) = self.views.get_mut(&other) {
                    if v.peer_routes != routes {
                        v.peer_routes = routes;
                        changed.insert(other);
                    }
                }
            }
        }
        rules_dirty.remove(&id);
        for other in rules_dirty {
            let Some(m) = self.members.get(&other) else {
                continue;
            };
            let rules = resolve_dst(
                self.nodes.get(&other),
                self.rules_memo(&m.inbound, &mut memo),
            );
            if let Some(v) = self.views.get_mut(&other) {
                if v.inbound != rules {
                    v.inbound = rules;
                    changed.insert(other);
                }
            }
        }
        changed
    }

    /// Computes which entries select `node`.
    fn membership(&self, node: &NodeInfo) -> Membership {
        if node.addresses.is_empty() {
            return Membership::default();
        }
        let entries = &self.policy.entries;
        let mut src: Vec<(u32, bool)> = Vec::new();
        self.index
            .src
            .each_match(node, false, |e, named| src.push((e, named)));
        // A source of a gated entry is a node passing one of its postures;
        // each posture is evaluated at most once per node.
        let postures = &self.policy.postures;
        let mut verdicts: Vec<Option<bool>> = Vec::new();
        src.retain(|&(e, _)| {
            let Some(gate) = &entries[e as usize].gate else {
                return true;
            };
            if verdicts.is_empty() {
                verdicts = vec![None; postures.len()];
            }
            gate.postures
                .iter()
                .any(|&i| match (verdicts.get_mut(i), postures.get(i)) {
                    (Some(v), Some(p)) => *v.get_or_insert_with(|| p.passes(&node.posture)),
                    _ => false,
                })
        });
        src.sort_unstable();
        // Keep one item per entry, preferring "by identity" (sorts last).
        let mut merged: Vec<(u32, bool)> = Vec::with_capacity(src.len());
        for (e, named) in src {
            match merged.last_mut() {
                Some(last) if last.0 == e => last.1 |= named,
                _ => merged.push((e, named)),
            }
        }
        let mut dst_hits: Vec<(u32, u32)> = Vec::new();
        self.index
            .dst
            .each_match(node, true, |t, _| dst_hits.push(t));
        let dst = group_ports(entries, dst_hits, node);
        let owner = owner(node).map(str::to_string);
        let self_dst = if owner.is_some() {
            group_ports(entries, self.index.dst.self_nodes.clone(), node)
        } else {
            Vec::new()
        };
        let out_self =
            owner.is_some() && merged.iter().any(|(e, _)| self.index.has_self[*e as usize]);
        Membership {
            inbound: InKey {
                dst,
                self_owner: if self_dst.is_empty() {
                    None
                } else {
                    owner.clone()
                },
                self_dst,
            },
            outbound: OutKey {
                src: merged.iter().map(|(e, _)| *e).collect(),
                self_owner: if out_self { owner.clone() } else { None },
            },
            src: merged,
            owner,
        }
    }

    fn link(&mut self, id: u64, m: &Membership) {
        for &(e, named) in &m.src {
            self.src_all[e as usize].insert(id);
            if named {
                self.src_named[e as usize].insert(id);
            }
        }
        for (e, _, _) in &m.inbound.dst {
            self.dst[*e as usize].insert(id);
        }
        if let Some(u) = &m.owner {
            self.user_nodes.entry(u.clone()).or_default().insert(id);
        }
    }

    fn unlink(&mut self, id: u64, m: &Membership) {
        for &(e, _) in &m.src {
            self.src_all[e as usize].remove(&id);
            self.src_named[e as usize].remove(&id);
        }
        for (e, _, _) in &m.inbound.dst {
            self.dst[*e as usize].remove(&id);
        }
        if let Some(u) = &m.owner {
            if let Some(set) = self.user_nodes.get_mut(u) {
                set.remove(&id);
                if set.is_empty() {
                    self.user_nodes.remove(u);
                }
            }
        }
    }

    /// Source prefixes of entry `e`: addresses of the nodes it names, plus
    /// literals. For a posture-gated entry, only passing nodes' addresses:
    /// all of them for a node it names, those inside a literal (`*`: any)
    /// for a node it selects by address; the literals themselves cover no
    /// device to check.
    fn entry_prefixes(&self, e: usize) -> Arc<[IpNet]> {
        if self.index.gated[e] {
            let literal = &self.index.literal[e];
            let named = &self.src_named[e];
            let mut nets: Vec<IpNet> = Vec::new();
            for id in &self.src_all[e] {
                let Some(n) = self.nodes.get(id) else {
                    continue;
                };
                let all = named.contains(id);
                nets.extend(
                    n.addresses
                        .iter()
                        .filter(|a| all || literal.iter().any(|p| p.contains(*a)))
                        .map(|a| IpNet::from(*a)),
                );
            }
            return IpNet::aggregate(&nets).into();
        }
        let mut nets = self.index.literal[e].clone();
        for id in &self.src_named[e] {
            if let Some(n) = self.nodes.get(id) {
                nets.extend(n.addresses.iter().map(|a| IpNet::from(*a)));
            }
        }
        IpNet::aggregate(&nets).into()
    }

    fn compute_view(&self, id: u64, memo: &mut Memo) -> NodeView {
        let Some(m) = self.members.get(&id) else {
            return NodeView::default();
        };
        let inbound = resolve_dst(self.nodes.get(&id), self.rules_memo(&m.inbound, memo));
        let key = (m.inbound.clone(), m.outbound.clone());
        let mut peers = match memo.peers.get(&key) {
            Some(p) => p.clone(),
            None => {
                let inp = match memo.in_peers.get(&m.inbound) {
                    Some(p) => p.clone(),
                    None => {
                        let p = self.in_peers(&m.inbound);
                        memo.in_peers.insert(m.inbound.clone(), p.clone());
                        p
                    }
                };
                let outp = match memo.out_peers.get(&m.outbound) {
                    Some(p) => p.clone(),
                    None => {
                        let p = self.out_peers(&m.outbound);
                        memo.out_peers.insert(m.outbound.clone(), p.clone());
                        p
                    }
                };
                let mut all = inp;
                all.extend(outp);
                all.sort_unstable();
                all.dedup();
                let set: BTreeSet<u64> = all.into_iter().collect();
                memo.peers.insert(key, set.clone());
                set
            }
        };
        peers.remove(&id);
        let peer_routes = self.routes_memo(&m.outbound, id, memo);
        NodeView {
            peers,
            inbound,
            peer_routes,
        }
    }

    /// The peer routes of node `id`, whose outbound key is `key`.
    fn routes_memo(&self, key: &OutKey, id: u64, memo: &mut Memo) -> BTreeMap<u64, Vec<IpNet>> {
        let mut routes = match memo.routes.get(key) {
            Some(r) => r.clone(),
            None => {
                let r = self.peer_routes(key);
                memo.routes.insert(key.clone(), r.clone());
                r
            }
        };
        routes.remove(&id);
        routes
    }

    /// Per router or exit node: the routes a node whose src entries are
    /// `key.src` may reach through it (see [`NodeView::peer_routes`]).
    ///
    /// The node's addresses are in the sources of each of these entries'
    /// rules, so any destination scope that overlaps a route is a reachable
    /// address in it.
    fn peer_routes(&self, key: &OutKey) -> BTreeMap<u64, Vec<IpNet>> {
        let mut out = BTreeMap::new();
        for r in &self.routers {
            let (Some(node), Some(m)) = (self.nodes.get(r), self.members.get(r)) else {
                continue;
            };
            let mut nets: Vec<IpNet> = Vec::new();
            for (e, scope, _) in &m.inbound.dst {
                if key.src.binary_search(e).is_err() {
                    continue;
                }
                match scope {
                    Scope::Own => {}
                    Scope::All => nets.extend(&node.routes),
                    Scope::Prefix(p) => nets.extend(
                        node.routes
                            .iter()
                            .filter(|route| intersect(route, p).is_some()),
                    ),
                    Scope::Internet => nets.extend(default_routes()),
                }
            }
            if !nets.is_empty() {
                nets.sort_unstable();
                nets.dedup();
                out.insert(*r, nets);
            }
        }
        out
    }

    fn rules_memo(&self, key: &InKey, memo: &mut Memo) -> Vec<(Scope, InboundRule)> {
        if let Some(r) = memo.rules.get(key) {
            return r.clone();
        }
        let r = self.rules(key);
        memo.rules.insert(key.clone(), r.clone());
        r
    }

    /// Inbound rules for a class, in entry order (regular before self),
    /// each with its destination scope; [`resolve_dst`] fills in `dst`.
    fn rules(&self, key: &InKey) -> Vec<(Scope, InboundRule)> {
        let mut items: Vec<(u32, bool, Scope, &Vec<PortRange>)> = key
            .dst
            .iter()
            .map(|(e, s, p)| (*e, false, *s, p))
            .chain(key.self_dst.iter().map(|(e, s, p)| (*e, true, *s, p)))
            .collect();
        items.sort_by_key(|(e, is_self, s, _)| (*e, *is_self, *s));
        let mut out = Vec::new();
        for (e, is_self, scope, ports) in items {
            let src = if is_self {
                self.self_prefixes(e, key.self_owner.as_deref())
            } else {
                self.prefixes[e as usize].clone()
            };
            if src.is_empty() {
                continue;
            }
            let entry = &self.policy.entries[e as usize];
            push_rules(
                &mut out,
                src,
                scope,
                &entry.protocols,
                ports,
                &entry.rule_id,
            );
        }
        out
    }

    /// Sources of an `autogroup:self` rule: the owner's nodes that the src selects.
    fn self_prefixes(&self, e: u32, owner: Option<&str>) -> Arc<[IpNet]> {
        let Some(mine) = owner.and_then(|u| self.user_nodes.get(u)) else {
            return Arc::from([]);
        };
        let src = &self.src_all[e as usize];
        let nets: Vec<IpNet> = mine
            .iter()
            .filter(|id| src.contains(id))
            .filter_map(|id| self.nodes.get(id))
            .flat_map(|n| n.addresses.iter().map(|a| IpNet::from(*a)))
            .collect();
        IpNet::aggregate(&nets).into()
    }

    fn in_peers(&self, key: &InKey) -> Vec<u64> {
        let mut out: Vec<u64> = Vec::new();
        for (e, _, _) in &key.dst {
            out.extend(&self.src_all[*e as usize]);
        }
        if let Some(mine) = key.self_owner.as_ref().and_then(|u| self.user_nodes.get(u)) {
            for (e, _, _) in &key.self_dst {
                let src = &self.src_all[*e as usize];
                out.extend(mine.iter().filter(|id| src.contains(id)));
            }
        }
        out
    }

    fn out_peers(&self, key: &OutKey) -> Vec<u64> {
        let mut out: Vec<u64> = Vec::new();
        for e in &key.src {
            out.extend(&self.dst[*e as usize]);
        }
        if let Some(mine) = key.self_owner.as_ref().and_then(|u| self.user_nodes.get(u)) {
            out.extend(mine);
        }
        out
    }
}

/// Groups (entry, dst element) hits on `node` by entry and destination
/// scope, merging the ports of elements with the same scope.
///
/// Named elements of one entry share one scope (the node's own addresses);
/// each address element keeps its own, so `100.64.0.5:22` never lends its
/// port to the node's other addresses.
fn group_ports(
    entries: &[Entry],
    mut hits: Vec<(u32, u32)>,
    node: &NodeInfo,
) -> Vec<(u32, Scope, Vec<PortRange>)> {
    hits.sort_unstable();
    hits.dedup();
    let mut out: Vec<(u32, Scope, Vec<PortRange>)> = Vec::new();
    for (e, d) in hits {
        let elem = &entries[e as usize].dst[d as usize];
        let scope = match elem.sel.kind {
            SelKind::Prefix(p) => Scope::Prefix(p),
            SelKind::Any if !node.routes.is_empty() => Scope::All,
            SelKind::Internet => Scope::Internet,
            _ => Scope::Own,
        };
        match out.iter_mut().find(|(x, s, _)| *x == e && *s == scope) {
            Some((_, _, p)) => p.extend(&elem.ports),
            None => out.push((e, scope, elem.ports.clone())),
        }
    }
    out.sort_by_key(|a| (a.0, a.1));
    for (_, _, p) in &mut out {
        *p = crate::policy::merge_ports(std::mem::take(p));
    }
    out
}

/// Resolves a class's rules for one node: each rule's destination scope
/// becomes prefixes of the node (see [`InboundRule::dst`]); a rule left
/// with no destination is dropped.
fn resolve_dst(node: Option<&NodeInfo>, rules: Vec<(Scope, InboundRule)>) -> Vec<InboundRule> {
    let Some(node) = node else {
        return Vec::new();
    };
    rules
        .into_iter()
        .filter_map(|(scope, mut r)| {
            r.dst = scope_dst(node, scope);
            (!r.dst.is_empty()).then_some(r)
        })
        .collect()
}

/// The prefixes of `node` a destination scope selects, sorted.
fn scope_dst(node: &NodeInfo, scope: Scope) -> Vec<IpNet> {
    let own = node.addresses.iter().map(|a| IpNet::from(*a));
    let mut dst: Vec<IpNet> = match scope {
        Scope::Own => own.collect(),
        Scope::All => own.chain(node.routes.iter().copied()).collect(),
        Scope::Prefix(p) => own
            .filter(|a| p.contains(a))
            .chain(node.routes.iter().filter_map(|r| intersect(r, &p)))
            .collect(),
        Scope::Internet => internet_prefixes().to_vec(),
    };
    dst.sort_unstable();
    dst.dedup();
    dst
}

/// Whether `node` serves subnet routes or is an exit node.
fn is_router(node: &NodeInfo) -> bool {
    !node.routes.is_empty() || node.exit_node
}

/// Appends the rule(s) for one entry: port-less protocols get their own rule
/// with every port, so that a rule's ports never need special-casing.
fn push_rules(
    out: &mut Vec<(Scope, InboundRule)>,
    src: Arc<[IpNet]>,
    scope: Scope,
    protocols: &[u8],
    ports: &[PortRange],
    rule_id: &str,
) {
    let all = [PortRange::ALL];
    let (with, without): (Vec<u8>, Vec<u8>) = protocols.iter().partition(|p| proto_has_ports(**p));
    let rule = |src: Arc<[IpNet]>, protocols: Vec<u8>, ports: &[PortRange]| {
        let rule = InboundRule {
            src,
            dst: Vec::new(),
            protocols,
            ports: ports.to_vec(),
            rule_id: rule_id.to_string(),
        };
        (scope, rule)
    };
    if ports == all || without.is_empty() || with.is_empty() {
        let ports = if with.is_empty() { &all[..] } else { ports };
        out.push(rule(src, protocols.to_vec(), ports));
        return;
    }
    out.push(rule(src.clone(), with, ports));
    out.push(rule(src, without, &all));
}
