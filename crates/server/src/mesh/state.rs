//! The mesh's in-memory state: open tasks, the pending queue, timers and
//! live agents. Every method runs under the mesh mutex, does no IO, and
//! returns the [`Batch`] of rows to store and messages to send after.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use meshgate_core::config::MeshConfig;
use meshgate_core::mesh::{
    AgentStats, Candidate, Capability, Need, Registration, Task, TaskState, choose,
    normalize_progress, retry_delay_ms, waiting_reason,
};
use meshgate_store::{AgentRow, TaskRow};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::writer::{After, Batch};
use super::{AgentTx, MeshError, Outbound, TaskUpdate};
use crate::resilience::unit_random;

/// Finished task ids remembered, to tell "cancelled" (4006) from "not
/// yours" (4008) when a late message about one arrives.
const RECENT: usize = 100_000;

type QKey = (Reverse<i32>, u64, String);
type Ask = oneshot::Sender<Result<Value, MeshError>>;
type Events = tokio::sync::broadcast::Sender<Arc<TaskUpdate>>;

struct Agent {
    id: String,
    tenant: String,
    agent_type: String,
    name: String,
    version: String,
    caps: Vec<Capability>,
    limit: u32,
    active: HashSet<String>,
    conn: Option<(u64, AgentTx)>,
    last_seen_ms: i64,
    connected_at_ms: i64,
    gone_since: Option<i64>,
    stats: AgentStats,
    config: Value,
    config_version: i64,
    config_source: &'static str,
    metadata: Value,
    last_assigned: u64,
    asks: HashMap<String, Ask>,
    health: Option<Value>,
    dirty: bool,
}

/// An agent as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct AgentView {
    /// Agent id.
    pub id: String,
    /// Tenant.
    pub tenant: String,
    /// Agent type.
    #[serde(rename = "type")]
    pub agent_type: String,
    /// Display name.
    pub name: String,
    /// Software version.
    pub version: String,
    /// `online`, `reconnecting` (gone, its tasks held for the grace period) or `offline`.
    pub status: &'static str,
    /// Capabilities.
    pub capabilities: Value,
    /// Task limit.
    pub max_concurrent_tasks: u32,
    /// Tasks it holds.
    pub active_tasks: Vec<String>,
    /// Configuration in force.
    pub config: Value,
    /// Its version.
    pub config_version: i64,
    /// Recorded history.
    pub stats: Value,
    /// Metadata from registration.
    pub metadata: Value,
    /// Last heard from, unix ms.
    pub last_seen_ms: i64,
    /// Answer to the last `health.check`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<Value>,
}

impl AgentView {
    /// The view of an agent known only from the store.
    pub fn offline(r: &AgentRow) -> AgentView {
        let d = &r.doc;
        AgentView {
            id: r.id.clone(),
            tenant: r.tenant.clone(),
            agent_type: r.agent_type.clone(),
            name: d["name"].as_str().unwrap_or_default().to_owned(),
            version: d["version"].as_str().unwrap_or_default().to_owned(),
            status: "offline",
            capabilities: d["capabilities"].clone(),
            max_concurrent_tasks: d["max_concurrent_tasks"].as_u64().unwrap_or(0) as u32,
            active_tasks: Vec::new(),
            config: r.config.clone(),
            config_version: r.config_version,
            stats: d["stats"].clone(),
            metadata: d["metadata"].clone(),
            last_seen_ms: r.last_seen_at,
            health: None,
        }
    }
}

fn stats_json(s: &AgentStats) -> Value {
    let mut v = serde_json::to_value(s).unwrap_or(Value::Null);
    v["success_rate"] = json!(s.success_rate());
    v["mean_ms"] = json!(s.mean_ms());
    v
}

impl Agent {
    fn view(&self) -> AgentView {
        let mut active: Vec<String> = self.active.iter().cloned().collect();
        active.sort();
        AgentView {
            id: self.id.clone(),
            tenant: self.tenant.clone(),
            agent_type: self.agent_type.clone(),
            name: self.name.clone(),
            version: self.version.clone(),
            status: if self.conn.is_some() {
                "online"
            } else {
                "reconnecting"
            },
            capabilities: serde_json::to_value(&self.caps).unwrap_or(Value::Null),
            max_concurrent_tasks: self.limit,
            active_tasks: active,
            config: self.config.clone(),
            config_version: self.config_version,
            stats: stats_json(&self.stats),
            metadata: self.metadata.clone(),
            last_seen_ms: self.last_seen_ms,
            health: self.health.clone(),
        }
    }

    fn row(&self, now: i64) -> AgentRow {
        AgentRow {
            id: self.id.clone(),
            tenant: self.tenant.clone(),
            agent_type: self.agent_type.clone(),
            doc: json!({
                "name": self.name,
                "version": self.version,
                "capabilities": self.caps,
                "max_concurrent_tasks": self.limit,
                "metadata": self.metadata,
                "stats": self.stats,
                "config_source": self.config_source,
            }),
            config: self.config.clone(),
            config_version: self.config_version,
            last_seen_at: self.last_seen_ms,
            updated_at: now,
        }
    }

    fn online(&self) -> bool {
        self.conn.is_some()
    }

    fn send(&self, msg: Outbound, batch: &mut Batch) {
        if let Some((_, tx)) = &self.conn {
            batch.after.push(After::Send(tx.clone(), msg));
        }
    }
}

/// What start-up found.
pub(super) struct Recovered {
    pub tasks: usize,
    pub pending: usize,
    pub held: usize,
    pub agents: usize,
}

