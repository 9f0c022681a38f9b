//! The value quirks and state-machine behaviour a real client relies on.

mod common;

use common::{TEMPLATE, api, clone_template, config, run_task, wait_task};
use fediversity_testbed::Simulator;
use serde_json::json;

async fn started_vm(sim: &fediversity_testbed::SimHandle, vmid: u32) {
    clone_template(sim.addr(), vmid, "vm").await;
    assert_eq!(
        run_task(
            sim.addr(),
            "POST",
            &format!("/nodes/pve/qemu/{vmid}/status/start"),
            &[]
        )
        .await,
        "OK"
    );
}

#[tokio::test]
async fn nextid_is_a_string_and_freed_ids_are_reused_at_once() {
    let sim = Simulator::start(config()).await.unwrap();
    assert_eq!(
        api(sim.addr(), "GET", "/cluster/nextid", &[]).await.data(),
        &json!("100")
    );
    clone_template(sim.addr(), 100, "a").await;
    assert_eq!(
        api(sim.addr(), "GET", "/cluster/nextid", &[]).await.data(),
        &json!("101")
    );
    let taken = api(sim.addr(), "GET", "/cluster/nextid", &[("vmid", "100")]).await;
    assert_eq!(
        (taken.status, taken.error("vmid")),
        (400, "VM 100 already exists")
    );
    assert_eq!(
        run_task(sim.addr(), "DELETE", "/nodes/pve/qemu/100", &[]).await,
        "OK"
    );
    assert_eq!(
        api(sim.addr(), "GET", "/cluster/nextid", &[]).await.data(),
        &json!("100")
    );
}

#[tokio::test]
async fn booleans_come_back_as_numbers_and_memory_as_a_string() {
    let sim = Simulator::start(config()).await.unwrap();
    clone_template(sim.addr(), 101, "b").await;
    let a = api(
        sim.addr(),
        "PUT",
        "/nodes/pve/qemu/101/config",
        &[("onboot", "true"), ("memory", "current=3072"), ("cores", "3")],
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.data().is_null(), "PUT config answers null");
    let c = api(sim.addr(), "GET", "/nodes/pve/qemu/101/config", &[]).await;
    assert_eq!(
        (c.data()["onboot"].clone(), c.data()["cores"].clone()),
        (json!(1), json!(3))
    );
    assert_eq!(c.data()["memory"], json!("3072"));
    assert_eq!(c.data()["digest"].as_str().unwrap().len(), 40);
}

#[tokio::test]
async fn tags_are_normalised_sorted_and_checked() {
    let sim = Simulator::start(config()).await.unwrap();
    clone_template(sim.addr(), 102, "c").await;
    api(
        sim.addr(),
        "PUT",
        "/nodes/pve/qemu/102/config",
        &[("tags", "Zeta owner-X;alpha,zeta")],
    )
    .await;
    let c = api(sim.addr(), "GET", "/nodes/pve/qemu/102/config", &[]).await;
    assert_eq!(c.data()["tags"], "alpha;owner-x;zeta");
    let r = api(sim.addr(), "GET", "/cluster/resources", &[("type", "vm")]).await;
    let vm = r
        .data()
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vmid"] == 102)
        .unwrap()
        .clone();
    assert_eq!(vm["tags"], "alpha;owner-x;zeta");
    let bad = api(
        sim.addr(),
        "PUT",
        "/nodes/pve/qemu/102/config",
        &[("tags", "a/b")],
    )
    .await;
    assert_eq!(bad.status, 400);
}

