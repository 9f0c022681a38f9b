//! The reconcile runtime: work queue, backoff, runner, shutdown — the machinery between snapshots and reconcilers.

pub mod bucket;
pub mod metrics;
pub mod queue;
pub mod runner;
pub mod shutdown;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::api::ObjectKey;

pub use metrics::RuntimeMetrics;

/// Wakes an object now (used to wake Deployments when something they depend on changes).
pub type Trigger = std::sync::Arc<dyn Fn(&ObjectKey) + Send + Sync>;
pub use queue::{Backoff, ExponentialBackoff, KeyStatus, QueueConfig, RateLimit};
pub use runner::{ControllerHandle, RunOutcome, Runner, RunnerConfig};
pub use shutdown::ShutdownState;

/// A boxed, sendable future, as reconcilers return them.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What a successful reconcile asks for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Action {
    /// Reconcile again after this delay (to watch progress of something external).
    Requeue(Duration),
    /// Nothing to do until the object (or something it depends on) changes, or the periodic resync.
    AwaitChange,
}

/// Why a reconcile did not converge, classified for the retry policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReconcileError {
    /// Something that may work on retry (a timeout, a 5xx): retried with exponential backoff.
    #[error("{message}")]
    Transient {
        /// A bounded, CamelCase reason, fit for a metric label.
        reason: &'static str,
        /// The details.
        message: String,
    },
    /// Waiting on something else (a dependency that is missing or not ready): retried after a set delay,
    /// and at once when that dependency changes.
    #[error("{message}")]
    Waiting {
        /// A bounded, CamelCase reason such as `DependencyNotReady`.
        reason: &'static str,
        /// The details.
        message: String,
        /// When to look again at the latest.
        retry_after: Duration,
    },
    /// The spec cannot work as written: not retried until the spec changes (condition `Stalled`).
    #[error("{message}")]
    Terminal {
        /// A bounded, CamelCase reason.
        reason: &'static str,
        /// The details.
        message: String,
    },
}

impl ReconcileError {
    /// A bounded label for metrics: `transient`, `waiting` or `terminal`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Transient { .. } => "transient",
            Self::Waiting { .. } => "waiting",
            Self::Terminal { .. } => "terminal",
        }
    }

    /// The CamelCase reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Transient { reason, .. } | Self::Waiting { reason, .. } | Self::Terminal { reason, .. } => {
                reason
            }
        }
    }
}

/// Converges one object at a time. Implementations observe, act and record status themselves; the
/// runtime only decides when each key runs next from the result.
pub trait Reconciler: Send + Sync + 'static {
    /// Reconciles the object `key` (which may have been removed: then its cleanup runs).
    fn reconcile(&self, key: ObjectKey) -> BoxFuture<Result<Action, ReconcileError>>;
}
