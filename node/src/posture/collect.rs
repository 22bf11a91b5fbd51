//! The I/O shell of posture collection: reads os-release, `uname(2)`,
//! mountinfo and sysfs, the package database's file times, and runs `nft`
//! and `apt-get` (found on `PATH`, run without a shell, stderr discarded,
//! bounded in time and output). Blocking: the agent runs it on a blocking
//! thread (`spawn_blocking`), never on the control loop or the packet path.
//! What the text means is decided by the pure [`super`] module.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use ztmesh_policy::AttrValue;
use ztmesh_proto::time::unix_ms;
use ztmesh_proto::UnixMs;

use super::{
    device_numbers, firewall_active, parse_os_release, pending_security_updates, root_mount,
    whole_days, AttrSet, AGENT_VERSION, DAYS_SINCE_UPGRADE, DISK_ENCRYPTED, FIREWALL, KERNEL, OS,
    OS_DISTRO, OS_VERSION, SECURITY_UPDATES,
};

/// Longest wait for `nft -j list ruleset`.
pub const NFT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for `apt-get -s upgrade`.
pub const APT_TIMEOUT: Duration = Duration::from_secs(20);
/// `apt-get -s upgrade` runs at most this often; its count is kept between.
pub const APT_EVERY_MS: i64 = 30 * 60_000;
/// Most output read from a command; more and its output is not used.
pub const MAX_OUTPUT_BYTES: usize = 8 << 20;
/// Most bytes read from a file (mountinfo of a busy container host is large).
const MAX_FILE_BYTES: u64 = 4 << 20;
/// How deep the walk down `slaves/` goes (dm-crypt under LVM under … ).
const MAX_STACK_DEPTH: usize = 8;
/// Most `slaves/` entries of one device considered.
const MAX_SLAVES: usize = 64;
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
        }
    }
}

/// Collects this node's attributes; keeps the `apt-get` count between
/// runs (see [`APT_EVERY_MS`]).
#[derive(Debug, Default)]
pub struct Collector {
    paths: HostPaths,
    /// When `apt-get -s upgrade` last ran and what it counted (`None`: it
    /// failed).
    apt: Option<(UnixMs, Option<u32>)>,
}

impl Collector {
    pub fn new(paths: HostPaths) -> Self {
        Self { paths, apt: None }
    }

    /// Reads the host's attributes at `now_ms`. `run_apt` allows running
    /// `apt-get` if its count is older than [`APT_EVERY_MS`] (up to
    /// [`APT_TIMEOUT`]); without it the last count is used, if any.
    /// Blocking. What cannot be determined is left out.
    pub fn collect(&mut self, now_ms: UnixMs, run_apt: bool) -> AttrSet {
        let mut set = AttrSet::default();
        set.set(OS, AttrValue::Str(std::env::consts::OS.to_string()));
        set.set(
            AGENT_VERSION,
            AttrValue::Str(env!("CARGO_PKG_VERSION").into()),
        );
        set.set_known(KERNEL, kernel_release().map(AttrValue::Str));
        if let Some(text) = self.paths.os_release.iter().find_map(|p| read_text(p).ok()) {
            let os = parse_os_release(&text);
            set.set_known(OS_DISTRO, os.id.map(AttrValue::Str));
            set.set_known(OS_VERSION, os.version_id.map(AttrValue::Str));
        }
        set.set_known(FIREWALL, host_firewall().map(AttrValue::Bool));
        set.set_known(
            DISK_ENCRYPTED,
            root_encrypted(&self.paths).map(AttrValue::Bool),
        );
        // Debian and Ubuntu only: without apt, neither is reported.
        if let Some(apt) = find_program("apt-get") {
            let newest = self
                .paths
                .package_times
                .iter()
                .filter_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
                .map(unix_ms)
                .max();
            set.set_known(
                DAYS_SINCE_UPGRADE,
                newest.map(|t| AttrValue::Int(whole_days(now_ms, t))),
            );
            if run_apt && self.apt_stale(now_ms) {
                self.apt = Some((now_ms, security_updates(&apt)));
            }
            let pending = self.apt.and_then(|(_, n)| n);
            set.set_known(
                SECURITY_UPDATES,
                pending.map(|n| AttrValue::Int(i64::from(n))),
            );
        }
        set
    }

