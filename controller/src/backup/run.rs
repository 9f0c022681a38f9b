//! Runs backups, restores, checks and retention on a host through a [`Shell`] (SSH in production).

use std::future::Future;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::manifest::{self, DatabaseSums, FileManifest, ManifestError};
use super::script::{self, BackupPlan, Layout, ResticAccess};
use crate::api::{BackupSpec, DataSpec, SftpRepository};
use crate::nixos::command::{self, Output};
use crate::nixos::escape::shell_word;
use crate::nixos::host::{HostError, SshHost};

/// Where the backup work happens on a host by default (the host side knows it for the restore marker).
pub use crate::nixos::BACKUP_DIR as DEFAULT_DIR;

/// A shell on a host: runs one line with optional stdin and a deadline.
pub trait Shell: Send + Sync {
    /// The host's name (for messages).
    fn host_name(&self) -> &str;
    /// Runs `script`; a non-zero exit is output, not an error.
    fn run(
        &self,
        step: &'static str,
        script: &str,
        stdin: Option<Vec<u8>>,
        timeout: Duration,
    ) -> impl Future<Output = Result<Output, HostError>> + Send;
}

impl Shell for SshHost {
    fn host_name(&self) -> &str {
        crate::nixos::host::NixHost::name(self)
    }

    async fn run(
        &self,
        step: &'static str,
        script: &str,
        stdin: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Output, HostError> {
        self.run_script(step, script, stdin, timeout).await
    }
}

/// Why a backup, restore or check failed. Messages carry restic's and PostgreSQL's words, never a secret.
#[derive(Debug, Error)]
pub enum BackupError {
    /// A secret file on the controller's machine could not be read.
    #[error("cannot read {what} `{path}`: {source}")]
    Secret {
        /// Which secret.
        what: &'static str,
        /// Its path.
        path: String,
        /// The reason.
        #[source]
        source: std::io::Error,
    },
    /// The environment file has a line that is not `KEY=value`.
    #[error("{path}, line {line}: expected `KEY=value` with KEY of letters, digits and `_`")]
    EnvFile {
        /// The file.
        path: String,
        /// The 1-based line number.
        line: usize,
    },
    /// The host could not be reached.
    #[error(transparent)]
    Host(#[from] HostError),
    /// The repository could not be reached or opened from the host.
    #[error("the repository is unreachable from {host}: {reason}")]
    RepositoryUnreachable {
        /// The host.
        host: String,
        /// restic's words.
        reason: String,
    },
    /// Another backup or restore of this host still holds its lock.
    #[error("another backup or restore still runs on {0}")]
    Busy(String),
    /// A step failed on the host.
    #[error("failed to {step} on {host} (exit code {code:?}): {stderr}")]
    Step {
        /// The step.
        step: &'static str,
        /// The host.
        host: String,
        /// The exit code.
        code: Option<i32>,
        /// The end of stderr.
        stderr: String,
    },
    /// Output could not be read.
    #[error("unexpected output of {step}: {detail}")]
    BadOutput {
        /// The step.
        step: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// A manifest could not be read.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// No snapshot matched.
    #[error("no snapshot {0} in the repository")]
    NoSnapshot(String),
    /// A data path cannot be restored safely.
    #[error("refusing to restore over `{0}`: a data path must be a folder or file below `/`")]
    UnsafePath(String),
}

impl BackupError {
    /// Whether retrying later may help (host or repository unreachable, lock held).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            BackupError::RepositoryUnreachable { .. } | BackupError::Busy(_)
        ) || matches!(self, BackupError::Host(h) if h.is_unreachable())
    }
}

/// The repository's access, with the secrets read from the controller's files.
#[derive(Clone)]
pub struct Repository {
    access: ResticAccess,
    password: Vec<u8>,
    env: Option<Vec<u8>>,
    sftp_files: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("repository", &self.access.repository)
            .finish_non_exhaustive()
    }
}

