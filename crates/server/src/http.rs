//! The HTTP surface: routes, the trace-id layer, the JSON-RPC pre-check in
//! front of the MCP transports, and health, readiness and metrics endpoints.

// Handlers return a ready axum `Response` as their error: it is what they send.
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use meshgate_protocol::{ProtocolRevision, check_envelope};
use metrics_exporter_prometheus::PrometheusHandle;
use rmcp::transport::streamable_http_server::{
    SessionManager, StreamableHttpServerConfig, StreamableHttpService,
};
use serde_json::{Value, json};
use tracing::Instrument;

use crate::auth::{Auth, RequestPrincipal, TraceId};
use crate::gateway::Gateway;
use crate::handler::GatewayHandler;
use crate::legacy::{self, LegacySessions};
use crate::resume::SequencedSessions;
use crate::session_token::SessionSealer;
use crate::sessions::{RestoreHints, StoreSessions};
use crate::upstream::UpstreamStatus;

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct AppState {
    /// The gateway.
    pub gw: Arc<Gateway>,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// Open legacy SSE sessions.
    pub legacy: Arc<LegacySessions>,
    /// Authentication, authorization and audit.
    pub auth: Arc<Auth>,
    /// Streamable HTTP sessions of this process.
    pub mcp_sessions: Arc<SequencedSessions>,
    /// Seals and opens `Mcp-Session-Id`s.
    pub sealer: Arc<SessionSealer>,
    /// `initialize` parameters of sessions being resumed.
    pub restore_hints: Arc<RestoreHints>,
}

/// Refuses requests to a virtual server that does not exist or is not the
/// caller's (404, so other tenants' view names do not leak).
async fn view_check(
    State(gw): State<Arc<Gateway>>,
    request: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    let path = request.uri().path();
    if let Some(name) = path
        .strip_prefix("/servers/")
        .and_then(|p| p.strip_suffix("/mcp"))
    {
        let principal = request
            .extensions()
            .get::<crate::auth::middleware::RequestPrincipal>()
            .map(|p| p.0.clone());
        let usable = gw
            .views
            .get(name)
            .is_some_and(|v| principal.is_none_or(|p| v.may_use(&p)));
        if !usable {
            return (
                StatusCode::NOT_FOUND,
                Json(json!({"error": {"reason": "not_found", "message": format!("no virtual server named `{name}`; the ones you may use are configured under [[virtual_servers]], and /mcp serves every tool you may use")}})),
            )
                .into_response();
        }
    }
    next.run(request).await
}

/// A JSON-RPC error response with the HTTP status that goes with it.
pub fn jsonrpc_error(
    status: StatusCode,
    id: Option<Value>,
    code: i32,
    message: String,
) -> Response {
    metrics::counter!("gateway_errors_total", "type" => "bad_request").increment(1);
    let body = json!({"jsonrpc": "2.0", "id": id.unwrap_or(Value::Null), "error": {"code": code, "message": message}});
    (status, Json(body)).into_response()
}

/// Reads a request body up to `limit` bytes and checks it is one JSON-RPC message.
pub async fn read_checked_body(body: Body, limit: usize) -> Result<Bytes, Response> {
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
        let too_large = std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            jsonrpc_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                None,
                -32600,
                format!("request body exceeds {limit} bytes (mcp.max_request_body_bytes); send a smaller message"),
            )
        } else {
            jsonrpc_error(StatusCode::BAD_REQUEST, None, -32700, format!("could not read the request body: {e}"))
        }
    })?;
    if let Err((e, id)) = check_envelope(&bytes) {
        return Err(jsonrpc_error(
            StatusCode::BAD_REQUEST,
            id,
            e.code().code(),
            e.to_string(),
        ));
    }
    Ok(bytes)
}

/// Refuses an `MCP-Protocol-Version` the gateway does not speak with 400 and
/// an `UnsupportedProtocolVersionError` (-32022, `data` listing the supported
/// revisions and the requested one), which tells a 2026-07-28 client to
/// retry with one of them and a dual-era client that this is a modern server.
fn check_protocol_header(req: &Request) -> Result<(), Response> {
    if let Some(v) = req.headers().get("mcp-protocol-version") {
        let s = v.to_str().unwrap_or("<not text>");
        if ProtocolRevision::parse(s).is_none() {
            metrics::counter!("gateway_errors_total", "type" => "unsupported_protocol_version")
                .increment(1);
            let body = json!({
                "jsonrpc": "2.0",
                "id": Value::Null,
                "error": meshgate_protocol::versions::unsupported_version_error(s),
            });
            return Err((StatusCode::BAD_REQUEST, Json(body)).into_response());
        }
    }
    Ok(())
}

