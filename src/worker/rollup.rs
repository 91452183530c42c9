//! The scheduled job: every interval, the per-minute rollup (once across all workers).

use super::WorkerMetrics;
use crate::db::{self, Pool};
use crate::shutdown::Shutdown;
use std::sync::Arc;
use std::time::Duration;

pub async fn schedule(pool: Pool, interval: Duration, metrics: Arc<WorkerMetrics>, mut stopping: Shutdown) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stopping.wait() => return,
        }
        let outcome = async {
            let mut conn = pool.get().await.map_err(|e| e.to_string())?;
            db::rollups::run_if_due(&mut conn, interval)
                .await
                .map_err(|e| e.to_string())
        }
        .await;
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
