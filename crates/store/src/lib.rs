//! Persistence behind one trait, [`Store`], so that callers never know which
//! database holds their data. The embedded default is [`SqliteStore`] (a file
//! in the data directory, WAL mode); a PostgreSQL implementation plugs in
//! behind the same trait and runs the same test suite.
//!
//! Architecture invariant: this crate knows nothing about MCP or HTTP; it
//! stores records whose payloads are opaque JSON.

mod migrate;
mod sqlite;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use thiserror::Error;

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
}

/// Current time in unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
