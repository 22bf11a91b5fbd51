//! The relay's authorization core: who is connected, with which map, and
//! whether a datagram from A may go to B. Pure: no I/O, no clock, no
//! entropy; time is an argument and the connection handle is opaque.
//!
//! Rules, each with its refusal or drop reason:
//! - **HELLO** ([`Core::hello`]): the proof is by the machine key, for this
//!   relay ([`hello_method`]), fresh and used once ([`ReplayGuard`]); the
//!   map is signed by the controller, unexpired, names the proof's machine
//!   key as its `self_node`, and its serial is not older than one this node
//!   showed before (equal is allowed: a node that reconnects presents the map
//!   it still holds). A new node is admitted only under `max_nodes` and the
//!   memory budget; a node already connected is *replaced* (its old
//!   connection is returned so the shell can close it), so a client whose
//!   network changed reconnects at once instead of waiting for an idle
//!   timeout.
//! - **MAP** ([`Core::update_map`]): the same checks, for the same node, and
//!   the serial must be strictly newer.
//! - **Forwarding** ([`Core::route`]): A → B only if A's current map lists B
//!   **and** B's current map lists A, both maps unexpired, B connected.
//!   So a deleted node is cut off as soon as its peers present their next
//!   map, and two nodes the policy does not pair are never bridged.
//!
//! Every refusal and drop is counted by reason; forwarded bytes and packets
//! are counted per (source, destination) pair.

use std::collections::BTreeMap;

use serde::Serialize;
use ztmesh_proto::auth::{AuthError, NodeProof, ReplayGuard};
use ztmesh_proto::control::{NetMap, SignedNetMap};
use ztmesh_proto::keys::PublicKey;
use ztmesh_proto::netmap::{verify_signature_rotating, NetMapError};
use ztmesh_proto::relay::hello_method;
use ztmesh_proto::UnixMs;

use crate::limiter::Source;

/// A node id, as the controller assigns it (the map's `self_node.id`).
pub type NodeId = u64;
/// A connection id, unique for the life of the relay process (the shell
/// counts them).
pub type ConnId = u64;

/// Estimated bytes one session costs, beyond its peer list: the QUIC or TLS
/// connection state, its stream and datagram buffers and the outbound queue.
/// An estimate for the budget, not a measurement (see `scripts/bench/relay.sh`).
pub const SESSION_BASE_BYTES: u64 = 64 * 1024;
/// Estimated bytes per peer id of a session's peer list.
pub const PEER_BYTES: u64 = 8;
/// Estimated bytes per pair counter.
pub const PAIR_BYTES: u64 = 64;
/// The share of the memory budget that frames from unauthenticated clients
/// (`HELLO`s being read) may hold at once: a quarter. Strangers who announce
/// large maps and trickle them can delay other newcomers, never take the
/// whole budget.
pub const UNAUTHENTICATED_SHARE: u64 = 4;
/// The part of that share one source (an IPv4 address, an IPv6 /64) may
/// hold: an eighth, so one address cannot keep every newcomer waiting
/// (32 MiB of the default budget's 256 MiB share)...
pub const SOURCE_SHARE: u64 = 8;
/// ...but never less than this (two read steps of a frame), so a small
/// budget still admits one large `HELLO` per source.
pub const MIN_SOURCE_SHARE: u64 = 512 * 1024;
/// Pairs counted one by one; beyond this, forwarded traffic is added to
/// `other_pairs` so the counters' memory stays bounded.
pub const MAX_PAIRS: usize = 65_536;

/// The relay's fixed parameters.
#[derive(Clone, Debug)]
pub struct Config {
    /// The relay's name: proofs are signed for `/ztmesh.relay.v1/NAME`.
    pub relay_name: String,
    /// The controller's netmap signing key.
    pub controller_key: PublicKey,
    /// Most nodes connected at once.
    pub max_nodes: usize,
    /// Most estimated bytes of session state; a new node that would go
    /// beyond it is refused, the connected ones are never dropped for it.
    pub memory_budget: u64,
}

