//! The worker's step, `pageviews::worker::process`, in this process against a PostgreSQL of
//! its own: no broker, no worker binary.

use pageviews::config::DatabaseConfig;
use pageviews::db::{self, Pool, page_views};
use pageviews::worker::{Verdict, WorkerMetrics};
use pageviews_testbed::ScratchDir;
use pageviews_testbed::postgres::Postgres;
use std::collections::HashMap;
use std::time::Duration;

/// A PostgreSQL of its own with the schema, and a worker pool on it.
struct Database {
    _dir: ScratchDir,
    server: Postgres,
    pool: Pool,
}

impl Database {
    async fn start() -> anyhow::Result<Database> {
        let dir = ScratchDir::new("pageviews-test-worker")?;
        let server = Postgres::start(dir.path(), false).await?;
        let url = server.create_database("worker").await?;
        db::migrate(&url).await?;
        let pool = db::worker_pool(&database_config(&url)?);
        Ok(Database {
            _dir: dir,
            server,
            pool,
        })
    }

    /// Records `n` page views and returns their ids.
    async fn record(&self, n: usize) -> anyhow::Result<Vec<i64>> {
        let rows = vec![serde_json::json!({"user_agent": "worker test"}); n];
        let give_up = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut conn = self.pool.get().await?;
        Ok(page_views::insert(&mut conn, &rows, Duration::from_secs(5), give_up).await?)
    }

    async fn is_processed(&self, id: i64) -> anyhow::Result<Option<bool>> {
        Ok(db::with_connection(&self.pool, async |conn| page_views::is_processed(conn, id).await).await?)
    }
}

fn database_config(url: &str) -> anyhow::Result<DatabaseConfig> {
    let settings = HashMap::from([
        ("DATABASE_URL".to_owned(), url.to_owned()),
        ("PAGEVIEWS_DB_TIMEOUT_MS".to_owned(), "500".to_owned()),
    ]);
    Ok(DatabaseConfig::from_source(&settings)?)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_is_processed_once_and_ids_naming_no_page_view_come_back_as_missing() -> anyhow::Result<()> {
    let database = Database::start().await?;
    let ids = database.record(3).await?;
    let metrics = WorkerMetrics::default();
    let (_trigger, mut stopping) = pageviews::shutdown::channel();
    let bogus = ids[2] + 1_000;
    let batch = [ids[0], ids[1], bogus];

    let verdict = pageviews::worker::process(&database.pool, &batch, &metrics, &mut stopping).await;
    assert_eq!(verdict, Verdict::Done { missing: vec![bogus] });
    assert_eq!(database.is_processed(ids[0]).await?, Some(true));
    assert_eq!(database.is_processed(ids[2]).await?, Some(false), "not in the batch");
    assert_eq!((metrics.processed.get(), metrics.duplicates.get()), (2, 0));

    // A redelivery changes nothing and is counted as such.
    let again = pageviews::worker::process(&database.pool, &batch[..2], &metrics, &mut stopping).await;
    assert_eq!(again, Verdict::Done { missing: vec![] });
    assert_eq!((metrics.processed.get(), metrics.duplicates.get()), (2, 2));
    let mut conn = database.pool.get().await?;
    let totals = page_views::totals(&mut conn).await?;
    assert_eq!((totals.recorded, totals.processed), (3, 2));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_database_away_it_retries_until_shutdown_and_then_gives_the_batch_up() -> anyhow::Result<()> {
    let mut database = Database::start().await?;
    let ids = database.record(2).await?;
    database.server.stop();
    let metrics = WorkerMetrics::default();
    let (trigger, stopping) = pageviews::shutdown::channel();
    let pool = database.pool.clone();
    let step = tokio::spawn(async move {
        let mut stopping = stopping;
        pageviews::worker::process(&pool, &ids, &metrics, &mut stopping).await
    });
    // Several failed attempts (each up to the 500 ms pool timeout, then a backoff) and still
    // no verdict: the batch is not given up while the worker runs.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!step.is_finished(), "gave up without a shutdown");
    trigger.fire();
    let verdict = tokio::time::timeout(Duration::from_secs(2), step).await??;
    assert_eq!(verdict, Verdict::NotDone);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_in_hand_at_shutdown_is_still_processed_when_the_database_answers() -> anyhow::Result<()> {
    let database = Database::start().await?;
    let ids = database.record(1).await?;
    let metrics = WorkerMetrics::default();
    let (trigger, mut stopping) = pageviews::shutdown::channel();
    trigger.fire();
    let verdict = pageviews::worker::process(&database.pool, &ids, &metrics, &mut stopping).await;
    assert_eq!(verdict, Verdict::Done { missing: vec![] });
    assert_eq!(database.is_processed(ids[0]).await?, Some(true));
    Ok(())
}
