//! Key newtypes and their text encodings; key files written with mode 0600.
//!
//! ed25519 keys identify machines and the controller; x25519 keys are WireGuard
//! keys. Public keys print as standard base64 (44 characters), as `wg` prints
//! WireGuard keys. Private keys implement neither `Display` nor `Debug` output of
//! their bytes, so they cannot end up in a log line by accident.

use std::fmt;
use std::io::Write;
use std::path::Path;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::Signer;
use rand_core::CryptoRngCore;

/// Errors from parsing or loading keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The text is not base64 of exactly 32 bytes.
    #[error("invalid key encoding: expected base64 of 32 bytes")]
    Encoding,
    /// The bytes are not a valid point for this key type (ed25519 public keys only).
    #[error("invalid public key")]
    InvalidPoint,
    /// Reading or writing a key file failed.
    #[error("key file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn decode32(s: &str) -> Result<[u8; 32], KeyError> {
    let bytes = B64.decode(s.trim()).map_err(|_| KeyError::Encoding)?;
    bytes.try_into().map_err(|_| KeyError::Encoding)
}

/// An ed25519 public key: a machine's identity or the controller's netmap key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// Builds a key from raw bytes, rejecting bytes that are not a valid point.
    ///
    /// # Errors
    /// [`KeyError::InvalidPoint`] or [`KeyError::Encoding`] for a wrong length.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, KeyError> {
        let arr: [u8; 32] = bytes.try_into().map_err(|_| KeyError::Encoding)?;
        ed25519_dalek::VerifyingKey::from_bytes(&arr).map_err(|_| KeyError::InvalidPoint)?;
        Ok(Self(arr))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Verifies `sig` over `msg` with the strict rules (no malleable or small-order keys).
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        self.verifier().is_some_and(|v| v.verify(msg, sig))
    }

    /// The key with its point decompressed, for verifying many messages
    /// (`None` for bytes that are not a point, which verify nothing).
    pub fn verifier(&self) -> Option<Verifier> {
        ed25519_dalek::VerifyingKey::from_bytes(&self.0)
            .ok()
            .map(Verifier)
    }
}

/// A [`PublicKey`] ready to verify: its point is decompressed once, not once
/// per message.
#[derive(Clone, Debug)]
pub struct Verifier(ed25519_dalek::VerifyingKey);

impl Verifier {
    /// [`PublicKey::verify`].
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        let Ok(sig) = ed25519_dalek::Signature::from_slice(sig) else {
            return false;
        };
        self.0.verify_strict(msg, &sig).is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&B64.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        Self::from_slice(&decode32(s)?)
    }
}

/// An ed25519 private key. Never printed.
pub struct SigningKey(ed25519_dalek::SigningKey);

impl SigningKey {
    pub fn generate(rng: &mut impl CryptoRngCore) -> Self {
        Self(ed25519_dalek::SigningKey::generate(rng))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }

    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.0.sign(msg).to_bytes()
    }

    fn from_bytes(b: &[u8; 32]) -> Self {
        Self(ed25519_dalek::SigningKey::from_bytes(b))
    }

    /// The key file's content (base64 of the 32-byte seed): for writing
    /// the file only, never for a log.
    pub fn to_text(&self) -> String {
        B64.encode(self.0.to_bytes())
    }

    /// Loads an existing key from `path` (never creates one).
    ///
    /// # Errors
    /// I/O errors (a missing file included), or a file that does not hold a
    /// valid key.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self::from_bytes(&decode32(&text)?))
    }

    /// Loads the key from `path`, or generates one and writes it with mode 0600.
    ///
    /// # Errors
    /// I/O errors, or a file that does not hold a valid key.
    #[expect(
        clippy::disallowed_types,
        reason = "a key file is created here, in the shell, from OS entropy"
    )]
    pub fn load_or_generate(path: &Path) -> Result<Self, KeyError> {
        use rand_core::OsRng;
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(Self::from_bytes(&decode32(&text)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Self::generate(&mut OsRng);
                write_secret_file(path, key.to_text().as_bytes())?;
                Ok(key)
            }
            Err(source) => Err(KeyError::Io {
                path: path.display().to_string(),
                source,
            }),
        }
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey(public={})", self.public())
    }
}

/// A WireGuard (x25519) public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WgPublicKey(pub [u8; 32]);

impl WgPublicKey {
    /// # Errors
    /// [`KeyError::Encoding`] unless `bytes` is exactly 32 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, KeyError> {
        Ok(Self(bytes.try_into().map_err(|_| KeyError::Encoding)?))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_dalek(&self) -> x25519_dalek::PublicKey {
        x25519_dalek::PublicKey::from(self.0)
    }
}

