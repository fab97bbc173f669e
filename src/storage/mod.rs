//! Storage: the only module with SQL.
//!
//! [`Database`] wraps a PostgreSQL or a SQLite pool. Each query is written once, in the SQL both
//! understand (`$n` parameters, `RETURNING`, `ON CONFLICT`), and [`with_pool!`] compiles it for
//! both drivers; the few statements whose semantics differ (row locks) spell out both arms.
//! UUIDs, timestamps, JSON and bytes bind through sqlx's own types on both backends, which is
//! why this is not sqlx's `Any` driver (it has no UUID or timestamp types).
//!
//! One repository per table: [`integrations`], [`tokens`], [`scopes`], [`consents`],
//! [`state`], [`audit`].
//!
//! Transactions begin through `Box::pin(pool.begin())`: sqlx's `begin` (waiting for a pool
//! connection included) is a 1.2–1.5 KiB future, and inline it would size each caller's future,
//! and theirs, for all of their life (see `services` on future sizes).

pub mod audit;
pub mod consents;
pub mod integrations;
pub mod scopes;
pub mod state;
pub mod tokens;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};
use uuid::Uuid;

use crate::config::is_postgres_url;

static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// How long a request waits for a pooled connection before failing (fast 503, not a hang).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// A pooled connection idle for less than this is handed out without a ping first. sqlx pings
/// every connection when it comes back to the pool, and by default once more when it is taken
/// out: two round trips (on SQLite two hops to the connection's thread) around every query,
/// one of them on the caller's path (BENCHMARKS.md, session 8). A connection idle for longer
/// is pinged before use, so one the server closed meanwhile (restart, idle timeout, failover)
/// is replaced instead of failing a request. HikariCP's default bypass window is 500 ms.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is inconsistent: {0}")]
    Corrupt(String),
    /// Sealing or opening a value inside a storage transaction failed.
    #[error(transparent)]
    Crypto(#[from] crate::crypto::CryptoError),
}

impl StorageError {
    /// The database could not be reached (as opposed to a query being wrong).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StorageError::Database(
                sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::Io(_)
                    | sqlx::Error::Tls(_)
            )
        ) || matches!(
            self,
            StorageError::Database(sqlx::Error::Database(err)) if cannot_serve_now(err.as_ref())
        )
    }

    /// A unique constraint rejected the write.
    pub fn is_unique_violation(&self) -> bool {
        match self {
            StorageError::Database(sqlx::Error::Database(err)) => err.is_unique_violation(),
            _ => false,
        }
    }
}

/// A database error that says "not now" rather than "wrong query": PostgreSQL ended the
/// session or cannot take it (connection exceptions, class 08; shutdown, crash or start-up,
/// 57P01–57P03, as in a fast shutdown or a failover; too many connections, 53300); SQLite's
/// lock was held by someone else past the busy timeout (SQLITE_BUSY, SQLITE_LOCKED).
fn cannot_serve_now(err: &dyn sqlx::error::DatabaseError) -> bool {
    if let Some(err) = err.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        let code = err.code();
        return code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300");
    }
    // SQLite reports extended result codes; the primary code is the low byte.
    err.code()
        .and_then(|code| code.parse::<i32>().ok())
        .is_some_and(|code| matches!(code & 0xff, 5 | 6))
}

pub type StorageResult<T> = Result<T, StorageError>;

#[derive(Debug, Clone)]
pub enum Database {
    Postgres(PgPool),
    Sqlite(SqlitePool, WriteGate),
}

/// SQLite writes one transaction at a time. Writers of this process queue here, in order,
/// instead of meeting SQLite's lock: a connection that finds the database locked polls it with
/// sleeps of 1 to 100 ms (its busy handler), so under concurrent writes most of the time went
/// to sleeping (BENCHMARKS.md: thousands of such sleeps a second during the fleet refresh, the
/// cores half idle). Other processes (a second replica, the CLI) still meet the busy timeout.
#[derive(Debug, Clone, Default)]
pub struct WriteGate(Arc<tokio::sync::Mutex<()>>);

impl WriteGate {
    pub async fn enter(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.0.lock().await
    }
}

/// Runs `$body` with `$pool` bound to whichever pool `$db` holds; the body is compiled once per
/// driver, so a query written inside works, and is type-checked, on both.
macro_rules! with_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::storage::Database::Postgres($pool) => $body,
            $crate::storage::Database::Sqlite($pool, _) => $body,
        }
    };
}
pub(crate) use with_pool;

