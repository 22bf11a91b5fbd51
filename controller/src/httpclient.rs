//! The HTTPS client the controller's outbound calls use (the OpenID
//! provider, alert webhooks): the system's roots plus an optional CA file,
//! ring as the TLS provider, no proxy, no redirects, a per-request timeout.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// A client trusting the system's roots and the certificates in `ca_file`.
///
/// # Errors
/// An unreadable or empty CA file, no roots at all, a TLS setup failure.
pub fn client(ca_file: Option<&Path>, timeout: Duration) -> Result<reqwest::Client, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;

    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (system, _unparsable) = roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        let shown_path = path.display();
        let pem = std::fs::read(path)
            .map_err(|e| format!("cannot read the CA file {shown_path}: {e}"))?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("the CA file {shown_path} is not PEM: {e}"))?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(format!(
                "the CA file {shown_path} holds no usable certificate"
            ));
        }
    }
    if roots.is_empty() {
        return Err(
            "no trusted CA: the system has no root certificates and no CA file is configured"
                .into(),
        );
    }
    tracing::debug!(
        system_roots = system,
        total = roots.len(),
        "https client roots loaded"
    );
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .user_agent(concat!("ztmesh-controller/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("http client setup: {}", error_chain(&e)))
}

/// An error and its sources (the TLS reason, say) on one line, unbounded.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}
