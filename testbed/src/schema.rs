//! The route and parameter table derived from the official Proxmox VE API schema.
//!
//! The table lives in `testbed/schema/pve-routes.json`. It is generated from `pve-api-subset.json` (the
//! official `apidata.js` dump, PVE 9.1.3) by [`derive_table`] and kept in sync by a test.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The committed, derived table, as text.
pub const ROUTE_TABLE_JSON: &str = include_str!("../schema/pve-routes.json");

/// The committed table, parsed once.
pub static ROUTE_TABLE: LazyLock<RouteTable> = LazyLock::new(|| {
    // The committed file is checked by the test suite; a broken file is a build defect, not bad input.
    serde_json::from_str(ROUTE_TABLE_JSON).expect("schema/pve-routes.json is valid")
});

/// Highest index of `name[n]` parameters whose description does not say it (qemu-server's constants:
/// MAX_NETS, MAX_HOSTPCI_DEVICES, MAX_NUMA, MAX_UNUSED_DISKS, MAX_VIRTIOFS).
const INDEX_MAX_FALLBACK: &[(&str, u32)] = &[
    ("hostpci", 15),
    ("ipconfig", 31),
    ("net", 31),
    ("numa", 7),
    ("unused", 255),
    ("virtiofs", 9),
];

/// Errors while deriving the table from the official schema.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The schema is not the expected list of endpoints.
    #[error("schema is not a list of endpoints: {0}")]
    Shape(String),
}

/// JSON-schema primitive types used by parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    /// A string.
    String,
    /// An integer (`^-?\d+$`).
    Integer,
    /// A boolean (`1|0|on|off|yes|no|true|false`).
    Boolean,
    /// A decimal number.
    Number,
}

impl ParamType {
    /// The schema's name of the type, as used in error messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::String => "string",
            Self::Integer => "integer",
            Self::Boolean => "boolean",
            Self::Number => "number",
        }
    }
}

/// The whole derived table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteTable {
    /// Where the table was derived from.
    pub source: String,
    /// One entry per method and path.
    pub routes: Vec<RouteSpec>,
    /// Property-string formats (`net[n]`, `scsi[n]`, `agent`, …) by name.
    pub property_formats: BTreeMap<String, BTreeMap<String, SubKeySpec>>,
}

/// One endpoint: method, path template and parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteSpec {
    /// `GET`, `POST`, `PUT` or `DELETE`.
    pub method: String,
    /// Path template relative to `/api2/json`, e.g. `/nodes/{node}/qemu/{vmid}/config`.
    pub path: String,
    /// Whether API tokens may call it.
    pub allowtoken: bool,
    /// The schema's return type.
    pub returns: String,
    /// Keys of the returned object (or of each returned array item), when the schema lists them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub return_keys: Vec<String>,
    /// Parameters by name (`net[n]` style names for indexed ones).
    pub params: BTreeMap<String, ParamSpec>,
}

/// One parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamSpec {
    /// Type.
    #[serde(rename = "type")]
    pub ty: ParamType,
    /// May be omitted.
    #[serde(default, skip_serializing_if = "is_false")]
    pub optional: bool,
    /// Allowed values.
    #[serde(default, rename = "enum", skip_serializing_if = "Option::is_none")]
    pub enumeration: Option<Vec<String>>,
    /// A named format (`pve-vmid`, `dns-name`, `urlencoded`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// A property-string format, by name in [`RouteTable::property_formats`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub property_format: Option<String>,
    /// Minimum value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum: Option<i64>,
    /// Maximum value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum: Option<i64>,
    /// Maximum length in characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
    /// A regular expression the whole value must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// Another parameter this one needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requires: Option<String>,
    /// For `name[n]` parameters: the highest `n`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_max: Option<u32>,
}

/// One key of a property string.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubKeySpec {
    /// Type (absent for aliases).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub ty: Option<ParamType>,
    /// May be omitted.
    #[serde(default, skip_serializing_if = "is_false")]
    pub optional: bool,
    /// The key a value without `key=` belongs to.
    #[serde(default, skip_serializing_if = "is_false")]
    pub default_key: bool,
    /// Allowed values.
    #[serde(default, rename = "enum", skip_serializing_if = "Option::is_none")]
    pub enumeration: Option<Vec<String>>,
    /// Minimum value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum: Option<i64>,
    /// Maximum value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum: Option<i64>,
    /// This key is another name for `alias`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// The key's own name is the value of `key_alias` (as in `virtio=<mac>` meaning `model=virtio`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_alias: Option<String>,
    /// A named format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl RouteTable {
    /// The route with this method and path template.
    pub fn route(&self, method: &str, path: &str) -> Option<&RouteSpec> {
        self.routes.iter().find(|r| r.method == method && r.path == path)
    }

    /// Serialises the table as committed: one route per line, so diffs stay readable.
    pub fn to_committed_json(&self) -> String {
        let mut out = String::from("{\n");
        out.push_str(&format!("\"source\": {},\n", json(&self.source)));
        out.push_str("\"routes\": [\n");
        let routes: Vec<String> = self.routes.iter().map(json).collect();
        out.push_str(&routes.join(",\n"));
        out.push_str("\n],\n\"property_formats\": {\n");
        let formats: Vec<String> = self
            .property_formats
            .iter()
            .map(|(k, v)| format!("{}: {}", json(k), json(v)))
            .collect();
        out.push_str(&formats.join(",\n"));
        out.push_str("\n}\n}\n");
        out
    }
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

