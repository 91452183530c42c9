//! Operational routes: liveness, readiness, metrics, and the request counter middleware.
//! nginx keeps `/readyz` and `/metrics` off the public side.

use super::AppState;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use std::time::Instant;

pub async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready when the database answers and the outbox is connected to the broker.
pub async fn readyz(State(app): State<AppState>) -> (StatusCode, String) {
    let database = crate::db::ping(&app.pool).await;
    let broker = app.outbox.status();
    let mut body = String::new();
    match &database {
        Ok(()) => body.push_str("database: ok\n"),
        Err(crate::db::DbError::Pool(e)) => body.push_str(&format!("database: unavailable ({e})\n")),
        Err(crate::db::DbError::Query(e)) => body.push_str(&format!("database: query failed ({e})\n")),
    }
    body.push_str(&format!("broker: {broker}\n"));
    let status = if database.is_ok() && broker == crate::queue::outbox::BrokerStatus::Ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}

pub async fn metrics(State(app): State<AppState>) -> impl axum::response::IntoResponse {
    app.metrics.broker_connected.set(i64::from(app.outbox.is_connected()));
    // Checked at scrape time (at most PAGEVIEWS_DB_TIMEOUT_MS): the alert on an unreachable
    // database needs no traffic to fire.
    app.metrics
        .database_up
        .set(i64::from(crate::db::ping(&app.pool).await.is_ok()));
    crate::metrics::exposition(&app.registry)
}

pub async fn count_requests(State(app): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let response = next.run(request).await;
    app.metrics
        .requests
        .get_or_create(&super::StatusClass::of(response.status()))
        .inc();
    app.metrics.request_duration.observe(started.elapsed().as_secs_f64());
    response
}
