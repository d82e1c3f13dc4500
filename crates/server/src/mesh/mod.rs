//! The agent mesh at run time: live agents, the task queue, the dispatcher
//! that routes pending tasks to agents, and the group-commit writer that
//! stores every transition before anyone hears of it.
//!
//! All state sits behind one mutex, held only for in-memory work (never
//! across an await). Each operation computes the rows to store and the
//! messages to send; [`writer`] commits the rows in one transaction with
//! whatever else is queued, then sends the messages in order.

pub mod api;
pub mod shared;
mod state;
pub mod tools;
mod writer;
pub mod ws;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use meshgate_core::Principal;
use meshgate_core::auth::scope;
use meshgate_core::config::MeshConfig;
use meshgate_core::mesh::{Registration, Submission, Task, TaskState};
use meshgate_store::{MeshStore, TaskQuery};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{Notify, broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub use state::AgentView;
use state::State;
use writer::{After, Batch, Writer};

/// Agent error codes (JSON-RPC `error.code`), as in `docs/agent-protocol.md`.
pub mod code {
    /// Not JSON, not JSON-RPC, or out of order.
    pub const INVALID_MESSAGE: i32 = 4000;
    /// Authentication failed.
    pub const AUTH_FAILED: i32 = 4001;
    /// Too many messages.
    pub const RATE_LIMITED: i32 = 4002;
    /// The gateway failed.
    pub const SERVER_ERROR: i32 = 4003;
    /// Unknown method.
    pub const METHOD_NOT_FOUND: i32 = 4004;
    /// A parameter is missing or wrong.
    pub const INVALID_PARAMS: i32 = 4005;
    /// The task was cancelled.
    pub const CANCELLED: i32 = 4006;
    /// A message or result is too large.
    pub const TOO_LARGE: i32 = 4007;
    /// Conflicting state: duplicate agent, task not assigned to the caller.
    pub const CONFLICT: i32 = 4008;
    /// A binary frame that could not be decoded.
    pub const BAD_FRAME: i32 = 4009;
}

/// A refused mesh operation: an agent error code, an HTTP status for the
/// REST API, and a message that says what to do.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshError {
    /// Agent error code (4000–4008).
    pub code: i32,
    /// HTTP status for the REST API.
    pub status: u16,
    /// What was wrong and what to do.
    pub message: String,
    /// Details (`field`, `task_id`, …).
    pub data: Value,
}

impl MeshError {
    fn new(code: i32, status: u16, message: impl Into<String>, data: Value) -> MeshError {
        MeshError {
            code,
            status,
            message: message.into(),
            data,
        }
    }
    /// A wrong parameter, named.
    pub fn invalid(field: &str, message: impl Into<String>) -> MeshError {
        let message = message.into();
        MeshError::new(
            code::INVALID_PARAMS,
            400,
            format!("invalid `{field}`: {message}"),
            json!({"field": field}),
        )
    }
    /// A conflict.
    pub fn conflict(message: impl Into<String>, data: Value) -> MeshError {
        MeshError::new(code::CONFLICT, 409, message, data)
    }
    /// Nothing of that id visible to the caller.
    pub fn not_found(what: &str, id: &str) -> MeshError {
        MeshError::new(
            code::INVALID_PARAMS,
            404,
            format!("no {what} `{id}` in your tenant"),
            json!({"id": id}),
        )
    }
    /// The store failed.
    pub fn store(e: impl std::fmt::Display) -> MeshError {
        MeshError::new(
            code::SERVER_ERROR,
            503,
            format!("the task store failed: {e}; retry later"),
            Value::Null,
        )
    }
    /// The error object of a JSON-RPC answer.
    pub fn to_rpc(&self) -> Value {
        let mut e = json!({"code": self.code, "message": self.message});
        if !self.data.is_null() {
            e["data"] = self.data.clone();
        }
        e
    }
}

/// Something that happened to a task, for SSE streams and waiting callers.
#[derive(Debug, Clone, Serialize)]
pub struct TaskUpdate {
    /// The task.
    pub task_id: String,
    /// Its tenant.
    pub tenant: String,
    /// `state` or `progress`.
    pub kind: &'static str,
    /// The state after the update.
    pub state: TaskState,
    /// Progress 0..=1 (progress updates).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<f64>,
    /// Progress message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The whole task (state updates).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<Task>,
}

