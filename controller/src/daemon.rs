//! `fediversity run`: wires sources, desired state, the runner, reconcilers and the HTTP surface together.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use tokio::sync::watch;

use crate::api::{Kind, ObjectKey};
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
use crate::source::{Baseline, Fetch, Update};
use crate::state::{DesiredState, PruneBlocked, SourceStatus, StatusBook};
use crate::store::Store;
use crate::yaml::Limits;

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
    /// etcd over TLS: the CA certificate (PEM) that signed the members' certificates.
    #[arg(long, env = "FEDIVERSITY_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// etcd over TLS: this controller's client certificate (PEM), with --etcd-key.
    #[arg(long, env = "FEDIVERSITY_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,
    /// etcd over TLS: the client certificate's private key (PEM).
    #[arg(long, env = "FEDIVERSITY_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,
    /// The etcd user (with --etcd-password-file).
    #[arg(long, env = "FEDIVERSITY_ETCD_USER")]
    pub etcd_user: Option<String>,
    /// A file holding the etcd user's password.
    #[arg(long, env = "FEDIVERSITY_ETCD_PASSWORD_FILE")]
    pub etcd_password_file: Option<PathBuf>,
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

/// The etcd settings the flags name, when `--store` is an etcd URL.
pub fn etcd_config(
    url: &str,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    user: Option<String>,
    password_file: Option<PathBuf>,
) -> anyhow::Result<crate::store::EtcdConfig> {
    let mut config = crate::store::EtcdConfig::parse(url)?;
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

/// The sources' metrics: totals over every source, and series per source.
struct SourceMetrics {
    snapshots: IntCounter,
    failures: IntCounter,
    errors: IntGauge,
    objects: IntGauge,
    last_applied: IntGauge,
    info: IntGaugeVec,
    last_fetch: IntGaugeVec,
    fetch_failures: IntCounterVec,
    fetch_duration: HistogramVec,
    prune_blocked: IntGaugeVec,
    source_errors: IntGaugeVec,
    stale: IntGaugeVec,
}

impl SourceMetrics {
    fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        Ok(Self {
            snapshots: counter(
                "fediversity_source_snapshots_total",
                "Snapshots applied from the sources.",
            )?,
            failures: counter(
                "fediversity_source_failures_total",
                "Source loads that failed as a whole (nothing was pruned).",
            )?,
            errors: gauge(
                "fediversity_source_errors",
                "Problems in the last snapshot (files that do not load, invalid objects).",
            )?,
            objects: gauge("fediversity_source_objects", "Objects in the last snapshot.")?,
            last_applied: gauge(
                "fediversity_source_last_applied_timestamp_seconds",
                "When the last snapshot was applied, in seconds since the epoch.",
            )?,
            info: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "fediversity_source_info",
                        "One series per source, with its type and the revision of its newest snapshot.",
                    ),
                    &["source", "type", "revision"],
                )?,
            )?,
            last_fetch: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "fediversity_source_last_fetch_timestamp_seconds",
                        "When each source was last fetched or read successfully, in seconds since the epoch.",
                    ),
                    &["source"],
                )?,
            )?,
            fetch_failures: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "fediversity_source_fetch_failures_total",
                        "Fetches or loads of each source that failed as a whole (nothing was pruned).",
                    ),
                    &["source"],
                )?,
            )?,
            fetch_duration: register(
                registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "fediversity_source_fetch_duration_seconds",
                        "How long each fetch took.",
                    )
                    .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0]),
                    &["source"],
                )?,
            )?,
            prune_blocked: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "fediversity_source_prune_blocked",
                        "Objects of each source whose removal a prune guard holds back (empty snapshot, force-push).",
                    ),
                    &["source"],
                )?,
            )?,
            source_errors: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "fediversity_source_problems",
                        "Problems in each source's newest snapshot, duplicates across sources included.",
                    ),
                    &["source"],
                )?,
            )?,
            stale: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "fediversity_source_stale",
                        "1 when a source has not loaded successfully for more than three of its intervals.",
                    ),
                    &["source"],
                )?,
            )?,
        })
    }
}

