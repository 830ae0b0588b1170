//! Which member of the cluster a node is, so that a proxy with a wrong address cannot write
//! one node's rows into another's file.
//!
//! The proxy names the node it means on every call (`x-shardlite-node: n1`). The first such
//! call *claims* the node: the id is stored in the node's file (`_shardlite_identity`) and
//! kept in memory. From then on a call naming another id is refused with 421 Misdirected
//! Request, before it reaches any handler, so nothing is read or written for it: two nodes
//! whose addresses got swapped in the proxy's state (nodes restarted by hand on each other's
//! ports, say) refuse everything instead of taking each other's keys, and a rebalance's
//! clean-up can never purge the wrong file. A call without the header (a client talking to
//! the node directly, the benchmarks, an older proxy) is not checked.
//!
//! A node keeps its id until the proxy releases it (`DELETE /v1/identity`), which it does once
//! the node has left the cluster (drained by a rebalance, or removed while joining), so the
//! node can be added again under any id. A node that was down then keeps it: it can come back
//! under the same id, or under another one from a fresh file.

use rusqlite::{Connection, OptionalExtension};

/// The request header that names the node a call is meant for.
pub const NODE_HEADER: &str = "x-shardlite-node";

const DDL: &str = "CREATE TABLE IF NOT EXISTS _shardlite_identity (
    only INTEGER PRIMARY KEY CHECK (only = 1),
    node TEXT NOT NULL
)";

/// Creates the table (empty: never claimed) when the node opens its file, beside the
/// migration ledger and the fences.
pub(crate) fn create_table(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(DDL)
}

/// The id stored in the file, if the node was ever claimed.
pub(crate) fn load(conn: &Connection) -> rusqlite::Result<Option<String>> {
    conn.query_row("SELECT node FROM _shardlite_identity", [], |r| r.get(0))
        .optional()
}

/// Stores `id` unless the file already holds one; returns the id the file holds afterwards:
/// the first claim wins. Run on the writer's connection, the only one that writes, so the
/// read sees what the insert left.
pub(crate) fn claim(conn: &Connection, id: &str) -> rusqlite::Result<String> {
    conn.execute(
        "INSERT OR IGNORE INTO _shardlite_identity (only, node) VALUES (1, ?1)",
        [id],
    )?;
    load(conn)?.ok_or(rusqlite::Error::QueryReturnedNoRows)
}

/// Forgets the stored id, if any; returns it.
pub(crate) fn release(conn: &Connection) -> rusqlite::Result<Option<String>> {
    conn.query_row("DELETE FROM _shardlite_identity RETURNING node", [], |r| {
        r.get(0)
    })
    .optional()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_claim_wins_and_is_kept_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.db");
        let conn = Connection::open(&path).unwrap();
        create_table(&conn).unwrap();
        assert_eq!(load(&conn).unwrap(), None);
        assert_eq!(claim(&conn, "n1").unwrap(), "n1");
        assert_eq!(
            claim(&conn, "n2").unwrap(),
            "n1",
            "a second claim changes nothing"
        );
        drop(conn);
        let reopened = Connection::open(&path).unwrap();
        assert_eq!(load(&reopened).unwrap().as_deref(), Some("n1"));
        assert_eq!(release(&reopened).unwrap().as_deref(), Some("n1"));
        assert_eq!(load(&reopened).unwrap(), None);
        assert_eq!(
            claim(&reopened, "n7").unwrap(),
            "n7",
            "released, it can be claimed again"
        );
    }
}
