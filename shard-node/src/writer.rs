//! The writer: one thread that owns the node's read-write connection and runs every write,
//! in the order the writes were queued, grouping the client writes queued together into one
//! transaction (group commit).
//!
//! # Two kinds of job
//!
//! - **Client writes** (row `PUT` and `DELETE`, batch upserts, keyed SQL) are *grouped*. The
//!   thread takes the first one from the queue, then every client write already queued behind
//!   it, up to [`MAX_GROUP_WRITES`] requests or [`MAX_GROUP_ROWS`] rows, and runs them in one
//!   transaction: `BEGIN IMMEDIATE`, the fences read once ([`Check`]), then for each request
//!   `SAVEPOINT`, the fence check and the work (`Check::run`), `RELEASE`, or, if the request
//!   failed, `ROLLBACK TO` and `RELEASE`, so the others keep their work. (A group of one
//!   runs without the savepoint: if it fails, the whole transaction is rolled back, and there
//!   is no commit.) Then one `COMMIT`,
//!   which with `synchronous=FULL` is one sync of the WAL for the whole group, and only then
//!   every request gets its answer, failures included (a failure may depend on what an earlier
//!   request of the group wrote, such as a 404 for a row deleted just before). If `BEGIN` or
//!   `COMMIT` fails, every request of the group gets that error, with one exception: a
//!   deferred foreign key is checked only at `COMMIT`, so when that check fails, the group's
//!   requests run again one by one, each in a transaction of its own, and only the request
//!   that left the key unresolved fails.
//!   The client writes of one `POST /v1/ops` set enter the queue as one job
//!   ([`Writer::together`]), so the group that takes the first of them takes them all (split
//!   only where the limits fall).
//! - **Jobs that run alone**: fence changes, capture on and off, transfer apply and purge,
//!   migrations. Each runs its own transactions on the same connection, between two groups.
//!   Gathering a group stops at the first such job in the queue; it runs right after the group.
//! - Between two jobs, when the checkpoint thread asks for it, the thread checkpoints the WAL
//!   itself so that the next transaction starts the WAL over (`checkpoint` says why).
//!
//! # Ordering, and why the rebalance argument still holds
//!
//! There is one queue and one thread, so jobs start in queue order and a job starts only after
//! the previous one committed (a group is one job). A fence `PUT` is a job that runs alone:
//! every client write queued before it was gathered into a group that committed before the
//! fence job started, and every write queued after it runs in a later group, whose `BEGIN
//! IMMEDIATE` comes after the fence's commit and whose [`Check`] is read after that `BEGIN`.
//! The in-memory fence set changes only on this thread, right after the fence's commit. So the
//! argument of `docs/rebalance.md` ("a write is never admitted before the fence and committed
//! after it") holds as it did with one pooled writer connection: a fence `PUT` answers only
//! after every write queued before it committed, and the writes it did not wait for see it.
//!
//! # Why the commit syncs on this thread
//!
//! Tried and not kept (2026-11-28): groups committed at `synchronous=NORMAL`, with a second
//! thread syncing the WAL and only then answering, so that the next group runs during the
//! sync. In alternating bench runs it was slower: direct PUT 26.7k and 26.7k req/s against
//! 30.5k, with smaller groups (14.8 writes against 17.0) and more node CPU per write (38 µs
//! against 35). A sync of the WAL takes about 150 µs here, a fraction of a group's cycle, and
//! the hand-off adds a wake-up per group. It would also have let readers see a commit before
//! it was durable.
//!
//! Also tried and not kept (2026-11-29): waiting once for more writes before committing a
//! group (PostgreSQL's `commit_delay`), 100 µs after the queue ran dry whenever the previous
//! group had two writes or more. Groups did not grow (10.6 against 10.5 writes through the
//! proxy): each node takes a write about every 100 µs there, so the wait caught about one. In
//! two alternating pairs of bench runs PUT fell, through the proxy 24.2k and 24.6k req/s
//! against 28.4k and 26.9k, direct 39.4k and 38.1k against 44.2k and 44.1k.
//!
//! Also tried and not kept (2026-11-29): SQLite built with `HAVE_FDATASYNC` (its commits call
//! `fdatasync` instead of `fsync`; `LIBSQLITE3_FLAGS` at build time). On this disk (ext4
//! without a journal) a 41 KB write plus its sync took the same with either, 122-143 µs in
//! place and 192-234 µs appended, and three alternating pairs of bench runs showed no
//! difference: direct PUT at `full` 41.6k, 42.5k and 44.9k req/s against 41.4k, 42.7k and 35.5k.
//!
//! # Per-request controls inside a group
//!
//! The authorizer's mode and the statement deadline are thread-locals (`guard`), set by a
//! `Scope` around each client statement and restored after it, so they are per request even
//! though a whole group runs on this one thread. The thread's own statements (`BEGIN`,
//! `SAVEPOINT`, `RELEASE`, `ROLLBACK TO`, `COMMIT`, the fence reads) run under an explicit
//! `Internal` scope with no deadline, so a deadline can never interrupt a commit. Client SQL
//! cannot name our savepoint: the authorizer refuses `SAVEPOINT`, `RELEASE` and `ROLLBACK`
//! from clients.
//!
//! # A lost transaction
//!
//! Most failures end only the request's savepoint. A few make SQLite roll back the whole
//! transaction: an interrupted write statement (a client statement past its deadline), `OR
//! ROLLBACK` and `RAISE(ROLLBACK)`, an I/O error, a full disk. The connection is then back in
//! autocommit. Nothing of the group has been answered yet, so the request during which it
//! happened gets its error and the other requests run again, from the start, in a new
//! transaction. Every loss removes one request, so a group runs at most as many times as it
//! has requests; the work of a client write is therefore a re-runnable `FnMut`.
//!
//! # Hygiene, failures and shutdown
//!
//! After each job the connection is checked as the readers' pool checks its connections: an
//! open transaction is rolled back; a connection that still carries state (temporary objects,
//! say, from a migration) or cannot be checked is closed, and the next job opens a new one. A
//! panic inside a job is caught: its requests get a 500 (nothing they did was committed) and
//! the thread goes on. When the last `NodeState` is dropped, the queue closes; the thread
//! finishes every job still queued, closes the connection (the last one to close checkpoints
//! the WAL) and exits, and the drop waits for it.

