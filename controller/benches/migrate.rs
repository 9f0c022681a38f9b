//! Downtime of a migration (live pre-copy, stop, final copy of what changed, verify, start) against
//! the naive path (stop, full backup, restore onto a fresh host, start) on the same data, with 1 % of
//! the files changed between the pre-copy and the stop.
//!
//! Run: `cargo bench -p fediversity --bench migrate` (as root, with PostgreSQL 15, restic and OpenSSH);
//! it measures 100 MiB and 1 GiB. `BENCH_MIGRATE_MIB=100,1024` picks the sizes; under `cargo test` it
//! runs on 8 MiB.

#[path = "../tests/backup_support/mod.rs"]
mod backup_support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backup_support::{DataHost, Lab, shell};
use fediversity::api::DataSpec;
use fediversity::backup::{BackupTarget, Shell};
use fediversity::migrate::phase::{self, FailedTarget, RetirePolicy};
use fediversity::migrate::{AppMove, Migrator, Phase, World, WorldError, record};
use fediversity::nixos::command::Output;
use fediversity::nixos::host::{HostError, SshHost};
use fediversity::store::Store;

const FILES: usize = 2_000;

/// Writes `files` files of pseudo-random bytes, `total` in all, under `/var/lib/app/media`; every
/// `every`-th file only when `every` > 1 (the changed ones).
fn fill(host: &DataHost, files: usize, total: u64, seed: u64, every: usize) {
    let per = total / files as u64;
    let mut x = seed | 1;
    let mut buf = vec![0u8; per as usize];
    for i in (0..files).step_by(every.max(1)) {
        let dir = host.var_lib(&format!("app/media/{:02}", i % 100));
        std::fs::create_dir_all(&dir).unwrap();
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = chunk.len();
            chunk.copy_from_slice(&x.to_le_bytes()[..n]);
        }
        std::fs::write(dir.join(format!("{i:05}.bin")), &buf).unwrap();
    }
}

