//! PostgreSQL: the connection pool, the embedded migrations and the queries, one file per table.

pub mod admin;
pub mod page_views;
pub mod retention;
pub mod rollups;
pub mod schema;

use crate::config::DatabaseConfig;
use diesel_async::pooled_connection::bb8;
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, PoolableConnection, RecyclingMethod,
};
use diesel_async::{AsyncConnection, AsyncMigrationHarness, AsyncPgConnection, RunQueryDsl};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use std::time::Duration;

pub type Pool = bb8::Pool<AsyncPgConnection>;
pub type Connection<'a> = bb8::PooledConnection<'a, AsyncPgConnection>;

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Any advisory-lock key works as long as it is the same in every process of this program.
const MIGRATION_LOCK: i64 = 0x7061_6765_7669_6577; // "pageview"

/// What the server gives up on by itself, set on every connection of a pool: a statement
/// running longer than `statement`, a lock wait longer than `lock` (each rolled back).
#[derive(Clone, Copy)]
struct Limits {
    statement: Duration,
    lock: Option<Duration>,
}

/// The worker's pool: any statement or lock wait longer than `PAGEVIEWS_DB_TIMEOUT_MS` fails
/// (and is retried), so a lock held elsewhere never holds the worker, or its SIGTERM, for
/// longer. The pool starts without connecting; broken connections are replaced on checkout.
pub fn worker_pool(config: &DatabaseConfig) -> Pool {
    build_pool(
        config,
        Limits {
            statement: config.timeout,
            lock: Some(config.timeout),
        },
    )
}

/// The request path's pool: the server cancels any statement that runs longer than
/// `PAGEVIEWS_DB_TIMEOUT_MS` (a lock held elsewhere, a stuck plan), rolling it back. It starts
/// without connecting, so the app comes up (and answers 503) while the database is down.
pub fn request_pool(config: &DatabaseConfig) -> Pool {
    build_pool(
        config,
        Limits {
            statement: config.timeout,
            lock: None,
        },
    )
}

/// TCP keepalives and a user timeout: a server that vanishes without a RST (a partition, a
/// frozen host) breaks the connection within seconds, not at the kernel's retransmission
/// give-up a quarter of an hour later.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(5);

async fn connect(url: String, limits: Limits) -> diesel::ConnectionResult<AsyncPgConnection> {
    let bad = |e: tokio_postgres::Error| diesel::ConnectionError::BadConnection(e.to_string());
    let mut config: tokio_postgres::Config = url.parse().map_err(bad)?;
    config
        .keepalives(true)
        .keepalives_idle(KEEPALIVE_IDLE)
        .keepalives_interval(Duration::from_secs(1))
        .keepalives_retries(3)
        .tcp_user_timeout(TCP_USER_TIMEOUT);
    let mut options = config.get_options().unwrap_or("").to_owned();
    options.push_str(&format!(" -c statement_timeout={}", limits.statement.as_millis()));
    if let Some(lock) = limits.lock {
        options.push_str(&format!(" -c lock_timeout={}", lock.as_millis()));
    }
    config.options(options);
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.map_err(bad)?;
    AsyncPgConnection::try_from_client_and_connection(client, connection).await
}

fn build_pool(config: &DatabaseConfig, limits: Limits) -> Pool {
    // The checkout test looks at the connection's state instead of running `SELECT 1`: a
    // connection the server closed (a restart) is noticed all the same, without a round trip
    // and a transaction per checkout (half the statements of a page view, before batching).
    let mut manager_config = ManagerConfig::default();
    manager_config.custom_setup = Box::new(move |url| Box::pin(connect(url.to_owned(), limits)));
    manager_config.recycling_method = RecyclingMethod::CustomFunction(Box::new(|conn| {
        Box::pin(async move {
            match PoolableConnection::is_broken(conn) {
                false => Ok(()),
                true => Err(diesel::result::Error::BrokenTransactionManager),
            }
        })
    }));
    let manager =
        AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(config.url.expose(), manager_config);
    bb8::Pool::builder()
        .max_size(config.pool_size)
        .min_idle(Some(1))
        .connection_timeout(config.timeout)
        .test_on_check_out(true)
        .build_unchecked(manager)
}

