//! Fuzzes the IP packet parser: it must never panic, and whatever it accepts
//! must be self-consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ztmesh_node::filter::packet;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = packet::parse(data) {
        assert_eq!(Some(p.src), packet::source(data));
        assert_eq!(Some(p.dst), packet::destination(data));
    }
});
