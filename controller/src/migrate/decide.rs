//! The pure decision a Deployment's reconcile takes about migration, and the event each step makes.

use super::phase::{self, FailedTarget, MigrationRecord, Phase, PhaseError, RetirePolicy};
use super::run::Step;
use crate::api::EventType;

/// What the reconcile of a Deployment does about its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The Deployment is where it should be: reconcile its hosts as usual.
    Stay,
    /// A new migration starts with this record (persist it, then step it).
    Begin(MigrationRecord),
    /// The running migration goes on (step it); the hosts of both sides are left alone by the
    /// ordinary reconcile meanwhile.
    Continue,
    /// The running migration is cancelled: persist this record (it rolls back), then step it.
    Cancel(MigrationRecord),
    /// The change cannot be applied (reported as a Warning; the migration goes on).
    Refuse(PhaseError),
}

/// Where the Deployment's hosts run: the migration's target once the names switched, its source
/// after a failure or cancel, else where status last saw them.
pub fn placed_environment<'a>(record: Option<&'a MigrationRecord>, seen: Option<&'a str>) -> Option<&'a str> {
    match record {
        Some(r)
            if matches!(
                r.phase,
                Phase::SwitchingNames | Phase::RetiringSource | Phase::Succeeded
            ) =>
        {
            Some(&r.to)
        }
        Some(r) => Some(&r.from),
        None => seen,
    }
}

/// Decides for `deployment`, whose spec names `wanted`, whose hosts were last seen in `seen`, given
/// its migration record.
pub fn decide(
    deployment: &str,
    wanted: &str,
    seen: Option<&str>,
    record: Option<&MigrationRecord>,
    policy: (RetirePolicy, FailedTarget),
    now: u64,
) -> Decision {
    if let Some(r) = record
        && !r.phase.is_terminal()
    {
        return match phase::desired_environment(r, wanted, now) {
            Ok(Some(cancelled)) => Decision::Cancel(cancelled),
            Ok(None) => Decision::Continue,
            Err(e) => Decision::Refuse(e),
        };
    }
    match placed_environment(record, seen) {
        Some(placed) if placed != wanted => {
            Decision::Begin(phase::begin(deployment, placed, wanted, policy.0, policy.1, now))
        }
        _ => Decision::Stay,
    }
}

/// The event a step makes: type, reason and message.
pub fn event(step: &Step) -> Option<(EventType, String, String)> {
    let r = &step.record;
    if step.before == r.phase {
        return r.retry_at_ms.map(|_| {
            (
                EventType::Warning,
                "MigrationRetrying".to_owned(),
                r.reason.clone().unwrap_or_default(),
            )
        });
    }
    let bytes = |n: u64| format!("{:.1} MB", n as f64 / 1e6);
    let message = match r.phase {
        Phase::PreCopying => format!("target hosts in {} are ready, services held stopped", r.to),
        Phase::StoppingSource => format!("pre-copied {} while the source served", bytes(r.bytes_pre_copied)),
        Phase::FinalCopying => format!("the source's services in {} are stopped: downtime starts", r.from),
        Phase::Verifying => format!(
            "final copy: {} changed since the pre-copy",
            bytes(r.bytes_finally_copied)
        ),
        Phase::StartingTarget => match &r.from_backup {
            Some(b) => format!(
                "restored {} from the last backups of {} and verified against their manifests",
                bytes(r.bytes_pre_copied),
                b.taken
            ),
            None => "files and databases match on both sides".to_owned(),
        },
        Phase::SwitchingNames => "the target serves and is healthy".to_owned(),
        Phase::RetiringSource => format!(
            "the names point at {}: downtime ended after {:.1} s",
            r.to,
            phase::downtime_seconds(r, r.phase_started_ms).unwrap_or(0.0)
        ),
        Phase::Succeeded => format!(
            "moved from {} to {}; the source is {}",
            r.from,
            r.to,
            r.source.as_str().to_lowercase()
        ),
        Phase::RollingBack | Phase::Failed | Phase::Cancelled => r.reason.clone().unwrap_or_default(),
        Phase::Provisioning => String::new(),
    };
    let (type_, reason) = match r.phase {
        Phase::RollingBack => (EventType::Warning, "MigrationRollingBack".to_owned()),
        Phase::Failed => (EventType::Warning, "MigrationFailed".to_owned()),
        Phase::Cancelled => (EventType::Normal, "MigrationCancelled".to_owned()),
        Phase::Succeeded => (EventType::Normal, "Migrated".to_owned()),
        p => (EventType::Normal, format!("Migration{p}")),
    };
    Some((type_, reason, message))
}

