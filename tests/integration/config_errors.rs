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
    for (command, env, expected) in bad_settings() {
        let env: Vec<(&str, &OsStr)> = env.iter().map(|(k, v)| (*k, OsStr::new(v))).collect();
        assert_refused(command, &env, expected);
    }
}

/// `check-config` refuses every setting the service refuses, with the same message, without
/// connecting to anything (nothing listens at the URLs).
#[test]
fn check_config_refuses_what_the_service_refuses() {
    for (mut command, env, expected) in bad_settings() {
        if command.get_args().next().is_some() {
            continue; // `migrate` reads only the database settings
        }
        command.arg("check-config");
        let env: Vec<(&str, &OsStr)> = env.iter().map(|(k, v)| (*k, OsStr::new(v))).collect();
        assert_refused(command, &env, expected);
    }
}

fn bad_settings() -> Vec<Case<'static>> {
    vec![
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
        // A password file next to a URL that has a password already, or names no user.
        (
            binaries().app_command(),
            vec![
                ("DATABASE_URL", "postgres://u:p@127.0.0.1:1/db"),
                MQ,
                ("PAGEVIEWS_DATABASE_PASSWORD_FILE", "/dev/null"),
            ],
            "PAGEVIEWS_DATABASE_PASSWORD_FILE: /dev/null is empty",
        ),
        (
            binaries().worker_command(),
            vec![DB, MQ, ("PAGEVIEWS_AMQP_PASSWORD_FILE", "/nonexistent/amqp-password")],
            "PAGEVIEWS_AMQP_PASSWORD_FILE: cannot read /nonexistent/amqp-password",
        ),
    ]
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

/// Runs `command` with exactly `env` (and PATH), to its end: (exit code, stdout, stderr).
fn output(mut command: Command, env: &[(&str, &str)]) -> (i32, String, String) {
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    for (k, v) in env {
        command.env(k, v);
    }
    let output = command.output().expect("the binary runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn check_config(mut command: Command, flag: Option<&str>) -> Command {
    command.arg("check-config").args(flag);
    command
}

/// `check-config --json`: the settings each binary would run with, one key per variable,
/// passwords (from the URL or a password file) shown as `***`; without `--json`, exit 0 and
/// one line.
#[test]
fn check_config_prints_the_effective_settings_without_passwords() {
    let dir = pageviews_testbed::ScratchDir::new("pageviews-check-config").unwrap();
    let password_file = dir.path().join("db-password");
    std::fs::write(&password_file, "Sup3r/secret@pw\n").unwrap();
    let password_file = password_file.to_str().unwrap();
    let env = [
        ("DATABASE_URL", "postgres://pageviews-app@10.0.0.3:5432/pageviews"),
        ("PAGEVIEWS_DATABASE_PASSWORD_FILE", password_file),
        (
            "AMQP_URL",
            "amqp://u:Sup3rAmqp@10.0.0.3:5672/pageviews,amqp://u:Sup3rAmqp@10.0.0.4:5672/pageviews",
        ),
        ("PAGEVIEWS_LISTEN", "/run/pageviews-app/app.sock"),
        ("PAGEVIEWS_DB_POOL_SIZE", "32"),
        ("PAGEVIEWS_LOG_FORMAT", "json"),
    ];
    let (code, stdout, stderr) = output(check_config(binaries().app_command(), Some("--json")), &env);
    assert_eq!(code, 0, "{stderr}");
    for secret in ["Sup3r", "secret", "%40pw"] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{secret} in {stdout}{stderr}"
        );
    }
    let app: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        app["DATABASE_URL"],
        "postgres://pageviews-app:***@10.0.0.3:5432/pageviews"
    );
    assert_eq!(app["PAGEVIEWS_DATABASE_PASSWORD_FILE"], password_file);
    assert_eq!(
        app["AMQP_URL"],
        "amqp://u:***@10.0.0.3:5672/pageviews,amqp://u:***@10.0.0.4:5672/pageviews"
    );
    assert_eq!(app["PAGEVIEWS_LISTEN"], "/run/pageviews-app/app.sock");
    assert_eq!(app["PAGEVIEWS_DB_POOL_SIZE"], 32);
    assert_eq!(app["PAGEVIEWS_SWEEP_INTERVAL_SECS"], 10);
    assert_eq!(app["PAGEVIEWS_LOG_FORMAT"], "json");
    assert_eq!(app["RUST_LOG"], "info");

    let (code, stdout, stderr) = output(check_config(binaries().worker_command(), Some("--json")), &env);
    assert_eq!(code, 0, "{stderr}");
    let worker: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(worker["PAGEVIEWS_PREFETCH"], 100);
    assert_eq!(worker["PAGEVIEWS_METRICS_LISTEN"], serde_json::Value::Null);
    assert_eq!(worker["DATABASE_URL"], app["DATABASE_URL"]);

    let (code, stdout, stderr) = output(check_config(binaries().worker_command(), None), &env);
    assert_eq!(
        (code, stdout.as_str()),
        (0, "pageviews-worker: the settings are valid\n"),
        "{stderr}"
    );
    let (code, _, stderr) = output(check_config(binaries().app_command(), Some("--yaml")), &env);
    assert_eq!(code, 2);
    assert!(stderr.contains("unexpected arguments [\"--yaml\"]"), "{stderr}");
}

