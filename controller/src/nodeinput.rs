//! Checks of what enrolled nodes send: reported endpoints and enrollment
//! keys. Pure: no I/O.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use ztmesh_policy::{AttrType, AttrValue, NODE_ATTRIBUTES};
use ztmesh_proto::control::{
    posture_attribute::Value as PbValue, FlowSummary, PeerPaths as PbPeerPaths, PostureAttribute,
};

use crate::error::{Error, Result};
use crate::model::{NodeRow, PeerPaths};
use crate::store::FlowRow;
use crate::UnixMs;

/// Endpoint candidates a node may report at most (local and reflexive
/// addresses of both families; more would only be noise every peer probes).
pub const MAX_ENDPOINTS: usize = 16;

/// Checks the endpoints a node reports and returns them canonical, sorted
/// and deduplicated.
///
/// # Errors
/// `Invalid` naming the first bad entry: not `ip:port`, port 0, or an
/// address no peer could use (unspecified, loopback, multicast, broadcast,
/// link-local); or more than [`MAX_ENDPOINTS`] entries.
pub fn validate_endpoints(endpoints: &[String]) -> Result<Vec<String>> {
    if endpoints.len() > MAX_ENDPOINTS {
        return Err(Error::Invalid(format!(
            "at most {MAX_ENDPOINTS} endpoints per report, got {}",
            endpoints.len()
        )));
    }
    let mut parsed = Vec::with_capacity(endpoints.len());
    for (i, e) in endpoints.iter().enumerate() {
        let shown: String = e.chars().take(64).collect();
        let sa: SocketAddr = e
            .parse()
            .map_err(|_| Error::Invalid(format!("endpoint #{i} {shown:?} is not ip:port")))?;
        let sa = SocketAddr::new(sa.ip().to_canonical(), sa.port());
        if let Some(why) = unusable_endpoint(&sa) {
            return Err(Error::Invalid(format!(
                "endpoint #{i} {shown:?} is refused: {why}"
            )));
        }
        parsed.push(sa.to_string());
    }
    parsed.sort();
    parsed.dedup();
    Ok(parsed)
}

/// Why peers could not use `sa` as a WireGuard endpoint, if they could not.
fn unusable_endpoint(sa: &SocketAddr) -> Option<&'static str> {
    if sa.port() == 0 {
        return Some("port 0");
    }
    match sa.ip() {
        IpAddr::V4(a) if a.is_unspecified() || a.octets()[0] == 0 => Some("unspecified address"),
        IpAddr::V4(a) if a.is_loopback() => Some("loopback address"),
        IpAddr::V4(a) if a.is_multicast() => Some("multicast address"),
        IpAddr::V4(a) if a.is_broadcast() => Some("broadcast address"),
        IpAddr::V4(a) if a.is_link_local() => Some("link-local address"),
        IpAddr::V6(a) if a.is_unspecified() => Some("unspecified address"),
        IpAddr::V6(a) if a.is_loopback() => Some("loopback address"),
        IpAddr::V6(a) if a.is_multicast() => Some("multicast address"),
        IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80 => {
            Some("link-local address (meaningless without its interface)")
        }
        _ => None,
    }
}

/// Whether an x25519 public key has small order (including zero and the
/// non-canonical encodings of such points): every Diffie-Hellman result
/// with it is all-zero, so a peer "handshaking" with it has no secret.
///
/// RFC 7748 §6.1: a clamped scalar is a multiple of the cofactor 8, so it
/// maps exactly the small-order points (of the curve and of its twist) to 0.
pub fn is_low_order_x25519(key: &[u8; 32]) -> bool {
    // Any fixed scalar works; the key is public, so no secret is involved.
    const PROBE: [u8; 32] = [0x5a; 32];
    x25519_dalek::x25519(PROBE, *key) == [0u8; 32]
}

/// Whether an ed25519 public key is weak (small order, e.g. the identity):
/// signatures by "anyone" could verify under it.
pub fn is_weak_ed25519(key: &[u8; 32]) -> bool {
    ed25519_dalek::VerifyingKey::from_bytes(key).is_ok_and(|k| k.is_weak())
}

/// Invisible formatting characters that can make text read as other text:
/// bidirectional overrides and isolates, zero-width characters, soft hyphen.
pub fn is_deceptive(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}')
}

/// Posture attributes a node's report keeps at most (there are fewer
/// known ones; more is a broken or hostile node).
pub const MAX_POSTURE_ATTRIBUTES: usize = 32;

