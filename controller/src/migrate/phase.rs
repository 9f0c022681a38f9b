//! The pure migration phase machine: what to do next for a persisted migration, and the record after it.
//!
//! Nothing here does I/O or reads a clock: the runner passes `now` (Unix milliseconds) and the outcome
//! of the action it just performed, and persists the record this returns before acting again. Every
//! action is idempotent, so a controller killed at any point resumes by performing the recorded
//! phase's action once more.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Attempts of one phase before a failure is treated as final (transient failures only).
pub const MAX_ATTEMPTS: u32 = 5;
/// The first wait before a transient failure is retried; doubled per attempt, at most [`MAX_RETRY_MS`].
pub const FIRST_RETRY_MS: u64 = 2_000;
/// The longest wait between two attempts.
pub const MAX_RETRY_MS: u64 = 300_000;
/// The default grace period before a retired source is destroyed under `Delete`: a day.
pub const DEFAULT_GRACE_MS: u64 = 24 * 3600 * 1000;

/// Where a migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// Target hosts are created in the new environment, their services held stopped.
    Provisioning,
    /// The source serves; a backup of it is restored onto the target.
    PreCopying,
    /// The source's services are stopped (downtime starts).
    StoppingSource,
    /// The changes since the pre-copy are copied onto the target.
    FinalCopying,
    /// Files (size, SHA-256) and databases (row counts, checksums) are compared on both sides.
    Verifying,
    /// The target's services start and its health is checked.
    StartingTarget,
    /// The names in the provider's zone are pointed at the target (downtime ends).
    SwitchingNames,
    /// The source is retired under the policy (stopped and kept, or destroyed after the grace period).
    RetiringSource,
    /// A failure or a cancel before the switch: the source's services start again, the target is
    /// kept or removed per policy.
    RollingBack,
    /// Done: the Deployment runs in the new environment.
    Succeeded,
    /// Failed before the switch; the source serves again with its data.
    Failed,
    /// Cancelled by setting `spec.runtimeEnvironment` back; the source serves again with its data.
    Cancelled,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 12] = [
        Phase::Provisioning,
        Phase::PreCopying,
        Phase::StoppingSource,
        Phase::FinalCopying,
        Phase::Verifying,
        Phase::StartingTarget,
        Phase::SwitchingNames,
        Phase::RetiringSource,
        Phase::RollingBack,
        Phase::Succeeded,
        Phase::Failed,
        Phase::Cancelled,
    ];

    /// Whether nothing is left to do.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed | Phase::Cancelled)
    }

    /// Whether the names still point at the source (a failure or a cancel rolls back).
    pub fn before_switch(self) -> bool {
        self <= Phase::StartingTarget
    }

    /// The phase's name as status, events and metrics show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Provisioning => "Provisioning",
            Phase::PreCopying => "PreCopying",
            Phase::StoppingSource => "StoppingSource",
            Phase::FinalCopying => "FinalCopying",
            Phase::Verifying => "Verifying",
            Phase::StartingTarget => "StartingTarget",
            Phase::SwitchingNames => "SwitchingNames",
            Phase::RetiringSource => "RetiringSource",
            Phase::RollingBack => "RollingBack",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
            Phase::Cancelled => "Cancelled",
        }
    }

    fn next(self) -> Phase {
        match self {
            Phase::Provisioning => Phase::PreCopying,
            Phase::PreCopying => Phase::StoppingSource,
            Phase::StoppingSource => Phase::FinalCopying,
            Phase::FinalCopying => Phase::Verifying,
            Phase::Verifying => Phase::StartingTarget,
            Phase::StartingTarget => Phase::SwitchingNames,
            Phase::SwitchingNames => Phase::RetiringSource,
            Phase::RetiringSource => Phase::Succeeded,
            other => other,
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What becomes of the source once the target serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RetirePolicy {
    /// Stopped now, destroyed after the grace period (during which a rollback brings it back).
    Delete {
        /// Milliseconds between the switch and the destruction.
        grace_ms: u64,
    },
    /// Stopped and kept.
    Retain,
}

/// What becomes of a target whose migration failed or was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailedTarget {
    /// Removed (the default: nothing half-made stays behind).
    Remove,
    /// Kept, services stopped, for inspection.
    Keep,
}

/// The state of the source hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SourceState {
    /// Its services run (before the stop, and again after a rollback).
    Serving,
    /// Its services are stopped, its data untouched.
    Stopped,
    /// Stopped and kept for good (`Retain`).
    Retained,
    /// Destroyed after the grace period (`Delete`).
    Destroyed,
    /// Could not be reached: the target started from the last backup and the source was left as
    /// it was (retire it by hand once it is back).
    Unreachable,
}

