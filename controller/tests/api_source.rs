//! The API source end to end: `fediversity apply` and `delete` through the real daemon, with and
//! without the token, validation errors as precise as `validate`, objects of other sources refused,
//! persistence across restarts, and `spec.suspend`.

mod common;
mod sources_support;

use std::process::Command;
use std::time::Duration;

use sources_support::{api, cli, metric, ready, start_with, token_file, wait_for, wait_ready};

const TOKEN: &str = "api-token-for-tests";

/// A provider folder (environments and catalog) and a separate Deployment file an operator applies.
fn setup() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let provider = dir.path().join("provider");
    common::copy_examples(&provider);
    let deployment = dir.path().join("uni-utrecht.yaml");
    std::fs::rename(provider.join("deployments/uni-utrecht.yaml"), &deployment).unwrap();
    (dir, deployment)
}

fn with_token(args: &[&str], token: &std::path::Path) -> Vec<String> {
    let mut out: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    out.push("--token-file".into());
    out.push(token.display().to_string());
    out
}

fn run(daemon: &common::Daemon, args: &[String]) -> (i32, String) {
    cli(daemon, &args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn objects_are_applied_and_deleted_over_the_api_with_the_token_and_refused_without_it() {
    let (dir, deployment) = setup();
    let token = token_file(dir.path(), TOKEN);
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "not-the-token").unwrap();
    let state = tempfile::tempdir().unwrap();
    let args = [
        format!("--source=provider={}", dir.path().join("provider").display()),
        format!("--api-token-file={}", token.display()),
    ];
    let daemon = start_with(&args, state.path());
    wait_ready(&daemon);
    let file = deployment.to_str().unwrap();

    // Without a token, or with a wrong one: refused, nothing applied.
    let (code, out) = cli(&daemon, &["apply", "-f", file]);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("Authorization: Bearer") && out.contains("--token-file"),
        "{out}"
    );
    let (code, out) = run(&daemon, &with_token(&["apply", "-f", file], &wrong));
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("not valid") && !out.contains(TOKEN), "{out}");
    assert_eq!(
        api(&daemon, "deployments")["items"].as_array().map(Vec::len),
        Some(0)
    );

    // With it: created, then reconciled like any other object.
    let (code, out) = run(&daemon, &with_token(&["apply", "-f", file], &token));
    assert_eq!(code, 0, "{out}");
    assert_eq!(out, "deployment/uni-utrecht created\n");
    let d = api(&daemon, "deployments/uni-utrecht");
    assert_eq!(d["metadata"]["annotations"]["fediversity.eu/source-name"], "api");
    wait_for(
        "the applied Deployment to be Ready",
        Duration::from_secs(10),
        || {
            (ready(&api(&daemon, "deployments/uni-utrecht"))
                .map(|r| r.0)
                .as_deref()
                == Some("True"))
            .then_some(())
        },
    );
    let (_, out) = run(&daemon, &with_token(&["apply", "-f", file], &token));
    assert_eq!(out, "deployment/uni-utrecht unchanged\n");
    let text = std::fs::read_to_string(&deployment).unwrap();
    std::fs::write(&deployment, text.replace("social.uu.nl", "social.example.org")).unwrap();
    let (_, out) = run(&daemon, &with_token(&["apply", "-f", file], &token));
    assert_eq!(out, "deployment/uni-utrecht configured\n");
    wait_for("the change to be reconciled", Duration::from_secs(10), || {
        (api(&daemon, "deployments/uni-utrecht")["status"]["observedGeneration"] == 2).then_some(())
    });

    // Invalid objects: the same lines as `fediversity validate`, nothing applied.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        text.replace(
            "enabled: true            # no size",
            "enabled: yes            # no size",
        )
        .replace("email: social@uu.nl", "email: not-an-address"),
    )
    .unwrap();
    let (code, out) = run(
        &daemon,
        &with_token(&["apply", "-f", bad.to_str().unwrap()], &token),
    );
    assert_eq!(code, 1, "{out}");
    let validate = Command::new(env!("CARGO_BIN_EXE_fediversity"))
        .args(["validate", bad.to_str().unwrap()])
        .output()
        .unwrap();
    let validate = String::from_utf8_lossy(&validate.stdout);
    let problems: Vec<&str> = validate
        .lines()
        .filter(|l| l.starts_with(bad.to_str().unwrap()))
        .collect();
    assert!(!problems.is_empty(), "{validate}");
    for line in &problems {
        assert!(out.contains(line), "apply lacks `{line}`:\n{out}");
    }
    assert!(
        out.contains("spec.applications.pixelfed.enabled: expected a boolean"),
        "{out}"
    );
    assert_eq!(
        api(&daemon, "deployments/uni-utrecht")["spec"]["domain"],
        "social.example.org"
    );

    // Objects of the directory source can be neither changed nor deleted over the API.
    let catalog = dir.path().join("provider/applications/mastodon.yaml");
    let (code, out) = run(
        &daemon,
        &with_token(&["apply", "-f", catalog.to_str().unwrap()], &token),
    );
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("Application/mastodon belongs to source `provider`"),
        "{out}"
    );
    let (code, out) = run(
        &daemon,
        &with_token(&["delete", "application", "mastodon"], &token),
    );
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("belongs to source `provider`"), "{out}");

    // Applied objects survive a restart.
    drop(daemon);
    let daemon = start_with(&args, state.path());
    wait_ready(&daemon);
    assert_eq!(
        api(&daemon, "deployments/uni-utrecht")["spec"]["domain"],
        "social.example.org"
    );

    // Delete: refused without the token, done with it; the object goes through cleanup.
    let (code, out) = cli(&daemon, &["delete", "deployment", "uni-utrecht"]);
    assert_ne!(code, 0, "{out}");
    assert_eq!(
        api(&daemon, "deployments")["items"].as_array().map(Vec::len),
        Some(1)
    );
    let (code, out) = run(
        &daemon,
        &with_token(&["delete", "deployment", "uni-utrecht"], &token),
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(out, "deployment/uni-utrecht deleted\n");
    wait_for("the Deployment to be gone", Duration::from_secs(10), || {
        api(&daemon, "deployments")["items"]
            .as_array()
            .is_some_and(Vec::is_empty)
            .then_some(())
    });
    let (code, out) = run(
        &daemon,
        &with_token(&["delete", "deployment", "uni-utrecht"], &token),
    );
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("was not applied over the API"), "{out}");
    // The API source's own status.
    let sources = api(&daemon, "sources");
    let names: Vec<&str> = sources["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, vec!["provider", "api"]);
}

