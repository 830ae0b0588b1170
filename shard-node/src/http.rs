//! The HTTP face of a node: handlers, the router and `serve`.
//!
//! Handlers only read the request, find the table in the cached schema, and hand the work on:
//! client writes to the writer thread through `NodeState::client_write` (grouped with the
//! writes queued beside them, fence-checked, answered after their commit), reads to a blocking
//! thread through `NodeState::read`. Every error,
//! including a body axum cannot parse, comes back as `{"error": "..."}`. The rebalance
//! endpoints (`/v1/transfer/*`) are in [`transfer`].

use std::future::Future;

use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{Method, Uri};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tower_http::trace::{DefaultOnFailure, TraceLayer};

use crate::error::NodeError;
use crate::key::ShardKey;
use crate::migrate::{self, MigrateRequest, MigrateResponse, MigrationsResponse};
use crate::rows::{
    self, DEFAULT_KEYS_LIMIT, DeleteRowResponse, KeysRequest, KeysResponse, MAX_KEYS_LIMIT,
    PutRowResponse, UpsertRowsRequest, UpsertRowsResponse,
};
use crate::schema::SchemaResponse;
use crate::sql::{self, Limits, SqlRequest, SqlResponse};
use crate::state::NodeState;
use crate::stats::{self, StatsResponse};
use crate::written;

/// Every endpoint of `docs/node-api.md`, with request tracing and the body size limit.
pub fn router(state: NodeState) -> Router {
    let max_body = state.config().max_body_bytes;
    let secret = state.config().cluster_secret.clone();
    // The row endpoints alone, for the operations of a `POST /v1/ops`.
    let row_ops = Router::new()
        .route(
            "/v1/tables/{table}/rows/{key}",
            put(put_row).get(get_row).delete(delete_row),
        )
        .fallback(unknown_endpoint)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state.clone());
    let api = Router::new()
        .route("/v1/schema", get(schema))
        .route(
            "/v1/tables/{table}/rows/{key}",
            put(put_row).get(get_row).delete(delete_row),
        )
        .route("/v1/tables/{table}/rows", post(upsert_rows))
        .route(
            crate::ops::OPS_PATH,
            post(move |State(state): State<NodeState>, body| {
                ops::run(state, row_ops.clone(), body)
            }),
        )
        .route("/v1/sql", post(run_sql))
        .route("/v1/identity", axum::routing::delete(release_identity))
        .route("/v1/keys", post(keys))
        .route(
            "/v1/migrations",
            get(list_migrations).post(apply_migrations),
        )
        .merge(transfer::routes())
        // The secret is checked first (the outer layer), so only the proxy can claim the node.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            |state, request, next| check_node(state, request, next, true),
        ))
        .layer(axum::middleware::from_fn_with_state(
            secret.clone(),
            require_secret,
        ));
    // Behind the secret, but read-only: it checks a named node and never claims, so a proxy
    // can look at a node (`nodes add` asks whether it is empty) before taking it.
    let look = Router::new()
        .route("/v1/stats", get(stats))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            |state, request, next| check_node(state, request, next, false),
        ))
        .layer(axum::middleware::from_fn_with_state(secret, require_secret));
    // Open to all, so it never claims; a proxy's health check still learns of a mix-up.
    let health = Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/identity", get(identity))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            |state, request, next| check_node(state, request, next, false),
        ));
    Router::new()
        .merge(health)
        .merge(look)
        .merge(api)
        .fallback(unknown_endpoint)
        .method_not_allowed_fallback(method_not_allowed)
        // The JSON extractor enforces it, so an oversized body is a 413 with a JSON body.
        .layer(DefaultBodyLimit::max(max_body))
        // Failures are logged once, where they become a response, not again here.
        .layer(
            TraceLayer::new_for_http()
                .on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)),
        )
        .with_state(state)
}

/// Refuses a request without the cluster secret (when the node has one), in constant time.
async fn require_secret(
    State(secret): State<Option<String>>,
    request: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if let Some(secret) = secret
        && !crate::auth::bearer_matches(request.headers(), &secret)
    {
        return NodeError::Unauthorized.into_response();
    }
    next.run(request).await
}

