//! A lab of real NixOS-like hosts for tests: each an OpenSSH server on a loopback address in its own
//! mount namespace with its own `/nix`, a stand-in nixpkgs, and a tiny web server for health checks.
#![allow(dead_code)] // reason: each test binary uses its own subset of these helpers

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU16, Ordering};
use std::time::{Duration, Instant};

use fediversity::api::{Application, Object, RuntimeEnvironment};
use fediversity::nixos::host::{SshHost, SshTarget, SshTimeouts, known_hosts_line};
use fediversity::nixos::{DeployTimings, DeployerConfig, HttpTarget, NixosDeployer};

/// Nix without a daemon, a network or the `nixbld` group.
pub const NIX_CONFIG: &str =
    "substituters =\nexperimental-features = nix-command\nbuild-users-group =\nsandbox = false";

/// The stand-in for nixpkgs: its `nixos` entry evaluates the generated configuration (without the
/// catalog modules, which need the real nixpkgs) and builds a system whose
/// `bin/switch-to-configuration` records the activated system, keeps sshd running, and fails or cuts
/// SSH when the `activation` setting says so.
const STAND_IN_NIXOS: &str = r#"{ configuration, system ? builtins.currentSystem }:
let
  module = import configuration;
  host = module.networking.hostName;
  # The application's option set: what is left besides what the environment provides.
  app = builtins.head (builtins.attrValues
    (builtins.removeAttrs module.fediversity [ "environment" "rootAuthorizedKeys" "restoreHold" ]));
  # What systemd does with the application's units on activation: a unit held until the restore
  # (`fediversity.restoreHold`, a condition on the marker file) is skipped while the marker is missing.
  hold = module.fediversity.restoreHold or { enable = false; };
  appStart =
    if hold.enable or false then ''
      if [ -e ${hold.marker} ]; then echo "started $(date +%s%N)" >> /nix/var/stand-in/app-starts
      else echo "held $(date +%s%N)" >> /nix/var/stand-in/app-starts; fi
    '' else ''
      echo "started $(date +%s%N)" >> /nix/var/stand-in/app-starts
    '';
  env = module.fediversity.environment or { };
  # What the catalog's environment.nix publishes: the secret files the system reads, as whom.
  secretFiles =
    (if env ? smtp && env.smtp ? passwordFile then [ "smtp-password" ] else [ ])
    ++ (if env ? objectStorage then [ "object-storage-credentials" ] else [ ]);
  secretsJson = builtins.toJSON (map (name: {
    inherit name;
    owner = "nobody";
    group = "nogroup";
    mode = "0440";
    path = "${env.secretsDir}/${name}";
  }) secretFiles);
  behaviour = app.settings.activation or "ok";
  switch = ''
    #!/bin/sh
    self=$(cd "$(dirname "$0")/.." && pwd -P)
    mkdir -p /nix/var/stand-in
    ln -sfn "$self" /nix/var/stand-in/current-system
    if ! { [ -f /nix/var/sshd.pid ] && kill -0 "$(cat /nix/var/sshd.pid)" 2>/dev/null; }; then
      /usr/sbin/sshd -f /nix/var/sshd_config
    fi
  '' + appStart + {
    ok = "exit 0\n";
    fail = "echo 'fediversity-probe.service failed to start' >&2\nexit 4\n";
    cut = "kill \"$(cat /nix/var/sshd.pid)\"\nexit 0\n";
  }.${behaviour};
  toplevel = derivation {
    name = "nixos-system-${host}";
    inherit system switch;
    builder = "/bin/sh";
    args = [ "-c" ''
      /bin/mkdir -p $out/bin $out/etc/fediversity
      /bin/cp "$configJsonPath" $out/etc/fediversity.json
      /bin/cp "$secretsJsonPath" $out/etc/fediversity/secrets.json
      /bin/cp "$switchPath" $out/bin/switch-to-configuration
      /bin/chmod 555 $out/bin/switch-to-configuration
    '' ];
    configJson = builtins.toJSON module.fediversity;
    inherit secretsJson;
    passAsFile = [ "configJson" "secretsJson" "switch" ];
  };
