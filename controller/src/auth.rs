//! Who is calling: enrollment requests and node proofs checked, node calls
//! charged to their limits, accepted proofs remembered against replay.
//!
//! Pure in time: every check takes `now`; the locks here guard only the
//! replay cache and the per-node limits, never the mesh state. Looking up a
//! machine key is the caller's (a closure), so this module knows nothing of
//! where nodes live.

use std::sync::{Mutex, MutexGuard, RwLock};

use ztmesh_proto::auth::{self, ct_eq, AuthError, NodeProof, ReplayGuard};
use ztmesh_proto::control as pb;
use ztmesh_proto::keys::{PublicKey, WgPublicKey};
use ztmesh_proto::refusal::AuthReason;

use crate::error::{Error, Result};
use crate::model::NodeRow;
use crate::netcore::is_active;
use crate::nodeinput::{is_low_order_x25519, is_weak_ed25519};
use crate::nodelimit::{Call, NodeLimiter};
use crate::secrets::{Presented, SecretKind};
use crate::UnixMs;

/// An enrollment request whose form and proof check out; the auth key in
/// it is still to be checked against the stored keys (and consumed).
#[derive(Debug)]
pub struct EnrollClaim {
    /// The auth key, well-formed and issued by this controller.
    pub key: Presented,
    pub machine_key: PublicKey,
    pub wg_key: WgPublicKey,
    /// The hostname with control characters removed.
    pub hostname: String,
}

/// The refusal message for a proof stamped `ts` when the controller's clock
/// reads `now`: how far apart the clocks are, in whole seconds.
fn skew_message(ts: UnixMs, now: UnixMs) -> String {
    let secs = ts.saturating_sub(now) / 1000;
    let (dir, secs) = if secs >= 0 {
        ("ahead of", secs)
    } else {
        ("behind", secs.saturating_neg())
    };
    format!(
        "proof timestamp is outside the accepted window: {secs} s {dir} the controller's clock (check the node's clock)"
    )
}

