//! The shared state of one gateway process: the upstreams with their shared
//! connections and health, and the merged, namespaced catalog that every
//! client session reads. One background task owns catalog refreshes (driven by
//! upstream `list_changed` notifications, debounced) and one owns health checks
//! and reconnects.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use meshgate_core::{Catalog, Config, Namer, UpstreamConfig};
use meshgate_store::Store;
use rmcp::RoleClient;
use rmcp::model::{
    Prompt, Resource, ResourceTemplate, ServerCapabilities, ServerNotification, SubscriptionFilter,
    Tool,
};
use rmcp::service::Peer;
use tokio::sync::{Mutex as AsyncMutex, broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::clients::Clients;
use crate::limits::Limiters;
use crate::resilience::{UpstreamTraffic, mono_now, unit_random};
use crate::upstream::{
    Era, InFlight, ListChanged, ListKind, ProgressMap, RelayTarget, ResourceUpdate,
    UpstreamConnection, UpstreamRelay, UpstreamStatus, connect, is_modern_connection, unix_now,
};

/// What one upstream currently offers, as the upstream names it.
#[derive(Debug, Clone, Default)]
pub struct UpstreamListing {
    /// Its tools.
    pub tools: Vec<Tool>,
    /// Its prompts.
    pub prompts: Vec<Prompt>,
    /// Its resources.
    pub resources: Vec<Resource>,
    /// Its resource templates.
    pub templates: Vec<ResourceTemplate>,
}

/// The shared connection of an upstream and what was learned through it.
pub struct SharedConn {
    /// The connection.
    pub conn: UpstreamConnection,
    /// Progress routing for calls made on it.
    pub progress: ProgressMap,
    /// The upstream's declared capabilities.
    pub capabilities: ServerCapabilities,
    /// Calls in flight on it, by client session.
    pub inflight: Arc<InFlight>,
}

/// One extra child process of a stdio upstream with `pool.processes` > 1.
#[derive(Default)]
struct WorkerSlot {
    conn: Option<Arc<SharedConn>>,
    /// Failed starts in a row.
    attempts: u32,
    /// Not before this (monotonic time).
    next_at: Duration,
}

/// Where an upstream's definition comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamSource {
    /// The configuration file (changed by editing it and reloading).
    Config,
    /// `/api/v1/upstreams` or `meshgate import` (kept in the store).
    Api,
}

impl UpstreamSource {
    /// The spelling in the store and the API.
    pub fn label(self) -> &'static str {
        match self {
            UpstreamSource::Config => "config",
            UpstreamSource::Api => "api",
        }
    }
}

/// One upstream of the running gateway.
pub struct Upstream {
    /// Its id: never reused, so routes to a removed upstream find nothing.
    /// The catalog routes by it.
    pub index: usize,
    /// Its configuration.
    pub config: UpstreamConfig,
    /// Where the definition comes from.
    pub source: UpstreamSource,
    /// Cancelled when the upstream is removed or replaced: its connections
    /// close and its background work stops.
    pub retired: CancellationToken,
    status: RwLock<(UpstreamStatus, u64)>,
    shared: AsyncMutex<Option<Arc<SharedConn>>>,
    /// Calls in flight on the shared connection.
    pub inflight: Arc<InFlight>,
    listing: RwLock<Arc<UpstreamListing>>,
    /// Circuit breaker and call pool.
    pub traffic: Arc<UpstreamTraffic>,
    restart: std::sync::Mutex<RestartState>,
    /// Extra processes of a stdio upstream (`pool.processes` - 1 of them).
    workers: Vec<AsyncMutex<WorkerSlot>>,
    /// Rotates ties between equally busy processes.
    next_worker: std::sync::atomic::AtomicUsize,
    /// Set while a task (re)starts the extra processes.
    starting_workers: AtomicBool,
    /// A reconnect of the shared connection is running (in its own task).
    reconnecting: AtomicBool,
    /// The revision era the upstream was found to speak (2026-07-28 or the
    /// session-based ones), remembered for reconnects.
    pub era: Era,
}

/// Reconnection bookkeeping of an upstream whose connection died.
#[derive(Default)]
struct RestartState {
    /// Failed reconnects in a row.
    attempts: u32,
    /// Not before this (monotonic time).
    next_at: Duration,
    /// Successful restarts so far.
    restarts: u64,
}

impl Upstream {
    /// A new upstream with id `index`, not yet connected.
    pub fn new(index: usize, cfg: UpstreamConfig, source: UpstreamSource) -> Upstream {
        Upstream {
            index,
            status: RwLock::new((
                if cfg.enabled {
                    UpstreamStatus::Connecting
                } else {
                    UpstreamStatus::Disabled
                },
                unix_now(),
            )),
            shared: AsyncMutex::new(None),
            inflight: Arc::new(InFlight::default()),
            listing: RwLock::new(Arc::default()),
            traffic: Arc::new(UpstreamTraffic::new(&cfg)),
            restart: std::sync::Mutex::new(RestartState::default()),
            workers: (1..cfg.pool.processes.max(1))
                .map(|_| AsyncMutex::new(WorkerSlot::default()))
                .collect(),
            next_worker: Default::default(),
            starting_workers: AtomicBool::new(false),
            reconnecting: AtomicBool::new(false),
            era: Era::default(),
            source,
            retired: CancellationToken::new(),
            config: cfg,
        }
    }

    /// Closes every connection of the upstream (for stdio: ends its
    /// processes) and stops its background work: it was removed or replaced.
    pub(crate) async fn retire(&self) {
        self.retired.cancel();
        if let Some(s) = self.shared.lock().await.take() {
            s.conn.cancellation_token().cancel();
        }
        for slot in &self.workers {
            if let Some(c) = slot.lock().await.conn.take() {
                c.conn.cancellation_token().cancel();
            }
        }
        self.set_status(UpstreamStatus::Disabled);
    }

    /// Current status and the unix time it was entered.
    pub fn status(&self) -> (UpstreamStatus, u64) {
        self.status
            .read()
            .map(|s| s.clone())
            .unwrap_or((UpstreamStatus::Down("status lock poisoned".into()), 0))
    }

