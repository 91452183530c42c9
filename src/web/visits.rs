//! `GET /visits/{id}`: whether one visit has been processed by the worker, so a visitor (and
//! pageviews-probe) can follow its own page view through the pipeline. It answers only that
//! boolean, never what the row holds; it records no visit.

use super::AppState;
use super::error::AppError;
use crate::db::{self, page_views};
use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct Visit {
    pub id: i64,
    pub processed: bool,
}

/// 200 with [`Visit`], 404 for an id no visit has, 400 for one that is not a number (the
/// answer never repeats the input), 503 while the database is away.
pub async fn show(State(app): State<AppState>, id: Result<Path<String>, PathRejection>) -> Result<Response, AppError> {
    let Some(id) = id.ok().and_then(|Path(id)| id.parse::<i64>().ok()) else {
        return Ok((StatusCode::BAD_REQUEST, "a visit id is a whole number\n").into_response());
    };
    let processed = db::with_connection(&app.pool, async |conn| page_views::is_processed(conn, id).await).await?;
    let cache = [(header::CACHE_CONTROL, "no-store")];
    Ok(match processed {
        Some(processed) => (cache, Json(Visit { id, processed })).into_response(),
        None => (StatusCode::NOT_FOUND, cache, format!("no visit #{id}\n")).into_response(),
    })
}
