//! Fuzz target: the UAPI set protocol (see `checks/uapi_set.rs`).
//!
//! Run: `scripts/fuzz.sh uapi_set` (or `cargo +nightly fuzz run uapi_set` from `fuzz/`).
#![no_main]

#[path = "../checks/uapi_set.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