use std::cell::RefCell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::thread::{self, JoinHandle};

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::db::{self, Opener};
use crate::error::NodeError;
use crate::fence::{Check, FenceSet};
use crate::guard::{Mode, Scope};
use crate::lock::FileLock;

/// Most client writes one group transaction carries.
pub(crate) const MAX_GROUP_WRITES: usize = 256;

/// Most rows one group carries: a row write counts one, a batch its rows, client SQL its
/// statements. A request larger than this still runs, in a group of its own.
pub(crate) const MAX_GROUP_ROWS: usize = 10_000;

/// Jobs the queue holds; beyond that a handler waits for room (back-pressure, not an error).
pub(crate) const QUEUE_CAPACITY: usize = 4096;

/// The thread's own statements, run through the statement cache: they run once or twice per
/// request, on the one thread every write waits for.
const BEGIN: &str = "BEGIN IMMEDIATE";
const COMMIT: &str = "COMMIT";
const SAVEPOINT: &str = "SAVEPOINT shardlite_write";
const RELEASE: &str = "RELEASE shardlite_write";
const ROLLBACK_TO: &str = "ROLLBACK TO shardlite_write";
const ROLLBACK: &str = "ROLLBACK";

/// What the writer thread and the handlers both see. The thread holds it, so it must never
/// hold the writer (the thread would keep itself alive).
pub(crate) struct Shared {
    /// The fences in force: a copy of `_shardlite_fences`, replaced whole, only on the writer
    /// thread, right after the transaction that changed the table commits.
    fences: RwLock<Arc<FenceSet>>,
    /// Whether capture is installed (`_shardlite_changes` exists). Changed, like `fences`, only
    /// on the writer thread; writes use it to decide whether to check what they logged.
    capturing: AtomicBool,
    /// Client writes answered, and the transactions that carried them: `writes / commits` is
    /// the mean group size, which operators read in `/v1/stats`.
    writes: AtomicU64,
    commits: AtomicU64,
    /// Set by the checkpoint thread when the WAL has grown long: before its next job the writer
    /// checkpoints what is left, so that job's transaction starts the WAL over.
    wal_restart: AtomicBool,
    /// Checkpoints the writer ran for that, for `/v1/stats`.
    wal_restarts: AtomicU64,
    /// Runs in every group transaction just before `COMMIT`: lets a test hold a write in flight.
    #[cfg(test)]
    before_commit: std::sync::Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
}

