//! The daemon moves a Deployment of two applications between two Proxmox clusters (simulated; behind
//! every address a VM gets, a real sshd test host with a real PostgreSQL and real files): new VMs are
//! cloned in the target cluster and deployed held, the data is copied with restic and verified, and
//! the old VMs are destroyed after the grace period, with the daemon SIGKILLed twenty times on the way.

mod backup_support;
mod common;
mod nixos_support;
mod postgres_support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Daemon, get, hashes, kill_daemon, wait_for};
use fediversity::migrate::{Phase, record};
use fediversity::store::Store;
use fediversity_testbed::{SimConfig, SimHandle, Simulator};
use nixos_support::{Lab, NIX_CONFIG, TestHost};
use postgres_support::{Postgres, on_host, postgres_host_at, sql};
use serde_json::Value;

/// The clusters' address pools of each test: the simulator hands out .2, .3, … in the order VMs first
/// start.
const POOLS_KILLS: (&str, &str) = ("127.0.78.0/24", "127.0.79.0/24");
const POOLS_RETAIN: (&str, &str) = ("127.0.80.0/24", "127.0.81.0/24");
/// The tests take turns: each runs a daemon, two clusters and four PostgreSQL servers.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
/// A VM in cluster A that the controller did not create (it takes the pool's first address).
const FOREIGN: u32 = 1000;
const APPS: [&str; 2] = ["alpha", "beta"];
const TOKEN: &str = "a-long-api-token-for-the-proxmox-migration-test";
/// The simulators' API token and template.
const PVE_TOKEN_ID: &str = "ci@pve!ctl";
const PVE_SECRET: &str = "00000000-0000-4000-8000-000000000001";
const TEMPLATE: u32 = 9000;

const QUERIES: [&str; 3] = [
    "SELECT count(*) FROM customers",
    "SELECT count(*), sum(amount) FROM orders",
    "SELECT count(*), string_agg(md5(body), '' ORDER BY id) FROM events",
];

/// The VMs of `sim` named `demo-<app>` (templates aside), by name.
fn demo_vms(sim: &SimHandle) -> BTreeMap<String, Vec<u32>> {
    let mut by_name: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for vm in sim.vms() {
        if let Some(name) = vm.name.filter(|n| n.starts_with("demo-"))
            && !vm.template
        {
            by_name.entry(name).or_default().push(vm.vmid);
        }
    }
    by_name
}

/// One cluster: its simulator, its lab (client key, stand-in nixpkgs) and the test hosts behind the
/// addresses its VMs get.
struct Cluster {
    sim: SimHandle,
    lab: Lab,
    hosts: Vec<(TestHost, Postgres)>,
    port: u16,
}

impl Cluster {
    fn new(rt: &tokio::runtime::Runtime, pool: &str, foreign: bool, first: u8) -> Self {
        let mut config = SimConfig::new()
            .latency_scale(0.0)
            .address_pool(pool)
            .token(PVE_TOKEN_ID, PVE_SECRET)
            .template(TEMPLATE);
        if foreign {
            config = config.foreign_vm(FOREIGN);
        }
        let sim = rt.block_on(Simulator::start(config)).unwrap();
        let lab = Lab::new();
        let port = common::free_port();
        let prefix = pool.trim_end_matches("0/24");
        let hosts = (first..first + 2)
            .map(|n| postgres_host_at(&lab, &format!("vm{n}"), &format!("{prefix}{n}"), port))
            .collect();
        Self {
            sim,
            lab,
            hosts,
            port,
        }
    }

    /// The test host behind `address`.
    fn at(&self, address: &str) -> &TestHost {
        self.hosts
            .iter()
            .map(|(h, _)| h)
            .find(|h| h.address == address)
            .unwrap_or_else(|| panic!("no test host behind {address}"))
    }

    fn environment_yaml(&self, name: &str, backup: &str) -> String {
        let secret = self.lab.path().join("token");
        std::fs::write(&secret, format!("{}\n", PVE_SECRET)).unwrap();
        format!(
            "apiVersion: fediversity.eu/v1alpha1\nkind: RuntimeEnvironment\nmetadata: {{ name: {name} }}\nspec:\n  \
proxmox:\n    endpoint: {}\n    credentials: {{ tokenId: \"{}\", secretFile: {} }}\n    nodes: [pve]\n    \
template: {{ vmid: {} }}\n    storage: local-lvm\n    bridge: vmbr0\n    vmidRange: {{ start: 1000, end: 1099 }}\n  \
ssh: {{ user: root, privateKeyFile: {}, port: {} }}\n  nix: {{ nixpkgs: {} }}\n  acme: {{ email: acme@lab.example }}\n{backup}",
            self.sim.base_url().trim_end_matches("/api2/json"),
            PVE_TOKEN_ID,
            secret.display(),
            TEMPLATE,
            self.lab.path().join("id_ed25519").display(),
            self.port,
            self.lab.path().join("nixpkgs").display()
        )
    }
}

