//! The controller's TLS certificates across a rotation (issue 19): the
//! current one, a staged next one and the previous one retained after a
//! switch; the rustls resolver that presents them; their files in the data
//! dir. The choice of certificate ([`Held::pick`]) and of the pins maps
//! carry ([`Held::pins`]) is pure.
//!
//! A client names the certificate it pins in the `ztmesh-pin=` ALPN id
//! (`ztmesh_proto::tls`); the resolver presents that one if it holds it,
//! else the current one. So a node whose auth key predates a switch still
//! connects while the previous certificate is retained.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use anyhow::Context as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use ztmesh_proto::auth::{ct_eq, sha256};
use ztmesh_proto::keys::write_secret_file;
use ztmesh_proto::UnixMs;

/// A certificate and key that cannot serve: they do not parse, the chain
/// is empty, the key type is unsupported or the key is not the
/// certificate's. Give a matching PEM certificate and key.
#[derive(Debug, thiserror::Error)]
#[error("the TLS certificate or key is invalid: {0}")]
pub struct BadCert(String);

/// One certificate with its key, parsed once.
#[derive(Clone)]
pub struct TlsCert {
    pub cert_pem: String,
    /// The private key, PEM. Never logged ([`fmt::Debug`] shows only the
    /// fingerprint).
    pub key_pem: String,
    /// SHA-256 of the certificate's DER: the pin.
    pub fingerprint: [u8; 32],
    certified: Arc<CertifiedKey>,
}

impl fmt::Debug for TlsCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsCert")
            .field("fingerprint", &ztmesh_proto::auth::hex(&self.fingerprint))
            .finish_non_exhaustive()
    }
}

impl TlsCert {
    /// Parses a certificate chain and its key (PEM), checking that they match.
    ///
    /// # Errors
    /// [`BadCert`] for PEM that does not parse, an empty chain, an
    /// unsupported key, or a key that is not the certificate's.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, BadCert> {
        let bad = |e: &dyn fmt::Display| BadCert(e.to_string());
        let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(&e))?;
        let first = certs.first().ok_or_else(|| bad(&"no certificate"))?;
        let fingerprint = sha256(first.as_ref());
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| bad(&e))?;
        let provider = rustls::crypto::ring::default_provider();
        let certified = CertifiedKey::from_der(certs, key, &provider).map_err(|e| bad(&e))?;
        Ok(Self {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            fingerprint,
            certified: Arc::new(certified),
        })
    }

    /// A new self-signed certificate for `ztmesh-controller`.
    ///
    /// # Errors
    /// [`BadCert`] if generation fails.
    pub fn generate() -> Result<Self, BadCert> {
        let ck = rcgen::generate_simple_self_signed(vec!["ztmesh-controller".to_string()])
            .map_err(|e| BadCert(e.to_string()))?;
        Self::from_pem(&ck.cert.pem(), &ck.signing_key.serialize_pem())
    }
}

/// The previous certificate, retained after a switch.
#[derive(Debug, Clone)]
pub struct Previous {
    pub cert: TlsCert,
    /// When it stopped being current: auth keys created before carry it.
    pub switched_ms: UnixMs,
    /// The earliest it may go (the grace period's end).
    pub until_ms: UnixMs,
}

/// The certificates a controller holds.
#[derive(Debug, Clone)]
pub struct Held {
    pub current: TlsCert,
    pub next: Option<TlsCert>,
    pub previous: Option<Previous>,
}

impl Held {
    pub fn new(current: TlsCert) -> Self {
        Self {
            current,
            next: None,
            previous: None,
        }
    }

    /// Every certificate held, current first, then next, then previous.
    pub fn all(&self) -> impl Iterator<Item = &TlsCert> {
        std::iter::once(&self.current)
            .chain(self.next.as_ref())
            .chain(self.previous.as_ref().map(|p| &p.cert))
    }

    /// The fingerprints of [`Held::all`].
    pub fn fingerprints(&self) -> Vec<[u8; 32]> {
        self.all().map(|c| c.fingerprint).collect()
    }

    /// The pins maps carry: every fingerprint while a rotation is under way
    /// (a next certificate staged or a previous one retained), else none.
    pub fn pins(&self) -> Vec<[u8; 32]> {
        if self.next.is_none() && self.previous.is_none() {
            return Vec::new();
        }
        self.fingerprints()
    }

    /// The certificate to present to a client that asked for `hint`: that
    /// one if held, else the current one.
    pub fn pick(&self, hint: Option<&[u8; 32]>) -> &TlsCert {
        hint.and_then(|h| self.all().find(|c| ct_eq(&c.fingerprint, h)))
            .unwrap_or(&self.current)
    }
}

/// The certificates behind the listener, swappable while it runs: a change
/// takes effect from the next handshake.
#[derive(Debug)]
pub struct TlsCerts {
    held: RwLock<Held>,
}

impl TlsCerts {
    pub fn new(held: Held) -> Arc<Self> {
        Arc::new(Self {
            held: RwLock::new(held),
        })
    }

