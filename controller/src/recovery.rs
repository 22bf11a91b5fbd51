//! Backup and restore of a controller's data dir: the shell around the pure
//! [`crate::backup`] format (files, the store's online copy, the data dir
//! lock, staging and the final moves).
//!
//! A backup is taken by the running controller ([`write_backup`], behind
//! the admin `Backup` call): the identity files are read once into memory,
//! the SQLite database is copied with SQLite's online backup into a private
//! temp file in the data dir, and everything leaves the process only
//! encrypted. A restore ([`restore`]) runs offline under the data dir lock:
//! it decrypts and verifies everything into a staging dir inside the data
//! dir before any file is replaced, and moves what it replaces aside.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use rand_core::{CryptoRng, RngCore};
use ztmesh_proto::keys::{sync_dir, PublicKey, SigningKey};

use crate::backup::{self, FileEntry, Manifest, Open, Seal, StoreKind};
use crate::lockfile::DirLock;
use crate::store::{Snapshot, SqliteStore, Store};
use crate::UnixMs;

/// A file of the controller's identity (kept beside the database).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdentityFile {
    pub name: &'static str,
    /// A data dir that serves always has it; others are backed up when present.
    pub required: bool,
}

/// A data dir as backup and restore see it; `server::DataDir::layout`
/// builds it from the one list of identity files.
#[derive(Clone, Debug)]
pub struct Layout {
    pub root: PathBuf,
    pub identity: &'static [IdentityFile],
    /// The SQLite database's file name.
    pub db: &'static str,
    /// The lock file's name (see [`crate::lockfile`]).
    pub lock: &'static str,
}

impl Layout {
    /// The identity files to back up now: every required one, and the
    /// optional ones that exist.
    pub fn identity_files(&self) -> Vec<&'static str> {
        self.identity
            .iter()
            .filter(|f| f.required || self.root.join(f.name).exists())
            .map(|f| f.name)
            .collect()
    }

    fn known(&self, name: &str) -> bool {
        name == self.db || self.identity.iter().any(|f| f.name == name)
    }

    /// Files of a controller already in the data dir: identity, database
    /// and its WAL companions.
    fn occupied(&self) -> Vec<String> {
        let mut names: Vec<String> = self.identity.iter().map(|f| f.name.to_string()).collect();
        for suffix in ["", "-wal", "-shm", "-journal"] {
            names.push(format!("{}{suffix}", self.db));
        }
        names
            .into_iter()
            .filter(|n| self.root.join(n).symlink_metadata().is_ok())
            .collect()
    }
}

/// The netmap signing key file's name: the backup's manifest names its public half.
const SIGNING_KEY: &str = "controller.key";

// ---------------------------------------------------------------------------
// Backup
// ---------------------------------------------------------------------------

/// Writes an encrypted backup of the data dir and `store` to `out`, calling
/// `announce` with the manifest before the first encrypted byte.
///
/// # Errors
/// A missing identity file, a failed database copy, a writer that fails
/// (e.g. the client went away).
pub fn write_backup<W: Write>(
    layout: &Layout,
    store: &dyn Store,
    seal: &Seal<'_>,
    out: W,
    announce: impl FnOnce(&Manifest) -> io::Result<()>,
    now: UnixMs,
    rng: &mut (impl RngCore + CryptoRng),
) -> anyhow::Result<(W, Manifest)> {
    let mut identity = Vec::new();
    for name in layout.identity_files() {
        let path = layout.root.join(name);
        let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        identity.push((name, bytes));
    }
    let key_text = identity
        .iter()
        .find(|(n, _)| *n == SIGNING_KEY)
        .map(|(_, b)| b.as_slice())
        .context("the data dir has no controller.key")?;
    let controller_key = public_of(key_text)?;

    let mut suffix = [0u8; 8];
    rng.fill_bytes(&mut suffix);
    let temp = TempFile(
        layout
            .root
            .join(format!(".backup-{now}-{}.db", backup::hex(&suffix))),
    );
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp.0)
        .with_context(|| format!("creating {}", temp.0.display()))?;
    let (store_kind, schema_version, db) = match store
        .online_backup(&temp.0)
        .context("copying the database")?
    {
        Snapshot::Sqlite { schema_version } => {
            let entry = hash_file(layout.db, &temp.0)?;
            (StoreKind::Sqlite, Some(schema_version), Some(entry))
        }
        Snapshot::Postgres => (StoreKind::Postgresql, None, None),
    };
    let mut files: Vec<FileEntry> = identity.iter().map(|(n, b)| FileEntry::of(n, b)).collect();
    files.extend(db);
    let manifest = Manifest {
        format: backup::MANIFEST_VERSION,
        created_ms: now,
        controller_key: controller_key.to_string(),
        store: store_kind,
        schema_version,
        files,
    };
    announce(&manifest)?;
    let mut readers: Vec<Box<dyn Read>> = identity
        .iter()
        .map(|(_, b)| Box::new(io::Cursor::new(b.clone())) as Box<dyn Read>)
        .collect();
    if store_kind == StoreKind::Sqlite {
        readers.push(Box::new(fs::File::open(&temp.0)?));
    }
    let list: Vec<(&str, &mut dyn Read)> = manifest
        .files
        .iter()
        .zip(readers.iter_mut())
        .map(|(f, r)| (f.name.as_str(), r.as_mut() as &mut dyn Read))
        .collect();
    let out = backup::write(out, seal, &manifest, list, backup::DEFAULT_CHUNK, rng)?;
    Ok((out, manifest))
}

