//! Devices waiting for a person to sign in and confirm them (interactive
//! login, `Control.Login`). Pure: time and randomness are arguments.
//!
//! Each pending login has a one-time code of 8 letters from a 20-consonant
//! alphabet (20^8 ≈ 2.6·10^10, no vowels so no words, no 0/O or 1/I), shown
//! as `BCDF-GHJK`. A code lives 10 minutes at most, and only while its node
//! waits on the stream; it is taken (gone) the moment a person approves or
//! denies it. The registry is bounded overall and per source address, and a
//! machine key has at most one pending login (a new one replaces the old).
//! Guessing is slowed by the web layer's back-off, and the code space makes
//! a hit in the codes' lifetime hopeless.

use std::collections::HashMap;

use rand::RngCore;

use crate::model::DeviceClaim;
use crate::UnixMs;

/// The alphabet of login codes.
const ALPHABET: &[u8; 20] = b"BCDFGHJKLMNPQRSTVWXZ";
/// Letters in a code.
pub const CODE_LEN: usize = 8;
/// How long a code is accepted.
pub const CODE_TTL_MS: i64 = 10 * 60 * 1000;

/// A device waiting for confirmation; `W` is how to reach its node.
#[derive(Debug)]
pub struct Pending<W> {
    /// The code, normalized (`BCDFGHJK`).
    pub code: String,
    pub claim: DeviceClaim,
    /// The node's operating system, as it reported it (printable, bounded).
    pub os: String,
    /// The node's address as the controller saw it.
    pub source: String,
    pub created_ms: UnixMs,
    pub expires_ms: UnixMs,
    pub waiter: W,
}

/// Why a login cannot start.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Full {
    #[error("too many logins are waiting for confirmation; try again in a few minutes")]
    Total,
    #[error("too many logins from this address are waiting for confirmation; finish or cancel one first")]
    Source,
}

/// The pending logins, by code.
#[derive(Debug)]
pub struct DeviceLogins<W> {
    max_total: usize,
    max_per_source: usize,
    by_code: HashMap<String, Pending<W>>,
}

/// The display form of a normalized code: `BCDF-GHJK`.
pub fn display_code(code: &str) -> String {
    let (a, b) = code.split_at(code.len().min(CODE_LEN / 2));
    format!("{a}-{b}")
}

/// A typed code in canonical form (case and separators ignored); `None`
/// when it cannot be a code at all.
pub fn normalize_code(typed: &str) -> Option<String> {
    if typed.len() > 32 {
        return None;
    }
    let code: String = typed
        .chars()
        .filter(|c| !matches!(c, '-' | ' '))
        .map(|c| c.to_ascii_uppercase())
        .collect();
    (code.len() == CODE_LEN && code.bytes().all(|b| ALPHABET.contains(&b))).then_some(code)
}

impl<W> DeviceLogins<W> {
    pub fn new(max_total: usize, max_per_source: usize) -> Self {
        Self {
            max_total,
            max_per_source,
            by_code: HashMap::new(),
        }
    }

    /// Registers a device; returns its code and when the code expires. A
    /// pending login of the same machine key is dropped (its waiter with it).
    ///
    /// # Errors
    /// [`Full`] when the registry or the source's share of it is full.
    pub fn start(
        &mut self,
        claim: DeviceClaim,
        os: &str,
        source: &str,
        waiter: W,
        now: UnixMs,
        rng: &mut impl RngCore,
    ) -> Result<(String, UnixMs), Full> {
        self.prune(now);
        self.by_code
            .retain(|_, p| p.claim.machine_key != claim.machine_key);
        if self.by_code.values().filter(|p| p.source == source).count() >= self.max_per_source {
            return Err(Full::Source);
        }
        if self.by_code.len() >= self.max_total {
            // Full: the source holding the most waits gives up its oldest, so
            // a flood from many addresses displaces mostly itself.
            let mut per_source: HashMap<&str, usize> = HashMap::new();
            for p in self.by_code.values() {
                *per_source.entry(p.source.as_str()).or_default() += 1;
            }
            let heaviest = per_source
                .into_iter()
                .max_by_key(|(s, n)| (*n, std::cmp::Reverse(*s)))
                .map(|(s, _)| s.to_string());
            let oldest = self
                .by_code
                .values()
                .filter(|p| Some(&p.source) == heaviest.as_ref())
                .min_by_key(|p| (p.created_ms, p.code.clone()))
                .map(|p| p.code.clone())
                .ok_or(Full::Total)?;
            self.by_code.remove(&oldest);
        }
        let code = loop {
            let mut bytes = [0u8; CODE_LEN];
            rng.fill_bytes(&mut bytes);
            // 256 % 20 = 16: reject the top bytes so every letter is equally likely.
            if bytes.iter().any(|b| *b >= 240) {
                continue;
            }
            let code: String = bytes
                .iter()
                .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
                .collect();
            if !self.by_code.contains_key(&code) {
                break code;
            }
        };
        let expires_ms = now.saturating_add(CODE_TTL_MS);
        let os: String = os.chars().filter(|c| !c.is_control()).take(100).collect();
        self.by_code.insert(
            code.clone(),
            Pending {
                code: code.clone(),
                claim,
                os,
                source: source.to_string(),
                created_ms: now,
                expires_ms,
                waiter,
            },
        );
        Ok((code, expires_ms))
    }

