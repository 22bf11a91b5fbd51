//! `ztm-webhook`: the alert receiver the respond end-to-end test runs in the
//! controller's namespace.
//!
//! ```text
//! ztm-webhook LISTEN OUT_FILE      e.g. 127.0.0.1:9099 /tmp/x/alerts.jsonl
//! ```
//!
//! Accepts HTTP/1.1 requests one at a time (head ≤ 16 KiB, body ≤ 1 MiB,
//! 5 s per request), appends each as one JSON line
//! `{"method","path","headers":{lowercase name: value},"body"}` to OUT_FILE,
//! answers `200 OK`, and exits after `ZTM_WEBHOOK_MAX_SECS` (default 600)
//! or 1,000 requests. Prints `listening ADDR` once bound. Verifying the
//! signature is the test's job.
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "a test helper binary, not product code"
)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const MAX_HEAD: usize = 16 << 10;
const MAX_BODY: usize = 1 << 20;
const MAX_REQUESTS: usize = 1_000;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, out] = args.as_slice() else {
        eprintln!("usage: ztm-webhook LISTEN OUT_FILE");
        return ExitCode::FAILURE;
    };
    let max_secs: u64 = std::env::var("ZTM_WEBHOOK_MAX_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let listener = match TcpListener::bind(listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bind {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("listening {listen}");
    let deadline = Instant::now() + Duration::from_secs(max_secs);
    listener.set_nonblocking(true).ok();
    let mut served = 0;
    while Instant::now() < deadline && served < MAX_REQUESTS {
        let conn = match listener.accept() {
            Ok((c, _)) => c,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        served += 1;
        conn.set_nonblocking(false).ok();
        conn.set_read_timeout(Some(Duration::from_secs(5))).ok();
        match handle(conn, out) {
            Ok(()) => {}
            Err(e) => eprintln!("request {served}: {e}"),
        }
    }
    ExitCode::SUCCESS
}

fn handle(conn: std::net::TcpStream, out: &str) -> Result<(), String> {
    let mut writer = conn.try_clone().map_err(|e| e.to_string())?;
    let mut r = BufReader::new(conn);
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        let n = r.read_line(&mut line).map_err(|e| e.to_string())?;
        if n == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if head.iter().map(String::len).sum::<usize>() + n > MAX_HEAD {
            return Err("head too large".into());
        }
        head.push(line.trim_end().to_owned());
    }
    let mut lines = head.iter();
    let request = lines.next().ok_or("no request line")?;
    let mut parts = request.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut headers = serde_json::Map::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().into());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.as_str())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if len > MAX_BODY {
        return Err("body too large".into());
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|e| e.to_string())?;
    let record = serde_json::json!({
        "method": method,
        "path": path,
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    });
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)
        .map_err(|e| format!("{out}: {e}"))?;
    writeln!(f, "{record}").map_err(|e| e.to_string())?;
    writer
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        .map_err(|e| e.to_string())
}
