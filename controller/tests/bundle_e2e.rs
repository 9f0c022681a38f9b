//! Moving a Deployment between two providers that run separate controllers: `fediversity export
//! deployment NAME -o DIR --final` at the first, `fediversity import DIR --environment ENV` at the
//! second. Two real daemons, each with its own state, environment, test host (real PostgreSQL, real
//! files) and restic repository over sftp on its own loopback sshd; tampered bundles are refused.

mod backup_support;
mod common;
mod nixos_support;
mod postgres_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Daemon, get, http_get, wait_for};
use fediversity::api::DataSpec;
use fediversity::backup::bundle::{self, Index};
use fediversity::backup::manifest;
use nixos_support::{Lab, NIX_CONFIG, TestHost};
use postgres_support::{on_host, postgres_host, sql};
use serde_json::Value;

const APP: &str = "apiVersion: fediversity.eu/v1alpha1\nkind: Application\nmetadata: { name: app }\nspec:\n  \
displayName: Probe\n  nixosModule: nix/applications/probe.nix\n  sizes: { small: { cores: 1, memoryMiB: 512, diskGiB: 10 } }\n  \
data: { paths: [/nix/var/app-data], databases: [app] }\n";

/// A second Application whose host holds only files.
const FILES: &str = "apiVersion: fediversity.eu/v1alpha1\nkind: Application\nmetadata: { name: files }\nspec:\n  \
displayName: Files\n  nixosModule: nix/applications/probe.nix\n  sizes: { small: { cores: 1, memoryMiB: 512, diskGiB: 10 } }\n  \
data: { paths: [/nix/var/files-data] }\n";

/// The first provider's repository password: it must never reach the bundle or any output.
const PROVIDER_PASSWORD: &str = "correct horse battery staple";

/// The environment `name` of `lab` with `host`, backed up to `repo`'s sftp repository.
fn environment(lab: &Lab, name: &str, hosts: &[&TestHost], repo: &backup_support::Lab) -> String {
    let b = repo.backup_spec();
    format!(
        "{}  backup: {{ repository: \"{}\", passwordFile: {}, sftpIdentityFile: {}, sftpKnownHostsFile: {}, schedule: 1d }}\n",
        lab.environment_yaml(name, hosts),
        b.repository,
        b.password_file,
        b.sftp_identity_file.unwrap(),
        b.sftp_known_hosts_file.unwrap()
    )
}

fn cli(daemon: &Daemon, args: &[&str]) -> (i32, String) {
    let (code, text) = common::cli(daemon, args);
    eprintln!("fediversity {args:?} -> {code}:\n{text}");
    (code, text)
}

