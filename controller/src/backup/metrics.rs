//! Backup metrics per host: last success time, duration, bytes, failures, and the schedule they are held to.

use prometheus::{GaugeVec, IntCounterVec, Opts, Registry};

use super::run::BackupReport;

/// `fediversity_backup_*{deployment, host}`.
#[derive(Clone)]
pub struct BackupMetrics {
    last_success: GaugeVec,
    interval: GaugeVec,
    duration: GaugeVec,
    bytes_added: GaugeVec,
    total_bytes: GaugeVec,
    failures: IntCounterVec,
    check_failures: IntCounterVec,
    restores: IntCounterVec,
    final_backups: IntCounterVec,
}

const LABELS: &[&str] = &["deployment", "host"];

impl BackupMetrics {
    /// Creates the metrics and registers them.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let gauge = |name: &str, help: &str| GaugeVec::new(Opts::new(name, help), LABELS);
        let m = Self {
            last_success: gauge(
                "fediversity_backup_last_success_timestamp_seconds",
                "When the host's last good backup finished (Unix seconds); the time backups were configured until the first one.",
            )?,
            interval: gauge(
                "fediversity_backup_interval_seconds",
                "The backup schedule the host is held to (the environment's spec.backup.schedule).",
            )?,
            duration: gauge(
                "fediversity_backup_last_duration_seconds",
                "Seconds the host's last good backup took.",
            )?,
            bytes_added: gauge(
                "fediversity_backup_last_bytes_added",
                "Bytes the host's last good backup added to the repository (after deduplication).",
            )?,
            total_bytes: gauge(
                "fediversity_backup_last_total_bytes",
                "Bytes the host's last good snapshot holds.",
            )?,
            failures: IntCounterVec::new(
                Opts::new(
                    "fediversity_backup_failures_total",
                    "Failed backup attempts of the host.",
                ),
                LABELS,
            )?,
            check_failures: IntCounterVec::new(
                Opts::new(
                    "fediversity_backup_check_failures_total",
                    "Repository checks (restic check) that found errors, by RuntimeEnvironment.",
                ),
                &["environment"],
            )?,
            restores: IntCounterVec::new(
                Opts::new(
                    "fediversity_restores_total",
                    "Host restores (from spec.restore, as an import does, or in place), by result: Restored (verified) or Failed.",
                ),
                &["result"],
            )?,
            final_backups: IntCounterVec::new(
                Opts::new(
                    "fediversity_final_backups_total",
                    "Final backups of exports (services stopped and left stopped), per host, by result: Succeeded or Failed.",
                ),
                &["result"],
            )?,
        };
        for result in ["Restored", "Failed"] {
            m.restores.with_label_values(&[result]);
        }
        for result in ["Succeeded", "Failed"] {
            m.final_backups.with_label_values(&[result]);
        }
        registry.register(Box::new(m.last_success.clone()))?;
        registry.register(Box::new(m.interval.clone()))?;
        registry.register(Box::new(m.duration.clone()))?;
        registry.register(Box::new(m.bytes_added.clone()))?;
        registry.register(Box::new(m.total_bytes.clone()))?;
        registry.register(Box::new(m.failures.clone()))?;
        registry.register(Box::new(m.check_failures.clone()))?;
        registry.register(Box::new(m.restores.clone()))?;
        registry.register(Box::new(m.final_backups.clone()))?;
        Ok(m)
    }

    /// A host now held to `interval_secs`; until its first backup, it counts as backed up at `since`
    /// (so the stale alert fires when no backup succeeds within the schedule).
    pub fn configured(&self, deployment: &str, host: &str, interval_secs: f64, since: f64) {
        let labels = [deployment, host];
        self.interval.with_label_values(&labels).set(interval_secs);
        let last = self.last_success.with_label_values(&labels);
        if last.get() == 0.0 {
            last.set(since);
        }
        self.failures.with_label_values(&labels);
    }

    /// Records a good backup that finished at `at` (Unix seconds).
    pub fn success(&self, deployment: &str, host: &str, report: &BackupReport, at: f64) {
        let labels = [deployment, host];
        self.last_success.with_label_values(&labels).set(at);
        self.duration
            .with_label_values(&labels)
            .set(report.duration.as_secs_f64());
        self.bytes_added
            .with_label_values(&labels)
            .set(report.bytes_added as f64);
        self.total_bytes
            .with_label_values(&labels)
            .set(report.total_bytes as f64);
    }

    /// Counts a failed attempt.
    pub fn failure(&self, deployment: &str, host: &str) {
        self.failures.with_label_values(&[deployment, host]).inc();
    }

    /// Counts a repository check that found errors.
    pub fn check_failed(&self, environment: &str) {
        self.check_failures.with_label_values(&[environment]).inc();
    }

    /// Counts a host restore that ended with `result` (`Restored` or `Failed`).
    pub fn restored(&self, result: &str) {
        self.restores.with_label_values(&[result]).inc();
    }

    /// Counts a host's final backup of an export that ended with `result` (`Succeeded` or `Failed`).
    pub fn final_backup(&self, result: &str) {
        self.final_backups.with_label_values(&[result]).inc();
    }

    /// Forgets a host that left (its series disappear).
    pub fn remove(&self, deployment: &str, host: &str) {
        let labels = [deployment, host];
        for g in [
            &self.last_success,
            &self.interval,
            &self.duration,
            &self.bytes_added,
            &self.total_bytes,
        ] {
            let _ = g.remove_label_values(&labels);
        }
        let _ = self.failures.remove_label_values(&labels);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prometheus::Encoder;

    use super::*;

    fn text(registry: &Registry) -> String {
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_configured_host_counts_from_then_and_a_success_moves_it_on() {
        let registry = Registry::new();
        let m = BackupMetrics::register(&registry).unwrap();
        m.configured("op", "op-app", 86_400.0, 1000.0);
        assert!(text(&registry).contains(
            "fediversity_backup_last_success_timestamp_seconds{deployment=\"op\",host=\"op-app\"} 1000"
        ));
        let report = BackupReport {
            snapshot: "ab12cd34".into(),
            bytes_added: 42,
            total_bytes: 4200,
            files: 7,
            files_changed: 1,
            duration: Duration::from_millis(1500),
        };
        m.success("op", "op-app", &report, 2000.0);
        m.configured("op", "op-app", 86_400.0, 3000.0);
        m.failure("op", "op-app");
        let t = text(&registry);
        assert!(t.contains(
            "fediversity_backup_last_success_timestamp_seconds{deployment=\"op\",host=\"op-app\"} 2000"
        ));
        assert!(t.contains("fediversity_backup_last_bytes_added{deployment=\"op\",host=\"op-app\"} 42"));
        assert!(t.contains("fediversity_backup_failures_total{deployment=\"op\",host=\"op-app\"} 1"));
        m.remove("op", "op-app");
        assert!(!text(&registry).contains("op-app"));
    }

    #[test]
    fn restores_and_final_backups_are_counted_by_result_from_zero() {
        let registry = Registry::new();
        let m = BackupMetrics::register(&registry).unwrap();
        assert!(text(&registry).contains("fediversity_restores_total{result=\"Failed\"} 0"));
        m.restored("Restored");
        m.restored("Restored");
        m.final_backup("Failed");
        let t = text(&registry);
        assert!(
            t.contains("fediversity_restores_total{result=\"Restored\"} 2"),
            "{t}"
        );
        assert!(
            t.contains("fediversity_restores_total{result=\"Failed\"} 0"),
            "{t}"
        );
        assert!(
            t.contains("fediversity_final_backups_total{result=\"Failed\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("fediversity_final_backups_total{result=\"Succeeded\"} 0"),
            "{t}"
        );
    }
}
