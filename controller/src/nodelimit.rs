//! Per-node call limits and endpoint coalescing for enrolled nodes. Pure: no
//! I/O, no clock; `now` is an argument.
//!
//! An enrolled node may be hostile or broken; it must not make the controller
//! do unbounded work. Each limited call draws from a token bucket per
//! (node, call) — [`NodeLimiter`] — and a refused call is told which limit it
//! met and when to retry. The limits sit well above what an honest agent does
//! (endpoints and a stream open per session, flows every 5 s).
//!
//! Endpoint reports change every peer's map, so they are also coalesced
//! ([`EndpointCoalescer`]): at most one republish per node per interval, and
//! the latest report wins.

use std::collections::{BTreeMap, HashMap};

use crate::UnixMs;

/// The node calls that are limited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Call {
    ReportEndpoints,
    ReportFlows,
    StreamOpen,
    SetRoutes,
    ReportPosture,
    NetMapApplied,
}

/// A token bucket: `burst` calls at once, then one per `refill_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub burst: u32,
    pub refill_ms: i64,
}

impl Call {
    /// The gRPC method name, as the refusal message shows it.
    pub fn name(self) -> &'static str {
        match self {
            Call::ReportEndpoints => "ReportEndpoints",
            Call::ReportFlows => "ReportFlows",
            Call::StreamOpen => "StreamNetMap",
            Call::SetRoutes => "SetRoutes",
            Call::ReportPosture => "ReportPosture",
            Call::NetMapApplied => "NetMapApplied",
        }
    }

    /// The limit of this call per node (documented in the README).
    pub fn limit(self) -> Limit {
        match self {
            // The agent reports endpoints once per session.
            Call::ReportEndpoints => Limit {
                burst: 10,
                refill_ms: 6_000,
            },
            // The agent reports flows every 5 s, and denied flows (the
            // detectors' evidence) within a second when there are any.
            Call::ReportFlows => Limit {
                burst: 10,
                refill_ms: 500,
            },
            // One per session; reconnects back off from 250 ms to 15 s.
            Call::StreamOpen => Limit {
                burst: 10,
                refill_ms: 6_000,
            },
            // The agent advertises once per session and on `up` changes;
            // each accepted change is audited and may republish maps.
            Call::SetRoutes => Limit {
                burst: 5,
                refill_ms: 12_000,
            },
            // The agent reports once per session and every third of the
            // posture TTL (at least 1 s apart); a changed report is
            // audited and may republish maps.
            Call::ReportPosture => Limit {
                burst: 10,
                refill_ms: 2_000,
            },
            // The agent acknowledges each map it applies; a refused one
            // only loses a latency sample, and each costs one lookup.
            Call::NetMapApplied => Limit {
                burst: 20,
                refill_ms: 1_000,
            },
        }
    }
}

/// GCRA state of one bucket: the time at which it is full again, and the
/// last `now` seen (to absorb backward clock steps).
#[derive(Clone, Copy, Debug)]
struct Bucket {
    full_at: UnixMs,
    last: UnixMs,
}

/// Token buckets per (node, call). Memory: at most one entry per enrolled
/// node and call (only authenticated nodes are charged), and full buckets
/// are dropped by [`NodeLimiter::prune`].
#[derive(Debug, Default)]
pub struct NodeLimiter {
    buckets: HashMap<(u64, Call), Bucket>,
}

impl NodeLimiter {
    /// Charges one `call` to `node` at `now`.
    ///
    /// # Errors
    /// A message naming the call, the limit and when to retry, if the
    /// node's bucket is empty; nothing is charged then.
    pub fn check(&mut self, node: u64, call: Call, now: UnixMs) -> Result<(), String> {
        let Limit { burst, refill_ms } = call.limit();
        let b = self.buckets.entry((node, call)).or_insert(Bucket {
            full_at: now,
            last: now,
        });
        if now < b.last {
            // The clock stepped back: the step is not time that passed.
            b.full_at = b.full_at.saturating_sub(b.last.saturating_sub(now));
        }
        b.last = now;
        let start = b.full_at.max(now);
        let tolerance = refill_ms.saturating_mul(i64::from(burst.saturating_sub(1)));
        let after = start.saturating_add(refill_ms);
        if after.saturating_sub(now) > tolerance.saturating_add(refill_ms) {
            let retry_ms = start.saturating_sub(now).saturating_sub(tolerance);
            let retry_s = retry_ms.saturating_add(999) / 1000;
            return Err(format!(
                "{} rate limit exceeded for this node: at most {burst} calls at once, \
                 then one every {} s; retry in {retry_s} s",
                call.name(),
                refill_ms / 1000
            ));
        }
        b.full_at = after;
        Ok(())
    }

    /// Drops the buckets that are full at `now` (they hold no state).
    pub fn prune(&mut self, now: UnixMs) {
        self.buckets.retain(|_, b| b.full_at > now);
    }

    /// How many buckets are held (for tests and metrics).
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// At most one endpoint-driven republish per node per interval; reports in
/// between are kept (the latest wins) and published when the interval ends.
#[derive(Debug)]
pub struct EndpointCoalescer {
    interval_ms: i64,
    last_publish: HashMap<u64, UnixMs>,
    pending: BTreeMap<u64, Vec<String>>,
}

impl EndpointCoalescer {
    pub fn new(interval_ms: i64) -> Self {
        Self {
            interval_ms,
            last_publish: HashMap::new(),
            pending: BTreeMap::new(),
        }
    }

    fn may_publish(&self, node: u64, now: UnixMs) -> bool {
        self.last_publish.get(&node).is_none_or(|&last| {
            // A clock that stepped back does not hold a report forever.
            now < last || now.saturating_sub(last) >= self.interval_ms
        })
    }

