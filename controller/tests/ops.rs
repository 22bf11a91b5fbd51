//! The controller as installed software, through the real binary: its config
//! file (keys, precedence over the environment, flags over the file,
//! file:line:col errors, `config check`), systemd's notify protocol
//! (readiness, watchdog keep-alives, stopping), JSON logs, `--json`, and the
//! version line.
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ztmesh-controller");

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The binary with no config file but the one a test names, and none of the
/// environment a developer's shell may carry.
fn bin() -> Command {
    let mut cmd = Command::new(BIN);
    for var in [
        "ZTMESH_CONTROLLER_CONFIG",
        "ZTMESH_DATA_DIR",
        "ZTMESH_LOG",
        "ZTMESH_LOG_FORMAT",
        "ZTMESH_DATABASE",
        "ZTMESH_SERVER",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("ZTMESH_CONTROLLER_CONFIG", "");
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

/// The next notification within `within`, or `None`.
fn next_notice(sock: &UnixDatagram, within: Duration) -> Option<String> {
    sock.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).ok()?;
    Some(text(&buf[..n]))
}

#[test]
fn serve_takes_its_settings_from_the_config_file_and_speaks_sd_notify() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let conf = write(
        tmp.path(),
        "controller.toml",
        &format!(
            "# the packaged layout, in a temp dir\n\
             data-dir = {data:?}\n\
             listen = \"127.0.0.1:0\"\n\
             log-format = \"json\"\n\
             log-level = \"debug\"\n\
             netmap-ttl = \"1h\"\n\
             detect-exempt-tag = [\"tag:scanner\", \"tag:ci\"]\n"
        ),
    );
    let notify_path = tmp.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let stderr_path = tmp.path().join("stderr");
    let mut serve = Killed(
        bin()
            .arg("--config")
            .arg(&conf)
            .arg("serve")
            .env("NOTIFY_SOCKET", &notify_path)
            // A 2 s watchdog: keep-alives every second.
            .env("WATCHDOG_USEC", "2000000")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap(),
    );

    // Ready only once it serves: the admin socket of the file's data-dir
    // answers when READY=1 arrives. (Liveness bound; it takes well under
    // a second.)
    let ready = next_notice(&notify, Duration::from_secs(60)).expect("no READY=1 within 60 s");
    assert!(
        ready.starts_with("READY=1\nSTATUS=serving on 127.0.0.1:"),
        "{ready:?}"
    );
    assert!(data.join("admin.sock").exists(), "data-dir from the file");
    let listed = run(bin()
        .arg("--config")
        .arg(&conf)
        .args(["nodes", "list", "--json"]));
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    let nodes: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert!(nodes.is_array(), "--json is -o json: {nodes}");

    // Keep-alives keep coming at the interval systemd asked for.
    let started = Instant::now();
    let mut keepalives = 0;
    while keepalives < 3 && started.elapsed() < Duration::from_secs(30) {
        match next_notice(&notify, Duration::from_secs(10)) {
            Some(n) if n == "WATCHDOG=1" => keepalives += 1,
            Some(other) => panic!("unexpected notification {other:?}"),
            None => break,
        }
    }
    assert_eq!(keepalives, 3, "three keep-alives within 30 s (1 s apart)");

    // SIGTERM: STOPPING=1, then a clean exit.
    let pid = serve.0.id().to_string();
    assert!(run(Command::new("kill").args(["-TERM", &pid]))
        .status
        .success());
    let stopping = next_notice(&notify, Duration::from_secs(30));
    assert_eq!(stopping.as_deref(), Some("STOPPING=1"));
    let status = serve.0.wait().unwrap();
    assert!(status.success(), "{status}");

    // The log is JSON, one object per line, at the file's level.
    let log = std::fs::read_to_string(&stderr_path).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    assert!(!lines.is_empty());
    assert!(lines
        .iter()
        .all(|l| l["level"].is_string() && l["timestamp"].is_string()));
    assert!(
        lines.iter().any(|l| l["level"] == "DEBUG"),
        "log-level from the file"
    );
    assert!(lines.iter().any(|l| l["message"] == "shutting down"));
}

#[test]
fn the_command_line_wins_over_the_file_and_the_file_over_the_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let from_file = tmp.path().join("from-file");
    let conf = write(tmp.path(), "c.toml", &format!("data-dir = {from_file:?}\n"));
    // The admin commands read data-dir from the file: the error names the
    // socket they looked for.
    let out = run(bin().arg("--config").arg(&conf).args(["users", "list"]));
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains(&format!("{}/admin.sock", from_file.display())));

    // A flag wins, before or after the subcommand, silently.
    for args in [
        vec!["--data-dir", "/nonexistent/flag", "users", "list"],
        vec!["users", "list", "--data-dir=/nonexistent/flag"],
    ] {
        let out = run(bin().arg("--config").arg(&conf).args(&args));
        let err = text(&out.stderr);
        assert!(
            err.contains("/nonexistent/flag/admin.sock"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("warning"), "{err}");
    }

    // The environment loses to the file, and the file says so.
    let out = run(bin()
        .arg("--config")
        .arg(&conf)
        .env("ZTMESH_DATA_DIR", "/nonexistent/env")
        .args(["users", "list"]));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("{}/admin.sock", from_file.display())),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "warning: {}:1: `data-dir` is set here, so $ZTMESH_DATA_DIR is ignored",
            conf.display()
        )),
        "{err}"
    );

    // ZTMESH_CONTROLLER_CONFIG names the file when --config does not.
    let out = run(bin()
        .env("ZTMESH_CONTROLLER_CONFIG", &conf)
        .args(["users", "list"]));
    assert!(text(&out.stderr).contains(&format!("{}/admin.sock", from_file.display())));
}

