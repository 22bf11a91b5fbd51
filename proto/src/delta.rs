//! Netmap deltas: what changed between two full maps, and the node's side
//! that turns a held map and a delta back into a signed full map. Pure.
//!
//! A delta names the peers added or changed (whole entries) and removed (by
//! id), the inbound rules when they changed (absent: unchanged; present and
//! empty: deny all), and every other field when any of them changed. It
//! carries the controller's signature over the *resulting* full map's
//! encoding, so [`apply`] verifies exactly what the node will enforce: a
//! delta built against another base, tampered with, or applied after a gap
//! fails, and the node asks for a full map. Re-encoding is sound here
//! because the controller's maps are prost's own encoding of the same
//! message (peers sorted by id), which the controller's core tests.

use prost::Message;

use crate::control::{InboundRules, NetMap, NetMapDelta, Peer, SignedNetMap};
use crate::keys::PublicKey;
use crate::netmap::{self, NetMapError};
use crate::UnixMs;

/// Why a delta was not applied; the node then asks for a full map.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeltaError {
    /// The delta follows another map than the one held: one was missed.
    #[error("netmap delta follows serial {base}, this node holds {held}")]
    Gap { base: u64, held: u64 },
    /// The same peer twice, or a peer both changed and removed.
    #[error("netmap delta is malformed: {0}")]
    Malformed(String),
    /// The result is not the map the controller signed.
    #[error("netmap delta result refused: {0}")]
    Refused(#[from] NetMapError),
}

/// The fields of a map other than its header, peers and rules.
fn rest_of(m: &NetMap) -> NetMap {
    NetMap {
        serial: 0,
        issued_at_ms: 0,
        not_after_ms: 0,
        peers: Vec::new(),
        inbound_rules: Vec::new(),
        ..m.clone()
    }
}

/// The delta that turns `base` into `next` (full maps, peers sorted by id),
/// carrying `signature` (the controller's over `next`'s encoding).
pub fn diff(base: &NetMap, next: &NetMap, signature: Vec<u8>) -> NetMapDelta {
    let old: std::collections::BTreeMap<u64, &Peer> =
        base.peers.iter().map(|p| (p.id, p)).collect();
    let new: std::collections::BTreeSet<u64> = next.peers.iter().map(|p| p.id).collect();
    let rest = rest_of(next);
    NetMapDelta {
        base_serial: base.serial,
        serial: next.serial,
        issued_at_ms: next.issued_at_ms,
        not_after_ms: next.not_after_ms,
        peers: next
            .peers
            .iter()
            .filter(|p| old.get(&p.id) != Some(p))
            .cloned()
            .collect(),
        removed_peers: old.keys().filter(|id| !new.contains(id)).copied().collect(),
        inbound_rules: (base.inbound_rules != next.inbound_rules).then(|| InboundRules {
            rules: next.inbound_rules.clone(),
        }),
        rest: (rest_of(base) != rest).then(|| Box::new(rest)),
        signature,
    }
}

/// What the controller keeps of the last map it sent on a stream, to build
/// the next delta without keeping the map: each peer's id and a hash of its
/// entry, and hashes of the rules and of the other fields (16 bytes a peer).
///
/// The hashes are keyed per process, so nobody can aim for a collision; a
/// collision anyway (a changed entry hashing as unchanged) leaves the
/// change out of the delta, the node's result then fails the signature
/// check, and it asks for a full map: a digest can cost a resync, never a
/// wrong map.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Digest {
    serial: u64,
    /// (peer id, entry hash), sorted by id.
    peers: Vec<(u64, u64)>,
    rules: u64,
    rest: u64,
}

/// The per-process hash of a message's encoding.
fn hash_of(m: &impl Message) -> u64 {
    use std::hash::BuildHasher;
    static KEYS: std::sync::OnceLock<std::hash::RandomState> = std::sync::OnceLock::new();
    KEYS.get_or_init(std::hash::RandomState::new)
        .hash_one(m.encode_to_vec())
}

