use serde_json::{Value, json};
use shardlite_ring::{Member, NodeId, Ring};
use shardlite_tests::{Client, TestCluster, assert_verified, keys_in_file};
use std::collections::{BTreeMap, BTreeSet};

/// The ring the proxy uses, rebuilt from `GET /v1/cluster`.
async fn ring_of(client: &Client) -> Ring {
    let (_, cluster) = client.get("/v1/cluster").await;
    let members = cluster["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["state"] != "joining")
        .map(|n| Member {
            id: NodeId::new(n["id"].as_str().unwrap()),
            weight: n["weight"].as_u64().unwrap() as u32,
        });
    Ring::new(members, shardlite_ring::DEFAULT_VNODES).unwrap()
}

fn awkward_keys() -> Vec<String> {
    let mut keys: Vec<String> = (0..2000).map(|i| format!("user:{i}")).collect();
    keys.extend(
        [
            "ünïcödé-ключ-鍵",
            "with space",
            "a/b/c",
            "a&b=c",
            "100%",
            "q?x=1",
            "hash#tag",
            "plus+sign",
            "emoji 🦀",
            "tab\there",
            "'quote'",
            "\"dq\"",
            "..",
            ".",
            "~tilde",
            "semi;colon",
        ]
        .map(String::from),
    );
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_rows_round_trip_and_live_on_their_owner() {
    let cluster = TestCluster::start(3).await;
    let client = &cluster.client;
    let keys = awkward_keys();

    for chunk in keys.chunks(64) {
        let puts = chunk.iter().map(|key| async move {
            let (status, body) = client
                .put(
                    &Client::row_path("users", key),
                    json!({ "name": format!("name of {key}"), "age": key.len() }),
                )
                .await;
            assert_eq!(status, 200, "PUT {key:?}: {body}");
            assert_eq!(body["key"], json!(key));
            assert_eq!(body["table"], "users");
            body["node"].as_str().unwrap().to_owned()
        });
        futures::future::join_all(puts).await;
    }

    for key in &keys {
        let (status, row) = client.get(&Client::row_path("users", key)).await;
        assert_eq!(status, 200, "GET {key:?}: {row}");
        assert_eq!(row["id"], json!(key));
        assert_eq!(row["name"], json!(format!("name of {key}")));
        assert_eq!(row["age"], json!(key.len()));
    }

    let deleted: BTreeSet<&String> = keys.iter().step_by(3).collect();
    for key in &deleted {
        let (status, body) = client.delete(&Client::row_path("users", key)).await;
        assert_eq!(status, 200, "DELETE {key:?}: {body}");
        assert_eq!(body, json!({ "deleted": 1 }));
        let (status, _) = client.get(&Client::row_path("users", key)).await;
        assert_eq!(status, 404, "{key:?} must be gone");
        let (status, body) = client.delete(&Client::row_path("users", key)).await;
        assert_eq!(
            status, 404,
            "a second delete of {key:?} finds nothing: {body}"
        );
    }

    // Each node's file holds exactly the keys the ring gives it.
    let ring = ring_of(client).await;
    let mut expected: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for key in keys.iter().filter(|k| !deleted.contains(k)) {
        expected
            .entry(ring.lookup(key).unwrap().as_str().to_owned())
            .or_default()
            .insert(key.clone());
    }
    assert_eq!(expected.len(), 3, "every node owns some of the keys");
    for node in &cluster.nodes {
        let stored: BTreeSet<String> = keys_in_file(&node.db, "users").into_iter().collect();
        assert_eq!(
            stored, expected[&node.id],
            "node {} holds exactly its keys",
            node.id
        );
    }

    let report = assert_verified(client).await;
    assert_eq!(report["rows_total"], json!(keys.len() - deleted.len()));
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upsert_changes_only_the_named_columns() {
    let cluster = TestCluster::start(3).await;
    let c = &cluster.client;
    let path = Client::row_path("users", "bob");
    assert_eq!(
        c.put(
            &path,
            json!({ "name": "Bob", "email": "bob@example.com", "age": 30 })
        )
        .await
        .0,
        200
    );
    assert_eq!(c.put(&path, json!({ "age": 31 })).await.0, 200);
    let (_, row) = c.get(&path).await;
    assert_eq!(
        row,
        json!({ "id": "bob", "name": "Bob", "email": "bob@example.com", "age": 31, "profile": null })
    );
    // The key column may be named in the body when it agrees with the path.
    assert_eq!(
        c.put(&path, json!({ "id": "bob", "name": "Robert" }))
            .await
            .0,
        200
    );
    assert_eq!(c.get(&path).await.1["name"], "Robert");
    let (status, body) = c.put(&path, json!({ "id": "not-bob" })).await;
    assert_eq!(status, 400, "{body}");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_map_to_sqlite_and_back() {
    let cluster = TestCluster::start(3).await;
    let c = &cluster.client;
    let path = Client::row_path("users", "types");
    let profile = json!({ "tags": ["a", "b"], "n": 1 });
    let (status, body) = c
        .put(
            &path,
            json!({ "name": null, "email": "x", "age": true, "profile": profile }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, row) = c.get(&path).await;
    assert_eq!(row["name"], Value::Null);
    assert_eq!(row["age"], 1, "true is stored as 1");
    let text = row["profile"]
        .as_str()
        .expect("objects are stored as JSON text");
    assert_eq!(serde_json::from_str::<Value>(text).unwrap(), profile);

    let (status, _) = c
        .put(
            &path,
            json!({ "age": 2.5, "profile": { "$base64": "AAEC/w==" } }),
        )
        .await;
    assert_eq!(status, 200);
    let (_, row) = c.get(&path).await;
    assert_eq!(row["age"], 2.5);
    assert_eq!(
        row["profile"],
        json!({ "$base64": "AAEC/w==" }),
        "BLOBs come back as $base64"
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integer_keys_route_by_their_text() {
    let cluster = TestCluster::start(3).await;
    let c = &cluster.client;
    let (status, put) = c
        .put(
            &Client::row_path("orders", "42"),
            json!({ "user_id": "alice", "total_cents": 1299 }),
        )
        .await;
    assert_eq!(status, 200, "{put}");
    // Keyed SQL with the integer 42 reaches the same shard as the row API's "42".
    let (status, answer) = c
        .post("/v1/sql", json!({ "key": 42, "sql": "SELECT total_cents FROM orders WHERE id = ?", "params": [42] }))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["results"][0]["rows"], json!([[1299]]));
    let (_, row) = c.get(&Client::row_path("orders", "42")).await;
    assert_eq!(row["id"], 42, "an INTEGER key comes back as a number");
    for bad in ["042", "+42", "4.2e1", "forty-two", " 42"] {
        let (status, body) = c
            .put(&Client::row_path("orders", bad), json!({ "user_id": "x" }))
            .await;
        assert_eq!(status, 400, "{bad:?} is not an integer key: {body}");
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_spans_shards_and_one_bad_row_refuses_it_all() {
    let cluster = TestCluster::start(3).await;
    let c = &cluster.client;
    let rows: Vec<Value> = (0..300)
        .map(|i| json!({ "id": format!("b{i}"), "name": format!("n{i}") }))
        .collect();
    let (status, body) = c
        .post("/v1/tables/users/rows", json!({ "rows": rows }))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({ "upserted": 300 }));
    let (_, count) = c
        .post("/v1/sql", json!({ "sql": "SELECT count(*) FROM users" }))
        .await;
    assert_eq!(shardlite_tests::summed_counts(&count), 300, "{count}");
    for node in &cluster.nodes {
        assert!(
            !keys_in_file(&node.db, "users").is_empty(),
            "the batch reached {}",
            node.id
        );
    }

    for bad in [
        json!({ "id": "c2", "nope": 1 }),
        json!({ "name": "no key" }),
        json!("not an object"),
        json!({ "id": ["not", "a", "key"] }),
    ] {
        let rows = vec![
            json!({ "id": "c1", "name": "fine" }),
            bad.clone(),
            json!({ "id": "c3" }),
        ];
        let (status, body) = c
            .post("/v1/tables/users/rows", json!({ "rows": rows }))
            .await;
        assert_eq!(status, 400, "{bad} must refuse the batch: {body}");
        assert!(
            body["error"].as_str().unwrap().contains("rows[1]"),
            "the error names the row: {body}"
        );
        for key in ["c1", "c3"] {
            assert_eq!(
                c.get(&Client::row_path("users", key)).await.0,
                404,
                "{key} must not be written"
            );
        }
    }
    cluster.stop().await;
}

/// Sends a batch of 60 users `{prefix}{i}` while n2 fails, and checks the 503 answer: n2's
/// keys, exactly, are listed under `listed`, none under `empty`, the rest were upserted, and
/// the error names n2. Returns the keys and the answer.
async fn batch_failing_on_n2(
    c: &Client,
    ring: &Ring,
    prefix: &str,
    listed: &str,
    empty: &str,
) -> (Vec<String>, Value) {
    let keys: Vec<String> = (0..60).map(|i| format!("{prefix}{i}")).collect();
    let rows: Vec<Value> = keys.iter().map(|k| json!({ "id": k })).collect();
    let (status, body) = c
        .post("/v1/tables/users/rows", json!({ "rows": rows }))
        .await;
    assert_eq!(status, 503, "{body}");
    let on_n2 = owned_by(ring, &keys, "n2");
    assert!(!on_n2.is_empty());
    assert_eq!(named(&body, listed), on_n2, "exactly n2's keys: {body}");
    assert_eq!(body[empty], json!([]), "{body}");
    assert_eq!(body["upserted"], json!(keys.len() - on_n2.len()));
    assert!(body["error"].as_str().unwrap().contains("n2"), "{body}");
    (keys, body)
}

/// Those of `keys` that `node` owns on `ring`, sorted.
fn owned_by(ring: &Ring, keys: &[String], node: &str) -> Vec<String> {
    let mut owned: Vec<String> = keys
        .iter()
        .filter(|k| ring.lookup(k).unwrap().as_str() == node)
        .cloned()
        .collect();
    owned.sort();
    owned
}

/// The keys a batch answer lists under `field`, sorted.
fn named(body: &Value, field: &str) -> Vec<String> {
    let mut keys: Vec<String> = serde_json::from_value(body[field].clone()).unwrap();
    keys.sort();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_fails_on_one_shard_names_the_keys_not_written() {
    let mut cluster = TestCluster::start(3).await;
    let c = cluster.client.clone();
    let (_, topology) = c.get("/v1/cluster").await;
    let ring = shardlite_tests::ring_of(&topology);
    cluster.nodes[1].stop().await; // n2
    let (keys, _) = batch_failing_on_n2(&c, &ring, "part", "not_written", "maybe_written").await;
    for key in keys
        .iter()
        .filter(|k| ring.lookup(k).unwrap().as_str() != "n2")
    {
        assert_eq!(
            c.get(&Client::row_path("users", key)).await.0,
            200,
            "{key} was written"
        );
    }
    cluster.stop().await;
}

/// A node that takes the batch and closes the connection without an answer (as one killed
/// right after its commit would) may have written its rows: they are named `maybe_written`,
/// never `not_written`, which promises they were not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_call_breaks_off_names_its_keys_maybe_written() {
    let mut cluster = TestCluster::start(3).await;
    let c = cluster.client.clone();
    let (_, topology) = c.get("/v1/cluster").await;
    let ring = shardlite_tests::ring_of(&topology);
    let port = cluster.nodes[1].port();
    cluster.nodes[1].stop().await; // n2
    // In its place: read a request, then hang up.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let _ = tokio::io::AsyncReadExt::read(&mut socket, &mut buf).await;
            });
        }
    });
    let (_, body) = batch_failing_on_n2(&c, &ring, "cut", "maybe_written", "not_written").await;
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("may or may not have been written"),
        "{error}"
    );
    cluster.stop().await;
}

/// Under load the proxy sends a node's waiting row requests together (`POST /v1/ops`). Every
/// request must still get its own answer: its own row, its own 404, its own write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_row_requests_share_exchanges_and_each_gets_its_own_answer() {
    let cluster = TestCluster::start(3).await;
    let client = &cluster.client;
    let n = 600;
    let puts = (0..n).map(|i| async move {
        let (status, body) = client
            .put(
                &Client::row_path("users", &format!("c{i}")),
                json!({ "name": format!("name {i}"), "age": i }),
            )
            .await;
        assert_eq!(status, 200, "PUT c{i}: {body}");
    });
    futures::future::join_all(puts).await;
    // Reads of present and absent rows, deletes, and writes that fail, all at once.
    let mixed = (0..n).map(|i| async move {
        let path = Client::row_path("users", &format!("c{i}"));
        match i % 4 {
            0 | 1 => {
                let (status, row) = client.get(&path).await;
                assert_eq!(status, 200, "GET c{i}: {row}");
                assert_eq!(row["name"], format!("name {i}"));
                assert_eq!(row["age"], i);
            }
            2 => {
                let (status, body) = client.delete(&path).await;
                assert_eq!(status, 200, "DELETE c{i}: {body}");
                assert_eq!(body["deleted"], 1, "DELETE c{i}: {body}");
            }
            _ => {
                let (status, body) = client.put(&path, json!({ "colour": "red" })).await;
                assert_eq!(status, 400, "PUT c{i} with an unknown column: {body}");
                let missing = Client::row_path("users", &format!("absent{i}"));
                let (status, body) = client.get(&missing).await;
                assert_eq!(status, 404, "GET absent{i}: {body}");
            }
        }
    });
    futures::future::join_all(mixed).await;
    for i in 0..n {
        let (status, row) = client
            .get(&Client::row_path("users", &format!("c{i}")))
            .await;
        if i % 4 == 2 {
            assert_eq!(status, 404, "c{i} was deleted: {row}");
        } else {
            assert_eq!(status, 200, "c{i}: {row}");
            assert_eq!(row["name"], format!("name {i}"), "c{i} kept its row");
        }
    }
    // And they did go together: the nodes served sets of operations.
    let mut sets = 0;
    let mut ops = 0;
    for node in &cluster.nodes {
        let (_, stats) = Client::new(&node.url).get("/v1/stats").await;
        sets += stats["op_sets"].as_u64().unwrap();
        ops += stats["ops"].as_u64().unwrap();
    }
    assert!(
        sets > 0 && ops > 2 * sets,
        "{sets} sets of {ops} operations"
    );
    cluster.stop().await;
}
