//! Fuzz corpus replay for the proto targets (`fuzz/`: node_proof, key_token, stun,
//! metrics_request).
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

#[path = "../../fuzz/checks/key_token.rs"]
mod key_token;
#[path = "../../fuzz/checks/metrics_request.rs"]
mod metrics_request;
#[path = "../../fuzz/checks/node_proof.rs"]
mod node_proof;
#[path = "../../fuzz/checks/stun.rs"]
mod stun;

#[test]
fn node_proof_corpus_replays_cleanly() {
    replay("node_proof", node_proof::run);
}

#[test]
fn key_token_corpus_replays_cleanly() {
    replay("key_token", key_token::run);
}

#[test]
fn stun_corpus_replays_cleanly() {
    replay("stun", stun::run);
}

#[test]
fn metrics_request_corpus_replays_cleanly() {
    replay("metrics_request", metrics_request::run);
}
