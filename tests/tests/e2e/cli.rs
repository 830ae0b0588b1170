//! The `shardlite` binary against a real proxy process.

use shardlite_tests::{Spawned, sample_migrations, shardlite_bin, spawn_nodes};
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

#[test]
fn status_verify_and_migrate_work_against_a_proxy_process() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = spawn_nodes(dir.path(), 2, &[]);
    let state = dir.path().join("proxy.db");
    let mut args = vec![
        "proxy".to_owned(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--state".into(),
        state.display().to_string(),
    ];
    for (i, n) in nodes.iter().enumerate() {
        args.push("--node".into());
        args.push(format!("n{}={}", i + 1, n.url));
    }
    let proxy = Spawned::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
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

    // A proxy that is not there: one line that says what to do, and a non-zero exit.
    let (code, out, err) = shardlite(&["status", "--proxy", "http://127.0.0.1:1"]);
    assert_ne!(code, 0, "{out}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot reach the proxy") && err.contains("--proxy"),
        "{err}"
    );
}
