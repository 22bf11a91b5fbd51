//! Policy model and semantic checks: HuJSON values → resolved ACL entries
//! (pure: no I/O).
//!
//! Resolution happens here, once: groups become user sets, host aliases become
//! prefixes, tags are checked against `tagOwners`. Everything downstream
//! (compile, explain, tests) works on the resolved form and never re-checks.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::dns::{self, MAX_SPLIT_RESOLVERS, MAX_SPLIT_SUFFIXES};
use crate::error::{PolicyError, Pos, Sink};
use crate::eval::owner;
use crate::hujson::{self, Kind, Member, Value};
use crate::posture::{
    self, AttrType, AttrValue, Attributes, Posture, PostureCheck, MAX_ATTR_VALUE_LEN,
    MAX_CONDITIONS, MAX_POSTURES,
};
use crate::NodeInfo;

/// An inclusive range of destination ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    /// First port of the range.
    pub first: u16,
    /// Last port of the range (inclusive).
    pub last: u16,
}

impl PortRange {
    /// Every port, `0-65535` (written `*` in a policy).
    pub const ALL: PortRange = PortRange {
        first: 0,
        last: u16::MAX,
    };

    /// Whether `port` lies in the range.
    pub fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
}

/// A parsed and resolved policy: groups, tag owners, hosts, ACL entries and tests.
///
/// Built by [`Policy::parse`] or [`Policy::check`]; immutable afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub(crate) file: String,
    pub(crate) groups: BTreeMap<String, BTreeSet<String>>,
    pub(crate) tag_owners: BTreeMap<String, TagOwners>,
    pub(crate) hosts: BTreeMap<String, IpNet>,
    pub(crate) entries: Vec<Entry>,
    pub(crate) tests: Vec<TestCase>,
    /// `autoApprovers.routes`: approver CIDR → who may have routes inside it
    /// approved, in file order.
    pub(crate) auto_routes: Vec<(IpNet, Vec<SelKind>)>,
    /// `autoApprovers.exitNode`: who may have an exit node approved.
    pub(crate) auto_exit: Vec<SelKind>,
    /// `dns.split`: suffix → resolvers, sorted by suffix.
    pub(crate) split_dns: Vec<(String, Vec<SocketAddr>)>,
    /// The `postures` section, sorted by name.
    pub(crate) postures: Vec<Posture>,
}

/// Who may apply a tag.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct TagOwners {
    /// User logins, groups already expanded.
    pub users: BTreeSet<String>,
    /// `autogroup:member`: any user may apply the tag.
    pub any_member: bool,
}

/// One ACL entry (`{"action": "accept", ...}`), resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// `FILE:LINE` of the entry's opening brace.
    pub rule_id: String,
    /// Sorted, deduplicated IP protocol numbers.
    pub protocols: Vec<u8>,
    pub src: Vec<Selector>,
    pub dst: Vec<DstElem>,
    /// The posture a source must pass: the entry's `srcPosture`, else the
    /// policy's `defaultSrcPosture`. `None` when there is neither, or when
    /// one of the postures has no conditions (every source passes it).
    pub gate: Option<Gate>,
}

/// A rule's posture requirement: a source passes when any posture passes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Gate {
    /// Indexes into [`Policy::postures`], sorted, deduplicated; none of
    /// them without conditions.
    pub postures: Vec<usize>,
}

/// A source or destination alias, with its text for explanations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Selector {
    pub text: String,
    pub kind: SelKind,
}

/// What an alias selects, after resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SelKind {
    /// `*`: every node (as a source: every address).
    Any,
    /// A user or a group: the untagged nodes owned by these logins.
    Users(BTreeSet<String>),
    /// `tag:x`: the nodes carrying the tag.
    Tag(String),
    /// `autogroup:member`: every untagged, user-owned node.
    Member,
    /// `autogroup:tagged`: every tagged node.
    Tagged,
    /// An IP, a CIDR or a host alias: these addresses.
    Prefix(IpNet),
    /// `autogroup:self` (destination only): the source user's own untagged nodes.
    SelfNodes,
    /// `autogroup:internet` (destination only): the exit nodes, for the
    /// internet prefix set.
    Internet,
}

/// One `alias:ports` destination of an ACL entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DstElem {
    pub sel: Selector,
    /// Sorted, merged port ranges.
    pub ports: Vec<PortRange>,
}

/// A source or destination identity in a test or an `explain` query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Identity {
    User(String),
    Group(String, BTreeSet<String>),
    Tag(String),
    /// An IP address (as a host prefix), CIDR or host alias.
    Addr(IpNet),
    /// A node, by index into the node slice given to `explain`.
    Node(usize),
}

/// One entry of the `tests` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TestCase {
    pub pos: Pos,
    pub src_text: String,
    pub src: Identity,
    pub proto: u8,
    pub accept: Vec<TestDst>,
    pub deny: Vec<TestDst>,
    /// `srcPostureAttrs`: the source's posture attributes (fresh); `None`
    /// without them, so that no posture-gated rule applies to the source.
    pub attrs: Option<Attributes>,
}

/// One `alias:port` of a test's `accept` or `deny` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TestDst {
    pub pos: Pos,
    pub text: String,
    pub dst: Identity,
    pub port: u16,
}

/// Protocols used when an ACL entry has no `proto`: TCP, UDP, ICMP and ICMPv6.
pub(crate) const DEFAULT_PROTOCOLS: [u8; 4] = [1, 6, 17, 58];

/// Protocol used by a `tests` entry (and by `explain`) without `proto`: TCP.
pub const DEFAULT_TEST_PROTO: u8 = 6;

/// Every protocol name a policy's `proto` accepts, with its IP protocol
/// number (Tailscale's names; matched case-insensitively). Any decimal number
/// 0-255 (at most three digits) is accepted as well.
pub const PROTOCOLS: &[(&str, u8)] = &[
    ("icmp", 1),
    ("igmp", 2),
    ("ipv4", 4),
    ("ip-in-ip", 4),
    ("tcp", 6),
    ("egp", 8),
    ("igp", 9),
    ("udp", 17),
    ("gre", 47),
    ("esp", 50),
    ("ah", 51),
    ("ipv6-icmp", 58),
    ("sctp", 132),
];

/// A protocol that is neither a name from [`PROTOCOLS`] nor a number 0-255.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown protocol {0:?}: use tcp, udp, icmp, ipv6-icmp, sctp, gre, esp, ah, igmp or a number 0-255")]
pub struct ProtoError(pub String);

