//! `NodeState`: the readers, the writer thread, the configuration, the cached schema and the
//! rebalance state (fences, whether changes are captured), shared by every handler.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use rusqlite::Connection;

use crate::checkpoint::Checkpointer;
use crate::config::NodeConfig;
use crate::db::{self, Db};
use crate::error::NodeError;
use crate::fence::{self, FenceSet};
use crate::schema::{Schema, TableSchema};
use crate::transfer;
use crate::writer::{Shared, Writer};

/// The cached schema, replaced whole after a migration; readers clone the `Arc` and drop the
/// lock at once.
#[derive(Clone)]
pub(crate) struct SchemaCell(Arc<RwLock<Arc<Schema>>>);

impl SchemaCell {
    fn new(schema: Schema) -> SchemaCell {
        SchemaCell(Arc::new(RwLock::new(Arc::new(schema))))
    }

    pub(crate) fn get(&self) -> Arc<Schema> {
        // The lock only guards an `Arc` swap, so a poisoned lock still holds a whole schema.
        Arc::clone(&self.0.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn set(&self, schema: Schema) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(schema);
    }
}

/// An open node. Cloning is cheap: every clone shares the same readers, writer thread and
/// schema cache. When the last clone is dropped, the writer finishes the writes already
/// queued and closes the file.
#[derive(Clone)]
pub struct NodeState {
    inner: Arc<Inner>,
}

struct Inner {
    config: NodeConfig,
    /// The readers. Declared before `writer`, so dropped first: the writer's connection is
    /// then the last to close, and closing it checkpoints the WAL and removes it.
    db: Db,
    schema: SchemaCell,
    /// Fences, capture and the write counters, which the writer thread sees too.
    shared: Arc<Shared>,
    /// Checkpoints the WAL off the writer thread. Declared before `writer`: it is stopped, and
    /// its connection closed, before the writer's.
    _checkpointer: Checkpointer,
    /// The writer thread's queue. Dropping it lets the thread finish what is queued.
    writer: Writer,
    /// The node id the file was claimed as (`identity`), as stored; changed only on the
    /// writer thread, right after the transaction that stored the change.
    identity: std::sync::RwLock<Option<String>>,
    /// `POST /v1/ops` exchanges served, and the operations they carried.
    op_sets: AtomicU64,
    ops: AtomicU64,
}

impl NodeState {
    /// Opens (or creates) the database file: WAL, the readers, the migration ledger, the
    /// schema, and starts the writer thread. Blocking; call it before serving.
    pub fn open(config: NodeConfig) -> Result<NodeState, NodeError> {
        let lock = crate::lock::lock(&config.db_path)?;
        let db = Db::open(&config)?;
        let writer = db.opener().open().map_err(|source| NodeError::Open {
            path: config.db_path.clone(),
            source,
        })?;
        let schema = Schema::load(&writer)?;
        let fences = fence::load(&writer)?;
        let capturing = transfer::capture_installed(&writer)?;
        let identity = crate::identity::load(&writer)?;
        tracing::info!(
            db = %config.db_path.display(),
            tables = schema.tables().count(),
            fences = fences.list.len(),
            synchronous = config.synchronous.pragma_value(),
            capturing,
            node = identity.as_deref().unwrap_or("(not claimed yet)"),
            "node database open"
        );
        let shared = Arc::new(Shared::new(fences, capturing));
        let checkpointer = Checkpointer::start(db.opener(), &writer, Arc::clone(&shared))?;
        let writer = Writer::start(writer, db.opener().clone(), Arc::clone(&shared), lock)?;
        Ok(NodeState {
            inner: Arc::new(Inner {
                config,
                db,
                schema: SchemaCell::new(schema),
                shared,
                _checkpointer: checkpointer,
                writer,
                identity: std::sync::RwLock::new(identity),
                op_sets: AtomicU64::new(0),
                ops: AtomicU64::new(0),
            }),
        })
    }

    /// The configuration the node was opened with.
    pub fn config(&self) -> &NodeConfig {
        &self.inner.config
    }

    /// The node id this file was claimed as, if any (see `identity`).
    pub fn identity(&self) -> Option<String> {
        self.held_identity().clone()
    }

    /// Whether this file was claimed as `id` (`None`: never claimed), read without copying.
    pub(crate) fn claimed_as(&self, id: &str) -> Option<bool> {
        self.held_identity().as_deref().map(|held| held == id)
    }

    fn held_identity(&self) -> std::sync::RwLockReadGuard<'_, Option<String>> {
        self.inner
            .identity
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set_identity(&self, id: Option<String>) {
        *self
            .inner
            .identity
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = id;
    }

    /// Claims the file as node `id` unless it is claimed already; the id it holds afterwards.
    pub(crate) async fn claim_identity(&self, id: String) -> Result<String, NodeError> {
        if let Some(held) = self.identity() {
            return Ok(held);
        }
        self.write(move |state, conn| {
            let held = crate::identity::claim(conn, &id)?;
            if state.identity().is_none() {
                tracing::info!(node = %held, "node claimed by its proxy");
            }
            state.set_identity(Some(held.clone()));
            Ok(held)
        })
        .await
    }

