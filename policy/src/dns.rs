//! The policy's `dns` section: split DNS suffixes and their resolvers
//! (pure: no I/O).
//!
//! `"dns": {"split": {"example.corp": ["198.19.50.53", "[fd00::53]:5353"]}}`
//! sends every name under `example.corp` to those resolvers (typically
//! reached through a subnet router). The checks here are syntactic: the
//! policy does not know the mesh domain, so a suffix equal to it is caught
//! by the node, which answers its own domain first.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// At most this many split DNS suffixes in one policy.
pub const MAX_SPLIT_SUFFIXES: usize = 64;

/// At most this many resolvers for one suffix.
pub const MAX_SPLIT_RESOLVERS: usize = 8;

/// The port a resolver written without one listens on.
pub const DNS_PORT: u16 = 53;

/// Checks a split DNS suffix and returns it lowercased.
///
/// Labels of 1-63 characters from `[a-z0-9-]` (any case), not starting or
/// ending with `-`, joined by single dots, at most 253 characters in all,
/// without a trailing dot.
pub(crate) fn split_suffix(text: &str) -> Result<String, String> {
    if text.ends_with('.') && text.len() > 1 {
        return Err(format!(
            "invalid DNS suffix {text:?}: write it without the trailing dot ({:?})",
            text.trim_end_matches('.')
        ));
    }
    let lower = text.to_ascii_lowercase();
    if let Some(problem) = name_problem(&lower) {
        return Err(format!("invalid DNS suffix {text:?}: {problem}"));
    }
    Ok(lower)
}

/// What is wrong with a lowercase DNS name, if anything.
fn name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("it is empty");
    }
    if name.len() > 253 {
        return Some("longer than 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Some("empty label (two dots in a row, or a leading dot)");
        }
        if label.len() > 63 {
            return Some("a label is longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Some("labels hold only letters, digits and '-'");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Some("a label starts or ends with '-'");
        }
    }
    None
}

/// Parses a resolver: an IP address (port 53) or a socket address
/// (`198.19.50.53:5353`, `[fd00::53]:5353`).
///
/// Refused: addresses in the overlay range 100.64.0.0/10 (MagicDNS names
/// are answered by the node itself, and 100.100.100.100 is the node's own
/// listener: forwarding there would loop), unspecified, multicast and
/// broadcast addresses, and port 0.
pub(crate) fn resolver(text: &str) -> Result<SocketAddr, String> {
    let addr = match text.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, DNS_PORT),
        Err(_) => text.parse::<SocketAddr>().map_err(|_| {
            format!(
                "invalid resolver {text:?}: expected an IP address or IP:PORT (\"198.19.50.53\", \"[fd00::53]:5353\")"
            )
        })?,
    };
    let ip = match addr.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    if let IpAddr::V4(v4) = ip {
        if in_overlay(v4) {
            return Err(format!(
                "resolver {text:?} is in the overlay range 100.64.0.0/10: mesh names are answered by each node itself; give a resolver outside the overlay (behind a subnet router)"
            ));
        }
        if v4.is_broadcast() {
            return Err(format!("resolver {text:?} is a broadcast address"));
        }
    }
    if ip.is_unspecified() {
        return Err(format!("resolver {text:?} is an unspecified address"));
    }
    if ip.is_multicast() {
        return Err(format!("resolver {text:?} is a multicast address"));
    }
    if addr.port() == 0 {
        return Err(format!("resolver {text:?} has port 0"));
    }
    Ok(addr)
}

/// Whether `ip` lies in the overlay range 100.64.0.0/10.
fn in_overlay(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    a == 100 && (b & 0xc0) == 64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes_are_lowercased_and_checked_label_by_label() {
        assert_eq!(split_suffix("Example.CORP").as_deref(), Ok("example.corp"));
        assert_eq!(split_suffix("corp").as_deref(), Ok("corp"));
        assert_eq!(split_suffix("a-1.b2").as_deref(), Ok("a-1.b2"));
        let long_label = "a".repeat(63);
        assert!(split_suffix(&long_label).is_ok());
        assert!(split_suffix(&"a".repeat(64)).is_err());
        let long_name = vec!["abcdefghi"; 25].join("."); // 249 characters
        assert!(split_suffix(&long_name).is_ok());
        assert!(split_suffix(&format!("{long_name}.abcd")).is_err());
        for bad in [
            "",
            ".",
            "example.corp.",
            ".corp",
            "a..b",
            "-a.corp",
            "a-.corp",
            "a_b.corp",
            "a b",
            "é.corp",
        ] {
            assert!(split_suffix(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn resolvers_default_to_port_53_and_refuse_the_overlay() {
        assert_eq!(
            resolver("198.19.50.53"),
            Ok("198.19.50.53:53".parse().unwrap())
        );
        assert_eq!(
            resolver("198.19.50.53:5353"),
            Ok("198.19.50.53:5353".parse().unwrap())
        );
        assert_eq!(resolver("fd00::53"), Ok("[fd00::53]:53".parse().unwrap()));
        assert_eq!(
            resolver("[fd00::53]:5353"),
            Ok("[fd00::53]:5353".parse().unwrap())
        );
        assert_eq!(resolver("127.0.0.1"), Ok("127.0.0.1:53".parse().unwrap()));
        for bad in [
            "100.100.100.100",
            "100.64.0.1:53",
            "100.127.255.255",
            "::ffff:100.100.100.100",
            "0.0.0.0",
            "::",
            "255.255.255.255",
            "198.19.50.53:0",
            "198.19.50.53:99999",
            "dns.example.corp",
            "[198.19.50.53]:53",
            "fd00::53:5353:x",
        ] {
            assert!(resolver(bad).is_err(), "{bad:?} accepted");
        }
        assert!(resolver("100.64.0.0").is_err());
    }
}
