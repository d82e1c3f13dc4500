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
        .route("/admin/cache", axum::routing::delete(flush_cache))
}

/// Most entries on one page of a paged API list.
pub(crate) const MAX_PAGE: usize = 500;

/// The page size of a paged API list: `limit`, 100 when absent, refused
/// outside 1 to [`MAX_PAGE`].
pub(crate) fn page_limit(limit: Option<usize>) -> Result<usize, Response> {
    match limit.unwrap_or(100) {
        n @ 1..=MAX_PAGE => Ok(n),
        _ => Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("`limit` must be 1 to {MAX_PAGE}"),
        )),
    }
}

pub(crate) fn error(status: StatusCode, reason: &str, message: String) -> Response {
    (
        status,
        Json(json!({"error": {"reason": reason, "message": message}})),
    )
        .into_response()
}

/// Who made an admin request.
pub(crate) type Caller = Option<Extension<RequestPrincipal>>;

/// What a caller may see and act on: its own tenant's sessions, keys and
/// upstreams, or everything with `tenants:*`.
pub(crate) struct Reach {
    pub(crate) tenant: String,
    pub(crate) all: bool,
}

impl Reach {
    pub(crate) fn of(who: &Caller) -> Reach {
        match who {
            Some(Extension(RequestPrincipal(p))) => Reach {
                tenant: p.tenant.clone(),
                // With authentication off there is one anonymous operator.
                all: p.has_scope(meshgate_core::auth::scope::ALL_TENANTS)
                    || p.kind == meshgate_core::CredentialKind::Anonymous,
            },
            None => Reach {
                tenant: String::new(),
                all: false,
            },
        }
    }

    fn tenant(&self, t: &str) -> bool {
        self.all || self.tenant == t
    }

    fn client(&self, c: &crate::clients::ClientEntry) -> bool {
        self.all || c.owner.get().is_some_and(|o| o.tenant == self.tenant)
    }

    /// The open sessions it may see.
    fn clients(&self, s: &AppState) -> Vec<std::sync::Arc<crate::clients::ClientEntry>> {
        s.gw.clients
            .live()
            .into_iter()
            .filter(|c| self.client(c))
            .collect()
    }

    /// May see the upstream (its own tenant's, or shared).
    pub(crate) fn sees(&self, up: &crate::gateway::Upstream) -> bool {
        self.all || up.config.shared || up.config.tenant == self.tenant
    }

    /// May change the upstream's state (its own tenant's, not shared).
    pub(crate) fn manages(&self, up: &crate::gateway::Upstream) -> bool {
        self.all || (!up.config.shared && up.config.tenant == self.tenant)
    }
}

fn needs_all_tenants(what: &str) -> Response {
    error(
        StatusCode::FORBIDDEN,
        "cross_tenant",
        format!(
            "{what} affects every tenant, so it needs a credential holding scope `tenants:*` (the first admin key has it)"
        ),
    )
}

pub(crate) async fn audit(
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
async fn gateway_health(State(s): State<AppState>, who: Caller) -> Response {
    let reach = Reach::of(&who);
    let clients = reach.clients(&s);
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
    for up in s.gw.upstreams.iter().filter(|u| reach.sees(u)) {
        let (status, _) = up.status();
        let breaker = up.traffic.breaker_json();
        if breaker["state"] != "closed" {
            open_breakers += 1;
        }
        let (configured, live) = up.processes().await;
        upstreams.push(json!({
            "name": up.config.name,
            "status": status.label(),
            "transport": up.config.transport,
            "processes": {"configured": configured, "live": live},
            "restarts": s.gw.restarts(&up),
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
            .filter(|u| reach.sees(u))
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
        "error_rate": if reach.all {
            json!({
                "open_sessions": error_rate(requests, errors),
                "since_start": error_rate(totals.0, totals.1),
                "requests_since_start": totals.0,
                "errors_since_start": totals.1,
            })
        } else {
            json!({"open_sessions": error_rate(requests, errors)})
        },
        "open_breakers": open_breakers,
        "upstreams": upstreams,
    }))
    .into_response()
}

/// `GET /mcp/stats`.
async fn stats(State(s): State<AppState>, who: Caller) -> Response {
    let reach = Reach::of(&who);
    let clients = reach.clients(&s);
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
            .filter(|u| reach.sees(u))
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
        "tenant": if reach.all { None } else { Some(reach.tenant.clone()) },
    }))
    .into_response()
}

