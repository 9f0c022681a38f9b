//! A serde deserializer over [`Node`] trees whose errors carry the field path and source position.

use std::fmt;

use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};

use super::{FieldPath, Mark, Node, NodeValue, ScalarStyle};

/// A value that does not fit the type it is read into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeError {
    /// What is wrong, phrased for a person.
    pub message: String,
    /// The offending value's position, once known.
    pub mark: Option<Mark>,
    /// The offending value's field path, once known.
    pub path: Option<FieldPath>,
}

impl DeError {
    fn located(mut self, mark: Mark, path: &FieldPath) -> Self {
        if self.mark.is_none() {
            self.mark = Some(mark);
            self.path = Some(path.clone());
        }
        self
    }

    fn new(message: String) -> Self {
        Self {
            message,
            mark: None,
            path: None,
        }
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeError {}

/// Rewrites serde's type names ("u32", "struct X", "a sequence") as a person would say them.
fn expected_phrase(expected: &dyn de::Expected) -> String {
    let text = expected.to_string();
    match text.as_str() {
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a whole number of at least 0".into(),
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "a whole number".into(),
        "f32" | "f64" => "a number".into(),
        "a sequence" => "a list".into(),
        "a map" => "a mapping".into(),
        "a borrowed string" => "a string".into(),
        "unit" => "nothing (null)".into(),
        _ if text.starts_with("struct ") || text.starts_with("map") => "a mapping".into(),
        _ if text.starts_with("enum ") => "one of the allowed values".into(),
        _ => text,
    }
}

fn unexpected_phrase(unexpected: de::Unexpected<'_>) -> String {
    use de::Unexpected as U;
    match unexpected {
        U::Bool(b) => format!("the boolean {b}"),
        U::Unsigned(n) => format!("the number {n}"),
        U::Signed(n) => format!("the number {n}"),
        U::Float(n) => format!("the number {n}"),
        U::Char(c) => format!("the character {c:?}"),
        U::Str(s) => format!("the string {s:?}"),
        U::Bytes(_) => "bytes".into(),
        U::Unit | U::Option => "nothing (null)".into(),
        U::Seq => "a list".into(),
        U::Map => "a mapping".into(),
        other => other.to_string(),
    }
}

/// The closest of `candidates` to `word`, if it is a plausible typo.
pub(crate) fn suggestion<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    fn distance(a: &str, b: &str) -> usize {
        let a: Vec<char> = a.to_lowercase().chars().collect();
        let b: Vec<char> = b.to_lowercase().chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.iter().enumerate() {
            let mut prev = row[0];
            row[0] = i + 1;
            for (j, cb) in b.iter().enumerate() {
                let cur = row[j + 1];
                row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
                prev = cur;
            }
        }
        row[b.len()]
    }
    candidates
        .iter()
        .map(|c| (distance(word, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn one_of(candidates: &[&str]) -> String {
    candidates
        .iter()
        .map(|c| format!("`{c}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self::new(msg.to_string())
    }

    fn invalid_type(unexpected: de::Unexpected<'_>, expected: &dyn de::Expected) -> Self {
        Self::new(format!(
            "expected {}, found {}",
            expected_phrase(expected),
            unexpected_phrase(unexpected)
        ))
    }

    fn invalid_value(unexpected: de::Unexpected<'_>, expected: &dyn de::Expected) -> Self {
        Self::new(format!(
            "expected {}, found {}",
            expected_phrase(expected),
            unexpected_phrase(unexpected)
        ))
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        let hint = suggestion(variant, expected)
            .map(|s| format!(" (did you mean `{s}`?)"))
            .unwrap_or_default();
        Self::new(format!(
            "unknown value `{variant}`{hint}; expected one of {}",
            one_of(expected)
        ))
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        let hint = match field {
            "status" => " (status is written by the controller; remove it from the file)".to_owned(),
            "secret" | "password" | "token" | "tokenSecret" | "privateKey" | "key" => format!(
                " (secrets are never written inline: put the value in a file readable by the controller \
                 and reference it with {})",
                one_of(
                    &expected
                        .iter()
                        .copied()
                        .filter(|e| e.ends_with("File"))
                        .collect::<Vec<_>>()
                )
            ),
            _ => suggestion(field, expected)
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default(),
        };
        Self::new(format!(
            "unknown field `{field}`{hint}; allowed fields: {}",
            one_of(expected)
        ))
    }

    fn missing_field(field: &'static str) -> Self {
        Self::new(format!("missing required field `{field}`"))
    }

    fn duplicate_field(field: &'static str) -> Self {
        Self::new(format!("field `{field}` is given twice"))
    }
}

/// Reads `node` (found at `path`) into a `T`.
pub fn from_node<'de, T: de::Deserialize<'de>>(node: &'de Node, path: &FieldPath) -> Result<T, DeError> {
    T::deserialize(NodeDeserializer {
        node,
        path: path.clone(),
    })
}

struct NodeDeserializer<'de> {
    node: &'de Node,
    path: FieldPath,
}

/// A plain scalar typed by the YAML 1.2 core schema.
enum Typed<'a> {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(&'a str),
}

fn type_plain(text: &str) -> Typed<'_> {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Typed::Null,
        "true" | "True" | "TRUE" => return Typed::Bool(true),
        "false" | "False" | "FALSE" => return Typed::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => return Typed::Float(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => return Typed::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Typed::Float(f64::NAN),
        _ => {}
    }
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    if !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && let Ok(n) = text.parse::<i128>()
    {
        return Typed::Int(n);
    }
    if let Some(hex) = text.strip_prefix("0x")
        && let Ok(n) = i128::from_str_radix(hex, 16)
    {
        return Typed::Int(n);
    }
    if let Some(oct) = text.strip_prefix("0o")
        && let Ok(n) = i128::from_str_radix(oct, 8)
    {
        return Typed::Int(n);
    }
    let looks_numeric = digits.starts_with(|c: char| c.is_ascii_digit() || c == '.')
        && digits
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '-' | '+'));
    if looks_numeric && let Ok(f) = text.parse::<f64>() {
        return Typed::Float(f);
    }
    Typed::Str(text)
}