#[test]
fn a_daemon_without_a_token_file_refuses_every_write() {
    let (dir, deployment) = setup();
    let state = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), TOKEN);
    let daemon = start_with(
        &[format!("--source={}", dir.path().join("provider").display())],
        state.path(),
    );
    wait_ready(&daemon);
    let (code, out) = run(
        &daemon,
        &with_token(&["apply", "-f", deployment.to_str().unwrap()], &token),
    );
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("writes over the API are disabled"), "{out}");
}

#[test]
fn a_suspended_deployment_is_not_reconciled_and_shows_as_suspended() {
    let (dir, deployment) = setup();
    let token = token_file(dir.path(), TOKEN);
    let state = tempfile::tempdir().unwrap();
    let daemon = start_with(
        &[
            format!("--source={}", dir.path().join("provider").display()),
            format!("--api-token-file={}", token.display()),
        ],
        state.path(),
    );
    wait_ready(&daemon);
    let file = deployment.to_str().unwrap();
    let (code, out) = run(&daemon, &with_token(&["apply", "-f", file], &token));
    assert_eq!(code, 0, "{out}");
    wait_for("the Deployment to be Ready", Duration::from_secs(10), || {
        (api(&daemon, "deployments/uni-utrecht")["status"]["observedGeneration"] == 1).then_some(())
    });
    let series = "fediversity_suspend_status{kind=\"Deployment\",name=\"uni-utrecht\"}";
    wait_for(
        "the Ready Deployment's series to go",
        Duration::from_secs(10),
        || metric(&daemon, series).is_none().then_some(()),
    );

    // Suspended, and changed at the same time: the change is not reconciled.
    let text = std::fs::read_to_string(&deployment).unwrap();
    let suspended = text
        .replace("suspend: false", "suspend: true")
        .replace("social.uu.nl", "social.example.org");
    std::fs::write(&deployment, &suspended).unwrap();
    let (code, out) = run(&daemon, &with_token(&["apply", "-f", file], &token));
    assert_eq!(code, 0, "{out}");
    wait_for("the suspend metric", Duration::from_secs(10), || {
        (metric(&daemon, series) == Some(1.0)).then_some(())
    });
    let (code, table) = cli(&daemon, &["get", "deployments"]);
    assert_eq!(code, 0);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    let column = header.iter().position(|h| *h == "SUSPENDED").unwrap();
    assert_eq!(row[column], "true", "{table}");
    std::thread::sleep(Duration::from_millis(500));
    let d = api(&daemon, "deployments/uni-utrecht");
    assert_eq!(d["metadata"]["generation"], 2);
    assert_eq!(
        d["status"]["observedGeneration"], 1,
        "a suspended Deployment was reconciled: {d}"
    );
    assert!(
        d["status"]["endpoints"].to_string().contains("social.uu.nl"),
        "{d}"
    );

    // Resumed: the pending change is reconciled.
    std::fs::write(&deployment, suspended.replace("suspend: true", "suspend: false")).unwrap();
    let (code, out) = run(&daemon, &with_token(&["apply", "-f", file], &token));
    assert_eq!(code, 0, "{out}");
    wait_for(
        "the resumed Deployment to be reconciled",
        Duration::from_secs(10),
        || (api(&daemon, "deployments/uni-utrecht")["status"]["observedGeneration"] == 3).then_some(()),
    );
    wait_for(
        "the resumed Deployment's series to go",
        Duration::from_secs(10),
        || metric(&daemon, series).is_none().then_some(()),
    );
}
