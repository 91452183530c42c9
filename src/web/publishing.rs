//! The async side of publishing: recording the broker's confirms, and the sweep that hands
//! over rows whose task was never confirmed (broker down, queue full, app restarted).

use super::AppState;
use crate::db::{self, Pool};
use crate::shutdown::Shutdown;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedReceiver;

/// Rows younger than this are probably still on their way; the sweep leaves them alone.
const GRACE: Duration = Duration::from_secs(5);
const SWEEP_BATCH: i64 = 2_000;

/// Marks confirmed rows, coalescing whatever has arrived into one UPDATE. A failed update
/// only means those rows get published once more by the sweep.
pub async fn record_confirms(pool: Pool, mut confirmed: UnboundedReceiver<Vec<i64>>) {
    while let Some(mut ids) = confirmed.recv().await {
        while let Ok(more) = confirmed.try_recv() {
            ids.extend(more);
        }
        let result = db::run(&pool, async |conn| db::page_views::mark_enqueued(conn, &ids).await).await;
        if let Err(error) = result {
            tracing::warn!(%error, count = ids.len(), "cannot record confirms; the sweep will publish these again");
        }
    }
}

pub async fn sweep(app: AppState, interval: Duration, stopping: Shutdown) {
    let mut ticker = stopping.ticker(interval);
    while ticker.tick().await {
        // Only when the publisher is connected and idle: otherwise the ids are still queued.
        if !app.publisher.is_connected() || app.publisher.queued() > 0 {
            continue;
        }
        match db::run(&app.pool, async |conn| {
            db::page_views::unconfirmed(conn, GRACE, SWEEP_BATCH).await
        })
        .await
        {
            Ok(ids) if ids.is_empty() => {}
            Ok(ids) => {
                let offered = ids.iter().take_while(|id| app.publisher.offer(**id)).count();
                app.metrics.republished.inc_by(offered as u64);
                tracing::info!(count = offered, "sweep re-published unconfirmed page views");
            }
            Err(error) => tracing::warn!(%error, "sweep cannot read unconfirmed page views"),
        }
    }
}
