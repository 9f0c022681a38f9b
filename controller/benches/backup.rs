//! Backup and restore of 1 GiB in 10,000 files plus a database of a million rows, with restic over
//! sftp (the controller's path), against `tar | zstd` and `pg_dump`/`pg_restore` alone on the same
//! data; then an incremental backup after 1 % of the files changed.
//!
//! Run: `cargo bench -p fediversity --bench backup` (as root, with PostgreSQL 15, restic and OpenSSH).
//! `BENCH_BACKUP_MIB` and `BENCH_BACKUP_ROWS` shrink it for a quick look; under `cargo test` it runs on
//! 8 MiB and 10,000 rows.

#[path = "../tests/backup_support/mod.rs"]
mod backup_support;

use std::time::{Duration, Instant};

use backup_support::{DataHost, Lab, shell};
use fediversity::api::DataSpec;
use fediversity::backup::BackupTarget;

const FILES: usize = 10_000;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Fills `/var/lib/app/media` of `host` with `files` files of pseudo-random (incompressible) bytes,
/// `total` bytes in all, in 100 folders.
fn fill(host: &DataHost, files: usize, total: u64, seed: u64) {
    let per = total / files as u64;
    let mut x = seed | 1;
    let mut buf = vec![0u8; per as usize];
    for i in 0..files {
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

fn timed(what: &str, line: &str, host: &DataHost) -> Duration {
    let started = Instant::now();
    host.sh(line);
    let took = started.elapsed();
    eprintln!("  {what}: {:.1} s", took.as_secs_f64());
    took
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // Under `cargo test` (no `--bench`) a small run checks that the benchmark still works.
    let full = std::env::args().any(|a| a == "--bench");
    let mib = env_or("BENCH_BACKUP_MIB", if full { 1024 } else { 8 });
    let rows = env_or("BENCH_BACKUP_ROWS", if full { 1_000_000 } else { 10_000 });
    let lab = Lab::new();
    let (a, b) = (lab.host("op-app"), lab.host("fresh"));
    eprintln!("preparing {mib} MiB in {FILES} files and {rows} rows…");
    fill(&a, FILES, mib * 1024 * 1024, 0x9e37_79b9_7f4a_7c15);
    a.psql(
        "postgres",
        "CREATE ROLE app LOGIN; CREATE DATABASE app OWNER app;",
    );
    a.sh(&format!(
        "runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -d app -c 'SET ROLE app' -c {}",
        shell(&format!(
            "CREATE TABLE posts (id bigint PRIMARY KEY, author bigint, body text, created timestamptz, blob bytea); \
INSERT INTO posts SELECT i, i % 5000, 'post ' || i || ' ' || md5(i::text), '2024-01-01'::timestamptz + i * interval '1 s', \
decode(md5(i::text), 'hex') FROM generate_series(1, {rows}) i;"
        ))
    ));
    let data = DataSpec {
        paths: vec!["/var/lib/app".into()],
        databases: vec!["app".into()],
        services: vec![],
    };
    let (backuper, repo) = (lab.backuper(), lab.repo());
    let target = BackupTarget {
        host: "op-app",
        deployment: "op",
        application: "app",
        revision: "bench",
        data: &data,
    };

    eprintln!("restic (pg_dump -Fc under a snapshot, manifest, one snapshot over sftp):");
    let full = backuper.backup(&a.ssh(), &repo, &target).await.unwrap();
    eprintln!(
        "  full backup: {:.1} s, {} files, {} MiB added",
        full.duration.as_secs_f64(),
        full.files,
        full.bytes_added >> 20
    );
    let restored = backuper
        .restore(&b.ssh(), &repo, "op-app", "latest", &data)
        .await
        .unwrap();
    assert!(restored.verified(), "{:?}", restored.differences);
    eprintln!(
        "  restore onto a fresh host (incl. verification): {:.1} s, {} files, {} rows",
        restored.duration.as_secs_f64(),
        restored.files,
        restored.rows
    );

    eprintln!("baseline on the same data:");
    let tar = timed(
        "tar | zstd -T2 (files)",
        "tar -C / -cf - var/lib/app | zstd -q -T2 -3 -o /var/lib/bench.tar.zst",
        &a,
    );
    let dump = timed(
        "pg_dump -Fc (database)",
        "runuser -u postgres -- pg_dump -Fc -d app >/var/lib/bench.dump",
        &a,
    );
    let size = a
        .sh("stat -c %s /var/lib/bench.tar.zst")
        .trim()
        .parse::<u64>()
        .unwrap();
    b.sh("mkdir -p /var/lib/untar && runuser -u postgres -- psql -X -q -d postgres -c 'CREATE DATABASE bench OWNER app'");
    let src = a.var_lib("bench.tar.zst");
    let dump_src = a.var_lib("bench.dump");
    std::fs::copy(&src, b.var_lib("bench.tar.zst")).unwrap();
    std::fs::copy(&dump_src, b.var_lib("bench.dump")).unwrap();
    let untar = timed(
        "zstd -d | tar -x (files)",
        "zstd -q -d -c /var/lib/bench.tar.zst | tar -C /var/lib/untar -xf -",
        &b,
    );
    let pg_restore = timed(
        "pg_restore (database)",
        "runuser -u postgres -- pg_restore --exit-on-error -d bench </var/lib/bench.dump",
        &b,
    );

    // 1 % of the files rewritten.
    let changed_files = FILES / 100;
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let per = (mib * 1024 * 1024) / FILES as u64;
    let mut buf = vec![0u8; per as usize];
    for i in 0..changed_files {
        let n = i * 100;
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let k = chunk.len();
            chunk.copy_from_slice(&x.to_le_bytes()[..k]);
        }
        std::fs::write(a.var_lib(&format!("app/media/{:02}/{n:05}.bin", n % 100)), &buf).unwrap();
    }
    let incremental = backuper.backup(&a.ssh(), &repo, &target).await.unwrap();
    eprintln!(
        "  incremental after {changed_files} files ({} MiB) changed: {:.1} s, {} files changed, {} MiB added",
        (changed_files as u64 * per) >> 20,
        incremental.duration.as_secs_f64(),
        incremental.files_changed,
        incremental.bytes_added >> 20
    );

    let base_backup = tar + dump;
    let base_restore = untar + pg_restore;
    println!("| step | restic path | baseline | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| full backup ({mib} MiB, {FILES} files, {rows} rows) | {:.1} s, {} MiB added | tar\\|zstd {:.1} s ({} MiB) + pg_dump {:.1} s | {:.2} |",
        full.duration.as_secs_f64(),
        full.bytes_added >> 20,
        tar.as_secs_f64(),
        size >> 20,
        dump.as_secs_f64(),
        full.duration.as_secs_f64() / base_backup.as_secs_f64()
    );
    println!(
        "| restore onto a fresh host, verified | {:.1} s | zstd -d\\|tar {:.1} s + pg_restore {:.1} s | {:.2} |",
        restored.duration.as_secs_f64(),
        untar.as_secs_f64(),
        pg_restore.as_secs_f64(),
        restored.duration.as_secs_f64() / base_restore.as_secs_f64()
    );
    println!(
        "| incremental, 1 % of files changed | {:.1} s, {} MiB added | (full again) {:.1} s | {:.2} |",
        incremental.duration.as_secs_f64(),
        incremental.bytes_added >> 20,
        base_backup.as_secs_f64(),
        incremental.duration.as_secs_f64() / base_backup.as_secs_f64()
    );
}
