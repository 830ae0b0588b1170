//! What a binary or a test decides about a node before opening it.

use std::path::PathBuf;
use std::time::Duration;

/// How hard SQLite syncs a commit to disk (`PRAGMA synchronous`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Synchronous {
    /// WAL + NORMAL: the WAL is not synced at commit, only at checkpoints. A commit survives a
    /// crash of the process; the database stays consistent through an OS crash or power loss,
    /// but the last acknowledged commits before it may roll back.
    Normal,
    /// WAL + FULL: the WAL is synced at every commit, before any write it carries is
    /// acknowledged, so an acknowledged write survives an OS crash or power loss too. Group
    /// commit (see `writer`) pays one sync for all the writes queued together.
    #[default]
    Full,
}

impl Synchronous {
    /// The value `PRAGMA synchronous = ...` takes for this level.
    pub fn pragma_value(self) -> &'static str {
        match self {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        }
    }

    /// The number `PRAGMA synchronous` reads back for this level.
    pub(crate) fn level(self) -> i64 {
        match self {
            Synchronous::Normal => 1,
            Synchronous::Full => 2,
        }
    }
}

/// The default most bytes of the file read through a memory map: 1 GiB. It only reserves
/// address space; pages come from the OS page cache as they are read.
pub const DEFAULT_MMAP_BYTES: u64 = 1 << 30;

/// A node's configuration. Build it with [`NodeConfig::new`] and change the fields you need.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The SQLite file this node serves. Its directory must exist; the file is created if missing.
    pub db_path: PathBuf,
    /// Read-only connections, so keyless queries, key scans and stats run beside the writer.
    pub readers: usize,
    /// Wall-clock limit for one client SQL request; past it SQLite is interrupted and the
    /// client gets 504.
    pub statement_timeout: Duration,
    /// Most rows one client SQL answer may carry (a runaway join should fail, not fill memory).
    pub max_result_rows: usize,
    /// Most bytes (roughly, as JSON) one client SQL answer may carry.
    pub max_result_bytes: usize,
    /// Largest request body; also SQLite's LENGTH limit, so no value can outgrow what a client
    /// could have sent.
    pub max_body_bytes: usize,
    /// `PRAGMA synchronous` on every connection; it only matters on the writer.
    pub synchronous: Synchronous,
    /// How much of the file SQLite reads through a memory map (`PRAGMA mmap_size`), in bytes;
    /// 0 reads every page with `pread` into each connection's own cache. The map saves a copy
    /// and a system call per page read, and all connections share it (the OS page cache). Writes
    /// still go through the WAL. The cost: an I/O error while reading the file ends the process
    /// (SIGBUS) instead of failing one request; the WAL makes the restart safe.
    pub mmap_bytes: u64,
    /// When set, every endpoint but `/healthz` needs `Authorization: Bearer <secret>`: the
    /// proxy sends it, so a client that reaches the node directly cannot bypass the proxy.
    pub cluster_secret: Option<String>,
}

impl NodeConfig {
    /// A configuration with the defaults: 4 readers, 5 s statements, 100,000 result rows,
    /// 64 MiB results and bodies, `synchronous=FULL`, a memory map of up to 1 GiB.
    pub fn new(db_path: impl Into<PathBuf>) -> Self {
        NodeConfig {
            db_path: db_path.into(),
            readers: 4,
            statement_timeout: Duration::from_secs(5),
            max_result_rows: 100_000,
            max_result_bytes: 64 * 1024 * 1024,
            max_body_bytes: 64 * 1024 * 1024,
            synchronous: Synchronous::Full,
            mmap_bytes: DEFAULT_MMAP_BYTES,
            cluster_secret: None,
        }
    }
}
