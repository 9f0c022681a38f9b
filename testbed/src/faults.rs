//! Fault injection knobs: transport errors, lost answers, failing tasks, lock timeouts, a silent agent.

use serde::{Deserialize, Serialize};

/// What goes wrong, and how often. Rates are probabilities in `0.0..=1.0`, drawn from the simulator's
/// (optionally seeded) random generator.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Rate of calls answered with 500 `got no worker upid - start worker failed` (task-starting calls),
    /// 595 `Connection refused` or 596 `Connection timed out`, before anything happens.
    pub rate: f64,
    /// Rate of calls that take effect but whose answer is replaced by 596 `Connection timed out`
    /// (the proxy gave up while the worker went on).
    pub lost_response_rate: f64,
    /// Rate of tasks that end with an error (storage lock timeout for clones, a QEMU failure for starts,
    /// a config lock timeout otherwise).
    pub task_failure_rate: f64,
    /// Rate of successful tasks that end with `WARNINGS: 1`.
    pub task_warning_rate: f64,
    /// Rate of VM-changing calls answered 500 `can't lock file '/var/lock/qemu-server/lock-N.conf' - got timeout`.
    pub lock_timeout_rate: f64,
    /// The guest agent never becomes ready (`QEMU guest agent is not running` forever).
    pub agent_never_ready: bool,
}

impl Faults {
    /// No faults at all.
    pub fn none() -> Self {
        Self::default()
    }

    /// Only transport faults, at this rate.
    pub fn with_rate(rate: f64) -> Self {
        Self {
            rate: clamp(rate),
            ..Self::default()
        }
    }

    /// The same knobs with every rate clamped to `0.0..=1.0`.
    pub fn clamped(self) -> Self {
        Self {
            rate: clamp(self.rate),
            lost_response_rate: clamp(self.lost_response_rate),
            task_failure_rate: clamp(self.task_failure_rate),
            task_warning_rate: clamp(self.task_warning_rate),
            lock_timeout_rate: clamp(self.lock_timeout_rate),
            agent_never_ready: self.agent_never_ready,
        }
    }
}

fn clamp(rate: f64) -> f64 {
    if rate.is_finite() {
        rate.clamp(0.0, 1.0)
    } else {
        0.0
    }
}

/// Whether an event of probability `rate` happens, with `rng`.
pub fn roll(rng: &mut fastrand::Rng, rate: f64) -> bool {
    rate > 0.0 && rng.f64() < rate
}
