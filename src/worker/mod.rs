//! The worker: consumes tasks (see `queue::consumer`), marks page views processed, and runs the
//! scheduled rollup. Optionally serves `/metrics` and `/healthz`.

mod metrics;
pub mod retention;
mod rollup;
mod tasks;

pub use crate::queue::consumer::Verdict;
pub use metrics::WorkerMetrics;
pub use tasks::process;

use crate::config::WorkerConfig;
use crate::db;
use crate::queue::consumer::{Consumer, ConsumerEvents};
use crate::shutdown;
use std::sync::Arc;

/// The consumer's events go to the metrics; the first time it consumes, the service manager is
/// told the worker is ready (the one implementation of `ConsumerEvents`).
struct Events {
    metrics: Arc<WorkerMetrics>,
    ready: std::sync::Once,
}

impl ConsumerEvents for Events {
    fn dead_lettered(&self) {
        self.metrics.dead_lettered.inc();
    }

    fn connected(&self, up: bool) {
        self.metrics.broker_connected.set(i64::from(up));
        if up {
            self.ready.call_once(|| crate::systemd::ready("consuming"));
        }
    }
}

/// Runs until SIGTERM/SIGINT, then stops consuming, finishes the batch in hand and returns.
pub async fn run(config: WorkerConfig) -> anyhow::Result<()> {
    let stop = shutdown::signal();
    crate::systemd::spawn_watchdog();
    let pool = db::worker_pool(&config.database);
    let metrics = Arc::new(WorkerMetrics::default());
    let (trigger, stopping) = shutdown::channel();

    let metrics_server = match &config.metrics_listen {
        Some(listen) => {
            let listener = crate::listener::bind(listen)
                .await
                .map_err(|e| anyhow::anyhow!("PAGEVIEWS_METRICS_LISTEN: {e}"))?;
            tracing::info!(%listen, "worker metrics listening");
            Some(tokio::spawn(metrics::serve(
                listener,
                metrics.clone(),
                stopping.clone(),
            )))
        }
        None => None,
    };

    let (consumer, batches) = Consumer::start(
        crate::queue::brokers::Brokers::from_config(&config.broker),
        config.prefetch,
        Events {
            metrics: metrics.clone(),
            ready: std::sync::Once::new(),
        },
    );
    let processor = tokio::spawn(tasks::process_batches(
        pool.clone(),
        batches,
        metrics.clone(),
        stopping.clone(),
    ));
    let scheduler = tokio::spawn(rollup::schedule(
        pool.clone(),
        config.rollup_interval,
        metrics.clone(),
        stopping.clone(),
    ));
    let retention = config.retention_days.map(|days| {
        tokio::spawn(retention::schedule(
            pool.clone(),
            days,
            config.rollup_interval,
            stopping.clone(),
        ))
    });
    tracing::info!(
        retention_days = config.retention_days,
        prefetch = config.prefetch,
        rollup_interval_secs = config.rollup_interval.as_secs(),
        "worker started"
    );

    stop.await;
    // The consumer stops taking deliveries. The processor finishes the batch in hand if the
    // database lets it, but gives up once the trigger has fired rather than retrying while
    // the database is away (the consumer thread waits for that verdict, so the trigger must
    // fire before the shutdown waits for the thread); unacked deliveries are redelivered.
    trigger.fire();
    consumer.shutdown().await;
    let _ = processor.await;
    let _ = scheduler.await;
    if let Some(retention) = retention {
        let _ = retention.await;
    }
    if let Some(server) = metrics_server {
        let _ = server.await;
    }
    tracing::info!("worker stopped");
    Ok(())
}
