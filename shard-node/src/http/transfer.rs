//! Handlers of `/v1/transfer/*`: what the proxy's rebalance calls on a node.
//!
//! Reads (changes, scan, count, fetch, tally) run on a reader; capture, apply, purge and fences on
//! the writer thread, each alone, as one transaction.

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use super::JsonBody;
use crate::error::NodeError;
use crate::fence::{self, Ranges};
use crate::rows;
use crate::state::NodeState;
use crate::transfer::{
    self, ApplyRequest, ApplyResponse, CaptureResponse, ChangesRequest, ChangesResponse,
    CountRequest, CountResponse, DEFAULT_CHANGES_LIMIT, DEFAULT_PURGE_LIMIT, DEFAULT_SCAN_LIMIT,
    FencesResponse, FetchRequest, FetchResponse, MAX_CHANGES_LIMIT, MAX_FETCH_KEYS,
    MAX_PURGE_LIMIT, MAX_SCAN_LIMIT, PurgeCursor, PurgeFrom, PurgeRequest, PurgeResponse,
    PutFencesRequest, PutFencesResponse, ScanRequest, ScanResponse, TallyRequest, TallyResponse,
};

pub(super) fn routes() -> Router<NodeState> {
    Router::new()
        .route("/v1/transfer/capture", post(capture_on).delete(capture_off))
        .route("/v1/transfer/changes", post(changes))
        .route("/v1/transfer/scan", post(scan))
        .route("/v1/transfer/count", post(count))
        .route("/v1/transfer/fetch", post(fetch))
        .route("/v1/transfer/apply", post(apply))
        .route("/v1/transfer/purge", post(purge))
        .route("/v1/transfer/tally", post(tally))
        .route(
            "/v1/transfer/fences",
            get(list_fences).put(put_fences).delete(delete_fences),
        )
}

/// The body (`{}`) carries nothing, so it is not read.
async fn capture_on(State(state): State<NodeState>) -> Result<Json<CaptureResponse>, NodeError> {
    let response = state.write(transfer::capture_on).await?;
    Ok(Json(response))
}

async fn capture_off(State(state): State<NodeState>) -> Result<Json<Value>, NodeError> {
    state.write(transfer::capture_off).await?;
    Ok(Json(json!({})))
}

async fn changes(
    State(state): State<NodeState>,
    JsonBody(request): JsonBody<ChangesRequest>,
) -> Result<Json<ChangesResponse>, NodeError> {
    let limit = transfer::page_limit(request.limit, DEFAULT_CHANGES_LIMIT, MAX_CHANGES_LIMIT)?;
    let after = request.after;
    let response = state
        .read(move |_, conn| transfer::changes(conn, after, limit))
        .await?;
    Ok(Json(response))
}

async fn scan(
    State(state): State<NodeState>,
    JsonBody(request): JsonBody<ScanRequest>,
) -> Result<Json<ScanResponse>, NodeError> {
    let table = state.table(&request.table)?;
    let ranges = Ranges::new(&request.ranges)?;
    let limit = transfer::page_limit(request.limit, DEFAULT_SCAN_LIMIT, MAX_SCAN_LIMIT)?;
    let after = match request.after {
        None | Some(Value::Null) => None,
        Some(ref key) => Some(transfer::stored_key(key)?),
    };
    let page = state
        .read(move |state, conn| {
            let rowid = state.schema().rowid_alias(&table.name);
            transfer::scan(conn, &table, rowid, after.as_ref(), limit, &ranges)
        })
        .await?;
    Ok(Json(page))
}

async fn count(
    State(state): State<NodeState>,
    JsonBody(request): JsonBody<CountRequest>,
) -> Result<Json<CountResponse>, NodeError> {
    Ranges::new(&request.ranges)?;
    let response = state
        .read(move |state, conn| transfer::count(conn, &state.schema(), &request.ranges))
        .await?;
    Ok(Json(response))
}