/// Why a `HELLO` or a `MAP` was refused. The display text goes to the
/// client in the `REFUSED` frame.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    /// The proof's signature does not verify for this relay's name.
    #[error("bad proof: the signature does not verify for this relay")]
    BadProof,
    /// The proof's timestamp is outside the window (clock skew or an old proof).
    #[error("stale proof: timestamp outside the accepted window (check the clock)")]
    StaleProof,
    /// This proof was already used.
    #[error("replayed proof")]
    ReplayedProof,
    /// The map's signature does not verify with the controller key this relay trusts.
    #[error("map signature does not verify against the controller key")]
    BadMapSignature,
    /// The signed bytes are not a map, or it has no `self_node` or a zero id.
    #[error("malformed map: {0}")]
    MalformedMap(String),
    /// The map's `self_node` has another machine key than the proof (a copied map).
    #[error("the map belongs to another machine key")]
    KeyMismatch,
    /// A `MAP` names another node than the session's.
    #[error("the map is for node {got}, this session is node {have}")]
    WrongNode { got: NodeId, have: NodeId },
    /// The map's not-after time has passed.
    #[error("map expired at {not_after_ms} (now {now_ms})")]
    ExpiredMap {
        not_after_ms: UnixMs,
        now_ms: UnixMs,
    },
    /// The serial is older than the one this node showed (for `MAP`: not newer).
    #[error("map serial {got} is older than {have}")]
    StaleSerial { got: u64, have: u64 },
    /// `max_nodes` nodes are connected.
    #[error("relay full: {max} nodes connected")]
    TooManyNodes { max: usize },
    /// Admitting this node would exceed the memory budget.
    #[error("relay over its memory budget: {used} + {need} > {budget} bytes; try another relay")]
    OverMemoryBudget { need: u64, used: u64, budget: u64 },
    /// A `MAP` arrived on a connection that has no session (or was replaced).
    #[error("no session on this connection")]
    NoSession,
}

impl Refusal {
    /// Whether the client is at fault (a forged, stale or foreign proof or
    /// map), as opposed to the relay's state (full, over budget): the
    /// failures the [`crate::limiter`] counts.
    pub fn is_clients_fault(&self) -> bool {
        !matches!(
            self,
            Self::TooManyNodes { .. } | Self::OverMemoryBudget { .. } | Self::NoSession
        )
    }

    /// A short stable name for counters.
    pub fn name(&self) -> &'static str {
        match self {
            Self::BadProof => "bad_proof",
            Self::StaleProof => "stale_proof",
            Self::ReplayedProof => "replayed_proof",
            Self::BadMapSignature => "bad_map_signature",
            Self::MalformedMap(_) => "malformed_map",
            Self::KeyMismatch => "key_mismatch",
            Self::WrongNode { .. } => "wrong_node",
            Self::ExpiredMap { .. } => "expired_map",
            Self::StaleSerial { .. } => "stale_serial",
            Self::TooManyNodes { .. } => "too_many_nodes",
            Self::OverMemoryBudget { .. } => "over_memory_budget",
            Self::NoSession => "no_session",
        }
    }
}

