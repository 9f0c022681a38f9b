//! Operations that change the cluster: create, clone, config, resize, power, destroy, and task ends.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use super::cluster::{Cluster, STORAGE, Started, unix_now};
use super::task::Work;
use super::vm::{self, Run, Vm, disk_size, is_cloudinit_key, is_disk_key, with_size};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::faults::roll;
use crate::formats;
use crate::latency::Op;
use crate::params::Params;

/// Parameters of config calls that are not config keys.
const CONTROL_PARAMS: &[&str] = &[
    "node",
    "vmid",
    "digest",
    "skiplock",
    "background_delay",
    "delete",
    "revert",
    "force",
];

/// Parameters of create that are not stored in the config.
const CREATE_ONLY: &[&str] = &[
    "node",
    "vmid",
    "archive",
    "force",
    "unique",
    "pool",
    "storage",
    "start",
    "bwlimit",
    "live-restore",
    "import-working-storage",
    "ha-managed",
];

fn locked(lock: &str) -> ApiError {
    ApiError::internal(format!("VM is locked ({lock})"))
}

fn lock_timeout(vmid: u32) -> String {
    format!("can't lock file '/var/lock/qemu-server/lock-{vmid}.conf' - got timeout")
}

impl Cluster {
    fn check_skiplock(params: &Params, who: &Principal) -> Result<bool, ApiError> {
        let skip = params.flag("skiplock").unwrap_or(false);
        if skip && !who.is_root() {
            return Err(ApiError::param("skiplock", "Only root may use this option."));
        }
        Ok(skip)
    }

    /// The lock-timeout fault, drawn for calls that take the VM's config lock.
    fn maybe_lock_timeout(&mut self, vmid: u32) -> Result<(), ApiError> {
        if roll(&mut self.rng, self.faults.lock_timeout_rate) {
            return Err(ApiError::internal(lock_timeout(vmid)));
        }
        Ok(())
    }

    fn quick(&self) -> Duration {
        self.latency.duration(Op::Config) / 3
    }

    /// `POST /nodes/{node}/qemu`.
    pub fn create_vm(&mut self, node: &str, params: &Params, who: &Principal) -> Result<Started, ApiError> {
        let vmid = params.int("vmid").unwrap_or_default() as u32;
        if let Some(existing) = self.vms.get(&vmid) {
            return Err(ApiError::internal(format!(
                "unable to create VM {vmid} - VM {vmid} already exists on node '{}'",
                existing.node
            )));
        }
        if params.has("archive") {
            return Err(ApiError::internal(
                "restore from an archive is not supported by the simulator",
            ));
        }
        self.maybe_lock_timeout(vmid)?;
        let mut config = BTreeMap::new();
        for (k, v) in params.iter().filter(|(k, _)| !CREATE_ONLY.contains(k)) {
            let v = self.stored_value(vmid, k, v, &config)?;
            config.insert(k.to_string(), v);
        }
        if !config.contains_key("smbios1") {
            config.insert("smbios1".into(), format!("uuid={}", self.random_uuid()));
        }
        config.entry("vmgenid".into()).or_insert_with(|| "1".into());
        if config.get("vmgenid").is_some_and(|g| g == "1") {
            config.insert("vmgenid".into(), self.random_uuid());
        }
        let start = params.flag("start").unwrap_or(false);
        self.vms.insert(
            vmid,
            Vm::new(vmid, node, BTreeMap::from([("lock".into(), "create".into())])),
        );
        let after = self.latency.duration(Op::Create);
        Ok(self.begin_task(
            node,
            "qmcreate",
            &vmid.to_string(),
            who,
            Work::Create { vmid, config, start },
            after,
        ))
    }