    fn set_status(&self, status: UpstreamStatus) {
        if let Ok(mut s) = self.status.write()
            && s.0 != status
        {
            match &status {
                UpstreamStatus::Down(why) => {
                    tracing::warn!(upstream = %self.config.name, reason = %why, "upstream down")
                }
                UpstreamStatus::Up => tracing::info!(upstream = %self.config.name, "upstream up"),
                _ => {}
            }
            metrics::gauge!("gateway_upstream_up", "upstream" => self.config.name.clone()).set(
                if status == UpstreamStatus::Up {
                    1.0
                } else {
                    0.0
                },
            );
            *s = (status, unix_now());
        }
    }

    /// What the upstream offered at the last refresh.
    pub fn listing(&self) -> Arc<UpstreamListing> {
        self.listing.read().map(|l| l.clone()).unwrap_or_default()
    }

    /// Whether a session's calls go over a connection of its own (Streamable
    /// HTTP, HTTP+SSE, and stdio with `process = "per_session"`: a child
    /// process per session) or over the shared connection (stdio: one child
    /// process, or `pool.processes` of them, serves everyone).
    pub fn per_session(&self) -> bool {
        match self.config.transport {
            meshgate_core::UpstreamTransport::StreamableHttp
            | meshgate_core::UpstreamTransport::Sse => true,
            meshgate_core::UpstreamTransport::Stdio => {
                self.config.process == meshgate_core::config::ProcessMode::PerSession
            }
        }
    }

    /// The shared connection, if up.
    pub async fn shared(&self) -> Option<Arc<SharedConn>> {
        self.shared.lock().await.clone()
    }

    /// The live process (stdio) with the fewest calls in flight, ties taken
    /// in turn: the shared connection and, with `pool.processes` > 1, the
    /// extra ones.
    pub async fn pick_process(&self) -> Option<Arc<SharedConn>> {
        let mut live: Vec<Arc<SharedConn>> = Vec::with_capacity(1 + self.workers.len());
        if let Some(s) = self
            .shared()
            .await
            .filter(|s| !s.conn.is_transport_closed())
        {
            live.push(s);
        }
        for w in &self.workers {
            if let Some(c) = w
                .lock()
                .await
                .conn
                .clone()
                .filter(|c| !c.conn.is_transport_closed())
            {
                live.push(c);
            }
        }
        if live.len() <= 1 {
            return live.pop();
        }
        let start = self.next_worker.fetch_add(1, Ordering::Relaxed) % live.len();
        let n = live.len();
        (0..n)
            .map(|i| &live[(start + i) % n])
            .min_by_key(|c| c.inflight.len())
            .cloned()
    }

    /// Processes configured and live (stdio; 1 and 0/1 otherwise).
    pub async fn processes(&self) -> (usize, usize) {
        let mut live = usize::from(
            self.shared()
                .await
                .is_some_and(|s| !s.conn.is_transport_closed()),
        );
        for w in &self.workers {
            if w.lock()
                .await
                .conn
                .as_ref()
                .is_some_and(|c| !c.conn.is_transport_closed())
            {
                live += 1;
            }
        }
        (1 + self.workers.len(), live)
    }
}

/// HTTP clients for upstream connections, built on first use. The plain-HTTP
/// client skips TLS root loading, which costs about 100 ms at start-up (OpenSSL
/// reads the system CA bundle); the TLS client is built only when an
/// `https://` upstream is first connected. Neither follows redirects.
#[derive(Default)]
pub struct HttpClients {
    plain: OnceLock<reqwest::Client>,
    tls: OnceLock<reqwest::Client>,
    /// The same two for `public_addresses_only` upstreams: their resolver
    /// drops non-public addresses ([`crate::egress::PublicOnlyResolver`]).
    public_plain: OnceLock<reqwest::Client>,
    public_tls: OnceLock<reqwest::Client>,
}

impl HttpClients {
    /// The client for `url`, building it if needed.
    pub fn for_url(&self, url: &str) -> Result<reqwest::Client, String> {
        self.for_upstream(url, false)
    }

    /// The client for an upstream at `url`; with `public_only`, one that
    /// connects to public addresses only.
    pub fn for_upstream(&self, url: &str, public_only: bool) -> Result<reqwest::Client, String> {
        if public_only && let Some(why) = crate::egress::non_public_literal(url) {
            return Err(format!(
                "{why}, and public_addresses_only connects to public addresses only"
            ));
        }
        let tls = url.starts_with("https://");
        let cell = match (public_only, tls) {
            (false, false) => &self.plain,
            (false, true) => &self.tls,
            (true, false) => &self.public_plain,
            (true, true) => &self.public_tls,
        };
        if let Some(c) = cell.get() {
            return Ok(c.clone());
        }
        // No redirects: reqwest drops only `Authorization` and `Cookie` on a
        // redirect to another host, so configured secret headers (`X-Api-Key`)
        // would follow one anywhere, and an MCP endpoint has no reason to
        // move. The transports report a 3xx with its `Location` instead.
        let builder = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none());
        let builder = if tls {
            builder
        } else {
            builder.tls_certs_only(Vec::new())
        };
        let builder = if public_only {
            builder.dns_resolver(std::sync::Arc::new(crate::egress::PublicOnlyResolver))
        } else {
            builder
        };
        let client = builder
            .build()
            .map_err(|e| format!("cannot build the HTTP client for upstreams: {e}"))?;
        Ok(cell.get_or_init(|| client).clone())
    }
}

/// The merged catalog all sessions see.
#[derive(Default)]
pub struct Snapshot {
    /// Exposed tools (renamed).
    pub tools: Vec<Tool>,
    /// Exposed name → upstream and original name.
    pub tool_routes: Catalog,
    /// Exposed prompts (renamed).
    pub prompts: Vec<Prompt>,
    /// Exposed prompt name → route.
    pub prompt_routes: Catalog,
    /// Exposed resources (URIs prefixed).
    pub resources: Vec<Resource>,
    /// Exposed resource URI → route (used when names are not prefixed).
    pub resource_routes: Catalog,
    /// Exposed resource templates.
    pub templates: Vec<ResourceTemplate>,
    /// The upstream index of each entry of `tools`, `prompts`, `resources`
    /// and `templates` (same order), for per-tenant visibility.
    pub owners: SnapshotOwners,
}

