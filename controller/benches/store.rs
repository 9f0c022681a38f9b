//! Benchmark of the two stores: the embedded redb store against a real three-member etcd cluster on
//! loopback. Status writes per second (batched as the status writer does, and one at a time), recording
//! 10,000 new objects (what a start does before reconciling), and the CPU of a no-op pass over them
//! (what a resync with nothing changed costs the store). Run with `cargo bench -p fediversity --bench store`;
//! under `cargo test` it makes a short run over 500 objects.

#[path = "../tests/etcd_support/mod.rs"]
mod etcd_support;

use std::time::{Duration, Instant};

use fediversity::api::{Kind, ObjectKey};
use fediversity::store::{EtcdConfig, StatusJson, Store, Write};

/// This process's CPU time (user + system) so far, from /proc (Linux; zero elsewhere).
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the command name: state, ppid, pgrp, session, tty, tpgid, flags, 4 fault counts, utime, stime.
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    let ticks = field(11) + field(12);
    Duration::from_millis(ticks * 10)
}

fn bench(name: &str, store: &Store, objects: usize) {
    let keys: Vec<ObjectKey> = (0..objects)
        .map(|i| ObjectKey::new(Kind::Deployment, &format!("site-{i:05}")))
        .collect();
    let started = Instant::now();
    store
        .observe_specs(keys.iter().map(|k| (k, format!("hash-{k}"))))
        .expect("observe");
    let record = started.elapsed();

    let (cpu_before, wall) = (cpu(), Instant::now());
    store
        .observe_specs(keys.iter().map(|k| (k, format!("hash-{k}"))))
        .expect("observe again");
    let (noop_wall, noop_cpu) = (wall.elapsed(), cpu() - cpu_before);

    let status = |i: usize, round: usize| {
        serde_json::json!({
            "observedGeneration": 1,
            "conditions": [{"type": "Ready", "status": "True", "reason": "Provisioned",
                            "message": format!("host {i} ready, round {round}")}],
        })
    };
    let started = Instant::now();
    for chunk in keys.chunks(4096) {
        let writes: Vec<Write> = chunk
            .iter()
            .enumerate()
            .map(|(i, k)| Write::Status(k.clone(), StatusJson::from_value(&status(i, 1))))
            .collect();
        store.apply(&writes).expect("apply");
    }
    let batched = objects as f64 / started.elapsed().as_secs_f64();

    let singles = 300.min(objects);
    let started = Instant::now();
    for (i, k) in keys.iter().take(singles).enumerate() {
        store.put_status(k, &status(i, 2)).expect("put");
    }
    let single = singles as f64 / started.elapsed().as_secs_f64();
    println!(
        "{name}: record {objects} new objects {record:.2?}; no-op pass over them {noop_wall:.2?} wall, \
         {noop_cpu:.2?} CPU in the controller; status writes {batched:.0}/s batched (4096 a batch), \
         {single:.0}/s one at a time"
    );
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let objects: usize = std::env::var("BENCH_OBJECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 10_000 } else { 500 });
    let dir = tempfile::tempdir().expect("temp dir");
    bench("redb", &Store::open(dir.path()).expect("redb"), objects);
    let cluster = etcd_support::EtcdCluster::start();
    let config = EtcdConfig::parse(&cluster.url("bench")).expect("url");
    bench(
        "etcd (3 members)",
        &Store::open_etcd(&config).expect("etcd"),
        objects,
    );
}
