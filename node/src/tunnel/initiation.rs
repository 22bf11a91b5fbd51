//! Who really sent a handshake initiation from a key this device does not
//! list as a peer — evidence for the controller's detectors.
//!
//! boringtun's `parse_handshake_anon` decrypts the initiator's static key
//! but does not authenticate it: anyone can encrypt any public key. The
//! initiation's next field, the TAI64N timestamp, is sealed under a key
//! derived from DH(our static, their static), which only the holder of
//! that static private key can compute. [`verify`] runs Noise IK's first
//! message through the timestamp (WireGuard's `IKpsk2`: the PSK enters
//! later), so a verified initiation is proof that the key's holder sent it
//! to us; a replayed one is not counted twice ([`Unknown`] keeps the
//! newest timestamp per key).
//!
//! Pure: bytes in, the key and timestamp out.

use std::collections::HashMap;

use blake2::digest::{FixedOutput, KeyInit, Update};
use blake2::Blake2s256;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use x25519_dalek as x25519;

const CONSTRUCTION: &[u8] = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";
const IDENTIFIER: &[u8] = b"WireGuard v1 zx2c4 Jason@zx2c4.com";
/// A handshake initiation's length and field offsets.
const LEN: usize = 148;
const EPHEMERAL: std::ops::Range<usize> = 8..40;
const STATIC: std::ops::Range<usize> = 40..88;
const TIMESTAMP: std::ops::Range<usize> = 88..116;

fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Blake2s256::default();
    for p in parts {
        Update::update(&mut h, p);
    }
    h.finalize_fixed().into()
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = <hmac::SimpleHmac<Blake2s256> as KeyInit>::new_from_slice(key)
        .expect("HMAC takes any key length");
    for p in parts {
        Update::update(&mut m, p);
    }
    m.finalize_fixed().into()
}

/// Noise's KDF2: the next chaining key and a message key.
fn kdf2(chain: &[u8; 32], input: &[u8]) -> ([u8; 32], [u8; 32]) {
    let t0 = hmac(chain, &[input]);
    let t1 = hmac(&t0, &[&[1]]);
    let t2 = hmac(&t0, &[&t1, &[2]]);
    (t1, t2)
}

/// Opens `sealed` (ciphertext and tag) with counter 0 and `aad`.
fn open(key: &[u8; 32], sealed: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
    let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, key).ok()?);
    let mut buf = sealed.to_vec();
    let plain = key
        .open_in_place(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::from(aad),
            &mut buf,
        )
        .ok()?;
    Some(plain.to_vec())
}

/// The initiator's static public key and the TAI64N timestamp of an
/// initiation sent to (`private`, `public`), if it is well formed and was
/// sealed by the holder of that static key.
pub fn verify(
    private: &x25519::StaticSecret,
    public: &x25519::PublicKey,
    msg: &[u8],
) -> Option<([u8; 32], [u8; 12])> {
    if msg.len() != LEN || msg[0] != 1 {
        return None;
    }
    let chain = hash(&[CONSTRUCTION]);
    let h = hash(&[&hash(&[&chain, IDENTIFIER]), public.as_bytes()]);
    let ephemeral: [u8; 32] = msg[EPHEMERAL].try_into().ok()?;
    let h = hash(&[&h, &ephemeral]);
    let chain = hmac(&hmac(&chain, &[&ephemeral]), &[&[1]]);
    let es = private.diffie_hellman(&x25519::PublicKey::from(ephemeral));
    let (chain, key) = kdf2(&chain, es.as_bytes());
    let initiator: [u8; 32] = open(&key, &msg[STATIC], &h)?.try_into().ok()?;
    let h = hash(&[&h, &msg[STATIC]]);
    let ss = private.diffie_hellman(&x25519::PublicKey::from(initiator));
    if ss.as_bytes() == &[0; 32] {
        return None;
    }
    let (_, key) = kdf2(&chain, ss.as_bytes());
    let timestamp: [u8; 12] = open(&key, &msg[TIMESTAMP], &h)?.try_into().ok()?;
    Some((initiator, timestamp))
}

/// How far an initiation's timestamp may be from this node's clock and
/// still count (clocks differ; WireGuard itself only needs them to grow).
pub const FRESH_S: u64 = 120;

