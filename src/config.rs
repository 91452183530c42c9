//! Configuration from environment variables. Every variable may instead be given as
//! `NAME_FILE=/path` (for secrets: systemd credentials, container secrets); setting both is an
//! error. Errors name the variable and say what was wrong.
//!
//! | variable | used by | default |
//! |---|---|---|
//! | `DATABASE_URL` | app, worker, migrate | required |
//! | `AMQP_URL` | app, worker | required (one URL, or several comma-separated) |
//! | `PAGEVIEWS_QUEUE_TYPE` | app, worker | `quorum` |
//! | `PAGEVIEWS_LISTEN` | app | `127.0.0.1:8000`; unused when a socket is passed (`LISTEN_FDS`) |
//! | `PAGEVIEWS_METRICS_LISTEN` | worker | unset (no metrics listener) |
//! | `PAGEVIEWS_APP_METRICS_LISTEN` | app | unset (no second listener) |
//! | `PAGEVIEWS_LOG_FORMAT` | all | `text` |
//! | `PAGEVIEWS_DB_POOL_SIZE` | app, worker | 16 |
//! | `PAGEVIEWS_DB_TIMEOUT_MS` | app, worker | 1500 |
//! | `PAGEVIEWS_SWEEP_INTERVAL_SECS` | app | 10 |
//! | `PAGEVIEWS_PREFETCH` | worker | 100 |
//! | `PAGEVIEWS_ROLLUP_INTERVAL_SECS` | worker | 60 |

use crate::queue::QueueType;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// A setting that could not be used: which variable, and what was wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{variable}: {problem}")]
pub struct ConfigError {
    pub variable: String,
    pub problem: String,
}

impl ConfigError {
    pub fn new(variable: &str, problem: impl Into<String>) -> Self {
        Self {
            variable: variable.to_owned(),
            problem: problem.into(),
        }
    }
}

/// Where settings come from: the process environment, or a map in tests.
pub trait Source {
    fn get(&self, name: &str) -> Result<Option<String>, ConfigError>;
}

/// The process environment.
pub struct Environment;

impl Source for Environment {
    fn get(&self, name: &str) -> Result<Option<String>, ConfigError> {
        match std::env::var_os(name).map(std::ffi::OsString::into_string) {
            None => Ok(None),
            Some(Ok(value)) => Ok(Some(value)),
            // Never replaced by U+FFFD: a password changed that way would fail much later.
            Some(Err(_)) => Err(ConfigError::new(name, "is not valid UTF-8")),
        }
    }
}

impl Source for std::collections::HashMap<String, String> {
    fn get(&self, name: &str) -> Result<Option<String>, ConfigError> {
        Ok(std::collections::HashMap::get(self, name).cloned())
    }
}

/// No setting has a control character in it: a `\r` left by a CRLF file, or a second line,
/// would otherwise end up inside a password or URL.
fn checked(variable: &str, value: String, origin: &str) -> Result<String, ConfigError> {
    match value.char_indices().find(|(_, c)| c.is_control()) {
        None => Ok(value),
        Some((_, '\r')) => Err(ConfigError::new(
            variable,
            format!("{origin} contains a carriage return (\\r): Windows (CRLF) line endings? Save it with plain \\n"),
        )),
        Some((at, c)) => Err(ConfigError::new(
            variable,
            format!("{origin} contains the control character {c:?} at byte {at}"),
        )),
    }
}

/// `NAME`, or the contents of the file named by `NAME_FILE` (one trailing newline removed).
pub fn optional(src: &dyn Source, name: &str) -> Result<Option<String>, ConfigError> {
    let file_var = format!("{name}_FILE");
    match (src.get(name)?, src.get(&file_var)?) {
        (Some(_), Some(_)) => Err(ConfigError::new(
            name,
            format!("both {name} and {file_var} are set; set one"),
        )),
        (Some(value), None) if value.is_empty() => Err(ConfigError::new(name, "is set but empty")),
        (Some(value), None) => checked(name, value, "the value").map(Some),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| ConfigError::new(&file_var, format!("cannot read {path}: {e}")))?;
            let value = text.strip_suffix('\n').unwrap_or(&text).to_owned();
            if value.is_empty() {
                return Err(ConfigError::new(&file_var, format!("{path} is empty")));
            }
            checked(&file_var, value, &path).map(Some)
        }
        (None, None) => Ok(None),
    }
}

