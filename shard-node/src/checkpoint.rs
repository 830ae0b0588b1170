//! WAL checkpoints on a thread of their own, so that no client write waits for one.
//!
//! By default SQLite checkpoints inside the commit that takes the WAL past 1000 pages: that
//! commit, and with group commit every write queued behind it, waits while the pages are
//! copied into the database file and synced. Here the writer's automatic checkpoint is off
//! and this thread runs a PASSIVE checkpoint every [`INTERVAL`] on its own connection.
//! PASSIVE takes no lock that writers or readers wait for: it copies what it can, and the
//! writer starts the WAL over from the beginning once everything in it has been copied and no
//! reader still uses it. So the WAL stays small, and durability is unchanged (the WAL is synced
//! at commit as the `synchronous` setting says; a checkpoint syncs the database file).
//!
//! The thread holds its connection only while it runs: it is stopped and joined before the
//! writer closes, so the writer's connection is still the last to close and removes the WAL.
//!
//! # Keeping the WAL short
//!
//! SQLite starts the WAL over only when a write transaction begins on a WAL that has been
//! checkpointed to its end. Under a steady stream of writes that never happens here: this
//! thread copies what was committed up to a moment ago, and the writer has committed more by
//! then. The WAL then grows without end (700 MB in 8 s of 20k PUT/s was measured), and every
//! commit appends to new blocks of the file, which the file system must allocate and zero.
//! So once the WAL holds [`RESTART_FRAMES`] frames after a pass, this thread asks the writer
//! (`Shared::want_wal_restart`) to checkpoint the little that is left itself, between two
//! transactions, when no write can slip in; its next transaction then starts the WAL over.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use rusqlite::Connection;

use crate::db::Opener;
use crate::error::NodeError;
use crate::writer::Shared;

/// How often the thread checkpoints. 250 ms (fewer copies of a page rewritten between passes)
/// made no difference the bench could see: an A/B alternating the two gave PUT through the
/// proxy 21.8k and 14.9k/s at 50 ms, 18.5k and 19.7k/s at 250 ms.
pub(crate) const INTERVAL: Duration = Duration::from_millis(50);

/// WAL frames (pages) after which the writer is asked to let the WAL start over: about 64 MiB.
/// The writer's checkpoint for it pauses writes for 1-10 ms; with 4096 frames that came four
/// times as often and direct PUTs' p99 rose from 8-9 to 10-13 ms in the bench. Readers look a
/// page up in 4 blocks of SQLite's WAL index at most (4096 frames each).
pub(crate) const RESTART_FRAMES: i64 = 16384;

/// The running checkpoint thread; dropping it stops and joins the thread.
pub(crate) struct Checkpointer {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Turns off the automatic checkpoint on `writer` and starts the thread, which asks the
    /// writer through `shared` to let a long WAL start over.
    pub(crate) fn start(
        opener: &Opener,
        writer: &Connection,
        shared: Arc<Shared>,
    ) -> Result<Checkpointer, NodeError> {
        writer.pragma_update(None, "wal_autocheckpoint", 0)?;
        let conn = opener.open().map_err(|source| NodeError::Open {
            path: opener.path().to_owned(),
            source,
        })?;
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let signal = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name("shardlite-ckpt".into())
            .spawn(move || run(conn, &signal, &shared))
            .map_err(NodeError::WriterThread)?;
        Ok(Checkpointer {
            stop,
            thread: Some(thread),
        })
    }
}

fn run(conn: Connection, stop: &(Mutex<bool>, Condvar), shared: &Shared) {
    let (lock, wake) = stop;
    let mut stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        stopped = wake
            .wait_timeout(stopped, INTERVAL)
            .unwrap_or_else(|e| e.into_inner())
            .0;
        if *stopped {
            return;
        }
        if pass(&conn) >= RESTART_FRAMES {
            // The writer's share is what is committed after the pass before it starts: one
            // more pass at once shrinks it from an interval's commits to a pass's.
            pass(&conn);
            shared.want_wal_restart();
        }
    }
}

/// One PASSIVE checkpoint; the frames in the WAL when it started (0 after an error).
fn pass(conn: &Connection) -> i64 {
    // (busy, frames in the WAL, frames copied); busy is 0 for PASSIVE.
    match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
        row.get::<_, i64>(1)
    }) {
        Ok(frames) => frames,
        Err(e) => {
            tracing::warn!(error = %e, "WAL checkpoint failed; retrying");
            0
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        let (lock, wake) = &*self.stop;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        wake.notify_all();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the checkpoint thread panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::NodeConfig;
    use crate::state::NodeState;
    use std::time::{Duration, Instant};

    fn pragma(conn: &rusqlite::Connection, name: &str) -> i64 {
        conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn writes_reach_the_database_file_without_the_writer_checkpointing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let state = NodeState::open(NodeConfig::new(&path)).unwrap();
        let autocheckpoint = state.with_writer_for_test(|conn| pragma(conn, "wal_autocheckpoint"));
        assert_eq!(
            autocheckpoint, 0,
            "the writer must not checkpoint in a commit"
        );
        let before = std::fs::metadata(&path).unwrap().len();
        // About 100 pages, far below SQLite's own 1000-page threshold.
        state.with_writer_for_test(|conn| {
            conn.execute_batch(
                "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);
                 WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 4000)
                 INSERT INTO t SELECT i, printf('%0100d', i) FROM n;",
            )
            .unwrap();
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        let grown = loop {
            let now = std::fs::metadata(&path).unwrap().len();
            if now >= before + 100 * 4096 || Instant::now() > deadline {
                break now;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            grown >= before + 100 * 4096,
            "the database file stayed at {grown} bytes (from {before}): nothing was checkpointed"
        );
        // Closing still checkpoints everything and removes the WAL.
        drop(state);
        assert!(!dir.path().join("node.db-wal").exists());
    }

    #[test]
    fn the_wal_starts_over_under_a_steady_stream_of_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let state = NodeState::open(NodeConfig::new(&path)).unwrap();
        state.with_writer_for_test(|conn| {
            conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
                .unwrap();
        });
        // Transactions of 32 rows at random places of the table from four threads, so that
        // one is always queued: each transaction dirties pages of its own, the checkpoint
        // thread's passes are long, and it never finds the WAL checkpointed to its end.
        let rows: i64 = 40_960;
        std::thread::scope(|s| {
            for thread in 0..4 {
                let state = &state;
                s.spawn(move || {
                    for first in (thread * 32..rows).step_by(4 * 32) {
                        state.with_writer_for_test(move |conn| {
                            conn.execute(
                                "WITH RECURSIVE n(i) AS
                                   (SELECT ?1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1 + 31)
                                 INSERT OR REPLACE INTO t SELECT (i * 2654435761) % 1000003, zeroblob(300) FROM n",
                                [first],
                            )
                            .unwrap();
                        });
                    }
                });
            }
        });
        let wal = std::fs::metadata(dir.path().join("node.db-wal"))
            .unwrap()
            .len();
        let restarts = state.wal_restarts();
        assert!(restarts > 0, "the writer never checkpointed for a restart");
        // Without the restarts the WAL holds every page written: 363 MB when this was written,
        // 76-85 MB with them.
        let bound = 2 * super::RESTART_FRAMES as u64 * (4096 + 24);
        assert!(
            wal < bound,
            "the WAL grew to {wal} bytes (bound {bound}) despite {restarts} restarts"
        );
    }
}