/// What the `/mcp` pre-check needs.
#[derive(Clone)]
struct Precheck {
    limit: usize,
    gw: Arc<Gateway>,
    sealer: Arc<SessionSealer>,
    hints: Arc<RestoreHints>,
    sessions: Arc<SequencedSessions>,
}

/// A 404 for a session id that cannot be used, saying why and what to do.
pub(crate) fn session_refused(kind: &'static str, message: String) -> Response {
    metrics::counter!("gateway_session_ids_refused_total", "reason" => kind).increment(1);
    jsonrpc_error(StatusCode::NOT_FOUND, None, -32001, message)
}

/// Opens a presented sealed session id and checks it may be used by
/// `principal`: authentic, not expired, opened by the same principal, and
/// not ended. Returns the claims and whether this process holds the session.
pub(crate) async fn admit_session(
    sealer: &SessionSealer,
    gw: &Gateway,
    sessions: &SequencedSessions,
    principal: &meshgate_core::Principal,
    presented: &str,
) -> Result<(crate::session_token::SessionClaims, bool), Response> {
    let c = sealer
        .open(presented, crate::upstream::unix_now())
        .map_err(|e| session_refused(e.kind(), e.to_string()))?;
    // A session belongs to whoever opened it: anyone else gets the same
    // answer as for a session that does not exist.
    if c.ten != principal.tenant || c.sub != principal.subject {
        metrics::counter!("gateway_errors_total", "type" => "session_not_owned").increment(1);
        return Err(session_refused(
            "not_owned",
            "session not found: it expired, was ended with DELETE, or never existed; send a new initialize without Mcp-Session-Id".into(),
        ));
    }
    let held = sessions
        .has_session(&c.sid.clone().into())
        .await
        .unwrap_or(false);
    if !held {
        match gw.store.session_ended(&c.sid).await {
            Ok(false) => {}
            Ok(true) => {
                return Err(session_refused(
                    "ended",
                    "this session was ended (with DELETE, or closed by an operator); send a new initialize without Mcp-Session-Id".into(),
                ));
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not check whether a session was ended");
                return Err(jsonrpc_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    None,
                    -32603,
                    "the gateway's store is unavailable, so the session cannot be resumed; retry shortly".into(),
                ));
            }
        }
    }
    Ok((c, held))
}

/// The `initialize` parameters of a request body, if it is an initialize.
fn initialize_params(body: &[u8]) -> Option<rmcp::model::InitializeRequestParams> {
    #[derive(serde::Deserialize)]
    struct Req {
        method: String,
        params: Option<Value>,
    }
    let req: Req = serde_json::from_slice(body).ok()?;
    (req.method == "initialize")
        .then_some(req.params)
        .flatten()
        .and_then(|p| serde_json::from_value(p).ok())
}

