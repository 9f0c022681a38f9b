//! Migration metrics: migrations by result, phase durations, downtime, and the phase each one is in.

use prometheus::{GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use super::phase::{MigrationRecord, Phase};

/// `fediversity_migration_*`.
#[derive(Clone)]
pub struct MigrationMetrics {
    finished: IntCounterVec,
    phase_seconds: HistogramVec,
    downtime: GaugeVec,
    phase_since: GaugeVec,
}

impl MigrationMetrics {
    /// Creates the metrics and registers them.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            finished: IntCounterVec::new(
                Opts::new(
                    "fediversity_migrations_total",
                    "Migrations that ended, by result (Succeeded, Failed, Cancelled).",
                ),
                &["result"],
            )?,
            phase_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "fediversity_migration_phase_duration_seconds",
                    "How long each migration phase took.",
                )
                .buckets(vec![1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4.0 * 3600.0]),
                &["phase"],
            )?,
            downtime: GaugeVec::new(
                Opts::new(
                    "fediversity_migration_downtime_seconds",
                    "Seconds without service of the Deployment's last migration (so far, while it lasts).",
                ),
                &["deployment"],
            )?,
            phase_since: GaugeVec::new(
                Opts::new(
                    "fediversity_migration_phase_since_timestamp_seconds",
                    "When the running migration entered its phase (Unix seconds); the stuck-phase alert watches it.",
                ),
                &["deployment", "phase"],
            )?,
        };
        registry.register(Box::new(m.finished.clone()))?;
        registry.register(Box::new(m.phase_seconds.clone()))?;
        registry.register(Box::new(m.downtime.clone()))?;
        registry.register(Box::new(m.phase_since.clone()))?;
        Ok(m)
    }

    /// Records a step from phase `before` to the record `after`, at `now` (Unix ms).
    pub fn observe(&self, before: Phase, after: &MigrationRecord, now: u64) {
        let deployment = after.deployment.as_str();
        if let Some(d) = super::phase::downtime_seconds(after, now) {
            self.downtime.with_label_values(&[deployment]).set(d);
        }
        if before == after.phase {
            return;
        }
        if let Some(ms) = after.durations_ms.get(before.as_str()) {
            self.phase_seconds
                .with_label_values(&[before.as_str()])
                .observe(*ms as f64 / 1000.0);
        }
        let _ = self
            .phase_since
            .remove_label_values(&[deployment, before.as_str()]);
        if after.phase.is_terminal() {
            self.finished.with_label_values(&[after.phase.as_str()]).inc();
        } else {
            self.phase_since
                .with_label_values(&[deployment, after.phase.as_str()])
                .set((after.phase_started_ms / 1000) as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use prometheus::Encoder;

    use super::*;
    use crate::migrate::phase::{FailedTarget, Outcome, RetirePolicy, advance, begin};

    fn text(registry: &Registry) -> String {
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn phases_downtime_and_results_are_counted_and_a_finished_migration_leaves_no_phase_series() {
        let registry = Registry::new();
        let m = MigrationMetrics::register(&registry).unwrap();
        let mut r = begin("op", "a", "b", RetirePolicy::Retain, FailedTarget::Remove, 0);
        let mut now = 0;
        while !r.phase.is_terminal() {
            let before = r.phase;
            now += 2_000;
            r = advance(&r, Outcome::ok(), now);
            m.observe(before, &r, now);
            if r.phase == Phase::FinalCopying {
                let t = text(&registry);
                assert!(t.contains("fediversity_migration_phase_since_timestamp_seconds{deployment=\"op\",phase=\"FinalCopying\"} 6"), "{t}");
                assert!(
                    !t.contains("phase_since_timestamp_seconds{deployment=\"op\",phase=\"StoppingSource\"}"),
                    "{t}"
                );
            }
        }
        let t = text(&registry);
        assert!(
            t.contains("fediversity_migrations_total{result=\"Succeeded\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("fediversity_migration_downtime_seconds{deployment=\"op\"} 10"),
            "{t}"
        );
        assert!(
            t.contains("fediversity_migration_phase_duration_seconds_count{phase=\"Verifying\"} 1"),
            "{t}"
        );
        assert!(
            !t.contains("fediversity_migration_phase_since_timestamp_seconds{"),
            "{t}"
        );
    }
}
