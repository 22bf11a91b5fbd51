//! MagicDNS: every node answers DNS on 100.100.100.100 for the names of the
//! nodes in its netmap and forwards the rest.
//!
//! This module is the pure core (no I/O, no clock): [`decide`] turns one
//! query message and the current [`Zone`] into a [`Decision`] — an answer
//! to send back, a query to forward to some resolvers, or a drop with its
//! reason — plus the small message helpers the shell needs around
//! forwarding ([`error_response`], [`with_id`], [`response_matches`],
//! [`fit_udp`]). Messages are decoded and encoded with `hickory-proto`.
//!
//! What [`decide`] answers:
//! - `A`/`AAAA`/`ANY` for `NAME.<domain>` → the node's overlay addresses,
//!   TTL [`TTL_SECS`] (short, so renames and removals show within a
//!   minute even in caching stub resolvers); other types for a known
//!   name and the domain itself → NOERROR with no records; any other
//!   name under the domain (a node this node may not see is not in its
//!   map) → NXDOMAIN. These answers are authoritative (AA).
//! - `PTR` for the reverse name of a visible node's overlay address →
//!   `NAME.<domain>`; other reverse names inside the overlay (100.64.0.0/10
//!   and this node's ULA /48) → NXDOMAIN, never asked upstream.
//! - A name under a split DNS suffix (the longest matching suffix wins) →
//!   forwarded to that suffix's resolvers (SERVFAIL when it has none);
//!   anything else → forwarded to the upstreams (SERVFAIL when there are
//!   none).
//! - Bad input: a message over [`MAX_MESSAGE_BYTES`] or shorter than a
//!   header → dropped; a response (QR=1) → dropped (never answer an
//!   answer: that is how reflection loops start); an opcode other than
//!   QUERY → NOTIMP; not exactly one question, or a body that does not
//!   decode → FORMERR; EDNS version above 0 → BADVERS; a class other than
//!   IN or ANY under the domain → REFUSED.
//!
//! The shells: [`server`] (UDP and TCP listeners, forwarding, rate limit,
//! counters) and [`hostcfg`] (pointing the host's resolver at MagicDNS and
//! back). [`limit`] is the pure per-source token bucket the server uses.

pub mod hostcfg;
pub mod limit;
pub mod name;
pub mod server;
mod zone;

use std::net::SocketAddr;

use hickory_proto::op::{Edns, Message, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

pub use zone::{Addrs, Zone, DEFAULT_DOMAIN, MAGIC_DNS_ADDR};

use name::{reverse_addr, strip_suffix};

/// Largest query accepted, over UDP or TCP; larger ones are dropped. Real
/// queries are a few hundred bytes; 4096 leaves room for EDNS options.
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// TTL of mesh answers (A, AAAA, PTR), in seconds.
pub const TTL_SECS: u32 = 60;

/// The UDP payload size this server advertises in EDNS answers (the DNS
/// flag day 2020 value: no IP fragmentation on common paths).
pub const EDNS_PAYLOAD: u16 = 1232;

/// A DNS header is 12 bytes.
const HEADER_LEN: usize = 12;

/// The UDP answer limit of a client without EDNS (RFC 1035 §4.2.1).
const PLAIN_UDP_LIMIT: usize = 512;

/// What to do with one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Send these bytes back to the client.
    Answer(Vec<u8>),
    /// Ask these resolvers (in any order, the first good answer wins) and
    /// relay the answer with the client's query id.
    Forward {
        /// The resolvers of the name's split DNS suffix, or the upstreams.
        to: Vec<SocketAddr>,
        /// The client's query, unchanged.
        query: Vec<u8>,
    },
    /// Send nothing; count the reason.
    Drop(DropReason),
}

/// Why a message got no answer at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Longer than [`MAX_MESSAGE_BYTES`].
    Oversized,
    /// Too short to hold a DNS header: there is no id to answer to.
    Malformed,
    /// A response (QR=1), not a query.
    Response,
}

