//! PostgreSQL: `DATABASE_URL`, its password file, the pool.

use super::{ConfigError, Secret, Source, as_millis, bounded, password_file, required, with_password};
use serde::Serialize;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// Connections per process unless `PAGEVIEWS_DB_POOL_SIZE` says otherwise.
pub const DEFAULT_DB_POOL_SIZE: u32 = 16;
/// The largest pool: ten times PostgreSQL's default `max_connections`.
const MAX_DB_POOL_SIZE: u64 = 1000;
/// `PAGEVIEWS_DB_TIMEOUT_MS` unless set.
pub const DEFAULT_DB_TIMEOUT_MS: u64 = 1500;
/// Ten minutes: the value is also the app's `statement_timeout`, which PostgreSQL takes up to
/// 2^31-1 ms only.
const MAX_DB_TIMEOUT_MS: u64 = 600_000;

#[derive(Clone, Debug, Serialize)]
pub struct DatabaseConfig {
    /// `DATABASE_URL`, with the password of `PAGEVIEWS_DATABASE_PASSWORD_FILE` in it if set.
    #[serde(rename = "DATABASE_URL", serialize_with = "redacted")]
    pub url: Secret,
    /// The file the password was read from (`PAGEVIEWS_DATABASE_PASSWORD_FILE`), if any.
    #[serde(rename = "PAGEVIEWS_DATABASE_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
    /// Connections per process (`PAGEVIEWS_DB_POOL_SIZE`).
    #[serde(rename = "PAGEVIEWS_DB_POOL_SIZE")]
    pub pool_size: u32,
    /// How long a request waits for a connection before it answers 503, and the statement
    /// timeout (`PAGEVIEWS_DB_TIMEOUT_MS`).
    #[serde(rename = "PAGEVIEWS_DB_TIMEOUT_MS", serialize_with = "as_millis")]
    pub timeout: Duration,
}

/// The URL with its password as `***`; one without a password as it is (the url crate
/// refuses the Unix socket form, `postgres://user@/db?host=…`, which the client takes).
fn redacted<S: serde::Serializer>(url: &Secret, s: S) -> Result<S::Ok, S::Error> {
    let url = url.expose();
    let has_password = tokio_postgres::Config::from_str(url).map_or(true, |c| c.get_password().is_some());
    if has_password {
        s.serialize_str(&super::without_password(url))
    } else {
        s.serialize_str(url)
    }
}

impl DatabaseConfig {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        const NAME: &str = "DATABASE_URL";
        const PASSWORD_FILE: &str = "PAGEVIEWS_DATABASE_PASSWORD_FILE";
        let mut url = required(src, NAME)?;
        let password = password_file(src, PASSWORD_FILE)?;
        if let Some((_, password)) = &password {
            url = with_password(&url, password, NAME, PASSWORD_FILE)?;
        }
        tokio_postgres::Config::from_str(&url)
            .map_err(|e| ConfigError::new(NAME, format!("not a PostgreSQL connection URL: {e}")))?;
        let pool_size = bounded(
            src,
            "PAGEVIEWS_DB_POOL_SIZE",
            DEFAULT_DB_POOL_SIZE.into(),
            "",
            MAX_DB_POOL_SIZE,
            "ten times PostgreSQL's default max_connections",
        )?;
        let timeout_ms = bounded(
            src,
            "PAGEVIEWS_DB_TIMEOUT_MS",
            DEFAULT_DB_TIMEOUT_MS,
            "millisecond",
            MAX_DB_TIMEOUT_MS,
            "ten minutes",
        )?;
        Ok(Self {
            url: Secret(url),
            password_file: password.map(|(path, _)| path),
            pool_size: pool_size as u32,
            timeout: Duration::from_millis(timeout_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{Scratch, env};

    #[test]
    fn the_password_file_goes_into_the_url() {
        let dir = Scratch::new("db-password");
        let file = dir.file("db", b"p@ss word\n");
        let config = DatabaseConfig::from_source(&env(&[
            ("DATABASE_URL", "postgres://pageviews-app@[fd00::3]:5432/pageviews"),
            ("PAGEVIEWS_DATABASE_PASSWORD_FILE", &file),
        ]))
        .unwrap();
        assert_eq!(
            config.url.expose(),
            "postgres://pageviews-app:p%40ss%20word@[fd00::3]:5432/pageviews"
        );
        let shown = serde_json::to_string(&config).unwrap();
        assert!(
            !shown.contains("p%40ss") && shown.contains("pageviews-app:***@"),
            "{shown}"
        );
        assert!(shown.contains(&format!("\"PAGEVIEWS_DATABASE_PASSWORD_FILE\":\"{file}\"")));
    }

    #[test]
    fn urls_without_a_password_file_are_kept_as_given() {
        for url in [
            "postgres://pageviews@/pageviews?host=/run/postgresql",
            "postgres://u:p@h:5432/db",
            "host=/run/postgresql user=pageviews dbname=pageviews",
        ] {
            let config = DatabaseConfig::from_source(&env(&[("DATABASE_URL", url)])).unwrap();
            assert_eq!(config.url.expose(), url);
            let shown = serde_json::to_value(&config).unwrap()["DATABASE_URL"].clone();
            assert_eq!(shown, url.replace(":p@", ":***@"), "{url}");
        }
    }

    #[test]
    fn a_socket_url_cannot_take_a_password_file() {
        let dir = Scratch::new("db-socket");
        let file = dir.file("db", b"pw");
        let err = DatabaseConfig::from_source(&env(&[
            ("DATABASE_URL", "postgres://pageviews@/pageviews?host=/run/postgresql"),
            ("PAGEVIEWS_DATABASE_PASSWORD_FILE", &file),
        ]))
        .unwrap_err();
        assert!(err.to_string().starts_with("DATABASE_URL: "), "{err}");
        assert!(!err.to_string().contains("pw"), "{err}");
    }
}
