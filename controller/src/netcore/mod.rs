//! The netmap core: what each node may see, as a pure function of the
//! mesh's facts.
//!
//! Facts in: the enrolled nodes (their rows: keys, names, owners, tags,
//! endpoints, key expiry), the policy in force, and the wall clock. Out: for
//! every [`Change`] to those facts, the set of nodes whose view changed; and
//! on demand, a node's view encoded as a `NetMap` body for a given serial and
//! time. Nothing here persists, locks, signs, sends, reads a clock or draws
//! randomness: the coordinator ([`crate::mesh::Mesh`]) makes a change durable,
//! applies it here, then signs and publishes the maps of the nodes returned.
//!
//! Every later per-node fact that changes what a node sees (posture,
//! quarantine, approved routes, exit nodes, DNS names) is one more field of
//! the node's row and one more arm of [`Change`]; the change-set rule in
//! [`NetCore::upsert`] covers it as long as the fact reaches the node's own
//! map or its peer entry.
//!
//! What it keeps per node: the row, the encoded peer entry other maps embed,
//! and the policy compiler's view (peers and inbound rules), which the next
//! change is diffed against. It keeps no encoded or signed maps: those are
//! built when a node needs one and handed to the publisher.

pub mod table;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use ipnet::{IpNet, Ipv6Net};
use prost::Message;
use ztmesh_policy::{Attributes, Compiled, NodeInfo as PolicyNode, Policy, PostureCheck};
use ztmesh_proto::control::{self as pb, NetMap};

pub use table::{Exhausted, NodeTable};

use crate::model::NodeRow;
use crate::routes;
use crate::UnixMs;

/// What the maps carry besides the views.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreConfig {
    /// How long a map stays valid after it is issued.
    pub netmap_ttl_ms: i64,
    pub dns_domain: String,
    /// The keepalive (seconds) each peer entry asks for.
    pub persistent_keepalive: u32,
    /// The relays every map lists (`NetMap.relays`).
    pub relays: Vec<pb::Relay>,
    /// How long a node's posture report stays believable; after that the
    /// node fails every posture with a condition until it reports again.
    pub posture_ttl_ms: i64,
    /// Every controller of the mesh (`NetMap.controllers`).
    pub controllers: Vec<String>,
}

impl CoreConfig {
    /// How often nodes are asked to report their posture: a third of the
    /// TTL (so two reports may be lost before a node goes stale), at least
    /// a second.
    pub fn posture_interval_ms(&self) -> i64 {
        (self.posture_ttl_ms / 3).max(1_000)
    }
}

/// A node's result for one posture changed (for the audit log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostureEvent {
    pub node: u64,
    /// `posture:name`.
    pub name: String,
    pub passed: bool,
    /// Why it fails (empty when it passes).
    pub detail: String,
}

/// A change to the facts the views are computed from.
#[derive(Debug, Clone)]
pub enum Change {
    /// A node joined, or changed (renamed, retagged, new key expiry): its
    /// whole new row.
    Upsert(NodeRow),
    /// A node left: deleted, logged out, timed out, its user deleted.
    Remove(u64),
    /// A node's reachable endpoints changed.
    Endpoints { node: u64, endpoints: Vec<String> },
    /// Another policy is in force.
    Policy(Policy),
    /// The wall clock reads this now, forward or back: keys expire, or
    /// become valid again when the clock went back.
    Clock(UnixMs),
    /// A node connected (its netmap stream opened) or went away: a subnet
    /// route fails over to another router when its primary goes offline.
    Online { node: u64, online: bool },
}

