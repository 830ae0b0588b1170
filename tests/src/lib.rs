//! The end-to-end test harness: real proxies and nodes on 127.0.0.1 port 0, each with its own
//! temp directory, shut down and removed when the harness drops.
//!
//! Two ways to run a server:
//! - in-process ([`TestCluster::start`]): the proxy and nodes run as tasks of the test's tokio
//!   runtime; fast, and what most scenarios use.
//! - as real `shardlite` processes ([`Spawned`]): for fault tests that `kill -9` a server.
//!   [`shardlite_bin`] builds the binary once per test run. They die with the test process
//!   even when it is killed ([`tied`]).

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use shardlite::upstream::{Upstream, UpstreamConfig};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use http;
pub use serde_json;

/// The workspace's sample migrations.
pub fn sample_migrations() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("migrations")
}

/// A JSON client for the proxy's (or a node's) HTTP API.
#[derive(Clone)]
pub struct Client {
    upstream: Upstream,
    pub base: String,
}

impl Client {
    pub fn new(base: impl Into<String>) -> Client {
        Client::with_bearer(base, None)
    }

    /// A client that sends `Authorization: Bearer <token>` on every request.
    pub fn with_bearer(base: impl Into<String>, token: Option<&str>) -> Client {
        Client {
            upstream: Upstream::new(UpstreamConfig {
                connect_timeout: Duration::from_secs(2),
                request_timeout: Duration::from_secs(60),
                bearer: token.map(str::to_owned),
                name_nodes: false,
            }),
            base: base.into(),
        }
    }

    /// Sends a request; the body, if any, is JSON. Returns the status and the JSON answer
    /// (`Value::Null` for an empty body, a string for a body that is not JSON).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let body = body.map(|b| Bytes::from(serde_json::to_vec(&b).unwrap()));
        self.raw(method, path, body).await
    }

    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> (StatusCode, Value) {
        match self.try_raw(method.clone(), path, body).await {
            Ok(answer) => answer,
            Err(e) => panic!("{method} {}{path}: {}", self.base, e.message()),
        }
    }

    /// Like [`Client::raw`], but a refused connection or a timeout is an `Err`.
    pub async fn try_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<(StatusCode, Value), shardlite::error::ProxyError> {
        let reply = self
            .upstream
            .call("test", method, &self.base, path, body)
            .await?;
        let value = if reply.body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&reply.body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&reply.body).into()))
        };
        Ok((reply.status, value))
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, None).await
    }

    pub async fn put(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::PUT, path, Some(body)).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::DELETE, path, None).await
    }

    pub async fn patch(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::PATCH, path, Some(body)).await
    }

    /// `GET /v1/tables/{table}/rows/{key}`, the key percent-encoded.
    pub fn row_path(table: &str, key: &str) -> String {
        format!(
            "/v1/tables/{table}/rows/{}",
            shardlite::routing::encode_segment(key)
        )
    }
}