in
{
  config.system.build.toplevel = toplevel;
  system = toplevel;
}
"#;

/// Where the lab's hosts keep secret files (inside their own `/nix`).
pub const SECRETS_DIR: &str = "/nix/var/fediversity-secrets";

/// The catalog entry the lab deploys: its settings pick the stand-in's activation behaviour.
pub fn application(name: &str) -> Application {
    match parse(&application_yaml(name, true)) {
        Object::Application(a) => a,
        other => panic!("not an Application: {other:?}"),
    }
}

/// The YAML of the lab's catalog entry `name`, with or without its HTTP health check.
pub fn application_yaml(name: &str, health_check: bool) -> String {
    format!(
        "apiVersion: fediversity.eu/v1alpha1\nkind: Application\nmetadata: {{ name: {name} }}\nspec:\n  \
displayName: Probe\n  nixosModule: nix/applications/probe.nix\n  sizes: {{ small: {{ cores: 1, memoryMiB: 512, diskGiB: 10 }} }}\n  \
settings:\n    type: object\n    additionalProperties: false\n    properties:\n      \
activation: {{ type: string, enum: [ok, fail, cut] }}\n      message: {{ type: string }}\n\
{}",
        if health_check {
            "  healthCheck: { path: /health }\n"
        } else {
            ""
        }
    )
}

fn parse(text: &str) -> Object {
    let docs = fediversity::yaml::parse_documents(text, &fediversity::yaml::Limits::default()).unwrap();
    fediversity::api::parse_object(&docs[0].1).unwrap()
}

/// Fails with a clear message when a tool the lab needs is missing.
pub fn require_tools() {
    for tool in [
        "nix",
        "nix-env",
        "nix-store",
        "/usr/sbin/sshd",
        "ssh",
        "ssh-keygen",
        "unshare",
        "setsid",
        "curl",
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            found,
            "`{tool}` is missing: the NixOS tests need Nix (nix-bin) and OpenSSH (openssh-server); scripts/test.sh installs them"
        );
    }
}

#[path = "../common/ports.rs"]
#[allow(clippy::duplicate_mod)]
// reason: a test binary may hold this support module and `common` side by side
mod ports;
pub use ports::free_port;

/// Each host gets its own loopback address.
static NEXT_ADDRESS: AtomicU8 = AtomicU8::new(10);

/// A lab: client key, stand-in nixpkgs, a catalog and a web server answering health checks.
pub struct Lab {
    /// The lab's folder (removed when dropped).
    pub dir: tempfile::TempDir,
    /// The status the web server answers with.
    pub http_status: Arc<AtomicU16>,
    http_port: u16,
    stop: Arc<AtomicBool>,
    server: Option<std::thread::JoinHandle<()>>,
}

