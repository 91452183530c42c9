//! The `page_views` table and its counters: written by the app, processed by the worker,
//! re-offered by the app's sweep while unprocessed.
//!
//! `page_view_counts` holds the page's figures: triggers on `page_views` add what each
//! statement inserts, marks processed or deletes to one of its 16 rows, in the same statement
//! (so the same transaction), whoever wrote it (migrations/…_counts_by_triggers), and the page
//! sums them: exact, and constant time however large the table is.

use super::schema::page_views;
use chrono::{DateTime, Utc};
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{Array, BigInt, Double, Int8, Jsonb, Timestamptz};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

#[derive(QueryableByName)]
struct Id {
    #[diesel(sql_type = Int8)]
    id: i64,
}

/// Why a batch of page views is not known to be stored.
#[derive(Debug, thiserror::Error)]
pub enum InsertError {
    /// The transaction failed before its COMMIT was sent: nothing is stored.
    #[error("{0}")]
    NotStored(diesel::result::Error),
    /// No answer by the deadline, before the COMMIT was sent: nothing is stored.
    #[error("no answer from the database in time")]
    TimedOut,
    /// The COMMIT was sent, and failed or did not answer in time: the rows may be stored.
    #[error("the outcome of COMMIT is unknown: {0}")]
    OutcomeUnknown(String),
}

/// Records page views in one transaction and returns their ids, in the order of `data` (the
/// INSERT's trigger counts them).
///
/// The INSERT runs under `statement_timeout = budget` (`SET LOCAL`), so the server gives up
/// on its own, lock waits included, and the failure is certain. Past `give_up` this side
/// stops waiting: before the COMMIT was sent that is certain too (the server rolls back when
/// the connection, then broken and dropped by the pool, closes); after, it is not. A COMMIT
/// that fails is counted as unknown as well: an error during a synchronous-replication wait
/// or a lost connection comes after the commit may have happened.
pub async fn insert(
    conn: &mut AsyncPgConnection,
    data: &[serde_json::Value],
    budget: std::time::Duration,
    give_up: tokio::time::Instant,
) -> Result<Vec<i64>, InsertError> {
    use diesel_async::{AnsiTransactionManager, TransactionManager};
    // 0 would mean no timeout at all.
    let timeout_ms = budget.as_millis().max(1);
    let begin = format!("BEGIN; SET LOCAL statement_timeout = {timeout_ms}");
    match tokio::time::timeout_at(give_up, AnsiTransactionManager::begin_transaction_sql(conn, &begin)).await {
        Err(_) => return Err(InsertError::TimedOut),
        Ok(Err(e)) => return Err(InsertError::NotStored(e)),
        Ok(Ok(())) => {}
    }
    let inserted = InsertBatch { data }.load::<i64>(conn);
    let ids = match tokio::time::timeout_at(give_up, inserted).await {
        Err(_) => return Err(InsertError::TimedOut),
        Ok(Ok(ids)) if ids.len() == data.len() => Ok(ids),
        Ok(Ok(_)) => Err(diesel::result::Error::NotFound),
        Ok(Err(e)) => Err(e),
    };
    let mut ids = match ids {
        Ok(ids) => ids,
        Err(e) => {
            // Whether or not the rollback gets through, nothing is committed.
            let _ = tokio::time::timeout_at(give_up, AnsiTransactionManager::rollback_transaction(conn)).await;
            let _ = tokio::time::timeout_at(give_up, super::end_session_if_read_only(conn, &e)).await;
            return Err(InsertError::NotStored(e));
        }
    };
    // The sequence hands out ids in the order the SELECT produces the rows; sorting makes the
    // pairing independent of the order RETURNING lists them in.
    ids.sort_unstable();
    match tokio::time::timeout_at(give_up, AnsiTransactionManager::commit_transaction(conn)).await {
        Err(_) => Err(InsertError::OutcomeUnknown("no answer to COMMIT in time".into())),
        Ok(Err(e)) => Err(InsertError::OutcomeUnknown(e.to_string())),
        Ok(Ok(())) => Ok(ids),
    }
}

/// The two statements of every batch, as queries of their own type: diesel prepares each once
/// per connection and reuses it. It never caches the text of a `sql_query`, so every call of
/// one was a round trip to prepare it and a parse, analysis and plan on the server: a quarter
/// of PostgreSQL's CPU at GET / c=32 in `perf` (tools/bench/README.md).
///
/// The INSERT: all of `data` in order.
struct InsertBatch<'a> {
    data: &'a [serde_json::Value],
}

impl Query for InsertBatch<'_> {
    type SqlType = Int8;
}

/// The cache key: the type (its SQL never changes), whatever the borrowed values.
impl QueryId for InsertBatch<'_> {
    type QueryId = InsertBatch<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl QueryFragment<Pg> for InsertBatch<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql("INSERT INTO page_views (data) SELECT d FROM unnest(");
        out.push_bind_param::<Array<Jsonb>, _>(self.data)?;
        out.push_sql("::jsonb[]) WITH ORDINALITY AS t(d, n) ORDER BY n RETURNING id");
        Ok(())
    }
}