/// Two clusters `a` (with a foreign VM) and `b`, a Deployment `demo` of two applications with data,
/// and the daemon.
struct Rig {
    daemon: Option<Daemon>,
    source: PathBuf,
    state: PathBuf,
    token: PathBuf,
    catalog: PathBuf,
    a: Cluster,
    b: Cluster,
    policy: &'static str,
    _shared: tempfile::TempDir,
}

impl Rig {
    fn new(rt: &tokio::runtime::Runtime, (pool_a, pool_b): (&str, &str), policy: &'static str) -> Self {
        backup_support::require_tools();
        std::fs::create_dir_all("/run/postgresql").unwrap();
        // In a, the foreign VM takes .2 and ours .3 and .4; in b ours take .2 and .3.
        let a = Cluster::new(rt, pool_a, true, 3);
        let b = Cluster::new(rt, pool_b, false, 2);
        let shared = tempfile::tempdir().unwrap();
        std::fs::write(shared.path().join("pw"), "a migration password\n").unwrap();
        let backup = format!(
            "  backup: {{ repository: {}, passwordFile: {}, schedule: 1d }}\n",
            shared.path().join("repo").display(),
            shared.path().join("pw").display()
        );
        let source = shared.path().join("source");
        std::fs::create_dir_all(&source).unwrap();
        std::fs::write(source.join("a.yaml"), a.environment_yaml("a", &backup)).unwrap();
        std::fs::write(source.join("b.yaml"), b.environment_yaml("b", &backup)).unwrap();
        for app in APPS {
            std::fs::write(
                source.join(format!("{app}.yaml")),
                format!(
                    "apiVersion: fediversity.eu/v1alpha1\nkind: Application\nmetadata: {{ name: {app} }}\nspec:\n  \
displayName: Probe {app}\n  nixosModule: nix/applications/probe.nix\n  sizes: {{ small: {{ cores: 1, memoryMiB: 512, diskGiB: 10 }} }}\n  \
data: {{ paths: [/nix/var/app-data], databases: [app] }}\n"
                ),
            )
            .unwrap();
        }
        let token = shared.path().join("api-token");
        std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
        let rig = Self {
            daemon: None,
            state: shared.path().join("state"),
            catalog: a.lab.catalog(),
            source,
            token,
            a,
            b,
            policy,
            _shared: shared,
        };
        rig.place("a");
        rig
    }

    /// Writes the Deployment with `spec.runtimeEnvironment: env` and the rig's deletion policy (old
    /// hosts deleted after a short grace period under `Delete`).
    fn place(&self, env: &str) {
        std::fs::write(
            self.source.join("demo.yaml"),
            format!(
                "apiVersion: fediversity.eu/v1alpha1\nkind: Deployment\nmetadata:\n  name: demo\n  \
annotations: {{ fediversity.eu/migration-grace-seconds: \"12\" }}\nspec:\n  domain: lab.example\n  \
runtimeEnvironment: {env}\n  deletionPolicy: {}\n  applications: {{ alpha: {{}}, beta: {{}} }}\n",
                self.policy
            ),
        )
        .unwrap();
    }

    fn start(&mut self) {
        let args: Vec<std::ffi::OsString> = [
            "--source".as_ref(),
            self.source.as_os_str(),
            "--state-dir".as_ref(),
            self.state.as_os_str(),
            "--provider".as_ref(),
            "proxmox".as_ref(),
            "--instance-id".as_ref(),
            "pxmove".as_ref(),
            "--nixos-catalog".as_ref(),
            self.catalog.as_os_str(),
            "--api-token-file".as_ref(),
            self.token.as_os_str(),
        ]
        .iter()
        .map(|a| a.to_os_string())
        .collect();
        self.daemon = Some(common::spawn_with_env(&args, &[("NIX_CONFIG", NIX_CONFIG)]));
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("the daemon runs")
    }

