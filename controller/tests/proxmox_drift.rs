//! The drift scan against the Proxmox VE simulator: a VM's CPU, memory, tags or a cloud-init key
//! changed out of band, or the VM stopped out of band, is found on a pass that otherwise changes
//! nothing, put back, and reported (the `Drifted` condition and a metric).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fediversity::api::{
    Application, ConditionStatus, Deployment, Name, Object, RuntimeEnvironment, condition_types,
};
use fediversity::provider::{ConvergeRequest, PreviousFacts};
use fediversity::proxmox::client::{Api, HttpProxmox};
use fediversity::proxmox::{ProxmoxMetrics, ProxmoxProvider, RateLimit};
use fediversity::reconcile::deployment::plan;
use fediversity::reconcile::{Provider, ProviderCondition, ProviderReport};
use fediversity::state::DesiredState;
use fediversity::store::Store;
use fediversity_testbed::{SimConfig, SimHandle, Simulator, VmInfo};

const TOKEN_ID: &str = "ci@pve!ctl";
const SECRET: &str = "00000000-0000-4000-8000-000000000001";

fn object(text: &str) -> Object {
    let docs =
        fediversity::yaml::parse_documents(text, &fediversity::yaml::Limits::default()).expect("valid YAML");
    fediversity::api::parse_object(&docs[0].1).expect("a valid object")
}

/// A simulated cluster, a provider that scans on every pass, one Deployment converged on it.
struct Setup {
    sim: SimHandle,
    provider: ProxmoxProvider,
    metrics: ProxmoxMetrics,
    env: RuntimeEnvironment,
    deployment: Deployment,
    apps: BTreeMap<Name, Application>,
    /// Acts in the cluster as someone in the Proxmox UI would.
    operator: Api,
    _dir: tempfile::TempDir,
}

