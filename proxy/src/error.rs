//! The proxy's one error type and how each variant becomes an HTTP answer.
//!
//! Variants say who caused the failure, as pingora-error does: the client (4xx), a node
//! (503 down, 504 too slow, or the node's own answer passed on), or the proxy's own state file
//! (500). Every answer has the body `{"error": "..."}`.

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request is malformed or breaks a rule; nothing was changed.
    #[error("{0}")]
    BadRequest(String),
    /// The table does not exist on the cluster's shards; `hint` names the ones that do.
    #[error("unknown table \"{table}\": {hint}")]
    UnknownTable { table: String, hint: String },
    /// The request lacks the token its API needs.
    #[error("{0}")]
    Unauthorized(String),
    /// No such endpoint or row.
    #[error("{0}")]
    NotFound(String),
    /// The method is not one this endpoint takes.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The request conflicts with the cluster's current state (a job runs, a node exists, ...).
    #[error("{0}")]
    Conflict(String),
    /// The request body is larger than the proxy accepts.
    #[error("request body too large: the limit is {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// The node that owns the data did not accept a connection.
    #[error("node {node} is unavailable: {reason}")]
    ShardUnavailable { node: String, reason: String },
    /// The call broke off after the request went out (the connection closed, or the answer
    /// stopped half-way): the node may or may not have applied it.
    #[error("node {node} is unavailable: {reason} (a write may have been applied there)")]
    ShardBrokeOff { node: String, reason: String },
    /// The node that owns the data did not answer in time.
    #[error("node {node} did not answer within {}ms", after.as_millis())]
    ShardTimeout { node: String, after: Duration },
    /// A node answered with an error; its status and body are passed on unchanged.
    #[error("node {node} answered {status}")]
    Node {
        node: String,
        status: StatusCode,
        body: Bytes,
    },
    /// A node answered 200 with a body the proxy cannot read: a version mismatch or a bug.
    #[error("node {node} sent an answer the proxy cannot read: {reason}")]
    BadNodeAnswer { node: String, reason: String },
    /// The proxy is at its limit of requests in flight.
    #[error("{0}")]
    Overloaded(String),
    /// The cluster has no node that could serve the request.
    #[error("the cluster has no nodes: add one with `shardlite nodes add ID URL`")]
    NoNodes,
    /// The proxy's own state file failed.
    #[error("state file: {0}")]
    State(#[from] rusqlite::Error),
    /// The proxy itself failed: a task of its own panicked (a bug).
    #[error("internal error: {0}")]
    Internal(String),
    /// Another process serves the state file, or its lock file cannot be made.
    #[error(transparent)]
    StateLock(#[from] shardlite_node::lock::LockError),
}

pub type ProxyResult<T> = Result<T, ProxyError>;

impl ProxyError {
    /// Whether the node may have applied the request although the call failed: the call broke
    /// off after the request went out, it timed out, or the node's success answer could not be
    /// read. Every other error means the node did nothing.
    pub fn in_doubt(&self) -> bool {
        matches!(
            self,
            ProxyError::ShardBrokeOff { .. }
                | ProxyError::ShardTimeout { .. }
                | ProxyError::BadNodeAnswer { .. }
        )
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::UnknownTable { .. } | ProxyError::NotFound(_) => StatusCode::NOT_FOUND,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ProxyError::Conflict(_) => StatusCode::CONFLICT,
            ProxyError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::ShardUnavailable { .. }
            | ProxyError::ShardBrokeOff { .. }
            | ProxyError::NoNodes
            | ProxyError::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::ShardTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Node { status, .. } => *status,
            ProxyError::BadNodeAnswer { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::State(_) | ProxyError::StateLock(_) | ProxyError::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// A copy for each request of a shared node exchange that failed as a whole. Every error
    /// such an exchange can end in is copied as it is; the state-file errors, which it cannot
    /// end in, become a 500 with the same text.
    pub fn for_each_caller(&self) -> ProxyError {
        match self {
            ProxyError::BadRequest(m) => ProxyError::BadRequest(m.clone()),
            ProxyError::UnknownTable { table, hint } => ProxyError::UnknownTable {
                table: table.clone(),
                hint: hint.clone(),
            },
            ProxyError::Unauthorized(m) => ProxyError::Unauthorized(m.clone()),
            ProxyError::NotFound(m) => ProxyError::NotFound(m.clone()),
            ProxyError::MethodNotAllowed(m) => ProxyError::MethodNotAllowed(m.clone()),
            ProxyError::Conflict(m) => ProxyError::Conflict(m.clone()),
            ProxyError::PayloadTooLarge { limit } => ProxyError::PayloadTooLarge { limit: *limit },
            ProxyError::ShardUnavailable { node, reason } => ProxyError::ShardUnavailable {
                node: node.clone(),
                reason: reason.clone(),
            },
            ProxyError::ShardBrokeOff { node, reason } => ProxyError::ShardBrokeOff {
                node: node.clone(),
                reason: reason.clone(),
            },
            ProxyError::ShardTimeout { node, after } => ProxyError::ShardTimeout {
                node: node.clone(),
                after: *after,
            },
            ProxyError::Node { node, status, body } => ProxyError::Node {
                node: node.clone(),
                status: *status,
                body: body.clone(),
            },
            ProxyError::BadNodeAnswer { node, reason } => ProxyError::BadNodeAnswer {
                node: node.clone(),
                reason: reason.clone(),
            },
            ProxyError::Overloaded(m) => ProxyError::Overloaded(m.clone()),
            ProxyError::NoNodes => ProxyError::NoNodes,
            ProxyError::Internal(m) => ProxyError::Internal(m.clone()),
            ProxyError::State(e) => state_error(e.to_string()),
            ProxyError::StateLock(e) => state_error(e.to_string()),
        }
    }

    /// The message a client sees; a node's own error message is unwrapped from its body.
    pub fn message(&self) -> String {
        match self {
            ProxyError::Node { node, body, .. } => node_error_message(node, body),
            other => other.to_string(),
        }
    }
}

/// The `error` text of a node's answer, or a description of it if it is not the usual shape.
pub fn node_error_message(node: &str, body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        .unwrap_or_else(|| {
            format!(
                "node {node} failed: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            )
        })
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), error = %self.message(), "request failed");
        }
        let retry = matches!(
            self,
            ProxyError::ShardUnavailable { .. }
                | ProxyError::ShardBrokeOff { .. }
                | ProxyError::NoNodes
                | ProxyError::Overloaded(_)
        );
        let challenge = matches!(self, ProxyError::Unauthorized(_));
        let mut response = (status, error_body(&self.message())).into_response();
        if challenge {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if retry {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

pub fn error_body(message: &str) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "error": message }))
}

impl From<PathRejection> for ProxyError {
    fn from(rejection: PathRejection) -> Self {
        ProxyError::BadRequest(format!("invalid path: {}", rejection.body_text()))
    }
}

impl From<QueryRejection> for ProxyError {
    fn from(rejection: QueryRejection) -> Self {
        ProxyError::BadRequest(format!("invalid query string: {}", rejection.body_text()))
    }
}

/// A state-file error with the text `message`, for a copy of an error that has no `Clone`.
fn state_error(message: String) -> ProxyError {
    ProxyError::State(rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
        Some(message),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_down_node_answers_503_with_retry_after_and_a_json_body() {
        let response = ProxyError::ShardUnavailable {
            node: "n2".into(),
            reason: "down".into(),
        }
        .into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        let response = ProxyError::Unauthorized("token".into()).into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
        assert!(
            ProxyError::BadRequest("x".into())
                .into_response()
                .headers()
                .get(header::RETRY_AFTER)
                .is_none()
        );
    }
}