/// Bytes of a posture attribute's text kept; longer values are clipped.
pub const MAX_POSTURE_VALUE: usize = 256;

/// Custom (admin-set) attributes a node may carry at most.
pub const MAX_CUSTOM_ATTRIBUTES: usize = 64;

/// A posture report's attributes, kept and clipped: what the controller
/// believes the node said, and one line per thing it dropped or cut
/// (for the audit log and the node's answer).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PostureReport {
    pub attributes: BTreeMap<String, AttrValue>,
    pub clipped: Vec<String>,
}

/// The first `max` bytes of `s`, cut at a character boundary.
fn clip(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A key for a message: printable, at most 64 characters.
fn shown(key: &str) -> String {
    key.chars()
        .filter(|c| !c.is_control() && !is_deceptive(*c))
        .take(64)
        .collect()
}

fn type_name(t: AttrType) -> &'static str {
    match t {
        AttrType::Str => "text",
        AttrType::Int => "number",
        AttrType::Bool => "flag",
    }
}

/// Sorts a node's posture report: only the known `node:*` attributes of
/// the right type are kept (the node cannot set `custom:*` ones, nor
/// invent others), text values are clipped to [`MAX_POSTURE_VALUE`] bytes
/// and control and deceptive (bidi, zero-width) characters removed, a repeated key keeps its first value,
/// and at most [`MAX_POSTURE_ATTRIBUTES`] entries are looked at. Never
/// fails: a node that says something odd is recorded, not cut off.
pub fn sanitize_posture(attrs: &[PostureAttribute]) -> PostureReport {
    let mut out = PostureReport::default();
    if attrs.len() > MAX_POSTURE_ATTRIBUTES {
        out.clipped.push(format!(
            "{} attributes sent, only the first {MAX_POSTURE_ATTRIBUTES} read",
            attrs.len()
        ));
    }
    for a in attrs.iter().take(MAX_POSTURE_ATTRIBUTES) {
        let Some(&(key, want)) = NODE_ATTRIBUTES.iter().find(|(k, _)| *k == a.key) else {
            out.clipped.push(format!(
                "{:?}: not an attribute a node reports",
                shown(&a.key)
            ));
            continue;
        };
        if out.attributes.contains_key(key) {
            out.clipped
                .push(format!("{key}: repeated, first value kept"));
            continue;
        }
        let value = match (&a.value, want) {
            (Some(PbValue::Text(t)), AttrType::Str) => {
                let clean: String = t
                    .chars()
                    .filter(|c| !c.is_control() && !is_deceptive(*c))
                    .collect();
                let kept = clip(&clean, MAX_POSTURE_VALUE);
                if kept.len() < t.len() {
                    out.clipped.push(format!(
                        "{key}: {} bytes, clipped to {}",
                        t.len(),
                        kept.len()
                    ));
                }
                AttrValue::Str(kept.to_string())
            }
            (Some(PbValue::Number(n)), AttrType::Int) => AttrValue::Int(*n),
            (Some(PbValue::Flag(b)), AttrType::Bool) => AttrValue::Bool(*b),
            (None, _) => {
                out.clipped.push(format!("{key}: no value"));
                continue;
            }
            (Some(_), t) => {
                out.clipped.push(format!("{key}: not a {}", type_name(t)));
                continue;
            }
        };
        out.attributes.insert(key.to_string(), value);
    }
    out
}

/// Checks a `custom:*` attribute an admin sets: the key is `custom:NAME`
/// (NAME of letters, digits, `_` and `-`, at most 64), text at most
/// [`MAX_POSTURE_VALUE`] bytes without control characters.
///
/// # Errors
/// `Invalid` naming the key and the problem.
pub fn validate_custom(key: &str, value: &AttrValue) -> Result<()> {
    let name = key.strip_prefix("custom:").ok_or_else(|| {
        Error::Invalid(format!(
            "{:?}: admins set custom:* attributes only (node:* ones are reported by the node)",
            shown(key)
        ))
    })?;
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(Error::Invalid(format!(
            "{:?}: the name after custom: must be 1-64 letters, digits, '_' or '-'",
            shown(key)
        )));
    }
    if let AttrValue::Str(s) = value {
        if s.len() > MAX_POSTURE_VALUE || s.chars().any(|c| c.is_control() || is_deceptive(c)) {
            return Err(Error::Invalid(format!(
                "{key}: text values are at most {MAX_POSTURE_VALUE} bytes, without control or invisible characters"
            )));
        }
    }
    Ok(())
}

