//! The migration's world over the daemon's providers: hosts reached over SSH, target hosts provisioned
//! through the provider with their services held stopped, names switched through the provider's DNS.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::run::{AppMove, World, WorldError};
use crate::api::{Deployment, RestoreSpec, RuntimeEnvironment};
use crate::backup::script;
use crate::nixos::HttpTarget;
use crate::nixos::escape::shell_word;
use crate::nixos::host::{Health, HttpCheck, NixHost, SshHost, SshTarget, SshTimeouts, known_hosts_line};
use crate::provider::{ConvergeRequest, PlannedHost, PreviousFacts, Provider};
use crate::proxmox::ProxmoxProvider;
use crate::store::Store;

/// How long the target's health checks may take to pass after its services started.
pub const HEALTH_AFTER_START: Duration = Duration::from_secs(300);
/// How long provisioning the target hosts may take (new VMs, a first NixOS deploy).
pub const PROVISION_DEADLINE: Duration = Duration::from_secs(1800);
/// How long stopping or destroying a source's VMs may take (a stop and a destroy task each).
const DESTROY_DEADLINE: Duration = Duration::from_secs(600);
/// What a one-line service command on a host may take.
const COMMAND: Duration = Duration::from_secs(300);

/// The name of the file (in the backup work folder of a host) that records what the migration did
/// to the host's services: `stopped` or `serving` on the source, `retired` when it was retired,
/// `removed` on a target given up.
pub const MARKER: &str = "migration";

/// Everything a migration of one Deployment needs from the desired objects.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// The Deployment as its spec is now.
    pub deployment: Deployment,
    /// The environment it leaves.
    pub from: RuntimeEnvironment,
    /// The environment it moves to.
    pub to: RuntimeEnvironment,
    /// Its planned hosts (the same names on both sides).
    pub hosts: Vec<PlannedHost>,
    /// The applications whose data moves.
    pub apps: Vec<AppMove>,
    /// The health check of each application (by Application name), if it declares one.
    pub health: BTreeMap<String, crate::api::HealthCheck>,
}

/// The providers a migration works through.
#[derive(Clone)]
pub struct Providers {
    /// Creates and deploys hosts without touching names (the infrastructure and NixOS layers).
    pub hosts: Arc<dyn Provider>,
    /// The whole provider, names included: the switch converges the target through it.
    pub names: Arc<dyn Provider>,
    /// How health checks reach the web server.
    pub http: HttpTarget,
    /// The Proxmox VMs themselves, when that backend is enabled: a retired source's VMs are stopped
    /// or destroyed through it (the same provider as inside `hosts`, so one Deployment's VMs are never
    /// worked on twice at once).
    pub vms: Option<ProxmoxProvider>,
}

/// A [`World`] over the daemon's providers: existing machines (`staticHosts`) or Proxmox VMs on
/// either side. A host's address is learnt from what the daemon recorded of it (the environment's
/// `staticHosts`, or its VM's address and pinned host key in the store), never from memory alone, so
/// a restarted daemon finds the same hosts.
pub struct ProviderWorld {
    inputs: Inputs,
    providers: Providers,
    store: Arc<Store>,
    known_hosts_dir: PathBuf,
    sources: BTreeMap<String, OnceLock<SshHost>>,
    targets: BTreeMap<String, OnceLock<SshHost>>,
    marker_dir: String,
    provisioned: tokio::sync::Mutex<bool>,
    switched: tokio::sync::Mutex<bool>,
}

