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
use http::header::AUTHORIZATION;
use subtle::ConstantTimeEq;

/// The tokens the proxy asks of clients.
#[derive(Clone, Debug, Default)]
pub struct AuthConfig {
    /// Required on `/v1/tables/...` and `/v1/sql` when set.
    pub data_token: Option<String>,
    /// Required on `/v1/cluster/...` when set.
    pub admin_token: Option<String>,
}

/// Whether the request carries `Authorization: Bearer <expected>`.
pub fn bearer_matches(request: &http::HeaderMap, expected: &str) -> bool {
    let Some(given) = request
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    given.as_bytes().ct_eq(expected.as_bytes()).into()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_matches() {
        let mut headers = http::HeaderMap::new();
        assert!(!bearer_matches(&headers, "s3cret"));
        headers.insert(AUTHORIZATION, "Bearer s3cret".parse().unwrap());
        assert!(bearer_matches(&headers, "s3cret"));
        for wrong in [
            "Bearer s3cre",
            "Bearer s3cret2",
            "bearer s3cret",
            "s3cret",
            "Basic s3cret",
        ] {
            headers.insert(AUTHORIZATION, wrong.parse().unwrap());
            assert!(!bearer_matches(&headers, "s3cret"), "{wrong}");
        }
    }
}
