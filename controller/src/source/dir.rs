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
/// Every how many periodic rescans one re-reads every file rather than only those whose size or
/// modification time changed.
const FULL_RESCAN_EVERY: u32 = 10;

/// Whether a path is one the source loads: `*.yaml` or `*.yml`.
fn is_yaml(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
}

fn is_hidden(name: &std::ffi::OsStr) -> bool {
    name.to_str().is_some_and(|n| n.starts_with('.'))
}

/// The deepest a folder is entered below a source root.
pub const MAX_DEPTH: usize = 32;

/// A path the walker found: a file to read, or one refused without reading it (and why).
pub type Found = (PathBuf, Option<String>);

/// Lists the YAML files under `root` (or `root` itself when it is not a folder), sorted, skipping hidden
/// files and folders. This is the one walker of the daemon and of `validate`; its rule:
///
/// - a root named by the operator is taken as given (a link to a folder or a file is followed);
/// - below the root, links to folders are never followed, a folder is entered at most once (by device and
///   inode, so a bind-mount loop ends too) and at most [`MAX_DEPTH`] levels deep: the walk never leaves the
///   root and always ends;
/// - a link to a file is read only when its target lies inside the root; one that points outside it is
///   refused (a repository must not make the controller read its host's files);
/// - a `*.yaml`/`*.yml` entry that is not a regular file (a dangling link, a FIFO, a device, a socket) is
///   listed all the same: reading it fails, which is a problem of that file that keeps its last good
///   objects, never a deletion. Such entries are never opened in a way that could block.
pub fn collect_files(root: &Path) -> std::io::Result<Vec<Found>> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(root)?;
    if !meta.is_dir() {
        return Ok(vec![(root.to_path_buf(), None)]);
    }
    let canonical_root = std::fs::canonicalize(root)?;
    let mut files = Vec::new();
    let mut visited = HashSet::from([(meta.dev(), meta.ino())]);
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if is_hidden(&entry.file_name()) {
                continue;
            }
            let path = entry.path();
            // The entry itself, links not followed.
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                let Ok(meta) = std::fs::symlink_metadata(&path) else {
                    continue;
                };
                if depth < MAX_DEPTH && visited.insert((meta.dev(), meta.ino())) {
                    stack.push((path, depth + 1));
                }
                continue;
            }
            if !is_yaml(&path) {
                continue;
            }
            if kind.is_symlink() {
                match std::fs::canonicalize(&path) {
                    // A link to a folder is never followed, whatever its name.
                    Ok(target) if target.is_dir() => continue,
                    Ok(target) if !target.starts_with(&canonical_root) => {
                        files.push((
                            path,
                            Some(
                                "this link points outside the source folder and is not followed; \
                                 copy the file into the folder instead"
                                    .to_owned(),
                            ),
                        ));
                        continue;
                    }
                    // Inside the root, or dangling (reading it reports that).
                    _ => {}
                }
            }
            files.push((path, None));
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
    loaded_at: Arc<AtomicU64>,
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
            loaded_at: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A counter of the scans this source has made (each a walk of its folders), shared with the caller.
    pub fn scan_counter(&self) -> Arc<AtomicU64> {
        self.scans.clone()
    }

    /// When a scan last completed, in seconds since the epoch (0: never), shared with whoever watches
    /// the source's health: a scan that no longer completes shows as this time growing old.
    pub fn loaded_at(&self) -> Arc<AtomicU64> {
        self.loaded_at.clone()
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
        let mut files: Vec<Found> = Vec::new();
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
        files.dedup_by(|a, b| a.0 == b.0);
        let present: HashSet<&PathBuf> = files.iter().map(|(path, _)| path).collect();
        self.cache.retain(|path, _| present.contains(path));
        for (file, refused) in &files {
            self.refresh(file, refused.as_deref(), full);
        }
        let files: Vec<PathBuf> = files.into_iter().map(|(path, _)| path).collect();
        let snapshot = self.assemble(&files);
        self.loaded_at
            .store(crate::api::Timestamp::now().unix(), Ordering::Relaxed);
        snapshot
    }

    fn refresh(&mut self, file: &Path, refused: Option<&str>, full: bool) {
        let stamp = std::fs::metadata(file)
            .map(|m| (m.len(), m.modified().ok()))
            .unwrap_or((0, None));
        if let Some(cached) = self.cache.get(file)
            && !full
            && refused.is_none()
            && cached.stamp == stamp
            && stamp.1.is_some()
        {
            return;
        }
        // Never more than one byte past the limit is read; anything but a regular file is refused.
        let read = match refused {
            Some(message) => Err(message.to_owned()),
            None => load::read_regular(file, self.limits.max_bytes),
        };
        let hash: [u8; 32] = match &read {
            Ok((bytes, size)) if bytes.len() > self.limits.max_bytes => {
                Sha256::digest(format!("{size} {stamp:?}")).into()
            }
            Ok((bytes, _)) => Sha256::digest(bytes).into(),
            Err(message) => Sha256::digest(format!("{message} {stamp:?}")).into(),
        };
        if let Some(cached) = self.cache.get_mut(file)
            && cached.hash == hash
            && read.is_ok()
        {
            cached.stamp = stamp;
            return;
        }
        let name = self.display_name(file);
        let load = match read {
            Ok((bytes, size)) => load::load_bytes(&name, bytes, size, &self.limits),
            Err(message) => load::unreadable_file(&name, message),
        };
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
            let mut rescans: u32 = 0;
            loop {
                let full = tokio::select! {
                    event = events.recv() => {
                        if event.is_none() { break; }
                        // Let the burst settle: wait until no event came for `debounce`.
                        while let Ok(Some(())) = tokio::time::timeout(debounce, events.recv()).await {}
                        false
                    }
                    // A periodic rescan looks at every file's size and modification time; every
                    // FULL_RESCAN_EVERY-th one re-reads every file too, for a change that kept both.
                    // Re-reading thousands of files each minute was most of an idle daemon's CPU.
                    _ = rescan_timer.tick() => {
                        rescans = rescans.wrapping_add(1);
                        rescans.is_multiple_of(FULL_RESCAN_EVERY)
                    }
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
