//! Unit tests of every lifecycle step and error class against the scripted API, on a paused clock.

use serde_json::json;

use super::*;
use crate::api::DeletionPolicy;
use crate::proxmox::client::Method::{self, Delete, Get, Post, Put};
use crate::proxmox::fake::{ScriptedApi, task, task_path, task_running, task_stopped, upid};
use crate::proxmox::plan::{self, HostPlan};
use crate::proxmox::reasons;

const OWNER: &str = "fediversity-owner-0a1b2c3d-0123456789";
const NODE: &str = "pve";
const GIB: u64 = 1 << 30;

struct Rig {
    api: ScriptedApi,
    env: Environment,
    store: Arc<Store>,
    _dir: tempfile::TempDir,
}

/// What one run came to.
struct Ran {
    outcome: Result<HostOutcome, LifecycleError>,
    record: Option<VmRecord>,
    wake_after: Option<Duration>,
}

fn rig() -> Rig {
    let api = ScriptedApi::new();
    let spec: ProxmoxSpec = serde_json::from_value(json!({
        "endpoint": "https://pve.example.net:8006",
        "credentials": { "tokenId": "ci@pve!ctl", "secretFile": "/run/secrets/token" },
        "nodes": [NODE],
        "template": { "vmid": 9000 },
        "storage": "local-lvm",
        "bridge": "vmbr0",
        "vmidRange": { "start": 100, "end": 199 }
    }))
    .expect("a valid spec");
    let metrics = ProxmoxMetrics::register(&prometheus::Registry::new()).expect("fresh registry");
    let env = Environment::new(
        "lab".into(),
        spec,
        api.api(),
        "fediversity-owner-0a1b2c3d-".into(),
        (None, "root".into()),
        metrics,
    );
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = Arc::new(Store::open(dir.path()).expect("the store opens"));
    Rig {
        api,
        env,
        store,
        _dir: dir,
    }
}

fn ctx(deletion_policy: DeletionPolicy) -> PlanContext {
    PlanContext {
        owner_tag: OWNER.into(),
        template: 9000,
        deletion_policy,
        allow_restart: false,
    }
}

fn host() -> DesiredVm {
    DesiredVm {
        application: "mastodon".into(),
        name: "uni-mastodon".into(),
        cores: 2,
        memory_mib: 4096,
        disk_gib: 40,
        config_hash: "h1".into(),
    }
}

fn record(vmid: u32, phase: RecordPhase) -> VmRecord {
    VmRecord {
        environment: "lab".into(),
        deployment: "uni".into(),
        application: "mastodon".into(),
        name: "uni-mastodon".into(),
        owner_tag: OWNER.into(),
        vmid,
        node: NODE.into(),
        phase,
        task: None,
        configured: None,
        pending: Vec::new(),
        address: None,
        deletion_policy: DeletionPolicy::Retain,
    }
}

/// Our VM as listed: tagged, named, 40 GiB, running or not.
fn ours(vmid: u32, running: bool) -> VmResource {
    VmResource {
        vmid,
        node: NODE.into(),
        name: Some("uni-mastodon".into()),
        tags: ["fediversity".to_owned(), OWNER.to_owned()].into(),
        running,
        maxcpu: 2,
        maxmem: 4096 << 20,
        maxdisk: 40 * GIB,
        ..VmResource::default()
    }
}

fn template() -> VmResource {
    VmResource {
        vmid: 9000,
        node: NODE.into(),
        name: Some("nixos".into()),
        template: true,
        maxdisk: 8 * GIB,
        ..VmResource::default()
    }
}

/// The listing JSON of `vms`, as `/cluster/resources?type=vm` gives it.
fn listing(vms: &[VmResource]) -> Result<serde_json::Value, ProxmoxError> {
    Ok(json!(
        vms.iter()
            .map(|v| json!({
                "id": format!("qemu/{}", v.vmid),
                "type": "qemu",
                "vmid": v.vmid,
                "node": v.node,
                "name": v.name,
                "tags": v.tags.iter().cloned().collect::<Vec<_>>().join(";"),
                "status": if v.running { "running" } else { "stopped" },
                "template": u8::from(v.template),
                "maxdisk": v.maxdisk,
            }))
            .collect::<Vec<_>>()
    ))
}

fn qemu(vmid: u32, rest: &str) -> String {
    format!("/nodes/{NODE}/qemu/{vmid}{rest}")
}

fn agent_answer(address: &str) -> Result<serde_json::Value, ProxmoxError> {
    Ok(json!({ "result": [
        { "name": "lo", "ip-addresses": [{ "ip-address-type": "ipv4", "ip-address": "127.0.0.1" }] },
        { "name": "eth0", "ip-addresses": [{ "ip-address-type": "ipv4", "ip-address": address }] }
    ]}))
}

/// Expects a task to be started by `method path` and polled once, ending with `exit`.
fn expect_task(api: &ScriptedApi, method: Method, path: &str, vmid: u32, kind: &str, exit: &str) -> String {
    let id = upid(NODE, vmid, kind);
    api.expect(method, path, task(&id));
    api.expect(Get, &task_path(&id), task_stopped(exit));
    id
}

