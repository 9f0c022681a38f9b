//! A token bucket refilled continuously, on the clock its caller passes in (tokio's, so tests pause it): the work queue's start limit and the Proxmox client's request limit.

use std::time::Duration;

use tokio::time::Instant;

/// Tokens refilled at `per_second` up to `burst`; a rate of zero or less is no limit.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket (at least one token).
    pub fn new(per_second: f64, burst: f64, now: Instant) -> Self {
        let burst = burst.max(1.0);
        Self {
            per_second,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.last = now;
    }

    fn unlimited(&self) -> bool {
        self.per_second <= 0.0
    }

    /// Takes a token, or tells when the next one is available (and takes nothing).
    pub fn try_take(&mut self, now: Instant) -> Result<(), Instant> {
        if self.unlimited() {
            return Ok(());
        }
        self.refill(now);
        // Tolerate float rounding so a wake-up at the computed instant finds a whole token.
        if self.tokens >= 1.0 - 1e-9 {
            self.tokens = (self.tokens - 1.0).max(0.0);
            Ok(())
        } else {
            Err(now + Duration::from_secs_f64((1.0 - self.tokens) / self.per_second))
        }
    }

    /// Takes a token even when none is left, and returns how long to wait before using it: callers
    /// that each wait their turn, in the order they reserved.
    pub fn reserve(&mut self, now: Instant) -> Duration {
        if self.unlimited() {
            return Duration::ZERO;
        }
        self.refill(now);
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.per_second)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_burst_passes_then_a_try_names_the_instant_of_the_next_token() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 2.0, t0);
        assert_eq!((b.try_take(t0), b.try_take(t0)), (Ok(()), Ok(())));
        assert_eq!(b.try_take(t0), Err(t0 + Duration::from_millis(100)));
        assert_eq!(b.try_take(t0 + Duration::from_millis(100)), Ok(()));
    }

    #[test]
    fn reservations_past_the_burst_wait_one_interval_more_each() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 2.0, t0);
        let waits: Vec<u128> = (0..5).map(|_| b.reserve(t0).as_millis()).collect();
        assert_eq!(waits, [0, 0, 100, 200, 300]);
    }

    #[test]
    fn a_rate_of_zero_is_no_limit() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(0.0, 1.0, t0);
        for _ in 0..1000 {
            assert_eq!(b.reserve(t0), Duration::ZERO);
            assert_eq!(b.try_take(t0), Ok(()));
        }
    }
}
