//! NixOS host convergence: generate a host's configuration, build it, copy, activate, confirm, roll back.

pub mod build;
/// Subprocesses, under the name the NixOS layer and its callers have always used.
pub use crate::process as command;
pub mod deploy;
pub mod error;
pub mod escape;
pub mod generate;
pub mod host;
pub mod metrics;
pub mod provider;
pub mod readiness;
pub mod secrets;
pub mod simulated;
pub mod status;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::Semaphore;

use crate::api::{ApplicationSpec, RuntimeEnvironmentSpec};

pub use build::{BuildSettings, Builder, NixpkgsSource};
pub use deploy::{DeployReport, DeployResult, DeployTimings, Step};
pub use error::PrepareError;
pub use generate::{HostConfig, HostEnvironment, generate};
pub use host::{HttpCheck, NixHost, SshHost, SshTarget, SshTimeouts, StorePath};
pub use metrics::DeployMetrics;

/// Where a host keeps the one-time password of the operator's first account (the default of the
/// catalog's `fediversity.firstAccount.passwordFile`).
pub const FIRST_PASSWORD_FILE: &str = "/var/lib/fediversity-first-account/password";

/// Why a host's configuration is not valid Nix (checked in process before anything runs).
#[derive(Debug, Error)]
#[error("the generated configuration does not parse: {0}")]
pub struct SyntaxError(pub String);

/// Parses `text` as a Nix expression in process (rnix) and returns its first syntax error.
pub fn check_syntax(text: &str) -> Result<(), SyntaxError> {
    let parsed = rnix::Root::parse(text);
    match parsed.errors().first() {
        None => Ok(()),
        Some(e) => Err(SyntaxError(e.to_string())),
    }
}

/// Where backups and restores work on a host by default.
pub const BACKUP_DIR: &str = "/var/lib/fediversity-backup";

/// The file on a host whose existence says it was restored from its snapshot (written by the restore).
pub fn restore_marker() -> String {
    format!("{BACKUP_DIR}/restored")
}

/// How the deployer reaches an Application's web server for its HTTP health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTarget {
    /// `https` in production.
    pub scheme: String,
    /// 443 in production.
    pub port: u16,
}

impl Default for HttpTarget {
    fn default() -> Self {
        Self {
            scheme: "https".into(),
            port: 443,
        }
    }
}

/// How the deployer builds systems and reaches hosts.
#[derive(Debug, Clone, Default)]
pub enum Transport {
    /// `nix build` on this machine and OpenSSH to the hosts: the real thing.
    #[default]
    Ssh,
    /// Simulated builds and hosts ([`simulated::Fleet`]): nothing is built and no machine is contacted.
    Simulated(Arc<simulated::Fleet>),
}

/// Settings of the deployer that are not per environment.
#[derive(Debug, Clone)]
pub struct DeployerConfig {
    /// Host configurations, GC roots and known_hosts files live here.
    pub state_dir: PathBuf,
    /// The catalog root: Applications' `nixosModule` paths are relative to it.
    pub catalog_root: PathBuf,
    /// Deadlines of a deploy.
    pub timings: DeployTimings,
    /// SSH timeouts.
    pub ssh: SshTimeouts,
    /// How long one `nix build` may take.
    pub build_timeout: Duration,
    /// How the HTTP health check reaches the web server.
    pub http: HttpTarget,
    /// Where deploy files live on hosts (default [`host::DEFAULT_REMOTE_DIR`]).
    pub remote_dir: Option<String>,
    /// Where secret files live on hosts (default [`generate::DEFAULT_SECRETS_DIR`]).
    pub secrets_dir: Option<String>,
    /// Extra Nix configuration (`NIX_CONFIG`) for every `nix` the deployer runs.
    pub nix_config: Option<String>,
    /// How systems are built and hosts reached.
    pub transport: Transport,
}

impl DeployerConfig {
    /// Defaults for a controller whose state is in `state_dir` and whose catalog is `catalog_root`.
    pub fn new(state_dir: &Path, catalog_root: &Path) -> Self {
        Self {
            state_dir: state_dir.to_owned(),
            catalog_root: catalog_root.to_owned(),
            timings: DeployTimings::default(),
            ssh: SshTimeouts::default(),
            build_timeout: Duration::from_secs(3600),
            http: HttpTarget::default(),
            remote_dir: None,
            secrets_dir: None,
            nix_config: None,
            transport: Transport::Ssh,
        }
    }
}

