//! Traffic-control settings: rate limits, per-upstream retries, circuit
//! breakers and call pools, and per-client backpressure. Each type turns into
//! the pure policy of [`crate::ratelimit`], [`crate::breaker`] or
//! [`crate::backoff`] it configures.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};
use crate::backoff::RetryPolicy;
use crate::breaker::BreakerPolicy;
use crate::ratelimit::Quota;

/// One rate limit: `limit` requests per `period_secs`, at most `burst` at
/// once. A `limit` of 0 turns the limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitConfig {
    /// Requests allowed per period; 0 = unlimited.
    pub limit: u64,
    /// Length of the period in seconds.
    pub period_secs: u64,
    /// Requests allowed at once (the bucket size); defaults to `limit`.
    pub burst: Option<u64>,
}

impl Default for LimitConfig {
    fn default() -> Self {
        LimitConfig {
            limit: 0,
            period_secs: 60,
            burst: None,
        }
    }
}

impl LimitConfig {
    /// The quota, or `None` when the limit is off.
    pub fn quota(&self) -> Option<Quota> {
        Quota::new(
            self.limit,
            Duration::from_secs(self.period_secs),
            self.burst.unwrap_or(self.limit),
        )
    }

    fn validate(&self, key: &str, errors: &mut Vec<ConfigError>) {
        if self.limit == 0 {
            return;
        }
        if self.period_secs == 0 {
            errors.push(invalid(
                &format!("{key}.period_secs"),
                "0",
                "must be at least 1",
            ));
        }
        if self.burst == Some(0) {
            errors.push(invalid(
                &format!("{key}.burst"),
                "0",
                "must be at least 1 (or left out to equal limit)",
            ));
        }
    }
}

/// Rate limits, each counted separately; a request must pass all that apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitsConfig {
    /// Per API key (and per token subject); an API key's own
    /// `rate_limit_per_minute` replaces it for that key.
    pub per_key: LimitConfig,
    /// Per tenant, all of its keys together.
    pub per_tenant: LimitConfig,
    /// Per exposed tool name, across all callers (protects upstreams).
    pub per_tool: LimitConfig,
    /// Per client session (MCP session or SSE connection).
    pub per_connection: LimitConfig,
    /// Exposed tool name → its own limit, replacing `per_tool` for it.
    pub tools: BTreeMap<String, LimitConfig>,
    /// Most limiter states kept in memory; idle (full) buckets are dropped first.
    pub max_tracked: usize,
}

impl Default for RateLimitsConfig {
    fn default() -> Self {
        RateLimitsConfig {
            per_key: LimitConfig::default(),
            per_tenant: LimitConfig::default(),
            per_tool: LimitConfig::default(),
            per_connection: LimitConfig::default(),
            tools: BTreeMap::new(),
            max_tracked: 100_000,
        }
    }
}

impl RateLimitsConfig {
    pub(super) fn validate(&self, errors: &mut Vec<ConfigError>) {
        self.per_key.validate("rate_limits.per_key", errors);
        self.per_tenant.validate("rate_limits.per_tenant", errors);
        self.per_tool.validate("rate_limits.per_tool", errors);
        self.per_connection
            .validate("rate_limits.per_connection", errors);
        for (name, l) in &self.tools {
            l.validate(&format!("rate_limits.tools.{name}"), errors);
        }
        if self.max_tracked < 100 {
            errors.push(invalid(
                "rate_limits.max_tracked",
                &self.max_tracked.to_string(),
                "must be at least 100",
            ));
        }
    }
}

/// Circuit breaker of one upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive transport failures or timeouts that open it; 0 disables it.
    pub failure_threshold: u32,
    /// Successful probes in half-open that close it again.
    pub success_threshold: u32,
    /// How long it stays open before letting a probe through, in milliseconds.
    pub open_timeout_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 5,
            success_threshold: 1,
            open_timeout_ms: 30_000,
        }
    }
}

impl BreakerConfig {
    /// The policy it configures.
    pub fn policy(&self) -> BreakerPolicy {
        BreakerPolicy {
            failure_threshold: self.failure_threshold,
            success_threshold: self.success_threshold.max(1),
            open_timeout: Duration::from_millis(self.open_timeout_ms),
        }
    }
}

/// Retries of one upstream's calls after transport failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in all, the first included; 1 = no retries.
    pub max_attempts: u32,
    /// Ceiling of the first backoff, in milliseconds (doubles per retry).
    pub initial_backoff_ms: u64,
    /// Largest backoff ceiling, in milliseconds.
    pub max_backoff_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 3,
            initial_backoff_ms: 100,
            max_backoff_ms: 2_000,
        }
    }
}

impl RetryConfig {
    /// The policy it configures.
    pub fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts.max(1),
            initial_backoff: Duration::from_millis(self.initial_backoff_ms),
            max_backoff: Duration::from_millis(self.max_backoff_ms),
        }
    }
}

