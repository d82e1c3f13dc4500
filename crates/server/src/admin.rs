//! Operator endpoints (scope `admin`): gateway health with transports, pools
//! and breakers; session statistics and per-client health; cleanup of idle
//! sessions; resetting breakers and limiters; rate-limit overrides; the log
//! filter at run time. Every action that changes something is audited.

// Handlers return a ready axum `Response` as their error: it is what they send.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use meshgate_core::ratelimit::Quota;
use rmcp::transport::streamable_http_server::SessionManager;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::{RequestPrincipal, TraceId};
use crate::http::AppState;

/// Changes the process's log filter; set once by the binary (it owns the
/// subscriber). Returns the filter now in force, or why `new` is invalid.
pub type LogControl = Box<dyn Fn(&str) -> Result<String, String> + Send + Sync>;

static LOG_CONTROL: OnceLock<LogControl> = OnceLock::new();
static LOG_FILTER: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

/// Installs the log-filter control (the binary calls this at start-up).
pub fn install_log_control(initial: &str, control: LogControl) {
    if let Ok(mut f) = LOG_FILTER.lock() {
        *f = initial.to_owned();
    }
    let _ = LOG_CONTROL.set(control);
}

/// The admin routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/health/gateway", get(gateway_health))
        .route("/mcp/stats", get(stats))
        .route("/mcp/health/client/{id}", get(client_health))
        .route("/mcp/admin/cleanup", post(cleanup))
        .route("/mcp/admin/reset", post(reset_all))
        .route("/admin/circuit-breakers", get(breakers))
        .route("/admin/circuit-breakers/{upstream}", get(breaker))
        .route(
            "/admin/circuit-breakers/{upstream}/reset",
            post(reset_breaker),
        )
        .route("/admin/rate-limits", get(rate_limits))
        .route(
            "/admin/rate-limits/{key}",
            get(rate_limit)
                .put(set_rate_limit)
                .delete(delete_rate_limit),
        )
        .route("/admin/log-level", put(set_log_level).get(log_level))
}

fn error(status: StatusCode, reason: &str, message: String) -> Response {
    (
        status,
        Json(json!({"error": {"reason": reason, "message": message}})),
    )
        .into_response()
}

/// Who made an admin request, for the audit log.
type Caller = Option<Extension<RequestPrincipal>>;

async fn audit(
    s: &AppState,
    who: &Caller,
    trace: &Option<Extension<TraceId>>,
    action: &str,
    target: &str,
    detail: Value,
) {
    let Some(Extension(RequestPrincipal(p))) = who else {
        return;
    };
    let t = trace.as_ref().map(|Extension(t)| t.0.as_str());
    s.auth
        .audit
        .record(crate::auth::audit::entry(
            p, action, target, "ok", t, detail,
        ))
        .await;
}

fn error_rate(requests: u64, errors: u64) -> f64 {
    if requests == 0 {
        0.0
    } else {
        errors as f64 / requests as f64
    }
}

/// `GET /health/gateway`.
async fn gateway_health(State(s): State<AppState>) -> Response {
    let clients = s.gw.clients.live();
    let mut transports: BTreeMap<&str, u64> = BTreeMap::new();
    let (mut requests, mut errors) = (0, 0);
    for c in &clients {
        *transports.entry(c.transport).or_default() += 1;
        let (r, e) = c.counts();
        requests += r;
        errors += e;
    }
    let mut open_breakers = 0;
    let mut upstreams = Vec::new();
    for up in &s.gw.upstreams {
        let (status, _) = up.status();
        let breaker = up.traffic.breaker_json();
        if breaker["state"] != "closed" {
            open_breakers += 1;
        }
        upstreams.push(json!({
            "name": up.config.name,
            "status": status.label(),
            "transport": up.config.transport,
            "restarts": s.gw.restarts(up),
            "breaker": breaker,
            "pool": up.traffic.pool_json(),
        }));
    }
    let totals = crate::clients::totals();
    let draining = s.gw.inflight.is_draining();
    let status = if draining {
        "draining"
    } else if open_breakers > 0
        || s.gw
            .upstreams
            .iter()
            .any(|u| u.config.enabled && u.status().0.label() != "up")
    {
        "degraded"
    } else {
        "ok"
    };
    Json(json!({
        "status": status,
        "uptime_secs": s.gw.started.elapsed().as_secs(),
        "transports": {
            "streamable_http": transports.get("streamable_http").copied().unwrap_or(0),
            "sse": transports.get("sse").copied().unwrap_or(0),
        },
        "requests_in_flight": s.gw.inflight.count(),
        "error_rate": {
            "open_sessions": error_rate(requests, errors),
            "since_start": error_rate(totals.0, totals.1),
            "requests_since_start": totals.0,
            "errors_since_start": totals.1,
        },
        "open_breakers": open_breakers,
        "upstreams": upstreams,
    }))
    .into_response()
}

