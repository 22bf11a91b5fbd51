//! Fuzz target: `Policy::parse` and what runs on a parsed policy (see
//! `checks/policy_parse.rs`).
//!
//! Run: `scripts/fuzz.sh policy_parse` (or `cargo +nightly fuzz run policy_parse` from `fuzz/`).
#![no_main]

#[path = "../checks/policy_parse.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
