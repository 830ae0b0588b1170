//! Benchmark of an online rebalance: rows moved per second while writers keep writing, beside
//! a plain batched SQLite insert of the same rows into one file, measured in the same run.
//!
//! ```sh
//! cargo run --release -p shardlite-examples --example rebalance_bench -- --rows 1000000
//! ```
//!
//! Three nodes and the proxy run in this process (release build) on 127.0.0.1 with a temp
//! directory. The table is loaded with `--rows` random keys, a fourth node joins, and
//! `POST /v1/cluster/rebalance` moves its share while `--writers` tasks PUT random keys; the
//! longest write any of them saw is the write pause a user would notice. By default this runs
//! three times, on a fresh cluster each time: a text-keyed rowid table, the same `WITHOUT
//! ROWID`, and an `INTEGER PRIMARY KEY` table (`--layout`), each against a plain insert into its
//! own definition. The
//! report goes to stdout and to `--out` (default `docs/rebalance-bench.md`).

use anyhow::{Context, bail, ensure};
use clap::{Parser, ValueEnum};
use serde_json::{Value, json};
use shardlite::upstream::{Upstream, UpstreamConfig};
use shardlite_node::migrate::Migration;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

#[derive(Parser, Debug)]
struct Args {
    /// Rows in the cluster before the node joins.
    #[arg(long, default_value_t = 1_000_000)]
    rows: usize,
    /// Concurrent writers during the move.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Run only this table definition; without it, all three run, each on a fresh cluster.
    #[arg(long, value_enum)]
    layout: Option<Layout>,
    /// Where the Markdown report goes (relative to the workspace root).
    #[arg(long, default_value = "docs/rebalance-bench.md")]
    out: PathBuf,
}

const VALUE_BYTES: usize = 100;

/// A small seeded PRNG (xorshift64*) for keys.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn value(i: usize) -> String {
    let mut v = format!("value-{i}-");
    while v.len() < VALUE_BYTES {
        v.push('x');
    }
    v
}

struct Api {
    http: Upstream,
    url: String,
}

impl Api {
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let reply = self
            .http
            .call(
                "proxy",
                method.parse()?,
                &self.url,
                path,
                body.map(|b| b.to_string().into()),
            )
            .await
            .map_err(|e| anyhow::anyhow!("{method} {path}: {}", e.message()))?;
        let answer: Value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
        ensure!(
            reply.status.is_success(),
            "{method} {path}: {} {answer}",
            reply.status
        );
        Ok(answer)
    }
}

/// The table definitions the bench runs on (all three unless `--layout` picks one).
#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
enum Layout {
    /// `kv (id TEXT PRIMARY KEY, v TEXT)`: rows in a rowid B-tree, the key in an index beside it.
    Rowid,
    /// The same declared `WITHOUT ROWID`: rows in one B-tree ordered by the key.
    WithoutRowid,
    /// `kv (id INTEGER PRIMARY KEY, v TEXT)` with random 63-bit keys: the key is the rowid.
    Integer,
}

impl Layout {
    fn table_sql(self) -> &'static str {
        match self {
            Layout::WithoutRowid => "CREATE TABLE kv (id TEXT PRIMARY KEY, v TEXT) WITHOUT ROWID",
            Layout::Integer => "CREATE TABLE kv (id INTEGER PRIMARY KEY, v TEXT)",
            Layout::Rowid => "CREATE TABLE kv (id TEXT PRIMARY KEY, v TEXT)",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Layout::WithoutRowid => "text key, `WITHOUT ROWID`",
            Layout::Integer => "`INTEGER PRIMARY KEY`",
            Layout::Rowid => "text key, rowid table",
        }
    }

    /// A random key as its routing text: hex digits, or the decimal digits of an integer key.
    fn key(self, rng: &mut Rng) -> String {
        match self {
            Layout::Integer => (rng.next_u64() >> 1).to_string(),
            _ => format!("{:016x}", rng.next_u64()),
        }
    }

    /// The key as a row's JSON value and as an SQL value.
    fn key_value(self, key: &str) -> (Value, rusqlite::types::Value) {
        match (self, key.parse::<i64>()) {
            (Layout::Integer, Ok(n)) => (Value::from(n), rusqlite::types::Value::Integer(n)),
            _ => (
                Value::from(key),
                rusqlite::types::Value::Text(key.to_owned()),
            ),
        }
    }
}

