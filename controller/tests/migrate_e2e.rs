//! Migration end to end on real parts: a Deployment with two applications moves between two
//! environments of test hosts (loopback sshd, real PostgreSQL, real files), copied with restic over
//! sftp, verified by manifest and database checksums, its name switched on a real BIND 9 `named`;
//! health failures and cancels leave the source serving; a runner killed twenty times completes.

mod backup_support;
mod bind_support;

use std::collections::BTreeMap;
use std::io::BufRead;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use backup_support::{DataHost, Lab, data_spec};
use bind_support::{Bind, ZONE};
use fediversity::api::{BackupSpec, DataSpec};
use fediversity::backup::{BackupTimeouts, Backuper, Repository, Shell};
use fediversity::dns::{Addresses, Decision, HickoryZone, ZoneClient, decide, host_name, owner_txt};
use fediversity::migrate::phase::{self, FailedTarget, RetirePolicy};
use fediversity::migrate::{AppMove, Migrator, Phase, SourceState, World, WorldError, record};
use fediversity::nixos::host::{SshHost, SshTarget, SshTimeouts};
use fediversity::store::Store;
use serde::{Deserialize, Serialize};

const INSTALLATION: &str = "migration-test-installation";

fn zone_spec(port: u16, key_file: &str) -> fediversity::api::DnsSpec {
    fediversity::api::DnsSpec {
        zone: ZONE.into(),
        server: fediversity::api::DnsServer {
            host: "127.0.0.1".into(),
            port,
        },
        tsig: fediversity::api::TsigSpec {
            key_name: "fediversity-key".into(),
            algorithm: fediversity::api::TsigAlgorithm::HmacSha256,
            secret_file: key_file.into(),
        },
        ttl: 60,
        address_source: fediversity::api::AddressSource::GuestAgent,
        nat: Default::default(),
        resolver: None,
    }
}

// ---------------------------------------------------------------- the two environments

/// How to reach one host (serialisable, so a separate runner process can rebuild the world).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Side {
    name: String,
    address: String,
    port: u16,
    identity: PathBuf,
    known_hosts: PathBuf,
}

impl Side {
    fn of(lab: &Lab, host: &DataHost) -> Self {
        drop(host.ssh()); // writes the host's known_hosts
        Self {
            name: host.name.clone(),
            address: host.address.clone(),
            port: host.port,
            identity: lab.path().join("id_ed25519"),
            known_hosts: host.root.join("known_hosts"),
        }
    }

    fn ssh(&self) -> SshHost {
        SshHost::new(
            SshTarget {
                name: self.name.clone(),
                user: "root".into(),
                address: self.address.clone(),
                port: self.port,
                identity_file: self.identity.clone(),
                known_hosts: self.known_hosts.clone(),
            },
            SshTimeouts {
                connect: Duration::from_secs(5),
                keep_alive: Duration::from_secs(5),
                command: Duration::from_secs(120),
                copy: Duration::from_secs(120),
            },
        )
        .unwrap()
    }
}

/// Everything a runner needs: the moves, both sides, the repository, the store, the zone.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Plan {
    apps: Vec<(String, String, DataSpec)>,
    sources: Vec<Side>,
    targets: Vec<Side>,
    backup: BackupSpec,
    state: PathBuf,
    dns_port: u16,
    dns_key: String,
    journal: PathBuf,
    grace_ms: u64,
}

/// The simulated provider: hosts exist; "services" are a marker file outside the data paths that
/// the health check reads; names live on BIND; every create, destroy and removal is journalled.
struct LabWorld {
    plan: Plan,
    sources: BTreeMap<String, SshHost>,
    targets: BTreeMap<String, SshHost>,
    zone: HickoryZone,
}

const SERVICE: &str = "/var/lib/service";

impl LabWorld {
    fn new(plan: Plan) -> Self {
        let sources = plan.sources.iter().map(|s| (s.name.clone(), s.ssh())).collect();
        let targets = plan.targets.iter().map(|s| (s.name.clone(), s.ssh())).collect();
        let zone = HickoryZone::new(&zone_spec(plan.dns_port, &plan.dns_key)).unwrap();
        Self {
            plan,
            sources,
            targets,
            zone,
        }
    }

