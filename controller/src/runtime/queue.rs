//! The work queue: deduplicated keys with due times, per-key backoff, a global token bucket and resync.
//!
//! [`Scheduler`] is the pure core: it never reads the clock or sleeps, every method takes `now`, so it is
//! unit-tested without async. The [runner](super::runner) wraps it in a mutex and drives it.
//!
//! Semantics, after kube-runtime's scheduler and client-go's workqueue:
//! - a key is queued at most once; when it is asked for twice, the earliest due time wins;
//! - a key is never handed out while it is running; a request that arrives meanwhile makes it run once
//!   more afterwards;
//! - a transient failure schedules a retry with exponential backoff; the exponent grows only when the
//!   retry ran after its backoff had elapsed (a trigger that pre-empts the backoff does not count), and
//!   resets on success or on a spec change;
//! - every known key that is not stalled runs at least once per resync period;
//! - a terminal error stalls the key until [`Scheduler::spec_changed`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::bucket::TokenBucket;
use super::{Action, ReconcileError};
use crate::api::{Kind, ObjectKey};

/// First retry delay after a transient failure (the brief's 1 s; Crossplane also starts at 1 s).
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Longest retry delay (5 min: between Crossplane's 60 s and Flux's 15 min caps).
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(5 * 60);
/// Relative jitter of backoff and resync delays (±10%, enough to spread a burst of failures).
pub const DEFAULT_JITTER: f64 = 0.1;
/// How often every known key is reconciled even without a change (10 min, a fallback for missed triggers).
pub const DEFAULT_RESYNC_PERIOD: Duration = Duration::from_secs(10 * 60);
/// Reconcile starts allowed per second overall (5× client-go's 10 qps: our keys are few and coarse).
pub const DEFAULT_RATE_PER_SECOND: u32 = 50;
/// Token bucket size (client-go's default bucket of 100).
pub const DEFAULT_RATE_BURST: u32 = 100;
/// Longest delay the queue accepts (6 months, as kube-runtime caps its scheduler); keeps `Instant` math safe.
pub const MAX_SCHEDULE_DELAY: Duration = Duration::from_secs(183 * 24 * 60 * 60);

/// Chooses the delay before a retry after consecutive transient failures.
pub trait Backoff: Send + Sync + fmt::Debug {
    /// The delay after `failures` counted failures (1 for the first).
    fn delay(&self, failures: u32) -> Duration;
}

/// `base · 2^(failures−1)`, capped at `max`, then scaled by a random factor in `1 ± jitter`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExponentialBackoff {
    /// The first delay.
    pub base: Duration,
    /// The longest delay.
    pub max: Duration,
    /// Relative jitter in `[0, 1)`; 0 makes the policy deterministic.
    pub jitter: f64,
}

impl Default for ExponentialBackoff {
    fn default() -> Self {
        Self {
            base: DEFAULT_BACKOFF_BASE,
            max: DEFAULT_BACKOFF_MAX,
            jitter: DEFAULT_JITTER,
        }
    }
}

impl Backoff for ExponentialBackoff {
    fn delay(&self, failures: u32) -> Duration {
        let exponent = failures.saturating_sub(1);
        let raw = 2u32
            .checked_pow(exponent)
            .and_then(|factor| self.base.checked_mul(factor))
            .unwrap_or(self.max)
            .min(self.max);
        jittered(raw, self.jitter).min(self.max)
    }
}

/// Scales `d` by a random factor in `1 ± jitter` (no change when `jitter` is 0).
fn jittered(d: Duration, jitter: f64) -> Duration {
    let jitter = jitter.clamp(0.0, 0.99);
    if jitter == 0.0 {
        return d;
    }
    d.mul_f64(1.0 + jitter * (2.0 * fastrand::f64() - 1.0))
}

/// A global limit on how fast reconciles start: a token bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Tokens added per second (at least 1).
    pub per_second: u32,
    /// The bucket size: how many starts may happen at once after a quiet period (at least 1).
    pub burst: u32,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            per_second: DEFAULT_RATE_PER_SECOND,
            burst: DEFAULT_RATE_BURST,
        }
    }
}

