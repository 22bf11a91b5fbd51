//! The I/O shell of posture collection: reads os-release, `uname(2)`,
//! mountinfo and sysfs, the package database's and apt's list files' times,
//! and runs `nft` and `apt-get` (found on `PATH`, run without a shell in a
//! process group of their own, stderr discarded, bounded in time and
//! output). Blocking: the agent runs it on a blocking thread
//! (`spawn_blocking`), never on the control loop or the packet path. What
//! the text means is decided by the pure [`super`] module.

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ztmesh_policy::AttrValue;
use ztmesh_proto::time::unix_ms;
use ztmesh_proto::UnixMs;

use super::{
    apt_lists_fresh, days_since_upgrade, device_numbers, firewall_active, is_encrypting_dm_uuid,
    parse_os_release, pending_security_updates, root_mount, Collection, AGENT_VERSION,
    DAYS_SINCE_UPGRADE, DISK_ENCRYPTED, FIREWALL, KERNEL, OS, OS_DISTRO, OS_VERSION,
    SECURITY_UPDATES,
};

/// Longest wait for `nft -j -t list ruleset`.
pub const NFT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for `apt-get -s dist-upgrade`.
pub const APT_TIMEOUT: Duration = Duration::from_secs(20);
/// `apt-get -s dist-upgrade` runs at most this often; its count is kept
/// between.
pub const APT_EVERY_MS: i64 = 30 * 60_000;
/// After a failed `apt-get` run (a timeout on a busy host, say), the next
/// try comes this much later.
pub const APT_RETRY_MS: i64 = 5 * 60_000;
/// Most output read from a command; more and its output is not used.
pub const MAX_OUTPUT_BYTES: usize = 8 << 20;
/// Most bytes read from a file (mountinfo of a busy container host is
/// large); a longer file is not used at all, since its end may be the part
/// that matters (the last mount on `/`).
const MAX_FILE_BYTES: usize = 4 << 20;
/// How deep the walk down `slaves/` goes (dm-crypt under LVM under … ).
const MAX_STACK_DEPTH: usize = 8;
/// Most `slaves/` entries of one device considered.
const MAX_SLAVES: usize = 64;
/// Most distinct devices one walk down `slaves/` looks at.
const MAX_DEVICES: usize = 1024;
/// Most entries of apt's lists directory looked at.
const MAX_LIST_FILES: usize = 10_000;
/// How long a killed command gets to be reaped before a thread is left
/// to wait for it (a process stuck in the kernel dies only when it wakes).
const REAP_GRACE: Duration = Duration::from_secs(1);

/// The process groups of the commands running now (see [`kill_running`]).
static RUNNING: Mutex<BTreeSet<libc::pid_t>> = Mutex::new(BTreeSet::new());
/// Searched after `PATH` (a daemon started with a bare environment).
const FALLBACK_PATH: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// Where the collector reads the host: the real paths by default, a
/// fixture tree in tests.
#[derive(Debug, Clone)]
pub struct HostPaths {
    /// os-release(5) candidates, the first readable one wins.
    pub os_release: Vec<PathBuf>,
    /// `/proc/self/mountinfo`: the mounts of the daemon's mount namespace.
    pub mountinfo: PathBuf,
    /// The sysfs mount.
    pub sys: PathBuf,
    /// Files whose newest modification time is the last upgrade: apt's
    /// history log (written by every apt run that changes packages) and
    /// dpkg's status file (written by every package change, also by plain
    /// `dpkg -i` and unattended-upgrades). Either may be missing.
    pub package_times: Vec<PathBuf>,
    /// apt's package lists (`apt-get update` rewrites them): the newest
    /// file's time says whether a pending-update count is current.
    pub apt_lists: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        Self {
            os_release: vec!["/etc/os-release".into(), "/usr/lib/os-release".into()],
            mountinfo: "/proc/self/mountinfo".into(),
            sys: "/sys".into(),
            package_times: vec![
                "/var/log/apt/history.log".into(),
                "/var/lib/dpkg/status".into(),
            ],
            apt_lists: "/var/lib/apt/lists".into(),
        }
    }
}

/// Collects this node's attributes; keeps the `apt-get` count between
/// runs (see [`APT_EVERY_MS`]).
#[derive(Debug, Default)]
pub struct Collector {
    paths: HostPaths,
    /// When `apt-get -s dist-upgrade` last ran and what it counted, or why
    /// it failed.
    apt: Option<(UnixMs, Result<u32, String>)>,
}

impl Collector {
    pub fn new(paths: HostPaths) -> Self {
        Self { paths, apt: None }
    }

