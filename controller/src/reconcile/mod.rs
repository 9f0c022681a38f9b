//! Reconcilers, one per kind, behind the dispatcher the runtime calls; status, events and metrics.

pub mod deployment;
pub mod metrics;
pub mod migration;
pub mod status;
pub mod waiters;

use std::sync::Arc;
use std::time::Duration;

use crate::api::{
    Condition, ConditionStatus, EventType, Kind, Object, ObjectKey, Timestamp, condition_types, reasons,
    set_condition,
};
use crate::runtime::{Action, BoxFuture, ReconcileError, Reconciler};
use crate::state::{Desired, DesiredState, StatusBook};

use status::{AnyStatus, DeploymentFacts};

pub use crate::provider::{
    EnvironmentFacts, EnvironmentReport, PlanOnly, Provider, ProviderCondition, ProviderReport, progress,
    settings,
};
pub use metrics::{ObjectFacts, ObjectMetrics};

/// How often a converged object is looked at again without any trigger: the periodic guard against
/// missed changes that kube-runtime's docs recommend.
pub const RESYNC: Duration = Duration::from_secs(600);

pub use crate::runtime::Trigger;

/// What every reconciler shares.
pub struct Context {
    /// The desired objects.
    pub desired: Arc<DesiredState>,
    /// Status and events.
    pub book: Arc<StatusBook>,
    /// Per-object metrics.
    pub metrics: Arc<ObjectMetrics>,
    /// The infrastructure backend.
    pub provider: Arc<dyn Provider>,
    /// Wakes an object now.
    pub trigger: Trigger,
    /// Deployments waiting on a RuntimeEnvironment or Application, woken when it turns Ready.
    pub waiters: waiters::Waiters,
    /// Moves Deployments whose `spec.runtimeEnvironment` changed (none: a change is applied in place).
    pub migrations: Option<Arc<crate::migrate::service::Migrations>>,
}

/// The successful outcome of one kind's reconcile.
struct Converged {
    action: Action,
    reason: &'static str,
    message: String,
    /// What was observed of an environment (none: keep what status says).
    environment: Option<EnvironmentFacts>,
    /// What was found of a Deployment's hosts, names and migration.
    deployment: DeploymentFacts,
    /// Domain conditions to set (e.g. `Provisioned`).
    conditions: Vec<ProviderCondition>,
    /// Further conditions, complete (e.g. `Migrating`).
    extra_conditions: Vec<Condition>,
    /// The attempt failed after all: the fields and conditions are recorded, then this error is
    /// returned (retried with backoff).
    failure: Option<ReconcileError>,
}

/// Dispatches each key to its kind's reconciler, or to cleanup when the object was removed.
pub struct Dispatcher {
    ctx: Arc<Context>,
}

impl Dispatcher {
    /// A dispatcher over `ctx`.
    pub fn new(ctx: Arc<Context>) -> Self {
        Self { ctx }
    }
}

impl Reconciler for Dispatcher {
    fn reconcile(&self, key: ObjectKey) -> BoxFuture<Result<Action, ReconcileError>> {
        let ctx = self.ctx.clone();
        Box::pin(async move {
            if let Some(desired) = ctx.desired.get(&key) {
                reconcile_present(&ctx, &key, &desired).await
            } else if ctx.desired.removing(&key).is_some() || ctx.book.status(&key).is_some() {
                // Removed from its source, or removed while the controller was down (only its stored
                // status remains): clean up.
                cleanup(&ctx, &key).await
            } else {
                Ok(Action::AwaitChange)
            }
        })
    }
}

/// Whether an object's stored status says Ready=True.
pub fn is_ready(book: &StatusBook, key: &ObjectKey) -> bool {
    book.with_status(key, |status| {
        let conditions = status
            .and_then(|s| s.get("conditions"))
            .and_then(serde_json::Value::as_array);
        conditions
            .into_iter()
            .flatten()
            .any(|c| c["type"] == condition_types::READY && c["status"] == "True")
    })
}

fn conditions_of(status: Option<&AnyStatus>) -> Vec<Condition> {
    status.map(|s| s.conditions().clone()).unwrap_or_default()
}