/// Decides what to do with one DNS message received from a client.
///
/// Pure and total: any byte string gives a decision, never a panic.
pub fn decide(query: &[u8], zone: &Zone) -> Decision {
    if query.len() > MAX_MESSAGE_BYTES {
        return Decision::Drop(DropReason::Oversized);
    }
    let Some(header) = RawHeader::read(query) else {
        return Decision::Drop(DropReason::Malformed);
    };
    if header.is_response() {
        return Decision::Drop(DropReason::Response);
    }
    if header.opcode() != 0 {
        return Decision::Answer(header.error(ResponseCode::NotImp));
    }
    if header.question_count() != 1 {
        return Decision::Answer(header.error(ResponseCode::FormErr));
    }
    let msg = match Message::from_vec(query) {
        Ok(msg) if msg.queries.len() == 1 => msg,
        _ => return Decision::Answer(header.error(ResponseCode::FormErr)),
    };
    if msg.edns.as_ref().is_some_and(|e| e.version() > 0) {
        return Decision::Answer(respond(&msg, ResponseCode::BADVERS, false, Vec::new()));
    }
    let q = &msg.queries[0];
    let name: Vec<Vec<u8>> = q.name().iter().map(<[u8]>::to_ascii_lowercase).collect();
    let class_ok = matches!(q.query_class(), DNSClass::IN | DNSClass::ANY);

    if let Some(rel) = strip_suffix(&name, zone.domain_labels()) {
        if !class_ok {
            return Decision::Answer(respond(&msg, ResponseCode::Refused, false, Vec::new()));
        }
        return Decision::Answer(mesh_answer(&msg, rel, zone));
    }
    if class_ok {
        if let Some(ip) = reverse_addr(&name).filter(|ip| zone.in_overlay(*ip)) {
            let Some(node) = zone.name_of(ip) else {
                return Decision::Answer(respond(&msg, ResponseCode::NXDomain, true, Vec::new()));
            };
            let mut answers = Vec::new();
            if matches!(q.query_type(), RecordType::PTR | RecordType::ANY) {
                if let Ok(target) = fqdn(node, zone) {
                    answers.push(Record::from_rdata(
                        q.name().clone(),
                        TTL_SECS,
                        RData::PTR(PTR(target)),
                    ));
                }
            }
            return Decision::Answer(respond(&msg, ResponseCode::NoError, true, answers));
        }
    }
    let split = zone
        .split_routes()
        .filter(|(labels, _)| strip_suffix(&name, labels).is_some())
        .max_by_key(|(labels, _)| labels.len());
    let to = match split {
        Some((_, resolvers)) => resolvers,
        None => zone.upstreams(),
    };
    if to.is_empty() {
        return Decision::Answer(respond(&msg, ResponseCode::ServFail, false, Vec::new()));
    }
    Decision::Forward {
        to: to.to_vec(),
        query: query.to_vec(),
    }
}

/// An answer to `query` with `rcode` and no records: the question echoed
/// when the query decodes, the bare header otherwise. `None` when `query`
/// has no complete header.
///
/// The shell answers SERVFAIL with it when no resolver answered.
pub fn error_response(query: &[u8], rcode: ResponseCode) -> Option<Vec<u8>> {
    let header = RawHeader::read(query)?;
    match Message::from_vec(query) {
        Ok(msg) if msg.queries.len() == 1 => Some(respond(&msg, rcode, false, Vec::new())),
        _ => Some(header.error(rcode)),
    }
}

/// The message id (first two bytes), if there is a header.
pub fn message_id(message: &[u8]) -> Option<u16> {
    RawHeader::read(message).map(|h| h.id())
}

/// `message` with its id replaced by `id` (unchanged when shorter than a
/// header).
pub fn with_id(message: &[u8], id: u16) -> Vec<u8> {
    let mut out = message.to_vec();
    if out.len() >= HEADER_LEN {
        out[..2].copy_from_slice(&id.to_be_bytes());
    }
    out
}

/// Whether `response` answers `query`: a decodable response (QR=1) with the
/// same id, opcode and question (names compared case-insensitively).
///
/// The forwarder discards anything else: a late answer to an earlier
/// query, or a spoofed datagram.
pub fn response_matches(query: &[u8], response: &[u8]) -> bool {
    let (Some(qh), Some(rh)) = (RawHeader::read(query), RawHeader::read(response)) else {
        return false;
    };
    if !rh.is_response() || qh.id() != rh.id() || qh.opcode() != rh.opcode() {
        return false;
    }
    match (Message::from_vec(query), Message::from_vec(response)) {
        (Ok(q), Ok(r)) => q.queries == r.queries,
        _ => false,
    }
}

/// The 4-bit response code of a message's header (SERVFAIL is 2,
/// REFUSED 5), if there is a header.
pub fn rcode(message: &[u8]) -> Option<u8> {
    RawHeader::read(message).map(|h| h.0[3] & 0x0f)
}

/// Whether a response has the TC (truncated) bit set.
pub fn is_truncated(response: &[u8]) -> bool {
    RawHeader::read(response).is_some_and(|h| h.0[2] & 0x02 != 0)
}

/// The largest UDP answer the client of `query` accepts: its EDNS payload
/// size (at least 512, at most [`MAX_MESSAGE_BYTES`]), or 512 without EDNS.
pub fn udp_limit(query: &[u8]) -> usize {
    match Message::from_vec(query) {
        Ok(Message { edns: Some(e), .. }) => {
            usize::from(e.max_payload()).clamp(PLAIN_UDP_LIMIT, MAX_MESSAGE_BYTES)
        }
        _ => PLAIN_UDP_LIMIT,
    }
}

