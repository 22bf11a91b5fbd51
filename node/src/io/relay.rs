//! The data plane's relay link (shell): one task on the node's tokio runtime
//! (the caller of `DataPlane::start`) keeps one session with the map's
//! relays — the first relay that answers, in map order, QUIC first and TLS
//! over TCP when QUIC does not connect within [`QUIC_TIMEOUT`] (UDP
//! blocked); a session on a later relay or on TCP keeps trying the better
//! positions in the background — says `HELLO` with the machine key and the
//! current signed map, pushes every newer map (`MAP`), carries `Relay(peer)`
//! transmits out and hands received datagrams to the data-plane thread (a
//! bounded channel and its eventfd). It reconnects with backoff; the relay
//! accepts the same node again without re-enrollment (a fresh proof, the map
//! the node holds).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use ztmesh_proto::control::{Relay, SignedNetMap};
use ztmesh_proto::keys::SigningKey;
use ztmesh_relay::client::{ClientError, RelayClient, RelaySender, Target, Transport};

use crate::control::Backoff;

/// How long QUIC may take to connect before the TCP fallback is tried.
pub const QUIC_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the TLS/TCP connection may take.
const TCP_TIMEOUT: Duration = Duration::from_secs(5);
/// Datagrams queued from the relay toward the device task; beyond it the
/// reader waits (the relay's own queues then drop).
pub const OUT_QUEUE: usize = 1_024;
/// How often a session that is not at the best position (a later relay of
/// the map, or TLS over TCP) tries the better ones, in the background.
pub const RETRY_BETTER: Duration = Duration::from_secs(30);

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
    relays: Vec<Relay>,
    /// The current session's sender (`None` while the link is down): the
    /// device task sends through it directly, without a hop through the
    /// link's task.
    sender: Arc<Mutex<Option<RelaySender>>>,
    map: watch::Sender<SignedNetMap>,
    task: JoinHandle<()>,
    state: Arc<Mutex<RelayState>>,
}

impl RelayLink {
    /// Starts the link to the best of `setup.relays` that answers (see
    /// [`preference`]); received datagrams go to `inbound`.
    pub fn start(setup: RelaySetup, inbound: mpsc::Sender<(u64, Vec<u8>)>) -> Option<Self> {
        let first = setup.relays.first()?;
        let sender = Arc::new(Mutex::new(None));
        let (map, map_rx) = watch::channel(setup.map);
        let state = Arc::new(Mutex::new(RelayState {
            name: first.name.clone(),
            ..RelayState::default()
        }));
        let task = tokio::spawn(run(
            setup.relays.clone(),
            setup.machine_key,
            map_rx,
            sender.clone(),
            inbound,
            state.clone(),
        ));
        Some(Self {
            relays: setup.relays,
            sender,
            map,
            task,
            state,
        })
    }

    /// Whether this link already serves `relays` (the same list, in order).
    pub fn serves(&self, relays: &[Relay]) -> bool {
        self.relays == relays
    }

    /// A newer signed map: presented to the relay at once (`MAP`) and on
    /// every reconnect.
    pub fn push_map(&self, map: SignedNetMap) {
        self.map.send_replace(map);
    }

