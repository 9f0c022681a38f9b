//! The Deployment reconcile's part in migrations: decide, begin, cancel or refuse, keep a driver
//! stepping the persisted record, and show it as `status.migration` and the `Migrating` condition.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::status::DeploymentFacts;
use super::{Context, Converged};
use crate::api::{
    Application, Condition, DeletionPolicy, Deployment, DeploymentStatus, EventType, Kind, Name, Object,
    ObjectKey, RuntimeEnvironment, reasons,
};
use crate::migrate::decide::{self, Decision};
use crate::migrate::hosts::Inputs;
use crate::migrate::phase::{DEFAULT_GRACE_MS, FailedTarget, MigrationRecord, Phase, RetirePolicy};
use crate::migrate::run::now_ms;
use crate::migrate::service::{Migrations, Report};
use crate::migrate::{AppMove, record};
use crate::provider::PlannedHost;
use crate::runtime::ReconcileError;

/// How often a migrating Deployment's status is refreshed without a step (its downtime grows).
const REFRESH: Duration = Duration::from_secs(15);
/// The annotation that sets, in seconds, how long a moved Deployment's old hosts wait stopped under
/// `deletionPolicy: Delete` before they are destroyed (during which a rollback can bring it back);
/// a day when absent or not a number.
pub const GRACE_ANNOTATION: &str = "fediversity.eu/migration-grace-seconds";

/// What the reconcile does after looking at migrations.
pub(super) enum Next {
    /// Reconcile the hosts as usual, adding these status facts and conditions.
    Stay(Box<DeploymentFacts>, Vec<Condition>),
    /// A migration runs: leave both sides alone and report this.
    Migrating(Box<Converged>),
}

fn store_failed(e: impl std::fmt::Display) -> ReconcileError {
    ReconcileError::Transient {
        reason: "StoreFailed",
        message: format!("cannot read or write the migration record: {e}"),
    }
}

fn environment(ctx: &Context, name: &str) -> Option<RuntimeEnvironment> {
    match ctx
        .desired
        .get(&ObjectKey::new(Kind::RuntimeEnvironment, name))
        .map(|d| d.object().clone())
    {
        Some(Object::RuntimeEnvironment(env)) => Some(env),
        _ => None,
    }
}

/// The retire policy that follows the Deployment's deletion policy (and its grace annotation).
pub fn retire_policy(dep: &Deployment) -> RetirePolicy {
    match dep.spec.deletion_policy {
        DeletionPolicy::Retain => RetirePolicy::Retain,
        DeletionPolicy::Delete => RetirePolicy::Delete {
            grace_ms: dep
                .metadata
                .annotations
                .get(GRACE_ANNOTATION)
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map_or(DEFAULT_GRACE_MS, |s| s.saturating_mul(1000)),
        },
    }
}

/// For a migration that failed in the live pre-copy (the old environment's hosts or repository
/// could not be reached, past the retries): what starting the target from the last backups instead
/// would lose, as [`decide::restore_from_backup`] states it before the operator's confirmation.
fn restore_from_backup_hint(r: &MigrationRecord, hosts: &[String], old: &DeploymentStatus) -> Option<String> {
    if r.phase != Phase::Failed || r.failed_in != Some(Phase::PreCopying) {
        return None;
    }
    let last = decide::LastBackup::from_backups(&old.backups);
    decide::restore_from_backup(Some(r), &r.deployment, &r.to, hosts, &last, false, now_ms())
        .err()
        .map(|e| {
            format!(
                "should {} stay unreachable: {e} (`fediversity migrate restore-from-backup deployment {}`)",
                r.from, r.deployment
            )
        })
}

/// The record as status shows it: `status.migration` and the `Migrating` condition.
fn shown(r: &MigrationRecord, generation: u64) -> (DeploymentFacts, Vec<Condition>) {
    let now = now_ms();
    let facts = DeploymentFacts {
        migration: Some(record::status(r, now)),
        ..DeploymentFacts::default()
    };
    (facts, vec![record::condition(r, now, generation)])
}

