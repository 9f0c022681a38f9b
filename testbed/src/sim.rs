//! Starting a simulated cluster in-process, and the handle to inspect, steer and stop it.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;

use crate::auth::Auth;
use crate::config::{Ipv4Net, SimConfig};
use crate::error::SimError;
use crate::faults::Faults;
use crate::latency::LatencyModel;
use crate::server::{self, Shared};
use crate::state::Cluster;
use crate::state::vm::VmInfo;
use crate::stats::{RequestRecord, Stats};
use crate::tls::Certificate;

/// Starts simulated Proxmox VE clusters.
#[derive(Debug, Clone, Copy)]
pub struct Simulator;

impl Simulator {
    /// Starts a fresh cluster serving the API on `config`'s address (a random loopback port by default).
    /// It runs until the handle is dropped or [`SimHandle::shutdown`] is called.
    pub async fn start(config: SimConfig) -> Result<SimHandle, SimError> {
        let pool = Ipv4Net::parse(&config.address_pool)?;
        let mut rng = match config.seed {
            Some(seed) => fastrand::Rng::with_seed(seed),
            None => fastrand::Rng::new(),
        };
        let secret: [u8; 32] = std::array::from_fn(|_| rng.u8(..));
        let nodes = config.nodes();
        for node in &nodes {
            if crate::formats::check_named("pve-node", node).is_err() {
                return Err(SimError::Config(format!("invalid node name '{node}'")));
            }
        }
        let (certificate, acceptor) = if config.tls {
            let (c, a) = crate::tls::self_signed()?;
            (Some(c), Some(a))
        } else {
            (None, None)
        };
        let latency = LatencyModel::scaled(config.latency_scale);
        let mut cluster = Cluster::new(nodes.clone(), rng, latency, config.faults.clone().clamped(), pool);
        if let Some(c) = &certificate {
            cluster.fingerprint = c.fingerprint.clone();
        }
        for (i, vmid) in config.templates.iter().enumerate() {
            check_vmid(&cluster, *vmid)?;
            let name = if i == 0 {
                "nixos-template".to_string()
            } else {
                format!("nixos-template-{vmid}")
            };
            cluster.seed_template(*vmid, &nodes[0], &name);
        }
        for vmid in &config.foreign_vms {
            check_vmid(&cluster, *vmid)?;
            cluster.seed_foreign(*vmid, &nodes[0]);
        }
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| SimError::Bind {
                addr: config.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| SimError::Bind {
            addr: config.listen,
            source,
        })?;
        let shared = Arc::new(Shared::new(
            cluster,
            Auth::new(&config.tokens, &config.users, secret),
        ));
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(server::serve(listener, acceptor, shared.clone(), stopped));
        let scheme = if certificate.is_some() { "https" } else { "http" };
        Ok(SimHandle {
            addr,
            base_url: format!("{scheme}://{addr}/api2/json"),
            certificate,
            shared,
            stop,
            task: Some(task),
        })
    }
}

fn check_vmid(cluster: &Cluster, vmid: u32) -> Result<(), SimError> {
    if !(100..=999_999_999).contains(&vmid) || cluster.vms.contains_key(&vmid) {
        return Err(SimError::Config(format!(
            "VMID {vmid} is out of range or used twice"
        )));
    }
    Ok(())
}

/// A running simulated cluster. Dropping it stops the server.
pub struct SimHandle {
    addr: SocketAddr,
    base_url: String,
    certificate: Option<Certificate>,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHandle")
            .field("addr", &self.addr)
            .field("base_url", &self.base_url)
            .finish()
    }
}

impl SimHandle {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http(s)://127.0.0.1:PORT/api2/json`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The SHA-256 fingerprint of the TLS certificate (`AB:CD:…`), when serving HTTPS.
    pub fn fingerprint(&self) -> Option<&str> {
        self.certificate.as_ref().map(|c| c.fingerprint.as_str())
    }

    /// The TLS certificate, when serving HTTPS.
    pub fn certificate(&self) -> Option<&Certificate> {
        self.certificate.as_ref()
    }

    /// Request counters.
    pub fn stats(&self) -> Stats {
        self.shared.recorder().stats()
    }

    /// The request log, oldest first.
    pub fn request_log(&self) -> Vec<RequestRecord> {
        self.shared.recorder().log()
    }

    /// Clears counters and log.
    pub fn reset_stats(&self) {
        self.shared.recorder().reset();
    }

    /// Sets the rate of transport faults (500/595/596).
    pub fn set_fault_rate(&self, rate: f64) {
        let mut cluster = self.shared.cluster();
        cluster.faults = Faults {
            rate,
            ..cluster.faults.clone()
        }
        .clamped();
    }

    /// Sets every fault knob.
    pub fn set_faults(&self, faults: Faults) {
        self.shared.cluster().faults = faults.clamped();
    }

    /// The current fault knobs.
    pub fn faults(&self) -> Faults {
        self.shared.cluster().faults.clone()
    }

    /// Changes the latency scale (affects calls and tasks started from now on).
    pub fn set_latency_scale(&self, scale: f64) {
        self.shared.cluster().latency = LatencyModel::scaled(scale);
    }

    /// A snapshot of every VM.
    pub fn vms(&self) -> Vec<VmInfo> {
        self.shared.cluster().vm_infos()
    }

    /// A snapshot of one VM.
    pub fn vm(&self, vmid: u32) -> Option<VmInfo> {
        self.vms().into_iter().find(|v| v.vmid == vmid)
    }

    /// Sets or clears a VM's config lock (as a backup job would), returning whether the VM exists.
    pub fn set_lock(&self, vmid: u32, lock: Option<&str>) -> bool {
        let mut cluster = self.shared.cluster();
        let Some(vm) = cluster.vms.get_mut(&vmid) else {
            return false;
        };
        match lock {
            Some(l) => vm.config.insert("lock".into(), l.into()),
            None => vm.config.remove("lock"),
        };
        true
    }

    /// UPIDs of the tasks still running.
    pub fn running_tasks(&self) -> Vec<String> {
        self.shared
            .cluster()
            .tasks
            .iter()
            .filter(|t| t.running())
            .map(|t| t.upid.clone())
            .collect()
    }

    /// Stops the server and waits for the accept loop to end.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}