/// Refuses (421) a call that names another node than this one (`x-shardlite-node`); a call
/// naming a node that was never claimed claims it, if `claim`. See `identity`. A call for
/// this node, the common case, passes without allocating.
async fn check_node(
    State(state): State<NodeState>,
    request: Request,
    next: axum::middleware::Next,
    claim: bool,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let asked = match request
        .headers()
        .get(crate::identity::NODE_HEADER)
        .map(|v| v.to_str())
    {
        None => return next.run(request).await,
        Some(Ok(id)) if !id.is_empty() => id,
        Some(_) => {
            return NodeError::InvalidRequest(format!(
                "{} must name a node id",
                crate::identity::NODE_HEADER
            ))
            .into_response();
        }
    };
    match state.claimed_as(asked) {
        Some(true) => {}
        None if !claim => {}
        Some(false) => {
            let this = state.identity().unwrap_or_default();
            return NodeError::WrongNode {
                this,
                asked: asked.to_owned(),
            }
            .into_response();
        }
        None => {
            let asked = asked.to_owned();
            match state.claim_identity(asked.clone()).await {
                Ok(this) if this == asked => {}
                Ok(this) => return NodeError::WrongNode { this, asked }.into_response(),
                Err(e) => return e.into_response(),
            }
        }
    }
    next.run(request).await
}

/// `GET /v1/identity`: which node this is (`null` if never claimed). It never claims: the
/// proxy asks it before it trusts a new address for a node.
async fn identity(State(state): State<NodeState>) -> Json<Value> {
    Json(serde_json::json!({ "node": state.identity() }))
}

/// `DELETE /v1/identity`: the node left the cluster; it forgets which member it was.
async fn release_identity(State(state): State<NodeState>) -> Result<Json<Value>, NodeError> {
    let released = state.release_identity().await?;
    Ok(Json(serde_json::json!({ "released": released })))
}

/// Serves `state` on an already-bound listener until `shutdown` completes, then lets
/// requests in flight finish.
pub async fn serve(
    listener: TcpListener,
    state: NodeState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "node listening");
    }
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// `axum::Json`, with its rejection turned into a `NodeError` so bad JSON gets our error body.
struct JsonBody<T>(T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = NodeError;

    async fn from_request(req: Request, state: &S) -> Result<Self, NodeError> {
        let JsonBytes(bytes, _) = JsonBytes::<T>::from_request(req, state).await?;
        // serde_json directly: axum's extractor tracks the path of every value it reads (for
        // its error message), which cost more than the parse itself on a batch of rows. Only
        // a body that fails is read again by axum, for that message.
        match serde_json::from_slice(&bytes) {
            Ok(value) => Ok(JsonBody(value)),
            Err(_) => Err(json_rejection::<T>(&bytes)),
        }
    }
}

/// The bytes of a body labelled as JSON (and within the size limit), not parsed yet. `T` is
/// what the body should hold: a body that is not labelled as JSON gets axum's rejection for it.
struct JsonBytes<T>(axum::body::Bytes, std::marker::PhantomData<T>);

impl<S, T> FromRequest<S> for JsonBytes<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = NodeError;

    async fn from_request(req: Request, state: &S) -> Result<Self, NodeError> {
        if !json_content_type(req.headers()) {
            // axum's own extractor answers with the usual rejection.
            let _accepted: Json<T> = Json::<T>::from_request(req, state).await?;
            return Err(NodeError::InvalidRequest(
                "the body must be JSON (content-type: application/json)".into(),
            ));
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| NodeError::InvalidJson(e.into()))?;
        Ok(JsonBytes(bytes, std::marker::PhantomData))
    }
}

/// The error for a body that does not parse as `T`: axum's, which names where in the body.
fn json_rejection<T: DeserializeOwned>(bytes: &[u8]) -> NodeError {
    match Json::<T>::from_bytes(bytes) {
        Err(rejection) => rejection.into(),
        Ok(_) => NodeError::InvalidRequest("the body could not be read".into()),
    }
}

