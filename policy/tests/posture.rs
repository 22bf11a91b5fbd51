//! Device posture: conditions against attribute sets (every operator ×
//! set / unset / wrong type / stale), parse errors at `FILE:LINE:COL`,
//! Tailscale's documented examples, version comparison against a naive
//! reference, gating in the compiled views, `explain` and the `tests`
//! section.
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

mod common;

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

use common::{node, parse, parse_err};
use ipnet::IpNet;
use proptest::prelude::*;
use ztmesh_policy::{
    check_node_attribute, compare_versions, parse_custom_attribute, AttrValue, Attributes,
    Compiled, NodeInfo, Policy, PostureCheck, MAX_ATTR_VALUE_LEN,
};

fn s(v: &str) -> AttrValue {
    AttrValue::Str(v.to_string())
}

fn attrs(fresh: bool, pairs: &[(&str, AttrValue)]) -> Attributes {
    Attributes {
        values: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect::<BTreeMap<_, _>>(),
        fresh,
    }
}

/// A JSON string literal holding `text`.
fn json(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The result of the posture made of `conditions` for `a`.
fn check_all(conditions: &[&str], a: &Attributes) -> PostureCheck {
    let list: Vec<String> = conditions.iter().map(|c| json(c)).collect();
    let text = format!("{{\"postures\": {{\"posture:p\": [{}]}}}}", list.join(", "));
    let p = parse(&text);
    let mut checks = p.posture_checks(a);
    assert_eq!(checks.len(), 1);
    checks.remove(0)
}

fn check(condition: &str, a: &Attributes) -> PostureCheck {
    check_all(&[condition], a)
}

/// Attributes with every attribute the table uses, of the right type.
fn set() -> Attributes {
    attrs(
        true,
        &[
            ("node:os", s("linux")),
            ("node:osDistro", s("debian")),
            ("node:osVersion", s("12")),
            ("node:kernel", s("6.1.0-18-amd64")),
            ("node:tsVersion", s("1.40.2")),
            ("node:securityUpdates", AttrValue::Int(3)),
            ("node:daysSinceUpgrade", AttrValue::Int(40)),
            ("node:firewall", AttrValue::Bool(true)),
            ("node:diskEncrypted", AttrValue::Bool(false)),
            ("custom:compliant", AttrValue::Bool(true)),
            ("custom:riskScore", AttrValue::Int(20)),
            ("custom:tier", s("gold")),
            ("custom:mdm", s("intune")),
        ],
    )
}

/// The same keys, each holding a value of another type.
fn wrong_type() -> Attributes {
    attrs(
        true,
        &[
            ("node:os", AttrValue::Int(1)),
            ("node:osDistro", AttrValue::Bool(true)),
            ("node:osVersion", AttrValue::Int(12)),
            ("node:kernel", AttrValue::Int(6)),
            ("node:tsVersion", AttrValue::Bool(false)),
            ("node:securityUpdates", s("3")),
            ("node:daysSinceUpgrade", s("40")),
            ("node:firewall", s("on")),
            ("node:diskEncrypted", AttrValue::Int(1)),
            ("custom:compliant", s("yes")),
            ("custom:riskScore", s("low")),
            ("custom:tier", AttrValue::Int(5)),
            ("custom:mdm", AttrValue::Bool(false)),
        ],
    )
}

/// Every operator against set, unset, wrongly typed and stale attributes.
/// Columns: passes with `set()`, with no attributes, with `wrong_type()`;
/// with `set()` but a stale report every posture with a condition fails.
#[test]
fn every_operator_against_set_unset_wrong_type_and_stale_attributes() {
    let table: &[(&str, bool, bool, bool)] = &[
        ("node:os == 'linux'", true, false, false),
        ("node:os == 'macos'", false, false, false),
        ("node:os != 'windows'", true, false, false),
        ("node:os != 'linux'", false, false, false),
        ("node:os IN ['linux', 'macos']", true, false, false),
        ("node:os IN ['windows']", false, false, false),
        ("node:os NOT IN ['windows']", true, false, false),
        ("node:os NOT IN ['linux', 'windows']", false, false, false),
        ("node:tsVersion >= '1.40'", true, false, false),
        ("node:tsVersion > '1.40.2'", false, false, false),
        ("node:tsVersion <= '1.40.2.0'", true, false, false),
        ("node:tsVersion < '1.100'", true, false, false),
        ("node:kernel >= '6.1'", true, false, false),
        ("node:kernel > '6.1'", false, false, false),
        ("node:kernel < '6.2'", true, false, false),
        ("node:osVersion >= '12'", true, false, false),
        ("node:osVersion == '12'", true, false, false),
        ("node:securityUpdates == 3", true, false, false),
        ("node:securityUpdates < 1", false, false, false),
        ("node:securityUpdates <= 3", true, false, false),
        ("node:daysSinceUpgrade > 30", true, false, false),
        ("node:daysSinceUpgrade >= 41", false, false, false),
        ("node:firewall == true", true, false, false),
        ("node:firewall", true, false, false),
        ("node:firewall != false", true, false, false),
        ("node:diskEncrypted", false, false, false),
        ("node:diskEncrypted == false", true, false, false),
        ("custom:compliant", true, false, false),
        ("custom:compliant == true", true, false, false),
        ("custom:compliant != true", false, false, false),
        ("custom:riskScore < 50", true, false, false),
        ("custom:riskScore > 50", false, false, false),
        ("custom:riskScore IN [10, 20, 30]", true, false, false),
        ("custom:riskScore NOT IN [20]", false, false, false),
        ("custom:tier IN ['gold', 'silver']", true, false, false),
        ("custom:tier NOT IN ['bronze']", true, false, false),
        ("custom:tier == 'gold'", true, false, false),
        ("custom:tier >= '1'", false, false, false),
        ("custom:mdm IS SET", true, false, true),
        ("custom:mdm NOT SET", false, true, false),
        ("custom:other NOT SET", true, true, true),
        ("custom:other IS SET", false, false, false),
    ];
    let stale = Attributes {
        fresh: false,
        ..set()
    };
    let none = attrs(true, &[]);
    for &(cond, with_set, with_none, with_wrong) in table {
        assert_eq!(check(cond, &set()).passed, with_set, "{cond} with set()");
        assert_eq!(check(cond, &none).passed, with_none, "{cond} unset");
        assert_eq!(
            check(cond, &wrong_type()).passed,
            with_wrong,
            "{cond} wrong type"
        );
        let c = check(cond, &stale);
        assert!(!c.passed, "{cond} stale");
        assert!(c.detail.contains("posture report is stale"), "{}", c.detail);
    }
}

#[test]
fn keywords_are_case_insensitive_and_whitespace_is_free() {
    for cond in [
        "node:os in ['linux']",
        "node:os In['linux']",
        "node:os not in ['windows']",
        "node:os==  'linux'",
        "  node:os\t== 'linux'  ",
        "node:os IN [ 'linux' , 'macos' , ]",
        "custom:mdm is set",
        "custom:other Not Set",
        "custom:compliant == TRUE",
        "custom:riskScore >= -5",
        "custom:riskScore < +21",
    ] {
        let c = check(cond, &set());
        assert!(c.passed, "{cond}: {}", c.detail);
    }
}

#[test]
fn details_name_the_condition_the_value_seen_and_its_provenance() {
    let a = attrs(
        true,
        &[
            ("custom:compliant", AttrValue::Bool(false)),
            ("node:osVersion", s("11")),
            ("node:kernel", s("generic")),
            ("custom:riskScore", s("low")),
        ],
    );
    let cases = [
        (
            "custom:compliant == true",
            "custom:compliant == true: seen false (set by an admin)",
        ),
        (
            "node:osVersion >= '12'",
            "node:osVersion >= '12': seen '11' (reported by the node, advisory)",
        ),
        ("node:firewall == true", "node:firewall == true: not set"),
        ("node:firewall != true", "node:firewall != true: not set"),
        (
            "node:kernel   >= '6.1'",
            "node:kernel >= '6.1': seen 'generic' (reported by the node, advisory), which is not a version (dotted numbers)",
        ),
        (
            "custom:riskScore < 50",
            "custom:riskScore < 50: seen 'low' (set by an admin), which is text, not a number",
        ),
        (
            "custom:compliant NOT SET",
            "custom:compliant NOT SET: seen false (set by an admin)",
        ),
    ];
    for (cond, want) in cases {
        let c = check(cond, &a);
        assert_eq!(
            c,
            PostureCheck {
                name: "posture:p".into(),
                passed: false,
                detail: want.into()
            }
        );
    }
    // The first failing condition is named, in the posture's order.
    let c = check_all(
        &[
            "custom:riskScore IS SET",
            "node:os == 'linux'",
            "custom:compliant",
        ],
        &a,
    );
    assert_eq!(c.detail, "node:os == 'linux': not set");
    // Long and hostile values are clipped and escaped in the detail.
    let long = attrs(
        true,
        &[(
            "custom:tier",
            s(&format!("x\u{1b}[31m{}", "y".repeat(5000))),
        )],
    );
    let c = check("custom:tier == 'gold'", &long);
    assert!(c.detail.len() < 200, "{}", c.detail);
    assert!(c.detail.contains("x\\u{1b}[31m"), "{}", c.detail);
    assert!(!c.detail.contains('\u{1b}'));
}

#[test]
fn a_posture_without_conditions_passes_even_a_stale_node() {
    let text = r#"{"postures": {"posture:open": [], "posture:b": ["custom:x"], "posture:a": ["node:os == 'linux'"]}}"#;
    let p = parse(text);
    let checks = p.posture_checks(&Attributes::default());
    let names: Vec<&str> = checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["posture:a", "posture:b", "posture:open"]);
    assert_eq!(
        checks.iter().map(|c| c.passed).collect::<Vec<_>>(),
        [false, false, true]
    );
    assert_eq!(checks[2].detail, "");
    assert!(!p.has_postures(), "no rule requires a posture");
}

