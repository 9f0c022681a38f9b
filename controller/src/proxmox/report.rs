//! What the Proxmox provider reports of a Deployment's hosts, built from the lifecycle's outcomes without I/O.

use std::time::Duration;

use super::{HostOutcome, HostResult, RecordPhase, VmRecord, reasons};
use crate::api::{ConditionStatus, HostStatus, condition_types};
use crate::provider::{ProviderCondition, ProviderReport};

/// How soon a Deployment whose hosts only need observing again is looked at: the lifecycle has just
/// changed something and the next look usually sees it done.
const REOBSERVE_RETRY: Duration = Duration::from_millis(200);
/// How soon a host that waits for a person (a refused shrink, a restart not allowed, a locked VM) is
/// looked at again.
const STUCK_RETRY: Duration = Duration::from_secs(30);
/// How soon a host that waits without a known end is looked at again.
const WAIT_RETRY: Duration = Duration::from_secs(2);
/// The shortest wait for a task or boot whose end is expected.
const MIN_WAKE: Duration = Duration::from_millis(50);

/// The status of one host from its outcome and its inventory record.
pub(super) fn host_status(name: &str, outcome: &HostOutcome, record: Option<&VmRecord>) -> HostStatus {
    let phase = match (outcome, record) {
        (_, None) => "Pending".to_owned(),
        (HostOutcome::Done, Some(r)) if r.address.is_some() => "Ready".to_owned(),
        (HostOutcome::Waiting { reason, .. }, _) => (*reason).to_owned(),
        (_, Some(r)) if r.phase == RecordPhase::Creating => "Creating".to_owned(),
        _ => "Provisioning".to_owned(),
    };
    HostStatus {
        name: name.to_owned(),
        phase,
        vmid: record.map(|r| r.vmid),
        node: record.map(|r| r.node.clone()),
        address: record.and_then(|r| r.address.clone()),
        ..HostStatus::default()
    }
}

