//! Opening the database file: WAL once, then a pool of read-only readers and the one
//! read-write connection the writer thread owns, every connection set up with the same controls.

use std::path::PathBuf;
use std::time::Duration;

use r2d2::{ManageConnection, Pool, PooledConnection};
use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::config::DbConfig;
use rusqlite::limits::Limit;
use rusqlite::{Connection, OpenFlags};

use crate::config::{NodeConfig, Synchronous};
use crate::error::NodeError;
use crate::fence;
use crate::guard;
use crate::migrate;
use crate::written;

/// A pooled connection.
pub(crate) type Conn = PooledConnection<NodeManager>;

/// How long a request waits for a free reader before failing.
const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long SQLite waits on a lock held by another connection.
const BUSY_TIMEOUT_MS: u32 = 5000;

/// Prepared statements kept per connection (the node's own generated SQL only).
const STATEMENT_CACHE: usize = 64;

/// The readers, and how to open the writer, over one file.
pub(crate) struct Db {
    readers: Pool<NodeManager>,
    opener: Opener,
}

impl Db {
    pub(crate) fn open(config: &NodeConfig) -> Result<Db, NodeError> {
        let path = &config.db_path;
        let open_error = |source| NodeError::Open {
            path: path.clone(),
            source,
        };
        {
            // WAL is a property of the file: set it once, here, and never from a pool's init.
            let conn = Connection::open(path).map_err(open_error)?;
            let mode: String = conn
                .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
                .map_err(open_error)?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(NodeError::NotWal {
                    path: path.clone(),
                    mode,
                });
            }
            migrate::create_ledger(&conn).map_err(open_error)?;
            fence::create_table(&conn).map_err(open_error)?;
            crate::identity::create_table(&conn).map_err(open_error)?;
        }
        let settings = Settings {
            synchronous: config.synchronous,
            mmap_bytes: config.mmap_bytes,
            max_length: i32::try_from(config.max_body_bytes).unwrap_or(i32::MAX),
        };
        let readers = Pool::builder()
            .max_size(u32::try_from(config.readers.max(1)).unwrap_or(u32::MAX))
            .connection_timeout(CHECKOUT_TIMEOUT)
            .build(NodeManager(
                SqliteConnectionManager::file(path)
                    .with_flags(OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                    .with_init(move |conn| configure(conn, settings)),
            ))?;
        Ok(Db {
            readers,
            opener: Opener {
                path: path.clone(),
                settings,
            },
        })
    }

    /// A read-only connection.
    pub(crate) fn reader(&self) -> Result<Conn, NodeError> {
        Ok(self.readers.get()?)
    }

    /// How to open the writer's connection, at start-up and again whenever it has to be
    /// replaced.
    pub(crate) fn opener(&self) -> &Opener {
        &self.opener
    }
}

/// Opens the one read-write connection, set up like every other.
#[derive(Clone)]
pub(crate) struct Opener {
    path: PathBuf,
    settings: Settings,
}

impl Opener {
    pub(crate) fn open(&self) -> rusqlite::Result<Connection> {
        let mut conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        configure(&mut conn, self.settings)?;
        Ok(conn)
    }

    pub(crate) fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Whether `conn` still syncs as configured: a job that changes `synchronous` for one
    /// commit (a purge page) restores it, and a connection where that failed must not carry
    /// unsynced commits into client writes.
    pub(crate) fn syncs_as_configured(&self, conn: &Connection) -> bool {
        let wanted = self.settings.synchronous.level();
        match conn.query_row("PRAGMA synchronous", [], |row| row.get::<_, i64>(0)) {
            Ok(level) if level == wanted => true,
            Ok(level) => {
                tracing::warn!(
                    level,
                    wanted,
                    "dropping a connection left at another synchronous level"
                );
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "dropping a connection that cannot be checked");
                false
            }
        }
    }
}

/// Rolls back the transaction on `conn`, if one is open (SQLite ends some on its own after
/// an error, such as an interrupt).
pub(crate) fn rollback(conn: &Connection) {
    if conn.is_autocommit() {
        return;
    }
    if let Err(e) = conn.execute_batch("ROLLBACK") {
        tracing::warn!(error = %e, "rollback failed; the pool will drop the connection");
    }
}

/// Rolls back whatever transaction a request left open, before the connection is used again.
pub(crate) fn tidy(conn: &Connection) {
    if !conn.is_autocommit() {
        tracing::warn!("a request left a transaction open; rolling it back");
        rollback(conn);
    }
}

