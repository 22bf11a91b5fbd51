//! Direct evaluation of the ACL list for one flow: `explain` and the `tests`
//! section (pure: no I/O).
//!
//! This is deliberately the naive reading of the policy — walk the entries in
//! order, match selectors against identities, check the source's posture —
//! so that it doubles as the reference the compiled per-node rules are
//! property-tested against.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use ipnet::IpNet;

use crate::error::{PolicyError, Sink};
use crate::policy::{proto_has_ports, proto_name, Entry, Gate, Identity, Policy, SelKind};
use crate::routes::is_internet;
use crate::{Attributes, NodeInfo};

/// The verdict of [`Policy::explain`] and the reason for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// Whether the flow is allowed.
    pub allowed: bool,
    /// `FILE:LINE` of the first ACL entry that accepts the flow.
    pub rule_id: Option<String>,
    /// Human-readable reason, e.g. `no rule matches`; for a denied flow
    /// that a rule would accept but for the source's posture, followed by
    /// the first line of `posture`.
    pub detail: String,
    /// One line per ACL entry, before the accepting one (if any), that
    /// matches the flow except for its posture requirement, in ACL order:
    /// `FILE:LINE requires posture:compliant; node laptop fails it:
    /// custom:compliant == true: seen false (set by an admin)`.
    pub posture: Vec<String>,
}

/// Where a flow's source posture comes from, for the message when there
/// is none.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Context {
    /// `explain`: a node has its attributes; a user, group, tag or an
    /// address that is no node's has no device.
    Explain,
    /// The `tests` section: the test's `srcPostureAttrs`, if given.
    Tests,
}

/// An identity with node references resolved, for matching.
#[derive(Clone, Copy)]
enum Who<'a> {
    User(&'a str),
    Group(&'a str, &'a BTreeSet<String>),
    Tag(&'a str),
    /// An address or CIDR with no node set to place it in (a `tests`
    /// destination, any source): matched by the policy text alone.
    Addr(IpNet),
    Node(&'a NodeInfo),
    /// A destination address of `explain` that is no node's own, placed
    /// against the node set.
    Dest(Placed),
}

/// Where an `explain` destination address lies in the mesh.
#[derive(Clone, Copy)]
struct Placed {
    addr: IpNet,
    /// The node with addresses whose route (the longest) holds it, and that route.
    router: Option<(u64, IpNet)>,
    /// Whether some node with addresses is an exit node.
    exits: bool,
}

/// The login owning a node, if the node is user-owned: tagged nodes belong
/// to their tags, not to the user who enrolled them (as in Tailscale).
pub(crate) fn owner(node: &NodeInfo) -> Option<&str> {
    if node.tags.is_empty() {
        node.user.as_deref()
    } else {
        None
    }
}

impl<'a> Who<'a> {
    fn owner(&self) -> Option<&'a str> {
        match *self {
            Who::User(u) => Some(u),
            Who::Node(n) => owner(n),
            _ => None,
        }
    }

    /// Whether a non-`autogroup:self` selector selects this identity.
    fn selected_by(&self, sel: &SelKind) -> bool {
        match (sel, *self) {
            // `*` is every node's addresses and routes, not internet egress.
            (SelKind::Any, Who::Dest(d)) => d.router.is_some() || !is_internet(&d.addr),
            (SelKind::Any, _) => true,
            (SelKind::SelfNodes, _) => false,
            (SelKind::Users(set), Who::User(u)) => set.contains(u),
            (SelKind::Users(set), Who::Group(_, g)) => !g.is_empty() && g.is_subset(set),
            (SelKind::Users(set), Who::Node(n)) => owner(n).is_some_and(|u| set.contains(u)),
            (SelKind::Tag(t), Who::Tag(x)) => t == x,
            (SelKind::Tag(t), Who::Node(n)) => n.tags.contains(t),
            (SelKind::Member, Who::User(_)) => true,
            (SelKind::Member, Who::Group(_, g)) => !g.is_empty(),
            (SelKind::Member, Who::Node(n)) => owner(n).is_some(),
            (SelKind::Tagged, Who::Tag(_)) => true,
            (SelKind::Tagged, Who::Node(n)) => !n.tags.is_empty(),
            (SelKind::Prefix(p), Who::Addr(a)) => p.contains(&a),
            (SelKind::Prefix(p), Who::Node(n)) => n.addresses.iter().any(|a| p.contains(a)),
            (SelKind::Internet, Who::Addr(a)) => is_internet(&a),
            (SelKind::Prefix(p), Who::Dest(d)) => p.contains(&d.addr),
            (SelKind::Internet, Who::Dest(d)) => d.exits && is_internet(&d.addr),
            _ => false,
        }
    }

    fn describe(&self) -> String {
        match *self {
            Who::User(u) => u.to_string(),
            Who::Group(name, _) => format!("every member of {name}"),
            Who::Tag(t) => t.to_string(),
            Who::Addr(a) => a.to_string(),
            Who::Dest(d) => d.addr.to_string(),
            Who::Node(n) => format!("node {}", n.name),
        }
    }
}

/// The source of a flow: who, and its posture attributes (`None`: no
/// device, so no posture-gated entry applies).
#[derive(Clone, Copy)]
struct Source<'a> {
    who: Who<'a>,
    attrs: Option<&'a Attributes>,
}

