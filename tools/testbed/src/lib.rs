//! Starts the whole stack from the binaries on this machine: throwaway PostgreSQL and
//! RabbitMQ, the migration, app, worker and nginx. Used by `pageviews-stack` and by the
//! integration tests, so both run the same code.

pub mod activation;
pub mod link;
pub mod nginx;
pub mod notify;
pub mod patroni;
pub mod pgbackrest;
pub mod postgres;
pub mod process;
pub mod prometheus;
pub mod rabbitmq;
pub mod rabbitmq_cluster;
pub mod tls;

use activation::ListenSocket;
use anyhow::Context;
use process::Process;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub use patroni::PatroniCluster;
pub use pgbackrest::Repository as BackupRepository;
pub use postgres::{Archiving, Postgres};
pub use rabbitmq::RabbitMq;
pub use rabbitmq_cluster::RabbitMqCluster;

/// A directory under the system temp dir, removed on drop: a fresh random name made with
/// mode 0700 in one step (mkdtemp), so nobody else on the machine can read or pre-create it.
pub struct ScratchDir(tempfile::TempDir);

impl ScratchDir {
    pub fn new(prefix: &str) -> anyhow::Result<ScratchDir> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix(&format!("{prefix}-"))
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir()
            .with_context(|| format!("cannot create a directory {prefix}-* under the temp dir"))?;
        Ok(ScratchDir(dir))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// Keeps the directory (for looking at logs after a failure).
    pub fn keep(self) -> PathBuf {
        self.0.keep()
    }
}

/// A password for a throwaway server: 128 random bits, hex (safe in any URL).
pub fn generate_password() -> anyhow::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("cannot read /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Creates `dir` with mode 0700 (its parent must exist).
pub fn private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

/// Writes a file only the owner can read, created with that mode (never readable first).
pub fn write_private(path: &Path, contents: impl AsRef<[u8]>) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(contents.as_ref()))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// How to run the app and the worker: the installed binaries, or this executable re-run with
/// a subcommand (so `cargo run -p pageviews-stack` needs nothing else built).
#[derive(Clone, Debug)]
pub struct Binaries {
    pub app: (PathBuf, Vec<String>),
    pub worker: (PathBuf, Vec<String>),
}

impl Binaries {
    pub fn new(app: impl Into<PathBuf>, worker: impl Into<PathBuf>) -> Self {
        Binaries {
            app: (app.into(), vec![]),
            worker: (worker.into(), vec![]),
        }
    }

    /// This executable re-run as `<exe> app` and `<exe> worker` (`pageviews_stack::main` answers those),
    /// so `cargo run --bin <launcher>` needs nothing else built.
    pub fn this_executable() -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find this executable")?;
        Ok(Binaries {
            app: (exe.clone(), vec!["app".into()]),
            worker: (exe, vec!["worker".into()]),
        })
    }

    pub fn app_command(&self) -> Command {
        let mut command = Command::new(&self.app.0);
        command.args(&self.app.1);
        command
    }

    pub fn worker_command(&self) -> Command {
        let mut command = Command::new(&self.worker.0);
        command.args(&self.worker.1);
        command
    }
}

/// PostgreSQL and RabbitMQ.
pub struct Services {
    pub postgres: Postgres,
    pub rabbitmq: RabbitMq,
}

impl Services {
    pub async fn start(dir: &Path, durable: bool) -> anyhow::Result<Services> {
        let (pg_dir, mq_dir) = (dir.join("postgres"), dir.join("rabbitmq"));
        if !dir.exists() {
            private_dir(dir)?;
        }
        private_dir(&pg_dir)?;
        private_dir(&mq_dir)?;
        let (postgres, rabbitmq) = tokio::try_join!(Postgres::start(&pg_dir, durable), RabbitMq::start(&mq_dir))?;
        Ok(Services { postgres, rabbitmq })
    }

    /// Process groups of the servers, for cleanup at exit when `Services` lives in a static.
    pub fn process_groups(&self) -> Vec<u32> {
        [self.postgres.pid(), self.rabbitmq.pid()]
            .into_iter()
            .flatten()
            .collect()
    }
}

