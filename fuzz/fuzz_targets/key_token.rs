//! Fuzz target: auth-key and API-key parsing (see `checks/key_token.rs`).
//!
//! Run: `scripts/fuzz.sh key_token` (or `cargo +nightly fuzz run key_token` from `fuzz/`).
#![no_main]

#[path = "../checks/key_token.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
