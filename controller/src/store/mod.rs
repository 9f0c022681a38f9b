//! The store: generations, status, events and the inventory, in embedded redb or in etcd.
//!
//! redb (the default) lives under the state directory; every write is one ACID transaction committed
//! with fsync, so the store survives `kill -9` at any moment. etcd holds the same records for several
//! replicas, and conditions the writes that guard external actions on leadership (see `crate::leader`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::api::{Event, ObjectKey, Timestamp};

mod embedded;
mod etcd;

pub use etcd::{EtcdConfig, EtcdTls, Fence, try_lead, unreachable};

/// The store format this build writes; a store written by a newer format is refused.
pub const FORMAT_VERSION: u64 = 1;
/// The file name of the store inside the state directory.
pub const FILE_NAME: &str = "state.redb";
/// Events kept per object; older ones are dropped (like Kubernetes' event TTL, but by count).
pub const MAX_EVENTS_PER_OBJECT: usize = 64;

/// A failure of the embedded store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The state directory cannot be created.
    #[error("failed to create the state directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another process holds the store.
    #[error("the store {0} is in use by another fediversity process; stop it or choose another --state-dir")]
    InUse(PathBuf),
    /// The store was written by a newer release.
    #[error(
        "the store {path} has format version {found}, newer than this release understands ({FORMAT_VERSION}); \
         run the newer release or restore a backup of the state directory"
    )]
    NewerFormat {
        /// The store file.
        path: PathBuf,
        /// The version found.
        found: u64,
    },
    /// The store URL or an etcd option is unusable.
    #[error("{0}")]
    Config(String),
    /// etcd refused or failed a call.
    #[error("etcd at {at} failed: {reason}; {hint}")]
    Etcd {
        /// The store URL.
        at: String,
        /// What failed, in etcd's or the connection's words.
        reason: String,
        /// What to check.
        hint: String,
    },
    /// etcd did not answer in time (a lost quorum looks like this).
    #[error("etcd at {at} did not answer within {seconds} s; check that a majority of its members is up")]
    EtcdTimeout {
        /// The store URL.
        at: String,
        /// The timeout.
        seconds: f64,
    },
    /// A write that guards an external action was refused: this replica does not hold leadership.
    #[error("this replica is not the leader (or could not renew its lease in time); it does not act")]
    NotLeader,
    /// A copy would mix two installations' records.
    #[error(
        "the store {at} already holds {records} records; copy only into an empty store (a new etcd prefix or state directory)"
    )]
    NotEmpty {
        /// The destination.
        at: String,
        /// How many records it holds.
        records: usize,
    },
    /// Other replicas kept changing the records this write read.
    #[error("the write kept conflicting with other replicas' writes; it is retried on the next change")]
    Contended,
    /// A database operation failed.
    #[error("store operation failed: {0}")]
    Database(#[source] Box<redb::Error>),
    /// The store's own metric cannot be made.
    #[error("cannot create the store's metric: {0}")]
    Metric(#[from] prometheus::Error),
    /// A stored value cannot be read back.
    #[error("stored value for {key} is unreadable: {source}")]
    Decode {
        /// The entry.
        key: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// A status as its compact JSON text: what the store keeps, and what the status book holds in memory
/// (a tenth of the size of a parsed `serde_json::Value`, and served as is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusJson(Arc<str>);

impl StatusJson {
    /// The compact text of `value`.
    pub fn from_value(value: &serde_json::Value) -> Self {
        Self(value.to_string().into())
    }

    /// The compact text of a typed status, serialized once.
    pub fn from_typed<T: serde::Serialize>(status: &T) -> Self {
        // A status type holds strings, numbers, lists and string-keyed maps only: it always serializes.
        Self(
            serde_json::to_string(status)
                .unwrap_or_else(|_| "{}".into())
                .into(),
        )
    }

    /// The status as `T`, parsed straight from the text; `None` if it does not have `T`'s shape.
    pub fn parse_as<T: serde::de::DeserializeOwned>(&self) -> Option<T> {
        serde_json::from_str(&self.0).ok()
    }

    /// Text read back from a store, checked to be JSON without building it.
    pub(crate) fn from_stored(key: &str, bytes: &[u8]) -> Result<Self, StoreError> {
        decode::<serde::de::IgnoredAny>(key, bytes)?;
        let text = std::str::from_utf8(bytes).map_err(|e| StoreError::Decode {
            key: key.into(),
            source: serde::de::Error::custom(e),
        })?;
        Ok(Self(text.into()))
    }

    /// The status, parsed.
    pub fn parse(&self) -> serde_json::Value {
        // Only ever built from a value or checked text.
        serde_json::from_str(&self.0).unwrap_or_default()
    }

    /// The compact JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One write of a batch given to [`Store::apply`].
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// Replace an object's status.
    Status(ObjectKey, StatusJson),
    /// Append an event to an object's log (ignored for objects the store does not track).
    Event(ObjectKey, Event),
    /// Remove an object's record, status and events.
    Forget(ObjectKey),
}

/// What the store keeps of each desired object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRecord {
    /// Increases by one whenever the spec changes; never moves otherwise.
    pub generation: u64,
    /// A hash of the spec in canonical form.
    pub spec_hash: String,
    /// When the object was first seen.
    pub created: Timestamp,
    /// The sequence number of its next event.
    #[serde(default)]
    pub next_event: u64,
}

/// A hash of a JSON value that does not depend on the order of object keys.
pub fn canonical_hash(value: &serde_json::Value) -> String {
    fn write(value: &serde_json::Value, out: &mut Sha256) {
        match value {
            serde_json::Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.update(b"{");
                for key in keys {
                    out.update(serde_json::to_string(key).unwrap_or_default().as_bytes());
                    out.update(b":");
                    write(&map[key], out);
                    out.update(b",");
                }
                out.update(b"}");
            }
            serde_json::Value::Array(items) => {
                out.update(b"[");
                for item in items {
                    write(item, out);
                    out.update(b",");
                }
                out.update(b"]");
            }
            scalar => out.update(scalar.to_string().as_bytes()),
        }
    }
    let mut hasher = Sha256::new();
    write(value, &mut hasher);
    hasher
        .finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub(crate) fn decode<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Decode {
        key: key.into(),
        source,
    })
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain data with string keys always serializes.
    serde_json::to_vec(value).unwrap_or_default()
}

