//! A batch body, `{"rows": [{...}, ...]}`, read straight from its JSON text into checked rows.
//!
//! Building a JSON tree per row (an ordered map, a string per column name) and then converting
//! it cost the node more than SQLite's own insert of the row. Here each field is checked as it
//! is read: the column name is looked up without being copied when it has no escapes, and a
//! string value moves into the SQLite value. The checks are [`RowBuilder`]'s, the same as
//! [`super::validate`]'s, so a batch is refused for the same reasons with the same messages.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use super::{RowBuilder, ValidRow};
use crate::error::NodeError;
use crate::schema::TableSchema;
use crate::value::json_into_sql;

/// Why a body was not read.
#[derive(Debug)]
pub(crate) enum Unread {
    /// A row was refused by the row checks.
    Refused(NodeError),
    /// The body is not a JSON object with a `rows` array (or is not JSON at all); the caller
    /// reads it again with serde's own error path for the message.
    NotABatch,
}

/// Reads a batch body into checked rows, in order.
pub(crate) fn parse(table: &TableSchema, body: &[u8]) -> Result<Vec<ValidRow>, Unread> {
    let refusal = RefCell::new(None);
    let mut reader = serde_json::Deserializer::from_slice(body);
    let read = BodySeed(Batch {
        table,
        refusal: &refusal,
    })
    .deserialize(&mut reader)
    .and_then(|rows| reader.end().map(|()| rows));
    match (read, refusal.into_inner()) {
        (_, Some(refused)) => Err(Unread::Refused(refused)),
        (Ok(rows), None) => Ok(rows),
        (Err(_), None) => Err(Unread::NotABatch),
    }
}

/// What every level of the parse needs: the table, and where a refusal is kept.
#[derive(Clone, Copy)]
struct Batch<'a> {
    table: &'a TableSchema,
    refusal: &'a RefCell<Option<NodeError>>,
}

impl Batch<'_> {
    /// Aborts the parse after storing the refusal (the first one wins: nothing runs after it).
    fn refuse<E: de::Error>(self, error: NodeError) -> E {
        self.refusal.borrow_mut().get_or_insert(error);
        E::custom("a row was refused")
    }
}

/// The body: an object with a `rows` array.
struct BodySeed<'a>(Batch<'a>);

impl<'de> DeserializeSeed<'de> for BodySeed<'_> {
    type Value = Vec<ValidRow>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for BodySeed<'_> {
    type Value = Vec<ValidRow>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object with a \"rows\" array")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut rows = None;
        while let Some(name) = map.next_key::<Name<'de>>()? {
            if name.as_str() != "rows" {
                // Like the derived request type: other fields are ignored.
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            if rows.is_some() {
                return Err(de::Error::duplicate_field("rows"));
            }
            rows = Some(map.next_value_seed(RowsSeed(self.0))?);
        }
        rows.ok_or_else(|| de::Error::missing_field("rows"))
    }
}

/// The `rows` array.
struct RowsSeed<'a>(Batch<'a>);

impl<'de> DeserializeSeed<'de> for RowsSeed<'_> {
    type Value = Vec<ValidRow>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for RowsSeed<'_> {
    type Value = Vec<ValidRow>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of rows")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut rows = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        loop {
            let seed = RowSeed {
                batch: self.0,
                index: rows.len(),
            };
            match seq.next_element_seed(seed)? {
                Some(row) => rows.push(row),
                None => return Ok(rows),
            }
        }
    }
}

/// One row, the `index`th.
struct RowSeed<'a> {
    batch: Batch<'a>,
    index: usize,
}

impl RowSeed<'_> {
    fn not_an_object<E: de::Error>(self) -> E {
        let message = format!("row {} must be a JSON object of column values", self.index);
        self.batch.refuse(NodeError::InvalidRequest(message))
    }
}