    fn journal(&self, line: &str) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.plan.journal)
            .unwrap();
        writeln!(f, "{line}").unwrap();
    }

    fn address_of(&self, sides: &[Side], host: &str) -> std::net::IpAddr {
        sides
            .iter()
            .find(|s| s.name == host)
            .unwrap()
            .address
            .parse()
            .unwrap()
    }

    async fn sh(&self, shell: &SshHost, line: &str) -> Result<String, WorldError> {
        let out = shell
            .run("test step", line, None, Duration::from_secs(60))
            .await
            .map_err(|e| WorldError::transient(e.to_string()))?;
        if out.success() {
            Ok(out.stdout)
        } else {
            Err(WorldError::fatal(format!(
                "{} on {}: {}",
                line,
                shell.host_name(),
                out.stderr.trim()
            )))
        }
    }
}

impl World for LabWorld {
    type Shell = SshHost;

    fn applications(&self) -> Vec<AppMove> {
        self.plan
            .apps
            .iter()
            .map(|(application, host, data)| AppMove {
                application: application.clone(),
                host: host.clone(),
                data: data.clone(),
            })
            .collect()
    }

    fn source(&self, app: &AppMove) -> Result<&SshHost, WorldError> {
        self.sources
            .get(&app.host)
            .ok_or_else(|| WorldError::fatal("no source"))
    }

    fn target(&self, app: &AppMove) -> Result<&SshHost, WorldError> {
        self.targets
            .get(&app.host)
            .ok_or_else(|| WorldError::fatal("no target"))
    }

    async fn provision(&self, app: &AppMove) -> Result<(), WorldError> {
        let out = self
            .sh(
                self.target(app)?,
                &format!(
                    "mkdir -p {SERVICE}; rm -f {SERVICE}/serving; if [ ! -e {SERVICE}/id ]; then echo $$ >{SERVICE}/id.new; mv {SERVICE}/id.new {SERVICE}/id; echo created; fi"
                ),
            )
            .await?;
        if out.contains("created") {
            self.journal(&format!("created {}", app.host));
        }
        Ok(())
    }

    async fn source_services(&self, app: &AppMove, run: bool) -> Result<(), WorldError> {
        let line = if run {
            format!("mkdir -p {SERVICE}; touch {SERVICE}/serving")
        } else {
            format!("rm -f {SERVICE}/serving")
        };
        self.sh(self.source(app)?, &line).await.map(drop)
    }

    async fn start_target(&self, app: &AppMove) -> Result<(), WorldError> {
        let t = self.target(app)?;
        self.sh(t, &format!("touch {SERVICE}/serving")).await?;
        let check = format!(
            "test ! -e {SERVICE}/unhealthy || {{ echo 'HTTP 502 from the application' >&2; exit 1; }}"
        );
        let out = t
            .run("health check", &check, None, Duration::from_secs(30))
            .await
            .map_err(|e| WorldError::transient(e.to_string()))?;
        if out.success() {
            Ok(())
        } else {
            Err(WorldError::fatal(format!(
                "the health check of {} failed: {}",
                app.host,
                out.stderr.trim()
            )))
        }
    }

    async fn switch_names(&self, app: &AppMove) -> Result<(), WorldError> {
        let name = host_name(&app.host, ZONE);
        let want = Addresses::of([self.address_of(&self.plan.targets, &app.host)]);
        let seen = self
            .zone
            .observe(&name)
            .await
            .map_err(|e| WorldError::transient(e.to_string()))?;
        match decide(&name, Some(&want), &seen, &owner_txt(INSTALLATION, "op"), 60) {
            Decision::InSync => Ok(()),
            Decision::Apply(_, change) => self
                .zone
                .apply(&change)
                .await
                .map(drop)
                .map_err(|e| WorldError::transient(e.to_string())),
            Decision::Foreign(why) => Err(WorldError::transient(why)),
        }
    }

    async fn destroy_source(&self, app: &AppMove) -> Result<(), WorldError> {
        self.sh(self.source(app)?, &format!("touch {SERVICE}/destroyed"))
            .await?;
        self.journal(&format!("destroyed source {}", app.host));
        Ok(())
    }

    async fn remove_target(&self, app: &AppMove) -> Result<(), WorldError> {
        self.sh(self.target(app)?, &format!("rm -rf {SERVICE}")).await?;
        self.journal(&format!("removed target {}", app.host));
        Ok(())
    }
}

