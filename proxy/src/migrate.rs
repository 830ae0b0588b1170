//! Schema migrations, fanned out to every node.
//!
//! The proxy keeps the whole known set of migrations in its state file (version, name, SQL,
//! checksum). `POST /v1/cluster/migrations` checks a new set against it before anything runs:
//! duplicate versions, gaps, and changed or missing files of known versions are refused. The new
//! versions are stored first (so a proxy killed mid-way has them after a restart), then every node
//! gets the whole set and applies what it lacks, in version order, each in its own transaction
//! with its ledger row (`_shardlite_migrations`). A node that is down or fails is reported as
//! lagging; the next `migrate` brings it up to date, and so does joining the cluster.
//!
//! Row traffic for a lagging node is routed as usual: migrations only add, so the node still has
//! every table and column it had, and it validates each request against its own live schema: a
//! request that needs the newer schema is refused there with a clear 4xx and changes nothing.
//! `shardlite status` and `shardlite migrate --status` show every node's version.

use crate::cluster::NodeInfo;
use crate::error::{ProxyError, ProxyResult};
use crate::server::ProxyState;
use http::{Method, StatusCode};
use rusqlite::params;
use serde::{Deserialize, Serialize};
use shardlite_node::migrate::{AppliedMigration, Migration, checksum};
use std::collections::BTreeMap;
use std::path::Path;

/// `POST /v1/cluster/migrations`.
#[derive(Serialize, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    pub migrations: Vec<Migration>,
}

/// One node's outcome in a migrate answer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct NodeMigration {
    /// The highest version applied on the node after this call (0 if none, None if unknown).
    pub version: Option<i64>,
    /// Versions this call applied.
    pub applied: Vec<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The answer of `POST /v1/cluster/migrations`.
#[derive(Serialize, Deserialize, Debug)]
pub struct MigrateResponse {
    /// The highest known version.
    pub version: i64,
    pub nodes: BTreeMap<String, NodeMigration>,
    /// Nodes not at `version` after this call.
    pub lagging: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The answer of `GET /v1/cluster/migrations`: known versions and each node's ledger.
#[derive(Serialize, Deserialize, Debug)]
pub struct MigrationStatus {
    pub version: i64,
    pub migrations: Vec<KnownMigration>,
    pub nodes: BTreeMap<String, NodeLedger>,
    pub lagging: Vec<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct KnownMigration {
    pub version: i64,
    pub name: String,
    pub checksum: String,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct NodeLedger {
    pub applied: Vec<AppliedMigration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Deserialize)]
struct NodeApplyResponse {
    applied: Vec<i64>,
    current: i64,
}

#[derive(Deserialize)]
struct NodeLedgerResponse {
    applied: Vec<AppliedMigration>,
}

/// Reads `NNNN_name.sql` files from a directory, in version order. Other files are ignored.
pub fn read_dir(dir: &Path) -> Result<Vec<Migration>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        format!(
            "cannot read the migrations directory {}: {e}",
            dir.display()
        )
    })?;
    let mut migrations: Vec<Migration> = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("sql") {
            continue;
        }
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| format!("{}: the file name is not UTF-8", path.display()))?;
        let version = stem
            .split_once('_')
            .and_then(|(number, rest)| {
                (!rest.is_empty() && number.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| number.parse::<i64>().ok())
                    .flatten()
            })
            .ok_or_else(|| {
                format!(
                    "{}: a migration file is named NNNN_name.sql (e.g. 0002_add_email.sql)",
                    path.display()
                )
            })?;
        let sql = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        migrations.push(Migration {
            version,
            name: stem.to_owned(),
            sql,
        });
    }
    migrations.sort_by_key(|m| m.version);
    Ok(migrations)
}

/// Checks a set on its own: versions from 1 up with no gap and no duplicate.
pub fn check_set(migrations: &[Migration]) -> ProxyResult<()> {
    let mut sorted: Vec<&Migration> = migrations.iter().collect();
    sorted.sort_by_key(|m| m.version);
    for (i, m) in sorted.iter().enumerate() {
        if m.name.trim().is_empty() {
            return Err(ProxyError::BadRequest(format!(
                "migration {} has no name",
                m.version
            )));
        }
        let expected = i as i64 + 1;
        if m.version != expected {
            let problem = if i > 0 && sorted[i - 1].version == m.version {
                format!(
                    "duplicate version {}: {} and {}",
                    m.version,
                    sorted[i - 1].name,
                    m.name
                )
            } else {
                format!(
                    "gap in versions: expected {expected}, found {} ({}); versions start at 1 and \
                     go up by one",
                    m.version, m.name
                )
            };
            return Err(ProxyError::BadRequest(problem));
        }
    }
    Ok(())
}