    fn deployment(&self) -> Option<Value> {
        get(self.daemon(), "/api/v1/deployments/demo")
    }

    fn migration(&self) -> Option<Value> {
        self.deployment().map(|d| d["status"]["migration"].clone())
    }

    /// The recorded migration phase, if one began (the daemon must not run: the store is its own).
    fn stored_phase(&self) -> Option<Phase> {
        let store = Store::open(&self.state).unwrap();
        record::load(&store, "demo").unwrap().map(|r| r.phase)
    }
}

/// Each application's address, from the Deployment's `status.hosts`.
fn addresses(d: &Value) -> BTreeMap<String, String> {
    d["status"]["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            let app = h["name"].as_str().unwrap().trim_start_matches("demo-").to_owned();
            (app, h["address"].as_str().unwrap().to_owned())
        })
        .collect()
}

/// Seeds `app`'s data on `host`: a database with its own rows and files of its own.
fn seed(lab: &Lab, host: &TestHost, app: &str, rows: u32) {
    on_host(
        lab,
        host,
        "runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -d postgres -c 'CREATE ROLE app LOGIN' -c 'CREATE DATABASE app OWNER app'",
    );
    on_host(
        lab,
        host,
        &format!(
            "runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -d app -c 'SET ROLE app' -c {}",
            backup_support::shell(backup_support::SEED_SQL)
        ),
    );
    sql(
        lab,
        host,
        &format!("INSERT INTO events(body) SELECT '{app} ' || i FROM generate_series(1, {rows}) i"),
    );
    let data = host.root.join("nix/var/app-data");
    std::fs::create_dir_all(data.join("media")).unwrap();
    for i in 0..40u8 {
        std::fs::write(data.join(format!("media/{app}-{i}.bin")), vec![i; 4096]).unwrap();
    }
    let random = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c 3000000 /dev/urandom > '{}/big.bin'",
            data.display()
        ))
        .status()
        .unwrap();
    assert!(random.success());
}