fn read_secret(what: &'static str, path: &str) -> Result<Vec<u8>, BackupError> {
    std::fs::read(path).map_err(|source| BackupError::Secret {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Turns a `KEY=value` file into `export KEY='value'` lines (values escaped, never interpreted).
pub fn env_file_to_exports(path: &str, text: &str) -> Result<String, BackupError> {
    let mut out = String::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let (key, value) = line.split_once('=').ok_or_else(|| BackupError::EnvFile {
            path: path.to_owned(),
            line: i + 1,
        })?;
        let ok = !key.is_empty()
            && !key.starts_with(|c: char| c.is_ascii_digit())
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok {
            return Err(BackupError::EnvFile {
                path: path.to_owned(),
                line: i + 1,
            });
        }
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(value);
        out.push_str(&format!("export {key}={}\n", shell_word(value)));
    }
    Ok(out)
}

impl Repository {
    /// How restic reaches the repository (no secret: those are files delivered to hosts).
    pub fn access(&self) -> &ResticAccess {
        &self.access
    }

    /// Reads the secrets an environment's `spec.backup` names.
    pub fn from_spec(spec: &BackupSpec) -> Result<Self, BackupError> {
        let password = read_secret("the restic password file", &spec.password_file)?;
        let env = match &spec.environment_file {
            Some(path) => {
                let text = read_secret("the restic environment file", path)?;
                Some(env_file_to_exports(path, &String::from_utf8_lossy(&text))?.into_bytes())
            }
            None => None,
        };
        let sftp_files = match (&spec.sftp_identity_file, &spec.sftp_known_hosts_file) {
            (Some(key), Some(known)) => Some((
                read_secret("the SFTP identity file", key)?,
                read_secret("the SFTP known_hosts file", known)?,
            )),
            _ => None,
        };
        let sftp =
            match &sftp_files {
                Some(_) => Some(SftpRepository::parse(&spec.repository).map_err(|detail| {
                    BackupError::BadOutput {
                        step: "sftp repository",
                        detail,
                    }
                })?),
                None => None,
            };
        Ok(Self {
            access: ResticAccess {
                repository: spec.repository.clone(),
                has_env: env.is_some(),
                sftp,
            },
            password,
            env,
            sftp_files,
        })
    }
}

/// Timeouts of the backup steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupTimeouts {
    /// Delivering secrets, reading manifests, starting services.
    pub short: Duration,
    /// A backup, a restore, a check or a prune.
    pub long: Duration,
}

impl Default for BackupTimeouts {
    fn default() -> Self {
        Self {
            short: Duration::from_secs(120),
            long: Duration::from_secs(6 * 3600),
        }
    }
}

/// What a backup of a host is about: names for the tags, and the Application's data.
#[derive(Debug, Clone)]
pub struct BackupTarget<'a> {
    /// The host (`<deployment>-<application>`), recorded as restic's host.
    pub host: &'a str,
    /// The Deployment.
    pub deployment: &'a str,
    /// The Application.
    pub application: &'a str,
    /// The controller's source revision.
    pub revision: &'a str,
    /// What to carry.
    pub data: &'a DataSpec,
}

/// restic's summary of a backup (`--json`, `message_type` `summary`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
struct Summary {
    snapshot_id: String,
    #[serde(default)]
    data_added: u64,
    #[serde(default)]
    total_files_processed: u64,
    #[serde(default)]
    total_bytes_processed: u64,
    #[serde(default)]
    files_new: u64,
    #[serde(default)]
    files_changed: u64,
}

/// What a backup did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupReport {
    /// The new snapshot's ID.
    pub snapshot: String,
    /// Bytes added to the repository.
    pub bytes_added: u64,
    /// Bytes in the snapshot.
    pub total_bytes: u64,
    /// Files in the snapshot.
    pub files: u64,
    /// Files new or changed since the parent snapshot.
    pub files_changed: u64,
    /// How long it took.
    pub duration: Duration,
}

/// One snapshot as `restic snapshots --json` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The full ID.
    pub id: String,
    /// The short ID.
    #[serde(default)]
    pub short_id: String,
    /// When it was taken (RFC 3339 with fractions and offset, as restic writes it).
    pub time: String,
    /// The host recorded.
    pub hostname: String,
    /// Its tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The paths it holds.
    #[serde(default)]
    pub paths: Vec<String>,
}

