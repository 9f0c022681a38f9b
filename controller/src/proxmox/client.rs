//! The Proxmox VE API at the I/O edge: the [`ProxmoxApi`] trait every call goes through, and [`Api`], the
//! typed calls the lifecycle makes (its HTTP implementation is in `http`, its errors in `error`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::Value;

pub use super::error::ProxmoxError;
pub use super::http::{HttpProxmox, RateLimit};
use crate::runtime::BoxFuture;

/// An HTTP method of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Read.
    Get,
    /// Create or start something (usually a task).
    Post,
    /// Change something synchronously.
    Put,
    /// Remove something.
    Delete,
}

/// One API call: method, path under `/api2/json`, parameters and a bounded operation name for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiRequest {
    /// The method.
    pub method: Method,
    /// The path, e.g. `/cluster/resources`.
    pub path: String,
    /// Parameters (query for GET/DELETE, form body for POST/PUT).
    pub params: Vec<(String, String)>,
    /// The operation, a fixed name such as `list_vms` (a metric label).
    pub op: &'static str,
    /// Whether repeating the call is harmless (then transient failures are retried at once).
    pub idempotent: bool,
}

impl ApiRequest {
    pub(super) fn new(method: Method, path: String, op: &'static str) -> Self {
        Self {
            method,
            idempotent: method == Method::Get,
            path,
            params: Vec::new(),
            op,
        }
    }

    pub(super) fn param(mut self, key: &str, value: impl ToString) -> Self {
        self.params.push((key.to_owned(), value.to_string()));
        self
    }
}

/// The Proxmox VE API as the controller uses it: one call in, the `data` of the answer out.
pub trait ProxmoxApi: Send + Sync + 'static {
    /// Makes one call.
    fn call(&self, request: ApiRequest) -> BoxFuture<Result<Value, ProxmoxError>>;
}

/// A VM as `/cluster/resources?type=vm` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VmResource {
    /// VMID.
    pub vmid: u32,
    /// The node it is on.
    pub node: String,
    /// Its name (absent while a clone is in progress).
    pub name: Option<String>,
    /// Its tags, normalised (lower case).
    pub tags: BTreeSet<String>,
    /// Whether it runs.
    pub running: bool,
    /// Its config lock (`clone`, `backup`, …).
    pub lock: Option<String>,
    /// Whether it is a template.
    pub template: bool,
    /// vCPUs (sockets × cores) of the running configuration.
    pub maxcpu: u64,
    /// Seconds since it started (0 when stopped).
    pub uptime: u64,
    /// Memory in bytes.
    pub maxmem: u64,
    /// Disk size in bytes.
    pub maxdisk: u64,
}

/// The state of a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskState {
    /// Still running.
    Running,
    /// Ended `OK` or `WARNINGS: N` (both success).
    Succeeded,
    /// Ended with this error.
    Failed(String),
}

/// The node a UPID's task runs on (`UPID:<node>:…`).
pub fn upid_node(upid: &str) -> Option<&str> {
    let mut parts = upid.split(':');
    (parts.next() == Some("UPID")).then(|| parts.next()).flatten()
}

/// The task type of a UPID (`qmclone`, `qmstart`, …), bounded for metrics.
pub fn upid_type(upid: &str) -> &'static str {
    match upid.split(':').nth(5).unwrap_or_default() {
        "qmclone" => "qmclone",
        "qmconfig" => "qmconfig",
        "resize" => "resize",
        "qmstart" => "qmstart",
        "qmstop" => "qmstop",
        "qmshutdown" => "qmshutdown",
        "qmdestroy" => "qmdestroy",
        _ => "other",
    }
}

