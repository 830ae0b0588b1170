//! The node's part of an online rebalance: change capture, range scans and counts, fetching
//! and applying rows, purging moved rows, and the fences (`/v1/transfer/*`).
//!
//! The proxy runs the protocol of `notes/rebalance.md` (capture → copy → catch-up → fence →
//! drain → switch → purge); a node only offers the steps, each one a single transaction, each
//! one safe to repeat after a crash:
//!
//! - **Capture** installs `AFTER INSERT/UPDATE/DELETE` triggers on every sharded table that
//!   append `(seq, tbl, key)` to `_shardlite_changes`, inside the writer's own transaction, so
//!   every write path is seen: keyed SQL that touches other keys, users' triggers, and the rows
//!   `INSERT OR REPLACE` deletes on a UNIQUE conflict (those fire delete triggers only because
//!   every connection runs with `recursive_triggers` on). An UPDATE logs `OLD.key`, and
//!   `NEW.key` too when the key changed (a key change is a delete plus an insert). `seq` is
//!   `AUTOINCREMENT`, so it never goes back. The trigger bodies are plain INSERTs of `OLD`/`NEW`
//!   columns: `trusted_schema` is off, and the authorizer lets client SQL reach the change log
//!   only through a trigger whose name starts with `_shardlite_capture_`.
//! - **Scan, count, purge, tally** compute each stored key's ring position in Rust
//!   ([`routing_hash_of`]) and test it against sorted, merged ranges with a binary search; no
//!   SQL function is registered. Keys with no routing text (REAL, BLOB, NULL) are never in a
//!   range. A scan page is one short read transaction, paged by key: keys first, then whole
//!   rows only for the keys in range. A purge page is one short write transaction that
//!   answers a cursor, so a purge in pages reads each row once.
//! - **Tally** is the source's half of the count check before the fence: in one read
//!   transaction, the counts of the ranges and the rows of the keys logged since a position,
//!   so the proxy can bring the target to that same position and compare.
//! - **Apply** writes whole rows with `INSERT ... ON CONFLICT (key) DO UPDATE SET` every column,
//!   never `REPLACE` (which would delete first and fire delete triggers). Apply and purge are
//!   the mover's writes: fences do not apply to them.
//! - **Fences** live in `crate::fence`, which also checks every client write.
//!
//! Capture, apply and purge are writer jobs that run alone, each in its own transaction,
//! between two groups of client writes.

use std::collections::{BTreeMap, HashSet};

use rusqlite::Connection;
use rusqlite::types::Value as SqlValue;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::Synchronous;
use crate::db::rollback;
use crate::error::NodeError;
use crate::fence::{Fence, RangeCounter, Ranges};
use crate::key::routing_hash_of;
use crate::rows::{self, ValidRow};
use crate::schema::{Schema, TableSchema, quote};
use crate::state::NodeState;
use crate::value::{BASE64_KEY, json_to_sql, sql_to_json};

/// The change log; created by capture-on, dropped by capture-off.
pub const CHANGES_TABLE: &str = "_shardlite_changes";

/// Every capture trigger's name starts with this (the authorizer checks the same prefix).
pub const CAPTURE_TRIGGER_PREFIX: &str = "_shardlite_capture_";

const CHANGES_DDL: &str = "CREATE TABLE IF NOT EXISTS _shardlite_changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    tbl TEXT NOT NULL,
    key
)";

/// Changes per page when the request names no limit, and the most per page.
pub const DEFAULT_CHANGES_LIMIT: usize = 5000;
pub const MAX_CHANGES_LIMIT: usize = 50_000;
/// Rows scanned per page when the request names no limit, and the most per page.
pub const DEFAULT_SCAN_LIMIT: usize = 2000;
pub const MAX_SCAN_LIMIT: usize = 20_000;
/// Most keys one fetch may name.
pub const MAX_FETCH_KEYS: usize = 10_000;
/// Rows deleted per purge when the request names no limit, and the most per purge.
pub const DEFAULT_PURGE_LIMIT: usize = 5000;
pub const MAX_PURGE_LIMIT: usize = 50_000;
/// Most keys one purge reads (it holds the writer meanwhile); it stops there and answers a
/// cursor, so a purge of a sparse range is many short transactions, not one long one.
pub const MAX_PURGE_SCAN: usize = 100_000;

/// `POST /v1/transfer/capture` answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CaptureResponse {
    /// The highest seq in the change log now; drain from here.
    pub max_seq: i64,
}

/// `POST /v1/transfer/changes` body.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct ChangesRequest {
    /// Changes with a seq above this one.
    #[serde(default)]
    pub after: i64,
    #[serde(default)]
    pub limit: Option<usize>,
}

/// One logged change: a key of `table` that was inserted, updated or deleted.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Change {
    pub seq: i64,
    pub table: String,
    /// The key as stored: a JSON integer or string.
    pub key: Value,
}