/// `response` if it fits the UDP limit of `query`'s client; otherwise the
/// same header with TC=1 and only the question, so the client retries over
/// TCP (RFC 1035 §4.2.1, RFC 7766).
pub fn fit_udp(query: &[u8], response: Vec<u8>) -> Vec<u8> {
    if response.len() <= udp_limit(query) {
        return response;
    }
    match Message::from_vec(&response).map(|r| r.truncate().to_vec()) {
        Ok(Ok(truncated)) if truncated.len() <= PLAIN_UDP_LIMIT => truncated,
        // A response whose question alone does not fit: the bare header.
        _ => {
            let mut bare = response[..HEADER_LEN.min(response.len())].to_vec();
            if bare.len() == HEADER_LEN {
                bare[2] |= 0x02;
                bare[4..].fill(0);
            }
            bare
        }
    }
}

/// The answer for a name under the mesh domain; `rel` holds the labels left
/// of the domain.
fn mesh_answer(msg: &Message, rel: &[Vec<u8>], zone: &Zone) -> Vec<u8> {
    let q = &msg.queries[0];
    let node = match rel {
        [] => return respond(msg, ResponseCode::NoError, true, Vec::new()),
        [label] => std::str::from_utf8(label)
            .ok()
            .and_then(|l| zone.records().get(l)),
        _ => None,
    };
    let Some((v4, v6)) = node else {
        return respond(msg, ResponseCode::NXDomain, true, Vec::new());
    };
    let qtype = q.query_type();
    let mut answers = Vec::new();
    if matches!(qtype, RecordType::A | RecordType::ANY) {
        for ip in v4 {
            answers.push(Record::from_rdata(
                q.name().clone(),
                TTL_SECS,
                RData::A(A(*ip)),
            ));
        }
    }
    if matches!(qtype, RecordType::AAAA | RecordType::ANY) {
        for ip in v6 {
            answers.push(Record::from_rdata(
                q.name().clone(),
                TTL_SECS,
                RData::AAAA(AAAA(*ip)),
            ));
        }
    }
    respond(msg, ResponseCode::NoError, true, answers)
}

/// `NODE.<domain>.` as a name.
fn fqdn(node: &str, zone: &Zone) -> Result<Name, hickory_proto::ProtoError> {
    Name::from_labels(
        std::iter::once(node.as_bytes()).chain(zone.domain_labels().iter().map(Vec::as_slice)),
    )
}

/// A response to `msg` (which has exactly one question): the question
/// echoed as received (case preserved, for clients that randomize it),
/// RD and CD copied, RA set (this server recurses by forwarding), and an
/// EDNS record when the query had one.
fn respond(
    msg: &Message,
    rcode: ResponseCode,
    authoritative: bool,
    answers: Vec<Record>,
) -> Vec<u8> {
    let mut r = Message::response(msg.metadata.id, OpCode::Query);
    r.metadata.authoritative = authoritative;
    r.metadata.recursion_desired = msg.metadata.recursion_desired;
    r.metadata.recursion_available = true;
    r.metadata.checking_disabled = msg.metadata.checking_disabled;
    r.metadata.response_code = rcode;
    r.add_queries(msg.queries.iter().cloned());
    r.add_answers(answers);
    if msg.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        r.set_edns(edns);
    }
    match r.to_vec() {
        Ok(bytes) => bytes,
        // Unreachable for a question that just decoded; answer without it.
        Err(_) => RawHeader::from_message(msg).error(ResponseCode::ServFail),
    }
}

/// The fixed 12-byte header, read without decoding the rest.
#[derive(Debug, Clone, Copy)]
struct RawHeader([u8; HEADER_LEN]);

impl RawHeader {
    fn read(message: &[u8]) -> Option<RawHeader> {
        message.get(..HEADER_LEN)?.try_into().ok().map(RawHeader)
    }

    fn from_message(msg: &Message) -> RawHeader {
        let mut h = [0u8; HEADER_LEN];
        h[..2].copy_from_slice(&msg.metadata.id.to_be_bytes());
        h[2] = u8::from(msg.metadata.recursion_desired);
        RawHeader(h)
    }

    fn id(&self) -> u16 {
        u16::from_be_bytes([self.0[0], self.0[1]])
    }

    fn is_response(&self) -> bool {
        self.0[2] & 0x80 != 0
    }

    fn opcode(&self) -> u8 {
        (self.0[2] >> 3) & 0x0f
    }

    fn question_count(&self) -> u16 {
        u16::from_be_bytes([self.0[4], self.0[5]])
    }

