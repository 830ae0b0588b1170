//! Shard keys: how a key is read, and the text the ring hashes.
//!
//! The proxy and the node both use [`ShardKey`], so a key routes to the node that stores it.
//! The key column's [`Affinity`] decides how a key is read: for `integer` affinity a key is a
//! 64-bit integer, written in canonical decimal when it comes as text (`42`, `-7`, never `042`,
//! `+1`, `4.0` or ` 1`), so one row has exactly one spelling and so one owner. For every other
//! affinity a key is text, and a JSON integer is taken as its decimal text.
//!
//! A `real` or `numeric` column stores text that reads as a number as that number: `042`,
//! `42.0` and ` 42` would all be the row `42` on whichever node each spelling routes to, and a
//! REAL has no routing text at all. So for those affinities a key that looks like a number is
//! refused ([`KeyError::StoredAsNumber`]), except, for `numeric`, an integer in canonical
//! decimal, which is stored as that INTEGER and routes as the same text. Every key that is
//! accepted is stored with the routing text it came with.
//!
//! A key already stored in SQLite has a routing text too ([`routing_text_of`]): an INTEGER is
//! its decimal text, a TEXT itself. A REAL, BLOB or NULL key has none: no [`ShardKey`] can
//! spell it, so the proxy never routes to it, and a rebalance never matches it against a hash
//! range (such rows stay where they are).

use std::borrow::Cow;
use std::fmt;

use rusqlite::types::ValueRef;
use serde::{Deserialize, Serialize, Serializer};

/// Longest key accepted, in bytes of its text form.
pub const MAX_KEY_BYTES: usize = 1024;

/// A column's type affinity, by SQLite's rules (<https://www.sqlite.org/datatype3.html>).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Affinity {
    Integer,
    Text,
    Real,
    Numeric,
    Blob,
}

/// The affinity SQLite gives a column declared with `declared_type`.
pub fn affinity_of(declared_type: &str) -> Affinity {
    let t = declared_type.to_ascii_uppercase();
    if t.contains("INT") {
        Affinity::Integer
    } else if t.contains("CHAR") || t.contains("CLOB") || t.contains("TEXT") {
        Affinity::Text
    } else if t.contains("BLOB") || t.trim().is_empty() {
        Affinity::Blob
    } else if t.contains("REAL") || t.contains("FLOA") || t.contains("DOUB") {
        Affinity::Real
    } else {
        Affinity::Numeric
    }
}

/// A key that was read by its column's affinity.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ShardKey {
    Integer(i64),
    Text(String),
}

/// Why a key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("a key must not be empty")]
    Empty,
    #[error("a key is at most {MAX_KEY_BYTES} bytes, this one has {0}")]
    TooLong(usize),
    #[error(
        "{0:?} is not an integer key: write it in canonical decimal form (like 42 or -7) within the 64-bit range"
    )]
    NotInteger(String),
    #[error("a key must be a JSON string or integer, not {0}")]
    WrongType(&'static str),
    #[error(
        "{text:?} would be stored as a number in this {affinity:?} key column, and then no longer \
         route as it is written: {hint}"
    )]
    StoredAsNumber {
        text: String,
        affinity: Affinity,
        hint: &'static str,
    },
}

impl ShardKey {
    /// Reads a key given as JSON (a batch row's key column, a key scan's `after`).
    pub fn from_json(v: &serde_json::Value, affinity: Affinity) -> Result<ShardKey, KeyError> {
        use serde_json::Value;
        match v {
            Value::String(s) => ShardKey::from_text(s, affinity),
            Value::Number(n) => match (n.as_i64(), affinity) {
                (Some(i), Affinity::Integer) => Ok(ShardKey::Integer(i)),
                // Its decimal text, read by the column's affinity.
                (Some(i), _) => ShardKey::from_text(&i.to_string(), affinity),
                // u64 beyond i64: still a JSON integer, so text for text-like affinities.
                (None, Affinity::Integer) => Err(KeyError::NotInteger(n.to_string())),
                (None, _) if n.is_u64() => ShardKey::from_text(&n.to_string(), affinity),
                (None, _) => Err(KeyError::WrongType("a fractional number")),
            },
            Value::Null => Err(KeyError::WrongType("null")),
            Value::Bool(_) => Err(KeyError::WrongType("a boolean")),
            Value::Array(_) => Err(KeyError::WrongType("an array")),
            Value::Object(_) => Err(KeyError::WrongType("an object")),
        }
    }

