//! Makes a Deployment's hosts run NixOS: wraps the infrastructure provider and deploys onto static
//! hosts, and onto VMs once the infrastructure reports their address.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::api::{
    ConditionStatus, Deployment, HostStatus, Kind, Object, ObjectKey, RuntimeEnvironment, Timestamp,
    condition_types,
};
use crate::provider::{
    ConvergeRequest, EnvironmentReport, Objects, PlannedHost, PreviousFacts, Provider, ProviderCondition,
    ProviderReport, Recorder,
};
use crate::runtime::{BoxFuture, ReconcileError};
use crate::store::Store;

use super::command::{self, CommandSpec};
use super::{DeployResult, HostAddress, HostDeployStatus, HostRequest, NixosDeployer, PrepareError};

/// The reason of a Deployment whose last deploy failed or was rolled back.
pub const DEPLOY_FAILED: &str = "DeployFailed";

/// The reason of a host found switched out of band whose switch back failed.
pub const SYSTEM_DRIFTED: &str = "SystemDrifted";

/// How soon a Deployment whose hosts did not all converge is looked at again.
pub const NOT_CONVERGED_RETRY: Duration = Duration::from_secs(60);

/// Where the first host key seen of a new VM is recorded in the store's inventory.
pub fn host_key_inventory_id(environment: &str, host: &str) -> String {
    format!("nixos-host-key/{environment}/{host}")
}

/// The static host a planned host runs on: the `staticHosts` entry whose name is the host's name,
/// `<deployment>-<application>`. Matching by name (not by order) keeps a host on its machine when
/// applications are added or removed.
pub fn static_host_for<'a>(
    env: &'a RuntimeEnvironment,
    host: &PlannedHost,
) -> Option<&'a crate::api::StaticHost> {
    env.spec
        .static_hosts
        .iter()
        .find(|s| s.name.as_str() == host.name)
}

/// A converge request, owned by the task that runs it.
struct Owned {
    deployment: Deployment,
    env: RuntimeEnvironment,
    hosts: Vec<PlannedHost>,
    previous: PreviousFacts,
}

/// A provider that adds NixOS convergence to an infrastructure provider.
pub struct NixosProvider {
    inner: Arc<dyn Provider>,
    deployer: Arc<NixosDeployer>,
    desired: Arc<dyn Objects>,
    book: Option<Arc<dyn Recorder>>,
    store: Option<Arc<Store>>,
}

impl NixosProvider {
    /// Wraps `inner`; events go to `book`, first-seen VM host keys to `store`.
    pub fn new(
        inner: Arc<dyn Provider>,
        deployer: Arc<NixosDeployer>,
        desired: Arc<dyn Objects>,
        book: Option<Arc<dyn Recorder>>,
        store: Option<Arc<Store>>,
    ) -> Self {
        Self {
            inner,
            deployer,
            desired,
            book,
            store,
        }
    }

