//! The daemon's migrations: one background driver per migrating Deployment steps its persisted record
//! through the phases (no runner slot is held while it copies or waits), applies cancels between
//! steps, and reports every step.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::decide::{LastBackup, RecoveryError};
use super::hosts::{Inputs, ProviderWorld, Providers};
use super::metrics::MigrationMetrics;
use super::phase::{self, Action, MigrationRecord};
use super::record;
use super::run::{Migrator, Step, WorldError, now_ms};
use crate::backup::{Backuper, Repository};
use crate::store::{Store, StoreError};

/// The longest a driver sleeps between two looks at a pending cancel while it waits for a retry.
const NAP: Duration = Duration::from_secs(1);
/// A driver waits in place for a retry or a retire time at most this far ahead; later ones are
/// picked up by the Deployment's next reconcile.
const HORIZON: Duration = Duration::from_secs(600);

/// Called after every step (events, a reconcile to write status), and once when a driver stops.
pub type Report = Arc<dyn Fn(Option<&Step>) + Send + Sync>;

/// Why a rollback cannot go ahead.
#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Nothing to roll back or to restore, or the source is gone, or the operator must confirm.
    #[error(transparent)]
    Recovery(#[from] RecoveryError),
    /// A driver steps the migration now.
    #[error("Deployment {0}: a migration step runs now; try again once it ended")]
    Busy(String),
    /// The spec still names the new environment.
    #[error(
        "Deployment {deployment}: set spec.runtimeEnvironment back to {from} first (it names {wanted}); the rollback then moves it there with the writes since the switch"
    )]
    SpecNotBack {
        /// The Deployment.
        deployment: String,
        /// Where it goes back to.
        from: String,
        /// What its spec names.
        wanted: String,
    },
}

/// A confirmed start from the last backups, waiting for a running driver to apply it.
#[derive(Debug, Clone)]
struct Recovery {
    wanted: String,
    hosts: Vec<String>,
    last: Vec<LastBackup>,
}

/// The running migrations of one controller.
pub struct Migrations {
    store: Arc<Store>,
    providers: Providers,
    known_hosts: PathBuf,
    backuper: Backuper,
    metrics: MigrationMetrics,
    running: Mutex<BTreeSet<String>>,
    /// Cancels asked of running drivers: the environment asked, and whether the driver applied it.
    cancels: Mutex<BTreeMap<String, (String, bool)>>,
    /// Starts from the last backups confirmed while a driver ran: applied between two steps.
    recoveries: Mutex<BTreeMap<String, Recovery>>,
}

impl Migrations {
    /// Migrations over `providers`, their records in `store`, the hosts' keys pinned under
    /// `known_hosts`.
    pub fn new(
        store: Arc<Store>,
        providers: Providers,
        known_hosts: PathBuf,
        backuper: Backuper,
        metrics: MigrationMetrics,
    ) -> Self {
        Self {
            store,
            providers,
            known_hosts,
            backuper,
            metrics,
            running: Mutex::default(),
            cancels: Mutex::default(),
            recoveries: Mutex::default(),
        }
    }

    /// `deployment`'s migration record.
    pub fn load(&self, deployment: &str) -> Result<Option<MigrationRecord>, StoreError> {
        record::load(&self.store, deployment)
    }

    /// Persists a new or changed record (a migration that begins, or a rollback asked for); only
    /// when no driver runs for it (see [`Self::cancel`] for a running one).
    pub fn save(&self, r: &MigrationRecord) -> Result<(), StoreError> {
        record::save(&self.store, r)
    }

    /// Whether a driver steps `deployment`'s migration now.
    pub fn is_running(&self, deployment: &str) -> bool {
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(deployment)
    }

