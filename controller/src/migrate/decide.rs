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
        Phase::StartingTarget => "files and databases match on both sides".to_owned(),
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
        "Deployment {deployment}: {from} cannot be reached, so its data cannot be copied live; restoring from the last backup (snapshot {snapshot} of {time}) loses every write since then; confirm to go ahead"
    )]
    NeedsConfirmation {
        /// The Deployment.
        deployment: String,
        /// The unreachable environment.
        from: String,
        /// The snapshot.
        snapshot: String,
        /// When it was taken: the data-loss window starts here.
        time: String,
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
    if r.source == phase::SourceState::Destroyed {
        return Err(RecoveryError::SourceGone {
            deployment: r.deployment.clone(),
            from: r.from.clone(),
            state: "destroyed after its grace period",
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

/// When the old environment cannot be reached: the restore from the last backup that replaces the
/// pre-copy, only with the operator's confirmation, which names the data-loss window. Returns the
/// snapshot to put in `spec.restore`.
pub fn restore_from_backup(
    deployment: &str,
    from: &str,
    last: Option<(&str, &str)>,
    confirmed: bool,
) -> Result<String, RecoveryError> {
    let Some((snapshot, time)) = last else {
        return Err(RecoveryError::SourceGone {
            deployment: deployment.to_owned(),
            from: from.to_owned(),
            state: "unreachable and never backed up",
        });
    };
    if !confirmed {
        return Err(RecoveryError::NeedsConfirmation {
            deployment: deployment.to_owned(),
            from: from.to_owned(),
            snapshot: snapshot.to_owned(),
            time: time.to_owned(),
        });
    }
    Ok(snapshot.to_owned())
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

    #[test]
    fn a_restore_from_the_last_backup_states_the_data_loss_window_and_needs_confirmation() {
        let last = Some(("4f2a9c1e", "2026-12-01T03:00:00Z"));
        let err = restore_from_backup("op", "a", last, false).unwrap_err();
        assert!(
            err.to_string()
                .contains("snapshot 4f2a9c1e of 2026-12-01T03:00:00Z")
                && err.to_string().contains("confirm"),
            "{err}"
        );
        assert_eq!(restore_from_backup("op", "a", last, true).unwrap(), "4f2a9c1e");
        assert!(matches!(
            restore_from_backup("op", "a", None, true),
            Err(RecoveryError::SourceGone { .. })
        ));
    }
}
