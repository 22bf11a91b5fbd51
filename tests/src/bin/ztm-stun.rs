//! `ztm-stun`: the STUN responder the end-to-end tests run on the "internet"
//! side of their NAT topologies (`ztmesh_proto::stun::binding_response`).
//!
//! ```text
//! ztm-stun ADDR:PORT...        one UDP socket per address; [V6]:PORT for IPv6
//! ```
//!
//! Prints `listening ADDR` per bound socket (tests poll for it), answers each
//! Binding request with the source address it came from, ignores everything
//! else, and exits by itself after `ZTM_STUN_MAX_SECS` (default 3600) so a
//! leaked responder cannot outlive a test run for long.
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "a test helper binary, not product code"
)]

use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ztmesh_proto::stun::binding_response;

/// How long a bind is retried while its address is not assigned yet.
const BIND_WAIT: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        eprintln!("usage: ztm-stun ADDR:PORT...");
        return ExitCode::from(2);
    }
    let max_secs: u64 = std::env::var("ZTM_STUN_MAX_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3600);
    let deadline = Instant::now() + Duration::from_secs(max_secs);
    let mut threads = Vec::new();
    for spec in &args {
        let addr: SocketAddr = match spec.parse() {
            Ok(a) => a,
            Err(e) => {
                eprintln!("ztm-stun: {spec:?} is not ADDR:PORT: {e}");
                return ExitCode::from(2);
            }
        };
        let sock = match bind(addr) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("ztm-stun: bind {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        println!("listening {addr}");
        threads.push(std::thread::spawn(move || serve(&sock, deadline)));
    }
    for t in threads {
        let _ = t.join();
    }
    ExitCode::SUCCESS
}

fn bind(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let start = Instant::now();
    loop {
        match UdpSocket::bind(addr) {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                if start.elapsed() > BIND_WAIT {
                    return Err(e);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

fn serve(sock: &UdpSocket, deadline: Instant) {
    let _ = sock.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        if let Some(resp) = binding_response(&buf[..n], from) {
            let _ = sock.send_to(&resp, from);
        }
    }
}
