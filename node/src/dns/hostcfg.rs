//! The host's resolver configuration: pointing it at MagicDNS and back.
//!
//! Two ways, chosen by the caller:
//! - [`Resolved`] where systemd-resolved runs (`/run/systemd/resolve/`
//!   exists and `resolvectl` is on `PATH`): the tunnel interface gets DNS
//!   server 100.100.100.100 and routing-only domains `~<mesh domain>` and
//!   `~<split suffix>`, so resolved sends only those names to MagicDNS and
//!   keeps its own upstreams for the rest; `resolvectl revert` undoes it.
//!   Nothing is written to `/etc/resolv.conf`.
//! - [`HostDns`] otherwise: `/etc/resolv.conf` is saved byte for byte to a
//!   backup (0600, fsynced) and rewritten **in place** (open, truncate,
//!   write: `ip netns exec` bind-mounts `/etc/netns/NAME/resolv.conf` over
//!   `/etc/resolv.conf`, and a file rename cannot replace a mount point)
//!   with `nameserver 100.100.100.100` and `search <domain> …`;
//!   [`HostDns::restore`] writes the backup back and removes it.
//!
//! Crash safety: a backup left by a run that never restored is the
//! original and is kept; the managed file (recognised by its first line,
//! [`MANAGED_MARKER`]) is never saved as an original.
//!
//! [`read_upstreams`] reads the resolvers MagicDNS forwards to from a
//! resolv.conf text; [`original_upstreams`] picks the right file in managed
//! mode (the backup once there is one). Under systemd-resolved, read
//! `/run/systemd/resolve/resolv.conf` (resolved's own upstreams; its stub
//! 127.0.0.53 would work too, as only the mesh domain and split suffixes
//! are routed to MagicDNS).

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tracing::{debug, warn};

use super::name::normalize_name;
use super::MAGIC_DNS_ADDR;

/// The first line of a resolv.conf written by ztmesh.
pub const MANAGED_MARKER: &str = "# managed by ztmesh";

/// glibc reads at most three `nameserver` lines (`MAXNS`); so do we.
pub const MAX_UPSTREAMS: usize = 3;

/// The resolvers a resolv.conf names, in order: each `nameserver` address
/// at port 53, at most [`MAX_UPSTREAMS`], without repeats.
///
/// Skipped: 100.100.100.100 (MagicDNS itself: forwarding there loops),
/// unspecified addresses, addresses with a zone index (`fe80::1%eth0`),
/// anything unparseable, and every line of a file ztmesh wrote (its only
/// nameserver is MagicDNS).
pub fn read_upstreams(resolv_conf: &str) -> Vec<SocketAddr> {
    if is_managed(resolv_conf.as_bytes()) {
        return Vec::new();
    }
    let mut out: Vec<SocketAddr> = Vec::new();
    for line in resolv_conf.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(Ok(ip)) = words.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        let loops = match ip {
            IpAddr::V4(v4) => v4 == MAGIC_DNS_ADDR,
            IpAddr::V6(v6) => v6.to_ipv4_mapped() == Some(MAGIC_DNS_ADDR),
        };
        let addr = SocketAddr::new(ip, 53);
        if loops || ip.is_unspecified() || out.contains(&addr) {
            continue;
        }
        out.push(addr);
        if out.len() == MAX_UPSTREAMS {
            break;
        }
    }
    out
}

/// The upstreams of the host's original resolver configuration: from the
/// backup when one exists (after [`HostDns::apply`], or after a crash that
/// left the managed file in place), else from `resolv_path`; empty when
/// neither can be read.
pub fn original_upstreams(resolv_path: &Path, backup_path: &Path) -> Vec<SocketAddr> {
    let text = fs::read(backup_path).or_else(|_| fs::read(resolv_path));
    text.map_or_else(
        |_| Vec::new(),
        |t| read_upstreams(&String::from_utf8_lossy(&t)),
    )
}

/// Whether a resolv.conf is one ztmesh wrote (its first line is
/// [`MANAGED_MARKER`]).
pub fn is_managed(resolv_conf: &[u8]) -> bool {
    resolv_conf.starts_with(MANAGED_MARKER.as_bytes())
}