#[tokio::test]
async fn sshkeys_need_strict_percent_encoding_and_are_stored_encoded() {
    let sim = Simulator::start(config()).await.unwrap();
    clone_template(sim.addr(), 103, "d").await;
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq0dGVzdGtleQ== me@host";
    let a = api(
        sim.addr(),
        "PUT",
        "/nodes/pve/qemu/103/config",
        &[("sshkeys", key)],
    )
    .await;
    assert_eq!(a.status, 400);
    assert!(
        a.error("sshkeys")
            .starts_with("invalid format - invalid urlencoded string: ssh-ed25519 AAAA"),
        "{}",
        a.body
    );
    let strict: String =
        percent_encoding::utf8_percent_encode(key, percent_encoding::NON_ALPHANUMERIC).to_string();
    let a = api(
        sim.addr(),
        "PUT",
        "/nodes/pve/qemu/103/config",
        &[("sshkeys", &strict)],
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let c = api(sim.addr(), "GET", "/nodes/pve/qemu/103/config", &[]).await;
    assert_eq!(c.data()["sshkeys"], strict.as_str());
    let garbage = api(
        sim.addr(),
        "PUT",
        "/nodes/pve/qemu/103/config",
        &[("sshkeys", "not%20a%20key")],
    )
    .await;
    assert_eq!(
        (garbage.status, garbage.reason.as_str()),
        (500, "SSH public key validation error")
    );
}

#[tokio::test]
async fn a_stale_digest_is_a_checksum_mismatch() {
    let sim = Simulator::start(config()).await.unwrap();
    clone_template(sim.addr(), 104, "e").await;
    let digest = api(sim.addr(), "GET", "/nodes/pve/qemu/104/config", &[])
        .await
        .data()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let ok = api(
        sim.addr(),
        "PUT",
        "/nodes/pve/qemu/104/config",
        &[("cores", "3"), ("digest", &digest)],
    )
    .await;
    assert_eq!(ok.status, 200);
    let stale = api(
        sim.addr(),
        "PUT",
        "/nodes/pve/qemu/104/config",
        &[("cores", "4"), ("digest", &digest)],
    )
    .await;
    assert_eq!(
        (stale.status, stale.reason.as_str()),
        (500, "checksum mismatch (file change by other user?)")
    );
    let none = api(sim.addr(), "POST", "/nodes/pve/qemu/104/config", &[]).await;
    assert_eq!(none.reason, "no options specified");
}

#[tokio::test]
async fn cpu_changes_on_a_running_vm_stay_pending_until_a_cold_start() {
    let sim = Simulator::start(config()).await.unwrap();
    started_vm(&sim, 105).await;
    assert_eq!(
        run_task(
            sim.addr(),
            "POST",
            "/nodes/pve/qemu/105/config",
            &[("cores", "8"), ("description", "hello")]
        )
        .await,
        "OK"
    );
    let pending = api(sim.addr(), "GET", "/nodes/pve/qemu/105/pending", &[]).await;
    let cores = pending
        .data()
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["key"] == "cores")
        .unwrap()
        .clone();
    assert_eq!(
        (cores["value"].clone(), cores["pending"].clone()),
        (json!(2), json!(8))
    );
    let current = api(
        sim.addr(),
        "GET",
        "/nodes/pve/qemu/105/config",
        &[("current", "1")],
    )
    .await;
    assert_eq!(
        (
            current.data()["cores"].clone(),
            current.data()["description"].clone()
        ),
        (json!(2), json!("hello"))
    );
    let shown = api(sim.addr(), "GET", "/nodes/pve/qemu/105/config", &[]).await;
    assert_eq!(shown.data()["cores"], json!(8), "GET config shows pending values");
    run_task(sim.addr(), "POST", "/nodes/pve/qemu/105/status/stop", &[]).await;
    run_task(sim.addr(), "POST", "/nodes/pve/qemu/105/status/start", &[]).await;
    assert_eq!(sim.vm(105).unwrap().config["cores"], "8");
    assert!(sim.vm(105).unwrap().pending.is_empty());
}

