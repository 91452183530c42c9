//! Groups concurrent page views into one multi-row INSERT. Each row still gets its own id, is
//! committed before its request is answered, and is handed to the publisher right after the
//! commit. One statement and one commit (one WAL flush) for many rows is what lets the app go
//! past the single-row INSERT rate of the database.
//!
//! There is no timer: a batch is whatever arrived while the previous INSERTs were running, so
//! a lone request waits for nobody and a busy app writes bigger batches.

use super::AppMetrics;
use super::error::AppError;
use crate::db::Pool;
use crate::db::schema::page_views;
use crate::queue::publisher::Publisher;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
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
    pub fn start(pool: Pool, publisher: Publisher, metrics: Arc<AppMetrics>) -> InsertBatcher {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx, pool, publisher, metrics));
        InsertBatcher(tx)
    }

    /// Stores a page view and returns its id once its row is committed. A caller that goes
    /// away does not cancel the INSERT or the hand-over to the publisher.
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
    publisher: Publisher,
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
        let (pool, publisher, metrics) = (pool.clone(), publisher.clone(), metrics.clone());
        tokio::spawn(async move {
            let (data, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            match insert(&pool, &data).await {
                Ok(ids) => {
                    metrics.recorded.inc_by(ids.len() as u64);
                    for (id, reply) in ids.into_iter().zip(replies) {
                        publisher.offer(id);
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
    let rows: Vec<_> = data.iter().map(|d| page_views::data.eq(d)).collect();
    let mut ids: Vec<i64> = diesel::insert_into(page_views::table)
        .values(&rows)
        .returning(page_views::id)
        .get_results(&mut conn)
        .await?;
    // The sequence hands out ids in the order of the VALUES rows; sorting makes the pairing
    // independent of the order RETURNING lists them in.
    ids.sort_unstable();
    if ids.len() != data.len() {
        return Err(diesel::result::Error::NotFound.into());
    }
    Ok(ids)
}