    /// Reads a key given as text (a decoded URL path segment).
    pub fn from_text(s: &str, affinity: Affinity) -> Result<ShardKey, KeyError> {
        if s.is_empty() {
            return Err(KeyError::Empty);
        }
        if s.len() > MAX_KEY_BYTES {
            return Err(KeyError::TooLong(s.len()));
        }
        match affinity {
            Affinity::Integer => match s.parse::<i64>() {
                // Parsing accepts "+1" and "007"; printing back tells the canonical form apart.
                Ok(i) if i.to_string() == s => Ok(ShardKey::Integer(i)),
                _ => Err(KeyError::NotInteger(s.to_owned())),
            },
            Affinity::Real | Affinity::Numeric if looks_numeric(s) => {
                let canonical_integer = s.parse::<i64>().is_ok_and(|i| i.to_string() == s);
                if affinity == Affinity::Numeric && canonical_integer {
                    Ok(ShardKey::Text(s.to_owned()))
                } else {
                    Err(KeyError::StoredAsNumber {
                        text: s.to_owned(),
                        affinity,
                        hint: if affinity == Affinity::Numeric {
                            "write an integer key in canonical decimal (like 42), or use keys \
                             that are not numbers"
                        } else {
                            "a REAL key column stores numbers as REAL, which cannot be routed; \
                             use keys that are not numbers, or declare the key INTEGER or TEXT"
                        },
                    })
                }
            }
            Affinity::Text | Affinity::Real | Affinity::Numeric | Affinity::Blob => {
                Ok(ShardKey::Text(s.to_owned()))
            }
        }
    }

    /// The text the ring hashes: the canonical text form (integer 42 → `"42"`).
    pub fn routing_text(&self) -> Cow<'_, str> {
        match self {
            ShardKey::Integer(i) => Cow::Owned(i.to_string()),
            ShardKey::Text(s) => Cow::Borrowed(s),
        }
    }

    /// The value bound for the key column.
    pub fn to_sql(&self) -> rusqlite::types::Value {
        match self {
            ShardKey::Integer(i) => rusqlite::types::Value::Integer(*i),
            ShardKey::Text(s) => rusqlite::types::Value::Text(s.clone()),
        }
    }

    /// The key as JSON: a number for integer keys, a string otherwise.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            ShardKey::Integer(i) => serde_json::Value::from(*i),
            ShardKey::Text(s) => serde_json::Value::from(s.as_str()),
        }
    }
}

impl fmt::Display for ShardKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.routing_text())
    }
}

impl Serialize for ShardKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            ShardKey::Integer(i) => serializer.serialize_i64(*i),
            ShardKey::Text(s) => serializer.serialize_str(s),
        }
    }
}

