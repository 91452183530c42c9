//! `pageviews-worker`: prefetch, the rollup's interval, its metrics listener, and the database
//! and broker.

use super::{
    BrokerConfig, ConfigError, DatabaseConfig, Listen, Source, as_secs, interval_secs, optional, parsed, watchdog,
};
use serde::Serialize;
use std::time::Duration;

/// Deliveries the worker takes per database transaction unless `PAGEVIEWS_PREFETCH` says
/// otherwise.
pub const DEFAULT_PREFETCH: u16 = 100;
/// `PAGEVIEWS_ROLLUP_INTERVAL_SECS` unless set.
pub const DEFAULT_ROLLUP_INTERVAL_SECS: u64 = 60;
/// The longest `PAGEVIEWS_RETENTION_DAYS`: a hundred years.
pub const MAX_RETENTION_DAYS: u32 = 36_500;

#[derive(Clone, Debug, Serialize)]
pub struct WorkerConfig {
    /// PostgreSQL.
    #[serde(flatten)]
    pub database: DatabaseConfig,
    /// RabbitMQ.
    #[serde(flatten)]
    pub broker: BrokerConfig,
    /// Unacknowledged deliveries, and so the largest batch (`PAGEVIEWS_PREFETCH`).
    #[serde(rename = "PAGEVIEWS_PREFETCH")]
    pub prefetch: u16,
    /// How often the rollup runs, and its statement timeout (`PAGEVIEWS_ROLLUP_INTERVAL_SECS`).
    #[serde(rename = "PAGEVIEWS_ROLLUP_INTERVAL_SECS", serialize_with = "as_secs")]
    pub rollup_interval: Duration,
    /// Where `/metrics` and `/healthz` are served, if anywhere (`PAGEVIEWS_METRICS_LISTEN`).
    #[serde(rename = "PAGEVIEWS_METRICS_LISTEN")]
    pub metrics_listen: Option<Listen>,
    /// Processed page views older than this many days are deleted; unset keeps every one
    /// (deleting is the operator's call) (`PAGEVIEWS_RETENTION_DAYS`).
    #[serde(rename = "PAGEVIEWS_RETENTION_DAYS")]
    pub retention_days: Option<u32>,
}

impl WorkerConfig {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        let prefetch = parsed(
            src,
            "PAGEVIEWS_PREFETCH",
            DEFAULT_PREFETCH,
            "a whole number from 1 to 65535",
        )?;
        if prefetch == 0 {
            return Err(ConfigError::new(
                "PAGEVIEWS_PREFETCH",
                "must be at least 1 (0 would mean unlimited)",
            ));
        }
        watchdog(src)?;
        Ok(Self {
            database: DatabaseConfig::from_source(src)?,
            broker: BrokerConfig::from_source(src)?,
            prefetch,
            rollup_interval: interval_secs(src, "PAGEVIEWS_ROLLUP_INTERVAL_SECS", DEFAULT_ROLLUP_INTERVAL_SECS)?,
            metrics_listen: Listen::from_source(src, "PAGEVIEWS_METRICS_LISTEN")?,
            retention_days: retention_days(src)?,
        })
    }
}

fn retention_days(src: &dyn Source) -> Result<Option<u32>, ConfigError> {
    const NAME: &str = "PAGEVIEWS_RETENTION_DAYS";
    let Some(raw) = optional(src, NAME)? else {
        return Ok(None);
    };
    raw.trim()
        .parse::<u32>()
        .ok()
        .filter(|days| (1..=MAX_RETENTION_DAYS).contains(days))
        .map(Some)
        .ok_or_else(|| {
            ConfigError::new(
                NAME,
                format!(
                    "{raw:?} is not a whole number of days from 1 to {MAX_RETENTION_DAYS} (unset keeps every page view)"
                ),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::env;

    #[test]
    fn prefetch_zero_is_refused() {
        let worker = WorkerConfig::from_source(&env(&[("PAGEVIEWS_PREFETCH", "0")])).unwrap_err();
        assert!(worker.to_string().starts_with("PAGEVIEWS_PREFETCH: must be at least 1"));
    }

    #[test]
    fn retention_is_off_unless_set_and_bounded() {
        let days = |value: &str| WorkerConfig::from_source(&env(&[("PAGEVIEWS_RETENTION_DAYS", value)]));
        assert_eq!(retention_days(&env(&[])).unwrap(), None);
        assert_eq!(
            retention_days(&env(&[("PAGEVIEWS_RETENTION_DAYS", "30")])).unwrap(),
            Some(30)
        );
        for bad in ["0", "-1", "36501", "a week"] {
            let error = days(bad).unwrap_err().to_string();
            assert!(
                error.starts_with("PAGEVIEWS_RETENTION_DAYS: ") && error.contains("from 1 to 36500"),
                "{error}"
            );
        }
    }
}
