//! Fuzz target: the wg-quick parser (see `checks/wgconf_parse.rs`).
//!
//! Run: `scripts/fuzz.sh wgconf_parse` (or `cargo +nightly fuzz run wgconf_parse` from `fuzz/`).
#![no_main]

#[path = "../checks/wgconf_parse.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