impl Shared {
    pub(crate) fn new(fences: FenceSet, capturing: bool) -> Shared {
        Shared {
            fences: RwLock::new(Arc::new(fences)),
            capturing: AtomicBool::new(capturing),
            writes: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            wal_restart: AtomicBool::new(false),
            wal_restarts: AtomicU64::new(0),
            #[cfg(test)]
            before_commit: std::sync::Mutex::new(None),
        }
    }

    pub(crate) fn fences(&self) -> Arc<FenceSet> {
        // The lock only guards an `Arc` swap, so a poisoned lock still holds a whole set.
        Arc::clone(&self.fences.read().unwrap_or_else(PoisonError::into_inner))
    }

    pub(crate) fn set_fences(&self, fences: FenceSet) {
        *self.fences.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(fences);
    }

    pub(crate) fn capturing(&self) -> bool {
        self.capturing.load(Ordering::Acquire)
    }

    pub(crate) fn set_capturing(&self, on: bool) {
        self.capturing.store(on, Ordering::Release);
    }

    /// Asks the writer to let the WAL start over (see `checkpoint`).
    pub(crate) fn want_wal_restart(&self) {
        self.wal_restart.store(true, Ordering::Release);
    }

    /// Checkpoints the writer ran so that the WAL could start over, since the node opened.
    pub(crate) fn wal_restarts(&self) -> u64 {
        self.wal_restarts.load(Ordering::Relaxed)
    }

    fn count(&self, writes: usize, committed: bool) {
        self.writes.fetch_add(writes as u64, Ordering::Relaxed);
        if committed {
            self.commits.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// (client writes answered, transactions that committed them) since the node opened.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (
            self.writes.load(Ordering::Relaxed),
            self.commits.load(Ordering::Relaxed),
        )
    }

    #[cfg(test)]
    pub(crate) fn set_before_commit_hook(&self, hook: impl Fn() + Send + Sync + 'static) {
        *self
            .before_commit
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(hook));
    }

    #[cfg(test)]
    fn run_before_commit_hook(&self) {
        let hook = self
            .before_commit
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(hook) = hook {
            hook();
        }
    }
}

/// A job that runs alone; it gets the connection, or why there is none.
type AloneJob = Box<dyn FnOnce(Result<&Connection, NodeError>) + Send>;

enum Job {
    Alone(AloneJob),
    Grouped(Box<dyn Pending>),
    /// Client writes that arrived together (one `POST /v1/ops` set), queued as one job so that
    /// the writer never starts a group with only the first few of them.
    Set(Vec<Box<dyn Pending>>),
}

tokio::task_local! {
    /// Inside [`Writer::together`]: where client writes wait until the poll that queued them
    /// ends, to go to the writer as one [`Job::Set`].
    static TOGETHER: RefCell<Vec<Box<dyn Pending>>>;
}

/// A queued client write, its output type erased so that one group can carry many kinds.
trait Pending: Send {
    /// What the request weighs against [`MAX_GROUP_ROWS`].
    fn rows(&self) -> usize;
    /// Runs the fence check and the work inside the caller's savepoint, keeping the output for
    /// the answer. Called again if the group's transaction is lost.
    fn run(&mut self, conn: &Connection, check: &Check) -> Result<(), NodeError>;
    /// Sends the kept output, or `outcome`'s error.
    fn answer(self: Box<Self>, outcome: Result<(), NodeError>);
}

struct ClientWrite<T, F> {
    /// Routing texts of the keys the request names, checked against the fences.
    keys: Vec<String>,
    rows: usize,
    work: F,
    output: Option<T>,
    reply: oneshot::Sender<Result<T, NodeError>>,
}

impl<T, F> Pending for ClientWrite<T, F>
where
    T: Send,
    F: FnMut(&Connection) -> Result<T, NodeError> + Send,
{
    fn rows(&self) -> usize {
        self.rows
    }

    fn run(&mut self, conn: &Connection, check: &Check) -> Result<(), NodeError> {
        self.output = None;
        self.output = Some(check.run(conn, &self.keys, &mut self.work)?);
        Ok(())
    }

    fn answer(self: Box<Self>, outcome: Result<(), NodeError>) {
        let ClientWrite {
            output,
            reply,
            work,
            ..
        } = *self;
        // The work goes before the answer: once answered, the node may be shut down, and
        // whatever the work holds must not outlive that on this thread.
        drop(work);
        let answer =
            outcome.map(|()| output.expect("a request that ran to its RELEASE kept its output"));
        // The client may have gone away; what was committed stays committed.
        let _ = reply.send(answer);
    }
}

