//! Tests of the NixOS status merge and report.

use super::*;

const SYSTEM: &str = "/nix/store/aaaa-nixos-system";

fn address() -> HostAddress {
    HostAddress {
        address: "10.0.0.5".into(),
        port: 22,
        host_key: "ssh-ed25519 AAAA".into(),
    }
}

fn deployed(last_result: DeployResult, changed: bool) -> HostDeployStatus {
    HostDeployStatus {
        name: "op-mastodon".into(),
        desired_system: Some(SYSTEM.into()),
        current_system: Some(SYSTEM.into()),
        generation: Some(7),
        last_result,
        rebuilt: changed,
        changed,
        message: "activated and healthy".into(),
        step_seconds: vec![
            ("build".into(), 1.5),
            ("copy".into(), 0.25),
            ("build".into(), 0.5),
        ],
    }
}

fn applied_before() -> HostStatus {
    HostStatus {
        name: "op-mastodon".into(),
        phase: "Ready".into(),
        system: Some(SYSTEM.into()),
        desired_system: Some(SYSTEM.into()),
        last_result: Some("Applied".into()),
        ..HostStatus::default()
    }
}

fn now() -> Timestamp {
    Timestamp::from_unix(1_800_000_000)
}

#[test]
fn an_applied_deploy_keeps_the_infrastructure_facts_and_sets_the_system_and_step_times() {
    let base = HostStatus {
        name: "op-mastodon".into(),
        phase: "Ready".into(),
        vmid: Some(101),
        node: Some("pve".into()),
        ..HostStatus::default()
    };
    let (a, r) = (address(), deployed(DeployResult::Applied, true));
    let merge = merge_host(
        "op-mastodon",
        Some(&base),
        None,
        Attempt::Deployed(&a, &r),
        true,
        now(),
    );
    let s = &merge.status;
    assert_eq!((s.vmid, s.node.as_deref()), (Some(101), Some("pve")), "kept");
    assert_eq!(s.phase, "Ready");
    assert_eq!(s.address.as_deref(), Some("10.0.0.5"));
    assert_eq!(s.system.as_deref(), Some(SYSTEM));
    assert_eq!(s.generation, Some(7));
    assert_eq!(s.activated_at, Some(now()), "a change was activated now");
    assert_eq!(s.step_millis["build"], 2000, "repeated steps add up");
    assert_eq!(s.step_millis["copy"], 250);
    assert_eq!(
        merge.event,
        Some((
            EventType::Normal,
            "Applied",
            "op-mastodon: activated and healthy".into()
        ))
    );
    assert_eq!((merge.problem, merge.failed, merge.drifted), (None, None, None));
}

#[test]
fn an_unchanged_host_records_no_event_and_keeps_its_activation_time() {
    let (a, r) = (address(), deployed(DeployResult::Applied, false));
    let mut before = applied_before();
    before.activated_at = Some(Timestamp::from_unix(1));
    let merge = merge_host(
        "op-mastodon",
        Some(&before),
        Some(&before),
        Attempt::Deployed(&a, &r),
        true,
        now(),
    );
    assert_eq!(merge.status.activated_at, Some(Timestamp::from_unix(1)));
    assert_eq!(merge.event, None);
    assert_eq!(merge.drifted, None, "nothing had to be switched");
}

#[test]
fn switching_an_applied_host_back_to_the_same_system_is_drift() {
    let (a, r) = (address(), deployed(DeployResult::Applied, true));
    let merge = merge_host(
        "op-mastodon",
        None,
        Some(&applied_before()),
        Attempt::Deployed(&a, &r),
        true,
        now(),
    );
    let drifted = merge.drifted.expect("drift found");
    assert!(drifted.starts_with("op-mastodon: its system profile no longer pointed"));
    assert!(drifted.ends_with("switched back"));
}

