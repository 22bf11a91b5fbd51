//! Node session proofs and the auth-key / API-key formats. Pure: time is an argument.
//!
//! **Node proof.** Every node-authenticated call carries the metadata entry
//! [`PROOF_HEADER`] = `MACHINEKEY.TS_MS.NONCE.SIG` (base64url pieces, `TS_MS`
//! decimal), where `SIG` is the machine key's ed25519 signature over
//! `"ztmesh-node-proof-v1\0" || METHOD || "\0" || TS_MS || "\0" || NONCE`.
//! The controller accepts a proof only within [`PROOF_WINDOW_MS`] of its clock
//! and only once ([`ReplayGuard`]), and takes the node's identity from the key.
//!
//! **Auth key** (printed by `keys create`, shown once):
//! `ztmk1.KEYID.SECRET.FINGERPRINT` where KEYID is 12 lowercase hex characters
//! (the public handle used by `keys list/revoke`), SECRET is 32 random bytes in
//! base64url, and FINGERPRINT is the SHA-256 of the controller's TLS certificate
//! in lowercase hex. A node needs nothing else to pin the controller.
//!
//! **API key**: `ztma1.KEYID.SECRET`, same pieces without the fingerprint.
//! Only SHA-256(SECRET) is stored; comparisons are constant-time.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use rand_core::CryptoRngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::keys::{PublicKey, SigningKey};
use crate::UnixMs;

/// Metadata key carrying a node proof.
pub const PROOF_HEADER: &str = "x-ztmesh-proof";
/// How far a proof's timestamp may be from the controller's clock.
pub const PROOF_WINDOW_MS: i64 = 60_000;
const PROOF_DOMAIN: &[u8] = b"ztmesh-node-proof-v1\0";
const ENROLL_DOMAIN: &[u8] = b"ztmesh-enroll-v1\0";
const LOGIN_DOMAIN: &[u8] = b"ztmesh-login-v1\0";

/// Whether a timestamp `ts` is within [`PROOF_WINDOW_MS`] of `now_ms`.
///
/// Total over all of `i64`: the timestamp comes from the network, so an
/// extreme value (`i64::MIN`, `i64::MAX`) is refused, never overflowed.
pub fn within_window(ts: UnixMs, now_ms: UnixMs) -> bool {
    ts.abs_diff(now_ms) <= PROOF_WINDOW_MS.unsigned_abs()
}

/// Why a proof or a key was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// The proof or key text is not in the documented format.
    #[error("malformed credential")]
    Malformed,
    /// The signature does not verify with the presented machine key.
    #[error("proof signature does not verify")]
    BadSignature,
    /// The timestamp is outside the accepted window (clock skew or an old proof).
    #[error("proof timestamp is outside the accepted window")]
    Stale,
    /// This exact proof was already used.
    #[error("proof was already used (replay)")]
    Replayed,
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Constant-time equality of two digests.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// A proof of possession of a machine key, for one call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeProof {
    pub machine_key: PublicKey,
    pub timestamp_ms: UnixMs,
    pub nonce: [u8; 16],
    pub signature: [u8; 64],
}

fn proof_message(method: &str, ts: UnixMs, nonce: &[u8; 16]) -> Vec<u8> {
    let mut m = Vec::with_capacity(PROOF_DOMAIN.len() + method.len() + 48);
    m.extend_from_slice(PROOF_DOMAIN);
    m.extend_from_slice(method.as_bytes());
    m.push(0);
    m.extend_from_slice(ts.to_string().as_bytes());
    m.push(0);
    m.extend_from_slice(nonce);
    m
}

impl NodeProof {
    /// Makes a proof for a call to `method` (the gRPC path, e.g.
    /// `/ztmesh.control.v1.Control/StreamNetMap`).
    pub fn create(
        key: &SigningKey,
        method: &str,
        now_ms: UnixMs,
        rng: &mut impl CryptoRngCore,
    ) -> Self {
        let mut nonce = [0u8; 16];
        rng.fill_bytes(&mut nonce);
        let signature = key.sign(&proof_message(method, now_ms, &nonce));
        Self {
            machine_key: key.public(),
            timestamp_ms: now_ms,
            nonce,
            signature,
        }
    }

    /// Checks signature and freshness; the caller must also pass the proof
    /// through a [`ReplayGuard`].
    ///
    /// # Errors
    /// [`AuthError::Stale`] or [`AuthError::BadSignature`].
    pub fn verify(&self, method: &str, now_ms: UnixMs) -> Result<(), AuthError> {
        if !within_window(self.timestamp_ms, now_ms) {
            return Err(AuthError::Stale);
        }
        let msg = proof_message(method, self.timestamp_ms, &self.nonce);
        if !self.machine_key.verify(&msg, &self.signature) {
            return Err(AuthError::BadSignature);
        }
        Ok(())
    }
}