/// Why a datagram was not forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// The sender's connection has no session (never welcomed, or replaced).
    NoSession,
    /// The sender addressed itself.
    ToSelf,
    /// The sender's own map has expired.
    SourceMapExpired,
    /// The sender's map does not list the destination.
    NotListedBySource,
    /// The destination is not connected to this relay.
    PeerNotConnected,
    /// The destination's map has expired.
    PeerMapExpired,
    /// The destination's map does not list the sender (not mutual: unpaired,
    /// or the sender was deleted and the peer presented its newer map).
    NotListedByPeer,
    /// The destination's queue is full (counted by the shell).
    Congested,
    /// A frame on a stream did not decode; the connection was closed.
    MalformedFrame,
    /// A QUIC datagram did not decode.
    MalformedDatagram,
    /// A well-formed frame that the client may not send (WELCOME, REFUSED,
    /// a second HELLO); the connection was closed.
    UnexpectedFrame,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 11] = [
        DropReason::NoSession,
        DropReason::ToSelf,
        DropReason::SourceMapExpired,
        DropReason::NotListedBySource,
        DropReason::PeerNotConnected,
        DropReason::PeerMapExpired,
        DropReason::NotListedByPeer,
        DropReason::Congested,
        DropReason::MalformedFrame,
        DropReason::MalformedDatagram,
        DropReason::UnexpectedFrame,
    ];

    /// A short stable name for counters.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::NoSession => "no_session",
            DropReason::ToSelf => "to_self",
            DropReason::SourceMapExpired => "source_map_expired",
            DropReason::NotListedBySource => "not_listed_by_source",
            DropReason::PeerNotConnected => "peer_not_connected",
            DropReason::PeerMapExpired => "peer_map_expired",
            DropReason::NotListedByPeer => "not_listed_by_peer",
            DropReason::Congested => "congested",
            DropReason::MalformedFrame => "malformed_frame",
            DropReason::MalformedDatagram => "malformed_datagram",
            DropReason::UnexpectedFrame => "unexpected_frame",
        }
    }
}

/// A `HELLO` accepted.
#[derive(Debug, PartialEq, Eq)]
pub struct Welcome<H> {
    pub node: NodeId,
    /// The handle of the node's previous session, now replaced: the shell
    /// tells it and closes it.
    pub replaced: Option<H>,
}

/// Traffic forwarded from one node to another.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Traffic {
    pub bytes: u64,
    pub packets: u64,
}

/// What the stats file shows: sessions, per-pair traffic, refusals and
/// drops by reason, the memory estimate.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    pub sessions: Vec<SessionInfo>,
    pub pairs: Vec<PairInfo>,
    /// Traffic of pairs beyond [`MAX_PAIRS`].
    pub other_pairs: Traffic,
    pub hellos_accepted: u64,
    pub maps_accepted: u64,
    pub refusals: BTreeMap<&'static str, u64>,
    pub drops: BTreeMap<&'static str, u64>,
    pub memory_estimate: u64,
    /// Of the estimate: frame buffers of clients not yet welcomed.
    pub unauthenticated_buffers: u64,
    /// Of the estimate: frame buffers of sessions (large `MAP`s being read).
    pub session_buffers: u64,
    pub memory_budget: u64,
    pub max_nodes: usize,
}

/// One connected node, as the stats show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SessionInfo {
    pub node: NodeId,
    pub name: String,
    pub conn: ConnId,
    pub serial: u64,
    pub not_after_ms: UnixMs,
    pub peers: usize,
    pub since_ms: UnixMs,
}

/// One (source, destination) pair's traffic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PairInfo {
    pub src: NodeId,
    pub dst: NodeId,
    pub bytes: u64,
    pub packets: u64,
}

struct Session<H> {
    conn: ConnId,
    handle: H,
    machine_key: PublicKey,
    name: String,
    /// Sorted, deduplicated peer ids of the current map.
    peers: Vec<NodeId>,
    serial: u64,
    not_after_ms: UnixMs,
    since_ms: UnixMs,
}

impl<H> Session<H> {
    fn estimate(&self) -> u64 {
        session_estimate(self.peers.len(), self.name.len())
    }
}

fn session_estimate(peers: usize, name_len: usize) -> u64 {
    SESSION_BASE_BYTES + PEER_BYTES * peers as u64 + name_len as u64
}

