//! Runs planned steps against one environment: observes once per pass, reserves VMIDs under a lock,
//! writes intents and inventory before acting, follows every task's UPID to its end.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::client::{
    Api, CloneRequest, ProxmoxError, TaskState, VmResource, encode_ssh_keys, parse_tags, upid_type,
};
use super::drift::DriftSchedule;
use super::metrics::ProxmoxMetrics;
use super::pace::{INLINE_WAIT, Pace, Work};
use super::plan::{ConfigOwnership, DesiredVm, HostPlan, PlanContext, RecordPhase, Step, VmRecord, is_ours};
use crate::api::{CloneMode, ProxmoxSpec};
use crate::store::Store;

/// The tag every VM of this controller carries.
pub const COMMON_TAG: &str = "fediversity";
/// How old a shared VM listing may be for a pass that changes nothing.
pub const LISTING_MAX_AGE: Duration = Duration::from_secs(5);
/// How old the listing that a VMID is reserved from may be (VMIDs of our own records come from the
/// store; a VM created by someone else since then makes the clone fail, and a fresh look follows).
const ALLOCATION_LISTING_MAX_AGE: Duration = Duration::from_secs(1);
/// How long a new task may be unknown to the API before it counts as gone.
const NEW_TASK_GRACE: Duration = Duration::from_secs(5);

/// The inventory key prefix of one Deployment's VMs.
pub fn record_prefix(deployment: &str) -> String {
    format!("proxmox/{deployment}/")
}

/// The inventory key of one host's VM in one environment: a Deployment that moves keeps a VM per
/// host in each environment it runs in during the move, each under its own key.
pub fn record_key(environment: &str, deployment: &str, application: &str) -> String {
    format!("proxmox/{deployment}/{application}/{environment}")
}

/// The key a host's VM was kept under before the environment was part of it (read and moved to
/// [`record_key`] by the provider).
pub fn legacy_record_key(deployment: &str, application: &str) -> String {
    format!("proxmox/{deployment}/{application}")
}

/// What a host's steps ended in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostOutcome {
    /// Every step is done.
    Done,
    /// Waiting on something outside (a lock, a task, the agent, a restart that is not allowed).
    Waiting {
        /// A CamelCase reason.
        reason: &'static str,
        /// Details.
        message: String,
    },
    /// The record is gone (the host was removed).
    Removed,
}

/// A failure while running steps.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// The API failed.
    #[error("{0}")]
    Api(#[from] ProxmoxError),
    /// The store failed.
    #[error("failed to record the inventory: {0}")]
    Store(#[from] crate::store::StoreError),
    /// No VMID is free in the range.
    #[error("no free VMID left in vmidRange {start}-{end}")]
    RangeExhausted {
        /// First VMID.
        start: u32,
        /// Last VMID.
        end: u32,
    },
    /// The template is not there.
    #[error("template VM {0} is missing (or is not a template)")]
    TemplateMissing(u32),
}

/// One Proxmox environment in use: its client, its VMID lock and its shared VM listing.
pub struct Environment {
    /// The RuntimeEnvironment's name.
    pub name: String,
    /// Its Proxmox spec.
    pub spec: ProxmoxSpec,
    /// The API.
    pub api: Api,
    /// The owner-tag prefix of this controller instance (`fediversity-owner-<instance>-`).
    pub instance_prefix: String,
    /// The SSH public key file and login user for cloud-init.
    pub ssh: (Option<String>, String),
    metrics: ProxmoxMetrics,
    alloc: tokio::sync::Mutex<()>,
    listing: Mutex<Option<(Instant, Arc<Vec<VmResource>>)>>,
    listing_flight: tokio::sync::Mutex<()>,
    /// When each VM was last changed by us: a listing older than that is stale for it.
    changed: Mutex<HashMap<u32, Instant>>,
    /// When to poll tasks and guest agents, learned from this environment.
    pub pace: Pace,
    /// When each owned VM's config is read for drift.
    pub drift: DriftSchedule,
}

/// Where a followed task stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Followed {
    /// It ended (at the latest `ended_ago`, when this look came later than planned).
    Done {
        /// How it ended.
        state: TaskState,
        /// How long ago it had ended at the latest.
        ended_ago: Duration,
    },
    /// It runs; look again after this long (the reconcile ends meanwhile).
    Running {
        /// When the next poll is due.
        wake_after: Duration,
    },
}

