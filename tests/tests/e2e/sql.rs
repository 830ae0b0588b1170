use serde_json::json;
use shardlite_tests::{Client, TestCluster, assert_refused_as_stray, assert_verified};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_statement_list_is_one_transaction_on_the_keys_shard() {
    let cluster = TestCluster::start(3).await;
    let c = &cluster.client;
    let ok = c
        .post(
            "/v1/sql",
            json!({ "key": "carol", "statements": [
                { "sql": "INSERT INTO users (id, name) VALUES (?, ?)", "params": ["carol", "Carol"] },
                { "sql": "UPDATE users SET age = ? WHERE id = ?", "params": [40, "carol"] },
            ]}),
        )
        .await;
    assert_eq!(ok.0, 200, "{}", ok.1);
    assert_eq!(ok.1["results"][0]["rows_affected"], 1);
    let (_, row) = c.get(&Client::row_path("users", "carol")).await;
    assert_eq!(
        (row["name"].clone(), row["age"].clone()),
        (json!("Carol"), json!(40))
    );

    // The second statement fails: the first must not stay applied.
    let (status, body) = c
        .post(
            "/v1/sql",
            json!({ "key": "dave", "statements": [
                { "sql": "INSERT INTO users (id, name) VALUES (?, ?)", "params": ["dave", "Dave"] },
                { "sql": "INSERT INTO no_such_table VALUES (1)" },
            ]}),
        )
        .await;
    assert!(status.is_client_error(), "{status} {body}");
    assert_eq!(
        c.get(&Client::row_path("users", "dave")).await.0,
        404,
        "rolled back"
    );
    cluster.stop().await;
}

/// Keyed SQL runs on its key's shard, so a statement that would write a row under another key
/// (which belongs where that key routes) is refused, and nothing ends up misplaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_sql_that_writes_another_key_is_refused_and_nothing_is_misplaced() {
    let cluster = TestCluster::start(3).await;
    let c = &cluster.client;
    assert_eq!(
        c.put(
            &Client::row_path("users", "alice"),
            json!({ "name": "Alice" })
        )
        .await
        .0,
        200
    );
    for sql in [
        "UPDATE users SET id = 'zed' WHERE id = 'alice'",
        "INSERT INTO users (id, name) VALUES ('other', 'x')",
    ] {
        assert_refused_as_stray(c, "alice", sql).await;
    }
    // An order id SQLite would pick itself is not the routing key either.
    let (status, body) = c
        .post(
            "/v1/sql",
            json!({ "key": "alice", "sql": "INSERT INTO orders (user_id) VALUES ('alice')" }),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, row) = c.get(&Client::row_path("users", "alice")).await;
    assert_eq!(status, 200, "{row}");
    assert_eq!(row["name"], "Alice");
    for other in ["zed", "other"] {
        assert_eq!(c.get(&Client::row_path("users", other)).await.0, 404);
    }
    let report = assert_verified(c).await;
    assert_eq!(report["rows_total"], 1, "{report}");
    cluster.stop().await;
}