impl SourceState {
    /// The state's name as status shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceState::Serving => "Serving",
            SourceState::Stopped => "Stopped",
            SourceState::Retained => "Retained",
            SourceState::Destroyed => "Destroyed",
            SourceState::Unreachable => "Unreachable",
        }
    }
}

/// One migration, as persisted after every step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationRecord {
    /// The Deployment.
    pub deployment: String,
    /// The RuntimeEnvironment it leaves.
    pub from: String,
    /// The RuntimeEnvironment it moves to.
    pub to: String,
    /// Where it stands.
    pub phase: Phase,
    /// Where it stood when it failed or was cancelled (for status and the reason).
    pub failed_in: Option<Phase>,
    /// When it started (Unix ms).
    pub started_ms: u64,
    /// When the current phase started (Unix ms).
    pub phase_started_ms: u64,
    /// When it ended (Unix ms).
    pub finished_ms: Option<u64>,
    /// Attempts of the current phase so far.
    pub attempts: u32,
    /// Not before this time is the current phase attempted again (Unix ms).
    pub retry_at_ms: Option<u64>,
    /// How long each phase took (ms), by phase name.
    pub durations_ms: BTreeMap<String, u64>,
    /// Bytes copied by the pre-copy (the snapshots' size).
    pub bytes_pre_copied: u64,
    /// Bytes added by the final copy (what changed since the pre-copy).
    pub bytes_finally_copied: u64,
    /// When the source's services were about to stop (Unix ms): the downtime's start.
    pub downtime_started_ms: Option<u64>,
    /// When the target served under the names again, or the source after a rollback (Unix ms).
    pub downtime_ended_ms: Option<u64>,
    /// Whether the target's data matched the source's (manifest and database checksums).
    pub verified: bool,
    /// The source hosts' state.
    pub source: SourceState,
    /// Whether the target hosts were removed after a failure.
    pub target_removed: bool,
    /// When the source is destroyed under `Delete` (Unix ms).
    pub retire_at_ms: Option<u64>,
    /// The retire policy.
    pub retire: RetirePolicy,
    /// What becomes of a failed target.
    pub failed_target: FailedTarget,
    /// Where a rollback ends (`Failed` or `Cancelled`).
    pub rollback_to: Option<Phase>,
    /// Why it failed, was cancelled, or the last attempt went wrong.
    pub reason: Option<String>,
    /// Set when the source could not be reached and the operator confirmed starting the target from
    /// the last backup instead of a live copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_backup: Option<FromBackup>,
}

/// A migration that starts the target from the source's last backup (the source cannot be reached):
/// the pre-copy restores these snapshots and verifies them against their manifests; there is no stop
/// and no final copy, and the source is left as it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FromBackup {
    /// The snapshot restored onto each target host, by host name.
    pub snapshots: BTreeMap<String, String>,
    /// When the oldest of them was taken (RFC 3339): every write after it is lost.
    pub taken: String,
    /// The bytes the snapshots hold.
    pub total_bytes: u64,
    /// When the operator confirmed (Unix ms).
    pub confirmed_ms: u64,
}

/// What the runner must do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create the target hosts (idempotent: existing ones are kept), services held stopped.
    Provision,
    /// Restore each target host from its source's last snapshot and verify it against the
    /// snapshot's manifest (the source cannot be reached).
    RestoreBackup,
    /// Back up the source (serving) and restore it onto the target (held stopped).
    PreCopy,
    /// Stop the source's services.
    StopSource,
    /// Back up the stopped source and restore it onto the target.
    FinalCopy,
    /// Compare the source's and the target's data.
    Verify,
    /// Start the target's services and check their health.
    StartTarget,
    /// Point the provider-zone names at the target.
    SwitchNames,
    /// Stop the source's services for good; destroy it when `destroy`.
    RetireSource {
        /// Whether to destroy the source's hosts (after the grace period, under `Delete`).
        destroy: bool,
    },
    /// Start the source's services again (when they were stopped); remove the target when asked.
    RestoreSource {
        /// Whether the source's services were stopped and must start.
        start_source: bool,
        /// Whether to remove the target hosts.
        remove_target: bool,
    },
    /// Nothing to do before this time (Unix ms).
    WaitUntil(u64),
    /// Nothing left to do.
    Nothing,
}