impl Setup {
    async fn converged() -> Self {
        let sim = Simulator::start(
            SimConfig::new()
                .token(TOKEN_ID, SECRET)
                .template(9000)
                .latency_scale(0.0),
        )
        .await
        .expect("the simulator starts");
        let dir = tempfile::tempdir().expect("a temporary directory");
        std::fs::write(dir.path().join("token"), SECRET).expect("the token file is written");
        std::fs::write(
            dir.path().join("id.pub"),
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHVnZXhhbXBsZWtleWZvcmRvY3Vtb25seQ test",
        )
        .expect("the key file is written");
        let endpoint = sim.base_url().trim_end_matches("/api2/json").to_owned();
        let Object::RuntimeEnvironment(env) = object(&format!(
            "apiVersion: fediversity.eu/v1alpha1
kind: RuntimeEnvironment
metadata: {{ name: sim }}
spec:
  proxmox:
    endpoint: {endpoint}
    credentials: {{ tokenId: \"{TOKEN_ID}\", secretFile: {dir}/token }}
    nodes: [pve]
    template: {{ vmid: 9000 }}
    storage: local-lvm
    bridge: vmbr0
    vmidRange: {{ start: 1000, end: 1099 }}
  ssh: {{ user: root, privateKeyFile: {dir}/id }}
",
            dir = dir.path().display()
        )) else {
            unreachable!("the text is a RuntimeEnvironment")
        };
        let Object::Application(app) = object(&fediversity::fixtures::application_yaml("mastodon")) else {
            unreachable!("the fixture is an Application")
        };
        let Object::Deployment(deployment) = object(
            "apiVersion: fediversity.eu/v1alpha1
kind: Deployment
metadata: { name: uni }
spec:
  domain: uni.example.org
  runtimeEnvironment: sim
  applications: { mastodon: { size: small } }
  initialUser: { displayName: A, email: a@example.org }
",
        ) else {
            unreachable!("the text is a Deployment")
        };
        let metrics = ProxmoxMetrics::unregistered();
        let store = Arc::new(Store::open(&dir.path().join("state")).expect("the store opens"));
        let rate = RateLimit {
            per_second: 1000.0,
            burst: 1000.0,
        };
        let provider = ProxmoxProvider::new(
            store,
            Arc::new(DesiredState::default()),
            "drift-test".into(),
            metrics.clone(),
            rate,
        )
        .with_drift_interval(Duration::ZERO);
        let spec = env.spec.proxmox.as_ref().expect("a proxmox section");
        let operator = Api(Arc::new(
            HttpProxmox::new(spec, &env.spec.limits, rate, ProxmoxMetrics::unregistered())
                .expect("the operator's client"),
        ));
        let setup = Self {
            sim,
            provider,
            metrics,
            env,
            deployment,
            apps: [(Name::new("mastodon"), app)].into(),
            operator,
            _dir: dir,
        };
        let first = setup.converge().await;
        assert_eq!(
            drifted(&first).map(|c| c.status),
            Some(ConditionStatus::False),
            "{first:?}"
        );
        setup
    }

    /// Passes until one reports the Deployment converged; returns every report.
    async fn converge_all(&self) -> Vec<ProviderReport> {
        let hosts = plan(&self.deployment, &self.apps).expect("the Deployment plans");
        let mut reports = Vec::new();
        for _ in 0..100 {
            let request = ConvergeRequest {
                deployment: &self.deployment,
                env: &self.env,
                hosts: &hosts,
                previous: &PreviousFacts::default(),
            };
            match self.provider.converge(request).await {
                Ok(report) => {
                    let done = report.converged;
                    reports.push(report);
                    if done {
                        return reports;
                    }
                }
                Err(e) => eprintln!("a pass failed, trying again: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the Deployment did not converge: {reports:?}");
    }

    async fn converge(&self) -> ProviderReport {
        self.converge_all().await.pop().expect("a report")
    }

    fn vm(&self) -> VmInfo {
        let ours: Vec<VmInfo> = self
            .sim
            .vms()
            .into_iter()
            .filter(|v| v.tags.iter().any(|t| t.starts_with("fediversity-owner-")))
            .collect();
        assert_eq!(ours.len(), 1, "exactly one VM of ours: {ours:?}");
        ours.into_iter().next().expect("one VM")
    }

    async fn change(&self, key: &str, value: &str) {
        let vm = self.vm();
        self.operator
            .set_config(&vm.node, vm.vmid, &[(key.to_owned(), value.to_owned())], None)
            .await
            .expect("the out-of-band change is accepted");
    }

    fn drift_count(&self, kind: &str) -> u64 {
        self.metrics.drift.with_label_values(&["sim", kind]).get()
    }

    /// After an out-of-band change: the pass that finds it says so, and the Deployment converges.
    async fn expect_drift(&self, kind: &str, key: &str) -> String {
        let reports = self.converge_all().await;
        let found = reports
            .iter()
            .filter_map(drifted)
            .find(|c| c.status == ConditionStatus::True)
            .unwrap_or_else(|| panic!("no pass reported drift: {reports:?}"));
        assert!(found.message.contains(key), "{}", found.message);
        assert_eq!(self.drift_count(kind), 1, "the {kind} drift is counted once");
        let last = reports.last().expect("a report");
        assert!(last.converged, "{last:?}");
        found.message.clone()
    }
}

fn drifted(report: &ProviderReport) -> Option<&ProviderCondition> {
    report
        .conditions
        .iter()
        .find(|c| c.type_ == condition_types::DRIFTED)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cores_changed_out_of_band_on_a_running_vm_are_found_and_reverted() {
    let s = Setup::converged().await;
    s.change("cores", "4").await;
    assert_eq!(
        s.vm().pending.get("cores").map(String::as_str),
        Some("4"),
        "pending until a restart"
    );
    let message = s.expect_drift("cpu", "cores").await;
    assert!(message.contains("cores 4"), "{message}");
    let vm = s.vm();
    assert_eq!(vm.config["cores"], "2");
    assert!(
        vm.pending.is_empty(),
        "the pending change was reverted: {:?}",
        vm.pending
    );
    assert!(vm.running, "no restart was needed: the change never ran");
    let again = s.converge().await;
    assert_eq!(drifted(&again).map(|c| c.status), Some(ConditionStatus::False));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_changed_out_of_band_is_found_and_put_back() {
    let s = Setup::converged().await;
    s.change("memory", "8192").await;
    let message = s.expect_drift("memory", "memory").await;
    assert!(message.contains("memory 8192"), "{message}");
    let vm = s.vm();
    assert_eq!(vm.config["memory"], "4096");
    assert!(vm.pending.is_empty(), "{:?}", vm.pending);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_fediversity_tag_is_found_and_put_back_and_other_tags_are_kept() {
    let s = Setup::converged().await;
    let owner = s
        .vm()
        .tags
        .into_iter()
        .find(|t| t.starts_with("fediversity-owner-"))
        .expect("our owner tag");
    s.change("tags", &format!("{owner};production")).await;
    s.expect_drift("tags", "tags").await;
    let tags = s.vm().tags;
    for t in ["fediversity", owner.as_str(), "production"] {
        assert!(tags.iter().any(|x| x == t), "{t} missing from {tags:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_init_key_changed_out_of_band_is_found_and_put_back() {
    let s = Setup::converged().await;
    s.change("ciuser", "intruder").await;
    let message = s.expect_drift("cloud_init", "ciuser").await;
    assert!(
        !message.contains("intruder"),
        "values of other keys are not echoed: {message}"
    );
    assert_eq!(s.vm().config["ciuser"], "root");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_stopped_out_of_band_is_reported_and_started_again() {
    let s = Setup::converged().await;
    let vm = s.vm();
    let upid = s
        .operator
        .power(&vm.node, vm.vmid, false)
        .await
        .expect("the stop is accepted");
    for _ in 0..100 {
        if !s.vm().running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!s.vm().running, "the VM stopped ({upid})");
    let message = s.expect_drift("stopped", "stopped out of band").await;
    assert!(message.contains(&vm.vmid.to_string()), "{message}");
    let after = s.vm();
    assert!(after.running, "started again");
    assert_eq!(after.vmid, vm.vmid, "the same VM, never a second one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_with_no_out_of_band_change_finds_no_drift_and_changes_nothing() {
    let s = Setup::converged().await;
    s.sim.reset_stats();
    let report = s.converge().await;
    assert_eq!(drifted(&report).map(|c| c.status), Some(ConditionStatus::False));
    let stats = s.sim.stats();
    let writes: u64 = stats
        .by_route
        .iter()
        .filter(|(r, _)| !r.starts_with("GET "))
        .map(|(_, c)| c)
        .sum();
    assert_eq!(writes, 0, "{:?}", stats.by_route);
    assert_eq!(
        stats.by_route.get("GET /nodes/{node}/qemu/{vmid}/config"),
        Some(&1),
        "one config read: the scan {:?}",
        stats.by_route
    );
}
