//! Operational routes: liveness, readiness, metrics, and the request counter middleware.
//! nginx keeps `/readyz` and `/metrics` off the public side.

use super::AppState;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use diesel_async::RunQueryDsl;
use std::time::Instant;

pub async fn healthz() -> &'static str {
    "ok\n"
}

/// Whether a pooled connection answers, within the pool's timeout.
async fn database(app: &AppState) -> Result<(), String> {
    match app.pool.get().await {
        Ok(mut conn) => diesel::sql_query("SELECT 1")
            .execute(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Ready when the database answers and the publisher is connected to the broker.
pub async fn readyz(State(app): State<AppState>) -> (StatusCode, String) {
    let database = database(&app).await;
    let broker = app.publisher.is_connected();
    let mut body = String::new();
    match &database {
        Ok(()) => body.push_str("database: ok\n"),
        Err(e) => body.push_str(&format!("database: unavailable ({e})\n")),
    }
    body.push_str(if broker {
        "broker: ok\n"
    } else {
        "broker: unavailable\n"
    });
    let status = if database.is_ok() && broker {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}

pub async fn metrics(State(app): State<AppState>) -> String {
    let m = &app.metrics;
    let mut out = String::new();
    out.push_str("# HELP pageviews_http_requests_total HTTP requests answered, by status class.\n# TYPE pageviews_http_requests_total counter\n");
    for (class, counter) in m.requests.iter().enumerate() {
        out.push_str(&format!(
            "pageviews_http_requests_total{{status=\"{}xx\"}} {}\n",
            class + 1,
            counter.get()
        ));
    }
    m.request_duration.render(
        &mut out,
        "pageviews_http_request_duration_seconds",
        "Time to answer an HTTP request.",
    );
    m.recorded.render(
        &mut out,
        "pageviews_page_views_recorded_total",
        "Page views stored in PostgreSQL.",
    );
    let p = app.publisher.metrics();
    p.confirmed.render(
        &mut out,
        "pageviews_publish_confirmed_total",
        "Tasks confirmed by the broker.",
    );
    p.failures.render(
        &mut out,
        "pageviews_publish_failures_total",
        "Broker connections lost while publishing.",
    );
    p.deferred.render(
        &mut out,
        "pageviews_publish_deferred_total",
        "Tasks left to the sweep because the publisher queue was full.",
    );
    m.republished.render(
        &mut out,
        "pageviews_republished_total",
        "Unconfirmed tasks handed to the publisher again by the sweep.",
    );
    let up = u8::from(app.publisher.is_connected());
    out.push_str(&format!("# HELP pageviews_broker_connected Whether the publisher is connected.\n# TYPE pageviews_broker_connected gauge\npageviews_broker_connected {up}\n"));
    // Checked at scrape time (at most PAGEVIEWS_DB_TIMEOUT_MS): the alert on an unreachable
    // database needs no traffic to fire.
    let up = u8::from(database(&app).await.is_ok());
    out.push_str(&format!("# HELP pageviews_database_up Whether a database connection answered at scrape time.\n# TYPE pageviews_database_up gauge\npageviews_database_up {up}\n"));
    out
}

pub async fn count_requests(State(app): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let response = next.run(request).await;
    let class = usize::from(response.status().as_u16() / 100).clamp(1, 5) - 1;
    app.metrics.requests[class].inc();
    app.metrics.request_duration.observe(started.elapsed().as_secs_f64());
    response
}
