//! `fediversity run`: wires sources, desired state, the runner, reconcilers and the HTTP surface together.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use prometheus::{IntCounter, IntGauge, Registry};
use tokio::sync::watch;

use crate::api::{Kind, ObjectKey};
use crate::reconcile::{Context, Dispatcher, ObjectMetrics, Trigger};
use crate::runtime::metrics::RuntimeMetrics;
use crate::runtime::queue::{QueueConfig, RateLimit};
use crate::runtime::runner::{ControllerHandle, RunOutcome, Runner, RunnerConfig};
use crate::runtime::shutdown::{ShutdownState, on_signals};
use crate::source::dir::DirSource;
use crate::state::{DesiredState, StatusBook};
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
    /// A folder (or file) of desired-state YAML; repeat for several.
    #[arg(
        long = "source",
        env = "FEDIVERSITY_SOURCE",
        value_delimiter = ',',
        required = true
    )]
    pub sources: Vec<PathBuf>,
    /// Where the controller keeps its store.
    #[arg(long, env = "FEDIVERSITY_STATE_DIR", default_value = "/var/lib/fediversity")]
    pub state_dir: PathBuf,
    /// The address of the HTTP API, health checks and metrics (loopback by default).
    #[arg(long, env = "FEDIVERSITY_LISTEN", default_value = crate::cli::DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Log format (the level comes from RUST_LOG, default `info`).
    #[arg(long, env = "FEDIVERSITY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Most reconciles running at once, over all kinds.
    #[arg(long, env = "FEDIVERSITY_MAX_CONCURRENT", default_value_t = 16)]
    pub max_concurrent: usize,
    /// Longest a single reconcile may run before it is cancelled and retried.
    #[arg(long, env = "FEDIVERSITY_RECONCILE_TIMEOUT", default_value = "10m", value_parser = crate::cli::parse_duration)]
    pub reconcile_timeout: Duration,
    /// How often every object is reconciled without a trigger.
    #[arg(long, env = "FEDIVERSITY_RESYNC", default_value = "10m", value_parser = crate::cli::parse_duration)]
    pub resync: Duration,
    /// How often the sources are fully re-read even without change events.
    #[arg(long, env = "FEDIVERSITY_RESCAN", default_value = "60s", value_parser = crate::cli::parse_duration)]
    pub rescan: Duration,
    /// Most reconciles started per second over all objects (0: no limit); bursts of twice as many pass.
    #[arg(long, env = "FEDIVERSITY_MAX_RECONCILE_RATE", default_value_t = 200)]
    pub max_reconcile_rate: u32,
    /// How long running reconciles may take to finish after SIGTERM.
    #[arg(long, env = "FEDIVERSITY_SHUTDOWN_GRACE", default_value = "30s", value_parser = crate::cli::parse_duration)]
    pub shutdown_grace: Duration,
    /// The infrastructure backend: `proxmox` creates VMs; `plan-only` plans hosts and touches nothing.
    #[arg(long, env = "FEDIVERSITY_PROVIDER", value_enum, default_value = "proxmox")]
    pub provider: crate::proxmox::ProviderKind,
    /// This controller's identity in VM owner tags (default: generated once, kept in the state directory).
    #[arg(long, env = "FEDIVERSITY_INSTANCE_ID")]
    pub instance_id: Option<String>,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// The source's own metrics.
struct SourceMetrics {
    snapshots: IntCounter,
    failures: IntCounter,
    errors: IntGauge,
    objects: IntGauge,
    last_applied: IntGauge,
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
        })
    }
}

