//! A YAML tree in which every node remembers where it came from.
//!
//! Policy files are first read into [`Node`]s and only then converted into the rule model
//! (`crate::parse`). Doing the conversion by hand, rather than with derived `Deserialize`
//! impls, is what lets every error name the file, line, column and field path, and lets one file
//! report all of its problems at once instead of stopping at the first.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// A position in a source file, 1-based. Line 0 means "unknown".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos {
    /// 1-based line.
    pub line: u32,
    /// 1-based column (in characters).
    pub col: u32,
}

/// One YAML node and its position.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// Where the node starts.
    pub pos: Pos,
    /// What it holds.
    pub value: Value,
}

/// The value of a YAML node (YAML 1.2 core schema).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `null`, `~` or nothing.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// An integer that fits in an `i128`.
    Int(i128),
    /// A floating-point number.
    Float(f64),
    /// A string scalar.
    Str(String),
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, in source order (duplicate keys are rejected by the parser).
    Map(Vec<(Node, Node)>),
}

/// A YAML syntax error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntaxError {
    /// Where the parser gave up (line 0 when it could not tell).
    pub pos: Pos,
    /// The parser's message.
    pub message: String,
}

/// Parses a multi-document YAML stream. Empty documents are skipped.
pub fn parse_documents(text: &str) -> Result<Vec<Node>, SyntaxError> {
    let options = serde_saphyr::options! {
        // serde-saphyr's defaults bound alias expansion, nodes and nesting; a policy file may hold
        // many more documents than its default 1,024 (one per policy is common), and never needs
        // thousands of anchors.
        budget: serde_saphyr::budget! {
            max_anchors: 1000,
            max_documents: 100_000,
        },
    };
    serde_saphyr::from_multiple_with_options::<Node>(text, options).map_err(|e| {
        let pos = e
            .location()
            .map(|l| Pos {
                line: saturate(l.line()),
                col: saturate(l.column()),
            })
            .unwrap_or_default();
        SyntaxError {
            pos,
            message: first_line(&e.to_string()),
        }
    })
}

fn saturate(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// serde-saphyr renders a multi-line snippet; a `FILE:LINE:COL: message` line wants the gist.
fn first_line(message: &str) -> String {
    let line = message
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("syntax error");
    let line = line.trim().trim_start_matches("error:").trim();
    line.to_string()
}

// ---- Node ----

impl Node {
    /// A short name of the node's type, for "expected X, found Y" messages.
    pub fn type_name(&self) -> &'static str {
        match self.value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    /// The scalar as text (strings, numbers and booleans), as a user would have typed it.
    pub fn scalar_text(&self) -> Option<String> {
        match &self.value {
            Value::Str(s) => Some(s.clone()),
            Value::Int(i) => Some(i.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Float(f) => Some(f.to_string()),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let spanned = Spanned::<Value>::deserialize(deserializer)?;
        Ok(Node {
            pos: Pos {
                line: saturate(spanned.referenced.line()),
                col: saturate(spanned.referenced.column()),
            },
            value: spanned.value,
        })
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v.into()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Int(v.into()))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        Ok(Value::Int(v))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        i128::try_from(v)
            .map(Value::Int)
            .map_err(|_| E::custom("integer too large"))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Str(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::Str(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Value::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Node>()? {
            items.push(item);
        }
        Ok(Value::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries = Vec::new();
        while let Some((k, v)) = map.next_entry::<Node, Node>()? {
            entries.push((k, v));
        }
        Ok(Value::Map(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_carry_positions() {
        let docs =
            parse_documents("a: 1\nb:\n  - x\n  - \"80\"\n---\n---\nc: {d: true}\n").unwrap();
        assert_eq!(docs.len(), 2, "the empty middle document is skipped");
        let Value::Map(entries) = &docs[0].value else {
            panic!("expected a map")
        };
        assert_eq!(entries[0].0.value, Value::Str("a".into()));
        assert_eq!(entries[0].1.value, Value::Int(1));
        assert_eq!(entries[0].1.pos, Pos { line: 1, col: 4 });
        let Value::Seq(items) = &entries[1].1.value else {
            panic!("expected a list")
        };
        assert_eq!(items[1].value, Value::Str("80".into()));
        assert_eq!(items[1].pos.line, 4);
        let Value::Map(entries) = &docs[1].value else {
            panic!("expected a map")
        };
        assert_eq!(entries[0].0.pos, Pos { line: 7, col: 1 });
    }

    #[test]
    fn syntax_errors_have_positions() {
        let err = parse_documents("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.pos.line >= 1, "{err:?}");
        assert!(!err.message.is_empty());
    }

    #[test]
    fn duplicate_keys_are_rejected() {
        let err = parse_documents("a: 1\na: 2\n").unwrap_err();
        assert_eq!(err.pos.line, 2, "{err:?}");
    }
}