/// A joining node's keys, usable (not weak, not low-order), and a sane
/// hostname: what enrollment and interactive login both require.
fn node_keys(
    machine_key: &[u8],
    wg_key: &[u8],
    hostname: &str,
) -> Result<(PublicKey, WgPublicKey)> {
    let machine_key = PublicKey::from_slice(machine_key)
        .map_err(|_| Error::Invalid("machine_key must be a 32-byte ed25519 key".into()))?;
    if is_weak_ed25519(machine_key.as_bytes()) {
        return Err(Error::Invalid(
            "machine_key is a weak (small-order) ed25519 key; generate a new machine key".into(),
        ));
    }
    let wg_key = WgPublicKey::from_slice(wg_key)
        .map_err(|_| Error::Invalid("wg_key must be a 32-byte x25519 key".into()))?;
    if is_low_order_x25519(wg_key.as_bytes()) {
        return Err(Error::Invalid(
            "wg_key is a low-order x25519 point (zero or small-subgroup); generate a new WireGuard key"
                .into(),
        ));
    }
    if hostname.is_empty() || hostname.len() > 253 {
        return Err(Error::Invalid(
            "hostname must be 1 to 253 characters".into(),
        ));
    }
    Ok((machine_key, wg_key))
}

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Checks callers on behalf of one controller (identified by the
/// fingerprints of the TLS certificates it holds, the current one first).
pub struct Authenticator {
    fingerprints: RwLock<Vec<[u8; 32]>>,
    /// Proofs accepted recently.
    replay: Mutex<ReplayGuard>,
    /// Per-node call limits.
    limits: Mutex<NodeLimiter>,
}

impl Authenticator {
    pub fn new(fingerprint: [u8; 32]) -> Self {
        Self {
            fingerprints: RwLock::new(vec![fingerprint]),
            replay: Mutex::new(ReplayGuard::default()),
            limits: Mutex::new(NodeLimiter::default()),
        }
    }

    /// The current certificate's fingerprint: new auth keys carry it.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprints.read().unwrap_or_else(|p| p.into_inner())[0]
    }

    /// Replaces the fingerprints auth keys are accepted for (a TLS
    /// certificate rotation): `current` first, then the others held.
    pub fn set_fingerprints(&self, current: [u8; 32], others: &[[u8; 32]]) {
        let mut all = vec![current];
        all.extend(others.iter().filter(|f| **f != current));
        *self.fingerprints.write().unwrap_or_else(|p| p.into_inner()) = all;
    }

    /// Whether an auth key carrying `fp` was issued by this controller
    /// under a certificate it still holds.
    fn holds(&self, fp: &[u8; 32]) -> bool {
        self.fingerprints
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .fold(false, |found, f| ct_eq(f, fp) | found)
    }

    /// Charges one `call` to an authenticated `node`.
    ///
    /// # Errors
    /// [`Error::Throttled`] naming the call, the limit and when to retry.
    pub fn throttle(&self, node: u64, call: Call, now: UnixMs) -> Result<()> {
        relock(&self.limits)
            .check(node, call, now)
            .map_err(Error::Throttled)
    }

    /// Forgets the per-node limits that have refilled.
    pub fn prune(&self, now: UnixMs) {
        relock(&self.limits).prune(now);
    }

    /// Proofs currently remembered by the replay cache.
    pub fn replay_cache_len(&self) -> usize {
        relock(&self.replay).len()
    }

    /// Checks everything in an enrollment request that needs no stored
    /// state: the auth key is well-formed and issued by this controller, the
    /// keys are usable, the hostname sane, and the proof fresh and signed by
    /// the machine key.
    ///
    /// # Errors
    /// `Unauthenticated` for a bad key or proof, `Invalid` for malformed
    /// fields, `NodeAuth(clock-skew)` for a stale proof.
    pub fn check_enroll(&self, req: &pb::EnrollRequest, now: UnixMs) -> Result<EnrollClaim> {
        let kind = SecretKind::AuthKey;
        let key = Presented::parse(kind, &req.auth_key)
            .map_err(|r| Error::Unauthenticated(r.message(kind)))?;
        if !key.fingerprint().is_some_and(|fp| self.holds(&fp)) {
            return Err(Error::Unauthenticated(
                "auth key was issued by a different controller".into(),
            ));
        }
        let (machine_key, wg_key) = node_keys(&req.machine_key, &req.wg_key, &req.hostname)?;
        if !auth::within_window(req.timestamp_ms, now) {
            return Err(Error::NodeAuth {
                reason: AuthReason::ClockSkew,
                message: format!(
                    "enrollment proof is stale: {}",
                    skew_message(req.timestamp_ms, now)
                ),
                server_time_ms: Some(now),
            });
        }
        let msg = auth::enroll_message(
            &req.auth_key,
            &req.machine_key,
            &req.wg_key,
            &req.hostname,
            req.timestamp_ms,
        );
        if !machine_key.verify(&msg, &req.proof) {
            return Err(Error::Unauthenticated(
                "enrollment proof does not verify with the machine key".into(),
            ));
        }
        Ok(EnrollClaim {
            key,
            machine_key,
            wg_key,
            hostname: req.hostname.chars().filter(|c| !c.is_control()).collect(),
        })
    }

    /// Checks an interactive login request (no secret in it): usable keys,
    /// sane hostname and OS, and a fresh proof signed by the machine key.
    ///
    /// # Errors
    /// `Invalid` for malformed fields, `NodeAuth(clock-skew)` for a stale
    /// proof, `Unauthenticated` for a proof that does not verify.
    pub fn check_login(
        &self,
        req: &pb::LoginRequest,
        now: UnixMs,
    ) -> Result<(crate::model::DeviceClaim, String)> {
        let (machine_key, wg_key) = node_keys(&req.machine_key, &req.wg_key, &req.hostname)?;
        if req.os.len() > 256 {
            return Err(Error::Invalid("os must be at most 256 bytes".into()));
        }
        if !auth::within_window(req.timestamp_ms, now) {
            return Err(Error::NodeAuth {
                reason: AuthReason::ClockSkew,
                message: format!(
                    "login proof is stale: {}",
                    skew_message(req.timestamp_ms, now)
                ),
                server_time_ms: Some(now),
            });
        }
        let msg = auth::login_message(
            &req.machine_key,
            &req.wg_key,
            &req.hostname,
            &req.os,
            req.timestamp_ms,
        );
        if !machine_key.verify(&msg, &req.proof) {
            return Err(Error::Unauthenticated(
                "login proof does not verify with the machine key".into(),
            ));
        }
        let printable = |s: &str| -> String {
            s.chars()
                .filter(|c| !c.is_control() && !crate::nodeinput::is_deceptive(*c))
                .collect()
        };
        Ok((
            crate::model::DeviceClaim {
                machine_key: *machine_key.as_bytes(),
                wg_key: *wg_key.as_bytes(),
                hostname: printable(&req.hostname),
            },
            printable(&req.os),
        ))
    }

    /// Verifies the node proof in `metadata` for `method`; `lookup` finds the
    /// node enrolled with a machine key.
    ///
    /// When `source_limited`, a proof that does not name an enrolled machine
    /// key is refused with [`Error::RateLimited`] before any signature work,
    /// while a node whose proof verifies is still served: one bad client
    /// behind a shared address cannot lock the good nodes out.
    ///
    /// Order of checks: the key must be enrolled, the proof fresh and its
    /// signature valid, the node active; only then is the proof recorded in
    /// the replay cache, so strangers and forgers cannot fill it.
    ///
    /// # Errors
    /// [`Error::NodeAuth`] with the reason: `bad-proof` (missing, malformed,
    /// signature), `revoked` (unknown machine key, expired node),
    /// `clock-skew` (timestamp outside the window), `replayed`; and
    /// [`Error::RateLimited`].
    pub fn verify_node(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        method: &str,
        now: UnixMs,
        source_limited: bool,
        lookup: impl FnOnce(&[u8; 32]) -> Option<NodeRow>,
    ) -> Result<NodeRow> {
        let refuse = |reason, message: &str| {
            if source_limited {
                Error::RateLimited
            } else {
                Error::node_auth(reason, message)
            }
        };
        let text = metadata
            .get(auth::PROOF_HEADER)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| refuse(AuthReason::BadProof, "missing node proof"))?;
        let proof: NodeProof = text
            .parse()
            .map_err(|e: AuthError| refuse(AuthReason::BadProof, &e.to_string()))?;
        let node = lookup(proof.machine_key.as_bytes())
            .ok_or_else(|| refuse(AuthReason::Revoked, "unknown machine key (node deleted?)"))?;
        proof.verify(method, now).map_err(|e| match e {
            AuthError::Stale => Error::NodeAuth {
                reason: AuthReason::ClockSkew,
                message: skew_message(proof.timestamp_ms, now),
                server_time_ms: Some(now),
            },
            other => Error::node_auth(AuthReason::BadProof, other.to_string()),
        })?;
        if !is_active(&node, now) {
            return Err(Error::node_auth(
                AuthReason::Expired,
                "node key has expired: run `ztmesh up` to sign in again",
            ));
        }
        relock(&self.replay)
            .check_and_record(&proof, now)
            .map_err(|e| Error::node_auth(AuthReason::Replayed, e.to_string()))?;
        Ok(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skew_is_reported_in_whole_seconds_both_ways() {
        assert!(skew_message(61_000, 0).contains("61 s ahead of"));
        assert!(skew_message(0, 61_000).contains("61 s behind"));
        // Extreme stamps do not overflow.
        assert!(skew_message(i64::MIN, i64::MAX).contains("behind"));
    }
}
