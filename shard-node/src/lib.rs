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
//! exists (switching inside a pool's init races at start-up). Then two r2d2 pools: a writer with
//! exactly one connection, so writes are serialised by the pool instead of by `SQLITE_BUSY`, and
//! a handful of read-only readers, which WAL lets run beside the writer. Every connection gets
//! the same controls when it is opened: per-connection pragmas, `DbConfig` hardening, run-time
//! limits, then the authorizer (last, or it would refuse our own pragmas) and a progress handler.
//! All SQLite work runs inside `spawn_blocking`; no lock is held across an `.await`.
//!
//! **The security boundary is SQLite's authorizer**, not any parsing of SQL text. It runs when
//! a statement is prepared (and again if SQLite re-prepares it while stepping), and it asks a
//! thread-local *mode*: our own fixed SQL runs in `Internal` mode and is never refused; client
//! text is prepared and stepped inside a scope that switches the mode to `Client` or
//! `ClientReadOnly` and restores it on the way out, panics included. That works because one
//! request's SQLite work happens on one blocking thread. Client text is never `prepare_cached`
//! (a cached statement would keep the decision of its first prepare); the node's own generated
//! SQL is, since its text only ever comes from the live schema.
//!
//! **Time.** The progress handler checks a thread-local deadline, set only for client SQL; when
//! it passes, SQLite stops with `SQLITE_INTERRUPT` and the client gets a 504.
//!
//! **Hygiene.** A request is at most one transaction. Whatever a request left open is rolled
//! back before the connection goes back to its pool, and a connection that carries state
//! between requests (temporary objects, an open transaction) is reported broken to r2d2 at
//! check-in, so the pool drops it instead of lending it out again.
//!
//! **Rebalance.** While a range moves, the proxy has the source capture changes (triggers
//! that log every written key into `_shardlite_changes`) and, for the final drain, puts a
//! *fence* on the range. Every client write runs in one transaction that checks the fences
//! after `BEGIN IMMEDIATE`, holding the single writer, and, when capture is on, checks the
//! keys it logged before `COMMIT`; a fence is stored by a transaction on that same writer.
//! So no write admitted before a fence commits after it (the Vitess #9400 lesson), and a
//! fenced key is answered 409 `{"fenced": true}`. Fences survive a restart; the in-memory
//! copy changes only while the writer is held.
//!
//! **Schema.** Sharded tables are read from the live schema at open and after every
//! migration, and cached; row operations only ever name tables and columns found there.
//!
//! # Modules
//!
//! - [`config`]: `NodeConfig`, the knobs a binary or a test sets.
//! - [`state`]: `NodeState`, the pools plus the cached schema, cheap to clone.
//! - `db`: opening the file, WAL, the pools and the per-connection controls.
//! - `guard`: the authorizer, the thread-local mode and deadline, and why a statement was refused.
//! - [`key`]: shard keys, their affinity and their routing text (shared with the proxy).
//! - [`value`]: JSON ⇄ SQLite values as the contract maps them.
//! - [`schema`]: which tables are sharded, their key and columns.
//! - [`rows`]: keyed row operations and the key scan.
//! - [`fence`]: hash ranges, fences, and the one transaction every client write runs in.
//! - [`transfer`]: change capture, range scans and counts, fetch, apply, purge.
//! - [`sql`]: client SQL, keyed (writer, one transaction) or read-only (a reader).
//! - [`migrate`]: the migration ledger and applying migrations.
//! - [`stats`]: row counts and file size.
//! - [`error`]: `NodeError`, and the one place errors become HTTP answers.
//! - `http`: handlers and the router.

pub mod config;
mod db;
pub mod error;
pub mod fence;
mod guard;
mod http;
pub mod key;
pub mod migrate;
pub mod rows;
pub mod schema;
pub mod sql;
pub mod state;
pub mod stats;
pub mod transfer;
pub mod value;

pub use config::{NodeConfig, Synchronous};
pub use error::NodeError;
pub use http::{router, serve};
pub use state::NodeState;
