//! The data plane's relay link (shell): one task on the data-plane runtime
//! keeps a session with the netmap's first relay — QUIC first, TLS over TCP
//! when QUIC does not connect within [`QUIC_TIMEOUT`] (UDP blocked) — says
//! `HELLO` with the machine key and the current signed map, pushes every
//! newer map (`MAP`), carries `Relay(peer)` transmits out and hands received
//! datagrams back to the device task. It reconnects with backoff; the relay
//! accepts the same node again without re-enrollment (a fresh proof, the map
//! the node holds).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use ztmesh_proto::control::{Relay, SignedNetMap};
use ztmesh_proto::keys::SigningKey;
use ztmesh_relay::client::{ClientError, RelayClient, Target, Transport};

use crate::control::Backoff;

/// How long QUIC may take to connect before the TCP fallback is tried.
pub const QUIC_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the TLS/TCP connection may take.
const TCP_TIMEOUT: Duration = Duration::from_secs(5);
/// Datagrams queued toward the relay; beyond it they are dropped (WireGuard
/// tolerates loss, a deeper queue only adds latency).
pub const OUT_QUEUE: usize = 1_024;
/// How often a session that fell back to TCP tries QUIC again.
const QUIC_RETRY: Duration = Duration::from_secs(60);

/// What the relay link needs: the relays of the map, this node's machine
/// key (the `HELLO` proof) and the signed map to present.
#[derive(Clone)]
pub struct RelaySetup {
    pub relays: Vec<Relay>,
    pub machine_key: Arc<SigningKey>,
    pub map: SignedNetMap,
}

impl std::fmt::Debug for RelaySetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelaySetup")
            .field("relays", &self.relays.len())
            .finish_non_exhaustive()
    }
}

/// The link's state, for `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayState {
    /// The relay's name (empty: no relay configured).
    pub name: String,
    /// "quic" or "tcp" while connected, else empty.
    pub transport: String,
    /// The last error, if the link is down.
    pub error: Option<String>,
    /// Sessions established since start.
    pub sessions: u64,
    /// Datagrams dropped because the link was down or its queue full.
    pub dropped: u64,
}

/// A running link.
pub struct RelayLink {
    relay: Relay,
    out: mpsc::Sender<(u64, Vec<u8>)>,
    map: watch::Sender<SignedNetMap>,
    task: JoinHandle<()>,
    state: Arc<Mutex<RelayState>>,
}

impl RelayLink {
    /// Starts the link to `setup.relays[0]`; received datagrams go to `inbound`.
    pub fn start(setup: RelaySetup, inbound: mpsc::Sender<(u64, Vec<u8>)>) -> Option<Self> {
        let relay = setup.relays.first()?.clone();
        let (out, out_rx) = mpsc::channel(OUT_QUEUE);
        let (map, map_rx) = watch::channel(setup.map);
        let state = Arc::new(Mutex::new(RelayState {
            name: relay.name.clone(),
            ..RelayState::default()
        }));
        let task = tokio::spawn(run(
            relay.clone(),
            setup.machine_key,
            map_rx,
            out_rx,
            inbound,
            state.clone(),
        ));
        Some(Self {
            relay,
            out,
            map,
            task,
            state,
        })
    }

    /// Whether this link already serves `relays` (same first relay).
    pub fn serves(&self, relays: &[Relay]) -> bool {
        relays.first() == Some(&self.relay)
    }

    /// A newer signed map: presented to the relay at once (`MAP`) and on
    /// every reconnect.
    pub fn push_map(&self, map: SignedNetMap) {
        self.map.send_replace(map);
    }

    /// Queues a datagram for `peer`; drops it (counted) when the queue is
    /// full or the link is down.
    pub fn send(&self, peer: u64, datagram: &[u8]) {
        if self.out.try_send((peer, datagram.to_vec())).is_err() {
            if let Ok(mut s) = self.state.lock() {
                s.dropped = s.dropped.saturating_add(1);
            }
        }
    }

