//! When to look again at a Proxmox task or a booting guest: durations learned per environment, so that
//! polls land when the work is likely done instead of on a fixed backoff.
//!
//! Each kind of work (a clone, a resize, a start, a guest's boot until its agent answers, …) has an
//! estimate: what was seen of it in this environment (a moving average), or, before that, the
//! real-world figure (the latency model in `testbed/README.md`) times the pace seen on other kinds of
//! work. With no estimate at all the first polls back off from 20 ms. A poll is planned at the
//! estimated end, then at short, growing intervals. A wait longer than [`INLINE_WAIT`] is not spent
//! holding a reconcile: the caller returns and is woken when the next poll is due.
//!
//! A look that comes later than planned (its reconcile waited for a runner slot or a request token)
//! proves only that the work ended by the planned time, never that it took until the look: learning
//! the late look's time would count the controller's own queueing as the cluster's slowness, and the
//! inflated estimate would put the next polls later still (a feedback loop that, at 100 VMs, once
//! scheduled agent polls 80–100 s out for 20-s boots). Nor is it a sign that the work was shorter:
//! such a look teaches nothing, except that work seen running before took at least that long.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

// tokio's clock: the same as std's, except under a paused test clock, where waits are exact.
use tokio::time::Instant;

/// Waits up to this long in all happen inside the reconcile; longer ones end it with a wake-up time.
pub const INLINE_WAIT: Duration = Duration::from_millis(400);
/// The first poll of work with no estimate, doubled after each.
const FIRST_POLL: Duration = Duration::from_millis(20);
/// The longest gap between two polls of a task.
const MAX_TASK_GAP: Duration = Duration::from_secs(2);
/// The longest gap between two polls of a guest agent.
const MAX_AGENT_GAP: Duration = Duration::from_secs(5);
/// Weight of a new observation in an estimate.
const ALPHA: f64 = 0.3;
/// How much later than planned a look may come and still count as on time (a poll's own request, a
/// moment in the queue).
const LATE_SLACK: Duration = Duration::from_millis(100);
/// Watches older than this are dropped (their task or VM was given up on).
const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// A kind of work the controller waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Work {
    /// A linked clone (`qmclone`).
    Clone,
    /// A config task (`qmconfig`).
    Config,
    /// A disk resize (`resize`).
    Resize,
    /// A start (`qmstart`).
    Start,
    /// A stop or shutdown (`qmstop`, `qmshutdown`).
    Stop,
    /// A destroy (`qmdestroy`).
    Destroy,
    /// From a guest's start until its agent reports an address.
    Boot,
    /// Any other task.
    Other,
}

impl Work {
    /// The kind of a task from its UPID type (`qmclone`, …).
    pub fn of_task(kind: &str) -> Self {
        match kind {
            "qmclone" => Self::Clone,
            "qmconfig" => Self::Config,
            "resize" => Self::Resize,
            "qmstart" => Self::Start,
            "qmstop" | "qmshutdown" => Self::Stop,
            "qmdestroy" => Self::Destroy,
            _ => Self::Other,
        }
    }

    /// The real-world duration (scale 1 of the latency model).
    fn model(self) -> Option<Duration> {
        Some(match self {
            Self::Clone => Duration::from_secs(3),
            Self::Config => Duration::from_millis(300),
            Self::Resize | Self::Stop => Duration::from_secs(1),
            Self::Start | Self::Destroy => Duration::from_secs(2),
            Self::Boot => Duration::from_secs(20),
            Self::Other => return None,
        })
    }
}

/// What is known of one wait in progress.
#[derive(Debug, Clone, Copy)]
struct Watch {
    work: Work,
    started: Instant,
    /// When it was last seen not done (time since `started`).
    last_pending: Option<Duration>,
    /// When the next look was planned (time since `started`), as last given out.
    planned: Option<Duration>,
    /// Polls after the estimated end so far.
    late_polls: u32,
}

#[derive(Debug, Default)]
struct State {
    learned: HashMap<Work, f64>,
    /// Observed / modelled duration, over every kind of work.
    pace: Option<f64>,
    tasks: HashMap<String, Watch>,
    boots: HashMap<u32, Watch>,
}

/// The estimates and waits of one environment.
#[derive(Debug, Default)]
pub struct Pace {
    state: Mutex<State>,
}

impl State {
    fn estimate(&self, work: Work) -> Option<Duration> {
        if let Some(secs) = self.learned.get(&work) {
            return Some(Duration::from_secs_f64(*secs));
        }
        Some(work.model()?.mul_f64(self.pace?))
    }

    fn learn(&mut self, watch: &Watch, done_at: Duration) {
        let late = watch
            .planned
            .is_some_and(|planned| done_at > planned + planned.mul_f64(0.1).max(LATE_SLACK));
        let sample = match (watch.last_pending, late) {
            // Done somewhere between the last look that saw it pending and this one.
            (Some(pending), false) => (pending + done_at) / 2,
            (None, false) => done_at.mul_f64(0.8),
            // A late look proves only that the work ended by the planned time (see the module docs):
            // all that is certain is that it took longer than when it was last seen running.
            (Some(pending), true) if self.estimate(watch.work).is_none_or(|e| e < pending) => pending,
            (_, true) => return,
        }
        .as_secs_f64();
        let learned = self.learned.entry(watch.work).or_insert(sample);
        *learned = *learned * (1.0 - ALPHA) + sample * ALPHA;
        if let Some(model) = watch.work.model() {
            let ratio = sample / model.as_secs_f64();
            let pace = self.pace.get_or_insert(ratio);
            *pace = *pace * (1.0 - ALPHA) + ratio * ALPHA;
        }
    }

