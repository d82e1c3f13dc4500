//! Connections to upstream MCP servers and the relay that carries what an
//! upstream sends on its own (progress, logs, sampling, elicitation, roots,
//! list changes, resource updates) back to the right client session.
//!
//! Each upstream has one *shared* connection, used for its catalog (tool,
//! prompt and resource lists), health checks and, for stdio upstreams and
//! every request of a 2026-07-28 client, for calls. Streamable HTTP and
//! HTTP+SSE upstreams get one connection *per client session*, so that
//! everything the upstream relays belongs to exactly one client.
//!
//! Every connection is opened in the newest revision both sides speak:
//! `server/discover` offering 2026-07-28 first, `initialize` when the
//! upstream is older ([`connect`], [`Era`]); HTTP+SSE upstreams (a
//! 2024-11-05 transport) get `initialize` at once. What an older upstream asks of a
//! 2026-07-28 caller (sampling, elicitation, roots) is handed to that call as
//! an [`InputAsk`] instead of being sent to the client.

// Sampling, roots and logging are deprecated in MCP 2026-07-28 but are part of
// every session-based revision this gateway relays.
#![allow(deprecated)]

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use meshgate_core::{UpstreamConfig, UpstreamTransport};
use rmcp::model::{
    ClientCapabilities, ClientInfo, CreateMessageRequest, CreateMessageRequestParams,
    CreateMessageResult, ElicitRequest, ElicitRequestParams, ElicitResult, ErrorCode,
    Implementation, InputRequest, ListRootsRequest, ListRootsResult, LoggingLevel,
    LoggingMessageNotificationParam, ProgressNotificationParam, ProgressToken, ProtocolVersion,
    ResourceUpdatedNotificationParam,
};
use rmcp::model::{LoggingMessageNotification, ResourceUpdatedNotification, ServerNotification};
use rmcp::service::{
    ClientInitializeError, serve_client_with_lifecycle, serve_client_with_lifecycle_and_ct,
};
use rmcp::service::{NotificationContext, RequestContext, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{ClientHandler, ClientLifecycleMode, ErrorData as McpError, RoleClient};
use tokio::io::AsyncBufReadExt;
use tokio::sync::{mpsc, oneshot};

use crate::outbox::Outbox;

/// A live connection to an upstream.
pub type UpstreamConnection = RunningService<RoleClient, UpstreamRelay>;

/// Which kind of list an upstream says has changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListKind {
    /// tools/list
    Tools,
    /// prompts/list
    Prompts,
    /// resources/list and resources/templates/list
    Resources,
}

/// Something an upstream connection reports to the gateway.
#[derive(Debug, Clone, Copy)]
pub struct ListChanged {
    /// Index of the upstream.
    pub upstream: usize,
    /// Which list.
    pub kind: ListKind,
}

/// Health of an upstream as the gateway sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamStatus {
    /// Not yet tried, or reconnecting.
    Connecting,
    /// Connected and answering.
    Up,
    /// Failing; the reason says why.
    Down(String),
    /// Disabled in the configuration.
    Disabled,
}

impl UpstreamStatus {
    /// Short label for health output and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            UpstreamStatus::Connecting => "connecting",
            UpstreamStatus::Up => "up",
            UpstreamStatus::Down(_) => "down",
            UpstreamStatus::Disabled => "disabled",
        }
    }

    /// Why it is down, if it is.
    pub fn detail(&self) -> Option<&str> {
        match self {
            UpstreamStatus::Down(why) => Some(why),
            _ => None,
        }
    }
}

/// Where a relay sends what the upstream initiates.
#[derive(Clone)]
pub enum RelayTarget {
    /// The shared connection: only progress of known calls is relayed exactly;
    /// other requests go to the one session with calls in flight, if there is one.
    Shared(Arc<InFlight>),
    /// A connection owned by one client session (its outbound queue).
    Session(Arc<Outbox>),
}

/// Who a call in flight on a shared connection belongs to: where what the
/// upstream initiates during it goes.
#[derive(Clone)]
pub struct Caller {
    /// The client session (for a 2026-07-28 request: the request itself).
    pub session: u64,
    /// Its outbound queue (progress, log messages).
    pub outbox: Arc<Outbox>,
    /// Set when the caller speaks 2026-07-28: it takes no server-to-client
    /// requests, so they are handed to the call instead (see [`InputAsk`]).
    pub modern: Option<Arc<ModernCaller>>,
}

/// What the gateway knows of a 2026-07-28 caller from its request's `_meta`.
pub struct ModernCaller {
    /// `io.modelcontextprotocol/logLevel`: log messages below it are not
    /// relayed, and none at all without it.
    pub log_level: Option<LoggingLevel>,
    /// Where an upstream's sampling, elicitation and roots requests during
    /// the call go: the call turns each into an `InputRequiredResult`.
    /// `None` for requests that cannot answer with one (2026-07-28 allows it
    /// on `tools/call`, `prompts/get` and `resources/read` only).
    pub asks: Option<mpsc::Sender<InputAsk>>,
}

/// A request an upstream sent during a call from a 2026-07-28 client, waiting
/// for the client's answer (which comes with the client's retry).
pub struct InputAsk {
    /// The upstream that asks.
    pub upstream: String,
    /// The request, as it goes into `inputRequests`.
    pub request: InputRequest,
    /// Takes the client's `inputResponses` entry, or why there is none.
    pub reply: oneshot::Sender<Result<serde_json::Value, McpError>>,
}

