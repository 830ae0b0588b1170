//! `NodeState`: the pools, the configuration and the cached schema, shared by every handler.

use std::sync::{Arc, PoisonError, RwLock};

use rusqlite::Connection;

use crate::config::NodeConfig;
use crate::db::{self, Db};
use crate::error::NodeError;
use crate::schema::{Schema, TableSchema};

/// An open node. Cloning is cheap: every clone shares the same pools and schema cache.
#[derive(Clone)]
pub struct NodeState {
    inner: Arc<Inner>,
}

struct Inner {
    config: NodeConfig,
    db: Db,
    /// Replaced whole after a migration; readers clone the `Arc` and drop the lock at once.
    schema: RwLock<Arc<Schema>>,
}

impl NodeState {
    /// Opens (or creates) the database file: WAL, pools, the migration ledger, the schema.
    /// Blocking; call it before serving.
    pub fn open(config: NodeConfig) -> Result<NodeState, NodeError> {
        let db = Db::open(&config)?;
        let schema = Schema::load(&*db.writer()?)?;
        tracing::info!(
            db = %config.db_path.display(),
            tables = schema.tables().count(),
            "node database open"
        );
        Ok(NodeState {
            inner: Arc::new(Inner {
                config,
                db,
                schema: RwLock::new(Arc::new(schema)),
            }),
        })
    }

    /// The configuration the node was opened with.
    pub fn config(&self) -> &NodeConfig {
        &self.inner.config
    }

    /// The cached schema.
    pub(crate) fn schema(&self) -> Arc<Schema> {
        // The lock only guards an `Arc` swap, so a poisoned lock still holds a whole schema.
        Arc::clone(
            &self
                .inner
                .schema
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// A sharded table by name, or 404.
    pub(crate) fn table(&self, name: &str) -> Result<TableSchema, NodeError> {
        self.schema()
            .table(name)
            .cloned()
            .ok_or_else(|| NodeError::UnknownTable(name.to_owned()))
    }

    /// Re-reads the schema (after migrations).
    pub(crate) fn refresh_schema(&self, conn: &Connection) -> Result<(), NodeError> {
        let schema = Arc::new(Schema::load(conn)?);
        *self
            .inner
            .schema
            .write()
            .unwrap_or_else(PoisonError::into_inner) = schema;
        Ok(())
    }

    /// Runs `f` on the writer, on a blocking thread; whatever transaction `f` leaves open is
    /// rolled back.
    pub(crate) async fn write<T, F>(&self, f: F) -> Result<T, NodeError>
    where
        F: FnOnce(&NodeState, &Connection) -> Result<T, NodeError> + Send + 'static,
        T: Send + 'static,
    {
        let state = self.clone();
        tokio::task::spawn_blocking(move || {
            let conn = state.inner.db.writer()?;
            let out = f(&state, &conn);
            db::tidy(&conn);
            out
        })
        .await?
    }

    /// Runs `f` on a read-only connection, on a blocking thread.
    pub(crate) async fn read<T, F>(&self, f: F) -> Result<T, NodeError>
    where
        F: FnOnce(&NodeState, &Connection) -> Result<T, NodeError> + Send + 'static,
        T: Send + 'static,
    {
        let state = self.clone();
        tokio::task::spawn_blocking(move || {
            let conn = state.inner.db.reader()?;
            let out = f(&state, &conn);
            db::tidy(&conn);
            out
        })
        .await?
    }

    /// A writer connection for tests that look behind the API.
    #[cfg(test)]
    pub(crate) fn writer_for_test(&self) -> db::Conn {
        self.inner
            .db
            .writer()
            .expect("the writer is free between test requests")
    }
}