/// [`with_pool!`] for a write (a statement or a whole transaction): on SQLite the body runs
/// inside the process's [`WriteGate`].
macro_rules! with_writer {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::storage::Database::Postgres($pool) => $body,
            $crate::storage::Database::Sqlite($pool, gate) => {
                let _turn = gate.enter().await;
                $body
            }
        }
    };
}
pub(crate) use with_writer;

#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub max_connections: u32,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_connections: 16,
        }
    }
}

impl PoolSettings {
    /// 16 connections to PostgreSQL; 2 to SQLite, which writes one transaction at a time
    /// anyway (see [`WriteGate`]) and whose connections each keep a page cache, prepared
    /// statements and a thread with its own malloc arena: one writer and one reader lost no
    /// throughput against 4 connections and took 3–6 MiB off the peak (BENCHMARKS.md).
    pub fn default_for(url: &str) -> Self {
        if is_postgres_url(url) {
            Self::default()
        } else {
            Self {
                max_connections: SQLITE_DEFAULT_CONNECTIONS,
            }
        }
    }
}

const SQLITE_DEFAULT_CONNECTIONS: u32 = 2;

/// The pools' check before handing out an idle connection: a ping only after
/// [`PING_IF_IDLE_FOR`] of idleness. `Ok(false)` or an error makes sqlx close the connection
/// and try another (or open a new one).
fn ping_if_idle<C: sqlx::Connection>(
    connection: &mut C,
    meta: sqlx::pool::PoolConnectionMetadata,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, sqlx::Error>> + Send + '_>> {
    Box::pin(async move {
        if meta.idle_for >= PING_IF_IDLE_FOR {
            connection.ping().await?;
        }
        Ok(true)
    })
}

