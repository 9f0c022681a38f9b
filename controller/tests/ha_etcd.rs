//! High availability: three real controller replicas share a real three-member etcd cluster and provision
//! VMs on the Proxmox simulator while their leader is killed, paused, and etcd loses members.

mod etcd_support;
mod proxmox_support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_support::EtcdCluster;
use fediversity_testbed::{SimConfig, SimHandle};
use proxmox_support::*;
use serde_json::Value;

/// The bearer token of API writes on every replica.
const API_TOKEN: &str = "ha-api-token";

/// One replica: `fediversity run` against the shared etcd store, with short election timings.
struct Replica {
    child: Child,
    server: String,
    _state: tempfile::TempDir,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Replica {
    fn spawn(source: &Path, store: &str) -> Self {
        let state = tempfile::tempdir().unwrap();
        let port = free_port();
        let token = state.path().join("api-token");
        std::fs::write(&token, API_TOKEN).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_fediversity"))
            .args(["run", "--source"])
            .arg(source)
            .arg("--state-dir")
            .arg(state.path())
            .arg("--api-token-file")
            .arg(&token)
            .args(["--store", store])
            .args([
                "--leader-lease",
                "3s",
                "--leader-renew-deadline",
                "2s",
                "--leader-retry",
                "500ms",
            ])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env(
                "RUST_LOG",
                std::env::var("E2E_LOG").unwrap_or_else(|_| "error".into()),
            )
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("E2E_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .unwrap();
        Self {
            child,
            server: format!("127.0.0.1:{port}"),
            _state: state,
        }
    }

    fn role(&self) -> Option<String> {
        let (_, body) = http_get(&self.server, "/api/v1/leader")?;
        let v: Value = serde_json::from_str(&body).ok()?;
        v["role"].as_str().map(str::to_owned)
    }

    fn api(&self, path: &str) -> Value {
        http_get(&self.server, &format!("/api/v1/{path}"))
            .and_then(|(_, body)| serde_json::from_str(&body).ok())
            .unwrap_or(Value::Null)
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args([signal, &pid])
                .status()
                .unwrap()
                .success()
        );
    }
}

/// Three replicas of one installation.
struct Replicas {
    source: std::path::PathBuf,
    store: String,
    all: Vec<Replica>,
}

impl Replicas {
    fn start(source: &Path, store: &str) -> Self {
        Self {
            source: source.to_path_buf(),
            store: store.to_owned(),
            all: (0..3).map(|_| Replica::spawn(source, store)).collect(),
        }
    }

    /// The replica that says it leads.
    fn leader(&self) -> Option<usize> {
        self.all
            .iter()
            .position(|r| r.role().as_deref() == Some("leader"))
    }

    fn wait_leader(&self, within: Duration) -> usize {
        wait_for("a replica to lead", within, || self.leader())
    }

    /// Restarts replica `i` (as systemd or Kubernetes would).
    fn restart(&mut self, i: usize) {
        self.all[i] = Replica::spawn(&self.source, &self.store);
    }

    /// Restarts every replica that exited (one that lost its leadership exits to start afresh).
    fn restart_exited(&mut self) -> usize {
        let mut restarted = 0;
        for i in 0..self.all.len() {
            if self.all[i].child.try_wait().ok().flatten().is_some() {
                self.restart(i);
                restarted += 1;
            }
        }
        restarted
    }

