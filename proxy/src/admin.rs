//! The admin plane under `/v1/cluster`: membership, per-node figures, verification.

use crate::body::{self, JsonBody, RawBody};
use crate::cluster::{self, MemberState, NodeInfo, Topology, bump_epoch};
use crate::error::{ProxyError, ProxyResult};
use crate::migrate::{self, MigrateRequest, MigrationStatus};
use crate::rebalance::{self, DryRun, RebalanceStatus};
use crate::server::ProxyState;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use http::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use shardlite_node::key::ShardKey;
use shardlite_node::stats::StatsResponse;
use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

pub fn router() -> Router<ProxyState> {
    Router::new()
        .route("/v1/cluster", get(cluster))
        .route("/v1/cluster/status", get(status))
        .route("/v1/cluster/verify", get(verify))
        .route("/v1/cluster/nodes", get(list_nodes).post(add_node))
        .route(
            "/v1/cluster/nodes/{id}",
            delete(remove_node).patch(patch_node),
        )
        .route(
            "/v1/cluster/rebalance",
            get(rebalance_status)
                .post(start_rebalance)
                .delete(cancel_rebalance),
        )
        .route(
            "/v1/cluster/migrations",
            get(migrations_status).post(run_migrations),
        )
}

/// `GET /v1/cluster`: epoch, nodes, and the rebalance job.
#[derive(Serialize, Deserialize, Debug)]
pub struct ClusterResponse {
    pub epoch: u64,
    pub nodes: Vec<NodeInfo>,
    pub rebalance: RebalanceStatus,
}

async fn cluster(State(state): State<ProxyState>) -> Json<ClusterResponse> {
    let topology = state.cluster().topology();
    Json(ClusterResponse {
        epoch: topology.epoch,
        nodes: topology.nodes.clone(),
        rebalance: RebalanceStatus::clone(&state.rebalance_status()),
    })
}

