//! Settings from environment variables, one module per group: [`database`], [`broker`],
//! [`app`], [`worker`], [`log`]. Every default is a `DEFAULT_*` const of its group and
//! [`defaults`] lists them by variable (`check-config --defaults-json`; the NixOS module's
//! defaults and README's table are tested against it). Every variable may instead be given as
//! `NAME_FILE=/path` (systemd credentials, container secrets); setting both is an error. Errors
//! name the variable and say what was wrong; nothing here opens a connection, so
//! `check-config` loads the settings exactly as the service does.

pub mod app;
pub mod broker;
pub mod database;
pub mod log;
pub mod worker;

pub use app::{AppConfig, DEFAULT_LISTEN, DEFAULT_SWEEP_INTERVAL_SECS, Sweep};
pub use broker::{BrokerConfig, DEFAULT_QUEUE_TYPE, QueueType, parse_list};
pub use database::{DEFAULT_DB_POOL_SIZE, DEFAULT_DB_TIMEOUT_MS, DatabaseConfig};
pub use log::{DEFAULT_LOG_FORMAT, DEFAULT_RUST_LOG, LogConfig, LogFormat};
pub use worker::{DEFAULT_PREFETCH, DEFAULT_ROLLUP_INTERVAL_SECS, WorkerConfig};

use serde_json::{Value, json};
use std::fmt;
use std::io::Read;
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

