//! `fediversity demo`: the quickstart against a simulated Proxmox VE cluster and simulated NixOS hosts.
//!
//! The demo is the real daemon (sources, reconcilers, Proxmox provider, NixOS deployer, API, metrics)
//! run in this process against two simulations: the Proxmox VE API simulator over HTTPS, and simulated
//! NixOS hosts behind the host transport's test implementation. It works on a copy of the quickstart
//! folder whose RuntimeEnvironment points at the simulator, and never touches anything real.

mod progress;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser as _;
use fediversity_testbed::{SimConfig, SimHandle, Simulator};
use serde_json::Value;
use tokio::sync::watch;

use super::client::Client;
use super::output::Format;
use super::remote::{self, Target};
use crate::api::{
    AddressSource, DnsServer, DnsSpec, Kind, Object, RuntimeEnvironment, TlsSpec, TsigAlgorithm, TsigSpec,
};
use crate::daemon::{Embedding, RunArgs};
use crate::dns::{MemoryZone, ZoneClient};
use crate::nixos::{DeployTimings, Transport, simulated::Fleet};
use crate::runtime::shutdown::{ShutdownState, on_signals};
use crate::source::dir::DirSource;
use crate::yaml::Limits;
use progress::Progress;

/// How often the demo looks at the daemon's objects.
const POLL: Duration = Duration::from_millis(200);
/// The longest the demo stays silent while waiting.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// The provider's zone in the demo: kept in memory, inside the demo's process.
const DEMO_ZONE: &str = "hosting.example";
/// The file that marks a folder as the demo's own, which a later run may clear.
const MARKER: &str = ".fediversity-demo";
/// The addresses the simulated cluster's guest agents report (a documentation-free private range).
const ADDRESS_POOL: &str = "10.80.0.0/16";

/// `fediversity demo`'s flags.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// The quickstart folder: one RuntimeEnvironment with `proxmox`, the catalog, the Deployments.
    #[arg(long, default_value = "examples/quickstart")]
    pub quickstart: PathBuf,
    /// The catalog root that the Applications' `nixosModule` paths are relative to.
    #[arg(long, default_value = ".")]
    pub catalog: PathBuf,
    /// Where the controller's API and metrics listen (`127.0.0.1:0` picks a free port).
    #[arg(long, default_value = super::DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Real-world durations (clones, boots, builds, copies, activations) are multiplied by this.
    #[arg(long, default_value = "0.2", value_parser = parse_scale)]
    pub latency_scale: f64,
    /// Keeps the controller and the simulations running once everything is Ready, until Ctrl-C.
    #[arg(long)]
    pub keep_running: bool,
    /// Gives up (exit 1) when not everything is Ready after this long.
    #[arg(long, default_value = "3m", value_parser = super::parse_duration)]
    pub timeout: Duration,
    /// A folder for the demo's state, working copy and log; by default a new temporary folder, removed
    /// after a successful run.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

/// A latency scale: a number from 0 (instant) to 10.
fn parse_scale(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(scale) if (0.0..=10.0).contains(&scale) => Ok(scale),
        _ => Err(format!(
            "`{text}` is not a latency scale: give a number from 0 (instant) to 10 (1 is real-world)"
        )),
    }
}

/// The daemon's flags, parsed like `fediversity run`'s.
#[derive(Debug, clap::Parser)]
struct Daemon {
    #[command(flatten)]
    run: RunArgs,
}

/// Prints one progress line, prefixed with the seconds since the demo started.
fn say(started: Instant, text: &str) {
    println!("[{:>5.1}s] {text}", started.elapsed().as_secs_f64());
}

/// The demo's folders: the working copy of the quickstart, secrets, state and the log.
struct WorkDir {
    root: PathBuf,
    temporary: bool,
}