impl Digest {
    /// The digest of a full map (peers sorted by id).
    pub fn of(m: &NetMap) -> Self {
        Self {
            serial: m.serial,
            peers: m.peers.iter().map(|p| (p.id, hash_of(p))).collect(),
            rules: hash_of(&InboundRules {
                rules: m.inbound_rules.clone(),
            }),
            rest: hash_of(&rest_of(m)),
        }
    }

    /// The serial of the map it was taken of.
    pub fn serial(&self) -> u64 {
        self.serial
    }
}

/// [`diff`] against the map `base` was taken of: the same delta, unless a
/// hash collides (see [`Digest`]).
pub fn diff_from(base: &Digest, next: &NetMap, signature: Vec<u8>) -> NetMapDelta {
    let old: std::collections::BTreeMap<u64, u64> = base.peers.iter().copied().collect();
    let new: std::collections::BTreeSet<u64> = next.peers.iter().map(|p| p.id).collect();
    let rest = rest_of(next);
    let rules = InboundRules {
        rules: next.inbound_rules.clone(),
    };
    NetMapDelta {
        base_serial: base.serial,
        serial: next.serial,
        issued_at_ms: next.issued_at_ms,
        not_after_ms: next.not_after_ms,
        peers: next
            .peers
            .iter()
            .filter(|p| old.get(&p.id) != Some(&hash_of(*p)))
            .cloned()
            .collect(),
        removed_peers: old.keys().filter(|id| !new.contains(id)).copied().collect(),
        inbound_rules: (base.rules != hash_of(&rules)).then_some(rules),
        rest: (base.rest != hash_of(&rest)).then(|| Box::new(rest)),
        signature,
    }
}

/// `base` with `d` applied, unverified (see [`apply`]).
///
/// # Errors
/// [`DeltaError::Gap`] for a delta that follows another serial;
/// [`DeltaError::Malformed`] for a peer listed twice or both changed and
/// removed.
pub fn patch(base: &NetMap, d: &NetMapDelta) -> Result<NetMap, DeltaError> {
    if d.base_serial != base.serial {
        return Err(DeltaError::Gap {
            base: d.base_serial,
            held: base.serial,
        });
    }
    if d.removed_peers.len() > base.peers.len() {
        return Err(DeltaError::Malformed(format!(
            "{} peers removed from a map of {}",
            d.removed_peers.len(),
            base.peers.len()
        )));
    }
    let mut touched = std::collections::BTreeSet::new();
    for id in d
        .peers
        .iter()
        .map(|p| p.id)
        .chain(d.removed_peers.iter().copied())
    {
        if !touched.insert(id) {
            return Err(DeltaError::Malformed(format!("peer {id} listed twice")));
        }
    }
    let mut out = match &d.rest {
        Some(rest) => NetMap {
            peers: Vec::new(),
            inbound_rules: Vec::new(),
            ..(**rest).clone()
        },
        None => rest_of(base),
    };
    out.serial = d.serial;
    out.issued_at_ms = d.issued_at_ms;
    out.not_after_ms = d.not_after_ms;
    out.inbound_rules = match &d.inbound_rules {
        Some(r) => r.rules.clone(),
        None => base.inbound_rules.clone(),
    };
    out.peers = base
        .peers
        .iter()
        .filter(|p| !touched.contains(&p.id))
        .chain(d.peers.iter())
        .cloned()
        .collect();
    out.peers.sort_by_key(|p| p.id);
    Ok(out)
}

