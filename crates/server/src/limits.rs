//! Rate limiting: GCRA buckets (the algorithm is
//! [`meshgate_core::ratelimit`]) per API key, tenant, tool and client
//! session, run-time overrides from the admin API, the HTTP layer that
//! answers 429 with `Retry-After` and `X-RateLimit-*` headers (and sets the
//! headers on every limited response), and the JSON-RPC error used inside
//! MCP sessions.
//!
//! Limiter keys are strings with a scope prefix: `key:<key id>`,
//! `tenant:<tenant>`, `tool:<exposed tool name>`, `connection:<client id>`.
//! A request passes all of its limits or consumes none of them.

// Handlers return a ready axum `Response` as their error: it is what they send.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use meshgate_core::Principal;
use meshgate_core::config::RateLimitsConfig;
use meshgate_core::ratelimit::{Decision, Gcra, Quota};
use rmcp::ErrorData as McpError;
use rmcp::model::ErrorCode;
use serde_json::{Value, json};

use crate::auth::RequestPrincipal;
use crate::gateway::Gateway;
use crate::resilience::mono_now;

/// JSON-RPC error code of a rate-limit refusal (the MCP equivalent of 429).
pub const RATE_LIMITED: ErrorCode = ErrorCode(-32029);

/// A limit that applied to a request, and what it decided.
#[derive(Debug, Clone)]
pub struct Hit {
    /// The limiter key, e.g. `tool:files__read`.
    pub key: String,
    /// Its quota.
    pub quota: Quota,
    /// Where the quota came from: `config`, `api_key` or `override`.
    pub source: &'static str,
    /// The decision.
    pub decision: Decision,
}

impl Hit {
    /// The scope of the key (`key`, `tenant`, `tool`, `connection`).
    pub fn scope(&self) -> &str {
        self.key.split_once(':').map_or("", |(s, _)| s)
    }

    /// The limit as error data and the admin API show it.
    pub fn limit_json(&self) -> Value {
        json!({
            "key": self.key,
            "scope": self.scope(),
            "limit": self.quota.limit,
            "period_secs": self.quota.period.as_secs_f64(),
            "burst": self.quota.burst,
            "source": self.source,
        })
    }

    fn retry_after_ms(&self) -> u64 {
        self.decision.retry_after.as_millis().max(1) as u64
    }

    /// What the refusal says to a person.
    pub fn message(&self) -> String {
        format!(
            "rate limit exceeded for {} ({} requests per {}s, burst {}); retry in {} ms",
            self.key,
            self.quota.limit,
            self.quota.period.as_secs_f64(),
            self.quota.burst,
            self.retry_after_ms()
        )
    }

    /// The refusal's structured data (JSON-RPC `error.data`, REST `error`).
    pub fn data(&self) -> Value {
        let ms = self.retry_after_ms();
        json!({
            "reason": "rate_limited",
            "retry_after_ms": ms,
            "retry_after": ms.div_ceil(1000),
            "limit": self.limit_json(),
            "http_status": 429,
        })
    }

    /// The refusal as a JSON-RPC error inside an MCP session.
    pub fn mcp_error(&self) -> McpError {
        McpError::new(RATE_LIMITED, self.message(), Some(self.data()))
    }

    /// Sets `X-RateLimit-*` (and, when refused, `Retry-After`) on `headers`.
    pub fn set_headers(&self, headers: &mut HeaderMap) {
        let d = &self.decision;
        let reset = d.reset_after.as_secs_f64().ceil() as u64;
        for (name, value) in [
            ("x-ratelimit-limit", self.quota.limit),
            ("x-ratelimit-remaining", d.remaining),
            ("x-ratelimit-reset", reset),
        ] {
            headers.insert(name, HeaderValue::from(value));
        }
        if !d.allowed {
            headers.insert(
                "retry-after",
                HeaderValue::from(self.retry_after_ms().div_ceil(1000).max(1)),
            );
        }
    }
}

/// The limiter keys and default quotas of one request.
pub type Checks = Vec<(String, Option<Quota>)>;

/// All rate limiters of the process.
pub struct Limiters {
    cfg: RateLimitsConfig,
    /// Run-time overrides: key → quota (`None` = unlimited).
    overrides: RwLock<HashMap<String, Option<Quota>>>,
    states: Mutex<HashMap<String, Gcra>>,
}

impl Limiters {
    /// Limiters configured by `cfg`.
    pub fn new(cfg: &RateLimitsConfig) -> Limiters {
        Limiters {
            cfg: cfg.clone(),
            overrides: RwLock::new(HashMap::new()),
            states: Mutex::new(HashMap::new()),
        }
    }