/// Where one host is and how its SSH host key is pinned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAddress {
    /// Its address.
    pub address: String,
    /// Its SSH port.
    pub port: u16,
    /// Its SSH host public key (`TYPE BASE64`): from `staticHosts`, or the first key seen of a new VM.
    pub host_key: String,
}

/// Everything the deployer needs to converge one host.
#[derive(Debug, Clone, Copy)]
pub struct HostRequest<'a> {
    /// The RuntimeEnvironment's name (concurrency caps are per environment).
    pub environment: &'a str,
    /// The RuntimeEnvironment.
    pub env: &'a RuntimeEnvironmentSpec,
    /// The host's name, `<deployment>-<application>`.
    pub host_name: &'a str,
    /// The application's catalog name.
    pub application_name: &'a str,
    /// The Application.
    pub application: &'a ApplicationSpec,
    /// The public host name.
    pub fqdn: &'a str,
    /// The operator's settings for the application.
    pub settings: &'a serde_json::Map<String, serde_json::Value>,
    /// The first account's e-mail address.
    pub admin_email: Option<&'a str>,
    /// Where the host is.
    pub address: &'a HostAddress,
}

/// What is known of one host after a convergence: the per-host status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostDeployStatus {
    /// The host.
    pub name: String,
    /// The system it should run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_system: Option<String>,
    /// The system its profile points at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_system: Option<String>,
    /// The profile's generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u32>,
    /// The outcome.
    pub last_result: DeployResult,
    /// Whether the system was built this time (false: unchanged inputs).
    pub rebuilt: bool,
    /// Whether anything was copied or activated.
    pub changed: bool,
    /// One sentence.
    pub message: String,
    /// Seconds per step (`build`, `inspect`, `copy`, …).
    pub step_seconds: Vec<(String, f64)>,
}

/// Per-environment caps on parallel builds and deploys.
struct Caps {
    builds: Arc<Semaphore>,
    deploys: Arc<Semaphore>,
}

/// Converges NixOS hosts: generate, build, copy, activate, confirm, roll back.
pub struct NixosDeployer {
    config: DeployerConfig,
    builder: Builder,
    metrics: Option<DeployMetrics>,
    caps: Mutex<HashMap<String, Caps>>,
}

impl NixosDeployer {
    /// A deployer with `config`, exporting metrics when given.
    pub fn new(config: DeployerConfig, metrics: Option<DeployMetrics>) -> Self {
        let builder = Builder::new(&config.state_dir, &config.catalog_root);
        Self {
            config,
            builder,
            metrics,
            caps: Mutex::new(HashMap::new()),
        }
    }

    fn caps(&self, environment: &str, limit: u32) -> (Arc<Semaphore>, Arc<Semaphore>) {
        let mut caps = self.caps.lock().unwrap_or_else(|e| e.into_inner());
        let c = caps.entry(environment.to_owned()).or_insert_with(|| Caps {
            builds: Arc::new(Semaphore::new(limit.max(1) as usize)),
            deploys: Arc::new(Semaphore::new(limit.max(1) as usize)),
        });
        (c.builds.clone(), c.deploys.clone())
    }

    /// The Nix text of a host's configuration.
    pub fn configuration(&self, req: &HostRequest<'_>) -> Result<String, PrepareError> {
        self.configuration_holding(req, false)
    }

