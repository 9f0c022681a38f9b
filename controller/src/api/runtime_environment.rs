//! `RuntimeEnvironment`: where deployments run — a Proxmox VE cluster and/or existing NixOS machines.

use std::collections::{BTreeMap, BTreeSet};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use super::environment_services::{AcmeSpec, ObjectStorageSpec, SmtpSpec};
use super::meta::{Condition, Name};
use super::validate::{self, Problems, Validate};
use crate::yaml::FieldPath;

/// The smallest VMID Proxmox VE accepts (IDs below 100 are reserved).
pub const MIN_VMID: u32 = 100;
/// The largest VMID Proxmox VE accepts (`pve-vmid` format: 100 to 999999999).
pub const MAX_VMID: u32 = 999_999_999;

/// The provider's description of one place where deployments run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuntimeEnvironmentSpec {
    /// A Proxmox VE cluster on which the controller creates one VM per host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxmox: Option<ProxmoxSpec>,
    /// Existing NixOS machines reachable over SSH, used instead of (or beside) VMs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub static_hosts: Vec<StaticHost>,
    /// How the controller logs in to hosts.
    pub ssh: SshSpec,
    /// Where NixOS configurations are built.
    #[serde(default)]
    pub nix: NixSpec,
    /// Politeness limits towards this environment.
    #[serde(default)]
    pub limits: EnvironmentLimits,
    /// The ACME account for the hosts' certificates (else the Deployment's `initialUser` e-mail).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acme: Option<AcmeSpec>,
    /// The SMTP relay the applications send mail through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smtp: Option<SmtpSpec>,
    /// S3-compatible storage for media, for the applications that can use it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_storage: Option<ObjectStorageSpec>,
    /// Names for hosts in the provider's DNS zone, kept over RFC 2136 dynamic update with TSIG.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsSpec>,
    /// Backups of the hosts' data to a restic repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<super::BackupSpec>,
}

/// How to reach and use a Proxmox VE cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProxmoxSpec {
    /// The API endpoint, `https://HOST:8006` (the controller adds `/api2/json`).
    pub endpoint: String,
    /// API credentials; the secret part is read from a file.
    pub credentials: ProxmoxCredentials,
    /// How the API's TLS certificate is verified. Without it the system's roots are used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// Nodes on which new VMs may be placed.
    pub nodes: Vec<Name>,
    /// The cloud-init capable NixOS template that VMs are cloned from.
    pub template: TemplateRef,
    /// The storage for VM disks, e.g. `local-zfs`.
    pub storage: String,
    /// The bridge for the VMs' first network interface, e.g. `vmbr0`.
    pub bridge: String,
    /// The VMIDs this controller may allocate; it never touches a VM outside the range.
    pub vmid_range: VmidRange,
    /// A resource pool that new VMs join.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Clone mode: linked clones are fast and share the template's disk; full clones are independent.
    #[serde(default)]
    pub clone_mode: CloneMode,
}

/// Proxmox VE API credentials. Secrets are never written inline: they are read from files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProxmoxCredentials {
    /// An API token ID `USER@REALM!TOKENID`, e.g. `fediversity@pve!controller` (recommended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    /// The file holding the API token's secret (used with `tokenId`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<String>,
    /// A user `USER@REALM` for ticket login (when tokens cannot be used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The file holding that user's password (used with `user`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
}

/// How the Proxmox API certificate is checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TlsSpec {
    /// A PEM file with the CA that signed the API certificate (e.g. the cluster's `pve-root-ca.pem`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// The API certificate's SHA-256 fingerprint, `AB:CD:...`, pinned instead of a CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// Turns verification off. Only for test clusters: warned about at start and in status.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
}

/// The template VMs are cloned from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TemplateRef {
    /// The template's VMID.
    pub vmid: u32,
}

/// An inclusive range of VMIDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VmidRange {
    /// The first VMID of the range.
    pub start: u32,
    /// The last VMID of the range (inclusive).
    pub end: u32,
}

impl VmidRange {
    /// Whether `vmid` lies in the range.
    pub fn contains(&self, vmid: u32) -> bool {
        (self.start..=self.end).contains(&vmid)
    }
}

