//! Graceful shutdown of real `shardlite` processes: SIGTERM lets the requests in flight finish,
//! the process exits 0, and a node closes its SQLite file cleanly.

use http::StatusCode;
use serde_json::{Value, json};
use shardlite_tests::{Client, Spawned, migrate_sample, sample_migrations};
use std::path::Path;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

/// How long a slow request should keep a server busy: long enough to be surely in flight when
/// the signal lands, well inside the node's 5 s statement limit.
const SLOW: Duration = Duration::from_millis(600);

/// `kill -TERM <pid>`.
fn sigterm(child: &std::process::Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("the kill command runs");
    assert!(status.success(), "kill -TERM {} failed", child.id());
}

/// Waits (bounded) for the process to exit; its exit status.
async fn wait_for_exit(server: &mut Spawned, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = server
            .child
            .try_wait()
            .expect("the child can be waited for")
        {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the process did not exit within {limit:?} of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (bounded) until a connection holds the write lock of the SQLite file `db`: a keyed
/// request is then running on the node's writer, inside its `BEGIN IMMEDIATE`. Our probe
/// connection is closed on return, so it cannot be the one that keeps the `-wal` file alive.
async fn wait_for_write_in_flight(db: &Path) {
    let probe = rusqlite::Connection::open(db).unwrap();
    probe.busy_timeout(Duration::ZERO).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match probe.execute_batch("BEGIN IMMEDIATE") {
            Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) => return,
            Err(e) => panic!("probing the write lock of {}: {e}", db.display()),
            Ok(()) => probe.execute_batch("ROLLBACK").unwrap(),
        }
        assert!(
            Instant::now() < deadline,
            "the slow request never reached the node's writer"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A recursive CTE that counts to `n`: one statement that keeps SQLite busy.
fn counting(n: u64) -> String {
    format!(
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {n}) \
         SELECT count(*) FROM c"
    )
}

/// How far the CTE must count to take about [`SLOW`] through `call`: measured, since the
/// bundled SQLite runs at very different speeds in debug and release builds. The faster of two
/// runs counts, so a busy moment during calibration does not make the slow request too short
/// to still be in flight when the signal lands.
async fn calibrate(mut call: impl AsyncFnMut(String) -> (StatusCode, Value)) -> u64 {
    let n = 200_000;
    let mut fastest = Duration::MAX;
    for _ in 0..2 {
        let started = Instant::now();
        let (status, body) = call(counting(n)).await;
        assert_eq!(status, StatusCode::OK, "calibration: {body}");
        fastest = fastest.min(started.elapsed());
    }
    let per_row = fastest.as_secs_f64() / n as f64;
    ((SLOW.as_secs_f64() / per_row) as u64).clamp(n, 200_000_000)
}

fn start_node(db: &Path) -> Spawned {
    Spawned::start(&[
        "node",
        "--listen",
        "127.0.0.1:0",
        "--db",
        db.to_str().unwrap(),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_proxy_finish_a_request_in_flight_then_exit() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("n1.db");
    let node = start_node(&db);
    let mut proxy = Spawned::start(&[
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--state",
        dir.path().join("proxy.db").to_str().unwrap(),
        "--node",
        &format!("n1={}", node.url),
    ]);
    let client = Client::new(&proxy.url);
    migrate_sample(&client).await;
    let n = calibrate(async |sql| {
        client
            .post("/v1/sql", json!({ "key": "slow", "sql": sql }))
            .await
    })
    .await;

    let slow = {
        let client = client.clone();
        tokio::spawn(async move {
            let answer = client
                .post("/v1/sql", json!({ "key": "slow", "sql": counting(n) }))
                .await;
            (answer, Instant::now())
        })
    };
    wait_for_write_in_flight(&db).await;
    let signalled = Instant::now();
    sigterm(&proxy.child);
    let ((status, body), finished) = slow.await.unwrap();
    assert_eq!(status, StatusCode::OK, "the request in flight: {body}");
    assert_eq!(body["results"][0]["rows"][0][0], json!(n), "{body}");
    assert!(
        finished > signalled,
        "the slow request ended before the signal: it was not in flight"
    );
    let exit = wait_for_exit(&mut proxy, Duration::from_secs(10)).await;
    assert!(exit.success(), "the proxy exited with {exit}");
    eprintln!(
        "proxy: counting to {n} finished {:?} after SIGTERM; exit {exit} {:?} after it",
        finished - signalled,
        signalled.elapsed()
    );
    let address = proxy.url.trim_start_matches("http://").to_owned();
    let refused = tokio::net::TcpStream::connect(&address).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused),
        "a connection to {address} after the exit: {refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_node_finish_a_write_in_flight_and_close_sqlite_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("n1.db");
    let mut node = start_node(&db);
    let client = Client::new(&node.url);
    let set = shardlite::migrate::read_dir(&sample_migrations()).unwrap();
    let (status, body) = client
        .post("/v1/migrations", json!({ "migrations": set }))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let n = calibrate(async |sql| client.post("/v1/sql", json!({ "sql": sql })).await).await;

    // One statement that writes, slowly: the row's name is the count.
    let write = format!(
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {n}) \
         INSERT INTO users (id, name) SELECT 'slow', count(*) FROM c"
    );
    let slow = {
        let client = client.clone();
        tokio::spawn(async move {
            let answer = client
                .post("/v1/sql", json!({ "key": "slow", "sql": write }))
                .await;
            (answer, Instant::now())
        })
    };
    wait_for_write_in_flight(&db).await;
    let signalled = Instant::now();
    sigterm(&node.child);
    let ((status, body), finished) = slow.await.unwrap();
    assert_eq!(status, StatusCode::OK, "the write in flight: {body}");
    assert_eq!(body["results"][0]["rows_affected"], json!(1), "{body}");
    assert!(
        finished > signalled,
        "the slow write ended before the signal: it was not in flight"
    );
    let exit = wait_for_exit(&mut node, Duration::from_secs(10)).await;
    assert!(exit.success(), "the node exited with {exit}");

    // The last connection to close checkpoints the WAL into the file and deletes it.
    let wal = dir.path().join("n1.db-wal");
    let shm = dir.path().join("n1.db-shm");
    eprintln!(
        "node: write finished {:?} after SIGTERM; exit {exit}; -wal exists: {}, -shm exists: {}",
        finished - signalled,
        wal.exists(),
        shm.exists()
    );
    assert!(
        !wal.exists(),
        "{} is still there: the node exited without closing SQLite",
        wal.display()
    );
    let conn = rusqlite::Connection::open(&db).unwrap();
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let name: String = conn
        .query_row("SELECT name FROM users WHERE id = 'slow'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(name, n.to_string(), "the acknowledged write is in the file");
}