/// The managed resolv.conf: MagicDNS as the only nameserver, the mesh
/// domain first in `search` followed by the original's search domains,
/// and the original's `options` lines (`edns0`, `trust-ad`, timeouts).
pub fn managed_file(domain: &str, original: &str, backup_path: &Path) -> String {
    let mut search: Vec<&str> = vec![domain];
    let mut options: Vec<&str> = Vec::new();
    for line in original.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            // The last of `search` and `domain` wins in glibc; keeping
            // the words of all of them is close enough and loses none.
            Some("search" | "domain") => {
                for w in words {
                    if !search.contains(&w) {
                        search.push(w);
                    }
                }
            }
            Some("options") => options.push(line.trim()),
            _ => {}
        }
    }
    let mut out = format!(
        "{MANAGED_MARKER}: MagicDNS answers on {MAGIC_DNS_ADDR}.\n\
         # The original is saved in {}; `ztmesh down` puts it back.\n\
         nameserver {MAGIC_DNS_ADDR}\n\
         search {}\n",
        backup_path.display(),
        search.join(" ")
    );
    for o in options {
        out.push_str(o);
        out.push('\n');
    }
    out
}

/// What [`HostDns::apply`] did with the original.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The original was saved to the backup.
    BackedUp,
    /// A backup was already there (a run that did not restore): it holds
    /// the original and was kept.
    KeptBackup,
    /// The file was already ztmesh's and no backup exists: the original is
    /// unknown, so there is nothing to save (and [`HostDns::restore`] will
    /// leave the file alone).
    NoOriginal,
}

/// What [`HostDns::restore`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restored {
    /// The original is back, byte for byte; the backup is removed.
    Restored,
    /// No backup: nothing to restore.
    NoBackup,
    /// The file is no longer ztmesh's (another program rewrote it while
    /// ztmesh ran): it is left as it is, and the stale backup removed.
    ChangedByOthers,
}

/// The managed-file way of configuring the host's resolver.
#[derive(Debug)]
pub struct HostDns;

impl HostDns {
    /// Saves `resolv_path` to `backup_path` (unless a backup exists or the
    /// file is already ztmesh's, see [`Applied`]) and rewrites
    /// `resolv_path` in place with [`managed_file`].
    ///
    /// # Errors
    /// `domain` is not a DNS name (`InvalidInput`); `resolv_path` does not
    /// exist or cannot be read or written; the backup cannot be written
    /// (then `resolv_path` is left untouched).
    pub fn apply(resolv_path: &Path, backup_path: &Path, domain: &str) -> io::Result<Applied> {
        let domain = normalize_name(domain).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid DNS domain {domain:?}"),
            )
        })?;
        let current = fs::read(resolv_path)?;
        let (applied, original) = match fs::read(backup_path) {
            Ok(backup) => (Applied::KeptBackup, backup),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if is_managed(&current) {
                    (Applied::NoOriginal, Vec::new())
                } else {
                    write_backup(backup_path, &current)?;
                    (Applied::BackedUp, current)
                }
            }
            Err(e) => return Err(e),
        };
        let managed = managed_file(&domain, &String::from_utf8_lossy(&original), backup_path);
        write_in_place(resolv_path, managed.as_bytes(), false)?;
        debug!(path = %resolv_path.display(), ?applied, "resolv.conf points at magic dns");
        Ok(applied)
    }

    /// Writes the backup back to `resolv_path` byte for byte (in place) and
    /// removes it, if `resolv_path` is still ztmesh's (see [`Restored`]).
    ///
    /// # Errors
    /// Reading the backup or writing `resolv_path` failed; the backup is
    /// kept then, so a later restore can try again.
    pub fn restore(resolv_path: &Path, backup_path: &Path) -> io::Result<Restored> {
        let backup = match fs::read(backup_path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Restored::NoBackup),
            Err(e) => return Err(e),
        };
        let restored = match fs::read(resolv_path) {
            Ok(current) if !is_managed(&current) => {
                warn!(path = %resolv_path.display(), "resolv.conf was rewritten by another program; left as it is");
                Restored::ChangedByOthers
            }
            Ok(_) => {
                write_in_place(resolv_path, &backup, false)?;
                Restored::Restored
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                write_in_place(resolv_path, &backup, true)?;
                Restored::Restored
            }
            Err(e) => return Err(e),
        };
        fs::remove_file(backup_path)?;
        sync_dir(backup_path);
        debug!(path = %resolv_path.display(), ?restored, "resolv.conf restored");
        Ok(restored)
    }
}

