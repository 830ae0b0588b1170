//! The online rebalance: move exactly the rows whose owner changes, while the cluster serves.
//!
//! `docs/rebalance.md` states the protocol and argues why no acknowledged write is lost and no
//! delete comes back. In short, per source node S (a node that owns ranges it will give away):
//!
//! Steps 1–4 run for every source at once; so does the drain under the fence and the clean-up.
//!
//! 1. **Capture** (before any row is read): S installs triggers that log every changed key in
//!    `_shardlite_changes`; the job remembers the log position at that moment.
//! 2. **Purge** the targets' incoming ranges (left-overs of an older job or of a node that was
//!    removed and re-added are how deleted rows come back).
//! 3. **Copy** S's outgoing ranges in primary-key pages to their targets; the cursor is saved in
//!    the job record after every page, so a restart continues where it stopped.
//! 4. **Catch up**: replay logged keys by reading their *current* row on S and upserting it on the
//!    target, or deleting it there if S no longer has it. Idempotent, order-free. Then the
//!    **count check**: S counts its outgoing ranges and hands over the keys logged since, with
//!    their rows, in one snapshot at log position P; once those are applied each target holds
//!    S's state at P, and the counts per (source, target) must match. Writes go on meanwhile.
//! 5. **Fence**: S refuses writes to the outgoing ranges, checked inside its write transaction,
//!    so a write admitted before the fence commits before it and is logged. The proxy holds and
//!    retries writes that hit the fence. Then the log is drained to zero (the changes since P).
//! 6. **Switch**: one transaction on the proxy's state file makes joining nodes active, drops
//!    drained leaving nodes and bumps the epoch: the commit point.
//! 7. **Clean up**: once requests routed by the old topology are done, S drops its triggers and
//!    log, deletes the moved rows, then lifts the fence.
//!
//! The job record (plan, cursors, log positions, phase) is written to the state file before any
//! node is touched and after every step. After a crash the proxy resumes it: before the switch,
//! fences are lifted and copy and catch-up continue from their saved positions; after it, the
//! clean-up is finished. Every node call is idempotent, so repeating a step after a crash is safe.

use crate::cluster::{self, MemberState, NodeInfo, Topology, bump_epoch};
use crate::error::{ProxyError, ProxyResult};
use crate::job::JobGuard;
use crate::server::ProxyState;
use http::Method;
use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use shardlite_node::key::ShardKey;
use shardlite_node::schema::TableSchema;
use shardlite_node::transfer::{
    CaptureResponse, ChangesResponse, CountResponse, FetchResponse, PurgeCursor, PurgeResponse,
    TallyResponse,
};
use shardlite_ring::{Member, NodeId, Ring, diff, hash_key};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Rows scanned per copy page (the node's maximum; about 1/N of them move).
const COPY_PAGE: usize = 20_000;
/// Logged changes read per catch-up round.
const CHANGES_PAGE: usize = 5000;
/// Below this backlog per source, catch-up stops and the fence goes up.
const FENCE_BACKLOG: usize = 1000;
/// Keys fetched from a source per call.
const FETCH_CHUNK: usize = 5000;
/// Rows deleted per purge call: each call is one write transaction that client writes on that
/// node wait behind, and the next client commit syncs the pages it dirtied, so it is kept
/// short. The moved rows are scattered: 2,000 of them dirty most of a source's key index
/// (about 6 MB), and client writes then waited up to 160-270 ms for their commit; with 500
/// the longest was 60-100 ms and the clean-up took about as long (docs/rebalance.md; both
/// without the rests of [`MAX_CLEANUP_REST`], which came later).
const PURGE_PAGE: usize = 500;
/// How often the clean-up saves each source's purge position (and its count) in the job
/// record. Saving after every page stretched the clean-up from 2.5 to 3.4 s in the rebalance
/// bench (each save syncs the state file while the nodes write hard); a proxy restart
/// re-reads at most this much of the walk.
const CLEANUP_SAVE_EVERY: Duration = Duration::from_millis(500);
/// The clean-up rests after each purge page for as long as the page took (up to this), so a
/// source's disk spends at most about half its time on deleting copies that no one reads, and
/// client writes there find it less busy. A slow page (a busy disk) earns a longer rest. It
/// does not rest while the node answers no client writes (its write count stands still from
/// one page to the next): no one waits then.
const MAX_CLEANUP_REST: Duration = Duration::from_millis(100);
/// The error of a job stopped by `DELETE /v1/cluster/rebalance`.
pub const CANCELLED: &str = "cancelled before the switch; every row stays with its old owner";
/// Pause between retries after a node failed.
const RETRY_DELAY: Duration = Duration::from_millis(300);

/// Where a job stands. Stored in the job record.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Capture, purge, copy and catch-up; no fence is up (after a restart, fences are lifted).
    Copy,
    /// Fences are (or may be) up on the sources; the log is being drained.
    Fenced,
    /// Ownership switched; sources are being cleaned up.
    Committed,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Running,
    Done,
    Failed,
}

/// One hash range leaving a source, and where it goes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Range {
    pub start: u32,
    pub end: u32,
    pub to: String,
}

/// The copy position in one table of one source.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Cursor {
    /// The last key scanned (null before the first page).
    pub after: Value,
    pub done: bool,
}

/// A node that gives rows away, and how far the job got with it.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Source {
    pub id: String,
    pub url: String,
    /// Sorted by start, never overlapping.
    pub ranges: Vec<Range>,
    /// Capture is on and `applied_seq` holds the log position it started at.
    pub capturing: bool,
    /// The targets' incoming ranges from this source have been purged.
    pub purged: bool,
    pub copy: BTreeMap<String, Cursor>,
    /// Every logged change up to here has been applied to the targets.
    pub applied_seq: i64,
    /// How far the clean-up got, saved every 500 ms (`CLEANUP_SAVE_EVERY`), so that a proxy
    /// restart goes on from there instead of walking the source's tables again from the start.
    #[serde(default)]
    pub cleaning: Option<PurgeAt>,
    /// Clean-up finished (after the switch).
    pub cleaned: bool,
}

/// Where a purge goes on: after `after` (from the first row when `None`), against the node
/// process `instance` that answered there. Against another process it starts over: pages
/// that process answered may be undone.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PurgeAt {
    pub after: Option<PurgeCursor>,
    pub instance: String,
}

impl Source {
    /// The target of a ring position, if it leaves this source.
    fn target_of(&self, point: u32) -> Option<&str> {
        let i = self.ranges.partition_point(|r| r.end < point);
        self.ranges
            .get(i)
            .filter(|r| r.start <= point)
            .map(|r| r.to.as_str())
    }

    fn spans(&self) -> Vec<[u32; 2]> {
        self.ranges.iter().map(|r| [r.start, r.end]).collect()
    }

    fn spans_to(&self, target: &str) -> Vec<[u32; 2]> {
        self.ranges
            .iter()
            .filter(|r| r.to == target)
            .map(|r| [r.start, r.end])
            .collect()
    }

    fn targets(&self) -> Vec<&str> {
        let mut targets: Vec<&str> = self.ranges.iter().map(|r| r.to.as_str()).collect();
        targets.sort_unstable();
        targets.dedup();
        targets
    }
}

/// The job record, stored as JSON in the state file's `jobs` table.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Job {
    pub id: String,
    pub state: JobState,
    pub phase: Phase,
    /// The epoch the plan was made at; the switch bumps it.
    pub from_epoch: u64,
    /// Every node of the topology the plan was made from (URLs for the calls).
    pub nodes: Vec<NodeInfo>,
    pub tables: Vec<TableSchema>,
    pub sources: Vec<Source>,
    pub rows_to_move: u64,
    pub rows_moved: u64,
    /// Old copies the sources deleted after the switch (the clean-up's progress). Saved with
    /// each source's purge position, so a proxy restart in the clean-up goes on counting from
    /// there; what the nodes deleted after the last save (at most 500 ms of pages per source)
    /// is not counted again.
    #[serde(default)]
    pub rows_cleaned: u64,
    /// The longest time a fence was up, in milliseconds (the write pause of moving keys).
    pub pause_ms: u64,
    pub error: Option<String>,
}

/// What `GET /v1/cluster/rebalance` reports.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RebalanceStatus {
    /// idle, running, done or failed.
    pub state: String,
    pub rows_moved: u64,
    pub rows_to_move: u64,
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<u64>,
    /// Old copies deleted by the clean-up after the switch (phase `committed`), so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_cleaned: Option<u64>,
}

impl RebalanceStatus {
    pub fn idle() -> RebalanceStatus {
        RebalanceStatus {
            state: "idle".into(),
            rows_moved: 0,
            rows_to_move: 0,
            error: None,
            id: None,
            phase: None,
            pause_ms: None,
            rows_cleaned: None,
        }
    }

    fn of(job: &Job) -> RebalanceStatus {
        RebalanceStatus {
            state: match job.state {
                JobState::Running => "running",
                JobState::Done => "done",
                JobState::Failed => "failed",
            }
            .into(),
            rows_moved: job.rows_moved,
            rows_to_move: job.rows_to_move,
            error: job.error.clone(),
            id: Some(job.id.clone()),
            phase: Some(job.phase),
            pause_ms: Some(job.pause_ms),
            rows_cleaned: Some(job.rows_cleaned),
        }
    }
}

/// One (from, to) pair of the plan.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PlannedMove {
    pub from: String,
    pub to: String,
    pub rows: u64,
}