impl Rig {
    async fn run(
        &self,
        desired: Option<&DesiredVm>,
        ctx: &PlanContext,
        record: Option<VmRecord>,
        running: bool,
        steps: Vec<Step>,
    ) -> Ran {
        let mut run = HostRun {
            env: &self.env,
            store: &self.store,
            deployment: "uni",
            desired,
            ctx,
            record,
            running,
            uptime: 0,
            wake_after: None,
        };
        let plan = HostPlan {
            name: "uni-mastodon".into(),
            application: "mastodon".into(),
            vm: None,
            steps,
            duplicates: Vec::new(),
        };
        let outcome = run.run(&plan).await;
        Ran {
            outcome,
            record: run.record,
            wake_after: run.wake_after,
        }
    }

    fn stored(&self) -> Option<VmRecord> {
        self.store
            .inventory(&record_key("lab", "uni", "mastodon"))
            .expect("the store reads")
    }

    fn calls_to(&self, needle: &str) -> usize {
        self.api
            .calls()
            .iter()
            .filter(|c| c.path.contains(needle))
            .count()
    }
}

#[tokio::test(start_paused = true)]
async fn a_new_host_is_reserved_recorded_cloned_configured_grown_started_and_addressed() {
    let rig = rig();
    let (host, ctx) = (host(), ctx(DeletionPolicy::Retain));
    let foreign = VmResource {
        vmid: 100,
        node: NODE.into(),
        name: Some("someone-else".into()),
        running: true,
        ..VmResource::default()
    };
    let observed = vec![template(), foreign.clone()];
    let steps = plan::plan_host(&host, None, &observed, &ctx).steps;
    assert_eq!(
        steps,
        vec![
            Step::Allocate,
            Step::Configure,
            Step::Resize { gib: 40 },
            Step::Start,
            Step::AwaitAgent
        ]
    );
    let api = &rig.api;
    api.expect_with(Get, "/cluster/resources", &[("type", "vm")], move |_| {
        listing(&observed)
    });
    // The intent is durable before the clone is asked for, on the first VMID not taken.
    let store = rig.store.clone();
    let clone = upid(NODE, 9000, "qmclone");
    let answer = clone.clone();
    api.expect_with(
        Post,
        &qemu(9000, "/clone"),
        &[("newid", "101"), ("name", "uni-mastodon"), ("full", "0")],
        move |_| {
            let intent: Option<VmRecord> = store.inventory(&record_key("lab", "uni", "mastodon")).unwrap();
            let intent = intent.expect("the intent is recorded before the clone call");
            assert_eq!((intent.vmid, intent.phase), (101, RecordPhase::Creating));
            task(&answer)
        },
    );
    api.expect(Get, &task_path(&clone), task_running());
    api.expect(Get, &task_path(&clone), task_stopped("OK"));
    api.expect(
        Get,
        &qemu(101, "/config"),
        Ok(json!({ "name": "uni-mastodon", "net0": "virtio=BC:24:11:00:00:01,bridge=vmbr1", "cores": 1, "digest": "d1" })),
    );
    api.expect_with(
        Put,
        &qemu(101, "/config"),
        &[
            ("tags", &format!("fediversity;{OWNER}")),
            ("cores", "2"),
            ("memory", "4096"),
            ("net0", "virtio=BC:24:11:00:00:01,bridge=vmbr0"),
            ("ipconfig0", "ip=dhcp"),
            ("ciuser", "root"),
            ("agent", "1"),
            ("digest", "d1"),
        ],
        |_| Ok(serde_json::Value::Null),
    );
    let resize = upid(NODE, 101, "resize");
    api.expect_with(
        Put,
        &qemu(101, "/resize"),
        &[("disk", "scsi0"), ("size", "40G")],
        {
            let resize = resize.clone();
            move |_| task(&resize)
        },
    );
    api.expect(Get, &task_path(&resize), task_stopped("WARNINGS: 1"));
    expect_task(api, Post, &qemu(101, "/status/start"), 101, "qmstart", "OK");
    api.expect(
        Get,
        &qemu(101, "/agent/network-get-interfaces"),
        Err(ProxmoxError::NotReady("QEMU guest agent is not running".into())),
    );
    api.expect(
        Get,
        &qemu(101, "/agent/network-get-interfaces"),
        agent_answer("192.0.2.10"),
    );

    let ran = rig.run(Some(&host), &ctx, None, false, steps).await;

    assert_eq!(ran.outcome.expect("no error"), HostOutcome::Done);
    rig.api.assert_done();
    let stored = rig.stored().expect("the record is kept");
    assert_eq!(stored.vmid, 101);
    assert_eq!(stored.phase, RecordPhase::Present);
    assert_eq!(stored.task, None, "every task was followed to its end");
    assert_eq!(stored.configured.as_deref(), Some("h1"));
    assert_eq!(stored.address.as_deref(), Some("192.0.2.10"));
    assert_eq!(ran.record, Some(stored));
    assert_eq!(rig.calls_to("/qemu/100"), 0, "the foreign VM is never touched");
}