/// The public half of a `controller.key` file's text.
fn public_of(text: &[u8]) -> anyhow::Result<PublicKey> {
    use base64::Engine;
    let bytes: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(String::from_utf8_lossy(text).trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .context("controller.key does not hold a key")?;
    let public = ed25519_dalek::SigningKey::from_bytes(&bytes).verifying_key();
    Ok(PublicKey::from_slice(public.as_bytes())?)
}

fn hash_file(name: &str, path: &Path) -> anyhow::Result<FileEntry> {
    use sha2::{Digest, Sha256};
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    let size = io::copy(&mut f, &mut h)?;
    Ok(FileEntry {
        name: name.to_string(),
        size,
        sha256: backup::hex(&h.finalize()),
    })
}

/// A file removed when dropped (the database copy, after packaging or failure).
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
        for suffix in ["-journal", "-wal", "-shm"] {
            let mut p = self.0.clone().into_os_string();
            p.push(suffix);
            let _ = fs::remove_file(p);
        }
    }
}

// ---------------------------------------------------------------------------
// Restore
// ---------------------------------------------------------------------------

/// What [`restore`] did.
#[derive(Debug)]
pub struct Restored {
    pub manifest: Manifest,
    /// Where the files it replaced went (`--force`).
    pub replaced: Option<PathBuf>,
    /// `audit verify` after the restore row was written (SQLite).
    pub audit_rows: Option<u64>,
}

/// Restores the backup read from `input` into the data dir, offline.
///
/// Everything is decrypted into a staging dir inside the data dir and
/// verified (every chunk, every file's SHA-256, the schema version, the
/// database's integrity check, its recorded controller key, the audit
/// chain) before anything is moved. An occupied data dir is refused unless
/// `force`, which moves the old files into `replaced-<now>/`.
///
/// # Errors
/// A running controller (the lock), an occupied data dir without `force`,
/// and every verification above, each naming what failed.
pub fn restore(
    layout: &Layout,
    input: impl Read,
    key: &Open<'_>,
    force: bool,
    label: &str,
    now: UnixMs,
) -> anyhow::Result<Restored> {
    let root = &layout.root;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .with_context(|| format!("creating {}", root.display()))?;
    fs::set_permissions(root, fs::Permissions::from_mode(0o700))?;
    let _lock = DirLock::acquire(&root.join(layout.lock))
        .context("restore needs the controller stopped")?;
    let occupied = layout.occupied();
    if !occupied.is_empty() && !force {
        bail!(
            "{} already holds a controller ({}): restore into an empty data dir, or add --force \
             to move those files aside into {}/replaced-<unix ms>/",
            root.display(),
            occupied.join(", "),
            root.display()
        );
    }

    let staging = Staging::create(root, now)?;
    let reader = backup::open(input, key)?;
    check_manifest(layout, &reader.manifest)?;
    let dir = staging.0.clone();
    let manifest = reader.extract(|entry| {
        let f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join(&entry.name))?;
        Ok(Box::new(io::BufWriter::new(f)) as Box<dyn Write>)
    })?;
    for f in &manifest.files {
        fs::File::open(staging.0.join(&f.name))?.sync_all()?;
    }

    let key_file = staging.0.join(SIGNING_KEY);
    let signer = SigningKey::load(&key_file).context("the backup's controller.key")?;
    if signer.public().to_string() != manifest.controller_key {
        bail!(
            "the backup's controller.key ({}) is not the key its manifest names ({})",
            signer.public(),
            manifest.controller_key
        );
    }
    let audit_rows = match manifest.store {
        StoreKind::Sqlite => Some(check_database(
            &staging.0.join(layout.db),
            &manifest,
            &signer,
            label,
            now,
        )?),
        StoreKind::Postgresql => None,
    };

    let replaced = if occupied.is_empty() {
        None
    } else {
        let aside = root.join(format!("replaced-{now}"));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&aside)
            .with_context(|| format!("creating {}", aside.display()))?;
        for name in layout.occupied() {
            fs::rename(root.join(&name), aside.join(&name))
                .with_context(|| format!("moving {name} aside"))?;
        }
        Some(aside)
    };
    for f in &manifest.files {
        let to = root.join(&f.name);
        fs::rename(staging.0.join(&f.name), &to)
            .with_context(|| format!("moving {} into place", f.name))?;
        fs::set_permissions(&to, fs::Permissions::from_mode(0o600))?;
    }
    sync_dir(root)?;
    Ok(Restored {
        manifest,
        replaced,
        audit_rows,
    })
}

