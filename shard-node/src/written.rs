//! Keyed SQL may insert or update rows under its own key only.
//!
//! The proxy sends keyed SQL to the node that owns its key, and SQL can write any row: `UPDATE
//! users SET id = 'bob' WHERE id = 'alice'`, an `INSERT` of another key, an `INTEGER PRIMARY
//! KEY` that SQLite numbers itself, a user's trigger. Such a row lands on the node that owns the
//! request's key, not on its own: reads routed by its key miss it (an acknowledged write the
//! next read does not return), and `verify` counts it misplaced. Vitess and Citus refuse the
//! same thing (a change of the sharding column, a router write to another shard's rows).
//!
//! So SQLite's update hook notes every row a keyed SQL request inserts or updates in a table
//! with a rowid, and when the request's statements are done, before its savepoint is released,
//! [`within`] reads each such row's key again: a row still there whose key's routing text is not
//! the request's key fails the request with [`NodeError::StrayWrite`] (400), and the writer rolls
//! its savepoint back, so it changes nothing.
//!
//! What this does not check, and why:
//! - **Deletes.** A delete cannot put a row where its key does not route; it can only remove a
//!   row that was there (keyed SQL deleting other keys acts on this node's rows alone, as any
//!   keyed SQL does).
//! - **`WITHOUT ROWID` tables.** SQLite's update hook does not report their rows, and the hook
//!   that does (the pre-update hook) needs a build of SQLite that this crate's dependencies
//!   cannot make without libclang. Keyed SQL writing such a table is not checked.
//! - **Row `PUT`, `DELETE` and batches.** They write exactly the keys they name; only a user's
//!   trigger on the table could reach another key, and users' triggers are the user's schema.
//!
//! A trigger-based watch that caught all of the above was built first and dropped: any trigger
//! on a table makes SQLite open a statement journal for every write to it, and batch upserts
//! through the proxy ran at half their rate.

use std::cell::RefCell;
use std::sync::Arc;

use rusqlite::Connection;
use rusqlite::hooks::Action;

use crate::error::NodeError;
use crate::key::routing_text_of;
use crate::schema::{Schema, quote};

/// Rows of sharded tables that the write in scope inserted or updated: (table, rowid).
type Touched = Vec<(String, i64)>;

/// What the hook fills while a write is in scope: the sharded tables, and the rows.
struct Watch {
    schema: Arc<Schema>,
    touched: Touched,
}

thread_local! {
    /// Set only inside [`within`], on the thread that runs the write.
    static WATCH: RefCell<Option<Watch>> = const { RefCell::new(None) };
}

/// Installs the update hook on `conn`. Outside [`within`] it returns at once.
pub(crate) fn install(conn: &Connection) -> rusqlite::Result<()> {
    conn.update_hook(Some(|action: Action, db: &str, table: &str, rowid: i64| {
        if db != "main" || action == Action::SQLITE_DELETE {
            return;
        }
        WATCH.with(|watch| {
            // Only sharded tables' rows are kept: a write to a table of the node's own may
            // be large, and has no key to check.
            if let Some(watch) = watch.borrow_mut().as_mut()
                && watch.schema.table(table).is_some()
            {
                watch.touched.push((table.to_owned(), rowid));
            }
        });
    }))
}

/// Runs `work` (keyed SQL, on the thread that runs its SQLite work, inside its savepoint),
/// then fails it with [`NodeError::StrayWrite`] if a row it inserted or updated in a sharded
/// table now holds a key whose routing text is not in `keys`. With no keys (a direct caller's
/// keyless write), `work` runs unchecked.
pub(crate) fn within<T>(
    conn: &Connection,
    schema: &Arc<Schema>,
    keys: &[String],
    work: impl FnOnce() -> Result<T, NodeError>,
) -> Result<T, NodeError> {
    if keys.is_empty() {
        return work();
    }
    let (out, touched) = {
        let _scope = Scope::enter(Arc::clone(schema));
        let out = work()?;
        let watch = WATCH.with(|w| w.borrow_mut().take());
        (out, watch.map(|w| w.touched).unwrap_or_default())
    };
    check(conn, schema, keys, touched)?;
    Ok(out)
}

