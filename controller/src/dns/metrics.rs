//! DNS metrics: updates by result and how long each name took to read and update.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts, Registry};

/// Every result label of `fediversity_dns_updates_total`.
pub const RESULTS: &[&str] = &[
    "created",
    "updated",
    "deleted",
    "conflict",
    "rejected",
    "unreachable",
    "failed",
];

/// `fediversity_dns_updates_total{result}` and `fediversity_dns_update_duration_seconds`.
#[derive(Clone)]
pub struct DnsMetrics {
    updates: IntCounterVec,
    duration: Histogram,
}

impl DnsMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let metrics = Self::unregistered()?;
        registry.register(Box::new(metrics.updates.clone()))?;
        registry.register(Box::new(metrics.duration.clone()))?;
        Ok(metrics)
    }

    /// The metrics, not registered anywhere (for tests and embedders without a registry).
    pub fn unregistered() -> Result<Self, prometheus::Error> {
        let updates = IntCounterVec::new(
            Opts::new(
                "fediversity_dns_updates_total",
                "RFC 2136 updates of host names by result: created, updated, deleted, conflict (a foreign record or a concurrent change, left untouched), rejected (TSIG or policy), unreachable, failed.",
            ),
            &["result"],
        )?;
        // Every result exists at 0 from the start, so that rate() and increase() see it before it happens.
        for result in RESULTS {
            updates.with_label_values(&[result]);
        }
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "fediversity_dns_update_duration_seconds",
                "Seconds to read one name from the authoritative server and update it.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )?;
        Ok(Self { updates, duration })
    }

    /// Counts one update attempt that ended with `result` (one of [`RESULTS`]).
    pub fn result(&self, result: &str) {
        self.updates.with_label_values(&[result]).inc();
    }

    /// Records how long one name took.
    pub fn duration(&self, seconds: f64) {
        self.duration.observe(seconds);
    }

    /// How many updates ended with `result` so far.
    pub fn count(&self, result: &str) -> u64 {
        self.updates.with_label_values(&[result]).get()
    }
}