    /// Whether a [`Self::collect`] with `run_apt` would run `apt-get` now:
    /// apt is installed and its last count is older than [`APT_EVERY_MS`].
    pub fn apt_due(&self, now_ms: UnixMs) -> bool {
        self.apt_stale(now_ms) && find_program("apt-get").is_some()
    }

    fn apt_stale(&self, now_ms: UnixMs) -> bool {
        self.apt
            .is_none_or(|(at, _)| now_ms < at || now_ms.saturating_sub(at) >= APT_EVERY_MS)
    }
}

/// Whether the filesystem of `/` sits on dm-crypt (see [`disk_encrypted`]);
/// `None` when `/` is on no block device (overlay, tmpfs, 9p, virtiofs,
/// NFS, ZFS …) or the tables cannot be read.
fn root_encrypted(paths: &HostPaths) -> Option<bool> {
    let root = root_mount(&read_text(&paths.mountinfo).ok()?)?;
    if let Some(found) = disk_encrypted(&paths.sys, root.major, root.minor) {
        return Some(found);
    }
    // btrfs shows an anonymous device number: take the source's instead.
    if !root.source.starts_with("/dev/") {
        return None;
    }
    let meta = std::fs::metadata(&root.source).ok()?;
    let (major, minor) = device_numbers(meta.rdev());
    disk_encrypted(&paths.sys, major, minor)
}

/// Whether block device `major:minor` stores its data encrypted, from sysfs
/// under `sys`: true when it is a dm-crypt mapping (`dm/uuid` starting with
/// `CRYPT-`), or when it is stacked on other devices (`slaves/`: LVM, RAID,
/// dm-integrity …) that all are, recursively; false for a plain disk or
/// partition. All, not any: a volume group spanning an encrypted and a
/// plain disk holds data in the clear. `None` when sysfs has no such block
/// device.
pub fn disk_encrypted(sys: &Path, major: u32, minor: u32) -> Option<bool> {
    let dev = sys.join("dev/block").join(format!("{major}:{minor}"));
    std::fs::metadata(&dev).ok()?;
    Some(stack_encrypted(&dev, 0))
}

