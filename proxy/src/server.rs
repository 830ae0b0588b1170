//! The proxy server: its configuration, shared state, router and serve loop.

use crate::auth::{self, AuthConfig, Scope};
use crate::cluster::Cluster;
use crate::error::{ProxyError, ProxyResult};
use crate::health::{Health, HealthConfig};
use crate::job::JobSlot;
use crate::rebalance::{self, RebalanceStatus};
use crate::schema::SchemaCache;
use crate::upstream::{Upstream, UpstreamConfig};
use crate::{admin, routing};
use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use shardlite_node::lock::FileLock;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use tokio::net::TcpListener;
use tower_http::trace::{DefaultOnFailure, TraceLayer};

/// Everything the proxy needs to start; `main` builds it from flags, tests build it directly.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// The SQLite file holding membership, epoch, migrations and jobs.
    pub state_path: PathBuf,
    /// `(id, url)` pairs that become the first members when the state file is new.
    pub seed_nodes: Vec<(String, String)>,
    /// Virtual nodes per unit of weight on the ring; fixed when the state file is created.
    pub vnodes: u32,
    /// The largest request body accepted (413 above it).
    pub max_body_bytes: usize,
    /// A pause the rebalance takes after each copy page and inside each phase: a test hook
    /// that makes a job slow enough to kill it at a chosen step. Zero in production.
    pub rebalance_step_pause: std::time::Duration,
    pub upstream: UpstreamConfig,
    pub health: HealthConfig,
    pub auth: AuthConfig,
    pub limits: Limits,
}

/// Sizes the proxy refuses above, each with a clear 4xx (or 503 for load).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Rows in one `POST /v1/tables/{table}/rows`.
    pub max_batch_rows: usize,
    /// Statements in one `statements` list.
    pub max_statements: usize,
    /// Bytes of one SQL text, checked before any node parses it.
    pub max_sql_bytes: usize,
    /// Rows of a keyless read, all shards together (each node also caps its own part).
    pub max_result_rows: usize,
    /// Requests served at once; above it new requests get 503 with `Retry-After`.
    pub max_in_flight: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_batch_rows: 10_000,
            max_statements: 1_000,
            max_sql_bytes: 1_000_000,
            max_result_rows: 100_000,
            max_in_flight: 4_096,
        }
    }
}

impl ProxyConfig {
    pub fn new(state_path: impl Into<PathBuf>) -> ProxyConfig {
        ProxyConfig {
            state_path: state_path.into(),
            seed_nodes: Vec::new(),
            vnodes: shardlite_ring::DEFAULT_VNODES,
            max_body_bytes: 16 * 1024 * 1024,
            rebalance_step_pause: std::time::Duration::ZERO,
            upstream: UpstreamConfig::default(),
            health: HealthConfig::default(),
            auth: AuthConfig::default(),
            limits: Limits::default(),
        }
    }
}

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct ProxyState(Arc<Inner>);

pub(crate) struct Inner {
    config: ProxyConfig,
    cluster: Cluster,
    upstream: Upstream,
    schema: SchemaCache,
    jobs: JobSlot,
    /// The rebalance job as last recorded; read by status endpoints without touching the file.
    rebalance: ArcSwap<RebalanceStatus>,
    health: Health,
    /// This process's lock on the state file (`shardlite_node::lock`): one proxy per state
    /// file. Last, so it is released after the file has closed.
    _lock: FileLock,
}

impl ProxyState {
    /// Opens the state file and builds the client; touches no node.
    pub fn open(config: ProxyConfig) -> ProxyResult<ProxyState> {
        if let Some(dir) = config
            .state_path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                ProxyError::BadRequest(format!(
                    "cannot create the state directory {}: {e}",
                    dir.display()
                ))
            })?;
        }
        let lock = shardlite_node::lock::lock(&config.state_path)?;
        let cluster = Cluster::open(&config.state_path, &config.seed_nodes, config.vnodes)?;
        let upstream = Upstream::new(config.upstream.clone());
        Ok(ProxyState(Arc::new(Inner {
            config,
            cluster,
            upstream,
            schema: SchemaCache::default(),
            jobs: JobSlot::default(),
            rebalance: ArcSwap::from_pointee(RebalanceStatus::idle()),
            health: Health::default(),
            _lock: lock,
        })))
    }

    pub fn config(&self) -> &ProxyConfig {
        &self.0.config
    }

    pub fn cluster(&self) -> &Cluster {
        &self.0.cluster
    }

    pub fn upstream(&self) -> &Upstream {
        &self.0.upstream
    }

    pub fn schema(&self) -> &SchemaCache {
        &self.0.schema
    }

    pub fn jobs(&self) -> &JobSlot {
        &self.0.jobs
    }

    pub fn health(&self) -> &Health {
        &self.0.health
    }

    /// `Ok` unless health checks have marked the node down: then a 503 at once.
    pub fn check_up(&self, node: &crate::cluster::NodeInfo) -> ProxyResult<()> {
        if self.0.health.is_down(&node.id) {
            return Err(ProxyError::ShardUnavailable {
                node: node.id.clone(),
                reason: "it failed its health checks; its keys are unavailable until it answers"
                    .into(),
            });
        }
        Ok(())
    }

    pub(crate) fn downgrade(&self) -> Weak<Inner> {
        Arc::downgrade(&self.0)
    }

    pub(crate) fn upgrade(weak: &Weak<Inner>) -> Option<ProxyState> {
        weak.upgrade().map(ProxyState)
    }

    pub fn rebalance_status(&self) -> Arc<RebalanceStatus> {
        self.0.rebalance.load_full()
    }

    pub fn publish_rebalance(&self, status: RebalanceStatus) {
        self.0.rebalance.store(Arc::new(status));
    }
}