async fn fetch(
    State(state): State<NodeState>,
    JsonBody(request): JsonBody<FetchRequest>,
) -> Result<Json<FetchResponse>, NodeError> {
    let table = state.table(&request.table)?;
    if request.keys.len() > MAX_FETCH_KEYS {
        return Err(NodeError::InvalidRequest(format!(
            "at most {MAX_FETCH_KEYS} keys per fetch, not {}",
            request.keys.len()
        )));
    }
    let keys = request
        .keys
        .iter()
        .map(transfer::stored_key)
        .collect::<Result<Vec<_>, _>>()?;
    let response = state
        .read(move |_, conn| transfer::fetch(conn, &table, &keys))
        .await?;
    Ok(Json(response))
}

async fn apply(
    State(state): State<NodeState>,
    JsonBody(request): JsonBody<ApplyRequest>,
) -> Result<Json<ApplyResponse>, NodeError> {
    let table = state.table(&request.table)?;
    // Everything is checked before anything is written, as for a batch upsert.
    let upserts = request
        .upserts
        .iter()
        .enumerate()
        .map(|(index, row)| rows::validate(&table, row, None, index))
        .collect::<Result<Vec<_>, _>>()?;
    let deletes = request
        .deletes
        .iter()
        .map(transfer::stored_key)
        .collect::<Result<Vec<_>, _>>()?;
    let response = state
        .write(move |_, conn| transfer::apply(conn, &table, &upserts, &deletes))
        .await?;
    Ok(Json(response))
}

async fn purge(
    State(state): State<NodeState>,
    JsonBody(request): JsonBody<PurgeRequest>,
) -> Result<Json<PurgeResponse>, NodeError> {
    let ranges = Ranges::new(&request.ranges)?;
    let limit = transfer::page_limit(request.limit, DEFAULT_PURGE_LIMIT, MAX_PURGE_LIMIT)?;
    let after = match request.after {
        None => None,
        Some(PurgeCursor {
            table,
            rowid: Some(rowid),
            key: None,
        }) => Some((table, PurgeFrom::Rowid(rowid))),
        Some(PurgeCursor {
            table,
            rowid: None,
            key: Some(key),
        }) => Some((table, PurgeFrom::Key(transfer::stored_key(&key)?))),
        Some(_) => {
            return Err(NodeError::InvalidRequest(
                "\"after\" names a table and one of \"rowid\" or \"key\"".into(),
            ));
        }
    };
    let mut response = state
        .write(move |state, conn| {
            let after = after.as_ref().map(|(t, from)| (t.as_str(), from.clone()));
            transfer::purge(
                conn,
                &state.schema(),
                &ranges,
                limit,
                after,
                state.config().synchronous,
            )
        })
        .await?;
    response.writes = Some(state.write_counts().0);
    Ok(Json(response))
}

/// The source's side of the count check before the fence: counts and logged rows in one
/// snapshot.
async fn tally(
    State(state): State<NodeState>,
    JsonBody(request): JsonBody<TallyRequest>,
) -> Result<Json<TallyResponse>, NodeError> {
    Ranges::new(&request.ranges)?;
    let limit = transfer::page_limit(request.limit, DEFAULT_CHANGES_LIMIT, MAX_CHANGES_LIMIT)?;
    let response = state
        .read(move |state, conn| {
            transfer::tally(conn, &state.schema(), request.after, &request.ranges, limit)
        })
        .await?;
    Ok(Json(response))
}

async fn list_fences(State(state): State<NodeState>) -> Json<FencesResponse> {
    Json(FencesResponse {
        fences: state.fences().list.clone(),
    })
}

/// A job on the writer's queue: it returns only after every write queued before it committed,
/// and every write queued after it sees the fence.
async fn put_fences(
    State(state): State<NodeState>,
    JsonBody(request): JsonBody<PutFencesRequest>,
) -> Result<Json<PutFencesResponse>, NodeError> {
    let fences = transfer::fences_of(request)?;
    let n = state
        .write(move |state, conn| fence::replace(state, conn, fences))
        .await?;
    Ok(Json(PutFencesResponse { fences: n }))
}

async fn delete_fences(State(state): State<NodeState>) -> Result<Json<Value>, NodeError> {
    state
        .write(|state, conn| fence::replace(state, conn, Vec::new()))
        .await?;
    Ok(Json(json!({})))
}

#[cfg(test)]
mod tests;
