//! Online rebalance (contract guarantees 2–4): writers keep going while a node joins, leaves or
//! changes weight;
//! afterwards the history checks out, `verify` is clean, and only rows whose owner changed moved.
//! The join is also run on a `WITHOUT ROWID` table, which a node cleans up by key, not by rowid.

use serde_json::{Value, json};
use shardlite_tests::history::{self, Writers};
use shardlite_tests::{
    Client, TestCluster, assert_verified, keys_in_file, preload_users, rebalance_and_wait, ring_of,
    sample_migrations, table_sql_in_file, transfer_leftovers,
};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

const PRELOADED: usize = 4000;
const WRITERS: u64 = 4;

fn start_writers(client: &Client) -> Writers {
    Writers::start(client, WRITERS, 40, history::seed("SHARDLITE_TEST_SEED"))
}

/// The writers' history checks out (see [`Writers::finish`]) and they saw under 1% errors;
/// how many ops they made.
async fn finish_writers(writers: Writers, client: &Client) -> u64 {
    let (logs, _) = writers.finish(client).await;
    let (ops, errors, _) = history::summary(&logs);
    assert!(
        (errors as f64) < ops as f64 * 0.01,
        "{errors} errors in {ops} ops"
    );
    ops
}

async fn preload(client: &Client) -> Vec<String> {
    preload_users(client, "still", PRELOADED).await
}

/// Where each key's row is, read from the node files.
fn placement(cluster: &TestCluster) -> HashMap<String, Vec<String>> {
    let mut at: HashMap<String, Vec<String>> = HashMap::new();
    for node in &cluster.nodes {
        for key in keys_in_file(&node.db, "users") {
            at.entry(key).or_default().push(node.id.clone());
        }
    }
    at
}

/// No node keeps a capture, change log or fence once a job is done.
fn assert_no_leftovers(cluster: &TestCluster) {
    for node in &cluster.nodes {
        assert_eq!(
            transfer_leftovers(&node.db),
            (0, 0),
            "no capture or fence left on {}",
            node.id
        );
    }
}