/// Applies `d` to the map the node holds (`base`, verified when it came)
/// and verifies the result as a full signed map: signed by `controller`,
/// newer than `base`, not expired at `now_ms`. Returns the result, signed.
///
/// # Errors
/// Any [`DeltaError`]; nothing is returned unless every check passed.
pub fn apply(
    controller: &PublicKey,
    base: &NetMap,
    d: &NetMapDelta,
    now_ms: UnixMs,
) -> Result<(NetMap, SignedNetMap), DeltaError> {
    let next = patch(base, d)?;
    let signed = SignedNetMap {
        netmap: next.encode_to_vec(),
        signature: d.signature.clone(),
        delta: None,
    };
    netmap::verify(controller, &signed, base.serial, now_ms)?;
    Ok((next, signed))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand_core::OsRng;

    use super::*;
    use crate::control::{InboundRule, NodeInfo, PortRange, QuarantineInfo, Relay};
    use crate::keys::SigningKey;

    fn peer(id: u64, v: u8) -> Peer {
        Peer {
            id,
            name: format!("n{id}"),
            wg_key: vec![v; 32],
            allowed_ips: vec![format!("100.64.0.{id}/32")],
            endpoints: (0..v % 3).map(|i| format!("198.18.0.{i}:41641")).collect(),
            persistent_keepalive: 25,
        }
    }

    fn rule(v: u8) -> InboundRule {
        InboundRule {
            src_prefixes: vec![format!("100.64.0.{v}/32")],
            protocols: vec![6],
            ports: vec![PortRange {
                first: u32::from(v),
                last: u32::from(v),
            }],
            rule_id: format!("p.hujson:{v}"),
            ..Default::default()
        }
    }

    /// A full map from a compact description: peers (id → version), rules,
    /// and a variant of the other fields.
    fn map(serial: u64, peers: &[(u64, u8)], rules: &[u8], rest: u8) -> NetMap {
        let mut peers: Vec<Peer> = peers.iter().map(|&(id, v)| peer(id, v)).collect();
        peers.sort_by_key(|p| p.id);
        peers.dedup_by_key(|p| p.id);
        NetMap {
            serial,
            issued_at_ms: 1_000 + serial as i64,
            not_after_ms: 1_000_000,
            self_node: Some(NodeInfo {
                id: 1,
                name: format!("me{}", rest % 2),
                ..Default::default()
            }),
            peers,
            inbound_rules: rules.iter().map(|&v| rule(v)).collect(),
            dns_domain: "ztmesh.internal".into(),
            relays: (0..rest % 3)
                .map(|i| Relay {
                    name: format!("r{i}"),
                    ..Default::default()
                })
                .collect(),
            quarantine: (rest % 5 == 4).then(|| QuarantineInfo {
                since_ms: 7,
                reason: "test".into(),
            }),
            controllers: vec!["https://[fd00::1]:8443".into()],
            ..Default::default()
        }
    }

    fn signed_by(key: &SigningKey, m: &NetMap) -> Vec<u8> {
        netmap::sign(key, m).signature
    }

    type State = (Vec<(u64, u8)>, Vec<u8>, u8);

    fn state() -> impl Strategy<Value = State> {
        (
            prop::collection::vec((1u64..40, 0u8..4), 0..30),
            prop::collection::vec(0u8..6, 0..4),
            0u8..10,
        )
    }

    proptest! {
        /// Any sequence of deltas, each built between consecutive full
        /// maps, gives the node every full map in turn, signed.
        #[test]
        fn applying_any_sequence_of_deltas_equals_the_full_maps(
            states in prop::collection::vec(state(), 1..8),
        ) {
            let key = SigningKey::generate(&mut OsRng);
            let fulls: Vec<NetMap> = states
                .iter()
                .enumerate()
                .map(|(i, (p, r, x))| map(i as u64 + 1, p, r, *x))
                .collect();
            let mut held = fulls[0].clone();
            for next in &fulls[1..] {
                let d = diff(&held, next, signed_by(&key, next));
                let (got, signed) = apply(&key.public(), &held, &d, 2_000).unwrap();
                prop_assert_eq!(&got, next);
                prop_assert_eq!(&signed, &netmap::sign(&key, next));
                // Unchanged parts cost nothing on the wire.
                prop_assert!(
                    d.encoded_len() <= next.encoded_len() + 100 + 3 * d.removed_peers.len()
                );
                held = got;
            }
        }

        /// A delta built from the digest of a map equals the one built
        /// from the map itself.
        #[test]
        fn a_digest_gives_the_same_delta_as_the_map(a in state(), b in state()) {
            let (m1, m2) = (map(1, &a.0, &a.1, a.2), map(2, &b.0, &b.1, b.2));
            prop_assert_eq!(
                diff_from(&Digest::of(&m1), &m2, vec![7]),
                diff(&m1, &m2, vec![7])
            );
        }

        /// A delta that skips a map (built against an older one) is a gap.
        #[test]
        fn a_gap_is_refused(a in state(), b in state(), c in state()) {
            let key = SigningKey::generate(&mut OsRng);
            let (m1, m2, m3) = (map(1, &a.0, &a.1, a.2), map(2, &b.0, &b.1, b.2), map(3, &c.0, &c.1, c.2));
            let skip = diff(&m1, &m3, signed_by(&key, &m3));
            prop_assert_eq!(
                apply(&key.public(), &m2, &skip, 2_000).unwrap_err(),
                DeltaError::Gap { base: 1, held: 2 }
            );
        }
    }

    /// An empty rule set is "deny all", not "unchanged".
    #[test]
    fn empty_rules_are_not_unchanged_rules() {
        let key = SigningKey::generate(&mut OsRng);
        let base = map(1, &[(2, 0)], &[1, 2], 0);
        let next = map(2, &[(2, 0)], &[], 0);
        let d = diff(&base, &next, signed_by(&key, &next));
        assert_eq!(d.inbound_rules, Some(InboundRules { rules: vec![] }));
        assert!(d.peers.is_empty() && d.removed_peers.is_empty() && d.rest.is_none());
        let (got, _) = apply(&key.public(), &base, &d, 2_000).unwrap();
        assert!(got.inbound_rules.is_empty());
        // Without the wrapper the rules stay.
        let same = map(2, &[(2, 0)], &[1, 2], 0);
        let d = diff(&base, &same, signed_by(&key, &same));
        assert_eq!(d.inbound_rules, None);
        assert_eq!(
            apply(&key.public(), &base, &d, 2_000)
                .unwrap()
                .0
                .inbound_rules
                .len(),
            2
        );
    }

    /// A delta changed on the way (a peer dropped, another added, the rules
    /// widened) or signed by another key fails the check on the result.
    #[test]
    fn a_tampered_or_forged_delta_is_refused() {
        let key = SigningKey::generate(&mut OsRng);
        let base = map(1, &[(2, 0), (3, 0)], &[1], 0);
        let next = map(2, &[(2, 1), (3, 0), (4, 0)], &[1], 0);
        let good = diff(&base, &next, signed_by(&key, &next));
        assert!(apply(&key.public(), &base, &good, 2_000).is_ok());
        let refused = |d: NetMapDelta| {
            matches!(
                apply(&key.public(), &base, &d, 2_000),
                Err(DeltaError::Refused(NetMapError::BadSignature))
            )
        };
        let mut d = good.clone();
        d.peers.retain(|p| p.id != 4);
        assert!(refused(d));
        let mut d = good.clone();
        d.peers.push(peer(9, 0));
        assert!(refused(d));
        let mut d = good.clone();
        d.inbound_rules = Some(InboundRules {
            rules: vec![rule(1), rule(5)],
        });
        assert!(refused(d));
        let other = SigningKey::generate(&mut OsRng);
        let forged = diff(&base, &next, signed_by(&other, &next));
        assert!(refused(forged));
        // Listing a peer twice is malformed before any signature check.
        let mut d = good;
        d.removed_peers.push(4);
        assert!(matches!(
            apply(&key.public(), &base, &d, 2_000),
            Err(DeltaError::Malformed(_))
        ));
    }

    /// A delta is refused after its result expires, like a full map.
    #[test]
    fn an_expired_result_is_refused() {
        let key = SigningKey::generate(&mut OsRng);
        let base = map(1, &[], &[], 0);
        let next = map(2, &[(2, 0)], &[], 0);
        let d = diff(&base, &next, signed_by(&key, &next));
        assert!(matches!(
            apply(&key.public(), &base, &d, 2_000_000),
            Err(DeltaError::Refused(NetMapError::Expired { .. }))
        ));
    }
}
