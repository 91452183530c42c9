//! The scheduled job: every interval, the per-minute rollup (once across all workers).

use super::WorkerMetrics;
use crate::db::{self, Pool};
use crate::shutdown::Shutdown;
use std::sync::Arc;
use std::time::Duration;

/// A run in progress at shutdown is abandoned (rolled back; the next worker does it).
pub async fn schedule(pool: Pool, interval: Duration, metrics: Arc<WorkerMetrics>, stopping: Shutdown) {
    let mut stop = stopping.clone();
    let mut ticker = stopping.ticker(interval);
    while ticker.tick().await {
        let run = db::with_connection(&pool, async |conn| db::rollups::run_if_due(conn, interval).await);
        let outcome = tokio::select! {
            outcome = run => outcome,
            () = stop.wait() => break,
        };
        match outcome {
            Ok(Some(run)) => {
                metrics.rollup_runs.inc();
                tracing::info!(minutes = run.minutes, "rollup done");
            }
            Ok(None) => tracing::debug!("rollup already done by another worker in this interval"),
            Err(error) => tracing::warn!(%error, "rollup failed; trying again next interval"),
        }
    }
}
