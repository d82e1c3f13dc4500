//! The circuit breaker that stops calls to an upstream that keeps failing.
//!
//! A [`Breaker`] is closed (calls go through) until `failure_threshold`
//! consecutive calls fail; it then opens and rejects calls for
//! `open_timeout`. After that it turns half-open and admits up to
//! `success_threshold` probe calls: if they all succeed it closes, and the
//! first failure opens it again with a fresh timeout.
//!
//! The breaker is a plain state machine: the caller passes `now` (a
//! [`Duration`] since an epoch of its choosing) and the [`BreakerPolicy`] on
//! every call, so a policy change applies at once and tests need no clock. The
//! caller reports the outcome of every call it acquired exactly once, with
//! [`Breaker::on_success`], [`Breaker::on_failure`] or [`Breaker::on_ignored`].

use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// When a breaker opens, how long it stays open, and what closes it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerPolicy {
    /// Consecutive failures that open a closed breaker; 0 disables the breaker.
    pub failure_threshold: u32,
    /// Successful probes that close a half-open breaker (0 counts as 1); also the number of concurrent probes.
    pub success_threshold: u32,
    /// How long an open breaker rejects calls before it lets probes through.
    pub open_timeout: Duration,
}

impl BreakerPolicy {
    fn enabled(&self) -> bool {
        self.failure_threshold > 0
    }

    fn probe_slots(&self) -> u32 {
        self.success_threshold.max(1)
    }
}

/// The state of a breaker as reported to operators and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls are rejected until the open timeout has passed.
    Open,
    /// A limited number of probe calls go through to test the upstream.
    HalfOpen,
}