/// Calls in flight on a shared connection, by session.
#[derive(Default)]
pub struct InFlight {
    calls: Mutex<HashMap<u64, Caller>>,
    next: AtomicU64,
}

impl InFlight {
    /// Registers a call from `caller`; the guard unregisters it.
    pub fn enter(self: &Arc<Self>, caller: Caller) -> InFlightGuard {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut calls) = self.calls.lock() {
            calls.insert(key, caller);
        }
        InFlightGuard {
            owner: self.clone(),
            key,
        }
    }

    /// Calls in flight now.
    pub fn len(&self) -> usize {
        self.calls.lock().map(|c| c.len()).unwrap_or(0)
    }

    /// True when no call is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The single session with calls in flight, if exactly one has.
    fn sole_session(&self) -> Result<Caller, &'static str> {
        let calls = self.calls.lock().map_err(|_| "internal lock poisoned")?;
        let mut found: Option<&Caller> = None;
        for entry in calls.values() {
            match found {
                Some(f) if f.session != entry.session => {
                    return Err(
                        "several client sessions have calls in flight on this shared upstream connection",
                    );
                }
                _ => found = Some(entry),
            }
        }
        found
            .cloned()
            .ok_or("no client call is in flight on this upstream")
    }
}

/// Unregisters an in-flight call when dropped.
pub struct InFlightGuard {
    owner: Arc<InFlight>,
    key: u64,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if let Ok(mut calls) = self.owner.calls.lock() {
            calls.remove(&self.key);
        }
    }
}

/// The client side of an upstream connection: relays upstream-initiated
/// messages to the client session(s) it serves.
#[derive(Clone)]
pub struct UpstreamRelay {
    upstream: usize,
    name: String,
    namer: Arc<crate::gateway::NamerCell>,
    target: RelayTarget,
    info: ClientInfo,
    /// Upstream progress token (assigned by our client) → (client's token, client peer).
    progress: ProgressMap,
    changes: mpsc::Sender<ListChanged>,
    /// Where resource updates of a shared connection go (to the
    /// `subscriptions/listen` streams watching them), if anywhere.
    updates: Option<tokio::sync::broadcast::Sender<ResourceUpdate>>,
}

/// A `notifications/resources/updated` of an upstream: its index and the
/// resource's URI as the upstream names it.
pub type ResourceUpdate = (usize, String);

/// Where progress of one call goes: the client's token, its queue, and
/// whether any progress has arrived (the upstream has started answering).
type ProgressRoute = (ProgressToken, Arc<Outbox>, Arc<AtomicBool>);

/// Progress routing of one connection: upstream progress token (assigned by
/// our client) → the client's route.
#[derive(Default)]
pub struct ProgressRoutes {
    routes: Mutex<HashMap<ProgressToken, ProgressRoute>>,
    /// Write-held by a caller from sending its request until its route is
    /// registered, read-held by the relay while it looks a route up: a fast
    /// upstream's first progress notification can arrive before the route
    /// exists, and would otherwise be dropped.
    registering: tokio::sync::RwLock<()>,
}

impl ProgressRoutes {
    /// Blocks route lookups until the returned guard is dropped; take it
    /// before sending a request whose progress is to be routed.
    pub async fn registration(&self) -> tokio::sync::RwLockWriteGuard<'_, ()> {
        self.registering.write().await
    }

    /// Routes progress carrying `upstream` to `client_token` at `client`;
    /// `seen` turns true when the first progress arrives.
    pub fn insert(
        &self,
        upstream: ProgressToken,
        client_token: ProgressToken,
        client: Arc<Outbox>,
        seen: Arc<AtomicBool>,
    ) {
        if let Ok(mut m) = self.routes.lock() {
            m.insert(upstream, (client_token, client, seen));
        }
    }

    /// Forgets the route of `upstream`.
    pub fn remove(&self, upstream: &ProgressToken) {
        if let Ok(mut m) = self.routes.lock() {
            m.remove(upstream);
        }
    }

    async fn route(&self, upstream: &ProgressToken) -> Option<ProgressRoute> {
        let _registered = self.registering.read().await;
        self.routes
            .lock()
            .ok()
            .and_then(|m| m.get(upstream).cloned())
    }
}

/// Shared progress routing of a connection.
pub type ProgressMap = Arc<ProgressRoutes>;

impl UpstreamRelay {
    /// A relay for `upstream`. `client` is the downstream client's initialize
    /// parameters for per-session connections (its capabilities are mirrored
    /// upstream), `None` for the shared connection.
    pub fn new(
        upstream: usize,
        name: &str,
        namer: Arc<crate::gateway::NamerCell>,
        target: RelayTarget,
        client: Option<&ClientInfo>,
        changes: mpsc::Sender<ListChanged>,
    ) -> (UpstreamRelay, ProgressMap) {
        let mut capabilities = ClientCapabilities::default();
        let mut client_name = String::from("meshgate");
        match (client, &target) {
            (Some(c), _) => {
                capabilities = c.capabilities.clone();
                client_name = format!("meshgate (for {})", c.client_info.name);
            }
            (None, RelayTarget::Shared(_)) => {
                // The shared connection relays to whichever session is calling;
                // offer what a typical client offers so tools that need it work.
                capabilities.sampling = Some(Default::default());
                capabilities.elicitation = Some(Default::default());
                capabilities.roots = Some(Default::default());
            }
            _ => {}
        }
        let info = ClientInfo::new(
            capabilities,
            Implementation::new(client_name, env!("CARGO_PKG_VERSION")),
        );
        let progress: ProgressMap = Arc::default();
        (
            UpstreamRelay {
                upstream,
                name: name.to_owned(),
                namer,
                target,
                info,
                progress: progress.clone(),
                changes,
                updates: None,
            },
            progress,
        )
    }

