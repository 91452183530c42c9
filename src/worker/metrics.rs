//! The worker's Prometheus metrics and the small server that exposes them.

use crate::metrics::{Counter, Gauge, Histogram, Registry};
use crate::shutdown::Shutdown;
use axum::Router;
use axum::extract::State;
use axum::routing::get;
use std::sync::Arc;

pub struct WorkerMetrics {
    pub processed: Counter,
    pub duplicates: Counter,
    pub dead_lettered: Counter,
    pub rollup_runs: Counter,
    /// From the page view being recorded to its task being processed.
    pub latency: Histogram,
    pub broker_connected: Gauge,
    registry: Registry,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        let mut registry = crate::metrics::registry();
        let (processed, duplicates, dead_lettered, rollup_runs) = Default::default();
        let latency = crate::metrics::seconds_histogram();
        let broker_connected = Gauge::default();
        registry.register(
            "tasks_processed",
            "Page views marked processed",
            Counter::clone(&processed),
        );
        registry.register(
            "tasks_duplicate",
            "Tasks for page views already processed (redeliveries)",
            Counter::clone(&duplicates),
        );
        registry.register(
            "tasks_dead_lettered",
            "Malformed or bogus tasks sent to the dead-letter queue",
            Counter::clone(&dead_lettered),
        );
        registry.register(
            "rollup_runs",
            "Rollup runs done by this worker",
            Counter::clone(&rollup_runs),
        );
        registry.register(
            "processing_latency_seconds",
            "Time from recording a page view to processing it",
            latency.clone(),
        );
        registry.register(
            "broker_connected",
            "Whether the consumer is connected",
            broker_connected.clone(),
        );
        WorkerMetrics {
            processed,
            duplicates,
            dead_lettered,
            rollup_runs,
            latency,
            broker_connected,
            registry,
        }
    }
}

pub async fn serve(listener: crate::listener::Listener, metrics: Arc<WorkerMetrics>, mut stopping: Shutdown) {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Arc<WorkerMetrics>>| async move { crate::metrics::exposition(&m.registry) }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(metrics);
    if let Err(e) = crate::listener::serve(listener, app, async move { stopping.wait().await }).await {
        tracing::error!(error = %e, "worker metrics server failed");
    }
}