    /// The per-key and per-tenant checks of a request by `p`.
    pub fn principal_checks(&self, p: &Principal) -> Checks {
        let key_quota = match p.rate_limit_per_minute {
            Some(n) => Quota::new(u64::from(n), Duration::from_secs(60), u64::from(n)),
            None => self.cfg.per_key.quota(),
        };
        let who = p.key_id.as_deref().unwrap_or(p.subject.as_str());
        vec![
            (format!("key:{who}"), key_quota),
            (format!("tenant:{}", p.tenant), self.cfg.per_tenant.quota()),
        ]
    }

    /// The per-tool and per-connection checks of a tool call.
    pub fn call_checks(&self, tool: &str, client: &str) -> Checks {
        let tool_quota = match self.cfg.tools.get(tool) {
            Some(l) => l.quota(),
            None => self.cfg.per_tool.quota(),
        };
        vec![
            (format!("tool:{tool}"), tool_quota),
            (
                format!("connection:{client}"),
                self.cfg.per_connection.quota(),
            ),
        ]
    }

    /// The configured default quota of `key` (no override, no API-key limit).
    pub fn configured_quota(&self, key: &str) -> Option<Quota> {
        match key.split_once(':') {
            Some(("key", _)) => self.cfg.per_key.quota(),
            Some(("tenant", _)) => self.cfg.per_tenant.quota(),
            Some(("tool", name)) => match self.cfg.tools.get(name) {
                Some(l) => l.quota(),
                None => self.cfg.per_tool.quota(),
            },
            Some(("connection", _)) => self.cfg.per_connection.quota(),
            _ => None,
        }
    }

    fn effective(&self, key: &str, default: Option<Quota>) -> Option<(Quota, &'static str)> {
        if let Ok(o) = self.overrides.read()
            && let Some(q) = o.get(key)
        {
            return q.map(|q| (q, "override"));
        }
        let source = if key.starts_with("key:") && default != self.cfg.per_key.quota() {
            "api_key"
        } else {
            "config"
        };
        default.map(|q| (q, source))
    }

    /// Checks every limit of a request: all pass (and each consumes one
    /// request) or none is consumed. `Ok` carries the applied limit with the
    /// fewest requests left (for the headers), `Err` the refusal that lasts
    /// longest.
    pub fn check(&self, checks: &Checks) -> Result<Option<Hit>, Hit> {
        let applied: Vec<(&str, Quota, &'static str)> = checks
            .iter()
            .filter_map(|(k, d)| self.effective(k, *d).map(|(q, s)| (k.as_str(), q, s)))
            .collect();
        if applied.is_empty() {
            return Ok(None);
        }
        let now = mono_now();
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let mut refused: Option<Hit> = None;
        for (key, quota, source) in &applied {
            let state = states.get(*key).copied().unwrap_or_default();
            let mut probe = state;
            let d = probe.check(quota, now);
            if !d.allowed
                && refused
                    .as_ref()
                    .is_none_or(|r| d.retry_after > r.decision.retry_after)
            {
                refused = Some(Hit {
                    key: (*key).to_owned(),
                    quota: *quota,
                    source,
                    decision: d,
                });
            }
        }
        if let Some(r) = refused {
            metrics::counter!("gateway_rate_limited_total", "scope" => r.scope().to_owned())
                .increment(1);
            return Err(r);
        }
        if states.len() + applied.len() > self.cfg.max_tracked {
            Self::evict(&mut states, now, self.cfg.max_tracked);
        }
        let mut tightest: Option<Hit> = None;
        for (key, quota, source) in applied {
            let d = states.entry(key.to_owned()).or_default().check(&quota, now);
            if tightest
                .as_ref()
                .is_none_or(|t| d.remaining < t.decision.remaining)
            {
                tightest = Some(Hit {
                    key: key.to_owned(),
                    quota,
                    source,
                    decision: d,
                });
            }
        }
        Ok(tightest)
    }

    /// Frees room: first every full (idle) bucket, then, if still over,
    /// a tenth of the rest (they start again with a full bucket).
    fn evict(states: &mut HashMap<String, Gcra>, now: Duration, max: usize) {
        states.retain(|_, g| !g.is_idle(now));
        if states.len() >= max {
            let drop_n = (max / 10).max(1);
            let victims: Vec<String> = states.keys().take(drop_n).cloned().collect();
            for k in victims {
                states.remove(&k);
            }
            metrics::counter!("gateway_rate_limit_evictions_total").increment(drop_n as u64);
            tracing::warn!(
                tracked = states.len(),
                "rate_limits.max_tracked reached; some busy limiter states were reset"
            );
        }
    }

    /// Sets a run-time override of `key` (`None` = unlimited) and clears its state.
    pub fn set_override(&self, key: &str, quota: Option<Quota>) {
        if let Ok(mut o) = self.overrides.write() {
            o.insert(key.to_owned(), quota);
        }
        self.reset(key);
    }

    /// Removes the override of `key` and clears its state; true if there was one.
    pub fn remove_override(&self, key: &str) -> bool {
        let had = self
            .overrides
            .write()
            .map(|mut o| o.remove(key).is_some())
            .unwrap_or(false);
        self.reset(key);
        had
    }

    /// Forgets the state of `key` (its bucket is full again).
    pub fn reset(&self, key: &str) {
        if let Ok(mut s) = self.states.lock() {
            s.remove(key);
        }
    }

    /// Forgets every state (overrides stay).
    pub fn reset_all(&self) -> usize {
        self.states
            .lock()
            .map(|mut s| {
                let n = s.len();
                s.clear();
                n
            })
            .unwrap_or(0)
    }

    /// The limit of `key` as the admin API shows it; `default` is what
    /// applies without an override.
    pub fn describe(&self, key: &str, default: Option<Quota>) -> Value {
        let effective = self.effective(key, default);
        let over = self.overrides.read().ok().and_then(|o| o.get(key).copied());
        let now = mono_now();
        let state = self.states.lock().ok().and_then(|s| s.get(key).copied());
        let quota_json = |q: &Quota| json!({"limit": q.limit, "period_secs": q.period.as_secs_f64(), "burst": q.burst});
        let current = effective.map(|(q, _)| {
            let d = state.unwrap_or_default().peek(&q, now);
            json!({"remaining": d.remaining, "reset_after_ms": d.reset_after.as_millis() as u64})
        });
        json!({
            "key": key,
            "limited": effective.is_some(),
            "effective": effective.map(|(q, _)| quota_json(&q)),
            "source": effective.map(|(_, s)| s).unwrap_or(if over.is_some() { "override" } else { "none" }),
            "default": default.map(|q| quota_json(&q)),
            "override": over.map(|o| match o {
                Some(q) => quota_json(&q),
                None => json!({"unlimited": true}),
            }),
            "state": current,
        })
    }

    /// Every key with an override or a live state.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .overrides
            .read()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        if let Ok(s) = self.states.lock() {
            let now = mono_now();
            keys.extend(
                s.iter()
                    .filter(|(_, g)| !g.is_idle(now))
                    .map(|(k, _)| k.clone()),
            );
        }
        keys.sort();
        keys.dedup();
        keys
    }
}