/// `POST /v1/transfer/changes` answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ChangesResponse {
    pub changes: Vec<Change>,
    /// The highest seq in the log, read in the same snapshot; 0 when capture is off.
    pub max_seq: i64,
    pub capturing: bool,
}

/// `POST /v1/transfer/scan` body.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct ScanRequest {
    pub table: String,
    /// The `next` of the previous page; null or absent for the first.
    #[serde(default)]
    pub after: Option<Value>,
    #[serde(default)]
    pub limit: Option<usize>,
    pub ranges: Vec<(u32, u32)>,
}

/// `POST /v1/transfer/scan` answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ScanResponse {
    /// The scanned rows whose key hash is in the ranges, in key order.
    pub rows: Vec<Map<String, Value>>,
    /// The last key scanned when more rows may follow; null at the end of the table.
    pub next: Option<Value>,
}

/// `POST /v1/transfer/count` body.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct CountRequest {
    pub ranges: Vec<(u32, u32)>,
}

/// `POST /v1/transfer/count` answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CountResponse {
    /// `counts[i]`: rows of all sharded tables whose key hash is in `ranges[i]`.
    pub counts: Vec<u64>,
    /// All rows of all sharded tables.
    pub rows_total: u64,
}

/// `POST /v1/transfer/fetch` body.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct FetchRequest {
    pub table: String,
    pub keys: Vec<Value>,
}

/// `POST /v1/transfer/fetch` answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct FetchResponse {
    /// The rows that exist, once each, in the order their keys were asked for.
    pub rows: Vec<Map<String, Value>>,
}

/// `POST /v1/transfer/apply` body.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct ApplyRequest {
    pub table: String,
    #[serde(default)]
    pub upserts: Vec<Value>,
    #[serde(default)]
    pub deletes: Vec<Value>,
}

/// `POST /v1/transfer/apply` answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ApplyResponse {
    pub upserted: usize,
    /// Rows that existed and were deleted.
    pub deleted: u64,
}

/// `POST /v1/transfer/purge` body.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct PurgeRequest {
    pub ranges: Vec<(u32, u32)>,
    #[serde(default)]
    pub limit: Option<usize>,
    /// The `next` of the previous purge: continue after it. Absent: from the first table's
    /// first key.
    #[serde(default)]
    pub after: Option<PurgeCursor>,
}

/// Where a purge stopped: the tables are walked by name, each in rowid order when it has a
/// rowid, else in key order.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PurgeCursor {
    pub table: String,
    /// The last rowid looked at in `table` (a walk by rowid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rowid: Option<i64>,
    /// The last key looked at in `table`, as stored (a walk by key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Value>,
}

/// `POST /v1/transfer/purge` answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PurgeResponse {
    pub deleted: u64,
    /// No row is left in the ranges after the cursor the purge started from.
    pub done: bool,
    /// Where to continue when not done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<PurgeCursor>,
    /// The node process that answered. Pages before the last are committed without their own
    /// sync, so a crash of the machine can undo them, and always restarts the process: a
    /// caller that sees this change between pages starts the purge over.
    pub instance: String,
    /// Client writes the node process has answered since it started (`writes` of
    /// `GET /v1/stats`), read after the page: a caller that sees it unchanged between two
    /// pages knows no client write came in meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writes: Option<u64>,
}

/// `POST /v1/transfer/tally` body.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct TallyRequest {
    /// Changes with a seq above this one are returned with their keys' current rows.
    #[serde(default)]
    pub after: i64,
    /// The ranges to count, and to keep logged keys of.
    pub ranges: Vec<(u32, u32)>,
    /// Most changes the answer may carry; with more, it carries none (`complete: false`).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// A logged key in the tallied ranges and its row in the same snapshot (absent: deleted).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TalliedKey {
    pub table: String,
    pub key: Value,
    pub row: Option<Map<String, Value>>,
}

/// `POST /v1/transfer/tally` answer: all of it read in one snapshot, at log position `max_seq`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TallyResponse {
    pub capturing: bool,
    /// False when more than `limit` changes follow `after`: nothing else is filled in.
    pub complete: bool,
    /// The log position of the snapshot.
    pub max_seq: i64,
    /// `counts[i]`: rows of all sharded tables whose key hash is in `ranges[i]`.
    pub counts: Vec<u64>,
    /// Every key logged in `(after, max_seq]` that lies in the ranges, once, in log order.
    pub keys: Vec<TalliedKey>,
}

/// `GET /v1/transfer/fences` answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct FencesResponse {
    pub fences: Vec<Fence>,
}

/// `PUT /v1/transfer/fences` body.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct PutFencesRequest {
    pub job: String,
    pub ranges: Vec<(u32, u32)>,
}

/// `PUT /v1/transfer/fences` answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PutFencesResponse {
    /// Fences now in force (the ranges as sent, not merged).
    pub fences: usize,
}