/// How VMs are cloned from the template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
pub enum CloneMode {
    /// A linked clone (fast; needs storage that supports it).
    #[default]
    Linked,
    /// A full, independent copy.
    Full,
}

/// An existing NixOS machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StaticHost {
    /// The host's name in this environment.
    pub name: Name,
    /// Its address or DNS name.
    pub address: String,
    /// Its SSH port.
    #[serde(default = "default_ssh_port")]
    pub port: u16,
    /// Its SSH host public key (`ssh-ed25519 AAAA...`), pinned.
    pub host_key: String,
}

fn default_ssh_port() -> u16 {
    22
}

/// How the controller logs in to hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SshSpec {
    /// The login user.
    #[serde(default = "default_ssh_user")]
    pub user: String,
    /// The file holding the private key.
    pub private_key_file: String,
    /// The file holding the public key that cloud-init installs on new VMs (default: the private key's `.pub`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key_file: Option<String>,
    /// The SSH port of new VMs (static hosts give their own).
    #[serde(default = "default_ssh_port")]
    pub port: u16,
}

fn default_ssh_user() -> String {
    "root".into()
}

/// Where and how NixOS systems are built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NixSpec {
    /// The nixpkgs to build with, as a flake reference or path.
    #[serde(default = "default_nixpkgs")]
    pub nixpkgs: String,
    /// Remote builders, in Nix's `builders` syntax.
    #[serde(default)]
    pub builders: Vec<String>,
    /// Binary caches to substitute from.
    #[serde(default)]
    pub substituters: Vec<String>,
}

fn default_nixpkgs() -> String {
    "github:NixOS/nixpkgs/nixos-25.05".into()
}

impl Default for NixSpec {
    fn default() -> Self {
        Self {
            nixpkgs: default_nixpkgs(),
            builders: Vec::new(),
            substituters: Vec::new(),
        }
    }
}

/// Limits that keep the controller polite towards an environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EnvironmentLimits {
    /// Most operations (VM tasks, deployments) in flight at once.
    #[serde(default = "default_max_ops")]
    pub max_concurrent_operations: u32,
}

fn default_max_ops() -> u32 {
    4
}

impl Default for EnvironmentLimits {
    fn default() -> Self {
        Self {
            max_concurrent_operations: default_max_ops(),
        }
    }
}

/// The provider's DNS zone, where every host gets `<deployment>-<application>.<zone>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DnsSpec {
    /// The zone, e.g. `hosting.example` (without the trailing dot).
    pub zone: String,
    /// The primary server that accepts dynamic updates for the zone.
    pub server: DnsServer,
    /// The TSIG key that signs updates; the secret is read from a file.
    pub tsig: TsigSpec,
    /// The TTL of the records, in seconds.
    #[serde(default = "default_dns_ttl")]
    pub ttl: u32,
    /// Where a host's public address comes from: `GuestAgent` (the address the VM reports, or a static
    /// host's address) or `Nat` (that address translated through `nat`).
    #[serde(default)]
    pub address_source: AddressSource,
    /// With `addressSource: Nat`: each private address and the public address it is reached at.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub nat: BTreeMap<String, String>,
    /// A recursive resolver through which the operators' names are checked (condition `DNSReady`).
    /// Without it, the operators' names are not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolver: Option<DnsServer>,
}

fn default_dns_ttl() -> u32 {
    300
}

/// A DNS server's address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DnsServer {
    /// Its IP address or host name.
    pub host: String,
    /// Its port.
    #[serde(default = "default_dns_port")]
    pub port: u16,
}

fn default_dns_port() -> u16 {
    53
}

/// A TSIG key (RFC 8945) shared with the DNS server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TsigSpec {
    /// The key's name, as the server knows it (e.g. `fediversity-key`).
    pub key_name: String,
    /// The HMAC algorithm.
    #[serde(default)]
    pub algorithm: TsigAlgorithm,
    /// The file holding the base64 secret, alone or as the `key` clause `tsig-keygen` writes.
    pub secret_file: String,
}

