//! Group commit through the node's API. Most tests hold the writer thread inside a job, queue
//! requests one by one behind it (waiting until each is in the queue, so their order is known),
//! then let it go: everything queued is then one group, in that order.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::http::StatusCode;
use serde_json::{Value, json};
use shardlite_ring::hash_key;
use tokio::task::JoinHandle;

use crate::config::{NodeConfig, Synchronous};
use crate::http::tests::{TestNode, assert_refused, assert_stray, error_of, send};
use crate::state::NodeState;

/// Sends a request that will reach the writer, and returns once it is queued there.
async fn queue(
    node: &TestNode,
    method: &str,
    uri: &str,
    body: Option<Value>,
) -> JoinHandle<(StatusCode, Value)> {
    let before = node.state.queued_for_test();
    let state = node.state.clone();
    let (method, uri) = (method.to_owned(), uri.to_owned());
    let task = tokio::spawn(async move {
        let (status, _, body) = send(state, &method, &uri, body.map(|b| b.to_string())).await;
        (status, body)
    });
    // Not a sleep: each yield lets the spawned request run until it waits in the queue.
    while node.state.queued_for_test() == before {
        tokio::task::yield_now().await;
    }
    task
}

/// The answers of queued requests, in queue order.
async fn answers(tasks: Vec<JoinHandle<(StatusCode, Value)>>) -> Vec<(StatusCode, Value)> {
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(task.await.unwrap());
    }
    out
}

/// Queues `requests` in order behind a held writer, then lets it go: they all wait in the
/// queue at once, so the writer takes them as one group (split only at a job that runs
/// alone). Each request's answer, in order.
async fn queued_together(
    node: &TestNode,
    requests: Vec<(&str, &str, Option<Value>)>,
) -> Vec<(StatusCode, Value)> {
    let hold = node.state.hold_writer_for_test().await;
    let mut tasks = Vec::new();
    for (method, uri, body) in requests {
        tasks.push(queue(node, method, uri, body).await);
    }
    drop(hold);
    answers(tasks).await
}

fn statuses(got: &[(StatusCode, Value)]) -> Vec<StatusCode> {
    got.iter().map(|(status, _)| *status).collect()
}

/// (writes, commits) from `/v1/stats`.
async fn counts(node: &TestNode) -> (u64, u64) {
    let (status, stats) = node.call("GET", "/v1/stats", None).await;
    assert_eq!(status, StatusCode::OK, "{stats}");
    (
        stats["writes"].as_u64().unwrap(),
        stats["commits"].as_u64().unwrap(),
    )
}

/// Rows of a read-only query (a reader: it counts as no write).
async fn read(node: &TestNode, sql: &str) -> Vec<Value> {
    let (status, body) = node.sql(json!({"sql": sql, "readonly": true})).await;
    assert_eq!(status, StatusCode::OK, "{sql}: {body}");
    body["results"][0]["rows"].as_array().unwrap().clone()
}

fn synchronous(state: &NodeState) -> i64 {
    state.with_writer_for_test(|conn| {
        conn.query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap()
    })
}

