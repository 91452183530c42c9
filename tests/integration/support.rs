//! Test environments: shared throwaway services (one PostgreSQL and one RabbitMQ per test
//! process; each test gets its own database and vhost), or dedicated ones for fault tests that
//! stop and restart them. `DATABASE_URL` / `AMQP_URL`, when set, name servers to use instead
//! for the shared case (a vhost is then created with `rabbitmqctl` on the default node).

use anyhow::Context;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use pageviews_testbed::activation::ListenSocket;
use pageviews_testbed::process::{Process, wait_until};
use pageviews_testbed::{self as stack, Binaries, ScratchDir, Services, Urls};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::sync::OnceCell;

static SHARED: OnceCell<Services> = OnceCell::const_new();
static SHARED_GROUPS: Mutex<Vec<u32>> = Mutex::new(Vec::new());
static SHARED_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);
static NEXT: AtomicU32 = AtomicU32::new(0);

extern "C" fn stop_shared_services() {
    for group in SHARED_GROUPS.lock().map(|g| g.clone()).unwrap_or_default() {
        // SAFETY: kill(2) on process groups this test process started.
        unsafe { libc::kill(-(group as i32), libc::SIGKILL) };
    }
    if let Some(dir) = SHARED_DIR.lock().ok().and_then(|d| d.clone()) {
        std::thread::sleep(Duration::from_millis(200));
        let _ = std::fs::remove_dir_all(dir);
    }
}

async fn shared() -> anyhow::Result<&'static Services> {
    SHARED
        .get_or_try_init(|| async {
            let dir = ScratchDir::new("pageviews-test-services")?.keep();
            let services = Services::start(&dir, false).await?;
            *SHARED_GROUPS.lock().unwrap() = services.process_groups();
            *SHARED_DIR.lock().unwrap() = Some(dir);
            // SAFETY: registering a plain extern "C" function.
            unsafe { libc::atexit(stop_shared_services) };
            Ok(services)
        })
        .await
}

/// Held by the tests that put the machine under load (their figures mean something only if
/// they do not share its cores with each other).
pub async fn load_alone() -> tokio::sync::MutexGuard<'static, ()> {
    static LOAD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOAD.lock().await
}

pub fn binaries() -> Binaries {
    Binaries::new(
        env!("CARGO_BIN_EXE_pageviews-app"),
        env!("CARGO_BIN_EXE_pageviews-worker"),
    )
}

enum Servers {
    Shared(&'static Services),
    Dedicated(Box<Services>),
}

pub struct WithMetrics {
    pub app: RunningApp,
    #[expect(dead_code, reason = "held, not read: dropping it stops the worker")]
    worker: Process,
    /// `HOST:PORT` of each one's operations listener.
    pub app_listen: String,
    pub worker_listen: String,
}

pub struct TestEnv {
    servers: Servers,
    pub urls: Urls,
    pub vhost: String,
    pub dir: ScratchDir,
}

pub struct RunningApp {
    pub process: Process,
    /// Held as systemd's socket unit holds it; passed to the app as fd 3.
    pub _socket: ListenSocket,
    pub port: u16,
}

impl RunningApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl TestEnv {
    /// Shared servers, a fresh database and vhost.
    pub async fn new() -> anyhow::Result<TestEnv> {
        Self::on(Servers::Shared(shared().await?)).await
    }

    /// Servers of its own, which the test may stop and restart.
    pub async fn dedicated() -> anyhow::Result<TestEnv> {
        Self::dedicated_with(false).await
    }

    /// Servers of its own; `durable`: PostgreSQL with fsync on, as in production.
    pub async fn dedicated_with(durable: bool) -> anyhow::Result<TestEnv> {
        let dir = ScratchDir::new("pageviews-test-dedicated")?;
        let services = Services::start(dir.path(), durable).await?;
        let mut env = Self::on(Servers::Dedicated(Box::new(services))).await?;
        // Keep the servers' directory alive as long as the env.
        env.dir = dir;
        Ok(env)
    }