/// A node's report of its peers by path, received at `now`, each count
/// clipped to `peers` (its peer count): a hostile node can misstate its
/// paths, not show more peers than it has.
pub fn peer_paths(report: &PbPeerPaths, peers: usize, now: UnixMs) -> PeerPaths {
    PeerPaths {
        direct: report.direct,
        relayed: report.relayed,
        none: report.none,
        reported_ms: now,
    }
    .clipped(peers)
}

/// Flow records one report may add at most: a node summarizes at most 1,024
/// allowed and 1,024 denied flows per report.
pub const MAX_FLOWS_PER_REPORT: usize = 2048;

/// Bytes of a rule id kept.
const MAX_FLOW_TEXT: usize = 128;

/// The reasons a node's filter denies for (`node::filter::Reason`); any
/// other reason a node reports is stored as `unknown`.
const DENY_REASONS: [&str; 6] = [
    "unparseable",
    "foreign_destination",
    "no_rule",
    "port_not_allowed",
    "orphan_fragment",
    "overlapping_fragment",
];

/// The flow records to store from `node`'s report: flows whose addresses,
/// protocol and port make sense and whose destination is the node's own
/// (its overlay addresses or the routes it serves; anything for an exit
/// node) — a node reports what its own filter decided, never flows "to"
/// another node — at most [`MAX_FLOWS_PER_REPORT`], rule ids printable and
/// clipped, denied reasons from the filter's list, an allowed flow with its
/// rule id only and a denied one with its reason only, times clamped to the
/// controller's clock (never in the future, first ≤ last; a flow without
/// times is stamped `now`). Returns the records and how many summaries were
/// dropped. The rest is the node's claim: authenticated, not verified.
pub fn flow_rows(node: &NodeRow, flows: &[FlowSummary], now: UnixMs) -> (Vec<FlowRow>, usize) {
    let text = |s: &str| -> String {
        let s: String = s
            .chars()
            .filter(|c| !c.is_control() && !is_deceptive(*c))
            .collect();
        clip(&s, MAX_FLOW_TEXT).to_string()
    };
    let mut owned: Vec<IpNet> = vec![
        IpNet::from(IpAddr::V4(node.ipv4)),
        IpNet::from(IpAddr::V6(node.ipv6)),
    ];
    owned.extend(node.routes.active());
    let exit = node.routes.exit_node();
    let mut rows = Vec::with_capacity(flows.len().min(MAX_FLOWS_PER_REPORT));
    for f in flows {
        if rows.len() == MAX_FLOWS_PER_REPORT {
            break;
        }
        let (Ok(src), Ok(dst), Ok(proto), Ok(dst_port)) = (
            f.src.parse::<IpAddr>(),
            f.dst.parse::<IpAddr>(),
            u8::try_from(f.protocol),
            u16::try_from(f.dst_port),
        ) else {
            continue;
        };
        if !exit && !owned.iter().any(|n| n.contains(&dst)) {
            continue;
        }
        let last = match f.last_seen_ms {
            t if t <= 0 => now,
            t => t.min(now),
        };
        let first = match f.first_seen_ms {
            t if t <= 0 => last,
            t => t.min(last),
        };
        rows.push(FlowRow {
            id: 0,
            time_ms: now,
            node_id: node.id,
            node_name: node.name.clone(),
            src: src.to_string(),
            dst: dst.to_string(),
            proto,
            dst_port,
            allowed: f.allowed,
            rule_id: if f.allowed {
                text(&f.rule_id)
            } else {
                String::new()
            },
            reason: match DENY_REASONS.iter().find(|r| **r == f.reason) {
                _ if f.allowed => String::new(),
                Some(r) => (*r).to_string(),
                None => "unknown".into(),
            },
            packets: f.packets,
            bytes: f.bytes,
            reply_packets: if f.allowed { f.reply_packets } else { 0 },
            reply_bytes: if f.allowed { f.reply_bytes } else { 0 },
            first_seen_ms: first,
            last_seen_ms: last,
        });
    }
    let dropped = flows.len() - rows.len();
    (rows, dropped)
}

#[cfg(test)]
mod tests {
    use rand_core::OsRng;
    use ztmesh_proto::keys::{SigningKey, WgPrivateKey};

    use super::*;

