//! The registry of open client sessions: what `/mcp/stats`,
//! `/mcp/health/client/{id}` and `/mcp/admin/cleanup` report and act on, and
//! the per-session upstream connections the idle reaper closes.
//!
//! Each session's handler owns an `Arc<ClientEntry>`; the registry keeps
//! only weak references, so a session that ends disappears from it without
//! bookkeeping (dead entries are pruned on every listing).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use rmcp::model::ProtocolVersion;
use serde_json::{Value, json};
use tokio::sync::Mutex as AsyncMutex;
use tokio_util::sync::CancellationToken;

use crate::gateway::Gateway;
use crate::outbox::Outbox;
use crate::resilience::mono_now;
use crate::upstream::{ProgressMap, UpstreamConnection};

static NEXT_CLIENT: AtomicU64 = AtomicU64::new(1);
static TOTAL_REQUESTS: AtomicU64 = AtomicU64::new(0);
static TOTAL_ERRORS: AtomicU64 = AtomicU64::new(0);

/// Requests and failed requests of every session since start.
pub fn totals() -> (u64, u64) {
    (
        TOTAL_REQUESTS.load(Ordering::Relaxed),
        TOTAL_ERRORS.load(Ordering::Relaxed),
    )
}

/// Put into an `initialize` request's extensions by the HTTP layer; the
/// handler leaves its session entry there, so the layer can name the entry
/// with the `Mcp-Session-Id` of the answer before the client sees it.
#[derive(Clone, Default)]
pub struct SessionSlot(pub Arc<Mutex<Option<Arc<ClientEntry>>>>);

impl SessionSlot {
    /// Names the entry left here with the session id the client sees
    /// (`public`) and the transport's own id for it (`inner`).
    pub fn bind(&self, public: &str, inner: &str) {
        if let Ok(slot) = self.0.lock()
            && let Some(entry) = slot.as_ref()
        {
            let _ = entry.session_id.set(public.to_owned());
            let _ = entry.transport_session_id.set(inner.to_owned());
        }
    }
}

/// The `Mcp-Session-Id` a Streamable HTTP client presented (the sealed id),
/// left in the request's extensions by the `/mcp` pre-check, which hands the
/// transport the inner id.
#[derive(Clone, Debug)]
pub struct PublicSessionId(pub String);

/// A connection to an upstream owned by one client session.
pub struct SessionConn {
    /// The connection.
    pub conn: UpstreamConnection,
    /// Progress routing of calls made on it.
    pub progress: ProgressMap,
    /// Last use (monotonic, ms).
    pub last_used: AtomicU64,
    /// SHA-256 of the client `Authorization` it forwards
    /// (`forward_authorization`), to reconnect when the client's changes.
    pub credential: Option<[u8; 32]>,
}

impl SessionConn {
    /// Marks the connection used now.
    pub fn touch(&self) {
        self.last_used
            .store(mono_now().as_millis() as u64, Ordering::Relaxed);
    }
}

/// Who opened a session.
#[derive(Debug, Clone)]
pub struct Owner {
    /// Tenant.
    pub tenant: String,
    /// Subject.
    pub subject: String,
}

/// One open client session.
pub struct ClientEntry {
    /// Gateway-assigned id, `c-<n>`.
    pub id: String,
    /// `streamable_http` or `sse`.
    pub transport: &'static str,
    created: Instant,
    created_unix: u64,
    last_active_ms: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
    /// The session id the client uses (`Mcp-Session-Id`, or the SSE `sessionId`).
    pub session_id: OnceLock<String>,
    /// The transport's own id for the session when it differs from
    /// `session_id` (Streamable HTTP: the id inside the sealed one).
    pub transport_session_id: OnceLock<String>,
    /// Who opened it.
    pub owner: OnceLock<Owner>,
    /// Negotiated revision and client name.
    pub client: OnceLock<(ProtocolVersion, String)>,
    /// Its outbound notification queue, once initialized.
    pub outbox: OnceLock<Arc<Outbox>>,
    /// Cancels the session (transports that own their session task).
    pub closer: OnceLock<CancellationToken>,
    /// Its own upstream connections, by upstream index.
    pub conns: AsyncMutex<HashMap<usize, Arc<SessionConn>>>,
}

impl ClientEntry {
    /// A new entry for a session over `transport`.
    pub fn new(transport: &'static str) -> ClientEntry {
        ClientEntry {
            id: format!("c-{}", NEXT_CLIENT.fetch_add(1, Ordering::Relaxed)),
            transport,
            created: Instant::now(),
            created_unix: crate::upstream::unix_now(),
            last_active_ms: AtomicU64::new(mono_now().as_millis() as u64),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            session_id: OnceLock::new(),
            transport_session_id: OnceLock::new(),
            owner: OnceLock::new(),
            client: OnceLock::new(),
            outbox: OnceLock::new(),
            closer: OnceLock::new(),
            conns: AsyncMutex::new(HashMap::new()),
        }
    }

    /// Records a request (`true`, on arrival) or the failure of one (`false`).
    pub fn record(&self, ok: bool) {
        if ok {
            self.requests.fetch_add(1, Ordering::Relaxed);
            TOTAL_REQUESTS.fetch_add(1, Ordering::Relaxed);
        } else {
            self.errors.fetch_add(1, Ordering::Relaxed);
            TOTAL_ERRORS.fetch_add(1, Ordering::Relaxed);
        }
        self.touch();
    }

