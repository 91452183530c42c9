//! The app's publisher: one thread owns the AMQP connection and publishes the ids that
//! requests hand it, in pipelined batches with publisher confirms. Confirmed ids go back to the
//! async side, which marks the rows enqueued; anything not confirmed stays unmarked and the
//! sweep hands it over again, so nothing is lost while the broker is away.

use super::brokers::Brokers;
use super::{Backoff, EXCHANGE, ROUTING_KEY, Task};
use crate::metrics::{Counter, Registry};
use amiquip::{AmqpProperties, Confirm, ConfirmSmoother, Publish};
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// How many publishes share one wait for confirms. Larger batches amortise the broker's
/// fsync over more messages; a request never waits for it either way.
pub const MAX_BATCH: usize = 512;
/// Ids waiting for the thread; beyond this, requests leave their row to the sweep. The app can
/// record page views faster than the broker takes persistent messages on a small machine, so
/// this absorbs some seconds of such a burst (8 bytes an id) instead of leaving it to the sweep,
/// which re-publishes a few thousand rows every sweep interval.
pub const QUEUE_CAPACITY: usize = 65_536;
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// After the app stops, how long the thread keeps trying to reach the broker.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct PublisherMetrics {
    pub confirmed: Counter,
    pub failures: Counter,
    pub deferred: Counter,
}

impl PublisherMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "publish_confirmed",
            "Tasks confirmed by the broker",
            self.confirmed.clone(),
        );
        registry.register(
            "publish_failures",
            "Broker connections lost while publishing",
            self.failures.clone(),
        );
        registry.register(
            "publish_deferred",
            "Tasks left to the sweep because the publisher queue was full",
            self.deferred.clone(),
        );
    }
}

struct Shared {
    connected: AtomicBool,
    queued: AtomicUsize,
    metrics: PublisherMetrics,
}

/// A cheap handle the request handlers use; dropping every handle stops the thread after it
/// has published what it holds.
#[derive(Clone)]
pub struct Publisher {
    tx: SyncSender<i64>,
    shared: Arc<Shared>,
}

impl Publisher {
    /// Starts the publisher thread; `confirmed` receives batches of ids the broker has accepted.
    pub fn start(mut brokers: Brokers, confirmed: UnboundedSender<Vec<i64>>) -> (Publisher, JoinHandle<()>) {
        let (tx, rx) = mpsc::sync_channel(QUEUE_CAPACITY);
        let shared = Arc::new(Shared {
            connected: AtomicBool::new(false),
            queued: AtomicUsize::new(0),
            metrics: PublisherMetrics::default(),
        });
        let thread_shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name("amqp-publisher".into())
            .spawn(move || run(&mut brokers, &rx, &thread_shared, &confirmed))
            .expect("spawning a thread only fails when the system is out of resources");
        (Publisher { tx, shared }, handle)
    }

    /// Hands an id to the publisher without waiting. `false`: the queue is full or the thread
    /// has stopped; the row stays unconfirmed and the sweep will offer it again.
    pub fn offer(&self, page_view_id: i64) -> bool {
        match self.tx.try_send(page_view_id) {
            Ok(()) => {
                self.shared.queued.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.shared.metrics.deferred.inc();
                false
            }
        }
    }

    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }

    /// Ids handed over but not yet taken by the thread.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::Relaxed)
    }

    pub fn metrics(&self) -> &PublisherMetrics {
        &self.shared.metrics
    }
}

