//! The real `ztmesh-controller` binary on a real PostgreSQL (the throwaway
//! cluster `scripts/pg.sh` starts; `ZTMESH_TEST_PG` is its socket
//! directory): a second controller with the same identity serves the same
//! database alongside the first (one with another identity is refused),
//! state survives `kill -9`, and the leadership moves: to the survivor when
//! the leader dies, and back to a leader whose session was cut once it has
//! reconnected (having stopped leading meanwhile).
//!
//! Without `ZTMESH_TEST_PG` these tests pass without running, unless
//! `ZTMESH_REQUIRE_POSTGRES` is set (`scripts/test.sh` sets both).
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests run real processes against the real clock"
)]

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ztmesh-controller");

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Cluster {
    sock: String,
    port: String,
}

fn cluster() -> Option<Cluster> {
    match std::env::var("ZTMESH_TEST_PG") {
        Ok(sock) => Some(Cluster {
            sock,
            port: std::env::var("ZTMESH_TEST_PG_PORT").unwrap_or_else(|_| "5432".into()),
        }),
        Err(_) => {
            assert!(
                std::env::var_os("ZTMESH_REQUIRE_POSTGRES").is_none(),
                "ZTMESH_REQUIRE_POSTGRES is set but ZTMESH_TEST_PG is not (scripts/pg.sh)"
            );
            eprintln!("skipped: no PostgreSQL test cluster (scripts/pg.sh, ZTMESH_TEST_PG)");
            None
        }
    }
}

impl Cluster {
    fn psql(&self, db: &str, sql: &str) -> Output {
        Command::new("psql")
            .args([
                "-h", &self.sock, "-p", &self.port, "-U", "postgres", "-d", db,
            ])
            .args(["-qAt", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .unwrap()
    }

    /// A new empty database; its `--database` URL.
    fn fresh(&self) -> (String, String) {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "cli{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let out = self.psql("postgres", &format!("CREATE DATABASE {name}"));
        assert!(out.status.success(), "{out:?}");
        let url = format!(
            "postgres://postgres@/{name}?host={}&port={}",
            self.sock, self.port
        );
        (name, url)
    }
}

fn serve(dir: &Path, url: &str, stderr: Stdio) -> Killed {
    Killed(
        Command::new(BIN)
            .arg("--data-dir")
            .arg(dir)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("ZTMESH_DATABASE", url)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap(),
    )
}

fn admin(dir: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Liveness bound: a controller answers its admin socket within 30 s.
fn wait_up(dir: &Path) -> Duration {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if admin(dir, &["users", "list"]).is_ok() {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "controller on {} did not come up within 30 s",
        dir.display()
    );
}

/// The process's exit, within `bound`, and what it printed on stderr.
fn exit_within(c: &mut Killed, bound: Duration) -> (ExitStatus, String) {
    let deadline = Instant::now() + bound;
    let status = loop {
        if let Some(s) = c.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "still running after {bound:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    if let Some(e) = c.0.stderr.as_mut() {
        std::io::Read::read_to_string(e, &mut err).unwrap();
    }
    (status, err)
}

/// Waits (liveness bound 30 s) until `dir`'s controller audited its
/// leadership of `term`; how long that took.
fn leads(dir: &Path, term: u64) -> Duration {
    let start = Instant::now();
    let want = format!("term={term}");
    while start.elapsed() < Duration::from_secs(30) {
        let audit = admin(dir, &["audit", "--limit", "500"]).unwrap();
        if audit
            .lines()
            .any(|l| l.contains("controller.leader") && l.contains(&want))
        {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{} did not lead with {want} within 30 s", dir.display());
}

#[test]
fn two_controllers_serve_one_database_and_the_survivor_leads() {
    let Some(pg) = cluster() else { return };
    let (_, url) = pg.fresh();
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let mut first = serve(&a, &url, Stdio::null());
    wait_up(&a);
    leads(&a, 1);
    admin(&a, &["users", "create", "alice@example.com"]).unwrap();
    let created = admin(&a, &["keys", "create", "--user", "alice@example.com"]).unwrap();
    assert!(!created.is_empty());
    // Nothing in A's data dir holds the state.
    assert!(!a.join("ztmesh.db").exists());

    // A controller with another identity is refused, naming why.
    let mut stranger = serve(&b, &url, Stdio::piped());
    let (status, err) = exit_within(&mut stranger, Duration::from_secs(30));
    assert!(!status.success());
    assert!(err.contains("belongs to controller key"), "{err}");
    assert!(!err.contains("password"), "{err}");

    // Given A's key and certificate, B serves alongside A and sees what A
    // wrote; what B writes, A sees.
    for f in ["controller.key", "tls.crt", "tls.key"] {
        std::fs::copy(a.join(f), b.join(f)).unwrap();
    }
    let _second = serve(&b, &url, Stdio::null());
    wait_up(&b);
    let users = admin(&b, &["users", "list"]).unwrap();
    assert!(users.contains("alice@example.com"), "{users}");
    admin(&b, &["users", "create", "bob@example.com"]).unwrap();
    let users = admin(&a, &["users", "list"]).unwrap();
    assert!(users.contains("bob@example.com"), "{users}");

    // kill -9 the leader: B leads, with the next term.
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let took = leads(&b, 2);
    eprintln!("B led {took:?} after A was killed");
    let keys = admin(&b, &["keys", "list"]).unwrap();
    assert!(keys.contains("alice@example.com"), "{keys}");

    // Offline verification reads the same database while it is served.
    let verified = Command::new(BIN)
        .arg("--data-dir")
        .arg(&b)
        .args(["audit", "verify"])
        .env("ZTMESH_DATABASE", &url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&verified.stdout);
    assert!(verified.status.success(), "{verified:?}");
    assert!(text.starts_with("audit chain ok: "), "{text}");
}

#[test]
fn a_leader_whose_session_is_cut_stops_leading_and_leads_again_later() {
    let Some(pg) = cluster() else { return };
    let (name, url) = pg.fresh();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    let mut c = serve(&dir, &url, Stdio::null());
    wait_up(&dir);
    leads(&dir, 1);
    // Cut the session that holds the leader lock, as a failover of the
    // database or a network partition would.
    let out = pg.psql(
        &name,
        "SELECT pg_terminate_backend(pid) FROM pg_locks
         WHERE locktype = 'advisory' AND granted AND database =
           (SELECT oid FROM pg_database WHERE datname = current_database())",
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "t");
    // It reconnects and leads again, in a new term; it kept serving.
    leads(&dir, 2);
    assert!(c.0.try_wait().unwrap().is_none(), "the controller exited");
    admin(&dir, &["users", "list"]).unwrap();
}