/// How the queue schedules retries, resyncs and starts.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// The retry policy for transient failures.
    pub backoff: Arc<dyn Backoff>,
    /// How often each known key is reconciled without a trigger.
    pub resync_period: Duration,
    /// Relative jitter of the resync period, in `[0, 1)`.
    pub resync_jitter: f64,
    /// The global start rate; `None` starts reconciles as fast as the runner allows.
    pub rate_limit: Option<RateLimit>,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            backoff: Arc::new(ExponentialBackoff::default()),
            resync_period: DEFAULT_RESYNC_PERIOD,
            resync_jitter: DEFAULT_JITTER,
            rate_limit: Some(RateLimit::default()),
        }
    }
}

/// What the queue knows about one key, for the status API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyStatus {
    /// A reconcile of the key is running.
    pub running: bool,
    /// When the key runs next (it may be due already); `None` when it is not scheduled.
    pub next_due: Option<Instant>,
    /// Consecutive counted transient failures (the backoff exponent).
    pub failures: u32,
    /// A terminal error stopped retries until the spec changes.
    pub stalled: bool,
}

/// The answer of [`Scheduler::pop_due`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pop {
    /// Start this key now; it is marked running until [`Scheduler::finish`].
    Ready {
        /// The key to reconcile.
        key: ObjectKey,
        /// How long it waited since it became due.
        waited: Duration,
    },
    /// Nothing may start now. Look again at `wake_at`, or when a reconcile finishes or a key is added.
    Idle {
        /// When something becomes due or a rate token becomes free, if anything is scheduled.
        wake_at: Option<Instant>,
    },
}

/// What [`Scheduler::finish`] scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    /// The delay of the retry or requeue the result asked for (`None` after success or a terminal error).
    pub retry_after: Option<Duration>,
}

/// The position of a queued key: due time, then insertion order.
type Slot = (Instant, u64);

/// A run in progress.
#[derive(Debug, Clone, Copy)]
struct Run {
    started: Instant,
    generation: u64,
}

#[derive(Debug, Default)]
struct KeyState {
    /// Where the key sits in its kind's queue, if queued.
    slot: Option<Slot>,
    run: Option<Run>,
    failures: u32,
    /// When the pending backoff retry is due; a failure counts only if the run started at or after it.
    retry_due: Option<Instant>,
    stalled: bool,
    /// `forget` was called while running: drop the state when the run ends.
    forget_on_finish: bool,
    /// Bumped by every spec change, to tell whether a terminal error is about the current spec.
    generation: u64,
}

/// The pure scheduling core of the work queue. See the module docs for the semantics.
#[derive(Debug)]
pub struct Scheduler {
    config: QueueConfig,
    keys: HashMap<ObjectKey, KeyState>,
    /// Queued keys per kind, ordered by due time then insertion.
    queues: BTreeMap<Kind, BTreeMap<Slot, ObjectKey>>,
    bucket: Option<TokenBucket>,
    next_seq: u64,
}

impl Scheduler {
    /// An empty queue; `now` starts the token bucket full.
    pub fn new(config: QueueConfig, now: Instant) -> Self {
        let bucket = config
            .rate_limit
            .map(|limit| TokenBucket::new(f64::from(limit.per_second.max(1)), f64::from(limit.burst), now));
        Self {
            config,
            keys: HashMap::new(),
            queues: BTreeMap::new(),
            bucket,
            next_seq: 0,
        }
    }

    /// Asks for `key` to run at `at` (or earlier, if it is already due earlier). Returns `false` when the
    /// key is stalled by a terminal error and the request was ignored.
    pub fn enqueue(&mut self, key: ObjectKey, at: Instant) -> bool {
        let state = self.keys.entry(key.clone()).or_default();
        if state.stalled {
            return false;
        }
        state.forget_on_finish = false;
        self.schedule(&key, at);
        true
    }

    /// The key's spec changed: resets its backoff, lifts a stall and schedules it at `now`.
    pub fn spec_changed(&mut self, key: ObjectKey, now: Instant) {
        let state = self.keys.entry(key.clone()).or_default();
        state.generation += 1;
        state.failures = 0;
        state.retry_due = None;
        state.stalled = false;
        state.forget_on_finish = false;
        self.schedule(&key, now);
    }

    /// Drops everything known about `key` (its object is gone and its cleanup succeeded). A running
    /// reconcile finishes, and its result is ignored.
    pub fn forget(&mut self, key: &ObjectKey) {
        self.unqueue(key);
        match self.keys.get_mut(key) {
            Some(state) if state.run.is_some() => {
                *state = KeyState {
                    run: state.run,
                    forget_on_finish: true,
                    generation: state.generation,
                    ..KeyState::default()
                };
            }
            Some(_) => {
                self.keys.remove(key);
            }
            None => {}
        }
    }

