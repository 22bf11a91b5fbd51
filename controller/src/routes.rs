//! Subnet routes and exit nodes (issue 12): what a node may advertise, and
//! which router serves each approved route. Pure: no I/O, no clock.
//!
//! A node advertises prefixes behind it (`ztmesh up --advertise-routes`)
//! and, separately, that it can be an exit node (`--advertise-exit-node`).
//! Nothing is routed until a route is approved (by an admin or by the
//! policy's `autoApprovers`). When several routers have one prefix
//! approved, exactly one is its **primary** — the one peers route it to —
//! and another takes over when the primary goes offline.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

/// An advertisement refused, with the reason (the coordinator answers it
/// as `INVALID_ARGUMENT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidRoute(pub String);

impl std::fmt::Display for InvalidRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Routes one node may advertise at most.
pub const MAX_ROUTES: usize = 64;

/// What advertised routes must stay clear of.
#[derive(Debug, Clone, Default)]
pub struct RouteLimits {
    /// The mesh's overlay prefixes (100.64.0.0/10 and the mesh ULA): a route
    /// there would shadow nodes' own addresses.
    pub overlay: Vec<IpNet>,
    /// Underlay addresses nodes must reach outside the tunnel (the
    /// controller's, the relays'): a route covering one would pull the
    /// control plane into the tunnel it controls.
    pub reserved: Vec<IpAddr>,
}

/// A node's validated advertisement.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Advertisement {
    /// Canonical prefixes, sorted, without duplicates.
    pub routes: Vec<IpNet>,
    /// Whether the node offers to be an exit node.
    pub exit_node: bool,
}

/// Checks what a node advertises.
///
/// # Errors
/// [`InvalidRoute`] naming the first bad route and why: not a CIDR, host bits set
/// (with the canonical form to use), a default route (that is
/// `--advertise-exit-node`), an overlap with the overlay, a prefix covering
/// the controller's or a relay's address, a special-purpose range
/// (loopback, link-local, multicast, unspecified); or more than
/// [`MAX_ROUTES`] routes.
pub fn validate_advertisement(
    routes: &[String],
    exit_node: bool,
    limits: &RouteLimits,
) -> Result<Advertisement, InvalidRoute> {
    if routes.len() > MAX_ROUTES {
        return Err(InvalidRoute(format!(
            "at most {MAX_ROUTES} advertised routes, got {}",
            routes.len()
        )));
    }
    let mut out = Vec::with_capacity(routes.len());
    for (i, text) in routes.iter().enumerate() {
        let shown: String = text.chars().take(64).collect();
        let refuse = |why: String| InvalidRoute(format!("route #{i} {shown:?}: {why}"));
        let net: IpNet = text
            .trim()
            .parse()
            .map_err(|_| refuse("not a CIDR prefix such as 198.19.50.0/24".into()))?;
        if net.trunc() != net {
            return Err(refuse(format!(
                "host bits are set; the prefix is {}",
                net.trunc()
            )));
        }
        if net.prefix_len() == 0 {
            return Err(refuse(
                "a default route is not a subnet route: advertise an exit node instead \
                 (--advertise-exit-node)"
                    .into(),
            ));
        }
        if let Some(why) = special_purpose(&net) {
            return Err(refuse(format!("{why} cannot be routed")));
        }
        if let Some(o) = limits.overlay.iter().find(|o| overlaps(o, &net)) {
            return Err(refuse(format!("overlaps the mesh's overlay range {o}")));
        }
        if let Some(a) = limits.reserved.iter().find(|a| net.contains(*a)) {
            return Err(refuse(format!(
                "covers {a}, which nodes reach outside the tunnel (the controller or a relay)"
            )));
        }
        out.push(net);
    }
    out.sort();
    out.dedup();
    Ok(Advertisement {
        routes: out,
        exit_node,
    })
}

/// Whether two prefixes share an address (one contains the other).
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The special-purpose range `net` falls in or covers, if any.
fn special_purpose(net: &IpNet) -> Option<&'static str> {
    let ranges: [(&str, &str); 7] = [
        ("0.0.0.0/8", "the unspecified range"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("224.0.0.0/3", "multicast and reserved space"),
        ("::/128", "the unspecified address"),
        ("::1/128", "loopback"),
        ("fe80::/10", "link-local"),
    ];
    let multicast6: IpNet = "ff00::/8".parse().expect("static prefix");
    if overlaps(&multicast6, net) {
        return Some("multicast");
    }
    ranges.iter().find_map(|(p, why)| {
        let p: IpNet = p.parse().expect("static prefix");
        overlaps(&p, net).then_some(*why)
    })
}

/// The primary router of every approved route.
///
/// `approved` maps each router to its approved routes; `online` holds the
/// routers connected now; `previous` is the last answer. A prefix keeps its
/// primary while that router is still approved for it and online (no
/// flapping back when an old primary returns); otherwise the lowest-id
/// online router takes over; with none online, the previous primary stays
/// if still approved, else the lowest-id approved router (peers keep a
/// route that will work as soon as it is back).
pub fn primaries(
    approved: &BTreeMap<u64, Vec<IpNet>>,
    online: &BTreeSet<u64>,
    previous: &BTreeMap<IpNet, u64>,
) -> BTreeMap<IpNet, u64> {
    let mut routers: BTreeMap<IpNet, Vec<u64>> = BTreeMap::new();
    for (node, routes) in approved {
        for r in routes {
            routers.entry(*r).or_default().push(*node);
        }
    }
    routers
        .into_iter()
        .map(|(route, nodes)| {
            // `nodes` is sorted: `approved` iterates in id order.
            let prev = previous.get(&route).filter(|p| nodes.contains(p));
            let primary = prev
                .filter(|p| online.contains(p))
                .or_else(|| nodes.iter().find(|n| online.contains(n)))
                .or(prev)
                .or_else(|| nodes.first())
                .copied()
                .expect("every route here has at least one router");
            (route, primary)
        })
        .collect()
}

