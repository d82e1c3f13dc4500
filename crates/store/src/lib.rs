//! Persistence behind one trait, [`Store`], so that callers never know which
//! database holds their data. The embedded default is [`SqliteStore`] (a file
//! in the data directory, WAL mode); a PostgreSQL implementation plugs in
//! behind the same trait and runs the same test suite.
//!
//! Architecture invariant: this crate knows nothing about MCP or HTTP; it
//! stores records whose payloads are opaque JSON.

mod mesh;
mod migrate;
mod sqlite;
mod sqlite_mesh;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use mesh::{
    AgentRow, BlobRow, MeshStore, StateDocRow, StateDocSummary, TERMINAL_TASK_STATES, TaskQuery,
    TaskRow,
};
pub use sqlite::SqliteStore;

/// What went wrong in the store, and what to do about it.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The database could not be opened or created.
    #[error(
        "cannot open database {path}: {source}; check that the data directory exists and is writable"
    )]
    Open {
        /// Database location.
        path: String,
        /// Driver error.
        source: sqlx::Error,
    },
    /// The database was written by a newer meshgate.
    #[error(
        "database schema version {found} is newer than this binary supports ({supported}); run a newer meshgate or point --data-dir elsewhere"
    )]
    SchemaTooNew {
        /// Version recorded in the database.
        found: i64,
        /// Newest version this binary knows.
        supported: i64,
    },
    /// A migration failed to apply.
    #[error("migration {version} ({name}) failed: {source}")]
    Migration {
        /// Migration number.
        version: i64,
        /// Migration name.
        name: &'static str,
        /// Driver error.
        source: sqlx::Error,
    },
    /// A stored JSON payload could not be read back.
    #[error("stored {what} is not valid JSON: {source}")]
    Corrupt {
        /// What kind of record.
        what: &'static str,
        /// Parser error.
        source: serde_json::Error,
    },
    /// A unique value (key or token hash, id) already exists.
    #[error("{what} already exists")]
    Duplicate {
        /// What kind of record.
        what: &'static str,
    },
    /// Any other database error.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
}

/// Result alias for store operations.
pub type StoreResult<T> = Result<T, StoreError>;

/// A stored upstream definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpstreamRecord {
    /// Unique upstream name.
    pub name: String,
    /// Where it came from: `config` or `api`.
    pub source: String,
    /// The upstream's configuration as JSON.
    pub definition: serde_json::Value,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds.
    pub updated_at: i64,
}

/// A stored MCP client session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// The `Mcp-Session-Id` (or legacy SSE session id).
    pub id: String,
    /// `streamable_http` or `sse`.
    pub transport: String,
    /// Negotiated protocol revision.
    pub protocol_version: String,
    /// `clientInfo.name`.
    pub client_name: String,
    /// `clientInfo.version`.
    pub client_version: String,
    /// What is needed to resume the session (the initialize parameters), as JSON.
    pub state: serde_json::Value,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds.
    pub last_seen_at: i64,
}

/// A stored API key: everything but the key itself, which is only ever shown
/// once, at creation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    /// Public id, `key_` + 16 hex characters.
    pub id: String,
    /// SHA-256 of the key, hex (unique).
    pub hash: String,
    /// `mg_` and the first characters of the key, to recognise it in listings.
    pub prefix: String,
    /// Human name.
    pub name: String,
    /// Owning tenant.
    pub tenant: String,
    /// Role (`admin`, `operator`, `developer`, `agent`, `viewer`).
    pub role: String,
    /// Scopes, sorted.
    pub scopes: Vec<String>,
    /// Unix ms.
    pub created_at: i64,
    /// Who created it (a key id, or `cli`/`bootstrap`).
    pub created_by: String,
    /// Unix ms after which it is refused; `None`: never expires.
    pub expires_at: Option<i64>,
    /// Unix ms it was revoked at.
    pub revoked_at: Option<i64>,
    /// Requests per minute allowed for this key (`None`: the tenant's default).
    pub rate_limit_per_minute: Option<u32>,
    /// Unix ms it was last used (updated at most about once a minute).
    pub last_used_at: Option<i64>,
}

