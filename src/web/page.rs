//! `GET /`: record the page view, hand its task to the publisher, show the pipeline's figures.

use super::AppState;
use super::error::AppError;
use super::request_id;
use super::stats::{self, Figures};
use crate::db::{self, Pool, page_views::Totals};
use askama::Template;
use axum::extract::State;
use axum::http::{HeaderMap, Method, header};
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, Utc};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Changes whenever a file in static/ changes (computed by build.rs), so nginx can let
/// browsers cache `/static/` for a year.
pub const STATIC_VERSION: &str = env!("PAGEVIEWS_STATIC_VERSION");
const MAX_USER_AGENT: usize = 512;
const MAX_COOKIE_NAMES: usize = 32;
const MAX_COOKIE_NAME: usize = 64;
pub const STATS_TTL: Duration = Duration::from_secs(1);

#[derive(Template)]
#[template(path = "index.html")]
struct IndexPage<'a> {
    page_view_id: i64,
    /// [`FiguresPart`] rendered; `None` when the figures could not be read and none were
    /// read before.
    figures: Option<Arc<str>>,
    static_version: &'a str,
}

#[derive(Template)]
#[template(path = "figures.html")]
struct FiguresPart<'a> {
    figures: &'a Figures,
}

/// [`FiguresPart`] as rendered for one refresh and minute (the chart's window moves each
/// minute): every page view in between reuses it. Rendering it per page view (the chart's
/// numbers and labels formatted) was about a sixth of the app's CPU at 32 connections.
struct Rendered {
    stats: Arc<PageStats>,
    stale: bool,
    minute: i64,
    html: Arc<str>,
}

/// What the page shows besides the visitor's own id.
#[derive(Default)]
pub struct PageStats {
    pub totals: Totals,
    /// Rollup rows (minute, views), enough to cover the chart.
    pub minutes: Vec<(DateTime<Utc>, i64)>,
    /// When they were read.
    pub read_at: DateTime<Utc>,
}

/// The last refresh: when it was tried, whether it worked, the newest figures read.
#[derive(Clone, Default)]
pub struct Latest {
    tried: Option<Instant>,
    pub failed: bool,
    pub stats: Option<Arc<PageStats>>,
}

/// The figures, refreshed by one request at a time while the others show the previous ones:
/// holding every request while one counts the table made a latency spike each second. A
/// failed refresh never fails the request (its page view is already stored, a 503 would make
/// clients store it again): the page shows the last figures, or none.
#[derive(Default)]
pub struct StatsCache {
    latest: std::sync::Mutex<Latest>,
    refreshing: tokio::sync::Mutex<()>,
    rendered: std::sync::Mutex<Option<Rendered>>,
}

impl StatsCache {
    fn latest(&self) -> Latest {
        self.latest.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub async fn get(&self, pool: &Pool) -> Latest {
        let latest = self.latest();
        if latest.tried.is_some_and(|at| at.elapsed() < STATS_TTL) {
            return latest;
        }
        let _refreshing = match self.refreshing.try_lock() {
            Ok(guard) => guard,
            Err(_) if latest.tried.is_some() => return latest,
            // Nothing to show yet: wait for the first refresh and show what it found.
            Err(_) => {
                let _done = self.refreshing.lock().await;
                return self.latest();
            }
        };
        let refreshed = match Self::read(pool).await {
            Ok(stats) => Latest {
                tried: Some(Instant::now()),
                failed: false,
                stats: Some(Arc::new(stats)),
            },
            Err(error) => {
                tracing::warn!(%error, "cannot refresh the page's figures; showing the last ones");
                Latest {
                    tried: Some(Instant::now()),
                    failed: true,
                    stats: latest.stats,
                }
            }
        };
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = refreshed.clone();
        refreshed
    }

    /// The figures part of the page for `latest` at `now`, rendered at most once per refresh
    /// and minute; `None` when there are no figures.
    fn html(&self, latest: &Latest, now: DateTime<Utc>) -> Result<Option<Arc<str>>, askama::Error> {
        let Some(stats) = &latest.stats else {
            return Ok(None);
        };
        let minute = now.timestamp().div_euclid(60);
        let cached = self.rendered.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = cached.as_ref()
            && Arc::ptr_eq(&r.stats, stats)
            && r.stale == latest.failed
            && r.minute == minute
        {
            return Ok(Some(r.html.clone()));
        }
        drop(cached);
        let html: Arc<str> = FiguresPart {
            figures: &Figures::new(stats, now, latest.failed),
        }
        .render()?
        .into();
        *self.rendered.lock().unwrap_or_else(|e| e.into_inner()) = Some(Rendered {
            stats: stats.clone(),
            stale: latest.failed,
            minute,
            html: html.clone(),
        });
        Ok(Some(html))
    }

    async fn read(pool: &Pool) -> Result<PageStats, AppError> {
        let mut conn = pool.get().await?;
        let totals = db::page_views::totals(&mut conn).await?;
        let minutes = db::rollups::recent(&mut conn, stats::MINUTES as i64).await?;
        Ok(PageStats {
            totals,
            minutes,
            read_at: Utc::now(),
        })
    }
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
    fn the_figures_are_rendered_once_per_refresh_and_minute() {
        let cache = StatsCache::default();
        let now = DateTime::parse_from_rfc3339("2026-12-01T10:00:05Z").unwrap().to_utc();
        let latest = |recorded| Latest {
            tried: Some(Instant::now()),
            failed: false,
            stats: Some(Arc::new(PageStats {
                totals: Totals { recorded, processed: 0 },
                minutes: vec![],
                read_at: now,
            })),
        };
        let first = latest(7);
        let html = cache.html(&first, now).unwrap().unwrap();
        assert!(html.contains(r#"<dd id="recorded">7</dd>"#), "{html}");
        let later = now + chrono::TimeDelta::seconds(50);
        assert!(Arc::ptr_eq(&html, &cache.html(&first, later).unwrap().unwrap()));
        let next_minute = cache
            .html(&first, now + chrono::TimeDelta::seconds(60))
            .unwrap()
            .unwrap();
        assert!(!Arc::ptr_eq(&html, &next_minute));
        assert!(next_minute.contains("10:01"), "the chart ends at the new minute");
        let refreshed = cache.html(&latest(8), later).unwrap().unwrap();
        assert!(refreshed.contains(r#"<dd id="recorded">8</dd>"#), "{refreshed}");
        let stale = Latest {
            failed: true,
            ..latest(8)
        };
        assert!(
            cache
                .html(&stale, later)
                .unwrap()
                .unwrap()
                .contains("could not be refreshed")
        );
        assert!(cache.html(&Latest::default(), later).unwrap().is_none());
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
