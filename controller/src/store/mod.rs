//! The embedded store (redb) under the state directory: generations, status, events and the inventory.
//!
//! Every write is one ACID transaction committed with fsync, so the store survives `kill -9` at any
//! moment: after a restart each value is exactly as last committed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::api::{Event, ObjectKey, Timestamp};

/// The store format this build writes; a store written by a newer format is refused.
pub const FORMAT_VERSION: u64 = 1;
/// The file name of the store inside the state directory.
pub const FILE_NAME: &str = "state.redb";
/// Events kept per object; older ones are dropped (like Kubernetes' event TTL, but by count).
pub const MAX_EVENTS_PER_OBJECT: usize = 64;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");
const STATUS: TableDefinition<&str, &[u8]> = TableDefinition::new("status");
const EVENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("events");
const INVENTORY: TableDefinition<&str, &[u8]> = TableDefinition::new("inventory");

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

fn dberr<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Database(Box::new(e.into()))
}

/// One write of a batch given to [`Store::apply`].
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// Replace an object's status.
    Status(ObjectKey, serde_json::Value),
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

/// The controller's durable memory.
pub struct Store {
    db: Database,
    path: PathBuf,
    commits: prometheus::IntCounter,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Decode {
        key: key.into(),
        source,
    })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain data with string keys always serializes.
    serde_json::to_vec(value).unwrap_or_default()
}

