//! The publisher thread: owns the AMQP connection, connects and reconnects with backoff,
//! follows the broker's resource alarms, runs sessions (session.rs) and drains at shutdown.

use super::Offer;
use super::handle::Shared;
use super::session::session;
use super::state::{SessionError, State};
use crate::queue::brokers::Brokers;
use amiquip::ConnectionBlockedNotification;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;

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
