//! Built-in accounts: argon2id passwords, TOTP second factors (RFC 6238),
//! one-time recovery codes, and the back-off that slows guessing. Pure: time
//! and randomness are arguments; nothing here touches the store.
//!
//! What is kept at rest: the argon2id PHC string of the password, the TOTP
//! secret (it must be usable to check codes, so it is not hashed; the
//! database is 0600 in a 0700 directory), the last TOTP time step used (a
//! code is accepted once), and SHA-256 hashes of the unused recovery codes
//! (80 random bits each, so a fast hash is enough).

use std::collections::HashMap;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha1::Sha1;
use subtle::ConstantTimeEq;
use ztmesh_proto::auth::{hex, sha256};

use crate::UnixMs;

/// Shortest password accepted.
pub const MIN_PASSWORD: usize = 12;
/// Longest password accepted (argon2 takes any length; this bounds the work
/// a request can ask for).
pub const MAX_PASSWORD: usize = 1024;
/// TOTP period, seconds.
pub const TOTP_PERIOD_S: i64 = 30;
/// Recovery codes issued at enrolment.
pub const RECOVERY_CODES: usize = 10;

/// Why a password is not accepted as a new password.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WeakPassword {
    #[error("the password must be at least {MIN_PASSWORD} characters")]
    TooShort,
    #[error("the password must be at most {MAX_PASSWORD} bytes")]
    TooLong,
    #[error("the password must not contain control characters")]
    Control,
}

/// Checks a new password's shape (length, no control characters).
///
/// # Errors
/// [`WeakPassword`].
pub fn check_new_password(pw: &str) -> Result<(), WeakPassword> {
    if pw.len() > MAX_PASSWORD {
        return Err(WeakPassword::TooLong);
    }
    if pw.chars().count() < MIN_PASSWORD {
        return Err(WeakPassword::TooShort);
    }
    if pw.chars().any(char::is_control) {
        return Err(WeakPassword::Control);
    }
    Ok(())
}

/// The argon2id PHC string of `pw` with a fresh salt (argon2's default
/// parameters: 19 MiB, 2 passes, 1 lane — OWASP's recommended minimum).
pub fn hash_password(pw: &str, rng: &mut impl RngCore) -> String {
    let mut salt = [0u8; 16];
    rng.fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).expect("16 bytes is a valid salt length");
    Argon2::default()
        .hash_password(pw.as_bytes(), &salt)
        .expect("argon2 with default parameters hashes any input up to MAX_PASSWORD")
        .to_string()
}

/// Whether `pw` matches the stored PHC string (argon2 compares in constant
/// time). A malformed stored string matches nothing.
pub fn verify_password(pw: &str, phc: &str) -> bool {
    if pw.len() > MAX_PASSWORD {
        return false;
    }
    PasswordHash::new(phc)
        .is_ok_and(|h| Argon2::default().verify_password(pw.as_bytes(), &h).is_ok())
}

/// A hash that takes as long as a real check, for logins that name no
/// account: timing does not tell which logins exist.
pub fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| {
        let mut salt = [0u8; 16];
        salt[0] = 1;
        let salt = SaltString::encode_b64(&salt).expect("valid salt length");
        Argon2::default()
            .hash_password(b"no account has this password", &salt)
            .expect("argon2 hashes a short input")
            .to_string()
    })
}

/// RFC 4648 base32 without padding (how authenticator apps take secrets).
pub fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let mut buf = 0u32;
    let mut bits = 0u32;
    for &b in bytes {
        buf = (buf << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((buf >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((buf << (5 - bits)) & 31) as usize]));
    }
    out
}

/// A new TOTP secret (160 bits, as RFC 4226 recommends).
pub fn new_totp_secret(rng: &mut impl RngCore) -> [u8; 20] {
    let mut s = [0u8; 20];
    rng.fill_bytes(&mut s);
    s
}

