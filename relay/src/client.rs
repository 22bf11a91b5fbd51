//! The relay client (shell), for the node: connect over QUIC or TLS/TCP to
//! a relay pinned by its certificate's SHA-256, say `HELLO` with the
//! machine key and the current signed map, then send and receive WireGuard
//! datagrams by peer id and push each newer map.
//!
//! Over QUIC a datagram travels as a QUIC datagram when it fits the path's
//! current `max_datagram_size()`, else as a `DATA` frame on the stream; over
//! TCP always as a `DATA` frame. The relay may refuse or end the session at
//! any time (`REFUSED {reason}`); [`RelayClient::recv`] then returns
//! [`ClientError::Closed`] with that reason.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use ztmesh_proto::auth::NodeProof;
use ztmesh_proto::control::{Relay, SignedNetMap};
use ztmesh_proto::keys::SigningKey;
use ztmesh_proto::relay::{
    decode_datagram, decode_frame, encode_data, encode_datagram, hello_method, Frame, FrameError,
    PEER_ID_LEN,
};
use ztmesh_proto::time::now_ms;

use crate::wire::{
    client_tls, from_relay, read_frame, transport, tune_tcp, unbounded, KEEPALIVE, OUT_QUEUE,
    SERVER_NAME, WRITE_BATCH,
};

/// How to reach the relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Quic,
    Tcp,
}

/// A relay to connect to.
#[derive(Clone, Debug)]
pub struct Target {
    /// The relay's name (the `HELLO` proof is signed for it).
    pub name: String,
    pub addr: SocketAddr,
    pub transport: Transport,
    /// SHA-256 of the relay's certificate.
    pub pin: [u8; 32],
}

impl Target {
    /// The target for `relay` (from a netmap) over `transport`.
    ///
    /// # Errors
    /// [`ClientError::Connect`] for an address or fingerprint that does not parse.
    pub fn from_relay(relay: &Relay, transport: Transport) -> Result<Self, ClientError> {
        let text = match transport {
            Transport::Quic => &relay.quic_addr,
            Transport::Tcp => &relay.tcp_addr,
        };
        let bad = |reason: &str| ClientError::Connect {
            addr: text.clone(),
            reason: reason.into(),
        };
        Ok(Self {
            name: relay.name.clone(),
            addr: text.parse().map_err(|_| bad("not an ip:port address"))?,
            transport,
            pin: relay
                .cert_sha256
                .as_slice()
                .try_into()
                .map_err(|_| bad("cert_sha256 is not 32 bytes"))?,
        })
    }
}

/// Why the client failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No connection (unreachable, TLS failure, pin mismatch, timeout).
    #[error("cannot connect to relay at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    /// The relay refused the `HELLO`; the reason says why (expired map,
    /// over budget…).
    #[error("relay refused the session: {0}")]
    Refused(String),
    /// The session ended (the relay's reason, or the transport's).
    #[error("relay session closed: {0}")]
    Closed(String),
    /// The relay sent something this client does not understand.
    #[error("relay protocol error: {0}")]
    Protocol(String),
    /// The datagram or map cannot be framed (empty, or too large).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The outbound queue is full ([`RelaySender::try_send`]): the datagram
    /// was dropped.
    #[error("relay queue full")]
    Full,
}

/// Where a session's received datagrams go: `data`, and `alive` held only
/// so that [`RelayClient::recv`] sees the session end when every reader has
/// stopped.
#[derive(Clone)]
struct Sink {
    data: mpsc::Sender<(u64, Vec<u8>)>,
    _alive: mpsc::Sender<(u64, Vec<u8>)>,
}

/// A cheap, cloneable handle that sends datagrams on a session without
/// waiting (for a data plane that must not block): over QUIC straight into
/// the connection, otherwise onto the writer's queue.
#[derive(Clone)]
pub struct RelaySender {
    quic: Option<quinn::Connection>,
    out: mpsc::Sender<Vec<u8>>,
}

impl RelaySender {
    /// Sends one WireGuard datagram to `peer` now.
    ///
    /// # Errors
    /// [`ClientError::Full`] when the queue is full (the datagram is
    /// dropped), [`ClientError::Frame`] for an empty or oversized datagram,
    /// [`ClientError::Closed`] once the session ended.
    pub fn try_send(&self, peer: u64, datagram: &[u8]) -> Result<(), ClientError> {
        if let Some(conn) = &self.quic {
            if let Some(sent) = send_quic_datagram(conn, peer, datagram) {
                return sent;
            }
        }
        let mut frame = Vec::with_capacity(13 + datagram.len());
        encode_data(peer, datagram, &mut frame)?;
        self.out.try_send(frame).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => ClientError::Full,
            mpsc::error::TrySendError::Closed(_) => ClientError::Closed("session ended".into()),
        })
    }
}

