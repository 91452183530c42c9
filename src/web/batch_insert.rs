//! Groups concurrent page views into one multi-row INSERT. Each row still gets its own id, is
//! committed before its request is answered, and the batch's ids are offered to the outbox
//! right after the commit. One statement and one commit (one WAL flush) for many rows is what
//! lets the app go past the single-row INSERT rate of the database.
//!
//! There is no timer: a batch is whatever arrived while the previous INSERT was running, so
//! a lone request waits for nobody and a busy app writes bigger batches.
//!
//! Every page view has a deadline, `PAGEVIEWS_DB_TIMEOUT_MS` after it arrived: the request is
//! answered 503 then, and the INSERT carries the batch's remaining budget, checked by the
//! server once it can write (after waiting for a lock, say): past it, the statement inserts
//! nothing. So a request answered 503 does not leave a row behind.

use super::AppMetrics;
use super::error::AppError;
use crate::db::{self, Pool};
use crate::queue::outbox::Outbox;
use std::sync::Arc;
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

struct Visit {
    data: serde_json::Value,
    deadline: Instant,
    reply: Reply,
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
        let (reply, id) = oneshot::channel();
        let deadline = Instant::now() + self.timeout;
        self.tx.try_send(Visit { data, deadline, reply }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => AppError::Busy,
            mpsc::error::TrySendError::Closed(_) => AppError::Stopping,
        })?;
        match tokio::time::timeout_at(deadline, id).await {
            Ok(Ok(Ok(id))) => Ok(id),
            Ok(Ok(Err(e))) => Err(AppError::Batch(e)),
            Ok(Err(_)) => Err(AppError::Stopping),
            Err(_) => Err(AppError::DeadlinePassed),
        }
    }
}

/// One batch at a time: a batch is whatever arrived while the previous INSERT ran. One INSERT
/// in flight gave the fewest commits per row: at 32 connections through nginx + TLS it served
/// 1.20× the requests of 4 in flight (p99 9 ms both; bench/README.md).
async fn run(mut rx: mpsc::Receiver<Visit>, pool: Pool, outbox: Outbox, metrics: Arc<AppMetrics>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_ROWS {
            match rx.try_recv() {
                Ok(visit) => batch.push(visit),
                Err(_) => break,
            }
        }
        // Requests whose deadline has passed were answered 503 already: not stored.
        let now = Instant::now();
        batch.retain(|v| v.deadline > now + MARGIN);
        let Some(budget_ends) = batch.iter().map(|v| v.deadline - MARGIN).min() else {
            continue;
        };
        let (data, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|v| (v.data, v.reply)).unzip();
        match insert(&pool, &data, budget_ends).await {
            Ok(ids) => {
                metrics.recorded.inc_by(ids.len() as u64);
                outbox.offer(ids.clone());
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

/// One INSERT of all rows, or none after `budget_ends`; ids in the order of `data`.
async fn insert(pool: &Pool, data: &[serde_json::Value], budget_ends: Instant) -> Result<Vec<i64>, AppError> {
    let mut conn = tokio::time::timeout_at(budget_ends, pool.get())
        .await
        .map_err(|_| AppError::DeadlinePassed)??;
    let budget = budget_ends.saturating_duration_since(Instant::now());
    Ok(db::page_views::insert(&mut conn, data, budget).await?)
}