/// Upstream indexes aligned with the lists of a [`Snapshot`].
#[derive(Default)]
pub struct SnapshotOwners {
    /// Of `tools`.
    pub tools: Vec<usize>,
    /// Of `prompts`.
    pub prompts: Vec<usize>,
    /// Of `resources`.
    pub resources: Vec<usize>,
    /// Of `templates`.
    pub templates: Vec<usize>,
}

/// The naming rules in force; they change when the number of enabled
/// upstreams crosses one in `conditional` prefix mode.
pub struct NamerCell(RwLock<Arc<Namer>>);

impl NamerCell {
    /// The current rules.
    pub fn get(&self) -> Arc<Namer> {
        self.0
            .read()
            .map(|n| n.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    pub(crate) fn set(&self, namer: Namer) -> bool {
        let mut cur = match self.0.write() {
            Ok(n) => n,
            Err(p) => p.into_inner(),
        };
        let changed = **cur != namer;
        *cur = Arc::new(namer);
        changed
    }
}

/// The gateway: configuration, store, upstreams and catalog.
pub struct Gateway {
    /// Validated configuration.
    pub config: Config,
    /// Persistence.
    pub store: Arc<dyn Store>,
    /// Upstreams by id (disabled ones included, marked so).
    pub upstreams: crate::upstream_set::UpstreamSet,
    /// Naming rules resolved for the current upstreams.
    pub namer: Arc<NamerCell>,
    /// Serializes changes of the upstream set.
    pub(crate) changing: AsyncMutex<()>,
    snapshot: RwLock<Arc<Snapshot>>,
    pub(crate) changes: broadcast::Sender<ListKind>,
    events: mpsc::Sender<ListChanged>,
    /// HTTP clients shared by all Streamable HTTP upstream connections.
    pub http: HttpClients,
    ready: AtomicBool,
    /// Process start, for uptime.
    pub started: Instant,
    /// Cancelled on shutdown.
    pub shutdown: CancellationToken,
    /// Open client sessions, for stats, per-client health and cleanup.
    pub clients: Clients,
    /// Rate limiters.
    pub limits: Limiters,
    /// Requests being served, for the drain on shutdown.
    pub inflight: RequestTracker,
    /// The agent mesh, once started (absent when `mesh.enabled = false`).
    pub mesh: std::sync::OnceLock<Arc<crate::mesh::Mesh>>,
    /// Calls of 2026-07-28 clients waiting for the client's input.
    pub parked: crate::handler::ParkedCalls,
    /// Upstream resources watched for updates, shared by every watcher.
    pub watches: ResourceWatches,
    /// Cached `tools/call` results (per upstream `cache_ttl_secs`).
    pub cache: crate::cache::ResultCache,
    /// Compiled tool schemas for argument and output checks.
    pub validators: crate::validate::Validators,
    /// Virtual servers (`/servers/{name}/mcp`).
    pub views: crate::views::Views,
}

/// Upstream resources watched for `notifications/resources/updated` on the
/// upstreams' shared connections, for `subscriptions/listen` streams of
/// 2026-07-28 clients and for session clients' `resources/subscribe` of
/// 2026-07-28 upstreams. The first watcher of a resource subscribes
/// upstream (`resources/subscribe`, or a `subscriptions/listen` stream of
/// its own on a 2026-07-28 upstream), the last one to go unsubscribes;
/// updates are published to every watcher, which picks its own. A shared
/// connection that is replaced loses its subscriptions: watchers see no
/// more updates until they watch again.
pub struct ResourceWatches {
    /// Every watched update.
    pub updates: broadcast::Sender<ResourceUpdate>,
    active: std::sync::Mutex<std::collections::HashMap<ResourceUpdate, Watched>>,
}

/// One watched upstream resource.
struct Watched {
    watchers: usize,
    /// The listen stream of a 2026-07-28 upstream (ended when aborted).
    task: Option<tokio::task::AbortHandle>,
}

impl Default for ResourceWatches {
    fn default() -> Self {
        ResourceWatches {
            updates: broadcast::channel(256).0,
            active: Default::default(),
        }
    }
}

/// Keeps a resource watched until dropped.
pub struct WatchGuard {
    gw: Arc<Gateway>,
    key: ResourceUpdate,
}

// resources/subscribe is deprecated in 2026-07-28, and how a session-based
// upstream is watched.
#[allow(deprecated)]
impl Drop for WatchGuard {
    fn drop(&mut self) {
        let last = {
            let Ok(mut active) = self.gw.watches.active.lock() else {
                return;
            };
            match active.get_mut(&self.key) {
                Some(w) if w.watchers > 1 => {
                    w.watchers -= 1;
                    None
                }
                Some(_) => active.remove(&self.key),
                None => None,
            }
        };
        let Some(last) = last else { return };
        if let Some(task) = last.task {
            task.abort();
            return;
        }
        // Outside a runtime (the process is ending) there is nobody to tell.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let gw = self.gw.clone();
        let (index, uri) = self.key.clone();
        runtime.spawn(async move {
            if let Some(s) = match gw.upstreams.get(index) {
                Some(up) => up.shared().await,
                None => None,
            } {
                let unsubscribe = rmcp::model::ClientRequest::UnsubscribeRequest(
                    rmcp::model::UnsubscribeRequest::new(
                        rmcp::model::UnsubscribeRequestParams::new(uri),
                    ),
                );
                let _ = s.conn.peer().send_request(unsubscribe).await;
            }
        });
    }
}

impl Gateway {
    /// Watches resource `uri` (as upstream `index` names it) for updates,
    /// subscribing upstream if nobody watches it yet; updates arrive on
    /// [`ResourceWatches::updates`] while the guard lives. `Err` says why
    /// the upstream cannot be watched.
    #[allow(deprecated)] // resources/subscribe: how a session-based upstream is watched
    pub async fn watch_resource(
        self: &Arc<Self>,
        index: usize,
        uri: String,
    ) -> Result<WatchGuard, String> {
        let key = (index, uri.clone());
        let first = {
            let mut active = self
                .watches
                .active
                .lock()
                .map_err(|_| "internal lock poisoned".to_owned())?;
            let w = active.entry(key.clone()).or_insert(Watched {
                watchers: 0,
                task: None,
            });
            w.watchers += 1;
            w.watchers == 1
        };
        let guard = WatchGuard {
            gw: self.clone(),
            key: key.clone(),
        };
        if !first {
            return Ok(guard);
        }
        let up = self
            .upstreams
            .get(index)
            .ok_or_else(|| format!("internal: no upstream #{index}"))?;
        let shared = up
            .shared()
            .await
            .filter(|s| !s.conn.is_transport_closed())
            .ok_or_else(|| format!("upstream `{}` is not connected", up.config.name))?;
        if shared
            .capabilities
            .resources
            .as_ref()
            .is_none_or(|r| r.subscribe != Some(true))
        {
            return Err(format!(
                "upstream `{}` offers no resource subscriptions",
                up.config.name
            ));
        }
        let peer = shared.conn.peer().clone();
        if !is_modern_connection(&peer) {
            let subscribe =
                rmcp::model::ClientRequest::SubscribeRequest(rmcp::model::SubscribeRequest::new(
                    rmcp::model::SubscribeRequestParams::new(uri.clone()),
                ));
            let limit = Duration::from_secs(up.config.timeout_secs);
            return match tokio::time::timeout(limit, peer.send_request(subscribe)).await {
                Ok(Ok(_)) => Ok(guard),
                Ok(Err(e)) => Err(format!(
                    "resources/subscribe at `{}` failed: {e}",
                    up.config.name
                )),
                Err(_) => Err(format!(
                    "resources/subscribe at `{}` timed out",
                    up.config.name
                )),
            };
        }
        let mut filter = SubscriptionFilter::default();
        filter.resource_subscriptions = Some(vec![uri.clone()]);
        let mut sub = peer
            .listen(filter)
            .await
            .map_err(|e| format!("subscriptions/listen at `{}` failed: {e}", up.config.name))?;
        let updates = self.watches.updates.clone();
        let task = tokio::spawn(async move {
            while let Ok(Some(n)) = sub.next().await {
                if let ServerNotification::ResourceUpdatedNotification(u) = n {
                    let _ = updates.send((index, u.params.uri));
                }
            }
        });
        if let Ok(mut active) = self.watches.active.lock()
            && let Some(w) = active.get_mut(&key)
        {
            w.task = Some(task.abort_handle());
        } else {
            task.abort();
        }
        Ok(guard)
    }
}

/// Counts requests being served so shutdown can wait for them; once
/// draining, new requests are refused.
#[derive(Default)]
pub struct RequestTracker {
    count: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
    draining: AtomicBool,
}

/// Marks one HTTP exchange as in flight until dropped (kept alive by the
/// response body, so it ends when the answer has been written).
pub struct OwnedRequestGuard(Arc<Gateway>);

impl Drop for OwnedRequestGuard {
    fn drop(&mut self) {
        let t = &self.0.inflight;
        if t.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            t.idle.notify_waiters();
        }
    }
}

impl Gateway {
    /// Counts an HTTP exchange as in flight until the guard is dropped.
    pub fn track_exchange(self: &Arc<Self>) -> OwnedRequestGuard {
        self.inflight.count.fetch_add(1, Ordering::AcqRel);
        OwnedRequestGuard(self.clone())
    }
}

/// Marks one request as in flight until dropped.
pub struct RequestGuard<'a>(&'a RequestTracker);