    /// Takes a due key that is not running and whose kind `may_start`, spending a rate token: the earliest
    /// of the first kind in dependency order (RuntimeEnvironment, Application, Deployment) that has one.
    /// Dependencies go first so that a cold start finds them Ready when their dependents run, instead of
    /// reconciling every dependent once to wait and once more when woken.
    pub fn pop_due(&mut self, now: Instant, mut may_start: impl FnMut(Kind) -> bool) -> Pop {
        let mut best: Option<(Slot, &ObjectKey)> = None;
        for (kind, queue) in &self.queues {
            if !may_start(*kind) {
                continue;
            }
            let candidate = queue
                .range(..=(now, u64::MAX))
                .find(|(_, key)| self.keys.get(*key).is_none_or(|s| s.run.is_none()));
            if let Some((slot, key)) = candidate {
                best = Some((*slot, key));
                break;
            }
        }
        let Some((slot, key)) = best else {
            return Pop::Idle {
                wake_at: self.next_due_after(now),
            };
        };
        let key = key.clone();
        if let Some(bucket) = &mut self.bucket
            && let Err(at) = bucket.try_take(now)
        {
            return Pop::Idle { wake_at: Some(at) };
        }
        self.unqueue(&key);
        let state = self.keys.entry(key.clone()).or_default();
        state.run = Some(Run {
            started: now,
            generation: state.generation,
        });
        Pop::Ready {
            key,
            waited: now.saturating_duration_since(slot.0),
        }
    }

    /// Records the result of the run of `key` that ended at `now` and schedules its next run.
    pub fn finish(
        &mut self,
        key: &ObjectKey,
        result: &Result<Action, ReconcileError>,
        now: Instant,
    ) -> Finished {
        let none = Finished { retry_after: None };
        let Some(state) = self.keys.get_mut(key) else {
            return none;
        };
        let Some(run) = state.run.take() else {
            return none;
        };
        if state.forget_on_finish {
            self.keys.remove(key);
            return none;
        }
        let retry_after = match result {
            Ok(Action::Requeue(delay)) => {
                state.failures = 0;
                state.retry_due = None;
                Some(*delay)
            }
            Ok(Action::AwaitChange) => {
                state.failures = 0;
                state.retry_due = None;
                None
            }
            Err(ReconcileError::Transient { .. }) => {
                // Count the failure only if this run was not a trigger that pre-empted the backoff.
                if state.retry_due.is_none_or(|due| run.started >= due) {
                    state.failures = state.failures.saturating_add(1);
                }
                let delay = self
                    .config
                    .backoff
                    .delay(state.failures.max(1))
                    .min(MAX_SCHEDULE_DELAY);
                state.retry_due = Some(now + delay);
                Some(delay)
            }
            Err(ReconcileError::Waiting { retry_after, .. }) => {
                state.retry_due = None;
                Some(*retry_after)
            }
            Err(ReconcileError::Terminal { .. }) => {
                state.retry_due = None;
                if run.generation == state.generation {
                    state.stalled = true;
                    self.unqueue(key);
                }
                // Otherwise the spec changed during the run: its pending request stands.
                return none;
            }
        };
        let resync = jittered(self.config.resync_period, self.config.resync_jitter);
        let delay = retry_after
            .map_or(resync, |d| d.min(resync))
            .min(MAX_SCHEDULE_DELAY);
        self.schedule(key, now + delay);
        Finished { retry_after }
    }

    /// What the queue knows about `key`, if anything.
    pub fn status(&self, key: &ObjectKey) -> Option<KeyStatus> {
        self.keys.get(key).map(|state| KeyStatus {
            running: state.run.is_some(),
            next_due: state.slot.map(|(at, _)| at),
            failures: state.failures,
            stalled: state.stalled,
        })
    }

    /// How many keys of `kind` are due at `now` (including ones held because they are running).
    pub fn depth(&self, kind: Kind, now: Instant) -> usize {
        self.queues
            .get(&kind)
            .map_or(0, |queue| queue.range(..=(now, u64::MAX)).count())
    }

