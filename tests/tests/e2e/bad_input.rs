//! Contract guarantee 6: bad input gets a clear 4xx and changes nothing.

use bytes::Bytes;
use http::Method;
use serde_json::{Value, json};
use shardlite_tests::{Client, TestCluster};

/// Everything a client can see, plus what it cannot: every node file's tables and ledger, and
/// the topology and the rebalance job.
async fn snapshot(cluster: &TestCluster) -> Vec<String> {
    let mut seen = Vec::new();
    let (status, topology) = cluster.client.get("/v1/cluster").await;
    assert_eq!(status, 200, "{topology}");
    seen.push(topology.to_string());
    for table in ["users", "orders"] {
        let (status, answer) = cluster
            .client
            .post(
                "/v1/sql",
                json!({ "sql": format!("SELECT * FROM {table} ORDER BY 1") }),
            )
            .await;
        assert_eq!(status, 200, "{answer}");
        let mut rows: Vec<String> = answer["results"][0]["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(Value::to_string)
            .collect();
        rows.sort();
        seen.extend(rows);
    }
    for node in &cluster.nodes {
        let conn = shardlite_tests::open_read_only(&node.db);
        let mut stmt = conn
            .prepare("SELECT type, name, sql FROM sqlite_schema ORDER BY name")
            .unwrap();
        let schema: Vec<String> = stmt
            .query_map([], |r| {
                Ok(format!(
                    "{}:{}:{:?}",
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?
                ))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        seen.extend(schema);
        let ledger: i64 = conn
            .query_row("SELECT count(*) FROM _shardlite_migrations", [], |r| {
                r.get(0)
            })
            .unwrap();
        seen.push(format!("{} ledger {ledger}", node.id));
    }
    seen
}

/// A request: method, path and body.
type Request = (Method, String, Option<Bytes>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_gets_a_4xx_and_changes_nothing() {
    let cluster = TestCluster::start(3).await;
    let c = &cluster.client;
    let rows: Vec<_> = (0..30)
        .map(|i| json!({ "id": format!("u{i}"), "name": "x", "age": i }))
        .collect();
    assert_eq!(
        c.post("/v1/tables/users/rows", json!({ "rows": rows }))
            .await
            .0,
        200
    );
    assert_eq!(
        c.put(&Client::row_path("orders", "7"), json!({ "user_id": "u1" }))
            .await
            .0,
        200
    );
    let before = snapshot(&cluster).await;

    let sql = |s: &str| {
        (
            Method::POST,
            "/v1/sql".to_owned(),
            Some(Bytes::from(json!({ "key": "u1", "sql": s }).to_string())),
        )
    };
    let keyless = |s: &str| {
        (
            Method::POST,
            "/v1/sql".to_owned(),
            Some(Bytes::from(json!({ "sql": s }).to_string())),
        )
    };
    let put = |path: &str, body: &str| {
        (
            Method::PUT,
            path.to_owned(),
            Some(Bytes::from(body.to_owned())),
        )
    };
    let batch = |body: &str| -> Request {
        (
            Method::POST,
            "/v1/tables/users/rows".into(),
            Some(Bytes::from(body.to_owned())),
        )
    };
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let huge = format!("{{\"name\": \"{}\"}}", "x".repeat(17 * 1024 * 1024));
    let many_rows = json!({ "rows": (0..10_001).map(|i| json!({ "id": format!("many{i}") })).collect::<Vec<_>>() }).to_string();
    let many_statements = json!({ "key": "u1", "statements": (0..1_001).map(|_| json!({ "sql": "DELETE FROM users" })).collect::<Vec<_>>() }).to_string();
    let long_sql = json!({ "key": "u1", "sql": format!("DELETE FROM users WHERE name = '{}'", "x".repeat(1_000_001)) }).to_string();

    let cases: Vec<(&str, Request, u16)> = vec![
        (
            "malformed JSON",
            put("/v1/tables/users/rows/u1", "{\"name\": "),
            400,
        ),
        (
            "a body that is not an object",
            put("/v1/tables/users/rows/u1", "[1, 2]"),
            400,
        ),
        (
            "a wrong value type",
            put(
                "/v1/tables/users/rows/u1",
                "{\"name\": {\"$base64\": \"!!!\"}}",
            ),
            400,
        ),
        (
            "an unknown table",
            put("/v1/tables/nope/rows/u1", "{}"),
            404,
        ),
        (
            "an unknown column",
            put("/v1/tables/users/rows/u1", "{\"nope\": 1}"),
            400,
        ),
        (
            "an internal table through the row API",
            put("/v1/tables/_shardlite_migrations/rows/1", "{}"),
            404,
        ),
        (
            "a non-canonical integer key",
            put("/v1/tables/orders/rows/007", "{\"user_id\": \"x\"}"),
            400,
        ),
        (
            "invalid UTF-8 in a key",
            put("/v1/tables/users/rows/%FF%FE", "{}"),
            400,
        ),
        ("a huge body", put("/v1/tables/users/rows/u1", &huge), 413),
        (
            "deeply nested JSON",
            put("/v1/tables/users/rows/u1", &format!("{{\"name\": {deep}}}")),
            400,
        ),
        (
            "deeply nested JSON in SQL",
            (
                Method::POST,
                "/v1/sql".into(),
                Some(Bytes::from(format!(
                    "{{\"key\": \"u1\", \"sql\": \"SELECT 1\", \"params\": {deep}}}"
                ))),
            ),
            400,
        ),
        ("ATTACH", sql("ATTACH DATABASE '/tmp/x.db' AS x"), 400),
        (
            "ATTACH with an expression",
            sql("ATTACH DATABASE ('/tmp/' || 'x.db') AS x"),
            400,
        ),
        (
            "VACUUM INTO",
            sql("VACUUM INTO '/tmp/shardlite-stolen.db'"),
            400,
        ),
        (
            "a writable PRAGMA",
            sql("PRAGMA journal_mode = DELETE"),
            400,
        ),
        (
            "PRAGMA query_only off",
            keyless("PRAGMA query_only = 0"),
            400,
        ),
        (
            "load_extension",
            sql("SELECT load_extension('/tmp/evil.so')"),
            400,
        ),
        (
            "a temp trigger",
            sql("CREATE TEMP TRIGGER t AFTER INSERT ON users BEGIN DELETE FROM users; END"),
            400,
        ),
        ("a temp table", sql("CREATE TEMP TABLE t (x)"), 400),
        (
            "reading an internal table",
            sql("SELECT * FROM _shardlite_migrations"),
            400,
        ),
        (
            "an internal table, other case",
            keyless("SELECT * FROM _SHARDLITE_MIGRATIONS"),
            400,
        ),
        (
            "writing an internal table",
            sql("DELETE FROM _shardlite_migrations"),
            400,
        ),
        (
            "two statements in one string",
            sql("UPDATE users SET age = 0; DELETE FROM users"),
            400,
        ),
        ("BEGIN", sql("BEGIN"), 400),
        ("DDL outside migrations", sql("DROP TABLE users"), 400),
        ("a keyless write", keyless("DELETE FROM users"), 400),
        (
            "a keyless statement list",
            (
                Method::POST,
                "/v1/sql".into(),
                Some(Bytes::from(
                    r#"{"statements": [{"sql": "DELETE FROM users"}]}"#,
                )),
            ),
            400,
        ),
        (
            "sql and statements at once",
            (
                Method::POST,
                "/v1/sql".into(),
                Some(Bytes::from(
                    r#"{"key": "u1", "sql": "DELETE FROM users", "statements": []}"#,
                )),
            ),
            400,
        ),
        (
            "a key of the wrong type",
            (
                Method::POST,
                "/v1/sql".into(),
                Some(Bytes::from(r#"{"key": [1], "sql": "DELETE FROM users"}"#)),
            ),
            400,
        ),
        (
            "an unknown field",
            (
                Method::POST,
                "/v1/sql".into(),
                Some(Bytes::from(
                    r#"{"key": "u1", "sql": "DELETE FROM users", "dry": true}"#,
                )),
            ),
            400,
        ),
        (
            "a batch row without its key",
            (
                Method::POST,
                "/v1/tables/users/rows".into(),
                Some(Bytes::from(
                    r#"{"rows": [{"id": "new"}, {"name": "no key"}]}"#,
                )),
            ),
            400,
        ),
        (
            "a batch that is not a list",
            (
                Method::POST,
                "/v1/tables/users/rows".into(),
                Some(Bytes::from(r#"{"rows": {"id": "new"}}"#)),
            ),
            400,
        ),
        (
            "an unknown endpoint",
            (Method::GET, "/v1/nope".into(), None),
            404,
        ),
        (
            "a wrong method",
            (Method::PATCH, "/v1/tables/users/rows/u1".into(), None),
            405,
        ),
        (
            "a batch row that is not an object",
            batch(r#"{"rows": [{"id": "b1"}, 5]}"#),
            400,
        ),
        (
            "a batch row with an unknown column",
            batch(r#"{"rows": [{"id": "b1"}, {"id": "b2", "nope": 1}]}"#),
            400,
        ),
        (
            "a batch row without its key",
            batch(r#"{"rows": [{"id": "b1"}, {"name": "b2"}]}"#),
            400,
        ),
        (
            "a batch with an unknown field",
            batch(r#"{"rows": [{"id": "b1"}], "extra": 1}"#),
            400,
        ),
        (
            "deeply nested JSON in a batch row",
            batch(&format!(r#"{{"rows": [{{"id": "b1", "name": {deep}}}]}}"#)),
            400,
        ),
        (
            "a batch over the row limit",
            (
                Method::POST,
                "/v1/tables/users/rows".into(),
                Some(Bytes::from(many_rows)),
            ),
            400,
        ),
        (
            "too many statements",
            (
                Method::POST,
                "/v1/sql".into(),
                Some(Bytes::from(many_statements)),
            ),
            400,
        ),
        (
            "SQL text over the length limit",
            (Method::POST, "/v1/sql".into(), Some(Bytes::from(long_sql))),
            400,
        ),
        (
            "rebalance options of the wrong type",
            (
                Method::POST,
                "/v1/cluster/rebalance".into(),
                Some(Bytes::from(r#"{"dry_run": "yes"}"#)),
            ),
            400,
        ),
        (
            "a rebalance option that does not exist",
            (
                Method::POST,
                "/v1/cluster/rebalance".into(),
                Some(Bytes::from(r#"{"force": true}"#)),
            ),
            400,
        ),
        (
            "a dry run asked for and refused at once",
            (
                Method::POST,
                "/v1/cluster/rebalance?dry_run=true".into(),
                Some(Bytes::from(r#"{"dry_run": false}"#)),
            ),
            400,
        ),
        (
            "an option to a node's removal",
            (
                Method::DELETE,
                "/v1/cluster/nodes/n1".into(),
                Some(Bytes::from(r#"{"force": true}"#)),
            ),
            400,
        ),
        (
            "a bad migration set",
            (
                Method::POST,
                "/v1/cluster/migrations".into(),
                Some(Bytes::from(
                    r#"{"migrations": [{"version": 2, "name": "x", "sql": "CREATE TABLE x (id TEXT PRIMARY KEY)"}]}"#,
                )),
            ),
            400,
        ),
    ];

    for (what, (method, path, body), expected) in cases {
        // A fresh connection per case: a server may close a connection after refusing a body
        // it did not read (413), and a pooled client that reuses it would see it closed.
        let c = Client::new(&cluster.url);
        let (status, answer) = c.raw(method, &path, body).await;
        assert_eq!(status.as_u16(), expected, "{what}: {answer}");
        let message = answer["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: the answer is not {{\"error\": ...}}: {answer}"));
        assert!(!message.is_empty(), "{what}: an empty error message");
        assert_eq!(snapshot(&cluster).await, before, "{what} changed something");
    }
    assert!(
        !std::path::Path::new("/tmp/shardlite-stolen.db").exists(),
        "VACUUM INTO wrote a copy"
    );
    cluster.stop().await;
}

/// An unknown table's 404 says which tables there are, or that there are none yet and what
/// creates them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_table_names_the_tables_there_are() {
    let cluster = TestCluster::start(2).await;
    let (status, body) = cluster
        .client
        .put("/v1/tables/user/rows/u1", json!({ "name": "U" }))
        .await;
    assert_eq!(status, 404, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("\"user\"") && error.contains("tables are orders, users"),
        "{error}"
    );
    cluster.stop().await;

    let bare = TestCluster::start_bare(1).await;
    let (status, body) = bare.client.get("/v1/tables/users/rows/u1").await;
    assert_eq!(status, 404, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("no tables yet") && error.contains("shardlite migrate"),
        "{error}"
    );
    bare.stop().await;
}