impl fmt::Display for WgPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&B64.encode(self.0))
    }
}

impl fmt::Debug for WgPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgPublicKey({self})")
    }
}

impl FromStr for WgPublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        Ok(Self(decode32(s)?))
    }
}

/// A WireGuard (x25519) private key. Never printed except on explicit request
/// ([`WgPrivateKey::to_base64`], used by `wg-config --include-private-key`).
#[derive(Clone)]
pub struct WgPrivateKey(x25519_dalek::StaticSecret);

impl WgPrivateKey {
    pub fn generate(rng: &mut impl CryptoRngCore) -> Self {
        Self(x25519_dalek::StaticSecret::random_from_rng(rng))
    }

    pub fn public(&self) -> WgPublicKey {
        WgPublicKey(x25519_dalek::PublicKey::from(&self.0).to_bytes())
    }

    pub fn to_dalek(&self) -> x25519_dalek::StaticSecret {
        self.0.clone()
    }

    pub fn to_base64(&self) -> String {
        B64.encode(self.0.to_bytes())
    }

    /// Loads the key from `path`, or generates one and writes it with mode 0600.
    ///
    /// # Errors
    /// I/O errors, or a file that does not hold a valid key.
    #[expect(
        clippy::disallowed_types,
        reason = "a key file is created here, in the shell, from OS entropy"
    )]
    pub fn load_or_generate(path: &Path) -> Result<Self, KeyError> {
        use rand_core::OsRng;
        match std::fs::read_to_string(path) {
            Ok(text) => text.parse(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Self::generate(&mut OsRng);
                write_secret_file(path, key.to_base64().as_bytes())?;
                Ok(key)
            }
            Err(source) => Err(KeyError::Io {
                path: path.display().to_string(),
                source,
            }),
        }
    }
}

impl FromStr for WgPrivateKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        Ok(Self(x25519_dalek::StaticSecret::from(decode32(s)?)))
    }
}

impl fmt::Debug for WgPrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgPrivateKey(public={})", self.public())
    }
}

/// Writes `contents` to `path` atomically (temp file + rename), mode 0600 from
/// creation so the secret is never readable by others, even briefly.
///
/// Durable when it returns: the file is fsynced before the rename and its
/// directory after, so a power loss leaves either the old or the new file,
/// never an empty or missing one (ext4 and XFS may otherwise lose the rename
/// or keep a zero-length file).
///
/// # Errors
/// Any I/O error, with the path in the message.
pub fn write_secret_file(path: &Path, contents: &[u8]) -> Result<(), KeyError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| KeyError::Io {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(contents).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    sync_dir(dir).map_err(io)?;
    Ok(())
}

/// Fsyncs the directory `dir`, making a rename, creation or removal of an
/// entry in it durable.
///
/// # Errors
/// The directory cannot be opened or synced.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use rand_core::OsRng;

    use super::*;

    #[test]
    fn public_keys_round_trip_through_text() {
        let sk = SigningKey::generate(&mut OsRng);
        let pk = sk.public();
        assert_eq!(pk.to_string().parse::<PublicKey>().unwrap(), pk);
        let wk = WgPrivateKey::generate(&mut OsRng);
        let text = wk.to_base64();
        assert_eq!(text.parse::<WgPrivateKey>().unwrap().public(), wk.public());
        assert_eq!(
            wk.public().to_string().parse::<WgPublicKey>().unwrap(),
            wk.public()
        );
    }

    #[test]
    fn rejects_wrong_length_keys() {
        assert!("AAAA".parse::<WgPublicKey>().is_err());
        assert!("not base64!".parse::<PublicKey>().is_err());
    }

    fn scratch(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ztmesh-keys-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn secret_files_replace_the_old_content_with_mode_0600_and_no_temp_left() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("write");
        let path = dir.join("netmap.bin");
        std::fs::write(&path, b"old, world-readable").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_secret_file(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("netmap.bin")]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn directory_sync_runs_on_a_real_directory_and_reports_failures() {
        let dir = scratch("sync");
        sync_dir(&dir).unwrap();
        let err = sync_dir(&dir.join("missing")).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn debug_output_never_contains_private_bytes() {
        let wk = WgPrivateKey::generate(&mut OsRng);
        assert!(!format!("{wk:?}").contains(&wk.to_base64()));
    }

    #[test]
    fn key_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("ztmesh-keytest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("machine.key");
        let a = SigningKey::load_or_generate(&path).unwrap();
        let b = SigningKey::load_or_generate(&path).unwrap();
        assert_eq!(a.public(), b.public());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