#[tokio::test]
async fn cloud_init_values_take_effect_at_start() {
    let sim = Simulator::start(config()).await.unwrap();
    clone_template(sim.addr(), 106, "f").await;
    api(
        sim.addr(),
        "PUT",
        "/nodes/pve/qemu/106/config",
        &[("ipconfig0", "ip=192.0.2.77/24,gw=192.0.2.1"), ("ciuser", "ops")],
    )
    .await;
    let before = api(sim.addr(), "GET", "/nodes/pve/qemu/106/cloudinit", &[]).await;
    let ip = before
        .data()
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["key"] == "ipconfig0")
        .unwrap()
        .clone();
    assert_eq!(ip["pending"], "ip=192.0.2.77/24,gw=192.0.2.1");
    assert!(
        ip.get("value").is_none(),
        "nothing generated before the first start"
    );
    run_task(sim.addr(), "POST", "/nodes/pve/qemu/106/status/start", &[]).await;
    let after = api(sim.addr(), "GET", "/nodes/pve/qemu/106/cloudinit", &[]).await;
    let ip = after
        .data()
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["key"] == "ipconfig0")
        .unwrap()
        .clone();
    assert_eq!(
        (ip["value"].as_str(), ip.get("pending")),
        (Some("ip=192.0.2.77/24,gw=192.0.2.1"), None)
    );
    let agent = api(
        sim.addr(),
        "GET",
        "/nodes/pve/qemu/106/agent/network-get-interfaces",
        &[],
    )
    .await;
    let eth0 = agent.data()["result"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "eth0")
        .unwrap()
        .clone();
    assert_eq!(eth0["ip-addresses"][0]["ip-address"], "192.0.2.77");
    assert_eq!(eth0["ip-addresses"][0]["prefix"], 24);
}

#[tokio::test]
async fn the_agent_answers_only_some_time_after_start() {
    let sim = Simulator::start(config().latency_scale(0.01)).await.unwrap();
    clone_template(sim.addr(), 107, "g").await;
    let path = "/nodes/pve/qemu/107/agent/network-get-interfaces";
    assert_eq!(
        api(sim.addr(), "GET", path, &[]).await.reason,
        "VM 107 is not running"
    );
    run_task(sim.addr(), "POST", "/nodes/pve/qemu/107/status/start", &[]).await;
    let early = api(sim.addr(), "GET", path, &[]).await;
    assert_eq!(
        (early.status, early.reason.as_str()),
        (500, "QEMU guest agent is not running")
    );
    tokio::time::sleep(std::time::Duration::from_millis(250)).await; // 20 s × 0.01 = 200 ms
    let ready = api(sim.addr(), "GET", path, &[]).await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    let address = ready.data()["result"][1]["ip-addresses"][0]["ip-address"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        address.starts_with("192.0.2."),
        "DHCP address from the default pool: {address}"
    );
    api(
        sim.addr(),
        "PUT",
        "/nodes/pve/qemu/107/config",
        &[("delete", "agent")],
    )
    .await;
    run_task(sim.addr(), "POST", "/nodes/pve/qemu/107/status/stop", &[]).await;
    run_task(sim.addr(), "POST", "/nodes/pve/qemu/107/status/start", &[]).await;
    assert_eq!(
        api(sim.addr(), "GET", path, &[]).await.reason,
        "No QEMU guest agent configured"
    );
}

#[tokio::test]
async fn power_tasks_report_the_real_errors() {
    let sim = Simulator::start(config()).await.unwrap();
    started_vm(&sim, 108).await;
    assert_eq!(
        run_task(sim.addr(), "POST", "/nodes/pve/qemu/108/status/start", &[]).await,
        "VM 108 already running"
    );
    let del = api(sim.addr(), "DELETE", "/nodes/pve/qemu/108", &[]).await;
    assert_eq!(
        (del.status, del.reason.as_str()),
        (500, "VM 108 is running - destroy failed")
    );
    let short = run_task(
        sim.addr(),
        "POST",
        "/nodes/pve/qemu/108/status/shutdown",
        &[("timeout", "5")],
    )
    .await;
    assert_eq!(
        short, "VM quit/powerdown failed - got timeout",
        "a guest needs 10 s to shut down"
    );
    assert_eq!(
        run_task(sim.addr(), "POST", "/nodes/pve/qemu/108/status/shutdown", &[]).await,
        "OK"
    );
    assert!(!sim.vm(108).unwrap().running);
    assert_eq!(
        run_task(sim.addr(), "POST", "/nodes/pve/qemu/108/status/stop", &[]).await,
        "OK",
        "stopping a stopped VM is a no-op"
    );
    let t = run_task(
        sim.addr(),
        "POST",
        &format!("/nodes/pve/qemu/{TEMPLATE}/status/start"),
        &[],
    )
    .await;
    assert_eq!(t, "you can't start a VM if it's a template");
}

