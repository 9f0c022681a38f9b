//! Test beds for the Fediversity controller: a Proxmox VE API simulator and test-host helpers.
//!
//! The simulator serves the part of the Proxmox VE 9.1 API a VM controller uses, with the real envelope,
//! reason phrases, auth (tokens, tickets, CSRF), UPID tasks that take time, locks, pending changes, a guest
//! agent, a latency model and fault injection. Start one in-process:
//!
//! ```no_run
//! # async fn demo() -> Result<(), fediversity_testbed::SimError> {
//! use fediversity_testbed::{SimConfig, Simulator};
//! let sim = Simulator::start(
//!     SimConfig::new().token("ci@pve!ctl", "secret").template(9000).latency_scale(0.0),
//! )
//! .await?;
//! println!("API at {}", sim.base_url());
//! # Ok(()) }
//! ```

pub mod api;
pub mod auth;
pub mod config;
pub mod error;
pub mod faults;
pub mod formats;
pub mod latency;
pub mod params;
pub mod schema;
mod server;
mod sim;
pub mod state;
pub mod stats;
pub mod tls;

pub use config::SimConfig;
pub use error::{ApiError, SimError};
pub use faults::Faults;
pub use latency::LatencyModel;
pub use sim::{SimHandle, Simulator};
pub use state::vm::VmInfo;
pub use stats::{RequestRecord, Stats};