/// The environment app and worker need, besides their own settings.
#[derive(Clone, Debug)]
pub struct Urls {
    pub database: String,
    pub amqp: String,
}

/// Runs `pageviews-app migrate` and fails with its output when it fails.
pub fn migrate(binaries: &Binaries, urls: &Urls, log: &Path) -> anyhow::Result<()> {
    let mut command = binaries.app_command();
    let output = command
        .arg("migrate")
        .env("DATABASE_URL", &urls.database)
        .output()
        .context("cannot run migrate")?;
    std::fs::write(log, [&output.stdout[..], &output.stderr[..]].concat())?;
    anyhow::ensure!(
        output.status.success(),
        "migrate failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// How long a service may take to send READY=1 (systemd's default TimeoutStartSec is 90 s).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The app's command on `urls`.
fn app_command(binaries: &Binaries, urls: &Urls, extra_env: &[(&str, String)]) -> Command {
    let mut command = binaries.app_command();
    command.env("DATABASE_URL", &urls.database).env("AMQP_URL", &urls.amqp);
    for (k, v) in extra_env {
        command.env(k, v);
    }
    command
}

/// The worker's command on `urls`.
fn worker_command(binaries: &Binaries, urls: &Urls, extra_env: &[(&str, String)]) -> Command {
    let mut command = binaries.worker_command();
    command.env("DATABASE_URL", &urls.database).env("AMQP_URL", &urls.amqp);
    for (k, v) in extra_env {
        command.env(k, v);
    }
    command
}

/// Starts the app on `socket`, passed the way systemd passes it, and waits for READY=1.
/// Notify sockets go next to the log.
pub async fn start_app(
    binaries: &Binaries,
    urls: &Urls,
    socket: &ListenSocket,
    extra_env: &[(&str, String)],
    log: &Path,
) -> anyhow::Result<Process> {
    let command = app_command(binaries, urls, extra_env);
    let dir = log.parent().unwrap_or(Path::new("."));
    activation::start("pageviews-app", command, Some(socket), dir, log, START_TIMEOUT).await
}

/// Starts the app on `socket` and waits until it answers `/healthz`, ready or not: with its
/// database away it serves (503) but sends no READY=1.
pub async fn start_app_unready(
    binaries: &Binaries,
    urls: &Urls,
    socket: &ListenSocket,
    extra_env: &[(&str, String)],
    log: &Path,
) -> anyhow::Result<Process> {
    let command = app_command(binaries, urls, extra_env);
    let dir = log.parent().unwrap_or(Path::new("."));
    let mut process = activation::spawn("pageviews-app", command, Some(socket), dir, log)?;
    let url = format!("http://127.0.0.1:{}/healthz", socket.port());
    let client = reqwest::Client::new();
    let serving = process::wait_until("pageviews-app", START_TIMEOUT, || {
        let request = client.get(&url).send();
        async move { Ok(request.await?.error_for_status()?) }
    })
    .await;
    if let Err(e) = serving {
        let exited = process.try_wait();
        anyhow::bail!("{e:#} (exit: {exited:?}); log:\n{}", process::tail(log, 20));
    }
    Ok(process)
}

/// Starts a worker and waits for READY=1 (it consumes).
pub async fn start_worker(
    binaries: &Binaries,
    urls: &Urls,
    extra_env: &[(&str, String)],
    log: &Path,
) -> anyhow::Result<Process> {
    let command = worker_command(binaries, urls, extra_env);
    let dir = log.parent().unwrap_or(Path::new("."));
    activation::start("pageviews-worker", command, None, dir, log, START_TIMEOUT).await
}

/// Starts a worker without waiting for READY=1 (its broker or database away).
pub fn start_worker_unready(
    binaries: &Binaries,
    urls: &Urls,
    extra_env: &[(&str, String)],
    log: &Path,
) -> anyhow::Result<Process> {
    let command = worker_command(binaries, urls, extra_env);
    let dir = log.parent().unwrap_or(Path::new("."));
    activation::spawn("pageviews-worker", command, None, dir, log)
}

/// App, worker and nginx in front, on given database and broker URLs.
pub struct Deployment {
    // Field order is drop order: the edge first, the data last.
    pub nginx: nginx::Nginx,
    pub app: Process,
    pub worker: Process,
    /// The app's listening socket, held here as systemd's `pageviews-app.socket` holds it.
    pub app_socket: ListenSocket,
    pub app_port: u16,
    pub certificates: tls::Certificates,
    pub options: nginx::NginxOptions,
    launch: Launch,
}

/// What restarting the app or the worker needs.
struct Launch {
    dir: PathBuf,
    binaries: Binaries,
    urls: Urls,
    app_env: Vec<(String, String)>,
    worker_env: Vec<(String, String)>,
}

fn borrowed(env: &[(String, String)]) -> Vec<(&str, String)> {
    env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect()
}

/// How long a stopping app or worker may take to drain (the units' TimeoutStopSec).
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

impl Deployment {
    /// Migrates, then starts the app, the worker and nginx; logs and configuration go to `dir`.
    pub async fn start(
        dir: &Path,
        binaries: &Binaries,
        urls: &Urls,
        mut options: nginx::NginxOptions,
        app_env: &[(&str, String)],
        worker_env: &[(&str, String)],
    ) -> anyhow::Result<Deployment> {
        let owned = |env: &[(&str, String)]| env.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        let launch = Launch {
            dir: dir.to_owned(),
            binaries: binaries.clone(),
            urls: urls.clone(),
            app_env: owned(app_env),
            worker_env: owned(worker_env),
        };
        migrate(binaries, urls, &dir.join("migrate.log"))?;
        let app_socket = ListenSocket::loopback()?;
        let app_port = app_socket.port();
        let app = start_app(binaries, urls, &app_socket, app_env, &dir.join("app.log")).await?;
        let worker = start_worker(binaries, urls, worker_env, &dir.join("worker.log")).await?;
        let certificates = tls::generate(dir)?;
        options.upstreams = vec![format!("127.0.0.1:{app_port}")];
        let nginx = nginx::Nginx::start(&dir.join("nginx"), &options, &certificates).await?;
        Ok(Deployment {
            nginx,
            app,
            worker,
            app_socket,
            app_port,
            certificates,
            options,
            launch,
        })
    }

    /// `systemctl restart pageviews-app`: SIGTERM, wait for the exit (requests in flight
    /// finish), start a new app on the same socket and wait for its READY=1. Returns how the
    /// old one exited.
    pub async fn restart_app(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let status = self.app.stop_async(libc::SIGTERM, STOP_TIMEOUT).await;
        let l = &self.launch;
        self.app = start_app(
            &l.binaries,
            &l.urls,
            &self.app_socket,
            &borrowed(&l.app_env),
            &l.dir.join("app.log"),
        )
        .await?;
        status.context("the app was not running")
    }

    /// `systemctl restart pageviews-worker`, the same way.
    pub async fn restart_worker(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let status = self.worker.stop_async(libc::SIGTERM, STOP_TIMEOUT).await;
        let l = &self.launch;
        self.worker = start_worker(
            &l.binaries,
            &l.urls,
            &borrowed(&l.worker_env),
            &l.dir.join("worker.log"),
        )
        .await?;
        status.context("the worker was not running")
    }

    pub fn https_url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.options.https_port)
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://localhost:{}{path}", self.options.http_port)
    }

    /// The app directly, bypassing nginx (for what the public side must not reach).
    pub fn app_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.app_port)
    }
}

