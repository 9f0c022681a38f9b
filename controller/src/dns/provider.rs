//! Keeps hosts' names in step with the hosts: wraps the infrastructure provider, publishes each host's
//! address once it has one, removes the name when the host is destroyed, keeps it while the VM is
//! retained, and checks that the operator's names lead to the hosts (`DNSReady`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::backoff::Gates;
use super::plan::{Addresses, Decision, Rdata, decide, owner_txt};
use super::{Applied, DnsError, DnsMetrics, HickoryResolver, HickoryZone, Resolver, ZoneClient, host_name};
use crate::api::{
    AddressSource, ConditionStatus, DeletionPolicy, DnsRecordStatus, DnsSpec, DnsStatus, EventType,
    HostStatus, Kind, Object, ObjectKey, RuntimeEnvironment, condition_types,
};
use crate::provider::{
    ConvergeRequest, EnvironmentFacts, EnvironmentReport, Objects, Provider, ProviderCondition,
    ProviderReport, Recorder,
};
use crate::runtime::{BoxFuture, ReconcileError};
use crate::store::Store;

/// How soon a name held by someone else (or a host without a publishable address) is looked at again:
/// a person has to act, so there is no point in asking the server more often.
pub const CONFLICT_RETRY: Duration = Duration::from_secs(60);
/// How soon the operator's names are checked again while they do not resolve to the hosts.
pub const DNS_READY_RETRY: Duration = Duration::from_secs(15);

/// Builds the zone client of an environment's `spec.dns`.
pub type ZoneFactory = dyn Fn(&DnsSpec) -> Result<Arc<dyn ZoneClient>, DnsError> + Send + Sync;
/// Builds the resolver of an environment's `spec.dns.resolver`.
pub type ResolverFactory = dyn Fn(&crate::api::DnsServer) -> Arc<dyn Resolver> + Send + Sync;

/// A name the controller manages, kept in the store's inventory (`dns/<deployment>/<host>`) from just
/// before its first update, so that it is removed even after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameRecord {
    /// The RuntimeEnvironment whose zone holds it.
    pub environment: String,
    /// `<deployment>-<application>.<zone>.`.
    pub name: String,
    /// The Deployment's deletion policy when last seen.
    pub deletion_policy: DeletionPolicy,
}

fn inventory_id(deployment: &str, host: &str) -> String {
    format!("dns/{deployment}/{host}")
}

/// One name to converge.
struct Target {
    host: String,
    name: String,
    desired: Option<Addresses>,
}

/// What happened to one name.
enum Outcome {
    Published,
    Removed,
    Foreign(String),
    Failed(DnsError),
}

/// A provider that adds DNS names to an infrastructure provider.
#[derive(Clone)]
pub struct DnsProvider {
    inner: Arc<dyn Provider>,
    core: Arc<Core>,
}

struct Core {
    desired: Arc<dyn Objects>,
    book: Option<Arc<dyn Recorder>>,
    store: Arc<Store>,
    metrics: DnsMetrics,
    installation: String,
    zones: Box<ZoneFactory>,
    resolvers: Box<ResolverFactory>,
    gates: Gates,
}

impl DnsProvider {
    /// Wraps `inner`; names are marked as `installation`'s, kept in `store`, events go to `book`.
    pub fn new(
        inner: Arc<dyn Provider>,
        installation: String,
        store: Arc<Store>,
        desired: Arc<dyn Objects>,
        book: Option<Arc<dyn Recorder>>,
        metrics: DnsMetrics,
    ) -> Self {
        Self::with_clients(
            inner,
            installation,
            store,
            desired,
            book,
            metrics,
            Box::new(|spec| HickoryZone::new(spec).map(|z| Arc::new(z) as Arc<dyn ZoneClient>)),
            Box::new(|server| Arc::new(HickoryResolver::new(server)) as Arc<dyn Resolver>),
        )
    }

    /// As [`DnsProvider::new`], with the zone clients and resolvers from the given factories.
    // Each argument is a distinct collaborator; a builder would only rename them.
    #[allow(clippy::too_many_arguments)]
    pub fn with_clients(
        inner: Arc<dyn Provider>,
        installation: String,
        store: Arc<Store>,
        desired: Arc<dyn Objects>,
        book: Option<Arc<dyn Recorder>>,
        metrics: DnsMetrics,
        zones: Box<ZoneFactory>,
        resolvers: Box<ResolverFactory>,
    ) -> Self {
        Self {
            inner,
            core: Arc::new(Core {
                desired,
                book,
                store,
                metrics,
                installation,
                zones,
                resolvers,
                gates: Gates::default(),
            }),
        }
    }
}

