//! The pure half of the node's control protocol: no I/O, no clock, no RNG
//! (time and random values are arguments).
//!
//! [`NetMapGate`] passes a signed netmap only if it is signed by the pinned
//! controller key, newer, unexpired and addressed to this node ([`Identity`]);
//! [`translate`] turns it into data-plane peers and filter rules, parsed once
//! here at the edge; [`Install`] is what the agent hands the data plane, rules
//! before peers. [`decide`] says what a refusal by the controller means (only a
//! revocation or an expired key drops the peers), [`clock_hint`] words a
//! clock-skew refusal and [`Backoff`] is the jittered reconnect schedule
//! ([`Backoff::expired`] the slow one of an expired node).

use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use ztmesh_proto::control as pb;
use ztmesh_proto::keys::WgPublicKey;
use ztmesh_proto::refusal::{AuthReason, Refusal};
use ztmesh_proto::UnixMs;

use crate::filter;
use crate::routing::{self, Offered};
use crate::tunnel::PeerConfig;

/// The controller to try after `current` failed: the next one of `known`
/// (every controller of the mesh, in the order the netmap lists them),
/// wrapping around; `None` when there is no other. A node sticks to a
/// controller while it answers and moves on only when it does not.
pub fn next_controller<'a>(current: &str, known: &'a [String]) -> Option<&'a str> {
    let others = known.iter().filter(|u| *u != current).count();
    if others == 0 {
        return None;
    }
    let at = known.iter().position(|u| u == current);
    let start = at.map_or(0, |i| i + 1);
    (0..known.len())
        .map(|k| known[(start + k) % known.len()].as_str())
        .find(|u| *u != current)
}

/// Connection failures in a row after which a node moves to another
/// controller (the first may be a controller restarting).
pub const FAILOVER_AFTER: u32 = 2;

/// Reconnect delays: full jitter over an exponentially growing cap.
#[derive(Clone, Debug)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(250),
            max: Duration::from_secs(15),
        }
    }
}

impl Backoff {
    /// The delay before reconnect attempt `attempt` (0-based), given a uniform
    /// random `r`. Never zero, never above `max`.
    pub fn delay(&self, attempt: u32, r: u64) -> Duration {
        let cap = self
            .base
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max);
        let cap_ms = cap.as_millis().max(1) as u64;
        // Half fixed, half random: spreads a reconnect storm while still backing off.
        Duration::from_millis(cap_ms / 2 + r % (cap_ms / 2 + 1)).max(Duration::from_millis(10))
    }

    /// The delay between attempts of a node whose key expired, given a
    /// uniform random `r`: [`EXPIRED_RETRY`] plus up to a tenth of it. Only
    /// an admin extending the key makes an attempt succeed, so the node
    /// asks rarely rather than hammering the controller.
    pub fn expired(r: u64) -> Duration {
        let jitter_ms = EXPIRED_RETRY.as_millis() as u64 / 10;
        EXPIRED_RETRY + Duration::from_millis(r % (jitter_ms + 1))
    }
}

/// How often a node whose key expired asks the controller again (see
/// [`Backoff::expired`]).
pub const EXPIRED_RETRY: Duration = Duration::from_secs(60);

/// Errors in a netmap's content (after its signature was verified).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TranslateError {
    #[error("peer {peer}: invalid WireGuard key")]
    PeerKey { peer: String },
    #[error("peer {peer}: invalid allowed IP {value:?}")]
    AllowedIp { peer: String, value: String },
    #[error("rule {rule}: invalid prefix {value:?}")]
    RulePrefix { rule: String, value: String },
    #[error("rule {rule}: invalid protocol or port")]
    RuleValue { rule: String },
    #[error("netmap has no self node")]
    NoSelf,
}

/// The data-plane configuration a netmap describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translated {
    pub addresses: Vec<IpNet>,
    pub peers: Vec<PeerConfig>,
    /// The filter: the destinations this node delivers or forwards to (its
    /// own addresses, the routes it serves, the internet for an exit node)
    /// and the rules admitting traffic to them.
    pub rules: filter::Ruleset,
    /// Subnet routes and exit nodes offered to this node, and what it serves.
    pub offered: Offered,
}

/// What the agent installs in the data plane: a verified map's rules and
/// peers, or [`Install::Empty`] (revoked or expired: default deny, no peers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Install {
    Map {
        rules: filter::Ruleset,
        peers: Vec<PeerConfig>,
    },
    Empty,
}

/// One data-plane call of an [`Install`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Filter(filter::Ruleset),
    Peers(Vec<PeerConfig>),
}

impl From<Translated> for Install {
    fn from(t: Translated) -> Self {
        Install::Map {
            rules: t.rules,
            peers: t.peers,
        }
    }
}

impl Install {
    /// The data-plane calls that install this, in the order they must run:
    /// the filter first, then the peers, so a new peer is never reachable
    /// under the old rules (and a dropped peer is already denied when it goes).
    pub fn steps(self) -> [Step; 2] {
        let (rules, peers) = match self {
            Install::Map { rules, peers } => (rules, peers),
            Install::Empty => (filter::Ruleset::default(), Vec::new()),
        };
        [Step::Filter(rules), Step::Peers(peers)]
    }
}