#[test]
fn condition_errors_point_inside_the_string() {
    let text =
        "{\n  \"postures\": {\"posture:p\": [\"node:os == 'linux'\", \"node:os <= 3\"]},\n}\n";
    assert_eq!(
        parse_err(text),
        "p.hujson:2:64: node:os holds text, but 3 is a number"
    );
    // With an escape in the literal, the error points at the literal.
    let text = "{\n  \"postures\": {\"posture:p\": [\"node:os \\u003d 'linux'\"]},\n}\n";
    assert_eq!(
        parse_err(text),
        "p.hujson:2:30: write '==' to compare for equality"
    );
    // Columns count characters, not bytes.
    let text = "{\"postures\": {\"posture:p\": [\"custom:é == 1\"]}}";
    assert_eq!(
        parse_err(text),
        "p.hujson:1:30: invalid attribute name \"custom:é\": custom:NAME takes 1-64 letters, digits, '-' or '_'"
    );
    let text = "{\"postures\": {\"posture:p\": [\"node:os == 'é' == 1\"]}}";
    assert!(
        parse_err(text).starts_with("p.hujson:1:45: unexpected text after the condition"),
        "{}",
        parse_err(text)
    );
}

#[test]
fn bounds_are_enforced_with_clear_errors() {
    let many_postures: Vec<String> = (0..257).map(|i| format!("\"posture:p{i}\": []")).collect();
    let err = parse_err(&format!(
        "{{\"postures\": {{{}}}}}",
        many_postures.join(",\n")
    ));
    assert_eq!(err, "p.hujson:257:1: too many postures: at most 256");

    let conds = vec!["\"custom:x\""; 65].join(", ");
    let err = parse_err(&format!("{{\"postures\": {{\"posture:p\": [{conds}]}}}}"));
    assert!(
        err.ends_with("too many conditions in \"posture:p\": at most 64"),
        "{err}"
    );

    let long = format!("custom:x == '{}'", "a".repeat(1100));
    let err = parse_err(&format!(
        "{{\"postures\": {{\"posture:p\": [\"{long}\"]}}}}"
    ));
    assert!(
        err.ends_with("condition is longer than 1024 bytes"),
        "{err}"
    );

    let items = vec!["1"; 65].join(", ");
    let err = parse_err(&format!(
        "{{\"postures\": {{\"posture:p\": [\"custom:x IN [{items}]\"]}}}}"
    ));
    assert!(err.ends_with("too many values: at most 64"), "{err}");

    let name = "n".repeat(65);
    let err = parse_err(&format!(
        "{{\"postures\": {{\"posture:p\": [\"custom:{name} == 1\"]}}}}"
    ));
    assert!(err.contains("custom:NAME takes 1-64"), "{err}");
}