async fn mcp_precheck(State(pc): State<Precheck>, mut req: Request, next: Next) -> Response {
    if let Err(r) = check_protocol_header(&req) {
        return r;
    }
    let principal = req
        .extensions()
        .get::<RequestPrincipal>()
        .map(|p| p.0.clone());
    let Some(principal) = principal else {
        return jsonrpc_error(
            StatusCode::UNAUTHORIZED,
            None,
            -32600,
            "internal: the request reached /mcp without an authenticated principal".into(),
        );
    };
    // The client's session id is a sealed token: open it, check it belongs
    // to the caller, and hand rmcp the inner id. A session this process
    // does not hold is resumed from the token's `initialize` parameters.
    let mut claims = None;
    let mut _hint = None;
    if let Some(v) = req.headers().get("mcp-session-id") {
        let presented = v.to_str().unwrap_or("").to_owned();
        let (c, held) =
            match admit_session(&pc.sealer, &pc.gw, &pc.sessions, &principal, &presented).await {
                Ok(admitted) => admitted,
                Err(r) => return r,
            };
        if !held {
            _hint = Some(pc.hints.place(&c.sid, c.init.clone()));
        }
        req.extensions_mut()
            .insert(crate::clients::PublicSessionId(presented));
        match HeaderValue::from_str(&c.sid) {
            Ok(inner) => {
                req.headers_mut().insert("mcp-session-id", inner);
            }
            Err(_) => {
                return session_refused(
                    "malformed",
                    crate::session_token::SessionIdError::Malformed.to_string(),
                );
            }
        }
        claims = Some(c);
    }
    let deleting = req.method() == Method::DELETE;
    let slot = crate::clients::SessionSlot::default();
    let mut init = None;
    let resp = if req.method() != Method::POST {
        next.run(req).await
    } else {
        // A POST is in flight until its answer has been written (its SSE
        // stream ends after the response), so the drain on shutdown waits
        // for it rather than cutting it off.
        let exchange = pc.gw.track_exchange();
        let (mut parts, body) = req.into_parts();
        if claims.is_none() {
            parts.extensions.insert(slot.clone());
        }
        let resp = match read_checked_body(body, pc.limit).await {
            Ok(bytes) => {
                if claims.is_none() {
                    init = initialize_params(&bytes);
                }
                next.run(Request::from_parts(parts, Body::from(bytes)))
                    .await
            }
            Err(r) => return r,
        };
        resp.map(|b| {
            Body::new(http_body_util::BodyExt::map_frame(b, move |f| {
                let _in_flight = &exchange;
                f
            }))
        })
    };
    let mut resp = resp;
    if claims.is_none()
        && resp.status().is_success()
        && let Some(id) = resp
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    {
        let Some(init) = init else {
            tracing::error!("a session was opened by a request that is not a parseable initialize");
            return jsonrpc_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                None,
                -32603,
                "internal: a session was opened without initialize parameters".into(),
            );
        };
        let c = pc.sealer.claims(
            &id,
            &principal.tenant,
            &principal.subject,
            init,
            crate::upstream::unix_now(),
        );
        match pc.sealer.seal(&c).map(|t| HeaderValue::from_str(&t)) {
            Ok(Ok(token)) => {
                slot.bind(token.to_str().unwrap_or_default(), &id);
                resp.headers_mut().insert("mcp-session-id", token);
            }
            Ok(Err(_)) | Err(_) => {
                tracing::error!("could not seal a session id");
                let _ = pc.sessions.close_session(&id.into()).await;
                return jsonrpc_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    None,
                    -32603,
                    "internal: could not seal the session id; retry initialize".into(),
                );
            }
        }
    }
    if deleting
        && resp.status().is_success()
        && let Some(c) = &claims
    {
        let until = (c.exp as i64).saturating_mul(1000);
        if let Err(e) = pc.gw.store.end_session(&c.sid, until).await {
            tracing::warn!(error = %e, "could not record an ended session; its id stays usable after a restart");
        }
    }
    let shown = claims.as_ref().map(|c| c.sid.as_str());
    explain_transport_error(resp, shown).await
}

/// Turns the transport's plain-text 4xx answers into JSON-RPC errors that say
/// what to do, keeping the status code.
async fn explain_transport_error(resp: Response, session: Option<&str>) -> Response {
    let status = resp.status();
    let is_text = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|ct| ct.starts_with("text/plain"));
    if !status.is_client_error() || !is_text {
        return resp;
    }
    let body = axum::body::to_bytes(resp.into_body(), 64 * 1024)
        .await
        .unwrap_or_default();
    let detail = String::from_utf8_lossy(&body).trim().to_owned();
    let message = match status {
        StatusCode::NOT_FOUND => format!(
            "session `{}` not found: it expired, was ended with DELETE, or never existed; send a new initialize without Mcp-Session-Id",
            session.unwrap_or("")
        ),
        StatusCode::BAD_REQUEST if detail.contains("Session ID is required") => {
            "missing Mcp-Session-Id header: send initialize first and repeat the Mcp-Session-Id it returns on every request".to_owned()
        }
        StatusCode::NOT_ACCEPTABLE => format!("{detail} (set the Accept header to `application/json, text/event-stream`)"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => format!("{detail} (set Content-Type: application/json)"),
        _ => detail,
    };
    jsonrpc_error(status, None, -32600, message)
}

/// Trace-id layer: echoes a valid `X-Trace-ID` or makes one, runs the request
/// in a span that carries it, and sets it on the response.
async fn trace_id(req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-trace-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| {
            !s.is_empty()
                && s.len() <= 128
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let span = tracing::info_span!("http", trace_id = %id, method = %req.method(), path = %req.uri().path());
    let mut req = req;
    req.extensions_mut().insert(TraceId(id.clone()));
    let mut resp = next.run(req).instrument(span).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-trace-id", v);
    }
    resp
}

/// rmcp's Streamable HTTP service behind one `Arc`. axum clones a route's
/// service for every request, and cloning `StreamableHttpService` copies its
/// whole configuration (allowed hosts, a cancellation token); this clones a
/// pointer and calls the same `handle`.
#[derive(Clone)]
struct SharedMcpService(Arc<StreamableHttpService<GatewayHandler, SequencedSessions>>);

