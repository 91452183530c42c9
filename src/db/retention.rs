//! Retention: deleting processed page views older than `PAGEVIEWS_RETENTION_DAYS`, in small
//! batches, through `expire_page_views()` (migrations/…_retention: the worker may not DELETE;
//! the rows it deletes stay counted in the page's all-time figures, and the rollup's minutes
//! are kept). The `scheduled_jobs` row `retention` makes it run once per interval across
//! workers, claimed as the rollup's is.

use diesel::sql_types::{BigInt, Double, Integer, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

pub const JOB: &str = "retention";

/// Rows per DELETE: each batch is a transaction of its own, short enough that the rows it
/// holds and the WAL it writes at once never hold up a request or the worker.
pub const BATCH: i32 = 1_000;

#[derive(diesel::QueryableByName)]
struct Deleted {
    #[diesel(sql_type = BigInt)]
    deleted: i64,
}

/// Claims this interval's run (committed at once, unlike the rollup's claim: the batches that
/// follow are transactions of their own). `false`: another worker ran it within `interval`
/// (less a tenth, for timer jitter) or holds the row now. A `last_run_at` ahead of the
/// database's clock does not block it, as for the rollup.
pub async fn claim(conn: &mut AsyncPgConnection, interval: std::time::Duration) -> diesel::QueryResult<bool> {
    let claimed = diesel::sql_query(
        "UPDATE scheduled_jobs AS j SET last_run_at = now(), runs = runs + 1 \
             FROM (SELECT last_run_at FROM scheduled_jobs WHERE name = $1 FOR UPDATE SKIP LOCKED) AS old \
             WHERE j.name = $1 AND (old.last_run_at IS NULL \
                 OR old.last_run_at <= now() - make_interval(secs => $2) OR old.last_run_at > now())",
    )
    .bind::<Text, _>(JOB)
    .bind::<Double, _>(interval.as_secs_f64() * 0.9)
    .execute(conn)
    .await?;
    Ok(claimed == 1)
}

/// Deletes up to `batch` processed page views recorded more than `days` days ago (oldest
/// first); returns how many.
pub async fn expire_batch(conn: &mut AsyncPgConnection, days: u32, batch: i32) -> diesel::QueryResult<i64> {
    let row: Deleted = diesel::sql_query("SELECT expire_page_views(now() - make_interval(days => $1), $2) AS deleted")
        .bind::<Integer, _>(i32::try_from(days).unwrap_or(i32::MAX))
        .bind::<Integer, _>(batch)
        .get_result(conn)
        .await?;
    Ok(row.deleted)
}
