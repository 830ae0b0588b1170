//! The `shardlite` command line: servers (`node`, `proxy`, `dev`) and admin commands that talk
//! to a running proxy (`status`, `verify`, `migrate`).
//!
//! Every flag also reads an environment variable (`SHARDLITE_...`). Admin commands find the
//! proxy with `--proxy URL`, else `$SHARDLITE_PROXY`, else `http://127.0.0.1:7000`, and print a
//! table, or with `--json` the JSON of the matching endpoint. A failure is one line saying what
//! went wrong and how to mend it, and a non-zero exit.

use crate::admin::{ClusterResponse, StatusResponse, VerifyResponse};
use crate::cluster::{MemberState, NodeInfo};
use crate::error::node_error_message;
use crate::migrate::{MigrateRequest, MigrateResponse, MigrationStatus};
use crate::rebalance::{DryRun, Phase, RebalanceStatus};
use crate::upstream::{Upstream, UpstreamConfig};
use crate::{ProxyConfig, ProxyState, dev};
use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use http::{Method, StatusCode};
use serde::de::DeserializeOwned;
use std::fmt::Write as FmtWrite;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "shardlite",
    version,
    about = "Shard a SQLite-backed service across nodes behind one proxy"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a shard node: serve one SQLite file over HTTP to the proxy.
    Node(NodeArgs),
    /// Run the proxy: route rows to nodes by key, run migrations, serve the admin API.
    Proxy(ProxyArgs),
    /// Run a whole local cluster in one process: the proxy and N nodes, migrations applied.
    Dev(DevArgs),
    /// Apply the migrations in a directory to every shard, or show per-node versions.
    Migrate(MigrateArgs),
    /// List, add or remove nodes.
    #[command(subcommand)]
    Nodes(NodesCommand),
    /// Move rows to their owners under the new ring, with a progress bar.
    Rebalance(RebalanceArgs),
    /// Show nodes, their state, share of the ring, rows, bytes and schema version.
    Status(AdminArgs),
    /// Check that every row lives on exactly its owner; exits 1 if not.
    Verify(AdminArgs),
}

#[derive(Args, Debug)]
pub struct NodeArgs {
    /// Address to listen on.
    #[arg(long, env = "SHARDLITE_NODE_LISTEN", default_value = "127.0.0.1:7001")]
    pub listen: SocketAddr,
    /// The node's SQLite file (created if missing).
    #[arg(long, env = "SHARDLITE_NODE_DB")]
    pub db: PathBuf,
    /// Read-only connections for reads.
    #[arg(long, env = "SHARDLITE_NODE_READERS", default_value_t = 4)]
    pub readers: usize,
    /// Longest time one client statement may run, in milliseconds (504 after it).
    #[arg(long, env = "SHARDLITE_STATEMENT_TIMEOUT_MS", default_value_t = 5000)]
    pub statement_timeout_ms: u64,
    /// How hard a commit is synced: `full` (survives power loss) or `normal` (survives a
    /// process crash; the last commits may roll back on power loss). Default: the node's default.
    #[arg(long, env = "SHARDLITE_SYNCHRONOUS", value_parser = parse_synchronous)]
    pub synchronous: Option<shardlite_node::Synchronous>,
    /// Most MiB of the file read through a memory map, shared by all connections; 0 reads with
    /// pread instead. An I/O error on a mapped read ends the process instead of one request.
    #[arg(long, env = "SHARDLITE_MMAP_MB", default_value_t = shardlite_node::DEFAULT_MMAP_BYTES >> 20)]
    pub mmap_mb: u64,
    /// Answer only requests carrying this secret (the proxy's --cluster-secret); /healthz stays open.
    #[arg(long, env = "SHARDLITE_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,
}

#[derive(Args, Debug)]
pub struct ProxyArgs {
    /// Address to listen on.
    #[arg(long, env = "SHARDLITE_PROXY_LISTEN", default_value = "127.0.0.1:7000")]
    pub listen: SocketAddr,
    /// The proxy's state file: membership, epoch, migrations (created if missing).
    #[arg(long, env = "SHARDLITE_STATE")]
    pub state: PathBuf,
    /// A first member, ID=URL; repeat it. Used only when the state file is new.
    #[arg(long = "node", env = "SHARDLITE_NODES", value_delimiter = ',', value_parser = parse_seed)]
    pub nodes: Vec<(String, String)>,
    /// Virtual nodes per unit of weight; fixed when the state file is created.
    #[arg(long, env = "SHARDLITE_VNODES", default_value_t = shardlite_ring::DEFAULT_VNODES)]
    pub vnodes: u32,
    /// Largest request body in bytes (413 above it).
    #[arg(long, env = "SHARDLITE_MAX_BODY_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// How long a connect to a node may take before it counts as down (503), in milliseconds.
    #[arg(long, env = "SHARDLITE_CONNECT_TIMEOUT_MS", default_value_t = 1000)]
    pub connect_timeout_ms: u64,
    /// How long a call to a node may take before it counts as timed out (504), in milliseconds.
    #[arg(long, env = "SHARDLITE_REQUEST_TIMEOUT_MS", default_value_t = 10_000)]
    pub request_timeout_ms: u64,
    /// Most rows in one batch upsert (400 above it).
    #[arg(long, env = "SHARDLITE_MAX_BATCH_ROWS", default_value_t = 10_000)]
    pub max_batch_rows: usize,
    /// Most statements in one `statements` list (400 above it).
    #[arg(long, env = "SHARDLITE_MAX_STATEMENTS", default_value_t = 1_000)]
    pub max_statements: usize,
    /// Most bytes of one SQL text (400 above it).
    #[arg(long, env = "SHARDLITE_MAX_SQL_BYTES", default_value_t = 1_000_000)]
    pub max_sql_bytes: usize,
    /// Most requests served at once (503 with Retry-After above it).
    #[arg(long, env = "SHARDLITE_MAX_IN_FLIGHT", default_value_t = 4_096)]
    pub max_in_flight: usize,
    /// Threads that serve requests. 1 runs everything on one thread, with no hand-offs
    /// between threads. Default: 1 on a machine with up to 2 cores, else one per core.
    #[arg(long, env = "SHARDLITE_PROXY_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,
    /// Clients of the data API must send `Authorization: Bearer <token>` (off when unset).
    #[arg(long, env = "SHARDLITE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Clients of the admin API (`/v1/cluster`, the admin commands) must send this token.
    #[arg(long, env = "SHARDLITE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Shared with the nodes: the proxy sends it on every call and nodes refuse calls without it.
    #[arg(long, env = "SHARDLITE_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,
    /// Test hook: pause this long at each rebalance step, so a test can kill the proxy there.
    #[arg(
        long,
        env = "SHARDLITE_TEST_REBALANCE_PAUSE_MS",
        default_value_t = 0,
        hide = true
    )]
    pub test_rebalance_pause_ms: u64,
}