/// A map that passed every check of [`Verifier`], reduced to what the relay
/// keeps; [`Core::admit`] and [`Core::apply_map`] take it.
#[derive(Debug, Clone)]
pub struct Checked {
    node: NodeId,
    /// The machine key the map was checked against.
    machine_key: PublicKey,
    name: String,
    peers: Vec<NodeId>,
    serial: u64,
    not_after_ms: UnixMs,
}

/// The stateless checks of a `HELLO` and a map: the proof, the controller's
/// signature, decoding, the self node's machine key, expiry. They cost a
/// hash of the whole map (up to 64 MiB) and an Ed25519 verification, so the
/// shell runs them outside the core's lock (which every forwarded datagram
/// takes) and hands the result to [`Core::admit`] / [`Core::apply_map`].
#[derive(Debug, Clone)]
pub struct Verifier {
    method: String,
    controller_key: PublicKey,
}

impl Verifier {
    pub fn new(cfg: &Config) -> Self {
        Self {
            method: hello_method(&cfg.relay_name),
            controller_key: cfg.controller_key,
        }
    }

    /// Checks a `HELLO`'s proof and map.
    ///
    /// # Errors
    /// The first [`Refusal`] (not counted: [`Core::count_refusal`]).
    pub fn hello(
        &self,
        proof: &NodeProof,
        signed: &SignedNetMap,
        now_ms: UnixMs,
    ) -> Result<Checked, Refusal> {
        proof.verify(&self.method, now_ms).map_err(|e| match e {
            AuthError::Stale => Refusal::StaleProof,
            _ => Refusal::BadProof,
        })?;
        self.map(&proof.machine_key, signed, now_ms)
    }

    /// Checks a map presented by the holder of `machine_key`.
    ///
    /// # Errors
    /// The first [`Refusal`] (not counted).
    pub fn map(
        &self,
        machine_key: &PublicKey,
        signed: &SignedNetMap,
        now_ms: UnixMs,
    ) -> Result<Checked, Refusal> {
        check_map(&self.controller_key, machine_key, signed, now_ms)
    }
}

/// The relay's state. `H` is the shell's handle to a connection (cloned out
/// of [`Core::route`] to send to the destination).
pub struct Core<H> {
    cfg: Config,
    verifier: Verifier,
    sessions: BTreeMap<NodeId, Session<H>>,
    /// The last serial each node showed, kept after it disconnects (bounded:
    /// the entry of the node gone longest is forgotten first).
    serials: BTreeMap<NodeId, (u64, UnixMs)>,
    replay: ReplayGuard,
    pairs: BTreeMap<(NodeId, NodeId), Traffic>,
    other_pairs: Traffic,
    hellos_accepted: u64,
    maps_accepted: u64,
    refusals: BTreeMap<&'static str, u64>,
    drops: [u64; DropReason::ALL.len()],
    memory: u64,
    /// Bytes of frame buffers being read: from clients not yet welcomed
    /// (bounded by the budget's [`UNAUTHENTICATED_SHARE`]) and from sessions.
    unauthenticated: u64,
    /// The same bytes by source; an entry goes when its bytes are returned,
    /// so the table holds only sources with a `HELLO` being read.
    unauthenticated_by_source: BTreeMap<Source, u64>,
    session_buffers: u64,
}

impl<H: Clone> Core<H> {
    pub fn new(cfg: Config) -> Self {
        Self {
            verifier: Verifier::new(&cfg),
            cfg,
            sessions: BTreeMap::new(),
            serials: BTreeMap::new(),
            replay: ReplayGuard::default(),
            pairs: BTreeMap::new(),
            other_pairs: Traffic::default(),
            hellos_accepted: 0,
            maps_accepted: 0,
            refusals: BTreeMap::new(),
            drops: [0; DropReason::ALL.len()],
            memory: 0,
            unauthenticated: 0,
            unauthenticated_by_source: BTreeMap::new(),
            session_buffers: 0,
        }
    }

