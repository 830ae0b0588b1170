//! The authorizer, the thread-local mode it asks, and the statement deadline.
//!
//! SQLite calls the authorizer while it prepares a statement (and again if it re-prepares one
//! while stepping, after a schema change). The callback is installed once per connection, so it
//! cannot know whose SQL it is judging; it asks a thread-local [`Mode`] instead. The mode is
//! `Internal` unless a [`Scope`] says otherwise, and a scope restores the previous mode when it
//! is dropped, on errors and panics too. This is sound because a request's SQLite work runs
//! on one thread: a reader's `spawn_blocking` thread from checkout to check-in, or the writer
//! thread, which runs the requests of a group one at a time, each statement in its own scope.
//!
//! When the authorizer refuses, SQLite only says "not authorized"; the reason is kept in a
//! thread-local [`Denial`] so the answer can say what was refused and what to do instead.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::time::Instant;

use rusqlite::Connection;
use rusqlite::ffi;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};

// The change log, which capture triggers (and only they) may insert into.
use crate::transfer::{CAPTURE_TRIGGER_PREFIX, CHANGES_TABLE as CHANGE_LOG};

/// Whose SQL is being prepared or stepped on this thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The node's own fixed SQL: schema reads, upserts, the ledger. Never refused.
    Internal,
    /// A migration's SQL: DDL is its job, but it may not end our transaction, attach files or
    /// load extensions.
    Migration,
    /// Client SQL sent with a key, on the writer.
    Client,
    /// Client SQL sent without a key, on a reader: no writes at all.
    ClientReadOnly,
}

/// Why the authorizer refused a statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denial {
    /// ATTACH, DETACH or VACUUM (SQLite authorizes VACUUM as an ATTACH).
    Attach,
    /// A PRAGMA outside the read-only introspection list.
    Pragma(String),
    /// `load_extension()` or `fts3_tokenizer()`.
    Function(String),
    /// BEGIN, COMMIT, ROLLBACK or SAVEPOINT from a client.
    Transaction,
    /// BEGIN, COMMIT or ROLLBACK inside a migration.
    MigrationTransaction,
    /// A PRAGMA that would change the writer's settings, inside a migration.
    MigrationPragma(String),
    /// CREATE, ALTER or DROP of a table, index, trigger, view or virtual table.
    SchemaChange,
    /// A TEMP table, view, index or trigger (they would outlive the request on a connection
    /// that serves the next ones).
    Temporary,
    /// REINDEX or ANALYZE.
    Maintenance,
    /// A `_shardlite_*` table.
    InternalTable(String),
    /// A virtual table that exposes the file's pages or the node's statements.
    Introspection(String),
    /// `main.<table>` in a keyless read narrowed to owned ranges: it would skip the narrowing.
    Unnarrowed(String),
    /// INSERT, UPDATE or DELETE on the keyless, read-only path.
    WriteNeedsKey,
    /// An action this node does not know; refused to fail closed.
    Unrecognized(i32),
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denial::Attach => {
                f.write_str("not allowed: ATTACH, DETACH and VACUUM cannot be run through the API")
            }
            Denial::Pragma(name) => write!(
                f,
                "not allowed: PRAGMA {name}; only read-only introspection is allowed \
                 ({}), and settings belong to the node",
                INTROSPECTION_PRAGMAS.join(", ")
            ),
            Denial::Function(name) => write!(f, "not allowed: the function {name}()"),
            Denial::Transaction => f.write_str(
                "not allowed: BEGIN, COMMIT, ROLLBACK and SAVEPOINT; the node runs each request \
                 in one transaction: send a \"statements\" list with a key to run several \
                 statements together",
            ),
            Denial::MigrationTransaction => f.write_str(
                "not allowed in a migration: BEGIN, COMMIT and ROLLBACK; each migration already \
                 runs in its own transaction",
            ),
            Denial::MigrationPragma(name) => write!(
                f,
                "not allowed in a migration: PRAGMA {name} with a value; it would change the \
                 node's connection settings (allowed: {})",
                MIGRATION_PRAGMAS.join(", ")
            ),
            Denial::SchemaChange => f.write_str(
                "not allowed: CREATE, ALTER and DROP through the API; schema changes go through \
                 `shardlite migrate` so every shard keeps the same schema",
            ),
            Denial::Temporary => f.write_str(
                "not allowed: TEMP tables, views, indexes and triggers; use a subquery or a CTE",
            ),
            Denial::Maintenance => f.write_str("not allowed: REINDEX and ANALYZE"),
            Denial::InternalTable(name) => write!(
                f,
                "not allowed: {name} is internal to shardlite and cannot be read or written"
            ),
            Denial::Introspection(name) => write!(f, "not allowed: the table {name}"),
            Denial::Unnarrowed(name) => write!(
                f,
                "name the table {name} without \"main.\" in a keyless read while rows move \
                 between nodes (a rebalance is running or did not finish): only the plain \
                 name reads each row once"
            ),
            Denial::WriteNeedsKey => f.write_str(
                "a write needs a key: send \"key\" with the statement so it runs on the shard \
                 that owns that key; keyless SQL is read-only",
            ),
            Denial::Unrecognized(code) => {
                write!(
                    f,
                    "not allowed: an operation the node does not know (code {code})"
                )
            }
        }
    }
}

