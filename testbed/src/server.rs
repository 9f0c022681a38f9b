//! The HTTP(S) front: pveproxy's envelope, auth, parameter handling, fault injection and side endpoints.

use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::api::{self, Call, Reply};
use crate::auth::{Auth, Principal};
use crate::error::ApiError;
use crate::faults::{Faults, roll};
use crate::latency::{LatencyModel, Op};
use crate::params;
use crate::schema::ROUTE_TABLE;
use crate::state::{Cluster, Started};
use crate::stats::{Recorder, RequestRecord};

/// Largest request body accepted (pveproxy limits POST bodies to 64 KiB).
const MAX_BODY: usize = 64 * 1024;
/// How often a `background_delay` wait looks at its task.
const BACKGROUND_POLL: Duration = Duration::from_millis(10);

/// State shared by all connections.
pub(crate) struct Shared {
    cluster: Mutex<Cluster>,
    pub(crate) auth: Auth,
    recorder: Mutex<Recorder>,
}

impl Shared {
    pub(crate) fn new(cluster: Cluster, auth: Auth) -> Self {
        Self {
            cluster: Mutex::new(cluster),
            auth,
            recorder: Mutex::new(Recorder::default()),
        }
    }

    /// The cluster, locked. Never held across an `.await`.
    pub(crate) fn cluster(&self) -> MutexGuard<'_, Cluster> {
        self.cluster.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn recorder(&self) -> MutexGuard<'_, Recorder> {
        self.recorder.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Accepts connections until `shutdown` turns true.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = shared.clone();
                let tls = tls.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| handle(shared.clone(), req));
                    let builder = hyper::server::conn::http1::Builder::new();
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
                        }
                    }
                });
            }
            _ = shutdown.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Answers one request.
async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let headers = req.headers().clone();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            let err = ApiError::new(413, "Request Entity Too Large");
            return Ok(error_response(&err));
        }
    };
    if let Some(side) = path.strip_prefix("/_sim/") {
        return Ok(side_endpoint(&shared, &method, side, query.as_deref(), &body));
    }
    let mut record = RequestRecord {
        seq: 0,
        method: method.clone(),
        path: path.clone(),
        route: None,
        status: 200,
        principal: None,
        fault: false,
    };
    let response = api_call(
        &shared,
        &method,
        &path,
        query.as_deref(),
        &headers,
        &body,
        &mut record,
    )
    .await;
    let response = match response {
        Ok(body) => json_response(200, None, Some(body)),
        Err(err) => {
            record.status = err.status;
            error_response(&err)
        }
    };
    tracing::debug!(method, path, status = record.status, principal = ?record.principal, "request");
    shared.recorder().record(record);
    Ok(response)
}

#[allow(clippy::too_many_arguments)] // one call's parts, taken apart once in `handle`
async fn api_call(
    shared: &Arc<Shared>,
    method: &str,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    body: &[u8],
    record: &mut RequestRecord,
) -> Result<Value, ApiError> {
    let Some(rel) = path.strip_prefix("/api2/json") else {
        return Err(ApiError::new(501, "no such uri"));
    };
    let latency = shared.cluster().latency;
    sleep(latency.duration(Op::ApiCall)).await;
    let Some(matched) = api::match_route(method, rel) else {
        return Err(ApiError::not_implemented(method, rel));
    };
    record.route = Some(format!("{method} {}", matched.template));
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let who = if matched.template == "/access/ticket" {
        None
    } else {
        match shared.auth.authenticate(
            method,
            header("authorization"),
            header("cookie"),
            header("csrfpreventiontoken"),
        ) {
            Ok(p) => Some(p),
            Err(e) => {
                sleep(latency.duration(Op::AuthFailure)).await;
                return Err(e);
            }
        }
    };
    record.principal = who.as_ref().map(Principal::upid_user);
    if let Some(fault) = transport_fault(shared, method, matched.template) {
        record.fault = true;
        return Err(fault);
    }
    let mut params = params::decode(method, query, header("content-type"), body, &matched.path_params)?;
    let spec = ROUTE_TABLE
        .route(method, matched.template)
        .ok_or_else(|| ApiError::not_implemented(method, rel))?;
    params::validate(&ROUTE_TABLE, spec, &mut params)?;
    let call = Call { params, who };
    let reply = api::dispatch(shared, matched.index, &call)?;
    let lost = {
        let mut cluster = shared.cluster();
        let rate = cluster.faults.lost_response_rate;
        roll(&mut cluster.rng, rate)
    };
    let value = match reply {
        Reply::Data(v) => json!({ "data": v }),
        Reply::WithTotal(v, total) => json!({ "data": v, "total": total }),
        Reply::Task(started) => {
            spawn_task(shared, &started);
            json!({ "data": started.upid })
        }
        Reply::TaskOrNull(started, wait, vmid) => {
            spawn_task(shared, &started);
            json!({ "data": wait_for_task(shared, &started.upid, wait, vmid).await? })
        }
    };
    if lost {
        record.fault = true;
        return Err(ApiError::new(596, "Connection timed out"));
    }
    Ok(value)
}

