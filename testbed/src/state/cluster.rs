//! The cluster: nodes, VMs and tasks, its seeding and its read-only views.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::time::Instant;

use super::task::{Task, Work, format_upid};
use super::vm::{Vm, typed_value};
use crate::auth::Principal;
use crate::config::Ipv4Net;
use crate::error::ApiError;
use crate::faults::Faults;
use crate::latency::LatencyModel;

/// The only storage of the simulated nodes (lvm-thin, not shared).
pub const STORAGE: &str = "local-lvm";
/// The VMID range of `/cluster/nextid` (datacenter.cfg `next-id: lower=100`).
const NEXTID_LOWER: u32 = 100;
const NEXTID_UPPER: u32 = 1_000_000;
/// Node size reported by `/nodes` (a mid-size host).
const NODE_CPUS: u64 = 16;
const NODE_MEMORY: u64 = 64 << 30;
const NODE_DISK: u64 = 100 << 30;
const STORAGE_SIZE: u64 = 2 << 40;

/// A task just started: its UPID and when its work is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    /// The task's UPID.
    pub upid: String,
    /// How long it runs.
    pub after: Duration,
}

/// The whole simulated cluster.
#[derive(Debug)]
pub struct Cluster {
    /// Node names.
    pub nodes: Vec<String>,
    /// VMs by VMID.
    pub vms: BTreeMap<u32, Vm>,
    /// Tasks, oldest first.
    pub tasks: Vec<Task>,
    /// The random generator (seeded for reproducible runs).
    pub rng: fastrand::Rng,
    /// Latency model.
    pub latency: LatencyModel,
    /// Fault knobs.
    pub faults: Faults,
    /// The TLS certificate fingerprint shown in `/nodes`.
    pub fingerprint: String,
    pub(crate) pool: Ipv4Net,
    next_host: u32,
    next_pid: u32,
    boot: Instant,
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Cluster {
    /// An empty cluster with these nodes.
    pub fn new(
        nodes: Vec<String>,
        rng: fastrand::Rng,
        latency: LatencyModel,
        faults: Faults,
        pool: Ipv4Net,
    ) -> Self {
        let mut rng = rng;
        let next_pid = rng.u32(1000..400_000);
        let fingerprint = (0..32)
            .map(|_| format!("{:02X}", rng.u8(..)))
            .collect::<Vec<_>>()
            .join(":");
        Self {
            nodes,
            vms: BTreeMap::new(),
            tasks: Vec::new(),
            rng,
            latency,
            faults,
            fingerprint,
            pool,
            next_host: 0,
            next_pid,
            boot: Instant::now(),
        }
    }

    /// A random MAC with Proxmox's prefix `BC:24:11`.
    pub fn random_mac(&mut self) -> String {
        format!(
            "BC:24:11:{:02X}:{:02X}:{:02X}",
            self.rng.u8(..),
            self.rng.u8(..),
            self.rng.u8(..)
        )
    }

    /// A random UUID (for smbios1 and vmgenid).
    pub fn random_uuid(&mut self) -> String {
        let b: Vec<u8> = (0..16).map(|_| self.rng.u8(..)).collect();
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        format!(
            "{}-{}-4{}-a{}-{}",
            &hex[..8],
            &hex[8..12],
            &hex[13..16],
            &hex[17..20],
            &hex[20..32]
        )
    }

    /// The next address of the agents' pool.
    pub fn next_address(&mut self) -> std::net::Ipv4Addr {
        let ip = self.pool.host(self.next_host);
        self.next_host += 1;
        ip
    }

    /// Adds the NixOS template `vmid` on `node`.
    pub fn seed_template(&mut self, vmid: u32, node: &str, name: &str) {
        let mut config = self.base_config(vmid, "base", 8);
        config.insert("name".into(), name.into());
        config.insert("template".into(), "1".into());
        config.insert("tags".into(), "nixos;template".into());
        config.insert(
            "description".into(),
            "NixOS template with cloud-init and the QEMU guest agent".into(),
        );
        config.insert(
            "ide2".into(),
            format!("{STORAGE}:vm-{vmid}-cloudinit,media=cdrom"),
        );
        config.insert("ipconfig0".into(), "ip=dhcp".into());
        self.vms.insert(vmid, Vm::new(vmid, node, config));
    }

    /// Adds a running VM that no controller created.
    pub fn seed_foreign(&mut self, vmid: u32, node: &str) {
        let mut config = self.base_config(vmid, "vm", 32);
        config.insert("name".into(), format!("foreign-{vmid}"));
        config.insert("tags".into(), "production".into());
        config.insert("memory".into(), "4096".into());
        let mut vm = Vm::new(vmid, node, config);
        let now = Instant::now();
        let pid = self.pid();
        vm.run = Some(super::vm::Run {
            since: now,
            pid,
            agent_ready_at: Some(now),
        });
        vm.address = Some(self.next_address());
        self.vms.insert(vmid, vm);
    }

    fn base_config(&mut self, vmid: u32, prefix: &str, disk_gib: u64) -> BTreeMap<String, String> {
        let mac = self.random_mac();
        let uuid = self.random_uuid();
        let genid = self.random_uuid();
        BTreeMap::from([
            ("agent".into(), "1".into()),
            ("boot".into(), "order=scsi0;ide2;net0".into()),
            ("cores".into(), "2".into()),
            ("memory".into(), "2048".into()),
            ("net0".into(), format!("virtio={mac},bridge=vmbr0")),
            ("ostype".into(), "l26".into()),
            (
                "scsi0".into(),
                format!("{STORAGE}:{prefix}-{vmid}-disk-0,size={disk_gib}G"),
            ),
            ("scsihw".into(), "virtio-scsi-single".into()),
            ("serial0".into(), "socket".into()),
            ("smbios1".into(), format!("uuid={uuid}")),
            ("sockets".into(), "1".into()),
            ("vga".into(), "serial0".into()),
            ("vmgenid".into(), genid),
        ])
    }

    /// A fresh worker pid.
    pub fn pid(&mut self) -> u32 {
        self.next_pid += 1 + self.rng.u32(0..64);
        self.next_pid
    }

    /// Registers a task; the caller spawns its timer.
    pub fn begin_task(
        &mut self,
        node: &str,
        kind: &str,
        id: &str,
        principal: &Principal,
        work: Work,
        after: Duration,
    ) -> Started {
        let pid = self.pid();
        // Clock ticks since boot (USER_HZ = 100), offset so it looks like a host up for a while.
        let pstart = 10_000_000 + (self.boot.elapsed().as_millis() / 10) as u64;
        let starttime = unix_now();
        let user = principal.upid_user();
        let upid = format_upid(node, pid, pstart, starttime, kind, id, &user);
        let (user, tokenid) = match principal {
            Principal::User(u) => (u.clone(), None),
            Principal::Token { user, tokenid } => (user.clone(), Some(tokenid.clone())),
        };
        self.tasks.push(Task {
            upid: upid.clone(),
            node: node.into(),
            pid,
            pstart,
            starttime,
            kind: kind.into(),
            id: id.into(),
            user,
            tokenid,
            log: Vec::new(),
            exit: None,
            endtime: None,
            work: Some(work),
            abort: None,
        });
        Started { upid, after }
    }

    /// The task with this UPID.
    pub fn task_mut(&mut self, upid: &str) -> Option<&mut Task> {
        self.tasks.iter_mut().find(|t| t.upid == upid)
    }

    /// Fails with `hostname lookup '<node>' failed` for an unknown node, as the proxy does.
    pub fn check_node(&self, node: &str) -> Result<(), ApiError> {
        if self.nodes.iter().any(|n| n == node) {
            Ok(())
        } else {
            Err(ApiError::internal(format!(
                "hostname lookup '{node}' failed - failed to get address info for: {node}: Name or service not known"
            )))
        }
    }

    /// The VM `vmid` on `node`, or the real 500 for a missing config file.
    pub fn vm(&self, node: &str, vmid: u32) -> Result<&Vm, ApiError> {
        self.vms
            .get(&vmid)
            .filter(|vm| vm.node == node)
            .ok_or_else(|| missing_vm(node, vmid))
    }

    /// Mutable [`Cluster::vm`].
    pub fn vm_mut(&mut self, node: &str, vmid: u32) -> Result<&mut Vm, ApiError> {
        self.vms
            .get_mut(&vmid)
            .filter(|vm| vm.node == node)
            .ok_or_else(|| missing_vm(node, vmid))
    }

    /// `GET /cluster/nextid`: the lowest free VMID, or checks that `wanted` is free.
    pub fn nextid(&self, wanted: Option<i64>) -> Result<Value, ApiError> {
        if let Some(id) = wanted {
            let taken = u32::try_from(id).is_ok_and(|id| self.vms.contains_key(&id));
            return if taken {
                Err(ApiError::param("vmid", format!("VM {id} already exists")))
            } else {
                Ok(json!(id.to_string()))
            };
        }
        (NEXTID_LOWER..NEXTID_UPPER)
            .find(|id| !self.vms.contains_key(id))
            .map(|id| json!(id.to_string()))
            .ok_or_else(|| {
                ApiError::internal(format!(
                    "unable to get any free VMID in range [{NEXTID_LOWER}, {NEXTID_UPPER}]"
                ))
            })
    }

    /// `GET /nodes`.
    pub fn node_list(&self) -> Value {
        let nodes: Vec<Value> = self.nodes.iter().map(|n| self.node_resource(n, true)).collect();
        json!(nodes)
    }

    fn node_resource(&self, node: &str, with_fingerprint: bool) -> Value {
        let used: u64 = self
            .vms
            .values()
            .filter(|v| v.node == node && v.running())
            .map(|v| v.memory_mib() << 20)
            .sum();
        let mut v = json!({
            "id": format!("node/{node}"), "type": "node", "node": node, "status": "online",
            "cpu": 0.03, "maxcpu": NODE_CPUS, "mem": (2u64 << 30) + used, "maxmem": NODE_MEMORY,
            "disk": 12u64 << 30, "maxdisk": NODE_DISK, "uptime": self.uptime(), "level": "",
        });
        if with_fingerprint {
            v["ssl_fingerprint"] = json!(self.fingerprint);
        } else {
            v["cgroup-mode"] = json!(2);
        }
        v
    }

    fn uptime(&self) -> u64 {
        86_400 + self.boot.elapsed().as_secs()
    }

    /// `GET /nodes/{node}/status`.
    pub fn node_status(&self, node: &str) -> Value {
        let used: u64 = self
            .vms
            .values()
            .filter(|v| v.node == node && v.running())
            .map(|v| v.memory_mib() << 20)
            .sum();
        let mem_used = (2u64 << 30) + used;
        json!({
            "cpu": 0.03, "wait": 0.0, "idle": 0, "uptime": self.uptime(),
            "loadavg": ["0.10", "0.12", "0.09"],
            "cpuinfo": { "cpus": NODE_CPUS, "cores": NODE_CPUS / 2, "sockets": 1, "model": "Simulated CPU",
                         "mhz": "2400.000", "hvm": "1", "flags": "", "user_hz": 100 },
            "memory": { "total": NODE_MEMORY, "used": mem_used, "free": NODE_MEMORY - mem_used, "available": NODE_MEMORY - mem_used },
            "swap": { "total": 0, "used": 0, "free": 0 },
            "rootfs": { "total": NODE_DISK, "used": 12u64 << 30, "free": NODE_DISK - (12u64 << 30), "avail": NODE_DISK - (12u64 << 30) },
            "ksm": { "shared": 0 },
            "kversion": "Linux 6.17.2-1-pve #1 SMP PREEMPT_DYNAMIC PMX 6.17.2-1",
            "pveversion": format!("pve-manager/{}/{}", crate::api::PVE_VERSION, crate::api::PVE_REPOID),
            "boot-info": { "mode": "efi", "secureboot": 0 },
            "current-kernel": { "sysname": "Linux", "release": "6.17.2-1-pve", "machine": "x86_64",
                                "version": "#1 SMP PREEMPT_DYNAMIC PMX 6.17.2-1" },
        })
    }

    /// `GET /nodes/{node}/storage`.
    pub fn storage_list(&self, node: &str) -> Value {
        json!([self.storage_entry(node)])
    }

    fn storage_entry(&self, node: &str) -> Value {
        let used: u64 = self
            .vms
            .values()
            .filter(|v| v.node == node)
            .map(Vm::disk_bytes)
            .sum();
        json!({
            "storage": STORAGE, "type": "lvmthin", "content": "images,rootdir", "active": 1, "enabled": 1,
            "shared": 0, "total": STORAGE_SIZE, "used": used, "avail": STORAGE_SIZE - used.min(STORAGE_SIZE),
            "used_fraction": used as f64 / STORAGE_SIZE as f64,
        })
    }

    /// `GET /cluster/resources`, optionally filtered by `type` (`vm` lists qemu and lxc guests).
    pub fn resources(&self, kind: Option<&str>) -> Value {
        let mut out = Vec::new();
        let now = Instant::now();
        if kind.is_none_or(|k| k == "vm") {
            out.extend(self.vms.values().map(|vm| vm_resource(vm, now)));
        }
        if kind.is_none_or(|k| k == "node") {
            out.extend(self.nodes.iter().map(|n| self.node_resource(n, false)));
        }
        if kind.is_none_or(|k| k == "storage") {
            for node in &self.nodes {
                let s = self.storage_entry(node);
                out.push(json!({
                    "id": format!("storage/{node}/{STORAGE}"), "type": "storage", "node": node, "storage": STORAGE,
                    "plugintype": "lvmthin", "status": "available", "content": "images,rootdir", "shared": 0,
                    "disk": s["used"], "maxdisk": STORAGE_SIZE,
                }));
            }
        }
        json!(out)
    }

    /// `GET /nodes/{node}/qemu`.
    pub fn qemu_list(&self, node: &str) -> Value {
        let now = Instant::now();
        let list: Vec<Value> = self
            .vms
            .values()
            .filter(|vm| vm.node == node)
            .map(|vm| {
                let mut v = vm_resource(vm, now);
                for key in ["id", "type", "node", "hastate", "disk", "maxcpu"] {
                    if let Some(o) = v.as_object_mut() {
                        o.remove(key);
                    }
                }
                v["cpus"] = json!(vm.cpus());
                v
            })
            .collect();
        json!(list)
    }

    /// `GET /nodes/{node}/qemu/{vmid}/status/current`.
    pub fn vm_status(&self, node: &str, vmid: u32) -> Result<Value, ApiError> {
        let vm = self.vm(node, vmid)?;
        let now = Instant::now();
        let mut v = vm_resource(vm, now);
        if let Some(o) = v.as_object_mut() {
            for key in ["id", "type", "node", "hastate", "disk", "maxcpu"] {
                o.remove(key);
            }
        }
        v["ha"] = json!({ "managed": 0 });
        v["cpus"] = json!(vm.cpus());
        if vm.agent_enabled() {
            v["agent"] = json!(1);
        }
        if let Some(run) = &vm.run {
            v["qmpstatus"] = json!("running");
            v["pid"] = json!(run.pid);
            v["running-machine"] = json!("pc-i440fx-10.1+pve0");
            v["running-qemu"] = json!("10.1.2");
        } else {
            v["qmpstatus"] = json!("stopped");
        }
        Ok(v)
    }

    /// `GET /nodes/{node}/qemu/{vmid}/config`: pending values applied unless `current`.
    pub fn vm_config(&self, node: &str, vmid: u32, current: bool) -> Result<Value, ApiError> {
        let vm = self.vm(node, vmid)?;
        let config = if current {
            vm.config.clone()
        } else {
            vm.effective_config()
        };
        let mut out = serde_json::Map::new();
        for (k, v) in &config {
            let v = if k == "cipassword" { "**********" } else { v };
            out.insert(k.clone(), typed_value(k, v));
        }
        out.insert("digest".into(), json!(vm.digest()));
        Ok(Value::Object(out))
    }

    /// `GET /nodes/{node}/qemu/{vmid}/pending`.
    pub fn vm_pending(&self, node: &str, vmid: u32) -> Result<Value, ApiError> {
        let vm = self.vm(node, vmid)?;
        let mut keys: Vec<&String> = vm
            .config
            .keys()
            .chain(vm.pending.keys())
            .chain(&vm.pending_delete)
            .collect();
        keys.sort();
        keys.dedup();
        let mask = |k: &str, v: &str| {
            if k == "cipassword" {
                json!("**********")
            } else {
                typed_value(k, v)
            }
        };
        let list: Vec<Value> = keys
            .into_iter()
            .map(|k| {
                let mut e = json!({ "key": k });
                if let Some(v) = vm.config.get(k) {
                    e["value"] = mask(k, v);
                }
                if let Some(p) = vm.pending.get(k) {
                    e["pending"] = mask(k, p);
                }
                if vm.pending_delete.contains(k) {
                    e["delete"] = json!(1);
                }
                e
            })
            .collect();
        Ok(json!(list))
    }

    /// `GET /nodes/{node}/qemu/{vmid}/cloudinit`: the drive's values against the config's.
    pub fn vm_cloudinit(&self, node: &str, vmid: u32) -> Result<Value, ApiError> {
        let vm = self.vm(node, vmid)?;
        let config = vm.effective_config();
        let mut keys: Vec<&String> = config
            .keys()
            .filter(|k| super::vm::is_cloudinit_key(k))
            .chain(vm.cloudinit.keys())
            .collect();
        keys.sort();
        keys.dedup();
        let list: Vec<Value> = keys
            .into_iter()
            .map(|k| {
                let mut e = json!({ "key": k });
                let (drive, conf) = (vm.cloudinit.get(k), config.get(k));
                if let Some(v) = drive {
                    e["value"] = json!(v);
                }
                match conf {
                    Some(c) if drive != Some(c) => e["pending"] = json!(c),
                    None if drive.is_some() => e["delete"] = json!(1),
                    _ => {}
                }
                e
            })
            .collect();
        Ok(json!(list))
    }

    /// `GET /nodes/{node}/qemu/{vmid}/agent/network-get-interfaces`.
    pub fn agent_interfaces(&self, node: &str, vmid: u32) -> Result<Value, ApiError> {
        let vm = self.vm(node, vmid)?;
        if !vm.agent_enabled() {
            return Err(ApiError::internal("No QEMU guest agent configured"));
        }
        if !vm.running() {
            return Err(ApiError::internal(format!("VM {vmid} is not running")));
        }
        if self.faults.agent_never_ready || !vm.agent_ready(Instant::now()) {
            return Err(ApiError::internal("QEMU guest agent is not running"));
        }
        let stats = json!({ "rx-bytes": 1_048_576, "rx-packets": 2048, "rx-errs": 0, "rx-dropped": 0,
                            "tx-bytes": 524_288, "tx-packets": 1024, "tx-errs": 0, "tx-dropped": 0 });
        let mut result = vec![json!({
            "name": "lo", "hardware-address": "00:00:00:00:00:00",
            "ip-addresses": [
                { "ip-address": "127.0.0.1", "ip-address-type": "ipv4", "prefix": 8 },
                { "ip-address": "::1", "ip-address-type": "ipv6", "prefix": 128 },
            ],
            "statistics": stats,
        })];
        for (key, value) in vm.config.iter().filter(|(k, _)| is_net_key(k)) {
            let index: u32 = key[3..].parse().unwrap_or(0);
            let mac = value
                .split(',')
                .find_map(|p| {
                    p.split_once('=')
                        .filter(|(_, v)| v.len() == 17 && v.contains(':'))
                        .map(|(_, v)| v)
                })
                .unwrap_or("BC:24:11:00:00:00")
                .to_ascii_lowercase();
            let mut addresses = Vec::new();
            if index == 0
                && let Some(ip) = vm.address
            {
                let prefix = ipconfig_prefix(vm.config.get("ipconfig0")).unwrap_or(self.pool.prefix);
                addresses.push(
                    json!({ "ip-address": ip.to_string(), "ip-address-type": "ipv4", "prefix": prefix }),
                );
            }
            addresses
                .push(json!({ "ip-address": link_local(&mac), "ip-address-type": "ipv6", "prefix": 64 }));
            result.push(json!({
                "name": format!("eth{index}"), "hardware-address": mac,
                "ip-addresses": addresses, "statistics": stats,
            }));
        }
        Ok(json!({ "result": result }))
    }

    /// Snapshots of every VM.
    pub fn vm_infos(&self) -> Vec<super::vm::VmInfo> {
        let now = Instant::now();
        self.vms.values().map(|vm| vm.info(now)).collect()
    }
}

/// Whether a config key is a network device (`net0` … `net31`).
fn is_net_key(key: &str) -> bool {
    key.strip_prefix("net")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn ipconfig_prefix(ipconfig: Option<&String>) -> Option<u8> {
    ipconfig?
        .split(',')
        .find_map(|p| p.strip_prefix("ip="))?
        .split_once('/')?
        .1
        .parse()
        .ok()
}

/// The EUI-64 link-local IPv6 address of a MAC (`fe80::…`), as a guest configures it.
fn link_local(mac: &str) -> String {
    let b: Vec<u16> = mac
        .split(':')
        .filter_map(|x| u16::from_str_radix(x, 16).ok())
        .collect();
    let [b0, b1, b2, b3, b4, b5] = b[..] else {
        return "fe80::1".into();
    };
    format!(
        "fe80::{:x}:{:x}:{:x}:{:x}",
        ((b0 ^ 2) << 8) | b1,
        (b2 << 8) | 0xff,
        0xfe00 | b3,
        (b4 << 8) | b5
    )
}

/// The 500 for a VMID without a config file on that node.
pub fn missing_vm(node: &str, vmid: u32) -> ApiError {
    ApiError::internal(format!(
        "Configuration file 'nodes/{node}/qemu-server/{vmid}.conf' does not exist"
    ))
}

fn vm_resource(vm: &Vm, now: Instant) -> Value {
    let running = vm.running();
    let uptime = vm
        .run
        .as_ref()
        .map_or(0, |r| now.saturating_duration_since(r.since).as_secs());
    let maxmem = vm.memory_mib() << 20;
    let mut v = json!({
        "id": format!("qemu/{}", vm.vmid), "type": "qemu", "node": vm.node, "vmid": vm.vmid,
        "status": if running { "running" } else { "stopped" },
        "template": u8::from(vm.is_template()),
        "maxcpu": vm.cpus(), "maxmem": maxmem, "maxdisk": vm.disk_bytes(),
        "mem": if running { maxmem / 2 } else { 0 }, "disk": 0, "cpu": if running { 0.01 } else { 0.0 },
        "uptime": uptime, "netin": if running { 1_048_576 } else { 0 }, "netout": if running { 524_288 } else { 0 },
        "diskread": 0, "diskwrite": 0,
    });
    if let Some(name) = vm.config.get("name") {
        v["name"] = json!(name);
    }
    if let Some(tags) = vm.config.get("tags") {
        v["tags"] = json!(tags);
    }
    if let Some(lock) = vm.lock() {
        v["lock"] = json!(lock);
    }
    v
}