    /// Reads the host's attributes at `now_ms`. `run_apt` allows running
    /// `apt-get` if its count is older than [`APT_EVERY_MS`] (up to
    /// [`APT_TIMEOUT`]); without it the last count is used, if any. No
    /// count is reported while apt's package lists are older than a week
    /// ([`apt_lists_fresh`]). Blocking. What cannot be determined is left
    /// out, with the reason.
    pub fn collect(&mut self, now_ms: UnixMs, run_apt: bool) -> Collection {
        let mut c = Collection::default();
        c.put(OS, Ok(AttrValue::Str(std::env::consts::OS.to_string())));
        c.put(
            AGENT_VERSION,
            Ok(AttrValue::Str(env!("CARGO_PKG_VERSION").into())),
        );
        c.put(
            KERNEL,
            kernel_release()
                .map(AttrValue::Str)
                .ok_or_else(|| "uname(2) gave no release".to_string()),
        );
        let os = self
            .paths
            .os_release
            .iter()
            .find_map(|p| read_capped(p, MAX_FILE_BYTES).ok())
            .map(|text| parse_os_release(&text));
        let (id, version) = match os {
            Some(os) => (
                os.id.ok_or("os-release has no ID"),
                os.version_id
                    .ok_or("os-release has no VERSION_ID (a rolling release)"),
            ),
            None => (Err("no readable os-release"), Err("no readable os-release")),
        };
        c.put(OS_DISTRO, text_or(id));
        c.put(OS_VERSION, text_or(version));
        c.put(FIREWALL, host_firewall().map(AttrValue::Bool));
        c.put(
            DISK_ENCRYPTED,
            root_encrypted(&self.paths).map(AttrValue::Bool),
        );
        // Debian and Ubuntu only: without apt, neither is reported.
        let Some(apt) = find_program("apt-get") else {
            for key in [DAYS_SINCE_UPGRADE, SECURITY_UPDATES] {
                c.put(key, Err("no apt-get (Debian and Ubuntu only)".into()));
            }
            return c;
        };
        let newest = self
            .paths
            .package_times
            .iter()
            .filter_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .map(unix_ms)
            .max();
        let days = match (newest, days_since_upgrade(now_ms, newest)) {
            (_, Some(days)) => Ok(AttrValue::Int(days)),
            (None, None) => Err("no package database files".into()),
            (Some(_), None) => Err("the package database was written in the future".into()),
        };
        c.put(DAYS_SINCE_UPGRADE, days);
        if !self.apt_lists_fresh(now_ms) {
            c.put(
                SECURITY_UPDATES,
                Err("apt's package lists are missing or over 7 days old (apt-get update)".into()),
            );
            return c;
        }
        if run_apt && self.apt_stale(now_ms) {
            self.apt = Some((now_ms, security_updates(&apt)));
        }
        let pending = match &self.apt {
            Some((_, Ok(n))) => Ok(AttrValue::Int(i64::from(*n))),
            Some((_, Err(why))) => Err(why.clone()),
            None => Err("apt-get -s dist-upgrade has not counted yet".into()),
        };
        c.put(SECURITY_UPDATES, pending);
        c
    }

    /// Whether a [`Self::collect`] with `run_apt` would run `apt-get` now:
    /// apt is installed, its package lists are recent and its last count is
    /// older than [`APT_EVERY_MS`] (its last failure older than
    /// [`APT_RETRY_MS`]).
    pub fn apt_due(&self, now_ms: UnixMs) -> bool {
        self.apt_stale(now_ms) && find_program("apt-get").is_some() && self.apt_lists_fresh(now_ms)
    }

    fn apt_lists_fresh(&self, now_ms: UnixMs) -> bool {
        apt_lists_fresh(now_ms, newest_list_file(&self.paths.apt_lists))
    }

    fn apt_stale(&self, now_ms: UnixMs) -> bool {
        self.apt.as_ref().is_none_or(|(at, result)| {
            let every = if result.is_ok() {
                APT_EVERY_MS
            } else {
                APT_RETRY_MS
            };
            now_ms < *at || now_ms.saturating_sub(*at) >= every
        })
    }
}

/// A text attribute, or why it is missing.
fn text_or(value: Result<String, &str>) -> Result<AttrValue, String> {
    value.map(AttrValue::Str).map_err(str::to_string)
}

/// Whether the filesystem of `/` sits on dm-crypt (see [`disk_encrypted`]);
/// why not known when `/` is on no block device (overlay, tmpfs, 9p,
/// virtiofs, NFS, ZFS …) or the tables cannot be read.
fn root_encrypted(paths: &HostPaths) -> Result<bool, String> {
    let mountinfo = read_capped(&paths.mountinfo, MAX_FILE_BYTES)
        .map_err(|e| format!("reading {}: {e}", paths.mountinfo.display()))?;
    let root = root_mount(&mountinfo).ok_or("no mount of / in mountinfo")?;
    if let Some(found) = disk_encrypted(&paths.sys, root.major, root.minor) {
        return Ok(found);
    }
    let no_device = || format!("/ ({}) is on no block device", root.fstype);
    // btrfs shows an anonymous device number: take the source's instead.
    if !root.source.starts_with("/dev/") {
        return Err(no_device());
    }
    let meta = std::fs::metadata(&root.source).map_err(|_| no_device())?;
    let (major, minor) = device_numbers(meta.rdev());
    disk_encrypted(&paths.sys, major, minor).ok_or_else(no_device)
}

