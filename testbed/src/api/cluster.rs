//! Version, login, cluster-wide and node-level routes.

use serde_json::json;

use super::{Call, PVE_RELEASE, PVE_REPOID, PVE_VERSION, Reply};
use crate::error::ApiError;
use crate::server::Shared;

pub(super) fn version(_: &Shared, _: &Call) -> Result<Reply, ApiError> {
    Ok(Reply::Data(
        json!({ "version": PVE_VERSION, "release": PVE_RELEASE, "repoid": PVE_REPOID }),
    ))
}

pub(super) fn ticket(shared: &Shared, call: &Call) -> Result<Reply, ApiError> {
    let p = &call.params;
    let login = shared.auth.login(
        p.get("username").unwrap_or_default(),
        p.get("password").unwrap_or_default(),
        p.get("realm"),
    )?;
    let cap = json!({
        "vms": { "VM.Allocate": 1, "VM.Clone": 1, "VM.Config.Options": 1, "VM.PowerMgmt": 1, "VM.Audit": 1 },
        "nodes": { "Sys.Audit": 1 }, "storage": { "Datastore.AllocateSpace": 1 },
    });
    Ok(Reply::Data(json!({
        "username": login.username, "ticket": login.ticket, "CSRFPreventionToken": login.csrf, "cap": cap,
    })))
}

pub(super) fn pools(_: &Shared, _: &Call) -> Result<Reply, ApiError> {
    Ok(Reply::Data(json!([])))
}

pub(super) fn status(shared: &Shared, _: &Call) -> Result<Reply, ApiError> {
    let cluster = shared.cluster();
    let list: Vec<_> = cluster
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            json!({ "id": format!("node/{n}"), "name": n, "type": "node", "ip": "127.0.0.1", "level": "",
                    "local": u8::from(i == 0), "nodeid": i + 1, "online": 1 })
        })
        .collect();
    Ok(Reply::Data(json!(list)))
}

pub(super) fn resources(shared: &Shared, call: &Call) -> Result<Reply, ApiError> {
    Ok(Reply::Data(shared.cluster().resources(call.params.get("type"))))
}

pub(super) fn nextid(shared: &Shared, call: &Call) -> Result<Reply, ApiError> {
    shared.cluster().nextid(call.params.int("vmid")).map(Reply::Data)
}

pub(super) fn nodes(shared: &Shared, _: &Call) -> Result<Reply, ApiError> {
    Ok(Reply::Data(shared.cluster().node_list()))
}

pub(super) fn node_status(shared: &Shared, call: &Call) -> Result<Reply, ApiError> {
    Ok(Reply::Data(shared.cluster().node_status(call.node())))
}

pub(super) fn storage(shared: &Shared, call: &Call) -> Result<Reply, ApiError> {
    Ok(Reply::Data(shared.cluster().storage_list(call.node())))
}
