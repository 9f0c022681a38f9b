//! The etcd store: the embedded store's records under one key prefix of an etcd cluster, shared by replicas.
//!
//! Keys: `PREFIX meta/format_version`, `objects/ID`, `status/ID`, `events/ID#SEQ` (SEQ zero-padded so
//! keys sort by it), `inventory/ID`, and the leader key `leader`. Values are the same JSON as in redb.
//! Calls are synchronous like redb's: each runs on the store's own small runtime and the caller waits.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp,
};

use super::{
    FORMAT_VERSION, MAX_EVENTS_PER_OBJECT, ObjectRecord, StatusJson, StoreError, Write, decode, encode,
};
use crate::api::{Event, ObjectKey, Timestamp};

/// Most operations in one transaction (etcd refuses more than `--max-txn-ops`, 128 by default).
const MAX_TXN_OPS: usize = 120;
/// Most value bytes in one transaction (etcd refuses requests over `--max-request-bytes`, 1.5 MiB).
const MAX_TXN_BYTES: usize = 1 << 20;
/// Keys read per page of a range scan.
const PAGE: i64 = 1000;
/// How often a write that lost a race to another replica is recomputed and retried.
const RETRIES: usize = 8;
/// Inventory entries every replica keeps the same way (a source's last applied revision), written
/// without the leadership condition.
const UNFENCED_INVENTORY: &[&str] = &["source:"];

/// TLS settings for the etcd connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA certificate (PEM) that signed the members' certificates.
    pub ca: Option<PathBuf>,
    /// The client certificate (PEM), with `key`.
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub key: Option<PathBuf>,
}

/// Where and how to reach etcd: `etcd://HOST:PORT,HOST:PORT[/PREFIX]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `HOST:PORT` of each member.
    pub endpoints: Vec<String>,
    /// The key prefix every key lives under (ends with `/`).
    pub prefix: String,
    /// TLS (https endpoints) when set.
    pub tls: Option<EtcdTls>,
    /// The etcd user, with the file holding its password.
    pub user: Option<(String, PathBuf)>,
    /// Longest a single call may take before it fails (a lost quorum shows as this).
    pub timeout: Duration,
}

impl EtcdConfig {
    /// Reads `etcd://HOST:PORT,…[/PREFIX]` (prefix default `/fediversity/`).
    pub fn parse(url: &str) -> Result<Self, StoreError> {
        let bad = |why: &str| {
            StoreError::Config(format!(
                "{why} in the store URL {url:?}; expected etcd://HOST:PORT,HOST:PORT[/PREFIX]"
            ))
        };
        let rest = url
            .strip_prefix("etcd://")
            .ok_or_else(|| bad("no etcd:// scheme"))?;
        let (hosts, prefix) = match rest.split_once('/') {
            Some((hosts, prefix)) => (hosts, prefix),
            None => (rest, ""),
        };
        let endpoints: Vec<String> = hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(str::to_owned)
            .collect();
        if endpoints.is_empty() {
            return Err(bad("no endpoint"));
        }
        for endpoint in &endpoints {
            let ok = endpoint
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
                && endpoint
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-:[]_".contains(c));
            if !ok {
                return Err(bad(&format!("the endpoint {endpoint:?} is not HOST:PORT")));
            }
        }
        let prefix = prefix.trim_matches('/');
        if prefix.chars().any(|c| c.is_control() || c == '#') {
            return Err(bad("a control character or '#' in the prefix"));
        }
        let prefix = if prefix.is_empty() {
            "/fediversity/".to_owned()
        } else {
            format!("/{prefix}/")
        };
        Ok(Self {
            endpoints,
            prefix,
            tls: None,
            user: None,
            timeout: Duration::from_secs(5),
        })
    }

    /// The URL without credentials, for logs.
    pub fn display(&self) -> String {
        format!(
            "etcd://{}{}",
            self.endpoints.join(","),
            self.prefix.trim_end_matches('/')
        )
    }
}

/// Proof of leadership that guarded writes are conditioned on: the leader key and its create revision.
#[derive(Debug, Clone)]
pub struct Fence {
    /// The full leader key.
    pub key: Vec<u8>,
    /// Its create revision when this replica won (the fencing token).
    pub revision: i64,
    /// After this instant the replica no longer counts itself leader, renewed or not.
    pub valid_until: Instant,
}

