//! The pure VM planner: from desired hosts, the observed VM list and the inventory, the steps to take.
//!
//! It never plans a step on a VM that is not ours (our owner tag and the host's name, or the VMID and
//! name of an open creation intent), and never plans a second VM for a host: a new VM is only planned
//! when no VM of ours exists for the host and no creation is open.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::client::{VmResource, parse_tags};
use crate::api::DeletionPolicy;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// Where an inventory record stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordPhase {
    /// An intent: the VMID is reserved and a clone may be in flight; the VM may not carry our tags yet.
    Creating,
    /// The VM exists and carries our owner tag.
    Present,
    /// Kept under `Retain` after its host left its Deployment: no longer managed.
    Orphaned,
}

/// The durable record of one VM the controller created or is creating (an inventory entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmRecord {
    /// The RuntimeEnvironment.
    pub environment: String,
    /// The Deployment.
    pub deployment: String,
    /// The application.
    pub application: String,
    /// The VM's name, `<deployment>-<application>`.
    pub name: String,
    /// The owner tag it carries.
    pub owner_tag: String,
    /// Its VMID.
    pub vmid: u32,
    /// Its node.
    pub node: String,
    /// Where it stands.
    pub phase: RecordPhase,
    /// A task in flight on it (a UPID), followed to its end before anything else happens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// The hash of the configuration last applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configured: Option<String>,
    /// Config keys waiting for a restart.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<String>,
    /// The address its guest agent reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The Deployment's deletion policy when last seen (used when the Deployment is gone).
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// One host as the Deployment wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredVm {
    /// The application.
    pub application: String,
    /// `<deployment>-<application>`.
    pub name: String,
    /// vCPUs.
    pub cores: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Boot disk size in GiB.
    pub disk_gib: u32,
    /// A hash of every configured value: a change means the config must be applied again.
    pub config_hash: String,
}

/// What the planner knows beside the hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanContext {
    /// The Deployment's owner tag.
    pub owner_tag: String,
    /// The template's VMID.
    pub template: u32,
    /// The Deployment's deletion policy.
    pub deletion_policy: DeletionPolicy,
    /// Whether pending changes may be applied by restarting the VM.
    pub allow_restart: bool,
}

/// One step for one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Follow a recorded task to its end, then observe again.
    FollowTask {
        /// The UPID.
        upid: String,
    },
    /// Record this existing VM of ours as the host's VM.
    Adopt {
        /// VMID.
        vmid: u32,
        /// Node.
        node: String,
    },
    /// Reserve a VMID under the environment's lock, record the intent, then clone.
    Allocate,
    /// Clone into the intent's VMID (absent: nothing can be duplicated on a reserved VMID).
    Clone {
        /// VMID.
        vmid: u32,
    },
    /// The intent's VMID is taken by a VM that is not ours: drop the intent (the VM is left alone).
    DropIntent,
    /// Wait for the VM's lock to go.
    AwaitUnlock {
        /// The lock.
        lock: String,
    },
    /// Apply the configuration (tags, cores, memory, network, cloud-init).
    Configure,
    /// Grow the boot disk.
    Resize {
        /// The new size.
        gib: u32,
    },
    /// A disk shrink was asked for: refused, shown in status.
    RefuseShrink {
        /// The disk's size now.
        have_gib: u32,
        /// The size asked for.
        want_gib: u32,
    },
    /// Start the VM.
    Start,
    /// Stop and start the VM to apply pending changes.
    Restart,
    /// Pending changes wait for a restart the spec does not allow.
    ReportPending,
    /// Wait for the guest agent's address.
    AwaitAgent,
    /// Under `Delete`: re-verify, stop, destroy with purge, then drop the record.
    Destroy,
    /// Under `Retain`: keep the VM and mark the record orphaned.
    Orphan,
    /// Re-verify, then stop the VM and keep it with its disks (a moved Deployment's old VM under
    /// `Retain`; started again should the Deployment come back).
    Stop,
    /// The VM is gone: drop the record.
    Forget,
}

/// The steps for one host (or one record of a host that is no longer wanted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPlan {
    /// The host's name.
    pub name: String,
    /// The application.
    pub application: String,
    /// The VM the steps act on, if known.
    pub vm: Option<(u32, String)>,
    /// Steps, in order.
    pub steps: Vec<Step>,
    /// Other VMs of ours with the host's name (never acted upon; shown in status).
    pub duplicates: Vec<u32>,
}

