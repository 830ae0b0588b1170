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
//! - **Row `PUT`, `DELETE` and batches.** They write exactly the keys they name; only a user's
//!   trigger on the table could reach another key, and users' triggers are the user's schema.
//!
//! A trigger-based watch that caught all of the above was built first and dropped: any trigger
//! on a table makes SQLite open a statement journal for every write to it, and batch upserts
//! through the proxy ran at half their rate.
//!
//! **Tables the update hook does not report.** SQLite's update hook is silent for a
//! `WITHOUT ROWID` table, and a table whose columns shadow every name of its rowid has no way
//! to read a reported row back. (SQLite's pre-update hook would report both, but it needs a
//! build of SQLite that this crate's dependencies cannot make without libclang.) For those
//! tables only, and only while keyed SQL runs, [`within`] puts TEMP triggers on them that hand
//! each inserted or updated row's key to a function of ours, and drops them afterwards: the
//! statement-journal cost falls on that keyed SQL alone, not on row `PUT`s or batches, and
//! a schema with no such table pays nothing. Only the tables the SQL names are watched, unless
//! the schema lets a write reach tables it does not name ([`Schema::writes_unnamed`]): creating
//! and dropping the triggers (and re-preparing the writer's cached statements after) made keyed
//! upserts about a fifth slower one after another. TEMP triggers live on the writer's connection
//! only, go with the request's savepoint if it rolls back, and client SQL may neither create
//! nor drop any (the authorizer refuses TEMP schema changes).

use std::cell::RefCell;
use std::sync::Arc;

use rusqlite::Connection;
use rusqlite::functions::FunctionFlags;
use rusqlite::hooks::Action;
use rusqlite::types::{Value, ValueRef};

use crate::error::NodeError;
use crate::guard::{self, Mode};
use crate::key::routing_text_of;
use crate::schema::{Schema, TableSchema, quote};

/// Rows of sharded tables that the write in scope inserted or updated: (table, rowid).
type Touched = Vec<(String, i64)>;

/// Rows of the tables the hook does not report (see the module notes), as their TEMP triggers
/// saw them: (table, key).
type Keyed = Vec<(String, Value)>;

/// What the hook and the triggers fill while a write is in scope: the sharded tables, and the
/// rows.
struct Watch {
    schema: Arc<Schema>,
    touched: Touched,
    keyed: Keyed,
}

/// The function the TEMP triggers of [`within`] call with each row's table and key.
const WATCH_FUNCTION: &str = "_shardlite_written";

thread_local! {
    /// Set only inside [`within`], on the thread that runs the write.
    static WATCH: RefCell<Option<Watch>> = const { RefCell::new(None) };
}

/// Installs the update hook on `conn`, and the function the TEMP triggers of [`within`] call.
/// Outside [`within`] both return at once.
pub(crate) fn install(conn: &Connection) -> rusqlite::Result<()> {
    conn.create_scalar_function(WATCH_FUNCTION, 2, FunctionFlags::SQLITE_UTF8, |ctx| {
        let table = ctx.get::<String>(0)?;
        let key = ctx.get::<Value>(1)?;
        WATCH.with(|watch| {
            if let Some(watch) = watch.borrow_mut().as_mut() {
                watch.keyed.push((table, key));
            }
        });
        Ok(Value::Null)
    })?;
    conn.update_hook(Some(|action: Action, db: &str, table: &str, rowid: i64| {
        if db != "main" || action == Action::SQLITE_DELETE {
            return;
        }
        WATCH.with(|watch| {
            // Only rows that `check` can read back by rowid are kept: a write to a table of
            // the node's own may be large and has no key to check, and a sharded table with
            // no rowid alias is watched by the TEMP triggers instead.
            if let Some(watch) = watch.borrow_mut().as_mut()
                && watch.schema.rowid_alias(table).is_some()
            {
                watch.touched.push((table.to_owned(), rowid));
            }
        });
    }))
}

