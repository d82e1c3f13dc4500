//! The MCP server side of the gateway: one [`GatewayHandler`] per client
//! session answers lists from the merged catalog and forwards calls, reads,
//! prompt gets, completions and subscriptions to the owning upstream, relaying
//! progress and cancellation both ways.

// Logging and subscriptions are deprecated in MCP 2026-07-28 but are part of
// every session-based revision this gateway serves.
#![allow(deprecated)]

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rmcp::model::{
    CallToolRequest, CallToolRequestParams, CallToolResponse, CancelledNotificationParam,
    ClientInfo, ClientRequest, CompleteRequest, CompleteRequestParams, CompleteResult,
    CustomRequest, CustomResult, ErrorCode, GetPromptRequest, GetPromptRequestParams,
    GetPromptResponse, Implementation, InitializeRequestParams, InitializeResult,
    ListPromptsResult, ListResourceTemplatesResult, ListResourcesResult, ListToolsResult,
    LoggingLevel, PaginatedRequestParams, ProtocolVersion, ReadResourceRequest,
    ReadResourceRequestParams, ReadResourceResponse, Reference, ResourceContents,
    ServerCapabilities, ServerInfo, ServerResult, SetLevelRequest, SetLevelRequestParams,
    SubscribeRequest, SubscribeRequestParams, UnsubscribeRequest, UnsubscribeRequestParams,
};
use rmcp::service::{NotificationContext, Peer, PeerRequestOptions, RequestContext};
use rmcp::{ErrorData as McpError, RoleClient, RoleServer, ServerHandler, ServiceError};

use meshgate_core::auth::{Principal, scope};

use crate::auth::{Auth, RequestPrincipal, TraceId};
use crate::clients::{ClientEntry, Owner, SessionConn};
use crate::gateway::{Gateway, Upstream};
use crate::outbox::Outbox;
use crate::resilience::{PoolTimeout, unit_random};
use crate::upstream::{InFlightGuard, ListKind, ProgressMap, RelayTarget, UpstreamRelay, connect};

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

/// Revisions served over sessions (2026-07-28 is not yet served).
pub const SUPPORTED_VERSIONS: [ProtocolVersion; 4] = [
    ProtocolVersion::V_2024_11_05,
    ProtocolVersion::V_2025_03_26,
    ProtocolVersion::V_2025_06_18,
    ProtocolVersion::V_2025_11_25,
];

struct SessionState {
    peer: OnceLock<Peer<RoleServer>>,
    client: OnceLock<ClientInfo>,
    entry: Arc<ClientEntry>,
    gw: Arc<Gateway>,
    log_level: Mutex<Option<LoggingLevel>>,
    change_task: Mutex<Option<tokio::task::AbortHandle>>,
    transport: &'static str,
    counted: std::sync::atomic::AtomicBool,
}

