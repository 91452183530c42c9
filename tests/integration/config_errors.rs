//! Bad configuration stops a binary at start with the variable named and a non-zero exit.

use crate::support::binaries;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub fn run(command: Command, env: &[(&str, &str)]) -> (i32, String) {
    let env: Vec<(&str, &OsStr)> = env.iter().map(|(k, v)| (*k, OsStr::new(v))).collect();
    run_os(command, &env)
}

/// Runs the binary with exactly `env` (and PATH); a binary that starts instead of refusing is
/// killed after a few seconds (exit -1).
fn run_os(mut command: Command, env: &[(&str, &OsStr)]) -> (i32, String) {
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("the binary runs");
    let deadline = Instant::now() + Duration::from_secs(5);
    while child.try_wait().expect("waitpid works").is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let output = child.wait_with_output().expect("the binary is reaped");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

const DB: (&str, &str) = ("DATABASE_URL", "postgres://u@127.0.0.1:1/db");
const MQ: (&str, &str) = ("AMQP_URL", "amqp://u:p@127.0.0.1:1/%2f");

/// A binary, its environment, and what it must say on stderr.
type Case<'a> = (Command, Vec<(&'a str, &'a str)>, &'a str);

#[test]
fn each_bad_setting_is_named_with_what_is_wrong() {
    let cases: Vec<Case> = vec![
        (
            binaries().app_command(),
            vec![MQ],
            "pageviews-app: configuration error: DATABASE_URL: is required but not set",
        ),
        (
            binaries().app_command(),
            vec![DB, MQ, ("PAGEVIEWS_LISTEN", "8000")],
            "PAGEVIEWS_LISTEN: \"8000\" is neither IP:PORT",
        ),
        (
            binaries().app_command(),
            vec![DB, MQ, ("LISTEN_FDS", "1"), ("LISTEN_PID", "self")],
            "LISTEN_FDS: socket activation: invalid LISTEN_PID (LISTEN_FDS=\"1\", LISTEN_PID=\"self\"",
        ),
        (
            binaries().app_command(),
            vec![DB, ("AMQP_URL", "redis://x")],
            "AMQP_URL: scheme \"redis\" is not amqp",
        ),
        (
            binaries().app_command(),
            vec![DB, MQ, ("PAGEVIEWS_LOG_FORMAT", "xml")],
            "PAGEVIEWS_LOG_FORMAT: \"xml\" is not",
        ),
        (
            binaries().worker_command(),
            vec![DB, MQ, ("PAGEVIEWS_PREFETCH", "lots")],
            "PAGEVIEWS_PREFETCH: \"lots\" is not a whole number",
        ),
        (
            binaries().worker_command(),
            vec![DB],
            "pageviews-worker: configuration error: AMQP_URL: is required but not set",
        ),
        (
            binaries().worker_command(),
            vec![DB, MQ, ("PAGEVIEWS_ROLLUP_INTERVAL_SECS", "0")],
            "PAGEVIEWS_ROLLUP_INTERVAL_SECS: must be at least 1 second",
        ),
        // Each number bounded (PostgreSQL refuses a statement_timeout above 2^31-1 ms: with
        // it the app never answered, not even /healthz).
        (
            binaries().app_command(),
            vec![DB, MQ, ("PAGEVIEWS_DB_TIMEOUT_MS", "2147483648")],
            "PAGEVIEWS_DB_TIMEOUT_MS: 2147483648 is more than 600000",
        ),
        (
            binaries().worker_command(),
            vec![DB, MQ, ("PAGEVIEWS_DB_TIMEOUT_MS", "18446744073709551615")],
            "PAGEVIEWS_DB_TIMEOUT_MS: 18446744073709551615 is more than 600000",
        ),
        (
            binaries().app_command(),
            vec![DB, MQ, ("PAGEVIEWS_SWEEP_INTERVAL_SECS", "18446744073709551615")],
            "PAGEVIEWS_SWEEP_INTERVAL_SECS: 18446744073709551615 is more than 86400",
        ),
        (
            binaries().worker_command(),
            vec![DB, MQ, ("PAGEVIEWS_ROLLUP_INTERVAL_SECS", "604800")],
            "PAGEVIEWS_ROLLUP_INTERVAL_SECS: 604800 is more than 86400",
        ),
        (
            binaries().app_command(),
            vec![DB, MQ, ("PAGEVIEWS_DB_POOL_SIZE", "100000")],
            "PAGEVIEWS_DB_POOL_SIZE: 100000 is more than 1000",
        ),
        // What systemd passes is checked too: a watchdog that silently never pings gets the
        // process killed.
        (
            binaries().app_command(),
            vec![DB, MQ, ("WATCHDOG_USEC", "30s")],
            "WATCHDOG_USEC: \"30s\" is not a whole number of microseconds",
        ),
        (
            binaries().worker_command(),
            vec![DB, MQ, ("WATCHDOG_USEC", "-1")],
            "WATCHDOG_USEC: \"-1\" is not a whole number of microseconds",
        ),
        (
            {
                let mut c = binaries().app_command();
                c.arg("migrate");
                c
            },
            vec![("DATABASE_URL", "mysql://nope")],
            "DATABASE_URL: not a PostgreSQL connection URL",
        ),
    ];
    for (command, env, expected) in cases {
        let env: Vec<(&str, &OsStr)> = env.iter().map(|(k, v)| (*k, OsStr::new(v))).collect();
        assert_refused(command, &env, expected);
    }
}

