//! Certificate-pinned TLS channels to the controller.
//!
//! The controller's certificate is self-signed; instead of a CA, clients pin the
//! SHA-256 of the certificate (its *fingerprint*), which the auth key carries.
//! A mismatch fails the handshake, before any request is sent.
//!
//! While the controller rotates its certificate, a client may hold several
//! pins (the one it enrolled with and those a signed netmap listed) and
//! accepts any of them. It names the pin it prefers in an extra ALPN
//! protocol id, `ztmesh-pin=<64 hex>`, offered after `h2`: a controller that
//! still holds that certificate presents it (see the controller's
//! `tlscerts`), so a client that only knows an older certificate still
//! connects. The server keeps negotiating `h2`, and a TLS-passthrough load
//! balancer sees nothing unusual.

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

/// The ALPN protocol id prefix that names the pin a client prefers.
pub const PIN_ALPN_PREFIX: &[u8] = b"ztmesh-pin=";

/// The ALPN protocol id naming `pin`: `ztmesh-pin=<64 lowercase hex>`.
pub fn pin_alpn(pin: &[u8; 32]) -> Vec<u8> {
    [PIN_ALPN_PREFIX, hex(pin).as_bytes()].concat()
}

/// The pin an ALPN protocol id names, if it is a `ztmesh-pin=` id.
pub fn pin_from_alpn(proto: &[u8]) -> Option<[u8; 32]> {
    let text = std::str::from_utf8(proto.strip_prefix(PIN_ALPN_PREFIX)?).ok()?;
    crate::auth::parse_fingerprint(text)
}

/// Accepts exactly the certificates whose SHA-256 is one of `pins`.
#[derive(Debug)]
struct PinnedVerifier {
    pins: Vec<[u8; 32]>,
    provider: Arc<CryptoProvider>,
}

impl PinnedVerifier {
    /// Whether `cert` is one of the pinned certificates. Every pin is
    /// compared in constant time, and all of them are compared.
    fn holds(&self, cert: &[u8; 32]) -> bool {
        self.pins
            .iter()
            .fold(false, |found, pin| ct_eq(cert, pin) | found)
    }
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
        if self.holds(&got) {
            Ok(ServerCertVerified::assertion())
        } else {
            let pinned: Vec<String> = self.pins.iter().map(|p| hex(p)).collect();
            Err(rustls::Error::General(format!(
                "controller certificate fingerprint {} does not match the pinned {}",
                hex(&got),
                pinned.join(" or ")
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
    pinned_client_config_any(&[pin])
}

/// A rustls client config that trusts the certificates with any of the
/// fingerprints in `pins` (none: nothing is trusted) and asks the server
/// for the first one through the `ztmesh-pin=` ALPN id.
pub fn pinned_client_config_any(pins: &[[u8; 32]]) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = PinnedVerifier {
        pins: pins.to_vec(),
        provider: provider.clone(),
    };
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg.alpn_protocols.extend(pins.first().map(pin_alpn));
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
    connect_any(url, &[pin], timeout).await
}

/// Like [`connect`], accepting a certificate with any of `pins` and asking
/// for the first (see the module header).
///
/// # Errors
/// [`ConnectError`] for a bad URL or a failed connection.
pub async fn connect_any(
    url: &str,
    pins: &[[u8; 32]],
    timeout: Duration,
) -> Result<Channel, ConnectError> {
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
    let tls = tokio_rustls::TlsConnector::from(Arc::new(pinned_client_config_any(pins)));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier(pins: &[[u8; 32]]) -> PinnedVerifier {
        PinnedVerifier {
            pins: pins.to_vec(),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        }
    }

    fn check(v: &PinnedVerifier, der: &[u8]) -> Result<ServerCertVerified, rustls::Error> {
        v.verify_server_cert(
            &CertificateDer::from(der.to_vec()),
            &[],
            &ServerName::try_from("ztmesh-controller").unwrap(),
            &[],
            UnixTime::now(),
        )
    }

    #[test]
    fn tls_verifier_accepts_any_held_pin_and_refuses_the_rest() {
        let (old, new, other) = (
            b"old cert".as_slice(),
            b"new cert".as_slice(),
            b"other".as_slice(),
        );
        let v = verifier(&[sha256(new), sha256(old)]);
        assert!(check(&v, old).is_ok());
        assert!(check(&v, new).is_ok());
        let e = check(&v, other).unwrap_err().to_string();
        assert!(e.contains(&hex(&sha256(other))), "{e}");
        assert!(
            check(&verifier(&[]), old).is_err(),
            "no pin: nothing is trusted"
        );
    }

    #[test]
    fn tls_client_offers_h2_first_then_its_preferred_pin() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let cfg = pinned_client_config_any(&[a, b]);
        assert_eq!(cfg.alpn_protocols, vec![b"h2".to_vec(), pin_alpn(&a)]);
        assert_eq!(pin_from_alpn(&cfg.alpn_protocols[1]), Some(a));
        assert_eq!(pin_from_alpn(b"h2"), None);
        assert_eq!(pin_from_alpn(b"ztmesh-pin=zz"), None);
        assert_eq!(
            pinned_client_config_any(&[]).alpn_protocols,
            vec![b"h2".to_vec()]
        );
    }
}
