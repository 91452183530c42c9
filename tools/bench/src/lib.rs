//! The benchmark behind `pageviews-bench`: starts the local stack (durable PostgreSQL) with
//! nginx's per-client limits raised for the run, measures this machine's limits (pgbench
//! INSERTs, RabbitMQ publishes and consumes, on quorum and classic queues, the disk's flush
//! latency), then loads `GET /` with wrk through nginx + TLS
//! and straight to the app, checks that every answered request is a stored row and how fast
//! the worker drains the backlog, and samples memory; then the same page on a three-node
//! Patroni cluster with synchronous replication, against the single primary. Every figure is reported with its ratio
//! to a limit measured in the same run, because timings on a shared machine are noisy.

mod broker;
mod db;
mod disk;
mod pgbench;
mod replication;
mod report;
mod wrk;

pub use report::{Figure, Machine, Report};

use anyhow::Context;
use diesel_async::{AsyncConnection, AsyncPgConnection};
use pageviews::config::QueueType;
use pageviews::config::{DEFAULT_PREFETCH, DEFAULT_QUEUE_TYPE};
use pageviews_testbed::nginx::NginxOptions;
use pageviews_testbed::process::free_port;
use pageviews_testbed::{Binaries, Stack, Topology};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const COMMAND: &str = "cargo run --release -p pageviews-bench";

pub struct Settings {
    /// Length of every measurement (wrk step, pgbench run); the broker runs take half.
    pub secs: u64,
    pub concurrency: Vec<u32>,
    /// Rows added for the large-table step (`PAGEVIEWS_BENCH_ROWS`).
    pub large_rows: i64,
    /// Whether to run the synchronous replication step (`PAGEVIEWS_BENCH_REPLICATION`).
    pub replication: bool,
    pub out: PathBuf,
}

const INSERT_CLIENTS: [u32; 2] = [8, 16];
const DRAIN_DEADLINE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(20);
// The targets of issues 6 and 12.
const SHARE_OF_STATIC: f64 = 0.35;
const P99_MS: f64 = 15.0;
const DRAIN_SECS: f64 = 1.0;
/// With the large table: p99 at c=8 against the small table's, and a lone visitor's p99.
const LARGE_P99_GROWTH: f64 = 1.2;
const LONE_P99_MS: f64 = 10.0;
/// The static file nginx serves itself: the ceiling for anything behind this nginx.
const STATIC_PATH: &str = "/static/app.css";
const IDLE_RSS_MIB: f64 = 30.0;
const LOAD_RSS_MIB: f64 = 100.0;
/// The step the throughput, latency and error targets apply to.
const TARGET_STEP: (&str, u32) = ("https", 32);

fn other_queue_type() -> QueueType {
    match DEFAULT_QUEUE_TYPE {
        QueueType::Quorum => QueueType::Classic,
        QueueType::Classic => QueueType::Quorum,
    }
}

pub async fn run(settings: &Settings, dir: &Path) -> anyhow::Result<Report> {
    let mut stack = start_stack(dir).await?;
    let pids = [stack.deployment.app.pid(), stack.deployment.worker.pid()];
    let idle = idle_rss(pids).await?;
    let (mut figures, broker) = machine_limits(settings, dir, &stack).await?;

    let db_url = stack.database.url("pageviews");
    let mut db = AsyncPgConnection::establish(&db_url).await?;
    let page = stack.deployment.https_url("/");
    warm_up(&mut db, &page).await?;
    // A lone visitor and c=8 on the small table, again after adding the large table's rows.
    let small = size_steps(&mut db, &page, settings.secs, "small").await?;
    let ceilings = static_ceilings(settings, &stack, &mut figures).await?;
    let peak = page_steps(settings, &stack, &mut db, &ceilings, pids, &broker, &mut figures).await?;
    if settings.replication {
        let replicated = replication::measure(settings, dir, &stack, &figures, broker.consume_ack).await?;
        figures.extend(replicated);
    }
    figures.push(deploy_under_load(settings, &mut stack).await?);
    large_table(settings, &mut db, &page, &small, &mut figures).await?;
    figures.extend(rss_figures(idle, peak, busiest(settings)));

    Ok(Report {
        command: COMMAND,
        finished_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        secs_per_step: settings.secs,
        machine: Machine::describe(&broker.version),
        figures,
    })
}

