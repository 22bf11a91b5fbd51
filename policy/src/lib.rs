//! ztmesh policy engine (pure: no I/O, no clock, no randomness): Tailscale-
//! compatible HuJSON ACLs → per-node peer sets and inbound rules.
//!
//! Pipeline: [`Policy::parse`] (HuJSON syntax, then resolution of groups,
//! tags and hosts, with `FILE:LINE:COL` diagnostics) → [`Compiled::new`]
//! (per-node [`NodeView`]s, updated incrementally by
//! [`Compiled::upsert_node`] / [`Compiled::remove_node`] /
//! [`Compiled::set_policy`]). [`Policy::explain`] and the `tests` section
//! evaluate the ACL list directly; [`plan`] diffs two compiled states.
//!
//! # Supported format
//! Sections `groups`, `tagOwners`, `hosts`, `postures`, `defaultSrcPosture`,
//! `acls`, `tests`, `autoApprovers`, `dns`.
//! Every other key is an error: an ignored restriction would widen access.
//! Selectors: `*`, users (`alice@example.com`), `group:x`, `tag:x` (defined
//! in `tagOwners`), host aliases, IPs and CIDRs, `autogroup:member`,
//! `autogroup:tagged`, `autogroup:self` (dst only, with user, group or
//! `autogroup:member` sources only), `autogroup:internet` (dst only).
//! `autoApprovers` is `{"routes": {CIDR: [approver]}, "exitNode":
//! [approver]}` with canonical, non-default CIDRs and approvers that are
//! users, groups, tags or `autogroup:member`
//! ([`Policy::auto_approves_route`], [`Policy::auto_approves_exit`]).
//! `dns` is `{"split": {SUFFIX: [RESOLVER]}}`: a DNS suffix (labels of
//! `[a-z0-9-]`, any case, no trailing dot) and 1-8 resolvers, each an IP
//! (port 53) or `IP:PORT` outside the overlay 100.64.0.0/10; at most 64
//! suffixes ([`Policy::split_dns`]). Destinations are `alias:ports` with ports
//! `*`, `22`, `80,443` or `8000-8999`; the last colon separates the ports,
//! so IPv6 is written `fd00::1:22`, `[fd00::1]:22` or `fd00::/64:22`. `proto` is a name or number; without it an entry covers
//! TCP, UDP, ICMP and ICMPv6.
//!
//! Device posture, with Tailscale's syntax: `postures` maps `posture:NAME`
//! to conditions, all of which must hold (`node:os IN ['linux']`,
//! `node:tsVersion >= '1.40'`, `custom:riskScore < 50`, `custom:mdm IS
//! SET`, bare `custom:compliant` for `== true`; operators `==`, `!=`,
//! `IN`, `NOT IN`, `<`, `<=`, `>`, `>=`, `IS SET`, `NOT SET`). An ACL
//! entry's `srcPosture` (else `defaultSrcPosture`) lists postures of which
//! the source must pass one; an empty `srcPosture` is an error (exempt a
//! rule with a posture without conditions). Attributes are the `node:`
//! ones of [`NODE_ATTRIBUTES`] (reported by the node: advisory) and
//! `custom:NAME` (set by an admin: the ones for hard gates); other
//! namespaces (`ip:`, `falcon:`, ...) are errors. A test's
//! `srcPostureAttrs` gives its source attributes.
//!
//! # Semantics (where they differ from, or refine, Tailscale's)
//! - A tagged node belongs to its tags: user, group and `autogroup:member`
//!   selectors only select untagged nodes.
//! - `*` as a source is every address (`0.0.0.0/0`, `::/0`); as a
//!   destination, every node's addresses and subnet routes
//!   ([`NodeInfo::routes`]), but not internet egress through exit nodes.
//! - A destination IP/CIDR selects the nodes whose addresses or routes
//!   overlap it; the rule's `dst` is the overlap: the node's addresses
//!   inside the prefix, and for each route the smaller of route and prefix
//!   when they nest. So `198.19.50.10:443` gives the router of
//!   `198.19.50.0/24` a rule for `198.19.50.10/32`, which it enforces
//!   before forwarding.
//! - Named destinations (users, groups, tags, `autogroup:member`,
//!   `autogroup:tagged`, `autogroup:self`) are nodes' own addresses, never
//!   their routes.
//! - `autogroup:internet` selects the exit nodes ([`NodeInfo::exit_node`]);
//!   their rule's `dst` is [`internet_prefixes`]: everything but the
//!   overlay, loopback, link-local, multicast and private ranges (an exit
//!   node's own LANs are subnet routes, granted by address). A source must
//!   not be `autogroup:internet`.
//! - [`NodeView::peer_routes`] gives a node, per router, the *whole* routes
//!   in which it may reach some address (the router's rules do the
//!   narrowing), and `0.0.0.0/0` + `::/0` per exit node it may use; the node
//!   installs the default routes only for the exit node its user chose.
//!   Flows *from* a subnet into the mesh (no SNAT) are not modelled: source
//!   selectors match nodes' own addresses only.
//! - `explain` places a destination IP that is no node's address: inside a
//!   route, address rules and `*` apply and the detail names the router;
//!   outside every route, an internet address is reached only through an
//!   exit node by `autogroup:internet`, other addresses by the address rules
//!   naming them. The `tests` section knows no nodes: there, `*` matches
//!   every address and `autogroup:internet` the internet set.
//! - The internet set is a constant, so an exit node that can itself reach
//!   a subnet at internet addresses (outside RFC 1918) forwards to it under
//!   `autogroup:internet`; serve such subnets from a router that is not an
//!   exit node.
//! - Posture gates sources, and only devices have a posture: a node
//!   failing an entry's requirement (or whose report is stale, see
//!   [`Attributes::fresh`]) is not among the entry's sources, so it loses
//!   the entry's peers and its addresses leave the entry's source prefixes.
//!   An address source of a gated entry (`*`, an IP, a CIDR, a host) stands
//!   for the passing nodes it covers, at their addresses inside it (`*`:
//!   all of them), never for the literal prefix, which has no device to
//!   check — unless a required posture has no conditions. This is stricter
//!   than Tailscale, whose posture checks never see traffic coming from
//!   behind a subnet router: here such traffic matches no gated entry.
//!   Likewise `explain` and the `tests` section match gated entries only
//!   for a node (or a test with `srcPostureAttrs`), never for a user,
//!   group, tag or bare address.
//! - An unset attribute fails every condition but `NOT SET` (even `!=` and
//!   `NOT IN`); so does a value of another type than the literal. `<`,
//!   `<=`, `>`, `>=` compare numbers, or, with a quoted literal, versions:
//!   the leading dotted numbers of the value (`6.1.0-18-amd64` is 6.1.0,
//!   `1.40` is `1.40.0`; a value not starting with a digit fails), see
//!   [`compare_versions`].
//! - An empty policy (empty file or `{}`) denies everything.
//! - A node without addresses can neither send nor receive: empty view.
#![cfg_attr(
    test,
    allow(
        clippy::disallowed_methods,
        clippy::disallowed_types,
        reason = "unit tests build inputs from the real clock and entropy"
    )
)]