fn ready_status(status: Option<&AnyStatus>) -> ConditionStatus {
    status
        .and_then(|s| s.conditions().iter().find(|c| c.type_ == condition_types::READY))
        .map_or(ConditionStatus::Unknown, |c| c.status)
}

fn condition(
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: &str,
    generation: u64,
) -> Condition {
    Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message: message.into(),
        last_transition_time: Timestamp::now(),
        observed_generation: generation,
    }
}

async fn reconcile_present(
    ctx: &Context,
    key: &ObjectKey,
    desired: &Desired,
) -> Result<Action, ReconcileError> {
    let request = ctx.book.pending_request(key);
    let old = AnyStatus::load(&ctx.book, key);
    if let Object::Deployment(dep) = desired.object()
        && dep.spec.suspend
    {
        // Suspended: nothing changes, status included, until spec.suspend is false again.
        let conditions = conditions_of(old.as_ref());
        let facts = ObjectFacts {
            ready: ready_status(old.as_ref()),
            suspended: true,
            revision: &desired.revision,
            conditions: &conditions,
        };
        ctx.metrics.observe(key, &facts);
        return Ok(Action::AwaitChange);
    }
    let mut result = match desired.object() {
        Object::RuntimeEnvironment(env) => {
            ctx.provider.check_environment(env).await.map(|report| Converged {
                action: Action::Requeue(RESYNC),
                reason: reasons::SUCCEEDED,
                message: report.message,
                environment: report.facts,
                deployment: DeploymentFacts::default(),
                conditions: Vec::new(),
                extra_conditions: Vec::new(),
                failure: None,
            })
        }
        Object::Application(app) => Ok(Converged {
            action: Action::Requeue(RESYNC),
            reason: reasons::SUCCEEDED,
            message: format!("valid: {} size(s) offered", app.spec.sizes.len()),
            environment: None,
            deployment: DeploymentFacts::default(),
            conditions: Vec::new(),
            extra_conditions: Vec::new(),
            failure: None,
        }),
        Object::Deployment(dep) => {
            progress_sink(ctx, key, desired.generation)
                .scope(reconcile_deployment(
                    ctx,
                    key,
                    desired,
                    dep,
                    deployment_status(old.as_ref()),
                ))
                .await
        }
    };
    let suspended = matches!(desired.object(), Object::Deployment(d) if d.spec.suspend);
    let mut status = old.clone().unwrap_or_else(|| AnyStatus::empty(key.kind));
    let mut conditions = conditions_of(old.as_ref());
    let generation = desired.generation;
    if let Ok(done) = &mut result {
        match &mut status {
            AnyStatus::RuntimeEnvironment(s) => {
                if let Some(facts) = done.environment.take() {
                    status::apply_environment_facts(s, facts);
                }
            }
            AnyStatus::Deployment(s) => std::mem::take(&mut done.deployment).apply(s),
            AnyStatus::Application(_) => {}
        }
        for c in &done.conditions {
            // Drift found (or found anew) is an event an operator should see.
            if c.type_ == condition_types::DRIFTED && c.status == ConditionStatus::True {
                let before = conditions.iter().find(|o| o.type_ == condition_types::DRIFTED);
                if before.is_none_or(|o| o.status != ConditionStatus::True || o.message != c.message) {
                    ctx.book.record(key, EventType::Warning, c.reason, &c.message);
                }
            }
            set_condition(
                &mut conditions,
                condition(c.type_, c.status, c.reason, &c.message, generation),
            );
        }
        for c in &done.extra_conditions {
            set_condition(&mut conditions, c.clone());
        }
    }
    let outcome = match &result {
        Ok(Converged { failure: Some(e), .. }) | Err(e) => Outcome::Failed(e),
        Ok(done) if done.reason == reasons::PROGRESSING => Outcome::Progressing(&done.message),
        Ok(done) => Outcome::Converged(done.reason, &done.message),
    };
    let [ready, stalled, reconciling] = summary_conditions(&outcome);
    let ready_now = ready.0;
    for (type_, (status, reason, message)) in [
        (condition_types::READY, ready),
        (condition_types::STALLED, stalled),
        (condition_types::RECONCILING, reconciling),
    ] {
        set_condition(
            &mut conditions,
            condition(type_, status, reason, &message, generation),
        );
    }
    status.observed(generation, request);
    if let AnyStatus::Deployment(s) = &mut status {
        status::record_revision(s, &desired.revision, ready_now == ConditionStatus::True);
    }
    *status.conditions_mut() = conditions;
    let before = ready_status(old.as_ref());
    status.save(&ctx.book, key);
    let conditions = status.conditions();
    if before != ready_now {
        let ready_condition = conditions.iter().find(|c| c.type_ == condition_types::READY);
        let (reason, message) = ready_condition.map_or(("", ""), |c| (c.reason.as_str(), c.message.as_str()));
        let type_ = if ready_now == ConditionStatus::True {
            EventType::Normal
        } else {
            EventType::Warning
        };
        ctx.book.record(key, type_, reason, message);
        // Only objects that found this one missing or not Ready are woken: one already past it has
        // nothing to do, and waking it would reconcile every Deployment twice on a cold start.
        if ready_now == ConditionStatus::True && key.kind != Kind::Deployment {
            for waiter in ctx.waiters.take(key) {
                (ctx.trigger)(&waiter);
            }
        }
    }
    ctx.metrics.observe(
        key,
        &ObjectFacts {
            ready: ready_now,
            suspended,
            revision: &desired.revision,
            conditions,
        },
    );
    match result {
        Ok(Converged { failure: Some(e), .. }) => Err(e),
        other => other.map(|done| done.action),
    }
}