/// One node's figures in `GET /v1/cluster/status`.
#[derive(Serialize, Deserialize, Debug)]
pub struct NodeStatus {
    #[serde(flatten)]
    pub node: NodeInfo,
    /// Fraction of the hash ring the node owns now (0 while joining).
    pub share: f64,
    pub reachable: bool,
    /// Marked down by the proxy's health checks (its keys get 503).
    pub down: bool,
    pub rows: Option<u64>,
    pub bytes: Option<u64>,
    /// The highest migration applied on the node.
    pub schema_version: Option<i64>,
    /// Why the figures are missing, when the node did not answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /v1/cluster/status`: `GET /v1/cluster` plus per-node rows, bytes and ring share.
#[derive(Serialize, Deserialize, Debug)]
pub struct StatusResponse {
    pub epoch: u64,
    /// The highest known migration; a node below it lags.
    pub schema_version: i64,
    pub nodes: Vec<NodeStatus>,
    pub rebalance: RebalanceStatus,
}

async fn status(State(state): State<ProxyState>) -> Json<StatusResponse> {
    let topology = state.cluster().topology();
    let shares = cluster::shares_by_id(&topology.ring);
    let calls = topology.nodes.iter().map(|node| {
        let state = &state;
        async move {
            state
                .upstream()
                .call(&node.id, Method::GET, &node.url, "/v1/stats", None)
                .await
                .and_then(|reply| reply.json::<StatsResponse>(&node.id))
        }
    });
    let stats = futures::future::join_all(calls).await;
    let ledgers = migrate::status(&state).await;
    let nodes = topology
        .nodes
        .iter()
        .zip(stats)
        .map(|(node, stats)| {
            let share = shares.get(&node.id).copied().unwrap_or(0.0);
            match stats {
                Ok(s) => NodeStatus {
                    node: node.clone(),
                    share,
                    reachable: true,
                    down: state.health().is_down(&node.id),
                    rows: Some(s.rows),
                    bytes: Some(s.bytes),
                    schema_version: ledgers.as_ref().ok().and_then(|l| {
                        let ledger = l.nodes.get(&node.id)?;
                        ledger
                            .error
                            .is_none()
                            .then(|| ledger.applied.last().map_or(0, |m| m.version))
                    }),
                    error: None,
                },
                Err(e) => NodeStatus {
                    node: node.clone(),
                    share,
                    reachable: false,
                    down: state.health().is_down(&node.id),
                    rows: None,
                    bytes: None,
                    schema_version: None,
                    error: Some(e.message()),
                },
            }
        })
        .collect();
    Json(StatusResponse {
        epoch: topology.epoch,
        schema_version: ledgers.as_ref().map_or(0, |l| l.version),
        nodes,
        rebalance: RebalanceStatus::clone(&state.rebalance_status()),
    })
}

/// `GET /v1/cluster/verify`.
#[derive(Serialize, Deserialize, Debug)]
pub struct VerifyResponse {
    pub epoch: u64,
    pub rows_total: u64,
    /// Rows stored on a node that does not own their key.
    pub misplaced: u64,
    /// Keys stored on more than one node.
    pub duplicates: u64,
    pub nodes: BTreeMap<String, NodeVerify>,
    /// What to do about misplaced rows (absent when there are none): wait for the running
    /// rebalance, run one, or repair rows that no rebalance moves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Default)]
pub struct NodeVerify {
    pub rows: u64,
    pub misplaced: u64,
    /// The first misplaced rows found on this node (at most [`MISPLACED_EXAMPLES`]), so that
    /// they can be found and repaired.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub examples: Vec<MisplacedRow>,
}

/// A row on a node that does not own its key.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct MisplacedRow {
    pub table: String,
    pub key: Value,
    /// The node that owns the key.
    pub owner: String,
}

/// Misplaced rows `verify` names per node.
const MISPLACED_EXAMPLES: usize = 5;

#[derive(Deserialize)]
struct KeysPage {
    keys: Vec<Value>,
    next: Option<Value>,
}

const VERIFY_PAGE: usize = 10_000;

async fn verify(State(state): State<ProxyState>) -> ProxyResult<Json<VerifyResponse>> {
    let topology = state.cluster().topology();
    state.schema().refresh(&topology, state.upstream()).await?;
    let tables = state.schema().all();

    let scans = topology.nodes.iter().map(|node| {
        let state = &state;
        let tables = &tables;
        let topology = &topology;
        async move {
            let mut figures = NodeVerify::default();
            // (table index, hash of the routing text) of every key on this node.
            let mut seen: Vec<(usize, u64)> = Vec::new();
            for (t, table) in tables.iter().enumerate() {
                let mut after = Value::Null;
                loop {
                    let body = json!({ "table": table.name, "after": after, "limit": VERIFY_PAGE });
                    let page: KeysPage = state
                        .upstream()
                        .call(
                            &node.id,
                            Method::POST,
                            &node.url,
                            "/v1/keys",
                            Some(serde_json::to_vec(&body).expect("JSON serializes").into()),
                        )
                        .await?
                        .json(&node.id)
                        .map_err(|e| match e {
                            // Not a missing resource of this endpoint: that node is behind.
                            ProxyError::Node { status, .. } if status == StatusCode::NOT_FOUND => {
                                ProxyError::Conflict(format!(
                                    "node {} has no table \"{}\": its schema is behind the \
                                     cluster's; run `shardlite migrate`, then verify again",
                                    node.id, table.name
                                ))
                            }
                            other => other,
                        })?;
                    for key in &page.keys {
                        let key = ShardKey::from_json(key, table.key_affinity).map_err(|e| {
                            ProxyError::BadNodeAnswer {
                                node: node.id.clone(),
                                reason: format!(
                                    "stored key in {} is not routable: {e}",
                                    table.name
                                ),
                            }
                        })?;
                        let routing = key.routing_text();
                        figures.rows += 1;
                        let owner = &topology.owner(&routing)?.id;
                        if *owner != node.id {
                            figures.misplaced += 1;
                            if figures.examples.len() < MISPLACED_EXAMPLES {
                                figures.examples.push(MisplacedRow {
                                    table: table.name.clone(),
                                    key: key.to_json(),
                                    owner: owner.clone(),
                                });
                            }
                        }
                        let mut hasher = DefaultHasher::new();
                        routing.hash(&mut hasher);
                        seen.push((t, hasher.finish()));
                    }
                    match page.next {
                        Some(next) if !page.keys.is_empty() => after = next,
                        _ => break,
                    }
                }
            }
            Ok::<_, ProxyError>((node.id.clone(), figures, seen))
        }
    });
    let results = futures::future::join_all(scans).await;

    let mut response = VerifyResponse {
        epoch: topology.epoch,
        rows_total: 0,
        misplaced: 0,
        duplicates: 0,
        nodes: BTreeMap::new(),
        hint: None,
    };
    let mut copies: HashMap<(usize, u64), u32> = HashMap::new();
    for result in results {
        let (id, figures, seen) = result?;
        response.rows_total += figures.rows;
        response.misplaced += figures.misplaced;
        for key in seen {
            *copies.entry(key).or_default() += 1;
        }
        response.nodes.insert(id, figures);
    }
    response.duplicates = copies.values().filter(|&&n| n > 1).count() as u64;
    response.hint = verify_hint(
        &response,
        &topology,
        state.rebalance_status().state == "running",
    );
    Ok(Json(response))
}

/// What `verify` advises when rows are misplaced. A running rebalance explains them (moved rows
/// stay on their old owner until its clean-up). On joining or leaving nodes they are copies
/// of a job that did not finish, which the next job purges or drains. On active nodes no
/// rebalance moves them: they were written to a node directly, or its file came from
/// elsewhere, and only a repair by hand helps.
fn verify_hint(report: &VerifyResponse, topology: &Topology, running: bool) -> Option<String> {
    if report.misplaced == 0 && report.duplicates == 0 {
        return None;
    }
    if running {
        return Some(
            "a rebalance is running, and moved rows stay on their old owner until its clean-up \
             ends: verify again once `shardlite rebalance` says it is done"
                .into(),
        );
    }
    let on_active: u64 = report
        .nodes
        .iter()
        .filter(|(id, _)| {
            topology
                .node(id)
                .is_some_and(|n| n.state == MemberState::Active)
        })
        .map(|(_, n)| n.misplaced)
        .sum();
    if on_active == 0 {
        return Some(
            "the misplaced rows are on joining or leaving nodes, left by a rebalance that did not \
             finish: run `shardlite rebalance`"
                .into(),
        );
    }
    Some(format!(
        "{on_active} rows on active nodes lie outside the ranges those nodes own (written to a \
         node directly, or its file came from elsewhere), and no rebalance moves them; each \
         node's first five are listed (`examples` in `shardlite verify --json`): compare each \
         with its owner's row, write the right one through the proxy, then delete the stray one \
         on its node (docs/rebalance.md, \"Misplaced rows\")"
    ))
}

async fn run_migrations(
    State(state): State<ProxyState>,
    JsonBody(request): JsonBody<MigrateRequest>,
) -> ProxyResult<Response> {
    let latest = request
        .migrations
        .iter()
        .map(|m| m.version)
        .max()
        .unwrap_or(0);
    let _job = state
        .jobs()
        .begin(format!("a migration to version {latest}"))?;
    let (status, response) = migrate::apply(&state, &request.migrations).await?;
    Ok((status, Json(response)).into_response())
}

async fn migrations_status(State(state): State<ProxyState>) -> ProxyResult<Json<MigrationStatus>> {
    Ok(Json(migrate::status(&state).await?))
}

async fn list_nodes(State(state): State<ProxyState>) -> Json<Vec<NodeInfo>> {
    Json(state.cluster().topology().nodes.clone())
}

/// `POST /v1/cluster/nodes`.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct AddNodeRequest {
    pub id: String,
    pub url: String,
    pub weight: Option<u32>,
}

