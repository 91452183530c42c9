//! `pageviews-app`: where it listens, the outbox's sweep, and the database and broker.

use super::{BrokerConfig, ConfigError, DatabaseConfig, Listen, Source, as_secs, interval_secs, watchdog};
use serde::Serialize;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

/// Where the app listens unless `PAGEVIEWS_LISTEN` (or a passed socket) says otherwise.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 8000);
/// `PAGEVIEWS_SWEEP_INTERVAL_SECS` unless set.
pub const DEFAULT_SWEEP_INTERVAL_SECS: u64 = 10;

/// The outbox's sweep, from `PAGEVIEWS_SWEEP_INTERVAL_SECS`.
#[derive(Clone, Debug, Serialize)]
pub struct Sweep {
    /// How often the sweep looks for unprocessed rows (`PAGEVIEWS_SWEEP_INTERVAL_SECS`).
    #[serde(rename = "PAGEVIEWS_SWEEP_INTERVAL_SECS", serialize_with = "as_secs")]
    pub interval: Duration,
    /// How long a row must have stayed unprocessed for the sweep to offer it again (while the
    /// task queue holds no ready message): one interval, so a row the previous pass found
    /// young is old enough at the next. Derived, not a variable of its own.
    #[serde(skip)]
    pub republish_after: Duration,
}

impl Sweep {
    pub fn every(interval: Duration) -> Sweep {
        Sweep {
            interval,
            republish_after: interval,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct AppConfig {
    /// Where the app serves HTTP (`PAGEVIEWS_LISTEN`, or the socket passed in `LISTEN_FDS`).
    #[serde(rename = "PAGEVIEWS_LISTEN")]
    pub listen: Listen,
    /// PostgreSQL.
    #[serde(flatten)]
    pub database: DatabaseConfig,
    /// RabbitMQ.
    #[serde(flatten)]
    pub broker: BrokerConfig,
    /// The sweep that offers rows the broker never confirmed (or lost) again.
    #[serde(flatten)]
    pub sweep: Sweep,
    /// A second listener with only `/metrics`, `/healthz`, `/readyz`
    /// (`PAGEVIEWS_APP_METRICS_LISTEN`): for Prometheus when the app itself listens on a Unix
    /// socket that only nginx reaches.
    #[serde(rename = "PAGEVIEWS_APP_METRICS_LISTEN")]
    pub metrics_listen: Option<Listen>,
}

impl AppConfig {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        let configured = Listen::from_source(src, "PAGEVIEWS_LISTEN")?;
        watchdog(src)?;
        Ok(Self {
            listen: match inherited_socket()? {
                Some(fd) => Listen::Inherited(fd),
                None => configured.unwrap_or(Listen::Tcp(DEFAULT_LISTEN)),
            },
            database: DatabaseConfig::from_source(src)?,
            broker: BrokerConfig::from_source(src)?,
            sweep: Sweep::every(interval_secs(
                src,
                "PAGEVIEWS_SWEEP_INTERVAL_SECS",
                DEFAULT_SWEEP_INTERVAL_SECS,
            )?),
            metrics_listen: Listen::from_source(src, "PAGEVIEWS_APP_METRICS_LISTEN")?,
        })
    }
}

/// The listening socket a service manager passed, if any (sd_listen_fds(3): `LISTEN_PID` names
/// this process and `LISTEN_FDS` counts the sockets from fd 3). Read from the process
/// environment by the `sd-notify` crate, which also marks the descriptor close-on-exec.
fn inherited_socket() -> Result<Option<std::os::fd::RawFd>, ConfigError> {
    const NAME: &str = "LISTEN_FDS";
    let mut fds = sd_notify::listen_fds().map_err(|e| {
        let var = |name| std::env::var(name).unwrap_or_default();
        ConfigError::new(
            NAME,
            format!(
                "socket activation: {e} (LISTEN_FDS={:?}, LISTEN_PID={:?}; both must be whole numbers)",
                var("LISTEN_FDS"),
                var("LISTEN_PID")
            ),
        )
    })?;
    match fds.len() {
        0 => Ok(None),
        1 => Ok(fds.next()),
        n => Err(ConfigError::new(
            NAME,
            format!("{n} sockets were passed; pageviews-app listens on exactly one"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::env;
    use crate::config::{DEFAULT_DB_POOL_SIZE, DEFAULT_QUEUE_TYPE};

    fn app_error(pairs: &[(&str, &str)]) -> String {
        AppConfig::from_source(&env(pairs)).unwrap_err().to_string()
    }

    #[test]
    fn defaults_apply_when_only_urls_are_set() {
        let config = AppConfig::from_source(&env(&[])).unwrap();
        assert_eq!(config.listen, Listen::Tcp("127.0.0.1:8000".parse().unwrap()));
        assert_eq!(config.database.pool_size, DEFAULT_DB_POOL_SIZE);
        assert_eq!(config.sweep.interval, Duration::from_secs(10));
        assert_eq!(config.sweep.republish_after, Duration::from_secs(10));
        assert_eq!(config.metrics_listen, None);
        assert_eq!(config.broker.queue_type, DEFAULT_QUEUE_TYPE);
    }

    #[test]
    fn the_app_metrics_listener_is_its_own_variable() {
        let config = AppConfig::from_source(&env(&[("PAGEVIEWS_APP_METRICS_LISTEN", "127.0.0.1:9102")])).unwrap();
        assert_eq!(
            config.metrics_listen,
            Some(Listen::Tcp("127.0.0.1:9102".parse().unwrap()))
        );
        let error = app_error(&[("PAGEVIEWS_APP_METRICS_LISTEN", "9102")]);
        assert!(error.starts_with("PAGEVIEWS_APP_METRICS_LISTEN: "), "{error}");
    }

    #[test]
    fn listen_accepts_a_socket_path() {
        let config = AppConfig::from_source(&env(&[("PAGEVIEWS_LISTEN", "/run/pageviews/app.sock")])).unwrap();
        assert_eq!(config.listen, Listen::Unix("/run/pageviews/app.sock".into()));
        let shown = serde_json::to_value(&config).unwrap();
        assert_eq!(shown["PAGEVIEWS_LISTEN"], "/run/pageviews/app.sock");
    }

    #[test]
    fn errors_name_the_variable_and_the_problem() {
        assert_eq!(
            app_error(&[("DATABASE_URL", "")]),
            "DATABASE_URL: is required but not set"
        );
        assert!(
            app_error(&[("PAGEVIEWS_LISTEN", "localhost")]).starts_with("PAGEVIEWS_LISTEN: \"localhost\" is neither")
        );
        assert!(
            app_error(&[("DATABASE_URL", "postgres://x:y@h:notaport/db")])
                .starts_with("DATABASE_URL: not a PostgreSQL")
        );
        assert_eq!(
            app_error(&[("PAGEVIEWS_DB_POOL_SIZE", "many")]),
            "PAGEVIEWS_DB_POOL_SIZE: \"many\" is not a whole number"
        );
        assert_eq!(
            app_error(&[("PAGEVIEWS_SWEEP_INTERVAL_SECS", "0")]),
            "PAGEVIEWS_SWEEP_INTERVAL_SECS: must be at least 1 second"
        );
    }
}