    async fn on(servers: Servers) -> anyhow::Result<TestEnv> {
        let name = format!("t{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let services = match &servers {
            Servers::Shared(s) => *s,
            Servers::Dedicated(s) => s,
        };
        let database = match std::env::var("DATABASE_URL") {
            Ok(admin) if matches!(servers, Servers::Shared(_)) => {
                stack::postgres::create_database(&admin, &name).await?
            }
            _ => services.postgres.create_database(&name).await?,
        };
        let amqp = services.rabbitmq.create_vhost(&name)?;
        let dir = ScratchDir::new(&format!("pageviews-{name}"))?;
        Ok(TestEnv {
            servers,
            urls: Urls { database, amqp },
            vhost: name,
            dir,
        })
    }

    pub fn services(&self) -> &Services {
        match &self.servers {
            Servers::Shared(s) => s,
            Servers::Dedicated(s) => s,
        }
    }

    pub fn services_mut(&mut self) -> &mut Services {
        match &mut self.servers {
            Servers::Shared(_) => panic!("only a dedicated TestEnv may stop its servers"),
            Servers::Dedicated(s) => s,
        }
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    pub fn migrate(&self) -> anyhow::Result<()> {
        stack::migrate(&binaries(), &self.urls, &self.log("migrate"))
    }

    pub async fn app(&self, env: &[(&str, &str)]) -> anyhow::Result<RunningApp> {
        let socket = ListenSocket::loopback()?;
        let port = socket.port();
        let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (*k, v.to_string())).collect();
        let log = self.log(&format!("app-{port}"));
        let process = stack::start_app(&binaries(), &self.urls, &socket, &env, &log).await?;
        Ok(RunningApp {
            process,
            _socket: socket,
            port,
        })
    }

    /// Starts a worker and waits until it consumes (READY=1).
    pub async fn worker(&self, name: &str, env: &[(&str, &str)]) -> anyhow::Result<Process> {
        let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (*k, v.to_string())).collect();
        stack::start_worker(&binaries(), &self.urls, &env, &self.log(name)).await
    }

    /// An app and a worker that serve their operations endpoints (`/metrics`, `/readyz`) on
    /// listeners of their own, as Prometheus scrapes them.
    pub async fn app_and_worker_with_metrics(&self) -> anyhow::Result<WithMetrics> {
        let app_listen = format!("127.0.0.1:{}", pageviews_testbed::process::free_port()?);
        let app = self
            .app(&[("PAGEVIEWS_APP_METRICS_LISTEN", app_listen.as_str())])
            .await?;
        let worker_listen = format!("127.0.0.1:{}", pageviews_testbed::process::free_port()?);
        let worker = self
            .worker("worker", &[("PAGEVIEWS_METRICS_LISTEN", worker_listen.as_str())])
            .await?;
        Ok(WithMetrics {
            app,
            worker,
            app_listen,
            worker_listen,
        })
    }

    pub async fn db(&self) -> anyhow::Result<AsyncPgConnection> {
        Ok(AsyncPgConnection::establish(&self.urls.database).await?)
    }

    /// (rows, processed rows)
    pub async fn counts(&self) -> anyhow::Result<(i64, i64)> {
        let mut conn = self.db().await?;
        let totals = pageviews::db::page_views::totals(&mut conn).await?;
        Ok((totals.recorded, totals.processed))
    }

    /// (rows, processed rows) counted in the table itself, to check the counters against.
    pub async fn exact_counts(&self) -> anyhow::Result<(i64, i64)> {
        Ok((
            self.sql_count("SELECT count(*) AS n FROM page_views").await?,
            self.sql_count("SELECT count(processed_at) AS n FROM page_views")
                .await?,
        ))
    }

