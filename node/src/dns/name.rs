//! DNS name helpers of the MagicDNS core: label checks, suffix matching on
//! lowercase labels, and reverse (PTR) names (pure: no I/O).
//!
//! Names are compared as lists of lowercase labels, never as text, so a
//! label holding a dot or an escape (legal on the wire) cannot be mistaken
//! for two labels.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Longest DNS name in text form (RFC 1035 §2.3.4, without the root dot).
pub const MAX_NAME_LEN: usize = 253;

/// Longest label (RFC 1035 §2.3.4).
pub const MAX_LABEL_LEN: usize = 63;

/// Whether `label` is a hostname label: 1-63 characters of `[a-z0-9-]`,
/// not starting or ending with `-`. Expects lowercase.
pub fn valid_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= MAX_LABEL_LEN
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

/// Lowercases `text`, drops one trailing dot, and checks that it is a DNS
/// name of hostname labels of at most 253 characters.
pub fn normalize_name(text: &str) -> Option<String> {
    let lower = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
    (lower.len() <= MAX_NAME_LEN && lower.split('.').all(valid_label)).then_some(lower)
}

/// The labels of a normalized name, as bytes, leftmost first.
pub fn labels(name: &str) -> Vec<Vec<u8>> {
    name.split('.').map(|l| l.as_bytes().to_vec()).collect()
}

/// If `name` (lowercase labels) lies under or at `suffix`, the labels to the
/// left of the suffix (empty at the suffix itself).
pub fn strip_suffix<'a>(name: &'a [Vec<u8>], suffix: &[Vec<u8>]) -> Option<&'a [Vec<u8>]> {
    let cut = name.len().checked_sub(suffix.len())?;
    (name[cut..] == *suffix).then_some(&name[..cut])
}

/// The address a reverse name stands for: `D.C.B.A.in-addr.arpa` (four
/// decimal octets without leading zeros) or the 32 nibbles of
/// `….ip6.arpa`. Partial reverse names (a whole network) give `None`.
pub fn reverse_addr(name: &[Vec<u8>]) -> Option<IpAddr> {
    let [rest @ .., a, b] = name else {
        return None;
    };
    if b != b"arpa" {
        return None;
    }
    if a == b"in-addr" {
        let [d, c, b, a] = rest else {
            return None;
        };
        let octet = |l: &Vec<u8>| -> Option<u8> {
            let text = std::str::from_utf8(l).ok()?;
            let canonical = !text.is_empty()
                && text.len() <= 3
                && text.bytes().all(|b| b.is_ascii_digit())
                && (text == "0" || !text.starts_with('0'));
            canonical.then(|| text.parse().ok()).flatten()
        };
        return Some(IpAddr::V4(Ipv4Addr::new(
            octet(a)?,
            octet(b)?,
            octet(c)?,
            octet(d)?,
        )));
    }
    if a == b"ip6" {
        if rest.len() != 32 {
            return None;
        }
        let mut bits: u128 = 0;
        // The rightmost label is the most significant nibble.
        for label in rest.iter().rev() {
            let [digit] = label.as_slice() else {
                return None;
            };
            let nibble = char::from(*digit).to_digit(16)?;
            bits = (bits << 4) | u128::from(nibble);
        }
        return Some(IpAddr::V6(Ipv6Addr::from(bits)));
    }
    None
}

/// The reverse name of `ip`, lowercase, without the trailing dot.
pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("{d}.{c}.{b}.{a}.in-addr.arpa")
        }
        IpAddr::V6(v6) => {
            let mut out = String::with_capacity(72);
            for byte in v6.octets().iter().rev() {
                for nibble in [byte & 0x0f, byte >> 4] {
                    out.push(char::from_digit(u32::from(nibble), 16).expect("a nibble is < 16"));
                    out.push('.');
                }
            }
            out.push_str("ip6.arpa");
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(name: &str) -> Vec<Vec<u8>> {
        labels(name)
    }

    #[test]
    fn labels_follow_hostname_rules() {
        for good in ["a", "web", "web-1", "0", &"a".repeat(63)] {
            assert!(valid_label(good), "{good:?}");
        }
        for bad in ["", "-a", "a-", "a_b", "Web", "a.b", "é", &"a".repeat(64)] {
            assert!(!valid_label(bad), "{bad:?}");
        }
    }

    #[test]
    fn names_are_lowercased_and_lose_one_trailing_dot() {
        assert_eq!(
            normalize_name("ZTMesh.Internal.").as_deref(),
            Some("ztmesh.internal")
        );
        assert_eq!(normalize_name("corp").as_deref(), Some("corp"));
        for bad in [
            "",
            ".",
            "a..b",
            "a.b..",
            "a_b.corp",
            &format!("{}.abcde", vec!["abcdefghi"; 25].join(".")),
        ] {
            assert_eq!(normalize_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn suffixes_match_whole_labels_only() {
        let name = l("web.ztmesh.internal");
        assert_eq!(strip_suffix(&name, &l("ztmesh.internal")), Some(&name[..1]));
        assert_eq!(
            strip_suffix(&name, &l("web.ztmesh.internal")),
            Some(&name[..0])
        );
        assert_eq!(strip_suffix(&name, &l("mesh.internal")), None);
        assert_eq!(strip_suffix(&l("internal"), &l("ztmesh.internal")), None);
    }

    #[test]
    fn reverse_names_round_trip_and_reject_partial_or_odd_forms() {
        for ip in ["100.64.0.1", "100.127.255.254", "fd00:1:2::a", "fd00::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            let name = reverse_name(ip);
            assert_eq!(reverse_addr(&l(&name)), Some(ip), "{name}");
        }
        assert_eq!(
            reverse_name("100.64.0.1".parse().unwrap()),
            "1.0.64.100.in-addr.arpa"
        );
        for bad in [
            "0.64.100.in-addr.arpa",
            "01.0.64.100.in-addr.arpa",
            "256.0.64.100.in-addr.arpa",
            "x.0.64.100.in-addr.arpa",
            "1.1.0.64.100.in-addr.arpa",
            "in-addr.arpa",
            "arpa",
            "1.0.64.100.in-addr.example",
            "1.ip6.arpa",
        ] {
            assert_eq!(reverse_addr(&l(bad)), None, "{bad}");
        }
        let mut v6 = reverse_name("fd00::1".parse().unwrap());
        v6.replace_range(0..1, "g");
        assert_eq!(reverse_addr(&l(&v6)), None);
    }
}
