//! The daemon's HTTP surface: health, readiness, Prometheus metrics and the JSON status API.

pub mod serve;
pub mod view;
pub mod write;

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use crate::api::{Kind, ObjectKey};
use crate::runtime::Trigger;
use crate::state::{DesiredState, StatusBook};

/// What the HTTP handlers read.
#[derive(Clone)]
pub struct ApiState {
    /// The desired objects.
    pub desired: Arc<DesiredState>,
    /// Status and events.
    pub book: Arc<StatusBook>,
    /// Every metric.
    pub registry: prometheus::Registry,
    /// This replica's role, when several share an etcd store.
    pub leadership: Option<crate::leader::Leadership>,
    /// Wakes an object now.
    pub trigger: Trigger,
    /// Writes over the API and the sources' endpoints.
    pub writes: Arc<write::Writes>,
    /// On-demand backups.
    pub backups: Arc<crate::backup::service::Requests>,
    /// Migrations between environments (where hosts are real).
    pub migrations: Option<Arc<crate::migrate::service::Migrations>>,
}

pub use write::Writes;

/// The daemon's default address, also the CLI's default `--server`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9470";

/// The routes, behind the request guard of `limits` (see [`serve::guard`]).
pub fn router(state: ApiState, limits: &serve::ServeLimits) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/leader", get(leader))
        .route("/api/v1/events", get(events))
        .route("/api/v1/source", get(source))
        .route("/api/v1/sources", get(write::sources))
        .route("/api/v1/sources/{name}", get(write::source))
        .route("/api/v1/sources/{name}/reconcile", post(write::reconcile_source))
        .route("/api/v1/apply", post(write::apply))
        .route("/api/v1/{resource}", get(list).put(write::put))
        .route("/api/v1/{resource}/{name}", get(one).delete(write::delete))
        .route("/api/v1/{resource}/{name}/reconcile", post(reconcile))
        .route("/api/v1/{resource}/{name}/backup", post(backup))
        .route("/api/v1/{resource}/{name}/restore", post(restore))
        .route("/api/v1/{resource}/{name}/final-backup", post(final_backup))
        .route("/api/v1/{resource}/{name}/rollback", post(rollback))
        .route(
            "/api/v1/{resource}/{name}/restore-from-backup",
            post(restore_from_backup),
        )
        .layer(axum::extract::DefaultBodyLimit::max(
            crate::yaml::Limits::default().max_bytes,
        ))
        .layer(axum::middleware::from_fn_with_state(
            serve::Guard::new(limits),
            serve::guard,
        ))
        .with_state(state)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

async fn readyz(State(state): State<ApiState>) -> Response {
    let role = state.leadership.as_ref().map(|l| l.role());
    if role == Some(crate::leader::Role::Unavailable) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "etcd is unreachable or has no quorum: not acting\n",
        )
            .into_response();
    }
    if state.desired.is_ready() {
        match role {
            Some(role) => (StatusCode::OK, format!("ready ({})\n", role.as_str())).into_response(),
            None => (StatusCode::OK, "ready\n").into_response(),
        }
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the first complete snapshot\n",
        )
            .into_response()
    }
}

/// This replica's role: `leader`, `follower`, `unavailable`, or `single` without a shared store.
async fn leader(State(state): State<ApiState>) -> Response {
    match &state.leadership {
        None => axum::Json(json!({ "role": "single" })).into_response(),
        Some(l) => axum::Json(json!({ "role": l.role().as_str(), "identity": l.identity })).into_response(),
    }
}

async fn metrics(State(state): State<ApiState>) -> Response {
    let families = state.registry.gather();
    match prometheus::TextEncoder::new().encode_to_string(&families) {
        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("failed to encode metrics: {e}"),
        ),
    }
}

/// What a path's resource segment names.
enum Resource {
    Kind(Kind),
    Hosts,
    Backups,
}