/// The public address of a host whose reported address is `address`, by the environment's address source.
pub fn public_address(spec: &DnsSpec, address: &str) -> Result<IpAddr, String> {
    let translated = match spec.address_source {
        AddressSource::GuestAgent => address,
        AddressSource::Nat => spec.nat.get(address).map(String::as_str).ok_or_else(|| {
            format!("spec.dns.nat has no public address for {address}: add `\"{address}\": <public address>`")
        })?,
    };
    translated.parse().map_err(|_| {
        format!("its address `{translated}` is not an IP address, so it cannot be published as A/AAAA")
    })
}

fn ready(status: bool) -> ConditionStatus {
    if status {
        ConditionStatus::True
    } else {
        ConditionStatus::False
    }
}

impl Core {
    fn event(&self, deployment: &str, type_: EventType, reason: &str, message: String) {
        if let Some(book) = &self.book {
            book.event(
                &ObjectKey::new(Kind::Deployment, deployment),
                type_,
                reason,
                message,
            );
        }
    }

    fn gate(&self, environment: &str) -> Result<(), (DnsError, Duration)> {
        self.gates.check(environment)
    }

    fn record_failure(&self, environment: &str, error: &DnsError) -> Duration {
        self.gates.failed(environment, error)
    }

    fn record_success(&self, environment: &str) {
        self.gates.succeeded(environment);
    }

