//! A real relay on 127.0.0.1 (real QUIC, TLS and UDP sockets), a test
//! controller key that signs the maps, and nodes with machine keys.
#![allow(dead_code)]

use std::time::Duration;

use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::Value;
use ztmesh_proto::control::{NetMap, NodeInfo, Peer, SignedNetMap};
use ztmesh_proto::keys::SigningKey;
use ztmesh_proto::netmap::sign;
use ztmesh_proto::time::now_ms;
use ztmesh_relay::client::{RelayClient, Target, Transport};
use ztmesh_relay::datadir::DataDir;
use ztmesh_relay::server::{self, Running, ServeConfig};

pub const NAME: &str = "relay-test";
pub const HOUR_MS: i64 = 3_600_000;
/// Generous liveness bound for anything the tests wait for.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub struct World {
    pub controller: SigningKey,
    pub machines: Vec<SigningKey>,
    pub dir: tempfile::TempDir,
}

impl World {
    pub fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        Self {
            controller: SigningKey::generate(&mut rng),
            machines: (0..8).map(|_| SigningKey::generate(&mut rng)).collect(),
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn data_dir(&self) -> DataDir {
        DataDir::new(self.dir.path().join("relay"))
    }

    pub fn config(&self) -> ServeConfig {
        let any = "127.0.0.1:0".parse().expect("address");
        ServeConfig::new(
            NAME,
            self.data_dir(),
            any,
            any,
            vec![any, any],
            self.controller.public(),
        )
    }

    pub async fn relay(&self) -> Running {
        server::start(self.config()).await.expect("relay starts")
    }

    /// Node `id` with machine key `machines[id]`, listing `peers`.
    pub fn map(&self, id: u64, peers: &[u64], serial: u64) -> SignedNetMap {
        self.map_until(id, peers, serial, now_ms() + HOUR_MS)
    }

    pub fn map_until(
        &self,
        id: u64,
        peers: &[u64],
        serial: u64,
        not_after_ms: i64,
    ) -> SignedNetMap {
        sign(
            &self.controller,
            &NetMap {
                serial,
                issued_at_ms: now_ms() - 1_000,
                not_after_ms,
                self_node: Some(NodeInfo {
                    id,
                    name: format!("n{id}"),
                    machine_key: self.machines[id as usize].public().as_bytes().to_vec(),
                    wg_key: vec![id as u8; 32],
                    ..Default::default()
                }),
                peers: peers
                    .iter()
                    .map(|&p| Peer {
                        id: p,
                        name: format!("n{p}"),
                        wg_key: vec![p as u8; 32],
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            },
        )
    }

    /// Node `id` with a map listing `peers` (serial `serial`), connected
    /// and welcomed.
    pub async fn joined(
        &self,
        relay: &Running,
        transport: Transport,
        id: u64,
        peers: &[u64],
        serial: u64,
    ) -> RelayClient {
        self.connect(relay, transport, id, &self.map(id, peers, serial))
            .await
            .unwrap_or_else(|e| panic!("node {id} joins: {e}"))
    }

    pub async fn connect(
        &self,
        relay: &Running,
        transport: Transport,
        id: u64,
        map: &SignedNetMap,
    ) -> Result<RelayClient, ztmesh_relay::client::ClientError> {
        RelayClient::connect(
            &target(relay, transport),
            &self.machines[id as usize],
            map,
            PATIENCE,
        )
        .await
    }

    /// Polls `stats.json` until `ok` holds (bounded by [`PATIENCE`]).
    pub async fn stats_until(&self, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let path = self.data_dir().stats();
        let mut last = Value::Null;
        for _ in 0..(PATIENCE.as_millis() / 100) {
            if let Ok(text) = std::fs::read_to_string(&path) {
                if let Ok(v) = serde_json::from_str::<Value>(&text) {
                    if ok(&v) {
                        return v;
                    }
                    last = v;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("stats never showed {what}; last:\n{last:#}");
    }
}

pub fn target(relay: &Running, transport: Transport) -> Target {
    let addr = match transport {
        Transport::Quic => &relay.identity.quic_addr,
        Transport::Tcp => &relay.identity.tcp_addr,
    };
    Target {
        name: NAME.into(),
        addr: addr.parse().expect("relay address"),
        transport,
        pin: relay.fingerprint,
    }
}

/// A datagram of `len` bytes that says who sent it and which one it is.
pub fn datagram(from: u64, n: u8, len: usize) -> Vec<u8> {
    let mut d = vec![n; len];
    d[0] = 4; // a WireGuard transport message type
    d[1] = from as u8;
    d
}

/// Receives within [`PATIENCE`].
pub async fn recv(c: &mut RelayClient) -> (u64, Vec<u8>) {
    tokio::time::timeout(PATIENCE, c.recv())
        .await
        .expect("a datagram arrives")
        .expect("session alive")
}

/// A counter of the stats, in `section` (`""` for the top level).
pub fn count(v: &Value, section: &str, key: &str) -> u64 {
    let v = if section.is_empty() { v } else { &v[section] };
    v[key].as_u64().unwrap_or(0)
}

/// Traffic of one pair in the stats, or zeros.
pub fn pair(v: &Value, src: u64, dst: u64) -> (u64, u64) {
    v["pairs"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["src"] == src && p["dst"] == dst)
        .map(|p| {
            (
                p["bytes"].as_u64().unwrap_or(0),
                p["packets"].as_u64().unwrap_or(0),
            )
        })
        .unwrap_or((0, 0))
}
