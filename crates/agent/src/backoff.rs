//! Reconnect delays: exponential backoff with full jitter, so a fleet of
//! agents that lost the gateway at the same moment does not come back in step.

use std::time::Duration;

/// Delay before the next connection attempt: a random duration in
/// `[0, min(max, initial * 2^n)]` where `n` counts the attempts since the
/// last [`reset`](Backoff::reset).
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `initial` and never exceeding `max`.
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            attempt: 0,
        }
    }

    /// The upper bound of the next delay.
    pub(crate) fn ceiling(&self) -> Duration {
        let factor = 2u32.checked_pow(self.attempt).unwrap_or(u32::MAX);
        self.initial
            .checked_mul(factor)
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// The next delay, drawn from the operating system's random source.
    pub(crate) fn next_delay(&mut self) -> Duration {
        self.next_delay_with(random_u64())
    }

    /// The next delay for a given random number; separate so tests can
    /// check the bounds without randomness.
    pub(crate) fn next_delay_with(&mut self, random: u64) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let ceiling_nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        if ceiling_nanos == 0 {
            return Duration::ZERO;
        }
        // `% (ceiling + 1)` makes the ceiling itself reachable.
        let nanos = match ceiling_nanos.checked_add(1) {
            Some(modulus) => random % modulus,
            None => random,
        };
        Duration::from_nanos(nanos)
    }

    /// Starts over from `initial`, after a connection that registered.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A random number; when the OS source fails (it practically never does),
/// the clock's nanoseconds are random enough for jitter.
fn random_u64() -> u64 {
    getrandom::u64().unwrap_or_else(|_| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::from(d.subsec_nanos()))
            .unwrap_or(0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn ceiling_doubles_from_initial_up_to_max() {
        let mut backoff = Backoff::new(100 * MS, 1000 * MS);
        let mut ceilings = Vec::new();
        for _ in 0..6 {
            ceilings.push(backoff.ceiling());
            backoff.next_delay_with(0);
        }
        assert_eq!(
            ceilings,
            [100 * MS, 200 * MS, 400 * MS, 800 * MS, 1000 * MS, 1000 * MS]
        );
    }

    #[test]
    fn delays_stay_within_zero_and_the_ceiling() {
        let mut backoff = Backoff::new(10 * MS, 300 * MS);
        for attempt in 0..40 {
            let ceiling = backoff.ceiling();
            let delay = backoff.next_delay();
            assert!(
                delay <= ceiling,
                "attempt {attempt}: {delay:?} > {ceiling:?}"
            );
            assert!(delay <= 300 * MS);
        }
    }

    #[test]
    fn extreme_random_numbers_hit_both_ends() {
        let mut low = Backoff::new(100 * MS, 1000 * MS);
        assert_eq!(low.next_delay_with(0), Duration::ZERO);
        let mut high = Backoff::new(100 * MS, 1000 * MS);
        let ceiling = high.ceiling();
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        assert_eq!(high.next_delay_with(nanos), ceiling);
        assert!(high.next_delay_with(u64::MAX) <= 200 * MS);
    }

    #[test]
    fn many_attempts_do_not_overflow() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        for _ in 0..200 {
            assert!(backoff.next_delay_with(u64::MAX) <= Duration::from_secs(60));
        }
        assert_eq!(backoff.ceiling(), Duration::from_secs(60));
    }

    #[test]
    fn reset_starts_over_from_initial() {
        let mut backoff = Backoff::new(50 * MS, 10_000 * MS);
        for _ in 0..5 {
            backoff.next_delay_with(7);
        }
        assert_eq!(backoff.ceiling(), 1600 * MS);
        backoff.reset();
        assert_eq!(backoff.ceiling(), 50 * MS);
    }
}