/// How one reconcile ended, as the summary conditions see it.
#[derive(Debug, Clone, Copy)]
enum Outcome<'a> {
    /// Converged, with its reason and message.
    Converged(&'static str, &'a str),
    /// Hosts still converging: not Ready yet, but no error either.
    Progressing(&'a str),
    /// Failed (or its provider reported a failed attempt).
    Failed(&'a ReconcileError),
}

/// Ready, Stalled and Reconciling after a reconcile: (status, reason, message) each. All three are
/// always present, so that dashboards and alerts find a series for each.
fn summary_conditions(outcome: &Outcome<'_>) -> [(ConditionStatus, &'static str, String); 3] {
    use ConditionStatus::{False, True};
    match *outcome {
        Outcome::Progressing(message) => [
            (False, reasons::PROGRESSING, message.to_owned()),
            (False, reasons::PROGRESSING, String::new()),
            (True, reasons::PROGRESSING, message.to_owned()),
        ],
        Outcome::Converged(reason, message) => [
            (True, reason, message.to_owned()),
            (False, reason, String::new()),
            (False, reason, String::new()),
        ],
        Outcome::Failed(e @ ReconcileError::Terminal { .. }) => [
            (False, e.reason(), e.to_string()),
            (True, e.reason(), e.to_string()),
            (False, e.reason(), String::new()),
        ],
        Outcome::Failed(e) => [
            (False, e.reason(), e.to_string()),
            (False, e.reason(), String::new()),
            (True, e.reason(), e.to_string()),
        ],
    }
}

/// Shows the steps of a running reconcile: `Reconciling` is True with the step as its message, and an
/// object that is not Ready says why it is not yet (rather than a stale reason). Each step is an event.
fn progress_sink(ctx: &Context, key: &ObjectKey, generation: u64) -> progress::Sink {
    let (book, key) = (ctx.book.clone(), key.clone());
    progress::Sink::new(move |message| {
        use ConditionStatus::{False, True};
        let old = AnyStatus::load(&book, &key);
        let mut conditions = conditions_of(old.as_ref());
        let mut status = old.clone().unwrap_or_else(|| AnyStatus::empty(key.kind));
        let progressing = reasons::PROGRESSING;
        set_condition(
            &mut conditions,
            condition(
                condition_types::RECONCILING,
                True,
                progressing,
                message,
                generation,
            ),
        );
        if ready_status(old.as_ref()) != True {
            set_condition(
                &mut conditions,
                condition(condition_types::READY, False, progressing, message, generation),
            );
            set_condition(
                &mut conditions,
                condition(condition_types::STALLED, False, progressing, "", generation),
            );
        }
        *status.conditions_mut() = conditions;
        status.save(&book, &key);
        book.record(&key, EventType::Normal, progressing, message);
    })
}