/// A server that refuses writes as read-only (SQLSTATE 25006: a primary demoted without a
/// restart, or set `default_transaction_read_only`) would do so on every connection the pool
/// holds to it, for as long as they last. Ending the session closes the connection, the pool
/// drops it at the next checkout, and the new one goes to the read-write node
/// (`target_session_attrs=read-write` in a multi-host `DATABASE_URL`). Call it outside a
/// transaction (after the rollback).
pub async fn end_session_if_read_only(conn: &mut AsyncPgConnection, error: &diesel::result::Error) {
    use diesel::result::{DatabaseErrorKind, Error};
    if !matches!(error, Error::DatabaseError(DatabaseErrorKind::ReadOnlyTransaction, _)) {
        return;
    }
    tracing::warn!("the database refused a write as read-only; closing this connection for one to the primary");
    // The server ends the session, so this query itself fails.
    let _ = diesel::sql_query("SELECT pg_terminate_backend(pg_backend_pid())")
        .execute(conn)
        .await;
}

/// Opens `connections` connections at once (checked out together, then returned to the
/// pool). The app announces readiness only after this: a restarted app takes the whole
/// backlog at once, and a cold pool made some of it wait past `PAGEVIEWS_DB_TIMEOUT_MS` (503).
pub async fn open_connections(pool: &Pool, connections: u32) -> Result<(), String> {
    let mut opening = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let pool = pool.clone();
        opening.spawn(async move { pool.get_owned().await });
    }
    let mut held = Vec::new();
    let mut failure = None;
    while let Some(opened) = opening.join_next().await {
        match opened {
            Ok(Ok(conn)) => held.push(conn),
            Ok(Err(e)) => failure = Some(e.to_string()),
            Err(e) => failure = Some(e.to_string()),
        }
    }
    failure.map_or(Ok(()), Err)
}

/// `open_connections` until it succeeds, retrying with backoff (and saying so).
pub async fn wait_until_reachable(pool: &Pool, connections: u32) {
    let mut backoff = crate::backoff::Backoff::default();
    while let Err(error) = open_connections(pool, connections).await {
        let delay = backoff.next_delay();
        tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "database unavailable; not ready yet");
        tokio::time::sleep(delay).await;
    }
}

/// Whether a pooled connection answers a query, within the pool's timeout (readiness, the
/// `database_up` gauge).
pub async fn ping(pool: &Pool) -> Result<(), DbError> {
    with_connection(pool, async |conn| {
        diesel::sql_query("SELECT 1").execute(conn).await.map(|_| ())
    })
    .await
}

/// A database error: no connection, or the query failed (requests wrap it in `AppError`;
/// docs/ARCHITECTURE.md, "Errors").
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database unavailable: {0}")]
    Pool(#[from] bb8::RunError),
    #[error("query failed: {0}")]
    Query(#[from] diesel::result::Error),
}

/// Runs `query` on a connection from `pool` (waiting for one up to the pool's timeout).
pub async fn with_connection<T>(
    pool: &Pool,
    query: impl AsyncFnOnce(&mut AsyncPgConnection) -> diesel::QueryResult<T>,
) -> Result<T, DbError> {
    let mut conn = pool.get().await?;
    Ok(query(&mut conn).await?)
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot connect to the database: {0}")]
    Connect(#[from] diesel::ConnectionError),
    #[error("{0}")]
    Query(#[from] diesel::result::Error),
    #[error("migration failed: {0}")]
    Migration(Box<dyn std::error::Error + Send + Sync>),
}

/// Applies pending migrations under an advisory lock, so processes starting together don't
/// race. Returns the versions applied. Needs the multi-threaded runtime (block_in_place).
pub async fn migrate(url: &str) -> Result<Vec<String>, MigrateError> {
    let mut conn = AsyncPgConnection::establish(url).await?;
    diesel::sql_query(format!("SELECT pg_advisory_lock({MIGRATION_LOCK})"))
        .execute(&mut conn)
        .await?;
    let mut harness = AsyncMigrationHarness::new(conn);
    let result = harness
        .run_pending_migrations(MIGRATIONS)
        .map(|versions| versions.iter().map(|v| v.to_string()).collect());
    let mut conn = harness.into_inner();
    diesel::sql_query(format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})"))
        .execute(&mut conn)
        .await?;
    result.map_err(MigrateError::Migration)
}

/// Reverts every migration (newest first); used by the tests that prove each `down.sql`.
pub async fn revert_all(url: &str) -> Result<Vec<String>, MigrateError> {
    let conn = AsyncPgConnection::establish(url).await?;
    let mut harness = AsyncMigrationHarness::new(conn);
    harness
        .revert_all_migrations(MIGRATIONS)
        .map(|versions| versions.iter().map(|v| v.to_string()).collect())
        .map_err(MigrateError::Migration)
}
