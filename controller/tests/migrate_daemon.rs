//! The daemon moves a Deployment when its `spec.runtimeEnvironment` changes: two environments of
//! existing machines (loopback sshd hosts with real NixOS-style deploys, a real PostgreSQL and real
//! files each), copied with restic, verified, and finished by a restarted daemon after a SIGKILL in
//! the middle of the migration.

mod backup_support;
mod common;
mod nixos_support;
mod postgres_support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Daemon, get, hashes, http_get, kill_daemon, wait_for};
use nixos_support::{Lab, NIX_CONFIG, TestHost};
use postgres_support::{Postgres, on_host, postgres_host, sql};
use serde_json::Value;

/// The daemon on `source` with NixOS hosts converged from `catalog`, API writes needing `token`.
fn start(source: &Path, state: &Path, catalog: &Path, token: &Path) -> Daemon {
    let args: Vec<std::ffi::OsString> = [
        "--source".as_ref(),
        source.as_os_str(),
        "--state-dir".as_ref(),
        state.as_os_str(),
        "--provider".as_ref(),
        "plan-only".as_ref(),
        "--nixos-catalog".as_ref(),
        catalog.as_os_str(),
        "--api-token-file".as_ref(),
        token.as_os_str(),
    ]
    .iter()
    .map(|a| a.to_os_string())
    .collect();
    common::spawn_with_env(&args, &[("NIX_CONFIG", NIX_CONFIG)])
}

const QUERIES: [&str; 3] = [
    "SELECT count(*) FROM customers",
    "SELECT count(*), sum(amount) FROM orders",
    "SELECT count(*) FROM events",
];

/// Two environments `old` and `new` of one machine each (a real PostgreSQL and files on each), a
/// Deployment `demo` running in `old` with seeded data, and the daemon.
struct Rig {
    daemon: Option<Daemon>,
    source: std::path::PathBuf,
    state: std::path::PathBuf,
    token: std::path::PathBuf,
    old_host: TestHost,
    new_host: TestHost,
    data: std::path::PathBuf,
    policy: &'static str,
    _pg: (Postgres, Postgres),
    _shared: tempfile::TempDir,
    lab_old: Lab,
    lab_new: Lab,
}

