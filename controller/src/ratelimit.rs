//! Per-source failure limiter for enrollment and admin authentication. Pure.
//!
//! A source (IP address) that fails more than `max_failures` times within
//! `window_ms` is refused until its oldest failure leaves the window. Successes
//! cost nothing, so honest clients are never slowed down.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;

use crate::UnixMs;

#[derive(Debug)]
pub struct FailureLimiter {
    max_failures: usize,
    window_ms: i64,
    failures: HashMap<IpAddr, VecDeque<UnixMs>>,
}

impl FailureLimiter {
    pub fn new(max_failures: usize, window_ms: i64) -> Self {
        Self {
            max_failures,
            window_ms,
            failures: HashMap::new(),
        }
    }

    /// Whether `src` may try now.
    pub fn allowed(&mut self, src: Option<IpAddr>, now: UnixMs) -> bool {
        let Some(src) = src else { return true };
        let Some(q) = self.failures.get_mut(&src) else {
            return true;
        };
        while q.front().is_some_and(|&t| t <= now - self.window_ms) {
            q.pop_front();
        }
        if q.is_empty() {
            self.failures.remove(&src);
            return true;
        }
        q.len() < self.max_failures
    }

    /// Records a failed attempt from `src`.
    pub fn record_failure(&mut self, src: Option<IpAddr>, now: UnixMs) {
        let Some(src) = src else { return };
        // Bound memory under a flood of distinct sources.
        if self.failures.len() > 100_000 {
            let window = self.window_ms;
            self.failures
                .retain(|_, q| q.back().is_some_and(|&t| t > now - window));
        }
        let q = self.failures.entry(src).or_default();
        q.push_back(now);
        while q.len() > self.max_failures {
            q.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_after_too_many_failures_and_recovers_after_the_window() {
        let ip: IpAddr = "198.18.0.9".parse().unwrap();
        let mut l = FailureLimiter::new(3, 60_000);
        for t in 0..3 {
            assert!(l.allowed(Some(ip), t));
            l.record_failure(Some(ip), t);
        }
        assert!(!l.allowed(Some(ip), 10));
        assert!(l.allowed(Some("198.18.0.10".parse().unwrap()), 10));
        assert!(l.allowed(Some(ip), 60_001));
    }
}