#[test]
fn a_rolled_back_deploy_is_a_problem_a_failure_and_a_warning() {
    let (a, mut r) = (address(), deployed(DeployResult::FailedRolledBack, true));
    r.message = "health checks failed".into();
    let merge = merge_host("op-mastodon", None, None, Attempt::Deployed(&a, &r), true, now());
    assert_eq!(merge.status.phase, "FailedRolledBack");
    assert_eq!(merge.status.activated_at, None);
    assert_eq!(
        merge.problem.as_deref(),
        Some("op-mastodon: health checks failed")
    );
    assert_eq!(merge.failed, merge.problem);
    assert_eq!(merge.event.as_ref().map(|e| e.0), Some(EventType::Warning));
    let report = report(vec![merge]);
    assert!(!report.converged);
    assert_eq!(report.retry_after, Some(NOT_CONVERGED_RETRY));
    let failure = report.failure.expect("a failed attempt");
    assert_eq!(failure.reason(), DEPLOY_FAILED);
    assert_eq!(
        report.conditions.len(),
        1,
        "no Drifted condition while not converged"
    );
    assert_eq!(report.conditions[0].reason, "NotApplied");
}

#[test]
fn a_host_without_an_address_is_unreachable_on_proxmox_and_unassigned_on_static_hosts() {
    let why = PrepareError::NoStaticHost {
        environment: "lab".into(),
        host: "op-mastodon".into(),
    };
    for (on_proxmox, phase) in [(true, "Unreachable"), (false, "Unassigned")] {
        let merge = merge_host(
            "op-mastodon",
            None,
            None,
            Attempt::Unprepared(&why),
            on_proxmox,
            now(),
        );
        assert_eq!(merge.status.phase, phase);
        assert_eq!(merge.status.message, Some(why.to_string()));
        assert!(
            merge
                .problem
                .is_some_and(|p| p.contains("has no static host named op-mastodon"))
        );
        assert_eq!(merge.failed, None, "not a failed deploy: nothing was tried");
    }
}

#[test]
fn a_deploy_that_did_not_finish_fails_the_host_and_a_host_not_started_keeps_its_status() {
    let merge = merge_host("op-a", None, None, Attempt::Unfinished, true, now());
    assert_eq!(merge.status.phase, "Failed");
    assert_eq!(merge.problem.as_deref(), Some("op-a: the deploy did not finish"));
    let base = HostStatus {
        name: "op-a".into(),
        phase: "Cloning".into(),
        ..HostStatus::default()
    };
    let merge = merge_host("op-a", Some(&base), None, Attempt::NotStarted, true, now());
    assert_eq!(merge.status, base);
    assert_eq!(merge.problem, None);
}

#[test]
fn attempts_are_read_from_the_prepared_address_and_the_deploy_result() {
    let ok: Result<HostAddress, Arc<PrepareError>> = Ok(address());
    let done = (address(), deployed(DeployResult::Applied, false));
    assert!(matches!(Attempt::of(None, Some(&done)), Attempt::NotStarted));
    assert!(matches!(Attempt::of(Some(&ok), None), Attempt::Unfinished));
    assert!(matches!(
        Attempt::of(Some(&ok), Some(&done)),
        Attempt::Deployed(..)
    ));
    let err: Result<HostAddress, Arc<PrepareError>> = Err(Arc::new(PrepareError::NoStaticHost {
        environment: "lab".into(),
        host: "h".into(),
    }));
    assert!(matches!(
        Attempt::of(Some(&err), Some(&done)),
        Attempt::Unprepared(_)
    ));
}

#[test]
fn every_host_applied_is_configured_and_corrected_drift_is_reported() {
    let (a, r) = (address(), deployed(DeployResult::Applied, true));
    let drifted = merge_host(
        "op-mastodon",
        None,
        Some(&applied_before()),
        Attempt::Deployed(&a, &r),
        true,
        now(),
    );
    let report = report(vec![drifted]);
    assert!(report.converged);
    assert_eq!(report.message, "1 host(s) run their NixOS configuration");
    assert_eq!(report.retry_after, None);
    assert!(report.failure.is_none());
    let drift = &report.conditions[1];
    assert_eq!(
        (drift.status, drift.reason),
        (ConditionStatus::True, DRIFT_CORRECTED)
    );
    let calm = merge_host("op-a", None, None, Attempt::NotStarted, true, now());
    let report = super::report(vec![calm]);
    assert_eq!(report.conditions[1].reason, crate::proxmox::reasons::NO_DRIFT);
}
