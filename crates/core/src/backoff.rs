//! When to retry a failed upstream call: exponential backoff with full jitter,
//! bounded by the request's deadline.
//!
//! The wait before retry `k` is drawn uniformly from `[0, ceiling(k))`, where
//! the ceiling doubles from `initial_backoff` up to `max_backoff` ("full
//! jitter", which spreads retries of many clients best). A retry is only
//! worth making if, after the wait, enough time is left before the deadline
//! for the attempt to succeed.
//!
//! Everything is pure: the caller supplies the random number and the elapsed
//! time, so the schedule is tested without a clock or a random generator.

use std::time::Duration;

use serde::{Deserialize, Serialize};

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Fixed-point scale of the jitter fraction: the 53 bits of an `f64` mantissa.
const UNIT_SCALE: u128 = 1 << 53;

/// How often and how patiently a failed call is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts in total, the first call included; 0 or 1 means no retry.
    pub max_attempts: u32,
    /// The ceiling of the wait before the first retry.
    pub initial_backoff: Duration,
    /// The largest ceiling of any wait.
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// The ceiling of the wait before retry number `retry` (1-based, 0 counts as 1): min(max_backoff, initial_backoff * 2^(retry-1)), saturating.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let mut wait = self.initial_backoff;
        // Doubling a non-zero wait passes any `max_backoff` within about 95
        // steps, so this loop is short even for `retry == u32::MAX`.
        for _ in 1..retry {
            if wait.is_zero() || wait >= self.max_backoff {
                break;
            }
            wait = wait.saturating_mul(2);
        }
        wait.min(self.max_backoff)
    }

    /// Full jitter: `ceiling(retry) * unit` for a caller-supplied uniform `unit` in [0, 1), so the result is below the ceiling (or zero).
    ///
    /// `unit` is clamped to [0, 1); NaN counts as 0.
    pub fn jittered(&self, retry: u32, unit: f64) -> Duration {
        let ceiling = self.ceiling(retry).as_nanos();
        let fraction = unit_fraction(unit);
        // ceiling * fraction / 2^53 without overflowing u128: split the
        // ceiling (< 2^95 ns) at bit 53.
        let high = (ceiling >> 53) * fraction;
        let low = ((ceiling & (UNIT_SCALE - 1)) * fraction) >> 53;
        nanos_to_duration(high + low)
    }

    /// The wait before retrying attempt number `attempt` (1-based; the first call was attempt 1), or `None` when it may not be retried.
    ///
    /// `Some(wait)` when `attempt < max_attempts` and `elapsed + wait` leaves
    /// at least `min_attempt_time` before `deadline` (both measured from the
    /// start of the request); `wait` is [`RetryPolicy::jittered`] for retry
    /// number `attempt` with `unit`.
    pub fn next_delay(
        &self,
        attempt: u32,
        unit: f64,
        elapsed: Duration,
        deadline: Duration,
        min_attempt_time: Duration,
    ) -> Option<Duration> {
        if attempt.max(1) >= self.max_attempts {
            return None;
        }
        let wait = self.jittered(attempt, unit);
        let next_attempt_ends = elapsed.checked_add(wait)?.checked_add(min_attempt_time)?;
        (next_attempt_ends <= deadline).then_some(wait)
    }
}

/// `unit` clamped to [0, 1) as a fraction of 2^53, in [0, 2^53).
fn unit_fraction(unit: f64) -> u128 {
    if unit.is_nan() || unit <= 0.0 {
        return 0;
    }
    // Every f64 in [0, 1) times 2^53 is an exact integer below 2^53.
    let scaled = (unit.min(1.0) * UNIT_SCALE as f64) as u128;
    scaled.min(UNIT_SCALE - 1)
}

