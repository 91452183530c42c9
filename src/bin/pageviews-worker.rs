//! The worker: consumes page-view tasks and runs the scheduled rollup.
fn main() -> std::process::ExitCode {
    pageviews::cli::worker(&std::env::args().skip(1).collect::<Vec<_>>())
}