    /// Waits until every row is processed and returns how many there are; the figures the page
    /// shows (the counters) must then equal the table's own counts.
    pub async fn all_processed(&self, timeout: Duration) -> anyhow::Result<i64> {
        let rows = wait_until("all page views processed", timeout, || async {
            let (rows, processed) = self.exact_counts().await?;
            anyhow::ensure!(rows == processed, "{processed} of {rows} processed");
            Ok(rows)
        })
        .await?;
        assert_eq!(self.counts().await?, (rows, rows), "counters differ from count(*)");
        Ok(rows)
    }

    /// `n` unprocessed page views made directly in the database (a backlog no app offered:
    /// only the sweep can find it).
    pub async fn backlog_in_db(&self, n: i64) -> anyhow::Result<()> {
        let mut conn = self.db().await?;
        diesel::sql_query(format!(
            "INSERT INTO page_views (data) SELECT '{{}}' FROM generate_series(1, {n})"
        ))
        .execute(&mut conn)
        .await?;
        Ok(())
    }

    /// A counter of the app's `/metrics`.
    pub async fn app_metric(&self, app: &RunningApp, name: &str) -> anyhow::Result<u64> {
        let text = client().get(app.url("/metrics")).send().await?.text().await?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .with_context(|| format!("no {name} in {text}"))
    }

    pub fn queue_depth(&self, queue: &str) -> anyhow::Result<u64> {
        self.services().rabbitmq.queue_depth(&self.vhost, queue)
    }

    pub fn log_text(&self, name: &str) -> String {
        std::fs::read_to_string(self.log(name)).unwrap_or_default()
    }

    pub async fn sql_count(&self, query: &str) -> anyhow::Result<i64> {
        count_on(&mut self.db().await?, query).await
    }
}

/// The `n` column of the one row `query` returns, on `conn` (for what only that connection
/// sees, such as its prepared statements).
pub async fn count_on(conn: &mut AsyncPgConnection, query: &str) -> anyhow::Result<i64> {
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let row: Count = diesel::sql_query(query)
        .get_result(conn)
        .await
        .with_context(|| query.to_owned())?;
    Ok(row.n)
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("a default client builds")
}

/// `n` GETs of `url` with `concurrency` in flight; the status of each.
pub async fn hammer(url: &str, n: usize, concurrency: usize) -> Vec<Result<u16, String>> {
    use futures_util::StreamExt;
    let client = client();
    futures_util::stream::iter(0..n)
        .map(|_| {
            let request = client.get(url).send();
            async move { request.await.map(|r| r.status().as_u16()).map_err(|e| e.to_string()) }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

/// Waits until the log `path` contains `needle`; returns the log.
pub async fn wait_for_log(path: &std::path::Path, needle: &str, timeout: Duration) -> anyhow::Result<String> {
    wait_until(&format!("{needle:?} in {}", path.display()), timeout, || async {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        anyhow::ensure!(text.contains(needle), "not yet");
        Ok(text)
    })
    .await
    .map_err(|e| {
        e.context(format!(
            "its last lines:\n{}",
            pageviews_testbed::process::tail(path, 20)
        ))
    })
}

/// A TCP port on 127.0.0.1 whose listen queue is full: the kernel drops further SYNs, as a
/// firewalled host does, so a connect hangs until the client's own timeout. The listener and
/// the connection filling its queue live as long as the value.
pub struct SynDropper {
    pub port: u16,
    _listener: tokio::net::TcpListener,
    _filling: Vec<std::net::TcpStream>,
}

impl SynDropper {
    pub fn start() -> anyhow::Result<SynDropper> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind("127.0.0.1:0".parse()?)?;
        let listener = socket.listen(0)?;
        let addr = listener.local_addr()?;
        let mut filling = Vec::new();
        for _ in 0..8 {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(stream) => filling.push(stream),
                // Timed out: SYNs are being dropped now.
                Err(_) => {
                    return Ok(SynDropper {
                        port: addr.port(),
                        _listener: listener,
                        _filling: filling,
                    });
                }
            }
        }
        anyhow::bail!("the listen queue of {addr} never filled up")
    }
}