/// The report of a Deployment's hosts: converged once each of the `wanted` hosts is Ready and none
/// waits; the `Provisioned` and `Drifted` conditions; when to look again (`next_drift_scan` is asked
/// only once converged).
pub(super) fn deployment_report(
    statuses: Vec<HostStatus>,
    results: &[HostResult],
    wanted: usize,
    next_drift_scan: impl FnOnce() -> Option<Duration>,
) -> ProviderReport {
    let wake_after = results.iter().filter_map(|r| r.wake_after).min();
    let drift: Vec<&(&'static str, String)> = results.iter().flat_map(|r| &r.drift).collect();
    let waits: Vec<(&'static str, String)> = results
        .iter()
        .filter_map(|r| match &r.outcome {
            HostOutcome::Waiting { reason, message } => Some((*reason, message.clone())),
            _ => None,
        })
        .collect();
    let ready_hosts = statuses.iter().filter(|h| h.phase == "Ready").count();
    let converged = waits.is_empty() && ready_hosts == wanted;
    let provisioned = if converged {
        ProviderCondition {
            type_: condition_types::PROVISIONED,
            status: ConditionStatus::True,
            reason: reasons::PROVISIONED,
            message: format!("{ready_hosts} VM(s) running with an address"),
        }
    } else {
        let (reason, message) = waits
            .first()
            .cloned()
            .unwrap_or((reasons::REOBSERVE, "observing again".into()));
        ProviderCondition {
            type_: condition_types::PROVISIONED,
            status: ConditionStatus::False,
            reason,
            message,
        }
    };
    let stuck = waits.iter().any(|(r, _)| {
        *r == reasons::DISK_SHRINK_REFUSED || *r == reasons::PENDING_RESTART || *r == reasons::VM_LOCKED
    });
    let message = if converged {
        format!("{ready_hosts} host(s) provisioned")
    } else {
        format!("{ready_hosts}/{wanted} host(s) ready: {}", provisioned.message)
    };
    let retry_after = if converged {
        next_drift_scan()
    } else if waits.iter().all(|(r, _)| *r == reasons::REOBSERVE) {
        Some(REOBSERVE_RETRY)
    } else if stuck {
        Some(STUCK_RETRY)
    } else if let Some(wake) = wake_after {
        // A task or a boot whose end is expected then.
        Some(wake.max(MIN_WAKE))
    } else {
        Some(WAIT_RETRY)
    };
    let mut conditions = vec![provisioned];
    if !drift.is_empty() {
        let pending = waits.iter().any(|(r, _)| *r == reasons::PENDING_RESTART);
        conditions.push(ProviderCondition {
            type_: condition_types::DRIFTED,
            status: ConditionStatus::True,
            reason: if pending {
                reasons::DRIFT_PENDING
            } else {
                reasons::DRIFT_CORRECTED
            },
            message: drift
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        });
    } else if converged {
        conditions.push(no_drift());
    }
    ProviderReport {
        converged,
        message,
        hosts: Some(statuses),
        conditions,
        retry_after,
        dns: None,
        failure: None,
    }
}

/// `Drifted=False`: a converged pass found no out-of-band change (Proxmox VMs and NixOS hosts alike).
pub fn no_drift() -> ProviderCondition {
    ProviderCondition {
        type_: condition_types::DRIFTED,
        status: ConditionStatus::False,
        reason: reasons::NO_DRIFT,
        message: "no out-of-band change found".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::DeletionPolicy;

    fn record(phase: RecordPhase, address: Option<&str>) -> VmRecord {
        VmRecord {
            environment: "lab".into(),
            deployment: "op".into(),
            application: "mastodon".into(),
            name: "op-mastodon".into(),
            owner_tag: "fediversity-owner-x".into(),
            vmid: 101,
            node: "pve".into(),
            phase,
            task: None,
            configured: None,
            pending: Vec::new(),
            address: address.map(str::to_owned),
            deletion_policy: DeletionPolicy::Retain,
        }
    }

    fn result(outcome: HostOutcome) -> HostResult {
        HostResult {
            status: None,
            outcome,
            error: None,
            wake_after: None,
            drift: Vec::new(),
        }
    }

    fn waiting(reason: &'static str) -> HostOutcome {
        HostOutcome::Waiting {
            reason,
            message: format!("waiting: {reason}"),
        }
    }

    fn ready(name: &str) -> HostStatus {
        HostStatus {
            name: name.into(),
            phase: "Ready".into(),
            ..HostStatus::default()
        }
    }

    #[test]
    fn a_host_without_a_record_is_pending_and_one_done_with_an_address_is_ready() {
        assert_eq!(
            host_status("op-mastodon", &HostOutcome::Done, None).phase,
            "Pending"
        );
        let r = record(RecordPhase::Present, Some("10.0.0.5"));
        let status = host_status("op-mastodon", &HostOutcome::Done, Some(&r));
        assert_eq!(
            status,
            HostStatus {
                name: "op-mastodon".into(),
                phase: "Ready".into(),
                vmid: Some(101),
                node: Some("pve".into()),
                address: Some("10.0.0.5".into()),
                ..HostStatus::default()
            }
        );
    }

    #[test]
    fn a_waiting_host_shows_its_reason_and_an_intent_shows_creating() {
        let r = record(RecordPhase::Creating, None);
        assert_eq!(
            host_status("h", &waiting(reasons::VM_LOCKED), Some(&r)).phase,
            reasons::VM_LOCKED
        );
        assert_eq!(host_status("h", &HostOutcome::Done, Some(&r)).phase, "Creating");
        let present = record(RecordPhase::Present, None);
        assert_eq!(
            host_status("h", &HostOutcome::Done, Some(&present)).phase,
            "Provisioning",
            "done but without an address yet"
        );
    }

    #[test]
    fn every_host_ready_is_converged_provisioned_without_drift_and_waits_for_the_next_scan() {
        let report = deployment_report(
            vec![ready("op-a"), ready("op-b")],
            &[result(HostOutcome::Done), result(HostOutcome::Done)],
            2,
            || Some(Duration::from_secs(42)),
        );
        assert!(report.converged);
        assert_eq!(report.message, "2 host(s) provisioned");
        assert_eq!(report.retry_after, Some(Duration::from_secs(42)));
        let types: Vec<_> = report.conditions.iter().map(|c| (c.type_, c.status)).collect();
        assert_eq!(
            types,
            [
                (condition_types::PROVISIONED, ConditionStatus::True),
                (condition_types::DRIFTED, ConditionStatus::False)
            ]
        );
    }

    #[test]
    fn a_host_waiting_for_a_person_is_not_converged_and_is_looked_at_again_in_thirty_seconds() {
        let report = deployment_report(
            vec![ready("op-a"), HostStatus::default()],
            &[
                result(HostOutcome::Done),
                result(waiting(reasons::DISK_SHRINK_REFUSED)),
            ],
            2,
            || panic!("no drift scan is asked before convergence"),
        );
        assert!(!report.converged);
        assert_eq!(report.retry_after, Some(STUCK_RETRY));
        assert_eq!(report.conditions[0].reason, reasons::DISK_SHRINK_REFUSED);
        assert_eq!(
            report.message,
            format!("1/2 host(s) ready: waiting: {}", reasons::DISK_SHRINK_REFUSED)
        );
    }

    #[test]
    fn a_task_expected_to_end_is_looked_at_then_and_reobserving_alone_is_looked_at_soon() {
        let mut booting = result(waiting("Booting"));
        booting.wake_after = Some(Duration::from_millis(5));
        let report = deployment_report(vec![HostStatus::default()], &[booting], 1, || None);
        assert_eq!(report.retry_after, Some(MIN_WAKE), "never sooner than the floor");
        let report = deployment_report(
            vec![HostStatus::default()],
            &[result(waiting(reasons::REOBSERVE))],
            1,
            || None,
        );
        assert_eq!(report.retry_after, Some(REOBSERVE_RETRY));
        let report = deployment_report(Vec::new(), &[], 1, || None);
        assert!(!report.converged, "a wanted host with no status is not converged");
        assert_eq!(report.conditions[0].reason, reasons::REOBSERVE);
    }

    #[test]
    fn drift_found_is_reported_corrected_or_pending_a_restart() {
        let mut drifted = result(HostOutcome::Done);
        drifted.drift = vec![(
            "cpu",
            "op-a: VM 101 had cores 4 (changed out of band); put back".into(),
        )];
        let report = deployment_report(vec![ready("op-a")], &[drifted], 1, || None);
        let drift = &report.conditions[1];
        assert_eq!(
            (drift.type_, drift.status, drift.reason),
            (
                condition_types::DRIFTED,
                ConditionStatus::True,
                reasons::DRIFT_CORRECTED
            )
        );
        assert!(drift.message.contains("cores 4"));
        let mut pending = result(waiting(reasons::PENDING_RESTART));
        pending.drift = vec![("memory", "op-a: memory changed".into())];
        let report = deployment_report(vec![HostStatus::default()], &[pending], 1, || None);
        assert_eq!(report.conditions[1].reason, reasons::DRIFT_PENDING);
    }
}