/// Whether block device `major:minor` stores its data encrypted, from sysfs
/// under `sys`: true when it is a dm-crypt mapping (an encrypting `dm/uuid`,
/// see [`is_encrypting_dm_uuid`]), or when it is stacked on other devices
/// (`slaves/`: LVM, RAID, dm-integrity, dm-verity …) that all are,
/// recursively; false for a plain disk or partition. All, not any: a volume
/// group spanning an encrypted and a plain disk holds data in the clear.
/// `None` when sysfs has no such block device.
pub fn disk_encrypted(sys: &Path, major: u32, minor: u32) -> Option<bool> {
    let dev = sys.join("dev/block").join(format!("{major}:{minor}"));
    std::fs::metadata(&dev).ok()?;
    Some(StackWalk::default().encrypted(&dev, 0))
}

/// One walk down a device stack. Each device is looked at once (by its
/// canonical sysfs path) whatever the number of paths leading to it, so
/// a shared lower device or a pathological tree costs linear time; a loop
/// counts as not encrypted.
#[derive(Debug, Default)]
struct StackWalk {
    /// The answer for each device seen; `None` while it is being walked.
    seen: HashMap<PathBuf, Option<bool>>,
}

impl StackWalk {
    fn encrypted(&mut self, dev: &Path, depth: usize) -> bool {
        let Ok(key) = std::fs::canonicalize(dev) else {
            return false;
        };
        match self.seen.get(&key) {
            Some(answer) => return answer.unwrap_or(false),
            None if self.seen.len() >= MAX_DEVICES => return false,
            None => {}
        }
        self.seen.insert(key.clone(), None);
        let answer = self.look(&key, depth);
        self.seen.insert(key, Some(answer));
        answer
    }

    fn look(&mut self, dev: &Path, depth: usize) -> bool {
        let uuid = read_small(&dev.join("dm/uuid"), 256).unwrap_or_default();
        if is_encrypting_dm_uuid(&uuid) {
            return true;
        }
        if depth >= MAX_STACK_DEPTH {
            return false;
        }
        let slaves: Vec<PathBuf> = match std::fs::read_dir(dev.join("slaves")) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .take(MAX_SLAVES + 1)
                .collect(),
            Err(_) => Vec::new(),
        };
        if slaves.is_empty() || slaves.len() > MAX_SLAVES {
            return false;
        }
        slaves.iter().all(|s| self.encrypted(s, depth + 1))
    }
}

/// `node:firewall` from `nft -j -t list ruleset` (see
/// [`super::firewall_active`]); why not known when nft is missing, fails
/// (no `CAP_NET_ADMIN`, no JSON support) or takes longer than
/// [`NFT_TIMEOUT`]. Rules of the legacy iptables back end are invisible to
/// nft, so a host filtering only through them reads as false.
fn host_firewall() -> Result<bool, String> {
    let nft = find_program("nft").ok_or("no nft (nftables)")?;
    let out = run_bounded(
        &nft,
        // Terse: without set elements, which a large blocklist would
        // push past the output cap.
        &["-j", "-t", "list", "ruleset"],
        NFT_TIMEOUT,
        MAX_OUTPUT_BYTES,
    )
    .map_err(|e| e.to_string())?;
    firewall_active(&String::from_utf8_lossy(&out)).map_err(|e| e.to_string())
}

/// Pending security upgrades from `apt-get -s dist-upgrade`; why not if
/// it fails or times out. A simulation: it changes nothing, takes no lock
/// (`Debug::NoLocking`) and writes no binary cache (the empty
/// `Dir::Cache::*pkgcache`), so it cannot disturb a real apt run.
/// `dist-upgrade`, not `upgrade`: `upgrade` holds back upgrades that need
/// new packages, which is how Ubuntu ships kernel security fixes.
fn security_updates(apt_get: &Path) -> Result<u32, String> {
    let args = [
        "-s",
        "-o",
        "Debug::NoLocking=1",
        "-o",
        "Dir::Cache::pkgcache=",
        "-o",
        "Dir::Cache::srcpkgcache=",
        "dist-upgrade",
    ];
    let out = run_bounded(apt_get, &args, APT_TIMEOUT, MAX_OUTPUT_BYTES)
        .inspect_err(|e| tracing::warn!(error = %e, "pending security updates unknown"))
        .map_err(|e| e.to_string())?;
    Ok(pending_security_updates(&String::from_utf8_lossy(&out)))
}