/// The TSIG algorithms the controller signs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum TsigAlgorithm {
    /// HMAC-SHA256 (the default, and what `tsig-keygen` creates).
    #[default]
    #[serde(rename = "hmac-sha256")]
    HmacSha256,
    /// HMAC-SHA384.
    #[serde(rename = "hmac-sha384")]
    HmacSha384,
    /// HMAC-SHA512.
    #[serde(rename = "hmac-sha512")]
    HmacSha512,
}

/// Where a host's public address comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum AddressSource {
    /// The address the guest agent reports (or a static host's address) is public.
    #[default]
    GuestAgent,
    /// Hosts sit behind NAT: the reported address is translated through `nat`.
    Nat,
}

/// What the controller observed of an environment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeEnvironmentStatus {
    /// The generation last acted upon.
    #[serde(default)]
    pub observed_generation: u64,
    /// Current conditions.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The token of the last on-demand reconcile request handled (`fediversity reconcile --wait`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_reconcile_at: Option<String>,
    /// The Proxmox VE version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The cluster's nodes that are online.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// How many VMs carry this controller's owner tag.
    #[serde(default)]
    pub vms_owned: u32,
    /// How many VMs are kept (`deletionPolicy: Retain`) after their host left its Deployment.
    #[serde(default)]
    pub vms_orphaned: u32,
    /// Whether the template VM exists and is a template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_present: Option<bool>,
    /// Whether the API is reached without certificate verification or over plain HTTP.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
    /// Things an operator should know (verification off, nodes offline, cleanup problems).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

fn check_token_id(value: &str) -> Result<(), String> {
    let ok = value.split_once('@').and_then(|(user, rest)| {
        let (realm, token) = rest.split_once('!')?;
        Some(!user.is_empty() && !realm.is_empty() && !token.is_empty() && !token.contains(['=', ' ']))
    });
    if ok == Some(true) {
        Ok(())
    } else {
        Err(format!(
            "`{value}` is not an API token ID: expected `USER@REALM!TOKENID`, e.g. `fediversity@pve!controller`"
        ))
    }
}

impl Validate for RuntimeEnvironmentSpec {
    fn validate(&self, path: &FieldPath, problems: &mut Problems) {
        if self.proxmox.is_none() && self.static_hosts.is_empty() {
            problems.push(
                path,
                "give `proxmox` (a Proxmox VE cluster), `staticHosts` (existing NixOS machines) or both",
            );
        }
        if let Some(proxmox) = &self.proxmox {
            proxmox.validate(&path.key("proxmox"), problems);
        }
        let mut seen = BTreeSet::new();
        for (i, host) in self.static_hosts.iter().enumerate() {
            let at = path.key("staticHosts").index(i);
            host.name.validate(&at.key("name"), problems);
            if !seen.insert(&host.name) {
                problems.push(
                    &at.key("name"),
                    format!("static host `{}` is listed twice", host.name),
                );
            }
            if host.address.trim().is_empty() || host.address.contains(char::is_whitespace) {
                problems.push(
                    &at.key("address"),
                    "give an IP address or DNS name without spaces",
                );
            } else if host.address.starts_with('-')
                || !host
                    .address
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]%_".contains(&b))
            {
                problems.push(
                    &at.key("address"),
                    format!(
                        "`{}` is not an IP address or DNS name: it may hold only letters, digits, `.`, `-`, `:`, \
                         `[`, `]`, `%` and `_`, and must not start with `-` (ssh would read it as an option)",
                        crate::text::one_line(&host.address)
                    ),
                );
            }
            let mut words = host.host_key.split_whitespace();
            let key_ok = !host.host_key.contains(|c: char| c.is_control())
                && matches!(words.next(), Some(t) if t.starts_with("ssh-") || t.starts_with("ecdsa-") || t.starts_with("sk-"))
                && words.next().is_some_and(|k| {
                    !k.is_empty()
                        && k.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
                });
            if !key_ok {
                problems.push(
                    &at.key("hostKey"),
                    "expected an SSH public key such as `ssh-ed25519 AAAA...` (see `ssh-keyscan HOST`)",
                );
            }
            if host.port == 0 {
                problems.push(&at.key("port"), "the port must be from 1 to 65535");
            }
        }
        let ssh = path.key("ssh");
        problems.check(
            &ssh.key("privateKeyFile"),
            validate::secret_file(&self.ssh.private_key_file),
        );
        if let Some(public) = &self.ssh.public_key_file {
            problems.check(&ssh.key("publicKeyFile"), validate::absolute_path(public));
        }
        if self.ssh.user.is_empty()
            || self.ssh.user.starts_with('-')
            || !self
                .ssh
                .user
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
        {
            problems.push(
                &ssh.key("user"),
                format!(
                    "`{}` is not a valid user name: use letters, digits, `_`, `-` and `.`, not starting with \
                     `-` (ssh would read it as an option)",
                    crate::text::one_line(&self.ssh.user)
                ),
            );
        }
        if self.nix.nixpkgs.trim().is_empty() {
            problems.push(
                &path.key("nix").key("nixpkgs"),
                "give the nixpkgs to build with, e.g. `github:NixOS/nixpkgs/nixos-25.05`",
            );
        }
        super::environment_services::validate(
            self.acme.as_ref(),
            self.smtp.as_ref(),
            self.object_storage.as_ref(),
            path,
            problems,
        );
        if let Some(backup) = &self.backup {
            backup.validate(&path.key("backup"), problems);
        }
        if self.limits.max_concurrent_operations == 0 {
            problems.push(
                &path.key("limits").key("maxConcurrentOperations"),
                "must be at least 1",
            );
        }
        if let Some(dns) = &self.dns {
            dns.validate(&path.key("dns"), problems);
        }
    }
}

