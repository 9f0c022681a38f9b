//! The positioned YAML tree and its bounded builder.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, Span};

/// A position in a source text: line and column, both counted from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mark {
    /// Line, from 1.
    pub line: usize,
    /// Column in characters, from 1.
    pub column: usize,
}

impl Mark {
    fn from_span(span: &Span) -> Self {
        Self {
            line: span.start.line(),
            column: span.start.col() + 1,
        }
    }
}

/// How a scalar was written, which decides how it is typed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScalarStyle {
    /// Unquoted: typed by the YAML 1.2 core schema (`true`, `42`, `null` are not strings).
    Plain,
    /// Quoted, a block scalar or tagged `!!str`: always a string.
    Quoted,
}

/// A YAML value.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeValue {
    /// A scalar with its text as written.
    Scalar {
        /// The scalar's text.
        text: String,
        /// How it was written.
        style: ScalarStyle,
    },
    /// A list.
    Sequence(Vec<Node>),
    /// A mapping with string keys, in source order.
    Mapping(Vec<(Node, Node)>),
}

/// A YAML value and where it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// The value.
    pub value: NodeValue,
    /// Where the value starts.
    pub mark: Mark,
}

impl Node {
    /// Whether this node is a YAML null (`null`, `~` or nothing at all).
    pub fn is_null(&self) -> bool {
        matches!(&self.value, NodeValue::Scalar { text, style: ScalarStyle::Plain }
            if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    /// The text of a scalar node.
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            NodeValue::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// The value under `key` of a mapping node.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.entry(key).map(|(_, v)| v)
    }

    /// The key node and value node under `key` of a mapping node.
    pub fn entry(&self, key: &str) -> Option<(&Node, &Node)> {
        match &self.value {
            NodeValue::Mapping(entries) => entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(k, v)| (k, v)),
            _ => None,
        }
    }

    /// The node at `path`, or the deepest node on the way that exists (the best place to point at).
    pub fn locate(&self, path: &super::FieldPath) -> &Node {
        let mut node = self;
        for segment in path.segments() {
            let next = match (segment, &node.value) {
                (super::Segment::Key(key), NodeValue::Mapping(_)) => node.get(key),
                (super::Segment::Index(i), NodeValue::Sequence(items)) => items.get(*i),
                _ => None,
            };
            match next {
                Some(next) => node = next,
                None => break,
            }
        }
        node
    }

    fn count(&self) -> usize {
        match &self.value {
            NodeValue::Scalar { .. } => 1,
            NodeValue::Sequence(items) => 1 + items.iter().map(Node::count).sum::<usize>(),
            NodeValue::Mapping(entries) => {
                1 + entries.iter().map(|(k, v)| k.count() + v.count()).sum::<usize>()
            }
        }
    }
}

/// Bounds on what one file may hold, so that hostile input fails fast and in little memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest file, in bytes.
    pub max_bytes: usize,
    /// Deepest nesting of lists and mappings.
    pub max_depth: usize,
    /// Most values in one document, counting every alias expansion.
    pub max_nodes_per_document: usize,
    /// Most documents in one file.
    pub max_documents: usize,
}

impl Default for Limits {
    /// Generous for any real object file and small enough to stop hostile ones: a Deployment is a few
    /// hundred values and a few kilobytes; 10,000 such documents fit in 8 MiB.
    fn default() -> Self {
        Self {
            max_bytes: 8 * 1024 * 1024,
            max_depth: 64,
            max_nodes_per_document: 100_000,
            max_documents: 10_000,
        }
    }
}

/// A file that could not be read as YAML at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParseError {
    /// Where the problem was found.
    pub mark: Mark,
    /// The document (from 0) in which it was found.
    pub document: usize,
    /// What is wrong and what to do.
    pub message: String,
}

/// Parses every document of `text` into positioned trees, skipping empty documents.
///
/// Returns the documents with their index in the file (counted from 0, empty ones included).
pub fn parse_documents(text: &str, limits: &Limits) -> Result<Vec<(usize, Node)>, ParseError> {
    if text.len() > limits.max_bytes {
        return Err(ParseError {
            mark: Mark { line: 1, column: 1 },
            document: 0,
            message: format!(
                "file is {} bytes, more than the limit of {} bytes; split it into smaller files",
                text.len(),
                limits.max_bytes
            ),
        });
    }
    let mut builder = Builder {
        parser: Parser::new_from_str(text),
        limits,
        anchors: HashMap::new(),
        nodes: 0,
        document: 0,
        last_mark: Mark { line: 1, column: 1 },
    };
    builder.stream()
}

struct Builder<'a, 'l> {
    parser: Parser<'a, saphyr_parser::StrInput<'a>>,
    limits: &'l Limits,
    anchors: HashMap<usize, Node>,
    nodes: usize,
    document: usize,
    last_mark: Mark,
}