/// A stored refresh token (hash only). Tokens of one login form a family:
/// each refresh uses one up and issues the next; reusing a used one revokes
/// the whole family.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefreshTokenRecord {
    /// Token id.
    pub id: String,
    /// SHA-256 of the token, hex (unique).
    pub hash: String,
    /// Family id, shared by every token rotated from one exchange.
    pub family: String,
    /// The API key the family was issued from.
    pub key_id: String,
    /// Owning tenant.
    pub tenant: String,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms.
    pub expires_at: i64,
    /// Unix ms it was exchanged for a new pair.
    pub used_at: Option<i64>,
    /// Unix ms it (and its family) was revoked.
    pub revoked_at: Option<i64>,
}

/// One audit log entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Sequence number, assigned by the store (0 before insertion).
    pub id: i64,
    /// Unix ms.
    pub at: i64,
    /// Tenant the action happened in.
    pub tenant: String,
    /// Who: key id or token subject.
    pub actor: String,
    /// How the actor authenticated (`api_key`, `access_token`, `oauth`, `cli`, `anonymous`, `system`).
    pub actor_kind: String,
    /// What: `tool.call`, `key.create`, `key.update`, `key.revoke`, `token.issue`,
    /// `token.refresh`, `token.reuse`, `token.logout`, `auth.lockout`, ...
    pub action: String,
    /// On what: a tool name, key id, ...
    pub target: String,
    /// SHA-256 of the canonical arguments (tool calls).
    pub args_hash: Option<String>,
    /// `ok`, `error`, `denied`, `tool_error`.
    pub outcome: String,
    /// How long it took, in milliseconds.
    pub latency_ms: Option<f64>,
    /// The request's `X-Trace-ID`.
    pub trace_id: Option<String>,
    /// Anything else worth keeping (error message, changed fields), as JSON.
    pub detail: serde_json::Value,
}

/// Filters and paging of an audit query. Entries come newest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditQuery {
    /// Only this tenant (`None`: every tenant).
    pub tenant: Option<String>,
    /// Only this actor.
    pub actor: Option<String>,
    /// Only this action.
    pub action: Option<String>,
    /// Only this target.
    pub target: Option<String>,
    /// Only this outcome.
    pub outcome: Option<String>,
    /// Only entries at or after this unix ms.
    pub since: Option<i64>,
    /// Only entries before this unix ms.
    pub until: Option<i64>,
    /// Paging cursor: only entries with a smaller id.
    pub before_id: Option<i64>,
    /// At most this many entries.
    pub limit: u32,
}

