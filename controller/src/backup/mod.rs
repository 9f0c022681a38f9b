//! Backups and restores of hosts' data with restic and `pg_dump`, run on each host over SSH.

pub mod bundle;
pub mod manifest;
pub mod metrics;
pub mod run;
pub mod schedule;
pub mod script;
pub mod service;

pub use run::{
    BackupError, BackupReport, BackupTarget, BackupTimeouts, Backuper, CheckReport, Repository,
    RestoreReport, Shell, Snapshot,
};
