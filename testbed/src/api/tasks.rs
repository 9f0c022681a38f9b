//! Task routes: list, status, log, stop.

use serde_json::{Value, json};

use super::{Call, Reply};
use crate::error::ApiError;
use crate::server::Shared;
use crate::state::task::{Task, parse_upid};

fn find<'a>(tasks: &'a [Task], upid: &str) -> Result<&'a Task, ApiError> {
    if parse_upid(upid).is_none() {
        return Err(ApiError::param(
            "upid",
            format!("unable to parse worker upid '{upid}'"),
        ));
    }
    tasks
        .iter()
        .find(|t| t.upid == upid)
        .ok_or_else(|| ApiError::param("upid", "no such task"))
}

pub(super) fn status(shared: &Shared, call: &Call) -> Result<Reply, ApiError> {
    let cluster = shared.cluster();
    let task = find(&cluster.tasks, call.params.get("upid").unwrap_or_default())?;
    Ok(Reply::Data(task.status_json()))
}

pub(super) fn log(shared: &Shared, call: &Call) -> Result<Reply, ApiError> {
    let cluster = shared.cluster();
    let task = find(&cluster.tasks, call.params.get("upid").unwrap_or_default())?;
    let start = call.params.int("start").unwrap_or(0).max(0) as usize;
    let limit = call.params.int("limit").unwrap_or(50).max(0) as usize;
    let lines: Vec<Value> = task
        .log
        .iter()
        .enumerate()
        .skip(start)
        .take(if limit == 0 { usize::MAX } else { limit })
        .map(|(i, t)| json!({ "n": i + 1, "t": t }))
        .collect();
    Ok(Reply::WithTotal(json!(lines), task.log.len()))
}

pub(super) fn stop(shared: &Shared, call: &Call) -> Result<Reply, ApiError> {
    let mut cluster = shared.cluster();
    let upid = call.params.get("upid").unwrap_or_default();
    find(&cluster.tasks, upid)?;
    cluster.abort_task(upid)?;
    Ok(Reply::Data(Value::Null))
}

pub(super) fn list(shared: &Shared, call: &Call) -> Result<Reply, ApiError> {
    let cluster = shared.cluster();
    let p = &call.params;
    let source = p.get("source").unwrap_or("archive");
    let errors_only = p.flag("errors").unwrap_or(false);
    let vmid = p.get("vmid");
    let statuses: Option<Vec<String>> = p
        .get("statusfilter")
        .map(|s| crate::formats::split_list(s).map(str::to_lowercase).collect());
    let mut tasks: Vec<&Task> = cluster
        .tasks
        .iter()
        .filter(|t| t.node == call.node())
        .filter(|t| match source {
            "active" => t.running(),
            "all" => true,
            _ => !t.running(),
        })
        .filter(|t| vmid.is_none_or(|v| t.id == v))
        .filter(|t| p.get("typefilter").is_none_or(|f| t.kind == f))
        .filter(|t| p.get("userfilter").is_none_or(|u| t.user.contains(u)))
        .filter(|t| p.int("since").is_none_or(|s| t.starttime as i64 >= s))
        .filter(|t| p.int("until").is_none_or(|u| t.starttime as i64 <= u))
        .filter(|t| !errors_only || t.exit.as_deref().is_some_and(|e| e != "OK"))
        .filter(|t| {
            statuses.as_ref().is_none_or(|list| {
                let class = match t.exit.as_deref() {
                    None => "running",
                    Some("OK") => "ok",
                    Some(e) if e.starts_with("WARNINGS") => "warning",
                    Some("unexpected status") => "unknown",
                    Some(_) => "error",
                };
                list.iter().any(|s| s == class)
            })
        })
        .collect();
    tasks.sort_by_key(|t| std::cmp::Reverse((t.starttime, t.pid)));
    let total = tasks.len();
    let start = p.int("start").unwrap_or(0).max(0) as usize;
    let limit = p.int("limit").unwrap_or(50).max(0) as usize;
    let page: Vec<Value> = tasks
        .into_iter()
        .skip(start)
        .take(limit)
        .map(Task::list_json)
        .collect();
    Ok(Reply::WithTotal(json!(page), total))
}