    fn handle(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            deployer: self.deployer.clone(),
            desired: self.desired.clone(),
            book: self.book.clone(),
            store: self.store.clone(),
        }
    }

    fn application(&self, name: &str) -> Option<crate::api::Application> {
        let key = ObjectKey {
            kind: Kind::Application,
            name: crate::api::Name::new(name),
        };
        match self.desired.object(&key) {
            Some(Object::Application(app)) => Some(app),
            _ => None,
        }
    }

    /// The pinned key of a VM: recorded on first sight (`ssh-keyscan`), never replaced silently.
    async fn vm_host_key(
        &self,
        env: &str,
        host: &str,
        address: &str,
        port: u16,
    ) -> Result<String, PrepareError> {
        pinned_host_key(
            self.store.as_deref(),
            &host_key_inventory_id(env, host),
            host,
            self.deployer.scan_host_key(address, port),
        )
        .await
    }

    async fn deploy_hosts(
        &self,
        deployment: &Deployment,
        env: &RuntimeEnvironment,
        hosts: &[PlannedHost],
        addresses: &BTreeMap<String, Result<HostAddress, Arc<PrepareError>>>,
        base: &[HostStatus],
        previous: &[HostStatus],
    ) -> ProviderReport {
        let email = deployment.spec.initial_user.as_ref().map(|u| u.email.clone());
        // A Deployment that starts from a snapshot holds its applications stopped until restored.
        let hold = deployment.spec.restore.is_some();
        let mut tasks = tokio::task::JoinSet::new();
        for host in hosts {
            let Some(Ok(address)) = addresses.get(&host.name).cloned() else {
                continue;
            };
            let Some(app) = self.application(host.application.as_str()) else {
                continue;
            };
            let settings = deployment
                .spec
                .applications
                .get(&host.application)
                .map(|c| c.settings.clone())
                .unwrap_or_default();
            let (deployer, env, host, email) =
                (self.deployer.clone(), env.clone(), host.clone(), email.clone());
            let sink = crate::provider::progress::current();
            tasks.spawn(crate::provider::progress::within(sink, async move {
                let status = deployer
                    .converge_holding(
                        &HostRequest {
                            environment: env.metadata.name.as_str(),
                            env: &env.spec,
                            host_name: &host.name,
                            application_name: host.application.as_str(),
                            application: &app.spec,
                            fqdn: &host.fqdn,
                            settings: &settings,
                            admin_email: email.as_deref(),
                            address: &address,
                        },
                        hold,
                    )
                    .await;
                (address, status)
            }));
        }
        let mut results: BTreeMap<String, (HostAddress, HostDeployStatus)> = BTreeMap::new();
        while let Some(joined) = tasks.join_next().await {
            if let Ok((address, status)) = joined {
                results.insert(status.name.clone(), (address, status));
            }
        }
        let key = ObjectKey {
            kind: Kind::Deployment,
            name: deployment.metadata.name.clone(),
        };
        let mut merged = Vec::new();
        for host in hosts {
            let base = base.iter().find(|h| h.name == host.name);
            let before = previous.iter().find(|p| p.name == host.name);
            let merge = super::status::merge_host(
                &host.name,
                base,
                before,
                super::status::Attempt::of(addresses.get(&host.name), results.get(&host.name)),
                env.spec.proxmox.is_some(),
                Timestamp::now(),
            );
            if merge.drifted.is_some() {
                self.deployer.record_drift();
            }
            if let (Some(book), Some((type_, reason, message))) = (&self.book, &merge.event) {
                book.event(&key, *type_, reason, message.clone());
            }
            merged.push(merge);
        }
        super::status::report(merged)
    }

    async fn converge_owned(self, request: Owned) -> Result<ProviderReport, ReconcileError> {
        let Owned {
            deployment,
            env,
            hosts,
            previous,
        } = request;
        if env.spec.proxmox.is_none() {
            let env_name = env.metadata.name.to_string();
            let addresses = hosts
                .iter()
                .map(|h| {
                    let address = static_host_for(&env, h)
                        .map(|s| HostAddress {
                            address: s.address.clone(),
                            port: s.port,
                            host_key: s.host_key.clone(),
                        })
                        .ok_or_else(|| {
                            Arc::new(PrepareError::NoStaticHost {
                                environment: env_name.clone(),
                                host: h.name.clone(),
                            })
                        });
                    (h.name.clone(), address)
                })
                .collect();
            return Ok(self
                .deploy_hosts(&deployment, &env, &hosts, &addresses, &[], &previous.hosts)
                .await);
        }
        let mut report = self
            .inner
            .converge(ConvergeRequest {
                deployment: &deployment,
                env: &env,
                hosts: &hosts,
                previous: &previous,
            })
            .await?;
        let Some(vm_hosts) = report.hosts.clone() else {
            return Ok(report);
        };
        if !report.converged {
            if let Some(hosts) = report.hosts.as_mut() {
                carry_nixos_fields(&previous.hosts, hosts);
            }
            return Ok(report);
        }
        // Every VM exists and has an address: make it run its configuration.
        let port = env.spec.ssh.port;
        let mut addresses = BTreeMap::new();
        for h in &vm_hosts {
            if let Some(address) = &h.address {
                let key = self
                    .vm_host_key(env.metadata.name.as_str(), &h.name, address, port)
                    .await
                    .map(|host_key| HostAddress {
                        address: address.clone(),
                        port,
                        host_key,
                    })
                    .map_err(Arc::new);
                addresses.insert(h.name.clone(), key);
            }
        }
        let mut nixos = self
            .deploy_hosts(&deployment, &env, &hosts, &addresses, &vm_hosts, &previous.hosts)
            .await;
        // One Drifted condition: the VMs' and the systems' findings together.
        let drift_of = |c: &[ProviderCondition]| c.iter().position(|c| c.type_ == condition_types::DRIFTED);
        let mut vm_conditions = report.conditions;
        if let (Some(i), Some(j)) = (drift_of(&nixos.conditions), drift_of(&vm_conditions)) {
            let vm = vm_conditions.remove(j);
            let mine = &mut nixos.conditions[i];
            if vm.status == ConditionStatus::True {
                if mine.status == ConditionStatus::True {
                    mine.message = format!("{}; {}", vm.message, mine.message);
                } else {
                    *mine = vm;
                }
            }
        }
        nixos.conditions.extend(vm_conditions);
        // The VMs' next drift scan, if sooner.
        nixos.retry_after = match (nixos.retry_after, report.retry_after) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Ok(nixos)
    }
}

