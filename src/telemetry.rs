//! Logging: readable lines on a terminal, one JSON object per line in a container
//! (`PAGEVIEWS_LOG_FORMAT=json`), or native journal entries under systemd
//! (`PAGEVIEWS_LOG_FORMAT=journald`). `RUST_LOG` filters, default `info`.
//!
//! In the journal every field of an event and of its spans is a field of its own, named by
//! tracing-journald: upper-cased with its `F_` prefix (the request span's `request_id` is
//! `F_REQUEST_ID`, so `journalctl -u pageviews-app F_REQUEST_ID=<id>` lists one request's
//! lines); the text is `MESSAGE`, the level `PRIORITY`, the binary `SYSLOG_IDENTIFIER`.

use crate::config::{ConfigError, LogConfig, LogFormat};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Where journald listens for native entries (sd_journal_sendv(3)); tracing-journald sends there.
pub const JOURNALD_SOCKET: &str = "/run/systemd/journal/socket";

fn init(format: LogFormat, filter: EnvFilter) -> Result<(), ConfigError> {
    // Colours only on a terminal: log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let stderr = || tracing_subscriber::fmt().with_ansi(ansi).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => stderr().with_env_filter(filter).init(),
        LogFormat::Json => stderr()
            .with_env_filter(filter)
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
        LogFormat::Journald => {
            // Asked for and not there is an error, never a fallback: the lines would go
            // where nobody looks for them.
            let journald = tracing_journald::layer().map_err(|e| {
                ConfigError::new(
                    "PAGEVIEWS_LOG_FORMAT",
                    format!(
                        "\"journald\", but journald's socket {JOURNALD_SOCKET} does not answer ({e}); outside systemd use \"json\" or \"text\""
                    ),
                )
            })?;
            tracing_subscriber::registry().with(filter).with(journald).init();
        }
    }
    Ok(())
}

/// Parses the logging settings, then starts logging; a bad value is reported on stderr.
pub fn init_from_env(program: &str) -> Result<(), std::process::ExitCode> {
    let env = crate::config::Environment;
    LogConfig::from_source(&env)
        .and_then(|log| init(log.format, log.env_filter()))
        .map_err(|e| config_error(program, &e))
}

/// Reports a configuration error the same way in every binary; exit code 2.
pub fn config_error(program: &str, error: &dyn std::fmt::Display) -> std::process::ExitCode {
    eprintln!("{program}: configuration error: {error}");
    std::process::ExitCode::from(2)
}
