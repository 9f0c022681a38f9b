//! `fediversity run`: wires sources, desired state, the runner, reconcilers and the HTTP surface together.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use prometheus::Registry;
use tokio::sync::watch;

use crate::api::ObjectKey;
use crate::reconcile::{Context, Dispatcher, ObjectMetrics};
use crate::runtime::Trigger;
use crate::runtime::metrics::RuntimeMetrics;
use crate::runtime::queue::{QueueConfig, RateLimit};
use crate::runtime::runner::{ControllerHandle, RunOutcome, Runner, RunnerConfig};
use crate::runtime::shutdown::{ShutdownState, on_signals};
use crate::source::api::ApiSource;
use crate::source::dir::DirSource;
use crate::source::git::{GitConfig, GitSource};
use crate::source::set::{Record, SourceSet};
use crate::source::spec::{API_SOURCE, Guards, Location, SourceSpec};
use crate::source::{Baseline, Update};
use crate::state::{DesiredState, StatusBook};
use crate::store::Store;
use crate::yaml::Limits;

mod feed;
use feed::{Bridge, Feed, SourceMetrics, bridge, feed, record_id};

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The daemon's settings; every flag can also come from a `FEDIVERSITY_*` environment variable.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// A source of desired state, `[NAME=]LOCATION[?OPTIONS]`: a folder (or file) of YAML, or a git
    /// repository `git+file://…`, `git+ssh://…` or `git+https://…` with `#BRANCH`. Options, joined by
    /// `&`: `path=SUB` (a folder inside the repository), `allowEmpty`, `allowForcePush`, `interval=DUR`.
    /// Repeat (or separate with commas) for several; each is named after its folder or repository
    /// unless named explicitly.
    #[arg(
        long = "source",
        env = "FEDIVERSITY_SOURCE",
        value_delimiter = ',',
        required = true,
        value_parser = parse_source
    )]
    pub sources: Vec<SourceSpec>,
    /// How often git sources are fetched (`fediversity reconcile source NAME` fetches at once).
    #[arg(long, env = "FEDIVERSITY_POLL_INTERVAL", default_value = "1m", value_parser = crate::api::parse_duration)]
    pub poll_interval: Duration,
    /// The ssh command git uses for `ssh://` sources (identity, known hosts); `BatchMode=yes` is added.
    #[arg(long, env = "FEDIVERSITY_GIT_SSH_COMMAND", default_value = "ssh")]
    pub git_ssh_command: String,
    /// A file holding the bearer token that API writes (apply, delete) must carry; without it, writes
    /// over the API are refused.
    #[arg(long, env = "FEDIVERSITY_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
    /// Where the controller keeps its store.
    #[arg(long, env = "FEDIVERSITY_STATE_DIR", default_value = "/var/lib/fediversity")]
    pub state_dir: PathBuf,
    /// The address of the HTTP API, health checks and metrics (loopback by default).
    #[arg(long, env = "FEDIVERSITY_LISTEN", default_value = crate::http::DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Log format (the level comes from RUST_LOG, default `info`).
    #[arg(long, env = "FEDIVERSITY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Most reconciles running at once, over all kinds.
    #[arg(long, env = "FEDIVERSITY_MAX_CONCURRENT", default_value_t = 16)]
    pub max_concurrent: usize,
    /// Longest a single reconcile may run before it is cancelled and retried.
    #[arg(long, env = "FEDIVERSITY_RECONCILE_TIMEOUT", default_value = "10m", value_parser = crate::api::parse_duration)]
    pub reconcile_timeout: Duration,
    /// How often every object is reconciled without a trigger.
    #[arg(long, env = "FEDIVERSITY_RESYNC", default_value = "10m", value_parser = crate::api::parse_duration)]
    pub resync: Duration,
    /// How often the sources are fully re-read even without change events.
    #[arg(long, env = "FEDIVERSITY_RESCAN", default_value = "60s", value_parser = crate::api::parse_duration)]
    pub rescan: Duration,
    /// Most reconciles started per second over all objects (0: no limit); bursts of twice as many pass.
    #[arg(long, env = "FEDIVERSITY_MAX_RECONCILE_RATE", default_value_t = 200)]
    pub max_reconcile_rate: u32,
    /// How long running reconciles may take to finish after SIGTERM.
    #[arg(long, env = "FEDIVERSITY_SHUTDOWN_GRACE", default_value = "30s", value_parser = crate::api::parse_duration)]
    pub shutdown_grace: Duration,
    /// The infrastructure backend: `proxmox` creates VMs; `plan-only` plans hosts and touches nothing.
    #[arg(long, env = "FEDIVERSITY_PROVIDER", value_enum, default_value = "proxmox")]
    pub provider: crate::proxmox::ProviderKind,
    /// How often each owned VM's config is read to find changes made outside the controller (in the
    /// Proxmox UI, say); scans are spread over the interval. `0s` reads on every pass, within the budget
    /// of 5 config reads a second per environment.
    #[arg(long, env = "FEDIVERSITY_DRIFT_INTERVAL", default_value = "10m", value_parser = crate::api::parse_duration)]
    pub drift_interval: Duration,
    /// This controller's identity in VM owner tags (default: generated once, kept in the store, shared by
    /// the replicas of one installation).
    #[arg(long, env = "FEDIVERSITY_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// The catalog root that Applications' `nixosModule` paths are relative to (this repository's root
    /// holds `nix/`). When given, hosts are converged to their NixOS configuration: static hosts, and
    /// VMs once they have an address. Without it, hosts are only provisioned.
    #[arg(long, env = "FEDIVERSITY_NIXOS_CATALOG")]
    pub nixos_catalog: Option<PathBuf>,
    /// Where state is kept: the embedded store under --state-dir (default), or an etcd cluster
    /// `etcd://HOST:PORT,HOST:PORT[/PREFIX]` shared by several replicas, one of which leads.
    #[arg(long, env = "FEDIVERSITY_STORE")]
    pub store: Option<String>,
    /// How etcd is reached when --store names it.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// With etcd: how long the leader key outlives the leader's last renewal.
    #[arg(long, env = "FEDIVERSITY_LEADER_LEASE", default_value = "15s", value_parser = crate::api::parse_duration)]
    pub leader_lease: Duration,
    /// With etcd: the leader stops acting when it could not renew for this long (shorter than the lease).
    #[arg(long, env = "FEDIVERSITY_LEADER_RENEW_DEADLINE", default_value = "10s", value_parser = crate::api::parse_duration)]
    pub leader_renew_deadline: Duration,
    /// With etcd: how often the leader renews and the others try to take over.
    #[arg(long, env = "FEDIVERSITY_LEADER_RETRY", default_value = "2s", value_parser = crate::api::parse_duration)]
    pub leader_retry: Duration,
}