/// Whether `conn` would carry state into the next request: a transaction still open,
/// temporary objects, or a connection that cannot even be asked. Such a connection is closed,
/// never used again.
pub(crate) fn carries_state(conn: &Connection) -> bool {
    if !conn.is_autocommit() {
        tracing::warn!("dropping a connection left inside a transaction");
        return true;
    }
    match conn.query_row("SELECT count(*) FROM temp.sqlite_schema", [], |row| {
        row.get::<_, i64>(0)
    }) {
        Ok(0) => false,
        Ok(n) => {
            tracing::warn!(
                objects = n,
                "dropping a connection that holds temporary objects"
            );
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "dropping a connection that cannot be checked");
            true
        }
    }
}

/// What every connection of a node is set up with.
#[derive(Clone, Copy)]
struct Settings {
    synchronous: Synchronous,
    mmap_bytes: u64,
    /// SQLite's LENGTH limit: the largest string, blob or row.
    max_length: i32,
}

/// The controls of the project's SQLite security notes, in their order: per-connection pragmas,
/// `DbConfig`, limits, then the authorizer and the deadline check.
fn configure(conn: &mut Connection, settings: Settings) -> rusqlite::Result<()> {
    conn.busy_timeout(Duration::from_millis(u64::from(BUSY_TIMEOUT_MS)))?;
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {}; PRAGMA foreign_keys = ON; PRAGMA recursive_triggers = ON; PRAGMA mmap_size = {};",
        settings.synchronous.pragma_value(),
        settings.mmap_bytes
    ))?;
    for (option, on) in [
        (DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true),
        (DbConfig::SQLITE_DBCONFIG_TRUSTED_SCHEMA, false),
        (DbConfig::SQLITE_DBCONFIG_ENABLE_ATTACH_CREATE, false),
        (DbConfig::SQLITE_DBCONFIG_ENABLE_ATTACH_WRITE, false),
        (DbConfig::SQLITE_DBCONFIG_ENABLE_FTS3_TOKENIZER, false),
        // Capture triggers and foreign keys must keep working.
        (DbConfig::SQLITE_DBCONFIG_ENABLE_TRIGGER, true),
        (DbConfig::SQLITE_DBCONFIG_ENABLE_FKEY, true),
    ] {
        conn.set_db_config(option, on)?;
    }
    for (limit, value) in limits(settings.max_length) {
        conn.set_limit(limit, value)?;
    }
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    // Notes the rows keyed SQL inserts or updates (see `written`); idle outside it.
    written::install(conn)?;
    guard::install(conn)
}

/// Run-time limits on every connection. Starting from <https://www.sqlite.org/security.html>;
/// where we differ, the reason is beside the value.
fn limits(max_length: i32) -> [(Limit, i32); 11] {
    [
        // No ATTACH at all, and so no VACUUM [INTO] either, even if the authorizer slipped.
        (Limit::SQLITE_LIMIT_ATTACHED, 0),
        // A value can be as large as a request body may be, no larger.
        (Limit::SQLITE_LIMIT_LENGTH, max_length),
        // Migrations and hand-written reports are longer than sqlite.org's 100 KB.
        (Limit::SQLITE_LIMIT_SQL_LENGTH, 1_000_000),
        // SQLite's default: the limit also caps the columns of user tables and of SELECT *.
        (Limit::SQLITE_LIMIT_COLUMN, 2000),
        // sqlite.org says 10; `a = ? OR a = ? OR ...` filters go deeper than that.
        (Limit::SQLITE_LIMIT_EXPR_DEPTH, 100),
        // sqlite.org says 3; a 4-way UNION ALL is an ordinary report, and the statement
        // deadline bounds the work anyway (multi-row VALUES is not counted here).
        (Limit::SQLITE_LIMIT_COMPOUND_SELECT, 10),
        // sqlite.org says 25,000; a multi-row INSERT compiles to a few ops per value and
        // would hit that near a thousand rows. The deadline bounds the work, not this.
        (Limit::SQLITE_LIMIT_VDBE_OP, 250_000),
        // json_object() takes two arguments per key; 8 would make it useless.
        (Limit::SQLITE_LIMIT_FUNCTION_ARG, 100),
        (Limit::SQLITE_LIMIT_LIKE_PATTERN_LENGTH, 50),
        // SQLite's default maximum: multi-row INSERTs bind many parameters.
        (Limit::SQLITE_LIMIT_VARIABLE_NUMBER, 32766),
        (Limit::SQLITE_LIMIT_TRIGGER_DEPTH, 10),
    ]
}

