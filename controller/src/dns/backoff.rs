//! Backoff per DNS server: after a failed exchange the server is left alone for a while, whoever asks.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::DnsError;

/// The first wait after a failed exchange with a DNS server; it doubles with every further failure.
pub const BACKOFF_BASE: Duration = Duration::from_secs(5);
/// The longest wait between attempts on a failing DNS server.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// How long to leave a DNS server alone after `failures` failed exchanges in a row.
pub fn backoff(failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    BACKOFF_BASE.saturating_mul(factor).min(BACKOFF_MAX)
}

/// The backoff state of one environment's DNS server.
struct Gate {
    failures: u32,
    until: Instant,
    last: DnsError,
}

/// One gate per environment (each has one DNS server), shared by every Deployment on it.
#[derive(Default)]
pub struct Gates(Mutex<HashMap<String, Gate>>);

impl Gates {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Gate>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the environment's server may be contacted now; otherwise the last error and the wait.
    pub fn check(&self, environment: &str) -> Result<(), (DnsError, Duration)> {
        let now = Instant::now();
        match self.lock().get(environment) {
            Some(gate) if gate.until > now => Err((gate.last.clone(), gate.until - now)),
            _ => Ok(()),
        }
    }

    /// Records a failed exchange; returns how long the server is now left alone.
    pub fn failed(&self, environment: &str, error: &DnsError) -> Duration {
        let mut gates = self.lock();
        let failures = gates.get(environment).map_or(0, |g| g.failures) + 1;
        let wait = backoff(failures);
        gates.insert(
            environment.to_owned(),
            Gate {
                failures,
                until: Instant::now() + wait,
                last: error.clone(),
            },
        );
        wait
    }

    /// Records a successful exchange: the next failure starts from the first wait again.
    pub fn succeeded(&self, environment: &str) {
        self.lock().remove(environment);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_after_failures_doubles_from_five_seconds_up_to_five_minutes() {
        let waits: Vec<u64> = (1..=8).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, vec![5, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_server_is_left_alone_until_its_backoff_has_passed() {
        let gates = Gates::default();
        let error = DnsError::Unreachable {
            server: "127.0.0.1:53".into(),
            why: "no answer".into(),
        };
        assert!(gates.check("env").is_ok());
        assert_eq!(gates.failed("env", &error), Duration::from_secs(5));
        let (last, wait) = gates.check("env").unwrap_err();
        assert_eq!(last, error);
        assert_eq!(wait, Duration::from_secs(5));
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(gates.check("env").is_err(), "still closed after 4 s");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(gates.check("env").is_ok(), "open after 5 s");
        assert_eq!(gates.failed("env", &error), Duration::from_secs(10));
        gates.succeeded("env");
        assert!(gates.check("env").is_ok());
        assert_eq!(
            gates.failed("env", &error),
            Duration::from_secs(5),
            "counting starts again"
        );
        assert!(
            gates.check("other").is_ok(),
            "one environment's failures do not close another's"
        );
    }
}
