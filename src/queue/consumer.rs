//! The worker's consumer: one thread owns the AMQP connection, takes deliveries in batches (up
//! to the prefetch limit), hands the valid ones to the async side and acks each only after the
//! database transaction that processed it has committed. A malformed message is rejected
//! without requeue, which routes it to the dead-letter queue; an id naming no page view is
//! dead-lettered on its own (a message of just that id), the rest of its message processed.

use super::brokers::Brokers;
use super::{DEAD_LETTER_EXCHANGE, QUEUE, ROUTING_KEY, STOP_GRACE, Task};
use crate::backoff::Backoff;
use amiquip::{AmqpProperties, ConsumerMessage, ConsumerOptions, Delivery, Publish};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// A batch for the async side, with the channel its verdict comes back on.
pub struct Batch {
    pub ids: Vec<i64>,
    pub reply: oneshot::Sender<Verdict>,
}

/// What the async side decided for a batch.
pub enum Verdict {
    /// Committed: ack everything; these ids name no page view (dead-letter them).
    Done { missing: Vec<i64> },
    /// Not committed (shutting down while the database is away): leave unacked for redelivery.
    NotDone,
}

/// Counters the consumer thread updates.
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
            .spawn(move || run(&mut brokers, prefetch, &tx, &thread_stop, &events))
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

/// Consumes until `stop` is set; reconnects with backoff when the broker goes away.
fn run(
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

fn session(
    brokers: &mut Brokers,
    prefetch: u16,
    batches: &mpsc::Sender<Batch>,
    stop: &AtomicBool,
    events: &dyn ConsumerEvents,
    backoff: &mut Backoff,
) -> super::Result<()> {
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
        let first = match receiver.recv_timeout(Duration::from_millis(200)) {
            Ok(message) => message,
            Err(crossbeam_timeout) if crossbeam_timeout.is_timeout() => continue,
            Err(_) => return Err(amiquip::Error::ClientClosedConnection.into()),
        };
        let mut deliveries = Vec::new();
        let mut ids = 0;
        let mut next = Some(first);
        while let Some(message) = next.take() {
            match message {
                ConsumerMessage::Delivery(delivery) => {
                    // An estimate from the size (about 8 bytes an id) bounds the batch's ids.
                    ids += delivery.body.len() / 8 + 1;
                    deliveries.push(delivery);
                }
                ConsumerMessage::ServerClosedChannel(e) | ConsumerMessage::ServerClosedConnection(e) => {
                    return Err(e.into());
                }
                ConsumerMessage::ClientCancelled
                | ConsumerMessage::ServerCancelled
                | ConsumerMessage::ClientClosedChannel
                | ConsumerMessage::ClientClosedConnection => {
                    return Err(amiquip::Error::ClientClosedConnection.into());
                }
            }
            if deliveries.len() < usize::from(prefetch) && ids < MAX_BATCH_IDS {
                next = receiver.try_recv().ok();
            }
        }
        handle_batch(&channel, deliveries, batches, events, &mut left_unacked)?;
    }
}

fn handle_batch(
    channel: &amiquip::Channel,
    deliveries: Vec<Delivery>,
    batches: &mpsc::Sender<Batch>,
    events: &dyn ConsumerEvents,
    left_unacked: &mut bool,
) -> amiquip::Result<()> {
    let mut valid: Vec<(Vec<i64>, Delivery)> = Vec::with_capacity(deliveries.len());
    for delivery in deliveries {
        match Task::parse(&delivery.body) {
            Ok(task) => valid.push((task.page_view_ids, delivery)),
            Err(problem) => {
                tracing::warn!(%problem, redelivered = delivery.redelivered, "malformed task sent to the dead-letter queue");
                events.dead_lettered();
                delivery.reject(channel, false)?;
            }
        }
    }
    if valid.is_empty() {
        return Ok(());
    }
    let (reply, verdict) = oneshot::channel();
    let ids = valid.iter().flat_map(|(ids, _)| ids.iter().copied()).collect();
    if batches.blocking_send(Batch { ids, reply }).is_err() {
        return Ok(()); // the async side has stopped; the broker requeues on close
    }
    match verdict.blocking_recv() {
        Ok(Verdict::Done { missing }) => {
            let mut last = None;
            for (ids, delivery) in valid {
                let bogus: Vec<i64> = ids.iter().copied().filter(|id| missing.contains(id)).collect();
                for id in &bogus {
                    tracing::warn!(
                        page_view_id = id,
                        "task names no page view; sent to the dead-letter queue"
                    );
                    events.dead_lettered();
                }
                if !bogus.is_empty() && bogus.len() == ids.len() && ids.len() == 1 {
                    delivery.reject(channel, false)?;
                    continue;
                }
                // Per id: the bogus ones of a larger message go to the dead-letter exchange
                // as messages of their own, before the original is acked.
                for id in bogus {
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
                    )?;
                }
                if let Some(previous) = last.replace(delivery)
                    && *left_unacked
                {
                    previous.ack(channel)?;
                }
            }
            // One ack for the batch: `multiple` settles every earlier delivery of the channel,
            // which are all settled already unless a batch was left unacked on purpose.
            match last {
                Some(last) if *left_unacked => last.ack(channel)?,
                Some(last) => last.ack_multiple(channel)?,
                None => {}
            }
        }
        Ok(Verdict::NotDone) | Err(_) => *left_unacked = true,
    }
    Ok(())
}
