//! The retention job (`PAGEVIEWS_RETENTION_DAYS`): every rollup interval, one worker deletes
//! processed page views older than that many days, a batch at a time, for at most half an
//! interval (so one run never meets the next); what is left waits for the next interval.

use crate::db::{self, Pool};
use crate::shutdown::Shutdown;
use std::time::{Duration, Instant};

/// A run in progress at shutdown stops after its current batch (each batch commits alone).
pub async fn schedule(pool: Pool, days: u32, interval: Duration, stopping: Shutdown) {
    let mut stop = stopping.clone();
    let mut ticker = stopping.ticker(interval);
    while ticker.tick().await {
        let claim = db::with_connection(&pool, async |conn| db::retention::claim(conn, interval).await);
        let claimed = tokio::select! {
            claimed = claim => claimed,
            () = stop.wait() => break,
        };
        match claimed {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!("retention already run by another worker in this interval");
                continue;
            }
            Err(error) => {
                tracing::warn!(%error, "retention: cannot claim the job; trying again next interval");
                continue;
            }
        }
        let until = Instant::now() + interval / 2;
        let mut deleted = 0;
        loop {
            let batch = db::with_connection(&pool, async |conn| {
                db::retention::expire_batch(conn, days, db::retention::BATCH).await
            });
            let outcome = tokio::select! {
                outcome = batch => outcome,
                () = stop.wait() => break,
            };
            match outcome {
                Ok(n) => {
                    deleted += n;
                    if n < i64::from(db::retention::BATCH) || Instant::now() >= until {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, deleted, "retention batch failed; trying again next interval");
                    break;
                }
            }
        }
        if deleted > 0 {
            tracing::info!(deleted, days, "retention: processed page views deleted");
        }
    }
}