impl<'a> Builder<'a, '_> {
    fn error(&self, mark: Mark, message: impl Into<String>) -> ParseError {
        ParseError {
            mark,
            document: self.document,
            message: message.into(),
        }
    }

    fn next(&mut self) -> Result<(Event<'a>, Mark), ParseError> {
        match self.parser.next_event() {
            Some(Ok((event, span))) => {
                let mark = Mark::from_span(&span);
                self.last_mark = mark;
                Ok((event, mark))
            }
            Some(Err(e)) => {
                let m = e.marker();
                let mark = Mark {
                    line: m.line(),
                    column: m.col() + 1,
                };
                if e.info().contains("recursion limit") {
                    return Err(self.error(
                        mark,
                        "nesting too deep for the YAML parser; no object is that deep",
                    ));
                }
                Err(self.error(mark, format!("invalid YAML: {}", e.info())))
            }
            None => Err(self.error(self.last_mark, "invalid YAML: unexpected end of input")),
        }
    }

    fn stream(&mut self) -> Result<Vec<(usize, Node)>, ParseError> {
        let mut documents = Vec::new();
        let mut seen = 0usize;
        loop {
            let (event, mark) = self.next()?;
            match event {
                Event::StreamStart | Event::Nothing => {}
                Event::StreamEnd => return Ok(documents),
                Event::DocumentStart(_) => {
                    if seen == self.limits.max_documents {
                        return Err(self.error(
                            mark,
                            format!(
                                "more than {} documents in one file; split it into several files",
                                self.limits.max_documents
                            ),
                        ));
                    }
                    self.document = seen;
                    self.anchors.clear();
                    self.nodes = 0;
                    let (event, mark) = self.next()?;
                    let root = self.value(event, mark, 0)?;
                    match self.next()? {
                        (Event::DocumentEnd, _) => {}
                        (_, mark) => {
                            return Err(self.error(mark, "invalid YAML: expected the end of a document"));
                        }
                    }
                    if !root.is_null() {
                        documents.push((seen, root));
                    }
                    seen += 1;
                }
                _ => return Err(self.error(mark, "invalid YAML: expected a document")),
            }
        }
    }

    fn count(&mut self, added: usize, mark: Mark) -> Result<(), ParseError> {
        self.nodes += added;
        if self.nodes > self.limits.max_nodes_per_document {
            return Err(self.error(
                mark,
                format!(
                    "document has more than {} values (counting alias expansions); \
                     this looks like an alias bomb or a generated file gone wrong",
                    self.limits.max_nodes_per_document
                ),
            ));
        }
        Ok(())
    }

    fn value(&mut self, event: Event<'a>, mark: Mark, depth: usize) -> Result<Node, ParseError> {
        if depth > self.limits.max_depth {
            return Err(self.error(
                mark,
                format!(
                    "nesting too deep: more than {} levels; no object is that deep",
                    self.limits.max_depth
                ),
            ));
        }
        let (node, anchor) = match event {
            Event::Scalar(text, style, anchor, tag) => {
                self.count(1, mark)?;
                let style = match (&tag, style) {
                    (Some(tag), _) if tag.is_yaml_core_schema() && tag.suffix == "str" => ScalarStyle::Quoted,
                    (Some(tag), _) => {
                        return Err(self.error(
                            mark,
                            format!(
                                "YAML tag `{}{}` is not supported; remove it",
                                tag.handle, tag.suffix
                            ),
                        ));
                    }
                    (None, saphyr_parser::ScalarStyle::Plain) => ScalarStyle::Plain,
                    (None, _) => ScalarStyle::Quoted,
                };
                if let Some(c) = text.chars().find(|&c| crate::text::is_hostile(c) || c == '\r') {
                    return Err(self.error(
                        mark,
                        format!(
                            "this value holds the control character U+{:04X}; no field takes one, remove it",
                            u32::from(c)
                        ),
                    ));
                }
                if style == ScalarStyle::Plain
                    && let Some(hint) = leading_zero(&text)
                {
                    return Err(self.error(mark, hint));
                }
                (
                    Node {
                        value: NodeValue::Scalar {
                            text: text.into_owned(),
                            style,
                        },
                        mark,
                    },
                    anchor,
                )
            }
            Event::SequenceStart(anchor, tag) => {
                self.reject_tag(tag.as_deref(), mark)?;
                self.count(1, mark)?;
                let mut items = Vec::new();
                loop {
                    let (event, item_mark) = self.next()?;
                    if matches!(event, Event::SequenceEnd) {
                        break;
                    }
                    items.push(self.value(event, item_mark, depth + 1)?);
                }
                (
                    Node {
                        value: NodeValue::Sequence(items),
                        mark,
                    },
                    anchor,
                )
            }
            Event::MappingStart(anchor, tag) => {
                self.reject_tag(tag.as_deref(), mark)?;
                self.count(1, mark)?;
                let mut entries: Vec<(Node, Node)> = Vec::new();
                loop {
                    let (event, key_mark) = self.next()?;
                    if matches!(event, Event::MappingEnd) {
                        break;
                    }
                    let key = self.value(event, key_mark, depth + 1)?;
                    let Some(key_text) = key.as_str() else {
                        return Err(self.error(key_mark, "mapping keys must be plain strings"));
                    };
                    if let Some((first, _)) = entries.iter().find(|(k, _)| k.as_str() == Some(key_text)) {
                        return Err(self.error(
                            key_mark,
                            format!(
                                "duplicate key `{key_text}` (first defined at line {}); keep only one",
                                first.mark.line
                            ),
                        ));
                    }
                    let (event, value_mark) = self.next()?;
                    let value = self.value(event, value_mark, depth + 1)?;
                    entries.push((key, value));
                }
                (
                    Node {
                        value: NodeValue::Mapping(entries),
                        mark,
                    },
                    anchor,
                )
            }
            Event::Alias(id) => {
                let Some(target) = self.anchors.get(&id) else {
                    return Err(self.error(mark, "alias to an unknown anchor"));
                };
                let mut copy = target.clone();
                let added = copy.count();
                copy.mark = mark;
                self.count(added, mark)?;
                return Ok(copy);
            }
            _ => return Err(self.error(mark, "invalid YAML: unexpected token")),
        };
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        Ok(node)
    }

    fn reject_tag(&self, tag: Option<&saphyr_parser::Tag>, mark: Mark) -> Result<(), ParseError> {
        match tag {
            Some(tag) if !(tag.is_yaml_core_schema() && matches!(tag.suffix.as_str(), "map" | "seq")) => {
                Err(self.error(
                    mark,
                    format!(
                        "YAML tag `{}{}` is not supported; remove it",
                        tag.handle, tag.suffix
                    ),
                ))
            }
            _ => Ok(()),
        }
    }
}

