//! Logging: readable lines on a terminal, one JSON object per line under systemd or in a
//! container (`PAGEVIEWS_LOG_FORMAT=json`). `RUST_LOG` filters, default `info`.

use crate::config::{LogConfig, LogFormat};
use tracing_subscriber::EnvFilter;

fn init(format: LogFormat, filter: EnvFilter) {
    // Colours only on a terminal: log files and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
        LogFormat::Text => builder.init(),
    }
}

/// Parses the logging settings, then starts logging; a bad value is reported on stderr.
pub fn init_from_env(program: &str) -> Result<(), std::process::ExitCode> {
    let env = crate::config::Environment;
    match LogConfig::from_source(&env) {
        Ok(log) => {
            init(log.format, log.env_filter());
            Ok(())
        }
        Err(e) => Err(config_error(program, &e)),
    }
}

/// Reports a configuration error the same way in every binary; exit code 2.
pub fn config_error(program: &str, error: &dyn std::fmt::Display) -> std::process::ExitCode {
    eprintln!("{program}: configuration error: {error}");
    std::process::ExitCode::from(2)
}
