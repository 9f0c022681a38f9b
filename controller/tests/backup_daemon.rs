//! The daemon backs up a Ready host of a Deployment whose environment has `spec.backup`, on demand
//! through `fediversity backup deployment NAME --wait`, and another controller starts the same
//! Deployment on a fresh host from that snapshot (`spec.restore`): real Nix, real OpenSSH, real restic.

mod backup_support;
mod common;
mod nixos_support;
mod postgres_support;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Daemon, get, http_get, kill_daemon, wait_for};
use nixos_support::{Lab, NIX_CONFIG};
use postgres_support::{on_host, postgres_host, sql};
use serde_json::Value;

fn start(source: &std::path::Path, state: &std::path::Path, catalog: &std::path::Path) -> Daemon {
    common::start_with_catalog(source, state, catalog, NIX_CONFIG)
}

#[test]
fn a_backup_asked_on_the_command_line_shows_in_status_and_metrics_and_another_controller_restores_it_onto_a_fresh_host()
 {
    assert!(
        Command::new("sh")
            .args(["-c", "command -v restic"])
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success(),
        "restic is missing: scripts/test.sh installs it"
    );
    let lab = Lab::new();
    let alpha = lab.host("demo-alpha");
    // The host's data lives in its own /nix (private to its mount namespace), and so does the repository.
    let data = alpha.root.join("nix/var/app-data");
    std::fs::create_dir_all(data.join("media")).unwrap();
    for i in 0..50 {
        std::fs::write(data.join(format!("media/{i}.bin")), vec![i as u8; 4096]).unwrap();
    }
    std::fs::write(data.join("ünïcødé name.txt"), "hello").unwrap();

    let source = lab.path().join("source");
    std::fs::create_dir_all(&source).unwrap();
    // A repository on a path both controllers' hosts see (a stand-in for an sftp or s3 backend).
    let shared = tempfile::tempdir().unwrap();
    let repository = shared.path().join("repo");
    std::fs::write(shared.path().join("restic-password"), "a long restic password\n").unwrap();
    let env_yaml = |lab: &Lab, host: &nixos_support::TestHost| {
        format!(
            "{}  backup: {{ repository: {}, passwordFile: {}, schedule: 1d }}\n",
            lab.environment_yaml("lab", &[host]),
            repository.display(),
            shared.path().join("restic-password").display()
        )
    };
    let env = env_yaml(&lab, &alpha);
    std::fs::write(source.join("env.yaml"), env).unwrap();
    let app_yaml = "apiVersion: fediversity.eu/v1alpha1\nkind: Application\nmetadata: { name: alpha }\nspec:\n  \
displayName: Probe\n  nixosModule: nix/applications/probe.nix\n  sizes: { small: { cores: 1, memoryMiB: 512, diskGiB: 10 } }\n  \
settings:\n    type: object\n    additionalProperties: false\n    properties:\n      message: { type: string }\n  \
data: { paths: [/nix/var/app-data] }\n";
    std::fs::write(source.join("alpha.yaml"), app_yaml).unwrap();
    std::fs::write(
        source.join("demo.yaml"),
        "apiVersion: fediversity.eu/v1alpha1\nkind: Deployment\nmetadata: { name: demo }\nspec:\n  \
domain: lab.example\n  runtimeEnvironment: lab\n  applications:\n    alpha: { settings: { message: hello } }\n",
    )
    .unwrap();
    let daemon = start(&source, &lab.path().join("state"), &lab.catalog());
    wait_for("the Deployment to become Ready", Duration::from_secs(120), || {
        get(&daemon, "/api/v1/deployments/demo").filter(|d| d["status"]["hosts"][0]["phase"] == "Ready")
    });
    // Without spec.restore nothing is held: the application started on the first activation.
    assert_eq!(
        alpha.app_starts().first().map(|(what, _)| what.as_str()),
        Some("started")
    );

    let out = Command::new(env!("CARGO_BIN_EXE_fediversity"))
        .args([
            "backup",
            "deployment",
            "demo",
            "--wait",
            "--timeout",
            "180s",
            "--server",
        ])
        .arg(&daemon.server)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout.contains("demo-alpha") && stdout.contains("Succeeded"),
        "{stdout}"
    );

    // status.backups: the host's last backup.
    let d = get(&daemon, "/api/v1/deployments/demo").unwrap();
    let b = &d["status"]["backups"][0];
    assert_eq!(
        (b["host"].as_str(), b["result"].as_str()),
        (Some("demo-alpha"), Some("Succeeded")),
        "{d}"
    );
    assert!(b["files"].as_u64().unwrap() >= 51, "{b}");
    assert!(b["snapshot"].as_str().is_some_and(|s| s.len() >= 8), "{b}");
    assert!(!d.to_string().contains("a long restic password"));
    // `get backups demo`: the snapshots as the repository has them (listed through the host).
    let out = Command::new(env!("CARGO_BIN_EXE_fediversity"))
        .args(["get", "backups", "demo", "--server"])
        .arg(&daemon.server)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    eprintln!("{listing}{}", String::from_utf8_lossy(&out.stderr));
    let snapshot = b["snapshot"].as_str().unwrap();
    assert!(
        listing.contains(&snapshot[..8]) && listing.contains("Stored"),
        "{listing}"
    );
    let list = get(&daemon, "/api/v1/backups/demo").unwrap();
    let items = list["items"].as_array().unwrap();
    assert!(
        !items.is_empty()
            && items
                .iter()
                .all(|s| s["host"] == "demo-alpha" && s["application"] == "alpha"),
        "{list}"
    );

    let events = get(&daemon, "/api/v1/events?kind=Deployment&name=demo")
        .unwrap()
        .to_string();
    assert!(
        events.contains("BackingUp") && events.contains("BackedUp"),
        "{events}"
    );

    let metrics = http_get(&daemon.server, "/metrics").unwrap().1;
    assert!(
        metrics.contains(
            "fediversity_backup_last_success_timestamp_seconds{deployment=\"demo\",host=\"demo-alpha\"}"
        ),
        "{metrics}"
    );

    // The snapshot is in the host's repository, tagged.
    let snapshots = Command::new("restic")
        .args(["snapshots", "--json", "--no-lock"])
        .env("RESTIC_REPOSITORY", &repository)
        .env("RESTIC_PASSWORD_FILE", shared.path().join("restic-password"))
        .env("RESTIC_CACHE_DIR", lab.path().join("restic-cache"))
        .output()
        .unwrap();
    let snapshots: Value = serde_json::from_slice(&snapshots.stdout).unwrap();
    let tags = snapshots[0]["tags"].as_array().unwrap();
    assert!(tags.iter().any(|t| t == "deployment=demo"), "{snapshots}");
    assert!(tags.iter().any(|t| t == "host=demo-alpha"), "{snapshots}");

    drop(daemon);

    // Another controller starts the same Deployment on a fresh host, from the latest snapshot.
    let lab2 = Lab::new();
    let fresh = lab2.host("demo-alpha");
    assert!(!fresh.root.join("nix/var/app-data").exists());
    let source2 = lab2.path().join("source");
    std::fs::create_dir_all(&source2).unwrap();
    std::fs::write(source2.join("env.yaml"), env_yaml(&lab2, &fresh)).unwrap();
    std::fs::write(source2.join("alpha.yaml"), app_yaml).unwrap();
    std::fs::write(
        source2.join("demo.yaml"),
        "apiVersion: fediversity.eu/v1alpha1\nkind: Deployment\nmetadata: { name: demo }\nspec:\n  \
domain: lab.example\n  runtimeEnvironment: lab\n  restore: { snapshot: latest }\n  applications:\n    alpha: { settings: { message: hello } }\n",
    )
    .unwrap();
    let daemon2 = start(&source2, &lab2.path().join("state"), &lab2.catalog());
    let d = wait_for("the host to be restored", Duration::from_secs(180), || {
        get(&daemon2, "/api/v1/deployments/demo")
            .filter(|d| d["status"]["restore"]["hosts"][0]["result"] == "Restored")
    });
    // From its very first activation until the restore was done, the application was held stopped:
    // the activated system holds its units on the restore marker, and they never started on empty data.
    let system = fresh.activated().expect("the fresh host was activated");
    let hold = &fresh.settings_json(&system)["restoreHold"];
    assert_eq!(hold["enable"], true, "{hold}");
    assert_eq!(hold["marker"], "/var/lib/fediversity-backup/restored", "{hold}");
    let starts = fresh.app_starts();
    assert!(
        !starts.is_empty() && starts.iter().all(|(what, _)| what == "held"),
        "{starts:?}"
    );
    let marker = std::fs::read_to_string(fresh.root.join("backup-files/restored")).unwrap();
    assert!(
        d["status"]["restore"]["hosts"][0]["snapshot"]
            .as_str()
            .is_some_and(|s| s == marker.trim()),
        "{marker}"
    );
    // With the marker in place the units start (here: the next activation of the same system).
    let out = Command::new("ssh")
        .args(lab2.ssh_args(&fresh))
        .arg(format!("{system}/bin/switch-to-configuration"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        fresh.app_starts().last().map(|(what, _)| what.as_str()),
        Some("started")
    );
    let r = &d["status"]["restore"]["hosts"][0];
    eprintln!("{r}");
    assert_eq!(r["verified"], true, "{r}");
    assert!(
        b["snapshot"]
            .as_str()
            .is_some_and(|s| r["snapshot"].as_str().unwrap().starts_with(s)),
        "{r} {b}"
    );
    for name in ["media/7.bin", "ünïcødé name.txt"] {
        assert_eq!(
            std::fs::read(fresh.root.join("nix/var/app-data").join(name)).unwrap(),
            std::fs::read(data.join(name)).unwrap()
        );
    }
    // Backups of the restored host follow (the restore came first).
    wait_for("a backup of the restored host", Duration::from_secs(120), || {
        get(&daemon2, "/api/v1/deployments/demo")
            .filter(|d| d["status"]["backups"][0]["result"] == "Succeeded")
    });
}

