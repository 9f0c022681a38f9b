//! A real three-member etcd cluster (Debian's `etcd`) on loopback ports chosen at run time.
#![allow(dead_code)] // reason: each test binary uses its own subset of these helpers

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../common/ports.rs"]
#[allow(clippy::duplicate_mod)]
// reason: a test binary may hold this support module and `common` side by side
mod ports;
use ports::free_port;

/// One member: its ports and, while it runs, its process.
struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

/// Three etcd members, stopped when dropped.
pub struct EtcdCluster {
    dir: tempfile::TempDir,
    members: Vec<Member>,
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl EtcdCluster {
    /// Starts three members and waits until the cluster answers a write.
    pub fn start() -> Self {
        let members: Vec<Member> = (1..=3)
            .map(|n| Member {
                name: format!("m{n}"),
                client: free_port(),
                peer: free_port(),
                child: None,
            })
            .collect();
        let mut cluster = Self {
            dir: tempfile::tempdir().unwrap(),
            members,
        };
        for n in 0..3 {
            cluster.launch(n, "new");
        }
        cluster.wait_healthy(Duration::from_secs(30));
        cluster
    }

    fn launch(&mut self, n: usize, state: &str) {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect();
        let data: PathBuf = self.dir.path().join(format!("{}.data", self.members[n].name));
        let m = &mut self.members[n];
        let client = format!("http://127.0.0.1:{}", m.client);
        let peer = format!("http://127.0.0.1:{}", m.peer);
        let child = Command::new("etcd")
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&data)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-token", "fediversity-test"])
            .args(["--initial-cluster-state", state])
            .args(["--logger", "zap", "--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("E2E_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("etcd (Debian package etcd-server) must be installed");
        m.child = Some(child);
    }

    /// `HOST:PORT` of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client))
            .collect()
    }

    /// The store URL for `prefix`.
    pub fn url(&self, prefix: &str) -> String {
        format!("etcd://{}/{prefix}", self.endpoints().join(","))
    }

    fn etcdctl(&self, args: &[&str]) -> bool {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                &self.endpoints().join(","),
                "--command-timeout",
                "2s",
            ])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Waits until a write succeeds.
    pub fn wait_healthy(&self, within: Duration) {
        let until = Instant::now() + within;
        while !self.etcdctl(&["put", "/health-probe", "ok"]) {
            assert!(Instant::now() < until, "the etcd cluster did not become healthy");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills member `n` (SIGKILL).
    pub fn kill(&mut self, n: usize) {
        if let Some(mut c) = self.members[n].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restarts a killed member `n` on its data directory.
    pub fn restart(&mut self, n: usize) {
        self.launch(n, "existing");
    }
}