impl ProxyArgs {
    pub fn config(&self) -> ProxyConfig {
        let mut config = ProxyConfig::new(&self.state);
        config.seed_nodes = self.nodes.clone();
        config.vnodes = self.vnodes;
        config.max_body_bytes = self.max_body_bytes;
        config.rebalance_step_pause = Duration::from_millis(self.test_rebalance_pause_ms);
        config.limits = crate::server::Limits {
            max_batch_rows: self.max_batch_rows,
            max_statements: self.max_statements,
            max_sql_bytes: self.max_sql_bytes,
            max_in_flight: self.max_in_flight,
            ..crate::server::Limits::default()
        };
        config.upstream = UpstreamConfig {
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            bearer: self.cluster_secret.clone(),
            name_nodes: true,
        };
        config.auth = crate::auth::AuthConfig {
            data_token: self.token.clone(),
            admin_token: self.admin_token.clone(),
        };
        config
    }
}

/// The proxy's threads when `--threads` is not given, on a machine with `cores` cores.
///
/// With up to 2 cores, one: the proxy then shares the cores with its nodes or the clients (as
/// in `shardlite dev`, or in the benchmark), and a multi-threaded runtime hands most requests
/// from thread to thread (a wake-up each) for little work done in parallel. Measured in
/// `examples/examples/bench.rs` on 2 cores (docs/bench.md), one thread took about 30% less of
/// the proxy's CPU per request and served about 20% more PUTs. With more cores, one thread per
/// core (tokio's default), so a proxy on a machine of its own uses it all.
pub fn default_proxy_threads(cores: usize) -> usize {
    if cores <= 2 { 1 } else { cores }
}

/// The async runtime for `command`: the proxy's on its [`ProxyArgs::threads`] (one thread: a
/// current-thread runtime), every other command's on tokio's multi-threaded default.
pub fn runtime(command: &Command) -> std::io::Result<tokio::runtime::Runtime> {
    let threads = match command {
        Command::Proxy(args) => Some(args.runtime_threads()),
        _ => None,
    };
    match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
        None => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    }
}

impl ProxyArgs {
    /// `--threads`, or [`default_proxy_threads`] for this machine.
    pub fn runtime_threads(&self) -> usize {
        self.threads.map_or_else(
            || {
                default_proxy_threads(
                    std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
                )
            },
            usize::from,
        )
    }
}

fn parse_synchronous(text: &str) -> Result<shardlite_node::Synchronous, String> {
    match text.to_ascii_lowercase().as_str() {
        "full" => Ok(shardlite_node::Synchronous::Full),
        "normal" => Ok(shardlite_node::Synchronous::Normal),
        _ => Err(format!("expected full or normal, got {text:?}")),
    }
}

fn parse_seed(text: &str) -> Result<(String, String), String> {
    let (id, url) = text
        .split_once('=')
        .ok_or_else(|| format!("expected ID=URL, e.g. n1=http://127.0.0.1:7001, got {text:?}"))?;
    Ok((id.trim().to_owned(), url.trim().to_owned()))
}

#[derive(Args, Debug)]
pub struct DevArgs {
    /// How many nodes to run.
    #[arg(long, env = "SHARDLITE_DEV_NODES", default_value_t = 3)]
    pub nodes: u16,
    /// Where the SQLite files live; kept across restarts.
    #[arg(long, env = "SHARDLITE_DEV_DATA", default_value = "shardlite-data")]
    pub data: PathBuf,
    /// Migrations applied at start.
    #[arg(long, env = "SHARDLITE_MIGRATIONS", default_value = "migrations")]
    pub migrations: PathBuf,
    /// The proxy's address; node i listens on the next port + i.
    #[arg(long, env = "SHARDLITE_DEV_LISTEN", default_value = "127.0.0.1:7000")]
    pub listen: SocketAddr,
}