impl<'de> NodeDeserializer<'de> {
    fn typed(&self) -> Option<Typed<'de>> {
        match &self.node.value {
            NodeValue::Scalar {
                text,
                style: ScalarStyle::Plain,
            } => Some(type_plain(text)),
            NodeValue::Scalar {
                text,
                style: ScalarStyle::Quoted,
            } => Some(Typed::Str(text)),
            _ => None,
        }
    }

    fn unexpected(&self) -> de::Unexpected<'de> {
        match self.typed() {
            Some(Typed::Null) => de::Unexpected::Unit,
            Some(Typed::Bool(b)) => de::Unexpected::Bool(b),
            Some(Typed::Int(n)) => match i64::try_from(n) {
                Ok(n) => de::Unexpected::Signed(n),
                Err(_) => de::Unexpected::Other("a very large number"),
            },
            Some(Typed::Float(f)) => de::Unexpected::Float(f),
            Some(Typed::Str(s)) => de::Unexpected::Str(s),
            None => match self.node.value {
                NodeValue::Sequence(_) => de::Unexpected::Seq,
                _ => de::Unexpected::Map,
            },
        }
    }

    fn locate<T>(&self, result: Result<T, DeError>) -> Result<T, DeError> {
        result.map_err(|e| e.located(self.node.mark, &self.path))
    }

    fn int<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let result = match self.typed() {
            Some(Typed::Int(n)) => match (i64::try_from(n), u64::try_from(n)) {
                (Ok(n), _) => visitor.visit_i64(n),
                (_, Ok(n)) => visitor.visit_u64(n),
                _ => Err(de::Error::custom(format!("the number {n} is too large"))),
            },
            _ => Err(de::Error::invalid_type(self.unexpected(), &visitor)),
        };
        self.locate(result)
    }
}

macro_rules! forward_int {
    ($($method:ident)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            self.int(visitor)
        }
    )*};
}