impl Drop for RequestGuard<'_> {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl RequestTracker {
    /// Registers a request being served (admission, refused while draining,
    /// is checked before: a request admitted just before the drain began
    /// still counts).
    pub fn track(&self) -> RequestGuard<'_> {
        self.count.fetch_add(1, Ordering::AcqRel);
        RequestGuard(self)
    }

    /// Requests in flight.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Stops admitting requests and waits until none is in flight, at most `limit`.
    /// Returns how many were still in flight at the end.
    pub async fn drain(&self, limit: Duration) -> usize {
        self.draining.store(true, Ordering::Release);
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let idle = self.idle.notified();
            let n = self.count();
            if n == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.count();
            }
        }
    }
}

impl Gateway {
    /// Builds the gateway and starts its background tasks. Upstreams are
    /// connected in the background; [`Gateway::is_ready`] turns true when every
    /// enabled upstream has been tried once.
    pub fn start(
        config: Config,
        store: Arc<dyn Store>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Gateway>> {
        Self::start_with(config, Vec::new(), store, shutdown)
    }

    /// [`Gateway::start`] with managed upstreams (from the store) besides
    /// the configured ones.
    pub fn start_with(
        config: Config,
        managed: Vec<UpstreamConfig>,
        store: Arc<dyn Store>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Gateway>> {
        let enabled = config
            .upstreams
            .iter()
            .chain(&managed)
            .filter(|u| u.enabled)
            .count();
        let namer = Arc::new(NamerCell(RwLock::new(Arc::new(Namer::new(
            config.namespacing.prefix_mode,
            &config.namespacing.separator,
            enabled,
        )))));
        let upstreams = crate::upstream_set::UpstreamSet::default();
        for cfg in &config.upstreams {
            upstreams.add(|id| Upstream::new(id, cfg.clone(), UpstreamSource::Config));
        }
        for cfg in managed {
            upstreams.add(|id| Upstream::new(id, cfg, UpstreamSource::Api));
        }
        let http = HttpClients::default();
        let (events, events_rx) = mpsc::channel(256);
        let (changes, _) = broadcast::channel(64);
        let limits = Limiters::new(&config.rate_limits);
        let parked = crate::handler::ParkedCalls::new().map_err(anyhow::Error::msg)?;
        let views = crate::views::Views::new(&config.virtual_servers);
        let gw = Arc::new(Gateway {
            views,
            parked,
            watches: ResourceWatches::default(),
            cache: crate::cache::ResultCache::new(
                config.tools.cache_max_entries,
                config.tools.cache_max_bytes,
            ),
            clients: Clients::default(),
            limits,
            inflight: RequestTracker::default(),
            mesh: std::sync::OnceLock::new(),
            config,
            store,
            upstreams,
            namer,
            changing: AsyncMutex::new(()),
            snapshot: RwLock::new(Arc::default()),
            changes,
            events,
            http,
            ready: AtomicBool::new(false),
            started: Instant::now(),
            shutdown,
            validators: crate::validate::Validators::default(),
        });
        tokio::spawn(gw.clone().refresh_loop(events_rx));
        tokio::spawn(gw.clone().health_loop());
        tokio::spawn(gw.clone().restart_loop());
        tokio::spawn(gw.clone().idle_loop());
        tokio::spawn(gw.clone().parked_loop());
        Ok(gw)
    }

    /// True once every enabled upstream has been tried and while not shutting down.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
            && !self.shutdown.is_cancelled()
            && !self.inflight.is_draining()
    }

    /// The current catalog.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().map(|s| s.clone()).unwrap_or_default()
    }

