//! The proxy's cache of the shards' schema: which tables exist, their key column and affinity.
//!
//! Every shard has the same tables (migrations run on all of them), so one node's
//! `GET /v1/schema` speaks for all. The cache is read without a lock; an unknown table triggers
//! one refresh (a migration may have just added it) before the proxy answers 404.

use crate::cluster::Topology;
use crate::error::{ProxyError, ProxyResult};
use crate::upstream::Upstream;
use arc_swap::ArcSwap;
use http::Method;
use shardlite_node::schema::{SchemaResponse, TableSchema};
use std::collections::HashMap;
use std::sync::Arc;

/// Names at most this many tables in an unknown table's answer.
const HINT_TABLES: usize = 20;

/// What an unknown table's answer says about the tables there are.
fn known_tables<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let mut names: Vec<&str> = names.map(String::as_str).collect();
    if names.is_empty() {
        return "the cluster has no tables yet; create them with `shardlite migrate --dir DIR`"
            .into();
    }
    names.sort_unstable();
    let more = names.len().saturating_sub(HINT_TABLES);
    names.truncate(HINT_TABLES);
    let mut hint = format!("the cluster's tables are {}", names.join(", "));
    if more > 0 {
        hint.push_str(&format!(" and {more} more"));
    }
    hint
}

#[derive(Default)]
pub struct SchemaCache {
    tables: ArcSwap<HashMap<String, Arc<TableSchema>>>,
    /// One refresh at a time: a burst of requests for an unknown table costs one fetch.
    refresh: tokio::sync::Mutex<()>,
}

impl SchemaCache {
    /// The schema of `table`, refreshing the cache once if the table is not known yet.
    pub async fn table(
        &self,
        name: &str,
        topology: &Topology,
        upstream: &Upstream,
    ) -> ProxyResult<Arc<TableSchema>> {
        if let Some(table) = self.tables.load().get(name) {
            return Ok(table.clone());
        }
        let seen = self.tables.load_full();
        let _one_at_a_time = self.refresh.lock().await;
        if Arc::ptr_eq(&seen, &self.tables.load_full()) {
            self.refresh(topology, upstream).await?;
        }
        let tables = self.tables.load();
        tables
            .get(name)
            .cloned()
            .ok_or_else(|| ProxyError::UnknownTable {
                table: name.to_owned(),
                hint: known_tables(tables.keys()),
            })
    }

    /// Fetches the schema from the first node that answers (data-owning nodes first).
    pub async fn refresh(&self, topology: &Topology, upstream: &Upstream) -> ProxyResult<()> {
        let mut last_error = ProxyError::NoNodes;
        let mut nodes: Vec<_> = topology.nodes.iter().collect();
        nodes.sort_by_key(|n| n.state == crate::cluster::MemberState::Joining);
        for node in nodes {
            match upstream
                .call(&node.id, Method::GET, &node.url, "/v1/schema", None)
                .await
                .and_then(|reply| reply.json::<SchemaResponse>(&node.id))
            {
                Ok(schema) => {
                    let tables = schema
                        .tables
                        .into_iter()
                        .map(|t| (t.name.clone(), Arc::new(t)))
                        .collect();
                    self.tables.store(Arc::new(tables));
                    return Ok(());
                }
                Err(e) => last_error = e,
            }
        }
        Err(last_error)
    }

    /// Every known table, sorted by name.
    pub fn all(&self) -> Vec<Arc<TableSchema>> {
        let mut tables: Vec<_> = self.tables.load().values().cloned().collect();
        tables.sort_by(|a, b| a.name.cmp(&b.name));
        tables
    }

    /// Forgets everything; the next lookup fetches afresh (after a migration).
    pub fn clear(&self) {
        self.tables.store(Arc::new(HashMap::new()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_table_names_the_tables_there_are() {
        let none: Vec<String> = Vec::new();
        assert!(known_tables(none.iter()).contains("no tables yet"));
        let some = ["users".to_owned(), "orders".to_owned()];
        assert_eq!(
            known_tables(some.iter()),
            "the cluster's tables are orders, users"
        );
        let many: Vec<String> = (0..25).map(|i| format!("t{i:02}")).collect();
        let hint = known_tables(many.iter());
        assert!(hint.ends_with("t19 and 5 more"), "{hint}");
    }
}
