//! The Proxmox VE API at the I/O edge: the [`ProxmoxApi`] trait, its HTTP implementation [`HttpProxmox`]
//! (reqwest + rustls, token or ticket auth, rate and concurrency limits, metrics) and typed errors.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::Semaphore;

use super::metrics::{PROVIDER, ProxmoxMetrics};
use crate::api::{EnvironmentLimits, ProxmoxSpec};
use crate::runtime::BoxFuture;

/// A failed Proxmox API call, classified from the status code and the error message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxmoxError {
    /// The VM (or task) does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The VMID is taken.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The VM is locked (by a task, a backup, …) or a lock could not be taken in time.
    #[error("locked: {0}")]
    Locked(String),
    /// The credentials were refused (401).
    #[error("unauthorised: {0}")]
    Unauthorized(String),
    /// The credentials lack a privilege (403).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// A failure that may pass on retry: 5xx, the proxy's 595/596/599, a lost connection.
    #[error("transient failure (HTTP {status}): {message}")]
    Transient {
        /// The status (0 when no answer came).
        status: u16,
        /// The message.
        message: String,
    },
    /// Not ready yet, an expected answer while a VM boots (`QEMU guest agent is not running`, `VM 100 is
    /// not running`): asked again later, never retried as an error.
    #[error("not ready: {0}")]
    NotReady(String),
    /// The endpoint cannot be reached at all.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The server's certificate was refused.
    #[error("TLS verification failed: {0}")]
    Tls(String),
    /// The request was refused as malformed (400).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A task ended with an error.
    #[error("task failed: {0}")]
    TaskFailed(String),
    /// The local setup is wrong (unreadable secret file, bad endpoint, TLS settings).
    #[error("configuration: {0}")]
    Config(String),
    /// The answer could not be understood.
    #[error("unexpected answer: {0}")]
    Decode(String),
}

impl ProxmoxError {
    /// A bounded label for metrics and reasons.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::NotFound(_) => "not_found",
            Self::AlreadyExists(_) => "already_exists",
            Self::Locked(_) => "locked",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::Transient { .. } => "transient",
            Self::NotReady(_) => "not_ready",
            Self::Unreachable(_) => "unreachable",
            Self::Tls(_) => "tls",
            Self::BadRequest(_) => "bad_request",
            Self::TaskFailed(_) => "task_failed",
            Self::Config(_) => "config",
            Self::Decode(_) => "decode",
        }
    }

    /// Whether a retry (of an idempotent call) may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Transient { .. } | Self::Unreachable(_) | Self::Locked(_) | Self::TaskFailed(_)
        )
    }

    /// Classifies an error answer from its status code and message.
    pub fn classify(status: u16, message: &str) -> Self {
        let m = message.to_owned();
        let lower = message.to_ascii_lowercase();
        match status {
            401 => Self::Unauthorized(m),
            403 => Self::Forbidden(m),
            _ if lower.contains("does not exist") || lower.contains("no such task") => Self::NotFound(m),
            _ if lower.contains("already exists") => Self::AlreadyExists(m),
            _ if lower.contains("guest agent is not running")
                || (lower.starts_with("vm ") && lower.trim_end().ends_with("is not running")) =>
            {
                Self::NotReady(m)
            }
            _ if lower.contains("vm is locked") || lower.contains("can't lock file") => Self::Locked(m),
            400 => Self::BadRequest(m),
            _ => Self::Transient { status, message: m },
        }
    }
}

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
    fn new(method: Method, path: String, op: &'static str) -> Self {
        Self {
            method,
            idempotent: method == Method::Get,
            path,
            params: Vec::new(),
            op,
        }
    }

    fn param(mut self, key: &str, value: impl ToString) -> Self {
        self.params.push((key.to_owned(), value.to_string()));
        self
    }
}

/// The Proxmox VE API as the controller uses it: one call in, the `data` of the answer out.
pub trait ProxmoxApi: Send + Sync + 'static {
    /// Makes one call.
    fn call(&self, request: ApiRequest) -> BoxFuture<Result<Value, ProxmoxError>>;
}

/// Politeness limits of one client.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Requests per second on average.
    pub per_second: f64,
    /// Requests allowed in a burst.
    pub burst: f64,
}

impl Default for RateLimit {
    /// 50 requests a second with bursts of 100: far below what one pveproxy serves, and enough for
    /// a pass over hundreds of VMs.
    fn default() -> Self {
        Self {
            per_second: 50.0,
            burst: 100.0,
        }
    }
}

