//! The figures the page shows besides the visitor's own id: the totals and a chart of views per
//! minute, rendered on the server (SVG in the HTML, complete without JavaScript) and served as
//! JSON by `GET /stats` for static/app.js to update the page in place. Both come from
//! [`Figures`], so the page and the JSON cannot disagree, and the script only copies numbers
//! and bar geometry into the DOM (no scaling logic of its own).

use super::PageStats;
use crate::db::rollups::MinuteViews;
use chrono::{DateTime, DurationRound, SecondsFormat, TimeDelta, Utc};
use serde::Serialize;

/// Minutes the chart covers, the current one last.
pub const MINUTES: usize = 60;
/// SVG user units: one slot per minute, the bar inside it; the plot between `TOP` and
/// `BASELINE`, the time labels below.
const SLOT: f64 = 10.0;
const BAR: f64 = 8.0;
const TOP: f64 = 14.0;
const BASELINE: f64 = 124.0;

#[derive(Debug, Serialize)]
pub struct Figures {
    pub recorded: i64,
    pub processed: i64,
    pub pending: i64,
    pub chart: Chart,
    /// When these figures were read from the database (RFC 3339, UTC, whole seconds).
    pub as_of: String,
    /// The last refresh failed: these are the last figures read, older than a refresh.
    pub stale: bool,
}

#[derive(Debug, Serialize)]
pub struct Chart {
    /// The whole chart in one sentence: the SVG's `<desc>`, read by screen readers.
    pub summary: String,
    /// The most views in one minute (the top of the scale, at least 1).
    pub peak: i64,
    pub from: String,
    pub to: String,
    /// One per minute, oldest first.
    pub bars: Vec<Bar>,
}

#[derive(Debug, Serialize)]
pub struct Bar {
    /// `HH:MM`, UTC.
    pub minute: String,
    pub views: i64,
    /// Geometry in SVG user units (attributes, not styles: the CSP allows no inline style).
    pub x: f64,
    pub y: f64,
    pub height: f64,
    /// The bar's tooltip.
    pub label: String,
}

impl Figures {
    /// `now` ends the chart's window: its minute is the last bar. `stale`: the last refresh
    /// failed.
    pub fn new(stats: &PageStats, now: DateTime<Utc>, stale: bool) -> Figures {
        let totals = stats.totals;
        Figures {
            recorded: totals.recorded,
            processed: totals.processed,
            pending: totals.recorded - totals.processed,
            chart: Chart::new(&stats.minutes, now),
            as_of: stats.read_at.to_rfc3339_opts(SecondsFormat::Secs, true),
            stale,
        }
    }

    /// `HH:MM:SS UTC` of `as_of`, for the page.
    pub fn as_of_clock(&self) -> String {
        format!("{} UTC", self.as_of.get(11..19).unwrap_or(&self.as_of))
    }
}

