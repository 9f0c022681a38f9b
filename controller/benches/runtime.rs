//! Benchmark of the reconcile runtime: 10,000 objects with the plan-only provider, from start to all
//! Ready. Run with `cargo bench -p fediversity --bench runtime`; prints one line per figure.
//! `BENCH_STORE=etcd` keeps the state in a three-member etcd cluster on loopback instead of redb.

#[path = "../tests/etcd_support/mod.rs"]
mod etcd_support;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use fediversity::api::{Kind, ObjectKey};
use fediversity::fixtures;
use fediversity::reconcile::{Context, Dispatcher, ObjectMetrics, PlanOnly, Trigger, is_ready};
use fediversity::runtime::queue::QueueConfig;
use fediversity::runtime::runner::{ControllerHandle, Runner, RunnerConfig};
use fediversity::runtime::{RuntimeMetrics, ShutdownState};
use fediversity::source::dir::DirSource;
use fediversity::state::{DesiredState, StatusBook};
use fediversity::store::Store;
use fediversity::yaml::Limits;

/// User plus system CPU time of this process, from `/proc/self/stat` (in clock ticks of 10 ms).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    // After the name: state, ppid, ... utime and stime are the 12th and 13th fields (proc(5)).
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    let ticks = tick(11) + tick(12);
    Duration::from_millis(ticks * 10)
}

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let count: usize = std::env::var("BENCH_OBJECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 10_000 } else { 500 });
    let rate: Option<u32> = std::env::var("BENCH_RATE").ok().and_then(|v| v.parse().ok());
    let dir = tempfile::tempdir().expect("temp dir");
    let state = tempfile::tempdir().expect("temp dir");
    fixtures::write_tree(dir.path(), count, 100).expect("objects");

    let etcd = (std::env::var("BENCH_STORE").as_deref() == Ok("etcd")).then(etcd_support::EtcdCluster::start);
    // The clock starts once etcd is up: what is measured is the controller's start, not etcd's.
    let cpu_start = cpu_time();
    let started = Instant::now();
    let store = Arc::new(match &etcd {
        None => Store::open(state.path()).expect("store"),
        Some(cluster) => {
            let config = fediversity::store::EtcdConfig::parse(&cluster.url("bench")).expect("url");
            Store::open_etcd(&config).expect("etcd store")
        }
    });
    let registry = prometheus::Registry::new();
    let desired = Arc::new(DesiredState::default());
    let (book, writer) = StatusBook::load(store.clone()).expect("book");
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
        metrics: Arc::new(ObjectMetrics::register(&registry).expect("metrics")),
        provider: Arc::new(PlanOnly),
        trigger,
        waiters: Default::default(),
        migrations: None,
    });
    let queue = QueueConfig {
        rate_limit: rate.map(|per_second| fediversity::runtime::RateLimit {
            per_second,
            burst: per_second * 2,
        }),
        ..QueueConfig::default()
    };
    let config = RunnerConfig {
        queue,
        ..RunnerConfig::default()
    };
    let runner = Runner::new(
        Arc::new(Dispatcher::new(ctx)),
        config,
        Some(RuntimeMetrics::register(&registry).expect("metrics")),
    );
    let handle = runner.handle();
    let _ = cell.set(handle.clone());
    let (stop, shutdown) = tokio::sync::watch::channel(ShutdownState::Running);
    let running = tokio::spawn(runner.run(shutdown));

    let snapshot = DirSource::new(vec![dir.path().to_path_buf()], Limits::default()).scan(true);
    let loaded = started.elapsed();
    let changes = desired.apply(&snapshot, &store).expect("apply");
    for key in changes.changed {
        handle.spec_changed(key);
    }
    handle.set_ready();
    let keys: Vec<ObjectKey> = snapshot.objects.keys().cloned().collect();
    // Poll only the keys not yet Ready, so the measuring loop costs little CPU of its own.
    let mut pending = keys.clone();
    loop {
        pending.retain(|k| !is_ready(&book, k));
        if pending.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "not converged within 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let converged = started.elapsed();
    book.flush().await;
    let cpu_converged = cpu_time() - cpu_start;
    let reconciles = registry
        .gather()
        .iter()
        .filter(|f| f.name() == "controller_runtime_reconcile_total")
        .flat_map(|f| {
            f.get_metric()
                .iter()
                .map(|m| m.get_counter().get_value())
                .collect::<Vec<_>>()
        })
        .sum::<f64>();
    let rate_text = rate.map_or("none".to_owned(), |r| format!("{r}/s"));
    println!(
        "objects: {count} ({} Deployments), start rate limit: {rate_text}",
        keys.iter().filter(|k| k.kind == Kind::Deployment).count()
    );
    println!("load and first snapshot: {:.0} ms", loaded.as_secs_f64() * 1e3);
    println!("start to all Ready: {:.2} s", converged.as_secs_f64());
    println!(
        "reconciles: {reconciles} ({:.0} per second)",
        reconciles / converged.as_secs_f64()
    );
    println!("CPU time to converge: {:.2} s", cpu_converged.as_secs_f64());
    println!(
        "peak RSS: {:.1} MiB",
        fixtures::proc_status_kib("VmHWM:") as f64 / 1024.0
    );

    let idle_from = cpu_time();
    let idle_window = if full {
        Duration::from_secs(10)
    } else {
        Duration::from_secs(1)
    };
    tokio::time::sleep(idle_window).await;
    let idle = cpu_time() - idle_from;
    println!(
        "idle CPU once converged: {:.2}% of one core over {} s",
        idle.as_secs_f64() / idle_window.as_secs_f64() * 100.0,
        idle_window.as_secs()
    );
    let _ = stop.send(ShutdownState::Draining);
    let _ = running.await;
}