/// Unix seconds of a TAI64N label (2^62 + seconds; the TAI offset some
/// WireGuard implementations add, 10 or 37 s, is within [`FRESH_S`]).
pub fn tai64_unix_s(ts: &[u8; 12]) -> u64 {
    let label = u64::from_be_bytes([ts[0], ts[1], ts[2], ts[3], ts[4], ts[5], ts[6], ts[7]]);
    label.saturating_sub(1 << 62)
}

/// Keys tracked at most between two reports; initiations from further keys
/// are counted in [`Unknown::overflow`] only.
pub const MAX_UNKNOWN_KEYS: usize = 64;

/// One key's initiations: how many since the last take, the first of them,
/// and the newest ever (kept across takes against replays).
#[derive(Debug, Clone, Copy)]
struct Seen {
    count: u64,
    first: [u8; 12],
    last: [u8; 12],
}

/// Verified initiations from keys that are not peers, since the last take.
#[derive(Debug, Default)]
pub struct Unknown {
    /// Per key: initiations counted and the newest timestamp seen (kept
    /// across takes, so a replay never counts again).
    keys: HashMap<[u8; 32], Seen>,
    pub overflow: u64,
}

impl Unknown {
    /// Counts a verified initiation unless its timestamp is not newer than
    /// the last one counted for the key (a replay).
    pub fn record(&mut self, key: [u8; 32], timestamp: [u8; 12]) {
        if let Some(seen) = self.keys.get_mut(&key) {
            // TAI64N is big-endian: bytes compare like the times.
            if timestamp > seen.last {
                if seen.count == 0 {
                    seen.first = timestamp;
                }
                seen.count += 1;
                seen.last = timestamp;
            }
            return;
        }
        if self.keys.len() >= MAX_UNKNOWN_KEYS {
            // A key with nothing new since the last take makes room; its
            // newest timestamp is then forgotten.
            let quiet = self
                .keys
                .iter()
                .find(|(_, seen)| seen.count == 0)
                .map(|(k, _)| *k);
            match quiet {
                Some(k) => {
                    self.keys.remove(&k);
                }
                None => {
                    self.overflow = self.overflow.saturating_add(1);
                    return;
                }
            }
        }
        self.keys.insert(
            key,
            Seen {
                count: 1,
                first: timestamp,
                last: timestamp,
            },
        );
    }

