//! Shared pieces of the Proxmox end-to-end tests: a simulated cluster, a source folder, the real daemon.

#![allow(dead_code)] // each test file uses a different part

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fediversity_testbed::{SimConfig, SimHandle, Simulator};

#[path = "../common/mod.rs"]
mod common;
pub use common::{free_port, http_get, wait_for};
use serde_json::Value;

pub const TOKEN_ID: &str = "ci@pve!ctl";
pub const SECRET: &str = "00000000-0000-4000-8000-000000000001";
pub const TEMPLATE: u32 = 9000;

/// A simulated cluster with our template and foreign VMs at 1000 and 1003 (inside our VMID range).
pub async fn sim(config: SimConfig) -> SimHandle {
    Simulator::start(
        config
            .token(TOKEN_ID, SECRET)
            .template(TEMPLATE)
            .foreign_vm(1000)
            .foreign_vm(1003),
    )
    .await
    .unwrap()
}

pub fn endpoint(sim: &SimHandle) -> String {
    sim.base_url().trim_end_matches("/api2/json").to_owned()
}

/// A source folder with an environment, two applications and secret files.
pub struct Folder {
    pub dir: tempfile::TempDir,
    pub secrets: tempfile::TempDir,
}

impl Folder {
    pub fn new(endpoint: &str, tls: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let secrets = tempfile::tempdir().unwrap();
        std::fs::write(secrets.path().join("token"), format!("{SECRET}\n")).unwrap();
        std::fs::write(secrets.path().join("id"), "private").unwrap();
        std::fs::write(
            secrets.path().join("id.pub"),
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHVnZXhhbXBsZWtleWZvcmRvY3Vtb25seQ test@fediversity\n",
        )
        .unwrap();
        let folder = Self { dir, secrets };
        folder.write_environment(endpoint, tls, &folder.secret("token"));
        for app in ["mastodon", "pixelfed"] {
            folder.write(
                &format!("{app}.yaml"),
                &fediversity::fixtures::application_yaml(app),
            );
        }
        folder
    }

    pub fn secret(&self, name: &str) -> String {
        self.secrets.path().join(name).display().to_string()
    }

    pub fn write(&self, name: &str, text: &str) {
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(tmp, self.dir.path().join(name)).unwrap();
    }

    pub fn remove(&self, name: &str) {
        std::fs::remove_file(self.dir.path().join(name)).unwrap();
    }

    pub fn write_environment(&self, endpoint: &str, tls: &str, secret_file: &str) {
        self.write(
            "env.yaml",
            &format!(
                "apiVersion: fediversity.eu/v1alpha1
kind: RuntimeEnvironment
metadata: {{ name: sim }}
spec:
  proxmox:
    endpoint: {endpoint}
    credentials: {{ tokenId: \"{TOKEN_ID}\", secretFile: {secret_file} }}
{tls}    nodes: [pve]
    template: {{ vmid: {TEMPLATE} }}
    storage: local-lvm
    bridge: vmbr0
    vmidRange: {{ start: 1000, end: 1099 }}
  ssh: {{ user: root, privateKeyFile: {key} }}
",
                key = self.secret("id"),
            ),
        );
    }

    /// A Deployment `name` with `apps` (`mastodon: {{ size: small }}` lines), a policy and annotations.
    pub fn write_deployment(&self, name: &str, apps: &[&str], policy: &str, annotations: &str) {
        let apps: String = apps.iter().map(|a| format!("    {a}\n")).collect();
        self.write(
            &format!("dep-{name}.yaml"),
            &format!(
                "apiVersion: fediversity.eu/v1alpha1
kind: Deployment
metadata:
  name: {name}
  annotations: {{ {annotations} }}
spec:
  domain: {name}.example.org
  runtimeEnvironment: sim
  deletionPolicy: {policy}
  applications:
{apps}  initialUser: {{ displayName: Admin, email: admin@example.org }}
"
            ),
        );
    }
}

pub struct Daemon {
    pub child: Child,
    pub server: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Starts `fediversity run` on `source` with `state`, without waiting.
    pub fn spawn(source: &Path, state: &Path) -> Self {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_fediversity"))
            .args(["run", "--source"])
            .arg(source)
            .arg("--state-dir")
            .arg(state)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--instance-id", "e2e-controller"])
            .env(
                "RUST_LOG",
                std::env::var("E2E_LOG").unwrap_or_else(|_| "error".into()),
            )
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("E2E_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .unwrap();
        Self {
            child,
            server: format!("127.0.0.1:{port}"),
        }
    }

    pub fn start(source: &Path, state: &Path) -> Self {
        let d = Self::spawn(source, state);
        wait_for("the daemon to become ready", Duration::from_secs(20), || {
            http_get(&d.server, "/readyz")
                .is_some_and(|(c, _)| c == 200)
                .then_some(())
        });
        d
    }

    pub fn api(&self, path: &str) -> Value {
        http_get(&self.server, &format!("/api/v1/{path}"))
            .and_then(|(_, body)| serde_json::from_str(&body).ok())
            .unwrap_or(Value::Null)
    }

    pub fn metrics(&self) -> String {
        http_get(&self.server, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    pub fn cli(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_fediversity"))
            .args(args)
            .args(["--server", &self.server])
            .output()
            .unwrap();
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.code().unwrap_or(-1), text)
    }
}

/// The condition `type_` of an object: (status, reason, message).
pub fn condition(object: &Value, type_: &str) -> Option<(String, String, String)> {
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

/// The VMs of ours (carrying a `fediversity-owner-` tag) in the simulator.
pub fn our_vms(sim: &SimHandle) -> Vec<fediversity_testbed::VmInfo> {
    sim.vms()
        .into_iter()
        .filter(|v| v.tags.iter().any(|t| t.starts_with("fediversity-owner-")))
        .collect()
}

pub fn state_dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub fn path(p: &Path) -> PathBuf {
    p.to_path_buf()
}
