//! An exclusive lock on the data dir (`flock` on `ztmesh.lock`), held for
//! the life of `serve`, so that two controllers never share one database,
//! admin socket or signing key.
//!
//! `flock` locks die with the process (even on `kill -9`), so a stale lock
//! file never blocks a restart; the PID written into it is only for the
//! error message.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Why the data dir could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock: stop it, or use another data dir.
    #[error("another controller is running on this data dir: {path} is locked by PID {pid}")]
    Held { path: PathBuf, pid: String },
    /// The lock file cannot be opened or locked (permissions, filesystem).
    #[error("cannot lock {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The held lock; dropping it (or exiting) releases it.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock at `path` without waiting, and writes our PID into it.
    ///
    /// # Errors
    /// [`LockError::Held`] naming the holder's PID if another process has
    /// it; [`LockError::Io`] otherwise.
    pub fn acquire(path: &Path) -> Result<Self, LockError> {
        let io = |source| LockError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        // SAFETY: flock takes a file descriptor we own for the call's duration.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io(err));
            }
            let mut text = String::new();
            let _ = file.take(32).read_to_string(&mut text);
            let pid: String = text.trim().chars().filter(char::is_ascii_digit).collect();
            return Err(LockError::Held {
                path: path.to_path_buf(),
                pid: if pid.is_empty() {
                    "unknown".into()
                } else {
                    pid
                },
            });
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ztmesh.lock");
        let held = DirLock::acquire(&path).unwrap();
        let e = DirLock::acquire(&path).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("ztmesh.lock"), "{msg}");
        assert!(msg.contains(&std::process::id().to_string()), "{msg}");
        drop(held);
        DirLock::acquire(&path).unwrap();
    }
}
