//! The controller's in-memory view: desired objects with their generations, and the status book that
//! keeps status and events in memory and persists them to the store in batches.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use tokio::sync::{mpsc, oneshot};

use crate::api::{Event, EventType, Kind, Object, ObjectKey, Timestamp};
use crate::load::Diagnostic;
use crate::source::set::{Merged, Owned};
use crate::source::{Snapshot, SourcedObject};
use crate::store::{MAX_EVENTS_PER_OBJECT, StatusJson, Store, StoreError, Write, canonical_hash};

/// One desired object as the runtime sees it.
#[derive(Debug, Clone)]
pub struct Desired {
    /// The object and where it came from.
    pub sourced: Arc<SourcedObject>,
    /// Its `metadata.generation`.
    pub generation: u64,
    /// The revision of its source's snapshot it was last seen in (a commit for git).
    pub revision: String,
    /// The name of the source that owns it.
    pub source: String,
    /// When the controller first saw it.
    pub created: Timestamp,
}

impl Desired {
    /// The object.
    pub fn object(&self) -> &Object {
        &self.sourced.loaded.object
    }
}

/// What applying a snapshot changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Objects that are new or whose spec changed.
    pub changed: Vec<ObjectKey>,
    /// Objects that left the snapshot and now need their cleanup.
    pub removed: Vec<ObjectKey>,
}

/// What is known of the last snapshot, for the API and metrics.
#[derive(Debug, Default, Clone)]
pub struct SourceState {
    /// Its revision.
    pub revision: String,
    /// Its problems.
    pub errors: Vec<Diagnostic>,
    /// Why the last load failed as a whole, if it did (the previous objects stay in force).
    pub failure: Option<String>,
    /// When it was applied.
    pub applied_at: Option<Timestamp>,
}

/// A removal held back by a prune guard, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PruneBlocked {
    /// `EmptySnapshot` or `NotADescendant`.
    pub reason: String,
    /// Why, and how to allow it.
    pub message: String,
    /// The objects kept (`Kind/name`).
    pub objects: Vec<String>,
}

/// One source's state, as the API and the CLI show it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceStatus {
    /// The source's name.
    pub name: String,
    /// `dir`, `git` or `api`.
    #[serde(rename = "type")]
    pub type_: String,
    /// Where it reads from (passwords hidden).
    pub location: String,
    /// Whether a complete snapshot has arrived.
    pub loaded: bool,
    /// The revision of the newest complete snapshot (the last fetched commit for git).
    pub revision: Option<String>,
    /// The newest revision applied in full, removals included.
    pub applied_revision: Option<String>,
    /// When the source was last fetched or read successfully.
    pub last_fetch_time: Option<String>,
    /// When it was last tried.
    pub last_attempt_time: Option<String>,
    /// Why the last fetch or load failed, if it did (the objects in force stay).
    pub last_error: Option<String>,
    /// The problems of the newest snapshot, as `FILE:LINE:COLUMN: ...` lines.
    pub errors: Vec<String>,
    /// How many objects it contributes.
    pub objects: usize,
    /// Removals held back, if any.
    pub prune_blocked: Option<PruneBlocked>,
    /// The token of the last on-demand fetch that was handled.
    pub last_handled_reconcile_at: Option<String>,
    /// Set when the source has not loaded successfully for more than three of its intervals (its
    /// objects in force stay, but edits are not picked up): why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale: Option<String>,
}

#[derive(Default)]
struct Inner {
    objects: BTreeMap<ObjectKey, Desired>,
    removing: BTreeMap<ObjectKey, Desired>,
    source: SourceState,
    sources: Vec<SourceStatus>,
    ready: bool,
}

/// The desired objects, updated from snapshots. Cheap to read from any task.
#[derive(Default)]
pub struct DesiredState {
    inner: RwLock<Inner>,
}

impl DesiredState {
    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies one source's snapshot as the whole desired state (a single unnamed source): records
    /// generations in the store and returns what changed. A failed snapshot changes nothing but the
    /// reported source state: it is never read as "everything was deleted".
    pub fn apply(&self, snapshot: &Snapshot, store: &Store) -> Result<Changes, StoreError> {
        if let Some(failure) = &snapshot.failure {
            self.write().source.failure = Some(failure.clone());
            return Ok(Changes::default());
        }
        let merged = Merged {
            objects: snapshot
                .objects
                .iter()
                .map(|(key, sourced)| {
                    let owned = Owned {
                        sourced: sourced.clone(),
                        source: String::new(),
                        revision: snapshot.revision.clone(),
                    };
                    (key.clone(), owned)
                })
                .collect(),
            errors: snapshot.errors.clone(),
            revision: snapshot.revision.clone(),
            held: Default::default(),
        };
        self.apply_merged(&merged, None, store)
    }