/// Converts a verified netmap into peers and filter rules. Pure.
///
/// Endpoints that do not parse are skipped (the peer may still reach us);
/// everything else that does not parse rejects the whole map, so a half-applied
/// policy never happens.
///
/// # Errors
/// [`TranslateError`] naming the first bad field.
///
/// `exit_node` is the exit node the user chose (a peer's name or overlay
/// address): only that peer keeps the default routes in its AllowedIPs;
/// every other peer offering itself as an exit node is used for its own
/// addresses and subnet routes only.
pub fn translate(map: &pb::NetMap, exit_node: Option<&str>) -> Result<Translated, TranslateError> {
    let me = map.self_node.as_ref().ok_or(TranslateError::NoSelf)?;
    let addresses = me
        .addresses
        .iter()
        .map(|a| a.parse::<IpNet>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| TranslateError::AllowedIp {
            peer: "self".into(),
            value: me.addresses.join(","),
        })?;
    let serves = me
        .routes
        .iter()
        .map(|a| a.parse::<IpNet>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| TranslateError::AllowedIp {
            peer: "self".into(),
            value: me.routes.join(","),
        })?;
    let overlay = overlay_prefixes(&addresses);
    let in_overlay = |n: &IpNet| overlay.iter().any(|o| o.contains(n));
    let mut offered = Offered {
        serves: serves.clone(),
        is_exit: me.exit_node,
        ..Offered::default()
    };
    let mut peers = Vec::with_capacity(map.peers.len());
    for p in &map.peers {
        let public_key =
            WgPublicKey::from_slice(&p.wg_key).map_err(|_| TranslateError::PeerKey {
                peer: p.name.clone(),
            })?;
        let chosen = exit_node.is_some_and(|sel| {
            p.name.eq_ignore_ascii_case(sel)
                || p.allowed_ips
                    .iter()
                    .filter_map(|a| a.parse::<IpNet>().ok())
                    .any(|a| a.prefix_len() == a.max_prefix_len() && a.addr().to_string() == sel)
        });
        let mut allowed_ips = Vec::with_capacity(p.allowed_ips.len());
        for a in &p.allowed_ips {
            let net = a.parse::<IpNet>().map_err(|_| TranslateError::AllowedIp {
                peer: p.name.clone(),
                value: a.clone(),
            })?;
            if routing::is_default(&net) {
                if !chosen {
                    continue;
                }
                offered.exit_usable = true;
            } else if !in_overlay(&net) {
                offered.routes.push(net);
            }
            allowed_ips.push(net);
        }
        // Every parsable endpoint is a candidate, IPv4 first (stable order);
        // the first one is where data goes until a path is known.
        let mut candidates: Vec<SocketAddr> = p
            .endpoints
            .iter()
            .filter_map(|e| e.parse::<SocketAddr>().ok())
            .collect();
        candidates.sort_by_key(SocketAddr::is_ipv6);
        let endpoint = (!candidates.is_empty()).then(|| candidates.remove(0));
        let keepalive = u16::try_from(p.persistent_keepalive).unwrap_or(25);
        peers.push(PeerConfig {
            public_key,
            preshared_key: None,
            allowed_ips,
            endpoint,
            candidates,
            // The relay addresses peers by their netmap id.
            relay: (!map.relays.is_empty()).then_some(p.id),
            persistent_keepalive: (keepalive > 0).then_some(keepalive),
        });
    }
    let mut rules = Vec::with_capacity(map.inbound_rules.len());
    for r in &map.inbound_rules {
        let mut src = Vec::with_capacity(r.src_prefixes.len());
        for s in &r.src_prefixes {
            src.push(s.parse::<IpNet>().map_err(|_| TranslateError::RulePrefix {
                rule: r.rule_id.clone(),
                value: s.clone(),
            })?);
        }
        let mut dst = Vec::with_capacity(r.dst_prefixes.len());
        for d in &r.dst_prefixes {
            dst.push(d.parse::<IpNet>().map_err(|_| TranslateError::RulePrefix {
                rule: r.rule_id.clone(),
                value: d.clone(),
            })?);
        }
        if dst.is_empty() {
            // A map from before destination prefixes means this node's own
            // addresses: never the routes it serves.
            dst.clone_from(&addresses);
        }
        let bad = || TranslateError::RuleValue {
            rule: r.rule_id.clone(),
        };
        let protocols = r
            .protocols
            .iter()
            .map(|&p| u8::try_from(p).map_err(|_| bad()))
            .collect::<Result<Vec<_>, _>>()?;
        let ports = r
            .ports
            .iter()
            .map(|p| {
                let first = u16::try_from(p.first).map_err(|_| bad())?;
                let last = u16::try_from(p.last).map_err(|_| bad())?;
                if first > last {
                    return Err(bad());
                }
                Ok((first, last))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if protocols.is_empty() {
            // An empty list means "any" to the filter; the controller always
            // sends explicit protocols, so an empty one is refused rather
            // than widened.
            return Err(bad());
        }
        rules.push(filter::Rule {
            src,
            dst,
            protocols,
            ports,
            rule_id: r.rule_id.clone(),
        });
    }
    let mut local = addresses.clone();
    local.extend(&serves);
    if me.exit_node {
        local.extend(["0.0.0.0/0", "::/0"].map(|d| d.parse::<IpNet>().expect("static prefix")));
    }
    offered.routes.sort();
    offered.routes.dedup();
    Ok(Translated {
        rules: filter::Ruleset { local, rules },
        addresses,
        peers,
        offered,
    })
}

/// The mesh's overlay prefixes as this node's addresses show them:
/// 100.64.0.0/10 and the /48 of its IPv6 overlay address.
pub fn overlay_prefixes(addresses: &[IpNet]) -> Vec<IpNet> {
    let mut out = vec!["100.64.0.0/10".parse().expect("static prefix")];
    for a in addresses {
        if let IpNet::V6(v6) = a {
            if let Ok(ula) = ipnet::Ipv6Net::new(v6.addr(), 48) {
                out.push(IpNet::V6(ula.trunc()));
            }
        }
    }
    out.dedup();
    out
}

/// Why a received netmap was not applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RefusedMap {
    #[error(transparent)]
    Verify(#[from] ztmesh_proto::netmap::NetMapError),
    #[error(transparent)]
    Content(#[from] TranslateError),
    /// The map is signed correctly but addressed to another node: a controller
    /// bug or a mix-up of node state; applying it would hand this node another
    /// node's peers and rules. Re-enroll if it persists.
    #[error("netmap is for another node: its {0} does not match this node's")]
    NotForMe(SelfMismatch),
    /// A delta that does not apply to the map held, or whose result fails
    /// the checks: the node asks for a full map.
    #[error(transparent)]
    Delta(#[from] ztmesh_proto::delta::DeltaError),
}

impl RefusedMap {
    /// Whether the node should reopen its stream for a full map.
    pub fn needs_full_map(&self) -> bool {
        matches!(self, Self::Delta(_))
    }
}

/// Which part of a netmap's `self_node` names another node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelfMismatch {
    NodeId,
    MachineKey,
    WgKey,
}

impl std::fmt::Display for SelfMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SelfMismatch::NodeId => "node id",
            SelfMismatch::MachineKey => "machine key",
            SelfMismatch::WgKey => "WireGuard key",
        })
    }
}

