//! A shardlite shard node: one SQLite file served over HTTP to the proxy.
//!
//! The proxy owns routing; a node owns one database file and answers the internal API written
//! down in `docs/node-api.md`: keyed row operations, client SQL, a key scan, statistics, the
//! migration ledger, and its part of an online rebalance (change capture, range scans, fences).
//! A node knows nothing about the ring or its peers: the only ring function it uses is the
//! key hash, to test stored keys against the hash ranges the proxy sends.
//!
//! # Design
//!
//! **Connections.** The file is switched to WAL once, on a plain connection, before any pool
//! exists (switching inside a pool's init races at start-up). Then an r2d2 pool of read-only
//! readers, which WAL lets run beside the writer, and one read-write connection owned by the
//! writer thread (below), so writes are serialised by a queue instead of by `SQLITE_BUSY`.
//! Every connection gets the same controls when it is opened: per-connection pragmas,
//! `DbConfig` hardening, run-time limits, then the authorizer (last, or it would refuse our
//! own pragmas) and a progress handler. Reads run inside `spawn_blocking`, writes on the
//! writer thread; no lock is held across an `.await`.
//!
//! **Writes and durability.** One thread runs every write from one FIFO queue (`writer`).
//! Client writes are grouped: the thread takes what is queued (up to 256 requests), runs it in
//! one `BEGIN IMMEDIATE` transaction with a savepoint per request (a failing request rolls
//! back alone), commits once, and only then answers each request. The default is
//! `synchronous=FULL`: that one commit syncs the WAL, so an acknowledged write survives power
//! loss, and the sync is paid once per group, not once per write. `synchronous=NORMAL` skips
//! the sync at commit (a write survives a crash of the process, not of the machine). Fences,
//! capture, transfer apply and purge, and migrations are jobs that run alone, on the same
//! queue. `/v1/stats` counts `writes` and the `commits` that carried them.
//!
//! **The security boundary is SQLite's authorizer**, not any parsing of SQL text. It runs when
//! a statement is prepared (and again if SQLite re-prepares it while stepping), and it asks a
//! thread-local *mode*: our own fixed SQL runs in `Internal` mode and is never refused; client
//! text is prepared and stepped inside a scope that switches the mode to `Client` or
//! `ClientReadOnly` and restores it on the way out, panics included. That works because each
//! request's SQLite work happens on one thread (a reader's blocking thread, or the writer
//! thread, which runs the requests of a group one after the other, each in its own scope).
//! Client text is never `prepare_cached` (a cached statement would keep the decision of its
//! first prepare); the node's own generated SQL is, since its text only ever comes from the
//! live schema. Client SQL may not run `BEGIN`, `COMMIT`, `ROLLBACK`, `SAVEPOINT` or `RELEASE`,
//! so it can neither end a group's transaction nor touch another request's savepoint.
//!
//! **Time.** The progress handler checks a thread-local deadline, set only for client SQL; when
//! it passes, SQLite stops with `SQLITE_INTERRUPT` and the client gets a 504. An interrupted
//! write statement makes SQLite roll back the whole transaction, so the writer then runs the
//! group's other requests again in a new one (see `writer`).
//!
//! **Hygiene.** A request is at most one transaction, or one savepoint of its group's
//! transaction. Whatever a request left open is rolled back before the connection is used
//! again. A reader that carries state between requests (temporary objects, an open
//! transaction) is reported broken to r2d2 at check-in, so the pool drops it; the writer
//! closes its connection in that case and opens a new one for the next job.
//!
//! **Placement.** Keyed SQL may insert or update rows under its own key only (`written`): a
//! request that would change a key, write another key's row, or let SQLite number an `INTEGER
//! PRIMARY KEY` is refused with a 400, so it leaves no row on a shard its key does not route
//! to. SQLite's update hook notes the rows; their keys are read again before the request's
//! savepoint is released.
//!
//! **Rebalance.** While a range moves, the proxy has the source capture changes (triggers
//! that log every written key into `_shardlite_changes`) and, for the final drain, puts a
//! *fence* on the range. Every client write is checked against the fences inside its group's
//! transaction, after `BEGIN IMMEDIATE`, and, when capture is on, its logged keys are checked
//! before its savepoint is released; a fence is stored by a job on the writer's queue, alone
//! in its transaction. So every write queued before a fence commits before it, every write
//! queued after it sees it, and no write admitted before a fence commits after it (the Vitess
//! #9400 lesson); a fenced key is answered 409 `{"fenced": true}`. Fences survive a restart;
//! the in-memory copy changes only on the writer thread.
//!
//! **Schema.** Sharded tables are read from the live schema at open and after every
//! migration, and cached; row operations only ever name tables and columns found there.
//!
//! # Modules
//!
//! - [`config`]: `NodeConfig`, the knobs a binary or a test sets.
//! - [`state`]: `NodeState`, the readers, the writer and the cached schema, cheap to clone.
//! - `db`: opening the file, WAL, the readers' pool, the writer's connection and the
//!   per-connection controls.
//! - `writer`: the writer thread, its queue, group commit, and the jobs that run alone.
//! - `guard`: the authorizer, the thread-local mode and deadline, and why a statement was refused.
//! - [`key`]: shard keys, their affinity and their routing text (shared with the proxy).
//! - [`value`]: JSON ⇄ SQLite values as the contract maps them.
//! - [`schema`]: which tables are sharded, their key and columns.
//! - [`rows`]: keyed row operations and the key scan.
//! - [`fence`]: hash ranges, fences, and the check every client write passes.
//! - [`transfer`]: change capture, range scans and counts, fetch, apply, purge.
//! - [`sql`]: client SQL, keyed (the writer, grouped) or read-only (a reader).
//! - [`migrate`]: the migration ledger and applying migrations.
//! - [`stats`]: row counts, file size, writes and commits.
//! - [`error`]: `NodeError`, and the one place errors become HTTP answers.
//! - `http`: handlers and the router.

pub mod auth;
mod checkpoint;
pub mod config;
mod db;
pub mod error;
pub mod fence;
mod guard;
mod http;
pub mod identity;
pub mod key;
pub mod lock;
pub mod migrate;
pub mod ops;
pub mod rows;
pub mod schema;
pub mod sql;
pub mod state;
pub mod stats;
pub mod transfer;
pub mod value;
mod writer;
mod written;

pub use config::{DEFAULT_MMAP_BYTES, NodeConfig, Synchronous};
pub use error::NodeError;
pub use http::{router, serve};
pub use state::NodeState;
