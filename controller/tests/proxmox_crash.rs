//! Crash safety: the real daemon is killed with SIGKILL at many points while it provisions VMs on the
//! simulator (with a small latency model, so kills land inside clone, resize and start tasks), and
//! restarted each time. Afterwards every wanted host has exactly one VM, there is no stray VM, and the
//! foreign VMs are untouched.

mod proxmox_support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use fediversity_testbed::SimConfig;
use proxmox_support::*;

const KILLS: usize = 56;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_daemon_at_every_step_of_provisioning_leaves_exactly_one_vm_per_host() {
    let started = Instant::now();
    // Scale 0.04: a linked clone takes 120 ms, a resize 40 ms, a start 80 ms, the guest agent 800 ms.
    let sim = sim(SimConfig::new().latency_scale(0.04).seed(7)).await;
    let folder = Folder::new(&endpoint(&sim), "");
    let state = state_dir();
    let mut rng = fastrand::Rng::with_seed(42);
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    let mut in_flight: BTreeMap<String, usize> = BTreeMap::new();
    let mut deployments = 0;
    for kill in 0..KILLS {
        // New work arrives every few kills, so that kills keep landing inside provisioning.
        if kill % 5 == 0 {
            let name = format!("d{deployments}");
            folder.write_deployment(&name, &["mastodon: {}", "pixelfed: {}"], "Retain", "");
            wanted.insert(format!("{name}-mastodon"));
            wanted.insert(format!("{name}-pixelfed"));
            deployments += 1;
        }
        let mut daemon = Daemon::spawn(folder.dir.path(), state.path());
        let delay = Duration::from_millis(rng.u64(60..700));
        tokio::time::sleep(delay).await;
        if kill % 2 == 1 {
            // Every other kill waits (briefly) for a task to be in flight, to land inside it.
            let until = Instant::now() + Duration::from_millis(600);
            while sim.running_tasks().is_empty() && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        for upid in sim.running_tasks() {
            let kind = upid.split(':').nth(5).unwrap_or("?").to_owned();
            *in_flight.entry(kind).or_default() += 1;
        }
        daemon.child.kill().unwrap();
        daemon.child.wait().unwrap();
    }

    // A last, uninterrupted run converges everything.
    let daemon = Daemon::start(folder.dir.path(), state.path());
    wait_for("every Deployment to be Ready", Duration::from_secs(60), || {
        let items = daemon.api("deployments")["items"].as_array()?.clone();
        (items.len() == deployments
            && items
                .iter()
                .all(|d| condition(d, "Ready").is_some_and(|c| c.0 == "True")))
        .then_some(())
    });

    let ours = our_vms(&sim);
    let names: Vec<String> = ours.iter().filter_map(|v| v.name.clone()).collect();
    let unique: BTreeSet<String> = names.iter().cloned().collect();
    assert_eq!(names.len(), unique.len(), "a host has two VMs: {names:?}");
    assert_eq!(unique, wanted, "every wanted host has its VM, and nothing else");
    assert!(ours.iter().all(|v| v.running && v.lock.is_none()));
    // No stray VM in the range: everything there is ours and wanted, or one of the foreign VMs.
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
    // Kills landed inside tasks, clones among them (the step where a crash could duplicate a VM).
    let inside: usize = in_flight.values().sum();
    assert!(
        inside >= 5,
        "only {inside} kills landed inside a task: {in_flight:?}"
    );
    assert!(
        in_flight.contains_key("qmclone"),
        "no kill landed during a clone: {in_flight:?}"
    );
    let clones = sim.stats().count("POST", "/nodes/{node}/qemu/{vmid}/clone");
    assert!(
        clones >= wanted.len() as u64,
        "{clones} clones for {} hosts",
        wanted.len()
    );
    eprintln!(
        "{KILLS} kills, {} hosts, tasks in flight at kills: {in_flight:?}, clone calls: {clones}, {:?}",
        wanted.len(),
        started.elapsed()
    );
}
