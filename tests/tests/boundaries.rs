//! Architecture boundaries, enforced: the pure cores (the policy crate, the
//! packet filter, the tunnel `Device`, the node's netmap gate and translation,
//! the controller's netmap core and key lifecycle, the MagicDNS core
//! (decisions, zone, names, rate limit), the STUN and relay
//! codecs, the relay's authorization core and failure limiter)
//! do no I/O and read no clock or entropy of their own. Time and randomness
//! come in as arguments; sockets, files, processes, async runtimes, gRPC and
//! SQLite live in the shells around them.
//!
//! The check reads the source: a pure file may not name a forbidden item
//! outside its `#[cfg(test)]` section (tests may use the real clock to build
//! inputs). Address *types* (`IpAddr`, `SocketAddr`) are values and allowed;
//! sockets are I/O and are not.
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

use std::fs;
use std::path::{Path, PathBuf};

/// Files and directories (all `.rs` files below) that must stay pure.
const PURE: &[&str] = &[
    "policy/src",
    "node/src/filter",
    "node/src/tunnel",
    "node/src/path",
    "node/src/control/apply.rs",
    "node/src/nat",
    "node/src/dns/mod.rs",
    "node/src/dns/name.rs",
    "node/src/dns/zone.rs",
    "node/src/dns/limit.rs",
    "node/src/posture/mod.rs",
    "proto/src/stun.rs",
    "proto/src/relay.rs",
    "proto/src/handover.rs",
    "proto/src/netmap.rs",
    "proto/src/delta.rs",
    "relay/src/core.rs",
    "relay/src/limiter.rs",
    "controller/src/netcore",
    "controller/src/model.rs",
    "controller/src/auditchain.rs",
    "controller/src/relays.rs",
    "controller/src/routes.rs",
    "controller/src/secrets.rs",
    "controller/src/roles.rs",
    "controller/src/accounts.rs",
    "controller/src/device.rs",
    "controller/src/web/session.rs",
    "controller/src/web/html.rs",
    "controller/src/metrics.rs",
    "controller/src/detect.rs",
    "controller/src/backup.rs",
    "node/src/metrics.rs",
];

/// The controller's modules, bottom layer first. A module may name modules
/// of lower layers only: values and pure helpers at the bottom, then the pure
/// netmap core and the store shell beside it, errors, authentication, the
/// coordinator, the sign-in pages, the gRPC services, the server, the admin
/// CLI.
const CONTROLLER_LAYERS: &[&[&str]] = &[
    &[
        "model",
        "auditchain",
        "roles",
        "relays",
        "nodelimit",
        "lockfile",
        "routes",
        "detect",
        "httpclient",
        "backup",
        "signing",
        "tlscerts",
    ],
    &["secrets", "accounts", "device", "oidc"],
    &["netcore", "store"],
    &["error"],
    &["nodeinput", "ratelimit", "metrics"],
    &["auth", "timedstore", "alert", "recovery"],
    &["mesh"],
    &["web"],
    &["api", "listener"],
    &["console"],
    &["server"],
    &["cli"],
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

/// The `crate::` modules `text` names in code (comments aside).
fn crate_modules(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && !out.contains(&name) {
                out.push(name);
            }
        }
    }
    out
}

fn layer_of(module: &str) -> Option<usize> {
    CONTROLLER_LAYERS
        .iter()
        .position(|layer| layer.contains(&module))
}

#[test]
fn controller_modules_import_only_modules_below_them() {
    let src = root().join("controller/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut found = Vec::new();
    let mut seen = 0;
    for f in &files {
        let rel = f.strip_prefix(&src).expect("under controller/src");
        let module = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .map(|m| m.trim_end_matches(".rs").to_string())
            .expect("a module path");
        if module == "lib" || module == "main" {
            continue;
        }
        let Some(mine) = layer_of(&module) else {
            found.push(format!(
                "{}: module `{module}` has no layer in CONTROLLER_LAYERS",
                f.display()
            ));
            continue;
        };
        seen += 1;
        let text = fs::read_to_string(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        for used in crate_modules(&non_test_part(f, &text)) {
            match layer_of(&used) {
                Some(theirs) if used != module && theirs >= mine => found.push(format!(
                    "{}: `{module}` (layer {mine}) names `crate::{used}` (layer {theirs})",
                    f.display()
                )),
                _ => {}
            }
        }
    }
    assert!(seen >= 15, "too few controller files checked: {seen}");
    assert!(found.is_empty(), "layering broken:\n{}", found.join("\n"));
}

/// The netmap core knows nothing of persistence: not even the word.
#[test]
fn the_netmap_core_does_not_mention_the_store() {
    let mut files = Vec::new();
    rust_files(&root().join("controller/src/netcore"), &mut files);
    for f in &files {
        let text = fs::read_to_string(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        for (n, line) in text.lines().enumerate() {
            assert!(
                !line.to_lowercase().contains("store"),
                "{}:{}: {line}",
                f.display(),
                n + 1
            );
        }
    }
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