impl Lab {
    /// Creates the lab.
    pub fn new() -> Self {
        require_tools();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        run(
            "ssh-keygen",
            &[
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-f",
                &p.join("id_ed25519").to_string_lossy(),
            ],
        );
        std::fs::copy(p.join("id_ed25519.pub"), p.join("authorized_keys")).unwrap();
        std::fs::create_dir_all(p.join("nixpkgs/nixos")).unwrap();
        std::fs::write(p.join("nixpkgs/nixos/default.nix"), STAND_IN_NIXOS).unwrap();
        std::fs::create_dir_all(p.join("catalog/nix/applications")).unwrap();
        std::fs::write(
            p.join("catalog/nix/base.nix"),
            "{ ... }: { services.openssh.enable = true; }\n",
        )
        .unwrap();
        std::fs::write(
            p.join("catalog/nix/applications/probe.nix"),
            "{ lib, ... }: { options.fediversity = lib.mkOption { type = lib.types.attrs; default = { }; }; }\n",
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let http_port = listener.local_addr().unwrap().port();
        let http_status = Arc::new(AtomicU16::new(200));
        let stop = Arc::new(AtomicBool::new(false));
        let server = {
            let (status, stop) = (http_status.clone(), stop.clone());
            std::thread::spawn(move || serve(listener, status, stop))
        };
        Self {
            dir,
            http_status,
            http_port,
            stop,
            server: Some(server),
        }
    }

    /// The lab's folder.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A deployer writing its state into the lab, with short deadlines.
    pub fn deployer(&self, rollback_after: Duration) -> NixosDeployer {
        let mut config = DeployerConfig::new(&self.path().join("state"), &self.path().join("catalog"));
        config.timings = DeployTimings {
            rollback_after,
            activation_deadline: Duration::from_secs(3),
            confirm_deadline: Duration::from_secs(5),
            poll_interval: Duration::from_millis(300),
            rollback_slack: Duration::from_secs(2),
        };
        config.ssh.connect = Duration::from_secs(3);
        config.ssh.command = Duration::from_secs(20);
        config.ssh.copy = Duration::from_secs(60);
        config.build_timeout = Duration::from_secs(120);
        config.http = HttpTarget {
            scheme: "http".into(),
            port: self.http_port,
        };
        config.remote_dir = Some("/nix/var/fediversity-deploy".into());
        // Private to each host like its /nix (the rest of the file system is the machine's own).
        config.secrets_dir = Some(SECRETS_DIR.into());
        config.nix_config = Some(NIX_CONFIG.into());
        NixosDeployer::new(config, None)
    }

    /// A RuntimeEnvironment whose static hosts are `hosts`.
    pub fn environment(&self, hosts: &[&TestHost]) -> RuntimeEnvironment {
        let text = self.environment_yaml("lab", hosts);
        match parse(&text) {
            Object::RuntimeEnvironment(e) => e,
            other => panic!("not a RuntimeEnvironment: {other:?}"),
        }
    }

    /// The YAML of a RuntimeEnvironment named `name` whose static hosts are `hosts`.
    pub fn environment_yaml(&self, name: &str, hosts: &[&TestHost]) -> String {
        let mut text = format!(
            "apiVersion: fediversity.eu/v1alpha1\nkind: RuntimeEnvironment\nmetadata: {{ name: {name} }}\nspec:\n  \
ssh: {{ user: root, privateKeyFile: {} }}\n  nix: {{ nixpkgs: {} }}\n  acme: {{ email: acme@lab.example }}\n  staticHosts:\n",
            self.path().join("id_ed25519").display(),
            self.path().join("nixpkgs").display()
        );
        for h in hosts {
            text.push_str(&format!(
                "    - {{ name: {}, address: {}, port: {}, hostKey: \"{}\" }}\n",
                h.name, h.address, h.port, h.host_key
            ));
        }
        text
    }

    /// `ssh` arguments that log in to `host` as root with the lab's key (for running a line there).
    pub fn ssh_args(&self, host: &TestHost) -> Vec<String> {
        vec![
            "-F".into(),
            "none".into(),
            "-i".into(),
            self.path().join("id_ed25519").to_string_lossy().into_owned(),
            "-o".into(),
            "StrictHostKeyChecking=no".into(),
            "-o".into(),
            "UserKnownHostsFile=/dev/null".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "LogLevel=ERROR".into(),
            "-p".into(),
            host.port.to_string(),
            format!("root@{}", host.address),
        ]
    }

    /// `host` as the controller reaches it: the lab's key, its pinned host key, the lab's deploy folder
    /// and Nix settings (for driving single steps, or reading what the controller reads).
    pub fn ssh_host(&self, host: &TestHost) -> SshHost {
        let known_hosts = self.path().join(format!("known-{}", host.name));
        std::fs::write(
            &known_hosts,
            known_hosts_line(&host.name, &host.host_key).unwrap(),
        )
        .unwrap();
        SshHost::new(
            SshTarget {
                name: host.name.clone(),
                user: "root".into(),
                address: host.address.clone(),
                port: host.port,
                identity_file: self.path().join("id_ed25519"),
                known_hosts,
            },
            SshTimeouts::default(),
        )
        .unwrap()
        .with_nix_config(Some(NIX_CONFIG.into()))
        .with_remote_dir("/nix/var/fediversity-deploy")
    }

    /// The catalog root (its `nix/` holds the lab's modules).
    pub fn catalog(&self) -> PathBuf {
        self.path().join("catalog")
    }

    /// Starts a host named `name` on the next free loopback address.
    pub fn host(&self, name: &str) -> TestHost {
        let address = format!("127.0.0.{}", NEXT_ADDRESS.fetch_add(1, Ordering::SeqCst));
        TestHost::start(self.path(), name, &address, free_port(), "true")
    }

    /// Starts a host named `name` on `address:port` (e.g. an address a simulated VM reports).
    pub fn host_at(&self, name: &str, address: &str, port: u16) -> TestHost {
        TestHost::start(self.path(), name, address, port, "true")
    }

    /// Starts a host named `name` whose namespace first runs the shell line `setup` (after its
    /// mounts, before its sshd), e.g. to start a PostgreSQL server of its own.
    pub fn host_with(&self, name: &str, setup: &str) -> TestHost {
        let address = format!("127.0.0.{}", NEXT_ADDRESS.fetch_add(1, Ordering::SeqCst));
        TestHost::start(self.path(), name, &address, free_port(), setup)
    }

    /// Starts a host named `name` on `address:port` whose namespace first runs `setup` (an address a
    /// simulated VM reports, with a PostgreSQL server of its own, say).
    pub fn host_at_with(&self, name: &str, address: &str, port: u16, setup: &str) -> TestHost {
        TestHost::start(self.path(), name, address, port, setup)
    }
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(s) = self.server.take() {
            let _ = s.join();
        }
    }
}