/// Sends `datagram` for `peer` as a QUIC datagram when it fits the path;
/// `None` when it does not (the caller uses the stream).
fn send_quic_datagram(
    conn: &quinn::Connection,
    peer: u64,
    datagram: &[u8],
) -> Option<Result<(), ClientError>> {
    let fits = conn
        .max_datagram_size()
        .is_some_and(|max| PEER_ID_LEN + datagram.len() <= max);
    if !fits {
        return None;
    }
    let mut buf = Vec::with_capacity(PEER_ID_LEN + datagram.len());
    if let Err(e) = encode_datagram(peer, datagram, &mut buf) {
        return Some(Err(e.into()));
    }
    match conn.send_datagram(Bytes::from(buf)) {
        Ok(()) => Some(Ok(())),
        // The path shrank since we looked: use the stream.
        Err(quinn::SendDatagramError::TooLarge) => None,
        Err(e) => Some(Err(ClientError::Closed(e.to_string()))),
    }
}

/// A session with a relay.
pub struct RelayClient {
    node_id: u64,
    transport: Transport,
    quic: Option<(quinn::Endpoint, quinn::Connection)>,
    out: mpsc::Sender<Vec<u8>>,
    rx: mpsc::Receiver<(u64, Vec<u8>)>,
    ended: Arc<Mutex<Option<String>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl RelayClient {
    /// Connects, says `HELLO` with a fresh proof by `machine_key` and `map`,
    /// and waits for `WELCOME`, all within `timeout`.
    ///
    /// # Errors
    /// [`ClientError::Connect`] or [`ClientError::Refused`].
    pub async fn connect(
        target: &Target,
        machine_key: &SigningKey,
        map: &SignedNetMap,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        Self::connect_with(target, machine_key, map, timeout, None).await
    }

    /// Like [`RelayClient::connect`], but received datagrams go straight to
    /// `inbound` (no hop through this client); [`RelayClient::recv`] then
    /// only reports the end of the session.
    ///
    /// # Errors
    /// [`ClientError::Connect`] or [`ClientError::Refused`].
    pub async fn connect_into(
        target: &Target,
        machine_key: &SigningKey,
        map: &SignedNetMap,
        timeout: Duration,
        inbound: mpsc::Sender<(u64, Vec<u8>)>,
    ) -> Result<Self, ClientError> {
        Self::connect_with(target, machine_key, map, timeout, Some(inbound)).await
    }

    #[expect(
        clippy::disallowed_types,
        reason = "the proof's nonce comes from OS entropy, in this shell"
    )]
    async fn connect_with(
        target: &Target,
        machine_key: &SigningKey,
        map: &SignedNetMap,
        timeout: Duration,
        inbound: Option<mpsc::Sender<(u64, Vec<u8>)>>,
    ) -> Result<Self, ClientError> {
        use rand_core::OsRng;
        let proof = NodeProof::create(
            machine_key,
            &hello_method(&target.name),
            now_ms(),
            &mut OsRng,
        );
        let hello = Frame::Hello {
            proof,
            map: map.clone(),
        }
        .to_vec()?;
        let connect = async {
            match target.transport {
                Transport::Quic => Self::connect_quic(target, hello, inbound).await,
                Transport::Tcp => Self::connect_tcp(target, hello, inbound).await,
            }
        };
        tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| ClientError::Connect {
                addr: target.addr.to_string(),
                reason: format!("timed out after {timeout:?}"),
            })?
    }

    async fn connect_quic(
        target: &Target,
        hello: Vec<u8>,
        inbound: Option<mpsc::Sender<(u64, Vec<u8>)>>,
    ) -> Result<Self, ClientError> {
        let fail = |reason: String| ClientError::Connect {
            addr: target.addr.to_string(),
            reason,
        };
        let bind: SocketAddr = if target.addr.is_ipv4() {
            "0.0.0.0:0".parse().expect("static address")
        } else {
            "[::]:0".parse().expect("static address")
        };
        let endpoint = quinn::Endpoint::client(bind).map_err(|e| fail(e.to_string()))?;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(client_tls(target.pin))
            .map_err(|e| fail(e.to_string()))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
        cfg.transport_config(Arc::new(transport(0, Some(KEEPALIVE))));
        let conn = endpoint
            .connect_with(cfg, target.addr, SERVER_NAME)
            .map_err(|e| fail(e.to_string()))?
            .await
            .map_err(|e| fail(e.to_string()))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| fail(e.to_string()))?;
        send.write_all(&hello)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let node_id = welcome(&mut recv, target).await?;
        let Started {
            mut client,
            sink,
            ended,
        } = Self::start(node_id, Transport::Quic, recv, send, inbound);
        client
            .tasks
            .push(tokio::spawn(datagram_reader(conn.clone(), sink, ended)));
        client.quic = Some((endpoint, conn));
        Ok(client)
    }

    async fn connect_tcp(
        target: &Target,
        hello: Vec<u8>,
        inbound: Option<mpsc::Sender<(u64, Vec<u8>)>>,
    ) -> Result<Self, ClientError> {
        let fail = |reason: String| ClientError::Connect {
            addr: target.addr.to_string(),
            reason,
        };
        let tcp = tokio::net::TcpStream::connect(target.addr)
            .await
            .map_err(|e| fail(e.to_string()))?;
        tune_tcp(&tcp).map_err(|e| fail(e.to_string()))?;
        let name = rustls::pki_types::ServerName::try_from(SERVER_NAME)
            .expect("static name is valid")
            .to_owned();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(client_tls(target.pin)))
            .connect(name, tcp)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let (mut recv, mut send) = tokio::io::split(tls);
        send.write_all(&hello)
            .await
            .map_err(|e| fail(e.to_string()))?;
        send.flush().await.map_err(|e| fail(e.to_string()))?;
        let node_id = welcome(&mut recv, target).await?;
        Ok(Self::start(node_id, Transport::Tcp, recv, send, inbound).client)
    }

    fn start<R, W>(
        node_id: u64,
        transport: Transport,
        recv: R,
        send: W,
        inbound: Option<mpsc::Sender<(u64, Vec<u8>)>>,
    ) -> Started
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (out, out_rx) = mpsc::channel(OUT_QUEUE);
        let (tx, rx) = mpsc::channel(OUT_QUEUE);
        let sink = Sink {
            data: inbound.unwrap_or_else(|| tx.clone()),
            _alive: tx,
        };
        let ended = Arc::new(Mutex::new(None));
        let tasks = vec![
            tokio::spawn(writer(send, out_rx)),
            tokio::spawn(frame_reader(recv, sink.clone(), ended.clone())),
        ];
        Started {
            sink,
            ended: ended.clone(),
            client: Self {
                node_id,
                transport,
                quic: None,
                out,
                rx,
                ended,
                tasks,
            },
        }
    }

    /// The node id the relay knows this node by.
    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// The largest payload a QUIC datagram carries on this path now
    /// (`None` over TCP); larger datagrams go on the stream.
    pub fn max_datagram_size(&self) -> Option<usize> {
        self.quic.as_ref().and_then(|(_, c)| c.max_datagram_size())
    }

    /// Sends one WireGuard datagram to `peer`. Waits while the outbound
    /// queue is full.
    ///
    /// # Errors
    /// [`ClientError::Frame`] for an empty or oversized datagram,
    /// [`ClientError::Closed`] once the session ended.
    pub async fn send(&self, peer: u64, datagram: &[u8]) -> Result<(), ClientError> {
        if let Some((_, conn)) = &self.quic {
            if let Some(sent) = send_quic_datagram(conn, peer, datagram) {
                return sent;
            }
        }
        let mut frame = Vec::with_capacity(13 + datagram.len());
        encode_data(peer, datagram, &mut frame)?;
        self.queue(frame).await
    }

    /// A handle that sends on this session without waiting.
    pub fn sender(&self) -> RelaySender {
        RelaySender {
            quic: self.quic.as_ref().map(|(_, c)| c.clone()),
            out: self.out.clone(),
        }
    }

    /// Sends a newer signed map (each time the node installs one).
    ///
    /// # Errors
    /// [`ClientError::Frame`] for a map too large for a frame,
    /// [`ClientError::Closed`] once the session ended.
    pub async fn push_map(&self, map: &SignedNetMap) -> Result<(), ClientError> {
        self.queue(Frame::Map(map.clone()).to_vec()?).await
    }

    /// The next datagram from a peer: `(peer id, WireGuard datagram)`.
    ///
    /// # Errors
    /// [`ClientError::Closed`] with the relay's reason when the session ended.
    pub async fn recv(&mut self) -> Result<(u64, Vec<u8>), ClientError> {
        match self.rx.recv().await {
            Some(d) => Ok(d),
            None => Err(ClientError::Closed(self.end_reason())),
        }
    }

    /// Closes the session.
    pub async fn close(mut self) {
        if let Some((endpoint, conn)) = self.quic.take() {
            conn.close(quinn::VarInt::from_u32(0), b"bye");
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        }
    }

    async fn queue(&self, frame: Vec<u8>) -> Result<(), ClientError> {
        self.out
            .send(frame)
            .await
            .map_err(|_| ClientError::Closed(self.end_reason()))
    }

    fn end_reason(&self) -> String {
        self.ended
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| "connection closed".into())
    }
}

