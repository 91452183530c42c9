//! The `page_views` table: written by the app, confirmed by the publisher, processed by the worker.

use super::schema::page_views;
use chrono::{DateTime, Utc};
use diesel::dsl::{count, count_star, now};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

/// Marks rows whose task the broker has confirmed, so the sweep leaves them alone.
pub async fn mark_enqueued(conn: &mut AsyncPgConnection, ids: &[i64]) -> QueryResult<usize> {
    use diesel_async::AsyncConnection;
    let ids = ids.to_vec();
    conn.transaction(async move |conn| {
        lock_in_id_order(conn, &ids).await?;
        diesel::update(page_views::table)
            .filter(page_views::id.eq_any(&ids))
            .filter(page_views::enqueued_at.is_null())
            .set(page_views::enqueued_at.eq(now))
            .execute(conn)
            .await
    })
    .await
}

/// Locks the named rows in id order and returns the ids that exist. The app (marking rows
/// enqueued) and the worker (marking them processed) update the same rows at about the same
/// time; an UPDATE locks in plan order, which let each hold rows the other waited for, and
/// every such deadlock cost a second (deadlock_timeout) and a retry.
async fn lock_in_id_order(conn: &mut AsyncPgConnection, ids: &[i64]) -> QueryResult<Vec<i64>> {
    page_views::table
        .select(page_views::id)
        .filter(page_views::id.eq_any(ids))
        .order(page_views::id)
        .for_update()
        .load(conn)
        .await
}

/// Rows older than `grace` whose task was never confirmed, oldest first.
pub async fn unconfirmed(
    conn: &mut AsyncPgConnection,
    grace: std::time::Duration,
    limit: i64,
) -> QueryResult<Vec<i64>> {
    let before = Utc::now() - chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::zero());
    page_views::table
        .select(page_views::id)
        .filter(page_views::enqueued_at.is_null())
        .filter(page_views::created_at.lt(before))
        .order(page_views::id)
        .limit(limit)
        .load(conn)
        .await
}

/// What happened to a batch of tasks.
#[derive(Debug, Default, PartialEq)]
pub struct Processed {
    /// Newly processed: id and when the page view was recorded.
    pub done: Vec<(i64, DateTime<Utc>)>,
    /// Already processed earlier (a redelivery or a duplicate): nothing changed.
    pub duplicates: Vec<i64>,
    /// No such page view: the task is bogus.
    pub missing: Vec<i64>,
}

/// Marks page views processed, each at most once, in one transaction.
pub async fn process(conn: &mut AsyncPgConnection, ids: &[i64]) -> QueryResult<Processed> {
    use diesel_async::AsyncConnection;
    let ids = ids.to_vec();
    conn.transaction(async move |conn| {
        let existing = lock_in_id_order(conn, &ids).await?;
        let done: Vec<(i64, DateTime<Utc>)> = diesel::update(page_views::table)
            .filter(page_views::id.eq_any(&ids))
            .filter(page_views::processed_at.is_null())
            .set(page_views::processed_at.eq(now))
            .returning((page_views::id, page_views::created_at))
            .get_results(conn)
            .await?;
        let rest: Vec<i64> = ids
            .iter()
            .copied()
            .filter(|id| !done.iter().any(|(d, _)| d == id))
            .collect();
        let (duplicates, missing) = rest.into_iter().partition(|id| existing.contains(id));
        Ok(Processed {
            done,
            duplicates,
            missing,
        })
    })
    .await
}

/// The figures the page shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub recorded: i64,
    pub processed: i64,
}

pub async fn totals(conn: &mut AsyncPgConnection) -> QueryResult<Totals> {
    let (recorded, processed) = page_views::table
        .select((count_star(), count(page_views::processed_at)))
        .get_result::<(i64, i64)>(conn)
        .await?;
    Ok(Totals { recorded, processed })
}