/// Adds a node as `joining`: it must answer, and it gets every migration before it is recorded,
/// so it owns nothing and lacks nothing until a rebalance moves its rows in.
async fn add_node(
    State(state): State<ProxyState>,
    JsonBody(request): JsonBody<AddNodeRequest>,
) -> ProxyResult<Response> {
    cluster::validate_id(&request.id)?;
    let url = cluster::normalize_url(&request.url)?;
    let weight = check_weight(request.weight.unwrap_or(1))?;
    let _job = state.jobs().begin(format!("adding node {}", request.id))?;
    let topology = state.cluster().topology();
    if let Some(existing) = topology.node(&request.id) {
        return Err(ProxyError::Conflict(format!(
            "node {} already exists ({}, {}); remove it first or pick another id",
            existing.id,
            existing.url,
            existing.state.as_str()
        )));
    }
    if let Some(existing) = topology.nodes.iter().find(|n| n.url == url) {
        return Err(ProxyError::Conflict(format!(
            "{url} is already node {}",
            existing.id
        )));
    }
    let node = NodeInfo {
        id: request.id.clone(),
        url,
        state: MemberState::Joining,
        weight,
        next_weight: None,
    };
    fits_the_ring(&topology, &node)?;
    state
        .upstream()
        .call(&node.id, Method::GET, &node.url, "/healthz", None)
        .await?
        .ok(&node.id)?;
    refuse_unclean(&state, &node).await?;
    let set = migrate::known(&state)?;
    let schema = migrate::bring_up_to_date(&state, &node, &set).await?;
    state.cluster().update(|tx| {
        tx.execute(
            "INSERT INTO nodes (id, url, state, weight) VALUES (?1, ?2, 'joining', ?3)",
            rusqlite::params![node.id, node.url, node.weight],
        )?;
        bump_epoch(tx)
    })?;
    tracing::info!(node = %node.id, url = %node.url, "node joining");
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": node.id,
            "url": node.url,
            "state": node.state,
            "weight": node.weight,
            "schema_version": schema.version,
        })),
    )
        .into_response())
}