/// The `otpauth://` URI an authenticator app scans.
pub fn otpauth_uri(issuer: &str, login: &str, secret: &[u8]) -> String {
    let enc = |s: &str| -> String {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    char::from(b).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    };
    format!(
        "otpauth://totp/{}:{}?secret={}&issuer={}&algorithm=SHA1&digits=6&period={TOTP_PERIOD_S}",
        enc(issuer),
        enc(login),
        base32(secret),
        enc(issuer)
    )
}

/// The TOTP time step of `now`.
pub fn totp_step(now: UnixMs) -> i64 {
    now.div_euclid(1000).div_euclid(TOTP_PERIOD_S)
}

/// The 6-digit HOTP value (RFC 4226) of `secret` at `counter`.
pub fn hotp(secret: &[u8], counter: u64) -> u32 {
    let mut mac = Hmac::<Sha1>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(&counter.to_be_bytes());
    let h = mac.finalize().into_bytes();
    let off = usize::from(h[19] & 0x0f);
    let bin = (u32::from(h[off] & 0x7f) << 24)
        | (u32::from(h[off + 1]) << 16)
        | (u32::from(h[off + 2]) << 8)
        | u32::from(h[off + 3]);
    bin % 1_000_000
}

/// Checks a TOTP `code` at `now`, allowing one step of clock drift either
/// way, and only steps after `last_step` (each code is accepted once, and
/// an older one never after a newer). Returns the step that matched, which
/// the caller must record before accepting.
pub fn check_totp(secret: &[u8], code: &str, now: UnixMs, last_step: i64) -> Option<i64> {
    let code = code.trim();
    if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let step = totp_step(now);
    let mut found = None;
    for s in [step - 1, step, step + 1] {
        let Ok(counter) = u64::try_from(s) else {
            continue;
        };
        let want = format!("{:06}", hotp(secret, counter));
        // Every candidate is computed and compared, matched or not.
        if bool::from(want.as_bytes().ct_eq(code.as_bytes())) && s > last_step && found.is_none() {
            found = Some(s);
        }
    }
    found
}

/// New recovery codes (shown once) and their hashes (kept).
pub fn new_recovery_codes(rng: &mut impl RngCore) -> (Vec<String>, Vec<String>) {
    (0..RECOVERY_CODES)
        .map(|_| {
            let mut b = [0u8; 10];
            rng.fill_bytes(&mut b);
            let s = base32(&b).to_ascii_lowercase();
            let code = format!("{}-{}", &s[..8], &s[8..]);
            let hash = recovery_hash(&code);
            (code, hash)
        })
        .unzip()
}

fn recovery_hash(code: &str) -> String {
    let norm: String = code
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    hex(&sha256(norm.as_bytes()))
}

/// The index of the stored hash `code` matches (to remove it: each recovery
/// code works once), compared in constant time against every hash.
pub fn match_recovery_code(code: &str, hashes: &[String]) -> Option<usize> {
    if code.len() > 64 {
        return None;
    }
    let h = recovery_hash(code);
    let mut found = None;
    for (i, stored) in hashes.iter().enumerate() {
        if bool::from(stored.as_bytes().ct_eq(h.as_bytes())) && found.is_none() {
            found = Some(i);
        }
    }
    found
}

/// Exponential back-off on failed attempts, per key (an account, a source
/// address). The first `free` failures cost nothing; each one after doubles
/// the wait, up to `cap_ms`. The wait is a delay, never a lockout: once it
/// passes, the right credentials work, however many wrong ones came before.
/// Bounded in memory: entries idle for an hour are forgotten, and beyond
/// `max_entries` the stalest entry goes.
#[derive(Debug)]
pub struct Backoff {
    free: u32,
    base_ms: i64,
    cap_ms: i64,
    max_entries: usize,
    entries: HashMap<String, Entry>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    /// No attempt before this.
    not_before: UnixMs,
    last: UnixMs,
}

const FORGET_AFTER_MS: i64 = 3600 * 1000;

