//! Membership: which nodes exist, their state and weight, the epoch, and the ring built from them.
//!
//! The durable copy lives in the proxy's SQLite state file (`--state`), written with
//! `synchronous=FULL` so an acknowledged membership change survives a crash. Readers never lock:
//! the current [`Topology`] is an immutable value behind an `ArcSwap`, rebuilt and swapped whole
//! after every change. Writers take the state file's mutex, write, then swap.

use crate::error::{ProxyError, ProxyResult};
use arc_swap::ArcSwap;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use shardlite_ring::{Member, NodeId, Ring};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Where a node stands in the cluster's life cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Owns its share of the ring.
    Active,
    /// Added, has the schema, owns nothing until a rebalance moves its rows in.
    Joining,
    /// Being drained: still owns its rows until a rebalance moves them out, then leaves.
    Leaving,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Active => "active",
            MemberState::Joining => "joining",
            MemberState::Leaving => "leaving",
        }
    }

    fn parse(text: &str) -> Option<MemberState> {
        match text {
            "active" => Some(MemberState::Active),
            "joining" => Some(MemberState::Joining),
            "leaving" => Some(MemberState::Leaving),
            _ => None,
        }
    }
}

/// One node as the cluster knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: String,
    /// Base URL without a trailing slash, e.g. `http://127.0.0.1:7001`.
    pub url: String,
    pub state: MemberState,
    /// Its share of the ring now, relative to the others.
    pub weight: u32,
    /// A weight set for an active node, taken by the next rebalance's switch (which moves the
    /// rows it gains or loses); until then the ring uses `weight`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_weight: Option<u32>,
}

#[cfg(test)]
impl NodeInfo {
    /// A member of weight 1 at `http://<id>`, for tests.
    pub(crate) fn test(id: &str, state: MemberState) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            url: format!("http://{id}"),
            state,
            weight: 1,
            next_weight: None,
        }
    }
}

impl NodeInfo {
    /// Its weight once the next rebalance is done.
    pub fn weight_after(&self) -> u32 {
        self.next_weight.unwrap_or(self.weight)
    }
}

/// An immutable snapshot of membership: what every routed request reads.
#[derive(Debug)]
pub struct Topology {
    pub epoch: u64,
    pub vnodes: u32,
    /// Sorted by id.
    pub nodes: Vec<NodeInfo>,
    /// The ring of the nodes that own data now: active and leaving ones.
    pub ring: Ring,
    by_id: HashMap<String, usize>,
}

impl Topology {
    pub fn new(epoch: u64, vnodes: u32, mut nodes: Vec<NodeInfo>) -> ProxyResult<Topology> {
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        let members = nodes
            .iter()
            .filter(|n| n.state != MemberState::Joining)
            .map(|n| Member {
                id: NodeId::new(n.id.clone()),
                weight: n.weight,
            });
        let ring = Ring::new(members, vnodes)
            .map_err(|e| ProxyError::BadRequest(format!("invalid membership: {e}")))?;
        let by_id = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.id.clone(), i))
            .collect();
        Ok(Topology {
            epoch,
            vnodes,
            nodes,
            ring,
            by_id,
        })
    }

    pub fn node(&self, id: &str) -> Option<&NodeInfo> {
        self.by_id.get(id).map(|&i| &self.nodes[i])
    }

    /// The node that owns a key's routing text, or `NoNodes` for an empty ring.
    pub fn owner(&self, routing_text: &str) -> ProxyResult<&NodeInfo> {
        let id = self.ring.lookup(routing_text).ok_or(ProxyError::NoNodes)?;
        Ok(self
            .node(id.as_str())
            .expect("every ring member is a node of the same topology"))
    }
}

/// The state file and the current topology.
pub struct Cluster {
    store: Mutex<Connection>,
    current: ArcSwap<Topology>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    state TEXT NOT NULL,
    weight INTEGER NOT NULL,
    next_weight INTEGER
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    sql TEXT NOT NULL,
    checksum TEXT NOT NULL
);
";