/// The handle on the writer thread: its queue. Dropping it closes the queue and waits for the
/// thread to finish what is queued.
pub(crate) struct Writer {
    /// `None` only inside `drop`.
    queue: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// Starts the writer thread on `conn`, an open connection from `opener` (which reopens it
    /// when it has to be replaced). The thread holds `lock` until it has closed the file.
    pub(crate) fn start(
        conn: Connection,
        opener: Opener,
        shared: Arc<Shared>,
        lock: FileLock,
    ) -> Result<Writer, NodeError> {
        let (queue, jobs) = mpsc::channel(QUEUE_CAPACITY);
        let worker = Worker {
            jobs,
            held: None,
            conn: Some(conn),
            opener,
            shared,
            _lock: lock,
        };
        let thread = thread::Builder::new()
            .name("shardlite-writer".into())
            .spawn(move || worker.run())
            .map_err(NodeError::WriterThread)?;
        Ok(Writer {
            queue: Some(queue),
            thread: Some(thread),
        })
    }

    async fn queue(&self, job: Job) -> Result<(), NodeError> {
        let queue = self.queue.as_ref().ok_or(NodeError::WriterStopped)?;
        queue.send(job).await.map_err(|_| NodeError::WriterStopped)
    }

    /// Queues `work` to run alone, in transactions of its own, and waits for its answer.
    pub(crate) async fn run_alone<T, F>(&self, work: F) -> Result<T, NodeError>
    where
        F: FnOnce(&Connection) -> Result<T, NodeError> + Send + 'static,
        T: Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        self.queue(Job::Alone(Box::new(move |conn| {
            // The client may have gone away; the job ran all the same.
            let _ = reply.send(conn.and_then(work));
        })))
        .await?;
        answer.await.map_err(|_| NodeError::WriteAbandoned)?
    }

    /// Queues a client write, to be grouped with the others queued beside it, and waits for
    /// the answer, which comes after the commit that carries it. `keys` are the routing texts
    /// the request names; `rows` its weight against [`MAX_GROUP_ROWS`]; `work` runs inside the
    /// request's savepoint, and again if the group's transaction is lost.
    pub(crate) async fn run_grouped<T, F>(
        &self,
        keys: Vec<String>,
        rows: usize,
        work: F,
    ) -> Result<T, NodeError>
    where
        F: FnMut(&Connection) -> Result<T, NodeError> + Send + 'static,
        T: Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let write: Box<dyn Pending> = Box::new(ClientWrite {
            keys,
            rows,
            work,
            output: None,
            reply,
        });
        if TOGETHER.try_with(|_| ()).is_ok() {
            TOGETHER.with(|set| set.borrow_mut().push(write));
        } else {
            self.queue(Job::Grouped(write)).await?;
        }
        answer.await.map_err(|_| NodeError::WriteAbandoned)?
    }

    /// Runs `requests` (the futures of requests that arrived together) so that the client
    /// writes each poll of them queues reach the writer as one job, and so one group: queued
    /// one by one, the writer would wake on the first, and a set of 10 writes took 1.3
    /// commits on average.
    pub(crate) async fn together<F: Future>(&self, requests: F) -> F::Output {
        let mut requests = std::pin::pin!(requests);
        std::future::poll_fn(|cx| {
            let (polled, set) = TOGETHER.sync_scope(RefCell::new(Vec::new()), || {
                let polled = requests.as_mut().poll(cx);
                (polled, TOGETHER.with(RefCell::take))
            });
            if !set.is_empty() {
                self.queue_now(Job::Set(set));
            }
            polled
        })
        .await
    }

    /// Queues `job` without waiting: a full queue hands it to a task that waits for room.
    /// A writer that stopped drops it, and its requests get `WriteAbandoned`.
    fn queue_now(&self, job: Job) {
        let Some(queue) = self.queue.as_ref() else {
            return;
        };
        if let Err(mpsc::error::TrySendError::Full(job)) = queue.try_send(job) {
            let queue = queue.clone();
            tokio::spawn(async move {
                let _ = queue.send(job).await;
            });
        }
    }

    /// Jobs waiting in the queue (not the one running).
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        self.queue
            .as_ref()
            .map_or(0, |q| q.max_capacity() - q.capacity())
    }

    /// Runs `f` on the writer's connection, between jobs, blocking the calling thread.
    #[cfg(test)]
    pub(crate) fn with_connection<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> T + Send + 'static,
    ) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        let job = Job::Alone(Box::new(move |conn| {
            let conn = conn.expect("the writer's connection opens in tests");
            let _ = tx.send(f(conn));
        }));
        let queue = self.queue.as_ref().expect("the writer runs until dropped");
        if queue.try_send(job).is_err() {
            panic!("the writer's queue has room between test requests");
        }
        rx.recv().expect("the writer runs every queued job")
    }

    /// Makes the writer thread wait, inside a job, until the returned guard is dropped: the
    /// jobs queued meanwhile are all there when it goes on.
    #[cfg(test)]
    pub(crate) async fn hold(&self) -> Hold {
        let (entered, inside) = oneshot::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        self.queue(Job::Alone(Box::new(move |_| {
            let _ = entered.send(());
            // Returns when the guard's sender is dropped.
            let _ = released.recv();
        })))
        .await
        .expect("the writer runs until dropped");
        inside.await.expect("the writer runs the hold");
        Hold { _release: release }
    }
}

