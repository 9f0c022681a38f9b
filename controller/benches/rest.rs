//! The daemon at rest, measured from outside as an operator would: the real binary with the plan-only
//! provider on 1,000, 10,000 and 30,000 objects (one RuntimeEnvironment, the four catalog Applications,
//! the rest Deployments). Reports, per size: reconciles per object and CPU until the queue is first
//! empty, idle CPU once converged, edit-to-`observedGeneration` latency (p50, p99), one `/metrics`
//! scrape (bytes, CPU), memory once converged and around one full list of Deployments, the reconcile
//! results, and the store's size after restarts.
//!
//! `cargo bench -p fediversity --bench rest` (sizes from `BENCH_SIZES`, default `1000,10000,30000`; a
//! quick run under `cargo test` uses 300). `FEDIVERSITY_BIN` measures another build of the binary,
//! `BENCH_RATE` sets the start rate limit (0: none), `BENCH_RESTARTS` the restarts measured (2).
//! `BENCH_STORE=etcd` (or `redb,etcd`) keeps the records in a real three-member etcd cluster started for
//! the run instead of the embedded store (a restart then shows what a no-op pass over every object costs
//! on etcd); the quick run measures both.

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fediversity::fixtures;

#[path = "../tests/etcd_support/mod.rs"]
mod etcd_support;

/// CPU time (user + system) of a process, from `/proc/PID/stat`.
fn cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime, in clock ticks of 10 ms (proc(5)).
    Duration::from_millis((tick(11) + tick(12)) * 10)
}

