//! A scripted [`ProxmoxApi`] for unit tests: the calls expected, in order, each with its answer; any
//! other call fails the test at once, naming the call and what was expected instead.
//!
//! Modelled on bottlerocket-update-operator's mocked node client: the script is the contract of one
//! scenario, so a test that passes proves both what the lifecycle asked and that it asked nothing else
//! (no second clone, no write to a VM that is not ours).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde_json::{Value, json};

use super::client::{Api, ApiRequest, Method, ProxmoxApi, ProxmoxError};
use crate::runtime::BoxFuture;

/// How an expected call is answered: from the request (and anything the test captured).
type Answer = Box<dyn Fn(&ApiRequest) -> Result<Value, ProxmoxError> + Send + Sync>;

/// One expected call.
struct Expected {
    method: Method,
    path: String,
    /// Parameters the call must carry with exactly these values (others are allowed).
    params: Vec<(String, String)>,
    answer: Answer,
}

impl Expected {
    fn describe(&self) -> String {
        format!("{:?} {} {:?}", self.method, self.path, self.params)
    }
}

/// A scripted Proxmox API. Cheap to clone (the clones share the script).
#[derive(Clone, Default)]
pub struct ScriptedApi {
    script: Arc<Mutex<VecDeque<Expected>>>,
    calls: Arc<Mutex<Vec<ApiRequest>>>,
}

impl ScriptedApi {
    /// An empty script: any call fails.
    pub fn new() -> Self {
        Self::default()
    }

    fn script(&self) -> MutexGuard<'_, VecDeque<Expected>> {
        self.script.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Expects `method path` next, answered with `answer`.
    pub fn expect(&self, method: Method, path: &str, answer: Result<Value, ProxmoxError>) -> &Self {
        self.expect_with(method, path, &[], move |_| answer.clone())
    }

    /// Expects `method path` next, carrying `params` (among others), answered by `answer` called with
    /// the request when it comes.
    pub fn expect_with(
        &self,
        method: Method,
        path: &str,
        params: &[(&str, &str)],
        answer: impl Fn(&ApiRequest) -> Result<Value, ProxmoxError> + Send + Sync + 'static,
    ) -> &Self {
        self.script().push_back(Expected {
            method,
            path: path.to_owned(),
            params: params
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            answer: Box::new(answer),
        });
        self
    }

    /// The typed API over this script.
    pub fn api(&self) -> Api {
        Api(Arc::new(self.clone()))
    }

    /// Every call made so far, in order.
    pub fn calls(&self) -> Vec<ApiRequest> {
        self.calls.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// How many expected calls have not come yet.
    pub fn remaining(&self) -> usize {
        self.script().len()
    }

    /// Fails unless every expected call came.
    #[track_caller]
    pub fn assert_done(&self) {
        let left: Vec<String> = self.script().iter().map(Expected::describe).collect();
        assert!(left.is_empty(), "expected calls that never came: {left:#?}");
    }
}

impl ProxmoxApi for ScriptedApi {
    fn call(&self, request: ApiRequest) -> BoxFuture<Result<Value, ProxmoxError>> {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(request.clone());
        let next = self.script().pop_front();
        let Some(expected) = next else {
            panic!(
                "unexpected call {:?} {} {:?}: the script has ended",
                request.method, request.path, request.params
            );
        };
        let matches = expected.method == request.method
            && expected.path == request.path
            && expected.params.iter().all(|p| request.params.contains(p));
        assert!(
            matches,
            "unexpected call {:?} {} {:?}; expected {}",
            request.method,
            request.path,
            request.params,
            expected.describe()
        );
        let answer = (expected.answer)(&request);
        Box::pin(async move { answer })
    }
}

/// A UPID of a task of `kind` (`qmclone`, `qmstart`, …) on `vmid` at `node`, in Proxmox's format.
pub fn upid(node: &str, vmid: u32, kind: &str) -> String {
    format!("UPID:{node}:0000A1B2:0012C3D4:65F0A1B2:{kind}:{vmid}:ci@pve!ctl:")
}

/// The status path of a task.
pub fn task_path(upid: &str) -> String {
    let node = super::client::upid_node(upid).unwrap_or("pve");
    let encoded: String = upid
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~:".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    format!("/nodes/{node}/tasks/{encoded}/status")
}

/// A task's status while it runs.
pub fn task_running() -> Result<Value, ProxmoxError> {
    Ok(json!({ "status": "running" }))
}

/// A task's status once it ended with `exit` (`OK`, `WARNINGS: 1`, or an error text).
pub fn task_stopped(exit: &str) -> Result<Value, ProxmoxError> {
    Ok(json!({ "status": "stopped", "exitstatus": exit }))
}

/// A started task: its UPID as the call's answer.
pub fn task(upid: &str) -> Result<Value, ProxmoxError> {
    Ok(Value::String(upid.to_owned()))
}
