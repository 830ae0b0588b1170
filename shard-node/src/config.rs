//! What a binary or a test decides about a node before opening it.

use std::path::PathBuf;
use std::time::Duration;

/// How hard SQLite syncs a commit to disk (`PRAGMA synchronous`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Synchronous {
    /// WAL + NORMAL: a commit survives a crash of the process, and the database stays
    /// consistent through a power loss, but the last commits before the power loss may roll back.
    #[default]
    Normal,
    /// WAL + FULL: every commit is synced before it is acknowledged.
    Full,
}

impl Synchronous {
    pub(crate) fn pragma_value(self) -> &'static str {
        match self {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        }
    }
}

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
    /// `PRAGMA synchronous` on every connection.
    pub synchronous: Synchronous,
    /// When set, every endpoint but `/healthz` needs `Authorization: Bearer <secret>`: the
    /// proxy sends it, so a client that reaches the node directly cannot bypass the proxy.
    pub cluster_secret: Option<String>,
}

impl NodeConfig {
    /// A configuration with the defaults: 4 readers, 5 s statements, 100,000 result rows,
    /// 64 MiB results and bodies, `synchronous=NORMAL`.
    pub fn new(db_path: impl Into<PathBuf>) -> Self {
        NodeConfig {
            db_path: db_path.into(),
            readers: 4,
            statement_timeout: Duration::from_secs(5),
            max_result_rows: 100_000,
            max_result_bytes: 64 * 1024 * 1024,
            max_body_bytes: 64 * 1024 * 1024,
            synchronous: Synchronous::Normal,
            cluster_secret: None,
        }
    }
}