/// A node's weight: 1 to 1000.
fn check_weight(weight: u32) -> ProxyResult<u32> {
    if weight == 0 || weight > 1000 {
        return Err(ProxyError::BadRequest(format!(
            "weight must be 1 to 1000, not {weight}"
        )));
    }
    Ok(weight)
}

/// A node joins empty, as Redis Cluster's `add-node` insists: no rebalance moves rows off a
/// joining node, so rows it held when it joined would stay where no key routes to them (a key
/// another node owns, or a stale copy of one) and `verify` would count them misplaced for good.
/// It joins with no fence or change capture either: no job of this cluster leaves those on a
/// node that is not a member, and a fence would refuse writes to ranges the node comes to own.
/// The stats call only reads and never claims the node, so a refused node is left as it was.
async fn refuse_unclean(state: &ProxyState, node: &NodeInfo) -> ProxyResult<()> {
    let stats: StatsResponse = state
        .upstream()
        .call(&node.id, Method::GET, &node.url, "/v1/stats", None)
        .await?
        .json(&node.id)?;
    if stats.fences > 0 || stats.capturing {
        return Err(ProxyError::Conflict(format!(
            "the node at {} carries {} fence(s){} from a rebalance that is not this cluster's \
             (its file comes from another cluster); start it on a fresh --db file, then add \
             it again",
            node.url,
            stats.fences,
            if stats.capturing {
                " and change capture"
            } else {
                ""
            }
        )));
    }
    if stats.rows == 0 {
        return Ok(());
    }
    let tables = stats
        .tables
        .iter()
        .filter(|(_, rows)| **rows > 0)
        .map(|(table, rows)| format!("{table}: {rows}"))
        .collect::<Vec<_>>()
        .join(", ");
    Err(ProxyError::Conflict(format!(
        "the node at {} holds {} rows ({tables}); a node joins empty, since no rebalance moves \
         rows off a joining node and rows it brought would belong to no one; start it on a \
         fresh --db file (or delete its rows), then add it again",
        node.url, stats.rows
    )))
}

