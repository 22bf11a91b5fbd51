//! Fuzz check for the WireGuard UAPI `set` protocol (the `wg` tool talking to
//! the daemon's socket): `SetRequest::parse` on the request lines, `apply` to
//! a current peer list, then `render_get` of the result. Shared by the fuzz
//! target `uapi_set` and the corpus replay test in `node/tests/fuzz_corpus.rs`.
//!
//! Properties: nothing panics; errors are the documented negative errnos;
//! the applied peer list has unique keys, truncated AllowedIPs without
//! duplicates, keepalives > 0 and no all-zero preshared key; the rendered
//! `get` is `key=value` lines only.

use std::collections::BTreeSet;

use ztmesh_node::tunnel::{PeerConfig, PeerStatus};
use ztmesh_node::uapi::{render_get, SetRequest, State};
use ztmesh_proto::keys::{WgPrivateKey, WgPublicKey};

const PRIVATE: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
const LISTEN_PORT: u16 = 51820;

fn current() -> Vec<PeerConfig> {
    vec![
        PeerConfig {
            public_key: WgPublicKey([1; 32]),
            preshared_key: None,
            allowed_ips: vec!["100.64.0.2/32".parse().expect("literal")],
            endpoint: Some("198.18.0.2:51820".parse().expect("literal")),
            candidates: Vec::new(),
            relay: None,
            persistent_keepalive: None,
        },
        PeerConfig {
            public_key: WgPublicKey([2; 32]),
            preshared_key: Some([9; 32]),
            allowed_ips: vec!["fd00::3/128".parse().expect("literal")],
            endpoint: None,
            candidates: Vec::new(),
            relay: None,
            persistent_keepalive: Some(25),
        },
    ]
}

pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let einval = -i64::from(libc::EINVAL);
    let eproto = -i64::from(libc::EPROTO);
    let request = match SetRequest::parse(text.split('\n')) {
        Ok(r) => r,
        Err(e) => {
            assert!(e == einval || e == eproto, "errno {e}");
            return;
        }
    };
    let (private_key, peers) = match request.apply(&current(), LISTEN_PORT) {
        Ok(done) => done,
        Err(e) => {
            assert_eq!(e, -i64::from(libc::EADDRINUSE));
            return;
        }
    };
    let mut keys = BTreeSet::new();
    for p in &peers {
        assert!(keys.insert(p.public_key), "duplicate peer");
        let nets: BTreeSet<_> = p.allowed_ips.iter().collect();
        assert_eq!(nets.len(), p.allowed_ips.len(), "duplicate allowed_ip");
        assert!(p.allowed_ips.iter().all(|n| *n == n.trunc()));
        assert!(p.persistent_keepalive.is_none_or(|k| k > 0));
        assert_ne!(p.preshared_key, Some([0; 32]));
    }
    let state = State {
        private_key: private_key.unwrap_or_else(|| PRIVATE.parse().expect("literal key")),
        listen_port: LISTEN_PORT,
        peers: peers
            .into_iter()
            .map(|config| {
                let status = PeerStatus {
                    endpoint: config.endpoint,
                    destination: None,
                    direct: false,
                    last_rx: None,
                    path: Default::default(),
                    config,
                    last_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                };
                (status, None)
            })
            .collect(),
    };
    let _: &WgPrivateKey = &state.private_key;
    for line in render_get(&state).lines() {
        assert!(
            line.split_once('=')
                .is_some_and(|(k, v)| !k.is_empty() && !v.is_empty()),
            "{line:?}"
        );
    }
}