    /// Sends the environment's server a signed update that changes nothing, so that a wrong key, a server that does not
    /// answer or a zone it does not serve shows on the environment before any host needs a name.
    async fn probe(&self, environment: &str, spec: &DnsSpec) -> Option<String> {
        if let Err((error, wait)) = self.gate(environment) {
            return Some(format!("{error} (next attempt in {}s)", wait.as_secs().max(1)));
        }
        let result = match (self.zones)(spec) {
            // Any answer to the signed no-op (even a failed prerequisite) means key and zone are right.
            Ok(zone) => zone.apply(&super::plan::probe(&spec.zone)).await.map(|_| ()),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                self.record_success(environment);
                None
            }
            Err(error) => {
                self.metrics.result(error.metric_label());
                let wait = self.record_failure(environment, &error);
                Some(format!("{error} (next attempt in {}s)", wait.as_secs()))
            }
        }
    }

    /// Converges one name: read, decide, apply (guarded). Counts and times it.
    async fn sync_name(
        &self,
        zone: &dyn ZoneClient,
        deployment: &str,
        environment: &str,
        policy: DeletionPolicy,
        target: &Target,
        ttl: u32,
    ) -> Outcome {
        let started = std::time::Instant::now();
        let owner = owner_txt(&self.installation, deployment);
        let outcome = async {
            let observed = zone.observe(&target.name).await?;
            let decision = decide(&target.name, target.desired.as_ref(), &observed, &owner, ttl);
            let (kind, change) = match decision {
                Decision::InSync => {
                    return Ok(if target.desired.is_some() {
                        Outcome::Published
                    } else {
                        Outcome::Removed
                    });
                }
                Decision::Foreign(why) => {
                    self.metrics.result("conflict");
                    return Ok(Outcome::Foreign(why));
                }
                Decision::Apply(kind, change) => (kind, change),
            };
            let id = inventory_id(deployment, &target.host);
            if target.desired.is_some() {
                let record = NameRecord {
                    environment: environment.to_owned(),
                    name: target.name.clone(),
                    deletion_policy: policy,
                };
                if let Err(e) = self.store.put_inventory(&id, &record) {
                    return Ok(Outcome::Foreign(format!("not updated: the store failed: {e}")));
                }
            }
            // With several replicas only a leader that renewed its lease recently changes a zone.
            if !self.store.may_act() {
                return Ok(Outcome::Foreign(format!(
                    "not updated: {}",
                    crate::store::StoreError::NotLeader
                )));
            }
            match zone.apply(&change).await? {
                Applied::Done => {
                    self.metrics.result(kind.label());
                    let what = change
                        .operations
                        .iter()
                        .filter_map(|op| match op {
                            super::plan::Operation::Add(Rdata::A(a)) => Some(format!("A {a}")),
                            super::plan::Operation::Add(Rdata::Aaaa(a)) => Some(format!("AAAA {a}")),
                            _ => None,
                        })
                        .collect::<Vec<_>>()
                        .join(", ");
                    let (reason, message) = match kind {
                        super::ChangeKind::Create => ("DNSRecordCreated", format!("{} {what}", target.name)),
                        super::ChangeKind::Update => ("DNSRecordUpdated", format!("{} {what}", target.name)),
                        super::ChangeKind::Delete => ("DNSRecordDeleted", format!("{} removed", target.name)),
                    };
                    self.event(deployment, EventType::Normal, reason, message);
                    Ok(if target.desired.is_some() {
                        Outcome::Published
                    } else {
                        Outcome::Removed
                    })
                }
                Applied::PrerequisiteFailed(code) => {
                    self.metrics.result("conflict");
                    Ok(Outcome::Foreign(format!(
                        "the name changed on the server while it was being updated ({code}): the change was not applied and is retried against what is there now"
                    )))
                }
            }
        }
        .await
        .unwrap_or_else(|e: DnsError| {
            self.metrics.result(e.metric_label());
            Outcome::Failed(e)
        });
        self.metrics.duration(started.elapsed().as_secs_f64());
        if matches!(outcome, Outcome::Removed) {
            let _ = self
                .store
                .remove_inventory(&inventory_id(deployment, &target.host));
        }
        outcome
    }

    /// The names of a Deployment that are recorded in the inventory, by host.
    fn recorded(&self, deployment: &str) -> BTreeMap<String, NameRecord> {
        self.store
            .inventory_list::<NameRecord>(&format!("dns/{deployment}/"))
            .unwrap_or_default()
            .into_iter()
            .map(|(id, r)| (id.rsplit('/').next().unwrap_or_default().to_owned(), r))
            .collect()
    }

    /// Publishes and removes a Deployment's names; adds `dns` status, `dnsName` per host and the
    /// `DNSPublished` and `DNSReady` conditions to `report`.
    async fn publish(&self, request: ConvergeRequest<'_>, spec: &DnsSpec, report: &mut ProviderReport) {
        let ConvergeRequest {
            deployment,
            env,
            hosts: planned,
            previous: before,
        } = request;
        let dep = deployment.metadata.name.as_str();
        let env_name = env.metadata.name.as_str();
        let policy = deployment.spec.deletion_policy;
        let hosts: Vec<HostStatus> = report.hosts.clone().unwrap_or_default();
        let previous = before.dns.as_ref();
        let mut entries: BTreeMap<String, DnsRecordStatus> = BTreeMap::new();
        let mut targets = Vec::new();
        for host in planned {
            let name = host_name(&host.name, &spec.zone);
            // A VM's address as the infrastructure reports it; a static host's from its spec.
            let address = hosts
                .iter()
                .find(|h| h.name == host.name)
                .and_then(|h| h.address.clone())
                .or_else(|| {
                    env.spec
                        .proxmox
                        .is_none()
                        .then(|| {
                            crate::nixos::provider::static_host_for(env, host).map(|s| s.address.clone())
                        })
                        .flatten()
                });
            let mut entry = DnsRecordStatus {
                host: host.name.clone(),
                name: name.clone(),
                state: "WaitingForAddress".into(),
                ..DnsRecordStatus::default()
            };
            match address.as_deref().map(|a| public_address(spec, a)) {
                None => {}
                Some(Err(why)) => {
                    entry.state = "Failed".into();
                    entry.message = Some(why);
                }
                Some(Ok(ip)) => {
                    entry.addresses = vec![ip.to_string()];
                    targets.push(Target {
                        host: host.name.clone(),
                        name,
                        desired: Some(Addresses::of([ip])),
                    });
                }
            }
            entries.insert(host.name.clone(), entry);
        }
        for (host, record) in self.recorded(dep) {
            if entries.contains_key(&host) {
                continue;
            }
            if policy == DeletionPolicy::Delete && record.environment == env_name {
                targets.push(Target {
                    host,
                    name: record.name,
                    desired: None,
                });
            } else {
                // The VM is kept (deletionPolicy Retain): so is its name, no longer managed.
                let _ = self.store.remove_inventory(&inventory_id(dep, &host));
                self.event(
                    dep,
                    EventType::Normal,
                    "DNSRecordRetained",
                    format!(
                        "{} is kept with its retained VM and no longer managed",
                        record.name
                    ),
                );
            }
        }
        let mut retry: Option<Duration> = None;
        match self.gate(env_name) {
            Err((error, wait)) => {
                for t in &targets {
                    if let Some(e) = entries.get_mut(&t.host) {
                        e.state = "Failed".into();
                        e.message = Some(format!("{error} (next attempt in {}s)", wait.as_secs().max(1)));
                    }
                }
                retry = Some(wait);
            }
            Ok(()) if targets.is_empty() => {}
            Ok(()) => match (self.zones)(spec) {
                Err(error) => {
                    let wait = self.record_failure(env_name, &error);
                    self.metrics.result(error.metric_label());
                    self.event(dep, EventType::Warning, error.reason(), error.to_string());
                    for t in &targets {
                        if let Some(e) = entries.get_mut(&t.host) {
                            e.state = "Failed".into();
                            e.message = Some(format!("{error} (next attempt in {}s)", wait.as_secs()));
                        }
                    }
                    retry = Some(wait);
                }
                Ok(zone) => {
                    let mut failure = None;
                    for target in &targets {
                        let outcome = self
                            .sync_name(zone.as_ref(), dep, env_name, policy, target, spec.ttl)
                            .await;
                        let (state, message) = match outcome {
                            Outcome::Published => ("Published", None),
                            Outcome::Removed => continue,
                            Outcome::Foreign(why) if target.desired.is_none() => {
                                // A gone host's name that is not ours (any more): left alone, forgotten.
                                let _ = self.store.remove_inventory(&inventory_id(dep, &target.host));
                                self.event(
                                    dep,
                                    EventType::Warning,
                                    "DNSConflict",
                                    format!("{}: not removed: {why}", target.name),
                                );
                                continue;
                            }
                            Outcome::Foreign(why) => ("Conflict", Some(why)),
                            Outcome::Failed(e) => {
                                let message = e.to_string();
                                failure = Some(e);
                                ("Failed", Some(message))
                            }
                        };
                        let before = previous
                            .as_ref()
                            .and_then(|p| p.records.iter().find(|r| r.host == target.host));
                        let changed = before.is_none_or(|b| b.state != state || b.message != message);
                        if let Some(why) = &message
                            && changed
                        {
                            let reason = if state == "Conflict" {
                                "DNSConflict"
                            } else {
                                "DNSUpdateFailed"
                            };
                            self.event(dep, EventType::Warning, reason, format!("{}: {why}", target.name));
                        }
                        let entry = entries
                            .entry(target.host.clone())
                            .or_insert_with(|| DnsRecordStatus {
                                host: target.host.clone(),
                                name: target.name.clone(),
                                ..DnsRecordStatus::default()
                            });
                        entry.state = state.into();
                        entry.message = message;
                        if failure.is_some() {
                            break;
                        }
                    }
                    match failure {
                        Some(e) => {
                            let wait = self.record_failure(env_name, &e);
                            retry = Some(wait);
                            for entry in entries.values_mut().filter(|e| e.state == "Failed") {
                                if let Some(m) = entry.message.as_mut() {
                                    m.push_str(&format!(" (next attempt in {}s)", wait.as_secs()));
                                }
                            }
                        }
                        None => self.record_success(env_name),
                    }
                    // Names not tried after a failure say so.
                    for e in entries.values_mut() {
                        if e.state == "WaitingForAddress" && !e.addresses.is_empty() {
                            e.state = "Failed".into();
                            e.message = Some("not tried: the DNS server failed an earlier name".into());
                        }
                    }
                }
            },
        }

        let resolver = spec.resolver.as_ref().map(|r| (self.resolvers)(r));
        let operator = super::ready::operator_records(resolver.as_deref(), planned, &entries).await;
        let records: Vec<DnsRecordStatus> = entries.values().cloned().collect();
        let problems: Vec<String> = records
            .iter()
            .filter(|r| r.state == "Failed" || r.state == "Conflict")
            .map(|r| format!("{}: {}", r.name, r.message.clone().unwrap_or_default()))
            .collect();
        let published = problems.is_empty();
        let waiting = records.iter().filter(|r| r.state == "WaitingForAddress").count();
        report.conditions.push(ProviderCondition {
            type_: condition_types::DNS_PUBLISHED,
            status: ready(published && waiting == 0),
            reason: if published && waiting > 0 {
                "WaitingForAddress"
            } else if published {
                "Published"
            } else if records.iter().any(|r| r.state == "Conflict") {
                "DNSConflict"
            } else {
                "DNSUpdateFailed"
            },
            message: if published {
                format!(
                    "{} of {} name(s) in {} hold their host's address",
                    records.iter().filter(|r| r.state == "Published").count(),
                    records.len(),
                    spec.zone
                )
            } else {
                problems.join("; ")
            },
        });
        let (dns_ready, dns_reason, dns_message) = operator.1;
        report.conditions.push(ProviderCondition {
            type_: condition_types::DNS_READY,
            status: dns_ready,
            reason: dns_reason,
            message: dns_message.clone(),
        });
        if before.dns_ready != Some(dns_ready) {
            let type_ = if dns_ready == ConditionStatus::False {
                EventType::Warning
            } else {
                EventType::Normal
            };
            self.event(dep, type_, dns_reason, dns_message.clone());
        }

        if let Some(statuses) = report.hosts.as_mut() {
            for h in statuses.iter_mut() {
                h.dns_name = Some(host_name(&h.name, &spec.zone));
            }
        }
        let status = DnsStatus {
            zone: spec.zone.clone(),
            records,
            operator_records: operator.0,
        };
        report.dns = Some(status);
        let sooner = |a: Option<Duration>, b: Duration| Some(a.map_or(b, |a| a.min(b)));
        if !published {
            report.converged = false;
            report.message = if report.message.is_empty() {
                format!("DNS: {}", problems.join("; "))
            } else {
                format!("{}; DNS: {}", report.message, problems.join("; "))
            };
            report.retry_after = sooner(report.retry_after, retry.unwrap_or(CONFLICT_RETRY));
        } else if dns_ready == ConditionStatus::False && report.converged {
            report.converged = false;
            report.message = dns_message;
            report.retry_after = sooner(report.retry_after, DNS_READY_RETRY);
        }
    }

    /// Removes (or keeps, under `Retain`) the names of a Deployment that is gone.
    async fn cleanup_names(&self, deployment: &str) -> Result<(), ReconcileError> {
        let recorded = self.recorded(deployment);
        let mut error = None;
        for (host, record) in recorded {
            let id = inventory_id(deployment, &host);
            if record.deletion_policy == DeletionPolicy::Retain {
                let _ = self.store.remove_inventory(&id);
                tracing::info!(deployment, name = %record.name, "DNS name kept with its retained VM");
                continue;
            }
            let key = ObjectKey::new(Kind::RuntimeEnvironment, &record.environment);
            let spec = match self.desired.object(&key) {
                Some(Object::RuntimeEnvironment(env)) => env.spec.dns,
                _ => None,
            };
            let Some(spec) = spec else {
                let _ = self.store.remove_inventory(&id);
                tracing::warn!(deployment, name = %record.name, "the environment or its DNS settings are gone: the name is kept");
                continue;
            };
            if let Err((e, wait)) = self.gate(&record.environment) {
                error = Some(ReconcileError::Waiting {
                    reason: e.reason(),
                    message: format!("removing {}: {e}", record.name),
                    retry_after: wait,
                });
                continue;
            }
            let zone = match (self.zones)(&spec) {
                Ok(zone) => zone,
                Err(e) => {
                    let wait = self.record_failure(&record.environment, &e);
                    error = Some(ReconcileError::Waiting {
                        reason: e.reason(),
                        message: format!("removing {}: {e}", record.name),
                        retry_after: wait,
                    });
                    continue;
                }
            };
            let target = Target {
                host: host.clone(),
                name: record.name.clone(),
                desired: None,
            };
            match self
                .sync_name(
                    zone.as_ref(),
                    deployment,
                    &record.environment,
                    DeletionPolicy::Delete,
                    &target,
                    spec.ttl,
                )
                .await
            {
                Outcome::Removed | Outcome::Published => {}
                Outcome::Foreign(why) => {
                    // Not ours (any more): never touched, and no longer tracked.
                    let _ = self.store.remove_inventory(&id);
                    tracing::warn!(deployment, name = %record.name, "{why}");
                }
                Outcome::Failed(e) => {
                    let wait = self.record_failure(&record.environment, &e);
                    error = Some(ReconcileError::Waiting {
                        reason: e.reason(),
                        message: format!("removing {}: {e}", record.name),
                        retry_after: wait,
                    });
                }
            }
        }
        error.map_or(Ok(()), Err)
    }
}