/// Reads the key of every row in `touched` and refuses the first that is not in `keys`.
fn check(
    conn: &Connection,
    schema: &Schema,
    keys: &[String],
    mut touched: Touched,
) -> Result<(), NodeError> {
    touched.sort_unstable();
    touched.dedup();
    let mut table_sql: Option<(&str, Option<String>)> = None;
    for (table, rowid) in &touched {
        if table_sql.as_ref().is_none_or(|(name, _)| name != table) {
            // One statement per table: its key by rowid (none if its columns shadow every name
            // of the rowid; the hook only kept sharded tables).
            let sql = match (schema.table(table), schema.rowid_alias(table)) {
                (Some(t), Some(alias)) => Some(format!(
                    "SELECT {} FROM {} WHERE {alias} = ?1",
                    quote(&t.key),
                    quote(&t.name)
                )),
                _ => None,
            };
            table_sql = Some((table, sql));
        }
        let Some((_, Some(sql))) = &table_sql else {
            continue;
        };
        let mut stmt = conn.prepare_cached(sql)?;
        let mut rows = stmt.query([rowid])?;
        // A row gone by the end of the request (deleted after it was written) is nowhere.
        let Some(row) = rows.next()? else {
            continue;
        };
        let key = routing_text_of(row.get_ref(0)?);
        if !key.as_ref().is_some_and(|k| keys.contains(k)) {
            return Err(NodeError::StrayWrite {
                table: table.clone(),
                key,
                keys: keys.to_vec(),
            });
        }
    }
    Ok(())
}

/// Collects what the hook reports while alive; stops when dropped, errors and panics included.
struct Scope;