/// What the action did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It succeeded; `bytes` copied (copies), `verified` (verification).
    Done {
        /// Bytes copied by a copy.
        bytes: u64,
    },
    /// The verification found differences (the first few).
    Differences(Vec<String>),
    /// It failed; `transient` when retrying may help (host or repository unreachable, lock held).
    Failed {
        /// Why, for a person.
        reason: String,
        /// Whether a retry may help.
        transient: bool,
    },
}

impl Outcome {
    /// A success without bytes.
    pub fn ok() -> Self {
        Outcome::Done { bytes: 0 }
    }
}

/// Why the runner refused to start or change a migration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhaseError {
    /// The migration already switched the names; reverting the environment no longer cancels it.
    #[error(
        "Deployment {deployment}: the migration from {from} to {to} already switched the names ({phase}); it can no longer be cancelled; use `fediversity migrate rollback deployment {deployment}` during the grace period"
    )]
    PastTheSwitch {
        /// The Deployment.
        deployment: String,
        /// The old environment.
        from: String,
        /// The new environment.
        to: String,
        /// The phase it is in.
        phase: Phase,
    },
}

/// A new migration of `deployment` from `from` to `to`.
pub fn begin(
    deployment: &str,
    from: &str,
    to: &str,
    retire: RetirePolicy,
    failed_target: FailedTarget,
    now: u64,
) -> MigrationRecord {
    MigrationRecord {
        deployment: deployment.to_owned(),
        from: from.to_owned(),
        to: to.to_owned(),
        phase: Phase::Provisioning,
        failed_in: None,
        started_ms: now,
        phase_started_ms: now,
        finished_ms: None,
        attempts: 0,
        retry_at_ms: None,
        durations_ms: BTreeMap::new(),
        bytes_pre_copied: 0,
        bytes_finally_copied: 0,
        downtime_started_ms: None,
        downtime_ended_ms: None,
        verified: false,
        source: SourceState::Serving,
        target_removed: false,
        retire_at_ms: None,
        retire,
        failed_target,
        rollback_to: None,
        reason: None,
        from_backup: None,
    }
}

/// The action the record's phase asks for at `now`.
pub fn action(r: &MigrationRecord, now: u64) -> Action {
    if let Some(at) = r.retry_at_ms
        && now < at
    {
        return Action::WaitUntil(at);
    }
    match r.phase {
        Phase::Provisioning => Action::Provision,
        Phase::PreCopying if r.from_backup.is_some() => Action::RestoreBackup,
        Phase::PreCopying => Action::PreCopy,
        Phase::StoppingSource => Action::StopSource,
        Phase::FinalCopying => Action::FinalCopy,
        Phase::Verifying => Action::Verify,
        Phase::StartingTarget => Action::StartTarget,
        Phase::SwitchingNames => Action::SwitchNames,
        Phase::RetiringSource => match (r.retire, r.retire_at_ms) {
            (RetirePolicy::Retain, _) => Action::RetireSource { destroy: false },
            (RetirePolicy::Delete { .. }, Some(at)) if now < at => {
                if r.source == SourceState::Stopped {
                    Action::WaitUntil(at)
                } else {
                    Action::RetireSource { destroy: false }
                }
            }
            (RetirePolicy::Delete { .. }, _) => Action::RetireSource { destroy: true },
        },
        Phase::RollingBack => Action::RestoreSource {
            // From the moment the stop was recorded the services may be stopped (a controller
            // killed during the stop never learnt whether it happened); starting is idempotent. A
            // source that could not be reached was never stopped.
            start_source: r.downtime_started_ms.is_some() && r.from_backup.is_none(),
            remove_target: r.failed_target == FailedTarget::Remove && !r.target_removed,
        },
        Phase::Succeeded | Phase::Failed | Phase::Cancelled => Action::Nothing,
    }
}

fn enter(r: &mut MigrationRecord, phase: Phase, now: u64) {
    let took = now.saturating_sub(r.phase_started_ms);
    *r.durations_ms.entry(r.phase.as_str().to_owned()).or_default() += took;
    r.phase = phase;
    r.phase_started_ms = now;
    r.attempts = 0;
    r.retry_at_ms = None;
    if phase == Phase::StoppingSource {
        // Recorded before the stop: a controller killed during it still counts the downtime.
        r.downtime_started_ms = Some(now);
    }
    if phase.is_terminal() {
        r.finished_ms = Some(now);
    }
}

