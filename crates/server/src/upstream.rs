//! Connections to upstream MCP servers and the relay that carries what an
//! upstream sends on its own (progress, logs, sampling, elicitation, roots,
//! list changes, resource updates) back to the right client session.
//!
//! Each upstream has one *shared* connection, used for its catalog (tool,
//! prompt and resource lists), health checks and, for stdio upstreams, for
//! calls. Streamable HTTP upstreams get one connection *per client session*,
//! so that everything the upstream relays belongs to exactly one client.

// Sampling, roots and logging are deprecated in MCP 2026-07-28 but are part of
// every session-based revision this gateway relays.
#![allow(deprecated)]

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use meshgate_core::{Namer, UpstreamConfig, UpstreamTransport};
use rmcp::model::{
    ClientCapabilities, ClientInfo, CreateMessageRequestParams, CreateMessageResult,
    ElicitRequestParams, ElicitResult, ErrorCode, Implementation, ListRootsResult,
    LoggingMessageNotificationParam, ProgressNotificationParam, ProgressToken,
    ResourceUpdatedNotificationParam,
};
use rmcp::model::{LoggingMessageNotification, ResourceUpdatedNotification, ServerNotification};
use rmcp::service::{NotificationContext, RequestContext, RunningService};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{ClientHandler, ErrorData as McpError, RoleClient, serve_client};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

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

/// Calls in flight on a shared connection, by session.
#[derive(Default)]
pub struct InFlight {
    calls: Mutex<HashMap<u64, (u64, Arc<Outbox>)>>,
    next: AtomicU64,
}

impl InFlight {
    /// Registers a call from `session`; the guard unregisters it.
    pub fn enter(self: &Arc<Self>, session: u64, client: Arc<Outbox>) -> InFlightGuard {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut calls) = self.calls.lock() {
            calls.insert(key, (session, client));
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
    fn sole_session(&self) -> Result<Arc<Outbox>, &'static str> {
        let calls = self.calls.lock().map_err(|_| "internal lock poisoned")?;
        let mut found: Option<&(u64, Arc<Outbox>)> = None;
        for entry in calls.values() {
            match found {
                Some(f) if f.0 != entry.0 => {
                    return Err(
                        "several client sessions have calls in flight on this shared upstream connection",
                    );
                }
                _ => found = Some(entry),
            }
        }
        found
            .map(|f| f.1.clone())
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
pub struct UpstreamRelay {
    upstream: usize,
    name: String,
    namer: Arc<Namer>,
    target: RelayTarget,
    info: ClientInfo,
    /// Upstream progress token (assigned by our client) → (client's token, client peer).
    progress: ProgressMap,
    changes: mpsc::Sender<ListChanged>,
}

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
        namer: Arc<Namer>,
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
            },
            progress,
        )
    }

    fn request_target(&self, what: &str) -> Result<Arc<Outbox>, McpError> {
        match &self.target {
            RelayTarget::Session(client) => Ok(client.clone()),
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

    fn list_changed(&self, kind: ListKind) {
        // A full queue already holds a refresh request; dropping this one loses nothing.
        let _ = self.changes.try_send(ListChanged {
            upstream: self.upstream,
            kind,
        });
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
        let client = self.request_target("sampling/createMessage")?;
        client
            .peer()
            .create_message(params)
            .await
            .map_err(|e| relay_error("sampling/createMessage", &self.name, e))
    }

    async fn create_elicitation(
        &self,
        params: ElicitRequestParams,
        _context: RequestContext<RoleClient>,
    ) -> Result<ElicitResult, McpError> {
        let client = self.request_target("elicitation/create")?;
        client
            .peer()
            .create_elicitation(params)
            .await
            .map_err(|e| relay_error("elicitation/create", &self.name, e))
    }

    async fn list_roots(
        &self,
        _context: RequestContext<RoleClient>,
    ) -> Result<ListRootsResult, McpError> {
        let client = self.request_target("roots/list")?;
        client
            .peer()
            .list_roots()
            .await
            .map_err(|e| relay_error("roots/list", &self.name, e))
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
                Ok(client) => client.push(log(params)).await,
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
        if let RelayTarget::Session(client) = &self.target {
            params.uri = self.namer.uri(&self.name, &params.uri);
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
}

/// Opens a connection to `cfg` and completes the MCP handshake.
pub async fn connect(
    cfg: &UpstreamConfig,
    relay: UpstreamRelay,
    http: &crate::gateway::HttpClients,
) -> Result<UpstreamConnection, ConnectError> {
    let limit = Duration::from_secs(cfg.connect_timeout_secs);
    let name = cfg.name.clone();
    let fut = async {
        match cfg.transport {
            UpstreamTransport::Stdio => {
                let program = cfg.command.clone().unwrap_or_default();
                let mut cmd = tokio::process::Command::new(&program);
                cmd.args(&cfg.args).env_clear();
                for key in ["PATH", "HOME"] {
                    if let Some(v) = std::env::var_os(key) {
                        cmd.env(key, v);
                    }
                }
                cmd.envs(&cfg.env);
                if let Some(dir) = &cfg.cwd {
                    cmd.current_dir(dir);
                }
                let (proc, stderr) = TokioChildProcess::builder(cmd)
                    .stderr(Stdio::piped())
                    .spawn()
                    .map_err(|source| ConnectError::Spawn {
                        command: program.clone(),
                        source,
                    })?;
                if let Some(stderr) = stderr {
                    let upstream = name.clone();
                    tokio::spawn(async move {
                        let mut lines = tokio::io::BufReader::new(stderr).lines();
                        while let Ok(Some(line)) = lines.next_line().await {
                            tracing::info!(upstream = %upstream, stream = "stderr", "{line}");
                        }
                    });
                }
                serve_client(relay, proc)
                    .await
                    .map_err(|e| ConnectError::Handshake(e.to_string()))
            }
            UpstreamTransport::StreamableHttp => {
                let mut config = StreamableHttpClientTransportConfig::with_uri(
                    cfg.url.clone().unwrap_or_default(),
                )
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
                            return Err(ConnectError::Handshake(format!(
                                "header `{k}` is not a valid HTTP header"
                            )));
                        }
                    }
                }
                let client = http
                    .for_url(&cfg.url.clone().unwrap_or_default())
                    .map_err(ConnectError::Handshake)?;
                let transport = StreamableHttpClientTransport::with_client(client, config);
                serve_client(relay, transport)
                    .await
                    .map_err(|e| ConnectError::Handshake(e.to_string()))
            }
        }
    };
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout(limit)),
    }
}

/// Seconds since the Unix epoch, for status timestamps.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