/// The dry-run answer.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct DryRun {
    pub rows_total: u64,
    pub rows_to_move: u64,
    pub moves: Vec<PlannedMove>,
    /// Nodes that become active, and nodes that leave, when the job completes.
    pub joining: Vec<String>,
    pub leaving: Vec<String>,
    /// Active nodes whose weight changes when the job completes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weights: Vec<WeightChange>,
    /// Each node's share of the ring now and once the job is done (0 for a node that owns
    /// nothing then), by id.
    #[serde(default)]
    pub shares: BTreeMap<String, ShareChange>,
}

/// A node's share of the ring (a fraction of 1) now and after the job.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
pub struct ShareChange {
    pub now: f64,
    pub after: f64,
}

/// An active node's pending weight, in the dry run.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct WeightChange {
    pub id: String,
    pub weight: u32,
    pub next_weight: u32,
}

/// The ring after the job: active and joining nodes, without leaving ones, each with the
/// weight it has after the job.
pub fn next_ring(topology: &Topology) -> ProxyResult<Ring> {
    let members: Vec<Member> = topology
        .nodes
        .iter()
        .filter(|n| n.state != MemberState::Leaving)
        .map(|n| Member {
            id: NodeId::new(n.id.clone()),
            weight: n.weight_after(),
        })
        .collect();
    if members.is_empty() && !topology.ring.is_empty() {
        return Err(ProxyError::Conflict(
            "every node is leaving: the rows would have nowhere to go; add a node first".into(),
        ));
    }
    Ring::new(members, topology.vnodes)
        .map_err(|e| ProxyError::BadRequest(format!("invalid membership: {e}")))
}

/// The sources and their outgoing ranges, from the ring diff.
fn sources(topology: &Topology, next: &Ring) -> Vec<Source> {
    let mut by_source: BTreeMap<String, Vec<Range>> = BTreeMap::new();
    for m in diff(&topology.ring, next) {
        by_source
            .entry(m.from.as_str().to_owned())
            .or_default()
            .push(Range {
                start: m.start,
                end: m.end,
                to: m.to.as_str().to_owned(),
            });
    }
    by_source
        .into_iter()
        .map(|(id, ranges)| Source {
            url: topology
                .node(&id)
                .map(|n| n.url.clone())
                .unwrap_or_default(),
            id,
            ranges,
            capturing: false,
            purged: false,
            copy: BTreeMap::new(),
            applied_seq: 0,
            cleaning: None,
            cleaned: false,
        })
        .collect()
}

/// Counts, on every node that owns data now, the rows of each outgoing range: exact, not
/// estimated.
async fn count(
    state: &ProxyState,
    topology: &Topology,
    sources: &[Source],
) -> ProxyResult<(u64, Vec<PlannedMove>)> {
    let owners: Vec<&NodeInfo> = topology
        .nodes
        .iter()
        .filter(|n| n.state != MemberState::Joining)
        .collect();
    let calls = owners.iter().map(|node| async move {
        let source = sources.iter().find(|s| s.id == node.id);
        let spans = source.map(Source::spans).unwrap_or_default();
        let counted: CountResponse = call_as(
            state,
            &node.id,
            &node.url,
            Method::POST,
            "/v1/transfer/count",
            Some(json!({ "ranges": spans })),
        )
        .await?;
        let mut moves: BTreeMap<String, u64> = BTreeMap::new();
        if let Some(source) = source {
            for (range, n) in source.ranges.iter().zip(counted.counts) {
                *moves.entry(range.to.clone()).or_default() += n;
            }
        }
        Ok::<_, ProxyError>((node.id.clone(), counted.rows_total, moves))
    });
    let mut rows_total = 0;
    let mut planned = Vec::new();
    for result in futures::future::join_all(calls).await {
        let (from, total, moves) = result?;
        rows_total += total;
        planned.extend(moves.into_iter().map(|(to, rows)| PlannedMove {
            from: from.clone(),
            to,
            rows,
        }));
    }
    Ok((rows_total, planned))
}

/// The plan, counted; changes nothing.
pub async fn dry_run(state: &ProxyState) -> ProxyResult<DryRun> {
    let topology = state.cluster().topology();
    let next = next_ring(&topology)?;
    let sources = sources(&topology, &next);
    let (rows_total, moves) = count(state, &topology, &sources).await?;
    let (now, after) = (
        cluster::shares_by_id(&topology.ring),
        cluster::shares_by_id(&next),
    );
    let shares = topology
        .nodes
        .iter()
        .map(|n| {
            let change = ShareChange {
                now: now.get(&n.id).copied().unwrap_or(0.0),
                after: after.get(&n.id).copied().unwrap_or(0.0),
            };
            (n.id.clone(), change)
        })
        .collect();
    Ok(DryRun {
        rows_total,
        rows_to_move: moves.iter().map(|m| m.rows).sum(),
        moves,
        joining: ids_in(&topology, MemberState::Joining),
        leaving: ids_in(&topology, MemberState::Leaving),
        weights: topology
            .nodes
            .iter()
            .filter_map(|n| {
                Some(WeightChange {
                    id: n.id.clone(),
                    weight: n.weight,
                    next_weight: n.next_weight?,
                })
            })
            .collect(),
        shares,
    })
}

fn ids_in(topology: &Topology, wanted: MemberState) -> Vec<String> {
    topology
        .nodes
        .iter()
        .filter(|n| n.state == wanted)
        .map(|n| n.id.clone())
        .collect()
}

/// Plans a job, records it, and starts it in the background. The caller holds the job slot.
pub async fn start(state: &ProxyState, guard: JobGuard) -> ProxyResult<RebalanceStatus> {
    let topology = state.cluster().topology();
    let next = next_ring(&topology)?;
    let sources = sources(&topology, &next);
    let (_, moves) = count(state, &topology, &sources).await?;
    state
        .schema()
        .refresh(&topology, state.upstream())
        .await
        .or_else(|e| {
            // A cluster whose nodes are all new has no schema source yet; nothing moves then.
            if sources.is_empty() { Ok(()) } else { Err(e) }
        })?;
    let job = Job {
        id: format!("rebalance-{}-{}", topology.epoch, unix_millis()),
        state: JobState::Running,
        phase: Phase::Copy,
        from_epoch: topology.epoch,
        nodes: topology.nodes.clone(),
        tables: state
            .schema()
            .all()
            .iter()
            .map(|t| TableSchema::clone(t))
            .collect(),
        sources,
        rows_to_move: moves.iter().map(|m| m.rows).sum(),
        rows_moved: 0,
        rows_cleaned: 0,
        pause_ms: 0,
        error: None,
    };
    save(state, &job)?;
    let status = RebalanceStatus::of(&job);
    spawn(state.clone(), job, guard);
    Ok(status)
}

/// Resumes a job that a crash cut off; called once when the proxy starts serving.
pub fn resume(state: &ProxyState) -> ProxyResult<()> {
    let Some(mut job) = load_latest(state)? else {
        return Ok(());
    };
    if job.state == JobState::Running && follow_moved_nodes(&mut job, &state.cluster().topology()) {
        save(state, &job)?;
    }
    state.publish_rebalance(RebalanceStatus::of(&job));
    if job.state == JobState::Running {
        let guard = state.jobs().begin(format!("rebalance {}", job.id))?;
        tracing::info!(job = %job.id, phase = ?job.phase, "resuming the rebalance");
        spawn(state.clone(), job, guard);
    }
    Ok(())
}

/// A job names its nodes by id and keeps their URLs for its calls; a node the topology now
/// has at another URL (`shardlite dev` started on other ports) is called there. Whether any
/// URL changed.
fn follow_moved_nodes(job: &mut Job, topology: &Topology) -> bool {
    let mut changed = false;
    let urls = job
        .nodes
        .iter_mut()
        .map(|n| (&n.id, &mut n.url))
        .chain(job.sources.iter_mut().map(|s| (&s.id, &mut s.url)));
    for (id, url) in urls {
        if let Some(now) = topology.node(id).filter(|n| n.url != *url) {
            url.clone_from(&now.url);
            changed = true;
        }
    }
    changed
}

fn spawn(state: ProxyState, job: Job, guard: JobGuard) {
    tokio::spawn(async move {
        let ended = run(&state, job).await;
        // The end is published as the slot is freed: a client that reads `done` or `failed`
        // can start the next job at once (before, releasing departed nodes and dropping the
        // cancel came in between, and a rebalance asked for then got 409).
        guard.finish(|| state.publish_rebalance(RebalanceStatus::of(&ended)));
    });
}

/// The `meta` key of the state file that names the job a user asked to stop.
const CANCEL_KEY: &str = "rebalance_cancel";

/// Asks job `id` to stop at its next step or copy page (see `DELETE /v1/cluster/rebalance`).
/// The ask lives only in the state file, where the job reads it between its steps and after
/// every page of the copy phase ([`Moving::stop_if_cancelled`]), so a proxy that crashes
/// before the job read it stops the job when it resumes it: an answered cancel is never lost.
/// It names its job, so one that arrives as a job ends never stops the next. Whether the job
/// still stops depends only on whether it has switched by then.
pub fn ask_cancel(state: &ProxyState, id: &str) -> ProxyResult<()> {
    state.cluster().write(|tx| {
        tx.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![CANCEL_KEY, id],
        )?;
        Ok(())
    })
}