/// A list of plain columns (`"a, b AS c"`) with each qualified by a table alias
/// (`"t.a, t.b AS c"`), for joined reads. Not for expressions (`COALESCE(a, b)`).
fn prefixed(columns: &str, alias: &str) -> String {
    debug_assert!(
        !columns.contains('('),
        "expressions are not qualified: {columns}"
    );
    columns
        .split(',')
        .map(|column| format!("{alias}.{}", column.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn pg_pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .test_before_acquire(false)
        .before_acquire(|connection, meta| ping_if_idle(connection, meta))
}

impl Database {
    pub async fn connect(url: &str, settings: PoolSettings) -> StorageResult<Self> {
        if is_postgres_url(url) {
            let options = PgConnectOptions::from_str(url)?;
            let pool = pg_pool_options(settings.max_connections)
                .connect_with(options)
                .await?;
            Ok(Self::Postgres(pool))
        } else {
            let options = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(SQLITE_BUSY_TIMEOUT)
                .foreign_keys(true)
                // 4 MiB of page cache per connection (SQLite's default is 2 MiB): the default
                // pool of 2 then caches 8 MiB of the hottest pages, enough for the indexes
                // the refresher walks with 100,000 integrations stored (BENCHMARKS.md).
                .pragma("cache_size", "-4096")
                // A backstop only: the log is checkpointed by `checkpoint_in_background`.
                .pragma("wal_autocheckpoint", SQLITE_AUTOCHECKPOINT_PAGES);
            let pool = SqlitePoolOptions::new()
                .max_connections(settings.max_connections)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .test_before_acquire(false)
                .before_acquire(|connection, meta| ping_if_idle(connection, meta))
                .connect_with(options)
                .await?;
            tokio::spawn(checkpoint_in_background(pool.clone()));
            Ok(Self::Sqlite(pool, WriteGate::default()))
        }
    }

    /// The same database through a pool of its own, of at most `max_connections`, that
    /// connects on first use: each of its connections is then driven by the runtime that
    /// opened it (a tokio socket wakes its readers from the runtime it was opened on, and a
    /// crowded runtime looks at its sockets only every so many tasks). On SQLite, whose
    /// connections each run on a thread of their own, this is the same pool and write gate.
    pub fn separate_pool(&self, max_connections: u32) -> Self {
        match self {
            Database::Postgres(pool) => Database::Postgres(
                pg_pool_options(max_connections)
                    .connect_lazy_with(pool.connect_options().as_ref().clone()),
            ),
            Database::Sqlite(..) => self.clone(),
        }
    }

    /// Applies pending migrations; running it again is a no-op.
    pub async fn migrate(&self) -> StorageResult<()> {
        match self {
            Database::Postgres(pool) => POSTGRES_MIGRATIONS.run(pool).await?,
            Database::Sqlite(pool, _) => SQLITE_MIGRATIONS.run(pool).await?,
        }
        Ok(())
    }

    pub async fn ping(&self) -> StorageResult<()> {
        with_pool!(self, pool => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Database::Postgres(_) => "postgres",
            Database::Sqlite(..) => "sqlite",
        }
    }

    pub async fn close(&self) {
        with_pool!(self, pool => pool.close().await);
    }

    /// The rows of `select` — a query ending in `WHERE <id column>` — whose id is one of `ids`:
    /// on PostgreSQL one query with an array, on SQLite an `IN` list per
    /// [`SQLITE_IDS_PER_QUERY`] ids (sqlx binds in time quadratic in the parameter count).
    async fn rows_with_ids<T>(&self, select: &str, ids: &[Uuid]) -> StorageResult<Vec<T>>
    where
        T: Send
            + Unpin
            + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>
            + for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>,
    {
        match self {
            Database::Postgres(pool) => Ok(sqlx::query_as(&format!("{select} = ANY($1)"))
                .bind(ids)
                .fetch_all(pool)
                .await?),
            Database::Sqlite(pool, _) => {
                let mut rows = Vec::with_capacity(ids.len());
                for chunk in ids.chunks(SQLITE_IDS_PER_QUERY) {
                    let placeholders: Vec<String> =
                        (1..=chunk.len()).map(|n| format!("${n}")).collect();
                    let sql = format!("{select} IN ({})", placeholders.join(", "));
                    let mut query = sqlx::query_as(&sql);
                    for id in chunk {
                        query = query.bind(id);
                    }
                    rows.extend(query.fetch_all(pool).await?);
                }
                Ok(rows)
            }
        }
    }
}

/// Ids per `IN` list on SQLite.
const SQLITE_IDS_PER_QUERY: usize = 64;

/// How often SQLite's write-ahead log is copied into the database file.
const SQLITE_CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// WAL pages (4 KiB) after which a commit checkpoints by itself: ten times SQLite's default,
/// reached only if the background checkpoints fall behind.
const SQLITE_AUTOCHECKPOINT_PAGES: &str = "10000";

/// Checkpoints the SQLite log from a task of its own until the pool is closed.
///
/// By default SQLite checkpoints inside whichever commit takes the log past 1,000 pages, and
/// that request then waits for the copy and an fsync of the database file: tens of
/// milliseconds on this machine's disk, at times hundreds (the authorize and callback p99 in
/// BENCHMARKS.md). Here no request pays for it. `PASSIVE` never waits for or blocks readers
/// and writers; what it cannot copy yet is copied on a later tick.
async fn checkpoint_in_background(pool: SqlitePool) {
    let mut ticks = tokio::time::interval(SQLITE_CHECKPOINT_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if pool.is_closed() {
            return;
        }
        if let Err(err) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&pool)
            .await
        {
            tracing::debug!(error = %err, "SQLite checkpoint skipped");
        }
    }
}

/// A page of a cursor-paginated listing: rows after `after`, at most `limit`.
#[derive(Debug, Clone, Copy)]
pub struct Page<C> {
    pub after: Option<C>,
    pub limit: u32,
}

impl<C> Page<C> {
    /// Fetch one row more than asked, to know whether another page exists.
    fn fetch_limit(&self) -> i64 {
        i64::from(self.limit) + 1
    }
}

/// Rows of one page and the cursor of the next, if any.
#[derive(Debug, Clone)]
pub struct Paged<T, C> {
    pub items: Vec<T>,
    pub next: Option<C>,
}

impl<T, C> Paged<T, C> {
    fn from_rows(mut rows: Vec<T>, limit: u32, cursor: impl Fn(&T) -> C) -> Self {
        let limit = limit as usize;
        let next = if rows.len() > limit {
            rows.truncate(limit);
            rows.last().map(&cursor)
        } else {
            None
        };
        Self { items: rows, next }
    }
}

#[cfg(test)]
mod tests {
    use super::prefixed;

    #[test]
    fn columns_are_qualified_one_by_one_with_their_aliases() {
        let columns = "id,user_id, \
            created_at AS integration_created_at,last_error";
        assert_eq!(
            prefixed(columns, "i"),
            "i.id, i.user_id, i.created_at AS integration_created_at, i.last_error"
        );
        let tokens = prefixed(super::tokens::COLUMNS, "t");
        assert!(
            tokens.starts_with("t.integration_id, t.key_id, "),
            "{tokens}"
        );
        assert_eq!(tokens.matches("t.").count(), 13, "{tokens}");
    }
}