/// Time spent in each remote command, by phase and step, and how often it ran.
type Timings = Arc<Mutex<BTreeMap<(String, &'static str), (Duration, u32)>>>;

/// A host whose every remote command is timed under the phase the runner is in.
struct TimedShell {
    host: SshHost,
    phase: Arc<Mutex<String>>,
    timings: Timings,
}

impl Shell for TimedShell {
    fn host_name(&self) -> &str {
        self.host.host_name()
    }

    async fn run(
        &self,
        step: &'static str,
        script: &str,
        stdin: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Output, HostError> {
        let started = Instant::now();
        let out = self.host.run(step, script, stdin, timeout).await;
        let phase = self.phase.lock().unwrap().clone();
        let mut t = self.timings.lock().unwrap();
        let e = t.entry((phase, step)).or_default();
        e.0 += started.elapsed();
        e.1 += 1;
        out
    }
}

/// One source and one target; services are a marker file; names and hosts need nothing here.
struct BenchWorld {
    app: AppMove,
    source: TimedShell,
    target: TimedShell,
}

impl BenchWorld {
    async fn sh(host: &TimedShell, line: &str) -> Result<(), WorldError> {
        let out = host
            .run("bench step", line, None, Duration::from_secs(600))
            .await
            .map_err(|e| WorldError::transient(e.to_string()))?;
        if out.success() {
            Ok(())
        } else {
            Err(WorldError::fatal(out.stderr))
        }
    }
}

impl World for BenchWorld {
    type Shell = TimedShell;

    fn applications(&self) -> Vec<AppMove> {
        vec![self.app.clone()]
    }

    fn source(&self, _: &AppMove) -> Result<&TimedShell, WorldError> {
        Ok(&self.source)
    }

    fn target(&self, _: &AppMove) -> Result<&TimedShell, WorldError> {
        Ok(&self.target)
    }

    async fn provision(&self, _: &AppMove) -> Result<(), WorldError> {
        Ok(())
    }

    async fn source_services(&self, _: &AppMove, run: bool) -> Result<(), WorldError> {
        let line = if run {
            "mkdir -p /var/lib/service && touch /var/lib/service/serving"
        } else {
            "rm -f /var/lib/service/serving"
        };
        Self::sh(&self.source, line).await
    }

    async fn start_target(&self, _: &AppMove) -> Result<(), WorldError> {
        Self::sh(
            &self.target,
            "mkdir -p /var/lib/service && touch /var/lib/service/serving",
        )
        .await
    }

    async fn switch_names(&self, _: &AppMove) -> Result<(), WorldError> {
        Ok(())
    }

    async fn destroy_source(&self, _: &AppMove) -> Result<(), WorldError> {
        Ok(())
    }

    async fn remove_target(&self, _: &AppMove) -> Result<(), WorldError> {
        Ok(())
    }
}

async fn measure(mib: u64) -> (f64, f64, u64, u64) {
    let old = Lab::new();
    let new = Lab::new();
    let naive_lab = Lab::new();
    let source = old.host("op-app");
    let target = new.host("op-app");
    let fresh = naive_lab.host("op-app");
    eprintln!("{mib} MiB: preparing {FILES} files and a database…");
    fill(&source, FILES, mib * 1024 * 1024, 0x9e37_79b9_7f4a_7c15, 1);
    source.psql(
        "postgres",
        "CREATE ROLE app LOGIN; CREATE DATABASE app OWNER app;",
    );
    source.sh(&format!(
        "runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -d app -c 'SET ROLE app' -c {}",
        shell(
            "CREATE TABLE posts (id bigint PRIMARY KEY, body text); \
INSERT INTO posts SELECT i, 'post ' || md5(i::text) FROM generate_series(1, 20000) i;"
        )
    ));
    let data = DataSpec {
        paths: vec!["/var/lib/app".into()],
        databases: vec!["app".into()],
        services: vec![],
    };
    let phase_now = Arc::new(Mutex::new(String::from("Provisioning")));
    let timings: Timings = Arc::default();
    let world = BenchWorld {
        app: AppMove {
            application: "app".into(),
            host: "op-app".into(),
            data: data.clone(),
        },
        source: TimedShell {
            host: source.ssh(),
            phase: phase_now.clone(),
            timings: timings.clone(),
        },
        target: TimedShell {
            host: target.ssh(),
            phase: phase_now.clone(),
            timings: timings.clone(),
        },
    };
    let state = tempfile::tempdir().unwrap();
    let store = Store::open(state.path()).unwrap();
    let now = fediversity::migrate::run::now_ms();
    let begun = phase::begin("op", "old", "new", RetirePolicy::Retain, FailedTarget::Keep, now);
    record::save(&store, &begun).unwrap();
    let m = Migrator::new(old.backuper(), old.repo());
    while record::load(&store, "op").unwrap().unwrap().phase != Phase::StoppingSource {
        let step = m.step(&world, &store, "op").await.unwrap().unwrap();
        assert!(step.record.phase != Phase::RollingBack, "{:?}", step.record);
        *phase_now.lock().unwrap() = step.record.phase.to_string();
    }
    // 1 % of the files rewritten while the source still serves.
    fill(&source, FILES, mib * 1024 * 1024, 0x2545_f491_4f6c_dd1d, 100);
    source.psql(
        "app",
        "INSERT INTO posts SELECT i, 'late' FROM generate_series(20001, 20200) i;",
    );
    // Those writes happened while the source served: the downtime starts with the stop, now.
    let mut r = record::load(&store, "op").unwrap().unwrap();
    let now = fediversity::migrate::run::now_ms();
    (r.downtime_started_ms, r.phase_started_ms) = (Some(now), now);
    record::save(&store, &r).unwrap();
    let r = m
        .drive(&world, &store, "op", Duration::from_secs(60), |s| {
            eprintln!("  {} → {}", s.before, s.record.phase);
            *phase_now.lock().unwrap() = s.record.phase.to_string();
        })
        .await
        .unwrap();
    assert_eq!(r.phase, Phase::Succeeded, "{r:?}");
    let downtime = phase::downtime_seconds(&r, 0).unwrap();
    for p in [
        "StoppingSource",
        "FinalCopying",
        "Verifying",
        "StartingTarget",
        "SwitchingNames",
    ] {
        eprintln!(
            "  {p}: {:.1} s",
            r.durations_ms.get(p).copied().unwrap_or(0) as f64 / 1000.0
        );
        for ((phase, step), (took, runs)) in timings.lock().unwrap().iter() {
            if phase == p {
                eprintln!("    {step}: {:.2} s ({runs}×)", took.as_secs_f64());
            }
        }
    }

    eprintln!(
        "  the final backup: {}",
        source.sh("grep '\"message_type\":\"summary\"' /var/lib/fediversity-backup/backup.json | tail -n 1")
    );

    // The naive path on the same data: stop, full backup into an empty repository, restore, start.
    let started = Instant::now();
    source.sh("rm -f /var/lib/service/serving");
    let b = naive_lab.backuper();
    let repo = naive_lab.repo();
    let report = b
        .backup(
            &source.ssh(),
            &repo,
            &BackupTarget {
                host: "op-app",
                deployment: "op",
                application: "app",
                revision: "naive",
                data: &data,
            },
        )
        .await
        .unwrap();
    let restored = b
        .restore(&fresh.ssh(), &repo, "op-app", &report.snapshot, &data)
        .await
        .unwrap();
    assert!(restored.verified(), "{:?}", restored.differences);
    fresh.sh("mkdir -p /var/lib/service && touch /var/lib/service/serving");
    let naive = started.elapsed().as_secs_f64();
    eprintln!("  {mib} MiB: downtime {downtime:.1} s, naive {naive:.1} s");
    (downtime, naive, r.bytes_pre_copied, r.bytes_finally_copied)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let sizes: Vec<u64> = std::env::var("BENCH_MIGRATE_MIB")
        .unwrap_or_else(|_| if full { "100,1024" } else { "8" }.into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let mut rows = Vec::new();
    for mib in sizes {
        rows.push((mib, measure(mib).await));
    }
    println!(
        "| data | pre-copied | finally copied | migration downtime | naive stop-backup-restore-start | ratio |"
    );
    println!("|---|---|---|---|---|---|");
    for (mib, (downtime, naive, pre, last)) in rows {
        println!(
            "| {mib} MiB, {FILES} files, 1 % changed | {} MiB | {:.1} MiB | {downtime:.1} s | {naive:.1} s | {:.1}× |",
            pre >> 20,
            last as f64 / 1048576.0,
            naive / downtime
        );
    }
}