    /// Applies `spec.runtimeEnvironment = environment` to `deployment`'s migration: a running driver
    /// takes it between two steps; otherwise the cancelled record is persisted now. Returns false
    /// when the same cancel was already waiting for the driver.
    pub fn cancel(&self, deployment: &str, environment: &str) -> Result<bool, StoreError> {
        let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        if running.contains(deployment) {
            let mut cancels = self.cancels.lock().unwrap_or_else(PoisonError::into_inner);
            if cancels
                .get(deployment)
                .is_some_and(|(asked, _)| asked == environment)
            {
                return Ok(false);
            }
            cancels.insert(deployment.to_owned(), (environment.to_owned(), false));
            return Ok(true);
        }
        self.apply_cancel(deployment, environment)?;
        Ok(true)
    }

    fn apply_cancel(&self, deployment: &str, environment: &str) -> Result<(), StoreError> {
        if let Some(r) = record::load(&self.store, deployment)?
            && let Ok(Some(cancelled)) = phase::desired_environment(&r, environment, now_ms())
        {
            record::save(&self.store, &cancelled)?;
        }
        Ok(())
    }

    /// The cancel a driver has yet to apply (it stays known as applied until the driver stops).
    fn take_cancel(&self, deployment: &str) -> Option<String> {
        let mut cancels = self.cancels.lock().unwrap_or_else(PoisonError::into_inner);
        match cancels.get_mut(deployment) {
            Some((environment, applied)) if !*applied => {
                *applied = true;
                Some(environment.clone())
            }
            _ => None,
        }
    }

    fn forget_cancel(&self, deployment: &str) {
        self.cancels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(deployment);
    }