pub fn required(src: &dyn Source, name: &str) -> Result<String, ConfigError> {
    optional(src, name)?.ok_or_else(|| ConfigError::new(name, "is required but not set"))
}

/// A parsed setting with a default; the error quotes the bad value and the expected form.
pub fn parsed<T: FromStr>(src: &dyn Source, name: &str, default: T, expected: &str) -> Result<T, ConfigError> {
    match optional(src, name)? {
        None => Ok(default),
        Some(raw) => raw
            .trim()
            .parse()
            .map_err(|_| ConfigError::new(name, format!("{raw:?} is not {expected}"))),
    }
}

/// A whole number of `unit`s ("" for a count) from 1 to `max`; `max_meaning` says what `max`
/// is, for the error.
fn bounded(
    src: &dyn Source,
    name: &str,
    default: u64,
    unit: &str,
    max: u64,
    max_meaning: &str,
) -> Result<u64, ConfigError> {
    let expected = if unit.is_empty() {
        "a whole number".to_owned()
    } else {
        format!("a whole number of {unit}s")
    };
    let least = if unit.is_empty() {
        String::new()
    } else {
        format!(" {unit}")
    };
    match parsed(src, name, default, &expected)? {
        0 => Err(ConfigError::new(name, format!("must be at least 1{least}"))),
        n if n > max => Err(ConfigError::new(
            name,
            format!("{n} is more than {max} ({max_meaning})"),
        )),
        n => Ok(n),
    }
}

/// The longest interval a `*_SECS` setting takes: a day.
const MAX_INTERVAL_SECS: u64 = 86_400;

fn interval_secs(src: &dyn Source, name: &str, default: u64) -> Result<Duration, ConfigError> {
    bounded(src, name, default, "second", MAX_INTERVAL_SECS, "a day").map(Duration::from_secs)
}

/// `WATCHDOG_USEC` as systemd passes it (sd_watchdog_enabled(3)): how often the service
/// manager wants to hear from the process, `None` when unset, 0, or meant for another
/// process (`WATCHDOG_PID`). A value that is not a number is an error: ignoring it would
/// mean no pings, and the manager killing the process.
pub fn watchdog(src: &dyn Source) -> Result<Option<Duration>, ConfigError> {
    const NAME: &str = "WATCHDOG_USEC";
    let Some(usec) = optional(src, NAME)? else {
        return Ok(None);
    };
    let usec: u64 = usec
        .parse()
        .map_err(|_| ConfigError::new(NAME, format!("{usec:?} is not a whole number of microseconds")))?;
    let for_us = match optional(src, "WATCHDOG_PID")? {
        None => true,
        Some(pid) => pid.parse::<u32>().is_ok_and(|pid| pid == std::process::id()),
    };
    Ok((usec > 0 && for_us).then(|| Duration::from_micros(usec)))
}

/// A value that must not appear in logs or `Debug` output.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Where a server listens: `HOST:PORT`, an absolute path for a Unix socket, or a listening
/// socket the service manager passed (socket activation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
    Inherited(std::os::fd::RawFd),
}