impl tower::Service<Request> for SharedMcpService {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response, std::convert::Infallible>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { Ok(service.handle(req).await.map(Body::new)) })
    }
}

/// What `/health` and the start-up log say when authentication is off.
pub const AUTH_DISABLED_WARNING: &str = "authentication is DISABLED (auth.enabled = false): anyone who can reach this gateway can call every tool; use this only for local development";

/// Builds the application router.
pub fn router(state: AppState) -> Router {
    let gw = state.gw.clone();
    let cfg = &gw.config.mcp;
    let mut mcp_config = StreamableHttpServerConfig::default()
        .with_sse_keep_alive(
            (cfg.sse_keep_alive_secs > 0).then(|| Duration::from_secs(cfg.sse_keep_alive_secs)),
        )
        .with_json_response(cfg.json_response)
        .with_cancellation_token(gw.shutdown.child_token())
        .with_max_request_body_bytes(cfg.max_request_body_bytes);
    mcp_config = if cfg.allowed_hosts.iter().any(|h| h == "*") {
        mcp_config.disable_allowed_hosts()
    } else {
        mcp_config.with_allowed_hosts(cfg.allowed_hosts.clone())
    };
    mcp_config.session_store = Some(Arc::new(StoreSessions::new(
        gw.store.clone(),
        state.restore_hints.clone(),
    )));
    let factory_gw = gw.clone();
    let factory_auth = state.auth.clone();
    let mcp = SharedMcpService(Arc::new(StreamableHttpService::new(
        move || {
            Ok(GatewayHandler::new(
                factory_gw.clone(),
                factory_auth.clone(),
                "streamable_http",
            ))
        },
        state.mcp_sessions.clone(),
        mcp_config,
    )));
    let limit = cfg.max_request_body_bytes;
    let mcp_routes = Router::new()
        .route_service("/mcp", mcp.clone())
        .route_service("/servers/{name}/mcp", mcp)
        .layer(middleware::from_fn_with_state(
            Precheck {
                limit,
                gw: gw.clone(),
                sealer: state.sealer.clone(),
                hints: state.restore_hints.clone(),
                sessions: state.mcp_sessions.clone(),
            },
            mcp_precheck,
        ))
        .layer(middleware::from_fn_with_state(gw.clone(), view_check));
    let auth = state.auth.clone();
    let origin = Arc::new(crate::origin::OriginLayer::new(cfg).unwrap_or_else(|e| {
        tracing::error!(error = %e, "mcp.allowed_origins is invalid; allowing no foreign browser origin");
        crate::origin::OriginLayer::strict()
    }));
    Router::new()
        .merge(crate::admin::routes())
        .merge(crate::upstreams_api::routes())
        .merge(crate::tools_api::routes())
        .route("/health", get(health))
        .route("/health/store", get(health_store))
        .route("/health/upstreams", get(health_upstreams))
        .route("/health/upstreams/{name}", get(health_upstream))
        .route("/health/{component}", get(health_unknown))
        .route("/ready", get(ready))
        .route("/metrics", get(render_metrics))
        .route("/mcp/ws", get(crate::mcp_ws::upgrade))
        .route("/sse", get(legacy::open_stream))
        .route("/messages", post(legacy::post_message))
        .with_state(state)
        .merge(mcp_routes)
        .merge(crate::auth::api::routes().with_state(auth.clone()))
        .merge(crate::mesh::api::routes().with_state(gw.clone()))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            gw.clone(),
            crate::limits::rate_limit,
        ))
        .layer(middleware::from_fn_with_state(
            auth,
            crate::auth::middleware::authenticate,
        ))
        .layer(middleware::from_fn_with_state(origin, crate::origin::check))
        .layer(middleware::from_fn(trace_id))
}

fn upstream_json(gw: &Gateway, name: &str) -> Option<(bool, Value)> {
    let up = gw.upstream_named(name)?;
    let (status, since) = up.status();
    let listing = up.listing();
    let error = match &status {
        UpstreamStatus::Down(e) => Some(e.clone()),
        _ => None,
    };
    let healthy = matches!(status, UpstreamStatus::Up | UpstreamStatus::Disabled);
    Some((
        healthy,
        json!({
            "status": status.label(),
            "since_unix": since,
            "transport": up.config.transport,
            "calls_over": if up.per_session() { "one connection per client session" } else { "one shared connection" },
            "tools": listing.tools.len(),
            "prompts": listing.prompts.len(),
            "resources": listing.resources.len(),
            "error": error,
        }),
    ))
}

