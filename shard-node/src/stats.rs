//! Row counts and size: `GET /v1/stats`.

use std::collections::BTreeMap;

use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use crate::schema::{Schema, quote};

/// `GET /v1/stats` answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct StatsResponse {
    /// Rows in all sharded tables.
    pub rows: u64,
    /// The main database's size: `page_count * page_size`. The WAL is not counted: it is
    /// transient and shrinks back at checkpoints.
    pub bytes: u64,
    /// Rows per sharded table.
    #[serde(default)]
    pub tables: BTreeMap<String, u64>,
    /// Whether change capture is on (a rebalance is copying from this node).
    #[serde(default)]
    pub capturing: bool,
    /// Fenced ranges in force.
    #[serde(default)]
    pub fences: usize,
    /// Client writes (row writes, batches, keyed SQL) answered since the node started.
    #[serde(default)]
    pub writes: u64,
    /// Transactions that carried those writes (group commit): with `synchronous=FULL`, one
    /// sync of the WAL each. `writes / commits` is the mean group size.
    #[serde(default)]
    pub commits: u64,
    /// `POST /v1/ops` exchanges served (row requests the proxy sent together) since the node
    /// started, and the operations they carried: `ops / op_sets` is the mean set size.
    #[serde(default)]
    pub op_sets: u64,
    #[serde(default)]
    pub ops: u64,
    /// Times the writer checkpointed so that a long WAL could start over (once per 64 MiB of
    /// WAL under steady writes; see `checkpoint`).
    #[serde(default)]
    pub wal_restarts: u64,
}

pub(crate) fn collect(conn: &Connection, schema: &Schema) -> rusqlite::Result<StatsResponse> {
    let mut tables = BTreeMap::new();
    for table in schema.tables() {
        let sql = format!("SELECT count(*) FROM {}", quote(&table.name));
        let n: i64 = conn.prepare_cached(&sql)?.query_row([], |row| row.get(0))?;
        tables.insert(table.name.clone(), u64::try_from(n).unwrap_or(0));
    }
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |row| row.get(0))?;
    let page_size: i64 = conn.query_row("PRAGMA page_size", [], |row| row.get(0))?;
    Ok(StatsResponse {
        rows: tables.values().sum(),
        bytes: u64::try_from(pages * page_size).unwrap_or(0),
        tables,
        // The caller fills these in from the node's state.
        capturing: false,
        fences: 0,
        writes: 0,
        commits: 0,
        op_sets: 0,
        ops: 0,
        wal_restarts: 0,
    })
}