    /// How long from now until `watch` should be looked at; the planned time is kept on the watch.
    fn next(&self, watch: &mut Watch, max_gap: Duration) -> Duration {
        let elapsed = watch.started.elapsed();
        let due = match self.estimate(watch.work) {
            // At the estimated end (at once when that has passed), then at growing short intervals
            // after each look that found it not done.
            Some(estimate) => match watch.last_pending {
                Some(pending) if pending >= estimate => {
                    let gap = estimate.mul_f64(0.1).max(FIRST_POLL)
                        * 2u32.saturating_pow(watch.late_polls.saturating_sub(1));
                    pending + gap.min(max_gap)
                }
                _ => estimate,
            },
            None => match watch.last_pending {
                None => FIRST_POLL,
                Some(p) => p + p.max(FIRST_POLL).min(max_gap),
            },
        };
        watch.planned = Some(due);
        due.saturating_sub(elapsed)
    }

    fn prune(&mut self) {
        self.tasks.retain(|_, w| w.started.elapsed() < FORGET_AFTER);
        self.boots.retain(|_, w| w.started.elapsed() < FORGET_AFTER);
    }
}

impl Pace {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The estimated duration of `work`, if anything is known.
    pub fn estimate(&self, work: Work) -> Option<Duration> {
        self.state().estimate(work)
    }

    /// A task was started just now.
    pub fn task_started(&self, upid: &str, work: Work) {
        let mut s = self.state();
        s.prune();
        s.tasks.insert(
            upid.to_owned(),
            Watch {
                work,
                started: Instant::now(),
                last_pending: None,
                planned: None,
                late_polls: 0,
            },
        );
    }

    /// How long until the task should be polled; `None` for a task not watched (started before this
    /// process looked: it may have ended long ago, so poll now).
    pub fn next_task_poll(&self, upid: &str) -> Option<Duration> {
        let mut s = self.state();
        let mut watch = *s.tasks.get(upid)?;
        let next = s.next(&mut watch, MAX_TASK_GAP);
        s.tasks.insert(upid.to_owned(), watch);
        Some(next)
    }

    /// The task was seen running.
    pub fn task_pending(&self, upid: &str) {
        let mut s = self.state();
        let estimate = s.tasks.get(upid).and_then(|w| s.estimate(w.work));
        if let Some(w) = s.tasks.get_mut(upid) {
            w.pending(estimate);
        }
    }

    /// The task was seen stopped: learn from it. Returns how long ago it had ended at the latest (more
    /// than zero when this look came later than planned; a start's boot is watched from then).
    pub fn task_done(&self, upid: &str) -> Duration {
        let mut s = self.state();
        let Some(w) = s.tasks.remove(upid) else {
            return Duration::ZERO;
        };
        let elapsed = w.started.elapsed();
        s.learn(&w, elapsed);
        elapsed.saturating_sub(w.done_by(elapsed))
    }

    /// The guest of `vmid` started `ago` (zero: just now); its agent is awaited.
    pub fn boot_started(&self, vmid: u32, ago: Duration) {
        let mut s = self.state();
        s.prune();
        let started = Instant::now().checked_sub(ago).unwrap_or_else(Instant::now);
        s.boots.insert(
            vmid,
            Watch {
                work: Work::Boot,
                started,
                last_pending: None,
                planned: None,
                late_polls: 0,
            },
        );
    }

    /// Whether a boot of `vmid` is being watched.
    pub fn watching_boot(&self, vmid: u32) -> bool {
        self.state().boots.contains_key(&vmid)
    }

    /// How long until the agent of `vmid` should be asked (zero when its boot is not watched).
    pub fn next_agent_poll(&self, vmid: u32) -> Duration {
        let mut s = self.state();
        let Some(mut watch) = s.boots.get(&vmid).copied() else {
            return Duration::ZERO;
        };
        let next = s.next(&mut watch, MAX_AGENT_GAP);
        s.boots.insert(vmid, watch);
        next
    }

    /// The agent of `vmid` did not answer yet.
    pub fn agent_pending(&self, vmid: u32) {
        let mut s = self.state();
        let estimate = s.estimate(Work::Boot);
        if let Some(w) = s.boots.get_mut(&vmid) {
            w.pending(estimate);
        }
    }

    /// The agent of `vmid` answered: learn how long the boot took (only from boots seen from their start).
    pub fn agent_ready(&self, vmid: u32) {
        let mut s = self.state();
        if let Some(w) = s.boots.remove(&vmid) {
            let elapsed = w.started.elapsed();
            s.learn(&w, elapsed);
        }
    }
}