fn resource(segment: &str) -> Result<Resource, Box<Response>> {
    if matches!(segment, "hosts" | "host") {
        return Ok(Resource::Hosts);
    }
    if matches!(segment, "backups" | "backup") {
        return Ok(Resource::Backups);
    }
    segment
        .parse()
        .map(Resource::Kind)
        .map_err(|e: String| Box::new(error(StatusCode::NOT_FOUND, e)))
}

async fn list(State(state): State<ApiState>, Path(segment): Path<String>) -> Response {
    match resource(&segment) {
        Err(response) => *response,
        Ok(Resource::Hosts) => axum::Json(view::list(view::hosts(
            &state.desired.list(Some(Kind::Deployment)),
            &state.book,
        )))
        .into_response(),
        Ok(Resource::Backups) => axum::Json(view::list(view::backups(
            &state.desired.list(Some(Kind::Deployment)),
            &state.book,
            None,
        )))
        .into_response(),
        Ok(Resource::Kind(kind)) => {
            let book = state.book.clone();
            stream_list(state.desired.list(Some(kind)), move |d| view::object(d, &book))
        }
    }
}

/// A Kubernetes-style list written one item at a time: each item is rendered only when the client has
/// taken the previous one, so a request holds one object's JSON at a time, not a copy of the whole list.
fn stream_list<T: Send + 'static>(items: Vec<T>, render: impl Fn(&T) -> Value + Send + 'static) -> Response {
    use axum::body::{Body, Bytes};
    let head = std::iter::once(Bytes::from_static(
        br#"{"apiVersion":"v1","kind":"List","items":["#,
    ));
    let body = items.into_iter().enumerate().map(move |(i, item)| {
        let mut chunk = if i == 0 { Vec::new() } else { vec![b','] };
        // Serializing a JSON value into memory cannot fail.
        let _ = serde_json::to_writer(&mut chunk, &render(&item));
        Bytes::from(chunk)
    });
    let tail = std::iter::once(Bytes::from_static(b"]}"));
    let chunks = head
        .chain(body)
        .chain(tail)
        .map(Ok::<Bytes, std::convert::Infallible>);
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(futures_util::stream::iter(chunks)),
    )
        .into_response()
}

async fn one(State(state): State<ApiState>, Path((segment, name)): Path<(String, String)>) -> Response {
    match resource(&segment) {
        Err(response) => *response,
        Ok(Resource::Hosts) => {
            let hosts = view::hosts(&state.desired.list(Some(Kind::Deployment)), &state.book);
            match hosts
                .into_iter()
                .find(|h| h.get("name").and_then(Value::as_str) == Some(name.as_str()))
            {
                Some(host) => axum::Json(host).into_response(),
                None => error(StatusCode::NOT_FOUND, format!("host {name} not found")),
            }
        }
        Ok(Resource::Backups) => {
            if state
                .desired
                .get(&ObjectKey::new(Kind::Deployment, &name))
                .is_none()
            {
                return error(StatusCode::NOT_FOUND, format!("Deployment {name} not found"));
            }
            // The repository's own list, when a backup loop runs and a host can reach it.
            if let Some(nixos_state) = state.backups.nixos_state.get() {
                return match crate::backup::service::repository_snapshots(
                    &state.desired,
                    &state.book,
                    nixos_state,
                    &name,
                )
                .await
                {
                    Ok(list) => axum::Json(view::list(
                        list.iter().map(|s| view::snapshot(&name, s)).collect(),
                    ))
                    .into_response(),
                    Err(message) => error(StatusCode::SERVICE_UNAVAILABLE, message),
                };
            }
            axum::Json(view::list(view::backups(
                &state.desired.list(Some(Kind::Deployment)),
                &state.book,
                Some(&name),
            )))
            .into_response()
        }
        Ok(Resource::Kind(kind)) => match state.desired.get(&ObjectKey::new(kind, &name)) {
            Some(desired) => axum::Json(view::object(&desired, &state.book)).into_response(),
            None => error(StatusCode::NOT_FOUND, format!("{kind} {name} not found")),
        },
    }
}

