//! The worker's Prometheus metrics and the small server that exposes them.

use crate::metrics::{Counter, Histogram};
use crate::queue::consumer::ConsumerEvents;
use crate::shutdown::Shutdown;
use axum::Router;
use axum::extract::State;
use axum::routing::get;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Default)]
pub struct WorkerMetrics {
    pub processed: Counter,
    pub duplicates: Counter,
    pub dead_lettered: Counter,
    pub rollup_runs: Counter,
    /// From the page view being recorded to its task being processed.
    pub latency: Histogram,
    pub broker_connected: AtomicBool,
}

impl ConsumerEvents for WorkerMetrics {
    fn dead_lettered(&self) {
        self.dead_lettered.inc();
    }

    fn connected(&self, up: bool) {
        self.broker_connected.store(up, Ordering::Relaxed);
    }
}

impl WorkerMetrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.processed.render(
            &mut out,
            "pageviews_tasks_processed_total",
            "Page views marked processed.",
        );
        self.duplicates.render(
            &mut out,
            "pageviews_tasks_duplicate_total",
            "Tasks for page views already processed (redeliveries).",
        );
        self.dead_lettered.render(
            &mut out,
            "pageviews_tasks_dead_lettered_total",
            "Malformed or bogus tasks sent to the dead-letter queue.",
        );
        self.rollup_runs.render(
            &mut out,
            "pageviews_rollup_runs_total",
            "Rollup runs done by this worker.",
        );
        self.latency.render(
            &mut out,
            "pageviews_processing_latency_seconds",
            "Time from recording a page view to processing it.",
        );
        let up = u8::from(self.broker_connected.load(Ordering::Relaxed));
        out.push_str(&format!("# HELP pageviews_broker_connected Whether the consumer is connected.\n# TYPE pageviews_broker_connected gauge\npageviews_broker_connected {up}\n"));
        out
    }
}

pub async fn serve(listener: crate::web::listener::Listener, metrics: Arc<WorkerMetrics>, mut stopping: Shutdown) {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Arc<WorkerMetrics>>| async move { m.render() }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(metrics);
    if let Err(e) = crate::web::listener::serve(listener, app, async move { stopping.wait().await }).await {
        tracing::error!(error = %e, "worker metrics server failed");
    }
}
