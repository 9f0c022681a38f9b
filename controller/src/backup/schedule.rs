//! When each host is due for a backup (schedule, backoff after failures, the environment's cap), and
//! one round of due backups that records status and metrics.

use std::time::Duration;

use futures_util::future::join_all;
use tokio::sync::Semaphore;

use super::metrics::BackupMetrics;
use super::run::{BackupTarget, Backuper, Repository, Shell};
use crate::api::{BackupSpec, DataSpec, HostBackupStatus, Timestamp};

/// The first retry after a failure; each further failure doubles it, up to the schedule itself.
pub const FIRST_RETRY: Duration = Duration::from_secs(60);

/// What the scheduler knows of one host between rounds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostClock {
    /// When the last good backup finished (Unix seconds).
    pub last_success: Option<u64>,
    /// When the last attempt finished (Unix seconds).
    pub last_attempt: Option<u64>,
    /// Failed attempts since the last good one.
    pub failures: u32,
}

/// The wait after `failures` failed attempts: 1 min, 2 min, 4 min … never longer than `interval`.
pub fn backoff(failures: u32, interval: Duration) -> Duration {
    let factor = 1u64 << failures.saturating_sub(1).min(20);
    FIRST_RETRY
        .saturating_mul(u32::try_from(factor).unwrap_or(u32::MAX))
        .min(interval)
}

/// When a host is next due (Unix seconds): at once when never backed up, `interval` after its last
/// good backup, and after a failure when the backoff has passed.
pub fn next_due(clock: &HostClock, interval: Duration, now: u64) -> u64 {
    if clock.failures > 0 {
        let last = clock.last_attempt.unwrap_or(now);
        return last + backoff(clock.failures, interval).as_secs();
    }
    match clock.last_success {
        Some(t) => t + interval.as_secs(),
        None => now,
    }
}

/// The hosts to back up now, most overdue first, at most `cap` minus those still running.
pub fn due<'a>(
    hosts: impl IntoIterator<Item = (&'a str, &'a HostClock, bool)>,
    interval: Duration,
    now: u64,
    cap: u32,
) -> Vec<&'a str> {
    let mut running = 0usize;
    let mut ready: Vec<(u64, &str)> = Vec::new();
    for (name, clock, is_running) in hosts {
        if is_running {
            running += 1;
            continue;
        }
        let at = next_due(clock, interval, now);
        if at <= now {
            ready.push((at, name));
        }
    }
    ready.sort();
    let room = (cap as usize).saturating_sub(running);
    ready.into_iter().take(room).map(|(_, n)| n).collect()
}

/// Whether the periodic repository check is due.
pub fn check_due(last_check: Option<u64>, every: Duration, now: u64) -> bool {
    last_check.is_none_or(|t| t + every.as_secs() <= now)
}

/// One host of a round: who it is, what it carries, and how to reach it.
pub struct RoundHost<'a, S: Shell> {
    /// The Deployment.
    pub deployment: &'a str,
    /// The Application.
    pub application: &'a str,
    /// The host (`<deployment>-<application>`).
    pub host: &'a str,
    /// What to carry.
    pub data: &'a DataSpec,
    /// The host's shell.
    pub shell: &'a S,
}

