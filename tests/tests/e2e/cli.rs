//! The `shardlite` binary against a real proxy process.

use serde_json::{Value, json};
use shardlite_tests::{
    Client, Spawned, preload_users, sample_migrations, shardlite_bin, spawn_nodes, spawn_proxy,
};
use std::process::Command;

fn shardlite(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(shardlite_bin())
        .args(args)
        .env_remove("SHARDLITE_PROXY")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the command, asserts exit 0, and reads its `--json` output.
fn shardlite_json(args: &[&str]) -> Value {
    let (code, out, err) = shardlite(args);
    assert_eq!(code, 0, "shardlite {args:?}: {out}{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("shardlite {args:?}: {e}: {out}"))
}

#[test]
fn status_verify_and_migrate_work_against_a_proxy_process() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = spawn_nodes(dir.path(), 2, &[]);
    let proxy = spawn_proxy(dir.path(), &nodes);
    let url = proxy.url.as_str();
    let migrations = sample_migrations();

    let (code, out, err) = shardlite(&[
        "migrate",
        "--dir",
        migrations.to_str().unwrap(),
        "--proxy",
        url,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("every node is at version 2"), "{out}");

    let (code, out, err) = shardlite(&["migrate", "--status", "--proxy", url, "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["version"], 2);
    assert_eq!(
        status["nodes"]["n1"]["applied"].as_array().unwrap().len(),
        2
    );

    let (code, out, err) = shardlite(&["status", "--proxy", url]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("n1") && out.contains("n2") && out.contains("active"),
        "{out}"
    );

    let (code, out, err) = shardlite(&["verify", "--proxy", url, "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["misplaced"], 0);

    // One row: said in the singular.
    let client = Client::new(url);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (status, body) =
        runtime.block_on(client.put("/v1/tables/users/rows/u1", serde_json::json!({})));
    assert_eq!(status, 200, "{body}");
    let (code, out, err) = shardlite(&["verify", "--proxy", url]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("1 row, 0 misplaced, 0 duplicated keys: every row lives on exactly its owner"),
        "{out}"
    );

    // A proxy that is not there: one line that says what to do, and a non-zero exit.
    let (code, out, err) = shardlite(&["status", "--proxy", "http://127.0.0.1:1"]);
    assert_ne!(code, 0, "{out}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot reach the proxy")
            && err.contains("--proxy")
            && !err.contains("node proxy"),
        "{err}"
    );
}

/// The membership and rebalance commands as the contract names them: `nodes add/list/remove`,
/// `rebalance --dry-run` (an exact plan that moves nothing), `rebalance --no-wait`, a waiting
/// `rebalance`, and `verify`, which exits 1 when a row is not on its owner.
#[test]
fn nodes_rebalance_and_verify_commands_drive_a_membership_change() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = spawn_nodes(dir.path(), 3, &[]);
    let proxy = spawn_proxy(dir.path(), &nodes);
    let url = proxy.url.as_str();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = Client::new(url);
    let (code, out, err) = shardlite(&[
        "migrate",
        "--dir",
        sample_migrations().to_str().unwrap(),
        "--proxy",
        url,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    runtime.block_on(preload_users(&client, "cli", 3000));
    let rows_of = |node_url: &str| -> u64 {
        runtime.block_on(async {
            let (_, stats) = Client::new(node_url).get("/v1/stats").await;
            stats["rows"].as_u64().unwrap()
        })
    };

    // Nothing joining or leaving: the plan says so in words, not as an empty table.
    let (code, out, err) = shardlite(&["rebalance", "--dry-run", "--proxy", url]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("nothing would move") && !out.contains("FROM"),
        "{out}"
    );

    let n4_db = dir.path().join("n4.db");
    let n4 = Spawned::start(&[
        "node",
        "--listen",
        "127.0.0.1:0",
        "--db",
        n4_db.to_str().unwrap(),
    ]);
    let (code, out, err) = shardlite(&["nodes", "add", "n4", &n4.url, "--proxy", url]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("owns nothing until"), "{out}");
    let listed = shardlite_json(&["nodes", "list", "--proxy", url, "--json"]);
    let n4_state = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == "n4")
        .map(|n| n["state"].clone());
    assert_eq!(n4_state, Some("joining".into()), "{listed}");

    // The plan: counted, everything to n4, and nothing moved by asking.
    let plan = shardlite_json(&["rebalance", "--dry-run", "--proxy", url, "--json"]);
    assert_eq!(plan["rows_total"], 3000, "{plan}");
    let to_move = plan["rows_to_move"].as_u64().unwrap();
    assert!(to_move > 300 && to_move < 1500, "{plan}");
    for m in plan["moves"].as_array().unwrap() {
        assert_eq!(m["to"], "n4", "{plan}");
    }
    assert_eq!(rows_of(&n4.url), 0, "a dry run moved rows");
    let (code, out, err) = shardlite(&["rebalance", "--dry-run", "--proxy", url]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with("FROM") && out.contains("would move; joining: n4"),
        "{out}"
    );

    // Started without waiting; a plain `rebalance` then waits for the job that runs (or, if it
    // already ended, finds nothing left to move).
    let started = shardlite_json(&["rebalance", "--no-wait", "--proxy", url, "--json"]);
    assert!(
        started["state"] == "running" || started["state"] == "done",
        "{started}"
    );
    let (code, out, err) = shardlite(&["rebalance", "--proxy", url]);
    assert_eq!(code, 0, "{out}{err}");
    let job = runtime.block_on(client.get("/v1/cluster/rebalance")).1;
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(
        rows_of(&n4.url),
        to_move,
        "n4 holds exactly the planned rows"
    );
    // Nothing wrote during the job: the clean-up deleted exactly the moved rows' old copies.
    assert_eq!(job["rows_cleaned"], to_move, "{job}");
    let report = shardlite_json(&["verify", "--proxy", url, "--json"]);
    assert_eq!(
        (report["misplaced"].as_u64(), report["duplicates"].as_u64()),
        (Some(0), Some(0))
    );

    // Leaving: the rows go back, then n4 leaves the topology.
    let (code, out, err) = shardlite(&["nodes", "remove", "n4", "--proxy", url]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("is leaving"), "{out}");
    let (code, out, err) = shardlite(&["rebalance", "--proxy", url]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!(
            "rebalance done: {to_move} rows moved, {to_move} old copies deleted"
        )),
        "{out}"
    );
    let listed = shardlite_json(&["nodes", "list", "--proxy", url, "--json"]);
    assert!(
        listed.as_array().unwrap().iter().all(|n| n["id"] != "n4"),
        "{listed}"
    );
    assert_eq!(rows_of(&n4.url), 0, "the leaving node was drained");

    // A heavier n1: pending until the rebalance, which moves rows only to it.
    let (code, out, err) = shardlite(&["nodes", "set-weight", "n1", "2", "--proxy", url]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("node n1 goes from weight 1 to 2 at the next `shardlite rebalance`"),
        "{out}"
    );
    let (code, out, err) = shardlite(&["nodes", "list", "--proxy", url]);
    assert_eq!(code, 0, "{out}{err}");
    let n1_line = out
        .lines()
        .find(|l| l.starts_with("n1 "))
        .unwrap_or_default();
    assert!(n1_line.contains("1 -> 2"), "{out}");
    let (code, out, err) = shardlite(&["rebalance", "--dry-run", "--proxy", url]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("would move; weights: n1 1 -> 2"), "{out}");
    assert!(out.contains("ring shares: n1 "), "{out}");
    let plan = shardlite_json(&["rebalance", "--dry-run", "--proxy", url, "--json"]);
    for m in plan["moves"].as_array().unwrap() {
        assert_eq!(m["to"], "n1", "{plan}");
    }
    // n1 goes from a third of the ring to about a half; the others only shrink.
    let share = |id: &str, when: &str| plan["shares"][id][when].as_f64().unwrap();
    assert!((0.25..0.42).contains(&share("n1", "now")), "{plan}");
    assert!((0.42..0.6).contains(&share("n1", "after")), "{plan}");
    for id in ["n2", "n3"] {
        assert!(share(id, "after") < share(id, "now"), "{plan}");
    }
    let n1_before = rows_of(&nodes[0].url);
    let (code, out, err) = shardlite(&["rebalance", "--proxy", url]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        rows_of(&nodes[0].url),
        n1_before + plan["rows_to_move"].as_u64().unwrap(),
        "n1 gained the planned rows"
    );
    let listed = shardlite_json(&["nodes", "list", "--proxy", url, "--json"]);
    let n1 = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == "n1")
        .unwrap();
    assert_eq!(
        (&n1["weight"], n1.get("next_weight")),
        (&json!(2), None),
        "{listed}"
    );
    let (code, out, err) = shardlite(&["nodes", "set-weight", "n1", "2", "--proxy", url]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("node n1 has weight 2; no change is pending"),
        "{out}"
    );

    // A row copied behind the proxy's back onto a node that does not own it: verify says so
    // and exits 1.
    let owner_url = runtime.block_on(async {
        let (_, cluster) = client.get("/v1/cluster").await;
        let owner = shardlite_tests::ring_of(&cluster)
            .lookup("cli-0")
            .unwrap()
            .to_string();
        cluster["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == owner.as_str())
            .map(|n| n["url"].as_str().unwrap().to_owned())
            .unwrap()
    });
    let stray = nodes.iter().position(|n| n.url != owner_url).unwrap();
    let file = rusqlite::Connection::open(dir.path().join(format!("n{}.db", stray + 1))).unwrap();
    file.busy_timeout(std::time::Duration::from_secs(5))
        .unwrap();
    file.execute("INSERT INTO users (id, name) VALUES ('cli-0', 'stray')", [])
        .unwrap();
    let (code, out, err) = shardlite(&["verify", "--proxy", url, "--json"]);
    assert_eq!(code, 1, "{out}{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["misplaced"], 1, "{report}");
    assert_eq!(report["duplicates"], 1, "{report}");
    // It names the row and its owner, and says that a rebalance will not move it.
    let stray_id = format!("n{}", stray + 1);
    let owner_id = nodes
        .iter()
        .position(|n| n.url == owner_url)
        .map(|i| format!("n{}", i + 1))
        .unwrap();
    assert_eq!(
        report["nodes"][&stray_id]["examples"],
        json!([{ "table": "users", "key": "cli-0", "owner": owner_id }]),
        "{report}"
    );
    let hint = report["hint"].as_str().unwrap();
    assert!(hint.contains("no rebalance moves them"), "{hint}");
    let (code, out, err) = shardlite(&["verify", "--proxy", url]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains(&format!(
            "misplaced: users \"cli-0\" on {stray_id} (its owner is {owner_id})"
        )) && out.contains("no rebalance moves them"),
        "{out}"
    );
}

/// A port `p` such that `p`, `p + 1`, ..., `p + n` are free now (`dev` puts node i on `p + i`).
fn free_port_run(n: u16) -> u16 {
    loop {
        let first = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = first.local_addr().unwrap().port();
        if port.checked_add(n).is_none() {
            continue;
        }
        let rest: Result<Vec<_>, _> = (1..=n)
            .map(|i| std::net::TcpListener::bind(("127.0.0.1", port + i)))
            .collect();
        if rest.is_ok() {
            return port;
        }
    }
}

/// A `shardlite dev` process, killed when dropped (also when an assertion fails).
struct Dev(std::process::Child);

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `shardlite dev --nodes N --data DIR --migrations DIR --listen ADDR` until it has printed
/// its "Ctrl-C" line; the lines it printed.
fn start_dev(
    nodes: u16,
    data: &std::path::Path,
    migrations: &std::path::Path,
    listen: &str,
) -> (Dev, String) {
    let nodes = nodes.to_string();
    let args = [
        "--nodes",
        &nodes,
        "--data",
        data.to_str().unwrap(),
        "--migrations",
        migrations.to_str().unwrap(),
        "--listen",
        listen,
    ];
    use std::io::BufRead;
    let mut child = shardlite_tests::tied::spawn_tied(shardlite_bin(), |command| {
        command
            .arg("dev")
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped());
    })
    .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        printed.push_str(&line);
        printed.push('\n');
        if line.starts_with("Ctrl-C stops the cluster") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    (Dev(child), printed)
}

/// Asserts that the cluster behind `client` serves the row `users/alice` as written.
fn has_alice(runtime: &tokio::runtime::Runtime, client: &Client) {
    let (status, row) = runtime.block_on(client.get(&Client::row_path("users", "alice")));
    assert_eq!(
        (status.as_u16(), &row["name"]),
        (200, &Value::from("Alice")),
        "{row}"
    );
}

/// `shardlite dev`: a whole cluster in one process with the migrations applied, its URLs and
/// curl lines printed, and the data kept across a restart.
#[test]
fn dev_serves_a_migrated_cluster_and_keeps_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port_run(2);
    let listen = format!("127.0.0.1:{port}");
    let data = dir.path().join("data");
    let migrations = sample_migrations();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = Client::new(format!("http://{listen}"));

    let (dev, printed) = start_dev(2, &data, &migrations, &listen);
    assert!(printed.contains("every node at version 2"), "{printed}");
    assert!(
        printed.contains(&format!("proxy  http://{listen}")),
        "{printed}"
    );
    for i in 1..=2 {
        let node = format!("n{i}  http://127.0.0.1:{}", port + i);
        assert!(printed.contains(&node), "{node} in {printed}");
    }
    assert!(
        printed.contains(&format!("curl {listen}/v1/tables/users/rows/alice")),
        "{printed}"
    );
    let (status, body) = runtime.block_on(client.put(
        &Client::row_path("users", "alice"),
        serde_json::json!({ "name": "Alice" }),
    ));
    assert_eq!(status, 200, "{body}");
    // A rebalance (nothing to move) runs through its switch at once: the switch waits until no
    // one holds the old topology, and `dev` itself once held it for its whole life (60 s).
    let started = std::time::Instant::now();
    let (status, body) = runtime.block_on(client.post("/v1/cluster/rebalance", Value::Null));
    assert_eq!(status, 202, "{body}");
    loop {
        let (_, job) = runtime.block_on(client.get("/v1/cluster/rebalance"));
        if job["state"] != "running" {
            assert_eq!(job["state"], "done", "{job}");
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "the rebalance hangs: {job}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    drop(dev);

    // Again on the same data: the row and the schema are still there.
    let (dev, printed) = start_dev(2, &data, &migrations, &listen);
    assert!(printed.contains("every node at version 2"), "{printed}");
    has_alice(&runtime, &client);
    drop(dev);

    // And on other ports: the state file knew the nodes at the old ones; they moved with it.
    let port = free_port_run(2);
    let listen = format!("127.0.0.1:{port}");
    let (dev, printed) = start_dev(2, &data, &migrations, &listen);
    assert!(
        printed.contains(&format!("-> http://127.0.0.1:{}", port + 1)),
        "{printed}"
    );
    let client = Client::new(format!("http://{listen}"));
    has_alice(&runtime, &client);
    drop(dev);

    // With fewer --nodes than the cluster has, the banner says which member it did not start.
    let (_dev, printed) = start_dev(1, &data, &migrations, &listen);
    let n2 = printed
        .lines()
        .find(|l| l.starts_with("node   n2"))
        .unwrap_or_else(|| panic!("{printed}"));
    assert!(n2.contains("not started by dev"), "{printed}");
    let n1 = printed
        .lines()
        .find(|l| l.starts_with("node   n1"))
        .unwrap();
    assert!(!n1.contains("not started"), "{printed}");
}

/// `shardlite dev` where there is no migrations directory: the cluster has no tables, so the
/// lines it prints to try start by making one, and doing what they say works.
#[test]
fn dev_without_a_schema_prints_how_to_make_one_and_that_works() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port_run(1);
    let listen = format!("127.0.0.1:{port}");
    let data = dir.path().join("data");
    let missing = dir.path().join("migrations");
    let (_dev, printed) = start_dev(1, &data, &missing, &listen);
    assert!(
        printed.contains("no migrations applied at start"),
        "{printed}"
    );
    assert!(!printed.contains("tables/users"), "{printed}");
    let tried: Vec<&str> = printed
        .lines()
        .skip_while(|l| *l != "try:")
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();

    // Follow the lines in `dir`: the schema file, then the migration, then the row.
    let echo = tried
        .iter()
        .find(|l| l.starts_with("echo '"))
        .expect(&printed);
    let (sql, file) = echo["echo '".len()..].split_once("' > ").unwrap();
    std::fs::create_dir_all(dir.path().join("migrations")).unwrap();
    std::fs::write(dir.path().join(file), sql).unwrap();
    let migrate = tried
        .iter()
        .find(|l| l.starts_with("shardlite migrate"))
        .expect(&printed);
    let output = Command::new(shardlite_bin())
        .args(migrate.split_whitespace().skip(1))
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{migrate}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let put = tried
        .iter()
        .find(|l| l.starts_with("curl -X PUT"))
        .expect(&printed);
    let path = put.split_whitespace().nth(3).unwrap();
    let path = path.strip_prefix(listen.as_str()).expect(put);
    let body: Value =
        serde_json::from_str(put.split_once("-d '").unwrap().1.trim_end_matches('\'')).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = Client::new(format!("http://{listen}"));
    let (status, answer) = runtime.block_on(client.put(path, body.clone()));
    assert_eq!(status, 200, "{put}: {answer}");
    let (status, row) = runtime.block_on(client.get(path));
    assert_eq!(status, 200, "{row}");
    assert_eq!(row["v"], body["v"], "{row}");
}

#[test]
fn a_proxy_restarted_with_other_node_flags_keeps_its_members_and_says_so() {
    use std::io::{BufRead, Read};
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let nodes = spawn_nodes(dir.path(), 1, &[]);
    // A new state file: the seed n1 becomes the one member.
    drop(spawn_proxy(dir.path(), &nodes));

    // The same state file with n1 as it is and a new n2: n2 is not added, and the log says so.
    let state = dir.path().join("proxy.db");
    let n1 = format!("n1={}", nodes[0].url);
    let mut proxy = shardlite_tests::tied::spawn_tied(shardlite_bin(), |command| {
        command
            .args(["proxy", "--listen", "127.0.0.1:0", "--state"])
            .arg(&state)
            .args(["--node", &n1, "--node", "n2=http://127.0.0.1:9"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
    })
    .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(proxy.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let url = first
        .split("listening on ")
        .nth(1)
        .unwrap_or_else(|| panic!("no address in {first:?}"))
        .trim()
        .to_owned();
    let listed = shardlite_json(&["nodes", "list", "--proxy", &url, "--json"]);
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["n1"], "{listed}");

    // The warning is logged before the address is printed, so it is in the log by now.
    proxy.kill().unwrap();
    proxy.wait().unwrap();
    let mut log = String::new();
    proxy
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(
        log.contains("--node flags count only when the state file is new")
            && log.contains("ignored=n2=http://127.0.0.1:9"),
        "{log}"
    );
    assert!(
        !log.contains(&format!("ignored={n1}")),
        "n1 is held as given: {log}"
    );
}

/// The tokio worker threads of process `pid` (tokio names them `tokio-rt-worker`).
fn runtime_workers(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter(|task| {
            let comm = task.as_ref().unwrap().path().join("comm");
            std::fs::read_to_string(comm).is_ok_and(|name| name.trim() == "tokio-rt-worker")
        })
        .count()
}

/// `--threads 1` runs the proxy on a current-thread runtime, more threads on a multi-threaded
/// one (the default depends on the machine's cores): both serve rows, batches and SQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_serves_on_one_thread_and_on_several() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = spawn_nodes(dir.path(), 2, &[]);
    for (threads, workers) in [("1", 0), ("3", 3)] {
        let state = dir.path().join(format!("proxy-{threads}.db"));
        let proxy = shardlite_tests::spawn_proxy_with(&state, &nodes, &["--threads", threads]);
        // The runtime really is the one asked for: a current-thread runtime runs on the main
        // thread, a multi-threaded one on its named workers.
        assert_eq!(
            runtime_workers(proxy.child.id()),
            workers,
            "--threads {threads}"
        );
        let client = Client::new(&proxy.url);
        shardlite_tests::migrate_sample(&client).await;
        let rows: Vec<Value> = (0..50)
            .map(|i| json!({ "id": format!("t{threads}-{i}"), "name": threads }))
            .collect();
        let (status, body) = client
            .post("/v1/tables/users/rows", json!({ "rows": rows }))
            .await;
        assert_eq!(status, 200, "{body}");
        let key = format!("/v1/tables/users/rows/t{threads}-7");
        let (status, body) = client.put(&key, json!({ "age": 7 })).await;
        assert_eq!(status, 200, "{body}");
        let (status, body) = client.get(&key).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            (&body["name"], &body["age"]),
            (&json!(threads), &json!(7)),
            "{body}"
        );
        let (status, body) = client
            .post(
                "/v1/sql",
                json!({ "sql": "SELECT count(*) FROM users WHERE name = ?", "params": [threads] }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(shardlite_tests::summed_counts(&body), 50, "{body}");
    }
}
