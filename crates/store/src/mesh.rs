//! Durable state of the agent mesh: tasks, agents and blobs, behind
//! [`MeshStore`]. As elsewhere in this crate the payloads (`doc`, `config`)
//! are opaque JSON; only the columns the mesh filters on are broken out.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::StoreResult;

/// Task states after which a task never changes again. [`MeshStore::open_tasks`]
/// returns every task in another state and [`MeshStore::purge_tasks`] deletes
/// only tasks in one of these.
pub const TERMINAL_TASK_STATES: [&str; 4] = ["completed", "failed", "cancelled", "timeout"];

/// A stored task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRow {
    /// Task id, `t-…` (primary key).
    pub id: String,
    /// Assigned by the store on first insert, increasing and never reused;
    /// ignored on write. Orders tasks by creation and is the paging cursor.
    pub seq: i64,
    /// Owning tenant.
    pub tenant: String,
    /// `pending`, `assigned`, `accepted`, `in_progress`, `completed`,
    /// `failed`, `cancelled` or `timeout`.
    pub state: String,
    /// What kind of task (routes it to agents that handle it).
    pub task_type: String,
    /// The agent it is assigned to, if any.
    pub agent_id: Option<String>,
    /// Client-chosen key, unique per tenant, that makes a submission idempotent.
    pub idempotency_key: Option<String>,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms.
    pub updated_at: i64,
    /// The whole task as JSON (opaque to the store).
    pub doc: serde_json::Value,
}

/// Filters and paging of a task query. Tasks come newest (highest `seq`)
/// first; filters are ANDed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TaskQuery {
    /// Only this tenant (`None`: every tenant).
    pub tenant: Option<String>,
    /// Only this state.
    pub state: Option<String>,
    /// Only this task type.
    pub task_type: Option<String>,
    /// Only tasks assigned to this agent.
    pub agent_id: Option<String>,
    /// Paging cursor: only tasks with a smaller `seq`.
    pub before_seq: Option<i64>,
    /// At most this many tasks: 0 means 100, more than 1000 means 1000.
    pub limit: u32,
}

/// A stored agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRow {
    /// Agent id (primary key).
    pub id: String,
    /// Owning tenant.
    pub tenant: String,
    /// What kind of agent.
    pub agent_type: String,
    /// Registration and stats, as JSON.
    pub doc: serde_json::Value,
    /// The configuration pushed to the agent, as JSON.
    pub config: serde_json::Value,
    /// Version of `config`, raised on every change.
    pub config_version: i64,
    /// Unix ms the agent was last heard from.
    pub last_seen_at: i64,
    /// Unix ms.
    pub updated_at: i64,
}

/// A stored binary payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlobRow {
    /// Blob id (primary key).
    pub id: String,
    /// Owning tenant.
    pub tenant: String,
    /// MIME type of `data`.
    pub content_type: String,
    /// SHA-256 of `data`, hex (recorded, not checked, by the store).
    pub sha256: String,
    /// Length of `data` in bytes (recorded, not checked, by the store).
    pub size: i64,
    /// The bytes.
    pub data: Vec<u8>,
    /// Unix ms.
    pub created_at: i64,
}

/// A stored shared-state document (a CRDT, opaque JSON to the store).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateDocRow {
    /// Owning tenant (with `name`, the primary key).
    pub tenant: String,
    /// Document name.
    pub name: String,
    /// The CRDT state as canonical JSON.
    pub state: serde_json::Value,
    /// Digest of `state`, as the mesh computes it.
    pub hash: String,
    /// Raised by the writer on every change.
    pub version: i64,
    /// Bytes of the serialized `state`; filled in by the store on write.
    pub size: i64,
    /// Unix ms.
    pub updated_at: i64,
}

/// A document's listing entry: everything but the state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateDocSummary {
    /// Document name.
    pub name: String,
    /// Digest of the state.
    pub hash: String,
    /// Version.
    pub version: i64,
    /// Bytes of the stored state.
    pub size: i64,
    /// Unix ms.
    pub updated_at: i64,
}

/// Everything the agent mesh persists. Implementations must be safe to share
/// between tasks; every method is one short transaction.
#[async_trait]
pub trait MeshStore: Send + Sync + std::fmt::Debug {
    /// Upserts every row, in order, in ONE transaction: new ids are inserted
    /// (and get their `seq`), existing ones have every column but `seq`
    /// replaced. The hot path of the group-commit writer (up to ~1000 rows).
    ///
    /// Errors: a row whose (tenant, idempotency key) belongs to another task
    /// id, in the database or earlier in the batch, fails the call with
    /// [`StoreError::Duplicate`](crate::StoreError::Duplicate)
    /// `{ what: "task idempotency key" }` and NONE of the batch is written.
    async fn write_tasks(&self, rows: &[TaskRow]) -> StoreResult<()>;
    /// Reads a task by id.
    async fn get_task(&self, id: &str) -> StoreResult<Option<TaskRow>>;
    /// The task of `tenant` with this idempotency key, if any.
    async fn find_task_by_idempotency(
        &self,
        tenant: &str,
        key: &str,
    ) -> StoreResult<Option<TaskRow>>;
    /// Tasks matching `q`, newest (highest `seq`) first.
    async fn query_tasks(&self, q: &TaskQuery) -> StoreResult<Vec<TaskRow>>;
    /// Every task not in a [terminal state](TERMINAL_TASK_STATES), oldest
    /// (lowest `seq`) first: what the mesh reloads at start-up.
    async fn open_tasks(&self) -> StoreResult<Vec<TaskRow>>;
    /// `(tenant, idempotency_key, task id)` of every task that has a key, for
    /// the in-memory idempotency index loaded at start-up.
    async fn idempotency_keys(&self) -> StoreResult<Vec<(String, String, String)>>;
    /// Number of tasks per state, `(state, count)` ordered by state; states
    /// without tasks are absent.
    async fn count_tasks_by_state(&self) -> StoreResult<Vec<(String, i64)>>;
    /// Deletes at most `limit` tasks in a terminal state last updated before
    /// `before` (unix ms); returns how many. Call again while it returns
    /// `limit` to purge everything; `limit` 0 deletes nothing. The newest
    /// task (highest `seq`) may be kept, so that its `seq` is never reused.
    async fn purge_tasks(&self, before: i64, limit: u32) -> StoreResult<u64>;

    /// Inserts or replaces an agent (by id).
    async fn put_agent(&self, row: &AgentRow) -> StoreResult<()>;
    /// Reads an agent by id.
    async fn get_agent(&self, id: &str) -> StoreResult<Option<AgentRow>>;
    /// Agents of `tenant` (every tenant when `None`), ordered by id.
    async fn list_agents(&self, tenant: Option<&str>) -> StoreResult<Vec<AgentRow>>;

    /// Inserts or replaces a blob (by id).
    async fn put_blob(&self, row: &BlobRow) -> StoreResult<()>;
    /// Reads a blob by id.
    async fn get_blob(&self, id: &str) -> StoreResult<Option<BlobRow>>;

    /// Inserts or replaces a state document (by tenant and name).
    async fn put_state_doc(&self, row: &StateDocRow) -> StoreResult<()>;
    /// Reads a state document.
    async fn get_state_doc(&self, tenant: &str, name: &str) -> StoreResult<Option<StateDocRow>>;
    /// The documents of `tenant`, ordered by name.
    async fn list_state_docs(&self, tenant: &str) -> StoreResult<Vec<StateDocSummary>>;

    /// This database's node id: `candidate` is stored the first time and the
    /// stored value returned from then on, so the id survives restarts.
    async fn node_id(&self, candidate: &str) -> StoreResult<String>;
}
