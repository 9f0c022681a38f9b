//! The Fediversity controller: declarative hosting of Fediverse applications.

pub mod api;
pub mod backup;
pub mod cli;
pub mod daemon;
pub mod dns;
pub mod fixtures;
pub mod http;
pub mod installation;
pub mod leader;
pub mod load;
pub mod migrate;
pub mod nixos;
pub mod process;
pub mod provider;
pub mod proxmox;
pub mod reconcile;
pub mod runtime;
pub mod source;
pub mod state;
pub mod store;
pub mod text;
pub mod yaml;
