//! The hand-over of the controller's netmap signing key. Pure: no I/O, time
//! is an argument.
//!
//! When an admin replaces the signing key, the old key signs a statement
//! naming the new key, when it took over and when the grace period ends
//! ([`pb::HandoverStatement`]); the new key signs the same bytes, proving it
//! is held. Maps signed by the new key carry the statement during the grace
//! period, so a node (or relay) that trusts the old key can move to the new
//! one without re-enrolling ([`crate::netmap::verify_rotating`]), and the
//! audit log's checkpoints signed by a retired key stay verifiable
//! ([`lineage`]).
//!
//! What it does not give: a node that was offline for the whole grace
//! period cannot follow (the statement has ended) and must re-enroll, and
//! a leaked old key is as good as the real one until the grace period
//! ends for nodes that have not moved yet.

use prost::Message;

use crate::control as pb;
use crate::keys::{PublicKey, SigningKey};
use crate::UnixMs;

/// Domain separator of both signatures over a statement.
pub const HANDOVER_DOMAIN: &[u8] = b"ztmesh-handover-v1\0";

/// Why a hand-over statement was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandoverError {
    /// The statement does not decode, or names keys that are not keys.
    #[error("key hand-over is malformed: {0}")]
    Malformed(String),
    /// It hands over from another key than the one held.
    #[error("key hand-over is from {from}, not from the key held ({held})")]
    NotFromHeld { from: PublicKey, held: PublicKey },
    /// A signature does not verify: forged, or corrupted.
    #[error("key hand-over is not signed by the {which} key")]
    BadSignature { which: &'static str },
    /// The grace period is over: only a node that moved in time follows.
    #[error(
        "the controller's signing key was replaced and the hand-over from the key this node \
         holds ended at {not_after_ms} (now {now_ms}): re-enroll this node"
    )]
    Ended {
        not_after_ms: UnixMs,
        now_ms: UnixMs,
    },
}

/// A verified statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handover {
    pub old_key: PublicKey,
    pub new_key: PublicKey,
    pub valid_from_ms: UnixMs,
    pub not_after_ms: UnixMs,
}

fn signed_message(statement: &[u8]) -> Vec<u8> {
    [HANDOVER_DOMAIN, statement].concat()
}

/// The statement that `new` succeeds `old` from `valid_from_ms`, accepted
/// until `not_after_ms`, signed by both.
pub fn sign(
    old: &SigningKey,
    new: &SigningKey,
    valid_from_ms: UnixMs,
    not_after_ms: UnixMs,
) -> pb::KeyHandover {
    let statement = pb::HandoverStatement {
        old_key: old.public().as_bytes().to_vec(),
        new_key: new.public().as_bytes().to_vec(),
        valid_from_ms,
        not_after_ms,
    }
    .encode_to_vec();
    let msg = signed_message(&statement);
    pb::KeyHandover {
        old_signature: old.sign(&msg).to_vec(),
        new_signature: new.sign(&msg).to_vec(),
        statement,
    }
}

/// Reads `h` and checks both signatures; the time is not checked (see
/// [`accept`]).
///
/// # Errors
/// [`HandoverError::Malformed`] or [`HandoverError::BadSignature`].
pub fn read(h: &pb::KeyHandover) -> Result<Handover, HandoverError> {
    let s = pb::HandoverStatement::decode(h.statement.as_slice())
        .map_err(|e| HandoverError::Malformed(e.to_string()))?;
    let key = |b: &[u8], which: &str| {
        PublicKey::from_slice(b).map_err(|e| HandoverError::Malformed(format!("{which} key: {e}")))
    };
    let out = Handover {
        old_key: key(&s.old_key, "old")?,
        new_key: key(&s.new_key, "new")?,
        valid_from_ms: s.valid_from_ms,
        not_after_ms: s.not_after_ms,
    };
    if out.old_key == out.new_key {
        return Err(HandoverError::Malformed(
            "hands a key over to itself".into(),
        ));
    }
    if out.not_after_ms <= out.valid_from_ms {
        return Err(HandoverError::Malformed("ends before it starts".into()));
    }
    let msg = signed_message(&h.statement);
    if !out.old_key.verify(&msg, &h.old_signature) {
        return Err(HandoverError::BadSignature { which: "old" });
    }
    if !out.new_key.verify(&msg, &h.new_signature) {
        return Err(HandoverError::BadSignature { which: "new" });
    }
    Ok(out)
}