impl Validate for DnsSpec {
    fn validate(&self, path: &FieldPath, problems: &mut Problems) {
        problems.check(&path.key("zone"), validate::domain(&self.zone));
        self.server.validate(&path.key("server"), problems);
        if let Some(resolver) = &self.resolver {
            resolver.validate(&path.key("resolver"), problems);
        }
        let tsig = path.key("tsig");
        let key = self.tsig.key_name.trim_end_matches('.');
        if validate::domain(key).is_err() && validate::dns_label(key).is_err() {
            problems.push(
                &tsig.key("keyName"),
                format!(
                    "`{}` is not a valid key name: give the name the server knows the key by, e.g. `fediversity-key`",
                    self.tsig.key_name
                ),
            );
        }
        problems.check(
            &tsig.key("secretFile"),
            validate::secret_file(&self.tsig.secret_file),
        );
        if !(1..=MAX_DNS_TTL).contains(&self.ttl) {
            problems.push(
                &path.key("ttl"),
                format!("must be from 1 to {MAX_DNS_TTL} seconds"),
            );
        }
        match self.address_source {
            AddressSource::GuestAgent if !self.nat.is_empty() => problems.push(
                &path.key("nat"),
                "`nat` is used only with `addressSource: Nat`: set that, or remove `nat`",
            ),
            AddressSource::Nat if self.nat.is_empty() => problems.push(
                &path.key("addressSource"),
                "with `addressSource: Nat`, give `nat`: map each private address to its public one, e.g. `{ \"10.0.0.5\": \"203.0.113.5\" }`",
            ),
            _ => {}
        }
        for (private, public) in &self.nat {
            let at = path.key("nat").key(private);
            if private.parse::<std::net::IpAddr>().is_err() {
                problems.push(&at, format!("`{private}` is not an IP address"));
            }
            if public.parse::<std::net::IpAddr>().is_err() {
                problems.push(&at, format!("`{public}` is not an IP address"));
            }
        }
    }
}

/// The longest TTL accepted (one week): longer ones make moves slow to take effect.
pub const MAX_DNS_TTL: u32 = 604_800;

impl Validate for DnsServer {
    fn validate(&self, path: &FieldPath, problems: &mut Problems) {
        let host = self.host.as_str();
        if host.parse::<std::net::IpAddr>().is_err() && validate::domain(host).is_err() {
            problems.push(
                &path.key("host"),
                format!("`{host}` is not an IP address or host name"),
            );
        }
        if self.port == 0 {
            problems.push(&path.key("port"), "the port must be from 1 to 65535");
        }
    }
}

