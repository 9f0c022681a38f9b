//! A NixOS host switched to another system out of band is found on the next pass, switched back, and
//! reported: the Deployment's `Drifted` condition, a Warning event and a metric. The daemon runs in
//! this process on simulated NixOS hosts, so nothing is built and no machine is contacted.

mod common;

use std::sync::Arc;
use std::time::Duration;

use clap::Parser as _;
use fediversity::daemon::{Embedding, RunArgs};
use fediversity::nixos::host::StorePath;
use fediversity::nixos::simulated::Fleet;
use fediversity::nixos::{DeployTimings, Transport};
use fediversity::runtime::ShutdownState;
use serde_json::Value;

const ADDRESS: &str = "192.0.2.10";

#[derive(clap::Parser)]
struct Args {
    #[command(flatten)]
    run: RunArgs,
}

fn post(server: &str, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(server).ok()?;
    write!(
        stream,
        "POST {path} HTTP/1.0\r\nHost: {server}\r\nContent-Length: 0\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

fn get(server: &str, path: &str) -> Value {
    common::http_get(server, path)
        .and_then(|(_, body)| serde_json::from_str(&body).ok())
        .unwrap_or(Value::Null)
}

fn condition(object: &Value, type_: &str) -> Option<(String, String, String)> {
    let c = object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)?;
    Some((
        c["status"].as_str()?.to_owned(),
        c["reason"].as_str()?.to_owned(),
        c["message"].as_str().unwrap_or_default().to_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_switched_to_another_system_out_of_band_is_reported_and_switched_back() {
    let fleet = Arc::new(Fleet::new(0.0));
    let source = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| std::fs::write(source.path().join(name), text).unwrap();
    write(
        "env.yaml",
        &format!(
            "apiVersion: fediversity.eu/v1alpha1
kind: RuntimeEnvironment
metadata: {{ name: static }}
spec:
  staticHosts:
    - name: uni-mastodon
      address: {ADDRESS}
      hostKey: \"{key}\"
  ssh: {{ user: root, privateKeyFile: {dir}/id }}
",
            key = fleet.host_key(ADDRESS),
            dir = state.path().display(),
        ),
    );
    write(
        "mastodon.yaml",
        &fediversity::fixtures::application_yaml("mastodon"),
    );
    write(
        "dep.yaml",
        "apiVersion: fediversity.eu/v1alpha1
kind: Deployment
metadata: { name: uni }
spec:
  domain: uni.example.org
  runtimeEnvironment: static
  applications: { mastodon: { size: small } }
  initialUser: { displayName: A, email: a@example.org }
",
    );
    let args = Args::try_parse_from([
        "fediversity".to_owned(),
        "--source".to_owned(),
        source.path().display().to_string(),
        "--state-dir".to_owned(),
        state.path().join("state").display().to_string(),
        "--listen".to_owned(),
        "127.0.0.1:0".to_owned(),
        "--provider".to_owned(),
        "plan-only".to_owned(),
        "--instance-id".to_owned(),
        "drift-test".to_owned(),
        "--nixos-catalog".to_owned(),
        common::repo_root().display().to_string(),
    ])
    .unwrap()
    .run;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(ShutdownState::Running);
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let daemon = tokio::spawn(fediversity::daemon::run_embedded(
        args,
        Embedding {
            shutdown: Some(stop_rx),
            bound: Some(bound_tx),
            nixos_transport: Transport::Simulated(fleet.clone()),
            nixos_timings: Some(DeployTimings {
                poll_interval: Duration::from_millis(20),
                ..DeployTimings::default()
            }),
            dns_zones: None,
        },
    ));
    let server = bound_rx.await.expect("the daemon listens").to_string();

    let ready = |what: &str| {
        let server = server.clone();
        let what = what.to_owned();
        tokio::task::spawn_blocking(move || {
            common::wait_for(&what, Duration::from_secs(60), || {
                let d = get(&server, "/api/v1/deployments/uni");
                (condition(&d, "Ready")?.0 == "True").then_some(d)
            })
        })
    };
    let d = ready("the Deployment to be Ready").await.unwrap();
    let deployed = d["status"]["hosts"][0]["system"]
        .as_str()
        .expect("the host's system in status")
        .to_owned();
    assert_eq!(fleet.system_of(ADDRESS).unwrap().1.as_str(), deployed);
    let (status, reason, _) = condition(&d, "Drifted").expect("a Drifted condition");
    assert_eq!((status.as_str(), reason.as_str()), ("False", "NoDrift"));

    // Someone runs `nixos-rebuild switch` on the host with a system of their own.
    let theirs =
        StorePath::new("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-uni-mastodon-25.05")
            .unwrap();
    fleet.switch_out_of_band(ADDRESS, &theirs);
    assert_eq!(fleet.system_of(ADDRESS).unwrap().1, theirs);
    // The next pass (here asked for, otherwise the periodic one) finds it and switches back.
    assert_eq!(post(&server, "/api/v1/deployments/uni/reconcile"), Some(202));
    let server2 = server.clone();
    let d = tokio::task::spawn_blocking(move || {
        common::wait_for("the drift to be reported", Duration::from_secs(60), || {
            let d = get(&server2, "/api/v1/deployments/uni");
            (condition(&d, "Drifted")?.0 == "True").then_some(d)
        })
    })
    .await
    .unwrap();
    let (_, reason, message) = condition(&d, "Drifted").unwrap();
    assert_eq!(reason, "DriftCorrected", "{message}");
    assert!(
        message.contains("uni-mastodon") && message.contains("out of band"),
        "{message}"
    );
    assert_eq!(
        fleet.system_of(ADDRESS).unwrap().1.as_str(),
        deployed,
        "switched back to the deployed system"
    );
    let events = get(&server, "/api/v1/events?kind=Deployment&name=uni");
    let warning = events["items"].as_array().into_iter().flatten().find(|e| {
        e["type"] == "Warning"
            && e["reason"] == "DriftCorrected"
            && e["message"].as_str().is_some_and(|m| m.contains("out of band"))
    });
    assert!(warning.is_some(), "no Warning event for the drift: {events}");
    let metrics = common::http_get(&server, "/metrics").unwrap().1;
    assert!(metrics.contains("fediversity_nixos_drift_total 1"), "{metrics}");

    stop_tx.send(ShutdownState::Draining).unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(20), daemon).await;
}
