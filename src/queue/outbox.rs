//! The app's outbox: every recorded page view reaches the worker, however often the broker or
//! the app goes away, for one row write per view (the INSERT) and no bookkeeping per row.
//!
//! - `offer` hands the ids of a committed INSERT to the publisher thread without waiting. The
//!   thread owns the AMQP connection and publishes persistent, `mandatory` messages of up to
//!   [`IDS_PER_MESSAGE`] ids, up to [`MAX_BATCH`] ids per wait for publisher confirms. What is
//!   not confirmed (nacked, returned as unroutable, connection lost) is retried with backoff.
//!   Ids handed over and not yet confirmed are bounded by [`CAPACITY`]; beyond it, offers are
//!   dropped and left to the sweep. While the broker blocks the connection (a resource
//!   alarm), the thread neither publishes nor calls it, and a shutdown does not wait for it.
//! - The sweep re-offers rows still unprocessed after one sweep interval, in id order and as
//!   fast as the broker takes them, when the task queue holds no ready message (a recent
//!   look): then such a row is not on its way. This covers tasks never published (broker
//!   down, outbox full, app restarted) and tasks the broker confirmed and lost later (queue
//!   purged, deleted or lost with its node). While the queue never empties (the workers do
//!   not keep up), it offers each row unprocessed after [`MAX_WAIT_INTERVALS`] intervals once,
//!   so a lost task waits at most that long for its second chance. A duplicate is harmless:
//!   the worker marks each row processed once.

use super::brokers::Brokers;
use super::{EXCHANGE, QUEUE, ROUTING_KEY, STOP_GRACE, Task};
use crate::backoff::Backoff;
use crate::config::Sweep;
use crate::db::{self, Pool};
use crate::metrics::{Counter, Registry};
use crate::shutdown::{self, Shutdown};
use amiquip::{AmqpProperties, Confirm, ConfirmSmoother, ConnectionBlockedNotification, Publish};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

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

#[derive(Default)]
pub struct OutboxMetrics {
    pub confirmed: Counter,
    pub failures: Counter,
    pub deferred: Counter,
    pub republished: Counter,
}

impl OutboxMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "publish_confirmed",
            "Tasks confirmed by the broker",
            self.confirmed.clone(),
        );
        registry.register(
            "publish_failures",
            "Broker connections lost, or blocked by a resource alarm, while publishing",
            self.failures.clone(),
        );
        registry.register(
            "publish_deferred",
            "Tasks left to the sweep because the outbox was full or stopping",
            self.deferred.clone(),
        );
        registry.register(
            "republished",
            "Unprocessed page views offered again by the sweep",
            self.republished.clone(),
        );
    }
}

struct Shared {
    connected: AtomicBool,
    /// Set while the broker blocks the connection (connection.blocked: a memory or disk
    /// alarm): nothing can be published, and any call on the connection may wait until the
    /// alarm clears. The number of the connection it concerns, and the broker's reason.
    blocked: Mutex<(u64, Option<String>)>,
    /// The number of the current connection.
    connection: AtomicU64,
    /// Ids offered and neither confirmed nor dropped yet.
    backlog: AtomicUsize,
    /// Ready messages in the task queue at the last look, and when; `None`: not known.
    depth: Mutex<Option<(u32, Instant)>>,
    closing: AtomicBool,
    metrics: OutboxMetrics,
}

/// What the sweep and the request handlers use.
#[derive(Clone)]
struct Handle {
    tx: SyncSender<Vec<i64>>,
    shared: Arc<Shared>,
}

impl Shared {
    fn blocked(&self) -> Option<String> {
        self.blocked.lock().unwrap_or_else(|e| e.into_inner()).1.clone()
    }

    fn set_depth(&self, ready: Option<u32>) {
        *self.depth.lock().unwrap_or_else(|e| e.into_inner()) = ready.map(|n| (n, Instant::now()));
    }

