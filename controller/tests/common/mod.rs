//! Helpers shared by the tests that run the real `fediversity` daemon.
#![allow(dead_code)] // reason: each test binary uses its own subset of these helpers

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

mod ports;
pub use ports::free_port;

/// Starts `fediversity run ARGS --listen 127.0.0.1:PORT` on a free port, without waiting.
pub fn spawn(args: &[std::ffi::OsString]) -> Daemon {
    spawn_with_env(args, &[])
}

/// As [`spawn`], with extra environment variables for the daemon.
pub fn spawn_with_env(args: &[std::ffi::OsString], env: &[(&str, &str)]) -> Daemon {
    spawn_from(None, args, env)
}

/// As [`spawn`], run from `cwd`, so that relative paths among ARGS are the daemon's own.
pub fn spawn_in(cwd: &Path, args: &[std::ffi::OsString]) -> Daemon {
    spawn_from(Some(cwd), args, &[])
}

fn spawn_from(cwd: Option<&Path>, args: &[std::ffi::OsString], env: &[(&str, &str)]) -> Daemon {
    let port = free_port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_fediversity"));
    if let Some(cwd) = cwd {
        command.current_dir(cwd);
    }
    let child = command
        .arg("run")
        .args(args)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Daemon {
        child,
        server: format!("127.0.0.1:{port}"),
    }
}

/// Waits until the daemon answers `/readyz` with 200.
pub fn wait_ready(daemon: &Daemon, within: Duration) {
    wait_for("the daemon to become ready", within, || {
        http_get(&daemon.server, "/readyz")
            .is_some_and(|(code, _)| code == 200)
            .then_some(())
    });
}

/// Starts the daemon with the plan-only provider on one source folder, converging NixOS hosts from
/// `catalog` with `nix_config` as Nix's settings, without waiting.
pub fn start_with_catalog(source: &Path, state: &Path, catalog: &Path, nix_config: &str) -> Daemon {
    let args: Vec<std::ffi::OsString> = [
        "--source".as_ref(),
        source.as_os_str(),
        "--state-dir".as_ref(),
        state.as_os_str(),
        "--provider".as_ref(),
        "plan-only".as_ref(),
        "--nixos-catalog".as_ref(),
        catalog.as_os_str(),
    ]
    .iter()
    .map(|a| a.to_os_string())
    .collect();
    spawn_with_env(&args, &[("NIX_CONFIG", nix_config)])
}

/// Starts the daemon on one source folder with the plan-only provider (the examples name clusters
/// that do not exist) and waits until it is ready.
pub fn start(source: &Path, state: &Path) -> Daemon {
    let args = [
        "--source".as_ref(),
        source.as_os_str(),
        "--state-dir".as_ref(),
        state.as_os_str(),
    ];
    let mut args: Vec<std::ffi::OsString> = args.iter().map(|a| a.to_os_string()).collect();
    args.extend(["--provider", "plan-only"].map(Into::into));
    let daemon = spawn(&args);
    wait_ready(&daemon, Duration::from_secs(20));
    daemon
}

/// The Ready condition's status and reason.
pub fn ready(object: &Value) -> Option<(String, String)> {
    let condition = object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")?;
    Some((
        condition["status"].as_str()?.to_owned(),
        condition["reason"].as_str()?.to_owned(),
    ))
}

/// Runs the CLI against the daemon; returns the exit code and stdout + stderr.
pub fn cli(daemon: &Daemon, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fediversity"))
        .args(args)
        .args(["--server", &daemon.server])
        .env_remove("FEDIVERSITY_TOKEN_FILE")
        .output()
        .unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// The JSON body of a GET of `path` on the daemon's API, when it answers 200.
pub fn get(daemon: &Daemon, path: &str) -> Option<Value> {
    let (code, body) = http_get(&daemon.server, path)?;
    (code == 200).then(|| serde_json::from_str(&body).ok()).flatten()
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
    repo_root().join("examples")
}

/// Copies the example environments, the catalog and the example Deployments (not the quickstart's).
pub fn copy_examples(to: &Path) {
    for (from, entry) in [
        ("environments", "environments"),
        ("quickstart/applications", "applications"),
        ("deployments", "deployments"),
    ] {
        std::fs::create_dir_all(to.join(entry)).unwrap();
        for file in std::fs::read_dir(examples().join(from)).unwrap() {
            let file = file.unwrap().path();
            std::fs::copy(&file, to.join(entry).join(file.file_name().unwrap())).unwrap();
        }
    }
}

/// The repository's root, where `fediversity demo` finds `examples/quickstart` and the catalog.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Sends SIGTERM to `child`.
pub fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits up to `limit` for `child` to exit; its exit code.
pub fn wait_exit(child: &mut Child, limit: Duration) -> i32 {
    wait_for("the process to exit", limit, || {
        child.try_wait().unwrap().map(|s| s.code().unwrap_or(-1))
    })
}

/// `fediversity demo --keep-running` from the repository's root, its output collected line by line;
/// killed when dropped.
pub struct Demo {
    /// The process.
    pub child: Child,
    /// Its API's `HOST:PORT`.
    pub server: String,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Demo {
    /// Starts the demo with `args` added (its work folder, its latency scale).
    pub fn spawn(args: &[&str]) -> Self {
        use std::io::BufRead;
        let port = free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_fediversity"))
            .current_dir(repo_root())
            .args(["demo", "--keep-running", "--listen", &format!("127.0.0.1:{port}")])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Self {
            child,
            server: format!("127.0.0.1:{port}"),
            lines,
        }
    }

    /// Everything printed so far.
    pub fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits for a line containing `text` after the first `after` lines; returns its index.
    #[track_caller]
    pub fn wait_line(&self, text: &str, after: usize, limit: Duration) -> usize {
        wait_for(&format!("the demo to print `{text}`"), limit, || {
            let lines = self.lines.lock().unwrap();
            lines
                .iter()
                .enumerate()
                .skip(after)
                .find(|(_, l)| l.contains(text))
                .map(|(i, _)| i)
        })
    }
}

/// Every file under `dir` with its SHA-256, by path relative to `dir`.
pub fn hashes(dir: &Path) -> Vec<(String, String)> {
    let out = Command::new("sh")
        .arg("-c")
        .arg("find . -type f -print0 | sort -z | xargs -0 sha256sum")
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once("  ").map(|(h, p)| (p.to_owned(), h.to_owned())))
        .collect()
}

/// SIGKILL of the daemon and of its direct children (SSH clients, restic), as a service manager
/// kills the whole unit.
pub fn kill_daemon(mut daemon: Daemon) {
    let pid = daemon.child.id().to_string();
    let children: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let ppid = stat.rsplit(')').next()?.split_whitespace().nth(1)?;
            (ppid == pid).then(|| e.file_name().to_string_lossy().into_owned())
        })
        .collect();
    let _ = daemon.child.kill();
    for child in &children {
        let _ = Command::new("kill").args(["-KILL", child]).status();
    }
    let _ = daemon.child.wait();
}

/// Waits up to `limit` until `migration` (a Deployment's `status.migration`) shows `Succeeded`, and
/// fails at once when it fails or rolls back.
pub fn wait_migrated(limit: Duration, migration: impl Fn() -> Option<Value>) -> Value {
    wait_for("the migration to succeed", limit, || {
        let m = migration()?;
        assert!(
            m["phase"] != "Failed" && m["phase"] != "RollingBack",
            "the migration failed: {m}"
        );
        (m["phase"] == "Succeeded").then_some(m)
    })
}