    fn request_target(&self, what: &str) -> Result<Caller, McpError> {
        match &self.target {
            RelayTarget::Session(client) => Ok(Caller {
                session: 0,
                outbox: client.clone(),
                modern: None,
            }),
            RelayTarget::Shared(inflight) => inflight.sole_session().map_err(|why| {
                McpError::new(
                    ErrorCode::INTERNAL_ERROR,
                    format!(
                        "meshgate cannot relay {what} from upstream `{}`: {why}",
                        self.name
                    ),
                    None,
                )
            }),
        }
    }

    /// Publishes the resource updates this (shared) connection receives on
    /// `updates`.
    pub fn with_updates(mut self, updates: tokio::sync::broadcast::Sender<ResourceUpdate>) -> Self {
        self.updates = Some(updates);
        self
    }

    fn list_changed(&self, kind: ListKind) {
        // A full queue already holds a refresh request; dropping this one loses nothing.
        let _ = self.changes.try_send(ListChanged {
            upstream: self.upstream,
            kind,
        });
    }
}

impl UpstreamRelay {
    /// Hands a server-to-client request of the upstream to the 2026-07-28
    /// call it arrived during, and waits for the client's answer (which
    /// comes with the client's retry of that call).
    async fn ask_modern<T: serde::de::DeserializeOwned>(
        &self,
        caller: &ModernCaller,
        request: InputRequest,
        what: &str,
    ) -> Result<T, McpError> {
        let Some(asks) = &caller.asks else {
            return Err(McpError::new(
                ErrorCode::INVALID_REQUEST,
                format!(
                    "upstream `{}` sent {what} (a server-to-client request of revisions up to 2025-11-25) during a request of a 2026-07-28 client that cannot carry an InputRequiredResult; only tools/call, prompts/get and resources/read can",
                    self.name
                ),
                None,
            ));
        };
        let (reply, answer) = oneshot::channel();
        asks.send(InputAsk {
            upstream: self.name.clone(),
            request,
            reply,
        })
        .await
        .map_err(|_| relay_error(what, &self.name, "the client's call has ended"))?;
        let value = answer.await.map_err(|_| {
            relay_error(
                what,
                &self.name,
                "the 2026-07-28 client did not retry its call with an answer in time",
            )
        })??;
        serde_json::from_value(value).map_err(|e| {
            McpError::new(
                ErrorCode::INVALID_PARAMS,
                format!(
                    "the client's answer to {what} from upstream `{}` (its inputResponses entry) is not a valid result: {e}",
                    self.name
                ),
                None,
            )
        })
    }
}

/// Syslog order of a log level, lowest first.
pub fn severity(level: LoggingLevel) -> u8 {
    match level {
        LoggingLevel::Debug => 0,
        LoggingLevel::Info => 1,
        LoggingLevel::Notice => 2,
        LoggingLevel::Warning => 3,
        LoggingLevel::Error => 4,
        LoggingLevel::Critical => 5,
        LoggingLevel::Alert => 6,
        LoggingLevel::Emergency => 7,
    }
}

fn relay_error(what: &str, upstream: &str, e: impl std::fmt::Display) -> McpError {
    McpError::new(
        ErrorCode::INTERNAL_ERROR,
        format!("relaying {what} from upstream `{upstream}` to the client failed: {e}"),
        None,
    )
}

impl ClientHandler for UpstreamRelay {
    fn get_info(&self) -> ClientInfo {
        self.info.clone()
    }

    async fn create_message(
        &self,
        params: CreateMessageRequestParams,
        _context: RequestContext<RoleClient>,
    ) -> Result<CreateMessageResult, McpError> {
        const WHAT: &str = "sampling/createMessage";
        let caller = self.request_target(WHAT)?;
        if let Some(modern) = &caller.modern {
            let ask = InputRequest::CreateMessage(CreateMessageRequest::new(params));
            return self.ask_modern(modern, ask, WHAT).await;
        }
        caller
            .outbox
            .peer()
            .create_message(params)
            .await
            .map_err(|e| relay_error(WHAT, &self.name, e))
    }

    async fn create_elicitation(
        &self,
        params: ElicitRequestParams,
        _context: RequestContext<RoleClient>,
    ) -> Result<ElicitResult, McpError> {
        const WHAT: &str = "elicitation/create";
        let caller = self.request_target(WHAT)?;
        if let Some(modern) = &caller.modern {
            let ask = InputRequest::Elicitation(ElicitRequest::new(params));
            return self.ask_modern(modern, ask, WHAT).await;
        }
        caller
            .outbox
            .peer()
            .create_elicitation(params)
            .await
            .map_err(|e| relay_error(WHAT, &self.name, e))
    }

    async fn list_roots(
        &self,
        _context: RequestContext<RoleClient>,
    ) -> Result<ListRootsResult, McpError> {
        const WHAT: &str = "roots/list";
        let caller = self.request_target(WHAT)?;
        if let Some(modern) = &caller.modern {
            let ask = InputRequest::ListRoots(ListRootsRequest::default());
            return self.ask_modern(modern, ask, WHAT).await;
        }
        caller
            .outbox
            .peer()
            .list_roots()
            .await
            .map_err(|e| relay_error(WHAT, &self.name, e))
    }

