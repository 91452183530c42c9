//! The data tier losing a host: three PostgreSQL nodes under Patroni with etcd and
//! synchronous replication, the app and two workers given every node (multi-host
//! `DATABASE_URL`, `target_session_attrs=read-write`), nginx in front, steady load through it
//! over TLS. In turn: the primary's postmaster SIGKILLed, the leader's Patroni stopped, the
//! primary cut off the network; then both standbys stopped (not strict: the primary goes on
//! alone). After each the cluster is whole again before the next.
//! Nothing answered 200 may be lost; nothing answered 503 may be stored; a request stored
//! twice would be a bug (nginx and the app never resend); 500s (the commit's outcome unknown)
//! are counted and bounded by the requests in flight.

use crate::load::{
    Answer, LOAD_CONCURRENCY, Results, all_processed, answered, metric, request_ids, steady_load, wait_for_answers,
};
use crate::support::binaries;
use pageviews_testbed::nginx::NginxOptions;
use pageviews_testbed::patroni::{Options, PatroniCluster};
use pageviews_testbed::process::{Process, free_port, wait_until};
use pageviews_testbed::{Deployment, Postgres, RabbitMq, ScratchDir, Urls};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const ROLLUP_INTERVAL_SECS: u64 = 2;

#[derive(Clone, Copy, Debug)]
enum Fault {
    KillPostmaster,
    StopPatroni,
    CutNetwork,
    /// Not a failover: both standbys stopped, which `synchronous_mode_strict = false` survives
    /// by committing on the primary alone.
    StandbysGone,
}

impl Fault {
    fn describe(self) -> &'static str {
        match self {
            Fault::KillPostmaster => "SIGKILL the primary's postmaster",
            Fault::StopPatroni => "stop the leader's Patroni",
            Fault::CutNetwork => "cut the primary off the network",
            Fault::StandbysGone => "stop both standbys",
        }
    }
}

/// What one fault cost, from the answers to requests sent after it began.
struct Round {
    fault: Fault,
    failed: usize,
    ambiguous: usize,
    recovery: Duration,
    old_leader: usize,
    new_leader: usize,
}