fn backuper() -> Backuper {
    Backuper::new(
        "/var/lib/fediversity-backup",
        BackupTimeouts {
            short: Duration::from_secs(60),
            long: Duration::from_secs(600),
        },
    )
}

fn migrator(plan: &Plan) -> Migrator {
    Migrator::new(backuper(), Repository::from_spec(&plan.backup).unwrap())
}

/// Two environments (a lab each), two applications, a zone whose names point at the source.
struct Rig {
    // Hosts first: they stop before their labs' folders go.
    src: Vec<DataHost>,
    dst: Vec<DataHost>,
    bind: Bind,
    plan: Plan,
    _state: tempfile::TempDir,
    _old: Lab,
    _new: Lab,
}

fn media_spec() -> DataSpec {
    DataSpec {
        paths: vec!["/var/lib/media".into()],
        databases: vec![],
        services: vec![],
    }
}

impl Rig {
    async fn new(grace_ms: u64) -> Self {
        let old = Lab::new();
        let new = Lab::new();
        let bind = Bind::start();
        let names = ["op-app", "op-media"];
        let src: Vec<DataHost> = names.iter().map(|n| old.host(n)).collect();
        let dst: Vec<DataHost> = names.iter().map(|n| new.host(n)).collect();
        // The source serves: the application's databases and files, the media host's files.
        src[0].seed_databases();
        src[0].seed_files();
        let media = src[1].var_lib("media");
        std::fs::create_dir_all(media.join("photos")).unwrap();
        for i in 0..40u8 {
            std::fs::write(media.join(format!("photos/{i}.jpg")), vec![i; 20_000]).unwrap();
        }
        for h in &src {
            h.sh(&format!("mkdir -p {SERVICE}; touch {SERVICE}/serving"));
        }
        let state = tempfile::tempdir().unwrap();
        let plan = Plan {
            apps: vec![
                ("app".into(), "op-app".into(), data_spec()),
                ("media".into(), "op-media".into(), media_spec()),
            ],
            sources: src.iter().map(|h| Side::of(&old, h)).collect(),
            targets: dst.iter().map(|h| Side::of(&new, h)).collect(),
            backup: old.backup_spec(),
            state: state.path().join("state"),
            dns_port: bind.port,
            dns_key: bind.key_file(),
            journal: state.path().join("journal"),
            grace_ms,
        };
        // The names point at the source, owned by this controller.
        let world = LabWorld::new(plan.clone());
        let owner = owner_txt(INSTALLATION, "op");
        for s in &plan.sources {
            let name = host_name(&s.name, ZONE);
            let want = Addresses::of([s.address.parse().unwrap()]);
            let Decision::Apply(_, change) = decide(&name, Some(&want), &Default::default(), &owner, 60)
            else {
                panic!("a free name is claimed")
            };
            world.zone.apply(&change).await.unwrap();
        }
        let store = Store::open(&plan.state).unwrap();
        let r = phase::begin(
            "op",
            "old",
            "new",
            RetirePolicy::Delete { grace_ms },
            FailedTarget::Remove,
            fediversity::migrate::run::now_ms(),
        );
        record::save(&store, &r).unwrap();
        drop(store);
        Self {
            src,
            dst,
            bind,
            plan,
            _state: state,
            _old: old,
            _new: new,
        }
    }

    fn world(&self) -> LabWorld {
        LabWorld::new(self.plan.clone())
    }

    fn journal(&self) -> String {
        std::fs::read_to_string(&self.plan.journal).unwrap_or_default()
    }

    /// Files and database checksums of each side's hosts, compared host by host.
    async fn assert_same_data(&self) {
        let b = backuper();
        for (i, (_, _, data)) in self.plan.apps.iter().enumerate() {
            let (fa, da) = b.live_state(&self.src[i].ssh(), data).await.unwrap();
            let (fb, db) = b.live_state(&self.dst[i].ssh(), data).await.unwrap();
            assert!(fa.files() > 0);
            assert_eq!(
                fediversity::backup::manifest::compare_files(&fa, &fb),
                Vec::<String>::new(),
                "{}",
                self.src[i].name
            );
            assert_eq!(fa.entries, fb.entries);
            assert_eq!(da.len(), data.databases.len());
            assert_eq!(da, db, "databases of {}", self.src[i].name);
        }
    }