    /// Checks a `HELLO` and opens (or replaces) the node's session on `conn`.
    ///
    /// # Errors
    /// A [`Refusal`] naming the first rule that failed; nothing changes
    /// (except the counter of that reason).
    pub fn hello(
        &mut self,
        conn: ConnId,
        handle: H,
        proof: &NodeProof,
        signed: &SignedNetMap,
        now_ms: UnixMs,
    ) -> Result<Welcome<H>, Refusal> {
        match self.verifier.hello(proof, signed, now_ms) {
            Ok(checked) => self.admit(conn, handle, proof, checked, now_ms),
            Err(r) => {
                self.count_refusal(&r);
                Err(r)
            }
        }
    }

    /// The stateless checks, for a shell that runs them outside its lock.
    pub fn verifier(&self) -> Verifier {
        self.verifier.clone()
    }

    /// Opens (or replaces) a session for a `HELLO` whose proof and map
    /// [`Verifier::hello`] accepted: the stateful checks (serial, replay,
    /// capacity, memory budget).
    ///
    /// # Errors
    /// A [`Refusal`] (counted); nothing else changes.
    pub fn admit(
        &mut self,
        conn: ConnId,
        handle: H,
        proof: &NodeProof,
        checked: Checked,
        now_ms: UnixMs,
    ) -> Result<Welcome<H>, Refusal> {
        let result = self.try_admit(conn, handle, proof, checked, now_ms);
        match &result {
            Ok(_) => self.hellos_accepted += 1,
            Err(r) => self.count_refusal(r),
        }
        result
    }

    fn try_admit(
        &mut self,
        conn: ConnId,
        handle: H,
        proof: &NodeProof,
        checked: Checked,
        now_ms: UnixMs,
    ) -> Result<Welcome<H>, Refusal> {
        if checked.machine_key != proof.machine_key {
            return Err(Refusal::KeyMismatch);
        }
        if let Some(&(have, _)) = self.serials.get(&checked.node) {
            if checked.serial < have {
                return Err(Refusal::StaleSerial {
                    got: checked.serial,
                    have,
                });
            }
        }
        // Only a proof that verified is recorded, so strangers cannot fill the guard.
        self.replay
            .check_and_record(proof, now_ms)
            .map_err(|_| Refusal::ReplayedProof)?;
        let need = session_estimate(checked.peers.len(), checked.name.len());
        let old = self.sessions.get(&checked.node).map(Session::estimate);
        if old.is_none() {
            if self.sessions.len() >= self.cfg.max_nodes {
                return Err(Refusal::TooManyNodes {
                    max: self.cfg.max_nodes,
                });
            }
            let used = self.memory_estimate();
            if used.saturating_add(need) > self.cfg.memory_budget {
                return Err(Refusal::OverMemoryBudget {
                    need,
                    used,
                    budget: self.cfg.memory_budget,
                });
            }
        }
        let node = checked.node;
        let session = Session {
            conn,
            handle,
            machine_key: proof.machine_key,
            name: checked.name,
            peers: checked.peers,
            serial: checked.serial,
            not_after_ms: checked.not_after_ms,
            since_ms: now_ms,
        };
        self.memory = self.memory - old.unwrap_or(0) + need;
        self.remember_serial(node, checked.serial, now_ms);
        let replaced = self.sessions.insert(node, session).map(|s| s.handle);
        Ok(Welcome { node, replaced })
    }

    /// Installs a newer map for `node`'s session on `conn`.
    ///
    /// # Errors
    /// A [`Refusal`]; the session keeps its current map (the shell ends it).
    pub fn update_map(
        &mut self,
        node: NodeId,
        conn: ConnId,
        signed: &SignedNetMap,
        now_ms: UnixMs,
    ) -> Result<(), Refusal> {
        let key = match self.sessions.get(&node) {
            Some(s) if s.conn == conn => s.machine_key,
            _ => {
                self.count_refusal(&Refusal::NoSession);
                return Err(Refusal::NoSession);
            }
        };
        match self.verifier.map(&key, signed, now_ms) {
            Ok(checked) => self.apply_map(node, conn, checked, now_ms),
            Err(r) => {
                self.count_refusal(&r);
                Err(r)
            }
        }
    }

