//! Fuzz target: `NodeProof` parsing and verification (see `checks/node_proof.rs`).
//!
//! Run: `scripts/fuzz.sh node_proof` (or `cargo +nightly fuzz run node_proof` from `fuzz/`).
#![no_main]

#[path = "../checks/node_proof.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
