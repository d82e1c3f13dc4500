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
use rmcp::model::{Prompt, Resource, ResourceTemplate, ServerCapabilities, Tool};
use rmcp::service::Peer;
use tokio::sync::{Mutex as AsyncMutex, broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::upstream::{
    InFlight, ListChanged, ListKind, ProgressMap, RelayTarget, UpstreamConnection, UpstreamRelay,
    UpstreamStatus, connect, unix_now,
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
}

/// One configured upstream.
pub struct Upstream {
    /// Position in the configuration; the catalog routes by it.
    pub index: usize,
    /// Its configuration.
    pub config: UpstreamConfig,
    status: RwLock<(UpstreamStatus, u64)>,
    shared: AsyncMutex<Option<Arc<SharedConn>>>,
    /// Calls in flight on the shared connection.
    pub inflight: Arc<InFlight>,
    listing: RwLock<Arc<UpstreamListing>>,
}

impl Upstream {
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

    /// Whether calls go over one connection per client session (Streamable HTTP)
    /// or over the shared connection (stdio: one child process serves everyone).
    pub fn per_session(&self) -> bool {
        self.config.transport == meshgate_core::UpstreamTransport::StreamableHttp
    }

    /// The shared connection, if up.
    pub async fn shared(&self) -> Option<Arc<SharedConn>> {
        self.shared.lock().await.clone()
    }
}

/// HTTP clients for upstream connections, built on first use. The plain-HTTP
/// client skips TLS root loading, which costs about 100 ms at start-up (OpenSSL
/// reads the system CA bundle); the TLS client is built only when an
/// `https://` upstream is first connected.
#[derive(Default)]
pub struct HttpClients {
    plain: OnceLock<reqwest::Client>,
    tls: OnceLock<reqwest::Client>,
}

impl HttpClients {
    /// The client for `url`, building it if needed.
    pub fn for_url(&self, url: &str) -> Result<reqwest::Client, String> {
        let tls = url.starts_with("https://");
        let cell = if tls { &self.tls } else { &self.plain };
        if let Some(c) = cell.get() {
            return Ok(c.clone());
        }
        let builder = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true);
        let builder = if tls {
            builder
        } else {
            builder.tls_certs_only(Vec::new())
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

/// The gateway: configuration, store, upstreams and catalog.
pub struct Gateway {
    /// Validated configuration.
    pub config: Config,
    /// Persistence.
    pub store: Arc<dyn Store>,
    /// Upstreams in configuration order (disabled ones included, marked so).
    pub upstreams: Vec<Arc<Upstream>>,
    /// Naming rules resolved for this configuration.
    pub namer: Arc<Namer>,
    snapshot: RwLock<Arc<Snapshot>>,
    changes: broadcast::Sender<ListKind>,
    events: mpsc::Sender<ListChanged>,
    /// HTTP clients shared by all Streamable HTTP upstream connections.
    pub http: HttpClients,
    ready: AtomicBool,
    /// Process start, for uptime.
    pub started: Instant,
    /// Cancelled on shutdown.
    pub shutdown: CancellationToken,
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
        let enabled = config.upstreams.iter().filter(|u| u.enabled).count();
        let namer = Arc::new(Namer::new(
            config.namespacing.prefix_mode,
            &config.namespacing.separator,
            enabled,
        ));
        let upstreams = config
            .upstreams
            .iter()
            .enumerate()
            .map(|(index, cfg)| {
                Arc::new(Upstream {
                    index,
                    config: cfg.clone(),
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
                })
            })
            .collect();
        let http = HttpClients::default();
        let (events, events_rx) = mpsc::channel(256);
        let (changes, _) = broadcast::channel(64);
        let gw = Arc::new(Gateway {
            config,
            store,
            upstreams,
            namer,
            snapshot: RwLock::new(Arc::default()),
            changes,
            events,
            http,
            ready: AtomicBool::new(false),
            started: Instant::now(),
            shutdown,
        });
        tokio::spawn(gw.clone().refresh_loop(events_rx));
        tokio::spawn(gw.clone().health_loop());
        Ok(gw)
    }

    /// True once every enabled upstream has been tried and while not shutting down.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.shutdown.is_cancelled()
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
    pub fn upstream_named(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|u| u.config.name == name)
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
        let (relay, progress) = UpstreamRelay::new(
            up.index,
            &up.config.name,
            self.namer.clone(),
            RelayTarget::Shared(up.inflight.clone()),
            None,
            self.events.clone(),
        );
        match connect(&up.config, relay, &self.http).await {
            Ok(conn) => {
                let capabilities = conn
                    .peer_info()
                    .map(|i| i.capabilities.clone())
                    .unwrap_or_default();
                let shared = Arc::new(SharedConn {
                    conn,
                    progress,
                    capabilities,
                });
                *slot = Some(shared.clone());
                Ok(shared)
            }
            Err(e) => Err(e.to_string()),
        }
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
        Ok(())
    }

    /// Rebuilds the merged catalog from every upstream's listing.
    fn rebuild_snapshot(&self) {
        let listings: Vec<(usize, String, Arc<UpstreamListing>)> = self
            .upstreams
            .iter()
            .filter(|u| u.config.enabled)
            .map(|u| (u.index, u.config.name.clone(), u.listing()))
            .collect();
        let (tool_routes, tool_issues) = Catalog::build(
            &self.namer,
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
            &self.namer,
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
                let exposed = self.namer.name(name, &t.name);
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
                let exposed = self.namer.name(name, &p.name);
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
                r.uri = self.namer.uri(name, &r.uri);
                snap.resources.push(r);
                snap.owners.resources.push(index);
            }
            for t in &l.templates {
                let mut t = t.clone();
                t.uri_template = self.namer.uri(name, &t.uri_template);
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
                match self.refresh_upstream(up, kinds).await {
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
                    match self.refresh_upstream(up, &kinds).await {
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

    async fn health_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            for up in self.upstreams.iter().filter(|u| u.config.enabled) {
                let shared = up.shared().await;
                let healthy =
                    match shared {
                        Some(s) if !s.conn.is_transport_closed() => {
                            let ping = s.conn.peer().send_request(
                                rmcp::model::ClientRequest::PingRequest(Default::default()),
                            );
                            matches!(
                                tokio::time::timeout(Duration::from_secs(5), ping).await,
                                Ok(Ok(_))
                            )
                        }
                        _ => false,
                    };
                if healthy {
                    up.set_status(UpstreamStatus::Up);
                    continue;
                }
                *up.shared.lock().await = None;
                let all: HashSet<ListKind> =
                    [ListKind::Tools, ListKind::Prompts, ListKind::Resources].into();
                match self.refresh_upstream(up, &all).await {
                    Ok(()) => {
                        up.set_status(UpstreamStatus::Up);
                        self.rebuild_snapshot();
                        for kind in all {
                            let _ = self.changes.send(kind);
                        }
                    }
                    Err(e) => up.set_status(UpstreamStatus::Down(e)),
                }
            }
        }
    }

    /// Marks an upstream down after a failed call (the health loop reconnects it).
    pub fn report_failure(&self, up: &Upstream, error: &str) {
        up.set_status(UpstreamStatus::Down(error.to_owned()));
    }
}
