//! The whole stack in the foreground, without Nix: throwaway PostgreSQL and RabbitMQ, the
//! migration, app, worker and nginx (TLS with a certificate made at start). Ctrl-C or SIGTERM
//! stops everything it started and removes its files.
//!
//! Run with `cargo run --release --bin pageviews-stack`.

use pageviews::config::{Environment, parsed};
use pageviews_testbed::nginx::NginxOptions;
use pageviews_testbed::{Binaries, ScratchDir, Stack};
use std::process::ExitCode;
use std::time::Duration;

const PROGRAM: &str = "pageviews-stack";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The launcher runs the app and the worker as children of itself, so `cargo run` of this
    // one binary is enough.
    if let Some(code) = pageviews::cli::child(PROGRAM, &args, "(no arguments; see README.md)") {
        return code;
    }
    let options = match options() {
        Ok(options) => options,
        Err(e) => return pageviews::telemetry::config_error(PROGRAM, &e),
    };
    if let Err(code) = pageviews::telemetry::init_from_env(PROGRAM) {
        return code;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime starts");
    match runtime.block_on(run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{PROGRAM}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn options() -> Result<NginxOptions, pageviews::config::ConfigError> {
    let src = &Environment;
    let mut options = NginxOptions::new(
        parsed(src, "PAGEVIEWS_HTTPS_PORT", 8443, "a port number")?,
        parsed(src, "PAGEVIEWS_HTTP_PORT", 8080, "a port number")?,
    );
    options.tls_profile = parsed(
        src,
        "PAGEVIEWS_TLS_PROFILE",
        "modern".to_owned(),
        "modern or intermediate",
    )?;
    options.rate = parsed(
        src,
        "PAGEVIEWS_RATE_LIMIT",
        options.rate,
        "requests per second per client",
    )?;
    options.burst = parsed(src, "PAGEVIEWS_RATE_BURST", options.burst, "a whole number")?;
    options.conn_limit = parsed(src, "PAGEVIEWS_CONN_LIMIT", options.conn_limit, "a whole number")?;
    Ok(options)
}

async fn run(options: NginxOptions) -> anyhow::Result<()> {
    for (port, variable) in [
        (options.https_port, "PAGEVIEWS_HTTPS_PORT"),
        (options.http_port, "PAGEVIEWS_HTTP_PORT"),
    ] {
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            anyhow::bail!("port {port} is in use; choose another with {variable}");
        }
    }
    let dir = ScratchDir::new("pageviews-stack")?;
    let binaries = Binaries::this_executable()?;
    eprintln!(
        "{PROGRAM}: starting PostgreSQL, RabbitMQ, app, worker and nginx under {}",
        dir.path().display()
    );
    let mut stack = Stack::start(dir.path(), &binaries, options, &[]).await?;
    let d = &stack.deployment;
    println!(
        "\npageviews is up: {}\n  (HTTP {} redirects there; self-signed certificate, CA at {})\n  logs: {}/{{app,worker}}.log, nginx/error.log\n  Ctrl-C stops everything.\n",
        d.https_url("/"),
        d.http_url("/"),
        d.certificates.ca.display(),
        dir.path().display(),
    );
    let mut ticks = tokio::time::interval(Duration::from_millis(500));
    let stopped_by_itself = loop {
        tokio::select! {
            _ = pageviews::shutdown::signal() => break None,
            _ = ticks.tick() => {
                let d = &mut stack.deployment;
                let exited = [("app", &mut d.app), ("worker", &mut d.worker), ("nginx", &mut d.nginx.process)]
                    .into_iter()
                    .find_map(|(name, process)| process.try_wait().map(|status| format!("{name} exited unexpectedly ({status})")));
                if exited.is_some() {
                    break exited;
                }
            }
        }
    };
    eprintln!("{PROGRAM}: stopping");
    drop(stack);
    drop(dir);
    match stopped_by_itself {
        None => Ok(()),
        Some(reason) => anyhow::bail!("{reason}; everything else was stopped"),
    }
}
