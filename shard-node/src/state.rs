//! `NodeState`: the pools, the configuration, the cached schema and the rebalance state
//! (fences, whether changes are captured), shared by every handler.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use rusqlite::Connection;

use crate::config::NodeConfig;
use crate::db::{self, Db};
use crate::error::NodeError;
use crate::fence::{self, FenceSet};
use crate::schema::{Schema, TableSchema};
use crate::transfer;

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
    /// The fences in force: a copy of `_shardlite_fences`, replaced whole, and only while the
    /// writer connection is held, right after the transaction that changed the table commits.
    /// A write holding the writer therefore sees the same set as the table.
    fences: RwLock<Arc<FenceSet>>,
    /// Whether capture is installed (`_shardlite_changes` exists). Changed, like `fences`,
    /// only while the writer is held; writes use it to decide whether to check what they logged.
    capturing: AtomicBool,
    /// Runs inside every client write transaction just before `COMMIT`: lets a test hold a
    /// write in flight.
    #[cfg(test)]
    before_commit: std::sync::Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
}

impl NodeState {
    /// Opens (or creates) the database file: WAL, pools, the migration ledger, the schema.
    /// Blocking; call it before serving.
    pub fn open(config: NodeConfig) -> Result<NodeState, NodeError> {
        let db = Db::open(&config)?;
        let (schema, fences, capturing) = {
            let writer = db.writer()?;
            (
                Schema::load(&writer)?,
                fence::load(&writer)?,
                transfer::capture_installed(&writer)?,
            )
        };
        tracing::info!(
            db = %config.db_path.display(),
            tables = schema.tables().count(),
            fences = fences.list.len(),
            capturing,
            "node database open"
        );
        Ok(NodeState {
            inner: Arc::new(Inner {
                config,
                db,
                schema: RwLock::new(Arc::new(schema)),
                fences: RwLock::new(Arc::new(fences)),
                capturing: AtomicBool::new(capturing),
                #[cfg(test)]
                before_commit: std::sync::Mutex::new(None),
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

    /// The fences in force. Consistent with `_shardlite_fences` when read holding the writer.
    pub(crate) fn fences(&self) -> Arc<FenceSet> {
        // The lock only guards an `Arc` swap, as for the schema.
        Arc::clone(
            &self
                .inner
                .fences
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Installs a new fence set. Call it only holding the writer, after the commit that
    /// stored it.
    pub(crate) fn set_fences(&self, fences: FenceSet) {
        *self
            .inner
            .fences
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(fences);
    }

    /// Whether capture triggers and the change log are installed.
    pub(crate) fn capturing(&self) -> bool {
        self.inner.capturing.load(Ordering::Acquire)
    }

    /// Records whether capture is installed. Call it only holding the writer, after the
    /// commit that installed or removed it.
    pub(crate) fn set_capturing(&self, on: bool) {
        self.inner.capturing.store(on, Ordering::Release);
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

    /// Makes every client write run `hook` just before its `COMMIT`.
    #[cfg(test)]
    pub(crate) fn set_before_commit_hook(&self, hook: impl Fn() + Send + Sync + 'static) {
        *self
            .inner
            .before_commit
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(hook));
    }

    #[cfg(test)]
    pub(crate) fn run_before_commit_hook(&self) {
        let hook = self
            .inner
            .before_commit
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(hook) = hook {
            hook();
        }
    }
}
