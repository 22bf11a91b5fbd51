//! `ztm-dns`: a stand-in for a company's internal DNS server (the split-DNS
//! resolver behind a subnet router in the end-to-end tests).
//!
//! ```text
//! ztm-dns ADDR:PORT SUFFIX IPV4
//! ```
//!
//! Answers every A query for a name under `SUFFIX` with `IPV4` (TTL 60),
//! other queries under it with no records, anything else with REFUSED.
//! Prints `listening ADDR` once bound (tests poll for it) and exits by
//! itself after `ZTM_DNS_MAX_SECS` (default 3600). Hand-rolled wire format:
//! one question, no compression in queries (what stub resolvers send).
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "a test helper binary, not product code"
)]

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// How long a bind is retried while its address is not assigned yet.
const BIND_WAIT: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, suffix, ip] = args.as_slice() else {
        eprintln!("usage: ztm-dns ADDR:PORT SUFFIX IPV4");
        return ExitCode::from(2);
    };
    let (Ok(addr), Ok(ip)) = (addr.parse::<SocketAddr>(), ip.parse::<Ipv4Addr>()) else {
        eprintln!("ztm-dns: bad address");
        return ExitCode::from(2);
    };
    let suffix = suffix.trim_end_matches('.').to_ascii_lowercase();
    let started = Instant::now();
    let sock = loop {
        match UdpSocket::bind(addr) {
            Ok(s) => break s,
            Err(e) if started.elapsed() < BIND_WAIT => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                eprintln!("ztm-dns: bind {addr}: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    println!("listening {addr}");
    let max = std::env::var("ZTM_DNS_MAX_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3600);
    let _ = sock.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 1500];
    while started.elapsed() < Duration::from_secs(max) {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        if let Some(reply) = answer(&buf[..n], &suffix, ip) {
            let _ = sock.send_to(&reply, from);
            println!("answered {from}");
        }
    }
    ExitCode::SUCCESS
}

/// The reply to `query`, or `None` for what is not a one-question query.
fn answer(query: &[u8], suffix: &str, ip: Ipv4Addr) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 || query[4..6] != [0, 1] {
        return None;
    }
    // The question: labels up to the root, then type and class.
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*query.get(i)?);
        i += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        labels.push(String::from_utf8_lossy(query.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*query.get(i)?, *query.get(i + 1)?]);
    let question_end = i + 4;
    let question = query.get(12..question_end)?;
    let name = labels.join(".");
    let inside = name == suffix || name.ends_with(&format!(".{suffix}"));
    let a = inside && qtype == 1;
    let mut out = Vec::with_capacity(question_end + 16);
    out.extend_from_slice(&query[0..2]);
    // QR, opcode 0, AA, RD copied; RA; RCODE NOERROR or REFUSED (5).
    let rd = query[2] & 0x01;
    out.push(0x84 | rd);
    out.push(if inside { 0x80 } else { 0x85 });
    out.extend_from_slice(&[0, 1, 0, u8::from(a), 0, 0, 0, 0]);
    out.extend_from_slice(question);
    if a {
        out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        out.extend_from_slice(&ip.octets());
    }
    Some(out)
}
