//! Proxmox-style API errors and the simulator's own startup errors.

use std::collections::BTreeMap;

/// An error answer, shaped like pveproxy's: a status code, a message used as the HTTP reason phrase
/// (first line) and as the body's `message`, and optional per-parameter `errors`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {message}")]
pub struct ApiError {
    /// HTTP status code (including the proxy pseudo codes 595/596).
    pub status: u16,
    /// The message, without the trailing newline.
    pub message: String,
    /// Per-parameter errors of a 400.
    pub errors: Option<BTreeMap<String, String>>,
    /// Reply with an empty body (the auth handler's 401s do).
    pub empty_body: bool,
}

impl ApiError {
    /// An error with a status and a message.
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            errors: None,
            empty_body: false,
        }
    }

    /// A 500, the status of every `die` in a handler.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, message)
    }

    /// `400 Parameter verification failed.` with per-parameter errors.
    pub fn params(errors: BTreeMap<String, String>) -> Self {
        Self {
            errors: Some(errors),
            ..Self::new(400, "Parameter verification failed.")
        }
    }

    /// `400 Parameter verification failed.` with one parameter error.
    pub fn param(name: &str, message: impl Into<String>) -> Self {
        Self::params(BTreeMap::from([(name.to_string(), message.into())]))
    }

    /// A 401 from the auth handler: empty body, the reason phrase carries the message.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self {
            empty_body: true,
            ..Self::new(401, message)
        }
    }

    /// `501 Method 'GET /x' not implemented`.
    pub fn not_implemented(method: &str, path: &str) -> Self {
        Self::new(501, format!("Method '{method} {path}' not implemented"))
    }

    /// The reason phrase: the first line of the message.
    pub fn reason(&self) -> &str {
        self.message.lines().next().unwrap_or_default()
    }

    /// The JSON body of the answer (`None` for an empty body).
    pub fn body(&self) -> Option<serde_json::Value> {
        if self.empty_body {
            return None;
        }
        let mut body = serde_json::json!({ "data": null, "message": format!("{}\n", self.message) });
        if let Some(errors) = &self.errors {
            body["errors"] = serde_json::json!(errors);
        }
        Some(body)
    }
}

/// Errors starting the simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The configuration is invalid.
    #[error("invalid simulator configuration: {0}")]
    Config(String),
    /// The listening socket could not be bound.
    #[error("failed to bind {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The self-signed certificate could not be made.
    #[error("failed to set up TLS: {0}")]
    Tls(String),
}