    /// `POST /nodes/{node}/qemu/{vmid}/clone`.
    pub fn clone_vm(
        &mut self,
        node: &str,
        vmid: u32,
        params: &Params,
        who: &Principal,
    ) -> Result<Started, ApiError> {
        let src = self.vm(node, vmid)?;
        if let Some(lock) = src.lock() {
            return Err(locked(lock));
        }
        let is_template = src.is_template();
        let full = params.flag("full").unwrap_or(!is_template);
        if !full && params.has("storage") {
            return Err(ApiError::param(
                "storage",
                "parameter 'storage' not allowed for linked clones",
            ));
        }
        if !full && params.has("format") {
            return Err(ApiError::param(
                "format",
                "parameter 'format' not allowed for linked clones",
            ));
        }
        if !full && !is_template {
            let disk = src
                .config
                .keys()
                .find(|k| is_disk_key(k))
                .cloned()
                .unwrap_or_else(|| "scsi0".into());
            return Err(ApiError::internal(format!(
                "Linked clone feature is not supported for drive '{disk}'"
            )));
        }
        if let Some(target) = params.get("target") {
            self.check_node(target)?;
            if target != node {
                return Err(ApiError::internal(format!(
                    "can't clone VM to node '{target}' (VM uses local storage)"
                )));
            }
        }
        let bytes = src.disk_bytes();
        let newid = params.int("newid").unwrap_or_default() as u32;
        if self.vms.contains_key(&newid) {
            return Err(ApiError::internal(format!(
                "unable to create VM {newid}: config file already exists"
            )));
        }
        self.maybe_lock_timeout(vmid)?;
        self.vms.insert(
            newid,
            Vm::new(newid, node, BTreeMap::from([("lock".into(), "clone".into())])),
        );
        let after = self.latency.duration(if full {
            Op::FullClone { bytes }
        } else {
            Op::LinkedClone
        });
        let work = Work::Clone {
            src: vmid,
            newid,
            full,
            name: params.get("name").map(str::to_string),
            description: params.get("description").map(str::to_string),
        };
        Ok(self.begin_task(node, "qmclone", &vmid.to_string(), who, work, after))
    }

    /// Writes a config change into the pending section (`POST`/`PUT config`), with the sync checks.
    pub fn stage_config(
        &mut self,
        node: &str,
        vmid: u32,
        params: &Params,
        who: &Principal,
    ) -> Result<(), ApiError> {
        let skiplock = Self::check_skiplock(params, who)?;
        let vm = self.vm(node, vmid)?;
        if let Some(digest) = params.get("digest")
            && digest != vm.digest()
        {
            return Err(ApiError::internal(
                "checksum mismatch (file change by other user?)",
            ));
        }
        if let Some(lock) = vm.lock().filter(|_| !skiplock) {
            return Err(locked(lock));
        }
        let changes: Vec<(String, String)> = params
            .iter()
            .filter(|(k, _)| !CONTROL_PARAMS.contains(k))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let list = |name: &str| -> Vec<String> {
            params
                .get(name)
                .map(formats::split_list)
                .into_iter()
                .flatten()
                .map(str::to_string)
                .collect()
        };
        let (deletes, reverts) = (list("delete"), list("revert"));
        if changes.is_empty() && deletes.is_empty() && reverts.is_empty() {
            return Err(ApiError::internal("no options specified"));
        }
        if let Some(key) = deletes.iter().find(|k| changes.iter().any(|(c, _)| c == *k)) {
            return Err(ApiError::param(
                key,
                "conflicting values: parameter is set and deleted",
            ));
        }
        self.maybe_lock_timeout(vmid)?;
        let existing = self.vm(node, vmid)?.effective_config();
        let mut staged = Vec::new();
        for (k, v) in changes {
            let stored = self.stored_value(vmid, &k, &v, &existing)?;
            staged.push((k, stored));
        }
        let vm = self.vm_mut(node, vmid)?;
        for (k, v) in staged {
            vm.pending_delete.remove(&k);
            vm.pending.insert(k, v);
        }
        for key in deletes {
            vm.pending.remove(&key);
            if vm.config.contains_key(&key) {
                vm.pending_delete.insert(key);
            }
        }
        for key in reverts {
            vm.pending.remove(&key);
            vm.pending_delete.remove(&key);
        }
        Ok(())
    }

    /// Applies pending changes as the config worker does: all when stopped, hotpluggable ones when running.
    pub fn apply_config(&mut self, node: &str, vmid: u32) -> Result<(), ApiError> {
        let vm = self.vm_mut(node, vmid)?;
        let all = !vm.running();
        vm.apply_pending(all);
        Ok(())
    }

