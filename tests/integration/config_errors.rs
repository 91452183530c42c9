//! Bad configuration stops a binary at start with the variable named and a non-zero exit.

use crate::support::binaries;
use std::process::Command;

fn run(mut command: Command, env: &[(&str, &str)]) -> (i32, String) {
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    for (k, v) in env {
        command.env(k, v);
    }
    let output = command.output().expect("the binary runs");
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
        let shown = format!("{command:?} {env:?}");
        let (code, stderr) = run(command, &env);
        assert_eq!(code, 2, "{shown}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{shown}: expected {expected:?} in {stderr:?}"
        );
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