fn run(brokers: &mut Brokers, rx: &Receiver<i64>, shared: &Shared, confirmed: &UnboundedSender<Vec<i64>>) {
    let mut pending: VecDeque<i64> = VecDeque::new();
    let mut backoff = Backoff::default();
    let mut closed_at: Option<Instant> = None;
    loop {
        if closed_at.is_some_and(|t| t.elapsed() > DRAIN_DEADLINE) {
            if !pending.is_empty() {
                tracing::warn!(
                    unpublished = pending.len(),
                    "stopping with unpublished tasks; the next sweep publishes them"
                );
            }
            return;
        }
        let (connection, channel) = match brokers.open().and_then(|(conn, ch)| {
            ch.enable_publisher_confirms()?;
            Ok((conn, ch))
        }) {
            Ok(pair) => pair,
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(broker = %brokers, error = %e, retry_in_ms = delay.as_millis() as u64, "publisher cannot reach the broker");
                // Keep draining the hand-over queue meanwhile, so a stopped app is noticed.
                let deadline = Instant::now() + delay;
                while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                    match rx.recv_timeout(left) {
                        Ok(id) => take(shared, &mut pending, id),
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => {
                            closed_at.get_or_insert_with(Instant::now);
                            if pending.is_empty() {
                                return;
                            }
                            std::thread::sleep(left.min(Duration::from_millis(100)));
                        }
                    }
                }
                continue;
            }
        };
        tracing::info!(broker = %brokers.current(), "publisher connected");
        backoff.reset();
        shared.connected.store(true, Ordering::Relaxed);
        let result = session(&channel, rx, shared, &mut pending, confirmed, &mut closed_at);
        shared.connected.store(false, Ordering::Relaxed);
        match result {
            Ok(()) => {
                let _ = connection.close();
                return;
            }
            Err(e) => {
                shared.metrics.failures.inc();
                tracing::warn!(broker = %brokers.current(), error = %e, unconfirmed = pending.len(), "publisher lost the broker; reconnecting");
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Amqp(#[from] amiquip::Error),
    #[error("no publisher confirm within {CONFIRM_TIMEOUT:?}")]
    ConfirmTimeout,
}

fn take(shared: &Shared, pending: &mut VecDeque<i64>, id: i64) {
    shared.queued.fetch_sub(1, Ordering::Relaxed);
    pending.push_back(id);
}

/// Publishes until the app stops (`Ok`) or the connection fails (`Err`, with the unconfirmed
/// ids back in `pending`).
fn session(
    channel: &amiquip::Channel,
    rx: &Receiver<i64>,
    shared: &Shared,
    pending: &mut VecDeque<i64>,
    confirmed: &UnboundedSender<Vec<i64>>,
    closed_at: &mut Option<Instant>,
) -> Result<(), SessionError> {
    let confirms = channel.listen_for_publisher_confirms()?;
    let mut smoother = ConfirmSmoother::new();
    let mut next_tag: u64 = 1;
    let properties = AmqpProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    loop {
        if pending.is_empty() {
            match rx.recv_timeout(Duration::from_millis(500)) {
                Ok(id) => take(shared, pending, id),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    closed_at.get_or_insert_with(Instant::now);
                    return Ok(());
                }
            }
        }
        while pending.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(id) => take(shared, pending, id),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        let batch: Vec<i64> = pending.drain(..pending.len().min(MAX_BATCH)).collect();
        let first_tag = next_tag;
        let mut published = 0;
        let mut outcome = Ok(());
        for id in &batch {
            let body = Task { page_view_id: *id }.to_bytes();
            let publish = Publish::with_properties(&body, ROUTING_KEY, properties.clone());
            if let Err(e) = channel.basic_publish(EXCHANGE, publish) {
                outcome = Err(SessionError::Amqp(e));
                break;
            }
            published += 1;
        }
        next_tag += published as u64;
        let mut acked = Vec::with_capacity(published);
        let mut nacked = Vec::new();
        let deadline = Instant::now() + CONFIRM_TIMEOUT;
        while outcome.is_ok() && acked.len() + nacked.len() < published {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                outcome = Err(SessionError::ConfirmTimeout);
                break;
            };
            match confirms.recv_timeout(left) {
                Ok(raw) => {
                    for confirm in smoother.process(raw) {
                        let (tag, ok) = match confirm {
                            Confirm::Ack(p) => (p.delivery_tag, true),
                            Confirm::Nack(p) => (p.delivery_tag, false),
                        };
                        let Some(&id) = tag.checked_sub(first_tag).and_then(|i| batch.get(i as usize)) else {
                            continue;
                        };
                        if ok { acked.push(id) } else { nacked.push(id) }
                    }
                }
                Err(_) => {
                    outcome = Err(SessionError::ConfirmTimeout);
                    break;
                }
            }
        }
        shared.metrics.confirmed.inc_by(acked.len() as u64);
        if !nacked.is_empty() {
            tracing::warn!(count = nacked.len(), "broker refused tasks; retrying them");
        }
        // Everything not acked goes back to the front, to be published again.
        let acked_set: HashSet<i64> = acked.iter().copied().collect();
        for id in batch.iter().rev().filter(|id| !acked_set.contains(id)) {
            pending.push_front(*id);
        }
        if !acked.is_empty() {
            let _ = confirmed.send(acked);
        }
        outcome?;
    }
}
