//! Sources of desired state: each turns its input into whole, consistent [`Snapshot`]s.

pub mod dir;

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
}

impl Snapshot {
    /// Whether the source loaded at all (individual files may still have errors).
    pub fn is_complete(&self) -> bool {
        self.failure.is_none()
    }
}
