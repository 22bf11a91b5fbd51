//! Harness for ztmesh end-to-end tests: Linux network namespaces, a bridged
//! underlay, child processes killed by PID, readiness polling and a TCP echo check.
//!
//! Modelled on WireGuard's `tools/testing/selftests/wireguard/netns.sh`: every
//! test builds its own namespaces with unique names, and everything it creates is
//! removed when the owning value is dropped, including while a test panics.
//!
//! Typical use:
//!
//! ```no_run
//! use std::time::Duration;
//! use ztmesh_tests::{require_root_or_skip, Topology};
//!
//! if !require_root_or_skip() {
//!     return;
//! }
//! let topo = Topology::new(&["a", "b"]);
//! let _echo = topo.ns("b").spawn_echo(&["7000"]);
//! let b = topo.addr("b").to_string();
//! topo.ns("a").tcp_check(&b, 7000, Duration::from_secs(2)).unwrap();
//! ```
//!
//! Drop order matters: a [`Proc`] running inside a [`Netns`] must be dropped
//! before the namespace (declare it after the namespace, or drop it explicitly).
//! As a safety net, dropping a [`Netns`] kills, by PID, any process still inside it.
//!
//! Addresses come only from the ranges DESIGN.md allows: underlay 198.18.0.0/15
//! and fd00::/8.
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "the test harness drives real processes on the real clock"
)]

pub mod natlab;
pub mod web;
pub mod wgreplay;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

/// Prefix of every namespace the harness creates; `ztm-<pid>-<counter>-<tag>`.
const NS_PREFIX: &str = "ztm-";
/// Longest tag kept in a namespace name (the rest is cut) so names stay readable.
const MAX_TAG_LEN: usize = 24;
/// How long [`Proc`]'s drop waits after SIGTERM before sending SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(3);
/// Name of the underlay interface in every topology namespace.
pub const UNDERLAY_IF: &str = "eth0";

static COUNTER: AtomicU32 = AtomicU32::new(0);
static STALE_SWEEP: Once = Once::new();

// ---------------------------------------------------------------------------
// Root check
// ---------------------------------------------------------------------------

/// Returns `true` when namespace tests can run (we are root); `false` when they
/// must be skipped because the developer set `ZTMESH_SKIP_NETNS=1`.
///
/// Use at the top of every netns test: `if !require_root_or_skip() { return; }`.
///
/// # Panics
/// When not root and `ZTMESH_SKIP_NETNS=1` is not set: CI runs as root, so a
/// silently skipped end-to-end test there would hide a regression.
pub fn require_root_or_skip() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        return true;
    }
    if skip_requested(std::env::var("ZTMESH_SKIP_NETNS").ok().as_deref()) {
        eprintln!("skipped: network-namespace test needs root (ZTMESH_SKIP_NETNS=1 is set)");
        return false;
    }
    panic!(
        "this end-to-end test needs root to create network namespaces (euid is {euid}); \
         run the tests as root, or set ZTMESH_SKIP_NETNS=1 to skip them explicitly"
    );
}

fn skip_requested(value: Option<&str>) -> bool {
    matches!(value, Some("1") | Some("true") | Some("yes"))
}

// ---------------------------------------------------------------------------
// Names and addresses (pure)
// ---------------------------------------------------------------------------

/// Builds a namespace name `ztm-<pid>-<counter>-<tag>`; the tag is reduced to
/// `[a-z0-9-]` and cut to a readable length.
pub fn ns_name(pid: u32, counter: u32, tag: &str) -> String {
    let mut clean: String = tag
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(MAX_TAG_LEN)
        .collect();
    if clean.is_empty() {
        clean.push('x');
    }
    format!("{NS_PREFIX}{pid}-{counter}-{clean}")
}

/// The PID encoded in a harness namespace name, if `name` is one.
pub fn ns_owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NS_PREFIX)?;
    let (pid, rest) = rest.split_once('-')?;
    let (counter, _tag) = rest.split_once('-')?;
    counter.parse::<u32>().ok()?;
    pid.parse().ok()
}

