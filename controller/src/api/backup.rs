//! Backup and restore settings: `RuntimeEnvironment.spec.backup`, `Deployment.spec.restore`, and their status.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::meta::Name;
use super::time::Timestamp;
use super::validate::{self, Problems, Validate};
use crate::yaml::FieldPath;

/// Where and how often the hosts of an environment are backed up (with restic).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackupSpec {
    /// The restic repository: `sftp:user@host:/path`, `s3:https://…/bucket/path`, `rest:https://…/`, or
    /// an absolute path on the hosts.
    pub repository: String,
    /// The file (on the controller's machine) holding the repository password.
    pub password_file: String,
    /// A file of `KEY=value` lines with the backend's credentials (e.g. `AWS_ACCESS_KEY_ID`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment_file: Option<String>,
    /// For `sftp:` repositories: the private key (on the controller's machine) hosts log in with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sftp_identity_file: Option<String>,
    /// For `sftp:` repositories: a known_hosts file pinning the SFTP server's host key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sftp_known_hosts_file: Option<String>,
    /// How often each host is backed up: a number and a unit, `30m`, `6h`, `1d`.
    #[serde(default = "default_schedule")]
    pub schedule: String,
    /// Which snapshots `restic forget --prune` keeps.
    #[serde(default)]
    pub retention: Retention,
    /// Most hosts backed up at once in this environment.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: u32,
    /// How often the repository is checked (`restic check`), e.g. `7d`.
    #[serde(default = "default_check_every")]
    pub check_every: String,
    /// The share of pack data a periodic check reads, `1%` to `100%`.
    #[serde(default = "default_check_read")]
    pub check_read_data: String,
}

fn default_schedule() -> String {
    "1d".into()
}

fn default_max_concurrent() -> u32 {
    2
}

fn default_check_every() -> String {
    "7d".into()
}

fn default_check_read() -> String {
    "5%".into()
}

/// How many snapshots per host are kept by period (restic's `--keep-daily` and siblings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Retention {
    /// The last snapshot of each of the last N days.
    #[serde(default = "default_daily")]
    pub daily: u32,
    /// The last snapshot of each of the last N weeks.
    #[serde(default = "default_weekly")]
    pub weekly: u32,
    /// The last snapshot of each of the last N months.
    #[serde(default = "default_monthly")]
    pub monthly: u32,
}

fn default_daily() -> u32 {
    7
}

fn default_weekly() -> u32 {
    4
}

fn default_monthly() -> u32 {
    6
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            daily: default_daily(),
            weekly: default_weekly(),
            monthly: default_monthly(),
        }
    }
}

impl BackupSpec {
    /// The backup interval (validated specs always have one).
    pub fn interval(&self) -> Duration {
        parse_interval(&self.schedule).unwrap_or(Duration::from_secs(86_400))
    }

    /// The interval between repository checks.
    pub fn check_interval(&self) -> Duration {
        parse_interval(&self.check_every).unwrap_or(Duration::from_secs(7 * 86_400))
    }
}

/// Parses `90s`, `30m`, `6h`, `1d`, `2w`: a positive whole number and one unit.
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not an interval: give a number and a unit, e.g. `6h` or `1d`"))?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => {
            return Err(format!(
                "`{text}` has no known unit: use s, m, h, d or w, e.g. `6h` or `1d`"
            ));
        }
    };
    if n == 0 {
        return Err(format!("`{text}` is zero: give a positive interval"));
    }
    n.checked_mul(unit_secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("`{text}` is too long"))
}