/// How `app`'s host in `env` is reached (address, port, host key): its `staticHosts` entry, or the
/// address its VM's guest agent reported and the host key pinned at its first deploy.
fn address_of(
    store: &Store,
    env: &RuntimeEnvironment,
    deployment: &str,
    app: &AppMove,
) -> Result<(String, u16, String), WorldError> {
    let env_name = env.metadata.name.as_str();
    if let Some(s) = env.spec.static_hosts.iter().find(|s| s.name.as_str() == app.host) {
        return Ok((s.address.clone(), s.port, s.host_key.clone()));
    }
    if env.spec.proxmox.is_none() {
        return Err(WorldError::fatal(format!(
            "host {} is not among the staticHosts of RuntimeEnvironment {env_name}, which has no proxmox \
             section either; migrations move Deployments between existing machines (staticHosts) and \
             Proxmox VMs",
            app.host
        )));
    }
    let unreadable = |e: crate::store::StoreError| {
        WorldError::transient(format!(
            "cannot read what is recorded of host {} in {env_name}: {e}",
            app.host
        ))
    };
    let record = crate::proxmox::recorded_vm(store, env_name, deployment, &app.application)
        .map_err(unreadable)?
        .ok_or_else(|| {
            WorldError::transient(format!(
                "no VM is recorded for host {} in RuntimeEnvironment {env_name} (not provisioned yet)",
                app.host
            ))
        })?;
    let address = record.address.clone().ok_or_else(|| {
        WorldError::transient(format!(
            "VM {} of host {} in {env_name} has no address yet (its guest agent has not reported one)",
            record.vmid, app.host
        ))
    })?;
    let key = store
        .inventory::<String>(&crate::nixos::provider::host_key_inventory_id(
            env_name, &app.host,
        ))
        .map_err(unreadable)?
        .ok_or_else(|| {
            WorldError::transient(format!(
                "no host key is pinned for host {} ({address}) in {env_name}: its NixOS system was never \
                 deployed",
                app.host
            ))
        })?;
    Ok((address, env.spec.ssh.port, key))
}

/// A shell on `host` at `address:port`, its key pinned under `known_hosts_dir/ENV/HOST`.
fn shell_for(
    known_hosts_dir: &Path,
    env: &RuntimeEnvironment,
    host: &str,
    (address, port, host_key): (String, u16, String),
) -> Result<SshHost, WorldError> {
    let dir = known_hosts_dir.join(env.metadata.name.as_str());
    let pinned = dir.join(host);
    let line = known_hosts_line(host, &host_key).map_err(|e| WorldError::fatal(e.to_string()))?;
    std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&pinned, line))
        .map_err(|e| {
            WorldError::fatal(format!(
                "cannot write the known_hosts file {}: {e}",
                pinned.display()
            ))
        })?;
    SshHost::new(
        SshTarget {
            name: host.to_owned(),
            user: env.spec.ssh.user.clone(),
            address,
            port,
            identity_file: env.spec.ssh.private_key_file.clone().into(),
            known_hosts: pinned,
        },
        SshTimeouts::default(),
    )
    .map_err(|e| WorldError::fatal(e.to_string()))
}

impl ProviderWorld {
    /// The world of `inputs`, pinning the hosts' keys under `known_hosts_dir/ENV/HOST`; `marker_dir`
    /// is the hosts' backup work folder. What the daemon recorded of the hosts is read from `store`
    /// when a host is first needed.
    pub fn new(
        inputs: Inputs,
        providers: Providers,
        store: Arc<Store>,
        known_hosts_dir: &Path,
        marker_dir: &str,
    ) -> Result<Self, WorldError> {
        for env in [&inputs.from, &inputs.to] {
            if env.spec.proxmox.is_none() {
                for app in &inputs.apps {
                    // Refused at once: an existing machine that is not there will not appear.
                    address_of(&store, env, inputs.deployment.metadata.name.as_str(), app)?;
                }
            } else if providers.vms.is_none() {
                return Err(WorldError::fatal(format!(
                    "RuntimeEnvironment {} has Proxmox VMs, but this daemon runs without the Proxmox \
                     backend (--provider proxmox)",
                    env.metadata.name
                )));
            }
        }
        let cells = || {
            inputs
                .apps
                .iter()
                .map(|a| (a.host.clone(), OnceLock::new()))
                .collect::<BTreeMap<_, _>>()
        };
        let (sources, targets) = (cells(), cells());
        Ok(Self {
            inputs,
            providers,
            store,
            known_hosts_dir: known_hosts_dir.to_owned(),
            sources,
            targets,
            marker_dir: marker_dir.to_owned(),
            provisioned: tokio::sync::Mutex::new(false),
            switched: tokio::sync::Mutex::new(false),
        })
    }

