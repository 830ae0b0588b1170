//! Guarantees 2 and 4 under faults at moments no one chose: rounds of adding, removing and
//! reweighting nodes while writers run, each job hit at a random moment by `kill -9` of the
//! proxy or of a node (sometimes both), or by a node's pause (SIGSTOP), for a random time, and
//! sometimes by a cancel too. Some rounds first run a migration that makes a table (now and
//! then with the proxy killed while it applies it) and write rows to it, which later jobs move
//! too. The phased fault tests (`rebalance_faults.rs`) each stop one chosen step; this one
//! lands between steps too, and on clusters that earlier jobs, kills and cancels have left
//! behind.
//!
//! Every round must end with the job done (a cancelled one is started again), `verify` clean,
//! every weight change taken, no capture, change log or fence left on any node, and a node that
//! left holding no row; at the end the writers' history must check out. The run is seeded: the
//! seed and every action are printed, and `SHARDLITE_CHAOS_SEED=N` replays the same actions
//! (not the same timing). `SHARDLITE_CHAOS_ROUNDS=N` runs more rounds than CI's few.

use serde_json::{Value, json};
use shardlite_tests::history::{self, Rng, Writers};
use shardlite_tests::{
    Spawned, SpawnedCluster, SpawnedNode, assert_verified, keys_in_file, member_state,
    rebalance_and_wait, sample_migrations, transfer_leftovers, wait_for_rebalance,
};
use std::time::Duration;

const ROWS: usize = 6_000;
/// Rounds when `SHARDLITE_CHAOS_ROUNDS` is not set: enough to add, remove and fault a few
/// times within CI's time.
const DEFAULT_ROUNDS: u64 = 4;
/// Each copy page and phase pauses this long, so that a job lasts long enough (about a
/// second) for a random moment to land inside it.
const STEP_PAUSE_MS: u64 = 40;

struct Chaos {
    cluster: SpawnedCluster,
    rng: Rng,
    /// The next node id's number.
    next_id: usize,
    /// The shortest job so far, from its start to its end: faults land within this much of
    /// a job's start, so that most of them hit it while it runs.
    shortest_job: Duration,
    /// Every migration applied so far: the sample's, then a table per chaos migration.
    migrations: Vec<Value>,
    /// The tables the chaos migrations made, and the rows written to each.
    tables: Vec<(String, u64)>,
}

/// Sends `kill -SIG` to a node or proxy process.
fn signal(process: &Spawned, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &process.child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{sig}");
}

/// What hits a job.
#[derive(Debug, Clone, Copy)]
enum Fault {
    Nothing,
    Proxy,
    /// A node of the topology, by index.
    Node(usize),
    /// The proxy and a node at once.
    Both(usize),
    /// A node stopped (SIGSTOP) and continued: alive, but answering nothing meanwhile, as in
    /// a long pause of its machine.
    Pause(usize),
}

impl Chaos {
    async fn start(seed: u64) -> Chaos {
        Chaos {
            cluster: SpawnedCluster::start(3, STEP_PAUSE_MS, ROWS).await,
            rng: Rng::new(seed),
            next_id: 4,
            shortest_job: Duration::from_millis(600),
            migrations: serde_json::to_value(
                shardlite::migrate::read_dir(&sample_migrations()).unwrap(),
            )
            .unwrap()
            .as_array()
            .unwrap()
            .clone(),
            tables: Vec::new(),
        }
    }