impl WorkDir {
    fn create(given: Option<&Path>) -> anyhow::Result<Self> {
        let (root, temporary) = match given {
            Some(dir) => (dir.to_owned(), false),
            None => (
                std::env::temp_dir().join(format!("fediversity-demo-{}", std::process::id())),
                true,
            ),
        };
        // Only a new, empty or earlier demo folder is cleared: never a folder that holds anything else.
        let marker = root.join(MARKER);
        let empty = std::fs::read_dir(&root).map_or(true, |mut entries| entries.next().is_none());
        if !empty && !marker.exists() {
            bail!(
                "{} is neither empty nor an earlier demo's folder: give --work-dir a new or empty folder",
                root.display()
            );
        }
        std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
        std::fs::write(
            &marker,
            "A folder of `fediversity demo`: the demo clears it on its next run.\n",
        )
        .with_context(|| format!("cannot write {}", marker.display()))?;
        // Every run starts from scratch: the simulated cluster is new, so is the state.
        for sub in ["source", "secrets", "state"] {
            let path = root.join(sub);
            if path.exists() {
                std::fs::remove_dir_all(&path).with_context(|| format!("cannot clear {}", path.display()))?;
            }
            std::fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
        }
        let root = root
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", root.display()))?;
        Ok(Self { root, temporary })
    }

    fn path(&self, sub: &str) -> PathBuf {
        self.root.join(sub)
    }
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", path.display()))
}

/// The quickstart's objects, checked, and its one Proxmox RuntimeEnvironment.
struct Quickstart {
    snapshot: crate::source::Snapshot,
    environment: RuntimeEnvironment,
    env_file: PathBuf,
}

fn load_quickstart(dir: &Path) -> anyhow::Result<Result<Quickstart, Vec<String>>> {
    let snapshot = DirSource::new(vec![dir.to_owned()], Limits::default()).scan(true);
    if let Some(failure) = &snapshot.failure {
        bail!(
            "cannot read the quickstart folder {}: {failure} (run the demo from the repository's root, or pass --quickstart DIR)",
            dir.display()
        );
    }
    if !snapshot.errors.is_empty() {
        return Ok(Err(snapshot.errors.iter().map(ToString::to_string).collect()));
    }
    let environments: Vec<_> = snapshot
        .objects
        .values()
        .filter_map(|o| match &o.loaded.object {
            Object::RuntimeEnvironment(env) if env.spec.proxmox.is_some() => {
                Some((env.clone(), o.loaded.file.clone()))
            }
            _ => None,
        })
        .collect();
    let [(environment, env_file)] = environments.as_slice() else {
        bail!(
            "the quickstart folder {} must hold exactly one RuntimeEnvironment with `proxmox` (it holds {})",
            dir.display(),
            environments.len()
        );
    };
    Ok(Ok(Quickstart {
        environment: environment.clone(),
        env_file: env_file.clone(),
        snapshot,
    }))
}

/// Starts the simulated cluster the RuntimeEnvironment describes: its nodes, its template, one token.
async fn start_cluster(env: &RuntimeEnvironment, scale: f64) -> anyhow::Result<(SimHandle, String, String)> {
    let proxmox = env
        .spec
        .proxmox
        .as_ref()
        .context("the RuntimeEnvironment has no `proxmox`")?;
    let token_id = proxmox
        .credentials
        .token_id
        .clone()
        .unwrap_or_else(|| "fediversity@pve!controller".to_owned());
    let secret = format!("{:032x}", fastrand::u128(..));
    let mut config = SimConfig::new()
        .tls(true)
        .token(token_id.clone(), secret.clone())
        .template(proxmox.template.vmid)
        .latency_scale(scale)
        .address_pool(ADDRESS_POOL);
    for node in &proxmox.nodes {
        config = config.node(node.as_str());
    }
    let sim = Simulator::start(config)
        .await
        .context("cannot start the simulated Proxmox VE cluster")?;
    Ok((sim, token_id, secret))
}

