//! Guarantee 4 for the rebalance, adding a node and removing one: `kill -9` of the proxy or of
//! a source or target node at a chosen step, then a restart; the job resumes by itself,
//! `shardlite rebalance` waits for it, and the history, `verify` and the node files all check
//! out.

use serde_json::{Value, json};
use shardlite_tests::history::{self, Writers};
use shardlite_tests::{
    Client, Spawned, SpawnedCluster, assert_verified, member_state, shardlite_bin,
    transfer_leftovers, wait_for_rebalance,
};
use std::time::{Duration, Instant};

const ROWS: usize = 12_000;
/// Each copy page and phase pauses this long, so a kill lands in the chosen step.
const STEP_PAUSE_MS: u64 = 150;

async fn start() -> SpawnedCluster {
    SpawnedCluster::start(3, STEP_PAUSE_MS, ROWS).await
}

/// Starts a fourth node and adds it to the cluster (as joining); keep it alive.
async fn add_n4(cluster: &SpawnedCluster) -> Spawned {
    let n4 = cluster.node("n4", 0);
    let (status, body) = cluster
        .client
        .post("/v1/cluster/nodes", json!({ "id": "n4", "url": n4.url }))
        .await;
    assert_eq!(status, 201, "{body}");
    n4
}

/// Waits until the job reports `phase` (and, for copy, some rows moved).
async fn wait_for_phase(client: &Client, phase: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, status) = client.get("/v1/cluster/rebalance").await;
        assert_eq!(
            status["state"], "running",
            "the job ended before the {phase} step: {status}"
        );
        if status["phase"] == phase
            && (phase != "copy" || status["rows_moved"].as_u64().unwrap_or(0) > 0)
        {
            return;
        }
        assert!(Instant::now() < deadline, "no {phase} step: {status}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// What the rebalance does.
#[derive(Clone, Copy, PartialEq)]
enum Change {
    /// n4 joins; n1-n3 are sources.
    AddN4,
    /// n1 leaves; it is the only source, n2 and n3 the targets.
    RemoveN1,
}

enum Victim {
    Proxy,
    SourceNode,
    /// n4, the node the rows move to (adding only).
    TargetNode,
}

async fn kill_during(change: Change, phase: &str, victim: Victim) {
    let mut cluster = start().await;
    let writers = Writers::start(&cluster.client, 3, 30, history::seed("SHARDLITE_TEST_SEED"));

    let mut n4 = match change {
        Change::AddN4 => Some(add_n4(&cluster).await),
        Change::RemoveN1 => {
            let (status, body) = cluster.client.delete("/v1/cluster/nodes/n1").await;
            assert_eq!(status, 202, "{body}");
            None
        }
    };
    let (status, body) = cluster
        .client
        .post("/v1/cluster/rebalance", Value::Null)
        .await;
    assert_eq!(status, 202, "{body}");
    wait_for_phase(&cluster.client, phase).await;

    match victim {
        Victim::Proxy => {
            cluster.proxy.kill();
            cluster.restart_proxy();
        }
        Victim::SourceNode => {
            cluster.nodes[0].process.kill();
            tokio::time::sleep(Duration::from_millis(400)).await;
            cluster.restart_node(0);
        }
        Victim::TargetNode => {
            let target = n4.as_mut().expect("a target victim is n4, which joins");
            let port = target.port();
            target.kill();
            tokio::time::sleep(Duration::from_millis(400)).await;
            *target = cluster.node("n4", port);
        }
    }

    // `shardlite rebalance` finds the resumed job and waits for it.
    let url = cluster.proxy.url.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(shardlite_bin())
            .args(["rebalance", "--proxy", &url])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "shardlite rebalance: {text}");
    let done = wait_for_rebalance(&cluster.client, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "done", "{done}");

    let (_, state) = writers.finish(&cluster.client).await;

    let report = assert_verified(&cluster.client).await;
    let writer_rows = state.values().filter(|v| v.is_some()).count() as u64;
    assert_eq!(
        report["rows_total"].as_u64().unwrap(),
        ROWS as u64 + writer_rows,
        "no row lost or doubled: {report}"
    );
    let members = match change {
        Change::AddN4 => {
            assert!(
                report["nodes"]["n4"]["rows"].as_u64().unwrap() > 0,
                "{report}"
            );
            1..=4
        }
        Change::RemoveN1 => {
            assert_eq!(
                member_state(&cluster.client, "n1").await,
                None,
                "n1 left the topology"
            );
            let db = cluster.db("n1");
            let kept = shardlite_tests::keys_in_file(&db, "users");
            assert!(kept.is_empty(), "n1 keeps {} rows", kept.len());
            1..=3
        }
    };
    for i in members {
        let db = cluster.db(&format!("n{i}"));
        assert_eq!(
            transfer_leftovers(&db),
            (0, 0),
            "n{i} keeps no capture, log or fence"
        );
    }
    drop(n4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_killed_mid_copy_resumes_the_job() {
    kill_during(Change::AddN4, "copy", Victim::Proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_killed_while_fenced_resumes_the_job() {
    kill_during(Change::AddN4, "fenced", Victim::Proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_killed_during_cleanup_finishes_the_job() {
    kill_during(Change::AddN4, "committed", Victim::Proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_node_killed_mid_copy_does_not_stop_the_job() {
    kill_during(Change::AddN4, "copy", Victim::SourceNode).await;
}

/// Removing a node: n1 leaves, and it is the only source; the proxy or n1 is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_node_survives_the_proxy_killed_mid_copy() {
    kill_during(Change::RemoveN1, "copy", Victim::Proxy).await;
}

/// The switch takes the leaving node out of the ring, and it leaves the topology once its
/// copies are deleted: a proxy killed in between must still take it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_node_survives_the_proxy_killed_during_cleanup() {
    kill_during(Change::RemoveN1, "committed", Victim::Proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_node_survives_the_leaving_node_killed_while_fenced() {
    kill_during(Change::RemoveN1, "fenced", Victim::SourceNode).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_node_survives_the_leaving_node_killed_mid_copy() {
    kill_during(Change::RemoveN1, "copy", Victim::SourceNode).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_node_survives_the_leaving_node_killed_during_cleanup() {
    kill_during(Change::RemoveN1, "committed", Victim::SourceNode).await;
}

/// Killed with its fence up: the fence and the change log are in the source's file, so it
/// comes back refusing writes to the moving ranges; the job goes back to catching up, puts the
/// fence up again, drains and switches. Writes held at the fence meanwhile lose nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_node_killed_while_fenced_does_not_stop_the_job() {
    kill_during(Change::AddN4, "fenced", Victim::SourceNode).await;
}

/// The clean-up deletes a source's old copies in pages, most of them committed without a sync
/// of their own; killed there, the source comes back with its fence up, and the clean-up
/// starts its purge over and finishes: no leftovers, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_node_killed_during_cleanup_does_not_stop_the_job() {
    kill_during(Change::AddN4, "committed", Victim::SourceNode).await;
}

/// The target dies with part of the copy applied (each page committed and synced there);
/// restarted, it gets the rest from the saved cursors, and the count check then holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_target_node_killed_mid_copy_does_not_stop_the_job() {
    kill_during(Change::AddN4, "copy", Victim::TargetNode).await;
}

/// Killed while the sources' fences are up: the drain cannot reach it, the job retries until
/// it is back, and writes to the moving keys wait or fail in the meantime but lose nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_target_node_killed_while_fenced_does_not_stop_the_job() {
    kill_during(Change::AddN4, "fenced", Victim::TargetNode).await;
}

/// The count check runs before the fence while writes may go on; it must still catch a row
/// that the target lost, and then nothing switches. A second job repairs the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_lost_on_the_target_stops_the_switch() {
    let cluster = start().await;
    let n4 = add_n4(&cluster).await;
    let (_, before) = cluster.client.get("/v1/cluster").await;
    let (status, body) = cluster
        .client
        .post("/v1/cluster/rebalance", Value::Null)
        .await;
    assert_eq!(status, 202, "{body}");
    // A page was copied to n4 and the job pauses after it: delete one copied row behind the
    // mover's back (n4 has no capture, so nothing logs it).
    wait_for_phase(&cluster.client, "copy").await;
    let target = Client::new(&n4.url);
    let (status, found) = target
        .post("/v1/sql", json!({ "sql": "SELECT id FROM users LIMIT 1" }))
        .await;
    assert_eq!(status, 200, "{found}");
    let lost = found["results"][0]["rows"][0][0]
        .as_str()
        .expect("n4 holds a copied row")
        .to_owned();
    let (status, body) = target.delete(&Client::row_path("users", &lost)).await;
    assert_eq!(status, 200, "{body}");

    let failed = wait_for_rebalance(&cluster.client, Duration::from_secs(60)).await;
    assert_eq!(failed["state"], "failed", "{failed}");
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("not switching") && error.contains("n4 holds"),
        "{failed}"
    );
    let (_, after) = cluster.client.get("/v1/cluster").await;
    assert_eq!(after["epoch"], before["epoch"], "nothing switched: {after}");
    assert_eq!(
        member_state(&cluster.client, "n4").await.as_deref(),
        Some("joining")
    );
    let (status, row) = cluster.client.get(&Client::row_path("users", &lost)).await;
    assert_eq!(status, 200, "the source still serves the row: {row}");

    // The next job purges n4's incoming ranges, copies again and switches.
    let done = wait_for_next_job(&cluster.client).await;
    assert_eq!(done["state"], "done", "{done}");
    let report = assert_verified(&cluster.client).await;
    assert_eq!(report["rows_total"], json!(ROWS), "{report}");
    let (status, row) = cluster.client.get(&Client::row_path("users", &lost)).await;
    assert_eq!(status, 200, "{row}");
    drop(n4);
}

/// Starts another rebalance and waits for it.
async fn wait_for_next_job(client: &Client) -> Value {
    let (status, body) = client.post("/v1/cluster/rebalance", Value::Null).await;
    assert_eq!(status, 202, "{body}");
    wait_for_rebalance(client, Duration::from_secs(60)).await
}

/// A keyless read during a job: the sum of the nodes' counts is the table's row count.
async fn keyless_count(client: &Client) -> u64 {
    let (status, body) = client
        .post("/v1/sql", json!({ "sql": "SELECT count(*) FROM users" }))
        .await;
    assert_eq!(status, 200, "{body}");
    u64::try_from(shardlite_tests::summed_counts(&body)).unwrap()
}

/// Runs a rebalance to its end, reading the row count keyless all along; the phases in which
/// it was read.
async fn count_through_a_job(client: &Client, rows: u64) -> Vec<String> {
    let (status, body) = client.post("/v1/cluster/rebalance", Value::Null).await;
    assert_eq!(status, 202, "{body}");
    let mut phases: Vec<String> = Vec::new();
    let mut refused = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, job) = client.get("/v1/cluster/rebalance").await;
        let count = keyless_count(client).await;
        let phase = job["phase"].as_str().unwrap_or("").to_owned();
        assert_eq!(count, rows, "a keyless count in the {phase} step: {job}");
        // `main.users` would skip the narrowing and count a moving row twice: refused while
        // the job runs (it may have ended since `job` was read, and then it is answered).
        let (status, body) = client
            .post(
                "/v1/sql",
                json!({ "sql": "SELECT count(*) FROM main.users" }),
            )
            .await;
        if status == 400 {
            assert!(body["error"].as_str().unwrap().contains("main."), "{body}");
            refused += 1;
        } else {
            assert_eq!(status, 200, "{body}");
        }
        if job["state"] != "running" {
            assert_eq!(job["state"], "done", "{job}");
            assert!(refused > 0, "main.users was never refused during the job");
            return phases;
        }
        if !phases.contains(&phase) {
            phases.push(phase);
        }
        assert!(Instant::now() < deadline, "the job did not end: {job}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_reads_see_each_row_once_while_rows_move() {
    let cluster = start().await;
    let rows = ROWS as u64;
    // A node joins: after the switch the old owners keep their copies until the clean-up.
    let n4 = add_n4(&cluster).await;
    let phases = count_through_a_job(&cluster.client, rows).await;
    assert!(phases.iter().any(|p| p == "committed"), "{phases:?}");
    // It leaves again: its rows are copied to active nodes, which are read, before the switch.
    let (status, body) = cluster.client.delete("/v1/cluster/nodes/n4").await;
    assert_eq!(status, 202, "{body}");
    let phases = count_through_a_job(&cluster.client, rows).await;
    assert!(phases.iter().any(|p| p == "copy"), "{phases:?}");
    assert_eq!(keyless_count(&cluster.client).await, rows);
    // A heavier n1: an active node receives copies of rows that others own until the switch.
    let (status, body) = cluster
        .client
        .patch("/v1/cluster/nodes/n1", json!({ "weight": 3 }))
        .await;
    assert_eq!(status, 200, "{body}");
    let phases = count_through_a_job(&cluster.client, rows).await;
    assert!(phases.iter().any(|p| p == "copy"), "{phases:?}");
    assert_eq!(keyless_count(&cluster.client).await, rows);
    assert_verified(&cluster.client).await;
    drop(n4);
}

/// A cancel while rows are being copied to a live joining node: the job stops before the
/// switch, the sources keep every row and drop their fences and capture, and the copies on the
/// target are deleted, so `verify` finds no row twice with the node still joining.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_during_the_copy_leaves_no_copy_behind() {
    cancel_during_the_copy(false).await;
}

/// The same, with the proxy killed right after it answered the cancel, before the job could
/// read it (each copy page pauses 150 ms): the restarted proxy resumes the job from its state
/// file and stops it, since the cancel was recorded there before the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_answered_before_a_proxy_crash_still_stops_the_job() {
    cancel_during_the_copy(true).await;
}

async fn cancel_during_the_copy(kill_proxy: bool) {
    let mut cluster = start().await;
    let _n4 = add_n4(&cluster).await;
    let (status, body) = cluster
        .client
        .post("/v1/cluster/rebalance", Value::Null)
        .await;
    assert_eq!(status, 202, "{body}");
    wait_for_phase(&cluster.client, "copy").await;
    let (status, body) = cluster.client.delete("/v1/cluster/rebalance").await;
    assert_eq!(status, 202, "{body}");
    if kill_proxy {
        cluster.proxy.kill();
        cluster.restart_proxy();
    }
    let job = wait_for_rebalance(&cluster.client, Duration::from_secs(120)).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert!(
        job["error"].as_str().unwrap().contains("cancelled"),
        "{job}"
    );

    let n4_rows = shardlite_tests::keys_in_file(&cluster.dir.path().join("n4.db"), "users");
    assert!(n4_rows.is_empty(), "n4 keeps {} copies", n4_rows.len());
    let report = assert_verified(&cluster.client).await;
    assert_eq!(report["rows_total"], ROWS, "{report}");
    assert_eq!(
        member_state(&cluster.client, "n4").await.as_deref(),
        Some("joining")
    );
    for i in 1..=3 {
        let db = cluster.db(&format!("n{i}"));
        assert_eq!(
            transfer_leftovers(&db),
            (0, 0),
            "n{i} keeps no capture, log or fence"
        );
    }
}
