//! The seam between the reconcilers and the infrastructure that makes hosts real: what a provider is
//! given, what it reports, and how it records events and progress. Providers depend on this module and
//! the layers below it only, never on the reconcilers, the status book or the daemon.

pub mod progress;
pub mod settings;

use std::time::Duration;

use crate::api::{
    ConditionStatus, Deployment, DeploymentStatus, DnsStatus, EventType, HostStatus, Name, Object, ObjectKey,
    RuntimeEnvironment, Size, condition_types,
};
use crate::runtime::{BoxFuture, ReconcileError};

/// One host a Deployment needs: by default one VM per enabled application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedHost {
    /// `<deployment>-<application>`.
    pub name: String,
    /// The application it runs.
    pub application: Name,
    /// The size chosen.
    pub size_name: Name,
    /// The resources of that size.
    pub size: Size,
    /// The public host name, `<application>.<domain>`.
    pub fqdn: String,
}

/// What a provider may read of the desired objects (the catalog's Applications, environments, whether
/// a Deployment is still wanted), without depending on where they are kept.
pub trait Objects: Send + Sync + 'static {
    /// The desired object under `key`, if it is present in a source.
    fn object(&self, key: &ObjectKey) -> Option<Object>;
    /// Whether `key` is desired, or was removed and its cleanup has not finished.
    fn is_known(&self, key: &ObjectKey) -> bool;
}

/// Where a provider records what happened (events on an object), like kube-runtime's event recorder.
/// What it reported last time comes in its request ([`PreviousFacts`]), not from here.
pub trait Recorder: Send + Sync + 'static {
    /// Records an event on `key`.
    fn event(&self, key: &ObjectKey, type_: EventType, reason: &str, message: String);
}

/// What the Deployment's status said of its hosts before this reconcile: what the providers reported
/// last time, handed back to them so that they can tell what changed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PreviousFacts {
    /// `status.hosts`.
    pub hosts: Vec<HostStatus>,
    /// `status.dns`.
    pub dns: Option<DnsStatus>,
    /// The status of the `DNSReady` condition (an event is recorded only when it changes).
    pub dns_ready: Option<ConditionStatus>,
}

impl PreviousFacts {
    /// The facts a Deployment's status holds.
    pub fn of(status: &DeploymentStatus) -> Self {
        Self {
            hosts: status.hosts.clone(),
            dns: status.dns.clone(),
            dns_ready: status
                .conditions
                .iter()
                .find(|c| c.type_ == condition_types::DNS_READY)
                .map(|c| c.status),
        }
    }
}

/// What a provider is given to converge one Deployment's hosts.
#[derive(Debug, Clone, Copy)]
pub struct ConvergeRequest<'a> {
    /// The Deployment.
    pub deployment: &'a Deployment,
    /// The environment its hosts run in.
    pub env: &'a RuntimeEnvironment,
    /// The hosts it needs.
    pub hosts: &'a [PlannedHost],
    /// What its status said of them before.
    pub previous: &'a PreviousFacts,
}

/// A domain condition a provider reports (e.g. `Provisioned`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderCondition {
    /// The condition type.
    pub type_: &'static str,
    /// Whether it holds.
    pub status: ConditionStatus,
    /// A CamelCase reason.
    pub reason: &'static str,
    /// Details.
    pub message: String,
}

/// What a provider reports after converging a Deployment's hosts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProviderReport {
    /// Whether every host is converged.
    pub converged: bool,
    /// One sentence for the Ready condition.
    pub message: String,
    /// What is known of each host (for `status.hosts`); `None` keeps what status already says.
    pub hosts: Option<Vec<HostStatus>>,
    /// Domain conditions to set.
    pub conditions: Vec<ProviderCondition>,
    /// When to look again while not converged.
    pub retry_after: Option<Duration>,
    /// The names kept for the hosts (for `status.dns`); `None` keeps what status already says.
    pub dns: Option<DnsStatus>,
    /// Set when the attempt failed although the report's hosts and fields are worth recording (a
    /// deploy that was rolled back): the reconcile records them, then fails with this error, so it
    /// is retried with backoff and its Ready condition gives this reason.
    pub failure: Option<ReconcileError>,
}

/// What a provider found when checking an environment.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvironmentReport {
    /// One sentence for the Ready condition.
    pub message: String,
    /// What was observed of the environment (for its status); `None` keeps what status already says.
    pub facts: Option<EnvironmentFacts>,
}

