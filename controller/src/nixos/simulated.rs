//! Simulated NixOS hosts and builds: the host transport's test implementation, used by `fediversity demo`.
//!
//! A [`Fleet`] holds one simulated machine per address. Each has a Nix store, a system profile with
//! generations, an armed rollback that fires on its own when not disarmed in time, an activation that
//! takes a while, and services that answer health checks a little after it. Builds produce a store path
//! from the hash of the configuration text, so an unchanged configuration is the same system. Nothing is
//! built, nothing is contacted: every duration is a real-world figure times the fleet's scale.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use sha2::{Digest, Sha256};

use super::build::Built;
use super::host::{Generation, Health, HostError, HttpCheck, NixHost, StorePath};

/// Evaluating a system and substituting it from a warm binary cache.
const BUILD: Duration = Duration::from_secs(30);
/// Copying a new system's closure to a host on the same LAN.
const COPY: Duration = Duration::from_secs(10);
/// One SSH round trip running a short command.
const COMMAND: Duration = Duration::from_millis(100);
/// `switch-to-configuration switch` of an application host.
const ACTIVATION: Duration = Duration::from_secs(8);
/// From the end of the activation until the application's web server answers.
const SERVICES_UP: Duration = Duration::from_secs(5);

/// The characters of Nix's base-32 (no e, o, t, u).
const NIX_BASE32: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// One deploy's files on a host: the armed rollback and the activation.
#[derive(Debug)]
struct DeployFiles {
    /// The generation to go back to (`None`: remove the profile).
    previous: Option<u32>,
    /// When the host's own rollback timer fires.
    fires_at: Instant,
    /// When the activation finishes, once started.
    activation_done: Option<Instant>,
}

/// One simulated NixOS machine.
#[derive(Debug, Default)]
struct Machine {
    store: BTreeSet<StorePath>,
    /// Generation `n` is `generations[n - 1]`.
    generations: Vec<StorePath>,
    profile: Option<u32>,
    deploys: HashMap<String, DeployFiles>,
    /// When the running system's services answer.
    healthy_at: Option<Instant>,
}

impl Machine {
    /// Runs the rollback timers that have fired, as the host's own systemd timer would.
    fn fire_timers(&mut self, now: Instant) {
        let fired: Vec<String> = self
            .deploys
            .iter()
            .filter(|(_, d)| d.fires_at <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in fired {
            self.roll_back(&id, now);
        }
    }

    fn roll_back(&mut self, id: &str, now: Instant) {
        if let Some(files) = self.deploys.remove(id) {
            self.profile = files.previous;
            self.healthy_at = files.previous.map(|_| now + ACTIVATION);
        }
    }

    fn current(&self) -> Option<Generation> {
        let number = self.profile?;
        let path = self.generations.get(number as usize - 1)?.clone();
        Some(Generation { number, path })
    }
}

/// Simulated NixOS hosts, one per address, and their builds.
#[derive(Debug)]
pub struct Fleet {
    scale: f64,
    machines: Mutex<HashMap<String, Machine>>,
    builds: Mutex<HashMap<String, StorePath>>,
}

impl Fleet {
    /// A fleet whose durations are the real-world figures times `scale` (`0.0`: instant).
    pub fn new(scale: f64) -> Self {
        Self {
            scale: scale.clamp(0.0, 10.0),
            machines: Mutex::new(HashMap::new()),
            builds: Mutex::new(HashMap::new()),
        }
    }

    async fn pause(&self, real: Duration) {
        let d = real.mul_f64(self.scale);
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
    }

    fn machines(&self) -> std::sync::MutexGuard<'_, HashMap<String, Machine>> {
        self.machines.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// "Builds" `host`'s system: the store path is named after the hash of the configuration, so the same
    /// text is the same system. A repeated build of the same text is not rebuilt.
    pub async fn build(&self, host: &str, nix_text: &str) -> Built {
        let started = Instant::now();
        let path = system_path(host, nix_text);
        let unchanged = self
            .builds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(host)
            .is_some_and(|last| *last == path);
        if !unchanged {
            crate::provider::progress::report(format!("{host}: building its NixOS system"));
            self.pause(BUILD).await;
            self.builds
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(host.to_owned(), path.clone());
        }
        Built {
            path,
            rebuilt: !unchanged,
            seconds: started.elapsed().as_secs_f64(),
        }
    }

    /// The SSH host key the machine at `address` presents (`ssh-ed25519 …`), stable per address.
    pub fn host_key(&self, address: &str) -> String {
        let seed = Sha256::digest(format!("fediversity simulated host {address}"));
        let mut blob = Vec::with_capacity(51);
        blob.extend_from_slice(&11u32.to_be_bytes());
        blob.extend_from_slice(b"ssh-ed25519");
        blob.extend_from_slice(&32u32.to_be_bytes());
        blob.extend_from_slice(&seed);
        format!(
            "ssh-ed25519 {}",
            base64::engine::general_purpose::STANDARD.encode(blob)
        )
    }

