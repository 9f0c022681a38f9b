//! One simulated VM: its config file (with pending section and digest), power and guest-agent state.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde::Serialize;
use serde_json::{Value, json};
use sha1::{Digest, Sha1};
use tokio::time::Instant;

use crate::schema::{ParamType, ROUTE_TABLE};

/// Keys a running VM takes at once; everything else waits in the pending section for the next cold
/// start (qemu-server's fast-plug options, cloud-init values and the default hotplug set
/// `network,disk,usb`).
fn hotpluggable(key: &str) -> bool {
    const FAST: &[&str] = &[
        "name",
        "description",
        "tags",
        "onboot",
        "protection",
        "startup",
        "hookscript",
        "lock",
        "ciuser",
        "cipassword",
        "citype",
        "cicustom",
        "sshkeys",
        "nameserver",
        "searchdomain",
        "ciupgrade",
        "vmstatestorage",
    ];
    let base = key.trim_end_matches(|c: char| c.is_ascii_digit());
    FAST.contains(&key)
        || matches!(
            base,
            "net" | "scsi" | "virtio" | "sata" | "usb" | "ipconfig" | "unused"
        )
}

/// Disk keys (`scsi0`, `virtio1`, `efidisk0`, …).
pub fn is_disk_key(key: &str) -> bool {
    let base = key.trim_end_matches(|c: char| c.is_ascii_digit());
    base != key && matches!(base, "scsi" | "virtio" | "sata" | "ide" | "efidisk" | "tpmstate")
}

/// A running VM's process.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// When QEMU started.
    pub since: Instant,
    /// The QEMU pid.
    pub pid: u32,
    /// When the guest agent starts answering (`None`: never).
    pub agent_ready_at: Option<Instant>,
}

/// One VM.
#[derive(Debug, Clone)]
pub struct Vm {
    /// VMID.
    pub vmid: u32,
    /// Node it lives on.
    pub node: String,
    /// The config file's main section (stored forms; booleans as `1`/`0`).
    pub config: BTreeMap<String, String>,
    /// The `[PENDING]` section.
    pub pending: BTreeMap<String, String>,
    /// Keys pending deletion.
    pub pending_delete: BTreeSet<String>,
    /// Present while running.
    pub run: Option<Run>,
    /// The cloud-init values in the generated drive (set at start and by `PUT cloudinit`).
    pub cloudinit: BTreeMap<String, String>,
    /// The address its guest agent reports on `eth0`.
    pub address: Option<Ipv4Addr>,
}