/// The worker's UPDATE: `ids` (locked by the caller) not yet processed are marked (and
/// counted by the trigger); returns them with when each was recorded.
struct ProcessBatch<'a> {
    ids: &'a [i64],
}

impl Query for ProcessBatch<'_> {
    type SqlType = (Int8, Timestamptz);
}

impl QueryId for ProcessBatch<'_> {
    type QueryId = ProcessBatch<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl QueryFragment<Pg> for ProcessBatch<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql("UPDATE page_views SET processed_at = now() WHERE id = ANY(");
        out.push_bind_param::<Array<Int8>, _>(self.ids)?;
        out.push_sql(") AND processed_at IS NULL RETURNING id, created_at");
        Ok(())
    }
}

/// Unprocessed rows older than `grace` with an id above `after`, in id order: what the sweep
/// offers again (through the partial index of unprocessed rows, so it does not grow with the
/// table).
pub async fn unprocessed(
    conn: &mut AsyncPgConnection,
    after: i64,
    grace: std::time::Duration,
    limit: i64,
) -> QueryResult<Vec<i64>> {
    let rows: Vec<Id> = diesel::sql_query(
        "SELECT id FROM page_views \
         WHERE processed_at IS NULL AND id > $1 AND created_at < now() - make_interval(secs => $2) \
         ORDER BY id LIMIT $3",
    )
    .bind::<BigInt, _>(after)
    .bind::<Double, _>(grace.as_secs_f64())
    .bind::<BigInt, _>(limit)
    .load(conn)
    .await?;
    Ok(rows.into_iter().map(|r| r.id).collect())
}

/// A page view newly marked processed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Queryable)]
pub struct Done {
    pub id: i64,
    /// When the page view was recorded.
    pub created_at: DateTime<Utc>,
}

/// What happened to a batch of tasks.
#[derive(Debug, Default, PartialEq)]
pub struct Processed {
    /// Newly processed.
    pub done: Vec<Done>,
    /// Already processed earlier (a redelivery or a duplicate): nothing changed.
    pub duplicates: Vec<i64>,
    /// No such page view: the task is bogus.
    pub missing: Vec<i64>,
    /// Locked by another transaction (another worker with a duplicate, a manual one): left to
    /// it, and to the sweep, which offers the row again while it is unprocessed.
    pub busy: Vec<i64>,
}

/// Marks page views processed, each at most once, in one transaction (counted by the trigger).
pub async fn process(conn: &mut AsyncPgConnection, ids: &[i64]) -> QueryResult<Processed> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let processed = conn
        .transaction(async move |conn| {
            // Rows another transaction holds are skipped rather than waited for: one held for
            // long must not stop the rest. Locked in id order all the same (as waiting did, to
            // avoid deadlocks between workers holding overlapping batches).
            let locked: Vec<i64> = page_views::table
                .select(page_views::id)
                .filter(page_views::id.eq_any(&ids))
                .order(page_views::id)
                .for_update()
                .skip_locked()
                .load(conn)
                .await?;
            let done: Vec<Done> = ProcessBatch { ids: &locked }.load(conn).await?;
            let (duplicates, rest): (Vec<i64>, Vec<i64>) = ids
                .iter()
                .copied()
                .filter(|id| !done.iter().any(|d| d.id == *id))
                .partition(|id| locked.binary_search(id).is_ok());
            // Not locked here: held elsewhere, or no such row. Looked up only when there are any.
            let busy: Vec<i64> = match rest.is_empty() {
                true => Vec::new(),
                false => {
                    page_views::table
                        .select(page_views::id)
                        .filter(page_views::id.eq_any(&rest))
                        .order(page_views::id)
                        .load(conn)
                        .await?
                }
            };
            let missing = rest.into_iter().filter(|id| busy.binary_search(id).is_err()).collect();
            Ok(Processed {
                done,
                duplicates,
                missing,
                busy,
            })
        })
        .await;
    if let Err(e) = &processed {
        super::end_session_if_read_only(conn, e).await;
    }
    processed
}

/// The figures the page shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub recorded: i64,
    pub processed: i64,
}

#[derive(QueryableByName)]
struct Sums {
    #[diesel(sql_type = BigInt)]
    recorded: i64,
    #[diesel(sql_type = BigInt)]
    processed: i64,
}

/// The counters' sums: a read of 16 rows, whatever the size of the table.
pub async fn totals(conn: &mut AsyncPgConnection) -> QueryResult<Totals> {
    let sums: Sums = diesel::sql_query(
        "SELECT COALESCE(sum(recorded), 0)::bigint AS recorded, \
         COALESCE(sum(processed), 0)::bigint AS processed FROM page_view_counts",
    )
    .get_result(conn)
    .await?;
    Ok(Totals {
        recorded: sums.recorded,
        processed: sums.processed,
    })
}

/// Whether the page view `id` is processed; `None` when there is no such row.
pub async fn is_processed(conn: &mut AsyncPgConnection, id: i64) -> QueryResult<Option<bool>> {
    page_views::table
        .find(id)
        .select(page_views::processed_at.is_not_null())
        .get_result(conn)
        .await
        .optional()
}