/// How etcd is reached: TLS files and a user, shared by `run` and `store copy`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EtcdArgs {
    /// etcd over TLS: the CA certificate (PEM) that signed the members' certificates.
    #[arg(long = "etcd-ca", env = "FEDIVERSITY_ETCD_CA")]
    pub ca: Option<PathBuf>,
    /// etcd over TLS: this controller's client certificate (PEM), with --etcd-key.
    #[arg(long = "etcd-cert", env = "FEDIVERSITY_ETCD_CERT")]
    pub cert: Option<PathBuf>,
    /// etcd over TLS: the client certificate's private key (PEM).
    #[arg(long = "etcd-key", env = "FEDIVERSITY_ETCD_KEY")]
    pub key: Option<PathBuf>,
    /// The etcd user (with --etcd-password-file).
    #[arg(long = "etcd-user", env = "FEDIVERSITY_ETCD_USER")]
    pub user: Option<String>,
    /// A file holding the etcd user's password.
    #[arg(long = "etcd-password-file", env = "FEDIVERSITY_ETCD_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
}

impl EtcdArgs {
    /// The etcd settings for `url` with these flags.
    pub fn config(&self, url: &str) -> anyhow::Result<crate::store::EtcdConfig> {
        let mut config = crate::store::EtcdConfig::parse(url)?;
        let EtcdArgs {
            ca,
            cert,
            key,
            user,
            password_file,
        } = self.clone();
        if ca.is_some() || cert.is_some() || key.is_some() {
            config.tls = Some(crate::store::EtcdTls { ca, cert, key });
        }
        match (user, password_file) {
            (Some(user), Some(file)) => config.user = Some((user, file)),
            (None, None) => {}
            _ => anyhow::bail!("--etcd-user and --etcd-password-file go together"),
        }
        Ok(config)
    }
}