    /// How many keys the queue knows (queued, running or stalled).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the queue knows no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Queues `key` at `at` unless it is queued earlier already (earliest wins).
    fn schedule(&mut self, key: &ObjectKey, at: Instant) {
        let Some(state) = self.keys.get_mut(key) else {
            return;
        };
        if let Some((current, _)) = state.slot
            && current <= at
        {
            return;
        }
        let slot = (at, self.next_seq);
        self.next_seq += 1;
        let queue = self.queues.entry(key.kind).or_default();
        if let Some(old) = state.slot.replace(slot) {
            queue.remove(&old);
        }
        queue.insert(slot, key.clone());
    }

    /// Removes `key` from its queue, if queued.
    fn unqueue(&mut self, key: &ObjectKey) {
        if let Some(slot) = self.keys.get_mut(key).and_then(|state| state.slot.take())
            && let Some(queue) = self.queues.get_mut(&key.kind)
        {
            queue.remove(&slot);
        }
    }

    /// The earliest due time strictly after `now`.
    fn next_due_after(&self, now: Instant) -> Option<Instant> {
        self.queues
            .values()
            .filter_map(|queue| {
                queue
                    .range((Bound::Excluded((now, u64::MAX)), Bound::Unbounded))
                    .next()
                    .map(|((at, _), _)| *at)
            })
            .min()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    /// Shared with the runner's tests.
    pub(crate) fn key(name: &str) -> ObjectKey {
        ObjectKey::new(Kind::Deployment, name)
    }

    /// Shared with the runner's tests.
    pub(crate) fn transient() -> Result<Action, ReconcileError> {
        Err(ReconcileError::Transient {
            reason: "Test",
            message: "try again".to_owned(),
        })
    }

    /// Shared with the runner's tests.
    pub(crate) fn terminal() -> Result<Action, ReconcileError> {
        Err(ReconcileError::Terminal {
            reason: "Test",
            message: "cannot work".to_owned(),
        })
    }

    /// A queue without jitter or rate limit: 1 s doubling to 5 min, resync every 10 min.
    fn scheduler(now: Instant) -> Scheduler {
        Scheduler::new(
            QueueConfig {
                backoff: Arc::new(ExponentialBackoff {
                    jitter: 0.0,
                    ..ExponentialBackoff::default()
                }),
                resync_jitter: 0.0,
                rate_limit: None,
                ..QueueConfig::default()
            },
            now,
        )
    }

    fn pop(s: &mut Scheduler, now: Instant) -> Option<ObjectKey> {
        match s.pop_due(now, |_| true) {
            Pop::Ready { key, .. } => Some(key),
            Pop::Idle { .. } => None,
        }
    }

    /// Pops `k` at `now` and finishes it with `result` at the same instant; returns its next due time.
    fn run(
        s: &mut Scheduler,
        k: &ObjectKey,
        now: Instant,
        result: Result<Action, ReconcileError>,
    ) -> Instant {
        assert_eq!(pop(s, now).as_ref(), Some(k), "{k} is due at {now:?}");
        let _ = s.finish(k, &result, now);
        s.status(k)
            .and_then(|st| st.next_due)
            .unwrap_or(now + MAX_SCHEDULE_DELAY)
    }

    #[test]
    fn a_key_enqueued_twice_is_handed_out_once() {
        let t0 = Instant::now();
        let mut s = scheduler(t0);
        s.enqueue(key("a"), t0);
        s.enqueue(key("a"), t0);
        assert_eq!(s.depth(Kind::Deployment, t0), 1);
        assert_eq!(pop(&mut s, t0), Some(key("a")));
        assert_eq!(pop(&mut s, t0), None);
    }

    #[test]
    fn the_earliest_due_time_wins_and_a_later_request_does_not_delay_it() {
        let t0 = Instant::now();
        let mut s = scheduler(t0);
        s.enqueue(key("a"), t0 + 10 * SECOND);
        s.enqueue(key("a"), t0 + SECOND);
        s.enqueue(key("a"), t0 + 5 * SECOND);
        assert_eq!(s.status(&key("a")).and_then(|st| st.next_due), Some(t0 + SECOND));
        assert_eq!(pop(&mut s, t0), None);
        assert_eq!(
            s.pop_due(t0, |_| true),
            Pop::Idle {
                wake_at: Some(t0 + SECOND)
            }
        );
        assert_eq!(pop(&mut s, t0 + SECOND), Some(key("a")));
        assert_eq!(
            pop(&mut s, t0 + 10 * SECOND),
            None,
            "it ran once, not again at +10 s"
        );
    }

    #[test]
    fn due_dependencies_come_out_before_due_deployments_each_kind_in_due_order() {
        let t0 = Instant::now();
        let mut s = scheduler(t0);
        let app = |n: &str| ObjectKey::new(Kind::Application, n);
        let env = ObjectKey::new(Kind::RuntimeEnvironment, "env");
        s.enqueue(key("early"), t0);
        s.enqueue(key("late"), t0 + 2 * SECOND);
        s.enqueue(app("second"), t0 + 2 * SECOND);
        s.enqueue(app("first"), t0 + SECOND);
        s.enqueue(env.clone(), t0 + 3 * SECOND);
        s.enqueue(app("not-yet"), t0 + 10 * SECOND);
        let now = t0 + 3 * SECOND;
        assert_eq!(pop(&mut s, now), Some(env));
        assert_eq!(pop(&mut s, now), Some(app("first")));
        assert_eq!(pop(&mut s, now), Some(app("second")));
        assert_eq!(
            pop(&mut s, now),
            Some(key("early")),
            "a key not yet due does not hold others"
        );
        assert_eq!(pop(&mut s, now), Some(key("late")));
        assert_eq!(pop(&mut s, now), None);
    }

    #[test]
    fn a_running_key_is_held_and_runs_once_after_it_finishes() {
        let t0 = Instant::now();
        let mut s = scheduler(t0);
        s.enqueue(key("a"), t0);
        assert_eq!(pop(&mut s, t0), Some(key("a")));
        s.enqueue(key("a"), t0);
        s.enqueue(key("a"), t0);
        assert_eq!(pop(&mut s, t0), None, "never handed out while running");
        let _ = s.finish(&key("a"), &Ok(Action::AwaitChange), t0 + SECOND);
        assert_eq!(
            pop(&mut s, t0 + SECOND),
            Some(key("a")),
            "the request made while running stands"
        );
        let _ = s.finish(&key("a"), &Ok(Action::AwaitChange), t0 + SECOND);
        assert_eq!(pop(&mut s, t0 + 2 * SECOND), None, "and only once");
    }

    #[test]
    fn a_kind_that_may_not_start_is_skipped_but_others_are_not() {
        let t0 = Instant::now();
        let mut s = scheduler(t0);
        let app = ObjectKey::new(Kind::Application, "app");
        s.enqueue(key("a"), t0);
        s.enqueue(app.clone(), t0 + SECOND);
        let popped = s.pop_due(t0 + SECOND, |kind| kind != Kind::Deployment);
        assert_eq!(
            popped,
            Pop::Ready {
                key: app,
                waited: Duration::ZERO
            }
        );
        assert_eq!(pop(&mut s, t0 + SECOND), Some(key("a")));
    }

    #[test]
    fn the_exponential_backoff_doubles_from_one_second_up_to_five_minutes() {
        let backoff = ExponentialBackoff {
            jitter: 0.0,
            ..ExponentialBackoff::default()
        };
        let delays: Vec<u64> = (1..=10).map(|n| backoff.delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]);
        assert_eq!(backoff.delay(u32::MAX), DEFAULT_BACKOFF_MAX, "no overflow");
    }

