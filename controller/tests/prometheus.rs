//! A real Prometheus scrapes `fediversity demo`, the daemon running the quickstart on a simulated
//! Proxmox cluster and simulated NixOS hosts: every dashboard panel query and every alert rule's
//! expression returns data, and the rules load.

mod common;
mod nixos_support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Demo, free_port, http_get, repo_root, sigterm, wait_exit, wait_for};
use serde_json::Value;

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn prometheus_binary() -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("prometheus"))
                .find(|p| p.is_file())
        })
        .expect("prometheus is missing: scripts/test.sh installs it (Debian package prometheus)")
}

/// Percent-encodes a query parameter.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn try_query(server: &str, expr: &str) -> Option<Vec<Value>> {
    let (code, body) = http_get(server, &format!("/api/v1/query?query={}", encode(expr)))?;
    let value: Value = serde_json::from_str(&body).ok()?;
    (code == 200).then(|| value["data"]["result"].as_array().cloned().unwrap_or_default())
}

fn query(server: &str, expr: &str) -> Vec<Value> {
    let (code, body) =
        http_get(server, &format!("/api/v1/query?query={}", encode(expr))).expect("prometheus answers");
    let value: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    assert_eq!(code, 200, "{expr}: {body}");
    value["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// A rule's expression without its final threshold (`> 0.25`, `== 1`): what must return data while
/// the alert does not fire.
fn without_threshold(expr: &str) -> String {
    let expr = expr.trim();
    for op in [" == ", " > ", " >= ", " < "] {
        if let Some(i) = expr.rfind(op) {
            let tail = &expr[i + op.len()..];
            if tail.chars().all(|c| c.is_ascii_digit() || " .*e-".contains(c)) {
                return expr[..i].trim().to_owned();
            }
        }
    }
    expr.to_owned()
}

#[test]
fn every_dashboard_query_and_alert_expression_returns_data_from_a_real_prometheus() {
    // The quickstart on the simulations: VMs on the simulated cluster, NixOS deploys on simulated hosts.
    let work = tempfile::tempdir().unwrap();
    let work_dir = work.path().join("demo");
    let mut demo = Demo::spawn(&[
        "--latency-scale",
        "0.05",
        "--work-dir",
        work_dir.to_str().unwrap(),
    ]);
    demo.wait_line("All 7 objects are Ready", 0, Duration::from_secs(60));
    // Per-object series exist only for objects that need attention: add one that stalls (a size its
    // Application does not offer), so that the alerts on them have a series to find.
    std::fs::write(
        work_dir.join("source").join("needs-attention.yaml"),
        "apiVersion: fediversity.eu/v1alpha1\nkind: Deployment\nmetadata: { name: needs-attention }\n\
         spec:\n  domain: attention.example\n  runtimeEnvironment: quickstart\n\
         \x20 applications: { mastodon: { size: enormous } }\n\
         \x20 initialUser: { displayName: Admin, email: admin@attention.example }\n",
    )
    .unwrap();
    wait_for("the stalled Deployment's series", Duration::from_secs(30), || {
        let (_, scrape) = http_get(&demo.server, "/metrics")?;
        scrape
            .contains("fediversity_reconcile_condition{kind=\"Deployment\",name=\"needs-attention\",status=\"True\",type=\"Stalled\"} 1")
            .then_some(())
    });
    scrape_and_check(&demo.server);
    sigterm(&demo.child);
    assert_eq!(
        wait_exit(&mut demo.child, Duration::from_secs(20)),
        0,
        "{}",
        demo.output()
    );
}

fn scrape_and_check(target: &str) {
    let dir = tempfile::tempdir().unwrap();
    let rules = repo_root().join("charts/fediversity/files/alerts.yaml");
    let config = format!(
        "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nrule_files: [{}]\nscrape_configs:\n  - job_name: fediversity\n    static_configs: [{{ targets: ['{}'] }}]\n",
        rules.display(),
        target
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let port = free_port();
    let server = format!("127.0.0.1:{port}");
    let _prometheus = Prometheus(
        Command::new(prometheus_binary())
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={server}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Enough scrapes for rate() over the last minutes: at least three samples of every series.
    wait_for("three scrapes of the daemon", Duration::from_secs(60), || {
        let samples = try_query(&server, "count_over_time(up{job=\"fediversity\"}[5m])")?;
        samples
            .first()
            .and_then(|s| s["value"][1].as_str()?.parse::<f64>().ok())
            .filter(|n| *n >= 3.0)
    });
    assert_eq!(query(&server, "up{job=\"fediversity\"}")[0]["value"][1], "1");

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("charts/fediversity/files/dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            assert!(
                !query(&server, expr).is_empty(),
                "panel `{}`: `{expr}` returned no data",
                panel["title"]
            );
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} panel queries");

    let rule_file: Value = yaml_serde::from_str(&std::fs::read_to_string(&rules).unwrap()).unwrap();
    for rule in rule_file["groups"][0]["rules"].as_array().unwrap() {
        let expr = without_threshold(rule["expr"].as_str().unwrap());
        assert!(
            !query(&server, &expr).is_empty(),
            "alert {}: `{expr}` returned no data",
            rule["alert"]
        );
    }
    // Prometheus loaded every rule and evaluates them without errors.
    let (_, body) = http_get(&server, "/api/v1/rules").unwrap();
    let loaded: Value = serde_json::from_str(&body).unwrap();
    let rules_loaded = loaded["data"]["groups"][0]["rules"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        rules_loaded.len(),
        rule_file["groups"][0]["rules"].as_array().unwrap().len()
    );
    assert!(
        rules_loaded.iter().all(|r| r["health"] != "err"),
        "{rules_loaded:#?}"
    );
}

/// Starts a real Prometheus scraping `target` every second with the rules in `rules`.
fn start_prometheus(dir: &std::path::Path, target: &str, rules: &std::path::Path) -> (Prometheus, String) {
    let config = format!(
        "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nrule_files: [{}]\nscrape_configs:\n  - job_name: fediversity\n    static_configs: [{{ targets: ['{}'] }}]\n",
        rules.display(),
        target
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let server = format!("127.0.0.1:{}", free_port());
    let prometheus = Prometheus(
        Command::new(prometheus_binary())
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={server}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    (prometheus, server)
}

#[test]
fn a_host_whose_backup_repository_is_unreachable_fires_the_stale_backup_alert_in_a_real_prometheus() {
    // A real daemon converging a real (loopback) host whose environment backs up every 2 s to an
    // sftp repository nobody listens for: no backup ever succeeds.
    let lab = nixos_support::Lab::new();
    let host = lab.host("stale-app");
    let source = lab.path().join("source");
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(lab.path().join("restic-password"), "a restic password\n").unwrap();
    std::fs::write(
        lab.path().join("sftp_known_hosts"),
        format!("[127.0.0.1]:1 {}\n", host.host_key),
    )
    .unwrap();
    let closed = free_port();
    std::fs::write(
        source.join("env.yaml"),
        format!(
            "{}  backup:\n    repository: sftp://root@127.0.0.1:{closed}//srv/restic\n    passwordFile: {}\n    \
sftpIdentityFile: {}\n    sftpKnownHostsFile: {}\n    schedule: 2s\n",
            lab.environment_yaml("lab", &[&host]),
            lab.path().join("restic-password").display(),
            lab.path().join("id_ed25519").display(),
            lab.path().join("sftp_known_hosts").display(),
        ),
    )
    .unwrap();
    std::fs::write(
        source.join("app.yaml"),
        "apiVersion: fediversity.eu/v1alpha1\nkind: Application\nmetadata: { name: app }\nspec:\n  \
displayName: Probe\n  nixosModule: nix/applications/probe.nix\n  sizes: { small: { cores: 1, memoryMiB: 512, diskGiB: 10 } }\n  \
data: { paths: [/nix/var/app-data] }\n",
    )
    .unwrap();
    std::fs::write(
        source.join("stale.yaml"),
        "apiVersion: fediversity.eu/v1alpha1\nkind: Deployment\nmetadata: { name: stale }\nspec:\n  \
domain: lab.example\n  runtimeEnvironment: lab\n  applications: { app: {} }\n",
    )
    .unwrap();
    let daemon = common::start_with_catalog(
        &source,
        &lab.path().join("state"),
        &lab.catalog(),
        nixos_support::NIX_CONFIG,
    );
    wait_for("the host to become Ready", Duration::from_secs(120), || {
        let (code, body) = http_get(&daemon.server, "/api/v1/deployments/stale")?;
        let d: Value = serde_json::from_str(&body).ok()?;
        (code == 200 && d["status"]["hosts"][0]["phase"] == "Ready").then_some(())
    });

    // The shipped rule, with its `for: 15m` shortened so that the test need not wait a quarter hour;
    // the expression is the shipped one.
    let dir = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string(repo_root().join("charts/fediversity/files/alerts.yaml")).unwrap();
    let at = shipped.find("- alert: FediversityBackupStale").unwrap();
    let hold = at + shipped[at..].find("for: 15m").unwrap();
    let rules_text = format!(
        "{}for: 5s{}",
        &shipped[..hold],
        &shipped[hold + "for: 15m".len()..]
    );
    let rules = dir.path().join("alerts.yaml");
    std::fs::write(&rules, rules_text).unwrap();
    let (_prometheus, server) = start_prometheus(dir.path(), &daemon.server, &rules);

    let alert = wait_for(
        "FediversityBackupStale to fire in Prometheus",
        Duration::from_secs(180),
        || {
            let (code, body) = http_get(&server, "/api/v1/alerts")?;
            let value: Value = serde_json::from_str(&body).ok()?;
            (code == 200).then_some(())?;
            value["data"]["alerts"]
                .as_array()?
                .iter()
                .find(|a| a["labels"]["alertname"] == "FediversityBackupStale" && a["state"] == "firing")
                .cloned()
        },
    );
    eprintln!("{alert}");
    assert_eq!(
        (
            alert["labels"]["deployment"].as_str(),
            alert["labels"]["host"].as_str(),
            alert["labels"]["severity"].as_str()
        ),
        (Some("stale"), Some("stale-app"), Some("critical")),
        "{alert}"
    );
    // The daemon says why: the repository is unreachable, and the attempts are counted.
    let d = wait_for("status.backups to say so", Duration::from_secs(90), || {
        let d: Value =
            serde_json::from_str(&http_get(&daemon.server, "/api/v1/deployments/stale")?.1).ok()?;
        (d["status"]["backups"][0]["result"] == "Failed").then_some(d)
    });
    let b = &d["status"]["backups"][0];
    assert!(
        b["message"].as_str().is_some_and(|m| m.contains("unreachable")),
        "{b}"
    );
    assert!(!d.to_string().contains("a restic password"));
    let failures = query(
        &server,
        "fediversity_backup_failures_total{deployment=\"stale\",host=\"stale-app\"}",
    );
    assert!(
        failures
            .first()
            .and_then(|f| f["value"][1].as_str()?.parse::<f64>().ok())
            .is_some_and(|n| n >= 1.0),
        "{failures:?}"
    );
}