pub(super) struct State {
    cfg: MeshConfig,
    events: Events,
    tasks: HashMap<String, Task>,
    /// Pending tasks ready to run, one queue per signature (tenant and
    /// required capabilities): tasks of one signature have the same eligible
    /// agents, so when its head cannot be placed, none of them can.
    queues: HashMap<String, BTreeSet<QKey>>,
    qkey: HashMap<String, (String, QKey)>,
    delayed: BTreeSet<(i64, String)>,
    deadlines: BTreeSet<(i64, String)>,
    idem: HashMap<(String, String), String>,
    recent: HashMap<String, TaskState>,
    recent_order: VecDeque<String>,
    agents: HashMap<String, Agent>,
    qseq: u64,
    assign_seq: u64,
}

fn row(t: &Task) -> TaskRow {
    TaskRow {
        id: t.id.clone(),
        seq: 0,
        tenant: t.tenant.clone(),
        state: t.state.as_str().to_owned(),
        task_type: t.task_type.clone(),
        agent_id: t.agent_id.clone(),
        idempotency_key: t.idempotency_key.clone(),
        created_at: t.created_at_ms,
        updated_at: t.updated_at_ms,
        doc: serde_json::to_value(t).unwrap_or(Value::Null),
    }
}

/// A state update for subscribers; the task snapshot is only built when
/// someone listens (SSE streams, waiting `task_submit` calls).
fn state_event(events: &Events, t: &Task) -> After {
    if events.receiver_count() == 0 {
        return After::Nothing;
    }
    let mut snapshot = t.clone();
    snapshot.history.clear();
    After::Event(Arc::new(TaskUpdate {
        task_id: t.id.clone(),
        tenant: t.tenant.clone(),
        kind: "state",
        state: t.state,
        progress: t.progress,
        message: t.progress_message.clone(),
        task: Some(snapshot),
    }))
}

/// Tasks of one signature have the same eligible agents.
fn signature(t: &Task) -> String {
    let mut caps: Vec<String> = t
        .required_capabilities
        .iter()
        .map(|c| c.to_ascii_lowercase())
        .collect();
    caps.sort();
    caps.dedup();
    let mut s = t.tenant.clone();
    for c in caps {
        s.push('\u{1f}');
        s.push_str(&c);
    }
    s
}

fn notification(method: &str, params: Value) -> Outbound {
    Outbound::Text(json!({"jsonrpc": "2.0", "method": method, "params": params}).to_string())
}

fn task_id(params: &Value) -> Result<&str, MeshError> {
    match params.get("task_id") {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(_) => Err(MeshError::invalid("task_id", "must be a non-empty string")),
        None => Err(MeshError::invalid("task_id", "is required")),
    }
}

fn optional_text(params: &Value, key: &str, max: usize) -> Result<Option<String>, MeshError> {
    match params.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.len() <= max => Ok(Some(s.clone())),
        Some(Value::String(_)) => Err(MeshError::invalid(
            key,
            format!("must be at most {max} characters"),
        )),
        Some(_) => Err(MeshError::invalid(key, "must be a string")),
    }
}

impl State {
    pub fn new(cfg: MeshConfig, events: Events) -> State {
        State {
            cfg,
            events,
            tasks: HashMap::new(),
            queues: HashMap::new(),
            qkey: HashMap::new(),
            delayed: BTreeSet::new(),
            deadlines: BTreeSet::new(),
            idem: HashMap::new(),
            recent: HashMap::new(),
            recent_order: VecDeque::new(),
            agents: HashMap::new(),
            qseq: 0,
            assign_seq: 0,
        }
    }

    // ----- queue bookkeeping -----

    fn enqueue(&mut self, t: &Task) {
        self.qseq += 1;
        let key = (Reverse(t.priority), self.qseq, t.id.clone());
        let sig = signature(t);
        self.queues
            .entry(sig.clone())
            .or_default()
            .insert(key.clone());
        self.qkey.insert(t.id.clone(), (sig, key));
    }

    fn unqueue(&mut self, t: &Task) {
        if let Some((sig, k)) = self.qkey.remove(&t.id)
            && let Some(q) = self.queues.get_mut(&sig)
        {
            q.remove(&k);
            if q.is_empty() {
                self.queues.remove(&sig);
            }
        }
        if let Some(nb) = t.not_before_ms {
            self.delayed.remove(&(nb, t.id.clone()));
        }
        if let Some(d) = t.deadline_ms {
            self.deadlines.remove(&(d, t.id.clone()));
        }
    }

    fn remember_finished(&mut self, id: &str, state: TaskState) {
        self.recent.insert(id.to_owned(), state);
        self.recent_order.push_back(id.to_owned());
        while self.recent_order.len() > RECENT {
            if let Some(old) = self.recent_order.pop_front() {
                self.recent.remove(&old);
            }
        }
    }

