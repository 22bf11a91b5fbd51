//! The enrolled nodes and the indexes enrollment, authentication and the
//! detectors need: by machine key, WireGuard key, name and overlay address.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::Ipv6Net;

use crate::model::NodeRow;
use crate::UnixMs;

/// 100.64.0.0, the base of the overlay IPv4 range (100.64.0.0/10).
const V4_BASE: u32 = 0x6440_0000;

/// Offsets into 100.64.0.0/10 (22 bits).
const V4_OFFSETS: u32 = 1 << 22;

fn v4_offset(a: Ipv4Addr) -> u32 {
    u32::from(a).wrapping_sub(V4_BASE)
}

/// Every overlay IPv4 address is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exhausted;

/// Nodes by id, with their indexes kept in step.
#[derive(Debug, Default)]
pub struct NodeTable {
    nodes: BTreeMap<u64, NodeRow>,
    by_machine_key: HashMap<[u8; 32], u64>,
    by_wg_key: HashMap<[u8; 32], u64>,
    by_name: HashMap<String, u64>,
    /// Overlay IPv4 addresses in use, and by whom.
    used_v4: HashMap<Ipv4Addr, u64>,
    /// Every offset below this one is taken, so the search for a free
    /// address starts here (amortized O(1) per enrollment).
    v4_hint: u32,
}

impl NodeTable {
    /// Adds or replaces a node; returns the row it replaced.
    pub fn insert(&mut self, row: NodeRow) -> Option<NodeRow> {
        let old = self.remove(row.id);
        self.by_machine_key.insert(row.machine_key, row.id);
        self.by_wg_key.insert(row.wg_key, row.id);
        self.by_name.insert(row.name.clone(), row.id);
        self.used_v4.insert(row.ipv4, row.id);
        self.nodes.insert(row.id, row);
        old
    }

    /// Removes a node and its index entries.
    pub fn remove(&mut self, id: u64) -> Option<NodeRow> {
        let row = self.nodes.remove(&id)?;
        self.by_machine_key.remove(&row.machine_key);
        self.by_wg_key.remove(&row.wg_key);
        self.by_name.remove(&row.name);
        self.used_v4.remove(&row.ipv4);
        self.v4_hint = self.v4_hint.min(v4_offset(row.ipv4));
        Some(row)
    }

    pub fn get(&self, id: u64) -> Option<&NodeRow> {
        self.nodes.get(&id)
    }

    /// Records when a node was last seen (no index depends on it).
    pub fn set_last_seen(&mut self, id: u64, ms: UnixMs) {
        if let Some(n) = self.nodes.get_mut(&id) {
            n.last_seen_ms = ms;
        }
    }

    pub fn by_machine_key(&self, key: &[u8; 32]) -> Option<&NodeRow> {
        self.by_machine_key
            .get(key)
            .and_then(|id| self.nodes.get(id))
    }

    pub fn by_wg_key(&self, key: &[u8; 32]) -> Option<&NodeRow> {
        self.by_wg_key.get(key).and_then(|id| self.nodes.get(id))
    }

    /// The node with overlay address `ip`. An IPv6 address is found through
    /// the IPv4 address of the same offset ([`NodeTable::allocate`] gives a
    /// node both), then checked.
    pub fn by_address(&self, ip: IpAddr) -> Option<&NodeRow> {
        let v4 = match ip {
            IpAddr::V4(a) => a,
            IpAddr::V6(a) => {
                let o = a.octets();
                Ipv4Addr::from(
                    V4_BASE.wrapping_add(u32::from_be_bytes([o[12], o[13], o[14], o[15]])),
                )
            }
        };
        let n = self.nodes.get(self.used_v4.get(&v4)?)?;
        let same = match ip {
            IpAddr::V4(a) => n.ipv4 == a,
            IpAddr::V6(a) => n.ipv6 == a,
        };
        same.then_some(n)
    }

    pub fn by_name(&self, name: &str) -> Option<&NodeRow> {
        self.by_name.get(name).and_then(|id| self.nodes.get(id))
    }

