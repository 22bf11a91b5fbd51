//! Golden tests: each `tests/golden/NAME.hujson` is a broken policy whose
//! exact diagnostics (`FILE:LINE:COL: message`, one per line) are in
//! `NAME.err`. Regenerate with `UPDATE_GOLDEN=1 cargo test -p ztmesh-policy
//! --test golden_errors`, then review the diff.
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

use std::fs;
use std::path::Path;

use ztmesh_policy::Policy;

#[test]
fn broken_policies_report_exact_diagnostics() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut inputs: Vec<_> = fs::read_dir(&dir)
        .expect("golden dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "hujson"))
        .collect();
    inputs.sort();
    assert!(inputs.len() >= 10, "expected at least 10 golden cases");
    let mut failures = Vec::new();
    for input in inputs {
        let name = input
            .file_name()
            .expect("file name")
            .to_string_lossy()
            .into_owned();
        let text = fs::read_to_string(&input).expect("read input");
        let got = match Policy::check(&name, &text) {
            Ok(_) => "(accepted)".to_string(),
            Err(e) => e.to_string(),
        } + "\n";
        let golden = input.with_extension("err");
        if update {
            fs::write(&golden, &got).expect("write golden");
            continue;
        }
        let want = fs::read_to_string(&golden).unwrap_or_default();
        if got != want {
            failures.push(format!("{name}:\n--- want\n{want}--- got\n{got}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_error_line_has_file_line_col_prefix() {
    let text =
        "{\n  \"acls\": [{\"action\": \"deny\", \"src\": [\"group:x\"], \"dst\": [\"*:0\"]}],\n}\n";
    let err = Policy::parse("policy.hujson", text).expect_err("broken");
    let lines: Vec<String> = err.to_string().lines().map(str::to_string).collect();
    assert_eq!(
        lines,
        [
            "policy.hujson:2:23: action \"deny\" is not supported; rules only \"accept\" (everything else is denied)",
            "policy.hujson:2:39: undefined group \"group:x\"",
            "policy.hujson:2:59: invalid port \"0\": ports are 1-65535",
        ]
    );
    assert_eq!(err.diagnostics().len(), 3);
    assert_eq!(
        (err.diagnostics()[1].line, err.diagnostics()[1].col),
        (2, 39)
    );
}
