//! Starts the whole stack from the binaries on this machine: throwaway PostgreSQL and
//! RabbitMQ, the migration, app, worker and nginx. Used by `pageviews-stack` and by the
//! integration tests, so both run the same code.

pub mod activation;
pub mod nginx;
pub mod postgres;
pub mod process;
pub mod rabbitmq;
pub mod tls;

use activation::ListenSocket;
use anyhow::Context;
use process::Process;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub use postgres::Postgres;
pub use rabbitmq::RabbitMq;

/// A directory under the system temp dir, removed on drop.
pub struct ScratchDir(PathBuf);

static SCRATCH: AtomicU32 = AtomicU32::new(0);

impl ScratchDir {
    pub fn new(prefix: &str) -> anyhow::Result<ScratchDir> {
        let n = SCRATCH.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
        // Traversable, so services started as other users (PostgreSQL as root) reach their dirs.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        Ok(ScratchDir(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Keeps the directory (for looking at logs after a failure).
    pub fn keep(self) -> PathBuf {
        let path = self.0.clone();
        std::mem::forget(self);
        path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How to run the app and the worker: the installed binaries, or this executable re-run with
/// a subcommand (so `cargo run --bin pageviews-stack` needs nothing else built).
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

    /// This executable re-run as `<exe> app` and `<exe> worker` (`cli::child` answers those),
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

/// Starts the app on `socket`, passed the way systemd passes it, and waits for READY=1.
/// Notify sockets go next to the log.
pub async fn start_app(
    binaries: &Binaries,
    urls: &Urls,
    socket: &ListenSocket,
    extra_env: &[(&str, String)],
    log: &Path,
) -> anyhow::Result<Process> {
    let mut command = binaries.app_command();
    command.env("DATABASE_URL", &urls.database).env("AMQP_URL", &urls.amqp);
    for (k, v) in extra_env {
        command.env(k, v);
    }
    let dir = log.parent().unwrap_or(Path::new("."));
    activation::start("pageviews-app", command, Some(socket), dir, log, START_TIMEOUT).await
}

/// Starts a worker and waits for READY=1 (it consumes).
pub async fn start_worker(
    binaries: &Binaries,
    urls: &Urls,
    extra_env: &[(&str, String)],
    log: &Path,
) -> anyhow::Result<Process> {
    let mut command = binaries.worker_command();
    command.env("DATABASE_URL", &urls.database).env("AMQP_URL", &urls.amqp);
    for (k, v) in extra_env {
        command.env(k, v);
    }
    let dir = log.parent().unwrap_or(Path::new("."));
    activation::start("pageviews-worker", command, None, dir, log, START_TIMEOUT).await
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
        options.upstream = format!("127.0.0.1:{app_port}");
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

/// Everything, on throwaway PostgreSQL and RabbitMQ: what `pageviews-stack` runs.
pub struct Stack {
    pub deployment: Deployment,
    pub services: Services,
}

impl Stack {
    pub async fn start(
        dir: &Path,
        binaries: &Binaries,
        options: nginx::NginxOptions,
        app_env: &[(&str, String)],
    ) -> anyhow::Result<Stack> {
        let services = Services::start(&dir.join("services"), true).await?;
        let database = services.postgres.create_database("pageviews").await?;
        let amqp = services.rabbitmq.create_vhost("pageviews")?;
        let urls = Urls { database, amqp };
        let deployment = Deployment::start(dir, binaries, &urls, options, app_env, &[]).await?;
        Ok(Stack { deployment, services })
    }
}
