//! Performs the phase machine's actions: copies with restic between the hosts, verifies, and persists
//! the record after every step.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::phase::{self, Action, MigrationRecord, Outcome, Phase};
use super::record;
use crate::api::DataSpec;
use crate::backup::manifest;
use crate::backup::{BackupError, BackupTarget, Backuper, Repository, Shell};
use crate::store::{Store, StoreError};

/// One application's host on both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppMove {
    /// The Application.
    pub application: String,
    /// The host's name (`<deployment>-<application>`, the same on both sides).
    pub host: String,
    /// What is carried.
    pub data: DataSpec,
}

/// A step's result that failed: why, and whether retrying may help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorldError {
    /// For a person (never a secret).
    pub reason: String,
    /// Whether a retry may help.
    pub transient: bool,
}

impl WorldError {
    /// A failure a retry will not mend.
    pub fn fatal(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            transient: false,
        }
    }

    /// A failure a retry may mend.
    pub fn transient(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            transient: true,
        }
    }
}

impl From<BackupError> for WorldError {
    fn from(e: BackupError) -> Self {
        Self {
            transient: e.is_transient(),
            reason: e.to_string(),
        }
    }
}

/// The two environments as the runner sees them: hosts reached through shells, and the provider's
/// operations (create, start, stop, destroy, names). Every operation must be idempotent.
pub trait World: Send + Sync {
    /// A shell on a host.
    type Shell: Shell;
    /// The applications that move.
    fn applications(&self) -> Vec<AppMove>;
    /// The source host of `app`.
    fn source(&self, app: &AppMove) -> Result<&Self::Shell, WorldError>;
    /// The target host of `app` (once provisioned).
    fn target(&self, app: &AppMove) -> Result<&Self::Shell, WorldError>;
    /// Creates the target host, its services held stopped (an existing one is kept).
    fn provision(&self, app: &AppMove) -> impl Future<Output = Result<(), WorldError>> + Send;
    /// Starts (`true`) or stops (`false`) the source's services; its data is never touched.
    fn source_services(
        &self,
        app: &AppMove,
        run: bool,
    ) -> impl Future<Output = Result<(), WorldError>> + Send;
    /// Starts the target's services and checks their health.
    fn start_target(&self, app: &AppMove) -> impl Future<Output = Result<(), WorldError>> + Send;
    /// Points the provider-zone names of `app` at the target.
    fn switch_names(&self, app: &AppMove) -> impl Future<Output = Result<(), WorldError>> + Send;
    /// Stops the source for good and keeps it (under `Retain`, or until the grace period ends); by
    /// default its services are stopped.
    fn retain_source(&self, app: &AppMove) -> impl Future<Output = Result<(), WorldError>> + Send {
        self.source_services(app, false)
    }
    /// Destroys the source host.
    fn destroy_source(&self, app: &AppMove) -> impl Future<Output = Result<(), WorldError>> + Send;
    /// Removes the target host (after a failure or a cancel).
    fn remove_target(&self, app: &AppMove) -> impl Future<Output = Result<(), WorldError>> + Send;
}

/// Why the runner could not step.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No migration is recorded for the Deployment.
    #[error("Deployment {0} has no migration recorded")]
    NoMigration(String),
}

/// What one step did.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The phase before.
    pub before: Phase,
    /// The action performed.
    pub action: Action,
    /// The record after (persisted).
    pub record: MigrationRecord,
}

/// The lineage of the quick manifests of one migration's host: files hashed on a host during this
/// migration (its pre-copy, final copy, verification) are not hashed again while their stat data stays.
fn lineage(r: &MigrationRecord, app: &AppMove) -> String {
    manifest::lineage_word(
        &format!("migration {} {} {}", r.deployment, r.started_ms, app.host),
        &app.data.paths,
    )
}

/// The current time in Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs migrations: performs the recorded phase's action and persists the outcome.
#[derive(Clone)]
pub struct Migrator {
    backuper: Backuper,
    repository: Repository,
    clock: Arc<dyn Fn() -> u64 + Send + Sync>,
}

impl Migrator {
    /// Copies through `repository` (the source environment's restic repository, reached from both
    /// sides), with the wall clock.
    pub fn new(backuper: Backuper, repository: Repository) -> Self {
        Self {
            backuper,
            repository,
            clock: Arc::new(now_ms),
        }
    }

    /// The same runner with another clock (Unix ms).
    pub fn with_clock(mut self, clock: Arc<dyn Fn() -> u64 + Send + Sync>) -> Self {
        self.clock = clock;
        self
    }

    fn now(&self) -> u64 {
        (self.clock)()
    }