/// Starts the local stack with nginx's per-client limits raised (see [`raised_nginx_limits`]).
async fn start_stack(dir: &Path) -> anyhow::Result<Stack> {
    let binaries = Binaries::this_executable()?;
    eprintln!("starting the stack under {}", dir.display());
    Stack::start(dir, &binaries, raised_nginx_limits()?, &[], Topology::default()).await
}

/// nginx on fresh ports with its per-client limits raised: one load generator is one client
/// address, and the default limits would answer most of the load with 429.
fn raised_nginx_limits() -> anyhow::Result<NginxOptions> {
    let mut options = NginxOptions::new(free_port()?, free_port()?);
    options.rate = 1_000_000;
    options.burst = 1_000_000;
    options.conn_limit = 65_535;
    Ok(options)
}

/// The app's and the worker's RSS a second after the start, before any load: the idle figures.
async fn idle_rss(pids: [u32; 2]) -> anyhow::Result<[f64; 2]> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok([rss_mib(pids[0])?, rss_mib(pids[1])?])
}

/// The busiest concurrency: the steps at it sample the processes' peak RSS.
fn busiest(settings: &Settings) -> u32 {
    settings.concurrency.iter().copied().max().unwrap_or(0)
}

/// Measures this machine's limits (pgbench INSERTs, disk flushes, the broker on both queue
/// types), which every later figure is compared with, as timings on a shared machine are
/// noisy; returns their figures and the default queue type's broker limits.
async fn machine_limits(
    settings: &Settings,
    dir: &Path,
    stack: &Stack,
) -> anyhow::Result<(Vec<Figure>, broker::BrokerLimits)> {
    eprintln!(
        "limits: pgbench INSERT with {INSERT_CLIENTS:?} clients, {} s each",
        settings.secs
    );
    let postgres = stack
        .database
        .single()
        .context("the benchmark runs on one PostgreSQL")?;
    let inserts = pgbench::insert_rates(postgres, dir, &INSERT_CLIENTS, settings.secs).await?;
    eprintln!("limits: disk flushes (8 KB + fdatasync), {} s", settings.secs);
    let flush = {
        let (dir, secs) = (dir.to_owned(), settings.secs as f64);
        tokio::task::spawn_blocking(move || disk::measure(&dir, secs)).await??
    };
    let (broker, other, limits) = broker_limits(settings, stack).await?;

    let mut figures = Vec::new();
    for r in &inserts {
        figures.push(Figure::new(
            format!("limit.pgbench_insert.c{}", r.clients),
            format!(
                "limit: pgbench INSERT, {} clients (avg {:.2} ms)",
                r.clients, r.latency_ms
            ),
            r.per_sec,
            "/s",
        ));
    }
    figures.push(Figure::new(
        "limit.disk_flush",
        format!(
            "limit: disk flush, 8 KB + fdatasync (p50 {:.2} ms, p99 {:.2} ms, max {:.0} ms)",
            flush.p50_ms, flush.p99_ms, flush.max_ms
        ),
        flush.per_sec,
        "/s",
    ));
    figures.push(Figure::new(
        "limit.disk_flush.stalls",
        format!(
            "disk flushes of {} ms or more in {} s (each stalls the batch being committed)",
            disk::STALL.as_millis(),
            settings.secs
        ),
        flush.stalls as f64,
        "",
    ));
    figures.extend(broker_figures(&broker, other, &limits));
    Ok((figures, broker))
}