/// Whether SQLite might read `s` as a number when it is stored in a REAL or NUMERIC column:
/// up to its first NUL (SQLite reads no further, as the fuzzer found) and between the white
/// space SQLite skips, a decimal number: a sign, digits, a `.` and more digits (at least one
/// digit in all), and an exponent. A little more than SQLite converts (`_` counts as a digit,
/// and `1e` with no exponent digits passes), so a key that does not pass is surely stored as
/// the TEXT it is.
fn looks_numeric(s: &str) -> bool {
    let s = s.split('\0').next().unwrap_or_default();
    let s = s.trim_matches(|c| matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r'));
    let b = s.as_bytes();
    let digits = |i: &mut usize| {
        let start = *i;
        while b.get(*i).is_some_and(|c| c.is_ascii_digit() || *c == b'_') {
            *i += 1;
        }
        *i > start
    };
    let mut i = 0;
    if matches!(b.first(), Some(b'+' | b'-')) {
        i += 1;
    }
    let whole = digits(&mut i);
    let mut fraction = false;
    if b.get(i) == Some(&b'.') {
        i += 1;
        fraction = digits(&mut i);
    }
    if !whole && !fraction {
        return false;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        digits(&mut i);
    }
    i == b.len() && b.iter().any(u8::is_ascii_digit)
}

/// The routing text of a key as SQLite stores it: INTEGER `i` → `i.to_string()`, TEXT `s` →
/// `s`. REAL, BLOB and NULL keys (and TEXT that is not UTF-8) have none, so hash ranges never
/// match them: the rows stay on the node that holds them.
pub fn routing_text_of(v: ValueRef<'_>) -> Option<String> {
    match v {
        ValueRef::Integer(i) => Some(i.to_string()),
        ValueRef::Text(t) => std::str::from_utf8(t).ok().map(str::to_owned),
        ValueRef::Null | ValueRef::Real(_) | ValueRef::Blob(_) => None,
    }
}

/// `hash_key(&routing_text_of(v)?)`, without allocating: scans hash every key of a table.
pub fn routing_hash_of(v: ValueRef<'_>) -> Option<u32> {
    match v {
        ValueRef::Integer(i) => {
            use std::io::Write as _;
            // i64::MIN is 20 characters.
            let mut buf = [0u8; 20];
            let mut rest = &mut buf[..];
            write!(rest, "{i}").expect("an i64 fits in 20 bytes");
            let len = 20 - rest.len();
            Some(shardlite_ring::hash(&buf[..len]))
        }
        ValueRef::Text(t) => std::str::from_utf8(t).ok().map(shardlite_ring::hash_key),
        ValueRef::Null | ValueRef::Real(_) | ValueRef::Blob(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn affinity_follows_sqlite_rules() {
        assert_eq!(affinity_of("INTEGER"), Affinity::Integer);
        assert_eq!(affinity_of("bigint"), Affinity::Integer);
        // "INT" wins over "CHAR": SQLite checks it first.
        assert_eq!(affinity_of("CHARINT"), Affinity::Integer);
        assert_eq!(affinity_of("VARCHAR(20)"), Affinity::Text);
        assert_eq!(affinity_of("clob"), Affinity::Text);
        assert_eq!(affinity_of("TEXT"), Affinity::Text);
        assert_eq!(affinity_of("BLOB"), Affinity::Blob);
        assert_eq!(affinity_of(""), Affinity::Blob);
        assert_eq!(affinity_of("REAL"), Affinity::Real);
        assert_eq!(affinity_of("FLOAT"), Affinity::Real);
        assert_eq!(affinity_of("DOUBLE PRECISION"), Affinity::Real);
        assert_eq!(affinity_of("DECIMAL(10,5)"), Affinity::Numeric);
        assert_eq!(affinity_of("BOOLEAN"), Affinity::Numeric);
    }

    #[test]
    fn integer_keys_must_be_canonical_decimal() {
        let int = Affinity::Integer;
        assert_eq!(ShardKey::from_text("42", int), Ok(ShardKey::Integer(42)));
        assert_eq!(ShardKey::from_text("-7", int), Ok(ShardKey::Integer(-7)));
        assert_eq!(ShardKey::from_text("0", int), Ok(ShardKey::Integer(0)));
        assert_eq!(
            ShardKey::from_text("9223372036854775807", int),
            Ok(ShardKey::Integer(i64::MAX))
        );
        for bad in [
            "042",
            "+1",
            "4.0",
            " 1",
            "1 ",
            "-0",
            "1e3",
            "abc",
            "9223372036854775808",
        ] {
            assert!(
                matches!(ShardKey::from_text(bad, int), Err(KeyError::NotInteger(_))),
                "{bad:?} should be refused"
            );
        }
        assert_eq!(ShardKey::from_text("", int), Err(KeyError::Empty));
    }

    #[test]
    fn json_keys_follow_affinity() {
        let int = Affinity::Integer;
        let text = Affinity::Text;
        assert_eq!(
            ShardKey::from_json(&json!(42), int),
            Ok(ShardKey::Integer(42))
        );
        assert_eq!(
            ShardKey::from_json(&json!("42"), int),
            Ok(ShardKey::Integer(42))
        );
        assert!(ShardKey::from_json(&json!(4.0), int).is_err());
        assert!(ShardKey::from_json(&json!(u64::MAX), int).is_err());
        assert!(ShardKey::from_json(&json!("042"), int).is_err());
        assert_eq!(
            ShardKey::from_json(&json!(42), text),
            Ok(ShardKey::Text("42".into()))
        );
        assert_eq!(
            ShardKey::from_json(&json!("a b"), text),
            Ok(ShardKey::Text("a b".into()))
        );
        for bad in [
            json!(null),
            json!(true),
            json!([1]),
            json!({"a": 1}),
            json!(1.5),
        ] {
            assert!(matches!(
                ShardKey::from_json(&bad, text),
                Err(KeyError::WrongType(_))
            ));
        }
        assert_eq!(ShardKey::from_json(&json!(""), text), Err(KeyError::Empty));
    }

    #[test]
    fn number_like_keys_of_real_and_numeric_columns_are_refused() {
        let (real, numeric) = (Affinity::Real, Affinity::Numeric);
        assert_eq!(
            ShardKey::from_text("42", numeric),
            Ok(ShardKey::Text("42".into()))
        );
        assert_eq!(
            ShardKey::from_json(&json!(-7), numeric),
            Ok(ShardKey::Text("-7".into()))
        );
        for bad in [
            "042",
            "+1",
            "4.0",
            " 1",
            "1e3",
            "-0",
            "1.5",
            "9223372036854775808",
        ] {
            assert!(
                matches!(
                    ShardKey::from_text(bad, numeric),
                    Err(KeyError::StoredAsNumber { .. })
                ),
                "{bad:?} should be refused"
            );
        }
        for bad in ["42", "1.5", " 1"] {
            assert!(
                matches!(
                    ShardKey::from_text(bad, real),
                    Err(KeyError::StoredAsNumber { .. })
                ),
                "{bad:?} should be refused"
            );
        }
        assert!(ShardKey::from_json(&json!(42), real).is_err());
        assert!(ShardKey::from_json(&json!(u64::MAX), numeric).is_err());
        for fine in ["abc", "0x10", "u1", "2024-01-01", "1a", "e", "-"] {
            assert_eq!(
                ShardKey::from_text(fine, real),
                Ok(ShardKey::Text(fine.into()))
            );
            assert_eq!(
                ShardKey::from_text(fine, numeric),
                Ok(ShardKey::Text(fine.into()))
            );
        }
    }

    /// Every key a column of each affinity accepts is stored (through SQLite's own affinity
    /// rules) as a value that routes as the key does.
    #[test]
    fn accepted_keys_are_stored_as_they_route() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        let columns = [
            (Affinity::Integer, "INTEGER"),
            (Affinity::Text, "TEXT"),
            (Affinity::Real, "REAL"),
            (Affinity::Numeric, "NUMERIC"),
            (Affinity::Blob, ""),
        ];
        let spellings = [
            "42",
            "042",
            "+42",
            "42.0",
            " 42",
            "42 ",
            "4.2e1",
            "1e999",
            "-0",
            "0",
            "1.5",
            ".5",
            "5.",
            "1_000",
            "0x10",
            "abc",
            "2024-01-01",
            "9223372036854775808",
            "-7",
            "1e",
            "+",
            "370\0x}",
            "42\0",
            "\0 42",
            "1-2",
            "- 1",
        ];
        for (affinity, declared) in columns {
            assert_eq!(affinity_of(declared), affinity);
            conn.execute_batch(&format!(
                "DROP TABLE IF EXISTS t; CREATE TABLE t (k {declared})"
            ))
            .unwrap();
            for text in spellings {
                let Ok(key) = ShardKey::from_text(text, affinity) else {
                    continue;
                };
                let stored = conn
                    .query_row(
                        "INSERT INTO t VALUES (?1) RETURNING k",
                        [key.to_sql()],
                        |r| Ok(routing_text_of(r.get_ref(0)?)),
                    )
                    .unwrap();
                assert_eq!(
                    stored.as_deref(),
                    Some(&*key.routing_text()),
                    "{text:?} in a {declared:?} column"
                );
            }
        }
    }

    #[test]
    fn long_keys_are_refused() {
        let long = "x".repeat(MAX_KEY_BYTES + 1);
        assert_eq!(
            ShardKey::from_text(&long, Affinity::Text),
            Err(KeyError::TooLong(MAX_KEY_BYTES + 1))
        );
        let longest = "x".repeat(MAX_KEY_BYTES);
        assert!(ShardKey::from_text(&longest, Affinity::Text).is_ok());
    }

    #[test]
    fn routing_text_is_the_canonical_text() {
        assert_eq!(ShardKey::Integer(42).routing_text(), "42");
        assert_eq!(ShardKey::Integer(-7).routing_text(), "-7");
        assert_eq!(
            ShardKey::Text("héllo/ wörld".into()).routing_text(),
            "héllo/ wörld"
        );
        // An integer key routes the same whether it came as JSON or as path text.
        let from_json = ShardKey::from_json(&json!(42), Affinity::Integer).unwrap();
        let from_text = ShardKey::from_text("42", Affinity::Integer).unwrap();
        assert_eq!(from_json.routing_text(), from_text.routing_text());
    }

    #[test]
    fn keys_serialize_by_kind() {
        assert_eq!(
            serde_json::to_value(ShardKey::Integer(3)).unwrap(),
            json!(3)
        );
        assert_eq!(
            serde_json::to_value(ShardKey::Text("3".into())).unwrap(),
            json!("3")
        );
    }

    #[test]
    fn stored_keys_route_like_request_keys() {
        use shardlite_ring::hash_key;
        for i in [0, 42, -7, i64::MAX, i64::MIN] {
            let v = ValueRef::Integer(i);
            assert_eq!(
                routing_text_of(v),
                Some(ShardKey::Integer(i).routing_text().into())
            );
            assert_eq!(routing_hash_of(v), Some(hash_key(&i.to_string())));
        }
        for s in ["", "u1", "héllo/ wörld", "42"] {
            let v = ValueRef::Text(s.as_bytes());
            assert_eq!(routing_text_of(v).as_deref(), Some(s));
            assert_eq!(routing_hash_of(v), Some(hash_key(s)));
        }
        for v in [
            ValueRef::Null,
            ValueRef::Real(1.5),
            ValueRef::Blob(b"u1"),
            ValueRef::Text(&[0xff, 0xfe]),
        ] {
            assert_eq!(routing_text_of(v), None);
            assert_eq!(routing_hash_of(v), None);
        }
    }
}