    /// A response with `rcode` (below 16) and no sections: id, opcode and
    /// RD copied, QR and RA set.
    fn error(&self, rcode: ResponseCode) -> Vec<u8> {
        let mut out = vec![0u8; HEADER_LEN];
        out[..2].copy_from_slice(&self.0[..2]);
        out[2] = 0x80 | (self.0[2] & 0x78) | (self.0[2] & 0x01);
        out[3] = 0x80 | rcode.low();
        out
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use hickory_proto::op::{MessageType, Query};
    use proptest::prelude::*;
    use ztmesh_proto::control as pb;

    use super::*;

    const ID: u16 = 0x1234;

    /// laptop (this node), web, db (IPv4 only), a router serving a subnet;
    /// split DNS for example.corp and eng.example.corp.
    fn netmap() -> pb::NetMap {
        let peer = |id: u64, name: &str, ips: &[&str]| pb::Peer {
            id,
            name: name.into(),
            allowed_ips: ips.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        pb::NetMap {
            dns_domain: "ztmesh.internal".into(),
            self_node: Some(pb::NodeInfo {
                id: 1,
                name: "laptop".into(),
                addresses: vec!["100.64.0.1/32".into(), "fd00:1:2::1/128".into()],
                ..Default::default()
            }),
            peers: vec![
                peer(2, "web", &["100.64.0.2/32", "fd00:1:2::2/128"]),
                peer(3, "DB", &["100.64.0.3/32"]),
                peer(
                    4,
                    "router",
                    &["100.64.0.4/32", "fd00:1:2::4/128", "198.19.50.0/24"],
                ),
            ],
            split_dns: vec![
                pb::SplitDns {
                    suffix: "example.corp".into(),
                    resolvers: vec!["198.19.50.53".into()],
                },
                pb::SplitDns {
                    suffix: "eng.example.corp".into(),
                    resolvers: vec!["198.19.50.54:5353".into(), "[fd00::54]:53".into()],
                },
                pb::SplitDns {
                    suffix: "dark.corp".into(),
                    resolvers: vec![],
                },
            ],
            ..Default::default()
        }
    }

    fn upstream() -> SocketAddr {
        "198.18.0.53:53".parse().unwrap()
    }

    fn zone() -> Zone {
        Zone::from_netmap(&netmap(), vec![upstream()])
    }

    fn query_msg(name: &str, qtype: RecordType) -> Message {
        let mut m = Message::new(ID, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        m
    }

    fn query(name: &str, qtype: RecordType) -> Vec<u8> {
        query_msg(name, qtype).to_vec().unwrap()
    }

    /// The decoded answer of a query the zone answers itself.
    fn answer(q: &[u8], zone: &Zone) -> Message {
        match decide(q, zone) {
            Decision::Answer(bytes) => {
                let m = Message::from_vec(&bytes).expect("answer decodes");
                assert_eq!(m.metadata.id, message_id(q).unwrap());
                assert_eq!(m.metadata.message_type, MessageType::Response);
                m
            }
            other => panic!("expected an answer, got {other:?}"),
        }
    }

    fn ips(m: &Message) -> Vec<IpAddr> {
        m.answers
            .iter()
            .filter_map(|r| match r.data {
                RData::A(A(ip)) => Some(IpAddr::V4(ip)),
                RData::AAAA(AAAA(ip)) => Some(IpAddr::V6(ip)),
                _ => None,
            })
            .collect()
    }

    fn ptr_target(m: &Message) -> Vec<String> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::PTR(PTR(name)) => Some(name.to_ascii()),
                _ => None,
            })
            .collect()
    }

    fn v4(s: &str) -> IpAddr {
        IpAddr::V4(s.parse::<Ipv4Addr>().unwrap())
    }

    fn v6(s: &str) -> IpAddr {
        IpAddr::V6(s.parse::<Ipv6Addr>().unwrap())
    }

    #[test]
    fn a_and_aaaa_for_visible_nodes_are_authoritative_with_a_short_ttl() {
        let z = zone();
        let a = answer(&query("web.ztmesh.internal.", RecordType::A), &z);
        assert_eq!(a.metadata.response_code, ResponseCode::NoError);
        assert!(a.metadata.authoritative);
        assert!(a.metadata.recursion_desired && a.metadata.recursion_available);
        assert_eq!(ips(&a), [v4("100.64.0.2")]);
        assert_eq!(a.answers[0].ttl, TTL_SECS);
        let aaaa = answer(&query("web.ztmesh.internal.", RecordType::AAAA), &z);
        assert_eq!(ips(&aaaa), [v6("fd00:1:2::2")]);
        // This node resolves too.
        let me = answer(&query("laptop.ztmesh.internal.", RecordType::A), &z);
        assert_eq!(ips(&me), [v4("100.64.0.1")]);
    }

