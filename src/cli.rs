//! The entry points of the binaries. They are public so that a launcher (tools/stack) can run
//! the same code as `pageviews-app` and `pageviews-worker` in its child processes.

use crate::config::{AppConfig, ConfigError, DatabaseConfig, Environment, LogConfig, MAX_PASSWORD_BYTES, WorkerConfig};
use crate::telemetry;
use std::future::Future;
use std::io::{IsTerminal, Read};
use std::process::ExitCode;

/// `pageviews-app [migrate | scram-verifier | admin … | check-config [--json | --defaults-json]]`
pub fn app(args: &[String]) -> ExitCode {
    const PROGRAM: &str = "pageviews-app";
    match args {
        [] => main_with(
            PROGRAM,
            || AppConfig::from_source(&Environment),
            crate::web::run,
            log_failure,
        ),
        [cmd, rest @ ..] if cmd == "check-config" => {
            check_config(PROGRAM, rest, || AppConfig::from_source(&Environment))
        }
        [cmd] if cmd == "migrate" => main_with(
            PROGRAM,
            || DatabaseConfig::from_source(&Environment),
            migrate,
            log_failure,
        ),
        [cmd, rest @ ..] if cmd == "admin" => crate::admin::main(PROGRAM, rest),
        [cmd] if cmd == "scram-verifier" => {
            match scram_verifier(std::io::stdin().lock(), std::io::stdin().is_terminal()) {
                Ok(verifier) => {
                    println!("{verifier}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{PROGRAM} scram-verifier: {e}");
                    ExitCode::from(2)
                }
            }
        }
        [flag] if flag == "--help" || flag == "-h" => {
            println!(
                "usage: {PROGRAM} [migrate | scram-verifier | admin … | check-config [--json | --defaults-json]]\n  (no argument)   serve HTTP\n  migrate         apply pending database migrations and exit\n  admin           the backlog, dead letters, requeue: {}\n  scram-verifier  read a password on stdin, print its SCRAM-SHA-256 verifier (for ALTER ROLE … PASSWORD)\n  check-config    {CHECK_CONFIG_HELP}\nConfiguration is read from the environment; see README.md.",
                crate::admin::USAGE
            );
            ExitCode::SUCCESS
        }
        other => usage_error(
            PROGRAM,
            other,
            "[migrate | scram-verifier | admin … | check-config [--json | --defaults-json]]",
        ),
    }
}

/// `pageviews-worker [check-config [--json | --defaults-json]]`
pub fn worker(args: &[String]) -> ExitCode {
    const PROGRAM: &str = "pageviews-worker";
    match args {
        [] => main_with(
            PROGRAM,
            || WorkerConfig::from_source(&Environment),
            crate::worker::run,
            log_failure,
        ),
        [cmd, rest @ ..] if cmd == "check-config" => {
            check_config(PROGRAM, rest, || WorkerConfig::from_source(&Environment))
        }
        [flag] if flag == "--help" || flag == "-h" => {
            println!(
                "usage: {PROGRAM} [check-config [--json | --defaults-json]]\n  (no argument)   consume tasks and run the rollup\n  check-config    {CHECK_CONFIG_HELP}\nConfiguration is read from the environment; see README.md."
            );
            ExitCode::SUCCESS
        }
        other => usage_error(PROGRAM, other, "[check-config [--json | --defaults-json]]"),
    }
}

const CHECK_CONFIG_HELP: &str = "load the settings from the environment as the service does (no connection made): exit 0 if they are valid, 2 naming the variable if not;\n                  --json prints the effective settings (passwords as ***), --defaults-json every setting's default";

/// The settings as the service would load them, with the logging settings, as
/// `check-config --json` prints them: one key per variable.
#[derive(serde::Serialize)]
struct Effective<C> {
    #[serde(flatten)]
    service: C,
    #[serde(flatten)]
    log: LogConfig,
}

/// `check-config`: `load` and the logging settings, in the service's order, without opening
/// a connection or starting logging.
fn check_config<C: serde::Serialize>(
    program: &str,
    args: &[String],
    load: impl FnOnce() -> Result<C, ConfigError>,
) -> ExitCode {
    const USAGE: &str = "check-config [--json | --defaults-json]";
    let json = match args {
        [] => false,
        [flag] if flag == "--json" => true,
        [flag] if flag == "--defaults-json" => {
            return print_json(program, &crate::config::defaults());
        }
        other => return usage_error(program, other, USAGE),
    };
    let loaded = load().and_then(|service| Ok((service, LogConfig::from_source(&Environment)?)));
    match loaded {
        Err(e) => telemetry::config_error(program, &e),
        Ok((service, log)) if json => print_json(program, &Effective { service, log }),
        Ok(_) => {
            println!("{program}: the settings are valid");
            ExitCode::SUCCESS
        }
    }
}

