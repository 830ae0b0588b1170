//! Which tables are sharded: every table of the main schema with a single-column PRIMARY KEY,
//! except SQLite's own (`sqlite_*`) and ours (`_shardlite_*`).

use std::collections::BTreeMap;

use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use crate::guard::INTERNAL_PREFIX;
use crate::key::{Affinity, affinity_of};
use crate::transfer;

/// A sharded table as the proxy sees it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TableSchema {
    pub name: String,
    /// The shard key: the table's single PRIMARY KEY column.
    pub key: String,
    pub key_affinity: Affinity,
    /// Every column that can be written, key included, in table order.
    pub columns: Vec<String>,
}

/// `GET /v1/schema`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SchemaResponse {
    pub tables: Vec<TableSchema>,
}

/// The sharded tables of one database, by name.
#[derive(Clone, Debug, Default)]
pub(crate) struct Schema {
    tables: BTreeMap<String, TableSchema>,
    /// Per sharded table, the name that reaches its rowid (see [`Schema::rowid_alias`]).
    rowids: BTreeMap<String, Option<&'static str>>,
    /// Whether SQL can write a table without naming it (see [`Schema::writes_unnamed`]).
    writes_unnamed: bool,
}

impl Schema {
    /// Reads the sharded tables from the live schema.
    pub(crate) fn load(conn: &Connection) -> rusqlite::Result<Schema> {
        // `table_list` tells real tables from views, virtual tables and their shadow tables
        // (an FTS5 table's `_data` table also has a one-column PRIMARY KEY).
        // (name, WITHOUT ROWID)
        let names: Vec<(String, bool)> = conn
            .prepare_cached(
                "SELECT name, wr FROM pragma_table_list WHERE schema = 'main' AND type = 'table'",
            )?
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let mut tables = BTreeMap::new();
        let mut rowids = BTreeMap::new();
        for (name, without_rowid) in names.into_iter().filter(|(n, _)| !is_reserved(n)) {
            // (name, declared type, position in the primary key; 0 if not in it)
            let columns: Vec<(String, String, i64)> = conn
                .prepare_cached(
                    "SELECT name, type, pk FROM pragma_table_info(?1, 'main') ORDER BY cid",
                )?
                .query_map([&name], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
                .collect::<rusqlite::Result<_>>()?;
            let mut key_columns = columns.iter().filter(|(_, _, pk)| *pk > 0);
            let (Some((key, declared, _)), None) = (key_columns.next(), key_columns.next()) else {
                continue;
            };
            let table = TableSchema {
                name: name.clone(),
                key: key.clone(),
                key_affinity: affinity_of(declared),
                columns: columns.iter().map(|(c, _, _)| c.clone()).collect(),
            };
            let rowid = if without_rowid {
                None
            } else {
                // Hidden columns (of a virtual table's shadow) can shadow an alias too.
                let all: Vec<String> = conn
                    .prepare_cached("SELECT name FROM pragma_table_xinfo(?1, 'main')")?
                    .query_map([&name], |row| row.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                ["_rowid_", "rowid", "oid"]
                    .into_iter()
                    .find(|alias| !all.iter().any(|c| c.eq_ignore_ascii_case(alias)))
            };
            rowids.insert(name.clone(), rowid);
            tables.insert(name, table);
        }
        let writes_unnamed = unnamed_writers(conn)?;
        Ok(Schema {
            tables,
            rowids,
            writes_unnamed,
        })
    }

    /// Whether a statement can write a table it does not name: the schema holds a trigger of
    /// the user's (ours only log changes), or a foreign key whose `ON UPDATE`/`ON DELETE`
    /// action changes the rows that refer to a parent. Without either, the only tables a write
    /// changes are those its text names (`written` relies on this).
    pub(crate) fn writes_unnamed(&self) -> bool {
        self.writes_unnamed
    }

    /// The name that reaches the sharded table `name`'s rowid: none for a `WITHOUT ROWID`
    /// table, nor when its columns shadow every alias (nor for a table that is not sharded).
    /// Read once, with the schema: only migrations change tables, and they reload it.
    pub(crate) fn rowid_alias(&self, name: &str) -> Option<&'static str> {
        self.rowids.get(name).copied().flatten()
    }

    pub(crate) fn table(&self, name: &str) -> Option<&TableSchema> {
        self.tables.get(name)
    }

    /// Every sharded table, by name.
    pub(crate) fn tables(&self) -> impl Iterator<Item = &TableSchema> {
        self.tables.values()
    }
}

/// See [`Schema::writes_unnamed`]. Capture triggers (as `transfer` tells them) write only
/// the change log.
fn unnamed_writers(conn: &Connection) -> rusqlite::Result<bool> {
    let triggers: i64 = conn
        .prepare_cached("SELECT count(*) FROM sqlite_schema WHERE type = 'trigger'")?
        .query_row([], |row| row.get(0))?;
    let users_triggers = triggers as usize > transfer::capture_trigger_names(conn)?.len();
    let acting_keys: i64 = conn
        .prepare_cached(
            "SELECT count(*) FROM pragma_table_list AS t, pragma_foreign_key_list(t.name, 'main') AS f \
             WHERE t.schema = 'main' AND t.type = 'table' \
             AND (f.on_update NOT IN ('NO ACTION', 'RESTRICT') \
                  OR f.on_delete NOT IN ('NO ACTION', 'RESTRICT'))",
        )?
        .query_row([], |row| row.get(0))?;
    Ok(users_triggers || acting_keys > 0)
}

/// Names no client can reach as a sharded table.
fn is_reserved(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("sqlite_") || lower.starts_with(INTERNAL_PREFIX)
}

/// `name` as a quoted SQL identifier. Only ever called with names read from the live schema.
pub(crate) fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_reach_unnamed_tables_only_through_users_triggers_and_acting_foreign_keys() {
        let conn = Connection::open_in_memory().unwrap();
        let unnamed = |sql: &str| {
            conn.execute_batch(sql).unwrap();
            Schema::load(&conn).unwrap().writes_unnamed()
        };
        assert!(!unnamed(
            "CREATE TABLE users (id TEXT PRIMARY KEY);
             CREATE TABLE _shardlite_changes (k);
             CREATE TABLE orders (id INTEGER PRIMARY KEY, user_id TEXT REFERENCES users (id));"
        ));
        // A capture trigger only logs.
        assert!(!unnamed(&format!(
            "CREATE TRIGGER {}users AFTER INSERT ON users BEGIN
               INSERT INTO _shardlite_changes VALUES (NEW.id);
             END;",
            transfer::CAPTURE_TRIGGER_PREFIX
        )));
        assert!(unnamed(
            "CREATE TABLE notes (id TEXT PRIMARY KEY, user_id TEXT
                 REFERENCES users (id) ON UPDATE CASCADE);"
        ));
        conn.execute_batch("DROP TABLE notes").unwrap();
        assert!(!unnamed("SELECT 1"));
        assert!(unnamed(
            "CREATE TRIGGER audit AFTER UPDATE ON users BEGIN SELECT 1; END;"
        ));
    }

    #[test]
    fn the_rowid_alias_is_the_first_name_no_column_shadows() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE plain (id TEXT PRIMARY KEY, v TEXT);
             CREATE TABLE one (id TEXT PRIMARY KEY, _ROWID_ INT);
             CREATE TABLE two (id TEXT PRIMARY KEY, _rowid_ INT, RowId INT);
             CREATE TABLE every (id TEXT PRIMARY KEY, _rowid_ INT, rowid INT, oid INT);
             CREATE TABLE tags (name TEXT PRIMARY KEY, n INTEGER) WITHOUT ROWID;
             CREATE TABLE log (line TEXT);",
        )
        .unwrap();
        let schema = Schema::load(&conn).unwrap();
        assert_eq!(schema.rowid_alias("plain"), Some("_rowid_"));
        assert_eq!(schema.rowid_alias("one"), Some("rowid"));
        assert_eq!(schema.rowid_alias("two"), Some("oid"));
        assert_eq!(schema.rowid_alias("every"), None);
        assert_eq!(schema.rowid_alias("tags"), None);
        // Not sharded, so not asked.
        assert_eq!(schema.rowid_alias("log"), None);
    }

    #[test]
    fn only_tables_with_a_single_column_key_are_sharded() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE users (id TEXT PRIMARY KEY, name TEXT, age INTEGER);
             CREATE TABLE counters (id INTEGER PRIMARY KEY, n INTEGER NOT NULL DEFAULT 0);
             CREATE TABLE pairs (a TEXT, b TEXT, PRIMARY KEY (a, b));
             CREATE TABLE log (line TEXT);
             CREATE TABLE _shardlite_x (id INTEGER PRIMARY KEY);
             CREATE TABLE _SHARDLITE_y (id INTEGER PRIMARY KEY);
             CREATE VIEW v AS SELECT * FROM users;
             CREATE VIRTUAL TABLE docs USING fts5(body);
             CREATE TABLE \"we\"\"ird\" (\"k\"\"ey\" PRIMARY KEY, v);",
        )
        .unwrap();
        let schema = Schema::load(&conn).unwrap();
        let names: Vec<&str> = schema.tables().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["counters", "users", "we\"ird"]);
        let users = schema.table("users").unwrap();
        assert_eq!(users.key, "id");
        assert_eq!(users.key_affinity, Affinity::Text);
        assert_eq!(users.columns, ["id", "name", "age"]);
        assert_eq!(
            schema.table("counters").unwrap().key_affinity,
            Affinity::Integer
        );
        let weird = schema.table("we\"ird").unwrap();
        assert_eq!(weird.key, "k\"ey");
        assert_eq!(weird.key_affinity, Affinity::Blob);
    }

    #[test]
    fn quoting_doubles_quotes() {
        assert_eq!(quote("users"), "\"users\"");
        assert_eq!(quote("a\"b"), "\"a\"\"b\"");
    }
}