    /// Offers a node's newly reported endpoints: returns them if they are to
    /// be published now, or keeps them (replacing any pending ones) for
    /// [`EndpointCoalescer::due`].
    pub fn offer(&mut self, node: u64, endpoints: Vec<String>, now: UnixMs) -> Option<Vec<String>> {
        if self.may_publish(node, now) {
            self.pending.remove(&node);
            self.last_publish.insert(node, now);
            Some(endpoints)
        } else {
            self.pending.insert(node, endpoints);
            None
        }
    }

    /// Whether `node` has a report waiting.
    pub fn has_pending(&self, node: u64) -> bool {
        self.pending.contains_key(&node)
    }

    /// The pending reports whose interval has ended, in node order; they
    /// count as published at `now`. Forgets nodes idle for an interval.
    pub fn due(&mut self, now: UnixMs) -> Vec<(u64, Vec<String>)> {
        let ready: Vec<u64> = self
            .pending
            .keys()
            .copied()
            .filter(|&n| self.may_publish(n, now))
            .collect();
        let mut out = Vec::with_capacity(ready.len());
        for node in ready {
            if let Some(eps) = self.pending.remove(&node) {
                self.last_publish.insert(node, now);
                out.push((node, eps));
            }
        }
        let interval = self.interval_ms;
        let pending = &self.pending;
        self.last_publish.retain(|n, &mut last| {
            pending.contains_key(n) || (now >= last && now.saturating_sub(last) < interval)
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: UnixMs = 1_800_000_000_000;

    #[test]
    fn a_burst_is_allowed_then_one_call_per_refill_period() {
        let mut l = NodeLimiter::default();
        let Limit { burst, refill_ms } = Call::ReportEndpoints.limit();
        for _ in 0..burst {
            l.check(1, Call::ReportEndpoints, T0).unwrap();
        }
        let e = l.check(1, Call::ReportEndpoints, T0).unwrap_err();
        assert!(e.starts_with("ReportEndpoints rate limit exceeded"), "{e}");
        assert!(
            e.contains(&format!("retry in {} s", refill_ms / 1000)),
            "{e}"
        );
        // Other calls and other nodes have their own buckets.
        l.check(1, Call::ReportFlows, T0).unwrap();
        l.check(2, Call::ReportEndpoints, T0).unwrap();
        // One token per refill period.
        assert!(l
            .check(1, Call::ReportEndpoints, T0 + refill_ms - 1)
            .is_err());
        l.check(1, Call::ReportEndpoints, T0 + refill_ms).unwrap();
        assert!(l.check(1, Call::ReportEndpoints, T0 + refill_ms).is_err());
        // Sustained at the refill rate: never refused.
        for i in 2..100 {
            l.check(1, Call::ReportEndpoints, T0 + i * refill_ms)
                .unwrap();
        }
    }

    #[test]
    fn refused_calls_cost_nothing_and_full_buckets_are_pruned() {
        let mut l = NodeLimiter::default();
        let Limit { burst, refill_ms } = Call::StreamOpen.limit();
        for _ in 0..burst {
            l.check(7, Call::StreamOpen, T0).unwrap();
        }
        for _ in 0..1_000 {
            assert!(l.check(7, Call::StreamOpen, T0).is_err());
        }
        l.check(7, Call::StreamOpen, T0 + refill_ms).unwrap();
        assert_eq!(l.len(), 1);
        l.prune(T0 + refill_ms * i64::from(burst) + refill_ms);
        assert!(l.is_empty());
    }

    #[test]
    fn clock_steps_neither_lock_a_node_out_nor_overflow() {
        let mut l = NodeLimiter::default();
        let Limit { burst, .. } = Call::ReportFlows.limit();
        for _ in 0..burst {
            l.check(1, Call::ReportFlows, T0).unwrap();
        }
        // A step back of a day: the node is not refused for a day.
        let back = T0 - 86_400_000;
        assert!(l.check(1, Call::ReportFlows, back).is_err());
        l.check(1, Call::ReportFlows, back + 2_000).unwrap();
        // The ends of the clock.
        l.check(1, Call::ReportFlows, i64::MAX).unwrap();
        let _ = l.check(1, Call::ReportFlows, i64::MIN);
        l.check(2, Call::ReportFlows, i64::MAX).unwrap();
        l.prune(i64::MAX);
    }

    #[test]
    fn endpoint_reports_are_coalesced_and_the_latest_wins() {
        let mut c = EndpointCoalescer::new(5_000);
        let ep = |s: &str| vec![s.to_string()];
        assert_eq!(
            c.offer(1, ep("a"), T0),
            Some(ep("a")),
            "the first is immediate"
        );
        assert_eq!(c.offer(1, ep("b"), T0 + 10), None);
        assert_eq!(c.offer(1, ep("c"), T0 + 20), None);
        assert_eq!(c.offer(2, ep("x"), T0 + 20), Some(ep("x")), "per node");
        assert!(c.has_pending(1));
        assert!(c.due(T0 + 4_999).is_empty());
        assert_eq!(c.due(T0 + 5_000), vec![(1, ep("c"))]);
        assert!(c.due(T0 + 5_001).is_empty());
        // Published at T0 + 5000: the next report waits for T0 + 10000.
        assert_eq!(c.offer(1, ep("d"), T0 + 9_000), None);
        assert_eq!(c.due(T0 + 10_000), vec![(1, ep("d"))]);
        // Idle nodes are forgotten; a clock step back publishes.
        c.due(T0 + 60_000);
        assert!(c.last_publish.is_empty());
        assert!(c.offer(3, ep("e"), T0).is_some());
        assert!(c.offer(3, ep("f"), T0 - 60_000).is_some());
    }
}
