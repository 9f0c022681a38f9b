//! NixOS host convergence on real Nix and real OpenSSH: each host an sshd on a loopback address in its
//! own mount namespace with its own `/nix`.

mod nixos_support;

use std::time::{Duration, Instant};

use fediversity::api::{Application, RuntimeEnvironment};
use fediversity::nixos::host::{Generation, NixHost, StorePath};
use fediversity::nixos::{DeployResult, HostAddress, HostDeployStatus, HostRequest, NixosDeployer};
use nixos_support::{Lab, TestHost, application};
use serde_json::{Map, Value, json};

const HOSTILE: &str = r#""; ${builtins.readFile "/etc/passwd"} ""#;

async fn deploy(
    deployer: &NixosDeployer,
    env: &RuntimeEnvironment,
    host: &TestHost,
    app: &Application,
    settings: Value,
) -> HostDeployStatus {
    let settings: Map<String, Value> = settings.as_object().unwrap().clone();
    let address = HostAddress {
        address: host.address.clone(),
        port: host.port,
        host_key: host.host_key.clone(),
    };
    let fqdn = format!("{}.lab.example", app.metadata.name);
    let started = Instant::now();
    let status = deployer
        .converge(&HostRequest {
            environment: "lab",
            env: &env.spec,
            host_name: &host.name,
            application_name: app.metadata.name.as_str(),
            application: &app.spec,
            fqdn: &fqdn,
            settings: &settings,
            admin_email: Some("admin@lab.example"),
            address: &address,
        })
        .await;
    eprintln!(
        "{}: {:?} in {:.2} s, steps {:?}: {}",
        host.name,
        status.last_result,
        started.elapsed().as_secs_f64(),
        status.step_seconds,
        status.message
    );
    status
}

