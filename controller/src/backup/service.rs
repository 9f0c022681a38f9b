//! The daemon's backup loop: finds the Ready hosts of Deployments whose environment has `spec.backup`,
//! backs up those that are due, checks repositories periodically, and writes `status.backups`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::metrics::BackupMetrics;
use super::run::{Backuper, Repository};
use super::schedule::{self, HostClock, RoundHost};
use crate::api::{
    DataSpec, DeploymentStatus, EventType, ExportHostStatus, ExportStatus, HostBackupStatus, HostStatus,
    Kind, Object, ObjectKey, RuntimeEnvironment, Timestamp,
};
use crate::nixos::host::{SshHost, SshTarget, SshTimeouts};
use crate::runtime::shutdown::ShutdownState;
use crate::state::{DesiredState, StatusBook};

/// How often the loop looks for due hosts.
pub const TICK: Duration = Duration::from_secs(30);

/// Which on-demand request a Deployment's status says was handled.
#[derive(Debug, Clone, Copy)]
enum Handled {
    /// `status.lastHandledBackupAt`.
    Backup,
    /// `status.lastHandledRestoreAt`.
    Restore,
    /// `status.lastHandledFinalBackupAt`.
    FinalBackup,
}

/// How long the health checks may take to pass after a restore started the services.
pub const HEALTH_AFTER_RESTORE: Duration = Duration::from_secs(300);

/// How `status.restore` messages of in-place restores begin.
const IN_PLACE: &str = "in place";

/// The first 8 characters of a snapshot ID.
fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// The desired RuntimeEnvironment named `name`.
fn environment(desired: &DesiredState, name: &str) -> Option<crate::api::RuntimeEnvironment> {
    match desired
        .get(&ObjectKey::new(Kind::RuntimeEnvironment, name))
        .map(|e| e.object().clone())
    {
        Some(Object::RuntimeEnvironment(env)) => Some(env),
        _ => None,
    }
}

/// One host to consider for a backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The Deployment.
    pub deployment: String,
    /// The Application.
    pub application: String,
    /// The host (`<deployment>-<application>`).
    pub host: String,
    /// Its RuntimeEnvironment.
    pub environment: String,
    /// Where it is reached.
    pub address: String,
    /// Its SSH port.
    pub port: u16,
    /// What it carries.
    pub data: DataSpec,
    /// The Deployment's source revision (a tag of the snapshot).
    pub revision: String,
    /// The Deployment's request to start from a snapshot.
    pub restore: Option<crate::api::RestoreSpec>,
}

/// The hosts to consider (pure): Ready hosts of Deployments, not suspended, whose environment has
/// `spec.backup` and whose Application declares data.
pub fn candidates(
    desired: &DesiredState,
    status_of: impl Fn(&ObjectKey) -> Option<serde_json::Value>,
) -> Vec<Candidate> {
    let mut out = Vec::new();
    for d in desired.list(Some(Kind::Deployment)) {
        let Object::Deployment(dep) = d.object() else {
            continue;
        };
        if dep.spec.suspend {
            continue;
        }
        let env_key = ObjectKey {
            kind: Kind::RuntimeEnvironment,
            name: dep.spec.runtime_environment.clone(),
        };
        let Some(Object::RuntimeEnvironment(env)) = desired.get(&env_key).map(|e| e.object().clone()) else {
            continue;
        };
        if env.spec.backup.is_none() {
            continue;
        }
        let key = ObjectKey {
            kind: Kind::Deployment,
            name: dep.metadata.name.clone(),
        };
        let status = status_of(&key);
        // A migrating Deployment's hosts are being copied: its backups wait until it is done.
        let migrating = status
            .as_ref()
            .and_then(|s| s.pointer("/migration/phase"))
            .and_then(serde_json::Value::as_str)
            .is_some_and(|p| !matches!(p, "RetiringSource" | "Succeeded" | "Failed" | "Cancelled"));
        if migrating {
            continue;
        }
        let hosts: Vec<HostStatus> = status
            .and_then(|s| s.get("hosts").cloned())
            .and_then(|h| serde_json::from_value(h).ok())
            .unwrap_or_default();
        for (app_name, choice) in &dep.spec.applications {
            if !choice.enabled {
                continue;
            }
            let app_key = ObjectKey {
                kind: Kind::Application,
                name: app_name.clone(),
            };
            let Some(Object::Application(app)) = desired.get(&app_key).map(|a| a.object().clone()) else {
                continue;
            };
            let Some(data) = app.spec.data.clone() else {
                continue;
            };
            if data.paths.is_empty() && data.databases.is_empty() {
                continue;
            }
            let host = format!("{}-{app_name}", dep.metadata.name);
            let Some(status) = hosts.iter().find(|h| h.name == host && h.phase == "Ready") else {
                continue;
            };
            let (address, port) = match env.spec.static_hosts.iter().find(|s| s.name.as_str() == host) {
                Some(s) => (s.address.clone(), s.port),
                None => match &status.address {
                    Some(a) => (a.clone(), env.spec.ssh.port),
                    None => continue,
                },
            };
            out.push(Candidate {
                deployment: dep.metadata.name.to_string(),
                application: app_name.to_string(),
                host,
                environment: env.metadata.name.to_string(),
                address,
                port,
                data,
                revision: d.revision.clone(),
                restore: dep.spec.restore.clone(),
            });
        }
    }
    out
}