/// `GET /mcp/stats`.
async fn stats(State(s): State<AppState>) -> Response {
    let clients = s.gw.clients.live();
    let mut by_transport: BTreeMap<&str, u64> = BTreeMap::new();
    let mut ages = [0u64; 5];
    let (mut age_sum, mut requests, mut errors) = (0.0, 0, 0);
    let (mut pending, mut dropped, mut bundled, mut degraded) = (0, 0, 0, 0);
    for c in &clients {
        *by_transport.entry(c.transport).or_default() += 1;
        let age = c.age().as_secs();
        age_sum += c.age().as_secs_f64();
        let bucket = match age {
            0..60 => 0,
            60..600 => 1,
            600..3600 => 2,
            3600..86400 => 3,
            _ => 4,
        };
        ages[bucket] += 1;
        let (r, e) = c.counts();
        requests += r;
        errors += e;
        if let Some(q) = c.outbox.get().map(|o| o.stats()) {
            pending += q.pending;
            dropped += q.dropped;
            bundled += q.bundled;
            if q.grade != crate::outbox::Grade::Normal {
                degraded += 1;
            }
        }
    }
    let pools: Vec<Value> =
        s.gw.upstreams
            .iter()
            .map(|u| u.traffic.pool_json())
            .collect();
    let n = clients.len();
    Json(json!({
        "connections": {
            "total": n,
            "by_transport": {
                "streamable_http": by_transport.get("streamable_http").copied().unwrap_or(0),
                "sse": by_transport.get("sse").copied().unwrap_or(0),
            },
            "average_age_secs": if n == 0 { 0.0 } else { age_sum / n as f64 },
            "age_buckets": {"under_1m": ages[0], "1m_10m": ages[1], "10m_1h": ages[2], "1h_1d": ages[3], "over_1d": ages[4]},
        },
        "requests": requests,
        "errors": errors,
        "error_rate": error_rate(requests, errors),
        "outbound": {"pending": pending, "dropped": dropped, "bundled": bundled, "degraded_clients": degraded},
        "pools": pools,
        "requests_in_flight": s.gw.inflight.count(),
    }))
    .into_response()
}

/// `GET /mcp/health/client/{id}`: by gateway client id (`c-<n>`) or by the
/// transport's session id.
async fn client_health(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    match s.gw.clients.find(&id) {
        Some(c) => Json(c.to_json(&s.gw).await).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "no open client session `{id}`; GET /mcp/stats counts the open ones, and ids are `c-<n>` or the Mcp-Session-Id"
            ),
        ),
    }
}

#[derive(Deserialize)]
struct CleanupQuery {
    max_idle_seconds: Option<u64>,
}

/// `POST /mcp/admin/cleanup?max_idle_seconds=N`: closes client sessions and
/// per-session upstream connections idle for at least N seconds.
async fn cleanup(
    State(s): State<AppState>,
    q: Result<Query<CleanupQuery>, axum::extract::rejection::QueryRejection>,
    who: Caller,
    trace: Option<Extension<TraceId>>,
) -> Response {
    let Ok(Query(q)) = q else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "max_idle_seconds must be a whole number of seconds, e.g. ?max_idle_seconds=300".into(),
        );
    };
    let Some(max_idle) = q.max_idle_seconds else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "say how idle a session must be: ?max_idle_seconds=N".into(),
        );
    };
    let limit = Duration::from_secs(max_idle);
    let mut sessions_closed = 0;
    for c in s.gw.clients.live() {
        if c.idle() < limit {
            continue;
        }
        let mut closed = false;
        if let Some(ct) = c.closer.get() {
            ct.cancel();
            closed = true;
        } else if let Some(id) = c.session_id.get() {
            let sid: rmcp::transport::common::server_side_http::SessionId = id.as_str().into();
            closed = s.mcp_sessions.close_session(&sid).await.is_ok();
            let _ = s.gw.store.delete_session(id).await;
            s.auth.forget_session(id);
        }
        if closed {
            s.gw.clients.unregister(&c.id);
            sessions_closed += 1;
        }
    }
    let conns_closed =
        s.gw.clients
            .close_idle_upstream_connections(&s.gw, Some(limit))
            .await;
    let result = json!({
        "max_idle_seconds": max_idle,
        "sessions_closed": sessions_closed,
        "upstream_connections_closed": conns_closed,
        "closed": sessions_closed + conns_closed,
    });
    audit(
        &s,
        &who,
        &trace,
        "admin.cleanup",
        "sessions",
        result.clone(),
    )
    .await;
    Json(result).into_response()
}