    /// Installs a map [`Verifier::map`] accepted (checked against the
    /// session's machine key) for `node`'s session on `conn`.
    ///
    /// # Errors
    /// A [`Refusal`] (counted); the session keeps its current map.
    pub fn apply_map(
        &mut self,
        node: NodeId,
        conn: ConnId,
        checked: Checked,
        now_ms: UnixMs,
    ) -> Result<(), Refusal> {
        let result = self.try_apply_map(node, conn, checked, now_ms);
        match &result {
            Ok(()) => self.maps_accepted += 1,
            Err(r) => self.count_refusal(r),
        }
        result
    }

    fn try_apply_map(
        &mut self,
        node: NodeId,
        conn: ConnId,
        checked: Checked,
        now_ms: UnixMs,
    ) -> Result<(), Refusal> {
        match self.sessions.get(&node) {
            Some(s) if s.conn == conn && s.machine_key == checked.machine_key => {}
            Some(s) if s.conn == conn => return Err(Refusal::KeyMismatch),
            _ => return Err(Refusal::NoSession),
        }
        if checked.node != node {
            return Err(Refusal::WrongNode {
                got: checked.node,
                have: node,
            });
        }
        let s = self.sessions.get_mut(&node).expect("looked up above");
        if checked.serial <= s.serial {
            return Err(Refusal::StaleSerial {
                got: checked.serial,
                have: s.serial,
            });
        }
        let before = s.estimate();
        s.name = checked.name;
        s.peers = checked.peers;
        s.serial = checked.serial;
        s.not_after_ms = checked.not_after_ms;
        // A connected node's map may grow beyond the budget: the budget
        // refuses new nodes only, never the ones the relay already serves.
        let after = s.estimate();
        self.memory = self.memory - before + after;
        self.remember_serial(node, checked.serial, now_ms);
        Ok(())
    }

    /// Decides whether `len` bytes from `src` (on `conn`) go to `dst`;
    /// returns the destination's handle and counts the pair's traffic.
    ///
    /// # Errors
    /// The [`DropReason`] reason (counted).
    pub fn route(
        &mut self,
        src: NodeId,
        conn: ConnId,
        dst: NodeId,
        len: usize,
        now_ms: UnixMs,
    ) -> Result<H, DropReason> {
        match self.check_route(src, conn, dst, now_ms) {
            Ok(()) => {}
            Err(d) => {
                self.count_drop(d);
                return Err(d);
            }
        }
        let n = self.pairs.len();
        let t = match self.pairs.get_mut(&(src, dst)) {
            Some(t) => t,
            None if n < MAX_PAIRS => self.pairs.entry((src, dst)).or_default(),
            None => &mut self.other_pairs,
        };
        t.bytes = t.bytes.saturating_add(len as u64);
        t.packets = t.packets.saturating_add(1);
        Ok(self.sessions[&dst].handle.clone())
    }

    fn check_route(
        &self,
        src: NodeId,
        conn: ConnId,
        dst: NodeId,
        now_ms: UnixMs,
    ) -> Result<(), DropReason> {
        let from = match self.sessions.get(&src) {
            Some(s) if s.conn == conn => s,
            _ => return Err(DropReason::NoSession),
        };
        if src == dst {
            return Err(DropReason::ToSelf);
        }
        if from.not_after_ms <= now_ms {
            return Err(DropReason::SourceMapExpired);
        }
        if from.peers.binary_search(&dst).is_err() {
            return Err(DropReason::NotListedBySource);
        }
        let to = self
            .sessions
            .get(&dst)
            .ok_or(DropReason::PeerNotConnected)?;
        if to.not_after_ms <= now_ms {
            return Err(DropReason::PeerMapExpired);
        }
        if to.peers.binary_search(&src).is_err() {
            return Err(DropReason::NotListedByPeer);
        }
        Ok(())
    }

