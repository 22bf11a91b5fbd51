//! The coordinator: applies each change to the [`Store`], then to the pure
//! netmap core ([`NetCore`]), then signs and publishes the maps of the nodes
//! whose view changed — to exactly those that are connected.
//!
//! Two locks, never held together with I/O in between:
//! - the *turn* (`changes`) serializes changes: store write, core step and
//!   publication happen in one turn, so maps go out in the order changes
//!   were made durable;
//! - the *state* lock guards the in-memory state (the core, the sessions) and
//!   is held only for in-memory steps: never across a store write, a
//!   signature or a send. Authentication and lookups take only this one.
//!
//! All mutations take `now` as an argument; the clock is read by the API
//! layer and the background ticker only. Who may call is checked by
//! [`Authenticator`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use base64::Engine as _;
use ipnet::{IpNet, Ipv6Net};
use prost::Message as _;
use rand_core::RngCore;
use tokio::sync::watch;
use ztmesh_policy::{Compiled, NodeInfo as PolicyNode, Policy};
use ztmesh_proto::control::{self as pb, NetMap, SignedNetMap};
use ztmesh_proto::delta::{self, Digest};
use ztmesh_proto::keys::{PublicKey, SigningKey};
use ztmesh_proto::refusal::AuthReason;

use crate::auth::Authenticator;
use crate::error::{Error, Result};
use crate::metrics::{Gauges, Metrics};
use crate::model::PeerPaths;
use crate::netcore::{Change, CoreConfig, NetCore};
use crate::nodeinput::{self, validate_endpoints};
use crate::nodelimit::{Call, EndpointCoalescer};
use crate::secrets::{self, KeyDetail, SecretKind, SecretRecord};
use crate::store::{AuditEntry, NewNode, NodeRow, PolicyRow, Store, UserRow};
use crate::tlscerts::{Held, Previous, TlsCert, TlsCerts, TlsFiles};
use crate::UnixMs;

mod feed;
mod identity;
mod respond;
pub use identity::{Actor, DeviceClaim, DeviceEnrolled, UserUpdate};
pub use respond::MAX_TESTIMONIES;

/// An admin's change to a node's route approvals.
#[derive(Clone, Debug, Default)]
pub struct RouteApproval {
    pub approve: Vec<String>,
    pub unapprove: Vec<String>,
    pub approve_exit_node: bool,
    pub unapprove_exit_node: bool,
}

/// Tunables, with the defaults documented in the README.
#[derive(Clone, Debug)]
pub struct MeshConfig {
    /// How long a signed netmap stays valid; connected nodes get a fresh one at half-life.
    pub netmap_ttl_ms: i64,
    /// Key lifetime of a user's node from enrollment or sign-in, unless the
    /// user has their own; 0 = never expires.
    pub node_key_ttl_ms: i64,
    /// Key lifetime of a node owned by tags (a server); 0 = never expires.
    pub tagged_key_ttl_ms: i64,
    /// Per-tag key lifetimes overriding `tagged_key_ttl_ms` (0 = never); a
    /// node with several takes the shortest.
    pub tag_key_ttl_ms: BTreeMap<String, i64>,
    /// Ephemeral nodes are deleted after being offline this long.
    pub ephemeral_timeout_ms: i64,
    /// Default lifetime of auth keys created without `--expiry` (API keys:
    /// [`secrets::API_KEY_TTL_MS`]).
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
    /// Flow records (`flows`) older than this are pruned; 0 = keep forever.
    pub flow_max_age_ms: i64,
    /// At most this many flow records are kept, newest first; 0 = no cap.
    pub flow_max_rows: u64,
    /// At most this many of one node's flow records are kept; 0 = no cap.
    pub flow_max_rows_per_node: u64,
    /// The relays every netmap lists ([`crate::relays`]).
    pub relays: Vec<ztmesh_proto::control::Relay>,
    /// Every controller of the mesh, as nodes reach them (`NetMap.controllers`).
    pub controllers: Vec<String>,
    /// The base URL of the sign-in pages printed to nodes that log in
    /// interactively; `None`: the address the node reached the controller by.
    pub public_url: Option<String>,
    /// A node's posture report is believed this long; nodes report every
    /// third of it ([`CoreConfig::posture_interval_ms`]).
    pub posture_ttl_ms: i64,
    /// The detectors and what they do ([`crate::detect`]).
    pub detect: crate::detect::DetectConfig,
    /// Where alerts are POSTed ([`crate::alert`]); none: detections are
    /// only recorded and audited.
    pub webhook: Option<crate::alert::Webhook>,
    /// A signed-in web console session unused this long ends.
    pub web_session_idle_ms: i64,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            netmap_ttl_ms: 12 * 3600 * 1000,
            node_key_ttl_ms: 30 * 24 * 3600 * 1000,
            tagged_key_ttl_ms: 30 * 24 * 3600 * 1000,
            tag_key_ttl_ms: BTreeMap::new(),
            ephemeral_timeout_ms: 5 * 60 * 1000,
            auth_key_ttl_ms: 3600 * 1000,
            dns_domain: "ztmesh.internal".into(),
            persistent_keepalive: 25,
            endpoint_publish_interval_ms: 5_000,
            audit_max_age_ms: 90 * 24 * 3600 * 1000,
            audit_max_flow_rows: 1_000_000,
            flow_max_age_ms: 7 * 24 * 3600 * 1000,
            flow_max_rows: 1_000_000,
            flow_max_rows_per_node: 100_000,
            relays: Vec::new(),
            controllers: Vec::new(),
            public_url: None,
            posture_ttl_ms: DEFAULT_POSTURE_TTL_MS,
            detect: crate::detect::DetectConfig::default(),
            webhook: None,
            // 30 minutes, as `serve --web-session-idle` defaults.
            web_session_idle_ms: 30 * 60 * 1000,
        }
    }
}

impl MeshConfig {
    fn core(&self) -> CoreConfig {
        CoreConfig {
            netmap_ttl_ms: self.netmap_ttl_ms,
            dns_domain: self.dns_domain.clone(),
            persistent_keepalive: self.persistent_keepalive,
            relays: self.relays.clone(),
            posture_ttl_ms: self.posture_ttl_ms,
            controllers: self.controllers.clone(),
        }
    }
}

/// Default posture TTL: 10 minutes (nodes report every 200 s).
pub const DEFAULT_POSTURE_TTL_MS: i64 = 10 * 60 * 1000;

/// How far ahead of the serials actually issued the persisted serial ceiling
/// is set (in serial units, which track the clock in µs: 10 s). The store is
/// written once per step instead of once per map.
const SERIAL_STEP: u64 = 10_000_000;

/// Audit rows written for one flow report at most (plus one summary row).
pub const MAX_FLOW_ROWS_PER_REPORT: usize = 100;

/// How often `last_seen` of connected nodes is refreshed (then written by
/// [`Mesh::flush`] in one transaction), so a restart finds it recent.
pub const SEEN_REFRESH_MS: u64 = 60_000;

/// How far past the lowest free address an enrollment that lost a race
/// looks: at random in 1..=4096.
#[expect(
    clippy::disallowed_types,
    reason = "spreads controllers racing for addresses; any value is correct"
)]
fn race_skip() -> u32 {
    use rand_core::{OsRng, RngCore};
    1 + OsRng.next_u32() % 4096
}

/// Maps encoded per hold of the state lock while publishing.
const PUBLISH_BATCH: usize = 32;

/// A map encoded under the state lock, to be signed and sent outside it
/// (`None`: the node is no longer active; its stream is closed).
struct Outgoing {
    id: u64,
    conn: u64,
    tx: Arc<watch::Sender<Update>>,
    body: Option<Vec<u8>>,
    /// The stream takes deltas; `base` is its previous map's digest.
    deltas: bool,
    base: Option<Digest>,
}

/// Puts `update` into a stream's channel. A map whose predecessor is still
/// in the channel (the stream has not taken it) loses its delta: the node
/// never gets that predecessor, so the delta would not follow its map.
fn deliver(tx: &watch::Sender<Update>, mut update: Update) {
    tx.send_modify(|v| {
        if let (Update::Map(_), Update::Map(next)) = (&*v, &mut update) {
            if let Some(next) = Arc::get_mut(next) {
                next.delta = None;
            }
        }
        *v = update;
    });
}

/// What a node's netmap stream receives.
#[derive(Clone, Debug)]
pub enum Update {
    /// A full map; on a stream that takes deltas it may also carry its
    /// delta against the stream's previous map, and the stream sends one
    /// of the two (see [`SignedNetMap`]'s wire rule).
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
    /// The node takes deltas ([`ztmesh_proto::delta`]).
    deltas: bool,
    /// The digest of the last map put into the channel (streams that take
    /// deltas only); taken out while a publisher builds the next map.
    digest: Option<Digest>,
}

impl Subscription {
    /// Whether the stream's receivers still exist: once the transport is
    /// gone its response body is dropped, and with it (after the queued
    /// unsubscribe ran) the receivers.
    fn is_live(&self) -> bool {
        !self.tx.is_closed()
    }
}

/// The in-memory state: the netmap core and the sessions around it.
struct State {
    core: NetCore,
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
    /// What each node's last posture report had clipped (audited when it
    /// changes).
    posture_clipped: HashMap<u64, Vec<String>>,
    /// Per connected node: the serial of its newest map and when the oldest
    /// change not yet applied began (`None`: only the stream's first map is
    /// pending, which is not a sample), until the node reports it applied
    /// (one entry per node: see [`Mesh::netmap_applied`]).
    unacked: HashMap<u64, (u64, Option<UnixMs>)>,
    /// The newest change-log entry applied ([`Mesh::catch_up`]).
    feed_pos: u64,
    /// Each node's last report of its peers by path: one fixed-size entry
    /// per node in the core, removed when the node leaves.
    paths: HashMap<u64, PeerPaths>,
}

impl State {
    fn seen(&mut self, node: u64, now: UnixMs) {
        self.core.set_last_seen(node, now);
        self.seen_dirty.insert(node, now);
    }
}

/// Proof that the caller holds the turn: changes and publications happen
/// one at a time, in order.
type Turn<'a> = MutexGuard<'a, ()>;

/// Shared controller state.
pub struct Mesh {
    store: Arc<dyn Store>,
    /// The netmap signing key, replaced by [`Mesh::rotate_signing`].
    signing: RwLock<Signing>,
    /// Where the signing key's files are (`None`: keys in memory only,
    /// which cannot be rotated).
    key_files: Option<crate::signing::KeyFiles>,
    /// The TLS certificates the listener presents and their files
    /// (`None`: an identity without files, which cannot be rotated).
    tls: Option<(Arc<TlsCerts>, TlsFiles)>,
    /// When [`Mesh::end_tls_previous`] may next list the auth keys (it
    /// rechecks at most once a minute while keys keep the previous
    /// certificate).
    tls_recheck_ms: std::sync::atomic::AtomicI64,
    ula: Ipv6Net,
    cfg: MeshConfig,
    auth: Authenticator,
    /// Serializes changes (see the module docs).
    changes: Mutex<()>,
    state: Mutex<State>,
    /// Netmaps signed since load (a cost metric: every signature is work).
    maps_signed: AtomicU64,
    /// When each refused source was last audited ([`Mesh::audit_refusal`]).
    refusals: Mutex<HashMap<String, UnixMs>>,
    /// Counters and histograms for `/metrics`.
    metrics: Arc<Metrics>,
    /// Recent evidence about nodes ([`crate::detect`]).
    detector: Mutex<crate::detect::Detector>,
    /// Where alerts go (the webhook task), if a webhook is configured.
    alerts: Option<tokio::sync::mpsc::Sender<crate::alert::AlertJob>>,
    /// One of several controllers on a shared database ([`Mesh::shared`]).
    shared: AtomicBool,
    /// Whether this controller runs the singleton tasks ([`Mesh::set_leader`]).
    leader: AtomicBool,
}

/// The netmap signing key and what every map carries about the
/// controller's trust roots: during a signing-key rotation's grace period
/// the hand-over, during a TLS certificate rotation the pins.
struct Signing {
    key: SigningKey,
    /// The hand-over and the end of its grace period.
    handover: Option<(pb::KeyHandover, UnixMs)>,
    /// The TLS pins maps carry (empty: none).
    tls_pins: Vec<[u8; 32]>,
    /// The encoded `NetMap.trust` field appended to every map (empty:
    /// none), built by [`Signing::retrust`] whenever either part changes.
    trust: Vec<u8>,
}

impl Signing {
    fn new(key: SigningKey) -> Self {
        Self {
            key,
            handover: None,
            tls_pins: Vec::new(),
            trust: Vec::new(),
        }
    }

    /// The end of the hand-over's grace period, if one is in force.
    fn handover_until(&self) -> Option<UnixMs> {
        self.handover.as_ref().map(|(_, until)| *until)
    }

    /// Rebuilds the encoded trust field after `handover` or `tls_pins` changed.
    fn retrust(&mut self) {
        self.trust = trust_field(
            self.handover.as_ref().map(|(h, _)| h.clone()),
            &self.tls_pins,
        );
    }
}

