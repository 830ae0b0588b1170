//! A benchmark of shardlite in one run: it starts N nodes and the proxy as separate `shardlite`
//! processes, loads the same rows into every node, then drives GET and PUT at a fixed concurrency
//! for a fixed time over keep-alive connections against (1) one node directly, (2) the proxy and
//! (3) nginx with `hash $key consistent` over the same nodes, and measures batch upserts through
//! the proxy beside a plain batched SQLite insert of the same rows. It prints a table and writes a
//! Markdown report (machine, versions, command, parameters, results, targets) to `--out`.
//!
//! ```sh
//! cargo build --release -p shardlite --bin shardlite
//! cargo run --release -p shardlite-examples --example bench -- --duration-secs 10 --connections 64
//! ```
//!
//! It builds nothing but the `shardlite` binary, and that only if `target/<profile>/shardlite` is
//! missing. nginx comes from Debian's packages: if it is not installed, the bench runs
//! `apt-get install -y nginx` and says so; if that fails, the nginx rows read "not available".
//! Every child process is stopped when the bench ends, fails, panics or is interrupted.

use anyhow::{Context, anyhow, bail, ensure};
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, header};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Rows per batch, for loading and for the batch-upsert measurement.
const BATCH: usize = 1000;
/// Bytes in each row's value.
const VALUE_BYTES: usize = 100;
/// More "other" CPU use than this (in cores) during a load row marks the row as disturbed.
const NOISE_CORES: f64 = 0.1;
/// A request that takes longer than this counts as an error (and its connection is replaced).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser, Debug)]
#[command(
    about = "Benchmark shardlite: direct to a node, through the proxy, through nginx; batch upserts"
)]
struct Args {
    /// Measured seconds of each load phase (after the warm-up).
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Warm-up seconds before each load phase; not measured.
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
    /// Keep-alive connections, each with one request in flight (a closed loop).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Shard nodes to start.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Rows loaded into every node (keys k0..), and rows batch-upserted (keys b0..).
    #[arg(long, default_value_t = 100_000)]
    rows: usize,
    /// Concurrent batch requests (of 1000 rows each) in the batch-upsert measurement.
    #[arg(long, default_value_t = 4)]
    batch_concurrency: usize,
    /// Rounds of the batch measurement (each: `--rows` fresh rows through the proxy, then into a
    /// fresh SQLite file); the report gives every round and the median.
    #[arg(long, default_value_t = 3)]
    batch_rounds: usize,
    /// Seed of the key generator (xorshift64); each connection derives its own from it.
    #[arg(long, default_value_t = 0x5eed_5eed)]
    seed: u64,
    /// nginx's `worker_processes` ("auto" is one per core).
    #[arg(long, default_value = "auto")]
    nginx_workers: String,
    /// Skip nginx (its rows read "skipped").
    #[arg(long)]
    no_nginx: bool,
    /// Skip the durability rows: PUT again with the nodes restarted at `synchronous=NORMAL`
    /// (only measured when the nodes run at `full`).
    #[arg(long)]
    no_durability: bool,
    /// The nodes' `synchronous` setting, and the plain SQLite baseline's, so the batch
    /// comparison is like for like. `full` is the nodes' default.
    #[arg(long, value_enum, default_value_t = Synchronous::Full)]
    synchronous: Synchronous,
    /// Where the Markdown report goes; a relative path is taken from the workspace root.
    #[arg(long, default_value = "docs/bench.md")]
    out: PathBuf,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Synchronous {
    Full,
    Normal,
}

impl Synchronous {
    fn name(self) -> &'static str {
        match self {
            Synchronous::Full => "full",
            Synchronous::Normal => "normal",
        }
    }

