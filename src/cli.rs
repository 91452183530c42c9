//! The entry points of the binaries, shared so the local launcher can run the same code as
//! `pageviews-app` and `pageviews-worker` in its child processes.

use crate::config::{AppConfig, ConfigError, DatabaseConfig, Environment, WorkerConfig};
use crate::telemetry;
use std::future::Future;
use std::process::ExitCode;

/// `pageviews-app [migrate]`
pub fn app(args: &[String]) -> ExitCode {
    const PROGRAM: &str = "pageviews-app";
    match args {
        [] => main_with(
            PROGRAM,
            || AppConfig::from_source(&Environment),
            crate::web::run,
            log_failure,
        ),
        [cmd] if cmd == "migrate" => main_with(
            PROGRAM,
            || DatabaseConfig::from_source(&Environment),
            migrate,
            log_failure,
        ),
        [flag] if flag == "--help" || flag == "-h" => {
            println!(
                "usage: {PROGRAM} [migrate]\n  (no argument)  serve HTTP\n  migrate        apply pending database migrations and exit\nConfiguration is read from the environment; see README.md."
            );
            ExitCode::SUCCESS
        }
        other => usage_error(PROGRAM, other, "[migrate]"),
    }
}

/// `pageviews-worker`
pub fn worker(args: &[String]) -> ExitCode {
    const PROGRAM: &str = "pageviews-worker";
    match args {
        [] => main_with(
            PROGRAM,
            || WorkerConfig::from_source(&Environment),
            crate::worker::run,
            log_failure,
        ),
        other => usage_error(PROGRAM, other, "(no arguments; configuration from the environment)"),
    }
}

/// For launchers that run the app and the worker as `<this executable> app|worker` (see
/// `stack::Binaries::this_executable`): runs that role when asked, `None` when called bare.
pub fn child(program: &str, args: &[String], usage: &str) -> Option<ExitCode> {
    match args.first().map(String::as_str) {
        Some("app") => Some(app(&args[1..])),
        Some("worker") => Some(worker(&args[1..])),
        Some(_) => Some(usage_error(program, args, usage)),
        None => None,
    }
}

pub fn usage_error(program: &str, args: &[String], usage: &str) -> ExitCode {
    eprintln!("{program}: unexpected arguments {args:?}; usage: {program} {usage}");
    ExitCode::from(2)
}

async fn migrate(config: DatabaseConfig) -> anyhow::Result<()> {
    let applied = crate::db::migrate(config.url.expose()).await?;
    tracing::info!(count = applied.len(), versions = ?applied, "migrations applied");
    Ok(())
}

/// The `main` of a tool that starts the stack (pageviews-stack, pageviews-bench): re-run as
/// `<tool> app|worker`, it is that child (see [`child`]); else like the binaries, but a failure
/// is printed plainly for the person at the terminal.
pub fn launcher_main<C, F>(
    program: &str,
    usage: &str,
    load: impl FnOnce() -> Result<C, ConfigError>,
    run: impl FnOnce(C) -> F,
) -> ExitCode
where
    F: Future<Output = anyhow::Result<()>>,
{
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(code) = child(program, &args, usage) {
        return code;
    }
    main_with(program, load, run, |program, e| eprintln!("{program}: {e:#}"))
}

fn log_failure(program: &str, e: &anyhow::Error) {
    tracing::error!(error = format!("{e:#}"), "{program} failed");
}

/// Loads the configuration (exit 2 with the variable named when it is bad), starts logging,
/// runs `run` on a multi-threaded runtime (exit 1, after `report`, when it fails).
fn main_with<C, F>(
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