/// Every setting with its default, by variable (`null`: unset unless given). The values are
/// the `DEFAULT_*` consts, in the form the variable takes.
pub fn defaults() -> serde_json::Map<String, Value> {
    let table = [
        ("PAGEVIEWS_DB_POOL_SIZE", json!(DEFAULT_DB_POOL_SIZE)),
        ("PAGEVIEWS_DB_TIMEOUT_MS", json!(DEFAULT_DB_TIMEOUT_MS)),
        ("PAGEVIEWS_DATABASE_PASSWORD_FILE", Value::Null),
        ("PAGEVIEWS_QUEUE_TYPE", json!(DEFAULT_QUEUE_TYPE.as_str())),
        ("PAGEVIEWS_AMQP_PASSWORD_FILE", Value::Null),
        ("PAGEVIEWS_LISTEN", json!(DEFAULT_LISTEN.to_string())),
        ("PAGEVIEWS_APP_METRICS_LISTEN", Value::Null),
        ("PAGEVIEWS_SWEEP_INTERVAL_SECS", json!(DEFAULT_SWEEP_INTERVAL_SECS)),
        ("PAGEVIEWS_METRICS_LISTEN", Value::Null),
        ("PAGEVIEWS_PREFETCH", json!(DEFAULT_PREFETCH)),
        ("PAGEVIEWS_ROLLUP_INTERVAL_SECS", json!(DEFAULT_ROLLUP_INTERVAL_SECS)),
        ("PAGEVIEWS_RETENTION_DAYS", Value::Null),
        ("PAGEVIEWS_LOG_FORMAT", json!(DEFAULT_LOG_FORMAT.as_str())),
        ("RUST_LOG", json!(DEFAULT_RUST_LOG)),
    ];
    table.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// The most a `NAME_FILE` file may hold: far more than a URL list or a password needs, and
/// a file named by mistake (a log, a device) is refused instead of read whole.
pub const MAX_SETTING_FILE_BYTES: u64 = 64 * 1024;

/// The longest password a password file may hold (the generated ones are 64 characters).
pub const MAX_PASSWORD_BYTES: u64 = 1024;

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

/// The text of the file `path` named by `variable`, at most `max` bytes.
fn read_bounded(variable: &str, path: &str, max: u64) -> Result<String, ConfigError> {
    let cannot = |e: std::io::Error| ConfigError::new(variable, format!("cannot read {path}: {e}"));
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(max + 1).read_to_end(&mut bytes))
        .map_err(cannot)?;
    if bytes.len() as u64 > max {
        return Err(ConfigError::new(variable, format!("{path} is larger than {max} bytes")));
    }
    String::from_utf8(bytes).map_err(|_| ConfigError::new(variable, format!("{path} is not valid UTF-8")))
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
            let text = read_bounded(&file_var, &path, MAX_SETTING_FILE_BYTES)?;
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

/// A password from the file named by the variable `name` (a path: a systemd credential,
/// `%d/…`): at most [`MAX_PASSWORD_BYTES`], trailing newlines dropped (as `$(cat file)` and
/// `scram-verifier` drop them, so the password is the one the server was given), not empty,
/// no control characters. `None` when the variable is unset. The path, not the password, is
/// kept for `check-config --json`.
pub fn password_file(src: &dyn Source, name: &str) -> Result<Option<(PathBuf, Secret)>, ConfigError> {
    let Some(path) = src.get(name)? else {
        return Ok(None);
    };
    if path.is_empty() {
        return Err(ConfigError::new(name, "is set but empty"));
    }
    let text = read_bounded(name, &path, MAX_PASSWORD_BYTES)?;
    let password = text.trim_end_matches('\n');
    if password.is_empty() {
        return Err(ConfigError::new(name, format!("{path} is empty")));
    }
    let password = checked(name, password.to_owned(), &path)?;
    Ok(Some((PathBuf::from(path), Secret(password))))
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

/// A `Duration` as the whole seconds a `*_SECS` variable gives.
fn as_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

/// A `Duration` as the whole milliseconds a `*_MS` variable gives.
fn as_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
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

/// `url` with its password, if any, shown as `***`: for `check-config --json`.
fn without_password(url: &str) -> String {
    match UrlParts::split(url) {
        Some(parts) if parts.password.is_some() => format!(
            "{}{}:***@{}{}",
            parts.scheme,
            parts.user.unwrap_or_default(),
            parts.hosts,
            parts.rest
        ),
        Some(_) => url.to_owned(),
        None => "(not shown: not a URL, so its password could not be left out)".to_owned(),
    }
}

/// A URL cut around its user information: `scheme://[user[:password]@]hosts rest`. Cut by
/// hand because `hosts` may be a list (`h1:5432,h2:5432`, libpq's multi-host form), which no
/// URL parser accepts; the client library parses the whole URL afterwards.
struct UrlParts<'a> {
    /// Up to and including `://`.
    scheme: &'a str,
    user: Option<&'a str>,
    password: Option<&'a str>,
    hosts: &'a str,
    /// From the first `/`, `?` or `#` after the hosts.
    rest: &'a str,
}

impl<'a> UrlParts<'a> {
    fn split(url: &'a str) -> Option<UrlParts<'a>> {
        let after_scheme = url.find("://")? + 3;
        let scheme = &url[..after_scheme];
        if !scheme[..after_scheme - 3]
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
            || after_scheme == 3
        {
            return None;
        }
        let tail = &url[after_scheme..];
        let end = tail.find(['/', '?', '#']).unwrap_or(tail.len());
        let (authority, rest) = tail.split_at(end);
        let (userinfo, hosts) = match authority.rfind('@') {
            Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
            None => (None, authority),
        };
        let (user, password) = match userinfo.map(|u| u.split_once(':')) {
            Some(Some((user, password))) => (Some(user), Some(password)),
            Some(None) => (userinfo, None),
            None => (None, None),
        };
        Some(UrlParts {
            scheme,
            user,
            password,
            hosts,
            rest,
        })
    }
}

/// Puts `password` into `url`, percent-encoded, for a URL given without
/// one and a password given as a file. `url_var` and `file_var` name the two settings for the
/// errors, which never quote the URL.
fn with_password(url: &str, password: &Secret, url_var: &str, file_var: &str) -> Result<String, ConfigError> {
    let parts = UrlParts::split(url).ok_or_else(|| {
        ConfigError::new(
            url_var,
            format!("not a URL (scheme://user@host/…), so the password of {file_var} cannot be put in it"),
        )
    })?;
    if parts.password.is_some() {
        return Err(ConfigError::new(
            url_var,
            format!("has a password and {file_var} gives one too; set one"),
        ));
    }
    let Some(user) = parts.user.filter(|u| !u.is_empty()) else {
        return Err(ConfigError::new(
            url_var,
            format!("has no user name for the password of {file_var} (user@host)"),
        ));
    };
    if parts.hosts.is_empty() {
        return Err(ConfigError::new(
            url_var,
            format!("has no host, so it cannot take the password of {file_var}"),
        ));
    }
    // Everything but letters and digits percent-encoded, so the client decodes it back exactly.
    let encoded =
        percent_encoding::utf8_percent_encode(password.expose(), percent_encoding::NON_ALPHANUMERIC).to_string();
    Ok(format!(
        "{}{user}:{encoded}@{}{}",
        parts.scheme, parts.hosts, parts.rest
    ))
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

    /// As the variable gives it (`IP:PORT`, a socket path), for `check-config --json`.
    fn as_setting(&self) -> String {
        match self {
            Listen::Tcp(addr) => addr.to_string(),
            Listen::Unix(path) => path.display().to_string(),
            Listen::Inherited(fd) => format!("fd {fd} (LISTEN_FDS)"),
        }
    }
}

impl serde::Serialize for Listen {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.as_setting())
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;

    /// The two required URLs, then `pairs` (an empty value removes a variable).
    pub fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
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

    /// A scratch directory of this test process, removed when dropped.
    pub struct Scratch(pub PathBuf);

    impl Scratch {
        pub fn new(name: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!("pageviews-config-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        pub fn file(&self, name: &str, contents: &[u8]) -> String {
            let path = self.0.join(name);
            std::fs::write(&path, contents).unwrap();
            path.to_str().unwrap().to_owned()
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The effective settings of the app and the worker with only the required variables,
    /// as `check-config --json` prints them, are `defaults()` (plus the two URLs).
    #[test]
    fn the_defaults_table_is_what_parsing_an_empty_environment_gives() {
        let mut effective = serde_json::Map::new();
        let app = serde_json::to_value(AppConfig::from_source(&env(&[])).unwrap()).unwrap();
        let worker = serde_json::to_value(WorkerConfig::from_source(&env(&[])).unwrap()).unwrap();
        let log = serde_json::to_value(LogConfig::from_source(&env(&[])).unwrap()).unwrap();
        for value in [app, worker, log] {
            let Value::Object(map) = value else { panic!("{value}") };
            for (k, v) in map {
                if let Some(seen) = effective.insert(k.clone(), v.clone()) {
                    assert_eq!(seen, v, "{k} differs between the app and the worker");
                }
            }
        }
        for required in ["DATABASE_URL", "AMQP_URL"] {
            assert!(effective.remove(required).is_some(), "{required}");
        }
        assert_eq!(effective, defaults());
    }

    #[test]
    fn files_are_bounded_and_checked() {
        let dir = Scratch::new("files");
        let big = dir.file("big", &vec![b'a'; MAX_SETTING_FILE_BYTES as usize + 1]);
        let err = optional(&env(&[("AMQP_URL", ""), ("AMQP_URL_FILE", &big)]), "AMQP_URL").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("AMQP_URL_FILE: {big} is larger than 65536 bytes")
        );
        let latin1 = dir.file("latin1", b"caf\xe9");
        let err = optional(&env(&[("X_FILE", &latin1)]), "X").unwrap_err();
        assert_eq!(err.to_string(), format!("X_FILE: {latin1} is not valid UTF-8"));
    }

    #[test]
    fn password_files_drop_trailing_newlines_and_refuse_the_rest() {
        let dir = Scratch::new("passwords");
        let read = |contents: &[u8]| {
            let path = dir.file("pw", contents);
            password_file(&env(&[("PW_FILE", &path)]), "PW_FILE").map(|p| p.map(|(_, s)| s.expose().to_owned()))
        };
        assert_eq!(read(b"s3cret/+@:%\n\n").unwrap().as_deref(), Some("s3cret/+@:%"));
        assert_eq!(read(b"s3cret").unwrap().as_deref(), Some("s3cret"));
        assert!(read(b"\n").unwrap_err().to_string().ends_with(" is empty"));
        assert!(read(b"a\r\n").unwrap_err().to_string().contains("carriage return"));
        assert!(read(b"a\nb").unwrap_err().to_string().contains("control character"));
        let long = vec![b'x'; MAX_PASSWORD_BYTES as usize + 1];
        assert!(
            read(&long)
                .unwrap_err()
                .to_string()
                .ends_with("is larger than 1024 bytes")
        );
        assert!(read(&long[1..]).is_ok());
        assert!(password_file(&env(&[]), "PW_FILE").unwrap().is_none());
        let missing = password_file(&env(&[("PW_FILE", "/nonexistent/pw")]), "PW_FILE").unwrap_err();
        assert!(
            missing.to_string().starts_with("PW_FILE: cannot read /nonexistent/pw"),
            "{missing}"
        );
    }

    #[test]
    fn passwords_are_percent_encoded_into_urls() {
        let pw = Secret("p@ss:w/rd%?#".into());
        let url = with_password("postgres://app@10.0.0.3:5432/pageviews", &pw, "U", "F").unwrap();
        assert_eq!(url, "postgres://app:p%40ss%3Aw%2Frd%25%3F%23@10.0.0.3:5432/pageviews");
        let config = tokio_postgres::Config::from_str(&url).unwrap();
        assert_eq!(config.get_password(), Some(&b"p@ss:w/rd%?#"[..]));
        assert_eq!(
            with_password("postgres://app:other@h/db", &pw, "U", "F")
                .unwrap_err()
                .to_string(),
            "U: has a password and F gives one too; set one"
        );
        assert_eq!(
            with_password("postgres://h/db", &pw, "U", "F").unwrap_err().to_string(),
            "U: has no user name for the password of F (user@host)"
        );
        assert!(
            with_password("host=h user=app", &pw, "U", "F")
                .unwrap_err()
                .to_string()
                .starts_with("U: not a URL")
        );
        assert_eq!(without_password(&url), "postgres://app:***@10.0.0.3:5432/pageviews");
        // libpq's multi-host form (the Patroni hosts), which no URL parser takes.
        let hosts = "postgres://app@10.0.0.5:5432,10.0.0.6:5432/pageviews?target_session_attrs=read-write";
        let url = with_password(hosts, &pw, "U", "F").unwrap();
        assert_eq!(
            url,
            "postgres://app:p%40ss%3Aw%2Frd%25%3F%23@10.0.0.5:5432,10.0.0.6:5432/pageviews?target_session_attrs=read-write"
        );
        let config = tokio_postgres::Config::from_str(&url).unwrap();
        assert_eq!(config.get_hosts().len(), 2);
        assert_eq!(config.get_password(), Some(&b"p@ss:w/rd%?#"[..]));
        assert_eq!(
            without_password(&url),
            "postgres://app:***@10.0.0.5:5432,10.0.0.6:5432/pageviews?target_session_attrs=read-write"
        );
        assert!(!without_password("host=h password=x").contains('x'));
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
}
