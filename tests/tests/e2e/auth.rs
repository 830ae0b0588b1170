//! Who may do what: the data token, the admin token, and the cluster secret that keeps clients
//! from bypassing the proxy.

use serde_json::json;
use shardlite_tests::{Client, Spawned, sample_migrations, shardlite_bin, spawn_nodes};

const DATA: &str = "data-token-1";
const ADMIN: &str = "admin-token-2";
const SECRET: &str = "cluster-secret-3";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_guard_the_apis_and_the_secret_guards_the_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = spawn_nodes(dir.path(), 2, &["--cluster-secret", SECRET]);
    let state = dir.path().join("proxy.db");
    let (n1, n2) = (
        format!("n1={}", nodes[0].url),
        format!("n2={}", nodes[1].url),
    );
    let proxy = Spawned::start(&[
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--state",
        state.to_str().unwrap(),
        "--node",
        &n1,
        "--node",
        &n2,
        "--token",
        DATA,
        "--admin-token",
        ADMIN,
        "--cluster-secret",
        SECRET,
    ]);
    let anonymous = Client::new(&proxy.url);
    let data = Client::with_bearer(&proxy.url, Some(DATA));
    let admin = Client::with_bearer(&proxy.url, Some(ADMIN));

    let set = shardlite::migrate::read_dir(&sample_migrations()).unwrap();
    for client in [&anonymous, &data] {
        let (status, body) = client
            .post("/v1/cluster/migrations", json!({ "migrations": set }))
            .await;
        assert_eq!(status, 401, "the admin API needs the admin token: {body}");
    }
    let (status, body) = admin
        .post("/v1/cluster/migrations", json!({ "migrations": set }))
        .await;
    assert_eq!(status, 200, "{body}");

    let path = Client::row_path("users", "alice");
    for client in [&anonymous, &admin] {
        let (status, body) = client.put(&path, json!({ "name": "Mallory" })).await;
        assert_eq!(status, 401, "the data API needs the data token: {body}");
        assert!(body["error"].as_str().unwrap().contains("Bearer"), "{body}");
    }
    let (status, body) = data.put(&path, json!({ "name": "Alice" })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        data.get(&path).await.1["name"],
        "Alice",
        "refused writes changed nothing"
    );
    assert_eq!(anonymous.get("/healthz").await.0, 200, "health stays open");

    // A client that reaches a node directly gets nothing without the secret.
    for node in &nodes {
        let direct = Client::new(&node.url);
        assert_eq!(direct.get("/healthz").await.0, 200);
        let (status, body) = direct.put(&path, json!({ "name": "Mallory" })).await;
        assert_eq!(status, 401, "{body}");
        let (status, _) = direct
            .post(
                "/v1/sql",
                json!({ "sql": "SELECT * FROM users" , "readonly": true }),
            )
            .await;
        assert_eq!(status, 401);
        let wrong = Client::with_bearer(&node.url, Some("cluster-secret-4"));
        assert_eq!(wrong.post("/v1/transfer/capture", json!({})).await.0, 401);
    }
    assert_eq!(data.get(&path).await.1["name"], "Alice");

    // The admin commands take the token too.
    let out = std::process::Command::new(shardlite_bin())
        .args(["status", "--proxy", &proxy.url, "--admin-token", ADMIN])
        .env_remove("SHARDLITE_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(shardlite_bin())
        .args(["status", "--proxy", &proxy.url])
        .env_remove("SHARDLITE_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("SHARDLITE_ADMIN_TOKEN"));
}