#[tokio::test(start_paused = true)]
async fn a_crash_between_the_intent_and_the_clone_call_clones_into_the_reserved_vmid_once() {
    let rig = rig();
    let (host, ctx) = (host(), ctx(DeletionPolicy::Retain));
    let intent = record(105, RecordPhase::Creating);
    rig.store
        .put_inventory(&record_key("lab", "uni", "mastodon"), &intent)
        .unwrap();
    let plan = plan::plan_host(&host, Some(&intent), &[template()], &ctx);
    assert_eq!(plan.steps[0], Step::Clone { vmid: 105 });
    let clone = upid(NODE, 9000, "qmclone");
    rig.api
        .expect_with(Post, &qemu(9000, "/clone"), &[("newid", "105")], {
            let clone = clone.clone();
            move |_| task(&clone)
        });
    rig.api.expect(Get, &task_path(&clone), task_stopped("OK"));

    let ran = rig
        .run(
            Some(&host),
            &ctx,
            Some(intent),
            false,
            vec![plan.steps[0].clone()],
        )
        .await;

    assert_eq!(ran.outcome.expect("no error"), HostOutcome::Done);
    rig.api.assert_done();
    assert_eq!(rig.calls_to("/cluster/resources"), 0, "no new VMID is reserved");
    assert_eq!(rig.stored().map(|r| r.vmid), Some(105));
}

#[tokio::test(start_paused = true)]
async fn after_a_crash_that_lost_the_clones_upid_the_clone_is_adopted_and_never_cloned_again() {
    let rig = rig();
    let (host, ctx) = (host(), ctx(DeletionPolicy::Retain));
    let intent = record(105, RecordPhase::Creating);
    // The clone happened: the VM has the intent's name but none of our tags yet.
    let cloned = VmResource {
        vmid: 105,
        node: NODE.into(),
        name: Some("uni-mastodon".into()),
        maxdisk: 8 * GIB,
        ..VmResource::default()
    };
    let steps = plan::plan_host(&host, Some(&intent), &[template(), cloned], &ctx).steps;
    assert_eq!(steps[0], Step::Configure);
    rig.api.expect(
        Get,
        &qemu(105, "/config"),
        Ok(json!({ "name": "uni-mastodon", "digest": "d2" })),
    );
    rig.api.expect_with(
        Put,
        &qemu(105, "/config"),
        &[("tags", &format!("fediversity;{OWNER}")), ("digest", "d2")],
        |_| Ok(serde_json::Value::Null),
    );
    let resize = upid(NODE, 105, "resize");
    rig.api.expect(Put, &qemu(105, "/resize"), task(&resize)).expect(
        Get,
        &task_path(&resize),
        task_stopped("OK"),
    );
    expect_task(&rig.api, Post, &qemu(105, "/status/start"), 105, "qmstart", "OK");
    rig.api.expect(
        Get,
        &qemu(105, "/agent/network-get-interfaces"),
        agent_answer("192.0.2.15"),
    );

    let ran = rig.run(Some(&host), &ctx, Some(intent), false, steps).await;

    assert_eq!(ran.outcome.expect("no error"), HostOutcome::Done);
    rig.api.assert_done();
    assert_eq!(rig.calls_to("/clone"), 0, "never cloned a second time");
    let stored = rig.stored().expect("kept");
    assert_eq!((stored.vmid, stored.phase), (105, RecordPhase::Present));
}

#[tokio::test(start_paused = true)]
async fn a_clone_refused_because_the_vmid_exists_observes_again_and_keeps_the_intent() {
    let rig = rig();
    let (host, ctx) = (host(), ctx(DeletionPolicy::Retain));
    let intent = record(105, RecordPhase::Creating);
    rig.api.expect(
        Post,
        &qemu(9000, "/clone"),
        Err(ProxmoxError::classify(
            500,
            "unable to create VM 105: config file already exists",
        )),
    );

    let ran = rig
        .run(
            Some(&host),
            &ctx,
            Some(intent.clone()),
            false,
            vec![Step::Clone { vmid: 105 }, Step::Configure],
        )
        .await;

    match ran.outcome.expect("not an error") {
        HostOutcome::Waiting { reason, .. } => assert_eq!(reason, reasons::REOBSERVE),
        other => panic!("expected to observe again, got {other:?}"),
    }
    rig.api.assert_done();
    assert_eq!(ran.record, Some(intent), "the intent stays for the next pass");
}

#[tokio::test(start_paused = true)]
async fn a_foreign_vm_on_the_intents_vmid_is_left_alone_and_a_500_on_the_new_clone_keeps_the_new_intent() {
    let rig = rig();
    let (host, ctx) = (host(), ctx(DeletionPolicy::Retain));
    let intent = record(100, RecordPhase::Creating);
    rig.store
        .put_inventory(&record_key("lab", "uni", "mastodon"), &intent)
        .unwrap();
    let foreign = VmResource {
        vmid: 100,
        node: NODE.into(),
        name: Some("someone-else".into()),
        running: true,
        ..VmResource::default()
    };
    let observed = vec![template(), foreign];
    let steps = plan::plan_host(&host, Some(&intent), &observed, &ctx).steps;
    assert_eq!(&steps[..2], &[Step::DropIntent, Step::Allocate]);
    rig.api
        .expect(Get, "/cluster/resources", listing(&observed))
        .expect_with(Post, &qemu(9000, "/clone"), &[("newid", "101")], |_| {
            Err(ProxmoxError::classify(
                500,
                "got no worker upid - start worker failed",
            ))
        });

    let ran = rig.run(Some(&host), &ctx, Some(intent), false, steps).await;

    match ran.outcome {
        Err(LifecycleError::Api(e @ ProxmoxError::Transient { status: 500, .. })) => {
            assert!(e.is_transient());
        }
        other => panic!(
            "expected a transient API error, got {:?}",
            other.map_err(|e| e.to_string())
        ),
    }
    rig.api.assert_done();
    assert_eq!(rig.calls_to("/qemu/100"), 0, "the foreign VM is never touched");
    let stored = rig.stored().expect("the new intent is kept");
    assert_eq!((stored.vmid, stored.phase), (101, RecordPhase::Creating));
}

