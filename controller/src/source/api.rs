//! The API source: objects applied and deleted over the daemon's HTTP API, kept in the store so that
//! they survive restarts.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::spec::API_SOURCE;
use super::{Snapshot, SourcedObject};
use crate::api::{Kind, ObjectKey};
use crate::load::{self, Diagnostic};
use crate::store::{Store, StoreError};
use crate::yaml::Limits;

/// The prefix of the store's entries that hold API objects.
const PREFIX: &str = "api-object:";

/// Why an apply or a delete was refused.
#[derive(Debug, thiserror::Error)]
pub enum ApiSourceError {
    /// The request does not hold valid objects.
    #[error("invalid: {} problem(s)", .0.len())]
    Invalid(Vec<Diagnostic>),
    /// The request holds no object.
    #[error("the request holds no object")]
    Empty,
    /// An object of another kind was sent to a kind's route.
    #[error("{key} was sent to the route of kind {expected}; send it to its own kind, or to /api/v1/apply")]
    WrongKind {
        /// The object.
        key: ObjectKey,
        /// The kind of the route.
        expected: Kind,
    },
    /// The object belongs to another source.
    #[error(
        "{key} belongs to source `{source_name}`; change it there (objects of a git or directory source cannot be changed over the API)"
    )]
    Owned {
        /// The object.
        key: ObjectKey,
        /// Its owner.
        source_name: String,
    },
    /// The object is not one applied over the API.
    #[error("{0} was not applied over the API")]
    NotFound(ObjectKey),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the store keeps of one API object.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    /// The file name the client gave (for locations).
    file: String,
    /// The object as JSON.
    object: serde_json::Value,
}

/// What an apply did to one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// It is new.
    Created,
    /// It changed.
    Configured,
    /// It was already so.
    Unchanged,
}

/// The objects applied over the API.
pub struct ApiSource {
    store: Arc<Store>,
    limits: Limits,
    objects: BTreeMap<ObjectKey, (Arc<SourcedObject>, Stored)>,
}

impl ApiSource {
    /// Loads the objects the store holds. One that no longer validates (after an upgrade, say) is
    /// reported and kept out.
    pub fn load(store: Arc<Store>, limits: Limits) -> Result<(Self, Vec<Diagnostic>), StoreError> {
        let mut objects = BTreeMap::new();
        let mut problems = Vec::new();
        for (_, stored) in store.inventory_list::<Stored>(PREFIX)? {
            let text = serde_json::to_string(&stored.object).unwrap_or_default();
            let load = load::load_text(Path::new(&stored.file), &text, &limits);
            problems.extend(load.problems);
            for loaded in load.objects {
                let key = loaded.object.key();
                objects.insert(
                    key,
                    (Arc::new(SourcedObject { loaded, stale: false }), stored.clone()),
                );
            }
        }
        Ok((
            Self {
                store,
                limits,
                objects,
            },
            problems,
        ))
    }

    /// Applies the objects of one YAML or JSON text, all or none. `file` names the text in problems;
    /// `expected` restricts the kind; `owner` tells which source owns an object now.
    pub fn apply(
        &mut self,
        file: &str,
        text: &str,
        expected: Option<Kind>,
        owner: impl Fn(&ObjectKey) -> Option<String>,
    ) -> Result<Vec<(ObjectKey, Outcome)>, ApiSourceError> {
        let load = load::load_text(Path::new(file), text, &self.limits);
        if !load.problems.is_empty() {
            return Err(ApiSourceError::Invalid(load.problems));
        }
        if load.objects.is_empty() {
            return Err(ApiSourceError::Empty);
        }
        for loaded in &load.objects {
            let key = loaded.object.key();
            if let Some(expected) = expected
                && key.kind != expected
            {
                return Err(ApiSourceError::WrongKind { key, expected });
            }
            if let Some(source_name) = owner(&key).filter(|s| s != API_SOURCE) {
                return Err(ApiSourceError::Owned { key, source_name });
            }
        }
        let mut outcomes = Vec::new();
        for loaded in load.objects {
            let key = loaded.object.key();
            let stored = Stored {
                file: file.to_owned(),
                object: loaded.object.to_json(),
            };
            let outcome = match self.objects.get(&key) {
                None => Outcome::Created,
                Some((_, old)) if old.object == stored.object => Outcome::Unchanged,
                Some(_) => Outcome::Configured,
            };
            if outcome != Outcome::Unchanged {
                self.store.put_inventory(&format!("{PREFIX}{key}"), &stored)?;
                self.objects.insert(
                    key.clone(),
                    (Arc::new(SourcedObject { loaded, stale: false }), stored),
                );
            }
            outcomes.push((key, outcome));
        }
        Ok(outcomes)
    }