    async fn on_progress(
        &self,
        mut params: ProgressNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        let route = self.progress.route(&params.progress_token).await;
        if let Some((client_token, client, seen)) = route {
            seen.store(true, Ordering::Release);
            params.progress_token = client_token;
            client.progress(params).await;
        }
    }

    async fn on_logging_message(
        &self,
        params: LoggingMessageNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        let log = |params| {
            ServerNotification::LoggingMessageNotification(LoggingMessageNotification::new(params))
        };
        match &self.target {
            RelayTarget::Session(client) => client.push(log(params)).await,
            RelayTarget::Shared(inflight) => match inflight.sole_session() {
                // A 2026-07-28 caller gets log messages only at or above the
                // level its request asked for, and none without one.
                Ok(caller)
                    if caller.modern.as_ref().is_some_and(|m| {
                        m.log_level
                            .is_none_or(|floor| severity(params.level) < severity(floor))
                    }) => {}
                Ok(caller) => caller.outbox.push(log(params)).await,
                Err(_) => {
                    tracing::info!(upstream = %self.name, level = ?params.level, data = %params.data, "upstream log message")
                }
            },
        }
    }

    async fn on_resource_updated(
        &self,
        mut params: ResourceUpdatedNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        if let Some(updates) = &self.updates {
            let _ = updates.send((self.upstream, params.uri.clone()));
        }
        if let RelayTarget::Session(client) = &self.target {
            params.uri = self.namer.get().uri(&self.name, &params.uri);
            client
                .push(ServerNotification::ResourceUpdatedNotification(
                    ResourceUpdatedNotification::new(params),
                ))
                .await;
        }
    }

    async fn on_resource_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.list_changed(ListKind::Resources);
    }

    async fn on_tool_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.list_changed(ListKind::Tools);
    }

    async fn on_prompt_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.list_changed(ListKind::Prompts);
    }
}

/// Why connecting to an upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The child process could not be started.
    #[error("cannot start `{command}`: {source}; check that the program exists and is executable")]
    Spawn {
        /// The program.
        command: String,
        /// OS error.
        source: std::io::Error,
    },
    /// The MCP handshake failed.
    #[error("initialize handshake failed: {0}")]
    Handshake(String),
    /// Nothing answered in time.
    #[error("no answer within {0:?} (connect_timeout_secs)")]
    Timeout(Duration),
    /// The HTTP+SSE transport could not be opened.
    #[error("{0}")]
    Sse(#[from] crate::upstream_sse::SseError),
    /// A secret reference in a header or environment value could not be
    /// resolved (the message names the reference, never a value).
    #[error(
        "upstream `{upstream}`: {field} `{key}`: {source}; set it where meshgate runs, or change the reference"
    )]
    Secret {
        /// The upstream.
        upstream: String,
        /// `header` or `env`.
        field: &'static str,
        /// The header or variable name.
        key: String,
        /// Which reference and why.
        source: meshgate_core::secrets::ResolveError,
    },
}

/// Which revision era an upstream was found to speak, remembered for its
/// reconnects (the specification asks clients to cache it per server).
#[derive(Default)]
pub struct Era(std::sync::atomic::AtomicU8, Mutex<Option<ProtocolVersion>>);

// 0 (the default): not yet known.
const ERA_MODERN: u8 = 1;
const ERA_LEGACY: u8 = 2;

impl Era {
    /// Whether the upstream is known to speak only the session-based revisions.
    fn is_legacy(&self) -> bool {
        self.0.load(Ordering::Relaxed) == ERA_LEGACY
    }

    /// Whether the upstream was last found to speak 2026-07-28.
    pub fn is_modern(&self) -> bool {
        self.0.load(Ordering::Relaxed) == ERA_MODERN
    }

    /// The revision of the upstream's last connection, once connected.
    pub fn revision(&self) -> Option<ProtocolVersion> {
        self.1.lock().ok().and_then(|v| v.clone())
    }

    fn learn(&self, conn: &UpstreamConnection) {
        let era = if is_modern_connection(conn.peer()) {
            ERA_MODERN
        } else {
            ERA_LEGACY
        };
        self.0.store(era, Ordering::Relaxed);
        if let Ok(mut v) = self.1.lock() {
            *v = conn.peer_info().map(|i| i.protocol_version.clone());
        }
    }
}

/// Whether a connection speaks 2026-07-28 or later (opened with
/// `server/discover`, every request self-contained) rather than a
/// session-based revision.
pub fn is_modern_connection(peer: &rmcp::Peer<RoleClient>) -> bool {
    peer.peer_info()
        .is_some_and(|i| !i.protocol_version.has_initialize())
}

/// Whether a failed `server/discover` opening means the upstream speaks only
/// session-based revisions (it answered with the versions it supports, none
/// of them 2026-07-28): then `initialize` follows on a new connection.
fn wants_initialize(e: &ClientInitializeError) -> bool {
    matches!(e, ClientInitializeError::NoCompatibleProtocolVersion { .. })
}

/// Opens a connection to `cfg` and completes the MCP handshake: the newest
/// revision both sides speak, 2026-07-28 (opened with `server/discover`)
/// when the upstream does, else `initialize` (at once when `era` says the
/// upstream is legacy, or after the probe). An upstream that answers the
/// probe with the versions it supports is connected again with
/// `initialize` (for stdio: a new process).
pub async fn connect(
    cfg: &UpstreamConfig,
    relay: UpstreamRelay,
    http: &crate::gateway::HttpClients,
    era: &Era,
) -> Result<UpstreamConnection, ConnectError> {
    connect_with(cfg, relay, http, era, None).await
}