    /// Waits until the leader reports `count` Deployments, all Ready.
    fn wait_ready(&mut self, count: usize, within: Duration) {
        let until = Instant::now() + within;
        loop {
            self.restart_exited();
            if let Some(l) = self.leader() {
                let items = self.all[l].api("deployments")["items"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                if items.len() == count
                    && items
                        .iter()
                        .all(|d| condition(d, "Ready").is_some_and(|c| c.0 == "True"))
                {
                    return;
                }
            }
            assert!(
                Instant::now() < until,
                "the Deployments did not all become Ready in {within:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Exactly the wanted hosts have one VM each, every VM carries the same owner tag (one installation),
/// nothing else of ours is in the range, and the foreign VMs are untouched.
fn assert_one_vm_per_host(sim: &SimHandle, wanted: &BTreeSet<String>) {
    let ours = our_vms(sim);
    let names: Vec<String> = ours.iter().filter_map(|v| v.name.clone()).collect();
    let unique: BTreeSet<String> = names.iter().cloned().collect();
    assert_eq!(names.len(), unique.len(), "a host has two VMs: {names:?}");
    assert_eq!(&unique, wanted, "every wanted host has its VM, and nothing else");
    // `fediversity-owner-INSTALLATION-DEPLOYMENT`: the installation part is the same whoever led.
    let installations: BTreeSet<String> = ours
        .iter()
        .flat_map(|v| v.tags.iter().filter(|t| t.starts_with("fediversity-owner-")))
        .map(|t| t.rsplit_once('-').map_or(t.clone(), |(head, _)| head.to_owned()))
        .collect();
    assert_eq!(
        installations.len(),
        1,
        "the replicas share one installation id: {installations:?}"
    );
    let strays: Vec<u32> = sim
        .vms()
        .iter()
        .filter(|v| (1000..=1099).contains(&v.vmid) && ![1000, 1003].contains(&v.vmid))
        .filter(|v| !v.tags.iter().any(|t| t.starts_with("fediversity-owner-")))
        .map(|v| v.vmid)
        .collect();
    assert!(
        strays.is_empty(),
        "VMs without our tag left in the range: {strays:?}"
    );
    for vmid in [1000, 1003] {
        let vm = sim.vm(vmid).unwrap();
        assert!(vm.running && vm.tags == vec!["production".to_owned()]);
        assert_eq!(vm.name, Some(format!("foreign-{vmid}")));
    }
}

fn clones(sim: &SimHandle) -> u64 {
    sim.stats().count("POST", "/nodes/{node}/qemu/{vmid}/clone")
}

fn destroys(sim: &SimHandle) -> u64 {
    sim.stats().count("DELETE", "/nodes/{node}/qemu/{vmid}")
}

const KILLS: usize = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_whichever_replica_leads_thirty_times_during_provisioning_leaves_exactly_one_vm_per_host() {
    let started = Instant::now();
    let cluster = EtcdCluster::start();
    let sim = sim(SimConfig::new().latency_scale(0.04).seed(11)).await;
    let folder = Folder::new(&endpoint(&sim), "");
    let mut replicas = Replicas::start(folder.dir.path(), &cluster.url("ha-kill"));
    let mut rng = fastrand::Rng::with_seed(20);
    let mut wanted = BTreeSet::new();
    let mut in_flight: BTreeMap<String, usize> = BTreeMap::new();
    let mut deployments = 0;
    let mut failovers = Vec::new();
    for kill in 0..KILLS {
        if kill % 3 == 0 {
            let name = format!("d{deployments}");
            folder.write_deployment(&name, &["mastodon: {}", "pixelfed: {}"], "Retain", "");
            wanted.insert(format!("{name}-mastodon"));
            wanted.insert(format!("{name}-pixelfed"));
            deployments += 1;
        }
        replicas.restart_exited();
        let since = Instant::now();
        let leader = replicas.wait_leader(Duration::from_secs(30));
        if kill > 0 {
            failovers.push(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(rng.u64(50..600))).await;
        if kill % 2 == 1 {
            let until = Instant::now() + Duration::from_millis(800);
            while sim.running_tasks().is_empty() && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        for upid in sim.running_tasks() {
            let kind = upid.split(':').nth(5).unwrap_or("?").to_owned();
            *in_flight.entry(kind).or_default() += 1;
        }
        replicas.all[leader].child.kill().unwrap();
        replicas.all[leader].child.wait().unwrap();
        replicas.restart(leader);
    }
    replicas.wait_ready(deployments, Duration::from_secs(120));
    assert_one_vm_per_host(&sim, &wanted);
    assert!(our_vms(&sim).iter().all(|v| v.running && v.lock.is_none()));
    let inside: usize = in_flight.values().sum();
    assert!(
        inside >= 5,
        "only {inside} kills landed inside a task: {in_flight:?}"
    );
    failovers.sort();
    eprintln!(
        "{KILLS} leader kills, {} hosts, tasks in flight at kills: {in_flight:?}, clone calls: {}, \
         time to a new leader p50 {:?} max {:?}, {:?} in all",
        wanted.len(),
        clones(&sim),
        failovers[failovers.len() / 2],
        failovers.last().unwrap(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_past_its_lease_does_not_act_when_it_wakes_up() {
    let cluster = EtcdCluster::start();
    let sim = sim(SimConfig::new().latency_scale(0.2).seed(3)).await;
    let folder = Folder::new(&endpoint(&sim), "");
    let mut replicas = Replicas::start(folder.dir.path(), &cluster.url("ha-pause"));
    folder.write_deployment("d0", &["mastodon: {}"], "Delete", "");
    replicas.wait_ready(1, Duration::from_secs(60));

    // Pause the leader in the middle of new work: a clone is running for d1.
    let old = replicas.wait_leader(Duration::from_secs(10));
    folder.write_deployment("d1", &["mastodon: {}", "pixelfed: {}"], "Delete", "");
    wait_for("a clone for d1", Duration::from_secs(20), || {
        sim.running_tasks()
            .iter()
            .any(|t| t.contains("qmclone"))
            .then_some(())
    });
    replicas.all[old].signal("-STOP");
    let paused_at = Instant::now();

    // Another replica takes over and acts: it finishes d1, builds d2 and removes d0.
    let new = wait_for("another replica to lead", Duration::from_secs(20), || {
        replicas
            .all
            .iter()
            .enumerate()
            .position(|(i, r)| i != old && r.role().as_deref() == Some("leader"))
    });
    assert!(
        paused_at.elapsed() >= Duration::from_secs(2),
        "took over before the lease could end"
    );
    folder.write_deployment("d2", &["pixelfed: {}"], "Delete", "");
    folder.remove("dep-d0.yaml");
    let wanted: BTreeSet<String> = ["d1-mastodon", "d1-pixelfed", "d2-pixelfed"]
        .map(String::from)
        .into();
    wait_for("the new leader to converge", Duration::from_secs(90), || {
        let items = replicas.all[new].api("deployments")["items"]
            .as_array()
            .cloned()?;
        let names: BTreeSet<String> = our_vms(&sim).iter().filter_map(|v| v.name.clone()).collect();
        (items.len() == 2
            && items
                .iter()
                .all(|d| condition(d, "Ready").is_some_and(|c| c.0 == "True"))
            && names == wanted)
            .then_some(())
    });
    let (clones_before, destroys_before) = (clones(&sim), destroys(&sim));
    let vms_before: Vec<u32> = our_vms(&sim).iter().map(|v| v.vmid).collect();

    // The old leader wakes up with its work half done: it must not clone, destroy or change anything.
    replicas.all[old].signal("-CONT");
    let exit = wait_for(
        "the woken replica to give up",
        Duration::from_secs(15),
        || match replicas.all[old].child.try_wait().unwrap() {
            Some(status) => Some(status.code()),
            None => (replicas.all[old].role().as_deref() == Some("follower")).then_some(None),
        },
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        exit.is_none() || exit == Some(3),
        "the woken leader exited with {exit:?}"
    );
    assert_eq!(clones(&sim), clones_before, "the woken leader cloned a VM");
    assert_eq!(destroys(&sim), destroys_before, "the woken leader destroyed a VM");
    assert_eq!(
        our_vms(&sim).iter().map(|v| v.vmid).collect::<Vec<_>>(),
        vms_before
    );
    assert_one_vm_per_host(&sim, &wanted);
    assert_eq!(
        replicas.leader(),
        Some(new),
        "leadership stayed with the replica that took over"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_goes_on_with_one_etcd_member_down_and_stops_without_a_quorum_until_it_returns() {
    let mut cluster = EtcdCluster::start();
    let sim = sim(SimConfig::new().latency_scale(0.04).seed(5)).await;
    let folder = Folder::new(&endpoint(&sim), "");
    let mut replicas = Replicas::start(folder.dir.path(), &cluster.url("ha-quorum"));
    folder.write_deployment("d0", &["mastodon: {}"], "Retain", "");
    replicas.wait_ready(1, Duration::from_secs(60));

    // One member down: a majority remains, work goes on.
    cluster.kill(0);
    folder.write_deployment("d1", &["mastodon: {}"], "Retain", "");
    replicas.wait_ready(2, Duration::from_secs(60));

    // Two down: no quorum. Nobody acts, and every replica says why.
    cluster.kill(1);
    folder.write_deployment("d2", &["pixelfed: {}"], "Retain", "");
    let clones_before = clones(&sim);
    // The leader stops acting and exits (its supervisor restarts it, and a fresh start waits for
    // etcd); the followers stay up and answer /readyz with 503 naming etcd.
    wait_for(
        "every replica to report etcd unavailable",
        Duration::from_secs(30),
        || {
            let mut saying = 0;
            for r in &mut replicas.all {
                if r.child
                    .try_wait()
                    .unwrap()
                    .is_some_and(|status| !status.success())
                {
                    continue;
                }
                match http_get(&r.server, "/readyz") {
                    Some((503, body)) if body.contains("etcd") => saying += 1,
                    _ => return None,
                }
            }
            (saying >= 1).then_some(())
        },
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(clones(&sim), clones_before, "a replica acted without a quorum");
    assert!(
        !our_vms(&sim)
            .iter()
            .any(|v| v.name.as_deref() == Some("d2-pixelfed"))
    );

    // The members return: a leader is elected and the waiting work is done.
    cluster.restart(0);
    cluster.restart(1);
    cluster.wait_healthy(Duration::from_secs(30));
    replicas.wait_ready(3, Duration::from_secs(90));
    let wanted: BTreeSet<String> = ["d0-mastodon", "d1-mastodon", "d2-pixelfed"]
        .map(String::from)
        .into();
    assert_one_vm_per_host(&sim, &wanted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_the_leader_hands_over_at_once_and_each_replica_reports_its_role() {
    let cluster = EtcdCluster::start();
    let sim = sim(SimConfig::new().latency_scale(0.04).seed(9)).await;
    let folder = Folder::new(&endpoint(&sim), "");
    let mut replicas = Replicas::start(folder.dir.path(), &cluster.url("ha-term"));
    folder.write_deployment("d0", &["mastodon: {}"], "Retain", "");
    replicas.wait_ready(1, Duration::from_secs(60));
    let old = replicas.wait_leader(Duration::from_secs(10));
    let follower = (old + 1) % 3;
    let readyz = |i: usize| {
        http_get(&replicas.all[i].server, "/readyz")
            .map(|(_, b)| b)
            .unwrap_or_default()
    };
    let metrics = |i: usize| {
        http_get(&replicas.all[i].server, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    };
    assert_eq!(readyz(old), "ready (leader)\n");
    wait_for("the follower to be ready", Duration::from_secs(10), || {
        (readyz(follower) == "ready (follower)\n").then_some(())
    });
    assert!(
        metrics(old).contains("\nfediversity_leader 1\n"),
        "{}",
        metrics(old)
    );
    assert!(metrics(old).contains("\nfediversity_leader_changes_total 1\n"));
    assert!(metrics(follower).contains("\nfediversity_leader 0\n"));
    assert_eq!(replicas.all[follower].api("leader")["role"], "follower");
    // A follower refuses API writes and says where to send them.
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, API_TOKEN).unwrap();
    let file = dir.path().join("d9.yaml");
    std::fs::write(
        &file,
        "apiVersion: fediversity.eu/v1alpha1\nkind: Deployment\nmetadata: { name: d9 }\nspec:\n  domain: d9.example.org\n  \
         runtimeEnvironment: sim\n  applications:\n    mastodon: {}\n  initialUser: { displayName: Admin, email: admin@example.org }\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fediversity"))
        .args(["apply", "-f"])
        .arg(&file)
        .arg("--token-file")
        .arg(&token)
        .args(["--server", &replicas.all[follower].server])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success() && text.contains("follower") && text.contains("leader"),
        "{text}"
    );
    assert!(!text.contains(API_TOKEN));

    // A follower serves the status its leader wrote.
    wait_for("the follower to show d0 Ready", Duration::from_secs(15), || {
        let items = replicas.all[follower].api("deployments")["items"]
            .as_array()
            .cloned()?;
        (items.len() == 1 && condition(&items[0], "Ready").is_some_and(|c| c.0 == "True")).then_some(())
    });

    replicas.all[old].signal("-TERM");
    let sent = Instant::now();
    let new = wait_for("another replica to lead", Duration::from_secs(10), || {
        replicas
            .all
            .iter()
            .enumerate()
            .position(|(i, r)| i != old && r.role().as_deref() == Some("leader"))
    });
    let handover = sent.elapsed();
    // The lease is 3 s: a handover well under it means the old leader resigned rather than expired.
    assert!(handover < Duration::from_secs(2), "handover took {handover:?}");
    let status = wait_for("the old leader to exit", Duration::from_secs(15), || {
        replicas.all[old].child.try_wait().unwrap()
    });
    assert!(status.success(), "the resigned leader exited with {status:?}");
    folder.write_deployment("d1", &["pixelfed: {}"], "Retain", "");
    wait_for("the new leader to build d1", Duration::from_secs(60), || {
        let items = replicas.all[new].api("deployments")["items"]
            .as_array()
            .cloned()?;
        (items.len() == 2
            && items
                .iter()
                .all(|d| condition(d, "Ready").is_some_and(|c| c.0 == "True")))
        .then_some(())
    });
    eprintln!("handover after SIGTERM: {handover:?}");
}