/// Tailscale's documented examples, with ztmesh's attributes.
#[test]
fn tailscale_documentation_examples() {
    // As documented: node:tsReleaseTrack is a Tailscale client attribute.
    let text = r#"{
  "postures": {
    "posture:latestMac": [
      "node:os IN ['macos']",
      "node:tsReleaseTrack == 'stable'",
      "node:tsVersion >= '1.40'",
    ],
  },
}"#;
    assert_eq!(
        parse_err(text),
        "p.hujson:5:8: unknown attribute \"node:tsReleaseTrack\": ztmesh nodes report node:os, node:osDistro, node:osVersion, node:kernel, node:tsVersion, node:securityUpdates, node:daysSinceUpgrade, node:firewall, node:diskEncrypted"
    );
    // Third-party integrations are other namespaces.
    let text = r#"{"postures": {"posture:crowdstrike": ["falcon:ztaScore >= 50"]}}"#;
    assert!(parse_err(text).contains("attribute namespace \"falcon:\" is not available"));

    // Adapted: the default posture gates every rule without its own; a
    // rule's srcPosture replaces it.
    let text = r#"{
  "postures": {
    "posture:latestMac": ["node:os IN ['macos']", "node:tsVersion >= '1.40'"],
    "posture:anyMac": ["node:os == 'macos'"],
  },
  "defaultSrcPosture": ["posture:latestMac"],
  "tagOwners": {"tag:production": [], "tag:dev": []},
  "acls": [
    {"action": "accept", "src": ["autogroup:member"], "dst": ["tag:production:*"]},
    {"action": "accept", "src": ["autogroup:member"], "srcPosture": ["posture:anyMac"], "dst": ["tag:dev:*"]},
  ],
}"#;
    let p = parse(text);
    assert!(p.has_postures());
    let mac = |id, name: &str, version: &str| NodeInfo {
        posture: attrs(
            true,
            &[("node:os", s("macos")), ("node:tsVersion", s(version))],
        ),
        ..node(
            id,
            name,
            Some("alice@example.com"),
            &[],
            &[&format!("100.64.0.{id}")],
        )
    };
    let nodes = vec![
        mac(1, "new-mac", "1.40.0"),
        mac(2, "old-mac", "1.38.4"),
        NodeInfo {
            posture: attrs(
                true,
                &[("node:os", s("linux")), ("node:tsVersion", s("1.60"))],
            ),
            ..node(
                3,
                "linux-box",
                Some("alice@example.com"),
                &[],
                &["100.64.0.3"],
            )
        },
        node(4, "prod", None, &["tag:production"], &["100.64.0.4"]),
        node(5, "dev", None, &["tag:dev"], &["100.64.0.5"]),
    ];
    let allowed = |s: &str, d: &str| p.explain(&nodes, s, d, 22, 6).allowed;
    assert!(allowed("new-mac", "prod"));
    assert!(!allowed("old-mac", "prod"));
    assert!(!allowed("linux-box", "prod"));
    assert!(allowed("new-mac", "dev"));
    assert!(allowed("old-mac", "dev"));
    assert!(!allowed("linux-box", "dev"));
    let checks = p.posture_checks(&nodes[1].posture);
    assert_eq!(
        checks[1].detail,
        "node:tsVersion >= '1.40': seen '1.38.4' (reported by the node, advisory)"
    );
}

