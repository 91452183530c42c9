//! `GET /`: record the page view, hand its task to the publisher, show the pipeline's figures
//! (from `stats`, which knows nothing of the page).

use super::AppState;
use super::error::AppError;
use super::request_id;
use askama::Template;
use axum::extract::State;
use axum::http::{HeaderMap, Method, header};
use axum::response::{Html, IntoResponse, Response};
use chrono::Utc;
use std::collections::BTreeSet;
use std::sync::Arc;

/// Changes whenever a file in static/ changes (computed by build.rs), so nginx can let
/// browsers cache `/static/` for a year.
pub const STATIC_VERSION: &str = env!("PAGEVIEWS_STATIC_VERSION");
const MAX_USER_AGENT: usize = 512;
const MAX_COOKIE_NAMES: usize = 32;
const MAX_COOKIE_NAME: usize = 64;

#[derive(Template)]
#[template(path = "index.html")]
struct IndexPage<'a> {
    page_view_id: i64,
    /// The figures part, rendered (`stats::StatsCache::html`); `None` when the figures could
    /// not be read and none were read before.
    figures: Option<Arc<str>>,
    static_version: &'a str,
}

pub async fn show(State(app): State<AppState>, method: Method, headers: HeaderMap) -> Result<Response, AppError> {
    // HEAD must not record a visit: it is a check, not a view.
    if method == Method::HEAD {
        return Ok(([(header::CONTENT_TYPE, "text/html; charset=utf-8")], "").into_response());
    }
    let page_view_id = app.batcher.insert(visit_data(&headers)).await?;
    // From here on the row is stored: nothing may turn this into an error page.
    let latest = app.page_stats.get(&app.pool).await;
    let page = IndexPage {
        page_view_id,
        figures: app.page_stats.html(&latest, Utc::now())?,
        static_version: STATIC_VERSION,
    };
    Ok(([(header::CACHE_CONTROL, "no-store")], Html(page.render()?)).into_response())
}

/// What we keep of a visit. Cookie *values* are never stored: they can be session secrets.
pub fn visit_data(headers: &HeaderMap) -> serde_json::Value {
    let user_agent: String = headers
        .get(header::USER_AGENT)
        .map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .chars()
                .take(MAX_USER_AGENT)
                .collect()
        })
        .unwrap_or_default();
    let cookie_names: BTreeSet<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(';'))
        .filter_map(|pair| pair.split('=').next())
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(|name| name.chars().take(MAX_COOKIE_NAME).collect())
        .take(MAX_COOKIE_NAMES)
        .collect();
    serde_json::json!({
        "user_agent": user_agent,
        "cookie_names": cookie_names,
        "request_id": request_id::of(headers),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_values_are_never_kept() {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, "session=s3cr3t; theme=dark".parse().unwrap());
        headers.append(header::COOKIE, "csrftoken=abc".parse().unwrap());
        headers.insert(header::USER_AGENT, "curl/8".parse().unwrap());
        let data = visit_data(&headers);
        assert_eq!(
            data["cookie_names"],
            serde_json::json!(["csrftoken", "session", "theme"])
        );
        assert_eq!(data["user_agent"], "curl/8");
        let text = data.to_string();
        assert!(
            !text.contains("s3cr3t") && !text.contains("dark") && !text.contains("abc"),
            "{text}"
        );
    }

    #[test]
    fn oversized_user_agents_are_cut() {
        let mut headers = HeaderMap::new();
        headers.insert(header::USER_AGENT, "x".repeat(5000).parse().unwrap());
        assert_eq!(
            visit_data(&headers)["user_agent"].as_str().unwrap().len(),
            MAX_USER_AGENT
        );
    }
}
