//! JSON ⇄ SQLite values, as the contract maps them.
//!
//! In: null → NULL, bool → 0/1, integer → INTEGER, float → REAL, string → TEXT,
//! `{"$base64": "..."}` → BLOB, any other object or array → TEXT holding its JSON.
//! Out: the same way back; a BLOB comes out as `{"$base64": ...}`, and a REAL that JSON cannot
//! hold (infinity) as null.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rusqlite::types::{Value as SqlValue, ValueRef};
use serde_json::{Map, Value};

/// The key that marks a JSON object as a BLOB.
pub const BASE64_KEY: &str = "$base64";

/// Why a JSON value cannot be stored.
#[derive(Debug, thiserror::Error)]
pub enum ValueError {
    #[error("integer {0} is outside SQLite's 64-bit range")]
    IntegerOutOfRange(String),
    #[error("invalid {{\"$base64\": ...}} value: {0}")]
    InvalidBase64(base64::DecodeError),
    #[error("{{\"$base64\": ...}} must hold a string")]
    Base64NotText,
}

/// The SQLite value for a JSON value.
pub fn json_to_sql(v: &Value) -> Result<SqlValue, ValueError> {
    Ok(match v {
        Value::Null => SqlValue::Null,
        Value::Bool(b) => SqlValue::Integer(i64::from(*b)),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                SqlValue::Integer(i)
            } else if n.is_u64() {
                return Err(ValueError::IntegerOutOfRange(n.to_string()));
            } else {
                // Without serde_json's arbitrary_precision every other number is an f64.
                SqlValue::Real(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(s) => SqlValue::Text(s.clone()),
        Value::Object(map) if map.len() == 1 && map.contains_key(BASE64_KEY) => {
            match &map[BASE64_KEY] {
                Value::String(encoded) => SqlValue::Blob(
                    STANDARD
                        .decode(encoded)
                        .map_err(ValueError::InvalidBase64)?,
                ),
                _ => return Err(ValueError::Base64NotText),
            }
        }
        Value::Object(_) | Value::Array(_) => SqlValue::Text(v.to_string()),
    })
}

/// [`json_to_sql`], taking the value: a string moves into SQLite's value instead of being
/// copied.
pub fn json_into_sql(v: Value) -> Result<SqlValue, ValueError> {
    match v {
        Value::String(s) => Ok(SqlValue::Text(s)),
        other => json_to_sql(&other),
    }
}

/// The JSON value for a SQLite value.
pub fn sql_to_json(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::from(i),
        // `from_f64` is None for NaN and infinities, which JSON cannot hold.
        ValueRef::Real(f) => serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number),
        ValueRef::Text(t) => Value::String(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => {
            let mut map = Map::new();
            map.insert(BASE64_KEY.to_owned(), Value::String(STANDARD.encode(b)));
            Value::Object(map)
        }
    }
}

/// About how many bytes `v` takes in a JSON answer; the result-size cap counts with it.
pub(crate) fn json_size(v: ValueRef<'_>) -> usize {
    match v {
        ValueRef::Null => 4,
        ValueRef::Integer(_) => 20,
        ValueRef::Real(_) => 24,
        ValueRef::Text(t) => t.len() + 2,
        ValueRef::Blob(b) => b.len().div_ceil(3) * 4 + 16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn round_trip(v: Value) -> Value {
        sql_to_json(ValueRef::from(&json_to_sql(&v).unwrap()))
    }

    #[test]
    fn scalars_map_as_the_contract_says() {
        assert_eq!(json_to_sql(&json!(null)).unwrap(), SqlValue::Null);
        assert_eq!(json_to_sql(&json!(true)).unwrap(), SqlValue::Integer(1));
        assert_eq!(json_to_sql(&json!(false)).unwrap(), SqlValue::Integer(0));
        assert_eq!(json_to_sql(&json!(-5)).unwrap(), SqlValue::Integer(-5));
        assert_eq!(json_to_sql(&json!(2.5)).unwrap(), SqlValue::Real(2.5));
        assert_eq!(
            json_to_sql(&json!("héllo")).unwrap(),
            SqlValue::Text("héllo".into())
        );
        assert!(matches!(
            json_to_sql(&json!(u64::MAX)),
            Err(ValueError::IntegerOutOfRange(_))
        ));
    }

    #[test]
    fn objects_and_arrays_are_stored_as_json_text() {
        assert_eq!(
            json_to_sql(&json!({"a": [1, 2]})).unwrap(),
            SqlValue::Text(r#"{"a":[1,2]}"#.into())
        );
        assert_eq!(
            json_to_sql(&json!([1, "x"])).unwrap(),
            SqlValue::Text(r#"[1,"x"]"#.into())
        );
        // An object with "$base64" and anything else is plain JSON, not a blob.
        assert!(matches!(
            json_to_sql(&json!({"$base64": "AA==", "x": 1})).unwrap(),
            SqlValue::Text(_)
        ));
    }

    #[test]
    fn blobs_go_in_and_out_as_base64() {
        assert_eq!(
            json_to_sql(&json!({"$base64": "AAEC/w=="})).unwrap(),
            SqlValue::Blob(vec![0, 1, 2, 255])
        );
        assert_eq!(
            round_trip(json!({"$base64": "AAEC/w=="})),
            json!({"$base64": "AAEC/w=="})
        );
        assert!(matches!(
            json_to_sql(&json!({"$base64": "not base64!"})),
            Err(ValueError::InvalidBase64(_))
        ));
        assert!(matches!(
            json_to_sql(&json!({"$base64": 3})),
            Err(ValueError::Base64NotText)
        ));
    }

    #[test]
    fn values_round_trip() {
        for v in [json!(null), json!(7), json!(-1.25), json!("text ✓")] {
            assert_eq!(round_trip(v.clone()), v);
        }
        assert_eq!(round_trip(json!(true)), json!(1));
        assert_eq!(round_trip(json!({"k": "v"})), json!(r#"{"k":"v"}"#));
    }

    #[test]
    fn infinite_reals_come_out_as_null() {
        assert_eq!(sql_to_json(ValueRef::Real(f64::INFINITY)), json!(null));
    }
}