    fn pragma(self) -> &'static str {
        match self {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.nodes >= 1, "--nodes must be at least 1");
    ensure!(args.connections >= 1, "--connections must be at least 1");
    ensure!(args.rows >= 1, "--rows must be at least 1");
    ensure!(
        args.duration_secs >= 1,
        "--duration-secs must be at least 1"
    );
    ensure!(args.batch_rounds >= 1, "--batch-rounds must be at least 1");
    ensure!(
        args.batch_concurrency >= 1,
        "--batch-concurrency must be at least 1"
    );
    // Dropping `run`'s future (on Ctrl-C) drops its `Children` guard, which stops every child.
    tokio::select! {
        result = run(args) => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted; stopping the child processes")),
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the examples crate lives inside the workspace")?
        .to_path_buf();
    let out_path = if args.out.is_absolute() {
        args.out.clone()
    } else {
        root.join(&args.out)
    };
    if cfg!(debug_assertions) {
        eprintln!("warning: this bench is a debug build; run it with --release for real numbers");
    }
    let bin = find_shardlite(&root)?;
    println!("shardlite binary: {}", bin.display());
    let stale = stale_sources(&root, &bin);
    if let Some(newer) = &stale {
        println!(
            "warning: {} is older than {newer}: it may not be the code in the tree; run \
             `cargo build --release -p shardlite --bin shardlite` first",
            bin.display()
        );
    }
    println!(
        "seed {:#x}; {} connections, {} s warm-up + {} s per phase, {} nodes, {} rows",
        args.seed, args.connections, args.warmup_secs, args.duration_secs, args.nodes, args.rows
    );

    let before = machine_seconds().0;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let busy = machine_seconds().0 - before;
    if busy > NOISE_CORES {
        println!(
            "warning: the machine is busy before the bench starts ({busy:.2} cores in use); \
             the numbers will be disturbed"
        );
    }

    let dir = tempfile::Builder::new()
        .prefix("shardlite-bench")
        .tempdir()?;
    let mut children = Children::default();

    // Nodes and proxy, each a separate process.
    let node_args = |i: usize, listen: &str, synchronous: Synchronous| -> Vec<String> {
        vec![
            "node".into(),
            "--listen".into(),
            listen.into(),
            "--db".into(),
            dir.path().join(format!("n{i}.db")).display().to_string(),
            "--synchronous".into(),
            synchronous.name().into(),
        ]
    };
    let mut node_urls = Vec::new();
    for i in 1..=args.nodes {
        let url = children.spawn_server(
            &format!("n{i}"),
            Role::Node,
            &bin,
            &node_args(i, "127.0.0.1:0", args.synchronous),
            dir.path(),
        )?;
        node_urls.push(url);
    }
    let mut proxy_args = vec![
        "proxy".to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--state".into(),
        dir.path().join("proxy.db").display().to_string(),
    ];
    for (i, url) in node_urls.iter().enumerate() {
        proxy_args.push("--node".into());
        proxy_args.push(format!("n{}={url}", i + 1));
    }
    let proxy_url = children.spawn_server("proxy", Role::Proxy, &bin, &proxy_args, dir.path())?;
    println!("nodes: {}", node_urls.join(" "));
    println!("proxy: {proxy_url}");

    let client = setup_client();

    // Schema, through the proxy.
    let answer = call_ok(
        &client,
        Method::POST,
        &format!("{proxy_url}/v1/cluster/migrations"),
        Some(
            json!({"migrations": [{"version": 1, "name": "0001_bench",
                "sql": "CREATE TABLE kv (id TEXT PRIMARY KEY, v TEXT)"}]})
            .to_string()
            .into(),
        ),
    )
    .await
    .context("applying the schema through the proxy")?;
    let answer: Value = serde_json::from_slice(&answer)?;
    ensure!(
        answer["lagging"].as_array().is_some_and(|l| l.is_empty()),
        "a node did not apply the schema: {answer}"
    );

    // The same rows on every node, so that any router finds every key.
    let started = Instant::now();
    let mut loads = tokio::task::JoinSet::new();
    for url in &node_urls {
        let (client, url, rows) = (client.clone(), url.clone(), args.rows);
        loads.spawn(async move {
            for start in (0..rows).step_by(BATCH) {
                let body = batch_body("k", start..(start + BATCH).min(rows));
                call_ok(
                    &client,
                    Method::POST,
                    &format!("{url}/v1/tables/kv/rows"),
                    Some(body),
                )
                .await
                .with_context(|| format!("loading rows into {url}"))?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(result) = loads.join_next().await {
        result??;
    }
    for url in &node_urls {
        let stats: Value = serde_json::from_slice(
            &call_ok(&client, Method::GET, &format!("{url}/v1/stats"), None).await?,
        )?;
        let n = stats["tables"]["kv"].as_u64().unwrap_or(0);
        ensure!(
            n == args.rows as u64,
            "{url} holds {n} rows of kv, expected {}",
            args.rows
        );
    }
    println!(
        "loaded {} rows into each of {} nodes in {:.1} s",
        args.rows,
        node_urls.len(),
        started.elapsed().as_secs_f64()
    );

    // nginx over the same nodes.
    let nginx = if args.no_nginx {
        NginxStatus::Unavailable("skipped (--no-nginx)".into())
    } else {
        match start_nginx(&mut children, &node_urls, &args.nginx_workers, dir.path()) {
            Ok(status) => status,
            Err(e) => {
                let why = format!("{e:#}");
                println!("nginx: not available: {why}");
                NginxStatus::Unavailable(why)
            }
        }
    };

    // Load phases: every GET first, then every PUT (PUTs rewrite rows that GETs read).
    let mut targets = vec![
        ("direct (n1)", Some(vec![(url_addr(&node_urls[0])?, None)])),
        ("direct (routed)", Some(routed(&node_urls, args.rows)?)),
        ("proxy", Some(vec![(url_addr(&proxy_url)?, None)])),
    ];
    match &nginx {
        NginxStatus::Running { url, .. } => {
            targets.push(("nginx", Some(vec![(url_addr(url)?, None)])));
        }
        NginxStatus::Unavailable(_) => targets.push(("nginx", None)),
    }
    let mut results = Vec::new();
    for op in [Op::Get, Op::Put] {
        for (name, addr) in &targets {
            let Some(endpoints) = addr else {
                results.push(PhaseRow {
                    target: name,
                    op,
                    result: None,
                });
                continue;
            };
            print!("{:<12} {:<4} ... ", name, op.name());
            std::io::Write::flush(&mut std::io::stdout())?;
            let before = NodeCounters::take(&client, &node_urls).await?;
            let mut result = run_phase(&args, endpoints, op, &children).await?;
            result.counters = NodeCounters::take(&client, &node_urls).await?.minus(before);
            println!(
                "{:>9.0} req/s  p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  errors {}",
                result.rps(),
                result.quantile_ms(0.5),
                result.quantile_ms(0.99),
                result.quantile_ms(0.999),
                result.errors
            );
            if let Some(e) = &result.first_error {
                println!("    first error: {e}");
            }
            let other = result.cpu.other() / args.duration_secs as f64;
            if other > NOISE_CORES {
                println!(
                    "    warning: other processes used {other:.2} cores during this row; it is unreliable"
                );
            }
            results.push(PhaseRow {
                target: name,
                op,
                result: Some(result),
            });
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    // Batch upserts through the proxy, then the same rows into a plain SQLite file; a few
    // rounds, as one round takes well under a second.
    let (mut batch, mut plain) = (Vec::new(), Vec::new());
    for round in 0..args.batch_rounds {
        // Fresh keys every round: b0.. first, then b1_0.., b2_0..
        let prefix = if round == 0 {
            "b".to_string()
        } else {
            format!("b{round}_")
        };
        print!("batch round {}: through the proxy ... ", round + 1);
        std::io::Write::flush(&mut std::io::stdout())?;
        let b = batch_through_proxy(&client, &proxy_url, &args, &prefix, &children).await?;
        print!(
            "{:.0} rows/s ({:.2} s); plain SQLite ... ",
            b.rate(),
            b.secs
        );
        std::io::Write::flush(&mut std::io::stdout())?;
        let path = dir.path().join(format!("plain{round}.db"));
        let rows = args.rows;
        let synchronous = args.synchronous;
        let (cpu_before, started) = (CpuSample::take(&children), Instant::now());
        let mut p = tokio::task::spawn_blocking(move || {
            plain_sqlite_insert(&path, rows, &prefix, synchronous)
        })
        .await??;
        p.cpu = Some(CpuSample::take(&children).minus(cpu_before));
        p.cpu_window = started.elapsed().as_secs_f64();
        println!("{:.0} rows/s ({:.2} s)", p.rate(), p.secs);
        for (what, r) in [("proxy", &b), ("SQLite", &p)] {
            if r.other_cores() > NOISE_CORES {
                println!(
                    "    warning: other processes used {:.2} cores during the {what} batch; it is unreliable",
                    r.other_cores()
                );
            }
        }
        batch.push(b);
        plain.push(p);
    }

    // Durability: the same PUT rows again with the nodes restarted at synchronous=NORMAL, on
    // the same files and ports (the proxy keeps its node URLs).
    let mut normal = Vec::new();
    if args.synchronous == Synchronous::Full && !args.no_durability {
        println!("restarting the nodes with --synchronous normal ...");
        for (i, url) in node_urls.iter().enumerate() {
            let name = format!("n{}", i + 1);
            children.stop(&name);
            let listen = url_addr(url)?.to_string();
            let again = children.spawn_server(
                &name,
                Role::Node,
                &bin,
                &node_args(i + 1, &listen, Synchronous::Normal),
                dir.path(),
            )?;
            ensure!(again == *url, "{name} came back at {again}, not {url}");
        }
        wait_until_proxy_writes(&client, &proxy_url, &node_urls, args.rows).await?;
        for (name, endpoints) in &targets {
            if !matches!(*name, "direct (n1)" | "proxy") {
                continue;
            }
            let Some(endpoints) = endpoints else { continue };
            print!("{:<12} PUT at synchronous=NORMAL ... ", name);
            std::io::Write::flush(&mut std::io::stdout())?;
            let before = NodeCounters::take(&client, &node_urls).await?;
            let mut result = run_phase(&args, endpoints, Op::Put, &children).await?;
            result.counters = NodeCounters::take(&client, &node_urls).await?.minus(before);
            println!(
                "{:>9.0} req/s  p50 {:.2} ms  p99 {:.2} ms  errors {}",
                result.rps(),
                result.quantile_ms(0.5),
                result.quantile_ms(0.99),
                result.errors
            );
            normal.push(PhaseRow {
                target: name,
                op: Op::Put,
                result: Some(result),
            });
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    children.stop_all();

    let report = Report {
        args: &args,
        bin: &bin,
        stale: stale.as_deref(),
        root: &root,
        nginx: &nginx,
        results: &results,
        batch: &batch,
        plain: &plain,
        normal: &normal,
    };
    let table = report.table();
    println!("\n{table}");
    println!("{}", report.targets());
    let markdown = report.markdown();
    if let Some(parent) = out_path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&out_path, markdown)
        .with_context(|| format!("writing {}", out_path.display()))?;
    println!("report written to {}", out_path.display());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Child processes

#[derive(Clone, Copy, PartialEq, Debug)]
enum Role {
    Node,
    Proxy,
    Nginx,
}

struct ChildProc {
    name: String,
    role: Role,
    child: Child,
    log: PathBuf,
}

/// Every child process; dropping it stops them all (SIGTERM, then SIGKILL after 3 s).
#[derive(Default)]
struct Children {
    procs: Vec<ChildProc>,
}

impl Children {
    /// Starts a `shardlite` server and returns the URL from its first stdout line.
    fn spawn_server(
        &mut self,
        name: &str,
        role: Role,
        bin: &Path,
        args: &[String],
        dir: &Path,
    ) -> anyhow::Result<String> {
        let log = dir.join(format!("{name}.log"));
        let mut command = Command::new(bin);
        command
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?);
        // Flags read SHARDLITE_* variables: keep the caller's out of the servers.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("SHARDLITE_") {
                command.env_remove(key);
            }
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("the child's stdout")?;
        self.procs.push(ChildProc {
            name: name.into(),
            role,
            child,
            log: log.clone(),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let line = rx.recv_timeout(Duration::from_secs(15)).map_err(|_| {
            anyhow!(
                "{name} did not announce its address; its log {}:\n{}",
                log.display(),
                tail(&log)
            )
        })?;
        let url = line
            .split_once(" listening on ")
            .map(|(_, url)| url.trim().to_string())
            .with_context(|| format!("{name}: unexpected first line {line:?}"))?;
        Ok(url)
    }

    fn push(&mut self, name: &str, role: Role, child: Child, log: PathBuf) {
        self.procs.push(ChildProc {
            name: name.into(),
            role,
            child,
            log,
        });
    }

    fn pids(&self, role: Role) -> Vec<u32> {
        self.procs
            .iter()
            .filter(|p| p.role == role)
            .map(|p| p.child.id())
            .collect()
    }

    /// Stops the child named `name` as [`Children::stop_all`] does, and forgets it.
    fn stop(&mut self, name: &str) {
        let Some(i) = self.procs.iter().position(|p| p.name == name) else {
            return;
        };
        let mut one = Children {
            procs: vec![self.procs.remove(i)],
        };
        one.stop_all();
    }

    /// Stops every child: SIGTERM, then SIGKILL for those still running after 3 s.
    fn stop_all(&mut self) {
        for p in self.procs.iter_mut().rev() {
            if matches!(p.child.try_wait(), Ok(None)) {
                let _ = Command::new("kill")
                    .args(["-TERM", &p.child.id().to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for p in self.procs.iter_mut().rev() {
            while matches!(p.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(p.child.try_wait(), Ok(None)) {
                eprintln!("{} did not stop on SIGTERM; killing it", p.name);
                let _ = p.child.kill();
                let _ = p.child.wait();
            }
        }
        self.procs.clear();
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// The last lines of a log file, for error messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// The newest source file of the `shardlite` binary (proxy, node, ring, manifests), if it is
/// newer than `bin`: then the binary may not be what the tree holds.
fn stale_sources(root: &Path, bin: &Path) -> Option<String> {
    fn walk(path: &Path, newest: &mut Option<(std::time::SystemTime, PathBuf)>) {
        let Ok(meta) = std::fs::metadata(path) else {
            return;
        };
        if meta.is_dir() {
            for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
                walk(&entry.path(), newest);
            }
        } else {
            let time = meta.modified().ok();
            match (time, newest.as_ref()) {
                (Some(time), Some((t, _))) if time <= *t => {}
                (Some(time), _) => *newest = Some((time, path.to_path_buf())),
                (None, _) => {}
            }
        }
    }
    let built = std::fs::metadata(bin).ok()?.modified().ok()?;
    let mut newest = None;
    for part in [
        "proxy/src",
        "proxy/Cargo.toml",
        "shard-node/src",
        "shard-node/Cargo.toml",
        "ring/src",
        "ring/Cargo.toml",
        "Cargo.toml",
        "Cargo.lock",
    ] {
        walk(&root.join(part), &mut newest);
    }
    let (time, path) = newest?;
    (time > built).then(|| {
        format!(
            "{} (modified {})",
            path.strip_prefix(root).unwrap_or(&path).display(),
            modified_utc(&path)
        )
    })
}

/// A file's modification time as `YYYY-MM-DD HH:MM UTC`.
fn modified_utc(path: &Path) -> String {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .and_then(|d| {
            command_output(
                "date",
                &[
                    "-u",
                    "-d",
                    &format!("@{}", d.as_secs()),
                    "+%Y-%m-%d %H:%M UTC",
                ],
            )
        })
        .unwrap_or_else(|| "?".into())
}

/// `target/<profile>/shardlite` beside this example's own executable, built if missing.
fn find_shardlite(root: &Path) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the bench runs from target/<profile>/examples/")?;
    let bin = profile_dir.join(format!("shardlite{}", std::env::consts::EXE_SUFFIX));
    if bin.exists() {
        return Ok(bin);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let release = profile_dir.ends_with("release");
    println!(
        "{} is missing; building it: cargo build{} -p shardlite --bin shardlite",
        bin.display(),
        if release { " --release" } else { "" }
    );
    let mut command = Command::new(cargo);
    command
        .current_dir(root)
        .args(["build", "-p", "shardlite", "--bin", "shardlite"]);
    if release {
        command.arg("--release");
    }
    let status = command.status().context("running cargo")?;
    ensure!(status.success(), "cargo build failed ({status})");
    ensure!(
        bin.exists(),
        "cargo built, yet {} is missing",
        bin.display()
    );
    Ok(bin)
}

// ---------------------------------------------------------------------------------------------
// nginx

enum NginxStatus {
    Running {
        url: String,
        version: String,
        workers: String,
        installed_now: bool,
        config: String,
    },
    Unavailable(String),
}

/// nginx on PATH (or in /usr/sbin), else installed with apt-get.
fn find_or_install_nginx() -> anyhow::Result<(PathBuf, bool)> {
    if let Some(path) = find_nginx() {
        return Ok((path, false));
    }
    println!("nginx is not installed; installing it: apt-get install -y nginx");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", "nginx"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
    };
    let mut output = install().context("cannot run apt-get")?;
    if !output.status.success() {
        println!("apt-get install failed; running apt-get update and trying again");
        let _ = Command::new("apt-get")
            .args(["update"])
            .stdin(Stdio::null())
            .output();
        output = install().context("cannot run apt-get")?;
    }
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
        bail!(
            "apt-get install -y nginx failed ({}): {}",
            output.status,
            last.unwrap_or("no message")
        );
    }
    let path = find_nginx().context("apt-get installed nginx, yet no nginx binary is found")?;
    Ok((path, true))
}

fn find_nginx() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|dir| dir.join("nginx"))
        .find(|p| p.is_file())
}

fn start_nginx(
    children: &mut Children,
    node_urls: &[String],
    workers: &str,
    dir: &Path,
) -> anyhow::Result<NginxStatus> {
    let (nginx, installed_now) = find_or_install_nginx()?;
    let version = nginx_version(&nginx);
    let prefix = dir.join("nginx");
    std::fs::create_dir_all(&prefix)?;
    let port = free_port()?;
    let servers: String = node_urls
        .iter()
        .map(|u| format!("        server {};\n", u.trim_start_matches("http://")))
        .collect();
    let p = prefix.display();
    // As root, nginx's workers would run as `nobody`, who cannot enter the temp dir.
    let user = if running_as_root() {
        "user root;\n"
    } else {
        ""
    };
    let config = format!(
        "{user}worker_processes {workers};
pid {p}/nginx.pid;
error_log {p}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {p}/client_body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    upstream shards {{
        hash $key consistent;
{servers}        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location ~ ^/v1/tables/([^/]+)/rows/(.+)$ {{
            set $key $2;
            proxy_pass http://shards;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}
}}
"
    );
    let conf = prefix.join("nginx.conf");
    std::fs::write(&conf, &config)?;
    let log = prefix.join("stderr.log");
    let child = Command::new(&nginx)
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(&prefix)
        .arg("-e")
        .arg(prefix.join("error.log"))
        .args(["-g", "daemon off;"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("starting {}", nginx.display()))?;
    children.push("nginx", Role::Nginx, child, log.clone());
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            break;
        }
        let proc = children
            .procs
            .iter_mut()
            .find(|p| p.role == Role::Nginx)
            .context("nginx")?;
        if let Ok(Some(status)) = proc.child.try_wait() {
            bail!(
                "nginx exited ({status}): {}\n{}",
                tail(&proc.log),
                tail(&prefix.join("error.log"))
            );
        }
        ensure!(
            Instant::now() < deadline,
            "nginx did not listen within 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let url = format!("http://{addr}");
    println!(
        "nginx: {version} at {url}, worker_processes {workers}{}",
        if installed_now {
            " (installed by this run)"
        } else {
            ""
        }
    );
    Ok(NginxStatus::Running {
        url,
        version,
        workers: workers.into(),
        installed_now,
        config,
    })
}

fn nginx_version(nginx: &Path) -> String {
    Command::new(nginx)
        .arg("-v")
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stderr)
                .trim()
                .trim_start_matches("nginx version: ")
                .to_string()
        })
        .unwrap_or_else(|| "nginx (version unknown)".into())
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

// ---------------------------------------------------------------------------------------------
// HTTP helpers for setup

type SetupClient = Client<HttpConnector, Full<Bytes>>;

fn setup_client() -> SetupClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A call whose answer must be 2xx; returns the body.
async fn call_ok(
    client: &SetupClient,
    method: Method,
    url: &str,
    body: Option<Bytes>,
) -> anyhow::Result<Bytes> {
    let mut request = Request::builder().method(method.clone()).uri(url);
    if body.is_some() {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    let request = request.body(Full::new(body.unwrap_or_default()))?;
    let response = client
        .request(request)
        .await
        .with_context(|| format!("{method} {url}"))?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    ensure!(
        status.is_success(),
        "{method} {url}: {status} {}",
        String::from_utf8_lossy(&body)
    );
    Ok(body)
}

fn url_addr(url: &str) -> anyhow::Result<SocketAddr> {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .with_context(|| format!("not an http://IP:PORT URL: {url}"))
}

/// A ~100-byte value for row `i` (ASCII, JSON-safe).
fn value(i: usize) -> String {
    let mut v = format!("value-{i:010}-");
    while v.len() < VALUE_BYTES {
        v.push((b'a' + (v.len() % 26) as u8) as char);
    }
    v
}

/// `{"rows":[{"id":"<prefix>i","v":...}, ...]}` for the given row numbers.
fn batch_body(prefix: &str, range: std::ops::Range<usize>) -> Bytes {
    let rows: Vec<Value> = range
        .map(|i| json!({"id": format!("{prefix}{i}"), "v": value(i)}))
        .collect();
    json!({ "rows": rows }).to_string().into()
}

// ---------------------------------------------------------------------------------------------
// The load generator: C keep-alive HTTP/1.1 connections, one request in flight each

#[derive(Clone, Copy, PartialEq, Debug)]
enum Op {
    Get,
    Put,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Get => "GET",
            Op::Put => "PUT",
        }
    }
}

/// xorshift64: small, fast, seeded.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        // splitmix64 of the seed, so that nearby seeds give unrelated (and non-zero) states.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        XorShift((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// CPU time, in seconds, used so far by the bench itself and by each group of children.
#[derive(Clone, Copy, Default, Debug)]
struct CpuSample {
    generator: f64,
    nodes: f64,
    proxy: f64,
    nginx: f64,
    /// Busy CPU seconds of the whole machine (/proc/stat: user, nice, system, irq, softirq).
    machine: f64,
    /// CPU seconds the hypervisor gave to others while this machine wanted to run.
    steal: f64,
}

impl CpuSample {
    fn take(children: &Children) -> CpuSample {
        let sum = |pids: Vec<u32>| -> f64 {
            pids.iter()
                .flat_map(|&pid| std::iter::once(pid).chain(child_pids(pid)))
                .map(cpu_seconds)
                .sum()
        };
        CpuSample {
            generator: cpu_seconds(std::process::id()),
            nodes: sum(children.pids(Role::Node)),
            proxy: sum(children.pids(Role::Proxy)),
            nginx: sum(children.pids(Role::Nginx)),
            machine: machine_seconds().0,
            steal: machine_seconds().1,
        }
    }

    /// Busy CPU time not in the bench or its children: interrupts, other processes.
    fn other(&self) -> f64 {
        (self.machine - self.generator - self.nodes - self.proxy - self.nginx).max(0.0)
    }

    fn minus(self, before: CpuSample) -> CpuSample {
        CpuSample {
            generator: self.generator - before.generator,
            nodes: self.nodes - before.nodes,
            proxy: self.proxy - before.proxy,
            nginx: self.nginx - before.nginx,
            machine: self.machine - before.machine,
            steal: self.steal - before.steal,
        }
    }
}

/// utime + stime of a process (all its threads), in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0.0;
    };
    // After "pid (comm)": state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    ticks as f64 / clock_ticks()
}

/// (busy, steal) CPU seconds of the machine since boot, from the first line of /proc/stat.
fn machine_seconds() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    // cpu user nice system idle iowait irq softirq steal guest guest_nice (guest is in user).
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .map(|t| t.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| ticks.get(i).copied().unwrap_or(0);
    let busy = at(0) + at(1) + at(2) + at(5) + at(6);
    (busy as f64 / clock_ticks(), at(7) as f64 / clock_ticks())
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Processes whose parent is `pid` (nginx's workers).
fn child_pids(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = &s[s.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

struct PhaseResult {
    /// Successful requests that started after the warm-up and ended within the measured window.
    ok: u64,
    /// Non-2xx answers, transport errors and timeouts in the measured window.
    errors: u64,
    first_error: Option<String>,
    /// Connections re-opened after the server closed one (not errors).
    reconnects: u64,
    /// Latency of successful requests, in microseconds.
    hist: Histogram<u64>,
    secs: f64,
    cpu: CpuSample,
    /// What the nodes counted over the phase (warm-up included).
    counters: NodeCounters,
}

/// The nodes' write and `/v1/ops` counters (`GET /v1/stats`), summed over the nodes.
#[derive(Clone, Copy, Debug, Default)]
struct NodeCounters {
    writes: u64,
    commits: u64,
    op_sets: u64,
    ops: u64,
}

impl NodeCounters {
    async fn take(client: &SetupClient, node_urls: &[String]) -> anyhow::Result<NodeCounters> {
        let mut sum = NodeCounters::default();
        for url in node_urls {
            let stats: Value = serde_json::from_slice(
                &call_ok(client, Method::GET, &format!("{url}/v1/stats"), None).await?,
            )?;
            let field = |name: &str| {
                stats[name]
                    .as_u64()
                    .with_context(|| format!("{url}/v1/stats has no {name}: {stats}"))
            };
            sum.writes += field("writes")?;
            sum.commits += field("commits")?;
            sum.op_sets += field("op_sets")?;
            sum.ops += field("ops")?;
        }
        Ok(sum)
    }

    fn minus(self, before: NodeCounters) -> NodeCounters {
        NodeCounters {
            writes: self.writes - before.writes,
            commits: self.commits - before.commits,
            op_sets: self.op_sets - before.op_sets,
            ops: self.ops - before.ops,
        }
    }

    /// `a / b` to one decimal, or a dash when nothing was counted.
    fn per(a: u64, b: u64) -> String {
        if b == 0 {
            "–".into()
        } else {
            format!("{:.1}", a as f64 / b as f64)
        }
    }
}

impl PhaseResult {
    fn rps(&self) -> f64 {
        self.ok as f64 / self.secs
    }

    fn quantile_ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
}

struct ConnStats {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    reconnects: u64,
    hist: Histogram<u64>,
}

/// Where a load phase sends its requests: connection `c` goes to `endpoints[c % len]`, and
/// draws its keys from that endpoint's key list (`None`: every key).
type Endpoints = Vec<(SocketAddr, Option<Arc<Vec<usize>>>)>;

/// Client-side routing over the nodes: each connection talks to one node and asks only for
/// keys that node owns under the ring the proxy builds (same ids, weights and vnodes).
fn routed(node_urls: &[String], rows: usize) -> anyhow::Result<Endpoints> {
    let ids: Vec<String> = (1..=node_urls.len()).map(|i| format!("n{i}")).collect();
    let ring = shardlite_ring::Ring::new(
        ids.iter()
            .map(|id| shardlite_ring::Member::new(id.clone(), 1)),
        shardlite_ring::DEFAULT_VNODES,
    )?;
    let mut owned: Vec<Vec<usize>> = vec![Vec::new(); ids.len()];
    for i in 0..rows {
        let owner = ring
            .lookup(&format!("k{i}"))
            .context("a ring with members has an owner for every key")?;
        let n = ids
            .iter()
            .position(|id| id == owner.as_str())
            .context("the owner is one of the nodes")?;
        owned[n].push(i);
    }
    node_urls
        .iter()
        .zip(owned)
        .map(|(url, keys)| {
            ensure!(!keys.is_empty(), "{url} owns none of the {rows} keys");
            Ok((url_addr(url)?, Some(Arc::new(keys))))
        })
        .collect()
}

/// Waits until a PUT through the proxy succeeds for a key of every node (after the nodes
/// restarted, the proxy's pooled connections to them are stale and its health check may
/// hold a node down for a moment).
async fn wait_until_proxy_writes(
    client: &SetupClient,
    proxy_url: &str,
    node_urls: &[String],
    rows: usize,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for (_, keys) in routed(node_urls, rows)? {
        let key = keys.and_then(|k| k.first().copied()).unwrap_or(0);
        let url = format!("{proxy_url}/v1/tables/kv/rows/k{key}");
        let body: Bytes = json!({ "v": value(key) }).to_string().into();
        loop {
            match call_ok(client, Method::PUT, &url, Some(body.clone())).await {
                Ok(_) => break,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.context("the proxy does not write after the restart")),
            }
        }
    }
    Ok(())
}

async fn run_phase(
    args: &Args,
    endpoints: &Endpoints,
    op: Op,
    children: &Children,
) -> anyhow::Result<PhaseResult> {
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(args.warmup_secs);
    let measure_until = measure_from + Duration::from_secs(args.duration_secs);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..args.connections {
        let seed = args.seed ^ (c as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let (addr, keys) = endpoints[c % endpoints.len()].clone();
        let keys = keys.unwrap_or_else(|| Arc::new((0..args.rows).collect()));
        tasks.spawn(connection_loop(
            addr,
            op,
            keys,
            seed,
            measure_from,
            measure_until,
        ));
    }
    tokio::time::sleep_until(measure_from.into()).await;
    let cpu_before = CpuSample::take(children);
    tokio::time::sleep_until(measure_until.into()).await;
    let cpu = CpuSample::take(children).minus(cpu_before);

    let mut hist = new_histogram()?;
    let (mut ok, mut errors, mut reconnects, mut first_error) = (0, 0, 0, None);
    while let Some(stats) = tasks.join_next().await {
        let stats = stats??;
        hist.add(&stats.hist)?;
        ok += stats.ok;
        errors += stats.errors;
        reconnects += stats.reconnects;
        if first_error.is_none() {
            first_error = stats.first_error;
        }
    }
    Ok(PhaseResult {
        ok,
        errors,
        first_error,
        reconnects,
        hist,
        secs: args.duration_secs as f64,
        cpu,
        counters: NodeCounters::default(),
    })
}

fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    // 1 µs .. 60 s at 3 significant digits.
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

async fn connect(addr: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

async fn connection_loop(
    addr: SocketAddr,
    op: Op,
    keys: Arc<Vec<usize>>,
    seed: u64,
    measure_from: Instant,
    measure_until: Instant,
) -> anyhow::Result<ConnStats> {
    let host = addr.to_string();
    let put_body = Bytes::from(json!({ "v": value(seed as usize % 1_000_000) }).to_string());
    let mut rng = XorShift::new(seed);
    let mut stats = ConnStats {
        ok: 0,
        errors: 0,
        first_error: None,
        reconnects: 0,
        hist: new_histogram()?,
    };
    let mut sender = connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let mut checked = false;
    while Instant::now() < measure_until {
        if sender.is_closed() {
            // The server closed the keep-alive connection (e.g. after N requests): open another.
            sender = connect(addr)
                .await
                .with_context(|| format!("reconnecting to {addr}"))?;
            stats.reconnects += 1;
        }
        let i = keys[rng.below(keys.len())];
        let path = format!("/v1/tables/kv/rows/k{i}");
        let request = match op {
            Op::Get => Request::get(path)
                .header(header::HOST, &host)
                .body(Full::new(Bytes::new()))?,
            Op::Put => Request::put(path)
                .header(header::HOST, &host)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(put_body.clone()))?,
        };
        let sent = Instant::now();
        let outcome = tokio::time::timeout(REQUEST_TIMEOUT, async {
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, body))
        })
        .await;
        let done = Instant::now();
        let measured = sent >= measure_from && done <= measure_until;
        // A transport error or a timeout leaves the connection unusable.
        let broken = !matches!(outcome, Ok(Ok(_)));
        let failure = match outcome {
            Ok(Ok((status, body))) if status.is_success() => {
                if op == Op::Get && !checked {
                    // Once per connection: the answer is the row that was asked for.
                    let row: Value = serde_json::from_slice(&body)
                        .with_context(|| format!("GET k{i} answered non-JSON"))?;
                    ensure!(
                        row["id"] == format!("k{i}").as_str(),
                        "GET k{i} answered another row: {row}"
                    );
                    checked = true;
                }
                if measured {
                    stats.ok += 1;
                    let micros = (done - sent).as_micros().max(1) as u64;
                    stats.hist.saturating_record(micros);
                }
                None
            }
            Ok(Ok((status, body))) => Some(format!(
                "{status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            )),
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(_) => Some(format!("no answer within {REQUEST_TIMEOUT:?}")),
        };
        if let Some(failure) = failure {
            if measured {
                stats.errors += 1;
                stats.first_error.get_or_insert(failure);
            }
            if broken {
                // A broken or stuck connection: replace it.
                match connect(addr).await {
                    Ok(s) => sender = s,
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
                stats.reconnects += 1;
            }
        }
    }
    Ok(stats)
}

// ---------------------------------------------------------------------------------------------
// Batch upserts

struct BatchResult {
    rows: usize,
    secs: f64,
    /// CPU use over `cpu_window` seconds around the measurement.
    cpu: Option<CpuSample>,
    cpu_window: f64,
}

impl BatchResult {
    fn rate(&self) -> f64 {
        self.rows as f64 / self.secs
    }

    /// Cores used by something outside the bench during the measurement.
    fn other_cores(&self) -> f64 {
        self.cpu
            .map_or(0.0, |cpu| cpu.other() / self.cpu_window.max(1e-3))
    }
}

/// The round with the median rate (the lower middle one of an even count).
fn median(rounds: &[BatchResult]) -> &BatchResult {
    let mut sorted: Vec<&BatchResult> = rounds.iter().collect();
    sorted.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    sorted[(sorted.len() - 1) / 2]
}

async fn batch_through_proxy(
    client: &SetupClient,
    proxy_url: &str,
    args: &Args,
    prefix: &str,
    children: &Children,
) -> anyhow::Result<BatchResult> {
    // Bodies are built before the clock starts, as the SQLite rows are.
    let bodies: Arc<Vec<(usize, Bytes)>> = Arc::new(
        (0..args.rows)
            .step_by(BATCH)
            .map(|start| {
                let end = (start + BATCH).min(args.rows);
                (end - start, batch_body(prefix, start..end))
            })
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let url = format!("{proxy_url}/v1/tables/kv/rows");
    let cpu_before = CpuSample::take(children);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.batch_concurrency {
        let (client, url, bodies, next) =
            (client.clone(), url.clone(), bodies.clone(), next.clone());
        tasks.spawn(async move {
            let mut upserted = 0usize;
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some((n, body)) = bodies.get(k) else {
                    break;
                };
                let answer = call_ok(&client, Method::POST, &url, Some(body.clone())).await?;
                let answer: Value = serde_json::from_slice(&answer)?;
                ensure!(
                    answer["upserted"].as_u64() == Some(*n as u64),
                    "a batch of {n} rows answered {answer}"
                );
                upserted += n;
            }
            anyhow::Ok(upserted)
        });
    }
    let mut rows = 0;
    while let Some(n) = tasks.join_next().await {
        rows += n??;
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = CpuSample::take(children).minus(cpu_before);
    ensure!(rows == args.rows, "upserted {rows} of {} rows", args.rows);
    Ok(BatchResult {
        rows,
        secs,
        cpu: Some(cpu),
        cpu_window: secs,
    })
}

/// The same rows into one fresh SQLite file: WAL, the nodes' `synchronous`, one transaction per
/// 1000 rows, a prepared INSERT.
fn plain_sqlite_insert(
    path: &Path,
    rows: usize,
    prefix: &str,
    synchronous: Synchronous,
) -> anyhow::Result<BatchResult> {
    let mut conn = rusqlite::Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", synchronous.pragma())?;
    conn.execute("CREATE TABLE kv (id TEXT PRIMARY KEY, v TEXT)", [])?;
    let data: Vec<(String, String)> = (0..rows)
        .map(|i| (format!("{prefix}{i}"), value(i)))
        .collect();
    let started = Instant::now();
    for chunk in data.chunks(BATCH) {
        let tx = conn.transaction()?;
        {
            let mut insert = tx.prepare_cached("INSERT INTO kv (id, v) VALUES (?1, ?2)")?;
            for (id, v) in chunk {
                insert.execute((id, v))?;
            }
        }
        tx.commit()?;
    }
    let secs = started.elapsed().as_secs_f64();
    let count: i64 = conn.query_row("SELECT count(*) FROM kv", [], |r| r.get(0))?;
    ensure!(count as usize == rows, "inserted {count} of {rows} rows");
    Ok(BatchResult {
        rows,
        secs,
        cpu: None,
        cpu_window: 0.0,
    })
}

// ---------------------------------------------------------------------------------------------
// The report

struct PhaseRow {
    target: &'static str,
    op: Op,
    result: Option<PhaseResult>,
}

struct Report<'a> {
    args: &'a Args,
    bin: &'a Path,
    /// A source file newer than the binary, if any.
    stale: Option<&'a str>,
    root: &'a Path,
    nginx: &'a NginxStatus,
    results: &'a [PhaseRow],
    batch: &'a [BatchResult],
    plain: &'a [BatchResult],
    /// PUT rows with the nodes at synchronous=NORMAL (direct (n1) and proxy); empty when not
    /// measured.
    normal: &'a [PhaseRow],
}

impl Report<'_> {
    fn find(&self, target: &str, op: Op) -> Option<&PhaseResult> {
        self.results
            .iter()
            .find(|r| r.target == target && r.op == op)?
            .result
            .as_ref()
    }

    fn table(&self) -> String {
        let mut t = String::new();
        let secs = self.args.duration_secs as f64;
        t.push_str(
            "| path | op | req/s | p50 ms | p99 ms | p99.9 ms | max ms | errors | CPU cores used: load generator / router / nodes / other |\n\
             |---|---|---:|---:|---:|---:|---:|---:|---|\n",
        );
        for row in self.results {
            match &row.result {
                Some(r) => {
                    let router = match row.target {
                        "proxy" => format!("{:.2}", r.cpu.proxy / secs),
                        "nginx" => format!("{:.2}", r.cpu.nginx / secs),
                        _ => "–".into(),
                    };
                    let _ = writeln!(
                        t,
                        "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {:.2} / {} / {:.2} / {:.2} |",
                        row.target,
                        row.op.name(),
                        r.rps(),
                        r.quantile_ms(0.5),
                        r.quantile_ms(0.99),
                        r.quantile_ms(0.999),
                        r.hist.max() as f64 / 1000.0,
                        r.errors,
                        r.cpu.generator / secs,
                        router,
                        r.cpu.nodes / secs,
                        r.cpu.other() / secs,
                    );
                }
                None => {
                    let _ = writeln!(
                        t,
                        "| {} | {} | not available | | | | | | |",
                        row.target,
                        row.op.name()
                    );
                }
            }
        }
        t.push('\n');
        t.push_str(
            "| path | op | row requests per `/v1/ops` exchange | writes per commit (group commit) |\n\
             |---|---|---:|---:|\n",
        );
        for row in self.results {
            if let Some(r) = &row.result {
                let c = r.counters;
                let _ = writeln!(
                    t,
                    "| {} | {} | {} | {} |",
                    row.target,
                    row.op.name(),
                    NodeCounters::per(c.ops, c.op_sets),
                    NodeCounters::per(c.writes, c.commits)
                );
            }
        }
        t.push('\n');
        let _ = writeln!(
            t,
            "| batch upsert, {} rows per round in batches of {BATCH} | rows/s per round | median rows/s |\n|---|---|---:|",
            self.args.rows
        );
        let rounds = |results: &[BatchResult]| {
            results
                .iter()
                .map(|r| format!("{:.0}", r.rate()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            t,
            "| through the proxy, {} batches in flight | {} | {:.0} |",
            self.args.batch_concurrency,
            rounds(self.batch),
            median(self.batch).rate()
        );
        let _ = writeln!(
            t,
            "| plain SQLite (rusqlite, WAL, synchronous={}, 1 transaction per {BATCH} rows) | {} | {:.0} |",
            self.args.synchronous.pragma(),
            rounds(self.plain),
            median(self.plain).rate()
        );
        t
    }

    /// Measurements during which something outside the bench used the machine.
    fn noisy(&self) -> Vec<String> {
        let secs = self.args.duration_secs as f64;
        let at = |rows: &[PhaseRow], suffix: &'static str| {
            rows.iter()
                .filter_map(|r| {
                    let res = r.result.as_ref()?;
                    let other = res.cpu.other() / secs;
                    (other > NOISE_CORES)
                        .then(|| format!("{} {}{suffix} ({other:.2} cores)", r.target, r.op.name()))
                })
                .collect::<Vec<_>>()
        };
        let mut noisy = at(self.results, "");
        noisy.extend(at(self.normal, " at NORMAL"));
        for (what, rounds) in [("proxy", self.batch), ("SQLite", self.plain)] {
            for (i, r) in rounds.iter().enumerate() {
                if r.other_cores() > NOISE_CORES {
                    noisy.push(format!(
                        "{what} batch round {} ({:.2} cores)",
                        i + 1,
                        r.other_cores()
                    ));
                }
            }
        }
        noisy
    }

    /// CPU µs per request of each process group, for each load row.
    fn cpu_per_request(&self) -> String {
        let mut t = String::from(
            "| path | op | load generator | router | nodes | all |\n|---|---|---:|---:|---:|---:|\n",
        );
        for row in self.results {
            let Some(r) = &row.result else { continue };
            let per = |cpu: f64| cpu / r.ok.max(1) as f64 * 1e6;
            let router = r.cpu.proxy + r.cpu.nginx;
            let _ = writeln!(
                t,
                "| {} | {} | {:.1} | {} | {:.1} | {:.1} |",
                row.target,
                row.op.name(),
                per(r.cpu.generator),
                if row.target.starts_with("direct") {
                    "–".into()
                } else {
                    format!("{:.1}", per(router))
                },
                per(r.cpu.nodes),
                per(r.cpu.generator + router + r.cpu.nodes),
            );
        }
        t
    }

    /// The targets of issue 5: (what, measured, goal, met); met is None when not measurable.
    fn target_rows(&self) -> Vec<(String, String, String, Option<bool>)> {
        let mut rows = Vec::new();
        for op in [Op::Get, Op::Put] {
            let name = op.name();
            let proxy = self.find("proxy", op);
            let nginx = self.find("nginx", op);
            for direct in ["direct (n1)", "direct (routed)"] {
                let what = format!("{name}: proxy / {direct} req/s");
                match (proxy, self.find(direct, op)) {
                    (Some(p), Some(d)) => {
                        let ratio = p.rps() / d.rps();
                        rows.push((
                            what,
                            format!("{ratio:.2}"),
                            "≥ 0.75".into(),
                            Some(ratio >= 0.75),
                        ));
                    }
                    _ => rows.push((what, "n/a".into(), "≥ 0.75".into(), None)),
                }
            }
            if let Some(p) = proxy {
                let p99 = p.quantile_ms(0.99);
                rows.push((
                    format!("{name}: proxy p99"),
                    format!("{p99:.2} ms"),
                    "≤ 10 ms".into(),
                    Some(p99 <= 10.0),
                ));
            }
            match (proxy, nginx) {
                (Some(p), Some(n)) => {
                    let ratio = p.rps() / n.rps();
                    rows.push((
                        format!("{name}: proxy / nginx req/s"),
                        format!("{ratio:.2}"),
                        "≥ 1.0".into(),
                        Some(ratio >= 1.0),
                    ));
                    let (pp, np) = (p.quantile_ms(0.99), n.quantile_ms(0.99));
                    rows.push((
                        format!("{name}: proxy p99 vs nginx p99"),
                        format!("{pp:.2} vs {np:.2} ms"),
                        "proxy ≤ nginx".into(),
                        Some(pp <= np),
                    ));
                }
                _ => {
                    rows.push((
                        format!("{name}: proxy / nginx req/s"),
                        "nginx not available".into(),
                        "≥ 1.0".into(),
                        None,
                    ));
                    rows.push((
                        format!("{name}: proxy p99 vs nginx p99"),
                        "nginx not available".into(),
                        "proxy ≤ nginx".into(),
                        None,
                    ));
                }
            }
        }
        let ratio = median(self.batch).rate() / median(self.plain).rate();
        rows.push((
            "batch upsert: proxy / plain SQLite rows/s (medians)".into(),
            format!("{ratio:.2}"),
            "≥ 0.7".into(),
            Some(ratio >= 0.7),
        ));
        for target in ["direct (n1)", "proxy"] {
            let what = format!("durable PUT, {target}: synchronous=FULL / NORMAL req/s");
            match (self.find(target, Op::Put), self.find_normal(target)) {
                (Some(full), Some(normal)) => {
                    let ratio = full.rps() / normal.rps();
                    rows.push((
                        what,
                        format!("{ratio:.2}"),
                        "≥ 0.8".into(),
                        Some(ratio >= 0.8),
                    ));
                }
                _ => rows.push((what, "not measured".into(), "≥ 0.8".into(), None)),
            }
        }
        rows
    }

    fn find_normal(&self, target: &str) -> Option<&PhaseResult> {
        self.normal
            .iter()
            .find(|r| r.target == target)?
            .result
            .as_ref()
    }

    /// The PUT rows at FULL beside the same rows at NORMAL.
    fn durability_table(&self) -> String {
        let mut t = String::from(
            "| path | PUT req/s, FULL | p99 ms, FULL | PUT req/s, NORMAL | p99 ms, NORMAL | FULL / NORMAL | writes per commit, FULL / NORMAL |\n\
             |---|---:|---:|---:|---:|---:|---|\n",
        );
        for target in ["direct (n1)", "proxy"] {
            if let (Some(full), Some(normal)) =
                (self.find(target, Op::Put), self.find_normal(target))
            {
                let _ = writeln!(
                    t,
                    "| {target} | {:.0} | {:.2} | {:.0} | {:.2} | {:.2} | {} / {} |",
                    full.rps(),
                    full.quantile_ms(0.99),
                    normal.rps(),
                    normal.quantile_ms(0.99),
                    full.rps() / normal.rps(),
                    NodeCounters::per(full.counters.writes, full.counters.commits),
                    NodeCounters::per(normal.counters.writes, normal.counters.commits),
                );
            }
        }
        t
    }

    fn targets(&self) -> String {
        let mut t = String::from("| target | measured | goal | met |\n|---|---:|---|:---:|\n");
        for (what, measured, goal, met) in self.target_rows() {
            let mark = match met {
                Some(true) => "✓",
                Some(false) => "✗",
                None => "–",
            };
            let _ = writeln!(t, "| {what} | {measured} | {goal} | {mark} |");
        }
        t
    }

    fn markdown(&self) -> String {
        let a = self.args;
        let mut m = String::new();
        let _ = writeln!(m, "# shardlite benchmark\n");
        let _ = writeln!(
            m,
            "Generated by `examples/examples/bench.rs` on {}. Re-run it with the command below; it \
             overwrites this file.\n",
            command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_else(|| "?".into())
        );
        let _ = writeln!(m, "```sh\n{}\n```\n", self.command());

        let _ = writeln!(m, "## Machine and versions\n");
        let _ = writeln!(m, "| | |\n|---|---|");
        let _ = writeln!(
            m,
            "| cores (nproc) | {} |",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        let _ = writeln!(m, "| CPU | {} |", cpu_model());
        let _ = writeln!(m, "| memory | {} |", mem_total());
        let _ = writeln!(
            m,
            "| OS | {} (Linux {}) |",
            os_name(),
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
        );
        let _ = writeln!(
            m,
            "| rustc | {} |",
            command_output("rustc", &["-V"]).unwrap_or_else(|| "?".into())
        );
        let _ = writeln!(
            m,
            "| shardlite | {} (`{}`, built {}), tree at git {}{} |",
            command_output(&self.bin.display().to_string(), &["--version"])
                .unwrap_or_else(|| "?".into()),
            self.bin
                .strip_prefix(self.root)
                .unwrap_or(self.bin)
                .display(),
            modified_utc(self.bin),
            git_revision(self.root),
            match self.stale {
                Some(newer) => format!(
                    "; **warning: the binary is older than {newer}, so it may not be the code \
                     of this revision**"
                ),
                None => "; the binary is newer than every source file".into(),
            }
        );
        let nginx_line = match self.nginx {
            NginxStatus::Running {
                version,
                workers,
                installed_now,
                ..
            } => format!(
                "{version}, `worker_processes {workers}`{}",
                if *installed_now {
                    " (installed by this run with `apt-get install -y nginx`)"
                } else {
                    ""
                }
            ),
            NginxStatus::Unavailable(why) => format!("not available: {why}"),
        };
        let _ = writeln!(m, "| nginx | {nginx_line} |");
        let _ = writeln!(
            m,
            "| build | {} |\n",
            if cfg!(debug_assertions) {
                "debug (numbers are not meaningful)"
            } else {
                "release"
            }
        );

        let _ = writeln!(m, "## Parameters\n");
        let _ = writeln!(
            m,
            "- {} nodes and 1 proxy, each a separate `shardlite` process (`RUST_LOG=info`), on \
             127.0.0.1; the proxy on its default `--threads` ({} on this machine); the nodes run \
             with `--synchronous {}`; every node holds the same {} rows `k0..k{}` of \
             `kv (id TEXT PRIMARY KEY, v TEXT)` with {}-byte values, so that any router finds \
             every key.",
            a.nodes,
            shardlite::cli::default_proxy_threads(
                std::thread::available_parallelism().map_or(1, |n| n.get())
            ),
            a.synchronous.name(),
            a.rows,
            a.rows - 1,
            VALUE_BYTES
        );
        let _ = writeln!(
            m,
            "- Load: {} keep-alive HTTP/1.1 connections (hyper `client::conn::http1`), one \
             request in flight on each (closed loop), {} s warm-up then {} s measured per row; \
             keys uniform at random (xorshift64, seed `{:#x}`). GET `/v1/tables/kv/rows/k{{i}}`; \
             PUT the same path with `{{\"v\":\"<{} bytes>\"}}`. Latencies in an HDR histogram \
             (µs, 3 significant digits) of the 2xx answers; errors are non-2xx answers, broken \
             connections and timeouts (10 s).",
            a.connections, a.warmup_secs, a.duration_secs, a.seed, VALUE_BYTES
        );
        let _ = writeln!(
            m,
            "- direct (n1): straight to node n1, which holds every key, so one node (one writer, \
             one group commit) takes the whole load. direct (routed): straight to the nodes with \
             the routing done by the client, as an application that shards by itself would: \
             connection `c` talks to node `c mod {}` and asks only for keys that node owns on \
             the proxy's ring. proxy: shardlite's proxy over the {} nodes. nginx: `hash $key \
             consistent` over the same nodes, upstream `keepalive 64`, the key taken from the \
             path (config below).",
            a.nodes, a.nodes
        );
        let _ = writeln!(
            m,
            "- Batch, {} rounds: {} fresh rows (`b0..`, then `b1_0..`, ...) in `POST \
             /v1/tables/kv/rows` batches of {} rows, {} in flight, through the proxy (into node \
             files that already hold the {} `k` rows and the earlier rounds' rows); then the \
             same rows into a fresh SQLite file with rusqlite in the bench process: WAL, \
             `synchronous={}` (the nodes run with the same setting), one transaction per {} \
             rows, a prepared `INSERT`. JSON bodies and rows are built before the clock starts. \
             The ratio is of the medians.",
            a.batch_rounds,
            a.rows,
            BATCH,
            a.batch_concurrency,
            a.rows,
            a.synchronous.pragma(),
            BATCH
        );
        if !self.normal.is_empty() {
            let _ = writeln!(
                m,
                "- Durability, last: the node processes stopped (SIGTERM) and started again on \
                 the same files and ports with `--synchronous normal`, then the PUT rows of \
                 direct (n1) and the proxy again, with the same load; the tables then also hold \
                 the batch rows."
            );
        }
        m.push('\n');

        let _ = writeln!(m, "## Results\n");
        m.push_str(&self.table());
        let _ = writeln!(
            m,
            "\nCPU cores used = CPU seconds (user + system, from `/proc`) of each process group \
             during the measured window, divided by its length. The router is the proxy or \
             nginx (master and workers). \"other\" is the rest of the machine's busy time \
             (`/proc/stat`): interrupts and softirqs (loopback TCP is largely processed there) \
             and any other process. Hypervisor steal time over all phases: {:.2} s.\n",
            self.results
                .iter()
                .filter_map(|r| r.result.as_ref())
                .map(|r| r.cpu.steal)
                .sum::<f64>()
        );
        let _ = writeln!(
            m,
            "CPU time per request, in µs (CPU seconds of the measured window / requests):\n"
        );
        m.push_str(&self.cpu_per_request());
        let b = median(self.batch);
        if let Some(cpu) = b.cpu {
            let _ = writeln!(
                m,
                "\nDuring the median batch round through the proxy: load generator {:.2}, proxy \
                 {:.2}, nodes {:.2} CPU cores used; {:.1} µs of proxy CPU and {:.1} µs of node \
                 CPU per row.\n",
                cpu.generator / b.secs,
                cpu.proxy / b.secs,
                cpu.nodes / b.secs,
                cpu.proxy / b.rows as f64 * 1e6,
                cpu.nodes / b.rows as f64 * 1e6,
            );
        }
        let errors: Vec<String> = self
            .results
            .iter()
            .filter_map(|r| {
                let res = r.result.as_ref()?;
                let mut notes = Vec::new();
                if let Some(e) = &res.first_error {
                    notes.push(format!("{} errors, the first: `{e}`", res.errors));
                }
                if res.reconnects > 0 {
                    notes.push(format!("{} connections re-opened", res.reconnects));
                }
                (!notes.is_empty())
                    .then(|| format!("- {} {}: {}", r.target, r.op.name(), notes.join("; ")))
            })
            .collect();
        if !errors.is_empty() {
            let _ = writeln!(m, "Errors and reconnects:\n\n{}\n", errors.join("\n"));
        }
        let noisy = self.noisy();
        if noisy.is_empty() {
            let _ = writeln!(
                m,
                "The machine was quiet: no measurement saw more than {NOISE_CORES} cores of \"other\" \
                 CPU use.\n"
            );
        } else {
            let _ = writeln!(
                m,
                "**Warning: the machine was not quiet** (more than {NOISE_CORES} cores of \
                 \"other\" CPU use) during: {}. Those rows are unreliable; re-run on an idle \
                 machine.\n",
                noisy.join(", ")
            );
        }

        if !self.normal.is_empty() {
            let _ = writeln!(m, "## Durability\n");
            let _ = writeln!(
                m,
                "After the rows above, the nodes were stopped and started again on the same \
                 files and ports with `--synchronous normal` (an acknowledged write survives a \
                 crash of the process, not of the machine), and the PUT rows ran again. With \
                 `full` (the default) every group commit syncs the WAL, so an acknowledged write \
                 survives power loss too.\n"
            );
            m.push_str(&self.durability_table());
            m.push('\n');
        }
        let _ = writeln!(m, "## Targets (issue 5)\n");
        m.push_str(&self.targets());
        let _ = writeln!(
            m,
            "\n**Caveat.** The load generator runs on the same {} cores as the nodes, the proxy \
             and nginx, and takes a large share of them (see the CPU column), so the absolute \
             numbers are low and say little about a real deployment; the ratios between rows, \
             measured in one run on the same machine, are what counts. \"direct\" is one node \
             process; the proxy and nginx rows spread the keys over {} node processes.\n",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            a.nodes
        );
        if let NginxStatus::Running { config, .. } = self.nginx {
            let _ = writeln!(
                m,
                "## nginx configuration\n\nRun as `nginx -c <tmp>/nginx.conf -p <tmp> -e \
                 <tmp>/error.log -g 'daemon off;'`:\n\n```nginx\n{}```",
                config.replace(&*self.tmp_prefix(config), "<tmp>")
            );
        }
        m
    }

    /// The temp directory as it appears in the nginx config, to elide it in the report.
    fn tmp_prefix(&self, config: &str) -> String {
        config
            .lines()
            .find_map(|l| l.trim().strip_prefix("pid "))
            .and_then(|p| p.strip_suffix("/nginx.pid;"))
            .unwrap_or("<tmp>")
            .to_string()
    }

    fn command(&self) -> String {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let mut cmd = String::from("cargo run --release -p shardlite-examples --example bench");
        if !args.is_empty() {
            cmd.push_str(" -- ");
            cmd.push_str(&args.join(" "));
        }
        cmd
    }
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    Some(String::from_utf8_lossy(&text).trim().to_string()).filter(|s| !s.is_empty())
}

fn git_revision(root: &Path) -> String {
    let root = root.display().to_string();
    let rev = command_output("git", &["-C", &root, "rev-parse", "--short", "HEAD"])
        .unwrap_or_else(|| "?".into());
    let dirty = Command::new("git")
        .args(["-C", &root, "status", "--porcelain", "--untracked-files=no"])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    if dirty {
        format!("{rev} (with uncommitted changes)")
    } else {
        rev
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "?".into())
}

fn mem_total() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            let kb: f64 = s
                .lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some(format!("{:.1} GiB", kb / 1024.0 / 1024.0))
        })
        .unwrap_or_else(|| "?".into())
}

fn os_name() -> String {
    std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_string())
        })
        .unwrap_or_else(|| "?".into())
}