    /// Whether a recent look found the task queue without ready messages.
    fn queue_empty(&self) -> bool {
        let depth = *self.depth.lock().unwrap_or_else(|e| e.into_inner());
        depth.is_some_and(|(n, at)| n == 0 && at.elapsed() < DEPTH_FRESH)
    }

    /// Connected, and not blocked by the broker.
    fn publishing(&self) -> bool {
        self.connected.load(Ordering::Relaxed) && self.blocked().is_none()
    }

    fn set_blocked(&self, connection: u64, reason: Option<String>) {
        let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        // A late note about an earlier connection changes nothing.
        if connection >= blocked.0 {
            *blocked = (connection, reason);
        }
    }
}

impl Handle {
    fn offer(&self, ids: Vec<i64>) -> bool {
        let n = ids.len();
        let shared = &self.shared;
        if shared.closing.load(Ordering::Relaxed) || shared.backlog.fetch_add(n, Ordering::Relaxed) + n > CAPACITY {
            shared.metrics.deferred.inc_by(n as u64);
            shared.backlog.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        match self.tx.try_send(ids) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                shared.metrics.deferred.inc_by(n as u64);
                shared.backlog.fetch_sub(n, Ordering::Relaxed);
                false
            }
        }
    }
}

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
    pub fn start(mut brokers: Brokers, pool: Pool, sweep_config: Sweep) -> Outbox {
        // Hand-over slots are batches (one per INSERT); the id count is bounded by CAPACITY.
        let (tx, rx) = mpsc::sync_channel(4_096);
        let shared = Arc::new(Shared {
            connected: AtomicBool::new(false),
            blocked: Mutex::new((0, None)),
            connection: AtomicU64::new(0),
            backlog: AtomicUsize::new(0),
            depth: Mutex::new(None),
            closing: AtomicBool::new(false),
            metrics: OutboxMetrics::default(),
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("amqp-publisher".into())
            .spawn(move || run(&mut brokers, &rx, thread_shared))
            .expect("spawning a thread only fails when the system is out of resources");
        let handle = Handle { tx, shared };
        let (stop_sweep, stopping) = shutdown::channel();
        let sweep = tokio::spawn(sweep(handle.clone(), pool, sweep_config, stopping));
        Outbox {
            handle,
            running: Arc::new(Mutex::new(Some(Running {
                thread,
                sweep,
                stop_sweep,
            }))),
        }
    }

    /// Hands the ids of committed rows to the publisher without waiting. `false`: the outbox is
    /// full or stopping; the rows stay unprocessed and the sweep offers them again.
    pub fn offer(&self, ids: Vec<i64>) -> bool {
        self.handle.offer(ids)
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

/// Every `config.interval`: re-offers unprocessed rows older than `config.republish_after`
/// whenever the task queue is empty, and those older than `MAX_WAIT_INTERVALS` intervals once
/// each while it is not.
async fn sweep(handle: Handle, pool: Pool, config: Sweep, stopping: Shutdown) {
    let mut ticker = stopping.clone().ticker(config.interval);
    let max_wait = config.interval * MAX_WAIT_INTERVALS;
    // Rows up to this id have been offered again: not again while the queue stays full.
    let mut offered_up_to = 0;
    while ticker.tick().await {
        if !handle.shared.publishing() || stopping.is_set() {
            continue;
        }
        let (after, age) = if handle.shared.queue_empty() {
            (0, config.republish_after)
        } else {
            (offered_up_to, max_wait)
        };
        let (offered, last) = sweep_pass(&handle, &pool, after, age, &stopping).await;
        offered_up_to = offered_up_to.max(last);
        if offered > 0 {
            handle.shared.metrics.republished.inc_by(offered as u64);
            tracing::info!(count = offered, "sweep offered unprocessed page views again");
        }
    }
}

/// Offers unprocessed rows older than `age` with ids above `after`, at full speed but never
/// more than the outbox holds. How many it offered, and the last id offered.
async fn sweep_pass(handle: &Handle, pool: &Pool, mut after: i64, age: Duration, stopping: &Shutdown) -> (usize, i64) {
    let shared = &handle.shared;
    let usable = || shared.publishing() && !stopping.is_set();
    let (mut offered, mut last) = (0, 0);
    loop {
        while shared.backlog.load(Ordering::Relaxed) > CAPACITY - SWEEP_PAGE {
            if !usable() {
                return (offered, last);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let page = db::run(pool, async |conn| {
            db::page_views::unprocessed(conn, after, age, SWEEP_PAGE as i64).await
        })
        .await;
        match page {
            Ok(ids) if ids.is_empty() => return (offered, last),
            Ok(ids) => {
                after = ids[ids.len() - 1];
                let n = ids.len();
                if !usable() || !handle.offer(ids) {
                    return (offered, last);
                }
                offered += n;
                last = after;
            }
            Err(error) => {
                tracing::warn!(%error, "sweep cannot read unprocessed page views");
                return (offered, last);
            }
        }
    }
}

/// The thread: connects, publishes, reconnects with backoff, until shutdown.
fn run(brokers: &mut Brokers, rx: &Receiver<Vec<i64>>, shared_arc: Arc<Shared>) {
    let shared = &*shared_arc;
    let mut state = State {
        pending: VecDeque::new(),
        backoff: Backoff::default(),
        closed_at: None,
    };
    loop {
        let connected = connect(brokers, &|| must_stop(shared, &state));
        let delay = match connected {
            Ok(None) => {
                stop(shared, &mut state);
                return;
            }
            Ok(Some((mut connection, channel))) => {
                tracing::info!(broker = %brokers.current(), "publisher connected");
                let number = shared.connection.fetch_add(1, Ordering::Relaxed) + 1;
                shared.set_blocked(number, None);
                if let Err(e) = watch_blocked(&mut connection, number, shared_arc.clone()) {
                    tracing::warn!(error = %e, "cannot listen for the broker blocking the connection");
                }
                shared.connected.store(true, Ordering::Relaxed);
                let result = sessions(&mut connection, channel, rx, shared, &mut state);
                shared.connected.store(false, Ordering::Relaxed);
                shared.set_depth(None);
                match result {
                    Ok(()) => {
                        let _ = connection.close();
                        return;
                    }
                    Err(SessionError::Blocked) => {
                        // Closing would wait for the broker to answer, which it does only
                        // once the alarm clears: leave the connection to the process's end.
                        std::mem::forget(connection);
                        stop(shared, &mut state);
                        return;
                    }
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
        if !wait(delay, rx, shared, &mut state) {
            return;
        }
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

/// What the publisher thread carries across sessions and connections.
struct State {
    /// Ids taken from the app and not yet confirmed, oldest first.
    pending: VecDeque<i64>,
    backoff: Backoff,
    closed_at: Option<Instant>,
}

/// Sessions on one connection until shutdown or a failure. A refusal (nacks) ends a session;
/// after a backoff the next one starts on a new channel: a quorum queue that refused publishes
/// under a `reject-publish` limit went on refusing them on that channel once the limit was
/// gone (RabbitMQ 3.10), while a new channel's publishes were taken.
fn sessions(
    connection: &mut amiquip::Connection,
    mut channel: amiquip::Channel,
    rx: &Receiver<Vec<i64>>,
    shared: &Shared,
    state: &mut State,
) -> Result<(), SessionError> {
    loop {
        match session(&channel, rx, shared, state) {
            Err(SessionError::Blocked) => {
                // Closing the channel would wait for the alarm to clear (see `run`).
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
                if !wait(delay, rx, shared, state) {
                    return Ok(());
                }
                channel = connection.open_channel(None)?;
                channel.enable_publisher_confirms()?;
            }
            other => return other,
        }
    }
}

/// Whether the thread should stop instead of trying again: shutdown, and nothing pending or
/// the drain deadline passed.
fn must_stop(shared: &Shared, state: &State) -> bool {
    (shared.closing.load(Ordering::Relaxed) || state.closed_at.is_some())
        && (state.pending.is_empty() || state.closed_at.is_some_and(|t| t.elapsed() > DRAIN_DEADLINE))
}

/// Gives up what is pending (the sweep publishes it after the restart).
fn stop(shared: &Shared, state: &mut State) {
    if !state.pending.is_empty() {
        tracing::warn!(
            unpublished = state.pending.len(),
            "stopping with unpublished tasks; the sweep publishes them after the restart"
        );
        shared.backlog.fetch_sub(state.pending.len(), Ordering::Relaxed);
        state.pending.clear();
    }
}

/// Waits `delay` before the next attempt, taking ids meanwhile (the bound holds: they count
/// in the backlog) so that a shutdown is noticed. `false`: stop now (`must_stop`).
fn wait(delay: Duration, rx: &Receiver<Vec<i64>>, shared: &Shared, state: &mut State) -> bool {
    let until = Instant::now() + delay;
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        closing(shared, &mut state.closed_at);
        if must_stop(shared, state) {
            stop(shared, state);
            return false;
        }
        match rx.recv_timeout(left.min(IDLE_POLL)) {
            Ok(ids) => state.pending.extend(ids),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                state.closed_at.get_or_insert_with(Instant::now);
                std::thread::sleep(left.min(IDLE_POLL));
            }
        }
    }
    true
}

fn connect(
    brokers: &mut Brokers,
    stop: &dyn Fn() -> bool,
) -> super::Result<Option<(amiquip::Connection, amiquip::Channel)>> {
    let Some((connection, channel)) = brokers.open(stop)? else {
        return Ok(None);
    };
    channel.enable_publisher_confirms()?;
    Ok(Some((connection, channel)))
}

/// Whether shutdown has begun (the app said so, or every handle is gone).
fn closing(shared: &Shared, closed_at: &mut Option<Instant>) -> bool {
    if shared.closing.load(Ordering::Relaxed) {
        closed_at.get_or_insert_with(Instant::now);
    }
    closed_at.is_some()
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
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

/// Publishes until shutdown (`Ok`) or a failure or refusal (`Err`, with the unconfirmed ids
/// back at the front of `pending`).
fn session(
    channel: &amiquip::Channel,
    rx: &Receiver<Vec<i64>>,
    shared: &Shared,
    state: &mut State,
) -> Result<(), SessionError> {
    let State {
        pending,
        backoff,
        closed_at,
    } = state;
    let confirms = channel.listen_for_publisher_confirms()?;
    let returns = channel.listen_for_returns()?;
    let mut smoother = ConfirmSmoother::new();
    let mut next_tag: u64 = 1;
    let mut depth_read: Option<Instant> = None;
    let properties = AmqpProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    loop {
        if shared.blocked().is_some() {
            // Neither publishes nor calls (the broker would not answer), until it unblocks.
            shared.set_depth(None);
            if closing(shared, closed_at) {
                return Err(SessionError::Blocked);
            }
            if confirms.try_recv().is_err_and(|e| e.is_disconnected()) {
                return Err(SessionError::Closed);
            }
            match rx.recv_timeout(IDLE_POLL) {
                Ok(ids) => pending.extend(ids),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    closed_at.get_or_insert_with(Instant::now);
                    std::thread::sleep(IDLE_POLL);
                }
            }
            continue;
        }
        if depth_read.is_none_or(|t| t.elapsed() >= DEPTH_EVERY) {
            let queue = channel.queue_declare_passive(QUEUE)?;
            shared.set_depth(queue.declared_message_count());
            depth_read = Some(Instant::now());
        }
        if pending.is_empty() {
            if closing(shared, closed_at) {
                match rx.try_recv() {
                    Ok(ids) => pending.extend(ids),
                    Err(_) => return Ok(()),
                }
            } else {
                // The I/O thread drops the confirm sender when the connection dies (a missed
                // heartbeat): noticed here while idle, not at the next publish.
                if confirms.try_recv().is_err_and(|e| e.is_disconnected()) {
                    return Err(SessionError::Closed);
                }
                match rx.recv_timeout(IDLE_POLL) {
                    Ok(ids) => pending.extend(ids),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => {
                        closed_at.get_or_insert_with(Instant::now);
                        continue;
                    }
                }
            }
        }
        while pending.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(ids) => pending.extend(ids),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        let batch: Vec<i64> = pending.drain(..pending.len().min(MAX_BATCH)).collect();
        let messages: Vec<&[i64]> = batch.chunks(IDS_PER_MESSAGE).collect();
        let first_tag = next_tag;
        let mut published = 0;
        let mut outcome = Ok(());
        for ids in &messages {
            let body = Task {
                page_view_ids: ids.to_vec(),
            }
            .to_bytes();
            let mut publish = Publish::with_properties(&body, ROUTING_KEY, properties.clone());
            publish.mandatory = true;
            if let Err(e) = channel.basic_publish(EXCHANGE, publish) {
                outcome = Err(SessionError::Amqp(e));
                break;
            }
            published += 1;
        }
        next_tag += published as u64;
        let mut acked = vec![false; published];
        let mut settled = 0;
        let mut nacked = 0;
        let mut deadline = Instant::now() + CONFIRM_TIMEOUT;
        while outcome.is_ok() && settled < published {
            if shared.blocked().is_some() {
                // The broker takes these once it unblocks; a shutdown cannot wait for that.
                if closing(shared, closed_at) {
                    outcome = Err(SessionError::Blocked);
                    break;
                }
                deadline = Instant::now() + CONFIRM_TIMEOUT;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                outcome = Err(SessionError::ConfirmTimeout);
                break;
            };
            match confirms.recv_timeout(left.min(IDLE_POLL)) {
                Ok(raw) => {
                    for confirm in smoother.process(raw) {
                        let (tag, ok) = match confirm {
                            Confirm::Ack(p) => (p.delivery_tag, true),
                            Confirm::Nack(p) => (p.delivery_tag, false),
                        };
                        let Some(i) = tag
                            .checked_sub(first_tag)
                            .map(|i| i as usize)
                            .filter(|i| *i < published)
                        else {
                            continue;
                        };
                        settled += 1;
                        acked[i] = ok;
                        nacked += usize::from(!ok);
                    }
                }
                Err(e) if e.is_timeout() => {}
                Err(_) => outcome = Err(SessionError::Closed),
            }
        }
        // A return comes before the confirm of its message: every return of this batch is in.
        let mut returned = 0;
        let mut reason = String::new();
        while let Ok(r) = returns.try_recv() {
            if let Some(i) = messages
                .iter()
                .position(|ids| Task::parse(&r.content).is_ok_and(|t| t.page_view_ids == *ids))
            {
                acked[i] = false;
            }
            returned += 1;
            reason = r.reply_text;
        }
        let mut confirmed = 0;
        for (ids, ok) in messages.iter().zip(&acked).rev() {
            if *ok {
                confirmed += ids.len();
            } else {
                for id in ids.iter().rev() {
                    pending.push_front(*id);
                }
            }
        }
        // Not published at all: back to the front too.
        for ids in messages[published..].iter().rev() {
            for id in ids.iter().rev() {
                pending.push_front(*id);
            }
        }
        shared.metrics.confirmed.inc_by(confirmed as u64);
        shared.backlog.fetch_sub(confirmed, Ordering::Relaxed);
        outcome?;
        if returned > 0 {
            return Err(SessionError::Unroutable(returned, reason));
        }
        if nacked > 0 {
            // Retried later (`sessions`), not in a loop.
            return Err(SessionError::Refused(nacked));
        } else if confirmed > 0 {
            // Reset only after the broker took work: a broker that accepts connections and
            // refuses publishes keeps the backoff growing.
            backoff.reset();
        }
    }
}