/// Underlay IPv4 address of the `index`-th (0-based) member of a topology:
/// 198.18.0.1, 198.18.0.2, … (198.18.0.0/24; at most 254 members).
///
/// # Panics
/// If `index` does not fit in the /24.
pub fn underlay_v4(index: usize) -> Ipv4Addr {
    assert!(index < 254, "a topology holds at most 254 namespaces");
    Ipv4Addr::new(198, 18, 0, index as u8 + 1)
}

/// Underlay IPv6 address of the `index`-th member: `fd00:18::1`, `fd00:18::2`, …
pub fn underlay_v6(index: usize) -> Ipv6Addr {
    assert!(index < 254, "a topology holds at most 254 namespaces");
    Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, index as u16 + 1)
}

/// Prefix length of the topology's underlay (IPv4).
pub const UNDERLAY_V4_PREFIX: u8 = 24;
/// Prefix length of the topology's underlay (IPv6).
pub const UNDERLAY_V6_PREFIX: u8 = 64;

fn next_counter() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

// ---------------------------------------------------------------------------
// Temporary directories
// ---------------------------------------------------------------------------

/// A directory under the system temp dir, removed on drop unless the
/// environment sets `ZTMESH_KEEP_TEMP=1` (then its path is printed).
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `$TMPDIR/ztm-<pid>-<counter>-<tag>`, mode 0700.
    pub fn new(tag: &str) -> Self {
        use std::os::unix::fs::DirBuilderExt;
        let name = ns_name(std::process::id(), next_counter(), tag);
        let path = std::env::temp_dir().join(name);
        fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(&path)
            .unwrap_or_else(|e| panic!("create temp dir {}: {e}", path.display()));
        Self { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory (not created).
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path.join(rel)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if skip_requested(std::env::var("ZTMESH_KEEP_TEMP").ok().as_deref()) {
            eprintln!("keeping {}", self.path.display());
            return;
        }
        let _ = fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------
// Network namespaces
// ---------------------------------------------------------------------------

/// A network namespace with a unique name, loopback up; deleted on drop (after
/// killing, by PID, any process still inside it).
#[derive(Debug)]
pub struct Netns {
    name: String,
    tag: String,
}

impl Netns {
    /// Creates a namespace named `ztm-<pid>-<counter>-<tag>` and brings up `lo`.
    ///
    /// # Panics
    /// If `ip netns add` fails (not root, no netns support).
    pub fn new(tag: &str) -> Self {
        sweep_stale_namespaces();
        let name = ns_name(std::process::id(), next_counter(), tag);
        sh_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self {
            name,
            tag: tag.to_owned(),
        };
        ns.run_ok(["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tag it was created with (`"a"`, `"controller"`, …).
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Writes `/etc/netns/NAME/FILE`, which `ip netns exec` mounts over
    /// `/etc/FILE` for every command run in this namespace (how a test gives
    /// a namespace its own `resolv.conf` without touching the host's);
    /// removed with the namespace. Returns the path.
    ///
    /// # Panics
    /// If the file cannot be written.
    pub fn etc_file(&self, file: &str, contents: &[u8]) -> PathBuf {
        let dir = Path::new("/etc/netns").join(&self.name);
        fs::create_dir_all(&dir).expect("create /etc/netns/NAME");
        let path = dir.join(file);
        fs::write(&path, contents).expect("write the namespace's /etc file");
        path
    }

    /// A `Command` that runs `program` inside this namespace (`ip netns exec`);
    /// add arguments, environment and stdio as needed.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `cmd` (prepared by [`Netns::command`] or a plain `Command`, which is
    /// moved into the namespace) and returns its output.
    pub fn exec(&self, cmd: &mut Command) -> Output {
        let mut inner = self.command(cmd.get_program());
        inner.args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => inner.env(k, v),
                None => inner.env_remove(k),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            inner.current_dir(dir);
        }
        inner
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("spawn in {}: {e}", self.name))
    }

    /// Runs `args[0]` with the remaining arguments inside the namespace and
    /// returns its output (whatever the exit status).
    pub fn run<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut it = args.into_iter();
        let program = it.next().expect("run needs a program");
        let mut cmd = self.command(program);
        cmd.args(it).stdin(Stdio::null());
        cmd.output()
            .unwrap_or_else(|e| panic!("spawn in {}: {e}", self.name))
    }

    /// Like [`Netns::run`], but panics with the command's stderr when it fails,
    /// and returns its stdout as a string.
    pub fn run_ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<S> = args.into_iter().collect();
        let out = self.run(args.iter().map(AsRef::as_ref));
        if !out.status.success() {
            panic!(
                "in netns {}: `{}` failed ({}):\n{}{}",
                self.name,
                describe(args.iter().map(AsRef::as_ref)),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a command to completion in this namespace and captures it,
    /// killing it after `timeout`.
    ///
    /// # Panics
    /// If it does not finish in time (its output is in the message).
    pub fn run_bounded<S: AsRef<OsStr>>(
        &self,
        label: &str,
        args: &[S],
        timeout: Duration,
    ) -> CliOut {
        let mut proc = self.spawn(label, args);
        match proc.wait_exit(timeout) {
            Some(status) => CliOut {
                status,
                stdout: proc.stdout(),
                stderr: proc.stderr(),
            },
            None => {
                let logs = proc.logs();
                proc.kill9();
                panic!(
                    "`{}` did not finish within {timeout:?}\n{logs}",
                    describe(args.iter().map(AsRef::as_ref))
                );
            }
        }
    }

    /// Starts `args[0]` inside the namespace as a background [`Proc`] named
    /// `label`, with stdout and stderr captured to files.
    pub fn spawn<I, S>(&self, label: &str, args: I) -> Proc
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut it = args.into_iter();
        let program = it.next().expect("spawn needs a program");
        let mut cmd = self.command(program);
        cmd.args(it);
        Proc::spawn(&format!("{}/{label}", self.tag), cmd)
    }

    /// Starts a `ztm-echo serve` listener with the given specs (`PORT` for all
    /// addresses, or `ADDR:PORT` / `[V6]:PORT`) and waits until every listener is bound.
    ///
    /// # Panics
    /// If the listeners are not up within 8 s (the log is printed).
    pub fn spawn_echo(&self, specs: &[&str]) -> Proc {
        let echo = bin_path("ztm-echo");
        let mut args: Vec<&OsStr> = vec![echo.as_os_str(), OsStr::new("serve")];
        args.extend(specs.iter().map(OsStr::new));
        let mut proc = self.spawn("echo", args);
        let want = specs.len();
        let ready = wait_until(Duration::from_secs(8), Duration::from_millis(20), || {
            proc.stdout()
                .lines()
                .filter(|l| l.starts_with("listening "))
                .count()
                >= want
                || !proc.is_running()
        });
        if ready.is_err() || !proc.is_running() {
            panic!(
                "echo server in {} did not start listening on {specs:?}\n{}",
                self.name,
                proc.logs()
            );
        }
        proc
    }

    /// Connects from this namespace to `addr:port` (TCP) within `timeout`, sends
    /// a payload and checks that the same bytes come back (see `ztm-echo check`).
    ///
    /// # Errors
    /// The echo client's one-line reason: refused, timed out, short or wrong reply.
    pub fn tcp_check(&self, addr: &str, port: u16, timeout: Duration) -> Result<(), String> {
        self.echo_client("check", addr, port, timeout)
    }

    fn echo_client(
        &self,
        mode: &str,
        addr: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<(), String> {
        let echo = bin_path("ztm-echo");
        let out = self.run([
            echo.as_os_str(),
            OsStr::new(mode),
            OsStr::new(addr),
            OsStr::new(&port.to_string()),
            OsStr::new(&timeout.as_millis().to_string()),
        ]);
        if out.status.success() {
            Ok(())
        } else {
            let mut msg = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            if msg.is_empty() {
                msg = format!("ztm-echo {mode} exited with {}", out.status);
            }
            Err(msg)
        }
    }

    /// Opens a TCP connection from this namespace to `addr:port` within
    /// `timeout` and closes it (for servers that do not echo, e.g. TLS).
    ///
    /// # Errors
    /// The client's one-line reason.
    pub fn tcp_connect(&self, addr: &str, port: u16, timeout: Duration) -> Result<(), String> {
        self.echo_client("connect", addr, port, timeout)
    }

    /// Sets the namespace's interface `dev` up or down.
    pub fn set_link(&self, dev: &str, up: bool) {
        self.run_ok(["ip", "link", "set", dev, if up { "up" } else { "down" }]);
    }

    /// PIDs of the processes currently inside the namespace.
    pub fn pids(&self) -> Vec<i32> {
        let out = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .stderr(Stdio::null())
            .output();
        match out {
            Ok(o) => String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect(),
            Err(_) => Vec::new(),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete_namespace(&self.name, self.pids());
    }
}

/// Kills (by PID) what is left in a namespace this harness created, then
/// deletes it and the files `ip netns exec` mounts over /etc for it.
fn delete_namespace(name: &str, pids: Vec<i32>) {
    let etc = Path::new("/etc/netns").join(name);
    if etc.exists() {
        let _ = fs::remove_dir_all(&etc);
    }
    for pid in &pids {
        // SAFETY: plain syscall; the PID was just listed as inside our namespace.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    let mut remaining = pids;
    let deadline = Instant::now() + Duration::from_secs(2);
    while !remaining.is_empty() && Instant::now() < deadline {
        remaining.retain(|p| Path::new(&format!("/proc/{p}")).exists() && !is_zombie(*p));
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = Command::new("ip").args(["netns", "del", name]).output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => eprintln!(
            "warning: ip netns del {name}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => eprintln!("warning: ip netns del {name}: {e}"),
    }
}

fn is_zombie(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Deletes harness namespaces left behind by test processes that no longer
/// exist (killed with SIGKILL, so their drops never ran). Runs once per process.
fn sweep_stale_namespaces() {
    STALE_SWEEP.call_once(|| {
        let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
            return;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(name) = line.split_whitespace().next() else {
                continue;
            };
            let Some(pid) = ns_owner_pid(name) else {
                continue;
            };
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                eprintln!("removing stale namespace {name} (owner {pid} is gone)");
                let pids = Command::new("ip")
                    .args(["netns", "pids", name])
                    .output()
                    .map(|o| {
                        String::from_utf8_lossy(&o.stdout)
                            .split_whitespace()
                            .filter_map(|p| p.parse().ok())
                            .collect()
                    })
                    .unwrap_or_default();
                delete_namespace(name, pids);
            }
        }
    });
}

// ---------------------------------------------------------------------------
// Topologies
// ---------------------------------------------------------------------------

/// Namespaces on one Ethernet segment: a "switch" namespace holds bridge `br0`,
/// and every member namespace has `eth0` on it (a veth whose peer is a bridge port).
///
/// ```text
///            ┌──────────── switch ns: br0 ────────────┐
///            │ p0        p1        p2         …        │
///            └─┬─────────┬─────────┬──────────────────┘
///          eth0│     eth0│     eth0│
///        ┌─────┴──┐ ┌────┴───┐ ┌───┴────┐
///        │ names[0]│ │names[1]│ │names[2]│
///        │198.18.0.1│198.18.0.2│198.18.0.3   (and fd00:18::1, ::2, ::3 /64)
///        └────────┘ └────────┘ └────────┘
/// ```
#[derive(Debug)]
pub struct Topology {
    // Members are declared before the switch so they are dropped first.
    members: BTreeMap<String, Member>,
    order: Vec<String>,
    switch: Netns,
}

#[derive(Debug)]
struct Member {
    index: usize,
    port: String,
    ns: Netns,
}

impl Topology {
    /// Creates the switch and one namespace per name, with addresses
    /// 198.18.0.1, .2, … (and fd00:18::1, ::2, …) in the order given.
    ///
    /// # Panics
    /// On duplicate names, more than 254 names, or if `ip` fails.
    pub fn new(names: &[&str]) -> Self {
        let switch = Netns::new("switch");
        switch.run_ok([
            "ip",
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "stp_state",
            "0",
        ]);
        switch.run_ok(["ip", "link", "set", "br0", "up"]);
        let mut topo = Self {
            members: BTreeMap::new(),
            order: Vec::new(),
            switch,
        };
        for name in names {
            topo.add(name);
        }
        topo
    }

    /// Adds one more member namespace with the next free address.
    pub fn add(&mut self, name: &str) -> &Netns {
        assert!(
            !self.members.contains_key(name),
            "duplicate topology member {name}"
        );
        let index = self.order.len();
        let ns = Netns::new(name);
        let port = format!("p{index}");
        // Create the veth inside the member namespace with its peer directly in
        // the switch namespace: no interface ever appears in the host namespace,
        // so concurrent tests cannot collide on interface names.
        ns.run_ok([
            "ip",
            "link",
            "add",
            UNDERLAY_IF,
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            self.switch.name(),
        ]);
        self.switch
            .run_ok(["ip", "link", "set", &port, "master", "br0"]);
        self.switch.run_ok(["ip", "link", "set", &port, "up"]);
        let v4 = format!("{}/{UNDERLAY_V4_PREFIX}", underlay_v4(index));
        let v6 = format!("{}/{UNDERLAY_V6_PREFIX}", underlay_v6(index));
        ns.run_ok(["ip", "addr", "add", &v4, "dev", UNDERLAY_IF]);
        ns.run_ok(["ip", "-6", "addr", "add", &v6, "dev", UNDERLAY_IF, "nodad"]);
        ns.run_ok(["ip", "link", "set", UNDERLAY_IF, "up"]);
        self.order.push(name.to_owned());
        self.members
            .insert(name.to_owned(), Member { index, port, ns });
        &self.members[name].ns
    }

    /// The namespace of member `name`.
    ///
    /// # Panics
    /// If there is no such member.
    pub fn ns(&self, name: &str) -> &Netns {
        &self.member(name).ns
    }

    /// Member `name`'s underlay IPv4 address.
    pub fn addr(&self, name: &str) -> Ipv4Addr {
        underlay_v4(self.member(name).index)
    }

    /// Member `name`'s underlay IPv6 address.
    pub fn addr6(&self, name: &str) -> Ipv6Addr {
        underlay_v6(self.member(name).index)
    }

    /// Member names in creation order.
    pub fn names(&self) -> &[String] {
        &self.order
    }

    /// The switch namespace (holds `br0` and the ports).
    pub fn switch(&self) -> &Netns {
        &self.switch
    }

    /// Unplugs (`false`) or replugs (`true`) member `name` from the bridge, by
    /// setting its switch port down or up.
    pub fn set_connected(&self, name: &str, connected: bool) {
        self.switch.set_link(&self.member(name).port, connected);
    }

    fn member(&self, name: &str) -> &Member {
        self.members
            .get(name)
            .unwrap_or_else(|| panic!("no topology member {name}; have {:?}", self.order))
    }
}

/// Two namespaces joined by one veth pair (`eth0` on both sides), with
/// 198.18.1.1/24 + fd00:18:1::1/64 on `a` and 198.18.1.2/24 + fd00:18:1::2/64 on `b`.
#[derive(Debug)]
pub struct VethPair {
    /// First namespace.
    pub a: Netns,
    /// Second namespace.
    pub b: Netns,
    /// `a`'s IPv4 address.
    pub a_addr: Ipv4Addr,
    /// `b`'s IPv4 address.
    pub b_addr: Ipv4Addr,
    /// `a`'s IPv6 address.
    pub a_addr6: Ipv6Addr,
    /// `b`'s IPv6 address.
    pub b_addr6: Ipv6Addr,
}

impl VethPair {
    /// Creates the two namespaces and the link between them.
    pub fn new(tag_a: &str, tag_b: &str) -> Self {
        let a = Netns::new(tag_a);
        let b = Netns::new(tag_b);
        a.run_ok([
            "ip",
            "link",
            "add",
            UNDERLAY_IF,
            "type",
            "veth",
            "peer",
            "name",
            UNDERLAY_IF,
            "netns",
            b.name(),
        ]);
        let pair = Self {
            a,
            b,
            a_addr: Ipv4Addr::new(198, 18, 1, 1),
            b_addr: Ipv4Addr::new(198, 18, 1, 2),
            a_addr6: Ipv6Addr::new(0xfd00, 0x18, 1, 0, 0, 0, 0, 1),
            b_addr6: Ipv6Addr::new(0xfd00, 0x18, 1, 0, 0, 0, 0, 2),
        };
        for (ns, v4, v6) in [
            (&pair.a, pair.a_addr, pair.a_addr6),
            (&pair.b, pair.b_addr, pair.b_addr6),
        ] {
            ns.run_ok(["ip", "addr", "add", &format!("{v4}/24"), "dev", UNDERLAY_IF]);
            ns.run_ok([
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                UNDERLAY_IF,
                "nodad",
            ]);
            ns.set_link(UNDERLAY_IF, true);
        }
        pair
    }
}

// ---------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------

/// A background child process, stopped by its PID on drop (SIGTERM, then
/// SIGKILL after a grace period). Its stdout and stderr go to files in its own
/// temp dir; if the thread is panicking when it is dropped, they are printed.
pub struct Proc {
    label: String,
    child: Child,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    exit: Option<ExitStatus>,
    /// Set once [`Proc::logs`] was called, so a panic does not print them twice.
    logs_shown: AtomicBool,
    _dir: TempDir,
}

impl fmt::Debug for Proc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proc")
            .field("label", &self.label)
            .field("pid", &self.child.id())
            .finish()
    }
}

impl Proc {
    /// Spawns `cmd` with stdin closed and output captured to files.
    ///
    /// # Panics
    /// If the program cannot be started.
    pub fn spawn(label: &str, mut cmd: Command) -> Self {
        let dir = TempDir::new(&format!("log-{}", label.replace('/', "-")));
        let stdout_path = dir.join("stdout.log");
        let stderr_path = dir.join("stderr.log");
        let stdout = File::create(&stdout_path).expect("create stdout log");
        let stderr = File::create(&stderr_path).expect("create stderr log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {label} ({}): {e}", describe_cmd(&cmd)));
        Self {
            label: label.to_owned(),
            child,
            stdout_path,
            stderr_path,
            exit: None,
            logs_shown: AtomicBool::new(false),
            _dir: dir,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The label given at spawn (`"<netns tag>/<name>"` for [`Netns::spawn`]).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Whether the process is still running (reaps it if it has exited).
    pub fn is_running(&mut self) -> bool {
        self.try_exit_status().is_none()
    }

    /// The exit status, if it has exited.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Sends `signal` (e.g. `libc::SIGKILL`) to the process, by PID.
    pub fn signal(&mut self, signal: i32) {
        if self.try_exit_status().is_some() {
            return;
        }
        // SAFETY: plain syscall on the PID of our own, not yet reaped, child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
    }

    /// Kills the process with SIGKILL and reaps it.
    pub fn kill9(&mut self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        self.wait_exit(Duration::from_secs(5))
            .unwrap_or_else(|| panic!("{} survived SIGKILL for 5 s", self.label))
    }

    /// Stops the process: SIGTERM, then SIGKILL after a grace period; reaps it.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        if let Some(status) = self.wait_exit(TERM_GRACE) {
            return status;
        }
        self.kill9()
    }

    /// Waits up to `timeout` for the process to exit; returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let _ = wait_until(timeout, Duration::from_millis(10), || !self.is_running());
        self.try_exit_status()
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Both streams, labelled, for failure messages. (A `Proc` dropped while
    /// the thread panics prints them, unless this was called before.)
    pub fn logs(&self) -> String {
        self.logs_shown.store(true, Ordering::Relaxed);
        format!(
            "----- {} (pid {}) stdout -----\n{}\n----- {} stderr -----\n{}\n-----",
            self.label,
            self.child.id(),
            self.stdout(),
            self.label,
            self.stderr()
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.try_exit_status().is_none() {
            self.stop();
        }
        if std::thread::panicking() && !self.logs_shown.load(Ordering::Relaxed) {
            eprintln!("{}", self.logs());
        }
    }
}

// ---------------------------------------------------------------------------
// Polling
// ---------------------------------------------------------------------------

/// A condition did not hold within its timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitTimeout {
    /// The timeout that expired.
    pub timeout: Duration,
    /// How many times the condition was evaluated.
    pub attempts: u32,
}

impl fmt::Display for WaitTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "condition did not hold within {:?} ({} attempts)",
            self.timeout, self.attempts
        )
    }
}

impl std::error::Error for WaitTimeout {}

/// Polls `cond` every `interval` until it returns `true` or `timeout` passes.
/// The condition is always evaluated at least once, and once more at the deadline.
///
/// # Errors
/// [`WaitTimeout`] if the condition never held.
///
/// Returns how long it took, for tests that measure propagation.
pub fn wait_until(
    timeout: Duration,
    interval: Duration,
    mut cond: impl FnMut() -> bool,
) -> Result<Duration, WaitTimeout> {
    wait_for(timeout, interval, || cond().then_some(())).map(|((), took)| took)
}

/// Polls `probe` every `interval` until it returns `Some` or `timeout` passes.
///
/// # Errors
/// [`WaitTimeout`] if the probe never returned a value.
pub fn wait_for<T>(
    timeout: Duration,
    interval: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Result<(T, Duration), WaitTimeout> {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut attempts = 0;
    loop {
        attempts += 1;
        if let Some(v) = probe() {
            return Ok((v, start.elapsed()));
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(WaitTimeout { timeout, attempts });
        }
        std::thread::sleep(interval.min(deadline - now));
    }
}

// ---------------------------------------------------------------------------
// Binaries
// ---------------------------------------------------------------------------

/// Path of a workspace binary (`"ztmesh"`, `"ztmesh-controller"`, `"ztm-echo"`).
///
/// Looks in `$ZTMESH_BIN_DIR`, then next to the running test (the profile dir
/// above `deps/`), then `$CARGO_TARGET_DIR/debug`, then the workspace's `target/debug`.
///
/// # Panics
/// If the binary is in none of them, saying to build the binaries first.
pub fn bin_path(name: &str) -> PathBuf {
    let candidates = bin_dirs();
    for dir in &candidates {
        let path = dir.join(name);
        if path.is_file() {
            return path;
        }
    }
    panic!(
        "binary `{name}` not found in {candidates:?}: run cargo build --workspace --bins first \
         (or set ZTMESH_BIN_DIR)"
    );
}

fn bin_dirs() -> Vec<PathBuf> {
    if let Some(dir) = std::env::var_os("ZTMESH_BIN_DIR") {
        return vec![PathBuf::from(dir)];
    }
    let mut dirs = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(parent) = exe.parent() {
            if parent.file_name() == Some(OsStr::new("deps")) {
                if let Some(profile) = parent.parent() {
                    dirs.push(profile.to_path_buf());
                }
            } else {
                dirs.push(parent.to_path_buf());
            }
        }
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        dirs.push(PathBuf::from(dir).join("debug"));
    }
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"));
    dirs.dedup();
    dirs
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn sh_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn `{}`: {e}", describe_cmd(cmd)));
    if !out.status.success() {
        panic!(
            "`{}` failed ({}): {}",
            describe_cmd(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    out
}

/// The captured result of one bounded command ([`Netns::run_bounded`]).
#[derive(Debug)]
pub struct CliOut {
    /// Its exit status.
    pub status: ExitStatus,
    /// Everything it wrote to stdout.
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

impl fmt::Display for CliOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "exit: {}\nstdout:\n{}\nstderr:\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

fn describe<'a>(args: impl IntoIterator<Item = &'a OsStr>) -> String {
    args.into_iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn describe_cmd(cmd: &Command) -> String {
    describe(std::iter::once(cmd.get_program()).chain(cmd.get_args()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_names_carry_pid_counter_and_clean_tag() {
        assert_eq!(ns_name(42, 7, "controller"), "ztm-42-7-controller");
        assert_eq!(ns_name(1, 0, "Tag:Web DB"), "ztm-1-0-tag-web-db");
        assert_eq!(ns_name(1, 0, ""), "ztm-1-0-x");
        let long = ns_name(1, 2, &"a".repeat(100));
        assert_eq!(long.len(), "ztm-1-2-".len() + MAX_TAG_LEN);
    }

    #[test]
    fn owner_pid_is_read_back_only_from_harness_names() {
        assert_eq!(ns_owner_pid(&ns_name(1234, 5, "a-b")), Some(1234));
        assert_eq!(ns_owner_pid("ztm-x-1-a"), None);
        assert_eq!(ns_owner_pid("ztm-12-a"), None);
        assert_eq!(ns_owner_pid("ztmdemo-12-1-a"), None);
        assert_eq!(ns_owner_pid("other"), None);
    }

    #[test]
    fn names_differ_between_calls() {
        let a = ns_name(1, next_counter(), "t");
        let b = ns_name(1, next_counter(), "t");
        assert_ne!(a, b);
    }

    #[test]
    fn underlay_addresses_are_allocated_in_order_from_the_benchmark_range() {
        assert_eq!(underlay_v4(0), Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(underlay_v4(1), Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(underlay_v4(253), Ipv4Addr::new(198, 18, 0, 254));
        assert_eq!(underlay_v6(0), "fd00:18::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(underlay_v6(2), "fd00:18::3".parse::<Ipv6Addr>().unwrap());
    }

    #[test]
    #[should_panic(expected = "at most 254")]
    fn underlay_refuses_more_than_a_slash_24() {
        underlay_v4(254);
    }

    #[test]
    fn skip_flag_accepts_only_explicit_yes() {
        assert!(skip_requested(Some("1")));
        assert!(!skip_requested(Some("0")));
        assert!(!skip_requested(Some("")));
        assert!(!skip_requested(None));
    }

    #[test]
    fn wait_until_reports_elapsed_time_and_times_out() {
        let mut n = 0;
        let took = wait_until(Duration::from_secs(1), Duration::from_millis(1), || {
            n += 1;
            n >= 3
        })
        .unwrap();
        assert!(took < Duration::from_secs(1));
        assert_eq!(n, 3);

        let err = wait_until(Duration::from_millis(30), Duration::from_millis(5), || {
            false
        })
        .unwrap_err();
        assert!(err.attempts >= 2, "{err}");
    }

    #[test]
    fn wait_for_returns_the_probed_value() {
        let mut n = 0;
        let (v, _) = wait_for(Duration::from_secs(1), Duration::from_millis(1), || {
            n += 1;
            (n == 2).then_some("ready")
        })
        .unwrap();
        assert_eq!(v, "ready");
    }

    #[test]
    fn temp_dir_is_removed_on_drop() {
        let dir = TempDir::new("unit");
        let path = dir.path().to_path_buf();
        fs::write(dir.join("f"), b"x").unwrap();
        assert!(path.is_dir());
        drop(dir);
        assert!(!path.exists());
    }
}