/// Decides about `dep`'s environment; begins, cancels or refuses, and keeps a driver stepping a
/// running migration.
#[allow(clippy::too_many_arguments)] // reason: the reconcile's resolved pieces, passed as they are
pub(super) fn reconcile(
    ctx: &Context,
    migrations: &Arc<Migrations>,
    key: &ObjectKey,
    generation: u64,
    dep: &Deployment,
    hosts: &[PlannedHost],
    applications: &BTreeMap<Name, Application>,
    old: &DeploymentStatus,
) -> Result<Next, ReconcileError> {
    let name = dep.metadata.name.as_str();
    let wanted = dep.spec.runtime_environment.as_str();
    let record = migrations.load(name).map_err(store_failed)?;
    let seen = old.runtime_environment.as_deref();
    let policy = (retire_policy(dep), FailedTarget::Remove);
    let now = now_ms();
    let mut begun = false;
    match decide::decide(name, wanted, seen, record.as_ref(), policy, now) {
        Decision::Stay => {
            let (facts, conditions) = record.as_ref().map(|r| shown(r, generation)).unwrap_or_default();
            return Ok(Next::Stay(Box::new(facts), conditions));
        }
        Decision::Begin(r) => {
            let last_generation = old.migration_generation;
            if let Some(prev) = &record
                && prev.phase == Phase::Failed
                && prev.to == r.to
                && last_generation == Some(generation)
            {
                // Not tried again on its own: the same spec would fail the same way.
                let mut message = format!(
                    "the migration from {} to {} failed in {}: {}; the Deployment still runs in {}; \
                     edit the Deployment (or set spec.runtimeEnvironment back) to try again",
                    prev.from,
                    prev.to,
                    prev.failed_in.map_or("?", Phase::as_str),
                    prev.reason.as_deref().unwrap_or("no reason recorded"),
                    prev.from
                );
                if let Some(hint) = restore_from_backup_hint(
                    prev,
                    &hosts.iter().map(|h| h.name.clone()).collect::<Vec<_>>(),
                    old,
                ) {
                    message.push_str("; ");
                    message.push_str(&hint);
                }
                return Err(ReconcileError::Terminal {
                    reason: "MigrationFailed",
                    message,
                });
            }
            let from = environment(ctx, &r.from).ok_or_else(|| ReconcileError::Waiting {
                reason: reasons::DEPENDENCY_NOT_READY,
                message: format!(
                    "waiting for RuntimeEnvironment {} (where the hosts run now) to exist, to move them to {}",
                    r.from, r.to
                ),
                retry_after: super::deployment::DEPENDENCY_RETRY,
            })?;
            if from.spec.backup.is_none() {
                return Err(ReconcileError::Terminal {
                    reason: "MigrationRefused",
                    message: format!(
                        "cannot move to {}: RuntimeEnvironment {} has no spec.backup, and a migration copies \
                         the data through its restic repository; add spec.backup to {} or set \
                         spec.runtimeEnvironment back to {}",
                        r.to, r.from, r.from, r.from
                    ),
                });
            }
            migrations.save(&r).map_err(store_failed)?;
            begun = true;
            ctx.book.record(
                key,
                EventType::Normal,
                "MigrationStarted",
                format!("moving from {} to {} with the data", r.from, r.to),
            );
        }
        Decision::Continue => {}
        Decision::Cancel(r) => {
            if migrations.cancel(name, wanted).map_err(store_failed)? {
                ctx.book.record(
                    key,
                    EventType::Normal,
                    "MigrationCancelling",
                    r.reason.clone().unwrap_or_default(),
                );
            }
        }
        Decision::Refuse(e) => {
            let message = e.to_string();
            let said = old.migration.as_ref().and_then(|m| m.refused.as_deref());
            if said != Some(message.as_str()) {
                ctx.book
                    .record(key, EventType::Warning, "MigrationRefused", message);
            }
        }
    }
    let r = migrations
        .load(name)
        .map_err(store_failed)?
        .ok_or_else(|| store_failed("the record vanished"))?;
    let (mut facts, conditions) = shown(&r, generation);
    if let Some(m) = facts.migration.as_mut()
        && let Err(e) = crate::migrate::phase::desired_environment(&r, wanted, now)
    {
        m.refused = Some(e.to_string());
    }
    if begun {
        facts.migration_generation = Some(generation);
    }
    if !r.phase.is_terminal() {
        start_driver(ctx, migrations, key, dep, hosts, applications, &r)?;
    }
    if r.phase == Phase::RetiringSource && wanted == r.to {
        // The target serves under the names: its hosts are reconciled as usual while the source
        // waits for its grace period.
        return Ok(Next::Stay(Box::new(facts), conditions));
    }
    Ok(Next::Migrating(Box::new(Converged {
        action: crate::runtime::Action::Requeue(REFRESH),
        reason: reasons::PROGRESSING,
        message: format!("migrating from {} to {}: {}", r.from, r.to, r.phase),
        environment: None,
        deployment: facts,
        conditions: Vec::new(),
        extra_conditions: conditions,
        failure: None,
    })))
}

