//! The consumer thread: connects with backoff, takes deliveries in batches, hands them to the
//! async side and carries out the plan (plan.rs) for each batch's verdict.

use super::plan::{Action, Plan, estimated_ids, plan, room_for_more};
use super::{Batch, ConsumerEvents, Verdict};
use crate::backoff::Backoff;
use crate::queue::brokers::Brokers;
use crate::queue::{DEAD_LETTER_EXCHANGE, QUEUE, ROUTING_KEY, Task};
use amiquip::{AmqpProperties, ConsumerMessage, ConsumerOptions, Delivery, Publish};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// How long the thread waits for a delivery before it looks at `stop` again.
const POLL: Duration = Duration::from_millis(200);

/// Consumes until `stop` is set; reconnects with backoff when the broker goes away.
pub(super) fn run(
    brokers: &mut Brokers,
    prefetch: u16,
    batches: &mpsc::Sender<Batch>,
    stop: &Arc<AtomicBool>,
    events: &dyn ConsumerEvents,
) {
    let mut backoff = Backoff::default();
    while !stop.load(Ordering::Relaxed) {
        match session(brokers, prefetch, batches, stop, events, &mut backoff) {
            Ok(()) => return,
            Err(e) => {
                events.connected(false);
                let delay = backoff.next_delay();
                tracing::warn!(broker = %brokers.current(), error = %e, retry_in_ms = delay.as_millis() as u64, "consumer lost the broker; reconnecting");
                // In slices, so a SIGTERM during a long wait is seen at once.
                let until = Instant::now() + delay;
                while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

/// One connection: consumes batches until `stop` (`Ok`) or the broker goes away.
fn session(
    brokers: &mut Brokers,
    prefetch: u16,
    batches: &mpsc::Sender<Batch>,
    stop: &AtomicBool,
    events: &dyn ConsumerEvents,
    backoff: &mut Backoff,
) -> crate::queue::Result<()> {
    let Some((connection, channel)) = brokers.open(&|| stop.load(Ordering::Relaxed))? else {
        return Ok(());
    };
    channel.qos(0, prefetch, false)?;
    let consumer = channel.basic_consume(QUEUE, ConsumerOptions::default())?;
    tracing::info!(broker = %brokers.current(), prefetch, "consumer connected");
    events.connected(true);
    backoff.connected();
    let receiver = consumer.receiver();
    // Set once a batch is left for redelivery: from then on every delivery is acked on its own.
    let mut left_unacked = false;
    loop {
        if stop.load(Ordering::Relaxed) {
            // Deliveries not yet acked are requeued by the broker when the channel closes.
            let _ = consumer.cancel();
            let _ = connection.close();
            return Ok(());
        }
        let first = match receiver.recv_timeout(POLL) {
            Ok(message) => delivery(message)?,
            Err(e) if e.is_timeout() => continue,
            Err(_) => return Err(amiquip::Error::ClientClosedConnection.into()),
        };
        let mut ids = estimated_ids(first.body.len());
        let mut deliveries = vec![first];
        while room_for_more(deliveries.len(), ids, prefetch)
            && let Ok(message) = receiver.try_recv()
        {
            let next = delivery(message)?;
            ids += estimated_ids(next.body.len());
            deliveries.push(next);
        }
        left_unacked |= handle_batch(&channel, deliveries, batches, events, left_unacked)?;
    }
}

/// The delivery a message brings, or the end of the consumer.
fn delivery(message: ConsumerMessage) -> amiquip::Result<Delivery> {
    match message {
        ConsumerMessage::Delivery(delivery) => Ok(delivery),
        ConsumerMessage::ServerClosedChannel(e) | ConsumerMessage::ServerClosedConnection(e) => Err(e),
        ConsumerMessage::ClientCancelled
        | ConsumerMessage::ServerCancelled
        | ConsumerMessage::ClientClosedChannel
        | ConsumerMessage::ClientClosedConnection => Err(amiquip::Error::ClientClosedConnection),
    }
}

/// Dead-letters the malformed deliveries, hands the tasks of the others to the async side as
/// one batch and settles them by its verdict. `true`: the batch was left unacked.
fn handle_batch(
    channel: &amiquip::Channel,
    deliveries: Vec<Delivery>,
    batches: &mpsc::Sender<Batch>,
    events: &dyn ConsumerEvents,
    left_unacked: bool,
) -> amiquip::Result<bool> {
    let mut tasks = Vec::with_capacity(deliveries.len());
    let mut valid = Vec::with_capacity(deliveries.len());
    for delivery in deliveries {
        match Task::parse(&delivery.body) {
            Ok(task) => {
                tasks.push(task.page_view_ids);
                valid.push(Some(delivery));
            }
            Err(problem) => {
                tracing::warn!(%problem, redelivered = delivery.redelivered, "malformed task sent to the dead-letter queue");
                events.dead_lettered();
                delivery.reject(channel, false)?;
            }
        }
    }
    if tasks.is_empty() {
        return Ok(false);
    }
    let (reply, verdict) = oneshot::channel();
    let ids = tasks.iter().flatten().copied().collect();
    if batches.blocking_send(Batch { ids, reply }).is_err() {
        return Ok(false); // the async side has stopped; the broker requeues on close
    }
    // No verdict (the async side ended): as good as not processed.
    let verdict = verdict.blocking_recv().unwrap_or(Verdict::NotDone);
    match plan(&tasks, verdict, left_unacked) {
        Plan::LeaveUnacked => Ok(true),
        Plan::Settle(actions) => {
            for action in actions {
                settle(channel, &mut valid, action, events)?;
            }
            Ok(false)
        }
    }
}

/// Carries out one step of a plan.
fn settle(
    channel: &amiquip::Channel,
    deliveries: &mut [Option<Delivery>],
    action: Action,
    events: &dyn ConsumerEvents,
) -> amiquip::Result<()> {
    let mut take = |i: usize| deliveries[i].take().expect("a plan settles each delivery once");
    match action {
        Action::Reject { delivery, id } => {
            dead_lettered(id, events);
            take(delivery).reject(channel, false)
        }
        Action::DeadLetter { id } => {
            dead_lettered(id, events);
            let body = Task {
                page_view_ids: vec![id],
            }
            .to_bytes();
            let properties = AmqpProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into());
            channel.basic_publish(
                DEAD_LETTER_EXCHANGE,
                Publish::with_properties(&body, ROUTING_KEY, properties),
            )
        }
        Action::Ack { delivery } => take(delivery).ack(channel),
        Action::AckMultiple { delivery } => take(delivery).ack_multiple(channel),
    }
}

fn dead_lettered(id: i64, events: &dyn ConsumerEvents) {
    tracing::warn!(
        page_view_id = id,
        "task names no page view; sent to the dead-letter queue"
    );
    events.dead_lettered();
}