/// The PIDs of restic processes working on `repository` (started by this test's daemon through a host).
fn restic_pids(repository: &std::path::Path) -> Vec<i32> {
    let needle = repository.to_string_lossy().into_owned();
    let mut out = Vec::new();
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
        let is_restic = cmdline
            .split(|b| *b == 0)
            .next()
            .is_some_and(|a| a.ends_with(b"restic"));
        if is_restic && String::from_utf8_lossy(&environ).contains(&needle) {
            out.push(pid);
        }
    }
    out
}

#[test]
fn a_daemon_killed_during_a_backup_backs_up_again_after_a_restart() {
    let lab = Lab::new();
    let alpha = lab.host("demo-alpha");
    let data = alpha.root.join("nix/var/app-data");
    std::fs::create_dir_all(&data).unwrap();
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c 150000000 /dev/urandom > '{}/big.bin'",
            data.display()
        ))
        .status()
        .unwrap();
    assert!(status.success());
    let shared = tempfile::tempdir().unwrap();
    let repository = shared.path().join("repo");
    std::fs::write(shared.path().join("pw"), "another restic password\n").unwrap();
    let source = lab.path().join("source");
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(
        source.join("env.yaml"),
        format!(
            "{}  backup: {{ repository: {}, passwordFile: {}, schedule: 1d }}\n",
            lab.environment_yaml("lab", &[&alpha]),
            repository.display(),
            shared.path().join("pw").display()
        ),
    )
    .unwrap();
    std::fs::write(
        source.join("alpha.yaml"),
        "apiVersion: fediversity.eu/v1alpha1\nkind: Application\nmetadata: { name: alpha }\nspec:\n  \
displayName: Probe\n  nixosModule: nix/applications/probe.nix\n  sizes: { small: { cores: 1, memoryMiB: 512, diskGiB: 10 } }\n  \
settings:\n    type: object\n    additionalProperties: false\n    properties:\n      message: { type: string }\n  \
data: { paths: [/nix/var/app-data] }\n",
    )
    .unwrap();
    std::fs::write(
        source.join("demo.yaml"),
        "apiVersion: fediversity.eu/v1alpha1\nkind: Deployment\nmetadata: { name: demo }\nspec:\n  \
domain: lab.example\n  runtimeEnvironment: lab\n  applications:\n    alpha: { settings: { message: hello } }\n",
    )
    .unwrap();
    let state = lab.path().join("state");
    let daemon = start(&source, &state, &lab.catalog());
    // The first backup starts by itself once the host is Ready; the daemon is killed while restic runs.
    wait_for(
        "restic to run for the first backup",
        Duration::from_secs(180),
        || {
            (!restic_pids(&repository).is_empty()
                && repository.join("locks").read_dir().ok()?.next().is_some())
            .then_some(())
        },
    );
    kill_daemon(daemon);

    let daemon = start(&source, &state, &lab.catalog());
    let out = Command::new(env!("CARGO_BIN_EXE_fediversity"))
        .args([
            "backup",
            "deployment",
            "demo",
            "--wait",
            "--timeout",
            "300s",
            "--server",
        ])
        .arg(&daemon.server)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    // The request may be answered before the restarted daemon saw the host Ready: ask until it is done.
    if out.status.code() != Some(0) {
        wait_for(
            "a good backup after the restart",
            Duration::from_secs(300),
            || {
                get(&daemon, "/api/v1/deployments/demo")
                    .filter(|d| d["status"]["backups"][0]["result"] == "Succeeded")
            },
        );
    }
    let check = Command::new("restic")
        .args(["check"])
        .env("RESTIC_REPOSITORY", &repository)
        .env("RESTIC_PASSWORD_FILE", shared.path().join("pw"))
        .env("RESTIC_CACHE_DIR", lab.path().join("restic-cache"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "no lock or damage is left: {}",
        String::from_utf8_lossy(&check.stderr)
    );
}