/// Whether a listed VM is ours: not a template, our owner tag, the host's name.
pub fn is_ours(vm: &VmResource, owner_tag: &str, name: &str) -> bool {
    !vm.template && vm.tags.contains(owner_tag) && vm.name.as_deref() == Some(name)
}

/// What a VM's own config says of ownership, read right before acting on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigOwnership {
    /// It carries our owner tag.
    pub tagged: bool,
    /// It has the host's name.
    pub named: bool,
}

impl ConfigOwnership {
    /// Reads `config` (as the API returns it) for `owner_tag` and `name`.
    pub fn of(config: &BTreeMap<String, String>, owner_tag: &str, name: &str) -> Self {
        Self {
            tagged: config
                .get("tags")
                .is_some_and(|t| parse_tags(t).contains(owner_tag)),
            named: config.get("name").map(String::as_str) == Some(name),
        }
    }
}

/// Whether `vm` is the VM an open intent is creating: the intent's VMID, and the intent's name or a
/// clone still in progress (a cloning VM has no name yet).
fn is_intended(vm: &VmResource, record: &VmRecord) -> bool {
    record.phase == RecordPhase::Creating
        && vm.vmid == record.vmid
        && !vm.template
        && (vm.name.as_deref() == Some(record.name.as_str())
            || (vm.name.is_none() && vm.lock.as_deref() == Some("clone")))
}

/// Plans every host of one Deployment: the desired hosts and the inventory records of hosts that are no
/// longer desired.
pub fn plan(
    desired: &[DesiredVm],
    observed: &[VmResource],
    records: &[VmRecord],
    ctx: &PlanContext,
) -> Vec<HostPlan> {
    let mut plans: Vec<HostPlan> = desired
        .iter()
        .map(|host| {
            let record = records.iter().find(|r| r.application == host.application);
            plan_host(host, record, observed, ctx)
        })
        .collect();
    for record in records {
        if !desired.iter().any(|h| h.application == record.application) {
            plans.push(plan_removal(record, observed, ctx));
        }
    }
    plans
}

