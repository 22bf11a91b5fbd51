//! What this node's MagicDNS answers from: the mesh domain, the names and
//! overlay addresses of the nodes in its netmap, the split DNS routes and
//! the upstream resolvers (pure: no I/O).
//!
//! A [`Zone`] is rebuilt from every installed netmap
//! ([`Zone::from_netmap`]): a node the policy hides from this node is not
//! in its map, so it does not resolve here.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use ztmesh_proto::control as pb;

use super::name::{labels, normalize_name, valid_label};

/// The mesh domain when the netmap names none (or an invalid one).
pub const DEFAULT_DOMAIN: &str = "ztmesh.internal";

/// The address MagicDNS listens on; never a forwarding target (it would
/// loop back to this node).
pub const MAGIC_DNS_ADDR: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 100);

/// The IPv4 overlay range: reverse lookups inside it are answered here.
const OVERLAY_V4: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(100, 64, 0, 0), 10);

/// The IPv6 overlay is the mesh's ULA /48 (the controller allocates node
/// addresses inside one /48); it is taken from this node's own address.
const OVERLAY_V6_LEN: u8 = 48;

/// A node's overlay addresses.
pub type Addrs = (Vec<Ipv4Addr>, Vec<Ipv6Addr>);

/// The data MagicDNS answers from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    /// The mesh domain, lowercase, without the trailing dot.
    domain: String,
    /// `domain` as labels, for matching query names.
    domain_labels: Vec<Vec<u8>>,
    /// Node name (one lowercase label) → its overlay addresses.
    records: BTreeMap<String, Addrs>,
    /// Overlay address → node name, for PTR answers.
    reverse: BTreeMap<IpAddr, String>,
    /// Overlay prefixes: a reverse lookup inside them that names no node
    /// is NXDOMAIN here rather than a question for the upstreams.
    overlay: Vec<IpNet>,
    /// Split DNS: suffix (lowercase, no trailing dot) → resolvers, sorted
    /// by suffix.
    split: Vec<(String, Vec<SocketAddr>)>,
    /// Each split suffix as labels, in the order of `split`.
    split_labels: Vec<Vec<Vec<u8>>>,
    /// Where every other name goes.
    upstreams: Vec<SocketAddr>,
}

impl Default for Zone {
    /// The zone before the first netmap: the default domain, no names, no
    /// split routes, no upstreams.
    fn default() -> Zone {
        Zone::new(DEFAULT_DOMAIN, Vec::new())
    }
}

impl Zone {
    /// A zone with no names: `domain` (normalized; the default domain if
    /// invalid) and the upstream resolvers.
    ///
    /// Upstreams at [`MAGIC_DNS_ADDR`] are dropped (they would loop).
    pub fn new(domain: &str, upstreams: Vec<SocketAddr>) -> Zone {
        let domain = normalize_name(domain).unwrap_or_else(|| DEFAULT_DOMAIN.to_string());
        let mut kept: Vec<SocketAddr> = Vec::with_capacity(upstreams.len());
        for u in upstreams {
            if !is_self(u) && !kept.contains(&u) {
                kept.push(u);
            }
        }
        Zone {
            domain_labels: labels(&domain),
            domain,
            records: BTreeMap::new(),
            reverse: BTreeMap::new(),
            overlay: vec![IpNet::V4(OVERLAY_V4)],
            split: Vec::new(),
            split_labels: Vec::new(),
            upstreams: kept,
        }
    }

