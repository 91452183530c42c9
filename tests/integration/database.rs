//! What the database side promises when something holds it up: a 503 never leaves a row, the
//! worker's statements give up instead of waiting for a lock forever, the counters count
//! every row however it was written, and the rollup survives the clock stepping back.

use crate::support::{TestEnv, count_on, wait_for_log};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use pageviews_testbed::process::wait_until;
use std::time::Duration;

/// `GET /` with our own request id (the app keeps a plain one, and stores it in the row).
async fn visit(url: String, id: String) -> anyhow::Result<(String, u16, Option<String>)> {
    let patient = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
    let response = patient.get(url).header("x-request-id", &id).send().await?;
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap_or("?").to_owned());
    Ok((id, response.status().as_u16(), retry_after))
}

async fn rows_of(env: &TestEnv, request_id: &str) -> anyhow::Result<i64> {
    env.sql_count(&format!(
        "SELECT count(*) AS n FROM page_views WHERE data->>'request_id' = '{request_id}'"
    ))
    .await
}

/// Backends of the test's database waiting for a lock.
async fn lock_waits(env: &TestEnv) -> anyhow::Result<i64> {
    env.sql_count(
        "SELECT count(*) AS n FROM pg_stat_activity \
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .await
}

/// Page views arrive while every counter row is locked for longer than their
/// budget. Each is answered 503 (with Retry-After) and leaves no row, even though the lock is
/// released while a statement for some of them is still waiting (before: that statement,
/// bounded only by the server's own timeout, counted from its start, committed their rows).
#[tokio::test(flavor = "multi_thread")]
async fn a_page_view_answered_503_never_leaves_a_row() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.migrate()?;
    let app = env.app(&[("PAGEVIEWS_DB_TIMEOUT_MS", "2000")]).await?;
    assert_eq!(visit(app.url("/"), "r1-before".into()).await?.1, 200);

    let mut locker = env.db().await?;
    diesel::sql_query("BEGIN").execute(&mut locker).await?;
    diesel::sql_query("UPDATE page_view_counts SET recorded = recorded")
        .execute(&mut locker)
        .await?;
    let first = tokio::spawn(visit(app.url("/"), "r1-first".into()));
    wait_until(
        "the first INSERT waiting for a counter row",
        Duration::from_secs(10),
        || async {
            anyhow::ensure!(lock_waits(&env).await? >= 1, "not waiting yet");
            Ok(())
        },
    )
    .await?;
    // Two more arrive while the first one's statement waits, so they queue behind it: their
    // statement starts late in their budget. The spacing is the scenario, not a wait.
    let mut later = Vec::new();
    for id in ["r1-second", "r1-third"] {
        tokio::time::sleep(Duration::from_millis(600)).await;
        later.push(tokio::spawn(visit(app.url("/"), id.into())));
    }
    let mut answers = vec![first.await??];
    for visit in later {
        answers.push(visit.await??);
    }
    // Released once every request has its answer: a statement still waiting may go on.
    diesel::sql_query("ROLLBACK").execute(&mut locker).await?;
    // Batches run one at a time: once this one is answered, every earlier one has ended.
    assert_eq!(visit(app.url("/"), "r1-after".into()).await?.1, 200);

    for (id, status, retry_after) in &answers {
        let rows = rows_of(&env, id).await?;
        assert_eq!(*status, 503, "{id}: the lock outlasted its budget");
        assert_eq!(retry_after.as_deref(), Some("5"), "{id}: a 503 to retry");
        assert_eq!(rows, 0, "{id} was answered 503 and left a row: {answers:?}");
    }
    assert_eq!(env.exact_counts().await?.0, 2, "only the two 200s are rows");
    assert_eq!(env.counts().await?.0, 2);
    Ok(())
}

