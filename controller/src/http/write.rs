//! The API's writes and source endpoints: apply and delete (bearer token required), the sources'
//! status, and on-demand fetches.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::{Mutex, mpsc, oneshot};

use super::{ApiState, Resource, error, resource};
use crate::api::{Kind, ObjectKey, Timestamp};
use crate::source::Update;
use crate::source::api::{ApiSource, ApiSourceError};

/// How long a write waits for the desired state to take it in before answering anyway.
const APPLY_WAIT: Duration = Duration::from_secs(30);
/// The file name problems are located in when the client names none.
const DEFAULT_FILE: &str = "<request>";

/// What the write endpoints need.
pub struct Writes {
    /// The bearer token writes must carry; without one, writes are refused.
    pub token: Option<String>,
    /// The objects applied over the API.
    pub api: Mutex<ApiSource>,
    /// The API source's index among the sources.
    pub api_index: usize,
    /// Where new snapshots go.
    pub updates: mpsc::UnboundedSender<Update>,
    /// Each fetchable source's request channel, by name.
    pub requests: BTreeMap<String, mpsc::UnboundedSender<String>>,
}

/// Compares two secrets in time independent of where they differ (both are hashed first, so their
/// lengths do not show either).
fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks the request's bearer token. The token is never logged or echoed.
pub(super) fn authorize(writes: &Writes, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let Some(expected) = &writes.token else {
        return Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "writes over the API are disabled: start the daemon with --api-token-file",
        )));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(given) if same_secret(given, expected) => Ok(()),
        Some(_) => Err(Box::new(unauthorized("the bearer token is not valid"))),
        None => Err(Box::new(unauthorized(
            "writes need `Authorization: Bearer TOKEN` (the CLI reads it from --token-file or FEDIVERSITY_TOKEN_FILE)",
        ))),
    }
}

/// Checks the bearer token of a request that triggers something (a reconcile, a fetch): needed when the
/// daemon has a token, allowed without one otherwise (triggers change nothing by themselves).
pub(super) fn authorize_trigger(writes: &Writes, headers: &HeaderMap) -> Result<(), Box<Response>> {
    if writes.token.is_some() {
        authorize(writes, headers)
    } else {
        Ok(())
    }
}

fn unauthorized(message: &str) -> Response {
    let mut response = error(StatusCode::UNAUTHORIZED, message);
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    response
}

fn refusal(e: &ApiSourceError) -> Response {
    match e {
        ApiSourceError::Invalid(problems) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            axum::Json(json!({
                "error": e.to_string(),
                "problems": problems.iter().map(ToString::to_string).collect::<Vec<_>>(),
            })),
        )
            .into_response(),
        ApiSourceError::Owned { .. } => error(StatusCode::CONFLICT, e.to_string()),
        ApiSourceError::NotFound(_) => error(StatusCode::NOT_FOUND, e.to_string()),
        ApiSourceError::Empty | ApiSourceError::WrongKind { .. } => {
            error(StatusCode::BAD_REQUEST, e.to_string())
        }
        ApiSourceError::Store(crate::store::StoreError::NotLeader) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "this replica is a follower: send writes to the leader (GET /api/v1/leader on each replica)",
        ),
        ApiSourceError::Store(_) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Sends the API source's new snapshot and waits until the desired state has it.
async fn publish(writes: &Writes, api: &ApiSource) {
    let (done, applied) = oneshot::channel();
    let update = Update {
        source: writes.api_index,
        snapshot: Some(std::sync::Arc::new(api.snapshot())),
        done: Some(done),
        ..Update::default()
    };
    if writes.updates.send(update).is_ok() {
        let _ = tokio::time::timeout(APPLY_WAIT, applied).await;
    }
}

