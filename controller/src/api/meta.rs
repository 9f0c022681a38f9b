//! Kubernetes-shaped object metadata, names and status conditions shared by every kind.

use std::collections::BTreeMap;
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::time::Timestamp;
use super::validate::{self, Problems, Validate};
use crate::yaml::FieldPath;

/// The annotation that says where an object was defined.
pub const SOURCE_ANNOTATION: &str = "fediversity.eu/source";
/// The annotation that names the source that owns an object.
pub const SOURCE_NAME_ANNOTATION: &str = "fediversity.eu/source-name";
/// The annotation that gives the revision of its source an object was last seen in.
pub const REVISION_ANNOTATION: &str = "fediversity.eu/revision";
/// The annotation that lets the controller restart a Deployment's VMs to apply pending changes.
pub const ALLOW_RESTART_ANNOTATION: &str = "fediversity.eu/allow-restart";

/// An object name: a DNS-1123 label such as `uni-utrecht` (checked by [`Validate`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Name(String);

impl Name {
    /// A name from a string that the caller has already checked (or will check through [`Validate`]).
    pub fn new(name: impl Into<String>) -> Self {
        Self(name.into())
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl Validate for Name {
    fn validate(&self, path: &FieldPath, problems: &mut Problems) {
        problems.check(path, validate::dns_label(&self.0));
    }
}

impl JsonSchema for Name {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Name".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A DNS-1123 label: 1 to 63 lowercase letters, digits and '-'.",
            "minLength": 1,
            "maxLength": 63,
            "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
        })
    }
}

/// The metadata of an object as written in a file.
///
/// All kinds are cluster-scoped: names are unique per kind, so there is no namespace. `generation` is kept
/// by the controller and is refused in files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ObjectMeta {
    /// The object's name, unique among objects of its kind.
    pub name: Name,
    /// Identifying labels (`key: value`), e.g. `fediversity.eu/operator: uni-utrecht`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Free-form notes for people and tools.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl ObjectMeta {
    /// Metadata with just a name.
    pub fn named(name: &str) -> Self {
        Self {
            name: Name::new(name),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
        }
    }
}

impl Validate for ObjectMeta {
    fn validate(&self, path: &FieldPath, problems: &mut Problems) {
        self.name.validate(&path.key("name"), problems);
        for (key, value) in &self.labels {
            let at = path.key("labels").key(key.as_str());
            problems.check(&at, validate::metadata_key(key));
            problems.check(&at, validate::label_value(value));
        }
        for key in self.annotations.keys() {
            problems.check(
                &path.key("annotations").key(key.as_str()),
                validate::metadata_key(key),
            );
        }
    }
}

/// Whether a condition holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    /// It holds.
    True,
    /// It does not hold.
    False,
    /// The controller cannot tell yet.
    Unknown,
}

impl fmt::Display for ConditionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        })
    }
}

/// One observation about an object, shaped like a Kubernetes `metav1.Condition`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Condition {
    /// What is observed: `Ready`, `Reconciling`, `Stalled`, `Provisioned`...; see [`condition_types`].
    #[serde(rename = "type")]
    pub type_: String,
    /// Whether it holds.
    pub status: ConditionStatus,
    /// Why, in CamelCase; see [`reasons`].
    pub reason: String,
    /// The details for a person.
    pub message: String,
    /// When `status` last changed.
    pub last_transition_time: Timestamp,
    /// The `metadata.generation` this was observed for.
    pub observed_generation: u64,
}

impl Condition {
    /// Whether the two conditions say the same thing (ignoring when they were made).
    pub fn same_as(&self, other: &Condition) -> bool {
        self.type_ == other.type_
            && self.status == other.status
            && self.reason == other.reason
            && self.message == other.message
            && self.observed_generation == other.observed_generation
    }
}

/// Sets `new` in `conditions`, keeping the old transition time when the status did not change.
/// Returns whether anything changed.
pub fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(old) if old.same_as(&new) => false,
        Some(old) => {
            if old.status == new.status {
                new.last_transition_time = old.last_transition_time;
            }
            *old = new;
            true
        }
        None => {
            conditions.push(new);
            true
        }
    }
}

/// The condition types the controller writes.
pub mod condition_types {
    /// The object is fully converged and healthy.
    pub const READY: &str = "Ready";
    /// Work towards the desired state is under way.
    pub const RECONCILING: &str = "Reconciling";
    /// The controller has stopped retrying until the spec changes.
    pub const STALLED: &str = "Stalled";
    /// Every planned host exists as a VM or static host.
    pub const PROVISIONED: &str = "Provisioned";
    /// Every host runs the requested NixOS configuration.
    pub const CONFIGURED: &str = "Configured";
    /// Every health check passes.
    pub const HEALTHY: &str = "Healthy";
    /// Every host's name in the provider's zone holds its address.
    pub const DNS_PUBLISHED: &str = "DNSPublished";
    /// The operator's names resolve to their hosts.
    pub const DNS_READY: &str = "DNSReady";
    /// Something was changed out of band (a VM's config or power state, a host's system): found by
    /// the drift scan, corrected where the plan says so, reported either way.
    pub const DRIFTED: &str = "Drifted";
}

/// The reasons the controller gives, in CamelCase.
pub mod reasons {
    /// Everything is as desired.
    pub const SUCCEEDED: &str = "Succeeded";
    /// An object this one refers to is missing or not ready.
    pub const DEPENDENCY_NOT_READY: &str = "DependencyNotReady";
    /// The spec cannot work as written; it must be changed.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// The file holding the object no longer loads; the last good version is in use.
    pub const STALE_SOURCE: &str = "StaleSource";
    /// Work is in progress.
    pub const PROGRESSING: &str = "Progressing";
    /// The object is suspended.
    pub const SUSPENDED: &str = "Suspended";
}

/// The kind of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum EventType {
    /// Routine progress.
    Normal,
    /// Something an operator may need to look at.
    Warning,
}

/// Something that happened to an object, kept in a bounded log per object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// `Normal` or `Warning`.
    #[serde(rename = "type")]
    pub type_: EventType,
    /// Why, in CamelCase.
    pub reason: String,
    /// The details for a person.
    pub message: String,
    /// When it happened.
    pub time: Timestamp,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(status: ConditionStatus, message: &str, at: u64) -> Condition {
        Condition {
            type_: condition_types::READY.into(),
            status,
            reason: reasons::SUCCEEDED.into(),
            message: message.into(),
            last_transition_time: Timestamp::from_unix(at),
            observed_generation: 1,
        }
    }

    #[test]
    fn setting_an_identical_condition_changes_nothing() {
        let mut conditions = vec![ready(ConditionStatus::True, "ok", 10)];
        assert!(!set_condition(
            &mut conditions,
            ready(ConditionStatus::True, "ok", 20)
        ));
        assert_eq!(conditions[0].last_transition_time, Timestamp::from_unix(10));
    }

    #[test]
    fn a_new_message_keeps_the_transition_time_but_a_new_status_moves_it() {
        let mut conditions = vec![ready(ConditionStatus::True, "ok", 10)];
        assert!(set_condition(
            &mut conditions,
            ready(ConditionStatus::True, "still ok", 20)
        ));
        assert_eq!(conditions[0].last_transition_time, Timestamp::from_unix(10));
        assert!(set_condition(
            &mut conditions,
            ready(ConditionStatus::False, "down", 30)
        ));
        assert_eq!(conditions[0].last_transition_time, Timestamp::from_unix(30));
        assert_eq!(conditions.len(), 1);
    }
}