/// A COMMIT that does not answer in time (here it waits for a
/// synchronous standby that does not exist) leaves the outcome unknown. The answer is then a
/// 500 without Retry-After, not a 503 that asks for the retry that would store it twice; and
/// indeed the row appears once the wait ends. (Before: 503 with Retry-After.)
#[tokio::test(flavor = "multi_thread")]
async fn a_commit_without_an_answer_is_not_answered_as_retryable() -> anyhow::Result<()> {
    // Durable: with synchronous_commit off (the other tests' servers) no commit waits.
    let env = TestEnv::dedicated_with(true).await?;
    env.migrate()?;
    let app = env.app(&[("PAGEVIEWS_DB_TIMEOUT_MS", "1500")]).await?;
    assert_eq!(visit(app.url("/"), "sync-before".into()).await?.1, 200);
    let standby = |names: &'static str| {
        let env = &env;
        async move {
            let mut admin = env.db().await?;
            diesel::sql_query(format!("ALTER SYSTEM SET synchronous_standby_names = '{names}'"))
                .execute(&mut admin)
                .await?;
            diesel::sql_query("SELECT pg_reload_conf()").execute(&mut admin).await?;
            wait_until("the setting reloaded", Duration::from_secs(10), || async {
                let now = env
                    .sql_count(&format!(
                        "SELECT count(*) AS n FROM pg_settings \
                         WHERE name = 'synchronous_standby_names' AND setting = '{names}'"
                    ))
                    .await?;
                anyhow::ensure!(now == 1, "not yet");
                Ok(())
            })
            .await
        }
    };
    standby("nobody").await?;
    let answer = visit(app.url("/"), "sync-waiting".into()).await;
    standby("").await?;
    let (_, status, retry_after) = answer?;
    assert_eq!((status, retry_after), (500, None), "an unknown outcome");
    let log = env.log(&format!("app-{}", app.port));
    wait_for_log(&log, "its page view may have been stored", Duration::from_secs(5)).await?;
    wait_until(
        "the row committed once the wait ended",
        Duration::from_secs(10),
        || async {
            anyhow::ensure!(rows_of(&env, "sync-waiting").await? == 1, "not visible");
            Ok(())
        },
    )
    .await?;
    assert_eq!(visit(app.url("/"), "sync-after".into()).await?.1, 200);
    assert_eq!(env.counts().await?.0, env.exact_counts().await?.0);
    Ok(())
}

/// Publishes one version-2 task per id, straight to the broker.
async fn publish_tasks(env: &TestEnv, ids: &[i64]) -> anyhow::Result<()> {
    use pageviews::queue::{EXCHANGE, ROUTING_KEY};
    let url = env.urls.amqp.clone();
    let bodies: Vec<String> = ids
        .iter()
        .map(|id| format!(r#"{{"v": 2, "page_view_ids": [{id}]}}"#))
        .collect();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let (connection, channel) = pageviews::queue::open(&url, pageviews::config::DEFAULT_QUEUE_TYPE)?;
        for body in &bodies {
            channel.basic_publish(EXCHANGE, amiquip::Publish::new(body.as_bytes(), ROUTING_KEY))?;
        }
        connection.close()?;
        Ok(())
    })
    .await?
}

/// A connection holding `lock` (a statement that takes one) in an open transaction.
async fn holding(env: &TestEnv, lock: &str) -> anyhow::Result<AsyncPgConnection> {
    let mut conn = env.db().await?;
    diesel::sql_query("BEGIN").execute(&mut conn).await?;
    diesel::sql_query(lock).execute(&mut conn).await?;
    Ok(conn)
}

async fn is_processed(env: &TestEnv, id: i64) -> anyhow::Result<bool> {
    let mut conn = env.db().await?;
    Ok(pageviews::db::page_views::is_processed(&mut conn, id).await? == Some(true))
}

