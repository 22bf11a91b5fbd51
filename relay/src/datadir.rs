//! The relay's data dir (shell): its self-signed TLS certificate (created
//! once; the key 0600), `identity.json` (what the controller hands to
//! nodes), `stats.json` (rewritten atomically every second) and the lock
//! held while `serve` runs.
//!
//! ```text
//! DIR/ (0700)
//!   tls.crt        self-signed, SAN "ztmesh-relay"; nodes pin SHA-256(DER)
//!   tls.key        0600
//!   identity.json  {"name","quic_addr","tcp_addr","stun_addrs","cert_sha256"}
//!   stats.json     see `server::Stats`
//!   relay.lock     flock'ed by `serve`
//! ```

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use ztmesh_proto::auth::{hex, parse_fingerprint, sha256};
use ztmesh_proto::control::Relay;
use ztmesh_proto::keys::write_secret_file;

/// Paths inside the data dir.
#[derive(Clone, Debug)]
pub struct DataDir {
    pub root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn tls_cert(&self) -> PathBuf {
        self.root.join("tls.crt")
    }
    pub fn tls_key(&self) -> PathBuf {
        self.root.join("tls.key")
    }
    pub fn identity(&self) -> PathBuf {
        self.root.join("identity.json")
    }
    pub fn stats(&self) -> PathBuf {
        self.root.join("stats.json")
    }
    pub fn lock_file(&self) -> PathBuf {
        self.root.join("relay.lock")
    }

    /// Creates the directory (0700) if needed.
    ///
    /// # Errors
    /// I/O errors, naming the path.
    pub fn create(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("creating data dir {}", self.root.display()))?;
        std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod 0700 {}", self.root.display()))?;
        Ok(())
    }
}

/// The relay's certificate and key, loaded.
#[derive(Debug)]
pub struct Tls {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
    /// SHA-256 of the certificate's DER: what nodes pin.
    pub fingerprint: [u8; 32],
}

/// Loads the certificate, creating it (and the 0600 key) on first use.
///
/// # Errors
/// I/O errors or files that do not parse, naming the file.
pub fn load_or_create_tls(dir: &DataDir) -> anyhow::Result<Tls> {
    if !dir.tls_cert().exists() {
        let ck = rcgen::generate_simple_self_signed(vec!["ztmesh-relay".to_string()])
            .context("generating the TLS certificate")?;
        write_secret_file(&dir.tls_key(), ck.signing_key.serialize_pem().as_bytes())?;
        write_atomic(&dir.tls_cert(), ck.cert.pem().as_bytes())?;
    }
    let cert = CertificateDer::from_pem_file(dir.tls_cert())
        .with_context(|| format!("reading {}", dir.tls_cert().display()))?;
    let key = PrivateKeyDer::from_pem_file(dir.tls_key())
        .with_context(|| format!("reading {}", dir.tls_key().display()))?;
    let fingerprint = sha256(cert.as_ref());
    Ok(Tls {
        cert,
        key,
        fingerprint,
    })
}

/// What `ztmesh-relay identity` prints: the fields of the `Relay` message,
/// the fingerprint in hex.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub name: String,
    pub quic_addr: String,
    pub tcp_addr: String,
    pub stun_addrs: Vec<String>,
    pub cert_sha256: String,
}

impl Identity {
    /// The `Relay` message a controller puts in netmaps.
    ///
    /// # Errors
    /// A fingerprint that is not 64 hex characters.
    pub fn to_relay(&self) -> anyhow::Result<Relay> {
        let fp =
            parse_fingerprint(&self.cert_sha256).context("cert_sha256 is not 64 hex characters")?;
        Ok(Relay {
            name: self.name.clone(),
            quic_addr: self.quic_addr.clone(),
            tcp_addr: self.tcp_addr.clone(),
            stun_addrs: self.stun_addrs.clone(),
            cert_sha256: fp.to_vec(),
        })
    }

    /// Builds the identity from a fingerprint.
    pub fn new(
        name: &str,
        quic_addr: String,
        tcp_addr: String,
        stun_addrs: Vec<String>,
        fingerprint: &[u8; 32],
    ) -> Self {
        Self {
            name: name.to_string(),
            quic_addr,
            tcp_addr,
            stun_addrs,
            cert_sha256: hex(fingerprint),
        }
    }
}

/// Reads `identity.json`, checking its fingerprint against `tls.crt`.
///
/// # Errors
/// A missing file (the relay never served from this dir), or a fingerprint
/// that does not match the certificate.
pub fn read_identity(dir: &DataDir) -> anyhow::Result<Identity> {
    let text = std::fs::read_to_string(dir.identity()).with_context(|| {
        format!(
            "reading {} (run `ztmesh-relay serve --data-dir {}` once first)",
            dir.identity().display(),
            dir.root.display()
        )
    })?;
    let id: Identity = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a relay identity", dir.identity().display()))?;
    let cert = CertificateDer::from_pem_file(dir.tls_cert())
        .with_context(|| format!("reading {}", dir.tls_cert().display()))?;
    anyhow::ensure!(
        id.cert_sha256 == hex(&sha256(cert.as_ref())),
        "{} does not match {}",
        dir.identity().display(),
        dir.tls_cert().display()
    );
    Ok(id)
}

/// Writes `contents` to `path` through a temporary file and a rename, so a
/// reader sees the old or the new file, never half of one.
///
/// # Errors
/// I/O errors, naming the path.
pub fn write_atomic(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(contents)
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// The exclusive lock on the data dir; released when dropped or at exit.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock without waiting.
    ///
    /// # Errors
    /// Another relay holds it, or the file cannot be opened.
    pub fn acquire(path: &Path) -> anyhow::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock takes a file descriptor we own for the call's duration.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        anyhow::ensure!(
            rc == 0,
            "another relay is running on this data dir: {} is locked",
            path.display()
        );
        Ok(Self { _file: file })
    }
}
