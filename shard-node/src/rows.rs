//! Keyed row operations and the key scan.
//!
//! Every statement here is generated from the live schema: table and column names are the
//! schema's own, quoted; values are bound. The SQL text depends only on the table and the set
//! of columns written, so `prepare_cached` reuses it.

use rusqlite::Connection;
use rusqlite::types::Value as SqlValue;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::NodeError;
use crate::key::ShardKey;
use crate::schema::{TableSchema, quote};
use crate::value::{json_to_sql, sql_to_json};

pub(crate) mod batch;

/// `PUT /v1/tables/{table}/rows/{key}` answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PutRowResponse {
    pub table: String,
    pub key: Value,
}

/// `DELETE /v1/tables/{table}/rows/{key}` answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct DeleteRowResponse {
    pub deleted: u64,
}

/// `POST /v1/tables/{table}/rows` body.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct UpsertRowsRequest {
    pub rows: Vec<Value>,
}

/// `POST /v1/tables/{table}/rows` answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct UpsertRowsResponse {
    pub upserted: usize,
}

/// `POST /v1/keys` body.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct KeysRequest {
    pub table: String,
    #[serde(default)]
    pub after: Option<Value>,
    #[serde(default)]
    pub limit: Option<usize>,
}

/// `POST /v1/keys` answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct KeysResponse {
    pub keys: Vec<Value>,
    /// The last key returned when more may follow; null when the scan is done.
    pub next: Option<Value>,
}

/// Keys per scan page when the request names no limit.
pub const DEFAULT_KEYS_LIMIT: usize = 1000;
/// Most keys per scan page; larger limits are lowered to this.
pub const MAX_KEYS_LIMIT: usize = 10_000;

/// A row checked against the schema, ready to write.
#[derive(Debug)]
pub(crate) struct ValidRow {
    key: ShardKey,
    /// (column index in the table, value), in table order, key column excluded.
    values: Vec<(usize, SqlValue)>,
}

impl ValidRow {
    pub(crate) fn key(&self) -> &ShardKey {
        &self.key
    }
}

/// Checks one row object: known columns, storable values, and a key that agrees with
/// `path_key` (PUT) or is present (batch row `index`).
pub(crate) fn validate(
    table: &TableSchema,
    row: &Value,
    path_key: Option<&ShardKey>,
    index: usize,
) -> Result<ValidRow, NodeError> {
    let Value::Object(fields) = row else {
        return Err(NodeError::InvalidRequest(match path_key {
            Some(_) => "the body must be a JSON object of column values".to_owned(),
            None => format!("row {index} must be a JSON object of column values"),
        }));
    };
    let mut row = RowBuilder::with_capacity(fields.len());
    for (name, value) in fields {
        row.field(table, name, value, json_to_sql)?;
    }
    row.finish(table, path_key, index)
}

/// A row being checked field by field: for [`validate`], and for batches read straight from
/// their JSON text ([`batch`]).
pub(crate) struct RowBuilder {
    body_key: Option<ShardKey>,
    values: Vec<(usize, SqlValue)>,
}

impl RowBuilder {
    pub(crate) fn with_capacity(fields: usize) -> RowBuilder {
        RowBuilder {
            body_key: None,
            values: Vec::with_capacity(fields),
        }
    }

    /// One field: a known column, and a storable value (`convert` turns it into SQLite's).
    /// A column named twice keeps its last value, as a JSON object does.
    pub(crate) fn field<V>(
        &mut self,
        table: &TableSchema,
        name: &str,
        value: V,
        convert: impl FnOnce(V) -> Result<SqlValue, crate::value::ValueError>,
    ) -> Result<(), NodeError>
    where
        V: std::borrow::Borrow<Value>,
    {
        let Some(position) = table.columns.iter().position(|c| c == name) else {
            return Err(NodeError::UnknownColumn {
                table: table.name.clone(),
                column: name.to_owned(),
            });
        };
        if name == table.key {
            self.body_key = Some(ShardKey::from_json(value.borrow(), table.key_affinity)?);
            return Ok(());
        }
        let value = convert(value)?;
        match self.values.iter_mut().find(|(p, _)| *p == position) {
            Some(slot) => slot.1 = value,
            None => self.values.push((position, value)),
        }
        Ok(())
    }