    /// Sends a datagram for `peer` on the current session without waiting;
    /// drops it (counted) when the link is down or its queue is full.
    pub fn send(&self, peer: u64, datagram: &[u8]) {
        let sent = match &*self.sender.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(s) => s.try_send(peer, datagram).is_ok(),
            None => false,
        };
        if !sent {
            set(&self.state, |s| s.dropped = s.dropped.saturating_add(1));
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

/// Where a session may go, best first: the map's relays in order, each over
/// QUIC before TLS over TCP. A position is an index into this order.
pub fn preference(relays: usize) -> impl Iterator<Item = (usize, Transport)> {
    (0..relays).flat_map(|i| [(i, Transport::Quic), (i, Transport::Tcp)])
}

/// A boxed attempt to reach a better position.
type Attempt =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Connected, ClientError>> + Send>>;

/// Connects and serves sessions until aborted.
async fn run(
    relays: Vec<Relay>,
    key: Arc<SigningKey>,
    mut map: watch::Receiver<SignedNetMap>,
    sender: Arc<Mutex<Option<RelaySender>>>,
    inbound: mpsc::Sender<(u64, Vec<u8>)>,
    state: Arc<Mutex<RelayState>>,
) {
    let backoff = Backoff {
        base: Duration::from_millis(500),
        max: Duration::from_secs(10),
    };
    let mut attempt = 0u32;
    let mut next: Option<Connected> = None;
    loop {
        let Connected { pos, client, hello } = match next.take() {
            Some(session) => session,
            None => {
                let current = map.borrow_and_update().clone();
                let dial = Dial {
                    relays: relays.clone(),
                    key: key.clone(),
                    inbound: inbound.clone(),
                };
                match connect_best(dial, current, usize::MAX).await {
                    Ok(session) => session,
                    Err(e) => {
                        tracing::debug!(error = %e, "no relay connected");
                        set(&state, |s| {
                            s.transport.clear();
                            s.error = Some(e.to_string());
                        });
                        tokio::time::sleep(backoff.delay(attempt, jitter())).await;
                        attempt = attempt.saturating_add(1);
                        continue;
                    }
                }
            }
        };
        attempt = 0;
        let name = relays[pos / 2].name.clone();
        let transport = transport_name(client.transport());
        tracing::info!(relay = %name, transport, node_id = client.node_id(), "relay session up");
        set(&state, |s| {
            s.name.clone_from(&name);
            s.transport = transport.into();
            s.error = None;
            s.sessions = s.sessions.saturating_add(1);
        });
        let session = Session {
            client,
            pos,
            relays: &relays,
            key: &key,
            inbound: &inbound,
            sender: &sender,
        };
        match session.serve(&mut map, hello).await {
            Ended::Better(better) => {
                // The session's sender already points at `better`.
                let (to, t) = (
                    &relays[better.pos / 2].name,
                    transport_name(better.client.transport()),
                );
                tracing::info!(from = %name, to = %to, transport = t, "relay session moved to a better relay or transport");
                next = Some(better);
            }
            Ended::Reason(reason) => {
                *sender.lock().unwrap_or_else(|e| e.into_inner()) = None;
                tracing::info!(relay = %name, reason = %reason, "relay session ended");
                set(&state, |s| {
                    s.transport.clear();
                    s.error = Some(reason);
                });
                tokio::time::sleep(backoff.delay(0, jitter())).await;
            }
        }
    }
}

fn transport_name(t: Transport) -> &'static str {
    match t {
        Transport::Quic => "quic",
        Transport::Tcp => "tcp",
    }
}

/// The first of the first `limit` positions of [`preference`] that
/// accepts a session. A relay that refuses the node is skipped whole (TCP
/// would get the same answer).
async fn connect_best(
    dial: Dial,
    map: SignedNetMap,
    limit: usize,
) -> Result<Connected, ClientError> {
    let Dial {
        relays,
        key,
        inbound,
    } = dial;
    let mut last = ClientError::Connect {
        addr: String::new(),
        reason: "no relay in the netmap".into(),
    };
    let mut refused = None;
    for (pos, (i, transport)) in preference(relays.len()).enumerate().take(limit) {
        if refused == Some(i) {
            continue;
        }
        let timeout = match transport {
            Transport::Quic => QUIC_TIMEOUT,
            Transport::Tcp => TCP_TIMEOUT,
        };
        let result = match Target::from_relay(&relays[i], transport) {
            Ok(t) => RelayClient::connect_into(&t, &key, &map, timeout, inbound.clone()).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(client) => {
                return Ok(Connected {
                    pos,
                    client,
                    hello: map,
                })
            }
            Err(e) => {
                tracing::debug!(relay = %relays[i].name, transport = transport_name(transport), error = %e, "relay connect failed");
                if matches!(e, ClientError::Refused(_)) {
                    refused = Some(i);
                }
                last = e;
            }
        }
    }
    Err(last)
}

/// What a connection attempt needs: the map's relays, the machine key, and
/// where received datagrams go.
struct Dial {
    relays: Vec<Relay>,
    key: Arc<SigningKey>,
    inbound: mpsc::Sender<(u64, Vec<u8>)>,
}

/// A session that said `HELLO` and got `WELCOME`.
struct Connected {
    /// Its position in [`preference`].
    pos: usize,
    client: RelayClient,
    /// The map its `HELLO` presented.
    hello: SignedNetMap,
}

/// Why a session ended.
enum Ended {
    /// The reason, for status.
    Reason(String),
    /// A session at a better position connected; the link's sender already
    /// points at it and the old session is being closed.
    Better(Connected),
}

/// One session at position `pos` of [`preference`].
struct Session<'a> {
    client: RelayClient,
    pos: usize,
    relays: &'a [Relay],
    key: &'a Arc<SigningKey>,
    /// Where received datagrams go (the readers deliver there directly).
    inbound: &'a mpsc::Sender<(u64, Vec<u8>)>,
    /// The link's sender, for the device task.
    sender: &'a Mutex<Option<RelaySender>>,
}