/// The same for a `WITHOUT ROWID` table, whose rows SQLite's update hook does not report: the
/// node watches it with TEMP triggers while keyed SQL runs (`shard-node/src/written.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_sql_that_writes_another_key_of_a_without_rowid_table_is_refused() {
    let cluster = TestCluster::start_bare(3).await;
    let c = &cluster.client;
    let (status, body) = c
        .post(
            "/v1/cluster/migrations",
            json!({ "migrations": [{ "version": 1, "name": "0001_tags", "sql":
                "CREATE TABLE tags (name TEXT PRIMARY KEY, n INTEGER) WITHOUT ROWID" }] }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // (SQL under the key "alice", whether it stays under that key)
    for (sql, own) in [
        ("INSERT INTO tags VALUES ('alice', 1)", true),
        ("INSERT INTO tags VALUES ('other', 1)", false),
        (
            "INSERT INTO tags VALUES ('alice', 2) ON CONFLICT (name) DO UPDATE SET n = 2",
            true,
        ),
        ("UPDATE tags SET name = 'zed' WHERE name = 'alice'", false),
        ("INSERT OR REPLACE INTO tags VALUES ('alice', 3)", true),
        ("INSERT OR REPLACE INTO tags VALUES ('other', 1)", false),
    ] {
        if own {
            let (status, body) = c
                .post("/v1/sql", json!({ "key": "alice", "sql": sql }))
                .await;
            assert_eq!(status, 200, "{sql}: {body}");
        } else {
            assert_refused_as_stray(c, "alice", sql).await;
        }
    }
    let (status, row) = c.get(&Client::row_path("tags", "alice")).await;
    assert_eq!(status, 200, "{row}");
    assert_eq!(row["n"], 3);
    for other in ["zed", "other"] {
        assert_eq!(c.get(&Client::row_path("tags", other)).await.0, 404);
    }
    // Row writes to the table go on as ever once keyed SQL is done with it.
    let (status, body) = c
        .put(&Client::row_path("tags", "bob"), json!({ "n": 4 }))
        .await;
    assert_eq!(status, 200, "{body}");
    let report = assert_verified(c).await;
    assert_eq!(report["rows_total"], 2, "{report}");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyless_read_gathers_every_shards_rows() {
    let cluster = TestCluster::start(3).await;
    let c = &cluster.client;
    let rows: Vec<_> = (0..60)
        .map(|i| json!({ "id": format!("k{i:02}"), "age": i }))
        .collect();
    assert_eq!(
        c.post("/v1/tables/users/rows", json!({ "rows": rows }))
            .await
            .0,
        200
    );
    let (status, answer) = c
        .post(
            "/v1/sql",
            json!({ "sql": "SELECT id, age FROM users WHERE age >= ?", "params": [10] }),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let result = &answer["results"][0];
    assert_eq!(result["columns"], json!(["id", "age"]));
    let mut ids: Vec<String> = result["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[0].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    let expected: Vec<String> = (10..60).map(|i| format!("k{i:02}")).collect();
    assert_eq!(ids, expected, "rows from all three shards, each once");

    for write in [
        json!({ "sql": "INSERT INTO users (id) VALUES ('x')" }),
        json!({ "sql": "DELETE FROM users" }),
        json!({ "sql": "UPDATE users SET age = 0" }),
    ] {
        let (status, body) = c.post("/v1/sql", write.clone()).await;
        assert_eq!(status, 400, "{write}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains("key"),
            "says a write needs a key: {body}"
        );
    }
    let (status, body) = c
        .post("/v1/sql", json!({ "statements": [{ "sql": "SELECT 1" }] }))
        .await;
    assert_eq!(status, 400, "a statement list without a key: {body}");
    let (_, count) = c
        .post("/v1/sql", json!({ "sql": "SELECT count(*) FROM users" }))
        .await;
    assert_eq!(
        shardlite_tests::summed_counts(&count),
        60,
        "no keyless write changed anything"
    );

    // One count per shard, in node-id order: the README tells callers to sum them.
    let (_, verify) = c.get("/v1/cluster/verify").await;
    let per_node: Vec<i64> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| verify["nodes"][n]["rows"].as_i64().unwrap())
        .collect();
    let counts: Vec<i64> = count["results"][0]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[0].as_i64().unwrap())
        .collect();
    assert_eq!(counts, per_node, "{count} against {verify}");

    // ORDER BY and LIMIT apply within each shard: the first 2 of each, each pair in order.
    let (status, answer) = c
        .post(
            "/v1/sql",
            json!({ "sql": "SELECT id FROM users ORDER BY id LIMIT 2" }),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let ids: Vec<&str> = answer["results"][0]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[0].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 6, "2 rows from each of 3 shards: {ids:?}");
    assert!(ids.chunks(2).all(|pair| pair[0] < pair[1]), "{ids:?}");
    cluster.stop().await;
}