/// The named network namespace this process runs in (`ip netns
/// identify`): the entry of `netns_dir` (`/run/netns`) whose nsfs inode is
/// this process's network namespace; `None` in the host's namespace or an
/// unnamed one (a container's).
pub fn named_netns(netns_dir: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let own = fs::read_link("/proc/self/ns/net").ok()?;
    let own = own.to_str()?;
    let inode: u64 = own.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()?;
    fs::read_dir(netns_dir)
        .ok()?
        .take(4096)
        .filter_map(Result::ok)
        .find(|e| fs::metadata(e.path()).is_ok_and(|m| m.ino() == inode))
        .and_then(|e| e.file_name().into_string().ok())
}

/// Why the host's resolver must be left alone, if it must: a daemon in a
/// named network namespace (`ip netns exec NAME`) shares `/etc` with the
/// host unless `/etc/netns/NAME/resolv.conf` exists (which `ip netns exec`
/// mounts over `/etc/resolv.conf`), and pointing the host at
/// 100.100.100.100 — an address only that namespace has — would break every
/// name lookup outside it; systemd-resolved (`resolvectl`) is the host's in
/// any case.
pub fn host_resolver_not_ours(netns: Option<&str>, etc_netns: &Path) -> Option<String> {
    let name = netns?;
    if etc_netns.join(name).join("resolv.conf").exists() {
        return None;
    }
    Some(format!(
        "running in network namespace {name} without /etc/netns/{name}/resolv.conf: \
         the resolver configuration is the host's"
    ))
}

/// The systemd-resolved way: per-link settings through `resolvectl`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    program: PathBuf,
}

impl Resolved {
    /// systemd-resolved on this host, if it runs (`/run/systemd/resolve/`)
    /// and `resolvectl` is on `PATH`.
    pub fn system() -> Option<Resolved> {
        Resolved::detect(
            Path::new("/run/systemd/resolve"),
            std::env::var_os("PATH").as_deref(),
        )
    }

