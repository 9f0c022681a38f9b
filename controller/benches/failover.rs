//! Benchmark of failover: three replicas on a real three-member etcd cluster provision VMs on the Proxmox
//! simulator; the leader is SIGKILLed again and again, and each time the time from its death to the first
//! reconcile completed by the new leader is measured (it includes the rest of the dead leader's lease).
//! Run with `cargo bench -p fediversity --bench failover` (BENCH_KILLS, default 5; BENCH_LEASE, default
//! 15s, the renew deadline and retry period scaled as 10/15 and 2/15 of it). Under `cargo test` it makes
//! a short run: two kills with a 3 s lease.

#[path = "../tests/etcd_support/mod.rs"]
mod etcd_support;
#[path = "../tests/proxmox_support/mod.rs"]
mod proxmox_support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fediversity_testbed::SimConfig;
use proxmox_support::{Folder, endpoint, free_port, http_get, sim};

struct Replica {
    child: Child,
    server: String,
    _state: tempfile::TempDir,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(source: &std::path::Path, store: &str, lease: Duration) -> Replica {
    let state = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    let child = Command::new(env!("CARGO_BIN_EXE_fediversity"))
        .args(["run", "--source"])
        .arg(source)
        .arg("--state-dir")
        .arg(state.path())
        .args(["--store", store, "--listen", &format!("127.0.0.1:{port}")])
        .args(["--leader-lease", &ms(lease)])
        .args(["--leader-renew-deadline", &ms(lease * 10 / 15)])
        .args(["--leader-retry", &ms(lease * 2 / 15)])
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    Replica {
        child,
        server: format!("127.0.0.1:{port}"),
        _state: state,
    }
}

fn is_leader(r: &Replica) -> bool {
    http_get(&r.server, "/api/v1/leader").is_some_and(|(_, body)| body.contains("\"leader\""))
}

/// Reconciles this replica completed (controller-runtime's `controller_runtime_reconcile_total`).
fn reconciles(r: &Replica) -> f64 {
    let text = http_get(&r.server, "/metrics")
        .map(|(_, b)| b)
        .unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("controller_runtime_reconcile_total{"))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let kills: usize = std::env::var("BENCH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 5 } else { 2 });
    let lease = std::env::var("BENCH_LEASE")
        .ok()
        .and_then(|v| fediversity::cli::parse_duration(&v).ok())
        .unwrap_or(Duration::from_secs(if full { 15 } else { 3 }));
    let cluster = etcd_support::EtcdCluster::start();
    let sim = sim(SimConfig::new().latency_scale(0.04).seed(1)).await;
    let folder = Folder::new(&endpoint(&sim), "");
    for i in 0..5 {
        folder.write_deployment(&format!("d{i}"), &["mastodon: {}"], "Retain", "");
    }
    let store = cluster.url("failover");
    let mut replicas: Vec<Replica> = (0..3).map(|_| spawn(folder.dir.path(), &store, lease)).collect();
    let mut times = Vec::new();
    for kill in 0..kills {
        let until = Instant::now() + lease * 3;
        let leader = loop {
            if let Some(i) = replicas.iter().position(is_leader) {
                break i;
            }
            assert!(Instant::now() < until, "no leader");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // Let it work a little, so that it holds a freshly renewed lease when it dies.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        replicas[leader].child.kill().expect("kill");
        let died = Instant::now();
        let _ = replicas[leader].child.wait();
        let took = loop {
            let next = replicas
                .iter()
                .enumerate()
                .find(|(i, r)| *i != leader && is_leader(r) && reconciles(r) > 0.0);
            if next.is_some() {
                break died.elapsed();
            }
            assert!(
                died.elapsed() < lease * 3,
                "no new leader reconciled within {:?}",
                lease * 3
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        println!("kill {kill}: the new leader's first reconcile {took:.2?} after the leader died");
        times.push(took);
        replicas[leader] = spawn(folder.dir.path(), &store, lease);
    }
    times.sort();
    println!(
        "failover over {kills} SIGKILLs, lease {lease:?}: p50 {:.2?}, max {:.2?} (goal: below the lease plus 2 s)",
        times[times.len() / 2],
        times[times.len() - 1]
    );
}