/// A page size: `default` when absent, lowered to `max`, never 0.
pub(crate) fn page_limit(
    requested: Option<usize>,
    default: usize,
    max: usize,
) -> Result<usize, NodeError> {
    match requested {
        None => Ok(default),
        Some(0) => Err(NodeError::InvalidRequest(
            "\"limit\" must be at least 1".into(),
        )),
        Some(n) => Ok(n.min(max)),
    }
}

/// A key as the mover sends it back (from a scan's `next`, the change log or a fetched row),
/// bound as the value it was read as: a JSON integer, float, string or `{"$base64": ...}`.
pub(crate) fn stored_key(v: &Value) -> Result<SqlValue, NodeError> {
    let is_blob = matches!(v, Value::Object(m) if m.len() == 1 && m.contains_key(BASE64_KEY));
    match v {
        Value::Number(_) | Value::String(_) => Ok(json_to_sql(v)?),
        Value::Object(_) if is_blob => Ok(json_to_sql(v)?),
        other => Err(NodeError::InvalidRequest(format!(
            "a key is a JSON integer, string or {{\"{BASE64_KEY}\": ...}}, not {other}"
        ))),
    }
}

// ---- capture ----

/// The table part of a capture trigger's name: the table name if it is `[A-Za-z0-9_]+`, else
/// `x` and the hex of its UTF-8 bytes.
pub fn trigger_stem(table: &str) -> String {
    if !table.is_empty()
        && table
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        table.to_owned()
    } else {
        let hex: String = table.bytes().map(|b| format!("{b:02x}")).collect();
        format!("x{hex}")
    }
}

/// `_shardlite_capture_<stem>_<op>`.
fn trigger_name(table: &str, op: &str) -> String {
    format!("{CAPTURE_TRIGGER_PREFIX}{}_{op}", trigger_stem(table))
}

/// `s` as a SQL string literal.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The three capture triggers of `table`: (name, CREATE TRIGGER statement).
fn capture_triggers(table: &TableSchema) -> [(String, String); 3] {
    let (t, k, name) = (quote(&table.name), quote(&table.key), literal(&table.name));
    let log =
        |row: &str| format!("INSERT INTO {CHANGES_TABLE} (tbl, key) VALUES ({name}, {row}.{k});");
    let create = |op: &str, event: &str, body: String| {
        let trigger = trigger_name(&table.name, op);
        let sql = format!(
            "CREATE TRIGGER {} AFTER {event} ON {t} FOR EACH ROW BEGIN {body} END",
            quote(&trigger)
        );
        (trigger, sql)
    };
    [
        create("ins", "INSERT", log("NEW")),
        create(
            "upd",
            "UPDATE",
            // The new key only when it changed; BINARY so a NOCASE key changing case counts.
            format!(
                "{} INSERT INTO {CHANGES_TABLE} (tbl, key) SELECT {name}, NEW.{k} \
                 WHERE NEW.{k} IS NOT OLD.{k} COLLATE BINARY;",
                log("OLD")
            ),
        ),
        create("del", "DELETE", log("OLD")),
    ]
}

/// The names of every capture trigger in the schema.
pub(crate) fn capture_trigger_names(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    conn.prepare_cached(
        "SELECT name FROM sqlite_schema WHERE type = 'trigger' \
         AND lower(substr(name, 1, ?1)) = ?2",
    )?
    .query_map(
        rusqlite::params![CAPTURE_TRIGGER_PREFIX.len() as i64, CAPTURE_TRIGGER_PREFIX],
        |row| row.get(0),
    )?
    .collect()
}

/// Whether the change log exists (capture is on).
pub(crate) fn capture_installed(conn: &Connection) -> rusqlite::Result<bool> {
    conn.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?1)",
    )?
    .query_row([CHANGES_TABLE], |row| row.get(0))
}

fn max_seq(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("SELECT coalesce(max(seq), 0) FROM _shardlite_changes")?
        .query_row([], |row| row.get(0))
}

/// Refuses a schema in which two tables would share capture trigger names (SQLite's names
/// are case-insensitive).
fn check_trigger_names(schema: &Schema) -> Result<(), NodeError> {
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    for table in schema.tables() {
        let stem = trigger_stem(&table.name).to_ascii_lowercase();
        if let Some(first) = seen.insert(stem, &table.name) {
            return Err(NodeError::CaptureNameClash {
                first: first.to_owned(),
                second: table.name.clone(),
                trigger: trigger_name(&table.name, "ins"),
            });
        }
    }
    Ok(())
}

