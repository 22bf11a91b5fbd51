//! Browser sessions of the controller's pages. Pure: time and randomness
//! are arguments.
//!
//! A session is a random 256-bit id in a `__Host-` cookie (Secure, HttpOnly,
//! SameSite=Lax, Path=/); the server keeps only its SHA-256, so the table
//! never holds a usable cookie. Each session has its own CSRF token. The id
//! changes whenever the session's privilege does (password accepted, signed
//! in), so an id planted before sign-in is worthless after. Sessions end
//! after 30 idle minutes or 12 hours, whichever comes first; the table is
//! bounded (the stalest session goes first).

use std::collections::HashMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use rand::RngCore;
use subtle::ConstantTimeEq;
use ztmesh_proto::auth::sha256;

use crate::roles::Role;
use crate::UnixMs;

pub const IDLE_MS: i64 = 30 * 60 * 1000;
pub const ABSOLUTE_MS: i64 = 12 * 3600 * 1000;
/// The session cookie's name (`__Host-`: Secure, Path=/, no Domain).
pub const COOKIE: &str = "__Host-ztmesh";

/// How far a session has got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Auth {
    Anonymous,
    /// The password was right; the second factor is next. `stamp` as for
    /// `SignedIn`: a password reset meanwhile ends this stage too.
    Password {
        login: String,
        stamp: [u8; 32],
    },
    /// Signed in (`via`: "password+totp", "password+recovery-code", "sso"),
    /// resting on the user's credentials as `stamp` records them
    /// (`Mesh::credential_stamp`).
    SignedIn {
        login: String,
        role: Role,
        via: &'static str,
        stamp: [u8; 32],
    },
}

/// One browser's session.
#[derive(Clone, Debug)]
pub struct Session {
    pub csrf: String,
    pub created_ms: UnixMs,
    pub last_ms: UnixMs,
    pub auth: Auth,
    /// A TOTP secret shown for enrolment, not yet confirmed by a code.
    pub pending_totp: Option<[u8; 20]>,
    /// An SSO sign-in under way: its state, nonce and PKCE verifier.
    pub oidc: Option<crate::oidc::AuthRequest>,
    /// Where to go once signed in (a path checked by the caller).
    pub next: String,
    /// Wrong second-factor codes in this session: past a few, the password
    /// must be entered again.
    pub mfa_failures: u32,
    /// The address (IPv4, IPv6 /64) that opened the session: sessions not
    /// signed in are counted per source.
    pub source: String,
}

impl Session {
    /// Whether `token` is this session's CSRF token (constant time).
    pub fn csrf_ok(&self, token: &str) -> bool {
        bool::from(self.csrf.as_bytes().ct_eq(token.as_bytes()))
    }

    /// The signed-in user, if any.
    pub fn user(&self) -> Option<(&str, Role)> {
        match &self.auth {
            Auth::SignedIn { login, role, .. } => Some((login, *role)),
            _ => None,
        }
    }
}

fn random_token(rng: &mut impl RngCore) -> String {
    let mut b = [0u8; 32];
    rng.fill_bytes(&mut b);
    B64.encode(b)
}

/// The session table, keyed by the SHA-256 of the cookie value.
#[derive(Debug)]
pub struct Sessions {
    max: usize,
    per_source: usize,
    /// A session unused this long ends ([`IDLE_MS`] unless configured).
    idle_ms: i64,
    map: HashMap<[u8; 32], Session>,
}

impl Sessions {
    /// At most `max` sessions, of which at most `per_source` not signed in
    /// per source.
    pub fn new(max: usize, per_source: usize) -> Self {
        Self {
            max,
            per_source,
            idle_ms: IDLE_MS,
            map: HashMap::new(),
        }
    }

    /// Sessions end after `idle_ms` unused (at least a second; never
    /// longer than the absolute limit).
    pub fn with_idle(mut self, idle_ms: i64) -> Self {
        self.idle_ms = idle_ms.clamp(1000, ABSOLUTE_MS);
        self
    }

    fn live(&self, s: &Session, now: UnixMs) -> bool {
        now - s.last_ms < self.idle_ms && now - s.created_ms < ABSOLUTE_MS
    }