/// Whether the request says its body is JSON (`application/json` or `application/*+json`), as
/// axum's `Json` extractor requires.
fn json_content_type(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    let subtype = subtype.as_bytes();
    kind.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case(b"json")
            || subtype.len() > 5 && subtype[subtype.len() - 5..].eq_ignore_ascii_case(b"+json"))
}

/// `axum::extract::Path`, with its rejection turned into a `NodeError`.
struct PathParams<T>(T);

impl<S, T> FromRequestParts<S> for PathParams<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = NodeError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, NodeError> {
        let Path(value) = Path::<T>::from_request_parts(parts, state).await?;
        Ok(PathParams(value))
    }
}

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn schema(State(state): State<NodeState>) -> Json<SchemaResponse> {
    Json(SchemaResponse {
        tables: state.schema().tables().cloned().collect(),
    })
}

async fn put_row(
    State(state): State<NodeState>,
    PathParams((table, key)): PathParams<(String, String)>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Json<PutRowResponse>, NodeError> {
    let (table, key) = row_key(&state, &table, &key)?;
    let row = rows::validate(&table, &body, Some(&key), 0)?;
    let name = table.name.clone();
    state
        .client_write(vec![key.routing_text().into_owned()], 1, move |conn| {
            rows::upsert(conn, &table, &row)
        })
        .await?;
    Ok(Json(PutRowResponse {
        table: name,
        key: key.to_json(),
    }))
}

/// The table and the key a row path names.
fn row_key(
    state: &NodeState,
    table: &str,
    key: &str,
) -> Result<(crate::schema::TableSchema, ShardKey), NodeError> {
    let table = state.table(table)?;
    let key = ShardKey::from_text(key, table.key_affinity)?;
    Ok((table, key))
}

async fn get_row(
    State(state): State<NodeState>,
    PathParams((table, key)): PathParams<(String, String)>,
) -> Result<Json<Map<String, Value>>, NodeError> {
    let (table, key) = row_key(&state, &table, &key)?;
    // A reader is enough: in WAL, a read begun after a commit returned sees that commit.
    let row = state
        .read(move |_, conn| rows::get(conn, &table, &key))
        .await?;
    Ok(Json(row))
}

async fn delete_row(
    State(state): State<NodeState>,
    PathParams((table, key)): PathParams<(String, String)>,
) -> Result<Json<DeleteRowResponse>, NodeError> {
    let (table, key) = row_key(&state, &table, &key)?;
    let deleted = state
        .client_write(vec![key.routing_text().into_owned()], 1, move |conn| {
            rows::delete(conn, &table, &key)
        })
        .await?;
    Ok(Json(DeleteRowResponse { deleted }))
}

async fn upsert_rows(
    State(state): State<NodeState>,
    PathParams(table): PathParams<String>,
    JsonBytes(body, _): JsonBytes<UpsertRowsRequest>,
) -> Result<Json<UpsertRowsResponse>, NodeError> {
    let table = state.table(&table)?;
    // Every row is checked, as it is read, before anything is written.
    let valid = match rows::batch::parse(&table, &body) {
        Ok(valid) => valid,
        Err(rows::batch::Unread::Refused(refusal)) => return Err(refusal),
        Err(rows::batch::Unread::NotABatch) => {
            return Err(json_rejection::<UpsertRowsRequest>(&body));
        }
    };
    // If any row's key is fenced, the whole batch is refused.
    let keys = valid
        .iter()
        .map(|row| row.key().routing_text().into_owned())
        .collect();
    let upserted = state
        .client_write(keys, valid.len(), move |conn| {
            rows::upsert_all(conn, &table, &valid)
        })
        .await?;
    Ok(Json(UpsertRowsResponse { upserted }))
}

async fn run_sql(
    State(state): State<NodeState>,
    JsonBody(mut request): JsonBody<SqlRequest>,
) -> Result<Json<SqlResponse>, NodeError> {
    let readonly = request.readonly;
    let key = request.key.clone();
    let owned = match request.owned.take() {
        Some(_) if !readonly => {
            return Err(NodeError::InvalidRequest(
                "\"owned\" narrows a keyless read: it needs \"readonly\": true".into(),
            ));
        }
        Some(pairs) => Some(crate::fence::Ranges::new(&pairs)?),
        None => None,
    };
    let statements = request.into_statements()?;
    let config = state.config();
    let limits = Limits {
        timeout: config.statement_timeout,
        max_rows: config.max_result_rows,
        max_bytes: config.max_result_bytes,
    };
    let results = if readonly {
        // Reads are never fenced.
        state
            .read(move |state, conn| match owned {
                Some(owned) => sql::read_owned(conn, &state.schema(), owned, &statements, limits),
                None => sql::read(conn, &statements, limits),
            })
            .await?
    } else {
        // Keyed SQL may insert or update rows under its key only (`written`).
        let keys: Vec<String> = key.into_iter().collect();
        let watched = keys.clone();
        // Not a `NodeState`: this closure is dropped after the answer (see `schema_cell`).
        let schema = state.schema_cell();
        state
            .client_write(keys, statements.len(), move |conn| {
                let texts: Vec<&str> = statements.iter().map(|s| s.sql.as_str()).collect();
                written::within(conn, &schema.get(), &watched, &texts, || {
                    sql::write(conn, &statements, limits)
                })
            })
            .await?
    };
    Ok(Json(SqlResponse { results }))
}

async fn stats(State(state): State<NodeState>) -> Result<Json<StatsResponse>, NodeError> {
    let mut stats = state
        .read(|state, conn| Ok(stats::collect(conn, &state.schema())?))
        .await?;
    stats.capturing = state.capturing();
    stats.fences = state.fences().list.len();
    (stats.writes, stats.commits) = state.write_counts();
    (stats.op_sets, stats.ops) = state.op_counts();
    stats.wal_restarts = state.wal_restarts();
    Ok(Json(stats))
}

async fn keys(
    State(state): State<NodeState>,
    JsonBody(request): JsonBody<KeysRequest>,
) -> Result<Json<KeysResponse>, NodeError> {
    let table = state.table(&request.table)?;
    let after = match request.after {
        None | Some(Value::Null) => None,
        Some(ref value) => Some(ShardKey::from_json(value, table.key_affinity)?),
    };
    let limit = match request.limit {
        None => DEFAULT_KEYS_LIMIT,
        Some(0) => {
            return Err(NodeError::InvalidRequest(
                "\"limit\" must be at least 1".into(),
            ));
        }
        Some(n) => n.min(MAX_KEYS_LIMIT),
    };
    let page = state
        .read(move |_, conn| rows::keys(conn, &table, after.as_ref(), limit))
        .await?;
    Ok(Json(page))
}

async fn list_migrations(
    State(state): State<NodeState>,
) -> Result<Json<MigrationsResponse>, NodeError> {
    let applied = state.read(|_, conn| Ok(migrate::applied(conn)?)).await?;
    Ok(Json(MigrationsResponse { applied }))
}

async fn apply_migrations(
    State(state): State<NodeState>,
    JsonBody(request): JsonBody<MigrateRequest>,
) -> Result<Json<MigrateResponse>, NodeError> {
    migrate::validate(&request.migrations)?;
    let response = state
        .write(move |state, conn| {
            let outcome = migrate::apply(conn, &request.migrations);
            // Even a failed request may have applied the migrations before the failing one.
            state.refresh_schema(conn)?;
            outcome
        })
        .await?;
    Ok(Json(response))
}

async fn unknown_endpoint(method: Method, uri: Uri) -> NodeError {
    NodeError::UnknownEndpoint {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}

async fn method_not_allowed(method: Method, uri: Uri) -> NodeError {
    NodeError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}

mod ops;
mod transfer;

#[cfg(test)]
pub(crate) mod tests;