impl Cluster {
    /// Opens (or creates) the state file. `seeds` become active members only when the file is
    /// new, so a restart with the same flags keeps whatever membership changes happened since.
    pub fn open(path: &Path, seeds: &[(String, String)], vnodes: u32) -> ProxyResult<Cluster> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        add_next_weight(&conn)?;
        let tx = conn.transaction()?;
        let created: Option<String> = tx
            .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
                r.get(0)
            })
            .optional()?;
        if created.is_none() {
            for (id, url) in seeds {
                validate_id(id)?;
                let url = normalize_url(url)?;
                tx.execute(
                    "INSERT INTO nodes (id, url, state, weight) VALUES (?1, ?2, 'active', 1)",
                    params![id, url],
                )
                .map_err(|e| match e {
                    rusqlite::Error::SqliteFailure(f, _)
                        if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                    {
                        ProxyError::BadRequest(format!("--node {id} is given twice"))
                    }
                    other => other.into(),
                })?;
            }
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('epoch', '1'), ('vnodes', ?1)",
                [vnodes.to_string()],
            )?;
        }
        tx.commit()?;
        let topology = load(&conn)?;
        Ok(Cluster {
            store: Mutex::new(conn),
            current: ArcSwap::from_pointee(topology),
        })
    }

    /// The current topology. Cheap: an atomic load, no lock.
    pub fn topology(&self) -> Arc<Topology> {
        self.current.load_full()
    }

    /// Runs `change` in one transaction on the state file, then reloads and swaps the topology.
    /// The change is durable before anyone can route by it.
    pub fn update<T>(
        &self,
        change: impl FnOnce(&rusqlite::Transaction<'_>) -> ProxyResult<T>,
    ) -> ProxyResult<T> {
        let mut conn = self.conn();
        let out = transact(&mut conn, change)?;
        let topology = load(&conn)?;
        self.current.store(Arc::new(topology));
        Ok(out)
    }

    /// The seeds (`--node ID=URL`) that the state file does not hold as given: it ignores
    /// them once it exists, which the caller should say.
    pub fn differing_seeds(&self, seeds: &[(String, String)]) -> Vec<String> {
        seeds_not_in(seeds, &self.topology())
    }

    /// Records new addresses for members (`(id, url)`, URLs normalized), in one transaction.
    /// Only where to call a node changes: not what it owns, nor the epoch.
    pub fn set_urls(&self, urls: &[(&str, &str)]) -> ProxyResult<()> {
        self.update(|tx| {
            for (id, url) in urls {
                tx.execute("UPDATE nodes SET url = ?2 WHERE id = ?1", params![id, url])?;
            }
            Ok(())
        })
    }

    /// For `shardlite dev`, which starts node `n1` on `n1.db` at a port derived from its own:
    /// a seed whose id the state file holds at another URL is the same node moved, so its URL
    /// becomes the seed's. Ownership does not change, so neither does the epoch. Returns what
    /// moved, as `id: old -> new`.
    pub fn adopt_seed_urls(&self, seeds: &[(String, String)]) -> ProxyResult<Vec<String>> {
        for (_, url) in seeds {
            normalize_url(url)?;
        }
        let moved: Vec<(String, String, String)> = seed_changes(seeds, &self.topology())
            .filter_map(|(id, held, url)| Some((id.to_owned(), held?.to_owned(), url)))
            .collect();
        if !moved.is_empty() {
            let urls: Vec<(&str, &str)> = moved
                .iter()
                .map(|(id, _, url)| (id.as_str(), url.as_str()))
                .collect();
            self.set_urls(&urls)?;
        }
        Ok(moved
            .into_iter()
            .map(|(id, old, new)| format!("{id}: {old} -> {new}"))
            .collect())
    }

    /// Runs `change` in one transaction on the state file; membership is not reloaded (for job
    /// records and the migration set).
    pub fn write<T>(
        &self,
        change: impl FnOnce(&rusqlite::Transaction<'_>) -> ProxyResult<T>,
    ) -> ProxyResult<T> {
        let mut conn = self.conn();
        transact(&mut conn, change)
    }

    /// The state file's connection, held until the guard drops.
    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.store
            .lock()
            .expect("state lock is never poisoned: no panics under it")
    }

    /// Runs a read on the state file.
    pub fn read<T>(&self, read: impl FnOnce(&Connection) -> ProxyResult<T>) -> ProxyResult<T> {
        let conn = self.conn();
        read(&conn)
    }
}

fn transact<T>(
    conn: &mut Connection,
    change: impl FnOnce(&rusqlite::Transaction<'_>) -> ProxyResult<T>,
) -> ProxyResult<T> {
    let tx = conn.transaction()?;
    let out = change(&tx)?;
    tx.commit()?;
    Ok(out)
}

/// Bumps the epoch inside a membership-changing transaction.
pub fn bump_epoch(tx: &rusqlite::Transaction<'_>) -> ProxyResult<u64> {
    tx.execute(
        "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'epoch'",
        [],
    )?;
    let epoch: String = tx.query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
        r.get(0)
    })?;
    Ok(epoch.parse().unwrap_or(0))
}

