//! Steady load through nginx over TLS, and the accounting after it: which answered requests
//! were stored, and how often (nginx's request id is in every page view's document).

use pageviews_testbed::process::wait_until;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const LOAD_CONCURRENCY: usize = 4;

/// One request of the load: `Ok(status)` or the transport error, the request id nginx gave
/// it, and when it was sent and answered.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: Result<u16, String>,
    pub request_id: Option<String>,
    pub sent: Instant,
    pub answered: Instant,
}

pub type Results = Arc<Mutex<Vec<Answer>>>;

/// GETs of `url`, `LOAD_CONCURRENCY` at a time, until `stop` is set.
pub fn steady_load(
    client: reqwest::Client,
    url: String,
    stop: Arc<AtomicBool>,
    results: Results,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..LOAD_CONCURRENCY)
        .map(|_| {
            let (client, url, stop, results) = (client.clone(), url.clone(), stop.clone(), results.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    let (status, request_id) = match client.get(&url).send().await {
                        Ok(response) => {
                            let id = response.headers().get("x-request-id");
                            let id = id.and_then(|v| v.to_str().ok()).map(str::to_owned);
                            (Ok(response.status().as_u16()), id)
                        }
                        Err(e) => (Err(format!("{e:#}")), None),
                    };
                    let answered = Instant::now();
                    results.lock().unwrap().push(Answer {
                        status,
                        request_id,
                        sent,
                        answered,
                    });
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect()
}

/// The answers other than 200 since answer `from`.
pub fn failures(results: &Results, from: usize) -> Vec<Result<u16, String>> {
    results.lock().unwrap()[from..]
        .iter()
        .map(|a| a.status.clone())
        .filter(|status| status != &Ok(200))
        .collect()
}

/// Requests answered so far.
pub fn answered(results: &Results) -> usize {
    results.lock().unwrap().len()
}

/// Waits until more than `above` requests have been answered in all, within `bound`.
pub async fn wait_for_answers(what: &str, results: &Results, above: usize, bound: Duration) -> anyhow::Result<()> {
    wait_until(what, bound, || async {
        anyhow::ensure!(answered(results) > above, "{} answered", answered(results));
        Ok(())
    })
    .await
}

/// A metric's value in an OpenMetrics page.
pub async fn metric(url: &str, name: &str) -> anyhow::Result<u64> {
    let text = reqwest::get(url).await?.text().await?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no {name} in {url}"))
}

/// How many rows each request id has.
pub async fn request_ids(database: &str) -> anyhow::Result<HashMap<String, i64>> {
    use diesel::prelude::*;
    use diesel_async::{AsyncConnection, RunQueryDsl};
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Text)]
        id: String,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut db = diesel_async::AsyncPgConnection::establish(database).await?;
    let rows: Vec<Row> =
        diesel::sql_query("SELECT data->>'request_id' AS id, count(*) AS n FROM page_views GROUP BY 1")
            .load(&mut db)
            .await?;
    Ok(rows.into_iter().map(|r| (r.id, r.n)).collect())
}

/// Waits until every stored page view is processed; returns how many there are.
pub async fn all_processed(database: &str, bound: Duration) -> anyhow::Result<i64> {
    wait_until("every page view processed", bound, || async {
        use diesel_async::AsyncConnection;
        let mut db = diesel_async::AsyncPgConnection::establish(database).await?;
        let totals = pageviews::db::page_views::totals(&mut db).await?;
        anyhow::ensure!(
            totals.recorded == totals.processed,
            "{} of {}",
            totals.processed,
            totals.recorded
        );
        Ok(totals.recorded)
    })
    .await
}