impl Chart {
    /// `minutes`: rollup rows in any order; those outside the window are ignored, minutes
    /// without a row are zero.
    pub fn new(minutes: &[MinuteViews], now: DateTime<Utc>) -> Chart {
        let last = now.duration_trunc(TimeDelta::minutes(1)).unwrap_or(now);
        let first = last - TimeDelta::minutes(MINUTES as i64 - 1);
        let mut views = [0i64; MINUTES];
        for &MinuteViews { minute, views: n } in minutes {
            let index = (minute - first).num_minutes();
            if minute >= first && (0..MINUTES as i64).contains(&index) {
                views[index as usize] = n;
            }
        }
        let peak = views.iter().copied().max().unwrap_or(0).max(1);
        let hhmm = |i: usize| (first + TimeDelta::minutes(i as i64)).format("%H:%M").to_string();
        let bars: Vec<Bar> = views
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let height = round1((BASELINE - TOP) * n as f64 / peak as f64);
                let minute = hhmm(i);
                Bar {
                    label: format!("{minute} UTC: {n} {}", plural(n, "view")),
                    minute,
                    views: n,
                    x: round1(i as f64 * SLOT + (SLOT - BAR) / 2.0),
                    y: round1(BASELINE - height),
                    height,
                }
            })
            .collect();
        let (from, to) = (hhmm(0), format!("{} UTC", hhmm(MINUTES - 1)));
        let total: i64 = views.iter().sum();
        let summary = match bars.iter().max_by_key(|b| b.views) {
            Some(busiest) if total > 0 => format!(
                "{total} {} from {from} to {to}; the busiest minute, {} UTC, had {}.",
                plural(total, "view"),
                busiest.minute,
                busiest.views
            ),
            _ => {
                format!("No views counted from {from} to {to} yet: the worker counts each minute about once a minute.")
            }
        };
        Chart {
            summary,
            peak,
            from,
            to,
            bars,
        }
    }

    /// Minutes with views, newest first: the table under the chart.
    pub fn rows(&self) -> impl Iterator<Item = &Bar> {
        self.bars.iter().rev().filter(|b| b.views > 0)
    }

    /// The geometry the template needs, in SVG user units (the `viewBox` is width × height).
    pub fn width(&self) -> f64 {
        MINUTES as f64 * SLOT
    }

    pub fn height(&self) -> f64 {
        BASELINE + 22.0
    }

    pub fn top(&self) -> f64 {
        TOP
    }

    pub fn baseline(&self) -> f64 {
        BASELINE
    }

    pub fn bar_width(&self) -> f64 {
        BAR
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn plural(n: i64, word: &str) -> String {
    if n == 1 { word.to_owned() } else { format!("{word}s") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(hh: u32, mm: u32, ss: u32) -> DateTime<Utc> {
        use chrono::TimeZone;
        Utc.with_ymd_and_hms(2026, 12, 1, hh, mm, ss).unwrap()
    }

    #[test]
    fn the_window_ends_at_the_current_minute_and_fills_gaps_with_zero() {
        let row = |minute, views| MinuteViews { minute, views };
        let rows = [
            row(at(11, 5, 0), 4),
            row(at(11, 11, 0), 2),
            row(at(10, 11, 0), 99), // 61 minutes before 11:11: outside
            row(at(11, 12, 0), 7),  // in the future (clock skew): outside
        ];
        let chart = Chart::new(&rows, at(11, 11, 42));
        assert_eq!(chart.bars.len(), MINUTES);
        assert_eq!((chart.from.as_str(), chart.to.as_str()), ("10:12", "11:11 UTC"));
        let views: Vec<i64> = chart.bars.iter().map(|b| b.views).collect();
        assert_eq!(views.iter().sum::<i64>(), 6);
        assert_eq!(views[53], 4);
        assert_eq!(views[59], 2);
        assert_eq!(chart.peak, 4);
        assert_eq!(chart.bars[53].height, BASELINE - TOP);
        assert_eq!(chart.bars[59].height, (BASELINE - TOP) / 2.0);
        assert_eq!(chart.bars[59].y + chart.bars[59].height, BASELINE);
        assert_eq!(chart.bars[0].height, 0.0);
        assert_eq!(chart.bars[53].label, "11:05 UTC: 4 views");
        assert_eq!(
            chart.summary,
            "6 views from 10:12 to 11:11 UTC; the busiest minute, 11:05 UTC, had 4."
        );
        let rows: Vec<&str> = chart.rows().map(|b| b.minute.as_str()).collect();
        assert_eq!(rows, ["11:11", "11:05"]);
        // Bars stay inside the view box.
        let last = chart.bars.last().unwrap();
        assert!(last.x + BAR <= chart.width());
    }

    #[test]
    fn an_empty_rollup_says_so() {
        let chart = Chart::new(&[], at(9, 0, 0));
        assert_eq!(chart.peak, 1);
        assert!(chart.bars.iter().all(|b| b.height == 0.0 && b.y == BASELINE));
        assert!(
            chart.summary.starts_with("No views counted from 08:01 to 09:00 UTC"),
            "{}",
            chart.summary
        );
        assert_eq!(chart.rows().count(), 0);
    }
}
