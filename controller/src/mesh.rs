//! The controller's working state: nodes, the compiled policy, live netmap
//! subscriptions; every change is written through to the [`Store`] first.
//!
//! All mutations take `now` as an argument; the clock is read by the API layer
//! and the background ticker only. A change computes the set of nodes whose view
//! changed (via the policy engine's incremental API) and pushes a freshly signed
//! map to exactly those that are connected; unaffected nodes get nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ipnet::{IpNet, Ipv6Net};
use prost::Message;
use rand_core::{OsRng, RngCore};
use tokio::sync::watch;
use ztmesh_policy::{Compiled, NodeInfo as PolicyNode, Policy};
use ztmesh_proto::auth::{self, KeyToken, NodeProof, ReplayGuard};
use ztmesh_proto::control::{self as pb, NetMap, SignedNetMap};
use ztmesh_proto::keys::{PublicKey, SigningKey, WgPublicKey};
use ztmesh_proto::refusal::AuthReason;

use crate::error::{Error, Result};
use crate::nodeinput::{is_low_order_x25519, is_weak_ed25519, validate_endpoints};
use crate::nodelimit::{Call, EndpointCoalescer, NodeLimiter};
use crate::store::{
    ApiKeyRow, AuditEntry, AuthKeyRow, NewNode, NodeRow, PolicyRow, Store, UserRow,
};
use crate::UnixMs;

/// Tunables, with the defaults documented in the README.
#[derive(Clone, Debug)]
pub struct MeshConfig {
    /// How long a signed netmap stays valid; connected nodes get a fresh one at half-life.
    pub netmap_ttl_ms: i64,
    /// Node key lifetime from enrollment; 0 = never expires.
    pub node_key_ttl_ms: i64,
    /// Ephemeral nodes are deleted after being offline this long.
    pub ephemeral_timeout_ms: i64,
    /// Default lifetime of auth keys created without `--expiry`.
    pub auth_key_ttl_ms: i64,
    pub dns_domain: String,
    /// Keepalive the controller asks peers to use (seconds).
    pub persistent_keepalive: u32,
    /// At most one endpoint-driven republish of a node's peers' maps per
    /// this interval; reports in between are coalesced (the latest wins).
    pub endpoint_publish_interval_ms: i64,
    /// Audit rows older than this are pruned; 0 = keep forever.
    pub audit_max_age_ms: i64,
    /// At most this many node-reported (`flow.*`) audit rows are kept; 0 = no cap.
    pub audit_max_flow_rows: u64,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            netmap_ttl_ms: 12 * 3600 * 1000,
            node_key_ttl_ms: 180 * 24 * 3600 * 1000,
            ephemeral_timeout_ms: 5 * 60 * 1000,
            auth_key_ttl_ms: 3600 * 1000,
            dns_domain: "ztmesh.internal".into(),
            persistent_keepalive: 25,
            endpoint_publish_interval_ms: 5_000,
            audit_max_age_ms: 90 * 24 * 3600 * 1000,
            audit_max_flow_rows: 1_000_000,
        }
    }
}

/// How far ahead of the serials actually issued the persisted serial ceiling
/// is set (in serial units, which track the clock in µs: 10 s). The store is
/// written once per step instead of once per map.
const SERIAL_STEP: u64 = 10_000_000;

/// Audit rows written for one flow report at most (plus one summary row).
pub const MAX_FLOW_ROWS_PER_REPORT: usize = 100;

/// How often `last_seen` of connected nodes is refreshed (then written by
/// [`Mesh::flush`] in one transaction), so a restart finds it recent.
pub const SEEN_REFRESH_MS: u64 = 60_000;

/// What a node's netmap stream receives.
#[derive(Clone, Debug)]
pub enum Update {
    Map(Arc<SignedNetMap>),
    /// The stream ends with this reason: the node was deleted or expired
    /// (`Revoked`), or a newer session took over (`Replaced`).
    Closed(AuthReason, String),
    /// The last map was taken by the stream ([`Subscriber::take`]) and the
    /// channel no longer holds it, so an idle stream keeps no map in memory.
    Delivered,
}

/// A live netmap stream's end of its subscription.
pub struct Subscriber {
    /// Identifies this stream for [`Mesh::unsubscribe`].
    pub conn: u64,
    /// Signals a new [`Update`]; `Delivered` means nothing new.
    pub rx: watch::Receiver<Update>,
    tx: Arc<watch::Sender<Update>>,
}

impl Subscriber {
    /// Takes the pending map out of the channel (leaving `Delivered`) without
    /// waking anyone; the caller then owns the only copy.
    pub fn take(&self) -> Option<SignedNetMap> {
        let mut taken = None;
        self.tx.send_if_modified(|v| {
            if matches!(v, Update::Map(_)) {
                taken = Some(std::mem::replace(v, Update::Delivered));
            }
            false
        });
        match taken {
            Some(Update::Map(m)) => Some(Arc::try_unwrap(m).unwrap_or_else(|m| (*m).clone())),
            _ => None,
        }
    }
}

struct Subscription {
    conn: u64,
    tx: Arc<watch::Sender<Update>>,
    /// When the last map was pushed, on the monotonic clock.
    last_sent_mono: u64,
    /// Where the stream comes from, for the duplicate-session audit row.
    src: Option<SocketAddr>,
    opened_ms: UnixMs,
}

impl Subscription {
    /// Whether the stream's task still holds its receiver: once the
    /// transport is gone the task ends and drops it.
    fn is_live(&self) -> bool {
        !self.tx.is_closed()
    }
}

struct Inner {
    nodes: BTreeMap<u64, NodeRow>,
    /// Machine key → node id, for authenticating every node call.
    by_machine_key: HashMap<[u8; 32], u64>,
    names: HashSet<String>,
    /// Used IPv4 overlay addresses, and an offset below which all are used.
    used_v4: HashSet<Ipv4Addr>,
    v4_hint: u32,
    /// Each node's encoded `peers` entry (field 5 of `NetMap`, tag and
    /// length included) as other nodes' maps carry it; filled on demand,
    /// dropped when the node changes.
    peer_entries: HashMap<u64, Vec<u8>>,
    compiled: Compiled,
    policy_row: Option<PolicyRow>,
    serial: u64,
    /// Persisted upper bound of every serial issued so far.
    serial_ceiling: u64,
    subs: HashMap<u64, Subscription>,
    next_conn: u64,
    /// Nodes counted as "online": connected now.
    online: BTreeSet<u64>,
    /// `last_seen` values not yet written to the store (see [`Mesh::flush`]).
    seen_dirty: BTreeMap<u64, UnixMs>,
    /// Endpoint reports waiting for their node's republish interval.
    coalesce: EndpointCoalescer,
    /// The monotonic clock (ms since load) as of the last tick.
    mono: u64,
    /// The wall clock at load: `tick(now)` derives the monotonic clock from it.
    load_wall: UnixMs,
    /// When each ephemeral node was last seen going offline, on the
    /// monotonic clock of this run (nodes offline at load: 0).
    offline_since: HashMap<u64, u64>,
    /// When `last_seen` of the live nodes was last refreshed (monotonic).
    seen_refreshed: u64,
    /// Nodes the ticker found expired in this run: the only ones that come
    /// back if the clock goes back (an admin's `expire` is final).
    clock_expired: HashSet<u64>,
}

impl Inner {
    /// Adds or replaces a node, keeping the indexes in step.
    fn insert_node(&mut self, row: NodeRow) {
        self.remove_node(row.id);
        self.by_machine_key.insert(row.machine_key, row.id);
        self.names.insert(row.name.clone());
        self.used_v4.insert(row.ipv4);
        self.nodes.insert(row.id, row);
    }

