//! Load generator for `scripts/bench/relay.sh`: connects nodes to a running
//! `ztmesh-relay` with maps signed by a bench controller key, and either
//! pushes datagrams from one node to another for a while (throughput) or
//! holds many idle sessions (memory per node).
//!
//! ```text
//! relay_load keygen DIR                      # DIR/controller.key (0600), DIR/controller.pub
//! relay_load blast DIR RELAY_DIR quic|tcp SECONDS SIZE
//! relay_load idle DIR RELAY_DIR quic|tcp COUNT SECONDS
//! ```
//! Prints one JSON line of results. Every loop is bounded by its count or
//! its duration.
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "a benchmark tool reads the clock"
)]

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ztmesh_proto::control::{NetMap, NodeInfo, Peer, SignedNetMap};
use ztmesh_proto::keys::SigningKey;
use ztmesh_proto::netmap::sign;
use ztmesh_proto::time::now_ms;
use ztmesh_relay::client::{RelayClient, Target, Transport};
use ztmesh_relay::datadir::{read_identity, DataDir};

fn map(controller: &SigningKey, machine: &SigningKey, id: u64, peers: &[u64]) -> SignedNetMap {
    sign(
        controller,
        &NetMap {
            serial: now_ms() as u64,
            issued_at_ms: now_ms(),
            not_after_ms: now_ms() + 3_600_000,
            self_node: Some(NodeInfo {
                id,
                name: format!("bench-{id}"),
                machine_key: machine.public().as_bytes().to_vec(),
                wg_key: vec![1; 32],
                ..Default::default()
            }),
            peers: peers
                .iter()
                .map(|&p| Peer {
                    id: p,
                    name: format!("bench-{p}"),
                    wg_key: vec![2; 32],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        },
    )
}

fn target(relay_dir: &Path, transport: Transport) -> anyhow::Result<Target> {
    let id = read_identity(&DataDir::new(relay_dir))?;
    Target::from_relay(&id.to_relay()?, transport).context("relay identity")
}

async fn connect(
    target: &Target,
    controller: &SigningKey,
    id: u64,
    peers: &[u64],
) -> anyhow::Result<RelayClient> {
    let machine = SigningKey::generate(&mut rand_core::OsRng);
    Ok(RelayClient::connect(
        target,
        &machine,
        &map(controller, &machine, id, peers),
        Duration::from_secs(10),
    )
    .await?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| -> anyhow::Result<&str> {
        args.get(i)
            .map(String::as_str)
            .context("usage: see the header of relay/examples/relay_load.rs")
    };
    let dir = Path::new(arg(1)?);
    if arg(0)? == "keygen" {
        std::fs::create_dir_all(dir)?;
        let key = SigningKey::load_or_generate(&dir.join("controller.key"))?;
        std::fs::write(dir.join("controller.pub"), format!("{}\n", key.public()))?;
        return Ok(());
    }
    let controller = SigningKey::load_or_generate(&dir.join("controller.key"))?;
    let transport = match arg(3)? {
        "quic" => Transport::Quic,
        "tcp" => Transport::Tcp,
        other => anyhow::bail!("transport {other:?}: quic or tcp"),
    };
    let target = target(Path::new(arg(2)?), transport)?;
    match arg(0)? {
        "blast" => {
            let seconds: u64 = arg(4)?.parse()?;
            let size: usize = arg(5)?.parse()?;
            let a = connect(&target, &controller, 1, &[2]).await?;
            let mut b = connect(&target, &controller, 2, &[1]).await?;
            let received = Arc::new(AtomicU64::new(0));
            let counter = received.clone();
            let receiver = tokio::spawn(async move {
                while let Ok((_, d)) = b.recv().await {
                    counter.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
            });
            let datagram = vec![4u8; size];
            let start = Instant::now();
            let deadline = start + Duration::from_secs(seconds);
            let (mut sent, mut packets) = (0u64, 0u64);
            while Instant::now() < deadline {
                a.send(2, &datagram).await?;
                sent += size as u64;
                packets += 1;
                // Yield now and then so the receiver keeps up on 2 cores.
                if packets & 63 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let elapsed = start.elapsed().as_secs_f64();
            let got = received.load(Ordering::Relaxed);
            receiver.abort();
            println!(
                "{}",
                serde_json::json!({
                    "mode": "blast",
                    "transport": arg(3)?,
                    "size": size,
                    "seconds": elapsed,
                    "sent_bytes": sent,
                    "received_bytes": got,
                    "received_gbit_s": got as f64 * 8.0 / elapsed / 1e9,
                    "loss": 1.0 - got as f64 / sent.max(1) as f64,
                })
            );
        }
        "idle" => {
            let count: u64 = arg(4)?.parse()?;
            let seconds: u64 = arg(5)?.parse()?;
            let mut clients = Vec::new();
            for id in 1..=count {
                clients.push(connect(&target, &controller, id, &[]).await?);
            }
            println!(
                "{}",
                serde_json::json!({"mode": "idle", "transport": arg(3)?, "connected": clients.len()})
            );
            tokio::time::sleep(Duration::from_secs(seconds)).await;
        }
        other => anyhow::bail!("mode {other:?}: keygen, blast or idle"),
    }
    Ok(())
}