fn serve(listener: TcpListener, status: Arc<AtomicU16>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((mut stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 2048];
                let _ = stream.read(&mut buf);
                let code = status.load(Ordering::SeqCst);
                let _ = write!(
                    stream,
                    "HTTP/1.1 {code} X\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                );
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One host: sshd on a loopback address, in a mount namespace where `/nix` is `root/nix`. Stopped
/// (every sshd it ran, by PID) when dropped, also on panic.
pub struct TestHost {
    /// Its name.
    pub name: String,
    /// The folder whose `nix` is the host's `/nix`.
    pub root: PathBuf,
    /// Its loopback address.
    pub address: String,
    /// Its SSH port.
    pub port: u16,
    /// Its ed25519 host key (`TYPE BASE64`).
    pub host_key: String,
    child: std::process::Child,
}

impl TestHost {
    fn start(lab: &Path, name: &str, address: &str, port: u16, setup: &str) -> Self {
        let root = lab.join(format!("host-{name}"));
        std::fs::create_dir_all(root.join("nix/var/nix")).unwrap();
        std::fs::create_dir_all(root.join("nix/store")).unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        // The deploy files' default folder, private to the host like its /nix.
        std::fs::create_dir_all(root.join("deploy-files")).unwrap();
        std::fs::create_dir_all(fediversity::nixos::host::DEFAULT_REMOTE_DIR).unwrap();
        // The backup work folder, private too.
        std::fs::create_dir_all(root.join("backup-files")).unwrap();
        std::fs::create_dir_all(fediversity::backup::run::DEFAULT_DIR).unwrap();
        let key = root.join("ssh_host_ed25519_key");
        run(
            "ssh-keygen",
            &["-q", "-t", "ed25519", "-N", "", "-f", &key.to_string_lossy()],
        );
        let public = std::fs::read_to_string(root.join("ssh_host_ed25519_key.pub")).unwrap();
        let host_key = public.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        let address = address.to_owned();
        let config = format!(
            "Port {port}\nListenAddress {address}\nHostKey {}\nPidFile /nix/var/sshd.pid\n\
PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
AuthorizedKeysFile {}\nStrictModes no\nUsePAM no\n",
            key.display(),
            lab.join("authorized_keys").display()
        );
        std::fs::write(root.join("nix/var/sshd_config"), config).unwrap();
        let log = std::fs::File::create(root.join("sshd.log")).unwrap();
        let child = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c"])
            .arg(format!(
                "mount --bind {} /nix && mount --bind {} {} && mount --bind {} {} && {{ {setup}; }} && exec /usr/sbin/sshd -D -e -f /nix/var/sshd_config",
                root.join("nix").display(),
                root.join("deploy-files").display(),
                fediversity::nixos::host::DEFAULT_REMOTE_DIR,
                root.join("backup-files").display(),
                fediversity::backup::run::DEFAULT_DIR
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let host = TestHost {
            name: name.to_owned(),
            root,
            address,
            port,
            host_key,
            child,
        };
        host.wait_listening();
        host
    }

    /// Makes the host unreachable over SSH: its sshd and every session it serves are killed (what
    /// else runs there, a database for instance, goes on).
    pub fn stop_ssh(&mut self) {
        let mut doomed = vec![self.child.id().to_string()];
        if let Ok(pid) = std::fs::read_to_string(self.root.join("nix/var/sshd.pid")) {
            doomed.push(pid.trim().to_owned());
        }
        // The sessions: every process descending from those.
        loop {
            let more: Vec<String> = std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter_map(|e| {
                    let pid = e.file_name().to_string_lossy().into_owned();
                    let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
                    let ppid = stat.rsplit(')').next()?.split_whitespace().nth(1)?.to_owned();
                    (doomed.contains(&ppid) && !doomed.contains(&pid)).then_some(pid)
                })
                .collect();
            if more.is_empty() {
                break;
            }
            doomed.extend(more);
        }
        for pid in &doomed {
            let _ = Command::new("kill")
                .args(["-KILL", pid])
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.child.wait();
    }

    /// The application starts the stand-in activation recorded on a host (`started` or `held` until
    /// the restore, each with its time in nanoseconds), in order.
    pub fn app_starts(&self) -> Vec<(String, u128)> {
        std::fs::read_to_string(self.root.join("nix/var/stand-in/app-starts"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (what, at) = l.split_once(' ')?;
                Some((what.to_owned(), at.trim().parse().ok()?))
            })
            .collect()
    }

    /// Waits until sshd accepts connections.
    pub fn wait_listening(&self) {
        let started = Instant::now();
        while TcpStream::connect((self.address.as_str(), self.port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "sshd of {} did not start: {}",
                self.name,
                std::fs::read_to_string(self.root.join("sshd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Where the host's system profile points (`system-N-link`, store path), read from outside.
    pub fn profile(&self) -> Option<(String, String)> {
        let profile = self.root.join("nix/var/nix/profiles/system");
        let link = std::fs::read_link(&profile).ok()?;
        let target = std::fs::read_link(self.root.join("nix/var/nix/profiles").join(&link)).ok()?;
        Some((
            link.to_string_lossy().into_owned(),
            target.to_string_lossy().into_owned(),
        ))
    }

    /// The system the stand-in activation last switched to.
    pub fn activated(&self) -> Option<String> {
        std::fs::read_link(self.root.join("nix/var/stand-in/current-system"))
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
    }

    /// Whether `path` is in the host's own store.
    pub fn has(&self, path: &str) -> bool {
        self.root.join(path.trim_start_matches('/')).exists()
    }

    /// The `etc/fediversity.json` of `system` in the host's own store.
    pub fn settings_json(&self, system: &str) -> serde_json::Value {
        let file = self
            .root
            .join(system.trim_start_matches('/'))
            .join("etc/fediversity.json");
        serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap()
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        // The sshd we started, and the one an activation may have started in its place.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Ok(pid) = std::fs::read_to_string(self.root.join("nix/var/sshd.pid")) {
            let pid = pid.trim();
            if !pid.is_empty() && pid != self.child.id().to_string() {
                let _ = Command::new("kill").arg(pid).status();
            }
        }
    }
}