/// Why a rollback or a restore from the last backup cannot go ahead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecoveryError {
    /// No migration moved the Deployment, or it never switched.
    #[error("Deployment {0}: no finished migration to roll back (only one that switched the names can be)")]
    NothingToRollBack(String),
    /// The source is gone.
    #[error(
        "Deployment {deployment}: the source in {from} was {state}; there is nothing to go back to (restore from a backup instead)"
    )]
    SourceGone {
        /// The Deployment.
        deployment: String,
        /// The old environment.
        from: String,
        /// What became of it.
        state: &'static str,
    },
    /// Restoring from the last backup loses writes; it needs the operator's word.
    #[error(
        "Deployment {deployment}: if {from} cannot be reached, its data cannot be copied live; starting the target from the last backups ({snapshots}) loses every write made since {time}; confirm to go ahead (`--confirm`)"
    )]
    NeedsConfirmation {
        /// The Deployment.
        deployment: String,
        /// The unreachable environment.
        from: String,
        /// The snapshot of each host (`host: id, …`).
        snapshots: String,
        /// When the oldest was taken: the data-loss window starts here.
        time: String,
    },
    /// A source host has no good backup to start from.
    #[error(
        "Deployment {deployment}: host {host} in {from} has no successful backup; there is nothing to start the target from (the data can only come from {from} itself)"
    )]
    NeverBackedUp {
        /// The Deployment.
        deployment: String,
        /// The old environment.
        from: String,
        /// The host without a backup.
        host: String,
    },
    /// No migration towards the Deployment's environment to recover.
    #[error(
        "Deployment {deployment}: no migration to {wanted} is under way; set spec.runtimeEnvironment to the new environment first, then restore from the last backup if the old one cannot be reached"
    )]
    NoMigrationToRecover {
        /// The Deployment.
        deployment: String,
        /// Its `spec.runtimeEnvironment`.
        wanted: String,
    },
    /// The migration already stopped the source: the live copy goes on from there.
    #[error(
        "Deployment {deployment}: the migration is in {phase}, past the pre-copy; starting from a backup is only for a migration that cannot reach its source before stopping it"
    )]
    TooLate {
        /// The Deployment.
        deployment: String,
        /// Where the migration stands.
        phase: Phase,
    },
}

/// `fediversity migrate rollback`: during the grace period (or with a retained source), brings the
/// Deployment back to its old environment as a new migration from the new one: the target's writes
/// since the switch are copied back, and the old hosts are reused (provisioning keeps existing ones).
/// Returns the finished migration, its source now kept, and the migration back.
pub fn rollback(r: &MigrationRecord, now: u64) -> Result<(MigrationRecord, MigrationRecord), RecoveryError> {
    if !matches!(r.phase, Phase::RetiringSource | Phase::Succeeded) {
        return Err(RecoveryError::NothingToRollBack(r.deployment.clone()));
    }
    let gone = match r.source {
        phase::SourceState::Destroyed => Some("destroyed after its grace period"),
        phase::SourceState::Unreachable => {
            Some("unreachable when the migration started from its last backup")
        }
        _ => None,
    };
    if let Some(state) = gone {
        return Err(RecoveryError::SourceGone {
            deployment: r.deployment.clone(),
            from: r.from.clone(),
            state,
        });
    }
    let mut kept = r.clone();
    kept.retire = RetirePolicy::Retain;
    kept.retire_at_ms = None;
    kept.source = phase::SourceState::Retained;
    if kept.phase == Phase::RetiringSource {
        kept.phase = Phase::Succeeded;
        kept.finished_ms = Some(now);
    }
    kept.reason = Some("rolled back: the source is kept and the Deployment moves back".into());
    let back = phase::begin(&r.deployment, &r.to, &r.from, r.retire, r.failed_target, now);
    Ok((kept, back))
}