/// RabbitMQ publishes and consumes on both queue types, alternating twice so neither always
/// runs on a warmer or quieter machine; the better run of each counts. Returns the default
/// type's limits, then the other type and its limits.
async fn broker_limits(
    settings: &Settings,
    stack: &Stack,
) -> anyhow::Result<(broker::BrokerLimits, QueueType, broker::BrokerLimits)> {
    eprintln!("limits: RabbitMQ publishes and consumes");
    let secs = settings.secs as f64 / 2.0;
    let mut by_type: Vec<(QueueType, Option<broker::BrokerLimits>)> =
        vec![(DEFAULT_QUEUE_TYPE, None), (other_queue_type(), None)];
    for round in 0..2 {
        for (queue_type, best) in &mut by_type {
            let queue_type = *queue_type;
            let vhost = format!("bench-{}-{round}", queue_type.as_str());
            let amqp = stack.brokers.create_vhost(&vhost)?;
            let measured =
                tokio::task::spawn_blocking(move || broker::measure(&amqp, secs, DEFAULT_PREFETCH, queue_type))
                    .await??;
            *best = Some(match best.take() {
                Some(b) => b.best_of(measured),
                None => measured,
            });
        }
    }
    let [(_, Some(broker)), (other, Some(limits))] = &by_type[..] else {
        unreachable!("both queue types were measured")
    };
    Ok((broker.clone(), *other, limits.clone()))
}

/// The broker's figures: the default queue type's limits, then the other type's against
/// them, for choosing the default (README "Scaling out").
fn broker_figures(broker: &broker::BrokerLimits, other: QueueType, limits: &broker::BrokerLimits) -> Vec<Figure> {
    let batch = pageviews::queue::outbox::MAX_BATCH;
    let other = other.as_str();
    vec![
        Figure::new(
            "limit.publish_batched",
            format!("limit: RabbitMQ persistent publish, {batch} per confirm wait"),
            broker.publish_batched,
            "/s",
        ),
        Figure::new(
            "limit.publish_each",
            "RabbitMQ persistent publish, confirm wait each",
            broker.publish_each,
            "/s",
        )
        .against("batched publish", broker.publish_batched),
        Figure::new(
            "limit.consume_ack",
            format!("limit: RabbitMQ consume + ack each, prefetch {DEFAULT_PREFETCH}"),
            broker.consume_ack,
            "/s",
        ),
        // The other queue type, for choosing the default (README "Scaling out").
        Figure::new(
            format!("limit.{other}.publish_batched"),
            format!("limit: {other} queue, persistent publish, {batch} per confirm wait"),
            limits.publish_batched,
            "/s",
        )
        .against("default queue type", broker.publish_batched),
        Figure::new(
            format!("limit.{other}.consume_ack"),
            format!("limit: {other} queue, consume + ack each"),
            limits.consume_ack,
            "/s",
        )
        .against("default queue type", broker.consume_ack),
    ]
}

/// Two seconds at 32 connections through nginx, so the measured steps start with warm
/// connections, caches and a page already rendered; nothing of it is reported.
async fn warm_up(db: &mut AsyncPgConnection, page: &str) -> anyhow::Result<()> {
    eprintln!("warm-up: 2 s at 32 connections through nginx");
    step(db, page, 32, 2, None).await?;
    Ok(())
}

/// The ceiling: nginx serving a static file over the same TLS at each concurrency, what
/// anything behind this nginx can reach at best. Pushes its figures and returns each
/// concurrency's rate, for the page's ratios.
async fn static_ceilings(
    settings: &Settings,
    stack: &Stack,
    figures: &mut Vec<Figure>,
) -> anyhow::Result<Vec<(u32, f64)>> {
    let mut ceilings = Vec::new();
    for &c in &settings.concurrency {
        eprintln!("static file nginx+TLS, {c} connections, {} s", settings.secs);
        let s = wrk::run(&stack.deployment.https_url(STATIC_PATH), c, settings.secs).await?;
        figures.push(Figure::new(
            format!("static.c{c}.requests_per_sec"),
            format!("ceiling: nginx+TLS static file c={c}: requests/s"),
            s.requests_per_sec,
            "/s",
        ));
        figures.push(Figure::new(
            format!("static.c{c}.p99_ms"),
            format!("ceiling: nginx+TLS static file c={c}: p99 latency"),
            s.p99_ms,
            "ms",
        ));
        ceilings.push((c, s.requests_per_sec));
    }
    Ok(ceilings)
}