/// Sections Tailscale defines that ztmesh does not implement yet. Rejected,
/// because ignoring a restriction (an SSH rule, a grant's condition) would
/// widen access.
const UNSUPPORTED_SECTIONS: &[&str] = &[
    "grants",
    "ssh",
    "sshtests",
    "nodeattrs",
    "ipsets",
    "derpmap",
    "disableipv4",
    "randomizeclientport",
    "onetimeoptions",
];

/// Whether the protocol carries ports (TCP, UDP, SCTP); rules for the others
/// match every packet of the protocol.
pub fn proto_has_ports(proto: u8) -> bool {
    matches!(proto, 6 | 17 | 132)
}

/// The policy name of an IP protocol number (`tcp`, `ipv6-icmp`), or the number.
pub fn proto_name(proto: u8) -> String {
    PROTOCOLS
        .iter()
        .find(|(_, n)| *n == proto)
        .map_or_else(|| proto.to_string(), |(name, _)| (*name).to_string())
}

/// Parses a protocol name or number as written in a policy's `proto`: the one
/// parser for the policy, its tests and `explain` (CLI and admin API).
///
/// # Errors
/// [`ProtoError`] for anything but a name from [`PROTOCOLS`] (any case) or a
/// decimal number 0-255 of at most three digits.
pub fn parse_proto(text: &str) -> Result<u8, ProtoError> {
    let lower = text.to_ascii_lowercase();
    if let Some((_, n)) = PROTOCOLS.iter().find(|(name, _)| *name == lower) {
        return Ok(*n);
    }
    if !text.is_empty() && text.len() <= 3 && text.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(n) = text.parse() {
            return Ok(n);
        }
    }
    Err(ProtoError(text.to_string()))
}

impl Policy {
    /// A policy with no rules: denies everything.
    pub fn empty() -> Policy {
        Policy::empty_named("")
    }

    fn empty_named(file: &str) -> Policy {
        Policy {
            file: file.to_string(),
            groups: BTreeMap::new(),
            tag_owners: BTreeMap::new(),
            hosts: BTreeMap::new(),
            entries: Vec::new(),
            tests: Vec::new(),
            auto_routes: Vec::new(),
            auto_exit: Vec::new(),
            split_dns: Vec::new(),
            postures: Vec::new(),
        }
    }

    /// Parses and resolves a HuJSON policy; does not run its `tests` section.
    ///
    /// An empty file or `{}` gives a policy that denies everything.
    ///
    /// # Errors
    /// Every syntax or semantic problem found, each as `FILE:LINE:COL: message`.
    /// A syntax error stops parsing, so it is reported alone.
    pub fn parse(file_name: &str, text: &str) -> Result<Policy, PolicyError> {
        let mut sink = Sink::new(file_name);
        let root = match hujson::parse(text) {
            Ok(Some(root)) => root,
            Ok(None) => return Ok(Policy::empty_named(file_name)),
            Err(e) => {
                sink.error(e.pos, e.message);
                return sink.into_result(Policy::empty_named(file_name));
            }
        };
        let policy = Resolver::new(file_name, text, &mut sink).run(&root);
        sink.into_result(policy)
    }

    /// Parses a policy, then runs its `tests` section.
    ///
    /// # Errors
    /// The parse errors, or, for a valid policy, one diagnostic per failing test
    /// assertion.
    pub fn check(file_name: &str, text: &str) -> Result<Policy, PolicyError> {
        let policy = Policy::parse(file_name, text)?;
        policy.run_tests()?;
        Ok(policy)
    }

    /// Whether `user_login` may apply `tag` to a node it owns, per `tagOwners`
    /// (directly or through a group). False for an undefined tag.
    pub fn may_own_tag(&self, user_login: &str, tag: &str) -> bool {
        self.tag_owners
            .get(tag)
            .is_some_and(|o| o.any_member || o.users.contains(user_login))
    }

    /// Every tag defined in `tagOwners`.
    pub fn tags(&self) -> BTreeSet<String> {
        self.tag_owners.keys().cloned().collect()
    }

    /// The file name the policy was parsed from.
    pub fn file_name(&self) -> &str {
        &self.file
    }

    /// Whether `autoApprovers.routes` approves `route` for `node`: `route`
    /// lies inside (or is) an approver CIDR whose list selects the node.
    ///
    /// A tagged node is selected by its tags only; an untagged one by its
    /// user, a group holding that user, or `autogroup:member`.
    pub fn auto_approves_route(&self, node: &NodeInfo, route: IpNet) -> bool {
        self.auto_routes.iter().any(|(net, approvers)| {
            net.contains(&route) && approvers.iter().any(|a| approver_selects(a, node))
        })
    }

    /// Whether `autoApprovers.exitNode` approves `node` as an exit node
    /// (selection as in [`Policy::auto_approves_route`]).
    pub fn auto_approves_exit(&self, node: &NodeInfo) -> bool {
        self.auto_exit.iter().any(|a| approver_selects(a, node))
    }

    /// The `dns.split` section: each suffix (lowercase, no trailing dot)
    /// with its resolvers (port 53 where none was written), sorted by
    /// suffix; empty without a `dns` section.
    ///
    /// Names under a suffix go to its resolvers instead of the node's
    /// upstreams; the node picks the longest matching suffix.
    pub fn split_dns(&self) -> &[(String, Vec<SocketAddr>)] {
        &self.split_dns
    }

    /// Every posture of the `postures` section, by name, with its result
    /// for a node whose attributes are `attrs` (see [`PostureCheck`]).
    pub fn posture_checks(&self, attrs: &Attributes) -> Vec<PostureCheck> {
        self.postures.iter().map(|p| p.check(attrs)).collect()
    }

    /// Whether some ACL entry requires a posture that can fail (one with a
    /// condition): only then do nodes' attributes change what they may reach.
    pub fn has_postures(&self) -> bool {
        self.entries.iter().any(|e| e.gate.is_some())
    }

    /// Whether a source with `attrs` passes `gate` (any of its postures).
    pub(crate) fn gate_passes(&self, gate: &Gate, attrs: &Attributes) -> bool {
        gate.postures
            .iter()
            .any(|&i| self.postures.get(i).is_some_and(|p| p.passes(attrs)))
    }

    /// The failing result of each posture of `gate` for `attrs`, in name order.
    pub(crate) fn gate_failures(&self, gate: &Gate, attrs: &Attributes) -> Vec<PostureCheck> {
        gate.postures
            .iter()
            .filter_map(|&i| self.postures.get(i))
            .map(|p| p.check(attrs))
            .filter(|c| !c.passed)
            .collect()
    }

    /// The names of the postures of `gate`, in name order.
    pub(crate) fn gate_names(&self, gate: &Gate) -> Vec<&str> {
        gate.postures
            .iter()
            .filter_map(|&i| self.postures.get(i))
            .map(|p| p.name.as_str())
            .collect()
    }