/// Plans one wanted host.
pub fn plan_host(
    host: &DesiredVm,
    record: Option<&VmRecord>,
    observed: &[VmResource],
    ctx: &PlanContext,
) -> HostPlan {
    let mut plan = HostPlan {
        name: host.name.clone(),
        application: host.application.clone(),
        vm: None,
        steps: Vec::new(),
        duplicates: Vec::new(),
    };
    if let Some(upid) = record.and_then(|r| r.task.clone()) {
        plan.vm = record.map(|r| (r.vmid, r.node.clone()));
        plan.steps.push(Step::FollowTask { upid });
        return plan;
    }
    let mut ours: Vec<&VmResource> = observed
        .iter()
        .filter(|vm| is_ours(vm, &ctx.owner_tag, &host.name))
        .collect();
    ours.sort_by_key(|vm| vm.vmid);
    let at_record = record.and_then(|r| observed.iter().find(|vm| vm.vmid == r.vmid));
    let chosen: Option<&VmResource> = match (record, at_record) {
        (Some(r), Some(vm)) if is_ours(vm, &ctx.owner_tag, &host.name) || is_intended(vm, r) => Some(vm),
        _ => None,
    };
    let vm = match chosen {
        Some(vm) => {
            if record.is_some_and(|r| r.phase == RecordPhase::Orphaned) {
                plan.steps.push(Step::Adopt {
                    vmid: vm.vmid,
                    node: vm.node.clone(),
                });
            }
            vm
        }
        None => {
            if let Some(vm) = ours.first() {
                // A VM of ours exists for this host (say, the store was lost): adopt it, never a second.
                plan.steps.push(Step::Adopt {
                    vmid: vm.vmid,
                    node: vm.node.clone(),
                });
                *vm
            } else {
                match record {
                    Some(r) if r.phase == RecordPhase::Creating && at_record.is_none() => {
                        plan.vm = Some((r.vmid, r.node.clone()));
                        plan.steps.push(Step::Clone { vmid: r.vmid });
                        plan.steps.extend(after_clone(host, observed, ctx));
                    }
                    Some(_) => {
                        // The recorded VMID is free or someone else's: our VM is gone. Start afresh.
                        plan.steps.push(Step::DropIntent);
                        plan.steps.push(Step::Allocate);
                        plan.steps.extend(after_clone(host, observed, ctx));
                    }
                    None => {
                        plan.steps.push(Step::Allocate);
                        plan.steps.extend(after_clone(host, observed, ctx));
                    }
                }
                return plan;
            }
        }
    };
    plan.vm = Some((vm.vmid, vm.node.clone()));
    plan.duplicates = ours.iter().map(|v| v.vmid).filter(|v| *v != vm.vmid).collect();
    let mut work = Vec::new();
    let configured = record.and_then(|r| r.configured.as_deref()) == Some(host.config_hash.as_str());
    let tagged = vm.tags.contains(&ctx.owner_tag);
    let adopting = plan.steps.iter().any(|s| matches!(s, Step::Adopt { .. }));
    if !configured || !tagged || adopting {
        work.push(Step::Configure);
    }
    let want = u64::from(host.disk_gib) * GIB;
    if want > vm.maxdisk {
        work.push(Step::Resize { gib: host.disk_gib });
    } else if want < vm.maxdisk {
        work.push(Step::RefuseShrink {
            have_gib: u32::try_from(vm.maxdisk.div_ceil(GIB)).unwrap_or(u32::MAX),
            want_gib: host.disk_gib,
        });
    }
    let pending = record.is_some_and(|r| !r.pending.is_empty())
        || (vm.running
            && configured
            && (vm.maxcpu != u64::from(host.cores) || vm.maxmem != u64::from(host.memory_mib) * MIB));
    if !vm.running {
        work.push(Step::Start);
    } else if pending || work.contains(&Step::Configure) {
        // Configure finds out what stays pending; a restart follows only if allowed.
        if ctx.allow_restart {
            work.push(Step::Restart);
        } else {
            work.push(Step::ReportPending);
        }
    }
    if !vm.running || record.is_none_or(|r| r.address.is_none()) || adopting {
        work.push(Step::AwaitAgent);
    }
    if !work.is_empty()
        && let Some(lock) = &vm.lock
    {
        plan.steps.push(Step::AwaitUnlock { lock: lock.clone() });
        return plan;
    }
    plan.steps.extend(work);
    plan
}

/// The steps after a new clone: configure, grow the disk, start, wait for the agent.
fn after_clone(host: &DesiredVm, observed: &[VmResource], ctx: &PlanContext) -> Vec<Step> {
    let mut steps = vec![Step::Configure];
    let template_disk = observed
        .iter()
        .find(|vm| vm.vmid == ctx.template)
        .map_or(0, |t| t.maxdisk);
    let want = u64::from(host.disk_gib) * GIB;
    if want > template_disk {
        steps.push(Step::Resize { gib: host.disk_gib });
    } else if want < template_disk {
        steps.push(Step::RefuseShrink {
            have_gib: u32::try_from(template_disk.div_ceil(GIB)).unwrap_or(u32::MAX),
            want_gib: host.disk_gib,
        });
    }
    steps.push(Step::Start);
    steps.push(Step::AwaitAgent);
    steps
}

