//! The embedded store: one SQLite file in the data directory, WAL mode.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use std::collections::BTreeSet;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite};

use crate::{
    ApiKeyRecord, AuditQuery, AuditRecord, RefreshTokenRecord, SessionRecord, Store, StoreError,
    StoreResult, UpstreamRecord, migrate,
};

/// Audit query page size when the caller asks for 0.
const AUDIT_DEFAULT_LIMIT: u32 = 100;
/// Largest audit query page.
const AUDIT_MAX_LIMIT: u32 = 1000;

const API_KEY_COLUMNS: &str = "id, hash, prefix, name, tenant, role, scopes, created_at, created_by, expires_at, revoked_at, rate_limit_per_minute, last_used_at";
const REFRESH_COLUMNS: &str =
    "id, hash, family, key_id, tenant, created_at, expires_at, used_at, revoked_at";
const AUDIT_COLUMNS: &str = "id, at, tenant, actor, actor_kind, action, target, args_hash, outcome, latency_ms, trace_id, detail";

/// [`Store`] on a SQLite database file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pub(crate) pool: SqlitePool,
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
            .foreign_keys(true)
            // 32 MiB of page cache per connection (the default is 2 MiB):
            // the task tables' indexes stay in memory under load.
            .pragma("cache_size", "-32768");
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

/// Reads a JSON text column, reporting [`StoreError::Corrupt`] for `what`.
pub(crate) fn json<T: DeserializeOwned>(
    row: &SqliteRow,
    col: &str,
    what: &'static str,
) -> StoreResult<T> {
    let text: String = row.try_get(col)?;
    serde_json::from_str(&text).map_err(|source| StoreError::Corrupt { what, source })
}

/// Scopes as the JSON array stored in `api_keys.scopes`.
fn scopes_json(scopes: &[String]) -> String {
    serde_json::Value::from(scopes.to_vec()).to_string()
}

/// Maps a UNIQUE (or PRIMARY KEY) violation to [`StoreError::Duplicate`].
pub(crate) fn duplicate(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| match e {
        sqlx::Error::Database(ref db) if db.is_unique_violation() => StoreError::Duplicate { what },
        other => StoreError::Db(other),
    }
}

fn api_key_from(row: &SqliteRow) -> StoreResult<ApiKeyRecord> {
    Ok(ApiKeyRecord {
        id: row.try_get("id")?,
        hash: row.try_get("hash")?,
        prefix: row.try_get("prefix")?,
        name: row.try_get("name")?,
        tenant: row.try_get("tenant")?,
        role: row.try_get("role")?,
        scopes: json(row, "scopes", "api key scopes")?,
        created_at: row.try_get("created_at")?,
        created_by: row.try_get("created_by")?,
        expires_at: row.try_get("expires_at")?,
        revoked_at: row.try_get("revoked_at")?,
        rate_limit_per_minute: row.try_get("rate_limit_per_minute")?,
        last_used_at: row.try_get("last_used_at")?,
    })
}

