//! Least privilege for the daemon: after start-up it keeps only the Linux
//! capabilities it still needs, and drops the rest from its effective,
//! permitted, inheritable, ambient and bounding sets.
//!
//! What the daemon needs once its lock, state dir and local socket exist:
//! `CAP_NET_ADMIN`, because the data plane is (re)created on `up` and on a
//! netmap change (TUN device, addresses, routes via `ip`, `SO_RCVBUFFORCE`),
//! and `CAP_NET_BIND_SERVICE`, because the DNS server binds port 53 on
//! 100.100.100.100 when `up` turns it on (and a WireGuard port below 1024
//! needs it too).
//! Not kept: `CAP_DAC_OVERRIDE` (the state files are root's own), `CAP_CHOWN`
//! (the socket is chowned before the drop), `CAP_SYS_ADMIN`, `CAP_SETUID`….
//! The bounding set keeps the same bits, so the `ip` child gets
//! `CAP_NET_ADMIN` and nothing more.
//!
//! Capabilities belong to threads: [`restrict_to`] must run while the process
//! has one thread (before the async runtime is built); later threads inherit
//! the reduced sets.

use std::io;

/// `CAP_NET_BIND_SERVICE`: bind ports below 1024.
pub const CAP_NET_BIND_SERVICE: u32 = 10;
/// `CAP_NET_ADMIN`: TUN devices, addresses, routes, forced socket buffers.
pub const CAP_NET_ADMIN: u32 = 12;
/// `CAP_SETPCAP`: needed to drop from the bounding set.
const CAP_SETPCAP: u32 = 8;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
const PR_CAPBSET_DROP: libc::c_int = 24;
const PR_CAP_AMBIENT: libc::c_int = 47;
const PR_CAP_AMBIENT_CLEAR_ALL: libc::c_ulong = 4;

/// Why the capabilities could not be reduced (the daemon then refuses to run).
#[derive(Debug, thiserror::Error)]
pub enum PrivError {
    /// `capget` failed: a kernel without capabilities support.
    #[error("reading the capability sets failed: {0}")]
    Get(io::Error),
    /// `PR_CAPBSET_DROP` failed although `CAP_SETPCAP` was held.
    #[error("dropping capability {cap} from the bounding set failed: {source}")]
    Bounding { cap: u32, source: io::Error },
    /// `capset` failed.
    #[error("setting the capability sets failed: {0}")]
    Set(io::Error),
}

/// A thread's capability sets as bit masks (bit n = capability n).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapSets {
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
}

/// The bit mask of the capabilities the daemon keeps.
pub fn daemon_keeps() -> u64 {
    (1 << CAP_NET_ADMIN) | (1 << CAP_NET_BIND_SERVICE)
}

/// The sets after keeping only `keep`: of `keep`, what was permitted stays
/// permitted and effective; nothing is inheritable. Pure.
pub fn reduced(current: CapSets, keep: u64) -> CapSets {
    let permitted = current.permitted & keep;
    CapSets {
        effective: permitted,
        permitted,
        inheritable: 0,
    }
}

/// Reduces the calling thread's (and so the single-threaded process's)
/// capabilities to `keep`, bounding and ambient sets included. Without
/// `CAP_SETPCAP` (an unprivileged run) the bounding set is left as it is: it
/// then grants nothing that the process could use.
///
/// # Errors
/// [`PrivError`]; the caller must not go on with more privilege than intended.
pub fn restrict_to(keep: u64) -> Result<CapSets, PrivError> {
    let current = capget().map_err(PrivError::Get)?;
    // The bounding set first: dropping from it needs CAP_SETPCAP, which the
    // capset below removes.
    if current.effective & (1 << CAP_SETPCAP) != 0 {
        for cap in 0..=last_cap() {
            if keep & (1 << cap) != 0 {
                continue;
            }
            // SAFETY: prctl with integer arguments only.
            if unsafe { libc::prctl(PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) } != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINVAL) {
                    break; // beyond the kernel's last capability
                }
                return Err(PrivError::Bounding { cap, source: e });
            }
        }
    }
    // SAFETY: prctl with integer arguments only. Fails (EINVAL) only on
    // kernels before 4.3, which have no ambient set to clear.
    let _ = unsafe { libc::prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) };
    let target = reduced(current, keep);
    capset(target).map_err(PrivError::Set)?;
    Ok(target)
}

/// The highest capability number this kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
        .min(63)
}

#[repr(C)]
struct Header {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn capget() -> io::Result<CapSets> {
    let mut h = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut d = [Data::default(); 2];
    // SAFETY: version 3 takes a header and two data structs, both valid here.
    if unsafe { libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Ok(CapSets {
        effective: join(d[0].effective, d[1].effective),
        permitted: join(d[0].permitted, d[1].permitted),
        inheritable: join(d[0].inheritable, d[1].inheritable),
    })
}

fn capset(s: CapSets) -> io::Result<()> {
    let mut h = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    // Truncation is the point: the low and high 32 bits of each set.
    let split = |v: u64| (v as u32, (v >> 32) as u32);
    let (e0, e1) = split(s.effective);
    let (p0, p1) = split(s.permitted);
    let (i0, i1) = split(s.inheritable);
    let d = [
        Data {
            effective: e0,
            permitted: p0,
            inheritable: i0,
        },
        Data {
            effective: e1,
            permitted: p1,
            inheritable: i1,
        },
    ];
    // SAFETY: version 3 takes a header and two data structs, both valid here.
    if unsafe { libc::syscall(libc::SYS_capset, &mut h, d.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_what_was_permitted_of_the_kept_set() {
        let all = CapSets {
            effective: u64::MAX >> 23,
            permitted: u64::MAX >> 23,
            inheritable: 1 << 5,
        };
        let keep = daemon_keeps();
        assert_eq!(keep, (1 << CAP_NET_ADMIN) | (1 << CAP_NET_BIND_SERVICE));
        assert_eq!(
            reduced(all, keep),
            CapSets {
                effective: keep,
                permitted: keep,
                inheritable: 0
            }
        );
        let none = CapSets {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        };
        assert_eq!(reduced(none, keep), none, "never gains a capability");
    }

    #[test]
    fn reads_this_threads_capabilities() {
        let c = capget().unwrap();
        assert_eq!(c.effective & !c.permitted, 0, "effective ⊆ permitted");
    }
}
