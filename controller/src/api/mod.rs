//! The desired-state object kinds (`fediversity.eu/v1alpha1`), their validation and JSON Schemas.

mod application;
mod backup;
pub mod crd;
mod deployment;
mod environment_services;
mod meta;
mod runtime_environment;
mod time;
pub mod validate;

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use application::*;
pub use backup::*;
pub use deployment::*;
pub use meta::*;
pub use runtime_environment::*;
pub use time::{Timestamp, parse_duration};
use validate::{Problems, Validate};

use crate::yaml::{self, FieldPath, Mark, Node, NodeValue};

/// The API group and version of every kind.
pub const API_VERSION: &str = "fediversity.eu/v1alpha1";

/// The three kinds of desired-state object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// Where deployments run.
    RuntimeEnvironment,
    /// A catalog entry.
    Application,
    /// One operator's desired state.
    Deployment,
}

impl Kind {
    /// Every kind, in the order they are best applied (what others refer to first).
    pub const ALL: [Kind; 3] = [Kind::RuntimeEnvironment, Kind::Application, Kind::Deployment];

    /// The kind's name as written in `kind:`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::RuntimeEnvironment => "RuntimeEnvironment",
            Kind::Application => "Application",
            Kind::Deployment => "Deployment",
        }
    }

    /// The lowercase plural used in URLs and the CLI (`deployments`).
    pub fn plural(self) -> &'static str {
        match self {
            Kind::RuntimeEnvironment => "runtimeenvironments",
            Kind::Application => "applications",
            Kind::Deployment => "deployments",
        }
    }

    /// The short name accepted by the CLI (`deploy`).
    pub fn short_name(self) -> &'static str {
        match self {
            Kind::RuntimeEnvironment => "renv",
            Kind::Application => "app",
            Kind::Deployment => "deploy",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = String;

    /// Accepts the kind's name, its plural and its short name, in any case.
    fn from_str(s: &str) -> Result<Self, String> {
        let lower = s.to_ascii_lowercase();
        Kind::ALL
            .into_iter()
            .find(|k| {
                lower == k.as_str().to_ascii_lowercase() || lower == k.plural() || lower == k.short_name()
            })
            .ok_or_else(|| {
                format!("unknown kind `{s}`; expected one of RuntimeEnvironment, Application, Deployment")
            })
    }
}

/// An object of kind `K` with spec `S`, as written in a file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Resource<S> {
    /// Always [`API_VERSION`].
    pub api_version: String,
    /// The kind's name.
    pub kind: String,
    /// Name, labels and annotations.
    pub metadata: ObjectMeta,
    /// The desired state.
    pub spec: S,
}

/// A RuntimeEnvironment object.
pub type RuntimeEnvironment = Resource<RuntimeEnvironmentSpec>;
/// An Application object.
pub type Application = Resource<ApplicationSpec>;
/// A Deployment object.
pub type Deployment = Resource<DeploymentSpec>;

/// Identifies an object: its kind and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// The kind.
    pub kind: Kind,
    /// The name.
    pub name: Name,
}

impl ObjectKey {
    /// The key of `kind`/`name`.
    pub fn new(kind: Kind, name: &str) -> Self {
        Self {
            kind,
            name: Name::new(name),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

impl FromStr for ObjectKey {
    type Err = String;

    /// Parses `Kind/name`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, name) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not of the form KIND/NAME"))?;
        Ok(Self::new(kind.parse()?, name))
    }
}

/// Any desired-state object.
#[derive(Debug, Clone, PartialEq)]
// reason: objects live behind an Arc in snapshots, so boxing would only add an allocation per object.
#[allow(clippy::large_enum_variant)]
pub enum Object {
    /// A RuntimeEnvironment.
    RuntimeEnvironment(RuntimeEnvironment),
    /// An Application.
    Application(Application),
    /// A Deployment.
    Deployment(Deployment),
}

impl Object {
    /// The object's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Object::RuntimeEnvironment(_) => Kind::RuntimeEnvironment,
            Object::Application(_) => Kind::Application,
            Object::Deployment(_) => Kind::Deployment,
        }
    }