/// Keeps the writer thread waiting until dropped (tests only).
#[cfg(test)]
pub(crate) struct Hold {
    _release: std::sync::mpsc::Sender<()>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the queue lets the thread finish what is queued, close the connection, exit.
        drop(self.queue.take());
        let Some(thread) = self.thread.take() else {
            return;
        };
        if thread.thread().id() == thread::current().id() {
            // A job on the writer thread held the last handle on the node: the thread exits
            // on its own once the queue is empty, and cannot wait for itself.
            return;
        }
        if thread.join().is_err() {
            tracing::error!("the writer thread panicked");
        }
    }
}

/// The writer thread's side: the queue's receiving end and the connection.
struct Worker {
    jobs: mpsc::Receiver<Job>,
    /// A job taken from the queue while gathering a group, which must run right after it.
    held: Option<Job>,
    /// `None` after the connection had to be closed, until the next job opens a new one.
    conn: Option<Connection>,
    opener: Opener,
    shared: Arc<Shared>,
    /// The node's lock on its file ([`crate::lock`]). Last, so it is released after the
    /// connection above has closed, when the thread ends: the writer is the last to touch the
    /// file (the readers and the checkpointer close before it joins).
    _lock: FileLock,
}

/// How one pass over a group's requests ended.
enum Pass {
    /// Every request ran; its outcome is kept.
    Done,
    /// SQLite rolled the whole transaction back during one request, now marked lost.
    Lost,
    /// A group of one failed and its transaction was rolled back: nothing to commit.
    RolledBack,
}

/// A request of the group being run.
struct Member {
    pending: Box<dyn Pending>,
    /// The outcome of its last run; `None` before it ran.
    outcome: Option<Result<(), NodeError>>,
    /// It made SQLite roll the transaction back: it keeps its error and does not run again.
    lost: bool,
}

impl Worker {
    fn run(mut self) {
        while let Some(job) = self.held.take().or_else(|| self.jobs.blocking_recv()) {
            self.restart_wal_if_wanted();
            match job {
                Job::Alone(job) => self.alone(job),
                writes => {
                    let group = self.gather(writes);
                    self.group(group);
                }
            }
        }
        if let Some(conn) = self.conn.take() {
            close(conn);
        }
        tracing::info!("writer stopped: queue closed and empty");
    }

    /// `first` (one write, or a set that came together), and the client writes queued right
    /// behind it, within the group's limits.
    fn gather(&mut self, first: Job) -> Vec<Box<dyn Pending>> {
        let mut group = Vec::new();
        let mut rows = 0usize;
        let mut next = Some(first);
        while let Some(job) = next.take() {
            let writes = match job {
                Job::Grouped(write) => vec![write],
                Job::Set(set) => set,
                alone @ Job::Alone(_) => {
                    // A job that runs alone: it runs next, after this group, so the queue's
                    // order is kept.
                    self.held = Some(alone);
                    break;
                }
            };
            let mut writes = writes.into_iter();
            while let Some(write) = writes.next() {
                let fits = group.len() < MAX_GROUP_WRITES
                    && rows.saturating_add(write.rows()) <= MAX_GROUP_ROWS;
                // The first write always goes in: a request larger than the limits runs in a
                // group of its own.
                if !fits && !group.is_empty() {
                    // It, and the rest of its set, run next, after this group.
                    let rest: Vec<_> = std::iter::once(write).chain(writes).collect();
                    self.held = Some(Job::Set(rest));
                    return group;
                }
                rows = rows.saturating_add(write.rows());
                group.push(write);
            }
            if group.len() < MAX_GROUP_WRITES {
                // Empty or closed: what was queued is all in.
                next = self.jobs.try_recv().ok();
            }
        }
        group
    }

