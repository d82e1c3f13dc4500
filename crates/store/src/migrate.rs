//! Versioned schema migrations: numbered SQL files compiled into the binary,
//! applied in order, each in its own transaction, recorded in
//! `schema_migrations`. Written here rather than with `sqlx::migrate!` to keep
//! the build free of sqlx's macro stack and to give the precise
//! "schema too new" refusal.

use sqlx::SqlitePool;

use crate::{StoreError, StoreResult};

/// One migration.
pub(crate) struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

/// SQLite migrations, oldest first.
pub(crate) const SQLITE: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("../migrations/sqlite/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "auth",
        sql: include_str!("../migrations/sqlite/0002_auth.sql"),
    },
    Migration {
        version: 3,
        name: "mesh",
        sql: include_str!("../migrations/sqlite/0003_mesh.sql"),
    },
    Migration {
        version: 4,
        name: "state",
        sql: include_str!("../migrations/sqlite/0004_state.sql"),
    },
    Migration {
        version: 5,
        name: "ended_sessions",
        sql: include_str!("../migrations/sqlite/0005_ended_sessions.sql"),
    },
];

/// Applies every migration newer than the database's version.
pub(crate) async fn run_sqlite(pool: &SqlitePool) -> StoreResult<i64> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY NOT NULL, name TEXT NOT NULL, applied_at INTEGER NOT NULL)",
    )
    .execute(pool)
    .await?;
    let current: i64 =
        sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            .fetch_one(pool)
            .await?;
    let newest = SQLITE.last().map_or(0, |m| m.version);
    if current > newest {
        return Err(StoreError::SchemaTooNew {
            found: current,
            supported: newest,
        });
    }
    for m in SQLITE.iter().filter(|m| m.version > current) {
        let wrap = |source| StoreError::Migration {
            version: m.version,
            name: m.name,
            source,
        };
        let mut tx = pool.begin().await.map_err(wrap)?;
        sqlx::raw_sql(m.sql).execute(&mut *tx).await.map_err(wrap)?;
        sqlx::query("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)")
            .bind(m.version)
            .bind(m.name)
            .bind(crate::now_ms())
            .execute(&mut *tx)
            .await
            .map_err(wrap)?;
        tx.commit().await.map_err(wrap)?;
        tracing::info!(version = m.version, name = m.name, "applied migration");
    }
    Ok(newest)
}