/// The host key pinned under `id`, or the one `scan` finds, pinned now when none was recorded.
///
/// A store that cannot say whether a key is pinned stops the host's deploy: scanning again would
/// silently replace a pinned key with whatever answers at the address now.
pub async fn pinned_host_key(
    store: Option<&Store>,
    id: &str,
    host: &str,
    scan: impl std::future::Future<Output = Result<String, PrepareError>>,
) -> Result<String, PrepareError> {
    if let Some(store) = store {
        match store.inventory::<String>(id) {
            Ok(Some(key)) => return Ok(key),
            Ok(None) => {}
            Err(source) => {
                return Err(PrepareError::PinnedKeyUnreadable {
                    host: host.to_owned(),
                    source,
                });
            }
        }
    }
    let key = scan.await?;
    if let Some(store) = store {
        store
            .put_inventory(id, &key)
            .map_err(|source| PrepareError::Pin {
                host: host.to_owned(),
                source,
            })?;
    }
    Ok(key)
}

/// The phase of a host whose VM is up but which has not run its NixOS configuration yet.
pub const PROVISIONED: &str = "Provisioned";

/// While some VMs are still coming up, the infrastructure reports the hosts without their NixOS side:
/// keep what was known of each host's system, and call a VM whose configuration was never applied
/// `Provisioned` rather than `Ready`.
pub fn carry_nixos_fields(previous: &[HostStatus], hosts: &mut [HostStatus]) {
    for host in hosts {
        let before = previous.iter().find(|p| p.name == host.name);
        if let Some(before) = before {
            host.system.clone_from(&before.system);
            host.desired_system.clone_from(&before.desired_system);
            host.generation = before.generation;
            host.activated_at.clone_from(&before.activated_at);
            host.last_result.clone_from(&before.last_result);
            host.step_millis.clone_from(&before.step_millis);
        }
        let applied = before.and_then(|b| b.last_result.as_deref()) == Some(DeployResult::Applied.label());
        if host.phase == "Ready" && !applied {
            host.phase = PROVISIONED.into();
        }
    }
}

/// Wraps the daemon's provider with NixOS convergence when the deployer is configured (its metrics in
/// `registry`); returns `inner` unchanged otherwise.
pub fn with_nixos(
    inner: Arc<dyn Provider>,
    config: Option<super::DeployerConfig>,
    store: &Arc<Store>,
    desired: Arc<dyn Objects>,
    book: Arc<dyn Recorder>,
    registry: &prometheus::Registry,
) -> Result<Arc<dyn Provider>, prometheus::Error> {
    let Some(config) = config else {
        return Ok(inner);
    };
    let metrics = super::DeployMetrics::register(registry)?;
    tracing::info!(catalog = %config.catalog_root.display(), "NixOS convergence enabled");
    Ok(Arc::new(NixosProvider::new(
        inner,
        Arc::new(NixosDeployer::new(config, Some(metrics))),
        desired,
        Some(book),
        Some(store.clone()),
    )))
}

/// The host's ed25519 key as `ssh-keyscan` sees it (`ssh-ed25519 AAAA…`).
pub async fn scan_host_key(address: &str, port: u16) -> Result<String, PrepareError> {
    let spec = CommandSpec::new(
        "ssh-keyscan",
        [
            "-T".to_owned(),
            "5".to_owned(),
            "-t".to_owned(),
            "ed25519".to_owned(),
            "-p".to_owned(),
            port.to_string(),
            address.to_owned(),
        ],
        Duration::from_secs(15),
    );
    let out = command::run_ok(&spec)
        .await
        .map_err(|source| PrepareError::Scan {
            address: address.to_owned(),
            source,
        })?;
    out.stdout
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let mut words = l.split_whitespace().skip(1);
            Some(format!("{} {}", words.next()?, words.next()?))
        })
        .ok_or_else(|| PrepareError::NoHostKey {
            address: address.to_owned(),
            port,
        })
}