/// Keys that make up the cloud-init drive.
pub fn is_cloudinit_key(key: &str) -> bool {
    matches!(
        key,
        "ciuser" | "cipassword" | "citype" | "cicustom" | "sshkeys" | "nameserver" | "searchdomain"
    ) || key
        .strip_prefix("ipconfig")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

impl Vm {
    /// A VM with this config.
    pub fn new(vmid: u32, node: &str, config: BTreeMap<String, String>) -> Self {
        Self {
            vmid,
            node: node.to_string(),
            config,
            pending: BTreeMap::new(),
            pending_delete: BTreeSet::new(),
            run: None,
            cloudinit: BTreeMap::new(),
            address: None,
        }
    }

    /// The config lock (`clone`, `create`, …).
    pub fn lock(&self) -> Option<&str> {
        self.config.get("lock").map(String::as_str)
    }

    /// Whether the VM is a template.
    pub fn is_template(&self) -> bool {
        self.config.get("template").is_some_and(|v| v == "1")
    }

    /// Whether QEMU runs.
    pub fn running(&self) -> bool {
        self.run.is_some()
    }

    /// The config with pending changes applied, as `GET config` shows it by default.
    pub fn effective_config(&self) -> BTreeMap<String, String> {
        let mut config = self.config.clone();
        config.extend(self.pending.clone());
        for key in &self.pending_delete {
            config.remove(key);
        }
        config
    }

    /// The config file's text: description as `#` lines, sorted `key: value` lines, then `[PENDING]`.
    pub fn conf_text(&self) -> String {
        let mut text = String::new();
        let section = |text: &mut String, map: &BTreeMap<String, String>| {
            if let Some(description) = map.get("description") {
                for line in description.lines() {
                    text.push_str(&format!("#{line}\n"));
                }
            }
            for (k, v) in map.iter().filter(|(k, _)| *k != "description") {
                text.push_str(&format!("{k}: {v}\n"));
            }
        };
        section(&mut text, &self.config);
        if !self.pending.is_empty() || !self.pending_delete.is_empty() {
            text.push_str("\n[PENDING]\n");
            section(&mut text, &self.pending);
            if !self.pending_delete.is_empty() {
                let keys: Vec<&str> = self.pending_delete.iter().map(String::as_str).collect();
                text.push_str(&format!("delete: {}\n", keys.join(",")));
            }
        }
        text
    }

    /// SHA1 hex of the config file, the `digest` clients send back.
    pub fn digest(&self) -> String {
        Sha1::digest(self.conf_text().as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Applies pending changes: all of them when stopped (or at start), only hotpluggable ones when
    /// running.
    pub fn apply_pending(&mut self, all: bool) {
        let hot = |k: &String| all || hotpluggable(k);
        let keys: Vec<String> = self.pending.keys().filter(|k| hot(k)).cloned().collect();
        for key in keys {
            if let Some(v) = self.pending.remove(&key) {
                self.config.insert(key, v);
            }
        }
        let deletes: Vec<String> = self.pending_delete.iter().filter(|k| hot(k)).cloned().collect();
        for key in deletes {
            self.pending_delete.remove(&key);
            self.config.remove(&key);
        }
    }

    /// Whether the config has a cloud-init drive.
    pub fn has_cloudinit_drive(&self) -> bool {
        self.config
            .iter()
            .any(|(k, v)| is_disk_key(k) && v.contains("cloudinit"))
    }

    /// Configured memory in MiB (default 512).
    pub fn memory_mib(&self) -> u64 {
        let m = self
            .config
            .get("memory")
            .map(|m| m.trim_start_matches("current="));
        m.and_then(|m| m.split(',').next()?.parse().ok()).unwrap_or(512)
    }

    /// Number of vCPUs (sockets × cores).
    pub fn cpus(&self) -> u64 {
        let get = |k: &str| {
            self.config
                .get(k)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1)
        };
        get("sockets") * get("cores")
    }

    /// Total size of the VM's disks (not cdroms), in bytes.
    pub fn disk_bytes(&self) -> u64 {
        self.config
            .iter()
            .filter(|(k, v)| is_disk_key(k) && !v.contains("media=cdrom"))
            .filter_map(|(_, v)| disk_size(v))
            .sum()
    }

    /// Whether a guest agent is configured (`agent: 1` or `agent: enabled=1,…`).
    pub fn agent_enabled(&self) -> bool {
        self.config.get("agent").is_some_and(|a| {
            let first = a.split(',').next().unwrap_or_default();
            first == "1" || first == "enabled=1" || a.split(',').any(|p| p == "enabled=1")
        })
    }

    /// Whether the guest agent answers now.
    pub fn agent_ready(&self, now: Instant) -> bool {
        self.agent_enabled()
            && self
                .run
                .as_ref()
                .and_then(|r| r.agent_ready_at)
                .is_some_and(|at| now >= at)
    }

    /// A snapshot for in-process inspection.
    pub fn info(&self, now: Instant) -> VmInfo {
        VmInfo {
            vmid: self.vmid,
            node: self.node.clone(),
            name: self.config.get("name").cloned(),
            running: self.running(),
            lock: self.lock().map(str::to_string),
            template: self.is_template(),
            tags: self
                .config
                .get("tags")
                .map(|t| t.split(';').map(str::to_string).collect())
                .unwrap_or_default(),
            config: self.config.clone(),
            pending: self.pending.clone(),
            agent_ready: self.agent_ready(now),
            address: self.address,
        }
    }
}

/// A VM as seen in-process through `SimHandle::vms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmInfo {
    /// VMID.
    pub vmid: u32,
    /// Node.
    pub node: String,
    /// Name, if set.
    pub name: Option<String>,
    /// Running.
    pub running: bool,
    /// Config lock.
    pub lock: Option<String>,
    /// Is a template.
    pub template: bool,
    /// Normalised tags.
    pub tags: Vec<String>,
    /// The config file's main section.
    pub config: BTreeMap<String, String>,
    /// Pending changes.
    pub pending: BTreeMap<String, String>,
    /// The guest agent answers.
    pub agent_ready: bool,
    /// The address the agent reports.
    pub address: Option<Ipv4Addr>,
}

/// Parses a size like `32G`, `512M` or `1073741824` (bytes) into bytes.
pub fn parse_size(text: &str) -> Option<u64> {
    let (number, unit) = match text.char_indices().last()? {
        (i, c @ ('K' | 'M' | 'G' | 'T')) => (&text[..i], c),
        _ => (text, 'B'),
    };
    let value: f64 = number.parse().ok()?;
    let factor = match unit {
        'K' => 1u64 << 10,
        'M' => 1 << 20,
        'G' => 1 << 30,
        'T' => 1 << 40,
        _ => 1,
    };
    (value >= 0.0).then_some((value * factor as f64) as u64)
}

/// Formats bytes as PVE does in `size=`: the largest unit that divides it exactly.
pub fn format_size(bytes: u64) -> String {
    for (unit, factor) in [('T', 1u64 << 40), ('G', 1 << 30), ('M', 1 << 20), ('K', 1 << 10)] {
        if bytes >= factor && bytes.is_multiple_of(factor) {
            return format!("{}{unit}", bytes / factor);
        }
    }
    bytes.to_string()
}

/// The `size=` of a drive string, in bytes.
pub fn disk_size(drive: &str) -> Option<u64> {
    drive
        .split(',')
        .find_map(|p| p.strip_prefix("size="))
        .and_then(parse_size)
}

/// Replaces (or adds) `size=` in a drive string.
pub fn with_size(drive: &str, bytes: u64) -> String {
    let mut parts: Vec<String> = drive
        .split(',')
        .filter(|p| !p.starts_with("size="))
        .map(str::to_string)
        .collect();
    parts.push(format!("size={}", format_size(bytes)));
    parts.join(",")
}

/// A config value as `GET config` returns it (`PVE::QemuServer::check_type`): integers and booleans as
/// JSON numbers, everything else (numbers included) as strings.
pub fn typed_value(key: &str, value: &str) -> Value {
    let ty = ROUTE_TABLE
        .route("POST", "/nodes/{node}/qemu/{vmid}/config")
        .and_then(|r| r.param(key))
        .map(|p| p.ty);
    match ty {
        Some(ParamType::Integer | ParamType::Boolean) => {
            value.parse::<i64>().map_or_else(|_| json!(value), |n| json!(n))
        }
        _ => json!(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print_like_pve() {
        assert_eq!(parse_size("8G"), Some(8 << 30));
        assert_eq!(parse_size("1.5G"), Some(3 << 29));
        assert_eq!(format_size(10 << 30), "10G");
        assert_eq!(format_size(1536 << 20), "1536M");
        assert_eq!(
            with_size("local-lvm:vm-1-disk-0,size=8G,ssd=1", 9 << 30),
            "local-lvm:vm-1-disk-0,ssd=1,size=9G"
        );
    }

    #[test]
    fn booleans_and_integers_come_back_as_numbers_and_memory_as_a_string() {
        assert_eq!(typed_value("onboot", "1"), json!(1));
        assert_eq!(typed_value("cores", "4"), json!(4));
        assert_eq!(typed_value("memory", "4096"), json!("4096"));
        assert_eq!(typed_value("cpulimit", "1.5"), json!("1.5"));
    }

    #[test]
    fn the_digest_changes_with_the_config() {
        let mut vm = Vm::new(100, "pve", BTreeMap::from([("cores".into(), "1".into())]));
        let before = vm.digest();
        assert_eq!(before.len(), 40);
        vm.pending.insert("cores".into(), "2".into());
        assert_ne!(vm.digest(), before);
    }
}