/// Whether the state file holds a cancel asked of job `id`.
fn cancel_recorded(state: &ProxyState, id: &str) -> ProxyResult<bool> {
    state.cluster().read(|conn| {
        Ok(conn
            .query_row(
                "SELECT 1 FROM meta WHERE key = ?1 AND value = ?2",
                params![CANCEL_KEY, id],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    })
}

/// Forgets a cancel once the job has acted on it (or is past its switch and ignores it). If
/// the state file cannot drop it, it stays there naming this job only, which no other job
/// reads as its own.
fn forget_cancel(state: &ProxyState, id: &str) {
    let forgotten = state.cluster().write(|tx| {
        tx.execute(
            "DELETE FROM meta WHERE key = ?1 AND value = ?2",
            params![CANCEL_KEY, id],
        )?;
        Ok(())
    });
    if let Err(e) = forgotten {
        tracing::warn!(job = id, error = %e.message(), "cannot drop the cancel from the state file");
    }
}

fn unix_millis() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

fn save(state: &ProxyState, job: &Job) -> ProxyResult<()> {
    record(state, job)?;
    state.publish_rebalance(RebalanceStatus::of(job));
    Ok(())
}

/// Writes the job record without publishing it: for the end of a job, which [`spawn`]
/// publishes as it frees the job slot.
fn record(state: &ProxyState, job: &Job) -> ProxyResult<()> {
    let body = serde_json::to_string(job).expect("a job serializes");
    state.cluster().write(|tx| {
        tx.execute(
            "INSERT INTO jobs (id, state, body) VALUES (?1, ?2, ?3)
             ON CONFLICT (id) DO UPDATE SET state = excluded.state, body = excluded.body",
            params![job.id, format!("{:?}", job.state).to_lowercase(), body],
        )?;
        Ok(())
    })
}

fn load_latest(state: &ProxyState) -> ProxyResult<Option<Job>> {
    let body: Option<String> = state.cluster().read(|conn| {
        Ok(conn
            .query_row(
                "SELECT body FROM jobs ORDER BY rowid DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?)
    })?;
    body.map(|b| {
        serde_json::from_str(&b).map_err(|e| {
            ProxyError::Conflict(format!(
                "the state file holds a job this proxy cannot read: {e}"
            ))
        })
    })
    .transpose()
}

/// The test hook's pause (see `ProxyConfig::rebalance_step_pause`); nothing in production.
async fn step_pause(state: &ProxyState) {
    let pause = state.config().rebalance_step_pause;
    if !pause.is_zero() {
        tokio::time::sleep(pause).await;
    }
}

/// Whether an error is worth retrying (a node down or slow) or ends the job.
fn transient(error: &ProxyError) -> bool {
    matches!(
        error,
        ProxyError::ShardUnavailable { .. }
            | ProxyError::ShardBrokeOff { .. }
            | ProxyError::ShardTimeout { .. }
    ) || matches!(error, ProxyError::Node { status, .. } if status.is_server_error())
}

/// Runs the job to its end and returns it as recorded then (done or failed); the caller
/// publishes that.
async fn run(state: &ProxyState, mut job: Job) -> Job {
    let started = Instant::now();
    let mut failures = 0u32;
    loop {
        // A state file that cannot be read fails the step below as well; it is not a cancel.
        if cancel_recorded(state, &job.id).unwrap_or(false) {
            if job.phase == Phase::Committed {
                // Past the switch the targets own the rows: the job finishes its clean-up.
                forget_cancel(state, &job.id);
            } else {
                abandon(state, &mut job, CANCELLED.to_owned()).await;
                forget_cancel(state, &job.id);
                return job;
            }
        }
        let outcome = match job.phase {
            Phase::Copy => copy_phase(state, &mut job).await,
            Phase::Fenced => fenced_phase(state, &mut job).await,
            Phase::Committed => cleanup_phase(state, &mut job).await,
        };
        match outcome {
            Ok(true) => {
                job.state = JobState::Done;
                job.error = None;
                if let Err(e) = record(state, &job) {
                    tracing::error!(job = %job.id, error = %e, "cannot record the finished job");
                }
                let topology = state.cluster().topology();
                for node in job.nodes.iter().filter(|n| topology.node(&n.id).is_none()) {
                    release_node(state, &node.id, &node.url).await;
                }
                tracing::info!(
                    job = %job.id,
                    rows = job.rows_moved,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    pause_ms = job.pause_ms,
                    "rebalance done"
                );
                return job;
            }
            Ok(false) => failures = 0,
            Err(error) => {
                failures += 1;
                let message = error.message();
                tracing::warn!(job = %job.id, phase = ?job.phase, error = %message, "rebalance step failed");
                if job.phase == Phase::Fenced {
                    // Back to catching up; the fence goes up again once the source answers.
                    job.phase = Phase::Copy;
                }
                if !transient(&error) && job.phase != Phase::Committed && failures >= 3 {
                    let reason = match &error {
                        // A node that lacks a table: a node replaced by an empty one, say.
                        ProxyError::Node { node, status, .. }
                            if *status == http::StatusCode::NOT_FOUND =>
                        {
                            format!(
                                "node {node}: {message}: its schema is behind the cluster's; run \
                                 `shardlite migrate`, then `shardlite rebalance` again"
                            )
                        }
                        _ => message,
                    };
                    abandon(state, &mut job, reason).await;
                    return job;
                }
                job.error = Some(format!("retrying: {message}"));
                let _ = save(state, &job);
                tokio::time::sleep(RETRY_DELAY).await;
            }
        }
    }
}

/// Tells a node that left the topology to forget which member it was, so it can be added
/// again under any id (see `shardlite_node::identity`). Best effort: a node that does not
/// answer keeps its id, and can come back only under it (or from a fresh file).
pub(crate) async fn release_node(state: &ProxyState, id: &str, url: &str) {
    if let Err(e) = send(state, id, url, Method::DELETE, "/v1/identity", None).await {
        tracing::warn!(node = id, error = %e.message(), "cannot release the node that left; it keeps its id");
    }
}

/// Gives up before the switch: the sources still own everything; lift their fences and drop
/// their capture. A source that does not answer is asked again until it does, since a fence
/// left up there would refuse writes to rows it still owns (the job keeps its slot meanwhile,
/// so no other job starts). Then the targets' copies are deleted, once each, so that `verify`
/// finds no row twice: a target that does not answer keeps them (they are outside what it
/// owns, no read reaches them, and a later job purges them before it copies).
async fn abandon(state: &ProxyState, job: &mut Job, reason: String) {
    for source in job.sources.clone() {
        while let Err(e) = async {
            lift_fence(state, &source).await?;
            drop_capture(state, &source).await
        }
        .await
        {
            job.error = Some(format!(
                "stopping ({reason}): retrying: cannot lift the fence and capture on {}: {}",
                source.id,
                e.message()
            ));
            let _ = save(state, job);
            tokio::time::sleep(RETRY_DELAY).await;
        }
    }
    for source in &job.sources {
        for target in source.targets() {
            let Some(node) = job.nodes.iter().find(|n| n.id == target) else {
                continue;
            };
            let spans = source.spans_to(target);
            if let Err(e) =
                purge(state, target, &node.url, &spans, None, false, |_, _| Ok(())).await
            {
                tracing::warn!(job = %job.id, node = target, error = %e.message(), "cannot delete a stopped job's copies; a later job purges them");
            }
        }
    }
    job.state = JobState::Failed;
    job.error = Some(reason);
    let _ = record(state, job);
    tracing::error!(job = %job.id, error = ?job.error, "rebalance failed; ownership unchanged");
}

/// A call whose answer carries nothing the job needs: only its success counts.
async fn send(
    state: &ProxyState,
    id: &str,
    url: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> ProxyResult<()> {
    call_as::<serde::de::IgnoredAny>(state, id, url, method, path, body)
        .await
        .map(drop)
}

/// A call to a node, its answer read as `T`: a malformed answer is an error, never a default.
async fn call_as<T: serde::de::DeserializeOwned>(
    state: &ProxyState,
    id: &str,
    url: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> ProxyResult<T> {
    let body = body.map(|b| serde_json::to_vec(&b).expect("JSON serializes").into());
    state
        .upstream()
        .call(id, method, url, path, body)
        .await?
        .json(id)
}

/// The routing text's ring position of a key of `table`.
fn position(table: &TableSchema, key: &Value) -> ProxyResult<u32> {
    let key =
        ShardKey::from_json(key, table.key_affinity).map_err(|e| ProxyError::BadNodeAnswer {
            node: "source".into(),
            reason: format!("a stored key of {} is not routable: {e}", table.name),
        })?;
    Ok(hash_key(&key.routing_text()))
}

/// Rows (full objects) grouped by the target of their key.
fn by_target<'a>(
    source: &'a Source,
    table: &TableSchema,
    rows: Vec<Value>,
) -> ProxyResult<HashMap<&'a str, Vec<Value>>> {
    let mut groups: HashMap<&str, Vec<Value>> = HashMap::new();
    for row in rows {
        let key = row.get(&table.key).cloned().unwrap_or(Value::Null);
        if let Some(target) = source.target_of(position(table, &key)?) {
            groups.entry(target).or_default().push(row);
        }
    }
    Ok(groups)
}

/// Turns the source's change capture off (its triggers and log go).
async fn drop_capture(state: &ProxyState, source: &Source) -> ProxyResult<()> {
    send(
        state,
        &source.id,
        &source.url,
        Method::DELETE,
        "/v1/transfer/capture",
        None,
    )
    .await
}

async fn lift_fence(state: &ProxyState, source: &Source) -> ProxyResult<()> {
    send(
        state,
        &source.id,
        &source.url,
        Method::DELETE,
        "/v1/transfer/fences",
        None,
    )
    .await
}

/// A phase in which every source moves at once. The sources' futures are polled by one task
/// (`join_all`), so the lock is never contended and never held across an `.await`; each
/// source's progress is saved in the job record as soon as it is made.
struct Moving<'a> {
    state: &'a ProxyState,
    job: Mutex<Job>,
    /// Fixed for the whole job: the plan's nodes and tables.
    nodes: Vec<NodeInfo>,
    tables: Vec<TableSchema>,
    /// Whether a cancel stops this phase between its pages (the copy phase: a copy of many
    /// rows runs for minutes, and a cancel must not wait for all of it).
    cancellable: bool,
}

impl<'a> Moving<'a> {
    fn new(state: &'a ProxyState, job: &Job) -> Moving<'a> {
        Moving {
            state,
            nodes: job.nodes.clone(),
            tables: job.tables.clone(),
            job: Mutex::new(job.clone()),
            cancellable: false,
        }
    }

    /// A [`Moving`] that a cancel stops between pages: see [`Moving::stop_if_cancelled`].
    fn cancellable(state: &'a ProxyState, job: &Job) -> Moving<'a> {
        Moving {
            cancellable: true,
            ..Moving::new(state, job)
        }
    }

    /// In a cancellable phase, fails the step of a source once the job's cancel is recorded,
    /// so that every source stops at its next page instead of at the end of the phase. What
    /// was done is saved; the run loop then reads the cancel and stops the job.
    fn stop_if_cancelled(&self) -> ProxyResult<()> {
        if !self.cancellable {
            return Ok(());
        }
        let id = self.lock().id.clone();
        if cancel_recorded(self.state, &id)? {
            return Err(ProxyError::Conflict(CANCELLED.to_owned()));
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Job> {
        // Only this task takes the lock and it never panics while holding it.
        self.job.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn source(&self, s: usize) -> Source {
        self.lock().sources[s].clone()
    }

    /// Changes the job and saves it, in one step; then, in a cancellable phase, stops if the
    /// job was cancelled (every page of a source's work ends in an update).
    fn update(&self, change: impl FnOnce(&mut Job)) -> ProxyResult<()> {
        {
            let mut job = self.lock();
            change(&mut job);
            save(self.state, &job)?;
        }
        self.stop_if_cancelled()
    }

    /// [`Moving::update`] for progress only: published to `GET /v1/cluster/rebalance` at once,
    /// saved with the next update.
    fn publish(&self, change: impl FnOnce(&mut Job)) {
        let mut job = self.lock();
        change(&mut job);
        self.state.publish_rebalance(RebalanceStatus::of(&job));
    }

    fn url(&self, id: &str) -> ProxyResult<&str> {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .map(|n| n.url.as_str())
            .ok_or_else(|| ProxyError::Conflict(format!("node {id} is not part of the job")))
    }

    fn table(&self, name: &str) -> Option<&TableSchema> {
        self.tables.iter().find(|t| t.name == name)
    }

    fn into_job(self) -> Job {
        self.job
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `step` for every source at once; every source gets as far as it can even when
    /// another fails. The first error is returned.
    async fn each_source<F, Fut>(&self, step: F) -> ProxyResult<()>
    where
        F: Fn(usize) -> Fut,
        Fut: Future<Output = ProxyResult<()>>,
    {
        let n = self.lock().sources.len();
        futures::future::join_all((0..n).map(step))
            .await
            .into_iter()
            .collect()
    }

    async fn apply(
        &self,
        target: &str,
        table: &str,
        upserts: Vec<Value>,
        deletes: Vec<Value>,
    ) -> ProxyResult<()> {
        send(
            self.state,
            target,
            self.url(target)?,
            Method::POST,
            "/v1/transfer/apply",
            Some(json!({ "table": table, "upserts": upserts, "deletes": deletes })),
        )
        .await
    }
}

/// Capture, purge, copy, catch up and the count check, every source at once; then the job
/// goes on to the fence. Returns `Ok(false)` to go on.
async fn copy_phase(state: &ProxyState, job: &mut Job) -> ProxyResult<bool> {
    // After a restart or a failed fence, fences may still be up: lift them first.
    let lifts = job.sources.iter().map(|source| lift_fence(state, source));
    for lifted in futures::future::join_all(lifts).await {
        lifted?;
    }
    let moving = Moving::cancellable(state, job);
    let prepared = moving.each_source(|s| prepare_source(&moving, s)).await;
    *job = moving.into_job();
    if cancel_recorded(state, &job.id)? {
        // The run loop reads the cancel before the next phase and stops the job.
        return Ok(false);
    }
    prepared?;
    job.phase = Phase::Fenced;
    job.error = None;
    save(state, job)?;
    Ok(false)
}

/// Everything before the fence for one source, each step skipped if the record says it is done.
async fn prepare_source(moving: &Moving<'_>, s: usize) -> ProxyResult<()> {
    let state = moving.state;
    let source = moving.source(s);
    if !source.capturing {
        let on: CaptureResponse = call_as(
            state,
            &source.id,
            &source.url,
            Method::POST,
            "/v1/transfer/capture",
            Some(json!({})),
        )
        .await?;
        moving.update(|job| {
            let source = &mut job.sources[s];
            source.applied_seq = on.max_seq;
            source.capturing = true;
        })?;
    }
    if !moving.source(s).purged {
        for target in source.targets() {
            purge(
                state,
                target,
                moving.url(target)?,
                &source.spans_to(target),
                None,
                // Leftovers of an earlier try, on a node that owns none of them: the copy waits.
                false,
                |_, _| moving.stop_if_cancelled(),
            )
            .await?;
        }
        moving.update(|job| job.sources[s].purged = true)?;
    }
    copy_source(moving, s).await?;
    catch_up(moving, s, false).await?;
    check_counts(moving, s).await
}

/// Deletes every row of `spans` on a node, page by page, going on from `from` if given; each
/// page is one short write transaction there, and the cursor makes the whole purge one pass
/// over the keys. After every page `on_page` gets the rows it deleted and where the purge goes
/// on (`None` once it is done). `paced` (the clean-up) rests after each page as long as the
/// page took, up to [`MAX_CLEANUP_REST`].
///
/// A node commits the pages before the last without a sync of their own, so a crash of its
/// machine can undo pages it already answered; that always restarts the node's process, which
/// then answers with another `instance`. The purge then starts over from the first key, so no
/// undone page is skipped. The last page is synced, so `done` is durable.
async fn purge(
    state: &ProxyState,
    id: &str,
    url: &str,
    spans: &[[u32; 2]],
    from: Option<PurgeAt>,
    paced: bool,
    on_page: impl Fn(u64, Option<&PurgeAt>) -> ProxyResult<()>,
) -> ProxyResult<()> {
    let mut at = from;
    // The node's client write count after the previous page (see MAX_CLEANUP_REST).
    let mut writes_before: Option<u64> = None;
    loop {
        let started = Instant::now();
        let after = at.as_ref().and_then(|at| at.after.clone());
        let page: PurgeResponse = call_as(
            state,
            id,
            url,
            Method::POST,
            "/v1/transfer/purge",
            Some(json!({ "ranges": spans, "limit": PURGE_PAGE, "after": after })),
        )
        .await?;
        let restarted = at.as_ref().is_some_and(|at| at.instance != page.instance);
        if page.done && !restarted {
            return on_page(page.deleted, None);
        }
        let after = if restarted {
            tracing::info!(
                node = id,
                "the node restarted during a purge; starting it over"
            );
            None
        } else {
            // A page that is not done always says where to go on; one that does not would
            // start over from the beginning, and never end.
            Some(page.next.ok_or_else(|| ProxyError::BadNodeAnswer {
                node: id.to_owned(),
                reason: "a purge page that is not done has no cursor".into(),
            })?)
        };
        let next = PurgeAt {
            after,
            instance: page.instance,
        };
        on_page(page.deleted, Some(&next))?;
        at = Some(next);
        let idle = !restarted && page.writes.is_some() && page.writes == writes_before;
        writes_before = page.writes;
        if paced && !idle {
            tokio::time::sleep(started.elapsed().min(MAX_CLEANUP_REST)).await;
        }
    }
}

#[derive(Deserialize)]
struct ScanPage {
    /// Rows as the source sent them: forwarded without building a JSON tree when they all go
    /// to one target.
    rows: Vec<Box<serde_json::value::RawValue>>,
    next: Option<Value>,
}

async fn scan(
    state: &ProxyState,
    source: &Source,
    table: &str,
    after: &Value,
) -> ProxyResult<ScanPage> {
    call_as(
        state,
        &source.id,
        &source.url,
        Method::POST,
        "/v1/transfer/scan",
        Some(json!({
            "table": table,
            "after": after,
            "limit": COPY_PAGE,
            "ranges": source.spans(),
        })),
    )
    .await
}

/// Upserts a page of scanned rows on their targets.
async fn apply_page(
    moving: &Moving<'_>,
    source: &Source,
    table: &TableSchema,
    rows: Vec<Box<serde_json::value::RawValue>>,
) -> ProxyResult<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let targets = source.targets();
    if let [target] = targets.as_slice() {
        // Every row of this source goes to one node: splice the rows through untouched.
        let head = format!(
            "{{\"table\":{},\"deletes\":[],\"upserts\":[",
            serde_json::to_string(&table.name).expect("a string serializes")
        );
        let body = crate::body::splice(&head, rows.iter().map(|r| r.get()), "]}");
        return moving
            .state
            .upstream()
            .call(
                target,
                Method::POST,
                moving.url(target)?,
                "/v1/transfer/apply",
                Some(body),
            )
            .await?
            .ok(target)
            .map(drop);
    }
    let rows = rows
        .iter()
        .map(|r| serde_json::from_str::<Value>(r.get()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ProxyError::BadNodeAnswer {
            node: source.id.clone(),
            reason: e.to_string(),
        })?;
    let groups = by_target(source, table, rows)?;
    let applies = groups
        .into_iter()
        .map(|(target, rows)| moving.apply(target, &table.name, rows, Vec::new()));
    for result in futures::future::join_all(applies).await {
        result?;
    }
    Ok(())
}

/// Copies one source's outgoing ranges page by page, saving the cursor after each page. The
/// next page is read from the source while the current one is written to its target.
async fn copy_source(moving: &Moving<'_>, s: usize) -> ProxyResult<()> {
    let state = moving.state;
    let source = moving.source(s);
    for table in &moving.tables {
        let cursor = source.copy.get(&table.name).cloned().unwrap_or_default();
        if cursor.done {
            continue;
        }
        let mut page = scan(state, &source, &table.name, &cursor.after).await?;
        loop {
            let next = match page.next.take() {
                Some(next) if !next.is_null() => Cursor {
                    after: next,
                    done: false,
                },
                _ => Cursor {
                    after: Value::Null,
                    done: true,
                },
            };
            let copied = page.rows.len() as u64;
            let rows = std::mem::take(&mut page.rows);
            let (applied, prefetched) = if next.done {
                (apply_page(moving, &source, table, rows).await, None)
            } else {
                let (applied, prefetched) = tokio::join!(
                    apply_page(moving, &source, table, rows),
                    scan(state, &source, &table.name, &next.after)
                );
                (applied, Some(prefetched))
            };
            applied?;
            let done = next.done;
            moving.update(|job| {
                job.sources[s].copy.insert(table.name.clone(), next);
                job.rows_moved += copied;
            })?;
            step_pause(state).await;
            match prefetched {
                Some(prefetched) if !done => page = prefetched?,
                _ => break,
            }
        }
    }
    Ok(())
}

/// The source's change log is gone (its file was replaced?): what changed since the copy is
/// unknown, so this source starts over: capture, purge the targets, copy.
fn restart_source(moving: &Moving<'_>, s: usize) -> ProxyError {
    let saved = moving.update(|job| {
        let source = &mut job.sources[s];
        source.capturing = false;
        source.purged = false;
        source.copy.clear();
    });
    match saved {
        Err(e) => e,
        Ok(()) => ProxyError::ShardUnavailable {
            node: moving.source(s).id,
            reason: "its change capture is gone; copying its ranges again".into(),
        },
    }
}

/// Replays logged keys: current row on the source → upsert on the target; gone → delete there.
/// With `drain`, runs until the log is empty; otherwise until the backlog is small.
async fn catch_up(moving: &Moving<'_>, s: usize, drain: bool) -> ProxyResult<()> {
    let state = moving.state;
    loop {
        let source = moving.source(s);
        let page: ChangesResponse = call_as(
            state,
            &source.id,
            &source.url,
            Method::POST,
            "/v1/transfer/changes",
            Some(json!({ "after": source.applied_seq, "limit": CHANGES_PAGE })),
        )
        .await?;
        if !page.capturing {
            return Err(restart_source(moving, s));
        }
        let Some(last) = page.changes.last().map(|c| c.seq) else {
            return Ok(());
        };
        let backlog = page.changes.len();
        // Moving keys per table, each once.
        let mut keys: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for change in page.changes {
            let Some(table) = moving.table(&change.table) else {
                continue;
            };
            if source.target_of(position(table, &change.key)?).is_some() {
                let list = keys.entry(change.table).or_default();
                if !list.contains(&change.key) {
                    list.push(change.key);
                }
            }
        }
        for (name, keys) in keys {
            let table = moving.table(&name).expect("only known tables were kept");
            for chunk in keys.chunks(FETCH_CHUNK) {
                // A malformed answer must not read as "every key is gone": each key missing
                // from `rows` is deleted on its target.
                let found: FetchResponse = call_as(
                    state,
                    &source.id,
                    &source.url,
                    Method::POST,
                    "/v1/transfer/fetch",
                    Some(json!({ "table": name, "keys": chunk })),
                )
                .await?;
                let present = found
                    .rows
                    .iter()
                    .map(|row| {
                        row.get(&table.key)
                            .cloned()
                            .ok_or_else(|| ProxyError::BadNodeAnswer {
                                node: source.id.clone(),
                                reason: format!("a fetched row of {name} has no key"),
                            })
                    })
                    .collect::<ProxyResult<Vec<Value>>>()?;
                let rows: Vec<Value> = found.rows.into_iter().map(Value::Object).collect();
                let absent = chunk.iter().filter(|k| !present.contains(k)).cloned();
                apply_current(moving, &source, table, rows, absent.collect()).await?;
            }
        }
        moving.update(|job| job.sources[s].applied_seq = last)?;
        if !drain && backlog < FENCE_BACKLOG {
            return Ok(());
        }
    }
}

/// Writes keys' current state on their targets: `rows` are upserted, `absent` keys deleted.
async fn apply_current(
    moving: &Moving<'_>,
    source: &Source,
    table: &TableSchema,
    rows: Vec<Value>,
    absent: Vec<Value>,
) -> ProxyResult<()> {
    let mut upserts = by_target(source, table, rows)?;
    let mut deletes: HashMap<&str, Vec<Value>> = HashMap::new();
    for key in absent {
        if let Some(target) = source.target_of(position(table, &key)?) {
            deletes.entry(target).or_default().push(key);
        }
    }
    let mut targets: Vec<&str> = upserts.keys().chain(deletes.keys()).copied().collect();
    targets.sort_unstable();
    targets.dedup();
    for target in targets {
        moving
            .apply(
                target,
                &table.name,
                upserts.remove(target).unwrap_or_default(),
                deletes.remove(target).unwrap_or_default(),
            )
            .await?;
    }
    Ok(())
}

/// The count check of one source, made while client writes go on (outside the fence).
///
/// In one read snapshot at log position S, the source counts its outgoing ranges and returns
/// every key logged since the last catch-up with its row in that same snapshot. Once those are
/// applied, each target holds exactly what the source held at S in the ranges it receives
/// (see `docs/rebalance.md`), so per (source, target) pair the two counts must be equal; then
/// the catch-up position becomes S. A mismatch stops the job before any fence goes up.
async fn check_counts(moving: &Moving<'_>, s: usize) -> ProxyResult<()> {
    let state = moving.state;
    let asks = count_asks(std::slice::from_ref(&moving.source(s)));
    loop {
        let source = moving.source(s);
        let spans = &asks[&source.id].0;
        let tally: TallyResponse = call_as(
            state,
            &source.id,
            &source.url,
            Method::POST,
            "/v1/transfer/tally",
            Some(json!({ "after": source.applied_seq, "ranges": spans, "limit": CHANGES_PAGE })),
        )
        .await?;
        if !tally.capturing {
            return Err(restart_source(moving, s));
        }
        if !tally.complete {
            // More changed than one answer carries: catch up further and ask again.
            catch_up(moving, s, false).await?;
            continue;
        }
        // The logged keys' rows as of S, per table.
        let mut per_table: BTreeMap<String, (Vec<Value>, Vec<Value>)> = BTreeMap::new();
        for tallied in tally.keys {
            let entry = per_table.entry(tallied.table).or_default();
            match tallied.row {
                Some(row) => entry.0.push(Value::Object(row)),
                None => entry.1.push(tallied.key),
            }
        }
        for (name, (rows, absent)) in per_table {
            if let Some(table) = moving.table(&name) {
                apply_current(moving, &source, table, rows, absent).await?;
            }
        }
        // The targets now hold the source's state at S in these ranges: count them.
        let counts = asks.iter().map(|(node, (spans, _))| {
            let source_counts = (*node == source.id).then(|| tally.counts.clone());
            async move {
                if let Some(counts) = source_counts {
                    return Ok(counts);
                }
                let counted: CountResponse = call_as(
                    state,
                    node,
                    moving.url(node)?,
                    Method::POST,
                    "/v1/transfer/count",
                    Some(json!({ "ranges": spans })),
                )
                .await?;
                Ok::<_, ProxyError>(counted.counts)
            }
        });
        let answers = futures::future::join_all(counts)
            .await
            .into_iter()
            .collect::<ProxyResult<Vec<_>>>()?;
        compare_counts(&asks, answers)?;
        return moving.update(|job| job.sources[s].applied_seq = tally.max_seq);
    }
}

/// Fences every source, drains its log to zero, and switches ownership. The count check was
/// made before the fence (`check_counts`), so the only work under it is the changes made since.
async fn fenced_phase(state: &ProxyState, job: &mut Job) -> ProxyResult<bool> {
    let before = state.cluster().topology();
    let fenced_at = Instant::now();
    let fences = job.sources.iter().map(|source| {
        send(
            state,
            &source.id,
            &source.url,
            Method::PUT,
            "/v1/transfer/fences",
            Some(json!({ "job": job.id, "ranges": source.spans() })),
        )
    });
    for fenced in futures::future::join_all(fences).await {
        fenced?;
    }
    step_pause(state).await;
    let moving = Moving::new(state, job);
    let drained = moving.each_source(|s| catch_up(&moving, s, true)).await;
    *job = moving.into_job();
    drained?;
    commit(state, job)?;
    job.pause_ms = job.pause_ms.max(fenced_at.elapsed().as_millis() as u64);
    save(state, job)?;
    // Requests routed by the old topology may still be on their way to a source: let them end
    // before the source drops its copy and its fence.
    wait_for_requests(before).await;
    Ok(false)
}

/// A (source, target) pair of a job.
type Pair = (String, String);
/// Per node: the ranges to count there, and for each range the pair it belongs to.
type CountAsks = BTreeMap<String, (Vec<[u32; 2]>, Vec<Pair>)>;

/// What to count where: every moving range on its source and on its target.
fn count_asks(sources: &[Source]) -> CountAsks {
    let mut asks = CountAsks::new();
    for source in sources {
        for range in &source.ranges {
            let pair = (source.id.clone(), range.to.clone());
            for node in [&source.id, &range.to] {
                let ask = asks.entry(node.clone()).or_default();
                ask.0.push([range.start, range.end]);
                ask.1.push(pair.clone());
            }
        }
    }
    asks
}

/// Adds the nodes' per-range counts up per pair and names the first pair whose two sides differ.
fn compare_counts(asks: &CountAsks, answers: Vec<Vec<u64>>) -> ProxyResult<()> {
    // (source, target) → (rows on the source, rows on the target).
    let mut pairs: BTreeMap<&Pair, (u64, u64)> = BTreeMap::new();
    for ((node, (_, owners)), counts) in asks.iter().zip(answers) {
        for (pair, n) in owners.iter().zip(counts) {
            let entry = pairs.entry(pair).or_default();
            if *node == pair.0 {
                entry.0 += n;
            } else {
                entry.1 += n;
            }
        }
    }
    for ((source, target), (on_source, on_target)) in pairs {
        if on_source != on_target {
            return Err(ProxyError::Conflict(format!(
                "after the final catch-up, {source} holds {on_source} rows of the ranges moving \
                 to {target} but {target} holds {on_target}; not switching"
            )));
        }
    }
    Ok(())
}

/// The commit point: one transaction on the state file.
fn commit(state: &ProxyState, job: &mut Job) -> ProxyResult<()> {
    job.phase = Phase::Committed;
    let body = serde_json::to_string(&*job).expect("a job serializes");
    let from_epoch = job.from_epoch;
    let id = job.id.clone();
    state.cluster().update(|tx| {
        let epoch: String =
            tx.query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
                r.get(0)
            })?;
        if epoch.parse::<u64>().ok() != Some(from_epoch) {
            return Err(ProxyError::Conflict(format!(
                "membership changed during the job (epoch {epoch}, planned at {from_epoch})"
            )));
        }
        tx.execute("DELETE FROM nodes WHERE state = 'leaving'", [])?;
        tx.execute(
            "UPDATE nodes SET state = 'active' WHERE state = 'joining'",
            [],
        )?;
        tx.execute(
            "UPDATE nodes SET weight = next_weight, next_weight = NULL \
             WHERE next_weight IS NOT NULL",
            [],
        )?;
        bump_epoch(tx)?;
        tx.execute(
            "UPDATE jobs SET state = 'running', body = ?2 WHERE id = ?1",
            params![id, body],
        )?;
        Ok(())
    })?;
    tracing::info!(job = %job.id, epoch = from_epoch + 1, "ownership switched");
    Ok(())
}

/// Waits until no request holds `topology` any more (each routed request keeps the snapshot it
/// routed by until its node call ends). Bounded: requests time out.
async fn wait_for_requests(topology: Arc<Topology>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Arc::strong_count(&topology) > 1 {
        if Instant::now() >= deadline {
            // Requests time out well before this: a holder that is not a request is a bug.
            tracing::warn!(
                holders = Arc::strong_count(&topology) - 1,
                "the old topology is still held after 60 s; cleaning up anyway"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Drops capture, deletes the moved rows from each source and lifts its fence; every source at
/// once.
async fn cleanup_phase(state: &ProxyState, job: &mut Job) -> ProxyResult<bool> {
    let moving = Moving::new(state, job);
    let cleaned = moving.each_source(|s| clean_source(&moving, s)).await;
    *job = moving.into_job();
    cleaned?;
    Ok(true)
}

async fn clean_source(moving: &Moving<'_>, s: usize) -> ProxyResult<()> {
    clean_source_saving(moving, s, CLEANUP_SAVE_EVERY).await
}

/// [`clean_source`], saving the purge's position at most every `save_every`.
async fn clean_source_saving(
    moving: &Moving<'_>,
    s: usize,
    save_every: Duration,
) -> ProxyResult<()> {
    let state = moving.state;
    let source = moving.source(s);
    if source.cleaned {
        return Ok(());
    }
    step_pause(state).await;
    drop_capture(state, &source).await?;
    // A `Mutex` only because the closure lives across awaits in a task that may move threads.
    let saved_at = Mutex::new(Instant::now());
    purge(
        state,
        &source.id,
        &source.url,
        &source.spans(),
        source.cleaning.clone(),
        true,
        |deleted, next| {
            let progress = |job: &mut Job| {
                job.rows_cleaned += deleted;
                if let Some(next) = next {
                    job.sources[s].cleaning = Some(next.clone());
                }
            };
            let mut saved_at = saved_at.lock().unwrap_or_else(PoisonError::into_inner);
            if next.is_some() && saved_at.elapsed() >= save_every {
                *saved_at = Instant::now();
                moving.update(progress)
            } else {
                // The last page's count is saved with `cleaned` below.
                moving.publish(progress);
                Ok(())
            }
        },
    )
    .await?;
    lift_fence(state, &source).await?;
    moving.update(|job| job.sources[s].cleaned = true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(ranges: &[(u32, u32, &str)]) -> Source {
        Source {
            id: "a".into(),
            url: "http://127.0.0.1:1".into(),
            ranges: ranges
                .iter()
                .map(|&(start, end, to)| Range {
                    start,
                    end,
                    to: to.into(),
                })
                .collect(),
            capturing: false,
            purged: false,
            copy: BTreeMap::new(),
            applied_seq: 0,
            cleaning: None,
            cleaned: false,
        }
    }

    /// A fake node serving `/v1/transfer/purge` (and the clean-up's other calls): page `n`
    /// (from 1) answers with `script(n)` = (instance, done), 5 rows deleted, and the cursor
    /// `rowid: n * 10`. Every purge request's body is kept; `on_request` runs first.
    async fn fake_purge_node(
        script: fn(usize) -> (&'static str, bool),
        on_request: impl Fn(usize) + Clone + Send + Sync + 'static,
    ) -> (String, Arc<Mutex<Vec<Value>>>) {
        fake_purge_node_writing(script, |_| None, on_request).await
    }

    /// [`fake_purge_node`], whose page `n` also says the node's client write count is
    /// `writes(n)`.
    async fn fake_purge_node_writing(
        script: fn(usize) -> (&'static str, bool),
        writes: fn(usize) -> Option<u64>,
        on_request: impl Fn(usize) + Clone + Send + Sync + 'static,
    ) -> (String, Arc<Mutex<Vec<Value>>>) {
        let requests: Arc<Mutex<Vec<Value>>> = Arc::default();
        let seen = Arc::clone(&requests);
        let ok = || async { axum::Json(json!({})) };
        let node = axum::Router::new()
            .route(
                "/v1/transfer/purge",
                axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
                    let seen = Arc::clone(&seen);
                    let on_request = on_request.clone();
                    async move {
                        let page = {
                            let mut seen = seen.lock().unwrap();
                            seen.push(body);
                            seen.len()
                        };
                        on_request(page);
                        let (instance, done) = script(page);
                        let next = json!({"table": "t", "rowid": page * 10});
                        axum::Json(json!({
                            "deleted": 5,
                            "done": done,
                            "next": if done { Value::Null } else { next },
                            "instance": instance,
                            "writes": writes(page),
                        }))
                    }
                }),
            )
            .route("/v1/transfer/capture", axum::routing::delete(ok))
            .route("/v1/transfer/fences", axum::routing::delete(ok));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, node).await });
        (url, requests)
    }

    fn afters(requests: &Mutex<Vec<Value>>) -> Vec<Value> {
        requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| r["after"].clone())
            .collect()
    }

    fn at(rowid: i64, instance: &str) -> PurgeAt {
        PurgeAt {
            after: Some(PurgeCursor {
                table: "t".into(),
                rowid: Some(rowid),
                key: None,
            }),
            instance: instance.into(),
        }
    }

    fn test_state(dir: &tempfile::TempDir) -> ProxyState {
        ProxyState::open(crate::server::ProxyConfig::new(dir.path().join("state.db"))).unwrap()
    }

    /// An active node at `url`.
    fn node_at(id: &str, url: &str) -> NodeInfo {
        NodeInfo {
            url: url.into(),
            ..NodeInfo::test(id, MemberState::Active)
        }
    }

    /// A running job `j1` with nothing moved yet.
    fn job_of(phase: Phase, nodes: Vec<NodeInfo>, sources: Vec<Source>) -> Job {
        Job {
            id: "j1".into(),
            state: JobState::Running,
            phase,
            from_epoch: 1,
            nodes,
            tables: Vec::new(),
            sources,
            rows_to_move: 0,
            rows_moved: 0,
            rows_cleaned: 0,
            pause_ms: 0,
            error: None,
        }
    }

    /// A resumed job calls a node where the topology has it now, by id.
    #[test]
    fn a_resumed_job_follows_a_node_to_its_new_url() {
        let mut src = source(&[(0, 9, "b")]);
        src.url = "http://127.0.0.1:1".into();
        let mut job = job_of(
            Phase::Copy,
            vec![
                node_at("a", "http://127.0.0.1:1"),
                node_at("b", "http://127.0.0.1:2"),
            ],
            vec![src],
        );
        let same = Topology::new(1, 16, job.nodes.clone()).unwrap();
        assert!(!follow_moved_nodes(&mut job, &same));
        let moved = Topology::new(
            1,
            16,
            vec![
                node_at("a", "http://127.0.0.1:9"),
                node_at("b", "http://127.0.0.1:2"),
            ],
        )
        .unwrap();
        assert!(follow_moved_nodes(&mut job, &moved));
        assert_eq!(job.nodes[0].url, "http://127.0.0.1:9");
        assert_eq!(job.nodes[1].url, "http://127.0.0.1:2");
        assert_eq!(job.sources[0].url, "http://127.0.0.1:9");
    }

    /// A cancel names its job in the state file: it survives reopening the file, another job
    /// never reads it as its own, and forgetting it drops it.
    #[test]
    fn a_cancel_is_kept_for_its_job_only() {
        let dir = tempfile::tempdir().unwrap();
        let state = test_state(&dir);
        ask_cancel(&state, "job-1").unwrap();
        drop(state);

        let reopened = test_state(&dir);
        assert!(cancel_recorded(&reopened, "job-1").unwrap());
        assert!(!cancel_recorded(&reopened, "job-2").unwrap());
        forget_cancel(&reopened, "job-2");
        assert!(
            cancel_recorded(&reopened, "job-1").unwrap(),
            "not another job's to drop"
        );
        forget_cancel(&reopened, "job-1");
        assert!(!cancel_recorded(&reopened, "job-1").unwrap());
    }

    /// The times between the 4 pages of a purge (`paced` or not) against a fake node whose
    /// pages take 50 ms each and whose page `n` reports the client write count `writes(n)`.
    async fn purge_gaps(paced: bool, writes: fn(usize) -> Option<u64>) -> Vec<Duration> {
        let arrived: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let log = Arc::clone(&arrived);
        let (url, _) = fake_purge_node_writing(
            |page| ("one", page >= 4),
            writes,
            move |_| {
                log.lock().unwrap().push(Instant::now());
                std::thread::sleep(Duration::from_millis(50));
            },
        )
        .await;
        let dir = tempfile::tempdir().unwrap();
        let state = test_state(&dir);
        purge(&state, "n1", &url, &[[0, 9]], None, paced, |_, _| Ok(()))
            .await
            .unwrap();
        let arrived = arrived.lock().unwrap();
        assert_eq!(arrived.len(), 4);
        arrived.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// Paced, the purge rests after each page for as long as the page took, so a node whose
    /// pages take 50 ms sees the next one at least 100 ms after the last; unpaced, at once.
    #[tokio::test]
    async fn a_paced_purge_rests_as_long_as_each_page_took() {
        for paced in [true, false] {
            let gaps = purge_gaps(paced, |_| None).await;
            if paced {
                assert!(
                    gaps.iter().all(|gap| *gap >= Duration::from_millis(100)),
                    "{gaps:?}"
                );
            } else {
                // Without the rest, at least one page follows the last within the rest's time
                // (a loaded machine could stretch one gap, hardly all three).
                assert!(
                    gaps.iter().any(|gap| *gap < Duration::from_millis(100)),
                    "{gaps:?}"
                );
            }
        }
    }

    /// Paced, the purge does not rest while the node's client write count stands still: no
    /// client write waits there. It rests again once the count moves.
    #[tokio::test]
    async fn a_paced_purge_rests_only_while_the_node_takes_client_writes() {
        let steady: fn(usize) -> Option<u64> = |_| Some(7);
        let moving: fn(usize) -> Option<u64> = |page| Some(page as u64 / 2);
        for (writes, resting) in [
            (steady, [true, false, false]),
            (moving, [true, true, false]),
        ] {
            let gaps = purge_gaps(true, writes).await;
            for (gap, rests) in gaps.iter().zip(resting) {
                if rests {
                    assert!(*gap >= Duration::from_millis(100), "{gaps:?}");
                }
            }
            // The pages without a rest: at least one of them comes within the rest's time (a
            // loaded machine could stretch one gap, hardly all).
            let unrested: Vec<&Duration> = gaps
                .iter()
                .zip(resting)
                .filter(|(_, rests)| !rests)
                .map(|(gap, _)| gap)
                .collect();
            assert!(
                unrested
                    .iter()
                    .any(|gap| **gap < Duration::from_millis(100)),
                "{gaps:?}"
            );
        }
    }

    /// A node whose process "restarts" after the second purge page: a page answered before the
    /// restart may be undone (it was not synced), so the purge must start over from the first
    /// key, not go on from its cursor.
    #[tokio::test]
    async fn a_purge_starts_over_when_the_node_restarted_between_pages() {
        // Pages 1-2 from the first process, 3 on from the second.
        let (url, requests) = fake_purge_node(
            |page| (if page <= 2 { "first" } else { "second" }, page >= 3),
            |_| {},
        )
        .await;
        let dir = tempfile::tempdir().unwrap();
        let state = test_state(&dir);

        // Page 3 says done, but it comes from another process: pages 1 and 2 may be gone.
        let deleted = std::cell::Cell::new(0);
        let positions = Mutex::new(Vec::new());
        purge(&state, "n1", &url, &[[0, 9]], None, false, |n, next| {
            deleted.set(deleted.get() + n);
            positions.lock().unwrap().push(next.cloned());
            Ok(())
        })
        .await
        .unwrap();
        // Page 3 went on from page 2's cursor (the caller cannot know yet); when its answer came
        // from the new process, page 4 started over from the beginning.
        assert_eq!(
            afters(&requests),
            vec![
                Value::Null,
                json!({"table": "t", "rowid": 10}),
                json!({"table": "t", "rowid": 20}),
                Value::Null
            ]
        );
        // Every page's deletions reach the caller, those of the undone pass too, and so does
        // every position, the start-over included.
        assert_eq!(deleted.get(), 20);
        let start_over = PurgeAt {
            after: None,
            instance: "second".into(),
        };
        assert_eq!(
            positions.into_inner().unwrap(),
            vec![
                Some(at(10, "first")),
                Some(at(20, "first")),
                Some(start_over),
                None
            ]
        );
    }

    /// A purge given a saved position goes on after it while the same node process answers,
    /// and starts over when another one does.
    #[tokio::test]
    async fn a_purge_goes_on_from_a_saved_position_of_the_same_process() {
        let dir = tempfile::tempdir().unwrap();
        let state = test_state(&dir);
        let (url, requests) = fake_purge_node(|page| ("first", page >= 2), |_| {}).await;
        purge(
            &state,
            "n1",
            &url,
            &[[0, 9]],
            Some(at(40, "first")),
            false,
            |_, _| Ok(()),
        )
        .await
        .unwrap();
        assert_eq!(
            afters(&requests),
            vec![
                json!({"table": "t", "rowid": 40}),
                json!({"table": "t", "rowid": 10})
            ]
        );

        // Saved against a process that is gone: its pages may be undone.
        let (url, requests) = fake_purge_node(|page| ("new", page >= 2), |_| {}).await;
        purge(
            &state,
            "n1",
            &url,
            &[[0, 9]],
            Some(at(40, "old")),
            false,
            |_, _| Ok(()),
        )
        .await
        .unwrap();
        assert_eq!(
            afters(&requests),
            vec![json!({"table": "t", "rowid": 40}), Value::Null]
        );
    }

    /// What the job record held (the source's purge position, the count) when each of 3 purge
    /// pages was asked for, in a clean-up that starts from a saved position and saves at most
    /// every `save_every`; and the record at the end.
    async fn clean_up_three_pages(save_every: Duration) -> (Vec<(Option<PurgeAt>, u64)>, Job) {
        let dir = tempfile::tempdir().unwrap();
        let state = test_state(&dir);
        type Saved = Vec<(Option<PurgeAt>, u64)>;
        let saved: Arc<Mutex<Saved>> = Arc::default();
        let (url, requests) = {
            let (state, saved) = (state.clone(), Arc::clone(&saved));
            fake_purge_node(
                |page| ("first", page >= 3),
                move |_| {
                    let job = load_latest(&state).unwrap().unwrap();
                    let source = &job.sources[0];
                    saved
                        .lock()
                        .unwrap()
                        .push((source.cleaning.clone(), job.rows_cleaned));
                },
            )
            .await
        };
        let mut src = source(&[(0, 9, "b")]);
        src.url = url;
        src.cleaning = Some(at(40, "first"));
        let job = Job {
            rows_to_move: 100,
            rows_moved: 100,
            rows_cleaned: 7,
            ..job_of(Phase::Committed, Vec::new(), vec![src])
        };
        save(&state, &job).unwrap();

        let moving = Moving::new(&state, &job);
        clean_source_saving(&moving, 0, save_every).await.unwrap();
        assert!(moving.into_job().sources[0].cleaned);
        assert_eq!(
            afters(&requests)[0],
            json!({"table": "t", "rowid": 40}),
            "went on from the saved position"
        );
        let stored = load_latest(&state).unwrap().unwrap();
        assert!(stored.sources[0].cleaned);
        let saved = saved.lock().unwrap().clone();
        (saved, stored)
    }

    /// The clean-up goes on from the position saved in the job record (a proxy restart), and
    /// saves its position and count there as it goes: after every page when the interval
    /// allows, and the count at the end in any case.
    #[tokio::test]
    async fn the_cleanup_goes_on_from_its_saved_position_and_saves_it() {
        let (saved, stored) = clean_up_three_pages(Duration::ZERO).await;
        assert_eq!(
            saved,
            vec![
                (Some(at(40, "first")), 7),
                (Some(at(10, "first")), 12),
                (Some(at(20, "first")), 17),
            ]
        );
        assert_eq!(stored.rows_cleaned, 22);

        // Within the interval nothing is saved between pages; the end saves the count.
        let (saved, stored) = clean_up_three_pages(Duration::from_secs(3600)).await;
        assert_eq!(saved, vec![(Some(at(40, "first")), 7); 3]);
        assert_eq!(stored.rows_cleaned, 22);
    }

    /// A cancel stops the copy at the source's next page, not at the end of the phase: the
    /// fake source below never runs out of pages, so a copy that read the cancel only between
    /// phases would never stop. The pages copied before it are saved, and the job stays in its
    /// copy phase for the run loop to stop.
    #[tokio::test]
    async fn a_cancel_stops_the_copy_at_its_next_page() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let scans = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&scans);
        let source_node = axum::Router::new()
            .route(
                "/v1/transfer/scan",
                axum::routing::post(move || {
                    let page = counted.fetch_add(1, Ordering::SeqCst) + 1;
                    async move {
                        let key = format!("k{page}");
                        axum::Json(json!({ "rows": [{ "id": key }], "next": key }))
                    }
                }),
            )
            .route(
                "/v1/transfer/fences",
                axum::routing::delete(|| async { axum::Json(json!({})) }),
            );
        let target_node = axum::Router::new().route(
            "/v1/transfer/apply",
            axum::routing::post(|| async { axum::Json(json!({})) }),
        );
        let mut urls = Vec::new();
        for node in [source_node, target_node] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            urls.push(format!("http://{}", listener.local_addr().unwrap()));
            tokio::spawn(async move { axum::serve(listener, node).await });
        }
        let mut src = source(&[(0, u32::MAX, "b")]);
        src.url = urls[0].clone();
        src.capturing = true;
        src.purged = true;
        let mut job = Job {
            tables: vec![TableSchema {
                name: "t".into(),
                key: "id".into(),
                key_affinity: shardlite_node::key::Affinity::Text,
                columns: vec!["id".into()],
            }],
            ..job_of(
                Phase::Copy,
                vec![node_at("a", &urls[0]), node_at("b", &urls[1])],
                vec![src],
            )
        };
        let dir = tempfile::tempdir().unwrap();
        let state = test_state(&dir);
        save(&state, &job).unwrap();

        let ended = {
            let copying = copy_phase(&state, &mut job);
            tokio::pin!(copying);
            // Let the copy run some pages, then cancel.
            let ran = tokio::time::timeout(Duration::from_secs(10), async {
                while scans.load(Ordering::SeqCst) < 5 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
            tokio::select! {
                _ = ran => {}
                ended = &mut copying => {
                    panic!("a copy without end ended: {:?}", ended.map_err(|e| e.message()))
                }
            }
            ask_cancel(&state, "j1").unwrap();
            tokio::time::timeout(Duration::from_secs(10), copying)
                .await
                .expect("the copy stops at its next page")
        };
        assert!(
            matches!(ended, Ok(false)),
            "{:?}",
            ended.map_err(|e| e.message())
        );
        let scanned = scans.load(Ordering::SeqCst) as u64;
        assert_eq!(job.phase, Phase::Copy, "no fence after a cancel");
        assert!(
            job.rows_moved >= 4 && job.rows_moved < scanned + 1,
            "moved {} of {scanned} pages read",
            job.rows_moved
        );
        let stored = load_latest(&state).unwrap().unwrap();
        assert_eq!(
            stored.rows_moved, job.rows_moved,
            "the pages copied are saved"
        );
        assert!(
            cancel_recorded(&state, "j1").unwrap(),
            "left for the run loop"
        );
    }

    #[test]
    fn a_position_maps_to_the_target_of_its_range_only() {
        let s = source(&[(0, 9, "b"), (20, 29, "c"), (30, 30, "b")]);
        assert_eq!(s.target_of(0), Some("b"));
        assert_eq!(s.target_of(9), Some("b"));
        assert_eq!(s.target_of(10), None);
        assert_eq!(s.target_of(19), None);
        assert_eq!(s.target_of(25), Some("c"));
        assert_eq!(s.target_of(30), Some("b"));
        assert_eq!(s.target_of(31), None);
        assert_eq!(s.target_of(u32::MAX), None);
        assert_eq!(s.targets(), vec!["b", "c"]);
        assert_eq!(s.spans_to("b"), vec![[0, 9], [30, 30]]);
    }

    /// A pending weight changes only the next ring: a heavier node only receives rows, a
    /// lighter one only gives them, and no other pair of nodes trades.
    #[test]
    fn a_reweighted_node_only_receives_or_only_gives() {
        for (next_weight, gains) in [(3, true), (1, false)] {
            let b = NodeInfo {
                weight: 2,
                next_weight: Some(next_weight),
                ..NodeInfo::test("b", MemberState::Active)
            };
            let topology = Topology::new(
                1,
                64,
                vec![
                    NodeInfo::test("a", MemberState::Active),
                    b,
                    NodeInfo::test("c", MemberState::Active),
                ],
            )
            .unwrap();
            let next = next_ring(&topology).unwrap();
            let share = |ring: &Ring| cluster::shares_by_id(ring)["b"];
            assert!(
                (share(&next) > share(&topology.ring)) == gains,
                "b's share follows its next weight"
            );
            let planned = sources(&topology, &next);
            assert!(!planned.is_empty());
            for s in &planned {
                if gains {
                    assert_ne!(s.id, "b");
                    assert!(s.ranges.iter().all(|r| r.to == "b"), "rows only go to b");
                } else {
                    assert_eq!(s.id, "b", "only b gives rows");
                }
            }
        }
    }

    #[test]
    fn a_joining_node_receives_and_a_leaving_node_gives() {
        let topology = Topology::new(
            1,
            64,
            vec![
                NodeInfo::test("a", MemberState::Active),
                NodeInfo::test("b", MemberState::Active),
                NodeInfo::test("c", MemberState::Joining),
            ],
        )
        .unwrap();
        let next = next_ring(&topology).unwrap();
        let planned = sources(&topology, &next);
        assert!(!planned.is_empty());
        for s in &planned {
            assert!(
                s.ranges.iter().all(|r| r.to == "c"),
                "rows only go to the new node"
            );
        }

        let topology = Topology::new(
            1,
            64,
            vec![
                NodeInfo::test("a", MemberState::Active),
                NodeInfo::test("b", MemberState::Leaving),
            ],
        )
        .unwrap();
        let next = next_ring(&topology).unwrap();
        let planned = sources(&topology, &next);
        assert_eq!(planned.len(), 1);
        assert_eq!(planned[0].id, "b", "only the leaving node gives rows");
        for i in 0..100_000u32 {
            let point = i.wrapping_mul(2_654_435_761);
            let owner = topology.ring.owner_of(point).unwrap().as_str();
            let target = planned[0].target_of(point);
            assert_eq!(
                target.is_some(),
                owner == "b",
                "b gives all of its positions, only them"
            );
            assert!(target.is_none_or(|t| t == "a"));
        }
    }

    #[test]
    fn counts_are_compared_per_source_and_target_even_when_a_node_is_both() {
        // a gives to b; b gives to c: b is a target of one pair and the source of another.
        let mut a = source(&[(0, 9, "b"), (20, 29, "c")]);
        a.id = "a".into();
        let mut b = source(&[(40, 49, "c")]);
        b.id = "b".into();
        let sources = [a, b];
        let asks = count_asks(&sources);
        assert_eq!(asks["a"].0, vec![[0, 9], [20, 29]]);
        assert_eq!(asks["b"].0, vec![[0, 9], [40, 49]]);
        assert_eq!(asks["c"].0, vec![[20, 29], [40, 49]]);
        // Per node, per range (in the order asked): equal on both sides of every pair.
        let equal = vec![vec![5, 7], vec![5, 3], vec![7, 3]];
        assert!(compare_counts(&asks, equal).is_ok());
        // c is missing one row that b gives it: the b → c pair must be named.
        let short = vec![vec![5, 7], vec![5, 3], vec![7, 2]];
        let error = compare_counts(&asks, short).unwrap_err().to_string();
        assert!(
            error.contains("b holds 3") && error.contains("c holds 2"),
            "{error}"
        );
        // The check runs per source, as `check_counts` asks: b's side of b → c only, even
        // though b also receives from a.
        let asks = count_asks(std::slice::from_ref(&sources[1]));
        assert_eq!(asks.keys().collect::<Vec<_>>(), ["b", "c"]);
        assert_eq!(asks["b"].0, vec![[40, 49]]);
        assert!(compare_counts(&asks, vec![vec![3], vec![3]]).is_ok());
        let error = compare_counts(&asks, vec![vec![3], vec![4]])
            .unwrap_err()
            .to_string();
        assert!(error.contains("c holds 4"), "{error}");
    }

    #[test]
    fn the_last_nodes_cannot_all_leave() {
        let topology =
            Topology::new(1, 64, vec![NodeInfo::test("a", MemberState::Leaving)]).unwrap();
        assert!(matches!(next_ring(&topology), Err(ProxyError::Conflict(_))));
    }
}
