//! Portable bundles that move a Deployment's data between providers that run separate controllers.
//!
//! A bundle is a folder:
//!
//! ```text
//! bundle.json            the index: format, Deployment, hosts and snapshots, checksums of the files below
//! deployment.yaml        the Deployment without provider fields (no runtimeEnvironment, restore, status)
//! manifests/HOST.json    per host: every file (type, mode, owner, size, SHA-256) and every table's checksum
//! repository/            a restic repository holding only this Deployment's snapshots
//! repository.password    its own password, generated for the bundle (mode 0600)
//! ```
//!
//! The repository's content is pinned by the index: each snapshot's tree ID is the SHA-256 of its
//! content, and `restic check --read-data` proves every blob against its ID. The index carries a
//! checksum of itself and of every other file, so a changed or damaged bundle is refused before anything
//! is created; it is not a signature (the operator carries the bundle from one provider to the other).
//! restic runs on the controller's machine here (the secrets of the provider's repository are files
//! there), through [`LocalShell`], with the same lines the hosts run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use super::manifest::{self, DatabaseSums, FileManifest};
use super::run::{BackupError, BackupTimeouts, Backuper, Repository, Shell};
use super::script;
use crate::nixos::command::{self, CommandSpec, Output};
use crate::nixos::escape::{shell_word, shell_words};
use crate::nixos::host::HostError;

/// The index format this controller writes and reads.
pub const FORMAT: u32 = 1;
/// The index.
pub const INDEX_FILE: &str = "bundle.json";
/// The portable Deployment.
pub const DEPLOYMENT_FILE: &str = "deployment.yaml";
/// The restic repository.
pub const REPOSITORY_DIR: &str = "repository";
/// The repository's password.
pub const PASSWORD_FILE: &str = "repository.password";
/// The per-host manifests.
pub const MANIFESTS_DIR: &str = "manifests";

/// Why a bundle cannot be written, read or trusted. Messages name the file and the field.
#[derive(Debug, Error)]
pub enum BundleError {
    /// A file of the bundle is missing.
    #[error("{0}: missing from the bundle (was it copied completely?)")]
    Missing(String),
    /// A file could not be read or written.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: String,
        /// The reason.
        #[source]
        source: std::io::Error,
    },
    /// A file is not what its format says.
    #[error("{file}: {detail}")]
    Malformed {
        /// The file.
        file: String,
        /// What is wrong.
        detail: String,
    },
    /// A field of a file is wrong.
    #[error("{file}, field `{field}`: {detail}")]
    Field {
        /// The file.
        file: String,
        /// The field, e.g. `hosts[0].snapshot`.
        field: String,
        /// What is wrong.
        detail: String,
    },
    /// A file's content is not the one the index records.
    #[error(
        "{file}: its SHA-256 is {actual}, but bundle.json records {expected}: the file was changed after the export"
    )]
    Checksum {
        /// The file.
        file: String,
        /// What the index records.
        expected: String,
        /// What the file hashes to.
        actual: String,
    },
    /// The repository does not hold what the index says.
    #[error("{REPOSITORY_DIR}: {0}")]
    Repository(String),
    /// The output folder is in use.
    #[error("{0}: exists and is not empty; give a new folder for the bundle")]
    NotEmpty(String),
    /// restic or a secret failed.
    #[error(transparent)]
    Backup(#[from] BackupError),
}

/// The index of a bundle (`bundle.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Index {
    /// The format version ([`FORMAT`]).
    pub format: u32,
    /// The Deployment's name.
    pub deployment: String,
    /// When the bundle was written (RFC 3339).
    pub created_at: String,
    /// Whether the snapshots were taken with the source's services stopped (nothing written after them).
    #[serde(rename = "final")]
    pub final_snapshot: bool,
    /// One entry per host with data.
    pub hosts: Vec<IndexHost>,
    /// SHA-256 of every other file of the bundle that is not the repository's data, by relative path.
    pub files: BTreeMap<String, String>,
    /// SHA-256 of this index as written with this field empty.
    #[serde(default)]
    pub checksum: String,
}

/// One host's snapshot in a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IndexHost {
    /// The host, `<deployment>-<application>`.
    pub host: String,
    /// The Application.
    pub application: String,
    /// The snapshot's ID in the bundle's repository.
    pub snapshot: String,
    /// The snapshot's ID in the repository it was first taken into.
    pub original: String,
    /// The ID of the snapshot's tree: the SHA-256 of its content, the same in every repository.
    pub tree: String,
    /// When the snapshot was taken.
    pub time: String,
    /// The staging folder inside the snapshot (dumps and manifest).
    pub staging: String,
    /// The databases the snapshot holds.
    #[serde(default)]
    pub databases: Vec<String>,
    /// The host's manifest, relative to the bundle.
    pub manifest: String,
    /// Files under the data paths.
    pub files: usize,
    /// Bytes of those files.
    pub bytes: u64,
}

/// What a host's data was at the snapshot: its files and its databases' checksums.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostManifest {
    /// The files under the data paths.
    pub files: FileManifest,
    /// The databases by name.
    pub databases: BTreeMap<String, DatabaseSums>,
}