fn stack_encrypted(dev: &Path, depth: usize) -> bool {
    let uuid = read_small(&dev.join("dm/uuid"), 256).unwrap_or_default();
    if uuid.starts_with("CRYPT-") {
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
    slaves.iter().all(|s| stack_encrypted(s, depth + 1))
}

/// `node:firewall` from `nft -j list ruleset` (see
/// [`super::firewall_active`]); `None` when nft is missing, fails (no
/// `CAP_NET_ADMIN`, no JSON support) or takes longer than [`NFT_TIMEOUT`].
/// Rules of the legacy iptables back end are invisible to nft, so a host
/// filtering only through them reads as false.
fn host_firewall() -> Option<bool> {
    let nft = find_program("nft")?;
    let out = run_bounded(
        &nft,
        &["-j", "list", "ruleset"],
        NFT_TIMEOUT,
        MAX_OUTPUT_BYTES,
    )
    .inspect_err(|e| tracing::debug!(error = %e, "firewall state unknown"))
    .ok()?;
    firewall_active(&String::from_utf8_lossy(&out))
        .inspect_err(|e| tracing::debug!(error = %e, "firewall state unknown"))
        .ok()
}

/// Pending security upgrades from `apt-get -s upgrade` (a simulation: it
/// changes nothing and takes no lock); `None` if it fails or times out.
fn security_updates(apt_get: &Path) -> Option<u32> {
    let args = ["-s", "-o", "Debug::NoLocking=1", "upgrade"];
    let out = run_bounded(apt_get, &args, APT_TIMEOUT, MAX_OUTPUT_BYTES)
        .inspect_err(|e| tracing::debug!(error = %e, "security updates unknown"))
        .ok()?;
    Some(pending_security_updates(&String::from_utf8_lossy(&out)))
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
/// `LC_ALL=C`) and returns its standard output, if it exits successfully
/// within `timeout` having written at most `cap` bytes; otherwise it is
/// killed. Blocking (a helper thread reads the output).
///
/// # Errors
/// [`RunError`].
pub fn run_bounded(
    program: &Path,
    args: &[&str],
    timeout: Duration,
    cap: usize,
) -> Result<Vec<u8>, RunError> {
    let name = program.display().to_string();
    let mut child = Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| RunError::Spawn {
            program: name.clone(),
            source,
        })?;
    let Some(mut stdout) = child.stdout.take() else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(RunError::Read {
            program: name,
            source: std::io::Error::other("no stdout pipe"),
        });
    };
    let (tx, rx) = mpsc::channel();
    let limit = u64::try_from(cap).unwrap_or(u64::MAX).saturating_add(1);
    let reader = std::thread::Builder::new()
        .name("posture-cmd".into())
        .spawn(move || {
            let mut buf = Vec::new();
            let r = (&mut stdout).take(limit).read_to_end(&mut buf).map(|_| buf);
            // The receiver may have given up (timeout): nothing to do then.
            let _ = tx.send(r);
        });
    if let Err(source) = reader {
        let _ = child.kill();
        let _ = child.wait();
        return Err(RunError::Read {
            program: name,
            source,
        });
    }
    let outcome = match rx.recv_timeout(timeout) {
        Ok(Ok(buf)) if buf.len() > cap => Err(RunError::TooLarge {
            program: name.clone(),
            cap,
        }),
        Ok(Ok(buf)) => Ok(buf),
        Ok(Err(source)) => Err(RunError::Read {
            program: name.clone(),
            source,
        }),
        Err(_) => Err(RunError::Timeout {
            program: name.clone(),
            timeout,
        }),
    };
    if outcome.is_err() {
        let _ = child.kill();
    }
    let status = reap(&mut child);
    let out = outcome?;
    match status {
        Some(s) if s.success() => Ok(out),
        Some(status) => Err(RunError::Failed {
            program: name,
            status,
        }),
        None => Err(RunError::Timeout {
            program: name,
            timeout,
        }),
    }
}

/// Waits for `child`, which has closed its output or been killed: up to
/// about a second, then kills it. `None` if it had to be killed here.
fn reap(child: &mut std::process::Child) -> Option<ExitStatus> {
    for _ in 0..100 {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    None
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

/// A text file, at most [`MAX_FILE_BYTES`] of it.
fn read_text(path: &Path) -> std::io::Result<String> {
    let mut buf = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_FILE_BYTES)
        .read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
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
        links.extend((0..6).map(|n| {
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
            ((0, 27), None),
            ((8, 0), None),
        ];
        for ((major, minor), want) in table {
            assert_eq!(disk_encrypted(&sys, major, minor), want, "{major}:{minor}");
        }
        assert_eq!(disk_encrypted(&tmp.0.join("nowhere"), 253, 0), None);
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
        let paths = HostPaths {
            os_release: vec![tmp.0.join("missing"), os_release],
            mountinfo: mountinfo.clone(),
            sys,
            package_times: vec![history, status, tmp.0.join("missing")],
        };
        let mut c = Collector::new(paths.clone());
        let set = c.collect(now, false);
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
        if find_program("apt-get").is_some() {
            assert_eq!(
                set.get(DAYS_SINCE_UPGRADE),
                Some(&AttrValue::Int(3)),
                "the newest file"
            );
        } else {
            assert_eq!(set.get(DAYS_SINCE_UPGRADE), None);
        }
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
        let set = Collector::new(bare).collect(now, false);
        assert_eq!(set.get(DISK_ENCRYPTED), None);
        assert_eq!(set.get(OS_DISTRO), None);
        assert_eq!(set.get(OS_VERSION), None);
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
}
