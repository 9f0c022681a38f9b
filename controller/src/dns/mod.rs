//! Names for hosts in the provider's zone over RFC 2136 dynamic update with TSIG, owned through a TXT mark.
//!
//! Every host `<deployment>-<application>` gets `<deployment>-<application>.<zone>.` with its public
//! A/AAAA records and an ownership TXT `heritage=fediversity,owner=<installation>,deployment=<name>`
//! beside them (as external-dns marks its records). A name without that exact TXT is never changed or
//! deleted. Every update carries RFC 2136 prerequisites on what was just read (create: the name is not in
//! use; update and delete: our TXT and the address sets are exactly as seen), so a concurrent change by
//! someone else makes the server refuse the update, and it is reported rather than overwritten.

pub mod backoff;
pub mod client;
pub mod memory;
pub mod metrics;
pub mod plan;
pub mod provider;
pub mod ready;

use std::net::IpAddr;

use crate::runtime::BoxFuture;

pub use client::{HickoryResolver, HickoryZone};
pub use memory::MemoryZone;
pub use metrics::DnsMetrics;
pub use plan::{Addresses, Change, ChangeKind, Decision, Observed, decide, owner_txt};
pub use provider::{DnsProvider, ZoneFactory, with_dns};

/// Why a DNS request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// The TSIG secret file cannot be read or holds no usable secret (its content is never shown).
    #[error("spec.dns.tsig.secretFile: cannot use {path}: {why}")]
    Secret {
        /// The file.
        path: String,
        /// What is wrong with it.
        why: String,
    },
    /// The server did not answer (down, wrong address, filtered) or its name does not resolve.
    #[error("the DNS server {server} did not answer: {why}")]
    Unreachable {
        /// `host:port`.
        server: String,
        /// The transport error.
        why: String,
    },
    /// The server refused the signed request: wrong key name, secret or algorithm, or no update grant.
    #[error(
        "the DNS server {server} refused our signed request ({why}): check spec.dns.tsig (keyName, algorithm, secretFile) against the key the server has, and that the zone's update policy grants it"
    )]
    Rejected {
        /// `host:port`.
        server: String,
        /// The response code or signature error.
        why: String,
    },
    /// The server is not authoritative for the zone.
    #[error(
        "the DNS server {server} does not serve the zone {zone} ({why}): check spec.dns.zone and spec.dns.server"
    )]
    ZoneNotServed {
        /// `host:port`.
        server: String,
        /// The zone.
        zone: String,
        /// The response code.
        why: String,
    },
    /// The server failed the request in another way (SERVFAIL, a malformed answer).
    #[error("the DNS server {server} failed the request: {why}")]
    Server {
        /// `host:port`.
        server: String,
        /// The response code or error.
        why: String,
    },
}

impl DnsError {
    /// A bounded label for the update metric: `rejected`, `unreachable` or `failed`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Rejected { .. } | Self::Secret { .. } => "rejected",
            Self::Unreachable { .. } => "unreachable",
            Self::ZoneNotServed { .. } | Self::Server { .. } => "failed",
        }
    }

    /// A CamelCase reason for conditions and events.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Secret { .. } => "DNSSecretUnusable",
            Self::Unreachable { .. } => "DNSServerUnreachable",
            Self::Rejected { .. } => "DNSUpdateRejected",
            Self::ZoneNotServed { .. } => "DNSZoneNotServed",
            Self::Server { .. } => "DNSServerError",
        }
    }
}

/// What the server said to a guarded change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Applied in full.
    Done,
    /// A prerequisite did not hold (someone changed the name since it was read): nothing was applied.
    PrerequisiteFailed(String),
}

/// The authoritative side of one zone: read a name, apply a guarded change. The I/O edge of the
/// DNS publisher (real: [`HickoryZone`]).
pub trait ZoneClient: Send + Sync {
    /// What the server holds at `name` (A, AAAA and TXT).
    fn observe(&self, name: &str) -> BoxFuture<Result<Observed, DnsError>>;
    /// Sends one TSIG-signed update with its prerequisites.
    fn apply(&self, change: &Change) -> BoxFuture<Result<Applied, DnsError>>;
}

/// A recursive resolver, asked where an operator's name leads (the `DNSReady` check).
pub trait Resolver: Send + Sync {
    /// The addresses `name` resolves to (following CNAMEs), empty when it does not exist.
    fn resolve(&self, name: &str) -> BoxFuture<Result<Vec<IpAddr>, DnsError>>;
}

/// The fully qualified name (with its trailing dot) of a host in `zone`.
pub fn host_name(host: &str, zone: &str) -> String {
    format!("{host}.{}.", zone.trim_end_matches('.'))
}
