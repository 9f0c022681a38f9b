//! A small client of the daemon's JSON API, shared by the remote subcommands.

use serde_json::Value;

/// A failure to talk to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon cannot be reached.
    #[error(
        "cannot reach the fediversity daemon at {server}: {source} (is `fediversity run` running? set --server or FEDIVERSITY_SERVER)"
    )]
    Unreachable {
        /// The server URL.
        server: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// The daemon answered with an error.
    #[error("{0}")]
    Api(String),
}

/// Talks to one daemon.
pub struct Client {
    server: String,
    http: reqwest::Client,
    token: Option<String>,
}

impl Client {
    /// A client of the daemon at `server` (`http://HOST:PORT`).
    pub fn new(server: &str) -> Self {
        // reqwest is built without a default TLS crypto provider: the process uses ring (installing it
        // twice is harmless).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let server = if server.contains("://") {
            server.to_owned()
        } else {
            format!("http://{server}")
        };
        Self {
            server: server.trim_end_matches('/').to_owned(),
            http: reqwest::Client::new(),
            token: None,
        }
    }

    /// The same client, sending `token` as its bearer token on requests that trigger something.
    #[must_use]
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Value, ClientError> {
        let response = request.send().await.map_err(|source| ClientError::Unreachable {
            server: self.server.clone(),
            source,
        })?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            Ok(body)
        } else {
            let message = body
                .get("error")
                .and_then(Value::as_str)
                .map_or_else(|| status.to_string(), str::to_owned);
            Err(ClientError::Api(message))
        }
    }

    /// Posts to `trigger` (which answers with a `requestedAt` token); with `wait`, then polls `watch`
    /// until the field at the JSON pointer `handled` holds that token, and returns what `watch` then shows. `what` names the
    /// request in the time-out error. Without `wait` it returns `None` at once.
    pub async fn request_and_wait(
        &self,
        trigger: &str,
        watch: &str,
        handled: &str,
        wait: Option<std::time::Duration>,
        what: &str,
    ) -> Result<Option<Value>, ClientError> {
        let requested = self.post(trigger).await?;
        let token = requested["requestedAt"].as_str().unwrap_or_default().to_owned();
        let Some(timeout) = wait else { return Ok(None) };
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let value = self.get(watch).await?;
            if value.pointer(handled).and_then(Value::as_str) == Some(token.as_str()) {
                return Ok(Some(value));
            }
            if std::time::Instant::now() >= deadline {
                return Err(ClientError::Api(format!(
                    "{what} was not handled within {}s",
                    timeout.as_secs()
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// `GET /api/v1/PATH`.
    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.send(self.http.get(format!("{}/api/v1/{path}", self.server)))
            .await
    }

    /// `POST /api/v1/PATH`.
    pub async fn post(&self, path: &str) -> Result<Value, ClientError> {
        let request = self.http.post(format!("{}/api/v1/{path}", self.server));
        let request = match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        self.send(request).await
    }
}
