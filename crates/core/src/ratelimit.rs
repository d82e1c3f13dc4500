//! Request rate limiting with GCRA, the generic cell rate algorithm.
//!
//! GCRA keeps one timestamp per key, the theoretical arrival time (TAT): the
//! moment at which the key's bucket is completely full again. A request for
//! `n` cells is allowed when moving the TAT forward by `n` emission intervals
//! keeps it no more than `burst` intervals ahead of now. That behaves like a
//! token bucket (a burst of `burst` requests, then one every `period / limit`)
//! with one timestamp of state and no refill timer.
//!
//! Everything here is pure: the caller passes `now` as a [`Duration`] since an
//! epoch of its choosing (an `Instant` taken at start-up) and keeps one
//! [`Gcra`] per key. Arithmetic runs on nanoseconds in `u128` and saturates,
//! so no input panics; instants past `Duration::MAX` are clamped to it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// A quota: `limit` requests per `period`, at most `burst` at once.
///
/// The fields are public, so a quota can be built (or deserialized) with zero
/// fields; such a quota never panics: a zero `limit` counts as 1, a zero
/// `period` gives the 1 ns minimum interval, and a zero `burst` denies every
/// request. Use [`Quota::new`] to reject them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    /// Requests allowed per `period` in the long run.
    pub limit: u64,
    /// The period over which `limit` applies.
    pub period: Duration,
    /// Requests that may go through at once when the bucket is full.
    pub burst: u64,
}

impl Quota {
    /// Builds a quota; `None` if `limit`, `period` or `burst` is zero.
    pub fn new(limit: u64, period: Duration, burst: u64) -> Option<Quota> {
        if limit == 0 || period.is_zero() || burst == 0 {
            return None;
        }
        Some(Quota {
            limit,
            period,
            burst,
        })
    }

    /// The cost of one request, `period / limit`, rounded down to whole nanoseconds, at least 1 ns.
    pub fn emission_interval(&self) -> Duration {
        nanos_to_duration(self.interval_nanos())
    }

    fn interval_nanos(&self) -> u128 {
        (self.period.as_nanos() / u128::from(self.limit.max(1))).max(1)
    }

    /// `burst` emission intervals: how far the TAT may run ahead of now.
    fn capacity_nanos(&self) -> u128 {
        u128::from(self.burst).saturating_mul(self.interval_nanos())
    }
}

/// Result of asking the limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may go through.
    pub allowed: bool,
    /// The quota's `limit` (for `X-RateLimit-Limit`).
    pub limit: u64,
    /// Requests still allowed right now after this one; 0 when denied.
    pub remaining: u64,
    /// Time until the bucket is completely full again (for `X-RateLimit-Reset`).
    pub reset_after: Duration,
    /// When denied, time until the request would be allowed; zero when allowed.
    pub retry_after: Duration,
}

/// GCRA state of one key: the theoretical arrival time.
///
/// The default state is a full bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gcra {
    tat: Duration,
}

impl Gcra {
    /// Asks for one request at `now`; consumes one cell if allowed, changes nothing when denied.
    pub fn check(&mut self, quota: &Quota, now: Duration) -> Decision {
        self.check_n(quota, 1, now)
    }

    /// Asks for `n` cells at once at `now`; consumes them if allowed, changes nothing when denied.
    ///
    /// `n > quota.burst` can never be allowed, however long the caller waits:
    /// it is denied with `retry_after` set to the time until the bucket is
    /// full (at least one emission interval, so a denial never says "retry
    /// now"). Callers that charge more than one cell per request should
    /// compare `n` with `burst` themselves to report that case distinctly.
    /// `n == 0` consumes nothing; it is denied only while the bucket is
    /// over-full, which happens only after the quota shrank or `now` went back.
    pub fn check_n(&mut self, quota: &Quota, n: u64, now: Duration) -> Decision {
        let interval = quota.interval_nanos();
        let capacity = quota.capacity_nanos();
        let now_ns = now.as_nanos();
        let start = self.tat.as_nanos().max(now_ns);
        let new_tat = start.saturating_add(u128::from(n).saturating_mul(interval));
        // `new_tat >= start >= now_ns`, so these subtractions cannot underflow.
        let ahead = new_tat - now_ns;
        if n <= quota.burst && ahead <= capacity {
            self.tat = nanos_to_duration(new_tat);
            let used = self.tat.as_nanos().saturating_sub(now_ns);
            return Decision {
                allowed: true,
                limit: quota.limit,
                remaining: remaining(quota, used),
                reset_after: nanos_to_duration(used),
                retry_after: Duration::ZERO,
            };
        }
        let reset = start - now_ns;
        let retry = if n > quota.burst {
            reset.max(interval)
        } else {
            ahead - capacity
        };
        Decision {
            allowed: false,
            limit: quota.limit,
            remaining: 0,
            reset_after: nanos_to_duration(reset),
            retry_after: nanos_to_duration(retry),
        }
    }

