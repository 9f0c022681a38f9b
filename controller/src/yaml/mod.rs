//! A small YAML front end with source positions: a bounded tree builder and a serde deserializer over it.
//!
//! Objects are parsed into a [`Node`] tree that remembers where every value stands, so that every problem
//! found later (a wrong type, an unknown field, an invalid name) can name the file, line, column and field
//! path. Parsing runs under [`Limits`] so that hostile input (huge files, alias bombs, deep nesting, a
//! flood of documents) is refused quickly and with a clear message instead of exhausting memory.

mod de;
mod node;
mod path;

pub(crate) use de::suggestion;
pub use de::{DeError, from_node};
pub use node::{Limits, Mark, Node, NodeValue, ParseError, ScalarStyle, parse_documents};
pub use path::{FieldPath, Segment};