/// The restic processes of `repository` running `subcommand` (by PID, started by this test's daemon).
fn restic_running(repository: &std::path::Path, subcommand: &str) -> Vec<i32> {
    restic_pids(repository)
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == subcommand.as_bytes()))
        })
        .collect()
}

#[test]
fn a_daemon_killed_during_a_restore_restores_and_verifies_the_host_after_a_restart() {
    let lab = Lab::new();
    let alpha = lab.host("demo-alpha");
    let data = alpha.root.join("nix/var/app-data");
    std::fs::create_dir_all(data.join("media")).unwrap();
    // Enough data that restic is still restoring when the daemon is killed.
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c 150000000 /dev/urandom > '{}/big.bin'",
            data.display()
        ))
        .status()
        .unwrap();
    assert!(status.success());
    for i in 0..200 {
        std::fs::write(data.join(format!("media/{i}.bin")), vec![i as u8; 3000]).unwrap();
    }
    let shared = tempfile::tempdir().unwrap();
    let repository = shared.path().join("repo");
    std::fs::write(shared.path().join("pw"), "a restore password\n").unwrap();
    let app_yaml = "apiVersion: fediversity.eu/v1alpha1\nkind: Application\nmetadata: { name: alpha }\nspec:\n  \
displayName: Probe\n  nixosModule: nix/applications/probe.nix\n  sizes: { small: { cores: 1, memoryMiB: 512, diskGiB: 10 } }\n  \
settings:\n    type: object\n    additionalProperties: false\n    properties:\n      message: { type: string }\n  \
data: { paths: [/nix/var/app-data] }\n";
    let write_source = |lab: &Lab, host: &nixos_support::TestHost, restore: &str| {
        let source = lab.path().join("source");
        std::fs::create_dir_all(&source).unwrap();
        std::fs::write(
            source.join("env.yaml"),
            format!(
                "{}  backup: {{ repository: {}, passwordFile: {}, schedule: 1d }}\n",
                lab.environment_yaml("lab", &[host]),
                repository.display(),
                shared.path().join("pw").display()
            ),
        )
        .unwrap();
        std::fs::write(source.join("alpha.yaml"), app_yaml).unwrap();
        std::fs::write(
            source.join("demo.yaml"),
            format!(
                "apiVersion: fediversity.eu/v1alpha1\nkind: Deployment\nmetadata: {{ name: demo }}\nspec:\n  \
domain: lab.example\n  runtimeEnvironment: lab\n{restore}  applications:\n    alpha: {{ settings: {{ message: hello }} }}\n"
            ),
        )
        .unwrap();
        source
    };
    // A first controller backs the host up.
    let source = write_source(&lab, &alpha, "");
    let daemon = start(&source, &lab.path().join("state"), &lab.catalog());
    wait_for("the Deployment to become Ready", Duration::from_secs(120), || {
        get(&daemon, "/api/v1/deployments/demo").filter(|d| d["status"]["hosts"][0]["phase"] == "Ready")
    });
    let out = Command::new(env!("CARGO_BIN_EXE_fediversity"))
        .args([
            "backup",
            "deployment",
            "demo",
            "--wait",
            "--timeout",
            "300s",
            "--server",
        ])
        .arg(&daemon.server)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    drop(daemon);

    // Another controller starts the Deployment on a fresh host from that snapshot, and is killed
    // (with its SSH clients and the host's restic) while restic restores.
    let lab2 = Lab::new();
    let fresh = lab2.host("demo-alpha");
    let source2 = write_source(&lab2, &fresh, "  restore: { snapshot: latest }\n");
    let state2 = lab2.path().join("state");
    let daemon2 = start(&source2, &state2, &lab2.catalog());
    let restoring = wait_for(
        "restic to restore onto the fresh host",
        Duration::from_secs(240),
        || {
            let pids = restic_running(&repository, "restore");
            (!pids.is_empty() && repository.join("locks").read_dir().ok()?.next().is_some()).then_some(pids)
        },
    );
    kill_daemon(daemon2);
    for pid in &restoring {
        let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    }
    // Killed midway: restic's lock is left in the repository, the host is not restored, and its data
    // path is not in place yet.
    assert!(
        repository.join("locks").read_dir().unwrap().next().is_some(),
        "a killed restic leaves its lock"
    );
    assert!(!fresh.root.join("backup-files/restored").exists());
    assert!(!fresh.root.join("nix/var/app-data/big.bin").exists());
    assert!(fresh.app_starts().iter().all(|(what, _)| what == "held"));

    // After a restart the restore runs again to the end and verifies.
    let daemon2 = start(&source2, &state2, &lab2.catalog());
    let d = wait_for(
        "the host to be restored after the restart",
        Duration::from_secs(300),
        || {
            get(&daemon2, "/api/v1/deployments/demo").filter(|d| {
                let r = &d["status"]["restore"]["hosts"][0]["result"];
                r == "Restored" || r == "Failed"
            })
        },
    );
    let r = &d["status"]["restore"]["hosts"][0];
    assert_eq!(
        (r["result"].as_str(), r["verified"].as_bool()),
        (Some("Restored"), Some(true)),
        "{r}"
    );
    for name in ["big.bin", "media/7.bin", "media/199.bin"] {
        assert_eq!(
            std::fs::read(fresh.root.join("nix/var/app-data").join(name)).unwrap(),
            std::fs::read(data.join(name)).unwrap(),
            "{name}"
        );
    }
    // Nothing is left behind: the host's work folder is clean, and an exclusive check of the
    // repository runs (the killed restic's stale lock was ours and was cleared).
    wait_for("a backup of the restored host", Duration::from_secs(180), || {
        get(&daemon2, "/api/v1/deployments/demo")
            .filter(|d| d["status"]["backups"][0]["result"] == "Succeeded")
    });
    assert!(!fresh.root.join("backup-files/restore").exists());
    let check = Command::new("restic")
        .args(["check"])
        .env("RESTIC_REPOSITORY", &repository)
        .env("RESTIC_PASSWORD_FILE", shared.path().join("pw"))
        .env("RESTIC_CACHE_DIR", lab2.path().join("restic-cache"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "no lock or damage is left: {}",
        String::from_utf8_lossy(&check.stderr)
    );
}

