//! The API routes the simulator serves, each a path template of the official schema.

mod cluster;
mod qemu;
mod tasks;

use std::time::Duration;

use serde_json::Value;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::params::Params;
use crate::server::Shared;
use crate::state::Started;

/// The simulated Proxmox VE version.
pub const PVE_VERSION: &str = "9.1.3";
/// Its release.
pub const PVE_RELEASE: &str = "9.1";
/// Its repository id (8–64 hex digits).
pub const PVE_REPOID: &str = "e5010dce";

/// What a handler answers.
#[derive(Debug)]
pub(crate) enum Reply {
    /// `{"data": …}`.
    Data(Value),
    /// `{"data": …, "total": N}`.
    WithTotal(Value, usize),
    /// A task: `{"data": "UPID:…"}`.
    Task(Started),
    /// A config task that answers `null` if it ends within `wait` (`background_delay`).
    TaskOrNull(Started, Duration, u32),
}

/// One authenticated call.
pub(crate) struct Call {
    /// Validated parameters (path placeholders included).
    pub params: Params,
    /// The caller (`None` only for `POST /access/ticket`).
    pub who: Option<Principal>,
}

impl Call {
    fn node(&self) -> &str {
        self.params.get("node").unwrap_or_default()
    }

    fn vmid(&self) -> u32 {
        self.params
            .int("vmid")
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or_default()
    }

    fn who(&self) -> Principal {
        self.who
            .clone()
            .unwrap_or_else(|| Principal::User("root@pam".into()))
    }
}

type Handler = fn(&Shared, &Call) -> Result<Reply, ApiError>;

/// Method, path template and handler of every served route.
const ROUTES: &[(&str, &str, Handler)] = &[
    ("GET", "/version", cluster::version),
    ("POST", "/access/ticket", cluster::ticket),
    ("GET", "/pools", cluster::pools),
    ("GET", "/cluster/status", cluster::status),
    ("GET", "/cluster/resources", cluster::resources),
    ("GET", "/cluster/nextid", cluster::nextid),
    ("GET", "/nodes", cluster::nodes),
    ("GET", "/nodes/{node}/status", cluster::node_status),
    ("GET", "/nodes/{node}/storage", cluster::storage),
    ("GET", "/nodes/{node}/qemu", qemu::list),
    ("POST", "/nodes/{node}/qemu", qemu::create),
    ("DELETE", "/nodes/{node}/qemu/{vmid}", qemu::destroy),
    ("GET", "/nodes/{node}/qemu/{vmid}/config", qemu::get_config),
    ("POST", "/nodes/{node}/qemu/{vmid}/config", qemu::post_config),
    ("PUT", "/nodes/{node}/qemu/{vmid}/config", qemu::put_config),
    ("GET", "/nodes/{node}/qemu/{vmid}/pending", qemu::pending),
    ("GET", "/nodes/{node}/qemu/{vmid}/cloudinit", qemu::get_cloudinit),
    ("PUT", "/nodes/{node}/qemu/{vmid}/cloudinit", qemu::put_cloudinit),
    ("GET", "/nodes/{node}/qemu/{vmid}/status/current", qemu::status),
    ("POST", "/nodes/{node}/qemu/{vmid}/status/start", qemu::start),
    ("POST", "/nodes/{node}/qemu/{vmid}/status/stop", qemu::stop),
    (
        "POST",
        "/nodes/{node}/qemu/{vmid}/status/shutdown",
        qemu::shutdown,
    ),
    ("POST", "/nodes/{node}/qemu/{vmid}/clone", qemu::clone),
    ("PUT", "/nodes/{node}/qemu/{vmid}/resize", qemu::resize),
    (
        "GET",
        "/nodes/{node}/qemu/{vmid}/agent/network-get-interfaces",
        qemu::agent_interfaces,
    ),
    ("GET", "/nodes/{node}/tasks", tasks::list),
    ("DELETE", "/nodes/{node}/tasks/{upid}", tasks::stop),
    ("GET", "/nodes/{node}/tasks/{upid}/log", tasks::log),
    ("GET", "/nodes/{node}/tasks/{upid}/status", tasks::status),
];

/// Routes that start tasks (where pveproxy's worker fork can fail).
pub(crate) fn starts_task(method: &str, template: &str) -> bool {
    let synchronous = method == "GET"
        || matches!(template, "/access/ticket" | "/nodes/{node}/tasks/{upid}")
        || (method == "PUT" && template.ends_with("/config"))
        || template.ends_with("/cloudinit");
    !synchronous
}

/// Every `(method, path template)` the simulator serves.
pub fn served_routes() -> Vec<(&'static str, &'static str)> {
    ROUTES.iter().map(|(m, p, _)| (*m, *p)).collect()
}

/// A matched route: its index, template and path placeholders.
pub(crate) struct Matched {
    pub index: usize,
    pub template: &'static str,
    pub path_params: Vec<(String, String)>,
}

/// Finds the route of `method` and `path` (relative to `/api2/json`).
pub(crate) fn match_route(method: &str, path: &str) -> Option<Matched> {
    let segments: Vec<String> = path
        .trim_end_matches('/')
        .split('/')
        .skip(1)
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    ROUTES.iter().enumerate().find_map(|(index, (m, template, _))| {
        if *m != method {
            return None;
        }
        let parts: Vec<&str> = template.split('/').skip(1).collect();
        if parts.len() != segments.len() {
            return None;
        }
        let mut path_params = Vec::new();
        for (part, segment) in parts.iter().zip(&segments) {
            match part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                Some(name) => path_params.push((name.to_string(), segment.clone())),
                None if part == segment => {}
                None => return None,
            }
        }
        Some(Matched {
            index,
            template,
            path_params,
        })
    })
}

/// Runs the handler of a matched route.
pub(crate) fn dispatch(shared: &Shared, index: usize, call: &Call) -> Result<Reply, ApiError> {
    let (_, template, handler) = ROUTES[index];
    if template.starts_with("/nodes/{node}") {
        shared.cluster().check_node(call.node())?;
    }
    handler(shared, call)
}