    #[test]
    fn names_match_case_insensitively_and_the_question_keeps_its_case() {
        let z = zone();
        for name in [
            "WEB.ZTMesh.Internal.",
            "web.ztmesh.internal",
            "Db.ztmesh.internal.",
        ] {
            let a = answer(&query(name, RecordType::A), &z);
            assert_eq!(a.metadata.response_code, ResponseCode::NoError, "{name}");
            assert_eq!(ips(&a).len(), 1, "{name}");
            // Echoed byte for byte (0x20 randomization relies on it).
            let want = name.trim_end_matches('.');
            assert_eq!(a.queries[0].name().to_ascii().trim_end_matches('.'), want);
            assert_eq!(a.answers[0].name.to_ascii().trim_end_matches('.'), want);
        }
    }

    #[test]
    fn any_gives_both_families_and_other_types_give_no_records() {
        let z = zone();
        let any = answer(&query("web.ztmesh.internal.", RecordType::ANY), &z);
        assert_eq!(ips(&any), [v4("100.64.0.2"), v6("fd00:1:2::2")]);
        for qtype in [
            RecordType::MX,
            RecordType::TXT,
            RecordType::SRV,
            RecordType::HTTPS,
        ] {
            let m = answer(&query("web.ztmesh.internal.", qtype), &z);
            assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{qtype}");
            assert!(m.metadata.authoritative);
            assert!(m.answers.is_empty(), "{qtype}");
        }
        // db has no IPv6 address: AAAA is NOERROR without records.
        let db = answer(&query("db.ztmesh.internal.", RecordType::AAAA), &z);
        assert_eq!(db.metadata.response_code, ResponseCode::NoError);
        assert!(db.answers.is_empty());
        // The domain itself exists (it has names below it) and holds nothing.
        let apex = answer(&query("ztmesh.internal.", RecordType::A), &z);
        assert_eq!(apex.metadata.response_code, ResponseCode::NoError);
        assert!(apex.answers.is_empty());
    }

    #[test]
    fn names_that_are_no_visible_node_are_nxdomain() {
        let z = zone();
        // "hidden" is a node the policy keeps out of this node's map.
        for name in [
            "hidden.ztmesh.internal.",
            "www.web.ztmesh.internal.",
            "a.b.ztmesh.internal.",
        ] {
            let m = answer(&query(name, RecordType::A), &z);
            assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
            assert!(m.metadata.authoritative);
            assert!(m.answers.is_empty());
        }
        // Once the map lists it, it resolves.
        let mut map = netmap();
        map.peers.push(pb::Peer {
            id: 9,
            name: "hidden".into(),
            allowed_ips: vec!["100.64.0.9/32".into()],
            ..Default::default()
        });
        let z = Zone::from_netmap(&map, vec![upstream()]);
        assert_eq!(
            ips(&answer(
                &query("hidden.ztmesh.internal.", RecordType::A),
                &z
            )),
            [v4("100.64.0.9")]
        );
    }

    #[test]
    fn ptr_answers_overlay_addresses_of_visible_nodes() {
        let z = zone();
        for (ip, want) in [
            ("100.64.0.2", "web.ztmesh.internal."),
            ("fd00:1:2::2", "web.ztmesh.internal."),
            ("100.64.0.1", "laptop.ztmesh.internal."),
        ] {
            let rev = name::reverse_name(ip.parse().unwrap());
            let m = answer(&query(&format!("{rev}."), RecordType::PTR), &z);
            assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{ip}");
            assert!(m.metadata.authoritative);
            assert_eq!(ptr_target(&m), [want], "{ip}");
        }
        // Uppercase hex nibbles are the same name.
        let rev = name::reverse_name(v6("fd00:1:2::a")).to_ascii_uppercase();
        let m = answer(&query(&format!("{rev}."), RecordType::PTR), &z);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        // A known address asked for another type: no records.
        let m = answer(&query("2.0.64.100.in-addr.arpa.", RecordType::A), &z);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
    }

    #[test]
    fn ptr_inside_the_overlay_for_no_visible_node_is_nxdomain_and_outside_is_forwarded() {
        let z = zone();
        let m = answer(&query("9.0.64.100.in-addr.arpa.", RecordType::PTR), &z);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        let unknown_v6 = name::reverse_name(v6("fd00:1:2::99"));
        let m = answer(&query(&format!("{unknown_v6}."), RecordType::PTR), &z);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        // Outside the overlay (another ULA /48, the underlay): upstream.
        for ip in ["fd00:9::1", "198.18.0.1"] {
            let q = query(
                &format!("{}.", name::reverse_name(ip.parse().unwrap())),
                RecordType::PTR,
            );
            assert_eq!(
                decide(&q, &z),
                Decision::Forward {
                    to: vec![upstream()],
                    query: q.clone()
                },
                "{ip}"
            );
        }
        // A whole-network reverse name is not one address: upstream.
        let q = query("64.100.in-addr.arpa.", RecordType::PTR);
        assert!(matches!(decide(&q, &z), Decision::Forward { .. }));
    }

