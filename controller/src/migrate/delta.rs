//! The final copy's restore of only what changed: the snapshot's manifest is compared with what the
//! target already holds from the pre-copy, and only differing files are taken from the snapshot.

use crate::api::DataSpec;
use crate::backup::manifest::{self, DatabaseSums, Entry, FileManifest};
use crate::backup::script::{self, Layout};
use crate::backup::{BackupError, Backuper, Repository, Shell};
use crate::nixos::escape::{shell_word, shell_words};

/// Paths handed to one `restic restore` (its arguments stay far below the kernel's limit).
const CHUNK: usize = 200;

/// What the delta restore changed on the target.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeltaReport {
    /// Files and links taken from the snapshot.
    pub restored: usize,
    /// Entries removed because the source no longer has them.
    pub removed: usize,
    /// Differences left to the snapshot's manifest (empty: verified).
    pub differences: Vec<String>,
}

/// What must change on the target so that it holds `want`: files and links to take from the
/// snapshot, entries to remove (deepest first), folders to create or fix (shallowest first).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeltaPlan {
    /// Files and links to restore.
    pub fetch: Vec<String>,
    /// Entries to remove.
    pub remove: Vec<String>,
    /// Folders to create or give their mode and owner.
    pub folders: Vec<(String, Entry)>,
}

/// The plan (pure) from the snapshot's manifest `want` and the target's live manifest `have`.
pub fn plan(want: &FileManifest, have: &FileManifest) -> DeltaPlan {
    let mut out = DeltaPlan::default();
    for (path, entry) in &want.entries {
        let current = have.entries.get(path);
        if current == Some(entry) {
            continue;
        }
        if entry.kind == 'd' {
            out.folders.push((path.clone(), entry.clone()));
        } else {
            out.fetch.push(path.clone());
        }
    }
    for (path, entry) in &have.entries {
        let gone = match want.entries.get(path) {
            None => true,
            // A folder that became a file or link (or the other way) is removed first.
            Some(w) => (w.kind == 'd') != (entry.kind == 'd'),
        };
        if gone {
            out.remove.push(path.clone());
        }
    }
    out.remove.sort_by_key(|p| std::cmp::Reverse(p.len()));
    out.folders.sort_by_key(|(p, _)| p.len());
    out
}