/// A node running as a task of the test's runtime.
pub struct InProcessNode {
    pub id: String,
    pub url: String,
    pub db: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl InProcessNode {
    /// Opens `db` and serves it on a fresh 127.0.0.1 port.
    pub async fn start(id: &str, db: PathBuf) -> InProcessNode {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(id, db, listener).await
    }

    pub async fn start_on(id: &str, db: PathBuf, listener: TcpListener) -> InProcessNode {
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = shardlite_node::NodeState::open(shardlite_node::NodeConfig::new(&db))
            .expect("a node opens its SQLite file");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(shardlite_node::serve(listener, state, async {
            let _ = stopped.await;
        }));
        InProcessNode {
            id: id.to_owned(),
            url,
            db,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The port it listens on (to start something else there once it is stopped).
    pub fn port(&self) -> u16 {
        port_of(&self.url)
    }

    /// Stops serving and waits for the server to finish.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

/// A proxy and its nodes, all in-process.
pub struct TestCluster {
    pub dir: TempDir,
    pub nodes: Vec<InProcessNode>,
    pub proxy: shardlite::ProxyState,
    pub url: String,
    pub client: Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestCluster {
    /// `n` nodes named n1..nN, a proxy seeded with them, the sample migrations applied.
    pub async fn start(n: usize) -> TestCluster {
        let cluster = Self::start_bare(n).await;
        migrate_sample(&cluster.client).await;
        cluster
    }

    /// Like [`TestCluster::start`] with no migrations applied.
    pub async fn start_bare(n: usize) -> TestCluster {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        for i in 1..=n {
            let id = format!("n{i}");
            let db = dir.path().join(format!("{id}.db"));
            nodes.push(InProcessNode::start(&id, db).await);
        }
        let mut config = shardlite::ProxyConfig::new(dir.path().join("proxy.db"));
        config.seed_nodes = nodes
            .iter()
            .map(|n| (n.id.clone(), n.url.clone()))
            .collect();
        config.upstream = UpstreamConfig {
            connect_timeout: Duration::from_millis(500),
            request_timeout: Duration::from_secs(10),
            bearer: None,
            name_nodes: true,
        };
        let proxy = shardlite::ProxyState::open(config).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(shardlite::serve(listener, proxy.clone(), async {
            let _ = stopped.await;
        }));
        TestCluster {
            dir,
            nodes,
            proxy,
            client: Client::new(&url),
            url,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn node(&self, id: &str) -> &InProcessNode {
        self.nodes.iter().find(|n| n.id == id).expect("known node")
    }

    /// Stops the proxy and every node.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
        for node in &mut self.nodes {
            node.stop().await;
        }
    }
}

/// A read-only connection to a server's SQLite file, to look at it directly while the server
/// runs (or after it stopped).
pub fn open_read_only(db: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap_or_else(|e| panic!("opening {} read-only: {e}", db.display()))
}

/// Every key of `table` stored in a node's SQLite file, read directly from the file.
pub fn keys_in_file(db: &Path, table: &str) -> Vec<String> {
    let conn = open_read_only(db);
    let mut stmt = conn
        .prepare(&format!("SELECT CAST(id AS TEXT) FROM \"{table}\""))
        .unwrap();
    stmt.query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// The `CREATE TABLE` text of `table` in a node's SQLite file, read directly from the file (to
/// see, say, that it is `WITHOUT ROWID`).
pub fn table_sql_in_file(db: &Path, table: &str) -> String {
    let conn = open_read_only(db);
    conn.query_row(
        "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = ?1",
        [table],
        |r| r.get(0),
    )
    .unwrap()
}

/// Keyed SQL `sql` under `key` through `client`, which must be refused (400) for writing a row
/// under another key.
pub async fn assert_refused_as_stray(client: &Client, key: &str, sql: &str) {
    let (status, body) = client
        .post("/v1/sql", json!({ "key": key, "sql": sql }))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{sql}: {body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("may insert or update rows under its own key")),
        "{body}"
    );
}

/// What a rebalance may leave on a node and must not: (capture triggers and change log, fences),
/// read directly from the node's file. Both are 0 once a job is done or stopped.
pub fn transfer_leftovers(db: &Path) -> (i64, i64) {
    let conn = open_read_only(db);
    conn.query_row(
        "SELECT (SELECT count(*) FROM sqlite_schema WHERE name LIKE '_shardlite_capture%' \
         OR name = '_shardlite_changes'), (SELECT count(*) FROM _shardlite_fences)",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .unwrap()
}

/// The `shardlite` binary of this workspace, built once per test process (same profile).
pub fn shardlite_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "--quiet", "-p", "shardlite", "--bin", "shardlite"]);
        if !cfg!(debug_assertions) {
            build.arg("--release");
        }
        let status = build.status().expect("cargo runs");
        assert!(status.success(), "building the shardlite binary failed");
        // The test executable lives in target/<profile>/deps/.
        let exe = std::env::current_exe().unwrap();
        let bin = exe
            .parent()
            .and_then(Path::parent)
            .unwrap()
            .join(format!("shardlite{}", std::env::consts::EXE_SUFFIX));
        assert!(bin.exists(), "no binary at {}", bin.display());
        bin
    })
    .clone()
}

/// A `shardlite` process (node or proxy), killed with SIGKILL when dropped.
pub struct Spawned {
    pub child: Child,
    /// `http://127.0.0.1:PORT`, read from the server's first line of output.
    pub url: String,
}

impl Spawned {
    /// Runs `shardlite ARGS...` (it must be a server started with `--listen 127.0.0.1:0` or a
    /// fixed port) and waits for its `listening on` line.
    pub fn start(args: &[&str]) -> Spawned {
        Spawned::start_with_env(args, &[])
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        port_of(&self.url)
    }
}

/// The port of an `http://127.0.0.1:PORT` server URL.
fn port_of(url: &str) -> u16 {
    url.rsplit(':').next().unwrap().parse().unwrap()
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.kill();
    }
}

impl TestCluster {
    /// Starts one more in-process node and adds it through `POST /v1/cluster/nodes` (joining).
    pub async fn add_node(&mut self, id: &str) -> Value {
        let node = InProcessNode::start(id, self.dir.path().join(format!("{id}.db"))).await;
        let (status, body) = self
            .client
            .post("/v1/cluster/nodes", json!({ "id": id, "url": node.url }))
            .await;
        assert_eq!(status, StatusCode::CREATED, "adding {id}: {body}");
        self.nodes.push(node);
        body
    }
}

/// Starts a rebalance and waits (bounded) for it to end; returns the final job status.
pub async fn rebalance_and_wait(client: &Client) -> Value {
    let (status, body) = client.post("/v1/cluster/rebalance", Value::Null).await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "starting the rebalance: {body}"
    );
    wait_for_rebalance(client, Duration::from_secs(120)).await
}

