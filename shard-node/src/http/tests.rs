//! The node API through `router(state).oneshot(request)`: no sockets, a temp dir per node.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tempfile::TempDir;
use tower::ServiceExt;

use super::*;
use crate::config::NodeConfig;

const USERS: &str = "CREATE TABLE users (id TEXT PRIMARY KEY, name TEXT, email TEXT UNIQUE, \
                     age INTEGER, data TEXT);";
const COUNTERS: &str =
    "CREATE TABLE counters (id INTEGER PRIMARY KEY, n INTEGER NOT NULL DEFAULT 0);";

/// A node on a temp dir; the dir lives as long as the node.
pub(crate) struct TestNode {
    pub(crate) dir: TempDir,
    pub(crate) state: NodeState,
}

/// Sends one request to a node's router: status, headers and the JSON body.
pub(crate) async fn send(
    state: NodeState,
    method: &str,
    uri: &str,
    body: Option<String>,
) -> (StatusCode, axum::http::HeaderMap, Value) {
    send_with(state, method, uri, &[], body).await
}

/// [`send`] with extra request headers.
async fn send_with(
    state: NodeState,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> (StatusCode, axum::http::HeaderMap, Value) {
    let mut builder = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = match body {
        Some(body) => builder
            .header("content-type", "application/json")
            .body(Body::from(body)),
        None => builder.body(Body::empty()),
    }
    .unwrap();
    let response = router(state).oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&bytes)));
    (status, headers, json)
}

impl TestNode {
    /// A node with `users` and `counters`, migrated through the API.
    pub(crate) async fn new() -> TestNode {
        TestNode::with_config(|_| {}).await
    }

    pub(crate) async fn with_config(change: impl FnOnce(&mut NodeConfig)) -> TestNode {
        let node = TestNode::empty(change);
        let (status, body) = node
            .call("POST", "/v1/migrations", Some(migrations()))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        node
    }

    pub(crate) fn empty(change: impl FnOnce(&mut NodeConfig)) -> TestNode {
        let dir = tempfile::tempdir().unwrap();
        let mut config = NodeConfig::new(dir.path().join("node.db"));
        change(&mut config);
        let state = NodeState::open(config).unwrap();
        TestNode { dir, state }
    }

    pub(crate) async fn call(
        &self,
        method: &str,
        uri: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let body = body.map(|b| b.to_string());
        self.call_raw(method, uri, body).await
    }

    pub(crate) async fn call_raw(
        &self,
        method: &str,
        uri: &str,
        body: Option<String>,
    ) -> (StatusCode, Value) {
        let (status, _, json) = send(self.state.clone(), method, uri, body).await;
        (status, json)
    }

    pub(crate) async fn sql(&self, body: Value) -> (StatusCode, Value) {
        self.call("POST", "/v1/sql", Some(body)).await
    }

    /// The rows of a keyed query, asserting success.
    pub(crate) async fn query(&self, sql: &str) -> Vec<Value> {
        let (status, body) = self.sql(json!({ "sql": sql })).await;
        assert_eq!(status, StatusCode::OK, "{sql}: {body}");
        body["results"][0]["rows"].as_array().unwrap().clone()
    }

    pub(crate) async fn user_count(&self) -> i64 {
        self.query("SELECT count(*) FROM users").await[0][0]
            .as_i64()
            .unwrap()
    }

    /// The writer is back in autocommit, with no temp objects.
    pub(crate) fn assert_writer_clean(&self) {
        let (autocommit, temp) = self.state.with_writer_for_test(|conn| {
            let temp: i64 = conn
                .query_row("SELECT count(*) FROM temp.sqlite_schema", [], |r| r.get(0))
                .unwrap();
            (conn.is_autocommit(), temp)
        });
        assert!(autocommit, "the writer was left in a transaction");
        assert_eq!(temp, 0, "temp objects survived a request");
    }
}

pub(crate) fn migrations() -> Value {
    json!({ "migrations": [
        { "version": 1, "name": "users", "sql": USERS },
        { "version": 2, "name": "counters", "sql": COUNTERS },
    ]})
}

/// Percent-encodes every byte but the unreserved ones, as the proxy does.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

pub(crate) fn error_of(body: &Value) -> &str {
    body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message in {body}"))
}

#[tokio::test]
async fn healthz_answers_ok() {
    let node = TestNode::new().await;
    assert_eq!(
        node.call("GET", "/healthz", None).await,
        (StatusCode::OK, json!({"status": "ok"}))
    );
}

#[tokio::test]
async fn schema_lists_sharded_tables_only() {
    let node = TestNode::new().await;
    let (status, body) = node.call("GET", "/v1/schema", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"tables": [
            {"name": "counters", "key": "id", "key_affinity": "integer", "columns": ["id", "n"]},
            {"name": "users", "key": "id", "key_affinity": "text",
             "columns": ["id", "name", "email", "age", "data"]},
        ]})
    );
}

// ---- the authorizer: every pitfall of the SQLite security notes ----

/// Sends `sql` keyed and keyless; both must be refused with a message containing `expect`,
/// leave the writer clean and change no data.
/// Sends keyed SQL `request` and checks that it is refused for writing the row with `key`,
/// which is not its own (`written`), and that the writer is left clean.
pub(crate) async fn assert_stray(node: &TestNode, request: Value, key: &str) {
    let (status, body) = node.sql(request.clone()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{request}: {body}");
    let message = error_of(&body);
    assert!(
        message.starts_with("keyed SQL may insert or update rows under its own key")
            && message.contains(&format!("this wrote the row with key {key:?}")),
        "{request}: {body}"
    );
    node.assert_writer_clean();
}

pub(crate) async fn assert_refused(node: &TestNode, sql: &str, expect: &str) {
    let before = node.user_count().await;
    for readonly in [false, true] {
        let (status, body) = node.sql(json!({"sql": sql, "readonly": readonly})).await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "{sql} (readonly {readonly}) was not refused: {body}"
        );
        let message = error_of(&body);
        assert!(
            message.contains(expect),
            "{sql} (readonly {readonly}): {message:?} does not mention {expect:?}"
        );
        node.assert_writer_clean();
    }
    assert_eq!(node.user_count().await, before, "{sql} changed data");
}