/// Marks a node `leaving`: the next rebalance drains it, then it leaves. A node still joining
/// owns nothing and leaves at once.
async fn remove_node(
    State(state): State<ProxyState>,
    path: Result<Path<String>, PathRejection>,
    RawBody(raw): RawBody,
) -> ProxyResult<Response> {
    let Path(id) = path?;
    body::options::<NoOptions>(&raw)?;
    let _job = state.jobs().begin(format!("removing node {id}"))?;
    let topology = state.cluster().topology();
    let node = topology
        .node(&id)
        .ok_or_else(|| ProxyError::NotFound(format!("no node {id}")))?
        .clone();
    let new_state = match node.state {
        // Asked again (a retried request, say): already so; nothing changes, the epoch stays.
        MemberState::Leaving => {
            return Ok((
                StatusCode::ACCEPTED,
                Json(json!({ "id": id, "state": "leaving" })),
            )
                .into_response());
        }
        MemberState::Joining => "removed",
        MemberState::Active => {
            let others = topology
                .nodes
                .iter()
                .filter(|n| n.id != id && n.state != MemberState::Leaving)
                .count();
            if others == 0 {
                return Err(ProxyError::Conflict(format!(
                    "{id} is the last node that owns data: add another node before removing it"
                )));
            }
            "leaving"
        }
    };
    state.cluster().update(|tx| {
        if node.state == MemberState::Joining {
            tx.execute("DELETE FROM nodes WHERE id = ?1", [&id])?;
        } else {
            // A pending weight no longer matters: the node gives away all it owns.
            tx.execute(
                "UPDATE nodes SET state = 'leaving', next_weight = NULL WHERE id = ?1",
                [&id],
            )?;
        }
        bump_epoch(tx)
    })?;
    tracing::info!(node = %id, state = new_state, "node removed");
    if node.state == MemberState::Joining {
        // It left at once; it may be added again under any id.
        let (state, node) = (state.clone(), node.clone());
        tokio::spawn(async move { rebalance::release_node(&state, &node.id, &node.url).await });
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "id": id, "state": new_state })),
    )
        .into_response())
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct PatchNodeRequest {
    url: Option<String>,
    #[serde(default)]
    force: bool,
    weight: Option<u32>,
}

/// What a node says it is (`GET /v1/identity` on the node).
#[derive(Deserialize)]
struct NodeIdentity {
    node: Option<String>,
}

/// `PATCH /v1/cluster/nodes/{id}` `{"url"?, "force"?, "weight"?}`: a new address
/// ([`set_node_url`]), a new weight ([`set_node_weight`]), or both. Everything is checked
/// before anything changes; not while a job runs.
async fn patch_node(
    State(state): State<ProxyState>,
    path: Result<Path<String>, PathRejection>,
    JsonBody(request): JsonBody<PatchNodeRequest>,
) -> ProxyResult<Response> {
    let Path(id) = path?;
    let url = request
        .url
        .as_deref()
        .map(cluster::normalize_url)
        .transpose()?;
    let weight = request.weight.map(check_weight).transpose()?;
    match (&url, weight) {
        (None, None) => {
            return Err(ProxyError::BadRequest(
                "give the node's new \"url\" or \"weight\" (or both)".into(),
            ));
        }
        (None, Some(_)) if request.force => {
            return Err(ProxyError::BadRequest(
                "\"force\" only goes with a new \"url\"".into(),
            ));
        }
        _ => {}
    }
    let _job = state.jobs().begin(format!("changing node {id}"))?;
    let topology = state.cluster().topology();
    let node = topology
        .node(&id)
        .ok_or_else(|| ProxyError::NotFound(format!("no node {id}")))?
        .clone();
    let changed = weight.map(|w| reweighted(&node, w)).transpose()?;
    if let Some(changed) = &changed {
        fits_the_ring(&topology, changed)?;
    }
    if let Some(url) = url {
        set_node_url(&state, &topology, &node, &url, request.force).await?;
    }
    if let Some(changed) = &changed {
        set_node_weight(&state, &node, changed)?;
    }
    let node = state
        .cluster()
        .topology()
        .node(&id)
        .cloned()
        .ok_or_else(|| ProxyError::NotFound(format!("no node {id}")))?;
    Ok(Json(node).into_response())
}