/// `SqliteConnectionManager` for the readers, plus a check-in test: a connection that would
/// carry state into the next request is reported broken, and r2d2 drops it instead of pooling it.
///
/// r2d2 0.8 has no way to take a connection out of a `PooledConnection`; `has_broken` is the
/// hook it calls at every check-in, so the decision lives here and covers every path
/// (errors and panics included), not only the ones that remember to check.
pub(crate) struct NodeManager(SqliteConnectionManager);

impl ManageConnection for NodeManager {
    type Connection = Connection;
    type Error = rusqlite::Error;

    fn connect(&self) -> Result<Connection, rusqlite::Error> {
        self.0.connect()
    }

    fn is_valid(&self, conn: &mut Connection) -> Result<(), rusqlite::Error> {
        self.0.is_valid(conn)
    }

    fn has_broken(&self, conn: &mut Connection) -> bool {
        carries_state(conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> (tempfile::TempDir, Db) {
        open_with(|_| {})
    }

    /// A database in a fresh directory, opened with the defaults as `change` leaves them.
    fn open_with(change: impl FnOnce(&mut NodeConfig)) -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let mut config = NodeConfig::new(dir.path().join("node.db"));
        change(&mut config);
        let db = Db::open(&config).unwrap();
        (dir, db)
    }

    fn pragma(conn: &Connection, name: &str) -> String {
        conn.query_row(&format!("PRAGMA {name}"), [], |row| {
            row.get::<_, rusqlite::types::Value>(0)
        })
        .map(|v| match v {
            rusqlite::types::Value::Integer(i) => i.to_string(),
            rusqlite::types::Value::Text(s) => s,
            other => format!("{other:?}"),
        })
        .unwrap()
    }

    #[test]
    fn the_file_is_in_wal_mode_with_per_connection_pragmas() {
        let (_dir, db) = open();
        let writer = db.opener().open().unwrap();
        let reader = db.reader().unwrap();
        for conn in [&writer, &*reader] {
            assert_eq!(pragma(conn, "journal_mode"), "wal");
            assert_eq!(pragma(conn, "foreign_keys"), "1");
            assert_eq!(pragma(conn, "recursive_triggers"), "1");
            assert_eq!(pragma(conn, "synchronous"), "2"); // FULL, the default
            assert_eq!(pragma(conn, "busy_timeout"), "5000");
            // Reads go through a memory map of the file (the default, 1 GiB at most).
            assert_eq!(pragma(conn, "mmap_size"), (1u64 << 30).to_string());
            assert!(conn.db_config(DbConfig::SQLITE_DBCONFIG_DEFENSIVE).unwrap());
            assert!(
                !conn
                    .db_config(DbConfig::SQLITE_DBCONFIG_TRUSTED_SCHEMA)
                    .unwrap()
            );
            assert_eq!(conn.limit(Limit::SQLITE_LIMIT_ATTACHED).unwrap(), 0);
        }
    }

    #[test]
    fn synchronous_normal_can_be_chosen() {
        let (_dir, db) = open_with(|c| c.synchronous = Synchronous::Normal);
        assert_eq!(pragma(&db.opener().open().unwrap(), "synchronous"), "1");
    }

    #[test]
    fn the_memory_map_can_be_turned_off() {
        let (_dir, db) = open_with(|c| c.mmap_bytes = 0);
        assert_eq!(pragma(&db.opener().open().unwrap(), "mmap_size"), "0");
        assert_eq!(pragma(&db.reader().unwrap(), "mmap_size"), "0");
    }

    #[test]
    fn readers_cannot_write_even_internally() {
        let (_dir, db) = open();
        let reader = db.reader().unwrap();
        let err = reader.execute_batch("CREATE TABLE x (a)").unwrap_err();
        assert_eq!(err.sqlite_error_code(), Some(rusqlite::ErrorCode::ReadOnly));
    }

    #[test]
    fn a_reader_with_temp_objects_is_not_pooled_again() {
        let (_dir, db) = open_with(|c| c.readers = 1);
        {
            let conn = db.reader().unwrap();
            conn.execute_batch("CREATE TEMP TABLE leftover (a)")
                .unwrap();
            assert!(carries_state(&conn));
        }
        let conn = db.reader().unwrap();
        let temp: i64 = conn
            .query_row("SELECT count(*) FROM temp.sqlite_schema", [], |r| r.get(0))
            .unwrap();
        assert_eq!(temp, 0);
    }

    #[test]
    fn tidy_rolls_back_an_open_transaction() {
        let (_dir, db) = open();
        let conn = db.opener().open().unwrap();
        conn.execute_batch("BEGIN").unwrap();
        assert!(carries_state(&conn));
        tidy(&conn);
        assert!(conn.is_autocommit());
        assert!(!carries_state(&conn));
    }
}