#[test]
fn an_empty_src_posture_is_refused_and_an_open_posture_exempts_a_rule() {
    let base = |acl: &str| {
        format!(
            r#"{{
  "postures": {{"posture:compliant": ["custom:compliant"], "posture:anyone": []}},
  "defaultSrcPosture": ["posture:compliant"],
  "acls": [{acl}],
}}"#
        )
    };
    let err = parse_err(&base(
        r#"{"action": "accept", "src": ["*"], "srcPosture": [], "dst": ["*:22"]}"#,
    ));
    assert_eq!(err, "p.hujson:4:61: empty \"srcPosture\": to exempt a rule from defaultSrcPosture, reference a posture with no conditions");
    let p = parse(&base(
        r#"{"action": "accept", "src": ["*"], "srcPosture": ["posture:anyone"], "dst": ["*:22"]}"#,
    ));
    assert!(!p.has_postures());
    let nodes = vec![
        node(1, "a", Some("alice@example.com"), &[], &["100.64.0.1"]),
        node(2, "b", Some("bob@example.com"), &[], &["100.64.0.2"]),
    ];
    // Stale nodes and plain addresses pass an exempt rule.
    assert!(p.explain(&nodes, "a", "b", 22, 6).allowed);
    assert!(p.explain(&nodes, "198.18.0.9", "b", 22, 6).allowed);
    let c = Compiled::new(p, nodes);
    assert_eq!(
        *c.view(2).expect("view").inbound[0].src,
        nets(&["0.0.0.0/0", "::/0"])
    );
}

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|s| s.parse().expect("prefix")).collect()
}

/// The gating fleet: alice's laptop and bob's laptop (compliant), a lab box
/// selected only by address (compliant), web and db servers.
const GATED: &str = r#"{
  "groups": {"group:eng": ["alice@example.com", "bob@example.com"]},
  "tagOwners": {"tag:web": [], "tag:db": []},
  "hosts": {"lab": "198.18.0.0/24"},
  "postures": {
    "posture:compliant": ["custom:compliant == true"],
    "posture:anyone": [],
  },
  "acls": [
    {"action": "accept", "src": ["group:eng"], "srcPosture": ["posture:compliant"], "dst": ["tag:web:443"]},
    {"action": "accept", "src": ["group:eng"], "dst": ["tag:web:22"]},
    {"action": "accept", "src": ["*"], "srcPosture": ["posture:compliant"], "dst": ["tag:db:5432"]},
    {"action": "accept", "src": ["100.64.0.0/24"], "srcPosture": ["posture:compliant"], "dst": ["tag:db:22"]},
    {"action": "accept", "src": ["lab"], "srcPosture": ["posture:compliant"], "dst": ["tag:web:8080"]},
    {"action": "accept", "src": ["alice@example.com"], "srcPosture": ["posture:anyone"], "dst": ["tag:db:80"]},
  ],
}"#;

fn compliant(n: NodeInfo, yes: bool) -> NodeInfo {
    NodeInfo {
        posture: attrs(true, &[("custom:compliant", AttrValue::Bool(yes))]),
        ..n
    }
}

fn gated_fleet() -> Vec<NodeInfo> {
    vec![
        compliant(
            node(
                1,
                "alice-laptop",
                Some("alice@example.com"),
                &[],
                &["100.64.0.1", "fd00::1"],
            ),
            true,
        ),
        compliant(
            node(
                2,
                "bob-laptop",
                Some("bob@example.com"),
                &[],
                &["100.64.0.2"],
            ),
            true,
        ),
        node(3, "web1", None, &["tag:web"], &["100.64.0.3"]),
        node(4, "db1", None, &["tag:db"], &["100.64.0.4"]),
        compliant(node(7, "lab-box", None, &[], &["198.18.0.7"]), true),
    ]
}

fn line_of(needle: &str) -> String {
    let line = GATED
        .lines()
        .position(|l| l.contains(needle))
        .expect("needle")
        + 1;
    format!("p.hujson:{line}")
}

