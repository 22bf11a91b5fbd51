//! Fuzz check for the wg-quick parser (`ztmesh wg-config`, standalone mode):
//! `wgconf::parse` on any text, then `render` and parse again. Shared by the
//! fuzz target `wgconf_parse` and the corpus replay test in
//! `node/tests/fuzz_corpus.rs`.
//!
//! Properties: nothing panics; an error names a line of the file (or 0 for
//! the file as a whole); whatever parses renders to text that parses to the
//! same configuration; without `include_private_key` no private or preshared
//! key is rendered.

use ztmesh_node::wgconf::{self, WgConfig};

pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let cfg = match wgconf::parse(text) {
        Ok(cfg) => cfg,
        Err(e) => {
            assert!(e.line <= text.lines().count(), "{e}");
            return;
        }
    };
    let rendered = wgconf::render(&cfg, true);
    let again = wgconf::parse(&rendered)
        .unwrap_or_else(|e| panic!("rendered config does not parse: {e}\n{rendered}"));
    assert_eq!(summary(&again), summary(&cfg), "{rendered}");
    // Judged by parsing, not by searching the text: a DNS entry may contain
    // "PresharedKey" or even a key's base64 (the first crash found).
    let public = wgconf::render(&cfg, false);
    let stripped = wgconf::parse(&public)
        .unwrap_or_else(|e| panic!("public render does not parse: {e}\n{public}"));
    assert!(stripped.interface.private_key.is_none(), "{public}");
    assert!(
        stripped.peers.iter().all(|p| p.preshared_key.is_none()),
        "{public}"
    );
}

/// Everything the configuration means, in a comparable form (keys as text).
fn summary(cfg: &WgConfig) -> String {
    let ifc = &cfg.interface;
    let mut s = format!(
        "{:?} {:?} {:?} {:?} {:?}\n",
        ifc.private_key.as_ref().map(|k| k.to_base64()),
        ifc.addresses,
        ifc.listen_port,
        ifc.mtu,
        ifc.dns
    );
    for p in &cfg.peers {
        s += &format!(
            "{} {:?} {:?} {:?} {:?}\n",
            p.public_key,
            p.preshared_key,
            p.allowed_ips,
            p.endpoint,
            p.persistent_keepalive.filter(|k| *k > 0)
        );
    }
    s
}
