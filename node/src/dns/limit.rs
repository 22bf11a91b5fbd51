//! Per-source token bucket for MagicDNS queries (pure: time is an argument).
//!
//! Each source address gets `burst` tokens, refilled at `rate` per second;
//! a query spends one, and a query finding the bucket empty is dropped
//! (and counted by the server). The table is bounded: at most
//! `max_sources` buckets; when a new source finds it full, buckets that
//! have refilled completely are forgotten (they are indistinguishable from
//! new ones), and if none has, the least recently used one is.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Default sustained queries per second per source.
pub const DEFAULT_RATE: u32 = 200;
/// Default burst per source.
pub const DEFAULT_BURST: u32 = 400;
/// Default bound on tracked sources.
pub const DEFAULT_MAX_SOURCES: usize = 4096;

/// Tokens are counted in billionths, so refill is exact in nanoseconds.
const SCALE: u128 = 1_000_000_000;

/// The per-source limiter.
#[derive(Debug)]
pub struct RateLimiter {
    rate: u32,
    burst: u32,
    max_sources: usize,
    buckets: HashMap<IpAddr, Bucket>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens × [`SCALE`].
    tokens: u128,
    /// When `tokens` was last brought up to date.
    updated: Instant,
}

impl RateLimiter {
    /// A limiter of `rate` queries per second with bursts of `burst`
    /// (each at least 1), tracking at most `max_sources` sources.
    pub fn new(rate: u32, burst: u32, max_sources: usize) -> RateLimiter {
        RateLimiter {
            rate: rate.max(1),
            burst: burst.max(1),
            max_sources: max_sources.max(1),
            buckets: HashMap::new(),
        }
    }

    /// Whether a query from `src` at `now` may be served; spends a token
    /// when it may.
    ///
    /// `now` must not go backwards by much: an earlier `now` than a
    /// bucket's last update refills nothing.
    pub fn allow(&mut self, src: IpAddr, now: Instant) -> bool {
        let full = u128::from(self.burst) * SCALE;
        if !self.buckets.contains_key(&src) && self.buckets.len() >= self.max_sources {
            self.make_room(now);
        }
        let bucket = self.buckets.entry(src).or_insert(Bucket {
            tokens: full,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated);
        let refill = elapsed.as_nanos().saturating_mul(u128::from(self.rate));
        bucket.tokens = bucket.tokens.saturating_add(refill).min(full);
        bucket.updated = now.max(bucket.updated);
        if bucket.tokens >= SCALE {
            bucket.tokens -= SCALE;
            true
        } else {
            false
        }
    }

    /// Sources currently tracked.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Forgets every bucket that has refilled by `now`; if none has, the
    /// least recently used one.
    fn make_room(&mut self, now: Instant) {
        let refill_time = Duration::from_nanos(
            (u64::from(self.burst) * 1_000_000_000).div_ceil(u64::from(self.rate)),
        );
        let before = self.buckets.len();
        self.buckets
            .retain(|_, b| now.saturating_duration_since(b.updated) < refill_time);
        if self.buckets.len() < before {
            return;
        }
        let oldest = self
            .buckets
            .iter()
            .min_by_key(|(ip, b)| (b.updated, **ip))
            .map(|(ip, _)| *ip);
        if let Some(ip) = oldest {
            self.buckets.remove(&ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_burst_is_served_then_the_rate() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(200, 400, 16);
        let src = ip("127.0.0.1");
        let served = (0..1000).filter(|_| l.allow(src, t0)).count();
        assert_eq!(served, 400);
        // 200/s: one token every 5 ms.
        assert!(!l.allow(src, t0 + Duration::from_millis(4)));
        assert!(l.allow(src, t0 + Duration::from_millis(5)));
        assert!(!l.allow(src, t0 + Duration::from_millis(5)));
        // One second later: 200 more, not 400.
        let t1 = t0 + Duration::from_millis(1005);
        assert_eq!((0..1000).filter(|_| l.allow(src, t1)).count(), 200);
    }

    #[test]
    fn sources_have_their_own_buckets() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(1, 2, 16);
        let (a, b) = (ip("100.64.0.1"), ip("fd00::1"));
        assert!(l.allow(a, t0) && l.allow(a, t0));
        assert!(!l.allow(a, t0));
        assert!(l.allow(b, t0));
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn the_table_is_bounded_and_forgets_refilled_or_oldest_sources() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(1, 1, 2);
        let (a, b, c) = (ip("100.64.0.1"), ip("100.64.0.2"), ip("100.64.0.3"));
        assert!(l.allow(a, t0));
        assert!(l.allow(b, t0 + Duration::from_millis(500)));
        // Full, nobody refilled: a (least recently used) is forgotten.
        assert!(l.allow(c, t0 + Duration::from_millis(600)));
        assert_eq!(l.len(), 2);
        assert!(!l.allow(b, t0 + Duration::from_millis(700)));
        // Later, both have refilled; a returns with a fresh bucket.
        let t2 = t0 + Duration::from_secs(5);
        assert!(l.allow(a, t2));
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn a_clock_that_steps_back_refills_nothing() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut l = RateLimiter::new(1, 1, 4);
        let src = ip("127.0.0.1");
        assert!(l.allow(src, t0));
        assert!(!l.allow(src, t0 - Duration::from_secs(5)));
        assert!(l.allow(src, t0 + Duration::from_secs(1)));
    }
}