/// Checks a restic `--read-data-subset` share: `N%` with N from 1 to 100.
fn check_share(text: &str) -> Result<(), String> {
    let ok = text
        .strip_suffix('%')
        .and_then(|n| n.parse::<u32>().ok())
        .is_some_and(|n| (1..=100).contains(&n));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{text}` is not a share: give a percentage from `1%` to `100%`"
        ))
    }
}

/// Checks a restic repository string: one of restic's backends, or an absolute path.
fn check_repository(text: &str) -> Result<(), String> {
    if text.chars().any(char::is_control) || text.trim() != text || text.is_empty() {
        return Err("give the restic repository without spaces around it or control characters".into());
    }
    const BACKENDS: &[&str] = &[
        "sftp:", "s3:", "rest:", "b2:", "azure:", "gs:", "swift:", "rclone:", "local:",
    ];
    if text.starts_with('/')
        || BACKENDS
            .iter()
            .any(|b| text.starts_with(b) && text.len() > b.len())
    {
        Ok(())
    } else {
        Err(format!(
            "`{text}` is not a restic repository: use `sftp:user@host:/path`, `s3:…`, `rest:…` or an absolute path"
        ))
    }
}

impl Validate for BackupSpec {
    fn validate(&self, path: &FieldPath, problems: &mut Problems) {
        problems.check(&path.key("repository"), check_repository(&self.repository));
        problems.check(
            &path.key("passwordFile"),
            validate::secret_file(&self.password_file),
        );
        if let Some(env) = &self.environment_file {
            problems.check(&path.key("environmentFile"), validate::secret_file(env));
        }
        for (field, file) in [
            ("sftpIdentityFile", &self.sftp_identity_file),
            ("sftpKnownHostsFile", &self.sftp_known_hosts_file),
        ] {
            if let Some(file) = file {
                problems.check(&path.key(field), validate::secret_file(file));
                if !self.repository.starts_with("sftp:") {
                    problems.push(&path.key(field), "only used with an `sftp:` repository");
                }
            }
        }
        if self.repository.starts_with("sftp:") {
            problems.check(
                &path.key("repository"),
                SftpRepository::parse(&self.repository).map(drop),
            );
            if self.sftp_identity_file.is_none() != self.sftp_known_hosts_file.is_none() {
                problems.push(
                    path,
                    "give both `sftpIdentityFile` and `sftpKnownHostsFile` (or neither, when the hosts' own SSH setup reaches the server)",
                );
            }
        }
        problems.check(&path.key("schedule"), parse_interval(&self.schedule).map(drop));
        problems.check(
            &path.key("checkEvery"),
            parse_interval(&self.check_every).map(drop),
        );
        problems.check(&path.key("checkReadData"), check_share(&self.check_read_data));
        let r = self.retention;
        if r.daily == 0 && r.weekly == 0 && r.monthly == 0 {
            problems.push(
                &path.key("retention"),
                "keep at least one snapshot: give `daily`, `weekly` or `monthly` above 0",
            );
        }
        if self.max_concurrent == 0 {
            problems.push(&path.key("maxConcurrent"), "must be at least 1");
        }
    }
}

/// The parts of an `sftp:` repository: `sftp:user@host:/path` or `sftp://user@host:port//path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftpRepository {
    /// The login user.
    pub user: String,
    /// The server.
    pub host: String,
    /// Its SSH port.
    pub port: u16,
    /// The repository's path on the server.
    pub path: String,
}

impl SftpRepository {
    /// Parses the repository string; user and host must be plain words (they reach an SSH command line).
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "`{text}` is not an sftp repository: use `sftp:user@host:/path` or `sftp://user@host:port//path`"
            )
        };
        let (authority, path, port) = if let Some(rest) = text.strip_prefix("sftp://") {
            let (authority, path) = rest.split_once('/').ok_or_else(bad)?;
            let (authority, port) = match authority.rsplit_once(':') {
                Some((a, p)) => (a, p.parse::<u16>().map_err(|_| bad())?),
                None => (authority, 22),
            };
            (authority, path.to_owned(), port)
        } else {
            let rest = text.strip_prefix("sftp:").ok_or_else(bad)?;
            let (authority, path) = rest.split_once(':').ok_or_else(bad)?;
            (authority, path.to_owned(), 22)
        };
        let (user, host) = authority.split_once('@').ok_or_else(bad)?;
        let plain = |s: &str| {
            !s.is_empty()
                && !s.starts_with('-')
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        };
        if !plain(user) || !plain(host) || path.is_empty() || port == 0 {
            return Err(bad());
        }
        Ok(Self {
            user: user.to_owned(),
            host: host.to_owned(),
            port,
            path,
        })
    }
}

/// A Deployment's request that its hosts start from a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RestoreSpec {
    /// `latest`, or a snapshot ID (8 to 64 hexadecimal digits) as `fediversity get backups` lists them.
    #[serde(default = "default_snapshot")]
    pub snapshot: String,
    /// The RuntimeEnvironment whose repository holds the snapshot (default: the Deployment's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_environment: Option<Name>,
}

fn default_snapshot() -> String {
    "latest".into()
}

impl Validate for RestoreSpec {
    fn validate(&self, path: &FieldPath, problems: &mut Problems) {
        let s = &self.snapshot;
        let is_id = (8..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit());
        if s != "latest" && !is_id {
            problems.push(
                &path.key("snapshot"),
                format!("`{s}` is neither `latest` nor a snapshot ID (8 to 64 hexadecimal digits)"),
            );
        }
        if let Some(env) = &self.from_environment {
            env.validate(&path.key("fromEnvironment"), problems);
        }
    }
}

