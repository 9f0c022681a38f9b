//! Prometheus metrics of the runtime, under the controller-runtime and client-go workqueue names.
//!
//! Dashboards written for Kubernetes controllers query these names, so they are kept exactly. The
//! `controller` label (and the workqueue's `name` label, which carries the same value as in
//! controller-runtime) is the kind in lowercase, e.g. `deployment`. Every series of every kind is
//! created at registration, so dashboards and `rate()` see zeros from the start.

use std::collections::BTreeMap;
use std::time::Duration;

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

use crate::api::Kind;

/// `controller_runtime_reconcile_time_seconds` buckets, as controller-runtime defines them (5 ms to 60 s).
pub const RECONCILE_TIME_BUCKETS: [f64; 40] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25,
    1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 15.0, 20.0, 25.0, 30.0, 40.0,
    50.0, 60.0,
];

/// Workqueue duration buckets: client-go's `ExponentialBuckets(1e-8, 10, 12)` (10 ns to 1000 s).
pub const WORKQUEUE_BUCKETS: [f64; 12] = [
    1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0,
];

/// The `controller` (and workqueue `name`) label value of a kind: its name in lowercase.
pub fn controller_name(kind: Kind) -> &'static str {
    match kind {
        Kind::RuntimeEnvironment => "runtimeenvironment",
        Kind::Application => "application",
        Kind::Deployment => "deployment",
    }
}

/// The `result` label of `controller_runtime_reconcile_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResultLabel {
    /// Converged (or progressing without error), whether it waits for a change or for a scheduled
    /// resync: a resync is not a retry.
    Success,
    /// Failed (transient, terminal, timeout or panic).
    Error,
    /// Waiting for a dependency, asked to run again after a set delay; not a failure.
    RequeueAfter,
}

/// Why an error result happened, for the extra error counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorDetail {
    /// A transient error returned by the reconciler.
    Transient,
    /// A terminal error: counted in `controller_runtime_terminal_reconcile_errors_total` too.
    Terminal,
    /// The reconcile exceeded its timeout.
    Timeout,
    /// The reconcile panicked.
    Panic,
}

/// The series of one kind.
#[derive(Debug, Clone)]
struct KindMetrics {
    success: IntCounter,
    error: IntCounter,
    requeue_after: IntCounter,
    errors: IntCounter,
    terminal_errors: IntCounter,
    panics: IntCounter,
    timeouts: IntCounter,
    reconcile_time: Histogram,
    active_workers: IntGauge,
    max_concurrent: IntGauge,
    depth: IntGauge,
    adds: IntCounter,
    queue_duration: Histogram,
    work_duration: Histogram,
    retries: IntCounter,
    unfinished: Gauge,
    longest: Gauge,
}

/// The runtime's metrics; cheap to clone (every series is shared).
#[derive(Debug, Clone)]
pub struct RuntimeMetrics {
    kinds: BTreeMap<Kind, KindMetrics>,
}

