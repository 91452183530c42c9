//! Retention (`PAGEVIEWS_RETENTION_DAYS`) on a large table: a million processed page views ten
//! days old are deleted in batches by the worker's scheduled job while GET / is answered
//! within its bound and the worker keeps processing; the page's all-time figures and the
//! rollup's minutes stay as they were.

use crate::support::{TestEnv, client, count_on};
use diesel_async::RunQueryDsl;
use pageviews_testbed::process::wait_until;
use std::time::{Duration, Instant};

const OLD: i64 = 1_000_000;
/// GET / must answer within this while retention runs (well under `PAGEVIEWS_DB_TIMEOUT_MS`'s
/// 1.5 s, past which a request held up by the database would answer 503).
const BOUND: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread")]
async fn retention_deletes_old_rows_in_batches_without_holding_up_requests_or_the_worker() -> anyhow::Result<()> {
    let _alone = crate::support::load_alone().await;
    let env = TestEnv::new().await?;
    env.migrate()?;
    let mut conn = env.db().await?;
    // A table that has run for a while: a million processed page views ten days ago (one a
    // millisecond), their minutes rolled up, the rollup last run a minute ago.
    for statement in [
        format!(
            "INSERT INTO page_views (created_at, data, processed_at) \
             SELECT now() - interval '10 days' + i * interval '1 millisecond', \
                    '{{\"user_agent\": \"old\", \"cookie_names\": [], \"request_id\": null}}', \
                    now() - interval '10 days' \
             FROM generate_series(1, {OLD}) AS i"
        ),
        "INSERT INTO page_view_rollups (minute, views, computed_at) \
         SELECT date_trunc('minute', created_at), count(*), now() FROM page_views GROUP BY 1"
            .into(),
        "UPDATE scheduled_jobs SET last_run_at = now() - interval '1 minute' WHERE name = 'rollup'".into(),
        "VACUUM (ANALYZE) page_views".into(),
    ] {
        diesel::sql_query(statement).execute(&mut conn).await?;
    }
    assert_eq!(env.counts().await?, (OLD, OLD));
    let old_minutes = "SELECT COALESCE(sum(views), 0)::bigint AS n FROM page_view_rollups \
                       WHERE minute < now() - interval '1 day'";
    assert_eq!(count_on(&mut conn, old_minutes).await?, OLD);
    let old_rows = "SELECT count(*) AS n FROM page_views WHERE created_at < now() - interval '7 days'";
    let any_old = "SELECT count(*) AS n FROM (SELECT 1 FROM page_views \
                   WHERE created_at < now() - interval '7 days' LIMIT 1) AS s";

    let app = env.app(&[]).await?;
    let _worker = env
        .worker(
            "worker",
            &[
                ("PAGEVIEWS_RETENTION_DAYS", "7"),
                ("PAGEVIEWS_ROLLUP_INTERVAL_SECS", "2"),
            ],
        )
        .await?;

    // While it deletes: one request at a time, each timed; every one processed soon after.
    wait_until("retention started", Duration::from_secs(30), || async {
        let left = count_on(&mut env.db().await?, old_rows).await?;
        anyhow::ensure!(left < OLD, "none deleted yet");
        Ok(())
    })
    .await?;
    let before = count_on(&mut conn, old_rows).await?;
    let (mut requests, mut slowest) = (0, Duration::ZERO);
    let load_until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < load_until {
        let started = Instant::now();
        let status = client().get(app.url("/")).send().await?.status();
        let took = started.elapsed();
        assert_eq!(status, 200, "GET / during retention");
        slowest = slowest.max(took);
        requests += 1;
        if requests % 20 == 0 {
            wait_until("the worker keeping up", Duration::from_secs(10), || async {
                let (recorded, processed) = env.counts().await?;
                anyhow::ensure!(recorded == processed, "{} pending", recorded - processed);
                Ok(())
            })
            .await?;
        }
    }
    let after = count_on(&mut conn, old_rows).await?;
    assert!(
        after < before,
        "retention ran alongside the requests ({before} old rows before, {after} after)"
    );
    assert!(slowest < BOUND, "the slowest GET / during retention took {slowest:?}");

    wait_until("every old row deleted", Duration::from_secs(300), || async {
        let left = count_on(&mut env.db().await?, any_old).await?;
        anyhow::ensure!(left == 0, "old rows left; worker log:\n{}", env.log_text("worker"));
        Ok(())
    })
    .await?;
    // All-time figures, and the chart's minutes, as they were; the new rows are kept.
    let new = OLD + requests;
    wait_until("the last page views processed", Duration::from_secs(20), || async {
        let counts = env.counts().await?;
        anyhow::ensure!(counts == (new, new), "{counts:?}");
        Ok(())
    })
    .await?;
    assert_eq!(env.exact_counts().await?, (requests, requests));
    assert_eq!(count_on(&mut conn, old_minutes).await?, OLD);
    let log = env.log_text("worker");
    assert!(log.contains("retention: processed page views deleted"), "{log}");
    assert!(!log.contains("retention batch failed"), "{log}");
    eprintln!(
        "retention: {requests} requests, slowest {slowest:?}, {} old rows deleted during them",
        before - after
    );
    Ok(())
}

/// A DELETE that is not retention's still takes its rows off the figures.
#[tokio::test(flavor = "multi_thread")]
async fn only_retention_leaves_the_counters_alone() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.migrate()?;
    let mut conn = env.db().await?;
    for statement in [
        "INSERT INTO page_views (created_at, data, processed_at) \
         SELECT now() - interval '3 days', '{}', now() FROM generate_series(1, 10)",
        "UPDATE scheduled_jobs SET last_run_at = now() WHERE name = 'rollup'",
    ] {
        diesel::sql_query(statement).execute(&mut conn).await?;
    }
    let expired = pageviews::db::retention::expire_batch(&mut conn, 2, 4).await?;
    assert_eq!(expired, 4);
    assert_eq!(env.counts().await?, (10, 10));
    assert_eq!(env.exact_counts().await?, (6, 6));
    diesel::sql_query("DELETE FROM page_views WHERE id IN (SELECT id FROM page_views LIMIT 1)")
        .execute(&mut conn)
        .await?;
    assert_eq!(env.counts().await?, (9, 9), "a DELETE by hand is counted");
    // Never rows of the last day, nor before the rollup has run.
    let refused = pageviews::db::retention::expire_batch(&mut conn, 0, 4).await;
    assert!(
        refused.is_err_and(|e| e.to_string().contains("less than a day ago")),
        "a cutoff of now"
    );
    diesel::sql_query("UPDATE scheduled_jobs SET last_run_at = NULL WHERE name = 'rollup'")
        .execute(&mut conn)
        .await?;
    assert_eq!(pageviews::db::retention::expire_batch(&mut conn, 2, 4).await?, 0);
    Ok(())
}
