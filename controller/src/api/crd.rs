//! Kubernetes CustomResourceDefinitions for the three kinds, generated from the Rust types.
//!
//! Kubernetes wants *structural* schemas: no `$ref`, no `additionalProperties` beside `properties`, no
//! type or description inside `oneOf`. The JSON Schemas schemars generates are rewritten accordingly.

use schemars::JsonSchema;
use schemars::generate::SchemaSettings;
use serde_json::{Value, json};

use super::{
    ApplicationSpec, ApplicationStatus, DeploymentSpec, DeploymentStatus, Kind, RuntimeEnvironmentSpec,
    RuntimeEnvironmentStatus,
};

/// The API group of every kind.
pub const GROUP: &str = "fediversity.eu";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";

fn schema_of<T: JsonSchema>() -> Value {
    let generator = SchemaSettings::openapi3()
        .with(|s| {
            s.inline_subschemas = true;
            s.meta_schema = None;
        })
        .into_generator();
    let mut value = generator.into_root_schema_for::<T>().to_value();
    structural(&mut value);
    value
}

/// Rewrites a JSON Schema into a Kubernetes structural schema, in place.
fn structural(value: &mut Value) {
    let Value::Object(map) = value else { return };
    for key in ["$schema", "title", "$defs", "definitions", "examples"] {
        map.remove(key);
    }
    // A single `allOf` (schemars' way to attach a description or nullability to a reference): merge it.
    if let Some(Value::Array(all)) = map.get("allOf")
        && all.len() == 1
        && let Some(Value::Object(inner)) = map.remove("allOf").and_then(|a| a.as_array()?.first().cloned())
    {
        for (k, v) in inner {
            map.entry(k).or_insert(v);
        }
    }
    // Maps keyed by names (`patternProperties` with the name pattern): Kubernetes knows only
    // `additionalProperties`, and names are validated by the controller anyway.
    if let Some(Value::Object(patterns)) = map.get("patternProperties")
        && patterns.len() == 1
        && !map.contains_key("properties")
    {
        let value_schema = patterns.values().next().cloned().unwrap_or(Value::Bool(true));
        map.remove("patternProperties");
        map.insert("additionalProperties".into(), value_schema);
    }
    // An enum written as `oneOf` branches of constants (documented unit variants): one string enum.
    if let Some(Value::Array(branches)) = map.get("oneOf") {
        let values: Option<Vec<Value>> = branches
            .iter()
            .map(|b| {
                b.get("enum")
                    .and_then(Value::as_array)
                    .filter(|e| e.len() == 1)
                    .map(|e| e[0].clone())
            })
            .collect();
        if let Some(values) = values {
            map.remove("oneOf");
            map.insert("type".into(), "string".into());
            map.insert("enum".into(), Value::Array(values));
        }
    }
    // Free-form values (operator settings, settings schemas) are kept as they are.
    let free_object = map.get("additionalProperties") == Some(&Value::Bool(true))
        || (map.get("type") == Some(&json!("object"))
            && !map.contains_key("properties")
            && !map.contains_key("additionalProperties"));
    if free_object {
        map.remove("additionalProperties");
        map.insert("x-kubernetes-preserve-unknown-fields".into(), Value::Bool(true));
    }
    if map.contains_key("properties") {
        map.remove("additionalProperties");
    }
    if map.is_empty() {
        map.insert("x-kubernetes-preserve-unknown-fields".into(), Value::Bool(true));
    }
    for child in map.values_mut() {
        match child {
            Value::Object(_) => structural(child),
            Value::Array(items) => items.iter_mut().for_each(structural),
            _ => {}
        }
    }
    // `properties` and `additionalProperties` hold schemas by name: recurse into their values only.
}

fn column(name: &str, type_: &str, path: &str, description: &str) -> Value {
    json!({ "name": name, "type": type_, "jsonPath": path, "description": description })
}

