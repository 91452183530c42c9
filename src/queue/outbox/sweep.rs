//! Hop 7 of a page view's route: the sweep re-offers rows still unprocessed after one interval
//! when the task queue holds no ready message, and once each row unprocessed for
//! [`MAX_WAIT_INTERVALS`] intervals while it does.

use super::handle::Handle;
use super::{CAPACITY, MAX_WAIT_INTERVALS, Offer, Offered, SWEEP_PAGE};
use crate::config::Sweep;
use crate::db::{self, Pool};
use crate::shutdown::Shutdown;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Which rows one sweep pass offers: unprocessed, with an id above `after`, older than `age`.
#[derive(Debug, PartialEq, Eq)]
struct Window {
    after: i64,
    age: Duration,
}

/// An empty task queue: every row older than `republish_after` (none of them is on its way). A
/// queue with messages: only rows older than `MAX_WAIT_INTERVALS` intervals, and not those
/// already offered again (up to `offered_up_to`) while it stayed that way.
fn window(queue_empty: bool, offered_up_to: i64, config: &Sweep) -> Window {
    if queue_empty {
        Window {
            after: 0,
            age: config.republish_after,
        }
    } else {
        Window {
            after: offered_up_to,
            age: config.interval * MAX_WAIT_INTERVALS,
        }
    }
}

/// Runs until `stopping`: a pass every `config.interval` while the publisher can publish.
pub(super) async fn sweep(handle: Handle, pool: Pool, config: Sweep, stopping: Shutdown) {
    let mut ticker = stopping.clone().ticker(config.interval);
    // Rows up to this id have been offered again: not again while the queue stays full.
    let mut offered_up_to = 0;
    while ticker.tick().await {
        if !handle.shared.publishing() || stopping.is_set() {
            continue;
        }
        let window = window(handle.shared.queue_empty(), offered_up_to, &config);
        let (offered, last) = sweep_pass(&handle, &pool, window, &stopping).await;
        offered_up_to = offered_up_to.max(last);
        if offered > 0 {
            handle.shared.metrics.republished.inc_by(offered as u64);
            tracing::info!(count = offered, "sweep offered unprocessed page views again");
        }
    }
}

/// Offers the rows of `window`, at full speed but never more than the outbox holds. How many
/// it offered, and the last id offered.
async fn sweep_pass(handle: &Handle, pool: &Pool, window: Window, stopping: &Shutdown) -> (usize, i64) {
    let Window { mut after, age } = window;
    let shared = &handle.shared;
    let usable = || shared.publishing() && !stopping.is_set();
    let (mut offered, mut last) = (0, 0);
    loop {
        while shared.backlog.load(Ordering::Relaxed) > CAPACITY - SWEEP_PAGE {
            if !usable() {
                return (offered, last);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let page = db::with_connection(pool, async |conn| {
            db::page_views::unprocessed(conn, after, age, SWEEP_PAGE as i64).await
        })
        .await;
        match page {
            Ok(ids) if ids.is_empty() => return (offered, last),
            Ok(ids) => {
                after = ids[ids.len() - 1];
                let n = ids.len();
                if !usable() || handle.offer(Offer { page_view_ids: ids }) != Offered::Accepted {
                    return (offered, last);
                }
                offered += n;
                last = after;
            }
            Err(error) => {
                tracing::warn!(%error, "sweep cannot read unprocessed page views");
                return (offered, last);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_queue_opens_the_window_and_a_full_one_narrows_it() {
        let interval = Duration::from_secs(10);
        assert_eq!(
            window(true, 500, &Sweep::every(interval)),
            Window {
                after: 0,
                age: interval
            }
        );
        assert_eq!(
            window(false, 500, &Sweep::every(interval)),
            Window {
                after: 500,
                age: Duration::from_secs(60)
            }
        );
    }
}
