//! The embedded store: one SQLite file in the data directory, WAL mode.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};

use crate::{SessionRecord, Store, StoreError, StoreResult, UpstreamRecord, migrate};

/// [`Store`] on a SQLite database file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) `meshgate.db` in `data_dir` and migrates it.
    pub async fn open(data_dir: &Path) -> StoreResult<SqliteStore> {
        let path = data_dir.join("meshgate.db");
        let shown = path.display().to_string();
        let options = SqliteConnectOptions::from_str("sqlite://")
            .map_err(|source| StoreError::Open {
                path: shown.clone(),
                source,
            })?
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Open {
                path: shown,
                source,
            })?;
        migrate::run_sqlite(&pool).await?;
        Ok(SqliteStore { pool })
    }

    /// The SQLite journal mode in force (`wal` after [`SqliteStore::open`]).
    pub async fn journal_mode(&self) -> StoreResult<String> {
        Ok(sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&self.pool)
            .await?)
    }
}

fn json(row: &SqliteRow, col: &str, what: &'static str) -> StoreResult<serde_json::Value> {
    let text: String = row.try_get(col)?;
    serde_json::from_str(&text).map_err(|source| StoreError::Corrupt { what, source })
}

fn session_from(row: &SqliteRow) -> StoreResult<SessionRecord> {
    Ok(SessionRecord {
        id: row.try_get("id")?,
        transport: row.try_get("transport")?,
        protocol_version: row.try_get("protocol_version")?,
        client_name: row.try_get("client_name")?,
        client_version: row.try_get("client_version")?,
        state: json(row, "state", "session state")?,
        created_at: row.try_get("created_at")?,
        last_seen_at: row.try_get("last_seen_at")?,
    })
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn schema_version(&self) -> StoreResult<i64> {
        Ok(
            sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn upsert_upstream(&self, r: &UpstreamRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO upstreams (name, source, definition, created_at, updated_at) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT(name) DO UPDATE SET source = excluded.source, definition = excluded.definition, updated_at = excluded.updated_at",
        )
        .bind(&r.name)
        .bind(&r.source)
        .bind(r.definition.to_string())
        .bind(r.created_at)
        .bind(r.updated_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list_upstreams(&self) -> StoreResult<Vec<UpstreamRecord>> {
        let rows = sqlx::query(
            "SELECT name, source, definition, created_at, updated_at FROM upstreams ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(UpstreamRecord {
                    name: row.try_get("name")?,
                    source: row.try_get("source")?,
                    definition: json(row, "definition", "upstream definition")?,
                    created_at: row.try_get("created_at")?,
                    updated_at: row.try_get("updated_at")?,
                })
            })
            .collect()
    }

    async fn prune_upstreams(&self, source: &str, keep: &[String]) -> StoreResult<u64> {
        let mut removed = 0;
        for r in self.list_upstreams().await? {
            if r.source == source && !keep.contains(&r.name) {
                removed += sqlx::query("DELETE FROM upstreams WHERE name = ?")
                    .bind(&r.name)
                    .execute(&self.pool)
                    .await?
                    .rows_affected();
            }
        }
        Ok(removed)
    }

    async fn put_session(&self, r: &SessionRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO sessions (id, transport, protocol_version, client_name, client_version, state, created_at, last_seen_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT(id) DO UPDATE SET transport = excluded.transport, protocol_version = excluded.protocol_version,
               client_name = excluded.client_name, client_version = excluded.client_version, state = excluded.state,
               last_seen_at = excluded.last_seen_at",
        )
        .bind(&r.id)
        .bind(&r.transport)
        .bind(&r.protocol_version)
        .bind(&r.client_name)
        .bind(&r.client_version)
        .bind(r.state.to_string())
        .bind(r.created_at)
        .bind(r.last_seen_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn get_session(&self, id: &str) -> StoreResult<Option<SessionRecord>> {
        let row = sqlx::query("SELECT * FROM sessions WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(session_from).transpose()
    }

    async fn delete_session(&self, id: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM sessions WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn count_sessions(&self) -> StoreResult<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM sessions")
            .fetch_one(&self.pool)
            .await?)
    }

    async fn purge_sessions_before(&self, before: i64) -> StoreResult<u64> {
        let done = sqlx::query("DELETE FROM sessions WHERE last_seen_at < ?")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "meshgate-store-{tag}-{}-{}",
            std::process::id(),
            crate::now_ms()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn session(id: &str, seen: i64) -> SessionRecord {
        SessionRecord {
            id: id.into(),
            transport: "streamable_http".into(),
            protocol_version: "2025-06-18".into(),
            client_name: "c".into(),
            client_version: "1".into(),
            state: json!({"initialize_params": {"x": 1}}),
            created_at: seen,
            last_seen_at: seen,
        }
    }

    #[tokio::test]
    async fn opens_in_wal_mode_and_migrates_once() {
        let dir = temp_dir("wal");
        let store = SqliteStore::open(&dir).await.unwrap();
        assert_eq!(store.journal_mode().await.unwrap(), "wal");
        assert_eq!(store.schema_version().await.unwrap(), 1);
        drop(store);
        let again = SqliteStore::open(&dir).await.unwrap();
        assert_eq!(again.schema_version().await.unwrap(), 1);
        assert!(dir.join("meshgate.db").exists());
    }

    #[tokio::test]
    async fn refuses_a_schema_from_the_future() {
        let dir = temp_dir("future");
        let store = SqliteStore::open(&dir).await.unwrap();
        sqlx::query("INSERT INTO schema_migrations VALUES (99, 'future', 0)")
            .execute(&store.pool)
            .await
            .unwrap();
        drop(store);
        let err = SqliteStore::open(&dir).await.unwrap_err().to_string();
        assert!(err.contains("99") && err.contains("newer"), "{err}");
    }

    #[tokio::test]
    async fn sessions_round_trip_and_survive_reopen() {
        let dir = temp_dir("sess");
        let store = SqliteStore::open(&dir).await.unwrap();
        store.put_session(&session("a", 10)).await.unwrap();
        store.put_session(&session("b", 1000)).await.unwrap();
        drop(store);
        let store = SqliteStore::open(&dir).await.unwrap();
        assert_eq!(
            store.get_session("a").await.unwrap(),
            Some(session("a", 10))
        );
        assert_eq!(store.count_sessions().await.unwrap(), 2);
        assert_eq!(store.purge_sessions_before(500).await.unwrap(), 1);
        assert!(store.get_session("a").await.unwrap().is_none());
        assert!(store.delete_session("b").await.unwrap());
        assert!(!store.delete_session("b").await.unwrap());
    }

    #[tokio::test]
    async fn upstreams_upsert_and_prune_by_source() {
        let store = SqliteStore::open(&temp_dir("up")).await.unwrap();
        for (name, source) in [("a", "config"), ("b", "config"), ("c", "api")] {
            store
                .upsert_upstream(&UpstreamRecord {
                    name: name.into(),
                    source: source.into(),
                    definition: json!({"url": name}),
                    created_at: 1,
                    updated_at: 1,
                })
                .await
                .unwrap();
        }
        assert_eq!(
            store
                .prune_upstreams("config", &["a".into()])
                .await
                .unwrap(),
            1
        );
        let names: Vec<_> = store
            .list_upstreams()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["a", "c"]);
    }
}