impl fmt::Display for NodeProof {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}.{}.{}",
            B64URL.encode(self.machine_key.as_bytes()),
            self.timestamp_ms,
            B64URL.encode(self.nonce),
            B64URL.encode(self.signature)
        )
    }
}

impl FromStr for NodeProof {
    type Err = AuthError;
    fn from_str(s: &str) -> Result<Self, AuthError> {
        if s.len() > 256 {
            return Err(AuthError::Malformed);
        }
        let mut it = s.split('.');
        let (Some(k), Some(ts), Some(n), Some(sig), None) =
            (it.next(), it.next(), it.next(), it.next(), it.next())
        else {
            return Err(AuthError::Malformed);
        };
        let k = B64URL.decode(k).map_err(|_| AuthError::Malformed)?;
        let machine_key = PublicKey::from_slice(&k).map_err(|_| AuthError::Malformed)?;
        let timestamp_ms = ts.parse().map_err(|_| AuthError::Malformed)?;
        let nonce = B64URL
            .decode(n)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or(AuthError::Malformed)?;
        let signature = B64URL
            .decode(sig)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or(AuthError::Malformed)?;
        Ok(Self {
            machine_key,
            timestamp_ms,
            nonce,
            signature,
        })
    }
}

/// Remembers proofs seen within the freshness window so each is accepted once.
///
/// Bounded: entries older than the window are pruned, so memory is proportional
/// to the call rate over two windows.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    seen: HashMap<[u8; 16], UnixMs>,
    by_time: BTreeMap<(UnixMs, [u8; 16]), ()>,
}

impl ReplayGuard {
    /// Records `proof`; refuses it if this nonce was seen before.
    ///
    /// # Errors
    /// [`AuthError::Replayed`].
    pub fn check_and_record(&mut self, proof: &NodeProof, now_ms: UnixMs) -> Result<(), AuthError> {
        let horizon = now_ms.saturating_sub(2 * PROOF_WINDOW_MS);
        while let Some((&(t, n), _)) = self.by_time.first_key_value() {
            if t >= horizon {
                break;
            }
            self.by_time.remove(&(t, n));
            self.seen.remove(&n);
        }
        if self.seen.contains_key(&proof.nonce) {
            return Err(AuthError::Replayed);
        }
        self.seen.insert(proof.nonce, proof.timestamp_ms);
        self.by_time.insert((proof.timestamp_ms, proof.nonce), ());
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// The message a node signs when it enrolls.
pub fn enroll_message(
    auth_key: &str,
    machine_key: &[u8],
    wg_key: &[u8],
    hostname: &str,
    ts: UnixMs,
) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(ENROLL_DOMAIN);
    m.extend_from_slice(&sha256(auth_key.as_bytes()));
    m.extend_from_slice(machine_key);
    m.extend_from_slice(wg_key);
    m.extend_from_slice(hostname.as_bytes());
    m.push(0);
    m.extend_from_slice(ts.to_string().as_bytes());
    m
}

/// The bytes a node signs to start an interactive login
/// (`Control.Login`): a domain separator, its keys, hostname, OS and the
/// timestamp. No secret is involved; the proof shows the caller holds the
/// machine key it asks to enroll (or re-authenticate).
pub fn login_message(
    machine_key: &[u8],
    wg_key: &[u8],
    hostname: &str,
    os: &str,
    ts: UnixMs,
) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(LOGIN_DOMAIN);
    m.extend_from_slice(machine_key);
    m.extend_from_slice(wg_key);
    m.extend_from_slice(hostname.as_bytes());
    m.push(0);
    m.extend_from_slice(os.as_bytes());
    m.push(0);
    m.extend_from_slice(ts.to_string().as_bytes());
    m
}

/// A secret credential: `PREFIX.KEYID.SECRET[.FINGERPRINT]`.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyToken {
    /// Public handle, 12 lowercase hex characters.
    pub key_id: String,
    pub secret: [u8; 32],
    /// SHA-256 of the controller's TLS certificate (auth keys only).
    pub fingerprint: Option<[u8; 32]>,
}

/// Auth keys start with this.
pub const AUTH_KEY_PREFIX: &str = "ztmk1";
/// API keys start with this.
pub const API_KEY_PREFIX: &str = "ztma1";

