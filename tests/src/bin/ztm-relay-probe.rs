//! `ztm-relay-probe`: connects to a relay as a node would, to show what the
//! relay refuses (tests/tests/relay_paths.rs).
//!
//! ```text
//! ztm-relay-probe MAP_FILE quic|tcp [--key FILE] [--send PEER_ID COUNT] [--wait-ms MS]
//! ```
//!
//! `MAP_FILE` is a node's `netmap.bin` (a `SignedNetMap`); the relay to try
//! is the first one the map lists. The `HELLO` proof is signed with the
//! machine key in `--key FILE` (a node's `machine.key`, read, never written)
//! or, without it, with a freshly generated key: an attacker who copied the
//! map but not the key. After a `WELCOME` the probe sends `COUNT` 148-byte
//! datagrams (shaped like WireGuard handshake initiations) to `PEER_ID`,
//! 20 ms apart, then listens `--wait-ms` (default 1000) for anything back.
//!
//! Prints `REFUSED <reason>` and exits 2 when the relay refuses the
//! `HELLO`; otherwise prints `WELCOME <node id>`, `SENT <n>`, `RECEIVED <n>`
//! and, if the session ended, `CLOSED <reason>`, and exits 0. Exits 1 on any
//! other failure (no connection, bad arguments). Bounded: 10 s to connect,
//! COUNT at most 1000, MS at most 30000.
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "a test helper binary, not product code"
)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use prost::Message;
use ztmesh_proto::control::{NetMap, SignedNetMap};
use ztmesh_proto::keys::SigningKey;
use ztmesh_relay::client::{ClientError, RelayClient, Target, Transport};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_COUNT: u32 = 1000;
const MAX_WAIT_MS: u64 = 30_000;

struct Args {
    map: PathBuf,
    transport: Transport,
    key: Option<PathBuf>,
    send: Option<(u64, u32)>,
    wait: Duration,
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1).collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}\nusage: ztm-relay-probe MAP_FILE quic|tcp [--key FILE] [--send PEER_ID COUNT] [--wait-ms MS]");
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokio: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn parse(args: Vec<String>) -> Result<Args, String> {
    let mut it = args.into_iter();
    let map = PathBuf::from(it.next().ok_or("missing MAP_FILE")?);
    let transport = match it.next().as_deref() {
        Some("quic") => Transport::Quic,
        Some("tcp") => Transport::Tcp,
        other => return Err(format!("transport must be quic or tcp, not {other:?}")),
    };
    let mut out = Args {
        map,
        transport,
        key: None,
        send: None,
        wait: Duration::from_millis(1000),
    };
    while let Some(flag) = it.next() {
        let mut value = |what: &str| it.next().ok_or(format!("{flag} needs {what}"));
        match flag.as_str() {
            "--key" => out.key = Some(PathBuf::from(value("FILE")?)),
            "--send" => {
                let peer = value("PEER_ID")?
                    .parse()
                    .map_err(|e| format!("PEER_ID: {e}"))?;
                let count: u32 = value("COUNT")?.parse().map_err(|e| format!("COUNT: {e}"))?;
                out.send = Some((peer, count.min(MAX_COUNT)));
            }
            "--wait-ms" => {
                let ms: u64 = value("MS")?.parse().map_err(|e| format!("MS: {e}"))?;
                out.wait = Duration::from_millis(ms.min(MAX_WAIT_MS));
            }
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    Ok(out)
}

async fn run(args: Args) -> Result<ExitCode, String> {
    let signed = read_map(&args.map)?;
    let map = NetMap::decode(signed.netmap.as_slice())
        .map_err(|e| format!("{}: not a netmap: {e}", args.map.display()))?;
    let relay = map
        .relays
        .first()
        .ok_or_else(|| format!("{}: the map lists no relay", args.map.display()))?;
    let target = Target::from_relay(relay, args.transport).map_err(|e| e.to_string())?;
    let key = match &args.key {
        Some(path) => load_key(path)?,
        None => SigningKey::generate(&mut rand_core::OsRng),
    };
    let mut client = match RelayClient::connect(&target, &key, &signed, CONNECT_TIMEOUT).await {
        Ok(c) => c,
        Err(ClientError::Refused(reason)) => {
            println!("REFUSED {reason}");
            return Ok(ExitCode::from(2));
        }
        Err(e) => return Err(e.to_string()),
    };
    println!("WELCOME {}", client.node_id());
    let mut sent = 0u32;
    let mut closed = None;
    if let Some((peer, count)) = args.send {
        let datagram = fake_initiation();
        for _ in 0..count {
            if let Err(e) = client.send(peer, &datagram).await {
                closed = Some(e.to_string());
                break;
            }
            sent += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    println!("SENT {sent}");
    let mut received = 0u32;
    if closed.is_none() {
        let deadline = tokio::time::Instant::now() + args.wait;
        loop {
            match tokio::time::timeout_at(deadline, client.recv()).await {
                Err(_) => break,
                Ok(Ok((peer, d))) => {
                    received += 1;
                    println!("FROM {peer} {} bytes", d.len());
                }
                Ok(Err(e)) => {
                    closed = Some(e.to_string());
                    break;
                }
            }
        }
    }
    println!("RECEIVED {received}");
    if let Some(reason) = closed {
        println!("CLOSED {reason}");
    }
    client.close().await;
    Ok(ExitCode::SUCCESS)
}

fn read_map(path: &Path) -> Result<SignedNetMap, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    SignedNetMap::decode(bytes.as_slice())
        .map_err(|e| format!("{}: not a signed netmap: {e}", path.display()))
}

/// Reads a `machine.key` without ever creating one.
fn load_key(path: &Path) -> Result<SigningKey, String> {
    if !path.is_file() {
        return Err(format!("{}: no such key file", path.display()));
    }
    SigningKey::load_or_generate(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// 148 bytes shaped like a WireGuard handshake initiation (type 1, three
/// zero bytes); the relay forwards opaque datagrams, so the rest is filler.
fn fake_initiation() -> Vec<u8> {
    let mut d = vec![0x5a; 148];
    d[..4].copy_from_slice(&[1, 0, 0, 0]);
    d
}
