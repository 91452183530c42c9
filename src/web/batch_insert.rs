//! Groups concurrent page views into one multi-row INSERT. Each row still gets its own id, is
//! committed before its request is answered, and the batch's ids are offered to the outbox
//! right after the commit. One statement and one commit (one WAL flush) for many rows is what
//! lets the app go past the single-row INSERT rate of the database.
//!
//! There is no timer: a batch is whatever arrived while the previous INSERT was running, so
//! a lone request waits for nobody and a busy app writes bigger batches.
//!
//! Every page view has a deadline, `PAGEVIEWS_DB_TIMEOUT_MS` after it arrived, and is answered
//! 503 only when its row certainly was not committed: still waiting in the queue at its
//! deadline (it is then never sent), or its batch's transaction failed before its COMMIT was
//! sent. The INSERT runs under a statement timeout of the batch's remaining budget, so the
//! server itself gives up before the deadline (a lock held elsewhere, say). When the COMMIT
//! was sent and its outcome did not come back in time, the answer is a 500 without
//! Retry-After: the row may exist, and a retry could store the page view twice.

use super::AppMetrics;
use super::error::AppError;
use crate::db::{self, Pool};
use crate::queue::outbox::{Offer, Outbox};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Rows per INSERT at most: enough that a slow commit (a busy disk) still carries many rows.
const MAX_ROWS: usize = 256;
/// Page views waiting for an INSERT, at most; beyond, requests are answered 503 at once
/// (the database is not keeping up, and their deadline would pass anyway).
const QUEUE_LIMIT: usize = 4_096;
/// The statement's budget ends this long before the requests' deadline, for the answer's way
/// back: a row the server wrote is then committed and reported before the request gives up.
const MARGIN: Duration = Duration::from_millis(100);

type Reply = oneshot::Sender<Result<i64, Arc<AppError>>>;

/// Where a page view is: waiting in the queue, taken into a batch, or given up by its request.
/// Whoever moves it out of `QUEUED` first decides: a taken page view is answered with its
/// batch's outcome, an abandoned one is never sent.
const QUEUED: u8 = 0;
const TAKEN: u8 = 1;
const ABANDONED: u8 = 2;

struct Visit {
    data: serde_json::Value,
    deadline: Instant,
    state: Arc<AtomicU8>,
    reply: Reply,
}

impl Visit {
    fn take(&self) -> bool {
        self.state
            .compare_exchange(QUEUED, TAKEN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// Hands page views to the inserting task; the task stops when every handle is dropped.
pub struct InsertBatcher {
    tx: mpsc::Sender<Visit>,
    timeout: Duration,
}

impl InsertBatcher {
    /// `timeout`: how long a request may wait for its row (`PAGEVIEWS_DB_TIMEOUT_MS`).
    pub fn start(pool: Pool, outbox: Outbox, metrics: Arc<AppMetrics>, timeout: Duration) -> InsertBatcher {
        let (tx, rx) = mpsc::channel(QUEUE_LIMIT);
        tokio::spawn(run(rx, pool, outbox, metrics));
        InsertBatcher { tx, timeout }
    }

    /// Stores a page view and returns its id once its row is committed. A caller that goes
    /// away does not cancel the INSERT or the hand-over to the outbox.
    pub async fn insert(&self, data: serde_json::Value) -> Result<i64, AppError> {
        let (reply, mut id) = oneshot::channel();
        let deadline = Instant::now() + self.timeout;
        let state = Arc::new(AtomicU8::new(QUEUED));
        let visit = Visit {
            data,
            deadline,
            state: state.clone(),
            reply,
        };
        self.tx.try_send(visit).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => AppError::Busy,
            mpsc::error::TrySendError::Closed(_) => AppError::Stopping,
        })?;
        let answer = match tokio::time::timeout_at(deadline, &mut id).await {
            Ok(answer) => answer,
            Err(_) => match state.compare_exchange(QUEUED, ABANDONED, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Err(AppError::DeadlinePassed),
                // Taken: its batch gives up at the earliest deadline in it, so the outcome is
                // due now; a little slack for the task to deliver it.
                Err(_) => tokio::time::timeout(MARGIN, id)
                    .await
                    .map_err(|_| AppError::OutcomeUnknown("no verdict from the batch in time".into()))?,
            },
        };
        match answer {
            Ok(Ok(id)) => Ok(id),
            Ok(Err(e)) => Err(AppError::Batch(e)),
            // The task ended without a verdict: unknown if the page view had been taken.
            Err(_) if state.load(Ordering::Acquire) == TAKEN => {
                Err(AppError::OutcomeUnknown("the batch ended without a verdict".into()))
            }
            Err(_) => Err(AppError::Stopping),
        }
    }
}

/// One batch at a time: a batch is whatever arrived while the previous INSERT ran. One INSERT
/// in flight makes the fewest commits per row, which served more requests than several in
/// flight (the measurement is in tools/bench/README.md).
async fn run(mut rx: mpsc::Receiver<Visit>, pool: Pool, outbox: Outbox, metrics: Arc<AppMetrics>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_ROWS {
            match rx.try_recv() {
                Ok(visit) => batch.push(visit),
                Err(_) => break,
            }
        }
        // Too close to its deadline to be worth sending, or already given up: not stored.
        let now = Instant::now();
        let (batch, late): (Vec<_>, Vec<_>) = batch.into_iter().partition(|v| v.deadline > now + MARGIN && v.take());
        for visit in late {
            let _ = visit.reply.send(Err(Arc::new(AppError::DeadlinePassed)));
        }
        let Some(ends) = batch.iter().map(|v| v.deadline).min() else {
            continue;
        };
        let (data, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|v| (v.data, v.reply)).unzip();
        match insert(&pool, &data, ends).await {
            Ok(ids) => {
                metrics.recorded.inc_by(ids.len() as u64);
                // Not accepted: counted as deferred; the rows wait for the sweep.
                let _ = outbox.offer(Offer {
                    page_view_ids: ids.clone(),
                });
                for (id, reply) in ids.into_iter().zip(replies) {
                    let _ = reply.send(Ok(id));
                }
            }
            Err(e) => {
                let e = Arc::new(e);
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// One transaction of all rows, or none; ids in the order of `data`. The server's budget ends
/// `MARGIN` before `ends` (the way back for the answer and the COMMIT); this side waits until
/// `ends`.
async fn insert(pool: &Pool, data: &[serde_json::Value], ends: Instant) -> Result<Vec<i64>, AppError> {
    use db::page_views::InsertError;
    let budget_ends = ends - MARGIN;
    let mut conn = tokio::time::timeout_at(budget_ends, pool.get())
        .await
        .map_err(|_| AppError::DeadlinePassed)??;
    let budget = budget_ends.saturating_duration_since(Instant::now());
    if budget.is_zero() {
        return Err(AppError::DeadlinePassed);
    }
    db::page_views::insert(&mut conn, data, budget, ends)
        .await
        .map_err(|e| match e {
            InsertError::NotStored(e) => AppError::from(e),
            InsertError::TimedOut => AppError::DeadlinePassed,
            InsertError::OutcomeUnknown(e) => AppError::OutcomeUnknown(e),
        })
}
