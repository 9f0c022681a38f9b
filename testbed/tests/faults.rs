//! Fault knobs, latency scaling, the request log and counters, seeding.

mod common;

use std::time::{Duration, Instant};

use common::{TEMPLATE, api, clone_template, config, run_task, send};
use fediversity_testbed::{Faults, Simulator};

#[tokio::test]
async fn a_fault_rate_of_one_fails_every_call_without_effect() {
    let sim = Simulator::start(config().fault_rate(1.0)).await.unwrap();
    for i in 0..20u32 {
        let newid = (200 + i).to_string();
        let a = api(
            sim.addr(),
            "POST",
            &format!("/nodes/pve/qemu/{TEMPLATE}/clone"),
            &[("newid", &newid)],
        )
        .await;
        let expected = [
            (595, "Connection refused"),
            (596, "Connection timed out"),
            (500, "got no worker upid - start worker failed"),
        ];
        assert!(
            expected.contains(&(a.status, a.reason.as_str())),
            "{} {}",
            a.status,
            a.reason
        );
    }
    assert_eq!(sim.vms().len(), 1, "no clone happened");
    assert_eq!(sim.stats().faults_injected, 20);
    sim.set_fault_rate(0.0);
    assert_eq!(api(sim.addr(), "GET", "/version", &[]).await.status, 200);
}

#[tokio::test]
async fn a_partial_fault_rate_fails_about_that_share_of_calls() {
    let sim = Simulator::start(config().fault_rate(0.3)).await.unwrap();
    let mut failed = 0;
    for _ in 0..200 {
        if api(sim.addr(), "GET", "/cluster/resources", &[]).await.status != 200 {
            failed += 1;
        }
    }
    assert!(
        (30..=90).contains(&failed),
        "{failed} of 200 failed at a rate of 0.3"
    );
    assert_eq!(sim.stats().faults_injected, failed);
}

#[tokio::test]
async fn a_lost_response_still_takes_effect() {
    let sim = Simulator::start(config().faults(Faults {
        lost_response_rate: 1.0,
        ..Faults::none()
    }))
    .await
    .unwrap();
    let a = api(
        sim.addr(),
        "POST",
        &format!("/nodes/pve/qemu/{TEMPLATE}/clone"),
        &[("newid", "210")],
    )
    .await;
    assert_eq!((a.status, a.reason.as_str()), (596, "Connection timed out"));
    assert!(
        sim.vm(210).is_some(),
        "the clone went on although the client saw a timeout"
    );
}

#[tokio::test]
async fn failing_tasks_end_with_the_real_errors_and_clean_up() {
    let sim = Simulator::start(config().faults(Faults {
        task_failure_rate: 1.0,
        ..Faults::none()
    }))
    .await
    .unwrap();
    let exit = run_task(
        sim.addr(),
        "POST",
        &format!("/nodes/pve/qemu/{TEMPLATE}/clone"),
        &[("newid", "220")],
    )
    .await;
    assert_eq!(
        exit,
        "clone failed: can't lock file '/var/lock/pve-manager/pve-storage-local-lvm' - got timeout"
    );
    assert!(sim.vm(220).is_none(), "a failed clone removes its target");
    sim.set_faults(Faults::none());
    clone_template(sim.addr(), 221, "x").await;
    sim.set_faults(Faults {
        task_failure_rate: 1.0,
        ..Faults::none()
    });
    let exit = run_task(sim.addr(), "POST", "/nodes/pve/qemu/221/status/start", &[]).await;
    assert!(exit.starts_with("start failed:"), "{exit}");
    let exit = run_task(sim.addr(), "DELETE", "/nodes/pve/qemu/221", &[]).await;
    assert_eq!(
        exit,
        "can't lock file '/var/lock/qemu-server/lock-221.conf' - got timeout"
    );
    assert!(
        sim.vm(221).is_some_and(|vm| vm.lock.is_none()),
        "a failed destroy leaves the VM unlocked"
    );
}

#[tokio::test]
async fn tasks_can_end_with_warnings() {
    let sim = Simulator::start(config().faults(Faults {
        task_warning_rate: 1.0,
        ..Faults::none()
    }))
    .await
    .unwrap();
    let a = api(
        sim.addr(),
        "POST",
        &format!("/nodes/pve/qemu/{TEMPLATE}/clone"),
        &[("newid", "230")],
    )
    .await;
    let upid = a.data().as_str().unwrap().to_string();
    assert_eq!(common::wait_task(sim.addr(), &upid).await, "WARNINGS: 1");
    let log = api(sim.addr(), "GET", &format!("/nodes/pve/tasks/{upid}/log"), &[]).await;
    assert_eq!(
        log.data().as_array().unwrap().last().unwrap()["t"],
        "TASK WARNINGS: 1"
    );
    assert!(
        sim.vm(230).is_some_and(|vm| vm.lock.is_none()),
        "a task with warnings succeeded"
    );
}