    /// The counts since the last take, of keys whose newest initiation was
    /// stamped within [`FRESH_S`] of `unix_s` (the wall clock): an old
    /// initiation replayed after its key's record was evicted or lost with a
    /// restart is not evidence. Every key keeps its newest timestamp
    /// against replays until a new key needs its room.
    pub fn take(&mut self, unix_s: u64) -> Vec<([u8; 32], u64)> {
        let fresh = |ts: &[u8; 12]| unix_s.abs_diff(tai64_unix_s(ts)) <= FRESH_S;
        let out: Vec<([u8; 32], u64)> = self
            .keys
            .iter()
            .filter(|(_, seen)| seen.count > 0 && fresh(&seen.last))
            // Timestamps only grow: with the first fresh too, every one in
            // between is; otherwise only the newest is counted.
            .map(|(k, seen)| (*k, if fresh(&seen.first) { seen.count } else { 1 }))
            .collect();
        for seen in self.keys.values_mut() {
            seen.count = 0;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use boringtun::noise::Tunn;
    use rand_core::OsRng;

    use super::*;

    fn keypair() -> (x25519::StaticSecret, x25519::PublicKey) {
        let s = x25519::StaticSecret::random_from_rng(OsRng);
        let p = x25519::PublicKey::from(&s);
        (s, p)
    }

    /// A real initiation from boringtun, from `from` to `to`.
    fn initiation(from: &x25519::StaticSecret, to: &x25519::PublicKey) -> Vec<u8> {
        let mut t = Tunn::new(from.clone(), *to, None, None, 1, None);
        let mut out = vec![0u8; 256];
        match t.format_handshake_initiation(&mut out, false) {
            boringtun::noise::TunnResult::WriteToNetwork(p) => p.to_vec(),
            _ => panic!("no initiation"),
        }
    }

    #[test]
    fn a_real_initiation_verifies_to_its_sender() {
        let (alice, alice_pub) = keypair();
        let (bob, bob_pub) = keypair();
        let msg = initiation(&alice, &bob_pub);
        let (key, ts) = verify(&bob, &bob_pub, &msg).expect("verifies");
        assert_eq!(key, *alice_pub.as_bytes());
        assert_ne!(ts, [0; 12]);
        // Only at its recipient.
        let (carol, carol_pub) = keypair();
        assert!(verify(&carol, &carol_pub, &msg).is_none());
    }

    #[test]
    fn a_forged_static_key_or_a_flipped_bit_does_not_verify() {
        let (mallory, _) = keypair();
        let (_, victim_pub) = keypair();
        let (bob, bob_pub) = keypair();
        // Mallory seals the victim's public key as the static, then the
        // timestamp under DH(bob, victim), which she cannot compute: she
        // uses her own key instead.
        let mut msg = initiation(&mallory, &bob_pub);
        let chain = hash(&[CONSTRUCTION]);
        let h = hash(&[&hash(&[&chain, IDENTIFIER]), bob_pub.as_bytes()]);
        let eph: [u8; 32] = msg[EPHEMERAL].try_into().unwrap();
        let h = hash(&[&h, &eph]);
        let chain = hmac(&hmac(&chain, &[&eph]), &[&[1]]);
        let es = bob.diffie_hellman(&x25519::PublicKey::from(eph));
        let (_, key) = kdf2(&chain, es.as_bytes());
        // (Mallory knows `key`: it needs only her ephemeral and bob's public key.)
        let sealer = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &key).unwrap());
        let mut sealed = victim_pub.as_bytes().to_vec();
        sealer
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key([0; 12]),
                Aad::from(&h),
                &mut sealed,
            )
            .unwrap();
        msg[STATIC].copy_from_slice(&sealed);
        // The static decrypts to the victim (what parse_handshake_anon
        // would believe)…
        let anon = boringtun::noise::handshake::parse_handshake_anon(
            &bob,
            &bob_pub,
            &match Tunn::parse_incoming_packet(&msg).unwrap() {
                boringtun::noise::Packet::HandshakeInit(i) => i,
                _ => unreachable!(),
            },
        )
        .unwrap();
        assert_eq!(anon.peer_static_public, *victim_pub.as_bytes());
        // …but the timestamp does not open.
        assert!(verify(&bob, &bob_pub, &msg).is_none());
        let (alice, _) = keypair();
        let mut good = initiation(&alice, &bob_pub);
        good[100] ^= 1;
        assert!(verify(&bob, &bob_pub, &good).is_none());
        assert!(verify(&bob, &bob_pub, &good[..100]).is_none());
    }

    /// A TAI64N label for Unix second `s`, nanoseconds `n`.
    fn at(s: u64, n: u32) -> [u8; 12] {
        let mut ts = [0; 12];
        ts[..8].copy_from_slice(&((1u64 << 62) + s).to_be_bytes());
        ts[8..].copy_from_slice(&n.to_be_bytes());
        ts
    }

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn replays_count_once_and_keys_are_bounded() {
        let mut u = Unknown::default();
        u.record([1; 32], at(NOW, 1));
        u.record([1; 32], at(NOW, 1));
        u.record([1; 32], at(NOW, 2));
        assert_eq!(u.take(NOW), vec![([1; 32], 2)]);
        // The newest timestamp outlives takes: the same replay is nothing.
        for _ in 0..3 {
            u.record([1; 32], at(NOW, 2));
            assert!(u.take(NOW).is_empty());
        }
        // A new key takes a quiet key's room; busy keys are never evicted.
        for k in 0..(MAX_UNKNOWN_KEYS as u8 + 5) {
            u.record([k + 10; 32], at(NOW, 0));
        }
        assert_eq!(u.overflow, 5, "the quiet key made room for one");
        assert_eq!(u.take(NOW).len(), MAX_UNKNOWN_KEYS);
    }

    #[test]
    fn stale_initiations_are_no_evidence() {
        let mut u = Unknown::default();
        // Replayed an hour later, after the key's record was lost.
        u.record([1; 32], at(NOW - 3_600, 0));
        u.record([2; 32], at(NOW - 100, 0));
        u.record([3; 32], at(NOW + 100, 0));
        let mut got = u.take(NOW);
        got.sort();
        assert_eq!(got, vec![([2; 32], 1), ([3; 32], 1)]);
        // After a restart: old captures replayed, then one fresh initiation:
        // the old ones do not count.
        let mut u = Unknown::default();
        for s in 0..5 {
            u.record([4; 32], at(NOW - 3_600 + s, 0));
        }
        u.record([4; 32], at(NOW, 0));
        assert_eq!(u.take(NOW), vec![([4; 32], 1)]);
        assert_eq!(tai64_unix_s(&at(NOW, 7)), NOW);
    }
}