/// A password file and a URL that has a password already: which one is meant is not
/// guessed, and neither password is shown.
#[test]
fn a_password_in_the_url_and_a_password_file_are_refused() {
    let dir = pageviews_testbed::ScratchDir::new("pageviews-password-twice").unwrap();
    let file = dir.path().join("amqp-password");
    std::fs::write(&file, "fromfile\n").unwrap();
    let env = [
        DB,
        ("AMQP_URL", "amqp://u:p@127.0.0.1:1/%2f"),
        ("PAGEVIEWS_AMQP_PASSWORD_FILE", file.to_str().unwrap()),
    ];
    for command in [
        binaries().app_command(),
        check_config(binaries().worker_command(), None),
    ] {
        let (code, _, stderr) = output(command, &env);
        assert_eq!(code, 2, "{stderr}");
        assert!(
            stderr.contains("AMQP_URL: has a password and PAGEVIEWS_AMQP_PASSWORD_FILE gives one too; set one"),
            "{stderr}"
        );
        assert!(!stderr.contains("fromfile") && !stderr.contains("u:p@"), "{stderr}");
    }
}

/// Options of the NixOS module whose default is the module's own choice, not the binaries'
/// (each option's description says why).
const MODULE_CHOICES: [&str; 3] = [
    // Native journal fields under systemd.
    "PAGEVIEWS_LOG_FORMAT",
    // The socket unit's socket, or the private address when split.
    "PAGEVIEWS_LISTEN",
    // On for Prometheus.
    "PAGEVIEWS_METRICS_LISTEN",
];

