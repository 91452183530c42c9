//! The scheduled per-minute rollup and the `scheduled_jobs` row that makes it run once per
//! interval however many workers there are.

use super::schema::page_view_rollups;
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Double, Nullable, Timestamptz};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

pub const JOB: &str = "rollup";

#[derive(Debug, PartialEq)]
pub struct RollupRun {
    /// Minutes (re)computed in this run.
    pub minutes: usize,
}

#[derive(QueryableByName)]
struct Claimed {
    #[diesel(sql_type = Nullable<Timestamptz>)]
    previous: Option<DateTime<Utc>>,
}

/// Runs the rollup if no worker has run it within `interval`; `None` when it was not due.
///
/// The job row is claimed with an UPDATE in the same transaction as the rollup: a second
/// worker finds the row locked (a run in progress) or `last_run_at` fresh, and skips. A tenth
/// of the interval is allowed as timer jitter. A `last_run_at` ahead of the database's clock
/// (the clock stepped back, a failover to a host whose clock lags, a bad write) also lets
/// the claim through, and is replaced by the clock's time: waiting for the clock to catch up
/// would freeze the chart. A run may take up to one interval (the statement timeout), beyond
/// which it is pointless: the next one starts over.
pub async fn run_if_due(conn: &mut AsyncPgConnection, interval: std::time::Duration) -> QueryResult<Option<RollupRun>> {
    let min_gap = interval.as_secs_f64() * 0.9;
    // PostgreSQL's largest timeout is i32::MAX ms.
    let timeout_ms = interval.as_millis().clamp(1, i32::MAX as u128);
    conn.transaction(async move |conn| {
        diesel::sql_query(format!("SET LOCAL statement_timeout = {timeout_ms}"))
            .execute(conn)
            .await?;
        let claimed: Option<Claimed> = diesel::sql_query(
            "UPDATE scheduled_jobs AS j SET last_run_at = now(), runs = runs + 1 \
                 FROM (SELECT last_run_at FROM scheduled_jobs WHERE name = $1 FOR UPDATE SKIP LOCKED) AS old \
                 WHERE j.name = $1 AND (old.last_run_at IS NULL \
                     OR old.last_run_at <= now() - make_interval(secs => $2) OR old.last_run_at > now()) \
                 RETURNING CASE WHEN old.last_run_at > now() THEN now() ELSE old.last_run_at END AS previous",
        )
        .bind::<diesel::sql_types::Text, _>(JOB)
        .bind::<Double, _>(min_gap)
        .get_result(conn)
        .await
        .optional()?;
        let Some(claimed) = claimed else { return Ok(None) };
        // Recompute from the minute before the previous run (or now, if that was ahead of
        // the clock), so rows committed late in that minute are counted.
        let minutes = diesel::sql_query(
            "INSERT INTO page_view_rollups (minute, views, computed_at) \
                 SELECT date_trunc('minute', created_at), count(*), now() FROM page_views \
                 WHERE created_at >= COALESCE(date_trunc('minute', $1) - interval '1 minute', '-infinity') \
                 GROUP BY 1 \
                 ON CONFLICT (minute) DO UPDATE SET views = EXCLUDED.views, computed_at = EXCLUDED.computed_at",
        )
        .bind::<Nullable<Timestamptz>, _>(claimed.previous)
        .execute(conn)
        .await?;
        Ok(Some(RollupRun { minutes }))
    })
    .await
}

/// One row of the rollup: the views recorded in one minute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Queryable)]
pub struct MinuteViews {
    /// The minute's start.
    pub minute: DateTime<Utc>,
    pub views: i64,
}

/// The newest `n` minutes, newest first.
pub async fn recent(conn: &mut AsyncPgConnection, n: i64) -> QueryResult<Vec<MinuteViews>> {
    page_view_rollups::table
        .select((page_view_rollups::minute, page_view_rollups::views))
        .order(page_view_rollups::minute.desc())
        .limit(n)
        .load(conn)
        .await
}