#[test]
fn a_deployment_moves_between_two_proxmox_clusters_with_its_data_through_twenty_sigkills_of_the_daemon() {
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut rig = Rig::new(&rt, POOLS_KILLS, "Delete");
    let started = Instant::now();
    rig.start();
    let d = wait_for("the Deployment to run in a", Duration::from_secs(180), || {
        rig.deployment().filter(|d| {
            d["status"]["runtimeEnvironment"] == "a"
                && d["status"]["hosts"]
                    .as_array()
                    .is_some_and(|h| h.len() == 2 && h.iter().all(|h| h["lastResult"] == "Applied"))
        })
    });
    let sources = addresses(&d);
    for (i, app) in APPS.iter().enumerate() {
        seed(&rig.a.lab, rig.a.at(&sources[*app]), app, 100 + 150 * i as u32);
    }
    let foreign_before = rig.a.sim.vm(FOREIGN).expect("the foreign VM");
    let ours_in_a = demo_vms(&rig.a.sim);
    assert_eq!(ours_in_a.len(), 2, "{ours_in_a:?}");

    // The Deployment is backed up (asked over the API, with the token).
    let asked = Command::new("curl")
        .args(["--silent", "--fail", "-X", "POST", "-H"])
        .arg(format!("Authorization: Bearer {TOKEN}"))
        .arg(format!(
            "http://{}/api/v1/deployments/demo/backup",
            rig.daemon().server
        ))
        .output()
        .unwrap();
    assert!(asked.status.success(), "{asked:?}");
    wait_for("the backups", Duration::from_secs(180), || {
        rig.deployment().filter(|d| {
            d["status"]["backups"]
                .as_array()
                .is_some_and(|b| b.len() == 2 && b.iter().all(|b| b["result"] == "Succeeded"))
        })
    });

    // The operator moves the Deployment to b; twenty SIGKILLs at random points follow, the daemon
    // restarted after each.
    rig.place("b");
    let mut kills = 0;
    let mut seen: Vec<Option<Phase>> = Vec::new();
    let mut targets_seen: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    let mut written = false;
    let mut rng = fastrand::Rng::new();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(420),
            "too slow: {kills} kills, phases {seen:?}"
        );
        if kills > 0 {
            rig.start();
        }
        // Mostly within a step; after three kills in one phase, just past its end (so that the kills
        // spread over the phases however long each takes).
        let last = seen.last().copied().flatten();
        let stuck = seen.len() >= 3 && seen[seen.len() - 3..].iter().all(|p| *p == last);
        if stuck && let Some(last) = last {
            let deadline = Instant::now() + Duration::from_secs(120);
            while Instant::now() < deadline
                && rig
                    .migration()
                    .is_none_or(|m| m["phase"].as_str() == Some(last.as_str()))
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            std::thread::sleep(Duration::from_millis(rng.u64(0..300)));
        } else {
            std::thread::sleep(Duration::from_millis(rng.u64(200..1_500)));
        }
        if kills >= 20 || rig.migration().is_some_and(|m| m["phase"] == "Succeeded") {
            break;
        }
        kill_daemon(rig.daemon.take().unwrap());
        kills += 1;
        let phase = rig.stored_phase();
        seen.push(phase);
        let at = phase.map_or("before the migration began", Phase::as_str);
        // Never a second VM for a host in b, and never another one in its place.
        for (name, vmids) in demo_vms(&rig.b.sim) {
            assert_eq!(
                vmids.len(),
                1,
                "{name} has VMs {vmids:?} in b after kill {kills} in {at}"
            );
            let first = targets_seen.entry(name.clone()).or_insert_with(|| vmids.clone());
            assert_eq!(
                *first, vmids,
                "{name} was cloned again after kill {kills} in {at}"
            );
        }
        // The source's VMs stay until the source is retired.
        if phase.is_none_or(|p| p < Phase::RetiringSource) {
            assert_eq!(demo_vms(&rig.a.sim), ours_in_a, "after kill {kills} in {at}");
        }
        assert!(
            !matches!(phase, Some(Phase::RollingBack | Phase::Failed)),
            "the migration failed after kill {kills}: {at}"
        );
        // Written to the sources after the pre-copy began and before they stopped for good: the
        // final copy must carry it.
        if !written && matches!(phase, Some(Phase::PreCopying | Phase::StoppingSource)) {
            for (app, address) in &sources {
                let host = rig.a.at(address);
                sql(
                    &rig.a.lab,
                    host,
                    &format!(
                        "INSERT INTO events(body) SELECT 'during the pre-copy of {app} ' || i FROM generate_series(1, 50) i"
                    ),
                );
                std::fs::write(
                    host.root.join("nix/var/app-data/during-pre-copy.txt"),
                    format!("written to {app} during the pre-copy"),
                )
                .unwrap();
            }
            written = true;
        }
    }
    eprintln!(
        "killed {kills} times, in phases {seen:?}; written to the sources during the migration: {written}"
    );
    assert!(kills >= 20, "the migration ended after {kills} kills: {seen:?}");
    for phase in [Phase::Provisioning, Phase::PreCopying, Phase::RetiringSource] {
        assert!(seen.contains(&Some(phase)), "no kill in {phase}: {seen:?}");
    }
    // A kill in the pre-copy is where the sources were written to.
    assert!(
        written,
        "nothing was written to the sources during the migration: {seen:?}"
    );
    assert!(
        seen.iter().flatten().any(|p| *p >= Phase::StoppingSource),
        "{seen:?}"
    );

    let done = common::wait_migrated(Duration::from_secs(180), || rig.migration());
    eprintln!("{done:#}");
    assert_eq!(
        (done["from"].as_str(), done["to"].as_str()),
        (Some("a"), Some("b"))
    );
    assert_eq!(done["verified"], true, "{done}");
    assert_eq!(done["source"], "Destroyed", "{done}");
    assert!(done["downtimeSeconds"].as_f64().unwrap() > 0.0, "{done}");

    // Exactly one VM per host in b; in a, ours destroyed and the foreign one untouched.
    let in_b = demo_vms(&rig.b.sim);
    assert_eq!(
        in_b.keys().cloned().collect::<Vec<_>>(),
        vec!["demo-alpha".to_owned(), "demo-beta".to_owned()]
    );
    assert!(in_b.values().all(|v| v.len() == 1), "{in_b:?}");
    assert!(demo_vms(&rig.a.sim).is_empty(), "{:?}", rig.a.sim.vms());
    let foreign = rig.a.sim.vm(FOREIGN).expect("the foreign VM is still there");
    assert!(foreign.running);
    assert_eq!(foreign.config, foreign_before.config);
    assert_eq!(foreign.tags, foreign_before.tags);

    // The Deployment runs in b, its data equal to the sources' (which only ever were read).
    let d = wait_for("the Deployment to run in b", Duration::from_secs(120), || {
        rig.deployment().filter(|d| {
            d["status"]["runtimeEnvironment"] == "b"
                && common::ready(d).is_some_and(|(status, _)| status == "True")
        })
    });
    let targets = addresses(&d);
    for app in APPS {
        let (source, target) = (rig.a.at(&sources[app]), rig.b.at(&targets[app]));
        let want: Vec<String> = QUERIES.iter().map(|q| sql(&rig.a.lab, source, q)).collect();
        let got: Vec<String> = QUERIES.iter().map(|q| sql(&rig.b.lab, target, q)).collect();
        assert_eq!(got, want, "{app}");
        // The target was held stopped until its data was there: its first activation is a held one,
        // also when a kill cut a deploy short (the next run finishes or undoes it).
        let starts = target.app_starts();
        assert_eq!(
            starts.first().map(|(w, _)| w.as_str()),
            Some("held"),
            "{app}: {starts:?}"
        );
        let files = hashes(&target.root.join("nix/var/app-data"));
        assert_eq!(files, hashes(&source.root.join("nix/var/app-data")), "{app}");
        assert_eq!(files.len(), 40 + 1 + 1, "{files:?}");
        assert_eq!(
            sql(
                &rig.b.lab,
                target,
                &format!("SELECT count(*) FROM events WHERE body LIKE 'during the pre-copy of {app} %'")
            ),
            "50"
        );
    }
    eprintln!("took {} s", started.elapsed().as_secs());
}