/// [`connect`] for one client session's own connection: `authorization`
/// is the client's `Authorization` header, sent instead of a configured
/// one when the upstream has `forward_authorization` (the caller passes it
/// only then).
pub async fn connect_with(
    cfg: &UpstreamConfig,
    relay: UpstreamRelay,
    http: &crate::gateway::HttpClients,
    era: &Era,
    authorization: Option<&str>,
) -> Result<UpstreamConnection, ConnectError> {
    // The resolved configuration holds secrets: it is used for this
    // attempt only and never logged.
    let resolved = connection_config(cfg, authorization, &env_secret, &file_secret)?;
    let cfg: &UpstreamConfig = &resolved;
    let limit = Duration::from_secs(cfg.connect_timeout_secs);
    // One deadline for the whole attempt, also handed to the transport, so an
    // SSE upstream that never sends its `endpoint` event is reported as such.
    let deadline = deadline_after(limit);
    let fut = async {
        let probe = ClientLifecycleMode::Auto {
            preferred_versions: vec![ProtocolVersion::V_2026_07_28],
            legacy_version: None,
        };
        // 2024-11-05 HTTP+SSE servers predate `server/discover`.
        let first = if era.is_legacy() || cfg.transport == UpstreamTransport::Sse {
            ClientLifecycleMode::Initialize
        } else {
            probe
        };
        let retry = first != ClientLifecycleMode::Initialize;
        match handshake(cfg, relay.clone(), http, first, deadline).await {
            Err(Failure::Handshake(e)) if retry && wants_initialize(&e) => {
                tracing::debug!(upstream = %cfg.name, error = %e, "upstream speaks no 2026-07-28; connecting with initialize");
                handshake(cfg, relay, http, ClientLifecycleMode::Initialize, deadline).await
            }
            other => other,
        }
    };
    let conn = match tokio::time::timeout_at(deadline, fut).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(Failure::Connect(e))) => return Err(e),
        Ok(Err(Failure::Handshake(e))) => {
            return Err(ConnectError::Handshake(handshake_detail(&cfg.name, &e)));
        }
        Err(_) => return Err(ConnectError::Timeout(limit)),
    };
    era.learn(&conn);
    Ok(conn)
}

/// A failed handshake as the upstream's status says it (tenants read it).
/// rmcp's Streamable HTTP client quotes the body of an answer that is not
/// MCP ("unexpected server response: HTTP 404 Not Found: <body>"); quoting
/// it would let a tenant read any internal URL through the gateway, so the
/// body goes to the log and the status stays. A redirect (the upstream
/// clients follow none) is named as such.
fn handshake_detail(upstream: &str, e: &ClientInitializeError) -> String {
    let text = e.to_string();
    let Some(quoted) = unexpected_response(e) else {
        return match request_causes(e) {
            Some(causes) if !text.contains(&causes) => format!("{text} ({causes})"),
            _ => text,
        };
    };
    tracing::warn!(upstream, answer = %quoted, "the upstream answered the handshake with something that is not MCP");
    let status = quoted
        .strip_prefix("HTTP ")
        .and_then(|rest| rest.split_once(": "))
        .map(|(status, _)| status);
    let (kept, note) = match status {
        Some(status) if status.starts_with('3') => (
            format!("HTTP {status}"),
            "; the upstream answered a redirect, which meshgate does not follow (it would carry the upstream's headers along): configure the URL it points to directly (its answer is in the gateway's log)",
        ),
        Some(status) => (
            format!("HTTP {status}"),
            " (the answer's body is in the gateway's log)",
        ),
        None => (
            "an answer that is not MCP".to_owned(),
            " (it is in the gateway's log)",
        ),
    };
    format!("{}{note}", text.replace(quoted, &kept))
}

/// The text of rmcp's "unexpected server response" error (it quotes the
/// upstream's answer), if that is what `e` is or wraps.
fn unexpected_response(e: &ClientInitializeError) -> Option<&str> {
    use rmcp::transport::streamable_http_client::StreamableHttpError;
    // rmcp does not declare the transport error as the source: start there.
    let ClientInitializeError::TransportError { error, .. } = e else {
        return None;
    };
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error.error.as_ref());
    while let Some(err) = source {
        if let Some(StreamableHttpError::<reqwest::Error>::UnexpectedServerResponse(quoted)) =
            err.downcast_ref()
        {
            return Some(quoted);
        }
        source = err.source();
    }
    None
}

/// Why an HTTP request of the handshake failed, below reqwest's own "error
/// sending request": the causes it wraps (connection refused, a DNS failure,
/// an address refused by `public_addresses_only`), joined by `: `. Only
/// reqwest's chain is read: it holds no upstream content.
fn request_causes(e: &ClientInitializeError) -> Option<String> {
    let ClientInitializeError::TransportError { error, .. } = e else {
        return None;
    };
    use rmcp::transport::streamable_http_client::StreamableHttpError;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error.error.as_ref());
    while let Some(err) = source {
        // rmcp wraps reqwest's error without declaring it as the source.
        let request = match err.downcast_ref::<StreamableHttpError<reqwest::Error>>() {
            Some(StreamableHttpError::Client(e)) => Some(e),
            _ => err.downcast_ref::<reqwest::Error>(),
        };
        if let Some(request) = request {
            let mut causes: Vec<String> = Vec::new();
            let mut cause = std::error::Error::source(request);
            while let Some(c) = cause {
                let line = c.to_string();
                if !causes.iter().any(|seen| seen.contains(&line)) {
                    causes.push(line);
                }
                cause = c.source();
            }
            return (!causes.is_empty()).then(|| causes.join(": "));
        }
        source = err.source();
    }
    None
}

