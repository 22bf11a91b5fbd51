//! Handshake admission: who may make this device do a Diffie-Hellman now.
//! Pure: no I/O, no clock; `now` is an argument.
//!
//! WireGuard's defence against handshake floods is the cookie: a responder
//! under load answers an initiation with a cookie reply instead of doing the
//! expensive part, and only an initiator that proves it receives packets at its
//! source address (MAC2) gets through. With one shared counter (boringtun's
//! `RateLimiter`), one flooding source puts the whole device "under load", and
//! every honest peer's handshake is answered with a cookie and delayed by a
//! retry. Here the load is tracked per source, as the kernel's ratelimiter does:
//!
//! - each source (IPv4 address, IPv6 /64) has a token bucket of
//!   [`SOURCE_BURST`] free handshakes refilled at [`SOURCE_RATE`] per second,
//!   and a second bucket of the same size for handshakes that carry a valid
//!   cookie;
//! - a global bucket ([`GLOBAL_RATE`]) bounds the free handshakes of all
//!   sources together, so a flood from many (spoofed) sources makes everyone
//!   prove their address with a cookie, as WireGuard does under load;
//! - the table holds at most [`MAX_SOURCES`] sources; idle ones are swept, and
//!   a new source while it is full must present a cookie.
//!
//! So a flooding source gets cookie replies after its small budget and is
//! dropped after its cookie budget, and other sources keep their own budgets.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Free handshake messages per second per source.
///
/// WireGuard's kernel module allows 20 per second per source address. An honest
/// node sends one initiation per peer and retry (5 s), so 20/s leaves room for
/// a NAT address shared by many nodes that restart together; those beyond the
/// budget are answered with a cookie and succeed on their retry.
pub const SOURCE_RATE: u64 = 20;
/// Free handshake messages a quiet source may send at once.
pub const SOURCE_BURST: u64 = 20;
/// Free handshake messages per second across all sources before everyone must
/// present a cookie (boringtun's device uses 100/s for its shared limiter).
pub const GLOBAL_RATE: u64 = 200;
/// Most sources tracked at once (~48 bytes each, so ~200 KiB at most).
pub const MAX_SOURCES: usize = 4096;

/// Tokens are counted in thousandths so that refills per millisecond are exact.
const MILLI: u64 = 1000;

/// What to do with a handshake message whose MAC1 verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Within budget: process it.
    Admit,
    /// Over budget: process it only if its MAC2 carries our cookie for the
    /// source address (then ask [`Admissions::admit_with_cookie`]), else answer
    /// with a cookie reply.
    CookieRequired,
}

/// The key a source is limited under: the IPv4 address, or the IPv6 /64 (one
/// host usually holds a whole /64, so per-address limits would be free to evade).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKey {
    V4([u8; 4]),
    V6([u8; 8]),
}

impl From<IpAddr> for SourceKey {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(a) => SourceKey::V4(a.octets()),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => SourceKey::V4(v4.octets()),
                None => {
                    let o = a.octets();
                    SourceKey::V6([o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]])
                }
            },
        }
    }
}

/// A token bucket in thousandths of a token.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    milli: u64,
    last: Instant,
}

impl Bucket {
    fn full(burst: u64, now: Instant) -> Self {
        Self {
            milli: burst.saturating_mul(MILLI),
            last: now,
        }
    }

    fn refill(&mut self, rate: u64, burst: u64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        let ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
        if ms == 0 {
            return;
        }
        // `rate` tokens per second is `rate` thousandths per millisecond.
        self.milli = self
            .milli
            .saturating_add(ms.saturating_mul(rate))
            .min(burst.saturating_mul(MILLI));
        // Keep the sub-millisecond remainder for the next refill.
        self.last = self
            .last
            .checked_add(Duration::from_millis(ms))
            .unwrap_or(now);
    }

    fn take(&mut self) -> bool {
        match self.milli.checked_sub(MILLI) {
            Some(left) => {
                self.milli = left;
                true
            }
            None => false,
        }
    }

    fn is_full(&self, burst: u64) -> bool {
        self.milli >= burst.saturating_mul(MILLI)
    }
}

#[derive(Debug, Clone, Copy)]
struct Source {
    free: Bucket,
    proven: Bucket,
}

/// Per-source and global handshake budgets.
#[derive(Debug)]
pub struct Admissions {
    sources: HashMap<SourceKey, Source>,
    global: Bucket,
    /// Cookie-proven handshakes of sources not in the full table.
    overflow: Bucket,
}

impl Admissions {
    pub fn new(now: Instant) -> Self {
        Self {
            sources: HashMap::new(),
            global: Bucket::full(GLOBAL_RATE, now),
            overflow: Bucket::full(GLOBAL_RATE, now),
        }
    }