impl Rig {
    fn new(policy: &'static str) -> Self {
        backup_support::require_tools();
        std::fs::create_dir_all("/run/postgresql").unwrap();
        // Two environments, each one existing machine named like the Deployment's host.
        let (lab_old, lab_new) = (Lab::new(), Lab::new());
        let (old_host, old_pg) = postgres_host(&lab_old, "demo-app");
        let (new_host, new_pg) = postgres_host(&lab_new, "demo-app");
        on_host(
            &lab_old,
            &old_host,
            "runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -d postgres -c 'CREATE ROLE app LOGIN' -c 'CREATE DATABASE app OWNER app'",
        );
        on_host(
            &lab_old,
            &old_host,
            &format!(
                "runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -d app -c 'SET ROLE app' -c {}",
                backup_support::shell(backup_support::SEED_SQL)
            ),
        );
        let data = old_host.root.join("nix/var/app-data");
        std::fs::create_dir_all(data.join("media")).unwrap();
        for i in 0..100u8 {
            std::fs::write(data.join(format!("media/{i}.bin")), vec![i; 2048]).unwrap();
        }
        // Enough data that the pre-copy still runs when the daemon is killed.
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "head -c 100000000 /dev/urandom > '{}/big.bin'",
                data.display()
            ))
            .status()
            .unwrap();
        assert!(status.success());

        let shared = tempfile::tempdir().unwrap();
        std::fs::write(shared.path().join("pw"), "a migration password\n").unwrap();
        let backup = format!(
            "  backup: {{ repository: {}, passwordFile: {}, schedule: 1d }}\n",
            shared.path().join("repo").display(),
            shared.path().join("pw").display()
        );
        let source = lab_old.path().join("source");
        std::fs::create_dir_all(&source).unwrap();
        std::fs::write(
            source.join("old.yaml"),
            format!("{}{backup}", lab_old.environment_yaml("old", &[&old_host])),
        )
        .unwrap();
        std::fs::write(
            source.join("new.yaml"),
            format!("{}{backup}", lab_new.environment_yaml("new", &[&new_host])),
        )
        .unwrap();
        std::fs::write(
            source.join("app.yaml"),
            "apiVersion: fediversity.eu/v1alpha1\nkind: Application\nmetadata: { name: app }\nspec:\n  \
displayName: Probe\n  nixosModule: nix/applications/probe.nix\n  sizes: { small: { cores: 1, memoryMiB: 512, diskGiB: 10 } }\n  \
data: { paths: [/nix/var/app-data], databases: [app] }\n",
        )
        .unwrap();
        let token = lab_old.path().join("token");
        std::fs::write(&token, "a-long-api-token-for-the-migration-test\n").unwrap();
        let mut rig = Self {
            daemon: None,
            state: lab_old.path().join("state"),
            source,
            token,
            old_host,
            new_host,
            data,
            policy,
            _pg: (old_pg, new_pg),
            _shared: shared,
            lab_old,
            lab_new,
        };
        rig.place("old");
        rig.start();
        wait_for("the Deployment to run in old", Duration::from_secs(180), || {
            get(rig.daemon(), "/api/v1/deployments/demo").filter(|d| {
                d["status"]["hosts"][0]["phase"] == "Ready" && d["status"]["runtimeEnvironment"] == "old"
            })
        });
        assert!(
            rig.new_host.activated().is_none(),
            "nothing was deployed in new yet"
        );
        rig
    }

    /// Writes the Deployment with `spec.runtimeEnvironment: env`.
    fn place(&self, env: &str) {
        std::fs::write(
            self.source.join("demo.yaml"),
            format!(
                "apiVersion: fediversity.eu/v1alpha1\nkind: Deployment\nmetadata: {{ name: demo }}\nspec:\n  \
domain: lab.example\n  runtimeEnvironment: {env}\n  deletionPolicy: {}\n  applications: {{ app: {{}} }}\n",
                self.policy
            ),
        )
        .unwrap();
    }

    fn start(&mut self) {
        self.daemon = Some(start(
            &self.source,
            &self.state,
            &self.lab_old.catalog(),
            &self.token,
        ));
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("the daemon runs")
    }

    fn cli(&self, args: &[&str], token: bool) -> (i32, String) {
        let mut command = Command::new(env!("CARGO_BIN_EXE_fediversity"));
        command
            .args(args)
            .args(["--server", &self.daemon().server])
            .env_remove("FEDIVERSITY_TOKEN_FILE");
        if token {
            command.arg("--token-file").arg(&self.token);
        }
        let out = command.output().unwrap();
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        eprintln!("fediversity {args:?}: {text}");
        (out.status.code().unwrap_or(-1), text)
    }

    fn migration(&self) -> Option<Value> {
        get(self.daemon(), "/api/v1/deployments/demo").map(|d| d["status"]["migration"].clone())
    }

    /// Asserts that the finished migration `done` verified, counted downtime and copied the 100 MB,
    /// and that the new machine holds `files` (path, SHA-256) and answers `rows` to [`QUERIES`].
    fn assert_moved(&self, done: &Value, files: &[(String, String)], rows: &[String]) {
        assert_eq!(done["verified"], true, "{done}");
        assert!(done["downtimeSeconds"].as_f64().unwrap() > 0.0, "{done}");
        assert!(done["bytesPreCopied"].as_u64().unwrap() >= 100_000_000, "{done}");
        let moved = self.new_host.root.join("nix/var/app-data");
        assert_eq!(hashes(&moved), files);
        let got: Vec<String> = QUERIES
            .iter()
            .map(|q| sql(&self.lab_new, &self.new_host, q))
            .collect();
        assert_eq!(got, rows);
    }

    fn events(&self) -> String {
        get(self.daemon(), "/api/v1/events?kind=Deployment&name=demo")
            .unwrap()
            .to_string()
    }
}