/// PRAGMAs a client may run: read-only introspection of tables and indexes.
const INTROSPECTION_PRAGMAS: &[&str] = &[
    "table_info",
    "table_xinfo",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
    "table_list",
];

/// PRAGMAs a migration may run with a value: they change the file, not the connection, or
/// are no-ops inside the migration's transaction (`foreign_keys`), which table-rebuild scripts
/// commonly include.
const MIGRATION_PRAGMAS: &[&str] = &[
    "foreign_keys",
    "defer_foreign_keys",
    "user_version",
    "application_id",
    "foreign_key_check",
    "integrity_check",
    "quick_check",
];

/// Virtual tables that expose raw pages, space use or live statements.
const INTROSPECTION_TABLES: &[&str] = &["sqlite_dbpage", "dbstat", "sqlite_stmt"];

/// Functions no SQL from outside may call.
const FORBIDDEN_FUNCTIONS: &[&str] = &["load_extension", "fts3_tokenizer"];

/// Prefix of the node's own tables.
pub(crate) const INTERNAL_PREFIX: &str = "_shardlite_";

thread_local! {
    static MODE: Cell<Mode> = const { Cell::new(Mode::Internal) };
    /// The tables a narrowed keyless read sees through filtering views (see [`Narrowed`]).
    static NARROWED: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
    static DENIAL: RefCell<Option<Denial>> = const { RefCell::new(None) };
}

/// While alive, statements prepared or stepped on this thread are judged in `mode`, and the
/// progress handler stops them after `deadline`.
#[must_use = "the mode only holds while the scope is alive"]
pub(crate) struct Scope {
    previous_mode: Mode,
    previous_deadline: Option<Instant>,
}

impl Scope {
    pub(crate) fn enter(mode: Mode, deadline: Option<Instant>) -> Scope {
        DENIAL.with(|d| d.borrow_mut().take());
        Scope {
            previous_mode: MODE.replace(mode),
            previous_deadline: DEADLINE.replace(deadline),
        }
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        MODE.set(self.previous_mode);
        DEADLINE.set(self.previous_deadline);
    }
}

/// While alive, client reads on this thread may reach `tables` only through the views that
/// narrow them: a top-level read of `main.<table>` is refused ([`Denial::Unnarrowed`]).
#[must_use = "the narrowing only holds while the scope is alive"]
pub(crate) struct Narrowed {
    previous: Vec<String>,
}

