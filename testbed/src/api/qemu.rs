//! QEMU VM routes: create, clone, config, pending, cloud-init, power, resize, destroy, guest agent.

use std::time::Duration;

use serde_json::Value;

use super::{Call, Reply};
use crate::error::ApiError;
use crate::server::Shared;

pub(super) fn list(shared: &Shared, call: &Call) -> Result<Reply, ApiError> {
    Ok(Reply::Data(shared.cluster().qemu_list(call.node())))
}

pub(super) fn create(shared: &Shared, call: &Call) -> Result<Reply, ApiError> {
    shared
        .cluster()
        .create_vm(call.node(), &call.params, &call.who())
        .map(Reply::Task)
}

pub(super) fn clone(shared: &Shared, call: &Call) -> Result<Reply, ApiError> {
    shared
        .cluster()
        .clone_vm(call.node(), call.vmid(), &call.params, &call.who())
        .map(Reply::Task)
}

pub(super) fn destroy(shared: &Shared, call: &Call) -> Result<Reply, ApiError> {
    shared
        .cluster()
        .destroy(call.node(), call.vmid(), &call.params, &call.who())
        .map(Reply::Task)
}

pub(super) fn get_config(shared: &Shared, call: &Call) -> Result<Reply, ApiError> {
    if call.params.has("snapshot") {
        let name = call.params.get("snapshot").unwrap_or_default();
        return Err(ApiError::internal(format!("snapshot '{name}' does not exist")));
    }
    let current = call.params.flag("current").unwrap_or(false);
    shared
        .cluster()
        .vm_config(call.node(), call.vmid(), current)
        .map(Reply::Data)
}

pub(super) fn post_config(shared: &Shared, call: &Call) -> Result<Reply, ApiError> {
    let started =
        shared
            .cluster()
            .update_config_async(call.node(), call.vmid(), &call.params, &call.who())?;
    match call.params.int("background_delay") {
        Some(delay) => Ok(Reply::TaskOrNull(
            started,
            Duration::from_secs(delay.max(0) as u64),
            call.vmid(),
        )),
        None => Ok(Reply::Task(started)),
    }
}

pub(super) fn put_config(shared: &Shared, call: &Call) -> Result<Reply, ApiError> {
    let mut cluster = shared.cluster();
    cluster.stage_config(call.node(), call.vmid(), &call.params, &call.who())?;
    cluster.apply_config(call.node(), call.vmid())?;
    Ok(Reply::Data(Value::Null))
}

pub(super) fn pending(shared: &Shared, call: &Call) -> Result<Reply, ApiError> {
    shared
        .cluster()
        .vm_pending(call.node(), call.vmid())
        .map(Reply::Data)
}

pub(super) fn get_cloudinit(shared: &Shared, call: &Call) -> Result<Reply, ApiError> {
    shared
        .cluster()
        .vm_cloudinit(call.node(), call.vmid())
        .map(Reply::Data)
}

pub(super) fn put_cloudinit(shared: &Shared, call: &Call) -> Result<Reply, ApiError> {
    shared.cluster().regenerate_cloudinit(call.node(), call.vmid())?;
    Ok(Reply::Data(Value::Null))
}

pub(super) fn status(shared: &Shared, call: &Call) -> Result<Reply, ApiError> {
    shared
        .cluster()
        .vm_status(call.node(), call.vmid())
        .map(Reply::Data)
}

pub(super) fn start(shared: &Shared, call: &Call) -> Result<Reply, ApiError> {
    shared
        .cluster()
        .start(call.node(), call.vmid(), &call.params, &call.who())
        .map(Reply::Task)
}

pub(super) fn stop(shared: &Shared, call: &Call) -> Result<Reply, ApiError> {
    shared
        .cluster()
        .stop(call.node(), call.vmid(), &call.params, &call.who())
        .map(Reply::Task)
}

pub(super) fn shutdown(shared: &Shared, call: &Call) -> Result<Reply, ApiError> {
    shared
        .cluster()
        .shutdown(call.node(), call.vmid(), &call.params, &call.who())
        .map(Reply::Task)
}

pub(super) fn resize(shared: &Shared, call: &Call) -> Result<Reply, ApiError> {
    shared
        .cluster()
        .resize(call.node(), call.vmid(), &call.params, &call.who())
        .map(Reply::Task)
}

pub(super) fn agent_interfaces(shared: &Shared, call: &Call) -> Result<Reply, ApiError> {
    shared
        .cluster()
        .agent_interfaces(call.node(), call.vmid())
        .map(Reply::Data)
}