fn number(v: &Value) -> u64 {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .or_else(|| v.as_f64().map(|f| f as u64))
        .unwrap_or(0)
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Splits a tag list as Proxmox does (`;`, `,` or space) and lower-cases it.
pub fn parse_tags(tags: &str) -> BTreeSet<String> {
    tags.split([';', ',', ' '])
        .filter(|t| !t.is_empty())
        .map(str::to_ascii_lowercase)
        .collect()
}

/// Proxmox's strict percent-encoding for `sshkeys` (`%20`, never `+`).
pub fn encode_ssh_keys(keys: &str) -> String {
    let mut out = String::with_capacity(keys.len() * 3);
    for b in keys.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What a clone call needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneRequest {
    /// The template's node.
    pub node: String,
    /// The template.
    pub template: u32,
    /// The new VMID.
    pub newid: u32,
    /// The new VM's name.
    pub name: String,
    /// Its description (carries the ownership marker).
    pub description: String,
    /// A full clone (else linked).
    pub full: bool,
    /// Storage for a full clone.
    pub storage: Option<String>,
    /// A pool to join.
    pub pool: Option<String>,
}

/// Typed calls over any [`ProxmoxApi`].
#[derive(Clone)]
pub struct Api(pub Arc<dyn ProxmoxApi>);

impl Api {
    async fn call(&self, request: ApiRequest) -> Result<Value, ProxmoxError> {
        self.0.call(request).await
    }

    /// `GET /version`: the release, e.g. `9.1.3`.
    pub async fn version(&self) -> Result<String, ProxmoxError> {
        let v = self
            .call(ApiRequest::new(Method::Get, "/version".into(), "version"))
            .await?;
        text(&v["version"]).ok_or_else(|| ProxmoxError::Decode("no version".into()))
    }

    /// `GET /nodes`: the names of the online nodes.
    pub async fn online_nodes(&self) -> Result<Vec<String>, ProxmoxError> {
        let v = self
            .call(ApiRequest::new(Method::Get, "/nodes".into(), "nodes"))
            .await?;
        let mut nodes: Vec<String> = v
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| n["status"] == "online")
            .filter_map(|n| text(&n["node"]))
            .collect();
        nodes.sort();
        Ok(nodes)
    }

    /// `GET /cluster/resources?type=vm`: every VM of the cluster (QEMU only).
    pub async fn list_vms(&self) -> Result<Vec<VmResource>, ProxmoxError> {
        let v = self
            .call(ApiRequest::new(Method::Get, "/cluster/resources".into(), "list_vms").param("type", "vm"))
            .await?;
        let items = v
            .as_array()
            .ok_or_else(|| ProxmoxError::Decode("the resource list is not a list".into()))?;
        Ok(items
            .iter()
            .filter(|r| r["type"] == "qemu")
            .filter_map(|r| {
                Some(VmResource {
                    vmid: u32::try_from(number(&r["vmid"])).ok().filter(|v| *v > 0)?,
                    node: text(&r["node"])?,
                    name: text(&r["name"]).filter(|n| !n.is_empty()),
                    tags: r["tags"].as_str().map(parse_tags).unwrap_or_default(),
                    running: r["status"] == "running",
                    lock: text(&r["lock"]).filter(|l| !l.is_empty()),
                    template: number(&r["template"]) == 1,
                    maxcpu: number(&r["maxcpu"]),
                    uptime: number(&r["uptime"]),
                    maxmem: number(&r["maxmem"]),
                    maxdisk: number(&r["maxdisk"]),
                })
            })
            .collect())
    }

    /// `POST …/clone`: starts a clone, returning its UPID.
    pub async fn clone_vm(&self, c: &CloneRequest) -> Result<String, ProxmoxError> {
        let mut r = ApiRequest::new(
            Method::Post,
            format!("/nodes/{}/qemu/{}/clone", c.node, c.template),
            "clone",
        )
        .param("newid", c.newid)
        .param("name", &c.name)
        .param("description", &c.description)
        .param("full", u8::from(c.full));
        if let (true, Some(storage)) = (c.full, &c.storage) {
            r = r.param("storage", storage);
        }
        if let Some(pool) = &c.pool {
            r = r.param("pool", pool);
        }
        upid(self.call(r).await?)
    }

    /// `GET …/tasks/{upid}/status`.
    pub async fn task_state(&self, upid: &str) -> Result<TaskState, ProxmoxError> {
        let node = upid_node(upid).ok_or_else(|| ProxmoxError::Decode(format!("not a UPID: {upid}")))?;
        let v = self
            .call(ApiRequest::new(
                Method::Get,
                format!("/nodes/{node}/tasks/{}/status", encode_path(upid)),
                "task_status",
            ))
            .await?;
        if v["status"] != "stopped" {
            return Ok(TaskState::Running);
        }
        let exit = v["exitstatus"].as_str().unwrap_or("unexpected status");
        Ok(if exit == "OK" || exit.starts_with("WARNINGS") {
            TaskState::Succeeded
        } else {
            TaskState::Failed(exit.to_owned())
        })
    }

    /// `GET …/config`: the config with pending values applied (`current=false`) or as running.
    pub async fn config(&self, node: &str, vmid: u32) -> Result<BTreeMap<String, String>, ProxmoxError> {
        let v = self
            .call(ApiRequest::new(
                Method::Get,
                format!("/nodes/{node}/qemu/{vmid}/config"),
                "get_config",
            ))
            .await?;
        Ok(v.as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.clone(), text(v)?)))
            .collect())
    }

    /// `GET …/pending`: the keys whose new value waits for a restart.
    pub async fn pending_keys(&self, node: &str, vmid: u32) -> Result<Vec<String>, ProxmoxError> {
        let v = self
            .call(ApiRequest::new(
                Method::Get,
                format!("/nodes/{node}/qemu/{vmid}/pending"),
                "pending",
            ))
            .await?;
        let mut keys: Vec<String> = v
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| !e["pending"].is_null() || !e["delete"].is_null())
            .filter_map(|e| text(&e["key"]))
            .collect();
        keys.sort();
        Ok(keys)
    }

    /// `GET …/pending`: each key with a new value waiting for a restart, and its running value.
    pub async fn pending_values(
        &self,
        node: &str,
        vmid: u32,
    ) -> Result<Vec<(String, Option<String>)>, ProxmoxError> {
        let v = self
            .call(ApiRequest::new(
                Method::Get,
                format!("/nodes/{node}/qemu/{vmid}/pending"),
                "pending",
            ))
            .await?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter(|e| !e["pending"].is_null())
            .filter_map(|e| Some((text(&e["key"])?, text(&e["value"]))))
            .collect())
    }

    /// `PUT …/config` (synchronous), with the config's digest for optimistic concurrency.
    pub async fn set_config(
        &self,
        node: &str,
        vmid: u32,
        params: &[(String, String)],
        digest: Option<&str>,
    ) -> Result<(), ProxmoxError> {
        let mut r = ApiRequest::new(
            Method::Put,
            format!("/nodes/{node}/qemu/{vmid}/config"),
            "set_config",
        );
        r.params = params.to_vec();
        if let Some(d) = digest {
            r = r.param("digest", d);
        }
        self.call(r).await.map(|_| ())
    }

    /// `PUT …/resize` to an absolute size in GiB; a UPID on PVE ≥ 8, nothing before.
    pub async fn resize(
        &self,
        node: &str,
        vmid: u32,
        disk: &str,
        gib: u32,
    ) -> Result<Option<String>, ProxmoxError> {
        let mut r = ApiRequest::new(Method::Put, format!("/nodes/{node}/qemu/{vmid}/resize"), "resize")
            .param("disk", disk)
            .param("size", format!("{gib}G"));
        r.idempotent = true;
        match self.call(r).await? {
            Value::Null => Ok(None),
            v => upid(v).map(Some),
        }
    }

    /// `POST …/status/{start|stop}`.
    pub async fn power(&self, node: &str, vmid: u32, start: bool) -> Result<String, ProxmoxError> {
        let (verb, op) = if start {
            ("start", "start")
        } else {
            ("stop", "stop")
        };
        upid(
            self.call(ApiRequest::new(
                Method::Post,
                format!("/nodes/{node}/qemu/{vmid}/status/{verb}"),
                op,
            ))
            .await?,
        )
    }

    /// `DELETE …/qemu/{vmid}` with purge and removal of unreferenced disks.
    pub async fn destroy(&self, node: &str, vmid: u32) -> Result<String, ProxmoxError> {
        upid(
            self.call(
                ApiRequest::new(Method::Delete, format!("/nodes/{node}/qemu/{vmid}"), "destroy")
                    .param("purge", 1)
                    .param("destroy-unreferenced-disks", 1),
            )
            .await?,
        )
    }

    /// `GET …/agent/network-get-interfaces`: the first global IPv4 address off `lo`, if the agent answers.
    pub async fn agent_address(&self, node: &str, vmid: u32) -> Result<Option<String>, ProxmoxError> {
        let v = self
            .call(ApiRequest::new(
                Method::Get,
                format!("/nodes/{node}/qemu/{vmid}/agent/network-get-interfaces"),
                "agent",
            ))
            .await;
        let v = match v {
            Ok(v) => v,
            // "QEMU guest agent is not running", "VM … is not running": not yet.
            Err(ProxmoxError::NotReady(_) | ProxmoxError::Transient { status: 500, .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let address = v["result"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| i["name"] != "lo")
            .flat_map(|i| i["ip-addresses"].as_array().cloned().unwrap_or_default())
            .filter(|a| a["ip-address-type"] == "ipv4")
            .filter_map(|a| a["ip-address"].as_str().map(str::to_owned))
            // `lo` is skipped by name; a 127/8 address on another interface is real (test clusters
            // hand them out from a loopback pool).
            .find(|a| !a.starts_with("169.254."));
        Ok(address)
    }
}

fn upid(v: Value) -> Result<String, ProxmoxError> {
    match v {
        Value::String(s) if s.starts_with("UPID:") => Ok(s),
        other => Err(ProxmoxError::Decode(format!("expected a task UPID, got {other}"))),
    }
}

/// Percent-encodes a path segment (UPIDs carry `:`, `@` and `!`).
fn encode_path(segment: &str) -> String {
    let mut out = String::new();
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_keys_are_percent_encoded_strictly() {
        assert_eq!(
            encode_ssh_keys("ssh-ed25519 AAAA+/= me@host:x\n"),
            "ssh-ed25519%20AAAA%2B%2F%3D%20me%40host%3Ax%0A"
        );
    }

    #[test]
    fn upids_give_their_node_and_a_bounded_type() {
        let upid = "UPID:pve:00003836:1FE22F41:619510AC:qmclone:9000:ci@pve!ctl:";
        assert_eq!(upid_node(upid), Some("pve"));
        assert_eq!(upid_type(upid), "qmclone");
        assert_eq!(upid_type("UPID:pve:0:0:0:vzdump:1:x:"), "other");
        assert_eq!(upid_node("nonsense"), None);
    }

    #[test]
    fn tags_are_split_and_lower_cased_like_proxmox_does() {
        let tags = parse_tags("Fediversity;b,c d");
        assert_eq!(
            tags.into_iter().collect::<Vec<_>>(),
            ["b", "c", "d", "fediversity"]
        );
    }
}