impl std::fmt::Debug for RelayClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayClient")
            .field("node_id", &self.node_id)
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

impl Drop for RelayClient {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some((_, conn)) = &self.quic {
            conn.close(quinn::VarInt::from_u32(0), b"bye");
        }
    }
}

struct Started {
    client: RelayClient,
    sink: Sink,
    ended: Arc<Mutex<Option<String>>>,
}

/// Reads the relay's answer to `HELLO`.
async fn welcome<R: AsyncRead + Unpin>(recv: &mut R, target: &Target) -> Result<u64, ClientError> {
    let mut buf = Vec::new();
    let closed = |reason: String| ClientError::Connect {
        addr: target.addr.to_string(),
        reason,
    };
    match read_frame(recv, &mut buf, from_relay, &mut unbounded).await {
        Ok(true) => {}
        Ok(false) => return Err(closed("closed before WELCOME".into())),
        Err(e) => return Err(closed(e.to_string())),
    }
    match decode_frame(&buf) {
        Ok(Frame::Welcome { node_id }) => Ok(node_id),
        Ok(Frame::Refused { reason }) => Err(ClientError::Refused(reason.into_owned())),
        Ok(_) => Err(ClientError::Protocol("expected WELCOME".into())),
        Err(e) => Err(ClientError::Protocol(e.to_string())),
    }
}