/// Every record of a store as stored (JSON bytes), for moving an installation between stores.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Dump {
    /// Object records by object id.
    pub objects: Vec<(String, Vec<u8>)>,
    /// Statuses by object id.
    pub statuses: Vec<(String, Vec<u8>)>,
    /// Events by object id and sequence number.
    pub events: Vec<(String, u64, Vec<u8>)>,
    /// Inventory entries by id.
    pub inventory: Vec<(String, Vec<u8>)>,
}

impl Dump {
    /// The same records in one order whatever store they came from.
    pub fn sorted(mut self) -> Self {
        self.objects.sort();
        self.statuses.sort();
        self.events.sort();
        self.inventory.sort();
        self
    }

    /// How many records it holds.
    pub fn len(&self) -> usize {
        self.objects.len() + self.statuses.len() + self.events.len() + self.inventory.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Which engine holds the records.
enum Backend {
    /// The embedded redb file (one replica).
    Redb(embedded::Redb),
    /// An etcd cluster (one or more replicas).
    Etcd(Box<etcd::Etcd>),
}

/// The controller's durable memory: the embedded redb store by default, or etcd for several replicas.
/// Both keep the same records with the same meaning (the store contract).
pub struct Store {
    backend: Backend,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("at", &self.location()).finish()
    }
}

impl Store {
    /// Opens (or creates) the embedded store in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        Ok(Self {
            backend: Backend::Redb(embedded::Redb::open(state_dir)?),
        })
    }

    /// Connects to the etcd store `config` names (creating its format record on first use).
    pub fn open_etcd(config: &EtcdConfig) -> Result<Self, StoreError> {
        Ok(Self {
            backend: Backend::Etcd(Box::new(etcd::Etcd::open(config)?)),
        })
    }

    /// Where the records are: the redb file or the etcd URL (without credentials).
    pub fn location(&self) -> String {
        match &self.backend {
            Backend::Redb(s) => s.path().display().to_string(),
            Backend::Etcd(s) => s.config().display(),
        }
    }

    /// The etcd settings and a client per member, when the store is etcd.
    pub fn etcd(&self) -> Option<(EtcdConfig, Vec<etcd_client::Client>)> {
        match &self.backend {
            Backend::Redb(_) => None,
            Backend::Etcd(s) => Some((s.config().clone(), s.clients())),
        }
    }

    /// Makes writes that guard external actions need leadership (several replicas share the store).
    /// Only etcd stores can be shared; for redb this does nothing.
    pub fn require_leadership(&self) {
        if let Backend::Etcd(s) = &self.backend {
            s.set_fenced(true);
        }
    }

    /// Sets (or clears) the proof of leadership guarded writes are conditioned on.
    pub fn set_fence(&self, fence: Option<Fence>) {
        if let Backend::Etcd(s) = &self.backend {
            s.set_fence(fence);
        }
    }

    /// Whether this replica may act on external systems now: always for a store nobody else shares,
    /// else only while it holds a leadership it renewed recently enough.
    pub fn may_act(&self) -> bool {
        match &self.backend {
            Backend::Redb(_) => true,
            Backend::Etcd(s) => s.may_act(),
        }
    }

    /// The counter of write transactions committed since the store was opened, for the metrics registry.
    pub fn commit_counter(&self) -> prometheus::IntCounter {
        match &self.backend {
            Backend::Redb(s) => s.commit_counter(),
            Backend::Etcd(s) => s.commit_counter(),
        }
    }

    /// Records the current spec hash of each object and returns each object's generation: 1 for a new
    /// object, one more than before for a changed spec, unchanged otherwise. One transaction for all
    /// (with etcd: one per chunk, each conditioned on the records it read).
    pub fn observe_specs<'a>(
        &self,
        specs: impl IntoIterator<Item = (&'a ObjectKey, String)>,
    ) -> Result<BTreeMap<ObjectKey, u64>, StoreError> {
        match &self.backend {
            Backend::Redb(s) => s.observe_specs(specs),
            Backend::Etcd(s) => s.observe_specs(specs),
        }
    }

    /// What the store keeps of an object.
    pub fn object(&self, key: &ObjectKey) -> Result<Option<ObjectRecord>, StoreError> {
        match &self.backend {
            Backend::Redb(s) => s.object(key),
            Backend::Etcd(s) => s.object(key),
        }
    }

    /// Every object the store knows, with its record.
    pub fn objects(&self) -> Result<Vec<(String, ObjectRecord)>, StoreError> {
        match &self.backend {
            Backend::Redb(s) => s.objects(),
            Backend::Etcd(s) => s.objects(),
        }
    }

    /// Writes an object's status if it differs from the stored one; returns whether it wrote.
    pub fn put_status<T: Serialize>(&self, key: &ObjectKey, status: &T) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::Redb(s) => s.put_status(key, status),
            Backend::Etcd(s) => s.put_status(key, encode(status)),
        }
    }

    /// An object's status.
    pub fn status<T: for<'de> Deserialize<'de>>(&self, key: &ObjectKey) -> Result<Option<T>, StoreError> {
        match &self.backend {
            Backend::Redb(s) => s.status(key),
            Backend::Etcd(s) => s.status(key)?.map(|v| decode(&key.to_string(), &v)).transpose(),
        }
    }

    /// Appends an event to an object's log, dropping the oldest beyond [`MAX_EVENTS_PER_OBJECT`]. Events
    /// about an object the store does not track are dropped.
    pub fn record_event(&self, key: &ObjectKey, event: &Event) -> Result<(), StoreError> {
        self.apply(&[Write::Event(key.clone(), event.clone())])
    }

    /// An object's events, oldest first.
    pub fn events(&self, key: &ObjectKey) -> Result<Vec<Event>, StoreError> {
        match &self.backend {
            Backend::Redb(s) => s.events(key),
            Backend::Etcd(s) => s.events(key),
        }
    }

    /// Removes an object's record, status and events (after its cleanup succeeded).
    pub fn forget(&self, key: &ObjectKey) -> Result<(), StoreError> {
        self.apply(&[Write::Forget(key.clone())])
    }

    /// Applies many status, event and removal writes in one transaction (one fsync): the status
    /// writer's batches. Statuses are written as given (the caller has already compared them). With
    /// etcd, large batches take several transactions, each whole per object.
    pub fn apply(&self, writes: &[Write]) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Redb(s) => s.apply(writes),
            Backend::Etcd(s) => s.apply(writes),
        }
    }

    /// Every stored status, by object.
    pub fn statuses(&self) -> Result<Vec<(String, StatusJson)>, StoreError> {
        match &self.backend {
            Backend::Redb(s) => s.statuses(),
            Backend::Etcd(s) => s.statuses(),
        }
    }

    /// The newest events of every object, oldest first per object.
    pub fn all_events(&self) -> Result<Vec<(String, Event)>, StoreError> {
        match &self.backend {
            Backend::Redb(s) => s.all_events(),
            Backend::Etcd(s) => s.all_events(),
        }
    }

    /// Records (or replaces) an inventory entry: an external thing the controller created or is
    /// creating. When leadership is required, the write is conditioned on holding it (fencing) and
    /// fails with [`StoreError::NotLeader`] otherwise.
    pub fn put_inventory<T: Serialize>(&self, id: &str, entry: &T) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Redb(s) => s.put_inventory(id, entry),
            Backend::Etcd(s) => s.put_inventory(id, encode(entry)),
        }
    }

    /// Writes an inventory entry unless one exists (never conditioned on leadership); returns the
    /// entry the store then holds, so that every replica agrees on it.
    pub fn claim_inventory<T: Serialize + for<'de> Deserialize<'de>>(
        &self,
        id: &str,
        entry: &T,
    ) -> Result<T, StoreError> {
        let held = match &self.backend {
            Backend::Redb(s) => s.claim_inventory(id, &encode(entry))?,
            Backend::Etcd(s) => s.claim_inventory(id, encode(entry))?,
        };
        decode(id, &held)
    }

    /// One inventory entry.
    pub fn inventory<T: for<'de> Deserialize<'de>>(&self, id: &str) -> Result<Option<T>, StoreError> {
        match &self.backend {
            Backend::Redb(s) => s.inventory(id),
            Backend::Etcd(s) => s.inventory(id)?.map(|v| decode(id, &v)).transpose(),
        }
    }

    /// Every inventory entry whose id starts with `prefix`.
    pub fn inventory_list<T: for<'de> Deserialize<'de>>(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, T)>, StoreError> {
        match &self.backend {
            Backend::Redb(s) => s.inventory_list(prefix),
            Backend::Etcd(s) => s
                .inventory_list(prefix)?
                .into_iter()
                .map(|(k, v)| decode(&k, &v).map(|value| (k, value)))
                .collect(),
        }
    }

    /// Removes an inventory entry (after the external thing is gone); conditioned on leadership like
    /// [`Store::put_inventory`].
    pub fn remove_inventory(&self, id: &str) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Redb(s) => s.remove_inventory(id),
            Backend::Etcd(s) => s.remove_inventory(id),
        }
    }

    /// Every record, as stored.
    pub fn dump(&self) -> Result<Dump, StoreError> {
        match &self.backend {
            Backend::Redb(s) => s.dump(),
            Backend::Etcd(s) => s.dump(),
        }
    }

    /// Writes every record of `dump` into this store, which must hold nothing yet.
    pub fn load_dump(&self, dump: &Dump) -> Result<(), StoreError> {
        let held = self.dump()?.len();
        if held > 0 {
            return Err(StoreError::NotEmpty {
                at: self.location(),
                records: held,
            });
        }
        match &self.backend {
            Backend::Redb(s) => s.load_dump(dump),
            Backend::Etcd(s) => s.load_dump(dump),
        }
    }

    #[cfg(test)]
    fn set_format_version(&self, version: u64) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Redb(s) => s.set_format_version(version),
            Backend::Etcd(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{EventType, Kind};

    fn key(name: &str) -> ObjectKey {
        ObjectKey::new(Kind::Deployment, name)
    }

    #[test]
    fn a_status_kept_as_text_parses_back_equal_and_equal_statuses_have_equal_text() {
        let a = serde_json::json!({"b": [1, {"c": "d\"e"}], "a": null});
        let b = serde_json::json!({"a": null, "b": [1, {"c": "d\"e"}]});
        let text = StatusJson::from_value(&a);
        assert_eq!(text.parse(), a);
        assert_eq!(
            text,
            StatusJson::from_value(&b),
            "key order does not change the text"
        );
        assert_ne!(text, StatusJson::from_value(&serde_json::json!({"a": 1})));
    }

    #[test]
    fn a_stored_status_that_is_not_json_is_a_decode_error_naming_its_key() {
        assert_eq!(
            StatusJson::from_stored("Deployment/a", br#"{"ready":true}"#)
                .unwrap()
                .as_str(),
            r#"{"ready":true}"#
        );
        for bad in [&b"{\"ready\":"[..], b"\xff\xfe", b""] {
            let err = StatusJson::from_stored("Deployment/a", bad).unwrap_err();
            assert!(
                matches!(&err, StoreError::Decode { key, .. } if key == "Deployment/a"),
                "{err:?}"
            );
        }
    }

    #[test]
    fn generations_start_at_one_and_move_only_when_the_spec_changes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = key("a");
        assert_eq!(store.observe_specs([(&a, "h1".to_owned())]).unwrap()[&a], 1);
        assert_eq!(store.observe_specs([(&a, "h1".to_owned())]).unwrap()[&a], 1);
        assert_eq!(store.observe_specs([(&a, "h2".to_owned())]).unwrap()[&a], 2);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.observe_specs([(&a, "h2".to_owned())]).unwrap()[&a], 2);
        assert_eq!(store.object(&a).unwrap().unwrap().generation, 2);
    }

    #[test]
    fn status_is_written_only_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = key("a");
        let status = serde_json::json!({"observedGeneration": 1});
        assert!(store.put_status(&a, &status).unwrap());
        assert!(!store.put_status(&a, &status).unwrap());
        assert_eq!(store.status::<serde_json::Value>(&a).unwrap(), Some(status));
    }

    #[test]
    fn the_event_log_keeps_only_the_newest_events() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = key("a");
        store.observe_specs([(&a, "h".to_owned())]).unwrap();
        for i in 0..(MAX_EVENTS_PER_OBJECT + 10) {
            let event = Event {
                type_: EventType::Normal,
                reason: "Test".into(),
                message: format!("event {i}"),
                time: Timestamp::now(),
            };
            store.record_event(&a, &event).unwrap();
        }
        let events = store.events(&a).unwrap();
        assert_eq!(events.len(), MAX_EVENTS_PER_OBJECT);
        assert_eq!(events[0].message, "event 10");
        assert_eq!(
            events.last().unwrap().message,
            format!("event {}", MAX_EVENTS_PER_OBJECT + 9)
        );
        store.forget(&a).unwrap();
        assert!(store.events(&a).unwrap().is_empty());
        assert!(store.object(&a).unwrap().is_none());
    }

    #[test]
    fn a_store_of_a_newer_format_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        Store::open(dir.path())
            .unwrap()
            .set_format_version(FORMAT_VERSION + 1)
            .unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::NewerFormat { found, .. } if found == FORMAT_VERSION + 1));
        assert!(
            err.to_string().contains("newer than this release understands"),
            "{err}"
        );
    }

    #[test]
    fn inventory_entries_list_by_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .put_inventory("vm/env-a/20001", &serde_json::json!({"vmid": 20001}))
            .unwrap();
        store
            .put_inventory("vm/env-b/20002", &serde_json::json!({"vmid": 20002}))
            .unwrap();
        let listed: Vec<(String, serde_json::Value)> = store.inventory_list("vm/env-a/").unwrap();
        assert_eq!(listed.len(), 1);
        store.remove_inventory("vm/env-a/20001").unwrap();
        assert!(
            store
                .inventory::<serde_json::Value>("vm/env-a/20001")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn canonical_hashes_ignore_key_order() {
        let a: serde_json::Value = serde_json::from_str(r#"{"a":1,"b":{"c":[1,2],"d":null}}"#).unwrap();
        let b: serde_json::Value = serde_json::from_str(r#"{"b":{"d":null,"c":[1,2]},"a":1}"#).unwrap();
        assert_eq!(canonical_hash(&a), canonical_hash(&b));
        let c: serde_json::Value = serde_json::from_str(r#"{"a":1,"b":{"c":[2,1],"d":null}}"#).unwrap();
        assert_ne!(canonical_hash(&a), canonical_hash(&c));
    }
}
