//! Fuzz check for the STUN codec (`ztmesh_proto::stun`): datagrams arriving
//! on the node's data-plane socket and on a relay's STUN port. Shared by the
//! fuzz target `stun` and the corpus replay test in
//! `proto/tests/fuzz_corpus.rs`.
//!
//! Properties: nothing panics; a parsed response passed `is_stun`; the
//! responder answers only what `is_stun` accepts, with 32 or 44 bytes that
//! parse back to the same transaction id and source; a datagram that starts
//! like a WireGuard message is never STUN.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ztmesh_proto::stun::{
    binding_response, is_stun, parse_binding_response, RESPONSE_LEN_V4, RESPONSE_LEN_V6,
};

pub fn run(data: &[u8]) {
    let stun = is_stun(data);
    if data.len() >= 4 && (1..=4).contains(&data[0]) && data[1..4] == [0, 0, 0] {
        assert!(!stun, "a WireGuard message was taken for STUN");
    }
    if let Ok((txid, _addr)) = parse_binding_response(data) {
        assert!(stun);
        assert_eq!(txid[..], data[8..20]);
    }
    let sources = [
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)), 51820),
        SocketAddr::new(IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)), 3478),
    ];
    for (source, len) in sources.into_iter().zip([RESPONSE_LEN_V4, RESPONSE_LEN_V6]) {
        if let Some(resp) = binding_response(data, source) {
            assert!(stun);
            assert_eq!(resp.len(), len);
            let (txid, addr) = parse_binding_response(&resp).expect("own response parses");
            assert_eq!(txid[..], data[8..20]);
            assert_eq!(addr, source);
            assert_eq!(
                binding_response(&resp, source),
                None,
                "a response is never answered"
            );
        }
    }
}
