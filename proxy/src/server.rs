//! The proxy server: its configuration, shared state, router and serve loop.

use crate::cluster::Cluster;
use crate::error::{ProxyError, ProxyResult};
use crate::job::JobSlot;
use crate::schema::SchemaCache;
use crate::upstream::{Upstream, UpstreamConfig};
use crate::{admin, routing};
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::TcpListener;
use tower_http::trace::TraceLayer;

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
    pub upstream: UpstreamConfig,
}

impl ProxyConfig {
    pub fn new(state_path: impl Into<PathBuf>) -> ProxyConfig {
        ProxyConfig {
            state_path: state_path.into(),
            seed_nodes: Vec::new(),
            vnodes: shardlite_ring::DEFAULT_VNODES,
            max_body_bytes: 16 * 1024 * 1024,
            upstream: UpstreamConfig::default(),
        }
    }
}

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct ProxyState(Arc<Inner>);

struct Inner {
    config: ProxyConfig,
    cluster: Cluster,
    upstream: Upstream,
    schema: SchemaCache,
    jobs: JobSlot,
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
        let cluster = Cluster::open(&config.state_path, &config.seed_nodes, config.vnodes)?;
        let upstream = Upstream::new(config.upstream.clone());
        Ok(ProxyState(Arc::new(Inner {
            config,
            cluster,
            upstream,
            schema: SchemaCache::default(),
            jobs: JobSlot::default(),
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
}

/// The whole HTTP API of the proxy.
pub fn router(state: ProxyState) -> Router {
    let limit = state.config().max_body_bytes;
    Router::new()
        .route("/healthz", get(healthz))
        .merge(routing::router())
        .merge(admin::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
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

/// Serves the proxy on an already-bound listener until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    state: ProxyState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