fn parse_source(text: &str) -> Result<SourceSpec, String> {
    SourceSpec::parse(text).map_err(|e| e.message)
}

/// Reads the API token: the file's content without surrounding whitespace.
pub fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    let token = token.trim().to_owned();
    anyhow::ensure!(!token.is_empty(), "the token file {} is empty", path.display());
    Ok(token)
}

/// Sends logs at `RUST_LOG`'s level (default `info`) to `writer`, without colours when `plain`; a no-op
/// when logging is already set up (the demo logs to its own file before it starts the daemon).
pub fn init_logging<W>(format: LogFormat, writer: W, plain: bool)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let builder = if plain { builder.with_ansi(false) } else { builder };
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// What a program that runs the daemon inside itself (the demo) changes about it. The default is the
/// daemon as `fediversity run` runs it.
#[derive(Default)]
pub struct Embedding {
    /// Drives the shutdown instead of SIGTERM and SIGINT.
    pub shutdown: Option<watch::Receiver<ShutdownState>>,
    /// Receives the address the API listens on, once it does.
    pub bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
    /// How NixOS systems are built and hosts reached (SSH and `nix build` by default).
    pub nixos_transport: crate::nixos::Transport,
    /// Deadlines and poll interval of NixOS deploys, when not the defaults.
    pub nixos_timings: Option<crate::nixos::DeployTimings>,
    /// Where DNS names are kept, instead of the RFC 2136 server `spec.dns` names.
    pub dns_zones: Option<Arc<crate::dns::ZoneFactory>>,
}

/// Runs the daemon until it is stopped; returns the exit code (0 after a clean drain).
pub async fn run(args: RunArgs) -> anyhow::Result<i32> {
    run_embedded(args, Embedding::default()).await
}