/// The nodes, the compiled policy and the clock; see the module docs.
#[derive(Debug)]
pub struct NetCore {
    cfg: CoreConfig,
    table: NodeTable,
    /// The policy compiled against the active nodes (key not expired at
    /// `clock`); expired nodes are in `table` only.
    compiled: Compiled,
    clock: UnixMs,
    /// Each node's `peers` entry (field 5 of `NetMap`, tag and length
    /// included), exactly as every map that lists the node embeds it.
    entries: HashMap<u64, Vec<u8>>,
    /// The `relays` entries (field 8), the same in every map.
    relays: Vec<u8>,
    /// The `split_dns` entries (field 9) of the policy in force, the same
    /// in every map.
    split_dns: Vec<u8>,
    /// Nodes connected now (see [`Change::Online`]).
    online: BTreeSet<u64>,
    /// The router serving each approved route ([`routes::primaries`]).
    primaries: BTreeMap<IpNet, u64>,
    /// The same, per router: what each serves.
    served: BTreeMap<u64, Vec<IpNet>>,
    /// Each active node's posture results under the policy in force (its
    /// own map shows them).
    checks: HashMap<u64, Vec<PostureCheck>>,
    /// Posture results that changed since the last [`NetCore::take_posture_events`].
    events: Vec<PostureEvent>,
    /// Encoded source prefixes per shared rule source (see
    /// [`ztmesh_policy::InboundRule::src`]): a group rule's sources are
    /// formatted once, not once per map. Pruned after each change.
    sources: SourceCache,
}

/// The `src_prefixes` entries (field 1 of `InboundRule`) of each rule source
/// the compiler shares, keyed by the source's address. The entry holds the
/// source, so an address is not reused while it is a key.
#[derive(Debug, Default)]
struct SourceCache(Mutex<HashMap<usize, CachedSource>>);

/// A rule source and its encoded `src_prefixes` entries.
type CachedSource = (Arc<[IpNet]>, Arc<[u8]>);

impl SourceCache {
    fn encoded(&self, src: &Arc<[IpNet]>) -> Arc<[u8]> {
        let key = Arc::as_ptr(src).cast::<IpNet>() as usize;
        let mut cache = self.0.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .entry(key)
            .or_insert_with(|| {
                let mut buf = Vec::new();
                for net in src.iter() {
                    prost::encoding::string::encode(1, &net.to_string(), &mut buf);
                }
                (src.clone(), buf.into())
            })
            .1
            .clone()
    }

    /// Drops the sources held only by the cache (no view and no entry of
    /// the compiled policy holds them any more).
    fn prune(&mut self) {
        let cache = self.0.get_mut().unwrap_or_else(|p| p.into_inner());
        cache.retain(|_, (src, _)| Arc::strong_count(src) > 1);
    }
}

/// Whether `n`'s key is valid at `now`: not revoked by an admin, and not
/// past its expiry (which follows the clock both ways).
pub fn is_active(n: &NodeRow, now: UnixMs) -> bool {
    !n.key_revoked && (n.expiry_ms == 0 || n.expiry_ms > now)
}

/// Whether `n` takes part in the policy at `now`: active and not
/// quarantined. A quarantined node is in nobody's map, and its own map
/// lists no peers, rules or routes (it still gets one, which says so).
pub fn in_policy(n: &NodeRow, now: UnixMs) -> bool {
    is_active(n, now) && n.quarantine.is_none()
}

/// What the policy compiler sees of `n`, which serves `routes` (the
/// approved routes it is primary for), and whose posture report is `fresh`.
pub fn policy_node(n: &NodeRow, routes: &[IpNet], fresh: bool) -> PolicyNode {
    PolicyNode {
        id: n.id,
        name: n.name.clone(),
        user: n.user.clone(),
        tags: n.tags.iter().cloned().collect(),
        addresses: vec![IpAddr::V4(n.ipv4), IpAddr::V6(n.ipv6)],
        routes: routes.to_vec(),
        exit_node: n.routes.exit_node(),
        posture: Attributes {
            values: n.posture.values(),
            fresh,
        },
    }
}

/// The approved routes of the nodes active at `now`, per node.
fn approved_routes<'a>(
    nodes: impl Iterator<Item = &'a NodeRow>,
    now: UnixMs,
) -> BTreeMap<u64, Vec<IpNet>> {
    nodes
        .filter(|n| in_policy(n, now))
        .map(|n| (n.id, n.routes.active()))
        .filter(|(_, r)| !r.is_empty())
        .collect()
}

/// The fields of a node's row its own map shows (`self_node` and the
/// validity end, which the key expiry caps).
fn self_fields(n: &NodeRow) -> impl PartialEq + '_ {
    (
        &n.name,
        n.ipv4,
        n.ipv6,
        n.expiry_ms,
        n.machine_key,
        n.wg_key,
        &n.user,
        &n.tags,
        n.routes.exit_node(),
        &n.quarantine,
    )
}

