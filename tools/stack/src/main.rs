//! The whole stack in the foreground, without Nix: throwaway PostgreSQL (one server, or with
//! `PAGEVIEWS_STACK_PATRONI=1` etcd and three Patroni-run nodes) and RabbitMQ (one broker, or
//! `PAGEVIEWS_STACK_BROKERS` nodes), the migration, app, worker and nginx (TLS with a
//! certificate made at start). Ctrl-C or SIGTERM stops everything it started and removes its
//! files.
//!
//! Run with `cargo run --release -p pageviews-stack`.

use pageviews::config::{ConfigError, Environment, parsed};
use pageviews_testbed::nginx::NginxOptions;
use pageviews_testbed::pgbackrest::{self, BackupType, Step};
use pageviews_testbed::{BackupRepository, Binaries, Database, PatroniCluster, Postgres, ScratchDir, Stack, Topology};
use std::process::ExitCode;
use std::time::Duration;

const PROGRAM: &str = "pageviews-stack";
/// Database nodes with `PAGEVIEWS_STACK_PATRONI=1`, as nix/modules/database-ha.nix has them.
const PATRONI_NODES: usize = 3;

fn main() -> ExitCode {
    pageviews_stack::main(PROGRAM, "(no arguments; see README.md)", settings, run)
}

/// The launcher's settings.
struct Settings {
    nginx: NginxOptions,
    topology: Topology,
    /// `PAGEVIEWS_STACK_BACKUP=1`: a pgBackRest repository for the stack's database.
    backup: bool,
}

/// nginx's settings, the brokers', whether to back up the database (`PAGEVIEWS_STACK_BACKUP`)
/// and whether it is a Patroni cluster (`PAGEVIEWS_STACK_PATRONI`).
fn settings() -> Result<Settings, ConfigError> {
    let nginx = options()?;
    let brokers = brokers()?;
    let backup = switch("PAGEVIEWS_STACK_BACKUP")?;
    let patroni = switch("PAGEVIEWS_STACK_PATRONI")?;
    if backup && patroni {
        return Err(ConfigError::new(
            "PAGEVIEWS_STACK_BACKUP",
            "is 1, and so is PAGEVIEWS_STACK_PATRONI: the local pgBackRest setup backs up the single PostgreSQL server, not the Patroni cluster; set one of them only",
        ));
    }
    let postgres = if patroni { PATRONI_NODES } else { 1 };
    Ok(Settings {
        nginx,
        topology: Topology { postgres, brokers },
        backup,
    })
}

/// Nodes in the RabbitMQ cluster; 1 is a single broker.
fn brokers() -> Result<usize, ConfigError> {
    const NAME: &str = "PAGEVIEWS_STACK_BROKERS";
    match parsed(&Environment, NAME, 1usize, "a number of broker nodes")? {
        0 => Err(ConfigError::new(NAME, "must be at least 1")),
        n => Ok(n),
    }
}

/// A switch: `name` is 0 (the default) or 1.
fn switch(name: &str) -> Result<bool, ConfigError> {
    match parsed(&Environment, name, 0u8, "0 or 1")? {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(ConfigError::new(name, "must be 0 or 1")),
    }
}

fn options() -> Result<NginxOptions, ConfigError> {
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

async fn run(settings: Settings) -> anyhow::Result<()> {
    let Settings {
        nginx: options,
        topology,
        backup,
    } = settings;
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
    let postgres = match topology.postgres {
        1 => "PostgreSQL".to_owned(),
        n => format!("etcd and {n} PostgreSQL nodes under Patroni"),
    };
    let rabbitmq = match topology.brokers {
        1 => "RabbitMQ".to_owned(),
        n => format!("a {n}-node RabbitMQ cluster"),
    };
    eprintln!(
        "{PROGRAM}: starting {postgres}, {rabbitmq}, app, worker and nginx under {}",
        dir.path().display()
    );
    let mut stack = Stack::start(dir.path(), &binaries, options, &[], topology).await?;
    // Held to the end: the repository's directory is under `dir`. (Settings refuse a backup
    // of a cluster.)
    let _backups = match stack.database.single_mut() {
        Some(postgres) if backup => Some(start_backups(postgres, dir.path()).await?),
        _ => None,
    };
    let d = &stack.deployment;
    println!(
        "\npageviews is up: {}\n  (HTTP {} redirects there; self-signed certificate, CA at {})\n  logs: {}/{{app,worker}}.log, nginx/error.log\n  Ctrl-C stops everything.\n",
        d.https_url("/"),
        d.http_url("/"),
        d.certificates.ca.display(),
        dir.path().display(),
    );
    if let Database::Patroni(cluster) = &stack.database {
        print_patroni(cluster).await;
    }
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

/// The database nodes, which one leads, and etcd: where to look at the cluster.
async fn print_patroni(cluster: &PatroniCluster) {
    let leader = match cluster.leader().await {
        Ok(i) => cluster.nodes[i].name.clone(),
        Err(_) => "none at this moment (a failover under way)".to_owned(),
    };
    println!(
        "PostgreSQL: {} nodes under Patroni, synchronous replication (app and worker are given every node)",
        cluster.nodes.len()
    );
    for node in &cluster.nodes {
        println!(
            "  {}  127.0.0.1:{}  REST API http://127.0.0.1:{}/  log {}",
            node.name,
            node.postgres_port,
            node.rest_port,
            node.log().display()
        );
    }
    println!(
        "  leader now: {leader}\n  \
         (GET /cluster on a REST API shows the members and their roles; GET /primary answers 200 only on the leader)\n  \
         etcd: http://127.0.0.1:{}  log {}\n",
        cluster.etcd.port,
        cluster.etcd.log().display()
    );
}

/// WAL archiving into a pgBackRest repository under `dir` (PostgreSQL restarts once to turn
/// `archive_mode` on; app and worker reconnect), a first full backup, and the commands to
/// back up and restore printed.
async fn start_backups(postgres: &mut Postgres, dir: &std::path::Path) -> anyhow::Result<BackupRepository> {
    let repository = BackupRepository::new(&dir.join("pgbackrest"), pgbackrest::Settings::default())?;
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