    /// Subscribes to catalog changes (for `list_changed` notifications to clients).
    pub fn subscribe_changes(&self) -> broadcast::Receiver<ListKind> {
        self.changes.subscribe()
    }

    /// Sender for list-change events from upstream connections.
    pub fn change_events(&self) -> mpsc::Sender<ListChanged> {
        self.events.clone()
    }

    /// Looks up an upstream by name.
    pub fn upstream_named(&self, name: &str) -> Option<Arc<Upstream>> {
        self.upstreams.named(name)
    }

    /// The naming rules in force.
    pub fn namer(&self) -> Arc<Namer> {
        self.namer.get()
    }

    /// Connects the shared connection of `up` if it is not connected.
    async fn ensure_shared(&self, up: &Arc<Upstream>) -> Result<Arc<SharedConn>, String> {
        let mut slot = up.shared.lock().await;
        if let Some(s) = slot.as_ref() {
            if !s.conn.is_transport_closed() {
                return Ok(s.clone());
            }
            *slot = None;
        }
        // A change or removal of the upstream retires it and then takes this
        // lock: stop connecting rather than make it wait out the attempt
        // (a stdio child being started is killed by its drop guard).
        let shared = tokio::select! {
            opened = self.open_shared(up, up.inflight.clone()) => opened?,
            () = up.retired.cancelled() => {
                return Err(format!("upstream `{}` was removed", up.config.name));
            }
        };
        if up.retired.is_cancelled() {
            shared.conn.cancellation_token().cancel();
            return Err(format!("upstream `{}` was removed", up.config.name));
        }
        *slot = Some(shared.clone());
        Ok(shared)
    }

    /// Opens a connection of `up` shared by every client session (for
    /// stdio, a new child process) whose calls are tracked in `inflight`.
    async fn open_shared(
        &self,
        up: &Upstream,
        inflight: Arc<InFlight>,
    ) -> Result<Arc<SharedConn>, String> {
        let (relay, progress) = UpstreamRelay::new(
            up.index,
            &up.config.name,
            self.namer.clone(),
            RelayTarget::Shared(inflight.clone()),
            None,
            self.events.clone(),
        );
        let relay = relay.with_updates(self.watches.updates.clone());
        let conn = connect(&up.config, relay, &self.http, &up.era)
            .await
            .map_err(|e| e.to_string())?;
        let capabilities = conn
            .peer_info()
            .map(|i| i.capabilities.clone())
            .unwrap_or_default();
        if is_modern_connection(conn.peer()) {
            self.listen_for_list_changes(up, conn.peer().clone(), &capabilities);
        }
        Ok(Arc::new(SharedConn {
            conn,
            progress,
            capabilities,
            inflight,
        }))
    }

    /// A 2026-07-28 upstream announces list changes only on a
    /// `subscriptions/listen` stream: opens one on its shared connection
    /// (it ends with the connection) and feeds what arrives to the catalog
    /// refresh, as a session-based upstream's notifications are.
    fn listen_for_list_changes(
        &self,
        up: &Upstream,
        peer: Peer<RoleClient>,
        caps: &ServerCapabilities,
    ) {
        let mut filter = SubscriptionFilter::default();
        if caps
            .tools
            .as_ref()
            .is_some_and(|c| c.list_changed == Some(true))
        {
            filter.tools_list_changed = Some(true);
        }
        if caps
            .prompts
            .as_ref()
            .is_some_and(|c| c.list_changed == Some(true))
        {
            filter.prompts_list_changed = Some(true);
        }
        if caps
            .resources
            .as_ref()
            .is_some_and(|c| c.list_changed == Some(true))
        {
            filter.resources_list_changed = Some(true);
        }
        if filter == SubscriptionFilter::default() {
            return;
        }
        let events = self.events.clone();
        let upstream = up.index;
        let name = up.config.name.clone();
        tokio::spawn(async move {
            let mut sub = match peer.listen(filter).await {
                Ok(sub) => sub,
                Err(e) => {
                    tracing::warn!(upstream = %name, error = %e, "subscriptions/listen for list changes failed; this upstream's list changes reach the catalog only on reconnect");
                    return;
                }
            };
            while let Ok(Some(n)) = sub.next().await {
                let kind = match n {
                    ServerNotification::ToolListChangedNotification(_) => ListKind::Tools,
                    ServerNotification::PromptListChangedNotification(_) => ListKind::Prompts,
                    ServerNotification::ResourceListChangedNotification(_) => ListKind::Resources,
                    _ => continue,
                };
                // A full queue already holds a refresh request.
                let _ = events.try_send(ListChanged { upstream, kind });
            }
            tracing::debug!(upstream = %name, "list-change subscription ended");
        });
    }