    /// The nodes, in id order.
    pub fn iter(&self) -> impl Iterator<Item = &NodeRow> {
        self.nodes.values()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// `base`, or `base-2`, `base-3`, … : the first name no node has.
    pub fn unique_name(&self, base: &str) -> String {
        let taken = |n: &str| self.by_name.contains_key(n);
        if !taken(base) {
            return base.to_string();
        }
        (2..)
            .map(|i| format!("{base}-{i}"))
            .find(|n| !taken(n))
            .expect("an unbounded range always finds a free name")
    }

    /// The lowest free overlay address pair: an IPv4 address in
    /// 100.64.0.0/10 and the IPv6 address in `ula` with the same offset.
    ///
    /// The network address and the .0/.255 of each /24 are skipped, so no
    /// address looks like a broadcast to a confused host stack.
    ///
    /// # Errors
    /// [`Exhausted`] when every address is taken.
    pub fn allocate(&mut self, ula: Ipv6Net) -> Result<(Ipv4Addr, Ipv6Addr), Exhausted> {
        self.allocate_skipping(ula, 0)
    }

    /// [`NodeTable::allocate`], searching from `skip` offsets past where
    /// it would search (everything below that is taken), round to there
    /// if nothing further on is free. Two
    /// controllers enrolling at once both pick the lowest free pair; the
    /// one that lost the race retries with a random skip instead of
    /// meeting the other at the next address again.
    ///
    /// # Errors
    /// [`Exhausted`] when every address is taken.
    pub fn allocate_skipping(
        &mut self,
        ula: Ipv6Net,
        skip: u32,
    ) -> Result<(Ipv4Addr, Ipv6Addr), Exhausted> {
        let low = self.v4_hint.max(1);
        let start = low.saturating_add(skip).min(V4_OFFSETS);
        let offset = (start..V4_OFFSETS)
            .chain(low..start)
            .filter(|o| o & 0xff != 0 && o & 0xff != 0xff)
            .find(|o| !self.used_v4.contains_key(&Ipv4Addr::from(V4_BASE + o)))
            .ok_or(Exhausted)?;
        if skip == 0 {
            // Below it everything is taken; with a skip, not so.
            self.v4_hint = offset;
        }
        let mut v6 = ula.network().octets();
        v6[12..16].copy_from_slice(&offset.to_be_bytes());
        Ok((Ipv4Addr::from(V4_BASE + offset), Ipv6Addr::from(v6)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skip_leaves_the_lowest_free_addresses_for_later() {
        let ula: Ipv6Net = "fd7a:1:2::/48".parse().unwrap();
        let mut t = NodeTable::default();
        let (a, _) = t.allocate(ula).unwrap();
        assert_eq!(a, Ipv4Addr::new(100, 64, 0, 1));
        t.insert(row(1, "a", a));
        let (b, b6) = t.allocate_skipping(ula, 1000).unwrap();
        assert_eq!(
            b,
            Ipv4Addr::from(V4_BASE + 1001),
            "1000 past the search start"
        );
        assert_eq!(b6.octets()[12..], 1001u32.to_be_bytes());
        t.insert(row(2, "b", b));
        // The lowest free is still .2.
        assert_eq!(t.allocate(ula).unwrap().0, Ipv4Addr::new(100, 64, 0, 2));
        // A skip past the end goes round to the lowest free.
        assert_eq!(
            t.allocate_skipping(ula, u32::MAX).unwrap().0,
            Ipv4Addr::new(100, 64, 0, 2)
        );
    }

    fn row(id: u64, name: &str, v4: Ipv4Addr) -> NodeRow {
        NodeRow {
            id,
            name: name.into(),
            hostname: name.into(),
            machine_key: [id as u8; 32],
            wg_key: [id as u8; 32],
            ipv4: v4,
            ipv6: Ipv6Addr::LOCALHOST,
            user: None,
            tags: vec![],
            ephemeral: false,
            created_ms: 0,
            last_seen_ms: 0,
            expiry_ms: 0,
            endpoints: vec![],
            key_revoked: false,
            routes: Default::default(),
            posture: Default::default(),
            quarantine: None,
        }
    }

    #[test]
    fn allocation_takes_the_lowest_free_address_and_reuses_freed_ones() {
        let ula: Ipv6Net = "fd00:1:2::/48".parse().unwrap();
        let mut t = NodeTable::default();
        let (a, a6) = t.allocate(ula).unwrap();
        assert_eq!(a, Ipv4Addr::new(100, 64, 0, 1));
        assert_eq!(a6, "fd00:1:2::1".parse::<Ipv6Addr>().unwrap());
        t.insert(row(1, "a", a));
        let (b, _) = t.allocate(ula).unwrap();
        assert_eq!(b, Ipv4Addr::new(100, 64, 0, 2));
        t.insert(row(2, "b", b));
        t.remove(1);
        assert_eq!(t.allocate(ula).unwrap().0, a, "a freed address is reused");
        assert_eq!(t.by_name("b").map(|n| n.id), Some(2));
        assert!(t.by_name("a").is_none());
        assert_eq!(t.by_machine_key(&[2; 32]).map(|n| n.id), Some(2));
        assert_eq!(t.by_wg_key(&[2; 32]).map(|n| n.id), Some(2));
        assert!(t.by_wg_key(&[1; 32]).is_none());
    }

    #[test]
    fn nodes_are_found_by_either_overlay_address_and_only_by_their_own() {
        let ula: Ipv6Net = "fd00:1:2::/48".parse().unwrap();
        let mut t = NodeTable::default();
        let (a, a6) = t.allocate(ula).unwrap();
        t.insert(NodeRow {
            ipv6: a6,
            ..row(1, "a", a)
        });
        let (b, _) = t.allocate(ula).unwrap();
        t.insert(row(2, "b", b));
        let id = |ip: &str| t.by_address(ip.parse().unwrap()).map(|n| n.id);
        assert_eq!(id("100.64.0.1"), Some(1));
        assert_eq!(id("fd00:1:2::1"), Some(1));
        assert_eq!(id("100.64.0.2"), Some(2));
        // b's IPv6 address is not the one of its offset: not found that way.
        assert_eq!(id("fd00:1:2::2"), None);
        assert_eq!(id("fd00:9:9::1"), None, "another prefix, same offset");
        assert_eq!(id("100.64.0.3"), None);
        t.remove(1);
        assert!(t.by_address("100.64.0.1".parse().unwrap()).is_none());
    }

    #[test]
    fn broadcast_looking_addresses_are_skipped() {
        let ula: Ipv6Net = "fd00:1:2::/48".parse().unwrap();
        let mut t = NodeTable::default();
        for i in 1..=254u64 {
            let (a, _) = t.allocate(ula).unwrap();
            t.insert(row(i, &format!("n{i}"), a));
        }
        let (next, _) = t.allocate(ula).unwrap();
        assert_eq!(next, Ipv4Addr::new(100, 64, 1, 1), "skips .255 and .0");
    }

    #[test]
    fn unique_names_count_up() {
        let mut t = NodeTable::default();
        t.insert(row(1, "web", Ipv4Addr::new(100, 64, 0, 1)));
        t.insert(row(2, "web-2", Ipv4Addr::new(100, 64, 0, 2)));
        assert_eq!(t.unique_name("web"), "web-3");
        assert_eq!(t.unique_name("db"), "db");
    }
}