/// `POST /api/v1/apply` (any kinds) and `PUT /api/v1/{kind}`: applies a YAML or JSON body.
async fn apply_body(
    state: &ApiState,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    expected: Option<Kind>,
    body: &Bytes,
) -> Response {
    if let Err(response) = authorize(&state.writes, headers) {
        return *response;
    }
    let Ok(text) = std::str::from_utf8(body) else {
        return error(StatusCode::BAD_REQUEST, "the body is not UTF-8 text");
    };
    let file = query
        .get("file")
        .map(String::as_str)
        .filter(|f| !f.is_empty() && f.len() <= 255 && !f.contains(['\n', '\r']))
        .unwrap_or(DEFAULT_FILE);
    let mut api = state.writes.api.lock().await;
    let desired = state.desired.clone();
    let outcome = api.apply(file, text, expected, |key| desired.owner(key));
    match outcome {
        Ok(outcomes) => {
            publish(&state.writes, &api).await;
            let items: Vec<_> = outcomes
                .iter()
                .map(|(key, outcome)| {
                    json!({ "kind": key.kind.as_str(), "name": key.name.to_string(), "outcome": outcome })
                })
                .collect();
            axum::Json(json!({ "items": items })).into_response()
        }
        Err(e) => refusal(&e),
    }
}

/// `POST /api/v1/apply`.
pub async fn apply(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    apply_body(&state, &headers, &query, None, &body).await
}

/// `PUT /api/v1/{kind}`.
pub async fn put(
    State(state): State<ApiState>,
    Path(segment): Path<String>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    match resource(&segment) {
        Ok(Resource::Kind(kind)) => apply_body(&state, &headers, &query, Some(kind), &body).await,
        Ok(Resource::Hosts | Resource::Backups) => error(
            StatusCode::BAD_REQUEST,
            "hosts and their backups follow from Deployments; apply the Deployment",
        ),
        Err(response) => *response,
    }
}

/// `DELETE /api/v1/{kind}/{name}`.
pub async fn delete(
    State(state): State<ApiState>,
    Path((segment, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = authorize(&state.writes, &headers) {
        return *response;
    }
    let kind = match resource(&segment) {
        Ok(Resource::Kind(kind)) => kind,
        Ok(Resource::Hosts | Resource::Backups) => {
            return error(
                StatusCode::BAD_REQUEST,
                "hosts and their backups follow from Deployments; change the Deployment",
            );
        }
        Err(response) => return *response,
    };
    let key = ObjectKey::new(kind, &name);
    let mut api = state.writes.api.lock().await;
    let desired = state.desired.clone();
    match api.delete(&key, |key| desired.owner(key)) {
        Ok(()) => {
            publish(&state.writes, &api).await;
            axum::Json(json!({ "kind": kind.as_str(), "name": name, "outcome": "deleted" })).into_response()
        }
        Err(e) => refusal(&e),
    }
}

/// `GET /api/v1/sources`.
pub async fn sources(State(state): State<ApiState>) -> Response {
    let items: Vec<_> = state
        .desired
        .sources()
        .iter()
        .map(|s| serde_json::to_value(s).unwrap_or_default())
        .collect();
    axum::Json(super::view::list(items)).into_response()
}

/// `GET /api/v1/sources/{name}`.
pub async fn source(State(state): State<ApiState>, Path(name): Path<String>) -> Response {
    match state.desired.sources().into_iter().find(|s| s.name == name) {
        Some(source) => axum::Json(source).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("source {name} not found")),
    }
}

/// `POST /api/v1/sources/{name}/reconcile`: fetches the source now; its status echoes the returned
/// token in `lastHandledReconcileAt` once the result is applied.
pub async fn reconcile_source(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    if let Err(response) = authorize_trigger(&state.writes, &headers) {
        return *response;
    }
    let Some(requests) = state.writes.requests.get(&name) else {
        return if state.desired.sources().iter().any(|s| s.name == name) {
            error(
                StatusCode::BAD_REQUEST,
                format!("source {name} is not fetched: its objects change through apply and delete"),
            )
        } else {
            error(StatusCode::NOT_FOUND, format!("source {name} not found"))
        };
    };
    let token = format!(
        "{}-{}",
        Timestamp::now().unix(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    if requests.send(token.clone()).is_err() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("source {name} has stopped"),
        );
    }
    (StatusCode::ACCEPTED, axum::Json(json!({ "requestedAt": token }))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_equal_only_when_identical() {
        assert!(same_secret("s3cret-token", "s3cret-token"));
        assert!(!same_secret("s3cret-token", "s3cret-tokeN"));
        assert!(!same_secret("s3cret-token", "s3cret"));
        assert!(!same_secret("", "x"));
    }
}
