//! The state directory's lock file: one daemon per state directory.
//!
//! Two daemons on one state dir would both rewrite the keys and the stored
//! netmap, and the second would unlink the first one's socket. The lock is an
//! exclusive `flock` on `daemon.lock`, held (with the file open) for the
//! daemon's whole life and released by the kernel when the process ends, even
//! on `kill -9`, so a stale file never blocks a restart. The file holds the
//! holder's PID, for the error message only.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// File name of the lock inside the state directory.
pub const LOCK_FILE: &str = "daemon.lock";

/// Why the state directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock: stop that daemon, or give this one
    /// its own `--state-dir`.
    #[error("another ztmesh daemon ({holder}) holds the lock {path}; stop it or use another --state-dir")]
    Held { path: PathBuf, holder: String },
    /// The lock file cannot be opened or locked (permissions, file system).
    #[error("cannot lock {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The held lock; released when dropped (or when the process exits).
#[derive(Debug)]
pub struct StateLock {
    _file: File,
    path: PathBuf,
}

impl StateLock {
    /// Takes the lock of `state_dir` without waiting, and records our PID.
    ///
    /// # Errors
    /// [`LockError::Held`] naming the holder's PID when another daemon runs.
    pub fn acquire(state_dir: &Path) -> Result<Self, LockError> {
        let path = state_dir.join(LOCK_FILE);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        // SAFETY: flock on a descriptor we own; no memory is passed.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = match text.trim().parse::<u32>() {
                    Ok(pid) => format!("pid {pid}"),
                    Err(_) => "pid unknown".to_string(),
                };
                return Err(LockError::Held { path, holder });
            }
            return Err(io(err));
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(Self { _file: file, path })
    }

    /// Path of the lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_dir_is_refused_until_the_first_is_dropped() {
        let dir = std::env::temp_dir().join(format!("ztmesh-statelock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = StateLock::acquire(&dir).unwrap();
        // flock locks belong to the open file description, so a second open in
        // the same process conflicts just as another process would.
        let err = StateLock::acquire(&dir).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        assert!(err.contains(&first.path().display().to_string()), "{err}");
        drop(first);
        let again = StateLock::acquire(&dir);
        assert!(again.is_ok());
        drop(again);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
