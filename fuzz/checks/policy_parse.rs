//! Fuzz check for `Policy::parse` (and the tests section, explain and compile
//! on whatever parses): never panic, hang or overflow the stack; every
//! diagnostic is one `FILE:LINE:COL: message` line. Shared by the fuzz target
//! `policy_parse` and the corpus replay test in `policy/tests/fuzz_corpus.rs`.

use ztmesh_policy::{Compiled, NodeInfo, Policy};

pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Policy::parse("fuzz.hujson", text) {
        Ok(policy) => {
            let _ = policy.run_tests();
            let node = NodeInfo {
                id: 1,
                name: "n1".to_string(),
                user: Some("alice@example.com".to_string()),
                tags: policy.tags().into_iter().take(1).collect(),
                addresses: vec!["100.64.0.1".parse().expect("literal address")],
                ..NodeInfo::default()
            };
            let nodes = vec![node];
            let _ = policy.explain(&nodes, "alice@example.com", "n1", 22, 6);
            let _ = Compiled::new(policy, nodes);
        }
        Err(e) => {
            // Every diagnostic is one `FILE:LINE:COL: message` line.
            assert!(e.to_string().lines().all(|l| l.starts_with("fuzz.hujson:")));
        }
    }
}