/// Creates the change log and (re)creates the capture triggers of every sharded table, in one
/// writer transaction. Repeating it is harmless: old capture triggers (of renamed or dropped
/// tables too) are replaced, the log and its seq are kept.
pub(crate) fn capture_on(
    state: &NodeState,
    conn: &Connection,
) -> Result<CaptureResponse, NodeError> {
    let schema = state.schema();
    check_trigger_names(&schema)?;
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let installed = (|| -> rusqlite::Result<i64> {
        conn.execute_batch(CHANGES_DDL)?;
        for old in capture_trigger_names(conn)? {
            conn.execute_batch(&format!("DROP TRIGGER IF EXISTS {}", quote(&old)))?;
        }
        for table in schema.tables() {
            for (_, sql) in capture_triggers(table) {
                conn.execute_batch(&sql)?;
            }
        }
        let seq = max_seq(conn)?;
        conn.execute_batch("COMMIT")?;
        Ok(seq)
    })();
    match installed {
        Ok(max_seq) => {
            state.set_capturing(true);
            tracing::info!(tables = schema.tables().count(), max_seq, "capture on");
            Ok(CaptureResponse { max_seq })
        }
        Err(e) => {
            rollback(conn);
            Err(e.into())
        }
    }
}

/// Drops every capture trigger and the change log, in one writer transaction. Repeating it is
/// harmless.
pub(crate) fn capture_off(state: &NodeState, conn: &Connection) -> Result<(), NodeError> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let removed = (|| -> rusqlite::Result<()> {
        for name in capture_trigger_names(conn)? {
            conn.execute_batch(&format!("DROP TRIGGER IF EXISTS {}", quote(&name)))?;
        }
        conn.execute_batch("DROP TABLE IF EXISTS _shardlite_changes")?;
        conn.execute_batch("COMMIT")
    })();
    if let Err(e) = removed {
        rollback(conn);
        return Err(e.into());
    }
    state.set_capturing(false);
    tracing::info!("capture off");
    Ok(())
}

