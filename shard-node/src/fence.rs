//! Fences: hash ranges whose client writes this node refuses while they move to another node,
//! and the check every client write passes inside its transaction.
//!
//! # The rule (Vitess #9400)
//!
//! A fence is only worth something if no write admitted before it commits after it. SQLite
//! has one writer and the node one writer thread (`crate::writer`), which runs every write and
//! every fence change from one FIFO queue. Client writes run in group transactions: the
//! fences are read after `BEGIN IMMEDIATE` (a `Check`) and every request of the group is
//! checked against them inside its own savepoint. A fence is stored by a job of its own on
//! that same queue, in a transaction of its own, and the in-memory copy is swapped right after
//! its commit, on the writer thread. So a write queued before the fence commits before it (its
//! group commits before the fence job starts) and is in the change log, to be drained; a write
//! queued after it sees the fence and is refused. A fence `PUT` waits for the writes queued
//! before it, exactly as `LOCK TABLES` does in Vitess's fix.
//!
//! # What is checked
//!
//! `Check::run` checks the keys the request names (a row's key, every key of a batch, the
//! `key` of keyed SQL). When capture is on, it also reads the change log rows that the request
//! itself added (above the highest seq at its start), before its savepoint is released, and
//! refuses if any of those keys is fenced: keyed SQL may write keys other than its own
//! (`UPDATE t SET x = 1` touches every row), and so may a user's trigger. Without capture a
//! fence can only check the named keys; a rebalance always fences with capture on.
//!
//! With no fence at all (nearly always) the check is one read of an `Arc` and a length test.

use std::sync::Arc;

use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use shardlite_ring::hash_key;

use crate::db::rollback;
use crate::error::NodeError;
use crate::key::{routing_hash_of, routing_text_of};
use crate::state::NodeState;

/// The fence table, created when a node opens its file. `start` and `end` are inclusive hash
/// positions.
const FENCES_DDL: &str = "CREATE TABLE IF NOT EXISTS _shardlite_fences (
    \"start\" INTEGER NOT NULL,
    \"end\" INTEGER NOT NULL,
    job TEXT NOT NULL
)";

/// One fenced range, as stored and as `GET /v1/transfer/fences` lists it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub start: u32,
    pub end: u32,
    /// The rebalance job that put it, for operators.
    pub job: String,
}

/// Inclusive `[start, end]` hash ranges, sorted and merged, for membership tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ranges {
    /// Disjoint, not touching, sorted by start.
    merged: Vec<(u32, u32)>,
}