impl<'de> de::Deserializer<'de> for NodeDeserializer<'de> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let result = match (&self.node.value, self.typed()) {
            (NodeValue::Sequence(items), _) => visitor.visit_seq(SeqAccess::new(items, &self.path)),
            (NodeValue::Mapping(entries), _) => visitor.visit_map(MapAccess::new(entries, &self.path)),
            (_, Some(Typed::Null)) => visitor.visit_unit(),
            (_, Some(Typed::Bool(b))) => visitor.visit_bool(b),
            (_, Some(Typed::Int(n))) => match i64::try_from(n) {
                Ok(n) => visitor.visit_i64(n),
                Err(_) => visitor.visit_i128(n),
            },
            (_, Some(Typed::Float(f))) => visitor.visit_f64(f),
            (_, Some(Typed::Str(s))) => visitor.visit_borrowed_str(s),
            (_, None) => unreachable_scalar(),
        };
        self.locate(result)
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let result = match self.typed() {
            Some(Typed::Bool(b)) => visitor.visit_bool(b),
            _ => Err(de::Error::invalid_type(self.unexpected(), &visitor)),
        };
        self.locate(result)
    }

    forward_int! {
        deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64 deserialize_i128
        deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64 deserialize_u128
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_f64(visitor)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let result = match self.typed() {
            #[allow(clippy::cast_precision_loss)] // reason: YAML numbers are read as f64 like JSON's
            Some(Typed::Int(n)) => visitor.visit_f64(n as f64),
            Some(Typed::Float(f)) => visitor.visit_f64(f),
            _ => Err(de::Error::invalid_type(self.unexpected(), &visitor)),
        };
        self.locate(result)
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        // A string field takes any scalar as written (`port: 8006` read into a string is "8006"),
        // except null, which means the value is missing.
        let result = match (&self.node.value, self.typed()) {
            (_, Some(Typed::Null)) | (_, None) => Err(de::Error::invalid_type(self.unexpected(), &visitor)),
            (NodeValue::Scalar { text, .. }, _) => visitor.visit_borrowed_str(text),
            _ => unreachable_scalar(),
        };
        self.locate(result)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        if self.node.is_null() {
            self.locate(visitor.visit_none())
        } else {
            visitor.visit_some(self)
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let result = match self.typed() {
            Some(Typed::Null) => visitor.visit_unit(),
            _ => Err(de::Error::invalid_type(self.unexpected(), &visitor)),
        };
        self.locate(result)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(self, _: &'static str, v: V) -> Result<V::Value, DeError> {
        self.deserialize_unit(v)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _: &'static str, v: V) -> Result<V::Value, DeError> {
        v.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let result = match &self.node.value {
            NodeValue::Sequence(items) => visitor.visit_seq(SeqAccess::new(items, &self.path)),
            _ => Err(de::Error::invalid_type(self.unexpected(), &visitor)),
        };
        self.locate(result)
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _: usize, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let result = match &self.node.value {
            NodeValue::Mapping(entries) => visitor.visit_map(MapAccess::new(entries, &self.path)),
            _ => Err(de::Error::invalid_type(self.unexpected(), &visitor)),
        };
        self.locate(result)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let result = match &self.node.value {
            NodeValue::Scalar { text, .. } => visitor.visit_enum(text.as_str().into_deserializer()),
            NodeValue::Mapping(entries) if entries.len() == 1 => visitor.visit_enum(EnumAccess {
                key: &entries[0].0,
                value: &entries[0].1,
                path: &self.path,
            }),
            _ => Err(de::Error::invalid_type(
                self.unexpected(),
                &"a single value or a one-key mapping",
            )),
        };
        self.locate(result)
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }
}

/// Scalars always type; this marks the one arm that cannot be reached.
fn unreachable_scalar<T>() -> Result<T, DeError> {
    Err(DeError::new("internal error: a scalar without a type".into()))
}

struct SeqAccess<'de> {
    items: std::slice::Iter<'de, Node>,
    index: usize,
    path: FieldPath,
}

impl<'de> SeqAccess<'de> {
    fn new(items: &'de [Node], path: &FieldPath) -> Self {
        Self {
            items: items.iter(),
            index: 0,
            path: path.clone(),
        }
    }
}

impl<'de> de::SeqAccess<'de> for SeqAccess<'de> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, DeError> {
        let Some(node) = self.items.next() else {
            return Ok(None);
        };
        let path = self.path.index(self.index);
        self.index += 1;
        seed.deserialize(NodeDeserializer { node, path }).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct MapAccess<'de> {
    entries: std::slice::Iter<'de, (Node, Node)>,
    value: Option<(&'de Node, FieldPath)>,
    path: FieldPath,
}

impl<'de> MapAccess<'de> {
    fn new(entries: &'de [(Node, Node)], path: &FieldPath) -> Self {
        Self {
            entries: entries.iter(),
            value: None,
            path: path.clone(),
        }
    }
}

impl<'de> de::MapAccess<'de> for MapAccess<'de> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, DeError> {
        let Some((key, value)) = self.entries.next() else {
            return Ok(None);
        };
        let path = self.path.key(key.as_str().unwrap_or_default());
        self.value = Some((value, path.clone()));
        seed.deserialize(NodeDeserializer { node: key, path }).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        match self.value.take() {
            Some((node, path)) => seed.deserialize(NodeDeserializer { node, path }),
            None => Err(DeError::new("internal error: a value without a key".into())),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

struct EnumAccess<'de, 'p> {
    key: &'de Node,
    value: &'de Node,
    path: &'p FieldPath,
}

impl<'de> de::EnumAccess<'de> for EnumAccess<'de, '_> {
    type Error = DeError;
    type Variant = NodeDeserializer<'de>;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self::Variant), DeError> {
        let path = self.path.key(self.key.as_str().unwrap_or_default());
        let variant = seed.deserialize(NodeDeserializer {
            node: self.key,
            path: path.clone(),
        })?;
        Ok((
            variant,
            NodeDeserializer {
                node: self.value,
                path,
            },
        ))
    }
}