/// Refuses a manifest this binary must not restore: files it does not
/// know, a missing identity file, a database from a newer schema.
fn check_manifest(layout: &Layout, m: &Manifest) -> anyhow::Result<()> {
    for f in &m.files {
        if !layout.known(&f.name) {
            bail!(
                "the backup holds {:?}, which this ztmesh-controller does not know: restore it with the version that made it",
                f.name
            );
        }
    }
    for f in layout.identity.iter().filter(|f| f.required) {
        if m.file(f.name).is_none() {
            bail!("the backup has no {}", f.name);
        }
    }
    match (m.store, m.file(layout.db), m.schema_version) {
        (StoreKind::Sqlite, Some(_), Some(v)) => check_schema(v),
        (StoreKind::Sqlite, _, _) => bail!("the backup's SQLite database is missing"),
        (StoreKind::Postgresql, None, _) => Ok(()),
        (StoreKind::Postgresql, Some(_), _) => {
            bail!("a PostgreSQL backup must not carry a {}", layout.db)
        }
    }
}

fn check_schema(version: u32) -> anyhow::Result<()> {
    if version > SqliteStore::SCHEMA_VERSION {
        bail!(
            "the backup's database is at schema version {version}, newer than this \
             ztmesh-controller's {}: restore it with the version that made it (or newer)",
            SqliteStore::SCHEMA_VERSION
        );
    }
    Ok(())
}

/// Checks the staged database (schema, integrity, controller key), records
/// the restore in its audit log and verifies the chain; the chain's row count.
fn check_database(
    db: &Path,
    manifest: &Manifest,
    signer: &SigningKey,
    label: &str,
    now: UnixMs,
) -> anyhow::Result<u64> {
    let found = SqliteStore::inspect(db).context("the backup's database")?;
    if Some(found.schema_version) != manifest.schema_version {
        bail!(
            "the backup's database is at schema version {}, but its manifest says {:?}",
            found.schema_version,
            manifest.schema_version
        );
    }
    check_schema(found.schema_version)?;
    if found.integrity != ["ok"] {
        bail!(
            "the backup's database fails SQLite's integrity check: {}",
            found.integrity.join("; ")
        );
    }
    let key = signer.public().to_string();
    if let Some(recorded) = &found.controller_key {
        if *recorded != key {
            bail!(
                "the backup's database belongs to controller key {recorded}, but its controller.key is {key}"
            );
        }
    }
    let store = SqliteStore::open(db).context("opening the backup's database")?;
    store.init_meta("controller_key", &key)?;
    store.audit(
        now,
        "local-admin",
        "controller.restore",
        label,
        &format!(
            "backup created_ms={} schema={} controller_key={key}",
            manifest.created_ms, found.schema_version
        ),
    )?;
    let verified = store.verify_audit(&signer.public())?.map_err(|e| {
        anyhow::anyhow!(
            "the backup's audit chain does not verify with its controller key: broken at {e}"
        )
    })?;
    drop(store);
    Ok(verified.rows)
}

/// The staging dir inside the data dir (same filesystem: the final moves
/// are renames), removed with whatever is left in it.
struct Staging(PathBuf);