/// The last backup of one host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostBackupStatus {
    /// The host, `<deployment>-<application>`.
    pub host: String,
    /// `Succeeded`, `Failed` or `Running`.
    pub result: String,
    /// The last good snapshot's ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// When the last good backup finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Timestamp>,
    /// Bytes the last good backup added to the repository.
    #[serde(default)]
    pub bytes_added: u64,
    /// Bytes the last good snapshot holds.
    #[serde(default)]
    pub total_bytes: u64,
    /// Files the last good snapshot holds.
    #[serde(default)]
    pub files: u64,
    /// Milliseconds the last good backup took.
    #[serde(default)]
    pub duration_millis: u64,
    /// Why the last attempt failed (secrets never appear here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Failed attempts since the last good backup.
    #[serde(default)]
    pub failures: u32,
}

/// What a restore did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreStatus {
    /// The snapshot restored, per host.
    #[serde(default)]
    pub hosts: Vec<HostRestoreStatus>,
}

/// What a restore did on one host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostRestoreStatus {
    /// The host.
    pub host: String,
    /// The snapshot ID restored.
    pub snapshot: String,
    /// `Restored`, `Failed` or `Running`.
    pub result: String,
    /// Whether the file manifest and the database checksums matched the snapshot's.
    pub verified: bool,
    /// Files and tables that differ (empty when verified).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub differences: Vec<String>,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Timestamp>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_take_a_number_and_a_unit() {
        assert_eq!(parse_interval("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_interval("6h"), Ok(Duration::from_secs(6 * 3600)));
        assert_eq!(parse_interval("1d"), Ok(Duration::from_secs(86_400)));
        assert!(parse_interval("0h").unwrap_err().contains("zero"));
        assert!(parse_interval("6 hours").unwrap_err().contains("unit"));
        assert!(parse_interval("h").is_err());
    }

    #[test]
    fn repositories_must_name_a_restic_backend_or_an_absolute_path() {
        assert!(check_repository("sftp:backup@host:/srv/restic").is_ok());
        assert!(check_repository("s3:https://s3.example/bucket").is_ok());
        assert!(check_repository("/srv/restic").is_ok());
        assert!(check_repository("backups").is_err());
        assert!(check_repository("sftp:").is_err());
        assert!(check_repository("/a\nb").is_err());
    }

    #[test]
    fn sftp_repositories_are_split_into_user_host_port_and_path() {
        let r = SftpRepository::parse("sftp:backup@127.0.0.1:/srv/restic").unwrap();
        assert_eq!(
            (r.user.as_str(), r.host.as_str(), r.port, r.path.as_str()),
            ("backup", "127.0.0.1", 22, "/srv/restic")
        );
        let r = SftpRepository::parse("sftp://root@h.example:2222//srv/r").unwrap();
        assert_eq!((r.port, r.path.as_str()), (2222, "/srv/r"));
        assert!(SftpRepository::parse("sftp:-oProxyCommand=x@h:/r").is_err());
        assert!(SftpRepository::parse("sftp:h:/r").is_err());
    }

    #[test]
    fn a_bad_backup_spec_names_each_field_and_never_echoes_an_inline_password() {
        let spec: BackupSpec = yaml_serde::from_str(
            "repository: backups\npasswordFile: hunter2\nschedule: daily\nretention: { daily: 0, weekly: 0, monthly: 0 }\nmaxConcurrent: 0\ncheckReadData: 150%\n",
        )
        .unwrap();
        let mut problems = Problems::default();
        spec.validate(&FieldPath::root().key("spec").key("backup"), &mut problems);
        let found: Vec<(String, String)> = problems
            .into_vec()
            .into_iter()
            .map(|(p, m)| (p.to_string(), m))
            .collect();
        let fields: Vec<&str> = found.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "spec.backup.repository",
                "spec.backup.passwordFile",
                "spec.backup.schedule",
                "spec.backup.checkReadData",
                "spec.backup.retention",
                "spec.backup.maxConcurrent",
            ]
        );
        assert!(found.iter().all(|(_, m)| !m.contains("hunter2")), "{found:?}");
    }

    #[test]
    fn a_restore_names_latest_or_a_snapshot_id() {
        let mut problems = Problems::default();
        let ok = RestoreSpec {
            snapshot: "4f2a9c1d".into(),
            from_environment: None,
        };
        ok.validate(&FieldPath::root(), &mut problems);
        assert!(problems.is_empty());
        let bad = RestoreSpec {
            snapshot: "yesterday".into(),
            from_environment: None,
        };
        bad.validate(&FieldPath::root(), &mut problems);
        assert_eq!(problems.into_vec().len(), 1);
    }
}
