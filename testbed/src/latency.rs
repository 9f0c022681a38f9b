//! The latency model: how long calls and tasks take on a real cluster, scaled by a factor.
//!
//! The base figures come from observed Proxmox VE behaviour (see `testbed/README.md` for the sources);
//! a scale of `1.0` reproduces them, `0.0` makes everything instant.

use std::time::Duration;

/// Per-request latency of an API read on a real node: tens of milliseconds.
const API_CALL: Duration = Duration::from_millis(20);
/// Every 401 is delayed by 3 s by pveproxy (`$delay = 3`).
const AUTH_FAILURE: Duration = Duration::from_secs(3);
/// A linked clone task: "nearly instantaneous", 2–5 s end to end in reports.
const LINKED_CLONE: Duration = Duration::from_secs(3);
/// Fixed part of a full clone; the rest is the disk size over the copy rate.
const FULL_CLONE_BASE: Duration = Duration::from_secs(2);
/// Full clone copy rate: observed 70–80 MiB/s on network storage up to several hundred on NVMe.
const FULL_CLONE_BYTES_PER_SEC: f64 = 200.0 * 1024.0 * 1024.0;
/// A `qmcreate` task allocating a few disks.
const CREATE: Duration = Duration::from_secs(2);
/// A `qmconfig` task: well under 1 s for plain keys.
const CONFIG: Duration = Duration::from_millis(300);
/// A resize on lvm-thin, zfs or ceph: 1–2 s.
const RESIZE: Duration = Duration::from_secs(1);
/// A `qmstart` task ends when QEMU runs, not when the guest booted: 1–3 s.
const START: Duration = Duration::from_secs(2);
/// The guest agent answers 10–60 s after start (boot plus qemu-guest-agent).
const AGENT_BOOT: Duration = Duration::from_secs(20);
/// A cooperative guest shuts down in 5–30 s.
const SHUTDOWN: Duration = Duration::from_secs(10);
/// A hard stop: about 1 s.
const STOP: Duration = Duration::from_secs(1);
/// A `qmdestroy` task: 1–5 s.
const DESTROY: Duration = Duration::from_secs(2);

/// One modelled operation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    /// Any API call (added to every request).
    ApiCall,
    /// The delay before a 401 answer.
    AuthFailure,
    /// A linked clone task.
    LinkedClone,
    /// A full clone of this many bytes of disk.
    FullClone {
        /// Total disk bytes copied.
        bytes: u64,
    },
    /// A create task.
    Create,
    /// A config task.
    Config,
    /// A resize task.
    Resize,
    /// A start task.
    Start,
    /// The time from start until the guest agent answers.
    AgentBoot,
    /// A graceful shutdown.
    Shutdown,
    /// A hard stop.
    Stop,
    /// A destroy task.
    Destroy,
}

/// Real-world durations times a scale factor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyModel {
    /// The factor applied to every duration (`0.0` = instant, `1.0` = real-world).
    pub scale: f64,
}

impl Default for LatencyModel {
    fn default() -> Self {
        Self { scale: 1.0 }
    }
}

impl LatencyModel {
    /// A model with this scale.
    pub fn scaled(scale: f64) -> Self {
        Self {
            scale: if scale.is_finite() { scale.max(0.0) } else { 1.0 },
        }
    }

    /// The unscaled, real-world duration of an operation.
    pub fn real(op: Op) -> Duration {
        match op {
            Op::ApiCall => API_CALL,
            Op::AuthFailure => AUTH_FAILURE,
            Op::LinkedClone => LINKED_CLONE,
            Op::FullClone { bytes } => {
                FULL_CLONE_BASE + Duration::from_secs_f64(bytes as f64 / FULL_CLONE_BYTES_PER_SEC)
            }
            Op::Create => CREATE,
            Op::Config => CONFIG,
            Op::Resize => RESIZE,
            Op::Start => START,
            Op::AgentBoot => AGENT_BOOT,
            Op::Shutdown => SHUTDOWN,
            Op::Stop => STOP,
            Op::Destroy => DESTROY,
        }
    }

    /// The simulated duration of an operation.
    pub fn duration(&self, op: Op) -> Duration {
        Self::real(op).mul_f64(self.scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_zero_makes_everything_instant_and_one_is_real_time() {
        assert_eq!(
            LatencyModel::scaled(0.0).duration(Op::AuthFailure),
            Duration::ZERO
        );
        assert_eq!(
            LatencyModel::scaled(1.0).duration(Op::AuthFailure),
            Duration::from_secs(3)
        );
        assert_eq!(
            LatencyModel::scaled(0.5).duration(Op::Start),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn a_full_clone_takes_longer_for_bigger_disks() {
        let small = LatencyModel::real(Op::FullClone { bytes: 1 << 30 });
        let big = LatencyModel::real(Op::FullClone { bytes: 32 << 30 });
        assert!(big > small && small > LatencyModel::real(Op::LinkedClone));
    }
}