/// The live files and database checksums of `host` (over SSH, as the controller reads them).
fn live(lab: &Lab, host: &TestHost) -> (manifest::FileManifest, Vec<manifest::DatabaseSums>) {
    let ssh = lab.ssh_host(host);
    let data = DataSpec {
        paths: vec!["/nix/var/app-data".into()],
        databases: vec!["app".into()],
        services: vec![],
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(fediversity::backup::Backuper::default().live_state(&ssh, &data))
        .unwrap()
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    assert!(
        Command::new("cp")
            .arg("-a")
            .arg(from)
            .arg(to)
            .status()
            .unwrap()
            .success()
    );
}

#[test]
fn a_deployment_exported_final_from_one_provider_is_imported_at_another_ready_with_equal_verified_data_and_tampered_bundles_create_nothing()
 {
    backup_support::require_tools();
    // Provider A: its host with data, its repository, its controller.
    let lab_a = Lab::new();
    let repo_a = backup_support::Lab::new();
    let (host_a, _pg_a) = postgres_host(&lab_a, "op-app");
    let files_a = lab_a.host("op-files");
    let plain_a = files_a.root.join("nix/var/files-data");
    std::fs::create_dir_all(&plain_a).unwrap();
    for i in 0..20u8 {
        std::fs::write(
            plain_a.join(format!("{i}.txt")),
            vec![b'a' + i; 100 + usize::from(i)],
        )
        .unwrap();
    }
    on_host(
        &lab_a,
        &host_a,
        "runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -d postgres -c 'CREATE ROLE app LOGIN' -c 'CREATE DATABASE app OWNER app'",
    );
    on_host(
        &lab_a,
        &host_a,
        &format!(
            "runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -d app -c 'SET ROLE app' -c {}",
            backup_support::shell(backup_support::SEED_SQL)
        ),
    );
    let data_a = host_a.root.join("nix/var/app-data");
    std::fs::create_dir_all(data_a.join("media")).unwrap();
    for i in 0..200u32 {
        let bytes: Vec<u8> = (0..(500 + i * 13))
            .map(|b| (b.wrapping_mul(31) ^ i) as u8)
            .collect();
        std::fs::write(data_a.join(format!("media/{i:03}.bin")), bytes).unwrap();
    }
    std::fs::write(data_a.join("ünïcødé name.txt"), "héllo\n").unwrap();
    std::os::unix::fs::symlink("media/001.bin", data_a.join("latest")).unwrap();

    let source_a = lab_a.path().join("source");
    std::fs::create_dir_all(&source_a).unwrap();
    std::fs::write(
        source_a.join("env.yaml"),
        environment(&lab_a, "lab-a", &[&host_a, &files_a], &repo_a),
    )
    .unwrap();
    std::fs::write(source_a.join("app.yaml"), APP).unwrap();
    std::fs::write(source_a.join("files.yaml"), FILES).unwrap();
    std::fs::write(
        source_a.join("op.yaml"),
        "apiVersion: fediversity.eu/v1alpha1\nkind: Deployment\nmetadata: { name: op, labels: { tier: gold } }\nspec:\n  \
domain: op.example\n  runtimeEnvironment: lab-a\n  applications: { app: {}, files: {} }\n",
    )
    .unwrap();
    let daemon_a = common::start_with_catalog(
        &source_a,
        &lab_a.path().join("state"),
        &lab_a.catalog(),
        NIX_CONFIG,
    );
    // The first scheduled backup of each host runs once it is Ready.
    wait_for(
        "the first backups on provider A",
        Duration::from_secs(300),
        || {
            get(&daemon_a, "/api/v1/deployments/op").filter(|d| {
                d["status"]["backups"]
                    .as_array()
                    .is_some_and(|b| b.len() == 2 && b.iter().all(|b| b["result"] == "Succeeded"))
            })
        },
    );
    // Written after that backup: only a final snapshot carries it.
    sql(
        &lab_a,
        &host_a,
        "INSERT INTO events(body) SELECT 'after the last backup ' || i FROM generate_series(1, 700) i; \
UPDATE orders SET amount = amount + 1 WHERE id <= 50",
    );
    std::fs::write(data_a.join("after.txt"), "written after the last backup").unwrap();
    std::fs::write(plain_a.join("late.txt"), "also after the last backup").unwrap();
    let events_a = sql(&lab_a, &host_a, "SELECT count(*) FROM events");
    let orders_a = sql(&lab_a, &host_a, "SELECT count(*), sum(amount) FROM orders");
    assert_eq!(events_a, "700");

    // The API never stops services for an export without the confirmation.
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
            "http://{}/api/v1/deployments/op/final-backup",
            daemon_a.server
        ))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&refused.stdout), "400");

    // A trial export while the services run: each host's latest snapshot, without the later writes.
    let out = tempfile::tempdir().unwrap();
    let trial = out.path().join("trial");
    let (code, text) = cli(
        &daemon_a,
        &["export", "deployment", "op", "-o", trial.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("Not final: the services still run"), "{text}");
    let trial_index: Index =
        serde_json::from_str(&std::fs::read_to_string(trial.join("bundle.json")).unwrap()).unwrap();
    assert!(!trial_index.final_snapshot);
    let trial_manifest: bundle::HostManifest =
        serde_json::from_slice(&std::fs::read(trial.join("manifests/op-app.json")).unwrap()).unwrap();
    assert!(
        trial_manifest
            .files
            .entries
            .contains_key("/nix/var/app-data/media/001.bin")
    );
    assert!(
        !trial_manifest
            .files
            .entries
            .contains_key("/nix/var/app-data/after.txt")
    );
    // A folder in use is refused.
    let (code, text) = cli(
        &daemon_a,
        &["export", "deployment", "op", "-o", trial.to_str().unwrap()],
    );
    assert_eq!(code, 1);
    assert!(text.contains("exists and is not empty"), "{text}");

    // Export, final.
    let dir = out.path().join("op-bundle");
    let (code, text) = cli(
        &daemon_a,
        &[
            "export",
            "deployment",
            "op",
            "-o",
            dir.to_str().unwrap(),
            "--final",
            "--timeout",
            "300s",
        ],
    );
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("stay stopped")
            && text.contains("systemctl start")
            && text.contains("op-app: snapshot"),
        "{text}"
    );
    for file in [
        "bundle.json",
        "deployment.yaml",
        "manifests/op-app.json",
        "repository/config",
        "repository.password",
    ] {
        assert!(dir.join(file).is_file(), "{file}");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("repository.password"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let bundle_password = std::fs::read_to_string(dir.join("repository.password")).unwrap();
    assert!(!text.contains(bundle_password.trim()) && !text.contains(PROVIDER_PASSWORD));
    for file in files_under(&dir) {
        let bytes = std::fs::read(&file).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(PROVIDER_PASSWORD),
            "{} holds the provider's password",
            file.display()
        );
    }
    let portable = std::fs::read_to_string(dir.join("deployment.yaml")).unwrap();
    assert!(
        !portable.contains("runtimeEnvironment")
            && !portable.contains("lab-a")
            && portable.contains("op.example"),
        "{portable}"
    );
    let index: Index =
        serde_json::from_str(&std::fs::read_to_string(dir.join("bundle.json")).unwrap()).unwrap();
    assert!(index.final_snapshot);
    assert_eq!(index.hosts.len(), 2);
    // The bundle's repository is its own: only this Deployment's final snapshot, under the new password.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let in_bundle = rt
        .block_on(bundle::snapshots_in(
            &dir.join("repository"),
            &dir.join("repository.password"),
        ))
        .unwrap();
    let mut held: Vec<&str> = in_bundle.iter().map(|s| s.id.as_str()).collect();
    let mut listed: Vec<&str> = index.hosts.iter().map(|h| h.snapshot.as_str()).collect();
    held.sort();
    listed.sort();
    assert_eq!(held, listed, "{in_bundle:?}");
    let d = get(&daemon_a, "/api/v1/deployments/op").unwrap();
    assert_eq!(d["status"]["export"]["final"], true, "{d}");
    // The final snapshot (restic's short ID) is the one the bundle carries a copy of.
    for h in &index.hosts {
        let entry = d["status"]["export"]["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["host"] == h.host.as_str())
            .unwrap();
        let final_id = entry["snapshot"].as_str().unwrap();
        assert!(final_id.len() >= 8 && h.original.starts_with(final_id), "{d}");
    }
    let events = get(&daemon_a, "/api/v1/events?kind=Deployment&name=op")
        .unwrap()
        .to_string();
    assert!(events.contains("StoppedForExport"), "{events}");
    let metrics = http_get(&daemon_a.server, "/metrics").unwrap().1;
    let finals = format!(
        "fediversity_final_backups_total{{result=\"Succeeded\"}} {}",
        index.hosts.len()
    );
    assert!(metrics.contains(&finals), "no `{finals}` in {metrics}");
    let (live_a, dbs_a) = live(&lab_a, &host_a);
    drop(daemon_a);

    // Provider B: a fresh host, its own repository, its own controller with an API token.
    let lab_b = Lab::new();
    let repo_b = backup_support::Lab::new();
    let (host_b, _pg_b) = postgres_host(&lab_b, "op-app");
    let files_b_host = lab_b.host("op-files");
    assert!(!host_b.root.join("nix/var/app-data").exists());
    let source_b = lab_b.path().join("source");
    std::fs::create_dir_all(&source_b).unwrap();
    std::fs::write(
        source_b.join("env.yaml"),
        environment(&lab_b, "lab-b", &[&host_b, &files_b_host], &repo_b),
    )
    .unwrap();
    std::fs::write(source_b.join("app.yaml"), APP).unwrap();
    std::fs::write(source_b.join("files.yaml"), FILES).unwrap();
    let token = lab_b.path().join("token");
    std::fs::write(&token, "an api token for provider b\n").unwrap();
    let args: Vec<std::ffi::OsString> = vec![
        "--source".into(),
        source_b.clone().into(),
        "--state-dir".into(),
        lab_b.path().join("state").into(),
        "--provider".into(),
        "plan-only".into(),
        "--nixos-catalog".into(),
        lab_b.catalog().into(),
        "--api-token-file".into(),
        token.clone().into(),
    ];
    let daemon_b = common::spawn_with_env(&args, &[("NIX_CONFIG", NIX_CONFIG)]);
    wait_for(
        "provider B's daemon to become ready",
        Duration::from_secs(60),
        || {
            http_get(&daemon_b.server, "/readyz")
                .is_some_and(|(c, _)| c == 200)
                .then_some(())
        },
    );
    let import = |dir: &Path| {
        cli(
            &daemon_b,
            &[
                "import",
                dir.to_str().unwrap(),
                "--environment",
                "lab-b",
                "--wait",
                "--timeout",
                "400s",
                "--token-file",
                token.to_str().unwrap(),
            ],
        )
    };

    // Tampered bundles are refused, each with the file and what is wrong, and create nothing.
    let tampered = |name: &str, change: &dyn Fn(&Path)| {
        let copy = out.path().join(name);
        copy_dir(&dir, &copy);
        change(&copy);
        copy
    };
    let changed_index = tampered("changed-index", &|d| {
        let text = std::fs::read_to_string(d.join("bundle.json")).unwrap();
        std::fs::write(
            d.join("bundle.json"),
            text.replace("\"final\": true", "\"final\": false"),
        )
        .unwrap();
    });
    let changed_manifest = tampered("changed-manifest", &|d| {
        let mut text = std::fs::read(d.join("manifests/op-app.json")).unwrap();
        text.extend_from_slice(b" ");
        std::fs::write(d.join("manifests/op-app.json"), text).unwrap();
    });
    // A forger who also recomputes every checksum is caught by the snapshot's own manifest.
    let forged_manifest = tampered("forged-manifest", &|d| {
        let path = d.join("manifests/op-app.json");
        let text = std::fs::read_to_string(&path).unwrap();
        let forged = text.replacen("\"rows\": 20000", "\"rows\": 20001", 1);
        assert_ne!(forged, text);
        std::fs::write(&path, &forged).unwrap();
        let mut index: Index =
            serde_json::from_str(&std::fs::read_to_string(d.join("bundle.json")).unwrap()).unwrap();
        index.files.insert(
            "manifests/op-app.json".into(),
            bundle::sha256_hex(forged.as_bytes()),
        );
        std::fs::write(d.join("bundle.json"), index.seal().1).unwrap();
    });
    let missing_repository = tampered("missing-repository", &|d| {
        std::fs::remove_dir_all(d.join("repository")).unwrap();
    });
    for (bad, want) in [
        (
            &changed_index,
            "bundle.json, field `checksum`: the index hashes to",
        ),
        (&changed_manifest, "manifests/op-app.json: its SHA-256 is"),
        (
            &forged_manifest,
            "manifests/op-app.json: does not match the manifest inside snapshot",
        ),
        (&missing_repository, "repository/: missing from the bundle"),
    ] {
        let (code, text) = import(bad);
        assert_eq!(code, 1, "{text}");
        assert!(
            text.contains(want) && text.contains("nothing was created"),
            "{want}: {text}"
        );
        assert!(!text.contains(bundle_password.trim()), "{text}");
        let (status, _) = http_get(&daemon_b.server, "/api/v1/deployments/op").unwrap();
        assert_eq!(status, 404, "a refused bundle created the Deployment");
        assert!(
            !repo_b.repository().join("config").exists(),
            "a refused bundle reached provider B's repository"
        );
    }

    // The bundle as exported is imported: the Deployment becomes Ready with the data restored and verified.
    let (code, text) = import(&dir);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("op-app: restored from snapshot")
            && text.contains("verified against the bundle's manifest")
            && text.contains("Set at your domain"),
        "{text}"
    );
    assert!(!text.contains(bundle_password.trim()));
    let d = get(&daemon_b, "/api/v1/deployments/op").unwrap();
    assert_eq!(d["spec"]["runtimeEnvironment"], "lab-b");
    assert_eq!(d["metadata"]["labels"]["tier"], "gold", "{d}");
    let restored = d["status"]["restore"]["hosts"].as_array().unwrap();
    assert_eq!(restored.len(), 2, "{d}");
    for r in restored {
        assert_eq!(
            (r["result"].as_str(), r["verified"].as_bool()),
            (Some("Restored"), Some(true)),
            "{r}"
        );
    }
    let metrics = http_get(&daemon_b.server, "/metrics").unwrap().1;
    assert!(
        metrics.contains("fediversity_restores_total{result=\"Restored\"} 2")
            && metrics.contains("fediversity_restores_total{result=\"Failed\"} 0"),
        "{metrics}"
    );
    // Two hosts: each started from `latest`, which the import checked is the bundle's snapshot.
    assert_eq!(d["spec"]["restore"]["snapshot"], "latest", "{d}");
    assert_eq!(common::ready(&d).map(|(s, _)| s), Some("True".to_owned()), "{d}");
    assert!(!d.to_string().contains(bundle_password.trim()));
    // Equal data: rows and sums (including what was written after the last regular backup), every
    // file's hash, mode and owner, every table's checksum; and equal to the bundle's manifest.
    assert_eq!(sql(&lab_b, &host_b, "SELECT count(*) FROM events"), events_a);
    assert_eq!(
        sql(&lab_b, &host_b, "SELECT count(*), sum(amount) FROM orders"),
        orders_a
    );
    let (files_b, dbs_b) = live(&lab_b, &host_b);
    assert!(live_a.files() > 200);
    assert_eq!(manifest::compare_files(&live_a, &files_b), Vec::<String>::new());
    assert_eq!(dbs_a, dbs_b);
    let recorded: bundle::HostManifest =
        serde_json::from_slice(&std::fs::read(dir.join("manifests/op-app.json")).unwrap()).unwrap();
    assert_eq!(
        manifest::compare_files(&recorded.files, &files_b),
        Vec::<String>::new()
    );
    assert_eq!(recorded.databases["app"], dbs_b[0]);
    assert_eq!(
        std::fs::read(host_b.root.join("nix/var/app-data/after.txt")).unwrap(),
        b"written after the last backup"
    );
    for name in ["0.txt", "19.txt", "late.txt"] {
        assert_eq!(
            std::fs::read(files_b_host.root.join("nix/var/files-data").join(name)).unwrap(),
            std::fs::read(plain_a.join(name)).unwrap(),
            "{name}"
        );
    }
    // Provider B's repository now holds the snapshot (the same content: the same tree).
    let listed = repo_b.restic(&["snapshots", "--json"]);
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    for h in &index.hosts {
        assert!(
            listed
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["tree"] == h.tree.as_str() && s["original"] == h.original.as_str()),
            "{listed}"
        );
    }
    // Importing again is refused: the Deployment exists.
    let (code, text) = import(&dir);
    assert_eq!(code, 1);
    assert!(text.contains("already exists"), "{text}");
}
