//! The worker's consumer: one thread owns the AMQP connection, takes deliveries in batches (up
//! to the prefetch limit), hands the valid ones to the async side and acks each only after the
//! database transaction that processed it has committed. A malformed message is rejected
//! without requeue, which routes it to the dead-letter queue; an id naming no page view is
//! dead-lettered on its own (a message of just that id), the rest of its message processed.
//!
//! The steps: the thread and its sessions (session.rs) take deliveries and carry out the plan
//! that plan.rs (pure) makes of each batch's [`Verdict`].

mod plan;
mod session;

use super::STOP_GRACE;
use super::brokers::Brokers;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::{mpsc, oneshot};

/// A batch for the async side, with the channel its verdict comes back on.
pub struct Batch {
    pub ids: Vec<i64>,
    pub reply: oneshot::Sender<Verdict>,
}

/// What the async side decided for a batch.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Committed: ack everything; these ids name no page view (dead-letter them).
    Done { missing: Vec<i64> },
    /// Not committed (shutting down while the database is away): leave unacked for redelivery.
    NotDone,
}

/// What the consumer thread reports as it goes.
pub trait ConsumerEvents: Send + Sync {
    fn dead_lettered(&self);
    fn connected(&self, up: bool);
}

/// Ids per batch (one transaction), at most; deliveries are taken until it is reached.
const MAX_BATCH_IDS: usize = 2_000;

/// The consumer thread, the counterpart of `outbox::Outbox`: `start` it, give each of its
/// batches a verdict, `shutdown`.
pub struct Consumer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Consumer {
    /// Starts the thread (it reconnects with backoff when the broker goes away); its batches
    /// arrive on the receiver, each waiting for its verdict before the next is taken.
    pub fn start(
        mut brokers: Brokers,
        prefetch: u16,
        events: impl ConsumerEvents + 'static,
    ) -> (Consumer, mpsc::Receiver<Batch>) {
        let (tx, rx) = mpsc::channel(4);
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("amqp-consumer".into())
            .spawn(move || session::run(&mut brokers, prefetch, &tx, &thread_stop, &events))
            .expect("spawning a thread only fails when the system is out of resources");
        (Consumer { stop, thread }, rx)
    }

    /// Stops taking deliveries and waits for the thread, up to [`STOP_GRACE`]. It waits for the
    /// verdict of the batch in hand first, so whoever gives verdicts must be able to give up.
    /// A thread still connecting, or still waiting after that, is left behind: its deliveries
    /// are unacked, and the broker redelivers them.
    pub async fn shutdown(self) {
        self.stop.store(true, Ordering::Relaxed);
        if !super::join_within(self.thread, || STOP_GRACE).await {
            tracing::warn!(
                grace_ms = STOP_GRACE.as_millis() as u64,
                "the consumer did not stop in time (connecting, or a batch in hand); its unacked tasks will be redelivered"
            );
        }
    }
}