/// The host `c` as the deployer reaches it (its key pinned in `nixos_state/known_hosts/HOST`);
/// `None` until the deployer has pinned it.
fn ssh_for(nixos_state: &std::path::Path, env: &RuntimeEnvironment, c: &Candidate) -> Option<SshHost> {
    let known_hosts = nixos_state.join("known_hosts").join(&c.host);
    if !known_hosts.is_file() {
        return None;
    }
    SshHost::new(
        SshTarget {
            name: c.host.clone(),
            user: env.spec.ssh.user.clone(),
            address: c.address.clone(),
            port: c.port,
            identity_file: PathBuf::from(&env.spec.ssh.private_key_file),
            known_hosts,
        },
        SshTimeouts::default(),
    )
    .ok()
}

/// Lists the snapshots of `deployment` as its environment's repository has them, through one of its
/// Ready hosts (the repository is reached from hosts, not from the controller).
pub async fn repository_snapshots(
    desired: &DesiredState,
    book: &StatusBook,
    nixos_state: &std::path::Path,
    deployment: &str,
) -> Result<Vec<super::run::Snapshot>, String> {
    let all = candidates(desired, |k| book.status(k));
    let Some(c) = all.iter().find(|c| c.deployment == deployment) else {
        return Err(format!(
            "Deployment {deployment} has no Ready host whose environment has spec.backup"
        ));
    };
    let Some(env) = environment(desired, &c.environment) else {
        return Err(format!("RuntimeEnvironment {} not found", c.environment));
    };
    let spec = env.spec.backup.as_ref().ok_or("no spec.backup")?;
    let repo = Repository::from_spec(spec).map_err(|e| e.to_string())?;
    let shell =
        ssh_for(nixos_state, &env, c).ok_or_else(|| format!("host {} is not reachable yet", c.host))?;
    Backuper::default()
        .snapshots(&shell, &repo, None, &[format!("deployment={deployment}")])
        .await
        .map_err(|e| e.to_string())
}

/// On-demand backups asked over the API (`fediversity backup deployment NAME`).
#[derive(Default)]
pub struct Requests {
    /// The deployer's state folder, known once the loop runs.
    pub nixos_state: std::sync::OnceLock<PathBuf>,
    pending: std::sync::Mutex<BTreeMap<String, String>>,
    /// In-place restores asked for: Deployment → (token, snapshot).
    restores: std::sync::Mutex<BTreeMap<String, (String, String)>>,
    /// Final backups for an export asked for: Deployment → token.
    finals: std::sync::Mutex<BTreeMap<String, String>>,
    wake: tokio::sync::Notify,
    running: std::sync::atomic::AtomicBool,
    next: std::sync::atomic::AtomicU64,
}

impl Requests {
    /// Asks for a backup of `deployment`'s hosts now; returns the token that `status.lastHandledBackupAt`
    /// carries once it was handled.
    pub fn request(&self, deployment: &str) -> String {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let token = format!("{}-{n}", Timestamp::now());
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(deployment.to_owned(), token.clone());
        self.wake.notify_one();
        token
    }

    /// Asks for an in-place restore of `deployment`'s hosts from `snapshot` (`latest`: each host's
    /// latest; an ID: the host whose snapshot it is); returns the token that
    /// `status.lastHandledRestoreAt` carries once it was handled.
    pub fn request_restore(&self, deployment: &str, snapshot: &str) -> String {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let token = format!("{}-{n}", Timestamp::now());
        self.restores
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(deployment.to_owned(), (token.clone(), snapshot.to_owned()));
        self.wake.notify_one();
        token
    }

    /// Asks for the final backup of an export of `deployment`: each host's services stopped (and
    /// left stopped), then a backup; returns the token that `status.lastHandledFinalBackupAt` carries
    /// once it was handled, when `status.export` says what was done.
    pub fn request_final_backup(&self, deployment: &str) -> String {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let token = format!("{}-{n}", Timestamp::now());
        self.finals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(deployment.to_owned(), token.clone());
        self.wake.notify_one();
        token
    }

