//! The server's store: one interface over SQLite (embedded, WAL) and PostgreSQL.
//!
//! Both backends go through sqlx's `Any` driver with the same SQL text (`$N` placeholders,
//! integers for flags and times), so there is one code path to test. Every write transaction
//! starts by bumping the server-wide revision, which also serializes writers: on SQLite the
//! transaction is `BEGIN IMMEDIATE`, on PostgreSQL the revision row is locked.
//!
//! Changes that concern a node are announced after commit through [`crate::watch::WatchHub`];
//! with PostgreSQL they also go out with `NOTIFY`, so watchers on other replicas wake too.

pub mod bulk;
mod migrate;

use std::path::Path;
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Connection as _, Executor as _, Transaction};

pub use migrate::SCHEMA_VERSION;

/// The PostgreSQL channel replicas use to wake each other's watchers.
pub const NOTIFY_CHANNEL: &str = "keyward_changes";

/// Which database is behind the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// An embedded SQLite file.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database reported an error.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The database URL is neither `sqlite:` nor `postgres:`.
    #[error("unsupported database URL (use sqlite:PATH or postgres://...)")]
    UnsupportedUrl,
    /// The schema is newer than this binary knows.
    #[error(
        "database schema version {found} is newer than this server's {supported}; upgrade the \
         server"
    )]
    SchemaTooNew {
        /// Version found in the database.
        found: i64,
        /// Highest version this binary can run.
        supported: i64,
    },
    /// Stored data is not what the schema promises (hand-edited, or a bug).
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// A transaction on the store.
pub type Tx = Transaction<'static, sqlx::Any>;

/// The database connection pool and its backend.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

impl Store {
    /// Opens (creating if needed) the database at `url` and runs pending migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(StoreError::UnsupportedUrl);
        };

        // Switching to WAL needs an exclusive lock that busy_timeout does not wait for, so do it
        // once on a single connection before the pool opens several.
        if backend == Backend::Sqlite {
            let mut conn = sqlx::AnyConnection::connect(url).await?;
            conn.execute("PRAGMA journal_mode = WAL").await?;
            conn.close().await?;
        }

        let pool = AnyPoolOptions::new()
            .max_connections(match backend {
                Backend::Sqlite => 8,
                Backend::Postgres => 16,
            })
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // FULL makes every commit durable before it is acknowledged; keys and
                        // revocations must not roll back after a crash.
                        conn.execute(
                            "PRAGMA synchronous = FULL; PRAGMA busy_timeout = 10000; \
                             PRAGMA secure_delete = ON; \
                             PRAGMA foreign_keys = ON;",
                        )
                        .await?;
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await?;
        let store = Self { pool, backend };
        migrate::run(&store).await?;
        Ok(store)
    }

    /// The URL of the SQLite database file in `data_dir`.
    pub fn sqlite_url(data_dir: &Path) -> String {
        format!(
            "sqlite://{}?mode=rwc",
            data_dir.join("keyward.db").display()
        )
    }

    /// Which backend this store uses.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The connection pool, for reads.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Begins a write transaction and bumps the server revision, returning both.
    pub async fn write(&self) -> Result<(Tx, u64), StoreError> {
        let mut tx = match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        };
        let revision: i64 = sqlx::query_scalar(
            "UPDATE meta SET revision = revision + 1 WHERE id = 1 RETURNING revision",
        )
        .fetch_one(&mut *tx)
        .await?;
        Ok((tx, to_u64(revision)))
    }

    /// Announces inside `tx` that `nodes` changed, for watchers on other replicas. A no-op on
    /// SQLite, where there is only one server process.
    pub async fn notify_nodes(
        &self,
        tx: &mut Tx,
        nodes: &[String],
        revision: u64,
    ) -> Result<(), StoreError> {
        if self.backend != Backend::Postgres || nodes.is_empty() {
            return Ok(());
        }
        // NOTIFY payloads are limited to 8000 bytes; large sets wake every watcher instead.
        let payload = if nodes.iter().map(|n| n.len() + 1).sum::<usize>() < 7000 {
            format!("{revision}:{}", nodes.join(","))
        } else {
            format!("{revision}:*")
        };
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(NOTIFY_CHANNEL)
            .bind(payload)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// The current server revision.
    pub async fn revision(&self) -> Result<u64, StoreError> {
        let revision: i64 = sqlx::query_scalar("SELECT revision FROM meta WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(to_u64(revision))
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> bool {
        sqlx::query_scalar::<_, i64>("SELECT 1")
            .fetch_one(&self.pool)
            .await
            .is_ok()
    }

    /// Closes the pool, waiting for connections to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Converts a stored (non-negative) integer.
pub fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// Converts a value for storing; values above `i64::MAX` do not occur (revisions, generations,
/// seconds) and are clamped.
pub fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Whether `err` is a unique-constraint violation.
pub fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}