/// A page view locked by another transaction does not stop the worker: the rest
/// is processed, a lock that blocks everything makes it give up and retry (lock_timeout), and
/// SIGTERM is honoured within seconds while both locks are still held (before: it waited for
/// the row lock with no timeout, processing nothing, and SIGTERM waited for the lock too).
#[tokio::test(flavor = "multi_thread")]
async fn a_locked_page_view_neither_stops_the_worker_nor_holds_up_sigterm() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.migrate()?;
    env.backlog_in_db(3).await?;
    let (locked, free, later) = (1, 2, 3);
    let row_lock = holding(
        &env,
        &format!("SELECT id FROM page_views WHERE id = {locked} FOR UPDATE"),
    )
    .await?;
    let mut worker = env.worker("worker", &[("PAGEVIEWS_DB_TIMEOUT_MS", "1000")]).await?;
    publish_tasks(&env, &[locked, free]).await?;
    // Generous: the shared broker and database carry the other tests' load. A failure says
    // where the tasks were (still queued, or in the worker).
    wait_until("the unlocked page view processed", Duration::from_secs(60), || async {
        anyhow::ensure!(is_processed(&env, free).await?, "not yet");
        Ok(())
    })
    .await
    .map_err(|e| {
        let queued = env.queue_depth(pageviews::queue::QUEUE);
        e.context(format!(
            "tasks still queued: {queued:?}; worker log:\n{}",
            env.log_text("worker")
        ))
    })?;
    assert!(!is_processed(&env, locked).await?);
    let log = env.log("worker");
    wait_for_log(&log, "locked by another transaction", Duration::from_secs(5)).await?;

    // A lock the worker cannot skip (SHARE blocks its UPDATE, not the row lock held above):
    // it gives up after PAGEVIEWS_DB_TIMEOUT_MS and retries.
    let table_lock = holding(&env, "LOCK TABLE page_views IN SHARE MODE").await?;
    publish_tasks(&env, &[later]).await?;
    let text = wait_for_log(&log, "cannot process tasks; retrying", Duration::from_secs(60)).await?;
    assert!(
        text.contains("due to lock timeout") || text.contains("due to statement timeout"),
        "{text}"
    );
    let started = std::time::Instant::now();
    let status = worker.stop_with(libc::SIGTERM, Duration::from_secs(30));
    let took = started.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}: {}",
        env.log_text("worker")
    );
    assert!(
        took < Duration::from_secs(10),
        "SIGTERM took {took:?} with the locks held"
    );
    drop((row_lock, table_lock));

    // Nothing is lost: the sweep offers the skipped page view again.
    let _app = env.app(&[("PAGEVIEWS_SWEEP_INTERVAL_SECS", "1")]).await?;
    let _worker = env.worker("worker-2", &[]).await?;
    assert_eq!(env.all_processed(Duration::from_secs(30)).await?, 3);
    Ok(())
}

/// After the database clock steps back (here: `last_run_at` an hour ahead of
/// it, or `infinity`), the rollup still runs within an interval and counts the recent
/// minutes (before: it waited until the clock passed the stored time, the chart frozen).
#[tokio::test(flavor = "multi_thread")]
async fn the_rollup_runs_after_the_clock_steps_back() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.migrate()?;
    env.backlog_in_db(2).await?;
    let runs = "SELECT runs AS n FROM scheduled_jobs WHERE name = 'rollup'";
    let mut worker = env.worker("worker", &[("PAGEVIEWS_ROLLUP_INTERVAL_SECS", "1")]).await?;
    for ahead in ["now() + interval '1 hour'", "'infinity'"] {
        // Whatever it did before, the next run must come after this.
        let mut admin = env.db().await?;
        let before = count_on(&mut admin, runs).await?;
        diesel::sql_query(format!(
            "UPDATE scheduled_jobs SET last_run_at = {ahead} WHERE name = 'rollup'"
        ))
        .execute(&mut admin)
        .await?;
        wait_until(
            &format!("a rollup run after last_run_at = {ahead}"),
            Duration::from_secs(10),
            || async {
                let after = env.sql_count(runs).await?;
                anyhow::ensure!(after > before, "{after} runs");
                Ok(())
            },
        )
        .await?;
        let stamped_ahead = "SELECT count(*) AS n FROM scheduled_jobs WHERE last_run_at > now()";
        assert_eq!(env.sql_count(stamped_ahead).await?, 0);
        let rolled = "SELECT COALESCE(sum(views), 0)::bigint AS n FROM page_view_rollups \
                      WHERE computed_at >= now() - interval '5 seconds'";
        assert_eq!(env.sql_count(rolled).await?, 2, "the recent minutes recomputed");
    }
    assert!(worker.stop().is_some_and(|s| s.success()));
    Ok(())
}