    #[test]
    fn backoff_jitter_stays_within_ten_percent() {
        let backoff = ExponentialBackoff::default();
        let delays: Vec<Duration> = (0..200).map(|_| backoff.delay(4)).collect();
        assert!(
            delays.iter().all(|d| (7.2..=8.8).contains(&d.as_secs_f64())),
            "{delays:?}"
        );
        assert!(delays.iter().any(|d| *d != delays[0]), "jitter varies the delay");
    }

    #[test]
    fn transient_failures_grow_the_backoff_and_success_resets_it() {
        let t0 = Instant::now();
        let mut s = scheduler(t0);
        let a = key("a");
        s.enqueue(a.clone(), t0);
        let t1 = run(&mut s, &a, t0, transient());
        assert_eq!(t1, t0 + SECOND);
        let t2 = run(&mut s, &a, t1, transient());
        assert_eq!(t2, t1 + 2 * SECOND);
        let t3 = run(&mut s, &a, t2, transient());
        assert_eq!(t3, t2 + 4 * SECOND);
        assert_eq!(s.status(&a).map(|st| st.failures), Some(3));

        let t4 = run(&mut s, &a, t3, Ok(Action::AwaitChange));
        assert_eq!(s.status(&a).map(|st| st.failures), Some(0));
        assert_eq!(t4, t3 + DEFAULT_RESYNC_PERIOD, "success waits for the resync");
        let t5 = run(&mut s, &a, t4, transient());
        assert_eq!(t5, t4 + SECOND, "the backoff starts over");
    }

