//! Fuzzes the IP packet parser: it must never panic, and whatever it accepts
//! must be self-consistent.
//! Shared by the fuzz target `packet_parse` and the corpus replay test in
//! `node/tests/fuzz_corpus.rs`.

use ztmesh_node::filter::packet;

pub fn run(data: &[u8]) {
    if let Ok(p) = packet::parse(data) {
        assert_eq!(Some(p.src), packet::source(data));
        assert_eq!(Some(p.dst), packet::destination(data));
    }
}