/// What the gateway sends down an agent's connection.
#[derive(Debug)]
pub enum Outbound {
    /// One JSON-RPC message (in a text or a binary frame, by the
    /// connection's mode).
    Text(String),
    /// From here on, send messages this way.
    Mode(ws::WireMode),
    /// A binary frame as it is (a pong frame).
    Frame(Vec<u8>),
    /// A WebSocket ping.
    Ping,
    /// Close the connection with this code and reason.
    Close(u16, String),
}

/// The sending half of an agent connection.
pub type AgentTx = mpsc::UnboundedSender<Outbound>;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The mesh: shared by the agent endpoint, the REST API and the MCP tools.
pub struct Mesh {
    /// Settings.
    pub cfg: MeshConfig,
    store: Arc<dyn MeshStore>,
    state: Mutex<State>,
    writer: Writer,
    events: broadcast::Sender<Arc<TaskUpdate>>,
    wake: Arc<Notify>,
    next_conn: AtomicU64,
    next_request: AtomicU64,
    /// Cancelled when the gateway shuts down.
    pub shutdown: CancellationToken,
    /// Authentication, to re-check a connected agent's key (set at start-up
    /// when auth is on).
    pub auth: std::sync::OnceLock<Arc<crate::auth::Auth>>,
    /// Shared CRDT documents.
    pub shared: shared::SharedState,
}

enum Prepared {
    New(Task),
    Existing(Task),
}

/// Whom an operation is for: a tenant, or every tenant.
fn reach(p: &Principal) -> Option<&str> {
    (!p.has_scope(scope::ALL_TENANTS)).then_some(p.tenant.as_str())
}

impl Mesh {
    /// Loads open tasks and starts the writer, dispatcher and timers.
    pub async fn start(
        cfg: MeshConfig,
        store: Arc<dyn MeshStore>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Mesh>> {
        let open = store.open_tasks().await?;
        let keys = store.idempotency_keys().await?;
        let now = now_ms();
        let (events, _) = broadcast::channel(8192);
        let mut state = State::new(cfg.clone(), events.clone());
        let recovered = state.recover(open, keys, now);
        if recovered.tasks > 0 {
            tracing::info!(
                pending = recovered.pending,
                held = recovered.held,
                agents = recovered.agents,
                "mesh: recovered {} open task(s); tasks of agents not yet back wait {} s for them",
                recovered.tasks,
                cfg.reconnect_grace_secs
            );
        }
        let wake = Arc::new(Notify::new());
        let shared = shared::SharedState::open(store.clone(), &cfg).await?;
        let writer = Writer::start(store.clone(), events.clone(), wake.clone());
        let mesh = Arc::new(Mesh {
            cfg,
            store,
            state: Mutex::new(state),
            writer,
            events,
            wake,
            next_conn: AtomicU64::new(1),
            next_request: AtomicU64::new(1),
            shutdown,
            auth: std::sync::OnceLock::new(),
            shared,
        });
        tokio::spawn(mesh.clone().dispatch_loop());
        tokio::spawn(mesh.clone().housekeeping_loop());
        Ok(mesh)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a batch for the writer and returns what tells when it is
    /// stored. Call it while holding the state lock, so that batches reach
    /// the writer in the order their changes were made.
    fn submit_batch(&self, batch: Batch) -> oneshot::Receiver<Result<(), String>> {
        let (tx, rx) = oneshot::channel();
        self.writer.submit(batch, Some(tx));
        rx
    }

    /// Waits until a batch queued by [`Mesh::submit_batch`] is stored.
    async fn stored(rx: oneshot::Receiver<Result<(), String>>) -> Result<(), MeshError> {
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(MeshError::store(e)),
            Err(_) => Err(MeshError::store("the writer stopped")),
        }
    }

    /// Queues a batch without waiting (its messages still wait for the
    /// commit). Call it while holding the state lock.
    fn enqueue(&self, batch: Batch) {
        if !batch.is_empty() {
            self.writer.submit(batch, None);
        }
    }

    /// Subscribes to task updates.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<TaskUpdate>> {
        self.events.subscribe()
    }

