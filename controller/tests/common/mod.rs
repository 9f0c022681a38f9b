//! Helpers shared by the tests that run the real `fediversity` daemon.
#![allow(dead_code)] // reason: each test binary uses its own subset of these helpers

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A running daemon, killed when dropped.
pub struct Daemon {
    /// The process.
    pub child: Child,
    /// Its `HOST:PORT`.
    pub server: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn start(source: &Path, state: &Path) -> Daemon {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_fediversity"))
        .args(["run", "--source"])
        .arg(source)
        .arg("--state-dir")
        .arg(state)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        // The examples name clusters that do not exist: plan only.
        .args(["--provider", "plan-only"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let daemon = Daemon {
        child,
        server: format!("127.0.0.1:{port}"),
    };
    wait_for("the daemon to become ready", Duration::from_secs(20), || {
        http_get(&daemon.server, "/readyz")
            .is_some_and(|(code, _)| code == 200)
            .then_some(())
    });
    daemon
}

/// A minimal HTTP/1.0 GET over a raw socket: the test needs no HTTP client of its own.
pub fn http_get(server: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(server).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {server}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((code, body))
}

pub fn api(daemon: &Daemon, path: &str) -> Value {
    let (code, body) = http_get(&daemon.server, &format!("/api/v1/{path}")).expect("the daemon answers");
    assert!(code == 200 || code == 404, "{path}: HTTP {code}: {body}");
    serde_json::from_str(&body).unwrap_or(Value::Null)
}

#[track_caller]
pub fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

pub fn copy_examples(to: &Path) {
    for entry in ["environments", "applications", "deployments"] {
        std::fs::create_dir_all(to.join(entry)).unwrap();
        for file in std::fs::read_dir(examples().join(entry)).unwrap() {
            let file = file.unwrap().path();
            std::fs::copy(&file, to.join(entry).join(file.file_name().unwrap())).unwrap();
        }
    }
}
