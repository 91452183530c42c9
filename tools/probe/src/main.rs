//! Checks a deployed pageviews stack from outside; exit 0 when every check passes.
//!
//! `pageviews-probe https://host[:port]/ [--ca-file ca.pem] [--http-url http://host:port/]`

use std::process::ExitCode;

const USAGE: &str = "usage: pageviews-probe https://HOST[:PORT]/ [--ca-file CA.pem] [--http-url http://HOST[:PORT]/]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut base, mut ca_file, mut http) = (None, None, None);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--ca-file" => ca_file = it.next().cloned(),
            "--http-url" => http = it.next().cloned(),
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            url if base.is_none() && !url.starts_with("--") => base = Some(url.to_owned()),
            other => {
                eprintln!("pageviews-probe: unexpected argument {other:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(base) = base else {
        eprintln!("pageviews-probe: the base URL is missing\n{USAGE}");
        return ExitCode::from(2);
    };
    let ca = match ca_file.as_deref().map(std::fs::read).transpose() {
        Ok(ca) => ca,
        Err(e) => {
            eprintln!("pageviews-probe: cannot read the CA file: {e}");
            return ExitCode::from(2);
        }
    };
    let probe = match pageviews_probe::Probe::new(&base, http.as_deref(), ca.as_deref()) {
        Ok(probe) => probe,
        Err(e) => {
            eprintln!("pageviews-probe: {e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime starts");
    let outcomes = runtime.block_on(probe.run());
    let mut failed = 0;
    for outcome in &outcomes {
        match &outcome.result {
            Ok(detail) => println!("ok   {}: {detail}", outcome.name),
            Err(e) => {
                failed += 1;
                println!("FAIL {}: {e:#}", outcome.name);
            }
        }
    }
    println!("{} of {} checks ok", outcomes.len() - failed, outcomes.len());
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