async fn reconcile_deployment(
    ctx: &Context,
    key: &ObjectKey,
    desired: &Desired,
    dep: &crate::api::Deployment,
    old: &crate::api::DeploymentStatus,
) -> Result<Converged, ReconcileError> {
    let resolved = deployment::resolve(dep, &ctx.desired, |k| is_ready(&ctx.book, k))
        .and_then(|applications| Ok((deployment::plan(dep, &applications)?, applications)));
    let (hosts, applications) = match resolved {
        Ok(resolved) => resolved,
        Err(waiting @ ReconcileError::Waiting { .. }) => {
            wait_for_dependencies(ctx, key, dep);
            return Err(waiting);
        }
        Err(e) => return Err(e),
    };
    let env_key = ObjectKey {
        kind: Kind::RuntimeEnvironment,
        name: dep.spec.runtime_environment.clone(),
    };
    let Some(Object::RuntimeEnvironment(env)) = ctx.desired.get(&env_key).map(|d| d.object().clone()) else {
        return Err(ReconcileError::Waiting {
            reason: reasons::DEPENDENCY_NOT_READY,
            message: format!("waiting for RuntimeEnvironment {} to exist", env_key.name),
            retry_after: deployment::DEPENDENCY_RETRY,
        });
    };
    let (mut facts, migration_conditions) = match &ctx.migrations {
        Some(m) => {
            match migration::reconcile(ctx, m, key, desired.generation, dep, &hosts, &applications, old)? {
                migration::Next::Migrating(done) => return Ok(*done),
                migration::Next::Stay(facts, conditions) => (*facts, conditions),
            }
        }
        None => (DeploymentFacts::default(), Vec::new()),
    };
    let previous = crate::provider::PreviousFacts::of(old);
    let report = ctx
        .provider
        .converge(crate::provider::ConvergeRequest {
            deployment: dep,
            env: &env,
            hosts: &hosts,
            previous: &previous,
        })
        .await?;
    facts.hosts = Some(match report.hosts {
        Some(h) => h,
        None => deployment::host_statuses(&hosts, &old.hosts),
    });
    facts.endpoints = Some(
        hosts
            .iter()
            .map(|h| (h.application.to_string(), format!("https://{}", h.fqdn)))
            .collect(),
    );
    facts.dns = report.dns;
    if !report.converged {
        return Ok(Converged {
            action: Action::Requeue(report.retry_after.unwrap_or(Duration::from_secs(10))),
            reason: reasons::PROGRESSING,
            message: report.message,
            environment: None,
            deployment: facts,
            conditions: report.conditions,
            extra_conditions: migration_conditions,
            failure: report.failure,
        });
    }
    if ctx.migrations.is_some() && report.failure.is_none() {
        // Where the hosts run: a later change of spec.runtimeEnvironment moves them from here.
        facts.runtime_environment = Some(dep.spec.runtime_environment.to_string());
    }
    // A provider may want to look again before the resync (say, for its next drift scan).
    let next = report
        .retry_after
        .map_or(RESYNC, |d| d.clamp(Duration::from_secs(1), RESYNC));
    Ok(Converged {
        action: Action::Requeue(next),
        reason: reasons::SUCCEEDED,
        message: report.message,
        environment: None,
        deployment: facts,
        conditions: report.conditions,
        extra_conditions: migration_conditions,
        failure: report.failure,
    })
}

/// A Deployment's status within `status`, or the empty one.
fn deployment_status(status: Option<&AnyStatus>) -> &crate::api::DeploymentStatus {
    static EMPTY: std::sync::OnceLock<crate::api::DeploymentStatus> = std::sync::OnceLock::new();
    match status {
        Some(AnyStatus::Deployment(s)) => s,
        _ => EMPTY.get_or_init(Default::default),
    }
}

