//! The runner's tests on the paused clock: readiness, caps, timeouts, panics, requeues, terminal errors, the rate limit, draining and aborting, metrics.

use std::collections::VecDeque;

use prometheus::Registry;
use prometheus::proto::MetricType;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::*;
use crate::runtime::BoxFuture;
use crate::runtime::queue::tests::{key, terminal, transient};
use crate::runtime::queue::{ExponentialBackoff, RateLimit};

const SECOND: Duration = Duration::from_secs(1);

/// What the fake does on one reconcile of a key.
enum Step {
    /// Returns at once.
    Return(Result<Action, ReconcileError>),
    /// Returns after a while.
    Sleep(Duration, Result<Action, ReconcileError>),
    /// Returns once a permit of the semaphore is given.
    Hold(Arc<Semaphore>, Result<Action, ReconcileError>),
    /// Panics.
    Panic,
}

#[derive(Default)]
struct FakeState {
    scripts: HashMap<ObjectKey, VecDeque<Step>>,
    calls: Vec<(ObjectKey, Instant)>,
    completed: usize,
    active: HashMap<ObjectKey, usize>,
    active_per_kind: HashMap<Kind, usize>,
    active_total: usize,
    max_total: usize,
    max_per_kind: HashMap<Kind, usize>,
    overlapped: bool,
}

/// A scripted reconciler that records its calls and how many run at once. A key without a script
/// left returns `Ok(AwaitChange)`.
#[derive(Clone, Default)]
struct Fake(Arc<Mutex<FakeState>>);

impl Fake {
    fn script(&self, key: &ObjectKey, steps: impl IntoIterator<Item = Step>) -> &Self {
        self.state().scripts.entry(key.clone()).or_default().extend(steps);
        self
    }

    fn state(&self) -> MutexGuard<'_, FakeState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn calls(&self, key: &ObjectKey) -> usize {
        self.state().calls.iter().filter(|(k, _)| k == key).count()
    }

    fn call_times(&self) -> Vec<Instant> {
        self.state().calls.iter().map(|(_, at)| *at).collect()
    }
}

/// Counts a reconcile as active until dropped (also when aborted or panicking).
struct Active(Fake, ObjectKey);