fn nanos_to_duration(nanos: u128) -> Duration {
    match u64::try_from(nanos / NANOS_PER_SEC) {
        Ok(secs) => Duration::new(secs, (nanos % NANOS_PER_SEC) as u32),
        Err(_) => Duration::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(m: u64) -> Duration {
        Duration::from_millis(m)
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            initial_backoff: ms(100),
            max_backoff: ms(1000),
        }
    }

    #[test]
    fn ceilings_double_and_cap() {
        let p = policy();
        let ceilings: Vec<Duration> = (1..=6).map(|r| p.ceiling(r)).collect();
        assert_eq!(
            ceilings,
            [ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]
        );
        assert_eq!(p.ceiling(0), ms(100));
        assert_eq!(p.ceiling(u32::MAX), ms(1000));
    }

    #[test]
    fn ceilings_saturate_instead_of_overflowing() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_secs(u64::MAX / 2),
            max_backoff: Duration::MAX,
        };
        assert_eq!(p.ceiling(2), Duration::from_secs(u64::MAX - 1));
        assert_eq!(p.ceiling(3), Duration::MAX);
        assert_eq!(p.ceiling(u32::MAX), Duration::MAX);
        let zero = RetryPolicy {
            initial_backoff: Duration::ZERO,
            ..p
        };
        assert_eq!(zero.ceiling(u32::MAX), Duration::ZERO);
    }

    #[test]
    fn jitter_stays_below_the_ceiling() {
        let p = policy();
        assert_eq!(p.jittered(1, 0.0), Duration::ZERO);
        assert_eq!(p.jittered(1, 0.5), ms(50));
        assert_eq!(p.jittered(3, 0.25), ms(100));
        for unit in [0.999_999_999_999, 1.0, 7.0, f64::INFINITY] {
            let wait = p.jittered(2, unit);
            assert!(wait < ms(200) && wait > ms(199), "{unit}: {wait:?}");
        }
        for unit in [-0.5, f64::NEG_INFINITY, f64::NAN] {
            assert_eq!(p.jittered(2, unit), Duration::ZERO, "{unit}");
        }
    }

    #[test]
    fn next_delay_is_none_at_max_attempts() {
        let p = policy();
        let far = Duration::from_secs(3600);
        for attempt in 1..4 {
            assert_eq!(
                p.next_delay(attempt, 0.5, ms(0), far, ms(0)),
                Some(p.jittered(attempt, 0.5))
            );
        }
        assert_eq!(p.next_delay(4, 0.5, ms(0), far, ms(0)), None);
        assert_eq!(p.next_delay(u32::MAX, 0.5, ms(0), far, ms(0)), None);
        let once = RetryPolicy {
            max_attempts: 1,
            ..p
        };
        assert_eq!(once.next_delay(1, 0.5, ms(0), far, ms(0)), None);
    }

    #[test]
    fn next_delay_is_none_when_the_deadline_would_be_exceeded() {
        let p = policy();
        // Retry 2 waits 100 ms (half of 200 ms); 300 + 100 + 100 = 500 fits exactly.
        assert_eq!(
            p.next_delay(2, 0.5, ms(300), ms(500), ms(100)),
            Some(ms(100))
        );
        assert_eq!(p.next_delay(2, 0.5, ms(301), ms(500), ms(100)), None);
        assert_eq!(p.next_delay(2, 0.5, ms(600), ms(500), ms(0)), None);
        assert_eq!(
            p.next_delay(2, 0.5, Duration::MAX, Duration::MAX, ms(1)),
            None
        );
    }

    proptest! {
        #[test]
        fn jitter_is_within_zero_and_the_ceiling(
            initial in any::<u64>(),
            max in any::<u64>(),
            retry in any::<u32>(),
            unit in any::<f64>(),
        ) {
            let p = RetryPolicy {
                max_attempts: 3,
                initial_backoff: Duration::from_nanos(initial),
                max_backoff: Duration::from_nanos(max),
            };
            let ceiling = p.ceiling(retry);
            prop_assert!(ceiling <= p.max_backoff);
            let wait = p.jittered(retry, unit);
            prop_assert!(wait < ceiling || wait.is_zero());
        }

        /// A caller that bounds every attempt by the time left and sleeps the
        /// returned delays never runs past the deadline, whatever the units.
        #[test]
        fn a_full_retry_sequence_never_passes_the_deadline(
            max_attempts in 0u32..12,
            initial_ms in 0u64..500,
            max_ms in 0u64..5_000,
            deadline_ms in 0u64..20_000,
            min_attempt_ms in 0u64..1_000,
            attempts in proptest::collection::vec((0u64..3_000, any::<f64>()), 12),
        ) {
            let p = RetryPolicy {
                max_attempts,
                initial_backoff: ms(initial_ms),
                max_backoff: ms(max_ms),
            };
            let deadline = ms(deadline_ms);
            let min_attempt_time = ms(min_attempt_ms);
            let mut elapsed = Duration::ZERO;
            let mut attempt = 1;
            for (took_ms, unit) in attempts {
                elapsed += ms(took_ms).min(deadline.saturating_sub(elapsed));
                let Some(wait) = p.next_delay(attempt, unit, elapsed, deadline, min_attempt_time) else {
                    break;
                };
                prop_assert!(wait <= p.ceiling(attempt));
                elapsed += wait;
                prop_assert!(elapsed + min_attempt_time <= deadline);
                attempt += 1;
            }
            prop_assert!(elapsed <= deadline);
            prop_assert!(attempt <= max_attempts.max(1));
        }
    }
}