/// The CustomResourceDefinition of `kind`.
pub fn crd(kind: Kind) -> Value {
    let (spec, status) = match kind {
        Kind::RuntimeEnvironment => (
            schema_of::<RuntimeEnvironmentSpec>(),
            schema_of::<RuntimeEnvironmentStatus>(),
        ),
        Kind::Application => (schema_of::<ApplicationSpec>(), schema_of::<ApplicationStatus>()),
        Kind::Deployment => (schema_of::<DeploymentSpec>(), schema_of::<DeploymentStatus>()),
    };
    let ready = column(
        "Ready",
        "string",
        ".status.conditions[?(@.type==\"Ready\")].status",
        "Whether the object is converged.",
    );
    let reason = column(
        "Reason",
        "string",
        ".status.conditions[?(@.type==\"Ready\")].reason",
        "Why (not) Ready.",
    );
    let age = column(
        "Age",
        "date",
        ".metadata.creationTimestamp",
        "When the object was created.",
    );
    let mut columns = vec![ready, reason];
    match kind {
        Kind::Deployment => {
            columns.push(column(
                "Domain",
                "string",
                ".spec.domain",
                "The operator's domain.",
            ));
            columns.push(column(
                "Environment",
                "string",
                ".spec.runtimeEnvironment",
                "Where it runs.",
            ));
            columns.push(column(
                "Suspended",
                "boolean",
                ".spec.suspend",
                "Whether reconciles are suspended.",
            ));
        }
        Kind::RuntimeEnvironment => {
            columns.push(column(
                "Endpoint",
                "string",
                ".spec.proxmox.endpoint",
                "The Proxmox VE API.",
            ));
            columns.push(column(
                "VMs",
                "integer",
                ".status.vmsOwned",
                "VMs owned by the controller.",
            ));
        }
        Kind::Application => {
            columns.push(column(
                "Display name",
                "string",
                ".spec.displayName",
                "What operators see.",
            ));
        }
    }
    columns.push(age);
    let singular = kind.as_str().to_ascii_lowercase();
    let description = match kind {
        Kind::RuntimeEnvironment => "Where Deployments run: a Proxmox VE cluster or existing NixOS machines.",
        Kind::Application => {
            "A catalog entry: a Fediverse application, its NixOS module, sizes and settings schema."
        }
        Kind::Deployment => "One operator's desired state: a domain, applications and their settings.",
    };
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": { "name": format!("{}.{GROUP}", kind.plural()) },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind.as_str(),
                "listKind": format!("{}List", kind.as_str()),
                "plural": kind.plural(),
                "singular": singular,
                "shortNames": [format!("f{}", kind.short_name())],
                "categories": ["fediversity"],
            },
            "scope": "Cluster",
            "versions": [{
                "name": VERSION,
                "served": true,
                "storage": true,
                "subresources": { "status": {} },
                "additionalPrinterColumns": columns,
                "schema": { "openAPIV3Schema": {
                    "type": "object",
                    "description": description,
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": { "type": "string" },
                        "kind": { "type": "string" },
                        "metadata": { "type": "object" },
                        "spec": spec,
                        "status": status,
                    },
                }},
            }],
        },
    })
}

/// The file name of a kind's CRD in `crds/`.
pub fn file_name(kind: Kind) -> String {
    format!("{GROUP}_{}.yaml", kind.plural())
}

/// A kind's CRD as YAML, with a header saying it is generated.
pub fn crd_yaml(kind: Kind) -> String {
    let body = yaml_serde::to_string(&crd(kind)).unwrap_or_default();
    format!("# Generated by `fediversity crds` from the Rust types; do not edit.\n{body}")
}

/// Every CRD as one multi-document YAML stream.
pub fn all_yaml() -> String {
    Kind::ALL
        .iter()
        .map(|k| crd_yaml(*k))
        .collect::<Vec<_>>()
        .join("---\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walk(value: &Value, path: &str, found: &mut Vec<String>) {
        if let Value::Object(map) = value {
            if map.contains_key("$ref") {
                found.push(format!("{path}: $ref"));
            }
            if map.contains_key("patternProperties") {
                found.push(format!("{path}: patternProperties"));
            }
            if map.contains_key("properties") && map.contains_key("additionalProperties") {
                found.push(format!("{path}: properties beside additionalProperties"));
            }
            for key in ["oneOf", "anyOf"] {
                for branch in map.get(key).and_then(Value::as_array).into_iter().flatten() {
                    if branch.get("type").is_some() || branch.get("description").is_some() {
                        found.push(format!("{path}.{key}: type or description in a branch"));
                    }
                }
            }
            for (k, v) in map {
                walk(v, &format!("{path}.{k}"), found);
            }
        } else if let Value::Array(items) = value {
            for (i, v) in items.iter().enumerate() {
                walk(v, &format!("{path}[{i}]"), found);
            }
        }
    }

    #[test]
    fn every_crd_schema_is_structural() {
        for kind in Kind::ALL {
            let mut found = Vec::new();
            walk(&crd(kind), kind.as_str(), &mut found);
            assert!(found.is_empty(), "{found:#?}");
        }
    }

    #[test]
    fn crds_carry_status_subresource_printer_columns_and_the_spec_fields() {
        let crd = crd(Kind::Deployment);
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["subresources"]["status"], json!({}));
        assert!(
            version["additionalPrinterColumns"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["name"] == "Ready")
        );
        let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(
            spec["properties"]["deletionPolicy"]["enum"],
            json!(["Retain", "Delete"])
        );
        assert_eq!(
            spec["properties"]["applications"]["additionalProperties"]["properties"]["settings"]["x-kubernetes-preserve-unknown-fields"],
            true
        );
        assert!(spec["required"].as_array().unwrap().contains(&json!("domain")));
    }
}