    /// Applies the merged objects of every source: records generations in the store and returns what
    /// changed. `failure` reports a source that failed as a whole (its objects stay in `merged`).
    pub fn apply_merged(
        &self,
        merged: &Merged,
        failure: Option<String>,
        store: &Store,
    ) -> Result<Changes, StoreError> {
        // An object the source handed over as the very same value as last time (an unchanged file's
        // objects are shared, not re-read) keeps its generation: only new or re-read objects are hashed
        // and looked up in the store, so an edit of one file among 10,000 costs that file's objects.
        let mut generations: BTreeMap<ObjectKey, u64> = BTreeMap::new();
        let mut hashes: Vec<(ObjectKey, String)> = Vec::new();
        {
            let inner = self.read();
            for (key, o) in &merged.objects {
                match inner.objects.get(key) {
                    Some(held) if Arc::ptr_eq(&held.sourced, &o.sourced) => {
                        generations.insert(key.clone(), held.generation);
                    }
                    _ => hashes.push((key.clone(), canonical_hash(&o.sourced.loaded.object.spec_json()))),
                }
            }
        }
        if !hashes.is_empty() {
            generations.extend(store.observe_specs(hashes.iter().map(|(k, h)| (k, h.clone())))?);
        }
        let mut inner = self.write();
        let mut changes = Changes::default();
        let mut next = BTreeMap::new();
        for (key, owned) in &merged.objects {
            let generation = generations.get(key).copied().unwrap_or(1);
            let previous = inner.objects.get(key).or_else(|| inner.removing.get(key));
            let created = previous.map_or_else(Timestamp::now, |p| p.created);
            if previous.is_none_or(|p| p.generation != generation) {
                changes.changed.push(key.clone());
            }
            next.insert(
                key.clone(),
                Desired {
                    sourced: owned.sourced.clone(),
                    generation,
                    revision: owned.revision.clone(),
                    source: owned.source.clone(),
                    created,
                },
            );
        }
        for (key, old) in std::mem::take(&mut inner.objects) {
            if !next.contains_key(&key) {
                changes.removed.push(key.clone());
                inner.removing.insert(key, old);
            }
        }
        inner.removing.retain(|key, _| !next.contains_key(key));
        inner.objects = next;
        inner.source = SourceState {
            revision: merged.revision.clone(),
            errors: merged.errors.clone(),
            failure,
            applied_at: Some(Timestamp::now()),
        };
        inner.ready = true;
        Ok(changes)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Replaces the sources' reported state.
    pub fn set_sources(&self, sources: Vec<SourceStatus>) {
        self.write().sources = sources;
    }

    /// Every source's state.
    pub fn sources(&self) -> Vec<SourceStatus> {
        self.read().sources.clone()
    }

    /// The name of the source that owns a desired object (or one being removed).
    pub fn owner(&self, key: &ObjectKey) -> Option<String> {
        let inner = self.read();
        inner
            .objects
            .get(key)
            .or_else(|| inner.removing.get(key))
            .map(|d| d.source.clone())
    }

    /// Whether a complete snapshot has been applied.
    pub fn is_ready(&self) -> bool {
        self.read().ready
    }

    /// A desired object.
    pub fn get(&self, key: &ObjectKey) -> Option<Desired> {
        self.read().objects.get(key).cloned()
    }

    /// An object that left the snapshot and whose cleanup has not finished.
    pub fn removing(&self, key: &ObjectKey) -> Option<Desired> {
        self.read().removing.get(key).cloned()
    }

    /// Marks an object's cleanup as done.
    pub fn finish_removal(&self, key: &ObjectKey) {
        self.inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .removing
            .remove(key);
    }

    /// The desired objects of one kind (or all), in key order.
    pub fn list(&self, kind: Option<Kind>) -> Vec<Desired> {
        self.read()
            .objects
            .iter()
            .filter(|(k, _)| kind.is_none_or(|kind| k.kind == kind))
            .map(|(_, d)| d.clone())
            .collect()
    }

    /// Every key, desired or being removed.
    pub fn keys(&self) -> Vec<ObjectKey> {
        let inner = self.read();
        inner
            .objects
            .keys()
            .chain(inner.removing.keys())
            .cloned()
            .collect()
    }

    /// The Deployments that refer to `key` (a RuntimeEnvironment or an Application): they are woken
    /// when it appears or changes.
    pub fn dependents(&self, key: &ObjectKey) -> Vec<ObjectKey> {
        let inner = self.read();
        inner
            .objects
            .iter()
            .filter_map(|(k, d)| match (d.object(), key.kind) {
                (Object::Deployment(dep), Kind::RuntimeEnvironment)
                    if dep.spec.runtime_environment == key.name =>
                {
                    Some(k.clone())
                }
                (Object::Deployment(dep), Kind::Application)
                    if dep.spec.applications.contains_key(&key.name) =>
                {
                    Some(k.clone())
                }
                _ => None,
            })
            .collect()
    }

    /// What is known of the last snapshot.
    pub fn source(&self) -> SourceState {
        self.read().source.clone()
    }
}

enum Message {
    Write(Write),
    Flush(oneshot::Sender<()>),
}

/// Status and events of every object, served from memory and persisted by a background writer that
/// commits everything pending in one transaction (one fsync per batch rather than per write).
pub struct StatusBook {
    /// Each status as its compact JSON text (parsed values took ten times the memory).
    statuses: RwLock<HashMap<ObjectKey, StatusJson>>,
    events: RwLock<HashMap<ObjectKey, VecDeque<Event>>>,
    requests: Mutex<HashMap<ObjectKey, String>>,
    next_request: AtomicU64,
    writes: mpsc::UnboundedSender<Message>,
}

impl StatusBook {
    /// Loads what the store holds and returns the book and its writer, which must be spawned.
    pub fn load(store: Arc<Store>) -> Result<(Arc<Self>, impl Future<Output = ()>), StoreError> {
        let parse = |id: &str| id.parse::<ObjectKey>().ok();
        let statuses = store
            .statuses()?
            .into_iter()
            .filter_map(|(id, v)| Some((parse(&id)?, v)))
            .collect();
        let mut events: HashMap<ObjectKey, VecDeque<Event>> = HashMap::new();
        for (id, event) in store.all_events()? {
            if let Some(key) = parse(&id) {
                events.entry(key).or_default().push_back(event);
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let book = Arc::new(Self {
            statuses: RwLock::new(statuses),
            events: RwLock::new(events),
            requests: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
            writes: tx,
        });
        Ok((book, write_batches(store, rx)))
    }

    /// Replaces what the book holds with what the store holds, without writing anything: a follower
    /// replica's view of the statuses and events its leader writes.
    pub fn reload(&self, store: &Store) -> Result<(), StoreError> {
        let parse = |id: &str| id.parse::<ObjectKey>().ok();
        let statuses: HashMap<ObjectKey, StatusJson> = store
            .statuses()?
            .into_iter()
            .filter_map(|(id, v)| Some((parse(&id)?, v)))
            .collect();
        let mut events: HashMap<ObjectKey, VecDeque<Event>> = HashMap::new();
        for (id, event) in store.all_events()? {
            if let Some(key) = parse(&id) {
                events.entry(key).or_default().push_back(event);
            }
        }
        *self
            .statuses
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = statuses;
        *self
            .events
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = events;
        Ok(())
    }

    /// An object's status.
    pub fn status(&self, key: &ObjectKey) -> Option<serde_json::Value> {
        self.status_json(key).map(|s| s.parse())
    }

    /// An object's status as its compact JSON text, shared, not copied.
    pub fn status_json(&self, key: &ObjectKey) -> Option<StatusJson> {
        self.statuses
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    /// Runs `f` on an object's status.
    pub fn with_status<T>(&self, key: &ObjectKey, f: impl FnOnce(Option<&serde_json::Value>) -> T) -> T {
        f(self.status(key).as_ref())
    }

    /// An object's status as `T` (its kind's status type), parsed from its text without building a
    /// `serde_json::Value`. A status that does not have `T`'s shape (written by an older version that
    /// stored something else) reads as `None`, so that the next write replaces it.
    pub fn typed_status<T: serde::de::DeserializeOwned>(&self, key: &ObjectKey) -> Option<T> {
        let text = self.status_json(key)?;
        let parsed = text.parse_as();
        if parsed.is_none() {
            tracing::warn!(object = %key, "the stored status does not have its kind's shape; it is rebuilt");
        }
        parsed
    }

    /// Sets an object's status from its typed value, serialized once; writes it only when it changed.
    /// Returns whether it changed.
    pub fn put_typed_status<T: serde::Serialize>(&self, key: &ObjectKey, status: &T) -> bool {
        self.put_status_json(key, StatusJson::from_typed(status))
    }

    /// Sets an object's status; writes it only when it changed. Returns whether it changed.
    pub fn put_status(&self, key: &ObjectKey, status: serde_json::Value) -> bool {
        self.put_status_json(key, StatusJson::from_value(&status))
    }

    fn put_status_json(&self, key: &ObjectKey, status: StatusJson) -> bool {
        let mut statuses = self
            .statuses
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if statuses.get(key) == Some(&status) {
            return false;
        }
        statuses.insert(key.clone(), status.clone());
        let _ = self
            .writes
            .send(Message::Write(Write::Status(key.clone(), status)));
        true
    }

    /// Records an event about an object.
    pub fn record(&self, key: &ObjectKey, type_: EventType, reason: &str, message: impl Into<String>) {
        let event = Event {
            type_,
            reason: reason.into(),
            message: message.into(),
            time: Timestamp::now(),
        };
        match type_ {
            EventType::Normal => tracing::info!(object = %key, reason, message = %event.message, "event"),
            EventType::Warning => tracing::warn!(object = %key, reason, message = %event.message, "event"),
        }
        {
            let mut events = self
                .events
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let log = events.entry(key.clone()).or_default();
            log.push_back(event.clone());
            while log.len() > MAX_EVENTS_PER_OBJECT {
                log.pop_front();
            }
        }
        let _ = self.writes.send(Message::Write(Write::Event(key.clone(), event)));
    }

    /// An object's events, oldest first.
    pub fn events(&self, key: &ObjectKey) -> Vec<Event> {
        let events = self
            .events
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        events
            .get(key)
            .map(|log| log.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Every object's events, oldest first overall.
    pub fn all_events(&self) -> Vec<(ObjectKey, Event)> {
        let events = self
            .events
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut all: Vec<(ObjectKey, Event)> = events
            .iter()
            .flat_map(|(k, log)| log.iter().map(|e| (k.clone(), e.clone())))
            .collect();
        all.sort_by(|a, b| a.1.time.cmp(&b.1.time).then_with(|| a.0.cmp(&b.0)));
        all
    }

    /// Drops an object's status and events, in memory and in the store (after its cleanup succeeded).
    pub fn forget(&self, key: &ObjectKey) {
        self.statuses
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
        self.events
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
        self.requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
        let _ = self.writes.send(Message::Write(Write::Forget(key.clone())));
    }

    /// Records a request for an immediate reconcile and returns its token, which the reconcile echoes
    /// into `status.lastHandledReconcileAt` once it has run.
    pub fn request_reconcile(&self, key: &ObjectKey) -> String {
        let n = self.next_request.fetch_add(1, Ordering::Relaxed);
        let token = format!("{}-{n}", Timestamp::now().unix());
        self.requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key.clone(), token.clone());
        token
    }

    /// The newest reconcile request for `key`, if any.
    pub fn pending_request(&self, key: &ObjectKey) -> Option<String> {
        self.requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    /// Waits until everything written so far is committed to the store.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.writes.send(Message::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// How long the writer waits after a first write for others to join its commit. Status and events are
/// served from memory and rebuilt by the next reconcile after a crash (what guards an external action,
/// such as a clone intent, is written directly, not here), so this costs no safety; it caps commits (and
/// fsyncs) at ~5/s, so that a paced pass over many objects commits a few large batches rather than a
/// small one every few milliseconds.
const BATCH_LINGER: std::time::Duration = std::time::Duration::from_millis(200);
/// Most writes committed in one transaction.
const MAX_BATCH: usize = 4096;

async fn write_batches(store: Arc<Store>, mut rx: mpsc::UnboundedReceiver<Message>) {
    while let Some(first) = rx.recv().await {
        // Let a burst gather (unless someone waits on a flush): one commit per burst, not per write.
        if !matches!(first, Message::Flush(_)) {
            tokio::time::sleep(BATCH_LINGER).await;
        }
        let mut batch = Vec::new();
        let mut flushes = Vec::new();
        let mut next = Some(first);
        while let Some(message) = next.take() {
            match message {
                Message::Write(write) => batch.push(write),
                Message::Flush(done) => flushes.push(done),
            }
            if batch.len() < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        // Of several statuses for one object, only the last needs writing.
        let mut last_status: HashMap<ObjectKey, usize> = HashMap::new();
        for (i, write) in batch.iter().enumerate() {
            if let Write::Status(key, _) = write {
                last_status.insert(key.clone(), i);
            }
        }
        let batch: Vec<Write> = batch
            .into_iter()
            .enumerate()
            .filter(|(i, w)| !matches!(w, Write::Status(key, _) if last_status.get(key) != Some(i)))
            .map(|(_, w)| w)
            .collect();
        let store = store.clone();
        let count = batch.len();
        match tokio::task::spawn_blocking(move || store.apply(&batch)).await {
            Ok(Ok(())) => tracing::trace!(count, "status batch committed"),
            Ok(Err(e)) => {
                tracing::error!(error = %e, count, "failed to persist status; it stays in memory and is rewritten on the next change")
            }
            Err(e) => tracing::error!(error = %e, "status writer task failed"),
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

impl crate::provider::Objects for DesiredState {
    fn object(&self, key: &ObjectKey) -> Option<Object> {
        self.get(key).map(|d| d.object().clone())
    }

    fn is_known(&self, key: &ObjectKey) -> bool {
        self.get(key).is_some() || self.removing(key).is_some()
    }
}

impl crate::provider::Recorder for StatusBook {
    fn event(&self, key: &ObjectKey, type_: EventType, reason: &str, message: String) {
        self.record(key, type_, reason, message);
    }
}