    /// `POST config`: stage, then a `qmconfig` task applies.
    pub fn update_config_async(
        &mut self,
        node: &str,
        vmid: u32,
        params: &Params,
        who: &Principal,
    ) -> Result<Started, ApiError> {
        self.stage_config(node, vmid, params, who)?;
        let after = self.latency.duration(Op::Config);
        Ok(self.begin_task(
            node,
            "qmconfig",
            &vmid.to_string(),
            who,
            Work::ApplyPending { vmid },
            after,
        ))
    }

    /// The form a value is stored in: tags normalised, ssh keys checked, MACs generated, new disks
    /// allocated, `memory` without `current=`.
    fn stored_value(
        &mut self,
        vmid: u32,
        key: &str,
        value: &str,
        existing: &BTreeMap<String, String>,
    ) -> Result<String, ApiError> {
        Ok(match key {
            "tags" => formats::normalise_tags(value),
            "sshkeys" => {
                if !formats::valid_ssh_public_keys(&formats::uri_unescape(value)) {
                    return Err(ApiError::internal("SSH public key validation error"));
                }
                value.to_string()
            }
            "memory" => value.trim_start_matches("current=").to_string(),
            k if k.strip_prefix("net").is_some_and(|n| n.parse::<u32>().is_ok()) => self.with_mac(value),
            k if is_disk_key(k) => allocate_disk(vmid, value, existing),
            _ => value.to_string(),
        })
    }

    fn with_mac(&mut self, net: &str) -> String {
        let mut parts: Vec<String> = net.split(',').map(str::to_string).collect();
        let Some(first) = parts.first_mut() else {
            return net.to_string();
        };
        let has_mac = net.split(',').any(|p| {
            p.starts_with("macaddr=")
                || p.split_once('=')
                    .is_some_and(|(_, v)| v.len() == 17 && v.matches(':').count() == 5)
        });
        if !has_mac {
            let model = first.strip_prefix("model=").unwrap_or(first).to_string();
            if !model.contains('=') {
                *first = format!("{model}={}", self.random_mac());
            }
        }
        parts.join(",")
    }

    /// `PUT /nodes/{node}/qemu/{vmid}/resize`: all checks happen in the `resize` task (PVE ≥ 8.0).
    pub fn resize(
        &mut self,
        node: &str,
        vmid: u32,
        params: &Params,
        who: &Principal,
    ) -> Result<Started, ApiError> {
        let skiplock = Self::check_skiplock(params, who)?;
        let disk = params.get("disk").unwrap_or_default().to_string();
        let size = params.get("size").unwrap_or_default();
        let outcome = match self.vm(node, vmid) {
            Err(e) => Err(e.message),
            Ok(vm) => check_resize(vm, &disk, size, skiplock, params.get("digest")),
        };
        let (work, after) = match outcome {
            Ok(bytes) => (
                Work::Resize { vmid, disk, bytes },
                self.latency.duration(Op::Resize),
            ),
            Err(message) => (Work::Fail { message }, self.quick()),
        };
        Ok(self.begin_task(node, "resize", &vmid.to_string(), who, work, after))
    }

    /// `POST status/start`: failures (locked, running, template) end the task, not the call.
    pub fn start(
        &mut self,
        node: &str,
        vmid: u32,
        params: &Params,
        who: &Principal,
    ) -> Result<Started, ApiError> {
        let skiplock = Self::check_skiplock(params, who)?;
        let vm = self.vm(node, vmid)?;
        let failure = if let Some(lock) = vm.lock().filter(|_| !skiplock) {
            Some(format!("VM is locked ({lock})"))
        } else if vm.running() {
            Some(format!("VM {vmid} already running"))
        } else if vm.is_template() {
            Some("you can't start a VM if it's a template".to_string())
        } else {
            None
        };
        let (work, after) = match failure {
            Some(message) => (Work::Fail { message }, self.quick()),
            None => (Work::Start { vmid }, self.latency.duration(Op::Start)),
        };
        Ok(self.begin_task(node, "qmstart", &vmid.to_string(), who, work, after))
    }