    /// Forgets the id the file was claimed as (the node left the cluster); the id it had.
    pub(crate) async fn release_identity(&self) -> Result<Option<String>, NodeError> {
        self.write(|state, conn| {
            let held = crate::identity::release(conn)?;
            state.set_identity(None);
            if let Some(id) = &held {
                tracing::info!(node = %id, "node released by its proxy: it may be added again under any id");
            }
            Ok(held)
        })
        .await
    }

    /// The cached schema.
    pub(crate) fn schema(&self) -> Arc<Schema> {
        self.inner.schema.get()
    }

    /// A handle on the cached schema that does not keep the node open: for work queued on the
    /// writer that is dropped after it answered (a client write's closure). Holding a
    /// `NodeState` there could make the writer thread hold the last one, and then nothing
    /// would wait for it to close the file.
    pub(crate) fn schema_cell(&self) -> SchemaCell {
        self.inner.schema.clone()
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
        self.inner.schema.set(Schema::load(conn)?);
        Ok(())
    }

    /// The fences in force. Consistent with `_shardlite_fences` when read on the writer thread.
    pub(crate) fn fences(&self) -> Arc<FenceSet> {
        self.inner.shared.fences()
    }

    /// Installs a new fence set. Call it only on the writer thread, after the commit that
    /// stored it.
    pub(crate) fn set_fences(&self, fences: FenceSet) {
        self.inner.shared.set_fences(fences);
    }

    /// Whether capture triggers and the change log are installed.
    pub(crate) fn capturing(&self) -> bool {
        self.inner.shared.capturing()
    }

    /// Records whether capture is installed. Call it only on the writer thread, after the
    /// commit that installed or removed it.
    pub(crate) fn set_capturing(&self, on: bool) {
        self.inner.shared.set_capturing(on);
    }

    /// Counts one `POST /v1/ops` exchange of `ops` operations.
    pub(crate) fn count_op_set(&self, ops: usize) {
        self.inner.op_sets.fetch_add(1, Ordering::Relaxed);
        self.inner.ops.fetch_add(ops as u64, Ordering::Relaxed);
    }

    /// (`POST /v1/ops` exchanges, operations in them) since the node opened.
    pub(crate) fn op_counts(&self) -> (u64, u64) {
        (
            self.inner.op_sets.load(Ordering::Relaxed),
            self.inner.ops.load(Ordering::Relaxed),
        )
    }

    /// (client writes answered, transactions that committed them) since the node opened.
    pub(crate) fn write_counts(&self) -> (u64, u64) {
        self.inner.shared.counts()
    }

    /// Runs `f` alone on the writer thread, between two groups of client writes, and waits
    /// for its answer; whatever transaction `f` leaves open is rolled back. For fences,
    /// capture, transfer apply and purge, and migrations.
    pub(crate) async fn write<T, F>(&self, f: F) -> Result<T, NodeError>
    where
        F: FnOnce(&NodeState, &Connection) -> Result<T, NodeError> + Send + 'static,
        T: Send + 'static,
    {
        let state = self.clone();
        self.inner
            .writer
            .run_alone(move |conn| f(&state, conn))
            .await
    }

    /// Runs a client write on the writer thread, grouped with the client writes queued beside
    /// it into one transaction, and answers after that transaction commits. `keys` (routing
    /// texts) are checked against the fences, and so, with capture on, are the keys `work`
    /// logs; `rows` is the request's weight in its group. `work` runs inside the request's
    /// savepoint; it may run more than once (if another request made SQLite roll the group's
    /// transaction back), so it must not consume what it captures.
    pub(crate) async fn client_write<T, F>(
        &self,
        keys: Vec<String>,
        rows: usize,
        work: F,
    ) -> Result<T, NodeError>
    where
        F: FnMut(&Connection) -> Result<T, NodeError> + Send + 'static,
        T: Send + 'static,
    {
        self.inner.writer.run_grouped(keys, rows, work).await
    }

    /// Runs the futures of requests that arrived together so that their client writes reach
    /// the writer together, as one group (see `Writer::together`).
    pub(crate) async fn writes_together<F: std::future::Future>(&self, requests: F) -> F::Output {
        self.inner.writer.together(requests).await
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

    /// Runs `f` on the writer's connection between jobs, for tests that look behind the API.
    #[cfg(test)]
    pub(crate) fn with_writer_for_test<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> T + Send + 'static,
    ) -> T {
        self.inner.writer.with_connection(f)
    }

    /// Checkpoints the writer ran so that the WAL could start over.
    pub(crate) fn wal_restarts(&self) -> u64 {
        self.inner.shared.wal_restarts()
    }

    /// Makes the writer wait until the guard is dropped, so that writes queue up.
    #[cfg(test)]
    pub(crate) async fn hold_writer_for_test(&self) -> crate::writer::Hold {
        self.inner.writer.hold().await
    }

    /// Jobs waiting for the writer.
    #[cfg(test)]
    pub(crate) fn queued_for_test(&self) -> usize {
        self.inner.writer.queued()
    }

    /// Makes every group of client writes run `hook` just before its `COMMIT`.
    #[cfg(test)]
    pub(crate) fn set_before_commit_hook(&self, hook: impl Fn() + Send + Sync + 'static) {
        self.inner.shared.set_before_commit_hook(hook);
    }
}
