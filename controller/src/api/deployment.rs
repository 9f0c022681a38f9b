//! `Deployment`: one operator's desired state — a domain, the applications it wants and their settings.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::meta::{Condition, Name};
use super::time::Timestamp;
use super::validate::{self, Problems, Validate};
use crate::yaml::FieldPath;

/// The single file an operator edits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DeploymentSpec {
    /// The operator's domain; each application is served under a name in it.
    pub domain: String,
    /// The RuntimeEnvironment to run on.
    pub runtime_environment: Name,
    /// The applications, by catalog name, and the operator's choices for each.
    pub applications: BTreeMap<Name, ApplicationChoice>,
    /// The first account to create in each application.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_user: Option<InitialUser>,
    /// What happens to VMs and data when the Deployment is removed.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// Stops new reconciles of this Deployment (the one in flight finishes).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,
    /// Start new hosts from a backup snapshot instead of empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<super::RestoreSpec>,
}

/// An operator's choices for one application.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ApplicationChoice {
    /// Whether the application runs.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// One of the Application's sizes (default: its `defaultSize`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Name>,
    /// Settings, checked against the Application's settings schema.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub settings: serde_json::Map<String, serde_json::Value>,
}

fn default_true() -> bool {
    true
}

/// The first account of each application.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct InitialUser {
    /// The account's display name.
    pub display_name: String,
    /// Where the account's invitation goes.
    pub email: String,
}

/// What removal of a Deployment does to what it created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum DeletionPolicy {
    /// Keep VMs and data; only stop managing them (the default: nothing is lost by mistake).
    #[default]
    Retain,
    /// Stop and destroy the VMs this Deployment created.
    Delete,
}

/// What the controller observed of a Deployment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentStatus {
    /// The generation last acted upon.
    #[serde(default)]
    pub observed_generation: u64,
    /// Current conditions.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The token of the last on-demand reconcile request handled (`fediversity reconcile --wait`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_reconcile_at: Option<String>,
    /// The hosts planned for this Deployment and what is known of each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<HostStatus>,
    /// The public URL of each application.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub endpoints: BTreeMap<String, String>,
    /// The source revision (git commit or content hash) that is live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_applied_revision: Option<String>,
    /// The source revision last tried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempted_revision: Option<String>,
    /// The names kept in the provider's zone, and the records the operator must set at their domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsStatus>,
    /// The last backup of each host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backups: Vec<super::HostBackupStatus>,
    /// What the restore asked by `spec.restore` did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<super::RestoreStatus>,
    /// The token of the last on-demand backup handled (`fediversity backup`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_backup_at: Option<String>,
    /// The token of the last in-place restore handled (`fediversity restore --confirm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_restore_at: Option<String>,
    /// The token of the last final backup handled (`fediversity export --final`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_final_backup_at: Option<String>,
    /// The RuntimeEnvironment the hosts were last converged in: a later change of
    /// `spec.runtimeEnvironment` moves them from there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_environment: Option<String>,
    /// The generation whose change began the last migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_generation: Option<u64>,
    /// The last migration between RuntimeEnvironments, running or ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationStatus>,
    /// The final backup taken for an export (`fediversity export --final`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<ExportStatus>,
}

/// `status.migration` of a Deployment: where its move between RuntimeEnvironments stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    /// Where it stands.
    pub phase: String,
    /// The environment it leaves.
    pub from: String,
    /// The environment it moves to.
    pub to: String,
    /// When it started.
    pub started: Timestamp,
    /// When the current phase started.
    pub phase_started: Timestamp,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<Timestamp>,
    /// Bytes copied by the pre-copy.
    pub bytes_pre_copied: u64,
    /// Bytes copied by the final copy.
    pub bytes_finally_copied: u64,
    /// Seconds without service (so far, while it lasts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_seconds: Option<f64>,
    /// Whether the target's data matched the source's.
    pub verified: bool,
    /// What became of the source.
    pub source: String,
    /// When the source is destroyed (under `Delete`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_destroyed_after: Option<Timestamp>,
    /// Where it failed or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_in: Option<String>,
    /// Why it failed, was cancelled, or why the current attempt is retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Why the environment now asked for cannot be reached from where the migration stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// Set when the target started from the last backups because the source could not be reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_backup: Option<FromBackupStatus>,
}