/// Whether the rate-limit layer counts requests to `path` (the data path;
/// health, metrics and admin endpoints are not limited, so an operator can
/// always get in to lift a limit).
fn limited_path(path: &str) -> bool {
    (path == "/mcp"
        || path == "/sse"
        || path == "/messages"
        || path.starts_with("/api/")
        || is_view_path(path))
        && !path.starts_with("/api/v1/auth/refresh")
}

/// A virtual server's MCP endpoint (`/servers/{name}/mcp`).
fn is_view_path(path: &str) -> bool {
    path.starts_with("/servers/") && path.ends_with("/mcp")
}

/// The per-key and per-tenant layer; runs after authentication.
pub async fn rate_limit(
    State(gw): State<std::sync::Arc<Gateway>>,
    req: Request,
    next: Next,
) -> Response {
    if !limited_path(req.uri().path()) {
        return next.run(req).await;
    }
    let Some(RequestPrincipal(p)) = req.extensions().get::<RequestPrincipal>().cloned() else {
        return next.run(req).await;
    };
    match gw.limits.check(&gw.limits.principal_checks(&p)) {
        Ok(hit) => {
            let mut resp = next.run(req).await;
            if let Some(h) = hit {
                h.set_headers(resp.headers_mut());
            }
            resp
        }
        Err(hit) => refuse(req, &hit, gw.config.mcp.max_request_body_bytes).await,
    }
}

/// The 429 answer: a JSON-RPC error (with the request's id) on the MCP
/// message endpoints, a REST error elsewhere.
async fn refuse(req: Request, hit: &Hit, limit: usize) -> Response {
    let path = req.uri().path().to_owned();
    let jsonrpc = (path == "/mcp" || path == "/messages" || is_view_path(&path))
        && req.method() == axum::http::Method::POST;
    let mut resp = if jsonrpc {
        let bytes = axum::body::to_bytes(req.into_body(), limit)
            .await
            .unwrap_or_default();
        let id = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v.get("id").cloned())
            .unwrap_or(Value::Null);
        let body = json!({"jsonrpc": "2.0", "id": id, "error": {"code": RATE_LIMITED.0, "message": hit.message(), "data": hit.data()}});
        (StatusCode::TOO_MANY_REQUESTS, axum::Json(body)).into_response()
    } else {
        let mut data = hit.data();
        data["message"] = json!(hit.message());
        (
            StatusCode::TOO_MANY_REQUESTS,
            axum::Json(json!({"error": data})),
        )
            .into_response()
    };
    hit.set_headers(resp.headers_mut());
    resp
}
