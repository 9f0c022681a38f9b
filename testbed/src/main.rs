//! `pve-sim`: a Proxmox VE API simulator for tests and demos.

fn main() {}