/// `POST /mcp/admin/reset`: closes every circuit breaker and refills every
/// rate-limit bucket (overrides stay).
async fn reset_all(
    State(s): State<AppState>,
    who: Caller,
    trace: Option<Extension<TraceId>>,
) -> Response {
    for up in &s.gw.upstreams {
        up.traffic.reset_breaker();
    }
    let limiters = s.gw.limits.reset_all();
    let result = json!({"breakers_reset": s.gw.upstreams.len(), "limiters_reset": limiters});
    audit(
        &s,
        &who,
        &trace,
        "admin.reset",
        "breakers,rate_limits",
        result.clone(),
    )
    .await;
    Json(result).into_response()
}

async fn breakers(State(s): State<AppState>) -> Response {
    let all: Vec<Value> =
        s.gw.upstreams
            .iter()
            .map(|u| u.traffic.breaker_json())
            .collect();
    Json(json!({"circuit_breakers": all})).into_response()
}

fn unknown_upstream(s: &AppState, name: &str) -> Response {
    let known: Vec<&str> =
        s.gw.upstreams
            .iter()
            .map(|u| u.config.name.as_str())
            .collect();
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "no upstream named `{name}`; configured upstreams: {}",
            known.join(", ")
        ),
    )
}

async fn breaker(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    match s.gw.upstream_named(&name) {
        Some(up) => Json(up.traffic.breaker_json()).into_response(),
        None => unknown_upstream(&s, &name),
    }
}

async fn reset_breaker(
    State(s): State<AppState>,
    Path(name): Path<String>,
    who: Caller,
    trace: Option<Extension<TraceId>>,
) -> Response {
    let Some(up) = s.gw.upstream_named(&name).cloned() else {
        return unknown_upstream(&s, &name);
    };
    let before = up.traffic.breaker_json()["state"].clone();
    up.traffic.reset_breaker();
    audit(
        &s,
        &who,
        &trace,
        "admin.breaker_reset",
        &name,
        json!({"previous_state": before}),
    )
    .await;
    Json(up.traffic.breaker_json()).into_response()
}

fn check_limit_key(key: &str) -> Result<(), Response> {
    let ok = key.split_once(':').is_some_and(|(scope, rest)| {
        matches!(scope, "key" | "tenant" | "tool" | "connection") && !rest.is_empty()
    });
    if ok && key.len() <= 256 {
        Ok(())
    } else {
        Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_key",
            format!(
                "`{key}` is not a limiter key; use key:<key id>, tenant:<tenant>, tool:<tool name> or connection:<client id>"
            ),
        ))
    }
}

/// The quota that applies to `key` without an override: an API key's own
/// limit, or the configured default.
async fn default_quota(s: &AppState, key: &str) -> Option<Quota> {
    if let Some(id) = key.strip_prefix("key:")
        && let Ok(Some(rec)) = s.gw.store.get_api_key(id).await
        && let Some(n) = rec.rate_limit_per_minute
    {
        return Quota::new(u64::from(n), Duration::from_secs(60), u64::from(n));
    }
    s.gw.limits.configured_quota(key)
}

async fn rate_limits(State(s): State<AppState>) -> Response {
    let mut out = Vec::new();
    for key in s.gw.limits.keys() {
        let d = default_quota(&s, &key).await;
        out.push(s.gw.limits.describe(&key, d));
    }
    let c = &s.gw.config.rate_limits;
    Json(json!({
        "configured": {
            "per_key": c.per_key, "per_tenant": c.per_tenant,
            "per_tool": c.per_tool, "per_connection": c.per_connection, "tools": c.tools,
        },
        "limits": out,
    }))
    .into_response()
}