    #[test]
    fn a_trigger_that_preempts_the_backoff_does_not_grow_it() {
        let t0 = Instant::now();
        let mut s = scheduler(t0);
        let a = key("a");
        s.enqueue(a.clone(), t0);
        let t1 = run(&mut s, &a, t0, transient());
        let t2 = run(&mut s, &a, t1, transient());
        assert_eq!(s.status(&a).map(|st| st.failures), Some(2));
        assert_eq!(t2, t1 + 2 * SECOND);

        // Re-added while waiting: no effect on the exponent.
        s.enqueue(a.clone(), t2);
        assert_eq!(s.status(&a).map(|st| st.failures), Some(2));
        // Triggered early (before the backoff ran out) and failing again: still no growth.
        let early = t1 + SECOND;
        s.enqueue(a.clone(), early);
        let t3 = run(&mut s, &a, early, transient());
        assert_eq!(s.status(&a).map(|st| st.failures), Some(2));
        assert_eq!(t3, early + 2 * SECOND);
        // The retry that ran after its backoff counts.
        let t4 = run(&mut s, &a, t3, transient());
        assert_eq!(s.status(&a).map(|st| st.failures), Some(3));
        assert_eq!(t4, t3 + 4 * SECOND);
    }

    #[test]
    fn a_spec_change_resets_the_backoff_and_runs_now() {
        let t0 = Instant::now();
        let mut s = scheduler(t0);
        let a = key("a");
        s.enqueue(a.clone(), t0);
        let t1 = run(&mut s, &a, t0, transient());
        let _ = run(&mut s, &a, t1, transient());
        let now = t1 + SECOND;
        s.spec_changed(a.clone(), now);
        assert_eq!(
            s.status(&a),
            Some(KeyStatus {
                running: false,
                next_due: Some(now),
                failures: 0,
                stalled: false
            })
        );
        let next = run(&mut s, &a, now, transient());
        assert_eq!(next, now + SECOND);
    }

    #[test]
    fn waiting_retries_after_its_delay_without_growing_the_backoff() {
        let t0 = Instant::now();
        let mut s = scheduler(t0);
        let a = key("a");
        s.enqueue(a.clone(), t0);
        let t1 = run(&mut s, &a, t0, transient());
        let waiting = Err(ReconcileError::Waiting {
            reason: "DependencyNotReady",
            message: "waiting".to_owned(),
            retry_after: 30 * SECOND,
        });
        let t2 = run(&mut s, &a, t1, waiting.clone());
        assert_eq!(t2, t1 + 30 * SECOND);
        let t3 = run(&mut s, &a, t2, waiting);
        assert_eq!(t3, t2 + 30 * SECOND);
        assert_eq!(s.status(&a).map(|st| st.failures), Some(1));
    }

    #[test]
    fn requeue_runs_after_its_delay_but_never_later_than_the_resync() {
        let t0 = Instant::now();
        let mut s = scheduler(t0);
        let a = key("a");
        s.enqueue(a.clone(), t0);
        let t1 = run(&mut s, &a, t0, Ok(Action::Requeue(5 * SECOND)));
        assert_eq!(t1, t0 + 5 * SECOND);
        let t2 = run(&mut s, &a, t1, Ok(Action::Requeue(24 * 60 * 60 * SECOND)));
        assert_eq!(t2, t1 + DEFAULT_RESYNC_PERIOD);
    }