#[tokio::test]
async fn clone_of_a_locked_template_fails_with_vm_is_locked() {
    let sim = Simulator::start(config()).await.unwrap();
    assert!(sim.set_lock(TEMPLATE, Some("backup")));
    let a = api(
        sim.addr(),
        "POST",
        &format!("/nodes/pve/qemu/{TEMPLATE}/clone"),
        &[("newid", "110")],
    )
    .await;
    assert_eq!((a.status, a.reason.as_str()), (500, "VM is locked (backup)"));
    let skip = api(
        sim.addr(),
        "PUT",
        &format!("/nodes/pve/qemu/{TEMPLATE}/config"),
        &[("skiplock", "1"), ("cores", "1")],
    )
    .await;
    assert_eq!(
        skip.error("skiplock"),
        "Only root may use this option.",
        "tokens are not root@pam"
    );
}

#[tokio::test]
async fn a_clone_shows_up_locked_and_nameless_then_gets_its_config() {
    let sim = Simulator::start(config().latency_scale(0.05)).await.unwrap();
    let a = api(
        sim.addr(),
        "POST",
        &format!("/nodes/pve/qemu/{TEMPLATE}/clone"),
        &[("newid", "111"), ("name", "web")],
    )
    .await;
    let upid = a.data().as_str().unwrap().to_string();
    assert!(
        upid.contains(&format!(":qmclone:{TEMPLATE}:")),
        "the clone task's id is the source: {upid}"
    );
    let during = api(sim.addr(), "GET", "/nodes/pve/qemu/111/config", &[]).await;
    assert_eq!(during.data()["lock"], "clone");
    assert!(during.data().get("name").is_none());
    let start = run_task(sim.addr(), "POST", "/nodes/pve/qemu/111/status/start", &[]).await;
    assert_eq!(start, "VM is locked (clone)");
    assert_eq!(wait_task(sim.addr(), &upid).await, "OK");
    let after = api(sim.addr(), "GET", "/nodes/pve/qemu/111/config", &[]).await;
    assert_eq!(after.data()["name"], "web");
    assert!(after.data().get("lock").is_none() && after.data().get("template").is_none());
    assert_eq!(
        after.data()["scsi0"],
        "local-lvm:base-9000-disk-0/vm-111-disk-0,size=8G",
        "a linked clone"
    );
    assert_ne!(
        after.data()["net0"],
        api(sim.addr(), "GET", "/nodes/pve/qemu/9000/config", &[])
            .await
            .data()["net0"],
        "new MAC"
    );
    let log = api(sim.addr(), "GET", &format!("/nodes/pve/tasks/{upid}/log"), &[]).await;
    let lines = log.data().as_array().unwrap();
    assert_eq!(lines.last().unwrap()["t"], "TASK OK");
    assert_eq!(log.body["total"], lines.len());
}

#[tokio::test]
async fn create_allocates_disks_and_refuses_a_taken_vmid() {
    let sim = Simulator::start(config()).await.unwrap();
    let form = [
        ("vmid", "120"),
        ("name", "raw"),
        ("scsi0", "local-lvm:16"),
        ("ide2", "local-lvm:cloudinit"),
        ("net0", "virtio,bridge=vmbr0"),
        ("memory", "1024"),
    ];
    assert_eq!(run_task(sim.addr(), "POST", "/nodes/pve/qemu", &form).await, "OK");
    let c = api(sim.addr(), "GET", "/nodes/pve/qemu/120/config", &[]).await;
    assert_eq!(c.data()["scsi0"], "local-lvm:vm-120-disk-0,size=16G");
    assert_eq!(c.data()["ide2"], "local-lvm:vm-120-cloudinit,media=cdrom");
    assert!(
        c.data()["net0"].as_str().unwrap().starts_with("virtio=BC:24:11:"),
        "a MAC is generated"
    );
    let again = api(sim.addr(), "POST", "/nodes/pve/qemu", &[("vmid", "120")]).await;
    assert_eq!(
        again.reason,
        "unable to create VM 120 - VM 120 already exists on node 'pve'"
    );
}

