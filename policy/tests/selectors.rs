//! Table tests: every selector, port and protocol form, checked both through
//! the compiled per-node rules and through `explain` (the direct evaluation).
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

mod common;

use common::{admitted, fleet, parse, with_acls};
use ztmesh_policy::{Compiled, Policy};

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;
const SCTP: u8 = 132;

/// (acls entries, [(src id, dst id, proto, port, allowed)])
type Case = (&'static str, &'static [(u64, u64, u8, u16, bool)]);

const CASES: &[Case] = &[
    (
        r#"{"action": "accept", "src": ["*"], "dst": ["*:*"]}"#,
        &[
            (7, 4, TCP, 1, true),
            (1, 8, UDP, 65535, true),
            (4, 1, ICMP, 0, true),
        ],
    ),
    (
        r#"{"action": "accept", "src": ["alice@example.com"], "dst": ["bob@example.com:22"]}"#,
        &[
            (1, 2, TCP, 22, true),
            (6, 2, TCP, 22, true),
            (3, 2, TCP, 22, false), // tagged: belongs to its tag, not to alice
            (2, 1, TCP, 22, false),
            (1, 2, TCP, 23, false),
        ],
    ),
    (
        r#"{"action": "accept", "src": ["group:eng"], "dst": ["tag:web:443"]}"#,
        &[
            (1, 3, TCP, 443, true),
            (2, 3, TCP, 443, true),
            (5, 3, TCP, 443, false),
            (1, 3, TCP, 80, false),
            (1, 4, TCP, 443, false),
        ],
    ),
    (
        r#"{"action": "accept", "src": ["tag:web"], "proto": "tcp", "dst": ["tag:db:5432"]}"#,
        &[
            (3, 4, TCP, 5432, true),
            (3, 4, UDP, 5432, false),
            (1, 4, TCP, 5432, false),
        ],
    ),
    (
        r#"{"action": "accept", "src": ["lab"], "dst": ["one:80"]}"#,
        &[
            (7, 5, TCP, 80, true),
            (1, 5, TCP, 80, false),
            (7, 1, TCP, 80, false),
        ],
    ),
    (
        r#"{"action": "accept", "src": ["100.64.0.0/30"], "dst": ["100.64.0.4:22"]}"#,
        &[
            (1, 4, TCP, 22, true),
            (3, 4, TCP, 22, true),
            (5, 4, TCP, 22, false),
        ],
    ),
    (
        r#"{"action": "accept", "src": ["fd00::1"], "dst": ["[fd00::3]:443", "fd00::3:22"]}"#,
        &[
            (1, 3, TCP, 443, true),
            (2, 3, TCP, 443, false),
            (1, 3, TCP, 22, true),
            (1, 3, TCP, 23, false),
        ],
    ),
    (
        r#"{"action": "accept", "src": ["*"], "dst": ["fd00:1::/64:22", "[fd00::]/127:80"]}"#,
        &[
            (5, 8, TCP, 22, true),
            (5, 1, TCP, 22, false),
            (5, 1, TCP, 80, true),
            (5, 3, TCP, 80, false),
        ],
    ),
    (
        r#"{"action": "accept", "src": ["v6net"], "dst": ["group:admins:*"]}"#,
        &[(8, 5, TCP, 9, true), (1, 5, TCP, 9, false)],
    ),
    (
        r#"{"action": "accept", "src": ["autogroup:member"], "dst": ["tag:db:*"]}"#,
        &[
            (1, 4, TCP, 9, true),
            (8, 4, UDP, 9, true),
            (3, 4, TCP, 9, false),
            (7, 4, TCP, 9, false),
        ],
    ),
    (
        r#"{"action": "accept", "src": ["autogroup:tagged"], "dst": ["*:*"]}"#,
        &[
            (3, 1, TCP, 1, true),
            (4, 3, TCP, 1, true),
            (1, 3, TCP, 1, false),
        ],
    ),
    (
        r#"{"action": "accept", "src": ["*"], "dst": ["autogroup:tagged:8080"]}"#,
        &[(7, 3, TCP, 8080, true), (7, 1, TCP, 8080, false)],
    ),
    (
        r#"{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]}"#,
        &[
            (1, 6, TCP, 1, true),
            (6, 1, UDP, 1, true),
            (1, 2, TCP, 1, false),
            (1, 3, TCP, 1, false), // web1 is tagged
            (3, 1, TCP, 1, false),
        ],
    ),
    (
        r#"{"action": "accept", "src": ["group:eng", "dave@example.com"], "dst": ["autogroup:self:22"]}"#,
        &[
            (1, 6, TCP, 22, true),
            (3, 1, TCP, 22, false),
            (7, 1, TCP, 22, false),
            (1, 6, TCP, 80, false),
        ],
    ),
    (
        r#"{"action": "accept", "src": ["*"], "dst": ["tag:db:80,443,8000-8999"]}"#,
        &[
            (1, 4, TCP, 80, true),
            (1, 4, TCP, 443, true),
            (1, 4, TCP, 8000, true),
            (1, 4, TCP, 8999, true),
            (1, 4, TCP, 9000, false),
            (1, 4, TCP, 81, false),
        ],
    ),
    (
        r#"{"action": "accept", "src": ["*"], "proto": "17", "dst": ["tag:db:53"]}"#,
        &[(1, 4, UDP, 53, true), (1, 4, TCP, 53, false)],
    ),
    (
        r#"{"action": "accept", "src": ["*"], "proto": "icmp", "dst": ["tag:db:*"]}"#,
        &[
            (1, 4, ICMP, 0, true),
            (1, 4, TCP, 0, false),
            (1, 4, ICMPV6, 0, false),
        ],
    ),
    (
        // No proto: TCP, UDP, ICMP and ICMPv6; ports do not restrict ICMP.
        r#"{"action": "accept", "src": ["group:eng"], "dst": ["tag:db:22"]}"#,
        &[
            (1, 4, TCP, 22, true),
            (1, 4, UDP, 22, true),
            (1, 4, ICMP, 0, true),
            (1, 4, ICMPV6, 0, true),
            (1, 4, TCP, 23, false),
            (1, 4, SCTP, 22, false),
        ],
    ),
    (
        r#"{"action": "accept", "src": ["group:eng"], "proto": "sctp", "dst": ["tag:db:22"]}"#,
        &[(1, 4, SCTP, 22, true), (1, 4, TCP, 22, false)],
    ),
    (
        r#"{"action": "accept", "src": ["group:eng"], "proto": "ipv6-icmp", "dst": ["tag:db:*"]},
           {"action": "accept", "src": ["group:admins"], "proto": "gre", "dst": ["tag:db:*"]}"#,
        &[
            (1, 4, ICMPV6, 0, true),
            (1, 4, ICMP, 0, false),
            (5, 4, 47, 0, true),
            (1, 4, 47, 0, false),
        ],
    ),
    (
        // Several sources and destinations in one entry.
        r#"{"action": "accept", "src": ["bob@example.com", "tag:db"], "dst": ["alice@example.com:22", "tag:web:80"]}"#,
        &[
            (2, 1, TCP, 22, true),
            (4, 6, TCP, 22, true),
            (2, 3, TCP, 80, true),
            (2, 3, TCP, 22, false),
            (2, 1, TCP, 80, false),
        ],
    ),
];

