//! The `pve-sim` binary: flags, printed address and fingerprint, a working API.

mod common;

use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};

/// Starts `pve-sim` with `args` and returns it with its first `lines` lines of output.
async fn start(args: &[&str], lines: usize) -> (tokio::process::Child, Vec<String>) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pve-sim"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start pve-sim");
    let mut reader = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut out = Vec::new();
    while out.len() < lines {
        let line = tokio::time::timeout(std::time::Duration::from_secs(20), reader.next_line())
            .await
            .expect("pve-sim prints its address")
            .unwrap()
            .expect("a line");
        out.push(line);
    }
    (child, out)
}

#[tokio::test]
async fn pve_sim_prints_its_address_and_serves_the_api() {
    let token = format!("--token={}={}", common::TOKEN_ID, common::TOKEN_SECRET);
    let args = [
        "--listen",
        "127.0.0.1:0",
        &token,
        "--template",
        "9000",
        "--seed-foreign-vm",
        "400",
        "--latency-scale",
        "0",
    ];
    let (mut child, lines) = start(&args, 2).await;
    let addr: std::net::SocketAddr = lines[0]
        .strip_prefix("listening on ")
        .expect(&lines[0])
        .parse()
        .unwrap();
    assert_eq!(lines[1], format!("api http://{addr}/api2/json"));
    let vms = common::api(addr, "GET", "/cluster/resources", &[("type", "vm")]).await;
    let ids: Vec<u64> = vms
        .data()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["vmid"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [400, 9000]);
    child.start_kill().unwrap();
    child.wait().await.unwrap();
}

#[tokio::test]
async fn pve_sim_with_tls_prints_the_certificate_fingerprint() {
    let (mut child, lines) = start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--tls",
            "--user",
            "root@pam:pw",
            "--node",
            "alpha",
        ],
        3,
    )
    .await;
    assert!(lines[1].starts_with("api https://127.0.0.1:"), "{}", lines[1]);
    let fingerprint = lines[2].strip_prefix("fingerprint ").expect(&lines[2]);
    assert_eq!(
        fingerprint.len(),
        32 * 3 - 1,
        "SHA-256 as colon-separated hex pairs: {fingerprint}"
    );
    child.start_kill().unwrap();
    child.wait().await.unwrap();
}

#[tokio::test]
async fn pve_sim_refuses_to_start_without_credentials_or_with_bad_ones() {
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_pve-sim"))
        .args(["--listen", "127.0.0.1:0"])
        .stderr(Stdio::null())
        .status()
        .await
        .unwrap();
    assert!(!status.success());
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_pve-sim"))
        .args(["--listen", "127.0.0.1:0", "--token", "no-realm=secret"])
        .stderr(Stdio::null())
        .status()
        .await
        .unwrap();
    assert!(!status.success());
}
