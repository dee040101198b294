//! A TOML document as a tree in which every key and value remembers its byte span.
//!
//! The loader validates this tree itself instead of deserializing straight into the schema,
//! so that it can report every problem in a file (not just the first) with a line number.
//!
//! Spans come from the `toml` deserializer through the same protocol `toml::Spanned<T>`
//! uses. Rather than wrapping every node in `toml::Spanned` (which makes deserialization
//! fail outright on values the `toml` crate cannot span, such as implicit tables created by
//! dotted keys, and on dates), [`Located`] asks for a span and gracefully accepts a plain
//! value when none is offered. The protocol's identifiers are learnt at run time by asking
//! `toml::Spanned` itself (see [`spanned_protocol`]), so nothing private is hard-coded.

use std::cell::Cell;
use std::fmt;
use std::ops::Range;
use std::sync::OnceLock;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// A node and, when the parser could tell, where it is in the source.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Located {
    pub span: Option<Range<usize>>,
    pub node: Node,
}

/// A TOML value. Tables keep document order; keys are [`Located`] strings.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Node {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Datetime(String),
    Array(Vec<Located>),
    Table(Vec<(Located, Located)>),
}

impl Node {
    /// Human name of the TOML type, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Node::Str(_) => "a string",
            Node::Int(_) => "an integer",
            Node::Float(_) => "a float",
            Node::Bool(_) => "a boolean",
            Node::Datetime(_) => "a date/time",
            Node::Array(_) => "an array",
            Node::Table(_) => "a table",
        }
    }
}

impl Located {
    /// The key text if this node is a string key.
    pub fn key_str(&self) -> &str {
        match &self.node {
            Node::Str(s) => s,
            _ => "",
        }
    }
}

/// Key under which the `toml` crate hands over a date/time value as a one-entry map.
const DATETIME_FIELD: &str = "$__toml_private_datetime";

