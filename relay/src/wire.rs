//! What the relay server and its client share on the wire (shell): reading
//! one length-prefixed frame from a byte stream, the QUIC transport
//! parameters and the TLS configurations.

use std::sync::Arc;
use std::time::Duration;

use quinn::{IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};
use tokio::io::{AsyncRead, AsyncReadExt};
use ztmesh_proto::relay::{frame_len, max_len, FrameError, ALPN, HEADER_LEN, MAX_FRAME_LEN};

/// The UDP payload QUIC starts with. 1,400 bytes fit any 1,500-byte path
/// over IPv4 or IPv6 (1,400 + 48 bytes of IPv6 and UDP headers) and leave a
/// QUIC datagram room for a full tunnel packet (1,280 + 32 bytes of
/// WireGuard + the 8-byte peer id, plus ~40 bytes of QUIC overhead), where
/// quinn's default of 1,200 does not. MTU discovery stays on and raises it
/// where the path allows; a datagram that does not fit `max_datagram_size()`
/// goes as a `DATA` frame on the stream instead.
pub const INITIAL_MTU: u16 = 1_400;
/// A session with no packets for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The client's QUIC keepalive, well inside [`IDLE_TIMEOUT`] and NAT UDP timeouts.
pub const KEEPALIVE: Duration = Duration::from_secs(10);
/// TCP keepalive on the TLS/TCP fallback (both ends): the first probe after
/// this much silence, the QUIC client's keepalive interval.
pub const TCP_KEEPALIVE_IDLE: Duration = KEEPALIVE;
/// Between unanswered keepalive probes.
pub const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// Unanswered probes before the kernel drops the connection:
/// 10 s + 4 × 5 s = 30 s, the QUIC [`IDLE_TIMEOUT`], so a laptop that
/// vanishes behind a NAT loses its session after ~30 s on either transport.
pub const TCP_KEEPALIVE_PROBES: u32 = 4;
/// Sent data left unacknowledged this long also ends the connection
/// (`TCP_USER_TIMEOUT`): a peer that vanished while the relay was sending to
/// it would otherwise keep the session through minutes of retransmissions.
pub const TCP_USER_TIMEOUT: Duration = IDLE_TIMEOUT;
/// Queued outbound frames per connection; beyond, datagrams are dropped
/// (WireGuard is loss-tolerant; queueing more only adds latency).
pub const OUT_QUEUE: usize = 1_024;
/// Frames written to the stream in one go.
pub const WRITE_BATCH: usize = 64 * 1024;

/// Bytes a frame buffer grows by at most per read: a data frame is read in
/// one go, a large map in steps that each ask the budget first.
pub const READ_CHUNK: usize = 256 * 1024;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The transport failed or the stream ended inside a frame.
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
    /// The length prefix is invalid (too long for its type, or an unknown
    /// type); the stream is out of sync.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The memory budget refused the bytes the frame needs.
    #[error("no memory budget for a {len}-byte frame")]
    OverBudget { len: usize },
}

/// The bounds of the frames a relay accepts from a client: `HELLO` and `MAP`
/// up to [`MAX_MAP_FRAME_LEN`](ztmesh_proto::relay::MAX_MAP_FRAME_LEN),
/// the rest up to [`MAX_FRAME_LEN`].
pub fn from_client(ty: u8) -> Result<usize, FrameError> {
    max_len(ty)
}

/// The bounds of the frames a client accepts from the relay, which never
/// sends a map: [`MAX_FRAME_LEN`] for every type.
pub fn from_relay(ty: u8) -> Result<usize, FrameError> {
    max_len(ty).map(|m| m.min(MAX_FRAME_LEN))
}

