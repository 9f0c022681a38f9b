//! The simulated cluster's state: nodes, VMs, tasks, and the operations that change them.

mod cluster;
mod ops;
pub mod task;
pub mod vm;

pub use cluster::{Cluster, Started};
