//! `policy plan`: which node pairs gain or lose which flows between two
//! compiled states (pure: no I/O).

use std::collections::{BTreeMap, BTreeSet};

use crate::compile::{Compiled, NodeView};
use crate::policy::{merge_ports, proto_has_ports, proto_name, PortRange};
use crate::NodeInfo;

/// The flows one (source, destination) node pair gains and loses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowChange {
    /// Source node name.
    pub src: String,
    /// Destination node name.
    pub dst: String,
    /// Newly allowed flows, e.g. `tcp:443`, `udp:53-54`, `tcp:*`, `icmp`.
    pub gained: Vec<String>,
    /// Flows no longer allowed, same format.
    pub lost: Vec<String>,
}

/// Allowed (protocol → ports) from one node to another.
type Flows = BTreeMap<u8, Vec<PortRange>>;

/// Lists the node pairs whose allowed flows differ between `old` and `new`,
/// sorted by source then destination name.
///
/// Nodes are matched by id; a node present on one side only has flows on
/// that side only.
pub fn plan(old: &Compiled, new: &Compiled) -> Vec<FlowChange> {
    let old_nodes: BTreeMap<u64, &NodeInfo> = old.nodes().map(|n| (n.id, n)).collect();
    let new_nodes: BTreeMap<u64, &NodeInfo> = new.nodes().map(|n| (n.id, n)).collect();
    let ids: BTreeSet<u64> = old_nodes.keys().chain(new_nodes.keys()).copied().collect();
    let empty = NodeView::default();
    let mut out = Vec::new();
    for &d in &ids {
        let ov = old.view(d).unwrap_or(&empty);
        let nv = new.view(d).unwrap_or(&empty);
        let same_dst = ov == nv && old_nodes.get(&d) == new_nodes.get(&d);
        for &s in ov.peers.union(&nv.peers) {
            if same_dst && old_nodes.get(&s) == new_nodes.get(&s) {
                continue;
            }
            let of = old_nodes.get(&s).map(|n| flows(ov, n)).unwrap_or_default();
            let nf = new_nodes.get(&s).map(|n| flows(nv, n)).unwrap_or_default();
            let gained = difference(&nf, &of);
            let lost = difference(&of, &nf);
            if gained.is_empty() && lost.is_empty() {
                continue;
            }
            let name = |id: u64| {
                new_nodes
                    .get(&id)
                    .or_else(|| old_nodes.get(&id))
                    .map_or_else(|| id.to_string(), |n| n.name.clone())
            };
            out.push(FlowChange {
                src: name(s),
                dst: name(d),
                gained,
                lost,
            });
        }
    }
    out.sort_by(|a, b| (&a.src, &a.dst).cmp(&(&b.src, &b.dst)));
    out
}

/// What `view`'s rules allow from `src` (any of its addresses).
fn flows(view: &NodeView, src: &NodeInfo) -> Flows {
    let mut f: Flows = BTreeMap::new();
    for rule in &view.inbound {
        let hit = rule
            .src
            .iter()
            .any(|net| src.addresses.iter().any(|a| net.contains(a)));
        if !hit {
            continue;
        }
        for &p in &rule.protocols {
            let ports = if proto_has_ports(p) {
                rule.ports.clone()
            } else {
                vec![PortRange::ALL]
            };
            f.entry(p).or_default().extend(ports);
        }
    }
    for ports in f.values_mut() {
        *ports = merge_ports(std::mem::take(ports));
    }
    f
}

/// Flows in `a` but not in `b`, formatted.
fn difference(a: &Flows, b: &Flows) -> Vec<String> {
    let mut out = Vec::new();
    for (&p, ports) in a {
        let rest = match b.get(&p) {
            Some(other) => subtract(ports, other),
            None => ports.clone(),
        };
        if rest.is_empty() {
            continue;
        }
        if !proto_has_ports(p) {
            out.push(proto_name(p));
            continue;
        }
        for r in rest {
            let ports = if r == PortRange::ALL {
                "*".to_string()
            } else if r.first == r.last {
                r.first.to_string()
            } else {
                format!("{}-{}", r.first, r.last)
            };
            out.push(format!("{}:{ports}", proto_name(p)));
        }
    }
    out
}

/// `a − b` for sorted, merged range lists.
fn subtract(a: &[PortRange], b: &[PortRange]) -> Vec<PortRange> {
    let mut out = Vec::new();
    for r in a {
        let mut start = u32::from(r.first);
        let end = u32::from(r.last);
        for cut in b {
            let (cf, cl) = (u32::from(cut.first), u32::from(cut.last));
            if cl < start || cf > end {
                continue;
            }
            if cf > start {
                out.push(range(start, cf - 1));
            }
            start = cl + 1;
            if start > end {
                break;
            }
        }
        if start <= end {
            out.push(range(start, end));
        }
    }
    out
}

fn range(first: u32, last: u32) -> PortRange {
    // Both bounds come from u16 values and lie within [first, last] of one.
    PortRange {
        first: u16::try_from(first).unwrap_or(u16::MAX),
        last: u16::try_from(last).unwrap_or(u16::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(first: u16, last: u16) -> PortRange {
        PortRange { first, last }
    }

    #[test]
    fn subtract_cuts_holes_and_edges() {
        assert_eq!(
            subtract(&[r(1, 100)], &[r(10, 20)]),
            vec![r(1, 9), r(21, 100)]
        );
        assert_eq!(subtract(&[r(1, 100)], &[r(1, 100)]), vec![]);
        assert_eq!(subtract(&[r(0, 65535)], &[r(0, 65535)]), vec![]);
        assert_eq!(
            subtract(&[r(0, 65535)], &[r(443, 443)]),
            vec![r(0, 442), r(444, 65535)]
        );
        assert_eq!(
            subtract(&[r(5, 5), r(7, 9)], &[r(8, 100)]),
            vec![r(5, 5), r(7, 7)]
        );
        assert_eq!(subtract(&[r(5, 9)], &[]), vec![r(5, 9)]);
    }
}
