//! One lifecycle for the controller's two kinds of secret — auth keys
//! (enroll a node) and API keys (call the admin API): issue, verify, and the
//! record kept at rest. Pure: no store, no clock, no RNG of its own; `now`
//! and the RNG are arguments.
//!
//! Both kinds are a [`KeyToken`] (`PREFIX.KEYID.SECRET`; auth keys add the
//! controller's fingerprint), are kept only as SHA-256 of the secret,
//! compared in constant time, expire and can be revoked. They differ in
//! their [`KeyDetail`] and in one rule: a single-use auth key is used up by
//! the first node it enrolls (the store consumes it in the same transaction
//! that checks it).

use rand_core::CryptoRngCore;
use ztmesh_proto::auth::{self, KeyToken};

use crate::UnixMs;

/// Longest lifetime a secret may be given.
pub const MAX_TTL_MS: i64 = 10 * 365 * 24 * 3600 * 1000;
/// Lifetime of an API key created without an expiry.
pub const API_KEY_TTL_MS: i64 = 90 * 24 * 3600 * 1000;

/// Which kind of secret: decides the token prefix, the detail it carries and
/// what it opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SecretKind {
    /// Enrolls nodes (`ztmk1.…`).
    AuthKey,
    /// Authorizes remote admin calls (`ztma1.…`).
    ApiKey,
}

impl SecretKind {
    /// The token prefix ([`auth::AUTH_KEY_PREFIX`], [`auth::API_KEY_PREFIX`]).
    pub fn prefix(self) -> &'static str {
        match self {
            Self::AuthKey => auth::AUTH_KEY_PREFIX,
            Self::ApiKey => auth::API_KEY_PREFIX,
        }
    }

    /// The value of the store's `kind` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AuthKey => "auth",
            Self::ApiKey => "api",
        }
    }

    /// The inverse of [`SecretKind::as_str`].
    pub fn from_stored(s: &str) -> Option<Self> {
        match s {
            "auth" => Some(Self::AuthKey),
            "api" => Some(Self::ApiKey),
            _ => None,
        }
    }

    /// What messages call it: `auth key`, `API key`.
    pub fn noun(self) -> &'static str {
        match self {
            Self::AuthKey => "auth key",
            Self::ApiKey => "API key",
        }
    }

    /// What the audit log calls it, in actions (`authkey.create`) and
    /// actors (`apikey:KEYID`).
    pub fn audit_name(self) -> &'static str {
        match self {
            Self::AuthKey => "authkey",
            Self::ApiKey => "apikey",
        }
    }
}

/// What a secret grants, by kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyDetail {
    /// Nodes enrolled with the key are owned by `user`, or by `tags`.
    Auth {
        user: Option<String>,
        tags: Vec<String>,
        /// May enroll any number of nodes; otherwise exactly one.
        reusable: bool,
        /// Nodes are deleted after being offline for the ephemeral timeout.
        ephemeral: bool,
        /// Nodes enrolled so far.
        used_count: u64,
    },
    /// Admin access as far as `role` allows; the description says whose.
    Api {
        description: String,
        role: crate::roles::Role,
    },
}

impl KeyDetail {
    /// The detail of a new auth key: nothing enrolled yet.
    pub fn auth(user: Option<&str>, tags: &[String], reusable: bool, ephemeral: bool) -> Self {
        Self::Auth {
            user: user.map(str::to_string),
            tags: tags.to_vec(),
            reusable,
            ephemeral,
            used_count: 0,
        }
    }

    /// The detail of a new API key.
    pub fn api(description: &str, role: crate::roles::Role) -> Self {
        Self::Api {
            description: description.to_string(),
            role,
        }
    }

    pub fn kind(&self) -> SecretKind {
        match self {
            Self::Auth { .. } => SecretKind::AuthKey,
            Self::Api { .. } => SecretKind::ApiKey,
        }
    }
}

/// A secret as kept at rest: the hash of the secret, never the secret.
///
/// The kind is read from the detail ([`SecretRecord::kind`]), so a record
/// whose kind and detail disagree cannot be built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretRecord {
    /// Assigned by the store, counted per kind; 0 until stored.
    pub id: u64,
    /// The public handle (`keys list/revoke`), 12 hex characters.
    pub key_id: String,
    /// SHA-256 of the secret.
    pub secret_hash: [u8; 32],
    pub created_ms: UnixMs,
    pub expires_ms: UnixMs,
    pub revoked: bool,
    /// The admin who issued it (empty for API keys issued before this was kept).
    pub created_by: String,
    pub detail: KeyDetail,
}

impl SecretRecord {
    pub fn kind(&self) -> SecretKind {
        self.detail.kind()
    }
}

