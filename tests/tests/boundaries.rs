//! Architecture boundaries, enforced: the pure cores (the policy crate, the
//! packet filter, the tunnel `Device`, the node's netmap gate and translation)
//! do no I/O and read no clock or entropy of their own. Time and randomness
//! come in as arguments; sockets, files, processes, async runtimes, gRPC and
//! SQLite live in the shells around them.
//!
//! The check reads the source: a pure file may not name a forbidden item
//! outside its `#[cfg(test)]` section (tests may use the real clock to build
//! inputs). Address *types* (`IpAddr`, `SocketAddr`) are values and allowed;
//! sockets are I/O and are not.

use std::fs;
use std::path::{Path, PathBuf};

/// Files and directories (all `.rs` files below) that must stay pure.
const PURE: &[&str] = &[
    "policy/src",
    "node/src/filter",
    "node/src/tunnel",
    "node/src/control/apply.rs",
];

/// What a pure file must not name, and why.
const FORBIDDEN: &[(&str, &str)] = &[
    ("tokio", "an async runtime is I/O plumbing"),
    ("tonic", "gRPC belongs to the client/service shells"),
    ("hyper", "HTTP belongs to the shells"),
    ("rusqlite", "the store is a shell"),
    ("socket2", "sockets are I/O"),
    ("quinn_udp", "sockets are I/O"),
    ("tun_rs", "the TUN device is I/O"),
    ("UdpSocket", "sockets are I/O"),
    ("TcpStream", "sockets are I/O"),
    ("TcpListener", "sockets are I/O"),
    ("UnixStream", "sockets are I/O"),
    ("std::fs", "files are I/O"),
    ("std::process", "processes are I/O"),
    ("std::env", "the environment is an input: pass it in"),
    ("Instant::now", "time is an argument"),
    ("SystemTime::now", "time is an argument"),
    (
        "thread_rng",
        "randomness is an argument (seed at construction)",
    ),
    ("OsRng", "randomness is an argument (seed at construction)"),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
        .to_path_buf()
}

fn rust_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_file() {
        if path.extension().is_some_and(|e| e == "rs") {
            out.push(path.to_path_buf());
        }
        return;
    }
    let entries = fs::read_dir(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut paths: Vec<PathBuf> = entries.map(|e| e.expect("dir entry").path()).collect();
    paths.sort();
    for p in paths {
        rust_files(&p, out);
    }
}

/// The part of a file that is compiled outside tests: everything before its
/// first `#[cfg(test)]` (tests come last, per STYLE.md); nothing for a file
/// that is itself a test module (`tests.rs`).
fn non_test_part(path: &Path, text: &str) -> String {
    if path.file_name().is_some_and(|n| n == "tests.rs") {
        return String::new();
    }
    let end = text.find("#[cfg(test)]").unwrap_or(text.len());
    text[..end].to_string()
}

/// Whether `line` names `item` as code (not inside a `//` comment).
fn names(line: &str, item: &str) -> bool {
    let code = line.split("//").next().unwrap_or("");
    code.match_indices(item).any(|(i, _)| {
        let before = code[..i].chars().next_back();
        let after = code[i + item.len()..].chars().next();
        let ident = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
        !ident(before) && !ident(after)
    })
}

/// Every `file:line: item (why)` in `files` that a pure module must not have.
fn violations(files: &[PathBuf]) -> Vec<String> {
    let mut out = Vec::new();
    for f in files {
        let text = fs::read_to_string(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        for (n, line) in non_test_part(f, &text).lines().enumerate() {
            for (item, why) in FORBIDDEN {
                if names(line, item) {
                    out.push(format!("{}:{}: `{item}` ({why})", f.display(), n + 1));
                }
            }
        }
    }
    out
}

#[test]
fn pure_modules_do_no_io_and_read_no_clock_or_entropy() {
    let root = root();
    let mut files = Vec::new();
    for p in PURE {
        let path = root.join(p);
        assert!(path.exists(), "pure module {p} is listed but missing");
        rust_files(&path, &mut files);
    }
    assert!(files.len() >= 10, "too few files scanned: {files:?}");
    let found = violations(&files);
    assert!(
        found.is_empty(),
        "pure modules reach for I/O, the clock or entropy:\n{}",
        found.join("\n")
    );
}

/// The check itself catches what it is meant to catch, and only that.
#[test]
fn the_boundary_check_sees_code_but_not_comments_tests_or_longer_names() {
    let dir = std::env::temp_dir().join(format!("ztm-boundaries-{}", std::process::id()));
    fs::create_dir_all(&dir).expect("temp dir");
    let bad = dir.join("bad.rs");
    fs::write(
        &bad,
        "use std::time::Instant;\nfn f() -> Instant { Instant::now() }\nuse tokio::net::UdpSocket;\n",
    )
    .expect("write");
    let ok = dir.join("ok.rs");
    fs::write(
        &ok,
        "// Instant::now is read by the caller\nfn tokio_free(now: std::time::Instant) {}\n\
         #[cfg(test)]\nmod tests { fn t() { let _ = std::time::Instant::now(); } }\n",
    )
    .expect("write");
    let found = violations(&[bad.clone(), ok.clone()]);
    let _ = fs::remove_dir_all(&dir);
    assert_eq!(found.len(), 3, "{found:#?}");
    assert!(found[0].contains("bad.rs:2: `Instant::now`"), "{found:#?}");
    assert!(found.iter().all(|v| v.contains("bad.rs")), "{found:#?}");
}
