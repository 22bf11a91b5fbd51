//! The controller backup file: an encrypted envelope around a manifest and
//! the data dir's files. Pure: bytes in and out through `Read`/`Write`,
//! randomness passed in; no files, no clock.
//!
//! ```text
//! envelope v1 (integers big-endian)
//!   magic        8   "ZTMBKUP\0"
//!   version      2   1 (a newer one is refused, naming both)
//!   wrap kind    1   1 = X25519 recipient, 2 = passphrase
//!   chunk size   4   plaintext bytes per chunk (256 B ..= 1 MiB; 64 KiB written)
//!   stream salt 16   random: payload key = HKDF-SHA256(file key, salt, "ztmesh-backup v1 payload")
//!   wrap body        X25519: ephemeral public key (32)
//!                    passphrase: argon2id m_kib (4), t (4), p (4), salt (16)
//!   wrapped key 48   ChaCha20-Poly1305(wrap key, nonce 0, aad = every header byte before it)(file key)
//!   chunks           ChaCha20-Poly1305(payload key, nonce = 11-byte counter ‖ last flag,
//!                    aad = SHA-256(header)); every chunk but the last is full
//! ```
//!
//! The STREAM nonce makes reordering, dropping, truncation (at a chunk
//! boundary or inside one) and appended data fail authentication; the header
//! is authenticated by the key wrap and by every chunk. X25519 wrap key:
//! HKDF-SHA256(X25519(ephemeral, recipient), ephemeral ‖ recipient,
//! "ztmesh-backup v1 x25519"); passphrase wrap key: argon2id with the
//! header's parameters (bounded before use, so an altered header cannot
//! make the reader allocate gigabytes).
//!
//! The plaintext payload: a 4-byte length, the [`Manifest`] (JSON), then
//! each listed file's bytes in manifest order. Nothing is trusted before it
//! is verified: file names are plain names (no `/`, no leading `.`, no
//! duplicates), sizes and SHA-256 are checked as the bytes stream out, and
//! the payload must end exactly after the last file, in the final chunk.

use std::io::{self, Read, Write};

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, Key, KeyInit, Nonce, Tag};
use hmac::{Hmac, Mac};
use rand_core::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The envelope's first bytes.
pub const MAGIC: &[u8; 8] = b"ZTMBKUP\0";
/// The envelope version this binary writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// The manifest version this binary writes and reads.
pub const MANIFEST_VERSION: u32 = 1;
/// Plaintext bytes per chunk written.
pub const DEFAULT_CHUNK: u32 = 64 * 1024;
const MIN_CHUNK: u32 = 256;
const MAX_CHUNK: u32 = 1024 * 1024;
const TAG_LEN: usize = 16;
const KEY_LEN: usize = 32;
const WRAPPED_LEN: usize = KEY_LEN + TAG_LEN;
/// A manifest longer than this is refused before it is read.
const MAX_MANIFEST: u32 = 1024 * 1024;
/// The longest file name a manifest may list.
const MAX_NAME: usize = 64;
const RECIPIENT_PREFIX: &str = "ztmr1.";
const IDENTITY_PREFIX: &str = "ztmi1.";

/// Why a backup could not be written or read. Every variant names what to do.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The file does not start with the backup magic: not a ztmesh backup.
    #[error("not a ztmesh controller backup (bad magic)")]
    NotABackup,
    /// Written by a newer ztmesh: restore it with that version.
    #[error("backup format version {found} is newer than this binary reads ({supported}): restore it with a newer ztmesh-controller")]
    NewerFormat { found: u32, supported: u32 },
    /// The header is cut short or holds values out of range.
    #[error("malformed backup header: {0}")]
    Header(String),
    /// The key given does not open this backup (or its header was altered).
    #[error("{0}")]
    WrongKey(&'static str),
    /// A chunk does not authenticate: altered, reordered, cut or extended
    /// (which of these a mid-chunk cut or an append to a short final chunk
    /// is cannot be told apart).
    #[error("chunk {chunk} of the backup fails authentication: the file was corrupted, altered, truncated or extended")]
    Corrupt { chunk: u64 },
    /// The file ends at a chunk boundary before the final chunk.
    #[error("the backup is truncated: it ends after chunk {chunk}, before its final chunk")]
    Truncated { chunk: u64 },
    /// Bytes follow the final chunk (appended or concatenated files).
    #[error("data follows the backup's final chunk (chunk {chunk}): the file was altered or another file appended")]
    TrailingData { chunk: u64 },
    /// The manifest is not one this binary accepts.
    #[error("backup manifest: {0}")]
    Manifest(String),
    /// A file's bytes do not match the manifest.
    #[error("backup file {name}: {why}")]
    File { name: String, why: String },
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

pub type Result<T> = std::result::Result<T, FormatError>;

// ---------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------

/// An X25519 public key a backup is encrypted to (`ztmr1.<base64url>`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Recipient([u8; 32]);

/// The X25519 secret that opens backups encrypted to its [`Recipient`].
pub struct Identity(x25519_dalek::StaticSecret);

impl Recipient {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Display for Recipient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{RECIPIENT_PREFIX}{}", b64(&self.0))
    }
}

impl std::fmt::Debug for Recipient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Recipient({self})")
    }
}

impl std::str::FromStr for Recipient {
    type Err = FormatError;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            FormatError::Header(format!(
                "a recipient is {RECIPIENT_PREFIX}<43 base64url characters> (from `backup keygen`)"
            ))
        };
        let b = s.trim().strip_prefix(RECIPIENT_PREFIX).ok_or_else(bad)?;
        Ok(Self(unb64_32(b).ok_or_else(bad)?))
    }
}