fn addresses(n: &NodeRow) -> Vec<String> {
    vec![format!("{}/32", n.ipv4), format!("{}/128", n.ipv6)]
}

/// `n` as a `peers` entry of another node's map, which may reach `routes`
/// through it (subnet routes, and `0.0.0.0/0` + `::/0` for an exit node the
/// viewer may use) besides its own addresses.
fn peer_entry(n: &NodeRow, keepalive: u32, routes: &[IpNet]) -> Vec<u8> {
    let mut allowed_ips = addresses(n);
    allowed_ips.extend(routes.iter().map(IpNet::to_string));
    let peer = pb::Peer {
        id: n.id,
        name: n.name.clone(),
        wg_key: n.wg_key.to_vec(),
        allowed_ips,
        endpoints: n.endpoints.clone(),
        persistent_keepalive: keepalive,
    };
    let mut buf = Vec::with_capacity(peer.encoded_len() + 4);
    prost::encoding::message::encode(5, &peer, &mut buf);
    buf
}

/// The `split_dns` entries (field 9) for `policy`'s `dns.split` section.
fn encode_split_dns(policy: &Policy) -> Vec<u8> {
    NetMap {
        split_dns: policy
            .split_dns()
            .iter()
            .map(|(suffix, resolvers)| pb::SplitDns {
                suffix: suffix.clone(),
                resolvers: resolvers.iter().map(ToString::to_string).collect(),
            })
            .collect(),
        ..NetMap::default()
    }
    .encode_to_vec()
}

impl NetCore {
    /// Computes every view from scratch: `nodes` under `policy` at `now`,
    /// with nobody connected yet.
    pub fn new(
        cfg: CoreConfig,
        policy: Policy,
        nodes: impl IntoIterator<Item = NodeRow>,
        now: UnixMs,
    ) -> NetCore {
        Self::with_routing(cfg, policy, nodes, now, BTreeSet::new(), &BTreeMap::new())
    }

    /// [`NetCore::new`] with `online` connected and `previous` as the last
    /// primaries (which stay where they still may, see
    /// [`routes::primaries`]).
    pub fn with_routing(
        cfg: CoreConfig,
        policy: Policy,
        nodes: impl IntoIterator<Item = NodeRow>,
        now: UnixMs,
        online: BTreeSet<u64>,
        previous: &BTreeMap<IpNet, u64>,
    ) -> NetCore {
        let mut table = NodeTable::default();
        for n in nodes {
            table.insert(n);
        }
        let primaries = routes::primaries(&approved_routes(table.iter(), now), &online, previous);
        let served = routes::served_by(&primaries);
        let ttl = cfg.posture_ttl_ms;
        let active = table
            .iter()
            .filter(|n| in_policy(n, now))
            .map(|n| {
                let routes = served.get(&n.id).map_or(&[][..], Vec::as_slice);
                policy_node(n, routes, n.posture.fresh(now, ttl))
            })
            .collect();
        let entries = table
            .iter()
            .map(|n| (n.id, peer_entry(n, cfg.persistent_keepalive, &[])))
            .collect();
        let relays = NetMap {
            relays: cfg.relays.clone(),
            ..NetMap::default()
        }
        .encode_to_vec();
        let mut core = NetCore {
            relays,
            split_dns: encode_split_dns(&policy),
            compiled: Compiled::new(policy, active),
            cfg,
            table,
            clock: now,
            entries,
            online,
            primaries,
            served,
            checks: HashMap::new(),
            events: Vec::new(),
            sources: SourceCache::default(),
        };
        let ids: Vec<u64> = core.table.iter().map(|n| n.id).collect();
        for id in ids {
            core.refresh_checks(id);
        }
        // The results a controller starts with are not changes.
        core.events.clear();
        core
    }

    /// What the policy sees of node `n` now.
    fn seen(&self, n: &NodeRow) -> PolicyNode {
        let fresh = n.posture.fresh(self.clock, self.cfg.posture_ttl_ms);
        policy_node(n, self.served(n.id), fresh)
    }