#[derive(Args, Debug, Clone)]
pub struct AdminArgs {
    /// The proxy's URL.
    #[arg(long, env = "SHARDLITE_PROXY", default_value = "http://127.0.0.1:7000")]
    pub proxy: String,
    /// Print the endpoint's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The proxy's admin token, if it asks for one.
    #[arg(long, env = "SHARDLITE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum NodesCommand {
    /// List the nodes and their state.
    List(AdminArgs),
    /// Add a node: it joins as `joining`, gets every migration, owns nothing until a rebalance.
    Add {
        /// A name for the node: letters, digits, '.', '_' or '-'.
        id: String,
        /// Where it listens, e.g. http://127.0.0.1:7004.
        url: String,
        /// Its share of the ring relative to the others.
        #[arg(long, env = "SHARDLITE_NODE_WEIGHT", default_value_t = 1)]
        weight: u32,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Mark a node `leaving`: the next rebalance drains it, then it leaves the topology.
    Remove {
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Change a node's share of the ring. A joining node's weight changes at once; an active
    /// node's at the next `shardlite rebalance`, which moves the rows it gains or loses.
    SetWeight {
        id: String,
        /// 1 to 1000, relative to the other nodes' weights.
        weight: u32,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Record a node's new address (it was restarted elsewhere with its file): nothing moves,
    /// and the node there must be the one that served as ID.
    SetUrl {
        id: String,
        /// Where it listens now, e.g. http://10.0.0.7:7001.
        url: String,
        /// Accept a node that has never been claimed as any node (a file from before
        /// shardlite knew node ids). It becomes ID at its next call.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Args, Debug)]
pub struct RebalanceArgs {
    /// Print the plan (rows per source → target, counted) and move nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Return once the job has started instead of waiting for it.
    #[arg(long)]
    pub no_wait: bool,
    /// Stop the running job if it has not switched ownership yet: every row stays with its
    /// old owner, and the sources drop their fences and change logs.
    #[arg(long, conflicts_with = "dry_run")]
    pub cancel: bool,
    #[command(flatten)]
    pub admin: AdminArgs,
}

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The directory of NNNN_name.sql files.
    #[arg(long, env = "SHARDLITE_MIGRATIONS", default_value = "migrations")]
    pub dir: PathBuf,
    /// Show each node's applied versions instead of applying.
    #[arg(long)]
    pub status: bool,
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// Sets up `tracing` from `RUST_LOG` (default `info`), on stderr.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

/// Runs one command; admin output goes to `out`.
pub async fn run(cli: Cli, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Node(args) => run_node(args, out).await,
        Command::Proxy(args) => run_proxy(args, out).await,
        Command::Dev(args) => dev::run(args, out).await,
        Command::Migrate(args) => migrate(args, out).await,
        Command::Nodes(command) => nodes(command, out).await,
        Command::Rebalance(args) => rebalance(args, out).await,
        Command::Status(args) => status(args, out).await,
        Command::Verify(args) => verify(args, out).await,
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

pub async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} for the {what}: is another process using it? pick another address with --listen")
    })
}

async fn run_node(args: NodeArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let mut config = shardlite_node::NodeConfig::new(&args.db);
    config.readers = args.readers.max(1);
    config.statement_timeout = Duration::from_millis(args.statement_timeout_ms);
    config.cluster_secret = args.cluster_secret.clone();
    config.mmap_bytes = args.mmap_mb.saturating_mul(1 << 20);
    if let Some(synchronous) = args.synchronous {
        config.synchronous = synchronous;
    }
    if let Some(dir) = args.db.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the directory {}", dir.display()))?;
    }
    let state = shardlite_node::NodeState::open(config)
        .with_context(|| format!("cannot open the node database {}", args.db.display()))?;
    let listener = bind(args.listen, "node").await?;
    announce(out, "node", &listener)?;
    shardlite_node::serve(listener, state, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

async fn run_proxy(args: ProxyArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let state = ProxyState::open(args.config())
        .with_context(|| format!("cannot open the state file {}", args.state.display()))?;
    tracing::info!(threads = args.runtime_threads(), "proxy runtime");
    let ignored = state.cluster().differing_seeds(&args.nodes);
    if !ignored.is_empty() {
        tracing::warn!(
            ignored = %ignored.join(", "),
            "--node flags count only when the state file is new, and these differ from its \
             members (`shardlite nodes list`); change membership with `shardlite nodes add` and \
             `nodes remove`"
        );
    }
    let listener = bind(args.listen, "proxy").await?;
    announce(out, "proxy", &listener)?;
    crate::serve(listener, state, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// The first line a server prints, `shardlite node listening on http://127.0.0.1:7001`: with
/// `--listen 127.0.0.1:0` it is how scripts and tests learn the port.
fn announce(
    out: &mut dyn Write,
    what: &str,
    listener: &tokio::net::TcpListener,
) -> anyhow::Result<()> {
    writeln!(
        out,
        "shardlite {what} listening on http://{}",
        listener.local_addr()?
    )?;
    out.flush()?;
    Ok(())
}

/// A small client for the proxy's admin API.
pub struct AdminClient {
    upstream: Upstream,
    base: String,
}

impl AdminClient {
    pub fn new(admin: &AdminArgs) -> anyhow::Result<AdminClient> {
        let proxy = admin.proxy.as_str();
        let base = crate::cluster::normalize_url(proxy)
            .map_err(|e| anyhow::anyhow!("--proxy / SHARDLITE_PROXY: {}", e.message()))?;
        let upstream = Upstream::new(UpstreamConfig {
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(3600),
            bearer: admin.admin_token.clone(),
            name_nodes: false,
        });
        Ok(AdminClient { upstream, base })
    }

    /// Sends a request; returns the status and the body of any answer, 4xx and 5xx included.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<(StatusCode, bytes::Bytes)> {
        let reply = self
            .upstream
            .call("proxy", method, &self.base, path, body.map(Into::into))
            .await
            .map_err(|e| {
                // The upstream client names its peer a node; here it is the proxy.
                let why = match e {
                    crate::error::ProxyError::ShardUnavailable { reason, .. }
                    | crate::error::ProxyError::ShardBrokeOff { reason, .. } => reason,
                    crate::error::ProxyError::ShardTimeout { after, .. } => {
                        format!("no answer within {} s", after.as_secs())
                    }
                    other => other.message(),
                };
                anyhow::anyhow!(
                    "cannot reach the proxy at {}: {why}. Is it running? Start one with \
                     `shardlite dev`, or point to it with --proxy URL or SHARDLITE_PROXY",
                    self.base,
                )
            })?;
        Ok((reply.status, reply.body))
    }

    /// Sends a request and decodes a successful answer; an error answer becomes its message.
    pub async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<T> {
        let (status, body) = self.send(method, path, body).await?;
        if !status.is_success() {
            bail!("{} (HTTP {status})", node_error_message("proxy", &body));
        }
        serde_json::from_slice(&body)
            .with_context(|| format!("the proxy at {} sent an unexpected answer", self.base))
    }
}

fn print_json(out: &mut dyn Write, value: &impl serde::Serialize) -> anyhow::Result<()> {
    writeln!(out, "{}", serde_json::to_string_pretty(value)?)?;
    Ok(())
}

/// 1536 → "1.5 KiB".
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Left-aligned columns, two spaces apart.
pub fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut text = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| format!("{cell:<width$}", width = widths[c]))
            .collect();
        text.push_str(line.join("  ").trim_end());
        text.push('\n');
    }
    text
}

async fn status(args: AdminArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let client = AdminClient::new(&args)?;
    let status: StatusResponse = client.json(Method::GET, "/v1/cluster/status", None).await?;
    if args.json {
        print_json(out, &status)?;
        return Ok(ExitCode::SUCCESS);
    }
    let job = &status.rebalance;
    writeln!(
        out,
        "epoch {}  schema version {}  rebalance {}{}",
        status.epoch,
        status.schema_version,
        job.state,
        if job.state == "running" {
            format!(" ({} of {} rows moved)", job.rows_moved, job.rows_to_move)
        } else {
            String::new()
        }
    )?;
    let mut rows = vec![
        [
            "ID", "STATE", "WEIGHT", "SHARE", "ROWS", "BYTES", "SCHEMA", "URL",
        ]
        .map(String::from)
        .to_vec(),
    ];
    let mut problems = Vec::new();
    for n in &status.nodes {
        let schema = match n.schema_version {
            Some(v) if v < status.schema_version => format!("{v} (lagging)"),
            Some(v) => v.to_string(),
            None => "?".into(),
        };
        rows.push(vec![
            n.node.id.clone(),
            if n.reachable {
                n.node.state.as_str().to_owned()
            } else {
                format!("{} (down)", n.node.state.as_str())
            },
            weight_cell(&n.node),
            format!("{:.1}%", n.share * 100.0),
            n.rows.map_or("?".into(), |r| r.to_string()),
            n.bytes.map_or("?".into(), human_bytes),
            schema,
            n.node.url.clone(),
        ]);
        if let Some(error) = &n.error {
            problems.push(format!("{}: {error}", n.node.id));
        }
    }
    write!(out, "{}", table(&rows))?;
    for problem in problems {
        writeln!(out, "! {problem}")?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn verify(args: AdminArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let client = AdminClient::new(&args)?;
    let report: VerifyResponse = client.json(Method::GET, "/v1/cluster/verify", None).await?;
    let ok = report.misplaced == 0 && report.duplicates == 0;
    if args.json {
        print_json(out, &report)?;
    } else {
        let mut rows = vec![["NODE", "ROWS", "MISPLACED"].map(String::from).to_vec()];
        for (id, n) in &report.nodes {
            rows.push(vec![
                id.clone(),
                n.rows.to_string(),
                n.misplaced.to_string(),
            ]);
        }
        write!(out, "{}", table(&rows))?;
        writeln!(
            out,
            "{} {}, {} misplaced, {} duplicated keys: {}",
            report.rows_total,
            if report.rows_total == 1 {
                "row"
            } else {
                "rows"
            },
            report.misplaced,
            report.duplicates,
            if ok {
                "every row lives on exactly its owner"
            } else {
                "NOT OK"
            }
        )?;
        for (id, node) in &report.nodes {
            for row in &node.examples {
                writeln!(
                    out,
                    "misplaced: {} {} on {id} (its owner is {})",
                    row.table, row.key, row.owner
                )?;
            }
        }
        if let Some(hint) = &report.hint {
            writeln!(out, "{hint}")?;
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn migrate(args: MigrateArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let client = AdminClient::new(&args.admin)?;
    if args.status {
        let status: MigrationStatus = client
            .json(Method::GET, "/v1/cluster/migrations", None)
            .await?;
        if args.admin.json {
            print_json(out, &status)?;
        } else {
            write!(out, "{}", migration_matrix(&status))?;
        }
        return Ok(if status.lagging.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        });
    }
    let set = crate::migrate::read_dir(&args.dir).map_err(anyhow::Error::msg)?;
    if set.is_empty() {
        bail!(
            "no migrations in {}: add files named NNNN_name.sql, or point to them with --dir",
            args.dir.display()
        );
    }
    let body = serde_json::to_vec(&MigrateRequest { migrations: set })?;
    let (code, body) = client
        .send(Method::POST, "/v1/cluster/migrations", Some(body))
        .await?;
    let Ok(response) = serde_json::from_slice::<MigrateResponse>(&body) else {
        bail!("{} (HTTP {code})", node_error_message("proxy", &body));
    };
    if args.admin.json {
        print_json(out, &response)?;
    } else {
        let mut rows = vec![
            ["NODE", "VERSION", "APPLIED NOW", "ERROR"]
                .map(String::from)
                .to_vec(),
        ];
        for (id, n) in &response.nodes {
            rows.push(vec![
                id.clone(),
                n.version.map_or("?".into(), |v| v.to_string()),
                if n.applied.is_empty() {
                    "-".into()
                } else {
                    n.applied
                        .iter()
                        .map(i64::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                },
                n.error.clone().unwrap_or_default(),
            ]);
        }
        write!(out, "{}", table(&rows))?;
    }
    if let Some(error) = &response.error {
        bail!("{error}");
    }
    if !args.admin.json {
        writeln!(out, "every node is at version {}", response.version)?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn nodes(command: NodesCommand, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    match command {
        NodesCommand::List(admin) => {
            let client = AdminClient::new(&admin)?;
            let cluster: ClusterResponse = client.json(Method::GET, "/v1/cluster", None).await?;
            if admin.json {
                print_json(out, &cluster.nodes)?;
            } else {
                write!(out, "{}", node_table(&cluster.nodes))?;
                writeln!(out, "epoch {}", cluster.epoch)?;
            }
        }
        NodesCommand::Add {
            id,
            url,
            weight,
            admin,
        } => {
            let client = AdminClient::new(&admin)?;
            let body = serde_json::json!({ "id": id, "url": url, "weight": weight });
            let added: serde_json::Value = client
                .json(
                    Method::POST,
                    "/v1/cluster/nodes",
                    Some(serde_json::to_vec(&body)?),
                )
                .await
                .with_context(|| format!("cannot add node {id}"))?;
            if admin.json {
                print_json(out, &added)?;
            } else {
                writeln!(
                    out,
                    "node {id} joined at {url} (schema version {}); it owns nothing until \
                     `shardlite rebalance`",
                    added["schema_version"]
                )?;
            }
        }
        NodesCommand::Remove { id, admin } => {
            let client = AdminClient::new(&admin)?;
            let removed: serde_json::Value = client
                .json(Method::DELETE, &format!("/v1/cluster/nodes/{id}"), None)
                .await
                .with_context(|| format!("cannot remove node {id}"))?;
            if admin.json {
                print_json(out, &removed)?;
            } else if removed["state"] == "removed" {
                writeln!(out, "node {id} owned nothing yet and has left")?;
            } else {
                writeln!(
                    out,
                    "node {id} is leaving; `shardlite rebalance` moves its rows away, then it leaves"
                )?;
            }
        }
        NodesCommand::SetWeight { id, weight, admin } => {
            let client = AdminClient::new(&admin)?;
            let node: NodeInfo = client
                .json(
                    Method::PATCH,
                    &format!("/v1/cluster/nodes/{id}"),
                    Some(serde_json::to_vec(
                        &serde_json::json!({ "weight": weight }),
                    )?),
                )
                .await
                .with_context(|| format!("cannot set node {id}'s weight"))?;
            if admin.json {
                print_json(out, &node)?;
            } else if let Some(next) = node.next_weight {
                writeln!(
                    out,
                    "node {id} goes from weight {} to {next} at the next `shardlite rebalance`, \
                     which moves the rows it gains or loses (`shardlite rebalance --dry-run` \
                     counts them)",
                    node.weight
                )?;
            } else if node.state == MemberState::Joining {
                writeln!(
                    out,
                    "node {id} has weight {}; it owns nothing until `shardlite rebalance`",
                    node.weight
                )?;
            } else {
                writeln!(
                    out,
                    "node {id} has weight {}; no change is pending",
                    node.weight
                )?;
            }
        }
        NodesCommand::SetUrl {
            id,
            url,
            force,
            admin,
        } => {
            let client = AdminClient::new(&admin)?;
            let moved: serde_json::Value = client
                .json(
                    Method::PATCH,
                    &format!("/v1/cluster/nodes/{id}"),
                    Some(serde_json::to_vec(
                        &serde_json::json!({ "url": url, "force": force }),
                    )?),
                )
                .await
                .with_context(|| format!("cannot set node {id}'s address"))?;
            if admin.json {
                print_json(out, &moved)?;
            } else {
                writeln!(
                    out,
                    "node {id} is now at {}; it owns what it owned",
                    moved["url"].as_str().unwrap_or(&url)
                )?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn node_table(nodes: &[NodeInfo]) -> String {
    let mut rows = vec![["ID", "STATE", "WEIGHT", "URL"].map(String::from).to_vec()];
    for n in nodes {
        rows.push(vec![
            n.id.clone(),
            n.state.as_str().to_owned(),
            weight_cell(n),
            n.url.clone(),
        ]);
    }
    table(&rows)
}

/// A node's weight, and the one the next rebalance gives it: `1 -> 3`.
fn weight_cell(node: &NodeInfo) -> String {
    match node.next_weight {
        Some(next) => format!("{} -> {next}", node.weight),
        None => node.weight.to_string(),
    }
}

async fn rebalance(args: RebalanceArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let client = AdminClient::new(&args.admin)?;
    if args.dry_run {
        let plan: DryRun = client
            .json(Method::POST, "/v1/cluster/rebalance?dry_run=true", None)
            .await?;
        if args.admin.json {
            print_json(out, &plan)?;
        } else {
            if plan.moves.is_empty()
                && plan.joining.is_empty()
                && plan.leaving.is_empty()
                && plan.weights.is_empty()
            {
                writeln!(
                    out,
                    "nothing would move: no node is joining or leaving and no weight changes, \
                     so the ring stays as it is ({} rows); nothing was changed",
                    plan.rows_total
                )?;
                return Ok(ExitCode::SUCCESS);
            }
            let mut rows = vec![["FROM", "TO", "ROWS"].map(String::from).to_vec()];
            for m in &plan.moves {
                rows.push(vec![m.from.clone(), m.to.clone(), m.rows.to_string()]);
            }
            write!(out, "{}", table(&rows))?;
            let weights: Vec<String> = plan
                .weights
                .iter()
                .map(|w| format!("{} {} -> {}", w.id, w.weight, w.next_weight))
                .collect();
            writeln!(
                out,
                "{} of {} rows would move{}{}{}; nothing was changed",
                plan.rows_to_move,
                plan.rows_total,
                if plan.joining.is_empty() {
                    String::new()
                } else {
                    format!("; joining: {}", plan.joining.join(", "))
                },
                if plan.leaving.is_empty() {
                    String::new()
                } else {
                    format!("; leaving: {}", plan.leaving.join(", "))
                },
                if weights.is_empty() {
                    String::new()
                } else {
                    format!("; weights: {}", weights.join(", "))
                },
            )?;
            let shares: Vec<String> = plan
                .shares
                .iter()
                .map(|(id, s)| format!("{id} {:.1}% -> {:.1}%", s.now * 100.0, s.after * 100.0))
                .collect();
            writeln!(out, "ring shares: {}", shares.join(", "))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    if args.cancel {
        return cancel(&client, &args, out).await;
    }
    let (code, body) = client
        .send(Method::POST, "/v1/cluster/rebalance", None)
        .await?;
    if code == StatusCode::CONFLICT {
        // A job already runs (perhaps resumed after a restart): wait for it.
        let current: RebalanceStatus = client
            .json(Method::GET, "/v1/cluster/rebalance", None)
            .await?;
        if current.state != "running" {
            bail!("{} (HTTP {code})", node_error_message("proxy", &body));
        }
        writeln!(out, "a rebalance is already running; waiting for it")?;
    } else if !code.is_success() {
        bail!("{} (HTTP {code})", node_error_message("proxy", &body));
    }
    if args.no_wait {
        let status: RebalanceStatus = client
            .json(Method::GET, "/v1/cluster/rebalance", None)
            .await?;
        if args.admin.json {
            print_json(out, &status)?;
        } else {
            writeln!(
                out,
                "rebalance {} started: {} rows to move; follow it with `shardlite status`",
                status.id.unwrap_or_default(),
                status.rows_to_move
            )?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let status = follow(&client, out, args.admin.json).await?;
    if args.admin.json {
        print_json(out, &status)?;
    }
    if status.state == "done" {
        if !args.admin.json {
            writeln!(
                out,
                "rebalance done: {} rows moved, {} old copies deleted; longest write pause {} ms",
                status.rows_moved,
                status.rows_cleaned.unwrap_or(0),
                status.pause_ms.unwrap_or(0)
            )?;
        }
        Ok(ExitCode::SUCCESS)
    } else {
        bail!(
            "the rebalance failed: {}; ownership is unchanged, fix the cause and run \
             `shardlite rebalance` again",
            status.error.unwrap_or_else(|| "no reason given".into())
        )
    }
}

/// `shardlite rebalance --cancel`: asks the job to stop, then (unless `--no-wait`) waits for it.
async fn cancel(
    client: &AdminClient,
    args: &RebalanceArgs,
    out: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    let (code, body) = client
        .send(Method::DELETE, "/v1/cluster/rebalance", None)
        .await?;
    if !code.is_success() {
        bail!("{} (HTTP {code})", node_error_message("proxy", &body));
    }
    let status = if args.no_wait {
        client
            .json(Method::GET, "/v1/cluster/rebalance", None)
            .await?
    } else {
        follow(client, out, args.admin.json).await?
    };
    if args.admin.json {
        print_json(out, &status)?;
    } else if status.state == "running" {
        writeln!(
            out,
            "cancel asked; the job stops at its next step (follow it with `shardlite status`)"
        )?;
    } else if status.state == "done" {
        writeln!(
            out,
            "the rebalance switched ownership before it could stop, and finished: {} rows moved",
            status.rows_moved
        )?;
    } else {
        writeln!(
            out,
            "rebalance stopped: {}",
            status.error.unwrap_or_else(|| "no reason given".into())
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Polls the job until it ends: a progress bar on a terminal, a line per second otherwise.
async fn follow(
    client: &AdminClient,
    out: &mut dyn Write,
    quiet: bool,
) -> anyhow::Result<RebalanceStatus> {
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout()) && !quiet;
    let mut bar = terminal.then(|| JobBar::new(indicatif::ProgressDrawTarget::stderr()));
    let mut lines = PlainLines::default();
    loop {
        let status: RebalanceStatus = client
            .json(Method::GET, "/v1/cluster/rebalance", None)
            .await?;
        if let Some(bar) = &mut bar {
            bar.show(&status);
        } else if !quiet {
            let line = plain_line(&status);
            if lines.due(&line, std::time::Instant::now()) {
                writeln!(out, "{line}")?;
            }
        }
        if status.state != "running" {
            if let Some(bar) = bar {
                bar.finish();
            }
            return Ok(status);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A job's phase as the API names it (`copy`, `fenced`, `committed`), or "".
fn phase_name(status: &RebalanceStatus) -> String {
    status
        .phase
        .map(|p| format!("{p:?}").to_lowercase())
        .unwrap_or_default()
}

/// A progress line for a job followed without a terminal.
fn plain_line(status: &RebalanceStatus) -> String {
    format!(
        "{}: {} of {} rows moved ({}){}{}",
        status.state,
        status.rows_moved,
        status.rows_to_move,
        phase_name(status),
        if status.phase == Some(Phase::Committed) {
            format!(", {} old copies deleted", status.rows_cleaned.unwrap_or(0))
        } else {
            String::new()
        },
        status
            .error
            .as_deref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default()
    )
}

/// The progress bar of a followed job: rows moved of the total until the switch, then, started
/// over, the old copies the clean-up deletes.
struct JobBar {
    bar: indicatif::ProgressBar,
    /// Where the bar is drawn once it knows the job's size: hidden until then, since a bar of
    /// length 0 is drawn full.
    target: Option<indicatif::ProgressDrawTarget>,
    /// The last status shown was after the switch.
    cleaning: bool,
}

impl JobBar {
    fn new(target: indicatif::ProgressDrawTarget) -> JobBar {
        let bar = indicatif::ProgressBar::hidden();
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} {msg}  {rate}  ETA {left}",
            )
            .expect("a valid template")
            .with_key("rate", rate_key)
            .with_key("left", left_key),
        );
        JobBar {
            bar,
            target: Some(target),
            cleaning: false,
        }
    }

    fn show(&mut self, status: &RebalanceStatus) {
        let committed = status.phase == Some(Phase::Committed);
        let (done, label) = if committed {
            (
                status.rows_cleaned.unwrap_or(0),
                "old copies deleted (clean-up)".to_owned(),
            )
        } else {
            (
                status.rows_moved,
                format!("rows moved ({})", phase_name(status)),
            )
        };
        self.bar.set_message(match &status.error {
            Some(e) => format!("{label}: {e}"),
            None => label,
        });
        if committed && !self.cleaning {
            self.bar.reset();
        }
        self.bar
            .set_length(status.rows_to_move.max(status.rows_moved).max(done));
        if let Some(target) = self.target.take() {
            // The size is known now; the position below draws the first frame.
            self.bar.set_draw_target(target);
        }
        self.bar.set_position(done);
        self.cleaning = committed;
    }

    fn finish(self) {
        self.bar.finish_and_clear();
    }
}

/// The progress bar's `{rate}`: whole rows per second (indicatif's `per_sec` prints four
/// decimals).
fn rate_key(state: &indicatif::ProgressState, w: &mut dyn FmtWrite) {
    if settling(state) {
        let _ = w.write_str("- rows/s");
    } else {
        let _ = write!(w, "{:.0} rows/s", state.per_sec());
    }
}

/// The progress bar's `{left}`: the time left at the current rate.
fn left_key(state: &indicatif::ProgressState, w: &mut dyn FmtWrite) {
    if settling(state) {
        let _ = w.write_str("-");
    } else {
        let _ = write!(w, "{:#}", indicatif::HumanDuration(state.eta()));
    }
}

/// Whether the bar's phase is too young for a rate: the bar starts over at the switch, and its
/// first readings there said hundreds of millions of rows per second, or hours left.
fn settling(state: &indicatif::ProgressState) -> bool {
    state.elapsed() < Duration::from_millis(1000) || state.pos() == 0
}

/// When a progress line goes out without a terminal: at most one a second, and the same line
/// again only every 10 s (a job that waits for a node would otherwise repeat it every second).
#[derive(Default)]
struct PlainLines {
    last: Option<(String, std::time::Instant)>,
}

impl PlainLines {
    const EVERY: Duration = Duration::from_secs(1);
    const SAME_EVERY: Duration = Duration::from_secs(10);

    fn due(&mut self, line: &str, now: std::time::Instant) -> bool {
        let due = match &self.last {
            None => true,
            Some((last, at)) => {
                let since = now.saturating_duration_since(*at);
                since >= Self::SAME_EVERY || (since >= Self::EVERY && last != line)
            }
        };
        if due {
            self.last = Some((line.to_owned(), now));
        }
        due
    }
}

/// Nodes down, versions across: `✓` applied, `·` not yet, `✗` applied with another checksum.
pub fn migration_matrix(status: &MigrationStatus) -> String {
    let mut header = vec!["NODE".to_owned()];
    header.extend(status.migrations.iter().map(|m| m.version.to_string()));
    header.push("STATUS".into());
    let mut rows = vec![header];
    for (id, ledger) in &status.nodes {
        let mut row = vec![id.clone()];
        for known in &status.migrations {
            let cell = match ledger.applied.iter().find(|a| a.version == known.version) {
                Some(a) if a.checksum == known.checksum => "✓",
                Some(_) => "✗",
                None => "·",
            };
            row.push(cell.into());
        }
        row.push(match &ledger.error {
            Some(e) => format!("unreachable: {e}"),
            None if status.lagging.contains(id) => "lagging".into(),
            None => "ok".into(),
        });
        rows.push(row);
    }
    let mut text = table(&rows);
    for m in &status.migrations {
        text.push_str(&format!("{:>4}  {}\n", m.version, m.name));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_proxy_runs_on_one_thread_on_small_machines_and_on_threads_asked_for() {
        assert_eq!(default_proxy_threads(1), 1);
        assert_eq!(default_proxy_threads(2), 1);
        assert_eq!(default_proxy_threads(4), 4);
        assert_eq!(default_proxy_threads(16), 16);

        let flavor = |args: &[&str]| {
            let cli = Cli::try_parse_from(args).unwrap();
            runtime(&cli.command).unwrap().handle().runtime_flavor()
        };
        let proxy = ["shardlite", "proxy", "--state", "p.db", "--threads"];
        assert_eq!(
            flavor(&[&proxy[..], &["1"]].concat()),
            tokio::runtime::RuntimeFlavor::CurrentThread
        );
        assert_eq!(
            flavor(&[&proxy[..], &["3"]].concat()),
            tokio::runtime::RuntimeFlavor::MultiThread
        );
        let cli = Cli::try_parse_from([&proxy[..], &["3"]].concat()).unwrap();
        let Command::Proxy(args) = &cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(args.runtime_threads(), 3);
        // Other commands keep tokio's multi-threaded default.
        assert_eq!(
            flavor(&["shardlite", "status"]),
            tokio::runtime::RuntimeFlavor::MultiThread
        );
        let err = Cli::try_parse_from([&proxy[..], &["0"]].concat()).unwrap_err();
        assert!(err.to_string().contains("1..=1024"), "{err}");
    }

    #[test]
    fn a_plain_progress_line_repeats_only_every_ten_seconds() {
        let start = std::time::Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let mut lines = PlainLines::default();
        assert!(lines.due("copy 0", at(0)), "the first line goes out");
        assert!(!lines.due("copy 5", at(500)), "at most one a second");
        assert!(lines.due("copy 5", at(1_000)), "a new line after a second");
        assert!(
            !lines.due("copy 5", at(2_000)),
            "the same line is not repeated"
        );
        assert!(!lines.due("copy 5", at(10_999)));
        assert!(lines.due("copy 5", at(11_000)), "but is, every 10 s");
        assert!(lines.due("copy 9", at(12_000)));
    }

    fn job(phase: Phase, moved: u64, cleaned: Option<u64>) -> RebalanceStatus {
        RebalanceStatus {
            state: "running".into(),
            rows_moved: moved,
            rows_to_move: 10_000,
            phase: Some(phase),
            rows_cleaned: cleaned,
            ..RebalanceStatus::idle()
        }
    }

    /// The bar as a terminal shows it: drawn into indicatif's in-memory terminal.
    #[test]
    fn the_bar_waits_for_a_size_and_a_rate_and_starts_over_at_the_switch() {
        let term = indicatif::InMemoryTerm::new(2, 120);
        let mut bar = JobBar::new(indicatif::ProgressDrawTarget::term_like_with_hz(
            Box::new(term.clone()),
            100,
        ));
        assert_eq!(
            term.contents(),
            "",
            "nothing is drawn before the first status"
        );

        bar.show(&job(Phase::Copy, 0, None));
        let first = term.contents();
        assert!(first.contains(" 0/10000 rows moved (copy)"), "{first}");
        assert!(first.contains("- rows/s  ETA -"), "no rate yet: {first}");

        std::thread::sleep(Duration::from_millis(1_100));
        bar.show(&job(Phase::Copy, 5_000, None));
        let copying = term.contents();
        assert!(
            copying.contains(" 5000/10000 rows moved (copy)"),
            "{copying}"
        );
        let rate = copying
            .split("rows/s")
            .next()
            .and_then(|head| head.split_whitespace().last())
            .unwrap_or_default();
        assert!(
            rate.parse::<u64>().is_ok_and(|r| r > 0),
            "a rate in whole rows per second once a second has passed: {copying}"
        );
        assert!(!copying.contains("ETA -"), "{copying}");

        // The switch: the bar starts over for the clean-up, with no rate from the copy's
        // clock (it once read hundreds of millions of rows per second here).
        bar.show(&job(Phase::Committed, 10_000, Some(300)));
        let cleaning = term.contents();
        assert!(
            cleaning.contains(" 300/10000 old copies deleted (clean-up)"),
            "{cleaning}"
        );
        assert!(cleaning.contains("- rows/s  ETA -"), "{cleaning}");

        bar.show(&RebalanceStatus {
            error: Some("retrying: node n2 is unavailable".into()),
            ..job(Phase::Committed, 10_000, Some(400))
        });
        let retrying = term.contents();
        assert!(
            retrying.contains("old copies deleted (clean-up): retrying: node n2 is unavailable"),
            "{retrying}"
        );
        bar.finish();
        assert_eq!(term.contents(), "", "the bar is cleared at the end");
    }

    #[test]
    fn a_plain_progress_line_says_the_phase_and_the_clean_up() {
        assert_eq!(
            plain_line(&job(Phase::Copy, 2_500, None)),
            "running: 2500 of 10000 rows moved (copy)"
        );
        assert_eq!(
            plain_line(&RebalanceStatus {
                error: Some("retrying: node n2 is unavailable".into()),
                ..job(Phase::Committed, 10_000, Some(700))
            }),
            "running: 10000 of 10000 rows moved (committed), 700 old copies deleted: \
             retrying: node n2 is unavailable"
        );
    }

    #[test]
    fn admin_flags_are_taken_after_the_subcommand() {
        let cli = Cli::try_parse_from(["shardlite", "status", "--proxy", "http://h:1", "--json"])
            .unwrap();
        match cli.command {
            Command::Status(args) => {
                assert_eq!(args.proxy, "http://h:1");
                assert!(args.json);
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    /// Every server binds to the loopback address unless told otherwise.
    #[test]
    fn servers_listen_on_loopback_by_default() {
        let listen = |args: &[&str]| match Cli::try_parse_from(args).unwrap().command {
            Command::Node(a) => a.listen,
            Command::Proxy(a) => a.listen,
            Command::Dev(a) => a.listen,
            other => panic!("parsed as {other:?}"),
        };
        for args in [
            &["shardlite", "node", "--db", "n.db"][..],
            &["shardlite", "proxy", "--state", "p.db"],
            &["shardlite", "dev"],
        ] {
            assert!(listen(args).ip().is_loopback(), "{args:?}");
        }
    }

    #[test]
    fn seeds_are_id_equals_url() {
        assert_eq!(
            parse_seed("n1=http://127.0.0.1:7001").unwrap(),
            ("n1".into(), "http://127.0.0.1:7001".into())
        );
        assert!(parse_seed("http://127.0.0.1:7001").is_err());
    }

    #[test]
    fn bytes_read_as_people_write_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024), "3.0 MiB");
    }
}