/// Every preloaded key is on exactly one node afterwards; it moved iff its owner changed, and
/// then only to its new owner.
fn assert_minimal_movement(
    before: &HashMap<String, Vec<String>>,
    after: &HashMap<String, Vec<String>>,
    old: &shardlite_ring::Ring,
    new: &shardlite_ring::Ring,
    keys: &[String],
) -> usize {
    let mut moved = 0;
    for key in keys {
        let was = &before[key];
        let now = after.get(key).unwrap_or_else(|| panic!("{key} was lost"));
        assert_eq!(was.len(), 1, "{key} on {was:?} before");
        assert_eq!(now.len(), 1, "{key} on {now:?} after: one copy only");
        let (old_owner, new_owner) = (
            old.lookup(key).unwrap().as_str(),
            new.lookup(key).unwrap().as_str(),
        );
        assert_eq!(was[0], old_owner);
        assert_eq!(now[0], new_owner, "{key} lives on its new owner");
        if old_owner != new_owner {
            moved += 1;
        }
    }
    moved
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_a_node_while_writing_loses_nothing_and_moves_only_to_it() {
    join_while_writing(TestCluster::start(3).await).await;
}

/// The sample migration of `users`, with the table declared `WITHOUT ROWID`. A node walks such
/// a table by key, not by rowid, to clean up after a move, and its capture triggers must see
/// the deletes an `INSERT OR REPLACE` makes there; the join below runs through both.
fn users_without_rowid() -> String {
    let sample = std::fs::read_to_string(sample_migrations().join("0001_users.sql")).unwrap();
    // The first `);` closes `CREATE TABLE users (...)`.
    let sql = sample.replacen(");", ") WITHOUT ROWID;", 1);
    assert!(
        sql.contains("CREATE TABLE users") && sql != sample,
        "{sample}"
    );
    sql
}

/// The join of [`adding_a_node_while_writing_loses_nothing_and_moves_only_to_it`] on a
/// `WITHOUT ROWID` table: the writers' keyed upserts, `INSERT OR REPLACE`s, statement lists and
/// deletes go to it as they are, and the history, `verify` and placement must check out the
/// same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_a_node_to_a_without_rowid_table_while_writing_loses_nothing() {
    let cluster = TestCluster::start_bare(3).await;
    let (status, body) = cluster
        .client
        .post(
            "/v1/cluster/migrations",
            json!({ "migrations": [
                { "version": 1, "name": "0001_users", "sql": users_without_rowid() },
            ] }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // Read from a node's file, so the test cannot quietly fall back to the rowid path.
    let sql = table_sql_in_file(&cluster.nodes[0].db, "users");
    assert!(sql.contains("WITHOUT ROWID"), "{sql}");
    join_while_writing(cluster).await;
}

/// Writers run on `users` while a fourth node joins and the rebalance moves rows to it: the
/// dry run plans moves only to it, the writers' history checks out, each preloaded row moved
/// iff its owner changed (about a quarter did), `verify` is clean, and no node keeps a capture
/// or fence.
async fn join_while_writing(mut cluster: TestCluster) {
    let client = cluster.client.clone();
    let still = preload(&client).await;
    let (_, before_cluster) = client.get("/v1/cluster").await;
    let before = placement(&cluster);
    let writers = start_writers(&client);
    tokio::time::sleep(Duration::from_millis(100)).await;

    cluster.add_node("n4").await;
    let (status, plan) = client
        .post("/v1/cluster/rebalance?dry_run=true", Value::Null)
        .await;
    assert_eq!(status, 200, "{plan}");
    assert!(
        plan["moves"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["to"] == "n4"),
        "{plan}"
    );
    let planned: u64 = plan["moves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["rows"].as_u64().unwrap())
        .sum();
    assert_eq!(plan["rows_to_move"], planned);
    // The same flag in a body asks for the same plan (a body is never ignored).
    let (status, again) = client
        .post("/v1/cluster/rebalance", json!({ "dry_run": true }))
        .await;
    assert_eq!(status, 200, "{again}");
    let pairs = |plan: &Value| -> Vec<(Value, Value)> {
        plan["moves"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["from"].clone(), m["to"].clone()))
            .collect()
    };
    // The writers run meanwhile, so only the pairs must agree, not the counts.
    assert_eq!(pairs(&again), pairs(&plan), "{again}");
    assert!(
        keys_in_file(&cluster.node("n4").db, "users").is_empty(),
        "the dry run moved nothing"
    );

    let done = rebalance_and_wait(&client).await;
    assert_eq!(done["state"], "done", "{done}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ops = finish_writers(writers, &client).await;
    assert!(ops > 100, "the writers ran during the job ({ops} ops)");

    let (_, after_cluster) = client.get("/v1/cluster").await;
    assert!(
        after_cluster["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["state"] == "active"),
        "{after_cluster}"
    );
    assert_eq!(
        after_cluster["epoch"].as_u64().unwrap(),
        before_cluster["epoch"].as_u64().unwrap() + 2,
        "join + switch"
    );
    let moved = assert_minimal_movement(
        &before,
        &placement(&cluster),
        &ring_of(&before_cluster),
        &ring_of(&after_cluster),
        &still,
    );
    let fraction = moved as f64 / still.len() as f64;
    assert!(
        (0.15..0.35).contains(&fraction),
        "about a quarter moved, got {fraction}"
    );

    assert_verified(&client).await;
    assert_no_leftovers(&cluster);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_node_while_writing_drains_it() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client.clone();
    let still = preload(&client).await;
    let (_, before_cluster) = client.get("/v1/cluster").await;
    let before = placement(&cluster);
    let writers = start_writers(&client);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let (status, body) = client.delete("/v1/cluster/nodes/n2").await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["state"], "leaving");
    // Asked again, the same answer, and nothing changes: the epoch stays.
    let (_, leaving) = client.get("/v1/cluster").await;
    let (status, body) = client.delete("/v1/cluster/nodes/n2").await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["state"], "leaving");
    let (_, again) = client.get("/v1/cluster").await;
    assert_eq!(again["epoch"], leaving["epoch"], "{again}");
    let done = rebalance_and_wait(&client).await;
    assert_eq!(done["state"], "done", "{done}");
    finish_writers(writers, &client).await;

    let (_, after_cluster) = client.get("/v1/cluster").await;
    let ids: Vec<&str> = after_cluster["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["n1", "n3"], "n2 left the topology");
    let after = placement(&cluster);
    let moved = assert_minimal_movement(
        &before,
        &after,
        &ring_of(&before_cluster),
        &ring_of(&after_cluster),
        &still,
    );
    let on_n2 = before.values().filter(|at| at[0] == "n2").count();
    assert!(moved >= on_n2 - WRITERS as usize * 40, "n2's rows moved");
    assert!(
        keys_in_file(&cluster.node("n2").db, "users").is_empty(),
        "n2 is drained"
    );
    let report = assert_verified(&client).await;
    let per_node: BTreeMap<String, u64> = report["nodes"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v["rows"].as_u64().unwrap()))
        .collect();
    assert!(!per_node.contains_key("n2"), "{per_node:?}");

    // Drained and gone, the node was told to forget it was n2: it can join under another id.
    let url = cluster.node("n2").url.clone();
    let (status, body) = client
        .post("/v1/cluster/nodes", json!({ "id": "n5", "url": url }))
        .await;
    assert_eq!(status, 201, "{body}");
    cluster.stop().await;
}

/// A joining node lost during the copy: the job waits for it, retrying. `DELETE
/// /v1/cluster/rebalance` stops it before the switch: every row stays with its old owner and
/// stays readable, the sources keep no fence or capture, and the node can then be removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_waiting_for_a_lost_node_can_be_cancelled() {
    let mut cluster = TestCluster::start(3).await;
    let client = cluster.client.clone();
    let (status, body) = client.delete("/v1/cluster/rebalance").await;
    assert_eq!(status, 409, "nothing runs, nothing to cancel: {body}");
    let keys = preload_users(&client, "lost", 300).await;

    cluster.add_node("n4").await;
    let n4 = cluster.nodes.iter_mut().find(|n| n.id == "n4").unwrap();
    n4.stop().await;
    let (status, body) = client.post("/v1/cluster/rebalance", Value::Null).await;
    assert_eq!(status, 202, "{body}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, job) = client.get("/v1/cluster/rebalance").await;
        let error = job["error"].as_str().unwrap_or("");
        if error.contains("retrying") && error.contains("n4") {
            assert_eq!(job["state"], "running", "{job}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never waited for n4: {job}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (status, body) = client.delete("/v1/cluster/rebalance").await;
    assert_eq!(status, 202, "{body}");
    let job = shardlite_tests::wait_for_rebalance(&client, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert!(
        job["error"].as_str().unwrap().contains("cancelled"),
        "{job}"
    );
    let (status, body) = client.delete("/v1/cluster/rebalance").await;
    assert_eq!(
        status, 409,
        "a stopped job cannot be cancelled again: {body}"
    );

    for node in cluster.nodes.iter().filter(|n| n.id != "n4") {
        assert_eq!(
            transfer_leftovers(&node.db),
            (0, 0),
            "{} keeps nothing",
            node.id
        );
    }
    for key in &keys {
        let (status, body) = client.get(&Client::row_path("users", key)).await;
        assert_eq!(status, 200, "{key}: {body}");
    }
    let (status, body) = client
        .put(
            &Client::row_path("users", &keys[0]),
            json!({ "name": "after" }),
        )
        .await;
    assert_eq!(status, 200, "writes go on: {body}");

    let (status, body) = client.delete("/v1/cluster/nodes/n4").await;
    assert!(
        status.is_success(),
        "the lost node can now be removed: {body}"
    );
    let (_, topology) = client.get("/v1/cluster").await;
    assert_eq!(topology["nodes"].as_array().unwrap().len(), 3, "{topology}");
    assert_verified(&client).await;
    cluster.stop().await;
}

/// A node joins empty (as in Redis Cluster): one that holds rows is refused with a 409 that
/// says what it holds, and the refusal changes nothing, neither the topology nor the node,
/// which is not claimed. Emptied, it joins. Without the check the node below joined holding a
/// row that no rebalance moves, and `verify` counted it misplaced for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_holds_rows_is_refused_until_it_is_empty() {
    let mut cluster = TestCluster::start(3).await;
    let client = cluster.client.clone();
    // A node that was in the cluster once: migrated, then left. It keeps its schema.
    cluster.add_node("n4").await;
    let (status, body) = client.delete("/v1/cluster/nodes/n4").await;
    assert!(status.is_success(), "{body}");
    let n4 = Client::new(&cluster.node("n4").url);
    // A row written to it directly: a key that lives on another node, a stale copy.
    let (status, body) = n4
        .put(
            &Client::row_path("users", "stray"),
            json!({ "name": "stale" }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = client
        .put(
            &Client::row_path("users", "stray"),
            json!({ "name": "current" }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, before) = client.get("/v1/cluster").await;

    let url = cluster.node("n4").url.clone();
    let (status, body) = client
        .post("/v1/cluster/nodes", json!({ "id": "n5", "url": url }))
        .await;
    assert_eq!(status, 409, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("holds 1 rows (users: 1)") && error.contains("fresh --db file"),
        "{error}"
    );
    let (_, after) = client.get("/v1/cluster").await;
    assert_eq!(after, before, "a refused node changes nothing");
    let (_, identity) = n4.get("/v1/identity").await;
    assert_eq!(
        identity["node"],
        Value::Null,
        "a refused node is not claimed"
    );

    let (status, body) = n4.delete(&Client::row_path("users", "stray")).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = client
        .post("/v1/cluster/nodes", json!({ "id": "n5", "url": url }))
        .await;
    assert_eq!(status, 201, "emptied, it joins: {body}");
    let (_, identity) = n4.get("/v1/identity").await;
    assert_eq!(identity["node"], "n5");
    let job = rebalance_and_wait(&client).await;
    assert_eq!(job["state"], "done", "{job}");
    let (status, row) = client.get(&Client::row_path("users", "stray")).await;
    assert_eq!(status, 200, "{row}");
    assert_eq!(row["name"], "current");
    assert_verified(&client).await;
    cluster.stop().await;
}

/// A node whose file carries a fence from a job of another cluster is refused: the fence
/// would refuse writes to ranges the node comes to own. Lifted, the node joins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_foreign_fence_is_refused_until_it_is_lifted() {
    let cluster = TestCluster::start(2).await;
    let client = cluster.client.clone();
    let foreign = shardlite_tests::InProcessNode::start("x", cluster.dir.path().join("x.db")).await;
    let node = Client::new(&foreign.url);
    let (status, body) = node
        .put(
            "/v1/transfer/fences",
            json!({ "job": "rebalance-elsewhere", "ranges": [[0, 1000]] }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, before) = client.get("/v1/cluster").await;
    let (status, body) = client
        .post(
            "/v1/cluster/nodes",
            json!({ "id": "n3", "url": foreign.url }),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("carries 1 fence(s)") && error.contains("fresh --db file"),
        "{error}"
    );
    let (_, after) = client.get("/v1/cluster").await;
    assert_eq!(after, before, "a refused node changes nothing");

    let (status, body) = node.delete("/v1/transfer/fences").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = client
        .post(
            "/v1/cluster/nodes",
            json!({ "id": "n3", "url": foreign.url }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    cluster.stop().await;
}

/// A joining node replaced by an empty one (its disk lost) has no tables: the job fails for
/// good, saying which node is behind and what to run, and nothing switched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_without_the_schema_fails_the_job_with_what_to_run() {
    let mut cluster = TestCluster::start(3).await;
    let client = cluster.client.clone();
    preload_users(&client, "behind", 300).await;
    cluster.add_node("n4").await;
    let n4 = cluster.nodes.iter_mut().find(|n| n.id == "n4").unwrap();
    let port = n4.port();
    n4.stop().await;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let empty = cluster.dir.path().join("n4-empty.db");
    *n4 = shardlite_tests::InProcessNode::start_on("n4", empty, listener).await;

    let job = rebalance_and_wait(&client).await;
    assert_eq!(job["state"], "failed", "{job}");
    let error = job["error"].as_str().unwrap();
    assert!(
        error.contains("node n4") && error.contains("shardlite migrate"),
        "{error}"
    );
    let (status, body) = client.delete("/v1/cluster/nodes/n4").await;
    assert!(status.is_success(), "{body}");
    assert_verified(&client).await;
    cluster.stop().await;
}

/// The weight of each node in a `GET /v1/cluster` answer, and its pending one.
fn weights(cluster: &Value) -> BTreeMap<String, (u64, Option<u64>)> {
    cluster["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["id"].as_str().unwrap().to_owned(),
                (n["weight"].as_u64().unwrap(), n["next_weight"].as_u64()),
            )
        })
        .collect()
}

/// An active node's weight changes at the next rebalance: raised while writers run, rows move
/// only to it; lowered again, only from it. Until the job, nothing moves and routing stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reweighting_a_node_moves_rows_only_to_or_from_it() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client.clone();
    let still = preload(&client).await;
    let (_, before_cluster) = client.get("/v1/cluster").await;

    // Bad asks change nothing.
    for (body, status) in [
        (json!({}), 400),
        (json!({ "weight": 0 }), 400),
        (json!({ "weight": 2, "force": true }), 400),
        (json!({ "weight": "3" }), 400),
    ] {
        let (got, answer) = client.patch("/v1/cluster/nodes/n1", body.clone()).await;
        assert_eq!(got, status, "{body}: {answer}");
        assert!(answer["error"].is_string(), "{answer}");
    }
    let (got, answer) = client
        .patch("/v1/cluster/nodes/n9", json!({ "weight": 2 }))
        .await;
    assert_eq!(got, 404, "{answer}");
    let (_, unchanged) = client.get("/v1/cluster").await;
    assert_eq!(unchanged["epoch"], before_cluster["epoch"], "{unchanged}");

    let before = placement(&cluster);
    let writers = start_writers(&client);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, node) = client
        .patch("/v1/cluster/nodes/n1", json!({ "weight": 3 }))
        .await;
    assert_eq!(status, 200, "{node}");
    assert_eq!(
        (&node["weight"], &node["next_weight"]),
        (&json!(1), &json!(3))
    );
    let (_, pending) = client.get("/v1/cluster").await;
    assert_eq!(weights(&pending)["n1"], (1, Some(3)), "{pending}");
    assert_verified(&client).await;
    let pending_placement = placement(&cluster);
    for key in &still {
        assert_eq!(
            pending_placement[key], before[key],
            "{key}: nothing moves before the job"
        );
    }

    let (status, plan) = client
        .post("/v1/cluster/rebalance?dry_run=true", Value::Null)
        .await;
    assert_eq!(status, 200, "{plan}");
    assert_eq!(
        plan["weights"],
        json!([{ "id": "n1", "weight": 1, "next_weight": 3 }]),
        "{plan}"
    );
    let moves = plan["moves"].as_array().unwrap();
    assert!(!moves.is_empty(), "{plan}");
    assert!(moves.iter().all(|m| m["to"] == "n1"), "{plan}");

    let done = rebalance_and_wait(&client).await;
    assert_eq!(done["state"], "done", "{done}");
    let ops = finish_writers(writers, &client).await;
    assert!(ops > 100, "the writers ran during the job ({ops} ops)");
    let (_, raised) = client.get("/v1/cluster").await;
    assert_eq!(weights(&raised)["n1"], (3, None), "{raised}");
    let (old_ring, new_ring) = (ring_of(&before_cluster), ring_of(&raised));
    let after = placement(&cluster);
    let moved = assert_minimal_movement(&before, &after, &old_ring, &new_ring, &still);
    for key in &still {
        if old_ring.lookup(key) != new_ring.lookup(key) {
            assert_eq!(new_ring.lookup(key).unwrap().as_str(), "n1", "{key}");
        }
    }
    // n1 goes from a third of the ring to three fifths.
    let fraction = moved as f64 / still.len() as f64;
    assert!(
        (0.15..0.40).contains(&fraction),
        "about a quarter moved, got {fraction}"
    );
    assert_verified(&client).await;

    // Lowered again: rows only leave n1, and the ring is the first one again.
    let (status, node) = client
        .patch("/v1/cluster/nodes/n1", json!({ "weight": 1 }))
        .await;
    assert_eq!(status, 200, "{node}");
    let done = rebalance_and_wait(&client).await;
    assert_eq!(done["state"], "done", "{done}");
    let (_, lowered) = client.get("/v1/cluster").await;
    assert_eq!(weights(&lowered)["n1"], (1, None), "{lowered}");
    let back = placement(&cluster);
    assert_minimal_movement(&after, &back, &new_ring, &ring_of(&lowered), &still);
    for key in &still {
        assert_eq!(back[key], before[key], "{key} is back where it was");
    }
    let report = assert_verified(&client).await;
    assert!(report["rows_total"].as_u64().unwrap() >= still.len() as u64);

    // A node removed with a weight pending gives all it owns away; the pending weight goes.
    let (status, node) = client
        .patch("/v1/cluster/nodes/n2", json!({ "weight": 2 }))
        .await;
    assert_eq!(status, 200, "{node}");
    let (status, body) = client.delete("/v1/cluster/nodes/n2").await;
    assert_eq!(status, 202, "{body}");
    let (_, leaving) = client.get("/v1/cluster").await;
    assert_eq!(weights(&leaving)["n2"], (1, None), "{leaving}");
    let (status, body) = client
        .patch("/v1/cluster/nodes/n2", json!({ "weight": 3 }))
        .await;
    assert_eq!(status, 409, "a leaving node's weight: {body}");
    let done = rebalance_and_wait(&client).await;
    assert_eq!(done["state"], "done", "{done}");
    let (_, drained) = client.get("/v1/cluster").await;
    assert_eq!(weights(&drained).keys().collect::<Vec<_>>(), ["n1", "n3"]);
    let report = assert_verified(&client).await;
    assert!(report["rows_total"].as_u64().unwrap() >= still.len() as u64);
    assert_no_leftovers(&cluster);
    cluster.stop().await;
}