impl Staging {
    fn create(root: &Path, now: UnixMs) -> anyhow::Result<Self> {
        let path = root.join(format!(".restore-{now}"));
        if path.exists() {
            fs::remove_dir_all(&path)?;
        }
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::backup::KdfParams;
    use crate::roles::Role;

    const CHEAP: KdfParams = KdfParams {
        m_kib: 64,
        t: 1,
        p: 1,
    };
    const PASS: &[u8] = b"a passphrase";
    const IDENTITY: &[IdentityFile] = crate::server::DataDir::IDENTITY;

    fn layout(root: &Path) -> Layout {
        Layout {
            root: root.to_path_buf(),
            identity: IDENTITY,
            db: "ztmesh.db",
            lock: "ztmesh.lock",
        }
    }

    /// A data dir with an identity and a database holding a user and a
    /// signed audit chain; its layout and signing key.
    fn controller(root: &Path) -> (Layout, SigningKey, SqliteStore) {
        fs::create_dir_all(root).unwrap();
        let key = SigningKey::load_or_generate(&root.join("controller.key")).unwrap();
        fs::write(root.join("tls.crt"), "certificate").unwrap();
        fs::write(root.join("tls.key"), "tls private key").unwrap();
        let store = SqliteStore::open(&root.join("ztmesh.db")).unwrap();
        store
            .create_user("alice@example.com", Role::Admin, 1)
            .unwrap();
        store
            .audit(2, "local-admin", "user.create", "alice", "")
            .unwrap();
        store.sign_audit_head(3, &key).unwrap();
        (layout(root), key, store)
    }

    fn backup_of(layout: &Layout, store: &dyn Store) -> Vec<u8> {
        let mut rng = rand::rngs::OsRng;
        let (out, _) = write_backup(
            layout,
            store,
            &Seal::Passphrase(PASS, CHEAP),
            Vec::new(),
            |_| Ok(()),
            10,
            &mut rng,
        )
        .unwrap();
        out
    }

    fn restore_into(root: &Path, bytes: &[u8], force: bool) -> anyhow::Result<Restored> {
        restore(
            &layout(root),
            bytes,
            &Open::Passphrase(PASS),
            force,
            "test.bak",
            20,
        )
    }

    /// The names in `dir`, sorted.
    fn listing(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn restores_into_a_fresh_dir_with_private_modes_and_an_audited_valid_chain() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, key, store) = controller(&tmp.path().join("src"));
        fs::write(src.root.join("handover.bin"), "optional").unwrap();
        let bytes = backup_of(&src, &store);
        assert!(
            listing(&src.root)
                .iter()
                .all(|n| !n.starts_with(".backup-")),
            "the database copy is removed"
        );
        let dst = tmp.path().join("dst");
        let done = restore_into(&dst, &bytes, false).unwrap();
        assert_eq!(done.manifest.controller_key, key.public().to_string());
        assert!(done.replaced.is_none());
        assert!(done.audit_rows.unwrap() >= 2);
        for name in [
            "controller.key",
            "tls.crt",
            "tls.key",
            "handover.bin",
            "ztmesh.db",
        ] {
            let p = dst.join(name);
            assert!(fs::read(&p).is_ok(), "{name}");
            assert_eq!(
                fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        assert_eq!(
            fs::metadata(&dst).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(
            fs::read(dst.join("controller.key")).unwrap(),
            fs::read(src.root.join("controller.key")).unwrap()
        );
        assert!(
            listing(&dst).iter().all(|n| !n.starts_with(".restore-")),
            "staging removed: {:?}",
            listing(&dst)
        );
        let restored = SqliteStore::open_read_only(&dst.join("ztmesh.db")).unwrap();
        assert_eq!(restored.users().unwrap()[0].login, "alice@example.com");
        assert!(restored.verify_audit(&key.public()).unwrap().is_ok());
        let log = restored.audit_log(10).unwrap();
        assert_eq!(log[0].action, "controller.restore");
        assert_eq!(log[0].target, "test.bak");
    }

    #[test]
    fn an_occupied_dir_needs_force_which_moves_the_old_files_aside() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, _, store) = controller(&tmp.path().join("src"));
        let bytes = backup_of(&src, &store);
        let dst = tmp.path().join("dst");
        let (_, old_key, old_store) = controller(&dst);
        drop(old_store);
        let before = listing(&dst);
        let e = restore_into(&dst, &bytes, false).unwrap_err();
        assert!(format!("{e:#}").contains("--force"), "{e:#}");
        let mut after = listing(&dst);
        after.retain(|n| n != "ztmesh.lock");
        assert_eq!(after, before, "nothing changed but the lock file");

        let done = restore_into(&dst, &bytes, true).unwrap();
        let aside = done.replaced.unwrap();
        assert!(aside.starts_with(&dst));
        let kept = SigningKey::load(&aside.join("controller.key")).unwrap();
        assert_eq!(kept.public(), old_key.public(), "the old key is kept aside");
        assert!(aside.join("ztmesh.db").exists());
        assert_eq!(
            fs::read(dst.join("controller.key")).unwrap(),
            fs::read(src.root.join("controller.key")).unwrap()
        );
    }

    #[test]
    fn a_running_controller_holds_the_lock_and_the_restore_fails() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, _, store) = controller(&tmp.path().join("src"));
        let bytes = backup_of(&src, &store);
        let dst = tmp.path().join("dst");
        fs::create_dir_all(&dst).unwrap();
        let _held = DirLock::acquire(&dst.join("ztmesh.lock")).unwrap();
        // flock is per open file: a second acquire in this process conflicts too.
        let e = restore_into(&dst, &bytes, true).unwrap_err();
        assert!(format!("{e:#}").contains("controller stopped"), "{e:#}");
    }

    #[test]
    fn a_corrupt_backup_changes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, _, store) = controller(&tmp.path().join("src"));
        let mut bytes = backup_of(&src, &store);
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        let dst = tmp.path().join("dst");
        let e = restore_into(&dst, &bytes, false).unwrap_err();
        assert!(format!("{e:#}").contains("fails authentication"), "{e:#}");
        assert_eq!(listing(&dst), ["ztmesh.lock"], "only the lock file");
        let e = restore_into(&dst, &bytes[..mid], false).unwrap_err();
        assert!(format!("{e:#}").contains("truncated"), "{e:#}");
        assert_eq!(listing(&dst), ["ztmesh.lock"]);
    }

    #[test]
    fn a_database_from_a_newer_schema_is_refused_naming_both_versions() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, _, store) = controller(&tmp.path().join("src"));
        let newer = SqliteStore::SCHEMA_VERSION + 1;
        store
            .raw()
            .pragma_update(None, "user_version", newer)
            .unwrap();
        let bytes = backup_of(&src, &store);
        let e = restore_into(&tmp.path().join("dst"), &bytes, false).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains(&format!("schema version {newer}"))
                && msg.contains(&SqliteStore::SCHEMA_VERSION.to_string()),
            "{msg}"
        );
    }

    #[test]
    fn a_database_failing_its_integrity_check_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, _, store) = controller(&tmp.path().join("src"));
        {
            // Orphan an index's pages: the schema forgets it, its pages stay.
            let c = store.raw();
            c.execute_batch(
                "CREATE INDEX junk ON audit (detail);
                 PRAGMA writable_schema = ON;
                 DELETE FROM sqlite_master WHERE name = 'junk';
                 PRAGMA writable_schema = OFF;",
            )
            .unwrap();
        }
        drop(store);
        let store = SqliteStore::open(&src.root.join("ztmesh.db")).unwrap();
        let bytes = backup_of(&src, &store);
        let dst = tmp.path().join("dst");
        let e = restore_into(&dst, &bytes, false).unwrap_err();
        assert!(format!("{e:#}").contains("integrity check"), "{e:#}");
        assert_eq!(listing(&dst), ["ztmesh.lock"]);
    }

    #[test]
    fn keys_of_one_controller_with_the_database_of_another_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, _, a_store) = controller(&tmp.path().join("a"));
        let (b, _, _) = controller(&tmp.path().join("b"));
        // B's identity files, A's database (its chain signed by A's key).
        let forged = Layout {
            root: b.root.clone(),
            ..a.clone()
        };
        let bytes = backup_of(&forged, &a_store);
        let e = restore_into(&tmp.path().join("dst"), &bytes, false).unwrap_err();
        assert!(format!("{e:#}").contains("audit chain"), "{e:#}");
        // And where the database records its key, that check names both.
        a_store.set_meta("controller_key", "another-key").unwrap();
        let bytes = backup_of(&forged, &a_store);
        let e = restore_into(&tmp.path().join("dst2"), &bytes, false).unwrap_err();
        assert!(
            format!("{e:#}").contains("belongs to controller key another-key"),
            "{e:#}"
        );
    }

    #[test]
    fn unknown_or_missing_files_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("src");
        let (src, _, store) = controller(&root);
        fs::write(root.join("handover.bin"), "x").unwrap();
        let bytes = backup_of(&src, &store);
        // A binary that knows fewer identity files refuses the newer one.
        let older = Layout {
            identity: &IDENTITY[..3],
            ..layout(&tmp.path().join("dst"))
        };
        let e = restore(
            &older,
            bytes.as_slice(),
            &Open::Passphrase(PASS),
            false,
            "b",
            1,
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("\"handover.bin\""), "{e:#}");
        fs::remove_file(root.join("tls.key")).unwrap();
        let mut rng = rand::rngs::OsRng;
        let e = write_backup(
            &src,
            &store,
            &Seal::Passphrase(PASS, CHEAP),
            Vec::new(),
            |_| Ok(()),
            1,
            &mut rng,
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("tls.key"), "{e:#}");
    }
}