/// The TCP rules of a node (rule id, sources); the ICMP twins are alike.
fn rules(c: &Compiled, id: u64) -> Vec<(String, Vec<IpNet>)> {
    c.view(id)
        .expect("view")
        .inbound
        .iter()
        .filter(|r| r.protocols.contains(&6))
        .map(|r| (r.rule_id.clone(), r.src.to_vec()))
        .collect()
}

#[test]
fn gated_rules_take_only_passing_nodes_addresses() {
    let p = parse(GATED);
    assert!(p.has_postures());
    let c = Compiled::new(p, gated_fleet());
    let l443 = line_of("tag:web:443");
    let l22 = line_of("tag:web:22");
    let l5432 = line_of("tag:db:5432");
    let ldb22 = line_of("tag:db:22");
    let l8080 = line_of("tag:web:8080");
    let l80 = line_of("tag:db:80");
    assert_eq!(
        rules(&c, 3),
        [
            (
                l443,
                nets(&["100.64.0.1/32", "100.64.0.2/32", "fd00::1/128"])
            ),
            (
                l22,
                nets(&["100.64.0.1/32", "100.64.0.2/32", "fd00::1/128"])
            ),
            (l8080, nets(&["198.18.0.7/32"])),
        ]
    );
    // `*` and a CIDR under a posture: the passing nodes' addresses (inside
    // the CIDR), never the literal; the open posture keeps the literal rule.
    assert_eq!(
        rules(&c, 4),
        [
            (
                l5432,
                nets(&[
                    "100.64.0.1/32",
                    "100.64.0.2/32",
                    "198.18.0.7/32",
                    "fd00::1/128"
                ])
            ),
            (ldb22, nets(&["100.64.0.1/32", "100.64.0.2/32"])),
            (l80, nets(&["100.64.0.1/32", "fd00::1/128"])),
        ]
    );
}

#[test]
fn a_node_failing_posture_loses_exactly_its_gated_flows() {
    let p = parse(GATED);
    let fleet = gated_fleet();
    let mut c = Compiled::new(p.clone(), fleet.clone());
    let before: BTreeMap<u64, _> = c.nodes().map(|n| (n.id, c.view(n.id).cloned())).collect();

    // The lab box turns non-compliant: its only flows were gated.
    let changed = c.upsert_node(compliant(fleet[4].clone(), false));
    assert_eq!(changed, BTreeSet::from([3, 4, 7]));
    assert!(!c.view(3).expect("web1").peers.contains(&7));
    assert!(c.view(7).expect("lab").peers.is_empty());
    let l8080 = line_of("tag:web:8080");
    assert!(rules(&c, 3).iter().all(|(id, _)| *id != l8080));
    let l5432 = line_of("tag:db:5432");
    let db = rules(&c, 4);
    assert_eq!(
        db[0],
        (
            l5432.clone(),
            nets(&["100.64.0.1/32", "100.64.0.2/32", "fd00::1/128"])
        )
    );
    // Nodes the change cannot affect keep their views.
    for id in [1, 2] {
        assert_eq!(c.view(id), before[&id].as_ref(), "node {id}");
    }

    // Alice's laptop goes stale: the gated rules lose her addresses, the
    // ungated port 22 and the open-posture port 80 stay.
    let stale = NodeInfo {
        posture: Attributes {
            fresh: false,
            ..fleet[0].posture.clone()
        },
        ..fleet[0].clone()
    };
    let changed = c.upsert_node(stale);
    assert_eq!(changed, BTreeSet::from([1, 3, 4]));
    let web = rules(&c, 3);
    assert_eq!(web[0], (line_of("tag:web:443"), nets(&["100.64.0.2/32"])));
    assert_eq!(
        web[1],
        (
            line_of("tag:web:22"),
            nets(&["100.64.0.1/32", "100.64.0.2/32", "fd00::1/128"])
        )
    );
    let db = rules(&c, 4);
    assert_eq!(db[0], (l5432, nets(&["100.64.0.2/32"])));
    assert_eq!(db[1], (line_of("tag:db:22"), nets(&["100.64.0.2/32"])));
    assert_eq!(
        db[2],
        (
            line_of("tag:db:80"),
            nets(&["100.64.0.1/32", "fd00::1/128"])
        )
    );
    assert_eq!(c.view(1).expect("alice").peers, BTreeSet::from([3, 4]));
    assert!(!common::admitted(&c, 1, 3, 6, 443));
    assert!(common::admitted(&c, 1, 3, 6, 22));
    assert!(common::admitted(&c, 1, 4, 6, 80));
    assert!(!common::admitted(&c, 1, 4, 6, 5432));

    // Back to compliant: everything as it was.
    let mut changed = c.upsert_node(fleet[0].clone());
    changed.extend(c.upsert_node(fleet[4].clone()));
    assert_eq!(changed, BTreeSet::from([1, 3, 4, 7]));
    for (id, view) in &before {
        assert_eq!(c.view(*id), view.as_ref(), "node {id}");
    }
    // And the incremental state equals a full compile.
    let full = Compiled::new(p, c.nodes().cloned().collect());
    for n in c.nodes() {
        assert_eq!(c.view(n.id), full.view(n.id));
    }
}