/// Why a presented secret was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not a token of the expected kind: wrong prefix, shape or encoding.
    #[error("malformed")]
    Malformed,
    /// No such key of this kind, or a wrong secret. One answer for both, so
    /// a caller cannot learn which key ids exist.
    #[error("unknown")]
    Unknown,
    /// An admin revoked it.
    #[error("revoked")]
    Revoked,
    /// Its lifetime is over.
    #[error("expired")]
    Expired,
    /// A single-use auth key that already enrolled a node.
    #[error("used up")]
    UsedUp,
}

impl Refusal {
    /// The message a caller of `kind` sees, e.g. `auth key has expired`.
    pub fn message(self, kind: SecretKind) -> String {
        let noun = kind.noun();
        match self {
            Self::Malformed => format!("malformed {noun}"),
            Self::Unknown => format!("unknown {noun}"),
            Self::Revoked => format!("{noun} was revoked"),
            Self::Expired => format!("{noun} has expired"),
            Self::UsedUp => format!("single-use {noun} was already used"),
        }
    }
}

/// A lifetime outside 1 ms ..= [`MAX_TTL_MS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("expiry must be between 1s and 10 years")]
pub struct BadLifetime;

/// A secret as a caller presented it: well-formed for its kind, not yet
/// checked against any record.
#[derive(Debug)]
pub struct Presented {
    kind: SecretKind,
    token: KeyToken,
}

impl Presented {
    /// Parses `text` as a token of `kind`.
    ///
    /// # Errors
    /// [`Refusal::Malformed`] for anything but a token of that kind (an auth
    /// key without a fingerprint, an API key with one, a wrong prefix).
    pub fn parse(kind: SecretKind, text: &str) -> Result<Self, Refusal> {
        let token = KeyToken::decode(kind.prefix(), text).map_err(|_| Refusal::Malformed)?;
        Ok(Self { kind, token })
    }

    pub fn kind(&self) -> SecretKind {
        self.kind
    }

    /// The public handle, to look the record up by.
    pub fn key_id(&self) -> &str {
        &self.token.key_id
    }

    /// The controller fingerprint an auth key carries.
    pub fn fingerprint(&self) -> Option<[u8; 32]> {
        self.token.fingerprint
    }
}

/// Issues a secret: returns the token, to be shown once, and the record to
/// keep, which holds only the secret's hash.
///
/// The kind follows from `detail`; `fingerprint` (of the controller's TLS
/// certificate) goes into auth keys only, so that a node needs nothing else
/// to pin the controller. The key expires `ttl_ms` after `now` (saturating).
///
/// # Errors
/// [`BadLifetime`] when `ttl_ms` is not within 1 ms ..= [`MAX_TTL_MS`].
pub fn issue(
    detail: KeyDetail,
    ttl_ms: i64,
    created_by: &str,
    fingerprint: [u8; 32],
    now: UnixMs,
    rng: &mut impl CryptoRngCore,
) -> Result<(String, SecretRecord), BadLifetime> {
    if !(1..=MAX_TTL_MS).contains(&ttl_ms) {
        return Err(BadLifetime);
    }
    let kind = detail.kind();
    let fingerprint = (kind == SecretKind::AuthKey).then_some(fingerprint);
    let token = KeyToken::generate(fingerprint, rng);
    let record = SecretRecord {
        id: 0,
        key_id: token.key_id.clone(),
        secret_hash: token.secret_hash(),
        created_ms: now,
        expires_ms: now.saturating_add(ttl_ms),
        revoked: false,
        created_by: created_by.to_string(),
        detail,
    };
    Ok((token.encode(kind.prefix()), record))
}