fn register<T: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    collector: T,
) -> Result<T, prometheus::Error> {
    registry.register(Box::new(collector.clone()))?;
    Ok(collector)
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
        instance_id,
        nixos_catalog,
        store: store_url,
        etcd_ca,
        etcd_cert,
        etcd_key,
        etcd_user,
        etcd_password_file,
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
            let config = etcd_config(url, etcd_ca, etcd_cert, etcd_key, etcd_user, etcd_password_file)?;
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
    let infrastructure = crate::nixos::provider::with_nixos(
        crate::proxmox::build_provider(
            provider,
            Some(&installation),
            &state_dir,
            &store,
            desired.clone(),
            &registry,
        )?,
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

/// The store entry that remembers a source across restarts.
fn record_id(name: &str) -> String {
    format!("source:{name}")
}

/// Which directory source a bridge forwards, and how it tells the source's health.
struct Bridge {
    /// The source's index.
    index: usize,
    /// When the source last completed a scan (seconds since the epoch; 0: never).
    loaded_at: Arc<std::sync::atomic::AtomicU64>,
    /// How often the health is reported (the rescan interval).
    every: Duration,
}

/// Forwards a directory source's snapshots to the feed; a fetch request re-sends the current one (a
/// folder is watched, so it is always current). Every `every`, it also reports when the source last
/// completed a scan, so that a scan that no longer completes shows as a stale source.
async fn bridge(
    bridge: Bridge,
    mut snapshots: watch::Receiver<Arc<crate::source::Snapshot>>,
    mut requests: tokio::sync::mpsc::UnboundedReceiver<String>,
    updates: tokio::sync::mpsc::UnboundedSender<Update>,
) {
    let Bridge {
        index,
        loaded_at,
        every,
    } = bridge;
    let mut token = None;
    let mut beat = tokio::time::interval(every);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    beat.tick().await;
    let mut send_snapshot = true;
    loop {
        let update = if send_snapshot {
            let snapshot = snapshots.borrow_and_update().clone();
            let fetch = Fetch {
                at: crate::api::Timestamp::now(),
                seconds: 0.0,
                ok: snapshot.is_complete(),
            };
            Update {
                source: index,
                snapshot: Some(snapshot),
                fetch: Some(fetch),
                token: token.take(),
                done: None,
            }
        } else {
            let at = loaded_at.load(std::sync::atomic::Ordering::Relaxed);
            let complete = snapshots.borrow().is_complete();
            Update {
                source: index,
                fetch: Some(Fetch {
                    at: if at == 0 {
                        crate::api::Timestamp::now()
                    } else {
                        crate::api::Timestamp::from_unix(at)
                    },
                    seconds: 0.0,
                    ok: at != 0 && complete,
                }),
                ..Update::default()
            }
        };
        if updates.send(update).is_err() {
            return;
        }
        send_snapshot = tokio::select! {
            changed = snapshots.changed() => if changed.is_err() { return } else { true },
            request = requests.recv() => match request {
                Some(t) => { token = Some(t); true }
                None => return,
            },
            _ = beat.tick() => false,
        };
    }
}

/// What the feed works with.
struct Feed {
    updates: tokio::sync::mpsc::UnboundedReceiver<Update>,
    set: SourceSet,
    /// Each source's type and location, by index.
    infos: Vec<(&'static str, String)>,
    /// The force-push base of each git source, by index.
    baselines: Vec<Option<Baseline>>,
    /// How often each source is expected to load (none for the API's), by index.
    intervals: Vec<Option<Duration>>,
    /// When the feed started (a source that never loaded is stale counted from here).
    started: crate::api::Timestamp,
    desired: Arc<DesiredState>,
    store: Arc<Store>,
    book: Arc<StatusBook>,
    handle: ControllerHandle,
    metrics: SourceMetrics,
}

/// What the feed keeps per source between updates.
#[derive(Default, Clone)]
struct Tracked {
    last_fetch: Option<crate::api::Timestamp>,
    last_attempt: Option<crate::api::Timestamp>,
    handled: Option<String>,
    record: Option<Record>,
    info: Option<[String; 3]>,
    stale: bool,
}

/// Applies the sources' snapshots to the desired state and wakes what changed. Updates that arrive
/// together are applied together; nothing is applied before every source has loaded once.
async fn feed(mut feed: Feed, mut shutdown: watch::Receiver<ShutdownState>) {
    let mut first = true;
    // What the store already holds of each source is not written again at start.
    let mut tracked: Vec<Tracked> = feed
        .set
        .members()
        .iter()
        .map(|member| Tracked {
            record: feed.store.inventory(&record_id(&member.name)).ok().flatten(),
            ..Tracked::default()
        })
        .collect();
    for member in feed.set.members() {
        feed.metrics.fetch_failures.with_label_values(&[&member.name]);
        feed.metrics
            .prune_blocked
            .with_label_values(&[&member.name])
            .set(0);
    }
    loop {
        let next = tokio::select! {
            update = feed.updates.recv() => update,
            _ = shutdown.wait_for(|s| *s != ShutdownState::Running) => return,
        };
        let Some(update) = next else { return };
        let mut batch = vec![update];
        while let Ok(more) = feed.updates.try_recv() {
            batch.push(more);
        }
        let mut held = Vec::new();
        let mut handled = Vec::new();
        let mut done = Vec::new();
        for update in batch {
            let index = update.source;
            let Some(name) = feed.set.members().get(index).map(|m| m.name.clone()) else {
                continue;
            };
            if let Some(fetch) = update.fetch {
                tracked[index].last_attempt = Some(fetch.at);
                feed.metrics
                    .fetch_duration
                    .with_label_values(&[&name])
                    .observe(fetch.seconds);
                if fetch.ok {
                    tracked[index].last_fetch = Some(fetch.at);
                    feed.metrics
                        .last_fetch
                        .with_label_values(&[&name])
                        .set(i64::try_from(fetch.at.unix()).unwrap_or(0));
                }
            }
            if let Some(snapshot) = &update.snapshot {
                let (before, failed_before) = {
                    let member = &feed.set.members()[index];
                    (member.errors.clone(), member.failure.clone())
                };
                if let Some(failure) = &snapshot.failure {
                    feed.metrics.failures.inc();
                    feed.metrics.fetch_failures.with_label_values(&[&name]).inc();
                    if failed_before.as_ref() != Some(failure) {
                        tracing::error!(source = %name, %failure, "the source failed; keeping its objects, pruning nothing");
                    }
                } else {
                    if let Some(failure) = failed_before {
                        tracing::info!(source = %name, %failure, "the source loads again");
                    }
                    report_problems(&feed.book, &name, &before, snapshot);
                }
                let newly = feed.set.update(index, snapshot);
                if !newly.is_empty() {
                    held.push((index, newly));
                }
                if let Some(Some(baseline)) = feed.baselines.get(index) {
                    *baseline.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                        feed.set.members()[index].applied_revision.clone();
                }
            }
            if let Some(token) = update.token {
                handled.push((index, token));
            }
            done.extend(update.done);
        }
        if feed.set.is_loaded() {
            apply(&mut feed, &mut first).await;
        }
        for (index, keys) in held {
            let member = &feed.set.members()[index];
            if let Some(hold) = &member.hold {
                tracing::warn!(source = %member.name, objects = keys.len(), "{hold}");
                for key in keys {
                    feed.book.record(
                        &key,
                        crate::api::EventType::Warning,
                        "PruneBlocked",
                        format!("source `{}`: its removal is held back: {hold}", member.name),
                    );
                }
            }
        }
        for (index, token) in handled {
            tracked[index].handled = Some(token);
        }
        report(&feed, &mut tracked);
        for done in done {
            let _ = done.send(());
        }
    }
}

/// Logs each problem of a source's new snapshot once when it appears and once when it clears, and
/// records it as an event on the objects defined in the file concerned (a file that never loaded has
/// none: the log says it).
fn report_problems(
    book: &StatusBook,
    source: &str,
    before: &[crate::load::Diagnostic],
    snapshot: &crate::source::Snapshot,
) {
    use std::collections::BTreeSet;
    let old: BTreeSet<String> = before.iter().map(ToString::to_string).collect();
    let new: BTreeSet<String> = snapshot.errors.iter().map(ToString::to_string).collect();
    let objects_of = |file: &std::path::Path| -> Vec<ObjectKey> {
        snapshot
            .objects
            .iter()
            .filter(|(_, o)| o.loaded.file == file)
            .map(|(k, _)| k.clone())
            .collect()
    };
    for problem in &snapshot.errors {
        let text = problem.to_string();
        if old.contains(&text) {
            continue;
        }
        tracing::warn!(source, "source problem: {text}");
        for key in objects_of(&problem.file) {
            book.record(
                &key,
                crate::api::EventType::Warning,
                "SourceProblem",
                format!("source `{source}`: {text}"),
            );
        }
    }
    for problem in before {
        let text = problem.to_string();
        if new.contains(&text) {
            continue;
        }
        tracing::info!(source, "source problem cleared: {text}");
        for key in objects_of(&problem.file) {
            book.record(
                &key,
                crate::api::EventType::Normal,
                "SourceProblemCleared",
                format!("source `{source}`: no longer: {text}"),
            );
        }
    }
}

/// Merges the sources, applies the result, wakes what changed and remembers each source in the store.
async fn apply(feed: &mut Feed, first: &mut bool) {
    let merged = Arc::new(feed.set.merge());
    let failure = feed
        .set
        .members()
        .iter()
        .filter_map(|m| m.failure.as_ref().map(|f| format!("source `{}`: {f}", m.name)))
        .collect::<Vec<_>>();
    let failure = (!failure.is_empty()).then(|| failure.join("; "));
    let applied = {
        let (desired, store, merged) = (feed.desired.clone(), feed.store.clone(), merged.clone());
        tokio::task::spawn_blocking(move || desired.apply_merged(&merged, failure, &store)).await
    };
    let changes = match applied {
        Ok(Ok(changes)) => changes,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "failed to record generations; the snapshot is applied again on the next update");
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, "snapshot task failed");
            return;
        }
    };
    let metrics = &feed.metrics;
    metrics.snapshots.inc();
    metrics
        .errors
        .set(i64::try_from(merged.errors.len()).unwrap_or(i64::MAX));
    metrics
        .objects
        .set(i64::try_from(merged.objects.len()).unwrap_or(i64::MAX));
    metrics
        .last_applied
        .set(i64::try_from(crate::api::Timestamp::now().unix()).unwrap_or(0));
    tracing::info!(
        revision = %merged.revision,
        objects = merged.objects.len(),
        changed = changes.changed.len(),
        removed = changes.removed.len(),
        held = merged.held.len(),
        problems = merged.errors.len(),
        "snapshot applied"
    );
    for key in &changes.changed {
        feed.handle.spec_changed(key.clone());
        if key.kind != Kind::Deployment {
            for dependent in feed.desired.dependents(key) {
                feed.handle.enqueue(dependent);
            }
        }
    }
    for key in changes.removed {
        feed.handle.enqueue(key);
    }
    if *first {
        // Objects the store remembers but no source has were removed while the controller was down:
        // they go through cleanup too, except those whose removal a prune guard holds back.
        for (id, _) in feed.store.objects().unwrap_or_default() {
            if let Ok(key) = id.parse::<ObjectKey>()
                && !merged.objects.contains_key(&key)
                && !merged.held.contains(&key)
                && feed.book.status(&key).is_some()
            {
                feed.handle.enqueue(key);
            }
        }
        feed.handle.set_ready();
        *first = false;
    }
}