    /// Deletes an object applied over the API.
    pub fn delete(
        &mut self,
        key: &ObjectKey,
        owner: impl Fn(&ObjectKey) -> Option<String>,
    ) -> Result<(), ApiSourceError> {
        if !self.objects.contains_key(key) {
            return Err(match owner(key).filter(|s| s != API_SOURCE) {
                Some(source_name) => ApiSourceError::Owned {
                    key: key.clone(),
                    source_name,
                },
                None => ApiSourceError::NotFound(key.clone()),
            });
        }
        self.store.remove_inventory(&format!("{PREFIX}{key}"))?;
        self.objects.remove(key);
        Ok(())
    }

    /// The objects as a snapshot; the revision is a hash of their content.
    pub fn snapshot(&self) -> Snapshot {
        let mut revision = Sha256::new();
        for (key, (_, stored)) in &self.objects {
            revision.update(key.to_string().as_bytes());
            revision.update(crate::store::canonical_hash(&stored.object).as_bytes());
        }
        Snapshot {
            revision: revision
                .finalize()
                .iter()
                .take(8)
                .map(|b| format!("{b:02x}"))
                .collect(),
            objects: self
                .objects
                .iter()
                .map(|(k, (o, _))| (k.clone(), o.clone()))
                .collect(),
            ..Snapshot::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const APP: &str = "apiVersion: fediversity.eu/v1alpha1\nkind: Application\nmetadata: {name: demo}\n\
        spec: {displayName: Demo, nixosModule: m.nix, sizes: {small: {cores: 1, memoryMiB: 512, diskGiB: 1}}}\n";

    fn source(dir: &Path) -> ApiSource {
        let store = Arc::new(Store::open(dir).unwrap());
        ApiSource::load(store, Limits::default()).unwrap().0
    }

    #[test]
    fn applied_objects_survive_a_restart_and_deletes_remove_them() {
        let dir = tempfile::tempdir().unwrap();
        let key = ObjectKey::new(Kind::Application, "demo");
        {
            let mut api = source(dir.path());
            let out = api.apply("demo.yaml", APP, None, |_| None).unwrap();
            assert_eq!(out, vec![(key.clone(), Outcome::Created)]);
            let again = api.apply("demo.yaml", APP, None, |_| None).unwrap();
            assert_eq!(again[0].1, Outcome::Unchanged);
        }
        let mut api = source(dir.path());
        assert!(api.snapshot().objects.contains_key(&key));
        api.delete(&key, |_| Some(API_SOURCE.into())).unwrap();
        assert!(api.snapshot().objects.is_empty());
        drop(api);
        assert!(source(dir.path()).snapshot().objects.is_empty());
    }

    #[test]
    fn invalid_text_is_refused_with_located_problems() {
        let dir = tempfile::tempdir().unwrap();
        let mut api = source(dir.path());
        let bad = APP.replace("cores: 1", "cores: lots");
        match api.apply("mine.yaml", &bad, None, |_| None) {
            Err(ApiSourceError::Invalid(problems)) => {
                let line = problems[0].to_string();
                assert!(line.starts_with("mine.yaml:4:"), "{line}");
                assert!(line.contains("spec.sizes.small.cores"), "{line}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(api.snapshot().objects.is_empty());
    }

    #[test]
    fn objects_of_another_source_cannot_be_changed_or_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let mut api = source(dir.path());
        let owner = |_: &ObjectKey| Some("provider".to_owned());
        let err = api.apply("x.yaml", APP, None, owner).unwrap_err().to_string();
        assert!(err.contains("belongs to source `provider`"), "{err}");
        let key = ObjectKey::new(Kind::Application, "demo");
        let err = api.delete(&key, owner).unwrap_err().to_string();
        assert!(err.contains("belongs to source `provider`"), "{err}");
        let err = api
            .apply("x.yaml", APP, Some(Kind::Deployment), |_| None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("route of kind Deployment"), "{err}");
    }
}
