//! A real Prometheus scrapes `fediversity demo`, the daemon running the quickstart on a simulated
//! Proxmox cluster and simulated NixOS hosts: every dashboard panel query and every alert rule's
//! expression returns data, and the rules load.

mod common;

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