fn steps(status: &HostDeployStatus) -> Vec<&str> {
    status.step_seconds.iter().map(|(s, _)| s.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_converge_then_a_second_pass_is_a_no_op_and_one_changed_setting_touches_only_its_host() {
    let lab = Lab::new();
    let (alpha, beta) = (lab.host("alpha"), lab.host("beta"));
    let env = lab.environment(&[&alpha, &beta]);
    let deployer = lab.deployer(Duration::from_secs(60));
    let (app_a, app_b) = (application("alpha"), application("beta"));

    let (a, b) = tokio::join!(
        deploy(&deployer, &env, &alpha, &app_a, json!({"message": "one"})),
        deploy(&deployer, &env, &beta, &app_b, json!({"message": "one"})),
    );
    for (host, s) in [(&alpha, &a), (&beta, &b)] {
        assert_eq!(s.last_result, DeployResult::Applied, "{}", s.message);
        assert!(s.rebuilt && s.changed, "{s:?}");
        let system = s.desired_system.clone().unwrap();
        assert_eq!(s.current_system.as_deref(), Some(system.as_str()));
        assert_eq!(host.profile(), Some(("system-1-link".into(), system.clone())));
        assert_eq!(host.activated(), Some(system.clone()));
        assert!(host.has(&system), "the closure is in {}'s own store", host.name);
    }

    let (a2, b2) = tokio::join!(
        deploy(&deployer, &env, &alpha, &app_a, json!({"message": "one"})),
        deploy(&deployer, &env, &beta, &app_b, json!({"message": "one"})),
    );
    for s in [&a2, &b2] {
        assert_eq!(s.last_result, DeployResult::Applied, "{}", s.message);
        assert!(!s.rebuilt && !s.changed, "{s:?}");
        assert_eq!(steps(s), ["build", "inspect"], "no copy, no activation");
    }

    let (a3, b3) = tokio::join!(
        deploy(&deployer, &env, &alpha, &app_a, json!({"message": "two"})),
        deploy(&deployer, &env, &beta, &app_b, json!({"message": "one"})),
    );
    assert_eq!(a3.last_result, DeployResult::Applied, "{}", a3.message);
    assert!(a3.rebuilt && a3.changed);
    assert_ne!(a3.desired_system, a.desired_system);
    assert_eq!(alpha.profile().unwrap().0, "system-2-link");
    assert_eq!(alpha.activated(), a3.desired_system);
    assert!(!b3.rebuilt && !b3.changed, "{b3:?}");
    assert_eq!(beta.profile().unwrap().0, "system-1-link");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activation_that_exits_non_zero_is_rolled_back_and_the_previous_system_is_current_again() {
    let lab = Lab::new();
    let alpha = lab.host("alpha");
    let env = lab.environment(&[&alpha]);
    let deployer = lab.deployer(Duration::from_secs(60));
    let app = application("alpha");
    let good = deploy(&deployer, &env, &alpha, &app, json!({"activation": "ok"})).await;
    assert_eq!(good.last_result, DeployResult::Applied, "{}", good.message);
    let good_system = good.desired_system.clone().unwrap();

    let bad = deploy(&deployer, &env, &alpha, &app, json!({"activation": "fail"})).await;
    assert_eq!(bad.last_result, DeployResult::FailedRolledBack, "{}", bad.message);
    assert!(bad.message.contains("exited with code 4"), "{}", bad.message);
    assert_eq!(bad.current_system.as_deref(), Some(good_system.as_str()));
    assert_eq!(
        alpha.profile(),
        Some(("system-1-link".into(), good_system.clone()))
    );
    assert_eq!(
        alpha.activated(),
        Some(good_system),
        "the previous system was activated again"
    );
    assert!(
        !alpha.root.join("nix/var/nix/profiles/system-2-link").exists(),
        "the failed generation is deleted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activation_that_kills_sshd_is_rolled_back_by_the_hosts_own_timer() {
    let lab = Lab::new();
    let alpha = lab.host("alpha");
    let env = lab.environment(&[&alpha]);
    // Long enough for the good deploy to be confirmed on a loaded machine (SSH round trips ~1 s each).
    let deployer = lab.deployer(Duration::from_secs(12));
    let app = application("alpha");
    let good = deploy(&deployer, &env, &alpha, &app, json!({"activation": "ok"})).await;
    assert_eq!(good.last_result, DeployResult::Applied, "{}", good.message);
    let good_system = good.desired_system.clone().unwrap();

    let cut = deploy(&deployer, &env, &alpha, &app, json!({"activation": "cut"})).await;
    assert_eq!(
        cut.last_result,
        DeployResult::UnconfirmedRolledBack,
        "{}",
        cut.message
    );
    assert!(
        cut.message.contains("rolled itself back to generation 1"),
        "{}",
        cut.message
    );
    assert_eq!(cut.current_system.as_deref(), Some(good_system.as_str()));
    assert_eq!(
        alpha.profile(),
        Some(("system-1-link".into(), good_system.clone()))
    );
    assert_eq!(alpha.activated(), Some(good_system));
    // The rollback brought SSH back: the host is reachable and converged again.
    let again = deploy(&deployer, &env, &alpha, &app, json!({"activation": "ok"})).await;
    assert_eq!(
        (again.last_result, again.changed),
        (DeployResult::Applied, false),
        "{}",
        again.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_host_key_stops_the_deploy_with_a_clear_error() {
    let lab = Lab::new();
    let alpha = lab.host("alpha");
    // Another machine's key, pinned for alpha: as if alpha had been replaced by an impostor.
    let impostor = lab.host("impostor");
    let env = lab.environment(&[&alpha]);
    let deployer = lab.deployer(Duration::from_secs(60));
    let app = application("alpha");
    let mut wrong_key = TestHostView::of(&alpha);
    wrong_key.host_key = impostor.host_key.clone();
    let status = wrong_key.deploy(&deployer, &env, &app).await;
    assert_eq!(status.last_result, DeployResult::Failed, "{}", status.message);
    assert_eq!(
        status.message,
        "the SSH host key of alpha is not the pinned one: deploy stopped (check the machine, then update the pinned key)"
    );
    assert_eq!(alpha.profile(), None, "nothing changed on the host");
    assert!(
        !alpha.has(status.desired_system.as_deref().unwrap()),
        "nothing was copied"
    );
}

/// A host as the controller sees it (address and pinned key), to pin a wrong key.
struct TestHostView {
    name: String,
    address: String,
    port: u16,
    host_key: String,
}

impl TestHostView {
    fn of(h: &TestHost) -> Self {
        Self {
            name: h.name.clone(),
            address: h.address.clone(),
            port: h.port,
            host_key: h.host_key.clone(),
        }
    }

    async fn deploy(
        &self,
        deployer: &NixosDeployer,
        env: &RuntimeEnvironment,
        app: &Application,
    ) -> HostDeployStatus {
        let settings = Map::new();
        let address = HostAddress {
            address: self.address.clone(),
            port: self.port,
            host_key: self.host_key.clone(),
        };
        deployer
            .converge(&HostRequest {
                environment: "lab",
                env: &env.spec,
                host_name: &self.name,
                application_name: app.metadata.name.as_str(),
                application: &app.spec,
                fqdn: "alpha.lab.example",
                settings: &settings,
                admin_email: None,
                address: &address,
            })
            .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_setting_arrives_on_the_host_as_exactly_its_literal_text() {
    let lab = Lab::new();
    let alpha = lab.host("alpha");
    let env = lab.environment(&[&alpha]);
    let deployer = lab.deployer(Duration::from_secs(60));
    let app = application("alpha");
    let status = deploy(&deployer, &env, &alpha, &app, json!({"message": HOSTILE})).await;
    assert_eq!(status.last_result, DeployResult::Applied, "{}", status.message);
    let system = status.desired_system.unwrap();
    let on_host = alpha.settings_json(&system);
    assert_eq!(on_host["alpha"]["settings"]["message"], json!(HOSTILE));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_health_check_rolls_back_the_activation() {
    let lab = Lab::new();
    let alpha = lab.host("alpha");
    let env = lab.environment(&[&alpha]);
    let deployer = lab.deployer(Duration::from_secs(60));
    let app = application("alpha");
    let good = deploy(&deployer, &env, &alpha, &app, json!({"message": "up"})).await;
    assert_eq!(good.last_result, DeployResult::Applied, "{}", good.message);
    lab.http_status.store(503, std::sync::atomic::Ordering::SeqCst);
    let bad = deploy(&deployer, &env, &alpha, &app, json!({"message": "down"})).await;
    assert_eq!(bad.last_result, DeployResult::FailedRolledBack, "{}", bad.message);
    assert!(
        bad.message.contains("HTTP check answered 503 (expected 200)"),
        "{}",
        bad.message
    );
    assert_eq!(alpha.profile().map(|p| p.1), good.desired_system);
}

/// The `armed-*` markers in the host's deploy folder: rollbacks still waiting to fire.
fn armed(host: &TestHost) -> Vec<String> {
    std::fs::read_dir(host.root.join("nix/var/fediversity-deploy"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("armed-"))
                .collect()
        })
        .unwrap_or_default()
}

fn generation(host: &TestHost) -> Generation {
    let (link, path) = host.profile().expect("a profile");
    Generation {
        number: link
            .trim_start_matches("system-")
            .trim_end_matches("-link")
            .parse()
            .unwrap(),
        path: StorePath::new(&path).unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_a_stopped_run_left_unconfirmed_is_finished_or_undone_and_its_timer_never_undoes_a_later_deploy()
 {
    let lab = Lab::new();
    let alpha = lab.host("alpha");
    let env = lab.environment(&[&alpha]);
    let deployer = lab.deployer(Duration::from_secs(60));
    let app = application("alpha");
    let (one, two) = (json!({"message": "one"}), json!({"message": "two"}));
    // System A, then B, then A again: both closures are on the host, A runs.
    let a = deploy(&deployer, &env, &alpha, &app, one.clone()).await;
    let b = deploy(&deployer, &env, &alpha, &app, two.clone()).await;
    let a_again = deploy(&deployer, &env, &alpha, &app, one.clone()).await;
    for s in [&a, &b, &a_again] {
        assert_eq!(s.last_result, DeployResult::Applied, "{}", s.message);
    }
    let (system_a, system_b) = (a.desired_system.unwrap(), b.desired_system.unwrap());
    let host = lab.ssh_host(&alpha);

    // A run that armed a deploy of B, pointed the profile at it and stopped before activating.
    let before = generation(&alpha);
    host.arm_rollback("cut-1", Some(&before), Duration::from_secs(25))
        .await
        .unwrap();
    host.set_profile(&StorePath::new(&system_b).unwrap())
        .await
        .unwrap();
    let armed_at = Instant::now();
    assert_eq!(alpha.activated().as_deref(), Some(system_a.as_str()));
    let resumed = deploy(&deployer, &env, &alpha, &app, two.clone()).await;
    assert_eq!(resumed.last_result, DeployResult::Applied, "{}", resumed.message);
    assert!(resumed.changed, "{resumed:?}");
    assert_eq!(
        steps(&resumed),
        ["build", "inspect", "activate", "activate", "confirm", "confirm"],
        "the left deploy is finished: activated, confirmed, disarmed; nothing copied, armed or set again"
    );
    assert_eq!(alpha.activated().as_deref(), Some(system_b.as_str()));
    assert!(
        armed(&alpha).is_empty(),
        "no rollback left armed: {:?}",
        armed(&alpha)
    );
    // Past the left deploy's timer: B is still what the profile points at and what runs.
    tokio::time::sleep(Duration::from_secs(27).saturating_sub(armed_at.elapsed())).await;
    assert_eq!(alpha.profile().unwrap().1, system_b);
    assert_eq!(alpha.activated().as_deref(), Some(system_b.as_str()));

    // A run that armed a deploy (of A, over B) and stopped before changing the profile; the next run
    // deploys A. The left rollback is undone first, so its timer cannot switch the host back to B.
    let before = generation(&alpha);
    host.arm_rollback("cut-2", Some(&before), Duration::from_secs(12))
        .await
        .unwrap();
    let armed_at = Instant::now();
    let to_a = deploy(&deployer, &env, &alpha, &app, one).await;
    assert_eq!(to_a.last_result, DeployResult::Applied, "{}", to_a.message);
    assert_eq!(steps(&to_a)[..3], ["build", "inspect", "rollback"]);
    assert!(
        armed(&alpha).is_empty(),
        "no rollback left armed: {:?}",
        armed(&alpha)
    );
    tokio::time::sleep(Duration::from_secs(14).saturating_sub(armed_at.elapsed())).await;
    assert_eq!(
        alpha.profile().unwrap().1,
        system_a,
        "the left deploy's timer did not switch the host back"
    );
    assert_eq!(alpha.activated().as_deref(), Some(system_a.as_str()));
}