/// One source for every default: the binaries (`check-config --defaults-json`). The NixOS
/// module reads nix/modules/settings-defaults.json, which must be exactly that; each of its
/// `settings` options takes its default from there unless it is one of `MODULE_CHOICES`; and
/// README's settings table states the same defaults.
#[test]
fn the_nixos_module_and_readme_state_the_binaries_defaults() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let (code, stdout, stderr) = output(check_config(binaries().app_command(), Some("--defaults-json")), &[]);
    assert_eq!(code, 0, "{stderr}");
    let defaults: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    let (_, worker, _) = output(check_config(binaries().worker_command(), Some("--defaults-json")), &[]);
    assert_eq!(worker, stdout, "the worker prints other defaults");

    let file = root.join("nix/modules/settings-defaults.json");
    let in_nix: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(
        in_nix,
        defaults,
        "{} differs from the binaries' defaults; regenerate it: pageviews-app check-config --defaults-json > nix/modules/settings-defaults.json",
        file.display()
    );

    let module = std::fs::read_to_string(root.join("nix/modules/default.nix")).unwrap();
    let settings = &module[module.find("settings = mkOption {").expect("the settings option")..];
    let mut options = 0;
    for name in defaults.keys() {
        let Some(at) = settings.find(&format!("{name} = mkOption {{")) else {
            continue; // freeform: the module states no default
        };
        options += 1;
        let from = &settings[at..];
        let default = &from[from.find("default =").expect("an option with a default") + "default =".len()..];
        let default = default[..default.find(';').unwrap()].trim();
        if MODULE_CHOICES.contains(&name.as_str()) {
            assert!(
                !default.contains("binaryDefaults"),
                "{name} is listed as the module's choice"
            );
        } else {
            assert_eq!(
                default,
                format!("binaryDefaults.{name}"),
                "nix/modules/default.nix: the default of settings.{name} must come from settings-defaults.json"
            );
        }
    }
    assert!(
        options >= 8,
        "only {options} settings options found in nix/modules/default.nix"
    );

    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    for (name, value) in &defaults {
        let row = readme
            .lines()
            .find(|l| l.starts_with(&format!("| `{name}` |")))
            .unwrap_or_else(|| panic!("README's settings table has no row for {name}"));
        let stated = row.split('|').nth(3).unwrap().trim();
        let expected = match value {
            serde_json::Value::Null => "unset".to_owned(),
            serde_json::Value::String(s) => format!("`{s}`"),
            other => other.to_string(),
        };
        assert_eq!(stated, expected, "README.md, {name}: {row}");
    }
}

/// The units' form: URLs without passwords, the passwords in files (trailing newline and
/// all); migrate, the app and the worker reach PostgreSQL and RabbitMQ with them, and a page
/// view goes all the way through.
#[tokio::test(flavor = "multi_thread")]
async fn passwords_from_files_reach_postgresql_and_rabbitmq() -> anyhow::Result<()> {
    use crate::support::{TestEnv, client};
    let env = TestEnv::new().await?;
    let without_password = |url: &str, file: &str| -> anyhow::Result<(String, String)> {
        let mut url = url::Url::parse(url)?;
        let password = url.password().expect("the test servers use passwords").to_owned();
        url.set_password(None).expect("a URL with a host");
        let path = env.dir.path().join(file);
        std::fs::write(&path, format!("{password}\n"))?;
        Ok((url.into(), path.to_str().unwrap().to_owned()))
    };
    let (database, db_file) = without_password(&env.urls.database, "db-password")?;
    let (amqp, amqp_file) = without_password(&env.urls.amqp, "amqp-password")?;
    let urls = pageviews_testbed::Urls { database, amqp };
    let files = [
        ("PAGEVIEWS_DATABASE_PASSWORD_FILE", db_file.clone()),
        ("PAGEVIEWS_AMQP_PASSWORD_FILE", amqp_file),
    ];

    let migrate = binaries()
        .app_command()
        .arg("migrate")
        .env("DATABASE_URL", &urls.database)
        .env("PAGEVIEWS_DATABASE_PASSWORD_FILE", &db_file)
        .output()?;
    assert!(migrate.status.success(), "{}", String::from_utf8_lossy(&migrate.stderr));

    let socket = pageviews_testbed::activation::ListenSocket::loopback()?;
    let _app = pageviews_testbed::start_app(&binaries(), &urls, &socket, &files, &env.log("app")).await?;
    let _worker = pageviews_testbed::start_worker(&binaries(), &urls, &files, &env.log("worker")).await?;
    let page = client()
        .get(format!("http://127.0.0.1:{}/", socket.port()))
        .send()
        .await?;
    assert_eq!(page.status(), 200);
    assert_eq!(env.all_processed(Duration::from_secs(20)).await?, 1);
    Ok(())
}
