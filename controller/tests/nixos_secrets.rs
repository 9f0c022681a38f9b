//! Secrets of the environment reach a real host (sshd, its own `/nix`) as files with the owner and
//! mode the system asks for, and never the Nix store, the controller's state, status or logs.

mod nixos_support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use fediversity::api::{Object, RuntimeEnvironment};
use fediversity::nixos::{DeployResult, HostAddress, HostRequest};
use nixos_support::{Lab, NIX_CONFIG, SECRETS_DIR, application};
use serde_json::{Map, json};

/// Text that must never leave the secret files.
const SMTP_CANARY: &str = "smtp-canary-7d1f0c9e2b";
const S3_CANARY: &str = "s3-canary-93ab41e5c0";

fn environment(lab: &Lab, hosts: &[&nixos_support::TestHost]) -> RuntimeEnvironment {
    let smtp = lab.path().join("smtp-password");
    std::fs::write(&smtp, format!("{SMTP_CANARY}\n")).unwrap();
    let s3 = lab.path().join("s3.env");
    std::fs::write(
        &s3,
        format!("AWS_ACCESS_KEY_ID=lab\nAWS_SECRET_ACCESS_KEY={S3_CANARY}\n"),
    )
    .unwrap();
    let text = lab.environment_yaml("lab", hosts).replace(
        "  staticHosts:\n",
        &format!(
            "  smtp: {{ host: smtp.lab.example, user: mailer, passwordFile: {}, from: noreply@lab.example }}\n  \
objectStorage: {{ endpoint: \"https://s3.lab.example\", bucket: media, credentialsFile: {} }}\n  staticHosts:\n",
            smtp.display(),
            s3.display()
        ),
    );
    let docs = fediversity::yaml::parse_documents(&text, &fediversity::yaml::Limits::default()).unwrap();
    match fediversity::api::parse_object(&docs[0].1).unwrap() {
        Object::RuntimeEnvironment(e) => e,
        other => panic!("not a RuntimeEnvironment: {other:?}"),
    }
}

/// Every file under `dir` whose content contains `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(meta) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(p);
            } else if meta.is_file()
                && std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
            {
                found.push(p.display().to_string());
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_arrive_as_files_with_their_owner_and_mode_and_never_in_the_closure_state_or_status() {
    let lab = Lab::new();
    let alpha = lab.host("alpha");
    let env = environment(&lab, &[&alpha]);
    let deployer = lab.deployer(Duration::from_secs(60));
    let app = application("alpha");
    let settings: Map<String, serde_json::Value> = json!({"message": "hello"}).as_object().unwrap().clone();
    let address = HostAddress {
        address: alpha.address.clone(),
        port: alpha.port,
        host_key: alpha.host_key.clone(),
    };
    let status = deployer
        .converge(&HostRequest {
            environment: "lab",
            env: &env.spec,
            host_name: &alpha.name,
            application_name: "alpha",
            application: &app.spec,
            fqdn: "alpha.lab.example",
            settings: &settings,
            admin_email: None,
            address: &address,
        })
        .await;
    assert_eq!(status.last_result, DeployResult::Applied, "{}", status.message);
    assert!(
        status.step_seconds.iter().any(|(s, _)| s == "secrets"),
        "{:?}",
        status.step_seconds
    );

    // On the host: a root-owned, traversable folder; each file with the owner, mode and content asked.
    let dir = alpha.root.join(SECRETS_DIR.trim_start_matches('/'));
    let meta = std::fs::metadata(&dir).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (0, 0));
    assert_eq!(meta.permissions().mode() & 0o7777, 0o711);
    for (name, content) in [
        ("smtp-password", format!("{SMTP_CANARY}\n")),
        (
            "object-storage-credentials",
            format!("AWS_ACCESS_KEY_ID=lab\nAWS_SECRET_ACCESS_KEY={S3_CANARY}\n"),
        ),
    ] {
        let file = dir.join(name);
        let meta = std::fs::metadata(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534), "{name}: nobody:nogroup");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o440, "{name}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), content, "{name}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    // The system's closure, as real Nix lists it, holds the secrets' paths but never their content.
    let system = status.desired_system.clone().unwrap();
    let out = Command::new("nix-store")
        .args(["--query", "--requisites", &system])
        .env("NIX_CONFIG", NIX_CONFIG)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let closure: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(!closure.is_empty());
    let mut paths_seen = false;
    for path in &closure {
        for canary in [SMTP_CANARY, S3_CANARY] {
            let hits = files_containing(Path::new(path), canary);
            assert!(hits.is_empty(), "a secret is in the Nix store: {hits:?}");
        }
        paths_seen |= !files_containing(Path::new(path), &format!("{SECRETS_DIR}/smtp-password")).is_empty();
    }
    assert!(
        paths_seen,
        "the system refers to the secret by its path on the host"
    );
    // Nor the host's own store, the controller's state (configurations, GC roots) or the status.
    for root in [alpha.root.join("nix/store"), lab.path().join("state")] {
        for canary in [SMTP_CANARY, S3_CANARY] {
            let hits = files_containing(&root, canary);
            assert!(
                hits.is_empty(),
                "a secret leaked into {}: {hits:?}",
                root.display()
            );
        }
    }
    let shown = serde_json::to_string(&status).unwrap();
    assert!(
        !shown.contains(SMTP_CANARY) && !shown.contains(S3_CANARY),
        "{shown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_secret_file_stops_the_deploy_naming_the_field_not_the_content() {
    let lab = Lab::new();
    let alpha = lab.host("alpha");
    let mut env = environment(&lab, &[&alpha]);
    env.spec.smtp.as_mut().unwrap().password_file = Some(lab.path().join("missing").display().to_string());
    let deployer = lab.deployer(Duration::from_secs(60));
    let app = application("alpha");
    let settings = Map::new();
    let address = HostAddress {
        address: alpha.address.clone(),
        port: alpha.port,
        host_key: alpha.host_key.clone(),
    };
    let status = deployer
        .converge(&HostRequest {
            environment: "lab",
            env: &env.spec,
            host_name: &alpha.name,
            application_name: "alpha",
            application: &app.spec,
            fqdn: "alpha.lab.example",
            settings: &settings,
            admin_email: None,
            address: &address,
        })
        .await;
    assert_eq!(status.last_result, DeployResult::Failed, "{}", status.message);
    assert!(
        status.message.contains("spec.smtp.passwordFile"),
        "{}",
        status.message
    );
    assert_eq!(alpha.profile(), None, "nothing was activated without its secrets");
}