#[test]
fn changing_the_runtime_environment_moves_the_deployment_with_its_data_even_when_the_daemon_is_killed_midway()
{
    let mut rig = Rig::new("Retain");
    let data = rig.data.clone();
    // The Deployment is backed up (asked over the API, with the token).
    let asked = Command::new("curl")
        .args(["--silent", "--fail", "-X", "POST", "-H"])
        .arg(format!(
            "Authorization: Bearer {}",
            std::fs::read_to_string(&rig.token).unwrap().trim()
        ))
        .arg(format!(
            "http://{}/api/v1/deployments/demo/backup",
            rig.daemon().server
        ))
        .output()
        .unwrap();
    assert!(asked.status.success(), "{asked:?}");
    wait_for("the backup", Duration::from_secs(300), || {
        get(rig.daemon(), "/api/v1/deployments/demo")
            .filter(|d| d["status"]["backups"][0]["result"] == "Succeeded")
    });

    // Written after the backup: the migration carries it too.
    sql(
        &rig.lab_old,
        &rig.old_host,
        "INSERT INTO events(body) SELECT 'before the move ' || i FROM generate_series(1, 300) i",
    );
    std::fs::write(data.join("after-backup.txt"), "written after the backup").unwrap();
    let expected: Vec<String> = QUERIES
        .iter()
        .map(|q| sql(&rig.lab_old, &rig.old_host, q))
        .collect();
    let files = hashes(&data);

    // The operator changes the environment; the daemon is killed in the middle of the move.
    rig.place("new");
    let seen = wait_for("the migration to pre-copy", Duration::from_secs(240), || {
        rig.migration().filter(|m| m["phase"] == "PreCopying")
    });
    // Events and status reach the store within a fifth of a second; the record at once.
    std::thread::sleep(Duration::from_millis(600));
    eprintln!("killing the daemon during {}", seen["phase"]);
    kill_daemon(rig.daemon.take().unwrap());

    rig.start();
    let done = common::wait_migrated(Duration::from_secs(600), || rig.migration());
    eprintln!("{done:#}");
    assert_eq!(
        (done["from"].as_str(), done["to"].as_str()),
        (Some("old"), Some("new"))
    );
    assert_eq!(done["source"], "Retained", "{done}");
    // The data on the target equals the source's.
    rig.assert_moved(&done, &files, &expected);
    // The source was stopped and kept, its data untouched (the Deployment's policy is Retain).
    assert_eq!(
        std::fs::read_to_string(rig.old_host.root.join("backup-files/migration"))
            .unwrap()
            .trim(),
        "stopped"
    );
    assert_eq!(hashes(&data), files);
    // The target was held stopped until its data was there, and started afterwards.
    let starts = rig.new_host.app_starts();
    assert_eq!(
        starts.first().map(|(w, _)| w.as_str()),
        Some("held"),
        "{starts:?}"
    );

    let d = wait_for("the Deployment to run in new", Duration::from_secs(180), || {
        get(rig.daemon(), "/api/v1/deployments/demo").filter(|d| {
            d["status"]["runtimeEnvironment"] == "new"
                && common::ready(d).is_some_and(|(status, _)| status == "True")
        })
    });
    assert_eq!(
        rig.new_host.app_starts().last().map(|(w, _)| w.as_str()),
        Some("started"),
        "{:?}",
        rig.new_host.app_starts()
    );
    let migrating = d["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Migrating")
        .cloned()
        .unwrap_or_else(|| panic!("no Migrating condition: {d}"));
    assert_eq!(
        (migrating["status"].as_str(), migrating["reason"].as_str()),
        (Some("False"), Some("Migrated")),
        "{migrating}"
    );

    // One event per phase, across the restart.
    let events = rig.events();
    for reason in [
        "MigrationStarted",
        "MigrationPreCopying",
        "MigrationStoppingSource",
        "MigrationFinalCopying",
        "MigrationVerifying",
        "MigrationStartingTarget",
        "MigrationSwitchingNames",
        "MigrationRetiringSource",
        "Migrated",
    ] {
        assert!(events.contains(reason), "no {reason} event: {events}");
    }
    let metrics = http_get(&rig.daemon().server, "/metrics").unwrap().1;
    assert!(
        metrics.contains("fediversity_migrations_total{result=\"Succeeded\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fediversity_migration_downtime_seconds{deployment=\"demo\"}"),
        "{metrics}"
    );
    assert!(!d.to_string().contains("a migration password"));
}

