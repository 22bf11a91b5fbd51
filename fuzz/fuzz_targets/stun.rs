//! Fuzz target: the STUN codec (see `checks/stun.rs`).
//!
//! Run: `scripts/fuzz.sh stun` (or `cargo +nightly fuzz run stun` from `fuzz/`).
#![no_main]

#[path = "../checks/stun.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
