//! The MCP server side of the gateway: one [`GatewayHandler`] per client
//! session (and, for revision 2026-07-28, which has no sessions, one per
//! request) answers lists from the merged catalog and forwards calls, reads,
//! prompt gets, completions and subscriptions to the owning upstream, relaying
//! progress and cancellation both ways.
//!
//! Clients and upstreams may speak different revisions: a 2026-07-28 client's
//! call to an older upstream is parked while the upstream waits for the
//! client's input ([`ParkedCalls`]), a session client answers a 2026-07-28
//! upstream's input requests as server-to-client requests, and
//! `subscriptions/listen` streams carry the catalog's changes and watched
//! resources' updates (see docs/protocol.md, "Revision 2026-07-28").

// Logging and subscriptions are deprecated in MCP 2026-07-28 but are part of
// every session-based revision this gateway serves.
#![allow(deprecated)]

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rmcp::model::{
    CallToolRequest, CallToolRequestParams, CallToolResponse, CancelledNotificationParam,
    ClientCapabilities, ClientInfo, ClientRequest, CompleteRequest, CompleteRequestParams,
    CompleteResult, CustomRequest, CustomResult, ErrorCode, GetPromptRequest,
    GetPromptRequestParams, GetPromptResponse, Implementation, InitializeRequestParams,
    InitializeResult, InputRequest, InputRequests, InputRequiredResult, InputResponses,
    ListPromptsResult, ListResourceTemplatesResult, ListResourcesResult, ListToolsResult,
    LoggingLevel, PaginatedRequestParams, ProtocolVersion, ReadResourceRequest,
    ReadResourceRequestParams, ReadResourceResponse, Reference, RequestMetaObject,
    ResourceContents, ResultType, ServerCapabilities, ServerInfo, ServerNotification, ServerResult,
    SetLevelRequest, SetLevelRequestParams, SubscribeRequest, SubscribeRequestParams,
    SubscriptionFilter, UnsubscribeRequest, UnsubscribeRequestParams,
};
use rmcp::service::{
    NotificationContext, Peer, PeerRequestOptions, RequestContext, SubscriptionContext,
    SubscriptionSendError, SubscriptionSink,
};
use rmcp::{ErrorData as McpError, RoleClient, RoleServer, ServerHandler, ServiceError};

use meshgate_core::auth::{Principal, scope};

use crate::auth::{Auth, RequestPrincipal, TraceId};
use crate::clients::{ClientEntry, Owner, SessionConn};
use crate::gateway::{Gateway, Upstream};
use crate::outbox::Outbox;
use crate::resilience::{PoolTimeout, unit_random};
use crate::upstream::{
    Caller, InFlightGuard, InputAsk, ListKind, ModernCaller, ProgressMap, RelayTarget,
    UpstreamRelay, connect_with, is_modern_connection,
};

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// Name of the built-in tool that reports the gateway's upstreams and health.
pub const STATUS_TOOL: &str = "meshgate_status";

fn status_tool() -> rmcp::model::Tool {
    let schema =
        serde_json::json!({"type": "object", "properties": {}, "additionalProperties": false});
    let schema = match schema {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    rmcp::model::Tool::new(
        STATUS_TOOL,
        "Report the meshgate gateway's upstream MCP servers: their health, transport, and how many tools, prompts and resources each offers.",
        Arc::new(schema),
    )
}

/// Revisions served: the session-based ones through `initialize`, and
/// 2026-07-28 per request (its version, client capabilities and client info
/// in each request's `_meta`, no session).
pub const SUPPORTED_VERSIONS: [ProtocolVersion; 5] = [
    ProtocolVersion::V_2024_11_05,
    ProtocolVersion::V_2025_03_26,
    ProtocolVersion::V_2025_06_18,
    ProtocolVersion::V_2025_11_25,
    ProtocolVersion::V_2026_07_28,
];

/// Whether the request speaks 2026-07-28 or later: it names its revision in
/// `_meta` and is served on its own, without a session.
fn is_modern(ctx: &RequestContext<RoleServer>) -> bool {
    ctx.meta
        .protocol_version()
        .is_some_and(|v| !v.has_initialize())
}

/// The `_meta` to send upstream with a forwarded request: the client's,
/// without the `io.modelcontextprotocol/*` keys, which describe the client's
/// revision and capabilities, not the gateway's connection to the upstream
/// (rmcp would derive the upstream request's revision from them). Progress
/// tokens and trace context (`traceparent`, `tracestate`, `baggage`) stay.
fn upstream_meta(meta: &RequestMetaObject) -> RequestMetaObject {
    let mut m = meta.clone();
    m.0.0
        .retain(|k, _| !k.starts_with("io.modelcontextprotocol/"));
    m
}

/// Gives a result from an upstream on a revision before 2026-07-28, which
/// has no `resultType`, the `"complete"` every 2026-07-28 result carries.
fn mark_complete(r: &mut ServerResult) {
    let result_type = match r {
        ServerResult::CallToolResult(x) => &mut x.result_type,
        ServerResult::GetPromptResult(x) => &mut x.result_type,
        ServerResult::ReadResourceResult(x) => &mut x.result_type,
        ServerResult::CompleteResult(x) => &mut x.result_type,
        ServerResult::ListToolsResult(x) => &mut x.result_type,
        ServerResult::ListPromptsResult(x) => &mut x.result_type,
        ServerResult::ListResourcesResult(x) => &mut x.result_type,
        ServerResult::ListResourceTemplatesResult(x) => &mut x.result_type,
        _ => return,
    };
    result_type.get_or_insert(ResultType::COMPLETE);
}

struct SessionState {
    peer: OnceLock<Peer<RoleServer>>,
    client: OnceLock<ClientInfo>,
    entry: Arc<ClientEntry>,
    gw: Arc<Gateway>,
    log_level: Mutex<Option<LoggingLevel>>,
    change_task: Mutex<Option<tokio::task::AbortHandle>>,
    transport: &'static str,
    counted: std::sync::atomic::AtomicBool,
    /// Resources this session subscribed to at 2026-07-28 upstreams (exposed
    /// URI → the task relaying their updates).
    watches: Mutex<std::collections::HashMap<String, tokio::task::AbortHandle>>,
    /// Whether the entry is in the client registry: a session is from its
    /// `initialize` (or once its transport names it); a 2026-07-28 request,
    /// served by a handler of its own, never is.
    registered: std::sync::atomic::AtomicBool,
}

impl Drop for SessionState {
    fn drop(&mut self) {
        if self.registered.load(Ordering::Relaxed) {
            self.gw.clients.unregister(&self.entry.id);
        }
        if let Some(o) = self.entry.outbox.get() {
            o.close();
        }
        if let Ok(mut t) = self.change_task.lock()
            && let Some(t) = t.take()
        {
            t.abort();
        }
        if let Ok(mut w) = self.watches.lock() {
            for (_, task) in w.drain() {
                task.abort();
            }
        }
        if self.counted.load(Ordering::Relaxed) {
            metrics::gauge!("gateway_connections", "transport" => self.transport).decrement(1.0);
        }
    }
}

/// One client session's view of the gateway.
#[derive(Clone)]
pub struct GatewayHandler {
    gw: Arc<Gateway>,
    auth: Arc<Auth>,
    /// The principal of a session whose messages carry none of their own
    /// (legacy SSE: bound when the stream was opened).
    bound: Option<Arc<Principal>>,
    session: u64,
    state: Arc<SessionState>,
}

/// JSON-RPC error code of an authorization refusal (the MCP equivalent of 403).
pub const FORBIDDEN: ErrorCode = ErrorCode(-32003);

/// JSON-RPC error code of a request refused because the gateway is shutting down.
pub const SHUTTING_DOWN: ErrorCode = ErrorCode(-32004);

/// An upstream failure with structured data (`reason` names the kind).
fn upstream_error(message: String, reason: &str, data: serde_json::Value) -> McpError {
    let mut d = serde_json::json!({"reason": reason});
    if let (Some(m), serde_json::Value::Object(extra)) = (d.as_object_mut(), data) {
        m.extend(extra);
    }
    McpError::new(ErrorCode::INTERNAL_ERROR, message, Some(d))
}

/// How often one attempt of a tools/call lists the upstream's tools again
/// and resends the call after a -32020 (see [`GatewayHandler::attempt`]).
const HEADER_RELISTS: u32 = 3;

/// How one attempt of a forwarded request ended, when not with an answer.
enum AttemptError {
    /// The upstream answered with a JSON-RPC error: it is alive.
    Answered(McpError),
    /// No answer within the attempt's timeout; the request was cancelled upstream.
    Timeout(Duration),
    /// The client cancelled the request.
    Cancelled,
    /// No connection, or it failed before an answer; `started` is true once
    /// the upstream has sent progress for the request (then it is not retried).
    Transport { message: String, started: bool },
}

fn forbidden(message: String, reason: &str, extra: serde_json::Value) -> McpError {
    metrics::counter!("gateway_errors_total", "type" => "forbidden").increment(1);
    let mut data = serde_json::json!({"reason": reason, "http_status": 403});
    if let (Some(d), serde_json::Value::Object(extra)) = (data.as_object_mut(), extra) {
        d.extend(extra);
    }
    McpError::new(FORBIDDEN, message, Some(data))
}

/// A value the HTTP layers put into the request: directly in the message
/// (legacy SSE) or inside the HTTP request parts rmcp attaches.
fn request_ext<T: Clone + Send + Sync + 'static>(ctx: &RequestContext<RoleServer>) -> Option<T> {
    ctx.extensions
        .get::<T>()
        .or_else(|| {
            ctx.extensions
                .get::<http::request::Parts>()
                .and_then(|p| p.extensions.get::<T>())
        })
        .cloned()
}

/// The virtual server the request was sent to (`/servers/{name}/mcp`).
fn request_view(gw: &Gateway, ctx: &RequestContext<RoleServer>) -> Option<Arc<crate::views::View>> {
    let parts = ctx.extensions.get::<http::request::Parts>()?;
    gw.views.of_path(parts.uri.path())
}

/// Whether `name` is one of the gateway's own tools.
fn is_builtin_tool(name: &str) -> bool {
    name == STATUS_TOOL
        || name == crate::tools_search::SEARCH_TOOL
        || crate::mesh::tools::NAMES.contains(&name)
}

/// The name of the upstream that serves exposed tool `name`.
fn tool_upstream(gw: &Gateway, snap: &crate::gateway::Snapshot, name: &str) -> Option<String> {
    let route = snap.tool_routes.resolve(name)?;
    gw.upstreams
        .get(route.upstream)
        .map(|u| u.config.name.clone())
}

/// The principal the auth layer authenticated.
fn request_principal(ctx: &RequestContext<RoleServer>) -> Option<Arc<Principal>> {
    request_ext::<RequestPrincipal>(ctx).map(|p| p.0)
}

fn request_trace(ctx: &RequestContext<RoleServer>) -> Option<String> {
    request_ext::<TraceId>(ctx).map(|t| t.0)
}

/// Per-call bookkeeping that unregisters progress routing when dropped.
struct ProgressGuard {
    map: ProgressMap,
    token: rmcp::model::ProgressToken,
}

impl Drop for ProgressGuard {
    fn drop(&mut self) {
        self.map.remove(&self.token);
    }
}

fn err(code: ErrorCode, msg: String) -> McpError {
    McpError::new(code, msg, None)
}

fn record(method: &'static str, tool: Option<&str>, started: Instant, outcome: &'static str) {
    let elapsed = started.elapsed().as_secs_f64();
    match tool {
        Some(t) => {
            metrics::counter!("mcp_requests_total", "method" => method, "tool" => t.to_owned(), "outcome" => outcome).increment(1);
        }
        None => {
            metrics::counter!("mcp_requests_total", "method" => method, "outcome" => outcome)
                .increment(1);
        }
    }
    metrics::histogram!("mcp_request_duration_seconds", "method" => method).record(elapsed);
}

fn outcome<T>(r: &Result<T, McpError>) -> &'static str {
    if r.is_ok() { "ok" } else { "error" }
}