impl RouteSpec {
    /// The spec of a concrete parameter name, resolving `net0` to `net[n]` within its index range.
    pub fn param(&self, name: &str) -> Option<&ParamSpec> {
        if let Some(p) = self.params.get(name) {
            return Some(p);
        }
        let base = name.trim_end_matches(|c: char| c.is_ascii_digit());
        let digits = &name[base.len()..];
        if base.is_empty() || digits.is_empty() || (digits.len() > 1 && digits.starts_with('0')) {
            return None;
        }
        let index: u32 = digits.parse().ok()?;
        let p = self.params.get(&format!("{base}[n]"))?;
        (index <= p.index_max.unwrap_or(u32::MAX)).then_some(p)
    }
}

/// Derives the compact table from the official schema (the JSON list of endpoints).
pub fn derive_table(schema: &Value) -> Result<RouteTable, SchemaError> {
    let endpoints = schema
        .as_array()
        .ok_or_else(|| SchemaError::Shape("not an array".into()))?;
    let mut routes = Vec::new();
    let mut property_formats = BTreeMap::new();
    for e in endpoints {
        let method = str_field(e, "method")?;
        let path = str_field(e, "path")?;
        let mut params = BTreeMap::new();
        let props = e.pointer("/parameters/properties").and_then(Value::as_object);
        for (name, p) in props.into_iter().flatten() {
            let base = name.trim_end_matches("[n]").to_string();
            let mut spec = ParamSpec {
                ty: param_type(p).unwrap_or(ParamType::String),
                optional: flag(p, "optional"),
                enumeration: enumeration(p),
                format: p.get("format").and_then(Value::as_str).map(str::to_string),
                property_format: None,
                minimum: number(p, "minimum"),
                maximum: number(p, "maximum"),
                max_length: number(p, "maxLength").and_then(|n| usize::try_from(n).ok()),
                pattern: p.get("pattern").and_then(Value::as_str).map(str::to_string),
                requires: p.get("requires").and_then(Value::as_str).map(str::to_string),
                index_max: None,
            };
            if let Some(keys) = p.get("format").and_then(Value::as_object) {
                let sub: BTreeMap<String, SubKeySpec> =
                    keys.iter().map(|(k, v)| (k.clone(), sub_key(v))).collect();
                let key = match property_formats.get(&base) {
                    Some(existing) if *existing != sub => format!("{method} {path} {base}"),
                    _ => base.clone(),
                };
                property_formats.insert(key.clone(), sub);
                spec.property_format = Some(key);
            }
            if name.ends_with("[n]") {
                spec.index_max = index_max(p, &base);
            }
            params.insert(name.clone(), spec);
        }
        let returns = e.get("returns");
        let ret_props = returns
            .and_then(|r| r.get("properties").or_else(|| r.pointer("/items/properties")))
            .and_then(Value::as_object);
        routes.push(RouteSpec {
            method: method.to_string(),
            path: path.to_string(),
            allowtoken: flag(e, "allowtoken"),
            returns: returns
                .and_then(|r| r.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("null")
                .into(),
            return_keys: ret_props.map(|m| m.keys().cloned().collect()).unwrap_or_default(),
            params,
        });
    }
    routes.sort_by(|a, b| (&a.path, &a.method).cmp(&(&b.path, &b.method)));
    Ok(RouteTable {
        source: "pve-api-subset.json: the official Proxmox VE API schema (pve-docs apidata.js, PVE 9.1.3)"
            .into(),
        routes,
        property_formats,
    })
}

fn str_field<'a>(v: &'a Value, key: &str) -> Result<&'a str, SchemaError> {
    v.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| SchemaError::Shape(format!("endpoint without {key}")))
}

fn flag(v: &Value, key: &str) -> bool {
    match v.get(key) {
        Some(Value::Number(n)) => n.as_i64() == Some(1),
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s == "1",
        _ => false,
    }
}

fn number(v: &Value, key: &str) -> Option<i64> {
    match v.get(key)? {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn param_type(v: &Value) -> Option<ParamType> {
    match v.get("type")?.as_str()? {
        "integer" => Some(ParamType::Integer),
        "boolean" => Some(ParamType::Boolean),
        "number" => Some(ParamType::Number),
        _ => Some(ParamType::String),
    }
}

fn enumeration(v: &Value) -> Option<Vec<String>> {
    let list = v.get("enum")?.as_array()?;
    Some(
        list.iter()
            .map(|e| e.as_str().map_or_else(|| e.to_string(), str::to_string))
            .collect(),
    )
}

fn sub_key(v: &Value) -> SubKeySpec {
    SubKeySpec {
        ty: param_type(v),
        optional: flag(v, "optional"),
        default_key: flag(v, "default_key"),
        enumeration: enumeration(v),
        minimum: number(v, "minimum"),
        maximum: number(v, "maximum"),
        alias: v.get("alias").and_then(Value::as_str).map(str::to_string),
        key_alias: v.get("keyAlias").and_then(Value::as_str).map(str::to_string),
        format: v.get("format").and_then(Value::as_str).map(str::to_string),
    }
}

fn index_max(p: &Value, base: &str) -> Option<u32> {
    let description = p.get("description").and_then(Value::as_str).unwrap_or_default();
    if let Some(rest) = description.split("n is 0 to ").nth(1) {
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if let Ok(n) = digits.parse() {
            return Some(n);
        }
    }
    INDEX_MAX_FALLBACK
        .iter()
        .find(|(b, _)| *b == base)
        .map(|(_, n)| *n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_table_parses_and_resolves_indexed_parameters() {
        let route = ROUTE_TABLE
            .route("POST", "/nodes/{node}/qemu/{vmid}/config")
            .unwrap();
        assert!(route.param("net0").is_some());
        assert!(route.param("scsi30").is_some());
        assert!(route.param("scsi31").is_none());
        assert!(route.param("net01").is_none());
        assert!(route.param("bogus").is_none());
    }
}