/// Up to `limit` logged changes above `after`, in seq order, read in one snapshot.
pub(crate) fn changes(
    conn: &Connection,
    after: i64,
    limit: usize,
) -> Result<ChangesResponse, NodeError> {
    conn.execute_batch("BEGIN")?;
    let read = (|| -> rusqlite::Result<ChangesResponse> {
        if !capture_installed(conn)? {
            return Ok(ChangesResponse {
                changes: Vec::new(),
                max_seq: 0,
                capturing: false,
            });
        }
        let changes = conn
            .prepare_cached(
                "SELECT seq, tbl, key FROM _shardlite_changes WHERE seq > ?1 \
                 ORDER BY seq LIMIT ?2",
            )?
            .query_map(
                rusqlite::params![after, i64::try_from(limit).unwrap_or(i64::MAX)],
                |row| {
                    Ok(Change {
                        seq: row.get(0)?,
                        table: row.get(1)?,
                        key: sql_to_json(row.get_ref(2)?),
                    })
                },
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(ChangesResponse {
            changes,
            max_seq: max_seq(conn)?,
            capturing: true,
        })
    })();
    rollback(conn);
    Ok(read?)
}

// ---- scan, count, fetch ----

/// `SELECT` every writable column of `table`; generated columns are left out (the target
/// computes its own).
fn select_columns(table: &TableSchema) -> String {
    let columns: Vec<String> = table.columns.iter().map(|c| quote(c)).collect();
    format!("SELECT {} FROM {}", columns.join(", "), quote(&table.name))
}

fn key_index(table: &TableSchema) -> usize {
    table
        .columns
        .iter()
        .position(|c| *c == table.key)
        .expect("the key column is one of the table's columns")
}

/// Reads up to `limit` keys after `after` in key order and returns the rows of those whose
/// key hash is in `ranges`, in key order, all in one read snapshot.
///
/// Keys are read alone first (a walk of the key's index, which also holds the rowid), and
/// whole rows only for the keys that match, in rowid order: in a rowid table with a TEXT key,
/// a key-ordered walk of whole rows would seek the table at random once per key, moving or
/// not, while in rowid order the moving rows of one table page are read one after another.
/// The rows still go out in key order, which keeps the target's inserts local.
///
/// `rowid` is the table's rowid alias ([`Schema::rowid_alias`]).
pub(crate) fn scan(
    conn: &Connection,
    table: &TableSchema,
    rowid: Option<&str>,
    after: Option<&SqlValue>,
    limit: usize,
    ranges: &Ranges,
) -> Result<ScanResponse, NodeError> {
    conn.execute_batch("BEGIN")?;
    let read = (|| -> Result<ScanResponse, NodeError> {
        let (t, k) = (quote(&table.name), quote(&table.key));
        // Without a rowid, rows are read back by key.
        let id = rowid.map_or_else(|| k.clone(), str::to_owned);
        let keys_sql = match after {
            Some(_) => format!("SELECT {k}, {id} FROM {t} WHERE {k} > ?1 ORDER BY {k} LIMIT ?2"),
            None => format!("SELECT {k}, {id} FROM {t} ORDER BY {k} LIMIT ?2"),
        };
        let mut stmt = conn.prepare_cached(&keys_sql)?;
        if let Some(after) = after {
            stmt.raw_bind_parameter(1, after)?;
        }
        // One more than asked tells whether another page follows.
        stmt.raw_bind_parameter(2, i64::try_from(limit + 1).unwrap_or(i64::MAX))?;
        // (rowid or key, position in key order) of each matching row.
        let mut matched: Vec<(SqlValue, usize)> = Vec::new();
        let mut scanned = 0;
        let mut last = None;
        let mut more = false;
        let mut cursor = stmt.raw_query();
        while let Some(row) = cursor.next()? {
            if scanned == limit {
                more = true;
                break;
            }
            scanned += 1;
            if ranges.contains_key(row.get_ref(0)?) {
                matched.push((row.get(1)?, matched.len()));
            }
            if scanned == limit {
                // The page's last key: where the next page starts, if there is one.
                last = Some(row.get::<_, SqlValue>(0)?);
            }
        }
        drop(cursor);
        if matches!(matched.first(), Some((SqlValue::Integer(_), _))) {
            matched.sort_unstable_by_key(|(id, _)| match id {
                SqlValue::Integer(n) => *n,
                _ => i64::MAX,
            });
        }
        let mut found: Vec<Option<Map<String, Value>>> = vec![None; matched.len()];
        let mut by_id =
            conn.prepare_cached(&format!("{} WHERE {id} = ?1", select_columns(table)))?;
        for (id, at) in &matched {
            if let Some(row) = by_id.query([id])?.next()? {
                found[*at] = Some(row_object(table, row)?);
            }
        }
        Ok(ScanResponse {
            rows: found.into_iter().flatten().collect(),
            next: if more {
                last.as_ref().map(|k| sql_to_json(k.into()))
            } else {
                None
            },
        })
    })();
    rollback(conn);
    read
}

/// A row selected by [`select_columns`] as a JSON object.
fn row_object(
    table: &TableSchema,
    row: &rusqlite::Row<'_>,
) -> rusqlite::Result<Map<String, Value>> {
    let mut object = Map::new();
    for (i, name) in table.columns.iter().enumerate() {
        object.insert(name.clone(), sql_to_json(row.get_ref(i)?));
    }
    Ok(object)
}

/// Counts the rows of every sharded table per range, reading keys only. One statement per
/// table: a snapshot each, none held across the whole count.
pub(crate) fn count(
    conn: &Connection,
    schema: &Schema,
    ranges: &[(u32, u32)],
) -> Result<CountResponse, NodeError> {
    let (counts, rows_total) = count_in(conn, schema, ranges)?;
    Ok(CountResponse { counts, rows_total })
}

/// Per range, the rows of all sharded tables whose key hash is in it; and all rows.
fn count_in(
    conn: &Connection,
    schema: &Schema,
    ranges: &[(u32, u32)],
) -> rusqlite::Result<(Vec<u64>, u64)> {
    let mut counter = RangeCounter::new(ranges);
    let mut rows_total = 0;
    for table in schema.tables() {
        let sql = format!("SELECT {} FROM {}", quote(&table.key), quote(&table.name));
        let mut stmt = conn.prepare_cached(&sql)?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            rows_total += 1;
            if let Some(hash) = routing_hash_of(row.get_ref(0)?) {
                counter.add(hash);
            }
        }
    }
    Ok((counter.counts(), rows_total))
}

/// The rows with `keys` that exist, once each, read in one snapshot.
pub(crate) fn fetch(
    conn: &Connection,
    table: &TableSchema,
    keys: &[SqlValue],
) -> Result<FetchResponse, NodeError> {
    let sql = format!("{} WHERE {} = ?1", select_columns(table), quote(&table.key));
    let key_at = key_index(table);
    conn.execute_batch("BEGIN")?;
    let read = (|| -> rusqlite::Result<FetchResponse> {
        let mut stmt = conn.prepare_cached(&sql)?;
        let mut seen = HashSet::new();
        let mut found = Vec::new();
        for key in keys {
            let mut rows = stmt.query([key])?;
            if let Some(row) = rows.next()? {
                // 42 and "42" can name the same row; send it once.
                if seen.insert(sql_to_json(row.get_ref(key_at)?).to_string()) {
                    found.push(row_object(table, row)?);
                }
            }
        }
        Ok(FetchResponse { rows: found })
    })();
    rollback(conn);
    Ok(read?)
}

// ---- apply, purge ----

/// Upserts whole rows, then deletes `deletes` by key, in one writer transaction. Not fenced.
pub(crate) fn apply(
    conn: &Connection,
    table: &TableSchema,
    upserts: &[ValidRow],
    deletes: &[SqlValue],
) -> Result<ApplyResponse, NodeError> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let applied = (|| -> Result<ApplyResponse, NodeError> {
        rows::upsert_whole_all(conn, table, upserts)?;
        let sql = format!(
            "DELETE FROM {} WHERE {} = ?1",
            quote(&table.name),
            quote(&table.key)
        );
        let mut delete = conn.prepare_cached(&sql)?;
        let mut deleted = 0;
        for key in deletes {
            deleted += delete.execute([key])? as u64;
        }
        conn.execute_batch("COMMIT")?;
        Ok(ApplyResponse {
            upserted: upserts.len(),
            deleted,
        })
    })();
    if applied.is_err() {
        rollback(conn);
    }
    applied
}

