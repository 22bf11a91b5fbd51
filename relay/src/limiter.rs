//! The failure limiter for invalid `HELLO`s, by source. Pure: no I/O, no
//! clock; time is an argument.
//!
//! A source is an IPv4 address or an IPv6 /64 ([`Source`]): one host gets
//! a whole /64 from its router, so counting IPv6 addresses one by one would
//! let it rotate through 2^64 of them. A source that sends
//! [`LimiterConfig::max_failures`] invalid `HELLO`s (bad proof, bad
//! signature, expired or stale map…) within [`LimiterConfig::window_ms`] is
//! blocked for [`LimiterConfig::block_ms`]: the shell drops its new
//! connections before the TLS handshake, so it costs the relay no signature
//! work. The table holds at most [`LimiterConfig::max_sources`] entries;
//! when full, a quiet source is forgotten first, then the block that ends
//! soonest.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Serialize;
use ztmesh_proto::UnixMs;

/// Where connections come from, as the relay counts them: an IPv4 address
/// (an IPv4-mapped IPv6 address counts as its IPv4 address), or an IPv6 /64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    V4([u8; 4]),
    V6Prefix([u8; 8]),
}

impl From<IpAddr> for Source {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Source::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4.octets()),
                None => {
                    let o = v6.octets();
                    Source::V6Prefix(o[..8].try_into().expect("16 octets"))
                }
            },
        }
    }
}

/// The limiter's bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimiterConfig {
    /// Invalid `HELLO`s within the window that block the source.
    pub max_failures: u32,
    pub window_ms: i64,
    /// How long a blocked source stays blocked.
    pub block_ms: i64,
    /// Most sources remembered.
    pub max_sources: usize,
}

impl Default for LimiterConfig {
    /// 16 invalid `HELLO`s in 60 s block for 120 s; 16,384 sources. A node
    /// whose map expired while it slept retries with backoff and stays far
    /// below; a NAT that hides an office behind one address is blocked only
    /// for new sessions, and only if its hosts keep failing.
    fn default() -> Self {
        Self {
            max_failures: 16,
            window_ms: 60_000,
            block_ms: 120_000,
            max_sources: 16_384,
        }
    }
}

/// A source is blocked until `until_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Blocked {
    pub until_ms: UnixMs,
}

/// What the stats show.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LimiterStats {
    /// Sources remembered (failing or blocked).
    pub sources: usize,
    /// Of them, blocked now.
    pub blocked_sources: usize,
    /// Blocks started.
    pub blocks: u64,
    /// Connections and `HELLO`s refused because their source was blocked.
    pub refused: u64,
    /// Invalid `HELLO`s counted.
    pub failures: u64,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    window_start_ms: UnixMs,
    failures: u32,
    blocked_until_ms: Option<UnixMs>,
}

impl Entry {
    fn blocked(&self, now_ms: UnixMs) -> bool {
        self.blocked_until_ms.is_some_and(|u| now_ms < u)
    }

    /// Neither blocked nor inside a window with failures: forgettable.
    fn quiet(&self, now_ms: UnixMs, cfg: &LimiterConfig) -> bool {
        !self.blocked(now_ms) && now_ms >= self.window_start_ms.saturating_add(cfg.window_ms)
    }
}

/// Counts invalid `HELLO`s per source and blocks the sources that send many.
#[derive(Debug)]
pub struct FailureLimiter {
    cfg: LimiterConfig,
    entries: BTreeMap<Source, Entry>,
    blocks: u64,
    refused: u64,
    failures: u64,
}

impl FailureLimiter {
    pub fn new(cfg: LimiterConfig) -> Self {
        Self {
            cfg,
            entries: BTreeMap::new(),
            blocks: 0,
            refused: 0,
            failures: 0,
        }
    }

    /// Whether `src` may try a `HELLO` now; a refusal is counted.
    ///
    /// # Errors
    /// [`Blocked`] while the source is blocked.
    pub fn check(&mut self, src: Source, now_ms: UnixMs) -> Result<(), Blocked> {
        match self.entries.get(&src).and_then(|e| e.blocked_until_ms) {
            Some(until_ms) if now_ms < until_ms => {
                self.refused = self.refused.saturating_add(1);
                Err(Blocked { until_ms })
            }
            _ => Ok(()),
        }
    }

    /// Counts one invalid `HELLO` from `src`; returns the block it started,
    /// if this failure was the one too many.
    pub fn failure(&mut self, src: Source, now_ms: UnixMs) -> Option<Blocked> {
        self.failures = self.failures.saturating_add(1);
        if !self.entries.contains_key(&src) {
            self.make_room(now_ms);
        }
        let cfg = self.cfg;
        let e = self.entries.entry(src).or_insert(Entry {
            window_start_ms: now_ms,
            failures: 0,
            blocked_until_ms: None,
        });
        if e.blocked(now_ms) {
            return None;
        }
        if now_ms >= e.window_start_ms.saturating_add(cfg.window_ms) || now_ms < e.window_start_ms {
            e.window_start_ms = now_ms;
            e.failures = 0;
        }
        e.failures += 1;
        if e.failures < cfg.max_failures {
            return None;
        }
        let until_ms = now_ms.saturating_add(cfg.block_ms);
        e.blocked_until_ms = Some(until_ms);
        e.failures = 0;
        self.blocks = self.blocks.saturating_add(1);
        Some(Blocked { until_ms })
    }

    /// The counters, and how many sources are blocked at `now_ms`.
    pub fn stats(&self, now_ms: UnixMs) -> LimiterStats {
        LimiterStats {
            sources: self.entries.len(),
            blocked_sources: self.entries.values().filter(|e| e.blocked(now_ms)).count(),
            blocks: self.blocks,
            refused: self.refused,
            failures: self.failures,
        }
    }

