//! The launcher shared by `pageviews-stack` and `pageviews-bench`: one executable that starts
//! the stack and, re-run as `<exe> app` or `<exe> worker` (see
//! `pageviews_testbed::Binaries::this_executable`), is the app or the worker, so `cargo run`
//! of the tool needs nothing else built.

use std::future::Future;
use std::process::ExitCode;

/// The `main` of a tool that starts the stack: `<tool> app|worker` runs that role with the
/// service's own entry points; bare, it loads the tool's settings and runs it like the
/// binaries run, but a failure is printed plainly for the person at the terminal.
pub fn main<C, F>(
    program: &str,
    usage: &str,
    load: impl FnOnce() -> Result<C, pageviews::config::ConfigError>,
    run: impl FnOnce(C) -> F,
) -> ExitCode
where
    F: Future<Output = anyhow::Result<()>>,
{
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("app") => pageviews::cli::app(&args[1..]),
        Some("worker") => pageviews::cli::worker(&args[1..]),
        Some(_) => pageviews::cli::usage_error(program, &args, usage),
        None => pageviews::cli::main_with(program, load, run, |program, e| eprintln!("{program}: {e:#}")),
    }
}