    /// The machine at `address` as host `name`, once its presented key matches the pinned `host_key`.
    pub fn connect<'a>(
        &'a self,
        name: &str,
        address: &str,
        host_key: &str,
    ) -> Result<SimHost<'a>, HostError> {
        if host_key
            .split_whitespace()
            .take(2)
            .ne(self.host_key(address).split_whitespace())
        {
            return Err(HostError::HostKeyChanged {
                host: name.to_owned(),
            });
        }
        Ok(SimHost {
            fleet: self,
            name: name.to_owned(),
            address: address.to_owned(),
        })
    }

    /// The system the profile of the machine at `address` points at, and its generation.
    pub fn system_of(&self, address: &str) -> Option<(u32, StorePath)> {
        let mut machines = self.machines();
        let m = machines.get_mut(address)?;
        m.fire_timers(Instant::now());
        m.current().map(|g| (g.number, g.path))
    }

    /// Switches the machine at `address` to `path` out of band, as someone running `nixos-rebuild switch`
    /// on it would: a new generation, the profile pointing at it.
    pub fn switch_out_of_band(&self, address: &str, path: &StorePath) {
        self.with(address, |m, now| {
            m.store.insert(path.clone());
            m.generations.push(path.clone());
            m.profile = u32::try_from(m.generations.len()).ok();
            m.healthy_at = Some(now);
        });
    }

    /// Runs `f` on the machine at `address` after its fired timers, creating a fresh machine on first use.
    fn with<T>(&self, address: &str, f: impl FnOnce(&mut Machine, Instant) -> T) -> T {
        let now = Instant::now();
        let mut machines = self.machines();
        let m = machines.entry(address.to_owned()).or_default();
        m.fire_timers(now);
        f(m, now)
    }
}

/// The store path of `host`'s system built from `nix_text`.
fn system_path(host: &str, nix_text: &str) -> StorePath {
    let digest = Sha256::digest(nix_text.as_bytes());
    let hash: String = digest
        .iter()
        .take(32)
        .map(|b| NIX_BASE32[usize::from(b % 32)] as char)
        .collect();
    let name: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    StorePath::new(&format!("/nix/store/{hash}-nixos-system-{name}-25.05"))
        .unwrap_or_else(|_| unreachable!("a hash and a cleaned name make a store path"))
}

/// A connection to one simulated machine.
#[derive(Debug)]
pub struct SimHost<'a> {
    fleet: &'a Fleet,
    name: String,
    address: String,
}

impl SimHost<'_> {
    fn missing(&self, step: &'static str, what: &str) -> HostError {
        HostError::Remote {
            step,
            host: self.name.clone(),
            code: Some(1),
            stderr: what.to_owned(),
        }
    }
}