impl Snapshot {
    /// The value of tag `key=…`.
    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags
            .iter()
            .find_map(|t| t.strip_prefix(key)?.strip_prefix('='))
    }
}

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreReport {
    /// The snapshot restored.
    pub snapshot: String,
    /// Files restored under the data paths.
    pub files: usize,
    /// Rows restored in all databases.
    pub rows: u64,
    /// Differences to the snapshot's manifest (empty: verified).
    pub differences: Vec<String>,
    /// How long it took.
    pub duration: Duration,
}

impl RestoreReport {
    /// Whether files and databases matched the snapshot's manifest.
    pub fn verified(&self) -> bool {
        self.differences.is_empty()
    }
}

/// What a repository check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// Whether restic found no errors.
    pub ok: bool,
    /// The end of restic's output (the errors when not ok).
    pub output: String,
}

/// Backups and restores of hosts through a [`Shell`].
#[derive(Debug, Clone)]
pub struct Backuper {
    layout: Layout,
    timeouts: BackupTimeouts,
}

impl Default for Backuper {
    fn default() -> Self {
        Self::new(DEFAULT_DIR, BackupTimeouts::default())
    }
}

fn stderr_tail(out: &Output) -> String {
    command::tail(if out.stderr.trim().is_empty() {
        &out.stdout
    } else {
        &out.stderr
    })
}

/// restic's words for a repository it could not reach or open.
fn unreachable_words(text: &str) -> bool {
    [
        "unable to start the sftp session",
        "unable to open repository",
        "ssh: connect to host",
        "Connection refused",
        "Connection closed",
        "connection reset",
        "no such host",
        "dial tcp",
    ]
    .iter()
    .any(|w| text.contains(w))
}

impl Backuper {
    /// Works in `dir` on every host (a plain absolute path).
    pub fn new(dir: &str, timeouts: BackupTimeouts) -> Self {
        let dir = if script::plain_word(dir) && dir.starts_with('/') {
            dir.trim_end_matches('/').to_owned()
        } else {
            DEFAULT_DIR.to_owned()
        };
        Self {
            layout: Layout { dir },
            timeouts,
        }
    }