/// Updates each source's reported status and metrics, and its record in the store when it changed.
fn report(feed: &Feed, tracked: &mut [Tracked]) {
    let mut statuses = Vec::new();
    for (index, member) in feed.set.members().iter().enumerate() {
        let (type_, location) = feed.infos.get(index).cloned().unwrap_or(("?", String::new()));
        let errors: Vec<String> = member
            .errors
            .iter()
            .chain(&member.conflicts)
            .map(ToString::to_string)
            .collect();
        let name = member.name.as_str();
        feed.metrics
            .prune_blocked
            .with_label_values(&[name])
            .set(i64::try_from(member.held.len()).unwrap_or(i64::MAX));
        feed.metrics
            .source_errors
            .with_label_values(&[name])
            .set(i64::try_from(errors.len()).unwrap_or(i64::MAX));
        let info = [
            name.to_owned(),
            type_.to_owned(),
            member.revision.clone().unwrap_or_default(),
        ];
        let track = &mut tracked[index];
        let stale = feed.intervals.get(index).copied().flatten().and_then(|interval| {
            let since = track.last_fetch.unwrap_or(feed.started);
            let age = crate::api::Timestamp::now().unix().saturating_sub(since.unix());
            let limit = 3 * interval.as_secs().max(1);
            (age > limit).then(|| {
                format!(
                    "has not loaded successfully for {age} s, more than three of its {} s intervals; the \
                     objects in force stay, but changes are not picked up (see lastError, errors and the logs)",
                    interval.as_secs().max(1)
                )
            })
        });
        feed.metrics
            .stale
            .with_label_values(&[name])
            .set(i64::from(stale.is_some()));
        match (&stale, track.stale) {
            (Some(why), false) => tracing::warn!(source = name, "the source is stale: it {why}"),
            (None, true) => tracing::info!(source = name, "the source is no longer stale"),
            _ => {}
        }
        track.stale = stale.is_some();
        if track.info.as_ref() != Some(&info) {
            if let Some(old) = &track.info {
                let _ = feed
                    .metrics
                    .info
                    .remove_label_values(&[&old[0], &old[1], &old[2]]);
            }
            feed.metrics
                .info
                .with_label_values(&[&info[0], &info[1], &info[2]])
                .set(1);
            track.info = Some(info);
        }
        if member.loaded {
            let record = feed.set.record(index);
            if track.record.as_ref() != Some(&record) {
                match feed.store.put_inventory(&record_id(name), &record) {
                    Ok(()) => track.record = Some(record),
                    Err(e) => {
                        tracing::error!(source = name, error = %e, "cannot remember the source's state")
                    }
                }
            }
        }
        statuses.push(SourceStatus {
            name: name.to_owned(),
            type_: type_.to_owned(),
            location,
            loaded: member.loaded,
            revision: member.revision.clone(),
            applied_revision: member.applied_revision.clone(),
            last_fetch_time: track.last_fetch.map(|t| t.to_string()),
            last_attempt_time: track.last_attempt.map(|t| t.to_string()),
            last_error: member.failure.clone(),
            errors,
            objects: member.object_count(),
            prune_blocked: member.hold.as_ref().map(|hold| PruneBlocked {
                reason: hold.reason().to_owned(),
                message: hold.to_string(),
                objects: member.held.iter().map(ToString::to_string).collect(),
            }),
            last_handled_reconcile_at: track.handled.clone(),
            stale,
        });
    }
    feed.desired.set_sources(statuses);
}
