//! Hop 4 of a page view's route: the hand-over from the app's tasks (the INSERT batcher, the
//! sweep) to the publisher thread, and what both sides share.

use super::{CAPACITY, DEPTH_FRESH, OutboxMetrics};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The ids of committed page views, for the publisher to turn into tasks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    pub page_view_ids: Vec<i64>,
}

/// What became of an [`Offer`]. Unless `Accepted`, the rows stay unprocessed and the sweep
/// offers them again; either way the offer never waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offered {
    /// The publisher holds the ids until the broker confirms them.
    Accepted,
    /// [`CAPACITY`] ids are already waiting for the broker (or the hand-over is full).
    Full,
    /// The outbox is shutting down, or its thread has ended.
    Stopping,
}

/// The broker's connection.blocked note: the number of the connection it concerns, and the
/// broker's reason while it blocks.
#[derive(Default)]
pub(super) struct Blocked {
    connection: u64,
    reason: Option<String>,
}

/// Ready messages in the task queue at one look, and when.
#[derive(Clone, Copy)]
pub(super) struct DepthRead {
    ready: u32,
    at: Instant,
}

/// What the publisher thread, the sweep and the handles share.
#[derive(Default)]
pub(super) struct Shared {
    pub connected: AtomicBool,
    /// Set while the broker blocks the connection (connection.blocked: a memory or disk
    /// alarm): nothing can be published, and any call on the connection may wait until the
    /// alarm clears.
    blocked: Mutex<Blocked>,
    /// The number of the current connection.
    pub connection: AtomicU64,
    /// Ids offered and neither confirmed nor dropped yet.
    pub backlog: AtomicUsize,
    /// The last look at the task queue; `None`: not known.
    depth: Mutex<Option<DepthRead>>,
    pub closing: AtomicBool,
    pub metrics: OutboxMetrics,
}

impl Shared {
    /// The broker's reason while it blocks the current connection.
    pub fn blocked(&self) -> Option<String> {
        self.blocked.lock().unwrap_or_else(|e| e.into_inner()).reason.clone()
    }

    pub fn set_depth(&self, ready: Option<u32>) {
        *self.depth.lock().unwrap_or_else(|e| e.into_inner()) = ready.map(|ready| DepthRead {
            ready,
            at: Instant::now(),
        });
    }

    /// Whether a recent look found the task queue without ready messages.
    pub fn queue_empty(&self) -> bool {
        let depth = *self.depth.lock().unwrap_or_else(|e| e.into_inner());
        depth.is_some_and(|d| d.ready == 0 && d.at.elapsed() < DEPTH_FRESH)
    }

    /// Connected, and not blocked by the broker.
    pub fn publishing(&self) -> bool {
        self.connected.load(Ordering::Relaxed) && self.blocked().is_none()
    }

    pub fn set_blocked(&self, connection: u64, reason: Option<String>) {
        let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        // A late note about an earlier connection changes nothing.
        if connection >= blocked.connection {
            *blocked = Blocked { connection, reason };
        }
    }

    /// `n` ids left the outbox unconfirmed (deferred, or given up at shutdown).
    pub fn release(&self, n: usize) {
        self.backlog.fetch_sub(n, Ordering::Relaxed);
    }
}

/// What the sweep and the request handlers use.
#[derive(Clone)]
pub(super) struct Handle {
    pub tx: SyncSender<Offer>,
    pub shared: Arc<Shared>,
}

impl Handle {
    pub fn offer(&self, offer: Offer) -> Offered {
        let n = offer.page_view_ids.len();
        let shared = &self.shared;
        if shared.closing.load(Ordering::Relaxed) {
            shared.metrics.deferred.inc_by(n as u64);
            return Offered::Stopping;
        }
        let outcome = if shared.backlog.fetch_add(n, Ordering::Relaxed) + n > CAPACITY {
            Offered::Full
        } else {
            match self.tx.try_send(offer) {
                Ok(()) => return Offered::Accepted,
                Err(TrySendError::Full(_)) => Offered::Full,
                Err(TrySendError::Disconnected(_)) => Offered::Stopping,
            }
        };
        shared.metrics.deferred.inc_by(n as u64);
        shared.release(n);
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn handle(slots: usize) -> (Handle, mpsc::Receiver<Offer>) {
        let (tx, rx) = mpsc::sync_channel(slots);
        let shared = Arc::new(Shared::default());
        (Handle { tx, shared }, rx)
    }

    fn ids(n: usize) -> Offer {
        Offer {
            page_view_ids: (1..=n as i64).collect(),
        }
    }

    #[test]
    fn offers_past_the_capacity_are_deferred_and_not_counted_as_held() {
        let (handle, rx) = handle(16);
        assert_eq!(handle.offer(ids(CAPACITY - 1)), Offered::Accepted);
        assert_eq!(handle.offer(ids(2)), Offered::Full);
        assert_eq!(handle.shared.backlog.load(Ordering::Relaxed), CAPACITY - 1);
        assert_eq!(handle.offer(ids(1)), Offered::Accepted);
        assert_eq!(handle.shared.metrics.deferred.get(), 2);
        assert_eq!(rx.try_recv().unwrap().page_view_ids.len(), CAPACITY - 1);
    }

    #[test]
    fn a_full_hand_over_or_an_ended_thread_defers() {
        let (handle, rx) = handle(1);
        assert_eq!(handle.offer(ids(1)), Offered::Accepted);
        assert_eq!(handle.offer(ids(3)), Offered::Full);
        drop(rx);
        assert_eq!(handle.offer(ids(5)), Offered::Stopping);
        assert_eq!(handle.shared.backlog.load(Ordering::Relaxed), 1);
        assert_eq!(handle.shared.metrics.deferred.get(), 8);
    }

    #[test]
    fn offers_while_closing_leave_the_backlog_as_it_was() {
        let (handle, _rx) = handle(4);
        assert_eq!(handle.offer(ids(2)), Offered::Accepted);
        handle.shared.closing.store(true, Ordering::Relaxed);
        assert_eq!(handle.offer(ids(3)), Offered::Stopping);
        assert_eq!(handle.shared.backlog.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_late_blocked_note_about_an_earlier_connection_changes_nothing() {
        let shared = Shared::default();
        shared.connected.store(true, Ordering::Relaxed);
        shared.set_blocked(2, Some("memory".into()));
        assert!(!shared.publishing());
        shared.set_blocked(1, None);
        assert_eq!(shared.blocked().as_deref(), Some("memory"));
        shared.set_blocked(3, None);
        assert!(shared.publishing());
    }

    #[test]
    fn only_a_recent_look_at_an_empty_queue_counts_as_empty() {
        let shared = Shared::default();
        assert!(!shared.queue_empty(), "never looked");
        shared.set_depth(Some(3));
        assert!(!shared.queue_empty());
        shared.set_depth(Some(0));
        assert!(shared.queue_empty());
        *shared.depth.lock().unwrap() = Some(DepthRead {
            ready: 0,
            at: Instant::now() - DEPTH_FRESH,
        });
        assert!(!shared.queue_empty(), "an old look says nothing");
    }
}
