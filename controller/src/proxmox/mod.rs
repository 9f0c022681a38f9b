//! Proxmox VE: the API client, the pure VM planner, the lifecycle that runs its steps, and the provider.
//!
//! # Ownership
//!
//! Every VM the controller creates carries two tags: `fediversity` and an owner tag
//! `fediversity-owner-<I>-<D>`, where `<I>` is 8 hex digits of SHA-256 of the controller instance id
//! (kept in `instance-id` in the state directory, or `--instance-id`) and `<D>` 10 hex digits of
//! SHA-256 of the instance id and the Deployment's name. Its name is `<deployment>-<application>`.
//! A VM is the controller's only if it carries the owner tag and has the host's name, or — between the
//! clone and the first configuration — if it sits on the VMID of an open creation intent with the
//! intent's name (or is still being cloned there). Anything else is never modified or destroyed,
//! whatever its VMID.
//!
//! # Intents
//!
//! The inventory (`proxmox/<deployment>/<application>/<environment>`) records each host's VM in each
//! environment: the VMID reserved (chosen under a per-environment lock from `vmidRange`, avoiding every
//! VMID listed or recorded), its phase (`Creating` is the intent, written before the clone call), and
//! the UPID of any task in flight (written as soon as the call returns). After a crash, a recorded task
//! is followed to its end, and an intent is resolved by observing: its VM present (adopt and configure
//! it), cloning (wait), or absent (clone again into the same VMID, which Proxmox refuses to create
//! twice).

pub mod client;
pub mod drift;
pub mod error;
#[cfg(test)]
pub(crate) mod fake;
pub mod http;
pub mod lifecycle;
pub mod metrics;
pub mod pace;
pub mod plan;
mod report;
pub mod tls;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::api::{DeletionPolicy, Deployment, HostStatus, Kind, Object, ObjectKey, RuntimeEnvironment};
use crate::provider::{
    ConvergeRequest, EnvironmentFacts, EnvironmentReport, Objects, PlannedHost, Provider, ProviderReport,
    plan_only_environment, plan_only_report,
};
use crate::runtime::{BoxFuture, ReconcileError};
use crate::store::Store;

pub use client::{Api, HttpProxmox, ProxmoxApi, ProxmoxError, RateLimit};
pub use lifecycle::{COMMON_TAG, Environment, HostOutcome, LifecycleError};
pub use metrics::ProxmoxMetrics;
pub use plan::{DesiredVm, PlanContext, RecordPhase, Step, VmRecord};
pub use report::no_drift;

pub use crate::api::ALLOW_RESTART_ANNOTATION;
pub use crate::installation::{INSTANCE_ID_FILE, instance_id};

/// Reasons the Proxmox side gives, in CamelCase.
pub mod reasons {
    /// The endpoint cannot be reached.
    pub const UNREACHABLE: &str = "Unreachable";
    /// The credentials were refused.
    pub const UNAUTHORIZED: &str = "Unauthorized";
    /// The credentials lack a privilege.
    pub const FORBIDDEN: &str = "Forbidden";
    /// The server's certificate was refused.
    pub const TLS_FAILED: &str = "TlsVerificationFailed";
    /// The template VM is missing.
    pub const TEMPLATE_MISSING: &str = "TemplateMissing";
    /// Local configuration (secret files, TLS files) is unusable.
    pub const CONFIG_ERROR: &str = "ConfigurationError";
    /// A Proxmox call failed in a way that may pass.
    pub const API_ERROR: &str = "ProxmoxError";
    /// No VMID is free in the range.
    pub const RANGE_EXHAUSTED: &str = "VmidRangeExhausted";
    /// The inventory could not be written.
    pub const STORE_ERROR: &str = "StoreError";
    /// A task is still running.
    pub const TASK_RUNNING: &str = "TaskRunning";
    /// Something changed; the next pass observes again.
    pub const REOBSERVE: &str = "Reobserving";
    /// The VM is locked.
    pub const VM_LOCKED: &str = "VmLocked";
    /// A disk shrink was asked for.
    pub const DISK_SHRINK_REFUSED: &str = "DiskShrinkRefused";
    /// Changes wait for a restart that is not allowed.
    pub const PENDING_RESTART: &str = "PendingRestart";
    /// The guest agent has not reported an address yet.
    pub const WAITING_FOR_AGENT: &str = "WaitingForAgent";
    /// Every host has its VM.
    pub const PROVISIONED: &str = "Provisioned";
    /// Out-of-band changes were found and put back.
    pub const DRIFT_CORRECTED: &str = "DriftCorrected";
    /// Out-of-band changes were found; some wait for a restart that is not allowed.
    pub const DRIFT_PENDING: &str = "DriftPendingRestart";
    /// The last scans found nothing changed out of band.
    pub const NO_DRIFT: &str = "NoDrift";
}

