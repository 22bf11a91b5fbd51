//! Longest-prefix match over AllowedIPs, IPv4 and IPv6. Pure: no I/O.
//!
//! The prefixes of all peers are compiled into a sorted list of disjoint
//! address intervals, each owned by the peer with the most specific prefix
//! covering it. A lookup is one binary search over a flat array: no hashing, no
//! allocation, no pointer chasing. Rebuilding is O(n log n) and happens only when
//! the peer set changes, which is rare compared to packets.

use std::net::IpAddr;

use ipnet::IpNet;

/// A compiled AllowedIPs table mapping addresses to a value (the peer slot).
#[derive(Debug, Clone, Default)]
pub struct AllowedIps<T: Copy + Eq> {
    v4: Vec<Interval<T>>,
    v6: Vec<Interval<T>>,
}

#[derive(Debug, Clone, Copy)]
struct Interval<T> {
    start: u128,
    end: u128,
    value: T,
}

impl<T: Copy + Eq> AllowedIps<T> {
    /// Builds the table. When the same prefix appears twice, the later entry wins
    /// (as with `wg set`: assigning a prefix to a peer takes it from another).
    pub fn build(entries: impl IntoIterator<Item = (IpNet, T)>) -> Self {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for (seq, (net, value)) in entries.into_iter().enumerate() {
            let net = net.trunc();
            match net {
                IpNet::V4(n) => {
                    let start = u128::from(u32::from(n.network()));
                    let end = u128::from(u32::from(n.broadcast()));
                    v4.push((start, end, seq, value));
                }
                IpNet::V6(n) => {
                    let start = u128::from(n.network());
                    let end = u128::from(n.broadcast());
                    v6.push((start, end, seq, value));
                }
            }
        }
        Self {
            v4: compile(v4),
            v6: compile(v6),
        }
    }

    /// The value of the most specific prefix containing `addr`.
    pub fn lookup(&self, addr: IpAddr) -> Option<T> {
        let (table, key) = match addr {
            IpAddr::V4(a) => (&self.v4, u128::from(u32::from(a))),
            IpAddr::V6(a) => (&self.v6, u128::from(a)),
        };
        let i = table.partition_point(|iv| iv.start <= key);
        let iv = table.get(i.checked_sub(1)?)?;
        (key <= iv.end).then_some(iv.value)
    }

