//! The drift scan's schedule: each owned VM's config is read at most once per drift interval, at a
//! point of the interval set by its VMID (so scans spread evenly), within a per-environment budget of
//! reads per second.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

// tokio's clock: the same as std's, except under a paused test clock.
use tokio::time::Instant;

/// How often each owned VM's config is read to find changes made out of band.
pub const DEFAULT_DRIFT_INTERVAL: Duration = Duration::from_secs(600);
/// Config reads per second the scan may make per environment (1,000 VMs need 1.7 at the default
/// interval), and the burst it may make at once.
pub const DRIFT_READS_PER_SECOND: f64 = 5.0;
const DRIFT_BURST: f64 = 10.0;

/// A bounded name for what drifted (a metric label).
pub fn kind_of_key(key: &str) -> &'static str {
    match key {
        "cores" | "sockets" | "cpu" => "cpu",
        "memory" => "memory",
        "tags" => "tags",
        "ciuser" | "cipassword" | "sshkeys" | "nameserver" | "searchdomain" | "cicustom" => "cloud_init",
        k if k.starts_with("ipconfig") => "cloud_init",
        k if k.starts_with("net") => "network",
        "agent" => "agent",
        _ => "other",
    }
}

/// When each VM's config is read next, and the read budget.
#[derive(Debug)]
pub struct DriftSchedule {
    interval: Duration,
    next: Mutex<HashMap<u32, Instant>>,
    bucket: Mutex<(f64, Instant)>,
}

impl DriftSchedule {
    /// A schedule reading each VM once per `interval` (zero: on every pass, within the budget).
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            next: Mutex::new(HashMap::new()),
            bucket: Mutex::new((DRIFT_BURST, Instant::now())),
        }
    }

    /// The interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The first scan of a VM seen now: somewhere in the coming interval, by its VMID (consecutive
    /// VMIDs land far apart, by the golden ratio).
    fn first(&self, vmid: u32, now: Instant) -> Instant {
        let fraction = (f64::from(vmid) * 0.618_033_988_749_895).fract();
        now + self.interval.mul_f64(fraction)
    }

    /// How long until `vmid`'s scan is due (zero: due now).
    pub fn due_in(&self, vmid: u32) -> Duration {
        let now = Instant::now();
        let mut next = self
            .next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let at = *next.entry(vmid).or_insert_with(|| self.first(vmid, now));
        at.saturating_duration_since(now)
    }

    /// Takes `vmid`'s scan if it is due and the budget has a read left: `Ok` sets its next scan one
    /// interval on; `Err` says how long until it is worth asking again.
    pub fn take(&self, vmid: u32) -> Result<(), Duration> {
        let due_in = self.due_in(vmid);
        if !due_in.is_zero() {
            return Err(due_in);
        }
        {
            let mut bucket = self
                .bucket
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = Instant::now();
            let tokens = (bucket.0 + now.duration_since(bucket.1).as_secs_f64() * DRIFT_READS_PER_SECOND)
                .min(DRIFT_BURST);
            if tokens < 1.0 {
                *bucket = (tokens, now);
                return Err(Duration::from_secs_f64((1.0 - tokens) / DRIFT_READS_PER_SECOND));
            }
            *bucket = (tokens - 1.0, now);
        }
        self.next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(vmid, Instant::now() + self.interval);
        Ok(())
    }

    /// Forgets a VM (destroyed or no longer ours).
    pub fn forget(&self, vmid: u32) {
        self.next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&vmid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_scans_spread_over_the_interval_and_then_come_once_per_interval() {
        let schedule = DriftSchedule::new(Duration::from_secs(600));
        let mut offsets: Vec<u64> = (1000..1010).map(|v| schedule.due_in(v).as_secs()).collect();
        offsets.sort_unstable();
        // Ten VMs over ten minutes: no two within half a minute, no gap of two minutes.
        assert!(offsets.iter().all(|o| *o < 600), "{offsets:?}");
        for pair in offsets.windows(2) {
            let gap = pair[1] - pair[0];
            assert!((30..120).contains(&gap), "{offsets:?}");
        }
        assert!(schedule.take(1000).is_err(), "not due yet");
    }

    #[test]
    fn a_scan_is_taken_once_per_interval_and_the_budget_bounds_a_burst() {
        let schedule = DriftSchedule::new(Duration::ZERO);
        let taken = (0..30).filter(|v| schedule.take(*v).is_ok()).count();
        assert_eq!(taken, DRIFT_BURST as usize, "the burst, then the rate");
        let wait = schedule.take(99).unwrap_err();
        assert!(wait <= Duration::from_millis(200), "{wait:?}");

        let hourly = DriftSchedule::new(Duration::from_secs(3600));
        hourly.next.lock().unwrap().insert(7, Instant::now());
        assert!(hourly.take(7).is_ok());
        let again = hourly.take(7).unwrap_err();
        assert!(again > Duration::from_secs(3590), "{again:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_shorter_interval_scans_each_vm_sooner_and_more_often() {
        let short = DriftSchedule::new(Duration::from_secs(60));
        let default = DriftSchedule::new(DEFAULT_DRIFT_INTERVAL);
        let vmids = 100..110;
        for vmid in vmids.clone() {
            let (sooner, later) = (short.due_in(vmid), default.due_in(vmid));
            assert!(
                sooner < Duration::from_secs(60) && sooner < later,
                "{vmid}: {sooner:?} vs {later:?}"
            );
        }
        // Ten minutes, looking every second as passes would.
        let mut scans = [0usize; 2];
        for _ in 0..600 {
            for (count, schedule) in scans.iter_mut().zip([&short, &default]) {
                *count += vmids.clone().filter(|v| schedule.take(*v).is_ok()).count();
            }
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_eq!(scans, [100, 10], "once a minute against once in ten minutes");
    }

    #[test]
    fn config_keys_map_to_a_few_bounded_kinds() {
        assert_eq!(kind_of_key("cores"), "cpu");
        assert_eq!(kind_of_key("memory"), "memory");
        assert_eq!(kind_of_key("ipconfig0"), "cloud_init");
        assert_eq!(kind_of_key("sshkeys"), "cloud_init");
        assert_eq!(kind_of_key("net0"), "network");
        assert_eq!(kind_of_key("whatever"), "other");
    }
}
