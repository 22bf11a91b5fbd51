//! Fuzz target: the `/metrics` request routing (see `checks/metrics_request.rs`).
//!
//! Run: `scripts/fuzz.sh metrics_request` (or `cargo +nightly fuzz run metrics_request` from `fuzz/`).
#![no_main]

#[path = "../checks/metrics_request.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
