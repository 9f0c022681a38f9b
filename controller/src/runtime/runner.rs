//! The runner: takes due keys from the queue and reconciles them, capped, timed out, isolated and drained.
//!
//! [`Runner::run`] owns the reconcile tasks; a [`ControllerHandle`] feeds the queue from other tasks. Each
//! reconcile runs as its own tokio task, so a panic becomes an error of that key alone. Nothing starts
//! before [`ControllerHandle::set_ready`]. On [`ShutdownState::Draining`] nothing new starts and running
//! reconciles get the grace period to finish; [`ShutdownState::Aborting`] or the end of the grace period
//! aborts them.

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::{Id, JoinError, JoinSet};
use tokio::time::{Instant, MissedTickBehavior, error::Elapsed};
use tracing::Instrument;

use super::metrics::{ErrorDetail, ResultLabel, RuntimeMetrics};
use super::queue::{KeyStatus, MAX_SCHEDULE_DELAY, Pop, QueueConfig, Scheduler};
use super::shutdown::ShutdownState;
use super::{Action, ReconcileError, Reconciler};
use crate::api::{Kind, ObjectKey};

/// Reconciles running at once over all kinds (reconciles mostly wait on Proxmox tasks and SSH, so more
/// than controller-runtime's default of 1 per controller; per-environment limits protect the backends).
pub const DEFAULT_MAX_CONCURRENT: usize = 16;
/// Longest a reconcile may run (long enough for a NixOS switch over SSH; longer work should be polled
/// with `Action::Requeue`).
pub const DEFAULT_RECONCILE_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// How long running reconciles may take to finish after the first shutdown signal (Kubernetes' default
/// `terminationGracePeriodSeconds` of 30 s).
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(30);
/// How often the time-based queue gauges are refreshed (client-go's unfinished-work period of 500 ms).
pub const GAUGE_REFRESH_PERIOD: Duration = Duration::from_millis(500);

/// The reason of the transient error a timed-out reconcile becomes.
pub const REASON_TIMEOUT: &str = "ReconcileTimeout";
/// The reason of the transient error a panicked reconcile becomes.
pub const REASON_PANIC: &str = "ReconcilePanicked";
/// The reason of the transient error an aborted reconcile becomes.
pub const REASON_ABORTED: &str = "ReconcileAborted";

/// How the runner schedules, caps and times reconciles.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Backoff, resync and rate limit of the queue.
    pub queue: QueueConfig,
    /// Reconciles running at once over all kinds (at least 1).
    pub max_concurrent: usize,
    /// Reconciles running at once per kind (at least 1); a kind not listed is capped by `max_concurrent` only.
    pub max_concurrent_per_kind: BTreeMap<Kind, usize>,
    /// Longest a reconcile may run; a timeout counts as a transient error.
    pub reconcile_timeout: Duration,
    /// How long running reconciles may take to finish once draining starts.
    pub grace_period: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            queue: QueueConfig::default(),
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            max_concurrent_per_kind: BTreeMap::new(),
            reconcile_timeout: DEFAULT_RECONCILE_TIMEOUT,
            grace_period: DEFAULT_GRACE_PERIOD,
        }
    }
}

impl RunnerConfig {
    /// The concurrency cap of `kind`, at least 1 and at most the global cap.
    pub fn cap(&self, kind: Kind) -> usize {
        let global = self.max_concurrent.max(1);
        self.max_concurrent_per_kind
            .get(&kind)
            .map_or(global, |cap| (*cap).clamp(1, global))
    }
}

/// How [`Runner::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum RunOutcome {
    /// Every running reconcile finished: a clean shutdown.
    Drained,
    /// Reconciles were still running and were aborted (second signal or grace period over).
    Aborted {
        /// How many were aborted.
        unfinished: usize,
    },
}

/// State shared between the runner and its handles.
#[derive(Debug)]
struct Shared {
    scheduler: Mutex<Scheduler>,
    /// Wakes the runner after a change to the queue or the readiness gate.
    wake: Notify,
    ready: AtomicBool,
    metrics: Option<RuntimeMetrics>,
}