    /// Recomputes node `id`'s posture results; returns whether they
    /// changed (its own map shows them). A result that flips is recorded
    /// for [`NetCore::take_posture_events`]: a posture newly passed by a
    /// node that had no result for it is not news, every other flip is.
    fn refresh_checks(&mut self, id: u64) -> bool {
        let Some(n) = self.table.get(id).filter(|n| is_active(n, self.clock)) else {
            return self.checks.remove(&id).is_some();
        };
        let attrs = Attributes {
            values: n.posture.values(),
            fresh: n.posture.fresh(self.clock, self.cfg.posture_ttl_ms),
        };
        let new = self.compiled.policy().posture_checks(&attrs);
        let old = self.checks.get(&id);
        if old == Some(&new) || (old.is_none() && new.is_empty()) {
            return false;
        }
        for c in &new {
            let before = old.and_then(|o| o.iter().find(|x| x.name == c.name));
            let flipped = match before {
                Some(b) => b.passed != c.passed,
                None => !c.passed,
            };
            if flipped {
                self.events.push(PostureEvent {
                    node: id,
                    name: c.name.clone(),
                    passed: c.passed,
                    detail: c.detail.clone(),
                });
            }
        }
        self.checks.insert(id, new);
        true
    }

    /// The posture results that flipped since the last call, oldest first.
    pub fn take_posture_events(&mut self) -> Vec<PostureEvent> {
        std::mem::take(&mut self.events)
    }

    /// Node `id`'s posture results under the policy in force (empty for an
    /// inactive node or a policy without postures).
    pub fn posture_checks(&self, id: u64) -> &[PostureCheck] {
        self.checks.get(&id).map_or(&[], Vec::as_slice)
    }

    /// The routes `id` serves now.
    fn served(&self, id: u64) -> &[IpNet] {
        self.served.get(&id).map_or(&[], Vec::as_slice)
    }

    /// The router serving each approved route.
    pub fn primaries(&self) -> &BTreeMap<IpNet, u64> {
        &self.primaries
    }

    /// Chooses the primaries again after a change to the routers (approved
    /// routes, keys, who is online); a router whose served routes changed
    /// is seen anew by the policy, and its own map shows them.
    fn reroute(&mut self) -> BTreeSet<u64> {
        let approved = approved_routes(self.table.iter(), self.clock);
        let primaries = routes::primaries(&approved, &self.online, &self.primaries);
        if primaries == self.primaries {
            return BTreeSet::new();
        }
        let served = routes::served_by(&primaries);
        let moved: BTreeSet<u64> = self
            .served
            .keys()
            .chain(served.keys())
            .filter(|id| self.served.get(id) != served.get(id))
            .copied()
            .collect();
        self.primaries = primaries;
        self.served = served;
        let mut changed = BTreeSet::new();
        for id in moved {
            let Some(n) = self.table.get(id).filter(|n| in_policy(n, self.clock)) else {
                continue;
            };
            let node = self.seen(n);
            changed.extend(self.compiled.upsert_node(node));
            changed.insert(id);
        }
        changed
    }

    /// Applies `change`; returns the nodes whose view changed (a node that
    /// left is included: it must be told).
    pub fn apply(&mut self, change: Change) -> BTreeSet<u64> {
        // Only a change that touches a router (or the clock, which may
        // expire one) can move a route: endpoint reports and enrollments of
        // ordinary nodes stay O(1) in the number of nodes.
        let is_router = |n: &NodeRow| !n.routes.approved.is_empty();
        let maybe_moves = match &change {
            Change::Upsert(row) => is_router(row) || self.table.get(row.id).is_some_and(is_router),
            Change::Remove(id) | Change::Online { node: id, .. } => {
                self.table.get(*id).is_some_and(is_router)
            }
            Change::Clock(_) => true,
            Change::Endpoints { .. } | Change::Policy(_) => false,
        };
        let mut changed = self.apply_fact(change);
        if maybe_moves {
            changed.extend(self.reroute());
        }
        self.sources.prune();
        changed
    }