    /// Removes a node and its index entries.
    fn remove_node(&mut self, id: u64) -> Option<NodeRow> {
        let row = self.nodes.remove(&id)?;
        self.by_machine_key.remove(&row.machine_key);
        self.names.remove(&row.name);
        self.used_v4.remove(&row.ipv4);
        self.v4_hint = self.v4_hint.min(v4_offset(row.ipv4));
        self.peer_entries.remove(&id);
        Some(row)
    }
}

const V4_BASE: u32 = 0x6440_0000; // 100.64.0.0

/// The refusal message for a proof stamped `ts` when the controller's clock
/// reads `now`: how far apart the clocks are, in whole seconds.
fn skew_message(ts: UnixMs, now: UnixMs) -> String {
    let secs = ts.saturating_sub(now) / 1000;
    let (dir, secs) = if secs >= 0 {
        ("ahead of", secs)
    } else {
        ("behind", secs.saturating_neg())
    };
    format!(
        "proof timestamp is outside the accepted window: {secs} s {dir} the controller's clock (check the node's clock)"
    )
}

fn v4_offset(a: Ipv4Addr) -> u32 {
    u32::from(a).wrapping_sub(V4_BASE)
}

/// Shared controller state.
pub struct Mesh {
    store: Arc<dyn Store>,
    signer: SigningKey,
    fingerprint: [u8; 32],
    ula: Ipv6Net,
    cfg: MeshConfig,
    inner: Mutex<Inner>,
    /// Per-node call limits; a lock of its own, never held with `inner`.
    limits: Mutex<NodeLimiter>,
    /// Netmaps signed since load (a cost metric: every signature is work).
    maps_signed: AtomicU64,
    /// Proofs accepted recently; its own lock, so the mesh lock is not held
    /// while it is pruned.
    replay: Mutex<ReplayGuard>,
}

/// Turns a hostname into a DNS label: lowercase a-z0-9 and '-', at most 63 chars.
pub fn dns_label(hostname: &str) -> String {
    let mut s: String = hostname
        .split('.')
        .next()
        .unwrap_or_default()
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    s.truncate(63);
    let s = s.trim_matches('-').to_string();
    if s.is_empty() {
        "node".into()
    } else {
        s
    }
}

/// Validates a user login: `local@domain`, printable, at most 254 characters.
pub fn validate_login(login: &str) -> Result<()> {
    let ok = login.len() <= 254
        && login.split_once('@').is_some_and(|(l, d)| {
            !l.is_empty()
                && !d.is_empty()
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c))
                && d.chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-".contains(c))
        });
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "invalid user login {login:?}: expected name@domain (letters, digits, . _ + -)"
        )))
    }
}

/// Validates a tag: `tag:` followed by lowercase letters, digits and '-'.
pub fn validate_tag(tag: &str) -> Result<()> {
    let ok = tag.strip_prefix("tag:").is_some_and(|t| {
        !t.is_empty()
            && t.len() <= 63
            && t.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    });
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "invalid tag {tag:?}: expected tag:NAME (lowercase letters, digits, -)"
        )))
    }
}

/// The refusal of a second session of one node.
fn duplicate_session() -> Error {
    Error::SessionConflict(
        "another session of this node is live (same machine key, another connection); \
         refusing this one. A copy of this machine must be re-enrolled with its own \
         identity; a reconnect succeeds once the old connection has closed"
            .into(),
    )
}

/// The clock in µs, the floor of the next serial (saturating at both ends).
fn clock_serial(now: UnixMs) -> u64 {
    u64::try_from(now).unwrap_or(0).saturating_mul(1000)
}

fn node_info(n: &NodeRow) -> PolicyNode {
    PolicyNode {
        id: n.id,
        name: n.name.clone(),
        user: n.user.clone(),
        tags: n.tags.iter().cloned().collect(),
        addresses: vec![IpAddr::V4(n.ipv4), IpAddr::V6(n.ipv6)],
    }
}

fn is_active(n: &NodeRow, now: UnixMs) -> bool {
    n.expiry_ms == 0 || n.expiry_ms > now
}

fn addresses(n: &NodeRow) -> Vec<String> {
    vec![format!("{}/32", n.ipv4), format!("{}/128", n.ipv6)]
}

/// `n` as a `peers` entry of another node's map: field 5 of `NetMap`, tag
/// and length included.
fn peer_entry(n: &NodeRow, keepalive: u32) -> Vec<u8> {
    let peer = pb::Peer {
        id: n.id,
        name: n.name.clone(),
        wg_key: n.wg_key.to_vec(),
        allowed_ips: addresses(n),
        endpoints: n.endpoints.clone(),
        persistent_keepalive: keepalive,
    };
    let mut buf = Vec::with_capacity(peer.encoded_len() + 4);
    prost::encoding::message::encode(5, &peer, &mut buf);
    buf
}

fn inbound_rules(rules: &[ztmesh_policy::InboundRule]) -> Vec<pb::InboundRule> {
    rules
        .iter()
        .map(|r| pb::InboundRule {
            src_prefixes: r.src.iter().map(IpNet::to_string).collect(),
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
        })
        .collect()
}