    fn serving(host: &DataHost) -> bool {
        host.var_lib("service/serving").exists()
    }
}

/// Steps until the record reaches `phase` (asserting that it goes there without failing).
async fn step_until(m: &Migrator, world: &LabWorld, store: &Store, phase: Phase) {
    loop {
        let r = record::load(store, "op").unwrap().unwrap();
        if r.phase == phase {
            return;
        }
        assert!(!r.phase.is_terminal() && r.phase != Phase::RollingBack, "{r:?}");
        m.step(world, store, "op").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_with_two_applications_moves_with_its_data_and_later_writes_and_its_names_follow() {
    let rig = Rig::new(3_000).await;
    let world = rig.world();
    let m = migrator(&rig.plan);
    let store = Store::open(&rig.plan.state).unwrap();
    step_until(&m, &world, &store, Phase::StoppingSource).await;
    // Pre-copied: the target holds the data, its services held stopped; the source still serves.
    assert!(rig.dst[0].var_lib("app/large video.mp4").is_file());
    assert!(!Rig::serving(&rig.dst[0]) && Rig::serving(&rig.src[0]));
    // Writes to the source between the pre-copy and the stop.
    rig.src[0].psql(
        "app",
        "INSERT INTO events(body) SELECT 'after pre-copy ' || i FROM generate_series(1, 500) i; UPDATE customers SET name = 'renamed' WHERE id = 7;",
    );
    std::fs::write(rig.src[0].var_lib("app/media/after-pre-copy.txt"), "late write").unwrap();
    std::fs::write(rig.src[1].var_lib("media/photos/3.jpg"), "changed photo").unwrap();
    std::fs::remove_file(rig.src[1].var_lib("media/photos/4.jpg")).unwrap();

    let mut phases = Vec::new();
    let r = m
        .drive(&world, &store, "op", Duration::from_secs(30), |s| {
            phases.push(s.record.phase)
        })
        .await
        .unwrap();
    eprintln!("{r:#?}");
    assert_eq!(r.phase, Phase::Succeeded, "{r:?}");
    assert_eq!(
        phases,
        [
            Phase::FinalCopying,
            Phase::Verifying,
            Phase::StartingTarget,
            Phase::SwitchingNames,
            Phase::RetiringSource,
            Phase::Succeeded
        ]
    );
    assert!(r.verified);
    // Data equal on both sides, the late writes included.
    rig.assert_same_data().await;
    assert_eq!(
        rig.dst[0].psql(
            "app",
            "SELECT count(*) FROM events WHERE body LIKE 'after pre-copy %'"
        ),
        "500\n"
    );
    assert_eq!(
        rig.dst[0].psql("app", "SELECT name FROM customers WHERE id = 7"),
        "renamed\n"
    );
    assert_eq!(
        std::fs::read(rig.dst[0].var_lib("app/media/after-pre-copy.txt")).unwrap(),
        b"late write"
    );
    assert_eq!(
        std::fs::read(rig.dst[1].var_lib("media/photos/3.jpg")).unwrap(),
        b"changed photo"
    );
    assert!(!rig.dst[1].var_lib("media/photos/4.jpg").exists());
    // Bytes, downtime, names, retirement.
    assert!(r.bytes_pre_copied > 6 * 1024 * 1024, "{}", r.bytes_pre_copied);
    assert!(r.bytes_finally_copied > 0 && r.bytes_finally_copied < r.bytes_pre_copied);
    let downtime = phase::downtime_seconds(&r, 0).unwrap();
    let total = (r.finished_ms.unwrap() - r.started_ms) as f64 / 1000.0;
    assert!(downtime > 0.0 && downtime < total, "{downtime} of {total}");
    let status = serde_json::to_value(record::status(&r, 0)).unwrap();
    assert_eq!(status["downtimeSeconds"].as_f64(), Some(downtime));
    assert_eq!(status["source"], "Destroyed");
    for (s, t) in rig.src.iter().zip(&rig.dst) {
        assert_eq!(
            rig.bind.dig(&host_name(&s.name, ZONE), "A"),
            vec![t.address.clone()]
        );
        assert!(Rig::serving(t) && !Rig::serving(s));
        assert!(s.var_lib("service/destroyed").exists());
    }
    assert_eq!(r.source, SourceState::Destroyed);
    let journal = rig.journal();
    assert_eq!(journal.matches("created").count(), 2, "{journal}");
    assert_eq!(journal.matches("destroyed source").count(), 2, "{journal}");
    // The source was destroyed only after the grace period.
    let switched = r.downtime_ended_ms.unwrap();
    assert!(r.finished_ms.unwrap() >= switched + 3_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_failing_its_health_check_leaves_the_source_serving_with_its_data_and_status_says_why() {
    let rig = Rig::new(3_000).await;
    let world = rig.world();
    let m = migrator(&rig.plan);
    let store = Store::open(&rig.plan.state).unwrap();
    let before = backuper()
        .live_state(&rig.src[0].ssh(), &data_spec())
        .await
        .unwrap();
    // The new application answers 502.
    rig.dst[0].sh(&format!("mkdir -p {SERVICE}; touch {SERVICE}/unhealthy"));
    let r = m
        .drive(&world, &store, "op", Duration::from_secs(30), |_| {})
        .await
        .unwrap();
    assert_eq!(r.phase, Phase::Failed, "{r:?}");
    assert_eq!(r.failed_in, Some(Phase::StartingTarget));
    assert!(r.verified, "the data was verified before the start");
    let c = record::condition(&r, 0, 1);
    assert_eq!(c.reason, "MigrationFailed");
    assert!(c.message.contains("HTTP 502"), "{}", c.message);
    // The source serves again with its data untouched; its names never moved; the target is removed.
    for (s, t) in rig.src.iter().zip(&rig.dst) {
        assert!(Rig::serving(s), "{}", s.name);
        assert_eq!(
            rig.bind.dig(&host_name(&s.name, ZONE), "A"),
            vec![s.address.clone()]
        );
        assert!(!t.var_lib("service").exists());
        assert!(!s.var_lib("service/destroyed").exists());
    }
    let after = backuper()
        .live_state(&rig.src[0].ssh(), &data_spec())
        .await
        .unwrap();
    assert_eq!(before, after);
    assert_eq!(r.source, SourceState::Serving);
    assert!(r.downtime_ended_ms.is_some());
    assert_eq!(rig.journal().matches("removed target").count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reverting_the_environment_after_the_stop_cancels_and_the_source_serves_again() {
    let rig = Rig::new(3_000).await;
    let world = rig.world();
    let m = migrator(&rig.plan);
    let store = Store::open(&rig.plan.state).unwrap();
    step_until(&m, &world, &store, Phase::FinalCopying).await;
    assert!(!Rig::serving(&rig.src[0]), "the source is stopped by now");
    let r = record::load(&store, "op").unwrap().unwrap();
    let now = fediversity::migrate::run::now_ms();
    let cancelled = phase::desired_environment(&r, "old", now).unwrap().unwrap();
    record::save(&store, &cancelled).unwrap();
    let r = m
        .drive(&world, &store, "op", Duration::from_secs(30), |_| {})
        .await
        .unwrap();
    assert_eq!(r.phase, Phase::Cancelled, "{r:?}");
    assert!(
        r.reason
            .as_deref()
            .unwrap()
            .contains("set to old during FinalCopying")
    );
    for s in &rig.src {
        assert!(Rig::serving(s));
        assert_eq!(
            rig.bind.dig(&host_name(&s.name, ZONE), "A"),
            vec![s.address.clone()]
        );
    }
    assert!(phase::downtime_seconds(&r, 0).unwrap() > 0.0);
    assert_eq!(rig.journal().matches("removed target").count(), 2);
}

/// Run by the kill test in its own process: drives the migration of the plan in `MIGRATE_PLAN`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the runner process of the kill test; it runs only when that test starts it"]
async fn runner_process_of_the_kill_test() {
    let plan: Plan = serde_json::from_str(&std::env::var("MIGRATE_PLAN").unwrap()).unwrap();
    let world = LabWorld::new(plan.clone());
    let m = migrator(&plan);
    let store = Store::open(&plan.state).unwrap();
    let r = m
        .drive(&world, &store, "op", Duration::from_secs(60), |s| {
            eprintln!("step {} -> {}", s.before, s.record.phase)
        })
        .await
        .unwrap();
    assert_eq!(r.phase, Phase::Succeeded, "{r:?}");
}

#[test]
fn a_migration_runner_killed_twenty_times_at_random_points_completes_with_one_target_per_application() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let rig = rt.block_on(Rig::new(30_000));
    let plan = serde_json::to_string(&rig.plan).unwrap();
    let source_before: Vec<_> = rig
        .src
        .iter()
        .zip(&rig.plan.apps)
        .map(|(h, (_, _, data))| rt.block_on(backuper().live_state(&h.ssh(), data)).unwrap())
        .collect();
    let spawn = || {
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "runner_process_of_the_kill_test",
                "--nocapture",
            ])
            .env("MIGRATE_PLAN", &plan)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let store_phase = || {
        let store = Store::open(&rig.plan.state).unwrap();
        record::load(&store, "op").unwrap().unwrap()
    };
    let mut kills = 0;
    let mut seen = Vec::new();
    let mut target_ids: Vec<Option<String>> = vec![None; rig.dst.len()];
    let mut rng = fastrand::Rng::new();
    let started = Instant::now();
    while kills < 20 {
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "too slow: {kills} kills"
        );
        let mut child = spawn();
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.starts_with("step ") && tx.send(line).is_err() {
                    return;
                }
            }
        });
        // Random points: mostly within a step (a copy, a verification, a restore), sometimes just
        // after a step was persisted; after three kills in one phase, just past its end (so that the
        // kills spread over the phases however long each takes). While the source waits out its grace
        // period, only within the wait (the next step ends the migration).
        let last = seen.last().copied();
        let stuck = seen.len() >= 3 && seen[seen.len() - 3..].iter().all(|p| Some(*p) == last);
        if last != Some(Phase::RetiringSource) && (stuck || rng.u8(0..6) == 0) {
            let _ = rx.recv_timeout(Duration::from_secs(120));
            std::thread::sleep(Duration::from_millis(rng.u64(0..300)));
        } else {
            std::thread::sleep(Duration::from_millis(rng.u64(50..2_500)));
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        let r = store_phase();
        seen.push(r.phase);
        // One target per application: a target, once created, keeps the identity its creation wrote
        // (a second creation would write another). The runner's journal line comes after the remote
        // step, so a kill between the two can lose it; the target's own file cannot be lost.
        for (t, id) in rig.dst.iter().zip(&mut target_ids) {
            let now = std::fs::read_to_string(t.var_lib("service/id")).ok();
            match (&*id, now) {
                (Some(first), now) => assert_eq!(
                    now.as_deref(),
                    Some(first.as_str()),
                    "target {} re-created after kill {kills}",
                    t.name
                ),
                (None, now) => *id = now,
            }
        }
        // The source is intact until retirement: never destroyed before the grace period.
        for s in &rig.src {
            assert!(
                r.phase >= Phase::RetiringSource || !s.var_lib("service/destroyed").exists(),
                "after kill {kills} in {}",
                r.phase
            );
        }
    }
    println!("killed {kills} times, in phases {seen:?}");
    assert!(kills >= 20, "the migration ended after {kills} kills");
    assert!(seen.iter().any(|p| *p >= Phase::StoppingSource), "{seen:?}");
    // Let it finish undisturbed.
    let out = spawn().wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = store_phase();
    assert_eq!(r.phase, Phase::Succeeded, "{r:?}");
    assert!(r.verified);
    rt.block_on(rig.assert_same_data());
    // The source's data is as it was before the migration: only ever read.
    for ((h, (_, _, data)), before) in rig.src.iter().zip(&rig.plan.apps).zip(&source_before) {
        assert_eq!(
            &rt.block_on(backuper().live_state(&h.ssh(), data)).unwrap(),
            before
        );
    }
    let journal = rig.journal();
    assert!(journal.matches("created op-app").count() <= 1, "{journal}");
    assert!(journal.matches("created op-media").count() <= 1, "{journal}");
    for ((s, t), id) in rig.src.iter().zip(&rig.dst).zip(&target_ids) {
        let now = std::fs::read_to_string(t.var_lib("service/id")).ok();
        assert!(now.is_some(), "target {} has no identity", t.name);
        if id.is_some() {
            assert_eq!(&now, id, "target {} re-created after the kills", t.name);
        }
        assert_eq!(
            rig.bind.dig(&host_name(&s.name, ZONE), "A"),
            vec![t.address.clone()]
        );
        assert!(s.var_lib("service/destroyed").exists());
    }
}
