//! Provisioning benchmark at real-world latencies: the real daemon creates N VMs (one Deployment each:
//! linked clone, 2 cores, 4 GiB, 40 GiB, cloud-init, tags, start, wait for the agent's address) on the
//! Proxmox simulator at a latency scale, with a cap on requests in flight, and reports wall time,
//! the daemon's CPU time, requests per VM and polls per VM.
//!
//! `cargo bench -p fediversity --bench provision -- --vms 100 --latency 1.0 --cap 4` (defaults: 40
//! VMs, latency 1.0, cap 4, the daemon's default of 16 concurrent reconciles; `--concurrent R` sets
//! that). `FEDIVERSITY_BENCH_DAEMON=PATH` measures another build of the daemon. Under
//! `cargo test --all-targets` it runs a small, fast case as a smoke test.
//!
//! `--rest SECONDS` then keeps the converged daemon running that long and reports what it asks of
//! Proxmox at rest (the drift scan's config reads, resync listings), per hour and per VM;
//! `--drift-interval DURATION` is passed to the daemon. For the drift scan's cost at 1,000 VMs:
//! `-- --vms 1000 --latency 0.05 --cap 8 --rest 600`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fediversity_testbed::{SimConfig, SimHandle, Simulator};
use serde_json::Value;

#[path = "../tests/common/mod.rs"]
mod common;

const TOKEN_ID: &str = "bench@pve!ctl";
const SECRET: &str = "00000000-0000-4000-8000-000000000001";

struct Options {
    vms: usize,
    latency: f64,
    cap: u32,
    concurrent: Option<usize>,
    rest: Option<Duration>,
    drift_interval: Option<String>,
}

fn options() -> Options {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let full = args.iter().any(|a| a == "--bench");
    let parse = |name: &str, default: f64| -> f64 {
        value(name).map_or(default, |v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} takes a number, got {v:?}"))
        })
    };
    Options {
        vms: parse("--vms", if full { 40.0 } else { 4.0 }) as usize,
        latency: parse("--latency", if full { 1.0 } else { 0.02 }),
        cap: parse("--cap", 4.0) as u32,
        concurrent: value("--concurrent").map(|v| v.parse().expect("--concurrent takes a number")),
        // The smoke test under `cargo test` also rests 3 s with a 1 s drift interval, so that the
        // drift scan's bounds are checked on every run.
        rest: value("--rest")
            .map(|_| Duration::from_secs_f64(parse("--rest", 0.0)))
            .or((!full).then_some(Duration::from_secs(3))),
        drift_interval: value("--drift-interval").or((!full).then(|| "1s".to_owned())),
    }
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).expect("the source folder is writable");
}