/// Which servers a [`Stack`] runs: `postgres` database nodes (1 is one server; more are a
/// Patroni cluster with etcd and synchronous replication) and `brokers` RabbitMQ nodes (1 is
/// one broker; more are a cluster).
#[derive(Clone, Copy, Debug)]
pub struct Topology {
    pub postgres: usize,
    pub brokers: usize,
}

impl Default for Topology {
    /// One server of each.
    fn default() -> Self {
        Topology {
            postgres: 1,
            brokers: 1,
        }
    }
}

/// The stack's database: one durable PostgreSQL, or a durable Patroni cluster (not strict:
/// the primary goes on alone when every standby is gone).
pub enum Database {
    Single(Postgres),
    Patroni(PatroniCluster),
}

impl Database {
    /// Starts `nodes` of them under `dir`, in `postgres/` or `patroni/`.
    pub async fn start(dir: &Path, nodes: usize) -> anyhow::Result<Database> {
        Ok(match nodes {
            0 => anyhow::bail!("the database needs at least one node"),
            1 => Database::Single(Postgres::start(&dir.join("postgres"), true).await?),
            n => {
                let options = patroni::Options {
                    durable: true,
                    strict: false,
                };
                Database::Patroni(PatroniCluster::start(&dir.join("patroni"), n, options).await?)
            }
        })
    }

