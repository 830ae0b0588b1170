//! `/v1/transfer/*` and the fences on client writes, through `router(state).oneshot(...)`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use serde_json::{Value, json};
use shardlite_ring::hash_key;

use crate::config::NodeConfig;
use crate::http::tests::{TestNode, assert_refused, assert_stray, error_of, send};
use crate::state::NodeState;

/// The lower half of the ring, and the upper.
const LOW: (u32, u32) = (0, u32::MAX / 2);
const HIGH: (u32, u32) = (u32::MAX / 2 + 1, u32::MAX);

fn in_range(key: &str, (start, end): (u32, u32)) -> bool {
    (start..=end).contains(&hash_key(key))
}

async fn ok(node: &TestNode, method: &str, uri: &str, body: Option<Value>) -> Value {
    let (status, body) = node.call(method, uri, body).await;
    assert_eq!(status, StatusCode::OK, "{method} {uri}: {body}");
    body
}

async fn capture_on(node: &TestNode) -> i64 {
    let body = ok(node, "POST", "/v1/transfer/capture", Some(json!({}))).await;
    body["max_seq"].as_i64().unwrap()
}

/// The logged (table, key) pairs after `after`, checking seq order and `max_seq`.
async fn changes_after(node: &TestNode, after: i64) -> Vec<(String, Value)> {
    let body = ok(
        node,
        "POST",
        "/v1/transfer/changes",
        Some(json!({"after": after})),
    )
    .await;
    assert_eq!(body["capturing"], true, "{body}");
    let changes = body["changes"].as_array().unwrap();
    let seqs: Vec<i64> = changes.iter().map(|c| c["seq"].as_i64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{body}");
    assert!(seqs.iter().all(|&s| s > after), "{body}");
    assert_eq!(
        body["max_seq"],
        seqs.last().copied().unwrap_or(after),
        "{body}"
    );
    changes
        .iter()
        .map(|c| (c["table"].as_str().unwrap().to_owned(), c["key"].clone()))
        .collect()
}

fn users(keys: &[&str]) -> Vec<(String, Value)> {
    keys.iter()
        .map(|k| ("users".to_owned(), json!(k)))
        .collect()
}

/// Fences exactly the hash of each key, for job `j1`.
async fn fence(node: &TestNode, keys: &[&str]) {
    let ranges: Vec<Value> = keys
        .iter()
        .map(|k| json!([hash_key(k), hash_key(k)]))
        .collect();
    let body = ok(
        node,
        "PUT",
        "/v1/transfer/fences",
        Some(json!({"job": "j1", "ranges": ranges})),
    )
    .await;
    assert_eq!(body, json!({"fences": keys.len()}));
}

/// Sends a request that a fence must refuse, and checks the refusal's three marks.
async fn assert_fenced(node: &TestNode, method: &str, uri: &str, body: Value, key: &str) {
    let (status, headers, body) =
        send(node.state.clone(), method, uri, Some(body.to_string())).await;
    assert_eq!(status, StatusCode::CONFLICT, "{method} {uri}: {body}");
    assert_eq!(body["fenced"], true, "{body}");
    assert_eq!(
        error_of(&body),
        format!(
            "key {key} is in a range that is moving to another node (rebalance in progress); \
             retry shortly"
        )
    );
    assert_eq!(headers["x-shardlite-fenced"], "1");
    node.assert_writer_clean();
}

async fn get_user(node: &TestNode, key: &str) -> (StatusCode, Value) {
    node.call("GET", &format!("/v1/tables/users/rows/{key}"), None)
        .await
}

/// Reopens the node's file, as after a restart.
fn reopen(node: TestNode) -> TestNode {
    let TestNode { dir, state } = node;
    drop(state);
    let state = NodeState::open(NodeConfig::new(dir.path().join("node.db"))).unwrap();
    TestNode { dir, state }
}

/// `counters` rows 1..=n, in one batch.
async fn counters(node: &TestNode, n: i64) {
    let rows: Vec<Value> = (1..=n).map(|i| json!({"id": i})).collect();
    ok(
        node,
        "POST",
        "/v1/tables/counters/rows",
        Some(json!({"rows": rows})),
    )
    .await;
}

/// Upserts users with the given ids and no other column.
async fn add_users(node: &TestNode, ids: &[String]) {
    let rows: Vec<Value> = ids.iter().map(|id| json!({"id": id})).collect();
    ok(
        node,
        "POST",
        "/v1/tables/users/rows",
        Some(json!({"rows": rows})),
    )
    .await;
}

// ---- capture ----

#[tokio::test]
async fn capture_logs_every_write_path() {
    let node = TestNode::new().await;
    ok(
        &node,
        "PUT",
        "/v1/tables/users/rows/a",
        Some(json!({"email": "a@x"})),
    )
    .await;
    ok(&node, "PUT", "/v1/tables/users/rows/b", Some(json!({}))).await;
    ok(&node, "PUT", "/v1/tables/counters/rows/1", Some(json!({}))).await;
    // What was written before capture is not in the log.
    assert_eq!(capture_on(&node).await, 0);

    ok(
        &node,
        "PUT",
        "/v1/tables/users/rows/u1",
        Some(json!({"name": "Ann"})),
    )
    .await;
    let (status, body) = node
        .sql(json!({"key": "u1", "sql": "UPDATE users SET name = 'Bo' WHERE id = 'u1'"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // An update of another key's row: keyed SQL may not make one (`written`), but the node's
    // own writes are logged all the same.
    node.state.with_writer_for_test(|conn| {
        conn.execute("UPDATE counters SET n = 5 WHERE id = 1", [])
            .unwrap();
    });
    ok(&node, "DELETE", "/v1/tables/users/rows/b", None).await;
    ok(
        &node,
        "POST",
        "/v1/tables/users/rows",
        Some(json!({"rows": [{"id": "c"}, {"id": "d"}]})),
    )
    .await;
    // REPLACE resolves the UNIQUE email conflict by deleting row `a`: with recursive
    // triggers on, that delete is logged too.
    let (status, body) = node
        .sql(json!({"key": "e",
                    "sql": "INSERT OR REPLACE INTO users (id, email) VALUES ('e', 'a@x')"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(get_user(&node, "a").await.0, StatusCode::NOT_FOUND);

    let mut expected = users(&["u1", "u1"]);
    expected.push(("counters".into(), json!(1)));
    expected.extend(users(&["b", "c", "d", "a", "e"]));
    assert_eq!(changes_after(&node, 0).await, expected);
}

#[tokio::test]
async fn a_key_change_logs_both_keys_and_other_updates_one() {
    let node = TestNode::new().await;
    ok(&node, "PUT", "/v1/tables/users/rows/c", Some(json!({}))).await;
    capture_on(&node).await;
    // Keyed SQL may not change a key (`written`); the node's own writes still log both.
    node.state.with_writer_for_test(|conn| {
        conn.execute_batch(
            "UPDATE users SET id = 'z' WHERE id = 'c';
             UPDATE users SET name = 'n' WHERE id = 'z';",
        )
        .unwrap();
    });
    assert_eq!(changes_after(&node, 0).await, users(&["c", "z", "z"]));
}

#[tokio::test]
async fn capture_is_idempotent_and_capture_off_removes_everything() {
    let node = TestNode::new().await;
    assert_eq!(
        ok(&node, "POST", "/v1/transfer/changes", Some(json!({}))).await,
        json!({"changes": [], "max_seq": 0, "capturing": false})
    );
    assert_eq!(capture_on(&node).await, 0);
    ok(&node, "PUT", "/v1/tables/users/rows/x", Some(json!({}))).await;
    // Again: the log and its seq are kept, and the triggers are not doubled.
    assert_eq!(capture_on(&node).await, 1);
    ok(&node, "PUT", "/v1/tables/users/rows/y", Some(json!({}))).await;
    assert_eq!(changes_after(&node, 0).await, users(&["x", "y"]));
    let stats = ok(&node, "GET", "/v1/stats", None).await;
    assert_eq!(stats["capturing"], true);

    assert_eq!(
        ok(&node, "DELETE", "/v1/transfer/capture", None).await,
        json!({})
    );
    let left: i64 = node.state.with_writer_for_test(|conn| {
        conn.query_row(
            "SELECT count(*) FROM sqlite_schema WHERE name LIKE '_shardlite_capture%' \
             OR name = '_shardlite_changes'",
            [],
            |r| r.get(0),
        )
        .unwrap()
    });
    assert_eq!(left, 0, "capture left triggers or the log behind");
    ok(&node, "PUT", "/v1/tables/users/rows/z", Some(json!({}))).await;
    assert_eq!(
        ok(
            &node,
            "POST",
            "/v1/transfer/changes",
            Some(json!({"after": 0}))
        )
        .await,
        json!({"changes": [], "max_seq": 0, "capturing": false})
    );
    // Off twice is harmless too.
    ok(&node, "DELETE", "/v1/transfer/capture", None).await;
    let stats = ok(&node, "GET", "/v1/stats", None).await;
    assert_eq!(stats["capturing"], false);
    assert_eq!(stats["rows"], 3);
}

#[tokio::test]
async fn capture_survives_a_restart() {
    let node = TestNode::new().await;
    capture_on(&node).await;
    let node = reopen(node);
    ok(&node, "PUT", "/v1/tables/users/rows/r", Some(json!({}))).await;
    assert_eq!(changes_after(&node, 0).await, users(&["r"]));
    let stats = ok(&node, "GET", "/v1/stats", None).await;
    assert_eq!(stats["capturing"], true);
}

#[tokio::test]
async fn changes_page_in_seq_order() {
    let node = TestNode::new().await;
    capture_on(&node).await;
    for k in ["p1", "p2", "p3", "p4", "p5"] {
        ok(
            &node,
            "PUT",
            &format!("/v1/tables/users/rows/{k}"),
            Some(json!({})),
        )
        .await;
    }
    let page = ok(
        &node,
        "POST",
        "/v1/transfer/changes",
        Some(json!({"after": 2, "limit": 2})),
    )
    .await;
    assert_eq!(
        page,
        json!({"changes": [
            {"seq": 3, "table": "users", "key": "p3"},
            {"seq": 4, "table": "users", "key": "p4"},
        ], "max_seq": 5, "capturing": true})
    );
    let (status, _) = node
        .call("POST", "/v1/transfer/changes", Some(json!({"limit": 0})))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn client_sql_cannot_reach_the_change_log_or_fences_but_is_logged() {
    let node = TestNode::new().await;
    ok(&node, "PUT", "/v1/tables/users/rows/u0", Some(json!({}))).await;
    capture_on(&node).await;
    fence(&node, &["fenced-key"]).await;
    for sql in [
        "SELECT * FROM _shardlite_changes",
        "SELECT count(*) FROM _SHARDLITE_CHANGES",
        "INSERT INTO _shardlite_changes (tbl, key) VALUES ('users', 'x')",
        "UPDATE _shardlite_changes SET key = 'x'",
        "DELETE FROM _shardlite_changes",
        "SELECT * FROM _shardlite_fences",
        "INSERT INTO _shardlite_fences VALUES (0, 1, 'j')",
        "DELETE FROM _shardlite_fences",
    ] {
        assert_refused(&node, sql, "internal to shardlite").await;
    }
    let (status, body) = node
        .sql(json!({"key": "via-sql", "sql": "INSERT INTO users (id) VALUES ('via-sql')"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(changes_after(&node, 0).await, users(&["via-sql"]));
    let fences = ok(&node, "GET", "/v1/transfer/fences", None).await;
    assert_eq!(fences["fences"].as_array().unwrap().len(), 1);
}

// ---- fences ----

#[tokio::test]
async fn fenced_keys_refuse_every_write_path_and_still_read() {
    let node = TestNode::new().await;
    ok(
        &node,
        "PUT",
        "/v1/tables/users/rows/u1",
        Some(json!({"name": "Ann"})),
    )
    .await;
    capture_on(&node).await;
    fence(&node, &["u1"]).await;
    let row = "/v1/tables/users/rows/u1";

    assert_fenced(&node, "PUT", row, json!({"name": "X"}), "u1").await;
    let (status, _, body) = send(node.state.clone(), "DELETE", row, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["fenced"], true);
    // One fenced row refuses the whole batch.
    assert_fenced(
        &node,
        "POST",
        "/v1/tables/users/rows",
        json!({"rows": [{"id": "u2"}, {"id": "u1", "name": "X"}]}),
        "u1",
    )
    .await;
    assert_fenced(
        &node,
        "POST",
        "/v1/sql",
        json!({"key": "u1", "sql": "UPDATE users SET name = 'X' WHERE id = 'u1'"}),
        "u1",
    )
    .await;
    // Routed by an unfenced key, but updates a fenced one: refused, as an update of another
    // key always is (`written`).
    assert_stray(
        &node,
        json!({"key": "u2", "statements": [
            {"sql": "INSERT INTO users (id) VALUES ('u2')"},
            {"sql": "UPDATE users SET name = 'X' WHERE id = 'u1'"},
        ]}),
        "u1",
    )
    .await;
    // Names no key (the node called directly): the change log catches the fenced key.
    assert_fenced(
        &node,
        "POST",
        "/v1/sql",
        json!({"sql": "UPDATE users SET name = 'X'"}),
        "u1",
    )
    .await;

    // Nothing was written, and the refused writes logged nothing.
    assert_eq!(changes_after(&node, 0).await, []);
    let (status, row) = get_user(&node, "u1").await;
    assert_eq!((status, &row["name"]), (StatusCode::OK, &json!("Ann")));
    assert_eq!(get_user(&node, "u2").await.0, StatusCode::NOT_FOUND);
    let (status, body) = node
        .sql(
            json!({"sql": "SELECT name FROM users WHERE id = 'u1'", "readonly": true,
                    "key": "u1"}),
        )
        .await;
    assert_eq!(
        (status, &body["results"][0]["rows"]),
        (StatusCode::OK, &json!([["Ann"]]))
    );

    // Other keys write as usual.
    ok(&node, "PUT", "/v1/tables/users/rows/u2", Some(json!({}))).await;
    let (status, body) = node
        .sql(json!({"key": "u3", "sql": "INSERT INTO users (id) VALUES ('u3')"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    ok(&node, "DELETE", "/v1/tables/users/rows/u2", None).await;
    assert_eq!(changes_after(&node, 0).await, users(&["u2", "u3", "u2"]));
    let stats = ok(&node, "GET", "/v1/stats", None).await;
    assert_eq!(stats["fences"], 1);
}

#[tokio::test]
async fn fences_survive_a_restart_until_deleted() {
    let node = TestNode::new().await;
    let h = hash_key("u1");
    let body = ok(
        &node,
        "PUT",
        "/v1/transfer/fences",
        Some(json!({"job": "j1", "ranges": [[h, h], [10, 20]]})),
    )
    .await;
    assert_eq!(body, json!({"fences": 2}));
    let listed = json!({"fences": [
        {"start": 10, "end": 20, "job": "j1"},
        {"start": h, "end": h, "job": "j1"},
    ]});
    assert_eq!(ok(&node, "GET", "/v1/transfer/fences", None).await, listed);

    let node = reopen(node);
    assert_eq!(ok(&node, "GET", "/v1/transfer/fences", None).await, listed);
    assert_fenced(&node, "PUT", "/v1/tables/users/rows/u1", json!({}), "u1").await;
    assert_eq!(ok(&node, "GET", "/v1/stats", None).await["fences"], 2);

    // A PUT replaces every fence.
    ok(
        &node,
        "PUT",
        "/v1/transfer/fences",
        Some(json!({"job": "j2", "ranges": [[1, 2]]})),
    )
    .await;
    assert_eq!(
        ok(&node, "GET", "/v1/transfer/fences", None).await,
        json!({"fences": [{"start": 1, "end": 2, "job": "j2"}]})
    );
    ok(&node, "PUT", "/v1/tables/users/rows/u1", Some(json!({}))).await;

    fence(&node, &["u1"]).await;
    assert_eq!(
        ok(&node, "DELETE", "/v1/transfer/fences", None).await,
        json!({})
    );
    assert_eq!(
        ok(&node, "GET", "/v1/transfer/fences", None).await,
        json!({"fences": []})
    );
    let node = reopen(node);
    assert_eq!(
        ok(&node, "GET", "/v1/transfer/fences", None).await,
        json!({"fences": []})
    );
    ok(&node, "DELETE", "/v1/tables/users/rows/u1", None).await;
}

#[tokio::test]
async fn bad_fences_are_refused_and_change_nothing() {
    let node = TestNode::new().await;
    fence(&node, &["u1"]).await;
    for bad in [
        json!({"job": "j", "ranges": [[5, 4]]}),
        json!({"job": "j", "ranges": [[-1, 4]]}),
        json!({"job": "j", "ranges": [[0, 4_294_967_296_u64]]}),
        json!({"job": "j", "ranges": [[1, 2, 3]]}),
        json!({"job": "", "ranges": [[1, 2]]}),
        json!({"ranges": [[1, 2]]}),
    ] {
        let (status, body) = node
            .call("PUT", "/v1/transfer/fences", Some(bad.clone()))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        error_of(&body);
    }
    let fences = ok(&node, "GET", "/v1/transfer/fences", None).await;
    assert_eq!(fences["fences"][0]["job"], "j1");
    assert_eq!(fences["fences"].as_array().unwrap().len(), 1);
}

/// The Vitess #9400 case: a write holds the writer when the fence is put. The fence waits
/// for it, so the write commits first (and is kept), and writes after the fence are refused.
#[tokio::test]
async fn a_fence_waits_for_the_write_in_flight() {
    let node = TestNode::new().await;
    let admitted = Arc::new(tokio::sync::Notify::new());
    let committing: Arc<Mutex<Option<Instant>>> = Arc::default();
    node.state.set_before_commit_hook({
        let admitted = Arc::clone(&admitted);
        let committing = Arc::clone(&committing);
        move || {
            admitted.notify_one();
            // The write's own work, still inside its transaction.
            std::thread::sleep(Duration::from_millis(200));
            *committing.lock().unwrap() = Some(Instant::now());
        }
    });
    let write = tokio::spawn(send(
        node.state.clone(),
        "POST",
        "/v1/sql",
        Some(
            json!({"key": "7", "statements": [
                {"sql": "INSERT INTO counters (id, n) VALUES (7, 1)"},
            ]})
            .to_string(),
        ),
    ));
    admitted.notified().await;
    let h = hash_key("7");
    let (status, _, body) = send(
        node.state.clone(),
        "PUT",
        "/v1/transfer/fences",
        Some(json!({"job": "j", "ranges": [[h, h]]}).to_string()),
    )
    .await;
    let fenced_at = Instant::now();
    assert_eq!(status, StatusCode::OK, "{body}");
    let committed = committing
        .lock()
        .unwrap()
        .expect("the fence returned while the write admitted before it was still running");
    assert!(committed <= fenced_at);
    let (status, _, body) = write.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");

    node.state.set_before_commit_hook(|| {});
    let (status, row) = node.call("GET", "/v1/tables/counters/rows/7", None).await;
    assert_eq!((status, row), (StatusCode::OK, json!({"id": 7, "n": 1})));
    assert_fenced(
        &node,
        "PUT",
        "/v1/tables/counters/rows/7",
        json!({"n": 2}),
        "7",
    )
    .await;
}

// ---- scan, count, fetch ----

#[tokio::test]
async fn scan_pages_to_the_end_and_returns_exactly_the_rows_in_range() {
    let node = TestNode::new().await;
    counters(&node, 50).await;
    let expected: Vec<Value> = (1..=50)
        .filter(|i| in_range(&i.to_string(), LOW))
        .map(|i| json!({"id": i, "n": 0}))
        .collect();
    assert!(!expected.is_empty() && expected.len() < 50);
    for (limit, nexts) in [
        (
            7,
            vec![
                json!(7),
                json!(14),
                json!(21),
                json!(28),
                json!(35),
                json!(42),
                json!(49),
                Value::Null,
            ],
        ),
        (
            10,
            vec![json!(10), json!(20), json!(30), json!(40), Value::Null],
        ),
        (100, vec![Value::Null]),
    ] {
        let mut rows = Vec::new();
        let mut seen_nexts = Vec::new();
        let mut after = Value::Null;
        loop {
            let page = ok(
                &node,
                "POST",
                "/v1/transfer/scan",
                Some(json!({"table": "counters", "after": after, "limit": limit,
                            "ranges": [[LOW.0, LOW.1]]})),
            )
            .await;
            rows.extend(page["rows"].as_array().unwrap().iter().cloned());
            seen_nexts.push(page["next"].clone());
            if page["next"].is_null() {
                break;
            }
            after = page["next"].clone();
        }
        assert_eq!(rows, expected, "limit {limit}");
        assert_eq!(seen_nexts, nexts, "limit {limit}");
    }
    // Text keys page with a text cursor.
    ok(
        &node,
        "POST",
        "/v1/tables/users/rows",
        Some(json!({"rows": [{"id": "a", "name": "A"}, {"id": "b"}, {"id": "c"}]})),
    )
    .await;
    let page = ok(
        &node,
        "POST",
        "/v1/transfer/scan",
        Some(json!({"table": "users", "after": "a", "limit": 1, "ranges": [[0, u32::MAX]]})),
    )
    .await;
    assert_eq!(
        page,
        json!({"rows": [{"id": "b", "name": null, "email": null, "age": null, "data": null}],
               "next": "b"})
    );
    for (bad, status) in [
        (
            json!({"table": "counters", "ranges": [[9, 8]]}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"table": "counters", "ranges": [[0, 1]], "limit": 0}),
            StatusCode::BAD_REQUEST,
        ),
        (json!({"table": "counters"}), StatusCode::BAD_REQUEST),
        (
            json!({"table": "counters", "ranges": [[0, 1]], "after": [1]}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"table": "nope", "ranges": [[0, 1]]}),
            StatusCode::NOT_FOUND,
        ),
    ] {
        let (got, body) = node
            .call("POST", "/v1/transfer/scan", Some(bad.clone()))
            .await;
        assert_eq!(got, status, "{bad}: {body}");
    }
}

#[tokio::test]
async fn count_matches_scan_and_skips_keys_without_routing_text() {
    let node = TestNode::new().await;
    counters(&node, 50).await;
    let user_keys = ["u1", "u2", "u3", "u4", "u5"];
    for k in user_keys {
        ok(
            &node,
            "PUT",
            &format!("/v1/tables/users/rows/{k}"),
            Some(json!({})),
        )
        .await;
    }
    // A BLOB key has no routing text: counted in the total, never in a range. (Keyed SQL may
    // not store one: `written`.)
    node.state.with_writer_for_test(|conn| {
        conn.execute("INSERT INTO users (id) VALUES (x'0102')", [])
            .unwrap();
    });

    let keys: Vec<String> = (1..=50)
        .map(|i: i64| i.to_string())
        .chain(user_keys.iter().map(|k| (*k).to_owned()))
        .collect();
    let low = keys.iter().filter(|k| in_range(k, LOW)).count() as u64;
    let body = ok(
        &node,
        "POST",
        "/v1/transfer/count",
        Some(json!({"ranges": [[LOW.0, LOW.1], [HIGH.0, HIGH.1], [0, u32::MAX], [LOW.0, LOW.1]]})),
    )
    .await;
    assert_eq!(
        body,
        json!({"counts": [low, 55 - low, 55, low], "rows_total": 56})
    );
    // The same number as a scan of each table finds.
    let mut scanned = 0;
    for table in ["counters", "users"] {
        let page = ok(
            &node,
            "POST",
            "/v1/transfer/scan",
            Some(json!({"table": table, "limit": 1000, "ranges": [[LOW.0, LOW.1]]})),
        )
        .await;
        scanned += page["rows"].as_array().unwrap().len() as u64;
    }
    assert_eq!(scanned, low);
    let (status, _) = node
        .call(
            "POST",
            "/v1/transfer/count",
            Some(json!({"ranges": [[2, 1]]})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn fetch_returns_the_rows_that_exist_once_each() {
    let node = TestNode::new().await;
    counters(&node, 5).await;
    let body = ok(
        &node,
        "POST",
        "/v1/transfer/fetch",
        Some(json!({"table": "counters", "keys": [3, 999, "4", 3]})),
    )
    .await;
    assert_eq!(
        body,
        json!({"rows": [{"id": 3, "n": 0}, {"id": 4, "n": 0}]})
    );
    let too_many: Vec<i64> = (0..10_001).collect();
    for bad in [
        json!({"table": "counters", "keys": too_many}),
        json!({"table": "counters", "keys": [null]}),
    ] {
        let (status, body) = node.call("POST", "/v1/transfer/fetch", Some(bad)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    }
}

// ---- apply, purge ----

#[tokio::test]
async fn apply_writes_whole_rows_and_deletes_in_one_transaction() {
    let node = TestNode::new().await;
    ok(
        &node,
        "PUT",
        "/v1/tables/users/rows/u1",
        Some(json!({"name": "Ann", "email": "a@x", "age": 30})),
    )
    .await;
    ok(&node, "PUT", "/v1/tables/users/rows/u3", Some(json!({}))).await;
    capture_on(&node).await;
    // Apply is how the mover writes on a target: fences do not apply to it.
    fence(&node, &["u1", "u2", "u3"]).await;
    let body = ok(
        &node,
        "POST",
        "/v1/transfer/apply",
        Some(json!({"table": "users",
                    "upserts": [{"id": "u1", "name": "Bob"}, {"id": "u2", "email": "c@x"}],
                    "deletes": ["u3", "nope"]})),
    )
    .await;
    assert_eq!(body, json!({"upserted": 2, "deleted": 1}));
    // The whole row: columns not sent are back to their defaults.
    let (_, row) = get_user(&node, "u1").await;
    assert_eq!(
        row,
        json!({"id": "u1", "name": "Bob", "email": null, "age": null, "data": null})
    );
    assert_eq!(get_user(&node, "u2").await.1["email"], "c@x");
    assert_eq!(get_user(&node, "u3").await.0, StatusCode::NOT_FOUND);
    // An upsert of an existing row is one update, not REPLACE's delete plus insert.
    assert_eq!(changes_after(&node, 0).await, users(&["u1", "u2", "u3"]));

    for (bad, status) in [
        (
            json!({"table": "users", "upserts": [{"id": "u4"}, {"id": "u5", "nope": 1}]}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"table": "users", "upserts": [{"name": "no key"}]}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"table": "users", "deletes": [null]}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"table": "nope", "upserts": []}),
            StatusCode::NOT_FOUND,
        ),
        // Valid rows, but the second breaks UNIQUE(email): nothing of the request stays.
        (
            json!({"table": "users",
                   "upserts": [{"id": "u6", "email": "z@x"}, {"id": "u7", "email": "z@x"}],
                   "deletes": ["u1"]}),
            StatusCode::CONFLICT,
        ),
    ] {
        let (got, body) = node
            .call("POST", "/v1/transfer/apply", Some(bad.clone()))
            .await;
        assert_eq!(got, status, "{bad}: {body}");
        node.assert_writer_clean();
    }
    for absent in ["u4", "u6", "u7"] {
        assert_eq!(
            get_user(&node, absent).await.0,
            StatusCode::NOT_FOUND,
            "{absent}"
        );
    }
    assert_eq!(get_user(&node, "u1").await.0, StatusCode::OK);
}

#[tokio::test]
async fn purge_deletes_only_rows_in_range_in_pages() {
    let node = TestNode::new().await;
    counters(&node, 50).await;
    let user_keys: Vec<String> = (1..=10).map(|i| format!("u{i}")).collect();
    add_users(&node, &user_keys).await;
    let keys: Vec<String> = (1..=50)
        .map(|i: i64| i.to_string())
        .chain(user_keys.iter().cloned())
        .collect();
    let doomed = keys.iter().filter(|k| in_range(k, LOW)).count() as u64;
    assert!(doomed > 8);
    // Purge is the mover's: the source's fence over the range does not stop it.
    ok(
        &node,
        "PUT",
        "/v1/transfer/fences",
        Some(json!({"job": "j", "ranges": [[LOW.0, LOW.1]]})),
    )
    .await;

    // Each page says how many client writes the node has answered: the setup's, not moved by
    // the purge, which is not one.
    let writes = ok(&node, "GET", "/v1/stats", None).await["writes"].clone();
    assert!(writes.as_u64().unwrap() > 0, "{writes}");
    let mut deleted = 0;
    let mut calls = 0;
    loop {
        let body = ok(
            &node,
            "POST",
            "/v1/transfer/purge",
            Some(json!({"ranges": [[LOW.0, LOW.1]], "limit": 4})),
        )
        .await;
        calls += 1;
        assert_eq!(body["instance"], crate::transfer::instance(), "{body}");
        assert_eq!(body["writes"], writes, "{body}");
        // A page commits without its own sync only for that commit: the writer is back to the
        // configured FULL after it, so client writes still sync.
        let synchronous = node
            .state
            .with_writer_for_test(|conn| conn.query_row("PRAGMA synchronous", [], |r| r.get(0)));
        assert_eq!(synchronous, Ok(2i64), "{body}");
        let n = body["deleted"].as_u64().unwrap();
        assert!(n <= 4, "{body}");
        deleted += n;
        if body["done"] == true {
            break;
        }
        assert_eq!(n, 4, "a page short of the limit must be the last: {body}");
    }
    assert_eq!(deleted, doomed);
    assert_eq!(calls, doomed.div_ceil(4));
    let body = ok(
        &node,
        "POST",
        "/v1/transfer/count",
        Some(json!({"ranges": [[LOW.0, LOW.1], [HIGH.0, HIGH.1]]})),
    )
    .await;
    assert_eq!(
        body,
        json!({"counts": [0, 60 - doomed], "rows_total": 60 - doomed})
    );
    assert_eq!(
        ok(
            &node,
            "POST",
            "/v1/transfer/purge",
            Some(json!({"ranges": [[LOW.0, LOW.1]]}))
        )
        .await,
        json!({
            "deleted": 0,
            "done": true,
            "instance": crate::transfer::instance(),
            "writes": writes,
        })
    );
    let (status, _) = node
        .call(
            "POST",
            "/v1/transfer/purge",
            Some(json!({"ranges": [[3, 1]]})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

/// The rows of `[(table, key)]` that `/v1/transfer/count` would count in `range`.
fn keys_in(keys: &[(&str, String)], range: (u32, u32)) -> usize {
    keys.iter().filter(|(_, k)| in_range(k, range)).count()
}

#[tokio::test]
async fn purge_walks_each_table_once_from_its_cursor() {
    let node = TestNode::new().await;
    // A WITHOUT ROWID table and one whose columns shadow every rowid alias go by key; the
    // others by rowid.
    let extra = json!({ "migrations": [
        { "version": 3, "name": "tags",
          "sql": "CREATE TABLE tags (name TEXT PRIMARY KEY, n INTEGER) WITHOUT ROWID;" },
        { "version": 4, "name": "shadow",
          "sql": "CREATE TABLE shadow (id TEXT PRIMARY KEY, rowid INT, oid INT, _rowid_ INT);" },
    ]});
    ok(&node, "POST", "/v1/migrations", Some(extra)).await;
    counters(&node, 40).await;
    let mut keys: Vec<(&str, String)> = (1..=40).map(|i| ("counters", i.to_string())).collect();
    for table in ["users", "tags", "shadow"] {
        let column = if table == "tags" { "name" } else { "id" };
        let rows: Vec<Value> = (1..=20)
            .map(|i| json!({ column: format!("{table}{i}") }))
            .collect();
        ok(
            &node,
            "POST",
            &format!("/v1/tables/{table}/rows"),
            Some(json!({ "rows": rows })),
        )
        .await;
        keys.extend((1..=20).map(|i| (table, format!("{table}{i}"))));
    }
    let doomed = keys_in(&keys, LOW);
    assert!(doomed > 20);

    let mut after = Value::Null;
    let mut calls = 0;
    let mut deleted = 0;
    let mut cursors = Vec::new();
    loop {
        let body = ok(
            &node,
            "POST",
            "/v1/transfer/purge",
            Some(json!({"ranges": [[LOW.0, LOW.1]], "limit": 3, "after": after})),
        )
        .await;
        calls += 1;
        deleted += body["deleted"].as_u64().unwrap();
        if body["done"] == true {
            assert!(body.get("next").is_none(), "{body}");
            break;
        }
        assert_eq!(body["deleted"], 3, "{body}");
        after = body["next"].clone();
        cursors.push(after.clone());
    }
    assert_eq!(deleted, doomed as u64);
    assert_eq!(calls, doomed.div_ceil(3), "each page is full but the last");
    // Tables in name order; rowid cursors where there is a rowid, key cursors elsewhere.
    let walked: Vec<(String, bool)> = cursors
        .iter()
        .map(|c| {
            (
                c["table"].as_str().unwrap().to_owned(),
                c.get("rowid").is_some(),
            )
        })
        .collect();
    let mut seen: Vec<(String, bool)> = walked.clone();
    seen.dedup();
    let expected: Vec<(String, bool)> = [
        ("counters", true),
        ("shadow", false),
        ("tags", false),
        ("users", true),
    ]
    .into_iter()
    .map(|(t, r)| (t.to_owned(), r))
    .filter(|(t, _)| seen.iter().any(|(s, _)| s == t))
    .collect();
    assert_eq!(seen, expected, "{cursors:?}");
    let body = ok(
        &node,
        "POST",
        "/v1/transfer/count",
        Some(json!({"ranges": [[LOW.0, LOW.1], [HIGH.0, HIGH.1]]})),
    )
    .await;
    assert_eq!(
        body["counts"],
        json!([0, keys_in(&keys, HIGH)]),
        "only rows in range are gone"
    );
    // A cursor names one way to continue, not two.
    let (status, _) = node
        .call(
            "POST",
            "/v1/transfer/purge",
            Some(json!({"ranges": [[0, 1]], "after": {"table": "users", "rowid": 1, "key": "a"}})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn tally_counts_and_returns_logged_rows_from_one_snapshot() {
    let node = TestNode::new().await;
    let body = ok(
        &node,
        "POST",
        "/v1/transfer/tally",
        Some(json!({"ranges": [[LOW.0, LOW.1]]})),
    )
    .await;
    assert_eq!(body["capturing"], false, "{body}");

    let names: Vec<String> = (1..=30).map(|i| format!("u{i}")).collect();
    add_users(&node, &names).await;
    let start = capture_on(&node).await;
    let low: Vec<&String> = names.iter().filter(|k| in_range(k, LOW)).collect();
    let high: Vec<&String> = names.iter().filter(|k| in_range(k, HIGH)).collect();
    assert!(low.len() >= 3 && !high.is_empty());
    // After capture: update one low key twice, delete another, add a new one; touch a high key.
    for name in ["a", "b"] {
        ok(
            &node,
            "PUT",
            &format!("/v1/tables/users/rows/{}", low[0]),
            Some(json!({"name": name})),
        )
        .await;
    }
    ok(
        &node,
        "DELETE",
        &format!("/v1/tables/users/rows/{}", low[1]),
        None,
    )
    .await;
    let fresh = (100..)
        .map(|i| format!("n{i}"))
        .find(|k| in_range(k, LOW))
        .unwrap();
    ok(
        &node,
        "PUT",
        &format!("/v1/tables/users/rows/{fresh}"),
        Some(json!({"name": "new"})),
    )
    .await;
    ok(
        &node,
        "PUT",
        &format!("/v1/tables/users/rows/{}", high[0]),
        Some(json!({"name": "high"})),
    )
    .await;

    let body = ok(
        &node,
        "POST",
        "/v1/transfer/tally",
        Some(json!({"after": start, "ranges": [[LOW.0, LOW.1], [0, u32::MAX]]})),
    )
    .await;
    assert_eq!(body["capturing"], true, "{body}");
    assert_eq!(body["complete"], true, "{body}");
    assert_eq!(body["max_seq"], start + 5, "{body}");
    // low − 1 deleted + 1 new; everything: 30 − 1 + 1.
    assert_eq!(body["counts"], json!([low.len(), 30]), "{body}");
    let row = |id: &str, name: &str| json!({"id": id, "name": name, "email": null, "age": null, "data": null});
    // Every logged key of the ranges once, in log order, as it is now (the second range is
    // the whole ring, so the high key is in too).
    assert_eq!(
        body["keys"],
        json!([
            {"table": "users", "key": low[0], "row": row(low[0], "b")},
            {"table": "users", "key": low[1], "row": null},
            {"table": "users", "key": fresh, "row": row(&fresh, "new")},
            {"table": "users", "key": high[0], "row": row(high[0], "high")},
        ]),
        "{body}"
    );
    // Only the low range: the high key is left out.
    let body = ok(
        &node,
        "POST",
        "/v1/transfer/tally",
        Some(json!({"after": start, "ranges": [[LOW.0, LOW.1]]})),
    )
    .await;
    assert_eq!(body["keys"].as_array().unwrap().len(), 3, "{body}");
    // More changes than the limit: nothing but the position.
    let body = ok(
        &node,
        "POST",
        "/v1/transfer/tally",
        Some(json!({"after": start, "ranges": [[LOW.0, LOW.1]], "limit": 4})),
    )
    .await;
    assert_eq!(
        body,
        json!({"capturing": true, "complete": false, "max_seq": start + 5,
               "counts": [], "keys": []})
    );
}