impl Mesh {
    /// Loads state from the store and compiles the stored policy.
    ///
    /// A stored policy that no longer parses is replaced by the empty policy
    /// (deny all) and logged: failing closed is safer than guessing.
    ///
    /// # Errors
    /// Store failures.
    pub fn load(
        store: Arc<dyn Store>,
        signer: SigningKey,
        fingerprint: [u8; 32],
        ula: Ipv6Net,
        cfg: MeshConfig,
        now: UnixMs,
    ) -> Result<Self> {
        let nodes: BTreeMap<u64, NodeRow> = store.nodes()?.into_iter().map(|n| (n.id, n)).collect();
        let policy_row = store.policy()?;
        let policy = match &policy_row {
            Some(p) => Policy::parse(&p.file_name, &p.text).unwrap_or_else(|e| {
                tracing::error!(error = %e, "stored policy does not parse; denying all");
                Policy::empty()
            }),
            None => Policy::empty(),
        };
        let active: Vec<PolicyNode> = nodes
            .values()
            .filter(|n| is_active(n, now))
            .map(node_info)
            .collect();
        let compiled = Compiled::new(policy, active);
        // Serials must grow across restarts: start above both the stored value
        // and the clock (in µs), whichever is larger.
        let stored: u64 = store
            .meta("serial")?
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        // The stored value bounds every serial ever issued (it is written
        // before a serial beyond it goes out), so this start is above all of them.
        let serial = stored.max(clock_serial(now));
        let mut inner = Inner {
            nodes: BTreeMap::new(),
            by_machine_key: HashMap::new(),
            names: HashSet::new(),
            used_v4: HashSet::new(),
            v4_hint: 1,
            peer_entries: HashMap::new(),
            compiled,
            policy_row,
            serial,
            serial_ceiling: stored,
            subs: HashMap::new(),
            next_conn: 1,
            online: BTreeSet::new(),
            seen_dirty: BTreeMap::new(),
            coalesce: EndpointCoalescer::new(cfg.endpoint_publish_interval_ms),
            mono: 0,
            load_wall: now,
            offline_since: HashMap::new(),
            seen_refreshed: 0,
            clock_expired: HashSet::new(),
        };
        for n in nodes.into_values() {
            // Nobody is connected yet: every ephemeral node's offline time
            // starts now, which is the grace period after a restart.
            if n.ephemeral {
                inner.offline_since.insert(n.id, 0);
            }
            inner.insert_node(n);
        }
        inner.v4_hint = 1;
        Ok(Self {
            store,
            signer,
            fingerprint,
            ula,
            cfg,
            inner: Mutex::new(inner),
            limits: Mutex::new(NodeLimiter::default()),
            maps_signed: AtomicU64::new(0),
            replay: Mutex::new(ReplayGuard::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn controller_key(&self) -> PublicKey {
        self.signer.public()
    }

    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    pub fn config(&self) -> &MeshConfig {
        &self.cfg
    }

    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    // ---- rate limiting -------------------------------------------------

    /// Charges one `call` to an authenticated `node`.
    ///
    /// # Errors
    /// [`Error::Throttled`] naming the call, the limit and when to retry.
    pub fn throttle(&self, node: u64, call: Call, now: UnixMs) -> Result<()> {
        self.limits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check(node, call, now)
            .map_err(Error::Throttled)
    }

    // ---- node enrollment and sessions ------------------------------------

    /// Checks the auth key and the proof, consumes the key and registers the node.
    ///
    /// # Errors
    /// `Unauthenticated` for a bad key or proof, `Invalid` for malformed fields,
    /// `Conflict` if the machine key is already enrolled.
    pub fn enroll(&self, req: &pb::EnrollRequest, now: UnixMs) -> Result<pb::EnrollResponse> {
        let token = KeyToken::decode(auth::AUTH_KEY_PREFIX, &req.auth_key)
            .map_err(|_| Error::Unauthenticated("malformed auth key".into()))?;
        if token.fingerprint != Some(self.fingerprint) {
            return Err(Error::Unauthenticated(
                "auth key was issued by a different controller".into(),
            ));
        }
        let machine_key = PublicKey::from_slice(&req.machine_key)
            .map_err(|_| Error::Invalid("machine_key must be a 32-byte ed25519 key".into()))?;
        if is_weak_ed25519(machine_key.as_bytes()) {
            return Err(Error::Invalid(
                "machine_key is a weak (small-order) ed25519 key; generate a new machine key"
                    .into(),
            ));
        }
        let wg_key = WgPublicKey::from_slice(&req.wg_key)
            .map_err(|_| Error::Invalid("wg_key must be a 32-byte x25519 key".into()))?;
        if is_low_order_x25519(wg_key.as_bytes()) {
            return Err(Error::Invalid(
                "wg_key is a low-order x25519 point (zero or small-subgroup); generate a new WireGuard key"
                    .into(),
            ));
        }
        if req.hostname.is_empty() || req.hostname.len() > 253 {
            return Err(Error::Invalid(
                "hostname must be 1 to 253 characters".into(),
            ));
        }
        if !auth::within_window(req.timestamp_ms, now) {
            return Err(Error::NodeAuth {
                reason: AuthReason::ClockSkew,
                message: format!(
                    "enrollment proof is stale: {}",
                    skew_message(req.timestamp_ms, now)
                ),
                server_time_ms: Some(now),
            });
        }
        let msg = auth::enroll_message(
            &req.auth_key,
            &req.machine_key,
            &req.wg_key,
            &req.hostname,
            req.timestamp_ms,
        );
        if !machine_key.verify(&msg, &req.proof) {
            return Err(Error::Unauthenticated(
                "enrollment proof does not verify with the machine key".into(),
            ));
        }
        let hostname: String = req.hostname.chars().filter(|c| !c.is_control()).collect();

        let mut inner = self.lock();
        if inner.by_machine_key.contains_key(machine_key.as_bytes()) {
            return Err(Error::Conflict("a node with this machine key".into()));
        }
        let name = unique_name(&inner.names, &dns_label(&hostname));
        let (ipv4, ipv6) = self.allocate_addresses(&mut inner)?;
        let secret_hash = token.secret_hash();
        let policy = inner.compiled.policy().clone();
        let check = |k: &AuthKeyRow| -> std::result::Result<(), &'static str> {
            if !auth::ct_eq(&k.secret_hash, &secret_hash) {
                return Err("unknown auth key");
            }
            if k.revoked {
                return Err("auth key was revoked");
            }
            if k.expires_ms <= now {
                return Err("auth key has expired");
            }
            if let Some(user) = &k.user {
                if !k.tags.iter().all(|t| policy.may_own_tag(user, t)) {
                    return Err("the policy's tagOwners no longer allow this key's tags");
                }
            }
            Ok(())
        };
        let row = self.store.enroll(
            &token.key_id,
            &check,
            NewNode {
                name,
                hostname,
                machine_key: *machine_key.as_bytes(),
                wg_key: *wg_key.as_bytes(),
                ipv4,
                ipv6,
                created_ms: now,
                expiry_ms: if self.cfg.node_key_ttl_ms > 0 {
                    now.saturating_add(self.cfg.node_key_ttl_ms)
                } else {
                    0
                },
            },
        )?;
        let _ = self.store.audit(
            now,
            &format!("authkey:{}", token.key_id),
            "node.enroll",
            &row.name,
            &format!("id={} ipv4={} ipv6={}", row.id, row.ipv4, row.ipv6),
        );
        tracing::info!(node = %row.name, id = row.id, "node enrolled");
        let resp = pb::EnrollResponse {
            node_id: row.id,
            name: row.name.clone(),
            addresses: vec![row.ipv4.to_string(), row.ipv6.to_string()],
            controller_key: self.signer.public().as_bytes().to_vec(),
            key_expiry_ms: row.expiry_ms,
        };
        let affected = inner.compiled.upsert_node(node_info(&row));
        if row.ephemeral {
            let mono = inner.mono;
            inner.offline_since.insert(row.id, mono);
        }
        inner.insert_node(row);
        self.push(&mut inner, &affected, now);
        Ok(resp)
    }

    /// The lowest free overlay address pair. Every offset below `v4_hint` is
    /// taken, so the search starts there (amortized O(1) per enrollment).
    fn allocate_addresses(&self, inner: &mut Inner) -> Result<(Ipv4Addr, Ipv6Addr)> {
        // 100.64.0.0/10: skip the network address and the .0/.255 of each /24
        // so no address looks like a broadcast to a confused host stack.
        let offset = (inner.v4_hint.max(1)..(1u32 << 22))
            .filter(|o| o & 0xff != 0 && o & 0xff != 0xff)
            .find(|o| !inner.used_v4.contains(&Ipv4Addr::from(V4_BASE + o)))
            .ok_or_else(|| Error::Invalid("overlay IPv4 range exhausted".into()))?;
        inner.v4_hint = offset;
        let v4 = Ipv4Addr::from(V4_BASE + offset);
        let mut v6 = self.ula.network().octets();
        v6[12..16].copy_from_slice(&offset.to_be_bytes());
        Ok((v4, Ipv6Addr::from(v6)))
    }

    /// Verifies the node proof in `metadata` for `method` and returns the node.
    ///
    /// # Errors
    /// [`Error::NodeAuth`] with the reason: `bad-proof` (missing, malformed,
    /// signature), `revoked` (unknown machine key, expired node),
    /// `clock-skew` (timestamp outside the window), `replayed`.
    pub fn authenticate(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        method: &str,
        now: UnixMs,
    ) -> Result<NodeRow> {
        self.authenticate_from(metadata, method, now, false)
    }

    /// [`Mesh::authenticate`] for a caller whose source may be over its
    /// failure limit.
    ///
    /// When `source_limited`, a proof that does not name an enrolled machine
    /// key is refused with [`Error::RateLimited`] before any signature work,
    /// while a node whose proof verifies is still served: one bad client
    /// behind a shared address cannot lock the good nodes out.
    ///
    /// Order of checks: the key must be enrolled, the proof fresh and its
    /// signature valid, the node active; only then is the proof recorded in
    /// the replay cache, so strangers and forgers cannot fill it. The mesh
    /// lock is held only for the key lookup.
    ///
    /// # Errors
    /// As [`Mesh::authenticate`], and [`Error::RateLimited`].
    pub fn authenticate_from(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        method: &str,
        now: UnixMs,
        source_limited: bool,
    ) -> Result<NodeRow> {
        let refuse = |reason, message: &str| {
            if source_limited {
                Error::RateLimited
            } else {
                Error::node_auth(reason, message)
            }
        };
        let text = metadata
            .get(auth::PROOF_HEADER)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| refuse(AuthReason::BadProof, "missing node proof"))?;
        let proof: NodeProof = text
            .parse()
            .map_err(|e: auth::AuthError| refuse(AuthReason::BadProof, &e.to_string()))?;
        let node = {
            let inner = self.lock();
            inner
                .by_machine_key
                .get(proof.machine_key.as_bytes())
                .and_then(|id| inner.nodes.get(id))
                .cloned()
        }
        .ok_or_else(|| refuse(AuthReason::Revoked, "unknown machine key (node deleted?)"))?;
        proof.verify(method, now).map_err(|e| match e {
            auth::AuthError::Stale => Error::NodeAuth {
                reason: AuthReason::ClockSkew,
                message: skew_message(proof.timestamp_ms, now),
                server_time_ms: Some(now),
            },
            other => Error::node_auth(AuthReason::BadProof, other.to_string()),
        })?;
        if !is_active(&node, now) {
            return Err(Error::node_auth(
                AuthReason::Revoked,
                "node key has expired; re-enroll",
            ));
        }
        self.replay
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check_and_record(&proof, now)
            .map_err(|e| Error::node_auth(AuthReason::Replayed, e.to_string()))?;
        Ok(node)
    }

    /// Proofs currently remembered by the replay cache.
    pub fn replay_cache_len(&self) -> usize {
        self.replay.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Registers a netmap stream for `node`; the receiver already holds a full map.
    ///
    /// # Errors
    /// `Unauthenticated` if the node is unknown or expired; `SessionConflict`
    /// if another stream of this node is live (see [`Mesh::open_stream_from`]).
    pub fn subscribe(&self, node: u64, now: UnixMs) -> Result<(u64, watch::Receiver<Update>)> {
        self.open_stream(node, now).map(|s| (s.conn, s.rx))
    }

    /// Like [`Mesh::subscribe`], for a stream that takes each map out of the
    /// channel once it has it ([`Subscriber::take`]).
    ///
    /// `last_seen` is recorded in memory and written by [`Mesh::flush`]: a
    /// reconnect storm must not cost one synchronous database write per node.
    ///
    /// # Errors
    /// As [`Mesh::open_stream_from`].
    pub fn open_stream(&self, node: u64, now: UnixMs) -> Result<Subscriber> {
        self.open_stream_from(node, None, now)
    }

    /// Whether `node` has a live netmap stream.
    pub fn has_live_session(&self, node: u64) -> bool {
        self.lock()
            .subs
            .get(&node)
            .is_some_and(Subscription::is_live)
    }

    /// Checks that a call from `src` may speak for `node`: refused while a
    /// live session of the node runs on another connection, so a second
    /// machine with the same identity cannot steer the first one's peers to
    /// its own endpoints. The agent reports endpoints over the connection
    /// of its stream, so the session's owner always passes.
    ///
    /// # Errors
    /// `SessionConflict`, as for a second stream.
    pub fn check_session_owner(&self, node: u64, src: Option<SocketAddr>) -> Result<()> {
        let inner = self.lock();
        let other = inner
            .subs
            .get(&node)
            .filter(|s| s.is_live())
            .and_then(|s| s.src)
            .zip(src)
            .is_some_and(|(live, src)| live != src);
        if other {
            return Err(duplicate_session());
        }
        Ok(())
    }

    /// Opens a netmap stream for `node`, coming from `src`.
    ///
    /// One identity, one session: while a stream of this node is live (its
    /// task still runs, i.e. its connection has not closed), another is
    /// refused and audited as `node.duplicate_session` — two machines with
    /// the same machine key would otherwise replace each other forever. A
    /// genuine reconnect succeeds once the old connection is seen to close
    /// (at once for a closed socket; HTTP/2 keepalive finds a dead one
    /// within 25 s), and the refused node is told to retry.
    ///
    /// # Errors
    /// `Unauthenticated` if the node is unknown or expired;
    /// `SessionConflict` if another stream of it is live.
    pub fn open_stream_from(
        &self,
        node: u64,
        src: Option<SocketAddr>,
        now: UnixMs,
    ) -> Result<Subscriber> {
        let mut inner = self.lock();
        if let Some(live) = inner.subs.get(&node).filter(|s| s.is_live()) {
            let name = inner
                .nodes
                .get(&node)
                .map(|n| n.name.clone())
                .unwrap_or_default();
            let show = |a: Option<SocketAddr>| a.map_or_else(|| "-".to_string(), |a| a.to_string());
            let detail = format!(
                "id={node} live session from {} since {}; refused from {}",
                show(live.src),
                live.opened_ms,
                show(src)
            );
            tracing::warn!(node = %name, live = %show(live.src), refused = %show(src), "duplicate session refused");
            drop(inner);
            self.audit(
                now,
                &format!("node:{name}"),
                "node.duplicate_session",
                &name,
                &detail,
            );
            return Err(duplicate_session());
        }
        let map = self
            .build_signed(&mut inner, node, now)
            .ok_or_else(|| Error::node_auth(AuthReason::Revoked, "node is not active"))?;
        let conn = inner.next_conn;
        inner.next_conn += 1;
        let (tx, rx) = watch::channel(Update::Map(Arc::new(map)));
        let tx = Arc::new(tx);
        let mono = inner.mono;
        if let Some(old) = inner.subs.insert(
            node,
            Subscription {
                conn,
                tx: tx.clone(),
                last_sent_mono: mono,
                src,
                opened_ms: now,
            },
        ) {
            // Its task is gone; close it for good measure.
            old.tx.send_replace(Update::Closed(
                AuthReason::Replaced,
                "replaced by a newer session of this node".into(),
            ));
        }
        inner.online.insert(node);
        inner.offline_since.remove(&node);
        if let Some(n) = inner.nodes.get_mut(&node) {
            n.last_seen_ms = now;
        }
        inner.seen_dirty.insert(node, now);
        Ok(Subscriber { conn, rx, tx })
    }

    /// Ends the stream `conn` of `node` (if it is still the current one).
    pub fn unsubscribe(&self, node: u64, conn: u64, now: UnixMs) {
        let mut inner = self.lock();
        if inner.subs.get(&node).is_some_and(|s| s.conn == conn) {
            inner.subs.remove(&node);
            inner.online.remove(&node);
            if inner.nodes.get(&node).is_some_and(|n| n.ephemeral) {
                let mono = inner.mono;
                inner.offline_since.insert(node, mono);
            }
            if let Some(n) = inner.nodes.get_mut(&node) {
                n.last_seen_ms = now;
            }
            inner.seen_dirty.insert(node, now);
        }
    }

    /// Writes the `last_seen` times recorded since the last flush, in one
    /// transaction and outside the state lock. Called by the ticker and at
    /// shutdown; a crash loses at most one tick of `last_seen`, which only
    /// delays the deletion of an offline ephemeral node.
    pub fn flush(&self) {
        let dirty = std::mem::take(&mut self.lock().seen_dirty);
        if dirty.is_empty() {
            return;
        }
        let seen: Vec<(u64, UnixMs)> = dirty.into_iter().collect();
        if let Err(e) = self.store.set_nodes_seen(&seen) {
            tracing::error!(error = %e, nodes = seen.len(), "cannot persist last_seen");
        }
    }

    /// Records the denied flows a node reports in the audit log, one row per
    /// (source, destination, protocol, port, reason) up to
    /// [`MAX_FLOW_ROWS_PER_REPORT`], then one summary row for the rest.
    /// Fields are length-capped: a node cannot write unbounded text.
    pub fn record_denied_flows(&self, node: &NodeRow, flows: &[pb::FlowSummary], now: UnixMs) {
        let actor = format!("node:{}", node.name);
        let clip = |s: &str| {
            s.chars()
                .filter(|c| !c.is_control())
                .take(64)
                .collect::<String>()
        };
        let denied: Vec<&pb::FlowSummary> = flows.iter().filter(|f| !f.allowed).collect();
        let mut rows = Vec::with_capacity(denied.len().min(MAX_FLOW_ROWS_PER_REPORT) + 1);
        for f in denied.iter().take(MAX_FLOW_ROWS_PER_REPORT) {
            let target = format!(
                "{} -> {}:{}/{}",
                clip(&f.src),
                clip(&f.dst),
                f.dst_port,
                ztmesh_policy::proto_name(u8::try_from(f.protocol).unwrap_or(0))
            );
            let detail = format!("reason={} packets={}", clip(&f.reason), f.packets);
            rows.push(AuditEntry {
                time_ms: now,
                actor: actor.clone(),
                action: "flow.denied".into(),
                target,
                detail,
            });
        }
        if let Some(rest) = denied.get(MAX_FLOW_ROWS_PER_REPORT..) {
            let packets = rest
                .iter()
                .fold(0u64, |sum, f| sum.saturating_add(f.packets));
            rows.push(AuditEntry {
                time_ms: now,
                actor,
                action: "flow.denied".into(),
                target: "(more)".into(),
                detail: format!("{} more denied flows, {packets} packets", rest.len()),
            });
        }
        if rows.is_empty() {
            return;
        }
        // One transaction per report, outside the state lock.
        if let Err(e) = self.store.audit_batch(&rows) {
            tracing::error!(error = %e, rows = rows.len(), "cannot write flow audit records");
        }
    }

    /// Records the endpoints a node reports; its peers get new maps — at
    /// most once per `endpoint_publish_interval_ms` per node: reports in
    /// between are coalesced (the latest wins) and published by [`Mesh::tick`].
    ///
    /// # Errors
    /// `Invalid` as [`validate_endpoints`]; `NotFound` for an unknown node.
    pub fn report_endpoints(&self, node: u64, endpoints: &[String], now: UnixMs) -> Result<()> {
        let parsed = validate_endpoints(endpoints)?;
        let mut inner = self.lock();
        let Some(n) = inner.nodes.get(&node) else {
            return Err(Error::NotFound(format!("node {node}")));
        };
        if n.endpoints == parsed && !inner.coalesce.has_pending(node) {
            return Ok(());
        }
        match inner.coalesce.offer(node, parsed, now) {
            Some(eps) => self.publish_endpoints(&mut inner, node, eps, now),
            None => Ok(()),
        }
    }

    /// Stores a node's endpoints and pushes its peers' maps, if they changed.
    fn publish_endpoints(
        &self,
        inner: &mut Inner,
        node: u64,
        endpoints: Vec<String>,
        now: UnixMs,
    ) -> Result<()> {
        let Some(n) = inner.nodes.get(&node) else {
            return Err(Error::NotFound(format!("node {node}")));
        };
        if n.endpoints == endpoints {
            return Ok(());
        }
        self.store.set_node_endpoints(node, &endpoints)?;
        if let Some(n) = inner.nodes.get_mut(&node) {
            n.endpoints = endpoints;
        }
        inner.peer_entries.remove(&node);
        let peers: BTreeSet<u64> = inner
            .compiled
            .view(node)
            .map(|v| v.peers.clone())
            .unwrap_or_default();
        self.push(inner, &peers, now);
        Ok(())
    }

    // ---- netmaps ------------------------------------------------------------

    /// The next serial: above the last one and at least the clock in µs.
    /// Before it passes the persisted ceiling, a new ceiling is written, so
    /// after a restart (which starts at the stored ceiling) serials still grow.
    fn next_serial(&self, inner: &mut Inner, now: UnixMs) -> u64 {
        let serial = inner.serial.saturating_add(1).max(clock_serial(now));
        if serial > inner.serial_ceiling {
            let ceiling = serial.saturating_add(SERIAL_STEP);
            match self.store.set_meta("serial", &ceiling.to_string()) {
                Ok(()) => inner.serial_ceiling = ceiling,
                Err(e) => tracing::error!(error = %e, "cannot persist netmap serial"),
            }
        }
        inner.serial = serial;
        serial
    }

    /// The netmap of `node` as of now (unsigned), if the node is active.
    pub fn netmap(&self, node: u64, now: UnixMs) -> Option<NetMap> {
        let mut inner = self.lock();
        let body = self.build(&mut inner, node, now)?;
        NetMap::decode(body.as_slice()).ok()
    }

    /// The encoded `NetMap` of `node` with a fresh serial, if the node is active.
    ///
    /// The bytes are exactly prost's encoding of the full message (fields in
    /// tag order: 1–4, the peers, then 6–7), but each peer's entry comes
    /// from `peer_entries` instead of being rebuilt and re-encoded for every
    /// map that lists it.
    fn build(&self, inner: &mut Inner, node: u64, now: UnixMs) -> Option<Vec<u8>> {
        let me = inner.nodes.get(&node).filter(|n| is_active(n, now))?;
        let mut not_after = now.saturating_add(self.cfg.netmap_ttl_ms);
        if me.expiry_ms > 0 {
            not_after = not_after.min(me.expiry_ms);
        }
        let self_node = pb::NodeInfo {
            id: me.id,
            name: me.name.clone(),
            addresses: addresses(me),
            key_expiry_ms: me.expiry_ms,
            machine_key: me.machine_key.to_vec(),
            wg_key: me.wg_key.to_vec(),
            user: me.user.clone().unwrap_or_default(),
            tags: me.tags.clone(),
        };
        let serial = self.next_serial(inner, now);
        let head = NetMap {
            serial,
            issued_at_ms: now,
            not_after_ms: not_after,
            self_node: Some(self_node),
            ..NetMap::default()
        };
        let Inner {
            nodes,
            compiled,
            peer_entries,
            ..
        } = inner;
        let view = compiled.view(node);
        let tail = NetMap {
            inbound_rules: view.map(|v| inbound_rules(&v.inbound)).unwrap_or_default(),
            dns_domain: self.cfg.dns_domain.clone(),
            ..NetMap::default()
        };
        let mut body = head.encode_to_vec();
        for id in view.iter().flat_map(|v| v.peers.iter()) {
            let Some(p) = nodes.get(id).filter(|p| is_active(p, now)) else {
                continue;
            };
            let entry = peer_entries
                .entry(*id)
                .or_insert_with(|| peer_entry(p, self.cfg.persistent_keepalive));
            body.extend_from_slice(entry);
        }
        tail.encode(&mut body)
            .expect("a Vec grows to fit any message");
        Some(body)
    }

    fn build_signed(&self, inner: &mut Inner, node: u64, now: UnixMs) -> Option<SignedNetMap> {
        let body = self.build(inner, node, now)?;
        Some(self.sign(body))
    }

    fn sign(&self, body: Vec<u8>) -> SignedNetMap {
        self.maps_signed.fetch_add(1, Ordering::Relaxed);
        ztmesh_proto::netmap::sign_encoded(&self.signer, body)
    }

    /// Sends fresh maps to the connected nodes in `affected`.
    fn push(&self, inner: &mut Inner, affected: &BTreeSet<u64>, now: UnixMs) {
        let mut sent = 0usize;
        for id in affected {
            if !inner.subs.contains_key(id) {
                continue;
            }
            let update = match self.build_signed(inner, *id, now) {
                Some(m) => Update::Map(Arc::new(m)),
                None => Update::Closed(
                    AuthReason::Revoked,
                    "node was deleted or has expired".into(),
                ),
            };
            let mono = inner.mono;
            if let Some(sub) = inner.subs.get_mut(id) {
                sub.tx.send_replace(update);
                sub.last_sent_mono = mono;
                sent += 1;
            }
        }
        tracing::debug!(affected = affected.len(), sent, "netmaps pushed");
    }

    /// [`Mesh::tick_at`] with the monotonic clock taken as the wall clock
    /// since load: for virtual-time tests, where the two agree.
    pub fn tick(&self, now: UnixMs) {
        let load_wall = self.lock().load_wall;
        let mono = u64::try_from(now.saturating_sub(load_wall)).unwrap_or(0);
        self.tick_at(now, mono);
    }

    /// Periodic housekeeping at wall time `now` and monotonic time `mono_ms`
    /// (ms since load; the ticker reads a monotonic clock): key expiry in
    /// both directions, deletion of offline ephemeral nodes, refresh of
    /// `last_seen` for live nodes, coalesced endpoint republishes, and fresh
    /// maps for streams whose map is at half-life.
    ///
    /// Key expiry follows the wall clock, since it is a wall-clock date: a
    /// node whose key looks expired is dropped from maps, and comes back when
    /// the clock does. Offline time is measured on the monotonic clock only,
    /// from the moment this run saw the node go offline (or from load): a
    /// wall-clock jump deletes nobody, and a restart gives every ephemeral
    /// node a full timeout to reconnect.
    pub fn tick_at(&self, now: UnixMs, mono_ms: u64) {
        let mut inner = self.lock();
        let mono = mono_ms.max(inner.mono);
        inner.mono = mono;
        let mut affected = BTreeSet::new();
        let expired: Vec<u64> = inner
            .nodes
            .values()
            .filter(|n| !is_active(n, now) && inner.compiled.view(n.id).is_some())
            .map(|n| n.id)
            .collect();
        for id in expired {
            tracing::info!(node = id, "node key expired");
            inner.clock_expired.insert(id);
            affected.extend(inner.compiled.remove_node(id));
            affected.insert(id);
        }
        let revived: Vec<PolicyNode> = inner
            .clock_expired
            .iter()
            .filter_map(|id| inner.nodes.get(id))
            .filter(|n| is_active(n, now))
            .map(node_info)
            .collect();
        for n in revived {
            tracing::warn!(node = n.id, "node key valid again (the clock went back)");
            let id = n.id;
            inner.clock_expired.remove(&id);
            affected.extend(inner.compiled.upsert_node(n));
            affected.insert(id);
        }
        let Inner {
            nodes,
            offline_since,
            clock_expired,
            ..
        } = &mut *inner;
        offline_since.retain(|id, _| nodes.contains_key(id));
        clock_expired.retain(|id| nodes.contains_key(id));
        let timeout = u64::try_from(self.cfg.ephemeral_timeout_ms).unwrap_or(0);
        let stale_ephemeral: Vec<u64> = inner
            .nodes
            .values()
            .filter(|n| n.ephemeral && !inner.online.contains(&n.id))
            .map(|n| n.id)
            .collect::<Vec<_>>()
            .into_iter()
            .filter(|id| {
                let since = *inner.offline_since.entry(*id).or_insert(mono);
                mono.saturating_sub(since) >= timeout
            })
            .collect();
        for id in stale_ephemeral {
            if self.store.delete_node(id).is_ok() {
                inner.offline_since.remove(&id);
                let name = inner.remove_node(id).map(|n| n.name).unwrap_or_default();
                self.audit(now, "controller", "node.delete.ephemeral", &name, "offline");
                affected.extend(inner.compiled.remove_node(id));
            }
        }
        if mono.saturating_sub(inner.seen_refreshed) >= SEEN_REFRESH_MS {
            inner.seen_refreshed = mono;
            let live: Vec<u64> = inner.online.iter().copied().collect();
            for id in live {
                if let Some(n) = inner.nodes.get_mut(&id) {
                    n.last_seen_ms = now;
                }
                inner.seen_dirty.insert(id, now);
            }
        }
        for (node, eps) in inner.coalesce.due(now) {
            if let Err(e) = self.publish_endpoints(&mut inner, node, eps, now) {
                tracing::debug!(node, error = %e, "coalesced endpoints not published");
            }
        }
        let half = u64::try_from(self.cfg.netmap_ttl_ms / 2).unwrap_or(0);
        let refresh: Vec<u64> = inner
            .subs
            .iter()
            .filter(|(_, s)| mono.saturating_sub(s.last_sent_mono) >= half)
            .map(|(id, _)| *id)
            .collect();
        affected.extend(refresh);
        if !affected.is_empty() {
            self.push(&mut inner, &affected, now);
        }
        drop(inner);
        self.limits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .prune(now);
    }

    /// Prunes the audit table: rows older than `audit_max_age_ms`, and
    /// node-reported flow rows beyond the newest `audit_max_flow_rows` (so a
    /// node flooding flow reports can never evict the admin trail). Runs
    /// outside the state lock; the ticker calls it once a minute.
    pub fn prune_audit(&self, now: UnixMs) {
        let older_than = if self.cfg.audit_max_age_ms > 0 {
            now.saturating_sub(self.cfg.audit_max_age_ms)
        } else {
            i64::MIN
        };
        match self
            .store
            .prune_audit(older_than, self.cfg.audit_max_flow_rows)
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "audit log pruned"),
            Err(e) => tracing::error!(error = %e, "cannot prune the audit log"),
        }
    }

    // ---- admin operations ---------------------------------------------------

    fn audit(&self, now: UnixMs, actor: &str, action: &str, target: &str, detail: &str) {
        if let Err(e) = self.store.audit(now, actor, action, target, detail) {
            tracing::error!(error = %e, action, "cannot write audit record");
        }
    }

    pub fn create_user(&self, actor: &str, login: &str, now: UnixMs) -> Result<UserRow> {
        validate_login(login)?;
        let row = self.store.create_user(login, now)?;
        self.audit(now, actor, "user.create", login, "");
        Ok(row)
    }

    pub fn users(&self) -> Result<Vec<UserRow>> {
        Ok(self.store.users()?)
    }

    pub fn delete_user(&self, actor: &str, login: &str, now: UnixMs) -> Result<()> {
        let mut inner = self.lock();
        let ids = self.store.delete_user(login)?;
        let mut affected = BTreeSet::new();
        for id in &ids {
            inner.remove_node(*id);
            affected.extend(inner.compiled.remove_node(*id));
            affected.insert(*id);
        }
        self.audit(
            now,
            actor,
            "user.delete",
            login,
            &format!("nodes deleted: {ids:?}"),
        );
        self.push(&mut inner, &affected, now);
        Ok(())
    }

    /// Creates an auth key; returns the row and the full secret (shown once).
    ///
    /// # Errors
    /// `Invalid` for bad tags or neither user nor tags, `Forbidden` when the
    /// policy's tagOwners do not let `user` own a requested tag, `NotFound` for
    /// an unknown user.
    #[allow(clippy::too_many_arguments)]
    pub fn create_auth_key(
        &self,
        actor: &str,
        user: Option<&str>,
        tags: &[String],
        reusable: bool,
        ephemeral: bool,
        expiry_ms: Option<i64>,
        now: UnixMs,
    ) -> Result<(AuthKeyRow, String)> {
        if user.is_none() && tags.is_empty() {
            return Err(Error::Invalid(
                "an auth key needs --user or --tags (nodes are owned by a user or by tags)".into(),
            ));
        }
        let mut tags: Vec<String> = tags.to_vec();
        tags.sort();
        tags.dedup();
        for t in &tags {
            validate_tag(t)?;
        }
        if let Some(u) = user {
            validate_login(u)?;
            let policy = self.lock().compiled.policy().clone();
            for t in &tags {
                if !policy.may_own_tag(u, t) {
                    return Err(Error::Forbidden(format!(
                        "policy tagOwners do not allow {u} to own {t}"
                    )));
                }
            }
        }
        let ttl = expiry_ms.unwrap_or(self.cfg.auth_key_ttl_ms);
        if ttl <= 0 || ttl > 10 * 365 * 24 * 3600 * 1000 {
            return Err(Error::Invalid(
                "expiry must be between 1s and 10 years".into(),
            ));
        }
        let token = KeyToken::generate(Some(self.fingerprint), &mut OsRng);
        let row = self.store.create_auth_key(&AuthKeyRow {
            id: 0,
            key_id: token.key_id.clone(),
            secret_hash: token.secret_hash(),
            user: user.map(str::to_string),
            tags: tags.clone(),
            reusable,
            ephemeral,
            created_ms: now,
            expires_ms: now.saturating_add(ttl),
            used_count: 0,
            revoked: false,
            created_by: actor.to_string(),
        })?;
        self.audit(
            now,
            actor,
            "authkey.create",
            &row.key_id,
            &format!(
                "user={} tags={} reusable={reusable} ephemeral={ephemeral}",
                user.unwrap_or("-"),
                tags.join(",")
            ),
        );
        Ok((row, token.encode(auth::AUTH_KEY_PREFIX)))
    }

    pub fn auth_keys(&self) -> Result<Vec<AuthKeyRow>> {
        Ok(self.store.auth_keys()?)
    }

    pub fn revoke_auth_key(&self, actor: &str, key_id: &str, now: UnixMs) -> Result<()> {
        self.store.revoke_auth_key(key_id)?;
        self.audit(now, actor, "authkey.revoke", key_id, "");
        Ok(())
    }

    /// Finds a node by name or numeric id.
    pub fn find_node(&self, r: &str) -> Result<NodeRow> {
        let inner = self.lock();
        let by_id = r.parse::<u64>().ok().and_then(|id| inner.nodes.get(&id));
        by_id
            .or_else(|| inner.nodes.values().find(|n| n.name == r))
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("node {r:?}")))
    }

    /// All nodes with their online state and the serial each last received.
    pub fn nodes(&self) -> Vec<(NodeRow, bool)> {
        let inner = self.lock();
        inner
            .nodes
            .values()
            .map(|n| (n.clone(), inner.online.contains(&n.id)))
            .collect()
    }

    pub fn delete_node(&self, actor: &str, r: &str, now: UnixMs) -> Result<()> {
        let node = self.find_node(r)?;
        self.remove_node(actor, &node, "node.delete", now)
    }

    /// Deregisters the node itself (node-authenticated logout).
    pub fn logout(&self, node: &NodeRow, now: UnixMs) -> Result<()> {
        self.remove_node(&format!("node:{}", node.name), node, "node.logout", now)
    }

    fn remove_node(&self, actor: &str, node: &NodeRow, action: &str, now: UnixMs) -> Result<()> {
        let mut inner = self.lock();
        self.store.delete_node(node.id)?;
        inner.remove_node(node.id);
        let mut affected = inner.compiled.remove_node(node.id);
        affected.insert(node.id);
        self.audit(now, actor, action, &node.name, &format!("id={}", node.id));
        self.push(&mut inner, &affected, now);
        Ok(())
    }

    pub fn expire_node(&self, actor: &str, r: &str, now: UnixMs) -> Result<NodeRow> {
        let node = self.find_node(r)?;
        let mut inner = self.lock();
        self.store.set_node_expiry(node.id, now)?;
        if let Some(n) = inner.nodes.get_mut(&node.id) {
            n.expiry_ms = now;
        }
        inner.clock_expired.remove(&node.id);
        let mut affected = inner.compiled.remove_node(node.id);
        affected.insert(node.id);
        self.audit(now, actor, "node.expire", &node.name, "");
        self.push(&mut inner, &affected, now);
        Ok(inner.nodes.get(&node.id).cloned().unwrap_or(node))
    }

    pub fn rename_node(
        &self,
        actor: &str,
        r: &str,
        new_name: &str,
        now: UnixMs,
    ) -> Result<NodeRow> {
        let node = self.find_node(r)?;
        let label = dns_label(new_name);
        if label != new_name {
            return Err(Error::Invalid(format!(
                "invalid node name {new_name:?}: use lowercase letters, digits and '-' (e.g. {label:?})"
            )));
        }
        let mut inner = self.lock();
        self.store.rename_node(node.id, new_name)?;
        let mut updated = node.clone();
        updated.name = new_name.to_string();
        inner.insert_node(updated.clone());
        let mut affected = BTreeSet::new();
        if is_active(&updated, now) {
            affected = inner.compiled.upsert_node(node_info(&updated));
            affected.insert(node.id);
            // Peers see the new name too.
            if let Some(v) = inner.compiled.view(node.id) {
                affected.extend(v.peers.iter().copied());
            }
        }
        self.audit(now, actor, "node.rename", &node.name, new_name);
        self.push(&mut inner, &affected, now);
        Ok(updated)
    }

    /// Replaces the policy if it parses and its tests pass; otherwise the old
    /// one stays in force.
    ///
    /// # Errors
    /// `Policy` with `FILE:LINE:COL: message` lines.
    pub fn set_policy(&self, actor: &str, file_name: &str, text: &str, now: UnixMs) -> Result<u64> {
        let policy = Policy::check(file_name, text).map_err(|e| Error::Policy(e.to_string()))?;
        let mut inner = self.lock();
        let row = self.store.set_policy(file_name, text, now)?;
        let affected = inner.compiled.set_policy(policy);
        inner.policy_row = Some(row.clone());
        self.audit(
            now,
            actor,
            "policy.set",
            file_name,
            &format!("version={} nodes affected={}", row.version, affected.len()),
        );
        self.push(&mut inner, &affected, now);
        Ok(row.version)
    }

    pub fn policy_row(&self) -> Option<PolicyRow> {
        self.lock().policy_row.clone()
    }

    /// What would change if `text` replaced the current policy. Changes nothing.
    pub fn plan_policy(
        &self,
        file_name: &str,
        text: &str,
    ) -> Result<Vec<ztmesh_policy::FlowChange>> {
        let policy = Policy::check(file_name, text).map_err(|e| Error::Policy(e.to_string()))?;
        let inner = self.lock();
        let nodes: Vec<PolicyNode> = inner.compiled.nodes().cloned().collect();
        let new = Compiled::new(policy, nodes);
        Ok(ztmesh_policy::plan(&inner.compiled, &new))
    }

    pub fn explain(
        &self,
        src: &str,
        dst: &str,
        port: u16,
        proto: u8,
    ) -> ztmesh_policy::Explanation {
        let inner = self.lock();
        let nodes: Vec<PolicyNode> = inner.compiled.nodes().cloned().collect();
        inner
            .compiled
            .policy()
            .explain(&nodes, src, dst, port, proto)
    }

    pub fn create_api_key(
        &self,
        actor: &str,
        description: &str,
        expiry_ms: Option<i64>,
        now: UnixMs,
    ) -> Result<(ApiKeyRow, String)> {
        if description.len() > 200 || description.chars().any(char::is_control) {
            return Err(Error::Invalid(
                "description: at most 200 printable characters".into(),
            ));
        }
        let ttl = expiry_ms.unwrap_or(90 * 24 * 3600 * 1000);
        let token = KeyToken::generate(None, &mut OsRng);
        let row = self.store.create_api_key(&ApiKeyRow {
            id: 0,
            key_id: token.key_id.clone(),
            secret_hash: token.secret_hash(),
            description: description.to_string(),
            created_ms: now,
            expires_ms: now.saturating_add(ttl),
            revoked: false,
        })?;
        self.audit(now, actor, "apikey.create", &row.key_id, description);
        Ok((row, token.encode(auth::API_KEY_PREFIX)))
    }

    pub fn api_keys(&self) -> Result<Vec<ApiKeyRow>> {
        Ok(self.store.api_keys()?)
    }

    pub fn revoke_api_key(&self, actor: &str, key_id: &str, now: UnixMs) -> Result<()> {
        self.store.revoke_api_key(key_id)?;
        self.audit(now, actor, "apikey.revoke", key_id, "");
        Ok(())
    }

    /// Checks an API key; returns the actor name for the audit log.
    ///
    /// # Errors
    /// `Unauthenticated` for a malformed, unknown, revoked or expired key.
    pub fn check_api_key(&self, text: &str, now: UnixMs) -> Result<String> {
        let token = KeyToken::decode(auth::API_KEY_PREFIX, text)
            .map_err(|_| Error::Unauthenticated("malformed API key".into()))?;
        let keys = self.store.api_keys()?;
        let hash = token.secret_hash();
        let key = keys
            .iter()
            .find(|k| k.key_id == token.key_id)
            .filter(|k| auth::ct_eq(&k.secret_hash, &hash))
            .ok_or_else(|| Error::Unauthenticated("invalid API key".into()))?;
        if key.revoked || key.expires_ms <= now {
            return Err(Error::Unauthenticated("API key revoked or expired".into()));
        }
        Ok(format!("apikey:{}", key.key_id))
    }

    /// Generates a random ULA /48 (RFC 4193: fd00::/8 + 40 random bits).
    pub fn random_ula() -> Ipv6Net {
        let mut b = [0u8; 16];
        b[0] = 0xfd;
        OsRng.fill_bytes(&mut b[1..6]);
        Ipv6Net::new(Ipv6Addr::from(b), 48).expect("48 is a valid prefix length")
    }

    /// How many netmaps were signed since load.
    pub fn maps_signed(&self) -> u64 {
        self.maps_signed.load(Ordering::Relaxed)
    }

    pub fn serial(&self) -> u64 {
        self.lock().serial
    }
}

