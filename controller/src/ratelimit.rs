//! Per-source failure limiter for the unauthenticated paths: enrollment,
//! remote admin API keys, and node proofs that do not verify. Pure core
//! ([`FailureLimiter`], time is an argument) and a shared handle with its
//! own lock ([`SharedLimiter`]), never the mesh lock.
//!
//! A source that fails more than `max_failures` times within `window_ms` is
//! refused until its oldest failure leaves the window. Successes cost
//! nothing, so honest clients are never slowed down.
//!
//! A *source* is an IPv4 address or an IPv6 /64: one subscriber usually owns
//! a whole /64, so counting single IPv6 addresses would let it rotate freely.
//! Memory is bounded: at most `max_sources` sources are tracked; a new one
//! evicts the source whose last failure is the oldest.
//!
//! Trade-off (shared NAT): one bad client behind an address limits every
//! *unauthenticated* request from that address (enrollment, API keys,
//! unknown node keys) for up to a window. A request whose node proof
//! verifies is never refused by this limiter (see
//! [`crate::mesh::Mesh::authenticate_from`]), so enrolled nodes behind the
//! same address keep working.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::UnixMs;

/// Default failures allowed per source within the window.
pub const DEFAULT_MAX_FAILURES: usize = 10;
/// Default window (ms).
pub const DEFAULT_WINDOW_MS: i64 = 60_000;
/// Default bound on tracked sources (about 200 bytes each).
pub const DEFAULT_MAX_SOURCES: usize = 65_536;

/// The key a source address is counted under: IPv4 (including IPv4-mapped
/// IPv6) as is, IPv6 masked to its /64.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64))),
        },
    }
}

/// Counts recent failures per source. Pure: `now` is an argument.
#[derive(Debug)]
pub struct FailureLimiter {
    max_failures: usize,
    window_ms: i64,
    max_sources: usize,
    /// Failure times per source key, oldest first, at most `max_failures`.
    failures: HashMap<IpAddr, VecDeque<UnixMs>>,
    /// (last failure, source) for every tracked source: eviction order.
    by_last: BTreeSet<(UnixMs, IpAddr)>,
}

impl FailureLimiter {
    pub fn new(max_failures: usize, window_ms: i64, max_sources: usize) -> Self {
        Self {
            max_failures: max_failures.max(1),
            window_ms,
            max_sources: max_sources.max(1),
            failures: HashMap::new(),
            by_last: BTreeSet::new(),
        }
    }

    /// Sources currently tracked.
    pub fn len(&self) -> usize {
        self.failures.len()
    }

    pub fn is_empty(&self) -> bool {
        self.failures.is_empty()
    }

    /// Whether `src` may try now.
    pub fn allowed(&mut self, src: Option<IpAddr>, now: UnixMs) -> bool {
        let Some(key) = src.map(source_key) else {
            return true;
        };
        let Some(q) = self.failures.get_mut(&key) else {
            return true;
        };
        let horizon = now.saturating_sub(self.window_ms);
        while q.front().is_some_and(|&t| t <= horizon) {
            q.pop_front();
        }
        if q.is_empty() {
            self.forget(key);
            return true;
        }
        q.len() < self.max_failures
    }

    /// Records a failed attempt from `src`.
    pub fn record_failure(&mut self, src: Option<IpAddr>, now: UnixMs) {
        let Some(key) = src.map(source_key) else {
            return;
        };
        if !self.failures.contains_key(&key) {
            while self.failures.len() >= self.max_sources {
                let Some((_, oldest)) = self.by_last.pop_first() else {
                    break;
                };
                self.failures.remove(&oldest);
            }
        }
        let q = self.failures.entry(key).or_default();
        let last = q.back().copied();
        // Kept non-decreasing even if the clock steps back, so the queue
        // stays sorted and `by_last` holds exactly one entry per source.
        let t = last.map_or(now, |l| l.max(now));
        q.push_back(t);
        while q.len() > self.max_failures {
            q.pop_front();
        }
        if let Some(l) = last {
            self.by_last.remove(&(l, key));
        }
        self.by_last.insert((t, key));
    }

    fn forget(&mut self, key: IpAddr) {
        if let Some(q) = self.failures.remove(&key) {
            if let Some(&l) = q.back() {
                self.by_last.remove(&(l, key));
            }
        }
    }
}