/// What a provider observed of an environment, as its status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EnvironmentFacts {
    /// The Proxmox VE version.
    pub version: Option<String>,
    /// The cluster's nodes that are online.
    pub nodes: Vec<String>,
    /// How many VMs carry this controller's owner tag.
    pub vms_owned: u32,
    /// How many VMs are kept after their host left its Deployment.
    pub vms_orphaned: u32,
    /// Whether the template VM exists and is a template.
    pub template_present: Option<bool>,
    /// Whether the API is reached without certificate verification or over plain HTTP.
    pub insecure: bool,
    /// Things an operator should know.
    pub warnings: Vec<String>,
}

/// Makes planned hosts exist and run their configuration (Proxmox VMs, NixOS hosts), and removes them.
pub trait Provider: Send + Sync + 'static {
    /// Checks that an environment can be used (reachable, credentials accepted, template present).
    fn check_environment(
        &self,
        env: &RuntimeEnvironment,
    ) -> BoxFuture<Result<EnvironmentReport, ReconcileError>>;

    /// Converges the hosts of one Deployment on its environment.
    fn converge(&self, request: ConvergeRequest<'_>) -> BoxFuture<Result<ProviderReport, ReconcileError>>;

    /// Cleans up after a Deployment that was removed (what it does depends on its deletion policy,
    /// which the provider keeps in its own inventory).
    fn cleanup(&self, deployment: &ObjectKey) -> BoxFuture<Result<(), ReconcileError>>;
}

/// The provider used when no backend is enabled: it plans, touches nothing, and says so.
pub struct PlanOnly;

/// What [`PlanOnly`] says of an environment.
pub fn plan_only_environment(env: &RuntimeEnvironment) -> EnvironmentReport {
    let message = match &env.spec.proxmox {
        Some(p) => format!(
            "valid: {} node(s), VMIDs {}-{}, template {}",
            p.nodes.len(),
            p.vmid_range.start,
            p.vmid_range.end,
            p.template.vmid
        ),
        None => format!("valid: {} static host(s)", env.spec.static_hosts.len()),
    };
    EnvironmentReport { message, facts: None }
}

/// What [`PlanOnly`] says of a Deployment's hosts.
pub fn plan_only_report(hosts: &[PlannedHost]) -> ProviderReport {
    ProviderReport {
        converged: true,
        message: format!(
            "{} host(s) planned; no infrastructure backend is enabled, so nothing was provisioned",
            hosts.len()
        ),
        hosts: None,
        conditions: Vec::new(),
        retry_after: None,
        dns: None,
        failure: None,
    }
}

impl Provider for PlanOnly {
    fn check_environment(
        &self,
        env: &RuntimeEnvironment,
    ) -> BoxFuture<Result<EnvironmentReport, ReconcileError>> {
        let report = plan_only_environment(env);
        Box::pin(async move { Ok(report) })
    }

    fn converge(&self, request: ConvergeRequest<'_>) -> BoxFuture<Result<ProviderReport, ReconcileError>> {
        let report = plan_only_report(request.hosts);
        Box::pin(async move { Ok(report) })
    }

    fn cleanup(&self, _deployment: &ObjectKey) -> BoxFuture<Result<(), ReconcileError>> {
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Condition, Timestamp};

    #[test]
    fn previous_facts_are_the_hosts_names_and_dns_readiness_a_deployment_status_holds() {
        let condition = |type_: &str, status| Condition {
            type_: type_.into(),
            status,
            reason: "Any".into(),
            message: String::new(),
            last_transition_time: Timestamp::from_unix(0),
            observed_generation: 1,
        };
        let status = DeploymentStatus {
            hosts: vec![HostStatus {
                name: "op-mastodon".into(),
                phase: "Ready".into(),
                ..HostStatus::default()
            }],
            dns: Some(DnsStatus {
                zone: "hosts.example".into(),
                ..DnsStatus::default()
            }),
            conditions: vec![
                condition(condition_types::READY, ConditionStatus::True),
                condition(condition_types::DNS_READY, ConditionStatus::False),
            ],
            ..DeploymentStatus::default()
        };
        let facts = PreviousFacts::of(&status);
        assert_eq!(facts.hosts, status.hosts);
        assert_eq!(facts.dns, status.dns);
        assert_eq!(facts.dns_ready, Some(ConditionStatus::False));
        assert_eq!(
            PreviousFacts::of(&DeploymentStatus::default()),
            PreviousFacts::default()
        );
    }
}
