//! End-to-end: the real `fediversity` binary runs on a folder, converges it, follows edits, additions and
//! deletions, serves metrics that promtool accepts, and drains on SIGTERM.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Daemon {
    child: Child,
    server: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start(source: &Path, state: &Path) -> Daemon {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_fediversity"))
        .args(["run", "--source"])
        .arg(source)
        .arg("--state-dir")
        .arg(state)
        .args(["--listen", &format!("127.0.0.1:{port}")])
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
fn http_get(server: &str, path: &str) -> Option<(u16, String)> {
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

fn api(daemon: &Daemon, path: &str) -> Value {
    let (code, body) = http_get(&daemon.server, &format!("/api/v1/{path}")).expect("the daemon answers");
    assert!(code == 200 || code == 404, "{path}: HTTP {code}: {body}");
    serde_json::from_str(&body).unwrap_or(Value::Null)
}

#[track_caller]
fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
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

fn ready(object: &Value) -> Option<(String, String)> {
    let condition = object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")?;
    Some((
        condition["status"].as_str()?.to_owned(),
        condition["reason"].as_str()?.to_owned(),
    ))
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn copy_examples(to: &Path) {
    for entry in ["environments", "applications", "deployments"] {
        std::fs::create_dir_all(to.join(entry)).unwrap();
        for file in std::fs::read_dir(examples().join(entry)).unwrap() {
            let file = file.unwrap().path();
            std::fs::copy(&file, to.join(entry).join(file.file_name().unwrap())).unwrap();
        }
    }
}

fn cli(daemon: &Daemon, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fediversity"))
        .args(args)
        .args(["--server", &daemon.server])
        .output()
        .unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn the_daemon_converges_a_folder_and_follows_edits_additions_and_deletions() {
    let source = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    copy_examples(source.path());
    // The Deployment's environment arrives later: hold it back.
    let env_file = source.path().join("environments/ams-proxmox.yaml");
    let env_text = std::fs::read_to_string(&env_file).unwrap();
    std::fs::remove_file(&env_file).unwrap();

    let mut daemon = start(source.path(), state.path());

    // Every example object gets a status; the Deployment waits for its environment.
    for kind in ["runtimeenvironments", "applications", "deployments"] {
        wait_for(
            &format!("a status on every {kind}"),
            Duration::from_secs(10),
            || {
                let items = api(&daemon, kind)["items"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                (!items.is_empty() && items.iter().all(|o| ready(o).is_some())).then_some(())
            },
        );
    }
    let deployment = api(&daemon, "deployments/uni-utrecht");
    assert_eq!(
        ready(&deployment),
        Some(("False".into(), "DependencyNotReady".into())),
        "{deployment}"
    );
    assert!(
        deployment["status"]["conditions"]
            .to_string()
            .contains("RuntimeEnvironment ams-proxmox")
    );

    // The environment arrives: the Deployment is unblocked at once, not at its next retry (30 s).
    std::fs::write(&env_file, &env_text).unwrap();
    let unblocked = Instant::now();
    wait_for("the Deployment to become Ready", Duration::from_secs(5), || {
        (ready(&api(&daemon, "deployments/uni-utrecht")) == Some(("True".into(), "Succeeded".into())))
            .then_some(())
    });
    let unblocked = unblocked.elapsed();
    assert!(
        unblocked < Duration::from_secs(2),
        "unblocked after {unblocked:?}"
    );
    let deployment = api(&daemon, "deployments/uni-utrecht");
    assert_eq!(
        deployment["status"]["hosts"].as_array().map(Vec::len),
        Some(2),
        "{deployment}"
    );
    assert_eq!(
        deployment["status"]["endpoints"]["mastodon"],
        "https://mastodon.social.uu.nl"
    );
    assert_eq!(deployment["metadata"]["generation"], 1);

    // An edit is reconciled: observedGeneration follows the new generation.
    let dep_file = source.path().join("deployments/uni-utrecht.yaml");
    let text = std::fs::read_to_string(&dep_file).unwrap();
    std::fs::write(
        &dep_file,
        text.replace(
            "enabled: false           # listed but off: no VM",
            "enabled: true",
        ),
    )
    .unwrap();
    let edited = Instant::now();
    wait_for("the edit to be reconciled", Duration::from_secs(5), || {
        let d = api(&daemon, "deployments/uni-utrecht");
        (d["status"]["observedGeneration"] == 2 && d["metadata"]["generation"] == 2).then_some(())
    });
    let edited = edited.elapsed();
    assert!(
        edited < Duration::from_secs(1),
        "edit reconciled after {edited:?}"
    );
    assert_eq!(
        api(&daemon, "deployments/uni-utrecht")["status"]["hosts"]
            .as_array()
            .map(Vec::len),
        Some(3)
    );

    // The CLI shows it, kubectl style, and `reconcile --wait` returns once it was handled.
    let (code, table) = cli(&daemon, &["get", "deployments"]);
    assert_eq!(code, 0, "{table}");
    assert!(table.starts_with("NAME "), "{table}");
    assert!(
        table.lines().nth(1).unwrap().starts_with("uni-utrecht"),
        "{table}"
    );
    assert!(
        table.contains("True") && table.contains("Succeeded") && table.contains("social.uu.nl"),
        "{table}"
    );
    let (code, list) = cli(&daemon, &["get", "deploy", "-o", "json"]);
    assert_eq!(code, 0);
    let list: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(
        (list["apiVersion"].as_str(), list["kind"].as_str()),
        (Some("v1"), Some("List"))
    );
    let (code, hosts) = cli(&daemon, &["get", "hosts"]);
    assert_eq!(code, 0);
    assert!(
        hosts.contains("uni-utrecht-peertube") && hosts.contains("Planned"),
        "{hosts}"
    );
    let (code, out) = cli(
        &daemon,
        &[
            "reconcile",
            "deployment",
            "uni-utrecht",
            "--wait",
            "--timeout",
            "10s",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("reconciled, Ready"), "{out}");
    let (code, described) = cli(&daemon, &["describe", "deploy", "uni-utrecht"]);
    assert_eq!(code, 0, "{described}");
    assert!(
        described.contains("Conditions:")
            && described.contains("DependencyNotReady")
            && described.contains("uni-utrecht-mastodon"),
        "{described}"
    );
    let (code, events) = cli(&daemon, &["events"]);
    assert_eq!(code, 0);
    assert!(events.contains("Deployment/uni-utrecht"), "{events}");

    // A deleted file's objects go through cleanup and disappear, status and metric series included.
    std::fs::remove_file(&dep_file).unwrap();
    wait_for("the Deployment to disappear", Duration::from_secs(5), || {
        api(&daemon, "deployments")["items"]
            .as_array()
            .is_some_and(Vec::is_empty)
            .then_some(())
    });
    let (_, table) = cli(&daemon, &["get", "deployments"]);
    assert!(table.contains("No deployments found."), "{table}");
    let (_, metrics) = http_get(&daemon.server, "/metrics").unwrap();
    assert!(
        !metrics.contains("name=\"uni-utrecht\""),
        "series of a removed object remain"
    );

    // SIGTERM drains and exits 0.
    let pid = daemon.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let started = Instant::now();
    let status = loop {
        if let Some(status) = daemon.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no exit within 10 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
}

#[test]
fn metrics_pass_promtool_and_carry_the_controller_runtime_names() {
    let source = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    copy_examples(source.path());
    let daemon = start(source.path(), state.path());
    wait_for("the Deployment to become Ready", Duration::from_secs(10), || {
        (ready(&api(&daemon, "deployments/uni-utrecht")).map(|r| r.0) == Some("True".into())).then_some(())
    });
    let (code, scrape) = http_get(&daemon.server, "/metrics").unwrap();
    assert_eq!(code, 200);

    let promtool = which("promtool")
        .expect("promtool is missing: scripts/test.sh installs it (Debian package prometheus)");
    let mut check = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(check.stdin.as_mut().unwrap(), scrape.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    for series in [
        "controller_runtime_reconcile_total{controller=\"deployment\",result=\"success\"}",
        "controller_runtime_reconcile_errors_total{controller=\"deployment\"}",
        "controller_runtime_reconcile_time_seconds_bucket{controller=\"deployment\",le=",
        "controller_runtime_active_workers{controller=\"application\"}",
        "controller_runtime_max_concurrent_reconciles{controller=\"runtimeenvironment\"}",
        "workqueue_depth{",
        "workqueue_adds_total{",
        "workqueue_queue_duration_seconds_bucket{",
        "workqueue_work_duration_seconds_bucket{",
        "workqueue_retries_total{",
        "workqueue_unfinished_work_seconds{",
        "workqueue_longest_running_processor_seconds{",
        "fediversity_resource_info{kind=\"Deployment\",name=\"uni-utrecht\",ready=\"True\",revision=",
        "fediversity_reconcile_condition{kind=\"Deployment\",name=\"uni-utrecht\",status=\"True\",type=\"Ready\"} 1",
        "fediversity_source_last_applied_timestamp_seconds ",
        "process_resident_memory_bytes ",
    ] {
        assert!(scrape.contains(series), "missing `{series}` in the scrape");
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}