    /// `POST status/stop`: a hard stop; a no-op when stopped.
    pub fn stop(
        &mut self,
        node: &str,
        vmid: u32,
        params: &Params,
        who: &Principal,
    ) -> Result<Started, ApiError> {
        let skiplock = Self::check_skiplock(params, who)?;
        let vm = self.vm(node, vmid)?;
        let (work, after) = match vm.lock().filter(|_| !skiplock) {
            Some(lock) => (
                Work::Fail {
                    message: format!("VM is locked ({lock})"),
                },
                self.quick(),
            ),
            None if vm.running() => (Work::Stop { vmid }, self.latency.duration(Op::Stop)),
            None => (Work::Nothing, self.quick()),
        };
        Ok(self.begin_task(node, "qmstop", &vmid.to_string(), who, work, after))
    }

    /// `POST status/shutdown`: graceful, bounded by `timeout` (default 60 s) unless `forceStop`.
    pub fn shutdown(
        &mut self,
        node: &str,
        vmid: u32,
        params: &Params,
        who: &Principal,
    ) -> Result<Started, ApiError> {
        let skiplock = Self::check_skiplock(params, who)?;
        let vm = self.vm(node, vmid)?;
        let timeout = Duration::from_secs(params.int("timeout").map_or(60, |t| t.max(0) as u64));
        let needed = crate::latency::LatencyModel::real(Op::Shutdown);
        let force = params.flag("forceStop").unwrap_or(false);
        let scaled = |d: Duration| d.mul_f64(self.latency.scale);
        let (work, after) = match vm.lock().filter(|_| !skiplock) {
            Some(lock) => (
                Work::Fail {
                    message: format!("VM is locked ({lock})"),
                },
                self.quick(),
            ),
            None if !vm.running() => (Work::Nothing, self.quick()),
            None if needed <= timeout => (Work::Stop { vmid }, scaled(needed)),
            None if force => (Work::Stop { vmid }, scaled(timeout)),
            None => (
                Work::Fail {
                    message: "VM quit/powerdown failed - got timeout".into(),
                },
                scaled(timeout),
            ),
        };
        Ok(self.begin_task(node, "qmshutdown", &vmid.to_string(), who, work, after))
    }

    /// `DELETE /nodes/{node}/qemu/{vmid}`.
    pub fn destroy(
        &mut self,
        node: &str,
        vmid: u32,
        params: &Params,
        who: &Principal,
    ) -> Result<Started, ApiError> {
        let skiplock = Self::check_skiplock(params, who)?;
        let vm = self.vm(node, vmid)?;
        if vm.config.get("protection").is_some_and(|p| p == "1") {
            return Err(ApiError::internal(format!(
                "can't remove VM {vmid} - protection mode enabled"
            )));
        }
        if vm.running() {
            return Err(ApiError::internal(format!(
                "VM {vmid} is running - destroy failed"
            )));
        }
        let (work, after) = match vm.lock().filter(|_| !skiplock) {
            Some(lock) => (
                Work::Fail {
                    message: format!("VM is locked ({lock})"),
                },
                self.quick(),
            ),
            None => (Work::Destroy { vmid }, self.latency.duration(Op::Destroy)),
        };
        if matches!(work, Work::Destroy { .. }) {
            self.maybe_lock_timeout(vmid)?;
            if let Some(vm) = self.vms.get_mut(&vmid) {
                vm.config.insert("lock".into(), "destroyed".into());
            }
        }
        Ok(self.begin_task(node, "qmdestroy", &vmid.to_string(), who, work, after))
    }

    /// `PUT cloudinit`: regenerates the drive from the config.
    pub fn regenerate_cloudinit(&mut self, node: &str, vmid: u32) -> Result<(), ApiError> {
        let vm = self.vm_mut(node, vmid)?;
        vm.cloudinit = vm
            .effective_config()
            .into_iter()
            .filter(|(k, _)| is_cloudinit_key(k))
            .collect();
        Ok(())
    }

    /// `DELETE /nodes/{node}/tasks/{upid}`: stops a running task as interrupted.
    pub fn abort_task(&mut self, upid: &str) -> Result<(), ApiError> {
        let task = self
            .task_mut(upid)
            .ok_or_else(|| ApiError::param("upid", "no such task"))?;
        if !task.running() {
            return Ok(());
        }
        if let Some(handle) = task.abort.take() {
            handle.abort();
        }
        let work = task.work.take();
        self.fail_work(work.as_ref());
        if let Some(task) = self.task_mut(upid) {
            task.finish(Err("interrupted by signal".into()), unix_now());
        }
        Ok(())
    }

