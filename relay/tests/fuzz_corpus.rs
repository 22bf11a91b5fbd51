//! Fuzz corpus replay for the relay target (`fuzz/`: relay_frames). Every
//! committed input goes through the target's own check (`fuzz/replay.rs`).
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

#[path = "../../fuzz/replay.rs"]
mod replay;
use replay::replay;

#[path = "../../fuzz/checks/relay_frames.rs"]
mod relay_frames;

#[test]
fn relay_frames_corpus_replays_cleanly() {
    replay("relay_frames", relay_frames::run);
}