    /// Number of disjoint intervals (a measure of table size).
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// True when no prefix is configured.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Turns CIDR ranges (which are either nested or disjoint) into disjoint
/// intervals owned by the innermost range.
fn compile<T: Copy + Eq>(mut ranges: Vec<(u128, u128, usize, T)>) -> Vec<Interval<T>> {
    // Outer ranges first at equal start; for an identical range the later entry
    // (higher seq) sorts last and so becomes the innermost.
    ranges.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
    let mut out: Vec<Interval<T>> = Vec::new();
    let mut stack: Vec<(u128, T)> = Vec::new();
    // Next address not yet emitted; None once u128::MAX has been emitted.
    let mut cursor: Option<u128> = Some(0);
    let emit = |out: &mut Vec<Interval<T>>, cursor: &mut Option<u128>, end: u128, value: T| {
        if let Some(start) = *cursor {
            if start <= end {
                match out.last_mut() {
                    Some(last) if last.value == value && last.end.checked_add(1) == Some(start) => {
                        last.end = end
                    }
                    _ => out.push(Interval { start, end, value }),
                }
                *cursor = end.checked_add(1);
            }
        }
    };
    for (start, end, _, value) in ranges {
        while let Some(&(top_end, top_value)) = stack.last() {
            if top_end >= start {
                break;
            }
            emit(&mut out, &mut cursor, top_end, top_value);
            stack.pop();
        }
        if let Some(&(_, top_value)) = stack.last() {
            if start > 0 {
                emit(&mut out, &mut cursor, start - 1, top_value);
            }
        }
        if cursor.is_some_and(|c| c < start) {
            cursor = Some(start);
        }
        stack.push((end, value));
    }
    while let Some((top_end, top_value)) = stack.pop() {
        emit(&mut out, &mut cursor, top_end, top_value);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn most_specific_prefix_wins() {
        // The overlapping-ranges case of WireGuard's netns.sh.
        let t = AllowedIps::build([
            (net("100.64.0.0/10"), 1),
            (net("100.64.1.0/24"), 2),
            (net("100.64.1.128/25"), 3),
            (net("100.64.1.129/32"), 4),
            (net("::/0"), 5),
            (net("fd00::/48"), 6),
        ]);
        assert_eq!(t.lookup(ip("100.64.0.1")), Some(1));
        assert_eq!(t.lookup(ip("100.64.1.1")), Some(2));
        assert_eq!(t.lookup(ip("100.64.1.130")), Some(3));
        assert_eq!(t.lookup(ip("100.64.1.129")), Some(4));
        assert_eq!(t.lookup(ip("100.64.2.0")), Some(1));
        assert_eq!(t.lookup(ip("100.128.0.0")), None);
        assert_eq!(t.lookup(ip("198.18.0.1")), None);
        assert_eq!(t.lookup(ip("fd00::1")), Some(6));
        assert_eq!(t.lookup(ip("fd01::1")), Some(5));
        assert_eq!(
            t.lookup(ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")),
            Some(5)
        );
    }

    #[test]
    fn later_duplicate_prefix_wins_and_default_routes_cover_everything() {
        let t = AllowedIps::build([
            (net("0.0.0.0/0"), 1),
            (net("100.64.0.0/10"), 2),
            (net("100.64.0.0/10"), 3),
        ]);
        assert_eq!(t.lookup(ip("100.64.0.1")), Some(3));
        assert_eq!(t.lookup(ip("0.0.0.0")), Some(1));
        assert_eq!(t.lookup(ip("255.255.255.255")), Some(1));
        assert!(AllowedIps::<u8>::build([]).lookup(ip("1.2.3.4")).is_none());
    }

    fn linear(entries: &[(IpNet, u32)], addr: IpAddr) -> Option<u32> {
        let mut best: Option<(u8, usize, u32)> = None;
        for (i, (n, v)) in entries.iter().enumerate() {
            if n.contains(&addr) {
                let key = (n.prefix_len(), i, *v);
                if best.is_none_or(|b| (key.0, key.1) > (b.0, b.1)) {
                    best = Some(key);
                }
            }
        }
        best.map(|b| b.2)
    }

    /// As wireguard-go's allowedips_rand_test.go: random prefixes, random
    /// lookups, compared against a linear scan. Seeded, so deterministic.
    #[test]
    fn matches_linear_scan_on_random_tables() {
        let mut rng = StdRng::seed_from_u64(0x5eed);
        for round in 0..40 {
            let n = rng.gen_range(1..200);
            let mut entries = Vec::new();
            for _ in 0..n {
                let v = rng.gen_range(0..16u32);
                if rng.gen_bool(0.5) {
                    // Cluster addresses so that prefixes nest often.
                    let a = Ipv4Addr::from(0x6440_0000 | (rng.gen::<u32>() & 0x0000_0fff));
                    let len = rng.gen_range(16..=32);
                    entries.push((IpNet::new(IpAddr::V4(a), len).unwrap().trunc(), v));
                } else {
                    let a = Ipv6Addr::from((0xfd00u128 << 112) | u128::from(rng.gen::<u16>()));
                    let len = rng.gen_range(100..=128);
                    entries.push((IpNet::new(IpAddr::V6(a), len).unwrap().trunc(), v));
                }
            }
            let t = AllowedIps::build(entries.iter().copied());
            for _ in 0..2000 {
                let addr = if rng.gen_bool(0.5) {
                    IpAddr::V4(Ipv4Addr::from(
                        0x6440_0000 | (rng.gen::<u32>() & 0x0000_1fff),
                    ))
                } else {
                    IpAddr::V6(Ipv6Addr::from(
                        (0xfd00u128 << 112) | u128::from(rng.gen::<u16>()),
                    ))
                };
                assert_eq!(
                    t.lookup(addr),
                    linear(&entries, addr),
                    "round {round} {addr}"
                );
            }
        }
    }
}