/// `GET /` at each concurrency through nginx + TLS and straight to the app, each step with
/// its rows, backlog and drain (see [`step`]); pushes their figures and returns the app's and
/// the worker's peak RSS over the busiest steps.
async fn page_steps(
    settings: &Settings,
    stack: &Stack,
    db: &mut AsyncPgConnection,
    ceilings: &[(u32, f64)],
    pids: [u32; 2],
    broker: &broker::BrokerLimits,
    figures: &mut Vec<Figure>,
) -> anyhow::Result<[f64; 2]> {
    let busiest = busiest(settings);
    let mut peak = [0.0f64; 2];
    let targets = [
        ("https", "nginx+TLS", stack.deployment.https_url("/")),
        ("direct", "app direct", stack.deployment.app_url("/")),
    ];
    for (key, name, url) in &targets {
        for &(c, ceiling) in ceilings {
            eprintln!("GET / {name}, {c} connections, {} s", settings.secs);
            let sampled = (c == busiest).then_some(pids);
            let s = step(db, url, c, settings.secs, sampled).await?;
            peak = [peak[0].max(s.peak_rss[0]), peak[1].max(s.peak_rss[1])];
            figures.extend(s.figures(key, name, c, ("static file", ceiling), broker.consume_ack));
        }
    }
    Ok(peak)
}

/// A deploy under load: the app restarted half-way through a step, on the socket the
/// launcher holds (what `systemctl restart pageviews-app` does with its socket unit); the
/// figure is the requests that failed meanwhile (target 0).
async fn deploy_under_load(settings: &Settings, stack: &mut Stack) -> anyhow::Result<Figure> {
    let (key, c) = TARGET_STEP;
    eprintln!(
        "GET / nginx+TLS, {c} connections, {} s, the app restarted half-way",
        settings.secs
    );
    let url = stack.deployment.https_url("/");
    let restart = async {
        tokio::time::sleep(Duration::from_secs(settings.secs) / 2).await;
        stack.deployment.restart_app().await
    };
    let (load, restarted) = tokio::join!(wrk::run(&url, c, settings.secs), restart);
    let (load, old_app) = (load?, restarted?);
    anyhow::ensure!(old_app.success(), "the restarted app exited with {old_app}");
    Ok(Figure::new(
        format!("restart.{key}.c{c}.failed"),
        format!("nginx+TLS c={c}, app restarted: failed requests (non-2xx + socket)"),
        load.errors() as f64,
        "",
    )
    .target("0", load.errors() == 0))
}

