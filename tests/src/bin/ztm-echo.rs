//! `ztm-echo`: the TCP echo server and client the end-to-end tests run inside
//! network namespaces.
//!
//! ```text
//! ztm-echo serve SPEC...                      SPEC = PORT | ADDR:PORT | [V6ADDR]:PORT
//! ztm-echo check ADDR PORT TIMEOUT_MS         one connection, payload must come back
//! ztm-echo connect ADDR PORT TIMEOUT_MS       a TCP connection is accepted (any server)
//! ztm-echo stream ADDR PORT COUNT INTERVAL_MS TIMEOUT_MS
//!                                             one connection, COUNT round trips
//! ztm-echo bulk ADDR PORT BYTES TIMEOUT_MS    one connection: send BYTES (at most
//!                                             32 MiB) while reading the echo back;
//!                                             every byte must return, in order
//! ztm-echo scan ADDR FIRST LAST TIMEOUT_MS    a TCP connect scan of ports FIRST..=LAST
//!                                             (at most 1024), 32 at a time; prints
//!                                             `open N closed N filtered N`
//! ztm-echo flood ADDR PORT COUNT TIMEOUT_MS   UDP: COUNT junk WireGuard data messages
//!                                             (at most 100,000,000; UDP GSO, 64 per
//!                                             send) as fast as the socket takes
//!                                             them, stopping at TIMEOUT_MS;
//!                                             prints `sent N`
//! ```
//!
//! `serve` retries a bind for a few seconds while its address is not (yet)
//! assigned, which happens while a TUN device comes up or IPv6 DAD runs; it
//! prints `listening ADDR` per bound listener (tests poll for it) and
//! exits by itself after `ZTM_ECHO_MAX_SECS` (default 3600) so that a leaked
//! server cannot outlive a test run for long. `check` and `stream` exit 0 on
//! success and print a one-line reason on stderr and exit 1 otherwise.
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "a test helper binary, not product code"
)]

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Idle time after which the server drops a connection.
const CONN_IDLE: Duration = Duration::from_secs(30);
/// Most bytes echoed on one connection.
const CONN_MAX_BYTES: u64 = 64 << 20;
/// Payload size of `check`.
const CHECK_BYTES: usize = 1200;
/// Most bytes `bulk` sends (the server echoes at most [`CONN_MAX_BYTES`]).
const BULK_MAX_BYTES: u64 = 32 << 20;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") if args.len() >= 2 => serve(&args[1..]),
        Some("check") if args.len() == 4 => check(&args[1], &args[2], &args[3]),
        Some("connect") if args.len() == 4 => connect_only(&args[1], &args[2], &args[3]),
        Some("stream") if args.len() == 6 => {
            stream(&args[1], &args[2], &args[3], &args[4], &args[5])
        }
        Some("bulk") if args.len() == 5 => bulk(&args[1], &args[2], &args[3], &args[4]),
        Some("scan") if args.len() == 5 => scan(&args[1], &args[2], &args[3], &args[4]),
        Some("flood") if args.len() == 5 => flood(&args[1], &args[2], &args[3], &args[4]),
        _ => Err(usage()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> String {
    "usage: ztm-echo serve SPEC... | check ADDR PORT TIMEOUT_MS | \
     connect ADDR PORT TIMEOUT_MS | \
     stream ADDR PORT COUNT INTERVAL_MS TIMEOUT_MS | \
     bulk ADDR PORT BYTES TIMEOUT_MS | scan ADDR FIRST LAST TIMEOUT_MS | \
     flood ADDR PORT COUNT TIMEOUT_MS"
        .to_owned()
}

fn serve(specs: &[String]) -> Result<(), String> {
    let max_secs: u64 = std::env::var("ZTM_ECHO_MAX_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3600);
    let mut listeners = Vec::new();
    for spec in specs {
        let addr = parse_listen(spec)?;
        listeners.push(bind_retrying(addr)?);
    }
    let mut out = io::stdout();
    for l in &listeners {
        let addr = l.local_addr().map_err(|e| e.to_string())?;
        writeln!(out, "listening {addr}").map_err(|e| e.to_string())?;
    }
    out.flush().map_err(|e| e.to_string())?;
    for l in listeners {
        std::thread::spawn(move || accept_loop(l));
    }
    std::thread::sleep(Duration::from_secs(max_secs));
    Err(format!("exiting after ZTM_ECHO_MAX_SECS={max_secs}"))
}

/// Binds `addr`, retrying while the address is not assigned yet (bounded).
fn bind_retrying(addr: SocketAddr) -> Result<TcpListener, String> {
    const ATTEMPTS: u32 = 100;
    let mut last = None;
    for _ in 0..ATTEMPTS {
        match TcpListener::bind(addr) {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => {
                last = Some(e);
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(format!("bind {addr}: {e}")),
        }
    }
    Err(format!(
        "bind {addr}: {} (after {ATTEMPTS} attempts)",
        last.expect("loop ran")
    ))
}

fn accept_loop(listener: TcpListener) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                std::thread::spawn(move || {
                    if let Err(e) = echo_conn(stream) {
                        eprintln!("connection: {e}");
                    }
                });
            }
            Err(e) => eprintln!("accept: {e}"),
        }
    }
}