#[test]
fn every_selector_port_and_protocol_form() {
    let nodes = fleet();
    for (acls, flows) in CASES {
        let policy = parse(&with_acls(acls));
        let compiled = Compiled::new(policy.clone(), nodes.clone());
        for &(s, d, proto, port, want) in *flows {
            let name = |id: u64| {
                nodes
                    .iter()
                    .find(|n| n.id == id)
                    .expect("fleet id")
                    .name
                    .clone()
            };
            let got = admitted(&compiled, s, d, proto, port);
            assert_eq!(
                got,
                want,
                "compiled: {acls}\n{} -> {} proto {proto} port {port}",
                name(s),
                name(d)
            );
            let e = policy.explain(&nodes, &name(s), &name(d), port, proto);
            assert_eq!(
                e.allowed,
                want,
                "explain: {acls}\n{} -> {} {proto}/{port}: {}",
                name(s),
                name(d),
                e.detail
            );
        }
    }
}

#[test]
fn comments_trailing_commas_and_case_insensitive_keys() {
    let text = r#"
    /* header
       comment */
    {
      // a line comment
      "Groups": {"group:eng": ["alice@example.com",],},
      "ACLs": [
        {
          "Action": "accept", // inline
          "Src": ["group:eng",],
          "Dst": ["*:22",], /* block */
        },
      ],
    }
    "#;
    let p = parse(text);
    let nodes = fleet();
    assert!(
        p.explain(&nodes, "alice-laptop", "bob-laptop", 22, TCP)
            .allowed
    );
    assert!(
        !p.explain(&nodes, "bob-laptop", "alice-laptop", 22, TCP)
            .allowed
    );
}

