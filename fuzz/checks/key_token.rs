//! Fuzz check for the secret-key formats: auth keys `ztmk1.KEYID.SECRET.FP`
//! (sent by enrolling nodes) and API keys `ztma1.KEYID.SECRET` (sent by admin
//! clients), plus TLS fingerprints. Shared by the fuzz target `key_token` and
//! the corpus replay test in `proto/tests/fuzz_corpus.rs`.
//!
//! Properties: nothing panics; a decoded token re-decodes from its own
//! encoding; auth keys carry a fingerprint and API keys never do; `Debug`
//! never prints the secret.

use ztmesh_proto::auth::{parse_fingerprint, AuthError, KeyToken, API_KEY_PREFIX, AUTH_KEY_PREFIX};

pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for prefix in [AUTH_KEY_PREFIX, API_KEY_PREFIX] {
        match KeyToken::decode(prefix, text) {
            Ok(t) => {
                assert_eq!(t.fingerprint.is_some(), prefix == AUTH_KEY_PREFIX);
                let encoded = t.encode(prefix);
                let again = KeyToken::decode(prefix, &encoded).expect("own encoding decodes");
                assert_eq!(again, t);
                assert_eq!(t.secret_hash(), again.secret_hash());
                // The secret text (third piece) never shows in Debug output.
                let secret_text = encoded.split('.').nth(2).expect("three pieces");
                assert!(!format!("{t:?}").contains(secret_text));
            }
            Err(e) => assert_eq!(e, AuthError::Malformed),
        }
    }
    if let Some(fp) = parse_fingerprint(text) {
        let hex = ztmesh_proto::auth::hex(&fp);
        assert_eq!(parse_fingerprint(&hex), Some(fp));
    }
}
