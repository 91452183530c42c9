//! The retention job (`PAGEVIEWS_RETENTION_DAYS`): every rollup interval, one worker deletes
//! processed page views older than that many days, a batch at a time, for at most half an
//! interval (so one run never meets the next); what is left waits for the next interval.

use crate::config::{ConfigError, Source};
use crate::db::{self, Pool};
use crate::shutdown::Shutdown;
use std::time::{Duration, Instant};

const NAME: &str = "PAGEVIEWS_RETENTION_DAYS";
/// A hundred years.
const MAX_DAYS: u32 = 36_500;

/// `PAGEVIEWS_RETENTION_DAYS`: unset keeps every page view (deleting is the operator's call).
pub fn days(src: &dyn Source) -> Result<Option<u32>, ConfigError> {
    let Some(raw) = crate::config::optional(src, NAME)? else {
        return Ok(None);
    };
    raw.trim()
        .parse::<u32>()
        .ok()
        .filter(|days| (1..=MAX_DAYS).contains(days))
        .map(Some)
        .ok_or_else(|| {
            ConfigError::new(
                NAME,
                format!("{raw:?} is not a whole number of days from 1 to {MAX_DAYS} (unset keeps every page view)"),
            )
        })
}

/// A run in progress at shutdown stops after its current batch (each batch commits alone).
pub async fn schedule(pool: Pool, days: u32, interval: Duration, stopping: Shutdown) {
    let mut stop = stopping.clone();
    let mut ticker = stopping.ticker(interval);
    while ticker.tick().await {
        let claim = db::run(&pool, async |conn| db::retention::claim(conn, interval).await);
        let claimed = tokio::select! {
            claimed = claim => claimed,
            () = stop.wait() => break,
        };
        match claimed {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!("retention already run by another worker in this interval");
                continue;
            }
            Err(error) => {
                tracing::warn!(%error, "retention: cannot claim the job; trying again next interval");
                continue;
            }
        }
        let until = Instant::now() + interval / 2;
        let mut deleted = 0;
        loop {
            let batch = db::run(&pool, async |conn| {
                db::retention::expire_batch(conn, days, db::retention::BATCH).await
            });
            let outcome = tokio::select! {
                outcome = batch => outcome,
                () = stop.wait() => break,
            };
            match outcome {
                Ok(n) => {
                    deleted += n;
                    if n < i64::from(db::retention::BATCH) || Instant::now() >= until {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, deleted, "retention batch failed; trying again next interval");
                    break;
                }
            }
        }
        if deleted > 0 {
            tracing::info!(deleted, days, "retention: processed page views deleted");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    fn days(value: Option<&str>) -> Result<Option<u32>, String> {
        let src: HashMap<String, String> = value
            .map(|v| (super::NAME.to_owned(), v.to_owned()))
            .into_iter()
            .collect();
        super::days(&src).map_err(|e| e.to_string())
    }

    #[test]
    fn retention_is_off_unless_set_and_bounded() {
        assert_eq!(days(None), Ok(None));
        assert_eq!(days(Some("30")), Ok(Some(30)));
        for bad in ["0", "-1", "36501", "a week"] {
            let error = days(Some(bad)).unwrap_err();
            assert!(
                error.starts_with("PAGEVIEWS_RETENTION_DAYS: ") && error.contains("from 1 to 36500"),
                "{error}"
            );
        }
    }
}