impl<'de> DeserializeSeed<'de> for RowSeed<'_> {
    type Value = ValidRow;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RowSeed<'_> {
    type Value = ValidRow;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a row object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let Batch { table, .. } = self.batch;
        let mut row = RowBuilder::with_capacity(table.columns.len());
        while let Some(name) = map.next_key::<Name<'de>>()? {
            let value: Value = map.next_value()?;
            if let Err(e) = row.field(table, name.as_str(), value, json_into_sql) {
                return Err(self.batch.refuse(e));
            }
        }
        row.finish(table, None, self.index)
            .map_err(|e| self.batch.refuse(e))
    }

    // Anything but an object: the same refusal as a batch of JSON values gets.
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Err(self.not_an_object())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Err(self.not_an_object())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Err(self.not_an_object())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Err(self.not_an_object())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Err(self.not_an_object())
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(self.not_an_object())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Err(self.not_an_object())
    }
}

/// An object key: borrowed from the body when it has no escapes, copied otherwise.
enum Name<'de> {
    Borrowed(&'de str),
    Owned(String),
}

impl Name<'_> {
    fn as_str(&self) -> &str {
        match self {
            Name::Borrowed(s) => s,
            Name::Owned(s) => s,
        }
    }
}

impl<'de> de::Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl<'de> Visitor<'de> for NameVisitor {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Name<'de>, E> {
                Ok(Name::Borrowed(s))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Name<'de>, E> {
                Ok(Name::Owned(s.to_owned()))
            }
        }
        deserializer.deserialize_str(NameVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::Affinity;
    use serde_json::json;

    fn users() -> TableSchema {
        TableSchema {
            name: "users".into(),
            key: "id".into(),
            key_affinity: Affinity::Text,
            columns: vec!["id".into(), "name".into(), "age".into()],
        }
    }

    /// The batch read from its text, row by row as the tree-building check reads it.
    fn both(body: &Value) -> (Result<Vec<String>, String>, Result<Vec<String>, String>) {
        let table = users();
        let streamed = match parse(&table, body.to_string().as_bytes()) {
            Ok(rows) => Ok(rows.iter().map(|r| format!("{r:?}")).collect()),
            Err(Unread::Refused(e)) => Err(e.to_string()),
            Err(Unread::NotABatch) => Err("not a batch".into()),
        };
        let tree = match body.get("rows").and_then(Value::as_array) {
            Some(rows) => rows
                .iter()
                .enumerate()
                .map(|(i, row)| super::super::validate(&table, row, None, i))
                .map(|r| r.map(|r| format!("{r:?}")).map_err(|e| e.to_string()))
                .collect(),
            None => Err("not a batch".into()),
        };
        (streamed, tree)
    }

    #[test]
    fn rows_read_from_the_text_equal_rows_checked_from_the_tree() {
        for body in [
            json!({"rows": []}),
            json!({"rows": [{"id": "a", "name": "A", "age": 3}, {"age": null, "id": "b"}]}),
            json!({"rows": [{"id": "a", "name": {"nested": [1, 2]}}], "ignored": true}),
            json!({"rows": [{"id": "é\"\\n", "na\u{6d}e": "x"}]}),
            json!({"rows": [{"id": "a"}, {"name": "no key"}]}),
            json!({"rows": [{"id": "a"}, {"id": "b", "colour": "red"}]}),
            json!({"rows": [{"id": "a"}, 5]}),
            json!({"rows": [{"id": "a"}, ["x"]]}),
            json!({"rows": [{"id": 7}]}),
            json!({"rows": [{"id": "a", "age": 18446744073709551615u64}]}),
            json!({"rows": [{"id": "a", "name": {"$base64": "!!"}}]}),
            json!({"rows": 3}),
            json!({"other": []}),
            json!([1]),
        ] {
            let (streamed, tree) = both(&body);
            assert_eq!(streamed, tree, "{body}");
        }
    }

    #[test]
    fn a_column_named_twice_keeps_its_last_value_and_syntax_errors_are_not_a_batch() {
        let table = users();
        let rows = parse(
            &table,
            br#"{"rows": [{"id": "a", "name": "x", "name": "y"}]}"#,
        )
        .unwrap();
        assert_eq!(
            rows[0].values,
            vec![(1, rusqlite::types::Value::Text("y".into()))]
        );
        for text in [
            &br#"{"rows": [{"id": "a"}"#[..],
            br#"{"rows": [], "rows": []}"#,
            br#"{"rows": []} x"#,
            b"",
        ] {
            assert!(
                matches!(parse(&table, text), Err(Unread::NotABatch)),
                "{}",
                String::from_utf8_lossy(text)
            );
        }
    }
}