    pub fn read(&self) -> RwLockReadGuard<'_, Held> {
        self.held.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn write(&self) -> RwLockWriteGuard<'_, Held> {
        self.held.write().unwrap_or_else(|p| p.into_inner())
    }

    /// A rustls server config presenting these certificates, speaking
    /// HTTP/2 only (the server's preference decides: `h2`, never the
    /// client's `ztmesh-pin=` hint).
    pub fn server_config(self: &Arc<Self>) -> rustls::ServerConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        cfg
    }
}

impl ResolvesServerCert for TlsCerts {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let hint = hello
            .alpn()
            .and_then(|mut ids| ids.find_map(ztmesh_proto::tls::pin_from_alpn));
        Some(self.read().pick(hint.as_ref()).certified.clone())
    }
}

/// The certificate files in a data dir.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    root: PathBuf,
}

/// The name of the file that says when the previous certificate was
/// switched out and until when it is kept at least (`SWITCHED_MS UNTIL_MS`).
const PREV_META: &str = "tls.prev.meta";

impl TlsFiles {
    pub fn in_dir(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn read_pair(&self, stem: &str) -> anyhow::Result<Option<TlsCert>> {
        let (c, k) = (
            self.path(&format!("{stem}.crt")),
            self.path(&format!("{stem}.key")),
        );
        if !c.exists() || !k.exists() {
            return Ok(None);
        }
        let cert =
            std::fs::read_to_string(&c).with_context(|| format!("reading {}", c.display()))?;
        let key =
            std::fs::read_to_string(&k).with_context(|| format!("reading {}", k.display()))?;
        TlsCert::from_pem(&cert, &key)
            .map(Some)
            .with_context(|| format!("{} / {}", c.display(), k.display()))
    }

    /// Writes `cert` as `STEM.crt` and `STEM.key` (the key 0600, first).
    fn write_pair(&self, stem: &str, cert: &TlsCert) -> anyhow::Result<()> {
        write_secret_file(&self.path(&format!("{stem}.key")), cert.key_pem.as_bytes())?;
        std::fs::write(self.path(&format!("{stem}.crt")), cert.cert_pem.as_bytes())?;
        Ok(())
    }

    fn remove_pair(&self, stem: &str) -> anyhow::Result<()> {
        for ext in ["crt", "key"] {
            let p = self.path(&format!("{stem}.{ext}"));
            if p.exists() {
                std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            }
        }
        Ok(())
    }

    /// Reads what is held: `tls.crt`/`tls.key` (required), a staged
    /// `tls.next.*` and a retained `tls.prev.*` with its `tls.prev.meta`.
    ///
    /// # Errors
    /// A missing current certificate, or any file that does not parse.
    pub fn load(&self) -> anyhow::Result<Held> {
        // A switch interrupted between its two renames: the key moved, the
        // certificate did not yet.
        let (next_crt, next_key) = (self.path("tls.next.crt"), self.path("tls.next.key"));
        if next_crt.exists() && !next_key.exists() {
            std::fs::rename(&next_crt, self.path("tls.crt"))
                .context("finishing an interrupted TLS switch")?;
        }
        let current = self
            .read_pair("tls")?
            .context("the data dir has no tls.crt and tls.key")?;
        let next = self.read_pair("tls.next")?;
        let previous = match self.read_pair("tls.prev")? {
            None => None,
            Some(cert) => {
                let meta = std::fs::read_to_string(self.path(PREV_META)).unwrap_or_default();
                let mut it = meta.split_whitespace().map(str::parse::<UnixMs>);
                match (it.next(), it.next()) {
                    (Some(Ok(switched_ms)), Some(Ok(until_ms))) => Some(Previous {
                        cert,
                        switched_ms,
                        until_ms,
                    }),
                    // Without its times nothing says which keys need it:
                    // keep it while any auth key at all is live.
                    _ => Some(Previous {
                        cert,
                        switched_ms: UnixMs::MAX,
                        until_ms: 0,
                    }),
                }
            }
        };
        // A switch interrupted before its renames: nothing switched.
        let previous = match previous {
            Some(p) if p.cert.fingerprint == current.fingerprint => {
                self.remove_previous()?;
                None
            }
            p => p,
        };
        Ok(Held {
            current,
            next,
            previous,
        })
    }

    /// Stages `next`.
    pub fn write_next(&self, next: &TlsCert) -> anyhow::Result<()> {
        self.write_pair("tls.next", next)
    }

    /// Writes the state after a switch: the previous certificate and its
    /// times first, then the staged files are renamed over the current
    /// ones, the key first ([`TlsFiles::load`] finishes a switch a crash
    /// interrupted). Without staged files, `held.current` is written.
    pub fn write_switch(&self, held: &Held) -> anyhow::Result<()> {
        if let Some(p) = &held.previous {
            self.write_pair("tls.prev", &p.cert)?;
            std::fs::write(
                self.path(PREV_META),
                format!("{} {}\n", p.switched_ms, p.until_ms),
            )?;
        }
        let staged = self.read_pair("tls.next")?;
        if staged.is_some_and(|n| n.fingerprint == held.current.fingerprint) {
            std::fs::rename(self.path("tls.next.key"), self.path("tls.key"))?;
            std::fs::rename(self.path("tls.next.crt"), self.path("tls.crt"))?;
            Ok(())
        } else {
            self.write_pair("tls", &held.current)?;
            self.remove_pair("tls.next")
        }
    }

    /// Removes the retained previous certificate.
    pub fn remove_previous(&self) -> anyhow::Result<()> {
        self.remove_pair("tls.prev")?;
        let meta = self.path(PREV_META);
        if meta.exists() {
            std::fs::remove_file(meta)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held() -> (Held, [u8; 32], [u8; 32], [u8; 32]) {
        let (c, n, p) = (
            TlsCert::generate().unwrap(),
            TlsCert::generate().unwrap(),
            TlsCert::generate().unwrap(),
        );
        let fps = (c.fingerprint, n.fingerprint, p.fingerprint);
        let h = Held {
            current: c,
            next: Some(n),
            previous: Some(Previous {
                cert: p,
                switched_ms: 1,
                until_ms: 2,
            }),
        };
        (h, fps.0, fps.1, fps.2)
    }

    #[test]
    fn tls_resolver_picks_the_hinted_certificate_it_holds() {
        let (h, c, n, p) = held();
        assert_eq!(h.pick(Some(&n)).fingerprint, n);
        assert_eq!(h.pick(Some(&p)).fingerprint, p);
        assert_eq!(h.pick(Some(&c)).fingerprint, c);
    }

    #[test]
    fn tls_resolver_presents_the_current_certificate_for_an_unknown_or_no_hint() {
        let (h, c, _, _) = held();
        assert_eq!(h.pick(Some(&[7; 32])).fingerprint, c);
        assert_eq!(h.pick(None).fingerprint, c);
    }

    #[test]
    fn tls_pins_are_listed_only_while_a_rotation_is_under_way() {
        let (mut h, c, n, p) = held();
        assert_eq!(h.pins(), vec![c, n, p], "current first");
        h.next = None;
        assert_eq!(h.pins(), vec![c, p]);
        h.previous = None;
        assert!(h.pins().is_empty());
        assert_eq!(h.fingerprints(), vec![c]);
    }

    #[test]
    fn tls_cert_refuses_a_key_of_another_certificate() {
        let (a, b) = (TlsCert::generate().unwrap(), TlsCert::generate().unwrap());
        assert!(TlsCert::from_pem(&a.cert_pem, &b.key_pem).is_err());
        assert!(TlsCert::from_pem("", &a.key_pem).is_err());
        assert!(
            !format!("{a:?}").contains("PRIVATE"),
            "the key is never shown"
        );
    }

    #[test]
    fn tls_files_round_trip_a_switch_and_the_removal_of_the_previous() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles::in_dir(dir.path());
        let (h, c, n, p) = held();
        files.write_switch(&Held::new(h.current.clone())).unwrap();
        files.write_next(h.next.as_ref().unwrap()).unwrap();
        let loaded = files.load().unwrap();
        assert_eq!(loaded.fingerprints(), vec![c, n]);
        files.write_switch(&h).unwrap();
        let loaded = files.load().unwrap();
        assert_eq!(loaded.fingerprints(), vec![c, p], "the staged files went");
        assert_eq!(loaded.previous.as_ref().unwrap().until_ms, 2);
        files.remove_previous().unwrap();
        assert_eq!(files.load().unwrap().fingerprints(), vec![c]);
    }

    #[test]
    fn tls_files_finish_or_undo_a_switch_a_crash_interrupted() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles::in_dir(dir.path());
        let (old, new) = (TlsCert::generate().unwrap(), TlsCert::generate().unwrap());
        let prev = |cert: &TlsCert| Previous {
            cert: cert.clone(),
            switched_ms: 1,
            until_ms: 2,
        };
        files.write_switch(&Held::new(old.clone())).unwrap();
        files.write_next(&new).unwrap();
        // Crashed after the previous was written, before the renames.
        files.write_pair("tls.prev", &old).unwrap();
        let h = files.load().unwrap();
        assert_eq!(h.fingerprints(), vec![old.fingerprint, new.fingerprint]);
        assert!(!dir.path().join("tls.prev.crt").exists());
        // Crashed between the key's rename and the certificate's.
        files.write_pair("tls.prev", &old).unwrap();
        std::fs::rename(dir.path().join("tls.next.key"), dir.path().join("tls.key")).unwrap();
        let h = files.load().unwrap();
        assert_eq!(h.current.fingerprint, new.fingerprint);
        assert!(h.next.is_none());
        assert_eq!(
            h.previous.map(|p| p.cert.fingerprint),
            Some(old.fingerprint)
        );
        // A whole switch.
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles::in_dir(dir.path());
        files.write_switch(&Held::new(old.clone())).unwrap();
        files.write_next(&new).unwrap();
        let after = Held {
            current: new.clone(),
            next: None,
            previous: Some(prev(&old)),
        };
        files.write_switch(&after).unwrap();
        let h = files.load().unwrap();
        assert_eq!(h.fingerprints(), vec![new.fingerprint, old.fingerprint]);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("tls.key"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "the renamed key stays private");
    }
}