fn unique_name(names: &HashSet<String>, base: &str) -> String {
    let taken = |n: &str| names.contains(n);
    if !taken(base) {
        return base.to_string();
    }
    (2..)
        .map(|i| format!("{base}-{i}"))
        .find(|n| !taken(n))
        .expect("an unbounded range always finds a free name")
}

#[cfg(test)]
mod tests {
    use ztmesh_proto::keys::WgPrivateKey;

    use super::*;
    use crate::store::SqliteStore;

    const T0: UnixMs = 1_800_000_000_000;
    const POLICY: &str = r#"{
      "tagOwners": {"tag:a": []},
      "acls": [{"action": "accept", "src": ["tag:a"], "dst": ["tag:a:22,443"]}],
    }"#;

    fn open(store: Arc<dyn Store>, now: UnixMs) -> Mesh {
        Mesh::load(
            store,
            SigningKey::generate(&mut OsRng),
            [7; 32],
            Mesh::random_ula(),
            MeshConfig::default(),
            now,
        )
        .unwrap()
    }

    fn mesh() -> Mesh {
        open(Arc::new(SqliteStore::in_memory().unwrap()), T0)
    }

    /// Enrolls `n` nodes tagged `tag:a` under POLICY; returns their ids.
    fn enroll_nodes(m: &Mesh, n: usize) -> Vec<u64> {
        m.set_policy("admin", "p.hujson", POLICY, T0).unwrap();
        let (_, key) = m
            .create_auth_key("admin", None, &["tag:a".into()], true, false, None, T0)
            .unwrap();
        (0..n)
            .map(|i| {
                let machine = SigningKey::generate(&mut OsRng);
                let wg = WgPrivateKey::generate(&mut OsRng);
                let (mk, wk) = (
                    machine.public().as_bytes().to_vec(),
                    wg.public().as_bytes().to_vec(),
                );
                let host = format!("n{i}");
                let proof = machine
                    .sign(&auth::enroll_message(&key, &mk, &wk, &host, T0))
                    .to_vec();
                let req = pb::EnrollRequest {
                    auth_key: key.clone(),
                    machine_key: mk,
                    wg_key: wk,
                    hostname: host,
                    timestamp_ms: T0,
                    proof,
                };
                m.enroll(&req, T0).unwrap().node_id
            })
            .collect()
    }

    fn encoded(m: &Mesh, node: u64, now: UnixMs) -> Vec<u8> {
        let mut inner = m.lock();
        m.build(&mut inner, node, now).unwrap()
    }

    #[test]
    fn assembled_maps_are_prosts_own_encoding_and_follow_peer_changes() {
        let m = mesh();
        let ids = enroll_nodes(&m, 5);
        let body = encoded(&m, ids[0], T0);
        let map = NetMap::decode(body.as_slice()).unwrap();
        assert_eq!(map.encode_to_vec(), body, "byte-identical to prost");
        let peers: Vec<u64> = map.peers.iter().map(|p| p.id).collect();
        assert_eq!(peers, ids[1..].to_vec(), "every other node, sorted by id");
        assert!(!map.inbound_rules.is_empty());

        // Cached peer entries follow renames and endpoint reports.
        m.rename_node("admin", &ids[1].to_string(), "renamed", T0)
            .unwrap();
        m.report_endpoints(ids[2], &["192.0.2.7:51820".into()], T0)
            .unwrap();
        let body = encoded(&m, ids[0], T0);
        let map = NetMap::decode(body.as_slice()).unwrap();
        assert_eq!(map.encode_to_vec(), body);
        assert_eq!(map.peers[0].name, "renamed");
        assert_eq!(map.peers[1].endpoints, vec!["192.0.2.7:51820".to_string()]);

        // A deleted peer disappears.
        m.delete_node("admin", &ids[3].to_string(), T0).unwrap();
        let map = m.netmap(ids[0], T0).unwrap();
        assert!(map.peers.iter().all(|p| p.id != ids[3]));
    }

    #[test]
    fn persisted_serial_always_bounds_issued_serials_across_restarts() {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().unwrap());
        let m = open(store.clone(), T0);
        let ids = enroll_nodes(&m, 2);
        let stored =
            |s: &Arc<dyn Store>| -> u64 { s.meta("serial").unwrap().unwrap().parse().unwrap() };
        let mut last = 0;
        // Many maps, across several ceiling steps, faster than the clock.
        for i in 0..3_000i64 {
            let map = m.netmap(ids[0], T0 + i * 10).unwrap();
            assert!(map.serial > last);
            last = map.serial;
            assert!(
                stored(&store) >= last,
                "issued {last} above the persisted ceiling"
            );
        }
        drop(m);
        // Restart with a clock that went backwards: serials still grow.
        let m = open(store.clone(), T0 - 3_600_000);
        assert!(m.netmap(ids[0], T0 - 3_600_000).unwrap().serial > last);
    }

    #[test]
    fn a_stream_takes_its_map_and_idles_without_a_copy() {
        let m = mesh();
        let ids = enroll_nodes(&m, 2);
        let mut sub = m.open_stream(ids[0], T0).unwrap();
        assert!(matches!(*sub.rx.borrow_and_update(), Update::Map(_)));
        let first = sub.take().expect("the initial map");
        assert!(matches!(*sub.rx.borrow(), Update::Delivered));
        assert!(sub.take().is_none(), "taken once");
        assert!(!sub.rx.has_changed().unwrap(), "taking wakes nobody");

        m.set_policy("admin", "p.hujson", &POLICY.replace("22,443", "22"), T0 + 1)
            .unwrap();
        assert!(sub.rx.has_changed().unwrap());
        let next = sub.take().expect("the new map");
        let key = m.controller_key();
        let a = ztmesh_proto::netmap::verify(&key, &first, 0, T0).unwrap();
        let b = ztmesh_proto::netmap::verify(&key, &next, a.serial, T0).unwrap();
        assert_eq!(b.inbound_rules[0].ports.len(), 1);
    }

    #[test]
    fn last_seen_reaches_the_store_on_flush() {
        let m = mesh();
        let ids = enroll_nodes(&m, 1);
        let seen = |m: &Mesh| m.store().nodes().unwrap()[0].last_seen_ms;
        let sub = m.open_stream(ids[0], T0 + 5_000).unwrap();
        assert_eq!(seen(&m), T0, "deferred");
        m.flush();
        assert_eq!(seen(&m), T0 + 5_000);
        m.unsubscribe(ids[0], sub.conn, T0 + 9_000);
        m.flush();
        assert_eq!(seen(&m), T0 + 9_000);
    }
}