/// What one host's run came to.
struct HostResult {
    /// Its status (none for a host being removed).
    status: Option<HostStatus>,
    /// Its outcome.
    outcome: HostOutcome,
    /// The error that stopped it.
    error: Option<ReconcileError>,
    /// When its wait should be looked at again.
    wake_after: Option<Duration>,
    /// Out-of-band changes found: (metric kind, description).
    drift: Vec<(&'static str, String)>,
}

fn hex(data: &[u8], bytes: usize) -> String {
    Sha256::digest(data)
        .iter()
        .take(bytes)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The owner-tag prefix shared by every VM of one controller instance.
pub fn instance_prefix(instance_id: &str) -> String {
    format!("fediversity-owner-{}-", hex(instance_id.as_bytes(), 4))
}

/// The owner tag of one Deployment's VMs.
pub fn owner_tag(instance_id: &str, deployment: &str) -> String {
    format!(
        "{}{}",
        instance_prefix(instance_id),
        hex(format!("{instance_id}/{deployment}").as_bytes(), 5)
    )
}

/// The VM recorded for `application` of `deployment` in `environment`, if any (its address is the
/// one its guest agent reported).
pub fn recorded_vm(
    store: &Store,
    environment: &str,
    deployment: &str,
    application: &str,
) -> Result<Option<VmRecord>, crate::store::StoreError> {
    if let Some(r) =
        store.inventory::<VmRecord>(&lifecycle::record_key(environment, deployment, application))?
    {
        return Ok(Some(r));
    }
    Ok(store
        .inventory::<VmRecord>(&lifecycle::legacy_record_key(deployment, application))?
        .filter(|r| r.environment == environment))
}

/// Builds the API client of an environment.
pub type ApiFactory = dyn Fn(&RuntimeEnvironment, ProxmoxMetrics) -> Result<Api, ProxmoxError> + Send + Sync;

/// The provider for environments with `proxmox`: VMs are created, adopted, updated and removed.
/// Environments with only `staticHosts` are planned, as with [`PlanOnly`]. Cheap to clone.
#[derive(Clone)]
pub struct ProxmoxProvider(Arc<ProviderCore>);

impl std::ops::Deref for ProxmoxProvider {
    type Target = ProviderCore;

    fn deref(&self) -> &ProviderCore {
        &self.0
    }
}

impl ProxmoxProvider {
    /// A provider talking HTTP(S) to each environment, limited by `rate`.
    pub fn new(
        store: Arc<Store>,
        desired: Arc<dyn Objects>,
        instance_id: String,
        metrics: ProxmoxMetrics,
        rate: RateLimit,
    ) -> Self {
        Self(Arc::new(ProviderCore::new(
            store,
            desired,
            instance_id,
            metrics,
            rate,
        )))
    }

    /// A provider whose API clients come from `factory` (tests use a double).
    pub fn with_factory(
        store: Arc<Store>,
        desired: Arc<dyn Objects>,
        instance_id: String,
        metrics: ProxmoxMetrics,
        factory: Box<ApiFactory>,
    ) -> Self {
        Self(Arc::new(ProviderCore::with_factory(
            store,
            desired,
            instance_id,
            metrics,
            factory,
        )))
    }

    fn handle(&self) -> Arc<ProviderCore> {
        self.0.clone()
    }

    /// Sets how often each owned VM's config is read for drift (default
    /// [`drift::DEFAULT_DRIFT_INTERVAL`]; zero: on every pass, within the read budget). Call before
    /// the first use.
    pub fn with_drift_interval(self, interval: Duration) -> Self {
        match Arc::try_unwrap(self.0) {
            Ok(mut core) => {
                core.drift_interval = interval;
                Self(Arc::new(core))
            }
            Err(shared) => Self(shared),
        }
    }
}

/// The state behind a [`ProxmoxProvider`].
pub struct ProviderCore {
    store: Arc<Store>,
    desired: Arc<dyn Objects>,
    instance_id: String,
    metrics: ProxmoxMetrics,
    factory: Box<ApiFactory>,
    environments: Mutex<HashMap<String, (String, Arc<Environment>)>>,
    deployment_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    drift_interval: Duration,
}

impl ProviderCore {
    /// A provider talking HTTP(S) to each environment, limited by `rate`.
    pub fn new(
        store: Arc<Store>,
        desired: Arc<dyn Objects>,
        instance_id: String,
        metrics: ProxmoxMetrics,
        rate: RateLimit,
    ) -> Self {
        let factory = move |env: &RuntimeEnvironment, metrics: ProxmoxMetrics| {
            let spec = env
                .spec
                .proxmox
                .as_ref()
                .ok_or_else(|| ProxmoxError::Config("no proxmox section".into()))?;
            let insecure = spec.tls.as_ref().is_some_and(|t| t.insecure_skip_verify);
            if insecure {
                tracing::warn!(environment = %env.metadata.name, "TLS verification is OFF for this environment (insecureSkipVerify): anyone on the path can read the API token");
            }
            if spec.endpoint.starts_with("http://") {
                tracing::warn!(environment = %env.metadata.name, "the endpoint is plain http://: the API token travels unencrypted");
            }
            let http = HttpProxmox::new(spec, &env.spec.limits, rate, metrics)?;
            Ok(Api(Arc::new(http)))
        };
        Self::with_factory(store, desired, instance_id, metrics, Box::new(factory))
    }

    /// A provider whose API clients come from `factory` (tests use a double).
    pub fn with_factory(
        store: Arc<Store>,
        desired: Arc<dyn Objects>,
        instance_id: String,
        metrics: ProxmoxMetrics,
        factory: Box<ApiFactory>,
    ) -> Self {
        Self {
            store,
            desired,
            instance_id,
            metrics,
            factory,
            environments: Mutex::new(HashMap::new()),
            deployment_locks: Mutex::new(HashMap::new()),
            drift_interval: drift::DEFAULT_DRIFT_INTERVAL,
        }
    }

    fn environment(&self, env: &RuntimeEnvironment) -> Result<Arc<Environment>, ProxmoxError> {
        let spec = env
            .spec
            .proxmox
            .clone()
            .ok_or_else(|| ProxmoxError::Config("no proxmox section".into()))?;
        let fingerprint = serde_json::to_string(&env.spec).unwrap_or_default();
        let name = env.metadata.name.to_string();
        let mut envs = self
            .environments
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((f, e)) = envs.get(&name)
            && *f == fingerprint
        {
            return Ok(e.clone());
        }
        let api = (self.factory)(env, self.metrics.clone())?;
        let public_key = env
            .spec
            .ssh
            .public_key_file
            .clone()
            .unwrap_or_else(|| format!("{}.pub", env.spec.ssh.private_key_file));
        let created = Arc::new(
            Environment::new(
                name.clone(),
                spec,
                api,
                instance_prefix(&self.instance_id),
                (Some(public_key), env.spec.ssh.user.clone()),
                self.metrics.clone(),
            )
            .with_drift_interval(self.drift_interval),
        );
        envs.insert(name, (fingerprint, created.clone()));
        Ok(created)
    }

    fn deployment_lock(&self, deployment: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.deployment_locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(deployment.to_owned())
            .or_default()
            .clone()
    }

    fn records(&self, deployment: &str) -> Result<Vec<VmRecord>, ReconcileError> {
        let listed = self
            .store
            .inventory_list::<VmRecord>(&lifecycle::record_prefix(deployment))
            .map_err(|e| store_error(&e))?;
        let mut records: Vec<VmRecord> = Vec::with_capacity(listed.len());
        for (key, r) in listed {
            let current = lifecycle::record_key(&r.environment, &r.deployment, &r.application);
            if key != current {
                // Kept under the key without its environment: moved under the current key (unless a
                // record is there already), then the old key goes. Best effort: a replica that may
                // not write reads it where it is.
                let held = self.store.inventory::<VmRecord>(&current).ok().flatten();
                let moved = match held {
                    Some(_) => Ok(()),
                    None => self.store.put_inventory(&current, &r),
                }
                .and_then(|()| self.store.remove_inventory(&key));
                if let Err(e) = moved {
                    tracing::debug!(key, error = %e, "the record stays under its old key for now");
                }
                if held.is_some() {
                    continue;
                }
            }
            records.push(r);
        }
        Ok(records)
    }

    /// Every inventory record of every Deployment.
    pub fn all_records(&self) -> Vec<VmRecord> {
        self.store
            .inventory_list::<VmRecord>("proxmox/")
            .map(|v| v.into_iter().map(|(_, r)| r).collect())
            .unwrap_or_default()
    }

    /// Sets the orphaned-VM gauge of one environment from the inventory.
    fn count_orphans(&self, environment: &str) -> usize {
        let orphaned = self
            .all_records()
            .iter()
            .filter(|r| r.environment == environment && r.phase == RecordPhase::Orphaned)
            .count();
        self.metrics
            .orphaned
            .with_label_values(&[environment])
            .set(i64::try_from(orphaned).unwrap_or(i64::MAX));
        orphaned
    }

    async fn check(&self, env: RuntimeEnvironment) -> Result<EnvironmentReport, ReconcileError> {
        let Some(spec) = env.spec.proxmox.clone() else {
            return Ok(plan_only_environment(&env));
        };
        let name = env.metadata.name.to_string();
        let environment = self.environment(&env).map_err(|e| api_error(&name, &e))?;
        let version = environment
            .api
            .version()
            .await
            .map_err(|e| api_error(&name, &e))?;
        let nodes = environment
            .api
            .online_nodes()
            .await
            .map_err(|e| api_error(&name, &e))?;
        let vms = environment
            .observe(Duration::ZERO)
            .await
            .map_err(|e| api_error(&name, &e))?;
        let template = vms.iter().find(|vm| vm.vmid == spec.template.vmid);
        let owned = vms
            .iter()
            .filter(|vm| {
                vm.tags
                    .iter()
                    .any(|t| t.starts_with(&environment.instance_prefix))
            })
            .count();
        let records: Vec<VmRecord> = self
            .all_records()
            .into_iter()
            .filter(|r| r.environment == name)
            .collect();
        let orphaned = records
            .iter()
            .filter(|r| r.phase == RecordPhase::Orphaned)
            .count();
        self.metrics
            .owned
            .with_label_values(&[&name])
            .set(i64::try_from(owned).unwrap_or(i64::MAX));
        self.metrics
            .orphaned
            .with_label_values(&[&name])
            .set(i64::try_from(orphaned).unwrap_or(i64::MAX));
        let mut warnings = Vec::new();
        let insecure = spec.tls.as_ref().is_some_and(|t| t.insecure_skip_verify);
        if insecure {
            warnings.push("TLS verification is off (insecureSkipVerify)".to_owned());
        }
        if spec.endpoint.starts_with("http://") {
            warnings.push("the endpoint is plain http://: credentials travel unencrypted".to_owned());
        }
        let missing: Vec<&str> = spec
            .nodes
            .iter()
            .map(|n| n.as_str())
            .filter(|n| !nodes.iter().any(|o| o == n))
            .collect();
        if !missing.is_empty() {
            warnings.push(format!("node(s) not online: {}", missing.join(", ")));
        }
        // Records of Deployments that are gone (say, removed while the controller was down).
        let mut gone: Vec<String> = records
            .iter()
            .filter(|r| r.phase != RecordPhase::Orphaned)
            .map(|r| r.deployment.clone())
            .filter(|d| {
                let key = ObjectKey {
                    kind: Kind::Deployment,
                    name: crate::api::Name::new(d.as_str()),
                };
                !self.desired.is_known(&key)
            })
            .collect();
        gone.dedup();
        for deployment in gone {
            if let Err(e) = self.cleanup_deployment(&deployment).await {
                warnings.push(format!("cleanup of removed Deployment {deployment}: {e}"));
            }
        }
        let orphaned = self.count_orphans(&name);
        let template_ok = template.is_some_and(|t| t.template);
        let insecure = insecure || spec.endpoint.starts_with("http://");
        if !template_ok {
            return Err(ReconcileError::Waiting {
                reason: reasons::TEMPLATE_MISSING,
                message: format!(
                    "template VM {} is missing or is not a template; create it (or fix template.vmid)",
                    spec.template.vmid
                ),
                retry_after: Duration::from_secs(60),
            });
        }
        let mut message = format!(
            "Proxmox VE {version}: {} node(s) online, template {} present, {owned} VM(s) owned",
            nodes.len(),
            spec.template.vmid
        );
        if !warnings.is_empty() {
            message.push_str("; warnings: ");
            message.push_str(&warnings.join("; "));
        }
        let facts = EnvironmentFacts {
            version: Some(version),
            nodes,
            vms_owned: u32::try_from(owned).unwrap_or(u32::MAX),
            vms_orphaned: u32::try_from(orphaned).unwrap_or(u32::MAX),
            template_present: Some(template_ok),
            insecure,
            warnings,
        };
        Ok(EnvironmentReport {
            message,
            facts: Some(facts),
        })
    }

    async fn converge_hosts(
        &self,
        deployment: Deployment,
        env: RuntimeEnvironment,
        hosts: Vec<PlannedHost>,
    ) -> Result<ProviderReport, ReconcileError> {
        if env.spec.proxmox.is_none() {
            return Ok(plan_only_report(&hosts));
        }
        let name = deployment.metadata.name.to_string();
        let env_name = env.metadata.name.to_string();
        let lock = self.deployment_lock(&name);
        let _guard = lock.lock().await;
        let environment = self.environment(&env).map_err(|e| api_error(&env_name, &e))?;
        let tag = owner_tag(&self.instance_id, &name);
        let public_key = environment
            .ssh
            .0
            .as_deref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default();
        let desired: Vec<DesiredVm> = hosts
            .iter()
            .map(|h| {
                let hash = hex(
                    format!(
                        "{}|{}|{}|{}|{}|{}",
                        h.size.cores,
                        h.size.memory_mib,
                        environment.spec.bridge,
                        environment.ssh.1,
                        public_key.trim(),
                        tag
                    )
                    .as_bytes(),
                    8,
                );
                DesiredVm {
                    application: h.application.to_string(),
                    name: h.name.clone(),
                    cores: h.size.cores,
                    memory_mib: u32::try_from(h.size.memory_mib).unwrap_or(u32::MAX),
                    disk_gib: u32::try_from(h.size.disk_gib).unwrap_or(u32::MAX),
                    config_hash: hash,
                }
            })
            .collect();
        let ctx = PlanContext {
            owner_tag: tag,
            template: environment.spec.template.vmid,
            deletion_policy: deployment.spec.deletion_policy,
            allow_restart: deployment
                .metadata
                .annotations
                .get(ALLOW_RESTART_ANNOTATION)
                .is_some_and(|v| v == "true"),
        };
        let records: Vec<VmRecord> = self.records(&name)?;
        // Keep the deletion policy in the inventory, so cleanup after removal knows it.
        for r in &records {
            if r.deletion_policy != ctx.deletion_policy {
                let mut r = r.clone();
                r.deletion_policy = ctx.deletion_policy;
                self.store
                    .put_inventory(
                        &lifecycle::record_key(&r.environment, &r.deployment, &r.application),
                        &r,
                    )
                    .map_err(|e| store_error(&e))?;
            }
        }
        let records = self.records(&name)?;
        let result = self.run_hosts(&environment, &name, &desired, records, &ctx).await;
        self.count_orphans(&env_name);
        let (statuses, results) = result?;
        for (kind, _) in results.iter().flat_map(|r| &r.drift) {
            self.metrics
                .drift
                .with_label_values(&[env_name.as_str(), kind])
                .inc();
        }
        // The next drift scan of one of its VMs.
        let next_drift_scan = || {
            (!environment.drift.interval().is_zero())
                .then(|| {
                    self.records(&name)
                        .unwrap_or_default()
                        .iter()
                        .filter(|r| r.phase == RecordPhase::Present)
                        .map(|r| environment.drift.due_in(r.vmid))
                        .min()
                })
                .flatten()
        };
        Ok(report::deployment_report(
            statuses,
            &results,
            desired.len(),
            next_drift_scan,
        ))
    }

    /// Plans and runs every host of one Deployment; returns the host statuses and each plan's outcome.
    async fn run_hosts(
        &self,
        environment: &Environment,
        deployment: &str,
        desired: &[DesiredVm],
        records: Vec<VmRecord>,
        ctx: &PlanContext,
    ) -> Result<(Vec<HostStatus>, Vec<HostResult>), ReconcileError> {
        let env_name = environment.name.clone();
        let records: Vec<VmRecord> = records
            .into_iter()
            .filter(|r| r.environment == env_name)
            .collect();
        let vmids: Vec<u32> = records.iter().map(|r| r.vmid).collect();
        let vms = environment
            .observe_for(lifecycle::LISTING_MAX_AGE, &vmids)
            .await
            .map_err(|e| api_error(&env_name, &e))?;
        let plans = plan::plan(desired, &vms, &records, ctx);
        // Hosts are independent: they run at once, within the environment's cap on operations in
        // flight; VMID allocation is serialised by the environment itself.
        let runs = plans
            .into_iter()
            .map(|first| self.run_host(environment, deployment, desired, &records, ctx, &vms, first));
        let mut statuses = Vec::new();
        let mut results = Vec::new();
        let mut first_error = None;
        for mut result in futures_util::future::join_all(runs).await {
            if let Some(e) = result.error.take() {
                first_error.get_or_insert(e);
            }
            statuses.extend(result.status.take());
            results.push(result);
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        Ok((statuses, results))
    }

    /// Runs one host's plan (made from the listing `listed`), observing and planning again after each
    /// task (up to four rounds); a converged host's config is scanned for drift when its turn comes.
    #[allow(clippy::too_many_arguments)] // reason: the pieces of one Deployment's run, borrowed from run_hosts
    async fn run_host(
        &self,
        environment: &Environment,
        deployment: &str,
        desired: &[DesiredVm],
        records: &[VmRecord],
        ctx: &PlanContext,
        listed: &Arc<Vec<client::VmResource>>,
        first: plan::HostPlan,
    ) -> HostResult {
        let env_name = &environment.name;
        let host = desired.iter().find(|h| h.application == first.application);
        let mut record = records
            .iter()
            .find(|r| r.application == first.application)
            .cloned();
        let mut hplan = first;
        let mut outcome = HostOutcome::Done;
        let mut error = None;
        let mut vms = listed.clone();
        let mut wake_after = None;
        let mut drift = Vec::new();
        let no_op = hplan.steps.is_empty();
        let stopped_out_of_band = record
            .as_ref()
            .is_some_and(|r| r.phase == RecordPhase::Present && r.address.is_some() && r.task.is_none())
            && hplan.steps.contains(&Step::Start);
        if stopped_out_of_band && let Some((vmid, _)) = hplan.vm {
            drift.push((
                "stopped",
                format!(
                    "{}: VM {vmid} was stopped out of band; starting it again",
                    hplan.name
                ),
            ));
        }
        let mut uptime = 0;
        for round in 0..4 {
            if round > 0 {
                // A listing taken after our last change to this host's VM: the pass sees what the last
                // step did, and hosts that finished a step at about the same time share one listing.
                let vmids: Vec<u32> = record.iter().map(|r| r.vmid).collect();
                vms = match environment.observe_for(lifecycle::LISTING_MAX_AGE, &vmids).await {
                    Ok(v) => v,
                    Err(e) => {
                        error = Some(api_error(env_name, &e));
                        break;
                    }
                };
                hplan = match host {
                    Some(h) => plan::plan_host(h, record.as_ref(), &vms, ctx),
                    None => match &record {
                        Some(r) => plan::plan_removal(r, &vms, ctx),
                        None => break,
                    },
                };
            }
            let listed_vm = hplan
                .vm
                .as_ref()
                .and_then(|(id, _)| vms.iter().find(|v| v.vmid == *id && v.running));
            let running = listed_vm.is_some();
            uptime = listed_vm.map_or(0, |v| v.uptime);
            if !hplan.duplicates.is_empty() {
                tracing::warn!(deployment, host = %hplan.name, duplicates = ?hplan.duplicates, "more than one VM of ours carries this host's name; only one is managed, the others are left alone");
            }
            let mut run = lifecycle::HostRun {
                env: environment,
                store: &self.store,
                deployment,
                desired: host,
                ctx,
                record: record.clone(),
                running,
                uptime,
                wake_after: None,
            };
            let result = run.run(&hplan).await;
            record = run.record.clone();
            wake_after = run.wake_after;
            match result {
                Ok(HostOutcome::Waiting {
                    reason: reasons::REOBSERVE,
                    ..
                }) if round < 3 => continue,
                Ok(o) => {
                    outcome = o;
                    break;
                }
                Err(e) => {
                    error = Some(lifecycle_error(env_name, &e));
                    break;
                }
            }
        }
        // A converged host's drift scan, when its turn comes and the budget allows.
        let scannable = record
            .as_ref()
            .filter(|r| r.phase == RecordPhase::Present && r.task.is_none() && r.address.is_some());
        if let (true, HostOutcome::Done, None, Some(h), Some(r)) = (no_op, &outcome, &error, host, scannable)
            && environment.drift.take(r.vmid).is_ok()
        {
            let mut run = lifecycle::HostRun {
                env: environment,
                store: &self.store,
                deployment,
                desired: Some(h),
                ctx,
                record: record.clone(),
                running: vms.iter().any(|v| v.vmid == r.vmid && v.running),
                uptime,
                wake_after: None,
            };
            match run.scan_drift().await {
                Ok(found) => {
                    for (key, value) in &found {
                        let kind = drift::kind_of_key(key);
                        let message = if matches!(kind, "cpu" | "memory") {
                            format!(
                                "{}: VM {} had {key} {value} (changed out of band); put back",
                                h.name, r.vmid
                            )
                        } else {
                            format!(
                                "{}: VM {} had {key} changed out of band; put back",
                                h.name, r.vmid
                            )
                        };
                        drift.push((kind, message));
                    }
                    if !found.is_empty() && run.record.as_ref().is_some_and(|r| !r.pending.is_empty()) {
                        // What waits for a restart: restart if allowed, else say so.
                        let step = if ctx.allow_restart {
                            Step::Restart
                        } else {
                            Step::ReportPending
                        };
                        let plan = plan::HostPlan {
                            name: h.name.clone(),
                            application: h.application.clone(),
                            vm: Some((r.vmid, r.node.clone())),
                            steps: vec![step],
                            duplicates: Vec::new(),
                        };
                        match run.run(&plan).await {
                            Ok(o) => outcome = o,
                            Err(e) => error = Some(lifecycle_error(env_name, &e)),
                        }
                        wake_after = run.wake_after;
                    }
                    record = run.record.clone();
                }
                Err(e) => error = Some(lifecycle_error(env_name, &e)),
            }
        }
        let status = host.map(|h| report::host_status(&h.name, &outcome, record.as_ref()));
        HostResult {
            status,
            outcome,
            error,
            wake_after,
            drift,
        }
    }

    /// The records of `deployment`'s VMs in `env` that `keep` accepts, read under the Deployment's
    /// lock (returned with them), and the environment's name; `None` when there are none (or `env`
    /// is not a Proxmox cluster).
    async fn moved_records(
        &self,
        deployment: &str,
        env: &RuntimeEnvironment,
        keep: impl Fn(&VmRecord) -> bool,
    ) -> Result<Option<(tokio::sync::OwnedMutexGuard<()>, String, Vec<VmRecord>)>, ReconcileError> {
        if env.spec.proxmox.is_none() {
            return Ok(None);
        }
        let env_name = env.metadata.name.to_string();
        let guard = self.deployment_lock(deployment).lock_owned().await;
        let records: Vec<VmRecord> = self
            .records(deployment)?
            .into_iter()
            .filter(|r| r.environment == env_name && keep(r))
            .collect();
        Ok((!records.is_empty()).then_some((guard, env_name, records)))
    }

    /// Destroys the VMs of `deployment` recorded in `env` after the Deployment moved away from it
    /// (each re-verified as ours — name and owner tag — right before it is stopped and destroyed with
    /// purge; anything else is left alone). Returns whether no VM of it is recorded there any more.
    pub async fn destroy_moved(
        &self,
        deployment: &str,
        env: &RuntimeEnvironment,
    ) -> Result<bool, ReconcileError> {
        let Some((_guard, env_name, records)) = self.moved_records(deployment, env, |_| true).await? else {
            return Ok(true);
        };
        let environment = self.environment(env).map_err(|e| api_error(&env_name, &e))?;
        let ctx = PlanContext {
            owner_tag: owner_tag(&self.instance_id, deployment),
            template: environment.spec.template.vmid,
            deletion_policy: DeletionPolicy::Delete,
            allow_restart: false,
        };
        let result = self.run_hosts(&environment, deployment, &[], records, &ctx).await;
        self.count_orphans(&env_name);
        result?;
        Ok(!self
            .records(deployment)?
            .iter()
            .any(|r| r.environment == env_name))
    }

    /// Stops the VMs of `deployment` recorded in `env` after the Deployment moved away from it, and
    /// keeps them with their disks (each re-verified as ours right before). Returns whether every one
    /// of them is stopped.
    pub async fn stop_moved(
        &self,
        deployment: &str,
        env: &RuntimeEnvironment,
    ) -> Result<bool, ReconcileError> {
        let Some((_guard, env_name, records)) = self
            .moved_records(deployment, env, |r| r.phase == RecordPhase::Present)
            .await?
        else {
            return Ok(true);
        };
        let environment = self.environment(env).map_err(|e| api_error(&env_name, &e))?;
        let ctx = PlanContext {
            owner_tag: owner_tag(&self.instance_id, deployment),
            template: environment.spec.template.vmid,
            deletion_policy: DeletionPolicy::Retain,
            allow_restart: false,
        };
        let vmids: Vec<u32> = records.iter().map(|r| r.vmid).collect();
        let vms = environment
            .observe_for(lifecycle::LISTING_MAX_AGE, &vmids)
            .await
            .map_err(|e| api_error(&env_name, &e))?;
        let mut stopped = true;
        for record in records {
            let running = vms.iter().any(|v| v.vmid == record.vmid && v.running);
            if record.task.is_none() && !running {
                continue;
            }
            let plan = plan::HostPlan {
                name: record.name.clone(),
                application: record.application.clone(),
                vm: Some((record.vmid, record.node.clone())),
                steps: match &record.task {
                    Some(upid) => vec![Step::FollowTask { upid: upid.clone() }],
                    None => vec![Step::Stop],
                },
                duplicates: Vec::new(),
            };
            let mut run = lifecycle::HostRun {
                env: &environment,
                store: &self.store,
                deployment,
                desired: None,
                ctx: &ctx,
                record: Some(record),
                running,
                uptime: 0,
                wake_after: None,
            };
            match run.run(&plan).await {
                Ok(HostOutcome::Done | HostOutcome::Removed) if plan.steps == [Step::Stop] => {}
                Ok(_) => stopped = false,
                Err(e) => return Err(lifecycle_error(&env_name, &e)),
            }
        }
        Ok(stopped)
    }

    /// Removes (or orphans) every VM recorded for a Deployment that is gone, by its recorded policy.
    async fn cleanup_deployment(&self, deployment: &str) -> Result<(), ReconcileError> {
        let lock = self.deployment_lock(deployment);
        let _guard = lock.lock().await;
        let records = self.records(deployment)?;
        let mut by_env: HashMap<String, Vec<VmRecord>> = HashMap::new();
        for r in records {
            by_env.entry(r.environment.clone()).or_default().push(r);
        }
        for (env_name, records) in by_env {
            let key = ObjectKey {
                kind: Kind::RuntimeEnvironment,
                name: crate::api::Name::new(env_name.as_str()),
            };
            let env = match self.desired.object(&key) {
                Some(Object::RuntimeEnvironment(env)) => env,
                _ => {
                    // Without its environment nothing can be checked: keep the VMs, as orphans.
                    for mut r in records {
                        r.phase = RecordPhase::Orphaned;
                        self.store
                            .put_inventory(
                                &lifecycle::record_key(&r.environment, &r.deployment, &r.application),
                                &r,
                            )
                            .map_err(|e| store_error(&e))?;
                    }
                    tracing::warn!(deployment, environment = %env_name, "the environment is gone: VMs kept as orphans");
                    continue;
                }
            };
            let environment = self.environment(&env).map_err(|e| api_error(&env_name, &e))?;
            let policy = if records
                .iter()
                .any(|r| r.deletion_policy == DeletionPolicy::Delete)
            {
                DeletionPolicy::Delete
            } else {
                DeletionPolicy::Retain
            };
            let ctx = PlanContext {
                owner_tag: owner_tag(&self.instance_id, deployment),
                template: environment.spec.template.vmid,
                deletion_policy: policy,
                allow_restart: false,
            };
            let result = self.run_hosts(&environment, deployment, &[], records, &ctx).await;
            self.count_orphans(&env_name);
            let (_, results) = result?;
            if let Some(HostOutcome::Waiting { reason, message }) = results
                .into_iter()
                .map(|r| r.outcome)
                .find(|o| matches!(o, HostOutcome::Waiting { .. }))
            {
                return Err(ReconcileError::Waiting {
                    reason,
                    message,
                    retry_after: Duration::from_secs(2),
                });
            }
        }
        Ok(())
    }
}

fn store_error(e: &crate::store::StoreError) -> ReconcileError {
    ReconcileError::Transient {
        reason: reasons::STORE_ERROR,
        message: e.to_string(),
    }
}

fn lifecycle_error(env: &str, e: &LifecycleError) -> ReconcileError {
    match e {
        LifecycleError::Api(e) => api_error(env, e),
        LifecycleError::Store(e) => store_error(e),
        LifecycleError::RangeExhausted { .. } => ReconcileError::Waiting {
            reason: reasons::RANGE_EXHAUSTED,
            message: e.to_string(),
            retry_after: Duration::from_secs(60),
        },
        LifecycleError::TemplateMissing(_) => ReconcileError::Waiting {
            reason: reasons::TEMPLATE_MISSING,
            message: e.to_string(),
            retry_after: Duration::from_secs(60),
        },
    }
}

/// Maps an API failure to the runtime's classes: what a person must fix waits; the rest backs off.
fn api_error(env: &str, e: &ProxmoxError) -> ReconcileError {
    let message = format!("RuntimeEnvironment {env}: {e}");
    let wait = |reason| ReconcileError::Waiting {
        reason,
        message: message.clone(),
        retry_after: Duration::from_secs(60),
    };
    match e {
        ProxmoxError::Unauthorized(_) => wait(reasons::UNAUTHORIZED),
        ProxmoxError::Forbidden(_) => wait(reasons::FORBIDDEN),
        ProxmoxError::Tls(_) => wait(reasons::TLS_FAILED),
        ProxmoxError::Config(_) => wait(reasons::CONFIG_ERROR),
        ProxmoxError::Unreachable(_) => ReconcileError::Transient {
            reason: reasons::UNREACHABLE,
            message,
        },
        _ => ReconcileError::Transient {
            reason: reasons::API_ERROR,
            message,
        },
    }
}

impl Provider for ProxmoxProvider {
    fn check_environment(
        &self,
        env: &RuntimeEnvironment,
    ) -> BoxFuture<Result<EnvironmentReport, ReconcileError>> {
        let env = env.clone();
        let this = self.handle();
        Box::pin(async move { this.check(env).await })
    }

    fn converge(&self, request: ConvergeRequest<'_>) -> BoxFuture<Result<ProviderReport, ReconcileError>> {
        // The VMs' own inventory says what they are; the previous status is not needed here.
        let (deployment, env, hosts) = (
            request.deployment.clone(),
            request.env.clone(),
            request.hosts.to_vec(),
        );
        let this = self.handle();
        Box::pin(async move { this.converge_hosts(deployment, env, hosts).await })
    }

    fn cleanup(&self, deployment: &ObjectKey) -> BoxFuture<Result<(), ReconcileError>> {
        let name = deployment.name.to_string();
        let this = self.handle();
        Box::pin(async move { this.cleanup_deployment(&name).await })
    }
}

/// Which infrastructure backend the daemon uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProviderKind {
    /// Proxmox VE VMs for environments with `proxmox` (static-only environments are planned).
    Proxmox,
    /// Plan hosts, touch nothing.
    PlanOnly,
}

/// Why the daemon's provider cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The instance id cannot be read or kept.
    #[error("cannot keep the controller instance id in {dir}: {source}")]
    InstanceId {
        /// The state directory.
        dir: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The provider's metrics cannot be registered.
    #[error("cannot register the Proxmox metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Builds the daemon's provider, registering its metrics in `registry`; owned VMs are scanned for drift
/// every `drift_interval`. The Proxmox provider is also returned as itself (migrations retire the VMs
/// an environment no longer runs through it), `None` when plan-only.
pub fn build_provider(
    kind: ProviderKind,
    drift_interval: Duration,
    instance: Option<&str>,
    state_dir: &Path,
    store: &Arc<Store>,
    desired: Arc<dyn Objects>,
    registry: &prometheus::Registry,
) -> Result<(Arc<dyn Provider>, Option<ProxmoxProvider>), BuildError> {
    match kind {
        ProviderKind::PlanOnly => Ok((Arc::new(crate::provider::PlanOnly), None)),
        ProviderKind::Proxmox => {
            let id = instance_id(state_dir, instance).map_err(|source| BuildError::InstanceId {
                dir: state_dir.display().to_string(),
                source,
            })?;
            let metrics = ProxmoxMetrics::register(registry)?;
            tracing::info!(owner_tag_prefix = %instance_prefix(&id), "Proxmox provider enabled");
            let provider = ProxmoxProvider::new(store.clone(), desired, id, metrics, RateLimit::default())
                .with_drift_interval(drift_interval);
            Ok((Arc::new(provider.clone()), Some(provider)))
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::api::Object;
    use crate::proxmox::client::Method::Get;
    use crate::proxmox::fake::ScriptedApi;

    /// No desired objects at all.
    struct Nothing;

    impl Objects for Nothing {
        fn object(&self, _: &ObjectKey) -> Option<Object> {
            None
        }

        fn is_known(&self, _: &ObjectKey) -> bool {
            false
        }
    }

    fn lab() -> RuntimeEnvironment {
        serde_json::from_value(json!({
            "apiVersion": "fediversity.eu/v1alpha1",
            "kind": "RuntimeEnvironment",
            "metadata": { "name": "lab" },
            "spec": {
                "proxmox": {
                    "endpoint": "https://pve.example.net:8006",
                    "credentials": { "tokenId": "ci@pve!ctl", "secretFile": "/run/secrets/token" },
                    "nodes": ["pve"],
                    "template": { "vmid": 9000 },
                    "storage": "local-lvm",
                    "bridge": "vmbr0",
                    "vmidRange": { "start": 100, "end": 199 }
                },
                "ssh": { "privateKeyFile": "/run/secrets/key" }
            }
        }))
        .expect("a valid RuntimeEnvironment")
    }

    #[tokio::test(start_paused = true)]
    async fn a_provider_over_a_scripted_api_checks_its_environment_and_scans_at_the_drift_interval_given() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let api = ScriptedApi::new();
        let ours = owner_tag("instance-1", "uni");
        api.expect(Get, "/version", Ok(json!({ "version": "9.1.3", "release": "9.1" })))
            .expect(
                Get,
                "/nodes",
                Ok(json!([{ "node": "pve", "status": "online" }, { "node": "pve2", "status": "offline" }])),
            )
            .expect(
                Get,
                "/cluster/resources",
                Ok(json!([
                    { "type": "qemu", "vmid": 9000, "node": "pve", "name": "nixos", "template": 1 },
                    { "type": "qemu", "vmid": 101, "node": "pve", "name": "uni-mastodon", "tags": format!("fediversity;{ours}") },
                    { "type": "qemu", "vmid": 102, "node": "pve", "name": "someone-else", "tags": "prod" }
                ])),
            );
        let built = Arc::new(Mutex::new(0));
        let factory = {
            let (api, built) = (api.api(), built.clone());
            move |_: &RuntimeEnvironment, _: ProxmoxMetrics| {
                *built.lock().unwrap() += 1;
                Ok(api.clone())
            }
        };
        let metrics = ProxmoxMetrics::register(&prometheus::Registry::new()).unwrap();
        let provider = ProxmoxProvider::with_factory(
            store,
            Arc::new(Nothing),
            "instance-1".into(),
            metrics,
            Box::new(factory),
        )
        .with_drift_interval(Duration::from_secs(90));

        let report = provider
            .check_environment(&lab())
            .await
            .expect("the check passes");

        api.assert_done();
        let facts = report.facts.expect("a Proxmox check reports what it saw");
        assert_eq!(facts.version.as_deref(), Some("9.1.3"));
        assert_eq!(facts.nodes, ["pve"]);
        assert_eq!(facts.vms_owned, 1, "only the VM with our owner tag");
        assert_eq!(facts.template_present, Some(true));
        let environment = provider.environment(&lab()).unwrap();
        assert_eq!(*built.lock().unwrap(), 1, "one client per environment");
        assert_eq!(environment.drift.interval(), Duration::from_secs(90));
        assert!(environment.drift.due_in(101) <= Duration::from_secs(90));
    }

    fn vm_record(environment: &str, vmid: u32) -> VmRecord {
        VmRecord {
            environment: environment.into(),
            deployment: "uni".into(),
            application: "mastodon".into(),
            name: "uni-mastodon".into(),
            owner_tag: owner_tag("instance-1", "uni"),
            vmid,
            node: "pve".into(),
            phase: RecordPhase::Present,
            task: None,
            configured: None,
            pending: Vec::new(),
            address: Some(format!("192.0.2.{}", vmid % 200)),
            deletion_policy: DeletionPolicy::Delete,
        }
    }

    #[test]
    fn a_hosts_vms_in_two_environments_keep_their_own_records_and_an_old_key_moves_on_first_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let metrics = ProxmoxMetrics::register(&prometheus::Registry::new()).unwrap();
        let provider = ProxmoxProvider::with_factory(
            store.clone(),
            Arc::new(Nothing),
            "instance-1".into(),
            metrics,
            Box::new(|_: &RuntimeEnvironment, _: ProxmoxMetrics| Ok(ScriptedApi::new().api())),
        );
        // Written before the environment was part of the key.
        store
            .put_inventory(
                &lifecycle::legacy_record_key("uni", "mastodon"),
                &vm_record("a", 101),
            )
            .unwrap();
        store
            .put_inventory(
                &lifecycle::record_key("b", "uni", "mastodon"),
                &vm_record("b", 201),
            )
            .unwrap();

        let mut records = provider.records("uni").unwrap();
        records.sort_by_key(|r| r.vmid);

        assert_eq!(records, vec![vm_record("a", 101), vm_record("b", 201)]);
        assert_eq!(
            store
                .inventory::<VmRecord>(&lifecycle::legacy_record_key("uni", "mastodon"))
                .unwrap(),
            None,
            "the old key is gone"
        );
        assert_eq!(
            recorded_vm(&store, "a", "uni", "mastodon").unwrap(),
            Some(vm_record("a", 101))
        );
        assert_eq!(
            recorded_vm(&store, "b", "uni", "mastodon").unwrap(),
            Some(vm_record("b", 201))
        );
        assert_eq!(recorded_vm(&store, "c", "uni", "mastodon").unwrap(), None);
    }

    #[test]
    fn owner_tags_are_valid_proxmox_tags_distinct_per_deployment_and_instance() {
        let a = owner_tag("instance-1", "uni");
        let b = owner_tag("instance-1", "other");
        let c = owner_tag("instance-2", "uni");
        assert!(a.starts_with(&instance_prefix("instance-1")));
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "{a}"
        );
        assert_eq!(a, owner_tag("instance-1", "uni"), "stable across restarts");
    }
}