/// Polls `GET /v1/cluster/rebalance` until the job is no longer running.
pub async fn wait_for_rebalance(client: &Client, limit: Duration) -> Value {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Ok((StatusCode::OK, status)) = client
            .try_raw(Method::GET, "/v1/cluster/rebalance", None)
            .await
            && status["state"] != "running"
        {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the rebalance did not end within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The sum of the first column of a keyless read's rows: the table's row count, for
/// `SELECT count(*)`, which every shard answers with its own count.
pub fn summed_counts(answer: &Value) -> i64 {
    answer["results"][0]["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("not a SQL answer: {answer}"))
        .iter()
        .map(|row| row[0].as_i64().unwrap())
        .sum()
}

/// The ring a `GET /v1/cluster` answer describes (active and leaving nodes own data).
pub fn ring_of(cluster: &Value) -> shardlite_ring::Ring {
    let members = cluster["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["state"] != "joining")
        .map(|n| shardlite_ring::Member {
            id: shardlite_ring::NodeId::new(n["id"].as_str().unwrap()),
            weight: n["weight"].as_u64().unwrap() as u32,
        });
    shardlite_ring::Ring::new(members, shardlite_ring::DEFAULT_VNODES).unwrap()
}

pub mod history;
pub mod tied;

impl Spawned {
    /// Like [`Spawned::start`], with extra environment variables for the process (say
    /// `RUST_LOG=error`, for a test that makes a node fail on purpose thousands of times).
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Spawned {
        let mut child = tied::spawn_tied(shardlite_bin(), |command| {
            command
                .args(args)
                .env("RUST_LOG", "warn")
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
        })
        .expect("shardlite starts");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let url = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(url) = line.split("listening on ").nth(1) {
                        break url.trim().to_owned();
                    }
                }
                other => panic!("shardlite {args:?} exited before listening: {other:?}"),
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Spawned { child, url }
    }
}

/// Starts `n` node processes n1..nN with their files in `dir`, each with `extra` flags.
pub fn spawn_nodes(dir: &Path, n: usize, extra: &[&str]) -> Vec<Spawned> {
    (1..=n)
        .map(|i| {
            let db = dir.join(format!("n{i}.db"));
            let mut args = vec![
                "node",
                "--listen",
                "127.0.0.1:0",
                "--db",
                db.to_str().unwrap(),
            ];
            args.extend_from_slice(extra);
            Spawned::start(&args)
        })
        .collect()
}

/// A member's state in the proxy's topology (`active`, `joining`, `leaving`), or `None` if
/// the topology does not hold it.
pub async fn member_state(client: &Client, id: &str) -> Option<String> {
    let (status, topology) = client.get("/v1/cluster").await;
    assert_eq!(status, StatusCode::OK, "{topology}");
    topology["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == id)
        .map(|n| n["state"].as_str().unwrap().to_owned())
}

/// Applies the sample migrations (`migrations/`) through the proxy `client` talks to,
/// asserting that every node took them.
pub async fn migrate_sample(client: &Client) {
    let set = shardlite::migrate::read_dir(&sample_migrations()).unwrap();
    let (status, body) = client
        .post("/v1/cluster/migrations", json!({ "migrations": set }))
        .await;
    assert_eq!(status, StatusCode::OK, "sample migrations: {body}");
}

/// A `shardlite proxy` process on `dir/proxy.db`, listening on a free port, over `nodes`
/// named n1, n2, ... in order (seeds only count while the state file is new).
pub fn spawn_proxy(dir: &Path, nodes: &[Spawned]) -> Spawned {
    spawn_proxy_with(&dir.join("proxy.db"), nodes, &[])
}

/// [`spawn_proxy`] on the state file `state`, with `extra` flags.
pub fn spawn_proxy_with(state: &Path, nodes: &[Spawned], extra: &[&str]) -> Spawned {
    let state = state.display().to_string();
    let seeds: Vec<String> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| format!("n{}={}", i + 1, n.url))
        .collect();
    let mut args = vec!["proxy", "--listen", "127.0.0.1:0", "--state", &state];
    for seed in &seeds {
        args.extend(["--node", seed]);
    }
    args.extend_from_slice(extra);
    Spawned::start(&args)
}

/// `GET /v1/cluster/verify`, asserting that every row is on its owner and no key is on two
/// nodes; the report, for more checks.
pub async fn assert_verified(client: &Client) -> Value {
    let (status, report) = client.get("/v1/cluster/verify").await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(
        (&report["misplaced"], &report["duplicates"]),
        (&json!(0), &json!(0)),
        "{report}"
    );
    report
}

/// Upserts `n` users `{prefix}-{i}` (name = id) in batches; returns their keys.
pub async fn preload_users(client: &Client, prefix: &str, n: usize) -> Vec<String> {
    let keys: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    for chunk in keys.chunks(2000) {
        let rows: Vec<Value> = chunk
            .iter()
            .map(|k| json!({ "id": k, "name": k }))
            .collect();
        let (status, body) = client
            .post("/v1/tables/users/rows", json!({ "rows": rows }))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    keys
}

/// A node process of a [`SpawnedCluster`] and its id.
pub struct SpawnedNode {
    pub id: String,
    pub process: Spawned,
}

/// A cluster of real processes, for tests that kill and restart them: nodes n1..nN on files
/// in `dir`, and a proxy seeded with them whose rebalance steps each pause a while (so a kill
/// can land inside one) and which counts a node down after a 300 ms connect.
pub struct SpawnedCluster {
    pub dir: TempDir,
    pub nodes: Vec<SpawnedNode>,
    pub proxy: Spawned,
    proxy_args: Vec<String>,
    pub client: Client,
}

impl SpawnedCluster {
    /// `n` nodes, the proxy with `--test-rebalance-pause-ms step_pause_ms`, the sample
    /// migrations, and `rows` users `still-{i}`.
    pub async fn start(n: usize, step_pause_ms: u64, rows: usize) -> SpawnedCluster {
        let dir = tempfile::tempdir().unwrap();
        let nodes: Vec<SpawnedNode> = (1..=n)
            .map(|i| {
                let id = format!("n{i}");
                let process = node_process(dir.path(), &id, 0);
                SpawnedNode { id, process }
            })
            .collect();
        let mut proxy_args: Vec<String> = vec![
            "proxy".into(),
            "--state".into(),
            dir.path().join("proxy.db").display().to_string(),
            "--test-rebalance-pause-ms".into(),
            step_pause_ms.to_string(),
            "--connect-timeout-ms".into(),
            "300".into(),
        ];
        for node in &nodes {
            proxy_args.push("--node".into());
            proxy_args.push(format!("{}={}", node.id, node.process.url));
        }
        let mut first = proxy_args.clone();
        first.extend(["--listen".into(), "127.0.0.1:0".into()]);
        let proxy = Spawned::start(&first.iter().map(String::as_str).collect::<Vec<_>>());
        let client = Client::new(&proxy.url);
        migrate_sample(&client).await;
        preload_users(&client, "still", rows).await;
        SpawnedCluster {
            dir,
            nodes,
            proxy,
            proxy_args,
            client,
        }
    }

    /// Starts the proxy again on its port, with the same flags (after a kill).
    pub fn restart_proxy(&mut self) {
        let mut args = self.proxy_args.clone();
        args.extend([
            "--listen".into(),
            format!("127.0.0.1:{}", self.proxy.port()),
        ]);
        self.proxy = Spawned::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    }

    /// A node process on `dir/{id}.db`, on `port` (0: any free one).
    pub fn node(&self, id: &str, port: u16) -> Spawned {
        node_process(self.dir.path(), id, port)
    }

    /// Starts node `i` of `nodes` again on its port and file (after a kill).
    pub fn restart_node(&mut self, i: usize) {
        let port = self.nodes[i].process.port();
        self.nodes[i].process = self.node(&self.nodes[i].id, port);
    }

    /// Where node `id` keeps its file.
    pub fn db(&self, id: &str) -> PathBuf {
        self.dir.path().join(format!("{id}.db"))
    }
}

fn node_process(dir: &Path, id: &str, port: u16) -> Spawned {
    let db = dir.join(format!("{id}.db"));
    let listen = format!("127.0.0.1:{port}");
    Spawned::start(&["node", "--listen", &listen, "--db", db.to_str().unwrap()])
}