impl Narrowed {
    pub(crate) fn enter(tables: Vec<String>) -> Narrowed {
        Narrowed {
            previous: NARROWED.replace(tables),
        }
    }
}

impl Drop for Narrowed {
    fn drop(&mut self) {
        NARROWED.set(std::mem::take(&mut self.previous));
    }
}

/// The reason of the last refusal on this thread, if any.
pub(crate) fn take_denial() -> Option<Denial> {
    DENIAL.with(|d| d.borrow_mut().take())
}

/// Installs the authorizer and the deadline check on a connection. Call it last when setting a
/// connection up: from here on, only what the current mode allows runs.
pub(crate) fn install(conn: &Connection) -> rusqlite::Result<()> {
    conn.authorizer(Some(authorize))?;
    // Every ~1000 virtual machine steps: cheap, and a few microseconds of latency to a stop.
    conn.progress_handler(1000, Some(deadline_passed))?;
    Ok(())
}

fn deadline_passed() -> bool {
    DEADLINE.with(|d| d.get().is_some_and(|deadline| Instant::now() >= deadline))
}

fn authorize(ctx: AuthContext<'_>) -> Authorization {
    match check(MODE.with(Cell::get), &ctx) {
        Ok(()) => Authorization::Allow,
        Err(denial) => {
            DENIAL.with(|d| *d.borrow_mut() = Some(denial));
            Authorization::Deny
        }
    }
}

fn is_internal(table: &str) -> bool {
    table.len() >= INTERNAL_PREFIX.len()
        && table.as_bytes()[..INTERNAL_PREFIX.len()]
            .eq_ignore_ascii_case(INTERNAL_PREFIX.as_bytes())
}

fn one_of(name: &str, list: &[&str]) -> bool {
    list.iter().any(|item| item.eq_ignore_ascii_case(name))
}

fn is_attach_code(code: i32) -> bool {
    code == ffi::SQLITE_ATTACH || code == ffi::SQLITE_DETACH
}

/// The denial for writing SQLite's schema table `name`, if it is one.
fn schema_table(name: &str) -> Option<Denial> {
    if one_of(name, &["sqlite_master", "sqlite_schema"]) {
        Some(Denial::SchemaChange)
    } else if one_of(name, &["sqlite_temp_master", "sqlite_temp_schema"]) {
        Some(Denial::Temporary)
    } else {
        None
    }
}

/// A read of a narrowed table straight from the client's SQL: its plain name finds the TEMP
/// view, whose reads of `main.<table>` come with the view as accessor, so a read without one
/// named the table as `main.<table>`.
fn bypasses_narrowing(table: &str, ctx: &AuthContext<'_>) -> bool {
    ctx.accessor.is_none()
        // As the client spelled it, at least where no column is read (`count(*)`).
        && ctx.database_name.is_some_and(|db| db.eq_ignore_ascii_case("main"))
        && NARROWED.with(|n| n.borrow().iter().any(|t| t.eq_ignore_ascii_case(table)))
}