/// SHA-256 of `bytes` in hexadecimal.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn is_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// A relative path inside the bundle: plain components, no `..`, no absolute path.
fn is_relative_file(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('/')
        && s.split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && c.bytes().all(|b| b.is_ascii_graphic()))
}

impl Index {
    /// The index as written: pretty JSON with its own checksum filled in.
    pub fn seal(mut self) -> (Self, String) {
        self.checksum = String::new();
        self.checksum = sha256_hex(&self.canonical());
        let text = serde_json::to_string_pretty(&self).unwrap_or_default() + "\n";
        (self, text)
    }

    fn canonical(&self) -> Vec<u8> {
        let mut copy = self.clone();
        copy.checksum = String::new();
        serde_json::to_vec(&copy).unwrap_or_default()
    }

    /// Reads and checks an index: its format, its own checksum and every field.
    pub fn parse(text: &str) -> Result<Self, BundleError> {
        let file = INDEX_FILE.to_owned();
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| BundleError::Malformed {
            file: file.clone(),
            detail: format!("not JSON: {e}"),
        })?;
        // The version first: a newer format is refused as such, not as a list of unknown fields.
        match value.get("format").and_then(serde_json::Value::as_u64) {
            Some(v) if v == u64::from(FORMAT) => {}
            Some(v) => {
                return Err(BundleError::Field {
                    file,
                    field: "format".into(),
                    detail: format!(
                        "format {v} is not supported: this controller reads format {FORMAT} (import with the release that exported it, or a newer one)"
                    ),
                });
            }
            None => {
                return Err(BundleError::Field {
                    file,
                    field: "format".into(),
                    detail: "missing: not a bundle index".into(),
                });
            }
        }
        let index: Index = serde_json::from_value(value).map_err(|e| BundleError::Malformed {
            file: file.clone(),
            detail: e.to_string(),
        })?;
        let field = |field: String, detail: String| BundleError::Field {
            file: file.clone(),
            field,
            detail,
        };
        let actual = sha256_hex(&index.canonical());
        if index.checksum != actual {
            return Err(field(
                "checksum".into(),
                format!(
                    "the index hashes to {actual}, not {}: bundle.json was changed after the export",
                    if index.checksum.is_empty() {
                        "(none)"
                    } else {
                        &index.checksum
                    }
                ),
            ));
        }
        crate::api::validate::dns_label(&index.deployment).map_err(|e| field("deployment".into(), e))?;
        if crate::api::Timestamp::parse(&index.created_at).is_none() {
            return Err(field(
                "createdAt".into(),
                format!("`{}` is not an RFC 3339 time", index.created_at),
            ));
        }
        if index.hosts.is_empty() {
            return Err(field(
                "hosts".into(),
                "lists no host: the bundle carries no data".into(),
            ));
        }
        for (path, sum) in &index.files {
            if !is_relative_file(path) || path.starts_with(&format!("{REPOSITORY_DIR}/data")) {
                return Err(field(
                    format!("files.{path}"),
                    "not a plain relative path inside the bundle".into(),
                ));
            }
            if !is_id(sum) {
                return Err(field(
                    format!("files.{path}"),
                    "not a SHA-256 (64 lowercase hexadecimal digits)".into(),
                ));
            }
        }
        for required in [DEPLOYMENT_FILE.to_owned(), format!("{REPOSITORY_DIR}/config")] {
            if !index.files.contains_key(&required) {
                return Err(field("files".into(), format!("has no checksum of `{required}`")));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, h) in index.hosts.iter().enumerate() {
            let at = |name: &str| format!("hosts[{i}].{name}");
            crate::api::validate::dns_label(&h.application).map_err(|e| field(at("application"), e))?;
            if h.host != format!("{}-{}", index.deployment, h.application) {
                return Err(field(
                    at("host"),
                    format!(
                        "`{}` is not `{}-{}` (the Deployment's name and the Application's)",
                        h.host, index.deployment, h.application
                    ),
                ));
            }
            if !seen.insert(h.host.clone()) {
                return Err(field(at("host"), format!("`{}` is listed twice", h.host)));
            }
            for (name, id) in [
                ("snapshot", &h.snapshot),
                ("original", &h.original),
                ("tree", &h.tree),
            ] {
                if !is_id(id) {
                    return Err(field(
                        at(name),
                        format!("`{id}` is not a restic ID (64 lowercase hexadecimal digits)"),
                    ));
                }
            }
            // restic writes RFC 3339 with nanoseconds and the machine's offset.
            let time_ok = h
                .time
                .get(..19)
                .is_some_and(|p| crate::api::Timestamp::parse(&format!("{p}Z")).is_some())
                && h.time
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-:.+".contains(&b));
            if !time_ok {
                return Err(field(at("time"), format!("`{}` is not an RFC 3339 time", h.time)));
            }
            if !h.staging.starts_with('/')
                || !script::plain_word(&h.staging)
                || !h.staging.ends_with("/staging")
            {
                return Err(field(
                    at("staging"),
                    format!("`{}` is not a staging folder's absolute path", h.staging),
                ));
            }
            for db in &h.databases {
                if !script::plain_word(db) || db.contains('/') {
                    return Err(field(at("databases"), format!("`{db}` is not a database name")));
                }
            }
            let expected = format!("{MANIFESTS_DIR}/{}.json", h.host);
            if h.manifest != expected {
                return Err(field(
                    at("manifest"),
                    format!("is `{}`, expected `{expected}`", h.manifest),
                ));
            }
            if !index.files.contains_key(&h.manifest) {
                return Err(field(
                    "files".into(),
                    format!("has no checksum of `{}`", h.manifest),
                ));
            }
        }
        Ok(index)
    }
}