    /// The active nodes and their weights.
    async fn active(&self) -> Vec<(String, u64)> {
        let (status, topology) = self.cluster.client.get("/v1/cluster").await;
        assert_eq!(status, 200, "{topology}");
        topology["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["state"] == "active")
            .map(|n| {
                (
                    n["id"].as_str().unwrap().to_owned(),
                    n["weight"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    /// Adds a node on a fresh file (weight 1 to 3), gives an active one another weight of 1 to
    /// 3, or marks an active one leaving (never below two active). Returns the node that
    /// leaves, if one does.
    async fn change(&mut self) -> Option<String> {
        let active = self.active().await;
        let roll = self.rng.below(3);
        if active.len() <= 2 || (roll == 0 && active.len() < 5) {
            let id = format!("n{}", self.next_id);
            self.next_id += 1;
            let process = self.cluster.node(&id, 0);
            let weight = 1 + self.rng.below(3);
            eprintln!("chaos: add {id}, weight {weight}");
            let ask = json!({ "id": id, "url": process.url, "weight": weight });
            if self.rng.below(4) == 0 {
                // The proxy dies while it adds the node (asking it, migrating it, recording
                // it); asked again, the add is either done or does it all again.
                self.kill_the_proxy_during("/v1/cluster/nodes", &ask, 40)
                    .await;
            }
            let (status, body) = self.cluster.client.post("/v1/cluster/nodes", ask).await;
            let recorded_before = status == 409
                && body["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("already exists"));
            assert!(
                status == 201 || recorded_before,
                "adding {id}: {status} {body}"
            );
            assert_eq!(
                member_state(&self.cluster.client, &id).await.as_deref(),
                Some("joining")
            );
            self.cluster.nodes.push(SpawnedNode { id, process });
            None
        } else if roll == 1 {
            let (id, weight) = &active[self.rng.below(active.len() as u64) as usize];
            // One of the two other weights of 1 to 3.
            let next = 1 + (weight + self.rng.below(2)) % 3;
            eprintln!("chaos: reweight {id} from {weight} to {next}");
            let (status, body) = self
                .cluster
                .client
                .patch(
                    &format!("/v1/cluster/nodes/{id}"),
                    json!({ "weight": next }),
                )
                .await;
            assert_eq!(status, 200, "reweighting {id}: {body}");
            assert_eq!(body["next_weight"], next, "{body}");
            None
        } else {
            let id = active[self.rng.below(active.len() as u64) as usize]
                .0
                .clone();
            eprintln!("chaos: remove {id}");
            let (status, body) = self
                .cluster
                .client
                .delete(&format!("/v1/cluster/nodes/{id}"))
                .await;
            assert_eq!(status, 202, "removing {id}: {body}");
            Some(id)
        }
    }

    fn pick_fault(&mut self) -> Fault {
        let node = self.rng.below(self.cluster.nodes.len() as u64) as usize;
        match self.rng.below(10) {
            0 => Fault::Nothing,
            1..=3 => Fault::Proxy,
            4..=6 => Fault::Node(node),
            7 => Fault::Both(node),
            _ => Fault::Pause(node),
        }
    }

    /// One round: a change, a job, a fault at a random moment (and perhaps a cancel), and the
    /// checks once the job is done.
    async fn round(&mut self, round: u64) {
        if self.rng.below(4) == 0 {
            self.migrate().await;
        }
        let leaving = self.change().await;
        let fault = self.pick_fault();
        let fault_after =
            Duration::from_millis(self.rng.below(self.shortest_job.as_millis().max(1) as u64));
        let down_for = Duration::from_millis(self.rng.below(600));
        let cancel_after = (self.rng.below(4) == 0).then(|| {
            Duration::from_millis(self.rng.below(self.shortest_job.as_millis().max(1) as u64))
        });
        eprintln!(
            "chaos: round {round}: {fault:?} after {fault_after:?}, down for {down_for:?}, \
             cancel after {cancel_after:?}"
        );
        let (status, body) = self
            .cluster
            .client
            .post("/v1/cluster/rebalance", Value::Null)
            .await;
        assert_eq!(status, 202, "starting the rebalance: {body}");
        let started = std::time::Instant::now();

        // A cancel after the fault is asked once the proxy is back.
        let cancel_first = cancel_after.filter(|&c| c < fault_after);
        if let Some(c) = cancel_first {
            tokio::time::sleep(c).await;
            self.cancel().await;
        }
        tokio::time::sleep(fault_after - cancel_first.unwrap_or_default()).await;
        let (_, at) = self.cluster.client.get("/v1/cluster/rebalance").await;
        eprintln!(
            "chaos: the fault lands with the job {} {}",
            at["state"], at["phase"]
        );
        let node = match fault {
            Fault::Nothing => None,
            Fault::Pause(i) => {
                signal(&self.cluster.nodes[i].process, "STOP");
                eprintln!("chaos: paused {}", self.cluster.nodes[i].id);
                None
            }
            Fault::Proxy => {
                self.cluster.proxy.kill();
                None
            }
            Fault::Node(i) => {
                self.cluster.nodes[i].process.kill();
                Some(i)
            }
            Fault::Both(i) => {
                self.cluster.proxy.kill();
                self.cluster.nodes[i].process.kill();
                Some(i)
            }
        };
        if let Some(i) = node {
            eprintln!("chaos: killed {}", self.cluster.nodes[i].id);
        }
        tokio::time::sleep(down_for).await;
        if let Fault::Pause(i) = fault {
            signal(&self.cluster.nodes[i].process, "CONT");
        }
        if matches!(fault, Fault::Proxy | Fault::Both(_)) {
            self.cluster.restart_proxy();
        }
        if let Some(i) = node {
            self.cluster.restart_node(i);
        }
        if let Some(c) = cancel_after.filter(|&c| c >= fault_after) {
            tokio::time::sleep((c - fault_after).saturating_sub(down_for)).await;
            self.cancel().await;
        }

        let mut job = wait_for_rebalance(&self.cluster.client, Duration::from_secs(120)).await;
        if job["state"] == "done" {
            // A cancelled job is short for a reason of its own; a faulted one is long.
            self.shortest_job = self.shortest_job.min(started.elapsed());
        }
        if job["state"] == "failed"
            && job["error"]
                .as_str()
                .is_some_and(|e| e.contains("cancelled"))
        {
            eprintln!("chaos: the job was cancelled; starting it again");
            job = rebalance_and_wait(&self.cluster.client).await;
        }
        assert_eq!(job["state"], "done", "round {round}: {job}");
        self.check_round(round, leaving).await;
    }

    /// `DELETE /v1/cluster/rebalance`: refused (409) once the job switched or ended; the round
    /// goes on either way.
    async fn cancel(&self) {
        let (status, body) = self.cluster.client.delete("/v1/cluster/rebalance").await;
        eprintln!("chaos: cancel answered {status}: {body}");
    }

    /// Sends `POST path` with `body` and kills the proxy up to `within_ms` later, then starts
    /// it again; the caller asks again and checks what came of it.
    async fn kill_the_proxy_during(&mut self, path: &'static str, body: &Value, within_ms: u64) {
        let client = self.cluster.client.clone();
        let body = bytes::Bytes::from(body.to_string());
        let call =
            tokio::spawn(async move { client.try_raw(http::Method::POST, path, Some(body)).await });
        tokio::time::sleep(Duration::from_millis(self.rng.below(within_ms))).await;
        self.cluster.proxy.kill();
        let first = call.await.unwrap();
        eprintln!("chaos: the proxy was killed during POST {path}: {first:?}");
        self.cluster.restart_proxy();
    }

    /// A migration that makes a table, sometimes with the proxy killed while it applies it
    /// (asked again, every node gets it); then rows in it, which later jobs move too. The
    /// tables take turns at the three layouts the nodes purge differently: an `INTEGER PRIMARY
    /// KEY` (the key is the rowid), a text key `WITHOUT ROWID` (walked by key), a text key in a
    /// rowid table (walked by rowid, the key in an index apart).
    async fn migrate(&mut self) {
        let version = self.migrations.len() + 1;
        let table = format!("chaos_{version}");
        let (key_type, layout) = match version % 3 {
            0 => ("INTEGER", ""),
            1 => ("TEXT", " WITHOUT ROWID"),
            _ => ("TEXT", ""),
        };
        self.migrations.push(json!({
            "version": version,
            "name": table,
            "sql": format!("CREATE TABLE {table} (id {key_type} PRIMARY KEY, v INTEGER){layout};"),
        }));
        let ask = json!({ "migrations": self.migrations });
        eprintln!("chaos: migration {version} makes {table}");
        if self.rng.below(3) == 0 {
            self.kill_the_proxy_during("/v1/cluster/migrations", &ask, 12)
                .await;
        }
        let (status, body) = self
            .cluster
            .client
            .post("/v1/cluster/migrations", ask)
            .await;
        assert_eq!(status, 200, "migration {version}: {body}");
        let (_, ledgers) = self.cluster.client.get("/v1/cluster/migrations").await;
        assert!(
            ledgers["lagging"].as_array().is_none_or(Vec::is_empty),
            "every node has migration {version}: {ledgers}"
        );
        let rows: Vec<Value> = (0..300)
            .map(|i| {
                let id = match key_type {
                    "INTEGER" => json!(version * 1000 + i),
                    _ => json!(format!("{table}-{i}")),
                };
                json!({ "id": id, "v": i })
            })
            .collect();
        let (status, body) = self
            .cluster
            .client
            .post(&format!("/v1/tables/{table}/rows"), json!({ "rows": rows }))
            .await;
        assert_eq!(status, 200, "rows into {table}: {body}");
        self.tables.push((table, 300));
    }

    async fn check_round(&mut self, round: u64, leaving: Option<String>) {
        assert_verified(&self.cluster.client).await;
        for (table, rows) in &self.tables {
            let (status, body) = self
                .cluster
                .client
                .post(
                    "/v1/sql",
                    json!({ "sql": format!("SELECT count(*) FROM {table}") }),
                )
                .await;
            assert_eq!(status, 200, "{body}");
            let counted = u64::try_from(shardlite_tests::summed_counts(&body)).unwrap();
            assert_eq!(
                counted, *rows,
                "round {round}: every row of {table} is there once"
            );
        }
        let (_, topology) = self.cluster.client.get("/v1/cluster").await;
        for n in topology["nodes"].as_array().unwrap() {
            assert_eq!(
                n["state"], "active",
                "round {round}: every node is active after the job: {topology}"
            );
            assert!(
                n.get("next_weight").is_none(),
                "round {round}: every weight change is taken: {topology}"
            );
        }
        if let Some(id) = leaving {
            assert_eq!(
                member_state(&self.cluster.client, &id).await,
                None,
                "round {round}: {id} left the topology"
            );
            let kept = keys_in_file(&self.cluster.db(&id), "users");
            assert!(
                kept.is_empty(),
                "round {round}: {id} keeps {} rows",
                kept.len()
            );
            let i = self.cluster.nodes.iter().position(|n| n.id == id).unwrap();
            let gone = self.cluster.nodes.remove(i);
            assert_eq!(
                transfer_leftovers(&self.cluster.db(&gone.id)),
                (0, 0),
                "round {round}: {id} keeps no capture, log or fence"
            );
        }
        for n in &self.cluster.nodes {
            assert_eq!(
                transfer_leftovers(&self.cluster.db(&n.id)),
                (0, 0),
                "round {round}: {} keeps no capture, log or fence",
                n.id
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_kills_and_cancels_across_rebalances_lose_nothing() {
    let seed = history::seed("SHARDLITE_CHAOS_SEED");
    let rounds = std::env::var("SHARDLITE_CHAOS_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_ROUNDS);
    eprintln!("chaos: {rounds} rounds; the seed replays the actions, not their timing");
    let mut chaos = Chaos::start(seed).await;

    let writers = Writers::start(&chaos.cluster.client, 3, 30, seed);
    for round in 1..=rounds {
        chaos.round(round).await;
    }

    let (logs, state) = writers.finish(&chaos.cluster.client).await;
    let acked = logs
        .iter()
        .flat_map(|l| &l.ops)
        .filter(|op| matches!(op.outcome, history::Outcome::Acked))
        .count();
    assert!(acked > 0, "the writers got nothing acknowledged");
    let report = assert_verified(&chaos.cluster.client).await;
    let writer_rows = state.values().filter(|v| v.is_some()).count() as u64;
    let table_rows: u64 = chaos.tables.iter().map(|(_, rows)| rows).sum();
    assert_eq!(
        report["rows_total"].as_u64().unwrap(),
        ROWS as u64 + writer_rows + table_rows,
        "seed {seed}: no row lost or doubled: {report}"
    );
}