/// Runs `work` (keyed SQL, on the thread that runs its SQLite work, inside its savepoint),
/// then fails it with [`NodeError::StrayWrite`] if a row it inserted or updated in a sharded
/// table now holds a key whose routing text is not in `keys`. With no keys (a direct caller's
/// keyless write), `work` runs unchecked. `sql` is the text of the statements `work` runs: the
/// tables the update hook does not report are watched only if it names them (or if the schema
/// lets a write reach a table it does not name; see [`Schema::writes_unnamed`]).
pub(crate) fn within<T>(
    conn: &Connection,
    schema: &Arc<Schema>,
    keys: &[String],
    sql: &[&str],
    work: impl FnOnce() -> Result<T, NodeError>,
) -> Result<T, NodeError> {
    if keys.is_empty() {
        return work();
    }
    let hookless: Vec<&TableSchema> = schema
        .tables()
        .filter(|t| schema.rowid_alias(&t.name).is_none())
        .filter(|t| schema.writes_unnamed() || sql.iter().any(|text| may_name(text, &t.name)))
        .collect();
    if !hookless.is_empty() {
        // Our own DDL, whatever mode the caller runs in (client SQL may create no TEMP object).
        let _internal = guard::Scope::enter(Mode::Internal, None);
        conn.execute_batch(&watch_triggers(&hookless))?;
    }
    let (out, watch) = {
        let _watching = Watching::start(Arc::clone(schema));
        let out = work();
        (out, WATCH.with(|w| w.borrow_mut().take()))
    };
    if !hookless.is_empty() {
        // `IF EXISTS`: SQL that rolled the whole transaction back took the triggers with it.
        let _internal = guard::Scope::enter(Mode::Internal, None);
        let dropped = conn.execute_batch(&unwatch_triggers(&hookless));
        if out.is_ok() {
            dropped?;
        }
    }
    let out = out?;
    let (touched, keyed) = watch.map_or_else(Default::default, |w| (w.touched, w.keyed));
    check(conn, schema, keys, touched)?;
    check_keyed(conn, schema, keys, keyed)?;
    Ok(out)
}

/// Whether SQL `text` may name the table `name`: it holds the name, ASCII letters in any case
/// (SQLite folds no other case in names), or the name has a character that quoting doubles.
/// A statement can only write a table it names, unless the schema says otherwise.
fn may_name(text: &str, name: &str) -> bool {
    if name.is_empty() || name.contains(['"', '\'', '`', ']']) {
        return true;
    }
    let (text, name) = (text.as_bytes(), name.as_bytes());
    text.windows(name.len())
        .any(|window| window.eq_ignore_ascii_case(name))
}

/// The events a watch trigger fires on: the ones that leave a row under a key.
const WATCHED_EVENTS: [&str; 2] = ["INSERT", "UPDATE"];

/// The quoted name of the watch trigger for the `i`th watched table and `event`.
fn watch_trigger(i: usize, event: &str) -> String {
    quote(&format!("_shardlite_watch_{i}_{event}"))
}

/// The TEMP triggers that report each row inserted into or updated in `tables` (with their
/// key) to [`WATCH_FUNCTION`].
fn watch_triggers(tables: &[&TableSchema]) -> String {
    let mut sql = String::new();
    for (i, table) in tables.iter().enumerate() {
        let (name, key) = (quote(&table.name), quote(&table.key));
        let literal = format!("'{}'", table.name.replace('\'', "''"));
        for event in WATCHED_EVENTS {
            sql += &format!(
                "CREATE TEMP TRIGGER {} AFTER {event} ON main.{name} BEGIN \
                 SELECT {WATCH_FUNCTION}({literal}, NEW.{key}); END;\n",
                watch_trigger(i, event),
            );
        }
    }
    sql
}

/// Drops what [`watch_triggers`] created.
fn unwatch_triggers(tables: &[&TableSchema]) -> String {
    let mut sql = String::new();
    for i in 0..tables.len() {
        for event in WATCHED_EVENTS {
            sql += &format!("DROP TRIGGER IF EXISTS temp.{};\n", watch_trigger(i, event));
        }
    }
    sql
}

