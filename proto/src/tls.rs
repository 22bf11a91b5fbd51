//! Certificate-pinned TLS channels to the controller.
//!
//! The controller's certificate is self-signed; instead of a CA, clients pin the
//! SHA-256 of the certificate (its *fingerprint*), which the auth key carries.
//! A mismatch fails the handshake, before any request is sent.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::auth::{ct_eq, hex, sha256};

/// Errors while connecting to the controller.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL is not `https://HOST:PORT`.
    #[error("invalid controller URL {0:?}: expected https://HOST:PORT")]
    BadUrl(String),
    /// Transport-level failure (unreachable, refused, TLS or pin mismatch).
    #[error("cannot connect to controller: {0}")]
    Transport(String),
}

/// Accepts exactly the certificate whose SHA-256 is `pin`.
#[derive(Debug)]
struct PinnedVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = sha256(end_entity.as_ref());
        if ct_eq(&got, &self.pin) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "controller certificate fingerprint {} does not match the pinned {}",
                hex(&got),
                hex(&self.pin)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A rustls client config that trusts only the certificate with fingerprint `pin`.
pub fn pinned_client_config(pin: [u8; 32]) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedVerifier { pin, provider }))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg
}

/// Opens a gRPC channel to `url` (`https://HOST:PORT`) pinned to `pin`.
///
/// The channel connects lazily only if `lazy`; otherwise the first connection is
/// made (and the pin checked) before this returns.
///
/// # Errors
/// [`ConnectError`] for a bad URL or a failed connection.
pub async fn connect(url: &str, pin: [u8; 32], timeout: Duration) -> Result<Channel, ConnectError> {
    let uri: Uri = url.parse().map_err(|_| ConnectError::BadUrl(url.into()))?;
    if uri.scheme_str() != Some("https") || uri.host().is_none() {
        return Err(ConnectError::BadUrl(url.into()));
    }
    let host = uri
        .host()
        .unwrap_or_default()
        .trim_matches(['[', ']'])
        .to_string();
    let port = uri.port_u16().unwrap_or(443);
    // tonic does TLS only when it owns the config; we bring our own connector,
    // so the endpoint URL is plain http and TLS happens inside the connector.
    let endpoint = Endpoint::from_shared(format!(
        "http://{}",
        uri.authority().map(|a| a.as_str()).unwrap_or_default()
    ))
    .map_err(|_| ConnectError::BadUrl(url.into()))?
    .connect_timeout(timeout)
    .tcp_nodelay(true)
    .http2_keep_alive_interval(Duration::from_secs(15))
    .keep_alive_timeout(Duration::from_secs(10))
    .keep_alive_while_idle(true);
    let tls = tokio_rustls::TlsConnector::from(Arc::new(pinned_client_config(pin)));
    let connector = tower::service_fn(move |_: Uri| {
        let tls = tls.clone();
        let host = host.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            // The server name is not checked (the pin is), but SNI needs a value.
            let name = ServerName::try_from("ztmesh-controller")
                .expect("static name is valid")
                .to_owned();
            let stream = tls.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    tokio::time::timeout(timeout, endpoint.connect_with_connector(connector))
        .await
        .map_err(|_| ConnectError::Transport(format!("timed out after {timeout:?}")))?
        .map_err(|e| ConnectError::Transport(error_chain(&e)))
}

/// Formats an error with its sources, so "transport error" shows its real cause.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}