    /// The Nix text of a host's configuration; with `hold`, its application stays stopped until the
    /// restore from a snapshot is done (a Deployment with `spec.restore`).
    pub fn configuration_holding(&self, req: &HostRequest<'_>, hold: bool) -> Result<String, PrepareError> {
        let problems = crate::provider::settings::check(req.application.settings.as_ref(), req.settings);
        if let Some((name, message)) = problems.into_iter().next() {
            return Err(PrepareError::Setting { name, message });
        }
        let mut config = HostConfig::new(
            &self.config.catalog_root,
            req.host_name,
            req.application_name,
            req.fqdn,
            &req.application.nixos_module,
            req.admin_email,
            req.settings,
        );
        if req
            .env
            .static_hosts
            .iter()
            .any(|h| h.name.as_str() == req.host_name)
        {
            // An existing machine: its own configuration has its file systems and boot loader.
            config.platform_module = None;
        }
        config.environment = self.host_environment(req.env);
        if hold {
            config.restore_hold = Some(restore_marker());
        }
        config.root_keys = match (secrets::public_key(&req.env.ssh), &self.config.transport) {
            (Ok(key), _) => vec![key],
            (Err(e), Transport::Ssh) => return Err(e.into()),
            (Err(_), Transport::Simulated(_)) => Vec::new(),
        };
        let text = generate(&config)?;
        check_syntax(&text)?;
        Ok(text)
    }

    /// What the environment provides to its hosts, as the hosts see it.
    pub fn host_environment(&self, env: &RuntimeEnvironmentSpec) -> HostEnvironment {
        HostEnvironment {
            secrets_dir: self
                .config
                .secrets_dir
                .clone()
                .unwrap_or_else(|| generate::DEFAULT_SECRETS_DIR.into()),
            acme_email: env.acme.as_ref().map(|a| a.email.clone()),
            acme_server: env.acme.as_ref().and_then(|a| a.server.clone()),
            smtp: env.smtp.clone(),
            object_storage: env.object_storage.clone(),
        }
    }

    /// Converges one host and reports what it runs. Failures are results, never panics.
    pub async fn converge(&self, req: &HostRequest<'_>) -> HostDeployStatus {
        self.converge_holding(req, false).await
    }

    /// As [`Self::converge`]; with `hold`, the host's application stays stopped until the restore
    /// from a snapshot is done (see [`Self::configuration_holding`]).
    pub async fn converge_holding(&self, req: &HostRequest<'_>, hold: bool) -> HostDeployStatus {
        let mut status = HostDeployStatus {
            name: req.host_name.to_owned(),
            desired_system: None,
            current_system: None,
            generation: None,
            last_result: DeployResult::Failed,
            rebuilt: false,
            changed: false,
            message: String::new(),
            step_seconds: Vec::new(),
        };
        let (builds, deploys) = self.caps(req.environment, req.env.limits.max_concurrent_operations);
        let text = match self.configuration_holding(req, hold) {
            Ok(t) => t,
            Err(e) => return self.finish(status, format!("{}: {e}", req.host_name)),
        };
        let settings = BuildSettings {
            nixpkgs: NixpkgsSource::parse(&req.env.nix.nixpkgs),
            builders: req.env.nix.builders.clone(),
            substituters: req.env.nix.substituters.clone(),
            timeout: self.config.build_timeout,
            nix_config: self.config.nix_config.clone(),
        };
        let built = {
            let _permit = builds.acquire().await;
            match &self.config.transport {
                Transport::Ssh => self.builder.build(req.host_name, &text, &settings).await,
                Transport::Simulated(fleet) => Ok(fleet.build(req.host_name, &text).await),
            }
        };
        let built = match built {
            Ok(b) => b,
            Err(e) => return self.finish(status, e.to_string()),
        };
        status.rebuilt = built.rebuilt;
        status.desired_system = Some(built.path.to_string());
        status.step_seconds.push(("build".into(), built.seconds));
        let http = req.application.health_check.as_ref().map(|c| HttpCheck {
            scheme: self.config.http.scheme.clone(),
            fqdn: req.fqdn.to_owned(),
            port: self.config.http.port,
            path: c.path.clone(),
            expect_status: c.expect_status,
        });
        // The system says how long its first start may take and which units mean "ready".
        let readiness = readiness::Readiness::of_system(Path::new(built.path.as_str()));
        let timings = &readiness.timings(&self.config.timings);
        let report = match &self.config.transport {
            Transport::Ssh => {
                let host = match self.ssh_host(req).await {
                    Ok(h) => h,
                    Err(e) => return self.finish(status, e.to_string()),
                };
                let _permit = deploys.acquire().await;
                let environment = self.host_environment(req.env);
                let started = std::time::Instant::now();
                match secrets::deliver(&host, Path::new(built.path.as_str()), req.env, &environment).await {
                    Ok(0) => {}
                    Ok(_) => status
                        .step_seconds
                        .push(("secrets".into(), started.elapsed().as_secs_f64())),
                    Err(e) => return self.finish(status, format!("{}: {e}", req.host_name)),
                }
                deploy::execute(&host, &built.path, http.as_ref(), timings).await
            }
            Transport::Simulated(fleet) => {
                let address = req.address;
                let host = match fleet.connect(req.host_name, &address.address, &address.host_key) {
                    Ok(h) => h,
                    Err(e) => return self.finish(status, e.to_string()),
                };
                let _permit = deploys.acquire().await;
                deploy::execute(&host, &built.path, http.as_ref(), timings).await
            }
        };
        status.last_result = report.result;
        status.current_system = report.current.as_ref().map(ToString::to_string);
        status.generation = report.generation;
        status.changed = report.changed;
        status
            .step_seconds
            .extend(report.steps.iter().map(|(s, t)| (s.label().to_owned(), *t)));
        let message = report.message.clone();
        self.finish(status, message)
    }