impl KeyToken {
    pub fn generate(fingerprint: Option<[u8; 32]>, rng: &mut impl CryptoRngCore) -> Self {
        let mut id = [0u8; 6];
        rng.fill_bytes(&mut id);
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        Self {
            key_id: hex(&id),
            secret,
            fingerprint,
        }
    }

    /// The value stored at rest: SHA-256 of the secret.
    pub fn secret_hash(&self) -> [u8; 32] {
        sha256(&self.secret)
    }

    /// Formats with the given prefix.
    pub fn encode(&self, prefix: &str) -> String {
        let mut s = format!("{prefix}.{}.{}", self.key_id, B64URL.encode(self.secret));
        if let Some(fp) = &self.fingerprint {
            s.push('.');
            s.push_str(&hex(fp));
        }
        s
    }

    /// Parses a token with `prefix`; auth keys must carry a fingerprint, API keys must not.
    ///
    /// # Errors
    /// [`AuthError::Malformed`] for anything else.
    pub fn decode(prefix: &str, s: &str) -> Result<Self, AuthError> {
        let s = s.trim();
        if s.len() > 200 {
            return Err(AuthError::Malformed);
        }
        let parts: Vec<&str> = s.split('.').collect();
        let want = if prefix == AUTH_KEY_PREFIX { 4 } else { 3 };
        if parts.len() != want || parts[0] != prefix {
            return Err(AuthError::Malformed);
        }
        let key_id = parts[1];
        if key_id.len() != 12
            || !key_id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(AuthError::Malformed);
        }
        let secret = B64URL
            .decode(parts[2])
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or(AuthError::Malformed)?;
        let fingerprint = match parts.get(3) {
            Some(fp) => Some(unhex32(fp).ok_or(AuthError::Malformed)?),
            None => None,
        };
        Ok(Self {
            key_id: key_id.to_string(),
            secret,
            fingerprint,
        })
    }
}

impl fmt::Debug for KeyToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyToken({}, <secret>)", self.key_id)
    }
}

/// Parses a fingerprint given as 64 hex characters (colons allowed).
pub fn parse_fingerprint(s: &str) -> Option<[u8; 32]> {
    let cleaned: String = s
        .trim()
        .trim_start_matches("sha256:")
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    unhex32(&cleaned)
}

/// gRPC method paths, as signed in node proofs.
pub mod methods {
    pub const ENROLL: &str = "/ztmesh.control.v1.Control/Enroll";
    pub const STREAM_NETMAP: &str = "/ztmesh.control.v1.Control/StreamNetMap";
    pub const REPORT_ENDPOINTS: &str = "/ztmesh.control.v1.Control/ReportEndpoints";
    pub const REPORT_FLOWS: &str = "/ztmesh.control.v1.Control/ReportFlows";
    pub const REPORT_POSTURE: &str = "/ztmesh.control.v1.Control/ReportPosture";
    pub const SET_ROUTES: &str = "/ztmesh.control.v1.Control/SetRoutes";
    pub const LOGOUT: &str = "/ztmesh.control.v1.Control/Logout";
    pub const NETMAP_APPLIED: &str = "/ztmesh.control.v1.Control/NetMapApplied";
}

/// Wraps `msg` in a request carrying a fresh proof for `method`.
pub fn signed_request<T>(
    key: &SigningKey,
    method: &str,
    msg: T,
    now_ms: UnixMs,
    rng: &mut impl CryptoRngCore,
) -> tonic::Request<T> {
    let proof = NodeProof::create(key, method, now_ms, rng).to_string();
    let mut req = tonic::Request::new(msg);
    if let Ok(v) = proof.parse() {
        req.metadata_mut().insert(PROOF_HEADER, v);
    }
    req
}

#[cfg(test)]
mod tests {
    use rand_core::OsRng;

    use super::*;

    const M: &str = "/ztmesh.control.v1.Control/StreamNetMap";

    #[test]
    fn accepts_a_fresh_proof_once() {
        let key = SigningKey::generate(&mut OsRng);
        let proof = NodeProof::create(&key, M, 1_000_000, &mut OsRng);
        let parsed: NodeProof = proof.to_string().parse().unwrap();
        assert_eq!(parsed, proof);
        parsed.verify(M, 1_000_500).unwrap();
        let mut guard = ReplayGuard::default();
        guard.check_and_record(&parsed, 1_000_500).unwrap();
        assert_eq!(
            guard.check_and_record(&parsed, 1_000_600),
            Err(AuthError::Replayed)
        );
    }

