//! The HTTP app: every route in `router`, shared state in `App`, the process in `run`.

mod batch_insert;
mod error;
mod health;
pub mod listener;
mod page;
mod request_id;

use crate::config::AppConfig;
use crate::db::{self, Pool};
use crate::metrics::{Counter, Histogram};
use crate::queue::outbox::Outbox;
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
    pub outbox: Outbox,
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
}

pub type AppState = Arc<App>;

impl App {
    /// Starts the INSERT batcher too, so it needs a tokio runtime.
    /// `db_timeout`: how long a request waits for its row before 503.
    pub fn new(pool: Pool, outbox: Outbox, db_timeout: Duration) -> AppState {
        let metrics = Arc::new(AppMetrics::default());
        let batcher = batch_insert::InsertBatcher::start(pool.clone(), outbox.clone(), metrics.clone(), db_timeout);
        Arc::new(App {
            pool,
            outbox,
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
/// the remaining tasks to the broker, and returns.
pub async fn run(config: AppConfig) -> anyhow::Result<()> {
    let pool = db::request_pool(&config.database);
    let outbox = Outbox::start(
        config.broker.url.expose().to_owned(),
        pool.clone(),
        config.sweep_interval,
    );
    let app = App::new(pool, outbox.clone(), config.database.timeout);

    let listener = listener::bind(&config.listen).await?;
    tracing::info!(listen = %config.listen, "app listening");
    listener::serve(listener, router(app), shutdown::signal()).await?;

    // Requests are done: the outbox publishes what it holds and stops.
    outbox.shutdown().await;
    tracing::info!("app stopped");
    Ok(())
}
