//! Signing and verification of network maps. Pure: no I/O, time is an argument.
//!
//! The signature covers `NETMAP_DOMAIN || SHA-256(bytes)`, where `bytes` is
//! exactly the serialized [`NetMap`] carried in [`SignedNetMap::netmap`].
//! Verifying the bytes that travelled (rather than a re-encoding) means the
//! check cannot be fooled by two encodings of one message. Signing a digest
//! rather than the whole map (hash-then-sign, as Ed25519ph does) hashes each
//! map once with SHA-256 instead of twice with SHA-512 inside Ed25519: at
//! 5,000 nodes, signing was ~45% of the controller's CPU per policy change.

use prost::Message;

/// Largest signed netmap (protobuf) anyone accepts: the node from its
/// controller, the relay in a `HELLO` or `MAP`. A peer entry is ~200 bytes
/// on the wire (name, key, two overlay prefixes, three endpoints) and up to
/// ~1 KiB with a long endpoint list and its share of the rules' source
/// prefixes; the data plane holds at most 65,536 peers, so 65,536 × 1 KiB =
/// 64 MiB. 10,000 typical peers are ~2 MB.
pub const MAX_SIGNED_MAP_BYTES: usize = 64 << 20;

use crate::control::{NetMap, SignedNetMap};
use crate::keys::{PublicKey, SigningKey, Verifier};
use crate::UnixMs;

/// Domain separator so a netmap signature can never be valid for another message type.
pub const NETMAP_DOMAIN: &[u8] = b"ztmesh-netmap-v2\0";

/// Why a signed netmap was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetMapError {
    /// The signature does not verify with the pinned controller key: the map was
    /// forged, corrupted, or signed by another controller.
    #[error("netmap signature does not verify against the pinned controller key")]
    BadSignature,
    /// The signed bytes are not a valid NetMap message.
    #[error("netmap body is malformed: {0}")]
    Malformed(String),
    /// The serial is not greater than the one already applied (replay or rollback).
    #[error("netmap serial {got} is not newer than {have} (rollback refused)")]
    Rollback { got: u64, have: u64 },
    /// The map's not-after time has passed.
    #[error("netmap expired at {not_after_ms} (now {now_ms})")]
    Expired {
        not_after_ms: UnixMs,
        now_ms: UnixMs,
    },
    /// The map is signed by another key and its hand-over from the pinned
    /// key is not valid (see [`crate::handover`]).
    #[error("netmap is signed by a new controller key: {0}")]
    Handover(#[from] crate::handover::HandoverError),
}

fn signed_message(body: &[u8]) -> [u8; NETMAP_DOMAIN.len() + 32] {
    let mut msg = [0u8; NETMAP_DOMAIN.len() + 32];
    msg[..NETMAP_DOMAIN.len()].copy_from_slice(NETMAP_DOMAIN);
    msg[NETMAP_DOMAIN.len()..].copy_from_slice(&crate::auth::sha256(body));
    msg
}

/// Serializes and signs `map`.
pub fn sign(key: &SigningKey, map: &NetMap) -> SignedNetMap {
    sign_encoded(key, map.encode_to_vec())
}

/// Signs an already serialized `NetMap` (the controller assembles maps from
/// pre-encoded parts).
pub fn sign_encoded(key: &SigningKey, body: Vec<u8>) -> SignedNetMap {
    let signature = key.sign(&signed_message(&body)).to_vec();
    SignedNetMap {
        netmap: body,
        signature,
        delta: None,
    }
}

/// Verifies the signature, decodes the map and checks expiry and serial.
///
/// `have_serial` is the serial of the map already applied (0 for none); the new
/// serial must be strictly greater.
///
/// # Errors
/// Any [`NetMapError`]; nothing is returned unless every check passed.
pub fn verify(
    controller: &PublicKey,
    signed: &SignedNetMap,
    have_serial: u64,
    now_ms: UnixMs,
) -> Result<NetMap, NetMapError> {
    let map = verify_signature(controller, signed)?;
    fresh(&map, have_serial, now_ms)?;
    Ok(map)
}