/// A token bucket.
#[derive(Debug)]
struct Bucket {
    limit: RateLimit,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            state: Mutex::new((limit.burst, Instant::now())),
        }
    }

    /// Takes a token, returning how long to wait first.
    fn take(&self) -> Duration {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let (tokens, last) = *state;
        let tokens = (tokens + now.duration_since(last).as_secs_f64() * self.limit.per_second)
            .min(self.limit.burst)
            - 1.0;
        *state = (tokens, now);
        if tokens >= 0.0 || self.limit.per_second <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-tokens / self.limit.per_second)
        }
    }
}

/// A ticket session (for `user` + `passwordFile` credentials).
#[derive(Clone)]
struct Session {
    ticket: String,
    csrf: String,
    at: Instant,
}

/// How the client authenticates. Secrets are read from their files at use and never kept in `Debug`.
enum Auth {
    Token {
        id: String,
        secret_file: PathBuf,
    },
    Ticket {
        user: String,
        password_file: PathBuf,
        session: tokio::sync::Mutex<Option<Session>>,
    },
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Token { id, .. } => f.debug_struct("Token").field("id", id).finish_non_exhaustive(),
            Self::Ticket { user, .. } => f
                .debug_struct("Ticket")
                .field("user", user)
                .finish_non_exhaustive(),
        }
    }
}

/// Tickets live 2 h; renew after 1 h, as proxmoxer does.
const TICKET_RENEW: Duration = Duration::from_secs(3600);
const TICKET_LIFETIME: Duration = Duration::from_secs(7000);
/// pveproxy gives up on a proxied call after 30 s; wait a little longer for its answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(40);
/// Retries of an idempotent call after a transient failure.
const RETRIES: u32 = 3;

fn read_secret(path: &PathBuf) -> Result<String, ProxmoxError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ProxmoxError::Config(format!("cannot read the secret file {}: {e}", path.display())))?;
    let secret = text.trim().to_owned();
    if secret.is_empty() {
        return Err(ProxmoxError::Config(format!(
            "the secret file {} is empty",
            path.display()
        )));
    }
    Ok(secret)
}

/// The real API over HTTPS (or HTTP, when the endpoint says so). Cheap to clone.
#[derive(Clone)]
pub struct HttpProxmox {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    base: String,
    auth: Auth,
    bucket: Bucket,
    in_flight: Semaphore,
    metrics: ProxmoxMetrics,
}

impl std::fmt::Debug for HttpProxmox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpProxmox")
            .field("base", &self.inner.base)
            .field("auth", &self.inner.auth)
            .finish_non_exhaustive()
    }
}

impl HttpProxmox {
    /// A client for `spec` with `limits` on concurrent calls and `rate` on call starts.
    pub fn new(
        spec: &ProxmoxSpec,
        limits: &EnvironmentLimits,
        rate: RateLimit,
        metrics: ProxmoxMetrics,
    ) -> Result<Self, ProxmoxError> {
        let tls =
            super::tls::client_config(spec.tls.as_ref()).map_err(|e| ProxmoxError::Config(e.to_string()))?;
        let mut builder = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(10))
            // pveproxy closes idle keep-alive connections after about 5 s: stay below it.
            .pool_idle_timeout(Duration::from_secs(3))
            .no_proxy();
        if let Some(config) = tls {
            builder = builder.tls_backend_preconfigured(config);
        }
        let http = builder
            .build()
            .map_err(|e| ProxmoxError::Config(format!("cannot build the HTTP client: {e}")))?;
        let creds = &spec.credentials;
        let auth = match (
            &creds.token_id,
            &creds.secret_file,
            &creds.user,
            &creds.password_file,
        ) {
            (Some(id), Some(file), _, _) => Auth::Token {
                id: id.clone(),
                secret_file: file.into(),
            },
            (_, _, Some(user), Some(file)) => Auth::Ticket {
                user: user.clone(),
                password_file: file.into(),
                session: tokio::sync::Mutex::new(None),
            },
            _ => return Err(ProxmoxError::Config("no usable credentials".into())),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                base: format!("{}/api2/json", spec.endpoint.trim_end_matches('/')),
                auth,
                bucket: Bucket::new(rate),
                in_flight: Semaphore::new(limits.max_concurrent_operations.max(1) as usize),
                metrics,
            }),
        })
    }
}