/// The gateway's environment variable `name`, for `${env:NAME}`.
fn env_secret(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|e| match e {
        std::env::VarError::NotPresent => {
            format!("the gateway's environment has no variable {name}")
        }
        std::env::VarError::NotUnicode(_) => {
            format!("the gateway's variable {name} is not valid UTF-8")
        }
    })
}

/// The content of the file at `path`, for `${file:/path}`.
fn file_secret(path: &str) -> Result<String, String> {
    // Secret files are small; a blocking read is shorter than a hop to
    // the blocking pool.
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))
}

/// `cfg` as one connection uses it: secret references in `headers` and
/// `env` resolved through `env` and `file`, and, when given, the client's
/// `authorization` in place of any configured `Authorization` header
/// (added after resolution, so a client's header is never read as a
/// reference). Borrowed when nothing changes.
fn connection_config<'a>(
    cfg: &'a UpstreamConfig,
    authorization: Option<&str>,
    env: &dyn Fn(&str) -> Result<String, String>,
    file: &dyn Fn(&str) -> Result<String, String>,
) -> Result<std::borrow::Cow<'a, UpstreamConfig>, ConnectError> {
    use meshgate_core::secrets::resolve;
    // References, escapes and malformed references all contain `${`.
    let needs =
        |m: &std::collections::BTreeMap<String, String>| m.values().any(|v| v.contains("${"));
    if authorization.is_none() && !needs(&cfg.headers) && !needs(&cfg.env) {
        return Ok(std::borrow::Cow::Borrowed(cfg));
    }
    let mut out = cfg.clone();
    for (field, map) in [("header", &mut out.headers), ("env", &mut out.env)] {
        for (key, value) in map.iter_mut() {
            *value = resolve(value, env, file).map_err(|source| ConnectError::Secret {
                upstream: cfg.name.clone(),
                field,
                key: key.clone(),
                source,
            })?;
        }
    }
    if let Some(credential) = authorization {
        out.headers
            .retain(|k, _| !k.eq_ignore_ascii_case(http::header::AUTHORIZATION.as_str()));
        out.headers
            .insert("Authorization".into(), credential.to_owned());
    }
    Ok(std::borrow::Cow::Owned(out))
}

/// Why one connection attempt failed.
enum Failure {
    Connect(ConnectError),
    Handshake(Box<ClientInitializeError>),
}

/// Opens the transport of `cfg` (for stdio: starts the process) and runs
/// the handshake of `lifecycle` on it; `deadline` ends the whole attempt.
async fn handshake(
    cfg: &UpstreamConfig,
    relay: UpstreamRelay,
    http: &crate::gateway::HttpClients,
    lifecycle: ClientLifecycleMode,
    deadline: tokio::time::Instant,
) -> Result<UpstreamConnection, Failure> {
    let name = cfg.name.clone();
    match cfg.transport {
        UpstreamTransport::Stdio => {
            let program = cfg.command.clone().unwrap_or_default();
            let mut cmd = tokio::process::Command::new(&program);
            // Only what the configuration names reaches the child: the
            // `inherit_env` variables and `env`.
            cmd.args(&cfg.args).env_clear();
            for key in &cfg.inherit_env {
                if let Some(v) = std::env::var_os(key) {
                    cmd.env(key, v);
                }
            }
            cmd.envs(&cfg.env);
            if let Some(dir) = &cfg.cwd {
                cmd.current_dir(dir);
            }
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                // The last resort if the supervisor task never runs (the
                // runtime is going away).
                .kill_on_drop(true);
            // Its own process group: a terminal's Ctrl-C reaches the
            // gateway only (which then drains and closes its upstreams),
            // and a kill reaches what the child started too.
            #[cfg(unix)]
            cmd.process_group(0);
            let mut child = cmd.spawn().map_err(|source| {
                Failure::Connect(ConnectError::Spawn {
                    command: program.clone(),
                    source,
                })
            })?;
            let pid = child.id();
            let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                return Err(Failure::Connect(ConnectError::Handshake(
                    "internal: the child's stdin or stdout was not piped".into(),
                )));
            };
            if let Some(stderr) = child.stderr.take() {
                let upstream = name.clone();
                tokio::spawn(async move {
                    let mut lines = tokio::io::BufReader::new(stderr).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        tracing::info!(upstream = %upstream, pid, stream = "stderr", "{line}");
                    }
                });
            }
            // Cancelled when the gateway closes or drops the connection
            // (not when the child ends it): then the supervisor stops the child.
            let stop = tokio_util::sync::CancellationToken::new();
            // Until the handshake succeeds the child is this future's: a failed
            // handshake, and one abandoned by a timeout (which drops this
            // future mid-way), stop it, or each restart would leave one behind.
            let abandoned = stop.clone().drop_guard();
            supervise(child, name.clone(), pid, stop.clone());
            let served =
                serve_client_with_lifecycle_and_ct(relay, (stdout, stdin), lifecycle, stop.clone())
                    .await;
            if served.is_ok() {
                abandoned.disarm();
            }
            served.map_err(|e| Failure::Handshake(Box::new(e)))
        }
        UpstreamTransport::StreamableHttp => {
            let mut config =
                StreamableHttpClientTransportConfig::with_uri(cfg.url.clone().unwrap_or_default())
                    .max_concurrent_requests(256);
            for (k, v) in &cfg.headers {
                match (
                    http::HeaderName::try_from(k.as_str()),
                    http::HeaderValue::try_from(v.as_str()),
                ) {
                    (Ok(k), Ok(v)) => {
                        config.custom_headers.insert(k, v);
                    }
                    _ => {
                        return Err(Failure::Connect(ConnectError::Handshake(format!(
                            "header `{k}` is not a valid HTTP header"
                        ))));
                    }
                }
            }
            let client = http
                .for_upstream(
                    &cfg.url.clone().unwrap_or_default(),
                    cfg.public_addresses_only,
                )
                .map_err(|e| Failure::Connect(ConnectError::Handshake(e)))?;
            let transport = StreamableHttpClientTransport::with_client(client, config);
            serve_client_with_lifecycle(relay, transport, lifecycle)
                .await
                .map_err(|e| Failure::Handshake(Box::new(e)))
        }
        UpstreamTransport::Sse => {
            let url = cfg.url.clone().unwrap_or_default();
            let client = http
                .for_upstream(&url, cfg.public_addresses_only)
                .map_err(|e| Failure::Connect(ConnectError::Handshake(e)))?;
            let transport = crate::upstream_sse::SseTransport::connect(
                &name,
                client,
                &url,
                &cfg.headers,
                deadline,
                Duration::from_secs(cfg.timeout_secs),
            )
            .await
            .map_err(|e| Failure::Connect(e.into()))?;
            serve_client_with_lifecycle(relay, transport, lifecycle)
                .await
                .map_err(|e| Failure::Handshake(Box::new(e)))
        }
    }
}