/// The kernel release, as `uname -r` prints it.
fn kernel_release() -> Option<String> {
    // SAFETY: `utsname` is plain data (arrays of `c_char`), valid zeroed.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable `utsname`.
    if unsafe { libc::uname(&mut u) } != 0 {
        return None;
    }
    // Within the array even if the kernel left no NUL.
    let bytes: Vec<u8> = u
        .release
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8(bytes).ok().filter(|s| !s.is_empty())
}

/// Why a command gave no usable output.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// It could not be started.
    #[error("starting {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    /// Reading its output failed.
    #[error("reading the output of {program}: {source}")]
    Read {
        program: String,
        source: std::io::Error,
    },
    /// It ran too long and was killed.
    #[error("{program} did not finish within {timeout:?}")]
    Timeout { program: String, timeout: Duration },
    /// It wrote more than the cap and was killed.
    #[error("{program} wrote more than {cap} bytes")]
    TooLarge { program: String, cap: usize },
    /// It exited unsuccessfully.
    #[error("{program} failed: {status}")]
    Failed { program: String, status: ExitStatus },
}

/// Runs `program` with `args` (no shell, stdin empty, stderr discarded,
/// `LC_ALL=C`, in a process group of its own) and returns its standard
/// output, if it exits successfully within `timeout` having written at most
/// `cap` bytes. Otherwise the whole group is killed: a grandchild that
/// inherited the output pipe cannot keep the call waiting. Blocking; no
/// helper thread outlives the call, except one left to reap a killed
/// command that the kernel has not let die within [`REAP_GRACE`].
///
/// # Errors
/// [`RunError`].
#[expect(
    clippy::disallowed_methods,
    reason = "the shell bounds a command's run on the real clock"
)]
pub fn run_bounded(
    program: &Path,
    args: &[&str],
    timeout: Duration,
    cap: usize,
) -> Result<Vec<u8>, RunError> {
    let name = program.display().to_string();
    let deadline = Instant::now() + timeout;
    let mut child = Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|source| RunError::Spawn {
            program: name.clone(),
            source,
        })?;
    let group = Running::new(&child);
    let read = match child.stdout.take() {
        Some(out) => read_until(out, deadline, cap),
        None => Err(std::io::Error::other("no stdout pipe")),
    };
    let outcome = match read {
        Ok(Output::Complete(buf)) => match exit_until(&mut child, deadline) {
            Some(status) if status.success() => return Ok(buf),
            Some(status) => {
                return Err(RunError::Failed {
                    program: name,
                    status,
                })
            }
            None => RunError::Timeout {
                program: name,
                timeout,
            },
        },
        Ok(Output::Late) => RunError::Timeout {
            program: name,
            timeout,
        },
        Ok(Output::TooLarge) => RunError::TooLarge { program: name, cap },
        Err(source) => RunError::Read {
            program: name,
            source,
        },
    };
    drop(group);
    kill_group(child);
    Err(outcome)
}

/// Kills every command [`run_bounded`] is running (with its process
/// group), for a daemon that is exiting: its blocking threads are not
/// waited for, and a command left behind would outlive it.
pub fn kill_running() {
    let running = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
    for pgid in running.iter() {
        // SAFETY: kill(2) with a negative id signals that process group.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
}

/// A command's process group, listed in [`RUNNING`] from its start until
/// `run_bounded` is done with it. A command that exited by itself has been
/// reaped a moment before that; its id cannot name another group in that
/// moment, as Linux hands out process ids in sequence.
struct Running(Option<libc::pid_t>);

impl Running {
    fn new(child: &Child) -> Running {
        let pgid = libc::pid_t::try_from(child.id()).ok();
        if let Some(id) = pgid {
            RUNNING.lock().unwrap_or_else(|p| p.into_inner()).insert(id);
        }
        Running(pgid)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(id) = self.0 {
            RUNNING
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        }
    }
}

/// What [`read_until`] got of a command's output.
enum Output {
    /// All of it (the pipe closed).
    Complete(Vec<u8>),
    /// More than the cap.
    TooLarge,
    /// The deadline passed first.
    Late,
}

/// Reads `out` to its end, waiting at most until `deadline` and for at
/// most `cap` bytes.
#[expect(
    clippy::disallowed_methods,
    reason = "the shell bounds a command's run on the real clock"
)]
fn read_until(mut out: ChildStdout, deadline: Instant, cap: usize) -> std::io::Result<Output> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Output::Late);
        }
        let mut pfd = libc::pollfd {
            fd: out.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // Rounded up, so the wait never ends just short of the deadline.
        let ms = libc::c_int::try_from(left.as_millis().saturating_add(1)).unwrap_or(i32::MAX);
        // SAFETY: `pfd` is one valid pollfd for a pipe `out` keeps open.
        let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
        if ready < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if ready == 0 {
            continue;
        }
        // Readable or hung up: this read does not block.
        match out.read(&mut chunk) {
            Ok(0) => return Ok(Output::Complete(buf)),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > cap {
                    return Ok(Output::TooLarge);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The exit status of `child`, which has closed its output, if it exits by
/// `deadline`.
#[expect(
    clippy::disallowed_methods,
    reason = "the shell bounds a command's run on the real clock"
)]
fn exit_until(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) | Err(_) => return None,
        }
    }
}

