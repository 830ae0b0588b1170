//! The data plane: keyed row operations, batches and SQL, each routed to the node that owns the
//! key on the current ring.
//!
//! A key is routed by its routing text (`ShardKey::routing_text`, the same function the nodes
//! and `verify` use). Single-row requests forward the client's body untouched; the node
//! validates it inside its own transaction, so a refused request changes nothing. Batches are
//! validated whole here first, then split per owner, one transaction per node.

use crate::body::{JsonBody, RawBody};
use crate::cluster::{NodeInfo, Topology};
use crate::error::{ProxyError, ProxyResult};
use crate::server::ProxyState;
use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, put};
use bytes::Bytes;
use http::Method;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use shardlite_node::key::ShardKey;
use shardlite_node::schema::TableSchema;
use std::collections::BTreeMap;
use std::sync::Arc;

pub fn router() -> Router<ProxyState> {
    Router::new()
        .route(
            "/v1/tables/{table}/rows/{key}",
            put(put_row).get(get_row).delete(delete_row),
        )
        .route("/v1/tables/{table}/rows", post(upsert_rows))
        .route("/v1/sql", post(sql))
}

/// Every byte but RFC 3986's unreserved characters is escaped, so keys with `/ ? # & % +` or
/// spaces reach the node as one path segment.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

pub fn encode_segment(text: &str) -> String {
    utf8_percent_encode(text, SEGMENT).to_string()
}

fn row_path(table: &str, key: &str) -> String {
    format!(
        "/v1/tables/{}/rows/{}",
        encode_segment(table),
        encode_segment(key)
    )
}

/// A keyed row request, resolved: the table's schema, the key and the node that owns it.
struct Target {
    topology: Arc<Topology>,
    key: ShardKey,
}

impl Target {
    fn node(&self) -> ProxyResult<&NodeInfo> {
        self.topology.owner(&self.key.routing_text())
    }
}

async fn resolve(state: &ProxyState, table: &str, key: &str) -> ProxyResult<Target> {
    let topology = state.cluster().topology();
    let schema = state
        .schema()
        .table(table, &topology, state.upstream())
        .await?;
    let key = ShardKey::from_text(key, schema.key_affinity)
        .map_err(|e| ProxyError::BadRequest(format!("invalid key for table \"{table}\": {e}")))?;
    Ok(Target { topology, key })
}

fn json_response(status: StatusCode, body: Bytes) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

async fn put_row(
    State(state): State<ProxyState>,
    path: Result<Path<(String, String)>, PathRejection>,
    RawBody(body): RawBody,
) -> ProxyResult<Response> {
    let Path((table, key)) = path?;
    let target = resolve(&state, &table, &key).await?;
    let node = target.node()?;
    let routing = target.key.routing_text();
    state
        .upstream()
        .call(
            &node.id,
            Method::PUT,
            &node.url,
            &row_path(&table, &routing),
            Some(body),
        )
        .await?
        .ok(&node.id)?;
    tracing::debug!(node = %node.id, table = %table, "put");
    Ok(axum::Json(json!({ "table": table, "key": routing, "node": node.id })).into_response())
}