async fn events(State(state): State<ApiState>, Query(query): Query<HashMap<String, String>>) -> Response {
    let filter = match (query.get("kind"), query.get("name")) {
        (Some(kind), Some(name)) => match kind.parse::<Kind>() {
            Ok(kind) => Some(ObjectKey::new(kind, name)),
            Err(e) => return error(StatusCode::BAD_REQUEST, e),
        },
        (None, None) => None,
        _ => return error(StatusCode::BAD_REQUEST, "give both kind and name, or neither"),
    };
    let items = match &filter {
        Some(key) => state
            .book
            .events(key)
            .iter()
            .map(|e| view::event(key, e))
            .collect(),
        None => state
            .book
            .all_events()
            .iter()
            .map(|(k, e)| view::event(k, e))
            .collect(),
    };
    axum::Json(view::list(items)).into_response()
}

async fn source(State(state): State<ApiState>) -> Response {
    let source = state.desired.source();
    axum::Json(json!({
        "revision": source.revision,
        "appliedAt": source.applied_at.map(|t| t.to_string()),
        "failure": source.failure,
        "errors": source.errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
    }))
    .into_response()
}

/// `POST /api/v1/deployments/{name}/backup`: backs up the Deployment's hosts now.
async fn backup(
    State(state): State<ApiState>,
    Path((segment, name)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Err(response) = write::authorize_trigger(&state.writes, &headers) {
        return *response;
    }
    if !matches!(resource(&segment), Ok(Resource::Kind(Kind::Deployment))) {
        return error(StatusCode::BAD_REQUEST, "only Deployments are backed up");
    }
    if let Err(response) = check_backed_up(&state, &name, ("backups", "")) {
        return *response;
    }
    let token = state.backups.request(&name);
    (StatusCode::ACCEPTED, axum::Json(json!({ "requestedAt": token }))).into_response()
}

/// Checks that Deployment `name` exists, that its RuntimeEnvironment has `spec.backup`, and that this
/// daemon runs backups; `what` names the work (`backups`) and what the backup is for in the message.
fn check_backed_up(state: &ApiState, name: &str, what: (&str, &str)) -> Result<(), Box<Response>> {
    let (work, purpose) = what;
    let key = ObjectKey::new(Kind::Deployment, name);
    let Some(desired) = state.desired.get(&key) else {
        return Err(Box::new(error(
            StatusCode::NOT_FOUND,
            format!("Deployment {name} not found"),
        )));
    };
    let has_backup = match desired.object() {
        crate::api::Object::Deployment(d) => {
            let env = ObjectKey {
                kind: Kind::RuntimeEnvironment,
                name: d.spec.runtime_environment.clone(),
            };
            matches!(state.desired.get(&env).map(|e| e.object().clone()),
                Some(crate::api::Object::RuntimeEnvironment(e)) if e.spec.backup.is_some())
        }
        _ => false,
    };
    if !has_backup {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("the RuntimeEnvironment of Deployment {name} has no spec.backup{purpose}"),
        )));
    }
    if !state.backups.is_running() {
        return Err(Box::new(error(
            StatusCode::CONFLICT,
            format!("{work} do not run in this daemon (they need real NixOS hosts: `run --nixos-catalog`)"),
        )));
    }
    Ok(())
}

/// The gate of a Deployment action that loses or stops something: the API token, a Deployment, and
/// `confirm=true` (`refusal` says what would be lost and how to confirm).
fn confirmed_deployment_action(
    state: &ApiState,
    headers: &axum::http::HeaderMap,
    segment: &str,
    query: &HashMap<String, String>,
    only: &'static str,
    refusal: &'static str,
) -> Result<(), Box<Response>> {
    write::authorize_trigger(&state.writes, headers)?;
    if !matches!(resource(segment), Ok(Resource::Kind(Kind::Deployment))) {
        return Err(Box::new(error(StatusCode::BAD_REQUEST, only)));
    }
    if query.get("confirm").map(String::as_str) != Some("true") {
        return Err(Box::new(error(StatusCode::BAD_REQUEST, refusal)));
    }
    Ok(())
}