    /// The checked row: its key agrees with `path_key` (PUT) or is present (batch row `index`).
    pub(crate) fn finish(
        self,
        table: &TableSchema,
        path_key: Option<&ShardKey>,
        index: usize,
    ) -> Result<ValidRow, NodeError> {
        let key = match (path_key, self.body_key) {
            (Some(path_key), Some(body_key)) if *path_key != body_key => {
                return Err(NodeError::KeyMismatch {
                    column: table.key.clone(),
                    path: path_key.to_string(),
                    body: body_key.to_string(),
                });
            }
            (Some(key), _) => key.clone(),
            (None, Some(key)) => key,
            (None, None) => {
                return Err(NodeError::MissingKey {
                    index,
                    column: table.key.clone(),
                });
            }
        };
        let mut values = self.values;
        values.sort_by_key(|(position, _)| *position);
        Ok(ValidRow { key, values })
    }
}

/// `INSERT ... ON CONFLICT (key) DO UPDATE SET` the named columns only.
fn upsert_sql(table: &TableSchema, columns: &[usize]) -> String {
    upsert_sql_setting(table, columns, columns)
}

/// `INSERT` the named columns `ON CONFLICT (key) DO UPDATE SET` every non-key column to its
/// `excluded` value: the stored row becomes exactly the one a fresh insert would make (unnamed
/// columns take their defaults). Not `REPLACE`, which deletes first and fires delete triggers.
fn whole_row_sql(table: &TableSchema, columns: &[usize]) -> String {
    let every: Vec<usize> = (0..table.columns.len())
        .filter(|&i| table.columns[i] != table.key)
        .collect();
    upsert_sql_setting(table, columns, &every)
}

fn upsert_sql_setting(table: &TableSchema, columns: &[usize], set: &[usize]) -> String {
    let key = quote(&table.key);
    let names: Vec<String> = columns.iter().map(|&i| quote(&table.columns[i])).collect();
    let mut all = vec![key.clone()];
    all.extend(names.iter().cloned());
    let placeholders: Vec<String> = (1..=all.len()).map(|i| format!("?{i}")).collect();
    let action = if set.is_empty() {
        "DO NOTHING".to_owned()
    } else {
        let sets: Vec<String> = set
            .iter()
            .map(|&i| quote(&table.columns[i]))
            .map(|n| format!("{n} = excluded.{n}"))
            .collect();
        format!("DO UPDATE SET {}", sets.join(", "))
    };
    format!(
        "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({key}) {action}",
        quote(&table.name),
        all.join(", "),
        placeholders.join(", ")
    )
}

/// Writes one validated row: inserts it, or updates only the columns it names.
pub(crate) fn upsert(
    conn: &Connection,
    table: &TableSchema,
    row: &ValidRow,
) -> Result<(), NodeError> {
    upsert_all(conn, table, std::slice::from_ref(row)).map(drop)
}

/// Writes validated rows whole: every column a row does not name takes its default, on insert
/// and on update alike (how a rebalance copies rows). Inside the caller's transaction.
pub(crate) fn upsert_whole_all(
    conn: &Connection,
    table: &TableSchema,
    rows: &[ValidRow],
) -> Result<usize, NodeError> {
    run_each(conn, rows, |columns| whole_row_sql(table, columns))
}

fn bind_and_run(stmt: &mut rusqlite::Statement<'_>, row: &ValidRow) -> Result<(), NodeError> {
    let key = row.key.to_sql();
    let params = std::iter::once(&key as &dyn rusqlite::ToSql)
        .chain(row.values.iter().map(|(_, v)| v as &dyn rusqlite::ToSql));
    stmt.execute(rusqlite::params_from_iter(params))?;
    Ok(())
}