impl Listen {
    fn from_source(src: &dyn Source, name: &str) -> Result<Option<Self>, ConfigError> {
        let Some(raw) = optional(src, name)? else {
            return Ok(None);
        };
        if raw.starts_with('/') {
            return Ok(Some(Listen::Unix(PathBuf::from(raw))));
        }
        raw.parse::<SocketAddr>()
            .map(|addr| Some(Listen::Tcp(addr)))
            .map_err(|_| {
                ConfigError::new(
                    name,
                    format!("{raw:?} is neither IP:PORT (e.g. 127.0.0.1:8000) nor an absolute socket path"),
                )
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

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Tcp(addr) => write!(f, "{addr}"),
            Listen::Unix(path) => write!(f, "unix:{}", path.display()),
            Listen::Inherited(fd) => write!(f, "the socket passed as fd {fd}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
    /// Native journal fields (`telemetry`), for systemd units.
    Journald,
}

impl LogFormat {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        const NAME: &str = "PAGEVIEWS_LOG_FORMAT";
        match optional(src, NAME)?.as_deref() {
            None | Some("text") => Ok(LogFormat::Text),
            Some("json") => Ok(LogFormat::Json),
            Some("journald") => Ok(LogFormat::Journald),
            Some(other) => Err(ConfigError::new(
                NAME,
                format!("{other:?} is not \"text\", \"json\" or \"journald\""),
            )),
        }
    }
}

#[derive(Clone, Debug)]
pub struct DatabaseConfig {
    pub url: Secret,
    pub pool_size: u32,
    /// How long a request waits for a connection before it answers 503.
    pub timeout: Duration,
}

impl DatabaseConfig {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        const NAME: &str = "DATABASE_URL";
        let url = required(src, NAME)?;
        tokio_postgres::Config::from_str(&url)
            .map_err(|e| ConfigError::new(NAME, format!("not a PostgreSQL connection URL: {e}")))?;
        let pool_size = bounded(
            src,
            "PAGEVIEWS_DB_POOL_SIZE",
            16,
            "",
            1000,
            "ten times PostgreSQL's default max_connections",
        )?;
        // Also the app's statement_timeout, which PostgreSQL takes up to 2^31-1 ms only.
        let timeout_ms = bounded(
            src,
            "PAGEVIEWS_DB_TIMEOUT_MS",
            1500,
            "millisecond",
            600_000,
            "ten minutes",
        )?;
        Ok(Self {
            url: Secret(url),
            pool_size: pool_size as u32,
            timeout: Duration::from_millis(timeout_ms),
        })
    }
}

/// The queue type unless `PAGEVIEWS_QUEUE_TYPE` says otherwise (README "Scaling out" has the
/// figures it was chosen from).
pub const DEFAULT_QUEUE_TYPE: QueueType = QueueType::Quorum;

#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// One URL per broker node (`AMQP_URL` lists them separated by commas).
    pub nodes: Vec<Secret>,
    pub queue_type: QueueType,
}

impl BrokerConfig {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        const NAME: &str = "AMQP_URL";
        let raw = required(src, NAME)?;
        let nodes = crate::queue::brokers::parse_list(&raw).map_err(|problem| ConfigError::new(NAME, problem))?;
        Ok(Self {
            nodes: nodes.into_iter().map(Secret).collect(),
            queue_type: parsed(
                src,
                "PAGEVIEWS_QUEUE_TYPE",
                DEFAULT_QUEUE_TYPE,
                "\"quorum\" or \"classic\"",
            )?,
        })
    }
}

#[derive(Clone, Debug)]
pub struct AppConfig {
    pub listen: Listen,
    pub database: DatabaseConfig,
    pub broker: BrokerConfig,
    /// How often rows whose task was never confirmed by the broker are published again.
    pub sweep_interval: Duration,
    /// A second listener with only `/metrics`, `/healthz`, `/readyz`: for Prometheus when the
    /// app itself listens on a Unix socket that only nginx reaches.
    pub metrics_listen: Option<Listen>,
}

impl AppConfig {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        let configured = Listen::from_source(src, "PAGEVIEWS_LISTEN")?;
        watchdog(src)?;
        Ok(Self {
            listen: match inherited_socket()? {
                Some(fd) => Listen::Inherited(fd),
                None => configured.unwrap_or(Listen::Tcp(SocketAddr::from(([127, 0, 0, 1], 8000)))),
            },
            database: DatabaseConfig::from_source(src)?,
            broker: BrokerConfig::from_source(src)?,
            sweep_interval: interval_secs(src, "PAGEVIEWS_SWEEP_INTERVAL_SECS", 10)?,
            metrics_listen: Listen::from_source(src, "PAGEVIEWS_APP_METRICS_LISTEN")?,
        })
    }
}

