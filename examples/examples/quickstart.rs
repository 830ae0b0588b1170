//! A cluster of three nodes and a proxy inside one process, on free ports in a temp directory:
//! apply a schema, write rows by key, read them back, and see which node owns each.
//!
//! Run it with `cargo run -p shardlite-examples --example quickstart`.

use anyhow::Context;
use serde_json::{Value, json};
use shardlite::upstream::{Upstream, UpstreamConfig};
use shardlite_node::migrate::Migration;
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };

    let mut seeds = Vec::new();
    for i in 1..=3 {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        seeds.push((
            format!("n{i}"),
            format!("http://{}", listener.local_addr()?),
        ));
        let db = dir.path().join(format!("n{i}.db"));
        let node = shardlite_node::NodeState::open(shardlite_node::NodeConfig::new(db))?;
        tokio::spawn(shardlite_node::serve(listener, node, until_stopped()));
    }
    let mut config = shardlite::ProxyConfig::new(dir.path().join("proxy.db"));
    config.seed_nodes = seeds;
    let proxy = shardlite::ProxyState::open(config)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(shardlite::serve(listener, proxy, until_stopped()));

    let http = Upstream::new(UpstreamConfig::default());
    let call = |method: &str, path: &str, body: Value| {
        let http = http.clone();
        let url = url.clone();
        let method = method.parse().expect("a valid method");
        let path = path.to_owned();
        async move {
            let reply = http
                .call("proxy", method, &url, &path, Some(body.to_string().into()))
                .await
                .map_err(|e| anyhow::anyhow!(e.message()))?;
            let answer: Value = serde_json::from_slice(&reply.body).context("a JSON answer")?;
            anyhow::ensure!(reply.status.is_success(), "{path}: {answer}");
            Ok::<Value, anyhow::Error>(answer)
        }
    };

    let schema = Migration {
        version: 1,
        name: "0001_notes".into(),
        sql: "CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT, stars INTEGER)".into(),
    };
    call(
        "POST",
        "/v1/cluster/migrations",
        json!({ "migrations": [schema] }),
    )
    .await?;

    for (id, body) in [
        ("groceries", "milk, eggs"),
        ("ideas", "shard all the things"),
        ("todo", "ship it"),
    ] {
        let put = call(
            "PUT",
            &format!("/v1/tables/notes/rows/{id}"),
            json!({ "body": body, "stars": 3 }),
        )
        .await?;
        println!("{id:<10} lives on {}", put["node"]);
    }
    let all = call(
        "POST",
        "/v1/sql",
        // Each shard's rows, one shard after another: an ORDER BY would sort within each.
        json!({ "sql": "SELECT id, body FROM notes" }),
    )
    .await?;
    println!("every shard, one answer: {}", all["results"][0]["rows"]);
    let verify = call("GET", "/v1/cluster/verify", Value::Null).await?;
    println!(
        "verify: {} rows, {} misplaced",
        verify["rows_total"], verify["misplaced"]
    );

    let _ = stop.send(true);
    server.await??;
    Ok(())
}