impl Identity {
    /// A new identity from 32 random bytes.
    pub fn generate(rng: &mut (impl RngCore + CryptoRng)) -> Self {
        let mut b = [0u8; 32];
        rng.fill_bytes(&mut b);
        Self(x25519_dalek::StaticSecret::from(b))
    }

    pub fn recipient(&self) -> Recipient {
        Recipient(x25519_dalek::PublicKey::from(&self.0).to_bytes())
    }

    /// The identity file's text: comment lines, then `ztmi1.<base64url>`.
    pub fn to_file_text(&self) -> String {
        format!(
            "# ztmesh controller backup identity: it decrypts backups; keep it secret and offline.\n\
             # recipient: {}\n{IDENTITY_PREFIX}{}\n",
            self.recipient(),
            b64(self.0.as_bytes())
        )
    }

    /// Parses an identity file (`#` comment lines and blank lines ignored).
    ///
    /// # Errors
    /// [`FormatError::Header`] if there is not exactly one valid key line.
    pub fn from_file_text(text: &str) -> Result<Self> {
        let mut keys = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'));
        let bad = || {
            FormatError::Header(format!(
                "an identity file holds one line {IDENTITY_PREFIX}<base64url> (from `backup keygen`)"
            ))
        };
        let line = keys.next().ok_or_else(bad)?;
        if keys.next().is_some() {
            return Err(bad());
        }
        let b = line.strip_prefix(IDENTITY_PREFIX).ok_or_else(bad)?;
        Ok(Self(x25519_dalek::StaticSecret::from(
            unb64_32(b).ok_or_else(bad)?,
        )))
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity(for {})", self.recipient())
    }
}

/// argon2id cost parameters of a passphrase-wrapped backup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_kib: u32,
    /// Passes.
    pub t: u32,
    /// Lanes.
    pub p: u32,
}

impl KdfParams {
    /// What `backup --passphrase-file` uses: 64 MiB, 3 passes, 1 lane
    /// (about a second on a small server; the reader needs the same memory).
    pub const DEFAULT: KdfParams = KdfParams {
        m_kib: 64 * 1024,
        t: 3,
        p: 1,
    };

    /// The bounds a reader accepts (an altered header must not make it
    /// allocate or spin without limit).
    fn check(&self) -> Result<()> {
        let ok = (8..=1024 * 1024).contains(&self.m_kib)
            && (1..=16).contains(&self.t)
            && (1..=8).contains(&self.p)
            && self.m_kib >= 8 * self.p;
        if !ok {
            return Err(FormatError::Header(format!(
                "argon2id parameters out of range (m={} KiB, t={}, p={}; at most 1 GiB, 16 passes, 8 lanes)",
                self.m_kib, self.t, self.p
            )));
        }
        Ok(())
    }
}

/// How a new backup's file key is protected.
pub enum Seal<'a> {
    To(&'a Recipient),
    Passphrase(&'a [u8], KdfParams),
}

/// What opens a backup.
pub enum Open<'a> {
    Identity(&'a Identity),
    Passphrase(&'a [u8]),
}

/// The kind of key a backup was sealed with, as its header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WrapKind {
    X25519,
    Passphrase,
}

impl WrapKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WrapKind::X25519 => "x25519",
            WrapKind::Passphrase => "passphrase",
        }
    }
}

// ---------------------------------------------------------------------------
// Manifest
// ---------------------------------------------------------------------------

/// What a backup holds; the first thing in its payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_VERSION`].
    pub format: u32,
    pub created_ms: i64,
    /// The controller's public netmap signing key (base64), as in `controller.key`.
    pub controller_key: String,
    pub store: StoreKind,
    /// SQLite `PRAGMA user_version` of the database file; none for PostgreSQL.
    pub schema_version: Option<u32>,
    pub files: Vec<FileEntry>,
}

/// Where the controller's state lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// The data dir's `ztmesh.db`, carried in the backup.
    Sqlite,
    /// A PostgreSQL database: not in the backup, dump it with `pg_dump`.
    Postgresql,
}

impl StoreKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreKind::Sqlite => "sqlite",
            StoreKind::Postgresql => "postgresql",
        }
    }
}

/// One file of the backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// A plain file name in the data dir.
    pub name: String,
    pub size: u64,
    /// Lowercase hex.
    pub sha256: String,
}

impl FileEntry {
    /// The entry of `bytes` named `name`.
    pub fn of(name: &str, bytes: &[u8]) -> Self {
        Self {
            name: name.to_string(),
            size: bytes.len() as u64,
            sha256: hex(&Sha256::digest(bytes)),
        }
    }
}

impl Manifest {
    /// The entry named `name`.
    pub fn file(&self, name: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.name == name)
    }

    /// Refuses what a reader must not act on: a newer manifest, a name that
    /// is not a plain file name, a name listed twice.
    fn check(&self) -> Result<()> {
        if self.format > MANIFEST_VERSION {
            return Err(FormatError::NewerFormat {
                found: self.format,
                supported: MANIFEST_VERSION,
            });
        }
        if self.format == 0 {
            return Err(FormatError::Manifest(
                "format 0 is not a manifest version".into(),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for f in &self.files {
            check_name(&f.name)?;
            if !seen.insert(f.name.as_str()) {
                return Err(FormatError::Manifest(format!(
                    "{:?} is listed twice",
                    f.name
                )));
            }
            if f.sha256.len() != 64 || !f.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(FormatError::Manifest(format!(
                    "{:?} has no SHA-256 (64 hex characters)",
                    f.name
                )));
            }
        }
        Ok(())
    }
}

/// A plain file name: letters, digits, `.`, `_`, `-`; not starting with `.`.
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(FormatError::Manifest(format!(
            "{:?} is not a plain file name",
            name.chars().take(80).collect::<String>()
        )))
    }
}

// ---------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------