    /// Appends `rules` as `inbound_rules` entries (field 6 of `NetMap`),
    /// byte for byte what prost writes: the cached sources are field 1 of
    /// each rule, so they come first.
    fn encode_rules(&self, rules: &[ztmesh_policy::InboundRule], body: &mut Vec<u8>) {
        for r in rules {
            let src = self.sources.encoded(&r.src);
            let rest = pb::InboundRule {
                src_prefixes: Vec::new(),
                dst_prefixes: r.dst.iter().map(IpNet::to_string).collect(),
                protocols: r.protocols.iter().map(|&p| u32::from(p)).collect(),
                ports: r
                    .ports
                    .iter()
                    .map(|p| pb::PortRange {
                        first: p.first.into(),
                        last: p.last.into(),
                    })
                    .collect(),
                rule_id: r.rule_id.clone(),
            };
            let len = src.len() + rest.encoded_len();
            prost::encoding::encode_key(6, prost::encoding::WireType::LengthDelimited, body);
            prost::encoding::encode_varint(len as u64, body);
            body.extend_from_slice(&src);
            rest.encode(body).expect("a Vec grows to fit any message");
        }
    }

    fn apply_fact(&mut self, change: Change) -> BTreeSet<u64> {
        match change {
            Change::Upsert(row) => self.upsert(row),
            Change::Remove(id) => self.remove(id),
            Change::Endpoints { node, endpoints } => match self.table.get(node) {
                Some(n) if n.endpoints != endpoints => {
                    let row = NodeRow {
                        endpoints,
                        ..n.clone()
                    };
                    self.upsert(row)
                }
                _ => BTreeSet::new(),
            },
            Change::Policy(policy) => {
                let split_dns = encode_split_dns(&policy);
                let mut changed = self.compiled.set_policy(policy);
                let ids: Vec<u64> = self.table.iter().map(|n| n.id).collect();
                for id in ids {
                    if self.refresh_checks(id) {
                        changed.insert(id);
                    }
                }
                if split_dns != self.split_dns {
                    // Every map lists the split DNS routes.
                    self.split_dns = split_dns;
                    changed.extend(
                        self.table
                            .iter()
                            .filter(|n| in_policy(n, self.clock))
                            .map(|n| n.id),
                    );
                }
                changed
            }
            Change::Clock(now) => self.set_clock(now),
            Change::Online { node, online } => {
                if online {
                    self.online.insert(node);
                } else {
                    self.online.remove(&node);
                }
                BTreeSet::new()
            }
        }
    }

    /// A node's new row. Its own view changes when a field its map shows
    /// changed; the policy views it takes part in are repaired when what the
    /// policy sees of it (owner, tags, addresses, whether its key is valid)
    /// changed; and when its peer entry changed (name, key, addresses,
    /// endpoints) so does the view of every node it is a peer of.
    fn upsert(&mut self, row: NodeRow) -> BTreeSet<u64> {
        let id = row.id;
        let old = self.table.get(id);
        if old == Some(&row) {
            return BTreeSet::new();
        }
        let clock = self.clock;
        let ttl = self.cfg.posture_ttl_ms;
        let served = self.served(id).to_vec();
        let seen_by_policy = |n: &NodeRow| {
            in_policy(n, clock).then(|| policy_node(n, &served, n.posture.fresh(clock, ttl)))
        };
        let policy_changed = old.and_then(seen_by_policy) != seen_by_policy(&row);
        let self_changed = old.is_none_or(|o| self_fields(o) != self_fields(&row));
        let entry = peer_entry(&row, self.cfg.persistent_keepalive, &[]);
        let entry_changed = self.entries.get(&id) != Some(&entry);
        let mut changed = match (policy_changed, in_policy(&row, clock)) {
            (false, _) => BTreeSet::new(),
            (true, true) => {
                self.compiled
                    .upsert_node(policy_node(&row, &served, row.posture.fresh(clock, ttl)))
            }
            (true, false) => self.compiled.remove_node(id),
        };
        if self_changed || policy_changed {
            changed.insert(id);
        }
        if entry_changed {
            if let Some(v) = self.compiled.view(id) {
                changed.extend(&v.peers);
            }
        }
        self.entries.insert(id, entry);
        self.table.insert(row);
        if policy_changed && self.refresh_checks(id) {
            changed.insert(id);
        }
        changed
    }