/// The first entry accepting `src → dst` on `proto`/`port`, if any; the
/// entries before it that match but for the source's posture add a line
/// each to `skipped`.
fn first_match<'p>(
    policy: &'p Policy,
    src: Source<'_>,
    dst: Who<'_>,
    proto: u8,
    port: u16,
    ctx: Context,
    skipped: &mut Vec<String>,
) -> Option<(&'p Entry, usize, usize)> {
    let src_attrs = src.attrs;
    let src = src.who;
    for entry in &policy.entries {
        if !entry.protocols.contains(&proto) {
            continue;
        }
        let Some(si) = entry.src.iter().position(|s| src.selected_by(&s.kind)) else {
            continue;
        };
        let dst_hit = entry.dst.iter().position(|d| {
            let port_ok = !proto_has_ports(proto) || d.ports.iter().any(|r| r.contains(port));
            let sel_ok = match d.sel.kind {
                SelKind::SelfNodes => match (src.owner(), dst.owner()) {
                    (Some(a), Some(b)) => a == b,
                    _ => false,
                },
                ref kind => dst.selected_by(kind),
            };
            port_ok && sel_ok
        });
        let Some(di) = dst_hit else {
            continue;
        };
        if let Some(gate) = &entry.gate {
            if !src_attrs.is_some_and(|a| policy.gate_passes(gate, a)) {
                skipped.push(posture_line(policy, entry, gate, src, src_attrs, ctx));
                continue;
            }
        }
        return Some((entry, si, di));
    }
    None
}

/// Why `src` does not pass `entry`'s posture requirement.
fn posture_line(
    policy: &Policy,
    entry: &Entry,
    gate: &Gate,
    src: Who<'_>,
    attrs: Option<&Attributes>,
    ctx: Context,
) -> String {
    let names = policy.gate_names(gate).join(" or ");
    let who = src.describe();
    let why = match (attrs, ctx) {
        (None, Context::Explain) => {
            format!("{who} is no node, so it has no posture to check")
        }
        (None, Context::Tests) => format!("{who} has no \"srcPostureAttrs\" in this test"),
        (Some(a), _) => {
            let failed = policy.gate_failures(gate, a);
            match failed.as_slice() {
                [one] => format!("{who} fails it: {}", one.detail),
                many => {
                    let each: Vec<String> = many
                        .iter()
                        .map(|c| format!("{}: {}", c.name, c.detail))
                        .collect();
                    format!("{who} fails each: {}", each.join("; "))
                }
            }
        }
    };
    format!("{} requires {names}; {why}", entry.rule_id)
}

impl Policy {
    /// Explains whether `src` may reach `dst` on `proto`/`port`, and why.
    ///
    /// `src` and `dst` are a user, `group:x`, `tag:x`, host alias, IP address,
    /// or the name of one of `nodes`. An IP address that belongs to one of
    /// `nodes` is evaluated as that node. Users, groups and tags are matched
    /// symbolically: address-based rules (IPs, CIDRs, hosts) only match
    /// address or node identities. A group is allowed when all its members
    /// are. The port is ignored for protocols without ports (ICMP).
    ///
    /// A destination IP that is no node's address is placed against the
    /// nodes' routes: inside a route, `*` and the address rules covering it
    /// apply (the detail names the router); outside every route, an
    /// internet address is reached only by `autogroup:internet` (when some
    /// node is an exit node), any other address by the rules naming it.
    pub fn explain(
        &self,
        nodes: &[NodeInfo],
        src: &str,
        dst: &str,
        port: u16,
        proto: u8,
    ) -> Explanation {
        let resolve = |text: &str| -> Result<Identity, String> {
            match self.identity(text) {
                Ok(Identity::Addr(net)) if net.prefix_len() == net.max_prefix_len() => {
                    let addr = net.addr();
                    Ok(nodes
                        .iter()
                        .position(|n| n.addresses.contains(&addr))
                        .map_or(Identity::Addr(net), Identity::Node))
                }
                Ok(id) => Ok(id),
                Err(e) => nodes
                    .iter()
                    .position(|n| n.name == text.trim())
                    .map(Identity::Node)
                    .ok_or(e),
            }
        };
        let deny = |detail: String| Explanation {
            allowed: false,
            rule_id: None,
            detail,
            posture: Vec::new(),
        };
        let src_id = match resolve(src) {
            Ok(id) => id,
            Err(e) => return deny(format!("source: {e}")),
        };
        let dst_id = match resolve(dst) {
            Ok(id) => id,
            Err(e) => return deny(format!("destination: {e}")),
        };
        let src_who = who(&src_id, nodes);
        let dst_who = match dst_id {
            Identity::Addr(net) if net.prefix_len() == net.max_prefix_len() => {
                Who::Dest(place(net, nodes))
            }
            _ => who(&dst_id, nodes),
        };
        for w in [src_who, dst_who] {
            if let Who::Node(n) = w {
                if n.addresses.is_empty() {
                    return deny(format!("node {} has no addresses", n.name));
                }
            }
        }
        let src = Source {
            who: src_who,
            attrs: match src_who {
                Who::Node(n) => Some(&n.posture),
                _ => None,
            },
        };
        let mut e = self.verdict(src, dst_who, proto, port, Context::Explain);
        if let Who::Dest(d) = dst_who {
            let note = match d.router {
                Some((id, route)) => {
                    let name = nodes.iter().find(|n| n.id == id).map_or("", |n| &n.name);
                    format!("{} is in route {route} of node {name}", d.addr.addr())
                }
                None if is_internet(&d.addr) && d.exits => format!(
                    "{} is in no route: internet, through an exit node",
                    d.addr.addr()
                ),
                None if is_internet(&d.addr) => format!(
                    "{} is in no route and no node is an exit node",
                    d.addr.addr()
                ),
                None => format!("{} is no node's address and in no route", d.addr.addr()),
            };
            let _ = write!(e.detail, " ({note})");
        }
        e
    }