/// The etcd backend.
pub(super) struct Etcd {
    /// One client per member; calls go to `current` and move on to the next member when it fails.
    clients: Vec<Client>,
    current: std::sync::atomic::AtomicUsize,
    runtime: Option<tokio::runtime::Runtime>,
    config: EtcdConfig,
    /// Whether guarded writes need a fence (several replicas); without, they are plain writes.
    fenced: std::sync::atomic::AtomicBool,
    fence: Mutex<Option<Fence>>,
    commits: prometheus::IntCounter,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("at", &self.config.display())
            .finish()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn read_file(what: &str, path: &PathBuf) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path)
        .map_err(|e| StoreError::Config(format!("cannot read the etcd {what} {}: {e}", path.display())))
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// One transaction being filled: compares, operations, value bytes, and the objects it writes.
type Batch = (Vec<Compare>, Vec<TxnOp>, usize, Vec<String>);

/// One key's value and modification revision.
type Entry = (Vec<u8>, Vec<u8>, i64);

async fn scan(mut client: Client, from: Vec<u8>, end: Vec<u8>) -> Result<Vec<Entry>, etcd_client::Error> {
    let mut out = Vec::new();
    let mut start = from;
    let mut revision = 0;
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let mut resp = client.get(start.clone(), Some(options)).await?;
        if revision == 0 {
            revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        }
        let more = resp.more();
        let kvs = resp.take_kvs();
        let Some(last) = kvs.last() else { break };
        start = last.key().to_vec();
        start.push(0);
        out.extend(
            kvs.into_iter()
                .map(|kv| (kv.key().to_vec(), kv.value().to_vec(), kv.mod_revision())),
        );
        if !more {
            break;
        }
    }
    Ok(out)
}

