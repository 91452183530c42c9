//! `pageviews-worker`: prefetch, the rollup's interval, its metrics listener, and the database
//! and broker.

use super::{BrokerConfig, ConfigError, DatabaseConfig, Listen, Source, as_secs, interval_secs, parsed, watchdog};
use serde::Serialize;
use std::time::Duration;

/// Deliveries the worker takes per database transaction unless `PAGEVIEWS_PREFETCH` says
/// otherwise.
pub const DEFAULT_PREFETCH: u16 = 100;
/// `PAGEVIEWS_ROLLUP_INTERVAL_SECS` unless set.
pub const DEFAULT_ROLLUP_INTERVAL_SECS: u64 = 60;

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
        })
    }
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
}