fn check(mode: Mode, ctx: &AuthContext<'_>) -> Result<(), Denial> {
    let read_only = match mode {
        Mode::Internal => return Ok(()),
        Mode::Migration => return check_migration(ctx),
        Mode::Client => false,
        Mode::ClientReadOnly => true,
    };
    match ctx.action {
        AuthAction::Attach { .. } | AuthAction::Detach { .. } => Err(Denial::Attach),
        // An ATTACH whose file name is an expression arrives without a name, so rusqlite
        // cannot build `Attach` and hands it over as `Unknown`.
        AuthAction::Unknown { code, .. } if is_attach_code(code) => Err(Denial::Attach),
        AuthAction::Unknown { code, .. } => Err(Denial::Unrecognized(code)),
        AuthAction::Pragma {
            pragma_name,
            pragma_value,
        } => {
            // The introspection pragmas only read; their argument is a table or index name.
            if !one_of(pragma_name, INTROSPECTION_PRAGMAS) {
                Err(Denial::Pragma(pragma_name.to_owned()))
            } else if let Some(table) = pragma_value.filter(|v| is_internal(v)) {
                Err(Denial::InternalTable(table.to_owned()))
            } else {
                Ok(())
            }
        }
        AuthAction::Function { function_name } if one_of(function_name, FORBIDDEN_FUNCTIONS) => {
            Err(Denial::Function(function_name.to_owned()))
        }
        AuthAction::Function { .. } | AuthAction::Select | AuthAction::Recursive => Ok(()),
        AuthAction::Transaction { .. } | AuthAction::Savepoint { .. } => Err(Denial::Transaction),
        AuthAction::CreateTempIndex { .. }
        | AuthAction::CreateTempTable { .. }
        | AuthAction::CreateTempTrigger { .. }
        | AuthAction::CreateTempView { .. }
        | AuthAction::DropTempIndex { .. }
        | AuthAction::DropTempTable { .. }
        | AuthAction::DropTempTrigger { .. }
        | AuthAction::DropTempView { .. } => Err(Denial::Temporary),
        AuthAction::CreateTable { .. }
        | AuthAction::CreateIndex { .. }
        | AuthAction::CreateTrigger { .. }
        | AuthAction::CreateView { .. }
        | AuthAction::CreateVtable { .. }
        | AuthAction::DropTable { .. }
        | AuthAction::DropIndex { .. }
        | AuthAction::DropTrigger { .. }
        | AuthAction::DropView { .. }
        | AuthAction::DropVtable { .. }
        | AuthAction::AlterTable { .. } => Err(Denial::SchemaChange),
        AuthAction::Reindex { .. } | AuthAction::Analyze { .. } => Err(Denial::Maintenance),
        AuthAction::Read { table_name, .. } => {
            if is_internal(table_name) {
                Err(Denial::InternalTable(table_name.to_owned()))
            } else if one_of(table_name, INTROSPECTION_TABLES) {
                Err(Denial::Introspection(table_name.to_owned()))
            } else if bypasses_narrowing(table_name, ctx) {
                Err(Denial::Unnarrowed(table_name.to_owned()))
            } else {
                Ok(())
            }
        }
        AuthAction::Insert { table_name } => check_write(table_name, ctx.accessor, read_only, true),
        AuthAction::Update { table_name, .. } | AuthAction::Delete { table_name } => {
            check_write(table_name, ctx.accessor, read_only, false)
        }
        // `AuthAction` is non-exhaustive: whatever a future SQLite adds is refused.
        _ => Err(Denial::Unrecognized(-1)),
    }
}

/// INSERT (`insert`), UPDATE or DELETE on `table` by client SQL.
fn check_write(
    table: &str,
    accessor: Option<&str>,
    read_only: bool,
    insert: bool,
) -> Result<(), Denial> {
    // DDL writes the schema table before anything else, so a refusal there must say "DDL",
    // not "write".
    if let Some(denial) = schema_table(table) {
        return Err(denial);
    }
    let by_capture_trigger = insert
        && table.eq_ignore_ascii_case(CHANGE_LOG)
        && accessor.is_some_and(|trigger| trigger.starts_with(CAPTURE_TRIGGER_PREFIX));
    if is_internal(table) && !by_capture_trigger {
        Err(Denial::InternalTable(table.to_owned()))
    } else if read_only {
        Err(Denial::WriteNeedsKey)
    } else {
        Ok(())
    }
}