impl Watch {
    /// When the work had ended at the latest, seen done at `done_at`: a look later than planned proves
    /// only that it ended by the planned time.
    fn done_by(&self, done_at: Duration) -> Duration {
        self.planned.map_or(done_at, |planned| {
            done_at.min(planned.max(self.last_pending.unwrap_or_default()))
        })
    }

    /// Seen not done now; a look at or after the estimated end counts as a late poll.
    fn pending(&mut self, estimate: Option<Duration>) {
        let elapsed = self.started.elapsed();
        if estimate.is_none_or(|e| elapsed >= e) {
            self.late_polls += 1;
        }
        self.last_pending = Some(elapsed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_any_estimate_the_first_polls_back_off_from_twenty_milliseconds() {
        let pace = Pace::default();
        pace.task_started("UPID:a", Work::Clone);
        assert!(pace.next_task_poll("UPID:a").unwrap() <= FIRST_POLL);
        assert_eq!(pace.next_task_poll("UPID:unknown"), None);
    }

    #[test]
    fn a_learned_duration_puts_the_first_poll_at_the_expected_end() {
        let pace = Pace::default();
        {
            let mut s = pace.state();
            s.learned.insert(Work::Clone, 3.0);
        }
        pace.task_started("UPID:b", Work::Clone);
        let next = pace.next_task_poll("UPID:b").unwrap();
        assert!(
            next > Duration::from_millis(2900) && next <= Duration::from_secs(3),
            "{next:?}"
        );
    }

    #[test]
    fn the_pace_seen_on_tasks_predicts_a_boot_not_seen_yet() {
        let pace = Pace::default();
        let watch = Watch {
            work: Work::Clone,
            started: Instant::now(),
            last_pending: Some(Duration::from_millis(25)),
            planned: None,
            late_polls: 0,
        };
        // A clone of about 30 ms: a tenth of a millisecond per modelled second of 3 s, so 0.01 pace.
        pace.state().learn(&watch, Duration::from_millis(35));
        let boot = pace.estimate(Work::Boot).unwrap();
        assert!(
            boot > Duration::from_millis(150) && boot < Duration::from_millis(250),
            "{boot:?}"
        );
    }

    #[test]
    fn work_whose_expected_end_passed_unseen_is_polled_at_once() {
        let pace = Pace::default();
        pace.state().learned.insert(Work::Boot, 4.0);
        pace.boot_started(7, Duration::from_secs(10));
        assert_eq!(pace.next_agent_poll(7), Duration::ZERO);
        pace.agent_pending(7);
        let next = pace.next_agent_poll(7);
        assert!(
            next > Duration::ZERO && next <= Duration::from_millis(400),
            "{next:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_look_later_than_planned_that_finds_the_work_done_does_not_lengthen_the_estimates() {
        let pace = Pace::default();
        pace.state().learned.insert(Work::Resize, 1.0);
        pace.state().pace = Some(1.0);
        pace.task_started("UPID:d", Work::Resize);
        assert_eq!(pace.next_task_poll("UPID:d"), Some(Duration::from_secs(1)));
        // The reconcile that should have looked after 1 s waited 8 s more for a runner slot.
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(pace.next_task_poll("UPID:d"), Some(Duration::ZERO));
        assert_eq!(
            pace.task_done("UPID:d"),
            Duration::from_secs(8),
            "it had ended 8 s ago at the latest"
        );
        let resize = pace.estimate(Work::Resize).unwrap();
        assert!(resize <= Duration::from_secs(1), "{resize:?}");
        let boot = pace.estimate(Work::Boot).unwrap();
        assert!(boot <= Duration::from_secs(20), "{boot:?}");

        // Nor does it shorten them: many late looks in a row once drove the estimates to a fraction.
        assert_eq!(resize, Duration::from_secs(1));

        // A look that finds the work still running is evidence, and lengthens the estimate.
        pace.task_started("UPID:e", Work::Resize);
        let first = pace.next_task_poll("UPID:e").unwrap();
        tokio::time::advance(first).await;
        pace.task_pending("UPID:e");
        let gap = pace.next_task_poll("UPID:e").unwrap();
        tokio::time::advance(gap).await;
        assert_eq!(pace.task_done("UPID:e"), Duration::ZERO, "on time");
        assert!(pace.estimate(Work::Resize).unwrap() > resize);
    }

    #[test]
    fn polls_after_the_expected_end_come_at_growing_short_intervals() {
        let pace = Pace::default();
        pace.state().learned.insert(Work::Resize, 1.0);
        pace.task_started("UPID:c", Work::Resize);
        {
            let mut s = pace.state();
            let w = s.tasks.get_mut("UPID:c").unwrap();
            w.started = Instant::now() - Duration::from_millis(1000);
        }
        pace.task_pending("UPID:c");
        let first = pace.next_task_poll("UPID:c").unwrap();
        pace.task_pending("UPID:c");
        let second = pace.next_task_poll("UPID:c").unwrap();
        assert!(first <= Duration::from_millis(200), "{first:?}");
        assert!(
            second > first && second <= MAX_TASK_GAP,
            "{first:?} then {second:?}"
        );
    }
}