    fn remove(&mut self, id: u64) -> BTreeSet<u64> {
        if self.table.remove(id).is_none() {
            return BTreeSet::new();
        }
        self.entries.remove(&id);
        self.checks.remove(&id);
        let mut changed = self.compiled.remove_node(id);
        changed.insert(id);
        changed
    }

    /// Moves the clock: nodes whose key expired leave the compiled policy,
    /// nodes whose key is valid again (the clock went back) rejoin it, and
    /// nodes whose posture report went stale (or, the clock going back,
    /// fresh again) are seen anew.
    fn set_clock(&mut self, now: UnixMs) -> BTreeSet<u64> {
        let before = self.clock;
        self.clock = now;
        let ttl = self.cfg.posture_ttl_ms;
        let flips: Vec<(u64, bool)> = self
            .table
            .iter()
            .map(|n| (n.id, in_policy(n, now)))
            .filter(|&(id, active)| active != self.compiled.view(id).is_some())
            .collect();
        let stale: Vec<u64> = self
            .table
            .iter()
            .filter(|n| {
                in_policy(n, now) && n.posture.fresh(before, ttl) != n.posture.fresh(now, ttl)
            })
            .map(|n| n.id)
            .collect();
        // A quarantined node is in no view either way, but its own map
        // comes and goes with its key.
        let mut changed: BTreeSet<u64> = self
            .table
            .iter()
            .filter(|n| n.quarantine.is_some() && is_active(n, before) != is_active(n, now))
            .map(|n| n.id)
            .collect();
        for (id, active) in flips {
            changed.insert(id);
            if active {
                if let Some(n) = self.table.get(id) {
                    let node = self.seen(n);
                    changed.extend(self.compiled.upsert_node(node));
                }
            } else {
                changed.extend(self.compiled.remove_node(id));
            }
            self.refresh_checks(id);
        }
        for id in stale {
            if let Some(n) = self.table.get(id) {
                let node = self.seen(n);
                changed.extend(self.compiled.upsert_node(node));
            }
            if self.refresh_checks(id) {
                changed.insert(id);
            }
        }
        changed
    }

    /// Records when a node was last seen; no view depends on it.
    pub fn set_last_seen(&mut self, id: u64, ms: UnixMs) {
        self.table.set_last_seen(id, ms);
    }

    /// The clock as of the last [`Change::Clock`] (or construction).
    pub fn clock(&self) -> UnixMs {
        self.clock
    }

    pub fn nodes(&self) -> &NodeTable {
        &self.table
    }

    /// The lowest free overlay address pair (see [`NodeTable::allocate`]).
    ///
    /// # Errors
    /// [`Exhausted`].
    pub fn allocate(
        &mut self,
        ula: Ipv6Net,
    ) -> Result<(std::net::Ipv4Addr, std::net::Ipv6Addr), Exhausted> {
        self.table.allocate(ula)
    }

    /// See [`NodeTable::allocate_skipping`].
    pub fn allocate_skipping(
        &mut self,
        ula: Ipv6Net,
        skip: u32,
    ) -> Result<(std::net::Ipv4Addr, std::net::Ipv6Addr), Exhausted> {
        self.table.allocate_skipping(ula, skip)
    }

    pub fn compiled(&self) -> &Compiled {
        &self.compiled
    }

    pub fn policy(&self) -> &Policy {
        self.compiled.policy()
    }

    /// The nodes `id` may talk to, per the policy (empty for an expired or
    /// unknown node).
    pub fn peers(&self, id: u64) -> BTreeSet<u64> {
        self.compiled
            .view(id)
            .map(|v| v.peers.clone())
            .unwrap_or_default()
    }

    /// How many nodes `id` may talk to (0 for an expired or unknown node).
    pub fn peer_count(&self, id: u64) -> usize {
        self.compiled.view(id).map_or(0, |v| v.peers.len())
    }

