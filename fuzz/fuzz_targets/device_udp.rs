//! Fuzz target: `Device::handle_udp` with a live session.
//! See `checks/device_udp.rs`.
//!
//! Run: `scripts/fuzz.sh device_udp` (or `cargo +nightly fuzz run device_udp` from `fuzz/`).
#![no_main]

#[path = "../checks/device_udp.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