/// Everything the gateway persists. Implementations must be safe to share
/// between tasks; every method is one short transaction.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Which backend this is (`sqlite`, `postgres`), for health output.
    fn backend(&self) -> &'static str;
    /// Cheap round trip proving the database answers.
    async fn ping(&self) -> StoreResult<()>;
    /// The applied schema version.
    async fn schema_version(&self) -> StoreResult<i64>;

    /// Inserts or replaces an upstream definition.
    async fn upsert_upstream(&self, record: &UpstreamRecord) -> StoreResult<()>;
    /// All upstream definitions, by name.
    async fn list_upstreams(&self) -> StoreResult<Vec<UpstreamRecord>>;
    /// Deletes upstreams of `source` whose names are not in `keep`; returns how many.
    async fn prune_upstreams(&self, source: &str, keep: &[String]) -> StoreResult<u64>;
    /// Deletes upstream `name` if its source is `source`; returns whether it did.
    async fn delete_upstream(&self, name: &str, source: &str) -> StoreResult<bool>;
    /// Stores `record` in place of upstream `old` of the same source, in one
    /// transaction: a crash leaves the old row or the new one, never both.
    async fn rename_upstream(&self, old: &str, record: &UpstreamRecord) -> StoreResult<()>;

    /// Inserts or replaces a session.
    async fn put_session(&self, record: &SessionRecord) -> StoreResult<()>;
    /// Reads a session.
    async fn get_session(&self, id: &str) -> StoreResult<Option<SessionRecord>>;
    /// Deletes a session; true if it existed.
    async fn delete_session(&self, id: &str) -> StoreResult<bool>;
    /// Number of stored sessions.
    async fn count_sessions(&self) -> StoreResult<i64>;
    /// Deletes sessions not seen since `before` (unix ms); returns how many.
    async fn purge_sessions_before(&self, before: i64) -> StoreResult<u64>;

    /// Stores a new API key.
    async fn insert_api_key(&self, record: &ApiKeyRecord) -> StoreResult<()>;
    /// Reads a key by id.
    async fn get_api_key(&self, id: &str) -> StoreResult<Option<ApiKeyRecord>>;
    /// Reads a key by the hash of its secret.
    async fn find_api_key_by_hash(&self, hash: &str) -> StoreResult<Option<ApiKeyRecord>>;
    /// Keys of `tenant` (every tenant when `None`), oldest first.
    async fn list_api_keys(&self, tenant: Option<&str>) -> StoreResult<Vec<ApiKeyRecord>>;
    /// Number of keys, revoked ones included.
    async fn count_api_keys(&self) -> StoreResult<i64>;
    /// Replaces a key's scopes; false if no such key.
    async fn update_api_key_scopes(&self, id: &str, scopes: &[String]) -> StoreResult<bool>;
    /// Sets `revoked_at` unless already revoked; false if no such live key.
    async fn revoke_api_key(&self, id: &str, at: i64) -> StoreResult<bool>;
    /// Sets `last_used_at`.
    async fn touch_api_key(&self, id: &str, at: i64) -> StoreResult<()>;

    /// Stores a new refresh token.
    async fn insert_refresh_token(&self, record: &RefreshTokenRecord) -> StoreResult<()>;
    /// Reads a refresh token by the hash of its secret.
    async fn find_refresh_token_by_hash(
        &self,
        hash: &str,
    ) -> StoreResult<Option<RefreshTokenRecord>>;
    /// Marks a token used, atomically: true for the first caller only.
    async fn mark_refresh_token_used(&self, id: &str, at: i64) -> StoreResult<bool>;
    /// Revokes every token of a family; returns how many were live.
    async fn revoke_refresh_family(&self, family: &str, at: i64) -> StoreResult<u64>;
    /// Revokes every family issued from an API key; returns the families.
    async fn revoke_refresh_families_of_key(
        &self,
        key_id: &str,
        at: i64,
    ) -> StoreResult<Vec<String>>;
    /// Families with a revoked token that has not expired at `now`.
    async fn revoked_families(&self, now: i64) -> StoreResult<Vec<String>>;

    /// Appends entries in one transaction.
    async fn append_audit(&self, records: &[AuditRecord]) -> StoreResult<()>;
    /// Entries matching `query`, newest first.
    async fn query_audit(&self, query: &AuditQuery) -> StoreResult<Vec<AuditRecord>>;
    /// Deletes entries older than `before` (unix ms) and beyond the newest
    /// `keep_newest` (0 = no limit); returns how many.
    async fn purge_audit(&self, before: i64, keep_newest: u64) -> StoreResult<u64>;

    /// Records who opened a session (its tenant and subject).
    async fn set_session_owner(&self, id: &str, tenant: &str, subject: &str) -> StoreResult<()>;
    /// The tenant and subject that opened a session.
    async fn session_owner(&self, id: &str) -> StoreResult<Option<(String, String)>>;

    /// Remembers that session `id` was ended, until `expires_at` (unix ms);
    /// also forgets ended sessions whose time has passed.
    async fn end_session(&self, id: &str, expires_at: i64) -> StoreResult<()>;
    /// Whether session `id` was ended (and its record has not expired).
    async fn session_ended(&self, id: &str) -> StoreResult<bool>;
}

/// Current time in unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
