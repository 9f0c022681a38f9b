//! A real Prometheus scrapes a daemon that converges Deployments on a simulated Proxmox cluster: every
//! dashboard panel query and every alert rule's expression returns data, and the rules load.

mod proxmox_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use proxmox_support::{Daemon, Folder, endpoint, free_port, http_get, sim, state_dir, wait_for};
use serde_json::Value;

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_and_alert_expression_returns_data_from_a_real_prometheus() {
    let sim = sim(fediversity_testbed::SimConfig::new().latency_scale(0.0)).await;
    let folder = Folder::new(&endpoint(&sim), "");
    folder.write_deployment("uni", &["mastodon: {}", "pixelfed: {}"], "Retain", "");
    let state = state_dir();
    let daemon = tokio::task::spawn_blocking({
        let (source, state) = (folder.dir.path().to_path_buf(), state.path().to_path_buf());
        move || Daemon::start(&source, &state)
    })
    .await
    .unwrap();
    let server_of_daemon = daemon.server.clone();
    tokio::task::spawn_blocking(move || {
        wait_for("the Deployment to become Ready", Duration::from_secs(30), || {
            let (_, body) = http_get(&server_of_daemon, "/api/v1/deployments/uni")?;
            body.contains("\"reason\":\"Succeeded\"").then_some(())
        })
    })
    .await
    .unwrap();
    tokio::task::spawn_blocking(move || scrape_and_check(&daemon))
        .await
        .unwrap();
}

fn scrape_and_check(daemon: &Daemon) {
    let dir = tempfile::tempdir().unwrap();
    let rules = repo().join("charts/fediversity/files/alerts.yaml");
    let config = format!(
        "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nrule_files: [{}]\nscrape_configs:\n  - job_name: fediversity\n    static_configs: [{{ targets: ['{}'] }}]\n",
        rules.display(),
        daemon.server
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
        &std::fs::read_to_string(repo().join("charts/fediversity/files/dashboard.json")).unwrap(),
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
    assert!(checked >= 14, "only {checked} panel queries");

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
