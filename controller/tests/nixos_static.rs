//! The daemon converges a Deployment on a RuntimeEnvironment of static hosts: real Nix, real OpenSSH.

mod common;
mod nixos_support;

use std::time::Duration;

use common::{Daemon, http_get, wait_for};
use nixos_support::{Lab, NIX_CONFIG, application_yaml};
use serde_json::Value;

fn start(source: &std::path::Path, state: &std::path::Path, catalog: &std::path::Path) -> Daemon {
    common::start_with_catalog(source, state, catalog, NIX_CONFIG)
}

fn deployment(daemon: &Daemon) -> Option<Value> {
    let (code, body) = http_get(&daemon.server, "/api/v1/deployments/demo")?;
    (code == 200).then(|| serde_json::from_str(&body).ok()).flatten()
}

fn ready(d: &Value) -> Option<String> {
    d["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")
        .map(|c| c["status"].as_str().unwrap_or_default().to_owned())
}

#[test]
fn a_deployment_on_static_hosts_becomes_ready_with_each_host_running_its_system() {
    let lab = Lab::new();
    let (alpha, beta) = (lab.host("demo-alpha"), lab.host("demo-beta"));
    let source = lab.path().join("source");
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(
        source.join("env.yaml"),
        lab.environment_yaml("lab", &[&alpha, &beta]),
    )
    .unwrap();
    std::fs::write(source.join("alpha.yaml"), application_yaml("alpha", false)).unwrap();
    std::fs::write(source.join("beta.yaml"), application_yaml("beta", false)).unwrap();
    std::fs::write(
        source.join("demo.yaml"),
        "apiVersion: fediversity.eu/v1alpha1\nkind: Deployment\nmetadata: { name: demo }\nspec:\n  \
domain: lab.example\n  runtimeEnvironment: lab\n  applications:\n    \
alpha: { settings: { message: hello } }\n    beta: { settings: { message: world } }\n",
    )
    .unwrap();
    let daemon = start(&source, &lab.path().join("state"), &lab.catalog());
    let d = wait_for("the Deployment to become Ready", Duration::from_secs(90), || {
        deployment(&daemon).filter(|d| ready(d).as_deref() == Some("True"))
    });
    let hosts = d["status"]["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 2, "{d}");
    for (host, status) in [(&alpha, &hosts[0]), (&beta, &hosts[1])] {
        assert_eq!(status["name"], host.name.as_str());
        assert_eq!(status["phase"], "Ready", "{status}");
        assert_eq!(status["lastResult"], "Applied", "{status}");
        assert_eq!(status["address"], host.address.as_str());
        let system = status["system"].as_str().unwrap();
        assert_eq!(status["desiredSystem"], system);
        assert_eq!(host.profile().map(|p| p.1).as_deref(), Some(system));
        assert!(status["stepMillis"]["copy"].as_u64().is_some(), "{status}");
    }
    assert_eq!(
        alpha.settings_json(hosts[0]["system"].as_str().unwrap())["alpha"]["settings"]["message"],
        "hello"
    );
    // Each host counted once per pass (a later no-op pass may already have run).
    let metrics = http_get(&daemon.server, "/metrics").unwrap().1;
    let sample = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {metrics}"))
    };
    let applied = sample("fediversity_nixos_deploy_results_total{result=\"Applied\"}");
    assert!(applied >= 2 && applied % 2 == 0, "{applied}");
    assert!(
        sample("fediversity_nixos_deploy_seconds_count{step=\"copy\"}") == 2,
        "copied once per host"
    );
}