/// Records `key` as waiting on the first dependency it lacks (a missing Application, or a RuntimeEnvironment
/// that is missing or not Ready), so that it is woken when that one turns Ready. Should everything have
/// turned Ready since it looked, it wakes itself: a dependency takes its waiters only after its Ready
/// status is written, so no wake-up is lost between the two.
fn wait_for_dependencies(ctx: &Context, key: &ObjectKey, dep: &crate::api::Deployment) {
    let env = ObjectKey {
        kind: Kind::RuntimeEnvironment,
        name: dep.spec.runtime_environment.clone(),
    };
    let satisfied = |env: &ObjectKey| {
        let missing_application = dep.spec.applications.keys().find(|name| {
            let app = ObjectKey {
                kind: Kind::Application,
                name: (*name).clone(),
            };
            ctx.desired.get(&app).is_none()
        });
        match missing_application {
            Some(name) => Err(ObjectKey {
                kind: Kind::Application,
                name: name.clone(),
            }),
            None if !is_ready(&ctx.book, env) => Err(env.clone()),
            None => Ok(()),
        }
    };
    // Wait on the first thing missing; when it turns Ready the reconcile looks again, and waits on the
    // next one if there is one.
    if let Err(dependency) = satisfied(&env) {
        ctx.waiters.wait(&dependency, key);
        if satisfied(&env).is_ok() {
            (ctx.trigger)(key);
        }
    }
}

async fn cleanup(ctx: &Context, key: &ObjectKey) -> Result<Action, ReconcileError> {
    if key.kind == Kind::Deployment {
        ctx.provider.cleanup(key).await?;
    }
    ctx.desired.finish_removal(key);
    ctx.book.forget(key);
    ctx.metrics.forget(key);
    tracing::info!(object = %key, "removed: cleanup finished, status and metrics dropped");
    if key.kind != Kind::Deployment {
        for dependent in ctx.desired.dependents(key) {
            (ctx.trigger)(&dependent);
        }
    }
    Ok(Action::AwaitChange)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ConditionStatus::{False, True};

    fn statuses(outcome: &Outcome<'_>) -> [(ConditionStatus, &'static str); 3] {
        summary_conditions(outcome).map(|(status, reason, _)| (status, reason))
    }

    #[test]
    fn a_converged_object_is_ready_and_neither_stalled_nor_reconciling() {
        let [ready, stalled, reconciling] = summary_conditions(&Outcome::Converged(reasons::SUCCEEDED, "ok"));
        assert_eq!(ready, (True, reasons::SUCCEEDED, "ok".to_owned()));
        assert_eq!((stalled.0, reconciling.0), (False, False));
        assert_eq!((stalled.2.as_str(), reconciling.2.as_str()), ("", ""));
    }

    #[test]
    fn hosts_still_converging_are_reconciling_and_not_yet_ready_without_an_error() {
        assert_eq!(
            statuses(&Outcome::Progressing("2 of 3 hosts")),
            [
                (False, reasons::PROGRESSING),
                (False, reasons::PROGRESSING),
                (True, reasons::PROGRESSING)
            ]
        );
        assert_eq!(
            summary_conditions(&Outcome::Progressing("2 of 3 hosts"))[2].2,
            "2 of 3 hosts"
        );
    }

    #[test]
    fn a_terminal_error_stalls_and_stops_reconciling() {
        let e = ReconcileError::Terminal {
            reason: "InvalidSpec",
            message: "size xl is not offered".into(),
        };
        let [ready, stalled, reconciling] = summary_conditions(&Outcome::Failed(&e));
        assert_eq!(ready, (False, "InvalidSpec", "size xl is not offered".to_owned()));
        assert_eq!(
            stalled,
            (True, "InvalidSpec", "size xl is not offered".to_owned())
        );
        assert_eq!(reconciling.0, False);
    }

    #[test]
    fn a_transient_error_or_a_rolled_back_deploy_keeps_reconciling_and_is_not_stalled() {
        let e = ReconcileError::Transient {
            reason: "DeployFailed",
            message: "uni-mastodon: health checks failed".into(),
        };
        assert_eq!(
            statuses(&Outcome::Failed(&e)),
            [
                (False, "DeployFailed"),
                (False, "DeployFailed"),
                (True, "DeployFailed")
            ]
        );
        assert_eq!(
            summary_conditions(&Outcome::Failed(&e))[0].2,
            "uni-mastodon: health checks failed"
        );
    }
}