#[test]
fn an_in_place_restore_on_the_command_line_says_what_it_would_lose_and_once_confirmed_puts_the_snapshot_back_even_across_a_daemon_kill()
 {
    backup_support::require_tools();
    let lab = Lab::new();
    // The host runs a real PostgreSQL of its own (data in its private /nix, socket on a private tmpfs).
    let (host, _postgres) = postgres_host(&lab, "demo-app");
    let root = lab.path().join("host-demo-app");
    on_host(
        &lab,
        &host,
        "runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -d postgres -c 'CREATE ROLE app LOGIN' -c 'CREATE DATABASE app OWNER app'",
    );
    on_host(
        &lab,
        &host,
        &format!(
            "runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -d app -c 'SET ROLE app' -c {}",
            backup_support::shell(backup_support::SEED_SQL)
        ),
    );
    let data = root.join("nix/var/app-data");
    std::fs::create_dir_all(data.join("media")).unwrap();
    for i in 0..100u8 {
        std::fs::write(data.join(format!("media/{i}.bin")), vec![i; 2048]).unwrap();
    }
    // Enough data that restic is still restoring when the daemon is killed below.
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c 120000000 /dev/urandom > '{}/big.bin'",
            data.display()
        ))
        .status()
        .unwrap();
    assert!(status.success());
    let big = std::fs::read(data.join("big.bin")).unwrap();

    let shared = tempfile::tempdir().unwrap();
    std::fs::write(shared.path().join("pw"), "an in-place password\n").unwrap();
    let source = lab.path().join("source");
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(
        source.join("env.yaml"),
        format!(
            "{}  backup: {{ repository: {}, passwordFile: {}, schedule: 1d }}\n",
            lab.environment_yaml("lab", &[&host]),
            shared.path().join("repo").display(),
            shared.path().join("pw").display()
        ),
    )
    .unwrap();
    std::fs::write(
        source.join("app.yaml"),
        "apiVersion: fediversity.eu/v1alpha1\nkind: Application\nmetadata: { name: app }\nspec:\n  \
displayName: Probe\n  nixosModule: nix/applications/probe.nix\n  sizes: { small: { cores: 1, memoryMiB: 512, diskGiB: 10 } }\n  \
data: { paths: [/nix/var/app-data], databases: [app] }\n",
    )
    .unwrap();
    std::fs::write(
        source.join("demo.yaml"),
        "apiVersion: fediversity.eu/v1alpha1\nkind: Deployment\nmetadata: { name: demo }\nspec:\n  \
domain: lab.example\n  runtimeEnvironment: lab\n  applications: { app: {} }\n",
    )
    .unwrap();
    let daemon = start(&source, &lab.path().join("state"), &lab.catalog());
    wait_for("the Deployment to become Ready", Duration::from_secs(120), || {
        get(&daemon, "/api/v1/deployments/demo").filter(|d| d["status"]["hosts"][0]["phase"] == "Ready")
    });
    let cli = |server: &str, args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_fediversity"))
            .args(args)
            .arg("--server")
            .arg(server)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("fediversity {args:?}:\n{text}");
        (out.status.code(), text)
    };
    let (code, _) = cli(
        &daemon.server,
        &["backup", "deployment", "demo", "--wait", "--timeout", "300s"],
    );
    assert_eq!(code, Some(0));
    let snapshot = get(&daemon, "/api/v1/deployments/demo").unwrap()["status"]["backups"][0]["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let listed = get(&daemon, "/api/v1/backups/demo").unwrap();
    let taken = listed["items"][0]["time"].as_str().unwrap().to_owned();
    let seeded = sql(&lab, &host, "SELECT count(*) FROM events");
    let orders = sql(&lab, &host, "SELECT count(*), sum(amount) FROM orders");

    // Written after the snapshot: rows, a new file, a changed file.
    sql(
        &lab,
        &host,
        "INSERT INTO events(body) SELECT 'after the snapshot ' || i FROM generate_series(1, 500) i; \
UPDATE orders SET amount = 0 WHERE id <= 100",
    );
    std::fs::write(data.join("after.txt"), "written after the snapshot").unwrap();
    std::fs::write(data.join("media/1.bin"), b"changed").unwrap();

    // The API never restores in place without the confirmation.
    let refused = Command::new("curl")
        .args([
            "--silent",
            "--output",
            "/dev/null",
            "--write-out",
            "%{http_code}",
            "-X",
            "POST",
        ])
        .arg(format!(
            "http://{}/api/v1/deployments/demo/restore",
            daemon.server
        ))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&refused.stdout), "400");
    // Without --confirm: what it would do and lose, and nothing done.
    let (code, text) = cli(&daemon.server, &["restore", "deployment", "demo"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains(&format!("with snapshot {} taken {taken}", &snapshot[..8]))
            && text.contains(&format!(
                "Everything written to demo-app after {taken} would be lost"
            ))
            && text.contains("databases (app)")
            && text.contains("Nothing was done"),
        "{text}"
    );
    assert!(data.join("after.txt").exists());
    assert_eq!(
        sql(
            &lab,
            &host,
            "SELECT count(*) FROM events WHERE body LIKE 'after the snapshot%'"
        ),
        "500"
    );

    // Confirmed, by the snapshot's ID: the snapshot's data is back and what came after is gone.
    let (code, text) = cli(
        &daemon.server,
        &[
            "restore",
            "deployment",
            "demo",
            "--snapshot",
            &snapshot[..8],
            "--confirm",
            "--wait",
            "--timeout",
            "300s",
        ],
    );
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("demo-app: Restored"), "{text}");
    assert_eq!(
        sql(
            &lab,
            &host,
            "SELECT count(*) FROM events WHERE body LIKE 'after the snapshot%'"
        ),
        "0"
    );
    assert_eq!(sql(&lab, &host, "SELECT count(*) FROM events"), seeded);
    assert_eq!(
        sql(&lab, &host, "SELECT count(*), sum(amount) FROM orders"),
        orders
    );
    assert_eq!(
        sql(
            &lab,
            &host,
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'app'"
        ),
        "app"
    );
    assert!(!data.join("after.txt").exists());
    assert_eq!(std::fs::read(data.join("media/1.bin")).unwrap(), vec![1u8; 2048]);

    // Status and events say so.
    let d = get(&daemon, "/api/v1/deployments/demo").unwrap();
    let r = &d["status"]["restore"]["hosts"][0];
    assert_eq!(
        (r["host"].as_str(), r["result"].as_str(), r["verified"].as_bool()),
        (Some("demo-app"), Some("Restored"), Some(true)),
        "{r}"
    );
    assert!(r["snapshot"].as_str().unwrap().starts_with(&snapshot[..8]), "{r}");
    let message = r["message"].as_str().unwrap();
    assert!(
        message.contains("in place") && message.contains(&taken) && message.contains("healthy"),
        "{message}"
    );
    let events = get(&daemon, "/api/v1/events?kind=Deployment&name=demo")
        .unwrap()
        .to_string();
    assert!(
        events.contains("RestoringInPlace")
            && events.contains("what was written since is lost")
            && events.contains("\"Restored\""),
        "{events}"
    );
    assert!(!d.to_string().contains("an in-place password") && !events.contains("an in-place password"));

    // A daemon killed (with its SSH clients and the host's restic) during an in-place restore finishes
    // it after a restart: the host recorded it, its data is put back and verified.
    sql(
        &lab,
        &host,
        "INSERT INTO events(body) SELECT 'after the snapshot ' || i FROM generate_series(1, 300) i",
    );
    std::fs::write(data.join("big.bin"), b"overwritten after the snapshot").unwrap();
    let (code, text) = cli(&daemon.server, &["restore", "deployment", "demo", "--confirm"]);
    assert_eq!(code, Some(0), "{text}");
    let repository = shared.path().join("repo");
    let restoring = wait_for("restic to restore in place", Duration::from_secs(180), || {
        let pids = restic_running(&repository, "restore");
        (!pids.is_empty() && repository.join("locks").read_dir().ok()?.next().is_some()).then_some(pids)
    });
    kill_daemon(daemon);
    for pid in &restoring {
        let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    }
    let record = root.join("backup-files/in-place");
    assert!(
        std::fs::read_to_string(&record)
            .unwrap()
            .starts_with(&snapshot[..8]),
        "the host records the unfinished restore"
    );
    let daemon = start(&source, &lab.path().join("state"), &lab.catalog());
    wait_for(
        "the in-place restore to be finished after the restart",
        Duration::from_secs(300),
        || {
            (!record.exists()).then_some(())?;
            get(&daemon, "/api/v1/deployments/demo")
                .filter(|d| d["status"]["restore"]["hosts"][0]["result"] == "Restored")
        },
    );
    let r = &get(&daemon, "/api/v1/deployments/demo").unwrap()["status"]["restore"]["hosts"][0];
    assert_eq!(r["verified"], true, "{r}");
    assert!(r["message"].as_str().unwrap().starts_with("in place"), "{r}");
    assert_eq!(
        sql(
            &lab,
            &host,
            "SELECT count(*) FROM events WHERE body LIKE 'after the snapshot%'"
        ),
        "0"
    );
    assert!(std::fs::read(data.join("big.bin")).unwrap() == big);
}