    /// Where the work happens on every host.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    fn fail(&self, shell: &impl Shell, step: &'static str, out: &Output) -> BackupError {
        let text = stderr_tail(out);
        if out.code == Some(script::EXIT_LOCKED) {
            return BackupError::Busy(shell.host_name().to_owned());
        }
        if unreachable_words(&text) {
            return BackupError::RepositoryUnreachable {
                host: shell.host_name().to_owned(),
                reason: text,
            };
        }
        BackupError::Step {
            step,
            host: shell.host_name().to_owned(),
            code: out.code,
            stderr: text,
        }
    }

    async fn run_ok(
        &self,
        shell: &impl Shell,
        step: &'static str,
        line: &str,
        long: bool,
    ) -> Result<Output, BackupError> {
        let timeout = if long {
            self.timeouts.long
        } else {
            self.timeouts.short
        };
        let out = shell.run(step, line, None, timeout).await?;
        if out.success() {
            Ok(out)
        } else {
            Err(self.fail(shell, step, &out))
        }
    }

    /// The repository's secrets as one stdin, and the line that stores them on a host as files.
    fn secrets_input(&self, repo: &Repository) -> (String, Vec<u8>) {
        let mut files: Vec<(&str, &[u8])> = vec![("password", &repo.password)];
        if let Some(env) = &repo.env {
            files.push(("env", env));
        }
        if let Some((key, known)) = &repo.sftp_files {
            files.push(("sftp_key", key));
            files.push(("known_hosts", known));
        }
        let sizes: Vec<(&str, usize)> = files.iter().map(|(n, b)| (*n, b.len())).collect();
        let stdin = files.iter().flat_map(|(_, b)| b.iter().copied()).collect();
        (script::put_secrets(&self.layout, &sizes), stdin)
    }

    /// Delivers the repository's secrets to the host as files (through stdin, never as arguments).
    pub async fn deliver_secrets(&self, shell: &impl Shell, repo: &Repository) -> Result<(), BackupError> {
        let (line, stdin) = self.secrets_input(repo);
        let out = shell
            .run(
                "deliver the backup secrets",
                &line,
                Some(stdin),
                self.timeouts.short,
            )
            .await?;
        if !out.success() {
            return Err(self.fail(shell, "deliver the backup secrets", &out));
        }
        Ok(())
    }

    /// Runs `line` on the host in one connection: the repository's secrets delivered first (through
    /// stdin) when `secrets` is given, and the work folders and secrets removed when it exits,
    /// whether it succeeded or not, when `clean`.
    pub async fn run_remote(
        &self,
        shell: &impl Shell,
        step: &'static str,
        line: &str,
        secrets: Option<&Repository>,
        clean: bool,
    ) -> Result<Output, BackupError> {
        let (put, stdin) = match secrets {
            Some(repo) => {
                let (put, stdin) = self.secrets_input(repo);
                (put, Some(stdin))
            }
            None => (String::new(), None),
        };
        // Secrets are written and removed only while the host's lock is held: a line a killed
        // controller left running removes its work when it ends, never a successor's.
        let lock = if secrets.is_some() || clean {
            format!("set -e; {}FEDIVERSITY_LOCKED=1; ", script::lock(&self.layout))
        } else {
            String::new()
        };
        let trap = if clean {
            format!("trap {} EXIT; ", shell_word(&script::cleanup(&self.layout)))
        } else {
            String::new()
        };
        let full = format!("{lock}{trap}{put}{line}");
        let out = shell.run(step, &full, stdin, self.timeouts.long).await?;
        if out.success() {
            Ok(out)
        } else {
            Err(self.fail(shell, step, &out))
        }
    }

    /// Removes the delivered secrets and the work folders.
    pub async fn clean_up(&self, shell: &impl Shell) -> Result<(), BackupError> {
        self.run_ok(shell, "clean up", &script::cleanup(&self.layout), false)
            .await
            .map(drop)
    }

    /// Backs up one host: dumps, manifest, one snapshot. A snapshot restic saved although a step
    /// failed is forgotten again.
    pub async fn backup(
        &self,
        shell: &impl Shell,
        repo: &Repository,
        target: &BackupTarget<'_>,
    ) -> Result<BackupReport, BackupError> {
        self.backup_in(shell, repo, target, None).await
    }

    /// [`Self::backup`], whose manifest hashes only the files changed since the last manifest taken
    /// on the host in `lineage` (a word from [`manifest::lineage_word`]); one connection.
    pub async fn backup_in(
        &self,
        shell: &impl Shell,
        repo: &Repository,
        target: &BackupTarget<'_>,
        lineage: Option<&str>,
    ) -> Result<BackupReport, BackupError> {
        Ok(self.backup_inner(shell, repo, target, lineage).await?.0)
    }

    /// [`Self::backup_in`] that also returns the manifest and the databases' checksums the snapshot
    /// recorded (read in the same connection).
    pub async fn backup_recorded(
        &self,
        shell: &impl Shell,
        repo: &Repository,
        target: &BackupTarget<'_>,
        lineage: &str,
    ) -> Result<(BackupReport, FileManifest, Vec<DatabaseSums>), BackupError> {
        let (report, recorded) = self.backup_inner(shell, repo, target, Some(lineage)).await?;
        let (files, dbs) = recorded.ok_or_else(|| BackupError::BadOutput {
            step: "back up",
            detail: "no manifest after the summary".into(),
        })?;
        Ok((report, files, dbs))
    }

    async fn backup_inner(
        &self,
        shell: &impl Shell,
        repo: &Repository,
        target: &BackupTarget<'_>,
        lineage: Option<&str>,
    ) -> Result<(BackupReport, Option<(FileManifest, Vec<DatabaseSums>)>), BackupError> {
        let started = Instant::now();
        let plan = BackupPlan {
            host: target.host.to_owned(),
            paths: target.data.paths.clone(),
            databases: target.data.databases.clone(),
            tags: vec![
                "fediversity".into(),
                format!("deployment={}", target.deployment),
                format!("application={}", target.application),
                format!("host={}", target.host),
                format!("revision={}", tag_safe(target.revision)),
            ],
            lineage: lineage.map(str::to_owned),
        };
        let line = script::backup(&self.layout, &repo.access, &plan);
        let out = self.run_remote(shell, "back up", &line, Some(repo), true).await?;
        let (text, recorded) = match out.stdout.split_once(script::MANIFEST_MARK) {
            Some((text, rest)) => {
                let (files, _, dbs) = manifest::parse_state(rest, target.data.databases.len())?;
                (text, Some((files, dbs)))
            }
            None => (out.stdout.as_str(), None),
        };
        let summary: Summary = text
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .ok_or_else(|| BackupError::BadOutput {
                step: "restic backup",
                detail: "no summary line".into(),
            })?;
        let report = BackupReport {
            snapshot: summary.snapshot_id,
            bytes_added: summary.data_added,
            total_bytes: summary.total_bytes_processed,
            files: summary.total_files_processed,
            files_changed: summary.files_new + summary.files_changed,
            duration: started.elapsed(),
        };
        Ok((report, recorded))
    }

    /// Creates the repository when there is none, from this one host: hosts that back up at once into a
    /// new repository would otherwise each run `restic init`, and two racing inits leave a key that
    /// cannot open the config that was written last (every later run then fails).
    pub async fn ensure_repository(&self, shell: &impl Shell, repo: &Repository) -> Result<(), BackupError> {
        self.deliver_secrets(shell, repo).await?;
        let result = self
            .run_ok(
                shell,
                "create the repository",
                &script::ensure_repository(&self.layout, &repo.access),
                false,
            )
            .await;
        let cleaned = self.clean_up(shell).await;
        result?;
        cleaned
    }

    /// Lists the snapshots, optionally of one host and with all of `tags`.
    pub async fn snapshots(
        &self,
        shell: &impl Shell,
        repo: &Repository,
        host: Option<&str>,
        tags: &[String],
    ) -> Result<Vec<Snapshot>, BackupError> {
        self.deliver_secrets(shell, repo).await?;
        let result = self
            .run_ok(
                shell,
                "list snapshots",
                &script::snapshots(&self.layout, &repo.access, host, tags),
                false,
            )
            .await;
        let cleaned = self.clean_up(shell).await;
        let out = result?;
        cleaned?;
        let mut list: Vec<Snapshot> =
            serde_json::from_str(out.stdout.trim()).map_err(|e| BackupError::BadOutput {
                step: "restic snapshots",
                detail: e.to_string(),
            })?;
        list.sort_by(|a, b| a.time.cmp(&b.time));
        Ok(list)
    }

    /// Checks the repository, reading `read_data` (`Some("100%")`: all packs).
    pub async fn check(
        &self,
        shell: &impl Shell,
        repo: &Repository,
        read_data: Option<&str>,
    ) -> Result<CheckReport, BackupError> {
        self.deliver_secrets(shell, repo).await?;
        let out = shell
            .run(
                "check the repository",
                &script::check(&self.layout, &repo.access, read_data),
                None,
                self.timeouts.long,
            )
            .await;
        let cleaned = self.clean_up(shell).await;
        let out = out?;
        cleaned?;
        if out.success() {
            return Ok(CheckReport {
                ok: true,
                output: command::tail(&out.stdout),
            });
        }
        let text = stderr_tail(&out);
        if out.code == Some(script::EXIT_LOCKED) || unreachable_words(&text) {
            return Err(self.fail(shell, "check the repository", &out));
        }
        Ok(CheckReport {
            ok: false,
            output: text,
        })
    }

    /// Applies the retention to one host's snapshots and prunes.
    pub async fn forget(
        &self,
        shell: &impl Shell,
        repo: &Repository,
        host: &str,
        spec: &BackupSpec,
    ) -> Result<(), BackupError> {
        self.deliver_secrets(shell, repo).await?;
        let r = spec.retention;
        let result = self
            .run_ok(
                shell,
                "forget and prune",
                &script::forget(&self.layout, &repo.access, host, r.daily, r.weekly, r.monthly),
                true,
            )
            .await;
        let cleaned = self.clean_up(shell).await;
        result?;
        cleaned
    }

    /// Restores snapshot `snapshot` (`latest` or an ID) of host `source_host` onto this host: services
    /// held stopped, data paths replaced, databases recreated empty with their recorded owner and
    /// restored, everything verified against the snapshot's manifest; services start only when verified.
    pub async fn restore(
        &self,
        shell: &impl Shell,
        repo: &Repository,
        source_host: &str,
        snapshot: &str,
        data: &DataSpec,
    ) -> Result<RestoreReport, BackupError> {
        self.restore_in(shell, repo, source_host, snapshot, data, None)
            .await
    }

    /// [`Self::restore`], whose verifying manifest is recorded on the host in `lineage` (see
    /// [`Self::backup_in`]), so that later manifests there hash only what changed since.
    pub async fn restore_in(
        &self,
        shell: &impl Shell,
        repo: &Repository,
        source_host: &str,
        snapshot: &str,
        data: &DataSpec,
        lineage: Option<&str>,
    ) -> Result<RestoreReport, BackupError> {
        let started = Instant::now();
        for p in &data.paths {
            let p = p.trim_end_matches('/');
            if p.is_empty() || !p.starts_with('/') || p.split('/').any(|c| c == "..") {
                return Err(BackupError::UnsafePath(p.to_owned()));
            }
        }
        let list = self
            .snapshots(shell, repo, Some(source_host), &["fediversity".to_owned()])
            .await?;
        let chosen = if snapshot == "latest" {
            list.last()
        } else {
            list.iter()
                .find(|s| s.id.starts_with(snapshot) || s.short_id == snapshot)
        }
        .ok_or_else(|| BackupError::NoSnapshot(format!("{snapshot} of host {source_host}")))?
        .clone();
        self.deliver_secrets(shell, repo).await?;
        let result = self.restore_steps(shell, repo, &chosen.id, data, lineage).await;
        let cleaned = self.clean_up(shell).await;
        let (files, rows, differences) = result?;
        cleaned?;
        if differences.is_empty() {
            // The host remembers that it was restored, so that a controller that lost its status
            // never restores over data written since; the record also lifts the hold of a host that
            // started from a snapshot (its units start only once it exists), so it comes first.
            let line = format!(
                "echo {} >{}/restored.tmp; mv {}/restored.tmp {}/restored; {}",
                shell_word(&chosen.id),
                self.layout.dir,
                self.layout.dir,
                self.layout.dir,
                script::start_services(&data.services),
            );
            self.run_ok(shell, "start the services", &line, false).await?;
        }
        Ok(RestoreReport {
            snapshot: chosen.id,
            files,
            rows,
            differences,
            duration: started.elapsed(),
        })
    }

    /// Records on the host that an in-place restore from snapshot `id` runs (`Some`), or that it ended
    /// (`None`), so that one a killed controller left unfinished is found and finished after a restart.
    pub async fn mark_in_place(&self, shell: &impl Shell, id: Option<&str>) -> Result<(), BackupError> {
        let d = &self.layout.dir;
        let line = match id {
            Some(id) => format!(
                "set -e; mkdir -p {d}; echo {} >{d}/in-place.tmp; mv {d}/in-place.tmp {d}/in-place",
                shell_word(id)
            ),
            None => format!("rm -f {d}/in-place"),
        };
        self.run_ok(shell, "record the in-place restore", &line, false)
            .await
            .map(drop)
    }

    /// The snapshot of an in-place restore that is recorded as running on the host (see
    /// [`Self::mark_in_place`]).
    pub async fn unfinished_in_place(&self, shell: &impl Shell) -> Result<Option<String>, BackupError> {
        let out = self
            .run_ok(
                shell,
                "read the in-place restore record",
                &format!("cat {}/in-place 2>/dev/null || true", self.layout.dir),
                false,
            )
            .await?;
        let id = out.stdout.trim();
        Ok((!id.is_empty()).then(|| id.to_owned()))
    }

    /// The snapshot a host was restored from, when it ever was (its own record, kept on the host).
    pub async fn restored_from(&self, shell: &impl Shell) -> Result<Option<String>, BackupError> {
        let out = self
            .run_ok(
                shell,
                "read the restore record",
                &format!("cat {}/restored 2>/dev/null || true", self.layout.dir),
                false,
            )
            .await?;
        let id = out.stdout.trim();
        Ok((!id.is_empty()).then(|| id.to_owned()))
    }

    async fn restore_steps(
        &self,
        shell: &impl Shell,
        repo: &Repository,
        id: &str,
        data: &DataSpec,
        lineage: Option<&str>,
    ) -> Result<(usize, u64, Vec<String>), BackupError> {
        let l = &self.layout;
        self.run_ok(
            shell,
            "unpack the snapshot",
            &script::restore_unpack(l, &repo.access, id, &data.services),
            true,
        )
        .await?;
        let expected = FileManifest::parse(
            &self
                .run_ok(
                    shell,
                    "read the snapshot's manifest",
                    &script::restored_manifest(l),
                    true,
                )
                .await?
                .stdout,
        )?;
        self.run_ok(
            shell,
            "move the data into place",
            &script::restore_move(l, &data.paths),
            true,
        )
        .await?;
        let mut differences = Vec::new();
        let mut rows = 0;
        for db in &data.databases {
            let recorded = DatabaseSums::parse(
                &self
                    .run_ok(
                        shell,
                        "read a database's checksums",
                        &script::restored_database_meta(l, db),
                        false,
                    )
                    .await?
                    .stdout,
            )?;
            self.run_ok(
                shell,
                "restore a database",
                &script::restore_database(l, db, &recorded.meta),
                true,
            )
            .await?;
            let restored = DatabaseSums::parse(
                &self
                    .run_ok(
                        shell,
                        "checksum a restored database",
                        &script::database_checksums(db),
                        true,
                    )
                    .await?
                    .stdout,
            )?;
            rows += restored.rows();
            differences.extend(manifest::compare_database(db, &recorded, &restored));
        }
        let actual = FileManifest::parse(
            &self
                .run_ok(
                    shell,
                    "take the restored files' manifest",
                    &script::live_manifest_in(l, &data.paths, lineage),
                    true,
                )
                .await?
                .stdout,
        )?;
        differences.extend(manifest::compare_files(&expected, &actual));
        Ok((actual.files(), rows, differences))
    }

    /// The manifest of the live data paths and the checksums of the live databases (for tests and
    /// comparisons between hosts).
    pub async fn live_state(
        &self,
        shell: &impl Shell,
        data: &DataSpec,
    ) -> Result<(FileManifest, Vec<DatabaseSums>), BackupError> {
        let (files, _, dbs) = self.live_state_in(shell, data, None).await?;
        Ok((files, dbs))
    }

    /// [`Self::live_state`] in one connection, the manifest quick within `lineage` (see
    /// [`Self::backup_in`]); also how many files were hashed, for a quick manifest.
    pub async fn live_state_in(
        &self,
        shell: &impl Shell,
        data: &DataSpec,
        lineage: Option<&str>,
    ) -> Result<(FileManifest, Option<usize>, Vec<DatabaseSums>), BackupError> {
        let out = self
            .run_ok(
                shell,
                "take the files' manifest and the databases' checksums",
                &script::live_state(&self.layout, &data.paths, &data.databases, lineage),
                true,
            )
            .await?;
        Ok(manifest::parse_state(&out.stdout, data.databases.len())?)
    }
}