    /// Reports the state at `now` without consuming anything: `remaining` counts requests allowed now, `allowed` is `remaining > 0`.
    ///
    /// `retry_after` is what [`Gcra::check`] would report at `now`.
    pub fn peek(&self, quota: &Quota, now: Duration) -> Decision {
        let used = self.tat.as_nanos().saturating_sub(now.as_nanos());
        let mut probe = *self;
        let single = probe.check(quota, now);
        let remaining = remaining(quota, used);
        Decision {
            allowed: remaining > 0,
            limit: quota.limit,
            remaining,
            reset_after: nanos_to_duration(used),
            retry_after: single.retry_after,
        }
    }

    /// Whether the bucket is full at `now`, so the entry can be forgotten.
    pub fn is_idle(&self, now: Duration) -> bool {
        self.tat <= now
    }
}

/// Whole requests that fit in the capacity left when the TAT is `used` ns ahead of now.
fn remaining(quota: &Quota, used: u128) -> u64 {
    let fit = quota.capacity_nanos().saturating_sub(used) / quota.interval_nanos();
    // The capacity saturates for absurd quotas; never report more than a burst.
    u64::try_from(fit).map_or(quota.burst, |fit| fit.min(quota.burst))
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

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn ms(m: u64) -> Duration {
        Duration::from_millis(m)
    }

    /// 10 per 10 s, burst 3: one request per second, three at once.
    fn ten_per_ten_seconds() -> Quota {
        Quota::new(10, secs(10), 3).expect("valid quota")
    }

    #[test]
    fn new_rejects_zero_fields() {
        assert_eq!(Quota::new(0, secs(1), 1), None);
        assert_eq!(Quota::new(1, Duration::ZERO, 1), None);
        assert_eq!(Quota::new(1, secs(1), 0), None);
        assert!(Quota::new(1, secs(1), 1).is_some());
    }

    #[test]
    fn emission_interval_is_period_over_limit_and_at_least_one_nanosecond() {
        assert_eq!(ten_per_ten_seconds().emission_interval(), secs(1));
        let q = Quota::new(3, Duration::from_nanos(10), 1).expect("valid quota");
        assert_eq!(q.emission_interval(), Duration::from_nanos(3));
        let q = Quota::new(u64::MAX, Duration::from_nanos(1), 1).expect("valid quota");
        assert_eq!(q.emission_interval(), Duration::from_nanos(1));
        let q = Quota::new(1, Duration::MAX, 1).expect("valid quota");
        assert_eq!(q.emission_interval(), Duration::MAX);
    }

    #[test]
    fn full_burst_is_allowed_at_once_then_denied() {
        let q = ten_per_ten_seconds();
        let mut g = Gcra::default();
        for _ in 0..3 {
            assert!(g.check(&q, secs(100)).allowed);
        }
        let denied = g.check(&q, secs(100));
        assert!(!denied.allowed);
        assert_eq!(denied.retry_after, secs(1));
    }

    #[test]
    fn one_cell_refills_after_one_emission_interval() {
        let q = ten_per_ten_seconds();
        let mut g = Gcra::default();
        for _ in 0..3 {
            assert!(g.check(&q, secs(5)).allowed);
        }
        assert!(!g.check(&q, secs(5) + ms(999)).allowed);
        assert!(g.check(&q, secs(6)).allowed);
        assert!(!g.check(&q, secs(6)).allowed);
    }

    #[test]
    fn worked_example_reports_exact_remaining_reset_and_retry() {
        let q = ten_per_ten_seconds();
        let mut g = Gcra::default();
        let expect = |allowed, remaining, reset_after, retry_after| Decision {
            allowed,
            limit: 10,
            remaining,
            reset_after,
            retry_after,
        };
        assert_eq!(
            g.check(&q, secs(0)),
            expect(true, 2, secs(1), Duration::ZERO)
        );
        assert_eq!(
            g.check(&q, secs(0)),
            expect(true, 1, secs(2), Duration::ZERO)
        );
        assert_eq!(
            g.check(&q, secs(0)),
            expect(true, 0, secs(3), Duration::ZERO)
        );
        assert_eq!(g.check(&q, secs(0)), expect(false, 0, secs(3), secs(1)));
        assert_eq!(g.check(&q, ms(500)), expect(false, 0, ms(2500), ms(500)));
        // At 1 s one cell has dripped out: allowed, and the bucket is full again.
        assert_eq!(
            g.check(&q, secs(1)),
            expect(true, 0, secs(3), Duration::ZERO)
        );
        // At 2.5 s one and a half cells have dripped out: one whole request fits.
        assert_eq!(
            g.check(&q, ms(2500)),
            expect(true, 0, ms(2500), Duration::ZERO)
        );
        assert_eq!(
            g.peek(&q, secs(3)),
            expect(true, 1, secs(2), Duration::ZERO)
        );
        assert_eq!(
            g.peek(&q, secs(5)),
            expect(true, 3, Duration::ZERO, Duration::ZERO)
        );
        assert!(g.is_idle(secs(5)));
        assert!(!g.is_idle(ms(4999)));
    }

    #[test]
    fn denial_leaves_state_unchanged() {
        let q = ten_per_ten_seconds();
        let mut g = Gcra::default();
        for _ in 0..3 {
            g.check(&q, secs(0));
        }
        let before = g;
        assert!(!g.check(&q, ms(10)).allowed);
        assert!(!g.check_n(&q, 2, ms(1500)).allowed);
        assert!(!g.check_n(&q, 4, secs(60)).allowed);
        assert_eq!(g, before);
    }

    #[test]
    fn peek_consumes_nothing() {
        let q = ten_per_ten_seconds();
        let mut g = Gcra::default();
        g.check(&q, secs(0));
        let before = g;
        let d = g.peek(&q, secs(0));
        assert_eq!((d.allowed, d.remaining, d.reset_after), (true, 2, secs(1)));
        assert_eq!(g, before);
        g.check_n(&q, 2, secs(0));
        let d = g.peek(&q, secs(0));
        assert_eq!((d.allowed, d.remaining, d.retry_after), (false, 0, secs(1)));
    }

    #[test]
    fn check_n_consumes_n_cells() {
        let q = ten_per_ten_seconds();
        let mut g = Gcra::default();
        let d = g.check_n(&q, 2, secs(0));
        assert_eq!((d.allowed, d.remaining, d.reset_after), (true, 1, secs(2)));
        let d = g.check_n(&q, 2, secs(0));
        assert_eq!((d.allowed, d.retry_after), (false, secs(1)));
        assert!(g.check_n(&q, 0, secs(0)).allowed);
    }

    #[test]
    fn more_cells_than_the_burst_are_denied_with_time_until_full() {
        let q = ten_per_ten_seconds();
        let mut g = Gcra::default();
        let d = g.check_n(&q, 4, secs(0));
        assert!(!d.allowed);
        assert_eq!(
            d.retry_after,
            secs(1),
            "a full bucket still waits one interval"
        );
        g.check_n(&q, 3, secs(0));
        let d = g.check_n(&q, u64::MAX, secs(1));
        assert!(!d.allowed);
        assert_eq!((d.reset_after, d.retry_after), (secs(2), secs(2)));
    }

    #[test]
    fn zero_burst_denies_everything_and_zero_limit_does_not_panic() {
        let mut g = Gcra::default();
        let no_burst = Quota {
            limit: 5,
            period: secs(1),
            burst: 0,
        };
        assert!(!g.check(&no_burst, secs(1)).allowed);
        assert!(!g.peek(&no_burst, secs(1)).allowed);
        let no_limit = Quota {
            limit: 0,
            period: Duration::ZERO,
            burst: 1,
        };
        assert!(g.check(&no_limit, secs(1)).allowed);
    }

    fn quota_strategy() -> impl Strategy<Value = Quota> {
        (1u64..20, 1u64..2_000, 1u64..8).prop_map(|(limit, period_ns, burst)| Quota {
            limit,
            period: Duration::from_nanos(period_ns),
            burst,
        })
    }

    fn any_duration() -> impl Strategy<Value = Duration> {
        prop_oneof![
            Just(Duration::ZERO),
            Just(Duration::MAX),
            (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
            any::<u64>().prop_map(Duration::from_nanos),
        ]
    }

    proptest! {
        /// Over any window of length W, GCRA admits at most `burst + ceil(W / T) - 1`
        /// cells, i.e. `cells * T < burst * T + W`; for a window of one period with
        /// `T = period / limit` exactly, that is at most `burst + limit - 1`.
        #[test]
        fn cells_in_any_window_stay_within_the_gcra_bound(
            quota in quota_strategy(),
            steps in proptest::collection::vec((0u64..600, 1u64..4), 1..200),
        ) {
            let mut g = Gcra::default();
            let mut now = 0u64;
            let mut admitted: Vec<(u64, u64)> = Vec::new();
            for (delta, n) in steps {
                now += delta;
                if g.check_n(&quota, n, Duration::from_nanos(now)).allowed {
                    admitted.push((now, n));
                }
            }
            let t = quota.emission_interval().as_nanos() as u64;
            let window = quota.period.as_nanos() as u64;
            for (i, &(start, _)) in admitted.iter().enumerate() {
                let cells: u64 = admitted[i..]
                    .iter()
                    .take_while(|(at, _)| *at < start + window)
                    .map(|(_, n)| n)
                    .sum();
                prop_assert!(cells * t < quota.burst * t + window);
                prop_assert!(cells <= quota.burst + window / t);
                if quota.period.as_nanos() % u128::from(quota.limit) == 0 {
                    prop_assert!(cells < quota.burst + quota.limit);
                }
            }
        }

        #[test]
        fn never_panics_for_arbitrary_input(
            limit in any::<u64>(),
            period in any_duration(),
            burst in any::<u64>(),
            n in any::<u64>(),
            tat in any_duration(),
            now in any_duration(),
        ) {
            let quota = Quota { limit, period, burst };
            let mut g = Gcra { tat };
            let _ = quota.emission_interval();
            let before = g;
            let peeked = g.peek(&quota, now);
            prop_assert_eq!(g, before);
            let mut copy = g;
            let single = copy.check(&quota, now);
            prop_assert_eq!(peeked.allowed, single.allowed);
            let d = g.check_n(&quota, n, now);
            if !d.allowed {
                prop_assert_eq!(g, before);
                prop_assert_eq!(d.remaining, 0);
                prop_assert!(!d.retry_after.is_zero());
            } else {
                prop_assert!(d.remaining <= burst);
                prop_assert_eq!(d.retry_after, Duration::ZERO);
            }
            let _ = g.is_idle(now);
        }

        #[test]
        fn retry_after_is_exact(
            quota in quota_strategy(),
            steps in proptest::collection::vec(0u64..300, 1..50),
            n_seed in any::<u64>(),
        ) {
            let mut g = Gcra::default();
            let mut now = 0u64;
            for delta in steps {
                now += delta;
                let n = 1 + n_seed % quota.burst;
                let at = Duration::from_nanos(now);
                let mut trial = g;
                let d = trial.check_n(&quota, n, at);
                if d.allowed {
                    g = trial;
                    continue;
                }
                let mut later = g;
                prop_assert!(later.check_n(&quota, n, at + d.retry_after).allowed);
                let mut earlier = g;
                let just_before = at + d.retry_after - Duration::from_nanos(1);
                prop_assert!(!earlier.check_n(&quota, n, just_before).allowed);
            }
        }
    }
}