/// Where a purge continues inside one table.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum PurgeFrom {
    Rowid(i64),
    Key(SqlValue),
}

/// Deletes up to `limit` rows of sharded tables whose key hash is in `ranges`, in one writer
/// transaction. The tables are walked by name, each from `after` (the `next` of the previous
/// call), so a purge in pages reads every row once, not once per page.
///
/// A table with a rowid is walked in rowid order and its rows deleted by rowid: the table's
/// pages are then touched in order, and only the key's index at random (a walk by key would
/// touch the bigger table at random). The pages each delete dirties are written to the WAL at
/// every commit, so this halves what a page of deletes writes. Other tables go by key.
///
/// Rows are read until one more than `limit` match (so `done` is exact) or
/// [`MAX_PURGE_SCAN`] were read, then the first `limit` are deleted. `next` is the last row
/// deleted or, when the read stopped first, the last row read. Not fenced.
///
/// The cursor skips only rows already looked at, so nothing is missed as long as nobody adds
/// rows to `ranges` during the purge: true for both callers (a target before the copy, which
/// does not own the ranges, and a source after the switch, whose fence refuses the writes).
///
/// **Syncs.** A page that is not the last commits without a sync of its own
/// (`synchronous=NORMAL` for that one commit; `synchronous` is what the node is configured
/// with): the next commit that syncs (the last page's, or any client write's) makes it durable
/// with it. So a crash of the machine can undo pages already answered, but only together with
/// a restart of this process, and every answer carries the process's `instance`: a caller that
/// sees it change starts the purge over (the proxy does). The last page (`done`) commits with
/// the configured sync, and then syncs the WAL even if it deleted nothing (a commit without
/// changes writes no frame and syncs nothing), so once a purge answers `done`, all of it is as
/// durable as any write.
pub(crate) fn purge(
    conn: &Connection,
    schema: &Schema,
    ranges: &Ranges,
    limit: usize,
    after: Option<(&str, PurgeFrom)>,
    synchronous: Synchronous,
) -> Result<PurgeResponse, NodeError> {
    // Which rows go, read first. This runs as a job alone on the writer, which is the only
    // connection that changes rows, so they are still there for the delete below; reading
    // first tells whether this page is the last, which sets how its commit syncs.
    conn.execute_batch("BEGIN")?;
    let read = purge_page(conn, schema, ranges, limit, after.as_ref());
    rollback(conn);
    let (doomed, stopped) = read?;
    let done = doomed.len() <= limit && stopped.is_none();
    let relaxed = !done && synchronous == Synchronous::Full;
    if relaxed {
        conn.execute_batch("PRAGMA synchronous = NORMAL")?;
    }
    let deleted = delete_doomed(conn, &doomed[..doomed.len().min(limit)]);
    if relaxed {
        conn.execute_batch(&format!(
            "PRAGMA synchronous = {}",
            synchronous.pragma_value()
        ))?;
    }
    let deleted = deleted?;
    if done && synchronous == Synchronous::Full {
        // This page's commit synced the WAL only if it deleted something; earlier pages of the
        // purge may have committed unsynced, so sync it here in any case.
        sync_wal(conn)?;
    }
    let next = if done {
        None
    } else {
        // A full page: after its last deleted row; else after the last row read.
        let (table, rowid, id) = if doomed.len() > limit {
            &doomed[limit - 1]
        } else {
            stopped
                .as_ref()
                .expect("not done: the page is full or the read stopped")
        };
        Some(match (rowid, id) {
            (Some(_), SqlValue::Integer(n)) => PurgeCursor {
                table: table.name.clone(),
                rowid: Some(*n),
                key: None,
            },
            _ => PurgeCursor {
                table: table.name.clone(),
                rowid: None,
                key: Some(sql_to_json(id.into())),
            },
        })
    };
    Ok(PurgeResponse {
        deleted,
        done,
        next,
        instance: instance(),
        // The HTTP handler fills this in from the node's state.
        writes: None,
    })
}

/// Syncs the WAL file of `conn`'s database, so every frame in it is durable, whatever wrote
/// it. A frame already copied into the database file by a checkpoint is durable there (a
/// checkpoint syncs the file before the WAL starts over). No WAL file: nothing to sync.
fn sync_wal(conn: &Connection) -> Result<(), NodeError> {
    let Some(path) = conn.path().filter(|p| !p.is_empty()) else {
        return Ok(());
    };
    match std::fs::File::open(format!("{path}-wal")) {
        Ok(wal) => wal.sync_all().map_err(NodeError::WalSync),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(NodeError::WalSync(e)),
    }
}

