//! Helpers for the source tests: daemons started with any flags, the CLI, real git repositories and a
//! loopback sshd.
#![allow(dead_code)] // reason: each test binary uses its own subset of these helpers

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

pub use crate::common::{Daemon, api, cli, copy_examples, free_port, http_get, ready, wait_for};

/// Starts the daemon with `args` (besides state directory, listen address and provider) and waits until
/// `/healthz` answers (not `/readyz`: some tests start it with a source that cannot load).
pub fn start_with(args: &[String], state: &Path) -> Daemon {
    let mut all: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
    all.extend([
        "--state-dir".into(),
        state.as_os_str().to_os_string(),
        "--provider".into(),
        "plan-only".into(),
    ]);
    let daemon = crate::common::spawn(&all);
    wait_for("the daemon to answer", Duration::from_secs(20), || {
        http_get(&daemon.server, "/healthz").map(|_| ())
    });
    daemon
}

/// Waits until the daemon is ready (every source loaded once).
pub fn wait_ready(daemon: &Daemon) {
    wait_for("the daemon to become ready", Duration::from_secs(20), || {
        http_get(&daemon.server, "/readyz")
            .is_some_and(|(code, _)| code == 200)
            .then_some(())
    });
}

/// One source's status from the API.
pub fn source(daemon: &Daemon, name: &str) -> Value {
    api(daemon, &format!("sources/{name}"))
}

/// Runs git in `dir`, failing the test on error; returns stdout.
#[track_caller]
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=Provider Ops",
            "-c",
            "user.email=ops@example.org",
            "-c",
            "init.defaultBranch=main",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .expect("git is missing: scripts/test.sh installs it");
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A bare repository (the "remote") and a working clone that commits and pushes to it.
pub struct Repo {
    /// Holds both.
    pub root: tempfile::TempDir,
}

impl Repo {
    /// A new remote with a first commit holding the examples; returns it and that commit.
    pub fn with_examples() -> (Self, String) {
        let root = tempfile::tempdir().unwrap();
        git(root.path(), &["init", "--quiet", "--bare", "remote.git"]);
        git(root.path(), &["init", "--quiet", "work"]);
        let repo = Self { root };
        copy_examples(&repo.work());
        let commit = repo.commit("examples");
        (repo, commit)
    }

    /// The bare repository.
    pub fn remote(&self) -> PathBuf {
        self.root.path().join("remote.git")
    }

    /// The working clone.
    pub fn work(&self) -> PathBuf {
        self.root.path().join("work")
    }

    /// `git+file://…#main`.
    pub fn url(&self) -> String {
        format!("git+file://{}#main", self.remote().display())
    }

    /// Commits everything in the working clone and pushes it; returns the commit.
    pub fn commit(&self, message: &str) -> String {
        let work = self.work();
        git(&work, &["add", "--all"]);
        git(&work, &["commit", "--quiet", "--allow-empty", "-m", message]);
        git(
            &work,
            &[
                "push",
                "--quiet",
                "--force",
                self.remote().to_str().unwrap(),
                "HEAD:refs/heads/main",
            ],
        );
        git(&work, &["rev-parse", "HEAD"])
    }

    /// Replaces a text in a file of the working clone.
    pub fn edit(&self, file: &str, from: &str, to: &str) {
        let path = self.work().join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{file} does not contain {from:?}");
        std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
    }
}

/// Writes a token file and returns its path.
pub fn token_file(dir: &Path, token: &str) -> PathBuf {
    let path = dir.join("token");
    std::fs::write(&path, format!("{token}\n")).unwrap();
    path
}

/// The value of a metric series in a scrape, by its exact `name{labels}` prefix.
pub fn metric(daemon: &Daemon, series: &str) -> Option<f64> {
    let (_, scrape) = http_get(&daemon.server, "/metrics")?;
    scrape
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// An sshd on a loopback port with its own host key, accepting one client key for root; stopped (by
/// its PID) when dropped.
pub struct Sshd {
    child: Option<Child>,
    /// Its port.
    pub port: u16,
    /// Holds keys and configuration.
    pub dir: tempfile::TempDir,
}

impl Sshd {
    /// Starts it. A missing sshd fails the test: scripts/test.sh installs it.
    pub fn start() -> Self {
        let sshd = Path::new("/usr/sbin/sshd");
        assert!(
            sshd.exists(),
            "/usr/sbin/sshd is missing: scripts/test.sh installs it (Debian package openssh-server)"
        );
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for key in ["host_key", "client_key"] {
            let status = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(d.join(key))
                .status()
                .expect("ssh-keygen is missing: scripts/test.sh installs it (openssh-client)");
            assert!(status.success());
        }
        std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).unwrap();
        // sshd's privilege separation folder.
        std::fs::create_dir_all("/run/sshd").unwrap();
        let port = free_port();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {dir}/host_key\nPidFile {dir}/sshd.pid\n\
             AuthorizedKeysFile {dir}/authorized_keys\nPubkeyAuthentication yes\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin prohibit-password\nStrictModes no\n",
            dir = d.display()
        );
        std::fs::write(d.join("sshd_config"), config).unwrap();
        let host_key = std::fs::read_to_string(d.join("host_key.pub")).unwrap();
        std::fs::write(d.join("known_hosts"), format!("[127.0.0.1]:{port} {host_key}")).unwrap();
        let child = Command::new(sshd)
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let sshd = Self {
            child: Some(child),
            port,
            dir,
        };
        wait_for("sshd to listen", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
        });
        sshd
    }

    /// The ssh command that reaches it with the client key and its pinned host key.
    pub fn ssh_command(&self) -> String {
        let d = self.dir.path().display();
        format!(
            "ssh -i {d}/client_key -o IdentitiesOnly=yes -o UserKnownHostsFile={d}/known_hosts -o StrictHostKeyChecking=yes"
        )
    }

    /// Stops it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}