/// Who this node is: what a netmap's `self_node` must name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The node id the controller assigned, once enrolled.
    pub node_id: Option<u64>,
    pub machine: ztmesh_proto::keys::PublicKey,
    pub wg: WgPublicKey,
}

impl Identity {
    /// Checks that `map` is addressed to this node: its `self_node` carries our
    /// node id (once known) and exactly our machine and WireGuard keys. Pure.
    ///
    /// # Errors
    /// [`RefusedMap::NotForMe`] naming the first field that differs (id, then
    /// machine key, then WireGuard key); a map without `self_node` is
    /// [`TranslateError::NoSelf`].
    pub fn check(&self, map: &pb::NetMap) -> Result<(), RefusedMap> {
        let me = map.self_node.as_ref().ok_or(TranslateError::NoSelf)?;
        let mismatch = if self.node_id.is_some_and(|id| id != me.id) {
            Some(SelfMismatch::NodeId)
        } else if me.machine_key.as_slice() != self.machine.as_bytes() {
            Some(SelfMismatch::MachineKey)
        } else if me.wg_key.as_slice() != self.wg.as_bytes() {
            Some(SelfMismatch::WgKey)
        } else {
            None
        };
        mismatch.map_or(Ok(()), |m| Err(RefusedMap::NotForMe(m)))
    }
}

/// The gate every netmap passes before it reaches the data plane: signature by
/// the pinned controller key, strictly newer serial, not expired, addressed to
/// this node, well-formed. Pure: `now_ms` is an argument.
#[derive(Debug, Clone)]
pub struct NetMapGate {
    controller: ztmesh_proto::keys::PublicKey,
    me: Identity,
    have_serial: u64,
    /// The map last accepted through this gate, which a delta applies to.
    held: Option<pb::NetMap>,
    /// The key the last accepted map handed over to, not yet taken by
    /// [`NetMapGate::adopted`].
    adopted: Option<ztmesh_proto::keys::PublicKey>,
}

impl NetMapGate {
    pub fn new(controller: ztmesh_proto::keys::PublicKey, me: Identity, have_serial: u64) -> Self {
        Self {
            controller,
            me,
            have_serial,
            held: None,
            adopted: None,
        }
    }

    pub fn have_serial(&self) -> u64 {
        self.have_serial
    }

    /// The controller key maps must be signed with.
    pub fn controller(&self) -> ztmesh_proto::keys::PublicKey {
        self.controller
    }

    /// The new controller key, once: set when an accepted map came through
    /// a hand-over from the key this gate held (see
    /// [`ztmesh_proto::handover`]). The gate holds it already and refuses
    /// the old key from then on; the caller persists it.
    pub fn adopted(&mut self) -> Option<ztmesh_proto::keys::PublicKey> {
        self.adopted.take()
    }

    /// Checks `signed` (a full map, or a delta to the map this gate last
    /// accepted); on success the serial in force advances. Returns the map,
    /// its translation, and the map in full as signed (to keep on disk and
    /// show relays).
    ///
    /// # Errors
    /// [`RefusedMap`]; the serial in force is unchanged.
    /// `exit_node` as [`translate`].
    pub fn accept(
        &mut self,
        signed: &pb::SignedNetMap,
        now_ms: UnixMs,
        exit_node: Option<&str>,
    ) -> Result<(pb::NetMap, Translated, pb::SignedNetMap), RefusedMap> {
        let (map, full, new_key) = match &signed.delta {
            Some(d) => {
                let held = self
                    .held
                    .as_ref()
                    .ok_or(ztmesh_proto::delta::DeltaError::Gap {
                        base: d.base_serial,
                        held: self.have_serial,
                    })?;
                ztmesh_proto::delta::apply_rotating(&self.controller, held, d, now_ms)?
            }
            None => {
                let (map, new_key) = ztmesh_proto::netmap::verify_rotating(
                    &self.controller,
                    signed,
                    self.have_serial,
                    now_ms,
                )?;
                let full = pb::SignedNetMap {
                    netmap: signed.netmap.clone(),
                    signature: signed.signature.clone(),
                    delta: None,
                };
                (map, full, new_key)
            }
        };
        self.me.check(&map)?;
        let t = translate(&map, exit_node)?;
        self.have_serial = map.serial;
        self.held = Some(map.clone());
        if let Some(k) = new_key {
            self.controller = k;
            self.adopted = Some(k);
        }
        Ok((map, t, full))
    }
}

