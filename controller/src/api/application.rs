//! `Application`: a catalog entry such as Mastodon — its NixOS module, sizes and what an operator may set.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::meta::{Condition, Name};
use super::validate::{self, Problems, Validate};
use crate::yaml::FieldPath;

/// A Fediverse application the provider offers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ApplicationSpec {
    /// The name shown to operators, e.g. `Mastodon`.
    pub display_name: String,
    /// A sentence on what it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The NixOS module that turns settings into configuration, relative to the catalog root.
    pub nixos_module: String,
    /// The VM sizes on offer, by name.
    pub sizes: BTreeMap<Name, Size>,
    /// The size used when a Deployment names none (default: the first size by name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_size: Option<Name>,
    /// A JSON Schema (an `object` schema) of the settings an operator may give.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "serde_json::Map<String, serde_json::Value>")]
    pub settings: Option<serde_json::Value>,
    /// Services the application needs from its host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<Requirement>,
    /// How to tell it is up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// What a backup or a move to another provider must carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataSpec>,
}

/// The resources of one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Size {
    /// Virtual CPU cores.
    pub cores: u32,
    /// Memory in MiB.
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
    /// Size of the system disk in GiB (disks only ever grow).
    #[serde(rename = "diskGiB")]
    pub disk_gib: u64,
}

/// Smallest memory a NixOS guest boots with, in MiB.
pub const MIN_MEMORY_MIB: u64 = 256;
/// Most cores Proxmox VE allows per socket (`cores` maximum in the qemu config schema).
pub const MAX_CORES: u32 = 1024;

/// A service the application needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Requirement {
    /// A PostgreSQL database on the host.
    Postgresql,
    /// A Redis server on the host.
    Redis,
    /// S3-compatible object storage.
    ObjectStorage,
    /// An outgoing mail relay.
    Smtp,
}

/// An HTTP health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HealthCheck {
    /// The path to request, e.g. `/health`.
    pub path: String,
    /// The status code that means healthy.
    #[serde(default = "default_expect_status")]
    pub expect_status: u16,
}

fn default_expect_status() -> u16 {
    200
}

/// What an application's state consists of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DataSpec {
    /// Directories holding state.
    #[serde(default)]
    pub paths: Vec<String>,
    /// PostgreSQL databases holding state.
    #[serde(default)]
    pub databases: Vec<String>,
    /// The systemd units that write the data, held stopped while it is restored (e.g. `mastodon.target`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
}

/// What the controller observed of an application.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApplicationStatus {
    /// The generation last acted upon.
    #[serde(default)]
    pub observed_generation: u64,
    /// Current conditions.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The token of the last on-demand reconcile request handled (`fediversity reconcile --wait`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_reconcile_at: Option<String>,
}

impl ApplicationSpec {
    /// The size a Deployment gets when it names none.
    pub fn default_size_name(&self) -> Option<&Name> {
        self.default_size.as_ref().or_else(|| self.sizes.keys().next())
    }
}

impl Validate for ApplicationSpec {
    fn validate(&self, path: &FieldPath, problems: &mut Problems) {
        if self.display_name.trim().is_empty() {
            problems.push(
                &path.key("displayName"),
                "give the name operators see, e.g. `Mastodon`",
            );
        }
        problems.check(
            &path.key("nixosModule"),
            validate::relative_nix_path(&self.nixos_module),
        );
        if self.sizes.is_empty() {
            problems.push(
                &path.key("sizes"),
                "offer at least one size, e.g. `small: { cores: 2, memoryMiB: 4096, diskGiB: 40 }`",
            );
        }
        for (name, size) in &self.sizes {
            let at = path.key("sizes").key(name.as_str());
            name.validate(&at, problems);
            if size.cores == 0 || size.cores > MAX_CORES {
                problems.push(
                    &at.key("cores"),
                    format!("{} cores is impossible: give 1 to {MAX_CORES}", size.cores),
                );
            }
            if size.memory_mib < MIN_MEMORY_MIB {
                problems.push(
                    &at.key("memoryMiB"),
                    format!(
                        "{} MiB is too little memory: NixOS needs at least {MIN_MEMORY_MIB} MiB",
                        size.memory_mib
                    ),
                );
            }
            if size.disk_gib == 0 {
                problems.push(&at.key("diskGiB"), "a 0 GiB disk is impossible: give at least 1");
            }
        }
        if let Some(default) = &self.default_size
            && !self.sizes.contains_key(default)
        {
            problems.push(
                &path.key("defaultSize"),
                format!("`{default}` is not one of the sizes offered"),
            );
        }
        if let Some(schema) = &self.settings {
            let is_object_schema = schema
                .as_object()
                .is_some_and(|o| o.get("type").and_then(|t| t.as_str()) == Some("object"));
            if !is_object_schema {
                problems.push(
                    &path.key("settings"),
                    "must be a JSON Schema with `type: object` describing the settings an operator may give",
                );
            }
        }
        if let Some(check) = &self.health_check {
            let at = path.key("healthCheck");
            if !check.path.starts_with('/') || check.path.contains(char::is_whitespace) {
                problems.push(
                    &at.key("path"),
                    format!("`{}` must be a URL path starting with `/`", check.path),
                );
            }
            if !(100..=599).contains(&check.expect_status) {
                problems.push(
                    &at.key("expectStatus"),
                    format!("{} is not an HTTP status code (100 to 599)", check.expect_status),
                );
            }
        }
        if let Some(data) = &self.data {
            for (i, p) in data.paths.iter().enumerate() {
                problems.check(
                    &path.key("data").key("paths").index(i),
                    validate::absolute_path(p),
                );
            }
            for (i, db) in data.databases.iter().enumerate() {
                if db.is_empty()
                    || !db
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                {
                    problems.push(
                        &path.key("data").key("databases").index(i),
                        format!("`{db}` is not a database name"),
                    );
                }
            }
            for (i, unit) in data.services.iter().enumerate() {
                let (stem, kind) = unit.rsplit_once('.').unwrap_or((unit, ""));
                let ok = !stem.is_empty()
                    && ["service", "target", "timer", "socket"].contains(&kind)
                    && stem
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_@.:".contains(&b));
                if !ok {
                    problems.push(
                        &path.key("data").key("services").index(i),
                        format!("`{unit}` is not a systemd unit name such as `mastodon.target` or `peertube.service`"),
                    );
                }
            }
        }
    }
}
