//! The `dns` section: split DNS suffixes and resolvers as the node receives
//! them ([`Policy::split_dns`]), and each way a section can be wrong, with
//! the position reported. (`tests/golden/bad_dns*.hujson` pins the exact
//! messages of a whole broken file.)
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

use std::net::SocketAddr;

use ztmesh_policy::{Policy, MAX_SPLIT_RESOLVERS, MAX_SPLIT_SUFFIXES};

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test socket address")
}

/// The one diagnostic of `text`, as `LINE:COL: message`.
fn only_error(text: &str) -> String {
    let err = Policy::parse("p.hujson", text).expect_err("policy should be refused");
    let d = err.diagnostics();
    assert_eq!(d.len(), 1, "expected one diagnostic, got:\n{err}");
    format!("{}:{}: {}", d[0].line, d[0].col, d[0].message)
}

#[test]
fn split_dns_is_sorted_lowercased_with_port_53_by_default() {
    let p = Policy::parse(
        "p.hujson",
        r#"{
  // Corporate names through the subnet router.
  "DNS": {"Split": {
    "Example.Corp": ["198.19.50.53", "[fd00::53]:5353"],
    "a.lab": ["fd00::35", "198.19.60.53:5300"],
  }},
}"#,
    )
    .expect("valid policy");
    assert_eq!(
        p.split_dns(),
        [
            (
                "a.lab".to_string(),
                vec![addr("[fd00::35]:53"), addr("198.19.60.53:5300")]
            ),
            (
                "example.corp".to_string(),
                vec![addr("198.19.50.53:53"), addr("[fd00::53]:5353")]
            ),
        ]
    );
}

#[test]
fn a_policy_without_dns_has_no_split_routes() {
    assert!(Policy::parse("p.hujson", "{}")
        .expect("empty")
        .split_dns()
        .is_empty());
    assert!(Policy::parse("p.hujson", r#"{"dns": {}}"#)
        .expect("empty dns")
        .split_dns()
        .is_empty());
    assert!(Policy::parse("p.hujson", r#"{"dns": {"split": {}}}"#)
        .expect("empty split")
        .split_dns()
        .is_empty());
}

#[test]
fn split_dns_limits_are_exact() {
    let resolvers = |n: usize| -> String {
        (1..=n)
            .map(|i| format!("\"198.19.50.{i}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let one = |n: usize| format!(r#"{{"dns": {{"split": {{"corp": [{}]}}}}}}"#, resolvers(n));
    let p = Policy::parse("p.hujson", &one(MAX_SPLIT_RESOLVERS)).expect("8 resolvers");
    assert_eq!(p.split_dns()[0].1.len(), MAX_SPLIT_RESOLVERS);
    // The ninth resolver is reported where it stands.
    let text = one(MAX_SPLIT_RESOLVERS + 1);
    let col = text.find("\"198.19.50.9\"").expect("ninth") + 1;
    assert_eq!(
        only_error(&text),
        format!("1:{col}: too many resolvers for \"corp\": at most 8")
    );

    let suffixes = |n: usize| -> String {
        (0..n)
            .map(|i| format!("\n\"s{i}.corp\": [\"198.19.50.53\"],"))
            .collect::<String>()
    };
    let many = |n: usize| format!("{{\"dns\": {{\"split\": {{{}\n}}}}}}", suffixes(n));
    let p = Policy::parse("p.hujson", &many(MAX_SPLIT_SUFFIXES)).expect("64 suffixes");
    assert_eq!(p.split_dns().len(), MAX_SPLIT_SUFFIXES);
    // The 65th suffix is on line 66 (the first is on line 2).
    assert_eq!(
        only_error(&many(MAX_SPLIT_SUFFIXES + 1)),
        "66:1: too many split DNS suffixes: at most 64"
    );
}

#[test]
fn each_bad_split_entry_is_reported_at_its_position() {
    let cases: &[(&str, &str)] = &[
        (
            r#"{"dns": {"split": {"corp.": ["198.19.50.53"]}}}"#,
            r#"1:20: invalid DNS suffix "corp.": write it without the trailing dot ("corp")"#,
        ),
        (
            r#"{"dns": {"split": {"a..corp": ["198.19.50.53"]}}}"#,
            r#"1:20: invalid DNS suffix "a..corp": empty label (two dots in a row, or a leading dot)"#,
        ),
        (
            r#"{"dns": {"split": {"": ["198.19.50.53"]}}}"#,
            r#"1:20: invalid DNS suffix "": it is empty"#,
        ),
        (
            r#"{"dns": {"split": {"a-.corp": ["198.19.50.53"]}}}"#,
            r#"1:20: invalid DNS suffix "a-.corp": a label starts or ends with '-'"#,
        ),
        (
            r#"{"dns": {"split": {"a_b.corp": ["198.19.50.53"]}}}"#,
            r#"1:20: invalid DNS suffix "a_b.corp": labels hold only letters, digits and '-'"#,
        ),
        (
            r#"{"dns": {"split": {"corp": ["198.19.50.53"], "CORP": ["198.19.50.54"]}}}"#,
            r#"1:46: duplicate split DNS suffix "corp" (suffixes match case-insensitively)"#,
        ),
        (
            r#"{"dns": {"split": {"corp": ["100.100.100.100"]}}}"#,
            r#"1:29: resolver "100.100.100.100" is in the overlay range 100.64.0.0/10: mesh names are answered by each node itself; give a resolver outside the overlay (behind a subnet router)"#,
        ),
        (
            r#"{"dns": {"split": {"corp": ["dns.corp"]}}}"#,
            r#"1:29: invalid resolver "dns.corp": expected an IP address or IP:PORT ("198.19.50.53", "[fd00::53]:5353")"#,
        ),
        (
            r#"{"dns": {"split": {"corp": ["198.19.50.53", "198.19.50.53:53"]}}}"#,
            r#"1:45: duplicate resolver "198.19.50.53:53""#,
        ),
        (
            r#"{"dns": {"split": {"corp": []}}}"#,
            r#"1:28: the resolvers of "corp" must name at least one resolver"#,
        ),
        (
            r#"{"dns": {"split": {"corp": "198.19.50.53"}}}"#,
            r#"1:28: the resolvers of "corp" must be an array, found string"#,
        ),
        (
            r#"{"dns": {"split": ["corp"]}}"#,
            r#"1:19: "dns.split" must be an object, found array"#,
        ),
        (
            r#"{"dns": {"nameservers": ["198.19.50.53"]}}"#,
            r#"1:10: unknown key "nameservers" in dns; expected split"#,
        ),
        (
            r#"{"dns": true}"#,
            r#"1:9: "dns" must be an object, found boolean"#,
        ),
    ];
    for (text, want) in cases {
        assert_eq!(only_error(text), *want, "policy {text}");
    }
}