    /// Whether `other` is among the nodes `viewer` may talk to (without
    /// copying the set).
    pub fn is_peer(&self, viewer: u64, other: u64) -> bool {
        self.compiled
            .view(viewer)
            .is_some_and(|v| v.peers.contains(&other))
    }

    /// The encoded `NetMap` of `node` with `serial`, issued at `now`, or
    /// `None` when the node is unknown or its key has expired at `now`.
    ///
    /// The bytes are exactly prost's encoding of the full message (fields in
    /// tag order: 1–4, the peers, 6–7, the relays, the split DNS routes, then
    /// the posture fields 10–11 and the quarantine, 12), with each peer's entry taken
    /// from the cache instead of being rebuilt for every map that lists it.
    pub fn encode(&self, node: u64, serial: u64, now: UnixMs) -> Option<Vec<u8>> {
        let me = self.table.get(node).filter(|n| is_active(n, now))?;
        let mut not_after = now.saturating_add(self.cfg.netmap_ttl_ms);
        if me.expiry_ms > 0 {
            not_after = not_after.min(me.expiry_ms);
        }
        let head = NetMap {
            serial,
            issued_at_ms: now,
            not_after_ms: not_after,
            self_node: Some(pb::NodeInfo {
                id: me.id,
                name: me.name.clone(),
                addresses: addresses(me),
                key_expiry_ms: me.expiry_ms,
                machine_key: me.machine_key.to_vec(),
                wg_key: me.wg_key.to_vec(),
                user: me.user.clone().unwrap_or_default(),
                tags: me.tags.clone(),
                routes: self.served(node).iter().map(IpNet::to_string).collect(),
                exit_node: me.routes.exit_node(),
            }),
            ..NetMap::default()
        };
        let view = self.compiled.view(node);
        let tail = NetMap {
            dns_domain: self.cfg.dns_domain.clone(),
            ..NetMap::default()
        };
        // Sized for the peer entries up front: growing an 11 KB map by
        // doubling cost a tenth of the encoding.
        let entries: usize = view.map_or(0, |v| {
            v.peers
                .iter()
                .filter_map(|id| self.entries.get(id))
                .map(Vec::len)
                .sum()
        });
        let mut body = Vec::with_capacity(head.encoded_len() + entries + 1024);
        head.encode(&mut body)
            .expect("a Vec grows to fit any message");
        if let Some(v) = view {
            for id in &v.peers {
                let Some(peer) = self.table.get(*id).filter(|p| is_active(p, now)) else {
                    continue;
                };
                // A router's entry lists the routes this node may reach
                // through it, so it is built for this map.
                match v.peer_routes.get(id) {
                    Some(routes) => {
                        body.extend(peer_entry(peer, self.cfg.persistent_keepalive, routes))
                    }
                    None => {
                        if let Some(entry) = self.entries.get(id) {
                            body.extend_from_slice(entry);
                        }
                    }
                }
            }
        }
        if let Some(v) = view {
            self.encode_rules(&v.inbound, &mut body);
        }
        tail.encode(&mut body)
            .expect("a Vec grows to fit any message");
        if me.quarantine.is_none() {
            body.extend_from_slice(&self.relays);
            body.extend_from_slice(&self.split_dns);
        }
        let posture = NetMap {
            posture_interval_ms: self.cfg.posture_interval_ms(),
            posture_checks: self
                .posture_checks(node)
                .iter()
                .map(|c| pb::PostureCheck {
                    name: c.name.clone(),
                    passed: c.passed,
                    detail: c.detail.clone(),
                })
                .collect(),
            quarantine: me.quarantine.as_ref().map(|q| pb::QuarantineInfo {
                since_ms: q.since_ms,
                reason: q.reason.clone(),
            }),
            controllers: self.cfg.controllers.clone(),
            ..NetMap::default()
        };
        posture
            .encode(&mut body)
            .expect("a Vec grows to fit any message");
        Some(body)
    }

    /// [`NetCore::encode`], decoded.
    pub fn netmap(&self, node: u64, serial: u64, now: UnixMs) -> Option<NetMap> {
        let body = self.encode(node, serial, now)?;
        NetMap::decode(body.as_slice()).ok()
    }
}

#[cfg(test)]
mod tests;