/// Writes validated rows inside the caller's transaction. Rows that name the same columns as
/// the row before them reuse its statement: a batch's rows usually all do, and building and
/// looking up the SQL text per row cost about as much as SQLite's own insert.
pub(crate) fn upsert_all(
    conn: &Connection,
    table: &TableSchema,
    rows: &[ValidRow],
) -> Result<usize, NodeError> {
    run_each(conn, rows, |columns| upsert_sql(table, columns))
}

/// Runs the statement `sql_for(columns)` once per row, binding the key and the row's values;
/// a row that names the same columns as the row before it reuses that row's statement.
fn run_each(
    conn: &Connection,
    rows: &[ValidRow],
    sql_for: impl Fn(&[usize]) -> String,
) -> Result<usize, NodeError> {
    let mut current: Option<(Vec<usize>, rusqlite::CachedStatement<'_>)> = None;
    for row in rows {
        let same = current.as_ref().is_some_and(|(columns, _)| {
            columns.len() == row.values.len()
                && columns.iter().zip(&row.values).all(|(c, (i, _))| c == i)
        });
        if !same {
            // Drop the previous statement first: it returns to the cache.
            drop(current.take());
            let columns: Vec<usize> = row.values.iter().map(|(i, _)| *i).collect();
            let stmt = conn.prepare_cached(&sql_for(&columns))?;
            current = Some((columns, stmt));
        }
        let (_, stmt) = current.as_mut().expect("set above");
        bind_and_run(stmt, row)?;
    }
    Ok(rows.len())
}

/// The row with `key`, every column included.
pub(crate) fn get(
    conn: &Connection,
    table: &TableSchema,
    key: &ShardKey,
) -> Result<Map<String, Value>, NodeError> {
    let sql = format!(
        "SELECT * FROM {} WHERE {} = ?1",
        quote(&table.name),
        quote(&table.key)
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut rows = stmt.query([key.to_sql()])?;
    let Some(row) = rows.next()? else {
        return Err(not_found(table, key));
    };
    // Names come from the statement as stepped: a cached `SELECT *` is re-prepared by the
    // step after a migration added a column, and only then names it.
    Ok(object_of(row)?)
}

/// A stepped row as a JSON object, named by the statement's columns.
pub(crate) fn object_of(row: &rusqlite::Row<'_>) -> rusqlite::Result<Map<String, Value>> {
    let mut object = Map::new();
    for (i, name) in row.as_ref().column_names().into_iter().enumerate() {
        object.insert(name.to_owned(), sql_to_json(row.get_ref(i)?));
    }
    Ok(object)
}

/// Deletes the row with `key`; 404 if there is none.
pub(crate) fn delete(
    conn: &Connection,
    table: &TableSchema,
    key: &ShardKey,
) -> Result<u64, NodeError> {
    let sql = format!(
        "DELETE FROM {} WHERE {} = ?1",
        quote(&table.name),
        quote(&table.key)
    );
    let deleted = conn.prepare_cached(&sql)?.execute([key.to_sql()])?;
    if deleted == 0 {
        return Err(not_found(table, key));
    }
    Ok(deleted as u64)
}

fn not_found(table: &TableSchema, key: &ShardKey) -> NodeError {
    NodeError::RowNotFound {
        table: table.name.clone(),
        key: key.to_string(),
    }
}

/// Up to `limit` keys after `after`, in primary-key order.
pub(crate) fn keys(
    conn: &Connection,
    table: &TableSchema,
    after: Option<&ShardKey>,
    limit: usize,
) -> Result<KeysResponse, NodeError> {
    let (t, k) = (quote(&table.name), quote(&table.key));
    let sql = match after {
        Some(_) => format!("SELECT {k} FROM {t} WHERE {k} > ?1 ORDER BY {k} LIMIT ?2"),
        None => format!("SELECT {k} FROM {t} ORDER BY {k} LIMIT ?2"),
    };
    let mut stmt = conn.prepare_cached(&sql)?;
    if let Some(after) = after {
        stmt.raw_bind_parameter(1, after.to_sql())?;
    }
    // One more than asked tells whether another page follows.
    let fetch = i64::try_from(limit + 1).unwrap_or(i64::MAX);
    stmt.raw_bind_parameter(2, fetch)?;
    let mut keys = Vec::with_capacity(limit.min(1024));
    let mut rows = stmt.raw_query();
    while let Some(row) = rows.next()? {
        keys.push(sql_to_json(row.get_ref(0)?));
    }
    let next = if keys.len() > limit {
        keys.truncate(limit);
        keys.last().cloned()
    } else {
        None
    };
    Ok(KeysResponse { keys, next })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::Affinity;
    use serde_json::json;

    #[test]
    fn a_batch_with_changing_column_sets_writes_each_row_by_its_own_columns() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE users (id TEXT PRIMARY KEY, name TEXT, email TEXT DEFAULT 'none');
             INSERT INTO users VALUES ('b', 'old b', 'b@old');",
        )
        .unwrap();
        let table = users();
        let rows: Vec<ValidRow> = [
            json!({"id": "a", "name": "A"}),
            json!({"id": "b", "email": "b@new"}),
            json!({"id": "c", "name": "C", "email": "c@x"}),
            json!({"id": "d", "name": "D"}),
        ]
        .iter()
        .enumerate()
        .map(|(i, row)| validate(&table, row, None, i).unwrap())
        .collect();
        assert_eq!(upsert_all(&conn, &table, &rows).unwrap(), 4);
        let stored: Vec<(String, Option<String>, Option<String>)> = conn
            .prepare("SELECT id, name, email FROM users ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let some = |s: &str| Some(s.to_owned());
        assert_eq!(
            stored,
            vec![
                ("a".into(), some("A"), some("none")),
                // Only the named column changed.
                ("b".into(), some("old b"), some("b@new")),
                ("c".into(), some("C"), some("c@x")),
                ("d".into(), some("D"), some("none")),
            ]
        );
    }

    fn users() -> TableSchema {
        TableSchema {
            name: "users".into(),
            key: "id".into(),
            key_affinity: Affinity::Text,
            columns: vec!["id".into(), "name".into(), "email".into()],
        }
    }

    #[test]
    fn upsert_sql_updates_only_named_columns() {
        assert_eq!(
            upsert_sql(&users(), &[2]),
            "INSERT INTO \"users\" (\"id\", \"email\") VALUES (?1, ?2) \
             ON CONFLICT (\"id\") DO UPDATE SET \"email\" = excluded.\"email\""
        );
        assert_eq!(
            upsert_sql(&users(), &[]),
            "INSERT INTO \"users\" (\"id\") VALUES (?1) ON CONFLICT (\"id\") DO NOTHING"
        );
    }

    #[test]
    fn whole_row_sql_sets_every_column() {
        assert_eq!(
            whole_row_sql(&users(), &[2]),
            "INSERT INTO \"users\" (\"id\", \"email\") VALUES (?1, ?2) \
             ON CONFLICT (\"id\") DO UPDATE SET \"name\" = excluded.\"name\", \
             \"email\" = excluded.\"email\""
        );
    }

    #[test]
    fn validation_orders_columns_and_checks_the_key() {
        let table = users();
        let key = ShardKey::Text("a".into());
        let row = validate(&table, &json!({"email": "e", "name": "n"}), Some(&key), 0).unwrap();
        let positions: Vec<usize> = row.values.iter().map(|(i, _)| *i).collect();
        assert_eq!(positions, [1, 2]);
        assert!(matches!(
            validate(&table, &json!({"id": "b"}), Some(&key), 0),
            Err(NodeError::KeyMismatch { .. })
        ));
        assert!(matches!(
            validate(&table, &json!({"name": "n"}), None, 3),
            Err(NodeError::MissingKey { index: 3, .. })
        ));
        assert!(matches!(
            validate(&table, &json!({"id": "a", "nope": 1}), None, 0),
            Err(NodeError::UnknownColumn { .. })
        ));
    }
}