/// A row a purge deletes: its table, the table's rowid alias if walked by rowid, and the row's
/// rowid or key.
type Doomed<'s> = (&'s TableSchema, Option<&'static str>, SqlValue);

/// The read half of [`purge`]: up to `limit + 1` doomed rows from `after` on, and the last row
/// read if the read stopped at [`MAX_PURGE_SCAN`] first.
fn purge_page<'s>(
    conn: &Connection,
    schema: &'s Schema,
    ranges: &Ranges,
    limit: usize,
    after: Option<&(&str, PurgeFrom)>,
) -> Result<(Vec<Doomed<'s>>, Option<Doomed<'s>>), NodeError> {
    let mut doomed = Vec::new();
    let mut scanned = 0;
    for table in schema.tables() {
        let from = match after {
            Some((name, _)) if table.name.as_str() < *name => continue,
            Some((name, from)) if table.name == *name => Some(from),
            _ => None,
        };
        let (t, k) = (quote(&table.name), quote(&table.key));
        let rowid = match from {
            Some(PurgeFrom::Key(_)) => None,
            _ => schema.rowid_alias(&table.name),
        };
        let (walk, bound) = match (rowid, from) {
            (Some(r), Some(PurgeFrom::Rowid(n))) => (
                format!("SELECT {r}, {k} FROM {t} WHERE {r} > ?1 ORDER BY {r}"),
                Some(SqlValue::Integer(*n)),
            ),
            (Some(r), _) => (format!("SELECT {r}, {k} FROM {t} ORDER BY {r}"), None),
            (None, Some(PurgeFrom::Key(key))) => (
                format!("SELECT {k}, {k} FROM {t} WHERE {k} > ?1 ORDER BY {k}"),
                Some(key.clone()),
            ),
            (None, _) => (format!("SELECT {k}, {k} FROM {t} ORDER BY {k}"), None),
        };
        let mut stmt = conn.prepare_cached(&walk)?;
        if let Some(bound) = &bound {
            stmt.raw_bind_parameter(1, bound)?;
        }
        let mut rows = stmt.raw_query();
        while let Some(row) = rows.next()? {
            scanned += 1;
            if ranges.contains_key(row.get_ref(1)?) {
                doomed.push((table, rowid, row.get::<_, SqlValue>(0)?));
                if doomed.len() > limit {
                    return Ok((doomed, None));
                }
            }
            if scanned >= MAX_PURGE_SCAN {
                let last = (table, rowid, row.get::<_, SqlValue>(0)?);
                return Ok((doomed, Some(last)));
            }
        }
    }
    Ok((doomed, None))
}

/// The write half of [`purge`]: deletes `doomed` in one transaction.
fn delete_doomed(conn: &Connection, doomed: &[Doomed<'_>]) -> Result<u64, NodeError> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let deleted = (|| -> Result<u64, NodeError> {
        let mut deleted = 0;
        for (table, rowid, id) in doomed {
            let column = rowid.map_or_else(|| quote(&table.key), str::to_owned);
            let sql = format!("DELETE FROM {} WHERE {column} = ?1", quote(&table.name));
            deleted += conn.prepare_cached(&sql)?.execute([id])? as u64;
        }
        conn.execute_batch("COMMIT")?;
        Ok(deleted)
    })();
    if deleted.is_err() {
        rollback(conn);
    }
    deleted
}

/// This process's instance: a random id drawn once per process. A node's answers that must
/// not be mixed across a restart carry it (see [`purge`]).
pub(crate) fn instance() -> String {
    static INSTANCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    INSTANCE
        .get_or_init(|| {
            use std::hash::BuildHasher;
            let seed = std::collections::hash_map::RandomState::new();
            format!(
                "{:016x}",
                seed.hash_one((std::process::id(), std::time::SystemTime::now()))
            )
        })
        .clone()
}