    // ----- submitters -----

    /// Submits a task. Returns the task and whether it already existed under
    /// the same idempotency key (then nothing new was created).
    pub async fn submit(&self, p: &Principal, body: &Value) -> Result<(Task, bool), MeshError> {
        self.submit_many(p, std::slice::from_ref(body))
            .await
            .pop()
            .unwrap_or_else(|| Err(MeshError::store("no answer for the submission")))
    }

    /// Submits several tasks, stored in one transaction. Each gets its own
    /// answer, in order: the task and whether it already existed under its
    /// idempotency key, or what was wrong with it.
    pub async fn submit_many(
        &self,
        p: &Principal,
        bodies: &[Value],
    ) -> Vec<Result<(Task, bool), MeshError>> {
        let now = now_ms();
        let mut out: Vec<Option<Result<(Task, bool), MeshError>>> =
            Vec::with_capacity(bodies.len());
        let mut fresh: Vec<(usize, Task)> = Vec::new();
        for (i, body) in bodies.iter().enumerate() {
            match self.prepare(p, body, now).await {
                Ok(Prepared::Existing(t)) => out.push(Some(Ok((t, true)))),
                Ok(Prepared::New(t)) => {
                    out.push(None);
                    fresh.push((i, t));
                }
                Err(e) => out.push(Some(Err(e))),
            }
        }
        let mut batch = Batch::default();
        let mut created: Vec<(usize, Task)> = Vec::new();
        let mut taken: Vec<(usize, String)> = Vec::new();
        let (ack, stored) = oneshot::channel();
        {
            let mut st = self.lock();
            for (i, t) in fresh {
                match st.submit(t) {
                    Ok(t) => created.push((i, t)),
                    Err(existing) => taken.push((i, existing)),
                }
            }
            // Assigned in the same commit when an agent is free: one row
            // per task, one wait for the disk.
            batch.extend(st.dispatch(now));
            created = st.rows_of_new(created, &mut batch);
            // Queued under the lock, even when empty: behind the job of any
            // task this call replays from memory, so that no replay names a
            // task before it is stored (the writer commits jobs in order).
            self.writer.submit(batch, Some(ack));
        }
        let committed = match stored.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(MeshError::store(e)),
            Err(_) => Err(MeshError::store("the writer stopped")),
        };
        if let Err(e) = &committed {
            for o in out.iter_mut().filter(|o| matches!(o, Some(Ok((_, true))))) {
                *o = Some(Err(e.clone()));
            }
        }
        for (i, t) in created {
            out[i] = Some(match &committed {
                Ok(()) => {
                    metrics::counter!("agent_tasks_submitted_total", "task_type" => t.task_type.clone())
                        .increment(1);
                    Ok((t, false))
                }
                Err(e) => Err(e.clone()),
            });
        }
        for (i, id) in taken {
            out[i] = Some(match &committed {
                Ok(()) => self.get(p, &id).await.map(|t| (t, true)),
                Err(e) => Err(e.clone()),
            });
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(MeshError::store("no answer for the submission"))))
            .collect()
    }

    async fn prepare(&self, p: &Principal, body: &Value, now: i64) -> Result<Prepared, MeshError> {
        let sub = Submission::parse(body, &self.cfg)
            .map_err(|e| MeshError::invalid(&e.field, e.message))?;
        let tenant = match &sub.tenant {
            Some(t) if *t != p.tenant => {
                if !p.has_scope(scope::ALL_TENANTS) {
                    return Err(MeshError::new(
                        code::AUTH_FAILED,
                        403,
                        format!(
                            "you may submit only to your own tenant `{}`; `{t}` needs scope tenants:*",
                            p.tenant
                        ),
                        json!({"field": "tenant"}),
                    ));
                }
                t.clone()
            }
            _ => p.tenant.clone(),
        };
        if let Some(key) = &sub.idempotency_key {
            if let Some(t) = self.lock().find_idempotent(&tenant, key) {
                return Ok(Prepared::Existing(t));
            }
            if let Some(row) = self
                .store
                .find_task_by_idempotency(&tenant, key)
                .await
                .map_err(MeshError::store)?
                && let Ok(t) = serde_json::from_value::<Task>(row.doc)
            {
                return Ok(Prepared::Existing(t));
            }
        }
        let id = format!("t-{}", uuid::Uuid::new_v4().simple());
        Ok(Prepared::New(sub.into_task(
            id,
            tenant,
            p.subject.clone(),
            now,
        )))
    }

    /// A task the caller may see.
    pub async fn get(&self, p: &Principal, id: &str) -> Result<Task, MeshError> {
        let live = self.lock().task(id);
        let task = match live {
            Some(t) => t,
            None => match self.store.get_task(id).await.map_err(MeshError::store)? {
                Some(row) => serde_json::from_value::<Task>(row.doc)
                    .map_err(|e| MeshError::store(format!("stored task {id} is corrupt: {e}")))?,
                None => return Err(MeshError::not_found("task", id)),
            },
        };
        match reach(p) {
            Some(t) if t != task.tenant => Err(MeshError::not_found("task", id)),
            _ => Ok(task),
        }
    }

    /// Lists tasks newest first. `cursor` is the previous page's `next_cursor`.
    pub async fn list(
        &self,
        p: &Principal,
        mut q: TaskQuery,
    ) -> Result<(Vec<Task>, Option<i64>), MeshError> {
        if let Some(t) = reach(p) {
            if q.tenant.as_deref().is_some_and(|x| x != t) {
                return Ok((Vec::new(), None));
            }
            q.tenant = Some(t.to_owned());
        }
        let rows = self.store.query_tasks(&q).await.map_err(MeshError::store)?;
        let limit = match q.limit {
            0 => 100,
            n => n.min(1000),
        } as usize;
        let next = (rows.len() == limit)
            .then(|| rows.last().map(|r| r.seq))
            .flatten();
        let st = self.lock();
        let tasks = rows
            .into_iter()
            .filter_map(|r| {
                st.task(&r.id)
                    .or_else(|| serde_json::from_value::<Task>(r.doc).ok())
            })
            .collect();
        Ok((tasks, next))
    }

    /// Cancels a task that has not finished.
    pub async fn cancel(
        &self,
        p: &Principal,
        id: &str,
        reason: Option<String>,
    ) -> Result<Task, MeshError> {
        let task = self.get(p, id).await?;
        if task.state.is_terminal() {
            return Err(MeshError::conflict(
                format!(
                    "task {id} already ended ({}); only unfinished tasks can be cancelled",
                    task.state.as_str()
                ),
                json!({"task_id": id, "state": task.state}),
            ));
        }
        let reason = reason.unwrap_or_else(|| format!("cancelled by {}", p.subject));
        let now = now_ms();
        let (task, rx) = {
            let mut st = self.lock();
            let (task, mut batch) = st.cancel(id, &reason, now)?;
            batch.extend(st.dispatch(now));
            (task, self.submit_batch(batch))
        };
        Self::stored(rx).await?;
        Ok(task)
    }

    // ----- agents -----

    /// A new connection id.
    pub fn connection_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// A new id for a request the gateway sends to an agent.
    pub fn request_id(&self) -> String {
        format!("g-{}", self.next_request.fetch_add(1, Ordering::Relaxed))
    }

    /// Registers an agent on connection `conn`. The answer to request
    /// `reply_id` goes out through `tx` once the registration and any
    /// re-queued tasks are stored.
    pub async fn register(
        &self,
        tenant: &str,
        reg: Registration,
        conn: u64,
        tx: AgentTx,
        reply_id: &Value,
    ) -> Result<Value, MeshError> {
        let stored = self
            .store
            .get_agent(&reg.id)
            .await
            .map_err(MeshError::store)?;
        if let Some(s) = &stored
            && s.tenant != tenant
        {
            return Err(MeshError::conflict(
                format!(
                    "agent id `{}` belongs to another tenant; choose another id",
                    reg.id
                ),
                json!({"field": "id"}),
            ));
        }
        let now = now_ms();
        let (answer, rx) = {
            let mut st = self.lock();
            let (answer, mut batch) = st.register(tenant, reg, conn, tx.clone(), stored, now)?;
            // Sent by the writer with this batch, so that it precedes any
            // task assigned to the agent meanwhile (a later batch).
            let frame = json!({"jsonrpc": "2.0", "id": reply_id, "result": answer});
            batch
                .after
                .push(After::Send(tx, Outbound::Text(frame.to_string())));
            (answer, self.submit_batch(batch))
        };
        Self::stored(rx).await?;
        self.wake.notify_one();
        Ok(answer)
    }

    /// The connection `conn` of agent `id` ended.
    pub fn disconnected(&self, id: &str, conn: u64, why: &str) {
        let now = now_ms();
        let mut st = self.lock();
        let batch = st.disconnect(id, conn, why, now);
        self.enqueue(batch);
    }

    /// An agent was heard from.
    pub fn seen(&self, id: &str, conn: u64) {
        self.lock().seen(id, conn, now_ms());
    }

    /// Runs one agent request about a task. Validation errors come back at
    /// once; the answer of a legal request goes out through `tx` after the
    /// change is stored.
    pub fn agent_call(
        &self,
        agent: &str,
        conn: u64,
        method: &str,
        params: &Value,
        reply: Option<(AgentTx, Value)>,
    ) -> Result<(), MeshError> {
        let now = now_ms();
        {
            let mut st = self.lock();
            let mut batch = st.agent_call(agent, conn, method, params, reply, now)?;
            // A finished task frees a slot: fill it in the same commit.
            if matches!(method, "task.complete" | "task.fail" | "task.reject") {
                batch.extend(st.dispatch(now));
            }
            self.enqueue(batch);
        }
        Ok(())
    }

    /// Checks that `agent` on connection `conn` holds task `id`.
    pub fn check_held(&self, agent: &str, conn: u64, id: &str) -> Result<(), MeshError> {
        self.lock().check_held(agent, conn, id)
    }

    /// Stores a large result as a blob and returns the reference that
    /// replaces it.
    pub async fn store_blob(&self, tenant: &str, bytes: Vec<u8>) -> Result<Value, MeshError> {
        use sha2::Digest;
        let id = format!("b-{}", uuid::Uuid::new_v4().simple());
        let sha = sha2::Sha256::digest(&bytes);
        let sha256 = hex::encode(sha);
        let size = bytes.len();
        self.store
            .put_blob(&meshgate_store::BlobRow {
                id: id.clone(),
                tenant: tenant.to_owned(),
                content_type: "application/json".into(),
                sha256: sha256.clone(),
                size: size as i64,
                data: bytes,
                created_at: now_ms(),
            })
            .await
            .map_err(MeshError::store)?;
        Ok(
            json!({"blob": {"id": id, "url": format!("/api/v1/blobs/{id}"), "size": size, "sha256": sha256}}),
        )
    }

    /// A blob the caller may read.
    pub async fn blob(
        &self,
        p: &Principal,
        id: &str,
    ) -> Result<meshgate_store::BlobRow, MeshError> {
        match self.store.get_blob(id).await.map_err(MeshError::store)? {
            Some(b) if reach(p).is_none_or(|t| t == b.tenant) => Ok(b),
            _ => Err(MeshError::not_found("blob", id)),
        }
    }

    /// Agents the caller may see: online ones from memory, the rest from the store.
    pub async fn agents(&self, p: &Principal) -> Result<Vec<AgentView>, MeshError> {
        let rows = self
            .store
            .list_agents(reach(p))
            .await
            .map_err(MeshError::store)?;
        let st = self.lock();
        let mut out: Vec<AgentView> = rows
            .into_iter()
            .map(|r| {
                st.agent_view(&r.id)
                    .unwrap_or_else(|| AgentView::offline(&r))
            })
            .collect();
        for v in st.live_views(reach(p)) {
            if !out.iter().any(|o| o.id == v.id) {
                out.push(v);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// One agent the caller may see.
    pub async fn agent(&self, p: &Principal, id: &str) -> Result<AgentView, MeshError> {
        let live = self.lock().agent_view(id);
        let view = match live {
            Some(v) => v,
            None => match self.store.get_agent(id).await.map_err(MeshError::store)? {
                Some(r) => AgentView::offline(&r),
                None => return Err(MeshError::not_found("agent", id)),
            },
        };
        match reach(p) {
            Some(t) if t != view.tenant => Err(MeshError::not_found("agent", id)),
            _ => Ok(view),
        }
    }

    /// Replaces an agent's configuration (a new version) and pushes it to
    /// the agent if it is connected.
    pub async fn set_agent_config(
        &self,
        p: &Principal,
        id: &str,
        config: Value,
    ) -> Result<AgentView, MeshError> {
        if !config.is_object() {
            return Err(MeshError::invalid("config", "must be a JSON object"));
        }
        let _ = self.agent(p, id).await?;
        let Some(mut row) = self.store.get_agent(id).await.map_err(MeshError::store)? else {
            return Err(MeshError::not_found("agent", id));
        };
        row.config = config;
        row.config_version += 1;
        row.updated_at = now_ms();
        if let Some(doc) = row.doc.as_object_mut() {
            doc.insert("config_source".into(), json!("api"));
        }
        let rx = {
            let mut st = self.lock();
            let batch = st.config_changed(row);
            self.submit_batch(batch)
        };
        Self::stored(rx).await?;
        self.agent(p, id).await
    }

    /// Sends `health.check` or `capability.query` to a connected agent and
    /// waits (at most 10 s) for its answer.
    pub async fn ask_agent(
        &self,
        p: &Principal,
        id: &str,
        method: &'static str,
    ) -> Result<Value, MeshError> {
        let _ = self.agent(p, id).await?;
        let rid = self.request_id();
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.lock();
            st.ask(id, &rid, method, tx)?;
        }
        let answer = match tokio::time::timeout(Duration::from_secs(10), rx).await {
            Ok(Ok(v)) => v,
            Ok(Err(_)) => {
                return Err(MeshError::conflict(
                    format!("agent `{id}` disconnected before answering {method}"),
                    json!({"agent_id": id}),
                ));
            }
            Err(_) => {
                self.lock().forget_ask(id, &rid);
                return Err(MeshError::new(
                    code::SERVER_ERROR,
                    504,
                    format!("agent `{id}` did not answer {method} within 10 s"),
                    json!({"agent_id": id}),
                ));
            }
        };
        let answer = answer?;
        if method == "capability.query" {
            let caps = meshgate_core::mesh::agent::parse_capabilities(answer.get("capabilities"))
                .map_err(|e| {
                MeshError::new(
                    code::INVALID_PARAMS,
                    502,
                    format!("agent `{id}` answered capability.query with an invalid {e}"),
                    json!({"field": e.field}),
                )
            })?;
            self.lock().set_capabilities(id, caps);
            self.wake.notify_one();
        }
        Ok(answer)
    }

    /// An agent answered a request the gateway sent.
    pub fn answered(&self, agent: &str, id: &str, answer: Result<Value, MeshError>) {
        self.lock().answered(agent, id, answer);
    }

    /// Counts for `/health` and the metrics.
    pub fn stats(&self) -> Value {
        self.lock().stats()
    }

    // ----- background -----

    async fn dispatch_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tick.tick() => {}
                _ = self.shutdown.cancelled() => return,
            }
            let now = now_ms();
            let mut st = self.lock();
            let mut batch = st.expire(now);
            batch.extend(st.dispatch(now));
            self.enqueue(batch);
        }
    }

    async fn housekeeping_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut purge_at = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut evict_at = purge_at;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.shutdown.cancelled() => return,
            }
            {
                let mut st = self.lock();
                let batch = st.flush_agents(now_ms());
                self.enqueue(batch);
                st.publish_gauges();
            }
            if tokio::time::Instant::now() >= evict_at {
                evict_at = tokio::time::Instant::now() + Duration::from_secs(60);
                self.shared.evict_idle();
            }
            if self.cfg.task_retention_secs > 0 && tokio::time::Instant::now() >= purge_at {
                purge_at = tokio::time::Instant::now() + Duration::from_secs(3600);
                let before = now_ms() - (self.cfg.task_retention_secs as i64) * 1000;
                match self.store.purge_tasks(before, 10_000).await {
                    Ok(n) if n > 0 => tracing::info!(purged = n, "mesh: purged old finished tasks"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "mesh: purging old tasks failed"),
                }
            }
        }
    }
}