#[tokio::test(start_paused = true)]
async fn configure_never_writes_to_a_vm_whose_own_config_says_it_is_not_ours() {
    let rig = rig();
    let (host, ctx) = (host(), ctx(DeletionPolicy::Retain));
    rig.api.expect(
        Get,
        &qemu(101, "/config"),
        Ok(json!({ "name": "renamed-by-someone", "tags": "prod", "digest": "d3" })),
    );

    let ran = rig
        .run(
            Some(&host),
            &ctx,
            Some(record(101, RecordPhase::Present)),
            true,
            vec![Step::Configure, Step::Start],
        )
        .await;

    match ran.outcome.expect("not an error") {
        HostOutcome::Waiting { reason, .. } => assert_eq!(reason, reasons::REOBSERVE),
        other => panic!("expected to observe again, got {other:?}"),
    }
    rig.api.assert_done();
    assert!(
        rig.api.calls().iter().all(|c| c.method == Get),
        "nothing but a read: {:?}",
        rig.api.calls()
    );
}

#[tokio::test(start_paused = true)]
async fn configure_waits_while_the_vm_is_locked() {
    let rig = rig();
    let (host, ctx) = (host(), ctx(DeletionPolicy::Retain));
    rig.api.expect(
        Get,
        &qemu(101, "/config"),
        Ok(json!({ "name": "uni-mastodon", "tags": OWNER, "lock": "backup", "digest": "d4" })),
    );

    let ran = rig
        .run(
            Some(&host),
            &ctx,
            Some(record(101, RecordPhase::Present)),
            true,
            vec![Step::Configure],
        )
        .await;

    match ran.outcome.expect("not an error") {
        HostOutcome::Waiting { reason, message } => {
            assert_eq!(reason, reasons::VM_LOCKED);
            assert!(message.contains("backup"), "{message}");
        }
        other => panic!("expected a wait, got {other:?}"),
    }
    rig.api.assert_done();
}

#[tokio::test(start_paused = true)]
async fn a_task_that_fails_is_an_error_naming_the_task_and_leaves_no_task_on_the_record() {
    let rig = rig();
    let (host, ctx) = (host(), ctx(DeletionPolicy::Retain));
    expect_task(
        &rig.api,
        Put,
        &qemu(101, "/resize"),
        101,
        "resize",
        "can't lock file '/var/lock/qemu-server/lock-101.conf' - got timeout",
    );

    let ran = rig
        .run(
            Some(&host),
            &ctx,
            Some(record(101, RecordPhase::Present)),
            false,
            vec![Step::Resize { gib: 40 }, Step::Start],
        )
        .await;

    match ran.outcome {
        Err(LifecycleError::Api(ProxmoxError::TaskFailed(m))) => {
            assert!(m.starts_with("resize: can't lock file"), "{m}");
        }
        other => panic!(
            "expected a failed task, got {:?}",
            other.map_err(|e| e.to_string())
        ),
    }
    rig.api.assert_done();
    assert_eq!(rig.stored().expect("kept").task, None);
}

#[tokio::test(start_paused = true)]
async fn a_start_that_finds_the_vm_already_running_counts_as_started() {
    let rig = rig();
    let (host, ctx) = (host(), ctx(DeletionPolicy::Retain));
    expect_task(
        &rig.api,
        Post,
        &qemu(101, "/status/start"),
        101,
        "qmstart",
        "VM 101 already running",
    );
    rig.api.expect(
        Get,
        &qemu(101, "/agent/network-get-interfaces"),
        agent_answer("192.0.2.11"),
    );

    let ran = rig
        .run(
            Some(&host),
            &ctx,
            Some(record(101, RecordPhase::Present)),
            false,
            vec![Step::Start, Step::AwaitAgent],
        )
        .await;

    assert_eq!(ran.outcome.expect("no error"), HostOutcome::Done);
    rig.api.assert_done();
    assert_eq!(ran.record.and_then(|r| r.address).as_deref(), Some("192.0.2.11"));
}

#[tokio::test(start_paused = true)]
async fn a_task_still_running_past_the_inline_wait_ends_the_run_with_the_time_of_the_next_poll() {
    let rig = rig();
    let (host, ctx) = (host(), ctx(DeletionPolicy::Retain));
    let start = upid(NODE, 101, "qmstart");
    rig.api.expect(Post, &qemu(101, "/status/start"), task(&start));
    // Nothing is known of this environment yet: polls back off from 20 ms (at 20, 40, 80, 160 and
    // 320 ms) until the next would take the waits past the inline wait in all.
    for _ in 0..5 {
        rig.api.expect(Get, &task_path(&start), task_running());
    }

    let ran = rig
        .run(
            Some(&host),
            &ctx,
            Some(record(101, RecordPhase::Present)),
            false,
            vec![Step::Start, Step::AwaitAgent],
        )
        .await;

    match ran.outcome.expect("not an error") {
        HostOutcome::Waiting { reason, .. } => assert_eq!(reason, reasons::TASK_RUNNING),
        other => panic!("expected a wait, got {other:?}"),
    }
    rig.api.assert_done();
    // The next poll, at 640 ms, is not waited for inline: 320 ms were spent already.
    assert_eq!(ran.wake_after, Some(Duration::from_millis(320)));
    assert_eq!(
        rig.stored().and_then(|r| r.task),
        Some(start),
        "the UPID is recorded for the next pass"
    );
}