/// `node` with `weight` set. A joining node owns nothing yet, so its weight changes at once;
/// an active node's is pending (`next_weight`) until the next rebalance, which moves the rows
/// it gains or loses (the same weight again drops a pending change); a leaving node's no
/// longer matters.
fn reweighted(node: &NodeInfo, weight: u32) -> ProxyResult<NodeInfo> {
    let (now, next) = match node.state {
        MemberState::Joining => (weight, None),
        MemberState::Active => (node.weight, (weight != node.weight).then_some(weight)),
        MemberState::Leaving => {
            return Err(ProxyError::Conflict(format!(
                "{} is leaving: the next rebalance moves all its rows away, whatever its weight",
                node.id
            )));
        }
    };
    Ok(NodeInfo {
        weight: now,
        next_weight: next,
        ..node.clone()
    })
}

/// Checks that the ring after the next rebalance can be built with `changed` in place of the
/// node of its id (or added, if the topology lacks it): the ring has a most points it holds,
/// and a typo'd weight must be refused now, not when the rebalance starts.
fn fits_the_ring(topology: &Topology, changed: &NodeInfo) -> ProxyResult<()> {
    let mut nodes: Vec<NodeInfo> = topology
        .nodes
        .iter()
        .filter(|n| n.id != changed.id)
        .cloned()
        .collect();
    nodes.push(changed.clone());
    let after = Topology::new(topology.epoch, topology.vnodes, nodes)?;
    rebalance::next_ring(&after).map(drop)
}

/// Records `changed`'s weights (see [`reweighted`]) over `node`'s; the plan of the next
/// rebalance changes, so the epoch moves on.
fn set_node_weight(state: &ProxyState, node: &NodeInfo, changed: &NodeInfo) -> ProxyResult<()> {
    if (changed.weight, changed.next_weight) == (node.weight, node.next_weight) {
        return Ok(());
    }
    state.cluster().update(|tx| {
        tx.execute(
            "UPDATE nodes SET weight = ?2, next_weight = ?3 WHERE id = ?1",
            rusqlite::params![node.id, changed.weight, changed.next_weight],
        )?;
        bump_epoch(tx)
    })?;
    tracing::info!(node = %node.id, weight = changed.weight, next_weight = ?changed.next_weight, "node weight set");
    Ok(())
}

