//! Migrations and their ledger, `_shardlite_migrations`.
//!
//! The proxy sends the whole known set every time. Before anything runs, the set is checked
//! against the ledger: an applied version whose name or checksum changed is a 409, as is a
//! new version below the highest applied one (migrations are forward-only; running it late
//! would give shards different histories). Then each pending version runs in its own
//! `BEGIN IMMEDIATE` transaction together with its ledger row, in version order; the first
//! failure is rolled back and reported, and the ones before it stay applied.

use std::collections::{BTreeMap, HashSet};

use rusqlite::{Connection, ErrorCode, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::db::rollback;
use crate::error::NodeError;
use crate::guard::{self, INTERNAL_PREFIX, Mode, Scope};

/// The ledger, created when a node opens its file.
const LEDGER_DDL: &str = "CREATE TABLE IF NOT EXISTS _shardlite_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    checksum TEXT NOT NULL,
    applied_at TEXT NOT NULL
)";

/// SHA-256 of a migration's SQL text, as lowercase hex.
pub fn checksum(sql: &str) -> String {
    Sha256::digest(sql.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One migration as the proxy sends it.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Migration {
    pub version: i64,
    pub name: String,
    pub sql: String,
}

/// One row of the ledger.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct AppliedMigration {
    pub version: i64,
    pub name: String,
    pub checksum: String,
    /// RFC 3339, UTC, with milliseconds.
    pub applied_at: String,
}

/// `POST /v1/migrations` body.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct MigrateRequest {
    pub migrations: Vec<Migration>,
}

/// `POST /v1/migrations` answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct MigrateResponse {
    /// Versions applied by this request, in order.
    pub applied: Vec<i64>,
    /// The highest applied version afterwards; 0 when none is.
    pub current: i64,
}

/// `GET /v1/migrations` answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct MigrationsResponse {
    pub applied: Vec<AppliedMigration>,
}

pub(crate) fn create_ledger(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(LEDGER_DDL)
}

/// The ledger, by version.
pub(crate) fn applied(conn: &Connection) -> rusqlite::Result<Vec<AppliedMigration>> {
    conn.prepare_cached(
        "SELECT version, name, checksum, applied_at FROM _shardlite_migrations ORDER BY version",
    )?
    .query_map([], |row| {
        Ok(AppliedMigration {
            version: row.get(0)?,
            name: row.get(1)?,
            checksum: row.get(2)?,
            applied_at: row.get(3)?,
        })
    })?
    .collect()
}

/// Checks the request on its own, before the database is touched.
pub(crate) fn validate(migrations: &[Migration]) -> Result<(), NodeError> {
    let mut seen = HashSet::new();
    for m in migrations {
        if m.version < 1 {
            return Err(NodeError::InvalidMigration(format!(
                "migration {:?} has version {}; versions start at 1",
                m.name, m.version
            )));
        }
        if !seen.insert(m.version) {
            return Err(NodeError::InvalidMigration(format!(
                "version {} appears twice",
                m.version
            )));
        }
        if m.name.trim().is_empty() {
            return Err(NodeError::InvalidMigration(format!(
                "migration {} has no name",
                m.version
            )));
        }
        if m.sql.to_ascii_lowercase().contains(INTERNAL_PREFIX) {
            return Err(NodeError::InvalidMigration(format!(
                "migration {} ({}) names a {INTERNAL_PREFIX}* table; those belong to shardlite",
                m.version, m.name
            )));
        }
    }
    Ok(())
}

/// Refuses the set if it disagrees with the ledger; returns the pending migrations in order.
fn plan<'m>(
    ledger: &[AppliedMigration],
    migrations: &'m [Migration],
) -> Result<Vec<&'m Migration>, NodeError> {
    let by_version: BTreeMap<i64, &AppliedMigration> =
        ledger.iter().map(|a| (a.version, a)).collect();
    let highest = ledger.iter().map(|a| a.version).max().unwrap_or(0);
    let mut pending = Vec::new();
    for m in migrations {
        match by_version.get(&m.version) {
            Some(applied) => {
                let sum = checksum(&m.sql);
                if applied.checksum != sum || applied.name != m.name {
                    return Err(NodeError::MigrationConflict(format!(
                        "migration {} was applied as {:?} with checksum {}, but is now {:?} \
                         with checksum {sum}; applied migrations cannot change: undo the edit \
                         and add a new migration instead",
                        m.version, applied.name, applied.checksum, m.name
                    )));
                }
            }
            None if m.version < highest => {
                return Err(NodeError::MigrationConflict(format!(
                    "migration {} ({}) is older than the highest applied version {highest} but \
                     was never applied here; migrations are forward-only: give it a version \
                     above {highest}",
                    m.version, m.name
                )));
            }
            None => pending.push(m),
        }
    }
    pending.sort_by_key(|m| m.version);
    Ok(pending)
}

/// Applies the pending migrations, each in its own transaction with its ledger row.
pub(crate) fn apply(
    conn: &Connection,
    migrations: &[Migration],
) -> Result<MigrateResponse, NodeError> {
    let ledger = applied(conn)?;
    let pending = plan(&ledger, migrations)?;
    let mut newly = Vec::new();
    for m in pending {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let outcome = {
            let _scope = Scope::enter(Mode::Migration, None);
            conn.execute_batch(&m.sql)
        };
        let outcome = outcome.map_err(|e| failure(m, &e)).and_then(|()| {
            conn.execute(
                "INSERT INTO _shardlite_migrations (version, name, checksum, applied_at) \
                 VALUES (?1, ?2, ?3, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
                params![m.version, m.name, checksum(&m.sql)],
            )?;
            conn.execute_batch("COMMIT").map_err(|e| failure(m, &e))
        });
        if let Err(e) = outcome {
            rollback(conn);
            tracing::warn!(version = m.version, name = %m.name, "migration failed, rolled back");
            return Err(e);
        }
        tracing::info!(version = m.version, name = %m.name, "migration applied");
        newly.push(m.version);
    }
    let current = applied(conn)?.iter().map(|a| a.version).max().unwrap_or(0);
    Ok(MigrateResponse {
        applied: newly,
        current,
    })
}

fn failure(m: &Migration, e: &rusqlite::Error) -> NodeError {
    let denial = match e.sqlite_error_code() {
        Some(ErrorCode::AuthorizationForStatementDenied) => guard::take_denial(),
        _ => None,
    };
    NodeError::MigrationFailed {
        version: m.version,
        name: m.name.clone(),
        message: denial.map_or_else(|| e.to_string(), |d| d.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_is_sha256_hex() {
        assert_eq!(
            checksum(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            checksum("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn validation_refuses_internal_tables_and_duplicates() {
        let m = |version, sql: &str| Migration {
            version,
            name: "x".into(),
            sql: sql.into(),
        };
        assert!(validate(&[m(1, "CREATE TABLE a (id PRIMARY KEY)")]).is_ok());
        assert!(validate(&[m(1, "DROP TABLE _SHARDLITE_migrations")]).is_err());
        assert!(validate(&[m(1, "SELECT 1"), m(1, "SELECT 2")]).is_err());
        assert!(validate(&[m(0, "SELECT 1")]).is_err());
    }
}
