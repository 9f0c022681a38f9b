//! What a built system says about its own readiness: the units that mean "ready" and how long its
//! first start may take (`etc/fediversity/readiness.json`, written by the catalog's `environment.nix`).

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::deploy::DeployTimings;

/// The file in a system toplevel, relative to it.
pub const READINESS_FILE: &str = "etc/fediversity/readiness.json";
/// The units file on a running host, read by the health check.
pub const READY_UNITS_ON_HOST: &str = "/run/current-system/etc/fediversity/ready-units";

/// Where a host that starts from a snapshot lists the restore marker (first line) and the units held
/// stopped until it exists (`fediversity.restoreHold`, written by the catalog's `environment.nix`).
pub const RESTORE_HOLD_ON_HOST: &str = "/run/current-system/etc/fediversity/restore-hold";

/// How long a rollback waits after the confirmation deadline, so that the controller decides first.
const ROLLBACK_MARGIN: Duration = Duration::from_secs(120);

/// An application's readiness signal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Readiness {
    /// The units that must be active.
    #[serde(default)]
    pub units: Vec<String>,
    /// How long a first start may take, in seconds (0: the deployer's own deadlines).
    #[serde(default)]
    pub first_deploy_seconds: u64,
}

impl Readiness {
    /// The readiness of the system at `toplevel` (in the local store after its build); the default
    /// when the system has none (a stand-in, or a catalog without `environment.nix`).
    pub fn of_system(toplevel: &Path) -> Self {
        std::fs::read(toplevel.join(READINESS_FILE))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    /// The deadlines of a deploy of this system: the health checks may take as long as the
    /// application's first start, and the host's own rollback waits for them to finish. A
    /// certificate that cannot be issued yet (DNS not pointing at the host) does not count: the
    /// ready units leave ACME out.
    pub fn timings(&self, base: &DeployTimings) -> DeployTimings {
        let first = Duration::from_secs(self.first_deploy_seconds);
        let mut t = base.clone();
        if first > t.confirm_deadline {
            t.confirm_deadline = first;
        }
        let needed = t.confirm_deadline + t.activation_deadline + ROLLBACK_MARGIN;
        if t.rollback_after < needed && first > Duration::ZERO {
            t.rollback_after = needed;
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_first_start_lengthens_the_confirmation_and_the_rollback_timer() {
        let base = DeployTimings::default();
        let r = Readiness {
            units: vec!["mastodon-web.service".into()],
            first_deploy_seconds: 1200,
        };
        let t = r.timings(&base);
        assert_eq!(t.confirm_deadline, Duration::from_secs(1200));
        assert!(
            t.rollback_after > t.confirm_deadline + t.activation_deadline,
            "the host must not roll back while the controller still waits: {t:?}"
        );
    }

    #[test]
    fn a_system_without_a_readiness_file_keeps_the_deployers_deadlines() {
        let dir = tempfile::tempdir().unwrap();
        let r = Readiness::of_system(dir.path());
        assert_eq!(r, Readiness::default());
        assert_eq!(r.timings(&DeployTimings::default()), DeployTimings::default());
    }

    #[test]
    fn the_file_the_catalog_writes_is_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc/fediversity")).unwrap();
        std::fs::write(
            dir.path().join(READINESS_FILE),
            r#"{"units":["peertube.service","nginx.service"],"firstDeploySeconds":600}"#,
        )
        .unwrap();
        let r = Readiness::of_system(dir.path());
        assert_eq!(r.units, ["peertube.service", "nginx.service"]);
        assert_eq!(r.first_deploy_seconds, 600);
    }
}
