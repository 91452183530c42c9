//! A publishing session on one channel: take ids, publish them as tasks, wait for the
//! broker's confirms, settle (settle.rs), until shutdown, a failure or a refusal.

use super::handle::Shared;
use super::settle::{InFlight, Next, next_step};
use super::state::{Received, SessionError, State};
use super::{CONFIRM_TIMEOUT, DEPTH_EVERY, IDLE_POLL, MAX_BATCH, Offer};
use crate::queue::{EXCHANGE, QUEUE, ROUTING_KEY, Task};
use amiquip::{AmqpProperties, Confirm, ConfirmSmoother, Publish, Return};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

/// What a listener on the channel heard.
enum Heard<T> {
    Message(T),
    Nothing,
    /// The connection's I/O thread is gone.
    Gone,
}

/// One of amiquip's listeners: a look without waiting (`None`), or a wait of up to the given
/// time. amiquip hands out crossbeam receivers, a type this crate cannot name (crossbeam is
/// not one of its dependencies), hence a closure.
type Listener<T> = Box<dyn Fn(Option<Duration>) -> Heard<T>>;

/// Wraps a receiver of amiquip's as a [`Listener`].
macro_rules! listener {
    ($receiver:expr) => {{
        let receiver = $receiver;
        let listener: Listener<_> = Box::new(move |wait: Option<Duration>| {
            let heard = match wait {
                None => receiver.try_recv().map_err(|e| e.is_empty()),
                Some(d) => receiver.recv_timeout(d).map_err(|e| e.is_timeout()),
            };
            match heard {
                Ok(message) => Heard::Message(message),
                Err(true) => Heard::Nothing,
                Err(false) => Heard::Gone,
            }
        });
        listener
    }};
}

/// One channel with confirms on, and what a session keeps about it.
struct Link<'a> {
    channel: &'a amiquip::Channel,
    confirms: Listener<Confirm>,
    returns: Listener<Return>,
    smoother: ConfirmSmoother,
    next_tag: u64,
    depth_read: Option<Instant>,
    properties: AmqpProperties,
}

/// What the idle session found to do.
enum Work {
    /// Ids are pending: publish them.
    Publish,
    /// Nothing yet: look again.
    Idle,
    /// Shutdown and nothing left: the session ends.
    Done,
}

/// Publishes until shutdown (`Ok`) or a failure or refusal (`Err`, with the unconfirmed ids
/// back at the front of `pending`).
pub(super) fn session(
    channel: &amiquip::Channel,
    rx: &Receiver<Offer>,
    shared: &Shared,
    state: &mut State,
) -> Result<(), SessionError> {
    let mut link = Link {
        channel,
        confirms: listener!(channel.listen_for_publisher_confirms()?),
        returns: listener!(channel.listen_for_returns()?),
        smoother: ConfirmSmoother::new(),
        next_tag: 1,
        depth_read: None,
        properties: AmqpProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into()),
    };
    loop {
        if shared.blocked().is_some() {
            link.hold_while_blocked(rx, shared, state)?;
            continue;
        }
        link.read_depth(shared)?;
        match link.find_work(rx, shared, state)? {
            Work::Done => return Ok(()),
            Work::Idle => continue,
            Work::Publish => {}
        }
        state.take_available(rx, MAX_BATCH);
        let batch: Vec<i64> = state.pending.drain(..state.pending.len().min(MAX_BATCH)).collect();
        let mut flight = InFlight::new(&batch, link.next_tag);
        let outcome = link
            .publish(&mut flight)
            .and_then(|()| link.await_confirms(&mut flight, shared, state));
        let (returned, reason) = link.take_returns(&mut flight);
        let settled = flight.settle(&mut state.pending);
        shared.metrics.confirmed.inc_by(settled.confirmed as u64);
        shared.backlog.fetch_sub(settled.confirmed, Ordering::Relaxed);
        outcome?;
        if next_step(&settled, returned, reason)? == Next::ResetBackoff {
            state.backoff.reset();
        }
    }
}