fn echo_conn(mut stream: TcpStream) -> io::Result<()> {
    let peer = stream.peer_addr()?;
    stream.set_read_timeout(Some(CONN_IDLE))?;
    stream.set_write_timeout(Some(CONN_IDLE))?;
    let mut reader = stream.try_clone()?.take(CONN_MAX_BYTES);
    let n = io::copy(&mut reader, &mut stream)?;
    println!("echoed {n} bytes to {peer}");
    Ok(())
}

fn parse_listen(spec: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = spec.parse::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port));
    }
    spec.parse()
        .map_err(|e| format!("bad listen spec {spec:?} (PORT, ADDR:PORT or [V6]:PORT): {e}"))
}

fn target(addr: &str, port: &str) -> Result<SocketAddr, String> {
    let ip: IpAddr = addr
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|e| format!("bad address {addr:?}: {e}"))?;
    let port: u16 = port
        .parse()
        .map_err(|e| format!("bad port {port:?}: {e}"))?;
    Ok(SocketAddr::new(ip, port))
}

fn millis(v: &str) -> Result<Duration, String> {
    v.parse()
        .map(Duration::from_millis)
        .map_err(|e| format!("bad milliseconds {v:?}: {e}"))
}

fn connect(to: SocketAddr, timeout: Duration) -> Result<TcpStream, String> {
    let stream =
        TcpStream::connect_timeout(&to, timeout).map_err(|e| format!("connect {to}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("set timeouts: {e}"))?;
    Ok(stream)
}

/// A payload no other process produces, so a reply cannot come from elsewhere.
fn payload(len: usize, round: u64) -> Vec<u8> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let line = format!(
        "ztm-echo pid={} t={nanos} round={round}\n",
        std::process::id()
    );
    line.bytes().cycle().take(len.max(line.len())).collect()
}

fn check(addr: &str, port: &str, timeout_ms: &str) -> Result<(), String> {
    let to = target(addr, port)?;
    let timeout = millis(timeout_ms)?;
    let start = Instant::now();
    let mut stream = connect(to, timeout)?;
    let sent = payload(CHECK_BYTES, 0);
    stream
        .write_all(&sent)
        .map_err(|e| format!("send to {to}: {e}"))?;
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown to {to}: {e}"))?;
    let mut got = Vec::with_capacity(sent.len());
    stream
        .take(sent.len() as u64 + 1)
        .read_to_end(&mut got)
        .map_err(|e| {
            format!(
                "receive from {to}: {e} (got {} of {} bytes)",
                got.len(),
                sent.len()
            )
        })?;
    if got != sent {
        return Err(format!(
            "reply from {to} differs: sent {} bytes, got {}",
            sent.len(),
            got.len()
        ));
    }
    println!("ok {to} rtt_ms={}", start.elapsed().as_millis());
    Ok(())
}

fn connect_only(addr: &str, port: &str, timeout_ms: &str) -> Result<(), String> {
    let to = target(addr, port)?;
    let timeout = millis(timeout_ms)?;
    connect(to, timeout)?;
    println!("ok {to}");
    Ok(())
}

/// Ports a scan tries at once.
const SCAN_PARALLEL: usize = 32;
/// Most ports one scan tries.
const SCAN_MAX_PORTS: usize = 1024;

fn scan(addr: &str, first: &str, last: &str, timeout_ms: &str) -> Result<(), String> {
    let port = |s: &str| s.parse::<u16>().map_err(|e| format!("bad port {s:?}: {e}"));
    let (first, last) = (port(first)?, port(last)?);
    let timeout = millis(timeout_ms)?;
    let ports: Vec<u16> = (first..=last).collect();
    if ports.is_empty() || ports.len() > SCAN_MAX_PORTS {
        return Err(format!("scan 1 to {SCAN_MAX_PORTS} ports"));
    }
    let mut counts = [0usize; 3];
    for chunk in ports.chunks(SCAN_PARALLEL) {
        let probes: Vec<_> = chunk
            .iter()
            .map(|&p| {
                let to = target(addr, &p.to_string());
                std::thread::spawn(move || {
                    match to.and_then(|to| {
                        TcpStream::connect_timeout(&to, timeout).map_err(|e| e.to_string())
                    }) {
                        Ok(_) => 0,
                        Err(e) if e.contains("refused") => 1,
                        Err(_) => 2,
                    }
                })
            })
            .collect();
        for p in probes {
            counts[p.join().unwrap_or(2)] += 1;
        }
    }
    println!(
        "open {} closed {} filtered {}",
        counts[0], counts[1], counts[2]
    );
    Ok(())
}

/// Most datagrams one flood sends.
const FLOOD_MAX: u64 = 100_000_000;

/// Junk at a WireGuard port: data messages (type 4) under receiver indexes
/// no session has, so a receiver must read and reject each one. Sent with
/// UDP GSO (64 datagrams per syscall) where the kernel has it, so one sender
/// outruns a receiver that handles each datagram.
fn flood(addr: &str, port: &str, count: &str, timeout_ms: &str) -> Result<(), String> {
    const SIZE: usize = 96;
    const SEGMENTS: usize = 64;
    let to = target(addr, port)?;
    let count: u64 = count
        .parse()
        .map_err(|e| format!("bad count {count:?}: {e}"))?;
    if count == 0 || count > FLOOD_MAX {
        return Err(format!("flood 1 to {FLOOD_MAX} datagrams"));
    }
    let deadline = Instant::now() + millis(timeout_ms)?;
    let bind = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let sock = std::net::UdpSocket::bind(bind).map_err(|e| format!("bind: {e}"))?;
    let per_send = if set_udp_segment(&sock, SIZE) {
        SEGMENTS
    } else {
        1
    };
    let mut buf = vec![0u8; SIZE * per_send];
    let mut sent = 0u64;
    while sent < count && Instant::now() < deadline {
        let n = per_send.min(usize::try_from(count - sent).unwrap_or(per_send));
        for (i, msg) in buf.chunks_mut(SIZE).take(n).enumerate() {
            // A different receiver index and counter each time.
            let id = sent + i as u64;
            msg[0] = 4;
            msg[4..12].copy_from_slice(&id.to_le_bytes());
            msg[12..20].copy_from_slice(&id.to_be_bytes());
        }
        match sock.send_to(&buf[..n * SIZE], to) {
            Ok(_) => sent += n as u64,
            // ICMP from an earlier datagram, or a full buffer: keep going.
            Err(_) => std::thread::sleep(Duration::from_micros(100)),
        }
    }
    println!("sent {sent}");
    Ok(())
}

/// `UDP_SEGMENT` (GSO): the kernel cuts each send into `size`-byte datagrams.
fn set_udp_segment(sock: &std::net::UdpSocket, size: usize) -> bool {
    use std::os::fd::AsRawFd as _;
    let value = libc::c_int::try_from(size).unwrap_or(0);
    // SAFETY: a valid socket descriptor, and a pointer to a c_int with its size.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    r == 0
}

fn stream(
    addr: &str,
    port: &str,
    count: &str,
    interval_ms: &str,
    timeout_ms: &str,
) -> Result<(), String> {
    let to = target(addr, port)?;
    let count: u64 = count
        .parse()
        .map_err(|e| format!("bad count {count:?}: {e}"))?;
    let interval = millis(interval_ms)?;
    let timeout = millis(timeout_ms)?;
    let mut stream = connect(to, timeout)?;
    let mut got = vec![0u8; 64];
    for round in 0..count {
        let sent = payload(64, round);
        got.resize(sent.len(), 0);
        stream
            .write_all(&sent)
            .and_then(|()| stream.read_exact(&mut got))
            .map_err(|e| format!("round {round} with {to}: {e}"))?;
        if got != sent {
            return Err(format!("round {round} with {to}: reply differs"));
        }
        println!("round {round} ok");
        std::thread::sleep(interval);
    }
    println!("ok {to} rounds={count}");
    Ok(())
}

/// Sends `bytes` bytes of a per-run pattern on one connection from a writer
/// thread while this thread reads the echo and compares it byte for byte.
/// `timeout_ms` bounds every read and write and the whole transfer.
fn bulk(addr: &str, port: &str, bytes: &str, timeout_ms: &str) -> Result<(), String> {
    let to = target(addr, port)?;
    let total: u64 = bytes
        .parse()
        .map_err(|e| format!("bad byte count {bytes:?}: {e}"))?;
    if total > BULK_MAX_BYTES {
        return Err(format!("at most {BULK_MAX_BYTES} bytes"));
    }
    let timeout = millis(timeout_ms)?;
    let start = Instant::now();
    let stream = connect(to, timeout)?;
    let pattern = payload(64 * 1024, 0);
    let mut writer = stream
        .try_clone()
        .map_err(|e| format!("clone socket: {e}"))?;
    let chunks = pattern.clone();
    let send = std::thread::spawn(move || -> Result<(), String> {
        let mut left = total;
        while left > 0 {
            let n = left.min(chunks.len() as u64) as usize;
            writer
                .write_all(&chunks[..n])
                .map_err(|e| format!("send: {e} ({} of {total} bytes sent)", total - left))?;
            left -= n as u64;
        }
        writer
            .shutdown(Shutdown::Write)
            .map_err(|e| format!("shutdown: {e}"))
    });
    let mut reader = stream.take(total + 1);
    let mut buf = vec![0u8; 64 * 1024];
    let mut got: u64 = 0;
    let result = loop {
        if start.elapsed() > timeout {
            break Err(format!(
                "bulk with {to}: {got} of {total} bytes back after {timeout:?}"
            ));
        }
        match reader.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                for (i, b) in buf[..n].iter().enumerate() {
                    let at = got + i as u64;
                    if *b != pattern[(at % pattern.len() as u64) as usize] {
                        return Err(format!("bulk with {to}: byte {at} differs"));
                    }
                }
                got += n as u64;
            }
            Err(e) => {
                break Err(format!(
                    "receive from {to}: {e} ({got} of {total} bytes back)"
                ))
            }
        }
    };
    let sent = send
        .join()
        .unwrap_or_else(|_| Err("the sender panicked".to_owned()));
    result?;
    sent?;
    if got != total {
        return Err(format!(
            "bulk with {to}: sent {total} bytes, {got} came back"
        ));
    }
    let ms = start.elapsed().as_millis();
    println!("ok {to} bytes={got} ms={ms}");
    Ok(())
}