impl Provider for NixosProvider {
    fn check_environment(
        &self,
        env: &RuntimeEnvironment,
    ) -> BoxFuture<Result<EnvironmentReport, ReconcileError>> {
        self.inner.check_environment(env)
    }

    fn converge(&self, request: ConvergeRequest<'_>) -> BoxFuture<Result<ProviderReport, ReconcileError>> {
        let this = self.handle();
        let owned = Owned {
            deployment: request.deployment.clone(),
            env: request.env.clone(),
            hosts: request.hosts.to_vec(),
            previous: request.previous.clone(),
        };
        Box::pin(this.converge_owned(owned))
    }

    fn cleanup(&self, deployment: &ObjectKey) -> BoxFuture<Result<(), ReconcileError>> {
        self.inner.cleanup(deployment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, phase: &str) -> HostStatus {
        HostStatus {
            name: name.into(),
            phase: phase.into(),
            ..HostStatus::default()
        }
    }

    #[test]
    fn while_vms_come_up_known_systems_are_kept_and_an_unconfigured_vm_is_not_called_ready() {
        let mut running = host("uni-mastodon", "Ready");
        running.system = Some("/nix/store/abc-nixos-system-uni-mastodon".into());
        running.generation = Some(3);
        running.last_result = Some("Applied".into());
        let previous = [running];
        let mut now = [
            host("uni-mastodon", "Ready"),
            host("uni-pixelfed", "Ready"),
            host("uni-peertube", "WaitingForAgent"),
        ];
        carry_nixos_fields(&previous, &mut now);
        assert_eq!(now[0].phase, "Ready");
        assert_eq!(now[0].generation, Some(3));
        assert_eq!(
            now[0].system.as_deref(),
            Some("/nix/store/abc-nixos-system-uni-mastodon")
        );
        assert_eq!(now[1].phase, PROVISIONED, "its configuration was never applied");
        assert_eq!(now[2].phase, "WaitingForAgent");
    }

    #[tokio::test]
    async fn a_store_that_cannot_read_a_pinned_key_stops_the_deploy_and_never_pins_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let id = host_key_inventory_id("ams", "uni-mastodon");
        // A value that is not a key: reading it back fails the way a damaged entry does.
        store.put_inventory(&id, &42u32).unwrap();
        let scans = std::sync::atomic::AtomicUsize::new(0);
        let scan = async {
            scans.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok("ssh-ed25519 AAAAnew".to_owned())
        };
        let err = pinned_host_key(Some(&store), &id, "uni-mastodon", scan)
            .await
            .unwrap_err();
        assert!(matches!(err, PrepareError::PinnedKeyUnreadable { .. }), "{err:?}");
        let err = err.to_string();
        assert!(
            err.contains("cannot read the pinned host key of uni-mastodon"),
            "{err}"
        );
        assert!(err.contains("deploy is stopped"), "{err}");
        assert_eq!(scans.load(std::sync::atomic::Ordering::SeqCst), 0, "no new scan");
        assert_eq!(
            store.inventory::<u32>(&id).unwrap(),
            Some(42),
            "the entry is untouched"
        );
    }

    #[tokio::test]
    async fn a_pinned_key_is_kept_and_a_missing_one_is_scanned_once_and_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let id = host_key_inventory_id("ams", "uni-pixelfed");
        let first = pinned_host_key(Some(&store), &id, "h", async {
            Ok("ssh-ed25519 AAAAone".to_owned())
        })
        .await
        .unwrap();
        assert_eq!(first, "ssh-ed25519 AAAAone");
        let again = pinned_host_key(Some(&store), &id, "h", async {
            Ok("ssh-ed25519 AAAAtwo".to_owned())
        })
        .await
        .unwrap();
        assert_eq!(
            again, "ssh-ed25519 AAAAone",
            "a pinned key is never replaced by a new scan"
        );
    }

    #[test]
    fn the_host_key_of_a_vm_is_kept_under_its_environment_and_name() {
        assert_eq!(
            host_key_inventory_id("ams", "uni-mastodon"),
            "nixos-host-key/ams/uni-mastodon"
        );
    }
}
