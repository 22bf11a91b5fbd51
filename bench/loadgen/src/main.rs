//! `ztmesh-loadgen`: control-plane load generator (a benchmark tool, not a test).
//!
//! Runs the real `ztmesh-controller serve` binary as a child process on
//! 127.0.0.1, enrolls N simulated nodes for real (fresh ed25519 machine keys,
//! `Enroll` with proofs, one reusable tagged auth key per group) and keeps one
//! authenticated `StreamNetMap` per node open, verifying the signature, serial
//! and expiry of every map it receives. Nodes are tokio tasks multiplexed over
//! a few TLS connections (`--per-channel` streams per HTTP/2 connection).
//!
//! It measures:
//! - **propagation**: from the admin `SetPolicy` call to each node holding a
//!   map that reflects the new policy (p50/p99/max over nodes, for each of
//!   `--changes` policy changes); every node is affected by every change;
//! - **reconnect storm**: SIGKILL the controller, start it again on the same
//!   data dir and port, time until every node holds a map from the new process
//!   (nodes reconnect with the agent's jittered backoff, 250 ms base);
//! - **memory**: the controller's VmRSS fresh (0 nodes), with N nodes enrolled,
//!   with N connected, and with N reconnected after the restart;
//! - **bytes**: netmap message bytes received, and per updated node for the
//!   one-node join, with `--deltas` (nodes apply deltas as the agent does)
//!   or full maps only;
//! - with `--all-to-all`, the same in one group where every node reaches
//!   every other (`*`);
//! - with `--two-controllers` (PostgreSQL): propagation to the nodes on each
//!   of two controllers, the policy set on the first.
//!
//! Policy shape: nodes are split into groups of `--group-size` (one tag each);
//! policy version k lets every group reach itself on ports 22 and 9000+k, so
//! each node has `group-size - 1` peers and every change touches every node.
//!
//! Every phase has a deadline (`--phase-timeout`); on a timeout or any
//! verification failure it prints why and exits non-zero. The data dir is a
//! fresh temporary directory, removed at the end unless `--keep`.
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "a load generator measures on the real clock and makes real keys"
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod shape;

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use prost::Message;
use rand_core::{OsRng, RngCore};
use tokio::task::JoinSet;
use tonic::transport::Channel;
use ztmesh_controller::cli::{self, ConnArgs};
use ztmesh_controller::now_ms;
use ztmesh_controller::server::{self, DataDir};
use ztmesh_proto::admin as apb;
use ztmesh_proto::auth::{self, methods, signed_request};
use ztmesh_proto::control::{self as pb, control_client::ControlClient};
use ztmesh_proto::keys::{PublicKey, SigningKey, Verifier, WgPrivateKey};
use ztmesh_proto::{delta, netmap};

/// First port of the marker range: policy version k allows port `MARKER_BASE + k`.
const MARKER_BASE: u32 = 9000;

#[derive(Parser, Debug)]
#[command(
    name = "ztmesh-loadgen",
    about = "ztmesh control-plane load generator (127.0.0.1 only)"
)]
struct Args {
    /// Number of simulated nodes.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Nodes per tag group (each node gets group-size - 1 peers).
    #[arg(long, default_value_t = 100)]
    group_size: usize,
    /// Policy changes to time (at least 1).
    #[arg(long, default_value_t = 3)]
    changes: u32,
    /// Netmap streams per TLS connection.
    #[arg(long, default_value_t = 100)]
    per_channel: usize,
    /// Concurrent enrollments in flight.
    #[arg(long, default_value_t = 32)]
    enroll_concurrency: usize,
    /// Deadline of each phase, in seconds.
    #[arg(long, default_value_t = 180)]
    phase_timeout: u64,
    /// Tokio worker threads of the generator.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// The controller binary (default: `ztmesh-controller` next to this one).
    #[arg(long)]
    controller_bin: Option<PathBuf>,
    /// Skip the reconnect storm.
    #[arg(long)]
    no_restart: bool,
    /// Keep the data dir and the controller log.
    #[arg(long)]
    keep: bool,
    /// Print one JSON object with all results on the last line.
    #[arg(long)]
    json: bool,
    /// Nodes take netmap deltas (as the agent does) instead of full maps only.
    #[arg(long)]
    deltas: bool,
    /// A second controller on the same PostgreSQL database (`ZTMESH_DATABASE`,
    /// required) serves every other TLS connection; policy changes are made
    /// on the first, and propagation is reported for the nodes on each.
    /// No reconnect storm.
    #[arg(long)]
    two_controllers: bool,
    /// Every node may reach every other (`"src": ["*"]`, one group of all
    /// nodes; `--group-size` is ignored): the mesh where a full map per
    /// change costs the most.
    #[arg(long)]
    all_to_all: bool,
}

