//! The netmap signing key in the data dir, and the files of its rotation
//! (the shell of [`crate::mesh::Mesh::rotate_signing`]; the statement itself
//! is [`ztmesh_proto::handover`]).
//!
//! A rotation writes, each file atomically and 0600:
//! 1. `controller.key.next`: the new key;
//! 2. `handover.bin`: the statement, signed by both keys;
//! 3. renames `controller.key.next` over `controller.key`: the old private
//!    key is gone, nothing can sign with it any more.
//!
//! A crash between the steps is finished or undone by [`load`]: a next key
//! without a statement is dropped, a statement from the current key to the
//! next key completes the rename. `handover.bin` stays until the grace
//! period ends (the mesh removes it), so a restart keeps handing over.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use prost::Message;
use ztmesh_proto::control::KeyHandover;
use ztmesh_proto::handover;
use ztmesh_proto::keys::{sync_dir, write_secret_file, SigningKey};

/// Where the signing key and a rotation's files live.
#[derive(Clone, Debug)]
pub struct KeyFiles {
    /// `controller.key`: the key in force.
    pub key: PathBuf,
    /// `controller.key.next`: a new key during a rotation's first step.
    pub next: PathBuf,
    /// `handover.bin`: the encoded `KeyHandover` of the grace period.
    pub handover: PathBuf,
}

impl KeyFiles {
    pub fn in_dir(root: &Path) -> Self {
        Self {
            key: root.join("controller.key"),
            next: root.join("controller.key.next"),
            handover: root.join("handover.bin"),
        }
    }
}

/// The key in force (generated on first start) and the hand-over to it, if
/// one is on disk; finishes or undoes a rotation a crash interrupted.
///
/// # Errors
/// Unreadable or invalid key files.
pub fn load(files: &KeyFiles) -> anyhow::Result<(SigningKey, Option<KeyHandover>)> {
    let key = SigningKey::load_or_generate(&files.key)?;
    let statement = match std::fs::read(&files.handover) {
        Ok(b) => Some(
            KeyHandover::decode(b.as_slice())
                .ok()
                .and_then(|h| handover::read(&h).ok().map(|r| (h, r))),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", files.handover.display())),
    };
    let next = match std::fs::read_to_string(&files.next) {
        Ok(_) => Some(SigningKey::load(&files.next)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", files.next.display())),
    };
    match (statement, next) {
        // Step 3 did not happen: finish it.
        (Some(Some((h, r))), Some(next))
            if r.old_key == key.public() && r.new_key == next.public() =>
        {
            std::fs::rename(&files.next, &files.key)
                .with_context(|| format!("finishing the rotation to {}", r.new_key))?;
            sync_dir(parent(&files.key))?;
            tracing::warn!(new = %r.new_key, "finished a signing-key rotation interrupted by a restart");
            Ok((next, Some(h)))
        }
        (Some(Some((h, r))), next) if r.new_key == key.public() => {
            if next.is_some() {
                discard(&files.next);
            }
            Ok((key, Some(h)))
        }
        (statement, next) => {
            if next.is_some() {
                // Step 2 did not happen: the rotation never took effect.
                tracing::warn!("dropping the new signing key of a rotation interrupted before its hand-over was written");
                discard(&files.next);
            }
            if statement.is_some() {
                tracing::warn!(
                    file = %files.handover.display(),
                    "ignoring a hand-over that does not lead to the key in force"
                );
            }
            Ok((key, None))
        }
    }
}

/// Writes a rotation's files: `new` next to the key in force, the
/// statement, then `new` in place of the key in force. On error the key in
/// force is unchanged unless the last rename happened (then the rotation
/// happened, and [`load`] sees it).
///
/// # Errors
/// I/O errors.
pub fn write_rotation(files: &KeyFiles, new: &SigningKey, h: &KeyHandover) -> anyhow::Result<()> {
    write_secret_file(&files.next, new.to_text().as_bytes())?;
    write_secret_file(&files.handover, &h.encode_to_vec())?;
    std::fs::rename(&files.next, &files.key)
        .with_context(|| format!("renaming {}", files.next.display()))?;
    sync_dir(parent(&files.key))?;
    Ok(())
}

/// Removes the statement once its grace period is over.
///
/// # Errors
/// I/O errors other than the file being gone.
pub fn remove_handover(files: &KeyFiles) -> std::io::Result<()> {
    match std::fs::remove_file(&files.handover) {
        Ok(()) => sync_dir(parent(&files.handover)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn parent(p: &Path) -> &Path {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

fn discard(p: &Path) {
    if let Err(e) = std::fs::remove_file(p) {
        tracing::warn!(file = %p.display(), error = %e, "cannot remove");
    }
}

#[cfg(test)]
mod tests {
    use rand_core::OsRng;

    use super::*;

    fn files() -> (tempfile::TempDir, KeyFiles) {
        let d = tempfile::tempdir().unwrap();
        let f = KeyFiles::in_dir(d.path());
        (d, f)
    }

    #[test]
    fn a_rotation_replaces_the_key_and_keeps_the_statement() {
        let (_d, f) = files();
        let (old, none) = load(&f).unwrap();
        assert!(none.is_none());
        let new = SigningKey::generate(&mut OsRng);
        let h = handover::sign(&old, &new, 1, 2);
        write_rotation(&f, &new, &h).unwrap();
        let (key, got) = load(&f).unwrap();
        assert_eq!(key.public(), new.public());
        assert_eq!(got, Some(h));
        assert!(!f.next.exists());
        use std::os::unix::fs::PermissionsExt;
        for p in [&f.key, &f.handover] {
            let mode = std::fs::metadata(p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", p.display());
        }
        remove_handover(&f).unwrap();
        remove_handover(&f).unwrap();
        assert!(load(&f).unwrap().1.is_none());
    }

    #[test]
    fn a_crash_before_the_statement_undoes_and_after_it_finishes_the_rotation() {
        let (_d, f) = files();
        let (old, _) = load(&f).unwrap();
        let new = SigningKey::generate(&mut OsRng);
        // Crashed after step 1: the old key stays, the new one is dropped.
        write_secret_file(&f.next, new.to_text().as_bytes()).unwrap();
        let (key, h) = load(&f).unwrap();
        assert_eq!((key.public(), h), (old.public(), None));
        assert!(!f.next.exists());
        // Crashed after step 2: finished.
        let h = handover::sign(&old, &new, 1, 2);
        write_secret_file(&f.next, new.to_text().as_bytes()).unwrap();
        write_secret_file(&f.handover, &h.encode_to_vec()).unwrap();
        let (key, got) = load(&f).unwrap();
        assert_eq!((key.public(), got), (new.public(), Some(h)));
        assert!(!f.next.exists());
    }

    #[test]
    fn a_statement_that_does_not_lead_to_the_key_is_ignored() {
        let (_d, f) = files();
        let (_key, _) = load(&f).unwrap();
        let (a, b) = (
            SigningKey::generate(&mut OsRng),
            SigningKey::generate(&mut OsRng),
        );
        write_secret_file(&f.handover, &handover::sign(&a, &b, 1, 2).encode_to_vec()).unwrap();
        assert!(load(&f).unwrap().1.is_none());
        write_secret_file(&f.handover, b"junk").unwrap();
        assert!(load(&f).unwrap().1.is_none());
    }
}