/// Deliveries the worker takes per database transaction unless told otherwise.
pub const DEFAULT_PREFETCH: u16 = 100;

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub database: DatabaseConfig,
    pub broker: BrokerConfig,
    pub prefetch: u16,
    pub rollup_interval: Duration,
    pub metrics_listen: Option<Listen>,
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
            rollup_interval: interval_secs(src, "PAGEVIEWS_ROLLUP_INTERVAL_SECS", 60)?,
            metrics_listen: Listen::from_source(src, "PAGEVIEWS_METRICS_LISTEN")?,
            retention_days: crate::worker::retention::days(src)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        let mut map: HashMap<String, String> = [
            ("DATABASE_URL", "postgres://pageviews@localhost/pageviews"),
            ("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in pairs {
            if v.is_empty() {
                map.remove(*k);
            } else {
                map.insert(k.to_string(), v.to_string());
            }
        }
        map
    }

    fn app_error(pairs: &[(&str, &str)]) -> String {
        AppConfig::from_source(&env(pairs)).unwrap_err().to_string()
    }

    #[test]
    fn defaults_apply_when_only_urls_are_set() {
        let config = AppConfig::from_source(&env(&[])).unwrap();
        assert_eq!(config.listen, Listen::Tcp("127.0.0.1:8000".parse().unwrap()));
        assert_eq!(config.database.pool_size, 16);
        assert_eq!(config.sweep_interval, Duration::from_secs(10));
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
        assert!(
            app_error(&[("PAGEVIEWS_APP_METRICS_LISTEN", "9102")]).starts_with("PAGEVIEWS_APP_METRICS_LISTEN: "),
            "{}",
            app_error(&[("PAGEVIEWS_APP_METRICS_LISTEN", "9102")])
        );
    }

    #[test]
    fn amqp_url_may_list_several_nodes() {
        let config = AppConfig::from_source(&env(&[("AMQP_URL", "amqp://u:p@h1/v, amqp://u:p@h2:5673/v")])).unwrap();
        let nodes: Vec<&str> = config.broker.nodes.iter().map(Secret::expose).collect();
        assert_eq!(nodes, ["amqp://u:p@h1/v", "amqp://u:p@h2:5673/v"]);
    }

    #[test]
    fn listen_accepts_a_socket_path() {
        let config = AppConfig::from_source(&env(&[("PAGEVIEWS_LISTEN", "/run/pageviews/app.sock")])).unwrap();
        assert_eq!(config.listen, Listen::Unix("/run/pageviews/app.sock".into()));
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
        assert!(app_error(&[("AMQP_URL", "http://x")]).contains("scheme \"http\" is not amqp"));
        assert_eq!(
            app_error(&[("AMQP_URL", "amqp://u:secret@h1/v,amqp://u:secret@h2:x/v")]),
            "AMQP_URL: entry 2 of 2: not a URL: invalid port number"
        );
        assert_eq!(
            app_error(&[("PAGEVIEWS_QUEUE_TYPE", "mirrored")]),
            "PAGEVIEWS_QUEUE_TYPE: \"mirrored\" is not \"quorum\" or \"classic\""
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
        let worker = WorkerConfig::from_source(&env(&[("PAGEVIEWS_PREFETCH", "0")])).unwrap_err();
        assert!(worker.to_string().starts_with("PAGEVIEWS_PREFETCH: must be at least 1"));
    }

    #[test]
    fn the_watchdog_follows_systemds_rules() {
        let pid = std::process::id().to_string();
        let watchdog = |pairs: &[(&str, &str)]| watchdog(&env(pairs));
        assert_eq!(watchdog(&[]).unwrap(), None);
        assert_eq!(watchdog(&[("WATCHDOG_USEC", "0")]).unwrap(), None);
        assert_eq!(
            watchdog(&[("WATCHDOG_USEC", "300000")]).unwrap(),
            Some(Duration::from_millis(300))
        );
        assert_eq!(
            watchdog(&[("WATCHDOG_USEC", "300000"), ("WATCHDOG_PID", &pid)]).unwrap(),
            Some(Duration::from_millis(300))
        );
        assert_eq!(
            watchdog(&[("WATCHDOG_USEC", "300000"), ("WATCHDOG_PID", "1")]).unwrap(),
            None,
            "meant for another process"
        );
        assert!(watchdog(&[("WATCHDOG_USEC", "5s")]).is_err());
    }

    #[test]
    fn secrets_come_from_files() {
        let dir = std::env::temp_dir().join(format!("pageviews-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("amqp");
        std::fs::write(&file, "amqp://u:p@10.0.0.3:5672/v\n").unwrap();
        let path = file.to_str().unwrap();
        let config = AppConfig::from_source(&env(&[("AMQP_URL", ""), ("AMQP_URL_FILE", path)])).unwrap();
        assert_eq!(config.broker.nodes[0].expose(), "amqp://u:p@10.0.0.3:5672/v");
        assert!(!format!("{config:?}").contains("u:p@"), "Debug output leaks the secret");
        assert_eq!(
            app_error(&[("AMQP_URL_FILE", path)]),
            "AMQP_URL: both AMQP_URL and AMQP_URL_FILE are set; set one"
        );
        let missing = app_error(&[("AMQP_URL", ""), ("AMQP_URL_FILE", "/nonexistent/amqp")]);
        assert!(
            missing.starts_with("AMQP_URL_FILE: cannot read /nonexistent/amqp"),
            "{missing}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
