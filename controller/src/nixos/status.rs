//! How a NixOS deploy's result merges into a host's status, and the report of a Deployment's hosts, without I/O.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::provider::{DEPLOY_FAILED, NOT_CONVERGED_RETRY, SYSTEM_DRIFTED};
use super::{DeployResult, HostAddress, HostDeployStatus, PrepareError};
use crate::api::{ConditionStatus, EventType, HostStatus, Timestamp, condition_types};
use crate::provider::{ProviderCondition, ProviderReport};
use crate::proxmox::reasons::DRIFT_CORRECTED;
use crate::runtime::ReconcileError;

/// What became of one host's deploy this pass.
#[derive(Debug, Clone, Copy)]
pub enum Attempt<'a> {
    /// No address is known yet (the infrastructure has not reported it): the status is kept.
    NotStarted,
    /// Its address or key could not be prepared, for this reason.
    Unprepared(&'a PrepareError),
    /// The deploy was started but did not finish.
    Unfinished,
    /// The deploy finished with this result, on this address.
    Deployed(&'a HostAddress, &'a HostDeployStatus),
}

impl<'a> Attempt<'a> {
    /// The attempt from the host's prepared address and its deploy's result, if any.
    pub fn of(
        address: Option<&'a Result<HostAddress, Arc<PrepareError>>>,
        result: Option<&'a (HostAddress, HostDeployStatus)>,
    ) -> Self {
        match (address, result) {
            (Some(Ok(_)), Some((address, r))) => Self::Deployed(address, r),
            (Some(Err(why)), _) => Self::Unprepared(why),
            (Some(Ok(_)), None) => Self::Unfinished,
            (None, _) => Self::NotStarted,
        }
    }
}

/// One host's status after its deploy, and what the Deployment's report and events say of it.
#[derive(Debug, Clone, PartialEq)]
pub struct HostMerge {
    /// The host's status.
    pub status: HostStatus,
    /// Found switched out of band (and switched back, or not): what to say.
    pub drifted: Option<String>,
    /// Why it does not run its configuration.
    pub problem: Option<String>,
    /// Its deploy failed or was rolled back: what to say.
    pub failed: Option<String>,
    /// The event to record on the Deployment.
    pub event: Option<(EventType, &'static str, String)>,
}

/// Merges `attempt` into the host's status: `base` is what the infrastructure reported this pass (or
/// an empty status), `before` what the Deployment's status said last time; `on_proxmox` tells a VM
/// without an address (`Unreachable`) from a static host without a machine (`Unassigned`).
pub fn merge_host(
    name: &str,
    base: Option<&HostStatus>,
    before: Option<&HostStatus>,
    attempt: Attempt<'_>,
    on_proxmox: bool,
    now: Timestamp,
) -> HostMerge {
    let mut status = base.cloned().unwrap_or_else(|| HostStatus {
        name: name.to_owned(),
        ..HostStatus::default()
    });
    let mut merge = HostMerge {
        status: HostStatus::default(),
        drifted: None,
        problem: None,
        failed: None,
        event: None,
    };
    match attempt {
        Attempt::Deployed(address, r) => {
            let applied = r.last_result == DeployResult::Applied;
            // The system we deployed, still wanted, yet this pass had to switch to it again: the host
            // was switched out of band.
            if r.changed
                && r.desired_system.is_some()
                && before.is_some_and(|b| {
                    b.last_result.as_deref() == Some(DeployResult::Applied.label())
                        && b.system == r.desired_system
                        && b.desired_system == r.desired_system
                })
            {
                merge.drifted = Some(format!(
                    "{name}: its system profile no longer pointed at the deployed system (switched out of band); {}",
                    if applied {
                        "switched back"
                    } else {
                        "switching back failed"
                    }
                ));
            }
            status.address = Some(address.address.clone());
            status.phase = if applied {
                "Ready".into()
            } else {
                r.last_result.label().into()
            };
            status.system = r.current_system.clone();
            status.desired_system = r.desired_system.clone();
            status.generation = r.generation;
            status.last_result = Some(r.last_result.label().into());
            status.message = Some(r.message.clone());
            status.step_millis = r
                .step_seconds
                .iter()
                .fold(BTreeMap::new(), |mut m, (step, secs)| {
                    *m.entry(step.clone()).or_insert(0) += (secs * 1000.0).round() as u64;
                    m
                });
            if r.changed && applied {
                status.activated_at = Some(now);
            }
            if r.changed || !applied {
                let type_ = if applied {
                    EventType::Normal
                } else {
                    EventType::Warning
                };
                merge.event = Some((type_, r.last_result.label(), format!("{name}: {}", r.message)));
            }
            if !applied {
                merge.problem = Some(format!("{name}: {}", r.message));
            }
            if matches!(
                r.last_result,
                DeployResult::FailedRolledBack | DeployResult::UnconfirmedRolledBack | DeployResult::Failed
            ) {
                merge.failed = Some(format!("{name}: {}", r.message));
            }
        }
        Attempt::Unprepared(why) => {
            status.phase = if on_proxmox {
                DeployResult::Unreachable.label().into()
            } else {
                "Unassigned".into()
            };
            status.message = Some(why.to_string());
            merge.problem = Some(format!("{name}: {why}"));
        }
        Attempt::Unfinished => {
            status.phase = "Failed".into();
            merge.problem = Some(format!("{name}: the deploy did not finish"));
        }
        Attempt::NotStarted => {}
    }
    merge.status = status;
    merge
}

/// The report of a Deployment's hosts after their deploys: converged when no host has a problem; the
/// `Configured` and `Drifted` conditions; a failed or rolled-back deploy is a failure (retried with
/// backoff, not polled as progress).
pub fn report(hosts: Vec<HostMerge>) -> ProviderReport {
    let problems: Vec<String> = hosts.iter().filter_map(|h| h.problem.clone()).collect();
    let drifted: Vec<String> = hosts.iter().filter_map(|h| h.drifted.clone()).collect();
    let failed: Vec<String> = hosts.iter().filter_map(|h| h.failed.clone()).collect();
    let statuses: Vec<HostStatus> = hosts.into_iter().map(|h| h.status).collect();
    let converged = problems.is_empty();
    let configured = ProviderCondition {
        type_: condition_types::CONFIGURED,
        status: if converged {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        },
        reason: if converged { "Applied" } else { "NotApplied" },
        message: if converged {
            format!("{} host(s) run their NixOS configuration", statuses.len())
        } else {
            problems.join("; ")
        },
    };
    let message = configured.message.clone();
    let mut conditions = vec![configured];
    if !drifted.is_empty() {
        conditions.push(ProviderCondition {
            type_: condition_types::DRIFTED,
            status: ConditionStatus::True,
            reason: if converged {
                DRIFT_CORRECTED
            } else {
                SYSTEM_DRIFTED
            },
            message: drifted.join("; "),
        });
    } else if converged {
        conditions.push(crate::proxmox::no_drift());
    }
    ProviderReport {
        converged,
        message,
        hosts: Some(statuses),
        conditions,
        retry_after: (!converged).then_some(NOT_CONVERGED_RETRY),
        dns: None,
        failure: (!failed.is_empty()).then(|| ReconcileError::Transient {
            reason: DEPLOY_FAILED,
            message: failed.join("; "),
        }),
    }
}

#[cfg(test)]
mod tests;