    /// Ends a task whose time is up: injects failures and warnings, applies the work, writes the log.
    pub fn complete_task(&mut self, upid: &str) {
        let Some(task) = self.task_mut(upid) else { return };
        if !task.running() {
            return;
        }
        let work = task.work.take().unwrap_or(Work::Nothing);
        let node = task.node.clone();
        let injected = !matches!(work, Work::Nothing | Work::Fail { .. })
            && roll(&mut self.rng, self.faults.task_failure_rate);
        let result = if injected {
            self.fail_work(Some(&work));
            Err(injected_failure(&work))
        } else {
            self.do_work(&node, work)
        };
        let warnings = usize::from(result.is_ok() && roll(&mut self.rng, self.faults.task_warning_rate));
        let Some(task) = self.task_mut(upid) else { return };
        let outcome = match result {
            Ok(mut lines) => {
                if warnings > 0 {
                    lines.push("WARN: simulated warning (injected)".into());
                }
                task.log.extend(lines);
                Ok(warnings)
            }
            Err(e) => Err(e),
        };
        task.finish(outcome, unix_now());
    }

    /// Undoes what a failed task leaves behind (the conf of a clone or create, a destroy lock).
    fn fail_work(&mut self, work: Option<&Work>) {
        match work {
            Some(Work::Clone { newid: vmid, .. } | Work::Create { vmid, .. }) => {
                self.vms.remove(vmid);
            }
            Some(Work::Destroy { vmid }) => {
                if let Some(vm) = self.vms.get_mut(vmid) {
                    vm.config.remove("lock");
                }
            }
            _ => {}
        }
    }

    fn do_work(&mut self, node: &str, work: Work) -> Result<Vec<String>, String> {
        match work {
            Work::Nothing => Ok(Vec::new()),
            Work::Fail { message } => Err(message),
            Work::Clone {
                src,
                newid,
                full,
                name,
                description,
            } => self.finish_clone(src, newid, full, name, description),
            Work::Create { vmid, config, start } => {
                let vm = self
                    .vms
                    .get_mut(&vmid)
                    .ok_or_else(|| format!("unable to create VM {vmid}"))?;
                vm.config = config;
                let mut lines: Vec<String> = vm
                    .config
                    .iter()
                    .filter(|(k, v)| is_disk_key(k) && !v.contains("media=cdrom"))
                    .map(|(k, v)| {
                        format!(
                            "{k}: successfully created disk '{}'",
                            v.split(',').next().unwrap_or(v)
                        )
                    })
                    .collect();
                if start {
                    self.power_on(vmid);
                    lines.push(format!("VM {vmid} started"));
                }
                Ok(lines)
            }
            Work::ApplyPending { vmid } => {
                self.apply_config(node, vmid).map_err(|e| e.message)?;
                Ok(Vec::new())
            }
            Work::Resize { vmid, disk, bytes } => {
                let vm = self
                    .vms
                    .get_mut(&vmid)
                    .ok_or_else(|| format!("disk '{disk}' does not exist"))?;
                let drive = vm
                    .config
                    .get(&disk)
                    .cloned()
                    .ok_or_else(|| format!("disk '{disk}' does not exist"))?;
                vm.config.insert(disk.clone(), with_size(&drive, bytes));
                Ok(vec![format!(
                    "  Size of logical volume changed to {}.",
                    vm::format_size(bytes)
                )])
            }
            Work::Start { vmid } => {
                if self.vms.get(&vmid).is_some_and(Vm::running) {
                    return Err(format!("VM {vmid} already running"));
                }
                self.power_on(vmid);
                Ok(vec![
                    format!("generating cloud-init ISO"),
                    format!("VM {vmid} started"),
                ])
            }
            Work::Stop { vmid } => {
                if let Some(vm) = self.vms.get_mut(&vmid) {
                    vm.run = None;
                }
                Ok(Vec::new())
            }
            Work::Destroy { vmid } => {
                let vm = self
                    .vms
                    .remove(&vmid)
                    .ok_or_else(|| super::cluster::missing_vm(node, vmid).message)?;
                let mut lines: Vec<String> = vm
                    .config
                    .iter()
                    .filter(|(k, v)| is_disk_key(k) && !v.contains("media=cdrom") || v.contains("cloudinit"))
                    .map(|(_, v)| format!("  Logical volume \"{}\" successfully removed.", volume_name(v)))
                    .collect();
                lines.push(format!("purging VM {vmid} from related configurations.."));
                Ok(lines)
            }
        }
    }