async fn node_with_a_user() -> TestNode {
    let node = TestNode::new().await;
    let (status, _) = node
        .call(
            "PUT",
            "/v1/tables/users/rows/u1",
            Some(json!({"name": "Ann"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    node
}

#[tokio::test]
async fn attach_is_refused_with_literal_and_expression_names() {
    let node = node_with_a_user().await;
    let other = node.dir.path().join("other.db");
    rusqlite::Connection::open(&other)
        .unwrap()
        .execute_batch("CREATE TABLE secret (x); INSERT INTO secret VALUES ('s');")
        .unwrap();
    let path = other.display().to_string();
    assert_refused(&node, &format!("ATTACH DATABASE '{path}' AS o"), "ATTACH").await;
    // An expression file name reaches the authorizer as an unknown action.
    assert_refused(&node, &format!("ATTACH '{path}' || '' AS o"), "ATTACH").await;
    assert_refused(
        &node,
        &format!("ATTACH 'file:{path}?mode=ro' AS o"),
        "ATTACH",
    )
    .await;
    assert_refused(&node, "DETACH DATABASE main", "not allowed").await;
}

#[tokio::test]
async fn vacuum_and_vacuum_into_are_refused() {
    let node = node_with_a_user().await;
    let target = node.dir.path().join("copy.db");
    assert_refused(&node, "VACUUM", "VACUUM").await;
    assert_refused(
        &node,
        &format!("VACUUM INTO '{}'", target.display()),
        "VACUUM",
    )
    .await;
    assert!(!target.exists(), "VACUUM INTO wrote a copy");
}

#[tokio::test]
async fn writable_pragmas_are_refused() {
    let node = node_with_a_user().await;
    assert_refused(&node, "PRAGMA query_only = 0", "PRAGMA query_only").await;
    assert_refused(&node, "PRAGMA journal_mode = DELETE", "PRAGMA journal_mode").await;
    assert_refused(
        &node,
        "PRAGMA writable_schema = 1",
        "PRAGMA writable_schema",
    )
    .await;
    assert_refused(&node, "PRAGMA foreign_keys = OFF", "PRAGMA foreign_keys").await;
    assert_refused(&node, "PRAGMA max_page_count = 1", "PRAGMA max_page_count").await;
    // Reading settings and paths is refused too: database_list leaks file paths.
    assert_refused(&node, "PRAGMA database_list", "PRAGMA database_list").await;
    assert_refused(&node, "SELECT * FROM pragma_database_list", "database_list").await;
    // The file is still in WAL mode.
    let mode: String = node.state.with_writer_for_test(|conn| {
        conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap()
    });
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn introspection_pragmas_are_allowed() {
    let node = node_with_a_user().await;
    for readonly in [false, true] {
        for sql in [
            "PRAGMA table_info(users)",
            "SELECT name FROM pragma_table_info('users')",
            "PRAGMA index_list(users)",
        ] {
            let (status, body) = node.sql(json!({"sql": sql, "readonly": readonly})).await;
            assert_eq!(status, StatusCode::OK, "{sql}: {body}");
            assert!(!body["results"][0]["rows"].as_array().unwrap().is_empty());
        }
    }
    assert_refused(
        &node,
        "PRAGMA table_info(_shardlite_migrations)",
        "_shardlite_migrations",
    )
    .await;
}

#[tokio::test]
async fn load_extension_is_refused() {
    let node = node_with_a_user().await;
    assert_refused(&node, "SELECT load_extension('x')", "load_extension").await;
}

#[tokio::test]
async fn temp_objects_are_refused_and_later_requests_are_unaffected() {
    let node = node_with_a_user().await;
    assert_refused(
        &node,
        "CREATE TEMP TRIGGER t AFTER INSERT ON main.users BEGIN \
         UPDATE users SET name = 'hijacked' WHERE id = new.id; END",
        "TEMP",
    )
    .await;
    assert_refused(&node, "CREATE TEMP TABLE x (a)", "TEMP").await;
    assert_refused(&node, "CREATE TEMP VIEW v AS SELECT 1", "TEMP").await;
    let (status, _) = node
        .call(
            "PUT",
            "/v1/tables/users/rows/u2",
            Some(json!({"name": "Bob"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, row) = node.call("GET", "/v1/tables/users/rows/u2", None).await;
    assert_eq!(row["name"], "Bob");
}

#[tokio::test]
async fn transactions_and_ddl_are_refused() {
    let node = node_with_a_user().await;
    assert_refused(&node, "BEGIN", "BEGIN").await;
    assert_refused(&node, "BEGIN IMMEDIATE", "BEGIN").await;
    assert_refused(&node, "COMMIT", "COMMIT").await;
    assert_refused(&node, "SAVEPOINT s", "SAVEPOINT").await;
    // Nor can it reach the savepoint the writer wraps each request of a group in.
    assert_refused(&node, "RELEASE shardlite_write", "SAVEPOINT").await;
    assert_refused(&node, "ROLLBACK TO shardlite_write", "ROLLBACK").await;
    assert_refused(&node, "CREATE TABLE x (a)", "shardlite migrate").await;
    assert_refused(&node, "DROP TABLE users", "shardlite migrate").await;
    assert_refused(&node, "ALTER TABLE users ADD COLUMN x", "shardlite migrate").await;
    assert_refused(&node, "CREATE INDEX i ON users (name)", "shardlite migrate").await;
    assert_refused(
        &node,
        "CREATE VIRTUAL TABLE v USING fts5(x)",
        "shardlite migrate",
    )
    .await;
    assert_refused(&node, "REINDEX", "REINDEX").await;
    assert_refused(&node, "ANALYZE", "ANALYZE").await;
}

#[tokio::test]
async fn internal_tables_are_unreachable_in_any_case() {
    let node = node_with_a_user().await;
    for sql in [
        "SELECT * FROM _shardlite_migrations",
        "SELECT * FROM _SHARDLITE_migrations",
        "SELECT count(*) FROM _shardlite_migrations",
        "SELECT * FROM users WHERE id IN (SELECT name FROM _Shardlite_Migrations)",
        "DELETE FROM _shardlite_migrations",
        "INSERT INTO _shardlite_migrations VALUES (9, 'x', 'y', 'z')",
    ] {
        assert_refused(&node, sql, "internal to shardlite").await;
    }
    assert_refused(&node, "SELECT * FROM dbstat", "dbstat").await;
    let (_, body) = node.call("GET", "/v1/migrations", None).await;
    assert_eq!(body["applied"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn keyless_writes_need_a_key() {
    let node = node_with_a_user().await;
    for sql in [
        "INSERT INTO users (id, name) VALUES ('x', 'y')",
        "UPDATE users SET name = 'z'",
        "DELETE FROM users",
    ] {
        let (status, body) = node.sql(json!({"sql": sql, "readonly": true})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{sql}: {body}");
        assert!(error_of(&body).starts_with("a write needs a key"), "{body}");
        node.assert_writer_clean();
    }
    assert_eq!(node.user_count().await, 1);
}

/// Keyed SQL runs on the shard that owns its key, so it may insert or update rows under that
/// key only: a row with another key would land where that key does not route (`written`).
#[tokio::test]
async fn keyed_sql_may_insert_or_update_only_rows_under_its_key() {
    let node = TestNode::new().await;
    for (key, name) in [("alice", "Alice"), ("bob", "Bob")] {
        let uri = format!("/v1/tables/users/rows/{key}");
        let (status, body) = node.call("PUT", &uri, Some(json!({"name": name}))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    for (sql, key) in [
        ("UPDATE users SET id = 'zed' WHERE id = 'alice'", "zed"),
        ("UPDATE users SET name = 'x' WHERE id = 'bob'", "bob"),
        ("INSERT INTO users (id) VALUES ('carol')", "carol"),
    ] {
        assert_stray(&node, json!({"key": "alice", "sql": sql}), key).await;
    }
    // A statement list is refused whole, its first statement's work included.
    assert_stray(
        &node,
        json!({"key": "alice", "statements": [
            {"sql": "UPDATE users SET name = 'Al' WHERE id = 'alice'"},
            {"sql": "INSERT INTO users (id) VALUES ('carol')"},
        ]}),
        "carol",
    )
    .await;
    assert_eq!(
        node.query("SELECT id, name FROM users ORDER BY id").await,
        [json!(["alice", "Alice"]), json!(["bob", "Bob"])],
        "refused writes changed nothing"
    );
    // Under its own key, keyed SQL writes as before.
    let (status, body) = node
        .sql(json!({"key": "alice", "sql": "UPDATE users SET name = 'Al' WHERE id = 'alice'"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["results"][0]["rows_affected"], 1);
}

#[tokio::test]
async fn one_statement_per_sql_string() {
    let node = node_with_a_user().await;
    for readonly in [false, true] {
        let (status, body) = node
            .sql(json!({"sql": "SELECT 1; DELETE FROM users", "readonly": readonly}))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        node.assert_writer_clean();
    }
    let (status, body) = node.sql(json!({"sql": "SELECT 1; SELECT 2"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        error_of(&body).contains("one statement per sql string"),
        "{body}"
    );
    // A trailing semicolon, white space and a comment are one statement.
    let (status, body) = node.sql(json!({"sql": "SELECT 1 ;  -- done\n"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(node.user_count().await, 1);
}

#[tokio::test]
async fn a_runaway_statement_times_out() {
    let node = TestNode::with_config(|c| c.statement_timeout = Duration::from_millis(200)).await;
    let sql = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c \
               WHERE x < 1000000000000) SELECT count(*) FROM c";
    for readonly in [false, true] {
        let started = Instant::now();
        let (status, body) = node.sql(json!({"sql": sql, "readonly": readonly})).await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
        assert!(error_of(&body).contains("timed out"), "{body}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "took {:?}",
            started.elapsed()
        );
        node.assert_writer_clean();
    }
}

#[tokio::test]
async fn oversized_results_are_refused() {
    let node = TestNode::with_config(|c| c.max_result_rows = 10).await;
    let (status, body) = node
        .sql(
            json!({"sql": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c \
                            WHERE x < 100) SELECT x FROM c", "readonly": true}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_of(&body).contains("more than 10 rows"), "{body}");
    let node = TestNode::with_config(|c| c.max_result_bytes = 1000).await;
    let (status, body) = node
        .sql(json!({"sql": "SELECT zeroblob(2000)", "readonly": true}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_of(&body).contains("bytes"), "{body}");
}

#[tokio::test]
async fn huge_values_are_refused_by_the_length_limit() {
    let node = TestNode::with_config(|c| c.max_body_bytes = 100_000).await;
    let (status, body) = node
        .sql(json!({"sql": "SELECT length(randomblob(1000000))", "readonly": true}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(error_of(&body).contains("too big"), "{body}");
}

// ---- client SQL ----

#[tokio::test]
async fn a_keyless_read_can_be_narrowed_to_the_owned_ranges() {
    let node = TestNode::new().await;
    let rows: Vec<Value> = (0..200)
        .map(|i| json!({"id": format!("u{i}"), "name": format!("n{i}")}))
        .collect();
    let (status, body) = node
        .call(
            "POST",
            "/v1/tables/users/rows",
            Some(json!({ "rows": rows })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let half = u32::MAX / 2;
    let owned: Vec<String> = (0..200)
        .map(|i| format!("u{i}"))
        .filter(|k| shardlite_ring::hash_key(k) <= half)
        .collect();
    assert!(owned.len() > 50 && owned.len() < 150, "{}", owned.len());
    let narrowed = |sql: &str| json!({"sql": sql, "readonly": true, "owned": [[0, half]]});
    let (status, body) = node.sql(narrowed("SELECT count(*) FROM users")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["results"][0]["rows"], json!([[owned.len()]]));
    // Joins and subqueries see the narrowed table too; columns keep their names.
    let (status, body) = node
        .sql(narrowed(
            "SELECT a.id, a.name FROM users a JOIN users b ON a.id = b.id \
             WHERE a.id IN (SELECT id FROM users) ORDER BY a.id",
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["results"][0]["columns"], json!(["id", "name"]));
    let mut expected = owned.clone();
    expected.sort();
    let got: Vec<&str> = body["results"][0]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[0].as_str().unwrap())
        .collect();
    assert_eq!(got, expected);
    // main.users would read the whole table and skip the narrowing: refused with the reason,
    // in a subquery too.
    for sql in [
        "SELECT count(*) FROM main.users",
        "SELECT count(*) FROM users WHERE id IN (SELECT id FROM main.users)",
        "SELECT count(*) FROM MAIN.Users",
        "SELECT u.name FROM \"main\".\"users\" AS u",
    ] {
        let (status, body) = node.sql(narrowed(sql)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{sql}: {body}");
        assert!(error_of(&body).contains("without \"main.\""), "{body}");
    }
    // Tables that are not narrowed stay reachable as main.<table>.
    let (status, body) = node
        .sql(narrowed("SELECT count(*) FROM main.sqlite_schema"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The next reads see the whole table again, main.users included: the views, the function
    // and the refusal were only the request's.
    let (status, body) = node
        .sql(json!({"sql": "SELECT count(*) FROM main.users", "readonly": true}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["results"][0]["rows"], json!([[200]]));
    for _ in 0..4 {
        let (status, body) = node
            .sql(json!({"sql": "SELECT count(*) FROM users", "readonly": true}))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["results"][0]["rows"], json!([[200]]));
        let (status, _) = node
            .sql(json!({"sql": "SELECT shardlite_owned('u1')", "readonly": true}))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }
    // Only for reads, and only with valid ranges.
    let (status, body) = node
        .sql(json!({"key": "u1", "sql": "DELETE FROM users", "owned": [[0, half]]}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(error_of(&body).contains("owned"), "{body}");
    let (status, _) = node
        .sql(json!({"sql": "SELECT 1", "readonly": true, "owned": [[5, 1]]}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        node.query("SELECT count(*) FROM users").await,
        vec![json!([200])]
    );
}

#[tokio::test]
async fn keyed_sql_writes_and_reports() {
    let node = TestNode::new().await;
    let (status, body) = node
        .sql(json!({"sql": "INSERT INTO counters (id, n) VALUES (?, ?)", "params": [7, 3]}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"results": [{"columns": [], "rows": [], "rows_affected": 1, "last_insert_id": 7}]})
    );
    let (status, body) = node
        .sql(
            json!({"sql": "SELECT id, n FROM counters WHERE id = ?1", "params": [7],
                    "readonly": true}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["results"][0]["columns"], json!(["id", "n"]));
    assert_eq!(body["results"][0]["rows"], json!([[7, 3]]));
    assert_eq!(body["results"][0]["rows_affected"], 0);
    // The insert's rowid belongs to its own answer: a later read or update on the same
    // (shared writer) connection reports none.
    assert_eq!(body["results"][0]["last_insert_id"], 0, "{body}");
    let (status, body) = node
        .sql(json!({"statements": [
            {"sql": "UPDATE counters SET n = n + 1 WHERE id = 7"},
            {"sql": "INSERT INTO counters (id, n) VALUES (9, 1)"},
            {"sql": "DELETE FROM counters WHERE id = 9"},
        ]}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let reported: Vec<&Value> = body["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| &r["last_insert_id"])
        .collect();
    assert_eq!(reported, [&json!(0), &json!(9), &json!(0)], "{body}");
    // Wrong parameter count is a clear 400.
    let (status, body) = node.sql(json!({"sql": "SELECT ?", "params": []})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_of(&body).contains("parameter"), "{body}");
    // Syntax errors are the client's.
    let (status, _) = node.sql(json!({"sql": "SELEC 1"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // `params: null` is no parameters, at the top and inside a list.
    let (status, body) = node.sql(json!({"sql": "SELECT 1", "params": null})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = node
        .sql(json!({"statements": [{"sql": "SELECT 1", "params": null}]}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn a_statement_list_is_all_or_nothing() {
    let node = TestNode::new().await;
    let (status, body) = node
        .sql(json!({"statements": [
            {"sql": "INSERT INTO counters (id, n) VALUES (1, 1)"},
            {"sql": "INSERT INTO counters (id, n) VALUES (2, NULL)"},
        ]}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(error_of(&body).contains("NOT NULL"), "{body}");
    node.assert_writer_clean();
    assert_eq!(
        node.query("SELECT count(*) FROM counters").await,
        [json!([0])]
    );
    let (status, body) = node
        .sql(json!({"statements": [
            {"sql": "INSERT INTO counters (id, n) VALUES (1, 1)"},
            {"sql": "UPDATE counters SET n = n + ? WHERE id = 1", "params": [41]},
            {"sql": "SELECT n FROM counters WHERE id = 1"},
        ]}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["results"].as_array().unwrap().len(), 3);
    assert_eq!(body["results"][2]["rows"], json!([[42]]));
    // Shape errors.
    for bad in [
        json!({}),
        json!({"sql": "SELECT 1", "statements": []}),
        json!({"statements": []}),
        json!({"statements": [{"sql": "SELECT 1"}], "params": [1]}),
    ] {
        let (status, _) = node.sql(bad.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    }
}

#[tokio::test]
async fn sql_values_map_both_ways() {
    let node = TestNode::new().await;
    let params = json!([
        "v1", null, true, 12, 2.5, "text ✓", {"a": [1, 2]}, {"$base64": "AAEC/w=="}
    ]);
    let (status, body) = node
        .sql(json!({"sql": "SELECT ?, ?, ?, ?, ?, ?, ?, ?", "params": params}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["results"][0]["rows"][0],
        json!(["v1", null, 1, 12, 2.5, "text ✓", "{\"a\":[1,2]}", {"$base64": "AAEC/w=="}])
    );
    let (_, body) = node
        .sql(json!({"sql": "SELECT typeof(?), 1e999", "params": [{"$base64": "AA=="}]}))
        .await;
    assert_eq!(body["results"][0]["rows"][0], json!(["blob", null]));
}

// ---- rows ----

#[tokio::test]
async fn rows_round_trip_with_awkward_keys() {
    let node = TestNode::new().await;
    for key in [
        "ünïcödé ключ 鍵",
        "with space",
        "a/b",
        "a&b=c",
        "100%",
        "what?",
        "#hash",
        "1+1",
        "emoji 🦀",
    ] {
        let uri = format!("/v1/tables/users/rows/{}", encode(key));
        let (status, body) = node
            .call("PUT", &uri, Some(json!({"name": key, "age": 3})))
            .await;
        assert_eq!(status, StatusCode::OK, "{key}: {body}");
        assert_eq!(body, json!({"table": "users", "key": key}));
        let (status, row) = node.call("GET", &uri, None).await;
        assert_eq!(status, StatusCode::OK, "{key}: {row}");
        assert_eq!(
            row,
            json!({"id": key, "name": key, "email": null, "age": 3, "data": null})
        );
    }
    let (_, body) = node.sql(json!({"sql": "SELECT count(*) FROM users"})).await;
    assert_eq!(body["results"][0]["rows"], json!([[9]]));
}

#[tokio::test]
async fn integer_keys_must_be_canonical() {
    let node = TestNode::new().await;
    let (status, body) = node
        .call("PUT", "/v1/tables/counters/rows/42", Some(json!({"n": 1})))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"table": "counters", "key": 42}));
    for bad in ["042", "%2B1", "4.0", "%201", "abc", "-0"] {
        let (status, body) = node
            .call(
                "PUT",
                &format!("/v1/tables/counters/rows/{bad}"),
                Some(json!({"n": 1})),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        let (status, _) = node
            .call("GET", &format!("/v1/tables/counters/rows/{bad}"), None)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    }
    let (status, row) = node.call("GET", "/v1/tables/counters/rows/42", None).await;
    assert_eq!((status, row), (StatusCode::OK, json!({"id": 42, "n": 1})));
    // Stored as an INTEGER, not as text.
    assert_eq!(
        node.query("SELECT typeof(id) FROM counters").await,
        [json!(["integer"])]
    );
}

/// A NUMERIC or REAL key column stores text that reads as a number as that number: `042`
/// would be the row `42` under another routing text, so such keys are refused; a canonical
/// integer is stored as the INTEGER it routes as, and other text as itself.
#[tokio::test]
async fn number_like_keys_of_numeric_and_real_columns_are_refused() {
    let node = TestNode::new().await;
    let request = json!({"migrations": [
        {"version": 3, "name": "numeric_keys",
         "sql": "CREATE TABLE prices (id NUMERIC PRIMARY KEY, p INTEGER); \
                 CREATE TABLE temps (id REAL PRIMARY KEY, t INTEGER);"},
    ]});
    let (status, body) = node.call("POST", "/v1/migrations", Some(request)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let put = |table: &'static str, key: &'static str| {
        let node = &node;
        async move {
            node.call(
                "PUT",
                &format!("/v1/tables/{table}/rows/{key}"),
                Some(json!({"p": 1})),
            )
            .await
        }
    };
    for (table, bad) in [
        ("prices", "042"),
        ("prices", "4.0"),
        ("prices", "%2042"),
        ("prices", "1e3"),
        ("temps", "42"),
        ("temps", "4.5"),
    ] {
        let (status, body) = put(table, bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{table} {bad}: {body}");
        assert!(
            error_of(&body).contains("stored as a number"),
            "{table} {bad}: {body}"
        );
    }
    let (status, body) = put("prices", "42").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = put("prices", "2024-01-01").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = node
        .call("PUT", "/v1/tables/temps/rows/t1", Some(json!({"t": 1})))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        node.query("SELECT typeof(id) FROM prices ORDER BY id")
            .await,
        [json!(["integer"]), json!(["text"])]
    );
    // A batch is checked the same way, and nothing of it is stored.
    let (status, body) = node
        .call(
            "POST",
            "/v1/tables/prices/rows",
            Some(json!({"rows": [{"id": "7", "p": 1}, {"id": "07", "p": 2}]})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        node.query("SELECT count(*) FROM prices").await,
        [json!([2])]
    );
}

#[tokio::test]
async fn put_updates_only_the_named_columns() {
    let node = TestNode::new().await;
    let uri = "/v1/tables/users/rows/u1";
    node.call(
        "PUT",
        uri,
        Some(json!({"name": "Ann", "email": "ann@example.com", "age": 30})),
    )
    .await;
    let (status, _) = node.call("PUT", uri, Some(json!({"age": 31}))).await;
    assert_eq!(status, StatusCode::OK);
    let (_, row) = node.call("GET", uri, None).await;
    assert_eq!(
        row,
        json!({"id": "u1", "name": "Ann", "email": "ann@example.com", "age": 31, "data": null})
    );
    // The key column may be repeated in the body if it agrees with the path.
    let (status, _) = node
        .call("PUT", uri, Some(json!({"id": "u1", "name": "Anne"})))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = node
        .call("PUT", uri, Some(json!({"id": "u2", "name": "Anne"})))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // Only the key: inserts if absent, changes nothing if present.
    let (status, _) = node.call("PUT", uri, Some(json!({}))).await;
    assert_eq!(status, StatusCode::OK);
    let (_, row) = node.call("GET", uri, None).await;
    assert_eq!(row["name"], "Anne");
    // A constraint violation is a conflict and changes nothing.
    let (status, body) = node
        .call(
            "PUT",
            "/v1/tables/users/rows/u3",
            Some(json!({"email": "ann@example.com"})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(error_of(&body).contains("UNIQUE"), "{body}");
    let (status, _) = node.call("GET", "/v1/tables/users/rows/u3", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn row_values_map_as_the_contract_says() {
    let node = TestNode::new().await;
    let uri = "/v1/tables/users/rows/v";
    let (status, body) = node
        .call(
            "PUT",
            uri,
            Some(
                json!({"name": {"$base64": "AAEC/w=="}, "email": null, "age": true,
                        "data": {"nested": [1, "two", null]}}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, row) = node.call("GET", uri, None).await;
    assert_eq!(
        row,
        json!({"id": "v", "name": {"$base64": "AAEC/w=="}, "email": null, "age": 1,
               "data": "{\"nested\":[1,\"two\",null]}"})
    );
    node.call("PUT", uri, Some(json!({"age": 2.5}))).await;
    let (_, row) = node.call("GET", uri, None).await;
    assert_eq!(row["age"], json!(2.5));
    let (status, _) = node
        .call("PUT", uri, Some(json!({"age": {"$base64": "***"}})))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn batch_upserts_are_all_or_nothing() {
    let node = TestNode::new().await;
    let uri = "/v1/tables/users/rows";
    let (status, body) = node
        .call(
            "POST",
            uri,
            Some(json!({"rows": [{"id": "a", "name": "A"}, {"id": "b", "name": "B"}]})),
        )
        .await;
    assert_eq!((status, body), (StatusCode::OK, json!({"upserted": 2})));
    for bad in [
        json!({"rows": [{"id": "c"}, {"name": "no key"}]}),
        json!({"rows": [{"id": "c"}, {"id": "d", "nope": 1}]}),
        json!({"rows": [{"id": "c"}, "not an object"]}),
        json!({"rows": [{"id": "c"}, {"id": ""}]}),
        json!({"rows": [{"id": "c"}, {"id": [1]}]}),
    ] {
        let (status, body) = node.call("POST", uri, Some(bad.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    // Valid rows, but the second breaks a constraint inside the transaction.
    let (status, body) = node
        .call(
            "POST",
            uri,
            Some(json!({"rows": [{"id": "c", "email": "x@y"}, {"id": "d", "email": "x@y"}]})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    node.assert_writer_clean();
    assert_eq!(node.user_count().await, 2);
    let (status, body) = node
        .call(
            "POST",
            "/v1/tables/counters/rows",
            Some(json!({"rows": [{"id": "5"}, {"id": 6, "n": 2}]})),
        )
        .await;
    assert_eq!((status, body), (StatusCode::OK, json!({"upserted": 2})));
}

#[tokio::test]
async fn delete_removes_a_row_once() {
    let node = node_with_a_user().await;
    let uri = "/v1/tables/users/rows/u1";
    assert_eq!(
        node.call("DELETE", uri, None).await,
        (StatusCode::OK, json!({"deleted": 1}))
    );
    let (status, body) = node.call("DELETE", uri, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = node.call("GET", uri, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(error_of(&body).contains("not found"), "{body}");
}

#[tokio::test]
async fn bad_requests_get_json_errors() {
    let node = TestNode::new().await;
    for table in ["nope", "_shardlite_migrations", "sqlite_schema"] {
        let (status, body) = node
            .call("GET", &format!("/v1/tables/{table}/rows/1"), None)
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{table}");
        assert!(error_of(&body).contains("unknown table"), "{body}");
    }
    let (status, body) = node
        .call("PUT", "/v1/tables/users/rows/a", Some(json!({"nope": 1})))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_of(&body).contains("\"nope\""), "{body}");
    let (status, _) = node
        .call("PUT", "/v1/tables/users/rows/a", Some(json!([1, 2])))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = node
        .call_raw("PUT", "/v1/tables/users/rows/a", Some("{not json".into()))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    error_of(&body);
    let (status, body) = node
        .call_raw("POST", "/v1/sql", Some("{\"sql\": 5}".into()))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // The message names where in the body the wrong value is.
    assert!(error_of(&body).contains("sql: invalid type"), "{body}");
    let (status, body) = node
        .call_raw(
            "POST",
            "/v1/tables/users/rows",
            Some(r#"{"rows": [{"id": "a"}, 7]}"#.into()),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    error_of(&body);
    // A JSON body not labelled as JSON is refused, also by the fast path.
    for content_type in [None, Some("text/plain"), Some("application/jsonx")] {
        let mut request = Request::post("/v1/tables/users/rows");
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let response = router(node.state.clone())
            .oneshot(request.body(Body::from(r#"{"rows": []}"#)).unwrap())
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            StatusCode::BAD_REQUEST,
            "{content_type:?}"
        );
    }
    for content_type in ["application/json; charset=utf-8", "application/vnd.x+json"] {
        let response = router(node.state.clone())
            .oneshot(
                Request::post("/v1/tables/users/rows")
                    .header("content-type", content_type)
                    .body(Body::from(r#"{"rows": []}"#))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{content_type}");
    }
    let (status, body) = node.call("GET", "/v1/nothing", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    error_of(&body);
    let (status, body) = node.call("PATCH", "/v1/sql", None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    error_of(&body);
    let long_key = "k".repeat(2000);
    let (status, _) = node
        .call("GET", &format!("/v1/tables/users/rows/{long_key}"), None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn sql_with_no_statement_or_a_nul_byte_is_400() {
    let node = TestNode::new().await;
    for sql in [
        "",
        "   ",
        ";",
        "-- only a comment",
        "/* */ ;",
        "SELECT 1\u{0}; DROP TABLE users",
    ] {
        for readonly in [true, false] {
            let (status, body) = node
                .call(
                    "POST",
                    "/v1/sql",
                    Some(json!({"sql": sql, "readonly": readonly})),
                )
                .await;
            assert_eq!(
                status,
                StatusCode::BAD_REQUEST,
                "{sql:?} readonly={readonly}: {body}"
            );
            error_of(&body);
        }
        let (status, body) = node
            .call(
                "POST",
                "/v1/sql",
                Some(json!({"statements": [{"sql": "INSERT INTO users (id) VALUES ('z')"}, {"sql": sql}]})),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{sql:?} in a list: {body}");
    }
    let (status, _) = node.call("GET", "/v1/tables/users/rows/z", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "the list was rolled back");
    let (status, _) = node
        .call(
            "POST",
            "/v1/sql",
            Some(json!({"sql": "SELECT count(*) FROM users", "readonly": true})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "users still exists");
}

#[tokio::test]
async fn bodies_over_the_limit_get_413() {
    let node = TestNode::with_config(|c| c.max_body_bytes = 4096).await;
    let big = json!({"name": "x".repeat(5000)});
    let (status, body) = node.call("PUT", "/v1/tables/users/rows/a", Some(big)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    error_of(&body);
    let (status, _) = node.call("GET", "/v1/tables/users/rows/a", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

// ---- keys and stats ----

#[tokio::test]
async fn keys_page_in_key_order() {
    let node = TestNode::new().await;
    let rows: Vec<Value> = (1..=5).map(|i| json!({"id": i * 10})).collect();
    node.call(
        "POST",
        "/v1/tables/counters/rows",
        Some(json!({"rows": rows})),
    )
    .await;
    let (status, page) = node
        .call(
            "POST",
            "/v1/keys",
            Some(json!({"table": "counters", "limit": 2})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page, json!({"keys": [10, 20], "next": 20}));
    let (_, page) = node
        .call(
            "POST",
            "/v1/keys",
            Some(json!({"table": "counters", "after": 20, "limit": 2})),
        )
        .await;
    assert_eq!(page, json!({"keys": [30, 40], "next": 40}));
    let (_, page) = node
        .call(
            "POST",
            "/v1/keys",
            Some(json!({"table": "counters", "after": 40, "limit": 2})),
        )
        .await;
    assert_eq!(page, json!({"keys": [50], "next": null}));
    let (_, page) = node
        .call(
            "POST",
            "/v1/keys",
            Some(json!({"table": "counters", "after": null})),
        )
        .await;
    assert_eq!(page, json!({"keys": [10, 20, 30, 40, 50], "next": null}));
    let (status, _) = node
        .call(
            "POST",
            "/v1/keys",
            Some(json!({"table": "counters", "limit": 0})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = node
        .call("POST", "/v1/keys", Some(json!({"table": "nope"})))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn stats_count_rows_per_table() {
    let node = node_with_a_user().await;
    node.call("PUT", "/v1/tables/counters/rows/1", Some(json!({})))
        .await;
    node.call("PUT", "/v1/tables/counters/rows/2", Some(json!({})))
        .await;
    let (status, stats) = node.call("GET", "/v1/stats", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stats["rows"], 3);
    assert_eq!(stats["tables"], json!({"counters": 2, "users": 1}));
    assert!(stats["bytes"].as_u64().unwrap() > 0);
}

// ---- migrations ----

#[tokio::test]
async fn migrations_apply_once_and_are_listed() {
    let node = TestNode::empty(|_| {});
    let (status, body) = node
        .call("POST", "/v1/migrations", Some(migrations()))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"applied": [1, 2], "current": 2}));
    let (status, body) = node
        .call("POST", "/v1/migrations", Some(migrations()))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"applied": [], "current": 2}));
    let (status, body) = node.call("GET", "/v1/migrations", None).await;
    assert_eq!(status, StatusCode::OK);
    let applied = body["applied"].as_array().unwrap();
    assert_eq!(applied.len(), 2);
    assert_eq!(applied[0]["version"], 1);
    assert_eq!(applied[0]["name"], "users");
    assert_eq!(applied[0]["checksum"], migrate::checksum(USERS));
    let at = applied[0]["applied_at"].as_str().unwrap();
    assert!(
        at.len() == 24 && at.ends_with('Z') && at.as_bytes()[10] == b'T',
        "{at}"
    );
    let (_, schema) = node.call("GET", "/v1/schema", None).await;
    assert_eq!(schema["tables"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn a_changed_migration_is_refused_before_anything_runs() {
    let node = TestNode::new().await;
    let request = json!({"migrations": [
        {"version": 1, "name": "users", "sql": format!("{USERS} -- edited")},
        {"version": 3, "name": "orders", "sql": "CREATE TABLE orders (id TEXT PRIMARY KEY)"},
    ]});
    let (status, body) = node.call("POST", "/v1/migrations", Some(request)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let message = error_of(&body);
    assert!(message.contains("migration 1"), "{message}");
    assert!(message.contains(&migrate::checksum(USERS)), "{message}");
    let (_, schema) = node.call("GET", "/v1/schema", None).await;
    assert_eq!(
        schema["tables"].as_array().unwrap().len(),
        2,
        "orders was created"
    );
    // A renamed migration is a conflict too.
    let request = json!({"migrations": [{"version": 1, "name": "people", "sql": USERS}]});
    let (status, _) = node.call("POST", "/v1/migrations", Some(request)).await;
    assert_eq!(status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn a_failing_migration_rolls_back_alone() {
    let node = TestNode::new().await;
    let request = json!({"migrations": [
        {"version": 3, "name": "orders", "sql": "CREATE TABLE orders (id TEXT PRIMARY KEY, total REAL)"},
        {"version": 4, "name": "broken",
         "sql": "CREATE TABLE half (id TEXT PRIMARY KEY); CREATE TABLEX oops;"},
        {"version": 5, "name": "after", "sql": "CREATE TABLE later (id TEXT PRIMARY KEY)"},
    ]});
    let (status, body) = node.call("POST", "/v1/migrations", Some(request)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let message = error_of(&body);
    assert!(
        message.starts_with("migration 4 (broken) failed: "),
        "{message}"
    );
    assert!(message.contains("syntax error"), "{message}");
    node.assert_writer_clean();
    let (_, schema) = node.call("GET", "/v1/schema", None).await;
    let names: Vec<&str> = schema["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["counters", "orders", "users"]);
    let (_, body) = node.call("GET", "/v1/migrations", None).await;
    let versions: Vec<i64> = body["applied"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["version"].as_i64().unwrap())
        .collect();
    assert_eq!(versions, [1, 2, 3]);
    // Rows go straight into a table a migration just created.
    let (status, _) = node
        .call(
            "PUT",
            "/v1/tables/orders/rows/o1",
            Some(json!({"total": 9.5})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn rows_show_columns_added_by_a_later_migration() {
    let node = node_with_a_user().await;
    // Warm every reader's statement cache with the old shape.
    for _ in 0..8 {
        let (_, row) = node.call("GET", "/v1/tables/users/rows/u1", None).await;
        assert_eq!(row.as_object().unwrap().len(), 5);
    }
    let request = json!({"migrations": [
        {"version": 3, "name": "nick", "sql": "ALTER TABLE users ADD COLUMN nick TEXT DEFAULT 'n'"},
    ]});
    let (status, body) = node.call("POST", "/v1/migrations", Some(request)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for _ in 0..8 {
        let (status, row) = node.call("GET", "/v1/tables/users/rows/u1", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(row["nick"], "n", "{row}");
    }
    let (status, _) = node
        .call(
            "PUT",
            "/v1/tables/users/rows/u1",
            Some(json!({"nick": "A"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn migrations_cannot_touch_internals_or_transactions() {
    let node = TestNode::new().await;
    for (sql, expect) in [
        ("DROP TABLE _shardlite_migrations", "_shardlite_"),
        (
            "CREATE TABLE a (id PRIMARY KEY); COMMIT;",
            "own transaction",
        ),
        ("ATTACH 'x.db' AS x", "ATTACH"),
        (
            "PRAGMA recursive_triggers = OFF",
            "PRAGMA recursive_triggers",
        ),
        ("PRAGMA load_extension('x')", "load_extension"),
    ] {
        let request = json!({"migrations": [{"version": 3, "name": "bad", "sql": sql}]});
        let (status, body) = node.call("POST", "/v1/migrations", Some(request)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{sql}: {body}");
        assert!(error_of(&body).contains(expect), "{sql}: {body}");
        node.assert_writer_clean();
    }
    let (_, body) = node.call("GET", "/v1/migrations", None).await;
    assert_eq!(body["applied"].as_array().unwrap().len(), 2);
    let on: i64 = node.state.with_writer_for_test(|conn| {
        conn.query_row("PRAGMA recursive_triggers", [], |r| r.get(0))
            .unwrap()
    });
    assert_eq!(on, 1, "a migration changed the writer's settings");
    // Table rebuild scripts may switch foreign keys off (a no-op inside the transaction).
    let request = json!({"migrations": [{"version": 3, "name": "rebuild", "sql":
        "PRAGMA foreign_keys = OFF; CREATE TABLE e (id TEXT PRIMARY KEY); PRAGMA user_version = 3;"}]});
    let (status, body) = node.call("POST", "/v1/migrations", Some(request)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // A new migration below the highest applied version would give shards different histories.
    let request = json!({"migrations": [
        {"version": 5, "name": "d", "sql": "CREATE TABLE d (id TEXT PRIMARY KEY)"},
    ]});
    let (status, body) = node.call("POST", "/v1/migrations", Some(request)).await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({"applied": [5], "current": 5}))
    );
    let request = json!({"migrations": [
        {"version": 4, "name": "c", "sql": "CREATE TABLE c (id TEXT PRIMARY KEY)"},
    ]});
    let (status, body) = node.call("POST", "/v1/migrations", Some(request)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(error_of(&body).contains("forward-only"), "{body}");
}

// ---- serving ----

#[tokio::test]
async fn serve_answers_on_a_socket_and_shuts_down() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let node = TestNode::new().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, node.state.clone(), async {
        let _ = stopped.await;
    }));
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("{\"status\":\"ok\"}"), "{answer}");
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

// ---- identity ----

/// One request with `x-shardlite-node` (and, if given, the cluster secret).
async fn send_as(
    state: NodeState,
    method: &str,
    uri: &str,
    node: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let authorization = bearer.map(|token| format!("Bearer {token}"));
    let mut headers = vec![(crate::identity::NODE_HEADER, node)];
    headers.extend(authorization.as_deref().map(|a| ("authorization", a)));
    let (status, _, body) =
        send_with(state, method, uri, &headers, body.map(|b| b.to_string())).await;
    (status, body)
}

/// The first call naming a node claims it; a call naming another is refused (421) before it
/// writes anything; a call naming none is not checked; the claim survives a restart.
#[tokio::test]
async fn a_node_answers_only_to_the_id_it_was_claimed_as() {
    let node = TestNode::new().await;
    assert_eq!(node.state.identity(), None);
    let row = Some(json!({ "name": "A" }));
    let (status, body) = send_as(
        node.state.clone(),
        "PUT",
        "/v1/tables/users/rows/a",
        "n1",
        None,
        row.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(node.state.identity().as_deref(), Some("n1"));

    let (status, body) = send_as(
        node.state.clone(),
        "PUT",
        "/v1/tables/users/rows/b",
        "n2",
        None,
        row.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::MISDIRECTED_REQUEST, "{body}");
    assert!(
        error_of(&body).contains("this is node n1, not n2"),
        "{body}"
    );
    let (status, _) = node.call("GET", "/v1/tables/users/rows/b", None).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "the refused write wrote nothing"
    );
    let (status, _) = send_as(node.state.clone(), "GET", "/healthz", "n2", None, None).await;
    assert_eq!(status, StatusCode::MISDIRECTED_REQUEST);

    // Without the header: not checked (a client or a bench talking to the node itself).
    let (status, body) = node.call("GET", "/v1/tables/users/rows/a", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let dir = node.dir;
    drop(node.state);
    let reopened = NodeState::open(NodeConfig::new(dir.path().join("node.db"))).unwrap();
    assert_eq!(
        reopened.identity().as_deref(),
        Some("n1"),
        "kept in the file"
    );
    let (_, body) = send_as(reopened.clone(), "GET", "/v1/stats", "n1", None, None).await;
    assert!(body.get("error").is_none(), "{body}");

    // Released (it left the cluster), it can be claimed as another node.
    let (status, body) =
        send_as(reopened.clone(), "DELETE", "/v1/identity", "n1", None, None).await;
    assert_eq!(
        (status, &body["released"]),
        (StatusCode::OK, &json!("n1")),
        "{body}"
    );
    assert_eq!(reopened.identity(), None);
    let (status, body) = send_as(reopened.clone(), "GET", "/v1/schema", "n5", None, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(reopened.identity().as_deref(), Some("n5"));
    let (status, _) = send_as(reopened.clone(), "GET", "/v1/stats", "n1", None, None).await;
    assert_eq!(status, StatusCode::MISDIRECTED_REQUEST, "stats check, too");
}

/// Only the proxy can claim a node: not through the open health check, not without the
/// cluster secret when the node has one, and not by reading its stats (the proxy reads them
/// to see that a node is empty before it adds it, and may refuse it).
#[tokio::test]
async fn only_an_authorized_call_claims_a_node() {
    let node = TestNode::empty(|c| c.cluster_secret = Some("s3cret".into()));
    let (status, _) = send_as(node.state.clone(), "GET", "/healthz", "n9", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = send_as(node.state.clone(), "GET", "/v1/identity", "n9", None, None).await;
    assert_eq!(
        (status, &body["node"]),
        (StatusCode::OK, &Value::Null),
        "{body}"
    );
    let (status, _) = send_as(node.state.clone(), "GET", "/v1/schema", "n9", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = send_as(node.state.clone(), "GET", "/v1/stats", "n9", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = send_as(
        node.state.clone(),
        "GET",
        "/v1/stats",
        "n9",
        Some("s3cret"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        node.state.identity(),
        None,
        "none of these calls claimed it"
    );
    let (status, body) = send_as(
        node.state.clone(),
        "GET",
        "/v1/schema",
        "n1",
        Some("s3cret"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(node.state.identity().as_deref(), Some("n1"));
    let (_, body) = send_as(node.state.clone(), "GET", "/v1/identity", "n1", None, None).await;
    assert_eq!(body["node"], "n1", "{body}");
    let (status, _) = send_as(node.state.clone(), "GET", "/v1/identity", "n2", None, None).await;
    assert_eq!(status, StatusCode::MISDIRECTED_REQUEST);
}
