//! The machine's interface addresses (`getifaddrs`), the local endpoint
//! candidates of endpoint discovery.

use std::ffi::CStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Most addresses read (a machine with more is not a laptop or a VM).
const MAX_ADDRESSES: usize = 256;

/// The IPv4 and IPv6 addresses of every interface that is up, except the
/// interfaces named in `exclude` (this node's TUN device) and loopback, in
/// the kernel's order. Empty if `getifaddrs` fails.
pub fn interface_addresses(exclude: &[&str]) -> Vec<IpAddr> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() && out.len() < MAX_ADDRESSES {
        // SAFETY: `cur` is a non-null node of the list getifaddrs returned,
        // which stays valid until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        let up = ifa.ifa_flags & (libc::IFF_UP as libc::c_uint) != 0;
        let loopback = ifa.ifa_flags & (libc::IFF_LOOPBACK as libc::c_uint) != 0;
        if !up || loopback || ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a non-null, NUL-terminated interface name from the kernel.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
        if exclude.iter().any(|x| *x == name) {
            continue;
        }
        // SAFETY: ifa_addr is non-null; sa_family says which sockaddr it is.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        let ip = match family {
            libc::AF_INET => {
                // SAFETY: AF_INET addresses are sockaddr_in.
                let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
            }
            libc::AF_INET6 => {
                // SAFETY: AF_INET6 addresses are sockaddr_in6.
                let sin6 = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in6>() };
                IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
            }
            _ => continue,
        };
        out.push(ip);
    }
    // SAFETY: the head getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_excluded_interfaces_are_left_out() {
        let all = interface_addresses(&[]);
        assert!(all.iter().all(|ip| !ip.is_loopback()), "{all:?}");
        // Excluding every interface by name leaves nothing.
        let names: Vec<String> = std::fs::read_dir("/sys/class/net")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        assert!(interface_addresses(&refs).is_empty());
    }
}