    #[test]
    fn rejects_stale_proofs_and_other_methods() {
        let key = SigningKey::generate(&mut OsRng);
        let proof = NodeProof::create(&key, M, 1_000_000, &mut OsRng);
        assert_eq!(
            proof.verify(M, 1_000_000 + PROOF_WINDOW_MS + 1),
            Err(AuthError::Stale)
        );
        assert_eq!(
            proof.verify("/ztmesh.control.v1.Control/Logout", 1_000_000),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn extreme_timestamps_are_refused_without_overflow() {
        let key = SigningKey::generate(&mut OsRng);
        for (ts, now) in [
            (i64::MIN, 1_000_000),
            (i64::MAX, 1_000_000),
            (i64::MIN, i64::MAX),
            (i64::MAX, i64::MIN),
            (i64::MIN + 1, -1),
        ] {
            let proof = NodeProof::create(&key, M, ts, &mut OsRng);
            let parsed: NodeProof = proof.to_string().parse().unwrap();
            assert_eq!(
                parsed.verify(M, now),
                Err(AuthError::Stale),
                "{ts} at {now}"
            );
            assert!(!within_window(ts, now), "{ts} at {now}");
        }
        assert!(within_window(i64::MAX, i64::MAX - PROOF_WINDOW_MS));
        assert!(within_window(i64::MIN, i64::MIN + PROOF_WINDOW_MS));
        assert!(!within_window(i64::MIN, i64::MIN + PROOF_WINDOW_MS + 1));
        // The replay guard's pruning horizon near the bottom of the range.
        let mut guard = ReplayGuard::default();
        let p = NodeProof::create(&key, M, i64::MIN, &mut OsRng);
        guard.check_and_record(&p, i64::MIN).unwrap();
        assert_eq!(
            guard.check_and_record(&p, i64::MIN + 1),
            Err(AuthError::Replayed)
        );
    }

    #[test]
    fn extreme_timestamps_are_stale_not_a_panic() {
        let key = SigningKey::generate(&mut OsRng);
        let proof = NodeProof::create(&key, M, i64::MIN, &mut OsRng);
        assert_eq!(proof.verify(M, i64::MAX), Err(AuthError::Stale));
        assert_eq!(proof.verify(M, i64::MIN), Ok(()));
        let mut guard = ReplayGuard::default();
        guard.check_and_record(&proof, i64::MIN).unwrap();
        assert_eq!(
            guard.check_and_record(&proof, i64::MIN),
            Err(AuthError::Replayed)
        );
        // Far in the future the entry is pruned; `verify` refuses it as stale.
        guard.check_and_record(&proof, i64::MAX).unwrap();
        assert_eq!(guard.len(), 1);
    }

    #[test]
    fn replay_guard_forgets_entries_older_than_two_windows() {
        let key = SigningKey::generate(&mut OsRng);
        let mut guard = ReplayGuard::default();
        for i in 0..100 {
            let p = NodeProof::create(&key, M, i * 1_000, &mut OsRng);
            guard.check_and_record(&p, i * 1_000).unwrap();
        }
        let p = NodeProof::create(&key, M, 1_000_000, &mut OsRng);
        guard.check_and_record(&p, 1_000_000).unwrap();
        assert_eq!(guard.len(), 1);
    }

    #[test]
    fn key_tokens_round_trip_and_reject_garbage() {
        let t = KeyToken::generate(Some([7; 32]), &mut OsRng);
        let s = t.encode(AUTH_KEY_PREFIX);
        assert_eq!(KeyToken::decode(AUTH_KEY_PREFIX, &s).unwrap(), t);
        assert!(KeyToken::decode(API_KEY_PREFIX, &s).is_err());
        for bad in [
            "",
            "ztmk1",
            "ztmk1.zz.aa.bb",
            "ztmk1.0123456789ab.@@.00",
            &s[..s.len() - 1],
        ] {
            assert!(KeyToken::decode(AUTH_KEY_PREFIX, bad).is_err(), "{bad}");
        }
        let a = KeyToken::generate(None, &mut OsRng);
        let s = a.encode(API_KEY_PREFIX);
        assert_eq!(KeyToken::decode(API_KEY_PREFIX, &s).unwrap(), a);
    }

    #[test]
    fn fingerprints_parse_with_or_without_colons() {
        let fp = [0xab; 32];
        let h = hex(&fp);
        assert_eq!(parse_fingerprint(&h), Some(fp));
        let colons: Vec<String> = fp.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(parse_fingerprint(&colons.join(":")), Some(fp));
        assert_eq!(parse_fingerprint("abc"), None);
    }
}
