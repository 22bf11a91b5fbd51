//! Prefix arithmetic for subnet routes and exit nodes: the internet prefix
//! set of `autogroup:internet`, prefix intersection (pure: no I/O).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::OnceLock;

use ipnet::IpNet;

/// What `autogroup:internet` leaves out of `0.0.0.0/0` and `::/0`.
///
/// An exit node forwards to "the internet", not into the networks around
/// it: the overlay (a peer's address must never leave through an exit
/// node), loopback, link-local and multicast (never forwarded), and the
/// private ranges (RFC 1918; IPv6 unique local `fc00::/7`, which also holds
/// the overlay's `fd00::/8`). An exit node's own LANs are reached through
/// subnet routes, which an ACL grants by address, never as "internet".
/// `::/8` (loopback, unspecified, IPv4-mapped) is left out whole: none of it
/// is a global destination, and excluding `::1/128` alone would split
/// `::/0` into ~120 prefixes.
const NOT_INTERNET: &[(IpAddr, u8)] = &[
    (IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0)), 8), // RFC 1918
    (IpAddr::V4(Ipv4Addr::new(100, 64, 0, 0)), 10), // overlay (CGNAT range)
    (IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8), // loopback
    (IpAddr::V4(Ipv4Addr::new(169, 254, 0, 0)), 16), // link-local
    (IpAddr::V4(Ipv4Addr::new(172, 16, 0, 0)), 12), // RFC 1918
    (IpAddr::V4(Ipv4Addr::new(192, 168, 0, 0)), 16), // RFC 1918
    (IpAddr::V4(Ipv4Addr::new(224, 0, 0, 0)), 4), // multicast
    (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 8),      // loopback, unspecified, mapped
    (IpAddr::V6(Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0)), 7), // ULA, overlay
    (IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0)), 10), // link-local
    (IpAddr::V6(Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0)), 8), // multicast
];

/// The destinations `autogroup:internet` grants: `0.0.0.0/0` and `::/0`
/// minus the overlay, loopback, link-local, multicast and private ranges.
///
/// Sorted, non-overlapping; the `dst` of every `autogroup:internet` rule of
/// an exit node. `198.18.0.0/15` (benchmarking) is internet.
pub fn internet_prefixes() -> &'static [IpNet] {
    static SET: OnceLock<Vec<IpNet>> = OnceLock::new();
    SET.get_or_init(|| {
        let holes: Vec<IpNet> = NOT_INTERNET
            .iter()
            .map(|&(a, len)| IpNet::new(a, len).expect("prefix lengths above are valid"))
            .collect();
        let mut out = Vec::new();
        for all in default_routes() {
            minus(all, &holes, &mut out);
        }
        out.sort_unstable();
        out
    })
}

/// Whether `addr` is in [`internet_prefixes`].
pub(crate) fn is_internet(addr: &IpNet) -> bool {
    internet_prefixes().iter().any(|n| n.contains(addr))
}

/// `0.0.0.0/0` and `::/0`: every address, and the route of an exit node.
pub fn default_routes() -> [IpNet; 2] {
    [
        IpNet::new(IpAddr::from([0u8; 4]), 0).expect("prefix length 0 is valid"),
        IpNet::new(IpAddr::from([0u16; 8]), 0).expect("prefix length 0 is valid"),
    ]
}

/// The intersection of two prefixes: the smaller one when they nest,
/// `None` when they are disjoint (two prefixes never partly overlap).
pub(crate) fn intersect(a: &IpNet, b: &IpNet) -> Option<IpNet> {
    if a.contains(b) {
        Some(*b)
    } else if b.contains(a) {
        Some(*a)
    } else {
        None
    }
}

/// Appends `net` minus every prefix of `holes` to `out`.
fn minus(net: IpNet, holes: &[IpNet], out: &mut Vec<IpNet>) {
    if holes.iter().any(|h| h.contains(&net)) {
        return;
    }
    if !holes.iter().any(|h| net.contains(h)) {
        out.push(net);
        return;
    }
    // A hole lies strictly inside `net`, so `net` is not a host prefix.
    let halves = net
        .subnets(net.prefix_len() + 1)
        .expect("a prefix holding a smaller one can be split");
    for half in halves {
        minus(half, holes, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("test prefix")
    }

    #[test]
    fn internet_excludes_overlay_private_and_local_ranges() {
        for inside in ["198.18.0.1/32", "198.19.50.0/24", "2001:db8::1/128"] {
            assert!(is_internet(&net(inside)), "{inside}");
        }
        for outside in [
            "100.64.0.1/32",
            "100.127.255.255/32",
            "fd00::1/128",
            "fd7a:115c:a1e0::1/128",
            "127.0.0.1/32",
            "169.254.1.1/32",
            "224.0.0.251/32",
            "ff02::1/128",
            "fe80::1/128",
            "::1/128",
        ] {
            assert!(!is_internet(&net(outside)), "{outside}");
        }
        // Every excluded range (the private ones included), from the table
        // itself: its whole prefix and a host inside it are not internet.
        for &(addr, len) in NOT_INTERNET {
            let range = IpNet::new(addr, len).unwrap();
            assert!(!is_internet(&range), "{range}");
            let host =
                IpNet::new(range.hosts().next().unwrap_or(addr), range.max_prefix_len()).unwrap();
            assert!(!is_internet(&host), "{host}");
        }
    }

    #[test]
    fn internet_set_is_sorted_disjoint_and_compact() {
        let set = internet_prefixes();
        assert!(set.windows(2).all(|w| w[0] < w[1]));
        for (i, a) in set.iter().enumerate() {
            for b in &set[i + 1..] {
                assert!(intersect(a, b).is_none(), "{a} overlaps {b}");
            }
        }
        assert!(set.len() <= 64, "{} prefixes", set.len());
        assert_eq!(IpNet::aggregate(&set.to_vec()), set.to_vec());
    }

    #[test]
    fn intersect_keeps_the_smaller_of_nested_prefixes() {
        let route = net("198.19.50.0/24");
        assert_eq!(
            intersect(&route, &net("198.19.50.10/32")),
            Some(net("198.19.50.10/32"))
        );
        assert_eq!(intersect(&net("198.19.0.0/16"), &route), Some(route));
        assert_eq!(intersect(&route, &net("198.19.51.0/24")), None);
        assert_eq!(intersect(&route, &net("fd00::/8")), None);
    }
}
