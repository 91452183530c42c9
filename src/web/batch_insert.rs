//! Groups concurrent page views into one multi-row INSERT. Each row still gets its own id, is
//! committed before its request is answered, and the batch's ids are offered to the outbox
//! right after the commit. One statement and one commit (one WAL flush) for many rows is what lets the app go
//! past the single-row INSERT rate of the database.
//!
//! There is no timer: a batch is whatever arrived while the previous INSERTs were running, so
//! a lone request waits for nobody and a busy app writes bigger batches.

use super::AppMetrics;
use super::error::AppError;
use crate::db::{self, Pool};
use crate::queue::outbox::Outbox;
use std::sync::Arc;
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Rows per INSERT at most.
const MAX_ROWS: usize = 64;
/// INSERTs running at once; while all are busy, new page views gather into the next batch.
const IN_FLIGHT: usize = 4;

type Reply = oneshot::Sender<Result<i64, Arc<AppError>>>;

/// Hands page views to the inserting task; the task stops when every handle is dropped.
pub struct InsertBatcher(mpsc::UnboundedSender<(serde_json::Value, Reply)>);

impl InsertBatcher {
    pub fn start(pool: Pool, outbox: Outbox, metrics: Arc<AppMetrics>) -> InsertBatcher {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx, pool, outbox, metrics));
        InsertBatcher(tx)
    }

    /// Stores a page view and returns its id once its row is committed. A caller that goes
    /// away does not cancel the INSERT or the hand-over to the outbox.
    pub async fn insert(&self, data: serde_json::Value) -> Result<i64, AppError> {
        let (reply, id) = oneshot::channel();
        self.0.send((data, reply)).map_err(|_| AppError::Stopping)?;
        match id.await {
            Ok(Ok(id)) => Ok(id),
            Ok(Err(e)) => Err(AppError::Batch(e)),
            Err(_) => Err(AppError::Stopping),
        }
    }
}

async fn run(
    mut rx: mpsc::UnboundedReceiver<(serde_json::Value, Reply)>,
    pool: Pool,
    outbox: Outbox,
    metrics: Arc<AppMetrics>,
) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let mut batch = vec![first];
        while batch.len() < MAX_ROWS {
            match rx.try_recv() {
                Ok(visit) => batch.push(visit),
                Err(_) => break,
            }
        }
        let (pool, outbox, metrics) = (pool.clone(), outbox.clone(), metrics.clone());
        tokio::spawn(async move {
            let (data, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            match insert(&pool, &data).await {
                Ok(ids) => {
                    metrics.recorded.add(ids.len() as u64);
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
            drop(slot);
        });
    }
}

/// One INSERT of all rows; ids in the order of `data`.
async fn insert(pool: &Pool, data: &[serde_json::Value]) -> Result<Vec<i64>, AppError> {
    let mut conn = pool.get().await?;
    Ok(db::page_views::insert(&mut conn, data).await?)
}