    /// Performs one step of `deployment`'s migration; `None` when there is nothing to do now (done,
    /// or waiting until the returned record's retry or retire time).
    pub async fn step<W: World>(
        &self,
        world: &W,
        store: &Store,
        deployment: &str,
    ) -> Result<Option<Step>, MigrateError> {
        let r =
            record::load(store, deployment)?.ok_or_else(|| MigrateError::NoMigration(deployment.into()))?;
        let action = phase::action(&r, self.now());
        if matches!(action, Action::Nothing | Action::WaitUntil(_)) {
            return Ok(None);
        }
        let outcome = self.perform(world, &r, &action).await;
        let after = phase::advance(&r, outcome, self.now());
        record::save(store, &after)?;
        Ok(Some(Step {
            before: r.phase,
            action,
            record: after,
        }))
    }

    /// Steps until the migration is done or waits beyond `horizon`; calls `each` after every step.
    pub async fn drive<W: World>(
        &self,
        world: &W,
        store: &Store,
        deployment: &str,
        horizon: Duration,
        mut each: impl FnMut(&Step),
    ) -> Result<MigrationRecord, MigrateError> {
        loop {
            match self.step(world, store, deployment).await? {
                Some(step) => each(&step),
                None => {
                    let r = record::load(store, deployment)?
                        .ok_or_else(|| MigrateError::NoMigration(deployment.into()))?;
                    match phase::action(&r, self.now()) {
                        Action::WaitUntil(at)
                            if at.saturating_sub(self.now()) <= horizon.as_millis() as u64 =>
                        {
                            tokio::time::sleep(Duration::from_millis(at.saturating_sub(self.now()))).await;
                        }
                        _ => return Ok(r),
                    }
                }
            }
        }
    }

    async fn perform<W: World>(&self, world: &W, r: &MigrationRecord, action: &Action) -> Outcome {
        match self.try_perform(world, r, action).await {
            Ok(Ok(bytes)) => Outcome::Done { bytes },
            Ok(Err(differences)) => Outcome::Differences(differences),
            Err(e) => Outcome::Failed {
                reason: e.reason,
                transient: e.transient,
            },
        }
    }

    /// Bytes copied, or the differences found.
    async fn try_perform<W: World>(
        &self,
        world: &W,
        r: &MigrationRecord,
        action: &Action,
    ) -> Result<Result<u64, Vec<String>>, WorldError> {
        let apps = world.applications();
        // The pre-copy goes host after host: the first backup may create the repository, which two
        // at once would race for. Everything during the downtime runs on all hosts at once.
        let results = if *action == Action::PreCopy {
            let mut results = Vec::new();
            for app in &apps {
                results.push(self.perform_one(world, r, app, action).await);
            }
            results
        } else {
            futures_util::future::join_all(apps.iter().map(|app| self.perform_one(world, r, app, action)))
                .await
        };
        let mut bytes = 0;
        let mut differences = Vec::new();
        for result in results {
            let (b, d) = result?;
            bytes += b;
            differences.extend(d);
        }
        Ok(if differences.is_empty() {
            Ok(bytes)
        } else {
            Err(differences)
        })
    }

    async fn perform_one<W: World>(
        &self,
        world: &W,
        r: &MigrationRecord,
        app: &AppMove,
        action: &Action,
    ) -> Result<(u64, Vec<String>), WorldError> {
        match action {
            Action::Provision => world.provision(app).await?,
            Action::PreCopy => return Ok((self.copy(world, r, app, false).await?.0, Vec::new())),
            Action::RestoreBackup => return Ok((0, self.restore_backup(world, r, app).await?)),
            Action::StopSource => world.source_services(app, false).await?,
            Action::FinalCopy => return self.copy(world, r, app, true).await,
            Action::Verify => return Ok((0, self.verify(world, r, app).await?)),
            Action::StartTarget => world.start_target(app).await?,
            Action::SwitchNames => world.switch_names(app).await?,
            Action::RetireSource { destroy: true } => world.destroy_source(app).await?,
            Action::RetireSource { destroy: false } => world.retain_source(app).await?,
            Action::RestoreSource {
                start_source,
                remove_target,
            } => {
                if *start_source {
                    world.source_services(app, true).await?;
                }
                if *remove_target {
                    world.remove_target(app).await?;
                }
            }
            Action::WaitUntil(_) | Action::Nothing => {}
        }
        Ok((0, Vec::new()))
    }