#[tokio::test]
async fn disks_only_grow() {
    let sim = Simulator::start(config()).await.unwrap();
    clone_template(sim.addr(), 121, "h").await;
    let path = "/nodes/pve/qemu/121/resize";
    assert_eq!(
        run_task(sim.addr(), "PUT", path, &[("disk", "scsi0"), ("size", "+2G")]).await,
        "OK"
    );
    assert_eq!(
        sim.vm(121).unwrap().config["scsi0"],
        "local-lvm:base-9000-disk-0/vm-121-disk-0,size=10G"
    );
    assert_eq!(
        run_task(sim.addr(), "PUT", path, &[("disk", "scsi0"), ("size", "4G")]).await,
        "shrinking disks is not supported"
    );
    assert_eq!(
        run_task(sim.addr(), "PUT", path, &[("disk", "scsi1"), ("size", "4G")]).await,
        "disk 'scsi1' does not exist"
    );
    assert_eq!(
        run_task(sim.addr(), "PUT", path, &[("disk", "ide2"), ("size", "4G")]).await,
        "you can't resize a cdrom"
    );
    assert_eq!(
        api(sim.addr(), "PUT", path, &[("disk", "scsi0"), ("size", "big")])
            .await
            .status,
        400
    );
}

#[tokio::test]
async fn task_status_and_lists_behave_like_pve() {
    let sim = Simulator::start(config()).await.unwrap();
    clone_template(sim.addr(), 122, "i").await;
    let bad = api(sim.addr(), "GET", "/nodes/pve/tasks/garbage/status", &[]).await;
    assert_eq!(
        (bad.status, bad.error("upid")),
        (400, "unable to parse worker upid 'garbage'")
    );
    let unknown = "UPID:pve:00001234:00ABCDEF:65F0A1B2:qmstart:122:ci@pve!tests:";
    let missing = api(
        sim.addr(),
        "GET",
        &format!("/nodes/pve/tasks/{unknown}/status"),
        &[],
    )
    .await;
    assert_eq!((missing.status, missing.error("upid")), (400, "no such task"));
    let list = api(
        sim.addr(),
        "GET",
        "/nodes/pve/tasks",
        &[("typefilter", "qmclone"), ("vmid", "9000")],
    )
    .await;
    assert_eq!(list.body["total"], 1);
    let entry = &list.data()[0];
    assert_eq!(
        (
            entry["status"].as_str(),
            entry["type"].as_str(),
            entry["user"].as_str()
        ),
        (Some("OK"), Some("qmclone"), Some("ci@pve"))
    );
    let status = api(
        sim.addr(),
        "GET",
        &format!("/nodes/pve/tasks/{}/status", entry["upid"].as_str().unwrap()),
        &[],
    )
    .await;
    assert_eq!(
        (status.data()["tokenid"].as_str(), status.data()["pid"].is_u64()),
        (Some("tests"), true)
    );
}

#[tokio::test]
async fn post_config_with_background_delay_answers_null_when_done() {
    let sim = Simulator::start(config()).await.unwrap();
    clone_template(sim.addr(), 123, "j").await;
    let a = api(
        sim.addr(),
        "POST",
        "/nodes/pve/qemu/123/config",
        &[("cores", "2"), ("background_delay", "5")],
    )
    .await;
    assert_eq!(a.status, 200);
    assert!(a.data().is_null(), "{}", a.body);
}

#[tokio::test]
async fn unknown_nodes_and_foreign_vms_look_real() {
    let sim = Simulator::start(config().foreign_vm(500).node("pve").node("pve2"))
        .await
        .unwrap();
    let a = api(sim.addr(), "GET", "/nodes/nope/qemu", &[]).await;
    assert!(
        a.reason.starts_with("hostname lookup 'nope' failed"),
        "{}",
        a.reason
    );
    let wrong_node = api(sim.addr(), "GET", "/nodes/pve2/qemu/500/config", &[]).await;
    assert_eq!(
        wrong_node.reason,
        "Configuration file 'nodes/pve2/qemu-server/500.conf' does not exist"
    );
    let foreign = sim.vm(500).unwrap();
    assert!(foreign.running && !foreign.tags.contains(&"fediversity".to_string()));
    assert_eq!(
        api(sim.addr(), "GET", "/nodes", &[])
            .await
            .data()
            .as_array()
            .unwrap()
            .len(),
        2
    );
}