/// What the node does when the controller refuses or ends its session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// No longer a member (deleted, unknown key), or an authentication
    /// refusal without a reason this node knows (an older controller): fail
    /// closed, drop every peer, keep retrying.
    Revoked(String),
    /// The node's key expired: fail closed (drop every peer) but keep the
    /// enrollment and keys, so that `ztmesh up` re-authenticates the same
    /// node; retry slowly ([`Backoff::expired`]) in case an admin extends it.
    Expired(String),
    /// This node's clock is off by more than the proof window: keep the last
    /// verified map, say so, retry. `skew_ms` is the local clock minus the
    /// controller's, when the controller sent its clock.
    ClockSkew {
        skew_ms: Option<i64>,
        message: String,
    },
    /// Recoverable refusal (replaced session, replayed or bad proof): keep
    /// the last verified map and retry. `reason` is the wire reason.
    Refused {
        reason: &'static str,
        message: String,
    },
    /// The controller does not speak this node's control protocol version
    /// (the message names both and which side to upgrade): keep the last
    /// verified map, say so, and retry slowly ([`Backoff::expired`]) until
    /// one side is upgraded.
    Incompatible(String),
    /// Anything else (transport, unavailable, ...): keep the map and retry.
    Retry(String),
}

/// How the controller ended a session, as the pure core sees it: the refusal
/// metadata and the gRPC status, read by [`super::client::session_end`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    pub refusal: Refusal,
    /// The status code is `UNAUTHENTICATED` or `PERMISSION_DENIED`.
    pub auth_refused: bool,
    /// The status code's description (e.g. "The operation was aborted").
    pub code: String,
    pub message: String,
}

/// Decides what a refusal means for this node. Pure: the local clock reading
/// `now_ms` is an argument.
pub fn decide(end: Ending, now_ms: UnixMs) -> SessionEnd {
    let Ending {
        refusal: r,
        auth_refused,
        code,
        message,
    } = end;
    match r.reason {
        Some(Ok(AuthReason::Revoked)) => SessionEnd::Revoked(message),
        Some(Ok(AuthReason::Expired)) => SessionEnd::Expired(message),
        Some(Ok(AuthReason::ClockSkew)) => SessionEnd::ClockSkew {
            skew_ms: r.server_time_ms.map(|t| now_ms.saturating_sub(t)),
            message,
        },
        Some(Ok(AuthReason::Incompatible)) => SessionEnd::Incompatible(message),
        Some(Ok(reason @ (AuthReason::Replaced | AuthReason::Replayed | AuthReason::BadProof))) => {
            SessionEnd::Refused {
                reason: reason.as_str(),
                message,
            }
        }
        // No reason (an older controller) or one this node does not know:
        // judge by the code, and fail closed on an authentication refusal.
        None | Some(Err(_)) if auth_refused => SessionEnd::Revoked(message),
        None | Some(Err(_)) => SessionEnd::Retry(format!("{code}: {message}")),
    }
}