/// The key `held` hands over to, if `h` is a valid statement from `held`
/// and its grace period has not ended at `now_ms`.
///
/// # Errors
/// Any [`HandoverError`].
pub fn accept(
    h: &pb::KeyHandover,
    held: &PublicKey,
    now_ms: UnixMs,
) -> Result<Handover, HandoverError> {
    let out = read(h)?;
    if out.old_key != *held {
        return Err(HandoverError::NotFromHeld {
            from: out.old_key,
            held: *held,
        });
    }
    if now_ms >= out.not_after_ms {
        return Err(HandoverError::Ended {
            not_after_ms: out.not_after_ms,
            now_ms,
        });
    }
    Ok(out)
}

/// A key a signature may be checked with, and until when it signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrustedKey {
    pub key: PublicKey,
    /// When it was replaced (`None`: the current key). Nothing it signed
    /// as of a later time counts.
    pub until_ms: Option<UnixMs>,
}

/// Every key that signed for the controller that holds `current`, newest
/// first: `current`, then each predecessor proven by a statement in
/// `handovers` whose new key is the key before it (any order; statements
/// that do not verify or do not connect are ignored, so nobody can add a
/// key to the lineage without the signature of a key already in it).
pub fn lineage(current: &PublicKey, handovers: &[pb::KeyHandover]) -> Vec<TrustedKey> {
    let read: Vec<Handover> = handovers.iter().filter_map(|h| read(h).ok()).collect();
    let mut out = vec![TrustedKey {
        key: *current,
        until_ms: None,
    }];
    // Bounded: each step adds a key not yet in the lineage.
    while out.len() <= read.len() {
        let newest_old = out[out.len() - 1].key;
        let Some(h) = read
            .iter()
            .find(|h| h.new_key == newest_old && out.iter().all(|t| t.key != h.old_key))
        else {
            break;
        };
        out.push(TrustedKey {
            key: h.old_key,
            until_ms: Some(h.valid_from_ms),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use rand_core::OsRng;

    use super::*;

    fn key() -> SigningKey {
        SigningKey::generate(&mut OsRng)
    }

    #[test]
    fn a_statement_from_the_held_key_is_accepted_until_it_ends() {
        let (old, new) = (key(), key());
        let h = sign(&old, &new, 1_000, 5_000);
        let got = accept(&h, &old.public(), 4_999).unwrap();
        assert_eq!(got.new_key, new.public());
        assert_eq!(got.valid_from_ms, 1_000);
        assert_eq!(
            accept(&h, &old.public(), 5_000),
            Err(HandoverError::Ended {
                not_after_ms: 5_000,
                now_ms: 5_000
            })
        );
        assert!(accept(&h, &old.public(), 5_000)
            .unwrap_err()
            .to_string()
            .contains("re-enroll"));
    }

    #[test]
    fn a_statement_from_another_key_is_refused() {
        let (old, new, other) = (key(), key(), key());
        let h = sign(&old, &new, 1_000, 5_000);
        assert!(matches!(
            accept(&h, &other.public(), 2_000),
            Err(HandoverError::NotFromHeld { .. })
        ));
    }

    #[test]
    fn any_changed_byte_or_a_missing_signature_is_refused() {
        let (old, new) = (key(), key());
        let h = sign(&old, &new, 1_000, 5_000);
        for i in 0..h.statement.len() {
            let mut bad = h.clone();
            bad.statement[i] ^= 1;
            assert!(accept(&bad, &old.public(), 2_000).is_err(), "byte {i}");
        }
        let mut bad = h.clone();
        bad.old_signature[0] ^= 1;
        assert_eq!(
            accept(&bad, &old.public(), 2_000),
            Err(HandoverError::BadSignature { which: "old" })
        );
        let mut bad = h.clone();
        bad.new_signature.clear();
        assert_eq!(
            accept(&bad, &old.public(), 2_000),
            Err(HandoverError::BadSignature { which: "new" })
        );
    }

    #[test]
    fn the_old_key_alone_cannot_hand_over_to_a_key_it_does_not_hold() {
        // An attacker with the old key names a victim's key as the new one,
        // signing only with the old key (and its own key as "new").
        let (old, victim, attacker) = (key(), key(), key());
        let mut h = sign(&old, &attacker, 1_000, 5_000);
        let mut s = pb::HandoverStatement::decode(h.statement.as_slice()).unwrap();
        s.new_key = victim.public().as_bytes().to_vec();
        h.statement = s.encode_to_vec();
        h.old_signature = old.sign(&signed_message(&h.statement)).to_vec();
        assert_eq!(
            accept(&h, &old.public(), 2_000),
            Err(HandoverError::BadSignature { which: "new" })
        );
    }

    #[test]
    fn nonsense_statements_are_malformed() {
        let (old, new) = (key(), key());
        assert!(matches!(
            read(&sign(&old, &old, 1_000, 5_000)),
            Err(HandoverError::Malformed(_))
        ));
        assert!(matches!(
            read(&sign(&old, &new, 5_000, 5_000)),
            Err(HandoverError::Malformed(_))
        ));
        let junk = pb::KeyHandover {
            statement: vec![0xff; 7],
            ..Default::default()
        };
        assert!(matches!(read(&junk), Err(HandoverError::Malformed(_))));
    }

    #[test]
    fn the_lineage_walks_back_through_valid_statements_only() {
        let (k1, k2, k3, stranger) = (key(), key(), key(), key());
        let h12 = sign(&k1, &k2, 1_000, 2_000);
        let h23 = sign(&k2, &k3, 3_000, 4_000);
        // A stranger's statement into the lineage needs the current key's
        // signature; one naming k3 as new without it does not verify.
        let mut forged = sign(&stranger, &k3, 3_500, 4_000);
        forged.new_signature = vec![0; 64];
        let fake_into_k1 = sign(&stranger, &k1, 500, 900);
        let got = lineage(&k3.public(), &[forged, h12, fake_into_k1.clone(), h23]);
        let keys: Vec<_> = got.iter().map(|t| (t.key, t.until_ms)).collect();
        // k1's own predecessor claim is signed by k1 (the new key), so a
        // stranger cannot make it; here k1 did not, so the walk stops at k1
        // unless a statement signed by k1 names the stranger.
        assert_eq!(
            keys,
            vec![
                (k3.public(), None),
                (k2.public(), Some(3_000)),
                (k1.public(), Some(1_000)),
                (stranger.public(), Some(500)),
            ]
        );
        // Without k1's signature on it, the stranger is not in the lineage.
        let mut unsigned = fake_into_k1;
        unsigned.new_signature = vec![0; 64];
        let got = lineage(
            &k3.public(),
            &[
                sign(&k1, &k2, 1_000, 2_000),
                sign(&k2, &k3, 3_000, 4_000),
                unsigned,
            ],
        );
        assert_eq!(got.len(), 3);
        // A loop (k3 → k1 claimed) ends the walk instead of spinning.
        let looped = sign(&k3, &k1, 5_000, 6_000);
        assert_eq!(
            lineage(&k1.public(), &[looped, sign(&k1, &k3, 100, 200)]).len(),
            2
        );
    }
}