/// The node now listens at `url`. Only the address changes (ownership, state and the epoch
/// stay), and only to a node that says it is `id`, or, with `force`, one never claimed as any
/// node; a node that is another member answers 421, which fails the call as a 503 naming it.
async fn set_node_url(
    state: &ProxyState,
    topology: &Topology,
    node: &NodeInfo,
    url: &str,
    force: bool,
) -> ProxyResult<()> {
    let id = node.id.as_str();
    // Another member recorded at this address is only wrong if the node there says it is
    // `id` (addresses swapped: set each right in turn); a never-claimed node there is that
    // member's, as far as anyone knows.
    let other = topology.nodes.iter().find(|n| n.url == url && n.id != id);
    if node.url != url {
        let there: NodeIdentity = state
            .upstream()
            .call(id, Method::GET, url, "/v1/identity", None)
            .await?
            .json(id)?;
        match there.node {
            Some(claimed) if claimed == id => {
                if let Some(other) = other {
                    tracing::warn!(node = %other.id, url = %url, "another node is recorded at the address that node {id} answers on; set its own address next");
                }
            }
            None if other.is_some() => {
                return Err(ProxyError::Conflict(format!(
                    "{url} is node {}'s address, and the node there has never been claimed",
                    other.map_or("?", |o| o.id.as_str())
                )));
            }
            None if force => {}
            None => {
                return Err(ProxyError::Conflict(format!(
                    "the node at {url} has never served as {id}, nor as any node: a fresh file \
                     would own none of {id}'s rows. If it is {id}'s file from before shardlite \
                     knew node ids, pass \"force\": true (`shardlite nodes set-url --force`)"
                )));
            }
            Some(claimed) => {
                // A node answers 421 to a call meant for another; this only guards the logic.
                return Err(ProxyError::Conflict(format!(
                    "the node at {url} is {claimed}, not {id}"
                )));
            }
        }
        state.cluster().set_urls(&[(id, url)])?;
        tracing::info!(node = %id, from = %node.url, to = %url, "node address changed");
    }
    Ok(())
}

/// `?dry_run=true`, or the same in a JSON body (`{"dry_run": true}`).
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RebalanceQuery {
    dry_run: Option<bool>,
}

/// `DELETE /v1/cluster/nodes/{id}` has no options: its body may be empty, `null` or `{}`.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct NoOptions {}

async fn rebalance_status(State(state): State<ProxyState>) -> Json<RebalanceStatus> {
    Json(RebalanceStatus::clone(&state.rebalance_status()))
}

/// Asks the running rebalance to stop (202) if it has not switched ownership yet: it stops at
/// its next step or copy page, lifts the sources' fences and capture, and ends `failed` with the reason
/// [`rebalance::CANCELLED`], every row with its old owner. A job past the switch finishes (409).
async fn cancel_rebalance(
    State(state): State<ProxyState>,
    RawBody(raw): RawBody,
) -> ProxyResult<Response> {
    body::options::<NoOptions>(&raw)?;
    let status = state.rebalance_status();
    if status.state != "running" {
        return Err(ProxyError::Conflict(format!(
            "no rebalance is running (the last one is {}); nothing to cancel",
            status.state
        )));
    }
    if status.phase == Some(rebalance::Phase::Committed) {
        return Err(ProxyError::Conflict(
            "the rebalance has switched ownership already; it finishes deleting the old copies \
             and cannot be cancelled"
                .into(),
        ));
    }
    let id = status
        .id
        .as_deref()
        .expect("a running job's status names the job");
    rebalance::ask_cancel(&state, id)?;
    Ok((StatusCode::ACCEPTED, Json(RebalanceStatus::clone(&status))).into_response())
}

