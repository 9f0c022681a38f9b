//! Backups and restores on real parts: test hosts (loopback sshd, own mount namespace) each running
//! a real PostgreSQL, and a restic repository served over sftp by another loopback sshd.

mod backup_support;

use std::time::Duration;

use backup_support::{DataHost, Lab, data_spec};
use fediversity::backup::{BackupError, BackupTarget, Backuper, Repository};
use fediversity::nixos::host::SshHost;

fn target<'a>(host: &'a DataHost, data: &'a fediversity::api::DataSpec) -> BackupTarget<'a> {
    BackupTarget {
        host: &host.name,
        deployment: "op",
        application: "app",
        revision: "rev-1",
        data,
    }
}

async fn restore_onto(
    backuper: &Backuper,
    repo: &Repository,
    to: &SshHost,
    source: &str,
    snapshot: &str,
) -> fediversity::backup::RestoreReport {
    backuper
        .restore(to, repo, source, snapshot, &data_spec())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_restored_onto_a_fresh_host_has_equal_files_and_database_checksums() {
    let lab = Lab::new();
    let (a, b) = (lab.host("op-app"), lab.host("fresh"));
    a.seed_files();
    a.seed_databases();
    let (backuper, repo, data) = (lab.backuper(), lab.repo(), data_spec());

    let report = backuper
        .backup(&a.ssh(), &repo, &target(&a, &data))
        .await
        .unwrap();
    eprintln!("backup: {report:?}");
    assert!(report.files >= 300, "{report:?}");
    assert!(report.bytes_added > 6 * 1024 * 1024, "{report:?}");

    let snapshots = backuper.snapshots(&a.ssh(), &repo, None, &[]).await.unwrap();
    assert_eq!(snapshots.len(), 1);
    let s = &snapshots[0];
    assert!(s.id.starts_with(&report.snapshot), "{s:?}");
    assert_eq!(
        (
            s.tag("deployment"),
            s.tag("application"),
            s.tag("host"),
            s.tag("revision")
        ),
        (Some("op"), Some("app"), Some("op-app"), Some("rev-1"))
    );

    let restored = restore_onto(&backuper, &repo, &b.ssh(), "op-app", "latest").await;
    eprintln!("restore: {restored:?}");
    assert!(restored.verified(), "{:?}", restored.differences);
    assert!(restored.rows >= 55_000, "{restored:?}");

    // Compared independently of the restore's own verification: the live states of both hosts.
    let (files_a, dbs_a) = backuper.live_state(&a.ssh(), &data).await.unwrap();
    let (files_b, dbs_b) = backuper.live_state(&b.ssh(), &data).await.unwrap();
    assert_eq!(files_a, files_b);
    assert!(files_a.entries.keys().any(|p| p.ends_with("日本語 ünïcødé.txt")));
    assert_eq!(
        files_b.entries["/var/lib/app/secrets/secret-key-base"].mode,
        "600"
    );
    assert_eq!(
        files_b.entries["/var/lib/app/owned-by-postgres"].owner,
        "postgres:postgres"
    );
    assert_eq!(
        files_b.entries["/var/lib/app/dangling"].link.as_deref(),
        Some("/nonexistent/target")
    );
    assert_eq!(dbs_a, dbs_b);
    assert_eq!(dbs_b[1].meta.owner, "chat");
    assert_eq!(
        (dbs_b[1].meta.collate.as_str(), dbs_b[1].meta.ctype.as_str()),
        ("C", "C")
    );

    // The password never reached the hosts' process arguments, and no secret is left behind.
    assert_eq!(
        b.sh("ls -A /var/lib/fediversity-backup/secrets 2>/dev/null | wc -l")
            .trim(),
        "0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_backup_after_a_small_change_adds_about_the_changed_bytes() {
    let lab = Lab::new();
    let a = lab.host("op-app");
    a.seed_files();
    a.seed_databases();
    let (backuper, repo, data) = (lab.backuper(), lab.repo(), data_spec());
    let first = backuper
        .backup(&a.ssh(), &repo, &target(&a, &data))
        .await
        .unwrap();

    // Change 3 small files (about 3 KB) and add one row.
    for i in 0..3 {
        std::fs::write(
            a.var_lib(&format!("app/media/{i:04}.bin")),
            format!("changed {i}").repeat(100),
        )
        .unwrap();
    }
    a.psql("app", "INSERT INTO events(body) VALUES ('one more');");
    let second = backuper
        .backup(&a.ssh(), &repo, &target(&a, &data))
        .await
        .unwrap();
    eprintln!("first: {first:?}\nsecond: {second:?}");
    assert_ne!(first.snapshot, second.snapshot);
    assert!(
        second.bytes_added < 1024 * 1024,
        "the second backup added {} bytes for ~3 KB of changed files and one row (first added {})",
        second.bytes_added,
        first.bytes_added
    );
    assert!(second.bytes_added * 10 < first.bytes_added);
    // The 3 files, and the staging folder's 2 dumps, 2 checksum files and 2 manifest files.
    assert!(second.files_changed <= 9, "{second:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_while_the_database_is_written_restores_consistently() {
    let lab = Lab::new();
    let (a, b) = (lab.host("op-app"), lab.host("fresh"));
    a.seed_files();
    a.seed_databases();
    let (backuper, repo, data) = (lab.backuper(), lab.repo(), data_spec());

    // A writer committing row after row (an event and an order each) while the backup runs.
    let writer = {
        let ssh = a.ssh();
        let mut args = ssh.ssh_options();
        args.extend([
            "-T".into(),
            format!("root@{}", a.address),
            "--".into(),
            "runuser -u postgres -- psql -X -q -d app -c 'SET ROLE app' -c \"DO \\$\\$ BEGIN FOR i IN 1..6000 LOOP \
INSERT INTO events(body) VALUES ('ev '||i); INSERT INTO orders VALUES (100000+i, 1+i%20000, i, 'live'); COMMIT; \
PERFORM pg_sleep(0.001); END LOOP; END \\$\\$\""
                .into(),
        ]);
        std::process::Command::new("ssh").args(&args).spawn().unwrap()
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let report = backuper
        .backup(&a.ssh(), &repo, &target(&a, &data))
        .await
        .unwrap();
    let mut writer = writer;
    let still_writing = writer.try_wait().unwrap().is_none();
    writer.wait().unwrap();
    eprintln!("backup under a writer (writer still running at the end: {still_writing}): {report:?}");

    let restored = restore_onto(&backuper, &repo, &b.ssh(), "op-app", &report.snapshot).await;
    assert!(restored.verified(), "{:?}", restored.differences);
    // One snapshot: every committed pair is there or not at all, and the events are a prefix.
    let counts = b.psql(
        "app",
        "SELECT (SELECT count(*) FROM events), (SELECT coalesce(max(id), 0) FROM events), (SELECT count(*) FROM orders WHERE id > 100000);",
    );
    let n: Vec<u64> = counts.trim().split('|').map(|v| v.parse().unwrap()).collect();
    eprintln!("restored events/max id/live orders: {n:?}");
    assert_eq!(n[0], n[1], "events form a prefix");
    assert_eq!(n[0], n[2], "each event came with its order");
    assert!(n[0] > 0 && n[0] < 6000, "the dump fell inside the writes: {n:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_pack_is_found_by_the_check_and_reported() {
    let lab = Lab::new();
    let a = lab.host("op-app");
    a.seed_files();
    a.seed_databases();
    let (backuper, repo, data) = (lab.backuper(), lab.repo(), data_spec());
    backuper
        .backup(&a.ssh(), &repo, &target(&a, &data))
        .await
        .unwrap();
    let clean = backuper.check(&a.ssh(), &repo, Some("100%")).await.unwrap();
    assert!(clean.ok, "{}", clean.output);

    // Overwrite 8 bytes in the middle of the largest data pack.
    let mut packs: Vec<_> = walk(&lab.repository().join("data"));
    packs.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
    let largest = packs.last().unwrap();
    let mut bytes = std::fs::read(largest).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid..mid + 8].copy_from_slice(b"DAMAGED!");
    std::fs::write(largest, bytes).unwrap();

    let damaged = backuper.check(&a.ssh(), &repo, Some("100%")).await.unwrap();
    eprintln!("check of the damaged repository: {}", damaged.output);
    assert!(!damaged.ok);
    assert!(
        damaged.output.contains("does not match") || damaged.output.contains("repository contains errors"),
        "{}",
        damaged.output
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_repository_fails_the_round_with_backoff_status_and_metrics_then_it_recovers() {
    use fediversity::backup::metrics::BackupMetrics;
    use fediversity::backup::schedule::{self, HostClock, RoundHost};

    let mut lab = Lab::new();
    let a = lab.host("op-app");
    a.seed_files();
    let data = fediversity::api::DataSpec {
        databases: vec![],
        ..data_spec()
    };
    let (backuper, repo, spec) = (lab.backuper(), lab.repo(), lab.backup_spec());
    let registry = prometheus::Registry::new();
    let metrics = BackupMetrics::register(&registry).unwrap();
    let shell = a.ssh();
    let hosts = [RoundHost {
        deployment: "op",
        application: "app",
        host: "op-app",
        data: &data,
        shell: &shell,
    }];

    // The direct call says what kind of failure it is.
    lab.stop_sftp();
    let err = backuper
        .backup(&shell, &repo, &target(&a, &data))
        .await
        .unwrap_err();
    eprintln!("{err}");
    assert!(
        matches!(err, BackupError::RepositoryUnreachable { .. }),
        "{err:?}"
    );
    assert!(err.is_transient());
    assert!(!err.to_string().contains("correct horse"));

    // A round records it in status and metrics, and backs off.
    let previous = vec![(Default::default(), HostClock::default())];
    let round = schedule::run_round(
        &backuper,
        &repo,
        &spec,
        "rev-1",
        &hosts,
        &previous,
        Some(&metrics),
    )
    .await;
    let (status, clock) = &round[0];
    eprintln!("{status:?}");
    assert_eq!((status.result.as_str(), status.failures), ("Failed", 1));
    let message = status.message.as_deref().unwrap();
    assert!(
        message.contains("unreachable") && message.contains("next attempt in 60 s"),
        "{message}"
    );
    assert!(!message.contains("correct horse"));
    let now = clock.last_attempt.unwrap();
    assert!(schedule::due([("op-app", clock, false)], spec.interval(), now + 30, 2).is_empty());
    assert_eq!(
        schedule::due([("op-app", clock, false)], spec.interval(), now + 60, 2),
        vec!["op-app"]
    );
    let mut text = Vec::new();
    prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &registry.gather(), &mut text).unwrap();
    assert!(
        String::from_utf8(text)
            .unwrap()
            .contains("fediversity_backup_failures_total{deployment=\"op\",host=\"op-app\"} 1")
    );

    // The repository is back: the next round succeeds and applies the retention.
    lab.start_sftp();
    let round = schedule::run_round(&backuper, &repo, &spec, "rev-1", &hosts, &round, Some(&metrics)).await;
    let (status, clock) = &round[0];
    eprintln!("{status:?}");
    assert_eq!(
        (status.result.as_str(), status.failures, clock.failures),
        ("Succeeded", 0, 0)
    );
    assert!(
        status.snapshot.is_some() && status.files > 300 && status.message.is_none(),
        "{status:?}"
    );
}

/// Kills, by PID, the restic processes running `subcommand` against this lab's repository on behalf
/// of a host (they were started by this test through the host's sshd).
fn kill_restic_of(lab: &Lab, subcommand: &str) -> usize {
    let needle = lab.repository().to_string_lossy().into_owned();
    let mut killed = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let (Ok(cmdline), Ok(environ)) = (
            std::fs::read(format!("/proc/{pid}/cmdline")),
            std::fs::read(format!("/proc/{pid}/environ")),
        ) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_restic = args.first().is_some_and(|a| a.ends_with(b"restic"));
        let runs = args.contains(&subcommand.as_bytes());
        let ours = String::from_utf8_lossy(&environ).contains(&needle);
        if is_restic && runs && ours {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            killed += 1;
        }
    }
    killed
}

/// Runs `work` until a restic `subcommand` of it is seen, then kills that restic and drops the work
/// (as a killed controller drops its SSH session). Returns how many restic processes were killed.
async fn kill_during<F>(lab: &Lab, subcommand: &str, work: F) -> usize
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + std::fmt::Debug,
{
    let task = tokio::spawn(work);
    let mut killed = 0;
    for _ in 0..1200 {
        // Only once restic holds its lock in the repository: the case that could block the next run.
        if !walk(&lab.repository().join("locks")).is_empty() {
            killed = kill_restic_of(lab, subcommand);
        }
        if killed > 0 || task.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(killed > 0, "restic {subcommand} was never seen running");
    task.abort();
    let _ = task.await;
    killed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_and_a_restore_killed_midway_both_complete_on_the_next_attempt() {
    let lab = Lab::new();
    let (a, b) = (lab.host("op-app"), lab.host("fresh"));
    a.seed_files();
    // Enough data that restic is still busy when it is killed.
    a.sh("head -c 120000000 /dev/urandom > /var/lib/app/huge.bin");
    a.seed_databases();
    let (backuper, repo, data) = (lab.backuper(), lab.repo(), data_spec());

    let work = {
        let (backuper, repo, data, ssh, name) = (
            backuper.clone(),
            repo.clone(),
            data.clone(),
            a.ssh(),
            a.name.clone(),
        );
        async move {
            let t = BackupTarget {
                host: &name,
                deployment: "op",
                application: "app",
                revision: "rev-1",
                data: &data,
            };
            backuper.backup(&ssh, &repo, &t).await.map(drop)
        }
    };
    let killed = kill_during(&lab, "backup", work).await;
    let locks = walk(&lab.repository().join("locks"));
    eprintln!(
        "killed {killed} restic backup; locks left in the repository: {}",
        locks.len()
    );
    assert!(!locks.is_empty(), "a killed restic leaves its lock");
    let report = backuper
        .backup(&a.ssh(), &repo, &target(&a, &data))
        .await
        .unwrap();
    assert!(report.files > 300);
    // The stale lock is gone: an exclusive check runs.
    let check = backuper.check(&a.ssh(), &repo, None).await.unwrap();
    assert!(check.ok, "{}", check.output);

    let work = {
        let (backuper, repo, data, ssh) = (backuper.clone(), repo.clone(), data.clone(), b.ssh());
        async move {
            backuper
                .restore(&ssh, &repo, "op-app", "latest", &data)
                .await
                .map(drop)
        }
    };
    let killed = kill_during(&lab, "restore", work).await;
    eprintln!("killed {killed} restic restore");
    let restored = restore_onto(&backuper, &repo, &b.ssh(), "op-app", "latest").await;
    assert!(restored.verified(), "{:?}", restored.differences);
    let (files_a, dbs_a) = backuper.live_state(&a.ssh(), &data).await.unwrap();
    let (files_b, dbs_b) = backuper.live_state(&b.ssh(), &data).await.unwrap();
    assert_eq!(files_a, files_b);
    assert_eq!(dbs_a, dbs_b);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