/// Rows written by other means than the app's batch (by hand; by an app and a
/// worker of the previous release during a rolling deploy, which still add their own counts
/// in the same statement) are counted exactly once, processed or not, and the page's
/// `pending` is never negative (before: a row inserted by hand was counted when processed,
/// never when recorded).
#[tokio::test(flavor = "multi_thread")]
async fn rows_written_by_any_means_are_counted_once() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.migrate()?;
    let mut admin = env.db().await?;
    let exact = async || -> anyhow::Result<()> {
        assert_eq!(
            env.counts().await?,
            env.exact_counts().await?,
            "counters against count(*)"
        );
        Ok(())
    };
    let sql = async |conn: &mut AsyncPgConnection, statement: &str| -> anyhow::Result<()> {
        diesel::sql_query(statement).execute(conn).await?;
        Ok(())
    };
    sql(
        &mut admin,
        "INSERT INTO page_views (data) SELECT '{}' FROM generate_series(1, 5)",
    )
    .await?;
    exact().await?;
    // The previous release's INSERT and UPDATE, each counting in the same statement.
    sql(
        &mut admin,
        "WITH inserted AS (INSERT INTO page_views (data) SELECT '{}' FROM generate_series(1, 3) RETURNING id), \
         counted AS (UPDATE page_view_counts SET recorded = recorded + (SELECT count(*) FROM inserted) WHERE shard = 3) \
         SELECT id FROM inserted",
    )
    .await?;
    sql(
        &mut admin,
        "WITH done AS (UPDATE page_views SET processed_at = now() WHERE id = ANY('{1,2}') AND processed_at IS NULL \
         RETURNING id, created_at), \
         counted AS (UPDATE page_view_counts SET processed = processed + (SELECT count(*) FROM done) \
         WHERE shard = 4 AND EXISTS (SELECT 1 FROM done)) SELECT id, created_at FROM done",
    )
    .await?;
    exact().await?;
    // Repairs by hand: a row deleted, a processed one added, one marked unprocessed again.
    sql(&mut admin, "DELETE FROM page_views WHERE id IN (1, 8)").await?;
    sql(
        &mut admin,
        "INSERT INTO page_views (data, processed_at) VALUES ('{}', now())",
    )
    .await?;
    sql(&mut admin, "UPDATE page_views SET processed_at = NULL WHERE id = 2").await?;
    exact().await?;

    // The sweep offers the unprocessed ones; pending is never negative on the way.
    let _app = env.app(&[("PAGEVIEWS_SWEEP_INTERVAL_SECS", "1")]).await?;
    let _worker = env.worker("worker", &[]).await?;
    wait_until("every row processed", Duration::from_secs(30), || async {
        let (recorded, processed) = env.counts().await?;
        assert!(processed <= recorded, "pending {}", recorded - processed);
        anyhow::ensure!(processed == recorded, "{processed} of {recorded}");
        Ok(())
    })
    .await?;
    exact().await?;
    assert_eq!(env.counts().await?, (7, 7));
    sql(&mut admin, "TRUNCATE page_views").await?;
    assert_eq!(env.counts().await?, (0, 0));

    // Rows written by hand before the triggers existed are counted when they are created
    // (migrations reverted, newest first, up to the one that made the triggers).
    let conn = AsyncPgConnection::establish(&env.urls.database).await?;
    let mut harness = diesel_async::AsyncMigrationHarness::new(conn);
    let triggers = "SELECT count(*) AS n FROM pg_trigger WHERE tgname = 'page_views_count_insert'";
    while env.sql_count(triggers).await? > 0 {
        diesel_migrations::MigrationHarness::revert_last_migration(&mut harness, pageviews::db::MIGRATIONS)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    sql(
        &mut admin,
        "INSERT INTO page_views (data) SELECT '{}' FROM generate_series(1, 4)",
    )
    .await?;
    assert_eq!(env.counts().await?, (0, 0), "no trigger, no count");
    env.migrate()?;
    exact().await?;
    Ok(())
}
