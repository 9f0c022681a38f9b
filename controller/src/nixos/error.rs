//! Why a host's deploy could not start: its host key, its settings, its configuration or its SSH setup.

use std::path::PathBuf;

use super::SyntaxError;
use super::command::CommandError;
use super::generate::GenerateError;
use super::host::HostError;
use super::secrets::SecretError;
use crate::store::StoreError;

/// A failure before anything is built or copied to a host; the host's status says it in these words.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// A RuntimeEnvironment of existing machines has none for this host.
    #[error("RuntimeEnvironment {environment} has no static host named {host}: add one to spec.staticHosts")]
    NoStaticHost {
        /// The environment.
        environment: String,
        /// The planned host.
        host: String,
    },
    /// `ssh-keyscan` could not read the host's key.
    #[error("failed to read the host key of {address}: {source}")]
    Scan {
        /// The address scanned.
        address: String,
        /// Why.
        #[source]
        source: CommandError,
    },
    /// The host answered but presented no ed25519 key.
    #[error("{address}:{port} presented no ed25519 host key")]
    NoHostKey {
        /// The address scanned.
        address: String,
        /// Its SSH port.
        port: u16,
    },
    /// The store cannot say whether a key is pinned: the deploy stops rather than pinning a new key.
    #[error(
        "cannot read the pinned host key of {host} from the store ({source}); its deploy is stopped rather \
         than trusting whatever key answers now: repair or restore the state directory"
    )]
    PinnedKeyUnreadable {
        /// The host.
        host: String,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// The first key seen cannot be pinned.
    #[error("failed to record the host key of {host}: {source}")]
    Pin {
        /// The host.
        host: String,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// A setting does not match the Application's schema.
    #[error("settings.{name}: {message}")]
    Setting {
        /// The setting.
        name: String,
        /// What is wrong with it.
        message: String,
    },
    /// The environment's SSH public key cannot be read.
    #[error(transparent)]
    PublicKey(#[from] SecretError),
    /// The configuration cannot be generated.
    #[error(transparent)]
    Generate(#[from] GenerateError),
    /// The generated configuration does not parse (a bug: reported rather than deployed).
    #[error(transparent)]
    Syntax(#[from] SyntaxError),
    /// A local file the deploy needs cannot be written.
    #[error("failed to {action} {path}: {source}")]
    Local {
        /// `create` or `write`.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The SSH target is not usable.
    #[error(transparent)]
    Host(#[from] HostError),
}