    #[test]
    fn endpoints_are_canonical_sorted_and_deduplicated() {
        let v = validate_endpoints(&[
            "[fd00::2]:51820".into(),
            "198.18.0.2:51820".into(),
            "[::ffff:198.18.0.2]:51820".into(),
        ])
        .unwrap();
        assert_eq!(v, vec!["198.18.0.2:51820", "[fd00::2]:51820"]);
        assert!(validate_endpoints(&[]).unwrap().is_empty());
    }

    #[test]
    fn unusable_endpoints_are_named_with_the_reason() {
        let table = [
            ("nonsense", "not ip:port"),
            ("198.18.0.1", "not ip:port"),
            ("198.18.0.1:0", "port 0"),
            ("0.1.2.3:1", "unspecified"),
            ("127.0.0.2:1", "loopback"),
            ("239.1.1.1:1", "multicast"),
            ("255.255.255.255:1", "broadcast"),
            ("169.254.0.1:1", "link-local"),
            ("[::]:1", "unspecified"),
            ("[::1]:1", "loopback"),
            ("[ff05::2]:1", "multicast"),
            ("[febf::1]:1", "link-local"),
            ("[::ffff:224.0.0.1]:1", "multicast"),
        ];
        for (ep, why) in table {
            let e = validate_endpoints(&["198.18.0.1:1".into(), ep.into()]).unwrap_err();
            let msg = e.to_string();
            assert!(msg.starts_with("endpoint #1 "), "{ep}: {msg}");
            assert!(msg.contains(ep) && msg.contains(why), "{ep}: {msg}");
        }
        // A long entry is echoed clipped.
        let e = validate_endpoints(&["x".repeat(10_000)]).unwrap_err();
        assert!(e.to_string().len() < 200);
    }

    #[test]
    fn random_keys_are_neither_low_order_nor_weak() {
        for _ in 0..32 {
            let wg = WgPrivateKey::generate(&mut OsRng);
            assert!(!is_low_order_x25519(wg.public().as_bytes()));
            let m = SigningKey::generate(&mut OsRng);
            assert!(!is_weak_ed25519(m.public().as_bytes()));
        }
    }

    #[test]
    fn small_order_keys_are_detected() {
        let mut zero = [0u8; 32];
        assert!(is_low_order_x25519(&zero));
        zero[31] = 0x80; // the ignored top bit
        assert!(is_low_order_x25519(&zero));
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert!(is_low_order_x25519(&identity));
        assert!(is_weak_ed25519(&identity));
    }

    fn attr(key: &str, v: PbValue) -> PostureAttribute {
        PostureAttribute {
            key: key.into(),
            value: Some(v),
        }
    }

    #[test]
    fn posture_reports_keep_known_typed_attributes_and_clip_the_rest() {
        let long = "x".repeat(5000);
        let mut attrs = vec![
            attr("node:os", PbValue::Text("linux".into())),
            attr("node:firewall", PbValue::Flag(true)),
            attr("node:securityUpdates", PbValue::Number(3)),
            attr("node:kernel", PbValue::Text(long)),
            attr("custom:compliant", PbValue::Flag(true)),
            attr("node:colour", PbValue::Text("red".into())),
            attr("node:os", PbValue::Text("windows".into())),
            attr("node:diskEncrypted", PbValue::Text("yes".into())),
            PostureAttribute {
                key: "node:tsVersion".into(),
                value: None,
            },
        ];
        let r = sanitize_posture(&attrs);
        assert_eq!(r.attributes.len(), 4, "{r:?}");
        assert_eq!(r.attributes["node:os"], AttrValue::Str("linux".into()));
        assert_eq!(r.attributes["node:firewall"], AttrValue::Bool(true));
        assert_eq!(r.attributes["node:securityUpdates"], AttrValue::Int(3));
        assert_eq!(
            r.attributes["node:kernel"],
            AttrValue::Str("x".repeat(MAX_POSTURE_VALUE))
        );
        assert!(
            !r.attributes.contains_key("custom:compliant"),
            "a node cannot set custom:*"
        );
        let text = r.clipped.join("\n");
        for want in [
            "node:kernel: 5000 bytes, clipped to 256",
            "\"custom:compliant\": not an attribute a node reports",
            "\"node:colour\": not an attribute a node reports",
            "node:os: repeated",
            "node:diskEncrypted: not a flag",
            "node:tsVersion: no value",
        ] {
            assert!(text.contains(want), "{want:?} missing from {text}");
        }

        attrs = (0..1000)
            .map(|i| attr(&format!("node:{i}"), PbValue::Number(i)))
            .collect();
        let r = sanitize_posture(&attrs);
        assert!(r.attributes.is_empty());
        assert_eq!(r.clipped.len(), MAX_POSTURE_ATTRIBUTES + 1);
        assert!(r.clipped[0].starts_with("1000 attributes sent"));
    }