    #[test]
    fn split_dns_forwards_by_the_longest_suffix() {
        let z = zone();
        let corp: SocketAddr = "198.19.50.53:53".parse().unwrap();
        let eng: Vec<SocketAddr> = vec![
            "198.19.50.54:5353".parse().unwrap(),
            "[fd00::54]:53".parse().unwrap(),
        ];
        for (name, want) in [
            ("intranet.example.corp.", vec![corp]),
            ("EXAMPLE.corp.", vec![corp]),
            ("git.eng.example.corp.", eng.clone()),
            ("eng.example.corp", eng.clone()),
            // Whole labels only: "notexample.corp" is not under "example.corp".
            ("notexample.corp.", vec![upstream()]),
            ("example.org.", vec![upstream()]),
        ] {
            let q = query(name, RecordType::A);
            assert_eq!(
                decide(&q, &z),
                Decision::Forward {
                    to: want,
                    query: q.clone()
                },
                "{name}"
            );
        }
    }

    #[test]
    fn without_resolvers_the_answer_is_servfail() {
        // A split suffix whose resolvers were all unusable: its names are
        // not leaked to the upstreams.
        let z = zone();
        let m = answer(&query("secret.dark.corp.", RecordType::A), &z);
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        assert!(!m.metadata.authoritative);
        // No upstreams: every outside name is SERVFAIL; mesh names still work.
        let z = Zone::from_netmap(&netmap(), Vec::new());
        let m = answer(&query("example.org.", RecordType::A), &z);
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(m.queries.len(), 1);
        assert_eq!(
            ips(&answer(&query("web.ztmesh.internal.", RecordType::A), &z)).len(),
            1
        );
    }

    #[test]
    fn malformed_messages_get_formerr_when_the_header_is_readable() {
        let z = zone();
        assert_eq!(decide(&[], &z), Decision::Drop(DropReason::Malformed));
        assert_eq!(
            decide(&[0x12; 11], &z),
            Decision::Drop(DropReason::Malformed)
        );
        // A header claiming one question, then garbage.
        let mut bad = query("web.ztmesh.internal.", RecordType::A);
        bad.truncate(20);
        let Decision::Answer(a) = decide(&bad, &z) else {
            panic!("expected FORMERR");
        };
        assert_eq!(a.len(), HEADER_LEN);
        let m = Message::from_vec(&a).unwrap();
        assert_eq!(m.metadata.id, ID);
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        assert!(m.metadata.recursion_desired);
        // A label pointing at itself (a compression loop).
        let mut looped = query("web.ztmesh.internal.", RecordType::A)[..HEADER_LEN].to_vec();
        looped.extend_from_slice(&[0xc0, 0x0c, 0x00, 0x01, 0x00, 0x01]);
        let m = answer(&looped, &z);
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    }

    #[test]
    fn question_counts_other_than_one_are_formerr() {
        let z = zone();
        let mut two = query_msg("web.ztmesh.internal.", RecordType::A);
        two.add_query(Query::query(
            Name::from_ascii("db.ztmesh.internal.").unwrap(),
            RecordType::A,
        ));
        let m = answer(&two.to_vec().unwrap(), &z);
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        assert!(m.answers.is_empty());
        let none = Message::new(ID, MessageType::Query, OpCode::Query)
            .to_vec()
            .unwrap();
        assert_eq!(
            answer(&none, &z).metadata.response_code,
            ResponseCode::FormErr
        );
    }

    #[test]
    fn responses_and_oversized_messages_are_dropped() {
        let z = zone();
        let mut resp = query_msg("web.ztmesh.internal.", RecordType::A);
        resp.metadata.message_type = MessageType::Response;
        assert_eq!(
            decide(&resp.to_vec().unwrap(), &z),
            Decision::Drop(DropReason::Response)
        );
        let mut big = query("example.org.", RecordType::A);
        big.resize(MAX_MESSAGE_BYTES + 1, 0);
        assert_eq!(decide(&big, &z), Decision::Drop(DropReason::Oversized));
        // At the limit the message is judged, not dropped (trailing bytes
        // after the sections are ignored, as by other servers).
        big.truncate(MAX_MESSAGE_BYTES);
        assert!(matches!(decide(&big, &z), Decision::Forward { .. }));
    }