/// `WATCHDOG_USEC=0` means no watchdog (sd_watchdog_enabled(3)): both binaries run on
/// without one (before: the app's and the worker's watchdog task panicked).
#[test]
fn a_zero_watchdog_interval_means_no_watchdog() {
    for command in [binaries().app_command(), binaries().worker_command()] {
        let shown = format!("{command:?}");
        let env = [DB, MQ, ("WATCHDOG_USEC", "0"), ("PAGEVIEWS_LISTEN", "127.0.0.1:0")];
        let (code, stderr) = run(command, &env);
        assert_eq!(code, -1, "{shown} exited instead of running on: {stderr}");
        assert!(!stderr.contains("panicked"), "{shown}: {stderr}");
    }
}

#[test]
fn unknown_arguments_are_refused() {
    let mut command = binaries().app_command();
    command.arg("migrat");
    let (code, stderr) = run(command, &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("unexpected arguments [\"migrat\"]"), "{stderr}");
}

#[test]
fn an_unreachable_database_fails_migrate_with_exit_1() {
    let mut command = binaries().app_command();
    command.arg("migrate");
    let (code, stderr) = run(command, &[DB]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("cannot connect to the database"), "{stderr}");
}

/// A binary, its environment (any bytes), and what it must say on stderr.
type OsCase<'a> = (Command, Vec<(&'a str, &'a OsStr)>, &'a str);

/// A bad log filter, a value that is not UTF-8, a secret file with Windows line endings: each
/// refused at start with the variable named (before: a silent `info`, a U+FFFD in the value,
/// a `\r` kept at the end of the password).
#[test]
fn bad_log_filters_non_utf8_values_and_crlf_files_are_refused() {
    let dir = pageviews_testbed::ScratchDir::new("pageviews-config").unwrap();
    let crlf = dir.path().join("amqp-url");
    std::fs::write(&crlf, "amqp://u:p@127.0.0.1:1/%2f\r\n").unwrap();
    let crlf = crlf.to_str().unwrap();
    let crlf_error = format!("AMQP_URL_FILE: {crlf} contains a carriage return");
    let not_utf8 = OsStr::from_bytes(b"amqp://u:p\xff@127.0.0.1:1/%2f");
    let cases: Vec<OsCase> = vec![
        (
            binaries().app_command(),
            vec![
                (DB.0, DB.1.as_ref()),
                (MQ.0, MQ.1.as_ref()),
                ("RUST_LOG", "info,pageviews=loud".as_ref()),
            ],
            "pageviews-app: configuration error: RUST_LOG: \"info,pageviews=loud\" is not a log filter",
        ),
        (
            binaries().worker_command(),
            vec![(DB.0, DB.1.as_ref()), (MQ.0, MQ.1.as_ref()), ("RUST_LOG", "=".as_ref())],
            "pageviews-worker: configuration error: RUST_LOG:",
        ),
        (
            binaries().app_command(),
            vec![(DB.0, DB.1.as_ref()), ("AMQP_URL", not_utf8)],
            "AMQP_URL: is not valid UTF-8",
        ),
        (
            binaries().worker_command(),
            vec![(DB.0, DB.1.as_ref()), ("AMQP_URL_FILE", crlf.as_ref())],
            &crlf_error,
        ),
    ];
    for (command, env, expected) in cases {
        assert_refused(command, &env, expected);
    }
}

/// Exit 2, `expected` on stderr, and never the URL's credentials.
fn assert_refused(command: Command, env: &[(&str, &OsStr)], expected: &str) {
    let shown = format!("{command:?} {env:?}");
    let (code, stderr) = run_os(command, env);
    assert_eq!(code, 2, "{shown}: {stderr}");
    assert!(
        stderr.contains(expected),
        "{shown}: expected {expected:?} in {stderr:?}"
    );
    assert!(!stderr.contains("u:p@"), "{shown}: the secret in {stderr:?}");
}