impl Etcd {
    pub(super) fn open(config: &EtcdConfig) -> Result<Self, StoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd-store")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Config(format!("cannot start the etcd client's runtime: {e}")))?;
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.timeout)
            .with_timeout(config.timeout)
            .with_keep_alive(Duration::from_secs(2), config.timeout);
        if let Some((user, file)) = &config.user {
            let password = String::from_utf8(read_file("password file", file)?).map_err(|_| {
                StoreError::Config(format!("the etcd password file {} is not UTF-8", file.display()))
            })?;
            options = options.with_user(user.clone(), password.trim().to_owned());
        }
        let scheme = if let Some(tls) = &config.tls {
            let mut t = etcd_client::TlsOptions::new();
            if let Some(ca) = &tls.ca {
                t = t.ca_certificate(etcd_client::Certificate::from_pem(read_file(
                    "CA certificate",
                    ca,
                )?));
            }
            match (&tls.cert, &tls.key) {
                (Some(cert), Some(key)) => {
                    t = t.identity(etcd_client::Identity::from_pem(
                        read_file("client certificate", cert)?,
                        read_file("client key", key)?,
                    ));
                }
                (None, None) => {}
                _ => {
                    return Err(StoreError::Config(
                        "an etcd client certificate needs its key, and a key its certificate".into(),
                    ));
                }
            }
            options = options.with_tls(t);
            "https"
        } else {
            "http"
        };
        // A client per member rather than one balanced over all: a dead member's connection errors would
        // otherwise reach every few calls; here a failing member is skipped until the others fail too.
        let endpoints: Vec<String> = config
            .endpoints
            .iter()
            .map(|e| format!("{scheme}://{e}"))
            .collect();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        runtime.spawn(async move {
            let mut clients = Vec::new();
            for endpoint in endpoints {
                match Client::connect([endpoint], Some(options.clone())).await {
                    Ok(c) => clients.push(c),
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
            }
            let _ = tx.send(Ok(clients));
        });
        let clients = wait(rx)
            .map_err(|_| StoreError::Config("the etcd client's runtime stopped".into()))?
            .map_err(|e| etcd_error(config, e))?;
        let commits = prometheus::IntCounter::new(
            "fediversity_store_commits_total",
            "Write transactions committed to the store since start.",
        )?;
        let store = Self {
            clients,
            current: std::sync::atomic::AtomicUsize::new(0),
            runtime: Some(runtime),
            config: config.clone(),
            fenced: std::sync::atomic::AtomicBool::new(false),
            fence: Mutex::new(None),
            commits,
        };
        // The format version is claimed once; a newer one is refused as with redb.
        let key = store.key("meta/format_version");
        let held = store.claim(key, FORMAT_VERSION.to_string().into_bytes())?;
        let found: u64 = String::from_utf8_lossy(&held).trim().parse().unwrap_or(u64::MAX);
        if found > FORMAT_VERSION {
            return Err(StoreError::NewerFormat {
                path: PathBuf::from(config.display()),
                found,
            });
        }
        Ok(store)
    }

    pub(super) fn config(&self) -> &EtcdConfig {
        &self.config
    }

    pub(super) fn clients(&self) -> Vec<Client> {
        self.clients.clone()
    }

    pub(super) fn commit_counter(&self) -> prometheus::IntCounter {
        self.commits.clone()
    }

    pub(super) fn set_fenced(&self, fenced: bool) {
        self.fenced.store(fenced, std::sync::atomic::Ordering::SeqCst);
    }

    pub(super) fn set_fence(&self, fence: Option<Fence>) {
        *self.fence.lock().unwrap_or_else(|p| p.into_inner()) = fence;
    }

    /// The compare guarded writes carry, or why this replica may not make them.
    fn guard(&self) -> Result<Option<Compare>, StoreError> {
        if !self.fenced.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(None);
        }
        let fence = self.fence.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match fence {
            Some(f) if Instant::now() < f.valid_until => Ok(Some(Compare::create_revision(
                f.key,
                CompareOp::Equal,
                f.revision,
            ))),
            _ => Err(StoreError::NotLeader),
        }
    }

    /// Whether this replica may act now (always without fencing).
    pub(super) fn may_act(&self) -> bool {
        self.guard().is_ok()
    }

    fn key(&self, rest: &str) -> Vec<u8> {
        format!("{}{rest}", self.config.prefix).into_bytes()
    }

    fn event_prefix(&self, id: &str) -> Vec<u8> {
        self.key(&format!("events/{id}#"))
    }

    /// Runs `f` on the store's runtime and waits for it, within the configured timeout; a member that
    /// cannot be reached is skipped for the next one.
    fn run<T, F>(&self, f: impl Fn(Client) -> F + Send + Sync + 'static) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        let timeout = self.config.timeout;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let Some(runtime) = &self.runtime else {
            return Err(StoreError::Config("the etcd client's runtime stopped".into()));
        };
        let clients = self.clients.clone();
        let first = self.current.load(std::sync::atomic::Ordering::Relaxed);
        let (used_tx, used_rx) = std::sync::mpsc::sync_channel(1);
        runtime.spawn(async move {
            let attempts = async {
                let mut last = None;
                for step in 0..clients.len() {
                    let index = (first + step) % clients.len();
                    match f(clients[index].clone()).await {
                        Err(e) if unreachable(&e) => last = Some(e),
                        other => {
                            let _ = used_tx.send(index);
                            return other;
                        }
                    }
                }
                Err(last.unwrap_or_else(|| etcd_client::Error::EndpointError("no endpoint".into())))
            };
            let _ = tx.send(tokio::time::timeout(timeout, attempts).await);
        });
        let result = wait(rx);
        if let Ok(index) = used_rx.try_recv() {
            self.current.store(index, std::sync::atomic::Ordering::Relaxed);
        }
        match result {
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(e))) => Err(etcd_error(&self.config, e)),
            Ok(Err(_)) => Err(StoreError::EtcdTimeout {
                at: self.config.display(),
                seconds: timeout.as_secs_f64(),
            }),
            Err(_) => Err(StoreError::Config("the etcd client's runtime stopped".into())),
        }
    }

    fn get(&self, key: Vec<u8>) -> Result<Option<(Vec<u8>, i64)>, StoreError> {
        self.run(move |mut c| {
            let key = key.clone();
            async move {
                let resp = c.get(key, None).await?;
                Ok(resp
                    .kvs()
                    .first()
                    .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
            }
        })
    }

    fn scan_prefix(&self, prefix: Vec<u8>) -> Result<Vec<Entry>, StoreError> {
        let end = prefix_end(&prefix);
        self.run(move |c| scan(c, prefix.clone(), end.clone()))
    }

    fn txn(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> Result<bool, StoreError> {
        let txn = Txn::new().when(compares).and_then(ops);
        let ok = self.run(move |mut c| {
            let txn = txn.clone();
            async move { Ok(c.txn(txn).await?.succeeded()) }
        })?;
        if ok {
            self.commits.inc();
        }
        Ok(ok)
    }

    /// Writes `value` at `key` unless the key exists; returns the value it then holds.
    fn claim(&self, key: Vec<u8>, value: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        let held = self.run(move |mut c| {
            let (key, value) = (key.clone(), value.clone());
            async move {
                let txn = Txn::new()
                    .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key.clone(), value.clone(), None)])
                    .or_else([TxnOp::get(key, None)]);
                let resp = c.txn(txn).await?;
                if resp.succeeded() {
                    return Ok(value);
                }
                for op in resp.op_responses() {
                    if let etcd_client::TxnOpResponse::Get(get) = op
                        && let Some(kv) = get.kvs().first()
                    {
                        return Ok(kv.value().to_vec());
                    }
                }
                Ok(value)
            }
        })?;
        self.commits.inc();
        Ok(held)
    }

    fn strip(&self, key: &[u8], table: &str) -> String {
        let skip = self.config.prefix.len() + table.len();
        String::from_utf8_lossy(key.get(skip..).unwrap_or_default()).into_owned()
    }

    pub(super) fn observe_specs<'a>(
        &self,
        specs: impl IntoIterator<Item = (&'a ObjectKey, String)>,
    ) -> Result<BTreeMap<ObjectKey, u64>, StoreError> {
        let specs: Vec<(&ObjectKey, String)> = specs.into_iter().collect();
        for _ in 0..RETRIES {
            let held: HashMap<String, (Vec<u8>, i64)> = self
                .scan_prefix(self.key("objects/"))?
                .into_iter()
                .map(|(k, v, rev)| (self.strip(&k, "objects/"), (v, rev)))
                .collect();
            let mut generations = BTreeMap::new();
            let mut writes = Vec::new();
            for (key, spec_hash) in &specs {
                let id = key.to_string();
                let old = held.get(&id);
                let old_record: Option<ObjectRecord> = old.map(|(v, _)| decode(&id, v)).transpose()?;
                let record = match old_record {
                    Some(old) if old.spec_hash == *spec_hash => old,
                    Some(old) => ObjectRecord {
                        generation: old.generation + 1,
                        spec_hash: spec_hash.clone(),
                        ..old
                    },
                    None => ObjectRecord {
                        generation: 1,
                        spec_hash: spec_hash.clone(),
                        created: Timestamp::now(),
                        next_event: 0,
                    },
                };
                let bytes = encode(&record);
                if old.map(|(v, _)| v) != Some(&bytes) {
                    let rev = old.map_or(0, |(_, rev)| *rev);
                    writes.push((self.key(&format!("objects/{id}")), bytes, rev));
                }
                generations.insert((*key).clone(), record.generation);
            }
            let mut lost = false;
            for chunk in writes.chunks(MAX_TXN_OPS / 2) {
                let compares: Vec<Compare> = chunk
                    .iter()
                    .map(|(k, _, rev)| Compare::mod_revision(k.clone(), CompareOp::Equal, *rev))
                    .collect();
                let ops: Vec<TxnOp> = chunk
                    .iter()
                    .map(|(k, v, _)| TxnOp::put(k.clone(), v.clone(), None))
                    .collect();
                if !self.txn(compares, ops)? {
                    lost = true;
                }
            }
            if !lost {
                return Ok(generations);
            }
        }
        Err(StoreError::Contended)
    }

    pub(super) fn object(&self, key: &ObjectKey) -> Result<Option<ObjectRecord>, StoreError> {
        let id = key.to_string();
        self.get(self.key(&format!("objects/{id}")))?
            .map(|(v, _)| decode(&id, &v))
            .transpose()
    }

    pub(super) fn objects(&self) -> Result<Vec<(String, ObjectRecord)>, StoreError> {
        self.scan_prefix(self.key("objects/"))?
            .into_iter()
            .map(|(k, v, _)| {
                let id = self.strip(&k, "objects/");
                let record = decode(&id, &v)?;
                Ok((id, record))
            })
            .collect()
    }

    pub(super) fn put_status(&self, key: &ObjectKey, bytes: Vec<u8>) -> Result<bool, StoreError> {
        let k = self.key(&format!("status/{key}"));
        if self.get(k.clone())?.is_some_and(|(old, _)| old == bytes) {
            return Ok(false);
        }
        self.txn(Vec::new(), vec![TxnOp::put(k, bytes, None)])?;
        Ok(true)
    }

    pub(super) fn status(&self, key: &ObjectKey) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.get(self.key(&format!("status/{key}")))?.map(|(v, _)| v))
    }

    pub(super) fn events(&self, key: &ObjectKey) -> Result<Vec<Event>, StoreError> {
        let id = key.to_string();
        self.scan_prefix(self.event_prefix(&id))?
            .into_iter()
            .map(|(_, v, _)| decode(&id, &v))
            .collect()
    }

    pub(super) fn apply(&self, writes: &[Write]) -> Result<(), StoreError> {
        // Per object, in order: the last status, the events since the last forget, whether it was forgotten.
        #[derive(Default)]
        struct Group {
            status: Option<Vec<u8>>,
            events: Vec<Vec<u8>>,
            forget: bool,
        }
        let mut groups: BTreeMap<String, Group> = BTreeMap::new();
        for write in writes {
            match write {
                Write::Status(key, value) => {
                    groups.entry(key.to_string()).or_default().status =
                        Some(value.as_str().as_bytes().to_vec());
                }
                Write::Event(key, event) => {
                    let group = groups.entry(key.to_string()).or_default();
                    // After a forget the object is untracked: its events are dropped, as in redb.
                    if !group.forget {
                        group.events.push(encode(event));
                    }
                }
                Write::Forget(key) => {
                    let group = groups.entry(key.to_string()).or_default();
                    *group = Group {
                        forget: true,
                        ..Group::default()
                    };
                }
            }
        }
        let mut pending: Vec<String> = groups.keys().cloned().collect();
        for _ in 0..RETRIES {
            // The records of objects that get events, read once per attempt.
            let mut batches: Vec<Batch> = vec![(Vec::new(), Vec::new(), 0, Vec::new())];
            for id in &pending {
                let group = &groups[id];
                let mut compares = Vec::new();
                let mut ops = Vec::new();
                let mut bytes = 0;
                let object_key = self.key(&format!("objects/{id}"));
                if group.forget {
                    ops.push(TxnOp::delete(object_key.clone(), None));
                    ops.push(TxnOp::delete(self.key(&format!("status/{id}")), None));
                    let prefix = self.event_prefix(id);
                    let end = prefix_end(&prefix);
                    ops.push(TxnOp::delete(prefix, Some(DeleteOptions::new().with_range(end))));
                }
                if let Some(status) = &group.status {
                    bytes += status.len();
                    ops.push(TxnOp::put(
                        self.key(&format!("status/{id}")),
                        status.clone(),
                        None,
                    ));
                }
                if !group.events.is_empty()
                    && let Some((value, rev)) = self.get(object_key.clone())?
                {
                    let mut record: ObjectRecord = decode(id, &value)?;
                    let skip = group.events.len().saturating_sub(MAX_EVENTS_PER_OBJECT);
                    record.next_event += skip as u64;
                    for event in &group.events[skip..] {
                        let seq = record.next_event;
                        record.next_event += 1;
                        bytes += event.len();
                        let mut key = self.event_prefix(id);
                        key.extend_from_slice(format!("{seq:020}").as_bytes());
                        ops.push(TxnOp::put(key, event.clone(), None));
                    }
                    let keep_from = record.next_event.saturating_sub(MAX_EVENTS_PER_OBJECT as u64);
                    if keep_from > 0 {
                        let prefix = self.event_prefix(id);
                        let mut end = prefix.clone();
                        end.extend_from_slice(format!("{keep_from:020}").as_bytes());
                        ops.push(TxnOp::delete(prefix, Some(DeleteOptions::new().with_range(end))));
                    }
                    compares.push(Compare::mod_revision(object_key.clone(), CompareOp::Equal, rev));
                    ops.push(TxnOp::put(object_key, encode(&record), None));
                }
                if ops.is_empty() {
                    continue;
                }
                let last = batches.last_mut().expect("at least one batch");
                if last.1.len() + ops.len() > MAX_TXN_OPS || last.2 + bytes > MAX_TXN_BYTES {
                    batches.push((Vec::new(), Vec::new(), 0, Vec::new()));
                }
                let last = batches.last_mut().expect("at least one batch");
                last.0.extend(compares);
                last.1.extend(ops);
                last.2 += bytes;
                last.3.push(id.clone());
            }
            let mut lost = Vec::new();
            for (compares, ops, _, ids) in batches {
                if ops.is_empty() {
                    continue;
                }
                if !self.txn(compares, ops)? {
                    lost.extend(ids);
                }
            }
            if lost.is_empty() {
                return Ok(());
            }
            pending = lost;
        }
        Err(StoreError::Contended)
    }

    pub(super) fn statuses(&self) -> Result<Vec<(String, StatusJson)>, StoreError> {
        self.scan_prefix(self.key("status/"))?
            .into_iter()
            .map(|(k, v, _)| {
                let id = self.strip(&k, "status/");
                let value = StatusJson::from_stored(&id, &v)?;
                Ok((id, value))
            })
            .collect()
    }

    pub(super) fn all_events(&self) -> Result<Vec<(String, Event)>, StoreError> {
        self.scan_prefix(self.key("events/"))?
            .into_iter()
            .map(|(k, v, _)| {
                let full = self.strip(&k, "events/");
                let id = full
                    .rsplit_once('#')
                    .map_or(full.as_str(), |(id, _)| id)
                    .to_owned();
                let event = decode(&id, &v)?;
                Ok((id, event))
            })
            .collect()
    }

    pub(super) fn dump(&self) -> Result<super::Dump, StoreError> {
        let raw = |table: &str| -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            Ok(self
                .scan_prefix(self.key(table))?
                .into_iter()
                .map(|(k, v, _)| (self.strip(&k, table), v))
                .collect())
        };
        let mut dump = super::Dump {
            objects: raw("objects/")?,
            statuses: raw("status/")?,
            inventory: raw("inventory/")?,
            events: Vec::new(),
        };
        for (key, value) in raw("events/")? {
            let Some((id, seq)) = key.rsplit_once('#') else {
                continue;
            };
            let Ok(seq) = seq.parse() else { continue };
            dump.events.push((id.to_owned(), seq, value));
        }
        Ok(dump)
    }

    pub(super) fn load_dump(&self, dump: &super::Dump) -> Result<(), StoreError> {
        let mut ops: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        for (table, rows) in [
            ("objects/", &dump.objects),
            ("status/", &dump.statuses),
            ("inventory/", &dump.inventory),
        ] {
            ops.extend(
                rows.iter()
                    .map(|(k, v)| (self.key(&format!("{table}{k}")), v.clone())),
            );
        }
        for (id, seq, v) in &dump.events {
            let mut key = self.event_prefix(id);
            key.extend_from_slice(format!("{seq:020}").as_bytes());
            ops.push((key, v.clone()));
        }
        let mut batch: Vec<TxnOp> = Vec::new();
        let mut bytes = 0;
        for (k, v) in ops {
            if batch.len() >= MAX_TXN_OPS || bytes + v.len() > MAX_TXN_BYTES {
                self.txn(Vec::new(), std::mem::take(&mut batch))?;
                bytes = 0;
            }
            bytes += v.len();
            batch.push(TxnOp::put(k, v, None));
        }
        if !batch.is_empty() {
            self.txn(Vec::new(), batch)?;
        }
        Ok(())
    }

    fn inventory_guard(&self, id: &str) -> Result<Option<Compare>, StoreError> {
        if UNFENCED_INVENTORY.iter().any(|p| id.starts_with(p)) {
            return Ok(None);
        }
        self.guard()
    }

    fn guarded(&self, id: &str, op: TxnOp) -> Result<(), StoreError> {
        let guard = self.inventory_guard(id)?;
        let fenced = guard.is_some();
        if !self.txn(guard.into_iter().collect(), vec![op])? && fenced {
            // The leader key is gone or belongs to another term: this replica no longer leads.
            self.set_fence(None);
            return Err(StoreError::NotLeader);
        }
        Ok(())
    }

    pub(super) fn put_inventory(&self, id: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        self.guarded(id, TxnOp::put(self.key(&format!("inventory/{id}")), bytes, None))
    }

    pub(super) fn inventory(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.get(self.key(&format!("inventory/{id}")))?.map(|(v, _)| v))
    }

    pub(super) fn inventory_list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Ok(self
            .scan_prefix(self.key(&format!("inventory/{prefix}")))?
            .into_iter()
            .map(|(k, v, _)| (self.strip(&k, "inventory/"), v))
            .collect())
    }

    pub(super) fn remove_inventory(&self, id: &str) -> Result<(), StoreError> {
        self.guarded(id, TxnOp::delete(self.key(&format!("inventory/{id}")), None))
    }

    pub(super) fn claim_inventory(&self, id: &str, bytes: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        self.claim(self.key(&format!("inventory/{id}")), bytes)
    }
}