impl GatewayHandler {
    /// A handler for a new session over `transport` (`streamable_http`, `sse`),
    /// or for one 2026-07-28 request (Streamable HTTP makes a handler per
    /// such request, so this is cheap: the session enters the client
    /// registry only when it is one, see [`Self::register`]).
    pub fn new(gw: Arc<Gateway>, auth: Arc<Auth>, transport: &'static str) -> GatewayHandler {
        let entry = Arc::new(ClientEntry::new(transport));
        GatewayHandler {
            gw: gw.clone(),
            auth,
            bound: None,
            session: NEXT_SESSION.fetch_add(1, Ordering::Relaxed),
            state: Arc::new(SessionState {
                peer: OnceLock::new(),
                client: OnceLock::new(),
                entry,
                gw,
                log_level: Mutex::new(None),
                change_task: Mutex::new(None),
                transport,
                counted: std::sync::atomic::AtomicBool::new(false),
                watches: Mutex::new(Default::default()),
                registered: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// Puts the session into the client registry (for `/mcp/stats`,
    /// per-client health and cleanup), once.
    fn register(&self) {
        if !self.state.registered.swap(true, Ordering::Relaxed) {
            self.gw.clients.register(&self.state.entry);
        }
    }

    /// Binds the session to `principal` (for transports whose messages do not
    /// carry their own).
    pub fn with_principal(mut self, principal: Arc<Principal>) -> GatewayHandler {
        self.bound = Some(principal);
        self
    }

    /// Names the session by its transport id and lets the admin API close it
    /// through `closer` (transports that own their session task).
    pub fn with_session(
        self,
        id: &str,
        closer: tokio_util::sync::CancellationToken,
    ) -> GatewayHandler {
        let _ = self.state.entry.session_id.set(id.to_owned());
        let _ = self.state.entry.closer.set(closer);
        self.register();
        self
    }

    /// Learns the Streamable HTTP session id from a request's headers (the
    /// id is assigned in the answer to `initialize`, so it arrives with the
    /// next message: `notifications/initialized` or any request).
    fn bind_session_id(&self, extensions: &rmcp::model::Extensions) {
        let entry = &self.state.entry;
        if entry.session_id.get().is_none()
            && let Some(parts) = extensions.get::<http::request::Parts>()
            && let Some(inner) = parts
                .headers
                .get("mcp-session-id")
                .and_then(|v| v.to_str().ok())
        {
            let public = parts
                .extensions
                .get::<crate::clients::PublicSessionId>()
                .map_or(inner, |p| p.0.as_str());
            let _ = entry.session_id.set(public.to_owned());
            let _ = entry.transport_session_id.set(inner.to_owned());
        }
    }

    /// The session's registry entry.
    pub fn entry(&self) -> &Arc<ClientEntry> {
        &self.state.entry
    }

    /// The session's outbound queue, created on first use.
    fn outbox(&self, peer: &Peer<RoleServer>) -> Arc<Outbox> {
        self.state
            .entry
            .outbox
            .get_or_init(|| Outbox::start(peer.clone(), self.gw.config.backpressure))
            .clone()
    }

    /// Who sent the request, checked to hold `needed` for `method`.
    fn caller(
        &self,
        ctx: &RequestContext<RoleServer>,
        needed: &str,
        method: &str,
    ) -> Result<Arc<Principal>, McpError> {
        let entry = &self.state.entry;
        if !is_modern(ctx) {
            self.register();
        }
        self.bind_session_id(&ctx.extensions);
        entry.record(true);
        if self.gw.inflight.is_draining() {
            return Err(McpError::new(
                SHUTTING_DOWN,
                format!(
                    "{method}: the gateway is shutting down and takes no new requests; retry against another instance or after it restarts"
                ),
                Some(serde_json::json!({"reason": "shutting_down", "http_status": 503})),
            ));
        }
        let p = request_principal(ctx)
            .or_else(|| self.bound.clone())
            .ok_or_else(|| {
                forbidden(
                    format!("{method}: the request carries no authenticated principal"),
                    "unauthenticated",
                    serde_json::Value::Null,
                )
            })?;
        if !p.has_scope(needed) {
            return Err(forbidden(
                format!(
                    "forbidden: {method} needs scope `{needed}`, which your credential (role `{}`) does not hold",
                    p.role
                ),
                "insufficient_scope",
                serde_json::json!({"scope": needed}),
            ));
        }
        if entry.owner.get().is_none() {
            let _ = entry.owner.set(Owner {
                tenant: p.tenant.clone(),
                subject: p.subject.clone(),
            });
        }
        Ok(p)
    }

    /// Whether `principal`'s tenant may use upstream `index` (its own, or shared).
    fn visible(&self, index: usize, principal: &Principal) -> bool {
        self.gw
            .upstreams
            .get(index)
            .is_some_and(|u| u.config.shared || u.config.tenant == principal.tenant)
    }

    /// Whether `principal` may see and call the exposed tool `name` of upstream `index`.
    fn tool_usable(&self, index: usize, name: &str, principal: &Principal) -> bool {
        self.visible(index, principal) && self.auth.policy.check(principal, name).is_ok()
    }

    fn upstream(&self, index: usize) -> Result<Arc<Upstream>, McpError> {
        self.gw.upstreams.get(index).ok_or_else(|| {
            err(
                ErrorCode::INVALID_PARAMS,
                "the upstream of this item was removed or replaced a moment ago; call tools/list (or prompts/list, resources/list) again and retry".into(),
            )
        })
    }

    /// The connection to use for a call to `up`: this session's own connection
    /// for Streamable HTTP and HTTP+SSE upstreams and for stdio upstreams
    /// with `process = "per_session"` (a child process of its own), the
    /// shared one for other stdio upstreams and for every request of a
    /// 2026-07-28 client (`modern`: it has no session to own a connection,
    /// and one connection per request would cost an upstream handshake
    /// each). With `forward_authorization`, the session's connection sends
    /// the client's `Authorization` header, and is opened again when the
    /// client presents a different one (a refreshed token).
    /// `Err` says why there is none (a transport failure, retried).
    async fn connection(
        &self,
        up: &Arc<Upstream>,
        ctx: &RequestContext<RoleServer>,
        modern: Option<Arc<ModernCaller>>,
    ) -> Result<(Peer<RoleClient>, ProgressMap, Option<InFlightGuard>), String> {
        let client = self.outbox(&ctx.peer);
        if !up.per_session() || modern.is_some() {
            let shared = up
                .pick_process()
                .await
                .ok_or_else(|| format!("{} (no live connection)", up.status().0.label()))?;
            let guard = shared.inflight.enter(Caller {
                session: self.session,
                outbox: client,
                modern,
            });
            return Ok((
                shared.conn.peer().clone(),
                shared.progress.clone(),
                Some(guard),
            ));
        }
        // The client's credential, only for an upstream configured to take
        // it; never logged (the connection holds it, the session entry only
        // its digest).
        let authorization = up
            .config
            .forward_authorization
            .then(|| {
                ctx.extensions
                    .get::<http::request::Parts>()
                    .and_then(|p| p.headers.get(http::header::AUTHORIZATION))
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            })
            .flatten();
        let credential = authorization.as_deref().map(|a| {
            use sha2::Digest;
            <[u8; 32]>::from(sha2::Sha256::digest(a.as_bytes()))
        });
        let mut conns = self.state.entry.conns.lock().await;
        if let Some(c) = conns.get(&up.index) {
            if !c.conn.is_transport_closed() && c.credential == credential {
                c.touch();
                return Ok((c.conn.peer().clone(), c.progress.clone(), None));
            }
            if let Some(old) = conns.remove(&up.index) {
                old.conn.cancellation_token().cancel();
            }
        }
        let (relay, progress) = UpstreamRelay::new(
            up.index,
            &up.config.name,
            self.gw.namer.clone(),
            RelayTarget::Session(client),
            self.state.client.get(),
            self.gw.change_events(),
        );
        let conn = connect_with(
            &up.config,
            relay,
            &self.gw.http,
            &up.era,
            authorization.as_deref(),
        )
        .await
        .map_err(|e| {
            self.gw.report_failure(up, &e.to_string());
            e.to_string()
        })?;
        if up.retired.is_cancelled() {
            // Removed or replaced while connecting: the old definition
            // (URL, secrets, process) must not serve.
            conn.cancellation_token().cancel();
            return Err(format!(
                "upstream `{}` was removed or replaced; call tools/list again",
                up.config.name
            ));
        }
        let level = self.state.log_level.lock().ok().and_then(|l| *l);
        if let Some(level) = level
            && conn
                .peer_info()
                .is_some_and(|i| i.capabilities.logging.is_some())
            && !is_modern_connection(conn.peer())
        {
            let _ = conn
                .peer()
                .set_level(SetLevelRequestParams::new(level))
                .await;
        }
        let peer = conn.peer().clone();
        let c = Arc::new(SessionConn {
            conn,
            progress: progress.clone(),
            last_used: Default::default(),
            credential,
        });
        c.touch();
        conns.insert(up.index, c);
        Ok((peer, progress, None))
    }

    /// Sends `request` to upstream `index` on behalf of the client request in
    /// `ctx`: through the upstream's circuit breaker and call pool, with the
    /// call timeout of `tool` per attempt, and retries with exponential
    /// backoff and full jitter after transport failures (never after an
    /// answer, a timeout or progress), all within the request's deadline.
    async fn forward(
        &self,
        index: usize,
        request: ClientRequest,
        ctx: &RequestContext<RoleServer>,
        tool: Option<&str>,
    ) -> Result<ServerResult, McpError> {
        self.forward_as(index, request, ctx, tool, None).await
    }

    /// [`Self::forward`]; for a 2026-07-28 client, `asks` takes what the
    /// upstream asks of the client during the call (sampling, elicitation,
    /// roots), for requests that can answer with an `InputRequiredResult`.
    async fn forward_as(
        &self,
        index: usize,
        request: ClientRequest,
        ctx: &RequestContext<RoleServer>,
        tool: Option<&str>,
        asks: Option<tokio::sync::mpsc::Sender<InputAsk>>,
    ) -> Result<ServerResult, McpError> {
        let up = self.upstream(index)?.clone();
        let modern = is_modern(ctx).then(|| {
            Arc::new(ModernCaller {
                log_level: ctx.meta.log_level(),
                asks,
            })
        });
        if !up.config.enabled {
            return Err(err(
                ErrorCode::INVALID_REQUEST,
                format!(
                    "upstream `{}` is disabled in the configuration",
                    up.config.name
                ),
            ));
        }
        let _tracked = self.gw.inflight.track();
        let started = Instant::now();
        let timeout = up.config.call_timeout(tool);
        let deadline = up.config.call_deadline(tool);
        let retry = up.config.retry.policy();
        let name = &up.config.name;
        let mut request = Some(request);
        let mut attempt: u32 = 1;
        loop {
            if let Err(retry_after) = up.traffic.admit() {
                metrics::counter!("gateway_errors_total", "type" => "circuit_open").increment(1);
                self.state.entry.record(false);
                let ms = retry_after.as_millis() as u64;
                return Err(upstream_error(
                    format!(
                        "circuit_open: upstream `{name}` is failing, so its circuit breaker is open and calls fail fast; it lets a probe through in {ms} ms. Operators can reset it with POST /admin/circuit-breakers/{name}/reset"
                    ),
                    "circuit_open",
                    serde_json::json!({"upstream": name, "retry_after_ms": ms, "http_status": 503}),
                ));
            }
            let budget = deadline.saturating_sub(started.elapsed());
            let lease = match up.traffic.checkout(budget).await {
                Ok(l) => l,
                Err(PoolTimeout { waited, capacity }) => {
                    up.traffic.on_ignored();
                    self.state.entry.record(false);
                    return Err(upstream_error(
                        format!(
                            "pool_timeout: no free call slot in pool `{name}` within {} ms (all {capacity} slots, upstreams.pool.size + overflow, are busy); retry later or raise the pool size",
                            waited.as_millis()
                        ),
                        "pool_timeout",
                        serde_json::json!({"pool": name, "upstream": name, "waited_ms": waited.as_millis() as u64, "capacity": capacity, "http_status": 503}),
                    ));
                }
            };
            let left = deadline.saturating_sub(started.elapsed());
            // The deadline cuts this attempt short only when it leaves less
            // than the call timeout (not merely a little less because time
            // has passed since the request arrived).
            let clipped = left + Duration::from_millis(50) < timeout;
            let this_timeout = if clipped { left } else { timeout }.max(Duration::from_millis(1));
            let req = if attempt < retry.max_attempts {
                request.clone()
            } else {
                request.take()
            };
            let Some(req) = req else {
                return Err(err(
                    ErrorCode::INTERNAL_ERROR,
                    "internal: the request was already sent".into(),
                ));
            };
            let outcome = self
                .attempt(&up, req, ctx, this_timeout, modern.clone())
                .await;
            drop(lease);
            let failure = match outcome {
                Ok(mut r) => {
                    up.traffic.on_success();
                    self.gw.report_success(&up);
                    if modern.is_some() {
                        mark_complete(&mut r);
                    }
                    return Ok(r);
                }
                Err(AttemptError::Answered(e)) => {
                    up.traffic.on_success();
                    self.gw.report_success(&up);
                    return Err(e);
                }
                Err(AttemptError::Cancelled) => {
                    up.traffic.on_ignored();
                    metrics::counter!("gateway_cancellations_total").increment(1);
                    return Err(err(
                        ErrorCode::INTERNAL_ERROR,
                        "request cancelled by the client".into(),
                    ));
                }
                Err(AttemptError::Timeout(t)) => {
                    up.traffic.on_failure();
                    self.state.entry.record(false);
                    metrics::counter!("gateway_errors_total", "type" => "upstream_timeout")
                        .increment(1);
                    let which = if clipped {
                        format!(
                            "the request's {}s deadline (deadline_secs)",
                            deadline.as_secs_f64()
                        )
                    } else if tool.is_some_and(|t| up.config.tool_timeouts.contains_key(t)) {
                        format!("{}s (tool_timeouts)", t.as_secs_f64())
                    } else {
                        format!("{}s (timeout_secs)", t.as_secs_f64())
                    };
                    return Err(upstream_error(
                        format!(
                            "upstream `{name}` did not answer within {which}; the request was cancelled upstream"
                        ),
                        "upstream_timeout",
                        serde_json::json!({"upstream": name, "timeout_ms": t.as_millis() as u64, "attempts": attempt, "http_status": 504}),
                    ));
                }
                Err(AttemptError::Transport {
                    message,
                    started: answering,
                }) => {
                    up.traffic.on_failure();
                    (message, answering)
                }
            };
            let (message, answering) = failure;
            let elapsed = started.elapsed();
            let next = if answering {
                None
            } else {
                retry.next_delay(
                    attempt,
                    unit_random(),
                    elapsed,
                    deadline,
                    Duration::from_millis(10),
                )
            };
            let Some(wait) = next else {
                self.state.entry.record(false);
                metrics::counter!("gateway_errors_total", "type" => "upstream_unavailable")
                    .increment(1);
                let why = if answering {
                    "the upstream had started answering, so it was not retried".to_owned()
                } else if attempt >= retry.max_attempts {
                    format!("gave up after {attempt} attempt(s) (retry.max_attempts)")
                } else {
                    format!(
                        "gave up after {attempt} attempt(s): another would pass the request's {}s deadline",
                        deadline.as_secs_f64()
                    )
                };
                return Err(upstream_error(
                    format!(
                        "upstream `{name}` is unavailable: {message}; {why} in {} ms. Other upstreams are unaffected; see GET /health/upstreams/{name}",
                        elapsed.as_millis()
                    ),
                    "upstream_unavailable",
                    serde_json::json!({"upstream": name, "attempts": attempt, "elapsed_ms": elapsed.as_millis() as u64, "http_status": 502}),
                ));
            };
            metrics::counter!("gateway_retries_total", "upstream" => name.clone()).increment(1);
            tracing::debug!(upstream = %name, attempt, wait_ms = wait.as_millis() as u64, error = %message, "retrying after a transport failure");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = ctx.ct.cancelled() => {
                    metrics::counter!("gateway_cancellations_total").increment(1);
                    return Err(err(ErrorCode::INTERNAL_ERROR, "request cancelled by the client".into()));
                }
            }
            attempt += 1;
        }
    }

    /// One attempt of [`Self::forward`].
    async fn attempt(
        &self,
        up: &Arc<Upstream>,
        request: ClientRequest,
        ctx: &RequestContext<RoleServer>,
        timeout: Duration,
        modern: Option<Arc<ModernCaller>>,
    ) -> Result<ServerResult, AttemptError> {
        // Connecting (a per-session connection's handshake) counts against
        // the attempt's time, so a hanging upstream cannot outlast the deadline.
        let connecting = tokio::time::timeout(timeout, self.connection(up, ctx, modern));
        let (peer, progress, _inflight) = connecting
            .await
            .map_err(|_| AttemptError::Transport {
                message: format!("connecting took longer than {} ms", timeout.as_millis()),
                started: false,
            })?
            .map_err(|message| AttemptError::Transport {
                message,
                started: false,
            })?;
        let client_token = ctx.meta.get_progress_token();
        let mut meta = upstream_meta(&ctx.meta);
        let modern_upstream = is_modern_connection(&peer);
        if modern_upstream {
            // A 2026-07-28 upstream logs only for requests that ask, at the
            // level they ask: the 2026-07-28 client's own, or the session's
            // logging/setLevel (everything when it set none, as before).
            let level = if is_modern(ctx) {
                ctx.meta.log_level()
            } else {
                Some(
                    self.state
                        .log_level
                        .lock()
                        .ok()
                        .and_then(|l| *l)
                        .unwrap_or(LoggingLevel::Debug),
                )
            };
            if let Some(level) = level {
                meta.set_log_level(level);
            }
        }
        // rmcp's client transport mirrors a tools/call argument marked
        // `x-mcp-header` into its `Mcp-Param-*` header only for tools it has
        // cached from a tools/list answer on that same connection, and that
        // cache can miss: a per-session connection has never listed, and
        // rmcp (3.9) hands a tools/list answer that arrives on an SSE stream
        // to the caller without caching it when the stream's end is handled
        // first. A 2026-07-28 upstream then refuses the call with -32020
        // (HTTP 400, before its handler runs, so nothing was executed): the
        // call is sent again after a tools/list on the same connection.
        let relist = modern_upstream && matches!(request, ClientRequest::CallToolRequest(_));
        let mut request = request;
        let mut relists: u32 = 0;
        let began = Instant::now();
        loop {
            let left = timeout
                .saturating_sub(began.elapsed())
                .max(Duration::from_millis(1));
            let mut options = PeerRequestOptions::no_options();
            options.timeout = Some(left);
            options.meta = Some(meta.clone());
            let again = (relist && relists < HEADER_RELISTS).then(|| request.clone());
            // Progress the upstream sends right away waits for the route instead of being dropped.
            let registering = match client_token {
                Some(_) => Some(progress.registration().await),
                None => None,
            };
            let handle = peer
                .send_request_with_option(request, options)
                .await
                .map_err(|e| AttemptError::Transport {
                    message: format!("sending failed: {e}"),
                    started: false,
                })?;
            let seen = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let outbox = self.outbox(&ctx.peer);
            let route = client_token.clone().map(|token| {
                progress.insert(
                    handle.progress_token.clone(),
                    token,
                    outbox.clone(),
                    seen.clone(),
                );
                ProgressGuard {
                    map: progress.clone(),
                    token: handle.progress_token.clone(),
                }
            });
            drop(registering);
            let id = handle.id.clone();
            let result = tokio::select! {
                r = handle.await_response() => r,
                _ = ctx.ct.cancelled() => {
                    let _ = peer
                        .notify_cancelled(CancelledNotificationParam::new(Some(id), Some("cancelled by the client".into())))
                        .await;
                    return Err(AttemptError::Cancelled);
                }
            };
            // Progress and log messages queued for this client go out before the result.
            // The route stays while settling: the upstream's last progress can
            // still be in a notification handler that has not run yet.
            outbox
                .settle(client_token.as_ref(), Duration::from_secs(1))
                .await;
            drop(route);
            return match result {
                Ok(r) => Ok(r),
                Err(ServiceError::McpError(e)) => {
                    if e.code == ErrorCode::HEADER_MISMATCH
                        && let Some(again) = again
                    {
                        relists += 1;
                        tracing::debug!(upstream = %up.config.name, relists, error = %e.message, "upstream refused a tools/call's headers; listing its tools on this connection and sending the call again");
                        let listed = tokio::select! {
                            r = tokio::time::timeout(left, peer.list_all_tools()) => r,
                            _ = ctx.ct.cancelled() => return Err(AttemptError::Cancelled),
                        };
                        if matches!(listed, Ok(Ok(_))) {
                            request = again;
                            continue;
                        }
                    }
                    Err(AttemptError::Answered(e))
                }
                Err(ServiceError::Timeout { .. }) => Err(AttemptError::Timeout(timeout)),
                Err(e) => {
                    metrics::counter!("gateway_errors_total", "type" => "upstream_transport")
                        .increment(1);
                    self.gw.report_failure(up, &e.to_string());
                    Err(AttemptError::Transport {
                        message: format!("failed while answering: {e}"),
                        started: seen.load(Ordering::Acquire),
                    })
                }
            };
        }
    }

    /// Routes a request about resource `uri` to its upstream; `build` makes
    /// the request from the URI the upstream knows. Used where only success
    /// matters (subscriptions).
    async fn forward_for_uri(
        &self,
        method: &str,
        uri: &str,
        ctx: &RequestContext<RoleServer>,
        build: impl FnOnce(String) -> ClientRequest,
    ) -> Result<(), McpError> {
        let p = self.caller(ctx, scope::MCP_READ, method)?;
        let (idx, original) = self.route_visible_uri(uri, &p)?;
        self.forward(idx, build(original), ctx, None)
            .await
            .map(|_| ())
    }

    /// [`Self::route_uri`], refusing URIs of upstreams the principal's tenant
    /// may not use as if they did not exist.
    fn route_visible_uri(&self, uri: &str, p: &Principal) -> Result<(usize, String), McpError> {
        let (idx, original) = self.route_uri(uri)?;
        if !self.visible(idx, p) {
            return Err(err(
                ErrorCode::RESOURCE_NOT_FOUND,
                format!("no upstream provides resource `{uri}`; see resources/list"),
            ));
        }
        Ok((idx, original))
    }

    /// Finds the upstream and original URI of an exposed resource URI.
    fn route_uri(&self, uri: &str) -> Result<(usize, String), McpError> {
        let gw = &self.gw;
        let namer = gw.namer();
        if namer.prefixed {
            return match namer.split_uri(uri, |n| gw.upstream_named(n).is_some()) {
                Some((name, original)) => {
                    let idx = gw.upstream_named(name).map(|u| u.index).unwrap_or_default();
                    Ok((idx, original.to_owned()))
                }
                None => Err(err(
                    ErrorCode::RESOURCE_NOT_FOUND,
                    format!(
                        "resource `{uri}` names no upstream; exposed URIs look like <upstream>+<uri>, as resources/list shows"
                    ),
                )),
            };
        }
        let snap = gw.snapshot();
        if let Some(r) = snap.resource_routes.resolve(uri) {
            return Ok((r.upstream, r.original.clone()));
        }
        let enabled: Vec<Arc<Upstream>> =
            gw.upstreams.iter().filter(|u| u.config.enabled).collect();
        if let [only] = enabled.as_slice() {
            return Ok((only.index, uri.to_owned()));
        }
        for up in &enabled {
            let listing = up.listing();
            if listing.templates.iter().any(|t| {
                let fixed = t.uri_template.split('{').next().unwrap_or_default();
                !fixed.is_empty() && uri.starts_with(fixed)
            }) {
                return Ok((up.index, uri.to_owned()));
            }
        }
        Err(err(
            ErrorCode::RESOURCE_NOT_FOUND,
            format!("no upstream provides resource `{uri}`; see resources/list"),
        ))
    }

    /// The upstream whose prefix `exposed` carries, if `p` may see it.
    fn prefixed_upstream(&self, exposed: &str, p: &Principal) -> Option<Arc<Upstream>> {
        let namer = self.gw.namer();
        if !namer.prefixed {
            return None;
        }
        let sep = &namer.separator;
        self.gw.upstreams.iter().find(|u| {
            exposed
                .strip_prefix(u.config.name.as_str())
                .is_some_and(|rest| rest.starts_with(sep.as_str()))
                && self.visible(u.index, p)
        })
    }

    /// When `exposed` names a tool of an upstream that is still connecting
    /// (the gateway just started, or the upstream restarts), waits for its
    /// catalog, at most its `connect_timeout_secs` (10 s at most) or until
    /// the request is cancelled. True when it waited and the upstream is no
    /// longer connecting.
    async fn wait_while_connecting(
        &self,
        exposed: &str,
        p: &Principal,
        ctx: &RequestContext<RoleServer>,
    ) -> bool {
        let Some(up) = self.prefixed_upstream(exposed, p) else {
            return false;
        };
        let connecting = || matches!(up.status().0, crate::upstream::UpstreamStatus::Connecting);
        if !connecting() {
            return false;
        }
        let limit = Duration::from_secs(up.config.connect_timeout_secs.clamp(1, 10));
        let deadline = tokio::time::Instant::now() + limit;
        let mut changes = self.gw.subscribe_changes();
        while connecting() && tokio::time::Instant::now() < deadline {
            tokio::select! {
                _ = changes.recv() => {}
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
                () = ctx.ct.cancelled() => return false,
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        !connecting()
    }

    /// When `exposed` carries the prefix of an upstream that has not been
    /// listed because it is down, the error that says so (instead of
    /// "unknown tool").
    fn unlisted_because_down(&self, exposed: &str, p: &Principal) -> Option<McpError> {
        let up = self.prefixed_upstream(exposed, p)?;
        let (status, _) = up.status();
        let why = match status {
            crate::upstream::UpstreamStatus::Down(e) => e,
            crate::upstream::UpstreamStatus::Connecting => "still connecting".to_owned(),
            _ => return None,
        };
        metrics::counter!("gateway_errors_total", "type" => "upstream_unavailable").increment(1);
        Some(err(
            ErrorCode::INTERNAL_ERROR,
            format!(
                "tool `{exposed}` belongs to upstream `{}`, which is unavailable ({why}); its tools are listed and callable once it recovers (see GET /health/upstreams/{})",
                up.config.name, up.config.name
            ),
        ))
    }

    /// `tools/call` for an authorized principal: tenant visibility, tool
    /// rules, then forwarding.
    async fn call_tool_as(
        &self,
        p: &Principal,
        mut request: CallToolRequestParams,
        ctx: &RequestContext<RoleServer>,
        started: Instant,
    ) -> Result<CallToolResponse, McpError> {
        let exposed = request.name.to_string();
        let resolve = || {
            self.gw
                .snapshot()
                .tool_routes
                .resolve(&exposed)
                .filter(|r| self.visible(r.upstream, p))
                .cloned()
        };
        let mut route = resolve();
        if route.is_none() && self.wait_while_connecting(&exposed, p, ctx).await {
            route = resolve();
        }
        let Some(route) = route else {
            if exposed == STATUS_TOOL {
                self.check_tool_rules(p, STATUS_TOOL)?;
                record("tools/call", Some(STATUS_TOOL), started, "ok");
                return Ok(CallToolResponse::Complete(
                    rmcp::model::CallToolResult::structured(self.status_report(p)),
                ));
            }
            if exposed == crate::tools_search::SEARCH_TOOL {
                self.check_tool_rules(p, &exposed)?;
                let usable = |i: usize, name: &str| self.tool_usable(i, name, p);
                let view = request_view(&self.gw, ctx);
                let r = crate::tools_search::call(
                    &self.gw,
                    request.arguments.as_ref(),
                    usable,
                    view.as_deref(),
                );
                record("tools/call", Some(&exposed), started, "ok");
                return Ok(CallToolResponse::Complete(r));
            }
            if let Some(mesh) = self.gw.mesh.get()
                && crate::mesh::tools::NAMES.contains(&exposed.as_str())
            {
                self.check_tool_rules(p, &exposed)?;
                let sink =
                    ctx.meta
                        .get_progress_token()
                        .map(|token| crate::mesh::tools::ProgressSink {
                            token,
                            outbox: self.outbox(&ctx.peer),
                        });
                let r = crate::mesh::tools::call(
                    mesh,
                    p,
                    &exposed,
                    request.arguments.take(),
                    sink,
                    ctx.ct.clone(),
                )
                .await;
                record("tools/call", Some(&exposed), started, outcome(&r));
                return r.map(CallToolResponse::Complete);
            }
            if let Some(e) = self.unlisted_because_down(&exposed, p) {
                record("tools/call", None, started, "error");
                return Err(e);
            }
            metrics::counter!("gateway_errors_total", "type" => "unknown_tool").increment(1);
            record("tools/call", None, started, "unknown_tool");
            return Err(err(
                ErrorCode::INVALID_PARAMS,
                format!(
                    "unknown tool `{exposed}`: no upstream provides it; call tools/list for the available tools"
                ),
            ));
        };
        if let Err(e) = self.check_tool_rules(p, &exposed) {
            record("tools/call", Some(&exposed), started, "denied");
            return Err(e);
        }
        let mut checks = self.gw.limits.call_checks(&exposed, &self.state.entry.id);
        if is_modern(ctx) {
            // A 2026-07-28 request has no connection to limit.
            checks.retain(|(key, _)| !key.starts_with("connection:"));
        }
        if let Err(hit) = self.gw.limits.check(&checks) {
            record("tools/call", Some(&exposed), started, "rate_limited");
            self.state.entry.record(false);
            return Err(hit.mcp_error());
        }
        if let Err(bad) =
            crate::validate::check_call_arguments(&self.gw, &exposed, &mut request.arguments)
        {
            record("tools/call", Some(&exposed), started, "invalid_arguments");
            self.state.entry.record(false);
            return Err(bad.into());
        }
        // After every check above: a cache hit is still an authorized, limited, audited call.
        let up = self.upstream(route.upstream)?;
        let cached = self.gw.cache.lookup(
            &up,
            &route.original,
            &exposed,
            &p.tenant,
            request.arguments.as_ref(),
        );
        let ticket = match cached {
            crate::cache::Lookup::Hit(res) => {
                record("tools/call", Some(&exposed), started, "ok");
                return Ok(CallToolResponse::Complete(res));
            }
            crate::cache::Lookup::Miss(ticket) => Some(ticket),
            crate::cache::Lookup::Uncached => None,
        };
        let original = route.original.clone();
        request.name = route.original.into();
        let r = self
            .forward_call(
                p,
                route.upstream,
                ClientRequest::CallToolRequest(CallToolRequest::new(request)),
                ctx,
                Some(&original),
                CallSubject {
                    method: "tools/call",
                    name: &exposed,
                },
            )
            .await;
        let r = match r {
            Ok(ServerResult::CallToolResult(res)) => {
                let o = if res.is_error == Some(true) {
                    "tool_error"
                } else {
                    "ok"
                };
                crate::validate::check_call_output(&self.gw, &exposed, &res);
                if let Some(ticket) = ticket {
                    self.gw.cache.store(ticket, &res);
                }
                record("tools/call", Some(&exposed), started, o);
                return Ok(CallToolResponse::Complete(res));
            }
            Ok(ServerResult::InputRequiredResult(res)) => Ok(CallToolResponse::InputRequired(res)),
            Ok(ServerResult::CreateTaskResult(res)) => Ok(CallToolResponse::Task(res)),
            Ok(_) => Err(err(
                ErrorCode::INTERNAL_ERROR,
                "upstream answered tools/call with an unexpected result type".into(),
            )),
            Err(e) => Err(e),
        };
        record("tools/call", Some(&exposed), started, outcome(&r));
        r
    }

    fn check_tool_rules(&self, p: &Principal, tool: &str) -> Result<(), McpError> {
        self.auth.policy.check(p, tool).map_err(|denied| {
            forbidden(
                format!("forbidden: {denied}; an admin can change auth.tool_rules"),
                "tool_denied",
                serde_json::json!({"tool": tool, "rule": denied.rule}),
            )
        })
    }

    /// Queues the audit entry of a tool call.
    #[allow(clippy::too_many_arguments)]
    async fn audit_call(
        &self,
        p: &Principal,
        ctx: &RequestContext<RoleServer>,
        tool: &str,
        args_hash: &str,
        started: Instant,
        outcome: &str,
        message: Option<&str>,
    ) {
        let trace = request_trace(ctx);
        let mut e = crate::auth::audit::entry(
            p,
            "tool.call",
            tool,
            outcome,
            trace.as_deref(),
            match message {
                Some(m) => serde_json::json!({"error": m, "transport": self.state.transport}),
                None => serde_json::json!({"transport": self.state.transport}),
            },
        );
        e.args_hash = Some(args_hash.to_owned());
        e.latency_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
        self.auth.audit.record(e).await;
    }

    fn status_report(&self, p: &Principal) -> serde_json::Value {
        let upstreams: Vec<serde_json::Value> = self
            .gw
            .upstreams
            .iter()
            .filter(|u| self.visible(u.index, p))
            .map(|u| {
                let (status, since) = u.status();
                let listing = u.listing();
                serde_json::json!({
                    "name": u.config.name,
                    "transport": u.config.transport,
                    "revision": u.era.revision().map(|v| v.to_string()),
                    "status": status.label(),
                    "since_unix": since,
                    "error": match &status { crate::upstream::UpstreamStatus::Down(e) => Some(e.clone()), _ => None },
                    "tools": listing.tools.len(),
                    "prompts": listing.prompts.len(),
                    "resources": listing.resources.len(),
                })
            })
            .collect();
        let tools_exposed = {
            let snap = self.gw.snapshot();
            snap.tools
                .iter()
                .zip(&snap.owners.tools)
                .filter(|(t, i)| self.tool_usable(**i, &t.name, p))
                .count()
        };
        serde_json::json!({
            "gateway": "meshgate",
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_secs": self.gw.started.elapsed().as_secs(),
            "tools_exposed": tools_exposed,
            "upstreams": upstreams,
        })
    }

    fn start_change_forwarding(&self, peer: Peer<RoleServer>) {
        use rmcp::model::{
            PromptListChangedNotification, ResourceListChangedNotification, ServerNotification,
            ToolListChangedNotification,
        };
        let mut rx = self.gw.subscribe_changes();
        let outbox = self.outbox(&peer);
        let task = tokio::spawn(async move {
            loop {
                let kind = match rx.recv().await {
                    Ok(k) => k,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => ListKind::Tools,
                    Err(_) => return,
                };
                let n = match kind {
                    ListKind::Tools => ServerNotification::ToolListChangedNotification(
                        ToolListChangedNotification::default(),
                    ),
                    ListKind::Prompts => ServerNotification::PromptListChangedNotification(
                        PromptListChangedNotification::default(),
                    ),
                    ListKind::Resources => ServerNotification::ResourceListChangedNotification(
                        ResourceListChangedNotification::default(),
                    ),
                };
                if peer.is_transport_closed() {
                    return;
                }
                outbox.push(n).await;
            }
        });
        if let Ok(mut t) = self.state.change_task.lock()
            && let Some(old) = t.replace(task.abort_handle())
        {
            old.abort();
        }
    }
}

/// How long a call of a 2026-07-28 client may wait for the client's input
/// (its retry with `inputResponses`) before it is cancelled upstream.
const PARK_TTL: Duration = Duration::from_secs(300);

/// Most calls waiting for input at once, gateway-wide.
const MAX_PARKED: usize = 1024;

/// Prefix of the `requestState`s the gateway issues (version 1).
const STATE_PREFIX: &str = "mgp1.";

/// Calls of 2026-07-28 clients parked while an upstream on an older revision
/// waits for an answer to its sampling, elicitation or roots request.
///
/// Such a client takes no server-to-client requests: the gateway answers its
/// call with an `InputRequiredResult` carrying the upstream's request, keeps
/// the upstream call running, and hands the answer (the `inputResponses` of
/// the client's retry) to the waiting upstream request. The `requestState` is
/// a handle sealed with HMAC-SHA256 under a per-process key, bound to the
/// principal, the method and the tool (prompt, resource) and an expiry; the
/// call itself stays in this process, so a retry that reaches another gateway
/// process is refused with a message saying so.
pub struct ParkedCalls {
    key: [u8; 32],
    calls: Mutex<std::collections::HashMap<String, Parked>>,
}

/// A call waiting for the client's input (whose it is and what it calls is
/// sealed into its `requestState`).
struct Parked {
    expires: Instant,
    /// The `inputRequests` key the answer is expected under, and the request.
    key: String,
    request: InputRequest,
    /// Where the answer goes (the upstream's request waits on it).
    pending: tokio::sync::oneshot::Sender<Result<serde_json::Value, McpError>>,
    run: RunningCall,
}

/// An upstream call of a 2026-07-28 client running in a task of its own (so
/// it outlives the request that parked it); cancelled upstream when dropped.
struct RunningCall {
    done: tokio::sync::oneshot::Receiver<Result<ServerResult, McpError>>,
    asks: tokio::sync::mpsc::Receiver<InputAsk>,
    _cancel: tokio_util::sync::DropGuard,
}

/// What a parked call is about: the method and the exposed name.
#[derive(Clone, Copy)]
struct CallSubject<'a> {
    method: &'static str,
    name: &'a str,
}

/// HMAC-SHA256 of `fields`, each prefixed with its length so that no two
/// different field lists give the same input (tenants and subjects may hold
/// any separator).
fn hmac_sha256(key: &[u8; 32], fields: &[&[u8]]) -> [u8; 32] {
    use hmac::{Mac, SimpleHmac};
    // SimpleHmac takes keys of any length, so `new_from_slice` cannot fail
    // here; an empty tag would only make every state invalid.
    let Ok(mut mac) = SimpleHmac::<sha2::Sha256>::new_from_slice(key) else {
        return [0; 32];
    };
    for f in fields {
        mac.update(&(f.len() as u64).to_be_bytes());
        mac.update(f);
    }
    mac.finalize().into_bytes().into()
}

impl ParkedCalls {
    /// An empty table with a fresh random sealing key.
    pub fn new() -> Result<ParkedCalls, String> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|e| format!("the system random source failed: {e}"))?;
        Ok(ParkedCalls {
            key,
            calls: Mutex::new(Default::default()),
        })
    }

    /// Calls waiting for input now.
    pub fn len(&self) -> usize {
        self.calls.lock().map(|c| c.len()).unwrap_or(0)
    }

    /// True when no call waits for input.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops (and so cancels upstream) the calls whose time to wait for
    /// input has passed, or every call when `all` (the gateway is draining:
    /// their retries would be refused anyway).
    pub fn prune(&self, all: bool) -> usize {
        let Ok(mut calls) = self.calls.lock() else {
            return 0;
        };
        let before = calls.len();
        let now = Instant::now();
        calls.retain(|_, c| !all && c.expires > now);
        before - calls.len()
    }

    fn mac(&self, id: &str, exp: u64, p: &Principal, subject: CallSubject<'_>) -> String {
        let exp = exp.to_string();
        hex::encode(hmac_sha256(
            &self.key,
            &[
                STATE_PREFIX.as_bytes(),
                id.as_bytes(),
                exp.as_bytes(),
                p.tenant.as_bytes(),
                p.subject.as_bytes(),
                subject.method.as_bytes(),
                subject.name.as_bytes(),
            ],
        ))
    }

    /// Whether `state` has the form of a gateway-issued `requestState`
    /// (anything else belongs to an upstream on 2026-07-28).
    fn is_ours(state: &str) -> bool {
        state.starts_with(STATE_PREFIX)
    }

    /// Parks `parked`; the `requestState` that resumes it.
    fn park(
        &self,
        parked: Parked,
        p: &Principal,
        subject: CallSubject<'_>,
    ) -> Result<String, Box<Parked>> {
        let mut raw = [0u8; 16];
        if getrandom::fill(&mut raw).is_err() {
            return Err(Box::new(parked));
        }
        let id = hex::encode(raw);
        let exp = crate::upstream::unix_now() + PARK_TTL.as_secs();
        let token = format!(
            "{STATE_PREFIX}{id}.{exp}.{}",
            self.mac(&id, exp, p, subject)
        );
        let Ok(mut calls) = self.calls.lock() else {
            return Err(Box::new(parked));
        };
        let now = Instant::now();
        // Expired calls are dropped here, which cancels them upstream.
        calls.retain(|_, c| c.expires > now);
        if calls.len() >= MAX_PARKED {
            return Err(Box::new(parked));
        }
        calls.insert(id, parked);
        Ok(token)
    }

    /// Takes the call `state` resumes, checking it was issued by this
    /// process for this principal and call and has not expired.
    fn resume(
        &self,
        state: &str,
        p: &Principal,
        subject: CallSubject<'_>,
    ) -> Result<Parked, McpError> {
        let refuse = |why: &str| {
            McpError::new(
                ErrorCode::INVALID_PARAMS,
                format!(
                    "{} `{}`: the requestState {why}; call again without requestState and inputResponses",
                    subject.method, subject.name
                ),
                Some(serde_json::json!({"reason": "request_state_refused"})),
            )
        };
        let rest = state.strip_prefix(STATE_PREFIX).unwrap_or_default();
        let mut parts = rest.splitn(3, '.');
        let (Some(id), Some(exp), Some(mac)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(refuse("is malformed"));
        };
        let Ok(exp) = exp.parse::<u64>() else {
            return Err(refuse("is malformed"));
        };
        use subtle::ConstantTimeEq;
        let expected = self.mac(id, exp, p, subject);
        if !bool::from(expected.as_bytes().ct_eq(mac.as_bytes())) {
            return Err(refuse(
                "was not issued by this gateway for your credential and this request (tampered, or another tool, prompt or resource)",
            ));
        }
        if crate::upstream::unix_now() > exp {
            return Err(refuse(&format!(
                "has expired (a call waits at most {} s for input)",
                PARK_TTL.as_secs()
            )));
        }
        self.calls
            .lock()
            .ok()
            .and_then(|mut c| c.remove(id))
            .filter(|c| c.expires > Instant::now())
            .ok_or_else(|| {
                refuse(
                    "names a call that no longer waits: it was already resumed, was cancelled upstream (its timeout passed), or waits on another gateway process (the call stays where it started)",
                )
            })
    }
}

/// The capability a client must declare for the gateway to pass `request`
/// on to it, and the name of that capability.
fn needed_capability(request: &InputRequest) -> (&'static str, ClientCapabilities) {
    let mut caps = ClientCapabilities::default();
    match request {
        InputRequest::Elicitation(_) => {
            caps.elicitation = Some(Default::default());
            ("elicitation", caps)
        }
        InputRequest::CreateMessage(_) => {
            caps.sampling = Some(Default::default());
            ("sampling", caps)
        }
        _ => {
            caps.roots = Some(Default::default());
            ("roots", caps)
        }
    }
}

/// The method of an input request, for messages.
fn input_method(request: &InputRequest) -> &'static str {
    match request {
        InputRequest::Elicitation(_) => "elicitation/create",
        InputRequest::CreateMessage(_) => "sampling/createMessage",
        _ => "roots/list",
    }
}

/// Whether `caps` declares what `request` needs.
fn declares(caps: &ClientCapabilities, request: &InputRequest) -> bool {
    match request {
        InputRequest::Elicitation(_) => caps.elicitation.is_some(),
        InputRequest::CreateMessage(_) => caps.sampling.is_some(),
        _ => caps.roots.is_some(),
    }
}

/// Moves `requestState` and `inputResponses` out of a request that may
/// carry them (`tools/call`, `prompts/get`, `resources/read`).
fn take_mrtr(request: &mut ClientRequest) -> (Option<String>, Option<InputResponses>) {
    match request {
        ClientRequest::CallToolRequest(r) => (
            r.params.request_state.take(),
            r.params.input_responses.take(),
        ),
        ClientRequest::GetPromptRequest(r) => (
            r.params.request_state.take(),
            r.params.input_responses.take(),
        ),
        ClientRequest::ReadResourceRequest(r) => (
            r.params.request_state.take(),
            r.params.input_responses.take(),
        ),
        _ => (None, None),
    }
}

impl GatewayHandler {
    /// Sends a `tools/call`, `prompts/get` or `resources/read` of `p` to
    /// upstream `index`, translating between the client's revision and the
    /// upstream's: a 2026-07-28 client's call to an older upstream runs in a
    /// task of its own, so the upstream's sampling, elicitation and roots
    /// requests can be answered through `InputRequiredResult`s and retries
    /// (see [`ParkedCalls`]); the retry resumes the parked call.
    async fn forward_call(
        &self,
        p: &Principal,
        index: usize,
        mut request: ClientRequest,
        ctx: &RequestContext<RoleServer>,
        tool: Option<&str>,
        subject: CallSubject<'_>,
    ) -> Result<ServerResult, McpError> {
        if !is_modern(ctx) {
            return self
                .forward_for_session(index, request, ctx, tool, subject)
                .await;
        }
        let (state, responses) = take_mrtr(&mut request);
        if let Some(state) = state.as_deref()
            && ParkedCalls::is_ours(state)
        {
            let parked = self.gw.parked.resume(state, p, subject)?;
            return self
                .answer_parked(parked, responses.unwrap_or_default(), p, subject, ctx)
                .await;
        }
        let up = self.upstream(index)?;
        if up.era.is_modern() {
            // Both speak 2026-07-28: the upstream's input requests go to the
            // client as they are, its requestState wrapped (so it cannot be
            // taken for one of ours) and unwrapped on the retry.
            let state = match state {
                Some(s) => Some(
                    s.strip_prefix(UPSTREAM_STATE_PREFIX)
                        .map(str::to_owned)
                        .ok_or_else(|| {
                            err(
                                ErrorCode::INVALID_PARAMS,
                                format!(
                                    "{} `{}`: the requestState was not issued by this gateway; call again without requestState and inputResponses",
                                    subject.method, subject.name
                                ),
                            )
                        })?,
                ),
                None => None,
            };
            put_mrtr(&mut request, state, responses);
            let name = up.config.name.clone();
            let r = self.forward(index, request, ctx, tool).await?;
            return pass_input_required(r, ctx, &name, subject);
        }
        let (asks_tx, asks_rx) = tokio::sync::mpsc::channel(4);
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let cancel = tokio_util::sync::CancellationToken::new();
        let mut task_ctx = ctx.clone();
        task_ctx.ct = cancel.clone();
        let this = self.clone();
        let tool = tool.map(str::to_owned);
        tokio::spawn(async move {
            let r = this
                .forward_as(index, request, &task_ctx, tool.as_deref(), Some(asks_tx))
                .await;
            let _ = done_tx.send(r);
        });
        let run = RunningCall {
            done: done_rx,
            asks: asks_rx,
            _cancel: cancel.drop_guard(),
        };
        self.drive(run, p, subject, ctx).await
    }