impl Environment {
    /// An environment over `api`.
    pub fn new(
        name: String,
        spec: ProxmoxSpec,
        api: Api,
        instance_prefix: String,
        ssh: (Option<String>, String),
        metrics: ProxmoxMetrics,
    ) -> Self {
        Self {
            name,
            spec,
            api,
            instance_prefix,
            ssh,
            metrics,
            alloc: tokio::sync::Mutex::new(()),
            listing: Mutex::new(None),
            listing_flight: tokio::sync::Mutex::new(()),
            changed: Mutex::new(HashMap::new()),
            pace: Pace::default(),
            drift: DriftSchedule::new(super::drift::DEFAULT_DRIFT_INTERVAL),
        }
    }

    /// The same environment with drift scans every `interval` (zero: on every pass, within the budget).
    pub fn with_drift_interval(mut self, interval: Duration) -> Self {
        self.drift = DriftSchedule::new(interval);
        self
    }

    /// The VM listing, shared by every pass within `max_age` (one request serves them all).
    pub async fn observe(&self, max_age: Duration) -> Result<Arc<Vec<VmResource>>, ProxmoxError> {
        self.observe_for(max_age, &[]).await
    }

    /// The VM listing as [`Self::observe`] gives it, and taken after our last change to any of `vmids`.
    pub async fn observe_for(
        &self,
        max_age: Duration,
        vmids: &[u32],
    ) -> Result<Arc<Vec<VmResource>>, ProxmoxError> {
        let last_change = {
            let changed = self
                .changed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            vmids.iter().filter_map(|v| changed.get(v)).max().copied()
        };
        let cached = |this: &Self| {
            this.listing
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .as_ref()
                .filter(|(at, _)| {
                    at.elapsed() <= max_age && !max_age.is_zero() && last_change.is_none_or(|c| *at > c)
                })
                .map(|(_, l)| l.clone())
        };
        if let Some(l) = cached(self) {
            return Ok(l);
        }
        let _flight = self.listing_flight.lock().await;
        if let Some(l) = cached(self) {
            return Ok(l);
        }
        let started = Instant::now();
        let list = Arc::new(self.api.list_vms().await?);
        *self
            .listing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((started, list.clone()));
        Ok(list)
    }

    /// Marks `vmid` changed by us now: listings taken before are stale for it.
    pub fn touched(&self, vmid: u32) {
        let mut changed = self
            .changed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if changed.len() > 10_000 {
            changed.retain(|_, at| at.elapsed() < LISTING_MAX_AGE);
        }
        changed.insert(vmid, Instant::now());
    }

    /// Forgets the shared listing (after a change of ours).
    pub fn invalidate(&self) {
        *self
            .listing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    /// Follows a task: polls it when the pace says it is likely done, waiting inline for at most
    /// [`INLINE_WAIT`] in all; a longer wait ends with [`Followed::Running`] and the time of the next poll.
    pub async fn follow(&self, upid: &str) -> Result<Followed, ProxmoxError> {
        let started = tokio::time::Instant::now();
        let work = Work::of_task(upid_type(upid));
        loop {
            let watched = self.pace.next_task_poll(upid);
            let wait = watched.unwrap_or(Duration::ZERO);
            if !wait.is_zero() && started.elapsed() + wait > INLINE_WAIT {
                return Ok(Followed::Running { wake_after: wait });
            }
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            match self.api.task_state(upid).await {
                Ok(TaskState::Running) => {}
                Ok(done) => {
                    let ended_ago = self.pace.task_done(upid);
                    let result = if done == TaskState::Succeeded {
                        "ok"
                    } else {
                        "failed"
                    };
                    self.metrics
                        .tasks
                        .with_label_values(&[upid_type(upid), result])
                        .inc();
                    return Ok(Followed::Done {
                        state: done,
                        ended_ago,
                    });
                }
                // A brand-new task can be unknown for a moment; an old one may have been rotated out.
                Err(ProxmoxError::NotFound(_)) if started.elapsed() < NEW_TASK_GRACE => {}
                Err(ProxmoxError::NotFound(m)) => {
                    self.pace.task_done(upid);
                    return Ok(Followed::Done {
                        state: TaskState::Failed(m),
                        ended_ago: Duration::ZERO,
                    });
                }
                Err(e) => return Err(e),
            }
            if watched.is_none() {
                // A task from before a restart: watched from now on.
                self.pace.task_started(upid, work);
            }
            self.pace.task_pending(upid);
        }
    }
}

/// Runs the steps of one host. `record` is the host's inventory entry (updated and stored as it goes).
pub struct HostRun<'a> {
    /// The environment.
    pub env: &'a Environment,
    /// The store holding the inventory.
    pub store: &'a Store,
    /// The Deployment's name.
    pub deployment: &'a str,
    /// The host as desired (absent when it is being removed).
    pub desired: Option<&'a DesiredVm>,
    /// Planning context.
    pub ctx: &'a PlanContext,
    /// The record.
    pub record: Option<VmRecord>,
    /// Whether the VM runs, as observed (kept up to date by the steps).
    pub running: bool,
    /// Seconds since the VM started, as listed.
    pub uptime: u64,
    /// When a wait this run ended in should be looked at again (set with a `Waiting` outcome).
    pub wake_after: Option<Duration>,
}