    /// The object's metadata.
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::RuntimeEnvironment(o) => &o.metadata,
            Object::Application(o) => &o.metadata,
            Object::Deployment(o) => &o.metadata,
        }
    }

    /// The object's kind and name.
    pub fn key(&self) -> ObjectKey {
        ObjectKey {
            kind: self.kind(),
            name: self.metadata().name.clone(),
        }
    }

    /// The spec as JSON, in a canonical form (object keys sorted) fit for hashing.
    pub fn spec_json(&self) -> serde_json::Value {
        let value = match self {
            Object::RuntimeEnvironment(o) => serde_json::to_value(&o.spec),
            Object::Application(o) => serde_json::to_value(&o.spec),
            Object::Deployment(o) => serde_json::to_value(&o.spec),
        };
        // Serializing plain data into a JSON value cannot fail: every map key is a string.
        value.unwrap_or(serde_json::Value::Null)
    }

    /// How many bytes the object takes as JSON (what the API serves), counted without building it.
    pub fn json_size(&self) -> usize {
        /// Counts what is written.
        struct Count(usize);
        impl std::io::Write for Count {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0 += buf.len();
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut count = Count(0);
        let _ = match self {
            Object::RuntimeEnvironment(o) => serde_json::to_writer(&mut count, o),
            Object::Application(o) => serde_json::to_writer(&mut count, o),
            Object::Deployment(o) => serde_json::to_writer(&mut count, o),
        };
        count.0
    }

    /// The whole object as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let value = match self {
            Object::RuntimeEnvironment(o) => serde_json::to_value(o),
            Object::Application(o) => serde_json::to_value(o),
            Object::Deployment(o) => serde_json::to_value(o),
        };
        value.unwrap_or(serde_json::Value::Null)
    }
}

/// One problem with one document: where, which field, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldProblem {
    /// Where the offending value starts.
    pub mark: Mark,
    /// The offending field.
    pub path: FieldPath,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for FieldProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

fn problem(node: &Node, path: FieldPath, message: impl Into<String>) -> FieldProblem {
    FieldProblem {
        mark: node.mark,
        path,
        message: message.into(),
    }
}

fn read<S>(root: &Node) -> Result<Resource<S>, Vec<FieldProblem>>
where
    S: for<'de> Deserialize<'de> + Validate,
{
    let resource: Resource<S> = yaml::from_node(root, &FieldPath::root()).map_err(|e| {
        vec![FieldProblem {
            mark: e.mark.unwrap_or(root.mark),
            path: e.path.unwrap_or_default(),
            message: e.message,
        }]
    })?;
    let mut problems = Problems::default();
    resource
        .metadata
        .validate(&FieldPath::root().key("metadata"), &mut problems);
    resource
        .spec
        .validate(&FieldPath::root().key("spec"), &mut problems);
    if problems.is_empty() {
        return Ok(resource);
    }
    Err(problems
        .into_vec()
        .into_iter()
        .map(|(path, message)| FieldProblem {
            mark: root.locate(&path).mark,
            path,
            message,
        })
        .collect())
}

/// What a document claims to be, read before the whole object is, so that a broken object can still be
/// recognised (and its last good version kept).
pub fn identify(root: &Node) -> Option<ObjectKey> {
    let kind = root.get("kind")?.as_str()?.parse().ok()?;
    let name = root.get("metadata")?.get("name")?.as_str()?;
    Some(ObjectKey::new(kind, name))
}

/// Reads and validates one document into an object, or says everything that is wrong with it.
pub fn parse_object(root: &Node) -> Result<Object, Vec<FieldProblem>> {
    let root_path = FieldPath::root();
    if !matches!(root.value, NodeValue::Mapping(_)) {
        return Err(vec![problem(
            root,
            root_path,
            "expected a mapping with `apiVersion`, `kind`, `metadata` and `spec`",
        )]);
    }
    let mut header = Vec::new();
    match root.entry("apiVersion") {
        None => header.push(problem(
            root,
            root_path.clone(),
            format!("missing required field `apiVersion` (use `{API_VERSION}`)"),
        )),
        Some((_, v)) if v.as_str() == Some(API_VERSION) => {}
        Some((_, v)) => header.push(problem(
            v,
            root_path.key("apiVersion"),
            format!(
                "unknown apiVersion `{}`; this controller serves `{API_VERSION}`",
                v.as_str().unwrap_or("(not a string)")
            ),
        )),
    }
    let kind = match root.entry("kind") {
        None => {
            header.push(problem(
                root,
                root_path.clone(),
                "missing required field `kind` (RuntimeEnvironment, Application or Deployment)",
            ));
            None
        }
        Some((_, v)) => match v
            .as_str()
            .filter(|k| Kind::ALL.iter().any(|kind| kind.as_str() == *k))
        {
            Some(k) => k.parse::<Kind>().ok(),
            None => {
                let written = v.as_str().unwrap_or("(not a string)");
                let names = Kind::ALL.map(Kind::as_str);
                let hint = yaml::suggestion(written, &names)
                    .map(|s| format!(" (did you mean `{s}`?)"))
                    .unwrap_or_default();
                header.push(problem(
                    v,
                    root_path.key("kind"),
                    format!("unknown kind `{written}`{hint}; expected RuntimeEnvironment, Application or Deployment"),
                ));
                None
            }
        },
    };
    if !header.is_empty() {
        return Err(header);
    }
    let Some(kind) = kind else {
        return Err(Vec::new());
    };
    let read = match kind {
        Kind::RuntimeEnvironment => read(root).map(Object::RuntimeEnvironment),
        Kind::Application => read(root).map(Object::Application),
        Kind::Deployment => read(root).map(Object::Deployment),
    };
    read.map_err(|mut problems| {
        // Reading stops at the first problem: every other missing field is found by the schema.
        for missing in missing_fields(kind, root) {
            if !problems
                .iter()
                .any(|p| p.path == missing.path && p.message == missing.message)
            {
                problems.push(missing);
            }
        }
        problems
    })
}

