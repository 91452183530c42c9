//! The publisher thread: owns the AMQP connection, connects and reconnects with backoff,
//! follows the broker's resource alarms, runs sessions (session.rs) and drains at shutdown.

use super::handle::Shared;
use super::session::{SessionError, session};
use super::{DRAIN_DEADLINE, IDLE_POLL, Offer};
use crate::backoff::Backoff;
use crate::queue::brokers::Brokers;
use amiquip::ConnectionBlockedNotification;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

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
    fn new() -> State {
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
    fn must_stop(&self, shared: &Shared) -> bool {
        (shared.closing.load(Ordering::Relaxed) || self.closed_at.is_some())
            && (self.pending.is_empty() || self.closed_at.is_some_and(|t| t.elapsed() > DRAIN_DEADLINE))
    }

    /// Gives up what is pending (the sweep publishes it after the restart).
    fn stop(&mut self, shared: &Shared) {
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
    fn wait(&mut self, delay: Duration, rx: &Receiver<Offer>, shared: &Shared) -> bool {
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

/// The thread: connects, publishes, reconnects with backoff, until shutdown.
pub(super) fn run(brokers: &mut Brokers, rx: &Receiver<Offer>, shared: Arc<Shared>) {
    let mut state = State::new();
    loop {
        let delay = match connect(brokers, &|| state.must_stop(&shared)) {
            Ok(None) => {
                state.stop(&shared);
                return;
            }
            Ok(Some((connection, channel))) => {
                tracing::info!(broker = %brokers.current(), "publisher connected");
                match on_connection(connection, channel, rx, &shared, &mut state) {
                    Ok(()) => return,
                    Err(e) => {
                        shared.metrics.failures.inc();
                        let delay = state.backoff.next_delay();
                        tracing::warn!(broker = %brokers.current(), error = %e, unconfirmed = state.pending.len(), retry_in_ms = delay.as_millis() as u64, "publisher lost the broker; reconnecting");
                        delay
                    }
                }
            }
            Err(e) => {
                let delay = state.backoff.next_delay();
                tracing::warn!(broker = %brokers, error = %e, retry_in_ms = delay.as_millis() as u64, "publisher cannot reach the broker");
                delay
            }
        };
        if !state.wait(delay, rx, &shared) {
            return;
        }
    }
}

/// The first node that answers, with publisher confirms on; `Ok(None)`: `stop` said so first.
fn connect(
    brokers: &mut Brokers,
    stop: &dyn Fn() -> bool,
) -> crate::queue::Result<Option<(amiquip::Connection, amiquip::Channel)>> {
    let Some((connection, channel)) = brokers.open(stop)? else {
        return Ok(None);
    };
    channel.enable_publisher_confirms()?;
    Ok(Some((connection, channel)))
}

/// Publishes on a new connection until shutdown (`Ok`, the thread ends) or a failure.
fn on_connection(
    mut connection: amiquip::Connection,
    channel: amiquip::Channel,
    rx: &Receiver<Offer>,
    shared: &Arc<Shared>,
    state: &mut State,
) -> Result<(), SessionError> {
    let number = shared.connection.fetch_add(1, Ordering::Relaxed) + 1;
    shared.set_blocked(number, None);
    if let Err(e) = watch_blocked(&mut connection, number, shared.clone()) {
        tracing::warn!(error = %e, "cannot listen for the broker blocking the connection");
    }
    shared.connected.store(true, Ordering::Relaxed);
    let result = sessions(&mut connection, channel, rx, shared, state);
    shared.connected.store(false, Ordering::Relaxed);
    shared.set_depth(None);
    match result {
        Ok(()) => {
            let _ = connection.close();
            Ok(())
        }
        Err(SessionError::Blocked) => {
            // Closing would wait for the broker to answer, which it does only once the alarm
            // clears: leave the connection to the process's end.
            std::mem::forget(connection);
            state.stop(shared);
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Follows the broker's connection.blocked / unblocked notes for connection `number` on a
/// thread of its own: the publisher thread may be waiting in a call the broker will not
/// answer while it blocks the connection. The thread ends with the connection.
fn watch_blocked(connection: &mut amiquip::Connection, number: u64, shared: Arc<Shared>) -> amiquip::Result<()> {
    let notes = connection.listen_for_connection_blocked()?;
    let watch = move || {
        for note in notes.iter() {
            match note {
                ConnectionBlockedNotification::Blocked(reason) => {
                    tracing::warn!(%reason, "the broker blocks publishing (resource alarm); waiting for it to lift");
                    shared.metrics.failures.inc();
                    shared.set_blocked(number, Some(reason));
                }
                ConnectionBlockedNotification::Unblocked => {
                    tracing::info!("the broker unblocked publishing");
                    shared.set_blocked(number, None);
                }
            }
        }
    };
    if let Err(e) = std::thread::Builder::new().name("amqp-blocked".into()).spawn(watch) {
        tracing::warn!(error = %e, "cannot start the thread that follows connection.blocked");
    }
    Ok(())
}

/// Sessions on one connection until shutdown or a failure. A refusal (nacks) ends a session;
/// after a backoff the next one starts on a new channel: a quorum queue that refused publishes
/// under a `reject-publish` limit went on refusing them on that channel once the limit was
/// gone (RabbitMQ 3.10), while a new channel's publishes were taken.
fn sessions(
    connection: &mut amiquip::Connection,
    mut channel: amiquip::Channel,
    rx: &Receiver<Offer>,
    shared: &Shared,
    state: &mut State,
) -> Result<(), SessionError> {
    loop {
        match session(&channel, rx, shared, state) {
            Err(SessionError::Blocked) => {
                // Closing the channel would wait for the alarm to clear (see `on_connection`).
                std::mem::forget(channel);
                return Err(SessionError::Blocked);
            }
            Err(SessionError::Refused(messages)) => {
                let delay = state.backoff.next_delay();
                tracing::warn!(
                    messages,
                    retry_in_ms = delay.as_millis() as u64,
                    "broker refused tasks; retrying them on a new channel"
                );
                let _ = channel.close();
                if !state.wait(delay, rx, shared) {
                    return Ok(());
                }
                channel = connection.open_channel(None)?;
                channel.enable_publisher_confirms()?;
            }
            other => return other,
        }
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