impl Scope {
    fn enter(schema: Arc<Schema>) -> Scope {
        WATCH.with(|w| {
            *w.borrow_mut() = Some(Watch {
                schema,
                touched: Vec::new(),
            });
        });
        Scope
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        WATCH.with(|t| {
            if let Ok(mut t) = t.try_borrow_mut() {
                *t = None;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stray: (table, key).
    type Stray = Option<(String, Option<String>)>;

    fn setup() -> (Connection, Arc<Schema>) {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "PRAGMA recursive_triggers = ON;
             CREATE TABLE users (id TEXT PRIMARY KEY, name TEXT, email TEXT UNIQUE);
             CREATE TABLE orders (id INTEGER PRIMARY KEY, user_id TEXT);
             CREATE TABLE \"it's\" (\"k\"\"ey\" TEXT PRIMARY KEY);
             CREATE TABLE local (line TEXT);
             INSERT INTO users (id, name, email) VALUES ('alice', 'A', 'a@x'), ('bob', 'B', 'b@x');",
        )
        .unwrap();
        install(&conn).unwrap();
        let schema = Arc::new(Schema::load(&conn).unwrap());
        (conn, schema)
    }

    fn run(conn: &Connection, schema: &Arc<Schema>, keys: &[&str], sql: &str) -> Stray {
        let keys: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
        conn.execute_batch("SAVEPOINT t").unwrap();
        let got = within(conn, schema, &keys, || Ok(conn.execute_batch(sql)?));
        conn.execute_batch("ROLLBACK TO t; RELEASE t").unwrap();
        match got {
            Ok(()) => None,
            Err(NodeError::StrayWrite { table, key, .. }) => Some((table, key)),
            Err(e) => panic!("{sql}: {e}"),
        }
    }

    fn stray(table: &str, key: Option<&str>) -> Stray {
        Some((table.into(), key.map(str::to_owned)))
    }

    #[test]
    fn writes_under_the_requests_keys_pass() {
        let (conn, schema) = setup();
        for sql in [
            "UPDATE users SET name = 'Al' WHERE id = 'alice'",
            "DELETE FROM users WHERE id = 'alice'",
            "INSERT INTO users (id) VALUES ('carol')",
            "INSERT INTO users (id, name) VALUES ('alice', 'x') ON CONFLICT (id) DO UPDATE SET name = 'y'",
            "INSERT OR REPLACE INTO users (id, name) VALUES ('alice', 'z')",
            "INSERT INTO orders (id, user_id) VALUES (42, 'alice')",
            "INSERT INTO \"it's\" VALUES ('carol')",
            "INSERT INTO local VALUES ('a table without a one-column key is the node''s own')",
            "UPDATE users SET name = 'nobody' WHERE id = 'nobody'",
            // Deletes cannot misplace a row (see the module notes).
            "DELETE FROM users WHERE id = 'bob'",
            // Written, then gone before the request ends: nothing is left misplaced.
            "INSERT INTO users (id) VALUES ('tmp'); DELETE FROM users WHERE id = 'tmp';",
        ] {
            assert_eq!(
                run(&conn, &schema, &["alice", "carol", "42"], sql),
                None,
                "{sql}"
            );
        }
    }

    #[test]
    fn inserts_and_updates_of_other_keys_are_caught_whatever_did_them() {
        let (conn, schema) = setup();
        let cases = [
            (
                "UPDATE users SET id = 'zed' WHERE id = 'alice'",
                stray("users", Some("zed")),
            ),
            (
                "UPDATE users SET name = 'x' WHERE id = 'bob'",
                stray("users", Some("bob")),
            ),
            ("UPDATE users SET name = 'x'", stray("users", Some("bob"))),
            (
                "INSERT INTO users (id) VALUES ('other')",
                stray("users", Some("other")),
            ),
            (
                "INSERT INTO \"it's\" VALUES ('other')",
                stray("it's", Some("other")),
            ),
            // SQLite numbers the row itself: 1 is not the request's key.
            (
                "INSERT INTO orders (user_id) VALUES ('alice')",
                stray("orders", Some("1")),
            ),
            ("UPDATE orders SET id = 7 WHERE id = 42", None),
            (
                "INSERT INTO users (id) VALUES (x'00')",
                stray("users", None),
            ),
        ];
        for (sql, want) in cases {
            assert_eq!(run(&conn, &schema, &["alice"], sql), want, "{sql}");
        }
        // A user's trigger writes as part of the request.
        conn.execute_batch(
            "CREATE TRIGGER audit AFTER UPDATE ON users BEGIN
               INSERT INTO orders (user_id) VALUES (NEW.id);
             END;",
        )
        .unwrap();
        assert_eq!(
            run(
                &conn,
                &schema,
                &["alice"],
                "UPDATE users SET name = 'x' WHERE id = 'alice'"
            ),
            stray("orders", Some("1"))
        );
    }

    #[test]
    fn unchecked_without_keys_and_outside_a_scope() {
        let (conn, schema) = setup();
        conn.execute_batch("UPDATE users SET name = 'x'").unwrap();
        assert!(WATCH.with(|t| t.borrow().is_none()));
        assert_eq!(
            run(&conn, &schema, &[], "UPDATE users SET id = id || '!'"),
            None
        );
        // The scope ends with the write, even when the write fails.
        let failed = within(
            &conn,
            &schema,
            &["alice".to_owned()],
            || -> Result<(), NodeError> {
                conn.execute_batch("UPDATE users SET name = 'y'")?;
                Err(NodeError::InvalidRequest("no".into()))
            },
        );
        assert!(matches!(failed, Err(NodeError::InvalidRequest(_))));
        assert!(WATCH.with(|t| t.borrow().is_none()));
        // Rows of the node's own tables are not even kept.
        let kept = within(&conn, &schema, &["alice".to_owned()], || {
            conn.execute_batch(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000)
                 INSERT INTO local SELECT i FROM n;
                 UPDATE users SET name = 'z' WHERE id = 'alice';",
            )?;
            Ok(WATCH.with(|w| w.borrow().as_ref().map(|w| w.touched.len())))
        });
        assert_eq!(kept.unwrap(), Some(1), "only the users row");
    }
}
