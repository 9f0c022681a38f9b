//! The embedded store: one redb file under the state directory, every write an fsynced transaction.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{
    FILE_NAME, FORMAT_VERSION, MAX_EVENTS_PER_OBJECT, ObjectRecord, StatusJson, StoreError, Write, decode,
    encode,
};
use crate::api::{Event, ObjectKey, Timestamp};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");
const STATUS: TableDefinition<&str, &[u8]> = TableDefinition::new("status");
const EVENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("events");
const INVENTORY: TableDefinition<&str, &[u8]> = TableDefinition::new("inventory");

fn dberr<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Database(Box::new(e.into()))
}

/// The embedded redb store.
pub(super) struct Redb {
    db: Database,
    path: PathBuf,
    commits: prometheus::IntCounter,
}

impl std::fmt::Debug for Redb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redb").field("path", &self.path).finish()
    }
}

/// The page cache redb may hold in memory.
const CACHE_BYTES: usize = 16 << 20;

impl Redb {
    /// Opens (or creates) the store in `state_dir`.
    pub(super) fn open(state_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(state_dir).map_err(|source| StoreError::CreateDir {
            path: state_dir.into(),
            source,
        })?;
        let path = state_dir.join(FILE_NAME);
        // redb caches up to 1 GiB by default, which on a large installation would grow to hold the
        // whole file; reads here are few (start, copy), writes are batched, so a small cache costs nothing.
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| match e {
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
    pub(super) fn commit_counter(&self) -> prometheus::IntCounter {
        self.commits.clone()
    }

    fn commit(&self, txn: redb::WriteTransaction) -> Result<(), StoreError> {
        txn.commit().map_err(dberr)?;
        self.commits.inc();
        Ok(())
    }

    /// The store file.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Records the current spec hash of each object and returns each object's generation: 1 for a new
    /// object, one more than before for a changed spec, unchanged otherwise. One transaction for all.
    pub(super) fn observe_specs<'a>(
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
    pub(super) fn object(&self, key: &ObjectKey) -> Result<Option<ObjectRecord>, StoreError> {
        let id = key.to_string();
        let txn = self.db.begin_read().map_err(dberr)?;
        let table = txn.open_table(OBJECTS).map_err(dberr)?;
        let value = table.get(id.as_str()).map_err(dberr)?;
        value.map(|v| decode(&id, v.value())).transpose()
    }

    /// Every object the store knows, with its record.
    pub(super) fn objects(&self) -> Result<Vec<(String, ObjectRecord)>, StoreError> {
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
    pub(super) fn put_status<T: Serialize>(&self, key: &ObjectKey, status: &T) -> Result<bool, StoreError> {
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
    pub(super) fn status<T: for<'de> Deserialize<'de>>(
        &self,
        key: &ObjectKey,
    ) -> Result<Option<T>, StoreError> {
        let id = key.to_string();
        let txn = self.db.begin_read().map_err(dberr)?;
        let table = txn.open_table(STATUS).map_err(dberr)?;
        let value = table.get(id.as_str()).map_err(dberr)?;
        value.map(|v| decode(&id, v.value())).transpose()
    }

    /// An object's events, oldest first.
    pub(super) fn events(&self, key: &ObjectKey) -> Result<Vec<Event>, StoreError> {
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

    /// Applies many status, event and removal writes in one transaction (one fsync): the status
    /// writer's batches. Statuses are written as given (the caller has already compared them).
    pub(super) fn apply(&self, writes: &[Write]) -> Result<(), StoreError> {
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
                            .insert(id.as_str(), value.as_str().as_bytes())
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
    pub(super) fn statuses(&self) -> Result<Vec<(String, StatusJson)>, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let table = txn.open_table(STATUS).map_err(dberr)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(dberr)? {
            let (k, v) = entry.map_err(dberr)?;
            out.push((
                k.value().to_owned(),
                StatusJson::from_stored(k.value(), v.value())?,
            ));
        }
        Ok(out)
    }

    /// The newest events of every object, oldest first per object.
    pub(super) fn all_events(&self) -> Result<Vec<(String, Event)>, StoreError> {
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
    pub(super) fn put_inventory<T: Serialize>(&self, id: &str, entry: &T) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(dberr)?;
        txn.open_table(INVENTORY)
            .map_err(dberr)?
            .insert(id, encode(entry).as_slice())
            .map_err(dberr)?;
        self.commit(txn)
    }

    /// One inventory entry.
    pub(super) fn inventory<T: for<'de> Deserialize<'de>>(&self, id: &str) -> Result<Option<T>, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let table = txn.open_table(INVENTORY).map_err(dberr)?;
        let value = table.get(id).map_err(dberr)?;
        value.map(|v| decode(id, v.value())).transpose()
    }

    /// Every inventory entry whose id starts with `prefix`.
    pub(super) fn inventory_list<T: for<'de> Deserialize<'de>>(
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
    pub(super) fn remove_inventory(&self, id: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(dberr)?;
        txn.open_table(INVENTORY)
            .map_err(dberr)?
            .remove(id)
            .map_err(dberr)?;
        self.commit(txn)
    }

    /// Writes an inventory entry unless one exists; returns the entry the store then holds.
    pub(super) fn claim_inventory(&self, id: &str, entry: &[u8]) -> Result<Vec<u8>, StoreError> {
        let txn = self.db.begin_write().map_err(dberr)?;
        let held = {
            let mut table = txn.open_table(INVENTORY).map_err(dberr)?;
            let old = table.get(id).map_err(dberr)?.map(|v| v.value().to_vec());
            match old {
                Some(old) => old,
                None => {
                    table.insert(id, entry).map_err(dberr)?;
                    entry.to_vec()
                }
            }
        };
        self.commit(txn)?;
        Ok(held)
    }

    pub(super) fn dump(&self) -> Result<super::Dump, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let raw = |table: TableDefinition<&str, &[u8]>| -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            let table = txn.open_table(table).map_err(dberr)?;
            let mut out = Vec::new();
            for entry in table.iter().map_err(dberr)? {
                let (k, v) = entry.map_err(dberr)?;
                out.push((k.value().to_owned(), v.value().to_vec()));
            }
            Ok(out)
        };
        let mut dump = super::Dump {
            objects: raw(OBJECTS)?,
            statuses: raw(STATUS)?,
            inventory: raw(INVENTORY)?,
            events: Vec::new(),
        };
        let table = txn.open_table(EVENTS).map_err(dberr)?;
        for entry in table.iter().map_err(dberr)? {
            let (k, v) = entry.map_err(dberr)?;
            let (id, seq) = k.value();
            dump.events.push((id.to_owned(), seq, v.value().to_vec()));
        }
        Ok(dump)
    }

    pub(super) fn load_dump(&self, dump: &super::Dump) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(dberr)?;
        {
            for (table, rows) in [
                (OBJECTS, &dump.objects),
                (STATUS, &dump.statuses),
                (INVENTORY, &dump.inventory),
            ] {
                let mut table = txn.open_table(table).map_err(dberr)?;
                for (k, v) in rows {
                    table.insert(k.as_str(), v.as_slice()).map_err(dberr)?;
                }
            }
            let mut events = txn.open_table(EVENTS).map_err(dberr)?;
            for (id, seq, v) in &dump.events {
                events.insert((id.as_str(), *seq), v.as_slice()).map_err(dberr)?;
            }
        }
        self.commit(txn)
    }

    #[cfg(test)]
    pub(super) fn set_format_version(&self, version: u64) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(dberr)?;
        txn.open_table(META)
            .map_err(dberr)?
            .insert("format_version", version)
            .map_err(dberr)?;
        self.commit(txn)
    }
}