/// Why a plain scalar such as `010` is refused: YAML 1.2 (this controller) reads it as 10, YAML 1.1
/// tools (kubectl, many linters) as the octal 8. `0`, quoted text and `0o10` are not concerned.
fn leading_zero(text: &str) -> Option<String> {
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    if digits.len() < 2 || !digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let decimal = digits.trim_start_matches('0');
    let decimal = if decimal.is_empty() { "0" } else { decimal };
    let yaml11 = match i128::from_str_radix(digits, 8) {
        Ok(octal) => format!("as the octal number {octal}"),
        Err(_) => "as something else".to_owned(),
    };
    Some(format!(
        "`{text}` has a leading zero: this controller would read it as {decimal}, YAML 1.1 tools such as \
         kubectl {yaml11}; write `{decimal}`, or quote it (`\"{text}\"`) if it is text"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<(usize, Node)>, ParseError> {
        parse_documents(text, &Limits::default())
    }

    #[test]
    fn nodes_remember_line_and_column() {
        let docs = parse("a:\n  b: [1, 2]\n  c: 'x'\n").unwrap();
        let root = &docs[0].1;
        let b = root.get("a").unwrap().get("b").unwrap();
        assert_eq!(b.mark, Mark { line: 2, column: 6 });
        let c = root.get("a").unwrap().get("c").unwrap();
        assert_eq!(
            c.value,
            NodeValue::Scalar {
                text: "x".into(),
                style: ScalarStyle::Quoted
            }
        );
    }

    #[test]
    fn empty_documents_are_skipped_but_counted() {
        let docs = parse("---\n---\na: 1\n---\n# only a comment\n---\nb: 2\n").unwrap();
        let indexes: Vec<usize> = docs.iter().map(|(i, _)| *i).collect();
        assert_eq!(indexes, vec![1, 3]);
    }

    #[test]
    fn duplicate_keys_are_an_error_naming_both_lines() {
        let err = parse("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!(err.mark.line, 3);
        assert!(
            err.message
                .contains("duplicate key `a` (first defined at line 1)"),
            "{}",
            err.message
        );
    }

    #[test]
    fn alias_bombs_are_refused() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let prev = i - 1;
            text.push_str(&format!(
                "a{i}: &a{i} [*a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}]\n"
            ));
        }
        let err = parse(&text).unwrap_err();
        assert!(err.message.contains("alias bomb"), "{}", err.message);
    }

    #[test]
    fn deep_nesting_is_refused() {
        let text = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let err = parse(&text).unwrap_err();
        assert!(err.message.contains("nesting too deep"), "{}", err.message);
    }

    #[test]
    fn syntax_errors_carry_the_document_index() {
        let err = parse("a: 1\n---\nb: [1, 2\n").unwrap_err();
        assert_eq!(err.document, 1);
        assert!(err.message.starts_with("invalid YAML"), "{}", err.message);
    }

    #[test]
    fn custom_tags_are_refused() {
        let err = parse("a: !secret x\n").unwrap_err();
        assert!(
            err.message.contains("tag `!secret` is not supported"),
            "{}",
            err.message
        );
    }

    #[test]
    fn str_tag_makes_a_string() {
        let docs = parse("a: !!str 42\n").unwrap();
        let a = docs[0].1.get("a").unwrap();
        assert_eq!(
            a.value,
            NodeValue::Scalar {
                text: "42".into(),
                style: ScalarStyle::Quoted
            }
        );
    }
}
