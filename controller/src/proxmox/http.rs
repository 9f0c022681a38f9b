//! The HTTP implementation of [`ProxmoxApi`]: reqwest + rustls, token or ticket auth, rate and concurrency limits, retries, metrics.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::Semaphore;

use super::client::{ApiRequest, Method, ProxmoxApi};
use super::error::ProxmoxError;
use super::metrics::{PROVIDER, ProxmoxMetrics};
use crate::api::{EnvironmentLimits, ProxmoxSpec};
use crate::runtime::BoxFuture;
use crate::runtime::bucket::TokenBucket;

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
    bucket: Mutex<TokenBucket>,
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
                bucket: Mutex::new(TokenBucket::new(
                    rate.per_second,
                    rate.burst,
                    tokio::time::Instant::now(),
                )),
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
            let wait = self
                .bucket
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .reserve(tokio::time::Instant::now());
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

#[cfg(test)]
mod tests {
    use super::*;

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
