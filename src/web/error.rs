//! The one error type of the request path: anything that goes wrong while serving a page is a
//! dependency being unavailable, answered with 503 and a plain page. Turning it into the
//! answer logs nothing: the answer carries a [`Failure`], which [`log_failures`] (a middleware
//! inside the request's span) logs once.

use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    #[error("template failed: {0}")]
    Template(#[from] askama::Error),
    /// The failure of a batched INSERT, shared by every request in the batch.
    #[error(transparent)]
    Batch(std::sync::Arc<AppError>),
    #[error("the app is stopping")]
    Stopping,
    #[error("too many page views waiting for the database")]
    Busy,
    /// The request's `PAGEVIEWS_DB_TIMEOUT_MS` passed before its row was stored (none is).
    #[error("database unavailable: no answer within PAGEVIEWS_DB_TIMEOUT_MS")]
    DeadlinePassed,
    /// A page view's COMMIT was sent and its outcome never came back: the row may exist, so the
    /// answer must not invite a retry (which could store it twice).
    #[error("the page view may or may not be stored: {0}")]
    OutcomeUnknown(String),
    /// `/stats` before any figures could be read.
    #[error("the figures could not be read yet")]
    FiguresUnavailable,
}

impl From<diesel_async::pooled_connection::bb8::RunError> for AppError {
    fn from(e: diesel_async::pooled_connection::bb8::RunError) -> Self {
        AppError::Db(e.into())
    }
}

impl From<diesel::result::Error> for AppError {
    fn from(e: diesel::result::Error) -> Self {
        AppError::Db(e.into())
    }
}

impl AppError {
    fn outcome_unknown(&self) -> bool {
        match self {
            AppError::OutcomeUnknown(_) => true,
            AppError::Batch(e) => e.outcome_unknown(),
            _ => false,
        }
    }
}

/// What failed, attached to the answer for [`log_failures`].
#[derive(Clone, Debug)]
pub struct Failure {
    /// The error's text (it never holds a secret: no URL, no credential).
    error: String,
    /// The page view may have been stored (`AppError::OutcomeUnknown`).
    outcome_unknown: bool,
}

/// Logs the failure an answer carries, once per request, and takes it off the answer.
pub async fn log_failures(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    if let Some(failure) = response.extensions_mut().remove::<Failure>() {
        let error = failure.error;
        if failure.outcome_unknown {
            tracing::error!(%error, "request failed; its page view may have been stored");
        } else {
            tracing::error!(%error, "request failed");
        }
    }
    response
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let failure = Failure {
            error: self.to_string(),
            outcome_unknown: self.outcome_unknown(),
        };
        let mut response = self.answer();
        response.extensions_mut().insert(failure);
        response
    }
}

impl AppError {
    /// The answer, without logging.
    fn answer(&self) -> Response {
        if self.outcome_unknown() {
            let page = Html(
                "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Error</title></head>\
                 <body><h1>Something went wrong</h1><p>Your visit may have been recorded; \
                 loading the page again may record it twice.</p></body></html>\n",
            );
            return (StatusCode::INTERNAL_SERVER_ERROR, page).into_response();
        }
        let page = Html(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Unavailable</title></head>\
             <body><h1>Temporarily unavailable</h1><p>Please try again in a few seconds.</p></body></html>\n",
        );
        (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "5")], page).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::routing::get;
    use std::sync::{Arc, Mutex};
    use tower::ServiceExt;

    /// The log lines written while it is the default subscriber.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_failure_is_logged_once_by_the_middleware_and_not_by_the_answer() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _default = tracing::subscriber::set_default(subscriber);
        let lines = || String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();

        let answer = AppError::Busy.into_response();
        assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(lines(), "", "turning an error into an answer logs nothing");

        let app = Router::new()
            .route("/", get(|| async { Err::<(), _>(AppError::Busy) }))
            .route(
                "/unknown",
                get(|| async { Err::<(), _>(AppError::OutcomeUnknown("no answer to COMMIT".into())) }),
            )
            .layer(axum::middleware::from_fn(log_failures));
        let request = |path| axum::http::Request::get(path).body(axum::body::Body::empty()).unwrap();
        let response = app.clone().oneshot(request("/")).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(response.extensions().get::<Failure>().is_none());
        let response = app.oneshot(request("/unknown")).await.unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let text = lines();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(
            text.contains("request failed error=too many page views waiting for the database"),
            "{text}"
        );
        assert!(
            text.contains("request failed; its page view may have been stored error=the page view may or may not be stored: no answer to COMMIT"),
            "{text}"
        );
    }
}