    /// Ends `node`'s session if it is still the one on `conn` (a replaced
    /// connection that closes later leaves the new session alone). Returns
    /// whether a session ended.
    pub fn disconnect(&mut self, node: NodeId, conn: ConnId, now_ms: UnixMs) -> bool {
        match self.sessions.get(&node) {
            Some(s) if s.conn == conn => {
                let s = self.sessions.remove(&node).expect("looked up above");
                self.memory -= s.estimate();
                self.remember_serial(node, s.serial, now_ms);
                true
            }
            _ => false,
        }
    }

    /// Reserves `bytes` of the budget for a frame an unauthenticated client
    /// is sending (its `HELLO`), before the shell buffers them.
    ///
    /// # Errors
    /// [`Refusal::OverMemoryBudget`] (counted) when the reservation would
    /// take the unauthenticated buffers beyond their share of the budget, or
    /// the whole estimate beyond the budget; nothing is reserved.
    pub fn reserve_unauthenticated(&mut self, source: Source, bytes: u64) -> Result<(), Refusal> {
        let share = self.cfg.memory_budget / UNAUTHENTICATED_SHARE;
        let used = self.memory_estimate();
        let mine = self
            .unauthenticated_by_source
            .get(&source)
            .copied()
            .unwrap_or(0);
        if self.unauthenticated.saturating_add(bytes) > share
            || mine.saturating_add(bytes) > (share / SOURCE_SHARE).max(MIN_SOURCE_SHARE).min(share)
            || used.saturating_add(bytes) > self.cfg.memory_budget
        {
            let r = Refusal::OverMemoryBudget {
                need: bytes,
                used,
                budget: self.cfg.memory_budget,
            };
            self.count_refusal(&r);
            return Err(r);
        }
        self.unauthenticated += bytes;
        *self.unauthenticated_by_source.entry(source).or_default() += bytes;
        Ok(())
    }

    /// Returns a reservation of [`Core::reserve_unauthenticated`].
    pub fn release_unauthenticated(&mut self, source: Source, bytes: u64) {
        self.unauthenticated = self.unauthenticated.saturating_sub(bytes);
        if let Some(n) = self.unauthenticated_by_source.get_mut(&source) {
            *n = n.saturating_sub(bytes);
            if *n == 0 {
                self.unauthenticated_by_source.remove(&source);
            }
        }
    }

    /// Counts `bytes` of a session's frame buffer (a large `MAP`). Never
    /// refused: the budget refuses new nodes only.
    pub fn hold_session_buffer(&mut self, bytes: u64) {
        self.session_buffers = self.session_buffers.saturating_add(bytes);
    }

    /// Returns bytes counted by [`Core::hold_session_buffer`].
    pub fn release_session_buffer(&mut self, bytes: u64) {
        self.session_buffers = self.session_buffers.saturating_sub(bytes);
    }

    /// Counts a drop the shell decided (a malformed frame, a full queue).
    pub fn count_drop(&mut self, d: DropReason) {
        let i = DropReason::ALL
            .iter()
            .position(|x| *x == d)
            .expect("ALL lists every reason");
        self.drops[i] = self.drops[i].saturating_add(1);
    }

    /// Counts a refusal the shell decided (a `HELLO` that did not decode).
    pub fn count_refusal(&mut self, r: &Refusal) {
        *self.refusals.entry(r.name()).or_default() += 1;
    }

    /// The estimated bytes of all sessions and counters.
    pub fn memory_estimate(&self) -> u64 {
        self.memory
            + PAIR_BYTES * self.pairs.len() as u64
            + self.unauthenticated
            + self.session_buffers
    }