#[test]
fn attribute_changes_that_keep_the_verdict_change_no_view() {
    let mut c = Compiled::new(parse(GATED), gated_fleet());
    let mut alice = gated_fleet().remove(0);
    alice.posture.values.insert("node:os".into(), s("linux"));
    assert_eq!(c.upsert_node(alice), BTreeSet::from([1]));
}

#[test]
fn explain_names_the_failed_posture_check_and_the_value_seen() {
    let p = parse(GATED);
    let mut nodes = gated_fleet();
    nodes[0] = compliant(nodes[0].clone(), false);
    let l443 = line_of("tag:web:443");
    let e = p.explain(&nodes, "alice-laptop", "web1", 443, 6);
    let line = format!("{l443} requires posture:compliant; node alice-laptop fails it: custom:compliant == true: seen false (set by an admin)");
    assert!(!e.allowed);
    assert_eq!(e.posture, std::slice::from_ref(&line));
    assert_eq!(e.detail, format!("no rule matches; {line}"));

    // A later rule may still accept; the skipped gated rule is reported.
    let e = p.explain(&nodes, "alice-laptop", "web1", 22, 6);
    assert!(e.allowed);
    assert!(e.posture.is_empty(), "port 22 is not gated");

    // Stale reports.
    nodes[0].posture = Attributes::default();
    let e = p.explain(&nodes, "alice-laptop", "db1", 5432, 6);
    assert!(!e.allowed);
    assert_eq!(e.posture.len(), 1);
    assert!(e.posture[0].ends_with("node alice-laptop fails it: posture report is stale (none within the posture TTL, or never sent): every posture fails until the node reports again"), "{}", e.posture[0]);

    // Users and addresses that are no node's have no device.
    let e = p.explain(&nodes, "bob@example.com", "web1", 443, 6);
    assert!(!e.allowed);
    assert_eq!(
        e.posture,
        [format!(
            "{l443} requires posture:compliant; bob@example.com is no node, so it has no posture to check"
        )]
    );
    assert!(!p.explain(&nodes, "198.18.0.99", "db1", 5432, 6).allowed);
    assert!(p.explain(&nodes, "lab-box", "db1", 5432, 6).allowed);
    // Deterministic.
    assert_eq!(
        p.explain(&nodes, "alice-laptop", "db1", 5432, 6),
        p.explain(&nodes, "alice-laptop", "db1", 5432, 6)
    );
}

#[test]
fn explain_lists_each_failing_posture_of_a_rule() {
    let text = r#"{
  "postures": {
    "posture:mdm": ["custom:compliant"],
    "posture:patched": ["node:securityUpdates == 0", "node:firewall"],
  },
  "acls": [
    {"action": "accept", "src": ["*"], "srcPosture": ["posture:patched", "posture:mdm"], "dst": ["*:22"]},
  ],
}"#;
    let p = parse(text);
    let mut a = node(1, "a", Some("alice@example.com"), &[], &["100.64.0.1"]);
    a.posture = attrs(true, &[("node:securityUpdates", AttrValue::Int(4))]);
    let b = node(2, "b", Some("bob@example.com"), &[], &["100.64.0.2"]);
    let e = p.explain(&[a, b], "a", "b", 22, 6);
    assert_eq!(
        e.posture,
        ["p.hujson:7 requires posture:mdm or posture:patched; node a fails each: posture:mdm: custom:compliant: not set; posture:patched: node:securityUpdates == 0: seen 4 (reported by the node, advisory)"]
    );
}

#[test]
fn tests_section_uses_src_posture_attrs() {
    let with_tests = |tests: &str| {
        GATED.replace(
            "  ],\n}",
            &format!("  ],\n  \"tests\": [\n{tests}\n  ],\n}}"),
        )
    };
    let ok = with_tests(
        r#"    {"src": "alice@example.com", "srcPostureAttrs": {"custom:compliant": true, "node:os": "linux", "node:securityUpdates": 0}, "accept": ["tag:web:443", "tag:web:22"]},
    {"src": "alice@example.com", "srcPostureAttrs": {"custom:compliant": false}, "accept": ["tag:web:22"], "deny": ["tag:web:443"]},
    {"src": "alice@example.com", "accept": ["tag:web:22", "tag:db:80"], "deny": ["tag:web:443"]},
    {"src": "198.18.0.7", "srcPostureAttrs": {"custom:compliant": true}, "accept": ["tag:web:8080"]},
    {"src": "198.18.0.7", "deny": ["tag:web:8080"]},"#,
    );
    Policy::check("p.hujson", &ok).unwrap_or_else(|e| panic!("{e}"));

    let failing = with_tests(
        r#"    {"src": "bob@example.com", "accept": ["tag:web:443"]},
    {"src": "bob@example.com", "srcPostureAttrs": {"custom:compliant": false}, "accept": ["tag:web:443"]},"#,
    );
    let err = Policy::check("p.hujson", &failing).expect_err("tests fail");
    let l443 = line_of("tag:web:443");
    let test1 = GATED.lines().count() + 1;
    assert_eq!(
        err.to_string(),
        format!(
            "p.hujson:{test1}:43: test failed (test at line {test1}): bob@example.com -> tag:web:443 proto tcp: expected accept, got deny (no rule matches; {l443} requires posture:compliant; bob@example.com has no \"srcPostureAttrs\" in this test)\n\
             p.hujson:{}:91: test failed (test at line {}): bob@example.com -> tag:web:443 proto tcp: expected accept, got deny (no rule matches; {l443} requires posture:compliant; bob@example.com fails it: custom:compliant == true: seen false (set by an admin))",
            test1 + 1,
            test1 + 1
        )
    );
}

