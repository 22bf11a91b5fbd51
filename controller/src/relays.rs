//! The relays the controller hands to every node in its netmap, read from
//! the `--relay-file` the operator writes: one JSON object per line, each as
//! `ztmesh-relay identity` prints it
//! (`{"name","quic_addr","tcp_addr","stun_addrs","cert_sha256"}`). Pure: the
//! caller reads the file.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use serde::Deserialize;
use ztmesh_proto::auth::parse_fingerprint;
use ztmesh_proto::control::Relay;

/// At most this many relays go into a map.
pub const MAX_RELAYS: usize = 16;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    name: String,
    quic_addr: String,
    tcp_addr: String,
    #[serde(default)]
    stun_addrs: Vec<String>,
    cert_sha256: String,
}

/// An address a node can dial: a socket address that is not unspecified
/// (`0.0.0.0`, `[::]`: a relay bound to every interface must be listed with
/// the address nodes reach it at) and has a port.
fn dialable(field: &str, s: &str) -> Result<(), String> {
    let a: SocketAddr = s
        .parse()
        .map_err(|_| format!("{field} {s:?} is not an IP:port address"))?;
    if a.ip().is_unspecified() || a.port() == 0 {
        return Err(format!(
            "{field} {s:?} cannot be dialled: give the address and port nodes reach the relay at"
        ));
    }
    Ok(())
}

fn relay(line: Line) -> Result<Relay, String> {
    let label_ok = !line.name.is_empty()
        && line.name.len() <= 63
        && line
            .name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !label_ok {
        return Err(format!(
            "name {:?} must be 1 to 63 of a-z, 0-9 and '-'",
            line.name
        ));
    }
    dialable("quic_addr", &line.quic_addr)?;
    dialable("tcp_addr", &line.tcp_addr)?;
    if line.stun_addrs.len() > 2 {
        return Err("at most 2 stun_addrs".into());
    }
    for s in &line.stun_addrs {
        dialable("stun_addrs", s)?;
    }
    let fp = parse_fingerprint(&line.cert_sha256)
        .ok_or("cert_sha256 must be 64 hex characters (ztmesh-relay identity prints it)")?;
    Ok(Relay {
        name: line.name,
        quic_addr: line.quic_addr,
        tcp_addr: line.tcp_addr,
        stun_addrs: line.stun_addrs,
        cert_sha256: fp.to_vec(),
    })
}

/// Parses a relay file; blank lines and `#` comments are skipped.
///
/// # Errors
/// `FILE:LINE: message` for the first bad line, a duplicate name, or more
/// than [`MAX_RELAYS`] relays.
pub fn parse(file_name: &str, text: &str) -> Result<Vec<Relay>, String> {
    let mut relays = Vec::new();
    let mut names = BTreeSet::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |msg: String| format!("{file_name}:{}: {msg}", i + 1);
        let parsed: Line = serde_json::from_str(line).map_err(|e| at(e.to_string()))?;
        let r = relay(parsed).map_err(at)?;
        if !names.insert(r.name.clone()) {
            return Err(at(format!("relay {:?} is listed twice", r.name)));
        }
        if relays.len() == MAX_RELAYS {
            return Err(at(format!("at most {MAX_RELAYS} relays")));
        }
        relays.push(r);
    }
    Ok(relays)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn line(name: &str, quic: &str) -> String {
        format!(
            r#"{{"name":"{name}","quic_addr":"{quic}","tcp_addr":"198.18.0.9:443","stun_addrs":["198.18.0.9:3478"],"cert_sha256":"{FP}"}}"#
        )
    }

    #[test]
    fn identity_lines_become_relays() {
        let text = format!(
            "# relays\n{}\n\n{}\n",
            line("r1", "198.18.0.9:7443"),
            line("r2", "[fd00::9]:7443")
        );
        let relays = parse("relays.jsonl", &text).unwrap();
        assert_eq!(relays.len(), 2);
        assert_eq!(relays[0].name, "r1");
        assert_eq!(relays[1].quic_addr, "[fd00::9]:7443");
        assert_eq!(relays[0].cert_sha256.len(), 32);
        assert_eq!(relays[0].stun_addrs, vec!["198.18.0.9:3478".to_string()]);
    }

    #[test]
    fn bad_lines_are_named_by_file_and_line() {
        let cases = [
            (
                line("r1", "0.0.0.0:7443"),
                "relays.jsonl:1: quic_addr \"0.0.0.0:7443\" cannot be dialled",
            ),
            (
                line("r1", "relay.example:7443"),
                "relays.jsonl:1: quic_addr \"relay.example:7443\" is not an IP:port",
            ),
            (
                line("R 1", "198.18.0.9:7443"),
                "relays.jsonl:1: name \"R 1\" must be",
            ),
            (
                line("r1", "198.18.0.9:7443").replace(FP, "abc"),
                "relays.jsonl:1: cert_sha256 must be 64 hex",
            ),
            (
                "{\"name\":\"r1\"}".to_string(),
                "relays.jsonl:1: missing field",
            ),
            (
                line("r1", "198.18.0.9:7443").replace("\"name\"", "\"nmae\""),
                "relays.jsonl:1: unknown field",
            ),
            (
                format!(
                    "{}\n{}",
                    line("r1", "198.18.0.9:7443"),
                    line("r1", "198.18.0.9:7444")
                ),
                "relays.jsonl:2: relay \"r1\" is listed twice",
            ),
        ];
        for (text, want) in cases {
            let e = parse("relays.jsonl", &text).unwrap_err();
            assert!(e.starts_with(want), "{e}\n  wanted: {want}");
        }
    }

    #[test]
    fn an_empty_file_means_no_relays() {
        assert!(parse("r", "\n# none yet\n").unwrap().is_empty());
    }
}