/// Runs the daemon with `embedding`'s changes until it is stopped; returns the exit code.
pub async fn run_embedded(args: RunArgs, embedding: Embedding) -> anyhow::Result<i32> {
    let RunArgs {
        sources,
        poll_interval,
        git_ssh_command,
        api_token_file,
        state_dir,
        listen,
        log_format,
        max_concurrent,
        reconcile_timeout,
        resync,
        rescan,
        max_reconcile_rate,
        shutdown_grace,
        provider,
        drift_interval,
        instance_id,
        nixos_catalog,
        store: store_url,
        etcd,
        leader_lease,
        leader_renew_deadline,
        leader_retry,
    } = args;
    init_logging(log_format, std::io::stderr, false);
    let open_files = crate::http::serve::raise_open_files_limit();
    let serve_limits = crate::http::serve::ServeLimits::for_descriptors(open_files);
    // Every path flag is resolved once, against the folder the daemon starts in: git and nix run in
    // other folders, where a relative path would name something else.
    let absolute = |path: PathBuf| -> anyhow::Result<PathBuf> {
        std::path::absolute(&path).with_context(|| format!("cannot resolve the path {}", path.display()))
    };
    let state_dir = absolute(state_dir)?;
    let api_token_file = api_token_file.map(absolute).transpose()?;
    let nixos_catalog = nixos_catalog.map(absolute).transpose()?;
    let mut sources = sources;
    for spec in &mut sources {
        if let Location::Dir(path) = &mut spec.location {
            *path = absolute(std::mem::take(path))?;
        }
    }
    crate::source::spec::check_unique(&sources)?;
    let token = api_token_file.as_deref().map(read_token).transpose()?;
    let store = Arc::new(match &store_url {
        None => Store::open(&state_dir)?,
        Some(url) => {
            let config = etcd.config(url)?;
            let open = tokio::task::spawn_blocking(move || Store::open_etcd(&config));
            open.await.context("the etcd client stopped")??
        }
    });
    tracing::info!(store = %store.location(), "store opened");

    let registry = Registry::new();
    #[cfg(target_os = "linux")]
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    let runtime_metrics = RuntimeMetrics::register(&registry)?;
    let object_metrics = Arc::new(ObjectMetrics::register(&registry)?);
    let source_metrics = SourceMetrics::register(&registry)?;
    let build_info = prometheus::IntGaugeVec::new(
        prometheus::Opts::new("fediversity_build_info", "The running build."),
        &["version"],
    )?;
    registry.register(Box::new(build_info.clone()))?;
    registry.register(Box::new(store.commit_counter()))?;
    build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
    // With a shared store, replicas elect one leader; only it runs the work queue.
    let (stop_election, election_stop) = watch::channel(false);
    let (elector, leadership) = if store.etcd().is_some() {
        let identity = format!("{}-{}", crate::leader::host_name(), std::process::id());
        let (elector, leadership) = crate::leader::Elector::new(
            store.clone(),
            crate::leader::ElectionConfig {
                lease: leader_lease,
                renew_deadline: leader_renew_deadline,
                retry: leader_retry,
                identity,
            },
            &registry,
        )?;
        (Some(elector), Some(leadership))
    } else {
        (None, None)
    };

    let desired = Arc::new(DesiredState::default());
    let (book, writer) = StatusBook::load(store.clone())?;
    let writer = tokio::spawn(writer);

    let config = RunnerConfig {
        queue: QueueConfig {
            resync_period: resync,
            rate_limit: (max_reconcile_rate > 0).then(|| RateLimit {
                per_second: max_reconcile_rate,
                burst: max_reconcile_rate.saturating_mul(2),
            }),
            ..QueueConfig::default()
        },
        max_concurrent,
        reconcile_timeout,
        grace_period: shutdown_grace,
        ..RunnerConfig::default()
    };
    // Reconcilers wake other objects through the runner's handle, which exists only once the runner does.
    let handle_cell: Arc<OnceLock<ControllerHandle>> = Arc::new(OnceLock::new());
    let trigger: Trigger = {
        let cell = handle_cell.clone();
        Arc::new(move |key: &ObjectKey| {
            if let Some(handle) = cell.get() {
                handle.enqueue(key.clone());
            }
        })
    };
    let installation = crate::installation::installation_id(&store, &state_dir, instance_id.as_deref())?;
    let (vm_provider, vms) = crate::proxmox::build_provider(
        provider,
        drift_interval,
        Some(&installation),
        &state_dir,
        &store,
        desired.clone(),
        &registry,
    )?;
    let infrastructure = crate::nixos::provider::with_nixos(
        vm_provider,
        nixos_catalog.as_deref().map(|catalog| {
            let mut config = crate::nixos::DeployerConfig::new(&state_dir.join("nixos"), catalog);
            config.transport = embedding.nixos_transport.clone();
            if let Some(timings) = &embedding.nixos_timings {
                config.timings = timings.clone();
            }
            config
        }),
        &store,
        desired.clone(),
        book.clone(),
        &registry,
    )?;
    let full_provider = crate::dns::with_dns(
        infrastructure.clone(),
        installation,
        &store,
        desired.clone(),
        book.clone(),
        &registry,
        embedding.dns_zones.clone(),
    )?;
    // Migrations move data between real hosts: only where hosts are deployed over SSH.
    let migration_metrics = crate::migrate::MigrationMetrics::register(&registry)?;
    let migrations = (nixos_catalog.is_some()
        && matches!(embedding.nixos_transport, crate::nixos::Transport::Ssh))
    .then(|| {
        Arc::new(crate::migrate::service::Migrations::new(
            store.clone(),
            crate::migrate::hosts::Providers {
                hosts: infrastructure,
                names: full_provider.clone(),
                http: crate::nixos::HttpTarget::default(),
                vms,
            },
            state_dir.join("migration").join("known_hosts"),
            crate::backup::Backuper::default(),
            migration_metrics,
        ))
    });
    let ctx = Arc::new(Context {
        desired: desired.clone(),
        book: book.clone(),
        metrics: object_metrics,
        provider: full_provider,
        trigger: trigger.clone(),
        waiters: Default::default(),
        migrations: migrations.clone(),
    });
    let runner = Runner::new(Arc::new(Dispatcher::new(ctx)), config, Some(runtime_metrics));
    let handle = runner.handle();
    let _ = handle_cell.set(handle.clone());

    let shutdown = match embedding.shutdown {
        Some(shutdown) => shutdown,
        None => on_signals().context("cannot install signal handlers")?,
    };

    // Sources: the configured ones, then the API's. Each sends its snapshots to the feed.
    let (updates, updates_rx) = tokio::sync::mpsc::unbounded_channel::<Update>();
    let mut members = Vec::new();
    let mut infos = Vec::new();
    let mut baselines: Vec<Option<Baseline>> = Vec::new();
    let mut intervals: Vec<Option<Duration>> = Vec::new();
    let mut requests = std::collections::BTreeMap::new();
    let mut tasks = Vec::new();
    for (index, spec) in sources.iter().enumerate() {
        let record: Record = store.inventory(&record_id(&spec.name))?.unwrap_or_default();
        let (request_tx, request_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        requests.insert(spec.name.clone(), request_tx);
        match &spec.location {
            Location::Dir(path) => {
                baselines.push(None);
                intervals.push(Some(rescan));
                let dir = DirSource::new(vec![path.clone()], Limits::default());
                let loaded_at = dir.loaded_at();
                let (snapshots, watcher) = dir.watch(crate::source::dir::DEFAULT_DEBOUNCE, rescan);
                tasks.push(watcher);
                tasks.push(tokio::spawn(bridge(
                    Bridge {
                        index,
                        loaded_at,
                        every: rescan,
                    },
                    snapshots,
                    request_rx,
                    updates.clone(),
                )));
            }
            Location::Git { url, branch, path } => {
                let baseline: Baseline = Arc::new(std::sync::Mutex::new(record.applied_revision.clone()));
                baselines.push(Some(baseline.clone()));
                let source = GitSource::new(GitConfig {
                    name: spec.name.clone(),
                    url: url.clone(),
                    branch: branch.clone(),
                    path: path.clone(),
                    cache: state_dir.join("sources").join(&spec.name),
                    ssh_command: git_ssh_command.clone(),
                    limits: Limits::default(),
                });
                let interval = spec.interval.unwrap_or(poll_interval);
                intervals.push(Some(interval));
                tasks.push(source.run(index, interval, baseline, updates.clone(), request_rx));
            }
        }
        tracing::info!(source = %spec, "source configured");
        infos.push((spec.type_name(), spec.display_location()));
        members.push((spec.name.clone(), spec.guards, record));
    }
    let api_index = members.len();
    let (api_source, api_problems) = ApiSource::load(store.clone(), Limits::default())?;
    for problem in &api_problems {
        tracing::warn!(source = API_SOURCE, "{problem}");
    }
    let api_record: Record = store.inventory(&record_id(API_SOURCE))?.unwrap_or_default();
    // Deletes over the API are explicit: deleting the last object is not an accident.
    let api_guards = Guards {
        allow_empty: true,
        allow_force_push: false,
    };
    members.push((API_SOURCE.to_owned(), api_guards, api_record));
    infos.push(("api", "/api/v1".to_owned()));
    baselines.push(None);
    intervals.push(None);
    let _ = updates.send(Update {
        source: api_index,
        snapshot: Some(Arc::new(api_source.snapshot())),
        ..Update::default()
    });
    let set = SourceSet::new(members);

    let backup_requests = Arc::new(crate::backup::service::Requests::default());
    let api = crate::http::router(
        crate::http::ApiState {
            backups: backup_requests.clone(),
            migrations,
            desired: desired.clone(),
            book: book.clone(),
            registry: registry.clone(),
            leadership: leadership.clone(),
            trigger,
            writes: Arc::new(crate::http::Writes {
                token,
                api: tokio::sync::Mutex::new(api_source),
                api_index,
                updates: updates.clone(),
                requests,
            }),
        },
        &serve_limits,
    );
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let bound = listener.local_addr()?;
    tracing::info!(address = %bound, "serving the API, /metrics, /healthz and /readyz");
    if let Some(tx) = embedding.bound {
        let _ = tx.send(bound);
    }
    let mut http_shutdown = shutdown.clone();
    let server = tokio::spawn(async move {
        let stop = async move {
            let _ = http_shutdown.wait_for(|s| *s == ShutdownState::Aborting).await;
        };
        crate::http::serve::serve(listener, api, serve_limits, stop).await;
    });
    drop(updates);

    let feeder = tokio::spawn(feed(
        Feed {
            updates: updates_rx,
            set,
            infos,
            baselines,
            intervals,
            started: crate::api::Timestamp::now(),
            desired: desired.clone(),
            store: store.clone(),
            book: book.clone(),
            handle: handle.clone(),
            metrics: source_metrics,
        },
        shutdown.clone(),
    ));

    // Backups of real hosts: only where hosts are deployed over SSH (the simulated demo has no data).
    let backup_metrics = crate::backup::metrics::BackupMetrics::register(&registry)?;
    let ssh_hosts = matches!(embedding.nixos_transport, crate::nixos::Transport::Ssh);
    if nixos_catalog.is_some() && ssh_hosts {
        let service = crate::backup::service::BackupService::new(
            desired.clone(),
            book.clone(),
            state_dir.join("nixos"),
            backup_metrics,
            backup_requests.clone(),
        );
        tasks.push(tokio::spawn(service.run(shutdown.clone())));
    }

    let election = elector.map(|elector| tokio::spawn(elector.run(election_stop)));
    // A follower serves what its leader writes: it reads the statuses and events back now and then.
    if let Some(leadership) = &leadership {
        let (leadership, book, store) = (leadership.clone(), book.clone(), store.clone());
        let every = leader_retry.max(Duration::from_secs(1)) * 2;
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if leadership.role() == crate::leader::Role::Leader {
                    continue;
                }
                let (book, store) = (book.clone(), store.clone());
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || book.reload(&store)).await {
                    tracing::debug!(error = %e, "cannot read the leader's statuses");
                }
            }
        }));
    }
    let (outcome, lost) = match &leadership {
        None => (runner.run(shutdown.clone()).await, false),
        Some(leadership) => lead(runner, leadership, shutdown.clone(), stop_election).await,
    };
    if let Some(election) = election {
        let _ = election.await;
    }
    feeder.abort();
    for task in tasks {
        task.abort();
    }
    book.flush().await;
    drop(book);
    writer.abort();
    server.abort();
    if lost {
        tracing::error!("lost the leadership: exiting so that a fresh start follows the new leader");
        return Ok(3);
    }
    match outcome {
        RunOutcome::Drained => {
            tracing::info!("drained: every running reconcile finished; exiting");
            Ok(0)
        }
        RunOutcome::Aborted { unfinished } => {
            tracing::warn!(unfinished, "aborted with reconciles still running");
            Ok(1)
        }
    }
}