#[test]
fn a_migration_rolled_back_during_the_grace_period_carries_the_writes_since_the_switch_back_to_the_old_machine()
 {
    let rig = Rig::new("Delete");
    let (lab_old, lab_new) = (&rig.lab_old, &rig.lab_new);
    let (old_host, new_host) = (&rig.old_host, &rig.new_host);
    rig.place("new");
    // Under Delete the old machine waits, stopped, for its grace period.
    let switched = wait_for("the names to switch", Duration::from_secs(600), || {
        let m = rig.migration()?;
        assert!(m["phase"] != "Failed", "the migration failed: {m}");
        (m["phase"] == "RetiringSource" && m["source"] == "Stopped").then_some(m)
    });
    assert!(switched["sourceDestroyedAfter"].is_string(), "{switched}");
    assert_eq!(
        std::fs::read_to_string(old_host.root.join("backup-files/migration"))
            .unwrap()
            .trim(),
        "stopped"
    );

    // Written in new after the switch.
    sql(
        lab_new,
        new_host,
        "INSERT INTO events(body) SELECT 'after the switch ' || i FROM generate_series(1, 200) i",
    );
    std::fs::write(
        new_host.root.join("nix/var/app-data/after-switch.txt"),
        "written in new",
    )
    .unwrap();

    // Setting the environment back no longer cancels: it is refused, naming the way back.
    rig.place("old");
    wait_for("the refusal", Duration::from_secs(60), || {
        rig.events().contains("MigrationRefused").then_some(())
    });
    assert!(rig.events().contains("migrate rollback deployment demo"));
    assert_eq!(rig.migration().unwrap()["phase"], "RetiringSource");

    // The rollback needs the API token.
    let (code, text) = rig.cli(&["migrate", "rollback", "deployment", "demo"], false);
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("Bearer"), "{text}");
    let (code, text) = rig.cli(&["migrate", "rollback", "deployment", "demo"], true);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("moves back from new to old"), "{text}");

    let back = wait_for("the way back to switch", Duration::from_secs(600), || {
        let m = rig.migration()?;
        assert!(m["phase"] != "Failed", "the way back failed: {m}");
        (m["from"] == "new" && m["phase"] == "RetiringSource").then_some(m)
    });
    assert_eq!(back["verified"], true, "{back}");
    let expected: Vec<String> = QUERIES.iter().map(|q| sql(lab_new, new_host, q)).collect();
    let got: Vec<String> = QUERIES.iter().map(|q| sql(lab_old, old_host, q)).collect();
    assert_eq!(got, expected);
    assert_eq!(got[2], "200", "the writes in new came back: {got:?}");
    assert_eq!(
        hashes(&old_host.root.join("nix/var/app-data")),
        hashes(&new_host.root.join("nix/var/app-data"))
    );
    assert!(rig.events().contains("MigrationRollback"));
}