    fn power_on(&mut self, vmid: u32) {
        let boot = self.latency.duration(Op::AgentBoot);
        let pid = self.pid();
        let address = self.vms.get(&vmid).and_then(|vm| {
            let ip = vm
                .effective_config()
                .get("ipconfig0")?
                .split(',')
                .find_map(|p| p.strip_prefix("ip="))?
                .to_string();
            ip.split('/').next()?.parse().ok()
        });
        let address = match (address, self.vms.get(&vmid).and_then(|vm| vm.address)) {
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => self.next_address(),
        };
        if let Some(vm) = self.vms.get_mut(&vmid) {
            vm.apply_pending(true);
            if vm.has_cloudinit_drive() {
                vm.cloudinit = vm
                    .config
                    .iter()
                    .filter(|(k, _)| is_cloudinit_key(k))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
            }
            let now = Instant::now();
            vm.run = Some(Run {
                since: now,
                pid,
                agent_ready_at: Some(now + boot),
            });
            vm.address = Some(address);
        }
    }

    fn finish_clone(
        &mut self,
        src: u32,
        newid: u32,
        full: bool,
        name: Option<String>,
        description: Option<String>,
    ) -> Result<Vec<String>, String> {
        let source = self
            .vms
            .get(&src)
            .cloned()
            .ok_or_else(|| format!("clone failed: {}", super::cluster::missing_vm("", src).message))?;
        let mut config = BTreeMap::new();
        let mut lines = Vec::new();
        let mut disk_index = 0;
        for (key, value) in &source.config {
            match key.as_str() {
                "template" | "lock" | "parent" | "snaptime" | "vmstate" => continue,
                "name" | "description" => continue,
                "smbios1" => {
                    let rest: Vec<&str> = value.split(',').filter(|p| !p.starts_with("uuid=")).collect();
                    let mut v = format!("uuid={}", self.random_uuid());
                    for r in rest {
                        v.push(',');
                        v.push_str(r);
                    }
                    config.insert(key.clone(), v);
                }
                "vmgenid" => {
                    config.insert(key.clone(), self.random_uuid());
                }
                k if k.strip_prefix("net").is_some_and(|n| n.parse::<u32>().is_ok()) => {
                    let mac = self.random_mac();
                    let rest: Vec<&str> = value.split(',').skip(1).collect();
                    let model = value
                        .split(',')
                        .next()
                        .and_then(|m| m.split('=').next())
                        .unwrap_or("virtio");
                    let mut v = format!("{model}={mac}");
                    for r in rest {
                        v.push(',');
                        v.push_str(r);
                    }
                    config.insert(key.clone(), v);
                }
                k if is_disk_key(k) && value.contains("cloudinit") => {
                    let storage = value.split(':').next().unwrap_or(STORAGE);
                    config.insert(key.clone(), format!("{storage}:vm-{newid}-cloudinit,media=cdrom"));
                }
                k if is_disk_key(k) && !value.contains("media=cdrom") => {
                    let volume = value.split(',').next().unwrap_or_default();
                    let options: Vec<&str> = value.split(',').skip(1).collect();
                    let (storage, volname) = volume.split_once(':').unwrap_or((STORAGE, volume));
                    let new_vol = format!("vm-{newid}-disk-{disk_index}");
                    disk_index += 1;
                    let new_volume = if full {
                        lines.push(format!("create full clone of drive {key} ({volume})"));
                        format!("{storage}:{new_vol}")
                    } else {
                        lines.push(format!("create linked clone of drive {key} ({volume})"));
                        let base = volname.split('/').next().unwrap_or(volname);
                        format!("{storage}:{base}/{new_vol}")
                    };
                    if full && let Some(size) = disk_size(value) {
                        let total = vm::format_size(size);
                        lines.push(format!("transferred {total} of {total} (100.00%)"));
                    }
                    let mut v = new_volume;
                    for o in options {
                        v.push(',');
                        v.push_str(o);
                    }
                    config.insert(key.clone(), v);
                }
                _ => {
                    config.insert(key.clone(), value.clone());
                }
            }
        }
        let src_name = source
            .config
            .get("name")
            .cloned()
            .unwrap_or_else(|| src.to_string());
        config.insert(
            "name".into(),
            name.unwrap_or_else(|| format!("Copy-of-VM-{src_name}")),
        );
        if let Some(d) = description.or_else(|| source.config.get("description").cloned()) {
            config.insert("description".into(), d);
        }
        let vm = self
            .vms
            .get_mut(&newid)
            .ok_or_else(|| format!("clone failed: VM {newid} vanished"))?;
        vm.config = config;
        Ok(lines)
    }
}