    /// Re-reads the lists of one upstream over its shared connection.
    async fn refresh_upstream(
        &self,
        up: &Arc<Upstream>,
        kinds: &HashSet<ListKind>,
    ) -> Result<(), String> {
        let shared = self.ensure_shared(up).await?;
        let peer: &Peer<RoleClient> = shared.conn.peer();
        let caps = &shared.capabilities;
        let limit = Duration::from_secs(up.config.timeout_secs);
        let mut listing = (*up.listing()).clone();
        let fail = |what: &str, e: String| format!("{what} failed: {e}");
        if kinds.contains(&ListKind::Tools) && caps.tools.is_some() {
            listing.tools = tokio::time::timeout(limit, peer.list_all_tools())
                .await
                .map_err(|_| fail("tools/list", "timed out".into()))?
                .map_err(|e| fail("tools/list", e.to_string()))?;
        }
        if kinds.contains(&ListKind::Prompts) && caps.prompts.is_some() {
            listing.prompts = tokio::time::timeout(limit, peer.list_all_prompts())
                .await
                .map_err(|_| fail("prompts/list", "timed out".into()))?
                .map_err(|e| fail("prompts/list", e.to_string()))?;
        }
        if kinds.contains(&ListKind::Resources) && caps.resources.is_some() {
            listing.resources = tokio::time::timeout(limit, peer.list_all_resources())
                .await
                .map_err(|_| fail("resources/list", "timed out".into()))?
                .map_err(|e| fail("resources/list", e.to_string()))?;
            listing.templates = tokio::time::timeout(limit, peer.list_all_resource_templates())
                .await
                .map_err(|_| fail("resources/templates/list", "timed out".into()))?
                .map_err(|e| fail("resources/templates/list", e.to_string()))?;
        }
        if let Ok(mut l) = up.listing.write() {
            *l = Arc::new(listing);
        }
        if kinds.contains(&ListKind::Tools) {
            self.cache
                .invalidate_upstream(&up.config.name, "tools_changed");
        }
        Ok(())
    }

    /// Rebuilds the merged catalog from every upstream's listing.
    pub(crate) fn rebuild_snapshot(&self) {
        let namer = self.namer();
        let listings: Vec<(usize, String, Arc<UpstreamListing>)> = self
            .upstreams
            .iter()
            .filter(|u| u.config.enabled)
            .map(|u| (u.index, u.config.name.clone(), u.listing()))
            .collect();
        let (tool_routes, tool_issues) = Catalog::build(
            &namer,
            listings.iter().map(|(i, n, l)| {
                (
                    *i,
                    n.as_str(),
                    l.tools.iter().map(|t| t.name.as_ref()).collect(),
                )
            }),
            true,
        );
        let (prompt_routes, prompt_issues) = Catalog::build(
            &namer,
            listings.iter().map(|(i, n, l)| {
                (
                    *i,
                    n.as_str(),
                    l.prompts.iter().map(|p| p.name.as_str()).collect(),
                )
            }),
            false,
        );
        let (resource_routes, _) = Catalog::build(
            &Namer {
                prefixed: false,
                separator: String::new(),
            },
            listings.iter().map(|(i, n, l)| {
                (
                    *i,
                    n.as_str(),
                    l.resources.iter().map(|r| r.uri.as_str()).collect(),
                )
            }),
            false,
        );
        for issue in tool_issues.iter().chain(prompt_issues.iter()) {
            tracing::warn!(upstream = %issue.upstream, name = %issue.name, "{}", issue.reason);
        }
        let mut snap = Snapshot {
            tool_routes,
            prompt_routes,
            resource_routes,
            ..Default::default()
        };
        for (index, name, l) in &listings {
            let index = *index;
            for t in &l.tools {
                let exposed = namer.name(name, &t.name);
                if snap
                    .tool_routes
                    .resolve(&exposed)
                    .is_some_and(|r| r.original == t.name)
                {
                    let mut t = t.clone();
                    t.name = exposed.into();
                    snap.tools.push(t);
                    snap.owners.tools.push(index);
                }
            }
            for p in &l.prompts {
                let exposed = namer.name(name, &p.name);
                if snap
                    .prompt_routes
                    .resolve(&exposed)
                    .is_some_and(|r| r.original == p.name)
                {
                    let mut p = p.clone();
                    p.name = exposed;
                    snap.prompts.push(p);
                    snap.owners.prompts.push(index);
                }
            }
            for r in &l.resources {
                let mut r = r.clone();
                r.uri = namer.uri(name, &r.uri);
                snap.resources.push(r);
                snap.owners.resources.push(index);
            }
            for t in &l.templates {
                let mut t = t.clone();
                t.uri_template = namer.uri(name, &t.uri_template);
                snap.templates.push(t);
                snap.owners.templates.push(index);
            }
        }
        metrics::gauge!("gateway_catalog_tools").set(snap.tools.len() as f64);
        if let Ok(mut s) = self.snapshot.write() {
            *s = Arc::new(snap);
        }
    }

    async fn refresh_all(&self, kinds: &HashSet<ListKind>) {
        let tasks = self
            .upstreams
            .iter()
            .filter(|u| u.config.enabled)
            .map(|up| async move {
                match self.refresh_upstream(&up, kinds).await {
                    Ok(()) => up.set_status(UpstreamStatus::Up),
                    Err(e) => {
                        up.set_status(UpstreamStatus::Down(e));
                        *up.shared.lock().await = None;
                    }
                }
            });
        futures::future::join_all(tasks).await;
        self.rebuild_snapshot();
    }