/// Puts `value` at the leader key under `lease` if nobody holds it; returns the key's create
/// revision when this replica now holds it.
pub async fn try_lead(
    client: &mut Client,
    key: Vec<u8>,
    value: Vec<u8>,
    lease: i64,
) -> Result<Option<i64>, etcd_client::Error> {
    let txn = Txn::new()
        .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease)))]);
    let resp = client.txn(txn).await?;
    Ok(resp
        .succeeded()
        .then(|| resp.header().map(|h| h.revision()).unwrap_or(0)))
}

/// Whether `e` says the member could not be reached (so another member may answer).
pub fn unreachable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(status) => matches!(
            i32::from(status.code()),
            // gRPC's UNKNOWN, DEADLINE_EXCEEDED and UNAVAILABLE.
            2 | 4 | 14
        ),
        _ => false,
    }
}

/// Waits on a reply channel; inside a multi-threaded tokio runtime, tells it this thread blocks.
fn wait<T>(rx: std::sync::mpsc::Receiver<T>) -> Result<T, std::sync::mpsc::RecvError> {
    let multi = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi {
        tokio::task::block_in_place(|| rx.recv())
    } else {
        rx.recv()
    }
}

fn etcd_error(config: &EtcdConfig, e: etcd_client::Error) -> StoreError {
    // etcd's own words, then the innermost cause of a transport failure.
    let mut detail = match &e {
        etcd_client::Error::GRpcStatus(status) => status.message().to_owned(),
        other => other.to_string(),
    };
    // The transport failure under a gRPC status (a closed handshake, a refused connection).
    let mut cause: Option<&dyn std::error::Error> = match &e {
        etcd_client::Error::GRpcStatus(status) => std::error::Error::source(status),
        etcd_client::Error::TransportError(t) => std::error::Error::source(t),
        _ => None,
    };
    let mut innermost = None;
    while let Some(c) = cause {
        innermost = Some(c.to_string());
        cause = c.source();
    }
    if let Some(inner) = innermost.filter(|i| !detail.contains(i.as_str())) {
        detail = format!("{detail}: {inner}");
    }
    let (reason, hint) = explain(&detail, config);
    StoreError::Etcd {
        at: config.display(),
        reason,
        hint,
    }
}