/// A memory figure of a process in MB (`VmRSS`: resident now, `VmHWM`: its peak), from `/proc/PID/status`.
fn memory_mb(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn get(server: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(server).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {server}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((code, body))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn dir_size(path: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
        let meta = entry.metadata();
        match meta {
            Ok(m) if m.is_dir() => total += dir_size(&entry.path()),
            Ok(m) => total += m.len(),
            Err(_) => {}
        }
    }
    total
}

/// One daemon process with its log file.
struct Daemon {
    child: Child,
    server: String,
    log: PathBuf,
}

impl Daemon {
    fn start(bin: &Path, source: &Path, state: &Path, store: Option<&str>, log: PathBuf) -> Self {
        let server = format!("127.0.0.1:{}", free_port());
        let out = std::fs::File::create(&log).expect("log file");
        let mut command = Command::new(bin);
        command.args(["run", "--provider", "plan-only"]);
        if let Some(url) = store {
            command.args(["--store", url]);
        }
        let child = command
            .arg("--source")
            .arg(source)
            .arg("--state-dir")
            .arg(state)
            .args(["--listen", &server])
            .args(["--max-reconcile-rate", &rate()])
            // Each finished reconcile is one debug line of the runner: counted, not scraped, so that
            // measuring costs the daemon nothing.
            .env("RUST_LOG", "warn,fediversity::runtime::runner=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log file"))
            .stderr(out)
            .spawn()
            .expect("the daemon starts");
        let mut daemon = Self { child, server, log };
        let started = Instant::now();
        while get(&daemon.server, "/healthz").is_none() {
            let exited = daemon.child.try_wait().ok().flatten();
            assert!(
                exited.is_none() && started.elapsed() < Duration::from_secs(120),
                "the daemon never answered; its log:\n{}",
                std::fs::read_to_string(&daemon.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Finished reconciles so far, from the log.
    fn reconciles(&self) -> usize {
        let file = std::fs::File::open(&self.log).expect("log file");
        std::io::BufReader::new(file)
            .lines()
            .map_while(Result::ok)
            .filter(|l| {
                l.contains("reconciled") || l.contains("reconcile waiting") || l.contains("reconcile failed")
            })
            .count()
    }

    /// Waits until the queue is first empty: every object reconciled and no reconcile for `quiet`.
    /// Returns the reconciles and the daemon's CPU time at the last one.
    fn wait_settled(&self, objects: usize, quiet: Duration) -> (usize, Duration, Duration) {
        let started = Instant::now();
        let (mut last_count, mut last_change, mut cpu_at_last) = (0, Instant::now(), cpu(self.pid()));
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let count = self.reconciles();
            if count != last_count {
                last_count = count;
                last_change = Instant::now();
                cpu_at_last = cpu(self.pid());
            } else if count >= objects && last_change.elapsed() >= quiet {
                return (count, cpu_at_last, last_change.duration_since(started));
            }
            assert!(
                started.elapsed() < Duration::from_secs(1800),
                "not settled within 30 minutes ({count} reconciles)"
            );
        }
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The start rate limit (`BENCH_RATE`, reconciles per second; 0 for none), default the daemon's 200.
fn rate() -> String {
    std::env::var("BENCH_RATE").unwrap_or_else(|_| "200".to_owned())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(index).copied().unwrap_or_default()
}

fn observed_generation(server: &str, name: &str) -> Option<u64> {
    let (code, body) = get(server, &format!("/api/v1/deployments/{name}"))?;
    if code != 200 {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(&body).ok()?;
    value["status"]["observedGeneration"].as_u64()
}

fn measure(bin: &Path, count: usize, quick: bool, etcd: Option<&etcd_support::EtcdCluster>) {
    let root = tempfile::tempdir().expect("temp dir");
    let source = root.path().join("objects");
    let state = root.path().join("state");
    fixtures::write_catalog_tree(&source, count, 100).expect("objects");
    let store = etcd.map(|c| c.url(&format!("rest-{count}")));
    println!(
        "--- {count} objects, start rate {}/s, store {} ---",
        rate(),
        store.as_deref().unwrap_or("embedded (redb)")
    );

    let daemon = Daemon::start(
        bin,
        &source,
        &state,
        store.as_deref(),
        root.path().join("run-1.log"),
    );
    let (reconciles, cpu_start, took) = daemon.wait_settled(count, Duration::from_secs(3));
    println!(
        "cold start: {reconciles} reconciles ({:.2} per object), queue first empty after {:.1} s, CPU until then {:.2} s",
        reconciles as f64 / count as f64,
        took.as_secs_f64(),
        cpu_start.as_secs_f64()
    );

    let idle_window = if quick {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(20)
    };
    let before = cpu(daemon.pid());
    std::thread::sleep(idle_window);
    let idle = cpu(daemon.pid()) - before;
    println!(
        "idle CPU once converged: {:.2} % of a core ({:.2} s over {} s)",
        idle.as_secs_f64() / idle_window.as_secs_f64() * 100.0,
        idle.as_secs_f64(),
        idle_window.as_secs()
    );

    let (resident, peak) = (memory_mb(daemon.pid(), "VmRSS"), memory_mb(daemon.pid(), "VmHWM"));
    let (code, body) = get(&daemon.server, "/api/v1/deployments").expect("the full list");
    assert_eq!(code, 200, "GET /api/v1/deployments");
    let items = body.matches("\"kind\":\"Deployment\"").count();
    assert_eq!(items, count - 5, "every Deployment is in the list");
    println!(
        "memory: {resident:.0} MB resident once converged (peak so far {peak:.0} MB); one full \
         GET /api/v1/deployments ({:.1} MB, {items} items): peak {:.0} MB, resident after {:.0} MB",
        body.len() as f64 / 1e6,
        memory_mb(daemon.pid(), "VmHWM"),
        memory_mb(daemon.pid(), "VmRSS")
    );
    drop(body);

    let scrapes = 5;
    let before = cpu(daemon.pid());
    let mut bytes = 0;
    let mut scrape = String::new();
    for _ in 0..scrapes {
        let (code, body) = get(&daemon.server, "/metrics").expect("a scrape");
        assert_eq!(code, 200);
        bytes = body.len();
        scrape = body;
    }
    let per_scrape = (cpu(daemon.pid()) - before) / scrapes;
    println!(
        "one /metrics scrape: {:.2} MB, {:.3} CPU-s (mean of {scrapes})",
        bytes as f64 / 1e6,
        per_scrape.as_secs_f64()
    );
    let results: Vec<&str> = scrape
        .lines()
        .filter(|l| l.starts_with("controller_runtime_reconcile_total{controller=\"deployment\""))
        .collect();
    println!("deployment results: {}", results.join(", "));

    // Edits: one Deployment's file at a time, its setting changed; latency to its observedGeneration.
    let edits = if quick { 5 } else { 30 };
    let mut latencies = Vec::new();
    for i in 0..edits {
        let name = format!("deploy-{:05}", i * 7);
        let file = source.join("single").join(format!("{name}.yaml"));
        let generation = observed_generation(&daemon.server, &name).expect("the Deployment's status");
        let edited = Instant::now();
        std::fs::write(&file, fixtures::deployment_yaml(&name, "env-0", 1000 + i as u32)).expect("edit");
        loop {
            if observed_generation(&daemon.server, &name).is_some_and(|g| g > generation) {
                latencies.push(edited.elapsed());
                break;
            }
            assert!(
                edited.elapsed() < Duration::from_secs(60),
                "edit of {name} not reconciled in 60 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    latencies.sort();
    println!(
        "edit to observedGeneration: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({edits} edits)",
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
    daemon.stop();

    let mut sizes = vec![dir_size(&state)];
    let restarts: usize = std::env::var("BENCH_RESTARTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    for restart in 2..2 + restarts {
        let daemon = Daemon::start(
            bin,
            &source,
            &state,
            store.as_deref(),
            root.path().join(format!("run-{restart}.log")),
        );
        let (reconciles, cpu_start, _) = daemon.wait_settled(count, Duration::from_secs(3));
        println!(
            "restart {}: {reconciles} reconciles, CPU until the queue is empty {:.2} s",
            restart - 1,
            cpu_start.as_secs_f64()
        );
        daemon.stop();
        sizes.push(dir_size(&state));
    }
    if store.is_some() {
        return;
    }
    println!(
        "state directory after the first run and after each restart: {}",
        sizes
            .iter()
            .map(|s| format!("{:.1} MB", *s as f64 / 1e6))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let bin = std::env::var_os("FEDIVERSITY_BIN")
        .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_fediversity")), PathBuf::from);
    let sizes: Vec<usize> = match std::env::var("BENCH_SIZES") {
        Ok(list) => list.split(',').filter_map(|s| s.trim().parse().ok()).collect(),
        Err(_) if full => vec![1_000, 10_000, 30_000],
        Err(_) => vec![300],
    };
    println!("binary: {}", bin.display());
    // The quick run under `cargo test` covers both stores; a full run measures the one asked for.
    let stores: Vec<String> = match std::env::var("BENCH_STORE") {
        Ok(list) => list.split(',').map(str::to_owned).collect(),
        Err(_) if full => vec!["redb".into()],
        Err(_) => vec!["redb".into(), "etcd".into()],
    };
    for store in stores {
        let etcd = match store.as_str() {
            "etcd" => Some(etcd_support::EtcdCluster::start()),
            "redb" => None,
            other => panic!("BENCH_STORE lists etcd or redb, not {other:?}"),
        };
        for &count in &sizes {
            measure(&bin, count, !full, etcd.as_ref());
        }
    }
}