/// The Deployment as another provider can use it: kind, name, labels and the operator's spec, without
/// `runtimeEnvironment`, `restore`, `suspend`, status or the provider's annotations.
pub fn portable_deployment(object: &serde_json::Value) -> Result<serde_json::Value, String> {
    let name = object["metadata"]["name"]
        .as_str()
        .ok_or("the Deployment has no metadata.name")?;
    let mut spec = object["spec"]
        .as_object()
        .cloned()
        .ok_or("the Deployment has no spec")?;
    for provider_field in ["runtimeEnvironment", "restore", "suspend"] {
        spec.remove(provider_field);
    }
    let mut metadata = serde_json::Map::new();
    metadata.insert("name".into(), name.into());
    if let Some(labels) = object["metadata"]["labels"].as_object().filter(|l| !l.is_empty()) {
        metadata.insert("labels".into(), labels.clone().into());
    }
    Ok(serde_json::json!({
        "apiVersion": crate::api::API_VERSION,
        "kind": "Deployment",
        "metadata": metadata,
        "spec": spec,
    }))
}

/// The portable Deployment placed on `environment`, starting from `snapshot` (`latest` or an ID).
pub fn placed_deployment(
    portable: &serde_json::Value,
    environment: &str,
    snapshot: &str,
) -> serde_json::Value {
    let mut out = portable.clone();
    if let Some(spec) = out["spec"].as_object_mut() {
        spec.insert("runtimeEnvironment".into(), environment.into());
        spec.insert("restore".into(), serde_json::json!({ "snapshot": snapshot }));
    }
    out
}

/// A bundle read from disk whose files all match the index.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// Its folder.
    pub dir: PathBuf,
    /// Its index.
    pub index: Index,
    /// The portable Deployment.
    pub deployment: serde_json::Value,
    /// Each host's manifest, by host.
    pub manifests: BTreeMap<String, HostManifest>,
}

fn read(dir: &Path, rel: &str) -> Result<Vec<u8>, BundleError> {
    std::fs::read(dir.join(rel)).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            BundleError::Missing(rel.to_owned())
        } else {
            BundleError::Io {
                file: rel.to_owned(),
                source,
            }
        }
    })
}