impl Shared {
    fn scheduler(&self) -> MutexGuard<'_, Scheduler> {
        // The scheduler keeps its invariants across every method, so a panic elsewhere cannot break it.
        self.scheduler.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A cheap, cloneable handle to feed the queue and look at it while [`Runner::run`] goes on.
#[derive(Debug, Clone)]
pub struct ControllerHandle {
    shared: Arc<Shared>,
}

impl ControllerHandle {
    /// Reconciles `key` as soon as possible (once, however often it is asked). Ignored while the key is
    /// stalled by a terminal error.
    pub fn enqueue(&self, key: ObjectKey) {
        self.enqueue_after(key, Duration::ZERO);
    }

    /// Reconciles `key` after `delay`, or earlier if it is due earlier already.
    pub fn enqueue_after(&self, key: ObjectKey, delay: Duration) {
        let kind = key.kind;
        let at = Instant::now() + delay.min(MAX_SCHEDULE_DELAY);
        let accepted = self.shared.scheduler().enqueue(key, at);
        if accepted && !delay.is_zero() {
            self.record(|m| m.retried(kind));
        }
        self.shared.wake.notify_one();
    }

    /// The spec of `key` changed: resets its backoff, lifts a terminal stall and reconciles it now.
    pub fn spec_changed(&self, key: ObjectKey) {
        self.shared.scheduler().spec_changed(key, Instant::now());
        self.shared.wake.notify_one();
    }

    /// Drops all state of `key`, whose object was removed and whose cleanup succeeded.
    pub fn forget(&self, key: &ObjectKey) {
        self.shared.scheduler().forget(key);
    }

    /// Opens the readiness gate: reconciles may start (call after the first complete snapshot).
    pub fn set_ready(&self) {
        self.shared.ready.store(true, Ordering::Release);
        self.shared.wake.notify_one();
    }

    /// Whether the readiness gate is open.
    pub fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::Acquire)
    }

    /// What the queue knows about `key`: running, next due time, failures, stalled.
    pub fn status(&self, key: &ObjectKey) -> Option<KeyStatus> {
        self.shared.scheduler().status(key)
    }

    /// Whether a reconcile of `key` is running.
    pub fn is_running(&self, key: &ObjectKey) -> bool {
        self.status(key).is_some_and(|s| s.running)
    }

    /// How many keys are due now (over all kinds), including ones waiting for their running reconcile.
    pub fn depth(&self) -> usize {
        let now = Instant::now();
        let scheduler = self.shared.scheduler();
        Kind::ALL.into_iter().map(|kind| scheduler.depth(kind, now)).sum()
    }

    /// How many keys the queue knows (queued, running or stalled).
    pub fn len(&self) -> usize {
        self.shared.scheduler().len()
    }

    /// Whether the queue knows no key.
    pub fn is_empty(&self) -> bool {
        self.shared.scheduler().is_empty()
    }

    fn record(&self, f: impl FnOnce(&RuntimeMetrics)) {
        if let Some(metrics) = &self.shared.metrics {
            f(metrics);
        }
    }
}

/// What a reconcile task returns: the reconcile's result, or the timeout.
type TaskOutput = Result<Result<Action, ReconcileError>, Elapsed>;

/// A reconcile in progress.
#[derive(Debug)]
struct Running {
    key: ObjectKey,
    started: Instant,
}