impl Provider for DnsProvider {
    fn check_environment(
        &self,
        env: &RuntimeEnvironment,
    ) -> BoxFuture<Result<EnvironmentReport, ReconcileError>> {
        let inner = self.inner.check_environment(env);
        let (core, env) = (self.core.clone(), env.clone());
        Box::pin(async move {
            let mut report = inner.await?;
            if let Some(spec) = &env.spec.dns
                && let Some(problem) = core.probe(env.metadata.name.as_str(), spec).await
            {
                report
                    .facts
                    .get_or_insert_with(EnvironmentFacts::default)
                    .warnings
                    .push(format!("DNS: {problem}"));
            }
            Ok(report)
        })
    }

    fn converge(&self, request: ConvergeRequest<'_>) -> BoxFuture<Result<ProviderReport, ReconcileError>> {
        let inner = self.inner.converge(request);
        let (core, deployment, env, hosts, previous) = (
            self.core.clone(),
            request.deployment.clone(),
            request.env.clone(),
            request.hosts.to_vec(),
            request.previous.clone(),
        );
        Box::pin(async move {
            let mut report = inner.await?;
            if let Some(spec) = env.spec.dns.clone() {
                let request = ConvergeRequest {
                    deployment: &deployment,
                    env: &env,
                    hosts: &hosts,
                    previous: &previous,
                };
                core.publish(request, &spec, &mut report).await;
            }
            Ok(report)
        })
    }