/// `POST /api/v1/deployments/{name}/restore?snapshot=ID&confirm=true`: restores the running
/// Deployment's hosts in place. It replaces live data, so it needs `confirm=true`.
async fn restore(
    State(state): State<ApiState>,
    Path((segment, name)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Err(response) = confirmed_deployment_action(
        &state,
        &headers,
        &segment,
        &query,
        "only Deployments are restored",
        "an in-place restore replaces the hosts' data with a snapshot's and loses what was written since: \
confirm it with `confirm=true` (`fediversity restore deployment NAME --confirm`)",
    ) {
        return *response;
    }
    let snapshot = query.get("snapshot").map_or("latest", String::as_str);
    let spec = crate::api::RestoreSpec {
        snapshot: snapshot.to_owned(),
        from_environment: None,
    };
    let mut problems = crate::api::validate::Problems::default();
    crate::api::validate::Validate::validate(
        &spec,
        &crate::yaml::FieldPath::root().key("snapshot"),
        &mut problems,
    );
    if let Some((_, message)) = problems.into_vec().into_iter().next() {
        return error(StatusCode::BAD_REQUEST, message);
    }
    if let Err(response) = check_backed_up(&state, &name, ("restores", " to restore from")) {
        return *response;
    }
    let token = state.backups.request_restore(&name, snapshot);
    (StatusCode::ACCEPTED, axum::Json(json!({ "requestedAt": token }))).into_response()
}

/// `POST /api/v1/deployments/{name}/final-backup?confirm=true`: the final backup of an export to
/// another provider. It stops the Deployment's services and leaves them stopped, so it needs
/// `confirm=true`.
async fn final_backup(
    State(state): State<ApiState>,
    Path((segment, name)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Err(response) = confirmed_deployment_action(
        &state,
        &headers,
        &segment,
        &query,
        "only Deployments are exported",
        "a final backup stops the Deployment's services and leaves them stopped: confirm it with \
`confirm=true` (`fediversity export deployment NAME --final`)",
    ) {
        return *response;
    }
    if let Err(response) = check_backed_up(&state, &name, ("final backups", " to export from")) {
        return *response;
    }
    let token = state.backups.request_final_backup(&name);
    (StatusCode::ACCEPTED, axum::Json(json!({ "requestedAt": token }))).into_response()
}

/// The gate of the migration routes: the API token, a Deployment that exists, and a daemon that runs
/// migrations.
fn migration_route<'a>(
    state: &'a ApiState,
    headers: &axum::http::HeaderMap,
    segment: &str,
    name: &str,
) -> Result<
    (
        ObjectKey,
        crate::api::Deployment,
        &'a crate::migrate::service::Migrations,
    ),
    Box<Response>,
> {
    write::authorize(&state.writes, headers)?;
    if !matches!(resource(segment), Ok(Resource::Kind(Kind::Deployment))) {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "only Deployments are migrated",
        )));
    }
    let key = ObjectKey::new(Kind::Deployment, name);
    let Some(crate::api::Object::Deployment(deployment)) =
        state.desired.get(&key).map(|d| d.object().clone())
    else {
        return Err(Box::new(error(
            StatusCode::NOT_FOUND,
            format!("Deployment {name} not found"),
        )));
    };
    let Some(migrations) = &state.migrations else {
        return Err(Box::new(error(
            StatusCode::CONFLICT,
            "migrations do not run in this daemon (they need real NixOS hosts: `run --nixos-catalog`)",
        )));
    };
    Ok((key, deployment, migrations))
}

/// The answer of a migration route: on success the event `reason` with `message`, a reconcile of the
/// Deployment, and 202 with the new record's `from`, `to`, `phase` and `extra`.
fn migration_answer(
    state: &ApiState,
    key: &ObjectKey,
    result: Result<crate::migrate::MigrationRecord, crate::migrate::service::RollbackError>,
    event: (crate::api::EventType, &str),
    describe: impl FnOnce(&crate::migrate::MigrationRecord) -> (String, Value),
) -> Response {
    use crate::migrate::service::RollbackError;
    match result {
        Ok(r) => {
            let (message, extra) = describe(&r);
            state.book.record(key, event.0, event.1, message);
            (state.trigger)(key);
            let mut body = json!({ "from": r.from, "to": r.to, "phase": r.phase.as_str() });
            if let (Value::Object(body), Value::Object(extra)) = (&mut body, extra) {
                body.extend(extra);
            }
            (StatusCode::ACCEPTED, axum::Json(body)).into_response()
        }
        Err(e @ RollbackError::Store(_)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e) => error(StatusCode::CONFLICT, e.to_string()),
    }
}

