//! Proxmox benchmark (placeholder).
fn main() {}
