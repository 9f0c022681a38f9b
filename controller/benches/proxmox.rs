//! Benchmark of the Proxmox side against the in-process simulator (latency 0): Proxmox requests per VM
//! created, and per full no-op resync of 1,000 converged hosts. Run with
//! `cargo bench -p fediversity --bench proxmox`; prints one line per figure.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use fediversity::api::{Application, Deployment, Name, Object, RuntimeEnvironment};
use fediversity::provider::{ConvergeRequest, PlannedHost, PreviousFacts};
use fediversity::proxmox::{ProxmoxMetrics, ProxmoxProvider, RateLimit};
use fediversity::reconcile::Provider;
use fediversity::reconcile::deployment::plan;
use fediversity::state::DesiredState;
use fediversity::store::Store;
use fediversity_testbed::{SimConfig, Simulator};

/// Hosts under `cargo bench`; `cargo test --all-targets` runs this as a quick smoke test with fewer.
const HOSTS: usize = 1000;
const SMOKE_HOSTS: usize = 50;
const BATCH: usize = 50;

fn object(text: &str) -> Object {
    let docs =
        fediversity::yaml::parse_documents(text, &fediversity::yaml::Limits::default()).expect("valid YAML");
    fediversity::api::parse_object(&docs[0].1).expect("a valid object")
}

#[tokio::main]
async fn main() {
    let sim = Simulator::start(
        SimConfig::new()
            .token("bench@pve!ctl", "secret")
            .template(9000)
            .latency_scale(0.0),
    )
    .await
    .expect("the simulator starts");
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(dir.path().join("token"), "secret").expect("the token file is written");
    std::fs::write(
        dir.path().join("id.pub"),
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHVnZXhhbXBsZWtleWZvcmRvY3Vtb25seQ bench",
    )
    .expect("the key file is written");
    let endpoint = sim.base_url().trim_end_matches("/api2/json").to_owned();
    let Object::RuntimeEnvironment(env) = object(&format!(
        "apiVersion: fediversity.eu/v1alpha1
kind: RuntimeEnvironment
metadata: {{ name: bench }}
spec:
  proxmox:
    endpoint: {endpoint}
    credentials: {{ tokenId: \"bench@pve!ctl\", secretFile: {dir}/token }}
    nodes: [pve]
    template: {{ vmid: 9000 }}
    storage: local-lvm
    bridge: vmbr0
    vmidRange: {{ start: 10000, end: 19999 }}
  ssh: {{ privateKeyFile: {dir}/id }}
  limits: {{ maxConcurrentOperations: 16 }}
",
        dir = dir.path().display()
    )) else {
        unreachable!("the text is a RuntimeEnvironment")
    };
    let env: RuntimeEnvironment = env;
    let Object::Application(app) = object(&fediversity::fixtures::application_yaml("mastodon")) else {
        unreachable!("the fixture is an Application")
    };
    let apps: BTreeMap<Name, Application> = [(Name::new("mastodon"), app)].into();
    let hosts = if std::env::args().any(|a| a == "--bench") {
        HOSTS
    } else {
        SMOKE_HOSTS
    };
    let deployments: Vec<Deployment> = (0..hosts)
        .map(|i| {
            let Object::Deployment(d) = object(&format!(
                "apiVersion: fediversity.eu/v1alpha1
kind: Deployment
metadata: {{ name: b{i} }}
spec:
  domain: b{i}.example.org
  runtimeEnvironment: bench
  applications: {{ mastodon: {{ size: small }} }}
  initialUser: {{ displayName: A, email: a@example.org }}
"
            )) else {
                unreachable!("the text is a Deployment")
            };
            d
        })
        .collect();
    let store = Arc::new(Store::open(&dir.path().join("state")).expect("the store opens"));
    let provider = ProxmoxProvider::new(
        store,
        Arc::new(DesiredState::default()),
        "bench".into(),
        ProxmoxMetrics::unregistered(),
        RateLimit {
            per_second: 100_000.0,
            burst: 100_000.0,
        },
    );
    provider
        .check_environment(&env)
        .await
        .expect("the environment is usable");

    // Create 1,000 VMs, 50 Deployments at a time, each pass until converged.
    sim.reset_stats();
    let started = Instant::now();
    for chunk in deployments.chunks(BATCH) {
        let mut pending: Vec<&Deployment> = chunk.iter().collect();
        while !pending.is_empty() {
            let mut set = tokio::task::JoinSet::new();
            for d in &pending {
                let (p, d, env) = (provider.clone(), (*d).clone(), env.clone());
                let hosts = plan(&d, &apps).expect("the Deployment plans");
                set.spawn(async move {
                    (
                        d.metadata.name.to_string(),
                        p.converge(request(&d, &env, &hosts)).await,
                    )
                });
            }
            let mut done = Vec::new();
            while let Some(joined) = set.join_next().await {
                if let Ok((name, Ok(report))) = joined
                    && report.converged
                {
                    done.push(name);
                }
            }
            pending.retain(|d| !done.contains(&d.metadata.name.to_string()));
        }
    }
    let created = sim.stats();
    let create_time = started.elapsed();
    let vms = sim.vms().len() - 1;
    println!(
        "create: {vms} VMs in {create_time:.1?}; {} Proxmox requests, {:.1} per VM created",
        created.total,
        created.total as f64 / vms as f64
    );

    // A full no-op resync: every Deployment reconciled once, all at the same time.
    sim.reset_stats();
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for d in &deployments {
        let (p, d, env) = (provider.clone(), d.clone(), env.clone());
        let hosts = plan(&d, &apps).expect("the Deployment plans");
        set.spawn(async move { p.converge(request(&d, &env, &hosts)).await.map(|r| r.converged) });
    }
    let mut converged = 0;
    while let Some(joined) = set.join_next().await {
        if matches!(joined, Ok(Ok(true))) {
            converged += 1;
        }
    }
    let resync = sim.stats();
    println!(
        "no-op resync of {converged}/{hosts} converged hosts: {} Proxmox requests in {:.1?} ({:?})",
        resync.total,
        started.elapsed(),
        resync.by_route
    );
}

/// A converge request for a Deployment with no status yet.
fn request<'a>(
    d: &'a Deployment,
    env: &'a RuntimeEnvironment,
    hosts: &'a [PlannedHost],
) -> ConvergeRequest<'a> {
    static NONE: std::sync::LazyLock<PreviousFacts> = std::sync::LazyLock::new(PreviousFacts::default);
    ConvergeRequest {
        deployment: d,
        env,
        hosts,
        previous: &NONE,
    }
}