/// A revision as a restic tag (no commas, which separate tags).
fn tag_safe(revision: &str) -> String {
    revision
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.:".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_environment_file_becomes_escaped_exports() {
        let text = "# keys\nAWS_ACCESS_KEY_ID=AKIA1\nexport AWS_SECRET_ACCESS_KEY=\"a'b $c\"\n\n";
        assert_eq!(
            env_file_to_exports("/e", text).unwrap(),
            "export AWS_ACCESS_KEY_ID=AKIA1\nexport AWS_SECRET_ACCESS_KEY='a'\\''b $c'\n"
        );
        let err = env_file_to_exports("/e", "A=1\nnot a line\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "/e, line 2: expected `KEY=value` with KEY of letters, digits and `_`"
        );
    }

    #[test]
    fn the_repository_debug_output_never_shows_the_password() {
        let repo = Repository {
            access: ResticAccess {
                repository: "/srv/r".into(),
                has_env: false,
                sftp: None,
            },
            password: b"hunter2".to_vec(),
            env: None,
            sftp_files: None,
        };
        assert!(!format!("{repo:?}").contains("hunter2"));
    }

    #[test]
    fn revisions_become_single_tags() {
        assert_eq!(tag_safe("git:ab12,cd"), "git:ab12_cd");
    }
}
