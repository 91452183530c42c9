//! The whole stack in the foreground, without Nix: throwaway PostgreSQL and RabbitMQ, the
//! migration, app, worker and nginx (TLS with a certificate made at start). Ctrl-C or SIGTERM
//! stops everything it started and removes its files.
//!
//! Run with `cargo run --release -p pageviews-stack`.

use pageviews::config::{Environment, parsed};
use pageviews_testbed::nginx::NginxOptions;
use pageviews_testbed::pgbackrest::{self, BackupType, Step};
use pageviews_testbed::{BackupRepository, Binaries, ClusterStack, Deployment, Postgres, ScratchDir, Stack};
use std::process::ExitCode;
use std::time::Duration;

const PROGRAM: &str = "pageviews-stack";

fn main() -> ExitCode {
    pageviews_stack::main(PROGRAM, "(no arguments; see README.md)", settings, run)
}

/// Nodes in the RabbitMQ cluster; 1 is a single broker.
fn brokers() -> Result<usize, pageviews::config::ConfigError> {
    const NAME: &str = "PAGEVIEWS_STACK_BROKERS";
    match parsed(&Environment, NAME, 1usize, "a number of broker nodes")? {
        0 => Err(pageviews::config::ConfigError::new(NAME, "must be at least 1")),
        n => Ok(n),
    }
}

/// The launcher's settings: nginx's and the brokers', then whether to back up the database.
fn settings() -> Result<((NginxOptions, usize), bool), pageviews::config::ConfigError> {
    Ok((options()?, backup()?))
}

enum Running {
    Single(Stack),
    Cluster(ClusterStack),
}

impl Running {
    fn deployment(&mut self) -> &mut Deployment {
        match self {
            Running::Single(s) => &mut s.deployment,
            Running::Cluster(c) => &mut c.deployment,
        }
    }

    fn postgres(&mut self) -> &mut Postgres {
        match self {
            Running::Single(s) => &mut s.services.postgres,
            Running::Cluster(c) => &mut c.postgres,
        }
    }
}

fn options() -> Result<(NginxOptions, usize), pageviews::config::ConfigError> {
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
    Ok((options, brokers()?))
}

async fn run(((options, brokers), backup): ((NginxOptions, usize), bool)) -> anyhow::Result<()> {
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
    let rabbitmq = if brokers == 1 {
        "RabbitMQ".to_owned()
    } else {
        format!("a {brokers}-node RabbitMQ cluster")
    };
    eprintln!(
        "{PROGRAM}: starting PostgreSQL, {rabbitmq}, app, worker and nginx under {}",
        dir.path().display()
    );
    let mut stack = if brokers == 1 {
        Running::Single(Stack::start(dir.path(), &binaries, options, &[]).await?)
    } else {
        Running::Cluster(ClusterStack::start(dir.path(), &binaries, options, &[], brokers).await?)
    };
    // Held to the end: the repository's directory is under `dir`.
    let _backups = match backup {
        true => Some(start_backups(&mut stack, dir.path()).await?),
        false => None,
    };
    let d = stack.deployment();
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
                let d = stack.deployment();
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

/// `PAGEVIEWS_STACK_BACKUP=1`: a pgBackRest repository for the stack's database.
fn backup() -> Result<bool, pageviews::config::ConfigError> {
    const NAME: &str = "PAGEVIEWS_STACK_BACKUP";
    match parsed(&Environment, NAME, 0u8, "0 or 1")? {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(pageviews::config::ConfigError::new(NAME, "must be 0 or 1")),
    }
}

/// WAL archiving into a pgBackRest repository under `dir` (PostgreSQL restarts once to turn
/// `archive_mode` on; app and worker reconnect), a first full backup, and the commands to
/// back up and restore printed.
async fn start_backups(stack: &mut Running, dir: &std::path::Path) -> anyhow::Result<BackupRepository> {
    let repository = BackupRepository::new(&dir.join("pgbackrest"), pgbackrest::Settings::default())?;
    let postgres = stack.postgres();
    postgres.set_archiving(Some(repository.archiving())).await?;
    repository.attach(postgres).await?;
    repository.backup(BackupType::Full).await?;
    let stanza = repository.stanza();
    let line = |step: Step| pgbackrest::command_line(&step.args(stanza));
    let exports: Vec<String> = repository.env().iter().map(|(k, v)| format!("{k}={v}")).collect();
    let as_user = if pageviews_testbed::process::is_root() {
        "runuser -u postgres -- "
    } else {
        ""
    };
    println!(
        "\npgBackRest: stanza {stanza}, repository {repo} (WAL archived, one full backup taken)\n  \
         environment:  export {exports}\n  \
         last backup:  {as_user}{info}\n  \
         back up:      {as_user}{diff}   (or --type=full, --type=incr)\n  \
         restore:      {as_user}{time}\n                \
         (PostgreSQL stopped first; the drill, cargo test --test integration restore, runs it all)",
        repo = repository.repo_path().display(),
        exports = exports.join(" "),
        info = line(Step::Info),
        diff = line(Step::Backup(BackupType::Diff)),
        time = line(Step::RestoreToTime("$TARGET".to_owned())),
    );
    Ok(repository)
}