#[test]
fn empty_policies_deny_everything() {
    let nodes = fleet();
    for text in ["", "  // only a comment\n", "{}", "{\"acls\": []}"] {
        let p = Policy::parse("p.hujson", text).expect("empty policy is valid");
        let c = Compiled::new(p.clone(), nodes.clone());
        for n in &nodes {
            let v = c.view(n.id).expect("every node has a view");
            assert!(v.peers.is_empty() && v.inbound.is_empty(), "{text:?}");
        }
        assert!(
            !p.explain(&nodes, "alice-laptop", "bob-laptop", 22, TCP)
                .allowed
        );
    }
    let c = Compiled::new(Policy::empty(), nodes.clone());
    assert!(c
        .view(1)
        .is_some_and(|v| v.peers.is_empty() && v.inbound.is_empty()));
}

#[test]
fn tag_owners_and_tags() {
    let p = parse(&with_acls(""));
    assert!(p.may_own_tag("alice@example.com", "tag:web"));
    assert!(p.may_own_tag("carol@example.com", "tag:db"));
    assert!(!p.may_own_tag("alice@example.com", "tag:db"));
    assert!(!p.may_own_tag("alice@example.com", "tag:undefined"));
    let tags: Vec<String> = p.tags().into_iter().collect();
    assert_eq!(tags, ["tag:db", "tag:web"]);

    let p = parse(
        r#"{"tagOwners": {"tag:ci": ["autogroup:member"], "tag:a": ["tag:ci"], "tag:none": []}}"#,
    );
    assert!(p.may_own_tag("anyone@example.com", "tag:ci"));
    assert!(!p.may_own_tag("anyone@example.com", "tag:a"));
    assert!(!p.may_own_tag("anyone@example.com", "tag:none"));
}

#[test]
fn explain_names_the_deciding_rule() {
    let text = with_acls(
        r#"
        {"action": "accept", "src": ["group:admins"], "dst": ["*:22"]},
        {"action": "accept", "src": ["group:eng"], "dst": ["tag:web:443"]},"#,
    );
    let p = parse(&text);
    let nodes = fleet();
    let line_of = |needle: &str| text.lines().position(|l| l.contains(needle)).expect("line") + 1;
    let e = p.explain(&nodes, "alice@example.com", "tag:web", 443, TCP);
    assert!(e.allowed);
    assert_eq!(
        e.rule_id,
        Some(format!("p.hujson:{}", line_of("tag:web:443")))
    );
    assert!(e.detail.contains("group:eng"), "{}", e.detail);

    // Groups, tags, hosts and IPs as identities; node names too.
    assert!(p.explain(&nodes, "group:admins", "tag:db", 22, TCP).allowed);
    assert!(p.explain(&nodes, "group:eng", "web1", 443, TCP).allowed);
    assert!(
        p.explain(&nodes, "100.64.0.1", "100.64.0.3", 443, TCP)
            .allowed
    );
    assert!(!p.explain(&nodes, "group:eng", "tag:db", 22, TCP).allowed);

    let e = p.explain(&nodes, "bob@example.com", "tag:db", 22, TCP);
    assert_eq!(
        (e.allowed, e.rule_id, e.detail.as_str()),
        (false, None, "no rule matches")
    );

    let e = p.explain(&nodes, "nobody", "tag:db", 22, TCP);
    assert!(!e.allowed);
    assert_eq!(
        e.detail,
        "source: unknown identity \"nobody\": not a user, group, tag, host alias or IP address"
    );
    let e = p.explain(&nodes, "alice@example.com", "tag:nope", 22, TCP);
    assert_eq!(
        e.detail,
        "destination: tag \"tag:nope\" is not defined in tagOwners"
    );
}