/// Starts a rebalance (202), or with `?dry_run=true` answers the counted plan (200). A body
/// may say `{"dry_run": true}` too: a body is never ignored, since one that asked for a dry run
/// must not start a job.
async fn start_rebalance(
    State(state): State<ProxyState>,
    query: Result<Query<RebalanceQuery>, QueryRejection>,
    RawBody(raw): RawBody,
) -> ProxyResult<Response> {
    let Query(query) = query?;
    let in_body = body::options::<RebalanceQuery>(&raw)?.and_then(|b| b.dry_run);
    let dry_run = match (query.dry_run, in_body) {
        (Some(q), Some(b)) if q != b => {
            return Err(ProxyError::BadRequest(format!(
                "dry_run is {q} in the query and {b} in the body: give it once"
            )));
        }
        (q, b) => q.or(b).unwrap_or(false),
    };
    if dry_run {
        let plan: DryRun = rebalance::dry_run(&state).await?;
        return Ok(Json(plan).into_response());
    }
    let guard = state.jobs().begin("a rebalance")?;
    let status = rebalance::start(&state, guard).await?;
    Ok((StatusCode::ACCEPTED, Json(status)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A joining node's weight changes at once, an active node's is pending (the same weight
    /// again drops the pending change), a leaving node's is refused.
    #[test]
    fn a_weight_change_waits_for_the_rebalance_only_where_rows_move() {
        let weights =
            |node: &NodeInfo, w: u32| reweighted(node, w).map(|n| (n.weight, n.next_weight));
        let joining = NodeInfo::test("j", MemberState::Joining);
        assert_eq!(weights(&joining, 4).unwrap(), (4, None));
        let active = NodeInfo {
            weight: 2,
            next_weight: Some(5),
            ..NodeInfo::test("a", MemberState::Active)
        };
        assert_eq!(weights(&active, 3).unwrap(), (2, Some(3)));
        assert_eq!(weights(&active, 2).unwrap(), (2, None));
        let leaving = NodeInfo::test("l", MemberState::Leaving);
        assert!(matches!(weights(&leaving, 3), Err(ProxyError::Conflict(_))));
        assert!(matches!(check_weight(0), Err(ProxyError::BadRequest(_))));
        assert!(matches!(check_weight(1001), Err(ProxyError::BadRequest(_))));
        assert_eq!(check_weight(1000).unwrap(), 1000);
    }

    /// A weight whose ring would exceed the ring's most points is refused when it is set (or
    /// the node added), not when the rebalance starts.
    #[test]
    fn a_weight_the_ring_cannot_hold_is_refused_up_front() {
        let a = NodeInfo::test("a", MemberState::Active);
        let topology = Topology::new(
            1,
            1 << 15,
            vec![a.clone(), NodeInfo::test("b", MemberState::Active)],
        )
        .unwrap();
        let fits = |node: &NodeInfo, w: u32| fits_the_ring(&topology, &reweighted(node, w)?);
        assert!(fits(&a, 2).is_ok());
        assert!(matches!(fits(&a, 1000), Err(ProxyError::BadRequest(_))));
        let c = NodeInfo::test("c", MemberState::Joining);
        assert!(fits(&c, 3).is_ok(), "a new node of weight 3");
        assert!(matches!(fits(&c, 1000), Err(ProxyError::BadRequest(_))));
    }

    fn report(misplaced: &[(&str, u64)]) -> VerifyResponse {
        VerifyResponse {
            epoch: 1,
            rows_total: 10,
            misplaced: misplaced.iter().map(|(_, n)| n).sum(),
            duplicates: misplaced.iter().map(|(_, n)| n).sum(),
            nodes: misplaced
                .iter()
                .map(|&(id, misplaced)| {
                    let node = NodeVerify {
                        rows: 5,
                        misplaced,
                        examples: Vec::new(),
                    };
                    (id.to_owned(), node)
                })
                .collect(),
            hint: None,
        }
    }

    /// The hint names the one thing that helps: waiting for the job, running one, or a repair
    /// by hand when the rows sit on active nodes, where no rebalance moves them.
    #[test]
    fn verify_advises_by_where_the_misplaced_rows_are() {
        let topology = Topology::new(
            1,
            16,
            vec![
                NodeInfo::test("a", MemberState::Active),
                NodeInfo::test("j", MemberState::Joining),
                NodeInfo::test("l", MemberState::Leaving),
            ],
        )
        .unwrap();
        assert_eq!(
            verify_hint(&report(&[("a", 0), ("j", 0)]), &topology, true),
            None
        );
        let hint = |r, running| verify_hint(&r, &topology, running).unwrap();
        assert!(hint(report(&[("a", 3)]), true).contains("a rebalance is running"));
        assert!(
            hint(report(&[("a", 0), ("j", 2), ("l", 1)]), false)
                .contains("run `shardlite rebalance`")
        );
        let repair = hint(report(&[("a", 3), ("j", 2)]), false);
        assert!(
            repair.starts_with("3 rows on active nodes") && repair.contains("no rebalance moves"),
            "{repair}"
        );
    }
}