/// `limit` from now; a limit too large for the clock (a configured timeout
/// of `u64::MAX` seconds) means a year, which is as good as no limit.
pub(crate) fn deadline_after(limit: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(limit)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

/// How long a stdio child may take to exit after its stdin closed before
/// it is killed.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Stdio child processes not yet ended, so shutdown can wait for them.
struct Children {
    live: std::sync::atomic::AtomicUsize,
    gone: tokio::sync::Notify,
}

static CHILDREN: std::sync::LazyLock<Children> = std::sync::LazyLock::new(|| Children {
    live: Default::default(),
    gone: tokio::sync::Notify::new(),
});

/// Counts one child as live until dropped.
struct ChildGuard;

impl ChildGuard {
    fn enter() -> ChildGuard {
        CHILDREN.live.fetch_add(1, Ordering::AcqRel);
        ChildGuard
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if CHILDREN.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            CHILDREN.gone.notify_waiters();
        }
    }
}

/// Stdio child processes of this gateway process still running.
pub fn live_children() -> usize {
    CHILDREN.live.load(Ordering::Acquire)
}

/// Waits until every stdio child process has ended, at most `limit`;
/// returns how many were left.
pub async fn wait_for_children(limit: Duration) -> usize {
    let deadline = deadline_after(limit);
    loop {
        let gone = CHILDREN.gone.notified();
        let n = live_children();
        if n == 0 {
            return 0;
        }
        if tokio::time::timeout_at(deadline, gone).await.is_err() {
            return live_children();
        }
    }
}

/// Watches one stdio child of `upstream`: logs its exit with the status at
/// warn when it ends on its own (a crash, or it closed its stdout); once
/// `stop` is cancelled (the gateway closed the connection, so the child's
/// stdin is closed) gives it [`STOP_GRACE`] to exit, then kills it and
/// what it started (its process group).
fn supervise(
    mut child: tokio::process::Child,
    upstream: String,
    pid: Option<u32>,
    stop: tokio_util::sync::CancellationToken,
) {
    let live = ChildGuard::enter();
    tokio::spawn(async move {
        let _live = live;
        tokio::select! {
            biased;
            _ = stop.cancelled() => {}
            status = child.wait() => {
                match status {
                    Ok(status) => tracing::warn!(upstream = %upstream, pid, %status, "upstream process exited"),
                    Err(e) => tracing::warn!(upstream = %upstream, pid, error = %e, "upstream process exited; its exit status could not be read"),
                }
                return;
            }
        }
        match tokio::time::timeout(STOP_GRACE, child.wait()).await {
            Ok(Ok(status)) => {
                tracing::info!(upstream = %upstream, pid, %status, "upstream process ended after its connection closed")
            }
            Ok(Err(e)) => {
                tracing::warn!(upstream = %upstream, pid, error = %e, "waiting for the upstream process failed")
            }
            Err(_) => {
                kill_group(pid);
                let killed = child.kill().await;
                tracing::warn!(upstream = %upstream, pid, killed = killed.is_ok(), "upstream process did not exit within 2 s of its stdin closing; killed it (SIGKILL)");
            }
        }
    });
}

/// Sends SIGKILL to the process group led by `pid` (the stdio child, not
/// yet reaped, so the id is still its own).
fn kill_group(pid: Option<u32>) {
    #[cfg(unix)]
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok())
        && pid > 0
    {
        // SAFETY: kill(2) takes plain integers and touches no memory.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
    #[cfg(not(unix))]
    let _ = pid;
}