mod compile;
mod dns;
mod error;
mod eval;
mod graph;
mod hujson;
mod plan;
mod policy;
mod posture;
mod routes;

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

pub use compile::{Compiled, InboundRule, NodeView};
pub use dns::{DNS_PORT, MAX_SPLIT_RESOLVERS, MAX_SPLIT_SUFFIXES};
pub use error::{Diagnostic, PolicyError, Pos};
pub use eval::Explanation;
pub use graph::{graph, PolicyEdge};
pub use plan::{plan, FlowChange};
pub use policy::{
    parse_proto, proto_has_ports, proto_name, Policy, PortRange, ProtoError, DEFAULT_TEST_PROTO,
    PROTOCOLS,
};
pub use posture::{
    check_node_attribute, compare_versions, node_attribute_type, parse_custom_attribute, AttrType,
    AttrValue, Attributes, PostureCheck, MAX_ATTR_VALUE_LEN, MAX_CONDITIONS, MAX_CONDITION_BYTES,
    MAX_CUSTOM_NAME, MAX_LIST_ITEMS, MAX_POSTURES, MAX_VERSION_COMPONENTS, NODE_ATTRIBUTES,
};
pub use routes::{default_routes, internet_prefixes};

/// A node as the policy sees it.
///
/// `Default` is a node with no identity, addresses or routes, for
/// `NodeInfo { id, name, ..NodeInfo::default() }`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeInfo {
    /// Controller-assigned node id.
    pub id: u64,
    /// Node name (hostname), usable as an identity in `explain`.
    pub name: String,
    /// Login of the owning user; ignored for selection when `tags` is not empty.
    pub user: Option<String>,
    /// ACL tags (`tag:web`); a tagged node is owned by its tags.
    pub tags: BTreeSet<String>,
    /// Overlay addresses.
    pub addresses: Vec<IpAddr>,
    /// Subnet routes this node serves as primary: approved, and chosen by
    /// the controller among the routers advertising the same CIDR.
    /// Canonical CIDRs (host bits zero), never a default route (an exit
    /// node sets `exit_node` instead).
    pub routes: Vec<IpNet>,
    /// Whether this node is an approved exit node (the destination of
    /// `autogroup:internet`).
    pub exit_node: bool,
    /// Device posture attributes, for `srcPosture` / `defaultSrcPosture`.
    pub posture: Attributes,
}
