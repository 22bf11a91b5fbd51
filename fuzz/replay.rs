//! Replays a fuzz target's committed corpus (seeds and every crash ever
//! found) through the same check the fuzz target runs, so `cargo test` on the
//! stable toolchain guards against regressions. Included with `#[path]` by
//! the corpus tests of proto, policy and node; the campaign itself is
//! `scripts/fuzz.sh`.

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// Runs `check` on every file of `fuzz/corpus/TARGET`; reports all failures.
pub fn replay(target: &str, check: fn(&[u8])) {
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