    /// Starts a driver for `deployment`'s recorded migration unless one runs. `repository` is the
    /// source environment's restic repository. Returns whether a driver was started.
    pub fn ensure_running(
        self: &Arc<Self>,
        inputs: Inputs,
        repository: Repository,
        report: Report,
    ) -> Result<bool, WorldError> {
        let deployment = inputs.deployment.metadata.name.to_string();
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        if running.contains(&deployment) {
            return Ok(false);
        }
        // Nothing to do for a while (a retired source's grace period): a later reconcile starts it.
        let now = now_ms();
        let idle = match record::load(&self.store, &deployment) {
            Ok(Some(r)) => match phase::action(&r, now) {
                Action::Nothing => true,
                Action::WaitUntil(at) => at.saturating_sub(now) > HORIZON.as_millis() as u64,
                _ => false,
            },
            _ => true,
        };
        if idle {
            return Ok(false);
        }
        let world = ProviderWorld::new(
            inputs,
            self.providers.clone(),
            self.store.clone(),
            &self.known_hosts,
            &self.backuper.layout().dir,
        )?;
        running.insert(deployment.clone());
        drop(running);
        let this = self.clone();
        let migrator = Migrator::new(self.backuper.clone(), repository);
        let span = tracing::info_span!("migration", deployment = %deployment);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                this.drive(&migrator, &world, &deployment, &report).await;
                report(None);
            },
            span,
        ));
        Ok(true)
    }

    async fn drive(&self, migrator: &Migrator, world: &ProviderWorld, deployment: &str, report: &Report) {
        loop {
            let recovery = self
                .recoveries
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(deployment);
            if let Some(asked) = recovery
                && let Err(e) = self.apply_recovery(deployment, &asked, true)
            {
                tracing::warn!(error = %e, "the start from the last backups no longer applies");
            }
            if let Some(environment) = self.take_cancel(deployment)
                && let Err(e) = self.apply_cancel(deployment, &environment)
            {
                tracing::warn!(error = %e, "cannot record the cancel; the next reconcile asks again");
            }
            match migrator.step(world, &self.store, deployment).await {
                Ok(Some(step)) => {
                    let now = now_ms();
                    self.metrics.observe(step.before, &step.record, now);
                    tracing::info!(
                        from = step.before.as_str(),
                        to = step.record.phase.as_str(),
                        reason = step.record.reason.as_deref().unwrap_or(""),
                        "migration step"
                    );
                    report(Some(&step));
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "the migration cannot go on; the next reconcile resumes it");
                    self.stop(deployment);
                    return;
                }
            }
            let waiting = match record::load(&self.store, deployment) {
                Ok(Some(r)) => match phase::action(&r, now_ms()) {
                    Action::WaitUntil(at) => Some(at.saturating_sub(now_ms())),
                    _ => None,
                },
                _ => None,
            };
            match waiting {
                Some(ms) if ms <= HORIZON.as_millis() as u64 => {
                    tokio::time::sleep(Duration::from_millis(ms).min(NAP)).await;
                }
                _ => {
                    // Done, or waiting beyond the horizon: stop, unless a cancel came meanwhile.
                    let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
                    let pending = self
                        .cancels
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .get(deployment)
                        .is_some_and(|(_, applied)| !applied)
                        || self
                            .recoveries
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .contains_key(deployment);
                    if !pending {
                        running.remove(deployment);
                        drop(running);
                        self.forget_cancel(deployment);
                        return;
                    }
                }
            }
        }
    }

    /// `fediversity migrate rollback`: moves `deployment` back to the environment its last migration
    /// left, as a new migration (the target's writes since the switch are copied back). Its spec must
    /// name that environment again (`wanted`), or the next reconcile would cancel the way back.
    pub fn rollback(&self, deployment: &str, wanted: &str) -> Result<MigrationRecord, RollbackError> {
        let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        if running.contains(deployment) {
            return Err(RollbackError::Busy(deployment.to_owned()));
        }
        let r = record::load(&self.store, deployment)?
            .ok_or_else(|| super::decide::RecoveryError::NothingToRollBack(deployment.to_owned()))?;
        let (_kept, back) = super::decide::rollback(&r, now_ms())?;
        if wanted != back.to {
            return Err(RollbackError::SpecNotBack {
                deployment: deployment.to_owned(),
                from: back.to,
                wanted: wanted.to_owned(),
            });
        }
        // The way back replaces the finished record: its source (now the way back's target) is
        // never destroyed, and the hosts there are reused.
        record::save(&self.store, &back)?;
        drop(running);
        Ok(back)
    }

    /// `fediversity migrate restore-from-backup`: the migration of `deployment` (whose spec names
    /// `wanted`) cannot reach its source, so its target starts from the source hosts' last good
    /// backups (`last`, from `status.backups`). Without `confirmed` it only states the data-loss
    /// window (as the error). A running driver applies it between two steps (checked again then);
    /// otherwise it is persisted now. Returns the record that replaces the migration.
    pub fn restore_from_backup(
        &self,
        deployment: &str,
        wanted: &str,
        hosts: Vec<String>,
        last: Vec<LastBackup>,
        confirmed: bool,
    ) -> Result<MigrationRecord, RollbackError> {
        let asked = Recovery {
            wanted: wanted.to_owned(),
            hosts,
            last,
        };
        let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        if !running.contains(deployment) || !confirmed {
            return self.apply_recovery(deployment, &asked, confirmed);
        }
        let r = record::load(&self.store, deployment)?;
        let fresh = super::decide::restore_from_backup(
            r.as_ref(),
            deployment,
            wanted,
            &asked.hosts,
            &asked.last,
            true,
            now_ms(),
        )?;
        self.recoveries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(deployment.to_owned(), asked);
        Ok(fresh)
    }

    fn apply_recovery(
        &self,
        deployment: &str,
        asked: &Recovery,
        confirmed: bool,
    ) -> Result<MigrationRecord, RollbackError> {
        let r = record::load(&self.store, deployment)?;
        let fresh = super::decide::restore_from_backup(
            r.as_ref(),
            deployment,
            &asked.wanted,
            &asked.hosts,
            &asked.last,
            confirmed,
            now_ms(),
        )?;
        record::save(&self.store, &fresh)?;
        Ok(fresh)
    }

    fn stop(&self, deployment: &str) {
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(deployment);
        self.forget_cancel(deployment);
        self.recoveries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(deployment);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::phase::{FailedTarget, Phase, RetirePolicy, begin};

    fn migrations(dir: &std::path::Path) -> Migrations {
        let registry = prometheus::Registry::new();
        Migrations::new(
            Arc::new(Store::open(dir).unwrap()),
            Providers {
                hosts: Arc::new(crate::provider::PlanOnly),
                names: Arc::new(crate::provider::PlanOnly),
                http: crate::nixos::HttpTarget::default(),
                vms: None,
            },
            dir.join("known_hosts"),
            Backuper::default(),
            MigrationMetrics::register(&registry).unwrap(),
        )
    }

    #[test]
    fn a_revert_asked_of_a_running_driver_is_announced_once_and_applied_between_two_steps() {
        let dir = tempfile::tempdir().unwrap();
        let m = migrations(dir.path());
        let r = begin(
            "op",
            "old",
            "new",
            RetirePolicy::Retain,
            FailedTarget::Remove,
            now_ms(),
        );
        m.save(&r).unwrap();
        m.running.lock().unwrap().insert("op".into());
        assert!(m.cancel("op", "old").unwrap(), "the first ask is news");
        assert!(!m.cancel("op", "old").unwrap(), "asked again while waiting");
        // Nothing changes under a running step: the driver applies it between two steps.
        assert_eq!(m.load("op").unwrap().unwrap().phase, Phase::Provisioning);
        assert_eq!(m.take_cancel("op").as_deref(), Some("old"));
        assert!(
            !m.cancel("op", "old").unwrap(),
            "taken but not yet saved: still the same cancel"
        );
        assert_eq!(m.take_cancel("op"), None);
        m.apply_cancel("op", "old").unwrap();
        let cancelled = m.load("op").unwrap().unwrap();
        assert_eq!(
            (cancelled.phase, cancelled.rollback_to),
            (Phase::RollingBack, Some(Phase::Cancelled))
        );
        m.stop("op");
        assert!(!m.is_running("op"));
        assert!(m.cancels.lock().unwrap().is_empty());
    }

    #[test]
    fn a_revert_without_a_running_driver_is_persisted_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let m = migrations(dir.path());
        let r = begin(
            "op",
            "old",
            "new",
            RetirePolicy::Retain,
            FailedTarget::Remove,
            now_ms(),
        );
        m.save(&r).unwrap();
        assert!(m.cancel("op", "old").unwrap());
        assert_eq!(m.load("op").unwrap().unwrap().phase, Phase::RollingBack);
    }

    #[test]
    fn a_rollback_needs_a_switched_migration_the_spec_set_back_and_no_running_step() {
        let dir = tempfile::tempdir().unwrap();
        let m = migrations(dir.path());
        let mut r = begin(
            "op",
            "old",
            "new",
            RetirePolicy::Delete { grace_ms: 86_400_000 },
            FailedTarget::Remove,
            now_ms(),
        );
        m.save(&r).unwrap();
        assert!(matches!(m.rollback("op", "old"), Err(RollbackError::Recovery(_))));
        while r.phase != Phase::RetiringSource {
            r = phase::advance(&r, phase::Outcome::ok(), now_ms());
        }
        m.save(&r).unwrap();
        let err = m.rollback("op", "new").unwrap_err();
        assert!(
            err.to_string()
                .contains("set spec.runtimeEnvironment back to old first"),
            "{err}"
        );
        m.running.lock().unwrap().insert("op".into());
        assert!(matches!(m.rollback("op", "old"), Err(RollbackError::Busy(_))));
        m.stop("op");
        let back = m.rollback("op", "old").unwrap();
        assert_eq!(
            (back.from.as_str(), back.to.as_str(), back.phase),
            ("new", "old", Phase::Provisioning)
        );
        assert_eq!(m.load("op").unwrap(), Some(back));
    }
}