/// The call pool of one upstream: how many calls may be in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// Calls in flight in steady state (stdio: spread over `processes`).
    pub size: u32,
    /// Extra calls allowed above `size` under load (counted as overflow).
    pub overflow: u32,
    /// Longest a call waits for a free slot before failing with `pool_timeout`, in ms.
    pub checkout_timeout_ms: u64,
    /// Per-client-session upstream connections unused this long are closed, in seconds.
    pub idle_timeout_secs: u64,
    /// Child processes of a stdio upstream (calls go to the least busy one).
    pub processes: u32,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            size: 64,
            overflow: 64,
            checkout_timeout_ms: 5_000,
            idle_timeout_secs: 300,
            processes: 1,
        }
    }
}

/// Per-client outbound queue limits, in pending messages. Above each
/// threshold the gateway degrades one grade further: bundle (progress of one
/// call merged into its latest), slow (the producer is delayed), drop
/// (droppable notifications such as repeated progress are dropped). Responses
/// are never dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackpressureConfig {
    /// Pending messages from which progress notifications are bundled.
    pub bundle_at: usize,
    /// Pending messages from which producers are slowed down.
    pub slow_at: usize,
    /// Pending messages from which droppable notifications are dropped.
    pub drop_at: usize,
    /// Hard bound of the queue: above it even undroppable notifications wait.
    pub capacity: usize,
    /// How long a producer is held per message in the slow grade, in ms.
    pub slow_delay_ms: u64,
}

impl Default for BackpressureConfig {
    fn default() -> Self {
        BackpressureConfig {
            bundle_at: 64,
            slow_at: 256,
            drop_at: 512,
            capacity: 1024,
            slow_delay_ms: 5,
        }
    }
}

impl BackpressureConfig {
    pub(super) fn validate(&self, errors: &mut Vec<ConfigError>) {
        if !(1 <= self.bundle_at
            && self.bundle_at <= self.slow_at
            && self.slow_at <= self.drop_at
            && self.drop_at <= self.capacity)
        {
            errors.push(invalid(
                "backpressure",
                &format!(
                    "bundle_at={} slow_at={} drop_at={} capacity={}",
                    self.bundle_at, self.slow_at, self.drop_at, self.capacity
                ),
                "must satisfy 1 <= bundle_at <= slow_at <= drop_at <= capacity",
            ));
        }
        if self.slow_delay_ms > 1_000 {
            errors.push(invalid(
                "backpressure.slow_delay_ms",
                &self.slow_delay_ms.to_string(),
                "must be at most 1000",
            ));
        }
    }
}

/// Checks the traffic settings of upstream `i`.
pub(super) fn validate_upstream(
    prefix: &str,
    up: &super::UpstreamConfig,
    errors: &mut Vec<ConfigError>,
) {
    let k = |f: &str| format!("{prefix}.{f}");
    let r = &up.retry;
    if r.max_attempts == 0 || r.max_attempts > 10 {
        errors.push(invalid(
            &k("retry.max_attempts"),
            &r.max_attempts.to_string(),
            "must be 1 to 10 (1 = no retries)",
        ));
    }
    if r.initial_backoff_ms > r.max_backoff_ms {
        errors.push(invalid(
            &k("retry.initial_backoff_ms"),
            &r.initial_backoff_ms.to_string(),
            "must not exceed retry.max_backoff_ms",
        ));
    }
    let b = &up.breaker;
    if b.success_threshold == 0 {
        errors.push(invalid(
            &k("breaker.success_threshold"),
            "0",
            "must be at least 1",
        ));
    }
    if b.open_timeout_ms == 0 {
        errors.push(invalid(
            &k("breaker.open_timeout_ms"),
            "0",
            "must be at least 1",
        ));
    }
    let p = &up.pool;
    if p.size == 0 {
        errors.push(invalid(&k("pool.size"), "0", "must be at least 1"));
    }
    if p.checkout_timeout_ms == 0 {
        errors.push(invalid(
            &k("pool.checkout_timeout_ms"),
            "0",
            "must be at least 1",
        ));
    }
    if p.idle_timeout_secs == 0 {
        errors.push(invalid(
            &k("pool.idle_timeout_secs"),
            "0",
            "must be at least 1",
        ));
    }
    if p.processes == 0 || p.processes > 64 {
        errors.push(invalid(
            &k("pool.processes"),
            &p.processes.to_string(),
            "must be 1 to 64",
        ));
    } else if p.processes > 1 && up.transport != super::UpstreamTransport::Stdio {
        errors.push(invalid(
            &k("pool.processes"),
            &p.processes.to_string(),
            "only stdio upstreams run processes; leave it at 1",
        ));
    }
}