#[tokio::test(flavor = "multi_thread")]
async fn a_patroni_cluster_loses_no_answered_page_view_when_the_primary_fails() -> anyhow::Result<()> {
    let dir = ScratchDir::new("failover")?;
    let d = dir.path();
    let started = Instant::now();
    let (mut cluster, _rabbitmq, urls) = data_tier(d, 3, false).await?;
    let mut nginx = NginxOptions::new(free_port()?, free_port()?);
    (nginx.rate, nginx.burst, nginx.conn_limit) = (100_000, 100_000, 1000);
    let metrics = [free_port()?, free_port()?];
    let worker_env = |port: u16| {
        [
            ("PAGEVIEWS_METRICS_LISTEN", format!("127.0.0.1:{port}")),
            ("PAGEVIEWS_ROLLUP_INTERVAL_SECS", ROLLUP_INTERVAL_SECS.to_string()),
        ]
    };
    let app_env = [("PAGEVIEWS_SWEEP_INTERVAL_SECS", "1".to_owned())];
    let deployment = Deployment::start(d, &binaries(), &urls, nginx, &app_env, &worker_env(metrics[0])).await?;
    // A second worker: the rollup's claim row must keep the two to one run per interval.
    let _second: Process =
        pageviews_testbed::start_worker(&binaries(), &urls, &worker_env(metrics[1]), &d.join("worker-2.log")).await?;
    eprintln!(
        "failover test: cluster and stack up after {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let ca = reqwest::Certificate::from_pem(&std::fs::read(&deployment.certificates.ca)?)?;
    let client = reqwest::Client::builder()
        .add_root_certificate(ca)
        .timeout(Duration::from_secs(15))
        .build()?;
    let stop = Arc::new(AtomicBool::new(false));
    let results: Results = Arc::default();
    let load = steady_load(client, deployment.https_url("/"), stop.clone(), results.clone());
    wait_for_answers("load flowing", &results, 50, Duration::from_secs(20)).await?;
    let load_started = Instant::now();

    let mut rounds = Vec::new();
    for fault in [
        Fault::KillPostmaster,
        Fault::StopPatroni,
        Fault::CutNetwork,
        Fault::StandbysGone,
    ] {
        rounds.push(fail_and_recover(&mut cluster, fault, &results).await?);
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await?;
    }
    let elapsed = load_started.elapsed();

    for r in &rounds {
        eprintln!(
            "failover test: {}: node{} -> node{}; {} requests not answered 200 ({} of them 500, outcome unknown); first 200 after the fault for a request sent after the last failure: {:.1} s",
            r.fault.describe(),
            r.old_leader,
            r.new_leader,
            r.failed,
            r.ambiguous,
            r.recovery.as_secs_f64()
        );
    }
    account(&urls.database, &results, &rounds).await?;
    rollup_kept_its_promise(&urls.database, &metrics, elapsed).await?;
    drop(deployment);
    Ok(())
}

/// Applies `fault` to the current leader, waits for requests to be answered 200 again,
/// measures, and brings the cluster back to three replicating nodes.
async fn fail_and_recover(cluster: &mut PatroniCluster, fault: Fault, results: &Results) -> anyhow::Result<Round> {
    let old_leader = cluster.leader().await?;
    let mark = answered(results);
    let mut partition = None;
    let at = Instant::now();
    match fault {
        Fault::KillPostmaster => cluster.nodes[old_leader].kill_postmaster()?,
        Fault::StopPatroni => {
            cluster.nodes[old_leader].stop().await;
        }
        Fault::CutNetwork => partition = Some(cluster.nodes[old_leader].cut_off()?),
        Fault::StandbysGone => {
            for i in (0..cluster.nodes.len()).filter(|&i| i != old_leader) {
                cluster.nodes[i].stop().await;
            }
        }
    }
    // Flowing again: 100 answers in a row of 200, all sent after the fault.
    wait_until(
        &format!("200s again after: {}", fault.describe()),
        Duration::from_secs(120),
        || async {
            let answers = results.lock().unwrap();
            let after: Vec<&Answer> = answers[mark..].iter().filter(|a| a.sent >= at).collect();
            let tail_ok = after.iter().rev().take_while(|a| a.status == Ok(200)).count();
            anyhow::ensure!(tail_ok >= 100, "{tail_ok} in a row");
            Ok(())
        },
    )
    .await?;
    let new_leader = cluster.leader().await?;
    let (failed, ambiguous, recovery) = {
        let answers = results.lock().unwrap();
        let round = &answers[mark..];
        let failed: Vec<&Answer> = round.iter().filter(|a| a.status != Ok(200)).collect();
        let ambiguous = failed.iter().filter(|a| a.status == Ok(500)).count();
        let last_failure_sent = failed.iter().map(|a| a.sent).max();
        let first_ok = round
            .iter()
            .filter(|a| a.status == Ok(200) && last_failure_sent.is_none_or(|t| a.sent > t))
            .map(|a| a.answered)
            .min()
            .unwrap_or(at);
        (failed.len(), ambiguous, first_ok.saturating_duration_since(at))
    };
    // Put the node back: Patroni restarted the killed postmaster itself; the stopped one is
    // started again, the cut one reconnected, and each rejoins as a standby.
    match fault {
        Fault::KillPostmaster => {}
        Fault::StopPatroni => cluster.start_node(old_leader)?,
        Fault::CutNetwork => drop(partition.take()),
        Fault::StandbysGone => {
            for i in (0..cluster.nodes.len()).filter(|&i| i != old_leader) {
                cluster.start_node(i)?;
            }
        }
    }
    cluster.wait_until_replicated().await?;
    if matches!(fault, Fault::StopPatroni | Fault::CutNetwork) {
        anyhow::ensure!(
            new_leader != old_leader,
            "{}: node{old_leader} still leads",
            fault.describe()
        );
    }
    assert!(
        ambiguous <= LOAD_CONCURRENCY,
        "{ambiguous} commits of unknown outcome, more than the {LOAD_CONCURRENCY} requests in flight"
    );
    Ok(Round {
        fault,
        failed,
        ambiguous,
        recovery,
        old_leader,
        new_leader,
    })
}

/// Every request answered 200 stored exactly once, none answered 503 (or refused) stored,
/// those answered 500 stored at most once, and every row processed.
async fn account(database: &str, results: &Results, rounds: &[Round]) -> anyhow::Result<()> {
    let answers = results.lock().unwrap().clone();
    let rows = all_processed(database, Duration::from_secs(120)).await?;
    let stored = request_ids(database).await?;
    let id = |a: &Answer| a.request_id.clone().unwrap_or_default();
    let lost: Vec<String> = answers
        .iter()
        .filter(|a| a.status == Ok(200) && !stored.contains_key(&id(a)))
        .map(id)
        .collect();
    let twice: Vec<_> = stored.iter().filter(|(_, n)| **n > 1).collect();
    let stored_though_refused: Vec<String> = answers
        .iter()
        .filter(|a| a.status != Ok(200) && a.status != Ok(500) && stored.contains_key(&id(a)))
        .map(|a| format!("{} {:?}", id(a), a.status))
        .collect();
    let ambiguous: Vec<&Answer> = answers.iter().filter(|a| a.status == Ok(500)).collect();
    let ambiguous_stored = ambiguous.iter().filter(|a| stored.contains_key(&id(a))).count();
    let ok = answers.iter().filter(|a| a.status == Ok(200)).count();
    eprintln!(
        "failover test: {} requests, {ok} answered 200, {rows} rows, all processed; lost {}, stored twice {}, {} of unknown outcome ({ambiguous_stored} of them stored)",
        answers.len(),
        lost.len(),
        twice.len(),
        ambiguous.len()
    );
    assert!(lost.is_empty(), "answered 200 but not stored: {lost:?}");
    assert!(twice.is_empty(), "stored more than once: {twice:?}");
    assert!(
        stored_though_refused.is_empty(),
        "answered as not stored, but stored: {stored_though_refused:?}"
    );
    let in_flight_bound = rounds.len() * LOAD_CONCURRENCY;
    assert!(ambiguous.len() <= in_flight_bound);
    assert_eq!(rows as usize, ok + ambiguous_stored, "rows beyond the answered ones");
    Ok(())
}

/// The rollup ran across the failovers, at most once per interval over both workers (the
/// claim row), and ran again on the last primary.
async fn rollup_kept_its_promise(database: &str, metrics: &[u16], elapsed: Duration) -> anyhow::Result<()> {
    let mut runs = 0;
    for port in metrics {
        runs += metric(
            &format!("http://127.0.0.1:{port}/metrics"),
            "pageviews_rollup_runs_total",
        )
        .await?;
    }
    let intervals = elapsed.as_secs() / ROLLUP_INTERVAL_SECS;
    eprintln!("failover test: {runs} rollup runs over both workers in {intervals} intervals");
    assert!(runs <= intervals + 2, "{runs} rollup runs in {intervals} intervals");
    assert!(runs >= 2, "the rollup ran {runs} times");
    // Ran on the primary that leads now: its claim is fresh.
    wait_until("a rollup on the last primary", Duration::from_secs(30), || async {
        use diesel_async::AsyncConnection;
        let mut db = diesel_async::AsyncPgConnection::establish(database).await?;
        let age = crate::support::count_on(
            &mut db,
            "SELECT extract(epoch FROM now() - last_run_at)::bigint AS n FROM scheduled_jobs WHERE name = 'rollup'",
        )
        .await?;
        anyhow::ensure!(age <= 2 * ROLLUP_INTERVAL_SECS as i64, "last run {age} s ago");
        Ok(())
    })
    .await
}

/// `synchronous_mode_strict`: with the last standby gone, a commit waits for one to come
/// back, and the app must not answer 200 for a page view that is on one host only. The
/// COMMIT's own `statement_timeout` (the INSERT's budget, from the COMMIT's start) outlasts
/// the request's deadline, so the app gives up first: 500, "may have been stored" (a
/// cancelled wait would have reported the COMMIT as done). Once a standby is back the
/// waiting commits complete, and those page views are stored.
#[tokio::test(flavor = "multi_thread")]
async fn with_strict_synchronous_mode_no_page_view_is_answered_200_while_it_is_on_one_host() -> anyhow::Result<()> {
    let dir = ScratchDir::new("strict")?;
    let d = dir.path();
    let (mut cluster, _rabbitmq, urls) = data_tier(d, 2, true).await?;
    let deployment = Deployment::start(
        d,
        &binaries(),
        &urls,
        NginxOptions::new(free_port()?, free_port()?),
        &[],
        &[],
    )
    .await?;
    let client = reqwest::Client::new();
    let page = deployment.app_url("/");
    assert_eq!(client.get(&page).send().await?.status(), 200);

    let standby = 1 - cluster.leader().await?;
    cluster.nodes[standby].stop().await;
    let mut answers = Vec::new();
    for _ in 0..6 {
        answers.push(client.get(&page).send().await?.status().as_u16());
    }
    let stored_meanwhile = count_rows(&urls.database).await?;
    cluster.start_node(standby)?;
    cluster.wait_until_replicated().await?;
    eprintln!("strict mode, no standby: answers {answers:?}; rows visible meanwhile {stored_meanwhile}");
    assert!(
        answers.iter().all(|&s| s == 500 || s == 503),
        "answered {answers:?} while no standby was there (200: stored on one host only)"
    );
    assert_eq!(stored_meanwhile, 1, "a commit waiting for a standby became visible");
    // The waiting commits complete with the standby back (those answered 503 were never
    // sent); the service answers 200 again.
    let waiting = answers.iter().filter(|&&s| s == 500).count() as i64;
    wait_until("the waiting commits done", Duration::from_secs(30), || async {
        let rows = count_rows(&urls.database).await?;
        anyhow::ensure!(rows == 1 + waiting, "{rows} rows");
        Ok(())
    })
    .await?;
    assert_eq!(client.get(&page).send().await?.status(), 200);
    Ok(())
}

/// A Patroni cluster of `size` nodes (fsync off) and a broker under `d`, with the URLs of a
/// new database and vhost on them.
async fn data_tier(d: &std::path::Path, size: usize, strict: bool) -> anyhow::Result<(PatroniCluster, RabbitMq, Urls)> {
    let options = Options { durable: false, strict };
    let cluster = PatroniCluster::start(&d.join("patroni"), size, options).await?;
    let rabbitmq = RabbitMq::start(&d.join("rabbitmq")).await?;
    let urls = Urls {
        database: cluster.create_database("pageviews").await?,
        amqp: rabbitmq.create_vhost("pageviews")?,
    };
    Ok((cluster, rabbitmq, urls))
}

async fn count_rows(database: &str) -> anyhow::Result<i64> {
    use diesel_async::AsyncConnection;
    let mut db = diesel_async::AsyncPgConnection::establish(database).await?;
    crate::support::count_on(&mut db, "SELECT count(*) AS n FROM page_views").await
}

/// The pool's connections to a node that turns read-only (a primary demoted without a
/// restart) are dropped as their writes fail, and the new ones go to the read-write node of
/// the multi-host `DATABASE_URL`: the app answers 503 only until then, not for as long as the
/// old connections last.
#[tokio::test(flavor = "multi_thread")]
async fn connections_to_a_node_turned_read_only_give_way_to_the_read_write_one() -> anyhow::Result<()> {
    use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
    const POOL: usize = 4;
    let dir = ScratchDir::new("read-only")?;
    let d = dir.path();
    let (dir_a, dir_b) = (d.join("a"), d.join("b"));
    let (a, b) = tokio::try_join!(Postgres::start(&dir_a, false), Postgres::start(&dir_b, false))?;
    let rabbitmq = RabbitMq::start(&d.join("rabbitmq")).await?;
    let amqp = rabbitmq.create_vhost("pageviews")?;
    for pg in [&a, &b] {
        let database = pg.create_database("pageviews").await?;
        let urls = Urls {
            database,
            amqp: amqp.clone(),
        };
        pageviews_testbed::migrate(&binaries(), &urls, &d.join("migrate.log"))?;
    }
    // One password for both, as a multi-host URL has one.
    let mut admin_b = AsyncPgConnection::establish(&b.admin_url()).await?;
    diesel::sql_query(format!("ALTER ROLE postgres PASSWORD '{}'", a.password()))
        .execute(&mut admin_b)
        .await?;
    let urls = Urls {
        database: format!(
            "postgres://postgres:{}@127.0.0.1:{},127.0.0.1:{}/pageviews?target_session_attrs=read-write",
            a.password(),
            a.port(),
            b.port()
        ),
        amqp,
    };
    let socket = pageviews_testbed::activation::ListenSocket::loopback()?;
    let env = [("PAGEVIEWS_DB_POOL_SIZE", POOL.to_string())];
    let _app = pageviews_testbed::start_app(&binaries(), &urls, &socket, &env, &d.join("app.log")).await?;
    let page = format!("http://127.0.0.1:{}/", socket.port());
    let client = reqwest::Client::new();
    assert_eq!(client.get(&page).send().await?.status(), 200);

    let mut admin_a = AsyncPgConnection::establish(&a.admin_url()).await?;
    for statement in [
        "ALTER SYSTEM SET default_transaction_read_only = on",
        "SELECT pg_reload_conf()",
    ] {
        diesel::sql_query(statement).execute(&mut admin_a).await?;
    }
    let mut answers = Vec::new();
    for _ in 0..3 * POOL + 10 {
        answers.push(client.get(&page).send().await?.status().as_u16());
    }
    let failed = answers.iter().filter(|&&s| s != 200).count();
    eprintln!("after the node turned read-only: {answers:?}");
    assert!(
        answers.iter().rev().take(10).all(|&s| s == 200),
        "still failing: {answers:?}"
    );
    assert!(failed <= POOL + 1, "{failed} failed with a pool of {POOL}: {answers:?}");
    // The reload reaches each session between its statements: the first answers after it
    // may still have been written on `a`.
    let rows_on = |url: String| async move {
        let mut db = AsyncPgConnection::establish(&url).await?;
        crate::support::count_on(&mut db, "SELECT count(*) AS n FROM page_views").await
    };
    let on_a = rows_on(a.url("pageviews")).await? - 1;
    let on_b = rows_on(b.url("pageviews").replace(b.password(), a.password())).await?;
    let ok = answers.len() - failed;
    assert_eq!((on_a + on_b) as usize, ok, "rows beyond the answered page views");
    assert!(on_b >= 10, "only {on_b} page views went to the read-write node");
    Ok(())
}
