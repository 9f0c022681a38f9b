//! End-to-end: the real `fediversity` binary runs on a folder, converges it, follows edits, additions and
//! deletions, serves metrics that promtool accepts, and drains on SIGTERM.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{api, cli, copy_examples, http_get, ready, sigterm, start, wait_exit, wait_for};
use serde_json::Value;

#[test]
fn the_daemon_converges_a_folder_and_follows_edits_additions_and_deletions() {
    let source = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    copy_examples(source.path());
    // The Deployment's environment arrives later: hold it back.
    let env_file = source.path().join("environments/ams-proxmox.yaml");
    let env_text = std::fs::read_to_string(&env_file).unwrap();
    std::fs::remove_file(&env_file).unwrap();

    let mut daemon = start(source.path(), state.path());

    // Every example object gets a status; the Deployment waits for its environment.
    for kind in ["runtimeenvironments", "applications", "deployments"] {
        wait_for(
            &format!("a status on every {kind}"),
            Duration::from_secs(10),
            || {
                let items = api(&daemon, kind)["items"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                (!items.is_empty() && items.iter().all(|o| ready(o).is_some())).then_some(())
            },
        );
    }
    let deployment = api(&daemon, "deployments/uni-utrecht");
    assert_eq!(
        ready(&deployment),
        Some(("False".into(), "DependencyNotReady".into())),
        "{deployment}"
    );
    assert!(
        deployment["status"]["conditions"]
            .to_string()
            .contains("RuntimeEnvironment ams-proxmox")
    );

    // The environment arrives: the Deployment is unblocked at once, not at its next retry (30 s).
    std::fs::write(&env_file, &env_text).unwrap();
    let unblocked = Instant::now();
    wait_for("the Deployment to become Ready", Duration::from_secs(5), || {
        (ready(&api(&daemon, "deployments/uni-utrecht")) == Some(("True".into(), "Succeeded".into())))
            .then_some(())
    });
    let unblocked = unblocked.elapsed();
    assert!(
        unblocked < Duration::from_secs(2),
        "unblocked after {unblocked:?}"
    );
    let deployment = api(&daemon, "deployments/uni-utrecht");
    assert_eq!(
        deployment["status"]["hosts"].as_array().map(Vec::len),
        Some(2),
        "{deployment}"
    );
    assert_eq!(
        deployment["status"]["endpoints"]["mastodon"],
        "https://mastodon.social.uu.nl"
    );
    assert_eq!(deployment["metadata"]["generation"], 1);

    // An edit is reconciled: observedGeneration follows the new generation.
    let dep_file = source.path().join("deployments/uni-utrecht.yaml");
    let text = std::fs::read_to_string(&dep_file).unwrap();
    std::fs::write(
        &dep_file,
        text.replace(
            "enabled: false           # listed but off: no VM",
            "enabled: true",
        ),
    )
    .unwrap();
    let edited = Instant::now();
    wait_for("the edit to be reconciled", Duration::from_secs(5), || {
        let d = api(&daemon, "deployments/uni-utrecht");
        (d["status"]["observedGeneration"] == 2 && d["metadata"]["generation"] == 2).then_some(())
    });
    let edited = edited.elapsed();
    assert!(
        edited < Duration::from_secs(1),
        "edit reconciled after {edited:?}"
    );
    assert_eq!(
        api(&daemon, "deployments/uni-utrecht")["status"]["hosts"]
            .as_array()
            .map(Vec::len),
        Some(3)
    );

    // The CLI shows it, kubectl style, and `reconcile --wait` returns once it was handled.
    let (code, table) = cli(&daemon, &["get", "deployments"]);
    assert_eq!(code, 0, "{table}");
    assert!(table.starts_with("NAME "), "{table}");
    assert!(
        table.lines().nth(1).unwrap().starts_with("uni-utrecht"),
        "{table}"
    );
    assert!(
        table.contains("True") && table.contains("Succeeded") && table.contains("social.uu.nl"),
        "{table}"
    );
    let (code, list) = cli(&daemon, &["get", "deploy", "-o", "json"]);
    assert_eq!(code, 0);
    let list: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(
        (list["apiVersion"].as_str(), list["kind"].as_str()),
        (Some("v1"), Some("List"))
    );
    let (code, hosts) = cli(&daemon, &["get", "hosts"]);
    assert_eq!(code, 0);
    assert!(
        hosts.contains("uni-utrecht-peertube") && hosts.contains("Planned"),
        "{hosts}"
    );
    let (code, out) = cli(
        &daemon,
        &[
            "reconcile",
            "deployment",
            "uni-utrecht",
            "--wait",
            "--timeout",
            "10s",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("reconciled, Ready"), "{out}");
    let (code, described) = cli(&daemon, &["describe", "deploy", "uni-utrecht"]);
    assert_eq!(code, 0, "{described}");
    assert!(
        described.contains("Conditions:")
            && described.contains("DependencyNotReady")
            && described.contains("uni-utrecht-mastodon"),
        "{described}"
    );
    let (code, events) = cli(&daemon, &["events"]);
    assert_eq!(code, 0);
    assert!(events.contains("Deployment/uni-utrecht"), "{events}");

    // A deleted file's objects go through cleanup and disappear, status and metric series included.
    std::fs::remove_file(&dep_file).unwrap();
    wait_for("the Deployment to disappear", Duration::from_secs(5), || {
        api(&daemon, "deployments")["items"]
            .as_array()
            .is_some_and(Vec::is_empty)
            .then_some(())
    });
    let (_, table) = cli(&daemon, &["get", "deployments"]);
    assert!(table.contains("No deployments found."), "{table}");
    let (_, metrics) = http_get(&daemon.server, "/metrics").unwrap();
    assert!(
        !metrics.contains("name=\"uni-utrecht\""),
        "series of a removed object remain"
    );

    // SIGTERM drains and exits 0.
    sigterm(&daemon.child);
    assert_eq!(wait_exit(&mut daemon.child, Duration::from_secs(10)), 0);
}

#[test]
fn metrics_pass_promtool_and_carry_the_controller_runtime_names() {
    let source = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    copy_examples(source.path());
    let daemon = start(source.path(), state.path());
    wait_for("the Deployment to become Ready", Duration::from_secs(10), || {
        (ready(&api(&daemon, "deployments/uni-utrecht")).map(|r| r.0) == Some("True".into())).then_some(())
    });
    // Metrics are observed just after the status is written: wait for the count to show it.
    let scrape = wait_for(
        "the Ready Deployment in the metrics",
        Duration::from_secs(10),
        || {
            let (code, scrape) = http_get(&daemon.server, "/metrics")?;
            (code == 200 && scrape.contains("fediversity_objects{kind=\"Deployment\",ready=\"True\"} 1"))
                .then_some(scrape)
        },
    );

    let promtool = which("promtool")
        .expect("promtool is missing: scripts/test.sh installs it (Debian package prometheus)");
    let mut check = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(check.stdin.as_mut().unwrap(), scrape.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    for series in [
        "controller_runtime_reconcile_total{controller=\"deployment\",result=\"success\"}",
        "controller_runtime_reconcile_errors_total{controller=\"deployment\"}",
        "controller_runtime_reconcile_time_seconds_bucket{controller=\"deployment\",le=",
        "controller_runtime_active_workers{controller=\"application\"}",
        "controller_runtime_max_concurrent_reconciles{controller=\"runtimeenvironment\"}",
        "workqueue_depth{",
        "workqueue_adds_total{",
        "workqueue_queue_duration_seconds_bucket{",
        "workqueue_work_duration_seconds_bucket{",
        "workqueue_retries_total{",
        "workqueue_unfinished_work_seconds{",
        "workqueue_longest_running_processor_seconds{",
        "fediversity_objects{kind=\"Deployment\",ready=\"True\"} 1",
        "fediversity_objects{kind=\"Deployment\",ready=\"False\"} 0",
        "fediversity_source_last_applied_timestamp_seconds ",
        "process_resident_memory_bytes ",
    ] {
        assert!(scrape.contains(series), "missing `{series}` in the scrape");
    }
    // A Ready object is counted, and has no series of its own: those are for objects needing attention.
    assert!(
        !scrape.contains("name=\"uni-utrecht\""),
        "a healthy Deployment has no per-object series"
    );
    // Every reconcile so far converged and scheduled its resync: counted as a success, never a retry.
    let value = |series: &str| -> f64 {
        scrape
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no value for `{series}` in the scrape"))
    };
    assert!(
        value("controller_runtime_reconcile_total{controller=\"deployment\",result=\"success\"}") >= 1.0,
        "a Ready Deployment's reconcile is counted as a success"
    );
    assert_eq!(
        value("workqueue_retries_total{controller=\"deployment\",name=\"deployment\"}"),
        0.0,
        "a resync after success is not a retry"
    );
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

#[test]
fn an_object_deleted_while_the_daemon_was_down_is_cleaned_up_on_restart() {
    let source = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    copy_examples(source.path());
    let mut daemon = start(source.path(), state.path());
    wait_for("the Deployment to become Ready", Duration::from_secs(10), || {
        (ready(&api(&daemon, "deployments/uni-utrecht")).map(|r| r.0) == Some("True".into())).then_some(())
    });
    assert!(
        api(&daemon, "events")["items"]
            .to_string()
            .contains("uni-utrecht")
    );
    sigterm(&daemon.child);
    assert_eq!(wait_exit(&mut daemon.child, Duration::from_secs(10)), 0);

    std::fs::remove_file(source.path().join("deployments/uni-utrecht.yaml")).unwrap();
    let daemon = start(source.path(), state.path());
    // Its stored status and events were loaded at start; cleanup drops them.
    wait_for(
        "the removed Deployment's events to be dropped",
        Duration::from_secs(10),
        || {
            (!api(&daemon, "events")["items"]
                .to_string()
                .contains("\"uni-utrecht\""))
            .then_some(())
        },
    );
    assert!(
        api(&daemon, "deployments")["items"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[test]
fn a_restart_with_nothing_changed_commits_nothing_to_the_store() {
    let source = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    copy_examples(source.path());
    let objects = |daemon: &common::Daemon| {
        ["runtimeenvironments", "applications", "deployments"]
            .iter()
            .map(|kind| api(daemon, kind)["items"].as_array().map_or(0, Vec::len))
            .sum::<usize>()
    };
    let scrape = |daemon: &common::Daemon| http_get(&daemon.server, "/metrics").unwrap_or_default().1;
    let value = |scrape: &str, series: &str| -> f64 {
        scrape
            .lines()
            .filter(|l| l.starts_with(series))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let mut commits = Vec::new();
    for _ in 0..2 {
        let mut daemon = start(source.path(), state.path());
        // Every object reconciled (counted in the metrics, whatever status the store gave it), then
        // time for the status writer's batch to go out.
        wait_for("every object reconciled", Duration::from_secs(20), || {
            let count = objects(&daemon);
            (count > 0 && value(&scrape(&daemon), "controller_runtime_reconcile_total{") >= count as f64)
                .then_some(())
        });
        std::thread::sleep(Duration::from_millis(600));
        commits.push(value(&scrape(&daemon), "fediversity_store_commits_total "));
        sigterm(&daemon.child);
        assert_eq!(wait_exit(&mut daemon.child, Duration::from_secs(10)), 0);
    }
    assert!(
        commits[0] > 0.0,
        "the first run writes generations and statuses: {commits:?}"
    );
    assert_eq!(
        commits[1], 0.0,
        "fediversity_store_commits_total after a restart with nothing changed"
    );
}