    /// [`Resolved::system`] with the run directory and `PATH` given.
    pub fn detect(run_dir: &Path, path_var: Option<&OsStr>) -> Option<Resolved> {
        if !run_dir.is_dir() {
            return None;
        }
        std::env::split_paths(path_var?)
            .map(|dir| dir.join("resolvectl"))
            .find(|p| {
                p.metadata()
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
            .map(Resolved::with_program)
    }

    /// Uses `program` as `resolvectl`.
    pub fn with_program(program: PathBuf) -> Resolved {
        Resolved { program }
    }

    /// Points `iface` at MagicDNS for the mesh domain and the split DNS
    /// suffixes only ([`resolvectl_apply`] lists the calls).
    ///
    /// # Errors
    /// A `resolvectl` call failed, or did not finish within 10 s.
    pub fn apply(&self, iface: &str, domain: &str, split_suffixes: &[String]) -> io::Result<()> {
        for (args, required) in resolvectl_apply(iface, domain, split_suffixes) {
            match self.run(&args) {
                Ok(()) => {}
                Err(e) if !required => {
                    debug!(error = %e, ?args, "optional resolvectl setting failed");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Drops every per-link DNS setting of `iface` (`resolvectl revert`).
    ///
    /// # Errors
    /// The call failed or did not finish within 10 s.
    pub fn revert(&self, iface: &str) -> io::Result<()> {
        self.run(&["revert".to_string(), iface.to_string()])
    }

    /// Runs `resolvectl ARGS`, waiting at most 10 s.
    fn run(&self, args: &[String]) -> io::Result<()> {
        /// Polls of the child's exit; × [`POLL`] bounds the wait.
        const POLLS: u32 = 500;
        const POLL: Duration = Duration::from_millis(20);
        let mut child = Command::new(&self.program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        for _ in 0..POLLS {
            if let Some(status) = child.try_wait()? {
                return if status.success() {
                    Ok(())
                } else {
                    Err(io::Error::other(format!(
                        "resolvectl {} failed: {status}",
                        args.join(" ")
                    )))
                };
            }
            std::thread::sleep(POLL);
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("resolvectl {} did not finish", args.join(" ")),
        ))
    }
}

/// The `resolvectl` calls that point `iface` at MagicDNS, each with
/// whether it must succeed: the DNS server, the routing-only domains
/// (`~domain`, `~suffix`: only these names go to MagicDNS), and — optional,
/// as older resolved lacks them — not the default route, no LLMNR or mDNS
/// on the tunnel.
pub fn resolvectl_apply(
    iface: &str,
    domain: &str,
    split_suffixes: &[String],
) -> Vec<(Vec<String>, bool)> {
    let mut domains = vec![
        "domain".to_string(),
        iface.to_string(),
        format!("~{domain}"),
    ];
    domains.extend(split_suffixes.iter().map(|s| format!("~{s}")));
    let call = |words: &[&str]| words.iter().map(|w| (*w).to_string()).collect::<Vec<_>>();
    vec![
        (call(&["dns", iface, &MAGIC_DNS_ADDR.to_string()]), true),
        (domains, true),
        (call(&["default-route", iface, "no"]), false),
        (call(&["llmnr", iface, "no"]), false),
        (call(&["mdns", iface, "no"]), false),
    ]
}

/// Writes the backup: a temporary file (0600), fsynced, renamed into
/// place, the directory fsynced.
fn write_backup(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    sync_dir(path);
    Ok(())
}

/// Replaces a file's contents without replacing the file (the same inode:
/// a bind mount over it keeps showing it), then fsyncs it.
fn write_in_place(path: &Path, bytes: &[u8], create: bool) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .create(create)
        .mode(0o644)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Fsyncs the directory holding `path` (best effort: a rename or unlink is
/// durable once its directory is).
fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
            debug!(error = %e, dir = %dir.display(), "directory fsync failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let dir = std::env::temp_dir()
                .join(format!("ztmesh-dns-{tag}-{}-{nanos}", std::process::id()));
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn path(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// An original with comments, odd spacing, a search list, options, no
    /// final newline and a byte that is not UTF-8.
    const ORIGINAL: &[u8] = b"# from dhcp\r\nnameserver 198.18.0.53\n;old\nnameserver   fd00::53 \nsearch corp.example lab.example\noptions edns0 trust-ad\n\xff tail";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_named_namespace_without_its_own_resolv_conf_leaves_the_host_alone() {
        let tmp = TempDir::new("etc-netns");
        let dir = tmp.0.clone();
        assert!(
            host_resolver_not_ours(None, &dir).is_none(),
            "the host's own daemon"
        );
        let why = host_resolver_not_ours(Some("lab1"), &dir).expect("shared with the host");
        assert!(why.contains("/etc/netns/lab1/resolv.conf"), "{why}");
        fs::create_dir_all(dir.join("lab1")).unwrap();
        fs::write(dir.join("lab1/resolv.conf"), b"nameserver 198.18.0.1\n").unwrap();
        assert!(
            host_resolver_not_ours(Some("lab1"), &dir).is_none(),
            "its own file"
        );
        // This test process runs in no named namespace of an empty dir.
        assert_eq!(named_netns(&dir), None);
    }

    #[test]
    fn upstreams_are_the_nameserver_lines() {
        let conf = "# comment\nnameserver 198.18.0.53\n  nameserver\tfd00::53  # trailing\n; nameserver 198.18.0.99\nnameservers 198.18.0.98\nsearch example\n";
        assert_eq!(
            read_upstreams(conf),
            [addr("198.18.0.53:53"), addr("[fd00::53]:53")]
        );
        let skipped = "nameserver 100.100.100.100\nnameserver ::ffff:100.100.100.100\nnameserver 0.0.0.0\nnameserver fe80::1%eth0\nnameserver dns.example\nnameserver\nnameserver 127.0.0.53\nnameserver 127.0.0.53\n";
        assert_eq!(read_upstreams(skipped), [addr("127.0.0.53:53")]);
        let many = "nameserver 198.18.0.1\nnameserver 198.18.0.2\nnameserver 198.18.0.3\nnameserver 198.18.0.4\n";
        assert_eq!(read_upstreams(many).len(), MAX_UPSTREAMS);
        assert_eq!(
            read_upstreams(&String::from_utf8_lossy(ORIGINAL)),
            [addr("198.18.0.53:53"), addr("[fd00::53]:53")]
        );
        // Our own file names only MagicDNS: no upstreams from it.
        let ours = managed_file(
            "ztmesh.internal",
            "nameserver 198.18.0.53\n",
            Path::new("/b"),
        );
        assert!(read_upstreams(&ours).is_empty());
        assert!(read_upstreams("").is_empty());
    }

    #[test]
    fn original_upstreams_come_from_the_backup_once_the_file_is_managed() {
        let dir = TempDir::new("upstreams");
        let (resolv, backup) = (dir.path("resolv.conf"), dir.path("backup"));
        assert!(original_upstreams(&resolv, &backup).is_empty());
        fs::write(&resolv, ORIGINAL).unwrap();
        let want = [addr("198.18.0.53:53"), addr("[fd00::53]:53")];
        assert_eq!(original_upstreams(&resolv, &backup), want);
        HostDns::apply(&resolv, &backup, "ztmesh.internal").unwrap();
        // The file now names only MagicDNS; the backup still knows.
        assert!(read_upstreams(&fs::read_to_string(&resolv).unwrap()).is_empty());
        assert_eq!(original_upstreams(&resolv, &backup), want);
    }

    #[test]
    fn the_managed_file_points_at_magic_dns_and_keeps_search_and_options() {
        let text = managed_file(
            "ztmesh.internal",
            &String::from_utf8_lossy(ORIGINAL),
            Path::new("/var/lib/ztmesh/resolv.conf.orig"),
        );
        assert!(is_managed(text.as_bytes()));
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            [
                "nameserver 100.100.100.100",
                "search ztmesh.internal corp.example lab.example",
                "options edns0 trust-ad"
            ]
        );
        assert!(text.contains("/var/lib/ztmesh/resolv.conf.orig"));
    }

    #[test]
    fn apply_then_restore_round_trips_byte_for_byte_in_place() {
        let dir = TempDir::new("roundtrip");
        let (resolv, backup) = (
            dir.path("resolv.conf"),
            dir.path("resolv.conf.ztmesh-backup"),
        );
        fs::write(&resolv, ORIGINAL).unwrap();
        let inode = fs::metadata(&resolv).unwrap().ino();

        assert_eq!(
            HostDns::apply(&resolv, &backup, "ZTMesh.Internal.").unwrap(),
            Applied::BackedUp
        );
        assert_eq!(fs::read(&backup).unwrap(), ORIGINAL);
        assert_eq!(
            fs::metadata(&backup).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let managed = fs::read_to_string(&resolv).unwrap();
        assert!(is_managed(managed.as_bytes()));
        assert!(managed.contains("\nnameserver 100.100.100.100\n"));
        assert!(managed.contains("\nsearch ztmesh.internal corp.example lab.example\n"));
        // Written in place: the same file, as a bind mount needs.
        assert_eq!(fs::metadata(&resolv).unwrap().ino(), inode);

        assert_eq!(
            HostDns::restore(&resolv, &backup).unwrap(),
            Restored::Restored
        );
        assert_eq!(fs::read(&resolv).unwrap(), ORIGINAL);
        assert_eq!(fs::metadata(&resolv).unwrap().ino(), inode);
        assert!(!backup.exists());
        // Restoring again finds nothing to do.
        assert_eq!(
            HostDns::restore(&resolv, &backup).unwrap(),
            Restored::NoBackup
        );
        assert_eq!(fs::read(&resolv).unwrap(), ORIGINAL);
    }

    #[test]
    fn a_backup_left_by_a_crash_is_the_original_and_is_kept() {
        let dir = TempDir::new("crash");
        let (resolv, backup) = (dir.path("resolv.conf"), dir.path("backup"));
        fs::write(&resolv, ORIGINAL).unwrap();
        assert_eq!(
            HostDns::apply(&resolv, &backup, "ztmesh.internal").unwrap(),
            Applied::BackedUp
        );
        // The process dies here; the next start applies again.
        assert_eq!(
            HostDns::apply(&resolv, &backup, "ztmesh.internal").unwrap(),
            Applied::KeptBackup
        );
        assert_eq!(
            fs::read(&backup).unwrap(),
            ORIGINAL,
            "the backup still holds the original"
        );
        let managed = fs::read_to_string(&resolv).unwrap();
        assert!(managed.contains("search ztmesh.internal corp.example lab.example"));
        assert_eq!(
            HostDns::restore(&resolv, &backup).unwrap(),
            Restored::Restored
        );
        assert_eq!(fs::read(&resolv).unwrap(), ORIGINAL);
    }

    #[test]
    fn the_managed_file_is_never_saved_as_the_original() {
        let dir = TempDir::new("nobackup");
        let (resolv, backup) = (dir.path("resolv.conf"), dir.path("backup"));
        let ours = managed_file("ztmesh.internal", "", &backup);
        fs::write(&resolv, &ours).unwrap();
        // The backup is gone (deleted by hand, say): the original is unknown.
        assert_eq!(
            HostDns::apply(&resolv, &backup, "ztmesh.internal").unwrap(),
            Applied::NoOriginal
        );
        assert!(!backup.exists());
        assert_eq!(
            HostDns::restore(&resolv, &backup).unwrap(),
            Restored::NoBackup
        );
        assert!(is_managed(&fs::read(&resolv).unwrap()));
    }

    #[test]
    fn a_file_rewritten_by_another_program_is_left_alone_on_restore() {
        let dir = TempDir::new("others");
        let (resolv, backup) = (dir.path("resolv.conf"), dir.path("backup"));
        fs::write(&resolv, ORIGINAL).unwrap();
        HostDns::apply(&resolv, &backup, "ztmesh.internal").unwrap();
        let newer = b"nameserver 198.18.0.77\n";
        fs::write(&resolv, newer).unwrap();
        assert_eq!(
            HostDns::restore(&resolv, &backup).unwrap(),
            Restored::ChangedByOthers
        );
        assert_eq!(fs::read(&resolv).unwrap(), newer);
        assert!(!backup.exists());
    }

    #[test]
    fn apply_refuses_a_missing_file_and_a_bad_domain_without_writing() {
        let dir = TempDir::new("refuse");
        let (resolv, backup) = (dir.path("resolv.conf"), dir.path("backup"));
        let err = HostDns::apply(&resolv, &backup, "ztmesh.internal").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(!resolv.exists() && !backup.exists());
        fs::write(&resolv, ORIGINAL).unwrap();
        let err = HostDns::apply(&resolv, &backup, "bad domain").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(fs::read(&resolv).unwrap(), ORIGINAL);
        assert!(!backup.exists());
        // A restore with the file deleted meanwhile recreates it.
        HostDns::apply(&resolv, &backup, "ztmesh.internal").unwrap();
        fs::remove_file(&resolv).unwrap();
        assert_eq!(
            HostDns::restore(&resolv, &backup).unwrap(),
            Restored::Restored
        );
        assert_eq!(fs::read(&resolv).unwrap(), ORIGINAL);
    }

    #[test]
    fn resolvectl_routes_only_the_mesh_domain_and_split_suffixes() {
        let calls = resolvectl_apply("ztm0", "ztmesh.internal", &["example.corp".to_string()]);
        let text: Vec<(String, bool)> = calls.iter().map(|(a, r)| (a.join(" "), *r)).collect();
        assert_eq!(
            text,
            [
                ("dns ztm0 100.100.100.100".to_string(), true),
                (
                    "domain ztm0 ~ztmesh.internal ~example.corp".to_string(),
                    true
                ),
                ("default-route ztm0 no".to_string(), false),
                ("llmnr ztm0 no".to_string(), false),
                ("mdns ztm0 no".to_string(), false),
            ]
        );
    }

    #[test]
    fn resolved_is_detected_and_driven_through_resolvectl() {
        let dir = TempDir::new("resolved");
        let run = dir.path("run-resolve");
        let bin = dir.path("bin");
        fs::create_dir_all(&bin).unwrap();
        let path_var = std::env::join_paths([dir.path("empty"), bin.clone()]).unwrap();
        // No run directory, or no resolvectl: not detected.
        assert_eq!(Resolved::detect(&run, Some(&path_var)), None);
        fs::create_dir_all(&run).unwrap();
        assert_eq!(Resolved::detect(&run, Some(&path_var)), None);
        assert_eq!(Resolved::detect(&run, None), None);
        // A stand-in resolvectl that records its arguments and refuses
        // "llmnr" (as an old resolved might).
        let log = dir.path("calls.log");
        let program = bin.join("resolvectl");
        fs::write(
            &program,
            format!(
                "#!/bin/sh\necho \"$*\" >> '{}'\n[ \"$1\" != llmnr ]\n",
                log.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&program, fs::Permissions::from_mode(0o755)).unwrap();
        let resolved = Resolved::detect(&run, Some(&path_var)).expect("detected");
        assert_eq!(resolved, Resolved::with_program(program.clone()));

        resolved
            .apply("ztm0", "ztmesh.internal", &["example.corp".to_string()])
            .unwrap();
        resolved.revert("ztm0").unwrap();
        let calls = fs::read_to_string(&log).unwrap();
        assert_eq!(
            calls.lines().collect::<Vec<_>>(),
            [
                "dns ztm0 100.100.100.100",
                "domain ztm0 ~ztmesh.internal ~example.corp",
                "default-route ztm0 no",
                "llmnr ztm0 no",
                "mdns ztm0 no",
                "revert ztm0",
            ]
        );
        // A required call that fails is an error.
        fs::write(&program, "#!/bin/sh\nexit 1\n").unwrap();
        assert!(resolved.apply("ztm0", "ztmesh.internal", &[]).is_err());
        assert!(resolved.revert("ztm0").is_err());
    }
}