/// The log line for a clock-skew refusal: how far off the local clock looks
/// (`skew_ms` = local minus controller, if the controller sent its clock).
pub fn clock_hint(skew_ms: Option<i64>) -> String {
    let fix = "fix the clock (e.g. enable NTP)";
    match skew_ms {
        Some(ms) if ms >= 0 => format!(
            "the local clock appears to be about {} s ahead of the controller's; {fix}",
            ms / 1000
        ),
        Some(ms) => format!(
            "the local clock appears to be about {} s behind the controller's; {fix}",
            ms.saturating_neg() / 1000
        ),
        None => format!("the local clock appears to be off; {fix}"),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn failover_moves_round_the_known_controllers_and_sticks_otherwise() {
        let known: Vec<String> = ["https://a:1", "https://b:1", "https://c:1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(next_controller("https://a:1", &known), Some("https://b:1"));
        assert_eq!(next_controller("https://c:1", &known), Some("https://a:1"));
        // Enrolled at a URL the map does not list: the list's first.
        assert_eq!(next_controller("https://x:1", &known), Some("https://a:1"));
        // Nowhere else to go.
        assert_eq!(next_controller("https://a:1", &known[..1]), None);
        assert_eq!(next_controller("https://a:1", &[]), None);
        let dup = vec!["https://a:1".to_string(), "https://a:1".into()];
        assert_eq!(next_controller("https://a:1", &dup), None);
    }

    use std::time::Duration;

    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use ztmesh_proto::keys::{SigningKey, WgPrivateKey};
    use ztmesh_proto::netmap::NetMapError;

    use super::*;

    #[test]
    fn gate_refuses_foreign_signatures_rollbacks_and_expired_maps() {
        let controller = signing(101);
        let rogue = signing(102);
        let mut gate = NetMapGate::new(controller.public(), me(), 0);
        let mut m = map();
        m.serial = 10;
        m.not_after_ms = 5_000;
        let good = ztmesh_proto::netmap::sign(&controller, &m);
        gate.accept(&good, 1_000, None).unwrap();
        assert_eq!(gate.have_serial(), 10);

        // Signed by a different key: refused, serial unchanged.
        let mut m2 = m.clone();
        m2.serial = 11;
        let forged = ztmesh_proto::netmap::sign(&rogue, &m2);
        assert!(matches!(
            gate.accept(&forged, 1_000, None),
            Err(RefusedMap::Verify(_))
        ));
        // A lower (or equal) serial from the right key: refused.
        let mut old = m.clone();
        old.serial = 9;
        let old = ztmesh_proto::netmap::sign(&controller, &old);
        assert!(gate.accept(&old, 1_000, None).is_err());
        assert!(
            gate.accept(&good, 1_000, None).is_err(),
            "replay of the map in force"
        );
        // Expired.
        let late = ztmesh_proto::netmap::sign(&controller, &m2);
        assert!(gate.accept(&late, 5_000, None).is_err());
        assert_eq!(gate.have_serial(), 10);
        // Newer and valid: accepted.
        gate.accept(&late, 1_000, None).unwrap();
        assert_eq!(gate.have_serial(), 11);
    }

    /// A delta to the map the gate holds is applied and checked as a full
    /// map; any delta that does not follow it (none held, another base, a
    /// tampered change) is refused with "ask for a full map", and the
    /// serial in force stays.
    #[test]
    fn gate_applies_deltas_to_the_map_it_holds_and_asks_for_a_full_one_otherwise() {
        use ztmesh_proto::delta::{diff, DeltaError};
        let controller = signing(101);
        let mut m1 = map();
        m1.serial = 10;
        m1.not_after_ms = 5_000;
        let mut m2 = m1.clone();
        m2.serial = 11;
        m2.peers.push(pb::Peer {
            id: 3,
            name: "db".into(),
            wg_key: vec![10; 32],
            allowed_ips: vec!["100.64.0.3/32".into()],
            ..Default::default()
        });
        m2.inbound_rules.clear();
        let full2 = ztmesh_proto::netmap::sign(&controller, &m2);
        let as_delta = |d: pb::NetMapDelta| pb::SignedNetMap {
            delta: Some(Box::new(d)),
            ..Default::default()
        };
        let d12 = as_delta(diff(&m1, &m2, full2.signature.clone()));

        // Nothing held yet (a fresh stream): a gap.
        let mut gate = NetMapGate::new(controller.public(), me(), 0);
        let err = gate.accept(&d12, 1_000, None).unwrap_err();
        assert!(err.needs_full_map(), "{err}");
        assert_eq!(gate.have_serial(), 0);

        gate.accept(&ztmesh_proto::netmap::sign(&controller, &m1), 1_000, None)
            .unwrap();
        // Tampered: the new peer left out of the delta.
        let mut bad = diff(&m1, &m2, full2.signature.clone());
        bad.peers.clear();
        let err = gate.accept(&as_delta(bad), 1_000, None).unwrap_err();
        assert!(err.needs_full_map(), "{err}");
        assert_eq!(gate.have_serial(), 10);

        let (got, t, full) = gate.accept(&d12, 1_000, None).unwrap();
        assert_eq!(got, m2);
        assert_eq!(full, full2, "the node keeps the full map as signed");
        assert!(t.rules.rules.is_empty(), "an emptied rule set is deny-all");
        assert_eq!(gate.have_serial(), 11);

        // A delta from m1 again (another base than the one held): a gap.
        let mut m3 = m2.clone();
        m3.serial = 12;
        let skip = as_delta(diff(
            &m1,
            &m3,
            ztmesh_proto::netmap::sign(&controller, &m3).signature,
        ));
        match gate.accept(&skip, 1_000, None) {
            Err(RefusedMap::Delta(DeltaError::Gap { base: 10, held: 11 })) => {}
            other => panic!("expected a gap, got {other:?}"),
        }
        // A full map is not a delta: never "ask for a full map".
        let forged = ztmesh_proto::netmap::sign(&signing(102), &m3);
        assert!(!gate
            .accept(&forged, 1_000, None)
            .unwrap_err()
            .needs_full_map());
    }

    /// A rotation of the controller's key: the gate follows a hand-over
    /// from the key it holds (full map or delta), reports the new key
    /// once, and from then on refuses maps signed by the old key; a map
    /// refused for any other reason does not move it.
    #[test]
    fn gate_follows_a_key_hand_over_and_then_refuses_the_old_key() {
        use ztmesh_proto::delta::diff;
        let (old, new) = (signing(101), signing(103));
        let mut m1 = map();
        m1.serial = 10;
        m1.not_after_ms = 5_000;
        let mut gate = NetMapGate::new(old.public(), me(), 0);
        gate.accept(&ztmesh_proto::netmap::sign(&old, &m1), 1_000, None)
            .unwrap();
        assert_eq!(gate.adopted(), None);

        let mut m2 = m1.clone();
        m2.serial = 11;
        m2.trust = Some(pb::ControllerTrust {
            handover: Some(ztmesh_proto::handover::sign(&old, &new, 900, 3_000)),
            ..Default::default()
        });
        // For another node: refused, and the key stays.
        let mut other = m2.clone();
        other.self_node.as_mut().unwrap().id = 99;
        assert!(gate
            .accept(&ztmesh_proto::netmap::sign(&new, &other), 1_000, None)
            .is_err());
        assert_eq!((gate.controller(), gate.adopted()), (old.public(), None));

        // As a delta against the map held, signed by the new key.
        let full2 = ztmesh_proto::netmap::sign(&new, &m2);
        let d = pb::SignedNetMap {
            delta: Some(Box::new(diff(&m1, &m2, full2.signature.clone()))),
            ..Default::default()
        };
        let (got, _, kept) = gate.accept(&d, 1_000, None).unwrap();
        assert_eq!((got, kept), (m2.clone(), full2.clone()));
        assert_eq!(gate.adopted(), Some(new.public()));
        assert_eq!(gate.adopted(), None, "reported once");
        assert_eq!(gate.controller(), new.public());

        // The old key no longer signs for this node, even with a fresh serial.
        let mut m3 = m1.clone();
        m3.serial = 12;
        assert!(matches!(
            gate.accept(&ztmesh_proto::netmap::sign(&old, &m3), 1_000, None),
            Err(RefusedMap::Verify(NetMapError::BadSignature))
        ));
        gate.accept(&ztmesh_proto::netmap::sign(&new, &m3), 1_000, None)
            .unwrap();

        // A node that still holds the old key after the grace period: refused,
        // with the reason.
        let mut late = NetMapGate::new(old.public(), me(), 0);
        let err = late.accept(&full2, 3_000, None).unwrap_err();
        assert!(err.to_string().contains("re-enroll"), "{err}");
        assert_eq!(late.controller(), old.public());
    }

    /// The identity `map()` is addressed to.
    fn me() -> Identity {
        Identity {
            node_id: Some(1),
            machine: signing(7).public(),
            wg: wg(8).public(),
        }
    }

    #[test]
    fn gate_refuses_a_correctly_signed_map_for_another_node() {
        let controller = signing(101);
        let other = Identity {
            node_id: Some(2),
            machine: signing(17).public(),
            wg: wg(18).public(),
        };
        let not_yet_known = Identity {
            node_id: None,
            ..me()
        };
        type Edit = fn(&mut pb::NodeInfo);
        let cases: [(&str, Identity, Edit, Result<(), SelfMismatch>); 8] = [
            ("mine", me(), |_| {}, Ok(())),
            (
                "id not known yet",
                not_yet_known.clone(),
                |n| n.id = 99,
                Ok(()),
            ),
            ("other id", me(), |n| n.id = 2, Err(SelfMismatch::NodeId)),
            (
                "other machine key",
                me(),
                |n| n.machine_key = other_key(17),
                Err(SelfMismatch::MachineKey),
            ),
            (
                "other wg key",
                me(),
                |n| n.wg_key = vec![1; 32],
                Err(SelfMismatch::WgKey),
            ),
            (
                "missing keys",
                not_yet_known,
                |n| {
                    n.machine_key.clear();
                    n.wg_key.clear();
                },
                Err(SelfMismatch::MachineKey),
            ),
            (
                "everything another node's",
                me(),
                |n| {
                    n.id = 2;
                    n.machine_key = other_key(17);
                    n.wg_key = wg(18).public().as_bytes().to_vec();
                },
                Err(SelfMismatch::NodeId),
            ),
            (
                "map for other, seen by other",
                other,
                |n| {
                    n.id = 2;
                    n.machine_key = other_key(17);
                    n.wg_key = wg(18).public().as_bytes().to_vec();
                },
                Ok(()),
            ),
        ];
        for (name, identity, edit, want) in cases {
            let mut gate = NetMapGate::new(controller.public(), identity, 0);
            let mut m = map();
            m.not_after_ms = 5_000;
            edit(m.self_node.as_mut().unwrap());
            let got = gate.accept(&ztmesh_proto::netmap::sign(&controller, &m), 1_000, None);
            match want {
                Ok(()) => assert!(got.is_ok(), "{name}: {got:?}"),
                Err(w) => {
                    assert_eq!(got.err(), Some(RefusedMap::NotForMe(w)), "{name}");
                    assert_eq!(gate.have_serial(), 0, "{name}: nothing applied");
                }
            }
        }
        let msg = RefusedMap::NotForMe(SelfMismatch::WgKey).to_string();
        assert!(msg.contains("another node"), "{msg}");
    }

    fn signing(seed: u64) -> SigningKey {
        SigningKey::generate(&mut StdRng::seed_from_u64(seed))
    }

    fn wg(seed: u64) -> WgPrivateKey {
        WgPrivateKey::generate(&mut StdRng::seed_from_u64(seed))
    }

    fn other_key(seed: u64) -> Vec<u8> {
        signing(seed).public().as_bytes().to_vec()
    }

    #[test]
    fn gate_handles_netmap_times_at_the_extremes() {
        let controller = signing(101);
        let mut serial = 0;
        let mut offer = |issued_at_ms, not_after_ms, now_ms| {
            serial += 1;
            let mut m = map();
            m.serial = serial;
            m.issued_at_ms = issued_at_ms;
            m.not_after_ms = not_after_ms;
            let mut gate = NetMapGate::new(controller.public(), me(), 0);
            gate.accept(&ztmesh_proto::netmap::sign(&controller, &m), now_ms, None)
        };
        for issued in [i64::MIN, -1, 0, i64::MAX] {
            assert!(offer(issued, i64::MAX, 1_000).is_ok(), "issued {issued}");
            assert!(
                matches!(
                    offer(issued, i64::MIN, 1_000),
                    Err(RefusedMap::Verify(NetMapError::Expired { .. }))
                ),
                "issued {issued}"
            );
        }
        for now in [i64::MIN, 0, i64::MAX - 1] {
            assert!(offer(0, i64::MAX, now).is_ok(), "now {now}");
        }
        assert!(
            offer(0, i64::MAX, i64::MAX).is_err(),
            "expired at the very end"
        );
    }

    #[test]
    fn decides_without_a_transport_failing_closed_on_unknown_auth_refusals() {
        let end = |reason, auth_refused, server_time_ms| Ending {
            refusal: Refusal {
                reason,
                server_time_ms,
            },
            auth_refused,
            code: "code".into(),
            message: "m".into(),
        };
        let unknown = Some(Err(ztmesh_proto::refusal::UnknownReason));
        let table = [
            (
                end(Some(Ok(AuthReason::Revoked)), false, None),
                SessionEnd::Revoked("m".into()),
            ),
            (
                end(Some(Ok(AuthReason::Expired)), true, None),
                SessionEnd::Expired("m".into()),
            ),
            // The reason decides, whatever the code.
            (
                end(Some(Ok(AuthReason::Expired)), false, None),
                SessionEnd::Expired("m".into()),
            ),
            (end(None, true, None), SessionEnd::Revoked("m".into())),
            (end(unknown, true, None), SessionEnd::Revoked("m".into())),
            (
                end(unknown, false, None),
                SessionEnd::Retry("code: m".into()),
            ),
            (
                end(Some(Ok(AuthReason::ClockSkew)), true, Some(i64::MIN)),
                SessionEnd::ClockSkew {
                    skew_ms: Some(i64::MAX),
                    message: "m".into(),
                },
            ),
            (
                end(Some(Ok(AuthReason::Replaced)), false, None),
                SessionEnd::Refused {
                    reason: "replaced",
                    message: "m".into(),
                },
            ),
            // An incompatible protocol version is no revocation: the node
            // keeps its map and waits for an upgrade.
            (
                end(Some(Ok(AuthReason::Incompatible)), false, None),
                SessionEnd::Incompatible("m".into()),
            ),
        ];
        for (ending, want) in table {
            assert_eq!(decide(ending.clone(), i64::MAX), want, "{ending:?}");
        }
    }

    #[test]
    fn clock_hints_say_which_way_and_by_how_much() {
        assert!(clock_hint(Some(300_400)).contains("about 300 s ahead"));
        assert!(clock_hint(Some(-90_000)).contains("about 90 s behind"));
        assert!(clock_hint(Some(i64::MIN)).contains("behind"));
        assert!(clock_hint(None).contains("appears to be off"));
    }

    #[test]
    fn backoff_grows_is_bounded_and_jittered() {
        let b = Backoff::default();
        let d0 = b.delay(0, 0);
        let d5 = b.delay(5, 0);
        assert!(d0 < d5);
        for attempt in 0..40 {
            for r in [0, 1, 12345, u64::MAX] {
                let d = b.delay(attempt, r);
                assert!(
                    d <= b.max && d >= Duration::from_millis(10),
                    "{attempt} {r} {d:?}"
                );
            }
        }
        assert_ne!(
            b.delay(10, 1),
            b.delay(10, 7777),
            "jitter spreads reconnects"
        );
    }

    #[test]
    fn an_expired_node_retries_about_once_a_minute() {
        for r in [0, 1, 5_999, 6_000, 6_001, 12345, u64::MAX] {
            let d = Backoff::expired(r);
            assert!(
                d >= EXPIRED_RETRY && d <= EXPIRED_RETRY + Duration::from_secs(6),
                "{r} {d:?}"
            );
        }
        assert_ne!(Backoff::expired(1), Backoff::expired(4_321), "jittered");
        assert!(Backoff::expired(0) > Backoff::default().max);
    }

    fn map() -> pb::NetMap {
        pb::NetMap {
            serial: 1,
            self_node: Some(pb::NodeInfo {
                id: 1,
                addresses: vec!["100.64.0.1/32".into(), "fd01:2:3::1/128".into()],
                machine_key: me().machine.as_bytes().to_vec(),
                wg_key: me().wg.as_bytes().to_vec(),
                ..Default::default()
            }),
            peers: vec![pb::Peer {
                id: 2,
                name: "web".into(),
                wg_key: vec![9; 32],
                allowed_ips: vec!["100.64.0.2/32".into()],
                endpoints: vec![
                    "[fd00::2]:51820".into(),
                    "198.18.0.3:51820".into(),
                    "junk".into(),
                ],
                persistent_keepalive: 25,
            }],
            inbound_rules: vec![pb::InboundRule {
                src_prefixes: vec!["100.64.0.2/32".into()],
                protocols: vec![6],
                ports: vec![pb::PortRange {
                    first: 443,
                    last: 443,
                }],
                rule_id: "policy.hujson:7".into(),
                dst_prefixes: vec!["100.64.0.1/32".into()],
            }],
            ..Default::default()
        }
    }

    /// `map()` where this node routes 198.19.50.0/24 and is an exit node,
    /// and two peers offer routes: web (a subnet and the exit-node role)
    /// and gw (the exit-node role).
    fn routed_map() -> pb::NetMap {
        let mut m = map();
        let me = m.self_node.as_mut().unwrap();
        me.routes = vec!["198.19.50.0/24".into()];
        me.exit_node = true;
        m.peers[0].allowed_ips = [
            "100.64.0.2/32",
            "fd01:2:3::2/128",
            "0.0.0.0/0",
            "198.19.51.0/24",
            "::/0",
        ]
        .map(String::from)
        .to_vec();
        let mut gw = m.peers[0].clone();
        gw.id = 3;
        gw.name = "gw".into();
        gw.wg_key = vec![8; 32];
        gw.allowed_ips = ["100.64.0.3/32", "0.0.0.0/0", "::/0"]
            .map(String::from)
            .to_vec();
        m.peers.push(gw);
        m.inbound_rules[0].dst_prefixes.clear();
        m
    }

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn only_the_chosen_exit_node_keeps_default_routes_and_served_routes_are_local() {
        let m = routed_map();
        let t = translate(&m, None).unwrap();
        assert_eq!(
            t.peers[0].allowed_ips,
            nets(&["100.64.0.2/32", "fd01:2:3::2/128", "198.19.51.0/24"]),
            "no exit node chosen: no default route to anyone"
        );
        assert_eq!(t.peers[1].allowed_ips, nets(&["100.64.0.3/32"]));
        assert_eq!(t.offered.routes, nets(&["198.19.51.0/24"]));
        assert!(!t.offered.exit_usable);
        assert_eq!(t.offered.serves, nets(&["198.19.50.0/24"]));
        assert!(t.offered.is_exit);
        assert_eq!(
            t.rules.local,
            nets(&[
                "100.64.0.1/32",
                "fd01:2:3::1/128",
                "198.19.50.0/24",
                "0.0.0.0/0",
                "::/0"
            ])
        );
        assert_eq!(
            t.rules.rules[0].dst,
            nets(&["100.64.0.1/32", "fd01:2:3::1/128"]),
            "a rule without destinations admits the node's own addresses, never its routes"
        );
        // Chosen by name (any case) or overlay address: that peer only.
        for sel in ["GW", "100.64.0.3"] {
            let t = translate(&m, Some(sel)).unwrap();
            assert_eq!(
                t.peers[1].allowed_ips,
                nets(&["100.64.0.3/32", "0.0.0.0/0", "::/0"])
            );
            assert!(!t.peers[0].allowed_ips.iter().any(routing::is_default));
            assert!(t.offered.exit_usable, "{sel}");
        }
        // A peer that does not offer itself is not usable as one.
        let mut plain = m.clone();
        plain.peers[1].allowed_ips.truncate(1);
        assert!(!translate(&plain, Some("gw")).unwrap().offered.exit_usable);
        let mut bad = m;
        bad.self_node.as_mut().unwrap().routes = vec!["198.19.50.0/33".into()];
        assert!(
            translate(&bad, None).is_err(),
            "a bad served route rejects the map"
        );
    }

    #[test]
    fn translates_peers_and_rules_preferring_ipv4_endpoints() {
        let t = translate(&map(), None).unwrap();
        assert_eq!(t.addresses.len(), 2);
        assert_eq!(
            t.peers[0].endpoint,
            Some("198.18.0.3:51820".parse().unwrap())
        );
        assert_eq!(t.peers[0].persistent_keepalive, Some(25));
        assert_eq!(t.rules.rules[0].ports, vec![(443, 443)]);
        assert_eq!(t.rules.rules[0].protocols, vec![6]);
        assert_eq!(t.rules.rules[0].dst, vec!["100.64.0.1/32".parse().unwrap()]);
        // The filter's local addresses are exactly the node's own.
        assert_eq!(t.rules.local, t.addresses);
    }

    #[test]
    fn installs_rules_before_peers_and_empty_denies_everything() {
        let t = translate(&map(), None).unwrap();
        let (rules, peers) = (t.rules.clone(), t.peers.clone());
        assert!(!peers.is_empty() && !rules.rules.is_empty());
        assert_eq!(
            Install::from(t).steps(),
            [Step::Filter(rules), Step::Peers(peers)],
            "the new rules are in force before any new peer"
        );
        let empty = Install::Empty.steps();
        assert_eq!(
            empty,
            [
                Step::Filter(filter::Ruleset::default()),
                Step::Peers(vec![])
            ]
        );
        // Default deny: no local address, no rule.
        let [Step::Filter(deny), _] = empty else {
            panic!("filter first")
        };
        assert!(deny.rules.is_empty() && deny.local.is_empty());
    }

    #[test]
    fn rejects_maps_with_bad_fields_rather_than_widening() {
        let mut m = map();
        m.inbound_rules[0].protocols.clear();
        assert!(translate(&m, None).is_err());
        let mut m = map();
        m.inbound_rules[0].ports[0].first = 70_000;
        assert!(translate(&m, None).is_err());
        let mut m = map();
        m.peers[0].wg_key = vec![1; 5];
        assert!(matches!(
            translate(&m, None),
            Err(TranslateError::PeerKey { .. })
        ));
        let mut m = map();
        m.inbound_rules[0].src_prefixes[0] = "100.64.0.2/33".into();
        assert!(translate(&m, None).is_err());
        let mut m = map();
        m.inbound_rules[0].dst_prefixes[0] = "junk".into();
        assert!(matches!(
            translate(&m, None),
            Err(TranslateError::RulePrefix { .. })
        ));
    }
}
