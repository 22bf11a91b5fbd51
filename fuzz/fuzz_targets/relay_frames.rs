//! Fuzz target: the relay's frame codec and the core's HELLO/MAP/route
//! paths (see `checks/relay_frames.rs`).
//!
//! Run: `scripts/fuzz.sh relay_frames` (or `cargo +nightly fuzz run relay_frames` from `fuzz/`).
#![no_main]

#[path = "../checks/relay_frames.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