/// `status.migration.fromBackup`: the snapshots the target started from, and the data-loss window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FromBackupStatus {
    /// The snapshot of each host, by host name.
    pub snapshots: BTreeMap<String, String>,
    /// When the oldest was taken: writes after it were lost.
    pub writes_lost_after: String,
}

/// `status.export` of a Deployment: the final backup of each host taken for an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExportStatus {
    /// Whether the services were stopped before the snapshots (always true for a final backup).
    #[serde(rename = "final")]
    pub final_: bool,
    /// When it was taken.
    pub time: Timestamp,
    /// One entry per host.
    #[serde(default)]
    pub hosts: Vec<ExportHostStatus>,
}

/// The final backup of one host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExportHostStatus {
    /// The host, `<deployment>-<application>`.
    pub host: String,
    /// The application it runs.
    pub application: String,
    /// `Succeeded` or `Failed`.
    pub result: String,
    /// The final snapshot's ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The systemd units stopped (and left stopped) for the snapshot.
    #[serde(default)]
    pub services_stopped: Vec<String>,
}

/// The names the controller keeps for a Deployment's hosts, and what the operator must set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DnsStatus {
    /// The provider's zone.
    pub zone: String,
    /// One entry per host name the controller manages.
    #[serde(default)]
    pub records: Vec<DnsRecordStatus>,
    /// The records the operator must set at their own domain.
    #[serde(default)]
    pub operator_records: Vec<OperatorRecord>,
}

/// One managed name in the provider's zone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DnsRecordStatus {
    /// The host, `<deployment>-<application>`.
    pub host: String,
    /// The fully qualified name, `<deployment>-<application>.<zone>.`.
    pub name: String,
    /// The addresses its A/AAAA records hold (or should hold).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// `Published`, `WaitingForAddress`, `Conflict`, `Failed` or `Retained`.
    pub state: String,
    /// Why it is not published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A record the operator sets at their own domain so that it leads to a host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OperatorRecord {
    /// The operator's name, e.g. `mastodon.social.uu.nl.`.
    pub name: String,
    /// `CNAME`.
    #[serde(rename = "type")]
    pub type_: String,
    /// Where it points: the host's name in the provider's zone.
    pub value: String,
    /// What to set instead where a CNAME is impossible (at a zone apex): `A <address>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub at_apex: Vec<String>,
    /// Whether the name resolves to the host through the environment's resolver (unset: not checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolves: Option<bool>,
}

/// What is known of one host of a Deployment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostStatus {
    /// `<deployment>-<application>`.
    pub name: String,
    /// Where it is in its lifecycle, e.g. `Cloning`, `Starting`, `Ready`.
    #[serde(default)]
    pub phase: String,
    /// Its Proxmox VMID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmid: Option<u32>,
    /// The Proxmox node it runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Its IP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Its name in the provider's DNS zone, `<deployment>-<application>.<zone>.`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_name: Option<String>,
    /// The NixOS system store path it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// When that system was activated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activated_at: Option<Timestamp>,
    /// The NixOS system store path it should run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_system: Option<String>,
    /// The generation of its system profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u32>,
    /// The outcome of the last NixOS deploy: `Applied`, `FailedRolledBack`, `UnconfirmedRolledBack`,
    /// `Unreachable` or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_result: Option<String>,
    /// What the last NixOS deploy did or why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Milliseconds per step of the last NixOS deploy (`build`, `inspect`, `copy`, `activate`, …).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub step_millis: BTreeMap<String, u64>,
}

impl Validate for DeploymentSpec {
    fn validate(&self, path: &FieldPath, problems: &mut Problems) {
        problems.check(&path.key("domain"), validate::domain(&self.domain));
        self.runtime_environment
            .validate(&path.key("runtimeEnvironment"), problems);
        if self.applications.is_empty() {
            problems.push(
                &path.key("applications"),
                "choose at least one application, e.g. `mastodon: { enabled: true }`",
            );
        }
        for (name, choice) in &self.applications {
            let at = path.key("applications").key(name.as_str());
            name.validate(&at, problems);
            if let Some(size) = &choice.size {
                size.validate(&at.key("size"), problems);
            }
        }
        if let Some(user) = &self.initial_user {
            let at = path.key("initialUser");
            if user.display_name.trim().is_empty() {
                problems.push(
                    &at.key("displayName"),
                    "give the display name of the first account",
                );
            }
            problems.check(&at.key("email"), validate::email(&user.email));
        }
        if let Some(restore) = &self.restore {
            restore.validate(&path.key("restore"), problems);
        }
    }
}
