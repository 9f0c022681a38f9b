//! The persisted migration record in the store's inventory, and how it shows in `status.migration`.

use super::phase::{self, MigrationRecord, Phase};
use crate::api::{Condition, ConditionStatus, Timestamp};
use crate::store::{Store, StoreError};

/// The inventory prefix of migration records.
pub const PREFIX: &str = "migration/";

/// The inventory id of `deployment`'s migration.
pub fn id(deployment: &str) -> String {
    format!("{PREFIX}{deployment}")
}

/// `deployment`'s migration record, if any.
pub fn load(store: &Store, deployment: &str) -> Result<Option<MigrationRecord>, StoreError> {
    store.inventory(&id(deployment))
}

/// Persists `record` (one fsynced transaction).
pub fn save(store: &Store, record: &MigrationRecord) -> Result<(), StoreError> {
    store.put_inventory(&id(&record.deployment), record)
}

/// Every migration record.
pub fn all(store: &Store) -> Result<Vec<MigrationRecord>, StoreError> {
    Ok(store
        .inventory_list::<MigrationRecord>(PREFIX)?
        .into_iter()
        .map(|(_, r)| r)
        .collect())
}

pub use crate::api::MigrationStatus;

fn stamp(ms: u64) -> Timestamp {
    Timestamp::from_unix(ms / 1000)
}

/// The record as `status.migration` shows it at `now` (Unix ms).
pub fn status(r: &MigrationRecord, now: u64) -> MigrationStatus {
    MigrationStatus {
        phase: r.phase.as_str().to_owned(),
        from: r.from.clone(),
        to: r.to.clone(),
        started: stamp(r.started_ms),
        phase_started: stamp(r.phase_started_ms),
        finished: r.finished_ms.map(stamp),
        bytes_pre_copied: r.bytes_pre_copied,
        bytes_finally_copied: r.bytes_finally_copied,
        downtime_seconds: phase::downtime_seconds(r, now),
        verified: r.verified,
        source: r.source.as_str().to_owned(),
        source_destroyed_after: (r.source != phase::SourceState::Destroyed)
            .then_some(r.retire_at_ms)
            .flatten()
            .map(stamp),
        failed_in: r.failed_in.map(|p| p.as_str().to_owned()),
        message: r.reason.clone(),
        from_backup: r.from_backup.as_ref().map(|b| crate::api::FromBackupStatus {
            snapshots: b.snapshots.clone(),
            writes_lost_after: b.taken.clone(),
        }),
        refused: None,
    }
}

/// The `Migrating` condition: true while the migration runs (until the names point at the target and
/// the source is stopped), false once done, failed or cancelled, with the reason.
pub fn condition(r: &MigrationRecord, now: u64, generation: u64) -> Condition {
    let (status, reason, message) = match r.phase {
        Phase::RetiringSource | Phase::Succeeded => (
            ConditionStatus::False,
            "Migrated",
            format!(
                "moved from {} to {}; the source is {}",
                r.from,
                r.to,
                r.source.as_str().to_lowercase()
            ),
        ),
        Phase::Failed => (
            ConditionStatus::False,
            "MigrationFailed",
            r.reason.clone().unwrap_or_default(),
        ),
        Phase::Cancelled => (
            ConditionStatus::False,
            "MigrationCancelled",
            r.reason.clone().unwrap_or_default(),
        ),
        Phase::RollingBack => (
            ConditionStatus::True,
            "RollingBack",
            format!(
                "restarting the source in {}: {}",
                r.from,
                r.reason.clone().unwrap_or_default()
            ),
        ),
        p => (
            ConditionStatus::True,
            p.as_str(),
            match &r.reason {
                Some(why) => format!("{p} from {} to {} (retrying: {why})", r.from, r.to),
                None => format!("{p} from {} to {}", r.from, r.to),
            },
        ),
    };
    Condition {
        type_: "Migrating".into(),
        status,
        reason: reason.into(),
        message,
        last_transition_time: stamp(if r.phase.is_terminal() {
            r.finished_ms.unwrap_or(now)
        } else {
            r.started_ms
        }),
        observed_generation: generation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::phase::{FailedTarget, Outcome, RetirePolicy, advance, begin};

    #[test]
    fn a_record_persisted_in_the_store_is_read_back_after_the_store_is_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = begin(
            "op",
            "old",
            "new",
            RetirePolicy::Retain,
            FailedTarget::Remove,
            1_000,
        );
        r = advance(&r, Outcome::ok(), 2_000);
        {
            let store = Store::open(dir.path()).unwrap();
            save(&store, &r).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(load(&store, "op").unwrap(), Some(r.clone()));
        assert_eq!(load(&store, "other").unwrap(), None);
        assert_eq!(all(&store).unwrap(), vec![r]);
    }

    #[test]
    fn status_and_condition_show_phase_bytes_downtime_and_why() {
        let mut r = begin(
            "op",
            "old",
            "new",
            RetirePolicy::Delete { grace_ms: 86_400_000 },
            FailedTarget::Remove,
            1_000,
        );
        for bytes in [0, 5_000_000, 0] {
            r = advance(&r, Outcome::Done { bytes }, r.phase_started_ms + 1_000);
        }
        assert_eq!(r.phase, Phase::FinalCopying);
        let s = status(&r, r.phase_started_ms + 2_500);
        assert_eq!(s.phase, "FinalCopying");
        assert_eq!(s.bytes_pre_copied, 5_000_000);
        assert_eq!(s.downtime_seconds, Some(3.5));
        assert_eq!(s.source, "Stopped");
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["bytesPreCopied"], 5_000_000);
        assert_eq!(json["downtimeSeconds"], 3.5);
        let c = condition(&r, 0, 4);
        assert_eq!(
            (c.status, c.reason.as_str()),
            (ConditionStatus::True, "FinalCopying")
        );
        assert_eq!(c.message, "FinalCopying from old to new");
        let failed = advance(
            &r,
            Outcome::Failed {
                reason: "restic: repository locked".into(),
                transient: false,
            },
            9_000,
        );
        let failed = advance(&failed, Outcome::ok(), 9_500);
        let c = condition(&failed, 9_500, 4);
        assert_eq!(
            (c.status, c.reason.as_str()),
            (ConditionStatus::False, "MigrationFailed")
        );
        assert!(c.message.contains("repository locked"), "{}", c.message);
        let s = status(&failed, 10_000);
        assert_eq!(
            (s.failed_in.as_deref(), s.source.as_str()),
            (Some("FinalCopying"), "Serving")
        );
    }
}
