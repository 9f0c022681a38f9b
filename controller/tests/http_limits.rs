//! The HTTP API under hostile clients: a flood of half-open connections, triggers without the token,
//! browser requests and oversized objects.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, free_port, http_get, wait_for, wait_ready};
use fediversity::fixtures;

/// Starts the daemon on a folder holding one Deployment, with an API token, and waits until it is ready.
fn daemon(dir: &std::path::Path) -> Daemon {
    std::fs::create_dir_all(dir.join("objects")).unwrap();
    std::fs::write(
        dir.join("objects/d.yaml"),
        fixtures::deployment_yaml("web", "env", 1),
    )
    .unwrap();
    std::fs::write(dir.join("token"), "the-token\n").unwrap();
    let args: Vec<std::ffi::OsString> = vec![
        "--source".into(),
        dir.join("objects").into(),
        "--state-dir".into(),
        dir.join("state").into(),
        "--api-token-file".into(),
        dir.join("token").into(),
        "--provider".into(),
        "plan-only".into(),
    ];
    let daemon = common::spawn(&args);
    wait_ready(&daemon, Duration::from_secs(20));
    daemon
}

/// Sends one request with extra header lines over a raw socket; returns the status code and body.
fn request(server: &str, method: &str, path: &str, headers: &[&str], body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(server).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.0\r\nHost: {server}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for header in headers {
        head.push_str(header);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

fn open_descriptors(daemon: &Daemon) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", daemon.child.id()))
        .unwrap()
        .count()
}

#[test]
fn two_thousand_half_open_connections_neither_block_healthz_nor_stay_open() {
    // The test holds 2,000 sockets itself.
    let _ = fediversity::http::serve::raise_open_files_limit();
    let dir = tempfile::tempdir().unwrap();
    let daemon = daemon(dir.path());
    let baseline = open_descriptors(&daemon);

    let mut flood = Vec::new();
    for _ in 0..2_000 {
        let mut stream = TcpStream::connect(&daemon.server).unwrap();
        // Half a request, never finished.
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: flood\r\n")
            .unwrap();
        flood.push(stream);
    }
    let started = Instant::now();
    let (code, _) = http_get(&daemon.server, "/healthz").expect("/healthz answers during the flood");
    let latency = started.elapsed();
    assert_eq!(code, 200);
    assert!(latency < Duration::from_secs(1), "/healthz took {latency:?}");

    // The header timeout (10 s) closes every half-open connection.
    std::thread::sleep(Duration::from_secs(12));
    let mut still_open = 0;
    for stream in &mut flood {
        stream.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        let mut byte = [0u8; 512];
        match stream.read(&mut byte) {
            Ok(0) => {}
            // A 408 answer is fine too, as long as the connection is closed after it.
            Ok(_) => {
                if !matches!(stream.read(&mut byte), Ok(0)) {
                    still_open += 1;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(_) => still_open += 1,
        }
    }
    assert_eq!(still_open, 0, "connections the daemon still holds");
    let after = open_descriptors(&daemon);
    assert!(
        after <= baseline + 5,
        "descriptors: {baseline} before, {after} after"
    );
    let (code, _) = http_get(&daemon.server, "/healthz").unwrap();
    assert_eq!(code, 200);
}

#[test]
fn with_a_token_every_trigger_needs_it_and_browser_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = daemon(dir.path());
    let server = daemon.server.as_str();
    let bearer = "Authorization: Bearer the-token";

    for path in [
        "/api/v1/deployments/web/reconcile",
        "/api/v1/sources/objects/reconcile",
    ] {
        let (code, body) = request(server, "POST", path, &[], "");
        assert_eq!(code, 401, "{path} without the token: {body}");
        let (code, body) = request(server, "POST", path, &["Authorization: Bearer wrong"], "");
        assert_eq!(code, 401, "{path} with a wrong token: {body}");
        let (code, body) = request(
            server,
            "POST",
            path,
            &[bearer, "Origin: https://evil.example"],
            "",
        );
        assert_eq!(code, 403, "{path} from a browser: {body}");
        assert!(body.contains("web browsers"), "{body}");
        let (code, body) = request(server, "POST", path, &[bearer], "");
        assert_eq!(code, 202, "{path} with the token: {body}");
    }
    // An in-place restore needs the token too, and with it still its confirmation.
    let (code, body) = request(
        server,
        "POST",
        "/api/v1/deployments/web/restore?confirm=true",
        &[],
        "",
    );
    assert_eq!(code, 401, "restore without the token: {body}");
    let (code, body) = request(server, "POST", "/api/v1/deployments/web/restore", &[bearer], "");
    assert_eq!(code, 400, "restore without confirm=true: {body}");
    assert!(body.contains("confirm=true"), "{body}");
    // So is the final backup of an export, which stops the services and leaves them stopped.
    let (code, body) = request(
        server,
        "POST",
        "/api/v1/deployments/web/final-backup?confirm=true",
        &[],
        "",
    );
    assert_eq!(code, 401, "final backup without the token: {body}");
    let (code, body) = request(
        server,
        "POST",
        "/api/v1/deployments/web/final-backup",
        &[bearer],
        "",
    );
    assert_eq!(code, 400, "final backup without confirm=true: {body}");
    assert!(body.contains("leaves them stopped"), "{body}");
    // Writes from a browser are refused even with the token; reads from one too.
    let (code, _) = request(
        server,
        "DELETE",
        "/api/v1/deployments/web",
        &[bearer, "Origin: http://127.0.0.1"],
        "",
    );
    assert_eq!(code, 403);
    let (code, _) = request(
        server,
        "GET",
        "/api/v1/deployments",
        &["Origin: http://attacker.example"],
        "",
    );
    assert_eq!(code, 403);
    // The CLI sends the token it is given.
    let out = Command::new(env!("CARGO_BIN_EXE_fediversity"))
        .args(["reconcile", "deployment", "web", "--server", server])
        .arg("--token-file")
        .arg(dir.path().join("token"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn an_object_over_one_and_a_half_mebibytes_is_refused_and_lists_stay_whole() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = daemon(dir.path());
    let server = daemon.server.as_str();
    let big = |size: usize| {
        fixtures::deployment_yaml("big", "env", 1).replacen(
            "metadata:\n",
            &format!("metadata:\n  annotations:\n    note: {}\n", "x".repeat(size)),
            1,
        )
    };
    let (code, body) = request(
        server,
        "POST",
        "/api/v1/apply",
        &["Authorization: Bearer the-token"],
        &big(2 * 1024 * 1024),
    );
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("more than the limit of 1572864 bytes"), "{body}");
    let (code, body) = request(
        server,
        "POST",
        "/api/v1/apply",
        &["Authorization: Bearer the-token"],
        &big(1024 * 1024),
    );
    assert_eq!(code, 200, "{body}");
    // The list is written item by item, and still one JSON document.
    let (code, body) = request(server, "GET", "/api/v1/deployments", &[], "");
    assert_eq!(code, 200);
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list["kind"], "List");
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["metadata"]["name"].as_str())
        .collect();
    assert_eq!(names, ["big", "web"]);
}

#[test]
fn the_daemon_raises_its_open_files_limit_to_the_hard_limit() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("objects")).unwrap();
    let port = free_port();
    // Started as systemd starts services: a soft limit of 1,024 below a higher hard one.
    let child = Command::new("prlimit")
        .arg("--nofile=1024:")
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_fediversity"))
        .arg("run")
        .arg("--source")
        .arg(dir.path().join("objects"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args([
            "--provider",
            "plan-only",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("prlimit (util-linux) is missing");
    let daemon = Daemon {
        child,
        server: format!("127.0.0.1:{port}"),
    };
    wait_for("the daemon to answer", Duration::from_secs(20), || {
        http_get(&daemon.server, "/healthz").map(|_| ())
    });
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", daemon.child.id())).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let numbers: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers.len(), 2, "{line}");
    assert_eq!(numbers[0], numbers[1], "the soft limit is the hard one: {line}");
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
    if hard.is_none_or(|h| h > 1024) {
        assert_ne!(numbers[0], "1024", "{line}");
    }
}