impl Ranges {
    /// Checks each pair (`start <= end`) and merges overlapping or touching ranges.
    pub fn new(pairs: &[(u32, u32)]) -> Result<Ranges, NodeError> {
        if let Some((i, (start, end))) = pairs.iter().enumerate().find(|(_, (s, e))| s > e) {
            return Err(NodeError::InvalidRequest(format!(
                "range {i} is [{start}, {end}]: a range is [start, end] with start <= end"
            )));
        }
        let mut sorted = pairs.to_vec();
        sorted.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(sorted.len());
        for (start, end) in sorted {
            match merged.last_mut() {
                // Touching: `last.1 + 1 == start`, written so that u32::MAX cannot overflow.
                Some(last) if start <= last.1 || start - 1 == last.1 => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        Ok(Ranges { merged })
    }

    pub fn is_empty(&self) -> bool {
        self.merged.is_empty()
    }

    /// Whether `hash` lies in one of the ranges: a binary search.
    pub fn contains(&self, hash: u32) -> bool {
        let i = self.merged.partition_point(|&(_, end)| end < hash);
        self.merged.get(i).is_some_and(|&(start, _)| start <= hash)
    }

    /// Whether the stored key `v` routes into one of the ranges. Keys without a routing
    /// text (REAL, BLOB, NULL) never do.
    pub(crate) fn contains_key(&self, v: rusqlite::types::ValueRef<'_>) -> bool {
        routing_hash_of(v).is_some_and(|h| self.contains(h))
    }
}

/// Counts hashes per range of a list that may overlap, exactly: `counts()[i]` is how many
/// added hashes lie in `ranges[i]`.
///
/// The range bounds cut the hash space into elementary segments; a hash is counted once in
/// its segment (a binary search), and a range's count is the sum over the segments it spans,
/// read off prefix sums. Overlapping ranges each count a hash that lies in both.
pub(crate) struct RangeCounter {
    /// Every `start` and `end + 1`, sorted, unique; segment `j` is `[bounds[j], bounds[j+1])`.
    bounds: Vec<u64>,
    per_segment: Vec<u64>,
    /// Per input range, its first and one-past-last segment.
    spans: Vec<(usize, usize)>,
}

impl RangeCounter {
    pub(crate) fn new(ranges: &[(u32, u32)]) -> RangeCounter {
        let mut bounds: Vec<u64> = ranges
            .iter()
            .flat_map(|&(s, e)| [u64::from(s), u64::from(e) + 1])
            .collect();
        bounds.sort_unstable();
        bounds.dedup();
        let index = |b: u64| {
            bounds
                .binary_search(&b)
                .expect("every bound of every range was inserted")
        };
        let spans = ranges
            .iter()
            .map(|&(s, e)| (index(u64::from(s)), index(u64::from(e) + 1)))
            .collect();
        let segments = bounds.len().saturating_sub(1);
        RangeCounter {
            bounds,
            per_segment: vec![0; segments],
            spans,
        }
    }

    pub(crate) fn add(&mut self, hash: u32) {
        let after = self.bounds.partition_point(|&b| b <= u64::from(hash));
        // `after == 0`: below every range; `after == len`: above every range.
        if after > 0 && after < self.bounds.len() {
            self.per_segment[after - 1] += 1;
        }
    }

    pub(crate) fn counts(&self) -> Vec<u64> {
        let mut prefix = Vec::with_capacity(self.per_segment.len() + 1);
        prefix.push(0u64);
        for n in &self.per_segment {
            prefix.push(prefix.last().copied().unwrap_or(0) + n);
        }
        self.spans
            .iter()
            .map(|&(from, to)| prefix[to] - prefix[from])
            .collect()
    }
}

/// The fences in force, as loaded from `_shardlite_fences`.
#[derive(Clone, Debug, Default)]
pub(crate) struct FenceSet {
    pub(crate) list: Vec<Fence>,
    pub(crate) ranges: Ranges,
}

impl FenceSet {
    /// The set of `list`, kept sorted by range so it reads the same before and after a restart.
    pub(crate) fn new(mut list: Vec<Fence>) -> Result<FenceSet, NodeError> {
        list.sort_by_key(|f| (f.start, f.end));
        let pairs: Vec<(u32, u32)> = list.iter().map(|f| (f.start, f.end)).collect();
        let ranges = Ranges::new(&pairs)?;
        Ok(FenceSet { list, ranges })
    }
}

pub(crate) fn create_table(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(FENCES_DDL)
}

/// The stored fences.
pub(crate) fn load(conn: &Connection) -> Result<FenceSet, NodeError> {
    let list = conn
        .prepare_cached("SELECT \"start\", \"end\", job FROM _shardlite_fences ORDER BY 1, 2")?
        .query_map([], |row| {
            Ok(Fence {
                start: row.get(0)?,
                end: row.get(1)?,
                job: row.get(2)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    FenceSet::new(list)
}

/// Replaces every stored fence with `list`, in one writer transaction, and swaps the node's
/// in-memory set after the commit, before the writer thread takes its next job.
pub(crate) fn replace(
    state: &NodeState,
    conn: &Connection,
    list: Vec<Fence>,
) -> Result<usize, NodeError> {
    let set = FenceSet::new(list)?;
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let stored = (|| -> rusqlite::Result<()> {
        conn.execute("DELETE FROM _shardlite_fences", [])?;
        let mut insert = conn.prepare_cached(
            "INSERT INTO _shardlite_fences (\"start\", \"end\", job) VALUES (?1, ?2, ?3)",
        )?;
        for f in &set.list {
            insert.execute(rusqlite::params![f.start, f.end, f.job])?;
        }
        conn.execute_batch("COMMIT")
    })();
    if let Err(e) = stored {
        rollback(conn);
        return Err(e.into());
    }
    let n = set.list.len();
    state.set_fences(set);
    tracing::info!(fences = n, "fences replaced");
    Ok(n)
}

/// The fences one write transaction checks its requests against, read right after its
/// `BEGIN IMMEDIATE`, on the writer thread (the only thread that changes them).
pub(crate) struct Check {
    fences: Arc<FenceSet>,
    capturing: bool,
}

impl Check {
    /// The fences in force, and whether capture is on, as read holding the write lock.
    pub(crate) fn new(fences: Arc<FenceSet>, capturing: bool) -> Check {
        Check { fences, capturing }
    }

    /// Runs one request's `work` inside the caller's transaction: the fence check of `keys`
    /// (routing texts), `work`, then the fence check of the keys the work logged. An error
    /// leaves the caller to roll the request back.
    pub(crate) fn run<T>(
        &self,
        conn: &Connection,
        keys: &[String],
        work: impl FnOnce(&Connection) -> Result<T, NodeError>,
    ) -> Result<T, NodeError> {
        if self.fences.ranges.is_empty() {
            return work(conn);
        }
        if let Some(key) = keys
            .iter()
            .find(|key| self.fences.ranges.contains(hash_key(key)))
        {
            return Err(NodeError::Fenced(key.clone()));
        }
        let logged_after = if self.capturing {
            Some(max_logged_seq(conn)?)
        } else {
            None
        };
        let out = work(conn)?;
        if let Some(seq) = logged_after {
            check_logged(conn, &self.fences.ranges, seq)?;
        }
        Ok(out)
    }
}

fn max_logged_seq(conn: &Connection) -> Result<i64, NodeError> {
    Ok(conn
        .prepare_cached("SELECT coalesce(max(seq), 0) FROM _shardlite_changes")?
        .query_row([], |row| row.get(0))?)
}

/// Refuses if a key this transaction logged (seq above `after`) is fenced.
fn check_logged(conn: &Connection, ranges: &Ranges, after: i64) -> Result<(), NodeError> {
    let mut stmt =
        conn.prepare_cached("SELECT key FROM _shardlite_changes WHERE seq > ?1 ORDER BY seq")?;
    let mut rows = stmt.query([after])?;
    while let Some(row) = rows.next()? {
        let key = row.get_ref(0)?;
        if ranges.contains_key(key) {
            let text = routing_text_of(key).expect("a key in a range has a routing text");
            return Err(NodeError::Fenced(text));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_and_answer_membership_at_the_edges() {
        let r =
            Ranges::new(&[(50, 60), (10, 20), (15, 30), (31, 40), (u32::MAX, u32::MAX)]).unwrap();
        assert_eq!(r.merged, [(10, 40), (50, 60), (u32::MAX, u32::MAX)]);
        for h in [10, 20, 31, 40, 50, 60, u32::MAX] {
            assert!(r.contains(h), "{h}");
        }
        for h in [0, 9, 41, 49, 61, u32::MAX - 1] {
            assert!(!r.contains(h), "{h}");
        }
        let whole = Ranges::new(&[(0, u32::MAX), (5, 6)]).unwrap();
        assert_eq!(whole.merged, [(0, u32::MAX)]);
        assert!(whole.contains(0) && whole.contains(u32::MAX));
        assert!(Ranges::new(&[]).unwrap().is_empty());
        assert!(!Ranges::new(&[]).unwrap().contains(0));
        assert!(matches!(
            Ranges::new(&[(1, 2), (5, 4)]),
            Err(NodeError::InvalidRequest(m)) if m.contains("range 1")
        ));
    }

    #[test]
    fn the_counter_counts_overlapping_ranges_each() {
        let ranges = [(10, 20), (15, 30), (100, 100), (0, u32::MAX), (15, 30)];
        let mut counter = RangeCounter::new(&ranges);
        let hashes = [0, 10, 14, 15, 20, 21, 30, 31, 99, 100, 101, u32::MAX];
        for h in hashes {
            counter.add(h);
        }
        let naive: Vec<u64> = ranges
            .iter()
            .map(|&(s, e)| hashes.iter().filter(|&&h| s <= h && h <= e).count() as u64)
            .collect();
        assert_eq!(counter.counts(), naive);
        assert_eq!(counter.counts(), [4, 4, 1, 12, 4]);
        assert!(RangeCounter::new(&[]).counts().is_empty());
    }
}