impl Validate for ProxmoxSpec {
    fn validate(&self, path: &FieldPath, problems: &mut Problems) {
        problems.check(&path.key("endpoint"), validate::endpoint(&self.endpoint));
        let creds = &self.credentials;
        let at = path.key("credentials");
        match (
            &creds.token_id,
            &creds.secret_file,
            &creds.user,
            &creds.password_file,
        ) {
            (Some(token), Some(secret), None, None) => {
                problems.check(&at.key("tokenId"), check_token_id(token));
                problems.check(&at.key("secretFile"), validate::secret_file(secret));
            }
            (None, None, Some(user), Some(password)) => {
                if !user.contains('@') {
                    problems.push(
                        &at.key("user"),
                        format!("`{user}` needs a realm: `USER@REALM`, e.g. `root@pam`"),
                    );
                }
                problems.check(&at.key("passwordFile"), validate::secret_file(password));
            }
            _ => problems.push(
                &at,
                "give either `tokenId` with `secretFile` (recommended) or `user` with `passwordFile`",
            ),
        }
        if let Some(tls) = &self.tls {
            let at = path.key("tls");
            let ways = usize::from(tls.ca_file.is_some())
                + usize::from(tls.fingerprint.is_some())
                + usize::from(tls.insecure_skip_verify);
            if ways > 1 {
                problems.push(
                    &at,
                    "give only one of `caFile`, `fingerprint` and `insecureSkipVerify`",
                );
            }
            if let Some(ca) = &tls.ca_file {
                problems.check(&at.key("caFile"), validate::absolute_path(ca));
            }
            if let Some(fp) = &tls.fingerprint {
                problems.check(&at.key("fingerprint"), validate::fingerprint(fp));
            }
        }
        if self.nodes.is_empty() {
            problems.push(
                &path.key("nodes"),
                "list at least one node on which VMs may be placed",
            );
        }
        let mut seen = BTreeSet::new();
        for (i, node) in self.nodes.iter().enumerate() {
            node.validate(&path.key("nodes").index(i), problems);
            if !seen.insert(node) {
                problems.push(
                    &path.key("nodes").index(i),
                    format!("node `{node}` is listed twice"),
                );
            }
        }
        let vmid_in_bounds = |v: u32| (MIN_VMID..=MAX_VMID).contains(&v);
        let range = self.vmid_range;
        let at = path.key("vmidRange");
        for (field, value) in [("start", range.start), ("end", range.end)] {
            if !vmid_in_bounds(value) {
                problems.push(
                    &at.key(field),
                    format!("VMID {value} is outside what Proxmox VE allows ({MIN_VMID} to {MAX_VMID})"),
                );
            }
        }
        if range.start > range.end {
            problems.push(
                &at,
                format!(
                    "the range is inverted: start {} is after end {}; swap them",
                    range.start, range.end
                ),
            );
        }
        let template = self.template.vmid;
        if !vmid_in_bounds(template) {
            problems.push(
                &path.key("template").key("vmid"),
                format!("VMID {template} is outside what Proxmox VE allows ({MIN_VMID} to {MAX_VMID})"),
            );
        } else if range.contains(template) {
            problems.push(&path.key("template").key("vmid"), format!("template VMID {template} lies inside vmidRange {}-{}: the controller could treat the template as its own VM; move one of them", range.start, range.end));
        }
        for (field, value) in [("storage", &self.storage), ("bridge", &self.bridge)] {
            if !is_proxmox_id(value) {
                problems.push(&path.key(field), format!("`{value}` is not a valid Proxmox {field} ID (letters, digits, '-', '_' and '.', starting with a letter)"));
            }
        }
        if let Some(pool) = &self.pool
            && !is_proxmox_id(pool)
        {
            problems.push(
                &path.key("pool"),
                format!("`{pool}` is not a valid Proxmox pool ID"),
            );
        }
    }
}

/// Proxmox's `pve-storage-id`/`pve-poolid` style: a letter, then letters, digits, `-`, `_`, `.`.
fn is_proxmox_id(value: &str) -> bool {
    value.starts_with(|c: char| c.is_ascii_alphabetic())
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}