    /// Resolves an identity as written in a test or an `explain` query
    /// (user, group, tag, host alias, IP or CIDR); node names are not known here.
    pub(crate) fn identity(&self, text: &str) -> Result<Identity, String> {
        let text = text.trim();
        if text.contains('/') {
            return text
                .parse::<IpNet>()
                .map(|n| Identity::Addr(n.trunc()))
                .map_err(|_| format!("invalid CIDR {text:?}"));
        }
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(Identity::Addr(IpNet::from(ip)));
        }
        if text.contains('@') {
            if !valid_user(text) {
                return Err(format!("invalid user {text:?}"));
            }
            return Ok(Identity::User(text.to_string()));
        }
        if text.starts_with("group:") {
            return match self.groups.get(text) {
                Some(users) => Ok(Identity::Group(text.to_string(), users.clone())),
                None => Err(format!("undefined group {text:?}")),
            };
        }
        if text.starts_with("tag:") {
            return if self.tag_owners.contains_key(text) {
                Ok(Identity::Tag(text.to_string()))
            } else {
                Err(format!("tag {text:?} is not defined in tagOwners"))
            };
        }
        if let Some(net) = self.hosts.get(text) {
            return Ok(Identity::Addr(*net));
        }
        Err(format!(
            "unknown identity {text:?}: not a user, group, tag, host alias or IP address"
        ))
    }
}

/// Splits `alias:ports` as Tailscale and headscale do: the last colon
/// separates the ports (ports never contain colons), so `fd00::1:22` and
/// `fd00::/64:22` work bare. The bracketed IPv6 forms `[fd00::1]:22` and
/// `[fd00::1]/128:22` are accepted too; brackets only go around an IPv6
/// address.
pub(crate) fn split_host_port(text: &str) -> Result<(String, &str), String> {
    let mut host_part = String::new();
    let mut rest = text;
    if let Some(inner) = text.strip_prefix('[') {
        let Some((addr, after)) = inner.split_once(']') else {
            return Err(format!(
                "invalid destination {text:?}: missing ']' after the IPv6 address"
            ));
        };
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!(
                "invalid destination {text:?}: square brackets are only valid around IPv6 addresses"
            ));
        }
        if !after.starts_with([':', '/']) {
            return Err(format!(
                "invalid destination {text:?}: expected [IPV6]:PORTS, e.g. \"[fd00::1]:22\""
            ));
        }
        host_part.push_str(addr);
        rest = after;
    }
    let joined = format!("{host_part}{rest}");
    let Some((host, _)) = joined.rsplit_once(':') else {
        return Err(format!(
            "destination {text:?} has no port: write {:?} for every port",
            format!("{text}:*")
        ));
    };
    let host = host.to_string();
    let ports = text.rsplit_once(':').map_or("", |(_, p)| p);
    if matches!(host.as_str(), "tag" | "group" | "autogroup") {
        return Err(format!(
            "destination {text:?} has no port: write {:?} for every port",
            format!("{text}:*")
        ));
    }
    Ok((host, ports))
}

/// Parses an `autoApprovers.routes` key: a canonical CIDR, not a default route.
fn approver_route(key: &str) -> Result<IpNet, String> {
    if !key.contains('/') {
        return Err(format!(
            "invalid route {key:?}: expected a CIDR (ADDRESS/LENGTH)"
        ));
    }
    let net: IpNet = key
        .parse()
        .map_err(|_| format!("invalid route {key:?}: expected a CIDR (ADDRESS/LENGTH)"))?;
    if net.trunc() != net {
        return Err(format!(
            "route {key:?} has host bits set: write {:?}",
            net.trunc().to_string()
        ));
    }
    if net.prefix_len() == 0 {
        return Err(format!(
            "route {key:?} is a default route: auto-approve exit nodes with \"exitNode\""
        ));
    }
    Ok(net)
}

/// Parses `*`, `22`, `80,443`, `8000-8999` into sorted, merged ranges.
pub(crate) fn parse_ports(text: &str) -> Result<Vec<PortRange>, String> {
    if text == "*" {
        return Ok(vec![PortRange::ALL]);
    }
    let mut out = Vec::new();
    for part in text.split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let first = parse_port(a, text)?;
        let last = parse_port(b, text)?;
        if first > last {
            return Err(format!(
                "invalid port range {part:?}: first port is greater than last"
            ));
        }
        out.push(PortRange { first, last });
    }
    Ok(merge_ports(out))
}

fn parse_port(p: &str, whole: &str) -> Result<u16, String> {
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "invalid ports {whole:?}: expected *, a port, a list (80,443) or a range (8000-8999)"
        ));
    }
    match p.parse::<u32>() {
        Ok(n @ 1..=65535) => Ok(n as u16),
        _ => Err(format!("invalid port {p:?}: ports are 1-65535")),
    }
}

/// Sorts and merges overlapping or adjacent ranges.
pub(crate) fn merge_ports(mut ranges: Vec<PortRange>) -> Vec<PortRange> {
    ranges.sort_unstable();
    let mut out: Vec<PortRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if u32::from(r.first) <= u32::from(last.last) + 1 => {
                last.last = last.last.max(r.last);
            }
            _ => out.push(r),
        }
    }
    out
}

/// Whether an auto-approver (a user set, tag or `autogroup:member`) selects `node`.
fn approver_selects(approver: &SelKind, node: &NodeInfo) -> bool {
    match approver {
        SelKind::Users(users) => owner(node).is_some_and(|u| users.contains(u)),
        SelKind::Tag(tag) => node.tags.contains(tag),
        SelKind::Member => owner(node).is_some(),
        _ => false,
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Most attributes of one test's `srcPostureAttrs`.
const MAX_TEST_ATTRIBUTES: usize = 64;

/// An attribute type in a message.
fn type_name(t: AttrType) -> &'static str {
    match t {
        AttrType::Str => "a string",
        AttrType::Int => "a number",
        AttrType::Bool => "a boolean",
    }
}

fn valid_user(login: &str) -> bool {
    login.contains('@') && !login.starts_with('@') && !login.chars().any(char::is_whitespace)
}

/// Walks the document and builds the resolved policy, reporting every problem.
struct Resolver<'a> {
    sink: &'a mut Sink,
    /// The source, to place errors inside string literals.
    text: &'a str,
    policy: Policy,
    /// `defaultSrcPosture`, for entries without their own `srcPosture`.
    default_gate: Option<Gate>,
}

/// Where an alias appears: sources and destinations accept different autogroups.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Src,
    Dst,
}