#[test]
fn custom_attribute_values_parse_by_shape() {
    let ok = [
        ("true", AttrValue::Bool(true)),
        ("FALSE", AttrValue::Bool(false)),
        ("42", AttrValue::Int(42)),
        ("-7", AttrValue::Int(-7)),
        ("+7", AttrValue::Int(7)),
        ("1.5", s("1.5")),
        ("intune", s("intune")),
        ("yes please", s("yes please")),
    ];
    for (text, want) in ok {
        assert_eq!(parse_custom_attribute("custom:x", text), Ok(want), "{text}");
    }
    let bad = [
        ("custom:x", "", "empty value for custom:x: to remove the attribute, unset it"),
        ("custom:x", "99999999999999999999", "99999999999999999999 is out of range for a number attribute"),
        ("custom:x", "a\nb", "value holds a control character"),
        ("node:os", "linux", "\"node:os\" is reported by the node itself; an admin sets custom:NAME attributes"),
        ("custom:", "1", "invalid attribute name \"custom:\": custom:NAME takes 1-64 letters, digits, '-' or '_'"),
        ("compliant", "1", "expected an attribute (node:NAME or custom:NAME), found \"compliant\""),
        ("ip:country", "CH", "attribute namespace \"ip:\" is not available in ztmesh: use node:* (reported by the node) or custom:* (set by an admin)"),
    ];
    for (key, value, want) in bad {
        assert_eq!(
            parse_custom_attribute(key, value),
            Err(want.to_string()),
            "{key}={value}"
        );
    }
    let long = "v".repeat(MAX_ATTR_VALUE_LEN + 1);
    assert!(parse_custom_attribute("custom:x", &long).is_err());
    assert!(parse_custom_attribute("custom:x", &long[1..]).is_ok());
}

#[test]
fn node_reports_are_checked_attribute_by_attribute() {
    assert_eq!(check_node_attribute("node:os", &s("linux")), Ok(()));
    assert_eq!(
        check_node_attribute("node:securityUpdates", &AttrValue::Int(0)),
        Ok(())
    );
    assert_eq!(
        check_node_attribute("node:colour", &s("red")),
        Err("\"node:colour\": unknown attribute".into())
    );
    assert_eq!(
        check_node_attribute("custom:compliant", &AttrValue::Bool(true)),
        Err("\"custom:compliant\": unknown attribute".into())
    );
    assert_eq!(
        check_node_attribute("node:firewall", &s("on")),
        Err("node:firewall: holds a flag (true or false), not text".into())
    );
    assert!(check_node_attribute("node:kernel", &s(&"6".repeat(300))).is_err());
    assert!(check_node_attribute("node:kernel", &s("6.1\u{7}")).is_err());
}

#[test]
fn version_comparison_examples() {
    let cases = [
        ("1.40", "1.40.0", Some(Ordering::Equal)),
        ("1.40", "1.4", Some(Ordering::Greater)),
        ("1.10", "1.9", Some(Ordering::Greater)),
        ("6.1.0-18-amd64", "6.1", Some(Ordering::Equal)),
        ("6.1.0-18-amd64", "6.1.1", Some(Ordering::Less)),
        ("12", "11.9", Some(Ordering::Greater)),
        ("1..2", "1", Some(Ordering::Equal)),
        ("1.2.", "1.2", Some(Ordering::Equal)),
        ("007", "7", Some(Ordering::Equal)),
        ("99999999999999999999999", "1", Some(Ordering::Greater)),
        ("bookworm", "12", None),
        ("v1.2", "1.2", None),
        ("", "1", None),
        (".1", "0.1", None),
    ];
    for (a, b, want) in cases {
        assert_eq!(compare_versions(a, b), want, "{a} vs {b}");
        assert_eq!(
            compare_versions(b, a),
            want.map(Ordering::reverse),
            "{b} vs {a}"
        );
    }
}

