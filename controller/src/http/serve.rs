//! Serving the API over TCP within bounds: header and idle timeouts, a connection cap, a cap on requests
//! in flight and on their duration, and no browser requests.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// The bounds the server keeps. Every figure is documented in docs/design.md ("HTTP limits").
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// How long a client may take to send a request's headers, and how long a kept-alive connection may
    /// stay idle before its next request.
    pub header_timeout: Duration,
    /// The longest a request may take from its headers to its response (its body included).
    pub request_timeout: Duration,
    /// The most connections held at once; beyond it, new ones wait in the listen queue.
    pub max_connections: usize,
    /// The most API requests (`/api/…`) handled at once, bodies included; beyond it, a request waits up
    /// to 10 s for a slot, then is answered 503. Health checks and metrics do not count.
    pub max_requests: usize,
    /// The largest request header block.
    pub max_header_bytes: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            max_connections: 4096,
            max_requests: 64,
            max_header_bytes: 64 * 1024,
        }
    }
}

impl ServeLimits {
    /// The default limits, with the connection cap kept to half of the descriptors the process may
    /// open (the rest stay for sources, the store, git and ssh).
    pub fn for_descriptors(open_files: Option<u64>) -> Self {
        let default = Self::default();
        let half = open_files.map_or(default.max_connections, |n| {
            usize::try_from(n / 2).unwrap_or(usize::MAX)
        });
        Self {
            max_connections: default.max_connections.min(half).max(16),
            ..default
        }
    }
}

/// Raises the soft limit on open files to the hard one (service managers often start programs at 1,024
/// while allowing far more). Returns the soft limit in force afterwards, when known.
pub fn raise_open_files_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current.is_some() && limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => {
                tracing::debug!(from = ?limit.current, to = ?limit.maximum, "raised the open files limit");
                return limit.maximum;
            }
            Err(e) => tracing::warn!(error = %e, "cannot raise the open files limit"),
        }
    }
    limit.current
}

/// What the request guard shares between requests.
#[derive(Clone)]
pub struct Guard {
    requests: Arc<Semaphore>,
    timeout: Duration,
}

impl Guard {
    /// A guard for `limits`.
    pub fn new(limits: &ServeLimits) -> Self {
        Self {
            requests: Arc::new(Semaphore::new(limits.max_requests)),
            timeout: limits.request_timeout,
        }
    }
}

/// Stops a task when dropped (the timer that frees a request's slot, once its body is gone).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How long an API request waits for a slot when `max_requests` are in flight.
const QUEUE_WAIT: Duration = Duration::from_secs(10);

fn refuse(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

/// Refuses browser requests (any with an `Origin` header: the API serves programs, never web pages, so
/// a page elsewhere cannot make a visitor's browser trigger or change anything, nor read the API through
/// DNS rebinding), bounds the API requests in flight, and bounds every request's duration.
pub async fn guard(
    axum::extract::State(guard): axum::extract::State<Guard>,
    request: Request,
    next: Next,
) -> Response {
    if request.headers().contains_key(header::ORIGIN) {
        return refuse(
            StatusCode::FORBIDDEN,
            "requests from web browsers are refused: use the fediversity CLI or an HTTP client",
        );
    }
    let permit = if request.uri().path().starts_with("/api/") {
        // Waits a moment for a slot rather than failing a burst at once; the wait holds no more than
        // the connection.
        match tokio::time::timeout(QUEUE_WAIT, guard.requests.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Some(permit),
            _ => {
                let mut response = refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many requests in flight; try again in a moment",
                );
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
                return response;
            }
        }
    } else {
        None
    };
    let response = match tokio::time::timeout(guard.timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => return refuse(StatusCode::REQUEST_TIMEOUT, "the request took too long"),
    };
    match permit {
        // The slot is held until the body is written (a streamed list counts until its end), but never
        // longer than the request timeout: a client that stops reading cannot keep it.
        Some(permit) => {
            use futures_util::StreamExt as _;
            let slot = Arc::new(std::sync::Mutex::new(Some(permit)));
            let release = Arc::downgrade(&slot);
            let timer = AbortOnDrop(tokio::spawn(async move {
                tokio::time::sleep(guard.timeout).await;
                if let Some(slot) = release.upgrade() {
                    slot.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .take();
                }
            }));
            let (parts, body) = response.into_parts();
            let body = body.into_data_stream().map(move |chunk| {
                let _held = (&slot, &timer);
                chunk
            });
            Response::from_parts(parts, axum::body::Body::from_stream(body))
        }
        None => response,
    }
}

/// Serves `router` on `listener` within `limits` until `stop` completes; connections still open then are
/// dropped.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServeLimits,
    stop: impl Future<Output = ()>,
) {
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(stop);
    loop {
        // A permit first: at the cap, new connections wait in the kernel's queue, not in memory.
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            () = &mut stop => return,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, or a connection reset before it was accepted: wait a little.
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => return,
        };
        while tasks.try_join_next().is_some() {}
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_buf_size(limits.max_header_bytes.max(8192))
            .keep_alive(true);
        tasks.spawn(async move {
            let _permit = permit;
            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_cap_keeps_half_of_the_descriptors_free() {
        assert_eq!(ServeLimits::for_descriptors(Some(1024)).max_connections, 512);
        assert_eq!(ServeLimits::for_descriptors(Some(1 << 20)).max_connections, 4096);
        assert_eq!(ServeLimits::for_descriptors(None).max_connections, 4096);
        assert_eq!(ServeLimits::for_descriptors(Some(10)).max_connections, 16);
    }
}