impl Link<'_> {
    /// One step while the broker blocks the connection: neither publish nor call it (it
    /// would not answer) until it unblocks; take ids meanwhile.
    fn hold_while_blocked(&self, rx: &Receiver<Offer>, shared: &Shared, state: &mut State) -> Result<(), SessionError> {
        shared.set_depth(None);
        if state.closing(shared) {
            return Err(SessionError::Blocked);
        }
        if matches!((self.confirms)(None), Heard::Gone) {
            return Err(SessionError::Closed);
        }
        if state.receive(rx, IDLE_POLL) == Received::Ended {
            std::thread::sleep(IDLE_POLL);
        }
        Ok(())
    }

    /// Reads the task queue's depth for the sweep, every [`DEPTH_EVERY`].
    fn read_depth(&mut self, shared: &Shared) -> Result<(), SessionError> {
        if self.depth_read.is_none_or(|t| t.elapsed() >= DEPTH_EVERY) {
            let queue = self.channel.queue_declare_passive(QUEUE)?;
            shared.set_depth(queue.declared_message_count());
            self.depth_read = Some(Instant::now());
        }
        Ok(())
    }

    /// Waits up to [`IDLE_POLL`] for ids when none are pending; at shutdown, takes what is
    /// left in the hand-over without waiting.
    fn find_work(&self, rx: &Receiver<Offer>, shared: &Shared, state: &mut State) -> Result<Work, SessionError> {
        if !state.pending.is_empty() {
            return Ok(Work::Publish);
        }
        if state.closing(shared) {
            return Ok(match rx.try_recv() {
                Ok(offer) => {
                    state.pending.extend(offer.page_view_ids);
                    Work::Publish
                }
                Err(_) => Work::Done,
            });
        }
        // The I/O thread drops the confirm sender when the connection dies (a missed
        // heartbeat): noticed here while idle, not at the next publish.
        if matches!((self.confirms)(None), Heard::Gone) {
            return Err(SessionError::Closed);
        }
        Ok(match state.receive(rx, IDLE_POLL) {
            Received::Ids => Work::Publish,
            Received::Nothing | Received::Ended => Work::Idle,
        })
    }

    /// Publishes the batch's messages, stopping at the first that fails.
    fn publish(&mut self, flight: &mut InFlight) -> Result<(), SessionError> {
        let bodies: Vec<Vec<u8>> = flight
            .messages()
            .iter()
            .map(|ids| {
                Task {
                    page_view_ids: ids.clone(),
                }
                .to_bytes()
            })
            .collect();
        for body in &bodies {
            let mut publish = Publish::with_properties(body, ROUTING_KEY, self.properties.clone());
            publish.mandatory = true;
            self.channel.basic_publish(EXCHANGE, publish)?;
            flight.published_one();
            self.next_tag += 1;
        }
        Ok(())
    }

    /// Waits for the confirms of every published message, up to [`CONFIRM_TIMEOUT`] without
    /// one (the clock stops while the broker blocks the connection, unless shutting down).
    fn await_confirms(
        &mut self,
        flight: &mut InFlight,
        shared: &Shared,
        state: &mut State,
    ) -> Result<(), SessionError> {
        let mut deadline = Instant::now() + CONFIRM_TIMEOUT;
        while !flight.all_settled() {
            if shared.blocked().is_some() {
                // The broker takes these once it unblocks; a shutdown cannot wait for that.
                if state.closing(shared) {
                    return Err(SessionError::Blocked);
                }
                deadline = Instant::now() + CONFIRM_TIMEOUT;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return Err(SessionError::ConfirmTimeout);
            };
            match (self.confirms)(Some(left.min(IDLE_POLL))) {
                Heard::Message(raw) => {
                    for confirm in self.smoother.process(raw) {
                        match confirm {
                            Confirm::Ack(p) => flight.confirm(p.delivery_tag, true),
                            Confirm::Nack(p) => flight.confirm(p.delivery_tag, false),
                        }
                    }
                }
                Heard::Nothing => {}
                Heard::Gone => return Err(SessionError::Closed),
            }
        }
        Ok(())
    }

    /// The messages the broker returned as unroutable (a return comes before the confirm of
    /// its message: every return of this batch is in): how many, and the broker's reason.
    fn take_returns(&self, flight: &mut InFlight) -> (usize, String) {
        let mut returned = 0;
        let mut reason = String::new();
        while let Heard::Message(r) = (self.returns)(None) {
            if let Ok(task) = Task::parse(&r.content) {
                flight.returned(&task.page_view_ids);
            }
            returned += 1;
            reason = r.reply_text;
        }
        (returned, reason)
    }
}
