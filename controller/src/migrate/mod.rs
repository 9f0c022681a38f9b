//! Moving a Deployment to another RuntimeEnvironment with its data: a pure phase machine, its record
//! persisted in the store, the runner that copies with restic and verifies, and the metrics.

pub mod decide;
pub mod delta;
pub mod hosts;
pub mod metrics;
pub mod phase;
pub mod record;
pub mod run;
pub mod service;

pub use metrics::MigrationMetrics;
pub use phase::{Action, FailedTarget, MigrationRecord, Outcome, Phase, RetirePolicy, SourceState};
pub use record::MigrationStatus;
pub use run::{AppMove, MigrateError, Migrator, Step, World, WorldError};