impl BreakerState {
    /// The value of the state gauge: closed 0, open 1, half-open 2.
    pub fn as_gauge(&self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::Open => 1.0,
            BreakerState::HalfOpen => 2.0,
        }
    }

    /// The snake_case name used in metrics labels and APIs.
    pub fn label(&self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// Why a call may not go through: the breaker is open, or half-open with every probe slot taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("circuit breaker is open; retry after {retry_after:?}")]
pub struct Rejected {
    /// Time until the breaker lets a probe through; `open_timeout` when half-open with every probe slot taken.
    ///
    /// In the half-open case the probes' outcome is not known yet; should they
    /// fail, the breaker stays open for at least `open_timeout` from now.
    pub retry_after: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Phase {
    #[default]
    Closed,
    Open {
        since: Duration,
    },
    HalfOpen {
        opened_at: Duration,
        successes: u32,
        in_flight: u32,
    },
}

/// The circuit breaker of one upstream.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Breaker {
    phase: Phase,
    consecutive_failures: u32,
    times_opened: u64,
}

impl Breaker {
    /// A closed breaker with no history.
    pub fn new() -> Breaker {
        Breaker::default()
    }

    /// The state at `now`; an open breaker whose timeout has passed reports half-open.
    pub fn state(&self, policy: &BreakerPolicy, now: Duration) -> BreakerState {
        if !policy.enabled() {
            return BreakerState::Closed;
        }
        match self.phase {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { since } if now < since.saturating_add(policy.open_timeout) => {
                BreakerState::Open
            }
            Phase::Open { .. } | Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Asks to make a call at `now`; on `Ok` the caller must report the call's outcome.
    ///
    /// Closed: always admits. Open: rejects until `open_timeout` has passed,
    /// then turns half-open. Half-open: admits a probe while fewer than
    /// `success_threshold` probes have been admitted and not yet ignored (a
    /// probe slot per success still needed); rejects the rest. A disabled
    /// breaker (`failure_threshold == 0`) closes and admits everything.
    pub fn try_acquire(&mut self, policy: &BreakerPolicy, now: Duration) -> Result<(), Rejected> {
        if !policy.enabled() {
            self.phase = Phase::Closed;
            return Ok(());
        }
        if let Phase::Open { since } = self.phase {
            let retry_at = since.saturating_add(policy.open_timeout);
            if now < retry_at {
                return Err(Rejected {
                    retry_after: retry_at - now,
                });
            }
            self.phase = Phase::HalfOpen {
                opened_at: since,
                successes: 0,
                in_flight: 0,
            };
        }
        match &mut self.phase {
            Phase::Closed => Ok(()),
            Phase::HalfOpen {
                successes,
                in_flight,
                ..
            } if in_flight.saturating_add(*successes) < policy.probe_slots() => {
                *in_flight += 1;
                Ok(())
            }
            Phase::HalfOpen { .. } | Phase::Open { .. } => Err(Rejected {
                retry_after: policy.open_timeout,
            }),
        }
    }

    /// Records a successful call: resets the failure count; closes a half-open breaker after `success_threshold` successes.
    ///
    /// A success reported while open (from a call admitted before the breaker
    /// opened) changes nothing but the failure count.
    pub fn on_success(&mut self, policy: &BreakerPolicy, _now: Duration) {
        self.consecutive_failures = 0;
        if let Phase::HalfOpen {
            successes,
            in_flight,
            ..
        } = &mut self.phase
        {
            *in_flight = in_flight.saturating_sub(1);
            *successes = successes.saturating_add(1);
            if *successes >= policy.probe_slots() {
                self.phase = Phase::Closed;
            }
        }
    }

    /// Records a failed call: opens a closed breaker at `failure_threshold` consecutive failures, reopens a half-open one at once.
    ///
    /// A failure reported while open (from a call admitted before the breaker
    /// opened) does not extend the open timeout.
    pub fn on_failure(&mut self, policy: &BreakerPolicy, now: Duration) {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        if !policy.enabled() {
            return;
        }
        match self.phase {
            Phase::Closed if self.consecutive_failures >= policy.failure_threshold => {
                self.open(now)
            }
            Phase::HalfOpen { .. } => self.open(now),
            Phase::Closed | Phase::Open { .. } => {}
        }
    }

    /// Records an admitted call whose outcome says nothing about health (e.g. cancelled by the client); frees a half-open probe slot.
    ///
    /// Outcomes are not tied to the acquisition that produced them: a call
    /// admitted while closed and ignored while half-open frees a slot it never
    /// held, letting one extra probe through.
    pub fn on_ignored(&mut self) {
        if let Phase::HalfOpen { in_flight, .. } = &mut self.phase {
            *in_flight = in_flight.saturating_sub(1);
        }
    }

    /// Closes the breaker and zeroes its failure and probe counts (a manual reset); `times_opened` is kept.
    pub fn reset(&mut self) {
        self.phase = Phase::Closed;
        self.consecutive_failures = 0;
    }

    /// When the breaker last opened, while it is open or half-open.
    pub fn opened_at(&self) -> Option<Duration> {
        match self.phase {
            Phase::Closed => None,
            Phase::Open { since } => Some(since),
            Phase::HalfOpen { opened_at, .. } => Some(opened_at),
        }
    }

    /// While open, when it will let a probe through (`opened_at + open_timeout`, saturating).
    pub fn retry_at(&self, policy: &BreakerPolicy) -> Option<Duration> {
        match self.phase {
            Phase::Open { since } => Some(since.saturating_add(policy.open_timeout)),
            Phase::Closed | Phase::HalfOpen { .. } => None,
        }
    }

    /// Failures reported since the last success or reset.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// How many times the breaker has opened (or reopened) in its lifetime.
    pub fn times_opened(&self) -> u64 {
        self.times_opened
    }

    fn open(&mut self, now: Duration) {
        self.phase = Phase::Open { since: now };
        self.times_opened = self.times_opened.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn policy(failures: u32, successes: u32) -> BreakerPolicy {
        BreakerPolicy {
            failure_threshold: failures,
            success_threshold: successes,
            open_timeout: secs(30),
        }
    }

    /// A breaker opened at `at` by `p.failure_threshold` failures.
    fn opened(p: &BreakerPolicy, at: Duration) -> Breaker {
        let mut b = Breaker::new();
        for _ in 0..p.failure_threshold {
            assert!(b.try_acquire(p, at).is_ok());
            b.on_failure(p, at);
        }
        assert_eq!(b.state(p, at), BreakerState::Open);
        b
    }

    #[test]
    fn opens_after_exactly_the_threshold_of_consecutive_failures() {
        let p = policy(3, 1);
        let mut b = Breaker::new();
        for i in 1..=2 {
            b.on_failure(&p, secs(i));
            assert_eq!(b.state(&p, secs(i)), BreakerState::Closed);
            assert!(b.try_acquire(&p, secs(i)).is_ok());
        }
        b.on_failure(&p, secs(3));
        assert_eq!(b.state(&p, secs(3)), BreakerState::Open);
        assert_eq!(b.opened_at(), Some(secs(3)));
        assert_eq!(b.times_opened(), 1);
        assert_eq!(b.consecutive_failures(), 3);
    }

    #[test]
    fn a_success_between_failures_resets_the_count() {
        let p = policy(3, 1);
        let mut b = Breaker::new();
        b.on_failure(&p, secs(1));
        b.on_failure(&p, secs(2));
        b.on_success(&p, secs(3));
        assert_eq!(b.consecutive_failures(), 0);
        b.on_failure(&p, secs(4));
        b.on_failure(&p, secs(5));
        assert_eq!(b.state(&p, secs(5)), BreakerState::Closed);
        b.on_failure(&p, secs(6));
        assert_eq!(b.state(&p, secs(6)), BreakerState::Open);
    }

    #[test]
    fn open_breaker_rejects_with_the_time_left_until_its_timeout() {
        let p = policy(1, 1);
        let mut b = opened(&p, secs(100));
        assert_eq!(b.retry_at(&p), Some(secs(130)));
        assert_eq!(
            b.try_acquire(&p, secs(100)),
            Err(Rejected {
                retry_after: secs(30)
            })
        );
        assert_eq!(
            b.try_acquire(&p, secs(121)),
            Err(Rejected {
                retry_after: secs(9)
            })
        );
        assert_eq!(b.state(&p, secs(129)), BreakerState::Open);
        assert_eq!(b.state(&p, secs(130)), BreakerState::HalfOpen);
    }

    #[test]
    fn after_the_timeout_only_success_threshold_probes_are_admitted() {
        let p = policy(1, 2);
        let mut b = opened(&p, secs(0));
        assert!(b.try_acquire(&p, secs(30)).is_ok());
        assert!(b.try_acquire(&p, secs(30)).is_ok());
        assert_eq!(
            b.try_acquire(&p, secs(31)),
            Err(Rejected {
                retry_after: p.open_timeout
            })
        );
        assert_eq!(b.state(&p, secs(31)), BreakerState::HalfOpen);
        assert_eq!(b.retry_at(&p), None);
        assert_eq!(b.opened_at(), Some(secs(0)));
    }

    #[test]
    fn a_single_probe_is_admitted_with_a_success_threshold_of_one() {
        let p = policy(1, 1);
        let mut b = opened(&p, secs(0));
        assert!(b.try_acquire(&p, secs(30)).is_ok());
        assert!(b.try_acquire(&p, secs(30)).is_err());
    }

    #[test]
    fn success_threshold_successes_close_the_breaker() {
        let p = policy(1, 2);
        let mut b = opened(&p, secs(0));
        assert!(b.try_acquire(&p, secs(30)).is_ok());
        assert!(b.try_acquire(&p, secs(30)).is_ok());
        b.on_success(&p, secs(31));
        assert_eq!(b.state(&p, secs(31)), BreakerState::HalfOpen);
        // The slot of a successful probe is not handed out again: one more success closes.
        assert!(b.try_acquire(&p, secs(31)).is_err());
        b.on_success(&p, secs(32));
        assert_eq!(b.state(&p, secs(32)), BreakerState::Closed);
        assert_eq!(b.opened_at(), None);
        assert!(b.try_acquire(&p, secs(32)).is_ok());
    }

    #[test]
    fn a_failure_in_half_open_reopens_with_a_fresh_timeout() {
        let p = policy(1, 2);
        let mut b = opened(&p, secs(0));
        assert!(b.try_acquire(&p, secs(40)).is_ok());
        b.on_failure(&p, secs(45));
        assert_eq!(b.state(&p, secs(45)), BreakerState::Open);
        assert_eq!(b.opened_at(), Some(secs(45)));
        assert_eq!(b.retry_at(&p), Some(secs(75)));
        assert_eq!(b.times_opened(), 2);
        assert_eq!(
            b.try_acquire(&p, secs(50)),
            Err(Rejected {
                retry_after: secs(25)
            })
        );
    }

    #[test]
    fn an_ignored_probe_frees_its_slot() {
        let p = policy(1, 1);
        let mut b = opened(&p, secs(0));
        assert!(b.try_acquire(&p, secs(30)).is_ok());
        assert!(b.try_acquire(&p, secs(30)).is_err());
        b.on_ignored();
        assert!(b.try_acquire(&p, secs(30)).is_ok());
    }

    #[test]
    fn late_outcomes_while_open_change_nothing() {
        let p = policy(1, 1);
        let mut b = opened(&p, secs(0));
        b.on_failure(&p, secs(20));
        assert_eq!(b.retry_at(&p), Some(secs(30)));
        b.on_success(&p, secs(21));
        b.on_ignored();
        assert_eq!(b.state(&p, secs(21)), BreakerState::Open);
        assert_eq!(b.times_opened(), 1);
    }

    #[test]
    fn reset_closes_and_zeroes_the_counters() {
        let p = policy(2, 1);
        let mut b = opened(&p, secs(0));
        b.reset();
        assert_eq!(b.state(&p, secs(1)), BreakerState::Closed);
        assert_eq!(b.consecutive_failures(), 0);
        assert_eq!(b.opened_at(), None);
        assert_eq!(b.times_opened(), 1, "the lifetime total survives a reset");
        b.on_failure(&p, secs(1));
        assert_eq!(b.state(&p, secs(1)), BreakerState::Closed);
    }

    #[test]
    fn a_zero_failure_threshold_disables_the_breaker() {
        let p = policy(0, 1);
        let mut b = Breaker::new();
        for i in 0..100 {
            assert!(b.try_acquire(&p, secs(i)).is_ok());
            b.on_failure(&p, secs(i));
        }
        assert_eq!(b.state(&p, secs(100)), BreakerState::Closed);
        assert_eq!(b.times_opened(), 0);
        // Disabling an open breaker lets calls through at once.
        let enabled = policy(1, 1);
        let mut b = opened(&enabled, secs(0));
        assert_eq!(b.state(&p, secs(1)), BreakerState::Closed);
        assert!(b.try_acquire(&p, secs(1)).is_ok());
        assert_eq!(b.state(&enabled, secs(1)), BreakerState::Closed);
    }

    #[test]
    fn gauge_values_and_labels() {
        let all = [
            BreakerState::Closed,
            BreakerState::Open,
            BreakerState::HalfOpen,
        ];
        let gauges: Vec<f64> = all.iter().map(BreakerState::as_gauge).collect();
        assert_eq!(gauges, [0.0, 1.0, 2.0]);
        for state in all {
            let json = serde_json::to_string(&state).expect("serializes");
            assert_eq!(json, format!("\"{}\"", state.label()));
        }
    }

    #[derive(Debug, Clone)]
    enum Event {
        Advance(u64),
        Acquire,
        Succeed(usize),
        Fail(usize),
        Ignore(usize),
        Reset,
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            1 => (0u64..40).prop_map(Event::Advance),
            4 => Just(Event::Acquire),
            2 => any::<usize>().prop_map(Event::Succeed),
            2 => any::<usize>().prop_map(Event::Fail),
            1 => any::<usize>().prop_map(Event::Ignore),
            1 => Just(Event::Reset),
        ]
    }

    fn any_duration() -> impl Strategy<Value = Duration> {
        prop_oneof![
            Just(Duration::ZERO),
            Just(Duration::MAX),
            any::<u64>().prop_map(Duration::from_nanos),
            (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        ]
    }

    proptest! {
        /// A caller that reports outcomes in any order, late and spurious ones
        /// included. Within one half-open episode the probes still outstanding
        /// never exceed `success_threshold`, plus one for every ignored outcome
        /// that did not belong to a probe of the episode (the documented limit).
        #[test]
        fn half_open_never_admits_more_than_success_threshold_probes(
            failure_threshold in 0u32..4,
            success_threshold in 0u32..4,
            timeout_ms in 0u64..50,
            events in proptest::collection::vec(event(), 1..300),
        ) {
            let p = BreakerPolicy {
                failure_threshold,
                success_threshold,
                open_timeout: Duration::from_millis(timeout_ms),
            };
            let mut b = Breaker::new();
            let mut now = Duration::ZERO;
            // Outstanding calls: the half-open episode they probe, if any.
            let mut calls: Vec<Option<u64>> = Vec::new();
            let mut episode = 0u64;
            let mut foreign_ignored = 0usize;
            for e in events {
                let half_open = matches!(b.phase, Phase::HalfOpen { .. });
                match e {
                    Event::Advance(ms) => now += Duration::from_millis(ms),
                    Event::Acquire => {
                        let was_open = matches!(b.phase, Phase::Open { .. });
                        let admitted = b.try_acquire(&p, now).is_ok();
                        let is_half_open = matches!(b.phase, Phase::HalfOpen { .. });
                        if was_open && is_half_open {
                            episode += 1;
                            foreign_ignored = 0;
                        }
                        if admitted {
                            calls.push(is_half_open.then_some(episode));
                        }
                    }
                    Event::Succeed(i) | Event::Fail(i) | Event::Ignore(i) => {
                        let call = if calls.is_empty() { None } else { calls.remove(i % calls.len()) };
                        match e {
                            Event::Succeed(_) => b.on_success(&p, now),
                            Event::Fail(_) => b.on_failure(&p, now),
                            _ => {
                                if half_open && call != Some(episode) {
                                    foreign_ignored += 1;
                                }
                                b.on_ignored();
                            }
                        }
                    }
                    Event::Reset => b.reset(),
                }
                if let Phase::HalfOpen { successes, in_flight, .. } = b.phase {
                    prop_assert!(in_flight + successes <= p.probe_slots());
                    let probes = calls.iter().filter(|c| **c == Some(episode)).count();
                    prop_assert!(probes <= p.probe_slots() as usize + foreign_ignored);
                }
                if !p.enabled() {
                    prop_assert_eq!(b.state(&p, now), BreakerState::Closed);
                }
            }
        }

        #[test]
        fn never_panics_for_arbitrary_input(
            failure_threshold in any::<u32>(),
            success_threshold in any::<u32>(),
            open_timeout in any_duration(),
            events in proptest::collection::vec((event(), any_duration()), 1..100),
        ) {
            let p = BreakerPolicy { failure_threshold, success_threshold, open_timeout };
            let mut b = Breaker::new();
            for (e, now) in events {
                match e {
                    Event::Advance(_) => {}
                    Event::Acquire => {
                        let _ = b.try_acquire(&p, now);
                    }
                    Event::Succeed(_) => b.on_success(&p, now),
                    Event::Fail(_) => b.on_failure(&p, now),
                    Event::Ignore(_) => b.on_ignored(),
                    Event::Reset => b.reset(),
                }
                let _ = (b.state(&p, now), b.opened_at(), b.retry_at(&p));
                let _ = (b.consecutive_failures(), b.times_opened());
            }
        }
    }
}