impl Active {
    fn enter(fake: &Fake, key: &ObjectKey) -> Self {
        let mut s = fake.state();
        let n = s.active.entry(key.clone()).or_default();
        *n += 1;
        if *n > 1 {
            s.overlapped = true;
        }
        s.active_total += 1;
        s.max_total = s.max_total.max(s.active_total);
        let in_kind = {
            let k = s.active_per_kind.entry(key.kind).or_default();
            *k += 1;
            *k
        };
        let max = s.max_per_kind.entry(key.kind).or_default();
        *max = (*max).max(in_kind);
        Self(fake.clone(), key.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        let mut s = self.0.state();
        if let Some(n) = s.active.get_mut(&self.1) {
            *n -= 1;
        }
        if let Some(n) = s.active_per_kind.get_mut(&self.1.kind) {
            *n -= 1;
        }
        s.active_total -= 1;
    }
}

impl Reconciler for Fake {
    fn reconcile(&self, key: ObjectKey) -> BoxFuture<Result<Action, ReconcileError>> {
        let fake = self.clone();
        Box::pin(async move {
            let step = {
                let mut s = fake.state();
                s.calls.push((key.clone(), Instant::now()));
                s.scripts.get_mut(&key).and_then(VecDeque::pop_front)
            };
            let _active = Active::enter(&fake, &key);
            let result = match step.unwrap_or(Step::Return(Ok(Action::AwaitChange))) {
                Step::Return(result) => result,
                Step::Sleep(d, result) => {
                    tokio::time::sleep(d).await;
                    result
                }
                Step::Hold(gate, result) => {
                    if let Ok(permit) = gate.acquire().await {
                        permit.forget();
                    }
                    result
                }
                Step::Panic => panic!("the fake panics"),
            };
            fake.state().completed += 1;
            result
        })
    }
}

fn app(name: &str) -> ObjectKey {
    ObjectKey::new(Kind::Application, name)
}

/// Deterministic settings: no jitter, no rate limit, 60 s timeout, 30 s grace.
fn config() -> RunnerConfig {
    RunnerConfig {
        queue: QueueConfig {
            backoff: Arc::new(ExponentialBackoff {
                jitter: 0.0,
                ..ExponentialBackoff::default()
            }),
            resync_jitter: 0.0,
            rate_limit: None,
            ..QueueConfig::default()
        },
        reconcile_timeout: 60 * SECOND,
        ..RunnerConfig::default()
    }
}

struct Harness {
    handle: ControllerHandle,
    shutdown: watch::Sender<ShutdownState>,
    run: JoinHandle<RunOutcome>,
}

fn start(fake: &Fake, config: RunnerConfig, metrics: Option<RuntimeMetrics>) -> Harness {
    let runner = Runner::new(Arc::new(fake.clone()), config, metrics);
    let handle = runner.handle();
    let (shutdown, rx) = watch::channel(ShutdownState::Running);
    let run = tokio::spawn(runner.run(rx));
    Harness {
        handle,
        shutdown,
        run,
    }
}

/// Lets every task run until nothing is left to do at the current instant.
async fn settle() {
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn nothing_runs_before_set_ready_and_every_queued_key_runs_once_after() {
    let fake = Fake::default();
    let h = start(&fake, config(), None);
    h.handle.enqueue(key("a"));
    h.handle.enqueue(key("b"));
    h.handle.enqueue(key("a"));
    tokio::time::sleep(60 * SECOND).await;
    assert!(fake.state().calls.is_empty(), "the readiness gate holds");
    assert!(!h.handle.is_ready());

    h.handle.set_ready();
    settle().await;
    assert_eq!((fake.calls(&key("a")), fake.calls(&key("b"))), (1, 1));
    assert!(h.handle.is_ready());
}

#[tokio::test(start_paused = true)]
async fn a_key_enqueued_while_running_runs_exactly_once_afterwards() {
    let fake = Fake::default();
    let gate = Arc::new(Semaphore::new(0));
    fake.script(&key("a"), [Step::Hold(gate.clone(), Ok(Action::AwaitChange))]);
    let h = start(&fake, config(), None);
    h.handle.set_ready();
    h.handle.enqueue(key("a"));
    settle().await;
    assert!(h.handle.is_running(&key("a")));

    for _ in 0..3 {
        h.handle.enqueue(key("a"));
        h.handle.spec_changed(key("a"));
    }
    tokio::time::sleep(5 * SECOND).await;
    assert_eq!(fake.calls(&key("a")), 1, "not started again while running");

    gate.add_permits(1);
    settle().await;
    tokio::time::sleep(5 * SECOND).await;
    assert_eq!(fake.calls(&key("a")), 2, "exactly once more afterwards");
    assert!(!fake.state().overlapped);
}

#[tokio::test(start_paused = true)]
async fn the_global_concurrency_cap_is_never_exceeded() {
    let fake = Fake::default();
    let keys = [key("a"), key("b"), key("c"), app("d"), app("e"), app("f")];
    for k in &keys {
        fake.script(k, [Step::Sleep(SECOND, Ok(Action::AwaitChange))]);
    }
    let h = start(
        &fake,
        RunnerConfig {
            max_concurrent: 2,
            ..config()
        },
        None,
    );
    let t0 = Instant::now();
    h.handle.set_ready();
    for k in &keys {
        h.handle.enqueue(k.clone());
    }
    tokio::time::sleep(10 * SECOND).await;
    assert!(keys.iter().all(|k| fake.calls(k) == 1));
    assert_eq!(fake.state().max_total, 2);
    let last = fake.call_times().into_iter().max().map(|t| t - t0);
    assert_eq!(last, Some(2 * SECOND), "six one-second reconciles, two at a time");
}

#[tokio::test(start_paused = true)]
async fn the_per_kind_cap_limits_one_kind_and_leaves_the_others_running() {
    let fake = Fake::default();
    let keys = [key("a"), key("b"), key("c"), app("d"), app("e"), app("f")];
    for k in &keys {
        fake.script(k, [Step::Sleep(SECOND, Ok(Action::AwaitChange))]);
    }
    let h = start(
        &fake,
        RunnerConfig {
            max_concurrent_per_kind: BTreeMap::from([(Kind::Deployment, 1)]),
            ..config()
        },
        None,
    );
    h.handle.set_ready();
    for k in &keys {
        h.handle.enqueue(k.clone());
    }
    settle().await;
    {
        let s = fake.state();
        assert_eq!(s.active_per_kind.get(&Kind::Deployment), Some(&1));
        assert_eq!(s.active_per_kind.get(&Kind::Application), Some(&3));
    }
    tokio::time::sleep(10 * SECOND).await;
    assert!(keys.iter().all(|k| fake.calls(k) == 1));
    assert_eq!(fake.state().max_per_kind.get(&Kind::Deployment), Some(&1));
}

#[tokio::test(start_paused = true)]
async fn a_reconcile_that_exceeds_its_timeout_is_cancelled_and_retried_with_backoff() {
    let fake = Fake::default();
    fake.script(&key("a"), [Step::Sleep(3600 * SECOND, Ok(Action::AwaitChange))]);
    let h = start(
        &fake,
        RunnerConfig {
            reconcile_timeout: 5 * SECOND,
            ..config()
        },
        None,
    );
    let t0 = Instant::now();
    h.handle.set_ready();
    h.handle.enqueue(key("a"));
    tokio::time::sleep(5 * SECOND + Duration::from_millis(100)).await;
    let status = h.handle.status(&key("a"));
    assert_eq!(status.map(|s| (s.running, s.failures)), Some((false, 1)));
    assert_eq!(
        status.and_then(|s| s.next_due),
        Some(t0 + 6 * SECOND),
        "timeout + 1 s backoff"
    );
    assert_eq!(fake.state().completed, 0, "the timed-out reconcile was cancelled");

    tokio::time::sleep(SECOND).await;
    assert_eq!(fake.calls(&key("a")), 2);
    assert_eq!(h.handle.status(&key("a")).map(|s| s.failures), Some(0));
}

#[tokio::test(start_paused = true)]
async fn a_panicking_reconcile_is_retried_with_backoff_while_other_keys_keep_working() {
    let fake = Fake::default();
    fake.script(&key("boom"), [Step::Panic]);
    fake.script(&key("fine"), [Step::Return(Ok(Action::Requeue(SECOND)))]);
    let h = start(&fake, config(), None);
    h.handle.set_ready();
    h.handle.enqueue(key("boom"));
    h.handle.enqueue(key("fine"));
    settle().await;
    let status = h.handle.status(&key("boom"));
    assert_eq!(status.map(|s| (s.running, s.failures)), Some((false, 1)));

    tokio::time::sleep(SECOND + Duration::from_millis(100)).await;
    assert_eq!(fake.calls(&key("boom")), 2, "retried after the 1 s backoff");
    assert_eq!(fake.calls(&key("fine")), 2, "the other key kept its schedule");
    assert_eq!(h.handle.status(&key("boom")).map(|s| s.failures), Some(0));
}

#[tokio::test(start_paused = true)]
async fn requeue_and_waiting_run_again_after_their_delays() {
    let fake = Fake::default();
    let waiting = Err(ReconcileError::Waiting {
        reason: "DependencyNotReady",
        message: "waiting".to_owned(),
        retry_after: 7 * SECOND,
    });
    fake.script(
        &key("a"),
        [
            Step::Return(Ok(Action::Requeue(3 * SECOND))),
            Step::Return(waiting),
        ],
    );
    let h = start(&fake, config(), None);
    let t0 = Instant::now();
    h.handle.set_ready();
    h.handle.enqueue(key("a"));
    tokio::time::sleep(60 * SECOND).await;
    let offsets: Vec<Duration> = fake.call_times().into_iter().map(|t| t - t0).collect();
    assert_eq!(offsets, [Duration::ZERO, 3 * SECOND, 10 * SECOND]);
    let next = h.handle.status(&key("a")).and_then(|s| s.next_due);
    assert_eq!(next, Some(t0 + 10 * SECOND + 600 * SECOND), "then the resync");
}

#[tokio::test(start_paused = true)]
async fn a_terminal_error_is_not_retried_until_the_spec_changes() {
    let fake = Fake::default();
    fake.script(&key("a"), [Step::Return(terminal())]);
    let h = start(&fake, config(), None);
    h.handle.set_ready();
    h.handle.enqueue(key("a"));
    settle().await;
    assert_eq!(h.handle.status(&key("a")).map(|s| s.stalled), Some(true));

    h.handle.enqueue(key("a"));
    tokio::time::sleep(3600 * SECOND).await;
    assert_eq!(
        fake.calls(&key("a")),
        1,
        "neither triggers nor the resync retry it"
    );

    h.handle.spec_changed(key("a"));
    settle().await;
    assert_eq!(fake.calls(&key("a")), 2);
    assert_eq!(h.handle.status(&key("a")).map(|s| s.stalled), Some(false));
}

#[tokio::test(start_paused = true)]
async fn the_rate_limit_spaces_out_starts_after_the_burst() {
    let fake = Fake::default();
    let h = start(
        &fake,
        RunnerConfig {
            queue: QueueConfig {
                rate_limit: Some(RateLimit {
                    per_second: 2,
                    burst: 2,
                }),
                ..config().queue
            },
            ..config()
        },
        None,
    );
    let t0 = Instant::now();
    for i in 0..6 {
        h.handle.enqueue(key(&format!("k{i}")));
    }
    h.handle.set_ready();
    tokio::time::sleep(10 * SECOND).await;
    let offsets: Vec<u128> = fake
        .call_times()
        .into_iter()
        .map(|t| (t - t0).as_millis())
        .collect();
    assert_eq!(offsets, [0, 0, 500, 1000, 1500, 2000]);
}

#[tokio::test(start_paused = true)]
async fn draining_lets_running_reconciles_finish_starts_nothing_new_and_reports_drained() {
    let fake = Fake::default();
    fake.script(&key("a"), [Step::Sleep(5 * SECOND, Ok(Action::AwaitChange))]);
    fake.script(
        &key("c"),
        [Step::Sleep(2 * SECOND, Ok(Action::Requeue(Duration::ZERO)))],
    );
    let h = start(&fake, config(), None);
    let t0 = Instant::now();
    h.handle.set_ready();
    h.handle.enqueue(key("a"));
    h.handle.enqueue(key("c"));
    settle().await;
    h.shutdown.send_replace(ShutdownState::Draining);
    settle().await;
    h.handle.enqueue(key("b"));
    h.handle.enqueue(key("a"));

    let outcome = h.run.await.ok();
    assert_eq!(outcome, Some(RunOutcome::Drained));
    assert_eq!(
        Instant::now() - t0,
        5 * SECOND,
        "it waited for the running reconciles"
    );
    assert_eq!(fake.state().completed, 2);
    let calls = (
        fake.calls(&key("a")),
        fake.calls(&key("b")),
        fake.calls(&key("c")),
    );
    assert_eq!(
        calls,
        (1, 0, 1),
        "nothing new started, not even c's immediate requeue"
    );
}

#[tokio::test(start_paused = true)]
async fn a_second_signal_aborts_running_reconciles() {
    let fake = Fake::default();
    fake.script(
        &key("a"),
        [Step::Hold(Arc::new(Semaphore::new(0)), Ok(Action::AwaitChange))],
    );
    let h = start(&fake, config(), None);
    h.handle.set_ready();
    h.handle.enqueue(key("a"));
    settle().await;
    h.shutdown.send_replace(ShutdownState::Draining);
    tokio::time::sleep(SECOND).await;
    assert!(!h.run.is_finished(), "still draining");
    h.shutdown.send_replace(ShutdownState::Aborting);

    let outcome = h.run.await.ok();
    assert_eq!(outcome, Some(RunOutcome::Aborted { unfinished: 1 }));
    let s = fake.state();
    assert_eq!(
        (s.completed, s.active_total),
        (0, 0),
        "the reconcile was dropped, not finished"
    );
}

#[tokio::test(start_paused = true)]
async fn the_end_of_the_grace_period_aborts_running_reconciles() {
    let fake = Fake::default();
    fake.script(
        &key("a"),
        [Step::Hold(Arc::new(Semaphore::new(0)), Ok(Action::AwaitChange))],
    );
    let h = start(
        &fake,
        RunnerConfig {
            grace_period: 10 * SECOND,
            ..config()
        },
        None,
    );
    h.handle.set_ready();
    h.handle.enqueue(key("a"));
    settle().await;
    let t0 = Instant::now();
    h.shutdown.send_replace(ShutdownState::Draining);

    let outcome = h.run.await.ok();
    assert_eq!(outcome, Some(RunOutcome::Aborted { unfinished: 1 }));
    assert_eq!(Instant::now() - t0, 10 * SECOND);
    assert_eq!(fake.state().active_total, 0);
}

#[tokio::test(start_paused = true)]
async fn draining_with_nothing_running_ends_at_once() {
    let fake = Fake::default();
    let h = start(&fake, config(), None);
    h.handle.enqueue(key("a"));
    let t0 = Instant::now();
    h.shutdown.send_replace(ShutdownState::Draining);
    assert_eq!(h.run.await.ok(), Some(RunOutcome::Drained));
    assert_eq!(Instant::now(), t0);
    assert_eq!(fake.calls(&key("a")), 0);
}

#[tokio::test(start_paused = true)]
async fn aborting_with_nothing_running_counts_as_drained() {
    let fake = Fake::default();
    let h = start(&fake, config(), None);
    h.handle.set_ready();
    h.handle.enqueue(key("a"));
    settle().await;
    h.shutdown.send_replace(ShutdownState::Aborting);
    assert_eq!(h.run.await.ok(), Some(RunOutcome::Drained));
    assert_eq!(fake.state().completed, 1);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_shutdown_sender_leaves_the_runner_running() {
    let fake = Fake::default();
    let h = start(&fake, config(), None);
    drop(h.shutdown);
    h.handle.set_ready();
    tokio::time::sleep(SECOND).await;
    h.handle.enqueue(key("a"));
    settle().await;
    assert_eq!(fake.calls(&key("a")), 1);
    assert!(!h.run.is_finished());
}

/// The value of a counter or gauge, or the sample count of a histogram, with these labels.
fn sample(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let family = registry.gather().into_iter().find(|f| f.name() == name)?;
    let metric = family.get_metric().iter().find(|m| {
        labels
            .iter()
            .all(|(k, v)| m.get_label().iter().any(|l| l.name() == *k && l.value() == *v))
    })?;
    Some(match family.get_field_type() {
        MetricType::COUNTER => metric.get_counter().get_value(),
        MetricType::GAUGE => metric.get_gauge().get_value(),
        MetricType::HISTOGRAM => metric.get_histogram().get_sample_count() as f64,
        _ => return None,
    })
}

#[tokio::test(start_paused = true)]
async fn metrics_count_results_durations_retries_and_running_work() {
    let registry = Registry::new();
    let metrics = RuntimeMetrics::register(&registry).ok();
    assert!(metrics.is_some());
    let fake = Fake::default();
    let gate = Arc::new(Semaphore::new(0));
    fake.script(&key("slow"), [Step::Hold(gate.clone(), Ok(Action::AwaitChange))]);
    fake.script(
        &key("flaky"),
        [
            Step::Return(transient()),
            Step::Return(Ok(Action::Requeue(3600 * SECOND))),
        ],
    );
    fake.script(
        &key("waiting"),
        [Step::Return(Err(ReconcileError::Waiting {
            reason: "DependencyNotReady",
            message: "waiting for a dependency".into(),
            retry_after: 3600 * SECOND,
        }))],
    );
    fake.script(&app("broken"), [Step::Return(terminal())]);
    fake.script(&app("crash"), [Step::Panic, Step::Return(terminal())]);
    let h = start(
        &fake,
        RunnerConfig {
            max_concurrent_per_kind: BTreeMap::from([(Kind::Application, 3)]),
            ..config()
        },
        metrics,
    );
    let d = [("controller", "deployment")];
    let a = [("controller", "application")];
    let dq = [("name", "deployment"), ("controller", "deployment")];
    let m = |name: &str, labels: &[(&str, &str)]| sample(&registry, name, labels);

    assert_eq!(m("controller_runtime_max_concurrent_reconciles", &d), Some(16.0));
    assert_eq!(m("controller_runtime_max_concurrent_reconciles", &a), Some(3.0));
    let zero = [("controller", "runtimeenvironment"), ("result", "requeue")];
    assert_eq!(
        m("controller_runtime_reconcile_total", &zero),
        Some(0.0),
        "series exist from the start"
    );

    for k in [
        key("slow"),
        key("flaky"),
        key("waiting"),
        app("broken"),
        app("crash"),
    ] {
        h.handle.enqueue(k);
    }
    h.handle.set_ready();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        m("controller_runtime_active_workers", &d),
        Some(1.0),
        "slow is still running"
    );
    let unfinished = m("workqueue_unfinished_work_seconds", &dq).unwrap_or(0.0);
    assert!((1.5..=2.1).contains(&unfinished), "unfinished work {unfinished}");
    let longest = m("workqueue_longest_running_processor_seconds", &dq).unwrap_or(0.0);
    assert!((1.5..=2.1).contains(&longest), "longest {longest}");

    gate.add_permits(1);
    tokio::time::sleep(SECOND).await;
    let result = |controller: &str, result: &str| {
        m(
            "controller_runtime_reconcile_total",
            &[("controller", controller), ("result", result)],
        )
    };
    assert_eq!(
        result("deployment", "success"),
        Some(2.0),
        "slow, and flaky's second run that schedules its resync"
    );
    assert_eq!(result("deployment", "error"), Some(1.0), "flaky's first run");
    assert_eq!(
        result("deployment", "requeue_after"),
        Some(1.0),
        "waiting on a dependency"
    );
    assert_eq!(
        result("application", "error"),
        Some(3.0),
        "terminal, panic, terminal again"
    );
    assert_eq!(m("controller_runtime_reconcile_errors_total", &d), Some(1.0));
    assert_eq!(m("controller_runtime_reconcile_errors_total", &a), Some(3.0));
    assert_eq!(
        m("controller_runtime_terminal_reconcile_errors_total", &a),
        Some(2.0)
    );
    assert_eq!(m("controller_runtime_reconcile_panics_total", &a), Some(1.0));
    assert_eq!(m("controller_runtime_reconcile_time_seconds", &d), Some(4.0));
    assert_eq!(m("workqueue_work_duration_seconds", &dq), Some(4.0));
    assert_eq!(m("workqueue_adds_total", &dq), Some(4.0));
    assert_eq!(m("workqueue_queue_duration_seconds", &dq), Some(4.0));
    assert_eq!(
        m("workqueue_retries_total", &dq),
        Some(1.0),
        "flaky's backoff retry only: neither the resync nor the wait is a retry"
    );
    assert_eq!(m("controller_runtime_active_workers", &d), Some(0.0));
    assert_eq!(m("workqueue_unfinished_work_seconds", &dq), Some(0.0));
    assert_eq!(m("workqueue_depth", &dq), Some(0.0));

    let time = registry
        .gather()
        .into_iter()
        .find(|f| f.name() == "controller_runtime_reconcile_time_seconds")
        .and_then(|f| {
            f.get_metric()
                .iter()
                .find(|m| m.get_label().iter().any(|l| l.value() == "deployment"))
                .map(|m| {
                    (
                        m.get_histogram().get_sample_sum(),
                        m.get_histogram().get_bucket().len(),
                    )
                })
        });
    let (sum, buckets) = time.unwrap_or_default();
    assert!(
        (2.0..2.2).contains(&sum),
        "the slow reconcile took about 2.1 s: {sum}"
    );
    assert_eq!(buckets, 40, "controller-runtime's buckets");
}