impl Store {
    /// Opens (or creates) the store in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(state_dir).map_err(|source| StoreError::CreateDir {
            path: state_dir.into(),
            source,
        })?;
        let path = state_dir.join(FILE_NAME);
        let db = Database::create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse(path.clone()),
            other => dberr(other),
        })?;
        // A store that already has its format and every table is opened without a write: a restart
        // with nothing changed leaves the file as it was.
        let complete = {
            let txn = db.begin_read().map_err(dberr)?;
            let found = match txn.open_table(META) {
                Ok(meta) => meta.get("format_version").map_err(dberr)?.map(|v| v.value()),
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(dberr(e)),
            };
            if let Some(found) = found
                && found > FORMAT_VERSION
            {
                return Err(StoreError::NewerFormat { path, found });
            }
            found.is_some()
                && txn.open_table(OBJECTS).is_ok()
                && txn.open_table(STATUS).is_ok()
                && txn.open_table(EVENTS).is_ok()
                && txn.open_table(INVENTORY).is_ok()
        };
        if !complete {
            let txn = db.begin_write().map_err(dberr)?;
            {
                let mut meta = txn.open_table(META).map_err(dberr)?;
                if meta.get("format_version").map_err(dberr)?.is_none() {
                    meta.insert("format_version", FORMAT_VERSION).map_err(dberr)?;
                }
                txn.open_table(OBJECTS).map_err(dberr)?;
                txn.open_table(STATUS).map_err(dberr)?;
                txn.open_table(EVENTS).map_err(dberr)?;
                txn.open_table(INVENTORY).map_err(dberr)?;
            }
            txn.commit().map_err(dberr)?;
        }
        let commits = prometheus::IntCounter::new(
            "fediversity_store_commits_total",
            "Write transactions committed to the embedded store since start.",
        )?;
        Ok(Self { db, path, commits })
    }

    /// The counter of write transactions committed since the store was opened, for the metrics registry.
    pub fn commit_counter(&self) -> prometheus::IntCounter {
        self.commits.clone()
    }

    fn commit(&self, txn: redb::WriteTransaction) -> Result<(), StoreError> {
        txn.commit().map_err(dberr)?;
        self.commits.inc();
        Ok(())
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records the current spec hash of each object and returns each object's generation: 1 for a new
    /// object, one more than before for a changed spec, unchanged otherwise. One transaction for all.
    pub fn observe_specs<'a>(
        &self,
        specs: impl IntoIterator<Item = (&'a ObjectKey, String)>,
    ) -> Result<BTreeMap<ObjectKey, u64>, StoreError> {
        let txn = self.db.begin_write().map_err(dberr)?;
        let mut generations = BTreeMap::new();
        let mut wrote = false;
        {
            let mut table = txn.open_table(OBJECTS).map_err(dberr)?;
            for (key, spec_hash) in specs {
                let id = key.to_string();
                let old: Option<ObjectRecord> = match table.get(id.as_str()).map_err(dberr)? {
                    Some(bytes) => Some(decode(&id, bytes.value())?),
                    None => None,
                };
                let record = match old {
                    Some(old) if old.spec_hash == spec_hash => old,
                    Some(old) => ObjectRecord {
                        generation: old.generation + 1,
                        spec_hash,
                        ..old
                    },
                    None => ObjectRecord {
                        generation: 1,
                        spec_hash,
                        created: Timestamp::now(),
                        next_event: 0,
                    },
                };
                if table.get(id.as_str()).map_err(dberr)?.map(|b| b.value().to_vec()) != Some(encode(&record))
                {
                    table
                        .insert(id.as_str(), encode(&record).as_slice())
                        .map_err(dberr)?;
                    wrote = true;
                }
                generations.insert(key.clone(), record.generation);
            }
        }
        if wrote {
            self.commit(txn)?;
        } else {
            txn.abort().map_err(dberr)?;
        }
        Ok(generations)
    }

    /// What the store keeps of an object.
    pub fn object(&self, key: &ObjectKey) -> Result<Option<ObjectRecord>, StoreError> {
        let id = key.to_string();
        let txn = self.db.begin_read().map_err(dberr)?;
        let table = txn.open_table(OBJECTS).map_err(dberr)?;
        let value = table.get(id.as_str()).map_err(dberr)?;
        value.map(|v| decode(&id, v.value())).transpose()
    }

    /// Every object the store knows, with its record.
    pub fn objects(&self) -> Result<Vec<(String, ObjectRecord)>, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let table = txn.open_table(OBJECTS).map_err(dberr)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(dberr)? {
            let (k, v) = entry.map_err(dberr)?;
            out.push((k.value().to_owned(), decode(k.value(), v.value())?));
        }
        Ok(out)
    }

    /// Writes an object's status if it differs from the stored one; returns whether it wrote.
    pub fn put_status<T: Serialize>(&self, key: &ObjectKey, status: &T) -> Result<bool, StoreError> {
        let id = key.to_string();
        let bytes = encode(status);
        let txn = self.db.begin_write().map_err(dberr)?;
        let changed = {
            let mut table = txn.open_table(STATUS).map_err(dberr)?;
            let same = table
                .get(id.as_str())
                .map_err(dberr)?
                .is_some_and(|old| old.value() == bytes.as_slice());
            if !same {
                table.insert(id.as_str(), bytes.as_slice()).map_err(dberr)?;
            }
            !same
        };
        if changed {
            self.commit(txn)?;
        } else {
            txn.abort().map_err(dberr)?;
        }
        Ok(changed)
    }

    /// An object's status.
    pub fn status<T: for<'de> Deserialize<'de>>(&self, key: &ObjectKey) -> Result<Option<T>, StoreError> {
        let id = key.to_string();
        let txn = self.db.begin_read().map_err(dberr)?;
        let table = txn.open_table(STATUS).map_err(dberr)?;
        let value = table.get(id.as_str()).map_err(dberr)?;
        value.map(|v| decode(&id, v.value())).transpose()
    }

    /// Appends an event to an object's log, dropping the oldest beyond [`MAX_EVENTS_PER_OBJECT`]. Events
    /// about an object the store does not track are dropped.
    pub fn record_event(&self, key: &ObjectKey, event: &Event) -> Result<(), StoreError> {
        self.apply(&[Write::Event(key.clone(), event.clone())])
    }

    /// An object's events, oldest first.
    pub fn events(&self, key: &ObjectKey) -> Result<Vec<Event>, StoreError> {
        let id = key.to_string();
        let txn = self.db.begin_read().map_err(dberr)?;
        let table = txn.open_table(EVENTS).map_err(dberr)?;
        let mut out = Vec::new();
        for entry in table
            .range((id.as_str(), 0)..=(id.as_str(), u64::MAX))
            .map_err(dberr)?
        {
            let (_, v) = entry.map_err(dberr)?;
            out.push(decode(&id, v.value())?);
        }
        Ok(out)
    }

    /// Removes an object's record, status and events (after its cleanup succeeded).
    pub fn forget(&self, key: &ObjectKey) -> Result<(), StoreError> {
        self.apply(&[Write::Forget(key.clone())])
    }

    /// Applies many status, event and removal writes in one transaction (one fsync): the status
    /// writer's batches. Statuses are written as given (the caller has already compared them).
    pub fn apply(&self, writes: &[Write]) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(dberr)?;
        {
            let mut objects = txn.open_table(OBJECTS).map_err(dberr)?;
            let mut status = txn.open_table(STATUS).map_err(dberr)?;
            let mut events = txn.open_table(EVENTS).map_err(dberr)?;
            for write in writes {
                match write {
                    Write::Status(key, value) => {
                        let id = key.to_string();
                        status
                            .insert(id.as_str(), encode(value).as_slice())
                            .map_err(dberr)?;
                    }
                    Write::Event(key, event) => {
                        let id = key.to_string();
                        let record: Option<ObjectRecord> = match objects.get(id.as_str()).map_err(dberr)? {
                            Some(bytes) => Some(decode(&id, bytes.value())?),
                            None => None,
                        };
                        let Some(mut record) = record else { continue };
                        let seq = record.next_event;
                        record.next_event += 1;
                        objects
                            .insert(id.as_str(), encode(&record).as_slice())
                            .map_err(dberr)?;
                        events
                            .insert((id.as_str(), seq), encode(event).as_slice())
                            .map_err(dberr)?;
                        let keep_from = (seq + 1).saturating_sub(MAX_EVENTS_PER_OBJECT as u64);
                        if keep_from > 0 {
                            events
                                .retain_in((id.as_str(), 0)..(id.as_str(), keep_from), |_, _| false)
                                .map_err(dberr)?;
                        }
                    }
                    Write::Forget(key) => {
                        let id = key.to_string();
                        objects.remove(id.as_str()).map_err(dberr)?;
                        status.remove(id.as_str()).map_err(dberr)?;
                        events
                            .retain_in((id.as_str(), 0)..=(id.as_str(), u64::MAX), |_, _| false)
                            .map_err(dberr)?;
                    }
                }
            }
        }
        self.commit(txn)
    }

    /// Every stored status, by object.
    pub fn statuses(&self) -> Result<Vec<(String, serde_json::Value)>, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let table = txn.open_table(STATUS).map_err(dberr)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(dberr)? {
            let (k, v) = entry.map_err(dberr)?;
            out.push((k.value().to_owned(), decode(k.value(), v.value())?));
        }
        Ok(out)
    }

    /// The newest events of every object, oldest first per object.
    pub fn all_events(&self) -> Result<Vec<(String, Event)>, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let table = txn.open_table(EVENTS).map_err(dberr)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(dberr)? {
            let (k, v) = entry.map_err(dberr)?;
            let id = k.value().0.to_owned();
            let event = decode(&id, v.value())?;
            out.push((id, event));
        }
        Ok(out)
    }

    /// Records (or replaces) an inventory entry: an external thing the controller created or is creating.
    pub fn put_inventory<T: Serialize>(&self, id: &str, entry: &T) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(dberr)?;
        txn.open_table(INVENTORY)
            .map_err(dberr)?
            .insert(id, encode(entry).as_slice())
            .map_err(dberr)?;
        self.commit(txn)
    }

    /// One inventory entry.
    pub fn inventory<T: for<'de> Deserialize<'de>>(&self, id: &str) -> Result<Option<T>, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let table = txn.open_table(INVENTORY).map_err(dberr)?;
        let value = table.get(id).map_err(dberr)?;
        value.map(|v| decode(id, v.value())).transpose()
    }

    /// Every inventory entry whose id starts with `prefix`.
    pub fn inventory_list<T: for<'de> Deserialize<'de>>(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let table = txn.open_table(INVENTORY).map_err(dberr)?;
        let mut out = Vec::new();
        for entry in table.range(prefix..).map_err(dberr)? {
            let (k, v) = entry.map_err(dberr)?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push((k.value().to_owned(), decode(k.value(), v.value())?));
        }
        Ok(out)
    }

    /// Removes an inventory entry (after the external thing is gone).
    pub fn remove_inventory(&self, id: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(dberr)?;
        txn.open_table(INVENTORY)
            .map_err(dberr)?
            .remove(id)
            .map_err(dberr)?;
        self.commit(txn)
    }

    #[cfg(test)]
    fn set_format_version(&self, version: u64) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(dberr)?;
        txn.open_table(META)
            .map_err(dberr)?
            .insert("format_version", version)
            .map_err(dberr)?;
        self.commit(txn)
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