/// Checks a presented secret against the record stored under its key id
/// (`None`: there is none), as of `now`. The same rules for both kinds.
///
/// Order: the record must be of the presented kind, under the presented key
/// id, with the same secret (compared in constant time) — otherwise the key
/// is [`Refusal::Unknown`]; then it must not be revoked, expired or (a
/// single-use auth key) used.
///
/// # Errors
/// The first [`Refusal`] that applies.
pub fn verify(
    presented: &Presented,
    record: Option<&SecretRecord>,
    now: UnixMs,
) -> Result<(), Refusal> {
    let rec = record.ok_or(Refusal::Unknown)?;
    let same_secret = auth::ct_eq(&rec.secret_hash, &presented.token.secret_hash());
    if rec.kind() != presented.kind || rec.key_id != presented.token.key_id || !same_secret {
        return Err(Refusal::Unknown);
    }
    if rec.revoked {
        return Err(Refusal::Revoked);
    }
    if rec.expires_ms <= now {
        return Err(Refusal::Expired);
    }
    if let KeyDetail::Auth {
        reusable: false,
        used_count,
        ..
    } = rec.detail
    {
        if used_count > 0 {
            return Err(Refusal::UsedUp);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;

    const T0: UnixMs = 1_800_000_000_000;
    const FP: [u8; 32] = [7; 32];
    const HOUR: i64 = 3_600_000;

    fn auth_detail(reusable: bool) -> KeyDetail {
        KeyDetail::Auth {
            user: None,
            tags: vec!["tag:web".into()],
            reusable,
            ephemeral: false,
            used_count: 0,
        }
    }

    fn api_detail() -> KeyDetail {
        KeyDetail::Api {
            description: "ci".into(),
            role: crate::roles::Role::Admin,
        }
    }

    fn issued(detail: KeyDetail, rng: &mut StdRng) -> (String, SecretRecord) {
        issue(detail, HOUR, "admin", FP, T0, rng).unwrap()
    }

    fn check(kind: SecretKind, text: &str, rec: &SecretRecord, now: UnixMs) -> Result<(), Refusal> {
        verify(&Presented::parse(kind, text)?, Some(rec), now)
    }

    #[test]
    fn issued_secrets_verify_and_only_the_hash_is_kept() {
        let mut rng = StdRng::seed_from_u64(1);
        for (detail, kind) in [
            (auth_detail(false), SecretKind::AuthKey),
            (api_detail(), SecretKind::ApiKey),
        ] {
            let (text, rec) = issued(detail, &mut rng);
            assert_eq!(rec.kind(), kind);
            assert!(text.starts_with(kind.prefix()), "{text}");
            assert_eq!(rec.expires_ms, T0 + HOUR);
            assert_eq!(rec.created_by, "admin");
            let secret = text.split('.').nth(2).unwrap();
            assert!(
                !format!("{rec:?}").contains(secret),
                "the record holds no secret"
            );
            assert_eq!(check(kind, &text, &rec, T0), Ok(()));
            let p = Presented::parse(kind, &text).unwrap();
            assert_eq!(p.key_id(), rec.key_id);
        }
    }

    #[test]
    fn only_auth_keys_carry_the_fingerprint() {
        let mut rng = StdRng::seed_from_u64(2);
        let (auth_text, _) = issued(auth_detail(true), &mut rng);
        let (api_text, _) = issued(api_detail(), &mut rng);
        let p = Presented::parse(SecretKind::AuthKey, &auth_text).unwrap();
        assert_eq!(p.fingerprint(), Some(FP));
        let p = Presented::parse(SecretKind::ApiKey, &api_text).unwrap();
        assert_eq!(p.fingerprint(), None);
    }

    #[test]
    fn a_wrong_secret_with_the_right_id_is_unknown() {
        let mut rng = StdRng::seed_from_u64(3);
        for detail in [auth_detail(true), api_detail()] {
            let kind = detail.kind();
            let (text, rec) = issued(detail, &mut rng);
            let mut parts: Vec<String> = text.split('.').map(str::to_string).collect();
            // Flip the secret's first character, keep its length and id.
            let flipped = if parts[2].starts_with('A') { "B" } else { "A" };
            parts[2].replace_range(..1, flipped);
            let forged = parts.join(".");
            assert_eq!(check(kind, &forged, &rec, T0), Err(Refusal::Unknown));
            // The secret of another key under this key's id.
            let (other, _) = issued(rec.detail.clone(), &mut rng);
            let mut o: Vec<&str> = other.split('.').collect();
            o[1] = &rec.key_id;
            assert_eq!(check(kind, &o.join("."), &rec, T0), Err(Refusal::Unknown));
        }
    }

    #[test]
    fn a_record_under_another_key_id_is_unknown() {
        let mut rng = StdRng::seed_from_u64(4);
        let (text, mut rec) = issued(auth_detail(true), &mut rng);
        rec.key_id = "000000000000".into();
        assert_eq!(
            check(SecretKind::AuthKey, &text, &rec, T0),
            Err(Refusal::Unknown)
        );
        let p = Presented::parse(SecretKind::AuthKey, &text).unwrap();
        assert_eq!(verify(&p, None, T0), Err(Refusal::Unknown));
    }

    #[test]
    fn kinds_are_never_confused() {
        let mut rng = StdRng::seed_from_u64(5);
        let (auth_text, auth_rec) = issued(auth_detail(true), &mut rng);
        let (api_text, api_rec) = issued(api_detail(), &mut rng);
        // Each text as the other kind does not even parse.
        assert_eq!(
            Presented::parse(SecretKind::AuthKey, &api_text).unwrap_err(),
            Refusal::Malformed
        );
        assert_eq!(
            Presented::parse(SecretKind::ApiKey, &auth_text).unwrap_err(),
            Refusal::Malformed
        );
        // Rewrapped in the other kind's format, with the right id and
        // secret, it is checked against its own record and refused.
        let api_parts: Vec<&str> = api_text.split('.').collect();
        let as_auth = format!(
            "{}.{}.{}.{}",
            auth::AUTH_KEY_PREFIX,
            api_parts[1],
            api_parts[2],
            auth::hex(&FP)
        );
        assert_eq!(
            check(SecretKind::AuthKey, &as_auth, &api_rec, T0),
            Err(Refusal::Unknown)
        );
        let auth_parts: Vec<&str> = auth_text.split('.').collect();
        let as_api = format!(
            "{}.{}.{}",
            auth::API_KEY_PREFIX,
            auth_parts[1],
            auth_parts[2]
        );
        assert_eq!(
            check(SecretKind::ApiKey, &as_api, &auth_rec, T0),
            Err(Refusal::Unknown)
        );
        // Presented as its own kind, each still verifies.
        assert_eq!(
            check(SecretKind::AuthKey, &auth_text, &auth_rec, T0),
            Ok(())
        );
        assert_eq!(check(SecretKind::ApiKey, &api_text, &api_rec, T0), Ok(()));
    }

    #[test]
    fn expired_at_the_instant_of_expiry() {
        let mut rng = StdRng::seed_from_u64(6);
        for detail in [auth_detail(true), api_detail()] {
            let kind = detail.kind();
            let (text, rec) = issued(detail, &mut rng);
            assert_eq!(check(kind, &text, &rec, rec.expires_ms - 1), Ok(()));
            assert_eq!(
                check(kind, &text, &rec, rec.expires_ms),
                Err(Refusal::Expired)
            );
        }
    }

    #[test]
    fn revoked_is_refused_before_expired() {
        let mut rng = StdRng::seed_from_u64(7);
        for detail in [auth_detail(true), api_detail()] {
            let kind = detail.kind();
            let (text, mut rec) = issued(detail, &mut rng);
            rec.revoked = true;
            assert_eq!(check(kind, &text, &rec, T0), Err(Refusal::Revoked));
            assert_eq!(
                check(kind, &text, &rec, T0 + 2 * HOUR),
                Err(Refusal::Revoked)
            );
        }
    }

    #[test]
    fn single_use_auth_keys_are_used_up_reusable_ones_are_not() {
        let mut rng = StdRng::seed_from_u64(8);
        for reusable in [false, true] {
            let (text, mut rec) = issued(auth_detail(reusable), &mut rng);
            if let KeyDetail::Auth { used_count, .. } = &mut rec.detail {
                *used_count = 3;
            }
            let want = if reusable {
                Ok(())
            } else {
                Err(Refusal::UsedUp)
            };
            assert_eq!(check(SecretKind::AuthKey, &text, &rec, T0), want);
        }
    }

    #[test]
    fn lifetimes_outside_the_bounds_are_refused() {
        let mut rng = StdRng::seed_from_u64(9);
        for ttl in [0, -1, MAX_TTL_MS + 1, i64::MIN] {
            assert_eq!(
                issue(api_detail(), ttl, "admin", FP, T0, &mut rng).unwrap_err(),
                BadLifetime
            );
        }
        let (_, rec) = issue(api_detail(), MAX_TTL_MS, "a", FP, i64::MAX - 5, &mut rng).unwrap();
        assert_eq!(rec.expires_ms, i64::MAX, "saturates");
    }

    #[test]
    fn malformed_text_is_refused_as_malformed() {
        for kind in [SecretKind::AuthKey, SecretKind::ApiKey] {
            for bad in ["", "ztmk1.garbage", "ztma1.garbage", &"x".repeat(500)] {
                assert_eq!(
                    Presented::parse(kind, bad).unwrap_err(),
                    Refusal::Malformed,
                    "{bad}"
                );
            }
        }
    }

    #[test]
    fn refusal_messages_name_the_kind() {
        assert_eq!(
            Refusal::UsedUp.message(SecretKind::AuthKey),
            "single-use auth key was already used"
        );
        assert_eq!(
            Refusal::Expired.message(SecretKind::ApiKey),
            "API key has expired"
        );
        for k in [SecretKind::AuthKey, SecretKind::ApiKey] {
            assert_eq!(SecretKind::from_stored(k.as_str()), Some(k));
        }
        assert_eq!(SecretKind::from_stored("other"), None);
    }
}