    fn cleanup(&self, deployment: &ObjectKey) -> BoxFuture<Result<(), ReconcileError>> {
        let inner = self.inner.cleanup(deployment);
        let (core, name) = (self.core.clone(), deployment.name.to_string());
        Box::pin(async move {
            inner.await?;
            core.cleanup_names(&name).await
        })
    }
}

/// Wraps the daemon's provider with DNS names (its metrics in `registry`); `zones` replaces the
/// RFC 2136 client (the demo's in-memory zone).
pub fn with_dns(
    inner: Arc<dyn Provider>,
    installation: String,
    store: &Arc<Store>,
    desired: Arc<dyn Objects>,
    book: Arc<dyn Recorder>,
    registry: &prometheus::Registry,
    zones: Option<Arc<ZoneFactory>>,
) -> Result<Arc<dyn Provider>, prometheus::Error> {
    let metrics = DnsMetrics::register(registry)?;
    let provider = match zones {
        None => DnsProvider::new(
            inner,
            installation,
            store.clone(),
            desired.clone(),
            Some(book.clone()),
            metrics,
        ),
        Some(zones) => DnsProvider::with_clients(
            inner,
            installation,
            store.clone(),
            desired.clone(),
            Some(book.clone()),
            metrics,
            Box::new(move |spec| zones(spec)),
            Box::new(|server| Arc::new(HickoryResolver::new(server)) as Arc<dyn Resolver>),
        ),
    };
    Ok(Arc::new(provider))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(source: AddressSource, nat: &[(&str, &str)]) -> DnsSpec {
        DnsSpec {
            zone: "hosting.test".into(),
            server: crate::api::DnsServer {
                host: "127.0.0.1".into(),
                port: 53,
            },
            tsig: crate::api::TsigSpec {
                key_name: "k".into(),
                algorithm: crate::api::TsigAlgorithm::HmacSha256,
                secret_file: "/run/k".into(),
            },
            ttl: 60,
            address_source: source,
            nat: nat
                .iter()
                .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
                .collect(),
            resolver: None,
        }
    }

    #[test]
    fn a_host_behind_nat_is_published_at_its_public_address() {
        let nat = spec(AddressSource::Nat, &[("10.0.0.5", "203.0.113.5")]);
        assert_eq!(
            public_address(&nat, "10.0.0.5").unwrap().to_string(),
            "203.0.113.5"
        );
        let err = public_address(&nat, "10.0.0.6").unwrap_err();
        assert!(
            err.contains("spec.dns.nat has no public address for 10.0.0.6"),
            "{err}"
        );
        let direct = spec(AddressSource::GuestAgent, &[]);
        assert_eq!(
            public_address(&direct, "192.0.2.7").unwrap().to_string(),
            "192.0.2.7"
        );
        assert!(public_address(&direct, "host.example.org").is_err());
    }
}
