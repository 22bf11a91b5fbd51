//! The controller's TLS listener: accepts TCP, enforces the connection caps
//! (global and per source) and a TLS handshake deadline, and hands only
//! established TLS connections to the gRPC server.
//!
//! tonic's own TLS acceptor has no handshake deadline and no connection cap:
//! a client that opens TCP and sends nothing (or stalls mid-handshake) would
//! hold a socket and a task forever. Here every accepted socket first takes
//! a slot from [`ConnSlots`] (or is closed at once), then has
//! `handshake_timeout` to finish TLS and send the HTTP/2 client preface (or
//! is closed). The slot is released
//! when the connection ends, whoever ends it.

use std::collections::HashMap;
use std::future::Future as _;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::ratelimit::source_key;

/// Errors building the listener.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// `tls.crt` / `tls.key` in the data dir do not parse.
    #[error("the TLS certificate or key in the data dir is invalid: {0}")]
    BadIdentity(String),
}

/// A rustls server config for `cert`/`key` (PEM) speaking HTTP/2 only.
///
/// # Errors
/// [`ListenerError::BadIdentity`] if the PEM does not parse or the key does
/// not match.
pub fn server_tls_config(cert: &str, key: &str) -> Result<rustls::ServerConfig, ListenerError> {
    let bad = |e: &dyn std::fmt::Display| ListenerError::BadIdentity(e.to_string());
    let certs = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&e))?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| bad(&e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad(&e))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// Open-connection counts, global and per source (IPv4 address / IPv6 /64).
#[derive(Debug)]
pub struct ConnSlots {
    max_total: usize,
    max_per_source: usize,
    state: Mutex<SlotState>,
}

#[derive(Debug, Default)]
struct SlotState {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

impl ConnSlots {
    pub fn new(max_total: usize, max_per_source: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_source,
            state: Mutex::new(SlotState::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a slot for a connection from `ip`, or `None` when a cap is reached.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let key = source_key(ip);
        let mut st = self.lock();
        let mine = st.per_source.get(&key).copied().unwrap_or(0);
        if st.total >= self.max_total || mine >= self.max_per_source {
            return None;
        }
        st.total += 1;
        st.per_source.insert(key, mine + 1);
        Some(Slot {
            slots: self.clone(),
            key,
        })
    }

    /// Open connections, all sources together.
    pub fn open(&self) -> usize {
        self.lock().total
    }

    fn release(&self, key: IpAddr) {
        let mut st = self.lock();
        st.total = st.total.saturating_sub(1);
        if let Some(n) = st.per_source.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.per_source.remove(&key);
            }
        }
    }
}

/// One open connection's share of [`ConnSlots`]; released on drop.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<ConnSlots>,
    key: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.release(self.key);
    }
}