    /// Counts a host found switched out of band.
    pub fn record_drift(&self) {
        if let Some(m) = &self.metrics {
            m.drifted();
        }
    }

    /// The SSH host key the host at `address` presents now (recorded on first sight of a new VM).
    pub async fn scan_host_key(&self, address: &str, port: u16) -> Result<String, PrepareError> {
        match &self.config.transport {
            Transport::Ssh => provider::scan_host_key(address, port).await,
            Transport::Simulated(fleet) => Ok(fleet.host_key(address)),
        }
    }

    async fn ssh_host(&self, req: &HostRequest<'_>) -> Result<SshHost, PrepareError> {
        let dir = self.config.state_dir.join("known_hosts");
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|source| PrepareError::Local {
                action: "create",
                path: dir.clone(),
                source,
            })?;
        let known_hosts = dir.join(req.host_name);
        let line = host::known_hosts_line(req.host_name, &req.address.host_key)?;
        tokio::fs::write(&known_hosts, line)
            .await
            .map_err(|source| PrepareError::Local {
                action: "write",
                path: known_hosts.clone(),
                source,
            })?;
        let target = SshTarget {
            name: req.host_name.to_owned(),
            user: req.env.ssh.user.clone(),
            address: req.address.address.clone(),
            port: req.address.port,
            identity_file: PathBuf::from(&req.env.ssh.private_key_file),
            known_hosts,
        };
        let host =
            SshHost::new(target, self.config.ssh.clone())?.with_nix_config(self.config.nix_config.clone());
        Ok(match &self.config.remote_dir {
            Some(d) => host.with_remote_dir(d),
            None => host,
        })
    }

    fn finish(&self, mut status: HostDeployStatus, message: String) -> HostDeployStatus {
        status.message = message;
        if let Some(m) = &self.metrics {
            for (step, secs) in &status.step_seconds {
                m.step(step, *secs);
            }
            m.result(status.last_result);
        }
        tracing::info!(
            host = %status.name,
            result = status.last_result.label(),
            changed = status.changed,
            "{}",
            status.message
        );
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_and_deploys_are_capped_per_environment() {
        let deployer = NixosDeployer::new(
            DeployerConfig::new(Path::new("/state"), Path::new("/catalog")),
            None,
        );
        let (builds, deploys) = deployer.caps("ams", 2);
        assert_eq!((builds.available_permits(), deploys.available_permits()), (2, 2));
        let held = deploys.clone().try_acquire_many_owned(2).unwrap();
        let (_, same) = deployer.caps("ams", 2);
        assert!(same.try_acquire().is_err(), "a third deploy in ams waits");
        let (_, other) = deployer.caps("utrecht", 1);
        assert!(other.try_acquire().is_ok(), "another environment has its own cap");
        drop(held);
        assert_eq!(same.available_permits(), 2);
    }

    #[test]
    fn a_broken_expression_is_caught_before_anything_runs() {
        assert!(check_syntax("{ a = 1; }").is_ok());
        assert!(check_syntax("{ a = ; }").is_err());
    }
}