/// Writes the working copy of the quickstart: every file as it is, except that the RuntimeEnvironment's
/// file is rewritten with the simulator's endpoint, certificate fingerprint and the demo's secret files.
fn write_working_copy(
    quickstart: &Path,
    qs: &Quickstart,
    sim: &SimHandle,
    work: &WorkDir,
    token_secret: &str,
) -> anyhow::Result<PathBuf> {
    let source = work.path("source");
    let secrets = work.path("secrets");
    let token_file = secrets.join("pve-token");
    write_private(&token_file, &format!("{token_secret}\n"))?;
    let key_file = secrets.join("deploy-key");
    write_private(
        &key_file,
        "# The simulated hosts need no key: this file only stands where the SSH key of a real provider would.\n",
    )?;
    std::fs::write(
        secrets.join("deploy-key.pub"),
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGZlZGl2ZXJzaXR5LWRlbW8tbm90LWEtcmVhbC1rZXk fediversity-demo\n",
    )?;

    let mut env = qs.environment.clone();
    if let Some(proxmox) = env.spec.proxmox.as_mut() {
        proxmox.endpoint = sim.base_url().trim_end_matches("/api2/json").to_owned();
        proxmox.tls = Some(TlsSpec {
            fingerprint: sim.fingerprint().map(str::to_owned),
            ..TlsSpec::default()
        });
        proxmox.credentials.secret_file = Some(token_file.display().to_string());
        proxmox.credentials.user = None;
        proxmox.credentials.password_file = None;
    }
    env.spec.ssh.private_key_file = key_file.display().to_string();
    env.spec.ssh.public_key_file = None;
    if env.spec.dns.is_none() {
        let tsig_file = secrets.join("tsig.key");
        // A random secret in the form `tsig-keygen` writes; the in-memory zone never checks it.
        let secret = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            fastrand::u128(..).to_le_bytes(),
        );
        write_private(
            &tsig_file,
            &format!("key \"fediversity-demo\" {{\n\talgorithm hmac-sha256;\n\tsecret \"{secret}\";\n}};\n"),
        )?;
        env.spec.dns = Some(DnsSpec {
            zone: DEMO_ZONE.into(),
            server: DnsServer {
                host: "127.0.0.1".into(),
                port: 53,
            },
            tsig: TsigSpec {
                key_name: "fediversity-demo".into(),
                algorithm: TsigAlgorithm::HmacSha256,
                secret_file: tsig_file.display().to_string(),
            },
            ttl: 300,
            address_source: AddressSource::GuestAgent,
            nat: std::collections::BTreeMap::new(),
            resolver: None,
        });
    }

    let mut pending = vec![quickstart.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))? {
            let path = entry?.path();
            let relative = path.strip_prefix(quickstart).unwrap_or(&path);
            let target = source.join(relative);
            if path.is_dir() {
                std::fs::create_dir_all(&target)?;
                pending.push(path);
            } else if path == qs.env_file {
                std::fs::write(&target, environment_file(&path, &env, qs)?)?;
            } else {
                std::fs::copy(&path, &target)
                    .with_context(|| format!("cannot copy {} to {}", path.display(), target.display()))?;
            }
        }
    }
    Ok(source)
}

/// The RuntimeEnvironment's file in the working copy: every object of the original file, the
/// environment replaced by `env`.
fn environment_file(original: &Path, env: &RuntimeEnvironment, qs: &Quickstart) -> anyhow::Result<String> {
    let mut objects: Vec<_> = qs
        .snapshot
        .objects
        .values()
        .filter(|o| o.loaded.file == original)
        .map(|o| (o.loaded.document, &o.loaded.object))
        .collect();
    objects.sort_by_key(|(document, _)| *document);
    let mut text = format!(
        "# Written by `fediversity demo` from {}: the same RuntimeEnvironment, pointed at the simulated\n\
         # Proxmox VE cluster (endpoint, certificate fingerprint) and at the demo's own secret files.\n",
        original.display()
    );
    for (i, (_, object)) in objects.into_iter().enumerate() {
        let value = match object {
            Object::RuntimeEnvironment(e) if e.metadata.name == env.metadata.name => {
                Object::RuntimeEnvironment(env.clone()).to_json()
            }
            other => other.to_json(),
        };
        if i > 0 {
            text.push_str("---\n");
        }
        text.push_str(&yaml_serde::to_string(&value)?);
    }
    Ok(text)
}

