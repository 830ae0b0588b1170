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
use crate::upstream::Reply;
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
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use shardlite_node::key::ShardKey;
use shardlite_node::ops::OpMethod;
use shardlite_node::schema::TableSchema;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

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

/// The key of a row request, read by the rules of the table's key column.
async fn key_of(
    state: &ProxyState,
    topology: &Topology,
    table: &str,
    key: &str,
) -> ProxyResult<ShardKey> {
    let schema = state
        .schema()
        .table(table, topology, state.upstream())
        .await?;
    ShardKey::from_text(key, schema.key_affinity)
        .map_err(|e| ProxyError::BadRequest(format!("invalid key for table \"{table}\": {e}")))
}

/// How long a write may wait, in all, for its key's range to finish moving to a new owner.
const FENCE_WAIT: Duration = Duration::from_secs(10);

/// Sends a write for the key `routing` to its owner. While the owner answers "fenced" (a
/// rebalance is handing the key's range over), waits a moment and routes again by the current
/// topology, which names the new owner once the hand-over is committed. The topology snapshot is
/// held until the node answers: the rebalance waits for such requests before a source drops
/// its copy.
async fn write_to_owner(
    state: &ProxyState,
    routing: &str,
    method: Method,
    path: &str,
    body: Option<Bytes>,
) -> ProxyResult<(String, Reply)> {
    let deadline = Instant::now() + FENCE_WAIT;
    let mut pause = Duration::from_millis(1);
    loop {
        let topology = state.cluster().topology();
        let node = topology.owner(routing)?;
        state.check_up(node)?;
        // Row writes may share an exchange with the node's other row requests; SQL goes alone.
        let reply = match OpMethod::from_http(&method) {
            Some(op) => {
                state
                    .upstream()
                    .call_row(&node.id, op, &node.url, path, body.clone())
                    .await?
            }
            None => {
                state
                    .upstream()
                    .call(&node.id, method.clone(), &node.url, path, body.clone())
                    .await?
            }
        };
        if reply.fenced && Instant::now() < deadline {
            drop(topology);
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(8));
            continue;
        }
        return Ok((node.id.clone(), reply));
    }
}

fn json_response(status: StatusCode, body: Bytes) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A keyed row write (PUT or DELETE), routed to the key's owner; fenced writes are retried.
/// Returns the owner's id, the key's routing text and the owner's answer body.
async fn write_row(
    state: &ProxyState,
    path: Result<Path<(String, String)>, PathRejection>,
    method: Method,
    body: Option<Bytes>,
) -> ProxyResult<(String, String, String, Bytes)> {
    let Path((table, key)) = path?;
    let key = key_of(state, &state.cluster().topology(), &table, &key).await?;
    let routing = key.routing_text().into_owned();
    let (node, reply) = write_to_owner(
        state,
        &routing,
        method.clone(),
        &row_path(&table, &routing),
        body,
    )
    .await?;
    let answer = reply.ok(&node)?;
    tracing::debug!(node = %node, table = %table, %method, "row write");
    Ok((node, table, routing, answer))
}

async fn put_row(
    State(state): State<ProxyState>,
    path: Result<Path<(String, String)>, PathRejection>,
    RawBody(body): RawBody,
) -> ProxyResult<Response> {
    let (node, table, key, _) = write_row(&state, path, Method::PUT, Some(body)).await?;
    Ok(axum::Json(json!({ "table": table, "key": key, "node": node })).into_response())
}