/// What an etcd failure means for the operator and what to check, from its detail and the settings.
fn explain(detail: &str, config: &EtcdConfig) -> (String, String) {
    let lower = detail.to_ascii_lowercase();
    let user = config.user.as_ref().map_or("(none)", |(u, _)| u.as_str());
    let tls = config.tls.as_ref();
    let has_client_cert = tls.is_some_and(|t| t.cert.is_some());
    let closed = ["connection closed", "broken pipe", "canceled", "connection reset"]
        .iter()
        .any(|w| lower.contains(w));
    // Nobody answered at all: not a matter of certificates or users.
    let unanswered = ["connection refused", "timed out", "deadline", "no route"]
        .iter()
        .any(|w| lower.contains(w));
    if lower.contains("authentication failed") {
        (
            format!("etcd refused the user {user:?}: wrong user name or password"),
            "check --etcd-user and the password in --etcd-password-file".into(),
        )
    } else if lower.contains("user name is empty") {
        (
            "etcd requires a user name and password".into(),
            "give --etcd-user and --etcd-password-file".into(),
        )
    } else if lower.contains("permission denied") {
        (
            format!(
                "the etcd user {user:?} may not read or write under {}",
                config.prefix
            ),
            format!(
                "grant one of its roles readwrite on that prefix (etcdctl role grant-permission ROLE \
                 --prefix=true readwrite {})",
                config.prefix
            ),
        )
    } else if tls.is_some() && lower.contains("invalid peer certificate") {
        (
            format!("etcd's certificate is not accepted ({detail})"),
            "--etcd-ca must be the CA that signed the members' certificates, and each certificate must \
             name the endpoint's host or address"
                .into(),
        )
    } else if tls.is_some()
        && !unanswered
        && (closed || lower.contains("alert") || lower.contains("transport error"))
    {
        // etcd answered the handshake with an alert or by closing it: it refused this client.
        (
            format!("etcd closed the connection during the TLS handshake ({detail})"),
            if has_client_cert {
                "etcd probably refused this client certificate: --etcd-cert and --etcd-key must be \
                 signed by a CA in the members' --trusted-ca-file"
                    .into()
            } else {
                "the members probably require a client certificate: give --etcd-cert and --etcd-key".into()
            },
        )
    } else if tls.is_none() && !unanswered && (closed || lower.contains("transport error")) {
        (
            format!("the connection failed ({detail})"),
            "if the members serve https, give --etcd-ca (and --etcd-cert and --etcd-key when they \
             require client certificates); otherwise check that the cluster is reachable and has a quorum"
                .into(),
        )
    } else {
        (
            detail.to_owned(),
            "check that the cluster is reachable and has a quorum".into(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_url_names_every_member_and_a_prefix_that_defaults_to_fediversity() {
        let c = EtcdConfig::parse("etcd://10.0.0.1:2379, 10.0.0.2:2379,[::1]:2379/team/a/").unwrap();
        assert_eq!(c.endpoints, ["10.0.0.1:2379", "10.0.0.2:2379", "[::1]:2379"]);
        assert_eq!(c.prefix, "/team/a/");
        assert_eq!(
            c.display(),
            "etcd://10.0.0.1:2379,10.0.0.2:2379,[::1]:2379/team/a"
        );
        assert_eq!(EtcdConfig::parse("etcd://h:1").unwrap().prefix, "/fediversity/");
        let err = EtcdConfig::parse("etcd://h:99999").unwrap_err().to_string();
        assert!(err.contains("HOST:PORT") && err.contains("h:99999"), "{err}");
    }

    #[test]
    fn each_kind_of_refusal_is_explained_with_the_flag_to_check() {
        let plain = EtcdConfig::parse("etcd://h:1/p").unwrap();
        let mut with_user = plain.clone();
        with_user.user = Some(("ops".into(), PathBuf::from("/run/pw")));
        let mut with_cert = plain.clone();
        with_cert.tls = Some(EtcdTls {
            ca: Some("ca.pem".into()),
            cert: Some("c.pem".into()),
            key: Some("c.key".into()),
        });
        let mut ca_only = plain.clone();
        ca_only.tls = Some(EtcdTls {
            ca: Some("ca.pem".into()),
            ..EtcdTls::default()
        });
        let cases: [(&str, &EtcdConfig, &str, &str); 7] = [
            (
                "etcdserver: authentication failed, invalid user ID or password",
                &with_user,
                "refused the user \"ops\"",
                "--etcd-password-file",
            ),
            (
                "etcdserver: user name is empty",
                &plain,
                "requires a user",
                "--etcd-user",
            ),
            (
                "etcdserver: permission denied",
                &with_user,
                "under /p/",
                "grant-permission",
            ),
            (
                "invalid peer certificate: UnknownIssuer",
                &with_cert,
                "certificate is not accepted",
                "--etcd-ca",
            ),
            (
                "operation was canceled: connection closed",
                &with_cert,
                "TLS handshake",
                "--etcd-cert and --etcd-key must be",
            ),
            (
                "operation was canceled: connection closed",
                &ca_only,
                "TLS handshake",
                "give --etcd-cert",
            ),
            (
                "transport error: stream closed because of a broken pipe",
                &plain,
                "connection failed",
                "https",
            ),
        ];
        for (detail, config, reason, hint) in cases {
            let (r, h) = explain(detail, config);
            assert!(r.contains(reason), "{detail}: reason {r:?} lacks {reason:?}");
            assert!(h.contains(hint), "{detail}: hint {h:?} lacks {hint:?}");
        }
        for refused_cert in [
            "transport error",
            "transport error: received fatal alert: BadCertificate",
        ] {
            let (r, h) = explain(refused_cert, &with_cert);
            assert!(
                r.contains("TLS handshake") && h.contains("--etcd-cert"),
                "etcd refusing this client: {r}; {h}"
            );
        }
        let refused = "transport error: tcp connect error: Connection refused (os error 111)";
        for config in [&plain, &with_cert] {
            let (r, h) = explain(refused, config);
            assert!(
                !r.contains("TLS") && h.starts_with("check that the cluster is reachable"),
                "nobody answering is not a matter of TLS: {r}; {h}"
            );
        }
        let (_, h) = explain("deadline has elapsed", &with_cert);
        assert!(
            h.contains("quorum"),
            "an unclassified failure points at reachability: {h}"
        );
    }

    #[test]
    fn the_end_of_a_prefix_range_is_the_first_key_after_it() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b".to_vec());
        assert_eq!(prefix_end(&[0xff]), vec![0]);
    }
}