    /// Start-up: open tasks from the store.
    pub fn recover(
        &mut self,
        rows: Vec<TaskRow>,
        keys: Vec<(String, String, String)>,
        now: i64,
    ) -> Recovered {
        for (tenant, key, id) in keys {
            self.idem.insert((tenant, key), id);
        }
        let mut r = Recovered {
            tasks: 0,
            pending: 0,
            held: 0,
            agents: 0,
        };
        for row in rows {
            let Ok(mut t) = serde_json::from_value::<Task>(row.doc) else {
                tracing::error!(task = %row.id, "mesh: stored task is unreadable; left as it is");
                continue;
            };
            r.tasks += 1;
            match (t.state, t.agent_id.clone()) {
                (TaskState::Pending, _) => {
                    r.pending += 1;
                    match t.not_before_ms {
                        Some(nb) if nb > now => {
                            self.delayed.insert((nb, t.id.clone()));
                        }
                        _ => {
                            t.not_before_ms = None;
                            self.enqueue(&t);
                        }
                    }
                }
                (s, Some(agent)) if s.is_active() => {
                    r.held += 1;
                    if let Some(d) = t.deadline_ms {
                        self.deadlines.insert((d, t.id.clone()));
                    }
                    let a = self.agents.entry(agent.clone()).or_insert_with(|| {
                        r.agents += 1;
                        Agent {
                            id: agent.clone(),
                            tenant: t.tenant.clone(),
                            agent_type: String::new(),
                            name: agent.clone(),
                            version: String::new(),
                            caps: Vec::new(),
                            limit: 1,
                            active: HashSet::new(),
                            conn: None,
                            last_seen_ms: now,
                            connected_at_ms: now,
                            gone_since: Some(now),
                            stats: AgentStats::default(),
                            config: json!({}),
                            config_version: 0,
                            config_source: "agent",
                            metadata: json!({}),
                            last_assigned: 0,
                            asks: HashMap::new(),
                            health: None,
                            dirty: false,
                        }
                    });
                    a.active.insert(t.id.clone());
                }
                _ => {
                    r.pending += 1;
                    t.state = TaskState::Pending;
                    self.enqueue(&t);
                }
            }
            self.tasks.insert(t.id.clone(), t);
        }
        r
    }

    // ----- submitters -----

    pub fn find_idempotent(&self, tenant: &str, key: &str) -> Option<Task> {
        let id = self.idem.get(&(tenant.to_owned(), key.to_owned()))?;
        self.task(id)
    }

    /// Adds a new task; if its idempotency key was taken meanwhile, returns
    /// the id of the task that holds it.
    pub fn submit(&mut self, task: Task) -> Result<Task, String> {
        if let Some(key) = &task.idempotency_key {
            let k = (task.tenant.clone(), key.clone());
            if let Some(id) = self.idem.get(&k) {
                return Err(id.clone());
            }
            self.idem.insert(k, task.id.clone());
        }
        self.enqueue(&task);
        self.tasks.insert(task.id.clone(), task.clone());
        Ok(task)
    }

    /// Adds the rows of newly submitted tasks that `batch` does not hold
    /// yet (those still pending; assigned ones got their row from
    /// `dispatch`), and returns each task as it is now.
    pub fn rows_of_new(&self, tasks: Vec<(usize, Task)>, batch: &mut Batch) -> Vec<(usize, Task)> {
        let written: HashSet<&str> = batch.tasks.iter().map(|r| r.id.as_str()).collect();
        let mut rows = Vec::new();
        let mut out = Vec::with_capacity(tasks.len());
        for (i, t) in tasks {
            let now = self.tasks.get(&t.id).cloned().unwrap_or(t);
            if !written.contains(now.id.as_str()) {
                rows.push(row(&now));
            }
            out.push((i, now));
        }
        batch.tasks.extend(rows);
        out
    }

    /// A copy of an open task, with why it waits if it is pending.
    pub fn task(&self, id: &str) -> Option<Task> {
        let t = self.tasks.get(id)?;
        let mut t = t.clone();
        if t.state == TaskState::Pending {
            t.waiting_reason = Some(self.why_waiting(&t));
        }
        Some(t)
    }