    #[test]
    fn every_known_key_is_resynced_and_resync_jitter_spreads_them() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(
            QueueConfig {
                rate_limit: None,
                ..QueueConfig::default()
            },
            t0,
        );
        let keys: Vec<ObjectKey> = (0..50).map(|i| key(&format!("k{i}"))).collect();
        for k in &keys {
            s.enqueue(k.clone(), t0);
        }
        for k in &keys {
            assert_eq!(pop(&mut s, t0).as_ref(), Some(k));
            let _ = s.finish(k, &Ok(Action::AwaitChange), t0);
        }
        let dues: Vec<Instant> = keys.iter().filter_map(|k| s.status(k)?.next_due).collect();
        assert_eq!(dues.len(), 50, "every key is scheduled for a resync");
        let lo = t0 + DEFAULT_RESYNC_PERIOD.mul_f64(0.9);
        let hi = t0 + DEFAULT_RESYNC_PERIOD.mul_f64(1.1);
        assert!(dues.iter().all(|d| (lo..=hi).contains(d)));
        assert!(dues.iter().any(|d| *d != dues[0]), "jittered");
        assert_eq!(s.depth(Kind::Deployment, hi), 50);
    }

    #[test]
    fn a_terminal_error_stalls_the_key_until_its_spec_changes() {
        let t0 = Instant::now();
        let mut s = scheduler(t0);
        let a = key("a");
        s.enqueue(a.clone(), t0);
        assert_eq!(pop(&mut s, t0), Some(a.clone()));
        let finished = s.finish(&a, &terminal(), t0);
        assert_eq!(finished.retry_after, None);
        let status = s.status(&a);
        assert_eq!(status.map(|st| (st.stalled, st.next_due)), Some((true, None)));

        assert!(!s.enqueue(a.clone(), t0), "triggers are ignored while stalled");
        assert_eq!(
            pop(&mut s, t0 + 10 * DEFAULT_RESYNC_PERIOD),
            None,
            "no resync either"
        );

        s.spec_changed(a.clone(), t0 + SECOND);
        assert_eq!(pop(&mut s, t0 + SECOND), Some(a));
    }

    #[test]
    fn a_terminal_error_about_an_older_spec_does_not_stall() {
        let t0 = Instant::now();
        let mut s = scheduler(t0);
        let a = key("a");
        s.enqueue(a.clone(), t0);
        assert_eq!(pop(&mut s, t0), Some(a.clone()));
        s.spec_changed(a.clone(), t0 + SECOND);
        let _ = s.finish(&a, &terminal(), t0 + 2 * SECOND);
        assert_eq!(s.status(&a).map(|st| st.stalled), Some(false));
        assert_eq!(pop(&mut s, t0 + 2 * SECOND), Some(a), "the new spec runs");
    }

    #[test]
    fn forget_drops_the_key_and_a_running_key_is_dropped_when_it_finishes() {
        let t0 = Instant::now();
        let mut s = scheduler(t0);
        s.enqueue(key("idle"), t0 + SECOND);
        s.enqueue(key("busy"), t0);
        assert_eq!(pop(&mut s, t0), Some(key("busy")));

        s.forget(&key("idle"));
        assert_eq!(s.status(&key("idle")), None);
        s.forget(&key("busy"));
        assert_eq!(
            s.status(&key("busy")).map(|st| st.running),
            Some(true),
            "still running"
        );
        let _ = s.finish(&key("busy"), &Ok(Action::Requeue(SECOND)), t0);
        assert_eq!(s.status(&key("busy")), None, "its result is ignored");
        assert!(s.is_empty());
        assert_eq!(pop(&mut s, t0 + DEFAULT_RESYNC_PERIOD * 2), None);
    }

    #[test]
    fn the_token_bucket_allows_the_burst_then_paces_starts() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(
            QueueConfig {
                rate_limit: Some(RateLimit {
                    per_second: 10,
                    burst: 3,
                }),
                ..QueueConfig::default()
            },
            t0,
        );
        for i in 0..5 {
            s.enqueue(key(&format!("k{i}")), t0);
        }
        for _ in 0..3 {
            assert!(pop(&mut s, t0).is_some());
        }
        let wait = s.pop_due(t0, |_| true);
        assert_eq!(
            wait,
            Pop::Idle {
                wake_at: Some(t0 + Duration::from_millis(100))
            }
        );
        assert_eq!(pop(&mut s, t0 + Duration::from_millis(99)), None);
        assert!(pop(&mut s, t0 + Duration::from_millis(100)).is_some());
        assert_eq!(pop(&mut s, t0 + Duration::from_millis(150)), None);
        assert!(pop(&mut s, t0 + Duration::from_millis(200)).is_some());
    }
}