/// The whole HTTP API of the proxy.
pub fn router(state: ProxyState) -> Router {
    let limit = state.config().max_body_bytes;
    let tokens = state.config().auth.clone();
    let max_in_flight = state.config().limits.max_in_flight;
    let in_flight = (
        Arc::new(tokio::sync::Semaphore::new(max_in_flight)),
        max_in_flight,
    );
    let mut data = routing::router();
    let mut admin = admin::router();
    // The token checks cost a boxed service per request: only when a token is set.
    if tokens.data_token.is_some() {
        data = data.layer(axum::middleware::from_fn_with_state(
            (tokens.clone(), Scope::Data),
            auth::require,
        ));
    }
    if tokens.admin_token.is_some() {
        admin = admin.layer(axum::middleware::from_fn_with_state(
            (tokens, Scope::Admin),
            auth::require,
        ));
    }
    Router::new()
        .route("/healthz", get(healthz))
        .merge(data)
        .merge(admin)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(in_flight, shed_load))
        // Failures are logged once, where they become a response (`ProxyError`), not again here.
        .layer(
            TraceLayer::new_for_http()
                .on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)),
        )
        .with_state(state)
}

/// Answers 503 at once when `max_in_flight` requests are already being served, rather than
/// queueing without bound.
async fn shed_load(
    axum::extract::State((in_flight, limit)): axum::extract::State<(
        Arc<tokio::sync::Semaphore>,
        usize,
    )>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match in_flight.try_acquire() {
        Ok(_permit) => next.run(request).await,
        Err(_) => ProxyError::Overloaded(format!(
            "the proxy is serving its limit of {limit} requests at once; retry shortly"
        ))
        .into_response(),
    }
}

async fn healthz() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

async fn not_found(uri: http::Uri) -> ProxyError {
    ProxyError::NotFound(format!("no such endpoint: {}", uri.path()))
}

async fn method_not_allowed(method: http::Method, uri: http::Uri) -> ProxyError {
    ProxyError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
}

/// Serves the proxy on an already-bound listener until `shutdown` completes. A rebalance that
/// a crash cut off resumes first, in the background.
pub async fn serve(
    listener: TcpListener,
    state: ProxyState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Err(e) = rebalance::resume(&state) {
        tracing::error!(error = %e.message(), "cannot resume the recorded rebalance");
    }
    let checker = crate::health::spawn_checker(&state);
    let served = axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await;
    checker.abort();
    served
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test]
    async fn past_the_in_flight_limit_requests_get_503_with_retry_after() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ProxyConfig::new(dir.path().join("state.db"));
        config.limits.max_in_flight = 0;
        let state = ProxyState::open(config).unwrap();
        let response = router(state)
            .oneshot(
                http::Request::get("/healthz")
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[http::header::RETRY_AFTER], "1");
    }

    #[tokio::test]
    async fn unknown_endpoints_and_methods_get_json_errors() {
        let dir = tempfile::tempdir().unwrap();
        let state = ProxyState::open(ProxyConfig::new(dir.path().join("state.db"))).unwrap();
        for (method, path, status) in [
            ("GET", "/nope", 404),
            ("PATCH", "/v1/sql", 405),
            ("DELETE", "/healthz", 405),
        ] {
            let response = router(state.clone())
                .oneshot(
                    http::Request::builder()
                        .method(method)
                        .uri(path)
                        .body(axum::body::Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            assert_eq!(response.status().as_u16(), status, "{method} {path}");
            let body = http_body_util::BodyExt::collect(response.into_body())
                .await
                .unwrap()
                .to_bytes();
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert!(json["error"].is_string(), "{method} {path}: {json}");
        }
    }
}