fn main() -> std::process::ExitCode {
    let mut args = Args::parse();
    if args.all_to_all {
        args.group_size = args.nodes;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

// ---- the controller child process ------------------------------------------

/// The controller process; SIGKILLed on drop.
struct Controller {
    child: Child,
    started: Instant,
}

impl Controller {
    fn spawn(bin: &Path, dir: &Path, port: u16, log: &Path) -> anyhow::Result<Self> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let child = Command::new(bin)
            .arg("--data-dir")
            .arg(dir)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            // Simulated nodes share a few connections from one address; real
            // nodes use one connection each with at most 3 streams.
            .args(["--max-streams-per-connection", "100000"])
            .args(["--max-connections-per-source", "100000"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self {
            child,
            started: Instant::now(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// VmRSS in KiB.
    fn rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| anyhow!("no VmRSS in /proc/{}/status", self.pid()))
    }

    /// User + system CPU time in seconds.
    fn cpu_secs(&self) -> f64 {
        proc_cpu_secs(&format!("/proc/{}/stat", self.pid())).unwrap_or(0.0)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill();
    }
}

fn proc_cpu_secs(stat_path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn conn_args(dir: &Path) -> ConnArgs {
    ConnArgs {
        data_dir: dir.to_path_buf(),
        server: None,
        api_key: None,
        fingerprint: None,
    }
}

/// Polls the admin socket until the controller answers.
async fn wait_ready(dir: &Path, ctl: &mut Controller, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(mut c) = cli::connect(&conn_args(dir)).await {
            if c.list_users(apb::ListUsersRequest {}).await.is_ok() {
                return Ok(());
            }
        }
        if let Ok(Some(st)) = ctl.child.try_wait() {
            bail!("controller exited during start-up ({st}); see its log");
        }
        if Instant::now() > deadline {
            bail!("controller did not answer on its admin socket within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

// ---- policy -------------------------------------------------------------------

fn policy(all_to_all: bool, groups: usize, version: u32) -> String {
    if all_to_all {
        // The tag stays owned: the auth keys are tagged.
        return format!(
            r#"{{"tagOwners": {{"tag:lg0": []}},
"acls": [{{"action": "accept", "src": ["*"], "dst": ["*:22,{}"]}}]}}"#,
            MARKER_BASE + version
        );
    }
    shape::policy(groups, MARKER_BASE + version)
}

/// The policy version a map reflects: the marker port in its inbound rules.
fn marker<'a>(ports: impl Iterator<Item = &'a pb::PortRange>) -> u32 {
    ports
        .filter(|p| p.first == p.last && p.first > MARKER_BASE && p.first < MARKER_BASE + 1000)
        .map(|p| p.first - MARKER_BASE)
        .max()
        .unwrap_or(0)
}

/// What the generator records of a map a simulated node accepted.
struct Seen {
    serial: u64,
    /// The policy version ([`marker`]).
    version: u32,
    peers: u32,
}

impl Seen {
    fn of(map: &pb::NetMap) -> Seen {
        Seen {
            serial: map.serial,
            version: marker(map.inbound_rules.iter().flat_map(|r| r.ports.iter())),
            peers: map.peers.len() as u32,
        }
    }
}

/// An inbound rule's ports, decoded without its prefixes (prost skips the
/// other fields).
#[derive(Clone, PartialEq, prost::Message)]
struct RulePorts {
    #[prost(message, repeated, tag = "3")]
    ports: Vec<pb::PortRange>,
}

/// A full map as a node that does not take deltas checks it: the
/// controller's signature over the bytes (strict ed25519, as
/// [`netmap::verify`]), then a newer serial and the expiry, read in place.
/// The peers are counted, not decoded: decoding 10,000 maps' peers into
/// structs is the simulated nodes' own work, which real nodes do on their
/// own CPUs, and here it would take the controller's cores.
fn check_full(
    controller: &Verifier,
    signed: &pb::SignedNetMap,
    have: u64,
    now: i64,
) -> Result<Seen, String> {
    if !netmap::signature_valid(controller, signed) {
        return Err("bad signature".into());
    }
    let malformed = |e: prost::DecodeError| format!("malformed map: {e}");
    let mut buf = signed.netmap.as_slice();
    let (mut serial, mut not_after, mut peers, mut ports) = (0u64, 0i64, 0u32, Vec::new());
    while !buf.is_empty() {
        let key = prost::encoding::decode_varint(&mut buf).map_err(malformed)?;
        let (tag, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                let v = prost::encoding::decode_varint(&mut buf).map_err(malformed)?;
                match tag {
                    1 => serial = v,
                    3 => not_after = v as i64,
                    _ => {}
                }
            }
            2 => {
                let len = prost::encoding::decode_varint(&mut buf).map_err(malformed)?;
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                if len > buf.len() {
                    return Err("malformed map: truncated field".into());
                }
                let (field, rest) = buf.split_at(len);
                match tag {
                    5 => peers += 1,
                    6 => ports.extend(RulePorts::decode(field).map_err(malformed)?.ports),
                    _ => {}
                }
                buf = rest;
            }
            1 if buf.len() >= 8 => buf = &buf[8..],
            5 if buf.len() >= 4 => buf = &buf[4..],
            _ => return Err(format!("malformed map: wire type {wire}")),
        }
    }
    if serial <= have {
        return Err(format!("serial {serial} not above {have}"));
    }
    if not_after <= now {
        return Err(format!("expired at {not_after} (now {now})"));
    }
    Ok(Seen {
        serial,
        version: marker(ports.iter()),
        peers,
    })
}

// ---- simulated nodes -----------------------------------------------------------

struct SimNode {
    machine: SigningKey,
}

/// What the generator observes per node; written by the node's task.
#[derive(Default)]
struct Slot {
    /// Policy version of the newest map held.
    version: AtomicU32,
    /// When that version arrived (ns since `Shared::base`).
    version_at_ns: AtomicU64,
    /// Controller generation of the stream the newest map came on.
    generation: AtomicU64,
    /// When the first map of that generation arrived (ns since base).
    generation_at_ns: AtomicU64,
    /// Peers in the newest map, and when that count last changed.
    peers: AtomicU32,
    peers_at_ns: AtomicU64,
    maps: AtomicU64,
}

struct Shared {
    base: Instant,
    controller_key: PublicKey,
    /// The same key, decompressed once.
    verifier: Verifier,
    /// Incremented after the controller is killed, so streams opened later
    /// are known to belong to the new process.
    generation: AtomicU64,
    slots: Vec<Slot>,
    verify_failures: AtomicU64,
    stream_attempts: AtomicU64,
    /// The nodes take deltas.
    deltas: bool,
    /// Netmap message bytes received (full maps and deltas).
    bytes: AtomicU64,
    deltas_received: AtomicU64,
    /// What node 0's last delta held, for the join report.
    last_delta: std::sync::Mutex<String>,
    first_failure: std::sync::Mutex<Option<String>>,
}

impl Shared {
    fn ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    fn fail(&self, why: String) {
        self.verify_failures.fetch_add(1, Ordering::Relaxed);
        let mut f = self.first_failure.lock().unwrap_or_else(|p| p.into_inner());
        f.get_or_insert(why);
    }
}

/// The agent's reconnect schedule (node/src/control.rs `Backoff`): full jitter,
/// half fixed, over a cap doubling from 250 ms to 15 s.
fn backoff(attempt: u32) -> Duration {
    let cap_ms = (250u64 << attempt.min(16)).min(15_000);
    Duration::from_millis(cap_ms / 2 + OsRng.next_u64() % (cap_ms / 2 + 1))
}

/// One node's control loop: stream, verify every map, reconnect with backoff.
async fn node_task(idx: usize, node: Arc<SimNode>, ch: Channel, shared: Arc<Shared>) {
    let mut have: u64 = 0;
    let mut attempt: u32 = 0;
    let slot = &shared.slots[idx];
    // Bounded: the generator aborts this task at the end of the run; the cap
    // only stops a runaway loop (15 s backoff × 10,000 > any phase deadline).
    for _ in 0..10_000 {
        shared.stream_attempts.fetch_add(1, Ordering::Relaxed);
        let req = signed_request(
            &node.machine,
            methods::STREAM_NETMAP,
            pb::StreamNetMapRequest {
                have_serial: have,
                accept_deltas: shared.deltas,
            },
            now_ms(),
            &mut OsRng,
        );
        if let Ok(resp) = ControlClient::new(ch.clone())
            .max_decoding_message_size(64 << 20)
            .stream_net_map(req)
            .await
        {
            let generation = shared.generation.load(Ordering::Acquire);
            let mut stream = resp.into_inner();
            let mut first = true;
            // The map a delta applies to: the last one of this stream.
            let mut held: Option<pb::NetMap> = None;
            while let Ok(Some(signed)) = stream.message().await {
                // When the node has the map: before its checks, which a
                // real node runs on its own CPU (the figure counts only
                // maps that pass them).
                let arrived = shared.ns();
                attempt = 0;
                shared
                    .bytes
                    .fetch_add(signed.encoded_len() as u64, Ordering::Relaxed);
                let checked = match (&signed.delta, &held) {
                    (Some(d), Some(base)) => {
                        shared.deltas_received.fetch_add(1, Ordering::Relaxed);
                        if idx == 0 {
                            *shared.last_delta.lock().unwrap_or_else(|p| p.into_inner()) =
                                delta_shape(d);
                        }
                        delta::apply(&shared.controller_key, base, d, now_ms())
                            .map(|(m, _)| (Seen::of(&m), Some(m)))
                            .map_err(|e| e.to_string())
                    }
                    (Some(_), None) => Err("a delta as the first map of a stream".to_string()),
                    (None, _) if shared.deltas => {
                        netmap::verify(&shared.controller_key, &signed, have, now_ms())
                            .map(|m| (Seen::of(&m), Some(m)))
                            .map_err(|e| e.to_string())
                    }
                    (None, _) => check_full(&shared.verifier, &signed, have, now_ms())
                        .map(|seen| (seen, None)),
                };
                match checked {
                    Ok((seen, map)) => {
                        have = seen.serial;
                        let now = arrived;
                        let v = seen.version;
                        if slot.version.load(Ordering::Relaxed) != v {
                            slot.version_at_ns.store(now, Ordering::Relaxed);
                            slot.version.store(v, Ordering::Release);
                        }
                        let p = seen.peers;
                        if slot.peers.load(Ordering::Relaxed) != p {
                            slot.peers_at_ns.store(now, Ordering::Relaxed);
                            slot.peers.store(p, Ordering::Release);
                        }
                        if first {
                            slot.generation_at_ns.store(now, Ordering::Relaxed);
                            slot.generation.store(generation, Ordering::Release);
                            first = false;
                        }
                        slot.maps.fetch_add(1, Ordering::Relaxed);
                        if map.is_some() {
                            held = map;
                        }
                    }
                    Err(e) => {
                        shared.fail(format!("node {idx}: {e}"));
                        // As the agent: the next stream starts with a full map.
                        break;
                    }
                }
            }
        }
        tokio::time::sleep(backoff(attempt)).await;
        attempt = attempt.saturating_add(1);
    }
}

/// Where a delta's bytes go.
fn delta_shape(d: &pb::NetMapDelta) -> String {
    let peers: usize = d.peers.iter().map(|p| p.encoded_len() + 2).sum();
    format!(
        "{} B: {} peers ({peers} B), {} removed, rules {}, other fields {}, signature {} B",
        d.encoded_len(),
        d.peers.len(),
        d.removed_peers.len(),
        d.inbound_rules
            .as_ref()
            .map_or("unchanged".to_string(), |r| format!(
                "{} B",
                r.encoded_len()
            )),
        d.rest.as_ref().map_or("unchanged".to_string(), |r| format!(
            "{} B",
            r.encoded_len()
        )),
        d.signature.len()
    )
}

// ---- measurements ----------------------------------------------------------------

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Waits until `done(slot)` holds for every node, with a deadline.
async fn wait_all(
    shared: &Shared,
    what: &str,
    timeout: Duration,
    done: impl Fn(usize, &Slot) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let pending = shared
            .slots
            .iter()
            .enumerate()
            .filter(|(i, s)| !done(*i, s))
            .count();
        if pending == 0 {
            return Ok(());
        }
        if shared.verify_failures.load(Ordering::Relaxed) > 0 {
            let f = shared
                .first_failure
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            bail!("a node refused a netmap: {}", f.clone().unwrap_or_default());
        }
        if Instant::now() > deadline {
            bail!(
                "timeout after {timeout:?} waiting for {what}: {pending} of {} nodes still pending",
                shared.slots.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.nodes == 0 || args.group_size == 0 || args.per_channel == 0 || args.changes == 0 {
        bail!("--nodes, --group-size, --per-channel and --changes must be positive");
    }
    if args.two_controllers && std::env::var_os("ZTMESH_DATABASE").is_none() {
        bail!("--two-controllers needs ZTMESH_DATABASE (a PostgreSQL URL both controllers share)");
    }
    if args.changes >= 999 {
        bail!("--changes must be below 999");
    }
    let phase = Duration::from_secs(args.phase_timeout);
    let bin = match &args.controller_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .ok_or_else(|| anyhow!("no parent directory of the current executable"))?
            .join("ztmesh-controller"),
    };
    let tmp = std::env::temp_dir().join(format!("ztmesh-loadgen-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let dir = tmp.join("data");
    let log = tmp.join("controller.log");
    let result = measure(&args, &bin, &dir, &log, phase).await;
    if args.keep || result.is_err() {
        eprintln!("controller log and data dir kept in {}", tmp.display());
    } else {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

async fn measure(
    args: &Args,
    bin: &Path,
    dir: &Path,
    log: &Path,
    phase: Duration,
) -> anyhow::Result<()> {
    let n = args.nodes;
    let groups = n.div_ceil(args.group_size);
    let port = free_port()?;
    let url = format!("https://127.0.0.1:{port}");
    let mut out = serde_json::Map::new();
    out.insert("nodes".into(), n.into());
    out.insert("group_size".into(), args.group_size.into());

    // Fresh controller: baseline memory.
    let mut ctl = Controller::spawn(bin, dir, port, log)?;
    wait_ready(dir, &mut ctl, phase).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss0 = ctl.rss_kib()?;
    println!(
        "controller pid {} on {url}; fresh RSS {rss0} KiB",
        ctl.pid()
    );
    out.insert("rss0_kib".into(), rss0.into());

    let fp = server::fingerprint(&DataDir::new(dir))?;
    let mut admin = cli::connect(&conn_args(dir)).await?;
    admin
        .set_policy(apb::SetPolicyRequest {
            file_name: "loadgen.hujson".into(),
            text: policy(args.all_to_all, groups, 1),
            if_version: None,
        })
        .await
        .map_err(|s| anyhow!("setting the policy: {}", s.message()))?;
    let mut keys = Vec::with_capacity(groups);
    for g in 0..groups {
        let k = admin
            .create_auth_key(apb::CreateAuthKeyRequest {
                user: String::new(),
                tags: vec![format!("tag:lg{g}")],
                reusable: true,
                ephemeral: false,
                expiry_secs: 3600,
            })
            .await
            .map_err(|s| anyhow!("creating an auth key: {}", s.message()))?
            .into_inner()
            .secret;
        keys.push(k);
    }

    // The second controller: the first one's key and certificate, the same
    // database, its own data dir and port.
    let mut second = None;
    let mut url_b = url.clone();
    if args.two_controllers {
        let dir_b = dir.with_file_name("data-b");
        std::fs::create_dir_all(&dir_b)?;
        for f in ["controller.key", "tls.crt", "tls.key"] {
            std::fs::copy(dir.join(f), dir_b.join(f)).with_context(|| format!("copying {f}"))?;
        }
        let port_b = free_port()?;
        let mut b =
            Controller::spawn(bin, &dir_b, port_b, &log.with_file_name("controller-b.log"))?;
        wait_ready(&dir_b, &mut b, phase).await?;
        url_b = format!("https://127.0.0.1:{port_b}");
        println!("second controller pid {} on {url_b}", b.pid());
        second = Some(b);
    }

    // TLS connections, each carrying up to `per_channel` nodes; with two
    // controllers, the odd ones go to the second.
    let n_channels = n.div_ceil(args.per_channel);
    let mut channels = Vec::with_capacity(n_channels);
    for c in 0..n_channels {
        let to = if c % 2 == 1 { &url_b } else { &url };
        channels.push(ztmesh_proto::tls::connect(to, fp, Duration::from_secs(10)).await?);
    }
    let on_b = |i: usize| args.two_controllers && (i / args.per_channel) % 2 == 1;
    println!(
        "{n_channels} TLS connections, {groups} groups of {}",
        args.group_size
    );

    // Enrollment.
    let t = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(args.enroll_concurrency.max(1)));
    let mut set = JoinSet::new();
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await?;
        let ch = channels[i / args.per_channel].clone();
        let key = keys[i / args.group_size].clone();
        set.spawn(async move {
            let _permit = permit;
            let machine = SigningKey::generate(&mut OsRng);
            let wg = WgPrivateKey::generate(&mut OsRng);
            let host = format!("lg-{i}");
            let ts = now_ms();
            let mk = machine.public().as_bytes().to_vec();
            let wk = wg.public().as_bytes().to_vec();
            let proof = machine
                .sign(&auth::enroll_message(&key, &mk, &wk, &host, ts))
                .to_vec();
            let r = ControlClient::new(ch)
                .enroll(pb::EnrollRequest {
                    auth_key: key,
                    machine_key: mk,
                    wg_key: wk,
                    hostname: host,
                    timestamp_ms: ts,
                    proof,
                })
                .await
                .map_err(|s| anyhow!("enrolling node {i}: {}", s.message()))?
                .into_inner();
            Ok::<_, anyhow::Error>((i, SimNode { machine }, r.controller_key))
        });
    }
    let mut nodes: Vec<Option<Arc<SimNode>>> = (0..n).map(|_| None).collect();
    let mut controller_key = None;
    let deadline = tokio::time::Instant::now() + phase;
    while let Some(r) = tokio::time::timeout_at(deadline, set.join_next())
        .await
        .map_err(|_| anyhow!("timeout after {phase:?} enrolling {n} nodes"))?
    {
        let (i, node, ck) = r??;
        nodes[i] = Some(Arc::new(node));
        controller_key.get_or_insert(ck);
    }
    let enroll_time = t.elapsed();
    let nodes: Vec<Arc<SimNode>> = nodes
        .into_iter()
        .map(|x| x.expect("every index joined"))
        .collect();
    let controller_key = PublicKey::from_slice(&controller_key.unwrap_or_default())
        .map_err(|_| anyhow!("enrollment returned no valid controller key"))?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_enrolled = ctl.rss_kib()?;
    println!(
        "enrolled {n} nodes in {:.2} s ({:.0}/s); RSS {rss_enrolled} KiB",
        enroll_time.as_secs_f64(),
        n as f64 / enroll_time.as_secs_f64()
    );
    out.insert("enroll_s".into(), enroll_time.as_secs_f64().into());
    out.insert("rss_enrolled_kib".into(), rss_enrolled.into());

    // Streams.
    let shared = Arc::new(Shared {
        base: Instant::now(),
        verifier: controller_key
            .verifier()
            .context("the controller's netmap key is not a valid point")?,
        controller_key,
        generation: AtomicU64::new(1),
        slots: (0..n).map(|_| Slot::default()).collect(),
        verify_failures: AtomicU64::new(0),
        stream_attempts: AtomicU64::new(0),
        deltas: args.deltas,
        bytes: AtomicU64::new(0),
        deltas_received: AtomicU64::new(0),
        last_delta: std::sync::Mutex::new(String::new()),
        first_failure: std::sync::Mutex::new(None),
    });
    let t = Instant::now();
    let cpu0 = ctl.cpu_secs();
    let mut tasks = JoinSet::new();
    for (i, node) in nodes.iter().enumerate() {
        tasks.spawn(node_task(
            i,
            node.clone(),
            channels[i / args.per_channel].clone(),
            shared.clone(),
        ));
    }
    wait_all(&shared, "every node's first map", phase, |_, s| {
        s.generation.load(Ordering::Acquire) == 1
    })
    .await?;
    let connect_time = t.elapsed();
    println!(
        "all {n} streams hold a map after {:.0} ms (controller CPU {:.2} s)",
        ms(connect_time),
        ctl.cpu_secs() - cpu0
    );
    out.insert("connect_ms".into(), ms(connect_time).into());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_connected = ctl.rss_kib()?;
    out.insert("rss_connected_kib".into(), rss_connected.into());
    println!(
        "RSS with {n} connected: {rss_connected} KiB = {:.1} KiB/node over fresh",
        (rss_connected.saturating_sub(rss0)) as f64 / n as f64
    );

    // Propagation of policy changes.
    let mut all_lat: Vec<f64> = Vec::new();
    let mut per_node_lat: Vec<(usize, f64)> = Vec::new();
    let mut per_change = Vec::new();
    for k in 2..=args.changes + 1 {
        let text = policy(args.all_to_all, groups, k);
        let cpu0 = ctl.cpu_secs();
        let own0 = proc_cpu_secs("/proc/self/stat").unwrap_or(0.0);
        let t0 = shared.ns();
        let started = Instant::now();
        admin
            .set_policy(apb::SetPolicyRequest {
                file_name: "loadgen.hujson".into(),
                text,
                if_version: None,
            })
            .await
            .map_err(|s| anyhow!("setting the policy: {}", s.message()))?;
        let ack = started.elapsed();
        wait_all(&shared, &format!("policy version {k}"), phase, |_, s| {
            s.version.load(Ordering::Acquire) == k
        })
        .await?;
        let mut lat: Vec<f64> = shared
            .slots
            .iter()
            .map(|s| (s.version_at_ns.load(Ordering::Relaxed).saturating_sub(t0)) as f64 / 1e6)
            .collect();
        per_node_lat.extend(lat.iter().copied().enumerate());
        lat.sort_by(f64::total_cmp);
        let (p50, p99, max) = (
            percentile(&lat, 50.0),
            percentile(&lat, 99.0),
            lat[lat.len() - 1],
        );
        let cpu = ctl.cpu_secs() - cpu0;
        let own = proc_cpu_secs("/proc/self/stat").unwrap_or(0.0) - own0;
        println!(
            "policy change {}: ack {:.0} ms, p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms (CPU: controller {cpu:.2} s, loadgen {own:.2} s)",
            k - 1,
            ms(ack)
        );
        per_change.push(serde_json::json!({
            "ack_ms": ms(ack), "p50_ms": p50, "p99_ms": p99, "max_ms": max,
            "controller_cpu_s": cpu, "loadgen_cpu_s": own
        }));
        all_lat.extend(lat);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    if args.two_controllers {
        for (name, b) in [("first", false), ("second", true)] {
            let mut lat: Vec<f64> = per_node_lat
                .iter()
                .filter(|(i, _)| on_b(*i) == b)
                .map(|(_, l)| *l)
                .collect();
            lat.sort_by(f64::total_cmp);
            let (p50, p99) = (percentile(&lat, 50.0), percentile(&lat, 99.0));
            println!(
                "propagation to the nodes on the {name} controller (policy set on the first; {} samples, one per node and change): p50 {p50:.0} ms, p99 {p99:.0} ms",
                lat.len()
            );
            out.insert(format!("prop_{name}_p50_ms"), p50.into());
            out.insert(format!("prop_{name}_p99_ms"), p99.into());
        }
    }
    all_lat.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&all_lat, 50.0), percentile(&all_lat, 99.0));
    println!(
        "propagation over {} changes × {n} nodes: p50 {p50:.0} ms, p99 {p99:.0} ms",
        args.changes
    );
    out.insert("changes".into(), per_change.into());
    out.insert("prop_p50_ms".into(), p50.into());
    out.insert("prop_p99_ms".into(), p99.into());

    // One node joins group 0: its group peers must list it.
    let group0 = args.group_size.min(n);
    let before: Vec<u32> = shared.slots[..group0]
        .iter()
        .map(|s| s.peers.load(Ordering::Acquire))
        .collect();
    let machine = SigningKey::generate(&mut OsRng);
    let wg = WgPrivateKey::generate(&mut OsRng);
    let (mk, wk, host, ts) = (
        machine.public().as_bytes().to_vec(),
        wg.public().as_bytes().to_vec(),
        "lg-join".to_string(),
        now_ms(),
    );
    let proof = machine
        .sign(&auth::enroll_message(&keys[0], &mk, &wk, &host, ts))
        .to_vec();
    let t0 = shared.ns();
    let bytes0 = shared.bytes.load(Ordering::Relaxed);
    let started = Instant::now();
    ControlClient::new(channels[0].clone())
        .enroll(pb::EnrollRequest {
            auth_key: keys[0].clone(),
            machine_key: mk,
            wg_key: wk,
            hostname: host,
            timestamp_ms: ts,
            proof,
        })
        .await
        .map_err(|s| anyhow!("enrolling the joining node: {}", s.message()))?;
    let ack = started.elapsed();
    wait_all(
        &shared,
        "the group to learn the joining node",
        phase,
        |i, s| i >= group0 || s.peers.load(Ordering::Acquire) > before[i],
    )
    .await?;
    let mut lat: Vec<f64> = shared.slots[..group0]
        .iter()
        .map(|s| (s.peers_at_ns.load(Ordering::Relaxed).saturating_sub(t0)) as f64 / 1e6)
        .collect();
    lat.sort_by(f64::total_cmp);
    // Settle: a straggling map of the join still counts.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let join_bytes = (shared.bytes.load(Ordering::Relaxed) - bytes0) as f64 / group0 as f64;
    println!(
        "one node joins: enroll ack {:.1} ms, its {group0} group peers updated p50 {:.1} ms, max {:.1} ms; {join_bytes:.0} B received per updated node",
        ms(ack),
        percentile(&lat, 50.0),
        lat[lat.len() - 1]
    );
    out.insert("join_ack_ms".into(), ms(ack).into());
    out.insert("join_max_ms".into(), lat[lat.len() - 1].into());
    out.insert("join_bytes_per_node".into(), join_bytes.into());
    if args.deltas {
        let shape = shared
            .last_delta
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        println!("node 0's join delta: {shape}");
        out.insert("join_delta_shape".into(), shape.into());
    }

    // Reconnect storm.
    if !args.no_restart && !args.two_controllers {
        ctl.kill();
        let killed = Instant::now();
        shared.generation.store(2, Ordering::Release);
        let attempts0 = shared.stream_attempts.load(Ordering::Relaxed);
        ctl = Controller::spawn(bin, dir, port, log)?;
        let spawned = ctl.started;
        let resync = shared.ns();
        wait_ready(dir, &mut ctl, phase).await?;
        let ready = spawned.elapsed();
        wait_all(
            &shared,
            "every node to resync after the restart",
            phase,
            |_, s| s.generation.load(Ordering::Acquire) == 2,
        )
        .await?;
        let storm = spawned.elapsed();
        let mut lat: Vec<f64> = shared
            .slots
            .iter()
            .map(|s| {
                (s.generation_at_ns
                    .load(Ordering::Relaxed)
                    .saturating_sub(resync)) as f64
                    / 1e6
            })
            .collect();
        lat.sort_by(f64::total_cmp);
        let cpu = ctl.cpu_secs();
        println!(
            "reconnect storm: controller answering after {:.0} ms, all {n} resynced {:.0} ms after restart ({:.0} ms after SIGKILL); p50 {:.0} ms; {} stream attempts; controller CPU {cpu:.2} s",
            ms(ready),
            ms(storm),
            ms(killed.elapsed()),
            percentile(&lat, 50.0),
            shared.stream_attempts.load(Ordering::Relaxed) - attempts0,
        );
        out.insert("restart_ready_ms".into(), ms(ready).into());
        out.insert("storm_ms".into(), ms(storm).into());
        out.insert("storm_p50_ms".into(), percentile(&lat, 50.0).into());
        out.insert("storm_cpu_s".into(), cpu.into());
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_re = ctl.rss_kib()?;
        println!(
            "RSS after resync: {rss_re} KiB = {:.1} KiB/node over fresh",
            (rss_re.saturating_sub(rss0)) as f64 / n as f64
        );
        out.insert("rss_resynced_kib".into(), rss_re.into());
    }
    let per_node = (rss_connected.saturating_sub(rss0)) as f64 / n as f64;
    out.insert("kib_per_node".into(), per_node.into());
    let maps: u64 = shared
        .slots
        .iter()
        .map(|s| s.maps.load(Ordering::Relaxed))
        .sum();
    let bytes = shared.bytes.load(Ordering::Relaxed);
    println!(
        "{maps} maps verified, {:.1} KiB each on average",
        bytes as f64 / maps.max(1) as f64 / 1024.0
    );
    out.insert("maps_received".into(), maps.into());
    out.insert(
        "deltas_received".into(),
        shared.deltas_received.load(Ordering::Relaxed).into(),
    );
    out.insert("deltas".into(), args.deltas.into());
    out.insert("map_bytes_avg".into(), (bytes / maps.max(1)).into());
    out.insert(
        "loadgen_cpu_s".into(),
        proc_cpu_secs("/proc/self/stat").unwrap_or(0.0).into(),
    );
    tasks.abort_all();
    ctl.kill();
    if let Some(mut b) = second {
        b.kill();
    }
    if args.json {
        println!("{}", serde_json::Value::Object(out));
    }
    Ok(())
}
