//! The HTTP app: every route in `router`, shared state in `App`, the process in `run`.

mod batch_insert;
mod error;
mod health;
mod page;
mod request_id;
mod stats;
mod visits;

use crate::config::{AppConfig, Listen};
use crate::db::{self, Pool};
use crate::listener;
use crate::metrics::{Counter, Family, Gauge, Histogram, Registry};
use crate::queue::brokers::Brokers;
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
    page_stats: stats::StatsCache,
    /// What `/metrics` exposes: `metrics` and the publisher's.
    registry: Registry,
    /// The database's answer to `/readyz` and scrapes.
    database_check: health::DatabaseCheck,
}

pub struct AppMetrics {
    pub requests: Family<StatusClass, Counter>,
    pub request_duration: Histogram,
    pub recorded: Counter,
    /// Set from `Outbox::is_connected` when scraped.
    pub broker_connected: Gauge,
    /// Whether a database connection answered, checked when scraped.
    pub database_up: Gauge,
}

/// The `status` label of `pageviews_http_requests_total`: `1xx` to `5xx`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct StatusClass {
    pub status: &'static str,
}

impl StatusClass {
    const ALL: [&'static str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

    pub fn of(status: axum::http::StatusCode) -> Self {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        StatusClass {
            status: Self::ALL[class],
        }
    }
}

impl AppMetrics {
    fn new(registry: &mut Registry) -> Self {
        let m = AppMetrics {
            requests: Family::default(),
            request_duration: crate::metrics::seconds_histogram(),
            recorded: Counter::default(),
            broker_connected: Gauge::default(),
            database_up: Gauge::default(),
        };
        // Every class from the start, so rates work from the first scrape.
        for status in StatusClass::ALL {
            drop(m.requests.get_or_create(&StatusClass { status }));
        }
        registry.register(
            "http_requests",
            "HTTP requests answered, by status class",
            m.requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to answer an HTTP request",
            m.request_duration.clone(),
        );
        registry.register(
            "page_views_recorded",
            "Page views stored in PostgreSQL",
            m.recorded.clone(),
        );
        registry.register(
            "broker_connected",
            "Whether the outbox is connected to the broker",
            m.broker_connected.clone(),
        );
        registry.register(
            "database_up",
            "Whether a database connection answered at scrape time",
            m.database_up.clone(),
        );
        m
    }
}

pub type AppState = Arc<App>;

impl App {
    /// Starts the INSERT batcher too, so it needs a tokio runtime.
    /// `db_timeout`: how long a request waits for its row before 503.
    pub fn new(pool: Pool, outbox: Outbox, db_timeout: Duration) -> AppState {
        let mut registry = crate::metrics::registry();
        let metrics = Arc::new(AppMetrics::new(&mut registry));
        outbox.metrics().register(&mut registry);
        let batcher = batch_insert::InsertBatcher::start(pool.clone(), outbox.clone(), metrics.clone(), db_timeout);
        Arc::new(App {
            pool,
            outbox,
            metrics,
            batcher,
            page_stats: stats::StatsCache::default(),
            registry,
            database_check: health::DatabaseCheck::default(),
        })
    }
}

/// A request not answered within this time is answered 503.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
// A request that came in while the listener drains is answered before its deadline.
const _: () = assert!(listener::DRAIN_DEADLINE.as_millis() > listener::DRAIN.as_millis() + REQUEST_TIMEOUT.as_millis());

/// Every route, in one place. `operations`: also `/readyz` and `/metrics` (else they are on
/// the operators' listener only, `operations_router`).
pub fn router(app: AppState, operations: bool) -> Router {
    let routes = Router::new()
        .route("/", get(page::show))
        .route("/stats", get(stats::show))
        .route("/visits/{id}", get(visits::show))
        .merge(health::routes(operations));
    routes
        // Inside the request's span (below), so its log line carries the request id.
        .layer(axum::middleware::from_fn(error::log_failures))
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            REQUEST_TIMEOUT,
        ))
        // Outside the timeout, so a request it cuts is counted and timed too.
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            health::count_requests,
        ))
        // Outermost, applied top to bottom: the id exists before the span that logs it.
        .layer(
            ServiceBuilder::new()
                .layer(axum::middleware::map_request(request_id::sanitize))
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

/// The operators' routes alone, for `PAGEVIEWS_APP_METRICS_LISTEN`.
fn operations_router(app: AppState) -> Router {
    health::routes(true).with_state(app)
}

/// Runs the app until SIGTERM/SIGINT: stops accepting, lets requests in flight finish, hands
/// the remaining tasks to the broker, and returns. Tells the service manager it is ready once
/// the database answers and the publisher runs.
pub async fn run(config: AppConfig) -> anyhow::Result<()> {
    let mut stop = Box::pin(shutdown::signal());
    crate::systemd::spawn_watchdog();
    let pool = db::request_pool(&config.database);
    let outbox = Outbox::start(Brokers::from_config(&config.broker), pool.clone(), config.sweep.clone());
    let app = App::new(pool.clone(), outbox.clone(), config.database.timeout);
    let (trigger, stopping) = shutdown::channel();
    let operations = match &config.metrics_listen {
        Some(listen) => {
            let listener = listener::bind(listen)
                .await
                .map_err(|e| anyhow::anyhow!("PAGEVIEWS_APP_METRICS_LISTEN: {e}"))?;
            tracing::info!(%listen, "app metrics listening");
            let mut stopping = stopping.clone();
            let router = operations_router(app.clone());
            Some(tokio::spawn(async move {
                listener::serve(listener, router, async move { stopping.wait().await }).await
            }))
        }
        None => None,
    };

    let variable = match config.listen {
        Listen::Inherited(_) => "LISTEN_FDS",
        _ => "PAGEVIEWS_LISTEN",
    };
    let listener = listener::bind(&config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("{variable}: {e}"))?;
    let address = listener.address();
    let pool_size = config.database.pool_size;
    let warmed = tokio::select! {
        opened = db::open_connections(&pool, pool_size) => Some(opened),
        () = &mut stop => None,
    };
    if let Some(warmed) = warmed {
        // With the database there, serve once the whole pool is open. With it away, serve at
        // once (503 with Retry-After, as when it goes away later) but announce readiness only
        // once it answers.
        let ready = format!("serving on {address}");
        let announce = tokio::spawn(async move {
            if let Err(error) = warmed {
                tracing::warn!(%error, "database unavailable; serving 503 and not ready yet");
                db::wait_until_reachable(&pool, pool_size).await;
            }
            crate::systemd::ready(&ready);
        });
        tracing::info!(listen = %address, "app listening");
        let operations_here = config.metrics_listen.is_none();
        listener::serve(listener, router(app, operations_here), stop).await?;
        announce.abort();
    } else {
        drop(app);
    }

    // Requests are done: the outbox publishes what it holds and stops; then the operators'
    // listener.
    outbox.shutdown().await;
    trigger.fire();
    if let Some(operations) = operations {
        let _ = operations.await;
    }
    tracing::info!("app stopped");
    Ok(())
}