impl<'a> Resolver<'a> {
    fn new(file: &str, text: &'a str, sink: &'a mut Sink) -> Resolver<'a> {
        Resolver {
            sink,
            text,
            policy: Policy::empty_named(file),
            default_gate: None,
        }
    }

    fn run(mut self, root: &Value) -> Policy {
        let Some(members) = self.object(root, "the policy") else {
            return self.policy;
        };
        let mut sections: BTreeMap<&'static str, &Member> = BTreeMap::new();
        for m in members {
            let lower = m.key.to_ascii_lowercase();
            let name = match lower.as_str() {
                "groups" => "groups",
                "tagowners" => "tagowners",
                "hosts" => "hosts",
                "acls" => "acls",
                "tests" => "tests",
                "autoapprovers" => "autoapprovers",
                "dns" => "dns",
                "postures" => "postures",
                "defaultsrcposture" => "defaultsrcposture",
                other if UNSUPPORTED_SECTIONS.contains(&other) => {
                    self.sink.error(
                        m.key_pos,
                        format!(
                            "section {:?} is not supported by ztmesh yet; remove it",
                            m.key
                        ),
                    );
                    continue;
                }
                _ => {
                    self.sink.error(
                        m.key_pos,
                        format!(
                            "unknown section {:?}; expected groups, tagOwners, hosts, postures, defaultSrcPosture, acls, tests, autoApprovers or dns",
                            m.key
                        ),
                    );
                    continue;
                }
            };
            if sections.insert(name, m).is_some() {
                self.sink
                    .error(m.key_pos, format!("duplicate section {:?}", m.key));
            }
        }
        // Dependency order: groups, then tags (owners may be groups), hosts,
        // postures, rules.
        if let Some(m) = sections.get("groups") {
            self.groups(&m.value);
        }
        if let Some(m) = sections.get("tagowners") {
            self.tag_owners(&m.value);
        }
        if let Some(m) = sections.get("hosts") {
            self.hosts(&m.value);
        }
        if let Some(m) = sections.get("postures") {
            self.postures(&m.value);
        }
        if let Some(m) = sections.get("defaultsrcposture") {
            self.default_gate = self
                .posture_refs(&m.value, "\"defaultSrcPosture\"")
                .and_then(|names| self.gate(&names));
        }
        if let Some(m) = sections.get("acls") {
            self.acls(&m.value);
        }
        if let Some(m) = sections.get("tests") {
            self.tests(&m.value);
        }
        if let Some(m) = sections.get("autoapprovers") {
            self.auto_approvers(&m.value);
        }
        if let Some(m) = sections.get("dns") {
            self.dns(&m.value);
        }
        self.policy
    }

    fn type_error(&mut self, v: &Value, want: &str, what: &str) {
        self.sink.error(
            v.pos,
            format!("{what} must be {want}, found {}", v.kind.name()),
        );
    }

    fn object<'v>(&mut self, v: &'v Value, what: &str) -> Option<&'v [Member]> {
        match &v.kind {
            Kind::Object(m) => Some(m),
            _ => {
                self.type_error(v, "an object", what);
                None
            }
        }
    }

    fn array<'v>(&mut self, v: &'v Value, what: &str) -> Option<&'v [Value]> {
        match &v.kind {
            Kind::Array(items) => Some(items),
            _ => {
                self.type_error(v, "an array", what);
                None
            }
        }
    }

    fn string<'v>(&mut self, v: &'v Value, what: &str) -> Option<&'v str> {
        match &v.kind {
            Kind::String(s) => Some(s),
            _ => {
                self.type_error(v, "a string", what);
                None
            }
        }
    }

    /// The strings of an array of strings, with their positions.
    fn strings<'v>(&mut self, v: &'v Value, what: &str) -> Vec<(Pos, &'v str)> {
        let Some(items) = self.array(v, what) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for item in items {
            if let Some(s) = self.string(item, &format!("each element of {what}")) {
                out.push((item.pos, s));
            }
        }
        out
    }

    fn groups(&mut self, v: &Value) {
        let Some(members) = self.object(v, "\"groups\"") else {
            return;
        };
        for m in members {
            let valid = m.key.strip_prefix("group:").is_some_and(valid_name);
            if !valid {
                self.sink.error(
                    m.key_pos,
                    format!(
                        "invalid group name {:?}: expected \"group:NAME\" (letters, digits, '-', '_', '.')",
                        m.key
                    ),
                );
            }
            let mut users = BTreeSet::new();
            for (pos, s) in self.strings(&m.value, "a group") {
                if s.starts_with("group:") {
                    self.sink
                        .error(pos, format!("groups cannot contain groups ({s:?})"));
                } else if s.starts_with("tag:") {
                    self.sink
                        .error(pos, format!("groups cannot contain tags ({s:?})"));
                } else if !valid_user(s) {
                    self.sink.error(
                        pos,
                        format!("invalid group member {s:?}: expected a user login like \"alice@example.com\""),
                    );
                } else {
                    users.insert(s.to_string());
                }
            }
            if valid {
                self.policy.groups.insert(m.key.clone(), users);
            }
        }
    }

    fn tag_owners(&mut self, v: &Value) {
        let Some(members) = self.object(v, "\"tagOwners\"") else {
            return;
        };
        // Tags may own tags, in any order: collect the names first.
        let defined: BTreeSet<&str> = members.iter().map(|m| m.key.as_str()).collect();
        for m in members {
            let valid = m.key.strip_prefix("tag:").is_some_and(valid_name);
            if !valid {
                self.sink.error(
                    m.key_pos,
                    format!(
                        "invalid tag name {:?}: expected \"tag:NAME\" (letters, digits, '-', '_', '.')",
                        m.key
                    ),
                );
            }
            let mut owners = TagOwners::default();
            for (pos, s) in self.strings(&m.value, "tag owners") {
                if s.starts_with("group:") {
                    match self.policy.groups.get(s) {
                        Some(users) => owners.users.extend(users.iter().cloned()),
                        None => self.sink.error(pos, format!("undefined group {s:?}")),
                    }
                } else if s.starts_with("tag:") {
                    if !defined.contains(s) {
                        self.sink
                            .error(pos, format!("tag {s:?} is not defined in tagOwners"));
                    }
                } else if s == "autogroup:member" {
                    owners.any_member = true;
                } else if s.starts_with("autogroup:") {
                    self.sink.error(
                        pos,
                        format!("{s:?} is not supported as a tag owner; use users, groups, tags or autogroup:member"),
                    );
                } else if valid_user(s) {
                    owners.users.insert(s.to_string());
                } else {
                    self.sink.error(
                        pos,
                        format!("invalid tag owner {s:?}: expected a user, group, tag or autogroup:member"),
                    );
                }
            }
            if valid {
                self.policy.tag_owners.insert(m.key.clone(), owners);
            }
        }
    }

    fn hosts(&mut self, v: &Value) {
        let Some(members) = self.object(v, "\"hosts\"") else {
            return;
        };
        for m in members {
            let key = m.key.as_str();
            let bad_name = key.is_empty()
                || key == "*"
                || key.contains(['@', ':', '/'])
                || key.chars().any(char::is_whitespace)
                || key.parse::<IpAddr>().is_ok();
            if bad_name {
                self.sink.error(
                    m.key_pos,
                    format!("invalid host name {key:?}: host names cannot be IPs or contain '@', ':', '/' or spaces"),
                );
            }
            let Some(s) = self.string(&m.value, &format!("host {key:?}")) else {
                continue;
            };
            let net = if s.contains('/') {
                s.parse::<IpNet>().ok().map(|n| n.trunc())
            } else {
                s.parse::<IpAddr>().ok().map(IpNet::from)
            };
            match net {
                Some(net) if !bad_name => {
                    self.policy.hosts.insert(m.key.clone(), net);
                }
                Some(_) => {}
                None => self.sink.error(
                    m.value.pos,
                    format!("invalid host address {s:?}: expected an IP address or CIDR"),
                ),
            }
        }
    }

    fn acls(&mut self, v: &Value) {
        let Some(items) = self.array(v, "\"acls\"") else {
            return;
        };
        for item in items {
            if let Some(entry) = self.acl(item) {
                self.policy.entries.push(entry);
            }
        }
    }

    /// Reports keys of one object that differ only in case: keys are
    /// matched case-insensitively, so without this the last spelling would
    /// silently win (`"srcPosture"` then `"SrcPosture"` would drop a
    /// restriction). Returns whether there were none.
    fn unique_keys(&mut self, members: &[Member], what: &str) -> bool {
        let mut seen: Vec<String> = Vec::with_capacity(members.len());
        let mut ok = true;
        for m in members {
            let lower = m.key.to_ascii_lowercase();
            if seen.contains(&lower) {
                self.sink.error(
                    m.key_pos,
                    format!(
                        "duplicate key {:?} in {what} (keys are case-insensitive)",
                        m.key
                    ),
                );
                ok = false;
            } else {
                seen.push(lower);
            }
        }
        ok
    }

    fn acl(&mut self, v: &Value) -> Option<Entry> {
        let members = self.object(v, "an acl entry")?;
        let mut ok = self.unique_keys(members, "an acl entry");
        let mut action = None;
        let mut src = None;
        let mut dst = None;
        let mut proto = None;
        let mut own_gate = None;
        for m in members {
            match m.key.to_ascii_lowercase().as_str() {
                "action" => action = Some(m),
                "src" => src = Some(m),
                "dst" => dst = Some(m),
                "proto" => proto = Some(m),
                "users" | "ports" => {
                    let new = if m.key.eq_ignore_ascii_case("users") {
                        "src"
                    } else {
                        "dst"
                    };
                    self.sink.error(
                        m.key_pos,
                        format!("legacy key {:?} is not supported; use {new:?}", m.key),
                    );
                    ok = false;
                }
                "srcposture" => {
                    if matches!(&m.value.kind, Kind::Array(items) if items.is_empty()) {
                        self.sink.error(
                            m.value.pos,
                            "empty \"srcPosture\": to exempt a rule from defaultSrcPosture, reference a posture with no conditions",
                        );
                        ok = false;
                    }
                    match self.posture_refs(&m.value, "\"srcPosture\"") {
                        Some(names) => own_gate = Some(self.gate(&names)),
                        None => ok = false,
                    }
                }
                _ => {
                    self.sink.error(
                        m.key_pos,
                        format!(
                            "unknown key {:?} in acl entry; expected action, src, proto, dst or srcPosture",
                            m.key
                        ),
                    );
                    ok = false;
                }
            }
        }
        match action {
            None => {
                self.sink.error(v.pos, "acl entry has no \"action\"");
                ok = false;
            }
            Some(m) => match self.string(&m.value, "\"action\"") {
                Some("accept") => {}
                Some(other) => {
                    self.sink.error(
                        m.value.pos,
                        format!("action {other:?} is not supported; rules only \"accept\" (everything else is denied)"),
                    );
                    ok = false;
                }
                None => ok = false,
            },
        }
        let protocols = match proto {
            None => DEFAULT_PROTOCOLS.to_vec(),
            Some(m) => match self.proto(&m.value) {
                Some(p) => vec![p],
                None => {
                    ok = false;
                    Vec::new()
                }
            },
        };
        let mut srcs = Vec::new();
        match src {
            None => {
                self.sink.error(v.pos, "acl entry has no \"src\"");
                ok = false;
            }
            Some(m) => {
                for (pos, s) in self.strings(&m.value, "\"src\"") {
                    match self.selector(s, Side::Src) {
                        Ok(sel) => srcs.push((pos, sel)),
                        Err(e) => {
                            self.sink.error(pos, e);
                            ok = false;
                        }
                    }
                }
            }
        }
        let mut dsts = Vec::new();
        match dst {
            None => {
                self.sink.error(v.pos, "acl entry has no \"dst\"");
                ok = false;
            }
            Some(m) => {
                for (pos, s) in self.strings(&m.value, "\"dst\"") {
                    match self.dst_elem(s, &protocols) {
                        Ok(d) => dsts.push(d),
                        Err(e) => {
                            self.sink.error(pos, e);
                            ok = false;
                        }
                    }
                }
            }
        }
        if dsts.iter().any(|d| d.sel.kind == SelKind::SelfNodes) {
            ok &= self.check_self_sources(&srcs);
        }
        ok.then(|| Entry {
            rule_id: format!("{}:{}", self.policy.file, v.pos.line),
            protocols,
            src: srcs.into_iter().map(|(_, sel)| sel).collect(),
            dst: dsts,
            gate: own_gate.unwrap_or_else(|| self.default_gate.clone()),
        })
    }

    /// `autogroup:self` means "the source user's own nodes", so it needs a
    /// source that is a person: a user, a group or `autogroup:member`.
    /// Tailscale rejects the rest (tags, addresses, host aliases, `*` and
    /// `autogroup:tagged`, which have no user), and so do we: accepting them
    /// would silently select nothing (or, for `*`, only the users in it).
    fn check_self_sources(&mut self, srcs: &[(Pos, Selector)]) -> bool {
        let mut ok = true;
        for (pos, sel) in srcs {
            let what = match &sel.kind {
                SelKind::Users(_) | SelKind::Member => continue,
                SelKind::Any => "\"*\" includes tagged nodes and addresses",
                SelKind::Tag(_) | SelKind::Tagged => "tagged nodes belong to no user",
                SelKind::Prefix(_) => "an address belongs to no user",
                SelKind::SelfNodes | SelKind::Internet => continue,
            };
            self.sink.error(
                *pos,
                format!(
                    "source {:?} cannot be used with an autogroup:self destination ({what}); autogroup:self only works with users, groups and autogroup:member",
                    sel.text
                ),
            );
            ok = false;
        }
        ok
    }

    fn proto(&mut self, v: &Value) -> Option<u8> {
        let text = match &v.kind {
            Kind::String(s) => s.as_str(),
            Kind::Number(n) => n.as_str(),
            _ => {
                self.type_error(v, "a string", "\"proto\"");
                return None;
            }
        };
        match parse_proto(text) {
            Ok(p) => Some(p),
            Err(e) => {
                self.sink.error(v.pos, e.to_string());
                None
            }
        }
    }

    fn dst_elem(&self, text: &str, protocols: &[u8]) -> Result<DstElem, String> {
        let (host, ports_text) = split_host_port(text)?;
        let sel = self.selector(&host, Side::Dst)?;
        let ports = parse_ports(ports_text)?;
        if ports != [PortRange::ALL] {
            if let Some(p) = protocols.iter().find(|p| !proto_has_ports(**p)) {
                if protocols.len() == 1 {
                    return Err(format!(
                        "protocol {} has no ports: write {:?}",
                        proto_name(*p),
                        format!("{host}:*")
                    ));
                }
            }
        }
        Ok(DstElem { sel, ports })
    }

    /// Resolves an alias; the order follows Tailscale and headscale.
    fn selector(&self, text: &str, side: Side) -> Result<Selector, String> {
        let kind = self.selector_kind(text, side)?;
        Ok(Selector {
            text: text.to_string(),
            kind,
        })
    }

    fn selector_kind(&self, text: &str, side: Side) -> Result<SelKind, String> {
        if text == "*" {
            return Ok(SelKind::Any);
        }
        if text.contains('/') {
            return text
                .parse::<IpNet>()
                .map(|n| SelKind::Prefix(n.trunc()))
                .map_err(|_| format!("invalid CIDR {text:?}"));
        }
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(SelKind::Prefix(IpNet::from(ip)));
        }
        if text.contains('@') {
            if !valid_user(text) {
                return Err(format!("invalid user {text:?}"));
            }
            return Ok(SelKind::Users(BTreeSet::from([text.to_string()])));
        }
        if text.starts_with("group:") {
            return match self.policy.groups.get(text) {
                Some(users) => Ok(SelKind::Users(users.clone())),
                None => Err(format!("undefined group {text:?}")),
            };
        }
        if text.starts_with("tag:") {
            return if self.policy.tag_owners.contains_key(text) {
                Ok(SelKind::Tag(text.to_string()))
            } else {
                Err(format!("tag {text:?} is not defined in tagOwners"))
            };
        }
        if let Some(auto) = text.strip_prefix("autogroup:") {
            return match (auto, side) {
                ("member", _) => Ok(SelKind::Member),
                ("tagged", _) => Ok(SelKind::Tagged),
                ("self", Side::Dst) => Ok(SelKind::SelfNodes),
                ("self", Side::Src) => {
                    Err("autogroup:self is only allowed in \"dst\"".to_string())
                }
                ("internet", Side::Dst) => Ok(SelKind::Internet),
                ("internet", Side::Src) => Err(
                    "autogroup:internet is only allowed in \"dst\" (it grants use of exit nodes)"
                        .to_string(),
                ),
                _ => Err(format!(
                    "{text:?} is not supported; use autogroup:member, autogroup:tagged, autogroup:self or autogroup:internet"
                )),
            };
        }
        if let Some(net) = self.policy.hosts.get(text) {
            return Ok(SelKind::Prefix(*net));
        }
        if text.starts_with(|c: char| c.is_ascii_digit()) || text.contains(':') {
            return Err(format!("invalid IP address {text:?}"));
        }
        Err(format!(
            "unknown alias {text:?}: not a user, group, tag, autogroup, host or IP address"
        ))
    }

    /// `{"routes": {CIDR: [approver, ...]}, "exitNode": [approver, ...]}`.
    fn auto_approvers(&mut self, v: &Value) {
        let Some(members) = self.object(v, "\"autoApprovers\"") else {
            return;
        };
        self.unique_keys(members, "\"autoApprovers\"");
        for m in members {
            match m.key.to_ascii_lowercase().as_str() {
                "routes" => {
                    let Some(routes) = self.object(&m.value, "\"autoApprovers.routes\"") else {
                        continue;
                    };
                    for r in routes {
                        let net = match approver_route(&r.key) {
                            Ok(net) => Some(net),
                            Err(e) => {
                                self.sink.error(r.key_pos, e);
                                None
                            }
                        };
                        let what = format!("the approvers of route {:?}", r.key);
                        let approvers = self.approvers(&r.value, &what);
                        if let Some(net) = net {
                            self.policy.auto_routes.push((net, approvers));
                        }
                    }
                }
                "exitnode" => {
                    let approvers = self.approvers(&m.value, "\"autoApprovers.exitNode\"");
                    self.policy.auto_exit.extend(approvers);
                }
                _ => self.sink.error(
                    m.key_pos,
                    format!(
                        "unknown key {:?} in autoApprovers; expected routes or exitNode",
                        m.key
                    ),
                ),
            }
        }
    }

    /// `{"split": {SUFFIX: [RESOLVER, ...]}}`.
    fn dns(&mut self, v: &Value) {
        let Some(members) = self.object(v, "\"dns\"") else {
            return;
        };
        for m in members {
            if m.key.eq_ignore_ascii_case("split") {
                self.split_dns(&m.value);
            } else {
                self.sink.error(
                    m.key_pos,
                    format!("unknown key {:?} in dns; expected split", m.key),
                );
            }
        }
    }

    fn split_dns(&mut self, v: &Value) {
        let Some(routes) = self.object(v, "\"dns.split\"") else {
            return;
        };
        let mut split: BTreeMap<String, Vec<SocketAddr>> = BTreeMap::new();
        for (i, r) in routes.iter().enumerate() {
            if i == MAX_SPLIT_SUFFIXES {
                self.sink.error(
                    r.key_pos,
                    format!("too many split DNS suffixes: at most {MAX_SPLIT_SUFFIXES}"),
                );
            }
            let suffix = match dns::split_suffix(&r.key) {
                Ok(s) => Some(s),
                Err(e) => {
                    self.sink.error(r.key_pos, e);
                    None
                }
            };
            if let Some(s) = &suffix {
                if split.contains_key(s) {
                    self.sink.error(
                        r.key_pos,
                        format!(
                            "duplicate split DNS suffix {s:?} (suffixes match case-insensitively)"
                        ),
                    );
                }
            }
            let what = format!("the resolvers of {:?}", r.key);
            let resolvers = self.strings(&r.value, &what);
            if matches!(&r.value.kind, Kind::Array(items) if items.is_empty()) {
                self.sink.error(
                    r.value.pos,
                    format!("{what} must name at least one resolver"),
                );
            }
            let mut addrs: Vec<SocketAddr> = Vec::new();
            for (j, (pos, text)) in resolvers.into_iter().enumerate() {
                if j == MAX_SPLIT_RESOLVERS {
                    self.sink.error(
                        pos,
                        format!(
                            "too many resolvers for {:?}: at most {MAX_SPLIT_RESOLVERS}",
                            r.key
                        ),
                    );
                }
                match dns::resolver(text) {
                    Ok(a) if addrs.contains(&a) => {
                        self.sink.error(pos, format!("duplicate resolver {text:?}"));
                    }
                    Ok(a) => addrs.push(a),
                    Err(e) => self.sink.error(pos, e),
                }
            }
            if let Some(s) = suffix {
                split.entry(s).or_insert(addrs);
            }
        }
        self.policy.split_dns = split.into_iter().collect();
    }

    /// `{"posture:NAME": ["CONDITION", ...]}`.
    fn postures(&mut self, v: &Value) {
        let Some(members) = self.object(v, "\"postures\"") else {
            return;
        };
        let mut postures: BTreeMap<String, Posture> = BTreeMap::new();
        for (i, m) in members.iter().enumerate() {
            if i == MAX_POSTURES {
                self.sink.error(
                    m.key_pos,
                    format!("too many postures: at most {MAX_POSTURES}"),
                );
            }
            let valid = m.key.strip_prefix("posture:").is_some_and(valid_name);
            if !valid {
                self.sink.error(
                    m.key_pos,
                    format!(
                        "invalid posture name {:?}: expected \"posture:NAME\" (letters, digits, '-', '_', '.')",
                        m.key
                    ),
                );
            }
            let what = format!("the conditions of {:?}", m.key);
            let mut conditions = Vec::new();
            for (j, (pos, text)) in self.strings(&m.value, &what).into_iter().enumerate() {
                if j == MAX_CONDITIONS {
                    self.sink.error(
                        pos,
                        format!(
                            "too many conditions in {:?}: at most {MAX_CONDITIONS}",
                            m.key
                        ),
                    );
                }
                match posture::parse_condition(text) {
                    Ok(c) => conditions.push(c),
                    Err(e) => {
                        let at = self.inside_string(pos, text, e.offset);
                        self.sink.error(at, e.message);
                    }
                }
            }
            if valid && i < MAX_POSTURES {
                postures.insert(
                    m.key.clone(),
                    Posture {
                        name: m.key.clone(),
                        conditions,
                    },
                );
            }
        }
        self.policy.postures = postures.into_values().collect();
    }

    /// A list of `posture:NAME` references (`srcPosture`,
    /// `defaultSrcPosture`), deduplicated; `None` if one is not defined.
    fn posture_refs(&mut self, v: &Value, what: &str) -> Option<Vec<String>> {
        let mut ok = matches!(v.kind, Kind::Array(_));
        let mut names: Vec<String> = Vec::new();
        for (pos, s) in self.strings(v, what) {
            let defined = self.policy.postures.iter().any(|p| p.name == s);
            if defined {
                if !names.iter().any(|n| n == s) {
                    names.push(s.to_string());
                }
                continue;
            }
            ok = false;
            let message = if s.strip_prefix("posture:").is_some_and(valid_name) {
                format!("undefined posture {s:?}: define it in \"postures\"")
            } else {
                format!("invalid posture reference {s:?}: expected \"posture:NAME\"")
            };
            self.sink.error(pos, message);
        }
        if let Kind::Array(items) = &v.kind {
            ok &= items.iter().all(|i| matches!(i.kind, Kind::String(_)));
        }
        ok.then_some(names)
    }

    /// The requirement of defined posture names: `None` when there are none
    /// or one has no conditions (every source passes it).
    fn gate(&self, names: &[String]) -> Option<Gate> {
        let mut postures = Vec::new();
        for name in names {
            let i = self.policy.postures.iter().position(|p| &p.name == name)?;
            if self.policy.postures[i].is_open() {
                return None;
            }
            postures.push(i);
        }
        postures.sort_unstable();
        postures.dedup();
        (!postures.is_empty()).then_some(Gate { postures })
    }

    /// A test's `srcPostureAttrs`: `{"custom:compliant": true, "node:os": "linux"}`.
    fn src_posture_attrs(&mut self, v: &Value) -> Option<Attributes> {
        let members = self.object(v, "\"srcPostureAttrs\"")?;
        let mut ok = true;
        let mut values = BTreeMap::new();
        for (i, m) in members.iter().enumerate() {
            if i == MAX_TEST_ATTRIBUTES {
                self.sink.error(
                    m.key_pos,
                    format!("too many attributes: at most {MAX_TEST_ATTRIBUTES}"),
                );
                ok = false;
            }
            let ty = match posture::attribute_type(&m.key) {
                Ok(t) => t,
                Err(e) => {
                    self.sink.error(m.key_pos, e);
                    ok = false;
                    continue;
                }
            };
            let value = match &m.value.kind {
                Kind::String(s) if s.len() > MAX_ATTR_VALUE_LEN => Err(format!(
                    "value of {:?} is longer than {MAX_ATTR_VALUE_LEN} bytes",
                    m.key
                )),
                Kind::String(s) => Ok(AttrValue::Str(s.clone())),
                Kind::Bool(b) => Ok(AttrValue::Bool(*b)),
                Kind::Number(n) => n.parse::<i64>().map(AttrValue::Int).map_err(|_| {
                    format!(
                        "value of {:?} must be a whole number in the 64-bit range, found {n}",
                        m.key
                    )
                }),
                other => Err(format!(
                    "value of {:?} must be a string, number or boolean, found {}",
                    m.key,
                    other.name()
                )),
            };
            let value = value.and_then(|val| {
                let got = match val {
                    AttrValue::Str(_) => AttrType::Str,
                    AttrValue::Int(_) => AttrType::Int,
                    AttrValue::Bool(_) => AttrType::Bool,
                };
                match ty {
                    Some(want) if want != got => Err(format!(
                        "{} holds {}, found {}",
                        m.key,
                        type_name(want),
                        m.value.kind.name()
                    )),
                    _ => Ok(val),
                }
            });
            match value {
                Ok(val) => {
                    values.insert(m.key.clone(), val);
                }
                Err(e) => {
                    self.sink.error(m.value.pos, e);
                    ok = false;
                }
            }
        }
        ok.then_some(Attributes {
            values,
            fresh: true,
        })
    }

    /// The position of character `offset` inside the JSON string literal
    /// at `pos` whose value is `value`: exact when the literal holds no
    /// escapes (its source text is the value), else the literal's start.
    fn inside_string(&self, pos: Pos, value: &str, offset: usize) -> Pos {
        let line = self
            .text
            .split('\n')
            .nth(pos.line.saturating_sub(1) as usize)
            .unwrap_or("");
        let line = if pos.line == 1 {
            line.strip_prefix('\u{feff}').unwrap_or(line)
        } else {
            line
        };
        let mut chars = line.chars().skip(pos.col.saturating_sub(1) as usize);
        if chars.next() != Some('"') {
            return pos;
        }
        let raw: String = chars.take_while(|c| !matches!(c, '"' | '\\')).collect();
        match u32::try_from(offset) {
            Ok(off) if raw == value => Pos {
                line: pos.line,
                col: pos.col.saturating_add(1).saturating_add(off),
            },
            _ => pos,
        }
    }

    /// The approvers of one `autoApprovers` list: users, groups, tags, `autogroup:member`.
    fn approvers(&mut self, v: &Value, what: &str) -> Vec<SelKind> {
        let mut out = Vec::new();
        for (pos, s) in self.strings(v, what) {
            match self.approver(s) {
                Ok(kind) => out.push(kind),
                Err(e) => self.sink.error(pos, e),
            }
        }
        out
    }

    fn approver(&self, s: &str) -> Result<SelKind, String> {
        if s == "autogroup:member" {
            return Ok(SelKind::Member);
        }
        if s.starts_with("group:") {
            return match self.policy.groups.get(s) {
                Some(users) => Ok(SelKind::Users(users.clone())),
                None => Err(format!("undefined group {s:?}")),
            };
        }
        if s.starts_with("tag:") {
            return if self.policy.tag_owners.contains_key(s) {
                Ok(SelKind::Tag(s.to_string()))
            } else {
                Err(format!("tag {s:?} is not defined in tagOwners"))
            };
        }
        if !s.starts_with("autogroup:") && valid_user(s) {
            return Ok(SelKind::Users(BTreeSet::from([s.to_string()])));
        }
        Err(format!(
            "invalid approver {s:?}: expected a user, group, tag or autogroup:member"
        ))
    }

    fn tests(&mut self, v: &Value) {
        let Some(items) = self.array(v, "\"tests\"") else {
            return;
        };
        for item in items {
            if let Some(t) = self.test(item) {
                self.policy.tests.push(t);
            }
        }
    }

    fn test(&mut self, v: &Value) -> Option<TestCase> {
        let members = self.object(v, "a test")?;
        if !self.unique_keys(members, "a test") {
            return None;
        }
        let mut ok = true;
        let mut src = None;
        let mut proto = DEFAULT_TEST_PROTO;
        let mut accept = Vec::new();
        let mut deny = Vec::new();
        let mut attrs = None;
        // Whether "accept" or "deny" names at least one destination (valid or not).
        let mut asserted = false;
        for m in members {
            match m.key.to_ascii_lowercase().as_str() {
                "src" => {
                    if let Some(s) = self.string(&m.value, "\"src\"") {
                        match self.policy.identity(s) {
                            Ok(id) => src = Some((s.to_string(), id)),
                            Err(e) => self.sink.error(m.value.pos, e),
                        }
                    }
                    ok &= src.is_some();
                }
                "proto" => match self.proto(&m.value) {
                    Some(p) => proto = p,
                    None => ok = false,
                },
                "accept" | "deny" => {
                    let mut list = Vec::new();
                    for (pos, s) in self.strings(&m.value, &format!("{:?}", m.key)) {
                        asserted = true;
                        match self.test_dst(s) {
                            Ok((dst, port)) => list.push(TestDst {
                                pos,
                                text: s.to_string(),
                                dst,
                                port,
                            }),
                            Err(e) => {
                                self.sink.error(pos, e);
                                ok = false;
                            }
                        }
                    }
                    if m.key.eq_ignore_ascii_case("accept") {
                        accept = list;
                    } else {
                        deny = list;
                    }
                }
                "srcpostureattrs" => match self.src_posture_attrs(&m.value) {
                    Some(a) => attrs = Some(a),
                    None => ok = false,
                },
                _ => {
                    self.sink.error(
                        m.key_pos,
                        format!(
                            "unknown key {:?} in test; expected src, proto, accept, deny or srcPostureAttrs",
                            m.key
                        ),
                    );
                    ok = false;
                }
            }
        }
        if !members.iter().any(|m| m.key.eq_ignore_ascii_case("src")) {
            self.sink.error(v.pos, "test has no \"src\"");
            ok = false;
        }
        let lists_ok = members.iter().all(|m| {
            !matches!(m.key.to_ascii_lowercase().as_str(), "accept" | "deny")
                || matches!(m.value.kind, Kind::Array(_))
        });
        if !asserted && lists_ok {
            // A test without destinations always passes: it would hide a typo.
            self.sink.error(
                v.pos,
                "test asserts nothing: give \"accept\" or \"deny\" destinations",
            );
            ok = false;
        }
        let (src_text, src) = src?;
        ok.then_some(TestCase {
            pos: v.pos,
            src_text,
            src,
            proto,
            accept,
            deny,
            attrs,
        })
    }

    fn test_dst(&self, text: &str) -> Result<(Identity, u16), String> {
        let (host, port) = split_host_port(text)?;
        let dst = self.policy.identity(&host)?;
        // A test destination is one host: "accept 100.64.0.0/10:22" would pass
        // when any one address in the range is reachable. A /32 or /128 is
        // one host, so it is accepted.
        if let Identity::Addr(net) = &dst {
            if net.prefix_len() != net.max_prefix_len() {
                return Err(if host.contains('/') {
                    format!(
                        "test destination {text:?} is a range of addresses; name one host (an IP, a /32 or /128, a user, group, tag or host alias of one address)"
                    )
                } else {
                    format!(
                        "test destination {text:?}: host {host:?} is the range {net}; name one host (an IP, a /32 or /128, a user, group, tag or host alias of one address)"
                    )
                });
            }
        }
        let ports = parse_ports(port)?;
        match ports.as_slice() {
            [r] if r.first == r.last => Ok((dst, r.first)),
            _ => Err(format!(
                "test destination {text:?} must name a single port, e.g. \"{host}:22\""
            )),
        }
    }
}