/// [`verify`] for a node that holds `held`: a map signed by another key
/// passes if it carries a hand-over from `held` to that key whose grace
/// period has not ended ([`crate::handover::accept`]). Returns the map and,
/// when it came through a hand-over, the key the caller must hold from now
/// on (and refuse `held` with).
///
/// # Errors
/// Any [`NetMapError`]; [`NetMapError::Handover`] names why a hand-over
/// was refused.
pub fn verify_rotating(
    held: &PublicKey,
    signed: &SignedNetMap,
    have_serial: u64,
    now_ms: UnixMs,
) -> Result<(NetMap, Option<PublicKey>), NetMapError> {
    let (map, new) = verify_signature_rotating(held, signed, now_ms)?;
    fresh(&map, have_serial, now_ms)?;
    Ok((map, new))
}

/// [`verify_signature`] with [`verify_rotating`]'s hand-over rule (for a
/// stored map, and for relays, which hold the key they were configured with).
///
/// # Errors
/// As [`verify_rotating`], without the serial and expiry checks.
pub fn verify_signature_rotating(
    held: &PublicKey,
    signed: &SignedNetMap,
    now_ms: UnixMs,
) -> Result<(NetMap, Option<PublicKey>), NetMapError> {
    let msg = signed_message(&signed.netmap);
    let decode = || {
        NetMap::decode(signed.netmap.as_slice()).map_err(|e| NetMapError::Malformed(e.to_string()))
    };
    if held.verify(&msg, &signed.signature) {
        return Ok((decode()?, None));
    }
    // Decoded before its signature is checked, for the statement only: the
    // statement is verified on its own (by `held`), then the map by the key
    // it names.
    let map = decode().map_err(|_| NetMapError::BadSignature)?;
    let Some(h) = map.trust.as_ref().and_then(|t| t.handover.as_ref()) else {
        return Err(NetMapError::BadSignature);
    };
    let new = crate::handover::accept(h, held, now_ms)?.new_key;
    if !new.verify(&msg, &signed.signature) {
        return Err(NetMapError::BadSignature);
    }
    Ok((map, Some(new)))
}

/// The serial and expiry checks of [`verify`].
fn fresh(map: &NetMap, have_serial: u64, now_ms: UnixMs) -> Result<(), NetMapError> {
    if map.serial <= have_serial {
        return Err(NetMapError::Rollback {
            got: map.serial,
            have: have_serial,
        });
    }
    if map.not_after_ms <= now_ms {
        return Err(NetMapError::Expired {
            not_after_ms: map.not_after_ms,
            now_ms,
        });
    }
    Ok(())
}

/// Whether `signed` carries `controller`'s valid signature over its map
/// bytes (nothing is decoded).
pub fn signature_valid(controller: &Verifier, signed: &SignedNetMap) -> bool {
    controller.verify(&signed_message(&signed.netmap), &signed.signature)
}

