//! The simulator's configuration, built in builder style.

use std::net::{Ipv4Addr, SocketAddr};

use crate::error::SimError;
use crate::faults::Faults;

/// Default address pool of guest agents: TEST-NET-1 (RFC 5737), never routed.
pub const DEFAULT_ADDRESS_POOL: &str = "192.0.2.0/24";

/// How to start a simulated cluster.
///
/// ```
/// use fediversity_testbed::SimConfig;
/// let config = SimConfig::new()
///     .token("ci@pve!controller", "00000000-0000-0000-0000-000000000001")
///     .user("root@pam", "secret")
///     .template(9000)
///     .latency_scale(0.0);
/// assert_eq!(config.nodes(), ["pve"]);
/// ```
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub(crate) listen: SocketAddr,
    pub(crate) tokens: Vec<(String, String)>,
    pub(crate) users: Vec<(String, String)>,
    pub(crate) nodes: Vec<String>,
    pub(crate) templates: Vec<u32>,
    pub(crate) foreign_vms: Vec<u32>,
    pub(crate) latency_scale: f64,
    pub(crate) faults: Faults,
    pub(crate) tls: bool,
    pub(crate) address_pool: String,
    pub(crate) seed: Option<u64>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            tokens: Vec::new(),
            users: Vec::new(),
            nodes: Vec::new(),
            templates: Vec::new(),
            foreign_vms: Vec::new(),
            latency_scale: 1.0,
            faults: Faults::none(),
            tls: false,
            address_pool: DEFAULT_ADDRESS_POOL.into(),
            seed: None,
        }
    }
}

impl SimConfig {
    /// A fresh cluster with one node `pve`, no credentials, real-world latency, no faults, plain HTTP on a
    /// random loopback port.
    pub fn new() -> Self {
        Self::default()
    }

    /// Where to listen (default `127.0.0.1:0`, a random port).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// Accepts the API token `user@realm!tokenid` with this secret.
    pub fn token(mut self, token_id: impl Into<String>, secret: impl Into<String>) -> Self {
        self.tokens.push((token_id.into(), secret.into()));
        self
    }

    /// Accepts a ticket login of `user@realm` with this password.
    pub fn user(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.users.push((user.into(), password.into()));
        self
    }

    /// Adds a node (the first one added replaces the default `pve`).
    pub fn node(mut self, name: impl Into<String>) -> Self {
        self.nodes.push(name.into());
        self
    }

    /// Adds a NixOS template with this VMID on the first node.
    pub fn template(mut self, vmid: u32) -> Self {
        self.templates.push(vmid);
        self
    }

    /// Adds a running VM the controller did not create (no Fediversity tags) on the first node.
    pub fn foreign_vm(mut self, vmid: u32) -> Self {
        self.foreign_vms.push(vmid);
        self
    }

    /// Scales every modelled duration (`0.0` = instant, `1.0` = real-world figures).
    pub fn latency_scale(mut self, scale: f64) -> Self {
        self.latency_scale = scale;
        self
    }

    /// Sets the rate of transport faults (500/595/596 answers).
    pub fn fault_rate(mut self, rate: f64) -> Self {
        self.faults.rate = rate;
        self
    }

    /// Sets every fault knob.
    pub fn faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    /// Serves HTTPS with a freshly generated self-signed certificate.
    pub fn tls(mut self, enabled: bool) -> Self {
        self.tls = enabled;
        self
    }

    /// The IPv4 network (`a.b.c.d/len`) whose addresses guest agents report for DHCP interfaces.
    pub fn address_pool(mut self, cidr: impl Into<String>) -> Self {
        self.address_pool = cidr.into();
        self
    }

    /// Seeds the random generator (MAC addresses, faults, …) for reproducible runs.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The nodes of the cluster (`pve` when none was added).
    pub fn nodes(&self) -> Vec<String> {
        if self.nodes.is_empty() {
            vec!["pve".to_string()]
        } else {
            self.nodes.clone()
        }
    }
}

/// Parses `USER@REALM!TOKENID=SECRET` (split on the last `=`, as pveproxy does).
pub fn parse_token_spec(spec: &str) -> Result<(String, String), SimError> {
    let (id, secret) = spec.rsplit_once('=').ok_or_else(|| bad_spec(spec))?;
    let (user, token) = id.split_once('!').ok_or_else(|| bad_spec(spec))?;
    if !user.contains('@') || token.is_empty() || secret.is_empty() {
        return Err(bad_spec(spec));
    }
    Ok((id.to_string(), secret.to_string()))
}

/// Parses `USER@REALM:PASSWORD` (split on the first `:`).
pub fn parse_user_spec(spec: &str) -> Result<(String, String), SimError> {
    let (user, password) = spec.split_once(':').ok_or_else(|| bad_spec(spec))?;
    if !user.contains('@') {
        return Err(bad_spec(spec));
    }
    Ok((user.to_string(), password.to_string()))
}

fn bad_spec(spec: &str) -> SimError {
    let shown: String = spec.split(['=', ':']).next().unwrap_or_default().to_string();
    SimError::Config(format!("cannot parse credential '{shown}…'"))
}

/// An IPv4 network, for the agents' address pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Net {
    /// The network address.
    pub network: Ipv4Addr,
    /// The prefix length.
    pub prefix: u8,
}

impl Ipv4Net {
    /// Parses `a.b.c.d/len`.
    pub fn parse(cidr: &str) -> Result<Self, SimError> {
        let bad = || SimError::Config(format!("invalid address pool '{cidr}' (expected a.b.c.d/len)"));
        let (ip, prefix) = cidr.split_once('/').ok_or_else(bad)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
        Ok(Self {
            network: Ipv4Addr::from(u32::from(ip) & mask),
            prefix,
        })
    }

    /// The `n`-th usable host address (skipping the network address and `.1`, the usual gateway),
    /// wrapping around.
    pub fn host(&self, n: u32) -> Ipv4Addr {
        let size = 1u64 << (32 - u32::from(self.prefix));
        if size <= 4 {
            return Ipv4Addr::from(u32::from(self.network) + (n % size as u32));
        }
        let usable = size - 3;
        Ipv4Addr::from(u32::from(self.network) + 2 + (u64::from(n) % usable) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_specs_split_on_the_last_equals_sign() {
        let (id, secret) = parse_token_spec("ci@pve!ctl=a=b").unwrap();
        assert_eq!((id.as_str(), secret.as_str()), ("ci@pve!ctl=a", "b"));
        assert!(parse_token_spec("no-realm!x=y").is_err());
    }

    #[test]
    fn address_pools_hand_out_hosts_after_the_gateway() {
        let net = Ipv4Net::parse("127.0.10.0/24").unwrap();
        assert_eq!(net.host(0), Ipv4Addr::new(127, 0, 10, 2));
        assert_eq!(net.host(253), Ipv4Addr::new(127, 0, 10, 2));
        assert!(Ipv4Net::parse("10.0.0.0/33").is_err());
    }
}