    /// Hands the client's answer to the upstream request a parked call
    /// waits on, and drives the call on (or asks again when the answer is
    /// missing from `responses`).
    async fn answer_parked(
        &self,
        mut parked: Parked,
        mut responses: InputResponses,
        p: &Principal,
        subject: CallSubject<'_>,
        ctx: &RequestContext<RoleServer>,
    ) -> Result<ServerResult, McpError> {
        let Some(answer) = responses.remove(&parked.key) else {
            // The spec's rule: ask again for what is missing.
            parked.expires = Instant::now() + PARK_TTL;
            let (key, request) = (parked.key.clone(), parked.request.clone());
            return match self.gw.parked.park(parked, p, subject) {
                Ok(token) => Ok(input_required(key, request, token)),
                Err(_) => Err(err(
                    ErrorCode::INTERNAL_ERROR,
                    "too many calls wait for client input; retry later".into(),
                )),
            };
        };
        let _ = parked.pending.send(Ok(answer));
        self.drive(parked.run, p, subject, ctx).await
    }

    /// Waits for a running call's result, or parks it at the upstream's
    /// next request for client input and answers with an
    /// `InputRequiredResult`.
    async fn drive(
        &self,
        mut run: RunningCall,
        p: &Principal,
        subject: CallSubject<'_>,
        ctx: &RequestContext<RoleServer>,
    ) -> Result<ServerResult, McpError> {
        let ended = || {
            err(
                ErrorCode::INTERNAL_ERROR,
                format!(
                    "internal: {} `{}` ended without an answer",
                    subject.method, subject.name
                ),
            )
        };
        let ask = tokio::select! {
            r = &mut run.done => return r.unwrap_or_else(|_| Err(ended())),
            ask = run.asks.recv() => ask,
            _ = ctx.ct.cancelled() => {
                metrics::counter!("gateway_cancellations_total").increment(1);
                return Err(err(ErrorCode::INTERNAL_ERROR, "request cancelled by the client".into()));
            }
        };
        let Some(ask) = ask else {
            // The call's task ended (it holds the sender): its result is there.
            return (&mut run.done).await.unwrap_or_else(|_| Err(ended()));
        };
        let caps = ctx.meta.client_capabilities().unwrap_or_default();
        if !declares(&caps, &ask.request) {
            let (name, needed) = needed_capability(&ask.request);
            let what = input_method(&ask.request);
            let _ = ask.reply.send(Err(McpError::new(
                ErrorCode::MISSING_REQUIRED_CLIENT_CAPABILITY,
                format!("the client did not declare the `{name}` capability"),
                None,
            )));
            metrics::counter!("gateway_errors_total", "type" => "missing_client_capability")
                .increment(1);
            let mut e = McpError::missing_required_client_capability(needed);
            e.message = format!(
                "upstream `{}` sent {what} (a server-to-client request of revisions up to 2025-11-25) during {} `{}`; the gateway passes it on to a 2026-07-28 client as an input request (InputRequiredResult), which needs the `{name}` capability in the request's _meta io.modelcontextprotocol/clientCapabilities, and this request does not declare it",
                ask.upstream, subject.method, subject.name
            )
            .into();
            return Err(e);
        }
        let key = match &ask.request {
            InputRequest::Elicitation(_) => "elicitation",
            InputRequest::CreateMessage(_) => "sampling",
            _ => "roots",
        }
        .to_owned();
        let parked = Parked {
            expires: Instant::now() + PARK_TTL,
            key: key.clone(),
            request: ask.request.clone(),
            pending: ask.reply,
            run,
        };
        match self.gw.parked.park(parked, p, subject) {
            Ok(token) => {
                metrics::counter!("gateway_input_requests_total", "method" => input_method(&ask.request)).increment(1);
                Ok(input_required(key, ask.request, token))
            }
            Err(parked) => {
                let _ = parked.pending.send(Err(err(
                    ErrorCode::INTERNAL_ERROR,
                    "the gateway cannot hold this call for client input now".into(),
                )));
                Err(err(
                    ErrorCode::INTERNAL_ERROR,
                    format!(
                        "too many calls wait for client input (at most {MAX_PARKED}); retry later"
                    ),
                ))
            }
        }
    }
}

/// Prefix of an upstream's own `requestState` as the gateway passes it on.
const UPSTREAM_STATE_PREFIX: &str = "mgu1.";

/// Most rounds of input requests the gateway answers for a session client
/// before giving up on an upstream's call (as the SDKs' own drivers do).
const MRTR_MAX_ROUNDS: usize = 10;

/// Puts `requestState` and `inputResponses` into a request that can carry them.
fn put_mrtr(request: &mut ClientRequest, state: Option<String>, responses: Option<InputResponses>) {
    match request {
        ClientRequest::CallToolRequest(r) => {
            r.params.request_state = state;
            r.params.input_responses = responses;
        }
        ClientRequest::GetPromptRequest(r) => {
            r.params.request_state = state;
            r.params.input_responses = responses;
        }
        ClientRequest::ReadResourceRequest(r) => {
            r.params.request_state = state;
            r.params.input_responses = responses;
        }
        _ => {}
    }
}

/// A 2026-07-28 upstream's answer for a 2026-07-28 client: an
/// `InputRequiredResult` goes on as it is, once the client is seen to
/// declare what each input request needs, with the upstream's
/// `requestState` wrapped.
fn pass_input_required(
    r: ServerResult,
    ctx: &RequestContext<RoleServer>,
    upstream: &str,
    subject: CallSubject<'_>,
) -> Result<ServerResult, McpError> {
    let ServerResult::InputRequiredResult(mut ir) = r else {
        return Ok(r);
    };
    let caps = ctx.meta.client_capabilities().unwrap_or_default();
    for request in ir.input_requests.iter().flat_map(|m| m.values()) {
        if !declares(&caps, request) {
            let (name, needed) = needed_capability(request);
            let mut e = McpError::missing_required_client_capability(needed);
            e.message = format!(
                "upstream `{upstream}` (2026-07-28) asks for {} during {} `{}`, which needs the `{name}` capability in the request's _meta io.modelcontextprotocol/clientCapabilities, and this request does not declare it",
                input_method(request),
                subject.method,
                subject.name
            )
            .into();
            return Err(e);
        }
    }
    ir.request_state = ir
        .request_state
        .map(|s| format!("{UPSTREAM_STATE_PREFIX}{s}"));
    Ok(ServerResult::InputRequiredResult(ir))
}

impl GatewayHandler {
    /// `tools/call`, `prompts/get` or `resources/read` of a session client:
    /// when the upstream speaks 2026-07-28 and answers with an
    /// `InputRequiredResult`, its input requests are sent to the client as
    /// the server-to-client requests of the session's revision (sampling,
    /// elicitation, roots) and the call is retried with the answers, for at
    /// most [`MRTR_MAX_ROUNDS`] rounds.
    async fn forward_for_session(
        &self,
        index: usize,
        mut request: ClientRequest,
        ctx: &RequestContext<RoleServer>,
        tool: Option<&str>,
        subject: CallSubject<'_>,
    ) -> Result<ServerResult, McpError> {
        for _ in 0..MRTR_MAX_ROUNDS {
            let r = self.forward(index, request.clone(), ctx, tool).await?;
            let ServerResult::InputRequiredResult(ir) = r else {
                return Ok(r);
            };
            let upstream = self.upstream(index)?.config.name.clone();
            let mut responses = InputResponses::new();
            for (key, ask) in ir.input_requests.unwrap_or_default() {
                let answer = tokio::select! {
                    a = self.ask_session(&upstream, ask, ctx, subject) => a?,
                    _ = ctx.ct.cancelled() => {
                        return Err(err(ErrorCode::INTERNAL_ERROR, "request cancelled by the client".into()));
                    }
                };
                responses.insert(key, answer);
            }
            put_mrtr(&mut request, ir.request_state, Some(responses));
        }
        Err(err(
            ErrorCode::INTERNAL_ERROR,
            format!(
                "{} `{}`: upstream `{}` still asked for input after {MRTR_MAX_ROUNDS} rounds; the gateway gave up",
                subject.method,
                subject.name,
                self.upstream(index)?.config.name
            ),
        ))
    }