    pub fn state(&self) -> RelayState {
        self.state.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for RelayLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connects and serves sessions until aborted.
async fn run(
    relay: Relay,
    key: Arc<SigningKey>,
    mut map: watch::Receiver<SignedNetMap>,
    mut out: mpsc::Receiver<(u64, Vec<u8>)>,
    inbound: mpsc::Sender<(u64, Vec<u8>)>,
    state: Arc<Mutex<RelayState>>,
) {
    let backoff = Backoff {
        base: Duration::from_millis(500),
        max: Duration::from_secs(10),
    };
    let mut attempt = 0u32;
    loop {
        let current = map.borrow_and_update().clone();
        let client = match connect(&relay, &key, &current).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(relay = %relay.name, error = %e, "relay connect failed");
                set(&state, |s| {
                    s.transport.clear();
                    s.error = Some(e.to_string());
                });
                // Drain what waits meanwhile: it cannot be delivered.
                while out.try_recv().is_ok() {
                    set(&state, |s| s.dropped = s.dropped.saturating_add(1));
                }
                tokio::time::sleep(backoff.delay(attempt, jitter())).await;
                attempt = attempt.saturating_add(1);
                continue;
            }
        };
        attempt = 0;
        let transport = match client.transport() {
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        };
        tracing::info!(relay = %relay.name, transport, node_id = client.node_id(), "relay session up");
        set(&state, |s| {
            s.transport = transport.into();
            s.error = None;
            s.sessions = s.sessions.saturating_add(1);
        });
        let reason = serve(client, &mut map, &mut out, &inbound).await;
        tracing::info!(relay = %relay.name, reason = %reason, "relay session ended");
        set(&state, |s| {
            s.transport.clear();
            s.error = Some(reason);
        });
        tokio::time::sleep(backoff.delay(0, jitter())).await;
    }
}

/// QUIC first; TLS over TCP when QUIC does not answer in time.
async fn connect(
    relay: &Relay,
    key: &SigningKey,
    map: &SignedNetMap,
) -> Result<RelayClient, ClientError> {
    let quic = match Target::from_relay(relay, Transport::Quic) {
        Ok(t) => RelayClient::connect(&t, key, map, QUIC_TIMEOUT).await,
        Err(e) => Err(e),
    };
    match quic {
        Ok(c) => Ok(c),
        // A refusal is the relay's answer: TCP would get the same.
        Err(e @ ClientError::Refused(_)) => Err(e),
        Err(e) => {
            tracing::debug!(relay = %relay.name, error = %e, "QUIC to the relay failed; trying TLS over TCP");
            let t = Target::from_relay(relay, Transport::Tcp)?;
            RelayClient::connect(&t, key, map, TCP_TIMEOUT).await
        }
    }
}

/// One session: until it ends (the reason) or, over TCP, until it is time
/// to try QUIC again.
async fn serve(
    mut client: RelayClient,
    map: &mut watch::Receiver<SignedNetMap>,
    out: &mut mpsc::Receiver<(u64, Vec<u8>)>,
    inbound: &mpsc::Sender<(u64, Vec<u8>)>,
) -> String {
    let retry_quic = tokio::time::sleep(QUIC_RETRY);
    tokio::pin!(retry_quic);
    let tcp = client.transport() == Transport::Tcp;
    loop {
        tokio::select! {
            changed = map.changed() => {
                if changed.is_err() {
                    return "data plane stopped".into();
                }
                let m = map.borrow_and_update().clone();
                if let Err(e) = client.push_map(&m).await {
                    return e.to_string();
                }
            }
            d = out.recv() => {
                let Some((peer, datagram)) = d else {
                    return "data plane stopped".into();
                };
                match client.send(peer, &datagram).await {
                    Ok(()) | Err(ClientError::Frame(_)) => {}
                    Err(e) => return e.to_string(),
                }
            }
            r = client.recv() => match r {
                Ok(d) => {
                    if inbound.send(d).await.is_err() {
                        return "data plane stopped".into();
                    }
                }
                Err(e) => return e.to_string(),
            },
            () = &mut retry_quic, if tcp => {
                client.close().await;
                return "trying QUIC again".into();
            }
        }
    }
}

fn set(state: &Mutex<RelayState>, f: impl FnOnce(&mut RelayState)) {
    if let Ok(mut s) = state.lock() {
        f(&mut s);
    }
}

/// Reconnect jitter, from OS entropy in this shell.
fn jitter() -> u64 {
    use rand_core::RngCore as _;
    rand_core::OsRng.next_u64()
}