    #[test]
    fn clipping_respects_character_boundaries() {
        let text = "é".repeat(300);
        let r = sanitize_posture(&[attr("node:osVersion", PbValue::Text(text))]);
        let AttrValue::Str(kept) = &r.attributes["node:osVersion"] else {
            panic!("{r:?}")
        };
        assert_eq!(kept.len(), MAX_POSTURE_VALUE);
        assert_eq!(kept.chars().count(), MAX_POSTURE_VALUE / 2);

        // What would fool an admin reading the value is removed.
        let r = sanitize_posture(&[attr(
            "node:osDistro",
            PbValue::Text("deb\u{202E}ian\u{200B}\n".into()),
        )]);
        assert_eq!(
            r.attributes["node:osDistro"],
            AttrValue::Str("debian".into())
        );
    }

    #[test]
    fn custom_attributes_are_custom_and_bounded() {
        validate_custom("custom:compliant", &AttrValue::Bool(true)).unwrap();
        validate_custom("custom:risk_score-2", &AttrValue::Int(-4)).unwrap();
        for (key, value) in [
            ("node:os", AttrValue::Str("linux".into())),
            ("custom:", AttrValue::Bool(true)),
            ("custom:a b", AttrValue::Bool(true)),
            ("custom:x", AttrValue::Str("y".repeat(257))),
            ("custom:x", AttrValue::Str("line\nbreak".into())),
            ("custom:x", AttrValue::Str("ok\u{202E}".into())),
            ("compliant", AttrValue::Bool(true)),
        ] {
            assert!(validate_custom(key, &value).is_err(), "{key} {value}");
        }
    }

    fn node(id: u64, name: &str) -> NodeRow {
        NodeRow {
            id,
            name: name.into(),
            hostname: name.into(),
            machine_key: [1; 32],
            wg_key: [2; 32],
            ipv4: "100.64.0.1".parse().unwrap(),
            ipv6: "fd7a:115c:a1e0::1".parse().unwrap(),
            user: None,
            tags: vec!["tag:db".into()],
            ephemeral: false,
            created_ms: 0,
            last_seen_ms: 0,
            expiry_ms: 0,
            key_revoked: false,
            endpoints: Vec::new(),
            routes: crate::model::NodeRoutes::default(),
            posture: crate::model::NodePosture::default(),
            quarantine: None,
        }
    }

    fn summary(src: &str, dst: &str, allowed: bool) -> FlowSummary {
        FlowSummary {
            src: src.into(),
            dst: dst.into(),
            protocol: 6,
            dst_port: 22,
            allowed,
            rule_id: "policy.hujson:12".into(),
            reason: "no_rule".into(),
            packets: 3,
            bytes: 180,
            reply_packets: 2,
            reply_bytes: 120,
            first_seen_ms: 1_000,
            last_seen_ms: 4_000,
        }
    }

    #[test]
    fn flow_rows_keep_what_each_kind_of_flow_means() {
        let (rows, dropped) = flow_rows(
            &node(7, "db"),
            &[
                summary("100.64.0.2", "100.64.0.1", true),
                summary("100.64.0.2", "100.64.0.1", false),
            ],
            10_000,
        );
        assert_eq!(dropped, 0);
        assert_eq!(
            rows[0],
            FlowRow {
                id: 0,
                time_ms: 10_000,
                node_id: 7,
                node_name: "db".into(),
                src: "100.64.0.2".into(),
                dst: "100.64.0.1".into(),
                proto: 6,
                dst_port: 22,
                allowed: true,
                rule_id: "policy.hujson:12".into(),
                reason: String::new(),
                packets: 3,
                bytes: 180,
                reply_packets: 2,
                reply_bytes: 120,
                first_seen_ms: 1_000,
                last_seen_ms: 4_000,
            }
        );
        // A denied flow has a reason and no rule, and no replies.
        let d = &rows[1];
        assert_eq!((d.rule_id.as_str(), d.reason.as_str()), ("", "no_rule"));
        assert_eq!((d.reply_packets, d.reply_bytes), (0, 0));
    }