fn roll_back(r: &mut MigrationRecord, to: Phase, reason: String, now: u64) {
    r.failed_in = Some(r.phase);
    r.rollback_to = Some(to);
    r.reason = Some(reason);
    enter(r, Phase::RollingBack, now);
}

/// How long to wait before attempt `attempts + 1`.
pub fn retry_delay(attempts: u32) -> u64 {
    FIRST_RETRY_MS
        .saturating_mul(1u64 << attempts.saturating_sub(1).min(20))
        .min(MAX_RETRY_MS)
}

/// The record after the current phase's action ended with `outcome` at `now`.
pub fn advance(r: &MigrationRecord, outcome: Outcome, now: u64) -> MigrationRecord {
    let mut r = r.clone();
    if r.phase.is_terminal() {
        return r;
    }
    match outcome {
        Outcome::Failed { reason, transient } => {
            r.attempts += 1;
            let where_ = r.phase;
            let message = format!("{where_}: {reason}");
            // From the switch on, the target serves: retrying is the only way forward. A rollback
            // retries too: the source must serve again.
            let must_retry = !where_.before_switch();
            if must_retry || (transient && r.attempts < MAX_ATTEMPTS) {
                r.retry_at_ms = Some(now + retry_delay(r.attempts));
                r.reason = Some(message);
            } else {
                roll_back(&mut r, Phase::Failed, message, now);
            }
        }
        Outcome::Differences(diffs) => {
            r.verified = false;
            let shown: Vec<String> = diffs.iter().take(5).cloned().collect();
            let message = format!(
                "{}: the target's data differs from the {} in {} places: {}",
                r.phase,
                if r.from_backup.is_some() {
                    "snapshots' manifests"
                } else {
                    "source's"
                },
                diffs.len(),
                shown.join("; ")
            );
            roll_back(&mut r, Phase::Failed, message, now);
        }
        Outcome::Done { bytes } => {
            r.retry_at_ms = None;
            match r.phase {
                Phase::PreCopying => r.bytes_pre_copied = bytes,
                Phase::FinalCopying => r.bytes_finally_copied = bytes,
                Phase::StoppingSource => r.source = SourceState::Stopped,
                Phase::Verifying => r.verified = true,
                Phase::SwitchingNames => r.downtime_ended_ms = Some(now),
                _ => {}
            }
            match r.phase {
                // From the last backup: the restore was verified against the snapshots' manifests,
                // and nothing of the source can be stopped, copied or retired.
                Phase::PreCopying if r.from_backup.is_some() => {
                    r.bytes_pre_copied = r.from_backup.as_ref().map_or(0, |b| b.total_bytes);
                    r.verified = true;
                    enter(&mut r, Phase::StartingTarget, now);
                    r.reason = None;
                }
                Phase::SwitchingNames if r.from_backup.is_some() => {
                    r.source = SourceState::Unreachable;
                    enter(&mut r, Phase::Succeeded, now);
                    r.reason = None;
                }
                Phase::SwitchingNames => {
                    if let RetirePolicy::Delete { grace_ms } = r.retire {
                        r.retire_at_ms = Some(now + grace_ms);
                    }
                    enter(&mut r, Phase::RetiringSource, now);
                    r.reason = None;
                }
                Phase::RetiringSource => match (r.retire, r.retire_at_ms) {
                    (RetirePolicy::Retain, _) => {
                        r.source = SourceState::Retained;
                        enter(&mut r, Phase::Succeeded, now);
                    }
                    (RetirePolicy::Delete { .. }, Some(at)) if now < at => {
                        // Stopped for now; destroyed once the grace period is over.
                        r.source = SourceState::Stopped;
                    }
                    (RetirePolicy::Delete { .. }, _) => {
                        r.source = SourceState::Destroyed;
                        enter(&mut r, Phase::Succeeded, now);
                    }
                },
                Phase::RollingBack => {
                    if r.downtime_started_ms.is_some() {
                        r.downtime_ended_ms = Some(now);
                    }
                    r.source = if r.from_backup.is_some() {
                        SourceState::Unreachable
                    } else {
                        SourceState::Serving
                    };
                    if r.failed_target == FailedTarget::Remove {
                        r.target_removed = true;
                    }
                    let to = r.rollback_to.unwrap_or(Phase::Failed);
                    enter(&mut r, to, now);
                }
                phase => {
                    enter(&mut r, phase.next(), now);
                    r.reason = None;
                }
            }
        }
    }
    r
}