impl Drop for SessionState {
    fn drop(&mut self) {
        self.gw.clients.unregister(&self.entry.id);
        if let Some(o) = self.entry.outbox.get() {
            o.close();
        }
        if let Ok(mut t) = self.change_task.lock()
            && let Some(t) = t.take()
        {
            t.abort();
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
    /// A handler for a new session over `transport` (`streamable_http`, `sse`).
    pub fn new(gw: Arc<Gateway>, auth: Arc<Auth>, transport: &'static str) -> GatewayHandler {
        let entry = Arc::new(ClientEntry::new(transport));
        gw.clients.register(&entry);
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
            }),
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

    fn upstream(&self, index: usize) -> Result<&Arc<Upstream>, McpError> {
        self.gw.upstreams.get(index).ok_or_else(|| {
            err(
                ErrorCode::INTERNAL_ERROR,
                format!("internal: no upstream #{index}"),
            )
        })
    }

    /// The connection to use for a call to `up`: this session's own connection
    /// for Streamable HTTP upstreams, the shared one for stdio upstreams.
    /// `Err` says why there is none (a transport failure, retried).
    async fn connection(
        &self,
        up: &Arc<Upstream>,
        client_peer: &Peer<RoleServer>,
    ) -> Result<(Peer<RoleClient>, ProgressMap, Option<InFlightGuard>), String> {
        let client = self.outbox(client_peer);
        if !up.per_session() {
            let shared = up
                .pick_process()
                .await
                .ok_or_else(|| format!("{} (no live connection)", up.status().0.label()))?;
            let guard = shared.inflight.enter(self.session, client);
            return Ok((
                shared.conn.peer().clone(),
                shared.progress.clone(),
                Some(guard),
            ));
        }
        let mut conns = self.state.entry.conns.lock().await;
        if let Some(c) = conns.get(&up.index) {
            if !c.conn.is_transport_closed() {
                c.touch();
                return Ok((c.conn.peer().clone(), c.progress.clone(), None));
            }
            conns.remove(&up.index);
        }
        let (relay, progress) = UpstreamRelay::new(
            up.index,
            &up.config.name,
            self.gw.namer.clone(),
            RelayTarget::Session(client),
            self.state.client.get(),
            self.gw.change_events(),
        );
        let conn = connect(&up.config, relay, &self.gw.http)
            .await
            .map_err(|e| {
                self.gw.report_failure(up, &e.to_string());
                e.to_string()
            })?;
        let level = self.state.log_level.lock().ok().and_then(|l| *l);
        if let Some(level) = level
            && conn
                .peer_info()
                .is_some_and(|i| i.capabilities.logging.is_some())
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
        let up = self.upstream(index)?.clone();
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
            let outcome = self.attempt(&up, req, ctx, this_timeout).await;
            drop(lease);
            let failure = match outcome {
                Ok(r) => {
                    up.traffic.on_success();
                    self.gw.report_success(&up);
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
    ) -> Result<ServerResult, AttemptError> {
        // Connecting (a per-session connection's handshake) counts against
        // the attempt's time, so a hanging upstream cannot outlast the deadline.
        let connecting = tokio::time::timeout(timeout, self.connection(up, &ctx.peer));
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
        let mut options = PeerRequestOptions::no_options();
        options.timeout = Some(timeout);
        options.meta = Some(ctx.meta.clone());
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
        match result {
            Ok(r) => Ok(r),
            Err(ServiceError::McpError(e)) => Err(AttemptError::Answered(e)),
            Err(ServiceError::Timeout { timeout }) => Err(AttemptError::Timeout(timeout)),
            Err(e) => {
                metrics::counter!("gateway_errors_total", "type" => "upstream_transport")
                    .increment(1);
                self.gw.report_failure(up, &e.to_string());
                Err(AttemptError::Transport {
                    message: format!("failed while answering: {e}"),
                    started: seen.load(Ordering::Acquire),
                })
            }
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
        if gw.namer.prefixed {
            return match gw.namer.split_uri(uri, |n| gw.upstream_named(n).is_some()) {
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
        let enabled: Vec<&Arc<Upstream>> =
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

    /// When `exposed` carries the prefix of an upstream that has not been
    /// listed because it is down, the error that says so (instead of
    /// "unknown tool").
    fn unlisted_because_down(&self, exposed: &str, p: &Principal) -> Option<McpError> {
        if !self.gw.namer.prefixed {
            return None;
        }
        let sep = &self.gw.namer.separator;
        let up = self.gw.upstreams.iter().find(|u| {
            exposed
                .strip_prefix(u.config.name.as_str())
                .is_some_and(|rest| rest.starts_with(sep.as_str()))
                && self.visible(u.index, p)
        })?;
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
        let snap = self.gw.snapshot();
        let route = snap
            .tool_routes
            .resolve(&exposed)
            .filter(|r| self.visible(r.upstream, p))
            .cloned();
        drop(snap);
        let Some(route) = route else {
            if exposed == STATUS_TOOL {
                self.check_tool_rules(p, STATUS_TOOL)?;
                record("tools/call", Some(STATUS_TOOL), started, "ok");
                return Ok(CallToolResponse::Complete(
                    rmcp::model::CallToolResult::structured(self.status_report(p)),
                ));
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
        if let Err(hit) = self
            .gw
            .limits
            .check(&self.gw.limits.call_checks(&exposed, &self.state.entry.id))
        {
            record("tools/call", Some(&exposed), started, "rate_limited");
            self.state.entry.record(false);
            return Err(hit.mcp_error());
        }
        let original = route.original.clone();
        request.name = route.original.into();
        let r = self
            .forward(
                route.upstream,
                ClientRequest::CallToolRequest(CallToolRequest::new(request)),
                ctx,
                Some(&original),
            )
            .await;
        let r = match r {
            Ok(ServerResult::CallToolResult(res)) => {
                let o = if res.is_error == Some(true) {
                    "tool_error"
                } else {
                    "ok"
                };
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
            .with_instructions(if self.gw.namer.prefixed {
                format!(
                    "meshgate MCP gateway: tools, prompts and resources of several upstream MCP servers, named <upstream>{}<name> and <upstream>+<uri>; call {STATUS_TOOL} for the upstreams you can use and their health",
                    self.gw.namer.separator
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

    async fn initialize(
        &self,
        request: InitializeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<InitializeResult, McpError> {
        self.caller(&context, scope::MCP_READ, "initialize")?;
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
        let r = Ok(ListToolsResult::with_all_items(tools));
        record("tools/list", None, started, "ok");
        r
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let started = Instant::now();
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
            Err(e) => ("error", Some(e.message.to_string())),
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
        request.name = route.original;
        let r = match self
            .forward(
                route.upstream,
                ClientRequest::GetPromptRequest(GetPromptRequest::new(request)),
                &ctx,
                None,
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
        request.uri = original;
        let r = match self
            .forward(
                idx,
                ClientRequest::ReadResourceRequest(ReadResourceRequest::new(request)),
                &ctx,
                None,
            )
            .await
        {
            Ok(ServerResult::ReadResourceResult(mut res)) => {
                for c in res.contents.iter_mut() {
                    match c {
                        ResourceContents::TextResourceContents { uri, .. }
                        | ResourceContents::BlobResourceContents { uri, .. } => {
                            *uri = self.gw.namer.uri(&name, uri);
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
            if c.conn
                .peer_info()
                .is_some_and(|i| i.capabilities.logging.is_some())
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
