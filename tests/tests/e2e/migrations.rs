//! Migrations on every shard: ordered, tracked, checksummed, resumable (contract guarantee 5).

use serde_json::{Value, json};
use shardlite_node::migrate::{Migration, checksum};
use shardlite_tests::{Client, InProcessNode, Spawned, TestCluster, sample_migrations};
use std::path::Path;

fn sample() -> Vec<Migration> {
    shardlite::migrate::read_dir(&sample_migrations()).unwrap()
}

fn with(extra: &[(i64, &str, &str)]) -> Vec<Migration> {
    let mut set = sample();
    set.extend(extra.iter().map(|(version, name, sql)| Migration {
        version: *version,
        name: (*name).into(),
        sql: (*sql).into(),
    }));
    set
}

/// (version, checksum) rows of a node file's ledger.
fn ledger(db: &Path) -> Vec<(i64, String)> {
    let conn = shardlite_tests::open_read_only(db);
    let mut stmt = conn
        .prepare("SELECT version, checksum FROM _shardlite_migrations ORDER BY version")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn has_object(db: &Path, name: &str) -> bool {
    let conn = shardlite_tests::open_read_only(db);
    conn.query_row(
        "SELECT count(*) FROM sqlite_schema WHERE name = ?1",
        [name],
        |r| r.get::<_, i64>(0),
    )
    .unwrap()
        == 1
}

async fn migrate(client: &Client, set: &[Migration]) -> (u16, Value) {
    let (status, body) = client
        .post("/v1/cluster/migrations", json!({ "migrations": set }))
        .await;
    (status.as_u16(), body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_migrations_reach_every_node_and_rerunning_is_a_no_op() {
    let cluster = TestCluster::start_bare(3).await;
    let set = sample();
    let (status, body) = migrate(&cluster.client, &set).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 2);
    let expected: Vec<(i64, String)> = set.iter().map(|m| (m.version, checksum(&m.sql))).collect();
    for node in &cluster.nodes {
        assert_eq!(body["nodes"][&node.id]["applied"], json!([1, 2]), "{body}");
        assert!(
            has_object(&node.db, "users")
                && has_object(&node.db, "orders")
                && has_object(&node.db, "users_email")
        );
        assert_eq!(
            ledger(&node.db),
            expected,
            "{} records both, with checksums",
            node.id
        );
    }

    let (status, body) = migrate(&cluster.client, &set).await;
    assert_eq!(status, 200, "{body}");
    for node in &cluster.nodes {
        assert_eq!(
            body["nodes"][&node.id]["applied"],
            json!([]),
            "nothing runs twice: {body}"
        );
        assert_eq!(ledger(&node.db), expected);
    }
    let (_, matrix) = cluster.client.get("/v1/cluster/migrations").await;
    assert_eq!(matrix["lagging"], json!([]));
    assert_eq!(
        matrix["nodes"]["n3"]["applied"][1]["checksum"],
        json!(expected[1].1)
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_migration_is_refused_and_nothing_runs() {
    let cluster = TestCluster::start(3).await;
    let mut set = with(&[(3, "0003_tags", "CREATE TABLE tags (id TEXT PRIMARY KEY)")]);
    set[0].sql.push_str("\n-- edited after it was applied\n");
    let (status, body) = migrate(&cluster.client, &set).await;
    assert_eq!(status, 409, "{body}");
    let message = body["error"].as_str().unwrap();
    assert!(
        message.contains("0001_users") && message.contains("changed"),
        "names the file: {message}"
    );
    for node in &cluster.nodes {
        assert!(!has_object(&node.db, "tags"), "nothing ran on {}", node.id);
        assert_eq!(ledger(&node.db).len(), 2);
    }
    // A gap is refused before anything runs too.
    let gap = with(&[(4, "0004_x", "CREATE TABLE x (id TEXT PRIMARY KEY)")]);
    let (status, body) = migrate(&cluster.client, &gap).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("gap"), "{body}");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_was_down_catches_up_on_the_next_migrate() {
    let mut cluster = TestCluster::start(3).await;
    let port = cluster.nodes[1].port();
    cluster.nodes[1].stop().await;

    let set = with(&[(
        3,
        "0003_tags",
        "CREATE TABLE tags (id TEXT PRIMARY KEY, label TEXT)",
    )]);
    let (status, body) = migrate(&cluster.client, &set).await;
    assert_ne!(status, 200, "a lagging node is a failure: {body}");
    assert_eq!(body["lagging"], json!(["n2"]), "{body}");
    assert!(body["error"].as_str().unwrap().contains("n2"), "{body}");
    assert_eq!(body["nodes"]["n1"]["version"], 3);
    assert_eq!(body["nodes"]["n3"]["version"], 3);
    let (_, status_now) = cluster.client.get("/v1/cluster/status").await;
    let n2 = status_now["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == "n2")
        .unwrap()
        .clone();
    assert_eq!(n2["reachable"], false, "{status_now}");

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let db = cluster.nodes[1].db.clone();
    cluster.nodes[1] = InProcessNode::start_on("n2", db, listener).await;
    assert!(!has_object(&cluster.nodes[1].db, "tags"));
    // Verify cannot read a table n2 lacks: it says which node is behind and what to run,
    // not a bare 404 of the node's.
    let (status, body) = cluster.client.get("/v1/cluster/verify").await;
    assert_eq!(status, 409, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("node n2") && error.contains("tags") && error.contains("shardlite migrate"),
        "{error}"
    );
    let (status, body) = migrate(&cluster.client, &set).await;
    assert_eq!(status, 200, "{body}");
    let (status, report) = cluster.client.get("/v1/cluster/verify").await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(body["nodes"]["n2"]["applied"], json!([3]));
    assert_eq!(body["nodes"]["n1"]["applied"], json!([]));
    for node in &cluster.nodes {
        assert_eq!(ledger(&node.db).len(), 3, "{} is at version 3", node.id);
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_failing_on_one_node_leaves_that_node_as_it_was() {
    let cluster = TestCluster::start(3).await;
    let c = &cluster.client;
    // Two rows with the same name on n1 only: a unique index fails there and nowhere else.
    let mut on_n1 = Vec::new();
    for i in 0.. {
        let key = format!("dup{i}");
        let (_, put) = c
            .put(
                &Client::row_path("users", &key),
                json!({ "name": format!("unique {key}") }),
            )
            .await;
        if put["node"] == "n1" {
            on_n1.push(key);
            if on_n1.len() == 2 {
                break;
            }
        }
    }
    for key in &on_n1 {
        assert_eq!(
            c.put(&Client::row_path("users", key), json!({ "name": "same" }))
                .await
                .0,
            200
        );
    }
    let set = with(&[(
        3,
        "0003_unique_names",
        "CREATE UNIQUE INDEX users_name_unique ON users (name);",
    )]);
    let (status, body) = migrate(c, &set).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["lagging"], json!(["n1"]), "{body}");
    let error = body["nodes"]["n1"]["error"].as_str().unwrap();
    assert!(
        error.contains("UNIQUE constraint failed"),
        "SQLite's own message: {error}"
    );
    // Where n1 stands, read back from its ledger, not left unknown.
    assert_eq!(body["nodes"]["n1"]["version"], 2, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("n1 are not at version 3; the others are"),
        "{body}"
    );
    let n1 = cluster.node("n1");
    assert!(!has_object(&n1.db, "users_name_unique"), "n1 is as it was");
    assert_eq!(ledger(&n1.db).len(), 2);
    for id in ["n2", "n3"] {
        assert!(
            has_object(&cluster.node(id).db, "users_name_unique"),
            "{id} migrated"
        );
    }

    // Mend the data, run again: n1 catches up with the same migration.
    assert_eq!(c.delete(&Client::row_path("users", &on_n1[0])).await.0, 200);
    let (status, body) = migrate(c, &set).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["nodes"]["n1"]["applied"], json!([3]));
    cluster.stop().await;
}

/// A migration that fails on every node leaves each at its version, says that no node got
/// it, and may then be fixed: a file no node applied is not yet fixed in the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_failing_everywhere_says_so_and_its_file_may_be_fixed() {
    let cluster = TestCluster::start(3).await;
    let c = &cluster.client;
    let broken = with(&[(
        3,
        "0003_tags",
        "CREATE TABLE tags (id TEXT PRIMARY KEY); SELECT * FROM no_such_table;",
    )]);
    let (status, body) = migrate(c, &broken).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["lagging"], json!(["n1", "n2", "n3"]), "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.starts_with("no node is at version 3"), "{error}");
    assert!(!error.contains("the others"), "{error}");
    for id in ["n1", "n2", "n3"] {
        assert_eq!(body["nodes"][id]["version"], 2, "{body}");
        assert!(
            body["nodes"][id]["error"]
                .as_str()
                .unwrap()
                .contains("no such table"),
            "{body}"
        );
        assert!(
            !has_object(&cluster.node(id).db, "tags"),
            "{id}: rolled back"
        );
    }

    let fixed = with(&[(3, "0003_tags", "CREATE TABLE tags (id TEXT PRIMARY KEY);")]);
    let (status, body) = migrate(c, &fixed).await;
    assert_eq!(status, 200, "{body}");
    for id in ["n1", "n2", "n3"] {
        assert_eq!(body["nodes"][id]["version"], 3, "{body}");
        assert!(has_object(&cluster.node(id).db, "tags"), "{id}");
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_killed_mid_migration_finishes_it_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    for i in 1..=3 {
        nodes.push(
            InProcessNode::start(&format!("n{i}"), dir.path().join(format!("n{i}.db"))).await,
        );
    }
    let state = dir.path().join("proxy.db");
    let mut args = vec![
        "proxy".to_owned(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--state".into(),
        state.display().to_string(),
    ];
    for n in &nodes {
        args.push("--node".into());
        args.push(format!("{}={}", n.id, n.url));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let rows = 200_000;
    let slow = format!(
        "CREATE TABLE big (id INTEGER PRIMARY KEY, v TEXT);\n\
         WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {rows})\n\
         INSERT INTO big (id, v) SELECT x, hex(randomblob(16)) FROM c;"
    );
    let set = with(&[
        (3, "0003_big", &slow),
        (
            4,
            "0004_after",
            "CREATE TABLE after_big (id TEXT PRIMARY KEY)",
        ),
    ]);

    // Kill the proxy at several moments of a migration; each restart must converge.
    for delay_ms in [5u64, 60, 250] {
        let mut proxy = Spawned::start(&args);
        let client = Client::new(&proxy.url);
        let request = tokio::spawn({
            let client = client.clone();
            let body = bytes::Bytes::from(json!({ "migrations": set }).to_string());
            async move {
                client
                    .try_raw(http::Method::POST, "/v1/cluster/migrations", Some(body))
                    .await
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
        proxy.kill();
        let _ = request.await.unwrap();
    }
    let proxy = Spawned::start(&args);
    let client = Client::new(&proxy.url);
    let (status, body) = migrate(&client, &set).await;
    assert_eq!(status, 200, "{body}");
    for node in &nodes {
        assert_eq!(
            ledger(&node.db).iter().map(|l| l.0).collect::<Vec<_>>(),
            vec![1, 2, 3, 4],
            "{}",
            node.id
        );
        let conn = shardlite_tests::open_read_only(&node.db);
        let count: i64 = conn
            .query_row("SELECT count(*) FROM big", [], |r| r.get(0))
            .unwrap();
        assert_eq!(count, rows, "0003 ran exactly once on {}", node.id);
    }
    for node in &mut nodes {
        node.stop().await;
    }
}

/// The README's recipe for turning a text-keyed rowid table into a `WITHOUT ROWID` one (whose
/// rebalances clean up about three times faster): a migration that copies the rows into the new
/// table, drops the old one and renames the new one. Every row stays readable by its key, on the
/// same node, and the nodes then hold the table `WITHOUT ROWID`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_can_rebuild_a_table_without_rowid_and_keep_its_rows() {
    let cluster = TestCluster::start(3).await;
    let c = &cluster.client;
    let keys = shardlite_tests::preload_users(c, "kept", 300).await;
    let rebuild = readme_rebuild_migration();
    let (status, body) = migrate(c, &with(&[(3, "0003_users_without_rowid", &rebuild)])).await;
    assert_eq!(status, 200, "{body}");
    for node in &cluster.nodes {
        let sql = shardlite_tests::table_sql_in_file(&node.db, "users");
        assert!(sql.contains("WITHOUT ROWID"), "{}: {sql}", node.id);
        assert!(
            has_object(&node.db, "users_email"),
            "{}: the index is back",
            node.id
        );
    }
    for key in keys.iter().step_by(37) {
        let (status, row) = c.get(&Client::row_path("users", key)).await;
        assert_eq!(status, 200, "{key}: {row}");
        assert_eq!(row["name"], key.as_str());
    }
    let report = shardlite_tests::assert_verified(c).await;
    assert_eq!(report["rows_total"], 300, "{report}");
    // Writes go on as before, keyed SQL (now watched by TEMP triggers) included.
    let (status, body) = c
        .post(
            "/v1/sql",
            json!({ "key": "kept-1", "sql": "UPDATE users SET age = 7 WHERE id = 'kept-1'" }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    shardlite_tests::assert_refused_as_stray(
        c,
        "kept-1",
        "INSERT INTO users (id) VALUES ('elsewhere')",
    )
    .await;
    cluster.stop().await;
}

/// The migration the README gives for rebuilding `users` `WITHOUT ROWID`: the ```sql block that
/// starts with its file name, read from the README itself, so the test runs what users copy.
fn readme_rebuild_migration() -> String {
    let readme = std::fs::read_to_string(sample_migrations().join("../README.md")).unwrap();
    let start = readme
        .find("-- migrations/0003_users_without_rowid.sql")
        .expect("the README gives the rebuild migration");
    let block = &readme[start..];
    block[..block.find("```").expect("the block ends")].to_owned()
}
