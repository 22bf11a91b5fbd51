//! Fuzz target: the stateful filter with a stream of packets in both directions.
//! See `checks/filter_inbound.rs`.
//!
//! Run: `scripts/fuzz.sh filter_inbound` (or `cargo +nightly fuzz run filter_inbound` from `fuzz/`).
#![no_main]

#[path = "../checks/filter_inbound.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
