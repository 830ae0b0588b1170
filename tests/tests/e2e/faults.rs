//! Fault tests: real `shardlite` processes, killed with SIGKILL.

use serde_json::json;
use shardlite::upstream::UpstreamConfig;
use shardlite_tests::{Client, Spawned, migrate_sample, spawn_nodes, spawn_proxy};
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
            name_nodes: true,
        };
        let state = shardlite::ProxyState::open(config).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = Client::new(format!("http://{}", listener.local_addr().unwrap()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(shardlite::serve(listener, state, async {
            let _ = stopped.await;
        }));
        migrate_sample(&client).await;
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

/// Swaps two members' addresses in a stopped proxy's state file, as a hand edit or a mix-up
/// of ports after restarting nodes would.
fn swap_urls(dir: &std::path::Path) {
    let conn = rusqlite::Connection::open(dir.join("proxy.db")).unwrap();
    let url = |id: &str| -> String {
        conn.query_row("SELECT url FROM nodes WHERE id = ?1", [id], |r| r.get(0))
            .unwrap()
    };
    let (first, second) = (url("n1"), url("n2"));
    for (id, url) in [("n1", &second), ("n2", &first)] {
        conn.execute(
            "UPDATE nodes SET url = ?2 WHERE id = ?1",
            [id, url.as_str()],
        )
        .unwrap();
    }
}

/// Two nodes whose addresses got swapped in the proxy's state: each refuses the calls meant
/// for the other (it knows which node it is), so their keys get 503 saying what is wrong and
/// neither file takes the other's rows; `shardlite nodes set-url` then puts each right, and
/// everything is served as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_node_addresses_are_refused_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = spawn_nodes(dir.path(), 2, &[]);
    let mut proxy = spawn_proxy(dir.path(), &nodes);
    let client = Client::new(&proxy.url);
    migrate_sample(&client).await;
    for i in 0..40 {
        let (status, body) = client
            .put(
                &format!("/v1/tables/users/rows/u{i}"),
                json!({ "name": "before" }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let files = |dir: &std::path::Path| -> Vec<Vec<String>> {
        (1..=2)
            .map(|i| shardlite_tests::keys_in_file(&dir.join(format!("n{i}.db")), "users"))
            .collect()
    };
    let before = files(dir.path());
    assert!(before.iter().all(|keys| !keys.is_empty()), "{before:?}");

    proxy.kill();
    swap_urls(dir.path());
    let proxy = spawn_proxy(dir.path(), &nodes);
    let client = Client::new(&proxy.url);
    for i in 0..40 {
        let (status, body) = client
            .put(
                &format!("/v1/tables/users/rows/u{i}"),
                json!({ "name": "after" }),
            )
            .await;
        assert_eq!(status, 503, "{body}");
        assert!(
            body["error"].as_str().unwrap().contains("this is node n"),
            "{body}"
        );
        let (status, body) = client.get(&format!("/v1/tables/users/rows/u{i}")).await;
        assert_eq!(status, 503, "{body}");
    }
    let (status, body) = client.get("/v1/cluster/verify").await;
    assert!(status.is_server_error(), "{status} {body}");
    assert_eq!(files(dir.path()), before, "no file took the other's rows");

    // Repaired while serving: each node set to where it really listens. A node is never set
    // to an address where another node answers (its 421 fails the change).
    let set_url_with = |id: &str, url: &str, extra: &[&str]| {
        std::process::Command::new(shardlite_tests::shardlite_bin())
            .args(["nodes", "set-url", id, url, "--proxy", &proxy.url])
            .args(extra)
            .output()
            .unwrap()
    };
    let set_url = |id: &str, url: &str| set_url_with(id, url, &[]);
    for (id, node) in [("n1", &nodes[0]), ("n2", &nodes[1])] {
        let out = set_url(id, &node.url);
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            said.contains(&format!("node {id} is now at {}", node.url)),
            "{said}"
        );
    }
    let wrong = set_url("n1", &nodes[1].url);
    assert!(!wrong.status.success());
    let said = String::from_utf8_lossy(&wrong.stderr);
    assert!(said.contains("this is node n2, not n1"), "{said}");
    // Nor to a fresh node, which would own none of the rows (unless forced).
    let fresh = spawn_nodes(&dir.path().join("fresh"), 1, &[]);
    let wrong = set_url("n1", &fresh[0].url);
    let said = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        !wrong.status.success() && said.contains("has never served as n1"),
        "{said}"
    );
    for i in 0..40 {
        let (status, row) = client.get(&format!("/v1/tables/users/rows/u{i}")).await;
        assert_eq!(
            (status.as_u16(), &row["name"]),
            (200, &json!("before")),
            "{row}"
        );
    }
    shardlite_tests::assert_verified(&client).await;

    // Forced, an address may go to a node never claimed (a file from before node ids); the
    // node there is then n2, which `--json` shows as the endpoint's answer.
    let forced = set_url_with("n2", &fresh[0].url, &["--force", "--json"]);
    assert!(
        forced.status.success(),
        "{}",
        String::from_utf8_lossy(&forced.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&forced.stdout).unwrap();
    assert_eq!(
        (&answer["id"], &answer["url"]),
        (&json!("n2"), &json!(fresh[0].url))
    );
    let (_, body) = Client::new(&fresh[0].url).get("/v1/identity").await;
    assert_eq!(
        body["node"],
        serde_json::Value::Null,
        "not claimed until the proxy calls it"
    );
    let (status, body) = client.get("/v1/cluster/status").await;
    assert_eq!(status, 200, "{body}");
    let (_, body) = Client::new(&fresh[0].url).get("/v1/identity").await;
    assert_eq!(body["node"], "n2", "claimed by the proxy's first call");
}

/// Runs `shardlite ARGS...`, which should refuse to start: its exit code and stderr. Fails
/// the test if it is still running after 10 s (it started serving instead).
fn refused_start(args: &[&str]) -> (Option<i32>, String) {
    use std::io::Read;
    let mut child = shardlite_tests::tied::spawn_tied(shardlite_tests::shardlite_bin(), |c| {
        c.args(args)
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
    })
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("shardlite {args:?} started serving a file another process serves");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status.code(), stderr)
}

/// A second node on a node's file, or a second proxy on a proxy's state file, stops at start
/// and names the process that serves it; the first goes on serving. Once the first is killed
/// (`kill -9`), a new one starts on the same file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = spawn_nodes(dir.path(), 1, &[]);
    let mut proxy = spawn_proxy(dir.path(), &nodes);
    let client = Client::new(&proxy.url);
    migrate_sample(&client).await;
    let db = dir.path().join("n1.db");
    let state = dir.path().join("proxy.db");
    let (db, state) = (db.to_str().unwrap(), state.to_str().unwrap());

    for (role, flag, file, what, holder) in [
        ("node", "--db", db, "the node database", &nodes[0]),
        ("proxy", "--state", state, "the state file", &proxy),
    ] {
        let (code, stderr) = refused_start(&[role, "--listen", "127.0.0.1:0", flag, file]);
        assert_eq!(code, Some(1), "{stderr}");
        let pid = holder.child.id();
        assert!(
            stderr.contains(&format!(
                "cannot open {what} {file}: in use by another process (pid {pid}: shardlite \
                 {role})"
            )),
            "{stderr}"
        );
    }
    let (status, body) = client
        .put(
            "/v1/tables/users/rows/alice",
            json!({ "name": "still served" }),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // kill -9 leaves no lock behind: both start again on their files.
    let port = nodes[0].port();
    nodes[0].kill();
    proxy.kill();
    nodes[0] = Spawned::start(&["node", "--listen", &format!("127.0.0.1:{port}"), "--db", db]);
    let proxy = spawn_proxy(dir.path(), &nodes);
    let (status, body) = Client::new(&proxy.url)
        .get("/v1/tables/users/rows/alice")
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["name"], "still served");
}
