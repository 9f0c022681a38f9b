//! The subcommands that change state through a running daemon, `apply` and `delete`, and those about
//! sources: `get sources` and `reconcile source`.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::client::{Client, ClientError};
use super::output;
use crate::api::Kind;

/// What `reconcile` accepts: an object's kind, or `source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReconcileTarget {
    /// An object of a kind.
    Kind(Kind),
    /// A source: fetch it now.
    Source,
}

impl std::str::FromStr for ReconcileTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if matches!(s.to_ascii_lowercase().as_str(), "source" | "sources" | "src") {
            return Ok(ReconcileTarget::Source);
        }
        s.parse()
            .map(ReconcileTarget::Kind)
            .map_err(|e: String| format!("{e}, or source"))
    }
}

/// Reads the API token from a file (surrounding whitespace removed).
pub fn read_token(path: &Path) -> Result<String, ClientError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ClientError::Api(format!("cannot read the token file {}: {e}", path.display())))?;
    let token = text.trim().to_owned();
    if token.is_empty() {
        return Err(ClientError::Api(format!(
            "the token file {} is empty",
            path.display()
        )));
    }
    Ok(token)
}

/// A client for writes: the daemon's address and the bearer token.
pub struct Writer {
    server: String,
    token: Option<String>,
    http: reqwest::Client,
}

/// An answer of the daemon: its status code and JSON body.
struct Answer {
    status: reqwest::StatusCode,
    body: Value,
}

impl Writer {
    /// A writer to the daemon at `server`, with the token from `token_file` if given.
    pub fn new(server: &str, token_file: Option<&Path>) -> Result<Self, ClientError> {
        // reqwest is built without a default TLS crypto provider (installing it twice is harmless).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let server = if server.contains("://") {
            server.to_owned()
        } else {
            format!("http://{server}")
        };
        Ok(Self {
            server: server.trim_end_matches('/').to_owned(),
            token: token_file.map(read_token).transpose()?,
            http: reqwest::Client::new(),
        })
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Answer, ClientError> {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request.send().await.map_err(|source| ClientError::Unreachable {
            server: self.server.clone(),
            source,
        })?;
        let status = response.status();
        let body = response.json().await.unwrap_or(Value::Null);
        Ok(Answer { status, body })
    }

    fn refusal(answer: &Answer) -> ClientError {
        ClientError::Api(
            answer.body["error"]
                .as_str()
                .map_or_else(|| answer.status.to_string(), str::to_owned),
        )
    }

    /// `fediversity apply -f FILE`: returns what to print and the exit code. Invalid objects print
    /// every problem as `FILE:LINE:COLUMN: document N: FIELD: MESSAGE`, like `validate`.
    pub async fn apply(&self, name: &str, text: String) -> Result<(String, i32), ClientError> {
        let request = self
            .http
            .post(format!("{}/api/v1/apply", self.server))
            .query(&[("file", name)])
            .header(reqwest::header::CONTENT_TYPE, "application/yaml")
            .body(text);
        let answer = self.send(request).await?;
        if answer.status == reqwest::StatusCode::UNPROCESSABLE_ENTITY {
            let mut out = String::new();
            for problem in answer.body["problems"].as_array().into_iter().flatten() {
                out.push_str(problem.as_str().unwrap_or_default());
                out.push('\n');
            }
            out.push_str(answer.body["error"].as_str().unwrap_or("invalid"));
            out.push('\n');
            return Ok((out, 1));
        }
        if !answer.status.is_success() {
            return Err(Self::refusal(&answer));
        }
        let mut out = String::new();
        for item in answer.body["items"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "{}/{} {}\n",
                item["kind"].as_str().unwrap_or_default().to_ascii_lowercase(),
                item["name"].as_str().unwrap_or_default(),
                item["outcome"].as_str().unwrap_or_default()
            ));
        }
        Ok((out, 0))
    }

    /// `fediversity delete KIND NAME`.
    pub async fn delete(&self, kind: Kind, name: &str) -> Result<String, ClientError> {
        let request = self
            .http
            .delete(format!("{}/api/v1/{}/{name}", self.server, kind.plural()));
        let answer = self.send(request).await?;
        if !answer.status.is_success() {
            return Err(Self::refusal(&answer));
        }
        Ok(format!("{}/{name} deleted\n", kind.as_str().to_ascii_lowercase()))
    }
}