    /// Backs the source up and restores the snapshot onto the target (services held stopped there).
    /// Returns the bytes carried (all of them for the pre-copy, those added for the final copy) and,
    /// for the final copy, the differences between the restored data and the snapshot's manifest.
    async fn copy<W: World>(
        &self,
        world: &W,
        r: &MigrationRecord,
        app: &AppMove,
        last: bool,
    ) -> Result<(u64, Vec<String>), WorldError> {
        let source = world.source(app)?;
        let target = world.target(app)?;
        let revision = if last {
            "migration-final"
        } else {
            "migration-pre-copy"
        };
        // The target's services stay stopped: the restore starts none.
        let held = DataSpec {
            services: Vec::new(),
            ..app.data.clone()
        };
        let what = BackupTarget {
            host: &app.host,
            deployment: &r.deployment,
            application: &app.application,
            revision,
            data: &app.data,
        };
        let lineage = lineage(r, app);
        if !last {
            let report = self
                .backuper
                .backup_in(source, &self.repository, &what, Some(&lineage))
                .await?;
            self.backuper
                .restore_in(
                    target,
                    &self.repository,
                    &app.host,
                    &report.snapshot,
                    &held,
                    Some(&lineage),
                )
                .await?;
            return Ok((report.total_bytes, Vec::new()));
        }
        // The final copy takes only what changed since the pre-copy (what the target holds is read
        // while the source is backed up); should that not verify, the whole snapshot is restored.
        let backup = self
            .backuper
            .backup_recorded(source, &self.repository, &what, &lineage);
        let have = super::delta::target_manifest(target, &self.backuper, &held, &lineage);
        let (backup, have) = tokio::join!(backup, have);
        let ((report, want, recorded), have) = (backup?, have?);
        let delta = super::delta::restore_changes(
            target,
            &self.backuper,
            &self.repository,
            &report.snapshot,
            &held,
            &want,
            &recorded,
            &have,
            &lineage,
        )
        .await;
        let delta = match delta {
            Ok(d) => d,
            Err(e) => {
                // The last connection removes the work folders itself; an earlier failure leaves them.
                let _ = self.backuper.clean_up(target).await;
                return Err(e.into());
            }
        };
        if delta.differences.is_empty() {
            return Ok((report.bytes_added, Vec::new()));
        }
        tracing::warn!(
            host = %app.host,
            differences = delta.differences.len(),
            "the changes alone did not verify; restoring the whole snapshot"
        );
        let restored = self
            .backuper
            .restore_in(
                target,
                &self.repository,
                &app.host,
                &report.snapshot,
                &held,
                Some(&lineage),
            )
            .await?;
        Ok((report.bytes_added, restored.differences))
    }

    /// Restores the source host's last snapshot onto the target (services held stopped) and returns
    /// the differences to the snapshot's manifest: the source itself cannot be reached.
    async fn restore_backup<W: World>(
        &self,
        world: &W,
        r: &MigrationRecord,
        app: &AppMove,
    ) -> Result<Vec<String>, WorldError> {
        let snapshot = r
            .from_backup
            .as_ref()
            .and_then(|b| b.snapshots.get(&app.host))
            .ok_or_else(|| WorldError::fatal(format!("no snapshot was chosen for host {}", app.host)))?;
        let held = DataSpec {
            services: Vec::new(),
            ..app.data.clone()
        };
        let restored = self
            .backuper
            .restore(world.target(app)?, &self.repository, &app.host, snapshot, &held)
            .await?;
        Ok(restored
            .differences
            .into_iter()
            .map(|d| format!("{}: {d}", app.host))
            .collect())
    }

    /// Compares the live data of both sides: every file (size, SHA-256, mode, owner) and every
    /// database (row counts and checksums per table).
    async fn verify<W: World>(
        &self,
        world: &W,
        r: &MigrationRecord,
        app: &AppMove,
    ) -> Result<Vec<String>, WorldError> {
        let (source, target) = (world.source(app)?, world.target(app)?);
        let lineage = lineage(r, app);
        let (src, dst) = tokio::join!(
            self.backuper.live_state_in(source, &app.data, Some(&lineage)),
            self.backuper.live_state_in(target, &app.data, Some(&lineage))
        );
        let ((src_files, _, src_dbs), (dst_files, _, dst_dbs)) = (src?, dst?);
        let mut out: Vec<String> = manifest::compare_files(&src_files, &dst_files)
            .into_iter()
            .map(|d| format!("{}: {d}", app.host))
            .collect();
        for (db, (a, b)) in app.data.databases.iter().zip(src_dbs.iter().zip(dst_dbs.iter())) {
            out.extend(
                manifest::compare_database(db, a, b)
                    .into_iter()
                    .map(|d| format!("{}: {d}", app.host)),
            );
        }
        Ok(out)
    }
}