fn refresh_from(row: &SqliteRow) -> StoreResult<RefreshTokenRecord> {
    Ok(RefreshTokenRecord {
        id: row.try_get("id")?,
        hash: row.try_get("hash")?,
        family: row.try_get("family")?,
        key_id: row.try_get("key_id")?,
        tenant: row.try_get("tenant")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        used_at: row.try_get("used_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

fn audit_from(row: &SqliteRow) -> StoreResult<AuditRecord> {
    Ok(AuditRecord {
        id: row.try_get("id")?,
        at: row.try_get("at")?,
        tenant: row.try_get("tenant")?,
        actor: row.try_get("actor")?,
        actor_kind: row.try_get("actor_kind")?,
        action: row.try_get("action")?,
        target: row.try_get("target")?,
        args_hash: row.try_get("args_hash")?,
        outcome: row.try_get("outcome")?,
        latency_ms: row.try_get("latency_ms")?,
        trace_id: row.try_get("trace_id")?,
        detail: json(row, "detail", "audit detail")?,
    })
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

/// Inserts `r`, or replaces the row of the same name.
fn upsert_upstream_query(
    r: &UpstreamRecord,
) -> sqlx::query::Query<'_, Sqlite, sqlx::sqlite::SqliteArguments<'_>> {
    sqlx::query(
        "INSERT INTO upstreams (name, source, definition, created_at, updated_at) VALUES (?, ?, ?, ?, ?)
         ON CONFLICT(name) DO UPDATE SET source = excluded.source, definition = excluded.definition, updated_at = excluded.updated_at",
    )
    .bind(&r.name)
    .bind(&r.source)
    .bind(r.definition.to_string())
    .bind(r.created_at)
    .bind(r.updated_at)
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
        upsert_upstream_query(r).execute(&self.pool).await?;
        Ok(())
    }

    async fn delete_upstream(&self, name: &str, source: &str) -> StoreResult<bool> {
        let deleted = sqlx::query("DELETE FROM upstreams WHERE name = ? AND source = ?")
            .bind(name)
            .bind(source)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(deleted > 0)
    }

    async fn rename_upstream(&self, old: &str, r: &UpstreamRecord) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM upstreams WHERE name = ? AND source = ?")
            .bind(old)
            .bind(&r.source)
            .execute(&mut *tx)
            .await?;
        upsert_upstream_query(r).execute(&mut *tx).await?;
        tx.commit().await?;
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
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("DELETE FROM sessions WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM session_owners WHERE session_id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() > 0)
    }

    async fn count_sessions(&self) -> StoreResult<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM sessions")
            .fetch_one(&self.pool)
            .await?)
    }

    async fn purge_sessions_before(&self, before: i64) -> StoreResult<u64> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("DELETE FROM sessions WHERE last_seen_at < ?")
            .bind(before)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "DELETE FROM session_owners WHERE NOT EXISTS (SELECT 1 FROM sessions WHERE sessions.id = session_owners.session_id)",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    async fn insert_api_key(&self, r: &ApiKeyRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO api_keys (id, hash, prefix, name, tenant, role, scopes, created_at, created_by, expires_at, revoked_at, rate_limit_per_minute, last_used_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&r.id)
        .bind(&r.hash)
        .bind(&r.prefix)
        .bind(&r.name)
        .bind(&r.tenant)
        .bind(&r.role)
        .bind(scopes_json(&r.scopes))
        .bind(r.created_at)
        .bind(&r.created_by)
        .bind(r.expires_at)
        .bind(r.revoked_at)
        .bind(r.rate_limit_per_minute)
        .bind(r.last_used_at)
        .execute(&self.pool)
        .await
        .map_err(duplicate("api key"))?;
        Ok(())
    }

    async fn get_api_key(&self, id: &str) -> StoreResult<Option<ApiKeyRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {API_KEY_COLUMNS} FROM api_keys WHERE id = ?"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(api_key_from).transpose()
    }

    async fn find_api_key_by_hash(&self, hash: &str) -> StoreResult<Option<ApiKeyRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {API_KEY_COLUMNS} FROM api_keys WHERE hash = ?"
        ))
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(api_key_from).transpose()
    }

    async fn list_api_keys(&self, tenant: Option<&str>) -> StoreResult<Vec<ApiKeyRecord>> {
        let rows = match tenant {
            Some(tenant) => sqlx::query(&format!(
                "SELECT {API_KEY_COLUMNS} FROM api_keys WHERE tenant = ? ORDER BY created_at, id"
            ))
            .bind(tenant)
            .fetch_all(&self.pool)
            .await?,
            None => {
                sqlx::query(&format!(
                    "SELECT {API_KEY_COLUMNS} FROM api_keys ORDER BY created_at, id"
                ))
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(api_key_from).collect()
    }

    async fn count_api_keys(&self) -> StoreResult<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM api_keys")
            .fetch_one(&self.pool)
            .await?)
    }

    async fn update_api_key_scopes(&self, id: &str, scopes: &[String]) -> StoreResult<bool> {
        let done = sqlx::query("UPDATE api_keys SET scopes = ? WHERE id = ?")
            .bind(scopes_json(scopes))
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn revoke_api_key(&self, id: &str, at: i64) -> StoreResult<bool> {
        let done =
            sqlx::query("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")
                .bind(at)
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn touch_api_key(&self, id: &str, at: i64) -> StoreResult<()> {
        sqlx::query("UPDATE api_keys SET last_used_at = ? WHERE id = ?")
            .bind(at)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn insert_refresh_token(&self, r: &RefreshTokenRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO refresh_tokens (id, hash, family, key_id, tenant, created_at, expires_at, used_at, revoked_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&r.id)
        .bind(&r.hash)
        .bind(&r.family)
        .bind(&r.key_id)
        .bind(&r.tenant)
        .bind(r.created_at)
        .bind(r.expires_at)
        .bind(r.used_at)
        .bind(r.revoked_at)
        .execute(&self.pool)
        .await
        .map_err(duplicate("refresh token"))?;
        Ok(())
    }

    async fn find_refresh_token_by_hash(
        &self,
        hash: &str,
    ) -> StoreResult<Option<RefreshTokenRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {REFRESH_COLUMNS} FROM refresh_tokens WHERE hash = ?"
        ))
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(refresh_from).transpose()
    }

    async fn mark_refresh_token_used(&self, id: &str, at: i64) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE refresh_tokens SET used_at = ? WHERE id = ? AND used_at IS NULL AND revoked_at IS NULL",
        )
        .bind(at)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn revoke_refresh_family(&self, family: &str, at: i64) -> StoreResult<u64> {
        let done = sqlx::query(
            "UPDATE refresh_tokens SET revoked_at = ? WHERE family = ? AND revoked_at IS NULL",
        )
        .bind(at)
        .bind(family)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn revoke_refresh_families_of_key(
        &self,
        key_id: &str,
        at: i64,
    ) -> StoreResult<Vec<String>> {
        let families: Vec<String> = sqlx::query_scalar(
            "UPDATE refresh_tokens SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL RETURNING family",
        )
        .bind(at)
        .bind(key_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(families
            .into_iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect())
    }

    async fn revoked_families(&self, now: i64) -> StoreResult<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT family FROM refresh_tokens WHERE revoked_at IS NOT NULL AND expires_at > ? ORDER BY family",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn append_audit(&self, records: &[AuditRecord]) -> StoreResult<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for r in records {
            sqlx::query(
                "INSERT INTO audit_log (at, tenant, actor, actor_kind, action, target, args_hash, outcome, latency_ms, trace_id, detail)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(r.at)
            .bind(&r.tenant)
            .bind(&r.actor)
            .bind(&r.actor_kind)
            .bind(&r.action)
            .bind(&r.target)
            .bind(&r.args_hash)
            .bind(&r.outcome)
            .bind(r.latency_ms)
            .bind(&r.trace_id)
            .bind(r.detail.to_string())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn query_audit(&self, query: &AuditQuery) -> StoreResult<Vec<AuditRecord>> {
        let limit = match query.limit {
            0 => AUDIT_DEFAULT_LIMIT,
            n => n.min(AUDIT_MAX_LIMIT),
        };
        let mut sql = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_log WHERE 1 = 1"
        ));
        let text_filters = [
            ("tenant", &query.tenant),
            ("actor", &query.actor),
            ("action", &query.action),
            ("target", &query.target),
            ("outcome", &query.outcome),
        ];
        for (column, value) in text_filters {
            if let Some(value) = value {
                sql.push(format_args!(" AND {column} = "))
                    .push_bind(value.as_str());
            }
        }
        if let Some(since) = query.since {
            sql.push(" AND at >= ").push_bind(since);
        }
        if let Some(until) = query.until {
            sql.push(" AND at < ").push_bind(until);
        }
        if let Some(before_id) = query.before_id {
            sql.push(" AND id < ").push_bind(before_id);
        }
        sql.push(" ORDER BY id DESC LIMIT ").push_bind(limit);
        let rows = sql.build().fetch_all(&self.pool).await?;
        rows.iter().map(audit_from).collect()
    }

    async fn purge_audit(&self, before: i64, keep_newest: u64) -> StoreResult<u64> {
        let mut deleted = 0;
        let mut tx = self.pool.begin().await?;
        if before > 0 {
            deleted += sqlx::query("DELETE FROM audit_log WHERE at < ?")
                .bind(before)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        if keep_newest > 0 {
            // The (keep_newest + 1)-th newest row and everything older goes;
            // with fewer rows the subquery is NULL and nothing matches.
            let offset = i64::try_from(keep_newest).unwrap_or(i64::MAX);
            deleted += sqlx::query(
                "DELETE FROM audit_log WHERE id <= (SELECT id FROM audit_log ORDER BY id DESC LIMIT 1 OFFSET ?)",
            )
            .bind(offset)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(deleted)
    }

    async fn set_session_owner(&self, id: &str, tenant: &str, subject: &str) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO session_owners (session_id, tenant, subject, created_at) VALUES (?, ?, ?, ?)
             ON CONFLICT(session_id) DO UPDATE SET tenant = excluded.tenant, subject = excluded.subject",
        )
        .bind(id)
        .bind(tenant)
        .bind(subject)
        .bind(crate::now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn session_owner(&self, id: &str) -> StoreResult<Option<(String, String)>> {
        Ok(
            sqlx::query_as("SELECT tenant, subject FROM session_owners WHERE session_id = ?")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn end_session(&self, id: &str, expires_at: i64) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM ended_sessions WHERE expires_at < ?")
            .bind(crate::now_ms())
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO ended_sessions (id, expires_at) VALUES (?, ?)
             ON CONFLICT(id) DO UPDATE SET expires_at = MAX(expires_at, excluded.expires_at)",
        )
        .bind(id)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn session_ended(&self, id: &str) -> StoreResult<bool> {
        let found: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM ended_sessions WHERE id = ? AND expires_at >= ?")
                .bind(id)
                .bind(crate::now_ms())
                .fetch_optional(&self.pool)
                .await?;
        Ok(found.is_some())
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

    fn key(id: &str, hash: &str, tenant: &str, created_at: i64) -> ApiKeyRecord {
        ApiKeyRecord {
            id: id.into(),
            hash: hash.into(),
            prefix: "mg_abcd".into(),
            name: format!("key {id}"),
            tenant: tenant.into(),
            role: "developer".into(),
            scopes: vec!["tools:call".into(), "tools:list".into()],
            created_at,
            created_by: "cli".into(),
            expires_at: None,
            revoked_at: None,
            rate_limit_per_minute: Some(60),
            last_used_at: None,
        }
    }

    fn token(id: &str, family: &str, key_id: &str, expires_at: i64) -> RefreshTokenRecord {
        RefreshTokenRecord {
            id: id.into(),
            hash: format!("hash-{id}"),
            family: family.into(),
            key_id: key_id.into(),
            tenant: "default".into(),
            created_at: 1,
            expires_at,
            used_at: None,
            revoked_at: None,
        }
    }

    fn audit(at: i64, tenant: &str, actor: &str, action: &str, outcome: &str) -> AuditRecord {
        AuditRecord {
            id: 0,
            at,
            tenant: tenant.into(),
            actor: actor.into(),
            actor_kind: "api_key".into(),
            action: action.into(),
            target: format!("target-{at}"),
            args_hash: Some("abc".into()),
            outcome: outcome.into(),
            latency_ms: Some(1.5),
            trace_id: None,
            detail: json!({"at": at}),
        }
    }

    fn ats(records: &[AuditRecord]) -> Vec<i64> {
        records.iter().map(|r| r.at).collect()
    }

    #[tokio::test]
    async fn opens_in_wal_mode_and_migrates_once() {
        let dir = temp_dir("wal");
        let store = SqliteStore::open(&dir).await.unwrap();
        assert_eq!(store.journal_mode().await.unwrap(), "wal");
        assert_eq!(store.schema_version().await.unwrap(), 5);
        drop(store);
        let again = SqliteStore::open(&dir).await.unwrap();
        assert_eq!(again.schema_version().await.unwrap(), 5);
        assert!(dir.join("meshgate.db").exists());
    }

    #[tokio::test]
    async fn upgrades_a_version_1_database_keeping_its_data() {
        let dir = temp_dir("upgrade");
        let options = SqliteConnectOptions::new()
            .filename(dir.join("meshgate.db"))
            .create_if_missing(true);
        let pool = SqlitePool::connect_with(options).await.unwrap();
        let v1 = &migrate::SQLITE[0];
        assert_eq!(v1.version, 1);
        sqlx::raw_sql(v1.sql).execute(&pool).await.unwrap();
        sqlx::raw_sql(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY NOT NULL, name TEXT NOT NULL, applied_at INTEGER NOT NULL);
             INSERT INTO schema_migrations VALUES (1, 'init', 0);",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
        let store = SqliteStore::open(&dir).await.unwrap();
        assert_eq!(store.schema_version().await.unwrap(), 5);
        store.put_session(&session("s", 1)).await.unwrap();
        store.set_session_owner("s", "t", "k").await.unwrap();
        assert_eq!(store.count_api_keys().await.unwrap(), 0);
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

        // One row goes, and only of its own source.
        assert!(!store.delete_upstream("a", "api").await.unwrap());
        assert!(store.delete_upstream("c", "api").await.unwrap());
        assert!(!store.delete_upstream("c", "api").await.unwrap());

        // A rename replaces the row in one step and keeps other sources' rows.
        let renamed = UpstreamRecord {
            name: "d".into(),
            source: "config".into(),
            definition: json!({"url": "d"}),
            created_at: 1,
            updated_at: 2,
        };
        store.rename_upstream("a", &renamed).await.unwrap();
        let rows = store.list_upstreams().await.unwrap();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!((rows[0].name.as_str(), rows[0].updated_at), ("d", 2));
    }

    #[tokio::test]
    async fn api_keys_round_trip_list_update_revoke_and_touch() {
        let store = SqliteStore::open(&temp_dir("keys")).await.unwrap();
        let a = key("key_a", "ha", "acme", 20);
        let b = key("key_b", "hb", "other", 10);
        let c = key("key_c", "hc", "acme", 5);
        for k in [&a, &b, &c] {
            store.insert_api_key(k).await.unwrap();
        }
        assert_eq!(store.get_api_key("key_a").await.unwrap(), Some(a.clone()));
        assert!(store.get_api_key("key_zz").await.unwrap().is_none());
        assert_eq!(
            store.find_api_key_by_hash("hb").await.unwrap(),
            Some(b.clone())
        );
        assert!(store.find_api_key_by_hash("nope").await.unwrap().is_none());
        assert_eq!(store.count_api_keys().await.unwrap(), 3);

        let ids = |keys: Vec<ApiKeyRecord>| keys.into_iter().map(|k| k.id).collect::<Vec<_>>();
        assert_eq!(
            ids(store.list_api_keys(None).await.unwrap()),
            ["key_c", "key_b", "key_a"]
        );
        assert_eq!(
            ids(store.list_api_keys(Some("acme")).await.unwrap()),
            ["key_c", "key_a"]
        );
        assert!(store.list_api_keys(Some("none")).await.unwrap().is_empty());

        let scopes = vec!["admin:keys".to_string()];
        assert!(store.update_api_key_scopes("key_a", &scopes).await.unwrap());
        assert!(
            !store
                .update_api_key_scopes("key_zz", &scopes)
                .await
                .unwrap()
        );
        let got = store.get_api_key("key_a").await.unwrap().unwrap();
        assert_eq!(got.scopes, scopes);

        assert!(store.revoke_api_key("key_a", 100).await.unwrap());
        assert!(!store.revoke_api_key("key_a", 200).await.unwrap());
        assert!(!store.revoke_api_key("key_zz", 200).await.unwrap());
        let got = store.get_api_key("key_a").await.unwrap().unwrap();
        assert_eq!(got.revoked_at, Some(100));

        store.touch_api_key("key_b", 300).await.unwrap();
        let got = store.get_api_key("key_b").await.unwrap().unwrap();
        assert_eq!(got.last_used_at, Some(300));
        assert_eq!(store.count_api_keys().await.unwrap(), 3);
    }

    #[tokio::test]
    async fn duplicate_api_key_hash_or_id_is_refused() {
        let store = SqliteStore::open(&temp_dir("dupkey")).await.unwrap();
        store
            .insert_api_key(&key("key_a", "same", "t", 1))
            .await
            .unwrap();
        let err = store
            .insert_api_key(&key("key_b", "same", "t", 2))
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Duplicate { what: "api key" }),
            "{err:?}"
        );
        let err = store
            .insert_api_key(&key("key_a", "other", "t", 2))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Duplicate { .. }), "{err:?}");
        assert_eq!(store.count_api_keys().await.unwrap(), 1);

        store
            .insert_refresh_token(&token("r1", "f", "key_a", 10))
            .await
            .unwrap();
        let err = store
            .insert_refresh_token(&token("r1", "f", "key_a", 10))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Duplicate {
                    what: "refresh token"
                }
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn corrupt_scopes_are_reported() {
        let store = SqliteStore::open(&temp_dir("corrupt")).await.unwrap();
        store
            .insert_api_key(&key("key_a", "ha", "t", 1))
            .await
            .unwrap();
        sqlx::query("UPDATE api_keys SET scopes = 'not json'")
            .execute(&store.pool)
            .await
            .unwrap();
        let err = store.get_api_key("key_a").await.unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn refresh_token_is_used_exactly_once_under_concurrency() {
        let store = SqliteStore::open(&temp_dir("once")).await.unwrap();
        let t = token("r1", "fam", "key_a", 1_000);
        store.insert_refresh_token(&t).await.unwrap();
        assert_eq!(
            store.find_refresh_token_by_hash("hash-r1").await.unwrap(),
            Some(t)
        );
        assert!(
            store
                .find_refresh_token_by_hash("nope")
                .await
                .unwrap()
                .is_none()
        );

        let (one, two) = tokio::join!(
            store.mark_refresh_token_used("r1", 5),
            store.mark_refresh_token_used("r1", 6)
        );
        let (one, two) = (one.unwrap(), two.unwrap());
        assert!(one ^ two, "exactly one winner: {one} {two}");
        assert!(!store.mark_refresh_token_used("r1", 7).await.unwrap());
        assert!(!store.mark_refresh_token_used("missing", 7).await.unwrap());
        let used = store
            .find_refresh_token_by_hash("hash-r1")
            .await
            .unwrap()
            .unwrap()
            .used_at;
        assert!(matches!(used, Some(5 | 6)), "{used:?}");

        // From separate tasks on a multi-connection pool, too.
        store
            .insert_refresh_token(&token("r2", "fam", "key_a", 1_000))
            .await
            .unwrap();
        let (s1, s2) = (store.clone(), store.clone());
        let (one, two) = tokio::join!(
            tokio::spawn(async move { s1.mark_refresh_token_used("r2", 5).await }),
            tokio::spawn(async move { s2.mark_refresh_token_used("r2", 6).await })
        );
        let (one, two) = (one.unwrap().unwrap(), two.unwrap().unwrap());
        assert!(one ^ two, "exactly one winner: {one} {two}");
    }

    #[tokio::test]
    async fn family_revocation_and_revoked_families_skip_expired() {
        let store = SqliteStore::open(&temp_dir("family")).await.unwrap();
        for t in [
            token("a1", "fa", "key_a", 1_000),
            token("a2", "fa", "key_a", 2_000),
            token("b1", "fb", "key_a", 100),
            token("c1", "fc", "key_c", 1_000),
        ] {
            store.insert_refresh_token(&t).await.unwrap();
        }
        assert!(store.revoked_families(0).await.unwrap().is_empty());
        assert_eq!(store.revoke_refresh_family("fa", 50).await.unwrap(), 2);
        assert_eq!(store.revoke_refresh_family("fa", 60).await.unwrap(), 0);
        assert_eq!(store.revoke_refresh_family("none", 60).await.unwrap(), 0);
        assert_eq!(store.revoke_refresh_family("fb", 60).await.unwrap(), 1);
        // A revoked token can no longer be used.
        assert!(!store.mark_refresh_token_used("a1", 70).await.unwrap());
        let a1 = store
            .find_refresh_token_by_hash("hash-a1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(a1.revoked_at, Some(50));

        assert_eq!(store.revoked_families(50).await.unwrap(), ["fa", "fb"]);
        // fb's only token expired at 100; fa lives on until 2000.
        assert_eq!(store.revoked_families(100).await.unwrap(), ["fa"]);
        assert_eq!(store.revoked_families(1_500).await.unwrap(), ["fa"]);
        assert!(store.revoked_families(2_000).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn revoking_a_keys_families_returns_them_once() {
        let store = SqliteStore::open(&temp_dir("keyfam")).await.unwrap();
        for t in [
            token("a1", "fa", "key_a", 1_000),
            token("a2", "fa", "key_a", 1_000),
            token("b1", "fb", "key_a", 1_000),
            token("c1", "fc", "key_c", 1_000),
            token("d1", "fd", "key_a", 1_000),
        ] {
            store.insert_refresh_token(&t).await.unwrap();
        }
        // Already revoked: not reported again.
        assert_eq!(store.revoke_refresh_family("fd", 5).await.unwrap(), 1);
        assert_eq!(
            store
                .revoke_refresh_families_of_key("key_a", 10)
                .await
                .unwrap(),
            ["fa", "fb"]
        );
        assert!(
            store
                .revoke_refresh_families_of_key("key_a", 20)
                .await
                .unwrap()
                .is_empty()
        );
        let c1 = store
            .find_refresh_token_by_hash("hash-c1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c1.revoked_at, None);
        assert_eq!(store.revoked_families(0).await.unwrap(), ["fa", "fb", "fd"]);
    }

    #[tokio::test]
    async fn audit_append_and_query_filters() {
        let store = SqliteStore::open(&temp_dir("audit")).await.unwrap();
        store.append_audit(&[]).await.unwrap();
        let mut first = audit(10, "acme", "key_a", "tool.call", "ok");
        first.id = 999; // ignored
        first.trace_id = Some("trace-1".into());
        first.args_hash = None;
        first.latency_ms = None;
        store
            .append_audit(&[
                first.clone(),
                audit(20, "acme", "key_b", "key.create", "ok"),
                audit(30, "other", "key_a", "tool.call", "denied"),
            ])
            .await
            .unwrap();
        store
            .append_audit(&[
                audit(40, "acme", "key_a", "tool.call", "error"),
                audit(50, "other", "key_c", "token.issue", "ok"),
            ])
            .await
            .unwrap();

        let all = store.query_audit(&AuditQuery::default()).await.unwrap();
        assert_eq!(ats(&all), [50, 40, 30, 20, 10]);
        let ids: Vec<i64> = all.iter().map(|r| r.id).collect();
        assert_eq!(ids, [5, 4, 3, 2, 1]);
        let stored_first = &all[4];
        assert_eq!(stored_first, &AuditRecord { id: 1, ..first });

        let q = |f: fn(&mut AuditQuery)| {
            let mut query = AuditQuery::default();
            f(&mut query);
            query
        };
        let run = |query: AuditQuery| {
            let store = store.clone();
            async move { ats(&store.query_audit(&query).await.unwrap()) }
        };
        assert_eq!(
            run(q(|q| q.tenant = Some("acme".into()))).await,
            [40, 20, 10]
        );
        assert_eq!(
            run(q(|q| q.actor = Some("key_a".into()))).await,
            [40, 30, 10]
        );
        assert_eq!(
            run(q(|q| q.action = Some("tool.call".into()))).await,
            [40, 30, 10]
        );
        assert_eq!(run(q(|q| q.target = Some("target-20".into()))).await, [20]);
        assert_eq!(
            run(q(|q| q.outcome = Some("ok".into()))).await,
            [50, 20, 10]
        );
        assert_eq!(run(q(|q| q.since = Some(30))).await, [50, 40, 30]);
        assert_eq!(run(q(|q| q.until = Some(30))).await, [20, 10]);
        assert_eq!(run(q(|q| q.before_id = Some(3))).await, [20, 10]);
        assert_eq!(run(q(|q| q.limit = 2)).await, [50, 40]);
        assert_eq!(
            run(q(|q| {
                q.tenant = Some("acme".into());
                q.actor = Some("key_a".into());
                q.since = Some(20);
                q.until = Some(50);
            }))
            .await,
            [40]
        );
        assert!(
            run(q(|q| q.tenant = Some("' OR 1=1 --".into())))
                .await
                .is_empty()
        );
    }

    #[tokio::test]
    async fn audit_pages_with_before_id_and_clamps_limit() {
        let store = SqliteStore::open(&temp_dir("paging")).await.unwrap();
        let batch: Vec<_> = (1..=1005)
            .map(|at| audit(at, "t", "a", "tool.call", "ok"))
            .collect();
        store.append_audit(&batch).await.unwrap();

        let default_page = store.query_audit(&AuditQuery::default()).await.unwrap();
        assert_eq!(default_page.len(), 100);
        let huge = AuditQuery {
            limit: u32::MAX,
            ..AuditQuery::default()
        };
        assert_eq!(store.query_audit(&huge).await.unwrap().len(), 1000);

        let mut seen = Vec::new();
        let mut query = AuditQuery {
            limit: 300,
            ..AuditQuery::default()
        };
        loop {
            let page = store.query_audit(&query).await.unwrap();
            let Some(last) = page.last() else { break };
            query.before_id = Some(last.id);
            seen.extend(ats(&page));
        }
        assert_eq!(seen, (1..=1005).rev().collect::<Vec<i64>>());
    }

    #[tokio::test]
    async fn audit_purges_by_age_and_by_count() {
        let store = SqliteStore::open(&temp_dir("purge")).await.unwrap();
        let batch: Vec<_> = (1..=10)
            .map(|at| audit(at * 10, "t", "a", "tool.call", "ok"))
            .collect();
        store.append_audit(&batch).await.unwrap();

        assert_eq!(store.purge_audit(0, 0).await.unwrap(), 0);
        assert_eq!(store.purge_audit(-5, 0).await.unwrap(), 0);
        // By age: at 10, 20, 30 go.
        assert_eq!(store.purge_audit(40, 0).await.unwrap(), 3);
        let all = store.query_audit(&AuditQuery::default()).await.unwrap();
        assert_eq!(ats(&all), [100, 90, 80, 70, 60, 50, 40]);
        // By count: keep the newest 4.
        assert_eq!(store.purge_audit(0, 4).await.unwrap(), 3);
        let all = store.query_audit(&AuditQuery::default()).await.unwrap();
        assert_eq!(ats(&all), [100, 90, 80, 70]);
        // Keeping more than there are deletes nothing.
        assert_eq!(store.purge_audit(0, 10).await.unwrap(), 0);
        assert_eq!(store.purge_audit(0, 4).await.unwrap(), 0);
        // Both at once: age removes 70, then count trims to 2.
        assert_eq!(store.purge_audit(80, 2).await.unwrap(), 2);
        let all = store.query_audit(&AuditQuery::default()).await.unwrap();
        assert_eq!(ats(&all), [100, 90]);
        // Ids keep growing after a purge.
        store
            .append_audit(&[audit(110, "t", "a", "tool.call", "ok")])
            .await
            .unwrap();
        let newest = store.query_audit(&AuditQuery::default()).await.unwrap();
        assert_eq!(newest[0].id, 11);
    }

    #[tokio::test]
    async fn ended_sessions_are_remembered_until_they_expire() {
        let dir = temp_dir("ended");
        let store = SqliteStore::open(&dir).await.unwrap();
        assert!(!store.session_ended("s1").await.unwrap());
        let later = crate::now_ms() + 60_000;
        store.end_session("s1", later).await.unwrap();
        store.end_session("old", crate::now_ms() - 1).await.unwrap();
        assert!(store.session_ended("s1").await.unwrap());
        assert!(
            !store.session_ended("old").await.unwrap(),
            "past its expiry"
        );
        assert!(!store.session_ended("s2").await.unwrap());
        // Survives a reopen; writing purges expired rows.
        drop(store);
        let store = SqliteStore::open(&dir).await.unwrap();
        assert!(store.session_ended("s1").await.unwrap());
        store.end_session("s3", later).await.unwrap();
        let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ended_sessions")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(left, 2, "the expired row is purged");
    }

    #[tokio::test]
    async fn session_owner_round_trip_and_cleanup() {
        let store = SqliteStore::open(&temp_dir("owner")).await.unwrap();
        assert!(store.session_owner("s1").await.unwrap().is_none());
        store.put_session(&session("s1", 10)).await.unwrap();
        store.put_session(&session("s2", 1_000)).await.unwrap();
        store.put_session(&session("s3", 1_000)).await.unwrap();
        store
            .set_session_owner("s1", "acme", "key_a")
            .await
            .unwrap();
        store
            .set_session_owner("s2", "acme", "key_a")
            .await
            .unwrap();
        store
            .set_session_owner("s3", "other", "key_c")
            .await
            .unwrap();
        assert_eq!(
            store.session_owner("s1").await.unwrap(),
            Some(("acme".into(), "key_a".into()))
        );
        // Upsert.
        store
            .set_session_owner("s2", "acme", "key_b")
            .await
            .unwrap();
        assert_eq!(
            store.session_owner("s2").await.unwrap(),
            Some(("acme".into(), "key_b".into()))
        );

        assert!(store.delete_session("s2").await.unwrap());
        assert!(store.session_owner("s2").await.unwrap().is_none());

        assert_eq!(store.purge_sessions_before(500).await.unwrap(), 1);
        assert!(store.session_owner("s1").await.unwrap().is_none());
        assert_eq!(
            store.session_owner("s3").await.unwrap(),
            Some(("other".into(), "key_c".into()))
        );
    }
}