/// Reads one frame (`type | body`, without the length) into `buf`.
/// `Ok(false)` is a clean end of stream between frames.
///
/// The length is checked against `limit(type)` as soon as the type byte is
/// in, before any body is buffered. The buffer then grows as bytes arrive,
/// at most [`READ_CHUNK`] past what was received and never more than doubling,
/// and `grow(bytes)` is asked before each growth of its capacity (a sender
/// that announces megabytes and trickles holds only what it sent).
///
/// # Errors
/// [`ReadError`]; [`ReadError::OverBudget`] when `grow` says no. Not
/// cancel-safe: do not race it against other branches whose winning does
/// not end the stream.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    limit: fn(u8) -> Result<usize, FrameError>,
    grow: &mut (dyn FnMut(usize) -> bool + Send),
) -> Result<bool, ReadError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = r.read(&mut header[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        got += n;
    }
    let len = frame_len(header)?;
    let ty = r.read_u8().await?;
    let max = limit(ty)?;
    if len > max {
        return Err(FrameError::TooLong { len, max }.into());
    }
    buf.clear();
    while buf.len() < len {
        let want = (len - buf.len()).min(READ_CHUNK);
        let need = buf.len() + want;
        if need > buf.capacity() {
            let target = need.max(buf.capacity().saturating_mul(2)).min(len);
            if !grow(target - buf.capacity()) {
                return Err(ReadError::OverBudget { len });
            }
            buf.reserve_exact(target - buf.len());
        }
        if buf.is_empty() {
            buf.push(ty);
            continue;
        }
        let at = buf.len();
        buf.resize(need, 0);
        r.read_exact(&mut buf[at..]).await?;
    }
    Ok(true)
}

/// A `grow` for [`read_frame`] that never refuses.
pub fn unbounded(_: usize) -> bool {
    true
}

/// Sets `TCP_NODELAY`, keepalive ([`TCP_KEEPALIVE_IDLE`],
/// [`TCP_KEEPALIVE_INTERVAL`], [`TCP_KEEPALIVE_PROBES`]) and
/// [`TCP_USER_TIMEOUT`] on a TLS/TCP fallback connection, at the relay and
/// at the client.
///
/// # Errors
/// The socket option that could not be set.
pub fn tune_tcp(tcp: &tokio::net::TcpStream) -> std::io::Result<()> {
    tcp.set_nodelay(true)?;
    let sock = socket2::SockRef::from(tcp);
    sock.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(TCP_KEEPALIVE_IDLE)
            .with_interval(TCP_KEEPALIVE_INTERVAL)
            .with_retries(TCP_KEEPALIVE_PROBES),
    )?;
    sock.set_tcp_user_timeout(Some(TCP_USER_TIMEOUT))
}

/// QUIC transport parameters; `bidi_streams` is how many streams the peer
/// may open (the server allows the client one, the client allows none).
pub fn transport(bidi_streams: u32, keepalive: Option<Duration>) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.max_idle_timeout(Some(
        IdleTimeout::try_from(IDLE_TIMEOUT).expect("30 s is a valid idle timeout"),
    ));
    t.keep_alive_interval(keepalive);
    t.initial_mtu(INITIAL_MTU);
    t.mtu_discovery_config(Some(MtuDiscoveryConfig::default()));
    t.datagram_receive_buffer_size(Some(2 * 1024 * 1024));
    t.datagram_send_buffer_size(2 * 1024 * 1024);
    t.max_concurrent_bidi_streams(VarInt::from_u32(bidi_streams));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t
}

/// The server's TLS configuration (TLS 1.3, ALPN `ztmesh-relay/1`), for QUIC and TCP.
///
/// # Errors
/// A key that does not match the certificate.
pub fn server_tls(
    cert: rustls::pki_types::CertificateDer<'static>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// The client's TLS configuration: only the certificate with SHA-256 `pin`,
/// ALPN `ztmesh-relay/1`.
pub fn client_tls(pin: [u8; 32]) -> rustls::ClientConfig {
    let mut cfg = ztmesh_proto::tls::pinned_client_config(pin);
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg
}

/// The TLS server name the client sends (the pin, not the name, is checked).
pub const SERVER_NAME: &str = "ztmesh-relay";

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tcp_links_get_keepalive_and_a_user_timeout_within_the_quic_idle_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        for tcp in [&client, &server] {
            tune_tcp(tcp).unwrap();
            let s = socket2::SockRef::from(tcp);
            assert!(s.nodelay().unwrap());
            assert!(s.keepalive().unwrap());
            assert_eq!(s.keepalive_time().unwrap(), TCP_KEEPALIVE_IDLE);
            assert_eq!(s.keepalive_interval().unwrap(), TCP_KEEPALIVE_INTERVAL);
            assert_eq!(s.keepalive_retries().unwrap(), TCP_KEEPALIVE_PROBES);
            assert_eq!(s.tcp_user_timeout().unwrap(), Some(TCP_USER_TIMEOUT));
        }
        // A dead peer is noticed when the QUIC side would notice it.
        assert_eq!(
            TCP_KEEPALIVE_IDLE + TCP_KEEPALIVE_INTERVAL * TCP_KEEPALIVE_PROBES,
            IDLE_TIMEOUT
        );
        assert!(KEEPALIVE < IDLE_TIMEOUT / 2);
    }
}
