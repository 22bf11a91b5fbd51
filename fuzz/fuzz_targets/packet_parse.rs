//! Fuzz target: the IP packet parser.
//! See `checks/packet_parse.rs`.
//!
//! Run: `scripts/fuzz.sh packet_parse` (or `cargo +nightly fuzz run packet_parse` from `fuzz/`).
#![no_main]

#[path = "../checks/packet_parse.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