/// `POST /api/v1/deployments/{name}/rollback`: moves a migrated Deployment back to the environment it
/// left (during the grace period, or while its old hosts are retained). Needs the API token.
async fn rollback(
    State(state): State<ApiState>,
    Path((segment, name)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
) -> Response {
    let (key, deployment, migrations) = match migration_route(&state, &headers, &segment, &name) {
        Ok(gate) => gate,
        Err(response) => return *response,
    };
    let wanted = deployment.spec.runtime_environment.to_string();
    migration_answer(
        &state,
        &key,
        migrations.rollback(&name, &wanted),
        (crate::api::EventType::Normal, "MigrationRollback"),
        |back| {
            (
                format!(
                    "rolling back: moving from {} to {} with the writes since the switch",
                    back.from, back.to
                ),
                json!({}),
            )
        },
    )
}

/// `POST /api/v1/deployments/{name}/restore-from-backup[?confirm=true]`: the migration of a
/// Deployment whose old environment cannot be reached starts its target from the source hosts' last
/// good backups instead of a live copy. Without `confirm=true` it answers 409 with the data-loss
/// window (the time of the oldest of those snapshots) and changes nothing. Needs the API token.
async fn restore_from_backup(
    State(state): State<ApiState>,
    Path((segment, name)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: axum::http::HeaderMap,
) -> Response {
    let (key, deployment, migrations) = match migration_route(&state, &headers, &segment, &name) {
        Ok(gate) => gate,
        Err(response) => return *response,
    };
    let hosts: Vec<String> = deployment
        .spec
        .applications
        .keys()
        .map(|app| format!("{name}-{app}"))
        .collect();
    let last = state.book.with_status(&key, |s| {
        crate::migrate::decide::LastBackup::from_status(s.and_then(|s| s.get("backups")))
    });
    let confirmed = query.get("confirm").map(String::as_str) == Some("true");
    let wanted = deployment.spec.runtime_environment.to_string();
    migration_answer(
        &state,
        &key,
        migrations.restore_from_backup(&name, &wanted, hosts, last, confirmed),
        (crate::api::EventType::Warning, "MigrationFromBackup"),
        |fresh| {
            let (taken, snapshots) = fresh
                .from_backup
                .as_ref()
                .map(|b| (b.taken.clone(), b.snapshots.clone()))
                .unwrap_or_default();
            (
                format!(
                    "{} cannot be reached: the target in {} starts from the last backups; writes after {taken} are lost (confirmed by the operator)",
                    fresh.from, fresh.to
                ),
                json!({ "writesLostAfter": taken, "snapshots": snapshots }),
            )
        },
    )
}

async fn reconcile(
    State(state): State<ApiState>,
    Path((segment, name)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Err(response) = write::authorize_trigger(&state.writes, &headers) {
        return *response;
    }
    let kind = match resource(&segment) {
        Ok(Resource::Kind(kind)) => kind,
        Ok(Resource::Hosts | Resource::Backups) => {
            return error(
                StatusCode::BAD_REQUEST,
                "hosts and their backups are reconciled through their Deployment",
            );
        }
        Err(response) => return *response,
    };
    let key = ObjectKey::new(kind, &name);
    if state.desired.get(&key).is_none() {
        return error(StatusCode::NOT_FOUND, format!("{kind} {name} not found"));
    }
    let token = state.book.request_reconcile(&key);
    (state.trigger)(&key);
    (StatusCode::ACCEPTED, axum::Json(json!({ "requestedAt": token }))).into_response()
}
