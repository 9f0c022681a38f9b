//! The git source: fetches a branch with the system `git` into a cache under the state directory,
//! checks each new commit out atomically and loads it like a folder; the commit is the revision.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::dir::DirSource;
use super::spec::redact;
use super::{Baseline, Fetch, Lineage, Snapshot, Update};
use crate::api::Timestamp;
use crate::process::{self, CommandError, CommandSpec};
use crate::text::redact_words;
use crate::yaml::Limits;

/// The default poll interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);
/// Longest a single git command may run (a fetch over a slow link included).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// The ref the fetched branch is kept under in the cache.
const FETCHED_REF: &str = "refs/fediversity/fetched";
/// Longest error text kept from git's output.
const MAX_ERROR: usize = 600;

/// A failure of a git operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GitError {
    /// `git` could not be started.
    #[error("cannot run git: {0} (install git)")]
    Spawn(String),
    /// A git command failed.
    #[error("git {command} failed: {message}")]
    Command {
        /// The subcommand.
        command: String,
        /// git's own message (passwords hidden).
        message: String,
    },
    /// A git command ran too long.
    #[error("git {0} did not finish within {COMMAND_TIMEOUT:?}")]
    Timeout(String),
    /// The cache cannot be written.
    #[error("the cache {path} cannot be written: {message}")]
    Cache {
        /// The path.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

fn cache_error(path: &Path) -> impl Fn(std::io::Error) -> GitError + '_ {
    move |e| GitError::Cache {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// How a git source is set up.
#[derive(Debug, Clone)]
pub struct GitConfig {
    /// The source's name.
    pub name: String,
    /// The repository URL (`file://`, `ssh://`, `https://`).
    pub url: String,
    /// The branch, or the remote's default branch.
    pub branch: Option<String>,
    /// A folder inside the repository to load instead of the whole tree.
    pub path: Option<PathBuf>,
    /// Where the cache lives (one folder per source).
    pub cache: PathBuf,
    /// The ssh command git runs (`ssh` with options); `BatchMode=yes` is always added.
    pub ssh_command: String,
    /// Limits for the YAML files.
    pub limits: Limits,
}

/// A git repository followed at one branch.
pub struct GitSource {
    config: GitConfig,
    loader: Option<DirSource>,
}

/// The short form of a commit used in problem locations (`COMMIT:FILE:LINE:COLUMN`).
pub fn short(commit: &str) -> &str {
    commit.get(..12).unwrap_or(commit)
}

impl GitSource {
    /// A source over `config`; nothing is fetched yet.
    pub fn new(config: GitConfig) -> Self {
        let current = config.cache.join("current");
        let root = match &config.path {
            Some(path) => current.join(path),
            None => current.clone(),
        };
        let loader = DirSource::new(vec![root], config.limits).with_display_base(current);
        Self {
            config,
            loader: Some(loader),
        }
    }

    fn repo(&self) -> PathBuf {
        self.config.cache.join("repo.git")
    }

    /// The one place git runs: no prompts, ssh in batch mode, no inherited repository settings, a
    /// timeout, and passwords hidden in what it reports. Returns stdout.
    async fn git(
        &self,
        args: &[&str],
        index: Option<&Path>,
        work_tree: Option<&Path>,
    ) -> Result<String, GitError> {
        let command = args.first().copied().unwrap_or_default().to_owned();
        let utf8 = |path: &Path| {
            path.to_str().map(str::to_owned).ok_or_else(|| GitError::Cache {
                path: path.to_path_buf(),
                message: "the path is not valid UTF-8 (choose a state directory whose path is)".into(),
            })
        };
        let mut argv = vec![format!("--git-dir={}", utf8(&self.repo())?)];
        if let Some(work_tree) = work_tree {
            argv.push(format!("--work-tree={}", utf8(work_tree)?));
        }
        argv.extend(
            [
                "-c",
                "core.symlinks=false",
                "-c",
                "gc.auto=0",
                "-c",
                "core.hooksPath=/dev/null",
            ]
            .map(str::to_owned),
        );
        argv.extend(args.iter().map(|a| (*a).to_owned()));
        let mut spec = CommandSpec::new("git", argv, COMMAND_TIMEOUT)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env(
                "GIT_SSH_COMMAND",
                &format!(
                    "{} -o BatchMode=yes -o ConnectTimeout=15",
                    self.config.ssh_command
                ),
            )
            .env("LC_ALL", "C");
        spec.current_dir = Some(self.config.cache.clone());
        spec.env_remove = [
            "GIT_DIR",
            "GIT_WORK_TREE",
            "GIT_INDEX_FILE",
            "GIT_ASKPASS",
            "SSH_ASKPASS",
            "GIT_SSH",
            "GIT_OBJECT_DIRECTORY",
            "GIT_ALTERNATE_OBJECT_DIRECTORIES",
        ]
        .map(str::to_owned)
        .to_vec();
        if let Some(index) = index {
            spec = spec.env("GIT_INDEX_FILE", &utf8(index)?);
        }
        let output = process::run(&spec).await.map_err(|e| match e {
            CommandError::TimedOut { .. } => GitError::Timeout(command.clone()),
            other => GitError::Spawn(other.to_string()),
        })?;
        if output.success() {
            return Ok(output.stdout.trim().to_owned());
        }
        let stderr = output.stderr;
        let mut message: String = stderr
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(redact_words)
            .collect::<Vec<_>>()
            .join("; ");
        if message.is_empty() {
            message = format!("exit status {}", output.code.unwrap_or(-1));
        }
        if message.len() > MAX_ERROR {
            let cut = (0..=MAX_ERROR)
                .rev()
                .find(|&i| message.is_char_boundary(i))
                .unwrap_or(0);
            message.truncate(cut);
            message.push('…');
        }
        Err(GitError::Command { command, message })
    }

    /// Fetches the branch into the cache and returns its commit.
    pub async fn fetch(&self) -> Result<String, GitError> {
        let cache = &self.config.cache;
        std::fs::create_dir_all(cache).map_err(cache_error(cache))?;
        if !self.repo().join("HEAD").exists() {
            self.git(&["init", "--bare", "--quiet"], None, None).await?;
        }
        let refspec = match &self.config.branch {
            Some(branch) => format!("+refs/heads/{branch}:{FETCHED_REF}"),
            None => format!("+HEAD:{FETCHED_REF}"),
        };
        self.git(
            &[
                "fetch",
                "--no-tags",
                "--force",
                "--quiet",
                "--",
                &self.config.url,
                &refspec,
            ],
            None,
            None,
        )
        .await?;
        self.git(
            &[
                "rev-parse",
                "--verify",
                "--quiet",
                &format!("{FETCHED_REF}^{{commit}}"),
            ],
            None,
            None,
        )
        .await
    }

    /// The commit currently checked out, if any (what a restart starts from before fetching).
    pub fn checked_out(&self) -> Option<String> {
        let target = std::fs::read_link(self.config.cache.join("current")).ok()?;
        let commit = target.file_name()?.to_str()?.to_owned();
        (commit.len() >= 40 && commit.bytes().all(|b| b.is_ascii_hexdigit())).then_some(commit)
    }

    /// Checks `commit` out into its own folder, then switches `current` to it with one atomic rename: a
    /// reader sees either the old tree or the new one, never a mix.
    pub async fn checkout(&self, commit: &str) -> Result<(), GitError> {
        let cache = &self.config.cache;
        let trees = cache.join("trees");
        std::fs::create_dir_all(&trees).map_err(cache_error(&trees))?;
        let tree = trees.join(commit);
        if !tree.is_dir() {
            let tmp = trees.join(format!(".tmp-{commit}"));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp).map_err(cache_error(&tmp))?;
            let index = cache.join(".checkout-index");
            let _ = std::fs::remove_file(&index);
            self.git(&["read-tree", commit], Some(&index), Some(&tmp)).await?;
            self.git(&["checkout-index", "--all", "--force"], Some(&index), Some(&tmp))
                .await?;
            let _ = std::fs::remove_file(&index);
            std::fs::rename(&tmp, &tree).map_err(cache_error(&tree))?;
        }
        let link = cache.join(".current-next");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(Path::new("trees").join(commit), &link).map_err(cache_error(&link))?;
        std::fs::rename(&link, cache.join("current")).map_err(cache_error(cache))?;
        // Older trees are no longer read.
        if let Ok(entries) = std::fs::read_dir(&trees) {
            for entry in entries.flatten() {
                if entry.file_name() != commit {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        Ok(())
    }

    /// How `commit` relates to the last applied commit.
    pub async fn lineage(&self, applied: Option<&str>, commit: &str) -> Lineage {
        match applied {
            None => Lineage::First,
            Some(applied) if applied == commit => Lineage::Descendant,
            Some(applied) => {
                match self
                    .git(&["merge-base", "--is-ancestor", applied, commit], None, None)
                    .await
                {
                    Ok(_) => Lineage::Descendant,
                    // Exit 1: not an ancestor. Anything else (the old commit is unknown to the cache):
                    // descent cannot be shown, which is treated the same.
                    Err(_) => Lineage::Unrelated {
                        applied: applied.to_owned(),
                    },
                }
            }
        }
    }

    /// Loads the checked-out tree; problems are located as `COMMIT:FILE:LINE:COLUMN`.
    pub async fn load(&mut self, commit: &str) -> Snapshot {
        let Some(mut loader) = self.loader.take() else {
            return Snapshot::failed("the loader is busy");
        };
        let (loader, mut snapshot) = match tokio::task::spawn_blocking(move || {
            let snapshot = loader.scan(false);
            (loader, snapshot)
        })
        .await
        {
            Ok(done) => done,
            Err(e) => {
                self.loader = Some(DirSource::new(Vec::new(), self.config.limits));
                return Snapshot::failed(format!("loading commit {commit} failed: {e}"));
            }
        };
        self.loader = Some(loader);
        if let Some(failure) = &snapshot.failure {
            snapshot.failure = Some(match &self.config.path {
                Some(path) => format!(
                    "commit {} has no folder {}: {failure}",
                    short(commit),
                    path.display()
                ),
                None => format!("commit {}: {failure}", short(commit)),
            });
            return snapshot;
        }
        snapshot.revision = commit.to_owned();
        for problem in &mut snapshot.errors {
            problem.file = PathBuf::from(format!("{}:{}", short(commit), problem.file.display()));
        }
        snapshot
    }

    /// Follows the branch: loads the cached checkout first (so a restart with an unreachable remote
    /// still has the last commit), then fetches every `interval` and whenever a request arrives
    /// (`reconcile source`), sending each new commit's snapshot, or the failure, to `updates`.
    pub fn run(
        mut self,
        index: usize,
        interval: Duration,
        baseline: Baseline,
        updates: mpsc::UnboundedSender<Update>,
        mut requests: mpsc::UnboundedReceiver<String>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut published: Option<String> = None;
            if let Some(commit) = self.checked_out() {
                let snapshot = self.snapshot(&commit, &baseline).await;
                if snapshot.is_complete() {
                    published = Some(commit);
                }
                let update = Update {
                    source: index,
                    snapshot: Some(Arc::new(snapshot)),
                    ..Update::default()
                };
                if updates.send(update).is_err() {
                    return;
                }
            }
            let mut timer = tokio::time::interval(interval);
            timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let token = tokio::select! {
                    _ = timer.tick() => None,
                    request = requests.recv() => match request {
                        Some(token) => Some(token),
                        None => { timer.tick().await; None }
                    },
                    () = updates.closed() => return,
                };
                let started = Instant::now();
                let fetched = self.fetch().await;
                let mut fetch = Fetch {
                    at: Timestamp::now(),
                    seconds: started.elapsed().as_secs_f64(),
                    ok: fetched.is_ok(),
                };
                let snapshot = match fetched {
                    Err(e) => {
                        published = None;
                        let message = format!("fetching {} failed: {e}", redact(&self.config.url));
                        tracing::warn!(source = %self.config.name, "{message}");
                        Some(Snapshot::failed(message))
                    }
                    Ok(commit) if published.as_deref() == Some(commit.as_str()) => None,
                    Ok(commit) => {
                        let snapshot = match self.checkout(&commit).await {
                            Ok(()) => self.snapshot(&commit, &baseline).await,
                            Err(e) => {
                                Snapshot::failed(format!("checking out {} failed: {e}", short(&commit)))
                            }
                        };
                        if snapshot.is_complete() {
                            published = Some(commit);
                        } else {
                            published = None;
                            fetch.ok = false;
                        }
                        Some(snapshot)
                    }
                };
                let update = Update {
                    source: index,
                    snapshot: snapshot.map(Arc::new),
                    fetch: Some(fetch),
                    token,
                    done: None,
                };
                if updates.send(update).is_err() {
                    return;
                }
            }
        })
    }

    async fn snapshot(&mut self, commit: &str, baseline: &Baseline) -> Snapshot {
        let applied = baseline
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut snapshot = self.load(commit).await;
        snapshot.lineage = self.lineage(applied.as_deref(), commit).await;
        snapshot
    }
}

/// Hides passwords in any URL inside a line of git's output.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_git_messages_are_hidden() {
        let line =
            "fatal: unable to access 'https://bot:hunter2@git.example.org/x.git/': Could not resolve host";
        let out = redact_words(line);
        assert!(!out.contains("hunter2"), "{out}");
        assert!(out.contains("bot:***@git.example.org"), "{out}");
    }

    #[test]
    fn commits_are_shortened_to_twelve_characters_in_locations() {
        assert_eq!(short("0123456789abcdef0123456789abcdef01234567"), "0123456789ab");
        assert_eq!(short("abc"), "abc");
    }
}