#[tokio::test]
async fn lock_timeouts_answer_500_cant_lock_file() {
    let sim = Simulator::start(config()).await.unwrap();
    clone_template(sim.addr(), 240, "y").await;
    sim.set_faults(Faults {
        lock_timeout_rate: 1.0,
        ..Faults::none()
    });
    let a = api(sim.addr(), "PUT", "/nodes/pve/qemu/240/config", &[("cores", "4")]).await;
    assert_eq!(
        (a.status, a.reason.as_str()),
        (
            500,
            "can't lock file '/var/lock/qemu-server/lock-240.conf' - got timeout"
        )
    );
    assert_eq!(sim.vm(240).unwrap().config["cores"], "2", "nothing changed");
}

#[tokio::test]
async fn an_agent_that_never_becomes_ready() {
    let sim = Simulator::start(config().faults(Faults {
        agent_never_ready: true,
        ..Faults::none()
    }))
    .await
    .unwrap();
    clone_template(sim.addr(), 250, "z").await;
    run_task(sim.addr(), "POST", "/nodes/pve/qemu/250/status/start", &[]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let a = api(
        sim.addr(),
        "GET",
        "/nodes/pve/qemu/250/agent/network-get-interfaces",
        &[],
    )
    .await;
    assert_eq!(
        (a.status, a.reason.as_str()),
        (500, "QEMU guest agent is not running")
    );
    sim.set_faults(Faults::none());
    let a = api(
        sim.addr(),
        "GET",
        "/nodes/pve/qemu/250/agent/network-get-interfaces",
        &[],
    )
    .await;
    assert_eq!(a.status, 200, "the agent answers once the fault is lifted");
}

#[tokio::test]
async fn tasks_run_for_the_scaled_modelled_time() {
    let sim = Simulator::start(config().latency_scale(0.1)).await.unwrap();
    let started = Instant::now();
    clone_template(sim.addr(), 260, "slow").await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300),
        "a linked clone takes 3 s × 0.1, took {took:?}"
    );
    sim.set_latency_scale(0.0);
    let started = Instant::now();
    clone_template(sim.addr(), 261, "fast").await;
    assert!(started.elapsed() < Duration::from_millis(250));
}

#[tokio::test]
async fn counters_and_the_request_log_are_readable_in_process_and_over_http() {
    let sim = Simulator::start(config()).await.unwrap();
    clone_template(sim.addr(), 270, "counted").await;
    api(sim.addr(), "GET", "/nodes/pve/qemu/270/bogus", &[]).await;
    let stats = sim.stats();
    assert_eq!(stats.count("POST", "/nodes/{node}/qemu/{vmid}/clone"), 1);
    assert!(stats.count("GET", "/nodes/{node}/tasks/{upid}/status") >= 1);
    assert_eq!(stats.by_route["GET <unknown>"], 1);
    assert_eq!(stats.by_status[&501], 1);
    assert_eq!(stats.tasks_started, 1);
    let log = sim.request_log();
    assert_eq!(
        log[0].route.as_deref(),
        Some("POST /nodes/{node}/qemu/{vmid}/clone")
    );
    assert_eq!(log[0].principal.as_deref(), Some("ci@pve!tests"));
    let side = send(sim.addr(), "GET", "/_sim/stats", &[], None).await;
    assert_eq!(side.data()["by_route"]["POST /nodes/{node}/qemu/{vmid}/clone"], 1);
    let vms = send(sim.addr(), "GET", "/_sim/vms", &[], None).await;
    assert_eq!(vms.data().as_array().unwrap().len(), 2);
    let body = r#"{"rate": 1.0}"#.to_string();
    let set = send(
        sim.addr(),
        "POST",
        "/_sim/faults",
        &[],
        Some(("application/json", body)),
    )
    .await;
    assert_eq!(set.status, 200);
    assert_eq!(sim.faults().rate, 1.0);
    send(sim.addr(), "POST", "/_sim/reset", &[], None).await;
    assert_eq!(sim.stats().total, 0);
}

#[tokio::test]
async fn the_same_seed_gives_the_same_cluster() {
    let a = Simulator::start(config().seed(7)).await.unwrap();
    let b = Simulator::start(config().seed(7)).await.unwrap();
    let c = Simulator::start(config().seed(8)).await.unwrap();
    let mac = |sim: &fediversity_testbed::SimHandle| sim.vm(TEMPLATE).unwrap().config["net0"].clone();
    assert_eq!(mac(&a), mac(&b));
    assert_ne!(mac(&a), mac(&c));
}

#[tokio::test]
async fn a_configured_address_pool_is_what_agents_report() {
    let sim = Simulator::start(config().address_pool("127.0.77.0/24"))
        .await
        .unwrap();
    clone_template(sim.addr(), 280, "pooled").await;
    run_task(sim.addr(), "POST", "/nodes/pve/qemu/280/status/start", &[]).await;
    assert_eq!(sim.vm(280).unwrap().address, Some("127.0.77.2".parse().unwrap()));
    assert!(Simulator::start(config().address_pool("nonsense")).await.is_err());
}

#[tokio::test]
async fn shutting_down_closes_the_port() {
    let sim = Simulator::start(config()).await.unwrap();
    let addr = sim.addr();
    sim.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
