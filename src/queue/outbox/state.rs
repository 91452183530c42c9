//! What the publisher thread carries across sessions and connections (`State`), what a wait
//! on the hand-over brought (`Received`), and why a session ended (`SessionError`): shared by
//! the thread (publisher.rs), its sessions (session.rs) and their settling (settle.rs).

use super::handle::Shared;
use super::{CONFIRM_TIMEOUT, DRAIN_DEADLINE, IDLE_POLL, Offer};
use crate::backoff::Backoff;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub(super) enum SessionError {
    #[error(transparent)]
    Amqp(#[from] amiquip::Error),
    #[error("no publisher confirm within {CONFIRM_TIMEOUT:?}")]
    ConfirmTimeout,
    #[error("the broker closed the connection")]
    Closed,
    #[error("{0} tasks returned as unroutable ({1}); declaring the topology again")]
    Unroutable(usize, String),
    /// Messages the broker nacked (disk or memory alarm, queue limit).
    #[error("the broker refused {0} messages")]
    Refused(usize),
    /// Shutdown while the broker blocks the connection: nothing more can be published.
    #[error("the broker blocks the connection")]
    Blocked,
}

/// What the publisher thread carries across sessions and connections.
pub(super) struct State {
    /// Ids taken from the app and not yet confirmed, oldest first.
    pub pending: VecDeque<i64>,
    pub backoff: Backoff,
    /// When the thread noticed shutdown (the app said so, or every handle is gone).
    closed_at: Option<Instant>,
}

/// What a wait on the hand-over brought.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Received {
    Ids,
    Nothing,
    /// Every handle is gone: shutdown.
    Ended,
}

impl State {
    pub fn new() -> State {
        State {
            pending: VecDeque::new(),
            backoff: Backoff::default(),
            closed_at: None,
        }
    }

    /// Whether shutdown has begun (the app said so, or every handle is gone).
    pub fn closing(&mut self, shared: &Shared) -> bool {
        if shared.closing.load(Ordering::Relaxed) {
            self.closed_at.get_or_insert_with(Instant::now);
        }
        self.closed_at.is_some()
    }

    /// Waits up to `timeout` for an offer and takes its ids.
    pub fn receive(&mut self, rx: &Receiver<Offer>, timeout: Duration) -> Received {
        match rx.recv_timeout(timeout) {
            Ok(offer) => {
                self.pending.extend(offer.page_view_ids);
                Received::Ids
            }
            Err(RecvTimeoutError::Timeout) => Received::Nothing,
            Err(RecvTimeoutError::Disconnected) => {
                self.closed_at.get_or_insert_with(Instant::now);
                Received::Ended
            }
        }
    }

    /// Takes offers already waiting until `up_to` ids are pending.
    pub fn take_available(&mut self, rx: &Receiver<Offer>, up_to: usize) {
        while self.pending.len() < up_to {
            match rx.try_recv() {
                Ok(offer) => self.pending.extend(offer.page_view_ids),
                Err(_) => break,
            }
        }
    }

    /// Whether the thread should stop instead of trying again: shutdown, and nothing pending
    /// or the drain deadline passed.
    pub fn must_stop(&self, shared: &Shared) -> bool {
        (shared.closing.load(Ordering::Relaxed) || self.closed_at.is_some())
            && (self.pending.is_empty() || self.closed_at.is_some_and(|t| t.elapsed() > DRAIN_DEADLINE))
    }

    /// Gives up what is pending (the sweep publishes it after the restart).
    pub fn stop(&mut self, shared: &Shared) {
        if !self.pending.is_empty() {
            tracing::warn!(
                unpublished = self.pending.len(),
                "stopping with unpublished tasks; the sweep publishes them after the restart"
            );
            shared.release(self.pending.len());
            self.pending.clear();
        }
    }

    /// Waits `delay` before the next attempt, taking ids meanwhile (the bound holds: they count
    /// in the backlog) so that a shutdown is noticed. `false`: stop now (`must_stop`).
    pub fn wait(&mut self, delay: Duration, rx: &Receiver<Offer>, shared: &Shared) -> bool {
        let until = Instant::now() + delay;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            self.closing(shared);
            if self.must_stop(shared) {
                self.stop(shared);
                return false;
            }
            if self.receive(rx, left.min(IDLE_POLL)) == Received::Ended {
                std::thread::sleep(left.min(IDLE_POLL));
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn shutdown_stops_at_once_when_nothing_is_pending_and_after_the_drain_deadline_otherwise() {
        let shared = Shared::default();
        let mut state = State::new();
        assert!(!state.must_stop(&shared));
        shared.closing.store(true, Ordering::Relaxed);
        assert!(state.must_stop(&shared), "nothing pending");
        state.pending.extend([1, 2]);
        assert!(state.closing(&shared));
        assert!(!state.must_stop(&shared), "draining");
        state.closed_at = Some(Instant::now() - DRAIN_DEADLINE - Duration::from_millis(1));
        assert!(state.must_stop(&shared), "the drain deadline passed");
        shared.backlog.store(2, Ordering::Relaxed);
        state.stop(&shared);
        assert!(state.pending.is_empty());
        assert_eq!(shared.backlog.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_end_of_every_handle_counts_as_shutdown() {
        let shared = Shared::default();
        let mut state = State::new();
        let (tx, rx) = mpsc::sync_channel(4);
        tx.send(Offer {
            page_view_ids: vec![7, 8],
        })
        .unwrap();
        tx.send(Offer { page_view_ids: vec![9] }).unwrap();
        assert_eq!(state.receive(&rx, Duration::ZERO), Received::Ids);
        state.take_available(&rx, 10);
        assert_eq!(Vec::from(state.pending.clone()), [7, 8, 9]);
        assert_eq!(state.receive(&rx, Duration::ZERO), Received::Nothing);
        assert!(!state.closing(&shared));
        drop(tx);
        assert_eq!(state.receive(&rx, Duration::ZERO), Received::Ended);
        assert!(state.closing(&shared));
    }
}