fn print_json(program: &str, value: &impl serde::Serialize) -> ExitCode {
    match serde_json::to_string_pretty(value) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{program}: cannot print the settings as JSON: {e}");
            ExitCode::FAILURE
        }
    }
}

pub fn usage_error(program: &str, args: &[String], usage: &str) -> ExitCode {
    eprintln!("{program}: unexpected arguments {args:?}; usage: {program} {usage}");
    ExitCode::from(2)
}

/// The SCRAM-SHA-256 verifier of the password on `input` (a file, not a terminal: typed
/// passwords would echo), as PostgreSQL stores it: `ALTER ROLE … PASSWORD '<verifier>'` sets
/// the password without the server ever receiving it, so neither `pg_stat_activity` nor the
/// log can show it. Trailing newlines are dropped, as the binaries drop them when they read
/// the same file (`config::password_file`).
fn scram_verifier(input: impl Read, is_terminal: bool) -> Result<String, String> {
    if is_terminal {
        return Err("reads the password from stdin, which is a terminal; redirect it from the password file".into());
    }
    let mut password = Vec::new();
    input
        .take(MAX_PASSWORD_BYTES + 1)
        .read_to_end(&mut password)
        .map_err(|e| format!("cannot read the password from stdin: {e}"))?;
    if password.len() as u64 > MAX_PASSWORD_BYTES {
        return Err(format!(
            "the password on stdin is longer than {MAX_PASSWORD_BYTES} bytes"
        ));
    }
    while password.last() == Some(&b'\n') {
        password.pop();
    }
    if password.is_empty() {
        return Err("the password on stdin is empty".into());
    }
    if password.contains(&0) {
        return Err("the password on stdin contains a NUL byte, which PostgreSQL cannot take".into());
    }
    Ok(postgres_protocol::password::scram_sha_256(&password))
}

async fn migrate(config: DatabaseConfig) -> anyhow::Result<()> {
    let applied = crate::db::migrate(config.url.expose()).await?;
    tracing::info!(count = applied.len(), versions = ?applied, "migrations applied");
    Ok(())
}

fn log_failure(program: &str, e: &anyhow::Error) {
    tracing::error!(error = format!("{e:#}"), "{program} failed");
}

/// Loads the configuration (exit 2 with the variable named when it is bad), starts logging,
/// runs `run` on a multi-threaded runtime (exit 1, after `report`, when it fails).
pub fn main_with<C, F>(
    program: &str,
    load: impl FnOnce() -> Result<C, ConfigError>,
    run: impl FnOnce(C) -> F,
    report: fn(&str, &anyhow::Error),
) -> ExitCode
where
    F: Future<Output = anyhow::Result<()>>,
{
    let config = match load() {
        Ok(config) => config,
        Err(e) => return telemetry::config_error(program, &e),
    };
    if let Err(code) = telemetry::init_from_env(program) {
        return code;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{program}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(config));
    // A blocking broker call still running (the broker gone) must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(program, &e);
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, base64, as PostgreSQL's
    /// `password_encryption = scram-sha-256` stores it (the shape it recognises as already
    /// hashed instead of hashing it again).
    fn parts(verifier: &str) -> (&str, &str, &str, &str) {
        let rest = verifier.strip_prefix("SCRAM-SHA-256$").expect(verifier);
        let (iterations, rest) = rest.split_once(':').expect(verifier);
        let (salt, keys) = rest.split_once('$').expect(verifier);
        let (stored, server) = keys.split_once(':').expect(verifier);
        (iterations, salt, stored, server)
    }

    fn base64_len(s: &str) -> usize {
        assert!(
            s.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b)),
            "{s}"
        );
        s.len()
    }

    #[test]
    fn scram_verifier_has_postgresqls_format_and_a_fresh_salt() {
        let a = scram_verifier(&b"correct horse\n"[..], false).unwrap();
        let (iterations, salt, stored, server) = parts(&a);
        assert_eq!(iterations, "4096");
        // 16 bytes of salt, 32-byte keys.
        assert_eq!(base64_len(salt), 24);
        assert_eq!(base64_len(stored), 44);
        assert_eq!(base64_len(server), 44);
        assert!(!a.contains("correct horse"));
        let b = scram_verifier(&b"correct horse"[..], false).unwrap();
        assert_ne!(parts(&a).1, parts(&b).1, "every verifier gets its own salt");
    }

    #[test]
    fn scram_verifier_refuses_what_is_not_a_password_file() {
        let err = |input: &[u8], tty| scram_verifier(input, tty).unwrap_err();
        assert!(err(b"secret", true).contains("terminal"));
        assert!(err(b"", false).contains("empty"));
        assert!(err(b"\n\n", false).contains("empty"));
        assert!(err(b"a\0b", false).contains("NUL"));
        let long = vec![b'x'; MAX_PASSWORD_BYTES as usize + 1];
        assert!(err(&long, false).contains("longer than 1024 bytes"));
        assert!(scram_verifier(&long[1..], false).is_ok());
    }
}
