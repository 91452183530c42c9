//! Logging: `PAGEVIEWS_LOG_FORMAT` and `RUST_LOG`, read by every binary.

use super::{ConfigError, Source, optional};
use serde::Serialize;
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
    /// Native journal fields (`telemetry`), for systemd units.
    Journald,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
            LogFormat::Journald => "journald",
        }
    }

    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        const NAME: &str = "PAGEVIEWS_LOG_FORMAT";
        match optional(src, NAME)?.as_deref() {
            None => Ok(DEFAULT_LOG_FORMAT),
            Some("text") => Ok(LogFormat::Text),
            Some("json") => Ok(LogFormat::Json),
            Some("journald") => Ok(LogFormat::Journald),
            Some(other) => Err(ConfigError::new(
                NAME,
                format!("{other:?} is not \"text\", \"json\" or \"journald\""),
            )),
        }
    }
}

impl Serialize for LogFormat {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// `PAGEVIEWS_LOG_FORMAT` unless set: readable lines (the units and images set `json`).
pub const DEFAULT_LOG_FORMAT: LogFormat = LogFormat::Text;
/// `RUST_LOG` unless set.
pub const DEFAULT_RUST_LOG: &str = "info";

#[derive(Clone, Debug, Serialize)]
pub struct LogConfig {
    /// Text, one JSON object per line, or native journal entries (`PAGEVIEWS_LOG_FORMAT`).
    #[serde(rename = "PAGEVIEWS_LOG_FORMAT")]
    pub format: LogFormat,
    /// The tracing filter's directives (`RUST_LOG`), checked to parse.
    #[serde(rename = "RUST_LOG")]
    pub filter: String,
}

impl LogConfig {
    /// A filter that does not parse is an error: silently logging at another level would hide
    /// what the operator asked to see.
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        const NAME: &str = "RUST_LOG";
        let format = LogFormat::from_source(src)?;
        let filter = optional(src, NAME)?.unwrap_or_else(|| DEFAULT_RUST_LOG.into());
        parse_filter(&filter).map_err(|e| {
            ConfigError::new(
                NAME,
                format!("{filter:?} is not a log filter (e.g. info,pageviews=debug): {e}"),
            )
        })?;
        Ok(LogConfig { format, filter })
    }

    pub fn env_filter(&self) -> EnvFilter {
        parse_filter(&self.filter).expect("checked in from_source")
    }
}

fn parse_filter(directives: &str) -> Result<EnvFilter, tracing_subscriber::filter::ParseError> {
    EnvFilter::builder().parse(directives)
}