/// Kills `child`'s process group (it leads one of its own, see
/// [`run_bounded`]) and reaps it: at once if it dies within [`REAP_GRACE`],
/// else on a thread left waiting for it.
fn kill_group(mut child: Child) {
    // The child is not reaped yet, so its id still names its group.
    if let Ok(pgid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) with a negative id signals that process group.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
    let _ = child.kill();
    for _ in 0..REAP_GRACE.as_millis() / 5 {
        match child.try_wait() {
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Ok(Some(_)) | Err(_) => return,
        }
    }
    let reaper = std::thread::Builder::new()
        .name("posture-reap".into())
        .spawn(move || {
            let _ = child.wait();
        });
    if let Err(e) = reaper {
        tracing::warn!(error = %e, "a killed posture command is left unreaped");
    }
}

/// The absolute path of an executable `name` in `PATH`, then in the usual
/// system directories; relative `PATH` entries are ignored.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .filter(|d| d.is_absolute())
        .chain(FALLBACK_PATH.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// A text file of at most `cap` bytes; a longer one is an error
/// (`InvalidData`), not a silently cut text.
fn read_capped(path: &Path, cap: usize) -> std::io::Result<String> {
    let mut buf = Vec::new();
    let limit = u64::try_from(cap).unwrap_or(u64::MAX).saturating_add(1);
    std::fs::File::open(path)?
        .take(limit)
        .read_to_end(&mut buf)?;
    if buf.len() > cap {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is larger than {cap} bytes", path.display()),
        ));
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The newest modification time of the files in apt's lists directory
/// (not its `lock`, which says nothing of the lists); `None` when there
/// are none.
fn newest_list_file(dir: &Path) -> Option<UnixMs> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .take(MAX_LIST_FILES)
        .filter(|e| e.file_name() != "lock")
        .filter_map(|e| e.metadata().ok())
        .filter(std::fs::Metadata::is_file)
        .filter_map(|m| m.modified().ok())
        .map(unix_ms)
        .max()
}

