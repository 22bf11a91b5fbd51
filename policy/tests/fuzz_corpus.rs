//! Fuzz corpus replay for the policy target (`fuzz/`: policy_parse).
//! Every committed input goes through the target's own check
//! (`fuzz/replay.rs`).
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

#[path = "../../fuzz/replay.rs"]
mod replay;
use replay::replay;

#[path = "../../fuzz/checks/policy_parse.rs"]
mod policy_parse;

#[test]
fn policy_parse_corpus_replays_cleanly() {
    replay("policy_parse", policy_parse::run);
}