async fn delete_row(
    State(state): State<ProxyState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> ProxyResult<Response> {
    let (_, _, _, answer) = write_row(&state, path, Method::DELETE, None).await?;
    Ok(json_response(StatusCode::OK, answer))
}

async fn get_row(
    State(state): State<ProxyState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> ProxyResult<Response> {
    let Path((table, key)) = path?;
    let topology = state.cluster().topology();
    let key = key_of(&state, &topology, &table, &key).await?;
    let routing = key.routing_text();
    let node = topology.owner(&routing)?;
    state.check_up(node)?;
    let reply = state
        .upstream()
        .call_row(
            &node.id,
            OpMethod::Get,
            &node.url,
            &row_path(&table, &routing),
            None,
        )
        .await?;
    tracing::debug!(node = %node.id, table = %table, "get");
    Ok(json_response(StatusCode::OK, reply.ok(&node.id)?))
}

/// A batch as the client sent it: each row stays its own JSON text, forwarded untouched.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest<'a> {
    #[serde(borrow)]
    rows: Vec<&'a RawValue>,
}

/// Checks one batch row against the table's schema and returns its key. Only the row's top
/// level is read here (column names, and the key's value); the node checks the values.
fn batch_row_key(schema: &TableSchema, index: usize, row: &RawValue) -> ProxyResult<ShardKey> {
    let not_object = || ProxyError::BadRequest(format!("rows[{index}] is not a JSON object"));
    if !row.get().starts_with('{') {
        return Err(not_object());
    }
    let object: BTreeMap<String, &RawValue> =
        serde_json::from_str(row.get()).map_err(|_| not_object())?;
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
    let key: Value = serde_json::from_str(key.get()).expect("a raw JSON value parses");
    ShardKey::from_json(&key, schema.key_affinity)
        .map_err(|e| ProxyError::BadRequest(format!("rows[{index}]: invalid key: {e}")))
}

/// Reads a batch body and checks every row before anything is sent (one bad row refuses the
/// whole batch): each row's text, as a slice of `body`, with its key's routing text. The
/// errors come in this order: the body, the table (`schema`, looked up before), the row count,
/// then the rows.
fn checked_batch(
    body: &Bytes,
    schema: ProxyResult<std::sync::Arc<TableSchema>>,
    limit: usize,
) -> ProxyResult<Vec<(Bytes, String)>> {
    let batch: BatchRequest = crate::body::parse(body)?;
    let schema = schema?;
    if batch.rows.len() > limit {
        return Err(ProxyError::BadRequest(format!(
            "a batch holds at most {limit} rows, this one {}: split it",
            batch.rows.len()
        )));
    }
    let mut checked = Vec::with_capacity(batch.rows.len());
    for (index, row) in batch.rows.iter().copied().enumerate() {
        let key = batch_row_key(&schema, index, row)?;
        // The row's text lies inside `body` (it was read borrowed): share it, do not copy.
        checked.push((
            body.slice_ref(row.get().as_bytes()),
            key.routing_text().into_owned(),
        ));
    }
    Ok(checked)
}

async fn upsert_rows(
    State(state): State<ProxyState>,
    path: Result<Path<String>, PathRejection>,
    RawBody(body): RawBody,
) -> ProxyResult<Response> {
    let Path(table) = path?;
    // Looked up first, but its error comes after the body's (see `checked_batch`).
    let schema = {
        let topology = state.cluster().topology();
        state
            .schema()
            .table(&table, &topology, state.upstream())
            .await
    };
    let limit = state.config().limits.max_batch_rows;
    let size = body.len();
    let mut pending = off_event_loop(size, move || checked_batch(&body, schema, limit)).await?;
    let total = pending.len();

    let path = format!("/v1/tables/{}/rows", encode_segment(&table));
    let deadline = Instant::now() + FENCE_WAIT;
    let mut pause = Duration::from_millis(1);
    let mut results = Vec::new();
    // Rounds: a group whose range is fenced (being handed over) is routed again next round.
    while !pending.is_empty() {
        let topology = state.cluster().topology();
        let mut groups: BTreeMap<&str, (&NodeInfo, Vec<Bytes>, Vec<String>)> = BTreeMap::new();
        for (row, routing) in pending.drain(..) {
            let node = topology.owner(&routing)?;
            let group = groups
                .entry(node.id.as_str())
                .or_insert_with(|| (node, Vec::new(), Vec::new()));
            group.1.push(row);
            group.2.push(routing);
        }
        let calls = groups.into_values().map(|(node, rows, keys)| {
            let body = crate::body::splice("{\"rows\":[", &rows, "]}");
            let path = &path;
            let state = &state;
            async move {
                let result = match state.check_up(node) {
                    Ok(()) => {
                        state
                            .upstream()
                            .call(&node.id, Method::POST, &node.url, path, Some(body))
                            .await
                    }
                    Err(down) => Err(down),
                };
                (node.id.clone(), rows, keys, result)
            }
        });
        for (node, rows, keys, result) in futures::future::join_all(calls).await {
            match result {
                Ok(reply) if reply.fenced && Instant::now() < deadline => {
                    pending.extend(rows.into_iter().zip(keys));
                }
                Ok(reply) => results.push((node.clone(), keys, reply.ok(&node))),
                Err(error) => results.push((node, keys, Err(error))),
            }
        }
        drop(topology);
        if !pending.is_empty() {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(8));
        }
    }

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
    // A shard's rows are not written when its node refused them or was never reached; when
    // the call broke off after it went out (or timed out), the node may have written them.
    let mut not_written = Vec::new();
    let mut maybe_written = Vec::new();
    let mut reasons = Vec::new();
    for (node, keys, error) in failures {
        reasons.push(format!("node {node}: {}", error.message()));
        if error.in_doubt() {
            maybe_written.extend(keys);
        } else {
            not_written.extend(keys);
        }
    }
    tracing::warn!(
        table = %table,
        failed = not_written.len(),
        in_doubt = maybe_written.len(),
        "batch partly failed"
    );
    let mut said = Vec::new();
    if !not_written.is_empty() {
        said.push(format!("{} were not written", not_written.len()));
    }
    if !maybe_written.is_empty() {
        said.push(format!(
            "{} may or may not have been written",
            maybe_written.len()
        ));
    }
    Ok((
        status,
        axum::Json(json!({
            "error": format!(
                "of {} rows, {}: {}",
                total,
                said.join(" and "),
                reasons.join("; ")
            ),
            "upserted": upserted,
            "not_written": not_written,
            "maybe_written": maybe_written,
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

/// Refuses SQL text longer than the limit before any node parses it.
fn check_sql_length(state: &ProxyState, sql: &str) -> ProxyResult<()> {
    let limit = state.config().limits.max_sql_bytes;
    if sql.len() > limit {
        return Err(ProxyError::BadRequest(format!(
            "SQL text of {} bytes; the limit is {limit}",
            sql.len()
        )));
    }
    Ok(())
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
            check_sql_length(&state, sql)?;
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
            let limits = &state.config().limits;
            if statements.len() > limits.max_statements {
                return Err(ProxyError::BadRequest(format!(
                    "{} statements in one request; the limit is {}",
                    statements.len(),
                    limits.max_statements
                )));
            }
            for statement in statements {
                if let Some(sql) = statement.get("sql").and_then(Value::as_str) {
                    check_sql_length(&state, sql)?;
                }
            }
            forward.insert("statements".into(), Value::Array(statements.clone()));
        }
    }
    let topology = state.cluster().topology();
    match request.key {
        Some(key) => {
            let routing = sql_key(&key)?;
            forward.insert("readonly".into(), Value::Bool(false));
            // The node checks the key against its fences (a rebalance may be moving it).
            forward.insert("key".into(), Value::String(routing.clone()));
            let body = Bytes::from(serde_json::to_vec(&forward).expect("JSON serializes"));
            drop(topology);
            let (node, reply) =
                write_to_owner(&state, &routing, Method::POST, "/v1/sql", Some(body)).await?;
            tracing::debug!(node = %node, "sql");
            Ok(json_response(StatusCode::OK, reply.ok(&node)?))
        }
        None => {
            forward.insert("readonly".into(), Value::Bool(true));
            scatter_read(&state, &topology, forward).await
        }
    }
}

/// Runs a read-only statement on every node that owns data and concatenates the rows, in the
/// topology's node order (by id). `ORDER BY`, `LIMIT` and aggregates therefore apply within
/// each shard (the README says so).
///
/// Unless the last rebalance is done (or none ran), a row may sit on two nodes: copied to its
/// new owner ahead of the switch, or not yet deleted from its old one after it, or left behind
/// by a job that failed. Each node is then asked for only the rows whose keys it owns under
/// this topology (`owned` in its request), so every row is read once.
async fn scatter_read(
    state: &ProxyState,
    topology: &Topology,
    mut forward: Map<String, Value>,
) -> ProxyResult<Response> {
    let owners: Vec<&NodeInfo> = topology
        .nodes
        .iter()
        .filter(|n| n.state != crate::cluster::MemberState::Joining)
        .collect();
    if owners.is_empty() {
        return Err(ProxyError::NoNodes);
    }
    for node in &owners {
        state.check_up(node)?;
    }
    let settled = matches!(state.rebalance_status().state.as_str(), "idle" | "done");
    let body = |forward: &Map<String, Value>| {
        Bytes::from(serde_json::to_vec(forward).expect("JSON serializes"))
    };
    let bodies: Vec<Bytes> = if settled {
        // Every node gets the same request: built once.
        vec![body(&forward); owners.len()]
    } else {
        owners
            .iter()
            .map(|node| {
                let owned = topology
                    .ring
                    .ranges_of(&shardlite_ring::NodeId::new(node.id.clone()));
                forward.insert("owned".into(), json!(owned));
                body(&forward)
            })
            .collect()
    };
    let calls = owners.iter().zip(bodies).map(|(node, body)| async move {
        state
            .upstream()
            .call(&node.id, Method::POST, &node.url, "/v1/sql", Some(body))
            .await
            .and_then(|reply| reply.ok(&node.id))
    });
    let mut answers = Vec::with_capacity(owners.len());
    for (node, answer) in owners.iter().zip(futures::future::join_all(calls).await) {
        answers.push((node.id.clone(), answer?));
    }
    let limit = state.config().limits.max_result_rows;
    let size: usize = answers.iter().map(|(_, body)| body.len()).sum();
    let merged = off_event_loop(size, move || merge_answers(&answers, limit)).await?;
    Ok(json_response(StatusCode::OK, merged))
}

/// Work on more bytes than this runs on a blocking thread (see [`off_event_loop`]).
const OFFLOAD_BYTES: usize = 256 * 1024;

/// Runs `work`, which reads or writes `size` bytes of JSON, on a blocking thread when `size` is
/// over [`OFFLOAD_BYTES`], else here. The proxy may run on one thread (`--threads`), and every
/// other request waits while it works: a keyless read of 13 MB held small GETs up to 70-80 ms,
/// and a batch of 10k rows (1.6 MB) up to about 16 ms at p99. Small work stays here, where it
/// costs no hand-off to another thread.
async fn off_event_loop<T: Send + 'static>(
    size: usize,
    work: impl FnOnce() -> ProxyResult<T> + Send + 'static,
) -> ProxyResult<T> {
    if size <= OFFLOAD_BYTES {
        return work();
    }
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ProxyError::Internal(format!("a blocking task failed: {e}")))?
}

/// One node's `/v1/sql` answer as far as the merge reads it: each row stays its own JSON text.
#[derive(Deserialize)]
struct NodeAnswer<'a> {
    #[serde(borrow)]
    results: Vec<NodeResult<'a>>,
}

#[derive(Deserialize)]
struct NodeResult<'a> {
    #[serde(borrow)]
    columns: Option<&'a RawValue>,
    #[serde(borrow, default)]
    rows: Vec<&'a RawValue>,
}