    #[test]
    fn other_opcodes_are_notimp_and_edns_is_answered_in_kind() {
        let z = zone();
        let mut update = query_msg("web.ztmesh.internal.", RecordType::A);
        update.metadata.op_code = OpCode::Update;
        let bytes = update.to_vec().unwrap();
        let Decision::Answer(a) = decide(&bytes, &z) else {
            panic!("expected NOTIMP");
        };
        let m = Message::from_vec(&a).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
        assert_eq!(m.metadata.op_code, OpCode::Update);

        let mut with_edns = query_msg("web.ztmesh.internal.", RecordType::A);
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        with_edns.set_edns(edns.clone());
        let m = answer(&with_edns.to_vec().unwrap(), &z);
        assert_eq!(m.edns.as_ref().map(Edns::max_payload), Some(EDNS_PAYLOAD));
        assert_eq!(ips(&m).len(), 1);
        // Without EDNS in the query, none in the answer.
        assert!(answer(&query("web.ztmesh.internal.", RecordType::A), &z)
            .edns
            .is_none());

        edns.set_version(1);
        with_edns.set_edns(edns);
        let m = answer(&with_edns.to_vec().unwrap(), &z);
        // BADVERS is 16 (RFC 6891), which decodes under its other name, BADSIG.
        assert_eq!(u16::from(m.metadata.response_code), 16);
        assert!(m.answers.is_empty());
    }

    #[test]
    fn classes_other_than_in_are_refused_under_the_domain_and_forwarded_elsewhere() {
        let z = zone();
        let mut chaos = query_msg("web.ztmesh.internal.", RecordType::TXT);
        chaos.queries[0].set_query_class(DNSClass::CH);
        let m = answer(&chaos.to_vec().unwrap(), &z);
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
        let mut version = query_msg("version.bind.", RecordType::TXT);
        version.queries[0].set_query_class(DNSClass::CH);
        assert!(matches!(
            decide(&version.to_vec().unwrap(), &z),
            Decision::Forward { .. }
        ));
    }

    #[test]
    fn zone_from_netmap_lowercases_skips_invalid_and_duplicate_names() {
        let mut map = netmap();
        map.peers.push(pb::Peer {
            id: 5,
            name: "bad_name".into(),
            allowed_ips: vec!["100.64.0.5/32".into()],
            ..Default::default()
        });
        map.peers.push(pb::Peer {
            id: 6,
            name: "Web".into(),
            allowed_ips: vec!["100.64.0.6/32".into()],
            ..Default::default()
        });
        map.peers.push(pb::Peer {
            id: 7,
            name: "-edge".into(),
            allowed_ips: vec!["100.64.0.7/32".into()],
            ..Default::default()
        });
        let z = Zone::from_netmap(&map, vec![upstream()]);
        let names: Vec<&str> = z.records().keys().map(String::as_str).collect();
        assert_eq!(names, ["db", "laptop", "router", "web"]);
        // The first "web" (lower id) keeps the name; the second is skipped.
        assert_eq!(
            z.records()["web"],
            (
                vec!["100.64.0.2".parse().unwrap()],
                vec!["fd00:1:2::2".parse().unwrap()]
            )
        );
        // A router's routes are not its addresses.
        assert_eq!(z.records()["router"].0, [Ipv4Addr::new(100, 64, 0, 4)]);
        assert_eq!(z.name_of(v4("100.64.0.6")), None);
    }