/// A state file from before weights could change lacks `nodes.next_weight`: add it (NULL, no
/// change pending). Idempotent.
fn add_next_weight(conn: &Connection) -> ProxyResult<()> {
    let has: bool = conn.query_row(
        "SELECT count(*) FROM pragma_table_info('nodes') WHERE name = 'next_weight'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if !has {
        conn.execute_batch("ALTER TABLE nodes ADD COLUMN next_weight INTEGER")?;
    }
    Ok(())
}

fn load(conn: &Connection) -> ProxyResult<Topology> {
    let meta = |key: &str| -> ProxyResult<u64> {
        let value: String =
            conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))?;
        value.parse().map_err(|_| {
            ProxyError::State(rusqlite::Error::InvalidColumnType(
                0,
                format!("meta.{key} = {value:?} is not a number"),
                rusqlite::types::Type::Text,
            ))
        })
    };
    let epoch = meta("epoch")?;
    let vnodes = meta("vnodes")? as u32;
    let mut stmt =
        conn.prepare("SELECT id, url, state, weight, next_weight FROM nodes ORDER BY id")?;
    let nodes = stmt
        .query_map([], |r| {
            let state: String = r.get(2)?;
            Ok(NodeInfo {
                id: r.get(0)?,
                url: r.get(1)?,
                state: MemberState::parse(&state).unwrap_or(MemberState::Active),
                weight: r.get(3)?,
                next_weight: r.get(4)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Topology::new(epoch, vnodes, nodes)
}

/// Each member's share of `ring` (a fraction of 1), by id; a node missing from the ring owns
/// nothing there.
pub fn shares_by_id(ring: &Ring) -> HashMap<String, f64> {
    ring.shares()
        .into_iter()
        .map(|(id, share)| (id.as_str().to_owned(), share))
        .collect()
}

/// A node id: 1–64 characters of `[A-Za-z0-9._-]`, so it is safe in URLs, logs and file names.
pub fn validate_id(id: &str) -> ProxyResult<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ProxyError::BadRequest(format!(
            "invalid node id {id:?}: use 1-64 characters of letters, digits, '.', '_' or '-'"
        )))
    }
}

/// Checks a node URL (`http://host:port`, an optional trailing slash) and returns it without
/// the slash.
pub fn normalize_url(url: &str) -> ProxyResult<String> {
    let trimmed = url.trim_end_matches('/');
    let parsed: http::Uri = trimmed
        .parse()
        .map_err(|e| ProxyError::BadRequest(format!("invalid node URL {url:?}: {e}")))?;
    let plain = parsed.scheme_str() == Some("http")
        && parsed.authority().is_some()
        && parsed
            .path_and_query()
            .is_none_or(|p| p.as_str().is_empty() || p == "/");
    if !plain {
        return Err(ProxyError::BadRequest(format!(
            "invalid node URL {url:?}: expected http://HOST:PORT"
        )));
    }
    Ok(trimmed.to_owned())
}

/// The seeds (`--node ID=URL`) that an existing state file does not hold as they are: an id
/// it lacks, or one it holds at another URL.
fn seeds_not_in(seeds: &[(String, String)], topology: &Topology) -> Vec<String> {
    seed_changes(seeds, topology)
        .map(|(id, _, url)| format!("{id}={url}"))
        .collect()
}

