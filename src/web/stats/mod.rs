//! The page's figures and their cache: read from the database at most once per [`STATS_TTL`]
//! for all requests, rendered as the page's figures part at most once per refresh and minute,
//! and served as JSON by `GET /stats`. The page uses this module; it uses nothing of the page.

mod figures;

pub use figures::{Figures, MINUTES};

use super::AppState;
use super::error::AppError;
use crate::db::rollups::MinuteViews;
use crate::db::{self, Pool, page_views::Totals};
use askama::Template;
use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the figures read serve every request.
pub const STATS_TTL: Duration = Duration::from_secs(1);

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
    /// Rollup rows, enough to cover the chart.
    pub minutes: Vec<MinuteViews>,
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
    pub fn html(&self, latest: &Latest, now: DateTime<Utc>) -> Result<Option<Arc<str>>, askama::Error> {
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
        let minutes = db::rollups::recent(&mut conn, MINUTES as i64).await?;
        Ok(PageStats {
            totals,
            minutes,
            read_at: Utc::now(),
        })
    }
}

/// `GET /stats`: the figures as JSON, recording no visit. Cacheable for as long as the app
/// keeps its own copy, so nginx (which honours this header) asks at most once a second. When
/// the last refresh failed: the last figures read, `"stale": true`, and not cacheable (they
/// are not fresh for another second); 503 when none were ever read.
pub async fn show(State(app): State<AppState>) -> Result<Response, AppError> {
    let latest = app.page_stats.get(&app.pool).await;
    let stats = latest.stats.ok_or(AppError::FiguresUnavailable)?;
    let cache_control = if latest.failed {
        "no-store".to_owned()
    } else {
        format!("public, max-age={}", STATS_TTL.as_secs())
    };
    Ok((
        [(header::CACHE_CONTROL, cache_control)],
        Json(Figures::new(&stats, Utc::now(), latest.failed)),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