/// The nodes' answers to one keyless read, `(node, body)` in node order, as one answer: the
/// first node's columns and every node's rows in turn. The rows are spliced as the nodes wrote
/// them, not parsed into values.
fn merge_answers(answers: &[(String, Bytes)], limit: usize) -> ProxyResult<Bytes> {
    let mut columns: Option<&RawValue> = None;
    let mut rows: Vec<&str> = Vec::new();
    for (node, body) in answers {
        let bad = |reason: String| ProxyError::BadNodeAnswer {
            node: node.clone(),
            reason,
        };
        let answer: NodeAnswer = serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?;
        let result = answer
            .results
            .into_iter()
            .next()
            .ok_or_else(|| bad("no \"results\" in the answer".into()))?;
        columns = columns.or(result.columns);
        rows.extend(result.rows.iter().map(|row| row.get()));
        if rows.len() > limit {
            return Err(ProxyError::BadRequest(format!(
                "the shards' answers hold more than {limit} rows together: narrow the query \
                 or add a LIMIT"
            )));
        }
    }
    let head = format!(
        "{{\"results\":[{{\"columns\":{},\"rows\":[",
        columns.map_or("[]", RawValue::get)
    );
    Ok(crate::body::splice(
        &head,
        rows,
        "],\"rows_affected\":0,\"last_insert_id\":0}]}",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardlite_node::key::Affinity;

    fn answer(node: &str, json: Value) -> (String, Bytes) {
        (node.into(), Bytes::from(json.to_string()))
    }

    #[test]
    fn a_keyless_read_is_every_node_rows_in_node_order_spliced_as_sent() {
        let tricky = json!({ "nested": [1, "a \"quoted\" \u{e9}"], "blob": { "$base64": "AAE=" } });
        let answers = [
            answer(
                "n1",
                json!({ "results": [{ "columns": ["id", "v"], "rows": [["a", 1], ["b", tricky]],
                        "rows_affected": 0, "last_insert_id": 0 }] }),
            ),
            answer(
                "n2",
                json!({ "results": [{ "columns": ["id", "v"], "rows": [] }] }),
            ),
            answer(
                "n3",
                json!({ "results": [{ "columns": ["id", "v"], "rows": [["c", null]] }] }),
            ),
        ];
        let merged: Value = serde_json::from_slice(&merge_answers(&answers, 10).unwrap()).unwrap();
        assert_eq!(
            merged,
            json!({ "results": [{ "columns": ["id", "v"],
                    "rows": [["a", 1], ["b", tricky], ["c", null]],
                    "rows_affected": 0, "last_insert_id": 0 }] })
        );
        // Exactly at the limit passes; one more row is refused.
        assert!(merge_answers(&answers, 3).is_ok());
        let err = merge_answers(&answers, 2).unwrap_err();
        assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{err}");
        assert!(err.to_string().contains("more than 2 rows"), "{err}");
        // No node, no columns: an empty answer of the same shape.
        let empty: Value = serde_json::from_slice(&merge_answers(&[], 10).unwrap()).unwrap();
        assert_eq!(empty["results"][0]["columns"], json!([]));
        assert_eq!(empty["results"][0]["rows"], json!([]));
    }

    #[test]
    fn a_node_answer_the_merge_cannot_read_names_the_node() {
        for body in [json!({ "results": [] }), json!({ "rows": [] }), json!([1])] {
            let answers = [
                answer("n1", json!({ "results": [{ "columns": [], "rows": [] }] })),
                answer("n2", body.clone()),
            ];
            let err = merge_answers(&answers, 10).unwrap_err();
            assert!(
                matches!(&err, ProxyError::BadNodeAnswer { node, .. } if node == "n2"),
                "{body}: {err}"
            );
        }
    }

    fn users() -> std::sync::Arc<TableSchema> {
        std::sync::Arc::new(TableSchema {
            name: "users".into(),
            key: "id".into(),
            key_affinity: Affinity::Text,
            columns: vec!["id".into(), "name".into()],
        })
    }

    #[test]
    fn a_checked_batch_shares_each_row_text_with_its_routing_key() {
        let body = Bytes::from(r#"{"rows": [{"id": "a", "name": "x\"y"}, {"id": 7}]}"#);
        let checked = checked_batch(&body, Ok(users()), 10).unwrap();
        let texts: Vec<&[u8]> = checked.iter().map(|(row, _)| &row[..]).collect();
        assert_eq!(
            texts,
            [&br#"{"id": "a", "name": "x\"y"}"#[..], br#"{"id": 7}"#]
        );
        let keys: Vec<&str> = checked.iter().map(|(_, key)| key.as_str()).collect();
        assert_eq!(keys, ["a", "7"]);
        // Slices of the body, not copies.
        let inside = body.as_ptr_range();
        assert!(
            checked
                .iter()
                .all(|(row, _)| inside.contains(&row.as_ptr()))
        );
    }

    #[test]
    fn a_batch_is_refused_for_its_body_then_its_table_then_its_size_then_a_row() {
        let unknown = || Err(ProxyError::NotFound("unknown table".into()));
        let bad_json = Bytes::from("{\"rows\": [");
        let err = checked_batch(&bad_json, unknown(), 1).unwrap_err();
        assert!(err.to_string().starts_with("invalid JSON body"), "{err}");
        let two = Bytes::from(r#"{"rows": [{"id": "a"}, {"nope": 1}]}"#);
        let err = checked_batch(&two, unknown(), 1).unwrap_err();
        assert_eq!(err.to_string(), "unknown table");
        let err = checked_batch(&two, Ok(users()), 1).unwrap_err();
        assert!(
            err.to_string().contains("at most 1 rows, this one 2"),
            "{err}"
        );
        let err = checked_batch(&two, Ok(users()), 2).unwrap_err();
        assert!(
            err.to_string().contains("rows[1]: unknown column \"nope\""),
            "{err}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn big_work_runs_off_the_event_loop_and_small_work_on_it() {
        let here = std::thread::current().id();
        let ran_on = |size| off_event_loop(size, || Ok(std::thread::current().id()));
        assert_eq!(ran_on(OFFLOAD_BYTES).await.unwrap(), here);
        assert_ne!(ran_on(OFFLOAD_BYTES + 1).await.unwrap(), here);
        let err = off_event_loop(OFFLOAD_BYTES + 1, || -> ProxyResult<()> {
            Err(ProxyError::BadRequest("no".into()))
        })
        .await
        .unwrap_err();
        assert_eq!(err.to_string(), "no");
    }

    /// A column named twice takes its last value on the node (as a JSON object does), so the
    /// proxy must route the row by the last value of its key too, or the row would be stored
    /// on a node that does not own it.
    #[test]
    fn a_batch_rows_key_named_twice_routes_by_its_last_value() {
        let schema = TableSchema {
            name: "users".into(),
            key: "id".into(),
            key_affinity: Affinity::Text,
            columns: vec!["id".into(), "name".into()],
        };
        let row: Box<RawValue> =
            serde_json::from_str(r#"{"id": "a", "name": "x", "id": "a-2"}"#).unwrap();
        let key = batch_row_key(&schema, 0, &row).unwrap();
        assert_eq!(key.routing_text(), "a-2");
    }
}
