//! Several named sources merged into one desired state: ownership per object, cross-source duplicates
//! reported on both sides, and the prune guards that hold back removals when a snapshot looks wrong.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::spec::Guards;
use super::{Lineage, Snapshot, SourcedObject};
use crate::api::ObjectKey;
use crate::load::Diagnostic;
use crate::yaml::FieldPath;

/// Why a snapshot's removals are held back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hold {
    /// The snapshot is empty while the source defined objects before.
    Empty {
        /// How many objects the source defined before.
        previous: usize,
    },
    /// The revision does not descend from the last applied one.
    Unrelated {
        /// The last applied revision.
        applied: String,
        /// The new revision.
        revision: String,
    },
}

impl Hold {
    /// A short CamelCase reason, for events and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Hold::Empty { .. } => "EmptySnapshot",
            Hold::Unrelated { .. } => "NotADescendant",
        }
    }
}

impl fmt::Display for Hold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hold::Empty { previous } => write!(
                f,
                "the source is empty while it defined {previous} object(s) before; nothing is removed \
                 (if removing everything is meant, allow it with the source option allowEmpty)"
            ),
            Hold::Unrelated { applied, revision } => write!(
                f,
                "commit {revision} does not descend from the last applied commit {applied} (a force-push or \
                 another history); nothing is removed (if this history is meant, allow it with the source \
                 option allowForcePush)"
            ),
        }
    }
}

/// Decides whether a complete snapshot's removals may go ahead: a pure function of how many objects the
/// source had, the snapshot, and the source's guards. `None` means removals may proceed.
pub fn guard(previous: usize, snapshot: &Snapshot, guards: Guards) -> Option<Hold> {
    if snapshot.objects.is_empty() && previous > 0 && !guards.allow_empty {
        return Some(Hold::Empty { previous });
    }
    if let Lineage::Unrelated { applied } = &snapshot.lineage
        && !guards.allow_force_push
    {
        return Some(Hold::Unrelated {
            applied: applied.clone(),
            revision: snapshot.revision.clone(),
        });
    }
    None
}

/// A desired object and the source that owns it.
#[derive(Debug, Clone)]
pub struct Owned {
    /// The object and where it was defined.
    pub sourced: Arc<SourcedObject>,
    /// The owning source's name.
    pub source: String,
    /// The revision of the source it was last seen in.
    pub revision: String,
}

/// What a source remembers across restarts (kept in the store).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// The last revision applied in full (the base of the force-push check).
    pub applied_revision: Option<String>,
    /// The objects the source defined (`Kind/name`), including any held back.
    pub objects: Vec<String>,
}

/// One source's state inside the set.
#[derive(Debug, Clone, Default)]
pub struct Member {
    /// The source's name.
    pub name: String,
    /// Its guards.
    pub guards: Guards,
    /// Whether a complete snapshot has arrived.
    pub loaded: bool,
    /// The revision of the newest complete snapshot.
    pub revision: Option<String>,
    /// The newest revision applied in full (removals included).
    pub applied_revision: Option<String>,
    /// Why the newest load failed as a whole, if it did.
    pub failure: Option<String>,
    /// The problems of the newest complete snapshot.
    pub errors: Vec<Diagnostic>,
    /// Objects also defined by another source.
    pub conflicts: Vec<Diagnostic>,
    /// Why removals are held back now, if they are.
    pub hold: Option<Hold>,
    /// The objects kept only because removals are held back.
    pub held: BTreeSet<ObjectKey>,
    effective: BTreeMap<ObjectKey, (Arc<SourcedObject>, String)>,
    remembered: BTreeSet<ObjectKey>,
}

impl Member {
    /// How many objects the source contributes now (held ones included).
    pub fn object_count(&self) -> usize {
        self.effective.len()
    }
}

/// Every object of every source, merged.
#[derive(Debug, Clone, Default)]
pub struct Merged {
    /// The objects, each with its owner.
    pub objects: BTreeMap<ObjectKey, Owned>,
    /// Every problem of every source, duplicates across sources included.
    pub errors: Vec<Diagnostic>,
    /// One revision for the whole: the source's own when there is one source, a hash otherwise.
    pub revision: String,
    /// Objects whose removal is held back (they must not be cleaned up).
    pub held: BTreeSet<ObjectKey>,
}

/// The named sources and what each contributes.
#[derive(Debug, Default)]
pub struct SourceSet {
    members: Vec<Member>,
    merged: BTreeMap<ObjectKey, Owned>,
}