type Protocol = (&'static str, &'static [&'static str]);

/// The struct name and field names `toml::Spanned` requests from a deserializer
/// (`[start, end, value]`), discovered by letting it deserialize from a probe.
fn spanned_protocol() -> Option<Protocol> {
    static PROTOCOL: OnceLock<Option<Protocol>> = OnceLock::new();
    *PROTOCOL.get_or_init(|| {
        let seen = Cell::new(None);
        // The probe always fails after recording what it was asked for.
        let _ = toml::Spanned::<i64>::deserialize(Probe(&seen));
        seen.get().filter(|(_, fields)| fields.len() == 3)
    })
}

/// A deserializer that only records the arguments of `deserialize_struct`.
struct Probe<'a>(&'a Cell<Option<Protocol>>);

impl<'de> Deserializer<'de> for Probe<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("probe"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.set(Some((name, fields)));
        Err(de::Error::custom("probe"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

impl<'de> Deserialize<'de> for Located {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match spanned_protocol() {
            Some((name, fields)) => deserializer.deserialize_struct(name, fields, LocatedVisitor { fields }),
            None => deserializer.deserialize_any(LocatedVisitor { fields: &[] }),
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

/// Accepts either the spanned form (a map of start, end, value) or a bare value.
struct LocatedVisitor {
    fields: &'static [&'static str],
}

fn bare(node: Node) -> Located {
    Located { span: None, node }
}

impl<'de> Visitor<'de> for LocatedVisitor {
    type Value = Located;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a TOML value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Located, E> {
        NodeVisitor.visit_bool(v).map(bare)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Located, E> {
        NodeVisitor.visit_i64(v).map(bare)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Located, E> {
        NodeVisitor.visit_u64(v).map(bare)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Located, E> {
        NodeVisitor.visit_f64(v).map(bare)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Located, E> {
        NodeVisitor.visit_str(v).map(bare)
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Located, E> {
        NodeVisitor.visit_string(v).map(bare)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Located, A::Error> {
        NodeVisitor.visit_seq(seq).map(bare)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Located, A::Error> {
        let Some(first) = map.next_key::<Located>()? else {
            return Ok(bare(Node::Table(Vec::new())));
        };
        let [start_field, end_field, value_field] = self.fields else {
            return table_or_datetime(first, map).map(bare);
        };
        if first.key_str() != *start_field {
            // No span on offer: an ordinary table (or a date) was handed over directly.
            return table_or_datetime(first, map).map(bare);
        }
        let mut start: usize = map.next_value()?;
        let mut end = start;
        let mut node = None;
        while let Some(key) = map.next_key::<Located>()? {
            let k = key.key_str();
            if k == *end_field {
                end = map.next_value()?;
            } else if k == *value_field {
                node = Some(map.next_value::<Node>()?);
            } else if k == *start_field {
                start = map.next_value()?;
            } else {
                map.next_value::<de::IgnoredAny>()?;
            }
        }
        let node = node.ok_or_else(|| de::Error::custom("spanned value without a value"))?;
        Ok(Located { span: Some(start..end), node })
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a TOML value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
        i64::try_from(v).map(Node::Int).map_err(|_| E::custom("integer out of range"))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
        Ok(Node::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Node, E> {
        Ok(Node::Str(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Node, E> {
        Ok(Node::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Located>()? {
            items.push(item);
        }
        Ok(Node::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        match map.next_key::<Located>()? {
            None => Ok(Node::Table(Vec::new())),
            Some(first) => table_or_datetime(first, map),
        }
    }
}

/// Finish reading a map whose first key has been taken already.
fn table_or_datetime<'de, A: MapAccess<'de>>(first: Located, mut map: A) -> Result<Node, A::Error> {
    if first.key_str() == DATETIME_FIELD {
        let text: String = map.next_value()?;
        while map.next_key::<de::IgnoredAny>()?.is_some() {
            map.next_value::<de::IgnoredAny>()?;
        }
        return Ok(Node::Datetime(text));
    }
    let mut entries = vec![(first, map.next_value::<Located>()?)];
    while let Some(key) = map.next_key::<Located>()? {
        let value = map.next_value::<Located>()?;
        entries.push((key, value));
    }
    Ok(Node::Table(entries))
}

/// Parse `text` into a located tree, or return the syntax error's message and span.
pub(crate) fn parse(text: &str) -> Result<Located, (String, Option<Range<usize>>)> {
    toml::from_str::<Located>(text).map_err(|e| {
        let message = e.message().lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
        (message, e.span())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(l: &Located) -> &[(Located, Located)] {
        match &l.node {
            Node::Table(t) => t,
            other => panic!("not a table: {other:?}"),
        }
    }

    #[test]
    fn probe_finds_the_spanned_protocol() {
        let (name, fields) = spanned_protocol().expect("toml::Spanned protocol");
        assert!(!name.is_empty());
        assert_eq!(fields.len(), 3);
    }

    #[test]
    fn keys_and_values_carry_spans() {
        let text = "a = 1\n[[points]]\nname = \"x\"\n";
        let root = parse(text).expect("parse");
        let top = table(&root);
        assert_eq!(top[0].0.key_str(), "a");
        assert_eq!(top[0].0.span, Some(0..1));
        assert_eq!(top[0].1.span, Some(4..5));
        let Node::Array(points) = &top[1].1.node else { panic!("points not an array") };
        // The table of an array-of-tables starts at its `[[points]]` header.
        assert_eq!(points[0].span.as_ref().map(|s| s.start), Some(6));
        let name = &table(&points[0])[0];
        assert_eq!(name.1.node, Node::Str("x".into()));
    }

    #[test]
    fn dotted_keys_and_dates_do_not_break_parsing() {
        let root = parse("[[points]]\nenum.0 = \"a\"\nwhen = 1979-05-27\n").expect("parse");
        let Node::Array(points) = &table(&root)[0].1.node else { panic!("points not an array") };
        let p = table(&points[0]);
        assert!(matches!(p[0].1.node, Node::Table(_)));
        assert_eq!(p[1].1.node, Node::Datetime("1979-05-27".into()));
    }

    #[test]
    fn syntax_errors_have_spans() {
        let (msg, span) = parse("a = 1\nb = \n").expect_err("bad toml");
        assert!(!msg.contains('\n'));
        assert!(span.is_some());
    }
}