fn waiting(reason: &'static str, message: impl Into<String>) -> HostOutcome {
    HostOutcome::Waiting {
        reason,
        message: message.into(),
    }
}

impl HostRun<'_> {
    /// Refuses to touch Proxmox unless this replica may act now (it leads, with a lease renewed
    /// recently enough; always true with the embedded store). Checked right before each change.
    fn may_act(&self) -> Result<(), LifecycleError> {
        if self.store.may_act() {
            Ok(())
        } else {
            Err(crate::store::StoreError::NotLeader.into())
        }
    }

    fn save(&self) -> Result<(), LifecycleError> {
        if let Some(r) = &self.record {
            self.store
                .put_inventory(&record_key(&r.environment, &r.deployment, &r.application), r)?;
        }
        Ok(())
    }

    fn forget(&mut self) -> Result<(), LifecycleError> {
        if let Some(r) = self.record.take() {
            self.store
                .remove_inventory(&record_key(&r.environment, &r.deployment, &r.application))?;
        }
        Ok(())
    }

    fn vm(&self) -> Option<(u32, String)> {
        self.record.as_ref().map(|r| (r.vmid, r.node.clone()))
    }

    /// Runs `plan`'s steps in order; stops at the first wait.
    pub async fn run(&mut self, plan: &HostPlan) -> Result<HostOutcome, LifecycleError> {
        for step in &plan.steps {
            let outcome = self.step(step).await?;
            if outcome != HostOutcome::Done {
                return Ok(outcome);
            }
        }
        Ok(HostOutcome::Done)
    }

    /// What `step` does, in words for the Deployment's status while it runs (`None`: not worth saying).
    fn describe(&self, step: &Step) -> Option<String> {
        let host = self
            .desired
            .map(|h| h.name.as_str())
            .or(self.record.as_ref().map(|r| r.name.as_str()))?;
        let vm = self
            .record
            .as_ref()
            .map_or_else(|| "its VM".to_owned(), |r| format!("VM {}", r.vmid));
        let what = match step {
            Step::Allocate => "reserving a VMID and cloning the template".to_owned(),
            Step::Clone { vmid } => format!("cloning the template into VM {vmid}"),
            Step::Configure => format!("configuring {vm} (size, network, cloud-init)"),
            Step::Resize { gib } => format!("growing the disk of {vm} to {gib} GiB"),
            Step::Start => format!("starting {vm}"),
            Step::Restart if self.record.as_ref().is_some_and(|r| !r.pending.is_empty()) => {
                format!("restarting {vm} to apply pending changes")
            }
            Step::AwaitAgent => format!("waiting for {vm} to boot and report its address"),
            Step::Destroy => format!("destroying {vm}"),
            Step::Stop => format!("stopping {vm}"),
            _ => return None,
        };
        Some(format!("{host}: {what}"))
    }

    async fn step(&mut self, step: &Step) -> Result<HostOutcome, LifecycleError> {
        if let Some(what) = self.describe(step) {
            crate::provider::progress::report(what);
        }
        let env = self.env;
        match step {
            Step::FollowTask { upid } => {
                let state = env.follow(upid).await?;
                match state {
                    Followed::Running { wake_after } => {
                        self.wake_after = Some(wake_after);
                        Ok(waiting(
                            super::reasons::TASK_RUNNING,
                            format!("task {} still running", upid_type(upid)),
                        ))
                    }
                    Followed::Done { state, ended_ago } => {
                        self.task_ended(upid, &state, ended_ago);
                        if let Some(r) = &mut self.record {
                            r.task = None;
                        }
                        self.save()?;
                        if let TaskState::Failed(m) = state {
                            tracing::warn!(deployment = self.deployment, task = upid_type(upid), error = %m, "a task failed; observing again");
                        }
                        Ok(waiting(super::reasons::REOBSERVE, "observing again after a task"))
                    }
                }
            }
            Step::Adopt { vmid, node } => {
                let Some(host) = self.desired else {
                    return Ok(HostOutcome::Done);
                };
                let record = VmRecord {
                    environment: env.name.clone(),
                    deployment: self.deployment.to_owned(),
                    application: host.application.clone(),
                    name: host.name.clone(),
                    owner_tag: self.ctx.owner_tag.clone(),
                    vmid: *vmid,
                    node: node.clone(),
                    phase: RecordPhase::Present,
                    task: None,
                    configured: None,
                    pending: Vec::new(),
                    address: None,
                    deletion_policy: self.ctx.deletion_policy,
                };
                tracing::info!(
                    deployment = self.deployment,
                    vmid,
                    "adopting a VM that carries our owner tag"
                );
                self.record = Some(record);
                self.save()?;
                Ok(HostOutcome::Done)
            }
            Step::DropIntent => {
                if let Some(r) = &self.record {
                    tracing::warn!(
                        deployment = self.deployment,
                        vmid = r.vmid,
                        "our VM is gone or its VMID belongs to another VM now; leaving that VM alone"
                    );
                }
                self.forget()?;
                Ok(HostOutcome::Done)
            }
            Step::Allocate => self.allocate().await,
            Step::Clone { vmid } => self.clone_into(*vmid).await,
            Step::AwaitUnlock { lock } => Ok(waiting(
                super::reasons::VM_LOCKED,
                format!("the VM is locked ({lock})"),
            )),
            Step::Configure => self.configure().await,
            Step::Resize { gib } => {
                let Some((vmid, node)) = self.vm() else {
                    return Ok(HostOutcome::Done);
                };
                self.may_act()?;
                if let Some(upid) = env.api.resize(&node, vmid, "scsi0", *gib).await? {
                    return self.track(upid).await;
                }
                env.touched(vmid);
                Ok(HostOutcome::Done)
            }
            Step::RefuseShrink { have_gib, want_gib } => Ok(waiting(
                super::reasons::DISK_SHRINK_REFUSED,
                format!(
                    "the disk is {have_gib} GiB and disks only grow: {want_gib} GiB is refused; choose a size with at least {have_gib} GiB"
                ),
            )),
            Step::Start => {
                let Some((vmid, node)) = self.vm() else {
                    return Ok(HostOutcome::Done);
                };
                self.may_act()?;
                let upid = env.api.power(&node, vmid, true).await?;
                let outcome = self.track(upid).await?;
                self.running = true;
                if let Some(r) = &mut self.record {
                    r.pending.clear();
                }
                self.save()?;
                Ok(outcome)
            }
            Step::Restart => {
                if self.record.as_ref().is_none_or(|r| r.pending.is_empty()) {
                    return Ok(HostOutcome::Done);
                }
                let Some((vmid, node)) = self.vm() else {
                    return Ok(HostOutcome::Done);
                };
                self.may_act()?;
                let upid = env.api.power(&node, vmid, false).await?;
                let outcome = self.track(upid).await?;
                if outcome != HostOutcome::Done {
                    return Ok(outcome);
                }
                self.may_act()?;
                let upid = env.api.power(&node, vmid, true).await?;
                let outcome = self.track(upid).await?;
                if let Some(r) = &mut self.record {
                    r.pending.clear();
                    r.address = None;
                }
                self.save()?;
                if outcome != HostOutcome::Done {
                    return Ok(outcome);
                }
                self.await_agent().await
            }
            Step::ReportPending => match &self.record {
                Some(r) if !r.pending.is_empty() => Ok(waiting(
                    super::reasons::PENDING_RESTART,
                    format!(
                        "{} pending until a restart; allow it with the annotation {}: \"true\"",
                        r.pending.join(", "),
                        super::ALLOW_RESTART_ANNOTATION
                    ),
                )),
                _ => Ok(HostOutcome::Done),
            },
            Step::AwaitAgent => self.await_agent().await,
            Step::Destroy => self.destroy().await,
            Step::Stop => self.stop().await,
            Step::Orphan => {
                if let Some(r) = &mut self.record {
                    r.phase = RecordPhase::Orphaned;
                    tracing::info!(
                        deployment = self.deployment,
                        vmid = r.vmid,
                        "kept under deletionPolicy Retain: the VM is orphaned, not destroyed"
                    );
                }
                self.save()?;
                Ok(HostOutcome::Removed)
            }
            Step::Forget => {
                self.forget()?;
                Ok(HostOutcome::Removed)
            }
        }
    }

    /// Follows a task started on the host's VM, recording its UPID first so a restart can resume it.
    async fn track(&mut self, upid: String) -> Result<HostOutcome, LifecycleError> {
        if let Some(r) = &mut self.record {
            r.task = Some(upid.clone());
        }
        self.save()?;
        self.env.pace.task_started(&upid, Work::of_task(upid_type(&upid)));
        let (state, ended_ago) = match self.env.follow(&upid).await? {
            Followed::Running { wake_after } => {
                self.wake_after = Some(wake_after);
                return Ok(waiting(
                    super::reasons::TASK_RUNNING,
                    format!("task {} still running", upid_type(&upid)),
                ));
            }
            Followed::Done { state, ended_ago } => (state, ended_ago),
        };
        self.task_ended(&upid, &state, ended_ago);
        if let Some(r) = &mut self.record {
            r.task = None;
        }
        self.save()?;
        match state {
            TaskState::Failed(m) if m.contains("already running") => Ok(HostOutcome::Done),
            TaskState::Failed(m) => {
                Err(ProxmoxError::TaskFailed(format!("{}: {m}", upid_type(&upid))).into())
            }
            _ => Ok(HostOutcome::Done),
        }
    }

    /// After a task's end: listings from before are stale for the VM, and a started guest's boot is
    /// watched from when the start had ended at the latest (`ended_ago`).
    fn task_ended(&self, upid: &str, state: &TaskState, ended_ago: Duration) {
        if let Some((vmid, _)) = self.vm() {
            self.env.touched(vmid);
        }
        let started = upid_type(upid) == "qmstart"
            && (*state == TaskState::Succeeded
                || matches!(state, TaskState::Failed(m) if m.contains("already running")));
        if let (true, Some((vmid, _))) = (started, self.vm()) {
            self.env.pace.boot_started(vmid, ended_ago);
        }
    }

    async fn allocate(&mut self) -> Result<HostOutcome, LifecycleError> {
        let Some(host) = self.desired else {
            return Ok(HostOutcome::Done);
        };
        let env = self.env;
        let range = env.spec.vmid_range;
        let guard = env.alloc.lock().await;
        let vms = env.observe(ALLOCATION_LISTING_MAX_AGE).await?;
        if let Some(vm) = vms.iter().find(|vm| is_ours(vm, &self.ctx.owner_tag, &host.name)) {
            drop(guard);
            // It appeared since the pass began: adopt it on the next pass.
            tracing::info!(
                deployment = self.deployment,
                vmid = vm.vmid,
                "found our VM while allocating"
            );
            return Ok(waiting(
                super::reasons::REOBSERVE,
                "found a VM of ours; observing again",
            ));
        }
        let template = vms
            .iter()
            .find(|vm| vm.vmid == env.spec.template.vmid && vm.template)
            .ok_or(LifecycleError::TemplateMissing(env.spec.template.vmid))?;
        let mut used: BTreeSet<u32> = vms.iter().map(|vm| vm.vmid).collect();
        for (_, r) in self.store.inventory_list::<VmRecord>("proxmox/")? {
            used.insert(r.vmid);
        }
        let vmid =
            (range.start..=range.end)
                .find(|v| !used.contains(v))
                .ok_or(LifecycleError::RangeExhausted {
                    start: range.start,
                    end: range.end,
                })?;
        self.record = Some(VmRecord {
            environment: env.name.clone(),
            deployment: self.deployment.to_owned(),
            application: host.application.clone(),
            name: host.name.clone(),
            owner_tag: self.ctx.owner_tag.clone(),
            vmid,
            node: template.node.clone(),
            phase: RecordPhase::Creating,
            task: None,
            configured: None,
            pending: Vec::new(),
            address: None,
            deletion_policy: self.ctx.deletion_policy,
        });
        // The intent is durable before the clone is asked for.
        self.save()?;
        drop(guard);
        tracing::info!(deployment = self.deployment, vmid, host = %host.name, "intent recorded: creating a VM");
        self.clone_into(vmid).await
    }

    async fn clone_into(&mut self, vmid: u32) -> Result<HostOutcome, LifecycleError> {
        let Some(host) = self.desired else {
            return Ok(HostOutcome::Done);
        };
        let env = self.env;
        let node = self.record.as_ref().map_or_else(String::new, |r| r.node.clone());
        let request = CloneRequest {
            node,
            template: env.spec.template.vmid,
            newid: vmid,
            name: host.name.clone(),
            description: format!(
                "Managed by the Fediversity controller ({}). Owner tag: {}.",
                self.deployment, self.ctx.owner_tag
            ),
            full: env.spec.clone_mode == CloneMode::Full,
            storage: Some(env.spec.storage.clone()),
            pool: env.spec.pool.clone(),
        };
        self.may_act()?;
        let upid = match env.api.clone_vm(&request).await {
            Ok(upid) => upid,
            Err(ProxmoxError::AlreadyExists(m)) => {
                env.invalidate();
                // Maybe our own earlier clone, maybe someone else's VM: observe before anything else.
                return Ok(waiting(
                    super::reasons::REOBSERVE,
                    format!("VMID {vmid} exists: {m}"),
                ));
            }
            Err(e) => {
                env.invalidate();
                return Err(e.into());
            }
        };
        env.touched(vmid);
        self.track(upid).await
    }

    fn desired_config(&self, current: &BTreeMap<String, String>) -> Vec<(String, String)> {
        let mut want: Vec<(String, String)> = Vec::new();
        let env = self.env;
        let mut tags: BTreeSet<String> = current.get("tags").map(|t| parse_tags(t)).unwrap_or_default();
        tags.remove("template");
        tags.retain(|t| !t.starts_with("fediversity-owner-") || *t == self.ctx.owner_tag);
        tags.insert(COMMON_TAG.into());
        tags.insert(self.ctx.owner_tag.clone());
        want.push(("tags".into(), tags.into_iter().collect::<Vec<_>>().join(";")));
        if let Some(host) = self.desired {
            want.push(("cores".into(), host.cores.to_string()));
            want.push(("memory".into(), host.memory_mib.to_string()));
            let net = current
                .get("net0")
                .map_or("virtio", |n| n.split(',').next().unwrap_or("virtio"));
            want.push(("net0".into(), format!("{net},bridge={}", env.spec.bridge)));
            want.push(("ipconfig0".into(), "ip=dhcp".into()));
            want.push(("ciuser".into(), env.ssh.1.clone()));
            want.push(("agent".into(), "1".into()));
            if let Some(key) = read_public_key(env.ssh.0.as_deref()) {
                want.push(("sshkeys".into(), encode_ssh_keys(&key)));
            }
        }
        want.into_iter()
            .filter(|(k, v)| {
                current
                    .get(k)
                    .is_none_or(|c| c != v && !(k == "tags" && parse_tags(c) == parse_tags(v)))
            })
            .collect()
    }

    async fn configure(&mut self) -> Result<HostOutcome, LifecycleError> {
        let Some((vmid, node)) = self.vm() else {
            return Ok(HostOutcome::Done);
        };
        let env = self.env;
        let current = env.api.config(&node, vmid).await?;
        if let Some(lock) = current.get("lock") {
            return Ok(waiting(
                super::reasons::VM_LOCKED,
                format!("the VM is locked ({lock})"),
            ));
        }
        let record = self.record.clone();
        let Some(record) = record else {
            return Ok(HostOutcome::Done);
        };
        // Ownership, checked on the config itself right before writing: our name, and our tag or our
        // open intent on this VMID.
        let ConfigOwnership { tagged, named } =
            ConfigOwnership::of(&current, &self.ctx.owner_tag, &record.name);
        if !named || !(tagged || record.phase == RecordPhase::Creating) {
            env.invalidate();
            return Ok(waiting(
                super::reasons::REOBSERVE,
                format!("VM {vmid} is not ours; observing again"),
            ));
        }
        let changes = self.desired_config(&current);
        if !changes.is_empty() {
            self.may_act()?;
            env.api
                .set_config(&node, vmid, &changes, current.get("digest").map(String::as_str))
                .await?;
            env.touched(vmid);
        }
        let pending = if self.running && self.desired.is_some() {
            env.api
                .pending_keys(&node, vmid)
                .await?
                .into_iter()
                .filter(|k| matches!(k.as_str(), "cores" | "memory" | "sockets" | "cpu"))
                .collect()
        } else {
            Vec::new()
        };
        if let Some(r) = &mut self.record {
            r.phase = RecordPhase::Present;
            r.configured = self.desired.map(|h| h.config_hash.clone());
            r.pending = pending;
            r.deletion_policy = self.ctx.deletion_policy;
        }
        self.save()?;
        Ok(HostOutcome::Done)
    }

    /// Asks the guest agent for the VM's address when the pace says the guest has likely booted; waits
    /// of more than [`INLINE_WAIT`] in all end the run with the time of the next look ("not running yet" is an answer, not an
    /// error).
    async fn await_agent(&mut self) -> Result<HostOutcome, LifecycleError> {
        let Some((vmid, node)) = self.vm() else {
            return Ok(HostOutcome::Done);
        };
        let pace = &self.env.pace;
        if !pace.watching_boot(vmid) {
            // Started before this process looked (or by someone else): its uptime says since when.
            pace.boot_started(vmid, Duration::from_secs(self.uptime));
        }
        let started = tokio::time::Instant::now();
        loop {
            let wait = pace.next_agent_poll(vmid);
            if !wait.is_zero() && started.elapsed() + wait > INLINE_WAIT {
                self.wake_after = Some(wait);
                return Ok(waiting(
                    super::reasons::WAITING_FOR_AGENT,
                    "waiting for the guest agent to report an address",
                ));
            }
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            if let Some(address) = self.env.api.agent_address(&node, vmid).await? {
                pace.agent_ready(vmid);
                if let Some(r) = &mut self.record {
                    r.address = Some(address);
                }
                self.save()?;
                return Ok(HostOutcome::Done);
            }
            pace.agent_pending(vmid);
        }
    }

    /// The drift scan of one owned, converged VM: reads its config and puts back what was changed out
    /// of band among the keys the plan manages (a CPU or memory change still pending on a running VM is
    /// reverted). Returns each drifted key with the value found. What stays pending until a restart is
    /// recorded, for the plan to restart the VM or report it.
    pub async fn scan_drift(&mut self) -> Result<Vec<(String, String)>, LifecycleError> {
        let (Some((vmid, node)), Some(record)) = (self.vm(), self.record.clone()) else {
            return Ok(Vec::new());
        };
        let env = self.env;
        let current = match env.api.config(&node, vmid).await {
            Ok(c) => c,
            // Gone: the next listing shows it, and the plan acts on that.
            Err(ProxmoxError::NotFound(_)) => {
                env.touched(vmid);
                return Ok(Vec::new());
            }
            Err(e) => return Err(e.into()),
        };
        let ConfigOwnership { tagged, named } =
            ConfigOwnership::of(&current, &self.ctx.owner_tag, &record.name);
        if current.contains_key("lock") || !(tagged && named) {
            // Busy, or no longer ours by its own config: the plan decides on the next listing.
            env.touched(vmid);
            return Ok(Vec::new());
        }
        let changes = self.desired_config(&current);
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        let found: Vec<(String, String)> = changes
            .iter()
            .map(|(k, _)| (k.clone(), current.get(k).cloned().unwrap_or_default()))
            .collect();
        let mut params = changes;
        if self.running {
            let pending = env.api.pending_values(&node, vmid).await?;
            let mut revert = Vec::new();
            params.retain(|(k, v)| {
                let runs_as_wanted = pending
                    .iter()
                    .any(|(p, running)| p == k && running.as_deref() == Some(v.as_str()));
                if runs_as_wanted {
                    revert.push(k.clone());
                }
                !runs_as_wanted
            });
            if !revert.is_empty() {
                params.push(("revert".into(), revert.join(",")));
            }
        }
        env.api
            .set_config(&node, vmid, &params, current.get("digest").map(String::as_str))
            .await?;
        env.touched(vmid);
        let pending = if self.running {
            env.api
                .pending_keys(&node, vmid)
                .await?
                .into_iter()
                .filter(|k| matches!(k.as_str(), "cores" | "memory" | "sockets" | "cpu"))
                .collect()
        } else {
            Vec::new()
        };
        if let Some(r) = &mut self.record {
            r.pending = pending;
        }
        self.save()?;
        tracing::warn!(
            deployment = self.deployment,
            vmid,
            keys = ?found.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            "out-of-band change found on the VM's config and put back"
        );
        Ok(found)
    }

    /// The recorded VM, re-verified as ours on its own config right before acting, and stopped when
    /// it runs. `Err` carries the outcome when there is nothing to act on: no record (`no_record`), a
    /// VM that is gone or not ours (left alone, its record dropped: `Removed`), a lock, or a stop that
    /// has not finished.
    async fn verified_and_stopped(
        &mut self,
        no_record: HostOutcome,
    ) -> Result<Result<VmRecord, HostOutcome>, LifecycleError> {
        let Some(record) = self.record.clone() else {
            return Ok(Err(no_record));
        };
        let env = self.env;
        let (vmid, node) = (record.vmid, record.node.clone());
        let current = match env.api.config(&node, vmid).await {
            Ok(c) => c,
            Err(ProxmoxError::NotFound(_)) => {
                self.forget()?;
                return Ok(Err(HostOutcome::Removed));
            }
            Err(e) => return Err(e.into()),
        };
        let ConfigOwnership { tagged, named } =
            ConfigOwnership::of(&current, &record.owner_tag, &record.name);
        if !(tagged && named) {
            tracing::warn!(
                deployment = self.deployment,
                vmid,
                "VM is not ours (name or owner tag differ): left alone, record dropped"
            );
            self.forget()?;
            env.invalidate();
            return Ok(Err(HostOutcome::Removed));
        }
        if let Some(lock) = current.get("lock") {
            return Ok(Err(waiting(
                super::reasons::VM_LOCKED,
                format!("the VM is locked ({lock})"),
            )));
        }
        if self.running {
            self.may_act()?;
            let upid = env.api.power(&node, vmid, false).await?;
            let outcome = self.track(upid).await?;
            if outcome != HostOutcome::Done {
                return Ok(Err(outcome));
            }
            env.invalidate();
        }
        Ok(Ok(record))
    }

    /// Stops the recorded VM, re-verified as ours right before; a VM that is gone or not ours is
    /// left alone (and its record dropped).
    async fn stop(&mut self) -> Result<HostOutcome, LifecycleError> {
        if let Err(outcome) = self.verified_and_stopped(HostOutcome::Done).await? {
            return Ok(outcome);
        }
        // Started again, it reports its address anew.
        if let Some(r) = &mut self.record {
            r.address = None;
        }
        self.save()?;
        Ok(HostOutcome::Done)
    }

    async fn destroy(&mut self) -> Result<HostOutcome, LifecycleError> {
        let record = match self.verified_and_stopped(HostOutcome::Removed).await? {
            Ok(record) => record,
            Err(outcome) => return Ok(outcome),
        };
        let env = self.env;
        let (vmid, node) = (record.vmid, record.node.clone());
        self.may_act()?;
        let upid = match env.api.destroy(&node, vmid).await {
            Ok(upid) => upid,
            Err(ProxmoxError::NotFound(_)) => {
                self.forget()?;
                return Ok(HostOutcome::Removed);
            }
            Err(e) => return Err(e.into()),
        };
        match self.track(upid).await {
            Ok(HostOutcome::Done) => {}
            Ok(other) => return Ok(other),
            Err(LifecycleError::Api(ProxmoxError::TaskFailed(m))) if m.contains("does not exist") => {}
            Err(e) => return Err(e),
        }
        tracing::info!(
            deployment = self.deployment,
            vmid,
            "VM destroyed (deletionPolicy Delete)"
        );
        self.forget()?;
        env.invalidate();
        Ok(HostOutcome::Removed)
    }
}

/// Reads the SSH public key file (read at use; a missing file leaves `sshkeys` unset).
fn read_public_key(path: Option<&str>) -> Option<String> {
    let path = path?;
    match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => Some(text.trim().to_owned()),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(file = path, error = %e, "cannot read the SSH public key; VMs get none");
            None
        }
    }
}

#[cfg(test)]
mod tests;