impl RuntimeMetrics {
    /// Creates the metrics, registers them in `registry` and initialises every series of every kind.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let controller = &["controller"];
        let queue = &["name", "controller"];
        let counter = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
            let vec = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(vec.clone()))?;
            Ok(vec)
        };
        let int_gauge = |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec, prometheus::Error> {
            let vec = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(vec.clone()))?;
            Ok(vec)
        };
        let gauge = |name: &str, help: &str| -> Result<GaugeVec, prometheus::Error> {
            let vec = GaugeVec::new(Opts::new(name, help), queue)?;
            registry.register(Box::new(vec.clone()))?;
            Ok(vec)
        };
        let histogram = |name: &str, help: &str, buckets: &[f64], labels: &[&str]| {
            let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
            let vec = HistogramVec::new(opts, labels)?;
            registry.register(Box::new(vec.clone()))?;
            Ok::<_, prometheus::Error>(vec)
        };

        let total = counter(
            "controller_runtime_reconcile_total",
            "Total number of reconciliations per controller",
            &["controller", "result"],
        )?;
        let errors = counter(
            "controller_runtime_reconcile_errors_total",
            "Total number of reconciliation errors per controller",
            controller,
        )?;
        let terminal = counter(
            "controller_runtime_terminal_reconcile_errors_total",
            "Total number of terminal reconciliation errors per controller",
            controller,
        )?;
        let panics = counter(
            "controller_runtime_reconcile_panics_total",
            "Total number of reconciliation panics per controller",
            controller,
        )?;
        let timeouts = counter(
            "controller_runtime_reconcile_timeouts_total",
            "Total number of reconciliation timeouts per controller",
            controller,
        )?;
        let time = histogram(
            "controller_runtime_reconcile_time_seconds",
            "Length of time per reconciliation per controller",
            &RECONCILE_TIME_BUCKETS,
            controller,
        )?;
        let active = int_gauge(
            "controller_runtime_active_workers",
            "Number of currently used workers per controller",
            controller,
        )?;
        let max = int_gauge(
            "controller_runtime_max_concurrent_reconciles",
            "Maximum number of concurrent reconciles per controller",
            controller,
        )?;
        let depth = int_gauge("workqueue_depth", "Current depth of workqueue", queue)?;
        let adds = counter(
            "workqueue_adds_total",
            "Total number of adds handled by workqueue",
            queue,
        )?;
        let queue_duration = histogram(
            "workqueue_queue_duration_seconds",
            "How long in seconds an item stays in workqueue before being requested",
            &WORKQUEUE_BUCKETS,
            queue,
        )?;
        let work_duration = histogram(
            "workqueue_work_duration_seconds",
            "How long in seconds processing an item from workqueue takes",
            &WORKQUEUE_BUCKETS,
            queue,
        )?;
        let retries = counter(
            "workqueue_retries_total",
            "Total number of retries handled by workqueue",
            queue,
        )?;
        let unfinished = gauge(
            "workqueue_unfinished_work_seconds",
            "How many seconds of work has been done that is in progress and hasn't been observed by \
             work_duration. Large values indicate stuck threads",
        )?;
        let longest = gauge(
            "workqueue_longest_running_processor_seconds",
            "How many seconds has the longest running processor for workqueue been running",
        )?;

        let mut kinds = BTreeMap::new();
        for kind in Kind::ALL {
            let c = [controller_name(kind)];
            let q = [controller_name(kind), controller_name(kind)];
            let result = |r: &str| total.get_metric_with_label_values(&[controller_name(kind), r]);
            // controller-runtime also has `requeue` (for the deprecated `Requeue: true`); we never use it, but
            // create it so queries summing over `result` find the same series.
            result("requeue")?;
            let metrics = KindMetrics {
                success: result("success")?,
                error: result("error")?,
                requeue_after: result("requeue_after")?,
                errors: errors.get_metric_with_label_values(&c)?,
                terminal_errors: terminal.get_metric_with_label_values(&c)?,
                panics: panics.get_metric_with_label_values(&c)?,
                timeouts: timeouts.get_metric_with_label_values(&c)?,
                reconcile_time: time.get_metric_with_label_values(&c)?,
                active_workers: active.get_metric_with_label_values(&c)?,
                max_concurrent: max.get_metric_with_label_values(&c)?,
                depth: depth.get_metric_with_label_values(&q)?,
                adds: adds.get_metric_with_label_values(&q)?,
                queue_duration: queue_duration.get_metric_with_label_values(&q)?,
                work_duration: work_duration.get_metric_with_label_values(&q)?,
                retries: retries.get_metric_with_label_values(&q)?,
                unfinished: unfinished.get_metric_with_label_values(&q)?,
                longest: longest.get_metric_with_label_values(&q)?,
            };
            kinds.insert(kind, metrics);
        }
        Ok(Self { kinds })
    }

    /// Sets `controller_runtime_max_concurrent_reconciles` of `kind`.
    pub(crate) fn set_max_concurrent(&self, kind: Kind, max: usize) {
        if let Some(m) = self.kinds.get(&kind) {
            m.max_concurrent.set(i64::try_from(max).unwrap_or(i64::MAX));
        }
    }

    /// A reconcile of `kind` started after waiting `waited` in the queue.
    pub(crate) fn started(&self, kind: Kind, waited: Duration) {
        if let Some(m) = self.kinds.get(&kind) {
            m.adds.inc();
            m.queue_duration.observe(waited.as_secs_f64());
            m.active_workers.inc();
        }
    }

    /// A reconcile of `kind` ended after `took` with `result` (and `error` when it failed).
    pub(crate) fn finished(
        &self,
        kind: Kind,
        took: Duration,
        result: ResultLabel,
        error: Option<ErrorDetail>,
    ) {
        let Some(m) = self.kinds.get(&kind) else {
            return;
        };
        m.active_workers.dec();
        m.reconcile_time.observe(took.as_secs_f64());
        m.work_duration.observe(took.as_secs_f64());
        match result {
            ResultLabel::Success => m.success.inc(),
            ResultLabel::Error => m.error.inc(),
            ResultLabel::RequeueAfter => m.requeue_after.inc(),
        }
        if let Some(detail) = error {
            m.errors.inc();
            match detail {
                ErrorDetail::Transient => {}
                ErrorDetail::Terminal => m.terminal_errors.inc(),
                ErrorDetail::Timeout => m.timeouts.inc(),
                ErrorDetail::Panic => m.panics.inc(),
            }
        }
    }

    /// A key of `kind` was scheduled again after a delay (`workqueue_retries_total`).
    pub(crate) fn retried(&self, kind: Kind) {
        if let Some(m) = self.kinds.get(&kind) {
            m.retries.inc();
        }
    }

    /// Refreshes the gauges of `kind` that describe the queue at one moment.
    pub(crate) fn set_queue(&self, kind: Kind, depth: usize, unfinished: Duration, longest: Duration) {
        if let Some(m) = self.kinds.get(&kind) {
            m.depth.set(i64::try_from(depth).unwrap_or(i64::MAX));
            m.unfinished.set(unfinished.as_secs_f64());
            m.longest.set(longest.as_secs_f64());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn family(registry: &Registry, name: &str) -> Option<prometheus::proto::MetricFamily> {
        registry.gather().into_iter().find(|f| f.name() == name)
    }

    #[test]
    fn registering_creates_every_series_of_every_kind_at_zero() {
        let registry = Registry::new();
        assert!(RuntimeMetrics::register(&registry).is_ok());
        let total = family(&registry, "controller_runtime_reconcile_total");
        let series = total.map(|f| f.get_metric().len());
        assert_eq!(
            series,
            Some(12),
            "3 kinds × success, error, requeue, requeue_after"
        );
        for name in [
            "controller_runtime_reconcile_errors_total",
            "controller_runtime_terminal_reconcile_errors_total",
            "controller_runtime_reconcile_panics_total",
            "controller_runtime_reconcile_timeouts_total",
            "controller_runtime_reconcile_time_seconds",
            "controller_runtime_active_workers",
            "controller_runtime_max_concurrent_reconciles",
            "workqueue_depth",
            "workqueue_adds_total",
            "workqueue_queue_duration_seconds",
            "workqueue_work_duration_seconds",
            "workqueue_retries_total",
            "workqueue_unfinished_work_seconds",
            "workqueue_longest_running_processor_seconds",
        ] {
            let labels: Vec<String> = family(&registry, name)
                .map(|f| {
                    f.get_metric()
                        .iter()
                        .flat_map(|m| {
                            m.get_label()
                                .iter()
                                .map(|l| format!("{}={}", l.name(), l.value()))
                        })
                        .collect()
                })
                .unwrap_or_default();
            for kind in Kind::ALL {
                let expected = format!("controller={}", controller_name(kind));
                assert!(labels.contains(&expected), "{name} lacks {expected}: {labels:?}");
                if name.starts_with("workqueue_") {
                    let expected = format!("name={}", controller_name(kind));
                    assert!(labels.contains(&expected), "{name} lacks {expected}");
                }
            }
        }
    }

    #[test]
    fn registering_twice_in_one_registry_is_an_error_not_a_panic() {
        let registry = Registry::new();
        assert!(RuntimeMetrics::register(&registry).is_ok());
        assert!(matches!(
            RuntimeMetrics::register(&registry),
            Err(prometheus::Error::AlreadyReg)
        ));
    }

    #[test]
    fn histograms_use_the_controller_runtime_and_client_go_buckets() {
        let registry = Registry::new();
        assert!(RuntimeMetrics::register(&registry).is_ok());
        let bounds = |name: &str| -> Vec<f64> {
            family(&registry, name)
                .and_then(|f| f.get_metric().first().cloned())
                .map(|m| {
                    m.get_histogram()
                        .get_bucket()
                        .iter()
                        .map(|b| b.upper_bound())
                        .collect()
                })
                .unwrap_or_default()
        };
        let reconcile = bounds("controller_runtime_reconcile_time_seconds");
        assert_eq!(reconcile.first(), Some(&0.005));
        assert_eq!(reconcile.last(), Some(&60.0));
        assert_eq!(reconcile.len(), 40);
        assert!(reconcile.windows(2).all(|w| w[0] < w[1]));
        let queue = bounds("workqueue_queue_duration_seconds");
        let client_go = prometheus::exponential_buckets(1e-8, 10.0, 12).unwrap_or_default();
        assert_eq!(queue.len(), client_go.len());
        let close = queue
            .iter()
            .zip(&client_go)
            .all(|(a, b)| ((a - b) / b).abs() < 1e-9);
        assert!(close, "{queue:?}");
        assert_eq!(bounds("workqueue_work_duration_seconds"), queue);
    }
}