    /// How many nodes are connected.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// The count of one drop reason.
    pub fn drops(&self, d: DropReason) -> u64 {
        let i = DropReason::ALL
            .iter()
            .position(|x| *x == d)
            .expect("ALL lists every reason");
        self.drops[i]
    }

    /// The traffic forwarded from `src` to `dst`.
    pub fn traffic(&self, src: NodeId, dst: NodeId) -> Traffic {
        self.pairs.get(&(src, dst)).copied().unwrap_or_default()
    }

    /// Everything the stats file shows, in a fixed order.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            sessions: self
                .sessions
                .iter()
                .map(|(&node, s)| SessionInfo {
                    node,
                    name: s.name.clone(),
                    conn: s.conn,
                    serial: s.serial,
                    not_after_ms: s.not_after_ms,
                    peers: s.peers.len(),
                    since_ms: s.since_ms,
                })
                .collect(),
            pairs: self
                .pairs
                .iter()
                .map(|(&(src, dst), t)| PairInfo {
                    src,
                    dst,
                    bytes: t.bytes,
                    packets: t.packets,
                })
                .collect(),
            other_pairs: self.other_pairs,
            hellos_accepted: self.hellos_accepted,
            maps_accepted: self.maps_accepted,
            refusals: self.refusals.clone(),
            drops: DropReason::ALL
                .iter()
                .zip(self.drops)
                .map(|(d, n)| (d.name(), n))
                .collect(),
            memory_estimate: self.memory_estimate(),
            unauthenticated_buffers: self.unauthenticated,
            session_buffers: self.session_buffers,
            memory_budget: self.cfg.memory_budget,
            max_nodes: self.cfg.max_nodes,
        }
    }

    /// Records `node`'s serial; when the table is full, the entry of the
    /// disconnected node seen longest ago is forgotten.
    fn remember_serial(&mut self, node: NodeId, serial: u64, now_ms: UnixMs) {
        let cap = self.cfg.max_nodes.saturating_mul(4).max(1_024);
        if !self.serials.contains_key(&node) && self.serials.len() >= cap {
            let oldest = self
                .serials
                .iter()
                .filter(|(id, _)| !self.sessions.contains_key(id))
                .min_by_key(|(id, &(_, at))| (at, **id))
                .map(|(&id, _)| id);
            if let Some(id) = oldest {
                self.serials.remove(&id);
            }
        }
        self.serials.insert(node, (serial, now_ms));
    }
}

/// Signature, decoding, self node, machine key, expiry.
fn check_map(
    controller_key: &PublicKey,
    machine_key: &PublicKey,
    signed: &SignedNetMap,
    now_ms: UnixMs,
) -> Result<Checked, Refusal> {
    // A map signed by the controller's next key passes while it carries the
    // hand-over from the configured key (the grace period of a rotation):
    // the relay's `--controller-key` must be updated before it ends.
    let (map, _): (NetMap, _) =
        verify_signature_rotating(controller_key, signed, now_ms).map_err(|e| match e {
            NetMapError::Malformed(m) => Refusal::MalformedMap(m),
            _ => Refusal::BadMapSignature,
        })?;
    let me = map
        .self_node
        .as_ref()
        .filter(|n| n.id != 0)
        .ok_or_else(|| Refusal::MalformedMap("no self node".into()))?;
    if me.machine_key.as_slice() != machine_key.as_bytes() {
        return Err(Refusal::KeyMismatch);
    }
    if map.not_after_ms <= now_ms {
        return Err(Refusal::ExpiredMap {
            not_after_ms: map.not_after_ms,
            now_ms,
        });
    }
    let mut peers: Vec<NodeId> = map.peers.iter().map(|p| p.id).collect();
    peers.sort_unstable();
    peers.dedup();
    Ok(Checked {
        node: me.id,
        machine_key: *machine_key,
        name: me.name.clone(),
        peers,
        serial: map.serial,
        not_after_ms: map.not_after_ms,
    })
}

#[cfg(test)]
mod tests;
