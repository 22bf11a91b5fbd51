//! Fuzz target: the MagicDNS core, `dns::decide` and the forwarding helpers
//! (see `checks/dns_query.rs`).
//!
//! Run: `scripts/fuzz.sh dns_query` (or `cargo +nightly fuzz run dns_query` from `fuzz/`).
#![no_main]

#[path = "../checks/dns_query.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