/// Runs reconciles from the queue until shutdown. See the module docs.
pub struct Runner {
    shared: Arc<Shared>,
    reconciler: Arc<dyn Reconciler>,
    config: RunnerConfig,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Runner {
    /// A runner of `reconciler`, with an empty queue and the readiness gate closed. With `metrics`, it
    /// records the controller-runtime and workqueue metrics.
    pub fn new(
        reconciler: Arc<dyn Reconciler>,
        config: RunnerConfig,
        metrics: Option<RuntimeMetrics>,
    ) -> Self {
        let scheduler = Scheduler::new(config.queue.clone(), Instant::now());
        if let Some(metrics) = &metrics {
            for kind in Kind::ALL {
                metrics.set_max_concurrent(kind, config.cap(kind));
            }
        }
        let shared = Arc::new(Shared {
            scheduler: Mutex::new(scheduler),
            wake: Notify::new(),
            ready: AtomicBool::new(false),
            metrics,
        });
        Self {
            shared,
            reconciler,
            config,
        }
    }

    /// A handle to feed the queue from other tasks.
    pub fn handle(&self) -> ControllerHandle {
        ControllerHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Reconciles due keys until `shutdown` leaves [`ShutdownState::Running`], then drains or aborts.
    /// A dropped shutdown sender is read as "never shut down".
    pub async fn run(self, shutdown: watch::Receiver<ShutdownState>) -> RunOutcome {
        Workers {
            shared: self.shared,
            reconciler: self.reconciler,
            config: self.config,
            tasks: JoinSet::new(),
            running: HashMap::new(),
            running_per_kind: BTreeMap::new(),
        }
        .run(shutdown)
        .await
    }
}

/// The reconcile tasks of a running [`Runner`].
struct Workers {
    shared: Arc<Shared>,
    reconciler: Arc<dyn Reconciler>,
    config: RunnerConfig,
    tasks: JoinSet<TaskOutput>,
    running: HashMap<Id, Running>,
    running_per_kind: BTreeMap<Kind, usize>,
}

impl Workers {
    async fn run(mut self, mut shutdown: watch::Receiver<ShutdownState>) -> RunOutcome {
        let mut shutdown_open = true;
        let mut gauges = tokio::time::interval(GAUGE_REFRESH_PERIOD);
        gauges.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let state = *shutdown.borrow_and_update();
            match state {
                ShutdownState::Running => {}
                ShutdownState::Draining => return self.drain(shutdown, shutdown_open).await,
                ShutdownState::Aborting => return self.abort().await,
            }
            let wake_at = if self.shared.ready.load(Ordering::Acquire) {
                self.start_due()
            } else {
                None
            };
            let sleep = async move {
                match wake_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                changed = shutdown.changed(), if shutdown_open => shutdown_open = changed.is_ok(),
                Some(joined) = self.tasks.join_next_with_id() => self.complete(joined),
                () = self.shared.wake.notified() => {}
                () = sleep => {}
                _ = gauges.tick() => self.refresh_gauges(),
            }
        }
    }

    /// Starts every due key the caps and the rate limit allow; returns when to look again.
    fn start_due(&mut self) -> Option<Instant> {
        let shared = Arc::clone(&self.shared);
        let now = Instant::now();
        loop {
            if self.tasks.len() >= self.config.max_concurrent.max(1) {
                return None;
            }
            let pop = shared.scheduler().pop_due(now, |kind| {
                self.running_per_kind.get(&kind).copied().unwrap_or(0) < self.config.cap(kind)
            });
            match pop {
                Pop::Idle { wake_at } => return wake_at,
                Pop::Ready { key, waited } => {
                    if let Some(metrics) = &shared.metrics {
                        metrics.started(key.kind, waited);
                    }
                    self.spawn(key, now);
                }
            }
        }
    }

    fn spawn(&mut self, key: ObjectKey, now: Instant) {
        let reconciler = Arc::clone(&self.reconciler);
        let timeout = self.config.reconcile_timeout;
        let span = tracing::info_span!("reconcile", key = %key);
        let task_key = key.clone();
        let abort = self.tasks.spawn(
            async move { tokio::time::timeout(timeout, reconciler.reconcile(task_key)).await }
                .instrument(span),
        );
        *self.running_per_kind.entry(key.kind).or_default() += 1;
        self.running.insert(abort.id(), Running { key, started: now });
    }

    /// Records how a reconcile task ended and schedules its key's next run.
    fn complete(&mut self, joined: Result<(Id, TaskOutput), JoinError>) {
        let (id, result, detail) = match joined {
            Ok((id, Ok(result))) => {
                let detail = match &result {
                    Ok(_) | Err(ReconcileError::Waiting { .. }) => None,
                    Err(ReconcileError::Transient { .. }) => Some(ErrorDetail::Transient),
                    Err(ReconcileError::Terminal { .. }) => Some(ErrorDetail::Terminal),
                };
                (id, result, detail)
            }
            Ok((id, Err(_elapsed))) => {
                let message = format!(
                    "reconcile exceeded its timeout of {:?}",
                    self.config.reconcile_timeout
                );
                (
                    id,
                    Err(transient(REASON_TIMEOUT, message)),
                    Some(ErrorDetail::Timeout),
                )
            }
            Err(error) => {
                let id = error.id();
                if error.is_panic() {
                    let message = format!("reconcile panicked: {}", panic_message(error.into_panic()));
                    (
                        id,
                        Err(transient(REASON_PANIC, message)),
                        Some(ErrorDetail::Panic),
                    )
                } else {
                    let message = "reconcile was aborted".to_owned();
                    (
                        id,
                        Err(transient(REASON_ABORTED, message)),
                        Some(ErrorDetail::Transient),
                    )
                }
            }
        };
        let Some(run) = self.running.remove(&id) else {
            return;
        };
        if let Some(count) = self.running_per_kind.get_mut(&run.key.kind) {
            *count = count.saturating_sub(1);
        }
        let now = Instant::now();
        let took = now.saturating_duration_since(run.started);
        match &result {
            Ok(action) => tracing::debug!(key = %run.key, ?action, ?took, "reconciled"),
            // Waiting on a dependency is routine (its event says so once); failures are worth a warning.
            Err(error @ ReconcileError::Waiting { .. }) => tracing::debug!(
                key = %run.key,
                reason = error.reason(),
                %error,
                "reconcile waiting"
            ),
            Err(error) => tracing::warn!(
                key = %run.key,
                reason = error.reason(),
                class = error.metric_label(),
                %error,
                "reconcile failed"
            ),
        }
        let finished = self.shared.scheduler().finish(&run.key, &result, now);
        if let Some(metrics) = &self.shared.metrics {
            let label = match (&result, detail) {
                (_, Some(_)) => ResultLabel::Error,
                // Converged: a scheduled resync is no retry, as in controller-runtime's periodic sync.
                (Ok(_), None) => ResultLabel::Success,
                // Waiting for a dependency: asked to come back later, not a failure.
                (Err(_), None) => ResultLabel::RequeueAfter,
            };
            metrics.finished(run.key.kind, took, label, detail);
            // Retries are failures run again after a backoff; terminal failures are not retried.
            if detail.is_some() && finished.retry_after.is_some_and(|d| !d.is_zero()) {
                metrics.retried(run.key.kind);
            }
        }
    }

    /// Starts nothing new and waits for running reconciles, up to the grace period or an abort signal.
    async fn drain(&mut self, mut shutdown: watch::Receiver<ShutdownState>, mut open: bool) -> RunOutcome {
        tracing::info!(running = self.tasks.len(), grace = ?self.config.grace_period, "draining reconciles");
        let deadline = Instant::now() + self.config.grace_period;
        loop {
            if self.tasks.is_empty() {
                tracing::info!("all reconciles finished");
                return RunOutcome::Drained;
            }
            if *shutdown.borrow_and_update() == ShutdownState::Aborting {
                return self.abort().await;
            }
            tokio::select! {
                biased;
                changed = shutdown.changed(), if open => open = changed.is_ok(),
                Some(joined) = self.tasks.join_next_with_id() => self.complete(joined),
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!("grace period over");
                    return self.abort().await;
                }
            }
        }
    }