/// `NetMap.trust` carrying hand-over `h` and `tls_pins`, encoded alone (to
/// append to a map); empty when there is neither.
fn trust_field(h: Option<pb::KeyHandover>, tls_pins: &[[u8; 32]]) -> Vec<u8> {
    if h.is_none() && tls_pins.is_empty() {
        return Vec::new();
    }
    NetMap {
        trust: Some(pb::ControllerTrust {
            handover: h,
            tls_pins: tls_pins.iter().map(|p| p.to_vec()).collect(),
        }),
        ..NetMap::default()
    }
    .encode_to_vec()
}

/// How often a retained previous TLS certificate's auth keys are listed
/// again once its grace period is over.
const TLS_RECHECK_MS: i64 = 60_000;

/// Whether `k` is a single-use auth key that enrolled its node.
fn used_up(k: &SecretRecord) -> bool {
    matches!(
        k.detail,
        KeyDetail::Auth {
            reusable: false,
            used_count: 1..,
            ..
        }
    )
}

/// Shortest and longest grace period of a signing-key rotation.
pub const MIN_HANDOVER_GRACE_MS: i64 = 1_000;
pub const MAX_HANDOVER_GRACE_MS: i64 = 365 * 24 * 3_600_000;

/// What one enrollment attempt produced.
enum Enrolled {
    /// A new node's row, stored.
    New(Box<NodeRow>),
    /// A known machine re-authenticated: the reply.
    Again(pb::EnrollResponse),
}

/// How long change-log entries are kept.
const CHANGE_LOG_AGE_MS: i64 = 10 * 60 * 1000;

/// Enrollment attempts when a race with another controller takes the name
/// or address picked.
const ENROLL_ATTEMPTS: u32 = 10;

/// A refused source is audited at most once per this interval.
pub const REFUSAL_AUDIT_INTERVAL_MS: i64 = 60_000;
/// Refused sources remembered per interval.
pub const MAX_REFUSAL_SOURCES: usize = 4096;

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

/// The audit detail of a new key: what it grants.
fn audit_detail(detail: &KeyDetail) -> String {
    match detail {
        KeyDetail::Auth {
            user,
            tags,
            reusable,
            ephemeral,
            ..
        } => format!(
            "user={} tags={} reusable={reusable} ephemeral={ephemeral}",
            user.as_deref().unwrap_or("-"),
            tags.join(",")
        ),
        KeyDetail::Api { description, role } => format!("role={role} {description}"),
    }
}

impl Mesh {
    /// Audits keys that ran out (see [`expiring`]).
    fn audit_expired(&self, expired: &[(String, UnixMs)], now: UnixMs) {
        for (name, at) in expired {
            self.audit(
                now,
                "controller",
                "node.key-expired",
                name,
                &format!("expiry_ms={at}"),
            );
        }
    }
}

/// Nodes whose keys run out when the core's clock moves to `now` (an
/// admin's expiry was audited when it was made).
fn expiring(core: &NetCore, now: UnixMs) -> Vec<(String, UnixMs)> {
    let before = core.clock();
    core.nodes()
        .iter()
        .filter(|n| !n.key_revoked && n.expiry_ms > before && n.expiry_ms <= now)
        .map(|n| (n.name.clone(), n.expiry_ms))
        .collect()
}

