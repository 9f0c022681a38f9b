//! The typed status of each kind, and the pure steps that build it from what a reconcile found.

use std::collections::BTreeMap;

use crate::api::{
    ApplicationStatus, Condition, DeploymentStatus, DnsStatus, HostStatus, Kind, MigrationStatus, ObjectKey,
    RuntimeEnvironmentStatus,
};
use crate::provider::EnvironmentFacts;
use crate::state::StatusBook;

/// The status of an object of any kind, typed by its kind.
#[derive(Debug, Clone, PartialEq)]
pub enum AnyStatus {
    /// A RuntimeEnvironment's.
    RuntimeEnvironment(RuntimeEnvironmentStatus),
    /// An Application's.
    Application(ApplicationStatus),
    /// A Deployment's.
    Deployment(Box<DeploymentStatus>),
}

impl AnyStatus {
    /// The empty status of `kind`.
    pub fn empty(kind: Kind) -> Self {
        match kind {
            Kind::RuntimeEnvironment => Self::RuntimeEnvironment(RuntimeEnvironmentStatus::default()),
            Kind::Application => Self::Application(ApplicationStatus::default()),
            Kind::Deployment => Self::Deployment(Box::default()),
        }
    }

    /// `key`'s stored status, typed; `None` when there is none (or it cannot be read as its kind's).
    pub fn load(book: &StatusBook, key: &ObjectKey) -> Option<Self> {
        Some(match key.kind {
            Kind::RuntimeEnvironment => Self::RuntimeEnvironment(book.typed_status(key)?),
            Kind::Application => Self::Application(book.typed_status(key)?),
            Kind::Deployment => Self::Deployment(book.typed_status(key)?),
        })
    }

    /// Writes it as `key`'s status (serialized once); returns whether it changed.
    pub fn save(&self, book: &StatusBook, key: &ObjectKey) -> bool {
        match self {
            Self::RuntimeEnvironment(s) => book.put_typed_status(key, s),
            Self::Application(s) => book.put_typed_status(key, s),
            Self::Deployment(s) => book.put_typed_status(key, s.as_ref()),
        }
    }

    /// Its conditions.
    pub fn conditions(&self) -> &Vec<Condition> {
        match self {
            Self::RuntimeEnvironment(s) => &s.conditions,
            Self::Application(s) => &s.conditions,
            Self::Deployment(s) => &s.conditions,
        }
    }

    /// Its conditions, to change.
    pub fn conditions_mut(&mut self) -> &mut Vec<Condition> {
        match self {
            Self::RuntimeEnvironment(s) => &mut s.conditions,
            Self::Application(s) => &mut s.conditions,
            Self::Deployment(s) => &mut s.conditions,
        }
    }

    /// Records that `generation` was acted upon, and the on-demand request `token` handled (if any).
    pub fn observed(&mut self, generation: u64, token: Option<String>) {
        let (observed, handled) = match self {
            Self::RuntimeEnvironment(s) => (&mut s.observed_generation, &mut s.last_handled_reconcile_at),
            Self::Application(s) => (&mut s.observed_generation, &mut s.last_handled_reconcile_at),
            Self::Deployment(s) => (&mut s.observed_generation, &mut s.last_handled_reconcile_at),
        };
        *observed = generation;
        if token.is_some() {
            *handled = token;
        }
    }
}

/// Sets what a provider observed of an environment (all of it: each check observes everything anew).
pub fn apply_environment_facts(status: &mut RuntimeEnvironmentStatus, facts: EnvironmentFacts) {
    let EnvironmentFacts {
        version,
        nodes,
        vms_owned,
        vms_orphaned,
        template_present,
        insecure,
        warnings,
    } = facts;
    status.version = version;
    status.nodes = nodes;
    status.vms_owned = vms_owned;
    status.vms_orphaned = vms_orphaned;
    status.template_present = template_present;
    status.insecure = insecure;
    status.warnings = warnings;
}

/// What a Deployment's reconcile found, for its status: each field that is `None` keeps what status
/// already says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeploymentFacts {
    /// `status.hosts`.
    pub hosts: Option<Vec<HostStatus>>,
    /// `status.endpoints`.
    pub endpoints: Option<BTreeMap<String, String>>,
    /// `status.dns`.
    pub dns: Option<DnsStatus>,
    /// `status.runtimeEnvironment`: where the hosts were converged.
    pub runtime_environment: Option<String>,
    /// `status.migration`.
    pub migration: Option<MigrationStatus>,
    /// `status.migrationGeneration`.
    pub migration_generation: Option<u64>,
}

impl DeploymentFacts {
    /// Sets what was found on `status`, keeping the fields nothing was found for.
    pub fn apply(self, status: &mut DeploymentStatus) {
        let Self {
            hosts,
            endpoints,
            dns,
            runtime_environment,
            migration,
            migration_generation,
        } = self;
        if let Some(hosts) = hosts {
            status.hosts = hosts;
        }
        if let Some(endpoints) = endpoints {
            status.endpoints = endpoints;
        }
        if dns.is_some() {
            status.dns = dns;
        }
        if runtime_environment.is_some() {
            status.runtime_environment = runtime_environment;
        }
        if migration.is_some() {
            status.migration = migration;
        }
        if migration_generation.is_some() {
            status.migration_generation = migration_generation;
        }
    }
}

/// Records the source revision tried, and the one live once it is Ready.
pub fn record_revision(status: &mut DeploymentStatus, revision: &str, ready: bool) {
    status.last_attempted_revision = Some(revision.to_owned());
    if ready {
        status.last_applied_revision = Some(revision.to_owned());
    }
}

#[cfg(test)]
mod tests;