/// The large table: `settings.large_rows` processed rows added, then `GET /` at c=1 and c=8
/// again, as ratios to the small table's steps (`small`), so the page's cost with the table's
/// size shows; pushes those figures, then the small table's p99s.
async fn large_table(
    settings: &Settings,
    db: &mut AsyncPgConnection,
    page: &str,
    small: &[wrk::WrkResult; 2],
    figures: &mut Vec<Figure>,
) -> anyhow::Result<()> {
    eprintln!("adding {} rows to page_views", settings.large_rows);
    let started = Instant::now();
    db::generate_processed(db, settings.large_rows).await?;
    figures.push(Figure::new(
        "large.generate_secs",
        format!(
            "{} rows added (INSERT … generate_series, VACUUM ANALYZE, CHECKPOINT)",
            settings.large_rows
        ),
        started.elapsed().as_secs_f64(),
        "s",
    ));
    let large = size_steps(db, page, settings.secs, "large").await?;
    for (i, (c, what)) in [(1, "lone visitor"), (8, "8 connections")].into_iter().enumerate() {
        let (before, after) = (&small[i], &large[i]);
        figures.push(
            Figure::new(
                format!("large.c{c}.requests_per_sec"),
                format!("{} rows, nginx+TLS c={c}: requests/s", settings.large_rows),
                after.requests_per_sec,
                "/s",
            )
            .against("small table", before.requests_per_sec),
        );
        let mut p99 = Figure::new(
            format!("large.c{c}.p99_ms"),
            format!("{} rows, nginx+TLS c={c} ({what}): p99 latency", settings.large_rows),
            after.p99_ms,
            "ms",
        )
        .against("small table", before.p99_ms);
        p99 = if c == 1 {
            p99.target(format!("< {LONE_P99_MS} ms"), after.p99_ms < LONE_P99_MS)
        } else {
            let met = after.p99_ms <= before.p99_ms * LARGE_P99_GROWTH;
            p99.target(format!("<= {LARGE_P99_GROWTH} × small table"), met)
        };
        figures.push(p99);
    }
    for (i, c) in [1, 8].into_iter().enumerate() {
        figures.push(Figure::new(
            format!("small.c{c}.p99_ms"),
            format!("small table, nginx+TLS c={c}: p99 latency"),
            small[i].p99_ms,
            "ms",
        ));
    }
    Ok(())
}

/// The app's and the worker's memory, idle and at the peak of the busiest steps; the app's
/// against its targets.
fn rss_figures(idle: [f64; 2], peak: [f64; 2], busiest: u32) -> Vec<Figure> {
    let rss = |key: &str, label: String, value: f64, limit: f64| {
        Figure::new(key, label, value, "MiB").target(format!("< {limit} MiB"), value < limit)
    };
    vec![
        rss("rss.app.idle", "app RSS, idle".into(), idle[0], IDLE_RSS_MIB),
        Figure::new("rss.worker.idle", "worker RSS, idle", idle[1], "MiB"),
        rss(
            "rss.app.load",
            format!("app RSS, peak at c={busiest}"),
            peak[0],
            LOAD_RSS_MIB,
        ),
        Figure::new(
            "rss.worker.load",
            format!("worker RSS, peak at c={busiest}"),
            peak[1],
            "MiB",
        ),
    ]
}

/// What one load step measured.
struct Step {
    wrk: wrk::WrkResult,
    rows: i64,
    backlog: i64,
    drain_secs: f64,
    peak_rss: [f64; 2],
}

/// Runs wrk, then waits until every page view of the step is processed. `sample` names the
/// processes whose RSS is sampled during the load.
async fn step(
    db: &mut AsyncPgConnection,
    url: &str,
    connections: u32,
    secs: u64,
    sample: Option<[u32; 2]>,
) -> anyhow::Result<Step> {
    let before = db::max_id(db).await?;
    let load = wrk::run(url, connections, secs);
    let (wrk, peak_rss) = match sample {
        Some(pids) => tokio::join!(load, peak_rss(pids, Duration::from_secs(secs))),
        None => (load.await, [0.0; 2]),
    };
    let wrk = wrk?;
    let stopped = Instant::now();
    let backlog = db::count_after(db, before).await?.unprocessed;
    let mut left = backlog;
    // Past the deadline the step reports the time waited (its target missed) and the run goes on.
    while left > 0 && stopped.elapsed() < DRAIN_DEADLINE {
        tokio::time::sleep(POLL).await;
        left = db::count_after(db, before).await?.unprocessed;
    }
    if left > 0 {
        eprintln!("{left} page views still unprocessed after {DRAIN_DEADLINE:?}");
    }
    let drain_secs = if backlog == 0 {
        0.0
    } else {
        stopped.elapsed().as_secs_f64()
    };
    let rows = db::count_after(db, before).await?.rows;
    Ok(Step {
        wrk,
        rows,
        backlog,
        drain_secs,
        peak_rss,
    })
}