/// Writes a whole backup to `out`: the envelope around `manifest` and the
/// files' bytes (`files` in manifest order, each yielding exactly its
/// entry's size). Returns `out`.
///
/// # Errors
/// A failing reader or writer; a file whose length or SHA-256 differs from
/// its entry (it changed while being read); a manifest that does not list
/// `files` in order.
pub fn write<W: Write>(
    out: W,
    seal: &Seal<'_>,
    manifest: &Manifest,
    files: Vec<(&str, &mut dyn Read)>,
    chunk: u32,
    rng: &mut (impl RngCore + CryptoRng),
) -> Result<W> {
    manifest.check()?;
    let names: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
    let listed: Vec<&str> = manifest.files.iter().map(|f| f.name.as_str()).collect();
    if names != listed {
        return Err(FormatError::Manifest(format!(
            "files {names:?} do not match the manifest's {listed:?}"
        )));
    }
    let mut enc = Encryptor::new(out, seal, chunk, rng)?;
    let json = serde_json::to_vec(manifest).map_err(|e| FormatError::Manifest(e.to_string()))?;
    let len = u32::try_from(json.len())
        .ok()
        .filter(|l| *l <= MAX_MANIFEST)
        .ok_or_else(|| FormatError::Manifest("too large".into()))?;
    enc.write_all(&len.to_be_bytes())?;
    enc.write_all(&json)?;
    for ((name, reader), entry) in files.into_iter().zip(&manifest.files) {
        let mut hashing = HashingWriter::new(&mut enc);
        let n = io::copy(&mut (&mut *reader).take(entry.size), &mut hashing)?;
        let digest = hex(&hashing.hash.finalize());
        let mut extra = [0u8; 1];
        if n != entry.size || reader.read(&mut extra)? != 0 || digest != entry.sha256 {
            return Err(FormatError::File {
                name: name.to_string(),
                why: "changed while it was being backed up".into(),
            });
        }
    }
    enc.finish()
}

/// Encrypts a payload into `out` in STREAM chunks; [`Encryptor::finish`]
/// writes the final chunk.
struct Encryptor<W: Write> {
    out: W,
    aead: ChaCha20Poly1305,
    aad: [u8; 32],
    buf: Vec<u8>,
    chunk: usize,
    counter: u64,
}

impl<W: Write> Encryptor<W> {
    fn new(
        mut out: W,
        seal: &Seal<'_>,
        chunk: u32,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<Self> {
        if !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk) {
            return Err(FormatError::Header(format!(
                "chunk size {chunk} out of range"
            )));
        }
        let mut file_key = [0u8; KEY_LEN];
        rng.fill_bytes(&mut file_key);
        let mut salt = [0u8; 16];
        rng.fill_bytes(&mut salt);
        let mut header = Vec::with_capacity(128);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        let wrap_key = match seal {
            Seal::To(r) => {
                header.push(1);
                header.extend_from_slice(&chunk.to_be_bytes());
                header.extend_from_slice(&salt);
                let mut e = [0u8; 32];
                rng.fill_bytes(&mut e);
                let eph = x25519_dalek::StaticSecret::from(e);
                let eph_pub = x25519_dalek::PublicKey::from(&eph);
                header.extend_from_slice(eph_pub.as_bytes());
                let shared = eph.diffie_hellman(&x25519_dalek::PublicKey::from(r.0));
                if !shared.was_contributory() {
                    return Err(FormatError::Header(
                        "the recipient is not a usable X25519 key".into(),
                    ));
                }
                x25519_wrap_key(shared.as_bytes(), eph_pub.as_bytes(), &r.0)
            }
            Seal::Passphrase(pass, params) => {
                params.check()?;
                if pass.is_empty() {
                    return Err(FormatError::WrongKey("the passphrase is empty"));
                }
                header.push(2);
                header.extend_from_slice(&chunk.to_be_bytes());
                header.extend_from_slice(&salt);
                let mut kdf_salt = [0u8; 16];
                rng.fill_bytes(&mut kdf_salt);
                for v in [params.m_kib, params.t, params.p] {
                    header.extend_from_slice(&v.to_be_bytes());
                }
                header.extend_from_slice(&kdf_salt);
                passphrase_key(pass, &kdf_salt, params)?
            }
        };
        let mut wrapped = file_key;
        let tag = ChaCha20Poly1305::new(Key::from_slice(&wrap_key))
            .encrypt_in_place_detached(&Nonce::default(), &header, &mut wrapped)
            .map_err(|_| FormatError::Header("cannot wrap the file key".into()))?;
        header.extend_from_slice(&wrapped);
        header.extend_from_slice(&tag);
        out.write_all(&header)?;
        let payload_key = hkdf_sha256(&salt, &file_key, b"ztmesh-backup v1 payload");
        Ok(Self {
            out,
            aead: ChaCha20Poly1305::new(Key::from_slice(&payload_key)),
            aad: Sha256::digest(&header).into(),
            buf: Vec::with_capacity(chunk as usize + TAG_LEN),
            chunk: chunk as usize,
            counter: 0,
        })
    }

    /// Encrypts and writes the buffered chunk.
    fn emit(&mut self, last: bool) -> io::Result<()> {
        let nonce = stream_nonce(self.counter, last);
        let tag = self
            .aead
            .encrypt_in_place_detached(&nonce, &self.aad, &mut self.buf)
            .map_err(|_| io::Error::other("chunk encryption failed"))?;
        self.buf.extend_from_slice(&tag);
        self.out.write_all(&self.buf)?;
        self.buf.clear();
        self.counter = self
            .counter
            .checked_add(1)
            .ok_or_else(|| io::Error::other("too many chunks"))?;
        Ok(())
    }