/// The daemon's CPU time (user + system) so far, from `/proc/PID/stat` (in clock ticks of 1/100 s).
fn cpu_seconds(child: &Child) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces): state is field 3,
    // utime field 14, stime field 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn ready_deployments(server: &str) -> usize {
    let Some((200, body)) = common::http_get(server, "/api/v1/deployments") else {
        return 0;
    };
    let list: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| {
            d["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
        .count()
}

#[tokio::main]
async fn main() {
    let o = options();
    let sim = Simulator::start(
        SimConfig::new()
            .token(TOKEN_ID, SECRET)
            .template(9000)
            .latency_scale(o.latency),
    )
    .await
    .expect("the simulator starts");
    let source = tempfile::tempdir().expect("a temporary directory");
    let secrets = tempfile::tempdir().expect("a temporary directory");
    let state = tempfile::tempdir().expect("a temporary directory");
    write(secrets.path(), "token", SECRET);
    write(secrets.path(), "id", "private");
    write(
        secrets.path(),
        "id.pub",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHVnZXhhbXBsZWtleWZvcmRvY3Vtb25seQ bench",
    );
    let endpoint = sim.base_url().trim_end_matches("/api2/json").to_owned();
    write(
        source.path(),
        "env.yaml",
        &format!(
            "apiVersion: fediversity.eu/v1alpha1
kind: RuntimeEnvironment
metadata: {{ name: bench }}
spec:
  proxmox:
    endpoint: {endpoint}
    credentials: {{ tokenId: \"{TOKEN_ID}\", secretFile: {secrets}/token }}
    nodes: [pve]
    template: {{ vmid: 9000 }}
    storage: local-lvm
    bridge: vmbr0
    vmidRange: {{ start: 10000, end: 19999 }}
  ssh: {{ user: root, privateKeyFile: {secrets}/id }}
  limits: {{ maxConcurrentOperations: {cap} }}
",
            secrets = secrets.path().display(),
            cap = o.cap,
        ),
    );
    write(
        source.path(),
        "mastodon.yaml",
        &fediversity::fixtures::application_yaml("mastodon"),
    );
    for i in 0..o.vms {
        write(
            source.path(),
            &format!("dep-{i}.yaml"),
            &format!(
                "apiVersion: fediversity.eu/v1alpha1
kind: Deployment
metadata: {{ name: b{i} }}
spec:
  domain: b{i}.example.org
  runtimeEnvironment: bench
  applications: {{ mastodon: {{ size: small }} }}
  initialUser: {{ displayName: A, email: a@example.org }}
"
            ),
        );
    }

    let port = common::free_port();
    let server = format!("127.0.0.1:{port}");
    // Another build of the daemon (say, of an earlier commit) can be measured on the same bench.
    let daemon = std::env::var_os("FEDIVERSITY_BENCH_DAEMON")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_fediversity").into());
    let mut command = Command::new(daemon);
    command
        .args(["run", "--source"])
        .arg(source.path())
        .arg("--state-dir")
        .arg(state.path())
        .args(["--listen", &server, "--instance-id", "bench"])
        .env(
            "RUST_LOG",
            std::env::var("FEDIVERSITY_BENCH_LOG").unwrap_or_else(|_| "error".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(r) = o.concurrent {
        command.args(["--max-concurrent", &r.to_string()]);
    }
    if let Some(d) = &o.drift_interval {
        command.args(["--drift-interval", d]);
    }
    sim.reset_stats();
    let started = Instant::now();
    let mut child = command.spawn().expect("the daemon starts");
    let limit = Duration::from_secs(60 + (o.vms as f64 * 30.0 * o.latency.max(0.05)) as u64);
    let mut ready = 0;
    while ready < o.vms {
        if started.elapsed() > limit {
            let _ = child.kill();
            let first = common::http_get(&server, "/api/v1/deployments/b0").map(|(_, b)| b);
            eprintln!("the VMs: {:?}", sim.vms());
            panic!(
                "only {ready}/{} Deployments Ready after {limit:?}; the first: {first:?}",
                o.vms
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        let server = server.clone();
        ready = tokio::task::spawn_blocking(move || ready_deployments(&server))
            .await
            .unwrap_or(0);
    }
    let wall = started.elapsed();
    let cpu = cpu_seconds(&child);
    let stats = sim.stats();
    let at_rest = match o.rest {
        Some(rest) => Some(measure_rest(&sim, &child, rest).await),
        None => None,
    };
    let _ = child.kill();
    let _ = child.wait();

    let n = o.vms as f64;
    let sum = |f: &dyn Fn(&str) -> bool| -> u64 {
        stats.by_route.iter().filter(|(r, _)| f(r)).map(|(_, c)| c).sum()
    };
    let task_polls = sum(&|r| r.contains("/tasks/") && r.ends_with("/status"));
    let agent_polls = sum(&|r| r.contains("/agent/"));
    let listings = sum(&|r| r.contains("/cluster/resources"));
    let errors: u64 = stats
        .by_status
        .iter()
        .filter(|(s, _)| **s >= 400)
        .map(|(_, c)| c)
        .sum();
    println!(
        "provision: {} VMs, latency {}, cap {}, {} concurrent reconciles: wall {:.1} s, CPU {:.2} s \
         ({:.3} s/VM), {:.1} requests/VM, {:.1} task polls/VM, {:.1} agent polls/VM, {:.1} listings/VM, \
         {errors} error answers",
        o.vms,
        o.latency,
        o.cap,
        o.concurrent
            .map_or_else(|| "default".to_owned(), |c| c.to_string()),
        wall.as_secs_f64(),
        cpu,
        cpu / n,
        stats.total as f64 / n,
        task_polls as f64 / n,
        agent_polls as f64 / n,
        listings as f64 / n,
    );
    let mut routes: Vec<(&String, &u64)> = stats.by_route.iter().collect();
    routes.sort_by(|a, b| b.1.cmp(a.1));
    for (route, count) in routes {
        println!("  {:>7.2}/VM  {route}", *count as f64 / n);
    }
    if let Some(rest) = at_rest {
        let interval = o.drift_interval.as_deref().unwrap_or("10m");
        rest.print(o.vms, interval);
        rest.check(
            o.vms,
            fediversity::api::parse_duration(interval).expect("--drift-interval takes a duration"),
        );
    }
    assert_eq!(
        sim.vms()
            .iter()
            .filter(|v| v.tags.iter().any(|t| t.starts_with("fediversity-owner-")))
            .count(),
        o.vms,
        "exactly one VM per Deployment"
    );
}

/// What the converged daemon asked of Proxmox while it rested.
struct Rest {
    window: Duration,
    cpu: f64,
    stats: fediversity_testbed::Stats,
}

/// Counts the requests of `window` at rest, from a fresh count.
async fn measure_rest(sim: &SimHandle, child: &Child, window: Duration) -> Rest {
    sim.reset_stats();
    let cpu_before = cpu_seconds(child);
    tokio::time::sleep(window).await;
    Rest {
        window,
        cpu: cpu_seconds(child) - cpu_before,
        stats: sim.stats(),
    }
}

impl Rest {
    fn config_reads(&self) -> u64 {
        self.stats
            .by_route
            .iter()
            .filter(|(r, _)| r.starts_with("GET ") && r.ends_with("/qemu/{vmid}/config"))
            .map(|(_, c)| c)
            .sum()
    }

    /// The drift scan's promise: each VM's config read at most once per interval (plus the one a
    /// window's edge may cut in two), and, over a window of at least two intervals, at least once.
    fn check(&self, vms: usize, interval: Duration) {
        let reads = self.config_reads();
        if interval.is_zero() {
            return;
        }
        let per_vm = self.window.as_secs_f64() / interval.as_secs_f64();
        let most = (vms as f64 * (per_vm.floor() + 1.0)) as u64;
        assert!(
            reads <= most,
            "{reads} config reads at rest for {vms} VMs over {:?}: more than once per {interval:?} \
             ({most} at most)",
            self.window
        );
        if per_vm >= 2.0 {
            assert!(
                reads >= vms as u64,
                "{reads} config reads at rest for {vms} VMs over {:?}: some VM was never scanned",
                self.window
            );
        }
        assert_eq!(
            self.stats.count("POST", "/nodes/{node}/qemu/{vmid}/clone"),
            0,
            "no clone at rest"
        );
    }

    fn print(&self, vms: usize, interval: &str) {
        let hours = self.window.as_secs_f64() / 3600.0;
        let count = |f: &dyn Fn(&str) -> bool| -> u64 {
            self.stats
                .by_route
                .iter()
                .filter(|(r, _)| f(r))
                .map(|(_, c)| c)
                .sum()
        };
        let configs = self.config_reads();
        let listings = count(&|r| r.contains("/cluster/resources"));
        println!(
            "at rest for {:.0} s, drift interval {interval}: {:.0} requests/hour in all ({:.2}/VM/hour), \
             of them {:.0} config reads/hour ({:.2}/VM/hour) and {:.0} listings/hour; daemon CPU {:.2} s \
             ({:.1} ms/VM/hour)",
            self.window.as_secs_f64(),
            self.stats.total as f64 / hours,
            self.stats.total as f64 / hours / vms as f64,
            configs as f64 / hours,
            configs as f64 / hours / vms as f64,
            listings as f64 / hours,
            self.cpu,
            self.cpu * 1000.0 / hours / vms as f64,
        );
        let mut routes: Vec<(&String, &u64)> = self.stats.by_route.iter().collect();
        routes.sort_by(|a, b| b.1.cmp(a.1));
        for (route, count) in routes {
            println!("  {:>9.1}/hour  {route}", *count as f64 / hours);
        }
    }
}