    /// A new anonymous session for a browser at `source`; returns its
    /// cookie value. Sessions not signed in are bounded per source (the
    /// source's stalest goes first), and when the table is full the source
    /// holding the most of them gives one up: a flood of new sessions
    /// displaces mostly the flooder's. A signed-in session is never evicted
    /// for a stranger (`None`: full of signed-in sessions).
    pub fn create(&mut self, now: UnixMs, source: &str, rng: &mut impl RngCore) -> Option<String> {
        self.prune(now);
        let pending = |s: &Session| !matches!(s.auth, Auth::SignedIn { .. });
        let stalest_of = |map: &HashMap<[u8; 32], Session>, src: &str| {
            map.iter()
                .filter(|(_, s)| pending(s) && s.source == src)
                .min_by_key(|(_, s)| s.last_ms)
                .map(|(k, _)| *k)
        };
        let mine = self
            .map
            .values()
            .filter(|s| pending(s) && s.source == source)
            .count();
        if mine >= self.per_source {
            if let Some(k) = stalest_of(&self.map, source) {
                self.map.remove(&k);
            }
        } else if self.map.len() >= self.max {
            let mut counts: HashMap<&str, usize> = HashMap::new();
            for s in self.map.values().filter(|s| pending(s)) {
                *counts.entry(s.source.as_str()).or_default() += 1;
            }
            let heaviest = counts
                .into_iter()
                .max_by_key(|(src, n)| (*n, std::cmp::Reverse(*src)))
                .map(|(src, _)| src.to_string())?;
            let k = stalest_of(&self.map, &heaviest)?;
            self.map.remove(&k);
        }
        let id = random_token(rng);
        self.map.insert(
            sha256(id.as_bytes()),
            Session {
                csrf: random_token(rng),
                created_ms: now,
                last_ms: now,
                auth: Auth::Anonymous,
                pending_totp: None,
                oidc: None,
                next: "/".into(),
                mfa_failures: 0,
                source: source.to_string(),
            },
        );
        Some(id)
    }

    /// Keeps at most `max` signed-in sessions of `login` (its stalest go):
    /// one account cannot fill the table by signing in over and over.
    pub fn limit_user(&mut self, login: &str, max: usize) {
        let mut mine: Vec<([u8; 32], UnixMs)> = self
            .map
            .iter()
            .filter(|(_, s)| matches!(&s.auth, Auth::SignedIn { login: l, .. } if l == login))
            .map(|(k, s)| (*k, s.last_ms))
            .collect();
        if mine.len() <= max {
            return;
        }
        mine.sort_by_key(|(_, last)| std::cmp::Reverse(*last));
        for (k, _) in mine.into_iter().skip(max) {
            self.map.remove(&k);
        }
    }

    /// The live session of a cookie value (its idle clock restarted).
    pub fn get(&mut self, id: &str, now: UnixMs) -> Option<&mut Session> {
        if id.len() > 64 {
            return None;
        }
        let key = sha256(id.as_bytes());
        let live = self.map.get(&key).is_some_and(|s| self.live(s, now));
        if !live {
            self.map.remove(&key);
            return None;
        }
        let s = self.map.get_mut(&key)?;
        s.last_ms = now;
        Some(s)
    }

    /// Moves a session to a new id (and a new CSRF token), for a change of
    /// privilege; returns the new cookie value. The old id stops working.
    pub fn rotate(&mut self, id: &str, now: UnixMs, rng: &mut impl RngCore) -> Option<String> {
        let mut s = self.map.remove(&sha256(id.as_bytes()))?;
        s.csrf = random_token(rng);
        s.last_ms = now;
        let new = random_token(rng);
        self.map.insert(sha256(new.as_bytes()), s);
        Some(new)
    }

    pub fn remove(&mut self, id: &str) {
        self.map.remove(&sha256(id.as_bytes()));
    }

