//! The daemon backs up a Ready host of a Deployment whose environment has `spec.backup`, on demand
//! through `fediversity backup deployment NAME --wait`, and another controller starts the same
//! Deployment on a fresh host from that snapshot (`spec.restore`): real Nix, real OpenSSH, real restic.

mod common;
mod nixos_support;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Daemon, http_get, wait_for};
use nixos_support::{Lab, NIX_CONFIG};
use serde_json::Value;

fn start(source: &std::path::Path, state: &std::path::Path, catalog: &std::path::Path) -> Daemon {
    common::start_with_catalog(source, state, catalog, NIX_CONFIG)
}

fn get(daemon: &Daemon, path: &str) -> Option<Value> {
    let (code, body) = http_get(&daemon.server, path)?;
    (code == 200).then(|| serde_json::from_str(&body).ok()).flatten()
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
    let mut daemon = start(&source, &state, &lab.catalog());
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
    // SIGKILL of the daemon and of its SSH clients, as a service manager kills the whole unit.
    let pid = daemon.child.id().to_string();
    let children: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let ppid = stat.rsplit(')').next()?.split_whitespace().nth(1)?;
            (ppid == pid).then(|| e.file_name().to_string_lossy().into_owned())
        })
        .collect();
    let _ = daemon.child.kill();
    for child in &children {
        let _ = Command::new("kill").args(["-KILL", child]).status();
    }
    let _ = daemon.child.wait();
    drop(daemon);

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