/// Backs up the `hosts` (already chosen as due), at most `spec.maxConcurrent` at once, then applies
/// the retention to each host backed up. Returns each host's new status and clock, in order.
pub async fn run_round<S: Shell>(
    backuper: &Backuper,
    repo: &Repository,
    spec: &BackupSpec,
    revision: &str,
    hosts: &[RoundHost<'_, S>],
    previous: &[(HostBackupStatus, HostClock)],
    metrics: Option<&BackupMetrics>,
) -> Vec<(HostBackupStatus, HostClock)> {
    let cap = Semaphore::new(spec.max_concurrent.max(1) as usize);
    let work = hosts.iter().zip(previous).map(|(h, (status, clock))| {
        let cap = &cap;
        async move {
            let _permit = cap.acquire().await.ok();
            let target = BackupTarget {
                host: h.host,
                deployment: h.deployment,
                application: h.application,
                revision,
                data: h.data,
            };
            let result = backuper.backup(h.shell, repo, &target).await;
            let now = Timestamp::now();
            let mut status = status.clone();
            let mut clock = clock.clone();
            status.host = h.host.to_owned();
            clock.last_attempt = Some(now.unix());
            match result {
                Ok(report) => {
                    if let Some(m) = metrics {
                        m.success(h.deployment, h.host, &report, now.unix() as f64);
                    }
                    status.result = "Succeeded".into();
                    status.snapshot = Some(report.snapshot.clone());
                    status.time = Some(now);
                    status.bytes_added = report.bytes_added;
                    status.total_bytes = report.total_bytes;
                    status.files = report.files;
                    status.duration_millis = u64::try_from(report.duration.as_millis()).unwrap_or(u64::MAX);
                    status.message = None;
                    status.failures = 0;
                    clock.last_success = Some(now.unix());
                    clock.failures = 0;
                    if let Err(e) = backuper.forget(h.shell, repo, h.host, spec).await {
                        status.message = Some(format!("backed up, but the retention failed: {e}"));
                    }
                }
                Err(e) => {
                    if let Some(m) = metrics {
                        m.failure(h.deployment, h.host);
                    }
                    clock.failures += 1;
                    status.result = "Failed".into();
                    status.failures = clock.failures;
                    let retry = backoff(clock.failures, spec.interval()).as_secs();
                    status.message = Some(format!("{e} (next attempt in {retry} s)"));
                }
            }
            (status, clock)
        }
    });
    join_all(work).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn the_backoff_doubles_from_a_minute_and_never_exceeds_the_schedule() {
        let waits: Vec<u64> = (1..=5).map(|f| backoff(f, DAY).as_secs()).collect();
        assert_eq!(waits, vec![60, 120, 240, 480, 960]);
        assert_eq!(backoff(40, DAY), DAY);
        assert_eq!(backoff(3, Duration::from_secs(100)), Duration::from_secs(100));
    }

    #[test]
    fn a_new_host_is_due_at_once_a_backed_up_one_after_its_schedule_and_a_failed_one_after_the_backoff() {
        let now = 1_000_000;
        assert_eq!(next_due(&HostClock::default(), DAY, now), now);
        let ok = HostClock {
            last_success: Some(now - 100),
            last_attempt: Some(now - 100),
            failures: 0,
        };
        assert_eq!(next_due(&ok, DAY, now), now - 100 + 86_400);
        let failed = HostClock {
            last_success: Some(now - 90_000),
            last_attempt: Some(now - 30),
            failures: 2,
        };
        assert_eq!(next_due(&failed, DAY, now), now - 30 + 120);
    }

    #[test]
    fn the_cap_counts_running_backups_and_the_most_overdue_go_first() {
        let now = 1_000_000;
        let fresh = HostClock::default();
        let overdue = HostClock {
            last_success: Some(now - 2 * 86_400),
            ..HostClock::default()
        };
        let recent = HostClock {
            last_success: Some(now - 10),
            ..HostClock::default()
        };
        let hosts = [
            ("a", &fresh, false),
            ("b", &overdue, false),
            ("c", &recent, false),
            ("d", &fresh, true),
        ];
        assert_eq!(due(hosts, DAY, now, 2), vec!["b"]);
        assert_eq!(due(hosts, DAY, now, 4), vec!["b", "a"]);
        assert!(due(hosts, DAY, now, 1).is_empty());
    }

    #[test]
    fn the_repository_check_runs_first_and_then_every_period() {
        assert!(check_due(None, DAY, 5));
        assert!(!check_due(Some(100), DAY, 100 + 86_399));
        assert!(check_due(Some(100), DAY, 100 + 86_400));
    }
}