    async fn refresh_loop(self: Arc<Self>, mut events: mpsc::Receiver<ListChanged>) {
        let all: HashSet<ListKind> =
            [ListKind::Tools, ListKind::Prompts, ListKind::Resources].into();
        self.refresh_all(&all).await;
        self.ready.store(true, Ordering::Release);
        tracing::info!(
            upstreams = self.upstreams.len(),
            tools = self.snapshot().tools.len(),
            "catalog ready"
        );
        loop {
            let first = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                e = events.recv() => match e { Some(e) => e, None => return },
            };
            // Debounce: upstreams often send several changes in a burst.
            let mut pending: Vec<ListChanged> = vec![first];
            let deadline = tokio::time::sleep(Duration::from_millis(50));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    _ = &mut deadline => break,
                    e = events.recv() => match e { Some(e) => pending.push(e), None => break },
                }
            }
            let upstreams: HashSet<usize> = pending.iter().map(|e| e.upstream).collect();
            let kinds: HashSet<ListKind> = pending.iter().map(|e| e.kind).collect();
            for idx in upstreams {
                if let Some(up) = self.upstreams.get(idx) {
                    match self.refresh_upstream(&up, &kinds).await {
                        Ok(()) => up.set_status(UpstreamStatus::Up),
                        Err(e) => up.set_status(UpstreamStatus::Down(e)),
                    }
                }
            }
            self.rebuild_snapshot();
            for kind in kinds {
                let _ = self.changes.send(kind);
            }
        }
    }

    /// Pings every upstream with a live shared connection every 10 s (one on
    /// 2026-07-28 gets `server/discover`, as it has no ping); one
    /// that does not answer within 5 s loses its connection, and
    /// [`Self::restart_loop`] reconnects it.
    async fn health_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            // All at once, so a slow upstream does not delay the others'
            // probes; one still connecting holds its slot and is skipped.
            let probes = self
                .upstreams
                .iter()
                .filter(|u| u.config.enabled)
                .filter_map(|up| {
                    let s = up.shared.try_lock().ok()?.clone()?;
                    (!s.conn.is_transport_closed()).then_some((up, s))
                })
                .map(|(up, s)| async move {
                    // 2026-07-28 has no ping; server/discover is the cheapest request there.
                    let probe = if crate::upstream::is_modern_connection(s.conn.peer()) {
                        rmcp::model::ClientRequest::DiscoverRequest(
                            rmcp::model::DiscoverRequest::new(Default::default()),
                        )
                    } else {
                        rmcp::model::ClientRequest::PingRequest(Default::default())
                    };
                    let ping = s.conn.peer().send_request(probe);
                    if matches!(
                        tokio::time::timeout(Duration::from_secs(5), ping).await,
                        Ok(Ok(_))
                    ) {
                        up.set_status(UpstreamStatus::Up);
                    } else {
                        up.set_status(UpstreamStatus::Down(
                            "did not answer a ping within 5 s".into(),
                        ));
                        let mut slot = up.shared.lock().await;
                        // Only the connection that failed: a reconnect may
                        // have replaced it meanwhile.
                        if slot.as_ref().is_some_and(|now| Arc::ptr_eq(now, &s)) {
                            *slot = None;
                        }
                    }
                });
            futures::future::join_all(probes).await;
        }
    }

    /// Reconnects (for stdio: restarts) every enabled upstream whose shared
    /// connection is gone, with exponential backoff and jitter between
    /// failed attempts (200 ms doubling to 30 s), so a crashing upstream is
    /// back quickly without being hammered, while the others keep serving.
    async fn restart_loop(self: Arc<Self>) {
        let backoff = meshgate_core::backoff::RetryPolicy {
            max_attempts: u32::MAX,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
        };
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !self.ready.load(Ordering::Acquire) {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
        }
        let all: HashSet<ListKind> =
            [ListKind::Tools, ListKind::Prompts, ListKind::Resources].into();
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            for up in self.upstreams.iter().filter(|u| u.config.enabled) {
                // A connect in progress holds the slot: leave it to finish.
                let Ok(mut slot) = up.shared.try_lock() else {
                    continue;
                };
                let live = match slot.as_ref() {
                    Some(s) if !s.conn.is_transport_closed() => true,
                    Some(_) => {
                        let why = if up.config.transport == meshgate_core::UpstreamTransport::Stdio
                        {
                            "the process exited or closed its stdout"
                        } else {
                            "the connection closed"
                        };
                        up.set_status(UpstreamStatus::Down(why.into()));
                        *slot = None;
                        false
                    }
                    None => false,
                };
                drop(slot);
                if live {
                    if !up.workers.is_empty() && !up.starting_workers.swap(true, Ordering::AcqRel) {
                        let gw = self.clone();
                        let up = up.clone();
                        tokio::spawn(async move {
                            gw.start_workers(&up).await;
                            up.starting_workers.store(false, Ordering::Release);
                        });
                    }
                    continue;
                }
                let due = up
                    .restart
                    .lock()
                    .map(|r| mono_now() >= r.next_at)
                    .unwrap_or(true);
                // Each reconnect runs in its own task, so an upstream that
                // hangs until its connect timeout delays no other.
                if !due || up.reconnecting.swap(true, Ordering::AcqRel) {
                    continue;
                }
                let gw = self.clone();
                let all = all.clone();
                tokio::spawn(async move {
                    // Cleared however the task ends, a panic included, so
                    // the upstream is never left without reconnects.
                    let _flag = ReconnectFlag(up.clone());
                    gw.reconnect(&up, &all, &backoff).await;
                });
            }
        }
    }

    /// One reconnect attempt of `up`'s shared connection (and its
    /// listings); on failure the next is scheduled after `backoff`.
    async fn reconnect(
        &self,
        up: &Arc<Upstream>,
        all: &HashSet<ListKind>,
        backoff: &meshgate_core::backoff::RetryPolicy,
    ) {
        match self.refresh_upstream(up, all).await {
            Ok(()) => {
                let restarts = up
                    .restart
                    .lock()
                    .map(|mut r| {
                        r.attempts = 0;
                        r.restarts += 1;
                        r.restarts
                    })
                    .unwrap_or(0);
                metrics::counter!("gateway_upstream_restarts_total", "upstream" => up.config.name.clone()).increment(1);
                tracing::info!(upstream = %up.config.name, restarts, "upstream reconnected");
                up.set_status(UpstreamStatus::Up);
                self.rebuild_snapshot();
                for kind in all {
                    let _ = self.changes.send(*kind);
                }
            }
            Err(e) => {
                *up.shared.lock().await = None;
                let wait = if let Ok(mut r) = up.restart.lock() {
                    r.attempts = r.attempts.saturating_add(1);
                    let ceiling = backoff.ceiling(r.attempts);
                    let wait = ceiling / 2 + backoff.jittered(r.attempts, unit_random()) / 2;
                    r.next_at = mono_now() + wait;
                    wait
                } else {
                    Duration::from_secs(1)
                };
                if up.retired.is_cancelled() {
                    return;
                }
                tracing::warn!(upstream = %up.config.name, error = %e, retry_in_ms = wait.as_millis() as u64, "upstream reconnect failed");
                up.set_status(UpstreamStatus::Down(e));
            }
        }
    }

    /// Starts the missing extra processes of a stdio upstream whose shared
    /// connection is up, each with its own backoff after failures.
    async fn start_workers(&self, up: &Arc<Upstream>) {
        for (i, slot) in up.workers.iter().enumerate() {
            let mut w = slot.lock().await;
            if w.conn
                .as_ref()
                .is_some_and(|c| !c.conn.is_transport_closed())
            {
                continue;
            }
            if w.conn.take().is_some() {
                tracing::warn!(upstream = %up.config.name, process = i + 1, "pooled process exited; restarting it");
                metrics::counter!("gateway_upstream_restarts_total", "upstream" => up.config.name.clone()).increment(1);
            }
            if mono_now() < w.next_at {
                continue;
            }
            match self.open_shared(up, Arc::new(InFlight::default())).await {
                Ok(conn) => {
                    w.conn = Some(conn);
                    w.attempts = 0;
                }
                Err(e) => {
                    w.attempts = w.attempts.saturating_add(1);
                    let backoff = meshgate_core::backoff::RetryPolicy {
                        max_attempts: u32::MAX,
                        initial_backoff: Duration::from_millis(200),
                        max_backoff: Duration::from_secs(30),
                    };
                    let wait = backoff.ceiling(w.attempts) / 2
                        + backoff.jittered(w.attempts, unit_random()) / 2;
                    w.next_at = mono_now() + wait;
                    tracing::warn!(upstream = %up.config.name, process = i + 1, error = %e, retry_in_ms = wait.as_millis() as u64, "could not start a pooled process");
                }
            }
        }
    }

    /// Every second, cancels the calls of 2026-07-28 clients that waited
    /// for input too long, and all of them once the gateway drains (their
    /// retries would be refused, and they would hold the drain up).
    async fn parked_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => {
                    self.parked.prune(true);
                    return;
                }
                _ = tick.tick() => {}
            }
            let dropped = self.parked.prune(self.inflight.is_draining());
            if dropped > 0 {
                tracing::info!(dropped, "cancelled calls that waited for client input");
            }
        }
    }

    /// Closes every upstream connection at shutdown: the shared ones, the
    /// extra processes of `pool.processes` and every session's own, so
    /// each stdio child gets EOF on its stdin and is killed if it has not
    /// exited 2 s later. Waits at most `limit` for the children to be gone;
    /// returns how many were left.
    pub async fn close_all_upstreams(&self, limit: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + limit;
        // A connection being opened holds its slot's lock until it is done
        // (up to connect_timeout_secs); retiring cancels it as it completes,
        // so do not wait for it here beyond the limit.
        let closing = async {
            for up in self.upstreams.iter() {
                up.retire().await;
            }
            for client in self.clients.live() {
                for (_, c) in client.conns.lock().await.drain() {
                    c.conn.cancellation_token().cancel();
                }
            }
        };
        let _ = tokio::time::timeout_at(deadline, closing).await;
        crate::upstream::wait_for_children(
            deadline.saturating_duration_since(tokio::time::Instant::now()),
        )
        .await
    }

    /// Successful reconnects of `up` since start.
    pub fn restarts(&self, up: &Upstream) -> u64 {
        up.restart.lock().map(|r| r.restarts).unwrap_or(0)
    }

    /// Closes per-session upstream connections idle longer than their
    /// upstream's `pool.idle_timeout_secs`. It looks every half of the
    /// shortest per-session timeout, but at most every 30 s and at least
    /// every second, so a connection lives at most half its timeout longer.
    async fn idle_loop(self: Arc<Self>) {
        loop {
            let every = idle_sweep_interval(
                self.upstreams
                    .iter()
                    .filter(|u| u.per_session())
                    .map(|u| u.config.pool.idle_timeout_secs),
            );
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let closed = self
                .clients
                .close_idle_upstream_connections(&self, None, |_| true)
                .await;
            if closed > 0 {
                tracing::info!(closed, "closed idle per-session upstream connections");
            }
        }
    }

    /// Marks an upstream up again after a call it answered (a failed call
    /// on a per-session connection marks it down; nothing else would).
    pub fn report_success(&self, up: &Upstream) {
        if matches!(up.status().0, UpstreamStatus::Down(_)) {
            up.set_status(UpstreamStatus::Up);
        }
    }

    /// Marks an upstream down after a failed call; a later answered call or
    /// health check marks it up again.
    pub fn report_failure(&self, up: &Upstream, error: &str) {
        up.set_status(UpstreamStatus::Down(error.to_owned()));
    }
}

