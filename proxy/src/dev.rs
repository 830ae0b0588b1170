//! `shardlite dev`: a whole local cluster in one process, for trying shardlite out.
//!
//! The proxy listens on 127.0.0.1:7000 and node i on port 7000 + i. The SQLite files and the
//! proxy's state live in `--data` (default `shardlite-data/`), so a restart keeps the data. The
//! migrations in `--migrations` are applied at start through the same path as
//! `shardlite migrate`.

use crate::cli::{DevArgs, bind, shutdown_signal};
use crate::{ProxyConfig, ProxyState, migrate};
use anyhow::{Context, bail};
use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use tokio::sync::watch;

pub async fn run(args: DevArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    if args.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    std::fs::create_dir_all(&args.data)
        .with_context(|| format!("cannot create the data directory {}", args.data.display()))?;
    let (stop, stopped) = watch::channel(false);
    let stopped_future = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };

    let mut seeds = Vec::new();
    let mut servers = Vec::new();
    for i in 1..=args.nodes {
        let port = args.listen.port().checked_add(i).with_context(|| {
            format!(
                "port {} + {i} is past 65535: pick a lower --listen port",
                args.listen.port()
            )
        })?;
        let addr = SocketAddr::new(args.listen.ip(), port);
        let listener = bind(addr, &format!("node n{i}")).await?;
        let db = args.data.join(format!("n{i}.db"));
        let state = shardlite_node::NodeState::open(shardlite_node::NodeConfig::new(&db))
            .with_context(|| format!("cannot open {}", db.display()))?;
        servers.push(tokio::spawn(shardlite_node::serve(
            listener,
            state,
            stopped_future(),
        )));
        seeds.push((format!("n{i}"), format!("http://{addr}")));
    }

    let mut config = ProxyConfig::new(args.data.join("proxy.db"));
    config.seed_nodes = seeds.clone();
    let proxy = ProxyState::open(config).context("cannot open the proxy's state file")?;
    // Started before on other ports (another --listen): node n1 is still n1.db, now here.
    for moved in proxy
        .cluster()
        .adopt_seed_urls(&seeds)
        .context("cannot record the nodes' new addresses")?
    {
        writeln!(out, "moved  {moved}")?;
    }
    // A member this `dev` did not start was added by hand or left from a run with more --nodes.
    let started_here = |id: &str| seeds.iter().any(|(seed, _)| seed == id);
    let listener = bind(args.listen, "proxy").await?;

    // The nodes only, not the topology snapshot: a rebalance's switch waits until nobody holds
    // the old snapshot any more, and this function lives as long as the cluster.
    let nodes = proxy.cluster().topology().nodes.clone();
    if args.migrations.is_dir() {
        let set = migrate::read_dir(&args.migrations).map_err(anyhow::Error::msg)?;
        let _job = proxy.jobs().begin("the start-up migration")?;
        let (_, outcome) = migrate::apply(&proxy, &set).await.map_err(|e| {
            anyhow::anyhow!(
                "migrations in {}: {}",
                args.migrations.display(),
                e.message()
            )
        })?;
        // Members this `dev` did not start that did not answer (left from a run with more
        // --nodes, say) do not stop it: they are reported down below, and `shardlite migrate`
        // brings them up to date once they run. Any other failure does.
        let unreachable_elsewhere: Vec<&String> = outcome
            .lagging
            .iter()
            .filter(|id| {
                !started_here(id) && outcome.nodes.get(*id).is_none_or(|n| n.version.is_none())
            })
            .collect();
        match &outcome.error {
            Some(error) if unreachable_elsewhere.len() < outcome.lagging.len() => {
                bail!("migrations in {}: {error}", args.migrations.display());
            }
            Some(_) => writeln!(
                out,
                "schema: {} migration(s) from {}, every node dev started at version {}; not reached: {}",
                set.len(),
                args.migrations.display(),
                outcome.version,
                unreachable_elsewhere
                    .iter()
                    .map(|id| id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )?,
            None => writeln!(
                out,
                "schema: {} migration(s) from {}, every node at version {}",
                set.len(),
                args.migrations.display(),
                outcome.version
            )?,
        }
    } else {
        writeln!(
            out,
            "schema: no {} directory here, so no migrations applied at start; add NNNN_name.sql \
             files and run `shardlite migrate --dir DIR`",
            args.migrations.display()
        )?;
    }

    let proxy_url = format!("http://{}", listener.local_addr()?);
    writeln!(
        out,
        "proxy  {proxy_url}   (data in {})",
        args.data.display()
    )?;
    for node in &nodes {
        // A member this `dev` did not start is served only if something else runs it.
        writeln!(
            out,
            "node   {}  {}  {}{}",
            node.id,
            node.url,
            node.state.as_str(),
            if started_here(&node.id) {
                ""
            } else {
                "  (not started by dev: its keys get 503 unless it runs there)"
            }
        )?;
    }
    let host = proxy_url.trim_start_matches("http://");
    // What to try depends on the tables there are: the sample schema's `users`, some other
    // schema, or none yet (no migrations directory where `dev` was started).
    let tables: Result<Vec<String>, String> = {
        let topology = proxy.cluster().topology();
        match proxy.schema().refresh(&topology, proxy.upstream()).await {
            Ok(()) => Ok(proxy
                .schema()
                .all()
                .iter()
                .map(|t| t.name.clone())
                .collect()),
            Err(e) => Err(e.message()),
        }
    };
    // The CLI finds the proxy at its default address by itself; elsewhere it must be told.
    let to_proxy = if host == "127.0.0.1:7000" {
        String::new()
    } else {
        format!(" --proxy {proxy_url}")
    };
    writeln!(out, "\ntry:")?;
    match tables.as_deref() {
        // No node answered (members the state file holds that `dev` did not start, say): what
        // there is to try is unknown; status shows which node is down.
        Err(e) => writeln!(out, "  (no node answered for the schema: {e})")?,
        Ok(tables) if tables.iter().any(|t| t == "users") => {
            writeln!(
                out,
                "  curl -X PUT {host}/v1/tables/users/rows/alice -d '{{\"name\":\"Alice\",\"email\":\"alice@example.com\"}}'"
            )?;
            writeln!(out, "  curl {host}/v1/tables/users/rows/alice")?;
            writeln!(
                out,
                "  curl -X POST {host}/v1/sql -d '{{\"sql\":\"SELECT id, name FROM users\"}}'"
            )?;
        }
        Ok([table, ..]) => {
            writeln!(
                out,
                "  curl -X POST {host}/v1/sql -d '{{\"sql\":\"SELECT * FROM {table} LIMIT 5\"}}'"
            )?;
            writeln!(out, "  curl {host}/v1/cluster")?;
        }
        Ok([]) => {
            writeln!(out, "  mkdir -p migrations")?;
            writeln!(
                out,
                "  echo 'CREATE TABLE kv (id TEXT PRIMARY KEY, v TEXT);' > migrations/0001_kv.sql"
            )?;
            writeln!(out, "  shardlite migrate --dir migrations{to_proxy}")?;
            writeln!(
                out,
                "  curl -X PUT {host}/v1/tables/kv/rows/a -d '{{\"v\":\"hello\"}}'"
            )?;
            writeln!(out, "  curl {host}/v1/tables/kv/rows/a")?;
        }
    }
    writeln!(out, "  shardlite status{to_proxy}")?;
    writeln!(
        out,
        "\nCtrl-C stops the cluster; the data stays in {}.",
        args.data.display()
    )?;
    out.flush()?;

    let served = crate::serve(listener, proxy, async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    })
    .await;
    for server in servers {
        server.await.context("a node task failed")??;
    }
    served?;
    Ok(ExitCode::SUCCESS)
}
