//! The benchmark: starts the local stack with nginx's limits raised, measures this machine's
//! limits and the stack under load, prints one table and writes it as JSON. Ctrl-C stops
//! everything it started.
//!
//! Run with `cargo run --release -p pageviews-bench`. Settings (environment):
//! `PAGEVIEWS_BENCH_SECS` (10) per step, `PAGEVIEWS_BENCH_CONCURRENCY` (`1,32,128`),
//! `PAGEVIEWS_BENCH_ROWS` (10 000 000, the large-table step), `PAGEVIEWS_BENCH_REPLICATION` (1; 0 skips
//! the synchronous replication step, which needs Patroni 4 and etcd), `PAGEVIEWS_BENCH_OUT`
//! (`tools/bench/results/latest.json` in the source tree).

use pageviews::config::{ConfigError, Environment, parsed};
use pageviews_bench::{self as bench, Settings};
use pageviews_testbed::ScratchDir;
use std::process::ExitCode;

const PROGRAM: &str = "pageviews-bench";
const DEFAULT_OUT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/results/latest.json");

fn main() -> ExitCode {
    pageviews_stack::main(
        PROGRAM,
        "(no arguments; settings from the environment)",
        settings,
        |settings| async move {
            // Dropping the run on Ctrl-C kills wrk/pgbench (kill_on_drop) and stops the stack.
            tokio::select! {
                result = run(&settings) => result,
                _ = pageviews::shutdown::signal() => Err(anyhow::anyhow!("interrupted; everything was stopped")),
            }
        },
    )
}

fn settings() -> Result<Settings, ConfigError> {
    let src = &Environment;
    let secs = parsed(src, "PAGEVIEWS_BENCH_SECS", 10u64, "a whole number of seconds")?;
    let list: String = parsed(src, "PAGEVIEWS_BENCH_CONCURRENCY", "1,32,128".to_owned(), "a list")?;
    let concurrency = list
        .split(',')
        .map(|c| c.trim().parse::<u32>().ok().filter(|c| *c > 0))
        .collect::<Option<Vec<u32>>>()
        .ok_or_else(|| {
            ConfigError::new(
                "PAGEVIEWS_BENCH_CONCURRENCY",
                format!("{list:?} is not a comma-separated list of connection counts"),
            )
        })?;
    if secs == 0 {
        return Err(ConfigError::new("PAGEVIEWS_BENCH_SECS", "must be at least 1"));
    }
    let large_rows = parsed(src, "PAGEVIEWS_BENCH_ROWS", 10_000_000i64, "a whole number of rows")?;
    if large_rows < 0 {
        return Err(ConfigError::new("PAGEVIEWS_BENCH_ROWS", "must not be negative"));
    }
    let replication = parsed(src, "PAGEVIEWS_BENCH_REPLICATION", 1u8, "0 or 1")?;
    if replication > 1 {
        return Err(ConfigError::new(
            "PAGEVIEWS_BENCH_REPLICATION",
            "must be 0 (skip the synchronous replication step) or 1",
        ));
    }
    let out = parsed(src, "PAGEVIEWS_BENCH_OUT", DEFAULT_OUT.to_owned(), "a path")?.into();
    Ok(Settings {
        secs,
        concurrency,
        large_rows,
        replication: replication == 1,
        out,
    })
}

async fn run(settings: &Settings) -> anyhow::Result<()> {
    let dir = ScratchDir::new(PROGRAM)?;
    let report = match bench::run(settings, dir.path()).await {
        Ok(report) => report,
        Err(e) => {
            let kept = dir.keep();
            return Err(e.context(format!("logs kept in {}", kept.display())));
        }
    };
    println!("\n{}", report.table());
    report.write_json(&settings.out)?;
    eprintln!("written to {}", settings.out.display());
    Ok(())
}
