//! Metrics of the Proxmox side: external requests, their latency, retries, tasks and owned/orphaned VMs.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

/// The `provider` label of every external-call series.
pub const PROVIDER: &str = "proxmox";

/// The Proxmox side's metrics. Label values are bounded: operations are a fixed set, codes are HTTP
/// status codes (or `error` when no answer came), environments are object names.
#[derive(Clone)]
pub struct ProxmoxMetrics {
    /// `fediversity_external_requests_total{provider,op,code}`.
    pub requests: IntCounterVec,
    /// `fediversity_external_request_duration_seconds{provider,op}`.
    pub latency: HistogramVec,
    /// `fediversity_external_request_retries_total{provider,op}`: retries after transient failures.
    pub retries: IntCounterVec,
    /// `fediversity_proxmox_tasks_total{type,result}`: tasks followed to their end.
    pub tasks: IntCounterVec,
    /// `fediversity_proxmox_vms_owned{environment}`.
    pub owned: IntGaugeVec,
    /// `fediversity_proxmox_vms_orphaned{environment}`: VMs kept under `Retain` whose Deployment is gone.
    pub orphaned: IntGaugeVec,
    /// `fediversity_proxmox_drift_total{environment,kind}`: out-of-band changes found on owned VMs.
    pub drift: IntCounterVec,
}

/// The `kind` values of `fediversity_proxmox_drift_total`.
pub const DRIFT_KINDS: [&str; 8] = [
    "cpu",
    "memory",
    "tags",
    "cloud_init",
    "network",
    "agent",
    "stopped",
    "other",
];

impl ProxmoxMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                "fediversity_external_requests_total",
                "Requests to external APIs, by provider, operation and HTTP status code.",
            ),
            &["provider", "op", "code"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "fediversity_external_request_duration_seconds",
                "Latency of requests to external APIs.",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["provider", "op"],
        )?;
        let retries = IntCounterVec::new(
            Opts::new(
                "fediversity_external_request_retries_total",
                "Requests retried with backoff after a transient failure.",
            ),
            &["provider", "op"],
        )?;
        let tasks = IntCounterVec::new(
            Opts::new(
                "fediversity_proxmox_tasks_total",
                "Proxmox tasks followed to their end, by type and result (ok, warnings, failed).",
            ),
            &["type", "result"],
        )?;
        let owned = IntGaugeVec::new(
            Opts::new(
                "fediversity_proxmox_vms_owned",
                "VMs carrying this controller's owner tag, per environment.",
            ),
            &["environment"],
        )?;
        let orphaned = IntGaugeVec::new(
            Opts::new(
                "fediversity_proxmox_vms_orphaned",
                "VMs kept (deletionPolicy Retain) after their host left its Deployment, per environment.",
            ),
            &["environment"],
        )?;
        let drift = IntCounterVec::new(
            Opts::new(
                "fediversity_proxmox_drift_total",
                "Out-of-band changes found on owned VMs (config keys, a VM stopped), per environment and kind.",
            ),
            &["environment", "kind"],
        )?;
        for c in [&requests, &retries, &tasks, &drift] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(owned.clone()))?;
        registry.register(Box::new(orphaned.clone()))?;
        Ok(Self {
            requests,
            latency,
            retries,
            tasks,
            owned,
            orphaned,
            drift,
        })
    }

    /// Metrics registered nowhere (for tests and tools).
    pub fn unregistered() -> Self {
        match Self::register(&Registry::new()) {
            Ok(m) => m,
            // A fresh registry has no names yet, so registration cannot collide.
            Err(e) => unreachable!("a fresh registry refused a metric: {e}"),
        }
    }

    /// Forgets the per-environment series of a removed environment.
    pub fn forget_environment(&self, environment: &str) {
        let _ = self.owned.remove_label_values(&[environment]);
        let _ = self.orphaned.remove_label_values(&[environment]);
        for kind in DRIFT_KINDS {
            let _ = self.drift.remove_label_values(&[environment, kind]);
        }
    }
}