    /// The pending login of a typed code, if it is live.
    pub fn get(&self, typed: &str, now: UnixMs) -> Option<&Pending<W>> {
        let code = normalize_code(typed)?;
        self.by_code.get(&code).filter(|p| p.expires_ms > now)
    }

    /// Takes the pending login of a typed code out (approve or deny): a
    /// code works once.
    pub fn take(&mut self, typed: &str, now: UnixMs) -> Option<Pending<W>> {
        let code = normalize_code(typed)?;
        self.by_code.remove(&code).filter(|p| p.expires_ms > now)
    }

    /// Forgets a login whose node stopped waiting.
    pub fn cancel(&mut self, code: &str) {
        self.by_code.remove(code);
    }

    /// Forgets expired logins.
    pub fn prune(&mut self, now: UnixMs) {
        self.by_code.retain(|_, p| p.expires_ms > now);
    }

    pub fn len(&self) -> usize {
        self.by_code.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_code.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn claim(i: u8) -> DeviceClaim {
        DeviceClaim {
            machine_key: [i; 32],
            wg_key: [i + 100; 32],
            hostname: format!("host{i}"),
        }
    }

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(1)
    }

    #[test]
    fn a_code_is_found_however_typed_and_works_once() {
        let mut d = DeviceLogins::new(10, 10);
        let (code, exp) = d.start(claim(1), "linux", "s", (), 0, &mut rng()).unwrap();
        assert_eq!(exp, CODE_TTL_MS);
        assert_eq!(code.len(), CODE_LEN);
        let shown = display_code(&code);
        assert_eq!(shown.len(), CODE_LEN + 1);
        for typed in [code.clone(), shown.to_lowercase(), format!(" {shown} ")] {
            assert_eq!(d.get(&typed, 1).unwrap().claim, claim(1), "{typed:?}");
        }
        assert!(d.take(&shown, 1).is_some());
        assert!(d.take(&shown, 1).is_none(), "a code works once");
        assert!(d.get(&shown, 1).is_none());
    }

    #[test]
    fn expired_unknown_and_malformed_codes_find_nothing() {
        let mut d = DeviceLogins::new(10, 10);
        let (code, exp) = d.start(claim(1), "linux", "s", (), 0, &mut rng()).unwrap();
        assert!(d.get(&code, exp).is_none(), "expired at its expiry");
        assert!(d.take(&code, exp).is_none());
        for bad in [
            "",
            "AAAAAAAA",
            "BCDFGHJ",
            "BCDFGHJKL",
            "ВCDFGHJK",
            &"B".repeat(10_000),
            "BCDF\u{0}GHJK",
        ] {
            assert!(d.get(bad, 0).is_none(), "{bad:?}");
            assert_eq!(normalize_code(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn bounded_overall_and_per_source_and_one_per_machine_key() {
        let mut d = DeviceLogins::new(3, 2);
        let mut r = rng();
        d.start(claim(1), "", "a", (), 0, &mut r).unwrap();
        d.start(claim(2), "", "a", (), 0, &mut r).unwrap();
        assert_eq!(d.start(claim(3), "", "a", (), 0, &mut r), Err(Full::Source));
        let (b, _) = d.start(claim(3), "", "b", (), 0, &mut r).unwrap();
        // The same machine key again replaces its pending login.
        let (code, _) = d.start(claim(1), "", "a", (), 1, &mut r).unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!(d.get(&code, 2).unwrap().created_ms, 1);
        // Full: the heaviest source ("a") gives up its oldest wait (claim 2).
        let (c, _) = d.start(claim(4), "", "c", (), 2, &mut r).unwrap();
        assert_eq!(d.len(), 3);
        for kept in [&b, &c, &code] {
            assert!(d.get(kept, 2).is_some());
        }
        // Expired ones make room.
        d.start(claim(5), "", "c", (), CODE_TTL_MS + 5, &mut r)
            .unwrap();
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn os_strings_are_bounded_and_printable() {
        let mut d = DeviceLogins::new(3, 3);
        let os = format!("linux\u{1b}[31m{}", "x".repeat(500));
        let (code, _) = d.start(claim(1), &os, "a", (), 0, &mut rng()).unwrap();
        let p = d.get(&code, 0).unwrap();
        assert_eq!(p.os.chars().count(), 100);
        assert!(!p.os.contains('\u{1b}'));
    }
}
