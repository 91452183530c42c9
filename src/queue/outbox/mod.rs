//! The app's outbox: every recorded page view reaches the worker, however often the broker or
//! the app goes away, for one row write per view (the INSERT) and no bookkeeping per row.
//!
//! The steps, one file each:
//! - [`Outbox::offer`] (handle.rs) hands the ids of a committed INSERT to the publisher thread
//!   without waiting. Ids handed over and not yet confirmed are bounded by [`CAPACITY`];
//!   beyond it, offers are deferred and left to the sweep.
//! - The publisher thread (publisher.rs) owns the AMQP connection: it connects, reconnects with
//!   backoff, follows the broker's resource alarms and drains at shutdown. While the broker
//!   blocks the connection, the thread neither publishes nor calls it, and a shutdown does not
//!   wait for it.
//! - A session (session.rs) publishes persistent, `mandatory` messages of up to
//!   [`IDS_PER_MESSAGE`] ids, up to [`MAX_BATCH`] ids per wait for publisher confirms.
//! - Settlement (settle.rs, pure): what the broker confirmed, nacked or returned, which ids go
//!   back to the front of the queue, and what the session does next. What is not confirmed
//!   (nacked, returned as unroutable, connection lost) is retried with backoff.
//! - The sweep (sweep.rs) re-offers rows still unprocessed after one sweep interval, in id
//!   order and as fast as the broker takes them, when the task queue holds no ready message (a
//!   recent look): then such a row is not on its way. This covers tasks never published
//!   (broker down, outbox full, app restarted) and tasks the broker confirmed and lost later
//!   (queue purged, deleted or lost with its node). While the queue never empties (the workers
//!   do not keep up), it offers each row unprocessed after [`MAX_WAIT_INTERVALS`] intervals
//!   once, so a lost task waits at most that long for its second chance. A duplicate is
//!   harmless: the worker marks each row processed once.

mod handle;
mod metrics;
mod publisher;
mod session;
mod settle;
mod sweep;

pub use handle::{Offer, Offered};
pub use metrics::OutboxMetrics;

use super::STOP_GRACE;
use super::brokers::Brokers;
use crate::config::Sweep;
use crate::db::Pool;
use crate::shutdown;
use handle::{Handle, Shared};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

/// Ids per wait for publisher confirms: larger batches amortise the broker's fsync.
pub const MAX_BATCH: usize = 512;
/// Ids per message (format: `Task`); one message per page view cost the broker most of its time.
pub const IDS_PER_MESSAGE: usize = 64;
/// Ids handed over and not yet confirmed, at most (8 bytes each): some seconds of a burst the
/// broker cannot take at once, or of an outage. Beyond it the sweep takes over.
pub const CAPACITY: usize = 65_536;
/// Ids per sweep query.
const SWEEP_PAGE: usize = 4_096;
/// Sweep intervals a row may stay unprocessed before it is offered again even though the
/// task queue is not empty: offering everything older than one interval then would add a
/// duplicate of every queued task per interval to a queue that is already too long.
pub const MAX_WAIT_INTERVALS: u32 = 6;
/// How long a batch may wait for its confirms before the connection counts as lost (and the
/// batch is published again on a new one). On a cluster, a channel opened while a frozen
/// node still passed for the queue's leader kept sending there, unconfirmed; a new channel
/// finds the new leader. Confirms take milliseconds otherwise.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// After shutdown begins, how long the thread keeps trying to publish what it holds.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);
/// How long the idle thread waits for ids before it checks on the connection again: a broker
/// that died is noticed (heartbeat) while nothing is published.
const IDLE_POLL: Duration = Duration::from_millis(100);
/// How often the thread reads the task queue's depth (a passive declare; it also notices a
/// deleted queue, and reconnecting declares it again).
const DEPTH_EVERY: Duration = Duration::from_secs(1);
/// A depth read longer ago than this says nothing (the thread is busy or stuck elsewhere).
const DEPTH_FRESH: Duration = Duration::from_secs(3);
/// Batches (one per INSERT) the hand-over holds; the id count is bounded by [`CAPACITY`].
const HAND_OVER_SLOTS: usize = 4_096;