/// `GET /mcp/health/client/{id}`: by gateway client id (`c-<n>`) or by the
/// transport's session id.
async fn client_health(State(s): State<AppState>, Path(id): Path<String>, who: Caller) -> Response {
    let reach = Reach::of(&who);
    match s.gw.clients.find(&id).filter(|c| reach.client(c)) {
        Some(c) => {
            let mut v = c.to_json(&s.gw).await;
            if let Some(inner) = c.transport_session_id.get()
                && let Some(obj) = v.as_object_mut()
            {
                obj.insert(
                    "last_event_id".into(),
                    json!(s.mcp_sessions.last_seq(&inner.clone().into())),
                );
                obj.insert(
                    "transport_events".into(),
                    json!(s.mcp_sessions.events(inner)),
                );
            }
            Json(v).into_response()
        }
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
    let reach = Reach::of(&who);
    let mut sessions_closed = 0;
    for c in s.gw.clients.live() {
        if c.idle() < limit || !reach.client(&c) {
            continue;
        }
        let mut closed = false;
        if let Some(ct) = c.closer.get() {
            ct.cancel();
            closed = true;
        } else if let Some(id) = c.transport_session_id.get().or(c.session_id.get()) {
            let sid: rmcp::transport::common::server_side_http::SessionId = id.as_str().into();
            closed = s.mcp_sessions.close_session(&sid).await.is_ok();
            let _ = s.gw.store.delete_session(id).await;
            // The client's sealed id would resume the session: remember it
            // as ended for as long as any id of it can be valid.
            let ttl_ms = s.gw.config.mcp.session_ttl_secs.saturating_mul(1000);
            let until =
                meshgate_store::now_ms().saturating_add(i64::try_from(ttl_ms).unwrap_or(i64::MAX));
            if let Err(e) = s.gw.store.end_session(id, until).await {
                tracing::warn!(error = %e, "could not record a closed session as ended");
            }
            s.auth.forget_session(id);
        }
        if closed {
            s.gw.clients.unregister(&c.id);
            sessions_closed += 1;
        }
    }
    let conns_closed =
        s.gw.clients
            .close_idle_upstream_connections(&s.gw, Some(limit), |c| reach.client(c))
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
    if !Reach::of(&who).all {
        return needs_all_tenants("POST /mcp/admin/reset");
    }
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

async fn breakers(State(s): State<AppState>, who: Caller) -> Response {
    let reach = Reach::of(&who);
    let all: Vec<Value> =
        s.gw.upstreams
            .iter()
            .filter(|u| reach.sees(u))
            .map(|u| u.traffic.breaker_json())
            .collect();
    Json(json!({"circuit_breakers": all})).into_response()
}

fn unknown_upstream(s: &AppState, name: &str, reach: &Reach) -> Response {
    let known: Vec<String> =
        s.gw.upstreams
            .iter()
            .filter(|u| reach.sees(u))
            .map(|u| u.config.name.clone())
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

async fn breaker(State(s): State<AppState>, Path(name): Path<String>, who: Caller) -> Response {
    let reach = Reach::of(&who);
    match s.gw.upstream_named(&name).filter(|u| reach.sees(u)) {
        Some(up) => Json(up.traffic.breaker_json()).into_response(),
        None => unknown_upstream(&s, &name, &reach),
    }
}

async fn reset_breaker(
    State(s): State<AppState>,
    Path(name): Path<String>,
    who: Caller,
    trace: Option<Extension<TraceId>>,
) -> Response {
    let reach = Reach::of(&who);
    let Some(up) = s.gw.upstream_named(&name).filter(|u| reach.sees(u)) else {
        return unknown_upstream(&s, &name, &reach);
    };
    if !reach.manages(&up) {
        return needs_all_tenants(&format!(
            "resetting the breaker of shared upstream `{name}`"
        ));
    }
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

/// Whether the caller may read and change limiter `key`: its own tenant,
/// its tenant's keys and sessions; per-tool limits are global.
async fn check_limit_reach(s: &AppState, reach: &Reach, key: &str) -> Result<(), Response> {
    if reach.all {
        return Ok(());
    }
    let ok = match key.split_once(':') {
        Some(("tenant", t)) => reach.tenant(t),
        Some(("key", id)) => matches!(
            s.gw.store.get_api_key(id).await,
            Ok(Some(rec)) if rec.tenant == reach.tenant
        ),
        Some(("connection", id)) => s.gw.clients.find(id).is_some_and(|c| reach.client(&c)),
        _ => false,
    };
    if ok {
        Ok(())
    } else if key.starts_with("tool:") {
        Err(needs_all_tenants(&format!("the per-tool limit `{key}`")))
    } else {
        Err(error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no limiter `{key}` in your tenant"),
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

async fn rate_limits(State(s): State<AppState>, who: Caller) -> Response {
    let reach = Reach::of(&who);
    let mut out = Vec::new();
    for key in s.gw.limits.keys() {
        if check_limit_reach(&s, &reach, &key).await.is_err() {
            continue;
        }
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

async fn rate_limit(State(s): State<AppState>, Path(key): Path<String>, who: Caller) -> Response {
    if let Err(r) = check_limit_key(&key) {
        return r;
    }
    if let Err(r) = check_limit_reach(&s, &Reach::of(&who), &key).await {
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
    if let Err(r) = check_limit_reach(&s, &Reach::of(&who), &key).await {
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
    if let Err(r) = check_limit_reach(&s, &Reach::of(&who), &key).await {
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
    if !Reach::of(&who).all {
        return needs_all_tenants("PUT /admin/log-level");
    }
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlushCacheQuery {
    upstream: Option<String>,
}

/// `DELETE /admin/cache` (optionally `?upstream=NAME`): drops cached tool
/// results, only the caller's tenant's unless it holds `tenants:*`.
async fn flush_cache(
    State(s): State<AppState>,
    q: Result<Query<FlushCacheQuery>, axum::extract::rejection::QueryRejection>,
    who: Caller,
    trace: Option<Extension<TraceId>>,
) -> Response {
    let Ok(Query(q)) = q else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "the only parameter is upstream, e.g. DELETE /admin/cache?upstream=github (none: every upstream)".into(),
        );
    };
    let reach = Reach::of(&who);
    if let Some(name) = &q.upstream
        && s.gw
            .upstream_named(name)
            .filter(|u| reach.sees(u))
            .is_none()
    {
        return unknown_upstream(&s, name, &reach);
    }
    let tenant = (!reach.all).then_some(reach.tenant.as_str());
    let flushed =
        s.gw.cache
            .invalidate(q.upstream.as_deref(), tenant, "admin");
    let detail = json!({"flushed": flushed, "upstream": q.upstream, "tenant": tenant});
    let target = q.upstream.as_deref().unwrap_or("*");
    audit(
        &s,
        &who,
        &trace,
        "admin.cache_flush",
        target,
        detail.clone(),
    )
    .await;
    Json(detail).into_response()
}