/// Every required field missing anywhere in `root`, by the kind's JSON schema.
fn missing_fields(kind: Kind, root: &Node) -> Vec<FieldProblem> {
    let schema = json_schema(kind);
    let defs = schema.get("$defs").cloned().unwrap_or_default();
    let mut out = Vec::new();
    walk_required(&schema, &defs, root, &FieldPath::root(), &mut out, 0);
    out
}

/// The schema `schema` stands for: a `$ref` followed, an optional value's non-null branch taken. `None`
/// for a choice between several shapes (nothing can be said of its fields).
fn resolve_schema<'a>(
    mut schema: &'a serde_json::Value,
    defs: &'a serde_json::Value,
) -> Option<&'a serde_json::Value> {
    for _ in 0..8 {
        if let Some(reference) = schema.get("$ref").and_then(serde_json::Value::as_str) {
            schema = defs.get(reference.strip_prefix("#/$defs/")?)?;
            continue;
        }
        if let Some(any) = schema.get("anyOf").and_then(serde_json::Value::as_array) {
            let mut shapes = any
                .iter()
                .filter(|v| v.get("type").and_then(serde_json::Value::as_str) != Some("null"));
            match (shapes.next(), shapes.next()) {
                (Some(only), None) => {
                    schema = only;
                    continue;
                }
                _ => return None,
            }
        }
        return Some(schema);
    }
    None
}

fn walk_required(
    schema: &serde_json::Value,
    defs: &serde_json::Value,
    node: &Node,
    path: &FieldPath,
    out: &mut Vec<FieldProblem>,
    depth: usize,
) {
    if depth > 32 {
        return;
    }
    let Some(schema) = resolve_schema(schema, defs) else {
        return;
    };
    match &node.value {
        NodeValue::Mapping(entries) => {
            for name in schema
                .get("required")
                .and_then(serde_json::Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(serde_json::Value::as_str)
            {
                if node.get(name).is_none() {
                    out.push(FieldProblem {
                        mark: node.mark,
                        path: path.clone(),
                        message: format!("missing required field `{name}`"),
                    });
                }
            }
            for (key, value) in entries {
                let Some(key) = key.as_str() else { continue };
                let field = schema
                    .get("properties")
                    .and_then(|p| p.get(key))
                    .or_else(|| schema.get("additionalProperties").filter(|a| a.is_object()));
                if let Some(field) = field {
                    walk_required(field, defs, value, &path.key(key), out, depth + 1);
                }
            }
        }
        NodeValue::Sequence(items) => {
            if let Some(item) = schema.get("items") {
                for (i, value) in items.iter().enumerate() {
                    walk_required(item, defs, value, &path.index(i), out, depth + 1);
                }
            }
        }
        NodeValue::Scalar { .. } => {}
    }
}

/// The JSON Schema of one kind's objects, generated from the Rust types.
pub fn json_schema(kind: Kind) -> serde_json::Value {
    let mut schema = match kind {
        Kind::RuntimeEnvironment => schemars::schema_for!(RuntimeEnvironment),
        Kind::Application => schemars::schema_for!(Application),
        Kind::Deployment => schemars::schema_for!(Deployment),
    };
    schema.insert("title".into(), kind.as_str().into());
    if let Some(props) = schema.get_mut("properties").and_then(|p| p.as_object_mut()) {
        props.insert(
            "apiVersion".into(),
            serde_json::json!({ "type": "string", "enum": [API_VERSION] }),
        );
        props.insert(
            "kind".into(),
            serde_json::json!({ "type": "string", "enum": [kind.as_str()] }),
        );
    }
    schema.to_value()
}