impl NixHost for SimHost<'_> {
    fn name(&self) -> &str {
        &self.name
    }

    async fn current(&self) -> Result<Option<Generation>, HostError> {
        self.fleet.pause(COMMAND).await;
        Ok(self.fleet.with(&self.address, |m, _| m.current()))
    }

    async fn copy_closure(&self, path: &StorePath) -> Result<(), HostError> {
        let present = self.fleet.with(&self.address, |m, _| m.store.contains(path));
        self.fleet.pause(if present { COMMAND } else { COPY }).await;
        self.fleet
            .with(&self.address, |m, _| m.store.insert(path.clone()));
        Ok(())
    }

    async fn arm_rollback(
        &self,
        id: &str,
        previous: Option<&Generation>,
        after: Duration,
    ) -> Result<(), HostError> {
        self.fleet.pause(COMMAND).await;
        self.fleet.with(&self.address, |m, now| {
            m.deploys.insert(
                id.to_owned(),
                DeployFiles {
                    previous: previous.map(|g| g.number),
                    fires_at: now + after,
                    activation_done: None,
                },
            );
        });
        Ok(())
    }

    async fn set_profile(&self, path: &StorePath) -> Result<Generation, HostError> {
        self.fleet.pause(COMMAND).await;
        self.fleet.with(&self.address, |m, _| {
            if !m.store.contains(path) {
                return Err(self.missing("set the system profile", &format!("{path} is not in the store")));
            }
            m.generations.push(path.clone());
            let number = u32::try_from(m.generations.len()).unwrap_or(u32::MAX);
            m.profile = Some(number);
            Ok(Generation {
                number,
                path: path.clone(),
            })
        })
    }

    async fn activate(&self, id: &str, path: &StorePath) -> Result<(), HostError> {
        self.fleet.pause(COMMAND).await;
        let scale = self.fleet.scale;
        self.fleet.with(&self.address, |m, now| {
            if !m.store.contains(path) {
                return Err(self.missing("activate", &format!("{path} is not in the store")));
            }
            let files = m
                .deploys
                .get_mut(id)
                .ok_or_else(|| self.missing("activate", "no armed rollback for this deploy"))?;
            let done = now + ACTIVATION.mul_f64(scale);
            files.activation_done = Some(done);
            m.healthy_at = Some(done + SERVICES_UP.mul_f64(scale));
            Ok(())
        })
    }

    async fn activation_status(&self, id: &str) -> Result<Option<i32>, HostError> {
        self.fleet.pause(COMMAND).await;
        Ok(self.fleet.with(&self.address, |m, now| {
            m.deploys
                .get(id)
                .and_then(|d| d.activation_done)
                .and_then(|done| (done <= now).then_some(0))
        }))
    }

    async fn roll_back(&self, id: &str) -> Result<(), HostError> {
        self.fleet.pause(COMMAND).await;
        self.fleet.with(&self.address, |m, now| m.roll_back(id, now));
        Ok(())
    }

    async fn health(&self, _http: Option<&HttpCheck>) -> Result<Health, HostError> {
        self.fleet.pause(COMMAND).await;
        Ok(self.fleet.with(&self.address, |m, now| match m.healthy_at {
            Some(at) if at <= now => Health::Healthy,
            _ => Health::NotYet("systemctl is-system-running: starting".into()),
        }))
    }

    async fn disarm_rollback(&self, id: &str) -> Result<(), HostError> {
        self.fleet.pause(COMMAND).await;
        self.fleet.with(&self.address, |m, _| m.deploys.remove(id));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nixos::deploy::{DeployResult, DeployTimings, execute};

    fn timings() -> DeployTimings {
        DeployTimings {
            poll_interval: Duration::from_millis(5),
            ..DeployTimings::default()
        }
    }

    #[tokio::test]
    async fn the_same_configuration_is_the_same_system_and_is_not_rebuilt() {
        let fleet = Fleet::new(0.0);
        let first = fleet.build("uni-mastodon", "{ a = 1; }").await;
        let again = fleet.build("uni-mastodon", "{ a = 1; }").await;
        let changed = fleet.build("uni-mastodon", "{ a = 2; }").await;
        assert!(first.rebuilt && !again.rebuilt && changed.rebuilt);
        assert_eq!(first.path, again.path);
        assert_ne!(first.path, changed.path);
        assert!(first.path.as_str().ends_with("-nixos-system-uni-mastodon-25.05"));
    }

    #[tokio::test]
    async fn a_deploy_converges_and_a_second_one_changes_nothing() {
        let fleet = Fleet::new(0.0);
        let key = fleet.host_key("10.0.0.2");
        let host = fleet.connect("uni-mastodon", "10.0.0.2", &key).unwrap();
        let system = fleet.build("uni-mastodon", "{ }").await.path;
        let report = execute(&host, &system, None, &timings()).await;
        assert_eq!(report.result, DeployResult::Applied, "{}", report.message);
        assert!(report.changed);
        assert_eq!(fleet.system_of("10.0.0.2"), Some((1, system.clone())));
        let again = execute(&host, &system, None, &timings()).await;
        assert_eq!((again.result, again.changed), (DeployResult::Applied, false));
    }

    #[tokio::test]
    async fn a_rollback_that_is_not_disarmed_fires_on_the_host() {
        let fleet = Fleet::new(0.0);
        let key = fleet.host_key("10.0.0.3");
        let host = fleet.connect("h", "10.0.0.3", &key).unwrap();
        let old = fleet.build("h", "{ old = 1; }").await.path;
        execute(&host, &old, None, &timings()).await;
        let new = fleet.build("h", "{ new = 1; }").await.path;
        host.copy_closure(&new).await.unwrap();
        let previous = host.current().await.unwrap();
        host.arm_rollback("d1", previous.as_ref(), Duration::from_millis(40))
            .await
            .unwrap();
        host.set_profile(&new).await.unwrap();
        assert_eq!(fleet.system_of("10.0.0.3"), Some((2, new)));
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(fleet.system_of("10.0.0.3"), Some((1, old)));
    }

    #[test]
    fn a_host_presenting_another_key_than_the_pinned_one_is_refused() {
        let fleet = Fleet::new(0.0);
        let other = fleet.host_key("10.0.0.9");
        assert_ne!(other, fleet.host_key("10.0.0.2"));
        assert!(matches!(
            fleet.connect("h", "10.0.0.2", &other),
            Err(HostError::HostKeyChanged { .. })
        ));
        assert!(crate::nixos::host::known_hosts_line("h", &other).is_ok());
    }
}