fn start_driver(
    ctx: &Context,
    migrations: &Arc<Migrations>,
    key: &ObjectKey,
    dep: &Deployment,
    hosts: &[PlannedHost],
    applications: &BTreeMap<Name, Application>,
    r: &MigrationRecord,
) -> Result<(), ReconcileError> {
    if migrations.is_running(&r.deployment) {
        return Ok(());
    }
    let missing = |env: &str| ReconcileError::Waiting {
        reason: reasons::DEPENDENCY_NOT_READY,
        message: format!(
            "the migration from {} to {} needs RuntimeEnvironment {env}, which does not exist",
            r.from, r.to
        ),
        retry_after: super::deployment::DEPENDENCY_RETRY,
    };
    let from = environment(ctx, &r.from).ok_or_else(|| missing(&r.from))?;
    let to = environment(ctx, &r.to).ok_or_else(|| missing(&r.to))?;
    let refused = |message: String| ReconcileError::Transient {
        reason: "MigrationBlocked",
        message,
    };
    let spec = from.spec.backup.as_ref().ok_or_else(|| {
        refused(format!(
            "RuntimeEnvironment {} lost its spec.backup, through whose repository the migration copies",
            r.from
        ))
    })?;
    let repository = crate::backup::Repository::from_spec(spec).map_err(|e| refused(e.to_string()))?;
    let mut apps = Vec::new();
    let mut health = BTreeMap::new();
    for host in hosts {
        let Some(app) = applications.get(&host.application) else {
            continue;
        };
        if let Some(h) = &app.spec.health_check {
            health.insert(host.application.to_string(), h.clone());
        }
        if let Some(data) = &app.spec.data
            && !(data.paths.is_empty() && data.databases.is_empty())
        {
            apps.push(AppMove {
                application: host.application.to_string(),
                host: host.name.clone(),
                data: data.clone(),
            });
        }
    }
    let inputs = Inputs {
        deployment: dep.clone(),
        from,
        to,
        hosts: hosts.to_vec(),
        apps,
        health,
    };
    let (book, trigger, key) = (ctx.book.clone(), ctx.trigger.clone(), key.clone());
    let report: Report = Arc::new(move |step| {
        if let Some(step) = step
            && let Some((type_, reason, message)) = decide::event(step)
        {
            book.record(&key, type_, &reason, message);
        }
        trigger(&key);
    });
    migrations
        .ensure_running(inputs, repository, report)
        .map_err(|e| refused(e.reason))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(policy: &str, annotations: &str) -> Deployment {
        let text = format!(
            "apiVersion: fediversity.eu/v1alpha1\nkind: Deployment\nmetadata:\n  name: demo\n  annotations: {{ {annotations} }}\n\
spec:\n  domain: lab.example\n  runtimeEnvironment: a\n  deletionPolicy: {policy}\n  applications: {{ alpha: {{}} }}\n"
        );
        let docs = crate::yaml::parse_documents(&text, &crate::yaml::Limits::default()).unwrap();
        match crate::api::parse_object(&docs[0].1).unwrap() {
            Object::Deployment(d) => d,
            other => panic!("not a Deployment: {other:?}"),
        }
    }

    #[test]
    fn a_migration_that_failed_in_the_pre_copy_states_what_a_restore_from_the_last_backup_would_lose() {
        let mut r =
            crate::migrate::phase::begin("demo", "a", "b", RetirePolicy::Retain, FailedTarget::Remove, 0);
        r.phase = Phase::Failed;
        r.failed_in = Some(Phase::PreCopying);
        let hosts = vec!["demo-alpha".to_owned(), "demo-beta".to_owned()];
        let status: DeploymentStatus = serde_json::from_value(serde_json::json!({ "backups": [
            { "host": "demo-beta", "result": "Succeeded", "snapshot": "b2b2b2b2", "time": "2026-12-03T06:00:00Z" },
            { "host": "demo-alpha", "result": "Failed", "snapshot": "a1a1a1a1", "time": "2026-12-02T23:00:00Z" }
        ]}))
        .unwrap();
        let hint = restore_from_backup_hint(&r, &hosts, &status).expect("a hint");
        assert!(hint.starts_with("should a stay unreachable: "), "{hint}");
        assert!(
            hint.contains("demo-alpha: a1a1a1a1, demo-beta: b2b2b2b2")
                && hint.contains("every write made since 2026-12-02T23:00:00Z"),
            "the oldest good backup starts the data-loss window: {hint}"
        );
        assert!(
            hint.contains("`fediversity migrate restore-from-backup deployment demo`"),
            "{hint}"
        );
        let never: DeploymentStatus = serde_json::from_value(
            serde_json::json!({ "backups": [{ "host": "demo-beta", "result": "Failed", "failures": 3 }] }),
        )
        .unwrap();
        assert!(
            restore_from_backup_hint(&r, &hosts, &never).is_some_and(|h| h.contains("no successful backup")),
            "a host never backed up: nothing to restore"
        );
        r.failed_in = Some(Phase::StartingTarget);
        assert_eq!(
            restore_from_backup_hint(&r, &hosts, &status),
            None,
            "the source was reached"
        );
    }

    #[test]
    fn the_grace_period_before_old_hosts_are_destroyed_is_a_day_unless_the_annotation_says_otherwise() {
        assert_eq!(
            retire_policy(&deployment("Delete", "")),
            RetirePolicy::Delete {
                grace_ms: DEFAULT_GRACE_MS
            }
        );
        assert_eq!(
            retire_policy(&deployment(
                "Delete",
                "fediversity.eu/migration-grace-seconds: \"12\""
            )),
            RetirePolicy::Delete { grace_ms: 12_000 }
        );
        assert_eq!(
            retire_policy(&deployment(
                "Delete",
                "fediversity.eu/migration-grace-seconds: soon"
            )),
            RetirePolicy::Delete {
                grace_ms: DEFAULT_GRACE_MS
            },
            "not a number: the default"
        );
        assert_eq!(
            retire_policy(&deployment(
                "Retain",
                "fediversity.eu/migration-grace-seconds: \"12\""
            )),
            RetirePolicy::Retain
        );
    }
}