async fn store_json(gw: &Gateway) -> (bool, Value) {
    let started = std::time::Instant::now();
    match gw.store.schema_version().await {
        Ok(v) => (
            true,
            json!({"status": "up", "backend": gw.store.backend(), "schema_version": v, "latency_ms": started.elapsed().as_secs_f64() * 1000.0}),
        ),
        Err(e) => (
            false,
            json!({"status": "down", "backend": gw.store.backend(), "error": e.to_string(), "fix": "check the data directory's disk space and permissions"}),
        ),
    }
}

/// `GET /health`: public, so without credentials it says only how many
/// components are up; a caller holding `metrics:read` gets every component's
/// details (names, errors), as on `/health/{component}`.
async fn health(State(s): State<AppState>, req: Request) -> Response {
    let client = crate::auth::middleware::client_of(&s.auth, &req);
    let detailed = s
        .auth
        .optional_principal(req.headers(), &client)
        .await
        .is_some_and(|p| p.has_scope(meshgate_core::auth::scope::METRICS_READ));
    let (store_ok, mut store) = store_json(&s.gw).await;
    let mut upstreams = serde_json::Map::new();
    let (mut up_count, mut down_count) = (0, 0);
    for up in &s.gw.upstreams {
        if let Some((ok, v)) = upstream_json(&s.gw, &up.config.name) {
            if ok {
                up_count += 1;
            } else {
                down_count += 1;
            }
            upstreams.insert(up.config.name.clone(), v);
        }
    }
    let degraded = down_count > 0;
    let upstreams = if detailed {
        Value::Object(upstreams)
    } else {
        if let Some(m) = store.as_object_mut() {
            m.retain(|k, _| k == "status" || k == "backend");
        }
        json!({"healthy": up_count, "unhealthy": down_count, "details": "send a credential with scope metrics:read for names and errors"})
    };
    let status = if !store_ok {
        "down"
    } else if degraded {
        "degraded"
    } else {
        "ok"
    };
    let code = if store_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = json!({
        "status": status,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": s.gw.started.elapsed().as_secs(),
        "auth": if s.auth.enabled() { "enabled" } else { "disabled" },
        "components": {"store": store, "upstreams": upstreams},
    });
    if !s.auth.enabled() {
        body["warning"] = json!(AUTH_DISABLED_WARNING);
    }
    (code, Json(body)).into_response()
}

async fn health_store(State(s): State<AppState>) -> Response {
    let (ok, v) = store_json(&s.gw).await;
    (
        if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        Json(v),
    )
        .into_response()
}

async fn health_upstreams(State(s): State<AppState>) -> Response {
    let mut all = serde_json::Map::new();
    let mut ok = true;
    for up in &s.gw.upstreams {
        if let Some((healthy, v)) = upstream_json(&s.gw, &up.config.name) {
            ok &= healthy;
            all.insert(up.config.name.clone(), v);
        }
    }
    (
        if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        Json(Value::Object(all)),
    )
        .into_response()
}

async fn health_upstream(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    match upstream_json(&s.gw, &name) {
        Some((ok, v)) => (
            if ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            },
            Json(v),
        )
            .into_response(),
        None => {
            let known: Vec<String> =
                s.gw.upstreams
                    .iter()
                    .map(|u| u.config.name.clone())
                    .collect();
            (
                StatusCode::NOT_FOUND,
                Json(json!({"error": format!("no upstream named `{name}`; configured upstreams: {}", known.join(", "))})),
            )
                .into_response()
        }
    }
}

async fn not_found(req: Request) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": {"reason": "not_found", "message": format!("no route {} {}; see docs/protocol.md and docs/operations.md for the endpoints", req.method(), req.uri().path())}})),
    )
        .into_response()
}

async fn health_unknown(Path(component): Path<String>) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": format!("unknown health component `{component}`; use store, upstreams or upstreams/<name>")})),
    )
        .into_response()
}

async fn ready(State(s): State<AppState>) -> Response {
    if s.gw.is_ready() {
        (StatusCode::OK, Json(json!({"ready": true}))).into_response()
    } else if s.gw.shutdown.is_cancelled() || s.gw.inflight.is_draining() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reason": "shutting down"})),
        )
            .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reason": "connecting to upstreams"})),
        )
            .into_response()
    }
}

async fn render_metrics(State(s): State<AppState>) -> Response {
    // A breaker whose open timeout has passed is half-open by now.
    for up in &s.gw.upstreams {
        up.traffic.breaker_state();
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        s.metrics.render(),
    )
        .into_response()
}
