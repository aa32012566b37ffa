//! Versioned schema migrations.
//!
//! Each migration is one SQL file in `server/migrations/`, applied in its own transaction
//! together with its row in `schema_migrations`, so a crash leaves the schema at a whole
//! version. The same file serves both backends; the only dialect difference in the schema, the
//! binary column type, is rewritten for PostgreSQL.

use sqlx::Executor as _;

use super::{Backend, Store, StoreError};

/// The migrations, in order. Never edit one that has shipped; add a new one.
const MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "initial",
    include_str!("../../migrations/0001_initial.sql"),
)];

/// The schema version this binary brings the database to.
pub const SCHEMA_VERSION: i64 = 1;

pub(super) async fn run(store: &Store) -> Result<(), StoreError> {
    let pool = store.pool();
    pool.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version BIGINT PRIMARY KEY,
            name TEXT NOT NULL,
            applied_at BIGINT NOT NULL
        )",
    )
    .await?;

    let applied: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM schema_migrations")
        .fetch_one(pool)
        .await?;
    let applied = applied.unwrap_or(0);
    if applied > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found: applied,
            supported: SCHEMA_VERSION,
        });
    }

    for (version, name, sql) in MIGRATIONS.iter().filter(|(v, _, _)| *v > applied) {
        let sql = match store.backend() {
            Backend::Sqlite => (*sql).to_string(),
            Backend::Postgres => sql.replace(" BLOB ", " BYTEA "),
        };
        let mut tx = match store.backend() {
            Backend::Sqlite => pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => pool.begin().await?,
        };
        // Two servers starting at once against one PostgreSQL: the second waits here and then
        // finds the version applied.
        if store.backend() == Backend::Postgres {
            tx.execute("LOCK TABLE schema_migrations IN EXCLUSIVE MODE")
                .await?;
            let done: Option<i64> =
                sqlx::query_scalar("SELECT version FROM schema_migrations WHERE version = $1")
                    .bind(version)
                    .fetch_optional(&mut *tx)
                    .await?;
            if done.is_some() {
                continue;
            }
        }
        tx.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(sql))).await?;
        sqlx::query(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
        )
        .bind(version)
        .bind(*name)
        .bind(keyward_common::time::now_unix() as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::info!(version, name, "applied schema migration");
    }
    Ok(())
}