/// A small sysfs attribute, trimmed.
fn read_small(path: &Path, cap: u64) -> Option<String> {
    let mut buf = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(cap)
        .read_to_end(&mut buf)
        .ok()?;
    Some(String::from_utf8_lossy(&buf).trim().to_string())
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::symlink;

    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir()
                .join(format!("ztmesh-posture-{tag}-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A sysfs-shaped tree:
    ///
    /// ```text
    /// 254:1 vda1 (partition)          plain
    /// 254:2 vda2 (partition)          plain
    /// 253:0 dm-0 CRYPT-LUKS2 on vda2  encrypted
    /// 253:1 dm-1 LVM on dm-0          encrypted (LVM on LUKS)
    /// 253:2 dm-2 LVM on dm-0 + vda1   not: half of it is plain
    /// 253:3 dm-3 on itself            a loop: bounded, not encrypted
    /// 253:4 dm-4 CRYPT, no slaves     encrypted
    /// 253:5 dm-5 LVM, no slaves       not
    /// 253:6 dm-6 VERITY on vda1       not: verity checks, does not encrypt
    /// 253:7 dm-7 INTEGRITY on vda1    not
    /// 253:8 dm-8 SUBDEV on vda2       not (LUKS2's integrity device …)
    /// 253:9 dm-9 LUKS2 on dm-8        … under an encrypting mapping: encrypted
    /// ```
    fn sysfs(dir: &Path) -> PathBuf {
        let sys = dir.join("sys");
        let block = sys.join("devices/virtual/block");
        let disk = sys.join("devices/pci0000:00/virtio1/block/vda");
        let dm = |n: u32, uuid: &str, slaves: &[&str]| {
            let d = block.join(format!("dm-{n}"));
            fs::create_dir_all(d.join("dm")).unwrap();
            fs::create_dir_all(d.join("slaves")).unwrap();
            fs::write(d.join("dm/uuid"), format!("{uuid}\n")).unwrap();
            for s in slaves {
                let name = Path::new(s).file_name().unwrap();
                symlink(s, d.join("slaves").join(name)).unwrap();
            }
        };
        for part in ["vda1", "vda2"] {
            fs::create_dir_all(disk.join(part)).unwrap();
            fs::write(disk.join(part).join("dev"), "254:x\n").unwrap();
        }
        let vda2 = "../../../../pci0000:00/virtio1/block/vda/vda2";
        let vda1 = "../../../../pci0000:00/virtio1/block/vda/vda1";
        dm(0, "CRYPT-LUKS2-0123abcd-luks-root", &[vda2]);
        dm(1, "LVM-AbCdEf", &["../../dm-0"]);
        dm(2, "LVM-GhIjKl", &["../../dm-0", vda1]);
        dm(3, "LVM-loop", &["../../dm-3"]);
        dm(4, "CRYPT-PLAIN-x", &[]);
        dm(5, "LVM-empty", &[]);
        dm(6, "CRYPT-VERITY-0123abcd-usr", &[vda1]);
        dm(7, "CRYPT-INTEGRITY-0123abcd-data", &[vda1]);
        dm(8, "CRYPT-SUBDEV-0123abcd-root_dif", &[vda2]);
        dm(9, "CRYPT-LUKS2-0123abcd-root", &["../../dm-8"]);
        let devs = sys.join("dev/block");
        fs::create_dir_all(&devs).unwrap();
        let mut links: Vec<(String, String)> = ["vda1", "vda2"]
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let target = format!("../../devices/pci0000:00/virtio1/block/vda/{p}");
                (format!("254:{}", i + 1), target)
            })
            .collect();
        links.extend((0..10).map(|n| {
            let target = format!("../../devices/virtual/block/dm-{n}");
            (format!("253:{n}"), target)
        }));
        for (num, target) in links {
            symlink(target, devs.join(num)).unwrap();
        }
        sys
    }

    #[test]
    fn dm_crypt_is_found_through_the_device_stack() {
        let tmp = TempDir::new("sysfs");
        let sys = sysfs(&tmp.0);
        let table = [
            ((254, 1), Some(false)),
            ((254, 2), Some(false)),
            ((253, 0), Some(true)),
            ((253, 1), Some(true)),
            ((253, 2), Some(false)),
            ((253, 3), Some(false)),
            ((253, 4), Some(true)),
            ((253, 5), Some(false)),
            ((253, 6), Some(false)),
            ((253, 7), Some(false)),
            ((253, 8), Some(false)),
            ((253, 9), Some(true)),
            ((0, 27), None),
            ((8, 0), None),
        ];
        for ((major, minor), want) in table {
            assert_eq!(disk_encrypted(&sys, major, minor), want, "{major}:{minor}");
        }
        assert_eq!(disk_encrypted(&tmp.0.join("nowhere"), 253, 0), None);
    }

    #[test]
    fn the_stack_walk_looks_at_each_device_once() {
        // Seven layers of four devices, each on all four of the layer below,
        // the bottom layer dm-crypt: 4^6 paths down, 29 devices.
        let tmp = TempDir::new("lattice");
        let block = tmp.0.join("sys/devices/virtual/block");
        let name = |layer: usize, i: usize| format!("dm-{layer}-{i}");
        for layer in 1..=7 {
            for i in 0..4 {
                let d = block.join(name(layer, i));
                fs::create_dir_all(d.join("dm")).unwrap();
                fs::create_dir_all(d.join("slaves")).unwrap();
                let uuid = if layer == 7 { "CRYPT-LUKS2-x" } else { "LVM-x" };
                fs::write(d.join("dm/uuid"), uuid).unwrap();
                if layer < 7 {
                    for j in 0..4 {
                        let below = name(layer + 1, j);
                        symlink(format!("../../{below}"), d.join("slaves").join(&below)).unwrap();
                    }
                }
            }
        }
        let top = block.join("dm-top");
        fs::create_dir_all(top.join("slaves")).unwrap();
        for j in 0..4 {
            let below = name(1, j);
            symlink(format!("../../{below}"), top.join("slaves").join(&below)).unwrap();
        }
        let mut walk = StackWalk::default();
        assert!(walk.encrypted(&top, 0));
        assert_eq!(walk.seen.len(), 1 + 7 * 4);
        // One plain device at the bottom makes everything above it plain.
        fs::write(block.join(name(7, 2)).join("dm/uuid"), "LVM-plain").unwrap();
        let mut walk = StackWalk::default();
        assert!(!walk.encrypted(&top, 0));
        assert!(walk.seen.len() <= 1 + 7 * 4);
    }

    #[test]
    fn a_file_over_the_cap_is_refused_not_cut() {
        let tmp = TempDir::new("cap");
        let f = tmp.0.join("f");
        fs::write(&f, "0123456789").unwrap();
        assert_eq!(read_capped(&f, 10).unwrap(), "0123456789");
        assert_eq!(
            read_capped(&f, 9).unwrap_err().kind(),
            std::io::ErrorKind::InvalidData
        );
        assert!(read_capped(&tmp.0.join("missing"), 10).is_err());
    }

    #[test]
    fn collection_reads_the_fixture_host() {
        let tmp = TempDir::new("host");
        let sys = sysfs(&tmp.0);
        let os_release = tmp.0.join("os-release");
        fs::write(
            &os_release,
            "NAME=\"Fixture\"\nID=fixture\nVERSION_ID=\"7.1\"\n",
        )
        .unwrap();
        let mountinfo = tmp.0.join("mountinfo");
        fs::write(
            &mountinfo,
            "22 27 0:21 / /proc rw - proc proc rw\n27 1 253:1 / / rw,relatime - ext4 /dev/mapper/vg-root rw\n",
        )
        .unwrap();
        let history = tmp.0.join("history.log");
        let status = tmp.0.join("status");
        let now = ztmesh_proto::time::now_ms();
        let day = Duration::from_secs(86_400);
        for (file, age) in [
            (&history, 3 * day + Duration::from_secs(60)),
            (&status, 9 * day),
        ] {
            let f = fs::File::create(file).unwrap();
            f.set_modified(std::time::SystemTime::now() - age).unwrap();
        }
        let lists = tmp.0.join("lists");
        fs::create_dir_all(lists.join("partial")).unwrap();
        let list = lists.join("deb.debian.org_debian_dists_bookworm_InRelease");
        fs::write(&list, "x").unwrap();
        let paths = HostPaths {
            os_release: vec![tmp.0.join("missing"), os_release],
            mountinfo: mountinfo.clone(),
            sys,
            package_times: vec![history.clone(), status, tmp.0.join("missing")],
            apt_lists: lists.clone(),
        };
        let mut c = Collector::new(paths.clone());
        let got = c.collect(now, false);
        let set = &got.attrs;
        assert_eq!(set.get(OS), Some(&AttrValue::Str("linux".into())));
        assert_eq!(set.get(OS_DISTRO), Some(&AttrValue::Str("fixture".into())));
        assert_eq!(set.get(OS_VERSION), Some(&AttrValue::Str("7.1".into())));
        assert_eq!(set.get(DISK_ENCRYPTED), Some(&AttrValue::Bool(true)));
        assert_eq!(
            set.get(AGENT_VERSION),
            Some(&AttrValue::Str(env!("CARGO_PKG_VERSION").into()))
        );
        assert!(matches!(set.get(KERNEL), Some(AttrValue::Str(k)) if !k.is_empty()));
        assert_eq!(set.get(SECURITY_UPDATES), None, "apt-get not run");
        // Every attribute is either reported or has a reason.
        for (key, _) in ztmesh_policy::NODE_ATTRIBUTES {
            assert!(
                set.get(key).is_some() != got.unreported.contains_key(key),
                "{key}"
            );
        }
        let why = |c: &Collection, key: &str| c.unreported.get(key).cloned().unwrap_or_default();
        let with_apt = find_program("apt-get").is_some();
        if !with_apt {
            assert_eq!(set.get(DAYS_SINCE_UPGRADE), None);
            assert!(why(&got, SECURITY_UPDATES).contains("no apt-get"));
            return;
        }
        assert_eq!(
            set.get(DAYS_SINCE_UPGRADE),
            Some(&AttrValue::Int(3)),
            "the newest file"
        );
        assert_eq!(
            why(&got, SECURITY_UPDATES),
            "apt-get -s dist-upgrade has not counted yet"
        );
        // A count from apt is reported while the package lists are recent;
        // a failure says why.
        c.apt = Some((now, Ok(4)));
        let got = c.collect(now, false);
        assert_eq!(got.attrs.get(SECURITY_UPDATES), Some(&AttrValue::Int(4)));
        assert!(!got.unreported.contains_key(SECURITY_UPDATES));
        assert!(!c.apt_due(now + APT_EVERY_MS - 1));
        c.apt = Some((now, Err("apt-get did not finish within 20s".into())));
        let got = c.collect(now, false);
        assert_eq!(got.attrs.get(SECURITY_UPDATES), None);
        assert_eq!(
            why(&got, SECURITY_UPDATES),
            "apt-get did not finish within 20s"
        );
        assert!(!c.apt_due(now + APT_RETRY_MS - 1));
        assert!(c.apt_due(now + APT_RETRY_MS), "a failure is retried sooner");
        c.apt = Some((now, Ok(4)));
        let old = std::time::SystemTime::now() - 8 * day;
        fs::File::options()
            .write(true)
            .open(&list)
            .unwrap()
            .set_modified(old)
            .unwrap();
        fs::write(lists.join("lock"), "").unwrap();
        let got = c.collect(now, false);
        assert_eq!(got.attrs.get(SECURITY_UPDATES), None, "week-old lists");
        assert!(why(&got, SECURITY_UPDATES).contains("apt-get update"));
        assert!(!c.apt_due(now + APT_EVERY_MS), "nor does apt run on them");
        fs::remove_file(&list).unwrap();
        let got = c.collect(now, false);
        assert_eq!(got.attrs.get(SECURITY_UPDATES), None, "no lists");
        // A package time in the future: days since the upgrade unknown.
        fs::File::options()
            .write(true)
            .open(&history)
            .unwrap()
            .set_modified(std::time::SystemTime::now() + day)
            .unwrap();
        let got = c.collect(now, false);
        assert_eq!(got.attrs.get(DAYS_SINCE_UPGRADE), None);
        assert!(why(&got, DAYS_SINCE_UPGRADE).contains("future"));
        // A mountinfo over the read cap is not trusted: its end (the last
        // mount on `/`) may be missing.
        let big = format!(
            "{}27 1 253:1 / / rw - ext4 /dev/mapper/vg-root rw\n",
            "22 27 0:21 / /proc rw - proc proc rw\n".repeat(MAX_FILE_BYTES / 37 + 1)
        );
        assert!(big.len() > MAX_FILE_BYTES);
        fs::write(&mountinfo, big).unwrap();
        let got = c.collect(now, false);
        assert_eq!(got.attrs.get(DISK_ENCRYPTED), None);
        assert!(why(&got, DISK_ENCRYPTED).contains("larger than"));
        // / on an overlay: no disk attribute; no os-release: no distro.
        fs::write(
            &mountinfo,
            "27 1 0:52 / / rw - overlay overlay rw,lowerdir=/a\n",
        )
        .unwrap();
        let bare = HostPaths {
            os_release: vec![],
            ..paths
        };
        let got = Collector::new(bare).collect(now, false);
        assert_eq!(got.attrs.get(DISK_ENCRYPTED), None);
        assert_eq!(
            why(&got, DISK_ENCRYPTED),
            "/ (overlay) is on no block device"
        );
        assert_eq!(got.attrs.get(OS_DISTRO), None);
        assert_eq!(got.attrs.get(OS_VERSION), None);
        assert_eq!(why(&got, OS_VERSION), "no readable os-release");
    }

    #[test]
    fn commands_are_bounded_in_time_and_output_and_checked() {
        let sh = find_program("sh").expect("a shell on the test machine");
        assert!(sh.is_absolute());
        let run = |script: &str, timeout_ms: u64, cap: usize| {
            run_bounded(&sh, &["-c", script], Duration::from_millis(timeout_ms), cap)
        };
        assert_eq!(run("echo hi; echo err >&2", 5_000, 100).unwrap(), b"hi\n");
        assert_eq!(run("printf 1234567890", 5_000, 10).unwrap(), b"1234567890");
        assert!(matches!(
            run("printf 12345678901", 5_000, 10),
            Err(RunError::TooLarge { .. })
        ));
        assert!(matches!(
            run("exec sleep 30", 200, 100),
            Err(RunError::Timeout { .. })
        ));
        assert!(matches!(
            run("echo x; exit 3", 5_000, 100),
            Err(RunError::Failed { .. })
        ));
        // Endless output is cut at the cap and the writer killed.
        assert!(matches!(
            run("exec yes", 5_000, 1 << 16),
            Err(RunError::TooLarge { .. })
        ));
        // Output that comes slowly is read to its end.
        assert_eq!(
            run("echo a; sleep 0.2; echo b", 5_000, 100).unwrap(),
            b"a\nb\n"
        );
        assert!(matches!(
            run_bounded(
                Path::new("/nonexistent/prog"),
                &[],
                Duration::from_secs(1),
                10
            ),
            Err(RunError::Spawn { .. })
        ));
        assert_eq!(find_program("no-such-program-ztmesh"), None);
    }

    /// Whether process `pid` is gone (or a zombie its new parent has not
    /// reaped yet), waiting up to 5 s.
    fn gone(pid: &str) -> bool {
        (0..500).any(|_| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The state follows the parenthesised command name.
            let state = stat.rsplit(')').next().unwrap_or_default().trim_start();
            let dead = stat.is_empty() || state.starts_with('Z');
            if !dead {
                std::thread::sleep(Duration::from_millis(10));
            }
            dead
        })
    }

    #[test]
    fn a_timeout_kills_the_whole_process_group() {
        let sh = find_program("sh").expect("a shell on the test machine");
        let tmp = TempDir::new("group");
        for (script, what) in [
            // The command exits at once; a grandchild keeps the pipe open.
            ("sleep 30 & echo $! > {pidfile}; exit 0", "exited"),
            // The command hangs too.
            ("sleep 30 & echo $! > {pidfile}; exec sleep 31", "hanging"),
        ] {
            let pidfile = tmp.0.join(format!("pid-{}", what));
            let script = script.replace("{pidfile}", &pidfile.display().to_string());
            let started = Instant::now();
            let r = run_bounded(&sh, &["-c", &script], Duration::from_millis(300), 100);
            assert!(matches!(r, Err(RunError::Timeout { .. })), "{what}: {r:?}");
            assert!(started.elapsed() < Duration::from_secs(3), "{what}");
            let pid = fs::read_to_string(&pidfile).unwrap();
            assert!(gone(pid.trim()), "{what}: the grandchild was killed");
        }
    }
}
