//! `pve-sim`: a Proxmox VE API simulator for tests and demos.

use std::net::SocketAddr;

use anyhow::Context as _;
use clap::Parser;
use fediversity_testbed::config::{parse_token_spec, parse_user_spec};
use fediversity_testbed::{SimConfig, Simulator};

/// Serves a simulated Proxmox VE cluster (API under /api2/json) until interrupted.
#[derive(Debug, Parser)]
#[command(name = "pve-sim", version)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:8006", env = "PVE_SIM_LISTEN")]
    listen: SocketAddr,
    /// An accepted API token, `USER@REALM!TOKENID=SECRET` (repeatable).
    #[arg(long = "token", value_name = "USER@REALM!ID=SECRET")]
    tokens: Vec<String>,
    /// An accepted ticket login, `USER@REALM:PASSWORD` (repeatable).
    #[arg(long = "user", value_name = "USER@REALM:PASSWORD")]
    users: Vec<String>,
    /// A node of the cluster (repeatable; default `pve`).
    #[arg(long = "node", value_name = "NAME")]
    nodes: Vec<String>,
    /// A NixOS template VM on the first node (repeatable).
    #[arg(long = "template", value_name = "VMID")]
    templates: Vec<u32>,
    /// Scale of the latency model: 0 = instant, 1 = real-world durations.
    #[arg(long, default_value_t = 1.0)]
    latency_scale: f64,
    /// Rate (0..1) of calls answered 500/595/596 without effect.
    #[arg(long, default_value_t = 0.0)]
    fault_rate: f64,
    /// Serve HTTPS with a generated self-signed certificate (its SHA-256 fingerprint is printed).
    #[arg(long)]
    tls: bool,
    /// A running VM the controller did not create (repeatable).
    #[arg(long = "seed-foreign-vm", value_name = "VMID")]
    foreign_vms: Vec<u32>,
    /// IPv4 network whose addresses the guest agents report.
    #[arg(long, value_name = "CIDR", default_value = fediversity_testbed::config::DEFAULT_ADDRESS_POOL)]
    address_pool: String,
    /// Seed of the random generator, for reproducible runs.
    #[arg(long)]
    seed: Option<u64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let Args {
        listen,
        tokens,
        users,
        nodes,
        templates,
        latency_scale,
        fault_rate,
        tls,
        foreign_vms,
        address_pool,
        seed,
    } = Args::parse();
    let mut config = SimConfig::new()
        .listen(listen)
        .latency_scale(latency_scale)
        .fault_rate(fault_rate)
        .tls(tls)
        .address_pool(address_pool);
    for spec in &tokens {
        let (id, secret) = parse_token_spec(spec)?;
        config = config.token(id, secret);
    }
    for spec in &users {
        let (user, password) = parse_user_spec(spec)?;
        config = config.user(user, password);
    }
    if tokens.is_empty() && users.is_empty() {
        anyhow::bail!("no credentials: give at least one --token or --user");
    }
    for node in nodes {
        config = config.node(node);
    }
    for vmid in templates {
        config = config.template(vmid);
    }
    for vmid in foreign_vms {
        config = config.foreign_vm(vmid);
    }
    if let Some(seed) = seed {
        config = config.seed(seed);
    }
    let sim = Simulator::start(config).await.context("starting the simulator")?;
    println!("listening on {}", sim.addr());
    println!("api {}", sim.base_url());
    if let Some(fingerprint) = sim.fingerprint() {
        println!("fingerprint {fingerprint}");
    }
    tracing::info!(addr = %sim.addr(), "pve-sim ready");
    tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")?;
    sim.shutdown().await;
    Ok(())
}
