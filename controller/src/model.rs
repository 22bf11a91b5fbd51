//! The controller's data types shared by the layers: plain values, no I/O.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use ztmesh_policy::AttrValue;

use crate::UnixMs;

/// An enrolled node, as persisted and as the netmap core holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRow {
    pub id: u64,
    pub name: String,
    pub hostname: String,
    pub machine_key: [u8; 32],
    pub wg_key: [u8; 32],
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub user: Option<String>,
    pub tags: Vec<String>,
    pub ephemeral: bool,
    pub created_ms: UnixMs,
    pub last_seen_ms: UnixMs,
    /// 0 = never expires.
    pub expiry_ms: UnixMs,
    /// An admin expired the key: final, whatever the clock later reads
    /// (`expiry_ms` records when).
    pub key_revoked: bool,
    pub endpoints: Vec<String>,
    /// Subnet routes and exit node: advertised by the node, approved by an
    /// admin (or the policy's `autoApprovers`).
    pub routes: NodeRoutes,
    /// Device posture attributes.
    pub posture: NodePosture,
    /// Set when a detector quarantined the node (see `crate::detect`):
    /// it is in no map and its own map is empty until an admin releases it.
    pub quarantine: Option<Quarantine>,
}

/// Why and since when a node is quarantined.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quarantine {
    pub since_ms: UnixMs,
    /// One line: the detectors that fired and the detection id.
    pub reason: String,
}

/// A node's peers by the path their data takes, as it last reported them
/// (advisory: a node can claim anything within the bounds). Live state,
/// held in memory like `online`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerPaths {
    pub direct: u32,
    pub relayed: u32,
    /// Peers with neither path yet.
    pub none: u32,
    /// When the controller received the report (0: never).
    pub reported_ms: UnixMs,
}

impl PeerPaths {
    /// Each count at most `peers` (the node's peer count): a node cannot
    /// show more peers on a path than its map gives it.
    pub fn clipped(self, peers: usize) -> Self {
        let max = u32::try_from(peers).unwrap_or(u32::MAX);
        Self {
            direct: self.direct.min(max),
            relayed: self.relayed.min(max),
            none: self.none.min(max),
            ..self
        }
    }
}

/// A node's device posture attributes.
///
/// `node:*` ones are what the node last reported about itself (advisory:
/// a compromised node can claim anything); `custom:*` ones are set by an
/// admin through the admin API (e.g. from an MDM). The namespaces never
/// overlap.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodePosture {
    /// `node:*`, as last reported.
    pub reported: BTreeMap<String, AttrValue>,
    /// When the node last reported (0: never); a report older than the
    /// posture TTL is stale.
    pub reported_ms: UnixMs,
    /// `custom:*`, set by admins.
    pub custom: BTreeMap<String, AttrValue>,
}

impl NodePosture {
    /// Both namespaces, for the policy.
    pub fn values(&self) -> BTreeMap<String, AttrValue> {
        let mut all = self.reported.clone();
        all.extend(self.custom.iter().map(|(k, v)| (k.clone(), v.clone())));
        all
    }

    /// Whether the last report is younger than `ttl_ms` at `now`.
    ///
    /// A report stamped more than [`POSTURE_CLOCK_SLACK_MS`] after `now`
    /// (the controller's clock was stepped back since) is not believed
    /// either: otherwise a step back by an hour would keep a silent node
    /// passing for an hour more. Fail closed; the node's next report (a
    /// third of the TTL away) fixes it.
    pub fn fresh(&self, now: UnixMs, ttl_ms: i64) -> bool {
        self.reported_ms > 0
            && self.reported_ms <= now.saturating_add(POSTURE_CLOCK_SLACK_MS)
            && now < self.reported_ms.saturating_add(ttl_ms)
    }
}

/// How far in the future of the core's clock a report may be stamped and
/// still be believed: reports are stamped with the wall clock when they
/// arrive, the core's clock is the last tick's (0.5 s steps).
pub const POSTURE_CLOCK_SLACK_MS: i64 = 5_000;

/// A node's subnet routes and exit-node role (see `crate::routes`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeRoutes {
    /// What the node last advertised: canonical prefixes, sorted.
    pub advertised: Vec<ipnet::IpNet>,
    /// Approved prefixes, sorted. An approval outlives a withdrawn
    /// advertisement (it takes effect again when the node re-advertises);
    /// only advertised *and* approved routes are served.
    pub approved: Vec<ipnet::IpNet>,
    pub exit_advertised: bool,
    pub exit_approved: bool,
}

impl NodeRoutes {
    /// Routes the node may serve: advertised and approved.
    pub fn active(&self) -> Vec<ipnet::IpNet> {
        self.advertised
            .iter()
            .filter(|r| self.approved.contains(r))
            .copied()
            .collect()
    }

    /// Whether the node is an exit node: advertised and approved.
    pub fn exit_node(&self) -> bool {
        self.exit_advertised && self.exit_approved
    }
}

/// A device waiting for a person to confirm it (see `crate::device`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceClaim {
    pub machine_key: [u8; 32],
    pub wg_key: [u8; 32],
    pub hostname: String,
}