#[test]
fn under_retain_the_old_vms_are_stopped_and_kept_while_the_deployment_runs_in_the_new_cluster() {
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut rig = Rig::new(&rt, POOLS_RETAIN, "Retain");
    rig.start();
    let d = wait_for("the Deployment to run in a", Duration::from_secs(180), || {
        rig.deployment().filter(|d| {
            d["status"]["runtimeEnvironment"] == "a"
                && d["status"]["hosts"]
                    .as_array()
                    .is_some_and(|h| h.len() == 2 && h.iter().all(|h| h["lastResult"] == "Applied"))
        })
    });
    let sources = addresses(&d);
    for (i, app) in APPS.iter().enumerate() {
        seed(&rig.a.lab, rig.a.at(&sources[*app]), app, 10 + 20 * i as u32);
    }
    let ours_in_a = demo_vms(&rig.a.sim);
    let foreign_before = rig.a.sim.vm(FOREIGN).expect("the foreign VM");

    rig.place("b");
    let done = common::wait_migrated(Duration::from_secs(240), || rig.migration());
    assert_eq!(done["source"], "Retained", "{done}");
    assert_eq!(done["verified"], true, "{done}");

    // The old VMs are kept, stopped; the foreign one runs on untouched.
    assert_eq!(demo_vms(&rig.a.sim), ours_in_a);
    for vmids in ours_in_a.values() {
        let vm = rig.a.sim.vm(vmids[0]).unwrap();
        assert!(!vm.running, "{vm:?}");
    }
    let foreign = rig.a.sim.vm(FOREIGN).unwrap();
    assert!(foreign.running);
    assert_eq!(foreign.config, foreign_before.config);
    let in_b = demo_vms(&rig.b.sim);
    assert_eq!(in_b.len(), 2, "{in_b:?}");
    assert!(in_b.values().all(|v| v.len() == 1), "{in_b:?}");

    let d = wait_for("the Deployment to run in b", Duration::from_secs(120), || {
        rig.deployment().filter(|d| {
            d["status"]["runtimeEnvironment"] == "b"
                && common::ready(d).is_some_and(|(status, _)| status == "True")
        })
    });
    let targets = addresses(&d);
    for app in APPS {
        let (source, target) = (rig.a.at(&sources[app]), rig.b.at(&targets[app]));
        let want: Vec<String> = QUERIES.iter().map(|q| sql(&rig.a.lab, source, q)).collect();
        let got: Vec<String> = QUERIES.iter().map(|q| sql(&rig.b.lab, target, q)).collect();
        assert_eq!(got, want, "{app}");
        assert_eq!(
            hashes(&target.root.join("nix/var/app-data")),
            hashes(&source.root.join("nix/var/app-data")),
            "{app}"
        );
    }
    // Stopped VMs stay stopped: the Deployment in b leaves a alone.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        ours_in_a
            .values()
            .all(|v| rig.a.sim.vm(v[0]).is_some_and(|vm| !vm.running))
    );
}