/// The last good backup of one source host, as `status.backups` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastBackup {
    /// The host.
    pub host: String,
    /// Its last good snapshot.
    pub snapshot: Option<String>,
    /// When that snapshot was taken (RFC 3339).
    pub time: Option<String>,
    /// The bytes it holds.
    pub total_bytes: u64,
}

impl LastBackup {
    /// Every host's last good backup from a Deployment's `status.backups` (nothing when absent or
    /// unreadable).
    pub fn from_status(backups: Option<&serde_json::Value>) -> Vec<LastBackup> {
        let listed: Vec<crate::api::HostBackupStatus> = backups
            .and_then(|b| serde_json::from_value(b.clone()).ok())
            .unwrap_or_default();
        Self::from_backups(&listed)
    }

    /// Every host's last good backup from a Deployment's typed `status.backups`.
    pub fn from_backups(backups: &[crate::api::HostBackupStatus]) -> Vec<LastBackup> {
        backups
            .iter()
            .map(|b| LastBackup {
                host: b.host.clone(),
                snapshot: b.snapshot.clone(),
                time: b.time.map(|t| t.to_string()),
                total_bytes: b.total_bytes,
            })
            .collect()
    }
}

/// When the old environment cannot be reached: the migration starts the target from the source
/// hosts' last backups instead of a live copy, only with the operator's confirmation, which names the
/// data-loss window (the oldest of those snapshots). Allowed while nothing of the source was stopped:
/// a migration still provisioning or pre-copying (the pre-copy cannot reach the source), or one that
/// failed there. `hosts` are the Deployment's planned hosts, `wanted` its `spec.runtimeEnvironment`.
/// Returns the record that replaces `r`.
pub fn restore_from_backup(
    r: Option<&MigrationRecord>,
    deployment: &str,
    wanted: &str,
    hosts: &[String],
    last: &[LastBackup],
    confirmed: bool,
    now: u64,
) -> Result<MigrationRecord, RecoveryError> {
    let Some(r) = r.filter(|r| r.to == wanted) else {
        return Err(RecoveryError::NoMigrationToRecover {
            deployment: deployment.to_owned(),
            wanted: wanted.to_owned(),
        });
    };
    let before_stop = match r.phase {
        Phase::Provisioning | Phase::PreCopying => true,
        // Given up in the pre-copy (or giving up: what is left of the rollback, removing the target,
        // is moot when the target is needed after all).
        Phase::Failed | Phase::RollingBack => r.failed_in.is_some_and(|p| p <= Phase::PreCopying),
        _ => false,
    };
    if !before_stop || (r.downtime_started_ms.is_some() && r.from_backup.is_none()) {
        return Err(RecoveryError::TooLate {
            deployment: deployment.to_owned(),
            phase: r.phase,
        });
    }
    let mut snapshots = std::collections::BTreeMap::new();
    let mut total_bytes = 0;
    let mut oldest: Option<&str> = None;
    for host in hosts {
        let found = last.iter().find(|b| &b.host == host);
        let (Some(snapshot), Some(time)) = (
            found.and_then(|b| b.snapshot.as_deref()),
            found.and_then(|b| b.time.as_deref()),
        ) else {
            return Err(RecoveryError::NeverBackedUp {
                deployment: deployment.to_owned(),
                from: r.from.clone(),
                host: host.clone(),
            });
        };
        snapshots.insert(host.clone(), snapshot.to_owned());
        total_bytes += found.map_or(0, |b| b.total_bytes);
        // RFC 3339 times in UTC compare as text.
        if oldest.is_none_or(|o| time < o) {
            oldest = Some(time);
        }
    }
    let Some(taken) = oldest else {
        return Err(RecoveryError::NoMigrationToRecover {
            deployment: deployment.to_owned(),
            wanted: wanted.to_owned(),
        });
    };
    if !confirmed {
        return Err(RecoveryError::NeedsConfirmation {
            deployment: deployment.to_owned(),
            from: r.from.clone(),
            snapshots: snapshots
                .iter()
                .map(|(h, s)| format!("{h}: {s}"))
                .collect::<Vec<_>>()
                .join(", "),
            time: taken.to_owned(),
        });
    }
    let mut fresh = phase::begin(deployment, &r.from, &r.to, r.retire, r.failed_target, now);
    fresh.from_backup = Some(phase::FromBackup {
        snapshots,
        taken: taken.to_owned(),
        total_bytes,
        confirmed_ms: now,
    });
    // The service is down from the operator's word at the latest (it was unreachable before).
    fresh.downtime_started_ms = Some(now);
    fresh.reason = Some(format!(
        "{} cannot be reached: the target starts from the last backup of {taken}; writes after it are lost",
        r.from
    ));
    Ok(fresh)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::phase::{Action, Outcome, advance, begin};

    const POLICY: (RetirePolicy, FailedTarget) = (RetirePolicy::Retain, FailedTarget::Remove);

    #[test]
    fn a_deployment_in_place_stays_and_a_changed_environment_begins_a_migration() {
        assert_eq!(decide("op", "a", Some("a"), None, POLICY, 5), Decision::Stay);
        assert_eq!(decide("op", "a", None, None, POLICY, 5), Decision::Stay);
        let Decision::Begin(r) = decide("op", "b", Some("a"), None, POLICY, 5) else {
            panic!("a move begins")
        };
        assert_eq!(
            (r.from.as_str(), r.to.as_str(), r.phase),
            ("a", "b", Phase::Provisioning)
        );
    }

    #[test]
    fn a_running_migration_continues_is_cancelled_by_reverting_and_refuses_after_the_switch() {
        let r = begin("op", "a", "b", POLICY.0, POLICY.1, 0);
        assert_eq!(
            decide("op", "b", Some("a"), Some(&r), POLICY, 5),
            Decision::Continue
        );
        assert!(matches!(
            decide("op", "a", Some("a"), Some(&r), POLICY, 5),
            Decision::Cancel(c) if c.phase == Phase::RollingBack
        ));
        let mut late = r.clone();
        while late.phase != Phase::RetiringSource {
            late = advance(&late, Outcome::ok(), 1);
        }
        assert!(matches!(
            decide("op", "a", Some("a"), Some(&late), POLICY, 5),
            Decision::Refuse(_)
        ));
    }

    #[test]
    fn after_a_migration_the_deployment_is_where_it_ended() {
        let mut done = begin("op", "a", "b", POLICY.0, POLICY.1, 0);
        while !done.phase.is_terminal() {
            done = advance(&done, Outcome::ok(), 1);
        }
        assert_eq!(
            decide("op", "b", Some("a"), Some(&done), POLICY, 5),
            Decision::Stay
        );
        // Moving back is a new migration, from b.
        assert!(matches!(
            decide("op", "a", Some("a"), Some(&done), POLICY, 5),
            Decision::Begin(r) if r.from == "b" && r.to == "a"
        ));
        let mut failed = begin("op", "a", "b", POLICY.0, POLICY.1, 0);
        failed = advance(
            &failed,
            Outcome::Failed {
                reason: "x".into(),
                transient: false,
            },
            1,
        );
        failed = advance(&failed, Outcome::ok(), 2);
        assert_eq!(failed.phase, Phase::Failed);
        // A failed migration is not retried on its own: the hosts are in a, the spec says b.
        assert!(matches!(
            decide("op", "b", Some("a"), Some(&failed), POLICY, 5),
            Decision::Begin(r) if r.from == "a"
        ));
    }

    #[test]
    fn every_phase_change_makes_an_event_and_a_retry_a_warning() {
        let mut r = begin("op", "a", "b", POLICY.0, POLICY.1, 0);
        let mut reasons = Vec::new();
        while !r.phase.is_terminal() {
            let before = r.phase;
            r = advance(&r, Outcome::Done { bytes: 2_000_000 }, 1_000);
            let step = Step {
                before,
                action: Action::Nothing,
                record: r.clone(),
            };
            let (_, reason, message) = event(&step).unwrap();
            assert!(!message.is_empty(), "{reason}");
            reasons.push(reason);
        }
        assert_eq!(reasons.first().unwrap(), "MigrationPreCopying");
        assert_eq!(reasons.last().unwrap(), "Migrated");
        let failing = advance(&r.clone(), Outcome::ok(), 0);
        assert!(
            event(&Step {
                before: failing.phase,
                action: Action::Nothing,
                record: failing
            })
            .is_none()
        );
        let stuck = advance(
            &begin("op", "a", "b", POLICY.0, POLICY.1, 0),
            Outcome::Failed {
                reason: "host unreachable".into(),
                transient: true,
            },
            1,
        );
        let (t, reason, message) = event(&Step {
            before: Phase::Provisioning,
            action: Action::Provision,
            record: stuck,
        })
        .unwrap();
        assert_eq!((t, reason.as_str()), (EventType::Warning, "MigrationRetrying"));
        assert!(message.contains("host unreachable"));
    }

    #[test]
    fn a_rollback_in_the_grace_period_keeps_the_source_and_moves_back() {
        let policy = (
            RetirePolicy::Delete { grace_ms: 86_400_000 },
            FailedTarget::Remove,
        );
        let mut r = begin("op", "a", "b", policy.0, policy.1, 0);
        assert!(matches!(
            rollback(&r, 1),
            Err(RecoveryError::NothingToRollBack(_))
        ));
        while r.phase != Phase::RetiringSource {
            r = advance(&r, Outcome::ok(), 10);
        }
        let (kept, back) = rollback(&r, 20).unwrap();
        assert_eq!(
            (kept.phase, kept.source),
            (Phase::Succeeded, phase::SourceState::Retained)
        );
        assert_eq!(
            phase::action(&kept, u64::MAX),
            Action::Nothing,
            "never destroyed now"
        );
        assert_eq!(
            (back.from.as_str(), back.to.as_str(), back.phase),
            ("b", "a", Phase::Provisioning)
        );
        // After the grace period the source is gone.
        let at = r.retire_at_ms.unwrap();
        let gone = advance(&r, Outcome::ok(), at);
        let err = rollback(&gone, at).unwrap_err();
        assert!(
            err.to_string().contains("destroyed after its grace period"),
            "{err}"
        );
    }

    fn backups() -> Vec<LastBackup> {
        vec![
            LastBackup {
                host: "op-app".into(),
                snapshot: Some("4f2a9c1e".into()),
                time: Some("2026-12-01T03:00:00Z".into()),
                total_bytes: 3,
            },
            LastBackup {
                host: "op-media".into(),
                snapshot: Some("77aa00ff".into()),
                time: Some("2026-12-01T02:30:00Z".into()),
                total_bytes: 2,
            },
        ]
    }

    fn hosts() -> Vec<String> {
        vec!["op-app".into(), "op-media".into()]
    }

    #[test]
    fn a_restore_from_the_last_backup_states_the_oldest_snapshot_as_the_data_loss_window_and_needs_confirmation()
     {
        let r = begin("op", "a", "b", POLICY.0, POLICY.1, 0);
        let err = restore_from_backup(Some(&r), "op", "b", &hosts(), &backups(), false, 9).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("op-app: 4f2a9c1e, op-media: 77aa00ff")
                && text.contains("every write made since 2026-12-01T02:30:00Z")
                && text.contains("--confirm"),
            "{text}"
        );
        let fresh = restore_from_backup(Some(&r), "op", "b", &hosts(), &backups(), true, 9).unwrap();
        let from = fresh.from_backup.as_ref().unwrap();
        assert_eq!(from.snapshots["op-media"], "77aa00ff");
        assert_eq!(from.taken, "2026-12-01T02:30:00Z");
        assert_eq!(
            (fresh.phase, fresh.downtime_started_ms),
            (Phase::Provisioning, Some(9))
        );
    }

    #[test]
    fn a_restore_from_backup_needs_a_backup_of_every_host_and_a_migration_that_stopped_nothing() {
        let r = begin("op", "a", "b", POLICY.0, POLICY.1, 0);
        let one = &backups()[..1];
        assert!(matches!(
            restore_from_backup(Some(&r), "op", "b", &hosts(), one, true, 9),
            Err(RecoveryError::NeverBackedUp { host, .. }) if host == "op-media"
        ));
        assert!(matches!(
            restore_from_backup(None, "op", "b", &hosts(), &backups(), true, 9),
            Err(RecoveryError::NoMigrationToRecover { .. })
        ));
        assert!(matches!(
            restore_from_backup(Some(&r), "op", "a", &hosts(), &backups(), true, 9),
            Err(RecoveryError::NoMigrationToRecover { .. })
        ));
        // Past the stop the live copy goes on: the source's data is complete there.
        let mut stopped = r.clone();
        for _ in 0..3 {
            stopped = advance(&stopped, Outcome::ok(), 5);
        }
        assert_eq!(stopped.phase, Phase::FinalCopying);
        assert!(matches!(
            restore_from_backup(Some(&stopped), "op", "b", &hosts(), &backups(), true, 9),
            Err(RecoveryError::TooLate { .. })
        ));
        // A pre-copy that gave up (the source unreachable) may start from the backups.
        let mut failed = advance(&r, Outcome::ok(), 5);
        for _ in 0..phase::MAX_ATTEMPTS {
            failed = advance(
                &failed,
                Outcome::Failed {
                    reason: "unreachable".into(),
                    transient: true,
                },
                6,
            );
        }
        failed = advance(&failed, Outcome::ok(), 7);
        assert_eq!(
            (failed.phase, failed.failed_in),
            (Phase::Failed, Some(Phase::PreCopying))
        );
        assert!(restore_from_backup(Some(&failed), "op", "b", &hosts(), &backups(), true, 9).is_ok());
    }

    #[test]
    fn a_migration_from_backup_restores_verifies_starts_switches_and_leaves_the_unreachable_source_alone() {
        let r = begin("op", "a", "b", POLICY.0, POLICY.1, 0);
        let mut r = restore_from_backup(Some(&r), "op", "b", &hosts(), &backups(), true, 10).unwrap();
        let mut actions = Vec::new();
        let mut now = 10;
        while !r.phase.is_terminal() {
            now += 1_000;
            actions.push(phase::action(&r, now));
            r = advance(&r, Outcome::Done { bytes: 5 }, now);
        }
        assert_eq!(
            actions,
            vec![
                Action::Provision,
                Action::RestoreBackup,
                Action::StartTarget,
                Action::SwitchNames
            ]
        );
        assert_eq!(
            (r.phase, r.source, r.verified),
            (Phase::Succeeded, phase::SourceState::Unreachable, true)
        );
        assert_eq!(r.bytes_pre_copied, 5, "the snapshots' size");
        assert_eq!(phase::downtime_seconds(&r, now), Some(4.0));
        // Nothing to go back to.
        assert!(matches!(rollback(&r, now), Err(RecoveryError::SourceGone { .. })));
    }

    #[test]
    fn a_failed_restore_from_backup_rolls_back_without_starting_the_unreachable_source() {
        let r = begin("op", "a", "b", POLICY.0, POLICY.1, 0);
        let r = restore_from_backup(Some(&r), "op", "b", &hosts(), &backups(), true, 10).unwrap();
        let r = advance(&r, Outcome::ok(), 20);
        let r = advance(&r, Outcome::Differences(vec!["media/1.bin: size".into()]), 30);
        assert_eq!(r.phase, Phase::RollingBack);
        assert!(
            r.reason.as_deref().unwrap().contains("snapshots' manifests"),
            "{:?}",
            r.reason
        );
        assert_eq!(
            phase::action(&r, 31),
            Action::RestoreSource {
                start_source: false,
                remove_target: true
            }
        );
        let r = advance(&r, Outcome::ok(), 40);
        assert_eq!(
            (r.phase, r.source),
            (Phase::Failed, phase::SourceState::Unreachable)
        );
    }
}
