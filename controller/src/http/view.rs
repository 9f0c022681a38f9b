//! How objects, hosts and events look over the API: Kubernetes-shaped JSON built from desired state and status.

use serde_json::{Map, Value, json};

use crate::api::{Event, Kind, Object, ObjectKey};
use crate::state::{Desired, StatusBook};

pub use crate::api::{REVISION_ANNOTATION, SOURCE_ANNOTATION, SOURCE_NAME_ANNOTATION};

/// An object with its metadata as the controller keeps it, and its status.
pub fn object(desired: &Desired, book: &StatusBook) -> Value {
    let object = desired.object();
    let key = object.key();
    let mut value = object.to_json();
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("generation".into(), desired.generation.into());
        meta.insert("creationTimestamp".into(), desired.created.to_string().into());
        let loaded = &desired.sourced.loaded;
        let mut where_ = format!("{}:{}", loaded.file.display(), loaded.line);
        if desired.sourced.stale {
            where_.push_str(" (stale: the file no longer loads)");
        }
        let annotations = meta
            .entry("annotations")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Some(annotations) = annotations.as_object_mut() {
            annotations.insert(SOURCE_ANNOTATION.into(), where_.into());
            if !desired.source.is_empty() {
                annotations.insert(SOURCE_NAME_ANNOTATION.into(), desired.source.clone().into());
            }
            annotations.insert(REVISION_ANNOTATION.into(), desired.revision.clone().into());
        }
    }
    value["status"] = book.status(&key).unwrap_or_else(|| json!({}));
    value
}

/// A Kubernetes-style list.
pub fn list(items: Vec<Value>) -> Value {
    json!({ "apiVersion": "v1", "kind": "List", "items": items })
}

/// The hosts of every Deployment, flattened: one entry per host with its Deployment's name.
pub fn hosts(deployments: &[Desired], book: &StatusBook) -> Vec<Value> {
    let mut out = Vec::new();
    for desired in deployments {
        let Object::Deployment(dep) = desired.object() else {
            continue;
        };
        let key = ObjectKey {
            kind: Kind::Deployment,
            name: dep.metadata.name.clone(),
        };
        let Some(status) = book.status(&key) else { continue };
        for host in status
            .get("hosts")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let mut host = host.clone();
            if let Some(map) = host.as_object_mut() {
                map.insert("deployment".into(), dep.metadata.name.to_string().into());
            }
            out.push(host);
        }
    }
    out
}

/// The last backup of every host (`status.backups`), with its Deployment's name; only `deployment`'s
/// when given.
pub fn backups(deployments: &[Desired], book: &StatusBook, deployment: Option<&str>) -> Vec<Value> {
    let mut out = Vec::new();
    for desired in deployments {
        let Object::Deployment(dep) = desired.object() else {
            continue;
        };
        if deployment.is_some_and(|d| d != dep.metadata.name.as_str()) {
            continue;
        }
        let key = ObjectKey {
            kind: Kind::Deployment,
            name: dep.metadata.name.clone(),
        };
        let Some(status) = book.status(&key) else { continue };
        for backup in status
            .get("backups")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let mut backup = backup.clone();
            if let Some(map) = backup.as_object_mut() {
                map.insert("deployment".into(), dep.metadata.name.to_string().into());
            }
            out.push(backup);
        }
    }
    out
}

/// One snapshot of a Deployment as the repository lists it, in the shape of a host's backup entry.
pub fn snapshot(deployment: &str, s: &crate::backup::Snapshot) -> Value {
    json!({
        "host": s.tag("host").unwrap_or(&s.hostname),
        "deployment": deployment,
        "result": "Stored",
        "snapshot": if s.short_id.is_empty() { &s.id } else { &s.short_id },
        "time": s.time,
        "application": s.tag("application"),
        "revision": s.tag("revision"),
    })
}

/// One event, with the object it is about.
pub fn event(key: &ObjectKey, event: &Event) -> Value {
    let mut value = serde_json::to_value(event).unwrap_or(Value::Null);
    if let Some(map) = value.as_object_mut() {
        map.insert(
            "object".into(),
            json!({ "kind": key.kind.as_str(), "name": key.name.to_string() }),
        );
    }
    value
}
