//! The HTTP app: every route in `router`, shared state in `App`, the process in `run`.

mod batch_insert;
mod error;
mod health;
pub mod listener;
mod page;
mod publishing;
mod request_id;

use crate::config::AppConfig;
use crate::db::{self, Pool};
use crate::metrics::{Counter, Histogram};
use crate::queue::publisher::Publisher;
use crate::shutdown;
use axum::Router;
use axum::routing::get;
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceBuilder;
use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnResponse, TraceLayer};

/// Shared by every request.
pub struct App {
    pub pool: Pool,
    pub publisher: Publisher,
    pub metrics: Arc<AppMetrics>,
    /// Where `GET /` stores its page view: concurrent ones share an INSERT.
    batcher: batch_insert::InsertBatcher,
    /// Totals shown on the page, refreshed at most once a second (counting rows per request
    /// would make every page view scan the table).
    page_stats: page::StatsCache,
}

#[derive(Default)]
pub struct AppMetrics {
    pub requests: [Counter; 5],
    pub request_duration: Histogram,
    pub recorded: Counter,
    pub republished: Counter,
}

pub type AppState = Arc<App>;

impl App {
    /// Starts the INSERT batcher too, so it needs a tokio runtime.
    pub fn new(pool: Pool, publisher: Publisher) -> AppState {
        let metrics = Arc::new(AppMetrics::default());
        let batcher = batch_insert::InsertBatcher::start(pool.clone(), publisher.clone(), metrics.clone());
        Arc::new(App {
            pool,
            publisher,
            metrics,
            batcher,
            page_stats: page::StatsCache::default(),
        })
    }
}

/// Every route, in one place.
pub fn router(app: AppState) -> Router {
    Router::new()
        .route("/", get(page::show))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            health::count_requests,
        ))
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_secs(10),
        ))
        // Outermost, applied top to bottom: the id exists before the span that logs it.
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(request_id::HEADER, request_id::Sequential))
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(request_id::span)
                        .on_response(DefaultOnResponse::new().level(tracing::Level::INFO)),
                )
                .layer(PropagateRequestIdLayer::new(request_id::HEADER)),
        )
        .with_state(app)
}

/// Runs the app until SIGTERM/SIGINT: stops accepting, lets requests in flight finish, hands
/// the remaining tasks to the broker, and returns. Tells the service manager it is ready once
/// the database answers and the publisher runs.
pub async fn run(config: AppConfig) -> anyhow::Result<()> {
    let mut stop = Box::pin(shutdown::signal());
    crate::systemd::spawn_watchdog();
    let pool = db::pool(&config.database);
    let (confirmed_tx, confirmed_rx) = tokio::sync::mpsc::unbounded_channel();
    let (publisher, publisher_thread) = Publisher::start(config.broker.url.expose().to_owned(), confirmed_tx);
    let app = App::new(pool.clone(), publisher);
    let (trigger, stopping) = shutdown::channel();
    let recorder = tokio::spawn(publishing::record_confirms(pool.clone(), confirmed_rx));
    let sweep = tokio::spawn(publishing::sweep(app.clone(), config.sweep_interval, stopping));

    let listener = listener::bind(&config.listen).await?;
    let address = listener.address();
    let reachable = tokio::select! {
        () = db::wait_until_reachable(&pool, config.database.pool_size) => true,
        () = &mut stop => false,
    };
    if reachable {
        tracing::info!(listen = %address, "app listening");
        crate::systemd::ready(&format!("serving on {address}"));
        listener::serve(listener, router(app), stop).await?;
    } else {
        drop(app);
    }

    // Requests are done. Stop the sweep, which drops the last publisher handle: the thread
    // publishes what it holds and ends; then the recorder writes the last confirms.
    trigger.fire();
    let _ = sweep.await;
    let _ = tokio::task::spawn_blocking(move || publisher_thread.join()).await;
    let _ = recorder.await;
    tracing::info!("app stopped");
    Ok(())
}
