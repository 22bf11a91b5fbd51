//! Checks of what enrolled nodes send: reported endpoints and enrollment
//! keys. Pure: no I/O.

use std::net::{IpAddr, SocketAddr};

use crate::error::{Error, Result};

/// Endpoint candidates a node may report at most (local and reflexive
/// addresses of both families; more would only be noise every peer probes).
pub const MAX_ENDPOINTS: usize = 16;

/// Checks the endpoints a node reports and returns them canonical, sorted
/// and deduplicated.
///
/// # Errors
/// `Invalid` naming the first bad entry: not `ip:port`, port 0, or an
/// address no peer could use (unspecified, loopback, multicast, broadcast,
/// link-local); or more than [`MAX_ENDPOINTS`] entries.
pub fn validate_endpoints(endpoints: &[String]) -> Result<Vec<String>> {
    if endpoints.len() > MAX_ENDPOINTS {
        return Err(Error::Invalid(format!(
            "at most {MAX_ENDPOINTS} endpoints per report, got {}",
            endpoints.len()
        )));
    }
    let mut parsed = Vec::with_capacity(endpoints.len());
    for (i, e) in endpoints.iter().enumerate() {
        let shown: String = e.chars().take(64).collect();
        let sa: SocketAddr = e
            .parse()
            .map_err(|_| Error::Invalid(format!("endpoint #{i} {shown:?} is not ip:port")))?;
        let sa = SocketAddr::new(sa.ip().to_canonical(), sa.port());
        if let Some(why) = unusable_endpoint(&sa) {
            return Err(Error::Invalid(format!(
                "endpoint #{i} {shown:?} is refused: {why}"
            )));
        }
        parsed.push(sa.to_string());
    }
    parsed.sort();
    parsed.dedup();
    Ok(parsed)
}

/// Why peers could not use `sa` as a WireGuard endpoint, if they could not.
fn unusable_endpoint(sa: &SocketAddr) -> Option<&'static str> {
    if sa.port() == 0 {
        return Some("port 0");
    }
    match sa.ip() {
        IpAddr::V4(a) if a.is_unspecified() || a.octets()[0] == 0 => Some("unspecified address"),
        IpAddr::V4(a) if a.is_loopback() => Some("loopback address"),
        IpAddr::V4(a) if a.is_multicast() => Some("multicast address"),
        IpAddr::V4(a) if a.is_broadcast() => Some("broadcast address"),
        IpAddr::V4(a) if a.is_link_local() => Some("link-local address"),
        IpAddr::V6(a) if a.is_unspecified() => Some("unspecified address"),
        IpAddr::V6(a) if a.is_loopback() => Some("loopback address"),
        IpAddr::V6(a) if a.is_multicast() => Some("multicast address"),
        IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80 => {
            Some("link-local address (meaningless without its interface)")
        }
        _ => None,
    }
}

/// Whether an x25519 public key has small order (including zero and the
/// non-canonical encodings of such points): every Diffie-Hellman result
/// with it is all-zero, so a peer "handshaking" with it has no secret.
///
/// RFC 7748 §6.1: a clamped scalar is a multiple of the cofactor 8, so it
/// maps exactly the small-order points (of the curve and of its twist) to 0.
pub fn is_low_order_x25519(key: &[u8; 32]) -> bool {
    // Any fixed scalar works; the key is public, so no secret is involved.
    const PROBE: [u8; 32] = [0x5a; 32];
    x25519_dalek::x25519(PROBE, *key) == [0u8; 32]
}

/// Whether an ed25519 public key is weak (small order, e.g. the identity):
/// signatures by "anyone" could verify under it.
pub fn is_weak_ed25519(key: &[u8; 32]) -> bool {
    ed25519_dalek::VerifyingKey::from_bytes(key).is_ok_and(|k| k.is_weak())
}

/// Invisible formatting characters that can make text read as other text:
/// bidirectional overrides and isolates, zero-width characters, soft hyphen.
pub fn is_deceptive(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}')
}

#[cfg(test)]
mod tests {
    use rand_core::OsRng;
    use ztmesh_proto::keys::{SigningKey, WgPrivateKey};

    use super::*;

    #[test]
    fn endpoints_are_canonical_sorted_and_deduplicated() {
        let v = validate_endpoints(&[
            "[fd00::2]:51820".into(),
            "198.18.0.2:51820".into(),
            "[::ffff:198.18.0.2]:51820".into(),
        ])
        .unwrap();
        assert_eq!(v, vec!["198.18.0.2:51820", "[fd00::2]:51820"]);
        assert!(validate_endpoints(&[]).unwrap().is_empty());
    }

    #[test]
    fn unusable_endpoints_are_named_with_the_reason() {
        let table = [
            ("nonsense", "not ip:port"),
            ("198.18.0.1", "not ip:port"),
            ("198.18.0.1:0", "port 0"),
            ("0.1.2.3:1", "unspecified"),
            ("127.0.0.2:1", "loopback"),
            ("239.1.1.1:1", "multicast"),
            ("255.255.255.255:1", "broadcast"),
            ("169.254.0.1:1", "link-local"),
            ("[::]:1", "unspecified"),
            ("[::1]:1", "loopback"),
            ("[ff05::2]:1", "multicast"),
            ("[febf::1]:1", "link-local"),
            ("[::ffff:224.0.0.1]:1", "multicast"),
        ];
        for (ep, why) in table {
            let e = validate_endpoints(&["198.18.0.1:1".into(), ep.into()]).unwrap_err();
            let msg = e.to_string();
            assert!(msg.starts_with("endpoint #1 "), "{ep}: {msg}");
            assert!(msg.contains(ep) && msg.contains(why), "{ep}: {msg}");
        }
        // A long entry is echoed clipped.
        let e = validate_endpoints(&["x".repeat(10_000)]).unwrap_err();
        assert!(e.to_string().len() < 200);
    }

    #[test]
    fn random_keys_are_neither_low_order_nor_weak() {
        for _ in 0..32 {
            let wg = WgPrivateKey::generate(&mut OsRng);
            assert!(!is_low_order_x25519(wg.public().as_bytes()));
            let m = SigningKey::generate(&mut OsRng);
            assert!(!is_weak_ed25519(m.public().as_bytes()));
        }
    }

    #[test]
    fn small_order_keys_are_detected() {
        let mut zero = [0u8; 32];
        assert!(is_low_order_x25519(&zero));
        zero[31] = 0x80; // the ignored top bit
        assert!(is_low_order_x25519(&zero));
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert!(is_low_order_x25519(&identity));
        assert!(is_weak_ed25519(&identity));
    }
}