    /// When the checkpoint thread asked for it: a PASSIVE checkpoint here, between two
    /// transactions, copies the frames committed since its last pass, and nothing can be
    /// committed meanwhile, so the WAL is checkpointed to its end (unless a reader still needs
    /// an older frame). The next transaction then writes from the start of the WAL. The thread
    /// has copied all but the last few milliseconds' commits, so this is short: 1-10 ms measured
    /// under 24k PUT/s, once per 64 MiB of WAL.
    fn restart_wal_if_wanted(&mut self) {
        if !self.shared.wal_restart.swap(false, Ordering::AcqRel) {
            return;
        }
        let Some(conn) = &self.conn else {
            return;
        };
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            Ok(()) => {
                self.shared.wal_restarts.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(error = %e, "WAL checkpoint on the writer failed"),
        }
    }

    fn alone(&mut self, job: AloneJob) {
        match connection(&mut self.conn, &self.opener) {
            Ok(conn) => {
                let _internal = Scope::enter(Mode::Internal, None);
                if panic::catch_unwind(AssertUnwindSafe(|| job(Ok(conn)))).is_err() {
                    tracing::error!("a write job panicked; its transaction is rolled back");
                }
            }
            Err(e) => job(Err(NodeError::Open {
                path: self.opener.path().to_owned(),
                source: e,
            })),
        }
        self.tidy(true);
    }

    fn group(&mut self, group: Vec<Box<dyn Pending>>) {
        let started = std::time::Instant::now();
        let mut members: Vec<Member> = group
            .into_iter()
            .map(|pending| Member {
                pending,
                outcome: None,
                lost: false,
            })
            .collect();
        let ran = panic::catch_unwind(AssertUnwindSafe(|| self.transact(&mut members)));
        // Rolls back a transaction that failed to commit, before anything else runs.
        self.tidy(false);
        let writes = members.len();
        match ran {
            Ok(Ok(committed)) => {
                self.shared.count(writes, committed);
                tracing::debug!(
                    writes,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "group committed"
                );
                for member in members {
                    let outcome = member
                        .outcome
                        .expect("every request of a committed group ran before the commit");
                    member.pending.answer(outcome);
                }
            }
            Ok(Err(e)) if writes > 1 && is_deferred_violation(&e) => {
                // A request left a deferred foreign key unresolved, which SQLite checks only
                // at COMMIT. Nothing was answered: every request runs again in a transaction
                // of its own, so only the one that broke the key fails.
                tracing::info!(
                    writes,
                    error = %e,
                    "a group failed a deferred check; its writes run one by one"
                );
                for member in members {
                    self.group(vec![member.pending]);
                }
            }
            Ok(Err(e)) => {
                self.shared.count(writes, false);
                tracing::error!(writes, error = %e, "a group transaction failed");
                let e = Arc::new(e);
                for member in members {
                    member
                        .pending
                        .answer(Err(NodeError::GroupTransaction(Arc::clone(&e))));
                }
            }
            Err(_) => {
                self.shared.count(writes, false);
                tracing::error!(writes, "a group of writes panicked; it is rolled back");
                for member in members {
                    member.pending.answer(Err(NodeError::WriteAbandoned));
                }
            }
        }
    }

    /// Runs the group's transaction to its `COMMIT` (`Ok(true)`), or, for a group of one
    /// whose request failed, to its `ROLLBACK` (`Ok(false)`); the caller answers.
    fn transact(&mut self, members: &mut [Member]) -> rusqlite::Result<bool> {
        // The thread's own statements: never judged as a client's, never under a deadline.
        let _internal = Scope::enter(Mode::Internal, None);
        let conn = connection(&mut self.conn, &self.opener)?;
        loop {
            run(conn, BEGIN)?;
            // Read now, holding the write lock: fences change only on this thread.
            let check = Check::new(self.shared.fences(), self.shared.capturing());
            let passed = match members {
                [only] => alone(conn, &check, only)?,
                _ => pass(conn, &check, members)?,
            };
            match passed {
                Pass::Done => break,
                Pass::Lost => continue,
                Pass::RolledBack => return Ok(false),
            }
        }
        #[cfg(test)]
        self.shared.run_before_commit_hook();
        run(conn, COMMIT)?;
        Ok(true)
    }