fn end(ended: &Mutex<Option<String>>, reason: String) {
    let mut e = ended.lock().unwrap_or_else(|e| e.into_inner());
    if e.is_none() {
        *e = Some(reason);
    }
}

async fn frame_reader<R: AsyncRead + Unpin>(
    mut recv: R,
    sink: Sink,
    ended: Arc<Mutex<Option<String>>>,
) {
    let mut buf = Vec::new();
    loop {
        match read_frame(&mut recv, &mut buf, from_relay, &mut unbounded).await {
            Ok(true) => {}
            Ok(false) => return end(&ended, "closed by the relay".into()),
            Err(e) => return end(&ended, e.to_string()),
        }
        match decode_frame(&buf) {
            Ok(Frame::Data { peer, datagram }) => {
                if sink.data.send((peer, datagram.to_vec())).await.is_err() {
                    return;
                }
            }
            Ok(Frame::Refused { reason }) => return end(&ended, reason.into_owned()),
            Ok(_) => return end(&ended, "unexpected frame from the relay".into()),
            Err(e) => return end(&ended, format!("malformed frame from the relay: {e}")),
        }
    }
}

async fn datagram_reader(conn: quinn::Connection, sink: Sink, ended: Arc<Mutex<Option<String>>>) {
    loop {
        match conn.read_datagram().await {
            Ok(d) => {
                if let Ok((peer, datagram)) = decode_datagram(&d) {
                    if sink.data.send((peer, datagram.to_vec())).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                // The stream's REFUSED, if any, is the better reason; give
                // the frame reader a moment to record it.
                tokio::time::sleep(Duration::from_millis(50)).await;
                return end(&ended, e.to_string());
            }
        }
    }
}

async fn writer<W: AsyncWrite + Unpin>(mut w: W, mut rx: mpsc::Receiver<Vec<u8>>) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    while let Some(first) = rx.recv().await {
        batch.extend_from_slice(&first);
        while batch.len() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(f) => batch.extend_from_slice(&f),
                Err(_) => break,
            }
        }
        if w.write_all(&batch).await.is_err() || w.flush().await.is_err() {
            return;
        }
        batch.clear();
    }
    let _ = w.shutdown().await;
}