/// Runs the daemon until it is stopped; returns the exit code (0 after a clean drain).
pub async fn run(args: RunArgs) -> anyhow::Result<i32> {
    let RunArgs {
        sources,
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
    } = args;
    init_logging(log_format);
    let store = Arc::new(Store::open(&state_dir)?);
    tracing::info!(store = %store.path().display(), "store opened");

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
    build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);

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
    let ctx = Arc::new(Context {
        desired: desired.clone(),
        book: book.clone(),
        metrics: object_metrics,
        provider: crate::proxmox::build_provider(
            provider,
            instance_id.as_deref(),
            &state_dir,
            &store,
            &desired,
            &registry,
        )?,
        trigger: trigger.clone(),
    });
    let runner = Runner::new(Arc::new(Dispatcher::new(ctx)), config, Some(runtime_metrics));
    let handle = runner.handle();
    let _ = handle_cell.set(handle.clone());

    let shutdown = on_signals().context("cannot install signal handlers")?;
    let api = crate::http::router(crate::http::ApiState {
        desired: desired.clone(),
        book: book.clone(),
        registry: registry.clone(),
        trigger,
    });
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    tracing::info!(address = %listener.local_addr()?, "serving the API, /metrics, /healthz and /readyz");
    let mut http_shutdown = shutdown.clone();
    let server = tokio::spawn(async move {
        let stop = async move {
            let _ = http_shutdown.wait_for(|s| *s == ShutdownState::Aborting).await;
        };
        axum::serve(listener, api).with_graceful_shutdown(stop).await
    });

    let (snapshots, watcher) = DirSource::new(sources.clone(), Limits::default())
        .watch(crate::source::dir::DEFAULT_DEBOUNCE, rescan);
    let feeder = tokio::spawn(feed(
        snapshots,
        desired.clone(),
        store.clone(),
        book.clone(),
        handle.clone(),
        source_metrics,
        shutdown.clone(),
    ));

    let outcome = runner.run(shutdown.clone()).await;
    feeder.abort();
    watcher.abort();
    book.flush().await;
    drop(book);
    writer.abort();
    server.abort();
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

/// Applies each snapshot to the desired state and wakes what changed.
async fn feed(
    mut snapshots: watch::Receiver<Arc<crate::source::Snapshot>>,
    desired: Arc<DesiredState>,
    store: Arc<Store>,
    book: Arc<StatusBook>,
    handle: ControllerHandle,
    metrics: SourceMetrics,
    mut shutdown: watch::Receiver<ShutdownState>,
) {
    let mut first = true;
    loop {
        let snapshot = snapshots.borrow_and_update().clone();
        let applied = {
            let (desired, store, snapshot) = (desired.clone(), store.clone(), snapshot.clone());
            tokio::task::spawn_blocking(move || desired.apply(&snapshot, &store)).await
        };
        match applied {
            Ok(Ok(changes)) if snapshot.is_complete() => {
                metrics.snapshots.inc();
                metrics
                    .errors
                    .set(i64::try_from(snapshot.errors.len()).unwrap_or(i64::MAX));
                metrics
                    .objects
                    .set(i64::try_from(snapshot.objects.len()).unwrap_or(i64::MAX));
                metrics
                    .last_applied
                    .set(i64::try_from(crate::api::Timestamp::now().unix()).unwrap_or(0));
                for problem in &snapshot.errors {
                    tracing::warn!(revision = %snapshot.revision, "{problem}");
                }
                tracing::info!(
                    revision = %snapshot.revision,
                    objects = snapshot.objects.len(),
                    changed = changes.changed.len(),
                    removed = changes.removed.len(),
                    problems = snapshot.errors.len(),
                    "snapshot applied"
                );
                for key in &changes.changed {
                    handle.spec_changed(key.clone());
                    if key.kind != Kind::Deployment {
                        for dependent in desired.dependents(key) {
                            handle.enqueue(dependent);
                        }
                    }
                }
                for key in changes.removed {
                    handle.enqueue(key);
                }
                if first {
                    // Objects the store remembers but the first snapshot lacks were removed while the
                    // controller was down: they go through cleanup too.
                    let present: std::collections::HashSet<String> =
                        snapshot.objects.keys().map(ToString::to_string).collect();
                    for (id, _) in store.objects().unwrap_or_default() {
                        if let (false, Ok(key)) = (present.contains(&id), id.parse::<ObjectKey>())
                            && book.status(&key).is_some()
                        {
                            handle.enqueue(key);
                        }
                    }
                    handle.set_ready();
                    first = false;
                }
            }
            Ok(Ok(_)) => {
                metrics.failures.inc();
                tracing::error!(failure = ?snapshot.failure, "the source failed to load; keeping the previous desired state, pruning nothing");
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "failed to record generations; the snapshot will be applied again")
            }
            Err(e) => tracing::error!(error = %e, "snapshot task failed"),
        }
        tokio::select! {
            changed = snapshots.changed() => if changed.is_err() { return },
            _ = shutdown.wait_for(|s| *s != ShutdownState::Running) => return,
        }
    }
}