impl Session<'_> {
    /// Serves until the session ends or, when it is not at the best
    /// position (a later relay, or TCP where QUIC may work again), until a
    /// better one connects: every [`RETRY_BETTER`] one attempt walks the
    /// better positions in the background while this session keeps
    /// carrying traffic. So a node that failed over comes back to the
    /// first relay, where its peers are, once it answers again.
    async fn serve(
        mut self,
        map: &mut watch::Receiver<SignedNetMap>,
        hello: SignedNetMap,
    ) -> Ended {
        *self.sender.lock().unwrap_or_else(|e| e.into_inner()) = Some(self.client.sender());
        // A newer map may have arrived while this session was connecting:
        // the relay must judge by the newest one.
        let newest = map.borrow_and_update().clone();
        if newest != hello {
            if let Err(e) = self.client.push_map(&newest).await {
                return Ended::Reason(e.to_string());
            }
        }
        // Retries at wall-clock multiples of the period, so that nodes that
        // failed over move back at about the same moment: relays do not
        // forward to each other, and a pair is split while its two nodes
        // sit on different relays.
        let mut retry = tokio::time::interval_at(aligned_start(RETRY_BETTER), RETRY_BETTER);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut better: Option<Attempt> = None;
        loop {
            tokio::select! {
                changed = map.changed() => {
                    if changed.is_err() {
                        return Ended::Reason("data plane stopped".into());
                    }
                    let m = map.borrow_and_update().clone();
                    if let Err(e) = self.client.push_map(&m).await {
                        return Ended::Reason(e.to_string());
                    }
                }
                // Datagrams go to `inbound` directly; this only sees the end.
                r = self.client.recv() => match r {
                    Ok(d) => {
                        if self.inbound.send(d).await.is_err() {
                            return Ended::Reason("data plane stopped".into());
                        }
                    }
                    Err(e) => {
                        // Moving to a better session can end this one first
                        // (the relay replaces a node's session before it
                        // welcomes the new one): finish the move.
                        if let Some(attempt) = better.take() {
                            if let Ok(c) = attempt.await {
                                return self.switch(c);
                            }
                        }
                        return Ended::Reason(e.to_string());
                    }
                },
                _ = retry.tick(), if self.pos > 0 && better.is_none() => {
                    let current = map.borrow().clone();
                    let dial = Dial {
                        relays: self.relays.to_vec(),
                        key: self.key.clone(),
                        inbound: self.inbound.clone(),
                    };
                    better = Some(Box::pin(connect_best(dial, current, self.pos)));
                }
                r = async { better.as_mut().expect("guarded by is_some").await }, if better.is_some() => {
                    better = None;
                    match r {
                        Ok(c) => return self.switch(c),
                        Err(e) => tracing::debug!(error = %e, "no better relay position yet"),
                    }
                }
            }
        }
    }
}

impl Session<'_> {
    /// Points the device at `better` at once, then closes this session in
    /// the background (a QUIC close waits up to a second for the peer).
    fn switch(self, better: Connected) -> Ended {
        *self.sender.lock().unwrap_or_else(|e| e.into_inner()) = Some(better.client.sender());
        tokio::spawn(self.client.close());
        Ended::Better(better)
    }
}

/// The next wall-clock multiple of `period`, as a tokio instant.
#[expect(
    clippy::disallowed_methods,
    reason = "the shell reads the clocks to align retries across nodes"
)]
fn aligned_start(period: Duration) -> tokio::time::Instant {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let p = period.as_millis().max(1);
    let wait = p - since_epoch.as_millis() % p;
    tokio::time::Instant::now() + Duration::from_millis(u64::try_from(wait).unwrap_or(0))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_go_relay_by_relay_quic_before_tcp() {
        let order: Vec<_> = preference(2).collect();
        assert_eq!(
            order,
            [
                (0, Transport::Quic),
                (0, Transport::Tcp),
                (1, Transport::Quic),
                (1, Transport::Tcp)
            ]
        );
        // A position's relay is position / 2, as the link reads it.
        assert!(order.iter().enumerate().all(|(pos, (i, _))| pos / 2 == *i));
        assert_eq!(preference(0).count(), 0);
    }
}