#[test]
fn a_broken_config_stops_serve_naming_file_line_and_column_and_check_agrees() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let cases = [
        (
            "listen = \"[::]:8443\"\n\nlsten = \"x\"\n",
            "3:1: unknown key `lsten`",
        ),
        (
            "node_key_expiry = \"1d\"\n",
            "1:1: unknown key `node_key_expiry`; did you mean `node-key-expiry`?",
        ),
        (
            "netmap-ttl = \"1y\"\n",
            "1:14: `netmap-ttl`: invalid value '1y'",
        ),
        (
            "detect = \"loud\"\n",
            "1:10: `detect`: invalid value 'loud'",
        ),
        (
            "max-connections = [1, 2]\n",
            "1:19: `max-connections` takes one value",
        ),
        ("api-key = \"secret\"\n", "1:1: unknown key `api-key`"),
        (
            "listen = \"[::]:8443\"\nlisten = \"[::]:1\"\n",
            "2:1: duplicate key",
        ),
    ];
    for (body, want) in cases {
        let conf = write(tmp.path(), "bad.toml", body);
        let want = format!("error: {}:{want}", conf.display());
        let serve = run(bin()
            .arg("--config")
            .arg(&conf)
            .arg("--data-dir")
            .arg(&data)
            .args(["serve", "--listen", "127.0.0.1:0"]));
        assert!(!serve.status.success(), "{body:?}");
        assert!(
            text(&serve.stderr).starts_with(&want),
            "{body:?}: {}",
            text(&serve.stderr)
        );
        assert!(
            !data.exists(),
            "nothing was started or written for {body:?}"
        );
        let check = run(bin().arg("--config").arg(&conf).args(["config", "check"]));
        assert!(!check.status.success());
        assert!(
            text(&check.stderr).starts_with(&want),
            "{}",
            text(&check.stderr)
        );
        // Help and the version still work, to fix the file with.
        for args in [
            &["--help"][..],
            &["version"],
            &["serve", "--help"],
            &["help"],
            &["help", "serve"],
            &["config", "example"],
            &["completion", "bash"],
        ] {
            let out = run(bin().arg("--config").arg(&conf).args(args));
            assert!(out.status.success(), "{args:?} with {body:?}");
        }
    }

    // What only the whole command line can tell: a flag that needs another,
    // and a file it names.
    let conf = write(
        tmp.path(),
        "c.toml",
        "oidc-issuer = \"https://idp.example\"\n",
    );
    let check = run(bin().arg("--config").arg(&conf).args(["config", "check"]));
    let err = text(&check.stderr);
    assert!(
        err.starts_with(&format!("error: {}: ", conf.display())),
        "{err}"
    );
    assert!(err.contains("--oidc-client-id"), "{err}");
    let conf = write(
        tmp.path(),
        "c.toml",
        "relay-file = \"/nonexistent/relays\"\n",
    );
    let check = run(bin().arg("--config").arg(&conf).args(["config", "check"]));
    assert!(text(&check.stderr).contains("--relay-file /nonexistent/relays"));
    // A password does not go into a file the service's user can read.
    for url in [
        "postgres://ztmesh:hunter2@[fd00::5]/ztmesh",
        "postgres://ztmesh@[fd00::5]/ztmesh?sslmode=require&password=hunter2",
    ] {
        let conf = write(tmp.path(), "c.toml", &format!("\n  database = {url:?}\n"));
        let check = run(bin().arg("--config").arg(&conf).args(["config", "check"]));
        let err = text(&check.stderr);
        assert!(
            err.starts_with(&format!(
                "error: {}:2:3: `database` holds a password",
                conf.display()
            )),
            "{err}"
        );
        assert!(
            !err.contains("hunter2"),
            "the password is not echoed: {err}"
        );
    }
    // A repeatable flag takes the comma-separated form its help shows.
    let conf = write(
        tmp.path(),
        "c.toml",
        "controller-url = \"https://[fd00::1]:8443,https://[fd00::2]:8443\"\n\
         database = \"postgres://ztmesh@/ztmesh?host=/run/postgresql\"\n",
    );
    let check = run(bin().arg("--config").arg(&conf).args(["config", "check"]));
    assert!(check.status.success(), "{}", text(&check.stderr));
    let missing = run(bin().args(["--config", "/nonexistent/c.toml", "config", "check"]));
    assert!(text(&missing.stderr).contains("/nonexistent/c.toml: No such file"));
}

