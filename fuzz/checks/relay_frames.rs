//! Fuzz check for the relay's frame codec (`ztmesh_proto::relay`) and the
//! relay core's HELLO, MAP and routing paths: the bytes a client sends on
//! the relay's stream and as QUIC datagrams. Shared by the fuzz target
//! `relay_frames` and the corpus replay test in `relay/tests/fuzz_corpus.rs`.
//!
//! Input layout: 8 bytes of the relay's clock (`now_ms`, i64 LE), then a
//! byte stream of frames. Properties: nothing panics; a decoded frame
//! re-encodes and decodes to the same frame; decoding never reads past the
//! declared length, and the length is within its type's bound (only HELLO
//! and MAP may exceed a data frame's); HELLO and MAP go through the core
//! (which refuses what the fuzzer cannot sign, without panicking); DATA goes
//! through `route`.

use ztmesh_proto::keys::SigningKey;
use ztmesh_proto::relay::{
    decode, decode_datagram, max_len, Frame, HEADER_LEN, MAX_FRAME_LEN, MAX_MAP_FRAME_LEN,
};
use ztmesh_relay::core::{Config, Core};

#[path = "common.rs"]
mod common;
use common::Fixed;

pub fn run(data: &[u8]) {
    let (now_ms, mut rest) = match data.split_first_chunk::<8>() {
        Some((now, rest)) => (i64::from_le_bytes(*now), rest),
        None => (0, data),
    };
    let _ = decode_datagram(rest);
    let controller = SigningKey::generate(&mut Fixed(7));
    let mut core: Core<u8> = Core::new(Config {
        relay_name: "fuzz".into(),
        controller_key: controller.public(),
        max_nodes: 4,
        memory_budget: 1 << 20,
    });
    let mut node = None;
    // Each frame takes at least HEADER_LEN + 1 bytes, so this is bounded.
    while let Ok(Some((frame, used))) = decode(rest) {
        assert!(used > HEADER_LEN && used <= rest.len());
        // Every frame within the bound of its type; only maps beyond a data frame's.
        let ty = rest[HEADER_LEN];
        assert!(used - HEADER_LEN <= max_len(ty).expect("a decoded frame has a known type"));
        assert!(used - HEADER_LEN <= MAX_MAP_FRAME_LEN);
        if !matches!(frame, Frame::Hello { .. } | Frame::Map(_)) {
            assert!(used - HEADER_LEN <= MAX_FRAME_LEN);
        }
        let again = frame.to_vec().expect("a decoded frame encodes");
        let (back, n) = decode(&again)
            .expect("our encoding decodes")
            .expect("our encoding is complete");
        assert_eq!(back, frame);
        assert_eq!(n, again.len());
        match &frame {
            Frame::Hello { proof, map } => {
                if let Ok(w) = core.hello(1, 1, proof, map, now_ms) {
                    node = Some(w.node);
                }
            }
            Frame::Map(map) => {
                let _ = core.update_map(node.unwrap_or(1), 1, map, now_ms);
            }
            Frame::Data { peer, datagram } => {
                let _ = core.route(node.unwrap_or(1), 1, *peer, datagram.len(), now_ms);
            }
            Frame::Welcome { .. } | Frame::Refused { .. } => {}
        }
        rest = &rest[used..];
    }
    let _ = core.snapshot();
}