impl Default for FailureLimiter {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FAILURES, DEFAULT_WINDOW_MS, DEFAULT_MAX_SOURCES)
    }
}

/// A [`FailureLimiter`] shared by the API services, behind its own lock.
#[derive(Debug, Default)]
pub struct SharedLimiter(Mutex<FailureLimiter>);

impl SharedLimiter {
    pub fn new(limiter: FailureLimiter) -> Self {
        Self(Mutex::new(limiter))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FailureLimiter> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `src` is under its failure limit.
    pub fn allowed(&self, src: Option<IpAddr>, now: UnixMs) -> bool {
        self.lock().allowed(src, now)
    }

    /// # Errors
    /// [`Error::RateLimited`] if `src` failed too often recently.
    pub fn check(&self, src: Option<IpAddr>, now: UnixMs) -> Result<()> {
        if self.allowed(src, now) {
            Ok(())
        } else {
            Err(Error::RateLimited)
        }
    }

    pub fn record_failure(&self, src: Option<IpAddr>, now: UnixMs) {
        self.lock().record_failure(src, now);
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn refuses_after_too_many_failures_and_recovers_after_the_window() {
        let ip: IpAddr = "198.18.0.9".parse().unwrap();
        let mut l = FailureLimiter::new(3, 60_000, 100);
        for t in 0..3 {
            assert!(l.allowed(Some(ip), t));
            l.record_failure(Some(ip), t);
        }
        assert!(!l.allowed(Some(ip), 10));
        assert!(l.allowed(Some("198.18.0.10".parse().unwrap()), 10));
        assert!(l.allowed(Some(ip), 60_003));
        assert!(l.is_empty(), "an expired source is forgotten");
        assert!(l.allowed(None, 10), "no source address: nothing to count");
    }

    #[test]
    fn ipv6_sources_are_counted_per_64() {
        let mut l = FailureLimiter::new(3, 60_000, 100);
        for i in 1..=3u16 {
            let a = Ipv6Addr::new(0xfd00, 0, 0, 7, i, 0, 0, i);
            l.record_failure(Some(a.into()), 0);
        }
        let same: IpAddr = "fd00:0:0:7:ffff::1".parse().unwrap();
        let next: IpAddr = "fd00:0:0:8::1".parse().unwrap();
        assert!(!l.allowed(Some(same), 1), "another address of the same /64");
        assert!(l.allowed(Some(next), 1), "the neighbouring /64");
        assert_eq!(l.len(), 1);
        // IPv4-mapped addresses count as their IPv4 address.
        let v4: IpAddr = "198.18.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:198.18.0.1".parse().unwrap();
        assert_eq!(source_key(mapped), v4);
    }

    #[test]
    fn memory_stays_bounded_under_a_flood_of_distinct_sources() {
        let max = 1_000;
        let mut l = FailureLimiter::new(3, 60_000, max);
        for i in 0..100_000u32 {
            // Alternate IPv4 (198.18.0.0/15) and distinct IPv6 /64s.
            let src: IpAddr = if i % 2 == 0 {
                Ipv4Addr::from(0xC612_0000 | (i & 0x1_ffff)).into()
            } else {
                Ipv6Addr::from((0xfd00_u128 << 112) | (u128::from(i) << 64)).into()
            };
            l.record_failure(Some(src), i64::from(i));
            assert!(l.len() <= max, "tracked {} > {max}", l.len());
            assert_eq!(l.by_last.len(), l.len());
        }
        assert_eq!(l.len(), max);
        // The oldest were evicted; the most recent source is still counted.
        let last: IpAddr = Ipv6Addr::from((0xfd00_u128 << 112) | (99_999u128 << 64)).into();
        for t in 0..3 {
            l.record_failure(Some(last), 100_000 + t);
        }
        assert!(!l.allowed(Some(last), 100_010));
    }

    #[test]
    fn extreme_times_do_not_overflow() {
        let ip: IpAddr = "198.18.0.9".parse().unwrap();
        let mut l = FailureLimiter::new(2, i64::MAX, 10);
        l.record_failure(Some(ip), i64::MIN);
        l.record_failure(Some(ip), i64::MAX);
        l.record_failure(Some(ip), i64::MIN);
        assert!(!l.allowed(Some(ip), i64::MIN));
        assert!(!l.allowed(Some(ip), i64::MAX));
    }
}