/// The resize worker's checks; the new size in bytes.
fn check_resize(
    vm: &Vm,
    disk: &str,
    size: &str,
    skiplock: bool,
    digest: Option<&str>,
) -> Result<u64, String> {
    if let Some(lock) = vm.lock().filter(|_| !skiplock) {
        return Err(format!("VM is locked ({lock})"));
    }
    if digest.is_some_and(|d| d != vm.digest()) {
        return Err("checksum mismatch (file change by other user?)".into());
    }
    let drive = vm
        .config
        .get(disk)
        .ok_or_else(|| format!("disk '{disk}' does not exist"))?;
    if drive.contains("media=cdrom") {
        return Err("you can't resize a cdrom".into());
    }
    let current = disk_size(drive).unwrap_or(0);
    let wanted = match size.strip_prefix('+') {
        Some(delta) => vm::parse_size(delta).map(|d| current + d),
        None => vm::parse_size(size),
    };
    let wanted = wanted.ok_or_else(|| format!("invalid size '{size}'"))?;
    if wanted < current {
        return Err("shrinking disks is not supported".into());
    }
    Ok(wanted)
}

fn injected_failure(work: &Work) -> String {
    match work {
        Work::Clone { .. } => {
            format!(
                "clone failed: can't lock file '/var/lock/pve-manager/pve-storage-{STORAGE}' - got timeout"
            )
        }
        Work::Start { vmid } => format!("start failed: QEMU exited with code 1 (VM {vmid})"),
        Work::Create { vmid, .. }
        | Work::ApplyPending { vmid }
        | Work::Resize { vmid, .. }
        | Work::Stop { vmid }
        | Work::Destroy { vmid } => lock_timeout(*vmid),
        Work::Nothing | Work::Fail { .. } => "unexpected status".into(),
    }
}

fn volume_name(drive: &str) -> &str {
    let volume = drive.split(',').next().unwrap_or(drive);
    let volname = volume.split_once(':').map_or(volume, |(_, v)| v);
    volname.rsplit('/').next().unwrap_or(volname)
}

/// Turns create syntax (`local-lvm:32`, `local-lvm:cloudinit`) into an allocated volume; keeps the rest.
fn allocate_disk(vmid: u32, value: &str, existing: &BTreeMap<String, String>) -> String {
    let mut parts = value.split(',');
    let first = parts.next().unwrap_or_default();
    let volume = first.strip_prefix("file=").unwrap_or(first);
    let rest: Vec<&str> = parts.collect();
    let Some((storage, spec)) = volume.split_once(':') else {
        return value.to_string();
    };
    if spec == "cloudinit" {
        return format!("{storage}:vm-{vmid}-cloudinit,media=cdrom");
    }
    let Ok(gib) = spec.parse::<f64>() else {
        return value.to_string();
    };
    let used: Vec<u32> = existing
        .values()
        .filter_map(|v| {
            v.split(',')
                .next()?
                .rsplit_once(&format!("vm-{vmid}-disk-"))?
                .1
                .parse()
                .ok()
        })
        .collect();
    let index = (0..).find(|i| !used.contains(i)).unwrap_or(0);
    let mut out = format!("{storage}:vm-{vmid}-disk-{index}");
    for r in rest
        .iter()
        .filter(|r| !r.starts_with("size=") && !r.starts_with("import-from="))
    {
        out.push(',');
        out.push_str(r);
    }
    out.push_str(&format!(
        ",size={}",
        vm::format_size((gib * (1u64 << 30) as f64) as u64)
    ));
    out
}