    pub fn prune(&mut self, now: UnixMs) {
        let (idle, absolute) = (self.idle_ms, ABSOLUTE_MS);
        self.map
            .retain(|_, s| now - s.last_ms < idle && now - s.created_ms < absolute);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn sessions_expire_idle_and_absolute() {
        let mut r = rand::rngs::StdRng::seed_from_u64(3);
        let mut s = Sessions::new(10, 10);
        let id = s.create(0, "a", &mut r).unwrap();
        assert!(s.get(&id, IDLE_MS - 1).is_some());
        // Kept alive by use, but never past the absolute limit.
        let mut t = IDLE_MS - 1;
        while t + IDLE_MS / 2 < ABSOLUTE_MS {
            t += IDLE_MS / 2;
            assert!(s.get(&id, t).is_some(), "{t}");
        }
        assert!(s.get(&id, ABSOLUTE_MS).is_none());
        let id = s.create(0, "a", &mut r).unwrap();
        assert!(s.get(&id, IDLE_MS).is_none(), "idle too long");
        // A shorter idle limit, as `serve --web-session-idle` sets it.
        let mut short = Sessions::new(10, 10).with_idle(5_000);
        let id = short.create(0, "src", &mut r).unwrap();
        assert!(short.get(&id, 4_999).is_some());
        assert!(short.get(&id, 4_999 + 5_000).is_none(), "idle too long");
    }

    #[test]
    fn a_flood_from_one_source_displaces_its_own_sessions_only() {
        let mut r = rand::rngs::StdRng::seed_from_u64(6);
        let mut s = Sessions::new(10, 4);
        let victim = s.create(0, "victim", &mut r).unwrap();
        s.get(&victim, 1).unwrap().auth = Auth::Password {
            login: "v@example.com".into(),
            stamp: [0; 32],
        };
        let other = s.create(1, "other", &mut r).unwrap();
        for i in 0..1000 {
            s.create(2 + i, "flood", &mut r).unwrap();
        }
        assert!(s.get(&victim, 2000).is_some(), "mid-sign-in, kept");
        assert!(s.get(&other, 2000).is_some());
        assert!(s.len() <= 6);
        // Many sources: the heaviest gives way, the victim stays.
        for i in 0..100 {
            s.create(3000 + i, &format!("src{}", i % 20), &mut r);
        }
        assert!(s.get(&victim, 4000).is_some());
        assert!(s.len() <= 10);
    }

    #[test]
    fn one_user_keeps_a_bounded_number_of_signed_in_sessions() {
        let mut r = rand::rngs::StdRng::seed_from_u64(7);
        let mut s = Sessions::new(100, 100);
        let ids: Vec<String> = (0..10)
            .map(|i| {
                let id = s.create(i, "a", &mut r).unwrap();
                s.get(&id, i).unwrap().auth = Auth::SignedIn {
                    login: "u@example.com".into(),
                    role: Role::Member,
                    via: "sso",
                    stamp: [0; 32],
                };
                id
            })
            .collect();
        s.limit_user("u@example.com", 3);
        assert_eq!(s.len(), 3);
        assert!(s.get(&ids[9], 10).is_some(), "the newest stay");
        assert!(s.get(&ids[0], 10).is_none());
    }

    #[test]
    fn rotation_retires_the_old_id_and_csrf_token() {
        let mut r = rand::rngs::StdRng::seed_from_u64(4);
        let mut s = Sessions::new(10, 10);
        let id = s.create(0, "a", &mut r).unwrap();
        let csrf = s.get(&id, 0).unwrap().csrf.clone();
        let new = s.rotate(&id, 1, &mut r).unwrap();
        assert!(s.get(&id, 1).is_none());
        let sess = s.get(&new, 1).unwrap();
        assert!(!sess.csrf_ok(&csrf));
        let fresh = sess.csrf.clone();
        assert!(sess.csrf_ok(&fresh));
        assert!(!sess.csrf_ok(""));
    }

    #[test]
    fn the_table_is_bounded_and_ids_are_not_stored() {
        let mut r = rand::rngs::StdRng::seed_from_u64(5);
        let mut s = Sessions::new(5, 5);
        let ids: Vec<String> = (0..20).map(|i| s.create(i, "a", &mut r).unwrap()).collect();
        assert_eq!(s.len(), 5);
        assert!(s.get(&ids[19], 20).is_some());
        assert!(s.get(&ids[0], 20).is_none(), "the stalest went first");
        // Signed-in sessions are never evicted for strangers.
        for id in &ids[15..] {
            s.get(id, 21).unwrap().auth = Auth::SignedIn {
                login: "a@example.com".into(),
                role: Role::Member,
                via: "sso",
                stamp: [0; 32],
            };
        }
        assert!(s.create(22, "a", &mut r).is_none());
        for id in &ids[15..] {
            assert!(s.get(id, 23).is_some());
        }
        assert!(!s.map.contains_key(&{
            let mut k = [0u8; 32];
            k.copy_from_slice(&ids[19].as_bytes()[..32]);
            k
        }));
        assert!(s.get(&"x".repeat(10_000), 20).is_none());
    }
}
