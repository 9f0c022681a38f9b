//! The simulator driven by the real Python `proxmoxer` client, over HTTPS with a pinned certificate.

mod common;

use std::process::Stdio;

use common::{TEMPLATE, TOKEN_SECRET};
use fediversity_testbed::Simulator;

/// Fails (never skips) with a clear message when python3 or proxmoxer are missing.
fn require_proxmoxer() {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import proxmoxer, requests"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match probe {
        Ok(status) if status.success() => {}
        Ok(_) => panic!(
            "python3 cannot import proxmoxer/requests: install them with `python3 -m pip install proxmoxer requests` \
             (scripts/test.sh does this)"
        ),
        Err(e) => panic!("python3 is required for the proxmoxer conformance test: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxmoxer_runs_a_whole_vm_lifecycle_against_the_simulator() {
    require_proxmoxer();
    // A tenth of real time: linked clones take 0.3 s, full clones several seconds, the agent 2 s.
    let sim = Simulator::start(common::config().latency_scale(0.1).tls(true))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("pve-sim.pem");
    std::fs::write(&ca, &sim.certificate().unwrap().pem).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/proxmoxer_lifecycle.py");
    let output = tokio::process::Command::new("python3")
        .arg(script)
        .env("PVE_SIM_HOST", sim.addr().to_string())
        .env("PVE_SIM_CA", &ca)
        .env("PVE_SIM_FINGERPRINT", sim.fingerprint().unwrap())
        .env("PVE_SIM_TEMPLATE", TEMPLATE.to_string())
        .env("PVE_SIM_TOKEN_USER", "ci@pve")
        .env("PVE_SIM_TOKEN_NAME", "tests")
        .env("PVE_SIM_TOKEN_VALUE", TOKEN_SECRET)
        .env("PVE_SIM_USER", "root@pam")
        .env("PVE_SIM_PASSWORD", "rootpw")
        .output()
        .await
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "proxmoxer script failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
    let stats = sim.stats();
    assert!(
        stats.count("POST", "/nodes/{node}/qemu/{vmid}/clone") >= 3,
        "{stats:?}"
    );
    assert!(stats.count("GET", "/nodes/{node}/tasks/{upid}/status") > 0);
    assert!(stats.by_route.contains_key("POST /access/ticket"));
    assert!(
        sim.vms().iter().all(|vm| vm.vmid == TEMPLATE),
        "everything but the template was deleted"
    );
}
