//! `NodeError`: everything a node can answer besides success, and its HTTP status.
//!
//! Client errors (4xx) say what was wrong with the request; internal faults (5xx) are logged
//! once, here, where they become a response. Every body is `{"error": "..."}`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use rusqlite::ErrorCode;
use serde_json::json;

pub use crate::guard::Denial;
use crate::key::KeyError;
use crate::value::ValueError;

/// The response header that marks a refusal by a fence (409).
pub const FENCED_HEADER: &str = "x-shardlite-fenced";

/// The message of [`NodeError::StrayWrite`].
fn stray_message(table: &str, key: Option<&str>, keys: &[String]) -> String {
    let row = key.map_or_else(
        || "a row whose key does not route (NULL, REAL or BLOB)".to_owned(),
        |key| format!("the row with key {key:?}"),
    );
    let named: Vec<String> = keys.iter().map(|k| format!("{k:?}")).collect();
    format!(
        "keyed SQL may insert or update rows under its own key ({}) only, and this wrote {row} \
         in table {table:?}: every row lives on the shard its own key routes to, so write that \
         row with its own key",
        named.join(", ")
    )
}

/// Everything that can go wrong in a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The body is not the JSON the endpoint expects (or is too large).
    #[error("{}", .0.body_text())]
    InvalidJson(JsonRejection),
    /// The body could not be read (or is too large).
    #[error("{}", .0.body_text())]
    InvalidBody(BytesRejection),
    /// A path parameter could not be read.
    #[error("{}", .0.body_text())]
    InvalidPath(PathRejection),
    /// The request is well-formed JSON of the wrong shape.
    #[error("{0}")]
    InvalidRequest(String),
    #[error("invalid key: {0}")]
    InvalidKey(#[from] KeyError),
    #[error("invalid value: {0}")]
    InvalidValue(#[from] ValueError),
    #[error("no such endpoint: {method} {path}")]
    UnknownEndpoint { method: String, path: String },
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("unknown table {0:?}")]
    UnknownTable(String),
    #[error("unknown column {column:?} in table {table:?}")]
    UnknownColumn { table: String, column: String },
    #[error("row {key:?} not found in table {table:?}")]
    RowNotFound { table: String, key: String },
    #[error("the key column {column:?} holds {body:?} but the path names key {path:?}")]
    KeyMismatch {
        column: String,
        path: String,
        body: String,
    },
    #[error("row {index} has no key column {column:?}")]
    MissingKey { index: usize, column: String },
    /// The authorizer refused a statement.
    #[error("{0}")]
    NotAllowed(Denial),
    #[error("one statement per sql string: send a \"statements\" list to run several")]
    MultipleStatements,
    /// The node has a cluster secret and the request did not carry it: only the proxy may call.
    #[error("this node only answers its proxy: the request lacks the cluster secret")]
    Unauthorized,
    /// The call names another node than this one (see `identity`).
    #[error(
        "this is node {this}, not {asked}: the proxy has {asked} at {this}'s address (a node \
         keeps the id it was first added as; compare `shardlite nodes list` with where each node \
         runs)"
    )]
    WrongNode { this: String, asked: String },
    #[error("result too large: {0}")]
    ResultTooLarge(String),
    #[error("statement timed out after {0:?}")]
    StatementTimeout(Duration),
    #[error("{0}")]
    MigrationConflict(String),
    /// Keyed SQL inserted or updated a row under another key (see `written`).
    #[error("{}", stray_message(.table, .key.as_deref(), .keys))]
    StrayWrite {
        table: String,
        key: Option<String>,
        keys: Vec<String>,
    },
    /// A client write touched a key in a fenced range (a rebalance is moving it).
    #[error(
        "key {0} is in a range that is moving to another node (rebalance in progress); retry shortly"
    )]
    Fenced(String),
    /// Two sharded tables would get capture triggers of the same name (a table named like
    /// another's hex escape, `x3d` beside `=`).
    #[error(
        "cannot capture changes: tables {first:?} and {second:?} would share the capture \
         trigger name {trigger:?}; rename one of them"
    )]
    CaptureNameClash {
        first: String,
        second: String,
        trigger: String,
    },
    #[error("{0}")]
    InvalidMigration(String),
    #[error("migration {version} ({name}) failed: {message}")]
    MigrationFailed {
        version: i64,
        name: String,
        message: String,
    },
    /// Client SQL failed in SQLite: mostly the client's fault (syntax, constraint).
    #[error("{0}")]
    Sql(rusqlite::Error),
    /// The node's own SQL failed. Constraint violations and oversized values still come from
    /// the client's data; anything else is the node's fault.
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot open database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("database {path} stayed in journal mode {mode:?}; shardlite needs WAL")]
    NotWal { path: PathBuf, mode: String },
    #[error("no database connection: {0}")]
    Pool(#[from] r2d2::Error),
    /// The transaction that carried this write, together with the others queued beside it,
    /// could not begin or commit. Shared: every write of the group gets the same error.
    #[error("the transaction carrying this write failed: {0}")]
    GroupTransaction(Arc<rusqlite::Error>),
    #[error("cannot start the writer thread: {0}")]
    WriterThread(std::io::Error),
    /// Another process serves the file, or its lock file cannot be made ([`crate::lock`]).
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
    #[error("cannot sync the write-ahead log: {0}")]
    WalSync(std::io::Error),
    /// The writer thread is gone, so no write can be queued: the node is stopping.
    #[error("the node is shutting down and accepts no more writes")]
    WriterStopped,
    /// The writer thread failed (panicked) while running this write, rolled it back and went
    /// on; the node's log has the cause.
    #[error("the node failed while running this write and rolled it back; see the node's log")]
    WriteAbandoned,
    #[error("a database task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl NodeError {
    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            NodeError::InvalidJson(rejection) => match rejection.status() {
                StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
                _ => StatusCode::BAD_REQUEST,
            },
            NodeError::InvalidBody(rejection) => match rejection.status() {
                StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
                _ => StatusCode::BAD_REQUEST,
            },
            NodeError::InvalidPath(_)
            | NodeError::InvalidRequest(_)
            | NodeError::StrayWrite { .. }
            | NodeError::InvalidKey(_)
            | NodeError::InvalidValue(_)
            | NodeError::UnknownColumn { .. }
            | NodeError::KeyMismatch { .. }
            | NodeError::MissingKey { .. }
            | NodeError::NotAllowed(_)
            | NodeError::MultipleStatements
            | NodeError::ResultTooLarge(_)
            | NodeError::InvalidMigration(_)
            | NodeError::MigrationFailed { .. } => StatusCode::BAD_REQUEST,
            NodeError::UnknownEndpoint { .. }
            | NodeError::UnknownTable(_)
            | NodeError::RowNotFound { .. } => StatusCode::NOT_FOUND,
            NodeError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            NodeError::Unauthorized => StatusCode::UNAUTHORIZED,
            NodeError::WrongNode { .. } => StatusCode::MISDIRECTED_REQUEST,
            NodeError::MigrationConflict(_)
            | NodeError::Fenced(_)
            | NodeError::CaptureNameClash { .. } => StatusCode::CONFLICT,
            NodeError::StatementTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            NodeError::Sql(e) => sqlite_status(e, true),
            NodeError::Sqlite(e) => sqlite_status(e, false),
            NodeError::GroupTransaction(e) => sqlite_status(e, false),
            NodeError::WriterStopped => StatusCode::SERVICE_UNAVAILABLE,
            NodeError::Open { .. }
            | NodeError::WriterThread(_)
            | NodeError::Lock(_)
            | NodeError::WalSync(_)
            | NodeError::WriteAbandoned
            | NodeError::NotWal { .. }
            | NodeError::Pool(_)
            | NodeError::Task(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// The status for a SQLite error; `client_sql` when the statement's text came from the client.
fn sqlite_status(e: &rusqlite::Error, client_sql: bool) -> StatusCode {
    match e.sqlite_error_code() {
        Some(ErrorCode::ConstraintViolation) => StatusCode::CONFLICT,
        Some(
            ErrorCode::TooBig
            | ErrorCode::TypeMismatch
            | ErrorCode::ParameterOutOfRange
            | ErrorCode::AuthorizationForStatementDenied
            | ErrorCode::ReadOnly,
        ) => StatusCode::BAD_REQUEST,
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        Some(ErrorCode::OperationInterrupted) => StatusCode::GATEWAY_TIMEOUT,
        // SQLITE_ERROR: syntax, no such table or column, too many terms...
        Some(ErrorCode::Unknown) if client_sql => StatusCode::BAD_REQUEST,
        // rusqlite's own checks (parameter count, conversions) on client SQL.
        None if client_sql => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for NodeError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = self.to_string();
        if status.is_server_error() {
            tracing::error!(status = status.as_u16(), error = %message, "request failed");
        } else {
            tracing::debug!(status = status.as_u16(), error = %message, "request refused");
        }
        match self {
            // The proxy tells a fence from other conflicts by the header, without parsing.
            NodeError::Fenced(_) => (
                status,
                [(FENCED_HEADER, "1")],
                Json(json!({ "error": message, "fenced": true })),
            )
                .into_response(),
            _ => (status, Json(json!({ "error": message }))).into_response(),
        }
    }
}

impl From<JsonRejection> for NodeError {
    fn from(rejection: JsonRejection) -> Self {
        NodeError::InvalidJson(rejection)
    }
}

impl From<PathRejection> for NodeError {
    fn from(rejection: PathRejection) -> Self {
        NodeError::InvalidPath(rejection)
    }
}
