//! The HTTP app; `pageviews-app migrate` applies the database migrations and exits.
fn main() -> std::process::ExitCode {
    pageviews::cli::app(&std::env::args().skip(1).collect::<Vec<_>>())
}