impl Inner {
    async fn session(&self, force: bool) -> Result<Option<Session>, ProxmoxError> {
        let Auth::Ticket {
            user,
            password_file,
            session,
        } = &self.auth
        else {
            return Ok(None);
        };
        let mut guard = session.lock().await;
        let fresh = guard.as_ref().filter(|s| !force && s.at.elapsed() < TICKET_RENEW);
        if let Some(s) = fresh {
            return Ok(Some(s.clone()));
        }
        // Renew with the current ticket while it is valid; otherwise log in with the password.
        let password = match guard
            .as_ref()
            .filter(|s| !force && s.at.elapsed() < TICKET_LIFETIME)
        {
            Some(s) => s.ticket.clone(),
            None => read_secret(password_file)?,
        };
        let request = ApiRequest::new(Method::Post, "/access/ticket".into(), "login")
            .param("username", user)
            .param("password", password);
        let data = self.send(&request, None).await?;
        let ticket = data["ticket"].as_str();
        let csrf = data["CSRFPreventionToken"].as_str();
        let (Some(ticket), Some(csrf)) = (ticket, csrf) else {
            return Err(ProxmoxError::Decode("the login answer has no ticket".into()));
        };
        let s = Session {
            ticket: ticket.into(),
            csrf: csrf.into(),
            at: Instant::now(),
        };
        *guard = Some(s.clone());
        Ok(Some(s))
    }

    async fn send(&self, request: &ApiRequest, session: Option<&Session>) -> Result<Value, ProxmoxError> {
        let url = format!("{}{}", self.base, request.path);
        let mut builder = match request.method {
            Method::Get => self.http.get(&url),
            Method::Post => self.http.post(&url),
            Method::Put => self.http.put(&url),
            Method::Delete => self.http.delete(&url),
        };
        match request.method {
            Method::Get | Method::Delete => {
                if !request.params.is_empty() {
                    builder = builder.query(&request.params);
                }
            }
            Method::Post | Method::Put => {
                builder = builder
                    .header("Content-Type", "application/x-www-form-urlencoded")
                    .body(form_encode(&request.params));
            }
        }
        match (&self.auth, session) {
            (Auth::Token { id, secret_file }, _) if request.op != "login" => {
                let secret = read_secret(secret_file)?;
                builder = builder.header("Authorization", format!("PVEAPIToken={id}={secret}"));
            }
            (_, Some(s)) => {
                builder = builder.header("Cookie", format!("PVEAuthCookie={}", s.ticket));
                if request.method != Method::Get {
                    builder = builder.header("CSRFPreventionToken", &s.csrf);
                }
            }
            _ => {}
        }
        let started = Instant::now();
        let result = builder.send().await;
        let elapsed = started.elapsed().as_secs_f64();
        self.metrics
            .latency
            .with_label_values(&[PROVIDER, request.op])
            .observe(elapsed);
        let response = match result {
            Ok(r) => r,
            Err(e) => {
                self.metrics
                    .requests
                    .with_label_values(&[PROVIDER, request.op, "error"])
                    .inc();
                return Err(transport_error(&e));
            }
        };
        let status = response.status();
        tracing::debug!(op = request.op, path = %request.path, status = status.as_u16(), "proxmox request");
        self.metrics
            .requests
            .with_label_values(&[PROVIDER, request.op, status.as_str()])
            .inc();
        let reason = response
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .and_then(|r| std::str::from_utf8(r.as_bytes()).ok())
            .map(str::to_owned);
        let body = response.bytes().await.map_err(|e| transport_error(&e))?;
        let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(json.get("data").cloned().unwrap_or(Value::Null));
        }
        let mut message = json["message"]
            .as_str()
            .map(|m| m.trim().to_owned())
            .or(reason)
            .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned());
        if let Some(errors) = json["errors"].as_object() {
            let details: Vec<String> = errors
                .iter()
                .map(|(k, v)| format!("{k}: {}", v.as_str().unwrap_or_default().trim()))
                .collect();
            message = format!("{message} ({})", details.join("; "));
        }
        Err(ProxmoxError::classify(status.as_u16(), &message))
    }

    async fn call_once(&self, request: &ApiRequest) -> Result<Value, ProxmoxError> {
        let session = self.session(false).await?;
        match self.send(request, session.as_ref()).await {
            Err(ProxmoxError::Unauthorized(_)) if session.is_some() => {
                // The ticket may have expired or the server restarted: log in again once.
                let session = self.session(true).await?;
                self.send(request, session.as_ref()).await
            }
            other => other,
        }
    }
}