/// GET / through nginx at c=1 and c=8, for comparing table sizes.
async fn size_steps(
    db: &mut AsyncPgConnection,
    url: &str,
    secs: u64,
    size: &str,
) -> anyhow::Result<[wrk::WrkResult; 2]> {
    let mut out = [wrk::WrkResult::default(), wrk::WrkResult::default()];
    for (slot, c) in out.iter_mut().zip([1, 8]) {
        eprintln!("GET / nginx+TLS, {size} table, {c} connections, {secs} s");
        *slot = step(db, url, c, secs, None).await?.wrk;
    }
    Ok(out)
}

impl Step {
    /// The step's figures under `key` and `name`, its rate against `rate_limit` (a name and a
    /// rate of this run), its drain against the broker's `consume_limit`; the targets apply
    /// to [`TARGET_STEP`] only.
    fn figures(&self, key: &str, name: &str, c: u32, rate_limit: (&str, f64), consume_limit: f64) -> Vec<Figure> {
        let k = |what: &str| format!("{key}.c{c}.{what}");
        let l = |what: &str| format!("{name} c={c}: {what}");
        let targeted = (key, c) == TARGET_STEP;
        let w = &self.wrk;
        let (limit_name, limit) = rate_limit;
        let mut rps =
            Figure::new(k("requests_per_sec"), l("requests/s"), w.requests_per_sec, "/s").against(limit_name, limit);
        let mut p99 = Figure::new(k("p99_ms"), l("p99 latency"), w.p99_ms, "ms");
        let mut errors = Figure::new(k("errors"), l("errors (non-2xx + socket)"), w.errors() as f64, "");
        if targeted {
            let share = w.requests_per_sec / limit;
            rps = rps.target(format!(">= {SHARE_OF_STATIC} × static file"), share >= SHARE_OF_STATIC);
            p99 = p99.target(format!("< {P99_MS} ms"), w.p99_ms < P99_MS);
            errors = errors.target("0", w.errors() == 0);
        }
        // wrk does not count responses still in flight when it stops, so up to one per
        // connection may be stored but not counted; more (or fewer) would be a real mismatch.
        let unanswered = self.rows - w.answered_2xx() as i64;
        let drain_rate = if self.drain_secs > 0.0 {
            self.backlog as f64 / self.drain_secs
        } else {
            0.0
        };
        vec![
            rps,
            Figure::new(k("p50_ms"), l("p50 latency"), w.p50_ms, "ms"),
            p99,
            errors,
            Figure::new(
                k("rows_minus_2xx"),
                l(&format!("rows stored ({}) − 2xx answered", self.rows)),
                unanswered as f64,
                "",
            )
            .target(
                format!("0..={c} (in flight at stop)"),
                (0..=i64::from(c)).contains(&unanswered),
            ),
            Figure::new(
                k("backlog"),
                l("unprocessed when load stopped"),
                self.backlog as f64,
                "tasks",
            ),
            Figure::new(k("drain_secs"), l("time to drain after load"), self.drain_secs, "s")
                .target(format!("<= {DRAIN_SECS} s"), self.drain_secs <= DRAIN_SECS),
            Figure::new(k("drain_per_sec"), l("drain rate"), drain_rate, "tasks/s")
                .against("consume+ack limit", consume_limit),
        ]
    }
}

/// Runs a load tool to the end (killed if the benchmark is interrupted) and returns its report.
async fn output_of(name: &str, command: &mut tokio::process::Command) -> anyhow::Result<String> {
    let output = command
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("cannot run {name}"))?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    anyhow::ensure!(
        output.status.success(),
        "{name} failed: {}{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(text)
}

/// Resident memory of a process, from /proc.
fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no VmRSS for process {pid}"))?;
    Ok(kib / 1024.0)
}

/// The highest RSS of each process over `duration`, sampled every 100 ms.
async fn peak_rss(pids: [u32; 2], duration: Duration) -> [f64; 2] {
    let started = Instant::now();
    let mut peak = [0.0f64; 2];
    while started.elapsed() < duration {
        for (p, pid) in peak.iter_mut().zip(pids) {
            *p = p.max(rss_mib(pid).unwrap_or(0.0));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    peak
}
