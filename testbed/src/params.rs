//! Request parameters: decoding (query, form or JSON body, path) and validation against the route table.

use std::collections::BTreeMap;

use crate::error::ApiError;
use crate::formats;
use crate::schema::{ParamType, RouteSpec, RouteTable};

/// The decoded, validated parameters of one call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params(BTreeMap<String, String>);

impl Params {
    /// The raw (normalised) value.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// A boolean parameter (validated values are `1`/`0`).
    pub fn flag(&self, name: &str) -> Option<bool> {
        self.get(name).map(|v| v == "1")
    }

    /// An integer parameter.
    pub fn int(&self, name: &str) -> Option<i64> {
        self.get(name).and_then(|v| v.parse().ok())
    }

    /// Whether the parameter was given.
    pub fn has(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    /// All parameters.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Builds parameters from pairs (for tests and in-process calls).
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self(
            pairs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }
}

/// Decodes the parameters of a request the way pveproxy's `extract_params` does: the body (form or JSON)
/// for POST/PUT, then the query string on top, then the path placeholders.
pub fn decode(
    method: &str,
    query: Option<&str>,
    content_type: Option<&str>,
    body: &[u8],
    path_params: &[(String, String)],
) -> Result<Params, ApiError> {
    let mut values = BTreeMap::new();
    let has_body = !body.iter().all(u8::is_ascii_whitespace);
    if matches!(method, "GET" | "DELETE") && has_body {
        return Err(ApiError::new(
            501,
            format!("Unexpected content for method '{method}'"),
        ));
    }
    if has_body {
        let is_json = content_type
            .and_then(|c| c.split(';').next())
            .is_some_and(|c| c.trim().eq_ignore_ascii_case("application/json"));
        if is_json {
            let parsed: serde_json::Value = serde_json::from_slice(body)
                .map_err(|e| ApiError::new(400, format!("malformed JSON string: {e}")))?;
            let object = parsed
                .as_object()
                .ok_or_else(|| ApiError::new(400, "JSON body is not an object"))?;
            for (k, v) in object {
                let text = match v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Bool(b) => if *b { "1" } else { "0" }.to_string(),
                    serde_json::Value::Number(n) => n.to_string(),
                    serde_json::Value::Null => continue,
                    other => {
                        return Err(ApiError::param(
                            k,
                            format!("type check ('string') failed - got {other}"),
                        ));
                    }
                };
                values.insert(k.clone(), text);
            }
        } else {
            values.extend(form_urlencoded::parse(body).into_owned());
        }
    }
    if let Some(query) = query {
        values.extend(form_urlencoded::parse(query.as_bytes()).into_owned());
    }
    values.remove("_dc");
    let mut errors = BTreeMap::new();
    for (name, value) in path_params {
        match values.get(name) {
            Some(given) if given != value => {
                errors.insert(
                    name.clone(),
                    "duplicate parameter (already defined in URI) with conflicting values!".to_string(),
                );
            }
            _ => {
                values.insert(name.clone(), value.clone());
            }
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::params(errors));
    }
    Ok(Params(values))
}

/// Validates parameters against a route: unknown and missing parameters, types, bounds, enumerations,
/// patterns and formats. Booleans are normalised to `1`/`0`.
pub fn validate(table: &RouteTable, route: &RouteSpec, params: &mut Params) -> Result<(), ApiError> {
    let mut errors = BTreeMap::new();
    for (name, spec) in &route.params {
        if !spec.optional && !name.ends_with("[n]") && !params.has(name) {
            errors.insert(
                name.clone(),
                "property is missing and it is not optional".to_string(),
            );
        }
    }
    for (name, value) in params.0.iter_mut() {
        let Some(spec) = route.param(name) else {
            errors.insert(
                name.clone(),
                "property is not defined in schema and the schema does not allow additional properties"
                    .into(),
            );
            continue;
        };
        match check_value(table, spec, value) {
            Ok(normalised) => *value = normalised,
            Err(message) => {
                errors.insert(name.clone(), message);
            }
        }
    }
    for (name, _) in params.iter() {
        if let Some(required) = route.param(name).and_then(|s| s.requires.as_ref())
            && !params.has(required)
        {
            errors.insert(
                required.clone(),
                format!("missing property - '{name}' requires this property"),
            );
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::params(errors))
    }
}

fn check_value(table: &RouteTable, spec: &crate::schema::ParamSpec, value: &str) -> Result<String, String> {
    let value = formats::check_typed(
        spec.ty,
        value,
        spec.minimum,
        spec.maximum,
        spec.enumeration.as_deref(),
    )?;
    if spec.ty != ParamType::String {
        return Ok(value);
    }
    if let Some(max) = spec.max_length.filter(|m| value.chars().count() > *m) {
        return Err(format!("value may only be {max} characters long"));
    }
    if let Some(pattern) = &spec.pattern
        && !formats::matches_whole(pattern, &value)
    {
        return Err("value does not match the regex pattern".into());
    }
    if let Some(format) = &spec.format {
        formats::check_named(format, &value).map_err(|e| format!("invalid format - {e}\n"))?;
    }
    if let Some(keys) = spec
        .property_format
        .as_ref()
        .and_then(|f| table.property_formats.get(f))
    {
        formats::parse_property_string(keys, &value).map_err(|e| format!("invalid format - {e}\n"))?;
    }
    Ok(value)
}