/// Plans a record whose host is no longer wanted (disabled application or removed Deployment).
pub fn plan_removal(record: &VmRecord, observed: &[VmResource], ctx: &PlanContext) -> HostPlan {
    let mut plan = HostPlan {
        name: record.name.clone(),
        application: record.application.clone(),
        vm: Some((record.vmid, record.node.clone())),
        steps: Vec::new(),
        duplicates: Vec::new(),
    };
    if let Some(upid) = &record.task {
        plan.steps.push(Step::FollowTask { upid: upid.clone() });
        return plan;
    }
    let vm = observed.iter().find(|vm| vm.vmid == record.vmid);
    let ours = vm.filter(|vm| is_ours(vm, &record.owner_tag, &record.name));
    let intended = vm.filter(|vm| is_intended(vm, record));
    match ctx.deletion_policy {
        DeletionPolicy::Retain => {
            if vm.is_none() && record.phase == RecordPhase::Creating {
                plan.steps.push(Step::Forget);
            } else if record.phase != RecordPhase::Orphaned && (ours.is_some() || intended.is_some()) {
                plan.steps.push(Step::Orphan);
            } else if ours.is_none() && intended.is_none() && vm.is_some() {
                // Someone else's VM sits on the VMID now: ours is gone; drop the record, touch nothing.
                plan.steps.push(Step::Forget);
            } else if vm.is_none() {
                plan.steps.push(Step::Forget);
            }
        }
        DeletionPolicy::Delete => match (vm, ours, intended) {
            (None, _, _) => plan.steps.push(Step::Forget),
            (Some(vm), _, Some(_)) if vm.lock.is_some() => plan.steps.push(Step::AwaitUnlock {
                lock: vm.lock.clone().unwrap_or_default(),
            }),
            (Some(_), Some(_), _) => plan.steps.push(Step::Destroy),
            // Cloned but not yet tagged: claim it with our tags first; the destroy re-verifies them.
            (Some(_), None, Some(_)) => {
                plan.steps.push(Step::Configure);
                plan.steps.push(Step::Destroy);
            }
            (Some(_), None, None) => plan.steps.push(Step::Forget),
        },
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNER: &str = "fediversity-owner-abc-def";

    fn ctx() -> PlanContext {
        PlanContext {
            owner_tag: OWNER.into(),
            template: 9000,
            deletion_policy: DeletionPolicy::Retain,
            allow_restart: false,
        }
    }

    fn host() -> DesiredVm {
        DesiredVm {
            application: "mastodon".into(),
            name: "uni-mastodon".into(),
            cores: 2,
            memory_mib: 4096,
            disk_gib: 40,
            config_hash: "h1".into(),
        }
    }

    fn template() -> VmResource {
        VmResource {
            vmid: 9000,
            node: "pve".into(),
            name: Some("nixos-template".into()),
            template: true,
            maxdisk: 8 * GIB,
            ..VmResource::default()
        }
    }

    fn our_vm(vmid: u32) -> VmResource {
        VmResource {
            vmid,
            node: "pve".into(),
            name: Some("uni-mastodon".into()),
            tags: ["fediversity".to_owned(), OWNER.to_owned()].into(),
            running: true,
            maxcpu: 2,
            maxmem: 4096 * MIB,
            maxdisk: 40 * GIB,
            ..VmResource::default()
        }
    }

    fn record(vmid: u32, phase: RecordPhase) -> VmRecord {
        VmRecord {
            environment: "env".into(),
            deployment: "uni".into(),
            application: "mastodon".into(),
            name: "uni-mastodon".into(),
            owner_tag: OWNER.into(),
            vmid,
            node: "pve".into(),
            phase,
            task: None,
            configured: Some("h1".into()),
            pending: Vec::new(),
            address: Some("192.0.2.5".into()),
            deletion_policy: DeletionPolicy::Retain,
        }
    }

    #[test]
    fn a_config_is_ours_only_with_our_tag_among_its_tags_and_the_host_name() {
        let config = |tags: &str, name: &str| -> BTreeMap<String, String> {
            [
                ("tags".to_owned(), tags.to_owned()),
                ("name".to_owned(), name.to_owned()),
            ]
            .into()
        };
        let own = |c: &BTreeMap<String, String>| {
            let o = ConfigOwnership::of(c, OWNER, "uni-mastodon");
            (o.tagged, o.named)
        };
        assert_eq!(
            own(&config(&format!("fediversity;{OWNER}"), "uni-mastodon")),
            (true, true)
        );
        assert_eq!(own(&config("fediversity", "uni-mastodon")), (false, true));
        assert_eq!(own(&config(&format!("{OWNER}x"), "uni-mastodon")), (false, true));
        assert_eq!(own(&config(OWNER, "uni-pixelfed")), (true, false));
        assert_eq!(own(&BTreeMap::new()), (false, false));
    }

    #[test]
    fn a_missing_vm_is_allocated_cloned_configured_grown_started_and_awaited() {
        let plan = plan_host(&host(), None, &[template()], &ctx());
        assert_eq!(
            plan.steps,
            vec![
                Step::Allocate,
                Step::Configure,
                Step::Resize { gib: 40 },
                Step::Start,
                Step::AwaitAgent
            ]
        );
    }

    #[test]
    fn a_converged_vm_needs_no_step_at_all() {
        let rec = record(20001, RecordPhase::Present);
        let plan = plan_host(&host(), Some(&rec), &[template(), our_vm(20001)], &ctx());
        assert!(plan.steps.is_empty(), "{:?}", plan.steps);
    }

    #[test]
    fn a_vm_with_our_owner_tag_is_adopted_not_duplicated() {
        let plan = plan_host(&host(), None, &[template(), our_vm(20007)], &ctx());
        assert_eq!(
            plan.steps[0],
            Step::Adopt {
                vmid: 20007,
                node: "pve".into()
            }
        );
        assert!(!plan.steps.contains(&Step::Allocate));
        assert!(plan.steps.contains(&Step::Configure));
    }

    #[test]
    fn a_vm_with_our_name_but_without_our_owner_tag_is_never_adopted() {
        let mut foreign = our_vm(20007);
        foreign.tags = ["production".to_owned()].into();
        let plan = plan_host(&host(), None, &[template(), foreign], &ctx());
        assert_eq!(plan.steps[0], Step::Allocate);
        assert_eq!(plan.vm, None);
    }

    #[test]
    fn an_open_intent_without_its_vm_clones_into_the_same_vmid() {
        let mut rec = record(20003, RecordPhase::Creating);
        rec.configured = None;
        let plan = plan_host(&host(), Some(&rec), &[template()], &ctx());
        assert_eq!(plan.steps[0], Step::Clone { vmid: 20003 });
        assert!(!plan.steps.contains(&Step::Allocate));
    }

    #[test]
    fn an_open_intent_whose_clone_is_in_flight_waits_for_the_lock() {
        let mut rec = record(20003, RecordPhase::Creating);
        rec.configured = None;
        let cloning = VmResource {
            vmid: 20003,
            node: "pve".into(),
            lock: Some("clone".into()),
            ..VmResource::default()
        };
        let plan = plan_host(&host(), Some(&rec), &[template(), cloning], &ctx());
        assert_eq!(plan.steps, vec![Step::AwaitUnlock { lock: "clone".into() }]);
    }

    #[test]
    fn an_open_intent_whose_clone_finished_untagged_is_configured_with_our_tags() {
        let mut rec = record(20003, RecordPhase::Creating);
        rec.configured = None;
        rec.address = None;
        let mut cloned = our_vm(20003);
        cloned.tags = ["nixos".to_owned(), "template".to_owned()].into();
        cloned.running = false;
        cloned.maxdisk = 8 * GIB;
        let plan = plan_host(&host(), Some(&rec), &[template(), cloned], &ctx());
        assert_eq!(
            plan.steps,
            vec![
                Step::Configure,
                Step::Resize { gib: 40 },
                Step::Start,
                Step::AwaitAgent
            ]
        );
    }

    #[test]
    fn an_intent_whose_vmid_was_taken_by_a_foreign_vm_is_dropped_and_the_foreign_vm_left_alone() {
        let mut rec = record(20003, RecordPhase::Creating);
        rec.configured = None;
        let mut foreign = our_vm(20003);
        foreign.name = Some("someone-else".into());
        foreign.tags = Default::default();
        let plan = plan_host(&host(), Some(&rec), &[template(), foreign], &ctx());
        assert_eq!(plan.steps[..2], [Step::DropIntent, Step::Allocate]);
        assert_eq!(plan.vm, None);
    }

    #[test]
    fn a_recorded_task_is_followed_before_anything_else() {
        let mut rec = record(20003, RecordPhase::Creating);
        rec.task = Some("UPID:pve:1:2:3:qmclone:9000:x:".into());
        let plan = plan_host(&host(), Some(&rec), &[template()], &ctx());
        assert_eq!(
            plan.steps,
            vec![Step::FollowTask {
                upid: "UPID:pve:1:2:3:qmclone:9000:x:".into()
            }]
        );
    }

    #[test]
    fn a_bigger_size_reconfigures_and_grows_the_disk_and_a_smaller_disk_is_refused() {
        let rec = record(20001, RecordPhase::Present);
        let mut bigger = host();
        bigger.config_hash = "h2".into();
        bigger.disk_gib = 100;
        let plan = plan_host(&bigger, Some(&rec), &[our_vm(20001)], &ctx());
        assert_eq!(
            plan.steps,
            vec![Step::Configure, Step::Resize { gib: 100 }, Step::ReportPending]
        );
        let mut smaller = host();
        smaller.disk_gib = 20;
        let plan = plan_host(&smaller, Some(&rec), &[our_vm(20001)], &ctx());
        assert_eq!(
            plan.steps,
            vec![Step::RefuseShrink {
                have_gib: 40,
                want_gib: 20
            }]
        );
    }

    #[test]
    fn pending_changes_restart_the_vm_only_when_restarts_are_allowed() {
        let mut rec = record(20001, RecordPhase::Present);
        rec.pending = vec!["cores".into()];
        let plan = plan_host(&host(), Some(&rec), &[our_vm(20001)], &ctx());
        assert_eq!(plan.steps, vec![Step::ReportPending]);
        let allowed = PlanContext {
            allow_restart: true,
            ..ctx()
        };
        let plan = plan_host(&host(), Some(&rec), &[our_vm(20001)], &allowed);
        assert_eq!(plan.steps, vec![Step::Restart]);
    }

    #[test]
    fn a_stopped_vm_of_ours_is_started() {
        let rec = record(20001, RecordPhase::Present);
        let mut stopped = our_vm(20001);
        stopped.running = false;
        let plan = plan_host(&host(), Some(&rec), &[stopped], &ctx());
        assert_eq!(plan.steps, vec![Step::Start, Step::AwaitAgent]);
    }

    #[test]
    fn a_locked_vm_that_needs_work_is_waited_for() {
        let rec = record(20001, RecordPhase::Present);
        let mut locked = our_vm(20001);
        locked.running = false;
        locked.lock = Some("backup".into());
        let plan = plan_host(&host(), Some(&rec), &[locked], &ctx());
        assert_eq!(
            plan.steps,
            vec![Step::AwaitUnlock {
                lock: "backup".into()
            }]
        );
    }

    #[test]
    fn a_second_vm_of_ours_for_the_same_host_is_reported_never_touched() {
        let rec = record(20001, RecordPhase::Present);
        let plan = plan_host(&host(), Some(&rec), &[our_vm(20001), our_vm(20002)], &ctx());
        assert_eq!(plan.duplicates, vec![20002]);
        assert!(plan.steps.is_empty());
    }

    #[test]
    fn removal_under_retain_orphans_the_vm_and_under_delete_destroys_it() {
        let rec = record(20001, RecordPhase::Present);
        let retain = plan(&[], &[our_vm(20001)], std::slice::from_ref(&rec), &ctx());
        assert_eq!(retain[0].steps, vec![Step::Orphan]);
        let delete = PlanContext {
            deletion_policy: DeletionPolicy::Delete,
            ..ctx()
        };
        let plans = plan(&[], &[our_vm(20001)], std::slice::from_ref(&rec), &delete);
        assert_eq!(plans[0].steps, vec![Step::Destroy]);
    }

    #[test]
    fn removal_never_destroys_a_vm_without_our_owner_tag_whatever_its_vmid() {
        let rec = record(20001, RecordPhase::Present);
        let mut foreign = our_vm(20001);
        foreign.tags = ["production".to_owned()].into();
        let delete = PlanContext {
            deletion_policy: DeletionPolicy::Delete,
            ..ctx()
        };
        let plans = plan(&[], &[foreign], std::slice::from_ref(&rec), &delete);
        assert_eq!(plans[0].steps, vec![Step::Forget]);
    }

    #[test]
    fn removal_of_a_vm_that_is_already_gone_just_drops_the_record() {
        let rec = record(20001, RecordPhase::Present);
        let delete = PlanContext {
            deletion_policy: DeletionPolicy::Delete,
            ..ctx()
        };
        assert_eq!(
            plan(&[], &[], std::slice::from_ref(&rec), &delete)[0].steps,
            vec![Step::Forget]
        );
    }

    #[test]
    fn an_orphaned_vm_whose_host_is_wanted_again_is_adopted_back() {
        let rec = record(20001, RecordPhase::Orphaned);
        let plan = plan_host(&host(), Some(&rec), &[our_vm(20001)], &ctx());
        assert_eq!(
            plan.steps[0],
            Step::Adopt {
                vmid: 20001,
                node: "pve".into()
            }
        );
    }
}