/// The fixed bytes an HTTP/2 client sends first (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An established TLS connection holding its [`Slot`]. The HTTP/2 preface
/// was already read (to check it arrived in time) and is replayed to the
/// server first.
pub struct Conn {
    tls: TlsStream<TcpStream>,
    /// How much of [`H2_PREFACE`] the server has read back.
    preface_sent: usize,
    info: TcpConnectInfo,
    _slot: Slot,
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(rest) = H2_PREFACE
            .get(self.preface_sent..)
            .filter(|r| !r.is_empty())
        {
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.preface_sent += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
}

/// Sockets accepted per poll before yielding, so one flood cannot starve
/// the completion of handshakes.
const ACCEPT_BATCH: usize = 64;
/// Pause after an accept error (e.g. out of file descriptors).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The stream of established connections fed to the gRPC server.
pub struct Incoming {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    slots: Arc<ConnSlots>,
    handshake_timeout: Duration,
    handshakes: JoinSet<Option<Conn>>,
    paused: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Incoming {
    pub fn new(
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        slots: Arc<ConnSlots>,
        handshake_timeout: Duration,
    ) -> Self {
        Self {
            listener,
            acceptor: TlsAcceptor::from(tls),
            slots,
            handshake_timeout,
            handshakes: JoinSet::new(),
            paused: None,
        }
    }

    /// Takes a slot and starts the handshake, or closes `tcp` at once.
    fn start(&mut self, tcp: TcpStream, peer: SocketAddr) {
        let Some(slot) = self.slots.try_acquire(peer.ip()) else {
            tracing::debug!(source = %peer.ip(), "connection refused: connection cap reached");
            return;
        };
        let _ = tcp.set_nodelay(true);
        let info = TcpConnectInfo {
            local_addr: tcp.local_addr().ok(),
            remote_addr: Some(peer),
        };
        let acceptor = self.acceptor.clone();
        let limit = self.handshake_timeout;
        self.handshakes.spawn(async move {
            // TLS and the client's HTTP/2 preface share one deadline: a
            // client that completes TLS and then idles is dropped as well.
            let opening = async {
                let mut tls = acceptor.accept(tcp).await?;
                let mut preface = [0u8; H2_PREFACE.len()];
                tls.read_exact(&mut preface).await?;
                if preface != *H2_PREFACE {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "not an HTTP/2 client preface",
                    ));
                }
                Ok(tls)
            };
            match tokio::time::timeout(limit, opening).await {
                Ok(Ok(tls)) => Some(Conn {
                    tls,
                    preface_sent: 0,
                    info,
                    _slot: slot,
                }),
                Ok(Err(e)) => {
                    tracing::debug!(source = %peer.ip(), error = %e, "connection opening failed");
                    None
                }
                Err(_) => {
                    tracing::debug!(source = %peer.ip(), "TLS handshake or HTTP/2 preface timed out");
                    None
                }
            }
        });
    }
}

impl Stream for Incoming {
    type Item = io::Result<Conn>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(p) = this.paused.as_mut() {
            if p.as_mut().poll(cx).is_ready() {
                this.paused = None;
            }
        }
        if this.paused.is_none() {
            let mut budget_left = true;
            for i in 0..=ACCEPT_BATCH {
                if i == ACCEPT_BATCH {
                    budget_left = false;
                    break;
                }
                match this.listener.poll_accept(cx) {
                    Poll::Ready(Ok((tcp, peer))) => this.start(tcp, peer),
                    // A peer that reset before we accepted: its problem only.
                    Poll::Ready(Err(e)) if is_connection_error(&e) => {}
                    Poll::Ready(Err(e)) => {
                        tracing::warn!(error = %e, "accepting a connection failed; pausing");
                        let mut p = Box::pin(tokio::time::sleep(ACCEPT_ERROR_PAUSE));
                        // Registers the wake-up at the end of the pause.
                        let _ = p.as_mut().poll(cx);
                        this.paused = Some(p);
                        break;
                    }
                    Poll::Pending => break,
                }
            }
            if !budget_left {
                cx.waker().wake_by_ref();
            }
        }
        loop {
            match this.handshakes.poll_join_next(cx) {
                Poll::Ready(Some(Ok(Some(conn)))) => return Poll::Ready(Some(Ok(conn))),
                Poll::Ready(Some(_)) => continue,
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Errors of one incoming connection, as opposed to the listener's own
/// (e.g. out of file descriptors), which pause accepting.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_globally_and_per_source_and_released_on_drop() {
        let slots = ConnSlots::new(3, 2);
        let a: IpAddr = "198.18.0.1".parse().unwrap();
        let b: IpAddr = "fd00:1:2:3::1".parse().unwrap();
        let b2: IpAddr = "fd00:1:2:3::2".parse().unwrap();
        let a1 = slots.try_acquire(a).unwrap();
        let _a2 = slots.try_acquire(a).unwrap();
        assert!(slots.try_acquire(a).is_none(), "per-source cap");
        let _b1 = slots.try_acquire(b).unwrap();
        assert!(slots.try_acquire(b2).is_none(), "global cap");
        drop(a1);
        let _b2 = slots.try_acquire(b2).expect("a released slot is reused");
        drop(_a2);
        assert!(
            slots.try_acquire(b).is_none(),
            "another address of the same /64 shares its per-source cap"
        );
        assert_eq!(slots.open(), 2);
    }
}