/// What one run measured.
struct Run {
    layout: Layout,
    /// What the nodes and the baseline synced with.
    synchronous: shardlite_node::Synchronous,
    to_move: u64,
    elapsed: Duration,
    copy_secs: f64,
    switch: String,
    cleanup_secs: f64,
    switched_at: Option<Duration>,
    baseline_rate: f64,
    pause: Value,
    ops: u64,
    errors: u64,
    longest: Duration,
    longest_at: f64,
    write_rate: f64,
    mean_write_ms: f64,
    verify: Value,
    phase_times: String,
}

impl Run {
    fn moved_rate(&self) -> f64 {
        self.to_move as f64 / self.elapsed.as_secs_f64()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let layouts = match args.layout {
        Some(one) => vec![one],
        None => vec![Layout::Rowid, Layout::WithoutRowid, Layout::Integer],
    };
    let mut runs = Vec::new();
    for layout in layouts {
        eprintln!("== {} ==", layout.name());
        runs.push(run(&args, layout).await?);
    }
    let report = report(&args, &runs);
    println!("{report}");
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(&args.out);
    std::fs::write(&out, &report).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("report written to {}", out.display());
    Ok(())
}

/// One rebalance on a fresh cluster whose table has `layout`, then the plain insert of the
/// same rows into a fresh file with the same table definition.
async fn run(args: &Args, layout: Layout) -> anyhow::Result<Run> {
    let dir = tempfile::tempdir()?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };
    let node_config =
        |i: usize| shardlite_node::NodeConfig::new(dir.path().join(format!("n{i}.db")));
    let synchronous = node_config(0).synchronous;

    let mut nodes = Vec::new();
    for i in 1..=4 {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let state = shardlite_node::NodeState::open(node_config(i))?;
        tokio::spawn(shardlite_node::serve(listener, state, until_stopped()));
        nodes.push(url);
    }
    let mut config = shardlite::ProxyConfig::new(dir.path().join("proxy.db"));
    config.seed_nodes = (1..=3)
        .map(|i| (format!("n{i}"), nodes[i - 1].clone()))
        .collect();
    let proxy = shardlite::ProxyState::open(config)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let api = Arc::new(Api {
        http: Upstream::new(UpstreamConfig {
            request_timeout: Duration::from_secs(600),
            name_nodes: false,
            ..UpstreamConfig::default()
        }),
        url: format!("http://{}", listener.local_addr()?),
    });
    let served = tokio::spawn(shardlite::serve(listener, proxy, until_stopped()));

    let schema = Migration {
        version: 1,
        name: "0001_kv".into(),
        sql: layout.table_sql().into(),
    };
    api.call(
        "POST",
        "/v1/cluster/migrations",
        Some(json!({ "migrations": [schema] })),
    )
    .await?;

    eprintln!("loading {} rows...", args.rows);
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let loaded = Instant::now();
    let keys: Vec<String> = (0..args.rows).map(|_| layout.key(&mut rng)).collect();
    for (n, chunk) in keys.chunks(5000).enumerate() {
        let rows: Vec<Value> = chunk
            .iter()
            .enumerate()
            .map(|(i, k)| json!({ "id": layout.key_value(k).0, "v": value(n * 5000 + i) }))
            .collect();
        api.call("POST", "/v1/tables/kv/rows", Some(json!({ "rows": rows })))
            .await?;
    }
    eprintln!("loaded in {:.1} s", loaded.elapsed().as_secs_f64());

