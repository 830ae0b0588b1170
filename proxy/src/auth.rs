//! Who may do what: a bearer token for the data API (`/v1/tables`, `/v1/sql`) and a separate one
//! for the admin API (`/v1/cluster`). Each is off when not configured (as in `shardlite dev`).
//! Tokens are compared in constant time, so the answer's timing does not leak a prefix.
//!
//! Nodes are protected by the cluster secret, which the proxy sends on every call to a node
//! (see `UpstreamConfig::bearer`) and nodes check: a client that reaches a node cannot bypass
//! the proxy.

use crate::error::ProxyError;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use shardlite_node::auth::bearer_matches;

/// The tokens the proxy asks of clients.
#[derive(Clone, Debug, Default)]
pub struct AuthConfig {
    /// Required on `/v1/tables/...` and `/v1/sql` when set.
    pub data_token: Option<String>,
    /// Required on `/v1/cluster/...` when set.
    pub admin_token: Option<String>,
}

/// Which token a route needs.
#[derive(Clone, Copy)]
pub enum Scope {
    Data,
    Admin,
}

pub async fn require(
    State((config, scope)): State<(AuthConfig, Scope)>,
    request: Request,
    next: Next,
) -> Response {
    let (expected, what, variable) = match scope {
        Scope::Data => (&config.data_token, "the data API", "SHARDLITE_TOKEN"),
        Scope::Admin => (
            &config.admin_token,
            "the admin API",
            "SHARDLITE_ADMIN_TOKEN",
        ),
    };
    match expected {
        Some(token) if !bearer_matches(request.headers(), token) => ProxyError::Unauthorized(
            format!("{what} needs `Authorization: Bearer <token>` with the proxy's {variable}"),
        )
        .into_response(),
        _ => next.run(request).await,
    }
}