    /// After a job: rolls back what it left open, and closes a connection that still carries
    /// state, so the next job opens a fresh one. Only a job that ran `alone` runs the node's
    /// own SQL, which may change the sync level for a commit (a purge page); client SQL cannot
    /// (the authorizer refuses PRAGMAs), so a group is not asked, and the check stays off the
    /// path every client write takes.
    fn tidy(&mut self, alone: bool) {
        let Some(conn) = &self.conn else {
            return;
        };
        db::tidy(conn);
        if (db::carries_state(conn) || (alone && !self.opener.syncs_as_configured(conn)))
            && let Some(conn) = self.conn.take()
        {
            close(conn);
        }
    }
}

/// Runs every request of the group not yet lost, each in its savepoint, inside the open
/// transaction. An error is the connection's (a savepoint statement failed): the group fails.
fn pass(conn: &Connection, check: &Check, members: &mut [Member]) -> rusqlite::Result<Pass> {
    for member in members.iter_mut().filter(|m| !m.lost) {
        run(conn, SAVEPOINT)?;
        let outcome = member
            .pending
            .run(conn, check)
            .and_then(|()| Ok(run(conn, RELEASE)?));
        if conn.is_autocommit() {
            // SQLite rolled the whole transaction back (see the module notes): this request
            // fails, the others run again in a new transaction.
            let error = outcome.err().unwrap_or_else(|| {
                tracing::error!("a write ended the group's transaction without an error");
                NodeError::WriteAbandoned
            });
            tracing::info!(
                error = %error,
                "a write lost its group's transaction; the others run again"
            );
            member.outcome = Some(Err(error));
            member.lost = true;
            return Ok(Pass::Lost);
        }
        if outcome.is_err() {
            run(conn, ROLLBACK_TO)?;
            run(conn, RELEASE)?;
        }
        member.outcome = Some(outcome);
    }
    Ok(Pass::Done)
}

/// Runs a group of one in the open transaction, without a savepoint: a savepoint makes SQLite
/// copy every page the request changes into a sub-journal, which for a batch of rows cost
/// about a tenth of the writer's time. If the request fails, the whole transaction, which
/// holds only its work, is rolled back instead.
fn alone(conn: &Connection, check: &Check, member: &mut Member) -> rusqlite::Result<Pass> {
    let outcome = member.pending.run(conn, check);
    if conn.is_autocommit() {
        // SQLite ended the transaction itself (see the module notes).
        member.outcome = Some(Err(outcome.err().unwrap_or_else(|| {
            tracing::error!("a write ended its transaction without an error");
            NodeError::WriteAbandoned
        })));
        return Ok(Pass::RolledBack);
    }
    if outcome.is_err() {
        run(conn, ROLLBACK)?;
        member.outcome = Some(outcome);
        return Ok(Pass::RolledBack);
    }
    member.outcome = Some(outcome);
    Ok(Pass::Done)
}

/// Runs one of the thread's own statements.
fn run(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

/// Whether a failed group transaction failed on a deferred constraint (a foreign key declared
/// `DEFERRABLE INITIALLY DEFERRED`), the only check SQLite leaves to `COMMIT`.
fn is_deferred_violation(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation)
}

/// The open connection, or a new one if the last had to be closed.
fn connection<'c>(
    slot: &'c mut Option<Connection>,
    opener: &Opener,
) -> rusqlite::Result<&'c Connection> {
    let conn = match slot.take() {
        Some(conn) => conn,
        None => {
            let conn = opener.open().inspect_err(|e| {
                tracing::error!(error = %e, "cannot open the writer's connection");
            })?;
            tracing::info!("writer connection reopened");
            conn
        }
    };
    Ok(slot.insert(conn))
}

fn close(conn: Connection) {
    if let Err((_, e)) = conn.close() {
        tracing::warn!(error = %e, "closing the writer's connection failed");
    }
}

#[cfg(test)]
mod tests;