    fn take_finals(&self) -> BTreeMap<String, String> {
        std::mem::take(
            &mut *self
                .finals
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    fn take_restores(&self) -> BTreeMap<String, (String, String)> {
        std::mem::take(
            &mut *self
                .restores
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Whether a backup loop runs (it does only where hosts are reached over SSH).
    pub fn is_running(&self) -> bool {
        self.running.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn take(&self) -> BTreeMap<String, String> {
        std::mem::take(
            &mut *self
                .pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

/// The loop's memory: each host's status and clock, and each environment's last check.
#[derive(Default)]
struct Memory {
    hosts: BTreeMap<String, (HostBackupStatus, HostClock)>,
    checks: BTreeMap<String, u64>,
    /// Restore attempts of hosts not restored yet.
    restores: BTreeMap<String, HostClock>,
    /// Hosts asked whether an in-place restore was left unfinished.
    in_place_checked: std::collections::BTreeSet<String>,
    /// Environments whose repository is known to exist.
    repositories: std::collections::BTreeSet<String>,
}

/// The daemon's backup loop.
pub struct BackupService {
    desired: Arc<DesiredState>,
    book: Arc<StatusBook>,
    /// The deployer's state folder (its `known_hosts/HOST` files pin the hosts' keys).
    nixos_state: PathBuf,
    backuper: Backuper,
    metrics: BackupMetrics,
    requests: Arc<Requests>,
    /// How the health checks after an in-place restore reach the web server (as the deployer's do).
    http: crate::nixos::HttpTarget,
}

impl BackupService {
    /// A loop over `desired`, writing into `book`, reaching hosts with the deployer's pinned keys.
    pub fn new(
        desired: Arc<DesiredState>,
        book: Arc<StatusBook>,
        nixos_state: PathBuf,
        metrics: BackupMetrics,
        requests: Arc<Requests>,
    ) -> Self {
        Self {
            desired,
            book,
            nixos_state,
            backuper: Backuper::default(),
            metrics,
            requests,
            http: crate::nixos::HttpTarget::default(),
        }
    }

    /// The same loop, whose health checks after an in-place restore reach the web server as `http`.
    #[must_use]
    pub fn with_http(mut self, http: crate::nixos::HttpTarget) -> Self {
        self.http = http;
        self
    }

    /// Runs until shutdown.
    pub async fn run(self, mut shutdown: tokio::sync::watch::Receiver<ShutdownState>) {
        let mut memory = Memory::default();
        let _ = self.requests.nixos_state.set(self.nixos_state.clone());
        self.requests
            .running
            .store(true, std::sync::atomic::Ordering::SeqCst);
        loop {
            if *shutdown.borrow() != ShutdownState::Running {
                return;
            }
            for (deployment, (token, snapshot)) in self.requests.take_restores() {
                self.restore_in_place(&deployment, &snapshot).await;
                self.mark(&deployment, Handled::Restore, &token);
            }
            for (deployment, token) in self.requests.take_finals() {
                self.final_backup(&deployment).await;
                self.mark(&deployment, Handled::FinalBackup, &token);
            }
            let asked = self.requests.take();
            self.tick(&mut memory, &asked).await;
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = self.requests.wake.notified() => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    fn ssh(&self, env: &RuntimeEnvironment, c: &Candidate) -> Option<SshHost> {
        ssh_for(&self.nixos_state, env, c)
    }

    async fn tick(&self, memory: &mut Memory, asked: &BTreeMap<String, String>) {
        self.resume_in_place(memory).await;
        let now = Timestamp::now().unix();
        let all = candidates(&self.desired, |k| self.book.status(k));
        // Hosts that must start from a snapshot are restored first and backed up only afterwards
        // (a backup of the still empty host would otherwise become the `latest` snapshot).
        let mut ready = Vec::new();
        for c in all {
            if c.restore.is_some() && !self.restored(&c) {
                self.restore(&c, memory, now).await;
                if !self.restored(&c) {
                    continue;
                }
            }
            ready.push(c);
        }
        let all = ready;
        // Deployments asked for whose hosts none is ready still get their request answered.
        for (deployment, token) in asked {
            if !all.iter().any(|c| &c.deployment == deployment) {
                self.mark_handled(deployment, token);
            }
        }
        let mut by_env: BTreeMap<String, Vec<Candidate>> = BTreeMap::new();
        for c in all {
            by_env.entry(c.environment.clone()).or_default().push(c);
        }
        for (env_name, hosts) in by_env {
            let Some(env) = environment(&self.desired, &env_name) else {
                continue;
            };
            let Some(spec) = env.spec.backup.clone() else {
                continue;
            };
            let repo = match Repository::from_spec(&spec) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(environment = %env_name, "backups cannot run: {e}");
                    continue;
                }
            };
            let interval = spec.interval();
            for c in &hosts {
                self.metrics
                    .configured(&c.deployment, &c.host, interval.as_secs_f64(), now as f64);
                memory.hosts.entry(c.host.clone()).or_insert_with(|| {
                    let previous = self.previous_status(&c.deployment, &c.host);
                    let clock = HostClock {
                        last_success: previous.as_ref().and_then(|s| s.time).map(Timestamp::unix),
                        last_attempt: None,
                        failures: 0,
                    };
                    (previous.unwrap_or_default(), clock)
                });
            }
            let mut due: Vec<String> = {
                let entries = hosts.iter().filter_map(|c| {
                    memory
                        .hosts
                        .get(&c.host)
                        .map(|(_, clock)| (c.host.as_str(), clock, false))
                });
                schedule::due(entries, interval, now, spec.max_concurrent)
                    .into_iter()
                    .map(str::to_owned)
                    .collect()
            };
            // Asked for: due now, whatever the schedule (the round still keeps to the cap).
            for c in &hosts {
                if asked.contains_key(&c.deployment) && !due.contains(&c.host) {
                    due.push(c.host.clone());
                }
            }
            let chosen: Vec<(&Candidate, SshHost)> = hosts
                .iter()
                .filter(|c| due.contains(&c.host))
                .filter_map(|c| self.ssh(&env, c).map(|s| (c, s)))
                .collect();
            if !chosen.is_empty() {
                for (c, _) in &chosen {
                    self.book.record(
                        &ObjectKey {
                            kind: Kind::Deployment,
                            name: crate::api::Name::new(c.deployment.clone()),
                        },
                        EventType::Normal,
                        "BackingUp",
                        format!("{}: dumping databases and taking a snapshot", c.host),
                    );
                }
                let round: Vec<RoundHost<'_, SshHost>> = chosen
                    .iter()
                    .map(|(c, s)| RoundHost {
                        deployment: &c.deployment,
                        application: &c.application,
                        host: &c.host,
                        data: &c.data,
                        shell: s,
                    })
                    .collect();
                let previous: Vec<(HostBackupStatus, HostClock)> = chosen
                    .iter()
                    .map(|(c, _)| memory.hosts.get(&c.host).cloned().unwrap_or_default())
                    .collect();
                // Several hosts at once into a repository that may not exist yet: one host creates it
                // first, so that they never race two `restic init`s.
                if chosen.len() > 1 && !memory.repositories.contains(&env_name) {
                    match self.backuper.ensure_repository(&chosen[0].1, &repo).await {
                        Ok(()) => {
                            memory.repositories.insert(env_name.clone());
                        }
                        Err(e) => {
                            tracing::warn!(environment = %env_name, "cannot create or open the repository: {e}")
                        }
                    }
                }
                let revision = chosen[0].0.revision.clone();
                let results = schedule::run_round(
                    &self.backuper,
                    &repo,
                    &spec,
                    &revision,
                    &round,
                    &previous,
                    Some(&self.metrics),
                )
                .await;
                for ((c, _), result) in chosen.iter().zip(results) {
                    let key = ObjectKey {
                        kind: Kind::Deployment,
                        name: crate::api::Name::new(c.deployment.clone()),
                    };
                    let (status, _) = &result;
                    let (type_, reason) = if status.result == "Succeeded" {
                        (EventType::Normal, "BackedUp")
                    } else {
                        (EventType::Warning, "BackupFailed")
                    };
                    self.book.record(
                        &key,
                        type_,
                        reason,
                        format!(
                            "{}: {}",
                            c.host,
                            status
                                .message
                                .clone()
                                .or_else(|| status.snapshot.clone().map(|s| format!("snapshot {s}")))
                                .unwrap_or_default()
                        ),
                    );
                    memory.hosts.insert(c.host.clone(), result);
                }
            }
            if schedule::check_due(memory.checks.get(&env_name).copied(), spec.check_interval(), now)
                && let Some((_, shell)) = hosts.iter().find_map(|c| self.ssh(&env, c).map(|s| (c, s)))
            {
                match self
                    .backuper
                    .check(&shell, &repo, Some(&spec.check_read_data))
                    .await
                {
                    Ok(report) => {
                        memory.checks.insert(env_name.clone(), now);
                        if !report.ok {
                            self.metrics.check_failed(&env_name);
                            self.book.record(
                                &ObjectKey::new(Kind::RuntimeEnvironment, &env_name),
                                EventType::Warning,
                                "BackupCheckFailed",
                                format!("restic check found errors: {}", report.output),
                            );
                        }
                    }
                    Err(e) => tracing::warn!(environment = %env_name, "repository check failed: {e}"),
                }
            }
            self.write_statuses(&hosts, memory);
            for c in &hosts {
                if let Some(token) = asked.get(&c.deployment) {
                    self.mark_handled(&c.deployment, token);
                }
            }
        }
    }

    /// The final backup of an export: on each Ready host with data, the Application's services are
    /// stopped (and left stopped, so nothing is written after the snapshot), then a backup is taken;
    /// `status.export` lists each host's snapshot, the units stopped, and failures.
    async fn final_backup(&self, deployment: &str) {
        let key = ObjectKey {
            kind: Kind::Deployment,
            name: crate::api::Name::new(deployment),
        };
        let hosts: Vec<Candidate> = candidates(&self.desired, |k| self.book.status(k))
            .into_iter()
            .filter(|c| c.deployment == deployment)
            .collect();
        let mut entries = Vec::new();
        for c in &hosts {
            let outcome = self.final_backup_host(c).await;
            self.metrics
                .final_backup(if outcome.is_ok() { "Succeeded" } else { "Failed" });
            let entry = match outcome {
                Ok(report) => {
                    self.book.record(
                        &key,
                        EventType::Warning,
                        "StoppedForExport",
                        format!(
                            "{}: services stopped for the export and left stopped; final snapshot {}",
                            c.host,
                            short(&report.snapshot)
                        ),
                    );
                    ExportHostStatus {
                        host: c.host.clone(),
                        application: c.application.clone(),
                        result: "Succeeded".into(),
                        snapshot: Some(report.snapshot),
                        message: None,
                        services_stopped: c.data.services.clone(),
                    }
                }
                Err(message) => {
                    self.book.record(
                        &key,
                        EventType::Warning,
                        "FinalBackupFailed",
                        format!("{}: {message}", c.host),
                    );
                    ExportHostStatus {
                        host: c.host.clone(),
                        application: c.application.clone(),
                        result: "Failed".into(),
                        snapshot: None,
                        message: Some(message),
                        services_stopped: c.data.services.clone(),
                    }
                }
            };
            entries.push(entry);
        }
        self.update_status(&key, |status| {
            status.export = Some(ExportStatus {
                final_: true,
                time: Timestamp::now(),
                hosts: entries,
            });
        });
    }

    async fn final_backup_host(&self, c: &Candidate) -> Result<super::run::BackupReport, String> {
        let env = environment(&self.desired, &c.environment)
            .ok_or_else(|| format!("RuntimeEnvironment {} not found", c.environment))?;
        let spec = env.spec.backup.as_ref().ok_or("no spec.backup")?;
        let repo = Repository::from_spec(spec).map_err(|e| e.to_string())?;
        let shell = self
            .ssh(&env, c)
            .ok_or_else(|| "the host is not reachable yet".to_owned())?;
        let stop = super::script::stop_services(&c.data.services);
        if !stop.is_empty() {
            use super::run::Shell;
            let out = shell
                .run(
                    "stop the services",
                    &format!("set -e; {stop}true"),
                    None,
                    Duration::from_secs(300),
                )
                .await
                .map_err(|e| e.to_string())?;
            if !out.success() {
                return Err(format!(
                    "cannot stop the services: {}",
                    crate::nixos::command::tail(&out.stderr)
                ));
            }
        }
        self.backuper
            .backup(
                &shell,
                &repo,
                &super::run::BackupTarget {
                    host: &c.host,
                    deployment: &c.deployment,
                    application: &c.application,
                    revision: &c.revision,
                    data: &c.data,
                },
            )
            .await
            .map_err(|e| e.to_string())
    }

    /// Restores the Ready hosts of a running Deployment in place from `snapshot` (asked on the command
    /// line with `--confirm`): services stopped, data replaced, verified, services started, health
    /// checked; `status.restore` and the events say what happened on each host.
    async fn restore_in_place(&self, deployment: &str, snapshot: &str) {
        self.restore_hosts_in_place(deployment, snapshot, None).await;
    }

    /// Finishes the in-place restores a killed daemon left unfinished: their hosts' services are
    /// stopped and their data may be half replaced, so each is restored again from the same snapshot.
    /// The host keeps the record (see [`Backuper::mark_in_place`]); each is asked once per daemon run.
    async fn resume_in_place(&self, memory: &mut Memory) {
        for c in candidates(&self.desired, |k| self.book.status(k)) {
            if memory.in_place_checked.contains(&c.host) {
                continue;
            }
            let Some(env) = environment(&self.desired, &c.environment) else {
                continue;
            };
            let Some(shell) = self.ssh(&env, &c) else {
                continue;
            };
            let Ok(unfinished) = self.backuper.unfinished_in_place(&shell).await else {
                continue;
            };
            memory.in_place_checked.insert(c.host.clone());
            if let Some(snapshot) = unfinished {
                tracing::info!(host = %c.host, %snapshot, "finishing an in-place restore a stopped daemon left unfinished");
                self.restore_hosts_in_place(&c.deployment, &snapshot, Some(&c.host))
                    .await;
            }
        }
    }

    /// Restores in place the Ready hosts of `deployment` (only `only` when given) from `snapshot`.
    async fn restore_hosts_in_place(&self, deployment: &str, snapshot: &str, only: Option<&str>) {
        let key = ObjectKey {
            kind: Kind::Deployment,
            name: crate::api::Name::new(deployment),
        };
        let hosts: Vec<Candidate> = candidates(&self.desired, |k| self.book.status(k))
            .into_iter()
            .filter(|c| c.deployment == deployment && only.is_none_or(|h| h == c.host))
            .collect();
        if hosts.is_empty() {
            self.book.record(
                &key,
                EventType::Warning,
                "RestoreFailed",
                "no Ready host with data whose environment has spec.backup: nothing was restored".to_owned(),
            );
            return;
        }
        let mut matched = 0;
        for c in &hosts {
            let Some(env) = environment(&self.desired, &c.environment) else {
                continue;
            };
            let Some(shell) = self.ssh(&env, c) else {
                self.fail_in_place(c, snapshot, "the host is not reachable yet".into());
                continue;
            };
            let repo = match env.spec.backup.as_ref().map(Repository::from_spec) {
                Some(Ok(repo)) => repo,
                Some(Err(e)) => {
                    self.fail_in_place(c, snapshot, e.to_string());
                    continue;
                }
                None => continue,
            };
            // The snapshot: the host's latest, or the one named (which belongs to one host only).
            let list = match self
                .backuper
                .snapshots(&shell, &repo, Some(&c.host), &["fediversity".to_owned()])
                .await
            {
                Ok(list) => list,
                Err(e) => {
                    self.fail_in_place(c, snapshot, e.to_string());
                    continue;
                }
            };
            let chosen = if snapshot == "latest" {
                list.last()
            } else {
                list.iter()
                    .find(|s| s.id.starts_with(snapshot) || s.short_id == snapshot)
            };
            let Some(chosen) = chosen.cloned() else {
                if snapshot == "latest" {
                    self.fail_in_place(c, snapshot, format!("no snapshot of host {} yet", c.host));
                }
                continue;
            };
            matched += 1;
            self.book.record(
                &key,
                EventType::Warning,
                "RestoringInPlace",
                format!(
                    "{}: services stopped, data replaced with snapshot {} taken {}; what was written since is lost",
                    c.host,
                    short(&chosen.id),
                    chosen.time
                ),
            );
            // Recorded first, so that a daemon killed from here on finishes the restore after a restart.
            self.record_restore(
                c,
                crate::api::HostRestoreStatus {
                    host: c.host.clone(),
                    snapshot: chosen.id.clone(),
                    result: "Running".into(),
                    verified: false,
                    differences: Vec::new(),
                    time: Some(Timestamp::now()),
                    message: Some(format!(
                        "{IN_PLACE} from snapshot taken {}: services stopped, data being replaced",
                        chosen.time
                    )),
                },
            );
            if let Err(e) = self.backuper.mark_in_place(&shell, Some(&chosen.id)).await {
                self.fail_in_place(c, &chosen.id, e.to_string());
                continue;
            }
            let outcome = self
                .backuper
                .restore(&shell, &repo, &c.host, &chosen.id, &c.data)
                .await;
            if let Err(e) = self.backuper.mark_in_place(&shell, None).await {
                tracing::warn!(host = %c.host, "cannot clear the in-place restore record: {e}");
            }
            let report = match outcome {
                Ok(report) => report,
                Err(e) => {
                    self.fail_in_place(c, &chosen.id, e.to_string());
                    continue;
                }
            };
            let verified = report.verified();
            let health = if verified {
                Some(self.health_after_restore(&shell, c).await)
            } else {
                None
            };
            let healthy = matches!(health, Some(Ok(())));
            let message = match (&health, verified) {
                (_, false) => format!(
                    "{IN_PLACE} from snapshot taken {}: {} differences to the snapshot's manifest; services are held stopped",
                    chosen.time,
                    report.differences.len()
                ),
                (Some(Err(why)), true) => format!(
                    "{IN_PLACE} from snapshot taken {}: verified, services started, but unhealthy: {why}",
                    chosen.time
                ),
                _ => format!(
                    "{IN_PLACE} from snapshot taken {}: verified ({} files, {} rows), services started, healthy",
                    chosen.time, report.files, report.rows
                ),
            };
            let entry = crate::api::HostRestoreStatus {
                host: c.host.clone(),
                snapshot: report.snapshot.clone(),
                result: if verified && healthy { "Restored" } else { "Failed" }.into(),
                verified,
                differences: report.differences.iter().take(20).cloned().collect(),
                time: Some(Timestamp::now()),
                message: Some(message.clone()),
            };
            let (type_, reason) = if entry.result == "Restored" {
                (EventType::Normal, "Restored")
            } else {
                (EventType::Warning, "RestoreFailed")
            };
            self.book
                .record(&key, type_, reason, format!("{}: {message}", c.host));
            self.record_restore(c, entry);
        }
        if snapshot != "latest" && matched == 0 {
            self.book.record(
                &key,
                EventType::Warning,
                "RestoreFailed",
                format!("no host of Deployment {deployment} has snapshot {snapshot}: nothing was restored"),
            );
        }
    }

    /// Records a failed in-place restore of host `c`.
    fn fail_in_place(&self, c: &Candidate, snapshot: &str, message: String) {
        let key = ObjectKey {
            kind: Kind::Deployment,
            name: crate::api::Name::new(c.deployment.clone()),
        };
        self.book.record(
            &key,
            EventType::Warning,
            "RestoreFailed",
            format!("{}: in-place restore from snapshot {snapshot}: {message}", c.host),
        );
        self.record_restore(
            c,
            crate::api::HostRestoreStatus {
                host: c.host.clone(),
                snapshot: snapshot.to_owned(),
                result: "Failed".into(),
                verified: false,
                differences: Vec::new(),
                time: Some(Timestamp::now()),
                message: Some(format!("{IN_PLACE}: {message}")),
            },
        );
    }

    /// The host's health checks after a restore started its services (the deployer's checks: the
    /// ready units or the system's state, and the Application's HTTP check), retried for a while.
    async fn health_after_restore(&self, shell: &SshHost, c: &Candidate) -> Result<(), String> {
        use crate::nixos::host::{Health, HttpCheck, NixHost};
        let app_key = ObjectKey {
            kind: Kind::Application,
            name: crate::api::Name::new(c.application.clone()),
        };
        let domain = match self
            .desired
            .get(&ObjectKey {
                kind: Kind::Deployment,
                name: crate::api::Name::new(c.deployment.clone()),
            })
            .map(|d| d.object().clone())
        {
            Some(Object::Deployment(d)) => d.spec.domain.clone(),
            _ => String::new(),
        };
        let http = match self.desired.get(&app_key).map(|a| a.object().clone()) {
            Some(Object::Application(app)) => app.spec.health_check.as_ref().map(|h| HttpCheck {
                scheme: self.http.scheme.clone(),
                fqdn: format!("{}.{domain}", c.application),
                port: self.http.port,
                path: h.path.clone(),
                expect_status: h.expect_status,
            }),
            _ => None,
        };
        let deadline = tokio::time::Instant::now() + HEALTH_AFTER_RESTORE;
        loop {
            let why = match shell.health(http.as_ref()).await {
                Ok(Health::Healthy) => return Ok(()),
                Ok(Health::NotYet(why)) => why,
                Err(e) => e.to_string(),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(why);
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    fn restore_status(&self, deployment: &str) -> crate::api::RestoreStatus {
        let key = ObjectKey {
            kind: Kind::Deployment,
            name: crate::api::Name::new(deployment),
        };
        self.book
            .typed_status::<DeploymentStatus>(&key)
            .and_then(|s| s.restore)
            .unwrap_or_default()
    }

    /// Whether the host was restored (and verified) from the snapshot its Deployment asks for.
    fn restored(&self, c: &Candidate) -> bool {
        self.restore_status(&c.deployment)
            .hosts
            .iter()
            .any(|h| h.host == c.host && h.result == "Restored")
    }

    /// Restores a host from its Deployment's `spec.restore`, when its backoff allows, and records
    /// the outcome in `status.restore`.
    async fn restore(&self, c: &Candidate, memory: &mut Memory, now: u64) {
        let Some(request) = &c.restore else { return };
        let clock = memory.restores.entry(c.host.clone()).or_default();
        if schedule::next_due(clock, Duration::from_secs(3600), now) > now {
            return;
        }
        let own = ObjectKey {
            kind: Kind::RuntimeEnvironment,
            name: crate::api::Name::new(c.environment.clone()),
        };
        let from = ObjectKey {
            kind: Kind::RuntimeEnvironment,
            name: request
                .from_environment
                .clone()
                .unwrap_or_else(|| own.name.clone()),
        };
        let env_of = |key: &ObjectKey| match self.desired.get(key).map(|e| e.object().clone()) {
            Some(Object::RuntimeEnvironment(e)) => Some(e),
            _ => None,
        };
        let (Some(env), Some(source)) = (env_of(&own), env_of(&from)) else {
            return;
        };
        let Some(shell) = self.ssh(&env, c) else { return };
        // A host that records a finished restore is never restored again.
        if let Ok(Some(id)) = self.backuper.restored_from(&shell).await {
            self.record_restore(
                c,
                crate::api::HostRestoreStatus {
                    host: c.host.clone(),
                    snapshot: id,
                    result: "Restored".into(),
                    verified: true,
                    differences: Vec::new(),
                    time: Some(Timestamp::now()),
                    message: None,
                },
            );
            return;
        }
        let outcome = match source.spec.backup.as_ref() {
            None => Err(format!(
                "RuntimeEnvironment {} has no spec.backup to restore from",
                from.name
            )),
            Some(spec) => match Repository::from_spec(spec) {
                Err(e) => Err(e.to_string()),
                Ok(repo) => self
                    .backuper
                    .restore(&shell, &repo, &c.host, &request.snapshot, &c.data)
                    .await
                    .map_err(|e| e.to_string()),
            },
        };
        clock.last_attempt = Some(now);
        let entry = match outcome {
            Ok(report) => {
                let verified = report.verified();
                if verified {
                    clock.failures = 0;
                } else {
                    clock.failures += 1;
                }
                crate::api::HostRestoreStatus {
                    host: c.host.clone(),
                    snapshot: report.snapshot.clone(),
                    result: if verified { "Restored" } else { "Failed" }.into(),
                    verified,
                    differences: report.differences.iter().take(20).cloned().collect(),
                    time: Some(Timestamp::now()),
                    message: (!verified).then(|| {
                        format!(
                            "{} differences to the snapshot's manifest; services are held stopped",
                            report.differences.len()
                        )
                    }),
                }
            }
            Err(message) => {
                clock.failures += 1;
                crate::api::HostRestoreStatus {
                    host: c.host.clone(),
                    snapshot: request.snapshot.clone(),
                    result: "Failed".into(),
                    verified: false,
                    differences: Vec::new(),
                    time: Some(Timestamp::now()),
                    message: Some(message),
                }
            }
        };
        let key = ObjectKey {
            kind: Kind::Deployment,
            name: crate::api::Name::new(c.deployment.clone()),
        };
        let (type_, reason) = if entry.result == "Restored" {
            (EventType::Normal, "Restored")
        } else {
            (EventType::Warning, "RestoreFailed")
        };
        self.book.record(
            &key,
            type_,
            reason,
            format!(
                "{} from snapshot {}: {}",
                c.host,
                entry.snapshot,
                entry.message.clone().unwrap_or_else(|| "verified".into())
            ),
        );
        self.record_restore(c, entry);
    }

    /// Sets the host's entry of `status.restore`.
    fn record_restore(&self, c: &Candidate, entry: crate::api::HostRestoreStatus) {
        if entry.result != "Running" {
            self.metrics.restored(&entry.result);
        }
        let key = ObjectKey {
            kind: Kind::Deployment,
            name: crate::api::Name::new(c.deployment.clone()),
        };
        let mut restore = self.restore_status(&c.deployment);
        restore.hosts.retain(|h| h.host != c.host);
        restore.hosts.push(entry);
        self.update_status(&key, |status| status.restore = Some(restore));
    }

    /// Records in the Deployment's status that the backup asked with `token` was handled.
    fn mark_handled(&self, deployment: &str, token: &str) {
        self.mark(deployment, Handled::Backup, token);
    }

    /// Records in the Deployment's status that the request `token` of kind `handled` was handled.
    fn mark(&self, deployment: &str, handled: Handled, token: &str) {
        let key = ObjectKey {
            kind: Kind::Deployment,
            name: crate::api::Name::new(deployment),
        };
        self.update_status(&key, |status| {
            let field = match handled {
                Handled::Backup => &mut status.last_handled_backup_at,
                Handled::Restore => &mut status.last_handled_restore_at,
                Handled::FinalBackup => &mut status.last_handled_final_backup_at,
            };
            *field = Some(token.to_owned());
        });
    }

    /// Changes the Deployment's typed status with `change` and writes it (serialized once).
    fn update_status(&self, key: &ObjectKey, change: impl FnOnce(&mut DeploymentStatus)) {
        let mut status = self
            .book
            .typed_status::<DeploymentStatus>(key)
            .unwrap_or_default();
        change(&mut status);
        self.book.put_typed_status(key, &status);
    }

    fn previous_status(&self, deployment: &str, host: &str) -> Option<HostBackupStatus> {
        let key = ObjectKey {
            kind: Kind::Deployment,
            name: crate::api::Name::new(deployment),
        };
        let status = self.book.typed_status::<DeploymentStatus>(&key)?;
        status.backups.into_iter().find(|b| b.host == host)
    }

    /// Writes `status.backups` of each Deployment from memory (again whenever a reconcile wrote an
    /// older copy).
    fn write_statuses(&self, hosts: &[Candidate], memory: &Memory) {
        let mut by_deployment: BTreeMap<&str, Vec<HostBackupStatus>> = BTreeMap::new();
        for c in hosts {
            if let Some((status, _)) = memory.hosts.get(&c.host)
                && !status.result.is_empty()
            {
                by_deployment
                    .entry(c.deployment.as_str())
                    .or_default()
                    .push(status.clone());
            }
        }
        for (deployment, list) in by_deployment {
            let key = ObjectKey {
                kind: Kind::Deployment,
                name: crate::api::Name::new(deployment),
            };
            if self.book.status_json(&key).is_none() {
                continue;
            }
            self.update_status(&key, |status| status.backups = list);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::dir::DirSource;
    use crate::store::Store;
    use crate::yaml::Limits;

    const ENV: &str = "apiVersion: fediversity.eu/v1alpha1\nkind: RuntimeEnvironment\nmetadata: { name: lab }\nspec:\n  \
ssh: { privateKeyFile: /keys/id }\n  staticHosts:\n    - { name: op-app, address: 192.0.2.5, port: 2222, hostKey: \"ssh-ed25519 AAAA\" }\n  \
backup: { repository: /srv/restic, passwordFile: /keys/restic }\n";
    const APP: &str = "apiVersion: fediversity.eu/v1alpha1\nkind: Application\nmetadata: { name: app }\nspec:\n  \
displayName: App\n  nixosModule: nix/app.nix\n  sizes: { small: { cores: 1, memoryMiB: 512, diskGiB: 10 } }\n  \
data: { paths: [/var/lib/app], databases: [app] }\n";
    const NODATA: &str = "apiVersion: fediversity.eu/v1alpha1\nkind: Application\nmetadata: { name: nodata }\nspec:\n  \
displayName: No data\n  nixosModule: nix/app.nix\n  sizes: { small: { cores: 1, memoryMiB: 512, diskGiB: 10 } }\n";
    const DEP: &str = "apiVersion: fediversity.eu/v1alpha1\nkind: Deployment\nmetadata: { name: op }\nspec:\n  \
domain: op.example\n  runtimeEnvironment: lab\n  applications: { app: {}, nodata: {} }\n";

    fn desired(env: &str) -> (tempfile::TempDir, DesiredState) {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        for (name, text) in [
            ("env.yaml", env),
            ("app.yaml", APP),
            ("nodata.yaml", NODATA),
            ("dep.yaml", DEP),
        ] {
            std::fs::write(src.join(name), text).unwrap();
        }
        let snapshot = DirSource::new(vec![src], Limits::default()).scan(true);
        assert!(snapshot.errors.is_empty(), "{:?}", snapshot.errors);
        let store = Store::open(&dir.path().join("state")).unwrap();
        let desired = DesiredState::default();
        desired.apply(&snapshot, &store).unwrap();
        (dir, desired)
    }

    fn status(phase: &str) -> serde_json::Value {
        serde_json::json!({ "hosts": [
            { "name": "op-app", "phase": phase },
            { "name": "op-nodata", "phase": "Ready" },
        ]})
    }

    #[test]
    fn only_ready_hosts_with_data_in_an_environment_with_backups_are_candidates() {
        let (_dir, d) = desired(ENV);
        let found = candidates(&d, |_| Some(status("Ready")));
        assert_eq!(found.len(), 1, "{found:?}");
        let c = &found[0];
        assert_eq!(
            (
                c.host.as_str(),
                c.address.as_str(),
                c.port,
                c.environment.as_str()
            ),
            ("op-app", "192.0.2.5", 2222, "lab")
        );
        assert_eq!(c.data.databases, vec!["app".to_owned()]);
        assert!(candidates(&d, |_| Some(status("Provisioned"))).is_empty());
        let without = ENV.replace(
            "  backup: { repository: /srv/restic, passwordFile: /keys/restic }\n",
            "",
        );
        let (_dir, d) = desired(&without);
        assert!(candidates(&d, |_| Some(status("Ready"))).is_empty());
    }
}