#[tokio::test(start_paused = true)]
async fn a_task_recorded_before_a_restart_is_followed_to_its_end_before_anything_else() {
    let rig = rig();
    let (host, ctx) = (host(), ctx(DeletionPolicy::Retain));
    let clone = upid(NODE, 9000, "qmclone");
    let mut intent = record(105, RecordPhase::Creating);
    intent.task = Some(clone.clone());
    let steps = plan::plan_host(&host, Some(&intent), &[template()], &ctx).steps;
    assert_eq!(steps, vec![Step::FollowTask { upid: clone.clone() }]);
    // Not watched by this process: polled at once.
    rig.api.expect(Get, &task_path(&clone), task_stopped("OK"));

    let ran = rig.run(Some(&host), &ctx, Some(intent), false, steps).await;

    match ran.outcome.expect("not an error") {
        HostOutcome::Waiting { reason, .. } => assert_eq!(reason, reasons::REOBSERVE),
        other => panic!("expected to observe again, got {other:?}"),
    }
    rig.api.assert_done();
    assert_eq!(rig.stored().expect("kept").task, None);
}

#[tokio::test(start_paused = true)]
async fn an_agent_that_never_answers_keeps_the_host_waiting_with_ever_later_polls_never_an_error() {
    let rig = rig();
    let (host, ctx) = (host(), ctx(DeletionPolicy::Retain));
    let not_running = || Err(ProxmoxError::NotReady("QEMU guest agent is not running".into()));
    let path = qemu(101, "/agent/network-get-interfaces");
    let mut record = Some(record(101, RecordPhase::Present));
    let mut wakes = Vec::new();
    let mut polls = Vec::new();
    for _ in 0..8 {
        for _ in 0..6 {
            rig.api.expect(Get, &path, not_running());
        }
        let before = rig.api.remaining();
        let ran = rig
            .run(Some(&host), &ctx, record.take(), true, vec![Step::AwaitAgent])
            .await;
        match ran.outcome.expect("never an error") {
            HostOutcome::Waiting { reason, .. } => assert_eq!(reason, reasons::WAITING_FOR_AGENT),
            other => panic!("expected a wait, got {other:?}"),
        }
        polls.push(before - rig.api.remaining());
        let wake = ran.wake_after.expect("a wake-up time");
        wakes.push(wake);
        record = ran.record;
        tokio::time::advance(wake).await;
        // The unused answers of this round are dropped.
        while rig.api.remaining() > 0 {
            let _ = rig.api.api().agent_address(NODE, 101).await;
        }
    }
    assert!(polls.iter().all(|p| *p >= 1), "{polls:?}");
    assert!(
        polls[1..].iter().all(|p| *p == 1),
        "one poll per run once waits are long: {polls:?}"
    );
    assert!(wakes.windows(2).all(|w| w[1] >= w[0]), "{wakes:?}");
    assert!(
        wakes.iter().all(|w| *w <= Duration::from_secs(5)),
        "capped at the longest agent gap: {wakes:?}"
    );
    assert_eq!(record.and_then(|r| r.address), None);
}

