//! Client SQL: `POST /v1/sql`.
//!
//! Keyed SQL runs on the writer thread, in a savepoint of a group transaction (see `writer`:
//! `BEGIN IMMEDIATE`, per request the fence checks and its statements, one `COMMIT`); keyless
//! SQL (`readonly: true`) on a read-only connection. Either way client text is prepared and
//! stepped inside a guard `Scope` that makes the authorizer judge it as client SQL and arms the
//! statement deadline, and it is never `prepare_cached`: the authorizer decides at prepare
//! time, and a cached statement would keep an old decision.

use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::db::rollback;
use crate::error::{Denial, NodeError};
use crate::guard::{self, Mode, Scope};
use crate::value::{json_size, json_to_sql, sql_to_json};

/// `POST /v1/sql` body: one `sql` string or a `statements` list.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct SqlRequest {
    #[serde(default)]
    pub sql: Option<String>,
    #[serde(default)]
    pub params: Option<Vec<Value>>,
    #[serde(default)]
    pub statements: Option<Vec<SqlStatement>>,
    /// Run on a read-only connection; the proxy sets it for keyless SQL.
    #[serde(default)]
    pub readonly: bool,
    /// The routing text of the key the proxy routed a keyed request by. A write is refused
    /// (409) if it is fenced; reads ignore it.
    #[serde(default)]
    pub key: Option<String>,
}

/// One statement of a `statements` list.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct SqlStatement {
    pub sql: String,
    /// Absent and `null` both mean no parameters.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub params: Vec<Value>,
}

fn null_as_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Value>, D::Error> {
    Ok(Option::<Vec<Value>>::deserialize(d)?.unwrap_or_default())
}

/// `POST /v1/sql` answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SqlResponse {
    pub results: Vec<StatementResult>,
}

/// What one statement returned.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct StatementResult {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
    pub rows_affected: u64,
    pub last_insert_id: i64,
}

impl SqlRequest {
    /// The statements to run, in order.
    pub(crate) fn into_statements(self) -> Result<Vec<SqlStatement>, NodeError> {
        match (self.sql, self.statements, self.params) {
            (Some(sql), None, params) => Ok(vec![SqlStatement {
                sql,
                params: params.unwrap_or_default(),
            }]),
            (None, Some(_), Some(_)) => Err(NodeError::InvalidRequest(
                "with \"statements\", \"params\" goes inside each statement".into(),
            )),
            (None, Some(statements), None) if statements.is_empty() => Err(
                NodeError::InvalidRequest("\"statements\" must hold at least one statement".into()),
            ),
            (None, Some(statements), None) => Ok(statements),
            (Some(_), Some(_), _) => Err(NodeError::InvalidRequest(
                "send either \"sql\" or \"statements\", not both".into(),
            )),
            (None, None, _) => Err(NodeError::InvalidRequest(
                "send \"sql\" (one statement) or \"statements\" (a list)".into(),
            )),
        }
    }
}

/// Caps on one request's work and answer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) timeout: Duration,
    pub(crate) max_rows: usize,
    pub(crate) max_bytes: usize,
}

/// Runs keyless client statements on a reader, writes refused; a list reads one snapshot.
pub(crate) fn read(
    conn: &Connection,
    statements: &[SqlStatement],
    limits: Limits,
) -> Result<Vec<StatementResult>, NodeError> {
    // A single read needs no transaction of its own.
    let transaction = statements.len() > 1;
    if transaction {
        conn.execute_batch("BEGIN")?;
    }
    let results = match run_all(conn, statements, Mode::ClientReadOnly, limits) {
        Ok(results) => results,
        Err(e) => {
            rollback(conn);
            return Err(e);
        }
    };
    if transaction {
        if let Err(e) = conn.execute_batch("COMMIT") {
            rollback(conn);
            return Err(client_error(e, limits.timeout));
        }
    }
    Ok(results)
}

/// Runs keyed client statements on the writer, inside the caller's savepoint. The deadline
/// starts now, so a request's time in the queue does not count against it.
pub(crate) fn write(
    conn: &Connection,
    statements: &[SqlStatement],
    limits: Limits,
) -> Result<Vec<StatementResult>, NodeError> {
    run_all(conn, statements, Mode::Client, limits)
}

fn run_all(
    conn: &Connection,
    statements: &[SqlStatement],
    mode: Mode,
    limits: Limits,
) -> Result<Vec<StatementResult>, NodeError> {
    let deadline = Instant::now() + limits.timeout;
    let mut budget = Budget {
        rows: 0,
        bytes: 0,
        limits,
    };
    statements
        .iter()
        .map(|statement| run_one(conn, statement, mode, deadline, &mut budget))
        .collect()
}

