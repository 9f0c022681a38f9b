//! The seam between the Deployment reconciler and the infrastructure that makes its hosts real.

use crate::api::ObjectKey;
use crate::runtime::{BoxFuture, ReconcileError};

use super::deployment::PlannedHost;

/// What a provider reports after converging a Deployment's hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderReport {
    /// Whether every host is converged.
    pub converged: bool,
    /// One sentence for the Ready condition.
    pub message: String,
}

/// Makes planned hosts exist and run their configuration (Proxmox VMs, NixOS hosts), and removes them.
pub trait Provider: Send + Sync + 'static {
    /// Converges the hosts of one Deployment.
    fn converge(
        &self,
        deployment: &ObjectKey,
        hosts: &[PlannedHost],
    ) -> BoxFuture<Result<ProviderReport, ReconcileError>>;

    /// Cleans up after a Deployment that was removed (what it does depends on its deletion policy).
    fn cleanup(&self, deployment: &ObjectKey) -> BoxFuture<Result<(), ReconcileError>>;
}

/// The provider used until a backend is configured: it plans, touches nothing, and says so.
pub struct PlanOnly;

impl Provider for PlanOnly {
    fn converge(
        &self,
        _deployment: &ObjectKey,
        hosts: &[PlannedHost],
    ) -> BoxFuture<Result<ProviderReport, ReconcileError>> {
        let message = format!(
            "{} host(s) planned; no infrastructure backend is enabled, so nothing was provisioned",
            hosts.len()
        );
        Box::pin(async move {
            Ok(ProviderReport {
                converged: true,
                message,
            })
        })
    }

    fn cleanup(&self, _deployment: &ObjectKey) -> BoxFuture<Result<(), ReconcileError>> {
        Box::pin(async { Ok(()) })
    }
}