#[test]
fn setting_the_environment_back_during_the_pre_copy_cancels_and_the_source_serves_on_with_its_data() {
    let rig = Rig::new("Retain");
    let files = hashes(&rig.data);
    let rows: Vec<String> = QUERIES
        .iter()
        .map(|q| sql(&rig.lab_old, &rig.old_host, q))
        .collect();
    rig.place("new");
    wait_for("the pre-copy", Duration::from_secs(240), || {
        rig.migration().filter(|m| m["phase"] == "PreCopying")
    });
    rig.place("old");
    let cancelled = wait_for("the cancel", Duration::from_secs(300), || {
        let m = rig.migration()?;
        assert!(m["phase"] != "Failed", "{m}");
        (m["phase"] == "Cancelled").then_some(m)
    });
    assert_eq!(cancelled["source"], "Serving", "{cancelled}");
    assert!(
        cancelled["message"]
            .as_str()
            .is_some_and(|m| m.contains("set to old")),
        "{cancelled}"
    );
    // The source was never stopped for good: untouched, or started again.
    let marker = std::fs::read_to_string(rig.old_host.root.join("backup-files/migration"));
    assert!(
        marker.as_deref().map_or(true, |m| m.trim() == "serving"),
        "{marker:?}"
    );
    assert_eq!(hashes(&rig.data), files);
    let now: Vec<String> = QUERIES
        .iter()
        .map(|q| sql(&rig.lab_old, &rig.old_host, q))
        .collect();
    assert_eq!(now, rows);
    // The target given up has its services stopped.
    assert_eq!(
        std::fs::read_to_string(rig.new_host.root.join("backup-files/migration"))
            .unwrap()
            .trim(),
        "removed"
    );
    let d = wait_for(
        "the Deployment to be Ready in old",
        Duration::from_secs(120),
        || {
            get(rig.daemon(), "/api/v1/deployments/demo").filter(|d| {
                d["status"]["runtimeEnvironment"] == "old"
                    && common::ready(d).is_some_and(|(status, _)| status == "True")
            })
        },
    );
    let migrating = d["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Migrating")
        .cloned()
        .unwrap();
    assert_eq!(migrating["reason"], "MigrationCancelled", "{migrating}");
    let events = rig.events();
    for reason in ["MigrationCancelling", "MigrationCancelled"] {
        assert_eq!(
            events.matches(&format!("\"{reason}\"")).count(),
            1,
            "one {reason} event: {events}"
        );
    }
}