    api.call(
        "POST",
        "/v1/cluster/nodes",
        Some(json!({ "id": "n4", "url": nodes[3] })),
    )
    .await?;
    let plan = api
        .call("POST", "/v1/cluster/rebalance?dry_run=true", None)
        .await?;
    let to_move = plan["rows_to_move"].as_u64().context("a counted plan")?;

    // Writers: PUT random keys (new and existing) until the job ends.
    let writing = Arc::new(AtomicBool::new(true));
    let mut writers = Vec::new();
    let writers_started = Instant::now();
    for w in 0..args.writers {
        let api = api.clone();
        let writing = writing.clone();
        let keys: Vec<String> = keys
            .iter()
            .skip(w)
            .step_by(97)
            .take(2000)
            .cloned()
            .collect();
        writers.push(tokio::spawn(async move {
            // (ops, errors, longest write, when it started after `writers_started`, time spent
            // in writes)
            let (mut ops, mut errors, mut longest, mut longest_at, mut spent) =
                (0u64, 0u64, Duration::ZERO, Duration::ZERO, Duration::ZERO);
            let mut rng = Rng(0xfeed + w as u64);
            while writing.load(Ordering::Relaxed) {
                let k = &keys[(rng.next_u64() % keys.len() as u64) as usize];
                let started = Instant::now();
                let ok = api
                    .call(
                        "PUT",
                        &format!("/v1/tables/kv/rows/{k}"),
                        Some(json!({ "v": value(w) })),
                    )
                    .await
                    .is_ok();
                let took = started.elapsed();
                spent += took;
                if took > longest {
                    longest = took;
                    longest_at = started - writers_started;
                }
                ops += 1;
                errors += u64::from(!ok);
            }
            (ops, errors, longest, longest_at, spent)
        }));
    }