/// With several replicas: waits for leadership (or shutdown), then runs the work queue until shutdown
/// or until leadership is lost (then everything running is aborted at once). On shutdown the
/// leadership is resigned first, so that another replica takes over while this one drains; what still
/// runs here can no longer make guarded writes. Returns the outcome and whether leadership was lost.
async fn lead(
    runner: Runner,
    leadership: &crate::leader::Leadership,
    shutdown: watch::Receiver<ShutdownState>,
    stop_election: watch::Sender<bool>,
) -> (RunOutcome, bool) {
    use crate::leader::Role;
    let mut role = leadership.watch();
    let mut outer = shutdown.clone();
    tokio::select! {
        _ = role.wait_for(|r| *r == Role::Leader) => {}
        _ = outer.wait_for(|s| *s != ShutdownState::Running) => {
            let _ = stop_election.send(true);
            return (RunOutcome::Drained, false);
        }
    }
    let (tx, rx) = watch::channel(ShutdownState::Running);
    let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let relay = {
        let lost = lost.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = outer.changed() => {
                        if changed.is_err() { return }
                        let state = *outer.borrow();
                        if state != ShutdownState::Running {
                            let _ = stop_election.send(true);
                        }
                        let _ = tx.send(state);
                    }
                    changed = role.changed() => {
                        if changed.is_err() { return }
                        if *role.borrow() != Role::Leader && *outer.borrow() == ShutdownState::Running {
                            lost.store(true, std::sync::atomic::Ordering::SeqCst);
                            let _ = stop_election.send(true);
                            let _ = tx.send(ShutdownState::Aborting);
                        }
                    }
                }
            }
        })
    };
    let outcome = runner.run(rx).await;
    relay.abort();
    (outcome, lost.load(std::sync::atomic::Ordering::SeqCst))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// The daemon's flags on their own.
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    #[test]
    fn the_drift_interval_defaults_to_ten_minutes_and_takes_a_duration() {
        let parse = |extra: &[&str]| {
            let mut args = vec!["fediversity", "--source", "objects"];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args)
        };
        let default = parse(&[]).expect("the defaults parse");
        assert_eq!(
            default.run.drift_interval,
            crate::proxmox::drift::DEFAULT_DRIFT_INTERVAL
        );
        let short = parse(&["--drift-interval", "90s"]).expect("a duration parses");
        assert_eq!(short.run.drift_interval, Duration::from_secs(90));
        let every_pass = parse(&["--drift-interval", "0s"]).expect("zero parses");
        assert_eq!(every_pass.run.drift_interval, Duration::ZERO);
        let error = parse(&["--drift-interval", "soon"])
            .err()
            .expect("a word is refused");
        assert!(error.to_string().contains("drift-interval"), "{error}");
    }

    #[test]
    fn etcd_flags_give_tls_and_a_user_only_with_their_pairs() {
        let none = EtcdArgs::default().config("etcd://127.0.0.1:2379").unwrap();
        assert!(none.tls.is_none() && none.user.is_none());
        let with = EtcdArgs {
            ca: Some("ca.pem".into()),
            user: Some("fedi".into()),
            password_file: Some("pw".into()),
            ..EtcdArgs::default()
        }
        .config("etcd://127.0.0.1:2379")
        .unwrap();
        assert_eq!(with.tls.map(|t| t.ca), Some(Some(PathBuf::from("ca.pem"))));
        assert_eq!(with.user, Some(("fedi".to_owned(), PathBuf::from("pw"))));
        let half = EtcdArgs {
            user: Some("fedi".into()),
            ..EtcdArgs::default()
        }
        .config("etcd://127.0.0.1:2379")
        .unwrap_err();
        assert_eq!(
            half.to_string(),
            "--etcd-user and --etcd-password-file go together"
        );
    }
}