    #[test]
    fn zone_from_netmap_sanitizes_domain_split_routes_and_upstreams() {
        let mut map = netmap();
        map.dns_domain = "Mesh.Example.".into();
        map.split_dns.push(pb::SplitDns {
            suffix: "svc.mesh.example".into(),
            resolvers: vec!["198.19.50.53".into()],
        });
        map.split_dns.push(pb::SplitDns {
            suffix: "bad..corp".into(),
            resolvers: vec!["198.19.50.53".into()],
        });
        map.split_dns.push(pb::SplitDns {
            suffix: "Example.Corp.".into(),
            resolvers: vec!["198.19.50.99".into()],
        });
        map.split_dns.push(pb::SplitDns {
            suffix: "lab.corp".into(),
            resolvers: vec![
                "100.100.100.100".into(),
                "not an address".into(),
                "198.19.60.53:0".into(),
                "198.19.60.53".into(),
                "198.19.60.53:53".into(),
            ],
        });
        let loop_back: SocketAddr = "100.100.100.100:53".parse().unwrap();
        let z = Zone::from_netmap(&map, vec![loop_back, upstream(), upstream()]);
        assert_eq!(z.domain(), "mesh.example");
        let split: Vec<(&str, usize)> = z
            .split()
            .iter()
            .map(|(s, r)| (s.as_str(), r.len()))
            .collect();
        // Under the mesh domain and invalid: skipped; the repeat of
        // example.corp (after lowercasing) keeps the first resolvers.
        assert_eq!(
            split,
            [
                ("dark.corp", 0),
                ("eng.example.corp", 2),
                ("example.corp", 1),
                ("lab.corp", 1)
            ]
        );
        assert_eq!(
            z.split()[2].1,
            ["198.19.50.53:53".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            z.split()[3].1,
            ["198.19.60.53:53".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(z.upstreams(), [upstream()]);
        // The mesh domain answers for its whole tree.
        let m = answer(&query("x.svc.mesh.example.", RecordType::A), &z);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

        for bad in ["", "bad domain", "a..b"] {
            map.dns_domain = bad.into();
            assert_eq!(
                Zone::from_netmap(&map, Vec::new()).domain(),
                DEFAULT_DOMAIN,
                "{bad:?}"
            );
        }
        assert_eq!(Zone::default().domain(), DEFAULT_DOMAIN);
        assert!(Zone::default().records().is_empty());
    }

    #[test]
    fn forwarding_helpers_match_restore_ids_and_truncate() {
        let q = query("example.org.", RecordType::A);
        let sent = with_id(&q, 0xbeef);
        assert_eq!(message_id(&sent), Some(0xbeef));
        let mut resp = Message::from_vec(&sent).unwrap();
        resp.metadata.message_type = MessageType::Response;
        for i in 0..100u8 {
            resp.add_answer(Record::from_rdata(
                resp.queries[0].name().clone(),
                300,
                RData::A(A(Ipv4Addr::new(198, 18, 1, i))),
            ));
        }
        let resp = resp.to_vec().unwrap();
        assert!(response_matches(&sent, &resp));
        assert!(!response_matches(&q, &resp), "another id");
        assert!(!response_matches(&sent, &sent), "a query is not a response");
        let other = with_id(&query("example.net.", RecordType::A), 0xbeef);
        let mut other_resp = Message::from_vec(&other).unwrap();
        other_resp.metadata.message_type = MessageType::Response;
        assert!(
            !response_matches(&sent, &other_resp.to_vec().unwrap()),
            "another question"
        );
        assert!(!response_matches(&sent, &resp[..30]), "cut short");

        // 100 A records (~1.6 kB) do not fit a plain 512-byte UDP answer.
        let back = with_id(&resp, ID);
        assert_eq!(udp_limit(&q), 512);
        let fitted = fit_udp(&q, back.clone());
        assert!(is_truncated(&fitted));
        let m = Message::from_vec(&fitted).unwrap();
        assert_eq!(m.metadata.id, ID);
        assert_eq!(m.queries.len(), 1);
        assert!(m.answers.is_empty());
        // With EDNS 4096 they fit.
        let mut big = query_msg("example.org.", RecordType::A);
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        big.set_edns(edns);
        let big = big.to_vec().unwrap();
        assert_eq!(udp_limit(&big), 4096);
        assert_eq!(fit_udp(&big, back.clone()), back);
        assert!(!is_truncated(&back));

        let servfail = error_response(&q, ResponseCode::ServFail).unwrap();
        let m = Message::from_vec(&servfail).unwrap();
        assert_eq!(
            (m.metadata.id, m.metadata.response_code, m.queries.len()),
            (ID, ResponseCode::ServFail, 1)
        );
        assert_eq!(
            error_response(&q[..20], ResponseCode::ServFail).map(|b| b.len()),
            Some(HEADER_LEN)
        );
        assert_eq!(error_response(&q[..5], ResponseCode::ServFail), None);
    }

    proptest! {
        #[test]
        fn decide_is_total_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let z = zone();
            match decide(&bytes, &z) {
                Decision::Answer(a) => {
                    prop_assert!(a.len() >= HEADER_LEN);
                    prop_assert_eq!(&a[..2], &bytes[..2]);
                    prop_assert!(a[2] & 0x80 != 0);
                }
                Decision::Forward { query, to } => {
                    prop_assert_eq!(query, bytes);
                    prop_assert!(!to.is_empty());
                }
                Decision::Drop(_) => {}
            }
        }

        #[test]
        fn decide_is_total_on_mutated_queries(
            pick in 0usize..4,
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            let names = ["web.ztmesh.internal.", "2.0.64.100.in-addr.arpa.", "git.eng.example.corp.", "example.org."];
            let mut q = query(names[pick], RecordType::A);
            for (at, byte) in flips {
                let i = at % q.len();
                q[i] ^= byte;
            }
            q.truncate(cut % (q.len() + 1));
            let z = zone();
            let _ = decide(&q, &z);
            let _ = error_response(&q, ResponseCode::ServFail);
            let _ = fit_udp(&q, q.clone());
            let _ = response_matches(&q, &q);
        }
    }
}
