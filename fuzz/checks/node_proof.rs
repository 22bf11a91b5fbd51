//! Fuzz check for `NodeProof`: the `x-ztmesh-proof` header text an
//! unauthenticated client sends, parsed and verified as the controller does.
//! Shared by the fuzz target `node_proof` and the corpus replay test in
//! `proto/tests/fuzz_corpus.rs` (one body, so both exercise the same code).
//!
//! Input layout: 8 bytes of the controller's clock (`now_ms`, i64 LE), then
//! the header text. Properties: nothing panics (whatever the timestamps); a
//! parsed proof re-parses from its own text; only `Malformed` comes out of
//! parsing; a genuine proof signed at a fuzz-chosen time verifies at that
//! time, once, and never for another method or with a flipped bit.

use ztmesh_proto::auth::{methods, AuthError, NodeProof, ReplayGuard, PROOF_WINDOW_MS};
use ztmesh_proto::keys::SigningKey;

#[path = "common.rs"]
mod common;
use common::Fixed;

pub fn run(data: &[u8]) {
    let (now_ms, rest) = match data.split_first_chunk::<8>() {
        Some((now, rest)) => (i64::from_le_bytes(*now), rest),
        None => (0, data),
    };

    // What a client sends.
    if let Ok(text) = std::str::from_utf8(rest) {
        match text.parse::<NodeProof>() {
            Ok(p) => {
                let again: NodeProof = p
                    .to_string()
                    .parse()
                    .expect("a parsed proof re-parses from its own text");
                assert_eq!(again, p);
                let fresh = p.verify(methods::STREAM_NETMAP, now_ms);
                assert_ne!(fresh, Err(AuthError::Malformed));
                let _ = p.verify(methods::ENROLL, p.timestamp_ms);
                let mut guard = ReplayGuard::default();
                let _ = guard.check_and_record(&p, now_ms);
                let _ = guard.check_and_record(&p, p.timestamp_ms);
            }
            Err(e) => assert_eq!(e, AuthError::Malformed),
        }
    }

    // A genuine proof, made at the fuzz-chosen time.
    let seed = rest.first().copied().unwrap_or(0);
    let key = SigningKey::generate(&mut Fixed(seed));
    let proof = NodeProof::create(
        &key,
        methods::STREAM_NETMAP,
        now_ms,
        &mut Fixed(seed ^ 0x5a),
    );
    let parsed: NodeProof = proof.to_string().parse().expect("our own proof parses");
    assert_eq!(parsed, proof);
    assert_eq!(parsed.verify(methods::STREAM_NETMAP, now_ms), Ok(()));
    assert_eq!(
        parsed.verify(methods::LOGOUT, now_ms),
        Err(AuthError::BadSignature)
    );
    let late = now_ms.saturating_add(PROOF_WINDOW_MS + 1);
    if late != now_ms.saturating_add(PROOF_WINDOW_MS) {
        assert_eq!(
            parsed.verify(methods::STREAM_NETMAP, late),
            Err(AuthError::Stale)
        );
    }
    let mut flipped = parsed.clone();
    let at = usize::from(rest.get(1).copied().unwrap_or(0)) % flipped.signature.len();
    flipped.signature[at] ^= 1 << (rest.get(2).copied().unwrap_or(0) % 8);
    assert_eq!(
        flipped.verify(methods::STREAM_NETMAP, now_ms),
        Err(AuthError::BadSignature)
    );
    let mut guard = ReplayGuard::default();
    assert_eq!(guard.check_and_record(&parsed, now_ms), Ok(()));
    assert_eq!(
        guard.check_and_record(&parsed, now_ms),
        Err(AuthError::Replayed)
    );
}