    fn candidates<'a>(
        &'a self,
        tenant: &str,
        extra: &HashMap<&str, (u32, u64)>,
    ) -> Vec<Candidate<'a>> {
        self.agents
            .values()
            .filter(|a| a.online() && a.tenant == tenant)
            .map(|a| {
                let (more, last) = extra.get(a.id.as_str()).copied().unwrap_or((0, 0));
                Candidate {
                    id: &a.id,
                    capabilities: &a.caps,
                    active: a.active.len() as u32 + more,
                    limit: a.limit,
                    stats: &a.stats,
                    cost: a.config.get("cost_per_task").and_then(Value::as_f64),
                    last_assigned: a.last_assigned.max(last),
                }
            })
            .collect()
    }

    fn why_waiting(&self, t: &Task) -> String {
        if let Some(nb) = t.not_before_ms {
            return format!(
                "waiting to retry (attempt {} of {}) until {nb} (unix ms); last error: {}",
                t.attempts + 1,
                t.max_retries + 1,
                t.error.as_deref().unwrap_or("none")
            );
        }
        let need = Need {
            task_type: &t.task_type,
            required: &t.required_capabilities,
            rejected_by: &t.rejected_by,
        };
        let c = self.candidates(&t.tenant, &HashMap::new());
        if choose(self.strategy(t), &need, &c).is_some() {
            return "queued; an eligible agent is free and it is about to be assigned".into();
        }
        waiting_reason(&t.tenant, &need, &c)
    }

    fn strategy(&self, t: &Task) -> meshgate_core::mesh::Strategy {
        t.strategy
            .unwrap_or_else(|| self.cfg.strategy_for(&t.tenant))
    }

    /// Ends a task: out of the open set, into the recent list, metrics.
    fn finish(&mut self, t: &Task, now: i64) {
        self.unqueue(t);
        self.tasks.remove(&t.id);
        self.remember_finished(&t.id, t.state);
        metrics::counter!("agent_tasks_processed_total", "task_type" => t.task_type.clone(), "status" => t.state.as_str()).increment(1);
        if let Some(at) = t.assigned_at_ms {
            metrics::histogram!("agent_task_duration_seconds", "task_type" => t.task_type.clone())
                .record((now - at).max(0) as f64 / 1000.0);
        }
    }

    fn release(&mut self, t: &Task) {
        if let Some(a) = t.agent_id.as_deref().and_then(|a| self.agents.get_mut(a)) {
            a.active.remove(&t.id);
            a.dirty = true;
        }
    }

    pub fn cancel(&mut self, id: &str, reason: &str, now: i64) -> Result<(Task, Batch), MeshError> {
        let Some(mut t) = self.tasks.get(id).cloned() else {
            return Err(MeshError::conflict(
                format!("task {id} already ended; only unfinished tasks can be cancelled"),
                json!({"task_id": id}),
            ));
        };
        let mut batch = Batch::default();
        let was_active = t.state.is_active();
        self.unqueue(&t);
        t.transition(TaskState::Cancelled, now, Some(reason.to_owned()))
            .map_err(|e| MeshError::conflict(e, json!({"task_id": id})))?;
        t.error = Some(reason.to_owned());
        if was_active {
            if let Some(a) = t.agent_id.as_deref().and_then(|a| self.agents.get(a)) {
                a.send(
                    notification("task.cancel", json!({"task_id": id, "reason": reason})),
                    &mut batch,
                );
            }
            self.release(&t);
        }
        self.finish(&t, now);
        batch.tasks.push(row(&t));
        batch.after.push(state_event(&self.events, &t));
        batch.after.push(After::Wake);
        Ok((t, batch))
    }

    /// Back to the queue after a rejection, failure, timeout or a lost
    /// agent, or dead-lettered when no retries are left.
    fn retry_or_bury(
        &mut self,
        mut t: Task,
        now: i64,
        error: String,
        backoff: bool,
        terminal: TaskState,
        batch: &mut Batch,
    ) {
        self.unqueue(&t);
        self.release(&t);
        t.error = Some(error.clone());
        t.assigned_at_ms = None;
        if t.retries_left() {
            let note = Some(format!("retry: {error}"));
            if t.transition(TaskState::Pending, now, note).is_err() {
                return;
            }
            t.progress = None;
            t.progress_message = None;
            if backoff {
                let delay = retry_delay_ms(
                    t.attempts,
                    self.cfg.retry_backoff_initial_ms,
                    self.cfg.retry_backoff_max_ms,
                    unit_random(),
                );
                let nb = now + delay as i64;
                t.not_before_ms = Some(nb);
                self.delayed.insert((nb, t.id.clone()));
            } else {
                t.not_before_ms = None;
                self.enqueue(&t);
            }
            metrics::counter!("agent_task_retries_total", "task_type" => t.task_type.clone())
                .increment(1);
            batch.after.push(After::Wake);
        } else {
            let note = format!("dead-lettered after {} attempt(s): {error}", t.attempts);
            if t.transition(terminal, now, Some(note.clone())).is_err() {
                return;
            }
            t.dead_letter = true;
            t.error = Some(note);
            self.finish(&t, now);
        }
        batch.tasks.push(row(&t));
        batch.after.push(state_event(&self.events, &t));
        if !t.state.is_terminal() {
            self.tasks.insert(t.id.clone(), t);
        }
    }

    // ----- agents -----

    pub fn register(
        &mut self,
        tenant: &str,
        reg: Registration,
        conn: u64,
        tx: AgentTx,
        stored: Option<AgentRow>,
        now: i64,
    ) -> Result<(Value, Batch), MeshError> {
        let mut batch = Batch::default();
        let timeout_ms = self.cfg.heartbeat_timeout_secs as i64 * 1000;
        if let Some(p) = self.agents.get(&reg.id) {
            if p.tenant != tenant {
                return Err(MeshError::conflict(
                    format!(
                        "agent id `{}` belongs to another tenant; choose another id",
                        reg.id
                    ),
                    json!({"field": "id"}),
                ));
            }
            if p.online() && now - p.last_seen_ms < timeout_ms {
                return Err(MeshError::conflict(
                    format!(
                        "agent `{}` is already connected (since {} unix ms); stop the other instance, or wait {} s for it to time out if it is dead",
                        reg.id, p.connected_at_ms, self.cfg.heartbeat_timeout_secs
                    ),
                    json!({"field": "id", "agent_id": reg.id}),
                ));
            }
        }
        let previous = self.agents.remove(&reg.id);
        if let Some(p) = &previous
            && let Some((_, old)) = &p.conn
        {
            batch.after.push(After::Send(
                old.clone(),
                Outbound::Close(1008, "replaced by a newer connection of this agent".into()),
            ));
        }
        let stored_doc = stored.as_ref().map(|s| &s.doc);
        let stats: AgentStats = match (&previous, stored_doc) {
            (Some(p), _) if p.stats != AgentStats::default() => p.stats,
            (_, Some(d)) => serde_json::from_value(d["stats"].clone()).unwrap_or_default(),
            _ => AgentStats::default(),
        };
        let reg_config = Value::Object(reg.config.clone());
        let (config, config_version, config_source) = match &stored {
            Some(s) if s.doc["config_source"] == "api" => {
                (s.config.clone(), s.config_version, "api")
            }
            Some(s) if s.config == reg_config => (s.config.clone(), s.config_version, "agent"),
            Some(s) => (reg_config, s.config_version + 1, "agent"),
            None => (reg_config, 1, "agent"),
        };
        let mut active = previous
            .as_ref()
            .map(|p| p.active.clone())
            .unwrap_or_default();
        let claimed: HashSet<&String> = reg.active_tasks.iter().collect();
        let lost: Vec<String> = active
            .iter()
            .filter(|t| !claimed.contains(t))
            .cloned()
            .collect();
        let mut resumed: Vec<String> = active
            .iter()
            .filter(|t| claimed.contains(t))
            .cloned()
            .collect();
        resumed.sort();
        for id in &lost {
            active.remove(id);
        }
        let asks = previous.map(|p| p.asks).unwrap_or_default();
        drop(asks);
        let agent = Agent {
            id: reg.id.clone(),
            tenant: tenant.to_owned(),
            agent_type: reg.agent_type.clone(),
            name: reg.name.clone(),
            version: reg.version.clone(),
            caps: reg.capabilities.clone(),
            limit: reg.max_concurrent_tasks,
            active,
            conn: Some((conn, tx)),
            last_seen_ms: now,
            connected_at_ms: now,
            gone_since: None,
            stats,
            config: config.clone(),
            config_version,
            config_source,
            metadata: Value::Object(reg.metadata.clone()),
            last_assigned: 0,
            asks: HashMap::new(),
            health: None,
            dirty: false,
        };
        batch.agents.push(agent.row(now));
        self.agents.insert(reg.id.clone(), agent);
        for id in lost {
            if let Some(t) = self.tasks.get(&id).cloned()
                && t.agent_id.as_deref() == Some(reg.id.as_str())
                && t.state.is_active()
            {
                let why = format!("agent `{}` came back without it", reg.id);
                self.retry_or_bury(t, now, why, false, TaskState::Failed, &mut batch);
            }
        }
        batch.after.push(After::Wake);
        let answer = json!({
            "agent_id": reg.id,
            "session_id": format!("as-{conn}"),
            "tenant": tenant,
            "heartbeat_interval_secs": self.cfg.heartbeat_interval_secs,
            "heartbeat_timeout_secs": self.cfg.heartbeat_timeout_secs,
            "config": config,
            "config_version": config_version,
            "resumed_tasks": resumed,
            "server": {"name": "meshgate", "version": env!("CARGO_PKG_VERSION")},
        });
        Ok((answer, batch))
    }

    pub fn disconnect(&mut self, id: &str, conn: u64, why: &str, now: i64) -> Batch {
        let mut batch = Batch::default();
        let Some(a) = self.agents.get_mut(id) else {
            return batch;
        };
        if a.conn.as_ref().map(|(c, _)| *c) != Some(conn) {
            return batch;
        }
        tracing::info!(agent = %id, reason = %why, held = a.active.len(), "mesh: agent disconnected");
        a.conn = None;
        a.gone_since = Some(now);
        for (_, ask) in a.asks.drain() {
            let _ = ask.send(Err(MeshError::conflict(
                format!("agent `{id}` disconnected"),
                Value::Null,
            )));
        }
        batch.agents.push(a.row(now));
        if a.active.is_empty() {
            self.agents.remove(id);
        }
        batch
    }

    pub fn seen(&mut self, id: &str, conn: u64, now: i64) {
        if let Some(a) = self.agents.get_mut(id)
            && a.conn.as_ref().is_some_and(|(c, _)| *c == conn)
        {
            a.last_seen_ms = now;
        }
    }

    /// The open task `id` if `agent` holds it; otherwise the error that says why not.
    /// Whether `agent` (on connection `conn`) holds open task `id`.
    pub fn check_held(&self, agent: &str, conn: u64, id: &str) -> Result<(), MeshError> {
        match self.agents.get(agent) {
            Some(a) if a.conn.as_ref().is_some_and(|(c, _)| *c == conn) => {
                self.held_task(agent, id).map(|_| ())
            }
            _ => Err(MeshError {
                code: super::code::INVALID_MESSAGE,
                status: 400,
                message: "register first: the first request must be agent.register".into(),
                data: Value::Null,
            }),
        }
    }

    fn held_task(&self, agent: &str, id: &str) -> Result<Task, MeshError> {
        match self.tasks.get(id) {
            Some(t) if t.agent_id.as_deref() == Some(agent) && t.state.is_active() => Ok(t.clone()),
            Some(t) => Err(MeshError::conflict(
                format!(
                    "task {id} is not assigned to you (it is {}); it may have been re-queued after a timeout or a lost connection",
                    t.state.as_str()
                ),
                json!({"task_id": id, "state": t.state}),
            )),
            None => match self.recent.get(id) {
                Some(TaskState::Cancelled) => Err(MeshError {
                    code: super::code::CANCELLED,
                    status: 409,
                    message: format!("task {id} was cancelled; stop working on it"),
                    data: json!({"task_id": id, "state": "cancelled"}),
                }),
                Some(s) => Err(MeshError::conflict(
                    format!(
                        "task {id} already ended ({}); it is no longer yours",
                        s.as_str()
                    ),
                    json!({"task_id": id, "state": s}),
                )),
                None => Err(MeshError::conflict(
                    format!("task {id} is not assigned to you (no such open task)"),
                    json!({"task_id": id}),
                )),
            },
        }
    }

    pub fn agent_call(
        &mut self,
        agent: &str,
        conn: u64,
        method: &str,
        params: &Value,
        reply: Option<(AgentTx, Value)>,
        now: i64,
    ) -> Result<Batch, MeshError> {
        match self.agents.get(agent) {
            Some(a) if a.conn.as_ref().is_some_and(|(c, _)| *c == conn) => {}
            _ => {
                return Err(MeshError {
                    code: super::code::INVALID_MESSAGE,
                    status: 400,
                    message: "register first: the first request must be agent.register".into(),
                    data: Value::Null,
                });
            }
        }
        let id = task_id(params)?.to_owned();
        let mut t = self.held_task(agent, &id)?;
        let mut batch = Batch::default();
        let mut answer = json!({"task_id": id});
        match method {
            "task.accept" => {
                if t.state == TaskState::Assigned {
                    t.transition(TaskState::Accepted, now, None)
                        .map_err(|e| MeshError::conflict(e, json!({"task_id": id})))?;
                    batch.tasks.push(row(&t));
                    batch.after.push(state_event(&self.events, &t));
                }
                answer["state"] = json!(t.state);
                self.tasks.insert(id, t);
            }
            "task.progress" => {
                let p = match params.get("progress") {
                    Some(Value::Number(n)) => n.as_f64().and_then(normalize_progress),
                    None | Some(Value::Null) => t.progress,
                    Some(_) => None,
                };
                let Some(p) = p else {
                    return Err(MeshError::invalid(
                        "progress",
                        "must be a fraction 0..=1 or a percentage up to 100",
                    ));
                };
                let message = optional_text(params, "message", 4096)?;
                if t.state != TaskState::InProgress {
                    t.transition(TaskState::InProgress, now, None)
                        .map_err(|e| MeshError::conflict(e, json!({"task_id": id})))?;
                    batch.after.push(state_event(&self.events, &t));
                }
                t.progress = Some(p);
                t.progress_message = message.clone();
                t.updated_at_ms = now;
                batch.tasks.push(row(&t));
                batch.after.push(After::Event(Arc::new(TaskUpdate {
                    task_id: id.clone(),
                    tenant: t.tenant.clone(),
                    kind: "progress",
                    state: t.state,
                    progress: Some(p),
                    message,
                    task: None,
                })));
                answer["state"] = json!(t.state);
                self.tasks.insert(id, t);
            }
            "task.extend" => {
                let secs = match params.get("seconds").and_then(Value::as_u64) {
                    Some(s) if s >= 1 => s,
                    _ => {
                        return Err(MeshError::invalid(
                            "seconds",
                            "is required and must be a whole number of seconds, at least 1",
                        ));
                    }
                };
                let left = self.cfg.max_extension_secs.saturating_sub(t.extended_secs);
                if left == 0 {
                    return Err(MeshError::invalid(
                        "seconds",
                        format!(
                            "this task has used all {} s of extension allowed (mesh.max_extension_secs); finish or fail it",
                            self.cfg.max_extension_secs
                        ),
                    ));
                }
                let granted = secs.min(left);
                if let Some(d) = t.deadline_ms {
                    self.deadlines.remove(&(d, id.clone()));
                }
                let d = t.deadline_ms.unwrap_or(now) + granted as i64 * 1000;
                t.deadline_ms = Some(d);
                t.extended_secs += granted;
                t.updated_at_ms = now;
                self.deadlines.insert((d, id.clone()));
                batch.tasks.push(row(&t));
                answer["deadline_ms"] = json!(d);
                answer["granted_secs"] = json!(granted);
                self.tasks.insert(id, t);
            }
            "task.complete" => {
                let Some(result) = params.get("result").filter(|r| r.is_object()) else {
                    return Err(MeshError::invalid(
                        "result",
                        "is required and must be a JSON object",
                    ));
                };
                self.unqueue(&t);
                t.transition(TaskState::Completed, now, None)
                    .map_err(|e| MeshError::conflict(e, json!({"task_id": id})))?;
                t.result = Some(result.clone());
                t.progress = Some(1.0);
                t.error = None;
                if let Some(a) = self.agents.get_mut(agent) {
                    a.stats.completed += 1;
                    a.stats.busy_ms += (now - t.assigned_at_ms.unwrap_or(now)).max(0) as u64;
                }
                self.release(&t);
                self.finish(&t, now);
                batch.tasks.push(row(&t));
                batch.after.push(state_event(&self.events, &t));
                batch.after.push(After::Wake);
                answer["state"] = json!(t.state);
            }
            "task.reject" | "task.fail" => {
                let rejecting = method == "task.reject";
                let (error, retryable) = if rejecting {
                    let reason = optional_text(params, "reason", 4096)?
                        .unwrap_or_else(|| "no reason given".into());
                    (format!("rejected by `{agent}`: {reason}"), true)
                } else {
                    let Some(e) =
                        optional_text(params, "error", 16 * 1024)?.filter(|e| !e.trim().is_empty())
                    else {
                        return Err(MeshError::invalid(
                            "error",
                            "is required: say why the task failed",
                        ));
                    };
                    let retryable = match params.get("retryable") {
                        None | Some(Value::Null) => false,
                        Some(Value::Bool(b)) => *b,
                        Some(_) => {
                            return Err(MeshError::invalid("retryable", "must be true or false"));
                        }
                    };
                    (format!("failed on `{agent}`: {e}"), retryable)
                };
                if let Some(a) = self.agents.get_mut(agent) {
                    if rejecting {
                        a.stats.rejected += 1;
                    } else {
                        a.stats.failed += 1;
                    }
                }
                if rejecting && !t.rejected_by.iter().any(|r| r == agent) {
                    t.rejected_by.push(agent.to_owned());
                }
                if retryable {
                    self.retry_or_bury(t, now, error, true, TaskState::Failed, &mut batch);
                } else {
                    self.unqueue(&t);
                    self.release(&t);
                    let _ = t.transition(TaskState::Failed, now, Some(error.clone()));
                    t.error = Some(error);
                    t.dead_letter = true;
                    self.finish(&t, now);
                    batch.tasks.push(row(&t));
                    batch.after.push(state_event(&self.events, &t));
                    batch.after.push(After::Wake);
                }
                let after = self.tasks.get(&id).map(|t| (t.state, t.not_before_ms));
                let (state, nb) = after.unwrap_or((TaskState::Failed, None));
                answer["state"] = json!(state);
                if let Some(nb) = nb {
                    answer["retry_at_ms"] = json!(nb);
                }
            }
            other => {
                return Err(MeshError {
                    code: super::code::METHOD_NOT_FOUND,
                    status: 404,
                    message: format!("unknown method `{other}`"),
                    data: json!({"method": other}),
                });
            }
        }
        if let Some((tx, rid)) = reply {
            batch.after.push(After::Reply(tx, rid, answer));
        }
        Ok(batch)
    }

    // ----- timers and dispatch -----

    pub fn expire(&mut self, now: i64) -> Batch {
        let mut batch = Batch::default();
        while let Some((nb, id)) = self.delayed.first().cloned() {
            if nb > now {
                break;
            }
            self.delayed.remove(&(nb, id.clone()));
            if let Some(mut t) = self.tasks.remove(&id) {
                t.not_before_ms = None;
                self.enqueue(&t);
                self.tasks.insert(id, t);
            }
        }
        while let Some((d, id)) = self.deadlines.first().cloned() {
            if d > now {
                break;
            }
            self.deadlines.remove(&(d, id.clone()));
            let Some(mut t) = self.tasks.get(&id).cloned() else {
                continue;
            };
            t.deadline_ms = None;
            let secs = t.timeout_secs + t.extended_secs;
            let why = format!("timed out after {secs} s");
            if let Some(a) = t.agent_id.as_deref().and_then(|a| self.agents.get_mut(a)) {
                a.stats.timeouts += 1;
                a.send(
                    notification("task.cancel", json!({"task_id": id, "reason": why})),
                    &mut batch,
                );
            }
            self.retry_or_bury(t, now, why, true, TaskState::Timeout, &mut batch);
        }
        let grace = self.cfg.reconnect_grace_secs as i64 * 1000;
        let silent = self.cfg.heartbeat_timeout_secs as i64 * 1000;
        let mut gone = Vec::new();
        for a in self.agents.values_mut() {
            if let Some((conn, tx)) = &a.conn
                && now - a.last_seen_ms > silent
            {
                let _ = tx.send(Outbound::Close(
                    1008,
                    format!("no heartbeat for {} s", self.cfg.heartbeat_timeout_secs),
                ));
                tracing::warn!(agent = %a.id, conn = conn, "mesh: agent silent past the heartbeat timeout; marked offline");
                a.conn = None;
                a.gone_since = Some(now);
                for (_, ask) in a.asks.drain() {
                    let _ = ask.send(Err(MeshError::conflict(
                        format!("agent `{}` went silent and was marked offline", a.id),
                        Value::Null,
                    )));
                }
            }
            if a.gone_since.is_some_and(|g| now - g >= grace) {
                gone.push(a.id.clone());
            }
        }
        for id in gone {
            let Some(a) = self.agents.remove(&id) else {
                continue;
            };
            let mut held: Vec<&String> = a.active.iter().collect();
            held.sort();
            for tid in held {
                if let Some(t) = self.tasks.get(tid).cloned() {
                    let why = format!(
                        "agent `{id}` was gone for {} s",
                        self.cfg.reconnect_grace_secs
                    );
                    self.retry_or_bury(t, now, why, false, TaskState::Failed, &mut batch);
                }
            }
            batch.agents.push(a.row(now));
        }
        batch
    }

    /// Assigns pending tasks to free eligible agents, best head of any
    /// signature first (priority, then arrival), until no tenant has a free
    /// slot or every remaining signature is blocked. Costs O(signatures +
    /// agents) per assignment, however many tasks wait.
    pub fn dispatch(&mut self, now: i64) -> Batch {
        let mut batch = Batch::default();
        if self.queues.is_empty() {
            return batch;
        }
        let mut free: HashMap<String, u32> = HashMap::new();
        for a in self.agents.values().filter(|a| a.online()) {
            *free.entry(a.tenant.clone()).or_default() +=
                a.limit.saturating_sub(a.active.len() as u32);
        }
        let mut total: u32 = free.values().sum();
        let mut blocked: HashSet<String> = HashSet::new();
        while total > 0 {
            let mut best: Option<(&QKey, &String)> = None;
            for (sig, q) in &self.queues {
                if blocked.contains(sig) {
                    continue;
                }
                if let Some(head) = q.first()
                    && best.is_none_or(|(b, _)| head < b)
                {
                    best = Some((head, sig));
                }
            }
            let Some((key, sig)) = best.map(|(k, s)| (k.clone(), s.clone())) else {
                break;
            };
            let Some(t) = self.tasks.get(&key.2) else {
                if let Some(q) = self.queues.get_mut(&sig) {
                    q.remove(&key);
                }
                self.qkey.remove(&key.2);
                continue;
            };
            let slots = free.get_mut(&t.tenant);
            let Some(slots) = slots.filter(|f| **f > 0) else {
                blocked.insert(sig);
                continue;
            };
            let need = Need {
                task_type: &t.task_type,
                required: &t.required_capabilities,
                rejected_by: &t.rejected_by,
            };
            let c = self.candidates(&t.tenant, &HashMap::new());
            match choose(self.strategy(t), &need, &c) {
                Some(i) => {
                    let agent = c[i].id.to_owned();
                    *slots -= 1;
                    total -= 1;
                    self.assign(&key, &agent, now, &mut batch);
                }
                None => {
                    blocked.insert(sig);
                }
            }
        }
        batch
    }

    fn assign(&mut self, key: &QKey, agent: &str, now: i64, batch: &mut Batch) {
        let Some(mut t) = self.tasks.remove(&key.2) else {
            return;
        };
        self.unqueue(&t);
        self.assign_seq += 1;
        t.agent_id = Some(agent.to_owned());
        t.attempts += 1;
        t.assigned_at_ms = Some(now);
        let deadline = now + t.timeout_secs as i64 * 1000;
        t.extended_secs = 0;
        t.progress = None;
        t.progress_message = None;
        let note = Some(format!("attempt {} of {}", t.attempts, t.max_retries + 1));
        if t.transition(TaskState::Assigned, now, note).is_err() {
            self.tasks.insert(t.id.clone(), t);
            return;
        }
        t.deadline_ms = Some(deadline);
        self.deadlines.insert((deadline, t.id.clone()));
        if let Some(a) = self.agents.get_mut(agent) {
            a.active.insert(t.id.clone());
            a.last_assigned = self.assign_seq;
            a.stats.assigned += 1;
            a.dirty = true;
            a.send(
                notification("task.assigned", json!({"task": t.assignment()})),
                batch,
            );
        }
        batch.tasks.push(row(&t));
        batch.after.push(state_event(&self.events, &t));
        self.tasks.insert(t.id.clone(), t);
    }

    // ----- views, config, requests to agents -----

    pub fn agent_view(&self, id: &str) -> Option<AgentView> {
        self.agents.get(id).map(Agent::view)
    }

    pub fn live_views(&self, tenant: Option<&str>) -> Vec<AgentView> {
        self.agents
            .values()
            .filter(|a| tenant.is_none_or(|t| t == a.tenant))
            .map(Agent::view)
            .collect()
    }

    pub fn config_changed(&mut self, row: AgentRow) -> Batch {
        let mut batch = Batch::default();
        if let Some(a) = self.agents.get_mut(&row.id) {
            a.config = row.config.clone();
            a.config_version = row.config_version;
            a.config_source = "api";
            a.send(
                notification(
                    "config.update",
                    json!({"version": row.config_version, "config": row.config}),
                ),
                &mut batch,
            );
        }
        batch.agents.push(row);
        batch
    }

    pub fn ask(&mut self, id: &str, rid: &str, method: &str, tx: Ask) -> Result<(), MeshError> {
        let Some(a) = self.agents.get_mut(id).filter(|a| a.online()) else {
            return Err(MeshError::conflict(
                format!("agent `{id}` is not connected"),
                json!({"agent_id": id}),
            ));
        };
        if let Some((_, conn)) = &a.conn {
            let msg = json!({"jsonrpc": "2.0", "id": rid, "method": method});
            let _ = conn.send(Outbound::Text(msg.to_string()));
        }
        a.asks.insert(rid.to_owned(), tx);
        Ok(())
    }

    pub fn forget_ask(&mut self, id: &str, rid: &str) {
        if let Some(a) = self.agents.get_mut(id) {
            a.asks.remove(rid);
        }
    }

    pub fn answered(&mut self, agent: &str, rid: &str, answer: Result<Value, MeshError>) {
        if let Some(a) = self.agents.get_mut(agent)
            && let Some(ask) = a.asks.remove(rid)
        {
            if let Ok(v) = &answer
                && v.get("status").is_some()
            {
                a.health = Some(v.clone());
            }
            let _ = ask.send(answer);
        }
    }

    pub fn set_capabilities(&mut self, id: &str, caps: Vec<Capability>) {
        if let Some(a) = self.agents.get_mut(id) {
            a.caps = caps;
            a.dirty = true;
        }
    }

    pub fn flush_agents(&mut self, now: i64) -> Batch {
        let mut batch = Batch::default();
        for a in self.agents.values_mut().filter(|a| a.dirty) {
            a.dirty = false;
            batch.agents.push(a.row(now));
        }
        batch
    }

    pub fn stats(&self) -> Value {
        let mut by_state: HashMap<&'static str, u64> = HashMap::new();
        for t in self.tasks.values() {
            *by_state.entry(t.state.as_str()).or_default() += 1;
        }
        json!({
            "agents_online": self.agents.values().filter(|a| a.online()).count(),
            "agents_reconnecting": self.agents.values().filter(|a| !a.online()).count(),
            "tasks_open": self.tasks.len(),
            "tasks_by_state": by_state,
            "tasks_waiting_retry": self.delayed.len(),
        })
    }

    pub fn publish_gauges(&self) {
        let online = self.agents.values().filter(|a| a.online()).count();
        metrics::gauge!("agent_agents_online").set(online as f64);
        let mut by_state: HashMap<&'static str, u64> = HashMap::new();
        for t in self.tasks.values() {
            *by_state.entry(t.state.as_str()).or_default() += 1;
        }
        for s in [
            TaskState::Pending,
            TaskState::Assigned,
            TaskState::Accepted,
            TaskState::InProgress,
        ] {
            metrics::gauge!("agent_queue_depth", "state" => s.as_str())
                .set(by_state.get(s.as_str()).copied().unwrap_or(0) as f64);
        }
    }
}
