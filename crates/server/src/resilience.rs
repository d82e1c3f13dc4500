//! Per-upstream protection of the call path: the circuit breaker (state in
//! [`meshgate_core::breaker`], a clock and metrics here) and the call pool, a
//! bounded set of call slots with a checkout timeout. [`UpstreamTraffic`] is
//! what `handler::forward` asks before every attempt.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use meshgate_core::UpstreamConfig;
use meshgate_core::breaker::{Breaker, BreakerPolicy, BreakerState};
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Time since the process's first look at the clock: the `now` of the pure
/// policies in `meshgate_core`.
pub fn mono_now() -> Duration {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed()
}

/// A uniform random number in [0, 1), for backoff jitter.
pub fn unit_random() -> f64 {
    match getrandom::u64() {
        Ok(v) => (v >> 11) as f64 / (1u64 << 53) as f64,
        Err(_) => 0.5,
    }
}

/// Breaker and pool of one upstream.
pub struct UpstreamTraffic {
    name: String,
    policy: BreakerPolicy,
    breaker: Mutex<Breaker>,
    slots: Arc<Semaphore>,
    size: u32,
    capacity: u32,
    checkout_timeout: Duration,
    in_use: AtomicU32,
    peak: AtomicU32,
    checkouts: AtomicU64,
    overflowed: AtomicU64,
    timeouts: AtomicU64,
}

/// A call slot; returned to the pool when dropped.
pub struct PoolLease {
    _permit: OwnedSemaphorePermit,
    owner: Arc<UpstreamTraffic>,
}

impl Drop for PoolLease {
    fn drop(&mut self) {
        let now = self
            .owner
            .in_use
            .fetch_sub(1, Ordering::AcqRel)
            .saturating_sub(1);
        self.owner.publish_usage(now);
    }
}

/// Why the pool gave no slot.
#[derive(Debug, Clone, Copy)]
pub struct PoolTimeout {
    /// How long the call waited.
    pub waited: Duration,
    /// Slots in the pool (size + overflow).
    pub capacity: u32,
}

impl UpstreamTraffic {
    /// The breaker and pool for `cfg`.
    pub fn new(cfg: &UpstreamConfig) -> UpstreamTraffic {
        let capacity = cfg.pool.size.saturating_add(cfg.pool.overflow).max(1);
        let t = UpstreamTraffic {
            name: cfg.name.clone(),
            policy: cfg.breaker.policy(),
            breaker: Mutex::new(Breaker::new()),
            slots: Arc::new(Semaphore::new(capacity as usize)),
            size: cfg.pool.size.max(1),
            capacity,
            checkout_timeout: Duration::from_millis(cfg.pool.checkout_timeout_ms),
            in_use: AtomicU32::new(0),
            peak: AtomicU32::new(0),
            checkouts: AtomicU64::new(0),
            overflowed: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
        };
        t.publish_state(BreakerState::Closed);
        t.publish_usage(0);
        t
    }

    /// The configured breaker policy.
    pub fn policy(&self) -> &BreakerPolicy {
        &self.policy
    }

    fn with_breaker<R>(&self, f: impl FnOnce(&mut Breaker, Duration) -> R) -> R {
        let now = mono_now();
        let mut b = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        let before = b.state(&self.policy, now);
        let r = f(&mut b, now);
        let after = b.state(&self.policy, now);
        drop(b);
        if before != after {
            match after {
                BreakerState::Open => {
                    metrics::counter!("gateway_circuit_breaker_opened_total", "upstream" => self.name.clone()).increment(1);
                    tracing::warn!(upstream = %self.name, open_ms = self.policy.open_timeout.as_millis() as u64, "circuit breaker opened")
                }
                BreakerState::Closed => {
                    tracing::info!(upstream = %self.name, "circuit breaker closed")
                }
                BreakerState::HalfOpen => {
                    tracing::info!(upstream = %self.name, "circuit breaker half-open: probing")
                }
            }
        }
        self.publish_state(after);
        r
    }

    fn publish_state(&self, state: BreakerState) {
        metrics::gauge!("gateway_circuit_breaker_state", "upstream" => self.name.clone())
            .set(state.as_gauge());
    }

    fn publish_usage(&self, in_use: u32) {
        metrics::gauge!("gateway_pool_usage_ratio", "pool" => self.name.clone())
            .set(f64::from(in_use) / f64::from(self.size));
        metrics::gauge!("gateway_pool_in_use", "pool" => self.name.clone()).set(f64::from(in_use));
    }

