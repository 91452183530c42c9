//! Operational routes: liveness, readiness, metrics, and the request counter middleware.
//! nginx keeps `/readyz` and `/metrics` off the public side; with `PAGEVIEWS_APP_METRICS_LISTEN`
//! they are served on that listener only.

use super::AppState;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::get;
use std::time::{Duration, Instant};

/// `/healthz`, and with `operations` also `/readyz` and `/metrics`: the one list of the
/// operational routes, for the public router and the operators' listener.
pub fn routes(operations: bool) -> Router<AppState> {
    let routes = Router::new().route("/healthz", get(healthz));
    if operations {
        routes.route("/readyz", get(readyz)).route("/metrics", get(metrics))
    } else {
        routes
    }
}

pub async fn healthz() -> &'static str {
    "ok\n"
}

/// How long one answer of the database serves readiness checks and scrapes.
const CHECK_REUSE: Duration = Duration::from_secs(1);

/// What the last database check found, in the app's words (what the database or the pool
/// said goes to the log, never into a response).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum DatabaseState {
    Ok,
    NoConnection,
    QueryFailed,
}

/// The database check behind `/readyz` and `pageviews_database_up`: one query at a time on
/// the request pool, its result reused for `CHECK_REUSE`, so a burst of checks costs the
/// requests one connection for one query, not one each.
#[derive(Default)]
pub struct DatabaseCheck(tokio::sync::Mutex<Option<(Instant, DatabaseState)>>);

impl DatabaseCheck {
    /// Within `PAGEVIEWS_DB_TIMEOUT_MS` (the pool's wait and the statement timeout), plus the
    /// wait for a check already running.
    pub async fn state(&self, pool: &crate::db::Pool) -> DatabaseState {
        let mut last = self.0.lock().await;
        if let Some((at, state)) = *last
            && at.elapsed() < CHECK_REUSE
        {
            return state;
        }
        let state = match crate::db::ping(pool).await {
            Ok(()) => DatabaseState::Ok,
            Err(error) => {
                tracing::warn!(%error, "readiness check: the database did not answer");
                match error {
                    crate::db::DbError::Pool(_) => DatabaseState::NoConnection,
                    crate::db::DbError::Query(_) => DatabaseState::QueryFailed,
                }
            }
        };
        *last = Some((Instant::now(), state));
        state
    }
}

/// Ready when the database answers and the outbox can publish (connected, not blocked by a
/// broker alarm); one line per dependency.
pub async fn readyz(State(app): State<AppState>) -> (StatusCode, String) {
    let database = app.database_check.state(&app.pool).await;
    let broker = app.outbox.status();
    let mut body = String::from(match database {
        DatabaseState::Ok => "database: ok\n",
        DatabaseState::NoConnection => "database: unavailable (no connection)\n",
        DatabaseState::QueryFailed => "database: unavailable (query failed)\n",
    });
    body.push_str(&format!("broker: {broker}\n"));
    let status = if database == DatabaseState::Ok && broker == crate::queue::outbox::BrokerStatus::Ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}

pub async fn metrics(State(app): State<AppState>) -> impl axum::response::IntoResponse {
    app.metrics.broker_connected.set(i64::from(app.outbox.is_connected()));
    // Checked at scrape time: the alert on an unreachable database needs no traffic to fire.
    let database = app.database_check.state(&app.pool).await;
    app.metrics.database_up.set(i64::from(database == DatabaseState::Ok));
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
