//! One server process per file.
//!
//! A node keeps part of its state in memory beside its file: the fences, whether changes are
//! captured, the write counter, the node id it was claimed as. A second `shardlite node` on the
//! same file would keep its own copies and act on them: it would accept writes the first one
//! fences, or miss the capture the first one installed, while SQLite's locks keep the file
//! itself consistent, so nothing would look wrong. A second proxy on one state file would drive
//! the same rebalance job a second time, beside the first. So a server takes an exclusive lock
//! beside its file before it opens it, and holds it until it has closed the file: a second
//! server on that file stops at start with an error that names the holder.
//!
//! The lock is on a file of its own, `<file>-lock` (as SQLite names `<file>-wal`): SQLite locks
//! the database with POSIX record locks, which belong to the process and fall when any handle
//! on the file closes, so a second handle on the database itself is best left alone. The
//! kernel drops the lock when its holder dies, `kill -9` included: a crash never leaves a stale
//! lock to clean up, and the `-lock` file stays for the next start.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Held while a server has its file open; dropping it releases the lock.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

/// Why a file could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock. (The caller names the file: the message says only
    /// what is wrong with it.)
    #[error(
        "in use by another process ({holder}); one server per file: stop that one, or give \
         this one a file of its own"
    )]
    InUse { path: PathBuf, holder: String },
    /// The lock file could not be opened or locked.
    #[error("cannot lock {}: {source}", lock_path.display())]
    Io {
        lock_path: PathBuf,
        source: std::io::Error,
    },
}

/// The lock file beside `path`.
pub fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push("-lock");
    PathBuf::from(name)
}

/// Locks `path` for this process, or says who holds it. The lock file then says who this is,
/// for the next one that asks.
pub fn lock(path: &Path) -> Result<FileLock, LockError> {
    let lock_path = lock_path(path);
    let io = |source| LockError::Io {
        lock_path: lock_path.clone(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "it did not say which".to_owned(),
                said => said.to_owned(),
            };
            return Err(LockError::InUse {
                path: path.to_owned(),
                holder,
            });
        }
        Err(TryLockError::Error(e)) => return Err(io(e)),
    }
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(holder().as_bytes()))
        .map_err(io)?;
    Ok(FileLock { _file: file })
}

/// How this process describes itself in a lock file: `pid 1234: shardlite node`. (From
/// `args_os`: `args` panics on an argument that is not UTF-8.)
fn holder() -> String {
    let mut args = std::env::args_os();
    let program = args.next().unwrap_or_default();
    let program = Path::new(&program).file_name().unwrap_or(&program);
    let subcommand = args.next().unwrap_or_default();
    format!(
        "pid {}: {} {}",
        std::process::id(),
        program.to_string_lossy(),
        subcommand.to_string_lossy()
    )
    .trim_end()
    .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_a_file_is_refused_and_names_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("n1.db");
        let first = lock(&db).unwrap();
        let err = lock(&db).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, LockError::InUse { .. }), "{text}");
        assert!(
            text.starts_with(&format!(
                "in use by another process (pid {}:",
                std::process::id()
            )),
            "{text}"
        );
        // Released with the first: the file can be locked again.
        drop(first);
        let again = lock(&db).unwrap();
        assert!(lock_path(&db).exists());
        drop(again);
    }

    #[test]
    fn the_lock_file_sits_beside_the_database() {
        assert_eq!(
            lock_path(Path::new("data/n1.db")),
            PathBuf::from("data/n1.db-lock")
        );
    }

    #[test]
    fn a_lock_file_that_cannot_be_made_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = lock(&dir.path().join("missing/n1.db")).unwrap_err();
        assert!(matches!(err, LockError::Io { .. }), "{err}");
        assert!(err.to_string().contains("missing/n1.db-lock"), "{err}");
    }
}