/// Reads what `apply -f` names: a file, or standard input for `-`.
pub fn read_input(file: &Path) -> Result<(String, String), ClientError> {
    if file == Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .map_err(|e| ClientError::Api(format!("cannot read standard input: {e}")))?;
        return Ok(("<stdin>".into(), text));
    }
    let text = std::fs::read_to_string(file)
        .map_err(|e| ClientError::Api(format!("cannot read {}: {e}", file.display())))?;
    Ok((file.display().to_string(), text))
}

fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn short(value: &Value) -> String {
    let text = cell(value);
    if text.len() == 40 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        text[..12].to_owned()
    } else {
        text
    }
}

/// The table of `fediversity get sources`.
pub fn sources_table(list: &Value) -> String {
    let items = list["items"].as_array().cloned().unwrap_or_default();
    if items.is_empty() {
        return "No sources found.\n".into();
    }
    let now = crate::api::Timestamp::now();
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|s| {
            let status = if let Some(error) = s["lastError"].as_str() {
                format!("Failed: {error}")
            } else if s["stale"].is_string() {
                "Stale: not loaded for over three intervals".into()
            } else if let Some(blocked) = s["pruneBlocked"].as_object() {
                format!(
                    "PruneBlocked ({}): {} object(s) kept",
                    cell(&blocked["reason"]),
                    blocked["objects"].as_array().map_or(0, Vec::len)
                )
            } else if !s["loaded"].as_bool().unwrap_or(false) {
                "Loading".into()
            } else {
                match s["errors"].as_array().map_or(0, Vec::len) {
                    0 => "Ready".into(),
                    n => format!("Ready, {n} problem(s)"),
                }
            };
            let fetched = match s["lastFetchTime"].as_str() {
                Some(t) => output::age(Some(t), now),
                None => "-".into(),
            };
            vec![
                cell(&s["name"]),
                cell(&s["type"]),
                short(&s["revision"]),
                short(&s["appliedRevision"]),
                cell(&s["objects"]),
                fetched,
                status,
            ]
        })
        .collect();
    output::table(
        &[
            "NAME", "TYPE", "REVISION", "APPLIED", "OBJECTS", "FETCHED", "STATUS",
        ],
        &rows,
    )
}

/// `fediversity reconcile source NAME [--wait]`: fetches now; with `wait`, returns once the result is
/// applied. Returns the message and whether the source is healthy.
pub async fn reconcile_source(
    client: &Client,
    name: &str,
    wait: Option<Duration>,
) -> Result<(String, bool), ClientError> {
    let what = format!("source/{name}: the fetch");
    let handled = "/lastHandledReconcileAt";
    let watch = format!("sources/{name}");
    let Some(source) = client
        .request_and_wait(&format!("sources/{name}/reconcile"), &watch, handled, wait, &what)
        .await?
    else {
        return Ok((format!("source/{name}: fetch requested\n"), true));
    };
    let revision = cell(&source["revision"]);
    Ok(match source["lastError"].as_str() {
        Some(error) => (format!("source/{name}: fetch failed: {error}\n"), false),
        None => match source["pruneBlocked"]["message"].as_str() {
            Some(held) => (
                format!("source/{name}: at {revision}; removals held back: {held}\n"),
                false,
            ),
            None => (format!("source/{name}: applied {revision}\n"), true),
        },
    })
}

/// The name of the source that owns an object, from its annotations.
pub async fn owner(client: &Client, kind: Kind, name: &str) -> Result<Option<String>, ClientError> {
    let object = client.get(&format!("{}/{name}", kind.plural())).await?;
    Ok(
        object["metadata"]["annotations"][crate::http::view::SOURCE_NAME_ANNOTATION]
            .as_str()
            .map(str::to_owned),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconcile_takes_kinds_and_source() {
        assert_eq!("source".parse(), Ok(ReconcileTarget::Source));
        assert_eq!("deploy".parse(), Ok(ReconcileTarget::Kind(Kind::Deployment)));
        assert!("pods".parse::<ReconcileTarget>().is_err());
    }

    #[test]
    fn the_sources_table_shows_held_removals_and_failures() {
        let list = serde_json::json!({"items": [
            {"name": "ops", "type": "git", "loaded": true, "revision": "0123456789abcdef0123456789abcdef01234567",
             "objects": 3, "errors": [], "pruneBlocked": {"reason": "EmptySnapshot", "objects": ["Deployment/a"]}},
            {"name": "cat", "type": "git", "loaded": true, "lastError": "fetching failed", "objects": 1, "errors": []},
        ]});
        let table = sources_table(&list);
        assert!(table.contains("0123456789ab "), "{table}");
        assert!(
            table.contains("PruneBlocked (EmptySnapshot): 1 object(s) kept"),
            "{table}"
        );
        assert!(table.contains("Failed: fetching failed"), "{table}");
    }
}