    /// Frees one entry when the table is full: every quiet entry if there
    /// are any, else the block that ends soonest.
    fn make_room(&mut self, now_ms: UnixMs) {
        if self.entries.len() < self.cfg.max_sources.max(1) {
            return;
        }
        let cfg = self.cfg;
        self.entries.retain(|_, e| !e.quiet(now_ms, &cfg));
        if self.entries.len() < cfg.max_sources.max(1) {
            return;
        }
        // Prefer forgetting a source that is failing but not blocked (the
        // oldest window), then the block that ends soonest.
        let victim = self
            .entries
            .iter()
            .min_by_key(|(src, e)| {
                (
                    e.blocked(now_ms),
                    e.blocked_until_ms.unwrap_or(e.window_start_ms),
                    **src,
                )
            })
            .map(|(&src, _)| src);
        if let Some(src) = victim {
            self.entries.remove(&src);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    const NOW: UnixMs = 1_700_000_000_000;

    fn cfg(max_failures: u32, max_sources: usize) -> LimiterConfig {
        LimiterConfig {
            max_failures,
            window_ms: 1_000,
            block_ms: 5_000,
            max_sources,
        }
    }

    fn v4(last: u8) -> Source {
        IpAddr::V4(Ipv4Addr::new(198, 18, 0, last)).into()
    }

    #[test]
    fn ipv6_sources_are_grouped_by_64_and_mapped_ipv4_is_ipv4() {
        let a: Source = "fd00:1:2:3::1".parse::<IpAddr>().unwrap().into();
        let b: Source = "fd00:1:2:3:ffff:ffff:ffff:ffff"
            .parse::<IpAddr>()
            .unwrap()
            .into();
        let c: Source = "fd00:1:2:4::1".parse::<IpAddr>().unwrap().into();
        assert_eq!(a, b, "one /64");
        assert_ne!(a, c, "another /64");
        let mapped: Source = IpAddr::V6(Ipv4Addr::new(198, 18, 0, 7).to_ipv6_mapped()).into();
        assert_eq!(mapped, v4(7));
        assert_ne!(Source::from(IpAddr::V6(Ipv6Addr::LOCALHOST)), v4(1));
    }

    #[test]
    fn the_nth_failure_in_the_window_blocks_the_source_for_the_block_time() {
        let mut l = FailureLimiter::new(cfg(3, 16));
        assert_eq!(l.failure(v4(1), NOW), None);
        assert_eq!(l.failure(v4(1), NOW + 10), None);
        assert_eq!(l.check(v4(1), NOW + 10), Ok(()));
        let b = l.failure(v4(1), NOW + 20);
        assert_eq!(
            b,
            Some(Blocked {
                until_ms: NOW + 5_020
            })
        );
        assert_eq!(
            l.check(v4(1), NOW + 21),
            Err(Blocked {
                until_ms: NOW + 5_020
            })
        );
        assert_eq!(l.check(v4(1), NOW + 5_019).map_err(|_| ()), Err(()));
        // Other sources are not affected; the block ends on time.
        assert_eq!(l.check(v4(2), NOW + 21), Ok(()));
        assert_eq!(l.check(v4(1), NOW + 5_020), Ok(()));
        // Failures while blocked do not extend the block.
        assert_eq!(l.failure(v4(1), NOW + 100), None);
        let s = l.stats(NOW + 100);
        assert_eq!(
            s,
            LimiterStats {
                sources: 1,
                blocked_sources: 1,
                blocks: 1,
                refused: 2,
                failures: 4,
            }
        );
        assert_eq!(l.stats(NOW + 5_020).blocked_sources, 0);
    }

    #[test]
    fn failures_spread_beyond_the_window_never_block() {
        let mut l = FailureLimiter::new(cfg(3, 16));
        for i in 0..20 {
            assert_eq!(l.failure(v4(1), NOW + i * 600), None, "failure {i}");
        }
        assert_eq!(l.check(v4(1), NOW + 20 * 600), Ok(()));
        // A clock that steps back starts a new window instead of panicking.
        assert_eq!(l.failure(v4(1), NOW - 1_000_000), None);
        assert_eq!(l.failure(v4(1), i64::MAX), None);
        assert_eq!(l.failure(v4(1), i64::MIN), None);
    }

    #[test]
    fn the_table_stays_bounded_and_forgets_quiet_sources_before_blocks() {
        let mut l = FailureLimiter::new(cfg(2, 4));
        // Two blocked sources, then failing ones beyond the table's size.
        for s in [1, 2] {
            l.failure(v4(s), NOW);
            assert!(l.failure(v4(s), NOW).is_some());
        }
        for s in 10..200 {
            l.failure(v4(s), NOW + 1);
            assert!(l.stats(NOW + 1).sources <= 4);
        }
        assert!(l.check(v4(1), NOW + 2).is_err(), "blocks outlive churn");
        assert!(l.check(v4(2), NOW + 2).is_err());
        // Once every entry is blocked, the block that ends soonest goes.
        for s in [3, 4] {
            l.failure(v4(s), NOW + 3);
            l.failure(v4(s), NOW + 3);
        }
        assert!(l.check(v4(3), NOW + 4).is_err());
        assert!(l.check(v4(4), NOW + 4).is_err());
        l.failure(v4(5), NOW + 4);
        assert_eq!(l.stats(NOW + 4).sources, 4);
        assert_eq!(l.check(v4(1), NOW + 4), Ok(()), "the earliest block went");
        assert!(l.check(v4(2), NOW + 4).is_err());
        // Later, expired entries are swept when room is needed.
        l.failure(v4(6), NOW + 100_000);
        assert_eq!(l.stats(NOW + 100_000).sources, 1);
    }
}