    let started = Instant::now();
    api.call("POST", "/v1/cluster/rebalance", None).await?;
    let mut phases: Vec<(String, Duration)> = Vec::new();
    let status = loop {
        let status = api.call("GET", "/v1/cluster/rebalance", None).await?;
        let phase = status["phase"].as_str().unwrap_or("").to_owned();
        if phases.last().is_none_or(|(p, _)| *p != phase) {
            phases.push((phase, started.elapsed()));
        }
        if status["state"] != "running" {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let elapsed = started.elapsed();
    writing.store(false, Ordering::Relaxed);
    let writing_secs = writers_started.elapsed().as_secs_f64();
    let phase_times: Vec<String> = phases
        .iter()
        .map(|(p, at)| format!("{p} from {:.2} s", at.as_secs_f64()))
        .collect();
    // Each phase lasts until the next one is first seen (the end of the job for the last).
    let phase_secs = |name: &str| -> f64 {
        phases.iter().position(|(p, _)| p == name).map_or(0.0, |i| {
            let end = phases.get(i + 1).map_or(elapsed, |(_, at)| *at);
            (end - phases[i].1).as_secs_f64()
        })
    };
    // The copy phase counts from the request: the counted plan is part of the job.
    let first_seen = phases.first().map_or(Duration::ZERO, |(_, at)| *at);
    let copy_secs = phase_secs("copy") + first_seen.as_secs_f64();
    // The fenced phase can be shorter than one poll; the job's own `pause_ms` is exact.
    let switch = if phases.iter().any(|(p, _)| p == "fenced") {
        format!("{:.2} s", phase_secs("fenced"))
    } else {
        "not seen by the poll".to_owned()
    };
    let cleanup_secs = phase_secs("committed");
    let (mut ops, mut errors, mut longest, mut longest_at, mut spent) =
        (0, 0, Duration::ZERO, Duration::ZERO, Duration::ZERO);
    for w in writers {
        let (o, e, l, at, t) = w.await?;
        ops += o;
        errors += e;
        spent += t;
        if l > longest {
            (longest, longest_at) = (l, at);
        }
    }
    // When the longest write started, in the job's clock (negative: before the request).
    let longest_at = longest_at.as_secs_f64() - (started - writers_started).as_secs_f64();
    if status["state"] != "done" {
        bail!("the rebalance did not finish: {status}");
    }
    let verify = api.call("GET", "/v1/cluster/verify", None).await?;
    ensure!(
        verify["misplaced"] == 0 && verify["duplicates"] == 0,
        "verify: {verify}"
    );
    // Baseline, same run: the moved rows inserted into one fresh file in batches, into the
    // same table definition, in the order the keys were drawn (random).
    let moved_keys: Vec<&String> = {
        let ring_before = shardlite_ring::Ring::new(
            (1..=3).map(|i| shardlite_ring::Member::new(format!("n{i}"), 1)),
            shardlite_ring::DEFAULT_VNODES,
        )?;
        let ring_after = ring_before.with_member(shardlite_ring::Member::new("n4", 1))?;
        keys.iter()
            .filter(|k| ring_before.lookup(k) != ring_after.lookup(k))
            .collect()
    };
    let baseline_rate = plain_insert(
        &dir.path().join("baseline.db"),
        layout,
        &moved_keys,
        synchronous,
    )?;
    let _ = stop.send(true);
    served.await??;

    Ok(Run {
        layout,
        synchronous,
        to_move,
        elapsed,
        copy_secs,
        switch,
        cleanup_secs,
        // Up to the switch: the rows are on their new owner and served there; what follows
        // is deleting the old copies. The poll sees the switch within 20 ms.
        switched_at: phases
            .iter()
            .find(|(p, _)| p == "committed")
            .map(|(_, at)| *at)
            .filter(|at| !at.is_zero()),
        baseline_rate,
        pause: status["pause_ms"].clone(),
        ops,
        errors,
        longest,
        longest_at,
        write_rate: ops as f64 / writing_secs,
        mean_write_ms: 1000.0 * spent.as_secs_f64() / ops.max(1) as f64,
        verify,
        phase_times: phase_times.join(", "),
    })
}

/// The baseline: `keys` (with the bench's values) inserted into a fresh file at `path` with
/// `layout`'s table, in batches of 5000 rows per transaction, as a plain SQLite program would,
/// with the nodes' `synchronous`; rows per second.
fn plain_insert(
    path: &std::path::Path,
    layout: Layout,
    keys: &[&String],
    synchronous: shardlite_node::Synchronous,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut conn = rusqlite::Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", synchronous.pragma_value())?;
    conn.execute_batch(layout.table_sql())?;
    for (n, chunk) in keys.chunks(5000).enumerate() {
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached("INSERT INTO kv (id, v) VALUES (?1, ?2)")?;
            for (i, k) in chunk.iter().enumerate() {
                stmt.execute((layout.key_value(k).1, value(n * 5000 + i)))?;
            }
        }
        tx.commit()?;
    }
    drop(conn);
    Ok(keys.len() as f64 / started.elapsed().as_secs_f64())
}

/// The Markdown report: a column per run.
fn report(args: &Args, runs: &[Run]) -> String {
    let mark = |ok: bool| if ok { "✓" } else { "✗" };
    // Every row's cells, one per run.
    let row = |figure: &str, cell: &dyn Fn(&Run) -> String| -> String {
        let cells: Vec<String> = runs.iter().map(cell).collect();
        format!("| {figure} | {} |\n", cells.join(" | "))
    };
    let fastest_plain = runs.iter().map(|r| r.baseline_rate).fold(0.0, f64::max);
    let mut table = format!(
        "| figure | {} |\n|---|{}\n",
        runs.iter()
            .map(|r| r.layout.name())
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(runs.len())
    );
    table += &row("table", &|r| format!("`{}`", r.layout.table_sql()));
    table += &row("rows in the cluster before", &|_| args.rows.to_string());
    table += &row("rows moved to the new node (counted plan)", &|r| {
        format!(
            "{} ({:.1}%)",
            r.to_move,
            100.0 * r.to_move as f64 / args.rows as f64
        )
    });
    table += &row("job time (from the request to `done`)", &|r| {
        format!("{:.2} s", r.elapsed.as_secs_f64())
    });
    table += &row(
        "of which: copy and catch-up incl. the counted plan and the count check / fence, drain and switch / clean-up (as polled every 20 ms)",
        &|r| {
            format!(
                "{:.2} s / {} / {:.2} s",
                r.copy_secs, r.switch, r.cleanup_secs
            )
        },
    );
    table += &row("rows moved per second (rows moved / job time)", &|r| {
        format!("{:.0}", r.moved_rate())
    });
    table += &row(
        &format!(
            "plain batched SQLite insert of the same rows into the same table definition (one file, WAL, synchronous={:?}, 5000 rows per transaction, keys in random order)",
            runs[0].synchronous
        ),
        &|r| format!("{:.0} rows/s", r.baseline_rate),
    );
    table += &row("**ratio, whole job** (target ≥ 0.75)", &|r| {
        let ratio = r.moved_rate() / r.baseline_rate;
        format!("**{ratio:.2}** {}", mark(ratio >= 0.75))
    });
    if runs.len() > 1 {
        table += &row(
            "ratio, whole job, against the fastest of the plain inserts above",
            &|r| {
                let ratio = r.moved_rate() / fastest_plain;
                format!("{ratio:.2} {}", mark(ratio >= 0.75))
            },
        );
    }
    table += &row(
        "rows moved per second up to the switch (rows moved / time until the job was first seen committed; the clean-up excluded)",
        &|r| {
            r.switched_at.map_or("not seen by the poll".into(), |at| {
                format!("{:.0}", r.to_move as f64 / at.as_secs_f64())
            })
        },
    );
    table += &row(
        "ratio, up to the switch (for comparison only; the target is the whole job's)",
        &|r| {
            r.switched_at.map_or("–".into(), |at| {
                format!(
                    "{:.2}",
                    r.to_move as f64 / at.as_secs_f64() / r.baseline_rate
                )
            })
        },
    );
    table += &row(
        "longest fence (write pause for a moving key), from the job",
        &|r| format!("{} ms", r.pause),
    );
    table += &row(
        "writers during the job: ops / errors / longest write seen (started at, in the job's clock)",
        &|r| {
            format!(
                "{} / {} / {} ms ({:.2} s)",
                r.ops,
                r.errors,
                r.longest.as_millis(),
                r.longest_at
            )
        },
    );
    table += &row(
        &format!(
            "writers during the job: writes per second (all {} together) / mean write",
            args.writers
        ),
        &|r| format!("{:.0} / {:.1} ms", r.write_rate, r.mean_write_ms),
    );
    table += &row("verify after", &|r| {
        format!(
            "{} misplaced, {} duplicates",
            r.verify["misplaced"], r.verify["duplicates"]
        )
    });
    table += &row("phases (as polled)", &|r| r.phase_times.clone());
    let layout = args.layout.map_or_else(String::new, |layout| {
        let value = layout.to_possible_value().expect("every layout has a name");
        format!(" --layout {}", value.get_name())
    });
    format!(
        "# Rebalance benchmark\n\n\
         Generated by `cargo run --release -p shardlite-examples --example rebalance_bench -- --rows {rows}{layout}` \
         on this 2-core machine; the nodes, the proxy and the writers share the cores. Each table \
         definition runs on a fresh cluster, one after the other, with keys from the same seed (hex \
         text, or integers for `INTEGER PRIMARY KEY`), the same values and the same writers.\n\n\
         {table}\n\
         The clean-up deletes the moved rows' old copies on their sources, in short transactions \
         so that client writes there wait little. A rowid table keeps its text key in an index \
         apart from the rows, in another order, so the deletes dirty pages of one of the two at \
         random and each commit writes most of them again; a `WITHOUT ROWID` table is one B-tree \
         in key order, walked in that order, and an `INTEGER PRIMARY KEY` is the rowid itself. Where the time goes: `docs/rebalance.md`, \"What is \
         measured\".\n",
        rows = args.rows,
    )
}
