//! End to end with the Proxmox simulator: pve-sim provisions the VMs and reports addresses from a
//! loopback pool, a real sshd test host answers behind each address, and the Deployment becomes Ready
//! with every VM running its NixOS system.

mod nixos_support;
mod proxmox_support;

use std::process::{Command, Stdio};
use std::time::Duration;

use fediversity_testbed::{SimConfig, Simulator};
use nixos_support::{Lab, NIX_CONFIG, application_yaml, free_port};
use proxmox_support::{TOKEN_ID, condition, endpoint, http_get};
use serde_json::Value;

/// The simulator hands out pool addresses in order after the gateway: .2, .3, …
const POOL: &str = "127.0.77.0/24";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_from_the_simulator_run_their_nixos_systems_and_the_deployment_becomes_ready() {
    let lab = Lab::new();
    let port = free_port();
    let hosts = [
        lab.host_at("vm-a", "127.0.77.2", port),
        lab.host_at("vm-b", "127.0.77.3", port),
    ];
    // No foreign VMs: ours get the first addresses of the pool.
    let sim = Simulator::start(
        SimConfig::new()
            .latency_scale(0.0)
            .address_pool(POOL)
            .token(TOKEN_ID, proxmox_support::SECRET)
            .template(proxmox_support::TEMPLATE),
    )
    .await
    .unwrap();
    let source = lab.path().join("source");
    std::fs::create_dir_all(&source).unwrap();
    let secret = lab.path().join("token");
    std::fs::write(&secret, format!("{}\n", proxmox_support::SECRET)).unwrap();
    std::fs::write(
        source.join("env.yaml"),
        format!(
            "apiVersion: fediversity.eu/v1alpha1\nkind: RuntimeEnvironment\nmetadata: {{ name: sim }}\nspec:\n  \
proxmox:\n    endpoint: {}\n    credentials: {{ tokenId: \"{TOKEN_ID}\", secretFile: {} }}\n    nodes: [pve]\n    \
template: {{ vmid: {} }}\n    storage: local-lvm\n    bridge: vmbr0\n    vmidRange: {{ start: 1000, end: 1099 }}\n  \
ssh: {{ user: root, privateKeyFile: {}, port: {port} }}\n  nix: {{ nixpkgs: {} }}\n  acme: {{ email: acme@lab.example }}\n",
            endpoint(&sim),
            secret.display(),
            proxmox_support::TEMPLATE,
            lab.path().join("id_ed25519").display(),
            lab.path().join("nixpkgs").display()
        ),
    )
    .unwrap();
    std::fs::write(source.join("alpha.yaml"), application_yaml("alpha", false)).unwrap();
    std::fs::write(source.join("beta.yaml"), application_yaml("beta", false)).unwrap();
    std::fs::write(
        source.join("demo.yaml"),
        "apiVersion: fediversity.eu/v1alpha1\nkind: Deployment\nmetadata: { name: demo }\nspec:\n  \
domain: lab.example\n  runtimeEnvironment: sim\n  applications:\n    \
alpha: { settings: { message: a } }\n    beta: { settings: { message: b } }\n",
    )
    .unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_fediversity"))
        .args(["run", "--source"])
        .arg(&source)
        .arg("--state-dir")
        .arg(lab.path().join("state"))
        .args([
            "--listen",
            &listen,
            "--instance-id",
            "nixos-e2e",
            "--nixos-catalog",
        ])
        .arg(lab.catalog())
        .env("NIX_CONFIG", NIX_CONFIG)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let server = listen.clone();
    let result = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let mut last = Value::Null;
        while started.elapsed() < Duration::from_secs(90) {
            if let Some((200, body)) = http_get(&server, "/api/v1/deployments/demo")
                && let Ok(d) = serde_json::from_str::<Value>(&body)
            {
                if condition(&d, "Ready").is_some_and(|c| c.0 == "True") {
                    return Ok(d);
                }
                last = d;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(format!(
            "the Deployment did not become Ready within 90 s: {last:#}"
        ))
    })
    .await
    .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let d = result.unwrap_or_else(|e| panic!("{e}"));
    let statuses = d["status"]["hosts"].as_array().unwrap().clone();
    assert_eq!(statuses.len(), 2, "{d}");
    for status in &statuses {
        assert_eq!(status["lastResult"], "Applied", "{status}");
        assert!(status["vmid"].as_u64().is_some(), "{status}");
        let address = status["address"].as_str().unwrap();
        let host = hosts
            .iter()
            .find(|h| h.address == address)
            .expect("a test host behind the VM's address");
        let system = status["system"].as_str().unwrap();
        assert_eq!(host.profile().map(|p| p.1).as_deref(), Some(system), "{status}");
        let app = status["name"]
            .as_str()
            .unwrap()
            .trim_start_matches("demo-")
            .to_owned();
        assert_eq!(host.settings_json(system)[&app]["settings"]["message"], &app[..1]);
    }
}