    /// Aborts every running reconcile and waits until they are gone; `Drained` if none was running.
    async fn abort(&mut self) -> RunOutcome {
        let unfinished = self.tasks.len();
        if unfinished > 0 {
            tracing::warn!(unfinished, "aborting running reconciles");
        }
        self.tasks.abort_all();
        while let Some(joined) = self.tasks.join_next_with_id().await {
            self.complete(joined);
        }
        if unfinished == 0 {
            // Nothing was cut short: as clean as a drain.
            return RunOutcome::Drained;
        }
        RunOutcome::Aborted { unfinished }
    }

    /// Refreshes the queue gauges that change with time alone.
    fn refresh_gauges(&self) {
        let Some(metrics) = &self.shared.metrics else {
            return;
        };
        let now = Instant::now();
        let scheduler = self.shared.scheduler();
        for kind in Kind::ALL {
            let (unfinished, longest) = self
                .running
                .values()
                .filter(|run| run.key.kind == kind)
                .map(|run| now.saturating_duration_since(run.started))
                .fold((Duration::ZERO, Duration::ZERO), |(sum, max), d| {
                    (sum + d, max.max(d))
                });
            metrics.set_queue(kind, scheduler.depth(kind, now), unfinished, longest);
        }
    }
}

fn transient(reason: &'static str, message: String) -> ReconcileError {
    ReconcileError::Transient { reason, message }
}

/// The message of a panic payload, when it is a string.
fn panic_message(payload: Box<dyn Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(message) => *message,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(message) => (*message).to_owned(),
            Err(_) => "(no message)".to_owned(),
        },
    }
}

#[cfg(test)]
mod tests;