impl Bundle {
    /// Reads the bundle in `dir`: the index, every file against its checksum, the Deployment and the
    /// manifests. Nothing is trusted before this returns.
    pub fn open(dir: &Path) -> Result<Self, BundleError> {
        let text = read(dir, INDEX_FILE)?;
        let text = String::from_utf8(text).map_err(|_| BundleError::Malformed {
            file: INDEX_FILE.into(),
            detail: "not UTF-8 text".into(),
        })?;
        let index = Index::parse(&text)?;
        if !dir.join(REPOSITORY_DIR).is_dir() {
            return Err(BundleError::Missing(format!("{REPOSITORY_DIR}/")));
        }
        for (rel, expected) in &index.files {
            let actual = sha256_hex(&read(dir, rel)?);
            if &actual != expected {
                return Err(BundleError::Checksum {
                    file: rel.clone(),
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        read(dir, PASSWORD_FILE)?;
        let text = read(dir, DEPLOYMENT_FILE)?;
        let deployment: serde_json::Value =
            yaml_serde::from_slice(&text).map_err(|e| BundleError::Malformed {
                file: DEPLOYMENT_FILE.into(),
                detail: format!("not YAML: {e}"),
            })?;
        let field = |field: &str, detail: String| BundleError::Field {
            file: DEPLOYMENT_FILE.into(),
            field: field.into(),
            detail,
        };
        if deployment["kind"] != "Deployment" {
            return Err(field("kind", "is not `Deployment`".into()));
        }
        if deployment["metadata"]["name"].as_str() != Some(index.deployment.as_str()) {
            return Err(field(
                "metadata.name",
                format!("is not `{}`, the name bundle.json records", index.deployment),
            ));
        }
        if !deployment["spec"]["runtimeEnvironment"].is_null() || !deployment["spec"]["restore"].is_null() {
            return Err(field(
                "spec",
                "names a runtimeEnvironment or a restore: a bundle's Deployment carries neither".into(),
            ));
        }
        let mut manifests = BTreeMap::new();
        for (i, h) in index.hosts.iter().enumerate() {
            let text = read(dir, &h.manifest)?;
            let m: HostManifest = serde_json::from_slice(&text).map_err(|e| BundleError::Malformed {
                file: h.manifest.clone(),
                detail: e.to_string(),
            })?;
            let dbs: Vec<&String> = m.databases.keys().collect();
            let mut listed: Vec<&String> = h.databases.iter().collect();
            listed.sort();
            if dbs != listed {
                return Err(BundleError::Field {
                    file: INDEX_FILE.into(),
                    field: format!("hosts[{i}].databases"),
                    detail: format!("does not list the databases of {}", h.manifest),
                });
            }
            manifests.insert(h.host.clone(), m);
        }
        Ok(Self {
            dir: dir.to_owned(),
            index,
            deployment,
            manifests,
        })
    }

    /// The bundle's repository folder.
    pub fn repository(&self) -> PathBuf {
        self.dir.join(REPOSITORY_DIR)
    }

    /// The bundle's password file.
    pub fn password_file(&self) -> PathBuf {
        self.dir.join(PASSWORD_FILE)
    }
}

/// A shell on the controller's own machine, for restic runs against the provider's repository and a
/// bundle's (through the one subprocess chokepoint).
#[derive(Debug, Clone)]
pub struct LocalShell {
    name: String,
}

impl LocalShell {
    /// A local shell named `name` in messages.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
        }
    }
}

impl Shell for LocalShell {
    fn host_name(&self) -> &str {
        &self.name
    }

    async fn run(
        &self,
        _step: &'static str,
        script: &str,
        stdin: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Output, HostError> {
        let mut spec = CommandSpec::new("sh", ["-c", script], timeout);
        spec.stdin = stdin;
        Ok(command::run(&spec).await?)
    }
}

/// A private work folder on the controller's machine (mode 0700), removed when dropped; the
/// provider's secrets are delivered into it for the length of a run.
pub struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    /// Creates one under the system's temporary folder.
    pub fn new() -> Result<Self, BundleError> {
        use std::os::unix::fs::DirBuilderExt;
        let path = std::env::temp_dir().join(format!(
            "fediversity-bundle-{}-{:016x}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|source| BundleError::Io {
                file: path.display().to_string(),
                source,
            })?;
        let text = path.to_string_lossy();
        if !script::plain_word(&text) || !text.starts_with('/') {
            let _ = std::fs::remove_dir_all(&path);
            return Err(BundleError::Malformed {
                file: text.into_owned(),
                detail: "the temporary folder's path is not a plain absolute path: set TMPDIR to one".into(),
            });
        }
        Ok(Self { path })
    }

    /// The backuper whose work (and delivered secrets) stay in this folder.
    pub fn backuper(&self) -> Backuper {
        Backuper::new(
            &self.path.to_string_lossy(),
            BackupTimeouts {
                short: Duration::from_secs(120),
                long: Duration::from_secs(24 * 3600),
            },
        )
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// restic against a bundle's repository alone (its own password; no provider secret involved).
fn bundle_prologue(work: &Backuper, repository: &Path, password_file: &Path) -> String {
    format!(
        "set -eu; umask 077; export RESTIC_REPOSITORY={} RESTIC_PASSWORD_FILE={} RESTIC_CACHE_DIR={}/cache; ",
        shell_word(&repository.to_string_lossy()),
        shell_word(&password_file.to_string_lossy()),
        work.layout().dir
    )
}

async fn run_line(
    shell: &LocalShell,
    step: &'static str,
    line: &str,
    long: bool,
) -> Result<Output, BundleError> {
    let timeout = if long {
        Duration::from_secs(24 * 3600)
    } else {
        Duration::from_secs(300)
    };
    let out = shell
        .run(step, line, None, timeout)
        .await
        .map_err(BackupError::from)?;
    if out.success() {
        Ok(out)
    } else {
        Err(BundleError::Backup(BackupError::Step {
            step,
            host: shell.host_name().to_owned(),
            code: out.code,
            stderr: command::tail(if out.stderr.trim().is_empty() {
                &out.stdout
            } else {
                &out.stderr
            }),
        }))
    }
}

/// A snapshot as `restic snapshots --json` lists it, with the fields a bundle pins.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Pinned {
    /// The ID in this repository.
    pub id: String,
    /// Its tree.
    pub tree: String,
    /// The ID it was first taken under (itself when never copied).
    #[serde(default)]
    pub original: Option<String>,
    /// The host recorded.
    pub hostname: String,
    /// When it was taken.
    pub time: String,
    /// Its paths.
    #[serde(default)]
    pub paths: Vec<String>,
    /// Its tags.
    #[serde(default)]
    pub tags: Vec<String>,
}

impl Pinned {
    /// The ID of the snapshot it is a copy of (its own when it is no copy).
    pub fn original(&self) -> &str {
        self.original.as_deref().unwrap_or(&self.id)
    }
}

fn parse_pinned(step: &'static str, out: &Output) -> Result<Vec<Pinned>, BundleError> {
    let json = out
        .stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('['))
        .unwrap_or("[]");
    serde_json::from_str(json).map_err(|e| {
        BundleError::Backup(BackupError::BadOutput {
            step,
            detail: e.to_string(),
        })
    })
}

/// The snapshots of `deployment` in the provider's repository, oldest first.
pub async fn provider_snapshots(
    work: &WorkDir,
    repo: &Repository,
    deployment: &str,
) -> Result<Vec<Pinned>, BundleError> {
    let shell = LocalShell::new("the controller's machine");
    let backuper = work.backuper();
    backuper.deliver_secrets(&shell, repo).await?;
    let line = format!(
        "{}restic snapshots --json --tag {}",
        script::prologue(backuper.layout(), repo.access()),
        shell_word(&format!("fediversity,deployment={deployment}"))
    );
    let result = run_line(&shell, "list the Deployment's snapshots", &line, false).await;
    let cleaned = backuper.clean_up(&shell).await;
    let out = result?;
    cleaned?;
    let mut list = parse_pinned("restic snapshots", &out)?;
    list.sort_by(|a, b| a.time.cmp(&b.time));
    Ok(list)
}

/// Creates the bundle's repository (with its own password file, and the provider repository's chunker
/// parameters, so the copy deduplicates as the original did) and copies `ids` from the provider's
/// repository into it; returns what the bundle's repository then holds.
pub async fn copy_out(
    work: &WorkDir,
    repo: &Repository,
    repository: &Path,
    password_file: &Path,
    ids: &[String],
) -> Result<Vec<Pinned>, BundleError> {
    let shell = LocalShell::new("the controller's machine");
    let backuper = work.backuper();
    backuper.deliver_secrets(&shell, repo).await?;
    let line = format!(
        "{}export RESTIC_FROM_REPOSITORY=\"$RESTIC_REPOSITORY\" RESTIC_FROM_PASSWORD_FILE=\"$RESTIC_PASSWORD_FILE\" \
RESTIC_REPOSITORY={} RESTIC_PASSWORD_FILE={}; restic init --copy-chunker-params >/dev/null; {} >&2; restic snapshots --json",
        script::prologue(backuper.layout(), repo.access()),
        shell_word(&repository.to_string_lossy()),
        shell_word(&password_file.to_string_lossy()),
        shell_words(
            &[
                &["restic", "copy"][..],
                &ids.iter().map(String::as_str).collect::<Vec<_>>()
            ]
            .concat()
        ),
    );
    let result = run_line(&shell, "copy the snapshots into the bundle", &line, true).await;
    let cleaned = backuper.clean_up(&shell).await;
    let out = result?;
    cleaned?;
    parse_pinned("restic snapshots", &out)
}

/// What the bundle's repository holds.
pub async fn bundle_snapshots(work: &WorkDir, bundle: &Bundle) -> Result<Vec<Pinned>, BundleError> {
    list_bundle(work, &bundle.repository(), &bundle.password_file()).await
}

async fn list_bundle(work: &WorkDir, repository: &Path, password: &Path) -> Result<Vec<Pinned>, BundleError> {
    let shell = LocalShell::new("the bundle");
    let line = format!(
        "{}restic snapshots --json",
        bundle_prologue(&work.backuper(), repository, password)
    );
    let out = run_line(&shell, "list the bundle's snapshots", &line, false)
        .await
        .map_err(|e| BundleError::Repository(format!("cannot be opened with {PASSWORD_FILE}: {e}")))?;
    parse_pinned("restic snapshots", &out)
}

/// Reads host `host`'s manifest out of snapshot `id` of a bundle's repository (the files a backup
/// staged beside the data: the file listing, the checksums, each database's sums).
pub async fn manifest_in_snapshot(
    work: &WorkDir,
    repository: &Path,
    password: &Path,
    id: &str,
    staging: &str,
    databases: &[String],
) -> Result<HostManifest, BundleError> {
    let shell = LocalShell::new("the bundle");
    let pre = bundle_prologue(&work.backuper(), repository, password);
    let dump = |file: String| {
        format!(
            "{pre}restic dump {} {}",
            shell_word(id),
            shell_word(&format!("{staging}/{file}"))
        )
    };
    let stat = run_line(
        &shell,
        "read the snapshot's file listing",
        &dump("files.stat".into()),
        true,
    )
    .await?;
    let sums = run_line(
        &shell,
        "read the snapshot's checksums",
        &dump("files.sha256".into()),
        true,
    )
    .await?;
    let files = FileManifest::parse(&format!("{}\0--sha256--\0{}", stat.stdout, sums.stdout))
        .map_err(BackupError::from)?;
    let mut dbs = BTreeMap::new();
    for db in databases {
        let out = run_line(
            &shell,
            "read a database's checksums",
            &dump(format!("databases/{db}.json")),
            false,
        )
        .await?;
        dbs.insert(
            db.clone(),
            DatabaseSums::parse(&out.stdout).map_err(BackupError::from)?,
        );
    }
    Ok(HostManifest {
        files,
        databases: dbs,
    })
}

/// `restic check --read-data` of a bundle's repository: every blob proved against its ID.
pub async fn check_bundle(work: &WorkDir, bundle: &Bundle) -> Result<(), BundleError> {
    let shell = LocalShell::new("the bundle");
    let line = format!(
        "{}restic check --read-data 2>&1",
        bundle_prologue(&work.backuper(), &bundle.repository(), &bundle.password_file())
    );
    run_line(&shell, "check the bundle's repository", &line, true)
        .await
        .map(drop)
        .map_err(|e| BundleError::Repository(format!("restic check --read-data found it damaged: {e}")))
}

/// Everything that differs between a host's manifest in the bundle and the one inside its snapshot.
pub fn compare_manifests(recorded: &HostManifest, in_snapshot: &HostManifest) -> Vec<String> {
    let mut out = manifest::compare_files(&in_snapshot.files, &recorded.files);
    for (db, sums) in &in_snapshot.databases {
        match recorded.databases.get(db) {
            Some(r) => out.extend(manifest::compare_database(db, sums, r)),
            None => out.push(format!("database {db} missing")),
        }
    }
    for db in recorded.databases.keys() {
        if !in_snapshot.databases.contains_key(db) {
            out.push(format!("unexpected database {db}"));
        }
    }
    out
}

/// Checks the bundle against its repository: `restic check --read-data`, each host's snapshot
/// present with its tree, and each manifest equal to the one inside the snapshot.
pub async fn verify(work: &WorkDir, bundle: &Bundle) -> Result<(), BundleError> {
    let listed = bundle_snapshots(work, bundle).await?;
    for h in &bundle.index.hosts {
        let Some(s) = listed.iter().find(|s| s.id == h.snapshot) else {
            return Err(BundleError::Repository(format!(
                "holds no snapshot {} (host {}, listed in bundle.json)",
                h.snapshot, h.host
            )));
        };
        if s.tree != h.tree || s.original() != h.original || s.hostname != h.host {
            return Err(BundleError::Repository(format!(
                "snapshot {} is not the one bundle.json records for host {} (tree, original or host differ)",
                h.snapshot, h.host
            )));
        }
    }
    check_bundle(work, bundle).await?;
    for h in &bundle.index.hosts {
        let inside = manifest_in_snapshot(
            work,
            &bundle.repository(),
            &bundle.password_file(),
            &h.snapshot,
            &h.staging,
            &h.databases,
        )
        .await?;
        let differences = compare_manifests(&bundle.manifests[&h.host], &inside);
        if !differences.is_empty() {
            return Err(BundleError::Malformed {
                file: h.manifest.clone(),
                detail: format!(
                    "does not match the manifest inside snapshot {} of the bundle's repository: {} difference(s), first: {}",
                    &h.snapshot[..8],
                    differences.len(),
                    differences[0]
                ),
            });
        }
    }
    Ok(())
}

/// Copies the bundle's snapshots into the provider's repository (created when there is none);
/// returns what that repository then holds of the Deployment.
pub async fn copy_in(work: &WorkDir, repo: &Repository, bundle: &Bundle) -> Result<Vec<Pinned>, BundleError> {
    let shell = LocalShell::new("the controller's machine");
    let backuper = work.backuper();
    backuper.deliver_secrets(&shell, repo).await?;
    let d = &backuper.layout().dir;
    let ids: Vec<&str> = bundle.index.hosts.iter().map(|h| h.snapshot.as_str()).collect();
    let line = format!(
        "{}if ! restic cat config >/dev/null 2>{d}/config.err; then \
if grep -q 'Is there a repository at the following location' {d}/config.err; then restic init >/dev/null; \
else cat {d}/config.err >&2; exit 1; fi; fi; \
export RESTIC_FROM_REPOSITORY={} RESTIC_FROM_PASSWORD_FILE={}; {} >&2; unset RESTIC_FROM_REPOSITORY RESTIC_FROM_PASSWORD_FILE; \
restic snapshots --json --tag {}",
        script::prologue(backuper.layout(), repo.access()),
        shell_word(&bundle.repository().to_string_lossy()),
        shell_word(&bundle.password_file().to_string_lossy()),
        shell_words(&[&["restic", "copy"][..], &ids].concat()),
        shell_word(&format!("deployment={}", bundle.index.deployment)),
    );
    let result = run_line(
        &shell,
        "copy the bundle's snapshots into the repository",
        &line,
        true,
    )
    .await;
    let cleaned = backuper.clean_up(&shell).await;
    let out = result?;
    cleaned?;
    parse_pinned("restic snapshots", &out)
}

/// Writes `bytes` to `dir/rel` (creating its folder) with mode `mode`.
pub fn write_file(dir: &Path, rel: &str, bytes: &[u8], mode: u32) -> Result<(), BundleError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(rel);
    let io = |source| BundleError::Io {
        file: rel.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&path)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

/// A new random password for a bundle's repository: 32 bytes from the system's generator, as hex.
pub fn new_password() -> Result<String, BundleError> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|source| BundleError::Io {
            file: "/dev/urandom".into(),
            source,
        })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Prepares `dir` for a new bundle: created with mode 0700, or refused when it exists with content.
pub fn create_dir(dir: &Path) -> Result<(), BundleError> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.exists() {
        let empty = std::fs::read_dir(dir)
            .map_err(|source| BundleError::Io {
                file: dir.display().to_string(),
                source,
            })?
            .next()
            .is_none();
        if !empty {
            return Err(BundleError::NotEmpty(dir.display().to_string()));
        }
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| BundleError::Io {
            file: dir.display().to_string(),
            source,
        })
}