async fn sleep(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

/// Draws a transport fault: 500 (worker fork) for task-starting calls, otherwise 595/596.
fn transport_fault(shared: &Shared, method: &str, template: &str) -> Option<ApiError> {
    let mut cluster = shared.cluster();
    let rate = cluster.faults.rate;
    if !roll(&mut cluster.rng, rate) {
        return None;
    }
    let choices = if api::starts_task(method, template) { 3 } else { 2 };
    Some(match cluster.rng.usize(..choices) {
        0 => ApiError::new(595, "Connection refused"),
        1 => ApiError::new(596, "Connection timed out"),
        _ => ApiError::internal("got no worker upid - start worker failed"),
    })
}

/// Starts the timer that ends a task.
fn spawn_task(shared: &Arc<Shared>, started: &Started) {
    let task_shared = shared.clone();
    let upid = started.upid.clone();
    let after = started.after;
    let handle = tokio::spawn(async move {
        if after.is_zero() {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(after).await;
        }
        task_shared.cluster().complete_task(&upid);
    });
    shared.recorder().task_started();
    if let Some(task) = shared.cluster().task_mut(&started.upid).filter(|t| t.running()) {
        task.abort = Some(handle.abort_handle());
    }
}

/// `background_delay`: `null` if the task ended within `wait`, its UPID otherwise.
async fn wait_for_task(shared: &Shared, upid: &str, wait: Duration, vmid: u32) -> Result<Value, ApiError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let exit = shared.cluster().task_mut(upid).and_then(|t| t.exit.clone());
        match exit {
            Some(e) if e == "OK" || e.starts_with("WARNINGS") => return Ok(Value::Null),
            Some(e) => return Err(ApiError::internal(format!("failed to update VM {vmid}: {e}"))),
            None if tokio::time::Instant::now() >= deadline => return Ok(json!(upid)),
            None => tokio::time::sleep(BACKGROUND_POLL).await,
        }
    }
}

fn side_endpoint(
    shared: &Shared,
    method: &str,
    path: &str,
    query: Option<&str>,
    body: &[u8],
) -> Response<Full<Bytes>> {
    let query: Vec<(String, String)> = query
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let q = |name: &str| query.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let ok = |v: Value| json_response(200, None, Some(json!({ "data": v })));
    match (method, path) {
        ("GET", "stats") => ok(json!(shared.recorder().stats())),
        ("GET", "log") => ok(json!(shared.recorder().log())),
        ("POST", "reset") => {
            shared.recorder().reset();
            ok(Value::Null)
        }
        ("GET", "vms") => ok(json!(shared.cluster().vm_infos())),
        ("GET", "faults") => ok(json!(shared.cluster().faults)),
        ("POST", "faults") => match serde_json::from_slice::<Faults>(body) {
            Ok(f) => {
                shared.cluster().faults = f.clamped();
                ok(Value::Null)
            }
            Err(e) => error_response(&ApiError::new(400, format!("invalid faults: {e}"))),
        },
        ("POST", "latency") => match q("scale").and_then(|s| s.parse::<f64>().ok()) {
            Some(scale) => {
                shared.cluster().latency = LatencyModel::scaled(scale);
                ok(Value::Null)
            }
            None => error_response(&ApiError::param("scale", "expected a number")),
        },
        _ => error_response(&ApiError::not_implemented(method, &format!("/_sim/{path}"))),
    }
}

/// An error answer: the status, the message as the reason phrase, the message and errors in the body.
pub(crate) fn error_response(err: &ApiError) -> Response<Full<Bytes>> {
    json_response(err.status, Some(err.reason()), err.body())
}

fn json_response(status: u16, reason: Option<&str>, body: Option<Value>) -> Response<Full<Bytes>> {
    let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let mut response = Response::new(Full::new(bytes));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert("server", HeaderValue::from_static("pve-api-daemon/3.0"));
    headers.insert(
        "content-type",
        HeaderValue::from_static("application/json;charset=UTF-8"),
    );
    headers.insert("cache-control", HeaderValue::from_static("max-age=0"));
    headers.insert("pragma", HeaderValue::from_static("no-cache"));
    if status >= 400 {
        // pveproxy closes the connection after any error answer.
        headers.insert("connection", HeaderValue::from_static("close"));
    }
    if let Some(reason) = reason
        && let Ok(phrase) = hyper::ext::ReasonPhrase::try_from(reason.as_bytes().to_vec())
    {
        response.extensions_mut().insert(phrase);
    }
    response
}