fn transport_error(e: &reqwest::Error) -> ProxmoxError {
    let mut chain = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        source = s.source();
    }
    let lower = chain.to_ascii_lowercase();
    if lower.contains("certificate") || lower.contains("fingerprint") || lower.contains("tls") {
        ProxmoxError::Tls(chain)
    } else if e.is_connect() {
        ProxmoxError::Unreachable(chain)
    } else {
        ProxmoxError::Transient {
            status: 0,
            message: chain,
        }
    }
}

/// `application/x-www-form-urlencoded`, as Proxmox's form parser expects it.
fn form_encode(params: &[(String, String)]) -> String {
    let mut url = reqwest::Url::parse("http://x/").unwrap_or_else(|_| unreachable!("a constant URL parses"));
    url.query_pairs_mut().extend_pairs(params);
    url.query().unwrap_or_default().to_owned()
}

impl Inner {
    /// Makes a call within the cap on calls in flight; the slot is held only while a request is out, not
    /// through the backoff before a retry.
    async fn call_limited(&self, request: ApiRequest) -> Result<Value, ProxmoxError> {
        let mut attempt = 0;
        loop {
            let wait = self.bucket.take();
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            let permit = self
                .in_flight
                .acquire()
                .await
                .map_err(|_| ProxmoxError::Config("the client was shut down".into()))?;
            let result = self.call_once(&request).await;
            drop(permit);
            match result {
                Err(e) if request.idempotent && e.is_transient() && attempt < RETRIES => {
                    attempt += 1;
                    self.metrics
                        .retries
                        .with_label_values(&[PROVIDER, request.op])
                        .inc();
                    let base = 100u64 << (2 * (attempt - 1));
                    let jitter = fastrand::u64(0..=base / 2);
                    tracing::debug!(op = request.op, attempt, error = %e, "retrying");
                    tokio::time::sleep(Duration::from_millis(base + jitter)).await;
                }
                other => return other,
            }
        }
    }
}

impl ProxmoxApi for HttpProxmox {
    fn call(&self, request: ApiRequest) -> BoxFuture<Result<Value, ProxmoxError>> {
        let inner = self.inner.clone();
        Box::pin(async move { inner.call_limited(request).await })
    }
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
    fn errors_are_classified_from_status_and_message() {
        let cases = [
            (
                500,
                "Configuration file 'nodes/pve/qemu-server/117.conf' does not exist",
                "not_found",
            ),
            (
                500,
                "unable to create VM 133: config file already exists",
                "already_exists",
            ),
            (500, "VM is locked (clone)", "locked"),
            (
                500,
                "can't lock file '/var/lock/qemu-server/lock-101.conf' - got timeout",
                "locked",
            ),
            (401, "authentication failure", "unauthorized"),
            (
                403,
                "Permission check failed (/vms/100, VM.Allocate)",
                "forbidden",
            ),
            (595, "Connection refused", "transient"),
            (596, "Connection timed out", "transient"),
            (599, "Too many redirections", "transient"),
            (500, "got no worker upid - start worker failed", "transient"),
            (500, "QEMU guest agent is not running", "not_ready"),
            (500, "VM 1001 is not running", "not_ready"),
            (400, "Parameter verification failed.", "bad_request"),
        ];
        for (status, message, label) in cases {
            assert_eq!(
                ProxmoxError::classify(status, message).metric_label(),
                label,
                "{message}"
            );
        }
    }

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

    #[test]
    fn the_token_bucket_lets_a_burst_pass_then_spaces_requests() {
        let bucket = Bucket::new(RateLimit {
            per_second: 10.0,
            burst: 2.0,
        });
        assert_eq!(bucket.take(), Duration::ZERO);
        assert_eq!(bucket.take(), Duration::ZERO);
        let wait = bucket.take();
        assert!(
            wait > Duration::from_millis(50) && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
    }

    #[test]
    fn credentials_never_show_in_debug_output() {
        let auth = Auth::Token {
            id: "ci@pve!ctl".into(),
            secret_file: "/run/secrets/token".into(),
        };
        let shown = format!("{auth:?}");
        assert!(
            shown.contains("ci@pve!ctl") && !shown.contains("/run/secrets"),
            "{shown}"
        );
    }
}