fn check_migration(ctx: &AuthContext<'_>) -> Result<(), Denial> {
    match ctx.action {
        AuthAction::Transaction { .. } => Err(Denial::MigrationTransaction),
        // A setting changed here would stay on the writer's connection and reach later requests.
        AuthAction::Pragma {
            pragma_name,
            pragma_value: Some(_),
        } if !one_of(pragma_name, MIGRATION_PRAGMAS)
            && !one_of(pragma_name, INTROSPECTION_PRAGMAS) =>
        {
            Err(Denial::MigrationPragma(pragma_name.to_owned()))
        }
        AuthAction::Attach { .. } | AuthAction::Detach { .. } => Err(Denial::Attach),
        AuthAction::Unknown { code, .. } if is_attach_code(code) => Err(Denial::Attach),
        AuthAction::Function { function_name } if one_of(function_name, FORBIDDEN_FUNCTIONS) => {
            Err(Denial::Function(function_name.to_owned()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
            .unwrap();
        install(&conn).unwrap();
        conn
    }

    #[test]
    fn internal_mode_allows_everything() {
        let conn = conn();
        conn.execute_batch("CREATE TEMP TABLE x (a); DROP TABLE x; PRAGMA foreign_keys = ON")
            .unwrap();
    }

    #[test]
    fn scope_restores_mode_even_after_a_panic() {
        let conn = conn();
        let caught = std::panic::catch_unwind(|| {
            let _scope = Scope::enter(Mode::ClientReadOnly, None);
            panic!("boom");
        });
        assert!(caught.is_err());
        assert_eq!(MODE.with(Cell::get), Mode::Internal);
        conn.execute("INSERT INTO t (v) VALUES ('x')", []).unwrap();
    }

    #[test]
    fn client_mode_records_why_it_refused() {
        let conn = conn();
        let _scope = Scope::enter(Mode::Client, None);
        let err = conn.prepare("PRAGMA journal_mode = DELETE").unwrap_err();
        assert_eq!(
            err.sqlite_error_code(),
            Some(rusqlite::ErrorCode::AuthorizationForStatementDenied)
        );
        assert_eq!(take_denial(), Some(Denial::Pragma("journal_mode".into())));
        assert!(conn.prepare("SELECT * FROM t").is_ok());
    }

    #[test]
    fn only_capture_triggers_may_write_the_change_log() {
        let conn = conn();
        conn.execute_batch(
            "CREATE TABLE _shardlite_changes (k);
             CREATE TABLE u (id INTEGER PRIMARY KEY);
             CREATE TRIGGER _shardlite_capture_t AFTER INSERT ON t
                 BEGIN INSERT INTO _shardlite_changes VALUES (new.id); END;
             CREATE TRIGGER sneaky AFTER INSERT ON u
                 BEGIN INSERT INTO _shardlite_changes VALUES (new.id); END;",
        )
        .unwrap();
        {
            let _scope = Scope::enter(Mode::Client, None);
            conn.execute("INSERT INTO t (id) VALUES (5)", []).unwrap();
            assert!(conn.execute("INSERT INTO u (id) VALUES (6)", []).is_err());
            assert_eq!(
                take_denial(),
                Some(Denial::InternalTable("_shardlite_changes".into()))
            );
            assert!(
                conn.execute("INSERT INTO _shardlite_changes VALUES (7)", [])
                    .is_err()
            );
        }
        let logged: Vec<i64> = conn
            .prepare("SELECT k FROM _shardlite_changes")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(logged, [5]);
    }

    #[test]
    fn internal_tables_are_matched_case_insensitively() {
        assert!(is_internal("_shardlite_migrations"));
        assert!(is_internal("_SHARDLITE_Changes"));
        assert!(!is_internal("shardlite"));
        assert!(!is_internal("_shard"));
    }

    #[test]
    fn deadline_interrupts_a_running_statement() {
        let conn = conn();
        let _scope = Scope::enter(Mode::Client, Some(Instant::now()));
        let err = conn
            .query_row(
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) \
                 SELECT count(*) FROM c",
                [],
                |r| r.get::<_, i64>(0),
            )
            .unwrap_err();
        assert_eq!(
            err.sqlite_error_code(),
            Some(rusqlite::ErrorCode::OperationInterrupted)
        );
    }
}
