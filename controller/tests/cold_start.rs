//! A cold start reconciles each object once, and a Deployment waiting on a missing object is woken the
//! moment that object turns Ready (not at its next retry).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use fediversity::api::{Kind, ObjectKey};
use fediversity::fixtures;
use fediversity::reconcile::{Context, Dispatcher, ObjectMetrics, PlanOnly, Trigger, is_ready};
use fediversity::runtime::runner::{ControllerHandle, Runner, RunnerConfig};
use fediversity::runtime::{RuntimeMetrics, ShutdownState};
use fediversity::source::dir::DirSource;
use fediversity::state::{DesiredState, StatusBook};
use fediversity::store::Store;
use fediversity::yaml::Limits;

/// The reconcile runtime with the plan-only provider, fed from one folder.
struct Harness {
    registry: prometheus::Registry,
    desired: Arc<DesiredState>,
    book: Arc<StatusBook>,
    store: Arc<Store>,
    handle: ControllerHandle,
    _state: tempfile::TempDir,
    _stop: tokio::sync::watch::Sender<ShutdownState>,
}

impl Harness {
    fn start() -> Self {
        let state = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(state.path()).unwrap());
        let registry = prometheus::Registry::new();
        let desired = Arc::new(DesiredState::default());
        let (book, writer) = StatusBook::load(store.clone()).unwrap();
        tokio::spawn(writer);
        let cell: Arc<OnceLock<ControllerHandle>> = Arc::new(OnceLock::new());
        let trigger: Trigger = {
            let cell = cell.clone();
            Arc::new(move |key: &ObjectKey| {
                if let Some(h) = cell.get() {
                    h.enqueue(key.clone());
                }
            })
        };
        let ctx = Arc::new(Context {
            desired: desired.clone(),
            book: book.clone(),
            metrics: Arc::new(ObjectMetrics::register(&registry).unwrap()),
            provider: Arc::new(PlanOnly),
            trigger,
            waiters: Default::default(),
            migrations: None,
        });
        let runner = Runner::new(
            Arc::new(Dispatcher::new(ctx)),
            // No start rate limit: as many reconciles at once as the runner allows, the hardest case
            // for dependencies to be Ready before their dependents run.
            RunnerConfig {
                queue: fediversity::runtime::queue::QueueConfig {
                    rate_limit: None,
                    ..Default::default()
                },
                ..RunnerConfig::default()
            },
            Some(RuntimeMetrics::register(&registry).unwrap()),
        );
        let handle = runner.handle();
        let _ = cell.set(handle.clone());
        let (stop, shutdown) = tokio::sync::watch::channel(ShutdownState::Running);
        tokio::spawn(runner.run(shutdown));
        Self {
            registry,
            desired,
            book,
            store,
            handle,
            _state: state,
            _stop: stop,
        }
    }

    /// Loads the folder as the daemon's feed does: changed specs are queued.
    fn load(&self, dir: &std::path::Path) -> Vec<ObjectKey> {
        let snapshot = DirSource::new(vec![dir.to_path_buf()], Limits::default()).scan(true);
        assert!(snapshot.errors.is_empty(), "{:?}", snapshot.errors);
        let changes = self.desired.apply(&snapshot, &self.store).unwrap();
        // Deployments first, their dependencies last: the worst order a feed can bring them in.
        let mut changed = changes.changed;
        changed.sort_by_key(|k| std::cmp::Reverse(k.kind));
        for key in changed {
            self.handle.spec_changed(key);
        }
        self.handle.set_ready();
        snapshot.objects.keys().cloned().collect()
    }

    async fn wait_ready(&self, keys: &[ObjectKey], within: Duration) {
        let started = Instant::now();
        let mut pending = keys.to_vec();
        while !pending.is_empty() {
            pending.retain(|k| !is_ready(&self.book, k));
            assert!(
                started.elapsed() < within,
                "{} objects not Ready within {within:?}, e.g. {:?}",
                pending.len(),
                pending.first()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `controller_runtime_reconcile_total` summed over results, for one kind's controller.
    fn reconciles(&self, controller: &str) -> f64 {
        self.registry
            .gather()
            .iter()
            .filter(|f| f.name() == "controller_runtime_reconcile_total")
            .flat_map(|f| f.get_metric().iter())
            .filter(|m| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == "controller" && l.value() == controller)
            })
            .map(|m| m.get_counter().get_value())
            .sum()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_reconciles_every_deployment_once() {
    let dir = tempfile::tempdir().unwrap();
    fixtures::write_catalog_tree(dir.path(), 1_005, 50).unwrap();
    let h = Harness::start();
    let keys = h.load(dir.path());
    assert_eq!(keys.len(), 1_005);
    h.wait_ready(&keys, Duration::from_secs(60)).await;
    // Let any wake-up that was going to come arrive and run.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        h.reconciles("runtimeenvironment"),
        1.0,
        "reconciles of the RuntimeEnvironment"
    );
    assert_eq!(
        h.reconciles("application"),
        4.0,
        "reconciles of the 4 Applications"
    );
    let deployments = h.reconciles("deployment");
    // The few Deployments started alongside the RuntimeEnvironment, before it was Ready, wait and are
    // woken once; every other Deployment is reconciled exactly once (before: twice each).
    assert!(
        (1_000.0..=1_016.0).contains(&deployments),
        "reconciles of 1,000 Deployments on a cold start: {deployments}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_waiting_on_a_missing_environment_is_woken_when_it_turns_ready() {
    let dir = tempfile::tempdir().unwrap();
    fixtures::write_catalog_tree(dir.path(), 25, 10).unwrap();
    let environment = dir.path().join("environment.yaml");
    let text = std::fs::read_to_string(&environment).unwrap();
    std::fs::remove_file(&environment).unwrap();
    let h = Harness::start();
    let deployments: Vec<ObjectKey> = h
        .load(dir.path())
        .into_iter()
        .filter(|k| k.kind == Kind::Deployment)
        .collect();
    assert_eq!(deployments.len(), 20);
    // Every Deployment ran once and now waits (its retry is 30 s away).
    let started = Instant::now();
    while h.reconciles("deployment") < 20.0 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "Deployments not reconciled"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(deployments.iter().all(|k| !is_ready(&h.book, k)));
    std::fs::write(&environment, text).unwrap();
    let appeared = Instant::now();
    h.load(dir.path());
    h.wait_ready(&deployments, Duration::from_secs(10)).await;
    assert!(
        appeared.elapsed() < Duration::from_secs(10),
        "woken by the environment, long before the 30 s retry"
    );
    assert_eq!(
        h.reconciles("deployment"),
        40.0,
        "one wait and one converging run each"
    );
}