#[tokio::test(start_paused = true)]
async fn a_500_a_timeout_and_a_401_each_surface_as_their_own_error_class_and_change_nothing() {
    let cases = [
        (
            ProxmoxError::classify(500, "got no worker upid - start worker failed"),
            "transient",
            true,
        ),
        (
            ProxmoxError::Transient {
                status: 596,
                message: "Connection timed out".into(),
            },
            "transient",
            true,
        ),
        (
            ProxmoxError::classify(401, "authentication failure"),
            "unauthorized",
            false,
        ),
    ];
    for (error, label, transient) in cases {
        let rig = rig();
        let (host, ctx) = (host(), ctx(DeletionPolicy::Retain));
        let before = record(101, RecordPhase::Present);
        rig.store
            .put_inventory(&record_key("lab", "uni", "mastodon"), &before)
            .unwrap();
        rig.api.expect(Get, &qemu(101, "/config"), Err(error.clone()));

        let ran = rig
            .run(
                Some(&host),
                &ctx,
                Some(before.clone()),
                true,
                vec![Step::Configure, Step::AwaitAgent],
            )
            .await;

        match ran.outcome {
            Err(LifecycleError::Api(e)) => {
                assert_eq!(e, error);
                assert_eq!(e.metric_label(), label);
                assert_eq!(e.is_transient(), transient, "{e}");
            }
            other => panic!("expected {error}, got {:?}", other.map_err(|e| e.to_string())),
        }
        rig.api.assert_done();
        assert_eq!(
            rig.stored(),
            Some(before),
            "the record is unchanged after {error}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_disk_shrink_is_refused_without_a_single_call() {
    let rig = rig();
    let (host, ctx) = (host(), ctx(DeletionPolicy::Retain));
    let mut bigger = ours(101, true);
    bigger.maxdisk = 80 * GIB;
    let mut present = record(101, RecordPhase::Present);
    present.configured = Some("h1".into());
    present.address = Some("192.0.2.10".into());
    let steps = plan::plan_host(&host, Some(&present), &[template(), bigger], &ctx).steps;

    let ran = rig.run(Some(&host), &ctx, Some(present), true, steps).await;

    match ran.outcome.expect("not an error") {
        HostOutcome::Waiting { reason, message } => {
            assert_eq!(reason, reasons::DISK_SHRINK_REFUSED);
            assert!(message.contains("80 GiB"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(rig.api.calls().is_empty(), "{:?}", rig.api.calls());
}

#[tokio::test(start_paused = true)]
async fn destroy_leaves_a_vm_that_is_no_longer_ours_alone_and_drops_only_the_record() {
    let rig = rig();
    let ctx = ctx(DeletionPolicy::Delete);
    let present = record(101, RecordPhase::Present);
    rig.store
        .put_inventory(&record_key("lab", "uni", "mastodon"), &present)
        .unwrap();
    let steps = plan::plan_removal(&present, &[ours(101, true)], &ctx).steps;
    assert_eq!(steps, vec![Step::Destroy]);
    // Re-tagged by someone since the listing.
    rig.api.expect(
        Get,
        &qemu(101, "/config"),
        Ok(json!({ "name": "uni-mastodon", "tags": "prod", "digest": "d5" })),
    );

    let ran = rig.run(None, &ctx, Some(present), true, steps).await;

    assert_eq!(ran.outcome.expect("no error"), HostOutcome::Removed);
    rig.api.assert_done();
    assert_eq!(rig.stored(), None);
    assert!(rig.api.calls().iter().all(|c| c.method == Get));
}

#[tokio::test(start_paused = true)]
async fn destroy_stops_a_running_vm_then_destroys_it_with_purge_and_its_disks() {
    let rig = rig();
    let ctx = ctx(DeletionPolicy::Delete);
    let present = record(101, RecordPhase::Present);
    rig.store
        .put_inventory(&record_key("lab", "uni", "mastodon"), &present)
        .unwrap();
    rig.api.expect(
        Get,
        &qemu(101, "/config"),
        Ok(json!({ "name": "uni-mastodon", "tags": format!("fediversity;{OWNER}"), "digest": "d6" })),
    );
    expect_task(&rig.api, Post, &qemu(101, "/status/stop"), 101, "qmstop", "OK");
    let destroy = upid(NODE, 101, "qmdestroy");
    rig.api.expect_with(
        Delete,
        &qemu(101, ""),
        &[("purge", "1"), ("destroy-unreferenced-disks", "1")],
        {
            let destroy = destroy.clone();
            move |_| task(&destroy)
        },
    );
    rig.api.expect(Get, &task_path(&destroy), task_stopped("OK"));

    let ran = rig
        .run(None, &ctx, Some(present), true, vec![Step::Destroy])
        .await;

    assert_eq!(ran.outcome.expect("no error"), HostOutcome::Removed);
    rig.api.assert_done();
    assert_eq!(rig.stored(), None, "the record goes only after the destroy");
}

#[tokio::test(start_paused = true)]
async fn stop_re_verifies_the_vm_stops_it_and_keeps_it_and_its_record_without_the_old_address() {
    let rig = rig();
    let ctx = ctx(DeletionPolicy::Retain);
    let mut present = record(101, RecordPhase::Present);
    present.address = Some("192.0.2.9".into());
    rig.store
        .put_inventory(&record_key("lab", "uni", "mastodon"), &present)
        .unwrap();
    rig.api.expect(
        Get,
        &qemu(101, "/config"),
        Ok(json!({ "name": "uni-mastodon", "tags": format!("fediversity;{OWNER}"), "digest": "d7" })),
    );
    expect_task(&rig.api, Post, &qemu(101, "/status/stop"), 101, "qmstop", "OK");

    let ran = rig.run(None, &ctx, Some(present), true, vec![Step::Stop]).await;

    assert_eq!(ran.outcome.expect("no error"), HostOutcome::Done);
    rig.api.assert_done();
    let kept = rig.stored().expect("the record is kept");
    assert_eq!(
        (kept.vmid, kept.phase, kept.address),
        (101, RecordPhase::Present, None)
    );
    assert!(
        rig.api.calls().iter().all(|c| c.method != Delete),
        "{:?}",
        rig.api.calls()
    );
}

#[tokio::test(start_paused = true)]
async fn stop_leaves_a_vm_that_is_no_longer_ours_running_and_drops_only_the_record() {
    let rig = rig();
    let ctx = ctx(DeletionPolicy::Retain);
    let present = record(101, RecordPhase::Present);
    rig.store
        .put_inventory(&record_key("lab", "uni", "mastodon"), &present)
        .unwrap();
    rig.api.expect(
        Get,
        &qemu(101, "/config"),
        Ok(json!({ "name": "someone-else", "tags": format!("fediversity;{OWNER}"), "digest": "d8" })),
    );

    let ran = rig.run(None, &ctx, Some(present), true, vec![Step::Stop]).await;

    assert_eq!(ran.outcome.expect("no error"), HostOutcome::Removed);
    rig.api.assert_done();
    assert_eq!(rig.stored(), None);
    assert!(rig.api.calls().iter().all(|c| c.method == Get));
}

#[tokio::test(start_paused = true)]
async fn a_vm_already_gone_counts_as_destroyed() {
    let rig = rig();
    let ctx = ctx(DeletionPolicy::Delete);
    let present = record(101, RecordPhase::Present);
    rig.store
        .put_inventory(&record_key("lab", "uni", "mastodon"), &present)
        .unwrap();
    rig.api.expect(
        Get,
        &qemu(101, "/config"),
        Err(ProxmoxError::classify(
            500,
            "Configuration file 'nodes/pve/qemu-server/101.conf' does not exist",
        )),
    );

    let ran = rig
        .run(None, &ctx, Some(present), false, vec![Step::Destroy])
        .await;

    assert_eq!(ran.outcome.expect("no error"), HostOutcome::Removed);
    rig.api.assert_done();
    assert_eq!(rig.stored(), None);
}

#[tokio::test(start_paused = true)]
async fn the_drift_scan_puts_back_changed_keys_and_reverts_a_memory_change_still_pending() {
    let rig = rig();
    let (host, ctx) = (host(), ctx(DeletionPolicy::Retain));
    let mut present = record(101, RecordPhase::Present);
    present.configured = Some("h1".into());
    rig.api.expect(
        Get,
        &qemu(101, "/config"),
        Ok(json!({
            "name": "uni-mastodon",
            "tags": format!("fediversity;{OWNER}"),
            "cores": 4,
            "memory": "8192",
            "net0": "virtio=BC:24:11:00:00:01,bridge=vmbr0",
            "ipconfig0": "ip=dhcp",
            "ciuser": "root",
            "agent": "1",
            "digest": "d7"
        })),
    );
    // Memory was raised in the UI and waits for a restart; cores were changed on a stopped VM earlier.
    rig.api.expect(
        Get,
        &qemu(101, "/pending"),
        Ok(json!([{ "key": "memory", "value": "4096", "pending": "8192" }, { "key": "cores", "value": 4 }])),
    );
    rig.api.expect_with(
        Put,
        &qemu(101, "/config"),
        &[("cores", "2"), ("revert", "memory"), ("digest", "d7")],
        |request| {
            assert!(
                !request.params.iter().any(|(k, _)| k == "memory"),
                "a pending change is reverted, not overwritten: {:?}",
                request.params
            );
            Ok(serde_json::Value::Null)
        },
    );
    rig.api.expect(
        Get,
        &qemu(101, "/pending"),
        Ok(json!([{ "key": "cores", "value": 2 }])),
    );
    let mut run = HostRun {
        env: &rig.env,
        store: &rig.store,
        deployment: "uni",
        desired: Some(&host),
        ctx: &ctx,
        record: Some(present),
        running: true,
        uptime: 600,
        wake_after: None,
    };

    let found = run.scan_drift().await.expect("no error");

    rig.api.assert_done();
    let keys: Vec<&str> = found.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, vec!["cores", "memory"]);
    assert_eq!(found[1].1, "8192", "the value found is reported");
    assert_eq!(rig.stored().expect("saved").pending, Vec::<String>::new());
}

/// A config that matches what the plan wants for `host()`, with our tags.
fn converged_config() -> Result<serde_json::Value, ProxmoxError> {
    Ok(json!({
        "name": "uni-mastodon",
        "tags": format!("fediversity;{OWNER}"),
        "cores": 2,
        "memory": "4096",
        "net0": "virtio=BC:24:11:00:00:01,bridge=vmbr0",
        "ipconfig0": "ip=dhcp",
        "ciuser": "root",
        "agent": "1",
        "digest": "d8"
    }))
}

#[tokio::test(start_paused = true)]
async fn a_vm_of_ours_found_without_a_record_is_adopted_and_never_cloned() {
    let rig = rig();
    let (host, ctx) = (host(), ctx(DeletionPolicy::Retain));
    let steps = plan::plan_host(&host, None, &[template(), ours(107, true)], &ctx).steps;
    assert_eq!(
        steps,
        vec![
            Step::Adopt {
                vmid: 107,
                node: NODE.into()
            },
            Step::Configure,
            Step::ReportPending,
            Step::AwaitAgent
        ]
    );
    // Its config is what we want already: nothing is written.
    rig.api
        .expect(Get, &qemu(107, "/config"), converged_config())
        .expect(Get, &qemu(107, "/pending"), Ok(json!([])))
        .expect(
            Get,
            &qemu(107, "/agent/network-get-interfaces"),
            agent_answer("192.0.2.17"),
        );

    let ran = rig.run(Some(&host), &ctx, None, true, steps).await;

    assert_eq!(ran.outcome.expect("no error"), HostOutcome::Done);
    rig.api.assert_done();
    assert!(rig.api.calls().iter().all(|c| c.method == Get), "only reads");
    let stored = rig.stored().expect("adopted");
    assert_eq!((stored.vmid, stored.phase), (107, RecordPhase::Present));
    assert_eq!(stored.configured.as_deref(), Some("h1"));
    assert_eq!(stored.address.as_deref(), Some("192.0.2.17"));
}

#[tokio::test(start_paused = true)]
async fn pending_cpu_changes_restart_the_vm_only_when_restarts_are_allowed() {
    let mut pending = record(101, RecordPhase::Present);
    pending.pending = vec!["cores".into()];
    pending.address = Some("192.0.2.10".into());
    let host = host();

    // Not allowed: said in status, nothing is called.
    let quiet = rig();
    let ran = quiet
        .run(
            Some(&host),
            &ctx(DeletionPolicy::Retain),
            Some(pending.clone()),
            true,
            vec![Step::ReportPending],
        )
        .await;
    match ran.outcome.expect("not an error") {
        HostOutcome::Waiting { reason, message } => {
            assert_eq!(reason, reasons::PENDING_RESTART);
            assert!(
                message.contains(crate::api::ALLOW_RESTART_ANNOTATION),
                "{message}"
            );
        }
        other => panic!("expected a wait, got {other:?}"),
    }
    assert!(quiet.api.calls().is_empty());

    // Allowed: stop, start, and the new address.
    let rig = rig();
    let mut allowed = ctx(DeletionPolicy::Retain);
    allowed.allow_restart = true;
    expect_task(&rig.api, Post, &qemu(101, "/status/stop"), 101, "qmstop", "OK");
    expect_task(&rig.api, Post, &qemu(101, "/status/start"), 101, "qmstart", "OK");
    rig.api.expect(
        Get,
        &qemu(101, "/agent/network-get-interfaces"),
        agent_answer("192.0.2.12"),
    );
    let ran = rig
        .run(Some(&host), &allowed, Some(pending), true, vec![Step::Restart])
        .await;
    assert_eq!(ran.outcome.expect("no error"), HostOutcome::Done);
    rig.api.assert_done();
    let stored = rig.stored().expect("kept");
    assert!(stored.pending.is_empty());
    assert_eq!(stored.address.as_deref(), Some("192.0.2.12"));
}

#[tokio::test(start_paused = true)]
async fn a_locked_vm_is_waited_for_without_a_single_call() {
    let rig = rig();
    let (host, ctx) = (host(), ctx(DeletionPolicy::Retain));
    let mut locked = ours(101, false);
    locked.lock = Some("backup".into());
    let steps = plan::plan_host(&host, Some(&record(101, RecordPhase::Present)), &[locked], &ctx).steps;
    assert_eq!(
        steps,
        vec![Step::AwaitUnlock {
            lock: "backup".into()
        }]
    );

    let ran = rig
        .run(
            Some(&host),
            &ctx,
            Some(record(101, RecordPhase::Present)),
            false,
            steps,
        )
        .await;

    match ran.outcome.expect("not an error") {
        HostOutcome::Waiting { reason, .. } => assert_eq!(reason, reasons::VM_LOCKED),
        other => panic!("expected a wait, got {other:?}"),
    }
    assert!(rig.api.calls().is_empty());
}

#[tokio::test(start_paused = true)]
async fn removal_under_retain_orphans_the_vm_and_forgets_one_already_gone_without_a_call() {
    let rig = rig();
    let ctx = ctx(DeletionPolicy::Retain);
    let present = record(101, RecordPhase::Present);
    rig.store
        .put_inventory(&record_key("lab", "uni", "mastodon"), &present)
        .unwrap();
    let steps = plan::plan_removal(&present, &[ours(101, true)], &ctx).steps;
    assert_eq!(steps, vec![Step::Orphan]);
    let ran = rig.run(None, &ctx, Some(present.clone()), true, steps).await;
    assert_eq!(ran.outcome.expect("no error"), HostOutcome::Removed);
    assert_eq!(rig.stored().map(|r| r.phase), Some(RecordPhase::Orphaned));

    let steps = plan::plan_removal(&present, &[template()], &ctx).steps;
    assert_eq!(steps, vec![Step::Forget]);
    let ran = rig.run(None, &ctx, Some(present), false, steps).await;
    assert_eq!(ran.outcome.expect("no error"), HostOutcome::Removed);
    assert_eq!(rig.stored(), None);
    assert!(rig.api.calls().is_empty(), "a VM kept is never touched");
}

#[tokio::test(start_paused = true)]
async fn a_full_vmid_range_and_a_missing_template_are_errors_and_nothing_is_cloned() {
    let (host, ctx) = (host(), ctx(DeletionPolicy::Retain));
    let full: Vec<VmResource> = std::iter::once(template())
        .chain((100..=199).map(|vmid| VmResource {
            vmid,
            node: NODE.into(),
            name: Some(format!("other-{vmid}")),
            ..VmResource::default()
        }))
        .collect();
    let exhausted = rig();
    exhausted.api.expect(Get, "/cluster/resources", listing(&full));
    let ran = exhausted
        .run(Some(&host), &ctx, None, false, vec![Step::Allocate])
        .await;
    match ran.outcome {
        Err(e @ LifecycleError::RangeExhausted { start: 100, end: 199 }) => {
            assert!(e.to_string().contains("100-199"), "{e}");
        }
        other => panic!(
            "expected an exhausted range, got {:?}",
            other.map_err(|e| e.to_string())
        ),
    }
    exhausted.api.assert_done();
    assert_eq!(exhausted.stored(), None, "no intent without a VMID");

    let rig = rig();
    rig.api.expect(Get, "/cluster/resources", Ok(json!([])));
    let ran = rig
        .run(Some(&host), &ctx, None, false, vec![Step::Allocate])
        .await;
    assert!(
        matches!(ran.outcome, Err(LifecycleError::TemplateMissing(9000))),
        "{:?}",
        ran.outcome.map_err(|e| e.to_string())
    );
    rig.api.assert_done();
    assert_eq!(rig.calls_to("/clone"), 0);
}
