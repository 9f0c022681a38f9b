//! Typed Proxmox API errors, classified from an answer's status and message, each with a bounded metric label.

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
}
