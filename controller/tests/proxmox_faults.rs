//! Faults: with 10 % of API calls failing (500/595/596) and 10 % of tasks failing, every Deployment
//! still converges, with exactly one VM per host, and the retries show in the metrics.

mod proxmox_support;

use std::collections::BTreeSet;
use std::time::Duration;

use fediversity_testbed::{Faults, SimConfig};
use proxmox_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_ten_percent_api_and_task_faults_every_deployment_converges_without_duplicates() {
    let faults = Faults {
        rate: 0.1,
        task_failure_rate: 0.1,
        ..Faults::none()
    };
    let sim = sim(SimConfig::new().latency_scale(0.0).seed(11).faults(faults)).await;
    let folder = Folder::new(&endpoint(&sim), "");
    let mut wanted = BTreeSet::new();
    for i in 0..4 {
        folder.write_deployment(&format!("f{i}"), &["mastodon: {}", "pixelfed: {}"], "Retain", "");
        wanted.insert(format!("f{i}-mastodon"));
        wanted.insert(format!("f{i}-pixelfed"));
    }
    let state = state_dir();
    let daemon = Daemon::start(folder.dir.path(), state.path());
    wait_for("every Deployment to be Ready", Duration::from_secs(100), || {
        let items = daemon.api("deployments")["items"].as_array()?.clone();
        (items.len() == 4
            && items
                .iter()
                .all(|d| condition(d, "Ready").is_some_and(|c| c.0 == "True")))
        .then_some(())
    });
    let stats = sim.stats();
    assert!(stats.faults_injected > 0, "no fault was injected");
    let names: Vec<String> = our_vms(&sim).iter().filter_map(|v| v.name.clone()).collect();
    assert_eq!(names.len(), wanted.len(), "duplicates: {names:?}");
    assert_eq!(names.into_iter().collect::<BTreeSet<_>>(), wanted);
    let metrics = daemon.metrics();
    let retried = |prefix: &str| {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let backoff = retried("workqueue_retries_total") + retried("fediversity_external_request_retries_total");
    assert!(backoff > 0.0, "no retry visible in the metrics");
    // The injected faults answer 500, 595 or 596: at least one request of the Proxmox provider was
    // counted under one of those codes.
    let failed: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("fediversity_external_requests_total{") && l.contains("provider=\"proxmox\"")
        })
        .filter(|l| {
            ["500", "595", "596"]
                .iter()
                .any(|c| l.contains(&format!("code=\"{c}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        failed > 0.0,
        "fediversity_external_requests_total{{provider=\"proxmox\",code=\"5xx\"}} counted no failure"
    );
    for vmid in [1000, 1003] {
        assert_eq!(sim.vm(vmid).unwrap().tags, vec!["production".to_owned()]);
    }
}
