//! What `pageviews-app admin` reads: the backlog, and what became of the page views a dead
//! letter names. Only columns both runtime roles may read, so it runs with either's
//! credentials.

use super::schema::page_views;
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

/// The pipeline's backlog as the database sees it.
#[derive(Debug, PartialEq)]
pub struct Backlog {
    pub totals: super::page_views::Totals,
    /// When the oldest unprocessed page view was recorded.
    pub oldest_unprocessed: Option<DateTime<Utc>>,
}

/// The counters (constant time) and the oldest unprocessed row (through the partial index of
/// unprocessed rows, lowest id first).
pub async fn backlog(conn: &mut AsyncPgConnection) -> QueryResult<Backlog> {
    let totals = super::page_views::totals(conn).await?;
    let oldest_unprocessed = page_views::table
        .filter(page_views::processed_at.is_null())
        .order(page_views::id)
        .select(page_views::created_at)
        .first(conn)
        .await
        .optional()?;
    Ok(Backlog {
        totals,
        oldest_unprocessed,
    })
}

/// Of `ids`, those that name a page view, each with whether it is processed, in id order.
pub async fn known(conn: &mut AsyncPgConnection, ids: &[i64]) -> QueryResult<Vec<(i64, bool)>> {
    page_views::table
        .filter(page_views::id.eq_any(ids))
        .order(page_views::id)
        .select((page_views::id, page_views::processed_at.is_not_null()))
        .load(conn)
        .await
}
