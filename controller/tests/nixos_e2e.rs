//! NixOS host convergence on real Nix and real OpenSSH: each host an sshd on a loopback address in its
//! own mount namespace with its own `/nix`.

mod nixos_support;

use std::time::{Duration, Instant};

use fediversity::api::{Application, RuntimeEnvironment};
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
