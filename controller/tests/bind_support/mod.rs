//! A real BIND 9 `named` on a free loopback port serving the provider's zone (`hosting.test`) and an
//! operator's zone (`uni.example.org`), both updatable with one TSIG key; and `dig` and `nsupdate`
//! against it.
#![allow(dead_code)] // reason: each test binary uses its own subset of these helpers

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../common/ports.rs"]
#[allow(clippy::duplicate_mod)]
// reason: a test binary may hold this support module and `common` side by side
mod ports;
use ports::free_port;

/// The provider's zone.
pub const ZONE: &str = "hosting.test";

/// Finds a tool on PATH or in the sbin directories; a missing one fails the test (CI installs them).
pub fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is missing: scripts/test.sh installs it (Debian bind9, bind9-dnsutils)")
        })
}

/// A BIND 9 `named` serving the provider's zone and the operator's zone, both updatable with one key.
pub struct Bind {
    dir: tempfile::TempDir,
    /// The port it answers on (UDP and TCP, 127.0.0.1).
    pub port: u16,
    child: Option<Child>,
}

impl Bind {
    /// A fresh server on a free loopback port, with pristine zone files and no journal.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let out = Command::new(tool("tsig-keygen"))
            .args(["-a", "hmac-sha256", "fediversity-key"])
            .output()
            .unwrap();
        assert!(out.status.success());
        std::fs::write(dir.path().join("key.conf"), &out.stdout).unwrap();
        let d = dir.path().display();
        std::fs::write(
            dir.path().join("named.conf"),
            format!(
                "include \"{d}/key.conf\";
options {{
    directory \"{d}\";
    pid-file none;
    session-keyfile none;
    listen-on port {port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    recursion no;
    dnssec-validation no;
}};
controls {{ }};
zone \"{ZONE}\" {{ type primary; file \"provider.zone\"; update-policy {{ grant fediversity-key zonesub ANY; }}; }};
zone \"uni.example.org\" {{ type primary; file \"operator.zone\"; update-policy {{ grant fediversity-key zonesub ANY; }}; }};
"
            ),
        )
        .unwrap();
        let soa = "$TTL 60\n@ IN SOA ns1.hosting.test. hostmaster.hosting.test. 1 3600 600 86400 60\n@ IN NS ns1.hosting.test.\n";
        std::fs::write(
            dir.path().join("provider.zone"),
            format!("{soa}ns1 IN A 127.0.0.1\n"),
        )
        .unwrap();
        std::fs::write(dir.path().join("operator.zone"), soa).unwrap();
        let mut bind = Self {
            dir,
            port,
            child: None,
        };
        bind.run();
        bind
    }

    /// Starts `named` in the foreground (again, after `stop`) and waits until it answers.
    pub fn run(&mut self) {
        for entry in std::fs::read_dir(self.dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "jnl") {
                std::fs::remove_file(path).unwrap();
            }
        }
        let log = std::fs::File::create(self.dir.path().join("named.log")).unwrap();
        self.child = Some(
            Command::new(tool("named"))
                .args(["-g", "-c"])
                .arg(self.dir.path().join("named.conf"))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        let started = Instant::now();
        while self.dig(&format!("{ZONE}."), "SOA").is_empty() {
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "named did not answer within 15 s: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops `named` (its zone files stay, for `run`).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The TSIG key file (`key "fediversity-key" { … }`).
    pub fn key_file(&self) -> String {
        self.dir.path().join("key.conf").display().to_string()
    }

    /// What `named` logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("named.log")).unwrap_or_default()
    }

    /// `dig +short` of one name and type, one answer per line.
    pub fn dig(&self, name: &str, kind: &str) -> Vec<String> {
        let out = Command::new(tool("dig"))
            .args([
                "@127.0.0.1",
                "-p",
                &self.port.to_string(),
                "+short",
                "+norec",
                "+time=1",
                "+tries=1",
                name,
                kind,
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || text.starts_with(";;") {
            return Vec::new();
        }
        text.lines().map(str::to_owned).collect()
    }

    /// Sends an `nsupdate` script signed with the zone's key.
    pub fn nsupdate(&self, script: &str) {
        use std::io::Write;
        let mut child = Command::new(tool("nsupdate"))
            .args(["-k", &self.key_file()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let script = format!("server 127.0.0.1 {}\n{script}\nsend\n", self.port);
        child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "nsupdate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Bind {
    fn drop(&mut self) {
        self.stop();
    }
}