/// Clears an upstream's `reconnecting` flag when its reconnect task ends.
struct ReconnectFlag(Arc<Upstream>);

impl Drop for ReconnectFlag {
    fn drop(&mut self) {
        self.0.reconnecting.store(false, Ordering::Release);
    }
}

/// How often the idle sweep runs: half the shortest of `timeouts` (seconds),
/// between 1 s and 30 s; 30 s when there are none.
fn idle_sweep_interval(timeouts: impl Iterator<Item = u64>) -> Duration {
    let shortest = timeouts.min().unwrap_or(60);
    Duration::from_millis(shortest.saturating_mul(500))
        .clamp(Duration::from_secs(1), Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn the_idle_sweep_runs_every_half_of_the_shortest_timeout_within_1_to_30_s() {
        use super::idle_sweep_interval as every;
        assert_eq!(every([].into_iter()), Duration::from_secs(30));
        assert_eq!(every([300, 10].into_iter()), Duration::from_secs(5));
        assert_eq!(every([3].into_iter()), Duration::from_millis(1500));
        assert_eq!(every([1].into_iter()), Duration::from_secs(1));
        assert_eq!(every([600].into_iter()), Duration::from_secs(30));
        assert_eq!(every([u64::MAX].into_iter()), Duration::from_secs(30));
    }
}
