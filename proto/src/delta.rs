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
/// Taken from the encoded map as signed, without decoding it.
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

/// `NetMap`'s field numbers the digest treats apart.
const SERIAL: u32 = 1;
const ISSUED: u32 = 2;
const NOT_AFTER: u32 = 3;
const PEERS: u32 = 5;
const RULES: u32 = 6;

/// A fresh hasher with the per-process keys.
fn hasher() -> std::hash::DefaultHasher {
    use std::hash::BuildHasher;
    static KEYS: std::sync::OnceLock<std::hash::RandomState> = std::sync::OnceLock::new();
    KEYS.get_or_init(std::hash::RandomState::new).build_hasher()
}

fn hash_bytes(b: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut h = hasher();
    h.write(b);
    h.finish()
}

/// Reads one field (key and value) off the front of `buf`: its number
/// and, for a varint, its value. `None` if the bytes are not a field.
fn read_field(buf: &mut &[u8]) -> Option<(u32, Option<u64>)> {
    use prost::encoding::{decode_key, decode_varint, WireType};
    let (tag, wire) = decode_key(buf).ok()?;
    let skip = match wire {
        WireType::Varint => return Some((tag, Some(decode_varint(buf).ok()?))),
        WireType::SixtyFourBit => 8,
        WireType::ThirtyTwoBit => 4,
        WireType::LengthDelimited => usize::try_from(decode_varint(buf).ok()?).ok()?,
        WireType::StartGroup | WireType::EndGroup => return None,
    };
    *buf = buf.get(skip..)?;
    Some((tag, None))
}

/// The top-level fields of an encoded message, in order: each field's
/// number and its bytes, key included (so any run of them decodes as the
/// message with just those fields). `None` if the bytes are not a message.
fn top_fields(body: &[u8]) -> Option<Vec<(u32, &[u8])>> {
    let mut out = Vec::new();
    let mut buf = body;
    while !buf.is_empty() {
        let before = buf;
        let (tag, _) = read_field(&mut buf)?;
        out.push((tag, &before[..before.len() - buf.len()]));
    }
    Some(out)
}

/// The id of an encoded peer entry (a whole field 5 of `NetMap`), read
/// without decoding the entry.
fn peer_id(field: &[u8]) -> Option<u64> {
    use prost::encoding::{decode_key, decode_varint, WireType};
    let mut buf = field;
    if decode_key(&mut buf).ok()?.1 != WireType::LengthDelimited {
        return None;
    }
    let len = usize::try_from(decode_varint(&mut buf).ok()?).ok()?;
    let mut entry = buf.get(..len)?;
    let mut id = 0;
    while !entry.is_empty() {
        if let (1, Some(v)) = read_field(&mut entry)? {
            id = v;
        }
    }
    Some(id)
}

/// A map's fields sorted into what a digest and a delta treat apart.
struct Split<'a> {
    digest: Digest,
    /// The header fields (serial, issued, not after).
    header: Vec<u8>,
    /// Each peer entry, with its id and hash, in order.
    peers: Vec<(u64, u64, &'a [u8])>,
    rules: Vec<u8>,
    rest: Vec<u8>,
}

fn split(body: &[u8]) -> Option<Split<'_>> {
    use std::hash::Hasher;
    let mut out = Split {
        digest: Digest::default(),
        header: Vec::new(),
        peers: Vec::new(),
        rules: Vec::new(),
        rest: Vec::new(),
    };
    let (mut rules, mut rest) = (hasher(), hasher());
    for (tag, field) in top_fields(body)? {
        match tag {
            SERIAL | ISSUED | NOT_AFTER => out.header.extend_from_slice(field),
            PEERS => {
                let id = peer_id(field)?;
                out.peers.push((id, hash_bytes(field), field));
            }
            RULES => {
                rules.write(field);
                out.rules.extend_from_slice(field);
            }
            _ => {
                rest.write(field);
                out.rest.extend_from_slice(field);
            }
        }
    }
    out.digest = Digest {
        serial: NetMap::decode(out.header.as_slice()).ok()?.serial,
        peers: out.peers.iter().map(|&(id, h, _)| (id, h)).collect(),
        rules: rules.finish(),
        rest: rest.finish(),
    };
    Some(out)
}