/// Applies the Deployment's current `spec.runtimeEnvironment`: back at the source before the switch
/// cancels (the source serves again); a third environment cancels as well (a new migration follows
/// once the source serves). After the switch, a change is refused with the reason.
pub fn desired_environment(
    r: &MigrationRecord,
    environment: &str,
    now: u64,
) -> Result<Option<MigrationRecord>, PhaseError> {
    if environment == r.to || r.phase.is_terminal() || r.phase == Phase::RollingBack {
        return Ok(None);
    }
    if !r.phase.before_switch() {
        return Err(PhaseError::PastTheSwitch {
            deployment: r.deployment.clone(),
            from: r.from.clone(),
            to: r.to.clone(),
            phase: r.phase,
        });
    }
    let mut r = r.clone();
    let reason = format!(
        "spec.runtimeEnvironment was set to {environment} during {}: the migration to {} is cancelled and the source serves again",
        r.phase, r.to
    );
    roll_back(&mut r, Phase::Cancelled, reason, now);
    Ok(Some(r))
}

/// The downtime in seconds: from the stop of the source until the names pointed at a serving host
/// (`now` while it lasts).
pub fn downtime_seconds(r: &MigrationRecord, now: u64) -> Option<f64> {
    let start = r.downtime_started_ms?;
    let end = r.downtime_ended_ms.unwrap_or(now);
    Some(end.saturating_sub(start) as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: u64 = 86_400_000;

    fn fresh() -> MigrationRecord {
        begin(
            "op",
            "old",
            "new",
            RetirePolicy::Delete { grace_ms: GRACE },
            FailedTarget::Remove,
            1_000,
        )
    }

    fn fail(transient: bool) -> Outcome {
        Outcome::Failed {
            reason: "host unreachable".into(),
            transient,
        }
    }

    /// Drives a fresh record with successes until it is in `phase`.
    fn at(phase: Phase) -> MigrationRecord {
        let mut r = fresh();
        let mut now = 1_000;
        while r.phase != phase {
            now += 100;
            assert!(!r.phase.is_terminal(), "{phase} not reached");
            r = advance(&r, Outcome::Done { bytes: 7 }, now);
        }
        r
    }

    #[test]
    fn a_migration_walks_every_phase_in_order_and_records_bytes_downtime_and_durations() {
        let mut r = fresh();
        let expected = [
            (Action::Provision, 0),
            (Action::PreCopy, 1_000_000),
            (Action::StopSource, 0),
            (Action::FinalCopy, 10_000),
            (Action::Verify, 0),
            (Action::StartTarget, 0),
            (Action::SwitchNames, 0),
        ];
        let mut now = 1_000;
        for (want, bytes) in expected {
            assert_eq!(action(&r, now), want, "in {}", r.phase);
            now += 1_000;
            r = advance(&r, Outcome::Done { bytes }, now);
        }
        // Under Delete the source waits, stopped, for its grace period.
        assert_eq!(r.phase, Phase::RetiringSource);
        assert_eq!(r.source, SourceState::Stopped);
        let at = r.retire_at_ms.unwrap();
        assert_eq!(at, 8_000 + GRACE);
        now += 1;
        assert_eq!(action(&r, now), Action::WaitUntil(at));
        assert_eq!(action(&r, at), Action::RetireSource { destroy: true });
        r = advance(&r, Outcome::ok(), at);
        assert_eq!(r.phase, Phase::Succeeded);
        assert_eq!(r.source, SourceState::Destroyed);
        assert_eq!(action(&r, at), Action::Nothing);
        assert_eq!((r.bytes_pre_copied, r.bytes_finally_copied), (1_000_000, 10_000));
        assert!(r.verified);
        // Downtime: from entering StoppingSource (t=3000) to the switch (t=8000).
        assert_eq!(downtime_seconds(&r, at), Some(5.0));
        assert_eq!(r.durations_ms["PreCopying"], 1_000);
        assert_eq!(r.durations_ms.len(), 8);
        assert_eq!(r.durations_ms["RetiringSource"], GRACE);
        assert_eq!(r.finished_ms, Some(at));
    }

    #[test]
    fn under_retain_the_source_is_stopped_and_kept() {
        let mut r = begin("op", "a", "b", RetirePolicy::Retain, FailedTarget::Remove, 0);
        while r.phase != Phase::RetiringSource {
            r = advance(&r, Outcome::ok(), 10);
        }
        assert_eq!(r.retire_at_ms, None);
        assert_eq!(action(&r, 10), Action::RetireSource { destroy: false });
        r = advance(&r, Outcome::ok(), 20);
        assert_eq!((r.phase, r.source), (Phase::Succeeded, SourceState::Retained));
    }

    #[test]
    fn a_transient_failure_is_retried_with_backoff_in_the_same_phase() {
        for phase in [
            Phase::Provisioning,
            Phase::PreCopying,
            Phase::StoppingSource,
            Phase::FinalCopying,
            Phase::Verifying,
            Phase::StartingTarget,
        ] {
            let r = at(phase);
            let now = r.phase_started_ms;
            let r2 = advance(&r, fail(true), now);
            assert_eq!(r2.phase, phase);
            assert_eq!(r2.attempts, 1);
            assert_eq!(action(&r2, now), Action::WaitUntil(now + FIRST_RETRY_MS));
            assert_ne!(action(&r2, now + FIRST_RETRY_MS), Action::Nothing);
            assert!(r2.reason.as_deref().unwrap().contains("host unreachable"));
        }
        assert_eq!(retry_delay(1), 2_000);
        assert_eq!(retry_delay(2), 4_000);
        assert_eq!(retry_delay(40), MAX_RETRY_MS);
    }

    #[test]
    fn every_failure_before_the_switch_rolls_back_and_ends_failed_with_the_source_serving() {
        for phase in [
            Phase::Provisioning,
            Phase::PreCopying,
            Phase::StoppingSource,
            Phase::FinalCopying,
            Phase::Verifying,
            Phase::StartingTarget,
        ] {
            let r = at(phase);
            let stopped = phase >= Phase::StoppingSource;
            let r = advance(&r, fail(false), 50_000);
            assert_eq!(r.phase, Phase::RollingBack, "from {phase}");
            assert_eq!(r.failed_in, Some(phase));
            assert_eq!(
                action(&r, 50_000),
                Action::RestoreSource {
                    start_source: stopped,
                    remove_target: true
                },
                "from {phase}"
            );
            let r = advance(&r, Outcome::ok(), 51_000);
            assert_eq!(r.phase, Phase::Failed);
            assert_eq!(r.source, SourceState::Serving);
            assert!(r.target_removed);
            let reason = r.reason.clone().unwrap();
            assert!(
                reason.starts_with(phase.as_str()) && reason.contains("host unreachable"),
                "{reason}"
            );
            // The downtime of a failed migration ends when the source serves again.
            if stopped {
                assert_eq!(r.downtime_ended_ms, Some(51_000));
            }
            assert_eq!(action(&r, 60_000), Action::Nothing);
        }
    }

    #[test]
    fn a_transient_failure_that_persists_rolls_back_after_the_last_attempt() {
        let mut r = at(Phase::FinalCopying);
        for i in 1..MAX_ATTEMPTS {
            r = advance(&r, fail(true), 10_000 * u64::from(i));
            assert_eq!(r.phase, Phase::FinalCopying);
        }
        r = advance(&r, fail(true), 100_000);
        assert_eq!(r.phase, Phase::RollingBack);
        assert_eq!(r.failed_in, Some(Phase::FinalCopying));
    }

    #[test]
    fn differing_data_never_starts_the_target_and_says_where() {
        let r = at(Phase::Verifying);
        let r = advance(
            &r,
            Outcome::Differences(vec!["/var/lib/app/a: sha256 differs".into()]),
            9_000,
        );
        assert_eq!(r.phase, Phase::RollingBack);
        assert!(!r.verified);
        assert!(r.reason.unwrap().contains("/var/lib/app/a: sha256 differs"));
    }

    #[test]
    fn a_kept_failed_target_is_not_removed() {
        let mut r = at(Phase::PreCopying);
        r.failed_target = FailedTarget::Keep;
        let r = advance(&r, fail(false), 1);
        assert_eq!(
            action(&r, 1),
            Action::RestoreSource {
                start_source: false,
                remove_target: false
            }
        );
        let r = advance(&r, Outcome::ok(), 2);
        assert!(!r.target_removed);
    }

    #[test]
    fn failures_from_the_switch_on_are_retried_never_rolled_back() {
        for phase in [Phase::SwitchingNames, Phase::RetiringSource, Phase::RollingBack] {
            let mut r = at(Phase::StartingTarget);
            if phase == Phase::RollingBack {
                r = advance(&r, fail(false), 1);
            } else {
                while r.phase != phase {
                    r = advance(&r, Outcome::ok(), 1);
                }
            }
            let before = r.phase;
            for i in 0..(MAX_ATTEMPTS + 3) {
                r = advance(&r, fail(false), u64::from(i) * 1_000_000);
            }
            assert_eq!(r.phase, before, "{phase}");
            assert!(r.retry_at_ms.is_some());
        }
    }

    #[test]
    fn reverting_the_environment_before_the_switch_cancels_and_the_source_serves_again() {
        for phase in [
            Phase::Provisioning,
            Phase::PreCopying,
            Phase::StoppingSource,
            Phase::FinalCopying,
            Phase::Verifying,
            Phase::StartingTarget,
        ] {
            let r = at(phase);
            assert_eq!(desired_environment(&r, "new", 5).unwrap(), None);
            let c = desired_environment(&r, "old", 5).unwrap().unwrap();
            assert_eq!(c.phase, Phase::RollingBack);
            assert_eq!(c.rollback_to, Some(Phase::Cancelled));
            let done = advance(&c, Outcome::ok(), 6);
            assert_eq!(
                (done.phase, done.source),
                (Phase::Cancelled, SourceState::Serving)
            );
            assert!(done.reason.unwrap().contains("set to old"));
            // A cancel during the rollback changes nothing.
            assert_eq!(desired_environment(&c, "old", 7).unwrap(), None);
        }
    }

    #[test]
    fn reverting_the_environment_after_the_switch_is_refused_with_the_way_back() {
        let r = at(Phase::RetiringSource);
        let err = desired_environment(&r, "old", 5).unwrap_err();
        assert!(
            err.to_string().contains("migrate rollback deployment op"),
            "{err}"
        );
        let done = at(Phase::Succeeded);
        assert_eq!(desired_environment(&done, "old", 5).unwrap(), None);
    }

    #[test]
    fn a_terminal_record_never_changes() {
        for phase in [Phase::Succeeded, Phase::Failed, Phase::Cancelled] {
            let mut r = at(Phase::Succeeded);
            r.phase = phase;
            assert_eq!(advance(&r, fail(false), 9), r);
            assert_eq!(advance(&r, Outcome::ok(), 9), r);
            assert_eq!(action(&r, 9), Action::Nothing);
        }
    }

    #[test]
    fn a_record_survives_serialisation_exactly() {
        let r = advance(&at(Phase::FinalCopying), fail(true), 77);
        let json = serde_json::to_vec(&r).unwrap();
        let back: MigrationRecord = serde_json::from_slice(&json).unwrap();
        assert_eq!(back, r);
        assert_eq!(action(&back, 77), action(&r, 77));
    }

    #[test]
    fn the_source_is_never_destroyed_before_the_target_is_verified_and_serving() {
        // Whatever sequence of outcomes, a destroy is asked only after verify, start and switch.
        let outcomes = [
            Outcome::ok(),
            fail(true),
            fail(false),
            Outcome::Differences(vec!["x".into()]),
        ];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2_000 {
            let mut r = fresh();
            let mut passed = Vec::new();
            for step in 0..60u64 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let now = r.retry_at_ms.unwrap_or(0).max(step * GRACE);
                let a = action(&r, now);
                if let Action::RetireSource { destroy: true } = a {
                    for p in [Phase::Verifying, Phase::StartingTarget, Phase::SwitchingNames] {
                        assert!(passed.contains(&p), "destroy before {p}: {r:?}");
                    }
                    assert!(r.verified);
                }
                let o = outcomes[(seed % 4) as usize].clone();
                let before = r.phase;
                r = advance(&r, o, now);
                if r.phase != before && before != Phase::RollingBack && r.phase != Phase::RollingBack {
                    passed.push(before);
                }
                if r.phase.is_terminal() {
                    assert!(r.phase != Phase::Failed || r.source == SourceState::Serving);
                    break;
                }
            }
        }
    }
}
