//! Client SQL: `POST /v1/sql`.
//!
//! Keyed SQL runs on the writer thread, in a savepoint of a group transaction (see `writer`:
//! `BEGIN IMMEDIATE`, per request the fence checks and its statements, one `COMMIT`); keyless
//! SQL (`readonly: true`) on a read-only connection. Either way client text is prepared and
//! stepped inside a guard `Scope` that makes the authorizer judge it as client SQL and arms the
//! statement deadline, and it is never `prepare_cached`: the authorizer decides at prepare
//! time, and a cached statement would keep an old decision.

use std::time::{Duration, Instant};

use rusqlite::functions::FunctionFlags;
use rusqlite::{Connection, ErrorCode};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::db::rollback;
use crate::error::{Denial, NodeError};
use crate::fence::Ranges;
use crate::guard::{self, Mode, Narrowed, Scope};
use crate::schema::{Schema, quote};
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
    /// For a keyless read while ownership is moving: the hash ranges (`[start, end]`) this
    /// node owns. Each table then shows only its rows whose key lies in them, so that a row
    /// that also sits on another node (copied ahead of a switch, or not yet cleaned up after
    /// one) is read once across the cluster. Only with `readonly`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owned: Option<Vec<(u32, u32)>>,
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
    if transaction && let Err(e) = conn.execute_batch("COMMIT") {
        rollback(conn);
        return Err(client_error(e, limits.timeout));
    }
    Ok(results)
}

/// The SQL function the views of [`read_owned`] filter with; internal to one request.
const OWNED_FUNCTION: &str = "shardlite_owned";

/// [`read`], with every table narrowed to the rows whose key lies in `owned`.
///
/// For the duration of the request the reader gets, per table, a TEMP VIEW of the table's name
/// over `main.<table>` filtered by a function of `owned`. An unqualified name finds the TEMP
/// one first, so client SQL (joins, aggregates, subqueries) sees only owned rows; a name
/// qualified as `main.` would reach the whole table, so the authorizer refuses it for this
/// request (400 with the reason). The views and the function are gone before the connection
/// goes back to the pool (one that still held a view would not be reused).
pub(crate) fn read_owned(
    conn: &Connection,
    schema: &Schema,
    owned: Ranges,
    statements: &[SqlStatement],
    limits: Limits,
) -> Result<Vec<StatementResult>, NodeError> {
    conn.create_scalar_function(
        OWNED_FUNCTION,
        1,
        // Views may use only innocuous functions while the schema is untrusted.
        FunctionFlags::SQLITE_UTF8
            | FunctionFlags::SQLITE_DETERMINISTIC
            | FunctionFlags::SQLITE_INNOCUOUS,
        move |ctx| Ok(owned.contains_key(ctx.get_raw(0))),
    )?;
    let mut views = Views {
        conn,
        names: Vec::new(),
    };
    {
        let _internal = Scope::enter(Mode::Internal, None);
        for table in schema.tables() {
            let (name, key) = (quote(&table.name), quote(&table.key));
            conn.execute_batch(&format!(
                "CREATE TEMP VIEW {name} AS SELECT * FROM main.{name} WHERE {OWNED_FUNCTION}({key})"
            ))?;
            views.names.push(name);
        }
    }
    let _narrowed = Narrowed::enter(schema.tables().map(|t| t.name.clone()).collect());
    read(conn, statements, limits)
}

/// The TEMP views of [`read_owned`]; dropped with the function when the read is over.
struct Views<'c> {
    conn: &'c Connection,
    names: Vec<String>,
}

impl Drop for Views<'_> {
    fn drop(&mut self) {
        let _internal = Scope::enter(Mode::Internal, None);
        for name in &self.names {
            if let Err(e) = self.conn.execute_batch(&format!("DROP VIEW temp.{name}")) {
                // The pool checks for TEMP objects and closes such a connection.
                tracing::warn!(error = %e, view = %name, "could not drop a filtering view");
            }
        }
        if let Err(e) = self.conn.remove_function(OWNED_FUNCTION, 1) {
            tracing::warn!(error = %e, "could not remove the filtering function");
        }
    }
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