    /// Decides on a handshake message from `src` (MAC1 already verified).
    pub fn check(&mut self, src: IpAddr, now: Instant) -> Admission {
        self.global.refill(GLOBAL_RATE, GLOBAL_RATE, now);
        let key = SourceKey::from(src);
        let room = self.sources.len() < MAX_SOURCES;
        let source = match self.sources.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) if room => e.insert(Source {
                free: Bucket::full(SOURCE_BURST, now),
                proven: Bucket::full(SOURCE_BURST, now),
            }),
            // A full table (many sources at once, likely spoofed): strangers
            // must prove their address first.
            Entry::Vacant(_) => return Admission::CookieRequired,
        };
        source.free.refill(SOURCE_RATE, SOURCE_BURST, now);
        // Check the source first so that a flooder never drains the global
        // budget beyond its own share.
        if source.free.milli >= MILLI && self.global.take() {
            source.free.take();
            Admission::Admit
        } else {
            Admission::CookieRequired
        }
    }

    /// After [`Admission::CookieRequired`] and a valid cookie: whether the
    /// source, proven to receive at its address, is still within its second
    /// budget. `false`: drop the message without an answer.
    pub fn admit_with_cookie(&mut self, src: IpAddr, now: Instant) -> bool {
        match self.sources.get_mut(&SourceKey::from(src)) {
            Some(s) => {
                s.proven.refill(SOURCE_RATE, SOURCE_BURST, now);
                s.proven.take()
            }
            None => {
                self.overflow.refill(GLOBAL_RATE, GLOBAL_RATE, now);
                self.overflow.take()
            }
        }
    }

    /// Forgets sources whose budgets are full again (they carry no state).
    pub fn sweep(&mut self, now: Instant) {
        self.sources.retain(|_, s| {
            s.free.refill(SOURCE_RATE, SOURCE_BURST, now);
            s.proven.refill(SOURCE_RATE, SOURCE_BURST, now);
            !(s.free.is_full(SOURCE_BURST) && s.proven.is_full(SOURCE_BURST))
        });
    }

    /// Number of sources tracked.
    pub fn len(&self) -> usize {
        self.sources.len()
    }

    /// Whether no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 18, 0, last))
    }

    fn admitted(a: &mut Admissions, src: IpAddr, now: Instant, n: u64) -> u64 {
        (0..n)
            .filter(|_| a.check(src, now) == Admission::Admit)
            .count() as u64
    }

    #[test]
    fn a_source_gets_its_burst_then_cookies_and_others_keep_theirs() {
        let now = Instant::now();
        let mut a = Admissions::new(now);
        assert_eq!(admitted(&mut a, v4(66), now, 1_000), SOURCE_BURST);
        assert_eq!(a.check(v4(66), now), Admission::CookieRequired);
        assert_eq!(a.check(v4(3), now), Admission::Admit, "another source");
    }

    #[test]
    fn budgets_refill_at_the_rate_on_the_callers_clock() {
        let t0 = Instant::now();
        let mut a = Admissions::new(t0);
        admitted(&mut a, v4(66), t0, 1_000);
        let half = t0 + Duration::from_millis(500);
        assert_eq!(admitted(&mut a, v4(66), half, 1_000), SOURCE_RATE / 2);
        let later = half + Duration::from_secs(60);
        assert_eq!(admitted(&mut a, v4(66), later, 1_000), SOURCE_BURST);
        // A clock that goes backwards refills nothing and panics nowhere.
        assert_eq!(admitted(&mut a, v4(66), t0, 1_000), 0);
    }

    #[test]
    fn cookie_holders_have_a_second_bounded_budget() {
        let now = Instant::now();
        let mut a = Admissions::new(now);
        admitted(&mut a, v4(66), now, 1_000);
        let proven = (0..1_000)
            .filter(|_| a.admit_with_cookie(v4(66), now))
            .count() as u64;
        assert_eq!(proven, SOURCE_BURST);
    }

    #[test]
    fn ipv6_sources_share_a_budget_per_64() {
        let now = Instant::now();
        let mut a = Admissions::new(now);
        let mut admitted_total = 0;
        for host in 0..1_000u16 {
            let ip = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, host));
            admitted_total += admitted(&mut a, ip, now, 1);
        }
        assert_eq!(admitted_total, SOURCE_BURST);
        let other = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 2, 0, 0, 0, 1));
        assert_eq!(a.check(other, now), Admission::Admit);
        assert_eq!(a.len(), 2);
    }

    #[test]
    fn many_sources_exhaust_the_global_budget_and_everyone_needs_cookies() {
        let now = Instant::now();
        let mut a = Admissions::new(now);
        let mut admitted_total = 0;
        for i in 0..2_000u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(0xc612_0000 | i));
            admitted_total += admitted(&mut a, ip, now, 1);
        }
        assert_eq!(admitted_total, GLOBAL_RATE);
        assert_eq!(a.check(v4(3), now), Admission::CookieRequired);
        let later = now + Duration::from_secs(1);
        assert_eq!(a.check(v4(3), later), Admission::Admit);
    }

    #[test]
    fn the_table_is_bounded_and_idle_sources_are_swept() {
        let t0 = Instant::now();
        let mut a = Admissions::new(t0);
        for i in 0..(MAX_SOURCES as u32 * 3) {
            // Spread over time so the global budget is not what limits.
            let now = t0 + Duration::from_millis(u64::from(i) * 10);
            let ip = IpAddr::V4(Ipv4Addr::from(0xc612_0000 | i));
            a.check(ip, now);
            assert!(a.len() <= MAX_SOURCES);
        }
        assert_eq!(a.len(), MAX_SOURCES);
        let end = t0 + Duration::from_secs(3_600);
        // A new source while the table is full must prove its address.
        let stranger = IpAddr::V4(Ipv4Addr::new(198, 19, 255, 1));
        assert_eq!(a.check(stranger, end), Admission::CookieRequired);
        assert!(a.admit_with_cookie(stranger, end));
        a.sweep(end);
        assert!(
            a.is_empty(),
            "idle sources carry no state and are forgotten"
        );
        assert_eq!(a.check(stranger, end), Admission::Admit);
    }
}