/// Verifies only the signature and decodes (used to reload a stored map, whose
/// serial is the current one by definition).
///
/// # Errors
/// [`NetMapError::BadSignature`] or [`NetMapError::Malformed`].
pub fn verify_signature(
    controller: &PublicKey,
    signed: &SignedNetMap,
) -> Result<NetMap, NetMapError> {
    if !controller.verify(&signed_message(&signed.netmap), &signed.signature) {
        return Err(NetMapError::BadSignature);
    }
    NetMap::decode(signed.netmap.as_slice()).map_err(|e| NetMapError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use rand_core::OsRng;

    use super::*;

    fn map(serial: u64) -> NetMap {
        NetMap {
            serial,
            issued_at_ms: 1_000,
            not_after_ms: 10_000,
            ..Default::default()
        }
    }

    #[test]
    fn verifies_a_map_signed_by_the_pinned_key() {
        let key = SigningKey::generate(&mut OsRng);
        let signed = sign(&key, &map(5));
        assert_eq!(verify(&key.public(), &signed, 4, 2_000).unwrap().serial, 5);
    }

    #[test]
    fn refuses_a_map_signed_by_another_key() {
        let key = SigningKey::generate(&mut OsRng);
        let other = SigningKey::generate(&mut OsRng);
        let signed = sign(&other, &map(5));
        assert_eq!(
            verify(&key.public(), &signed, 0, 2_000),
            Err(NetMapError::BadSignature)
        );
    }

    #[test]
    fn refuses_a_tampered_map() {
        let key = SigningKey::generate(&mut OsRng);
        let mut signed = sign(&key, &map(5));
        let last = signed.netmap.len() - 1;
        signed.netmap[last] ^= 1;
        assert_eq!(
            verify(&key.public(), &signed, 0, 2_000),
            Err(NetMapError::BadSignature)
        );
    }

    #[test]
    fn refuses_rollback_and_replay() {
        let key = SigningKey::generate(&mut OsRng);
        let signed = sign(&key, &map(5));
        assert!(matches!(
            verify(&key.public(), &signed, 5, 2_000),
            Err(NetMapError::Rollback { got: 5, have: 5 })
        ));
        assert!(matches!(
            verify(&key.public(), &signed, 9, 2_000),
            Err(NetMapError::Rollback { .. })
        ));
    }

    #[test]
    fn refuses_an_expired_map() {
        let key = SigningKey::generate(&mut OsRng);
        let signed = sign(&key, &map(5));
        assert!(matches!(
            verify(&key.public(), &signed, 0, 10_000),
            Err(NetMapError::Expired { .. })
        ));
    }

    fn handed_over_map(old: &SigningKey, new: &SigningKey, serial: u64) -> SignedNetMap {
        let mut m = map(serial);
        m.trust = Some(crate::control::ControllerTrust {
            handover: Some(crate::handover::sign(old, new, 1_000, 5_000)),
            ..Default::default()
        });
        sign(new, &m)
    }

    #[test]
    fn a_map_of_the_new_key_passes_through_the_hand_over_and_names_the_new_key() {
        let (old, new) = (
            SigningKey::generate(&mut OsRng),
            SigningKey::generate(&mut OsRng),
        );
        let signed = handed_over_map(&old, &new, 5);
        let (m, adopted) = verify_rotating(&old.public(), &signed, 4, 2_000).unwrap();
        assert_eq!((m.serial, adopted), (5, Some(new.public())));
        // A node that moved already verifies it directly.
        let (_, adopted) = verify_rotating(&new.public(), &signed, 4, 2_000).unwrap();
        assert_eq!(adopted, None);
        // The serial and expiry rules still hold.
        assert!(matches!(
            verify_rotating(&old.public(), &signed, 5, 2_000),
            Err(NetMapError::Rollback { .. })
        ));
        // The plain check knows nothing of hand-overs.
        assert_eq!(
            verify(&old.public(), &signed, 0, 2_000),
            Err(NetMapError::BadSignature)
        );
    }

    #[test]
    fn after_the_grace_period_the_hand_over_is_refused_with_a_re_enroll_hint() {
        let (old, new) = (
            SigningKey::generate(&mut OsRng),
            SigningKey::generate(&mut OsRng),
        );
        let mut signed = handed_over_map(&old, &new, 5);
        let mut m = NetMap::decode(signed.netmap.as_slice()).unwrap();
        m.not_after_ms = 100_000;
        signed = sign(&new, &m);
        let err = verify_rotating(&old.public(), &signed, 0, 6_000).unwrap_err();
        assert!(matches!(
            err,
            NetMapError::Handover(crate::handover::HandoverError::Ended { .. })
        ));
        assert!(err.to_string().contains("re-enroll"), "{err}");
    }

    #[test]
    fn a_valid_hand_over_does_not_cover_a_map_signed_by_a_third_key() {
        let [old, new, third] = [0; 3].map(|_| SigningKey::generate(&mut OsRng));
        let honest = handed_over_map(&old, &new, 5);
        // The statement lifted onto a map signed by someone else.
        let m = NetMap::decode(honest.netmap.as_slice()).unwrap();
        let forged = sign(&third, &m);
        assert_eq!(
            verify_rotating(&old.public(), &forged, 0, 2_000),
            Err(NetMapError::BadSignature)
        );
        // A map with no statement, by an unknown key.
        assert_eq!(
            verify_rotating(&old.public(), &sign(&third, &map(6)), 0, 2_000),
            Err(NetMapError::BadSignature)
        );
        // Garbage under a bad signature is a bad signature, not a decode error.
        let junk = SignedNetMap {
            netmap: vec![0xff; 9],
            signature: vec![0; 64],
            delta: None,
        };
        assert_eq!(
            verify_signature_rotating(&old.public(), &junk, 2_000),
            Err(NetMapError::BadSignature)
        );
    }

    #[test]
    fn once_moved_the_old_key_is_refused() {
        let (old, new) = (
            SigningKey::generate(&mut OsRng),
            SigningKey::generate(&mut OsRng),
        );
        let by_old = sign(&old, &map(9));
        assert_eq!(
            verify_rotating(&new.public(), &by_old, 0, 2_000),
            Err(NetMapError::BadSignature)
        );
    }
}
