//! A history checker in the style of Jepsen's `set-full`: writers upsert and delete their own
//! keys while the cluster changes under them; every operation is recorded as acknowledged,
//! refused, or indeterminate (a timeout or a dropped connection may or may not have happened).
//! Afterwards each key must hold the result of its last acknowledged write, or of an
//! indeterminate one after it: an acknowledged write lost, or an acknowledged delete undone,
//! fails the check.

use crate::Client;
use http::StatusCode;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What a key holds: absent, or a row whose `name` is this value.
pub type KeyState = Option<String>;

#[derive(Clone, Debug)]
pub enum Outcome {
    Acked,
    /// Definitely not applied (a 4xx other than "not found" on delete).
    Refused,
    Indeterminate,
}

#[derive(Clone, Debug)]
pub struct Op {
    pub key: String,
    pub result: KeyState,
    pub outcome: Outcome,
}

/// What one writer did.
#[derive(Default, Debug)]
pub struct WriterLog {
    pub ops: Vec<Op>,
    pub errors: u64,
    pub longest: Duration,
    /// Reads (after an acknowledged write, with nothing indeterminate pending) that did not
    /// return what was written.
    pub stale_reads: Vec<String>,
}

/// A tiny seeded PRNG (xorshift64*), so every run can be replayed from its seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// How a writer writes a key: most through the rows API, the rest through keyed SQL, whose
/// writes the node fences and captures by the keys its transaction logged.
enum Write {
    Put,
    Delete,
    /// One keyed statement with params `[key, value]`; `{table}` stands for the table.
    Sql(&'static str),
    /// A keyed statement list: insert if absent, then set the name; one transaction.
    Statements,
    /// A batch upsert of the key and up to two more of the writer's keys, perhaps on other
    /// shards: one transaction per shard.
    Batch,
}

fn write_kind(rng: &mut Rng) -> Write {
    match rng.below(20) {
        0..=9 => Write::Put,
        10..=12 => Write::Delete,
        13 => Write::Sql("DELETE FROM {table} WHERE id = ?1 AND ?2 IS NOT NULL"),
        14..=15 => Write::Sql(
            "INSERT INTO {table} (id, name) VALUES (?1, ?2) \
             ON CONFLICT (id) DO UPDATE SET name = excluded.name",
        ),
        // REPLACE deletes the old row first: its change capture must see that delete.
        16 => Write::Sql("INSERT OR REPLACE INTO {table} (id, name) VALUES (?1, ?2)"),
        17 => Write::Batch,
        _ => Write::Statements,
    }
}

/// Runs one writer on `keys` until `stop`: 80% upserts (each with a fresh value), 20% deletes,
/// through the rows API and keyed SQL (see [`write_kind`]), and a read-back after a third of
/// the acknowledged writes.
pub async fn write_until(
    client: Client,
    table: &'static str,
    keys: Vec<String>,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> WriterLog {
    let mut rng = Rng::new(seed);
    let mut log = WriterLog::default();
    let mut unsure: HashMap<String, bool> = HashMap::new();
    let mut known: HashMap<String, KeyState> = HashMap::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let key = keys[rng.below(keys.len() as u64) as usize].clone();
        let path = Client::row_path(table, &key);
        n += 1;
        let started = Instant::now();
        let value = format!("{key}#{seed}-{n}");
        // What the request writes: (key, the state it leaves the key in).
        let mut writes = vec![(key.clone(), Some(value.clone()))];
        let (method, target, body) = match write_kind(&mut rng) {
            Write::Put => (http::Method::PUT, path.clone(), json!({ "name": value })),
            Write::Delete => {
                writes[0].1 = None;
                (http::Method::DELETE, path.clone(), Value::Null)
            }
            Write::Sql(sql) => {
                if !sql.contains("INSERT") {
                    writes[0].1 = None;
                }
                (
                    http::Method::POST,
                    "/v1/sql".to_owned(),
                    json!({ "key": key, "sql": sql.replace("{table}", table), "params": [key, value] }),
                )
            }
            Write::Statements => (
                http::Method::POST,
                "/v1/sql".to_owned(),
                json!({
                    "key": key,
                    "statements": [
                        {
                            "sql": format!("INSERT OR IGNORE INTO {table} (id) VALUES (?1)"),
                            "params": [key],
                        },
                        {
                            "sql": format!("UPDATE {table} SET name = ?2 WHERE id = ?1"),
                            "params": [key, value],
                        },
                    ],
                }),
            ),
            Write::Batch => {
                // Two more of the writer's keys (they may land on other shards).
                for i in 0..2 {
                    let other = &keys[rng.below(keys.len() as u64) as usize];
                    if writes.iter().all(|(k, _)| k != other) {
                        writes.push((other.clone(), Some(format!("{other}#{seed}-{n}.{i}"))));
                    }
                }
                let rows: Vec<Value> = writes
                    .iter()
                    .map(|(k, v)| json!({ "id": k, "name": v }))
                    .collect();
                (
                    http::Method::POST,
                    format!("/v1/tables/{table}/rows"),
                    json!({ "rows": rows }),
                )
            }
        };
        let body = (!body.is_null()).then(|| bytes::Bytes::from(body.to_string()));
        let answer = client.try_raw(method, &target, body).await;
        log.longest = log.longest.max(started.elapsed());
        let outcomes = outcomes(&answer, &writes);
        if outcomes.iter().any(|o| !matches!(o, Outcome::Acked)) {
            log.errors += 1;
        }
        for ((key, result), outcome) in writes.into_iter().zip(outcomes) {
            match outcome {
                Outcome::Acked => {
                    unsure.insert(key.clone(), false);
                    known.insert(key.clone(), result.clone());
                }
                Outcome::Indeterminate => {
                    unsure.insert(key.clone(), true);
                }
                Outcome::Refused => {}
            }
            log.ops.push(Op {
                key,
                result,
                outcome,
            });
        }
        let check_read = rng.below(3) == 0 && !unsure.get(&key).copied().unwrap_or(false);
        if check_read
            && let (Ok((status, row)), Some(expected)) = (
                client.try_raw(http::Method::GET, &path, None).await,
                known.get(&key),
            )
        {
            let seen = read_state(status, &row);
            if seen.as_ref().map(|s| s.as_ref()) != Some(expected.as_ref())
                && status != StatusCode::SERVICE_UNAVAILABLE
            {
                log.stale_reads
                    .push(format!("{key}: wrote {expected:?}, read {status} {row}"));
            }
        }
    }
    log
}

/// What became of each of a request's writes, as its answer says. A batch that failed on some
/// shards names the keys it did not write (`not_written`, definitely not applied) and those it
/// cannot tell about (`maybe_written`); every other key of it was written.
fn outcomes(
    answer: &Result<(StatusCode, Value), shardlite::error::ProxyError>,
    writes: &[(String, KeyState)],
) -> Vec<Outcome> {
    let single = |outcome: Outcome| vec![outcome; writes.len()];
    let (status, body) = match answer {
        Ok(answer) => answer,
        Err(_) => return single(Outcome::Indeterminate),
    };
    if status.is_success() {
        return single(Outcome::Acked);
    }
    if writes.len() == 1 {
        return single(match *status {
            StatusCode::NOT_FOUND if writes[0].1.is_none() => Outcome::Acked,
            status if status.is_client_error() => Outcome::Refused,
            _ => Outcome::Indeterminate,
        });
    }
    let named = |field: &str| -> Option<Vec<&str>> {
        body[field]
            .as_array()
            .map(|keys| keys.iter().filter_map(Value::as_str).collect())
    };
    match (named("not_written"), named("maybe_written")) {
        (Some(not), maybe) => {
            let maybe = maybe.unwrap_or_default();
            writes
                .iter()
                .map(|(key, _)| {
                    if maybe.contains(&key.as_str()) {
                        Outcome::Indeterminate
                    } else if not.contains(&key.as_str()) {
                        Outcome::Refused
                    } else {
                        Outcome::Acked
                    }
                })
                .collect()
        }
        // Refused whole, before anything was written.
        _ if status.is_client_error() => single(Outcome::Refused),
        _ => single(Outcome::Indeterminate),
    }
}

/// The state a GET answer shows; `None` when the answer says nothing (an error).
pub fn read_state(status: StatusCode, row: &Value) -> Option<KeyState> {
    match status {
        StatusCode::OK => Some(row["name"].as_str().map(str::to_owned)),
        StatusCode::NOT_FOUND => Some(None),
        _ => None,
    }
}

/// Checks the final state of every key against the history; returns the violations.
pub fn check(logs: &[WriterLog], final_state: &HashMap<String, KeyState>) -> Vec<String> {
    let mut per_key: HashMap<&str, Vec<&Op>> = HashMap::new();
    for log in logs {
        for op in &log.ops {
            per_key.entry(op.key.as_str()).or_default().push(op);
        }
    }
    let mut violations = Vec::new();
    for (key, ops) in per_key {
        let last_acked = ops
            .iter()
            .rposition(|op| matches!(op.outcome, Outcome::Acked));
        let mut allowed: Vec<KeyState> = Vec::new();
        let from = match last_acked {
            Some(i) => {
                allowed.push(ops[i].result.clone());
                i + 1
            }
            None => {
                allowed.push(None);
                0
            }
        };
        if last_acked.is_none() {
            // Before the first acknowledged op, any indeterminate op may have landed too.
            allowed.extend(ops.iter().map(|op| op.result.clone()));
        }
        allowed.extend(
            ops[from..]
                .iter()
                .filter(|op| matches!(op.outcome, Outcome::Indeterminate))
                .map(|op| op.result.clone()),
        );
        let actual = final_state.get(key).cloned().unwrap_or(None);
        if !allowed.contains(&actual) {
            violations.push(format!(
                "{key}: holds {actual:?}, allowed {allowed:?} (last acknowledged: {:?})",
                last_acked.map(|i| &ops[i].result)
            ));
        }
    }
    violations
}

/// Reads the final state of `keys` through the proxy.
pub async fn final_state(
    client: &Client,
    table: &str,
    keys: &[String],
) -> HashMap<String, KeyState> {
    let mut state = HashMap::new();
    for key in keys {
        let (status, row) = client.get(&Client::row_path(table, key)).await;
        let seen = read_state(status, &row)
            .unwrap_or_else(|| panic!("final read of {key}: {status} {row}"));
        state.insert(key.clone(), seen);
    }
    state
}

/// A seed from the environment variable `var` if it is set, else from the clock; printed with
/// how to run the same again.
pub fn seed(var: &str) -> u64 {
    let seed = std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("history seed: {seed} (replay with {var}={seed})");
    seed
}

/// Writers running [`write_until`] on `users`, each on keys of its own (`w{i}-{k}`).
pub struct Writers {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<WriterLog>>,
    keys: Vec<String>,
}

impl Writers {
    pub fn start(client: &Client, writers: u64, keys_each: usize, seed: u64) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        let mut all = Vec::new();
        for w in 0..writers {
            let keys: Vec<String> = (0..keys_each).map(|i| format!("w{w}-{i}")).collect();
            all.extend(keys.clone());
            tasks.push(tokio::spawn(write_until(
                client.clone(),
                "users",
                keys,
                seed.wrapping_add(w * 7919),
                stop.clone(),
            )));
        }
        Writers {
            stop,
            tasks,
            keys: all,
        }
    }