async fn get_row(
    State(state): State<ProxyState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> ProxyResult<Response> {
    let Path((table, key)) = path?;
    let target = resolve(&state, &table, &key).await?;
    let node = target.node()?;
    let reply = state
        .upstream()
        .call(
            &node.id,
            Method::GET,
            &node.url,
            &row_path(&table, &target.key.routing_text()),
            None,
        )
        .await?;
    tracing::debug!(node = %node.id, table = %table, "get");
    Ok(json_response(StatusCode::OK, reply.ok(&node.id)?))
}

async fn delete_row(
    State(state): State<ProxyState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> ProxyResult<Response> {
    let Path((table, key)) = path?;
    let target = resolve(&state, &table, &key).await?;
    let node = target.node()?;
    let reply = state
        .upstream()
        .call(
            &node.id,
            Method::DELETE,
            &node.url,
            &row_path(&table, &target.key.routing_text()),
            None,
        )
        .await?;
    tracing::debug!(node = %node.id, table = %table, "delete");
    Ok(json_response(StatusCode::OK, reply.ok(&node.id)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    rows: Vec<Value>,
}

/// Checks one batch row against the table's schema and returns its key.
fn batch_row_key(schema: &TableSchema, index: usize, row: &Value) -> ProxyResult<ShardKey> {
    let object = row
        .as_object()
        .ok_or_else(|| ProxyError::BadRequest(format!("rows[{index}] is not a JSON object")))?;
    if let Some(unknown) = object
        .keys()
        .find(|column| !schema.columns.iter().any(|c| c == *column))
    {
        return Err(ProxyError::BadRequest(format!(
            "rows[{index}]: unknown column \"{unknown}\" in table \"{}\"",
            schema.name
        )));
    }
    let key = object.get(&schema.key).ok_or_else(|| {
        ProxyError::BadRequest(format!(
            "rows[{index}] has no key column \"{}\"",
            schema.key
        ))
    })?;
    ShardKey::from_json(key, schema.key_affinity)
        .map_err(|e| ProxyError::BadRequest(format!("rows[{index}]: invalid key: {e}")))
}

async fn upsert_rows(
    State(state): State<ProxyState>,
    path: Result<Path<String>, PathRejection>,
    JsonBody(batch): JsonBody<BatchRequest>,
) -> ProxyResult<Response> {
    let Path(table) = path?;
    let topology = state.cluster().topology();
    let schema = state
        .schema()
        .table(&table, &topology, state.upstream())
        .await?;

    // Validate every row before anything is sent: one bad row refuses the whole batch.
    let mut groups: BTreeMap<&str, (&NodeInfo, Vec<&Value>, Vec<String>)> = BTreeMap::new();
    for (index, row) in batch.rows.iter().enumerate() {
        let key = batch_row_key(&schema, index, row)?;
        let routing = key.routing_text().into_owned();
        let node = topology.owner(&routing)?;
        let group = groups
            .entry(node.id.as_str())
            .or_insert_with(|| (node, Vec::new(), Vec::new()));
        group.1.push(row);
        group.2.push(routing);
    }

    let path = format!("/v1/tables/{}/rows", encode_segment(&table));
    let calls = groups.into_values().map(|(node, rows, keys)| {
        let body = Bytes::from(
            serde_json::to_vec(&json!({ "rows": rows })).expect("JSON values always serialize"),
        );
        let path = &path;
        let state = &state;
        async move {
            let result = state
                .upstream()
                .call(&node.id, Method::POST, &node.url, path, Some(body))
                .await
                .and_then(|reply| reply.ok(&node.id));
            (node, keys, result)
        }
    });
    let results = futures::future::join_all(calls).await;

    let mut upserted = 0usize;
    let mut failures = Vec::new();
    for (node, keys, result) in results {
        match result {
            Ok(_) => upserted += keys.len(),
            Err(error) => failures.push((node, keys, error)),
        }
    }
    if failures.is_empty() {
        return Ok(axum::Json(json!({ "upserted": upserted })).into_response());
    }
    let status = failures[0].2.status();
    let mut not_written = Vec::new();
    let mut reasons = Vec::new();
    for (node, keys, error) in failures {
        reasons.push(format!("node {}: {}", node.id, error.message()));
        not_written.extend(keys);
    }
    tracing::warn!(table = %table, failed = not_written.len(), "batch partly failed");
    Ok((
        status,
        axum::Json(json!({
            "error": format!(
                "{} of {} rows were not written: {}",
                not_written.len(),
                batch.rows.len(),
                reasons.join("; ")
            ),
            "upserted": upserted,
            "not_written": not_written,
        })),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SqlRequest {
    key: Option<Value>,
    sql: Option<String>,
    params: Option<Vec<Value>>,
    statements: Option<Vec<Value>>,
}

/// The routing text of the `key` of a keyed SQL request: a string as it is, an integer as its
/// decimal text (so 42 and "42" reach the same shard, as they do through the row API).
fn sql_key(key: &Value) -> ProxyResult<String> {
    match key {
        Value::String(s) if !s.is_empty() => Ok(s.clone()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
        other => Err(ProxyError::BadRequest(format!(
            "\"key\" must be a non-empty string or an integer, not {other}"
        ))),
    }
}

async fn sql(
    State(state): State<ProxyState>,
    JsonBody(request): JsonBody<SqlRequest>,
) -> ProxyResult<Response> {
    let mut forward = Map::new();
    match (&request.sql, &request.statements) {
        (Some(_), Some(_)) => {
            return Err(ProxyError::BadRequest(
                "send either \"sql\" or \"statements\", not both".into(),
            ));
        }
        (None, None) => {
            return Err(ProxyError::BadRequest(
                "missing \"sql\" (one statement) or \"statements\" (a list)".into(),
            ));
        }
        (Some(sql), None) => {
            forward.insert("sql".into(), Value::String(sql.clone()));
            if let Some(params) = request.params {
                forward.insert("params".into(), Value::Array(params));
            }
        }
        (None, Some(statements)) => {
            if request.params.is_some() {
                return Err(ProxyError::BadRequest(
                    "\"params\" goes inside each of \"statements\"".into(),
                ));
            }
            if request.key.is_none() {
                return Err(ProxyError::BadRequest(
                    "a statement list runs as one transaction on one shard: it needs a \"key\""
                        .into(),
                ));
            }
            forward.insert("statements".into(), Value::Array(statements.clone()));
        }
    }
    let topology = state.cluster().topology();
    match request.key {
        Some(key) => {
            let routing = sql_key(&key)?;
            let node = topology.owner(&routing)?;
            forward.insert("readonly".into(), Value::Bool(false));
            let body = Bytes::from(serde_json::to_vec(&forward).expect("JSON serializes"));
            let reply = state
                .upstream()
                .call(&node.id, Method::POST, &node.url, "/v1/sql", Some(body))
                .await?;
            tracing::debug!(node = %node.id, "sql");
            Ok(json_response(StatusCode::OK, reply.ok(&node.id)?))
        }
        None => {
            forward.insert("readonly".into(), Value::Bool(true));
            let body = Bytes::from(serde_json::to_vec(&forward).expect("JSON serializes"));
            scatter_read(&state, &topology, body).await
        }
    }
}

/// Runs a read-only statement on every node that owns data and concatenates the rows.
async fn scatter_read(
    state: &ProxyState,
    topology: &Topology,
    body: Bytes,
) -> ProxyResult<Response> {
    let owners: Vec<&NodeInfo> = topology
        .nodes
        .iter()
        .filter(|n| n.state != crate::cluster::MemberState::Joining)
        .collect();
    if owners.is_empty() {
        return Err(ProxyError::NoNodes);
    }
    let calls = owners.iter().map(|node| {
        let body = body.clone();
        async move {
            state
                .upstream()
                .call(&node.id, Method::POST, &node.url, "/v1/sql", Some(body))
                .await
                .and_then(|reply| reply.json::<Value>(&node.id))
        }
    });
    let answers = futures::future::join_all(calls).await;
    let mut columns: Option<Value> = None;
    let mut rows = Vec::new();
    for (node, answer) in owners.iter().zip(answers) {
        let answer = answer?;
        let result = answer
            .get("results")
            .and_then(|r| r.get(0))
            .ok_or_else(|| ProxyError::BadNodeAnswer {
                node: node.id.clone(),
                reason: "no \"results\" in the answer".into(),
            })?;
        if columns.is_none() {
            columns = result.get("columns").cloned();
        }
        if let Some(Value::Array(node_rows)) = result.get("rows") {
            rows.extend(node_rows.iter().cloned());
        }
    }
    let merged = json!({
        "results": [{
            "columns": columns.unwrap_or_else(|| json!([])),
            "rows": rows,
            "rows_affected": 0,
            "last_insert_id": 0,
        }]
    });
    Ok(axum::Json(merged).into_response())
}