impl Digest {
    /// The digest of a map encoded as the controller signs it (peers
    /// sorted by id); `None` if the bytes do not split into fields (the
    /// parts are not decoded: this is for the controller's own maps).
    pub fn of_encoded(body: &[u8]) -> Option<Self> {
        split(body).map(|s| s.digest)
    }

    /// The digest of a full map.
    pub fn of(m: &NetMap) -> Self {
        Self::of_encoded(&m.encode_to_vec()).expect("prost encodes a message")
    }

    /// The serial of the map it was taken of.
    pub fn serial(&self) -> u64 {
        self.serial
    }
}

/// [`diff`] from the digest of the base to the map encoded in `body` (as
/// signed, peers sorted by id), and the digest of that map. The same delta
/// as [`diff`] unless a hash collides (see [`Digest`]); only what changed
/// is decoded. `None` if `body` is not a `NetMap`.
pub fn diff_encoded(
    base: &Digest,
    body: &[u8],
    signature: Vec<u8>,
) -> Option<(NetMapDelta, Digest)> {
    let next = split(body)?;
    let header = NetMap::decode(next.header.as_slice()).ok()?;
    let mut changed = Vec::new();
    for &(id, h, field) in &next.peers {
        let old = base
            .peers
            .binary_search_by_key(&id, |&(id, _)| id)
            .ok()
            .map(|i| base.peers[i].1);
        if old != Some(h) {
            changed.extend_from_slice(field);
        }
    }
    let kept: std::collections::HashSet<u64> = next.peers.iter().map(|&(id, _, _)| id).collect();
    let delta = NetMapDelta {
        base_serial: base.serial,
        serial: header.serial,
        issued_at_ms: header.issued_at_ms,
        not_after_ms: header.not_after_ms,
        peers: NetMap::decode(changed.as_slice()).ok()?.peers,
        removed_peers: base
            .peers
            .iter()
            .map(|&(id, _)| id)
            .filter(|id| !kept.contains(id))
            .collect(),
        inbound_rules: if base.rules == next.digest.rules {
            None
        } else {
            Some(InboundRules {
                rules: NetMap::decode(next.rules.as_slice()).ok()?.inbound_rules,
            })
        },
        rest: if base.rest == next.digest.rest {
            None
        } else {
            Some(Box::new(NetMap::decode(next.rest.as_slice()).ok()?))
        },
        signature,
    };
    Some((delta, next.digest))
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
    match apply_rotating(controller, base, d, now_ms)? {
        (next, signed, None) => Ok((next, signed)),
        (_, _, Some(_)) => Err(NetMapError::BadSignature.into()),
    }
}

/// [`apply`] with [`netmap::verify_rotating`]'s hand-over rule: the result
/// may be signed by the key `controller` hands over to, which is returned.
///
/// # Errors
/// As [`apply`].
pub fn apply_rotating(
    controller: &PublicKey,
    base: &NetMap,
    d: &NetMapDelta,
    now_ms: UnixMs,
) -> Result<(NetMap, SignedNetMap, Option<PublicKey>), DeltaError> {
    let next = patch(base, d)?;
    let signed = SignedNetMap {
        netmap: next.encode_to_vec(),
        signature: d.signature.clone(),
        delta: None,
    };
    let (_, adopted) = netmap::verify_rotating(controller, &signed, base.serial, now_ms)?;
    Ok((next, signed, adopted))
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
            let (d, digest) = diff_encoded(&Digest::of(&m1), &m2.encode_to_vec(), vec![7]).unwrap();
            prop_assert_eq!(d, diff(&m1, &m2, vec![7]));
            prop_assert_eq!(digest, Digest::of(&m2));
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