impl<'de> de::VariantAccess<'de> for NodeDeserializer<'de> {
    type Error = DeError;

    fn unit_variant(self) -> Result<(), DeError> {
        de::Deserialize::deserialize(self)
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, DeError> {
        seed.deserialize(self)
    }

    fn tuple_variant<V: Visitor<'de>>(self, _: usize, visitor: V) -> Result<V::Value, DeError> {
        de::Deserializer::deserialize_seq(self, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(self, _: &'static [&'static str], v: V) -> Result<V::Value, DeError> {
        de::Deserializer::deserialize_map(self, v)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;
    use crate::yaml::{Limits, parse_documents};

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    struct App {
        enabled: bool,
        #[serde(default)]
        cores: Option<u32>,
        #[serde(default)]
        tags: Vec<String>,
        #[serde(default)]
        policy: Option<Policy>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    enum Policy {
        Retain,
        Delete,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        applications: BTreeMap<String, App>,
    }

    fn read(text: &str) -> Result<Doc, DeError> {
        let docs = parse_documents(text, &Limits::default()).unwrap();
        let node = Box::leak(Box::new(docs.into_iter().next().unwrap().1));
        from_node(node, &FieldPath::root())
    }

    #[test]
    fn a_yes_for_a_boolean_names_path_line_and_what_was_found() {
        let err = read("applications:\n  mastodon:\n    enabled: yes\n").unwrap_err();
        assert_eq!(err.path.unwrap().to_string(), "applications.mastodon.enabled");
        assert_eq!(err.mark.unwrap(), Mark { line: 3, column: 14 });
        assert_eq!(err.message, "expected a boolean, found the string \"yes\"");
    }

    #[test]
    fn an_unknown_field_suggests_the_closest_name() {
        let err = read("applications:\n  mastodon:\n    enabled: true\n    coers: 2\n").unwrap_err();
        assert_eq!(err.path.unwrap().to_string(), "applications.mastodon.coers");
        assert_eq!(err.mark.unwrap().line, 4);
        assert!(
            err.message
                .starts_with("unknown field `coers` (did you mean `cores`?)"),
            "{}",
            err.message
        );
    }

    #[test]
    fn a_negative_count_is_rejected_with_its_value() {
        let err = read("applications:\n  m:\n    enabled: true\n    cores: -2\n").unwrap_err();
        assert_eq!(
            err.message,
            "expected a whole number of at least 0, found the number -2"
        );
        assert_eq!(err.path.unwrap().to_string(), "applications.m.cores");
    }

    #[test]
    fn a_missing_field_points_at_its_mapping() {
        let err = read("applications:\n  m:\n    cores: 2\n").unwrap_err();
        assert_eq!(err.message, "missing required field `enabled`");
        assert_eq!(err.path.unwrap().to_string(), "applications.m");
        assert_eq!(err.mark.unwrap().line, 3);
    }

    #[test]
    fn list_items_are_indexed_in_the_path() {
        let err = read("applications:\n  m:\n    enabled: true\n    tags: [a, [b]]\n").unwrap_err();
        assert_eq!(err.path.unwrap().to_string(), "applications.m.tags[1]");
        assert_eq!(err.message, "expected a string, found a list");
    }

    #[test]
    fn an_unknown_enum_value_lists_the_choices() {
        let err = read("applications:\n  m:\n    enabled: true\n    policy: Retian\n").unwrap_err();
        assert!(
            err.message
                .starts_with("unknown value `Retian` (did you mean `Retain`?)"),
            "{}",
            err.message
        );
    }

    #[test]
    fn valid_values_read_through() {
        let doc =
            read("applications:\n  m: {enabled: TRUE, cores: 0x10, tags: [1, x], policy: Delete}\n").unwrap();
        let app = &doc.applications["m"];
        assert_eq!(app.cores, Some(16));
        assert_eq!(app.tags, vec!["1".to_owned(), "x".to_owned()]);
        assert_eq!(app.policy, Some(Policy::Delete));
    }

    #[test]
    fn json_values_keep_their_core_schema_types() {
        let docs = parse_documents("a: [1, 1.5, true, null, '2', x]\n", &Limits::default()).unwrap();
        let value: serde_json::Value = from_node(&docs[0].1, &FieldPath::root()).unwrap();
        assert_eq!(value, serde_json::json!({"a": [1, 1.5, true, null, "2", "x"]}));
    }
}
