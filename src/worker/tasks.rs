//! Processing task batches in PostgreSQL, retrying while the database is away: the worker's
//! step, [`process`], needs PostgreSQL only (the consumer hands it the ids and acts on its
//! verdict).

use super::WorkerMetrics;
use crate::backoff::Backoff;
use crate::db::{self, Pool};
use crate::queue::consumer::{Batch, Verdict};
use crate::shutdown::Shutdown;
use chrono::Utc;
use std::sync::Arc;
use tokio::sync::mpsc;

pub async fn process_batches(
    pool: Pool,
    mut batches: mpsc::Receiver<Batch>,
    metrics: Arc<WorkerMetrics>,
    mut stopping: Shutdown,
) {
    // Batches handed over before shutdown are processed; after it, none is waited for (the
    // consumer thread may be left in a connect attempt, holding the sender).
    loop {
        let batch = tokio::select! {
            biased;
            batch = batches.recv() => batch,
            () = stopping.wait() => batches.try_recv().ok(),
        };
        let Some(batch) = batch else { return };
        let verdict = process(&pool, &batch.ids, &metrics, &mut stopping).await;
        let _ = batch.reply.send(verdict);
    }
}

/// Marks the page views `ids` processed in one transaction and says what to do with their
/// messages: [`Verdict::Done`] (ack; dead-letter the ids that name no page view) or
/// [`Verdict::NotDone`] (leave unacked). Retries until the transaction commits. Only a
/// shutdown (`stopping`) while the database is unreachable gives up (at the next failed
/// attempt, or at once while waiting to retry), leaving the deliveries unacked so the broker
/// redelivers them.
pub async fn process(pool: &Pool, ids: &[i64], metrics: &WorkerMetrics, stopping: &mut Shutdown) -> Verdict {
    let mut backoff = Backoff::default();
    loop {
        let outcome = db::with_connection(pool, async |conn| db::page_views::process(conn, ids).await).await;
        match outcome {
            Ok(processed) => {
                let now = Utc::now();
                for done in &processed.done {
                    metrics.latency.observe((now - done.created_at).as_seconds_f64());
                }
                metrics.processed.inc_by(processed.done.len() as u64);
                metrics.duplicates.inc_by(processed.duplicates.len() as u64);
                if !processed.busy.is_empty() {
                    tracing::info!(
                        busy = processed.busy.len(),
                        first = processed.busy[0],
                        "page views locked by another transaction skipped; the sweep offers them again while unprocessed"
                    );
                }
                tracing::debug!(
                    done = processed.done.len(),
                    duplicates = processed.duplicates.len(),
                    "batch processed"
                );
                return Verdict::Done {
                    missing: processed.missing,
                };
            }
            Err(error) if !stopping.is_set() => {
                let delay = backoff.next_delay();
                tracing::warn!(%error, tasks = ids.len(), retry_in_ms = delay.as_millis() as u64, "cannot process tasks; retrying");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stopping.wait() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, tasks = ids.len(), "stopping with unprocessed tasks; the broker will redeliver them");
                return Verdict::NotDone;
            }
        }
    }
}