/// Every object the daemon serves, every host and the recent events.
async fn look(client: &Client) -> Option<(Vec<Value>, Vec<Value>, Vec<Value>)> {
    let mut objects = Vec::new();
    for kind in [Kind::RuntimeEnvironment, Kind::Application, Kind::Deployment] {
        let list = client.get(kind.plural()).await.ok()?;
        objects.extend(list["items"].as_array().cloned().unwrap_or_default());
    }
    let items = |v: Value| v["items"].as_array().cloned().unwrap_or_default();
    let hosts = items(client.get("hosts").await.ok()?);
    let events = items(client.get("events").await.ok()?);
    Some((objects, hosts, events))
}

/// How watching the daemon ended.
enum Watched {
    AllReady,
    TimedOut(Vec<String>),
    Stopped,
    DaemonEnded,
}

/// Prints progress until every one of `expected` objects is Ready (or, with `forever`, until stopped).
async fn watch_progress(
    client: &Client,
    started: Instant,
    expected: usize,
    deadline: Option<Instant>,
    stop: &watch::Receiver<ShutdownState>,
    daemon: &tokio::task::JoinHandle<anyhow::Result<i32>>,
    progress: &mut Progress,
) -> Watched {
    let mut last_line = Instant::now();
    loop {
        if *stop.borrow() != ShutdownState::Running {
            return Watched::Stopped;
        }
        if daemon.is_finished() {
            return Watched::DaemonEnded;
        }
        let seen = look(client).await;
        if seen.is_none() && last_line.elapsed() >= HEARTBEAT {
            say(started, "the controller's API does not answer yet");
            last_line = Instant::now();
        }
        if seen.is_none() && deadline.is_some_and(|d| Instant::now() >= d) {
            return Watched::TimedOut(vec!["the controller's API did not answer".to_owned()]);
        }
        if let Some((objects, hosts, events)) = &seen {
            for line in progress.update(objects, hosts, events) {
                say(started, &line);
                last_line = Instant::now();
            }
            let waiting = progress::not_ready(objects);
            if deadline.is_some() && objects.len() >= expected && waiting.is_empty() {
                return Watched::AllReady;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Watched::TimedOut(waiting);
            }
            if deadline.is_some() && last_line.elapsed() >= HEARTBEAT {
                say(
                    started,
                    &format!(
                        "still working: {} of {expected} objects not Ready yet: {}",
                        waiting.len().max(expected.saturating_sub(objects.len())),
                        waiting.join(", ")
                    ),
                );
                last_line = Instant::now();
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Prints the kubectl-style tables of everything the demo made.
async fn print_tables(client: &Client) {
    for (title, target) in [
        ("RUNTIME ENVIRONMENTS", Target::Kind(Kind::RuntimeEnvironment)),
        ("APPLICATIONS", Target::Kind(Kind::Application)),
        ("DEPLOYMENTS", Target::Kind(Kind::Deployment)),
        ("HOSTS", Target::Hosts),
    ] {
        match remote::get(client, target, None, Format::Table).await {
            Ok(table) => println!("\n{title}\n{table}"),
            Err(e) => println!("\n{title}\n(cannot list: {e})"),
        }
    }
}

/// The names published in the demo's zone, and what each operator must set at their own domain.
async fn print_dns(client: &Client, zone: &MemoryZone) {
    println!(
        "\nDNS: the zone {DEMO_ZONE}, kept in memory by the demo (with `spec.dns` naming a real server, the same\nguarded changes go to it as TSIG-signed RFC 2136 updates):"
    );
    for record in zone.records() {
        println!("  {record}");
    }
    let Ok(list) = client.get("deployments").await else {
        return;
    };
    for d in list["items"].as_array().into_iter().flatten() {
        let records = d["status"]["dns"]["operatorRecords"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if records.is_empty() {
            continue;
        }
        println!(
            "The operator of Deployment {} sets at their domain:",
            d["metadata"]["name"].as_str().unwrap_or("?")
        );
        for r in records {
            let apex: Vec<&str> = r["atApex"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            println!(
                "  {} CNAME {}   (at a zone apex instead: {})",
                r["name"].as_str().unwrap_or("?"),
                r["value"].as_str().unwrap_or("?"),
                apex.join(", ")
            );
        }
    }
}

fn init_log(path: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    crate::daemon::init_logging(crate::daemon::LogFormat::Text, std::sync::Mutex::new(file), true);
    Ok(())
}

/// Runs the demo; returns the exit code: 0 once everything was Ready (and, with `--keep-running`, the
/// controller was stopped cleanly), 1 when something did not become Ready in time.
pub async fn run(args: DemoArgs) -> anyhow::Result<i32> {
    let started = Instant::now();
    println!(
        "Fediversity controller demo. This is a simulation: a simulated Proxmox VE cluster and simulated"
    );
    println!(
        "NixOS hosts run inside this process. No VM is created, nothing is built, no machine is contacted.\n"
    );

    let qs = match load_quickstart(&args.quickstart)? {
        Ok(qs) => qs,
        Err(problems) => {
            for p in &problems {
                println!("{p}");
            }
            println!(
                "the quickstart folder {} is not valid: fix the problems above",
                args.quickstart.display()
            );
            return Ok(1);
        }
    };
    let expected = qs.snapshot.objects.len();
    let catalog = args
        .catalog
        .canonicalize()
        .with_context(|| format!("cannot find the catalog root {}", args.catalog.display()))?;
    let work = WorkDir::create(args.work_dir.as_deref())?;
    let log = work.path("controller.log");
    init_log(&log)?;

    let (sim, token_id, secret) = start_cluster(&qs.environment, args.latency_scale).await?;
    say(
        started,
        &format!(
            "simulated Proxmox VE cluster at {} (token {token_id}, template {}, latency x{})",
            sim.base_url(),
            qs.environment
                .spec
                .proxmox
                .as_ref()
                .map_or(0, |p| p.template.vmid),
            args.latency_scale
        ),
    );
    let source = write_working_copy(&args.quickstart, &qs, &sim, &work, &secret)?;
    say(
        started,
        &format!(
            "loaded {expected} objects from {} into the working copy {}",
            args.quickstart.display(),
            source.display()
        ),
    );

    let daemon_args = Daemon::try_parse_from([
        "fediversity".into(),
        "--source".into(),
        source.display().to_string(),
        "--state-dir".into(),
        work.path("state").display().to_string(),
        "--listen".into(),
        args.listen.to_string(),
        "--provider".into(),
        "proxmox".into(),
        "--instance-id".into(),
        "fediversity-demo".into(),
        "--nixos-catalog".into(),
        catalog.display().to_string(),
        "--rescan".into(),
        "2s".into(),
        "--shutdown-grace".into(),
        "10s".into(),
    ])
    .context("cannot build the controller's settings")?
    .run;
    let (stop_tx, stop_rx) = watch::channel(ShutdownState::Running);
    let mut signals = on_signals().context("cannot install signal handlers")?;
    {
        let stop_tx = stop_tx.clone();
        tokio::spawn(async move {
            while signals.changed().await.is_ok() {
                let state = *signals.borrow();
                stop_tx.send_modify(|s| *s = (*s).max(state));
            }
        });
    }
    let fleet = Arc::new(Fleet::new(args.latency_scale));
    let zone = Arc::new(MemoryZone::new(DEMO_ZONE));
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let timings = DeployTimings {
        poll_interval: Duration::from_secs(2)
            .mul_f64(args.latency_scale.clamp(0.0, 1.0))
            .max(Duration::from_millis(50)),
        ..DeployTimings::default()
    };
    let mut daemon = tokio::spawn(crate::daemon::run_embedded(
        daemon_args,
        Embedding {
            shutdown: Some(stop_rx.clone()),
            bound: Some(bound_tx),
            nixos_transport: Transport::Simulated(fleet),
            nixos_timings: Some(timings),
            dns_zones: Some({
                let zone = zone.clone();
                Arc::new(move |_: &DnsSpec| Ok(zone.clone() as Arc<dyn ZoneClient>))
            }),
        },
    ));
    let address = tokio::select! {
        bound = bound_rx => bound.ok(),
        ended = &mut daemon => {
            let why = match ended {
                Ok(Err(e)) => format!("{e:#}"),
                Ok(Ok(code)) => format!("it exited with code {code}"),
                Err(e) => e.to_string(),
            };
            bail!("the controller did not start: {why} (its log: {})", log.display());
        }
    };
    let Some(address) = address else {
        bail!("the controller did not start (its log: {})", log.display());
    };
    say(
        started,
        &format!("controller running: API http://{address}/api/v1, metrics http://{address}/metrics"),
    );
    let client = Client::new(&address.to_string());
    let mut progress = Progress::default();
    let deadline = Some(Instant::now() + args.timeout);
    let watched = watch_progress(
        &client,
        started,
        expected,
        deadline,
        &stop_rx,
        &daemon,
        &mut progress,
    )
    .await;
    let code = match watched {
        Watched::AllReady => {
            println!(
                "\nAll {expected} objects are Ready after {:.1} s: {} VMs on the simulated cluster run their NixOS systems.",
                started.elapsed().as_secs_f64(),
                sim.vms().iter().filter(|v| !v.template).count(),
            );
            print_tables(&client).await;
            print_dns(&client, &zone).await;
            println!(
                "\nThe controller's API:       http://{address}/api/v1   (try: fediversity get hosts --server {address})"
            );
            println!("Its Prometheus metrics:     http://{address}/metrics");
            println!("The simulated Proxmox API:  {}", sim.base_url());
            if args.keep_running || !work.temporary {
                println!("The controller's log:       {}", log.display());
            }
            0
        }
        Watched::TimedOut(waiting) => {
            print_tables(&client).await;
            println!(
                "\nNot everything became Ready within {:?}: {}.\nThe controller's log is {}.",
                args.timeout,
                waiting.join(", "),
                log.display()
            );
            1
        }
        Watched::Stopped => {
            println!("\nStopped before everything was Ready.");
            1
        }
        Watched::DaemonEnded => {
            println!(
                "\nThe controller stopped unexpectedly; its log is {}.",
                log.display()
            );
            1
        }
    };
    if code == 0 && args.keep_running {
        println!(
            "\nStill running: Ctrl-C stops it. Edit the files under {} and watch the controller converge them.",
            source.display()
        );
        watch_progress(&client, started, expected, None, &stop_rx, &daemon, &mut progress).await;
    }
    stop_tx.send_modify(|s| *s = (*s).max(ShutdownState::Draining));
    let drained = match daemon.await {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            println!("the controller ended with an error: {e:#}");
            1
        }
        Err(e) => {
            println!("the controller failed: {e}");
            1
        }
    };
    sim.shutdown().await;
    let code = code.max(drained);
    if code == 0 && work.temporary {
        let _ = std::fs::remove_dir_all(&work.root);
    } else if code == 0 {
        println!(
            "The demo's state and working copy are kept in {}.",
            work.root.display()
        );
    }
    if code == 0 {
        println!(
            "Stopped cleanly after {:.1} s. Nothing real was touched.",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_latency_scale_is_a_number_from_zero_to_ten() {
        assert_eq!(parse_scale("0.2"), Ok(0.2));
        assert_eq!(parse_scale("0"), Ok(0.0));
        for bad in ["-1", "NaN", "11", "fast"] {
            let e = parse_scale(bad).unwrap_err();
            assert!(e.contains(bad) && e.contains("from 0"), "{e}");
        }
    }
}