/// Counts what an answer has grown to.
struct Budget {
    rows: usize,
    bytes: usize,
    limits: Limits,
}

impl Budget {
    fn add_row(&mut self, bytes: usize) -> Result<(), NodeError> {
        self.rows += 1;
        self.bytes += bytes;
        if self.rows > self.limits.max_rows {
            return Err(NodeError::ResultTooLarge(format!(
                "more than {} rows; add a LIMIT or page with a WHERE clause",
                self.limits.max_rows
            )));
        }
        if self.bytes > self.limits.max_bytes {
            return Err(NodeError::ResultTooLarge(format!(
                "more than {} bytes; select fewer columns or rows",
                self.limits.max_bytes
            )));
        }
        Ok(())
    }
}

fn run_one(
    conn: &Connection,
    statement: &SqlStatement,
    mode: Mode,
    deadline: Instant,
    budget: &mut Budget,
) -> Result<StatementResult, NodeError> {
    let timeout = budget.limits.timeout;
    // Prepare *and* step under the scope: SQLite re-prepares (and re-authorizes) a statement
    // while stepping if the schema changed underneath it.
    let _scope = Scope::enter(mode, Some(deadline));
    // SQLite stops reading at a NUL byte: what follows would be silently ignored.
    if statement.sql.contains('\0') {
        return Err(NodeError::InvalidRequest(
            "the SQL text contains a NUL byte".into(),
        ));
    }
    // `prepare` (never `prepare_cached`) also prepares the tail and fails if it holds a
    // second statement; trailing `;`, spaces and comments are fine.
    let mut stmt = conn
        .prepare(&statement.sql)
        .map_err(|e| client_error(e, timeout))?;
    // Blank text, a lone `;` or only a comment prepares to no statement at all (found by the
    // fuzzer: stepping it was SQLITE_MISUSE, a 500).
    if stmt.expanded_sql().is_none() {
        return Err(NodeError::InvalidRequest(
            "the SQL text holds no statement".into(),
        ));
    }
    let expected = stmt.parameter_count();
    if expected != statement.params.len() {
        return Err(NodeError::InvalidRequest(format!(
            "the statement has {expected} parameter(s) but {} were sent",
            statement.params.len()
        )));
    }
    for (i, param) in statement.params.iter().enumerate() {
        stmt.raw_bind_parameter(i + 1, json_to_sql(param)?)
            .map_err(|e| client_error(e, timeout))?;
    }
    let writes = !stmt.readonly();
    // SQLite keeps the connection's last inserted rowid until the next insert, and the writer
    // connection serves every client: reported as is, an UPDATE would show the rowid of some
    // earlier client's INSERT. So only a value this statement changed is reported. (Resetting
    // it needs `sqlite3_set_last_insert_rowid`, which rusqlite offers only unsafely.)
    let rowid_before = conn.last_insert_rowid();
    let mut rows = Vec::new();
    {
        let mut cursor = stmt.raw_query();
        while let Some(row) = cursor.next().map_err(|e| client_error(e, timeout))? {
            // Counted per row: a step may re-prepare the statement after a schema change.
            let width = row.as_ref().column_count();
            let mut values = Vec::with_capacity(width);
            let mut bytes = 0;
            for i in 0..width {
                let value = row.get_ref(i)?;
                bytes += json_size(value);
                values.push(sql_to_json(value));
            }
            budget.add_row(bytes)?;
            rows.push(values);
        }
    }
    // Read after stepping, for the same reason.
    let columns: Vec<String> = stmt.column_names().into_iter().map(String::from).collect();
    Ok(StatementResult {
        columns,
        rows,
        // `changes()` keeps the count of the last write, so a read must not report it.
        rows_affected: if writes { conn.changes() } else { 0 },
        last_insert_id: match conn.last_insert_rowid() {
            rowid if writes && rowid != rowid_before => rowid,
            _ => 0,
        },
    })
}

/// What a SQLite error on client SQL means for the client.
fn client_error(e: rusqlite::Error, timeout: Duration) -> NodeError {
    if matches!(e, rusqlite::Error::MultipleStatement) {
        return NodeError::MultipleStatements;
    }
    match e.sqlite_error_code() {
        Some(ErrorCode::AuthorizationForStatementDenied) => match guard::take_denial() {
            Some(denial) => NodeError::NotAllowed(denial),
            None => NodeError::Sql(e),
        },
        Some(ErrorCode::OperationInterrupted) => NodeError::StatementTimeout(timeout),
        // The authorizer refuses writes on the read-only path first; this is the backstop.
        Some(ErrorCode::ReadOnly) => NodeError::NotAllowed(Denial::WriteNeedsKey),
        _ => NodeError::Sql(e),
    }
}