    fn verdict(
        &self,
        src: Source<'_>,
        dst: Who<'_>,
        proto: u8,
        port: u16,
        ctx: Context,
    ) -> Explanation {
        let mut posture = Vec::new();
        match first_match(self, src, dst, proto, port, ctx, &mut posture) {
            Some((entry, si, di)) => {
                let mut detail = format!(
                    "accepted by {}: src {:?} matches {}, dst {:?}",
                    entry.rule_id,
                    entry.src[si].text,
                    src.who.describe(),
                    entry.dst[di].sel.text
                );
                if proto_has_ports(proto) {
                    let _ = write!(detail, " port {port}");
                }
                let _ = write!(detail, " proto {}", proto_name(proto));
                Explanation {
                    allowed: true,
                    rule_id: Some(entry.rule_id.clone()),
                    detail,
                    posture,
                }
            }
            None => {
                let mut detail = "no rule matches".to_string();
                if let Some(first) = posture.first() {
                    let _ = write!(detail, "; {first}");
                }
                Explanation {
                    allowed: false,
                    rule_id: None,
                    detail,
                    posture,
                }
            }
        }
    }

    /// Runs the `tests` section.
    ///
    /// # Errors
    /// One diagnostic per failing assertion, at the assertion's position,
    /// naming the flow and the expected and actual verdicts.
    pub fn run_tests(&self) -> Result<(), PolicyError> {
        let mut sink = Sink::new(&self.file);
        for test in &self.tests {
            let src = Source {
                who: who(&test.src, &[]),
                attrs: test.attrs.as_ref(),
            };
            for (expect_accept, list) in [(true, &test.accept), (false, &test.deny)] {
                for d in list {
                    let dst = who(&d.dst, &[]);
                    let got = self.verdict(src, dst, test.proto, d.port, Context::Tests);
                    if got.allowed != expect_accept {
                        let (want, actual) = if expect_accept {
                            ("accept", format!("deny ({})", got.detail))
                        } else {
                            (
                                "deny",
                                format!("accept (by {})", got.rule_id.unwrap_or_default()),
                            )
                        };
                        sink.error(
                            d.pos,
                            format!(
                                "test failed (test at line {}): {} -> {} proto {}: expected {want}, got {actual}",
                                test.pos.line,
                                test.src_text,
                                d.text,
                                proto_name(test.proto)
                            ),
                        );
                    }
                }
            }
        }
        sink.into_result(())
    }
}

/// Places a destination address that is no node's own against `nodes`.
fn place(addr: IpNet, nodes: &[NodeInfo]) -> Placed {
    let live = || nodes.iter().filter(|n| !n.addresses.is_empty());
    let router = live()
        .flat_map(|n| n.routes.iter().map(move |r| (n.id, *r)))
        .filter(|(_, r)| r.contains(&addr))
        .max_by_key(|(id, r)| (r.prefix_len(), std::cmp::Reverse(*id)));
    Placed {
        addr,
        router,
        exits: live().any(|n| n.exit_node),
    }
}

fn who<'a>(id: &'a Identity, nodes: &'a [NodeInfo]) -> Who<'a> {
    match id {
        Identity::User(u) => Who::User(u),
        Identity::Group(name, users) => Who::Group(name, users),
        Identity::Tag(t) => Who::Tag(t),
        Identity::Addr(a) => Who::Addr(*a),
        // Node indexes come from `position()` over this same slice.
        Identity::Node(i) => Who::Node(&nodes[*i]),
    }
}