    /// Builds the zone of a netmap: this node and its peers by name, the
    /// map's split DNS routes, and `upstreams` for everything else.
    ///
    /// - The domain is `map.dns_domain` (lowercased, trailing dot dropped),
    ///   or [`DEFAULT_DOMAIN`] when it is empty or not a valid DNS name.
    /// - Names are lowercased; a name that is not one valid label
    ///   (1-63 of `[a-z0-9-]`, no `-` at either end) is skipped. When two
    ///   nodes share a name, the first keeps it (this node, then the peers
    ///   in map order) and the other is skipped, so a name never resolves
    ///   to two nodes.
    /// - This node's addresses are all of `self_node.addresses`; a peer's
    ///   are the first `/32` and the first `/128` of its `allowed_ips`
    ///   (the entries after them are routes it serves).
    /// - Split routes: an invalid suffix, a suffix at or under the mesh
    ///   domain (the node answers those itself) and a repeated suffix are
    ///   skipped; unparseable resolvers and resolvers at
    ///   100.100.100.100 are dropped. A suffix left without resolvers is
    ///   kept: its names are answered SERVFAIL rather than leaked to the
    ///   upstreams.
    pub fn from_netmap(map: &pb::NetMap, upstreams: Vec<SocketAddr>) -> Zone {
        let mut zone = Zone::new(&map.dns_domain, upstreams);
        if let Some(me) = &map.self_node {
            let mut v4 = Vec::new();
            let mut v6 = Vec::new();
            for a in &me.addresses {
                match parse_host(a) {
                    Some(IpAddr::V4(ip)) => v4.push(ip),
                    Some(IpAddr::V6(ip)) => {
                        if let Ok(net) = Ipv6Net::new(ip, OVERLAY_V6_LEN) {
                            let net = IpNet::V6(net.trunc());
                            if !zone.overlay.contains(&net) {
                                zone.overlay.push(net);
                            }
                        }
                        v6.push(ip);
                    }
                    None => {}
                }
            }
            zone.insert(&me.name, v4, v6);
        }
        for peer in &map.peers {
            let hosts: Vec<IpAddr> = peer
                .allowed_ips
                .iter()
                .filter_map(|a| parse_host(a))
                .collect();
            let v4 = hosts.iter().find_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            });
            let v6 = hosts.iter().find_map(|ip| match ip {
                IpAddr::V6(v6) => Some(*v6),
                IpAddr::V4(_) => None,
            });
            zone.insert(
                &peer.name,
                v4.into_iter().collect(),
                v6.into_iter().collect(),
            );
        }
        let mut split: BTreeMap<String, Vec<SocketAddr>> = BTreeMap::new();
        let domain = zone.domain.clone();
        for route in &map.split_dns {
            let Some(suffix) = normalize_name(&route.suffix) else {
                continue;
            };
            if suffix == domain || suffix.ends_with(&format!(".{domain}")) {
                continue;
            }
            if split.contains_key(&suffix) {
                continue;
            }
            let mut resolvers: Vec<SocketAddr> = Vec::new();
            for r in &route.resolvers {
                if let Some(addr) = parse_resolver(r) {
                    if !is_self(addr) && !resolvers.contains(&addr) {
                        resolvers.push(addr);
                    }
                }
            }
            split.insert(suffix, resolvers);
        }
        zone.split_labels = split.keys().map(|s| labels(s)).collect();
        zone.split = split.into_iter().collect();
        zone
    }

    /// The mesh domain, lowercase, without the trailing dot.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Node name (one lowercase label) → its overlay addresses.
    pub fn records(&self) -> &BTreeMap<String, Addrs> {
        &self.records
    }

    /// The split DNS routes, sorted by suffix.
    pub fn split(&self) -> &[(String, Vec<SocketAddr>)] {
        &self.split
    }

    /// The upstream resolvers for names outside the domain and the split
    /// suffixes.
    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// The domain as lowercase labels.
    pub(crate) fn domain_labels(&self) -> &[Vec<u8>] {
        &self.domain_labels
    }

    /// Each split route as (suffix labels, resolvers).
    pub(crate) fn split_routes(&self) -> impl Iterator<Item = (&[Vec<u8>], &[SocketAddr])> {
        self.split_labels
            .iter()
            .zip(&self.split)
            .map(|(l, (_, r))| (l.as_slice(), r.as_slice()))
    }

    /// The node name an overlay address belongs to.
    pub(crate) fn name_of(&self, ip: IpAddr) -> Option<&str> {
        self.reverse.get(&ip).map(String::as_str)
    }

    /// Whether `ip` lies in the overlay (its reverse name is ours to answer).
    pub(crate) fn in_overlay(&self, ip: IpAddr) -> bool {
        self.overlay.iter().any(|net| net.contains(&ip))
    }

    fn insert(&mut self, name: &str, v4: Vec<Ipv4Addr>, v6: Vec<Ipv6Addr>) {
        let name = name.to_ascii_lowercase();
        if !valid_label(&name) || self.records.contains_key(&name) {
            return;
        }
        for ip in v4
            .iter()
            .map(|a| IpAddr::V4(*a))
            .chain(v6.iter().map(|a| IpAddr::V6(*a)))
        {
            self.reverse.entry(ip).or_insert_with(|| name.clone());
        }
        self.records.insert(name, (v4, v6));
    }
}

/// A host prefix (`/32`, `/128`) or a bare address; `None` for anything else.
fn parse_host(text: &str) -> Option<IpAddr> {
    if let Ok(net) = text.parse::<IpNet>() {
        return (net.prefix_len() == net.max_prefix_len()).then(|| net.addr());
    }
    text.parse().ok()
}

/// A resolver as the netmap writes it: `ip` (port 53), `ip:port` or `[ip6]:port`.
fn parse_resolver(text: &str) -> Option<SocketAddr> {
    let addr = match text.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, 53),
        Err(_) => text.parse().ok()?,
    };
    (addr.port() != 0 && !addr.ip().is_unspecified()).then_some(addr)
}

/// Whether a resolver address is this node's own MagicDNS listener.
fn is_self(addr: SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V4(v4) => v4 == MAGIC_DNS_ADDR,
        IpAddr::V6(v6) => v6.to_ipv4_mapped() == Some(MAGIC_DNS_ADDR),
    }
}