    /// The shell on `app`'s host in `env`, learnt once from what is recorded.
    fn host<'a>(
        &'a self,
        cells: &'a BTreeMap<String, OnceLock<SshHost>>,
        env: &RuntimeEnvironment,
        app: &AppMove,
    ) -> Result<&'a SshHost, WorldError> {
        let cell = cells
            .get(&app.host)
            .ok_or_else(|| WorldError::fatal(format!("host {} does not move", app.host)))?;
        if let Some(shell) = cell.get() {
            return Ok(shell);
        }
        let at = address_of(
            &self.store,
            env,
            self.inputs.deployment.metadata.name.as_str(),
            app,
        )?;
        let shell = shell_for(&self.known_hosts_dir, env, &app.host, at)?;
        Ok(cell.get_or_init(|| shell))
    }

    /// The Deployment with its hosts held stopped until their data is restored.
    fn held(&self) -> Deployment {
        let mut d = self.inputs.deployment.clone();
        d.spec.restore = Some(RestoreSpec {
            snapshot: "latest".into(),
            from_environment: Some(self.inputs.from.metadata.name.clone()),
        });
        d
    }

    /// Converges the target hosts through `provider` until they are converged (or the deadline).
    async fn converge_target(
        &self,
        provider: &Arc<dyn Provider>,
        deployment: &Deployment,
    ) -> Result<(), WorldError> {
        let deadline = tokio::time::Instant::now() + PROVISION_DEADLINE;
        // The target hosts are new: what the providers reported of them last is the previous pass's.
        let mut previous = PreviousFacts::default();
        loop {
            let report = provider
                .converge(ConvergeRequest {
                    deployment,
                    env: &self.inputs.to,
                    hosts: &self.inputs.hosts,
                    previous: &previous,
                })
                .await
                .map_err(|e| WorldError {
                    transient: !matches!(e, crate::runtime::ReconcileError::Terminal { .. }),
                    reason: format!("in {}: {e}", self.inputs.to.metadata.name),
                })?;
            if let Some(e) = report.failure {
                return Err(WorldError::transient(format!(
                    "in {}: {e}",
                    self.inputs.to.metadata.name
                )));
            }
            if report.converged {
                return Ok(());
            }
            previous.hosts = report.hosts.clone().unwrap_or(previous.hosts);
            if report.dns.is_some() {
                previous.dns = report.dns.clone();
            }
            if let Some(c) = report
                .conditions
                .iter()
                .find(|c| c.type_ == crate::api::condition_types::DNS_READY)
            {
                previous.dns_ready = Some(c.status);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(WorldError::transient(format!(
                    "the target hosts in {} are not ready after {} s: {}",
                    self.inputs.to.metadata.name,
                    PROVISION_DEADLINE.as_secs(),
                    report.message
                )));
            }
            let wait = report.retry_after.unwrap_or(Duration::from_secs(5));
            tokio::time::sleep(wait.clamp(Duration::from_millis(200), Duration::from_secs(30))).await;
        }
    }

    /// Whether `app`'s host in `env` is a Proxmox VM (not an existing machine).
    fn is_vm(&self, env: &RuntimeEnvironment, app: &AppMove) -> bool {
        env.spec.proxmox.is_some() && !env.spec.static_hosts.iter().any(|s| s.name.as_str() == app.host)
    }

    /// Destroys (`destroy`) or stops the Deployment's VMs in `env` (ours only, each re-verified right
    /// before), waiting until none is recorded there (or every one is stopped).
    async fn vms(&self, env: &RuntimeEnvironment, destroy: bool) -> Result<(), WorldError> {
        let what = if destroy { "destroy" } else { "stop" };
        let Some(vms) = &self.providers.vms else {
            return Err(WorldError::fatal(format!(
                "cannot {what} the VMs in RuntimeEnvironment {}: this daemon runs without the Proxmox \
                 backend (--provider proxmox)",
                env.metadata.name
            )));
        };
        let deployment = self.inputs.deployment.metadata.name.as_str();
        let deadline = tokio::time::Instant::now() + DESTROY_DEADLINE;
        loop {
            let done = if destroy {
                vms.destroy_moved(deployment, env).await
            } else {
                vms.stop_moved(deployment, env).await
            }
            .map_err(|e| WorldError::transient(format!("in {}: {e}", env.metadata.name)))?;
            if done {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(WorldError::transient(format!(
                    "cannot {what} every VM of {deployment} in {} within {} s",
                    env.metadata.name,
                    DESTROY_DEADLINE.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn run_line(&self, shell: &SshHost, step: &'static str, line: &str) -> Result<(), WorldError> {
        let out = crate::backup::Shell::run(shell, step, line, None, COMMAND)
            .await
            .map_err(|e| WorldError::transient(format!("{}: {step}: {e}", shell.name())))?;
        if out.success() {
            Ok(())
        } else {
            Err(WorldError::transient(format!(
                "{}: {step} failed (exit {:?}): {}",
                shell.name(),
                out.code,
                crate::text::one_line(&out.stderr.trim().chars().take(300).collect::<String>())
            )))
        }
    }
}

/// The line that starts (`run`) or stops `services`, then records `state` in `marker_dir/migration`.
pub fn services_line(marker_dir: &str, services: &[String], run: bool, state: &str) -> String {
    let d = shell_word(marker_dir);
    let services = if run {
        script::start_services(services)
    } else {
        format!("{}true", script::stop_services(services))
    };
    format!(
        "set -e; {services}; mkdir -p {d}; echo {state} >{d}/{MARKER}.tmp; mv {d}/{MARKER}.tmp {d}/{MARKER}",
        state = shell_word(state)
    )
}

impl World for ProviderWorld {
    type Shell = SshHost;

    fn applications(&self) -> Vec<AppMove> {
        self.inputs.apps.clone()
    }

    fn source(&self, app: &AppMove) -> Result<&SshHost, WorldError> {
        self.host(&self.sources, &self.inputs.from, app)
    }

    fn target(&self, app: &AppMove) -> Result<&SshHost, WorldError> {
        self.host(&self.targets, &self.inputs.to, app)
    }

    async fn provision(&self, _app: &AppMove) -> Result<(), WorldError> {
        // All hosts of the Deployment are converged at once, by the first application that asks.
        let mut done = self.provisioned.lock().await;
        if !*done {
            let held = self.held();
            self.converge_target(&self.providers.hosts, &held).await?;
            *done = true;
        }
        Ok(())
    }

    async fn source_services(&self, app: &AppMove, run: bool) -> Result<(), WorldError> {
        let shell = self.source(app)?;
        let line = services_line(
            &self.marker_dir,
            &app.data.services,
            run,
            if run { "serving" } else { "stopped" },
        );
        self.run_line(shell, "set the source's services", &line).await
    }

    async fn start_target(&self, app: &AppMove) -> Result<(), WorldError> {
        let shell = self.target(app)?;
        let line = format!(
            "{}; rm -f {}/{MARKER}",
            script::start_services(&app.data.services),
            self.marker_dir
        );
        self.run_line(shell, "start the target's services", &line).await?;
        let http = self.inputs.health.get(&app.application).map(|h| HttpCheck {
            scheme: self.providers.http.scheme.clone(),
            fqdn: format!("{}.{}", app.application, self.inputs.deployment.spec.domain),
            port: self.providers.http.port,
            path: h.path.clone(),
            expect_status: h.expect_status,
        });
        let deadline = tokio::time::Instant::now() + HEALTH_AFTER_START;
        loop {
            let why = match shell.health(http.as_ref()).await {
                Ok(Health::Healthy) => return Ok(()),
                Ok(Health::NotYet(why)) => why,
                Err(e) => e.to_string(),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(WorldError::transient(format!(
                    "{}: the target is not healthy: {why}",
                    app.host
                )));
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    async fn switch_names(&self, _app: &AppMove) -> Result<(), WorldError> {
        if self.inputs.to.spec.dns.is_none() {
            // No zone is kept for this environment: the operator's records name the hosts.
            return Ok(());
        }
        let mut done = self.switched.lock().await;
        if !*done {
            let deployment = self.inputs.deployment.clone();
            self.converge_target(&self.providers.names, &deployment).await?;
            *done = true;
        }
        Ok(())
    }

    async fn retain_source(&self, app: &AppMove) -> Result<(), WorldError> {
        if self.is_vm(&self.inputs.from, app) {
            // The VM stops (its services with it) and is kept with its disks.
            return self.vms(&self.inputs.from, false).await;
        }
        self.source_services(app, false).await
    }

    async fn destroy_source(&self, app: &AppMove) -> Result<(), WorldError> {
        if self.is_vm(&self.inputs.from, app) {
            return self.vms(&self.inputs.from, true).await;
        }
        // An existing machine is not the controller's to destroy: its services stay stopped and
        // it is marked retired (its data stays until its owner wipes it).
        let shell = self.source(app)?;
        let line = services_line(&self.marker_dir, &app.data.services, false, "retired");
        self.run_line(shell, "retire the source", &line).await
    }

    async fn remove_target(&self, app: &AppMove) -> Result<(), WorldError> {
        let shell = self.target(app)?;
        let line = services_line(&self.marker_dir, &app.data.services, false, "removed");
        self.run_line(shell, "give up the target", &line).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn environment(yaml: &str) -> RuntimeEnvironment {
        let docs = crate::yaml::parse_documents(yaml, &crate::yaml::Limits::default()).unwrap();
        match crate::api::parse_object(&docs[0].1).unwrap() {
            crate::api::Object::RuntimeEnvironment(e) => e,
            other => panic!("not a RuntimeEnvironment: {other:?}"),
        }
    }

    #[test]
    fn the_service_lines_stop_or_start_the_units_and_record_the_state_on_the_host() {
        assert_eq!(
            services_line(
                "/var/lib/fediversity-backup",
                &["mastodon-web.service".into()],
                false,
                "stopped"
            ),
            "set -e; if [ -d /run/systemd/system ]; then systemctl stop mastodon-web.service; fi; true; \
mkdir -p /var/lib/fediversity-backup; echo stopped >/var/lib/fediversity-backup/migration.tmp; \
mv /var/lib/fediversity-backup/migration.tmp /var/lib/fediversity-backup/migration"
        );
        assert_eq!(
            services_line("/var/lib/x y", &[], true, "serving"),
            "set -e; true; mkdir -p '/var/lib/x y'; echo serving >'/var/lib/x y'/migration.tmp; \
mv '/var/lib/x y'/migration.tmp '/var/lib/x y'/migration"
        );
    }

    fn app() -> AppMove {
        AppMove {
            application: "mastodon".into(),
            host: "uni-mastodon".into(),
            data: crate::api::DataSpec {
                paths: Vec::new(),
                databases: Vec::new(),
                services: Vec::new(),
            },
        }
    }

    #[test]
    fn a_host_that_is_neither_an_existing_machine_nor_a_vm_of_the_environment_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut env = environment(&crate::fixtures::environment_yaml("cluster"));
        env.spec.proxmox = None;
        let err = address_of(&store, &env, "uni", &app()).unwrap_err();
        assert!(!err.transient);
        assert!(
            err.reason
                .contains("uni-mastodon is not among the staticHosts of RuntimeEnvironment cluster"),
            "{}",
            err.reason
        );
    }

    #[test]
    fn a_vm_is_reached_at_the_address_its_agent_reported_with_the_key_pinned_at_its_first_deploy() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut env = environment(&crate::fixtures::environment_yaml("cluster"));
        env.spec.ssh.port = 2222;
        let err = address_of(&store, &env, "uni", &app()).unwrap_err();
        assert!(err.transient, "provisioning may still record it");
        assert!(
            err.reason.contains("no VM is recorded for host uni-mastodon"),
            "{}",
            err.reason
        );
        let mut record = crate::proxmox::VmRecord {
            environment: "cluster".into(),
            deployment: "uni".into(),
            application: "mastodon".into(),
            name: "uni-mastodon".into(),
            owner_tag: "fediversity-owner-x".into(),
            vmid: 20001,
            node: "pve1".into(),
            phase: crate::proxmox::RecordPhase::Present,
            task: None,
            configured: None,
            pending: Vec::new(),
            address: None,
            deletion_policy: crate::api::DeletionPolicy::Delete,
        };
        let key = crate::proxmox::lifecycle::record_key("cluster", "uni", "mastodon");
        store.put_inventory(&key, &record).unwrap();
        let err = address_of(&store, &env, "uni", &app()).unwrap_err();
        assert!(err.reason.contains("has no address yet"), "{}", err.reason);
        record.address = Some("192.0.2.7".into());
        store.put_inventory(&key, &record).unwrap();
        let err = address_of(&store, &env, "uni", &app()).unwrap_err();
        assert!(err.reason.contains("no host key is pinned"), "{}", err.reason);
        // The same VM recorded in another environment is not this one's.
        let other = environment(&crate::fixtures::environment_yaml("elsewhere"));
        assert!(address_of(&store, &other, "uni", &app()).is_err());
        store
            .put_inventory(
                &crate::nixos::provider::host_key_inventory_id("cluster", "uni-mastodon"),
                &"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyFakeKeyFakeKeyFakeKeyFakeKeyFake".to_owned(),
            )
            .unwrap();
        let (address, port, key) = address_of(&store, &env, "uni", &app()).unwrap();
        assert_eq!((address.as_str(), port), ("192.0.2.7", 2222));
        assert!(key.starts_with("ssh-ed25519 "), "{key}");
    }
}