/// What changed between two attribute sets, for the audit log:
/// `node:firewall: true -> false; custom:tier: set 'gold'; node:kernel: removed`.
fn attribute_changes(
    old: &BTreeMap<String, ztmesh_policy::AttrValue>,
    new: &BTreeMap<String, ztmesh_policy::AttrValue>,
) -> String {
    let mut parts = Vec::new();
    for (k, v) in new {
        match old.get(k) {
            Some(o) if o == v => {}
            Some(o) => parts.push(format!("{k}: {o} -> {v}")),
            None => parts.push(format!("{k}: set {v}")),
        }
    }
    for k in old.keys().filter(|k| !new.contains_key(*k)) {
        parts.push(format!("{k}: removed"));
    }
    parts.join("; ")
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
        // The log position first: a change made while the state is read
        // is applied again by the first catch-up, which is harmless.
        let feed_pos = store.change_head()?;
        let nodes = store.nodes()?;
        let policy_row = store.policy()?;
        let policy = feed::stored_policy(policy_row.as_ref());
        // Nobody is connected yet: every ephemeral node's offline time
        // starts now, which is the grace period after a restart.
        let offline_since = nodes
            .iter()
            .filter(|n| n.ephemeral)
            .map(|n| (n.id, 0))
            .collect();
        let core = NetCore::new(cfg.core(), policy, nodes, now);
        // Serials must grow across restarts: start above both the stored value
        // and the clock (in µs), whichever is larger.
        let stored: u64 = store
            .meta("serial")?
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        // The stored value bounds every serial ever issued (it is written
        // before a serial beyond it goes out), so this start is above all of them.
        let serial = stored.max(clock_serial(now));
        let state = State {
            core,
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
            offline_since,
            seen_refreshed: 0,
            posture_clipped: HashMap::new(),
            unacked: HashMap::new(),
            feed_pos,
            paths: HashMap::new(),
        };
        Ok(Self {
            store,
            signing: RwLock::new(Signing::new(signer)),
            key_files: None,
            tls: None,
            tls_recheck_ms: std::sync::atomic::AtomicI64::new(0),
            ula,
            auth: Authenticator::new(fingerprint),
            changes: Mutex::new(()),
            state: Mutex::new(state),
            maps_signed: AtomicU64::new(0),
            refusals: Mutex::new(HashMap::new()),
            metrics: Arc::new(Metrics::default()),
            detector: Mutex::new(crate::detect::Detector::new(cfg.detect.clone())),
            alerts: None,
            shared: AtomicBool::new(false),
            leader: AtomicBool::new(true),
            cfg,
        })
    }

    /// Sends alerts to `tx` (the webhook task, [`crate::alert`]).
    pub fn with_alerts(mut self, tx: tokio::sync::mpsc::Sender<crate::alert::AlertJob>) -> Self {
        self.alerts = Some(tx);
        self
    }

    /// Uses `metrics` (shared with the store wrapper) instead of the
    /// mesh's own.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The facts `/metrics` shows as gauges: nodes by state, open streams.
    pub fn gauges(&self, now: UnixMs) -> Gauges {
        let st = self.state();
        let mut g = Gauges {
            streams: st.subs.len() as u64,
            ..Gauges::default()
        };
        for n in st.core.nodes().iter() {
            if n.key_revoked || (n.expiry_ms != 0 && n.expiry_ms <= now) {
                g.expired += 1;
            } else if n.quarantine.is_some() {
                g.quarantined += 1;
            } else if st.online.contains(&n.id) {
                g.online += 1;
            } else {
                g.offline += 1;
            }
        }
        g
    }

    /// A node reports the map with `serial` applied: the time since the
    /// change behind it began is observed as propagation latency. Only the
    /// node's newest map counts, once: an older, unknown or repeated serial
    /// is ignored, so a node can report nothing but its own pending map.
    pub fn netmap_applied(&self, node: u64, serial: u64, now: UnixMs) {
        let began = {
            let mut st = self.state();
            match st.unacked.get(&node) {
                Some(&(pending, began)) if pending == serial => {
                    st.unacked.remove(&node);
                    Some(began)
                }
                _ => None,
            }
        };
        match began {
            Some(Some(b)) => self.metrics.netmap_applied(Some(now.saturating_sub(b))),
            // The stream's first map: applied, but not a change.
            Some(None) => {}
            None => self.metrics.netmap_applied(None),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for the turn to change something.
    fn turn(&self) -> Turn<'_> {
        self.changes.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn controller_key(&self) -> PublicKey {
        self.signing().key.public()
    }

    fn signing(&self) -> std::sync::RwLockReadGuard<'_, Signing> {
        self.signing.read().unwrap_or_else(|p| p.into_inner())
    }

    fn signing_mut(&self) -> std::sync::RwLockWriteGuard<'_, Signing> {
        self.signing.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the signing key in `files`, so [`Mesh::rotate_signing`] can
    /// replace it; `handover` is the statement found there (see
    /// [`crate::signing::load`]), carried by every map until its grace
    /// period ends at `now` or later.
    pub fn with_key_files(
        mut self,
        files: crate::signing::KeyFiles,
        handover: Option<pb::KeyHandover>,
        now: UnixMs,
    ) -> Self {
        if let Some(h) = handover {
            let current = self.controller_key();
            match ztmesh_proto::handover::read(&h) {
                Ok(r) if r.new_key == current && now < r.not_after_ms => {
                    let s = self.signing.get_mut().unwrap_or_else(|p| p.into_inner());
                    s.handover = Some((h, r.not_after_ms));
                    s.retrust();
                    tracing::info!(old = %r.old_key, until_ms = r.not_after_ms, "maps carry the hand-over from the previous signing key");
                }
                Ok(_) => {
                    if let Err(e) = crate::signing::remove_handover(&files) {
                        tracing::warn!(error = %e, "cannot remove the ended hand-over");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "ignoring the stored hand-over"),
            }
        }
        self.key_files = Some(files);
        self
    }

    /// Replaces the netmap signing key with `new` (an admin's
    /// `keys rotate-signing`): the key in force signs a hand-over to `new`
    /// valid for `grace_ms`, which every map carries meanwhile, so each node
    /// moves to `new` with its next map and refuses the old key from then
    /// on. The old private key is deleted: nothing signs with it again.
    /// Every connected node gets a map at once.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a grace period out of range;
    /// [`Error::FailedPrecondition`] while a previous hand-over is still in
    /// its grace period (nodes that have not moved would be cut off), or
    /// for a controller without key files.
    pub fn rotate_signing(
        &self,
        actor: &str,
        new: SigningKey,
        grace_ms: i64,
        now: UnixMs,
    ) -> Result<ztmesh_proto::handover::Handover> {
        if !(MIN_HANDOVER_GRACE_MS..=MAX_HANDOVER_GRACE_MS).contains(&grace_ms) {
            return Err(Error::Invalid(
                "grace period must be between 1s and 365 days".into(),
            ));
        }
        let files = self.key_files.as_ref().ok_or_else(|| {
            Error::FailedPrecondition("this controller keeps no key files to rotate".into())
        })?;
        let turn = self.turn();
        let (h, old) = {
            let s = self.signing();
            if let Some(until) = s.handover_until() {
                if now < until {
                    return Err(Error::FailedPrecondition(format!(
                        "the previous signing key is still handed over until {} (unix ms); \
                         rotate again after that, or nodes that have not moved yet are cut off",
                        until
                    )));
                }
            }
            let h = ztmesh_proto::handover::sign(&s.key, &new, now, now.saturating_add(grace_ms));
            (h, s.key.public())
        };
        let r = ztmesh_proto::handover::read(&h).map_err(|e| Error::Invalid(e.to_string()))?;
        // The statement first (the audit log's checkpoints of the old key
        // stay verifiable through it), then the files, then the identity
        // other controllers on the database are checked against.
        let mut list = self
            .store
            .meta(crate::store::SIGNING_HANDOVERS)?
            .unwrap_or_default();
        list.push_str(&base64::engine::general_purpose::STANDARD.encode(h.encode_to_vec()));
        list.push('\n');
        self.store
            .set_meta(crate::store::SIGNING_HANDOVERS, &list)?;
        if let Err(e) = crate::signing::write_rotation(files, &new, &h) {
            tracing::error!(error = %e, "cannot write the new signing key");
            return Err(Error::FailedPrecondition(
                "cannot write the new signing key into the data dir (see the controller's log); \
                 the old key stays in force"
                    .into(),
            ));
        }
        if let Err(e) = self
            .store
            .set_meta("controller_key", &new.public().to_string())
        {
            tracing::error!(error = %e, "cannot record the new signing key in the database");
        }
        {
            let mut s = self.signing_mut();
            s.key = new;
            s.handover = Some((h, r.not_after_ms));
            s.retrust();
        }
        self.audit(
            now,
            actor,
            "controller.rotate-signing",
            &r.new_key.to_string(),
            &format!("old={old} grace_until_ms={}", r.not_after_ms),
        );
        let connected: BTreeSet<u64> = self.state().subs.keys().copied().collect();
        tracing::warn!(old = %old, new = %r.new_key, until_ms = r.not_after_ms, nodes = connected.len(), "netmap signing key replaced; handing over");
        self.publish(&turn, &connected, now);
        Ok(r)
    }

    /// The key maps are signed with, and when the hand-over to it ends
    /// (`None`: no rotation in its grace period).
    pub fn signing_state(&self) -> (PublicKey, Option<UnixMs>) {
        let s = self.signing();
        (s.key.public(), s.handover_until())
    }

    /// Ends a hand-over whose grace period is over: maps stop carrying it
    /// and its file goes. A node that still holds the old key re-enrolls.
    fn end_handover(&self, now: UnixMs) {
        let due = self
            .signing()
            .handover_until()
            .is_some_and(|until| now >= until);
        if !due {
            return;
        }
        let key = {
            let mut s = self.signing_mut();
            s.handover = None;
            s.retrust();
            s.key.public()
        };
        if let Some(f) = &self.key_files {
            if let Err(e) = crate::signing::remove_handover(f) {
                tracing::warn!(error = %e, "cannot remove the ended hand-over");
            }
        }
        tracing::info!(key = %key, "the signing key's hand-over ended; the old key is refused everywhere");
        self.audit(
            now,
            "controller",
            "controller.handover-end",
            &key.to_string(),
            "",
        );
    }

    /// Serves the TLS certificates `held` (kept in `files`): new auth keys
    /// carry the current one's fingerprint, auth keys of any held one are
    /// accepted, and maps carry the pins while a rotation is under way.
    pub fn with_tls(mut self, held: Held, files: TlsFiles) -> Self {
        let certs = TlsCerts::new(held);
        self.tls = Some((certs, files));
        self.retrust_tls();
        self
    }

    /// The certificates the listener presents (see [`Mesh::with_tls`]).
    pub fn tls_certs(&self) -> Option<Arc<TlsCerts>> {
        self.tls.as_ref().map(|(c, _)| c.clone())
    }

    /// What is held now: current, next, previous.
    pub fn tls_state(&self) -> Option<Held> {
        self.tls.as_ref().map(|(c, _)| c.read().clone())
    }

    fn tls_parts(&self) -> Result<&(Arc<TlsCerts>, TlsFiles)> {
        self.tls.as_ref().ok_or_else(|| {
            Error::FailedPrecondition("this controller keeps no TLS files to rotate".into())
        })
    }

    /// After the held certificates changed: the fingerprints auth keys are
    /// accepted for and the pins maps carry follow.
    fn retrust_tls(&self) {
        let Some((certs, _)) = &self.tls else {
            return;
        };
        let (current, all, pins) = {
            let h = certs.read();
            (h.current.fingerprint, h.fingerprints(), h.pins())
        };
        self.auth.set_fingerprints(current, &all);
        let mut s = self.signing_mut();
        if s.tls_pins != pins {
            s.tls_pins = pins;
            s.retrust();
        }
    }

    fn publish_all(&self, turn: &Turn<'_>, now: UnixMs) {
        let connected: BTreeSet<u64> = self.state().subs.keys().copied().collect();
        self.publish(turn, &connected, now);
    }

    /// Stages `next` as the certificate to switch to (`tls rotate`): every
    /// map lists its pin from now on, so nodes learn it before the switch.
    /// A certificate staged before is replaced.
    ///
    /// # Errors
    /// [`Error::FailedPrecondition`] without TLS files or when they cannot
    /// be written.
    pub fn tls_stage(&self, actor: &str, next: TlsCert, now: UnixMs) -> Result<[u8; 32]> {
        let (certs, files) = self.tls_parts()?;
        let turn = self.turn();
        let fp = next.fingerprint;
        if certs.read().current.fingerprint == fp {
            return Err(Error::Invalid(
                "that certificate is already the current one".into(),
            ));
        }
        if let Err(e) = files.write_next(&next) {
            tracing::error!(error = %e, "cannot write the staged TLS certificate");
            return Err(Error::FailedPrecondition(
                "cannot write the staged certificate into the data dir (see the controller's log)"
                    .into(),
            ));
        }
        certs.write().next = Some(next);
        self.retrust_tls();
        let hexfp = ztmesh_proto::auth::hex(&fp);
        self.audit(now, actor, "controller.tls-stage", &hexfp, "");
        tracing::warn!(next = %hexfp, "TLS certificate staged; maps list its pin");
        self.publish_all(&turn, now);
        Ok(fp)
    }

    /// Makes the staged certificate current (`tls switch`): the listener
    /// presents it from the next handshake; the old one is retained, for
    /// clients that ask for it, for at least `grace_ms` and while any auth
    /// key created before now is live.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a grace period out of range;
    /// [`Error::FailedPrecondition`] with nothing staged, while a previous
    /// certificate is still retained, or when the files cannot be written.
    pub fn tls_switch(&self, actor: &str, grace_ms: i64, now: UnixMs) -> Result<Held> {
        if !(0..=MAX_HANDOVER_GRACE_MS).contains(&grace_ms) {
            return Err(Error::Invalid(
                "grace period must be between 0 and 365 days".into(),
            ));
        }
        let (certs, files) = self.tls_parts()?;
        let turn = self.turn();
        let after = {
            let h = certs.read();
            let Some(next) = h.next.clone() else {
                return Err(Error::FailedPrecondition(
                    "no certificate is staged: run `tls rotate` first".into(),
                ));
            };
            if let Some(p) = &h.previous {
                return Err(Error::FailedPrecondition(format!(
                    "the previous certificate {} is still retained (until {} unix ms and while                      auth keys created before its switch are live); switch again after it goes",
                    ztmesh_proto::auth::hex(&p.cert.fingerprint),
                    p.until_ms
                )));
            }
            Held {
                current: next,
                next: None,
                previous: Some(Previous {
                    cert: h.current.clone(),
                    switched_ms: now,
                    until_ms: now.saturating_add(grace_ms),
                }),
            }
        };
        if let Err(e) = files.write_switch(&after) {
            tracing::error!(error = %e, "cannot write the switched TLS certificates");
            return Err(Error::FailedPrecondition(
                "cannot write the certificates into the data dir (see the controller's log);                  the current certificate stays in force"
                    .into(),
            ));
        }
        *certs.write() = after.clone();
        self.retrust_tls();
        let (cur, old) = (
            ztmesh_proto::auth::hex(&after.current.fingerprint),
            after
                .previous
                .as_ref()
                .map(|p| ztmesh_proto::auth::hex(&p.cert.fingerprint))
                .unwrap_or_default(),
        );
        self.audit(
            now,
            actor,
            "controller.tls-switch",
            &cur,
            &format!("previous={old} grace_ms={grace_ms}"),
        );
        tracing::warn!(current = %cur, previous = %old, "TLS certificate switched");
        self.publish_all(&turn, now);
        Ok(after)
    }

    /// Removes the retained previous certificate once its grace period is
    /// over and no unrevoked, unexpired auth key created before its switch
    /// remains (those keys carry its fingerprint).
    fn end_tls_previous(&self, now: UnixMs) {
        let Some((certs, files)) = &self.tls else {
            return;
        };
        let Some((switched, until)) = certs
            .read()
            .previous
            .as_ref()
            .map(|p| (p.switched_ms, p.until_ms))
        else {
            return;
        };
        if now < until || now < self.tls_recheck_ms.load(Ordering::Relaxed) {
            return;
        }
        self.tls_recheck_ms
            .store(now.saturating_add(TLS_RECHECK_MS), Ordering::Relaxed);
        let keys = match self.store.keys(SecretKind::AuthKey) {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list auth keys; the previous TLS certificate stays");
                return;
            }
        };
        if keys
            .iter()
            .any(|k| !k.revoked && k.expires_ms > now && k.created_ms <= switched && !used_up(k))
        {
            return;
        }
        let turn = self.turn();
        let Some(gone) = certs.write().previous.take() else {
            return;
        };
        if let Err(e) = files.remove_previous() {
            tracing::warn!(error = %e, "cannot remove the previous TLS certificate's files");
        }
        self.retrust_tls();
        let fp = ztmesh_proto::auth::hex(&gone.cert.fingerprint);
        tracing::info!(previous = %fp, "the previous TLS certificate is no longer presented");
        self.audit(now, "controller", "controller.tls-previous-end", &fp, "");
        self.publish_all(&turn, now);
    }

    /// Takes and releases the state lock: the service watchdog's check that
    /// the mesh still answers (a lock held forever stops the keep-alives).
    pub fn probe(&self) {
        drop(self.state());
    }

    pub fn fingerprint(&self) -> [u8; 32] {
        self.auth.fingerprint()
    }

    pub fn config(&self) -> &MeshConfig {
        &self.cfg
    }

    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    fn audit(&self, now: UnixMs, actor: &str, action: &str, target: &str, detail: &str) {
        if let Err(e) = self.store.audit(now, actor, action, target, detail) {
            tracing::error!(error = %e, action, "cannot write audit record");
        }
    }

    // ---- publication ----------------------------------------------------------

    /// The next serial: above the last one and at least the clock in µs.
    /// Before it passes the persisted ceiling, a new ceiling is written, so
    /// after a restart (which starts at the stored ceiling) serials still grow.
    /// One serial serves every map of one publication: serials only need to
    /// grow per node.
    fn next_serial(&self, _turn: &Turn<'_>, now: UnixMs) -> u64 {
        let floor = {
            let st = self.state();
            st.serial.saturating_add(1).max(clock_serial(now))
        };
        // Several controllers: the database's serial, so a node that moves
        // to another controller still sees its serials grow.
        match self.store.take_serial(floor) {
            Ok(Some(serial)) => {
                let mut st = self.state();
                st.serial = serial.max(st.serial);
                return st.serial;
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "cannot take a netmap serial from the database"),
        }
        let (serial, ceiling) = {
            let mut st = self.state();
            let serial = st.serial.saturating_add(1).max(clock_serial(now));
            st.serial = serial;
            (serial, st.serial_ceiling)
        };
        if serial > ceiling {
            let ceiling = serial.saturating_add(SERIAL_STEP);
            match self.store.set_meta("serial", &ceiling.to_string()) {
                Ok(()) => self.state().serial_ceiling = ceiling,
                Err(e) => tracing::error!(error = %e, "cannot persist netmap serial"),
            }
        }
        serial
    }

    fn sign(&self, body: Vec<u8>) -> SignedNetMap {
        self.maps_signed.fetch_add(1, Ordering::Relaxed);
        self.metrics.netmap_built();
        let s = self.signing();
        let mut body = body;
        // Field 14, after the core's fields 1..=13: still prost's own
        // order, so a node's re-encoded delta result is these bytes.
        body.extend_from_slice(&s.trust);
        ztmesh_proto::netmap::sign_encoded(&s.key, body)
    }

    /// Signs `body` for a stream. For a stream that takes deltas, the map
    /// also carries its delta against `base` (the digest of the stream's
    /// previous map), and the digest of this map is returned for the next.
    fn sign_for(
        &self,
        body: Vec<u8>,
        deltas: bool,
        base: Option<&Digest>,
    ) -> (SignedNetMap, Option<Digest>) {
        let mut signed = self.sign(body);
        if !deltas {
            return (signed, None);
        }
        // Read from the encoded map: only what changed is decoded. The
        // core encoded it, so `None` cannot happen; the map then goes in
        // full and the next one too.
        let digest = match base {
            Some(base) => delta::diff_encoded(base, &signed.netmap, signed.signature.clone()).map(
                |(d, digest)| {
                    signed.delta = Some(Box::new(d));
                    digest
                },
            ),
            None => Digest::of_encoded(&signed.netmap),
        };
        (signed, digest)
    }

    /// Metrics for a map a stream sent.
    pub fn netmap_sent(&self, bytes: usize, delta: bool) {
        self.metrics.netmap_sent(bytes, delta);
    }

    /// Sends fresh maps to the connected nodes among `changed`, and tells a
    /// connected node that is no longer active that its stream is over.
    /// Maps are encoded under the state lock, signed and sent outside it.
    fn publish(&self, turn: &Turn<'_>, changed: &BTreeSet<u64>, now: UnixMs) {
        self.publish_with(turn, changed, &BTreeSet::new(), now);
    }

    /// [`Mesh::publish`], where the maps of `refreshed` are re-sent only
    /// because they age (nothing changed for them): their acknowledgements
    /// are not propagation samples.
    fn publish_with(
        &self,
        turn: &Turn<'_>,
        changed: &BTreeSet<u64>,
        refreshed: &BTreeSet<u64>,
        now: UnixMs,
    ) {
        // The posture results that flipped with this change are audited
        // after the maps are out, in one transaction: a policy change that
        // flips thousands must not hold the maps back.
        let events = self.posture_events(now);
        self.publish_maps(turn, changed, refreshed, now);
        if !events.is_empty() {
            if let Err(e) = self.store.audit_batch(&events) {
                tracing::error!(error = %e, rows = events.len(), "cannot write posture audit records");
            }
        }
    }

    fn publish_maps(
        &self,
        turn: &Turn<'_>,
        changed: &BTreeSet<u64>,
        refreshed: &BTreeSet<u64>,
        now: UnixMs,
    ) {
        if changed.is_empty() {
            return;
        }
        let connected = {
            let st = self.state();
            changed.iter().any(|id| st.subs.contains_key(id))
        };
        if !connected {
            return;
        }
        let serial = self.next_serial(turn, now);
        let ids: Vec<u64> = changed.iter().copied().collect();
        let mut sent = Vec::with_capacity(ids.len());
        // In batches, so the first nodes get their maps while later ones are
        // still being encoded, and no lock window grows with the mesh.
        for batch in ids.chunks(PUBLISH_BATCH) {
            let outbox: Vec<Outgoing> = {
                let mut guard = self.state();
                let st = &mut *guard;
                let outbox: Vec<Outgoing> = batch
                    .iter()
                    .filter_map(|&id| {
                        // Connected nodes only: a map is built for a stream.
                        let sub = st.subs.get_mut(&id)?;
                        let body = st.core.encode(id, serial, now);
                        Some(Outgoing {
                            id,
                            conn: sub.conn,
                            tx: sub.tx.clone(),
                            body,
                            deltas: sub.deltas,
                            base: sub.digest.take(),
                        })
                    })
                    .collect();
                // Pending before the map leaves, so that no acknowledgement
                // can come first; a node that has not applied an earlier
                // change yet keeps that change's start (the oldest one).
                for o in &outbox {
                    if o.body.is_some() && !refreshed.contains(&o.id) {
                        st.unacked
                            .entry(o.id)
                            .and_modify(|e| {
                                e.0 = serial;
                                e.1.get_or_insert(now);
                            })
                            .or_insert((serial, Some(now)));
                    }
                }
                outbox
            };
            for o in outbox {
                let (update, digest) = match o.body {
                    Some(b) => {
                        let (signed, digest) = self.sign_for(b, o.deltas, o.base.as_ref());
                        (Update::Map(Arc::new(signed)), digest)
                    }
                    None => (
                        Update::Closed(
                            AuthReason::Revoked,
                            "node was deleted or has expired".into(),
                        ),
                        None,
                    ),
                };
                deliver(&o.tx, update);
                sent.push((o.id, o.conn, digest));
            }
        }
        let mut st = self.state();
        let mono = st.mono;
        for (id, conn, digest) in &mut sent {
            if let Some(sub) = st.subs.get_mut(id).filter(|s| s.conn == *conn) {
                sub.last_sent_mono = mono;
                sub.digest = digest.take();
            }
        }
        tracing::debug!(changed = changed.len(), sent = sent.len(), "netmaps pushed");
    }

    /// Applies `change` to the core and publishes the result; the change
    /// must already be durable.
    fn apply(&self, turn: &Turn<'_>, change: Change, now: UnixMs) {
        let changed = self.state().core.apply(change);
        self.publish(turn, &changed, now);
    }

    /// The netmap of `node` as of now (unsigned), if the node is active.
    pub fn netmap(&self, node: u64, now: UnixMs) -> Option<NetMap> {
        let turn = self.turn();
        let serial = self.next_serial(&turn, now);
        self.state().core.netmap(node, serial, now)
    }

    /// How many netmaps were signed since load.
    pub fn maps_signed(&self) -> u64 {
        self.maps_signed.load(Ordering::Relaxed)
    }

    pub fn serial(&self) -> u64 {
        self.state().serial
    }

    // ---- who is calling ----------------------------------------------------

    /// Charges one `call` to an authenticated `node`.
    ///
    /// # Errors
    /// [`Error::Throttled`] naming the call, the limit and when to retry.
    pub fn throttle(&self, node: u64, call: Call, now: UnixMs) -> Result<()> {
        self.auth
            .throttle(node, call, now)
            .inspect_err(|_| self.metrics.call_refused("throttled"))
    }

    /// Verifies the node proof in `metadata` for `method` and returns the node.
    ///
    /// # Errors
    /// As [`Authenticator::verify_node`].
    pub fn authenticate(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        method: &str,
        now: UnixMs,
    ) -> Result<NodeRow> {
        self.authenticate_from(metadata, method, now, false)
    }

    /// [`Mesh::authenticate`] for a caller whose source may be over its
    /// failure limit (see [`Authenticator::verify_node`]). The state lock is
    /// held only for the key lookup.
    ///
    /// # Errors
    /// As [`Authenticator::verify_node`].
    pub fn authenticate_from(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        method: &str,
        now: UnixMs,
        source_limited: bool,
    ) -> Result<NodeRow> {
        self.auth
            .verify_node(metadata, method, now, source_limited, |key| {
                let known = self.state().core.nodes().by_machine_key(key).cloned();
                match known {
                    // Enrolled (or re-authenticated) through another
                    // controller a moment ago: read the change log once.
                    None if self.shared.load(Ordering::SeqCst) => {
                        self.sync(now);
                        self.state().core.nodes().by_machine_key(key).cloned()
                    }
                    known => known,
                }
            })
    }

    /// Proofs currently remembered by the replay cache.
    pub fn replay_cache_len(&self) -> usize {
        self.auth.replay_cache_len()
    }

    // ---- node enrollment and sessions ------------------------------------

    /// Checks an interactive login request (see [`Authenticator::check_login`]).
    ///
    /// # Errors
    /// As [`Authenticator::check_login`].
    pub fn check_login(
        &self,
        req: &pb::LoginRequest,
        now: UnixMs,
    ) -> Result<(DeviceClaim, String)> {
        self.auth.check_login(req, now)
    }

    /// Checks the auth key and the proof, consumes the key and registers the node.
    ///
    /// # Errors
    /// `Unauthenticated` for a bad key or proof, `Invalid` for malformed fields,
    /// `Conflict` if the machine key is enrolled with another WireGuard key,
    /// `KeyRefused` if it is enrolled with another owner than the key's (an
    /// enrolled machine key with a matching key is re-authenticated).
    pub fn enroll(&self, req: &pb::EnrollRequest, now: UnixMs) -> Result<pb::EnrollResponse> {
        let claim = self.auth.check_enroll(req, now)?;
        let turn = self.turn();
        let key = &claim.key;
        // The key's owner sets the node's key lifetime; the check inside the
        // store's transaction below is what admits it.
        let (owner, tags) = match self.store.find_key(SecretKind::AuthKey, key.key_id())? {
            Some(SecretRecord {
                detail: KeyDetail::Auth { user, tags, .. },
                ..
            }) => (
                match user {
                    Some(u) => self.store.users()?.into_iter().find(|x| x.login == u),
                    None => None,
                },
                tags,
            ),
            _ => (None, Vec::new()),
        };
        let expiry_ms = Self::expiry_at(self.key_ttl(owner.as_ref(), &tags), now);
        let mut attempt = 0;
        let row = loop {
            // Nodes another controller enrolled meanwhile hold their names and
            // addresses; after a race lost on one of them, look again.
            let mut caught = BTreeSet::new();
            if let Err(e) = self.catch_up_in(&turn, &mut caught) {
                tracing::warn!(error = %e, "cannot read the change log before enrolling");
            }
            self.publish(&turn, &caught, now);
            // After a lost race, the other controller is likely taking the
            // next free addresses too: look further on, at random.
            let skip = if attempt == 0 { 0 } else { race_skip() };
            attempt += 1;
            match self.enroll_once(&turn, &claim, expiry_ms, skip, now) {
                Err(Error::Conflict(why)) if attempt < ENROLL_ATTEMPTS => {
                    tracing::info!(
                        why,
                        attempt,
                        "enrollment raced another controller; retrying"
                    );
                }
                Ok(Enrolled::New(row)) => break *row,
                Ok(Enrolled::Again(resp)) => return Ok(resp),
                Err(e) => return Err(e),
            }
        };
        self.audit(
            now,
            &format!(
                "{}:{}",
                SecretKind::AuthKey.audit_name(),
                claim.key.key_id()
            ),
            "node.enroll",
            &row.name,
            &format!("id={} ipv4={} ipv6={}", row.id, row.ipv4, row.ipv6),
        );
        tracing::info!(node = %row.name, id = row.id, "node enrolled");
        let resp = self.enroll_response(&row);
        let changed = {
            let mut st = self.state();
            if row.ephemeral {
                let mono = st.mono;
                st.offline_since.insert(row.id, mono);
            }
            st.core.apply(Change::Upsert(row))
        };
        self.publish(&turn, &changed, now);
        Ok(resp)
    }

    /// One attempt of [`Mesh::enroll`]: a re-authentication of a known
    /// machine, or a new node's row (names and addresses from the view).
    fn enroll_once(
        &self,
        turn: &Turn<'_>,
        claim: &crate::auth::EnrollClaim,
        expiry_ms: UnixMs,
        skip: u32,
        now: UnixMs,
    ) -> Result<Enrolled> {
        let key = &claim.key;
        let existing = self
            .state()
            .core
            .nodes()
            .by_machine_key(claim.machine_key.as_bytes())
            .cloned();
        if let Some(node) = existing {
            return self
                .reauth_with_key(turn, claim, node, expiry_ms, now)
                .map(Enrolled::Again);
        }
        let (name, (ipv4, ipv6), policy) = {
            let mut st = self.state();
            let name = st.core.nodes().unique_name(&dns_label(&claim.hostname));
            let addresses = st
                .core
                .allocate_skipping(self.ula, skip)
                .map_err(|_| Error::Invalid("overlay IPv4 range exhausted".into()))?;
            (name, addresses, st.core.policy().clone())
        };
        // Runs inside the store's transaction, which consumes the key only
        // if this accepts it.
        let check = |k: Option<&SecretRecord>| -> std::result::Result<(), String> {
            secrets::verify(key, k, now).map_err(|r| r.message(SecretKind::AuthKey))?;
            if let Some(KeyDetail::Auth {
                user: Some(user),
                tags,
                ..
            }) = k.map(|k| &k.detail)
            {
                if !tags.iter().all(|t| policy.may_own_tag(user, t)) {
                    return Err("the policy's tagOwners no longer allow this key's tags".into());
                }
            }
            Ok(())
        };
        let row = self.store.enroll(
            key.key_id(),
            &check,
            NewNode {
                name,
                hostname: claim.hostname.clone(),
                machine_key: *claim.machine_key.as_bytes(),
                wg_key: *claim.wg_key.as_bytes(),
                ipv4,
                ipv6,
                created_ms: now,
                expiry_ms,
            },
        )?;
        Ok(Enrolled::New(Box::new(row)))
    }

    /// Enroll with an auth key for a machine key already enrolled: a
    /// re-authentication (new key expiry, same node) when the key grants
    /// exactly what the node is (same user, same tags) and the WireGuard key
    /// is the node's; the key is consumed like an enrollment's.
    fn reauth_with_key(
        &self,
        turn: &Turn<'_>,
        claim: &crate::auth::EnrollClaim,
        node: NodeRow,
        expiry_ms: UnixMs,
        now: UnixMs,
    ) -> Result<pb::EnrollResponse> {
        if node.wg_key != *claim.wg_key.as_bytes() {
            return Err(Error::Conflict(
                "a node with this machine key and a different WireGuard key".into(),
            ));
        }
        let key = &claim.key;
        let check = |k: Option<&SecretRecord>| -> std::result::Result<(), String> {
            secrets::verify(key, k, now).map_err(|r| r.message(SecretKind::AuthKey))?;
            match k.map(|k| &k.detail) {
                Some(KeyDetail::Auth { user, tags, .. })
                    if *user == node.user && *tags == node.tags =>
                {
                    Ok(())
                }
                _ => Err(
                    "this machine is enrolled with another owner or other tags than this key \
                     grants (a key re-authenticates only a node it could have enrolled)"
                        .into(),
                ),
            }
        };
        self.store.consume_key(key.key_id(), &check)?;
        let actor = format!("{}:{}", SecretKind::AuthKey.audit_name(), key.key_id());
        let node = self.reauthenticate(turn, &actor, node, expiry_ms, now)?;
        Ok(self.enroll_response(&node))
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
        self.open_stream_from(node, None, false, now)
    }

    /// Whether `node` has a live netmap stream.
    pub fn has_live_session(&self, node: u64) -> bool {
        self.state()
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
        let st = self.state();
        let other = st
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

    /// Opens a netmap stream for `node`, coming from `src`; `deltas`: the
    /// node takes deltas after this first map.
    ///
    /// One identity, one session: while a stream of this node is live (its
    /// response body still exists, i.e. its connection has not closed), another is
    /// refused and audited as `node.duplicate_session` — two machines with
    /// the same machine key would otherwise replace each other forever. A
    /// genuine reconnect succeeds once the old connection is seen to close
    /// (at once for a closed socket; HTTP/2 keepalive finds a dead one
    /// within 10 s), and the refused node is told to retry.
    ///
    /// The stream is registered in the same turn as its first map is built,
    /// so no publication can fall between the two.
    ///
    /// # Errors
    /// `Unauthenticated` if the node is unknown or expired;
    /// `SessionConflict` if another stream of it is live.
    pub fn open_stream_from(
        &self,
        node: u64,
        src: Option<SocketAddr>,
        deltas: bool,
        now: UnixMs,
    ) -> Result<Subscriber> {
        let turn = self.turn();
        let live = {
            let st = self.state();
            st.subs.get(&node).filter(|s| s.is_live()).map(|live| {
                let name = st
                    .core
                    .nodes()
                    .get(node)
                    .map(|n| n.name.clone())
                    .unwrap_or_default();
                (name, live.src, live.opened_ms)
            })
        };
        if let Some((name, live_src, opened_ms)) = live {
            let show = |a: Option<SocketAddr>| a.map_or_else(|| "-".to_string(), |a| a.to_string());
            let detail = format!(
                "id={node} live session from {} since {opened_ms}; refused from {}",
                show(live_src),
                show(src)
            );
            tracing::warn!(node = %name, live = %show(live_src), refused = %show(src), "duplicate session refused");
            self.audit(
                now,
                &format!("node:{name}"),
                "node.duplicate_session",
                &name,
                &detail,
            );
            return Err(duplicate_session());
        }
        let serial = self.next_serial(&turn, now);
        let (body, mut rerouted) = {
            let mut st = self.state();
            let body = st
                .core
                .encode(node, serial, now)
                .ok_or_else(|| Error::node_auth(AuthReason::Revoked, "node is not active"))?;
            // A router coming online may take over routes whose primary is
            // offline; its first map is built after that.
            let rerouted = st.core.apply(Change::Online { node, online: true });
            let body = if rerouted.contains(&node) {
                st.core.encode(node, serial, now).unwrap_or(body)
            } else {
                body
            };
            (body, rerouted)
        };
        rerouted.remove(&node);
        let (map, digest) = self.sign_for(body, deltas, None);
        let mut st = self.state();
        let conn = st.next_conn;
        st.next_conn += 1;
        let (tx, rx) = watch::channel(Update::Map(Arc::new(map)));
        let tx = Arc::new(tx);
        let mono = st.mono;
        if let Some(old) = st.subs.insert(
            node,
            Subscription {
                conn,
                tx: tx.clone(),
                last_sent_mono: mono,
                src,
                opened_ms: now,
                deltas,
                digest,
            },
        ) {
            // Its stream is gone; close it for good measure.
            old.tx.send_replace(Update::Closed(
                AuthReason::Replaced,
                "replaced by a newer session of this node".into(),
            ));
        }
        st.online.insert(node);
        st.offline_since.remove(&node);
        // The first map of a stream is not a change being propagated: its
        // acknowledgement is not a sample.
        st.unacked.insert(node, (serial, None));
        st.seen(node, now);
        drop(st);
        self.publish(&turn, &rerouted, now);
        Ok(Subscriber { conn, rx, tx })
    }

    /// Ends the stream `conn` of `node` (if it is still the current one);
    /// the routes it was primary for fail over to another online router.
    pub fn unsubscribe(&self, node: u64, conn: u64, now: UnixMs) {
        let turn = self.turn();
        let changed = {
            let mut st = self.state();
            if st.subs.get(&node).is_none_or(|s| s.conn != conn) {
                return;
            }
            st.subs.remove(&node);
            st.unacked.remove(&node);
            st.online.remove(&node);
            if st.core.nodes().get(node).is_some_and(|n| n.ephemeral) {
                let mono = st.mono;
                st.offline_since.insert(node, mono);
            }
            st.seen(node, now);
            st.core.apply(Change::Online {
                node,
                online: false,
            })
        };
        self.publish(&turn, &changed, now);
    }

    /// Writes the `last_seen` times recorded since the last flush, in one
    /// transaction and outside the state lock. Called by the ticker and at
    /// shutdown; a crash loses at most one tick of `last_seen`, which only
    /// delays the deletion of an offline ephemeral node.
    pub fn flush(&self) {
        let dirty = std::mem::take(&mut self.state().seen_dirty);
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

    /// Stores the flows a node reports (allowed and denied) in the flow log,
    /// checked and bounded by [`nodeinput::flow_rows`]; returns how many
    /// summaries were dropped as malformed or beyond the cap.
    pub fn record_flows(&self, node: &NodeRow, flows: &[pb::FlowSummary], now: UnixMs) -> usize {
        let (rows, dropped) = nodeinput::flow_rows(node, flows, now);
        if let Err(e) = self.store.record_flows(&rows) {
            tracing::error!(error = %e, rows = rows.len(), "cannot store flow records");
        }
        dropped
    }

    /// Keeps `node`'s report of its peers by path (the latest replaces the
    /// last), each count clipped to its peer count now
    /// ([`nodeinput::peer_paths`]). A node no longer in the core is not
    /// kept: nothing outlives a node's removal.
    pub fn record_paths(&self, node: u64, report: &pb::PeerPaths, now: UnixMs) {
        let mut st = self.state();
        if st.core.nodes().get(node).is_none() {
            return;
        }
        let paths = nodeinput::peer_paths(report, st.core.peer_count(node), now);
        st.paths.insert(node, paths);
    }

    /// `node`'s last report of its peers by path, clipped to its peer count
    /// now (its map may have shrunk since); all 0 when it never reported.
    pub fn peer_paths(&self, node: u64) -> PeerPaths {
        let st = self.state();
        st.paths
            .get(&node)
            .map(|p| p.clipped(st.core.peer_count(node)))
            .unwrap_or_default()
    }

    /// Prunes the flow log: records older than `flow_max_age_ms`, then each
    /// node's oldest beyond `flow_max_rows_per_node` (so one node's reports
    /// cannot push out everyone else's), then the oldest beyond
    /// `flow_max_rows`. The ticker calls it once a minute.
    pub fn prune_flows(&self, now: UnixMs) {
        let older_than = if self.cfg.flow_max_age_ms > 0 {
            now.saturating_sub(self.cfg.flow_max_age_ms)
        } else {
            i64::MIN
        };
        match self.store.prune_flows(
            older_than,
            self.cfg.flow_max_rows_per_node,
            self.cfg.flow_max_rows,
        ) {
            Ok(0) => {}
            Ok(n) => tracing::debug!(rows = n, "flow log pruned"),
            Err(e) => tracing::error!(error = %e, "cannot prune the flow log"),
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
        let turn = self.turn();
        let due = {
            let mut st = self.state();
            let Some(n) = st.core.nodes().get(node) else {
                return Err(Error::NotFound(format!("node {node}")));
            };
            if n.endpoints == parsed && !st.coalesce.has_pending(node) {
                return Ok(());
            }
            st.coalesce.offer(node, parsed, now)
        };
        if let Some(eps) = due {
            let changed = self.store_endpoints(&turn, node, eps)?;
            self.publish(&turn, &changed, now);
        }
        Ok(())
    }

    /// Stores a node's endpoints and applies them to the core; returns the
    /// nodes whose view changed (the node's peers), for the caller to publish.
    fn store_endpoints(
        &self,
        _turn: &Turn<'_>,
        node: u64,
        endpoints: Vec<String>,
    ) -> Result<BTreeSet<u64>> {
        match self.state().core.nodes().get(node) {
            None => return Err(Error::NotFound(format!("node {node}"))),
            Some(n) if n.endpoints == endpoints => return Ok(BTreeSet::new()),
            Some(_) => {}
        }
        self.store.set_node_endpoints(node, &endpoints)?;
        Ok(self
            .state()
            .core
            .apply(Change::Endpoints { node, endpoints }))
    }

    /// [`Mesh::tick_at`] with the monotonic clock taken as the wall clock
    /// since load: for virtual-time tests, where the two agree.
    pub fn tick(&self, now: UnixMs) {
        let load_wall = self.state().load_wall;
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
        self.end_handover(now);
        self.end_tls_previous(now);
        let turn = self.turn();
        let timeout = u64::try_from(self.cfg.ephemeral_timeout_ms).unwrap_or(0);
        let half = u64::try_from(self.cfg.netmap_ttl_ms / 2).unwrap_or(0);
        let (mut changed, stale, due, expired) = {
            let mut st = self.state();
            let mono = mono_ms.max(st.mono);
            st.mono = mono;
            let expired = expiring(&st.core, now);
            let changed = st.core.apply(Change::Clock(now));
            if !changed.is_empty() {
                tracing::info!(
                    nodes = changed.len(),
                    "key expiry or posture age changed maps"
                );
            }
            let State {
                core,
                offline_since,
                online,
                posture_clipped,
                ..
            } = &mut *st;
            offline_since.retain(|id, _| core.nodes().get(*id).is_some());
            posture_clipped.retain(|id, _| core.nodes().get(*id).is_some());
            let stale: Vec<u64> = core
                .nodes()
                .iter()
                // A quarantined node stays (and stays quarantined) until an
                // admin releases or deletes it: going offline is no way out.
                .filter(|n| n.ephemeral && n.quarantine.is_none() && !online.contains(&n.id))
                .map(|n| n.id)
                .filter(|id| {
                    let since = *offline_since.entry(*id).or_insert(mono);
                    mono.saturating_sub(since) >= timeout
                })
                .collect();
            if mono.saturating_sub(st.seen_refreshed) >= SEEN_REFRESH_MS {
                st.seen_refreshed = mono;
                let live: Vec<u64> = st.online.iter().copied().collect();
                for id in live {
                    st.seen(id, now);
                }
            }
            let due = st.coalesce.due(now);
            (changed, stale, due, expired)
        };
        // Singleton tasks: one controller audits expiries and deletes
        // ephemeral nodes (see `feed`).
        if self.is_leader() {
            self.audit_expired(&expired, now);
        }
        for id in stale {
            if !self.is_leader() {
                continue;
            }
            if !self.offline_everywhere(id, now, timeout) {
                // Alive elsewhere: look again a timeout from now, not on
                // every tick.
                let mut st = self.state();
                let mono = st.mono;
                st.offline_since.insert(id, mono);
                continue;
            }
            if self.store.delete_node(id).is_err() {
                continue;
            }
            let name = {
                let mut st = self.state();
                st.offline_since.remove(&id);
                let name = st.core.nodes().get(id).map(|n| n.name.clone());
                changed.extend(st.core.apply(Change::Remove(id)));
                name.unwrap_or_default()
            };
            self.audit(now, "controller", "node.delete.ephemeral", &name, "offline");
            // Node ids can be reused: nothing said by or about it lingers.
            self.forget_evidence(id);
        }
        for (node, eps) in due {
            match self.store_endpoints(&turn, node, eps) {
                Ok(c) => changed.extend(c),
                Err(e) => tracing::debug!(node, error = %e, "coalesced endpoints not published"),
            }
        }
        let refreshed: BTreeSet<u64> = {
            let st = self.state();
            let mono = st.mono;
            st.subs
                .iter()
                .filter(|(id, s)| {
                    mono.saturating_sub(s.last_sent_mono) >= half && !changed.contains(id)
                })
                .map(|(id, _)| *id)
                .collect()
        };
        changed.extend(&refreshed);
        self.publish_with(&turn, &changed, &refreshed, now);
        drop(turn);
        self.auth.prune(now);
    }

    /// Whether ephemeral node `id`, offline here for `timeout_ms`, is
    /// offline on every controller: alone on the database, yes; with
    /// others, its stored `last_seen` (refreshed by whichever controller it
    /// is connected to, every [`SEEN_REFRESH_MS`]) is older than the timeout
    /// and two refreshes.
    fn offline_everywhere(&self, id: u64, now: UnixMs, timeout_ms: u64) -> bool {
        if !self.shared.load(Ordering::SeqCst) {
            return true;
        }
        let quiet = i64::try_from(timeout_ms.max(2 * SEEN_REFRESH_MS)).unwrap_or(i64::MAX);
        match self.store.node(id) {
            Ok(Some(row)) => now.saturating_sub(row.last_seen_ms) >= quiet,
            Ok(None) => false,
            Err(e) => {
                tracing::debug!(node = id, error = %e, "cannot read last_seen");
                false
            }
        }
    }

    /// Prunes the audit table: rows older than `audit_max_age_ms`, and
    /// node-reported flow rows beyond the newest `audit_max_flow_rows` (so a
    /// node flooding flow reports can never evict the admin trail). Runs
    /// outside the state lock; the ticker calls it once a minute.
    ///
    /// The chain stays verifiable: each run of pruned rows is recorded in a
    /// checkpoint signed with the controller key, and the head is signed
    /// too ([`Mesh::sign_audit_head`]). Rows whose chain does not verify are
    /// not pruned (the evidence stays; the error is logged).
    pub fn prune_audit(&self, now: UnixMs) {
        let older_than = if self.cfg.audit_max_age_ms > 0 {
            now.saturating_sub(self.cfg.audit_max_age_ms)
        } else {
            i64::MIN
        };
        match self.store.prune_audit(
            older_than,
            self.cfg.audit_max_flow_rows,
            now,
            &self.signing().key,
        ) {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "audit log pruned"),
            Err(e) => tracing::error!(error = %e, "cannot prune the audit log"),
        }
        // Other controllers read the change log within seconds; one that
        // falls this far behind re-reads everything.
        match self.store.prune_changes(CHANGE_LOG_AGE_MS) {
            Ok(0) => {}
            Ok(n) => tracing::debug!(rows = n, "change log pruned"),
            Err(e) => tracing::error!(error = %e, "cannot prune the change log"),
        }
        // Detections live as long as the audit rows that record them.
        match self.store.prune_detections(older_than) {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "detections pruned"),
            Err(e) => tracing::error!(error = %e, "cannot prune the detections"),
        }
        self.sign_audit_head(now);
    }

    /// Signs the audit chain's head if rows were written since the last
    /// signed head; the ticker calls it once a minute and at shutdown.
    /// Cutting rows from the end of the log is detected up to the newest
    /// signed head.
    pub fn sign_audit_head(&self, now: UnixMs) {
        match self.store.sign_audit_head(now, &self.signing().key) {
            Ok(Some(id)) => tracing::debug!(head = id, "audit chain head signed"),
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "cannot sign the audit chain head"),
        }
    }

    /// Verifies the audit chain with this controller's key.
    ///
    /// # Errors
    /// Store failures; the inner error names the first broken row.
    pub fn verify_audit(
        &self,
    ) -> Result<std::result::Result<crate::auditchain::Verified, crate::auditchain::ChainError>>
    {
        Ok(self.store.verify_audit(&self.controller_key())?)
    }

    /// Audits a refused caller (a node failing authentication, a refused
    /// enrollment or login, a bad API key): at most one row per `source`
    /// per minute, so that a flood of refusals cannot flood the log. Past
    /// [`MAX_REFUSAL_SOURCES`] sources within a minute, refusals are only
    /// logged.
    pub fn audit_refusal(
        &self,
        now: UnixMs,
        source: &str,
        action: &str,
        target: &str,
        detail: &str,
    ) {
        {
            let mut seen = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
            let recent =
                |t: &UnixMs| now.saturating_sub(*t) < REFUSAL_AUDIT_INTERVAL_MS && now >= *t;
            if seen.get(source).is_some_and(recent) {
                return;
            }
            if seen.len() >= MAX_REFUSAL_SOURCES {
                seen.retain(|_, t| recent(t));
            }
            if seen.len() >= MAX_REFUSAL_SOURCES {
                tracing::warn!(
                    source,
                    action,
                    "refusal not audited: too many refused sources this minute"
                );
                return;
            }
            seen.insert(source.to_string(), now);
        }
        self.audit(now, source, action, target, detail);
    }

    /// Audits an admin API read (`api.read`; target: the method). Reads are
    /// rare (people and scripts), so each is written, not coalesced.
    pub fn audit_read(&self, now: UnixMs, actor: &str, method: &str, detail: &str) {
        self.audit(now, actor, "api.read", method, detail);
    }

    // ---- admin operations ---------------------------------------------------

    pub fn users(&self) -> Result<Vec<UserRow>> {
        Ok(self.store.users()?)
    }

    pub fn delete_user(&self, actor: &str, login: &str, now: UnixMs) -> Result<()> {
        let turn = self.turn();
        let ids = self.store.delete_user(login)?;
        self.audit(
            now,
            actor,
            "user.delete",
            login,
            &format!("nodes deleted: {ids:?}"),
        );
        let changed = {
            let mut st = self.state();
            let mut changed = BTreeSet::new();
            for id in &ids {
                changed.extend(st.core.apply(Change::Remove(*id)));
            }
            changed
        };
        for id in &ids {
            self.forget_evidence(*id);
        }
        self.publish(&turn, &changed, now);
        Ok(())
    }

    // ---- auth keys and API keys: one lifecycle (`secrets`) ------------------

    /// Issues an auth key or an API key (the kind follows from `detail`);
    /// returns its record and the full key, to be shown once.
    ///
    /// `expiry_ms` is the lifetime; `None` takes the kind's default
    /// ([`MeshConfig::auth_key_ttl_ms`], [`secrets::API_KEY_TTL_MS`]).
    ///
    /// # Errors
    /// `Invalid` for an auth key with neither user nor tags, a bad tag,
    /// login or description, or a lifetime outside 1 ms ..= 10 years;
    /// `Forbidden` when the policy's tagOwners do not let the user own a
    /// requested tag; `NotFound` for an unknown user.
    #[expect(
        clippy::disallowed_types,
        reason = "the coordinator draws fresh secrets from OS entropy"
    )]
    pub fn create_key(
        &self,
        actor: &str,
        detail: KeyDetail,
        expiry_ms: Option<i64>,
        now: UnixMs,
    ) -> Result<(SecretRecord, String)> {
        use rand_core::OsRng;
        let detail = self.admit_detail(detail)?;
        let kind = detail.kind();
        let ttl = expiry_ms.unwrap_or(match kind {
            SecretKind::AuthKey => self.cfg.auth_key_ttl_ms,
            SecretKind::ApiKey => secrets::API_KEY_TTL_MS,
        });
        let (secret, record) =
            secrets::issue(detail, ttl, actor, self.fingerprint(), now, &mut OsRng)
                .map_err(|e| Error::Invalid(e.to_string()))?;
        let record = self.store.create_key(&record)?;
        self.audit(
            now,
            actor,
            &format!("{}.create", kind.audit_name()),
            &record.key_id,
            &audit_detail(&record.detail),
        );
        Ok((record, secret))
    }

    /// The keys of one kind, by id.
    pub fn keys(&self, kind: SecretKind) -> Result<Vec<SecretRecord>> {
        Ok(self.store.keys(kind)?)
    }

    /// Revokes a key for good; nodes already enrolled with an auth key stay.
    ///
    /// # Errors
    /// `NotFound` when no key of `kind` has this key id.
    pub fn revoke_key(
        &self,
        actor: &str,
        kind: SecretKind,
        key_id: &str,
        now: UnixMs,
    ) -> Result<()> {
        self.store.revoke_key(kind, key_id)?;
        self.audit(
            now,
            actor,
            &format!("{}.revoke", kind.audit_name()),
            key_id,
            "",
        );
        Ok(())
    }

    /// Checks and normalizes what a new key grants: an auth key's tags
    /// sorted and deduplicated, its user allowed to own them; nothing used.
    fn admit_detail(&self, detail: KeyDetail) -> Result<KeyDetail> {
        match detail {
            KeyDetail::Auth {
                user,
                mut tags,
                reusable,
                ephemeral,
                used_count: _,
            } => {
                if user.is_none() && tags.is_empty() {
                    return Err(Error::Invalid(
                        "an auth key needs --user or --tags (nodes are owned by a user or by tags)"
                            .into(),
                    ));
                }
                tags.sort();
                tags.dedup();
                for t in &tags {
                    validate_tag(t)?;
                }
                if let Some(u) = &user {
                    validate_login(u)?;
                    let policy = self.state().core.policy().clone();
                    for t in &tags {
                        if !policy.may_own_tag(u, t) {
                            return Err(Error::Forbidden(format!(
                                "policy tagOwners do not allow {u} to own {t}"
                            )));
                        }
                    }
                }
                Ok(KeyDetail::Auth {
                    user,
                    tags,
                    reusable,
                    ephemeral,
                    used_count: 0,
                })
            }
            KeyDetail::Api { description, role } => {
                if description.len() > 200 || description.chars().any(char::is_control) {
                    return Err(Error::Invalid(
                        "description: at most 200 printable characters".into(),
                    ));
                }
                if role == crate::roles::Role::Member {
                    return Err(Error::Invalid(
                        "an API key's role is admin, network-admin or auditor (a member has no \
                         admin access)"
                            .into(),
                    ));
                }
                Ok(KeyDetail::Api { description, role })
            }
        }
    }

    /// Finds a node by name or numeric id.
    pub fn find_node(&self, r: &str) -> Result<NodeRow> {
        let st = self.state();
        let nodes = st.core.nodes();
        r.parse::<u64>()
            .ok()
            .and_then(|id| nodes.get(id))
            .or_else(|| nodes.by_name(r))
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("node {r:?}")))
    }

    /// Node `id`'s posture results under the policy in force.
    pub fn posture_checks(&self, id: u64) -> Vec<ztmesh_policy::PostureCheck> {
        self.state().core.posture_checks(id).to_vec()
    }

    /// The posture results that flipped in the core since the last call (a
    /// report, an admin's attribute, a policy change, a report going
    /// stale), as audit rows.
    fn posture_events(&self, now: UnixMs) -> Vec<crate::store::AuditEntry> {
        let mut st = self.state();
        let events = st.core.take_posture_events();
        events
            .into_iter()
            .map(|e| {
                let target = st
                    .core
                    .nodes()
                    .get(e.node)
                    .map_or_else(|| e.node.to_string(), |n| n.name.clone());
                let (action, detail) = if e.passed {
                    ("node.posture.pass", e.name)
                } else {
                    ("node.posture.fail", format!("{}: {}", e.name, e.detail))
                };
                crate::store::AuditEntry {
                    time_ms: now,
                    actor: "controller".into(),
                    action: action.into(),
                    target,
                    detail,
                }
            })
            .collect()
    }

    /// A node's posture report ([`crate::nodeinput::sanitize_posture`]):
    /// replaces its `node:*` attributes and restarts its posture TTL. The
    /// node's maps, and those of the peers whose flows depend on its
    /// posture, change when a result does. Changed values and anything
    /// clipped are audited.
    ///
    /// # Errors
    /// `NotFound` for an unknown node; store errors.
    pub fn report_posture(
        &self,
        node: u64,
        attrs: &[pb::PostureAttribute],
        now: UnixMs,
    ) -> Result<Vec<String>> {
        let report = crate::nodeinput::sanitize_posture(attrs);
        let turn = self.turn();
        // The row is rewritten below: start from what every controller wrote.
        self.fresh(&turn, now);
        let row = self
            .state()
            .core
            .nodes()
            .get(node)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("node {node}")))?;
        let posture = crate::model::NodePosture {
            reported: report.attributes,
            reported_ms: now,
            custom: row.posture.custom.clone(),
        };
        self.store.set_node_posture(node, &posture)?;
        let actor = format!("node:{}", row.name);
        let changes = attribute_changes(&row.posture.reported, &posture.reported);
        if !changes.is_empty() {
            self.audit(now, &actor, "node.posture.report", &row.name, &changes);
        }
        // What a node keeps sending that we drop is recorded when it starts
        // (or changes), not on every report.
        let clipped_news = {
            let mut st = self.state();
            let last = st.posture_clipped.get(&node);
            let news = !report.clipped.is_empty() && last != Some(&report.clipped);
            if report.clipped.is_empty() {
                st.posture_clipped.remove(&node);
            } else {
                st.posture_clipped.insert(node, report.clipped.clone());
            }
            news
        };
        if clipped_news {
            self.audit(
                now,
                &actor,
                "node.posture.clipped",
                &row.name,
                &report.clipped.join("; "),
            );
        }
        let updated = NodeRow { posture, ..row };
        self.apply(&turn, Change::Upsert(updated), now);
        Ok(report.clipped)
    }

    /// An admin sets and removes a node's `custom:*` attributes
    /// (`nodes attrs NODE --set custom:compliant=true`); audited with the
    /// old values.
    ///
    /// # Errors
    /// `Invalid` for a key outside `custom:`, a bad name or value, or more
    /// than [`crate::nodeinput::MAX_CUSTOM_ATTRIBUTES`]; `NotFound`.
    pub fn set_node_attributes(
        &self,
        actor: &str,
        r: &str,
        set: &[(String, ztmesh_policy::AttrValue)],
        unset: &[String],
        now: UnixMs,
    ) -> Result<NodeRow> {
        for (k, v) in set {
            crate::nodeinput::validate_custom(k, v)?;
        }
        for k in unset {
            crate::nodeinput::validate_custom(k, &ztmesh_policy::AttrValue::Bool(true))?;
        }
        let turn = self.turn();
        let row = self.find_node(r)?;
        let mut custom = row.posture.custom.clone();
        for k in unset {
            custom.remove(k);
        }
        for (k, v) in set {
            custom.insert(k.clone(), v.clone());
        }
        if custom.len() > crate::nodeinput::MAX_CUSTOM_ATTRIBUTES {
            return Err(Error::Invalid(format!(
                "a node carries at most {} custom attributes",
                crate::nodeinput::MAX_CUSTOM_ATTRIBUTES
            )));
        }
        if custom == row.posture.custom {
            return Ok(row);
        }
        let posture = crate::model::NodePosture {
            custom,
            ..row.posture.clone()
        };
        self.store.set_node_posture(row.id, &posture)?;
        let changes = attribute_changes(&row.posture.custom, &posture.custom);
        self.audit(now, actor, "node.attributes", &row.name, &changes);
        let updated = NodeRow { posture, ..row };
        self.apply(&turn, Change::Upsert(updated.clone()), now);
        Ok(updated)
    }

    /// The approved routes `node` is the primary router for now.
    pub fn primary_routes(&self, node: u64) -> Vec<IpNet> {
        self.state()
            .core
            .primaries()
            .iter()
            .filter(|(_, n)| **n == node)
            .map(|(r, _)| *r)
            .collect()
    }

    /// All nodes with their online state.
    pub fn nodes(&self) -> Vec<(NodeRow, bool)> {
        let st = self.state();
        st.core
            .nodes()
            .iter()
            .map(|n| (n.clone(), st.online.contains(&n.id)))
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
        let turn = self.turn();
        // A logout is no way out of a quarantine (a new enrollment would
        // start clean); checked under the turn, so a quarantine decided
        // meanwhile is seen.
        let quarantine = self
            .state()
            .core
            .nodes()
            .get(node.id)
            .and_then(|n| n.quarantine.clone());
        if let (Some(q), "node.logout") = (quarantine, action) {
            self.audit(
                now,
                actor,
                "node.logout.refused",
                &node.name,
                &format!("quarantined: {}", q.reason),
            );
            return Err(Error::FailedPrecondition(format!(
                "node {} is quarantined ({}); an admin must release or delete it",
                node.name, q.reason
            )));
        }
        self.store.delete_node(node.id)?;
        self.audit(now, actor, action, &node.name, &format!("id={}", node.id));
        self.apply(&turn, Change::Remove(node.id), now);
        self.forget_evidence(node.id);
        Ok(())
    }

    /// Expires a node's key now; an expired node is in nobody's map and its
    /// stream is closed.
    ///
    /// # Errors
    /// `NotFound`; store failures.
    pub fn expire_node(&self, actor: &str, r: &str, now: UnixMs) -> Result<NodeRow> {
        let turn = self.turn();
        let node = self.find_node(r)?;
        self.store.revoke_node_key(node.id, now)?;
        self.audit(now, actor, "node.expire", &node.name, "");
        let updated = NodeRow {
            expiry_ms: now,
            key_revoked: true,
            ..node
        };
        let (changed, expired) = {
            let mut st = self.state();
            let mut changed = st.core.apply(Change::Upsert(updated.clone()));
            // The core judges expiry by its clock; bring it to `now` so the
            // node leaves the views at once, not at the next tick.
            let mut expired = Vec::new();
            if now > st.core.clock() {
                expired = expiring(&st.core, now);
                changed.extend(st.core.apply(Change::Clock(now)));
            }
            (changed, expired)
        };
        self.audit_expired(&expired, now);
        self.publish(&turn, &changed, now);
        Ok(updated)
    }

    /// What advertised routes must stay clear of: the overlay and the
    /// relays' addresses (nodes reach them outside the tunnel).
    fn route_limits(&self) -> crate::routes::RouteLimits {
        let overlay = vec![
            "100.64.0.0/10".parse().expect("static prefix"),
            IpNet::V6(self.ula),
        ];
        let reserved = self
            .cfg
            .relays
            .iter()
            .flat_map(|r| {
                [r.quic_addr.as_str(), r.tcp_addr.as_str()]
                    .into_iter()
                    .chain(r.stun_addrs.iter().map(String::as_str))
            })
            .filter_map(|a| a.parse::<std::net::SocketAddr>().ok())
            .map(|a| a.ip())
            .collect();
        crate::routes::RouteLimits { overlay, reserved }
    }

    /// A node's advertisement (`ztmesh up --advertise-routes …`): replaces
    /// the last one; routes and the exit-node role the policy's
    /// `autoApprovers` cover are approved on the spot. Nothing is routed
    /// until a route is both advertised and approved.
    ///
    /// # Errors
    /// `Invalid` as [`crate::routes::validate_advertisement`]; `NotFound`.
    pub fn set_routes(
        &self,
        node: u64,
        routes: &[String],
        exit_node: bool,
        now: UnixMs,
    ) -> Result<NodeRow> {
        let adv = crate::routes::validate_advertisement(routes, exit_node, &self.route_limits())
            .map_err(|e| Error::Invalid(e.0))?;
        let turn = self.turn();
        // The approvals are rewritten below: start from what every
        // controller wrote (an admin may have withdrawn one elsewhere).
        self.fresh(&turn, now);
        let (row, policy) = {
            let st = self.state();
            let row = st
                .core
                .nodes()
                .get(node)
                .cloned()
                .ok_or_else(|| Error::NotFound(format!("node {node}")))?;
            (row, st.core.policy().clone())
        };
        let who = crate::netcore::policy_node(&row, &[], false);
        let mut approved = row.routes.approved.clone();
        let auto: Vec<IpNet> = adv
            .routes
            .iter()
            .filter(|r| !approved.contains(r) && policy.auto_approves_route(&who, **r))
            .copied()
            .collect();
        approved.extend(&auto);
        approved.sort();
        let exit_auto =
            adv.exit_node && !row.routes.exit_approved && policy.auto_approves_exit(&who);
        let routes = crate::model::NodeRoutes {
            advertised: adv.routes,
            approved,
            exit_advertised: adv.exit_node,
            exit_approved: row.routes.exit_approved || exit_auto,
        };
        if routes == row.routes {
            return Ok(row);
        }
        self.store.set_node_routes(node, &routes)?;
        let list = |v: &[IpNet]| {
            v.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut detail = format!(
            "advertised [{}] exit_node={}",
            list(&routes.advertised),
            routes.exit_advertised
        );
        if !auto.is_empty() || exit_auto {
            detail.push_str(&format!(
                "; auto-approved [{}]{}",
                list(&auto),
                if exit_auto { " exit_node" } else { "" }
            ));
        }
        self.audit(now, &row.name, "node.routes.advertise", &row.name, &detail);
        let updated = NodeRow { routes, ..row };
        self.apply(&turn, Change::Upsert(updated.clone()), now);
        Ok(updated)
    }

    /// An admin approves or withdraws approval of a node's routes and
    /// exit-node role (`nodes routes NODE --approve CIDR`). Only advertised
    /// routes can be approved; an approval outlives a withdrawn
    /// advertisement.
    ///
    /// # Errors
    /// `Invalid` for a prefix that is not canonical or not advertised, or
    /// approving an exit node that does not offer it; `NotFound`.
    pub fn approve_routes(
        &self,
        actor: &str,
        r: &str,
        change: &RouteApproval,
        now: UnixMs,
    ) -> Result<NodeRow> {
        let parse = |list: &[String]| -> Result<Vec<IpNet>> {
            list.iter()
                .map(|t| {
                    let n: IpNet = t.trim().parse().map_err(|_| {
                        Error::Invalid(format!("{t:?} is not a CIDR prefix such as 198.19.50.0/24"))
                    })?;
                    if n.trunc() != n {
                        return Err(Error::Invalid(format!(
                            "{t:?} has host bits set; the prefix is {}",
                            n.trunc()
                        )));
                    }
                    Ok(n)
                })
                .collect()
        };
        let (approve, unapprove) = (parse(&change.approve)?, parse(&change.unapprove)?);
        let turn = self.turn();
        let node = self.find_node(r)?;
        if let Some(p) = approve.iter().find(|p| !node.routes.advertised.contains(p)) {
            return Err(Error::Invalid(format!(
                "{} does not advertise {p} (it advertises [{}])",
                node.name,
                node.routes
                    .advertised
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if change.approve_exit_node && !node.routes.exit_advertised {
            return Err(Error::Invalid(format!(
                "{} does not offer to be an exit node (ztmesh up --advertise-exit-node)",
                node.name
            )));
        }
        let mut routes = node.routes.clone();
        routes.approved.retain(|p| !unapprove.contains(p));
        for p in approve {
            if !routes.approved.contains(&p) {
                routes.approved.push(p);
            }
        }
        routes.approved.sort();
        if change.approve_exit_node {
            routes.exit_approved = true;
        }
        if change.unapprove_exit_node {
            routes.exit_approved = false;
        }
        if routes == node.routes {
            return Ok(node);
        }
        self.store.set_node_routes(node.id, &routes)?;
        let detail = format!(
            "approved [{}] exit_node={}",
            routes
                .approved
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
            routes.exit_approved
        );
        self.audit(now, actor, "node.routes.approve", &node.name, &detail);
        let updated = NodeRow { routes, ..node };
        self.apply(&turn, Change::Upsert(updated.clone()), now);
        Ok(updated)
    }

    pub fn rename_node(
        &self,
        actor: &str,
        r: &str,
        new_name: &str,
        now: UnixMs,
    ) -> Result<NodeRow> {
        let label = dns_label(new_name);
        if label != new_name {
            return Err(Error::Invalid(format!(
                "invalid node name {new_name:?}: use lowercase letters, digits and '-' (e.g. {label:?})"
            )));
        }
        let turn = self.turn();
        let node = self.find_node(r)?;
        self.store.rename_node(node.id, new_name)?;
        self.audit(now, actor, "node.rename", &node.name, new_name);
        let updated = NodeRow {
            name: new_name.to_string(),
            ..node
        };
        self.apply(&turn, Change::Upsert(updated.clone()), now);
        Ok(updated)
    }

    /// Replaces the policy if it parses and its tests pass; otherwise the old
    /// one stays in force.
    ///
    /// # Errors
    /// `Policy` with `FILE:LINE:COL: message` lines.
    pub fn set_policy(&self, actor: &str, file_name: &str, text: &str, now: UnixMs) -> Result<u64> {
        self.set_policy_if(actor, file_name, text, None, now)
    }

    /// [`Mesh::set_policy`], only while version `expected` is in force
    /// (`None`: any), checked in the same turn as the write, so two admins
    /// applying plans made against one version cannot both succeed.
    ///
    /// # Errors
    /// As `set_policy`; `FailedPrecondition` for another version in force.
    pub fn set_policy_if(
        &self,
        actor: &str,
        file_name: &str,
        text: &str,
        expected: Option<u64>,
        now: UnixMs,
    ) -> Result<u64> {
        let policy = Policy::check(file_name, text).map_err(|e| Error::Policy(e.to_string()))?;
        let turn = self.turn();
        let in_force = self.state().policy_row.as_ref().map_or(0, |r| r.version);
        if let Some(want) = expected.filter(|w| *w != in_force) {
            return Err(Error::FailedPrecondition(format!(
                "the policy changed since this edit was planned: version {in_force} is in force, \
                 the plan was made against version {want}; check and plan it again"
            )));
        }
        let row = self.store.set_policy(file_name, text, now)?;
        let changed = {
            let mut st = self.state();
            st.policy_row = Some(row.clone());
            st.core.apply(Change::Policy(policy))
        };
        self.audit(
            now,
            actor,
            "policy.set",
            file_name,
            &format!("version={} nodes affected={}", row.version, changed.len()),
        );
        self.publish(&turn, &changed, now);
        Ok(row.version)
    }

    pub fn policy_row(&self) -> Option<PolicyRow> {
        self.state().policy_row.clone()
    }

    /// What would change if `text` replaced the current policy. Changes nothing.
    pub fn plan_policy(
        &self,
        file_name: &str,
        text: &str,
    ) -> Result<Vec<ztmesh_policy::FlowChange>> {
        let policy = Policy::check(file_name, text).map_err(|e| Error::Policy(e.to_string()))?;
        // A snapshot, so the compile runs without the mesh lock (a large
        // plan must not stall maps and streams).
        let old = self.state().core.compiled().clone();
        let nodes: Vec<PolicyNode> = old.nodes().cloned().collect();
        let new = Compiled::new(policy, nodes);
        Ok(ztmesh_policy::plan(&old, &new))
    }

    /// Who may reach whom under the policy in force (see
    /// [`ztmesh_policy::graph`]), and that policy's version (0: none set).
    pub fn policy_graph(&self) -> (Vec<ztmesh_policy::PolicyEdge>, u64) {
        let (compiled, version) = {
            let st = self.state();
            let version = st.policy_row.as_ref().map_or(0, |r| r.version);
            (st.core.compiled().clone(), version)
        };
        (ztmesh_policy::graph(&compiled), version)
    }

    pub fn explain(
        &self,
        src: &str,
        dst: &str,
        port: u16,
        proto: u8,
    ) -> ztmesh_policy::Explanation {
        let st = self.state();
        let nodes: Vec<PolicyNode> = st.core.compiled().nodes().cloned().collect();
        st.core.policy().explain(&nodes, src, dst, port, proto)
    }

    /// Generates a random ULA /48 (RFC 4193: fd00::/8 + 40 random bits).
    #[expect(
        clippy::disallowed_types,
        reason = "the coordinator draws fresh secrets from OS entropy"
    )]
    pub fn random_ula() -> Ipv6Net {
        use rand_core::OsRng;
        let mut b = [0u8; 16];
        b[0] = 0xfd;
        OsRng.fill_bytes(&mut b[1..6]);
        Ipv6Net::new(Ipv6Addr::from(b), 48).expect("48 is a valid prefix length")
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use rand_core::OsRng;
    use ztmesh_proto::auth;
    use ztmesh_proto::keys::WgPrivateKey;

    use super::*;
    use crate::store::SqliteStore;

    pub(super) const T0: UnixMs = 1_800_000_000_000;
    const POLICY: &str = r#"{
      "tagOwners": {"tag:a": []},
      "acls": [{"action": "accept", "src": ["tag:a"], "dst": ["tag:a:22,443"]}],
    }"#;

    fn open(store: Arc<dyn Store>, now: UnixMs) -> Mesh {
        open_with(store, MeshConfig::default(), now)
    }

    pub(super) fn open_with(store: Arc<dyn Store>, cfg: MeshConfig, now: UnixMs) -> Mesh {
        Mesh::load(
            store,
            SigningKey::generate(&mut OsRng),
            [7; 32],
            Mesh::random_ula(),
            cfg,
            now,
        )
        .unwrap()
    }

    fn mesh() -> Mesh {
        open(Arc::new(SqliteStore::in_memory().unwrap()), T0)
    }

    /// During a signing-key hand-over and a TLS rotation at once, every map
    /// carries one trust field with both; a restart reads the staged
    /// certificate back; a switch reorders the pins and moves the
    /// fingerprint new auth keys carry.
    #[test]
    fn tls_pins_and_a_handover_share_the_trust_field_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let keys = crate::signing::KeyFiles::in_dir(dir.path());
        let tls = TlsFiles::in_dir(dir.path());
        let current = TlsCert::generate().unwrap();
        let cur = current.fingerprint;
        tls.write_switch(&Held::new(current)).unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().unwrap());
        let load = |now| {
            let (key, h) = crate::signing::load(&keys).unwrap();
            Mesh::load(
                store.clone(),
                key,
                cur,
                Mesh::random_ula(),
                MeshConfig::default(),
                now,
            )
            .unwrap()
            .with_key_files(keys.clone(), h, now)
            .with_tls(tls.load().unwrap(), tls.clone())
        };
        let trust = |m: &Mesh| {
            NetMap::decode(m.sign(NetMap::default().encode_to_vec()).netmap.as_slice())
                .unwrap()
                .trust
        };
        let m = load(T0);
        assert_eq!(trust(&m), None, "nothing rotates");
        let next = m
            .tls_stage("admin", TlsCert::generate().unwrap(), T0)
            .unwrap();
        m.rotate_signing("admin", SigningKey::generate(&mut OsRng), 60_000, T0)
            .unwrap();
        let t = trust(&m).expect("a trust field");
        assert!(t.handover.is_some());
        assert_eq!(t.tls_pins, vec![cur.to_vec(), next.to_vec()]);
        drop(m);

        let m = load(T0 + 1);
        let t = trust(&m).expect("both survive a restart");
        assert!(t.handover.is_some());
        assert_eq!(t.tls_pins, vec![cur.to_vec(), next.to_vec()]);
        m.tls_switch("admin", 120_000, T0 + 2).unwrap();
        assert_eq!(m.fingerprint(), next);
        // The hand-over ends; the pins stay while the old one is retained.
        m.tick_at(T0 + 60_000, 1);
        let t = trust(&m).expect("the pins stay");
        assert!(t.handover.is_none());
        assert_eq!(t.tls_pins, vec![next.to_vec(), cur.to_vec()]);
        // Its grace is over and no auth key needs it: it goes, and so does
        // the trust field.
        m.tick_at(T0 + 2 + 120_000, 2);
        assert_eq!(trust(&m), None);
        assert!(m.tls_state().unwrap().previous.is_none());
    }

    /// A rotation survives a restart in its grace period (the maps keep
    /// carrying the hand-over), and the tick after the grace period ends it:
    /// maps stop carrying it, its file goes, the end is audited.
    #[test]
    fn a_handover_survives_a_restart_and_ends_with_its_grace_period() {
        let dir = tempfile::tempdir().unwrap();
        let files = crate::signing::KeyFiles::in_dir(dir.path());
        let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().unwrap());
        let load = |now| {
            let (key, h) = crate::signing::load(&files).unwrap();
            Mesh::load(
                store.clone(),
                key,
                [7; 32],
                Mesh::random_ula(),
                MeshConfig::default(),
                now,
            )
            .unwrap()
            .with_key_files(files.clone(), h, now)
        };
        let m = load(T0);
        let old = m.controller_key();
        let r = m
            .rotate_signing("admin", SigningKey::generate(&mut OsRng), 60_000, T0)
            .unwrap();
        assert_eq!((r.old_key, r.not_after_ms), (old, T0 + 60_000));
        drop(m);

        let m = load(T0 + 1_000);
        assert_eq!(m.signing_state(), (r.new_key, Some(T0 + 60_000)));
        let signed = m.sign(NetMap::default().encode_to_vec());
        let map = NetMap::decode(signed.netmap.as_slice()).unwrap();
        let h = map
            .trust
            .and_then(|t| t.handover)
            .expect("the map carries it");
        assert_eq!(ztmesh_proto::handover::read(&h).unwrap(), r);

        m.tick_at(T0 + 59_999, 1);
        assert!(m.signing_state().1.is_some(), "not before its end");
        m.tick_at(T0 + 60_000, 2);
        assert_eq!(m.signing_state(), (r.new_key, None));
        assert!(!files.handover.exists());
        let signed = m.sign(NetMap::default().encode_to_vec());
        assert!(NetMap::decode(signed.netmap.as_slice())
            .unwrap()
            .trust
            .is_none());
        let actions: Vec<String> = store
            .audit_log(10)
            .unwrap()
            .into_iter()
            .map(|a| a.action)
            .collect();
        assert!(
            actions.contains(&"controller.handover-end".to_string()),
            "{actions:?}"
        );
        assert!(
            actions.contains(&"controller.rotate-signing".to_string()),
            "{actions:?}"
        );
        // A restart after the end starts without a hand-over.
        drop(m);
        assert_eq!(load(T0 + 70_000).signing_state(), (r.new_key, None));
    }

    /// Enrolls `n` nodes tagged `tag:a` under POLICY; returns their ids.
    pub(super) fn enroll_nodes(m: &Mesh, n: usize) -> Vec<u64> {
        m.set_policy("admin", "p.hujson", POLICY, T0).unwrap();
        let (_, key) = m
            .create_key(
                "admin",
                KeyDetail::auth(None, &["tag:a".into()], true, false),
                None,
                T0,
            )
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
        let st = m.state();
        st.core.encode(node, st.serial, now).unwrap()
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
        m.report_endpoints(ids[2], &["198.18.5.7:51820".into()], T0)
            .unwrap();
        let body = encoded(&m, ids[0], T0);
        let map = NetMap::decode(body.as_slice()).unwrap();
        assert_eq!(map.encode_to_vec(), body);
        assert_eq!(map.peers[0].name, "renamed");
        assert_eq!(map.peers[1].endpoints, vec!["198.18.5.7:51820".to_string()]);

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

    /// On a stream that takes deltas, each map carries its delta against
    /// the map before it, unless that one is still in the channel (the
    /// node never gets it): then the newer map goes in full.
    #[test]
    fn a_delta_follows_only_a_map_the_stream_took() {
        let m = mesh();
        let ids = enroll_nodes(&m, 3);
        let key = m.controller_key();
        let sub = m.open_stream_from(ids[0], None, true, T0).unwrap();
        let first = sub.take().expect("the initial map");
        assert!(first.delta.is_none(), "a stream starts with a full map");
        let held = ztmesh_proto::netmap::verify(&key, &first, 0, T0).unwrap();

        m.set_policy("admin", "p.hujson", &POLICY.replace("22,443", "22"), T0 + 1)
            .unwrap();
        let next = sub.take().expect("the new map");
        let d = next
            .delta
            .as_deref()
            .expect("a delta against the map taken");
        let (got, _) = delta::apply(&key, &held, d, T0).unwrap();
        assert_eq!(
            got,
            ztmesh_proto::netmap::verify(&key, &next, 0, T0).unwrap()
        );
        assert!(d.peers.is_empty() && d.removed_peers.is_empty() && d.inbound_rules.is_some());

        // Two changes, the first map never taken: the second has no delta.
        m.set_policy(
            "admin",
            "p.hujson",
            &POLICY.replace("22,443", "443"),
            T0 + 2,
        )
        .unwrap();
        m.rename_node("admin", &ids[1].to_string(), "renamed", T0 + 3)
            .unwrap();
        let last = sub.take().expect("the newest map");
        assert!(last.delta.is_none(), "its predecessor never left");
        // Taken now, so the next one has a delta again.
        m.rename_node("admin", &ids[2].to_string(), "renamed2", T0 + 4)
            .unwrap();
        let d = sub.take().unwrap().delta.expect("a delta again");
        assert_eq!(d.peers.len(), 1, "only the renamed peer");

        // A stream that did not ask never carries one.
        m.unsubscribe(ids[0], sub.conn, T0 + 5);
        drop(sub);
        let plain = m.open_stream(ids[0], T0 + 5).unwrap();
        plain.take().unwrap();
        m.rename_node("admin", &ids[2].to_string(), "renamed3", T0 + 6)
            .unwrap();
        assert!(plain.take().unwrap().delta.is_none());
    }

    #[test]
    fn the_oldest_unapplied_change_is_timed_and_a_first_map_is_no_sample() {
        let m = mesh();
        let ids = enroll_nodes(&m, 1);
        let sub = m.open_stream(ids[0], T0).unwrap();
        let key = m.controller_key();
        let first = ztmesh_proto::netmap::verify(&key, &sub.take().unwrap(), 0, T0).unwrap();
        // The stream's first map: applied, neither a sample nor ignored.
        m.netmap_applied(ids[0], first.serial, T0 + 10);
        for (at, ports) in [(T0 + 100, "22"), (T0 + 200, "443")] {
            m.set_policy("admin", "p.hujson", &POLICY.replace("22,443", ports), at)
                .unwrap();
        }
        let last = sub.take().expect("the newest map");
        let last = ztmesh_proto::netmap::verify(&key, &last, first.serial, T0).unwrap();
        // Applied 400 ms after the first change it had not applied yet.
        m.netmap_applied(ids[0], last.serial, T0 + 500);
        let text = m
            .metrics()
            .render(m.gauges(T0), ztmesh_proto::scrape::Format::Text);
        for line in [
            "ztmesh_controller_netmap_propagation_seconds_count 1",
            "ztmesh_controller_netmap_propagation_seconds_sum 0.4",
            "ztmesh_controller_netmap_acks_ignored_total 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }

    #[test]
    fn only_a_nodes_newest_map_is_timed_and_only_once() {
        let m = mesh();
        let ids = enroll_nodes(&m, 2);
        let sub = m.open_stream(ids[0], T0).unwrap();
        let key = m.controller_key();
        let first = ztmesh_proto::netmap::verify(&key, &sub.take().unwrap(), 0, T0).unwrap();
        m.set_policy(
            "admin",
            "p.hujson",
            &POLICY.replace("22,443", "22"),
            T0 + 100,
        )
        .unwrap();
        let next = sub.take().expect("the new map");
        let next = ztmesh_proto::netmap::verify(&key, &next, first.serial, T0).unwrap();
        m.netmap_applied(ids[0], first.serial, T0 + 150); // superseded
        m.netmap_applied(ids[1], next.serial, T0 + 150); // not connected
        m.netmap_applied(ids[0], next.serial + 1, T0 + 150); // never sent
        m.netmap_applied(ids[0], next.serial, T0 + 350); // 250 ms after the change began
        m.netmap_applied(ids[0], next.serial, T0 + 9_000); // a repeat
        let text = m
            .metrics()
            .render(m.gauges(T0), ztmesh_proto::scrape::Format::Text);
        for line in [
            "ztmesh_controller_netmap_propagation_seconds_count 1",
            "ztmesh_controller_netmap_propagation_seconds_sum 0.25",
            "ztmesh_controller_netmap_acks_ignored_total 4",
            "ztmesh_controller_streams 1",
            r#"ztmesh_controller_nodes{state="online"} 1"#,
            r#"ztmesh_controller_nodes{state="offline"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
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

    #[test]
    fn routes_are_checked_approved_by_admin_or_auto_approvers_and_audited() {
        let m = mesh();
        let ids = enroll_nodes(&m, 1);
        // Refused with the reason, nothing stored.
        let e = m
            .set_routes(ids[0], &["100.64.1.0/24".into()], false, T0)
            .unwrap_err();
        assert!(e.to_string().contains("overlaps the mesh's overlay"), "{e}");
        let e = m
            .set_routes(ids[0], &["0.0.0.0/0".into()], false, T0)
            .unwrap_err();
        assert!(e.to_string().contains("--advertise-exit-node"), "{e}");

        // Advertised, not approved: nothing to route yet.
        let row = m
            .set_routes(ids[0], &["198.19.50.0/24".into()], true, T0)
            .unwrap();
        assert_eq!(row.routes.advertised, vec![net("198.19.50.0/24")]);
        assert!(row.routes.active().is_empty() && !row.routes.exit_node());
        // An admin cannot approve what the node does not advertise.
        let name = row.name.clone();
        let e = m
            .approve_routes(
                "admin",
                &name,
                &RouteApproval {
                    approve: vec!["198.19.60.0/24".into()],
                    ..RouteApproval::default()
                },
                T0,
            )
            .unwrap_err();
        assert!(
            e.to_string().contains("does not advertise 198.19.60.0/24"),
            "{e}"
        );
        let row = m
            .approve_routes(
                "admin",
                &name,
                &RouteApproval {
                    approve: vec!["198.19.50.0/24".into()],
                    approve_exit_node: true,
                    ..RouteApproval::default()
                },
                T0,
            )
            .unwrap();
        assert_eq!(row.routes.active(), vec![net("198.19.50.0/24")]);
        assert!(row.routes.exit_node());
        // Persisted, and audited with the actor.
        let stored = m.store.nodes().unwrap();
        assert_eq!(stored[0].routes, row.routes);
        let log = m.store.audit_log(10).unwrap();
        assert!(
            log.iter()
                .any(|a| a.action == "node.routes.approve" && a.actor == "admin"),
            "{log:?}"
        );
        assert!(log.iter().any(|a| a.action == "node.routes.advertise"));

        // autoApprovers: a route inside an approver CIDR is approved on advertise.
        m.set_policy(
            "admin",
            "p.hujson",
            r#"{
              "tagOwners": {"tag:a": []},
              "autoApprovers": {"routes": {"198.19.0.0/16": ["tag:a"]}},
              "acls": [{"action": "accept", "src": ["tag:a"], "dst": ["tag:a:22,443"]}],
            }"#,
            T0,
        )
        .unwrap();
        let row = m
            .set_routes(
                ids[0],
                &[
                    "198.19.50.0/24".into(),
                    "198.19.70.0/24".into(),
                    "198.18.200.0/24".into(),
                ],
                false,
                T0,
            )
            .unwrap();
        assert_eq!(
            row.routes.active(),
            vec![net("198.19.50.0/24"), net("198.19.70.0/24")],
            "198.18.200.0/24 is outside the approver CIDR"
        );
        assert!(!row.routes.exit_node(), "no longer advertised");
        assert!(row.routes.exit_approved, "the approval itself stays");
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
}