/// The stored set, in version order.
pub fn known(state: &ProxyState) -> ProxyResult<Vec<Migration>> {
    state.cluster().read(|conn| {
        let mut stmt =
            conn.prepare("SELECT version, name, sql FROM migrations ORDER BY version")?;
        let rows = stmt
            .query_map([], |r| {
                Ok(Migration {
                    version: r.get(0)?,
                    name: r.get(1)?,
                    sql: r.get(2)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    })
}

/// Checks `incoming` against the stored set and stores it. A stored version whose file changed
/// or vanished is refused if any node has applied it (or a node cannot be asked); one that no
/// node applied (its SQL failed everywhere) may still be fixed.
async fn record(state: &ProxyState, incoming: &[Migration]) -> ProxyResult<Vec<Migration>> {
    check_set(incoming)?;
    let stored = known(state)?;
    let changed: Vec<&Migration> = stored
        .iter()
        .filter(|old| {
            !incoming
                .iter()
                .any(|new| new.version == old.version && new.name == old.name && new.sql == old.sql)
        })
        .collect();
    if !changed.is_empty() {
        let ledgers = status(state).await?;
        for old in &changed {
            let what = match incoming.iter().find(|m| m.version == old.version) {
                Some(new) => format!(
                    "migration {} changed after it was applied (was {}, checksum {}; now {},                      checksum {}): applied migrations cannot change, add a new one",
                    old.version,
                    old.name,
                    checksum(&old.sql),
                    new.name,
                    checksum(&new.sql)
                ),
                None => format!(
                    "migration {} is applied but missing from the set: migrations are                      forward-only, restore the file",
                    old.name
                ),
            };
            let applied_on: Vec<&str> = ledgers
                .nodes
                .iter()
                .filter(|(_, l)| l.applied.iter().any(|a| a.version == old.version))
                .map(|(id, _)| id.as_str())
                .collect();
            if !applied_on.is_empty() {
                return Err(ProxyError::Conflict(format!(
                    "{what} (applied on {})",
                    applied_on.join(", ")
                )));
            }
            if let Some((id, ledger)) = ledgers.nodes.iter().find(|(_, l)| l.error.is_some()) {
                return Err(ProxyError::Conflict(format!(
                    "{what}; node {id} cannot be asked whether it applied it ({}): bring it back \
                     first",
                    ledger.error.as_deref().unwrap_or_default()
                )));
            }
        }
    }
    state.cluster().write(|tx| {
        tx.execute("DELETE FROM migrations", [])?;
        for m in incoming {
            tx.execute(
                "INSERT INTO migrations (version, name, sql, checksum) VALUES (?1, ?2, ?3, ?4)",
                params![m.version, m.name, m.sql, checksum(&m.sql)],
            )?;
        }
        Ok(())
    })?;
    known(state)
}

/// Sends the whole known set to one node; it applies what it lacks.
pub async fn bring_up_to_date(
    state: &ProxyState,
    node: &NodeInfo,
    set: &[Migration],
) -> ProxyResult<NodeMigration> {
    let body = serde_json::to_vec(&MigrateRequest {
        migrations: set.to_vec(),
    })
    .expect("migrations serialize");
    let reply: NodeApplyResponse = state
        .upstream()
        .call_with_timeout(
            &node.id,
            Method::POST,
            &node.url,
            "/v1/migrations",
            Some(body.into()),
            // A migration may rewrite a large table: give it far longer than a row request.
            state.config().upstream.request_timeout * 30,
        )
        .await?
        .json(&node.id)?;
    Ok(NodeMigration {
        version: Some(reply.current),
        applied: reply.applied,
        error: None,
    })
}

/// Records `incoming` and applies it to every node. `Ok` carries the per-node outcome even when
/// some nodes lag; `Err` means the set was refused and nothing ran.
pub async fn apply(
    state: &ProxyState,
    incoming: &[Migration],
) -> ProxyResult<(StatusCode, MigrateResponse)> {
    let set = record(state, incoming).await?;
    let latest = set.last().map_or(0, |m| m.version);
    let topology = state.cluster().topology();
    let calls = topology.nodes.iter().map(|node| {
        let set = &set;
        async move { (node, bring_up_to_date(state, node, set).await) }
    });
    let mut outcomes = Vec::with_capacity(topology.nodes.len());
    for (node, outcome) in futures::future::join_all(calls).await {
        let outcome = match outcome {
            Ok(done) => Ok(done),
            // The migrations before the failing one may have been applied: say where it stands.
            Err(e) => Err((e, current_version(state, node).await)),
        };
        outcomes.push((node, outcome));
    }
    let mut response = MigrateResponse {
        version: latest,
        nodes: BTreeMap::new(),
        lagging: Vec::new(),
        error: None,
    };
    let mut status = StatusCode::OK;
    for (node, outcome) in outcomes {
        let outcome = outcome.unwrap_or_else(|(e, version)| {
            if status == StatusCode::OK {
                status = e.status();
            }
            NodeMigration {
                version,
                applied: Vec::new(),
                error: Some(e.message()),
            }
        });
        if outcome.version != Some(latest) {
            response.lagging.push(node.id.clone());
        }
        response.nodes.insert(node.id.clone(), outcome);
    }
    state.schema().clear();
    if !response.lagging.is_empty() {
        if status == StatusCode::OK {
            status = StatusCode::BAD_GATEWAY;
        }
        response.error = Some(if response.lagging.len() == response.nodes.len() {
            format!(
                "no node is at version {latest}. Fix the cause and run `shardlite migrate` \
                 again (a migration that failed was rolled back, and a file that no node has \
                 applied may still change)"
            )
        } else {
            format!(
                "node(s) {} are not at version {latest}; the others are. Fix the cause and run \
                 `shardlite migrate` again to bring them up to date",
                response.lagging.join(", ")
            )
        });
    }
    Ok((status, response))
}

/// A node's ledger: the migrations it applied.
async fn ledger(state: &ProxyState, node: &NodeInfo) -> ProxyResult<NodeLedgerResponse> {
    state
        .upstream()
        .call(&node.id, Method::GET, &node.url, "/v1/migrations", None)
        .await
        .and_then(|reply| reply.json::<NodeLedgerResponse>(&node.id))
}

/// A node's latest applied version as its ledger says, or `None` if it cannot be read.
async fn current_version(state: &ProxyState, node: &NodeInfo) -> Option<i64> {
    let ledger = ledger(state, node).await.ok()?;
    Some(ledger.applied.last().map_or(0, |m| m.version))
}

/// Every node's ledger beside the known set.
pub async fn status(state: &ProxyState) -> ProxyResult<MigrationStatus> {
    let set = known(state)?;
    let latest = set.last().map_or(0, |m| m.version);
    let topology = state.cluster().topology();
    let calls = topology
        .nodes
        .iter()
        .map(|node| async move { (node, ledger(state, node).await) });
    let mut nodes = BTreeMap::new();
    let mut lagging = Vec::new();
    for (node, ledger) in futures::future::join_all(calls).await {
        let ledger = match ledger {
            Ok(l) => NodeLedger {
                applied: l.applied,
                error: None,
            },
            Err(e) => NodeLedger {
                applied: Vec::new(),
                error: Some(e.message()),
            },
        };
        if ledger.error.is_some() || ledger.applied.last().map_or(0, |m| m.version) != latest {
            lagging.push(node.id.clone());
        }
        nodes.insert(node.id.clone(), ledger);
    }
    Ok(MigrationStatus {
        version: latest,
        migrations: set
            .iter()
            .map(|m| KnownMigration {
                version: m.version,
                name: m.name.clone(),
                checksum: checksum(&m.sql),
            })
            .collect(),
        nodes,
        lagging,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(version: i64, name: &str) -> Migration {
        Migration {
            version,
            name: name.into(),
            sql: "SELECT 1".into(),
        }
    }

    #[test]
    fn a_set_must_start_at_one_without_gaps_or_duplicates() {
        assert!(check_set(&[m(1, "a"), m(2, "b")]).is_ok());
        assert!(check_set(&[]).is_ok());
        let gap = check_set(&[m(1, "a"), m(3, "c")]).unwrap_err().to_string();
        assert!(gap.contains("gap") && gap.contains('c'), "{gap}");
        let dup = check_set(&[m(1, "a"), m(2, "b"), m(2, "b2")])
            .unwrap_err()
            .to_string();
        assert!(dup.contains("duplicate version 2"), "{dup}");
        assert!(check_set(&[m(2, "b")]).is_err(), "must start at 1");
    }

    #[test]
    fn files_are_read_in_version_order_and_badly_named_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("0002_b.sql"), "SELECT 2").unwrap();
        std::fs::write(dir.path().join("0001_a.sql"), "SELECT 1").unwrap();
        std::fs::write(dir.path().join("README.md"), "not a migration").unwrap();
        let set = read_dir(dir.path()).unwrap();
        assert_eq!(
            set.iter()
                .map(|m| (m.version, m.name.as_str()))
                .collect::<Vec<_>>(),
            vec![(1, "0001_a"), (2, "0002_b")]
        );
        std::fs::write(dir.path().join("add_c.sql"), "SELECT 3").unwrap();
        let error = read_dir(dir.path()).unwrap_err();
        assert!(error.contains("add_c.sql"), "{error}");
    }
}