/// Per router, the routes it is primary for (what goes into its
/// `NodeInfo::routes` for the policy and into peers' AllowedIPs).
pub fn served_by(primaries: &BTreeMap<IpNet, u64>) -> BTreeMap<u64, Vec<IpNet>> {
    let mut out: BTreeMap<u64, Vec<IpNet>> = BTreeMap::new();
    for (route, node) in primaries {
        out.entry(*node).or_default().push(*route);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> RouteLimits {
        RouteLimits {
            overlay: vec![
                "100.64.0.0/10".parse().unwrap(),
                "fd51:7e2a:9c04::/48".parse().unwrap(),
            ],
            reserved: vec!["198.18.0.1".parse().unwrap(), "198.18.0.2".parse().unwrap()],
        }
    }

    fn check(routes: &[&str]) -> Result<Advertisement, InvalidRoute> {
        let routes: Vec<String> = routes.iter().map(|s| (*s).to_owned()).collect();
        validate_advertisement(&routes, false, &limits())
    }

    fn refusal(routes: &[&str]) -> String {
        check(routes).unwrap_err().to_string()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn canonical_routes_come_back_sorted_and_deduplicated() {
        let a = check(&[
            "198.19.60.0/24",
            "198.19.50.0/24",
            "fd00:50::/64",
            "198.19.50.0/24",
        ])
        .unwrap();
        assert_eq!(
            a.routes,
            vec![
                net("198.19.50.0/24"),
                net("198.19.60.0/24"),
                net("fd00:50::/64")
            ]
        );
        assert!(!a.exit_node);
        assert_eq!(check(&[]).unwrap(), Advertisement::default());
    }

    #[test]
    fn each_bad_route_is_named_with_the_reason() {
        let e = refusal(&["198.19.50.0/24", "198.19.50.7/24"]);
        assert!(e.contains("route #1 \"198.19.50.7/24\""), "{e}");
        assert!(e.contains("the prefix is 198.19.50.0/24"), "{e}");
        assert!(refusal(&["nonsense"]).contains("not a CIDR"));
        assert!(refusal(&["198.19.50.0"]).contains("not a CIDR"));
        for default in ["0.0.0.0/0", "::/0"] {
            assert!(
                refusal(&[default]).contains("--advertise-exit-node"),
                "{default}"
            );
        }
        let e = refusal(&["100.64.0.0/16"]);
        assert!(
            e.contains("overlaps the mesh's overlay range 100.64.0.0/10"),
            "{e}"
        );
        // A supernet of the overlay is refused too.
        assert!(refusal(&["100.0.0.0/8"]).contains("overlay"));
        assert!(refusal(&["fd51:7e2a:9c04:5::/64"]).contains("overlay"));
        let e = refusal(&["198.18.0.0/24"]);
        assert!(e.contains("covers 198.18.0.1"), "{e}");
        assert!(refusal(&["127.0.0.0/8"]).contains("loopback"));
        assert!(refusal(&["169.254.1.0/24"]).contains("link-local"));
        assert!(refusal(&["fe80::/64"]).contains("link-local"));
        assert!(refusal(&["ff02::/16"]).contains("multicast"));
        assert!(refusal(&["224.0.0.0/4"]).contains("multicast"));
    }

    #[test]
    fn too_many_routes_are_refused_before_parsing() {
        let many: Vec<String> = (0..=MAX_ROUTES)
            .map(|i| format!("198.19.{i}.0/24"))
            .collect();
        let e = validate_advertisement(&many, false, &limits()).unwrap_err();
        assert!(e.to_string().contains("at most 64"), "{e}");
    }

    #[test]
    fn a_primary_stays_while_online_and_fails_over_to_the_lowest_online_router() {
        let r = net("198.19.50.0/24");
        let approved = BTreeMap::from([(3, vec![r]), (5, vec![r]), (7, vec![r])]);
        let none = BTreeMap::new();
        // First answer: the lowest online.
        let p = primaries(&approved, &BTreeSet::from([5, 7]), &none);
        assert_eq!(p[&r], 5);
        // 3 comes online: 5 stays (no flapping).
        let p = primaries(&approved, &BTreeSet::from([3, 5, 7]), &p);
        assert_eq!(p[&r], 5);
        // 5 goes offline: the lowest online takes over.
        let p = primaries(&approved, &BTreeSet::from([3, 7]), &p);
        assert_eq!(p[&r], 3);
        // Nobody online: the last primary stays.
        let p = primaries(&approved, &BTreeSet::new(), &p);
        assert_eq!(p[&r], 3);
        // Its approval revoked while offline: the lowest approved.
        let approved = BTreeMap::from([(5, vec![r]), (7, vec![r])]);
        let p = primaries(&approved, &BTreeSet::new(), &p);
        assert_eq!(p[&r], 5);
        assert_eq!(served_by(&p), BTreeMap::from([(5, vec![r])]));
    }

    #[test]
    fn routes_are_independent_and_unapproved_routes_have_no_primary() {
        let (a, b) = (net("198.19.50.0/24"), net("198.19.60.0/24"));
        let approved = BTreeMap::from([(1, vec![a]), (2, vec![a, b]), (4, vec![])]);
        let p = primaries(&approved, &BTreeSet::from([2]), &BTreeMap::new());
        assert_eq!(p, BTreeMap::from([(a, 2), (b, 2)]));
        assert_eq!(served_by(&p), BTreeMap::from([(2, vec![a, b])]));
        let p = primaries(&BTreeMap::new(), &BTreeSet::from([1]), &p);
        assert!(p.is_empty());
    }
}