/// Every key the packaged file documents, uncommented, with a sample value
/// where it has no default: `config check` takes them all.
#[test]
fn every_documented_key_is_accepted_and_the_packaged_file_is_current() {
    let example = run(bin().args(["config", "example"]));
    assert!(example.status.success());
    let example = text(&example.stdout);
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/controller.toml"),
    )
    .unwrap();
    assert_eq!(
        shipped, example,
        "deploy/config/controller.toml is stale: regenerate it with `ztmesh-controller config example`"
    );

    let tmp = tempfile::tempdir().unwrap();
    let secret = write(tmp.path(), "secret", "a-client-secret-of-some-length\n");
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let relays = write(tmp.path(), "relays", "# none yet\n");
    let pem = write(tmp.path(), "ca.pem", "");
    let samples: &[(&str, String)] = &[
        ("public-url", "\"https://ztmesh.example:8443\"".into()),
        ("relay-file", format!("{relays:?}")),
        ("tls-cert", format!("{pem:?}")),
        ("tls-key", format!("{pem:?}")),
        ("oidc-issuer", "\"https://idp.example\"".into()),
        ("oidc-client-id", "\"ztmesh\"".into()),
        ("oidc-client-secret-file", format!("{secret:?}")),
        ("oidc-required-acr", "\"phr\"".into()),
        ("oidc-ca-file", format!("{pem:?}")),
        ("alert-webhook", "\"https://siem.example/hook\"".into()),
        ("alert-webhook-secret-file", format!("{secret:?}")),
        ("alert-webhook-ca-file", format!("{pem:?}")),
        ("metrics-listen", "\"127.0.0.1:9464\"".into()),
        (
            "database",
            "\"postgres://ztmesh@/ztmesh?host=/run/postgresql\"".into(),
        ),
        ("server", "\"https://[fd00::1]:8443\"".into()),
        ("fingerprint", "\"00\"".into()),
    ];
    let mut all = String::new();
    let mut unset_next = false;
    let mut keys = 0;
    for line in example.lines() {
        if line == "# (unset by default)" {
            unset_next = true;
            continue;
        }
        let Some(rest) = line
            .strip_prefix('#')
            .filter(|r| !r.starts_with(' ') && r.contains(" = "))
        else {
            all.push_str(line);
            all.push('\n');
            continue;
        };
        let (key, default) = rest.split_once(" = ").unwrap();
        let value = if unset_next {
            samples
                .iter()
                .find(|(k, _)| *k == key)
                .unwrap_or_else(|| panic!("no sample value for `{key}`: add one here"))
                .1
                .clone()
        } else if default == "false" {
            "true".to_owned()
        } else {
            default.to_owned()
        };
        unset_next = false;
        keys += 1;
        all.push_str(&format!("{key} = {value}\n"));
    }
    let conf = write(tmp.path(), "all.toml", &all);
    let check = run(bin().arg("--config").arg(&conf).args(["config", "check"]));
    assert!(check.status.success(), "{}\n{all}", text(&check.stderr));
    let out = text(&check.stdout);
    assert!(
        out.starts_with(&format!("{}: ok ({} keys;", conf.display(), keys + 1)),
        "{out}"
    );
    assert!(out.contains("store postgresql"), "{out}");
}

#[test]
fn version_names_the_git_revision() {
    for args in [&["version"][..], &["--version"]] {
        let out = run(bin().args(args));
        let line = text(&out.stdout);
        let (name, rest) = line.trim().split_once(' ').unwrap();
        assert_eq!(name, "ztmesh-controller");
        let (version, rev) = rest.split_once(" (git ").unwrap();
        assert_eq!(version, env!("CARGO_PKG_VERSION"));
        let rev = rev.strip_suffix(')').unwrap();
        assert!(
            rev == "unknown" || (rev.len() == 12 && rev.bytes().all(|b| b.is_ascii_hexdigit())),
            "{line}"
        );
    }
}

#[test]
fn completions_and_man_pages_come_from_the_clap_definitions() {
    for shell in ["bash", "zsh", "fish"] {
        let out = run(bin().args(["completion", shell]));
        assert!(out.status.success());
        let script = text(&out.stdout);
        for word in ["serve", "nodes", "listen", "data-dir"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = run(bin().arg("man-pages").arg(tmp.path()));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let serve = std::fs::read_to_string(tmp.path().join("ztmesh-controller-serve.1")).unwrap();
    assert!(
        serve.contains(".TH ztmesh-controller-serve 1"),
        "{serve:.200}"
    );
    assert!(serve.contains("listen"));
    assert!(tmp.path().join("ztmesh-controller-nodes-list.1").exists());
    assert!(
        !tmp.path().join("ztmesh-controller-man-pages.1").exists(),
        "hidden"
    );
}
