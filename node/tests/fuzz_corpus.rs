//! Fuzz corpus replay for the node targets (`fuzz/`: packet_parse,
//! filter_inbound, device_udp, wgconf_parse, uapi_set).
//! Replays every committed fuzz input (seeds and every crash ever found) through
//! the same check the fuzz target runs, so `cargo test` on the stable toolchain
//! guards against regressions; the campaign itself is `scripts/fuzz.sh`.

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

#[path = "../../fuzz/checks/device_udp.rs"]
mod device_udp;
#[path = "../../fuzz/checks/filter_inbound.rs"]
mod filter_inbound;
#[path = "../../fuzz/checks/packet_parse.rs"]
mod packet_parse;
#[path = "../../fuzz/checks/uapi_set.rs"]
mod uapi_set;
#[path = "../../fuzz/checks/wgconf_parse.rs"]
mod wgconf_parse;

/// Runs `check` on every file of the target's corpus; reports all failures.
fn replay(target: &str, check: fn(&[u8])) {
    let dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
    let mut failed = Vec::new();
    for file in &files {
        let data = fs::read(file).expect("read corpus file");
        if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            failed.push(file.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} inputs fail:\n{}",
        failed.len(),
        files.len(),
        failed.join("\n")
    );
}

#[test]
fn packet_parse_corpus_replays_cleanly() {
    replay("packet_parse", packet_parse::run);
}

#[test]
fn filter_inbound_corpus_replays_cleanly() {
    replay("filter_inbound", filter_inbound::run);
}

#[test]
fn device_udp_corpus_replays_cleanly() {
    replay("device_udp", device_udp::run);
}

#[test]
fn wgconf_parse_corpus_replays_cleanly() {
    replay("wgconf_parse", wgconf_parse::run);
}

#[test]
fn uapi_set_corpus_replays_cleanly() {
    replay("uapi_set", uapi_set::run);
}