/// Seconds since the Unix epoch, for status timestamps.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Result<String, String> {
        match name {
            "TOKEN" => Ok("s3cret".into()),
            _ => Err(format!("the gateway's environment has no variable {name}")),
        }
    }

    fn file(path: &str) -> Result<String, String> {
        Err(format!("cannot read {path}: No such file or directory"))
    }

    fn http_upstream() -> UpstreamConfig {
        let mut up = UpstreamConfig::new("api", UpstreamTransport::StreamableHttp);
        up.url = Some("http://127.0.0.1:1/mcp".into());
        up
    }

    #[test]
    fn a_plain_definition_is_used_as_it_is() {
        let mut up = http_upstream();
        up.headers.insert("X-Plain".into(), "$HOME".into());
        let cfg = connection_config(&up, None, &env, &file).expect("nothing to resolve");
        assert!(matches!(cfg, std::borrow::Cow::Borrowed(_)));
    }

    #[test]
    fn references_are_resolved_and_escapes_unescaped() {
        let mut up = http_upstream();
        up.headers
            .insert("Authorization".into(), "Bearer ${env:TOKEN}".into());
        up.headers
            .insert("X-Literal".into(), "$${env:TOKEN}".into());
        up.env.insert("KEY".into(), "${env:TOKEN}".into());
        let cfg = connection_config(&up, None, &env, &file).expect("resolves");
        assert_eq!(cfg.headers["Authorization"], "Bearer s3cret");
        assert_eq!(cfg.headers["X-Literal"], "${env:TOKEN}");
        assert_eq!(cfg.env["KEY"], "s3cret");
        // The stored definition keeps the reference.
        assert_eq!(up.headers["Authorization"], "Bearer ${env:TOKEN}");
    }

    #[test]
    fn a_missing_secret_names_upstream_key_and_reference_but_no_value() {
        let mut up = http_upstream();
        up.headers.insert("A".into(), "${env:TOKEN}".into());
        up.headers
            .insert("X-Key".into(), "k-${file:/run/secrets/key}".into());
        let e = connection_config(&up, None, &env, &file).expect_err("the file is missing");
        let text = e.to_string();
        for part in [
            "upstream `api`",
            "header `X-Key`",
            "${file:/run/secrets/key}",
        ] {
            assert!(text.contains(part), "{part} in {text}");
        }
        assert!(!text.contains("s3cret"), "{text}");
    }

    #[test]
    fn a_forwarded_authorization_replaces_the_configured_one_and_is_never_resolved() {
        let mut up = http_upstream();
        up.headers
            .insert("authorization".into(), "Bearer ${env:TOKEN}".into());
        up.headers.insert("X-Tenant".into(), "acme".into());
        let cfg =
            connection_config(&up, Some("Bearer ${env:TOKEN}"), &env, &file).expect("resolves");
        let auth: Vec<(&String, &String)> = cfg
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("authorization"))
            .collect();
        assert_eq!(
            auth,
            [(
                &"Authorization".to_owned(),
                &"Bearer ${env:TOKEN}".to_owned()
            )],
            "the client's header, verbatim, in place of the configured one"
        );
        assert_eq!(cfg.headers["X-Tenant"], "acme");
        let without = connection_config(&up, None, &env, &file).expect("resolves");
        assert_eq!(without.headers["authorization"], "Bearer s3cret");
    }

    #[test]
    fn a_timeout_too_large_for_the_clock_is_a_far_deadline_not_a_panic() {
        let now = tokio::time::Instant::now();
        let far = deadline_after(Duration::from_secs(u64::MAX));
        assert!(far > now + Duration::from_secs(300 * 24 * 3600));
        let near = deadline_after(Duration::from_secs(5));
        assert!(near > now && near <= tokio::time::Instant::now() + Duration::from_secs(5));
    }

    /// A loopback HTTP server answering every request with `answer`; its URL.
    async fn answering(answer: &'static str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local address");
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut buf = [0u8; 8192];
                let _ = socket.read(&mut buf).await;
                let _ = socket.write_all(answer.as_bytes()).await;
            }
        });
        format!("http://{addr}/mcp")
    }

    /// The handshake error of a Streamable HTTP upstream at `url`, over the
    /// gateway's own client, as its status would say it.
    async fn streamable_handshake_error(url: &str) -> String {
        let client = crate::gateway::HttpClients::default()
            .for_url(url)
            .expect("the upstream client builds");
        let transport = StreamableHttpClientTransport::with_client(
            client,
            StreamableHttpClientTransportConfig::with_uri(url.to_owned()),
        );
        let e = serve_client_with_lifecycle((), transport, ClientLifecycleMode::Initialize)
            .await
            .expect_err("the handshake fails");
        handshake_detail("api", &e)
    }

    #[tokio::test]
    async fn a_streamable_http_redirect_is_named_and_its_body_kept_out_of_the_status() {
        let url = answering(
            "HTTP/1.1 308 Permanent Redirect\r\nlocation: http://10.0.0.9/mcp\r\ncontent-type: text/plain\r\ncontent-length: 14\r\n\r\ninternal-token",
        )
        .await;
        let detail = streamable_handshake_error(&url).await;
        assert!(
            detail.contains("HTTP 308")
                && detail.contains("redirect")
                && detail.contains("configure the URL it points to directly"),
            "{detail}"
        );
        assert!(!detail.contains("internal-token"), "{detail}");
    }

    #[tokio::test]
    async fn a_streamable_http_refusal_keeps_its_status_but_not_its_body() {
        let url = answering(
            "HTTP/1.1 404 Not Found\r\ncontent-type: text/plain\r\ncontent-length: 14\r\n\r\ninternal-token",
        )
        .await;
        let detail = streamable_handshake_error(&url).await;
        assert!(detail.contains("HTTP 404 Not Found"), "{detail}");
        assert!(!detail.contains("internal-token"), "{detail}");
    }
}