impl SourceSet {
    /// A set of sources, each with its name, guards and what the store remembers of it.
    pub fn new(members: impl IntoIterator<Item = (String, Guards, Record)>) -> Self {
        let members = members
            .into_iter()
            .map(|(name, guards, record)| Member {
                name,
                guards,
                applied_revision: record.applied_revision,
                remembered: record.objects.iter().filter_map(|k| k.parse().ok()).collect(),
                ..Member::default()
            })
            .collect();
        Self {
            members,
            merged: BTreeMap::new(),
        }
    }

    /// The sources.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The index of a source by name.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.members.iter().position(|m| m.name == name)
    }

    /// Whether every source has delivered a complete snapshot.
    pub fn is_loaded(&self) -> bool {
        self.members.iter().all(|m| m.loaded)
    }

    /// Takes a source's new snapshot. Returns the objects whose removal became held back by this
    /// snapshot (for a `Warning` event each).
    pub fn update(&mut self, index: usize, snapshot: &Snapshot) -> Vec<ObjectKey> {
        let Some(member) = self.members.get_mut(index) else {
            return Vec::new();
        };
        if let Some(failure) = &snapshot.failure {
            member.failure = Some(failure.clone());
            return Vec::new();
        }
        member.failure = None;
        member.loaded = true;
        member.revision = Some(snapshot.revision.clone());
        member.errors = snapshot.errors.clone();
        let known: BTreeSet<&ObjectKey> = member.effective.keys().chain(&member.remembered).collect();
        let hold = guard(known.len(), snapshot, member.guards);
        let mut next: BTreeMap<ObjectKey, (Arc<SourcedObject>, String)> = snapshot
            .objects
            .iter()
            .map(|(k, o)| (k.clone(), (o.clone(), snapshot.revision.clone())))
            .collect();
        let mut kept = BTreeSet::new();
        if hold.is_some() {
            for (key, old) in &member.effective {
                if !next.contains_key(key) {
                    next.insert(key.clone(), old.clone());
                    kept.insert(key.clone());
                }
            }
            for key in &member.remembered {
                if !next.contains_key(key) {
                    kept.insert(key.clone());
                }
            }
        }
        let hold = if kept.is_empty() { None } else { hold };
        let newly: Vec<ObjectKey> = if hold != member.hold {
            kept.iter().cloned().collect()
        } else {
            kept.difference(&member.held).cloned().collect()
        };
        if hold.is_none() {
            member.applied_revision = Some(snapshot.revision.clone());
            member.remembered.clear();
        }
        member.effective = next;
        member.held = kept;
        member.hold = hold;
        newly
    }

    /// Merges every source's objects. A kind/name defined by two sources is an error on both, and
    /// neither definition wins: the version in force before stays (or, for a new object, none).
    pub fn merge(&mut self) -> Merged {
        let mut owners: BTreeMap<&ObjectKey, Vec<usize>> = BTreeMap::new();
        for (i, member) in self.members.iter().enumerate() {
            for key in member.effective.keys() {
                owners.entry(key).or_default().push(i);
            }
        }
        let mut conflicts: Vec<Vec<Diagnostic>> = vec![Vec::new(); self.members.len()];
        let mut objects = BTreeMap::new();
        for (key, list) in owners {
            if let [only] = list.as_slice() {
                let member = &self.members[*only];
                let (sourced, revision) = &member.effective[key];
                objects.insert(
                    key.clone(),
                    Owned {
                        sourced: sourced.clone(),
                        source: member.name.clone(),
                        revision: revision.clone(),
                    },
                );
                continue;
            }
            let kept = self.merged.get(key);
            for &i in &list {
                let here = &self.members[i].effective[key].0.loaded;
                let others: Vec<String> = list
                    .iter()
                    .filter(|&&j| j != i)
                    .map(|&j| {
                        let there = &self.members[j].effective[key].0.loaded;
                        format!(
                            "source `{}` ({}:{})",
                            self.members[j].name,
                            there.file.display(),
                            there.line
                        )
                    })
                    .collect();
                let outcome = match kept {
                    Some(k) => format!(
                        "the version from source `{}` applied before stays in force",
                        k.source
                    ),
                    None => "neither definition is applied".to_owned(),
                };
                conflicts[i].push(Diagnostic {
                    file: here.file.clone(),
                    document: Some(here.document),
                    line: here.line,
                    column: 1,
                    path: Some(FieldPath::parse("metadata.name")),
                    message: format!(
                        "{key} is also defined by {}; an object may come from one source only, remove one \
                         definition ({outcome})",
                        others.join(" and ")
                    ),
                });
            }
            if let Some(kept) = kept {
                objects.insert(key.clone(), kept.clone());
            }
        }
        let mut errors = Vec::new();
        let mut held = BTreeSet::new();
        let mut revision = Sha256::new();
        for (member, conflicts) in self.members.iter_mut().zip(conflicts) {
            member.conflicts = conflicts;
            errors.extend(member.errors.iter().cloned());
            errors.extend(member.conflicts.iter().cloned());
            held.extend(member.held.iter().cloned());
            revision.update(member.name.as_bytes());
            revision.update(b"=");
            revision.update(member.revision.as_deref().unwrap_or_default().as_bytes());
            revision.update(b";");
        }
        let revision = match self.members.as_slice() {
            [only] => only.revision.clone().unwrap_or_default(),
            _ => revision
                .finalize()
                .iter()
                .take(8)
                .map(|b| format!("{b:02x}"))
                .collect(),
        };
        self.merged = objects.clone();
        Merged {
            objects,
            errors,
            revision,
            held,
        }
    }

    /// What to remember of a source across restarts.
    pub fn record(&self, index: usize) -> Record {
        let member = &self.members[index];
        let mut objects: BTreeSet<String> = member.effective.keys().map(ToString::to_string).collect();
        objects.extend(member.held.iter().map(ToString::to_string));
        Record {
            applied_revision: member.applied_revision.clone(),
            objects: objects.into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Kind;

    fn snapshot(revision: &str, names: &[&str]) -> Snapshot {
        let mut objects = BTreeMap::new();
        for name in names {
            let text = format!(
                "apiVersion: fediversity.eu/v1alpha1\nkind: Application\nmetadata: {{name: {name}}}\n\
                 spec: {{displayName: X, nixosModule: m.nix, sizes: {{small: {{cores: 1, memoryMiB: 512, diskGiB: 1}}}}}}\n"
            );
            let load = crate::load::load_text(
                std::path::Path::new(&format!("{name}.yaml")),
                &text,
                &crate::yaml::Limits::default(),
            );
            assert!(load.problems.is_empty(), "{:?}", load.problems);
            for loaded in load.objects {
                objects.insert(
                    loaded.object.key(),
                    Arc::new(SourcedObject { loaded, stale: false }),
                );
            }
        }
        Snapshot {
            revision: revision.into(),
            objects,
            ..Snapshot::default()
        }
    }

    fn key(name: &str) -> ObjectKey {
        ObjectKey::new(Kind::Application, name)
    }

    fn one(guards: Guards) -> SourceSet {
        SourceSet::new([("ops".to_owned(), guards, Record::default())])
    }

    #[test]
    fn an_ordinary_snapshot_removes_what_it_no_longer_has() {
        let mut set = one(Guards::default());
        set.update(0, &snapshot("r1", &["a", "b"]));
        set.merge();
        assert!(set.update(0, &snapshot("r2", &["a"])).is_empty());
        let merged = set.merge();
        assert_eq!(merged.objects.keys().cloned().collect::<Vec<_>>(), vec![key("a")]);
        assert_eq!(merged.revision, "r2");
        assert_eq!(set.members()[0].applied_revision.as_deref(), Some("r2"));
    }

    #[test]
    fn a_failed_snapshot_changes_nothing_and_is_reported() {
        let mut set = one(Guards::default());
        set.update(0, &snapshot("r1", &["a"]));
        set.merge();
        set.update(0, &Snapshot::failed("cannot reach the remote"));
        let merged = set.merge();
        assert!(merged.objects.contains_key(&key("a")));
        assert_eq!(
            set.members()[0].failure.as_deref(),
            Some("cannot reach the remote")
        );
        set.update(0, &snapshot("r2", &["a"]));
        assert_eq!(set.members()[0].failure, None);
    }

    #[test]
    fn an_empty_snapshot_after_a_full_one_removes_nothing_unless_allowed() {
        let mut set = one(Guards::default());
        set.update(0, &snapshot("r1", &["a", "b"]));
        set.merge();
        let held = set.update(0, &snapshot("r2", &[]));
        assert_eq!(held, vec![key("a"), key("b")]);
        let merged = set.merge();
        assert_eq!(merged.objects.len(), 2);
        assert_eq!(merged.held.len(), 2);
        assert_eq!(set.members()[0].hold, Some(Hold::Empty { previous: 2 }));
        assert_eq!(set.members()[0].applied_revision.as_deref(), Some("r1"));
        // The same hold again raises no new events.
        assert!(set.update(0, &snapshot("r3", &[])).is_empty());

        let mut allowed = one(Guards {
            allow_empty: true,
            ..Guards::default()
        });
        allowed.update(0, &snapshot("r1", &["a"]));
        allowed.merge();
        assert!(allowed.update(0, &snapshot("r2", &[])).is_empty());
        assert!(allowed.merge().objects.is_empty());
    }

    #[test]
    fn an_unrelated_history_adds_and_changes_but_removes_nothing_unless_allowed() {
        let mut set = one(Guards::default());
        set.update(0, &snapshot("r1", &["a", "b"]));
        set.merge();
        let mut forced = snapshot("x9", &["a", "c"]);
        forced.lineage = Lineage::Unrelated { applied: "r1".into() };
        assert_eq!(set.update(0, &forced), vec![key("b")]);
        let merged = set.merge();
        assert_eq!(merged.objects.len(), 3, "b is kept, c is added");
        assert_eq!(merged.objects[&key("c")].revision, "x9");
        assert_eq!(merged.objects[&key("b")].revision, "r1");
        assert!(matches!(set.members()[0].hold, Some(Hold::Unrelated { .. })));
        assert!(
            set.members()[0]
                .hold
                .as_ref()
                .unwrap()
                .to_string()
                .contains("allowForcePush")
        );

        let mut allowed = one(Guards {
            allow_force_push: true,
            ..Guards::default()
        });
        allowed.update(0, &snapshot("r1", &["a", "b"]));
        allowed.merge();
        assert!(allowed.update(0, &forced).is_empty());
        assert_eq!(allowed.merge().objects.len(), 2);
        assert_eq!(allowed.members()[0].applied_revision.as_deref(), Some("x9"));
    }

    #[test]
    fn what_the_store_remembers_guards_the_first_snapshot_after_a_restart() {
        let record = Record {
            applied_revision: Some("r1".into()),
            objects: vec!["Application/a".into()],
        };
        let mut set = SourceSet::new([("ops".to_owned(), Guards::default(), record)]);
        assert_eq!(set.update(0, &snapshot("r2", &[])), vec![key("a")]);
        assert!(set.merge().held.contains(&key("a")));
        assert_eq!(set.record(0).objects, vec!["Application/a".to_owned()]);
    }

    #[test]
    fn an_object_defined_by_two_sources_is_an_error_on_both_and_neither_overrides() {
        let mut set = SourceSet::new([
            ("provider".to_owned(), Guards::default(), Record::default()),
            ("operators".to_owned(), Guards::default(), Record::default()),
        ]);
        set.update(0, &snapshot("p1", &["a", "shared"]));
        set.update(1, &snapshot("o1", &["b"]));
        let merged = set.merge();
        assert_eq!(merged.objects[&key("a")].source, "provider");
        assert!(set.is_loaded());
        // The second source now defines `shared` too: the provider's version stays, both get an error.
        set.update(1, &snapshot("o2", &["b", "shared"]));
        let merged = set.merge();
        assert_eq!(merged.objects[&key("shared")].source, "provider");
        for member in set.members() {
            assert_eq!(member.conflicts.len(), 1, "{}", member.name);
            assert!(member.conflicts[0].message.contains("one source only"));
        }
        assert_eq!(merged.errors.len(), 2);
        // A new object defined twice is applied from neither.
        let mut fresh = SourceSet::new([
            ("x".to_owned(), Guards::default(), Record::default()),
            ("y".to_owned(), Guards::default(), Record::default()),
        ]);
        fresh.update(0, &snapshot("1", &["dup"]));
        fresh.update(1, &snapshot("2", &["dup"]));
        assert!(fresh.merge().objects.is_empty());
    }

    #[test]
    fn the_set_is_loaded_only_when_every_source_delivered() {
        let mut set = SourceSet::new([
            ("x".to_owned(), Guards::default(), Record::default()),
            ("y".to_owned(), Guards::default(), Record::default()),
        ]);
        set.update(0, &snapshot("1", &["a"]));
        set.update(1, &Snapshot::failed("unreachable"));
        assert!(!set.is_loaded());
        set.update(1, &snapshot("2", &[]));
        assert!(set.is_loaded());
    }
}