/// Each seed that the topology does not hold as given: its id, the URL the topology holds it
/// at (`None`: an id it lacks), and the seed's URL, normalized where it can be.
fn seed_changes<'a>(
    seeds: &'a [(String, String)],
    topology: &'a Topology,
) -> impl Iterator<Item = (&'a str, Option<&'a str>, String)> {
    seeds.iter().filter_map(|(id, url)| {
        let url = normalize_url(url).unwrap_or_else(|_| url.clone());
        let held = topology.node(id).map(|n| n.url.as_str());
        (held != Some(url.as_str())).then_some((id.as_str(), held, url))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state file written before weights could change has no `nodes.next_weight`: it opens,
    /// gains the column (no change pending), and a pending weight then survives a reopen.
    #[test]
    fn a_state_file_from_before_pending_weights_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                 CREATE TABLE nodes (id TEXT PRIMARY KEY, url TEXT NOT NULL,
                     state TEXT NOT NULL, weight INTEGER NOT NULL);
                 INSERT INTO meta VALUES ('epoch', '7'), ('vnodes', '16');
                 INSERT INTO nodes VALUES ('a', 'http://127.0.0.1:1', 'active', 2);",
            )
            .unwrap();
        }
        let cluster = Cluster::open(&path, &[], 16).unwrap();
        let a = cluster.topology().node("a").cloned().unwrap();
        assert_eq!((a.weight, a.next_weight, a.weight_after()), (2, None, 2));
        assert_eq!(cluster.topology().epoch, 7);
        cluster
            .update(|tx| {
                tx.execute("UPDATE nodes SET next_weight = 5 WHERE id = 'a'", [])?;
                Ok(())
            })
            .unwrap();
        drop(cluster);
        let cluster = Cluster::open(&path, &[], 16).unwrap();
        let a = cluster.topology().node("a").cloned().unwrap();
        assert_eq!((a.weight, a.next_weight, a.weight_after()), (2, Some(5), 5));
        assert_eq!(
            cluster.topology().ring.members(),
            [Member::new("a", 2)],
            "the ring uses the weight it has now, not the pending one"
        );
    }

    #[test]
    fn seeds_that_differ_from_an_existing_state_file_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let seeds = vec![
            ("a".to_owned(), "http://127.0.0.1:1".to_owned()),
            ("b".to_owned(), "http://127.0.0.1:2".to_owned()),
        ];
        let cluster = Cluster::open(&path, &seeds, 16).unwrap();
        let topology = cluster.topology();
        assert!(seeds_not_in(&seeds, &topology).is_empty());
        let same_but_spelled = vec![("a".to_owned(), "http://127.0.0.1:1/".to_owned())];
        assert!(seeds_not_in(&same_but_spelled, &topology).is_empty());
        let moved = vec![
            ("a".to_owned(), "http://127.0.0.1:9".to_owned()),
            ("c".to_owned(), "http://127.0.0.1:3".to_owned()),
        ];
        assert_eq!(
            cluster.differing_seeds(&moved),
            vec!["a=http://127.0.0.1:9", "c=http://127.0.0.1:3"]
        );

        // Adopted (as `dev` does): the known id moves, the unknown one is not added, and the
        // epoch stays.
        let adopted = cluster.adopt_seed_urls(&moved).unwrap();
        assert_eq!(adopted, vec!["a: http://127.0.0.1:1 -> http://127.0.0.1:9"]);
        let topology = cluster.topology();
        assert_eq!(topology.node("a").unwrap().url, "http://127.0.0.1:9");
        assert!(topology.node("c").is_none());
        assert_eq!(topology.epoch, 1);
        assert!(cluster.adopt_seed_urls(&moved).unwrap().is_empty());
    }

    #[test]
    fn seeds_count_only_when_the_state_file_is_new() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let seeds = vec![
            ("a".to_owned(), "http://127.0.0.1:1".to_owned()),
            ("b".to_owned(), "http://127.0.0.1:2/".to_owned()),
        ];
        let cluster = Cluster::open(&path, &seeds, 16).unwrap();
        let topology = cluster.topology();
        assert_eq!(topology.epoch, 1);
        assert_eq!(topology.nodes.len(), 2);
        assert_eq!(topology.node("b").unwrap().url, "http://127.0.0.1:2");
        cluster
            .update(|tx| {
                tx.execute("DELETE FROM nodes WHERE id = 'b'", [])?;
                bump_epoch(tx)
            })
            .unwrap();
        drop(cluster);

        let reopened = Cluster::open(&path, &seeds, 16).unwrap();
        let topology = reopened.topology();
        assert_eq!(topology.epoch, 2, "the epoch survives a restart");
        assert_eq!(
            topology
                .nodes
                .iter()
                .map(|n| n.id.as_str())
                .collect::<Vec<_>>(),
            vec!["a"],
            "seeds must not come back once the state file exists"
        );
    }

    #[test]
    fn joining_nodes_own_nothing() {
        let nodes = vec![
            NodeInfo::test("a", MemberState::Active),
            NodeInfo::test("b", MemberState::Joining),
        ];
        let topology = Topology::new(1, 64, nodes).unwrap();
        for i in 0..1000 {
            assert_eq!(topology.owner(&format!("k{i}")).unwrap().id, "a");
        }
    }

    #[test]
    fn bad_ids_and_urls_are_refused() {
        assert!(validate_id("node-1.a_b").is_ok());
        for id in ["", "a b", "a/b", "ü", &"x".repeat(65)] {
            assert!(validate_id(id).is_err(), "{id:?} must be refused");
        }
        assert_eq!(
            normalize_url("http://127.0.0.1:7001/").unwrap(),
            "http://127.0.0.1:7001"
        );
        for url in [
            "127.0.0.1:7001",
            "https://x:1",
            "http://x:1/path",
            "ftp://x",
            "",
        ] {
            assert!(normalize_url(url).is_err(), "{url:?} must be refused");
        }
    }
}