struct Running {
    thread: std::thread::JoinHandle<()>,
    sweep: tokio::task::JoinHandle<()>,
    stop_sweep: shutdown::Trigger,
}

/// A cheap handle (clone it); `shutdown` stops the sweep and the thread.
#[derive(Clone)]
pub struct Outbox {
    handle: Handle,
    running: Arc<Mutex<Option<Running>>>,
}

impl Outbox {
    /// Starts the publisher thread and the sweep. Needs a tokio runtime.
    pub fn start(mut brokers: Brokers, pool: Pool, sweep: Sweep) -> Outbox {
        let (tx, rx) = mpsc::sync_channel(HAND_OVER_SLOTS);
        let shared = Arc::new(Shared::default());
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("amqp-publisher".into())
            .spawn(move || publisher::run(&mut brokers, &rx, thread_shared))
            .expect("spawning a thread only fails when the system is out of resources");
        let handle = Handle { tx, shared };
        let (stop_sweep, stopping) = shutdown::channel();
        let sweep = tokio::spawn(sweep::sweep(handle.clone(), pool, sweep, stopping));
        Outbox {
            handle,
            running: Arc::new(Mutex::new(Some(Running {
                thread,
                sweep,
                stop_sweep,
            }))),
        }
    }

    /// Hands the ids of committed rows to the publisher without waiting. Unless
    /// [`Offered::Accepted`], the rows stay unprocessed and the sweep offers them again.
    pub fn offer(&self, offer: Offer) -> Offered {
        self.handle.offer(offer)
    }

    /// Whether the publisher holds a broker connection it can publish on (a lost one is
    /// noticed within a heartbeat; a blocked one when the broker says so).
    pub fn is_connected(&self) -> bool {
        self.status() == BrokerStatus::Ok
    }

    pub fn status(&self) -> BrokerStatus {
        let shared = &self.handle.shared;
        match shared.blocked() {
            _ if !shared.connected.load(Ordering::Relaxed) => BrokerStatus::Unavailable,
            Some(reason) => BrokerStatus::Blocked(reason),
            None => BrokerStatus::Ok,
        }
    }

    pub fn metrics(&self) -> &OutboxMetrics {
        &self.handle.shared.metrics
    }

    /// Stops the sweep, publishes what the outbox holds (for up to 5 s if the broker is away;
    /// the next sweep publishes the rest) and waits for the thread: up to `STOP_GRACE` more,
    /// or only that when it holds nothing. A thread still busy then (a connect attempt, a
    /// blocked connection) is left to end with the process.
    pub async fn shutdown(&self) {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(running) = running else { return };
        running.stop_sweep.fire();
        let _ = running.sweep.await;
        let shared = &self.handle.shared;
        shared.closing.store(true, Ordering::Relaxed);
        // While the broker blocks the connection nothing can be published: no drain.
        let limit = || match shared.backlog.load(Ordering::Relaxed) {
            _ if shared.blocked().is_some() => STOP_GRACE,
            0 => STOP_GRACE,
            _ => DRAIN_DEADLINE + STOP_GRACE,
        };
        if !super::join_within(running.thread, limit).await {
            tracing::warn!(
                unpublished = shared.backlog.load(Ordering::Relaxed),
                "the publisher did not stop in time; the sweep publishes what it held after the restart"
            );
        }
    }
}

/// What `/readyz` says about the broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BrokerStatus {
    Ok,
    Unavailable,
    /// The broker blocks publishing (connection.blocked), for this reason.
    Blocked(String),
}

impl std::fmt::Display for BrokerStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BrokerStatus::Ok => f.write_str("ok"),
            BrokerStatus::Unavailable => f.write_str("unavailable"),
            BrokerStatus::Blocked(reason) => write!(f, "blocked by the broker ({reason})"),
        }
    }
}
