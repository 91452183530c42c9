//! The benchmark's own SQL (the service's is in src/db): its step counts, the pgbench script
//! of the app's INSERT and the large table.

use diesel::prelude::*;
use diesel::sql_types::BigInt;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use pageviews::db::schema::page_views;

/// The rows a step added, and how many of them are still unprocessed.
pub struct StepRows {
    pub rows: i64,
    pub unprocessed: i64,
}

/// The highest id so far (0 for an empty table): the bench counts a step's rows after it.
pub async fn max_id(conn: &mut AsyncPgConnection) -> QueryResult<i64> {
    page_views::table
        .select(diesel::dsl::max(page_views::id))
        .get_result::<Option<i64>>(conn)
        .await
        .map(|id| id.unwrap_or(0))
}

/// Rows with an id above `after_id`, and how many of them are still unprocessed.
pub async fn count_after(conn: &mut AsyncPgConnection, after_id: i64) -> QueryResult<StepRows> {
    let rows = page_views::table
        .filter(page_views::id.gt(after_id))
        .count()
        .get_result(conn)
        .await?;
    let unprocessed = page_views::table
        .filter(page_views::id.gt(after_id))
        .filter(page_views::processed_at.is_null())
        .count()
        .get_result(conn)
        .await?;
    Ok(StepRows { rows, unprocessed })
}

/// The app's INSERT as a pgbench script (the bench's database limit): one row, a JSONB
/// document of the same shape and size built per row from a bound parameter (as the app binds
/// its document), `RETURNING id`.
pub const PGBENCH_INSERT: &str = "\\set n random(1, 1000000000)\n\
INSERT INTO page_views (data) VALUES (('{\"user_agent\": \"wrk\", \"cookie_names\": [], \"request_id\": \"' || lpad(:n::text, 32, '0') || '\"}')::jsonb) RETURNING id;\n";

/// Adds `n` processed page views recorded a day ago (the bench's large table; the trigger
/// counts them in the same statement); then VACUUM ANALYZE and CHECKPOINT (superuser), so that
/// what is measured next meets the table's size, not the insert-triggered autovacuum and the
/// checkpoints of writing it.
pub async fn generate_processed(conn: &mut AsyncPgConnection, n: i64) -> QueryResult<()> {
    diesel::sql_query(
        "INSERT INTO page_views (created_at, data, processed_at) \
         SELECT now() - interval '1 day' - i * interval '1 millisecond', \
                '{\"user_agent\": \"pageviews-bench\", \"cookie_names\": [], \"request_id\": null}', \
                now() - interval '1 day' \
         FROM generate_series(1, $1) AS i",
    )
    .bind::<BigInt, _>(n)
    .execute(conn)
    .await?;
    diesel::sql_query("VACUUM (ANALYZE) page_views").execute(conn).await?;
    diesel::sql_query("CHECKPOINT").execute(conn).await?;
    Ok(())
}
