//! End-to-end: the real daemon against the Proxmox VE simulator creates, adopts, resizes, restarts,
//! orphans and destroys VMs; never touches foreign VMs; reports unreachable, unauthorised and TLS
//! failures on the environment.

mod proxmox_support;

use std::time::Duration;

use fediversity_testbed::SimConfig;
use proxmox_support::*;

const LONG: Duration = Duration::from_secs(30);

fn ready_hosts(daemon: &Daemon, name: &str, count: usize) -> serde_json::Value {
    wait_for(&format!("{count} ready host(s) of {name}"), LONG, || {
        let d = daemon.api(&format!("deployments/{name}"));
        let hosts = d["status"]["hosts"].as_array()?;
        (hosts.len() == count
            && hosts.iter().all(|h| h["phase"] == "Ready")
            && condition(&d, "Ready")?.0 == "True")
            .then_some(d)
    })
}

fn foreign_untouched(sim: &fediversity_testbed::SimHandle) {
    for vmid in [1000, 1003] {
        let vm = sim.vm(vmid).expect("the foreign VM still exists");
        assert!(vm.running, "foreign VM {vmid} was stopped");
        assert_eq!(
            vm.tags,
            vec!["production".to_owned()],
            "foreign VM {vmid} was retagged"
        );
        assert_eq!(vm.name.as_deref(), Some(format!("foreign-{vmid}").as_str()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_gets_one_running_vm_per_enabled_application_with_owner_tags_and_an_address() {
    let sim = sim(SimConfig::new().latency_scale(0.0)).await;
    let folder = Folder::new(&endpoint(&sim), "");
    folder.write_deployment(
        "uni",
        &["mastodon: { size: small }", "pixelfed: { enabled: false }"],
        "Retain",
        "",
    );
    let state = state_dir();
    let daemon = Daemon::start(folder.dir.path(), state.path());

    let env = wait_for("the environment to be ready", LONG, || {
        let e = daemon.api("runtimeenvironments/sim");
        (condition(&e, "Ready")?.0 == "True").then_some(e)
    });
    assert_eq!(env["status"]["version"], "9.1.3", "{env}");
    assert_eq!(env["status"]["templatePresent"], true);
    assert_eq!(env["status"]["nodes"], serde_json::json!(["pve"]));

    let d = ready_hosts(&daemon, "uni", 1);
    let host = &d["status"]["hosts"][0];
    assert_eq!(host["name"], "uni-mastodon");
    let vmid = host["vmid"].as_u64().unwrap() as u32;
    assert!(
        (1000..=1099).contains(&vmid) && vmid != 1000 && vmid != 1003,
        "{vmid}"
    );
    assert_eq!(condition(&d, "Provisioned").unwrap().0, "True");

    let vm = sim.vm(vmid).unwrap();
    assert!(vm.running && vm.lock.is_none());
    assert_eq!(vm.name.as_deref(), Some("uni-mastodon"));
    assert!(vm.tags.contains(&"fediversity".to_owned()), "{:?}", vm.tags);
    assert!(
        vm.tags.iter().any(|t| t.starts_with("fediversity-owner-")),
        "{:?}",
        vm.tags
    );
    assert!(!vm.tags.contains(&"template".to_owned()));
    assert_eq!(vm.config["cores"], "2");
    assert_eq!(vm.config["memory"], "4096");
    assert!(vm.config["scsi0"].contains("size=40G"), "{}", vm.config["scsi0"]);
    assert!(vm.config["net0"].ends_with("bridge=vmbr0"));
    assert_eq!(vm.config["ciuser"], "root");
    assert_eq!(vm.config["ipconfig0"], "ip=dhcp");
    assert!(
        vm.config["sshkeys"].starts_with("ssh-ed25519%20AAAAC3Nza"),
        "{}",
        vm.config["sshkeys"]
    );
    assert_eq!(host["address"], vm.address.unwrap().to_string());
    assert_eq!(our_vms(&sim).len(), 1);
    foreign_untouched(&sim);

    let (code, hosts) = daemon.cli(&["get", "hosts"]);
    assert_eq!(code, 0, "{hosts}");
    assert!(
        hosts.contains("uni-mastodon") && hosts.contains(&vmid.to_string()) && hosts.contains("Ready"),
        "{hosts}"
    );

    let metrics = daemon.metrics();
    assert!(
        metrics.contains(
            "fediversity_external_requests_total{code=\"200\",op=\"clone\",provider=\"proxmox\"} 1"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("fediversity_external_request_duration_seconds_bucket{op=\"list_vms\""));
    assert!(metrics.contains("fediversity_proxmox_tasks_total{result=\"ok\",type=\"qmclone\"} 1"));
    assert!(!metrics.contains(SECRET), "the token secret leaked into metrics");
    assert!(!env.to_string().contains(SECRET));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_that_carries_our_owner_tag_is_adopted_when_the_store_is_lost_never_duplicated() {
    let sim = sim(SimConfig::new().latency_scale(0.0)).await;
    let folder = Folder::new(&endpoint(&sim), "");
    folder.write_deployment("uni", &["mastodon: {}", "pixelfed: {}"], "Retain", "");
    let state = state_dir();
    let daemon = Daemon::start(folder.dir.path(), state.path());
    let before = ready_hosts(&daemon, "uni", 2);
    drop(daemon);

    let fresh = state_dir();
    let daemon = Daemon::start(folder.dir.path(), fresh.path());
    let after = ready_hosts(&daemon, "uni", 2);
    let vmids = |d: &serde_json::Value| -> Vec<u64> {
        d["status"]["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["vmid"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(vmids(&before), vmids(&after));
    assert_eq!(our_vms(&sim).len(), 2);
    let clones = sim
        .stats()
        .by_route
        .iter()
        .filter(|(r, _)| r.contains("/clone"))
        .map(|(_, n)| *n)
        .sum::<u64>();
    assert_eq!(clones, 2, "a second clone was made");
    foreign_untouched(&sim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bigger_size_grows_the_disk_keeps_cpu_pending_until_restarts_are_allowed_and_a_shrink_is_refused() {
    let sim = sim(SimConfig::new().latency_scale(0.0)).await;
    let folder = Folder::new(&endpoint(&sim), "");
    folder.write_deployment("uni", &["mastodon: { size: small }"], "Retain", "");
    let state = state_dir();
    let daemon = Daemon::start(folder.dir.path(), state.path());
    let d = ready_hosts(&daemon, "uni", 1);
    let vmid = d["status"]["hosts"][0]["vmid"].as_u64().unwrap() as u32;

    folder.write_deployment("uni", &["mastodon: { size: medium }"], "Retain", "");
    let d = wait_for("the change to be pending", LONG, || {
        let d = daemon.api("deployments/uni");
        (d["status"]["hosts"][0]["phase"] == "PendingRestart").then_some(d)
    });
    let provisioned = condition(&d, "Provisioned").unwrap();
    assert_eq!(
        (provisioned.0.as_str(), provisioned.1.as_str()),
        ("False", "PendingRestart")
    );
    assert!(
        provisioned.2.contains("cores") && provisioned.2.contains("fediversity.eu/allow-restart"),
        "{provisioned:?}"
    );
    let vm = sim.vm(vmid).unwrap();
    assert!(
        vm.config["scsi0"].contains("size=100G"),
        "the disk grew at once: {}",
        vm.config["scsi0"]
    );
    assert_eq!(
        vm.pending.get("cores").map(String::as_str),
        Some("4"),
        "{:?}",
        vm.pending
    );
    assert!(vm.running, "no restart without permission");

    folder.write_deployment(
        "uni",
        &["mastodon: { size: medium }"],
        "Retain",
        "fediversity.eu/allow-restart: \"true\"",
    );
    // Annotations are not spec: they take effect at the next reconcile, which an operator can ask for.
    wait_for("the annotation to load", LONG, || {
        (daemon.api("deployments/uni")["metadata"]["annotations"]["fediversity.eu/allow-restart"] == "true")
            .then_some(())
    });
    let (code, out) = daemon.cli(&["reconcile", "deployment", "uni", "--wait", "--timeout", "20s"]);
    assert_eq!(code, 0, "{out}");
    ready_hosts(&daemon, "uni", 1);
    let vm = sim.vm(vmid).unwrap();
    assert_eq!(vm.config["cores"], "4");
    assert_eq!(vm.config["memory"], "8192");
    assert!(vm.pending.is_empty(), "{:?}", vm.pending);
    assert!(vm.running);

    folder.write_deployment(
        "uni",
        &["mastodon: { size: small }"],
        "Retain",
        "fediversity.eu/allow-restart: \"true\"",
    );
    let d = wait_for("the shrink to be refused", LONG, || {
        let d = daemon.api("deployments/uni");
        (condition(&d, "Provisioned")?.1 == "DiskShrinkRefused").then_some(d)
    });
    assert!(
        condition(&d, "Provisioned")
            .unwrap()
            .2
            .contains("disks only grow")
    );
    assert!(
        sim.vm(vmid).unwrap().config["scsi0"].contains("size=100G"),
        "the disk was not touched"
    );
    assert_eq!(our_vms(&sim).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_an_application_under_delete_destroys_only_its_vm() {
    let sim = sim(SimConfig::new().latency_scale(0.0)).await;
    let folder = Folder::new(&endpoint(&sim), "");
    folder.write_deployment("uni", &["mastodon: {}", "pixelfed: {}"], "Delete", "");
    let state = state_dir();
    let daemon = Daemon::start(folder.dir.path(), state.path());
    let d = ready_hosts(&daemon, "uni", 2);
    let pixelfed = d["status"]["hosts"][1]["vmid"].as_u64().unwrap() as u32;

    folder.write_deployment(
        "uni",
        &["mastodon: {}", "pixelfed: { enabled: false }"],
        "Delete",
        "",
    );
    wait_for("the pixelfed VM to be destroyed", LONG, || {
        sim.vm(pixelfed).is_none().then_some(())
    });
    ready_hosts(&daemon, "uni", 1);
    let vms = our_vms(&sim);
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0].name.as_deref(), Some("uni-mastodon"));
    let purged = sim
        .request_log()
        .iter()
        .any(|r| r.method == "DELETE" && r.path.contains(&format!("/qemu/{pixelfed}")));
    assert!(purged, "the VM was destroyed through DELETE");
    foreign_untouched(&sim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_deployment_under_retain_keeps_its_vms_as_orphans_visible_in_status_and_metrics() {
    let sim = sim(SimConfig::new().latency_scale(0.0)).await;
    let folder = Folder::new(&endpoint(&sim), "");
    folder.write_deployment("uni", &["mastodon: {}", "pixelfed: {}"], "Retain", "");
    let state = state_dir();
    let daemon = Daemon::start(folder.dir.path(), state.path());
    ready_hosts(&daemon, "uni", 2);

    folder.remove("dep-uni.yaml");
    wait_for("the Deployment to go", LONG, || {
        daemon.api("deployments")["items"]
            .as_array()
            .is_some_and(Vec::is_empty)
            .then_some(())
    });
    let mut last = String::new();
    let found = (0..200).any(|_| {
        last = daemon.metrics();
        let hit = last.contains("fediversity_proxmox_vms_orphaned{environment=\"sim\"} 2");
        if !hit {
            std::thread::sleep(Duration::from_millis(100));
        }
        hit
    });
    let line: Vec<&str> = last.lines().filter(|l| l.contains("orphaned")).collect();
    assert!(found, "no orphan metric: {line:?}");
    let (code, out) = daemon.cli(&[
        "reconcile",
        "runtimeenvironment",
        "sim",
        "--wait",
        "--timeout",
        "20s",
    ]);
    assert_eq!(code, 0, "{out}");
    let env = daemon.api("runtimeenvironments/sim");
    assert_eq!(env["status"]["vmsOrphaned"], 2, "{env}");
    let (_, described) = daemon.cli(&["get", "runtimeenvironment", "sim", "-o", "json"]);
    assert!(described.contains("\"vmsOrphaned\": 2"), "{described}");
    let vms = our_vms(&sim);
    assert_eq!(vms.len(), 2);
    assert!(vms.iter().all(|v| v.running), "Retain keeps VMs running");
    foreign_untouched(&sim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_deployment_under_delete_stops_and_destroys_its_vms_and_nothing_else() {
    let sim = sim(SimConfig::new().latency_scale(0.0)).await;
    let folder = Folder::new(&endpoint(&sim), "");
    folder.write_deployment("uni", &["mastodon: {}", "pixelfed: {}"], "Delete", "");
    folder.write_deployment("other", &["mastodon: {}"], "Delete", "");
    let state = state_dir();
    let daemon = Daemon::start(folder.dir.path(), state.path());
    ready_hosts(&daemon, "uni", 2);
    ready_hosts(&daemon, "other", 1);

    folder.remove("dep-uni.yaml");
    wait_for("the VMs of uni to be destroyed", LONG, || {
        (our_vms(&sim).len() == 1).then_some(())
    });
    let left = our_vms(&sim);
    assert_eq!(left[0].name.as_deref(), Some("other-mastodon"));
    assert!(left[0].running);
    let stops = sim
        .request_log()
        .iter()
        .filter(|r| r.path.ends_with("/status/stop"))
        .count();
    assert_eq!(stops, 2, "each VM was stopped before it was destroyed");
    foreign_untouched(&sim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_environment_is_not_ready_and_its_deployments_wait() {
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let folder = Folder::new(&nowhere, "");
    folder.write_deployment("uni", &["mastodon: {}"], "Retain", "");
    let state = state_dir();
    let daemon = Daemon::start(folder.dir.path(), state.path());
    let (status, reason, message) = wait_for("the environment to be not ready", LONG, || {
        condition(&daemon.api("runtimeenvironments/sim"), "Ready").filter(|c| c.0 == "False")
    });
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "Unreachable"),
        "{message}"
    );
    let d = daemon.api("deployments/uni");
    assert_eq!(condition(&d, "Ready").unwrap().1, "DependencyNotReady");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_makes_the_environment_not_ready_unauthorised_and_creates_nothing() {
    let sim = sim(SimConfig::new().latency_scale(0.0)).await;
    let folder = Folder::new(&endpoint(&sim), "");
    std::fs::write(folder.secrets.path().join("wrong"), "not-the-secret").unwrap();
    folder.write_environment(&endpoint(&sim), "", &folder.secret("wrong"));
    folder.write_deployment("uni", &["mastodon: {}"], "Retain", "");
    let state = state_dir();
    let daemon = Daemon::start(folder.dir.path(), state.path());
    let (_, reason, message) = wait_for("the environment to be unauthorised", LONG, || {
        condition(&daemon.api("runtimeenvironments/sim"), "Ready").filter(|c| c.0 == "False")
    });
    assert_eq!(reason, "Unauthorized", "{message}");
    assert!(
        !message.contains("not-the-secret"),
        "the secret leaked: {message}"
    );
    assert!(our_vms(&sim).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_the_pinned_fingerprint_converges_and_a_wrong_fingerprint_is_refused() {
    let sim = sim(SimConfig::new().latency_scale(0.0).tls(true)).await;
    let fingerprint = sim.fingerprint().unwrap().to_owned();
    assert!(endpoint(&sim).starts_with("https://"));
    let folder = Folder::new(
        &endpoint(&sim),
        &format!("    tls: {{ fingerprint: \"{fingerprint}\" }}\n"),
    );
    folder.write_deployment("uni", &["mastodon: {}"], "Retain", "");
    let state = state_dir();
    let daemon = Daemon::start(folder.dir.path(), state.path());
    ready_hosts(&daemon, "uni", 1);
    assert_eq!(our_vms(&sim).len(), 1);
    drop(daemon);

    let wrong = "AB:".repeat(31) + "AB";
    let other = Folder::new(
        &endpoint(&sim),
        &format!("    tls: {{ fingerprint: \"{wrong}\" }}\n"),
    );
    let state = state_dir();
    let daemon = Daemon::start(other.dir.path(), state.path());
    let (_, reason, message) = wait_for("the wrong fingerprint to be refused", LONG, || {
        condition(&daemon.api("runtimeenvironments/sim"), "Ready").filter(|c| c.0 == "False")
    });
    assert_eq!(reason, "TlsVerificationFailed", "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turning_tls_verification_off_is_shown_as_a_warning_in_status() {
    let sim = sim(SimConfig::new().latency_scale(0.0).tls(true)).await;
    let folder = Folder::new(&endpoint(&sim), "    tls: { insecureSkipVerify: true }\n");
    let state = state_dir();
    let daemon = Daemon::start(folder.dir.path(), state.path());
    let env = wait_for("the environment to be ready", LONG, || {
        let e = daemon.api("runtimeenvironments/sim");
        (condition(&e, "Ready")?.0 == "True").then_some(e)
    });
    assert_eq!(env["status"]["insecure"], true, "{env}");
    assert!(
        env["status"]["warnings"]
            .to_string()
            .contains("insecureSkipVerify"),
        "{env}"
    );
}