    /// Creates a database and returns its URL (every node's, for a cluster).
    pub async fn create_database(&self, name: &str) -> anyhow::Result<String> {
        match self {
            Database::Single(postgres) => postgres.create_database(name).await,
            Database::Patroni(cluster) => cluster.create_database(name).await,
        }
    }

    /// The URL of `database` as the superuser (every node's, for a cluster).
    pub fn url(&self, database: &str) -> String {
        match self {
            Database::Single(postgres) => postgres.url(database),
            Database::Patroni(cluster) => cluster.url(database),
        }
    }

    /// The server, unless this is a cluster.
    pub fn single(&self) -> Option<&Postgres> {
        match self {
            Database::Single(postgres) => Some(postgres),
            Database::Patroni(_) => None,
        }
    }

    pub fn single_mut(&mut self) -> Option<&mut Postgres> {
        match self {
            Database::Single(postgres) => Some(postgres),
            Database::Patroni(_) => None,
        }
    }
}

/// The stack's broker side: one RabbitMQ, or a cluster of them.
pub enum Brokers {
    Single(RabbitMq),
    Cluster(RabbitMqCluster),
}

impl Brokers {
    /// Starts `nodes` of them under `dir`, in `rabbitmq/`.
    pub async fn start(dir: &Path, nodes: usize) -> anyhow::Result<Brokers> {
        let dir = dir.join("rabbitmq");
        Ok(match nodes {
            0 => anyhow::bail!("RabbitMQ needs at least one node"),
            1 => Brokers::Single(RabbitMq::start(&dir).await?),
            n => Brokers::Cluster(RabbitMqCluster::start(&dir, n).await?),
        })
    }

    /// Creates a vhost and returns its URL (every node's, for a cluster).
    pub fn create_vhost(&self, vhost: &str) -> anyhow::Result<String> {
        match self {
            Brokers::Single(rabbitmq) => rabbitmq.create_vhost(vhost),
            Brokers::Cluster(cluster) => cluster.create_vhost(vhost),
        }
    }
}

/// Everything, on throwaway servers: what `pageviews-stack` runs (and the benchmark, on one
/// server of each).
pub struct Stack {
    // Field order is drop order: the edge first, the data last.
    pub deployment: Deployment,
    pub brokers: Brokers,
    pub database: Database,
}

impl Stack {
    /// Starts the servers of `topology` under `dir/services` (in parallel), then the
    /// deployment on a `pageviews` database and vhost; logs go to `dir`.
    pub async fn start(
        dir: &Path,
        binaries: &Binaries,
        options: nginx::NginxOptions,
        app_env: &[(&str, String)],
        topology: Topology,
    ) -> anyhow::Result<Stack> {
        let services = dir.join("services");
        private_dir(&services)?;
        let (database, brokers) = tokio::try_join!(
            Database::start(&services, topology.postgres),
            Brokers::start(&services, topology.brokers)
        )?;
        let urls = Urls {
            database: database.create_database("pageviews").await?,
            amqp: brokers.create_vhost("pageviews")?,
        };
        let deployment = Deployment::start(dir, binaries, &urls, options, app_env, &[]).await?;
        Ok(Stack {
            deployment,
            brokers,
            database,
        })
    }
}