    #[test]
    fn hostile_flow_reports_are_dropped_clipped_and_clamped() {
        let mut bad_proto = summary("100.64.0.2", "100.64.0.1", true);
        bad_proto.protocol = 256;
        let mut bad_port = summary("100.64.0.2", "100.64.0.1", true);
        bad_port.dst_port = 70_000;
        let mut text = summary("fd7a:115c:a1e0::2", "fd7a:115c:a1e0::1", true);
        text.rule_id = format!("p.hujson:1\n\u{202e}{}", "é".repeat(1000));
        let mut future = summary("100.64.0.2", "100.64.0.1", true);
        future.first_seen_ms = i64::MAX;
        future.last_seen_ms = i64::MAX;
        let mut timeless = summary("100.64.0.2", "100.64.0.1", false);
        timeless.first_seen_ms = -5;
        timeless.last_seen_ms = 0;
        let flows = vec![
            summary("100.64.0.2/32", "100.64.0.1", true),
            summary("100.64.0.2", "not an address", true),
            bad_proto,
            bad_port,
            text,
            future,
            timeless,
        ];
        let (rows, dropped) = flow_rows(&node(1, "web"), &flows, 50_000);
        assert_eq!((rows.len(), dropped), (3, 4));
        assert_eq!(rows[0].src, "fd7a:115c:a1e0::2");
        assert!(
            rows[0].rule_id.starts_with("p.hujson:1é"),
            "{}",
            rows[0].rule_id
        );
        assert!(rows[0].rule_id.len() <= MAX_FLOW_TEXT && rows[0].rule_id.len() > 100);
        // Never in the future; a flow without times is stamped when received.
        assert_eq!(
            (rows[1].first_seen_ms, rows[1].last_seen_ms),
            (50_000, 50_000)
        );
        assert_eq!(
            (rows[2].first_seen_ms, rows[2].last_seen_ms),
            (50_000, 50_000)
        );
        // The cap: a report cannot add more than MAX_FLOWS_PER_REPORT records.
        let many = vec![summary("100.64.0.2", "100.64.0.1", true); MAX_FLOWS_PER_REPORT + 10];
        let (rows, dropped) = flow_rows(&node(1, "web"), &many, 50_000);
        assert_eq!((rows.len(), dropped), (MAX_FLOWS_PER_REPORT, 10));
    }

    #[test]
    fn a_node_reports_only_flows_to_itself_and_known_reasons() {
        let mut n = node(3, "router");
        let to = |dst: &str| summary("100.64.0.2", dst, true);
        let mut odd_reason = summary("100.64.0.2", "100.64.0.1", false);
        odd_reason.reason = "framed by 100.64.0.9".into();
        let flows = [
            to("100.64.0.9"),
            to("198.19.50.7"),
            to("100.64.0.1"),
            odd_reason,
        ];
        let (rows, dropped) = flow_rows(&n, &flows, 1);
        assert_eq!(dropped, 2, "another node's address and an unserved route");
        assert_eq!(rows[0].dst, "100.64.0.1");
        assert_eq!(rows[1].reason, "unknown");
        // A route it serves (advertised and approved) is its own.
        let net: IpNet = "198.19.50.0/24".parse().unwrap();
        n.routes.advertised = vec![net];
        n.routes.approved = vec![net];
        let (rows, dropped) = flow_rows(&n, &flows, 1);
        assert_eq!((rows.len(), dropped), (3, 1));
        // An exit node forwards anywhere.
        n.routes.exit_advertised = true;
        n.routes.exit_approved = true;
        let (rows, dropped) = flow_rows(&n, &flows, 1);
        assert_eq!((rows.len(), dropped), (4, 0));
    }

    #[test]
    fn reported_paths_are_stamped_and_clipped_to_the_peer_count() {
        let report = |direct, relayed, none| PbPeerPaths {
            direct,
            relayed,
            none,
        };
        let got = peer_paths(&report(2, 1, 0), 3, 7);
        assert_eq!(
            got,
            PeerPaths {
                direct: 2,
                relayed: 1,
                none: 0,
                reported_ms: 7
            }
        );
        let got = peer_paths(&report(u32::MAX, 9, 3), 3, 7);
        assert_eq!((got.direct, got.relayed, got.none), (3, 3, 3));
        let got = peer_paths(&report(1, 1, 1), 0, 7);
        assert_eq!(
            (got.direct, got.relayed, got.none, got.reported_ms),
            (0, 0, 0, 7)
        );
    }
}