/// Reads the snapshot list of a repository folder with its password (for tests and inspection).
pub async fn snapshots_in(repository: &Path, password: &Path) -> Result<Vec<Pinned>, BundleError> {
    list_bundle(&WorkDir::new()?, repository, password).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const ID_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn index() -> Index {
        let mut files = BTreeMap::new();
        files.insert(DEPLOYMENT_FILE.to_owned(), ID_A.to_owned());
        files.insert(format!("{REPOSITORY_DIR}/config"), ID_A.to_owned());
        files.insert("manifests/op-app.json".to_owned(), ID_B.to_owned());
        Index {
            format: FORMAT,
            deployment: "op".into(),
            created_at: "2026-12-03T04:00:00Z".into(),
            final_snapshot: true,
            hosts: vec![IndexHost {
                host: "op-app".into(),
                application: "app".into(),
                snapshot: ID_A.into(),
                original: ID_B.into(),
                tree: ID_A.into(),
                time: "2026-12-03T03:59:00.123456789Z".into(),
                staging: "/var/lib/fediversity-backup/staging".into(),
                databases: vec!["app".into()],
                manifest: "manifests/op-app.json".into(),
                files: 3,
                bytes: 10,
            }],
            files,
            checksum: String::new(),
        }
    }

    fn error_of(text: &str) -> String {
        Index::parse(text).unwrap_err().to_string()
    }

    /// Seals an index after `change`, as a forger who recomputes the checksum would.
    fn sealed_with(change: impl FnOnce(&mut Index)) -> String {
        let mut i = index();
        change(&mut i);
        i.seal().1
    }

    #[test]
    fn a_sealed_index_reads_back_equal() {
        let (sealed, text) = index().seal();
        assert_eq!(Index::parse(&text).unwrap(), sealed);
        assert!(text.contains("\"final\": true"), "{text}");
    }

    #[test]
    fn an_index_changed_after_sealing_is_refused_by_its_checksum() {
        let text = index()
            .seal()
            .1
            .replace("2026-12-03T04:00:00Z", "2026-12-04T04:00:00Z");
        let e = error_of(&text);
        assert!(
            e.starts_with("bundle.json, field `checksum`: the index hashes to")
                && e.contains("changed after the export"),
            "{e}"
        );
    }

    #[test]
    fn a_newer_format_is_refused_as_such() {
        let text = index().seal().1.replace("\"format\": 1", "\"format\": 2");
        assert!(error_of(&text).contains("format 2 is not supported: this controller reads format 1"));
        assert!(error_of("{}").contains("field `format`: missing"));
        assert!(error_of("not json").starts_with("bundle.json: not JSON"));
    }

    #[test]
    fn each_bad_field_is_named_with_its_place() {
        let cases: Vec<(String, &str)> = vec![
            (
                sealed_with(|i| i.hosts[0].snapshot = "4f2a".into()),
                "field `hosts[0].snapshot`",
            ),
            (
                sealed_with(|i| i.hosts[0].host = "other-app".into()),
                "field `hosts[0].host`",
            ),
            (
                sealed_with(|i| i.hosts[0].manifest = "../x.json".into()),
                "field `hosts[0].manifest`",
            ),
            (
                sealed_with(|i| i.hosts[0].staging = "/x; rm -rf /".into()),
                "field `hosts[0].staging`",
            ),
            (sealed_with(|i| i.deployment = "Op!".into()), "field `deployment`"),
            (
                sealed_with(|i| i.hosts[0].time = "yesterday".into()),
                "field `hosts[0].time`",
            ),
            (sealed_with(|i| i.hosts.clear()), "field `hosts`"),
            (
                sealed_with(|i| {
                    i.files.remove(DEPLOYMENT_FILE);
                }),
                "has no checksum of `deployment.yaml`",
            ),
            (
                sealed_with(|i| {
                    i.files.insert("../../etc/passwd".into(), ID_A.into());
                }),
                "field `files.../../etc/passwd`",
            ),
            (
                sealed_with(|i| i.hosts.push(i.hosts[0].clone())),
                "is listed twice",
            ),
        ];
        for (text, want) in cases {
            let e = error_of(&text);
            assert!(e.starts_with("bundle.json") && e.contains(want), "{want}: {e}");
        }
        let unknown = index().seal().1.replace("\"final\"", "\"extra\": 1, \"final\"");
        assert!(error_of(&unknown).contains("unknown field `extra`"));
    }

    #[test]
    fn the_portable_deployment_drops_the_provider_fields_and_placing_it_adds_environment_and_restore() {
        let object = serde_json::json!({
            "apiVersion": "fediversity.eu/v1alpha1", "kind": "Deployment",
            "metadata": { "name": "op", "generation": 3, "annotations": { "fediversity.eu/source": "git" } },
            "spec": { "domain": "op.example", "runtimeEnvironment": "lab", "suspend": true,
                      "restore": { "snapshot": "latest" }, "applications": { "app": {} } },
            "status": { "hosts": [] }
        });
        let portable = portable_deployment(&object).unwrap();
        assert_eq!(
            portable,
            serde_json::json!({
                "apiVersion": "fediversity.eu/v1alpha1", "kind": "Deployment",
                "metadata": { "name": "op" },
                "spec": { "domain": "op.example", "applications": { "app": {} } }
            })
        );
        let placed = placed_deployment(&portable, "other", ID_A);
        assert_eq!(placed["spec"]["runtimeEnvironment"], "other");
        assert_eq!(placed["spec"]["restore"]["snapshot"], ID_A);
    }

    #[test]
    fn a_bundle_whose_file_was_changed_or_removed_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let deployment = "apiVersion: fediversity.eu/v1alpha1\nkind: Deployment\nmetadata: { name: op }\nspec: { domain: op.example, applications: { app: {} } }\n";
        let manifest = serde_json::to_vec(&HostManifest {
            files: FileManifest::default(),
            databases: BTreeMap::from([("app".to_owned(), DatabaseSums {
                meta: serde_json::from_str(
                    "{\"database\":\"app\",\"owner\":\"app\",\"encoding\":\"UTF8\",\"collate\":\"C\",\"ctype\":\"C\"}",
                )
                .unwrap(),
                tables: BTreeMap::new(),
            })]),
        })
        .unwrap();
        write_file(d, DEPLOYMENT_FILE, deployment.as_bytes(), 0o644).unwrap();
        write_file(d, "manifests/op-app.json", &manifest, 0o644).unwrap();
        write_file(d, "repository/config", b"config", 0o644).unwrap();
        write_file(d, PASSWORD_FILE, b"pw", 0o600).unwrap();
        let mut i = index();
        i.files = BTreeMap::from([
            (DEPLOYMENT_FILE.to_owned(), sha256_hex(deployment.as_bytes())),
            ("manifests/op-app.json".to_owned(), sha256_hex(&manifest)),
            ("repository/config".to_owned(), sha256_hex(b"config")),
        ]);
        write_file(d, INDEX_FILE, i.seal().1.as_bytes(), 0o644).unwrap();
        let bundle = Bundle::open(d).unwrap();
        assert_eq!(bundle.deployment["spec"]["domain"], "op.example");
        assert_eq!(bundle.manifests["op-app"].databases.len(), 1);

        std::fs::write(d.join("manifests/op-app.json"), b"{}").unwrap();
        let e = Bundle::open(d).unwrap_err().to_string();
        assert!(
            e.starts_with("manifests/op-app.json: its SHA-256 is") && e.contains("changed after the export"),
            "{e}"
        );
        std::fs::remove_dir_all(d.join("repository")).unwrap();
        let e = Bundle::open(d).unwrap_err().to_string();
        assert_eq!(
            e,
            "repository/: missing from the bundle (was it copied completely?)"
        );
    }

    #[test]
    fn a_manifest_that_differs_from_its_snapshots_names_each_file_and_table() {
        let meta = serde_json::from_str(
            "{\"database\":\"app\",\"owner\":\"app\",\"encoding\":\"UTF8\",\"collate\":\"C\",\"ctype\":\"C\"}",
        )
        .unwrap();
        let table = |rows| manifest::TableSum {
            rows,
            checksum: "7".into(),
        };
        let entry = |sha: &str| manifest::Entry {
            kind: 'f',
            mode: "644".into(),
            owner: "root:root".into(),
            size: Some(1),
            sha256: Some(sha.into()),
            link: None,
        };
        let inside = HostManifest {
            files: FileManifest {
                entries: BTreeMap::from([("/d/a".to_owned(), entry(ID_A))]),
            },
            databases: BTreeMap::from([(
                "app".to_owned(),
                DatabaseSums {
                    meta,
                    tables: BTreeMap::from([("public.t".to_owned(), table(2))]),
                },
            )]),
        };
        assert!(compare_manifests(&inside, &inside).is_empty());
        let mut recorded = inside.clone();
        recorded.files.entries.insert("/d/a".into(), entry(ID_B));
        recorded
            .databases
            .get_mut("app")
            .unwrap()
            .tables
            .insert("public.t".into(), table(3));
        assert_eq!(
            compare_manifests(&recorded, &inside),
            vec![
                "content differs: /d/a",
                "database app: table public.t has 3 rows instead of 2"
            ]
        );
        recorded.databases.clear();
        assert!(compare_manifests(&recorded, &inside).contains(&"database app missing".to_owned()));
    }

    #[test]
    fn a_new_password_is_long_and_different_each_time() {
        let (a, b) = (new_password().unwrap(), new_password().unwrap());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }
}