    /// Stops the writers and checks their history against what each key holds now (read
    /// through `client`), and their read-backs: panics naming every violation. Returns the
    /// logs and the final state.
    pub async fn finish(self, client: &Client) -> (Vec<WriterLog>, HashMap<String, KeyState>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut logs = Vec::new();
        for task in self.tasks {
            logs.push(task.await.unwrap());
        }
        let state = final_state(client, "users", &self.keys).await;
        let mut violations = check(&logs, &state);
        for log in &logs {
            violations.extend(log.stale_reads.iter().cloned());
        }
        assert!(
            violations.is_empty(),
            "history violations:\n{}",
            violations.join("\n")
        );
        (logs, state)
    }
}

/// Ops, errors (anything not acknowledged) and the longest op of `logs`, printed.
pub fn summary(logs: &[WriterLog]) -> (u64, u64, Duration) {
    let ops: u64 = logs.iter().map(|l| l.ops.len() as u64).sum();
    let errors: u64 = logs.iter().map(|l| l.errors).sum();
    let longest = logs.iter().map(|l| l.longest).max().unwrap_or_default();
    eprintln!("writers: {ops} ops, {errors} errors, longest op {longest:?}");
    (ops, errors, longest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(key: &str, result: Option<&str>, outcome: Outcome) -> Op {
        Op {
            key: key.into(),
            result: result.map(str::to_owned),
            outcome,
        }
    }

    #[test]
    fn a_lost_write_and_an_undone_delete_are_caught() {
        let log = WriterLog {
            ops: vec![
                op("a", Some("1"), Outcome::Acked),
                op("a", Some("2"), Outcome::Acked),
                op("b", Some("1"), Outcome::Acked),
                op("b", None, Outcome::Acked),
                op("c", Some("1"), Outcome::Acked),
                op("c", Some("2"), Outcome::Indeterminate),
            ],
            ..WriterLog::default()
        };
        let good: HashMap<String, KeyState> = [("a", Some("2")), ("b", None), ("c", Some("1"))]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.map(str::to_owned)))
            .collect();
        assert!(check(std::slice::from_ref(&log), &good).is_empty());
        let mut also_good = good.clone();
        also_good.insert("c".into(), Some("2".into()));
        assert!(
            check(std::slice::from_ref(&log), &also_good).is_empty(),
            "an indeterminate write may land"
        );
        let mut lost = good.clone();
        lost.insert("a".into(), Some("1".into()));
        assert_eq!(
            check(std::slice::from_ref(&log), &lost).len(),
            1,
            "a lost write"
        );
        let mut undone = good;
        undone.insert("b".into(), Some("1".into()));
        assert_eq!(
            check(std::slice::from_ref(&log), &undone).len(),
            1,
            "a resurrected delete"
        );
    }
}