async fn rate_limit(State(s): State<AppState>, Path(key): Path<String>) -> Response {
    if let Err(r) = check_limit_key(&key) {
        return r;
    }
    let d = default_quota(&s, &key).await;
    Json(s.gw.limits.describe(&key, d)).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitBody {
    limit: u64,
    #[serde(default = "sixty")]
    period_secs: u64,
    burst: Option<u64>,
}

fn sixty() -> u64 {
    60
}

/// `PUT /admin/rate-limits/{key}` with `{"limit", "period_secs", "burst"}`;
/// `limit` 0 lifts the limit for the key.
async fn set_rate_limit(
    State(s): State<AppState>,
    Path(key): Path<String>,
    who: Caller,
    trace: Option<Extension<TraceId>>,
    body: Result<Json<LimitBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Err(r) = check_limit_key(&key) {
        return r;
    }
    let b = match body {
        Ok(Json(b)) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                format!(
                    "{}; send {{\"limit\": N, \"period_secs\": S, \"burst\": B}} (limit 0 = unlimited)",
                    e.body_text()
                ),
            );
        }
    };
    let quota = if b.limit == 0 {
        None
    } else {
        match Quota::new(
            b.limit,
            Duration::from_secs(b.period_secs),
            b.burst.unwrap_or(b.limit),
        ) {
            Some(q) => Some(q),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_body",
                    "period_secs and burst must be at least 1".into(),
                );
            }
        }
    };
    s.gw.limits.set_override(&key, quota);
    audit(
        &s,
        &who,
        &trace,
        "admin.rate_limit_set",
        &key,
        json!({"limit": b.limit, "period_secs": b.period_secs, "burst": b.burst}),
    )
    .await;
    let d = default_quota(&s, &key).await;
    Json(s.gw.limits.describe(&key, d)).into_response()
}

/// `DELETE /admin/rate-limits/{key}`: removes the override and refills the bucket.
async fn delete_rate_limit(
    State(s): State<AppState>,
    Path(key): Path<String>,
    who: Caller,
    trace: Option<Extension<TraceId>>,
) -> Response {
    if let Err(r) = check_limit_key(&key) {
        return r;
    }
    let had = s.gw.limits.remove_override(&key);
    audit(
        &s,
        &who,
        &trace,
        "admin.rate_limit_reset",
        &key,
        json!({"had_override": had}),
    )
    .await;
    let d = default_quota(&s, &key).await;
    let mut v = s.gw.limits.describe(&key, d);
    v["override_removed"] = json!(had);
    Json(v).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LevelBody {
    level: String,
}

async fn log_level() -> Response {
    let f = LOG_FILTER.lock().map(|f| f.clone()).unwrap_or_default();
    Json(json!({"level": f})).into_response()
}

/// `PUT /admin/log-level` with `{"level": "<filter>"}`, e.g. `debug` or
/// `info,meshgate_server=debug`.
async fn set_log_level(
    State(s): State<AppState>,
    who: Caller,
    trace: Option<Extension<TraceId>>,
    body: Result<Json<LevelBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let b = match body {
        Ok(Json(b)) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                format!(
                    "{}; send {{\"level\": \"info,meshgate_server=debug\"}}",
                    e.body_text()
                ),
            );
        }
    };
    let Some(control) = LOG_CONTROL.get() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "this process was started without a reloadable log filter".into(),
        );
    };
    match control(&b.level) {
        Ok(now) => {
            let previous = LOG_FILTER
                .lock()
                .map(|mut f| std::mem::replace(&mut *f, now.clone()))
                .unwrap_or_default();
            tracing::info!(previous = %previous, level = %now, "log filter changed at run time");
            audit(
                &s,
                &who,
                &trace,
                "admin.log_level",
                "log",
                json!({"previous": previous, "level": now}),
            )
            .await;
            Json(json!({"level": now, "previous": previous})).into_response()
        }
        Err(e) => error(
            StatusCode::BAD_REQUEST,
            "invalid_level",
            format!(
                "invalid log filter `{}`: {e}; use a level (error, warn, info, debug, trace) or directives like `info,meshgate_server=debug`",
                b.level
            ),
        ),
    }
}