/// A path as a restic `--include` pattern that matches only itself (glob characters escaped).
pub fn include_pattern(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if matches!(c, '\\' | '*' | '?' | '[') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Scripts stay below this many bytes (the kernel takes at most 128 KiB in one argument); a larger
/// delta is applied in several connections.
const SCRIPT_LIMIT: usize = 96 * 1024;

/// The target's live manifest (taken while the source's final backup runs), quick within `lineage`.
pub async fn target_manifest(
    shell: &impl Shell,
    backuper: &Backuper,
    data: &DataSpec,
    lineage: &str,
) -> Result<FileManifest, BackupError> {
    let out = backuper
        .run_remote(
            shell,
            "take the target's manifest",
            &script::live_manifest_in(backuper.layout(), &data.paths, Some(lineage)),
            None,
            false,
        )
        .await?;
    Ok(FileManifest::parse(&out.stdout)?)
}

/// The shell lines that apply `delta` from snapshot `id`: unpack the snapshot's staging folder and
/// the changed files (up to [`CHUNK`] paths a run; a stale lock is cleared when a run fails), then each
/// removal, folder and move, in order.
pub fn delta_lines(layout: &Layout, id: &str, delta: &DeltaPlan) -> Vec<String> {
    let r = layout.restore();
    let staging = layout.staging();
    let mut lines = vec![format!("rm -rf {r}; mkdir -p {r}; ")];
    let mut includes: Vec<&str> = vec![&staging];
    includes.extend(delta.fetch.iter().map(String::as_str));
    for chunk in includes.chunks(CHUNK) {
        let mut words = vec![
            "restic".to_owned(),
            "restore".into(),
            id.into(),
            "--target".into(),
            r.clone(),
        ];
        for p in chunk {
            words.push("--include".into());
            words.push(include_pattern(p));
        }
        let run = shell_words(&words);
        lines.push(format!(
            "if ! {run} >/dev/null 2>{d}/unpack.err; then restic unlock >/dev/null 2>&1 || true; {run} >/dev/null; fi; ",
            d = layout.dir
        ));
    }
    for p in &delta.remove {
        lines.push(format!("rm -rf {}; ", shell_word(p)));
    }
    for (p, e) in &delta.folders {
        let p = shell_word(p);
        lines.push(format!(
            "mkdir -p {p}; chmod {} {p}; chown -h {} {p}; ",
            shell_word(&e.mode),
            shell_word(&e.owner)
        ));
    }
    for p in &delta.fetch {
        let to = shell_word(p);
        let from = shell_word(&format!("{r}{p}"));
        lines.push(format!(
            "mkdir -p \"$(dirname {to})\"; rm -rf {to}; mv {from} {to}; "
        ));
    }
    lines
}

/// `lines` packed in order into as few scripts as possible, each starting with `prologue` and below
/// `limit` bytes (a line longer than that alone in its script).
pub fn pack(prologue: &str, lines: &[String], limit: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = prologue.to_owned();
    for line in lines {
        if current.len() > prologue.len() && current.len() + line.len() > limit {
            out.push(std::mem::replace(&mut current, prologue.to_owned()));
        }
        current.push_str(line);
    }
    out.push(current);
    out
}

/// Brings the target's data (held stopped, holding an earlier copy whose manifest is `have`) to
/// snapshot `id`, whose recorded manifest is `want` and databases' checksums `recorded`: takes from
/// the repository only what differs, restores the databases from the snapshot's dumps, and compares
/// the result with `want`, in one connection (more only for a delta too long for one script). The
/// secrets are delivered on the way; the work folders and secrets are removed when the last connection
/// ends (the caller cleans up after a failure).
#[allow(clippy::too_many_arguments)] // reason: the two sides of one comparison, each as it came
pub async fn restore_changes(
    shell: &impl Shell,
    backuper: &Backuper,
    repo: &Repository,
    id: &str,
    data: &DataSpec,
    want: &FileManifest,
    recorded: &[DatabaseSums],
    have: &FileManifest,
    lineage: &str,
) -> Result<DeltaReport, BackupError> {
    let layout = backuper.layout();
    let prologue = script::prologue(layout, repo.access());
    let delta = plan(want, have);
    let mut finish = String::new();
    for (db, sums) in data.databases.iter().zip(recorded) {
        finish.push_str(&script::restore_database(layout, db, &sums.meta));
        finish.push_str("; ");
    }
    finish.push_str(&script::live_state(
        layout,
        &data.paths,
        &data.databases,
        Some(lineage),
    ));
    let mut lines = delta_lines(layout, id, &delta);
    lines.push(finish);
    let scripts = pack(&prologue, &lines, SCRIPT_LIMIT);
    let last = scripts.len() - 1;
    let mut output = String::new();
    for (i, line) in scripts.iter().enumerate() {
        output = backuper
            .run_remote(
                shell,
                "restore the changes and the databases",
                line,
                (i == 0).then_some(repo),
                i == last,
            )
            .await?
            .stdout;
    }
    let (after, _, restored) = manifest::parse_state(&output, data.databases.len())?;
    let mut differences = Vec::new();
    for ((db, a), b) in data.databases.iter().zip(recorded).zip(&restored) {
        differences.extend(manifest::compare_database(db, a, b));
    }
    differences.extend(manifest::compare_files(want, &after));
    Ok(DeltaReport {
        restored: delta.fetch.len(),
        removed: delta.remove.len(),
        differences,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(sha: &str) -> Entry {
        Entry {
            kind: 'f',
            mode: "644".into(),
            owner: "root:root".into(),
            size: Some(1),
            sha256: Some(sha.into()),
            link: None,
        }
    }

    fn dir(mode: &str) -> Entry {
        Entry {
            kind: 'd',
            mode: mode.into(),
            owner: "root:root".into(),
            size: None,
            sha256: None,
            link: None,
        }
    }

    fn manifest(entries: &[(&str, Entry)]) -> FileManifest {
        FileManifest {
            entries: entries
                .iter()
                .map(|(p, e)| ((*p).to_owned(), e.clone()))
                .collect(),
        }
    }

    #[test]
    fn only_changed_and_new_files_are_fetched_and_vanished_ones_removed_deepest_first() {
        let have = manifest(&[
            ("/d", dir("755")),
            ("/d/same", file("a")),
            ("/d/changed", file("b")),
            ("/d/gone", dir("755")),
            ("/d/gone/x", file("c")),
            ("/d/now-a-file", dir("700")),
        ]);
        let want = manifest(&[
            ("/d", dir("750")),
            ("/d/same", file("a")),
            ("/d/changed", file("B")),
            ("/d/new", dir("700")),
            ("/d/new/y", file("d")),
            ("/d/now-a-file", file("e")),
        ]);
        let p = plan(&want, &have);
        assert_eq!(p.fetch, vec!["/d/changed", "/d/new/y", "/d/now-a-file"]);
        assert_eq!(p.remove, vec!["/d/now-a-file", "/d/gone/x", "/d/gone"]);
        assert_eq!(
            p.folders.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(),
            vec!["/d", "/d/new"]
        );
        assert_eq!(plan(&want, &want), DeltaPlan::default());
    }

    #[test]
    fn a_long_delta_is_packed_in_order_into_scripts_below_the_limit() {
        let lines: Vec<String> = (0..10).map(|i| format!("step {i}; ")).collect();
        let scripts = pack("P; ", &lines, 30);
        assert!(scripts.iter().all(|s| s.starts_with("P; ") && s.len() <= 30));
        let joined: String = scripts.iter().map(|s| &s[3..]).collect();
        assert_eq!(joined, lines.concat());
        assert_eq!(pack("P; ", &lines, 1 << 20).len(), 1);
        // A line longer than the limit still goes, alone.
        assert_eq!(pack("P; ", &["x".repeat(100)], 30).len(), 1);
    }

    #[test]
    fn the_final_copy_unpacks_the_staging_folder_with_the_changed_files() {
        let layout = Layout {
            dir: "/var/lib/fediversity-backup".into(),
        };
        let delta = DeltaPlan {
            fetch: vec!["/var/lib/app/a b".into()],
            remove: vec!["/var/lib/app/gone".into()],
            folders: vec![],
        };
        let lines = delta_lines(&layout, "abc", &delta);
        assert!(lines[1].contains(
            "restic restore abc --target /var/lib/fediversity-backup/restore --include /var/lib/fediversity-backup/staging --include '/var/lib/app/a b'"
        ));
        assert_eq!(lines[2], "rm -rf /var/lib/app/gone; ");
        assert!(
            lines[3]
                .ends_with("mv '/var/lib/fediversity-backup/restore/var/lib/app/a b' '/var/lib/app/a b'; ")
        );
    }

    #[test]
    fn include_patterns_match_only_the_path_itself() {
        assert_eq!(include_pattern("/a/b c.txt"), "/a/b c.txt");
        assert_eq!(include_pattern("/a/[x]*?\\"), "/a/\\[x]\\*\\?\\\\");
    }
}
