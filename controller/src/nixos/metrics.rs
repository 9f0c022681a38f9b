//! NixOS deploy metrics: seconds per step and results by outcome.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use super::deploy::DeployResult;

/// `fediversity_nixos_deploy_seconds{step}` and `fediversity_nixos_deploy_results_total{result}`.
#[derive(Clone)]
pub struct DeployMetrics {
    seconds: HistogramVec,
    results: IntCounterVec,
    drift: prometheus::IntCounter,
}

/// Buckets from a 50 ms SSH round trip on a LAN to a 30 min build.
const BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];

impl DeployMetrics {
    /// Creates the metrics and registers them.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                "fediversity_nixos_deploy_seconds",
                "Seconds spent per step of NixOS host convergence (build, inspect, copy, arm, set-profile, activate, confirm, rollback).",
            )
            .buckets(BUCKETS.to_vec()),
            &["step"],
        )?;
        let results = IntCounterVec::new(
            Opts::new(
                "fediversity_nixos_deploy_results_total",
                "NixOS host convergences by result (Applied, FailedRolledBack, UnconfirmedRolledBack, Unreachable, Failed).",
            ),
            &["result"],
        )?;
        // Every result exists at 0 from the start, so that rate() and increase() see it before it happens.
        for result in every_result() {
            results.with_label_values(&[result.label()]);
        }
        let drift = prometheus::IntCounter::new(
            "fediversity_nixos_drift_total",
            "Hosts found running another system than the one deployed (switched out of band), then re-converged.",
        )?;
        registry.register(Box::new(seconds.clone()))?;
        registry.register(Box::new(results.clone()))?;
        registry.register(Box::new(drift.clone()))?;
        Ok(Self {
            seconds,
            results,
            drift,
        })
    }

    /// Records the duration of one step.
    pub fn step(&self, step: &str, seconds: f64) {
        self.seconds.with_label_values(&[step]).observe(seconds);
    }

    /// Counts one host found switched out of band.
    pub fn drifted(&self) {
        self.drift.inc();
    }

    /// Counts one result.
    pub fn result(&self, result: DeployResult) {
        self.results.with_label_values(&[result.label()]).inc();
    }
}

/// Every `DeployResult`, in order. The match makes a new variant fail to compile until it is given
/// an arm, which places it in the chain.
fn every_result() -> Vec<DeployResult> {
    let next = |result: &DeployResult| match *result {
        DeployResult::Applied => Some(DeployResult::FailedRolledBack),
        DeployResult::FailedRolledBack => Some(DeployResult::UnconfirmedRolledBack),
        DeployResult::UnconfirmedRolledBack => Some(DeployResult::Unreachable),
        DeployResult::Unreachable => Some(DeployResult::Failed),
        DeployResult::Failed => None,
    };
    std::iter::successors(Some(DeployResult::Applied), next).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_and_results_are_exported_with_their_labels() {
        let registry = Registry::new();
        let m = DeployMetrics::register(&registry).unwrap();
        m.step("copy", 0.4);
        m.result(DeployResult::FailedRolledBack);
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap();
        assert!(
            text.contains("fediversity_nixos_deploy_seconds_count{step=\"copy\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("fediversity_nixos_deploy_results_total{result=\"FailedRolledBack\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn every_result_is_exported_at_zero_before_any_deploy() {
        let registry = Registry::new();
        DeployMetrics::register(&registry).unwrap();
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap();
        let results = every_result();
        assert_eq!(results.len(), 5, "{results:?}");
        for label in [
            "Applied",
            "FailedRolledBack",
            "UnconfirmedRolledBack",
            "Unreachable",
            "Failed",
        ] {
            assert!(
                text.contains(&format!(
                    "fediversity_nixos_deploy_results_total{{result=\"{label}\"}} 0\n"
                )),
                "{label}: {text}"
            );
        }
        assert_eq!(
            text.matches("fediversity_nixos_deploy_results_total{").count(),
            5,
            "{text}"
        );
    }
}