#[tokio::test]
async fn the_writer_syncs_every_commit_by_default() {
    let node = TestNode::new().await;
    assert_eq!(synchronous(&node.state), 2, "FULL");
    let node = TestNode::with_config(|c| c.synchronous = Synchronous::Normal).await;
    assert_eq!(synchronous(&node.state), 1, "NORMAL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_that_arrive_together_are_one_job_split_only_by_the_limits() {
    // No hold here: the writer is idle and wakes as soon as anything is queued. Queued one by
    // one, 300 writes would start several groups; queued as one set, the first 256 are one
    // group and the other 44 the next.
    let node = TestNode::new().await;
    let before = counts(&node).await;
    let requests = (0..300).map(|i| {
        let state = node.state.clone();
        async move {
            let uri = format!("/v1/tables/counters/rows/{i}");
            send(state, "PUT", &uri, Some(json!({"n": i}).to_string()))
                .await
                .0
        }
    });
    let got = node
        .state
        .writes_together(futures::future::join_all(requests))
        .await;
    assert!(got.iter().all(|s| *s == StatusCode::OK), "{got:?}");
    let after = counts(&node).await;
    assert_eq!((after.0 - before.0, after.1 - before.1), (300, 2));
    assert_eq!(
        read(&node, "SELECT count(*) FROM counters").await,
        [json!([300])]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_that_finds_the_queue_full_waits_for_room() {
    let node = TestNode::new().await;
    let hold = node.state.hold_writer_for_test().await;
    // Fill the queue behind the held writer, without waiting for answers.
    let mut fillers = Vec::new();
    for i in 0..super::QUEUE_CAPACITY {
        let state = node.state.clone();
        fillers.push(tokio::spawn(async move {
            let uri = format!("/v1/tables/counters/rows/{i}");
            send(state, "PUT", &uri, Some(json!({"n": 1}).to_string()))
                .await
                .0
        }));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while node.state.queued_for_test() < super::QUEUE_CAPACITY {
        assert!(
            std::time::Instant::now() < deadline,
            "the queue did not fill"
        );
        tokio::task::yield_now().await;
    }
    let state = node.state.clone();
    let set = tokio::spawn(async move {
        let requests = (0..10).map(|i| {
            let state = state.clone();
            async move {
                let uri = format!("/v1/tables/counters/rows/{}", 100_000 + i);
                send(state, "PUT", &uri, Some(json!({"n": 2}).to_string()))
                    .await
                    .0
            }
        });
        state
            .writes_together(futures::future::join_all(requests))
            .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(
        !set.is_finished(),
        "nothing can answer while the writer is held"
    );
    drop(hold);
    let got = set.await.unwrap();
    assert!(got.iter().all(|s| *s == StatusCode::OK), "{got:?}");
    for filler in fillers {
        assert_eq!(filler.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(
        read(&node, "SELECT count(*) FROM counters WHERE n = 2").await,
        [json!([10])]
    );
}

#[tokio::test]
async fn writes_queued_together_share_one_commit() {
    let node = TestNode::new().await;
    let before = counts(&node).await;
    let hold = node.state.hold_writer_for_test().await;
    let mut tasks = Vec::new();
    // More than one group holds: the first 256 share a commit, the rest the next one.
    for i in 0..300 {
        let uri = format!("/v1/tables/counters/rows/{i}");
        tasks.push(queue(&node, "PUT", &uri, Some(json!({"n": i}))).await);
    }
    drop(hold);
    for (status, body) in answers(tasks).await {
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert_eq!(counts(&node).await, (before.0 + 300, before.1 + 2));
    assert_eq!(
        read(&node, "SELECT count(*), sum(n) FROM counters").await,
        [json!([300, 44850])]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_puts_are_all_acknowledged_and_present() {
    let node = TestNode::new().await;
    let tasks: Vec<_> = (0..400)
        .map(|i| {
            let state = node.state.clone();
            tokio::spawn(async move {
                let uri = format!("/v1/tables/users/rows/k{i}");
                send(state, "PUT", &uri, Some(json!({"age": i}).to_string())).await
            })
        })
        .collect();
    for task in tasks {
        let (status, _, body) = task.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert_eq!(
        read(&node, "SELECT count(*), sum(age) FROM users").await,
        [json!([400, 79800])]
    );
    let (writes, commits) = counts(&node).await;
    assert_eq!(writes, 400);
    assert!((1..=400).contains(&commits), "{commits} commits");
    node.assert_writer_clean();
}

/// Every way a request can fail, in one group: each fails alone, the others commit, and later
/// requests see what earlier ones wrote.
#[tokio::test]
async fn a_failing_request_fails_alone_in_its_group() {
    let node = TestNode::new().await;
    let ok = |status: StatusCode, body: &Value| assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = node
        .call(
            "PUT",
            "/v1/tables/users/rows/taken",
            Some(json!({"email": "x@y"})),
        )
        .await;
    ok(status, &body);
    let h = hash_key("fenced");
    let (status, body) = node
        .call(
            "PUT",
            "/v1/transfer/fences",
            Some(json!({"job": "j", "ranges": [[h, h]]})),
        )
        .await;
    ok(status, &body);
    let before = counts(&node).await;

    let requests = [
        ("PUT", "/v1/tables/users/rows/a", json!({"name": "A"})),
        // UNIQUE(email)
        ("PUT", "/v1/tables/users/rows/dup", json!({"email": "x@y"})),
        (
            "POST",
            "/v1/sql",
            json!({"key": "c", "sql": "INSERT INTO nope VALUES (1)"}),
        ),
        ("PUT", "/v1/tables/users/rows/fenced", json!({})),
        ("DELETE", "/v1/tables/users/rows/missing", Value::Null),
        // OR ROLLBACK makes SQLite roll back the whole transaction, not just the statement.
        (
            "POST",
            "/v1/sql",
            json!({"key": "f", "statements": [
                {"sql": "INSERT INTO users (id) VALUES ('f')"},
                {"sql": "INSERT OR ROLLBACK INTO users (id, email) VALUES ('g', 'x@y')"},
            ]}),
        ),
        (
            "POST",
            "/v1/tables/users/rows",
            json!({"rows": [{"id": "b1"}, {"id": "b2"}]}),
        ),
        // The first statement wrote before the second failed: its savepoint undoes both.
        (
            "POST",
            "/v1/sql",
            json!({"key": "h", "statements": [
                {"sql": "INSERT INTO users (id) VALUES ('h')"},
                {"sql": "INSERT INTO counters (id, n) VALUES (1, NULL)"},
            ]}),
        ),
        // Likewise a batch whose second row breaks UNIQUE(email).
        (
            "POST",
            "/v1/tables/users/rows",
            json!({"rows": [{"id": "i1"}, {"id": "i2", "email": "x@y"}]}),
        ),
        ("DELETE", "/v1/tables/users/rows/taken", Value::Null),
        // Sees the delete just before it, in the same transaction.
        ("PUT", "/v1/tables/users/rows/dup2", json!({"email": "x@y"})),
    ];
    let requests = requests
        .into_iter()
        .map(|(method, uri, body)| (method, uri, (!body.is_null()).then_some(body)))
        .collect();
    let got = queued_together(&node, requests).await;
    assert_eq!(
        statuses(&got),
        [
            StatusCode::OK,
            StatusCode::CONFLICT,
            StatusCode::BAD_REQUEST,
            StatusCode::CONFLICT,
            StatusCode::NOT_FOUND,
            StatusCode::CONFLICT,
            StatusCode::OK,
            StatusCode::CONFLICT,
            StatusCode::CONFLICT,
            StatusCode::OK,
            StatusCode::OK,
        ],
        "{got:?}"
    );
    assert!(error_of(&got[1].1).contains("UNIQUE"), "{}", got[1].1);
    assert!(
        error_of(&got[2].1).contains("no such table"),
        "{}",
        got[2].1
    );
    assert_eq!(got[3].1["fenced"], true, "{}", got[3].1);
    assert!(error_of(&got[5].1).contains("UNIQUE"), "{}", got[5].1);
    assert!(error_of(&got[7].1).contains("NOT NULL"), "{}", got[7].1);
    assert!(error_of(&got[8].1).contains("UNIQUE"), "{}", got[8].1);

    assert_eq!(counts(&node).await, (before.0 + 11, before.1 + 1));
    assert_eq!(
        read(&node, "SELECT id FROM users ORDER BY id").await,
        [json!(["a"]), json!(["b1"]), json!(["b2"]), json!(["dup2"])]
    );
    node.assert_writer_clean();
}

/// A statement past its deadline: a read only loses its own savepoint; an interrupted write
/// makes SQLite roll back the whole transaction, and the group runs again without it.
#[tokio::test]
async fn a_timed_out_request_fails_alone_in_its_group() {
    let node =
        TestNode::with_config(|c| c.statement_timeout = std::time::Duration::from_millis(200))
            .await;
    let forever = "WITH RECURSIVE c(x) AS (SELECT 2 UNION ALL SELECT x + 1 FROM c) ";
    let before = counts(&node).await;
    let got = queued_together(
        &node,
        vec![
            ("PUT", "/v1/tables/counters/rows/1", Some(json!({}))),
            (
                "POST",
                "/v1/sql",
                Some(json!({
                    "key": "2",
                    "sql": format!("INSERT INTO counters (id) {forever} SELECT x FROM c"),
                })),
            ),
            (
                "POST",
                "/v1/sql",
                Some(json!({"key": "3", "statements": [
                    {"sql": "INSERT INTO counters (id) VALUES (-3)"},
                    {"sql": format!("{forever} SELECT count(*) FROM c")},
                ]})),
            ),
            ("PUT", "/v1/tables/counters/rows/4", Some(json!({}))),
        ],
    )
    .await;
    assert_eq!(
        statuses(&got),
        [
            StatusCode::OK,
            StatusCode::GATEWAY_TIMEOUT,
            StatusCode::GATEWAY_TIMEOUT,
            StatusCode::OK
        ],
        "{got:?}"
    );
    assert!(error_of(&got[1].1).contains("timed out"), "{}", got[1].1);
    assert_eq!(
        read(&node, "SELECT id FROM counters ORDER BY id").await,
        [json!([1]), json!([4])]
    );
    assert_eq!(counts(&node).await, (before.0 + 4, before.1 + 1));
    node.assert_writer_clean();
}

/// A deferred foreign key is checked only at COMMIT: the group is split, and only the request
/// that left the key dangling fails.
#[tokio::test]
async fn a_deferred_key_violation_fails_only_its_request() {
    let node = TestNode::new().await;
    let migration = json!({"migrations": [{"version": 3, "name": "children", "sql":
        "CREATE TABLE parents (id INTEGER PRIMARY KEY);
         CREATE TABLE children (id INTEGER PRIMARY KEY,
             parent INTEGER REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED);"}]});
    let (status, body) = node.call("POST", "/v1/migrations", Some(migration)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let before = counts(&node).await;
    let got = queued_together(
        &node,
        vec![
            ("PUT", "/v1/tables/parents/rows/1", Some(json!({}))),
            (
                "PUT",
                "/v1/tables/children/rows/10",
                Some(json!({"parent": 1})),
            ),
            (
                "PUT",
                "/v1/tables/children/rows/11",
                Some(json!({"parent": 99})),
            ),
            ("PUT", "/v1/tables/counters/rows/5", Some(json!({}))),
        ],
    )
    .await;
    assert_eq!(
        statuses(&got),
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::CONFLICT,
            StatusCode::OK
        ],
        "{got:?}"
    );
    assert!(error_of(&got[2].1).contains("FOREIGN KEY"), "{}", got[2].1);
    assert_eq!(
        read(&node, "SELECT id, parent FROM children").await,
        [json!([10, 1])]
    );
    assert_eq!(read(&node, "SELECT id FROM counters").await, [json!([5])]);
    // The failed group is not counted; its requests were, one commit each.
    assert_eq!(counts(&node).await, (before.0 + 4, before.1 + 3));
    node.assert_writer_clean();
}

/// The ordering the rebalance relies on: a fence queued behind writes commits after them (they
/// are in the change log), and writes queued after it see it.
#[tokio::test]
async fn a_fence_queued_behind_writes_commits_after_them() {
    let node = TestNode::new().await;
    let (status, body) = node
        .call("POST", "/v1/transfer/capture", Some(json!({})))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let before = counts(&node).await;
    let (h1, h2) = (hash_key("k1"), hash_key("k2"));
    let got = queued_together(
        &node,
        vec![
            (
                "PUT",
                "/v1/tables/users/rows/k1",
                Some(json!({"name": "before"})),
            ),
            ("PUT", "/v1/tables/users/rows/k2", Some(json!({}))),
            (
                "PUT",
                "/v1/transfer/fences",
                Some(json!({"job": "j", "ranges": [[h1, h1], [h2, h2]]})),
            ),
            (
                "PUT",
                "/v1/tables/users/rows/k1",
                Some(json!({"name": "after"})),
            ),
            // Names no key (the node called directly), writes a fenced one: caught by the
            // change log. (Keyed SQL may not update another key at all: `written`.)
            (
                "POST",
                "/v1/sql",
                Some(json!({"sql": "UPDATE users SET name = 'x' WHERE id = 'k2'"})),
            ),
        ],
    )
    .await;
    assert_eq!(
        statuses(&got),
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::CONFLICT,
            StatusCode::CONFLICT
        ],
        "{got:?}"
    );
    assert_eq!(got[2].1, json!({"fences": 2}));
    assert_eq!(got[3].1["fenced"], true, "{}", got[3].1);
    assert_eq!(got[4].1["fenced"], true, "{}", got[4].1);
    // One group before the fence, one after it.
    assert_eq!(counts(&node).await, (before.0 + 4, before.1 + 2));
    assert_eq!(
        read(&node, "SELECT id, name FROM users ORDER BY id").await,
        [json!(["k1", "before"]), json!(["k2", null])]
    );
    let (_, changes) = node
        .call("POST", "/v1/transfer/changes", Some(json!({})))
        .await;
    let keys: Vec<&Value> = changes["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| &c["key"])
        .collect();
    assert_eq!(keys, [&json!("k1"), &json!("k2")]);
}

#[tokio::test]
async fn a_panicking_group_is_rolled_back_and_the_writer_goes_on() {
    let node = TestNode::new().await;
    let panicked = Arc::new(AtomicBool::new(false));
    node.state.set_before_commit_hook({
        let panicked = Arc::clone(&panicked);
        move || {
            if !panicked.swap(true, Ordering::SeqCst) {
                panic!("a bug inside a group (this panic is part of the test)");
            }
        }
    });
    let (status, body) = node
        .call("PUT", "/v1/tables/counters/rows/1", Some(json!({})))
        .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert!(error_of(&body).contains("rolled it back"), "{body}");
    let (status, body) = node
        .call("PUT", "/v1/tables/counters/rows/2", Some(json!({})))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(read(&node, "SELECT id FROM counters").await, [json!([2])]);
    node.assert_writer_clean();
}

/// A migration may leave a TEMP table on the writer's connection: the writer closes that
/// connection and opens a new one, with every control in place.
#[tokio::test]
async fn a_writer_connection_that_carries_state_is_replaced() {
    let node = TestNode::new().await;
    let migration = json!({"migrations": [{"version": 3, "name": "scratch", "sql":
        "CREATE TEMP TABLE scratch (a); CREATE TABLE kept (id TEXT PRIMARY KEY);"}]});
    let (status, body) = node.call("POST", "/v1/migrations", Some(migration)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    node.assert_writer_clean();
    assert_eq!(synchronous(&node.state), 2);
    assert_refused(&node, "PRAGMA journal_mode = DELETE", "PRAGMA journal_mode").await;
    let (status, body) = node
        .call("PUT", "/v1/tables/kept/rows/x", Some(json!({})))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The new connection checks keyed SQL too, in the migration's new table as well.
    assert_stray(
        &node,
        json!({"key": "x", "sql": "INSERT INTO kept (id) VALUES ('y')"}),
        "y",
    )
    .await;
    assert_eq!(
        read(&node, "SELECT id FROM kept").await,
        [json!(["x"])],
        "the refused write changed nothing"
    );
}

/// A job that changes `synchronous` for one commit (a purge page) must put it back; if the
/// connection is left at another level anyway, the writer replaces it before client writes
/// could commit without the configured sync.
#[tokio::test]
async fn a_writer_connection_left_at_another_sync_level_is_replaced() {
    let node = TestNode::new().await;
    node.state
        .with_writer_for_test(|conn| conn.execute_batch("PRAGMA synchronous = OFF"))
        .unwrap();
    assert_eq!(synchronous(&node.state), 2);
    let (status, body) = node
        .call("PUT", "/v1/tables/counters/rows/1", Some(json!({"n": 1})))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// When the last handle on the node goes, the writer finishes what is queued, even writes
/// whose clients went away, and closes the file: the WAL is checkpointed and removed.
#[tokio::test]
async fn dropping_the_node_finishes_queued_writes_and_closes_the_file() {
    let node = TestNode::new().await;
    let hold = node.state.hold_writer_for_test().await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let uri = format!("/v1/tables/counters/rows/{i}");
        tasks.push(queue(&node, "PUT", &uri, Some(json!({"n": 1}))).await);
    }
    // The clients give up; their writes stay queued.
    for task in tasks {
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
    }
    assert_eq!(node.state.queued_for_test(), 20);
    let TestNode { dir, state } = node;
    let wal = dir.path().join("node.db-wal");
    assert!(wal.exists());
    drop(hold);
    // The last handle: waits for the writer thread to drain the queue and exit.
    drop(state);
    assert!(!wal.exists(), "the writer's connection was not closed");
    let node = TestNode {
        state: NodeState::open(NodeConfig::new(dir.path().join("node.db"))).unwrap(),
        dir,
    };
    assert_eq!(
        read(&node, "SELECT count(*), sum(n) FROM counters").await,
        [json!([20, 20])]
    );
}

/// What a client write's work holds is dropped before the write is answered: once answered,
/// the node may be shut down, and if the writer thread then held the last `NodeState` (a work
/// that kept one), nothing would wait for it to close the file.
#[tokio::test]
async fn a_client_writes_work_is_dropped_before_its_answer() {
    struct SlowDrop(Arc<AtomicBool>);
    impl Drop for SlowDrop {
        fn drop(&mut self) {
            // Slow enough that an answer sent first is seen before the drop ends.
            std::thread::sleep(std::time::Duration::from_millis(50));
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let node = TestNode::new().await;
    let dropped = Arc::new(AtomicBool::new(false));
    let held = SlowDrop(Arc::clone(&dropped));
    node.state
        .client_write(vec!["k".into()], 1, move |_| {
            let _ = &held;
            Ok(())
        })
        .await
        .unwrap();
    assert!(
        dropped.load(Ordering::SeqCst),
        "the work was still alive when its answer came"
    );
}