    /// Writes the final chunk (possibly empty) and returns the writer.
    fn finish(mut self) -> Result<W> {
        self.emit(true)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

impl<W: Write> Write for Encryptor<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut rest = data;
        while !rest.is_empty() {
            // A full buffer is written only once more data follows: the
            // final chunk is whatever is buffered at `finish`.
            if self.buf.len() == self.chunk {
                self.emit(false)?;
            }
            let take = (self.chunk - self.buf.len()).min(rest.len());
            self.buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------

/// What the header of a backup says, before any key is tried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeaderInfo {
    pub version: u16,
    pub wrap: WrapKind,
    pub chunk: u32,
}

/// An opened backup: its manifest read and checked; [`Reader::extract`]
/// streams out and verifies the files.
pub struct Reader<R: Read> {
    pub header: HeaderInfo,
    pub manifest: Manifest,
    dec: Decryptor<R>,
}

/// Opens a backup: reads and checks the header, unwraps the file key with
/// `key`, reads and checks the manifest.
///
/// # Errors
/// Every [`FormatError`] that the first part of the file can show.
pub fn open<R: Read>(mut input: R, key: &Open<'_>) -> Result<Reader<R>> {
    let mut fixed = [0u8; 8 + 2 + 1 + 4 + 16];
    read_header(&mut input, &mut fixed[..8])?;
    if &fixed[..8] != MAGIC {
        return Err(FormatError::NotABackup);
    }
    read_header(&mut input, &mut fixed[8..])?;
    let version = u16::from_be_bytes([fixed[8], fixed[9]]);
    if version > FORMAT_VERSION {
        return Err(FormatError::NewerFormat {
            found: version.into(),
            supported: FORMAT_VERSION.into(),
        });
    }
    if version == 0 {
        return Err(FormatError::Header("version 0".into()));
    }
    let wrap = match fixed[10] {
        1 => WrapKind::X25519,
        2 => WrapKind::Passphrase,
        k => return Err(FormatError::Header(format!("unknown key wrap {k}"))),
    };
    let chunk = u32::from_be_bytes([fixed[11], fixed[12], fixed[13], fixed[14]]);
    if !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk) {
        return Err(FormatError::Header(format!(
            "chunk size {chunk} out of range"
        )));
    }
    let salt: [u8; 16] = fixed[15..31].try_into().expect("16 bytes by construction");
    let mut header = fixed.to_vec();
    let wrap_key = match (wrap, key) {
        (WrapKind::X25519, Open::Identity(id)) => {
            let mut eph = [0u8; 32];
            read_header(&mut input, &mut eph)?;
            header.extend_from_slice(&eph);
            let shared = id.0.diffie_hellman(&x25519_dalek::PublicKey::from(eph));
            if !shared.was_contributory() {
                return Err(FormatError::WrongKey(
                    "this backup is not encrypted to this identity, or its header was altered",
                ));
            }
            x25519_wrap_key(shared.as_bytes(), &eph, &id.recipient().0)
        }
        (WrapKind::Passphrase, Open::Passphrase(pass)) => {
            let mut body = [0u8; 12 + 16];
            read_header(&mut input, &mut body)?;
            header.extend_from_slice(&body);
            let word = |i: usize| u32::from_be_bytes(body[i..i + 4].try_into().expect("4 bytes"));
            let params = KdfParams {
                m_kib: word(0),
                t: word(4),
                p: word(8),
            };
            params.check()?;
            passphrase_key(pass, &body[12..], &params)?
        }
        (WrapKind::X25519, Open::Passphrase(_)) => {
            return Err(FormatError::WrongKey(
                "this backup is encrypted to an X25519 recipient: give --identity, not --passphrase-file",
            ))
        }
        (WrapKind::Passphrase, Open::Identity(_)) => {
            return Err(FormatError::WrongKey(
                "this backup is encrypted with a passphrase: give --passphrase-file, not --identity",
            ))
        }
    };
    let mut wrapped = [0u8; WRAPPED_LEN];
    read_header(&mut input, &mut wrapped)?;
    let aad = header.clone();
    // The chunks authenticate the header as written: the wrapped key too.
    header.extend_from_slice(&wrapped);
    let (ct, tag) = wrapped.split_at_mut(KEY_LEN);
    ChaCha20Poly1305::new(Key::from_slice(&wrap_key))
        .decrypt_in_place_detached(&Nonce::default(), &aad, ct, Tag::from_slice(tag))
        .map_err(|_| {
            FormatError::WrongKey(match wrap {
                WrapKind::X25519 => {
                    "this backup is not encrypted to this identity, or its header was altered"
                }
                WrapKind::Passphrase => "wrong passphrase, or the backup's header was altered",
            })
        })?;
    let file_key: [u8; KEY_LEN] = ct.try_into().expect("32 bytes by construction");
    let payload_key = hkdf_sha256(&salt, &file_key, b"ztmesh-backup v1 payload");
    let mut dec = Decryptor {
        input,
        aead: ChaCha20Poly1305::new(Key::from_slice(&payload_key)),
        aad: Sha256::digest(&header).into(),
        chunk: chunk as usize,
        cipher: vec![0; chunk as usize + TAG_LEN],
        plain: Vec::new(),
        pos: 0,
        pending: None,
        counter: 0,
        done: false,
    };
    let mut len = [0u8; 4];
    payload_exact(&mut dec, &mut len, "the manifest's length")?;
    let len = u32::from_be_bytes(len);
    if len > MAX_MANIFEST {
        return Err(FormatError::Manifest(format!("{len} bytes is too large")));
    }
    let mut json = vec![0u8; len as usize];
    payload_exact(&mut dec, &mut json, "the manifest")?;
    let manifest: Manifest = serde_json::from_slice(&json)
        .map_err(|e| FormatError::Manifest(format!("not valid: {e}")))?;
    manifest.check()?;
    Ok(Reader {
        header: HeaderInfo {
            version,
            wrap,
            chunk,
        },
        manifest,
        dec,
    })
}

impl<R: Read> Reader<R> {
    /// Streams every file into the writer `sink` returns for its entry,
    /// checking its size and SHA-256, then checks that the payload ends
    /// there, in the authenticated final chunk. Only when this returns `Ok`
    /// is everything written verified: callers stage the files and act on
    /// them afterwards.
    ///
    /// # Errors
    /// Any [`FormatError`] of the payload; the sink's I/O errors.
    pub fn extract(
        mut self,
        mut sink: impl FnMut(&FileEntry) -> io::Result<Box<dyn Write>>,
    ) -> Result<Manifest> {
        let files = self.manifest.files.clone();
        for entry in &files {
            let mut out = sink(entry)?;
            let mut hashing = HashingWriter::new(&mut out);
            let n =
                io::copy(&mut (&mut self.dec).take(entry.size), &mut hashing).map_err(from_io)?;
            if n != entry.size {
                return Err(FormatError::File {
                    name: entry.name.clone(),
                    why: format!("the payload ends after {n} of its {} bytes", entry.size),
                });
            }
            let digest = hex(&hashing.hash.finalize());
            out.flush()?;
            if digest != entry.sha256 {
                return Err(FormatError::File {
                    name: entry.name.clone(),
                    why: "SHA-256 does not match the manifest".into(),
                });
            }
        }
        let mut rest = [0u8; 1];
        if self.dec.read(&mut rest).map_err(from_io)? != 0 {
            return Err(FormatError::Manifest(
                "the payload holds data after the last listed file".into(),
            ));
        }
        Ok(self.manifest)
    }
}

/// Decrypts STREAM chunks; reads plaintext until the final chunk has been
/// authenticated, then reports end of file.
struct Decryptor<R: Read> {
    input: R,
    aead: ChaCha20Poly1305,
    aad: [u8; 32],
    chunk: usize,
    cipher: Vec<u8>,
    plain: Vec<u8>,
    pos: usize,
    /// A byte read to learn whether the previous chunk was the last.
    pending: Option<u8>,
    counter: u64,
    done: bool,
}

impl<R: Read> Decryptor<R> {
    /// Reads and authenticates the next chunk into `plain`.
    fn next_chunk(&mut self) -> Result<()> {
        let want = self.chunk + TAG_LEN;
        let mut n = 0;
        if let Some(b) = self.pending.take() {
            self.cipher[0] = b;
            n = 1;
        }
        n += read_full(&mut self.input, &mut self.cipher[n..want])?;
        let last = n < want || {
            let mut peek = [0u8; 1];
            match read_full(&mut self.input, &mut peek)? {
                0 => true,
                _ => {
                    self.pending = Some(peek[0]);
                    false
                }
            }
        };
        let chunk = self.counter;
        if n < TAG_LEN {
            return Err(if n == 0 && chunk > 0 {
                FormatError::Truncated { chunk: chunk - 1 }
            } else {
                FormatError::Corrupt { chunk }
            });
        }
        let (body, tag) = self.cipher[..n].split_at(n - TAG_LEN);
        let attempt = |flag: bool| {
            let mut buf = body.to_vec();
            self.aead
                .decrypt_in_place_detached(
                    &stream_nonce(chunk, flag),
                    &self.aad,
                    &mut buf,
                    Tag::from_slice(tag),
                )
                .map(|()| buf)
        };
        match attempt(last) {
            Ok(plain) => {
                self.plain = plain;
                self.pos = 0;
                self.done = last;
                self.counter += 1;
                Ok(())
            }
            // Authentic, but in the wrong place: the stream was cut here,
            // or something follows its end.
            Err(_) if attempt(!last).is_ok() => Err(if last {
                FormatError::Truncated { chunk }
            } else {
                FormatError::TrailingData { chunk }
            }),
            Err(_) => Err(FormatError::Corrupt { chunk }),
        }
    }
}

impl<R: Read> Read for Decryptor<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.plain.len() {
            if self.done {
                return Ok(0);
            }
            self.next_chunk().map_err(to_io)?;
        }
        let n = out.len().min(self.plain.len() - self.pos);
        out[..n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// HKDF-SHA256 (RFC 5869) with one block of output.
fn hkdf_sha256(salt: &[u8], ikm: &[u8], info: &[u8]) -> [u8; 32] {
    let mut ext = <Hmac<Sha256> as Mac>::new_from_slice(salt).expect("HMAC takes any key length");
    ext.update(ikm);
    let prk = ext.finalize().into_bytes();
    let mut exp = <Hmac<Sha256> as Mac>::new_from_slice(&prk).expect("HMAC takes any key length");
    exp.update(info);
    exp.update(&[1]);
    exp.finalize().into_bytes().into()
}

fn x25519_wrap_key(shared: &[u8; 32], eph: &[u8; 32], recipient: &[u8; 32]) -> [u8; 32] {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(eph);
    salt[32..].copy_from_slice(recipient);
    hkdf_sha256(&salt, shared, b"ztmesh-backup v1 x25519")
}

fn passphrase_key(pass: &[u8], salt: &[u8], p: &KdfParams) -> Result<[u8; 32]> {
    let params = argon2::Params::new(p.m_kib, p.t, p.p, Some(KEY_LEN))
        .map_err(|e| FormatError::Header(format!("argon2id parameters: {e}")))?;
    let mut out = [0u8; 32];
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password_into(pass, salt, &mut out)
        .map_err(|e| FormatError::Header(format!("argon2id: {e}")))?;
    Ok(out)
}

/// The STREAM nonce: an 11-byte big-endian chunk counter and the last-chunk flag.
fn stream_nonce(counter: u64, last: bool) -> Nonce {
    let mut n = [0u8; 12];
    n[3..11].copy_from_slice(&counter.to_be_bytes());
    n[11] = u8::from(last);
    Nonce::from(n)
}

/// Reads until `buf` is full or the input ends; returns how much was read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn read_header(r: &mut impl Read, buf: &mut [u8]) -> Result<()> {
    if read_full(r, buf)? < buf.len() {
        return Err(FormatError::Header(
            "the file ends inside the header".into(),
        ));
    }
    Ok(())
}

fn payload_exact(dec: &mut impl Read, buf: &mut [u8], what: &str) -> Result<()> {
    if read_full(dec, buf).map_err(from_io)? < buf.len() {
        return Err(FormatError::Manifest(format!(
            "the payload ends inside {what}"
        )));
    }
    Ok(())
}

fn to_io(e: FormatError) -> io::Error {
    match e {
        FormatError::Io(e) => e,
        e => io::Error::new(io::ErrorKind::InvalidData, e),
    }
}

/// The [`FormatError`] inside an I/O error from the decryptor, else the I/O error.
fn from_io(e: io::Error) -> FormatError {
    if e.get_ref().is_some_and(|i| i.is::<FormatError>()) {
        match e.into_inner().map(|i| i.downcast::<FormatError>()) {
            Some(Ok(f)) => return *f,
            _ => unreachable!("checked to hold a FormatError above"),
        }
    }
    FormatError::Io(e)
}

struct HashingWriter<W: Write> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hash: Sha256::new(),
        }
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(data)?;
        self.hash.update(&data[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn b64(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn unb64_32(s: &str) -> Option<[u8; 32]> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .ok()?
        .try_into()
        .ok()
}

/// Lowercase hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    const CHUNK: u32 = MIN_CHUNK;
    /// Cheap argon2id for tests (the format, not the cost, is under test).
    const CHEAP: KdfParams = KdfParams {
        m_kib: 64,
        t: 1,
        p: 1,
    };

    fn rng(seed: u64) -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(seed)
    }

    /// Files spanning several chunks, one of them empty.
    fn files() -> Vec<(&'static str, Vec<u8>)> {
        vec![
            ("controller.key", b"c2lnbmluZyBrZXk=\n".to_vec()),
            ("tls.crt", vec![]),
            (
                "ztmesh.db",
                (0..1500u32).map(|i| (i * 7 % 251) as u8).collect(),
            ),
        ]
    }

    fn manifest(files: &[(&str, Vec<u8>)]) -> Manifest {
        Manifest {
            format: MANIFEST_VERSION,
            created_ms: 1_700_000_000_000,
            controller_key: "key".into(),
            store: StoreKind::Sqlite,
            schema_version: Some(10),
            files: files.iter().map(|(n, b)| FileEntry::of(n, b)).collect(),
        }
    }

    fn seal_files(seal: &Seal<'_>, files: &[(&str, Vec<u8>)], chunk: u32) -> Vec<u8> {
        let m = manifest(files);
        let mut readers: Vec<&[u8]> = files.iter().map(|(_, b)| b.as_slice()).collect();
        let list: Vec<(&str, &mut dyn Read)> = files
            .iter()
            .zip(readers.iter_mut())
            .map(|((n, _), r)| (*n, r as &mut dyn Read))
            .collect();
        write(Vec::new(), seal, &m, list, chunk, &mut rng(1)).unwrap()
    }

    /// Files by name, in order.
    type Named = Vec<(String, Vec<u8>)>;

    /// Opens and extracts everything into memory.
    fn unseal(bytes: &[u8], key: &Open<'_>) -> Result<(Manifest, Named)> {
        let reader = open(bytes, key)?;
        let out = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let sink = out.clone();
        let m = reader.extract(move |e| {
            sink.borrow_mut().push((e.name.clone(), Vec::new()));
            Ok(Box::new(Collect(sink.clone())) as Box<dyn Write>)
        })?;
        let got = out.borrow().clone();
        Ok((m, got))
    }

    /// Appends to the last collected file.
    struct Collect(std::rc::Rc<std::cell::RefCell<Named>>);
    impl Write for Collect {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let mut v = self.0.borrow_mut();
            v.last_mut()
                .expect("sink called first")
                .1
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn id() -> Identity {
        Identity::generate(&mut rng(7))
    }

    fn sealed_to_id() -> Vec<u8> {
        seal_files(&Seal::To(&id().recipient()), &files(), CHUNK)
    }

    /// The offset where the chunks start in a sealed-to-recipient file.
    const X25519_HEADER: usize = 8 + 2 + 1 + 4 + 16 + 32 + WRAPPED_LEN;

    #[test]
    fn round_trips_with_a_recipient_and_with_a_passphrase() {
        let want: Vec<(String, Vec<u8>)> =
            files().into_iter().map(|(n, b)| (n.into(), b)).collect();
        let id = id();
        for chunk in [CHUNK, 1000, DEFAULT_CHUNK] {
            let sealed = seal_files(&Seal::To(&id.recipient()), &files(), chunk);
            let (m, got) = unseal(&sealed, &Open::Identity(&id)).unwrap();
            assert_eq!(m, manifest(&files()));
            assert_eq!(got, want, "chunk {chunk}");
        }
        let sealed = seal_files(&Seal::Passphrase(b"correct horse", CHEAP), &files(), CHUNK);
        let (m, got) = unseal(&sealed, &Open::Passphrase(b"correct horse")).unwrap();
        assert_eq!(m.schema_version, Some(10));
        assert_eq!(got, want);
        let header = open(sealed.as_slice(), &Open::Passphrase(b"correct horse"))
            .unwrap()
            .header;
        assert_eq!(header.wrap, WrapKind::Passphrase);
    }

    #[test]
    fn a_payload_of_whole_chunks_ends_in_a_full_final_chunk() {
        // Find file sizes that make the payload an exact multiple of CHUNK.
        let m0 = manifest(&[("ztmesh.db", vec![])]);
        let head = 4 + serde_json::to_vec(&m0).unwrap().len();
        for size in (0..3 * CHUNK as usize).filter(|s| (head + s).is_multiple_of(CHUNK as usize)) {
            let f = vec![("ztmesh.db", vec![9u8; size])];
            // The manifest's size field may change the length; recheck.
            let mut sealed = seal_files(&Seal::To(&id().recipient()), &f, CHUNK);
            let (_, got) = unseal(&sealed, &Open::Identity(&id())).unwrap();
            assert_eq!(got[0].1.len(), size);
            let chunked = (sealed.len() - X25519_HEADER).is_multiple_of(CHUNK as usize + TAG_LEN);
            sealed.push(b'x');
            let e = unseal(&sealed, &Open::Identity(&id())).unwrap_err();
            if chunked {
                assert!(matches!(e, FormatError::TrailingData { .. }), "{e}");
                assert!(e.to_string().contains("appended"), "{e}");
            }
        }
    }

    #[test]
    fn the_wrong_key_is_refused_by_name() {
        let sealed = sealed_to_id();
        let other = Identity::generate(&mut rng(8));
        let e = unseal(&sealed, &Open::Identity(&other)).unwrap_err();
        assert!(
            e.to_string().contains("not encrypted to this identity"),
            "{e}"
        );
        let e = unseal(&sealed, &Open::Passphrase(b"x")).unwrap_err();
        assert!(e.to_string().contains("give --identity"), "{e}");

        let sealed = seal_files(&Seal::Passphrase(b"right", CHEAP), &files(), CHUNK);
        let e = unseal(&sealed, &Open::Passphrase(b"wrong")).unwrap_err();
        assert!(e.to_string().contains("wrong passphrase"), "{e}");
        let e = unseal(&sealed, &Open::Identity(&other)).unwrap_err();
        assert!(e.to_string().contains("give --passphrase-file"), "{e}");
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let id = id();
        let sealed = sealed_to_id();
        for bit in 0..sealed.len() * 8 {
            let mut bad = sealed.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                unseal(&bad, &Open::Identity(&id)).is_err(),
                "bit {bit} flipped went unnoticed"
            );
        }
        // The passphrase header too, except the memory cost's high bits
        // (an altered cost is bounded, but may legitimately cost a lot).
        let sealed = seal_files(&Seal::Passphrase(b"pw", CHEAP), &files(), 1024);
        let m_cost = 8 + 2 + 1 + 4 + 16;
        for bit in 0..(X25519_HEADER + 64) * 8 {
            let byte = bit / 8;
            if (m_cost..m_cost + 3).contains(&byte) {
                continue;
            }
            let mut bad = sealed.clone();
            bad[byte] ^= 1 << (bit % 8);
            assert!(unseal(&bad, &Open::Passphrase(b"pw")).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn truncation_anywhere_is_detected_and_named_at_chunk_boundaries() {
        let id = id();
        let sealed = sealed_to_id();
        let chunks_at = |k: usize| X25519_HEADER + k * (CHUNK as usize + TAG_LEN);
        let full_chunks = (sealed.len() - X25519_HEADER) / (CHUNK as usize + TAG_LEN);
        assert!(full_chunks >= 3, "the test needs several chunks");
        for len in 0..sealed.len() {
            let e = unseal(&sealed[..len], &Open::Identity(&id)).unwrap_err();
            if len > X25519_HEADER && (1..=full_chunks).any(|k| chunks_at(k) == len) {
                assert!(
                    matches!(e, FormatError::Truncated { .. }),
                    "cut at {len}: {e}"
                );
                assert!(e.to_string().contains("truncated"), "{e}");
            }
            if len < X25519_HEADER {
                assert!(matches!(e, FormatError::Header(_)), "cut at {len}: {e}");
            }
        }
    }

    #[test]
    fn appended_data_and_reordered_chunks_are_detected() {
        let id = id();
        let sealed = sealed_to_id();
        // Appended to a short final chunk, the extra bytes make it
        // unauthentic; after a full final chunk, they are named.
        for extra in [&b"x"[..], &[0u8; 16], &[1u8; 300], &sealed] {
            let mut bad = sealed.clone();
            bad.extend_from_slice(extra);
            let e = unseal(&bad, &Open::Identity(&id)).unwrap_err();
            assert!(
                matches!(
                    e,
                    FormatError::TrailingData { .. } | FormatError::Corrupt { .. }
                ),
                "{} appended: {e}",
                extra.len()
            );
        }
        let c = CHUNK as usize + TAG_LEN;
        let mut swapped = sealed.clone();
        let (a, b) = (X25519_HEADER, X25519_HEADER + c);
        let first = sealed[a..a + c].to_vec();
        swapped.copy_within(b..b + c, a);
        swapped[b..b + c].copy_from_slice(&first);
        let e = unseal(&swapped, &Open::Identity(&id)).unwrap_err();
        assert!(matches!(e, FormatError::Corrupt { chunk: 0 }), "{e}");
    }

    #[test]
    fn a_newer_format_or_another_file_is_refused_before_any_key_is_tried() {
        let mut newer = sealed_to_id();
        newer[8..10].copy_from_slice(&2u16.to_be_bytes());
        let e = unseal(&newer, &Open::Identity(&id())).unwrap_err();
        assert!(
            matches!(
                e,
                FormatError::NewerFormat {
                    found: 2,
                    supported: 1
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("newer ztmesh-controller"), "{e}");
        let e = unseal(b"SQLite format 3\0....", &Open::Identity(&id())).unwrap_err();
        assert!(matches!(e, FormatError::NotABackup), "{e}");
        let e = unseal(b"", &Open::Identity(&id())).unwrap_err();
        assert!(matches!(e, FormatError::Header(_)), "{e}");
    }

    /// A backup whose payload the test writes by hand (as an attacker
    /// holding the recipient key could).
    fn forged(payload: &[u8]) -> Vec<u8> {
        let r = id().recipient();
        let mut enc = Encryptor::new(Vec::new(), &Seal::To(&r), CHUNK, &mut rng(3)).unwrap();
        enc.write_all(payload).unwrap();
        enc.finish().unwrap()
    }

    fn forged_manifest(m: &Manifest, body: &[u8]) -> Vec<u8> {
        let json = serde_json::to_vec(m).unwrap();
        let mut p = (json.len() as u32).to_be_bytes().to_vec();
        p.extend_from_slice(&json);
        p.extend_from_slice(body);
        forged(&p)
    }

    #[test]
    fn manifests_naming_paths_duplicates_or_lying_sizes_are_refused() {
        let id = id();
        let body = b"abc";
        for name in [
            "../controller.key",
            "a/b",
            ".hidden",
            "",
            "/etc/passwd",
            "..",
        ] {
            let mut m = manifest(&[("x", body.to_vec())]);
            m.files[0].name = name.into();
            let e = unseal(&forged_manifest(&m, body), &Open::Identity(&id)).unwrap_err();
            assert!(
                e.to_string().contains("not a plain file name"),
                "{name:?}: {e}"
            );
        }
        let m = manifest(&[("tls.key", body.to_vec()), ("tls.key", body.to_vec())]);
        let twice = [&body[..], &body[..]].concat();
        let e = unseal(&forged_manifest(&m, &twice), &Open::Identity(&id)).unwrap_err();
        assert!(e.to_string().contains("listed twice"), "{e}");

        let m = manifest(&[("tls.key", body.to_vec())]);
        let e = unseal(&forged_manifest(&m, b"abd"), &Open::Identity(&id)).unwrap_err();
        assert!(e.to_string().contains("SHA-256"), "{e}");
        let e = unseal(&forged_manifest(&m, b"ab"), &Open::Identity(&id)).unwrap_err();
        assert!(e.to_string().contains("ends after 2 of its 3"), "{e}");
        let e = unseal(&forged_manifest(&m, b"abcd"), &Open::Identity(&id)).unwrap_err();
        assert!(e.to_string().contains("after the last listed file"), "{e}");

        let mut newer = manifest(&[]);
        newer.format = 2;
        let e = unseal(&forged_manifest(&newer, b""), &Open::Identity(&id)).unwrap_err();
        assert!(
            matches!(e, FormatError::NewerFormat { found: 2, .. }),
            "{e}"
        );
        let e = unseal(&forged(&u32::MAX.to_be_bytes()), &Open::Identity(&id)).unwrap_err();
        assert!(e.to_string().contains("too large"), "{e}");
        let e = unseal(&forged(b"\0\0\0\x02{}"), &Open::Identity(&id)).unwrap_err();
        assert!(e.to_string().contains("not valid"), "{e}");
    }

    #[test]
    fn a_file_that_changes_while_being_written_fails_the_backup() {
        let f = files();
        let m = manifest(&f);
        let changed = b"another key\n".to_vec();
        let mut readers: Vec<&[u8]> = vec![&changed, &f[1].1, &f[2].1];
        let list: Vec<(&str, &mut dyn Read)> = ["controller.key", "tls.crt", "ztmesh.db"]
            .into_iter()
            .zip(readers.iter_mut())
            .map(|(n, r)| (n, r as &mut dyn Read))
            .collect();
        let r = id().recipient();
        let e = write(Vec::new(), &Seal::To(&r), &m, list, CHUNK, &mut rng(1)).unwrap_err();
        assert!(e.to_string().contains("changed while"), "{e}");
    }

    #[test]
    fn keys_round_trip_through_their_text_and_bad_text_is_refused() {
        let id = id();
        let text = id.to_file_text();
        assert!(text.contains(&id.recipient().to_string()));
        let back = Identity::from_file_text(&text).unwrap();
        assert_eq!(back.recipient(), id.recipient());
        let r: Recipient = id.recipient().to_string().parse().unwrap();
        assert_eq!(r, id.recipient());
        assert!(r.to_string().starts_with("ztmr1."));
        for bad in [
            "",
            "ztmr1.",
            "ztmr1.AAAA",
            "age1xyz",
            &format!("ztmi1.{}", b64(&[0; 32])),
        ] {
            assert!(bad.parse::<Recipient>().is_err(), "{bad:?}");
        }
        assert!(Identity::from_file_text("# only a comment\n").is_err());
        assert!(Identity::from_file_text(&format!("{text}{text}")).is_err());
        // A low-order recipient is refused rather than sealed to.
        let zero = Recipient([0; 32]);
        let mut out = Vec::new();
        assert!(Encryptor::new(&mut out, &Seal::To(&zero), CHUNK, &mut rng(1)).is_err());
    }

    #[test]
    fn hkdf_matches_rfc_5869_test_case_1() {
        let ikm = [0x0b; 22];
        let salt: Vec<u8> = (0..=0x0c).collect();
        let info: Vec<u8> = (0xf0..=0xf9).collect();
        assert_eq!(
            hex(&hkdf_sha256(&salt, &ikm, &info)),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
        );
    }

    #[test]
    fn out_of_range_kdf_parameters_are_refused_before_hashing() {
        let mut sealed = seal_files(&Seal::Passphrase(b"pw", CHEAP), &files(), CHUNK);
        let m_cost = 8 + 2 + 1 + 4 + 16;
        sealed[m_cost..m_cost + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        let e = unseal(&sealed, &Open::Passphrase(b"pw")).unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
    }
}
