//! Fault tests: real `shardlite` processes, killed with SIGKILL.

use serde_json::json;
use shardlite::upstream::UpstreamConfig;
use shardlite_tests::{Client, Spawned, sample_migrations, spawn_nodes};
use std::time::{Duration, Instant};

/// Three node processes and an in-process proxy over them.
struct ProcessCluster {
    dir: tempfile::TempDir,
    nodes: Vec<Spawned>,
    client: Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl ProcessCluster {
    async fn start(n: usize) -> ProcessCluster {
        let dir = tempfile::tempdir().unwrap();
        let nodes = spawn_nodes(dir.path(), n, &[]);
        let mut config = shardlite::ProxyConfig::new(dir.path().join("proxy.db"));
        config.seed_nodes = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (format!("n{}", i + 1), n.url.clone()))
            .collect();
        config.upstream = UpstreamConfig {
            connect_timeout: Duration::from_millis(300),
            request_timeout: Duration::from_secs(5),
            bearer: None,
        };
        let state = shardlite::ProxyState::open(config).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = Client::new(format!("http://{}", listener.local_addr().unwrap()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(shardlite::serve(listener, state, async {
            let _ = stopped.await;
        }));
        let set = shardlite::migrate::read_dir(&sample_migrations()).unwrap();
        let (status, body) = client
            .post("/v1/cluster/migrations", json!({ "migrations": set }))
            .await;
        assert_eq!(status, 200, "{body}");
        ProcessCluster {
            dir,
            nodes,
            client,
            stop: Some(stop),
        }
    }
}

impl Drop for ProcessCluster {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_costs_only_its_keys_and_loses_nothing() {
    let mut cluster = ProcessCluster::start(3).await;
    let c = cluster.client.clone();
    let keys: Vec<String> = (0..300).map(|i| format!("k{i}")).collect();
    let mut owner = std::collections::HashMap::new();
    for key in &keys {
        let (status, body) = c
            .put(&Client::row_path("users", key), json!({ "name": key }))
            .await;
        assert_eq!(status, 200, "{body}");
        owner.insert(key.clone(), body["node"].as_str().unwrap().to_owned());
    }

    // kill -9 node n2: every write it acknowledged is in its file already.
    let port = cluster.nodes[1].port();
    cluster.nodes[1].kill();

    let mut slowest = Duration::ZERO;
    for key in &keys {
        let started = Instant::now();
        let (status, body) = c.get(&Client::row_path("users", key)).await;
        slowest = slowest.max(started.elapsed());
        if owner[key] == "n2" {
            assert_eq!(status, 503, "{key} lives on the dead node: {body}");
            assert!(
                body["error"].as_str().unwrap().contains("n2"),
                "the error names the node: {body}"
            );
        } else {
            assert_eq!(status, 200, "{key} lives on a live node: {body}");
            assert_eq!(body["name"], json!(key));
        }
    }
    // Refused connections fail at once; the bound is the connect timeout, never the request timeout.
    assert!(
        slowest < Duration::from_secs(2),
        "a dead node must fail fast, slowest answer took {slowest:?}"
    );
    let (status, _) = c
        .put(&Client::row_path("users", "k-new-elsewhere"), json!({}))
        .await;
    assert!(status == 200 || status == 503);

    // The health checks mark it down: status shows it, and its keys get 503 with Retry-After.
    let down = wait_for_down(&c, "n2", true).await;
    assert_eq!(down["reachable"], false, "{down}");
    let n2_key = keys.iter().find(|k| owner[*k] == "n2").unwrap();
    let reply = c
        .try_raw(http::Method::GET, &Client::row_path("users", n2_key), None)
        .await
        .unwrap();
    assert_eq!(reply.0, 503);

    // The node comes back on the same address with its file: the proxy notices, and nothing
    // acknowledged was lost.
    let db = cluster.dir.path().join("n2.db");
    cluster.nodes[1] = Spawned::start(&[
        "node",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--db",
        db.to_str().unwrap(),
    ]);
    wait_for_down(&c, "n2", false).await;
    for key in keys.iter().filter(|k| owner[*k] == "n2") {
        let (status, body) = c.get(&Client::row_path("users", key)).await;
        assert_eq!(status, 200, "{key} after the restart: {body}");
        assert_eq!(body["name"], json!(key));
    }
}

/// Polls `GET /v1/cluster/status` until `node`'s `down` flag is `down`; returns its entry.
async fn wait_for_down(c: &Client, node: &str, down: bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, status) = c.get("/v1/cluster/status").await;
        let entry = status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == node)
            .unwrap()
            .clone();
        if entry["down"] == down {
            return entry;
        }
        assert!(
            Instant::now() < deadline,
            "{node} never became down={down}: {entry}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
