//! The final copy's restore of only what changed: the snapshot's manifest is compared with what the
//! target already holds from the pre-copy, and only differing files are taken from the snapshot.

use std::time::Duration;

use crate::api::DataSpec;
use crate::backup::manifest::{self, DatabaseSums, Entry, FileManifest};
use crate::backup::script::{self, Layout};
use crate::backup::{BackupError, Repository, Shell};
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

fn fail(shell: &impl Shell, step: &'static str, out: &crate::nixos::command::Output) -> BackupError {
    if out.code == Some(script::EXIT_LOCKED) {
        return BackupError::Busy(shell.host_name().to_owned());
    }
    BackupError::Step {
        step,
        host: shell.host_name().to_owned(),
        code: out.code,
        stderr: crate::nixos::command::tail(&out.stderr),
    }
}

async fn run(
    shell: &impl Shell,
    step: &'static str,
    line: &str,
    timeout: Duration,
) -> Result<String, BackupError> {
    let out = shell.run(step, line, None, timeout).await?;
    if out.success() {
        Ok(out.stdout)
    } else {
        Err(fail(shell, step, &out))
    }
}

/// The target's live manifest (taken while the source's final backup runs).
pub async fn target_manifest(
    shell: &impl Shell,
    layout: &Layout,
    data: &DataSpec,
    timeout: Duration,
) -> Result<FileManifest, BackupError> {
    Ok(FileManifest::parse(
        &run(
            shell,
            "take the target's manifest",
            &script::live_manifest(layout, &data.paths),
            timeout,
        )
        .await?,
    )?)
}

/// Brings the target's data (held stopped, holding an earlier copy whose manifest is `have`) to
/// snapshot `id`, taking from the repository only what differs, restoring the databases from the
/// snapshot's dumps, and comparing the result with the snapshot's manifest. The secrets must have been
/// delivered; the caller cleans up.
pub async fn restore_changes(
    shell: &impl Shell,
    layout: &Layout,
    repo: &Repository,
    id: &str,
    data: &DataSpec,
    have: &FileManifest,
    timeout: Duration,
) -> Result<DeltaReport, BackupError> {
    let r = layout.restore();
    let prologue = script::prologue(layout, repo.access());
    let staging = layout.staging();
    run(
        shell,
        "unpack the snapshot's manifest and dumps",
        &format!(
            "{prologue}restic unlock >/dev/null 2>&1 || true; rm -rf {r}; mkdir -p {r}; {} >/dev/null",
            shell_words(&[
                "restic",
                "restore",
                id,
                "--target",
                &r,
                "--include",
                &include_pattern(&staging)
            ])
        ),
        timeout,
    )
    .await?;
    let want = FileManifest::parse(
        &run(
            shell,
            "read the snapshot's manifest",
            &script::restored_manifest(layout),
            timeout,
        )
        .await?,
    )?;
    let delta = plan(&want, have);
    for chunk in delta.fetch.chunks(CHUNK) {
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
        run(
            shell,
            "unpack the changed files",
            &format!("{prologue}{} >/dev/null", shell_words(&words)),
            timeout,
        )
        .await?;
    }
    let mut line = String::from("set -eu; ");
    for p in &delta.remove {
        line.push_str(&format!("rm -rf {}; ", shell_word(p)));
    }
    for (p, e) in &delta.folders {
        let p = shell_word(p);
        line.push_str(&format!(
            "mkdir -p {p}; chmod {} {p}; chown -h {} {p}; ",
            shell_word(&e.mode),
            shell_word(&e.owner)
        ));
    }
    for p in &delta.fetch {
        let to = shell_word(p);
        let from = shell_word(&format!("{r}{p}"));
        line.push_str(&format!(
            "mkdir -p \"$(dirname {to})\"; rm -rf {to}; mv {from} {to}; "
        ));
    }
    line.push_str("true");
    run(shell, "move the changed files into place", &line, timeout).await?;
    let mut differences = Vec::new();
    for db in &data.databases {
        let recorded = DatabaseSums::parse(
            &run(
                shell,
                "read a database's checksums",
                &script::restored_database_meta(layout, db),
                timeout,
            )
            .await?,
        )?;
        run(
            shell,
            "restore a database",
            &script::restore_database(layout, db, &recorded.meta),
            timeout,
        )
        .await?;
        let restored = DatabaseSums::parse(
            &run(
                shell,
                "checksum a restored database",
                &script::database_checksums(db),
                timeout,
            )
            .await?,
        )?;
        differences.extend(manifest::compare_database(db, &recorded, &restored));
    }
    let after = FileManifest::parse(
        &run(
            shell,
            "take the restored files' manifest",
            &script::live_manifest(layout, &data.paths),
            timeout,
        )
        .await?,
    )?;
    differences.extend(manifest::compare_files(&want, &after));
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
    fn include_patterns_match_only_the_path_itself() {
        assert_eq!(include_pattern("/a/b c.txt"), "/a/b c.txt");
        assert_eq!(include_pattern("/a/[x]*?\\"), "/a/\\[x]\\*\\?\\\\");
    }
}