    /// Asks the breaker to let a call through; `Err` carries the time until
    /// it will let a probe through.
    pub fn admit(&self) -> Result<(), Duration> {
        self.with_breaker(|b, now| b.try_acquire(&self.policy, now))
            .map_err(|r| r.retry_after)
    }

    /// The call reached the upstream and got an answer (tool errors included).
    pub fn on_success(&self) {
        self.with_breaker(|b, now| b.on_success(&self.policy, now));
    }

    /// The call timed out or its transport failed.
    pub fn on_failure(&self) {
        self.with_breaker(|b, now| b.on_failure(&self.policy, now));
    }

    /// The call ended without saying anything about the upstream's health.
    pub fn on_ignored(&self) {
        self.with_breaker(|b, _| b.on_ignored());
    }

    /// Closes the breaker (manual reset).
    pub fn reset_breaker(&self) {
        self.with_breaker(|b, _| b.reset());
    }

    /// Current breaker state.
    pub fn breaker_state(&self) -> BreakerState {
        self.with_breaker(|b, now| b.state(&self.policy, now))
    }

    /// Takes a call slot, waiting at most the checkout timeout or `budget`,
    /// whichever is shorter.
    pub async fn checkout(self: &Arc<Self>, budget: Duration) -> Result<PoolLease, PoolTimeout> {
        let started = Instant::now();
        let wait = self.checkout_timeout.min(budget);
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(p) => Ok(p),
            Err(_) => match tokio::time::timeout(wait, self.slots.clone().acquire_owned()).await {
                Ok(Ok(p)) => Ok(p),
                _ => Err(()),
            },
        };
        let Ok(permit) = permit else {
            self.timeouts.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("gateway_errors_total", "type" => "pool_timeout").increment(1);
            return Err(PoolTimeout {
                waited: started.elapsed(),
                capacity: self.capacity,
            });
        };
        let now = self.in_use.fetch_add(1, Ordering::AcqRel) + 1;
        self.peak.fetch_max(now, Ordering::Relaxed);
        self.checkouts.fetch_add(1, Ordering::Relaxed);
        if now > self.size {
            self.overflowed.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("gateway_pool_overflow_total", "pool" => self.name.clone())
                .increment(1);
        }
        self.publish_usage(now);
        Ok(PoolLease {
            _permit: permit,
            owner: self.clone(),
        })
    }

    /// Calls in flight now.
    pub fn in_use(&self) -> u32 {
        self.in_use.load(Ordering::Acquire)
    }

    /// In-use slots over `size` (above 1 means overflow slots are in use).
    pub fn usage_ratio(&self) -> f64 {
        f64::from(self.in_use()) / f64::from(self.size)
    }

    /// The breaker as the admin API shows it.
    pub fn breaker_json(&self) -> Value {
        let (state, failures, opened, retry_in) = self.with_breaker(|b, now| {
            let state = b.state(&self.policy, now);
            let retry_in = match state {
                BreakerState::Open => b
                    .retry_at(&self.policy)
                    .map(|at| at.saturating_sub(now).as_millis() as u64),
                _ => None,
            };
            (state, b.consecutive_failures(), b.times_opened(), retry_in)
        });
        json!({
            "upstream": self.name,
            "state": state.label(),
            "consecutive_failures": failures,
            "times_opened": opened,
            "retry_in_ms": retry_in,
            "failure_threshold": self.policy.failure_threshold,
            "success_threshold": self.policy.success_threshold,
            "open_timeout_ms": self.policy.open_timeout.as_millis() as u64,
        })
    }

    /// The pool as the admin API shows it.
    pub fn pool_json(&self) -> Value {
        json!({
            "pool": self.name,
            "size": self.size,
            "overflow": self.capacity - self.size.min(self.capacity),
            "in_use": self.in_use(),
            "usage_ratio": self.usage_ratio(),
            "peak_in_use": self.peak.load(Ordering::Relaxed),
            "checkouts": self.checkouts.load(Ordering::Relaxed),
            "overflow_checkouts": self.overflowed.load(Ordering::Relaxed),
            "checkout_timeouts": self.timeouts.load(Ordering::Relaxed),
            "checkout_timeout_ms": self.checkout_timeout.as_millis() as u64,
        })
    }
}
