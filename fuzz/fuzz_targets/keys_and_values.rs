//! Fuzzes shard keys and the JSON ⇄ SQLite value mapping: the pure functions the proxy and
//! the nodes share, so a disagreement here would send a key to the wrong node or change a value.
//!
//! Byte 0 picks the key column's affinity; the rest is read as text (when it is UTF-8) and as
//! JSON (when it parses). What must hold:
//! - nothing panics;
//! - a key that parses routes as its own text: `from_text(s)` gives a key whose routing text
//!   is `s`, and reading that key back (as text or as its JSON) gives the same key;
//! - a JSON key routes as the text that names it (a string as itself, an integer as its
//!   decimal), and that text reads back as the same key;
//! - a stored key (`to_sql`) has the same routing text and hash as the key, also once stored
//!   in a real column of that affinity (where SQLite may turn text into a number);
//! - `json_to_sql` then `sql_to_json` gives back the value the contract promises, through a
//!   real SQLite statement too, and storing that answer again stores the same value.

#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use rusqlite::Connection;
use rusqlite::types::ValueRef;
use serde_json::{Value, json};
use shardlite_node::key::{Affinity, KeyError, MAX_KEY_BYTES, ShardKey, affinity_of};
use shardlite_node::key::{routing_hash_of, routing_text_of};
use shardlite_node::value::{BASE64_KEY, json_to_sql, sql_to_json};

const AFFINITIES: [Affinity; 5] = [
    Affinity::Integer,
    Affinity::Text,
    Affinity::Real,
    Affinity::Numeric,
    Affinity::Blob,
];

thread_local! {
    /// An in-memory SQLite, to bind values and read them back, with a one-column table per
    /// affinity (`k_integer`, ...).
    static SQLITE: RefCell<Connection> = RefCell::new({
        let conn = Connection::open_in_memory().expect("an in-memory database opens");
        conn.execute_batch(
            "CREATE TABLE k_integer (k INTEGER); CREATE TABLE k_text (k TEXT);
             CREATE TABLE k_real (k REAL); CREATE TABLE k_numeric (k NUMERIC);
             CREATE TABLE k_blob (k);",
        )
        .expect("the key tables are created");
        conn
    });
}

/// The routing text of `key` once SQLite stored it in a column of `affinity`.
fn stored_routing_text(key: &ShardKey, affinity: Affinity) -> Option<String> {
    let table = match affinity {
        Affinity::Integer => "k_integer",
        Affinity::Text => "k_text",
        Affinity::Real => "k_real",
        Affinity::Numeric => "k_numeric",
        Affinity::Blob => "k_blob",
    };
    SQLITE.with(|db| {
        let db = db.borrow();
        let text = db
            .query_row(
                &format!("INSERT INTO {table} VALUES (?1) RETURNING k"),
                [key.to_sql()],
                |row| Ok(routing_text_of(row.get_ref(0)?)),
            )
            .expect("a key is stored");
        db.execute(&format!("DELETE FROM {table}"), [])
            .expect("the key table empties");
        text
    })
}

/// What every key that parsed must satisfy.
fn check_key(key: &ShardKey, affinity: Affinity) {
    let text = key.routing_text();
    assert!(!text.is_empty() && text.len() <= MAX_KEY_BYTES, "{key:?}");
    assert_eq!(key.to_string(), text, "Display is the routing text");
    assert_eq!(
        ShardKey::from_text(&text, affinity).as_ref(),
        Ok(key),
        "a key's routing text reads back as the same key ({affinity:?})"
    );
    assert_eq!(
        ShardKey::from_json(&key.to_json(), affinity).as_ref(),
        Ok(key),
        "a key's JSON reads back as the same key ({affinity:?})"
    );
    assert_eq!(
        serde_json::to_value(key).expect("a key serializes"),
        key.to_json()
    );
    let stored = key.to_sql();
    let stored = ValueRef::from(&stored);
    assert_eq!(routing_text_of(stored).as_deref(), Some(&*text));
    assert_eq!(
        routing_hash_of(stored),
        Some(shardlite_ring::hash_key(&text)),
        "a stored key hashes like the key"
    );
    assert_eq!(
        stored_routing_text(key, affinity).as_deref(),
        Some(&*text),
        "a key stored in a {affinity:?} column routes as the key"
    );
}

fn check_text_key(text: &str, affinity: Affinity) {
    match ShardKey::from_text(text, affinity) {
        Ok(key) => {
            assert_eq!(
                key.routing_text(),
                text,
                "a key that parses routes as its own text ({affinity:?})"
            );
            check_key(&key, affinity);
        }
        Err(KeyError::Empty) => assert!(text.is_empty()),
        Err(KeyError::TooLong(n)) => assert!(n == text.len() && n > MAX_KEY_BYTES),
        Err(KeyError::NotInteger(_)) => assert_eq!(affinity, Affinity::Integer),
        Err(KeyError::StoredAsNumber { .. }) => {
            assert!(matches!(affinity, Affinity::Real | Affinity::Numeric))
        }
        Err(KeyError::WrongType(what)) => panic!("text read as {what}"),
    }
}

fn check_json_key(value: &Value, affinity: Affinity) {
    let Ok(key) = ShardKey::from_json(value, affinity) else {
        return;
    };
    match value {
        Value::String(s) => assert_eq!(key.routing_text(), s.as_str()),
        Value::Number(n) => assert_eq!(
            key.routing_text(),
            n.to_string(),
            "a JSON integer routes as its decimal text"
        ),
        other => panic!("{other} was read as the key {key:?}"),
    }
    check_key(&key, affinity);
}

/// The JSON `sql_to_json` must give for a value stored from `value`.
fn expected_answer(value: &Value) -> Value {
    match value {
        Value::Bool(b) => json!(i64::from(*b)),
        Value::Object(map) if map.len() == 1 && map.contains_key(BASE64_KEY) => value.clone(),
        Value::Object(_) | Value::Array(_) => Value::String(value.to_string()),
        Value::Null | Value::Number(_) | Value::String(_) => value.clone(),
    }
}

fn check_value(value: &Value) {
    let Ok(stored) = json_to_sql(value) else {
        return;
    };
    let answer = sql_to_json(ValueRef::from(&stored));
    assert_eq!(
        answer,
        expected_answer(value),
        "{value} came back as {answer}"
    );
    let again = json_to_sql(&answer).expect("an answer can be stored again");
    assert_eq!(again, stored, "storing {answer} again changed it");
    // Through a real statement: bind it, select it, map it back.
    let through = SQLITE.with(|db| {
        db.borrow()
            .query_row("SELECT ?1", [&stored], |row| {
                Ok(sql_to_json(row.get_ref(0)?))
            })
            .expect("SELECT ?1 runs")
    });
    assert_eq!(through, answer, "{value} through SQLite");
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let affinity = AFFINITIES[usize::from(selector) % AFFINITIES.len()];
    if let Ok(text) = std::str::from_utf8(rest) {
        check_text_key(text, affinity);
        let _ = affinity_of(text);
    }
    if let Ok(value) = serde_json::from_slice::<Value>(rest) {
        check_json_key(&value, affinity);
        check_value(&value);
        // One level down too: the rows of a batch and the params of a statement are elements.
        let children: Vec<&Value> = match &value {
            Value::Array(items) => items.iter().collect(),
            Value::Object(map) => map.values().collect(),
            _ => Vec::new(),
        };
        for child in children.into_iter().take(64) {
            check_json_key(child, affinity);
            check_value(child);
        }
    }
});
