//! Sources of desired state: each turns its input into whole, consistent [`Snapshot`]s.

pub mod api;
pub mod dir;
pub mod git;
pub mod set;
pub mod spec;

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::api::ObjectKey;
use crate::load::{Diagnostic, LoadedObject};

/// An object in a snapshot, with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct SourcedObject {
    /// The object and its file, document and line.
    pub loaded: LoadedObject,
    /// Whether this is the last good version of an object whose file no longer loads.
    pub stale: bool,
}

/// How a snapshot's revision relates to the last revision of its source that was applied in full.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Lineage {
    /// Revisions are not ordered (a content hash): every snapshot may follow any other.
    #[default]
    Unordered,
    /// Nothing of this source was applied before.
    First,
    /// The revision descends from (or equals) the last applied one.
    Descendant,
    /// The revision does not descend from the last applied one (a force-push, or another history).
    Unrelated {
        /// The last applied revision.
        applied: String,
    },
}

/// The whole desired state as one source sees it at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Identifies the content: a content hash for directories, a commit for git.
    pub revision: String,
    /// Every object, by kind and name. Objects from unchanged files are shared between snapshots.
    pub objects: BTreeMap<ObjectKey, Arc<SourcedObject>>,
    /// Every problem found (files that do not load, invalid objects, duplicates).
    pub errors: Vec<Diagnostic>,
    /// Set when the source as a whole failed (its folder is missing, say): such a snapshot must never
    /// be read as "everything was deleted".
    pub failure: Option<String>,
    /// How the revision relates to the last applied one (for the force-push guard).
    pub lineage: Lineage,
}

impl Snapshot {
    /// Whether the source loaded at all (individual files may still have errors).
    pub fn is_complete(&self) -> bool {
        self.failure.is_none()
    }

    /// A snapshot of a source that failed as a whole.
    pub fn failed(failure: impl Into<String>) -> Self {
        Self {
            failure: Some(failure.into()),
            ..Self::default()
        }
    }
}

/// The last revision of a source applied in full, shared between the set (which advances it) and a git
/// source (which checks that each new commit descends from it).
pub type Baseline = Arc<std::sync::Mutex<Option<String>>>;

/// What a fetch did, for the source's status and metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fetch {
    /// When it finished.
    pub at: crate::api::Timestamp,
    /// How long it took.
    pub seconds: f64,
    /// Whether it succeeded.
    pub ok: bool,
}

/// A message from a source to the daemon's feed.
#[derive(Debug, Default)]
pub struct Update {
    /// The source's index in the set.
    pub source: usize,
    /// A new snapshot, when there is one (a poll that found the same commit sends none).
    pub snapshot: Option<Arc<Snapshot>>,
    /// The fetch that produced it.
    pub fetch: Option<Fetch>,
    /// The on-demand request this answers, echoed into the source's status once applied.
    pub token: Option<String>,
    /// Signalled once the update is applied to the desired state.
    pub done: Option<tokio::sync::oneshot::Sender<()>>,
}
