//! Starts the whole stack from the binaries on this machine: throwaway PostgreSQL and
//! RabbitMQ, the migration, app, worker and nginx. Used by `pageviews-stack` and by the
//! integration tests, so both run the same code.

pub mod nginx;
pub mod postgres;
pub mod process;
pub mod rabbitmq;
pub mod rabbitmq_cluster;
pub mod tls;

use anyhow::Context;
use process::{Process, tail, wait_until};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub use postgres::Postgres;
pub use rabbitmq::RabbitMq;
pub use rabbitmq_cluster::{ClusterStack, RabbitMqCluster};

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

/// Starts the app listening on `listen` and waits until `/healthz` answers.
pub async fn start_app(
    binaries: &Binaries,
    urls: &Urls,
    port: u16,
    extra_env: &[(&str, String)],
    log: &Path,
) -> anyhow::Result<Process> {
    let mut command = binaries.app_command();
    command
        .env("DATABASE_URL", &urls.database)
        .env("AMQP_URL", &urls.amqp)
        .env("PAGEVIEWS_LISTEN", format!("127.0.0.1:{port}"));
    for (k, v) in extra_env {
        command.env(k, v);
    }
    let mut process = Process::spawn("pageviews-app", &mut command, log)?;
    let url = format!("http://127.0.0.1:{port}/healthz");
    let client = reqwest::Client::new();
    let ready = wait_until("pageviews-app", Duration::from_secs(30), || {
        let request = client.get(&url).send();
        async move { Ok(request.await?.error_for_status()?) }
    })
    .await;
    if let Err(e) = ready {
        let exited = process.try_wait();
        anyhow::bail!("{e:#} (exit: {exited:?}); log:\n{}", tail(log, 20));
    }
    Ok(process)
}

/// Starts a worker.
pub fn start_worker(
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
    Process::spawn("pageviews-worker", &mut command, log)
}

/// App, worker and nginx in front, on given database and broker URLs.
pub struct Deployment {
    // Field order is drop order: the edge first, the data last.
    pub nginx: nginx::Nginx,
    pub app: Process,
    pub worker: Process,
    pub app_port: u16,
    pub certificates: tls::Certificates,
    pub options: nginx::NginxOptions,
}

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
        migrate(binaries, urls, &dir.join("migrate.log"))?;
        let app_port = process::free_port()?;
        let app = start_app(binaries, urls, app_port, app_env, &dir.join("app.log")).await?;
        let worker = start_worker(binaries, urls, worker_env, &dir.join("worker.log"))?;
        let certificates = tls::generate(dir)?;
        options.upstreams = vec![format!("127.0.0.1:{app_port}")];
        let nginx = nginx::Nginx::start(&dir.join("nginx"), &options, &certificates).await?;
        Ok(Deployment {
            nginx,
            app,
            worker,
            app_port,
            certificates,
            options,
        })
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