    /// Asks the session client what a 2026-07-28 upstream's input request
    /// wants, as the server-to-client request of the session's revision.
    async fn ask_session(
        &self,
        upstream: &str,
        ask: InputRequest,
        ctx: &RequestContext<RoleServer>,
        subject: CallSubject<'_>,
    ) -> Result<serde_json::Value, McpError> {
        let what = input_method(&ask);
        let info = ctx.peer.peer_info();
        let caps = info
            .as_ref()
            .map(|i| i.capabilities.clone())
            .unwrap_or_default();
        if !declares(&caps, &ask) {
            let (name, _) = needed_capability(&ask);
            let revision = info
                .as_ref()
                .map(|i| i.protocol_version.to_string())
                .unwrap_or_else(|| "a session-based revision".into());
            return Err(err(
                ErrorCode::INVALID_REQUEST,
                format!(
                    "upstream `{upstream}` (2026-07-28) asks for {what} during {} `{}`; the gateway sends it to this session (revision {revision}) as a server-to-client request, which needs the `{name}` capability the session did not declare at initialize",
                    subject.method, subject.name
                ),
            ));
        }
        let failed = |e: rmcp::ServiceError| {
            err(
                ErrorCode::INTERNAL_ERROR,
                format!("relaying {what} of upstream `{upstream}` to the client failed: {e}"),
            )
        };
        let value = match ask {
            InputRequest::Elicitation(r) => serde_json::to_value(
                ctx.peer
                    .create_elicitation(r.params)
                    .await
                    .map_err(failed)?,
            ),
            InputRequest::CreateMessage(r) => {
                serde_json::to_value(ctx.peer.create_message(r.params).await.map_err(failed)?)
            }
            InputRequest::ListRoots(_) => {
                serde_json::to_value(ctx.peer.list_roots().await.map_err(failed)?)
            }
            _ => {
                return Err(err(
                    ErrorCode::INVALID_REQUEST,
                    format!(
                        "upstream `{upstream}` asks for an input request the gateway does not know ({what})"
                    ),
                ));
            }
        };
        value.map_err(|e| err(ErrorCode::INTERNAL_ERROR, format!("internal: {e}")))
    }
}

impl GatewayHandler {
    /// `resources/subscribe` of a session client for a resource of a
    /// 2026-07-28 upstream, which has no such method: the gateway watches
    /// the resource (see [`crate::gateway::ResourceWatches`]) and relays its
    /// updates to the session until `resources/unsubscribe` or the end of
    /// the session.
    async fn watch_for_session(
        &self,
        index: usize,
        original: String,
        exposed: String,
        ctx: &RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        use rmcp::model::{ResourceUpdatedNotification, ResourceUpdatedNotificationParam};
        let mut updates = self.gw.watches.updates.subscribe();
        let guard = self
            .gw
            .watch_resource(index, original.clone())
            .await
            .map_err(|e| {
                err(
                    ErrorCode::INTERNAL_ERROR,
                    format!("resources/subscribe `{exposed}`: {e}"),
                )
            })?;
        let outbox = self.outbox(&ctx.peer);
        let key = (index, original);
        let uri = exposed.clone();
        let task = tokio::spawn(async move {
            let _watching = guard;
            loop {
                match updates.recv().await {
                    Ok(update) if update == key => {
                        outbox
                            .push(ServerNotification::ResourceUpdatedNotification(
                                ResourceUpdatedNotification::new(
                                    ResourceUpdatedNotificationParam::new(uri.clone()),
                                ),
                            ))
                            .await;
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        if let Ok(mut w) = self.state.watches.lock()
            && let Some(old) = w.insert(exposed, task.abort_handle())
        {
            old.abort();
        }
        Ok(())
    }

    /// Sends `kind`'s list-changed notification on a listen stream, if the
    /// stream asked for it.
    async fn announce(
        sink: &SubscriptionSink,
        accepted: &SubscriptionFilter,
        kind: ListKind,
    ) -> Result<(), SubscriptionSendError> {
        match kind {
            ListKind::Tools if accepted.tools_list_changed == Some(true) => {
                sink.notify_tool_list_changed().await
            }
            ListKind::Prompts if accepted.prompts_list_changed == Some(true) => {
                sink.notify_prompt_list_changed().await
            }
            ListKind::Resources if accepted.resources_list_changed == Some(true) => {
                sink.notify_resource_list_changed().await
            }
            _ => Ok(()),
        }
    }
}

/// An `InputRequiredResult` asking for `request` under `key`.
fn input_required(key: String, request: InputRequest, token: String) -> ServerResult {
    let mut requests = InputRequests::new();
    requests.insert(key, request);
    ServerResult::InputRequiredResult(InputRequiredResult::new(Some(requests), Some(token)))
}

impl ServerHandler for GatewayHandler {
    fn get_info(&self) -> ServerInfo {
        let capabilities = ServerCapabilities::builder()
            .enable_tools()
            .enable_tool_list_changed()
            .enable_prompts()
            .enable_prompts_list_changed()
            .enable_resources()
            .enable_resources_subscribe()
            .enable_resources_list_changed()
            .enable_logging()
            .enable_completions()
            .build();
        InitializeResult::new(capabilities)
            .with_server_info(Implementation::new("meshgate", env!("CARGO_PKG_VERSION")))
            .with_protocol_version(ProtocolVersion::V_2025_11_25)
            // No upstream names here: this text goes to every tenant.
            .with_instructions(if self.gw.namer().prefixed {
                format!(
                    "meshgate MCP gateway: tools, prompts and resources of several upstream MCP servers, named <upstream>{}<name> and <upstream>+<uri>; call {STATUS_TOOL} for the upstreams you can use and their health",
                    self.gw.namer().separator
                )
            } else {
                format!(
                    "meshgate MCP gateway: tools, prompts and resources of upstream MCP servers under their own names; call {STATUS_TOOL} for the upstreams you can use and their health"
                )
            })
    }

    fn supported_protocol_versions(&self) -> Cow<'static, [ProtocolVersion]> {
        Cow::Borrowed(&SUPPORTED_VERSIONS)
    }

    /// Every notification type a listen stream asks for is offered (rmcp
    /// keeps what the capabilities advertise).
    fn accepted_subscription_filter(
        &self,
        requested: &SubscriptionFilter,
    ) -> Option<SubscriptionFilter> {
        Some(requested.clone())
    }

    /// A 2026-07-28 client's `subscriptions/listen` stream: the gateway's
    /// catalog changes (from every upstream, whatever its revision) and
    /// updates of the resources it names, until the client closes it or the
    /// gateway shuts down (then with the final result).
    async fn listen(&self, sub: SubscriptionContext) -> Result<(), McpError> {
        let ctx = sub.request_context();
        let p = self.caller(ctx, scope::MCP_READ, "subscriptions/listen")?;
        let accepted = sub.accepted().clone();
        let sink = sub.sink().clone();
        let mut changes = self.gw.subscribe_changes();
        let mut updates = self.gw.watches.updates.subscribe();
        let mut watched = std::collections::HashMap::new();
        let mut guards = Vec::new();
        for uri in accepted.resource_subscriptions.iter().flatten() {
            let watch = match self.route_visible_uri(uri, &p) {
                Ok((idx, original)) => self
                    .gw
                    .watch_resource(idx, original.clone())
                    .await
                    .map(|g| (g, (idx, original))),
                Err(e) => Err(e.message.to_string()),
            };
            match watch {
                Ok((guard, key)) => {
                    guards.push(guard);
                    watched.insert(key, uri.clone());
                }
                Err(e) => {
                    tracing::info!(uri = %uri, error = %e, "a listen stream's resource is not watched")
                }
            }
        }
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            use tokio::sync::broadcast::error::RecvError;
            let sent = tokio::select! {
                _ = sub.cancelled() => return Ok(()),
                _ = self.gw.shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => {
                    // Draining: end gracefully rather than hold the drain up.
                    if self.gw.inflight.is_draining() {
                        return Ok(());
                    }
                    continue;
                }
                change = changes.recv() => match change {
                    Ok(kind) => Self::announce(&sink, &accepted, kind).await,
                    Err(RecvError::Lagged(_)) => {
                        let mut r = Ok(());
                        for kind in [ListKind::Tools, ListKind::Prompts, ListKind::Resources] {
                            r = r.and(Self::announce(&sink, &accepted, kind).await);
                        }
                        r
                    }
                    Err(RecvError::Closed) => return Ok(()),
                },
                update = updates.recv() => match update {
                    Ok(key) => match watched.get(&key) {
                        Some(uri) => sink.notify_resource_updated(uri.clone()).await,
                        None => Ok(()),
                    },
                    Err(RecvError::Lagged(_)) => Ok(()),
                    Err(RecvError::Closed) => return Ok(()),
                },
            };
            if let Err(SubscriptionSendError::SubscriptionClosed) = sent {
                return Ok(());
            }
        }
    }

    /// The definition of an exposed tool, from the catalog (rmcp checks a
    /// 2026-07-28 request's `Mcp-Param-*` headers against its input schema).
    /// Not cut to a tenant: it says nothing a call would not, and the call
    /// itself is still checked.
    fn get_tool(&self, name: &str) -> Option<rmcp::model::Tool> {
        let snap = self.gw.snapshot();
        if snap.tool_routes.resolve(name).is_some() {
            return snap.tools.iter().find(|t| t.name == name).cloned();
        }
        if name == STATUS_TOOL {
            return Some(status_tool());
        }
        if name == crate::tools_search::SEARCH_TOOL {
            return Some(crate::tools_search::definition());
        }
        if self.gw.mesh.get().is_some() && crate::mesh::tools::NAMES.contains(&name) {
            return crate::mesh::tools::definitions()
                .into_iter()
                .find(|t| t.name == name);
        }
        None
    }

    async fn initialize(
        &self,
        request: InitializeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<InitializeResult, McpError> {
        self.caller(&context, scope::MCP_READ, "initialize")?;
        self.register();
        if let Some(slot) = request_ext::<crate::clients::SessionSlot>(&context)
            && let Ok(mut slot) = slot.0.lock()
        {
            *slot = Some(self.state.entry.clone());
        }
        context.peer.set_peer_info(request.clone());
        let _ = self.state.client.set(request.clone());
        let _ = self.state.entry.client.set((
            request.protocol_version.clone(),
            request.client_info.name.clone(),
        ));
        if self.state.peer.set(context.peer.clone()).is_ok() {
            self.start_change_forwarding(context.peer.clone());
            if !self.state.counted.swap(true, Ordering::Relaxed) {
                metrics::gauge!("gateway_connections", "transport" => self.state.transport)
                    .increment(1.0);
                metrics::counter!("gateway_connections_total", "transport" => self.state.transport)
                    .increment(1);
            }
        }
        let started = Instant::now();
        let r = self.negotiate_initialize(&request);
        record("initialize", None, started, outcome(&r));
        r
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        let started = Instant::now();
        let p = self.caller(&ctx, scope::MCP_READ, "tools/list")?;
        let snap = self.gw.snapshot();
        let mut tools = Vec::with_capacity(snap.tools.len() + 1);
        if snap.tool_routes.resolve(STATUS_TOOL).is_none()
            && self.auth.policy.check(&p, STATUS_TOOL).is_ok()
        {
            tools.push(status_tool());
        }
        if self.gw.mesh.get().is_some() {
            tools.extend(crate::mesh::tools::definitions().into_iter().filter(|t| {
                snap.tool_routes.resolve(&t.name).is_none()
                    && p.has_scope(crate::mesh::tools::needed_scope(&t.name))
                    && self.auth.policy.check(&p, &t.name).is_ok()
            }));
        }
        tools.extend(
            snap.tools
                .iter()
                .zip(&snap.owners.tools)
                .filter(|(t, i)| self.tool_usable(**i, &t.name, &p))
                .map(|(t, _)| t.clone()),
        );
        let search = crate::tools_search::SEARCH_TOOL;
        let view = request_view(&self.gw, &ctx);
        // A view offers the search by the tools it admits, counted before
        // its `max_tools` cap: the search is how a client gets past the cap.
        let usable = match &view {
            Some(v) => tools
                .iter()
                .filter(|t| {
                    let upstream = tool_upstream(&self.gw, &snap, &t.name);
                    v.admits(&t.name, upstream.as_deref())
                })
                .count(),
            None => tools.len(),
        };
        let offer = crate::tools_search::offered(usable, self.gw.config.tools.search_threshold)
            && snap.tool_routes.resolve(search).is_none()
            && self.auth.policy.check(&p, search).is_ok();
        if let Some(view) = &view {
            tools = view.present(tools, |name| tool_upstream(&self.gw, &snap, name));
            if offer {
                // Shown beside the capped list, through the view's filter,
                // rename and description (as its calls are).
                let shown = view.present(vec![crate::tools_search::definition()], |_| None);
                tools.splice(0..0, shown);
            }
        } else if offer {
            tools.insert(0, crate::tools_search::definition());
        }
        let r = Ok(ListToolsResult::with_all_items(tools));
        record("tools/list", None, started, "ok");
        r
    }

    async fn call_tool(
        &self,
        mut request: CallToolRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let started = Instant::now();
        if let Some(view) = request_view(&self.gw, &ctx) {
            let snap = self.gw.snapshot();
            let exposed = view.exposed_name(&request.name).filter(|e| {
                match tool_upstream(&self.gw, &snap, e) {
                    Some(up) => view.admits(e, Some(&up)),
                    // Not in the catalog: a built-in, or a tool of an
                    // upstream still connecting, which a view limited to
                    // some upstreams cannot vouch for.
                    None => {
                        (view.config.upstreams.is_empty() || is_builtin_tool(e))
                            && view.admits(e, None)
                    }
                }
            });
            match exposed {
                Some(e) => request.name = e.into(),
                None => {
                    record("tools/call", None, started, "unknown_tool");
                    return Err(err(
                        ErrorCode::INVALID_PARAMS,
                        format!(
                            "unknown tool `{}`: virtual server `{}` has no such tool; call tools/list for its tools",
                            request.name, view.config.name
                        ),
                    ));
                }
            }
        }
        let exposed = request.name.to_string();
        // Hashed now, before the arguments move on to the upstream.
        let args_hash = meshgate_core::auth::arguments_hash(request.arguments.as_ref());
        let p = match self.caller(&ctx, scope::MCP_CALL, "tools/call") {
            Ok(p) => p,
            Err(e) => {
                if let Some(p) = request_principal(&ctx).or_else(|| self.bound.clone()) {
                    self.audit_call(
                        &p,
                        &ctx,
                        &exposed,
                        &args_hash,
                        started,
                        "denied",
                        Some(&e.message),
                    )
                    .await;
                }
                return Err(e);
            }
        };
        let r = self.call_tool_as(&p, request, &ctx, started).await;
        let (outcome, message) = match &r {
            Ok(CallToolResponse::Complete(res)) if res.is_error == Some(true) => {
                ("tool_error", None)
            }
            Ok(_) => ("ok", None),
            Err(e) if e.code == FORBIDDEN => ("denied", Some(e.message.to_string())),
            // An arguments refusal quotes argument values for the client;
            // the audit log, which keeps only their hash, gets a summary.
            Err(e) => ("error", Some(crate::validate::audit_message(e))),
        };
        self.audit_call(
            &p,
            &ctx,
            &exposed,
            &args_hash,
            started,
            outcome,
            message.as_deref(),
        )
        .await;
        r
    }

    async fn list_prompts(
        &self,
        _request: Option<PaginatedRequestParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, McpError> {
        let p = self.caller(&ctx, scope::MCP_READ, "prompts/list")?;
        let snap = self.gw.snapshot();
        Ok(ListPromptsResult::with_all_items(
            snap.prompts
                .iter()
                .zip(&snap.owners.prompts)
                .filter(|(_, i)| self.visible(**i, &p))
                .map(|(x, _)| x.clone())
                .collect(),
        ))
    }

    async fn get_prompt(
        &self,
        mut request: GetPromptRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<GetPromptResponse, McpError> {
        let started = Instant::now();
        let p = self.caller(&ctx, scope::MCP_READ, "prompts/get")?;
        let route = self
            .gw
            .snapshot()
            .prompt_routes
            .resolve(&request.name)
            .filter(|r| self.visible(r.upstream, &p))
            .cloned()
            .ok_or_else(|| {
                err(
                    ErrorCode::INVALID_PARAMS,
                    format!(
                        "unknown prompt `{}`: no upstream provides it; call prompts/list",
                        request.name
                    ),
                )
            })?;
        let exposed = std::mem::replace(&mut request.name, route.original);
        let r = match self
            .forward_call(
                &p,
                route.upstream,
                ClientRequest::GetPromptRequest(GetPromptRequest::new(request)),
                &ctx,
                None,
                CallSubject {
                    method: "prompts/get",
                    name: &exposed,
                },
            )
            .await
        {
            Ok(ServerResult::GetPromptResult(res)) => Ok(GetPromptResponse::Complete(res)),
            Ok(ServerResult::InputRequiredResult(res)) => Ok(GetPromptResponse::InputRequired(res)),
            Ok(_) => Err(err(
                ErrorCode::INTERNAL_ERROR,
                "upstream answered prompts/get with an unexpected result type".into(),
            )),
            Err(e) => Err(e),
        };
        record("prompts/get", None, started, outcome(&r));
        r
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, McpError> {
        let p = self.caller(&ctx, scope::MCP_READ, "resources/list")?;
        let snap = self.gw.snapshot();
        Ok(ListResourcesResult::with_all_items(
            snap.resources
                .iter()
                .zip(&snap.owners.resources)
                .filter(|(_, i)| self.visible(**i, &p))
                .map(|(x, _)| x.clone())
                .collect(),
        ))
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, McpError> {
        let p = self.caller(&ctx, scope::MCP_READ, "resources/templates/list")?;
        let snap = self.gw.snapshot();
        Ok(ListResourceTemplatesResult::with_all_items(
            snap.templates
                .iter()
                .zip(&snap.owners.templates)
                .filter(|(_, i)| self.visible(**i, &p))
                .map(|(x, _)| x.clone())
                .collect(),
        ))
    }

    async fn read_resource(
        &self,
        mut request: ReadResourceRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, McpError> {
        let started = Instant::now();
        let p = self.caller(&ctx, scope::MCP_READ, "resources/read")?;
        let (idx, original) = self.route_visible_uri(&request.uri, &p)?;
        let name = self.upstream(idx)?.config.name.clone();
        let exposed = std::mem::replace(&mut request.uri, original);
        let r = match self
            .forward_call(
                &p,
                idx,
                ClientRequest::ReadResourceRequest(ReadResourceRequest::new(request)),
                &ctx,
                None,
                CallSubject {
                    method: "resources/read",
                    name: &exposed,
                },
            )
            .await
        {
            Ok(ServerResult::ReadResourceResult(mut res)) => {
                for c in res.contents.iter_mut() {
                    match c {
                        ResourceContents::TextResourceContents { uri, .. }
                        | ResourceContents::BlobResourceContents { uri, .. } => {
                            *uri = self.gw.namer().uri(&name, uri);
                        }
                        #[allow(unreachable_patterns)]
                        _ => {}
                    }
                }
                Ok(ReadResourceResponse::Complete(res))
            }
            Ok(ServerResult::InputRequiredResult(res)) => {
                Ok(ReadResourceResponse::InputRequired(res))
            }
            Ok(_) => Err(err(
                ErrorCode::INTERNAL_ERROR,
                "upstream answered resources/read with an unexpected result type".into(),
            )),
            Err(e) => Err(e),
        };
        record("resources/read", None, started, outcome(&r));
        r
    }

    async fn subscribe(
        &self,
        mut request: SubscribeRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        let uri = std::mem::take(&mut request.uri);
        let p = self.caller(&ctx, scope::MCP_READ, "resources/subscribe")?;
        let (idx, original) = self.route_visible_uri(&uri, &p)?;
        if self.upstream(idx)?.era.is_modern() {
            return self.watch_for_session(idx, original, uri, &ctx).await;
        }
        self.forward_for_uri("resources/subscribe", &uri, &ctx, |original| {
            request.uri = original;
            ClientRequest::SubscribeRequest(SubscribeRequest::new(request))
        })
        .await
    }

    async fn unsubscribe(
        &self,
        mut request: UnsubscribeRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        let uri = std::mem::take(&mut request.uri);
        let watching = self
            .state
            .watches
            .lock()
            .ok()
            .and_then(|mut w| w.remove(&uri));
        if let Some(task) = watching {
            self.caller(&ctx, scope::MCP_READ, "resources/unsubscribe")?;
            task.abort();
            return Ok(());
        }
        self.forward_for_uri("resources/unsubscribe", &uri, &ctx, |original| {
            request.uri = original;
            ClientRequest::UnsubscribeRequest(UnsubscribeRequest::new(request))
        })
        .await
    }

    async fn complete(
        &self,
        mut request: CompleteRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CompleteResult, McpError> {
        let caller = self.caller(&ctx, scope::MCP_READ, "completion/complete")?;
        let idx = match &mut request.r#ref {
            Reference::Prompt(p) => {
                let route = self
                    .gw
                    .snapshot()
                    .prompt_routes
                    .resolve(&p.name)
                    .filter(|r| self.visible(r.upstream, &caller))
                    .cloned()
                    .ok_or_else(|| {
                        err(
                            ErrorCode::INVALID_PARAMS,
                            format!(
                                "unknown prompt `{}` in completion reference; call prompts/list",
                                p.name
                            ),
                        )
                    })?;
                p.name = route.original;
                route.upstream
            }
            Reference::Resource(r) => {
                let (idx, original) = self.route_visible_uri(&r.uri, &caller)?;
                r.uri = original;
                idx
            }
            _ => {
                return Err(err(
                    ErrorCode::INVALID_PARAMS,
                    "unsupported completion reference type; use ref/prompt or ref/resource".into(),
                ));
            }
        };
        match self
            .forward(
                idx,
                ClientRequest::CompleteRequest(CompleteRequest::new(request)),
                &ctx,
                None,
            )
            .await?
        {
            ServerResult::CompleteResult(res) => Ok(res),
            _ => Err(err(
                ErrorCode::INTERNAL_ERROR,
                "upstream answered completion/complete with an unexpected result type".into(),
            )),
        }
    }

    async fn set_level(
        &self,
        request: SetLevelRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        if is_modern(&ctx) {
            return Err(err(
                ErrorCode::METHOD_NOT_FOUND,
                "logging/setLevel is not part of 2026-07-28: put io.modelcontextprotocol/logLevel into each request's _meta instead".into(),
            ));
        }
        self.caller(&ctx, scope::MCP_READ, "logging/setLevel")?;
        if let Ok(mut l) = self.state.log_level.lock() {
            *l = Some(request.level);
        }
        let conns: Vec<Arc<SessionConn>> = self
            .state
            .entry
            .conns
            .lock()
            .await
            .values()
            .cloned()
            .collect();
        for c in conns {
            // A 2026-07-28 upstream has no logging/setLevel: the level goes
            // with each request instead (see `attempt`).
            if c.conn
                .peer_info()
                .is_some_and(|i| i.capabilities.logging.is_some())
                && !is_modern_connection(c.conn.peer())
            {
                let _ = c
                    .conn
                    .peer()
                    .send_request(ClientRequest::SetLevelRequest(SetLevelRequest::new(
                        SetLevelRequestParams::new(request.level),
                    )))
                    .await;
            }
        }
        Ok(())
    }

    async fn on_custom_request(
        &self,
        request: CustomRequest,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<CustomResult, McpError> {
        metrics::counter!("gateway_errors_total", "type" => "method_not_found").increment(1);
        Err(err(
            ErrorCode::METHOD_NOT_FOUND,
            format!(
                "method `{}` is not part of MCP as served by meshgate; see the protocol revisions listed in docs/protocol.md",
                request.method
            ),
        ))
    }

    async fn on_initialized(&self, context: NotificationContext<RoleServer>) {
        self.bind_session_id(&context.extensions);
        self.state.entry.touch();
    }

    async fn ping(&self, context: RequestContext<RoleServer>) -> Result<(), McpError> {
        self.bind_session_id(&context.extensions);
        self.state.entry.touch();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshgate_core::auth::{CredentialKind, Role};

    fn principal(tenant: &str, subject: &str) -> Principal {
        Principal {
            subject: subject.into(),
            tenant: tenant.into(),
            role: Role::Developer,
            scopes: Vec::new(),
            key_id: None,
            kind: CredentialKind::ApiKey,
            rate_limit_per_minute: None,
        }
    }

    fn parked() -> Parked {
        let (_asks_tx, asks) = tokio::sync::mpsc::channel(1);
        let (_done_tx, done) = tokio::sync::oneshot::channel();
        let (pending, _answer) = tokio::sync::oneshot::channel();
        Parked {
            expires: Instant::now() + PARK_TTL,
            key: "roots".into(),
            request: InputRequest::ListRoots(Default::default()),
            pending,
            run: RunningCall {
                done,
                asks,
                _cancel: tokio_util::sync::CancellationToken::new().drop_guard(),
            },
        }
    }

    const CALL: CallSubject<'static> = CallSubject {
        method: "tools/call",
        name: "fx__elicit",
    };

    #[test]
    fn request_state_macs_keep_field_boundaries() {
        let key = [7u8; 32];
        let a = hmac_sha256(&key, &[b"acme", b"auth0|x"]);
        let b = hmac_sha256(&key, &[b"acme|auth0", b"x"]);
        assert_ne!(a, b, "moving a separator between fields changes the tag");
        assert_eq!(a, hmac_sha256(&key, &[b"acme", b"auth0|x"]));
        assert_ne!(a, hmac_sha256(&[8u8; 32], &[b"acme", b"auth0|x"]));
    }

    #[test]
    fn request_state_resumes_once_and_only_for_its_principal_and_call() {
        let calls = ParkedCalls::new().expect("random key");
        let ann = principal("t1", "ann");
        let state = calls
            .park(parked(), &ann, CALL)
            .map_err(|_| ())
            .expect("parked");
        assert!(ParkedCalls::is_ours(&state));

        let refused = |p: &Principal, subject: CallSubject<'_>, state: &str| {
            calls.resume(state, p, subject).err().map(|e| e.code)
        };
        let other_call = CallSubject {
            method: "tools/call",
            name: "fx__sample",
        };
        assert_eq!(
            refused(&principal("t1", "bob"), CALL, &state),
            Some(ErrorCode::INVALID_PARAMS)
        );
        assert_eq!(
            refused(&principal("t2", "ann"), CALL, &state),
            Some(ErrorCode::INVALID_PARAMS)
        );
        assert_eq!(
            refused(&ann, other_call, &state),
            Some(ErrorCode::INVALID_PARAMS)
        );
        let mut tampered = state.clone();
        tampered.insert(STATE_PREFIX.len(), '0');
        assert_eq!(
            refused(&ann, CALL, &tampered),
            Some(ErrorCode::INVALID_PARAMS)
        );
        assert_eq!(
            refused(&ann, CALL, "mgp1.garbage"),
            Some(ErrorCode::INVALID_PARAMS)
        );
        assert_eq!(calls.len(), 1, "refused retries leave the call waiting");

        assert!(calls.resume(&state, &ann, CALL).is_ok());
        assert_eq!(
            refused(&ann, CALL, &state),
            Some(ErrorCode::INVALID_PARAMS),
            "used once"
        );
        assert!(calls.is_empty());
    }

    #[test]
    fn draining_drops_every_parked_call() {
        let calls = ParkedCalls::new().expect("random key");
        let ann = principal("t1", "ann");
        for _ in 0..3 {
            calls
                .park(parked(), &ann, CALL)
                .map_err(|_| ())
                .expect("parked");
        }
        assert_eq!(calls.prune(false), 0, "none expired");
        assert_eq!(calls.prune(true), 3);
        assert!(calls.is_empty());
    }

    #[test]
    fn forwarded_meta_keeps_trace_context_and_drops_protocol_keys() {
        let meta: RequestMetaObject = serde_json::from_value(serde_json::json!({
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/logLevel": "info",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "progressToken": 7,
        }))
        .expect("meta");
        let out = serde_json::to_value(upstream_meta(&meta)).expect("serializes");
        assert_eq!(
            out,
            serde_json::json!({
                "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                "progressToken": 7,
            })
        );
    }
}