#[test]
fn an_unreachable_old_environment_moves_from_its_last_backup_only_once_the_operator_confirms_the_data_loss_window()
 {
    let mut rig = Rig::new("Retain");
    let data = rig.data.clone();
    let asked = rig.cli(&["backup", "deployment", "demo"], true);
    assert_eq!(asked.0, 0, "{}", asked.1);
    let backed_up = wait_for("the backup", Duration::from_secs(300), || {
        get(rig.daemon(), "/api/v1/deployments/demo")
            .filter(|d| d["status"]["backups"][0]["result"] == "Succeeded")
    });
    let snapshot = backed_up["status"]["backups"][0]["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let taken = backed_up["status"]["backups"][0]["time"]
        .as_str()
        .unwrap()
        .to_owned();
    let in_backup: Vec<String> = QUERIES
        .iter()
        .map(|q| sql(&rig.lab_old, &rig.old_host, q))
        .collect();
    let files = hashes(&data);
    // Written after the backup: lost with the old machine.
    sql(
        &rig.lab_old,
        &rig.old_host,
        "INSERT INTO events(body) SELECT 'lost ' || i FROM generate_series(1, 50) i",
    );
    assert_ne!(sql(&rig.lab_old, &rig.old_host, QUERIES[2]), in_backup[2]);

    // The old machine can no longer be reached; the operator moves the Deployment anyway.
    rig.old_host.stop_ssh();
    rig.place("new");
    let stuck = wait_for(
        "a pre-copy that cannot reach the source",
        Duration::from_secs(300),
        || {
            rig.migration()
                .filter(|m| m["phase"] == "PreCopying" && m["message"].is_string())
        },
    );
    eprintln!("{stuck:#}");

    // Without --confirm: the data-loss window is stated and nothing changes.
    let (code, text) = rig.cli(&["migrate", "restore-from-backup", "deployment", "demo"], true);
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains(&format!("demo-app: {snapshot}"))
            && text.contains(&format!("every write made since {taken}"))
            && text.contains("--confirm"),
        "{text}"
    );
    assert!(rig.migration().unwrap()["fromBackup"].is_null());

    // With it, the target starts from the last backup.
    let (code, text) = rig.cli(
        &[
            "migrate",
            "restore-from-backup",
            "deployment",
            "demo",
            "--confirm",
        ],
        true,
    );
    assert_eq!(code, 0, "{text}");
    assert!(text.contains(&format!("writes after {taken} are lost")), "{text}");
    let done = wait_for("the migration to succeed", Duration::from_secs(600), || {
        let m = rig.migration()?;
        (m["phase"] == "Succeeded" && m["fromBackup"].is_object()).then_some(m)
    });
    eprintln!("{done:#}");
    assert_eq!(done["source"], "Unreachable", "{done}");
    assert_eq!(
        done["fromBackup"]["snapshots"]["demo-app"],
        snapshot.as_str(),
        "{done}"
    );
    assert_eq!(done["fromBackup"]["writesLostAfter"], taken.as_str(), "{done}");
    // The target holds the backup's data: the write after it is not there.
    rig.assert_moved(&done, &files, &in_backup);
    wait_for("the Deployment to run in new", Duration::from_secs(180), || {
        get(rig.daemon(), "/api/v1/deployments/demo").filter(|d| {
            d["status"]["runtimeEnvironment"] == "new"
                && common::ready(d).is_some_and(|(status, _)| status == "True")
        })
    });
    let (code, described) = rig.cli(&["describe", "deployment", "demo"], false);
    assert_eq!(code, 0, "{described}");
    assert!(
        described.contains("old -> new: Succeeded (done")
            && described.contains(&format!(
                "From backup: demo-app: {snapshot}; writes after {taken} lost"
            )),
        "{described}"
    );
    let events = rig.events();
    assert!(events.contains("MigrationFromBackup"), "{events}");
    assert!(events.contains("Migrated"), "{events}");
    // The old machine's data was never touched (it could not be).
    assert!(!rig.old_host.root.join("backup-files/migration").exists());
}

#[test]
fn a_rollback_needs_the_api_token_and_a_daemon_that_runs_migrations() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    common::copy_examples(&source);
    let token = dir.path().join("token");
    std::fs::write(&token, "a-long-api-token-for-the-rollback-test\n").unwrap();
    let args: Vec<std::ffi::OsString> = [
        "--source".as_ref(),
        source.as_os_str(),
        "--state-dir".as_ref(),
        dir.path().join("state").as_os_str(),
        "--provider".as_ref(),
        "plan-only".as_ref(),
        "--api-token-file".as_ref(),
        token.as_os_str(),
    ]
    .iter()
    .map(|a| a.to_os_string())
    .collect();
    let daemon = common::spawn(&args);
    wait_for("the example Deployment", Duration::from_secs(30), || {
        get(&daemon, "/api/v1/deployments/uni-utrecht")
    });
    let rollback = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_fediversity"))
            .args(["migrate", "rollback"])
            .args(extra)
            .args(["--server", &daemon.server])
            .env_remove("FEDIVERSITY_TOKEN_FILE")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };
    let (code, text) = rollback(&["deployment", "uni-utrecht"]);
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("Bearer"), "{text}");
    let token = token.to_string_lossy().into_owned();
    let (code, text) = rollback(&["deployment", "uni-utrecht", "--token-file", &token]);
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("migrations do not run in this daemon"), "{text}");
    let (code, text) = rollback(&["deployment", "nobody", "--token-file", &token]);
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("Deployment nobody not found"), "{text}");
    let (code, text) = rollback(&["application", "mastodon", "--token-file", &token]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("only Deployments migrate"), "{text}");
}