/// Refuses the first row in `keyed` that is still there under a key not in `keys`.
fn check_keyed(
    conn: &Connection,
    schema: &Schema,
    keys: &[String],
    keyed: Keyed,
) -> Result<(), NodeError> {
    // Rows under the request's keys need no look-up; the first other one still there fails it.
    for (table, key) in &keyed {
        let routes = routing_text_of(ValueRef::from(key));
        if routes.as_ref().is_some_and(|k| keys.contains(k)) {
            continue;
        }
        let Some(t) = schema.table(table) else {
            continue;
        };
        // A row gone by the end of the request (deleted, or its key changed again) is nowhere.
        let sql = format!(
            "SELECT 1 FROM main.{} WHERE {} IS ?1",
            quote(&t.name),
            quote(&t.key)
        );
        if conn.prepare_cached(&sql)?.exists([key])? {
            return Err(NodeError::StrayWrite {
                table: table.clone(),
                key: routes,
                keys: keys.to_vec(),
            });
        }
    }
    Ok(())
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
    let mut table_sql: Option<(&str, String)> = None;
    for (table, rowid) in &touched {
        if table_sql.as_ref().is_none_or(|(name, _)| name != table) {
            // One statement per table: its key by rowid (the hook kept only sharded tables
            // with a rowid alias).
            let (Some(t), Some(alias)) = (schema.table(table), schema.rowid_alias(table)) else {
                continue;
            };
            let sql = format!(
                "SELECT {} FROM {} WHERE {alias} = ?1",
                quote(&t.key),
                quote(&t.name)
            );
            table_sql = Some((table, sql));
        }
        let Some((_, sql)) = &table_sql else {
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

/// Collects what the hook and the watch triggers report while alive; stops when dropped,
/// errors and panics included. (Not `guard::Scope`, the authorizer's mode.)
struct Watching;

impl Watching {
    fn start(schema: Arc<Schema>) -> Watching {
        WATCH.with(|w| {
            *w.borrow_mut() = Some(Watch {
                schema,
                touched: Vec::new(),
                keyed: Vec::new(),
            });
        });
        Watching
    }
}

impl Drop for Watching {
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
        let got = within(conn, schema, &keys, &[sql], || Ok(conn.execute_batch(sql)?));
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

    /// TEMP triggers on the writer's connection now.
    fn temp_triggers(conn: &Connection) -> i64 {
        conn.query_row(
            "SELECT count(*) FROM sqlite_temp_master WHERE type = 'trigger'",
            [],
            |r| r.get(0),
        )
        .unwrap()
    }

    #[test]
    fn tables_the_hook_cannot_report_are_watched_by_temp_triggers_during_keyed_sql_only() {
        let (conn, _) = setup();
        conn.execute_batch(
            "CREATE TABLE tags (name TEXT PRIMARY KEY, n INTEGER) WITHOUT ROWID;
             CREATE TABLE shadow (oid TEXT PRIMARY KEY, rowid TEXT, _rowid_ TEXT);
             INSERT INTO tags VALUES ('alice', 1), ('bob', 2);",
        )
        .unwrap();
        let schema = Arc::new(Schema::load(&conn).unwrap());
        assert_eq!(schema.rowid_alias("tags"), None);
        assert_eq!(schema.rowid_alias("shadow"), None);
        for (sql, want) in [
            (
                "INSERT INTO tags VALUES ('other', 1)",
                stray("tags", Some("other")),
            ),
            (
                "UPDATE tags SET name = 'zed' WHERE name = 'alice'",
                stray("tags", Some("zed")),
            ),
            (
                "UPDATE tags SET n = 9 WHERE name = 'bob'",
                stray("tags", Some("bob")),
            ),
            ("UPDATE tags SET n = n + 1", stray("tags", Some("bob"))),
            (
                "INSERT INTO shadow (oid) VALUES ('other')",
                stray("shadow", Some("other")),
            ),
            ("INSERT INTO tags VALUES (x'00', 1)", stray("tags", None)),
            ("INSERT OR REPLACE INTO tags VALUES ('alice', 5)", None),
            (
                "INSERT INTO tags VALUES ('alice', 1) ON CONFLICT (name) DO UPDATE SET n = 7",
                None,
            ),
            (
                "INSERT INTO shadow (oid, rowid) VALUES ('alice', 'x')",
                None,
            ),
            ("DELETE FROM tags WHERE name = 'bob'", None),
            // Written, then gone or moved back before the request ends.
            (
                "INSERT INTO tags VALUES ('tmp', 1); DELETE FROM tags WHERE name = 'tmp';",
                None,
            ),
            (
                "UPDATE tags SET name = 'zed' WHERE name = 'alice'; \
                 UPDATE tags SET name = 'alice' WHERE name = 'zed';",
                None,
            ),
        ] {
            assert_eq!(run(&conn, &schema, &["alice"], sql), want, "{sql}");
            assert_eq!(temp_triggers(&conn), 0, "dropped after {sql}");
        }
        // Two triggers per such table the SQL names while it runs, none around it, none for
        // a keyless write, and none when the work fails.
        let alice = ["alice".to_owned()];
        let during = |sql: &str| {
            within(&conn, &schema, &alice, &[sql], || Ok(temp_triggers(&conn))).unwrap()
        };
        assert_eq!(
            during("UPDATE tags SET n = 1; UPDATE shadow SET rowid = 1"),
            4
        );
        assert_eq!(
            during("update \"TAGS\" set n = 1"),
            2,
            "names fold ASCII case"
        );
        assert_eq!(during("UPDATE users SET name = 'x'"), 0, "names neither");
        assert_eq!(
            within(&conn, &schema, &[], &["UPDATE tags SET n = 1"], || Ok(
                temp_triggers(&conn)
            ))
            .unwrap(),
            0
        );
        let failed = within(&conn, &schema, &alice, &["INSERT INTO tags"], || {
            conn.execute_batch("INSERT INTO tags VALUES ('other', 3)")?;
            Err::<(), _>(NodeError::InvalidRequest("no".into()))
        });
        assert!(matches!(failed, Err(NodeError::InvalidRequest(_))));
        assert_eq!(temp_triggers(&conn), 0);
        conn.execute_batch("DELETE FROM tags WHERE name = 'other'")
            .unwrap();
        // Outside keyed SQL nothing is watched, and nothing is refused.
        conn.execute_batch("INSERT INTO tags VALUES ('other', 4)")
            .unwrap();
        assert!(WATCH.with(|t| t.borrow().is_none()));
        // A schema with no such table puts no trigger up.
        let (plain, plain_schema) = setup();
        let during = within(&plain, &plain_schema, &alice, &["UPDATE tags"], || {
            Ok(temp_triggers(&plain))
        });
        assert_eq!(during.unwrap(), 0);
    }

    /// A table the SQL does not name can still be written when the schema has triggers of the
    /// user's or foreign keys that act: then every such table is watched.
    #[test]
    fn tables_written_without_being_named_are_watched_when_the_schema_allows_it() {
        let (conn, _) = setup();
        conn.execute_batch(
            "PRAGMA foreign_keys = ON;
             CREATE TABLE prefs (user_id TEXT PRIMARY KEY DEFAULT 'nobody'
                 REFERENCES users (id) ON DELETE SET DEFAULT, theme TEXT) WITHOUT ROWID;
             INSERT INTO users (id) VALUES ('nobody');
             INSERT INTO prefs VALUES ('alice', 'dark');",
        )
        .unwrap();
        let schema = Arc::new(Schema::load(&conn).unwrap());
        assert!(schema.writes_unnamed());
        // Deleting alice moves her prefs row to the key 'nobody', through the foreign key.
        assert_eq!(
            run(
                &conn,
                &schema,
                &["alice"],
                "DELETE FROM users WHERE id = 'alice'"
            ),
            stray("prefs", Some("nobody"))
        );
        // A user's trigger on users writing tags.
        let (conn, _) = setup();
        conn.execute_batch(
            "CREATE TABLE tags (name TEXT PRIMARY KEY, n INTEGER) WITHOUT ROWID;
             CREATE TRIGGER tag_new AFTER INSERT ON users BEGIN
               INSERT INTO tags VALUES ('tag-' || NEW.id, 1);
             END;",
        )
        .unwrap();
        let schema = Arc::new(Schema::load(&conn).unwrap());
        assert!(schema.writes_unnamed());
        assert_eq!(
            run(
                &conn,
                &schema,
                &["carol"],
                "INSERT INTO users (id) VALUES ('carol')"
            ),
            stray("tags", Some("tag-carol"))
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
            &[],
            || -> Result<(), NodeError> {
                conn.execute_batch("UPDATE users SET name = 'y'")?;
                Err(NodeError::InvalidRequest("no".into()))
            },
        );
        assert!(matches!(failed, Err(NodeError::InvalidRequest(_))));
        assert!(WATCH.with(|t| t.borrow().is_none()));
        // Rows of the node's own tables are not even kept.
        let kept = within(&conn, &schema, &["alice".to_owned()], &[], || {
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