    /// Marks the session active now.
    pub fn touch(&self) {
        self.last_active_ms
            .store(mono_now().as_millis() as u64, Ordering::Relaxed);
    }

    /// Time since the last request.
    pub fn idle(&self) -> Duration {
        let last = Duration::from_millis(self.last_active_ms.load(Ordering::Relaxed));
        mono_now().saturating_sub(last)
    }

    /// Age of the session.
    pub fn age(&self) -> Duration {
        self.created.elapsed()
    }

    /// Whether `id` names this session (gateway id or transport session id).
    pub fn is(&self, id: &str) -> bool {
        self.id == id || self.session_id.get().is_some_and(|s| s == id)
    }

    /// Requests and failed requests so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }

    /// The session as the admin API shows it.
    pub async fn to_json(&self, gw: &Gateway) -> Value {
        let (requests, errors) = self.counts();
        let conns = self.conns.lock().await;
        let now = mono_now().as_millis() as u64;
        let upstreams: Vec<Value> = conns
            .iter()
            .map(|(idx, c)| {
                json!({
                    "upstream": gw.upstreams.get(*idx).map(|u| u.config.name.clone()),
                    "open": !c.conn.is_transport_closed(),
                    "idle_secs": now.saturating_sub(c.last_used.load(Ordering::Relaxed)) / 1000,
                })
            })
            .collect();
        drop(conns);
        let queue = self.outbox.get().map(|o| o.stats());
        let healthy = queue
            .as_ref()
            .is_none_or(|q| q.grade == crate::outbox::Grade::Normal);
        json!({
            "client_id": self.id,
            "session_id": self.session_id.get(),
            "transport": self.transport,
            "status": if healthy { "ok" } else { "degraded" },
            "tenant": self.owner.get().map(|o| o.tenant.clone()),
            "subject": self.owner.get().map(|o| o.subject.clone()),
            "protocol_version": self.client.get().map(|c| c.0.to_string()),
            "client_name": self.client.get().map(|c| c.1.clone()),
            "connected_at_unix": self.created_unix,
            "age_secs": self.age().as_secs(),
            "idle_secs": self.idle().as_secs(),
            "requests": requests,
            "errors": errors,
            "error_rate": if requests == 0 { 0.0 } else { errors as f64 / requests as f64 },
            "outbound_queue": queue,
            "upstream_connections": upstreams,
        })
    }
}

/// Every open client session.
#[derive(Default)]
pub struct Clients {
    all: Mutex<HashMap<String, Weak<ClientEntry>>>,
}

impl Clients {
    /// Adds a session.
    pub fn register(&self, entry: &Arc<ClientEntry>) {
        if let Ok(mut m) = self.all.lock() {
            m.insert(entry.id.clone(), Arc::downgrade(entry));
        }
    }

    /// Removes a session.
    pub fn unregister(&self, id: &str) {
        if let Ok(mut m) = self.all.lock() {
            m.remove(id);
        }
    }

    /// The live sessions (dead ones are pruned).
    pub fn live(&self) -> Vec<Arc<ClientEntry>> {
        let Ok(mut m) = self.all.lock() else {
            return Vec::new();
        };
        m.retain(|_, w| w.strong_count() > 0);
        m.values().filter_map(Weak::upgrade).collect()
    }

    /// The session named `id` (gateway id or transport session id).
    pub fn find(&self, id: &str) -> Option<Arc<ClientEntry>> {
        self.live().into_iter().find(|c| c.is(id))
    }

    /// Closes per-session upstream connections of the sessions `of` picks
    /// that were unused for longer than `max_idle` (or, when `None`, their
    /// upstream's `pool.idle_timeout_secs`).
    /// Returns how many were closed.
    pub async fn close_idle_upstream_connections(
        &self,
        gw: &Gateway,
        max_idle: Option<Duration>,
        of: impl Fn(&ClientEntry) -> bool,
    ) -> usize {
        let now = mono_now().as_millis() as u64;
        let mut closed = 0;
        for client in self.live().into_iter().filter(|c| of(c)) {
            let mut conns = client.conns.lock().await;
            let before = conns.len();
            conns.retain(|idx, c| {
                // A removed upstream's connections go at once.
                let limit = max_idle.unwrap_or_else(|| {
                    Duration::from_secs(
                        gw.upstreams
                            .get(*idx)
                            .map(|u| u.config.pool.idle_timeout_secs)
                            .unwrap_or(0),
                    )
                });
                let idle = now.saturating_sub(c.last_used.load(Ordering::Relaxed));
                let keep = !c.conn.is_transport_closed() && u128::from(idle) < limit.as_millis();
                if !keep {
                    c.conn.cancellation_token().cancel();
                }
                keep
            });
            closed += before - conns.len();
        }
        closed
    }
}

impl Clients {
    /// Closes every session's own connection to upstream `index` (the
    /// upstream was removed or replaced); returns how many.
    pub async fn drop_upstream_connections(&self, index: usize) -> usize {
        let mut closed = 0;
        for client in self.live() {
            if let Some(c) = client.conns.lock().await.remove(&index) {
                c.conn.cancellation_token().cancel();
                closed += 1;
            }
        }
        closed
    }
}