/// The naive reading: the longest prefix of digits and dots, cut at the
/// first empty component; components zero-padded to one width, lists
/// padded with zeros, then compared as strings.
fn naive_compare(a: &str, b: &str) -> Option<Ordering> {
    fn parts(s: &str) -> Option<Vec<String>> {
        let prefix: String = s
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        let out: Vec<String> = prefix
            .split('.')
            .take_while(|p| !p.is_empty())
            .map(str::to_string)
            .collect();
        (!out.is_empty()).then_some(out)
    }
    let (mut a, mut b) = (parts(a)?, parts(b)?);
    let n = a.len().max(b.len());
    a.resize(n, "0".into());
    b.resize(n, "0".into());
    let width = a.iter().chain(&b).map(String::len).max().unwrap_or(0);
    let pad = |v: Vec<String>| -> Vec<String> {
        v.into_iter().map(|p| format!("{p:0>width$}")).collect()
    };
    Some(pad(a).cmp(&pad(b)))
}

fn version_like() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9.a-]{0,24}",
        (
            prop::collection::vec(
                prop_oneof![3 => "[0-9]{1,3}", 1 => "0{0,3}[0-9]{1,25}"],
                1..6
            ),
            "(|-[0-9a-z.]{0,6}|\\.)"
        )
            .prop_map(|(parts, suffix)| parts.join(".") + &suffix),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn compare_versions_matches_a_naive_zero_padding_comparison(a in version_like(), b in version_like()) {
        prop_assert_eq!(compare_versions(&a, &b), naive_compare(&a, &b), "{} vs {}", a, b);
        prop_assert_eq!(compare_versions(&b, &a), compare_versions(&a, &b).map(Ordering::reverse));
    }

    #[test]
    fn version_conditions_agree_with_compare_versions(value in version_like(), lit in "[0-9]{1,4}(\\.[0-9]{1,4}){0,3}") {
        let a = attrs(true, &[("node:kernel", s(&value))]);
        for (op, holds) in [
            (">=", Ordering::is_ge as fn(Ordering) -> bool),
            (">", Ordering::is_gt),
            ("<=", Ordering::is_le),
            ("<", Ordering::is_lt),
        ] {
            let got = check(&format!("node:kernel {op} '{lit}'"), &a).passed;
            let want = compare_versions(&value, &lit).is_some_and(holds);
            prop_assert_eq!(got, want, "{} {} {}", value, op, lit);
        }
    }

    #[test]
    fn arbitrary_conditions_never_panic(parts in prop::collection::vec(prop::sample::select(CONDITION_TOKENS), 0..12), a in any::<bool>()) {
        let cond: String = parts.concat();
        let text = format!("{{\"postures\": {{\"posture:p\": [{}]}}, \"acls\": [{{\"action\": \"accept\", \"src\": [\"*\"], \"srcPosture\": [\"posture:p\"], \"dst\": [\"*:*\"]}}]}}", json(&cond));
        match Policy::parse("f.hujson", &text) {
            Ok(p) => {
                let attrs = if a { set() } else { wrong_type() };
                let checks = p.posture_checks(&attrs);
                prop_assert_eq!(checks.len(), 1);
                let n = NodeInfo { posture: attrs, ..node(1, "n", None, &[], &["100.64.0.1"]) };
                let _ = Compiled::new(p, vec![n]);
            }
            Err(e) => {
                for line in e.to_string().lines() {
                    prop_assert!(line.starts_with("f.hujson:1:"), "{}", line);
                }
            }
        }
    }
}

/// Fragments of conditions, for the never-panic property.
const CONDITION_TOKENS: &[&str] = &[
    "node:os",
    "node:tsVersion",
    "node:firewall",
    "node:securityUpdates",
    "custom:x",
    "custom:",
    "ip:c",
    " ",
    "\t",
    "==",
    "=",
    "!=",
    "!",
    "<",
    ">=",
    "IN",
    "not",
    "NOT",
    "IS",
    "SET",
    "[",
    "]",
    ",",
    "'",
    "'linux'",
    "'1.40'",
    "\"",
    "\\",
    "1",
    "-",
    "+",
    "99999999999999999999",
    "1.2",
    "true",
    "é",
    "\u{0}",
    "\n",
];

/// Keys are matched case-insensitively, so two spellings of one key in an
/// entry are an error: otherwise the last would silently replace a
/// restriction (`srcPosture` by `SrcPosture`).
#[test]
fn a_key_repeated_in_another_case_is_an_error_not_a_silent_override() {
    let err = parse_err(
        r#"{
  "tagOwners": {"tag:web": []},
  "postures": {"posture:strict": ["custom:compliant == true"], "posture:open": []},
  "acls": [
    {"action": "accept", "src": ["*"], "dst": ["tag:web:22"],
     "srcPosture": ["posture:strict"], "SrcPosture": ["posture:open"]},
  ],
  "tests": [{"src": "tag:web", "accept": ["tag:web:22"], "Accept": []}],
}"#,
    );
    assert!(
        err.contains(
            "6:40: duplicate key \"SrcPosture\" in an acl entry (keys are case-insensitive)"
        ),
        "{err}"
    );
    assert!(err.contains("duplicate key \"Accept\" in a test"), "{err}");
}
