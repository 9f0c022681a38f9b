//! The directory source: a folder tree of YAML files, watched for changes, loaded incrementally.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::{Snapshot, SourcedObject};
use crate::api::ObjectKey;
use crate::load::{self, Diagnostic, FileLoad};
use crate::yaml::{FieldPath, Limits};

/// How long the source waits for a burst of file events to settle before it reloads (an editor's save is
/// often several events within a few milliseconds).
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(50);
/// How often everything is re-read even without change events, as a safety net for missed events
/// (network file systems, overflowing inotify queues).
pub const DEFAULT_RESCAN: Duration = Duration::from_secs(60);

/// Whether a path is one the source loads: `*.yaml` or `*.yml`.
fn is_yaml(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
}

fn is_hidden(name: &std::ffi::OsStr) -> bool {
    name.to_str().is_some_and(|n| n.starts_with('.'))
}

/// Lists the YAML files under `root` (or `root` itself when it is a file), sorted, skipping hidden files
/// and folders. A given file is taken whatever its name.
pub fn collect_files(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(root)?;
    if meta.is_file() {
        return Ok(vec![root.to_path_buf()]);
    }
    let mut files = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if is_hidden(&entry.file_name()) {
                continue;
            }
            let path = entry.path();
            // Follows links to files and folders, as `kubectl apply -R` does; loops end at the depth limit.
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                if path.components().count() < 64 {
                    stack.push(path);
                }
            } else if meta.is_file() && is_yaml(&path) {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// What the source remembers of one file between loads.
struct CachedFile {
    /// Size and modification time at the last read: when both are unchanged the file is not re-read.
    stamp: (u64, Option<SystemTime>),
    /// The content hash at the last read.
    hash: [u8; 32],
    /// The objects this file contributes now (fresh, or kept stale).
    objects: Vec<Arc<SourcedObject>>,
    /// The problems of the last read.
    problems: Vec<Diagnostic>,
}

/// Loads a set of files and folders into snapshots, re-reading only what changed.
pub struct DirSource {
    roots: Vec<PathBuf>,
    limits: Limits,
    cache: HashMap<PathBuf, CachedFile>,
    display_base: Option<PathBuf>,
    scans: Arc<AtomicU64>,
}

/// Whether a file-system event can change what the source loads. Reads and opens cannot: the scan itself
/// opens every watched folder, so treating them as changes would make each scan start the next one.
fn is_change(event: &notify::Event) -> bool {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode};
    match event.kind {
        // A file closed after writing is a finished save; every other access is someone reading.
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

impl DirSource {
    /// A source over `roots` (folders or single files).
    pub fn new(roots: Vec<PathBuf>, limits: Limits) -> Self {
        Self {
            roots,
            limits,
            cache: HashMap::new(),
            display_base: None,
            scans: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A counter of the scans this source has made (each a walk of its folders), shared with the caller.
    pub fn scan_counter(&self) -> Arc<AtomicU64> {
        self.scans.clone()
    }

    /// Names files relative to `base` in objects and problems (a git checkout names them as in the
    /// repository, not by where the checkout lies).
    pub fn with_display_base(mut self, base: PathBuf) -> Self {
        self.display_base = Some(base);
        self
    }

    fn display_name(&self, file: &Path) -> PathBuf {
        self.display_base
            .as_deref()
            .and_then(|base| file.strip_prefix(base).ok())
            .map_or_else(|| file.to_path_buf(), Path::to_path_buf)
    }

    /// Loads the current state. With `full`, every file is re-read; otherwise only files whose size or
    /// modification time changed (a file whose content is unchanged keeps its objects as they were).
    pub fn scan(&mut self, full: bool) -> Snapshot {
        self.scans.fetch_add(1, Ordering::Relaxed);
        let mut files = Vec::new();
        for root in &self.roots {
            match collect_files(root) {
                Ok(found) => files.extend(found),
                Err(e) => {
                    return Snapshot::failed(format!(
                        "cannot read {}: {e}",
                        self.display_name(root).display()
                    ));
                }
            }
        }
        files.sort();
        files.dedup();
        let present: HashSet<&PathBuf> = files.iter().collect();
        self.cache.retain(|path, _| present.contains(path));
        for file in &files {
            self.refresh(file, full);
        }
        self.assemble(&files)
    }

    fn refresh(&mut self, file: &Path, full: bool) {
        let stamp = std::fs::metadata(file)
            .map(|m| (m.len(), m.modified().ok()))
            .unwrap_or((0, None));
        if let Some(cached) = self.cache.get(file)
            && !full
            && cached.stamp == stamp
            && stamp.1.is_some()
        {
            return;
        }
        // An oversized file is never read whole: it is refused by `load_file`, which reads only up to the
        // limit. Its size and time stand in for its content hash.
        let bytes = if stamp.0 > self.limits.max_bytes as u64 {
            None
        } else {
            std::fs::read(file).ok()
        };
        let hash: [u8; 32] = match &bytes {
            Some(bytes) => Sha256::digest(bytes).into(),
            None => Sha256::digest(format!("{stamp:?}")).into(),
        };
        if let Some(cached) = self.cache.get_mut(file)
            && cached.hash == hash
            && bytes.is_some()
        {
            cached.stamp = stamp;
            return;
        }
        let name = self.display_name(file);
        let mut load = match bytes {
            Some(bytes) if bytes.len() <= self.limits.max_bytes => match String::from_utf8(bytes) {
                Ok(text) => load::load_text(&name, &text, &self.limits),
                Err(_) => load::load_file(file, &self.limits),
            },
            _ => load::load_file(file, &self.limits),
        };
        if name != file {
            for problem in &mut load.problems {
                problem.file.clone_from(&name);
            }
            for object in &mut load.objects {
                object.file.clone_from(&name);
            }
        }
        let previous = self.cache.remove(file);
        let entry = merge_with_previous(load, previous.map(|p| p.objects).unwrap_or_default(), stamp, hash);
        self.cache.insert(file.to_path_buf(), entry);
    }

    fn assemble(&self, files: &[PathBuf]) -> Snapshot {
        let mut objects: BTreeMap<ObjectKey, Arc<SourcedObject>> = BTreeMap::new();
        let mut errors = Vec::new();
        let mut revision = Sha256::new();
        for file in files {
            let Some(cached) = self.cache.get(file) else {
                continue;
            };
            revision.update(file.as_os_str().as_encoded_bytes());
            revision.update(cached.hash);
            errors.extend(cached.problems.iter().cloned());
            for object in &cached.objects {
                let key = object.loaded.object.key();
                match objects.get(&key) {
                    Some(first) => errors.push(Diagnostic {
                        file: object.loaded.file.clone(),
                        document: Some(object.loaded.document),
                        line: object.loaded.line,
                        column: 1,
                        path: Some(FieldPath::parse("metadata.name")),
                        message: format!(
                            "{key} is already defined in {}:{}; this definition is ignored (remove one)",
                            first.loaded.file.display(),
                            first.loaded.line
                        ),
                    }),
                    None => {
                        objects.insert(key, object.clone());
                    }
                }
            }
        }
        let digest = revision.finalize();
        let revision = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
        Snapshot {
            revision,
            objects,
            errors,
            ..Snapshot::default()
        }
    }

    /// Watches the roots and publishes a new snapshot whenever a change settles, and after every
    /// periodic rescan that finds something new. The first snapshot is published before this returns.
    pub fn watch(
        mut self,
        debounce: Duration,
        rescan: Duration,
    ) -> (watch::Receiver<Arc<Snapshot>>, tokio::task::JoinHandle<()>) {
        let first = Arc::new(self.scan(true));
        let (tx, rx) = watch::channel(first);
        let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel::<()>();
        let watcher = {
            use notify::Watcher;
            let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                // An error (an overflowing queue, say) may hide a change: rescan to be sure.
                let relevant = match &event {
                    Ok(event) => is_change(event),
                    Err(_) => true,
                };
                if relevant {
                    let _ = events_tx.send(());
                }
            });
            if let Ok(w) = watcher.as_mut() {
                for root in &self.roots {
                    if let Err(e) = w.watch(root, notify::RecursiveMode::Recursive) {
                        tracing::warn!(root = %root.display(), error = %e, "cannot watch for changes; relying on periodic rescans");
                    }
                }
            }
            watcher
        };
        let task = tokio::spawn(async move {
            let _watcher = watcher;
            let mut rescan_timer = tokio::time::interval(rescan);
            rescan_timer.tick().await;
            loop {
                let full = tokio::select! {
                    event = events.recv() => {
                        if event.is_none() { break; }
                        // Let the burst settle: wait until no event came for `debounce`.
                        while let Ok(Some(())) = tokio::time::timeout(debounce, events.recv()).await {}
                        false
                    }
                    _ = rescan_timer.tick() => true,
                    () = tx.closed() => break,
                };
                let scanned = tokio::task::spawn_blocking(move || {
                    let snapshot = self.scan(full);
                    (self, snapshot)
                })
                .await;
                let snapshot = match scanned {
                    Ok((source, snapshot)) => {
                        self = source;
                        snapshot
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "directory scan failed; the source stops publishing");
                        break;
                    }
                };
                let changed = {
                    let current = tx.borrow();
                    current.revision != snapshot.revision
                        || current.errors != snapshot.errors
                        || current.failure != snapshot.failure
                };
                if changed && tx.send(Arc::new(snapshot)).is_err() {
                    break;
                }
            }
        });
        (rx, task)
    }
}

/// Combines a new load of a file with the objects it contributed before: objects that can no longer be
/// read are kept, marked stale, so that a broken file never reads as a deletion.
fn merge_with_previous(
    load: FileLoad,
    previous: Vec<Arc<SourcedObject>>,
    stamp: (u64, Option<SystemTime>),
    hash: [u8; 32],
) -> CachedFile {
    let FileLoad {
        objects,
        mut problems,
        unreadable,
        broken,
    } = load;
    let fresh: Vec<Arc<SourcedObject>> = objects
        .into_iter()
        .map(|loaded| Arc::new(SourcedObject { loaded, stale: false }))
        .collect();
    let fresh_keys: HashSet<ObjectKey> = fresh.iter().map(|o| o.loaded.object.key()).collect();
    let unidentified = broken.iter().any(Option::is_none);
    let identified: HashSet<&ObjectKey> = broken.iter().flatten().collect();
    let mut kept = Vec::new();
    for old in previous {
        let key = old.loaded.object.key();
        if fresh_keys.contains(&key) {
            continue;
        }
        if unreadable || unidentified || identified.contains(&key) {
            kept.push(if old.stale {
                old
            } else {
                Arc::new(SourcedObject {
                    loaded: old.loaded.clone(),
                    stale: true,
                })
            });
        }
    }
    if !kept.is_empty()
        && let Some(first) = problems.first().cloned()
    {
        let names: Vec<String> = kept.iter().map(|o| o.loaded.object.key().to_string()).collect();
        problems.push(Diagnostic {
            message: format!(
                "keeping the last good version of {} until this file loads again",
                names.join(", ")
            ),
            path: None,
            document: None,
            ..first
        });
    }
    let mut objects = fresh;
    objects.extend(kept);
    CachedFile {
        stamp,
        hash,
        objects,
        problems,
    }
}