impl Backoff {
    pub fn new(free: u32, base_ms: i64, cap_ms: i64, max_entries: usize) -> Self {
        Self {
            free,
            base_ms,
            cap_ms,
            max_entries,
            entries: HashMap::new(),
        }
    }

    /// `Err(ms)` while `key` must wait that long before its next attempt.
    ///
    /// # Errors
    /// The milliseconds left to wait.
    pub fn check(&self, key: &str, now: UnixMs) -> Result<(), i64> {
        match self.entries.get(key) {
            Some(e) if e.not_before > now => Err(e.not_before - now),
            _ => Ok(()),
        }
    }

    /// Records a failed attempt; returns the wait it now imposes (0 while
    /// the free attempts last).
    pub fn fail(&mut self, key: &str, now: UnixMs) -> i64 {
        self.entries
            .retain(|_, e| now.saturating_sub(e.last) < FORGET_AFTER_MS);
        if self.entries.len() >= self.max_entries && !self.entries.contains_key(key) {
            if let Some(k) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last)
                .map(|(k, _)| k.clone())
            {
                self.entries.remove(&k);
            }
        }
        let e = self.entries.entry(key.to_string()).or_insert(Entry {
            failures: 0,
            not_before: now,
            last: now,
        });
        e.failures = e.failures.saturating_add(1);
        e.last = now;
        let over = e.failures.saturating_sub(self.free);
        let wait = if over == 0 {
            0
        } else {
            self.base_ms
                .saturating_mul(1i64 << over.saturating_sub(1).min(30))
                .min(self.cap_ms)
        };
        e.not_before = now.saturating_add(wait);
        wait
    }

    /// A success clears the key's failures.
    pub fn succeed(&mut self, key: &str) {
        self.entries.remove(key);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(7)
    }

    #[test]
    fn rfc6238_sha1_vectors() {
        // RFC 6238 appendix B: the 20-byte ASCII secret, 8 digits there; the
        // low 6 digits are the 6-digit codes.
        let secret = b"12345678901234567890";
        for (t, want8) in [
            (59i64, 94_287_082u32),
            (1_111_111_109, 7_081_804),
            (1_111_111_111, 14_050_471),
            (1_234_567_890, 89_005_924),
            (2_000_000_000, 69_279_037),
            (20_000_000_000, 65_353_130),
        ] {
            let step = totp_step(t * 1000) as u64;
            assert_eq!(hotp(secret, step), want8 % 1_000_000, "t={t}");
        }
    }

    #[test]
    fn a_code_is_accepted_once_and_never_an_older_one() {
        let secret = b"12345678901234567890";
        let now = 1_111_111_109_000;
        let step = totp_step(now);
        let code = format!("{:06}", hotp(secret, step as u64));
        assert_eq!(check_totp(secret, &code, now, 0), Some(step));
        // Recorded: the same code again is refused.
        assert_eq!(check_totp(secret, &code, now, step), None);
        // The previous step's code after the current one was used: refused.
        let prev = format!("{:06}", hotp(secret, (step - 1) as u64));
        assert_eq!(check_totp(secret, &prev, now, step), None);
        // One step of drift either way is fine; two is not.
        let next = format!("{:06}", hotp(secret, (step + 1) as u64));
        assert_eq!(check_totp(secret, &next, now, 0), Some(step + 1));
        let far = format!("{:06}", hotp(secret, (step + 2) as u64));
        assert_eq!(check_totp(secret, &far, now, 0), None);
    }

    #[test]
    fn malformed_codes_are_refused_without_panicking() {
        let secret = b"12345678901234567890";
        for bad in [
            "",
            "12345",
            "1234567",
            "12345a",
            "١٢٣٤٥٦",
            "123 456",
            &"9".repeat(10_000),
        ] {
            assert_eq!(check_totp(secret, bad, 59_000, 0), None, "{bad:?}");
        }
        assert_eq!(check_totp(secret, "287082", -5_000_000, 0), None);
    }

    #[test]
    fn base32_matches_rfc4648() {
        for (input, want) in [
            ("", ""),
            ("f", "MY"),
            ("fo", "MZXQ"),
            ("foo", "MZXW6"),
            ("foob", "MZXW6YQ"),
            ("fooba", "MZXW6YTB"),
            ("foobar", "MZXW6YTBOI"),
        ] {
            assert_eq!(base32(input.as_bytes()), want);
        }
    }

    #[test]
    fn otpauth_uri_escapes_the_login() {
        let uri = otpauth_uri("ztmesh", "a+b@example.com", b"12345678901234567890");
        assert!(uri.starts_with("otpauth://totp/ztmesh:a%2Bb%40example.com?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ&issuer=ztmesh"), "{uri}");
    }

    #[test]
    fn passwords_hash_with_argon2id_and_verify() {
        let mut rng = rng();
        let h = hash_password("correct horse battery", &mut rng);
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify_password("correct horse battery", &h));
        assert!(!verify_password("correct horse batterx", &h));
        assert!(!verify_password("correct horse battery", "not a hash"));
        assert!(!verify_password(&"x".repeat(MAX_PASSWORD + 1), &h));
        // Two hashes of one password differ (salted).
        assert_ne!(h, hash_password("correct horse battery", &mut rng));
        // The dummy hash parses, so the no-such-account path costs the same.
        assert!(PasswordHash::new(dummy_hash()).is_ok());
        assert!(!verify_password("anything at all", dummy_hash()));
    }

    #[test]
    fn new_passwords_are_checked() {
        assert_eq!(check_new_password("short"), Err(WeakPassword::TooShort));
        assert_eq!(
            check_new_password("long enough\u{7}x"),
            Err(WeakPassword::Control)
        );
        assert_eq!(
            check_new_password(&"x".repeat(2000)),
            Err(WeakPassword::TooLong)
        );
        assert_eq!(check_new_password("twelve chars"), Ok(()));
    }

    #[test]
    fn recovery_codes_work_once_each_and_are_stored_hashed() {
        let (codes, hashes) = new_recovery_codes(&mut rng());
        assert_eq!(codes.len(), RECOVERY_CODES);
        for (c, h) in codes.iter().zip(&hashes) {
            assert!(!h.contains(c.as_str()));
            assert_eq!(c.len(), 17, "{c}");
        }
        let i = match_recovery_code(&codes[3].to_uppercase(), &hashes).unwrap();
        assert_eq!(i, 3);
        let mut left = hashes.clone();
        left.remove(i);
        assert_eq!(match_recovery_code(&codes[3], &left), None);
        assert_eq!(match_recovery_code("", &left), None);
        assert_eq!(match_recovery_code(&"a".repeat(100), &left), None);
    }

    #[test]
    fn backoff_doubles_after_the_free_attempts_caps_and_never_locks_out() {
        let mut b = Backoff::new(3, 1000, 30_000, 100);
        let mut now = 0;
        let waits: Vec<i64> = (0..10)
            .map(|_| {
                let w = b.fail("alice", now);
                now += w;
                w
            })
            .collect();
        assert_eq!(
            waits,
            [0, 0, 0, 1000, 2000, 4000, 8000, 16_000, 30_000, 30_000]
        );
        assert_eq!(b.check("alice", now - 1), Err(1));
        assert_eq!(b.check("alice", now), Ok(()), "the wait passes");
        assert_eq!(b.check("bob", 0), Ok(()), "other keys are not slowed");
        b.succeed("alice");
        assert_eq!(b.fail("alice", now), 0, "a success resets");
    }

    #[test]
    fn backoff_memory_is_bounded() {
        let mut b = Backoff::new(0, 1000, 30_000, 50);
        for i in 0..1000 {
            b.fail(&format!("src{i}"), i);
        }
        assert!(b.len() <= 50);
        // Idle entries are forgotten.
        b.fail("late", FORGET_AFTER_MS * 3);
        assert_eq!(b.len(), 1);
    }
}