/// For the count check before the fence: in one read snapshot at log position `max_seq`, the
/// row count of each of `ranges`, and every key logged after `after` that lies in them, with
/// its row as it is in that snapshot.
///
/// Once the proxy has applied those rows and deletions to the target, the target holds what
/// the source held at `max_seq` in these ranges (the rest was applied by earlier catch-ups,
/// and a key changed since its last copy or catch-up is among the logged keys), so their
/// counts must be equal even while client writes go on.
pub(crate) fn tally(
    conn: &Connection,
    schema: &Schema,
    after: i64,
    ranges: &[(u32, u32)],
    limit: usize,
) -> Result<TallyResponse, NodeError> {
    let merged = Ranges::new(ranges)?;
    conn.execute_batch("BEGIN")?;
    let read = (|| -> Result<TallyResponse, NodeError> {
        let mut answer = TallyResponse {
            capturing: capture_installed(conn)?,
            complete: false,
            max_seq: 0,
            counts: Vec::new(),
            keys: Vec::new(),
        };
        if !answer.capturing {
            return Ok(answer);
        }
        answer.max_seq = max_seq(conn)?.max(after);
        let logged: Vec<(String, SqlValue)> = conn
            .prepare_cached(
                "SELECT tbl, key FROM _shardlite_changes WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )?
            .query_map(
                rusqlite::params![after, i64::try_from(limit + 1).unwrap_or(i64::MAX)],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )?
            .collect::<rusqlite::Result<_>>()?;
        if logged.len() > limit {
            return Ok(answer);
        }
        let mut seen = HashSet::new();
        for (name, key) in logged {
            let Some(table) = schema.table(&name) else {
                continue;
            };
            if !merged.contains_key((&key).into()) {
                continue;
            }
            let key_json = sql_to_json((&key).into());
            if !seen.insert((name.clone(), key_json.to_string())) {
                continue;
            }
            let sql = format!("{} WHERE {} = ?1", select_columns(table), quote(&table.key));
            let mut stmt = conn.prepare_cached(&sql)?;
            let mut rows = stmt.query([&key])?;
            let row = match rows.next()? {
                Some(row) => Some(row_object(table, row)?),
                None => None,
            };
            answer.keys.push(TalliedKey {
                table: name,
                key: key_json,
                row,
            });
        }
        answer.counts = count_in(conn, schema, ranges)?.0;
        answer.complete = true;
        Ok(answer)
    })();
    rollback(conn);
    read
}

/// The fences a `PUT` asks for, checked.
pub(crate) fn fences_of(request: PutFencesRequest) -> Result<Vec<Fence>, NodeError> {
    if request.job.trim().is_empty() {
        return Err(NodeError::InvalidRequest(
            "\"job\" must name the rebalance job".into(),
        ));
    }
    Ranges::new(&request.ranges)?;
    Ok(request
        .ranges
        .into_iter()
        .map(|(start, end)| Fence {
            start,
            end,
            job: request.job.clone(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::Affinity;

    #[test]
    fn trigger_names_follow_the_table_name_or_its_hex() {
        assert_eq!(trigger_stem("users"), "users");
        assert_eq!(trigger_stem("Order_Lines2"), "Order_Lines2");
        assert_eq!(trigger_stem("we\"ird"), "x776522697264");
        assert_eq!(trigger_stem("é"), "xc3a9");
        assert_eq!(trigger_name("users", "upd"), "_shardlite_capture_users_upd");
        assert_eq!(trigger_name("=", "del"), "_shardlite_capture_x3d_del");
    }

    #[test]
    fn clashing_trigger_names_are_refused() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE \"=\" (id INTEGER PRIMARY KEY); CREATE TABLE X3D (id INTEGER PRIMARY KEY);",
        )
        .unwrap();
        let schema = Schema::load(&conn).unwrap();
        assert!(matches!(
            check_trigger_names(&schema),
            Err(NodeError::CaptureNameClash { .. })
        ));
    }

    #[test]
    fn capture_triggers_quote_names_and_log_old_and_new_keys() {
        let table = TableSchema {
            name: "it's".into(),
            key: "k\"ey".into(),
            key_affinity: Affinity::Text,
            columns: vec!["k\"ey".into()],
        };
        let [ins, upd, del] = capture_triggers(&table);
        assert_eq!(ins.0, "_shardlite_capture_x69742773_ins");
        assert_eq!(
            ins.1,
            "CREATE TRIGGER \"_shardlite_capture_x69742773_ins\" AFTER INSERT ON \"it's\" \
             FOR EACH ROW BEGIN INSERT INTO _shardlite_changes (tbl, key) \
             VALUES ('it''s', NEW.\"k\"\"ey\"); END"
        );
        assert!(
            upd.1.contains("VALUES ('it''s', OLD.\"k\"\"ey\");"),
            "{}",
            upd.1
        );
        assert!(
            upd.1
                .contains("WHERE NEW.\"k\"\"ey\" IS NOT OLD.\"k\"\"ey\" COLLATE BINARY")
        );
        assert!(del.1.contains("OLD.\"k\"\"ey\""));
    }

    #[test]
    fn keys_from_the_mover_bind_as_they_were_read() {
        assert_eq!(
            stored_key(&serde_json::json!(7)).unwrap(),
            SqlValue::Integer(7)
        );
        assert_eq!(
            stored_key(&serde_json::json!("a")).unwrap(),
            SqlValue::Text("a".into())
        );
        assert_eq!(
            stored_key(&serde_json::json!({"$base64": "AQ=="})).unwrap(),
            SqlValue::Blob(vec![1])
        );
        for bad in [
            serde_json::json!(null),
            serde_json::json!(true),
            serde_json::json!([1]),
            serde_json::json!({"a": 1}),
        ] {
            assert!(stored_key(&bad).is_err(), "{bad}");
        }
    }
}
