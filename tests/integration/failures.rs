//! Failure modes that could lose, leak or hang: each test failed before its fix.

use crate::support::{SynDropper, TestEnv, binaries, client, hammer, wait_for_log};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use pageviews::queue::QUEUE;
use pageviews_testbed::activation::ListenSocket;
use pageviews_testbed::link::{Link, LinkState};
use pageviews_testbed::process::{Process, free_port, wait_until};
use pageviews_testbed::{self as stack, ScratchDir, Urls};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// Amiquip's errors carry the whole AMQP URL; none of it may reach a log, in either
/// format, from the app or the worker, for AMQP or PostgreSQL URLs.
#[tokio::test(flavor = "multi_thread")]
async fn no_password_reaches_a_log_line_in_text_or_json() -> anyhow::Result<()> {
    const MQ_PASSWORD: &str = "S3CRETmqPW";
    const DB_PASSWORD: &str = "S3CRETdbPW";
    let dir = ScratchDir::new("pageviews-secrets")?;
    let closed = free_port()?;
    let unresolvable = "rabbitmq.invalid:5672".to_owned();
    let refused = format!("127.0.0.1:{closed}");
    for format in ["text", "json"] {
        for broker in [&unresolvable, &refused] {
            let urls = Urls {
                database: format!("postgres://app:{DB_PASSWORD}@127.0.0.1:{closed}/db"),
                amqp: format!("amqp://app:{MQ_PASSWORD}@{broker}/%2f"),
            };
            let env = [("PAGEVIEWS_LOG_FORMAT", format.to_owned())];
            let socket = ListenSocket::loopback()?;
            let port = socket.port();
            let (app_log, worker_log) = (
                dir.path().join(format!("app-{port}.log")),
                dir.path().join(format!("worker-{port}.log")),
            );
            let _app = stack::start_app_unready(&binaries(), &urls, &socket, &env, &app_log).await?;
            let _worker = stack::start_worker_unready(&binaries(), &urls, &env, &worker_log)?;
            let page = client().get(format!("http://127.0.0.1:{port}/")).send().await?;
            assert_eq!(page.status(), 503);
            let timeout = Duration::from_secs(20);
            wait_for_log(&app_log, "publisher cannot reach the broker", timeout).await?;
            wait_for_log(&app_log, "request failed", timeout).await?;
            wait_for_log(&worker_log, "consumer lost the broker", timeout).await?;
            wait_for_log(&worker_log, "rollup failed", timeout).await?;
        }
    }
    assert_no_secret_in_logs(dir.path(), &[MQ_PASSWORD, DB_PASSWORD]);
    Ok(())
}

/// Every file under `dir` (logs, recursively), checked for every secret.
pub fn assert_no_secret_in_logs(dir: &Path, secrets: &[&str]) {
    let mut checked = 0;
    let mut pending = vec![dir.to_owned()];
    while let Some(path) = pending.pop() {
        if path.is_dir() {
            pending.extend(
                std::fs::read_dir(&path)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path()),
            );
        } else if path.extension().is_some_and(|e| e == "log" || e == "out" || e == "err") {
            let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap_or_default()).into_owned();
            for secret in secrets {
                let line = text.lines().find(|l| l.contains(secret));
                assert!(line.is_none(), "{} logs a password: {line:?}", path.display());
            }
            checked += 1;
        }
    }
    assert!(checked > 0, "no log found under {}", dir.display());
}

/// SIGTERM while PostgreSQL is down and the worker holds a batch it cannot commit.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_the_database_down_and_a_batch_in_hand_exits_zero_and_keeps_the_tasks() -> anyhow::Result<()> {
    let mut env = TestEnv::dedicated().await?;
    env.migrate()?;
    let app = env.app(&[]).await?;
    let results = hammer(&app.url("/"), 30, 4).await;
    assert!(results.iter().all(|r| r == &Ok(200)), "{results:?}");
    // A message carries up to 64 ids: all 30 confirmed, in however many messages.
    wait_until("30 tasks confirmed", Duration::from_secs(20), || async {
        let confirmed = env.app_metric(&app, "pageviews_publish_confirmed_total").await?;
        anyhow::ensure!(confirmed == 30, "{confirmed}");
        Ok(())
    })
    .await?;
    // A quorum queue's count follows the confirm shortly.
    let messages = wait_until("the messages counted in the queue", Duration::from_secs(10), || async {
        let depth = env.queue_depth(QUEUE)?;
        anyhow::ensure!(depth >= 1, "{depth}");
        Ok(depth)
    })
    .await?;
    env.services_mut().postgres.stop();
    let mut worker = env.worker("worker", &[]).await?;
    wait_for_log(
        &env.log("worker"),
        "cannot process tasks; retrying",
        Duration::from_secs(20),
    )
    .await?;

    let started = Instant::now();
    let status = worker.stop_with(libc::SIGTERM, Duration::from_secs(10));
    let took = started.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "worker exited with {status:?}: {}",
        env.log_text("worker")
    );
    assert!(took < Duration::from_secs(4), "SIGTERM took {took:?}");
    // Nothing was acked: the broker holds every message again.
    wait_until("the tasks back in the queue", Duration::from_secs(10), || async {
        let depth = env.queue_depth(QUEUE)?;
        anyhow::ensure!(depth == messages, "{depth} of {messages}");
        Ok(())
    })
    .await?;
    env.services_mut().postgres.start_again().await?;
    let _worker = env.worker("worker-2", &[]).await?;
    assert_eq!(env.all_processed(Duration::from_secs(30)).await?, 30);
    Ok(())
}

/// The figures query fails while INSERTs work: every request that stored a row is
/// answered 200 (before: 503 after the row was stored, so clients retried and duplicated it).
#[tokio::test(flavor = "multi_thread")]
async fn figures_that_cannot_be_read_never_turn_a_stored_row_into_a_503() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.migrate()?;
    let app = env.app(&[]).await?;
    let mut admin = env.db().await?;
    let statuses = std::sync::Mutex::new(Vec::new());
    let page = || async {
        let response = client().get(app.url("/")).send().await?;
        statuses.lock().unwrap().push(response.status().as_u16());
        Ok::<_, anyhow::Error>(response.text().await?)
    };
    let away = "ALTER TABLE page_view_rollups RENAME TO page_view_rollups_away";
    let back = "ALTER TABLE page_view_rollups_away RENAME TO page_view_rollups";

    // No figures read yet: the page says so.
    diesel::sql_query(away).execute(&mut admin).await?;
    let first = page().await?;
    assert!(first.contains(r#"id="figures-unavailable""#), "{first}");
    diesel::sql_query(back).execute(&mut admin).await?;
    wait_until("the figures back", Duration::from_secs(5), || async {
        anyhow::ensure!(page().await?.contains(r#"<dd id="recorded">"#), "not yet");
        Ok(())
    })
    .await?;
    // Figures read before: the page shows them, marked as not refreshed.
    diesel::sql_query(away).execute(&mut admin).await?;
    let stale = wait_until("the last figures shown", Duration::from_secs(5), || async {
        let body = page().await?;
        anyhow::ensure!(body.contains("could not be refreshed"), "not yet");
        Ok(body)
    })
    .await;
    diesel::sql_query(back).execute(&mut admin).await?;
    assert!(stale?.contains(r#"<dd id="recorded">"#));

    let statuses = statuses.into_inner().unwrap();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(env.counts().await?.0, statuses.len() as i64, "one row per answer");
    Ok(())
}

/// A request the TimeoutLayer cuts is counted and timed like any other.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_cut_by_the_timeout_is_counted_and_timed() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.migrate()?;
    // A database budget longer than the request's 10 s, so the request waits for the lock
    // until the TimeoutLayer cuts it (with the default budget it is answered 503 sooner).
    let app = env.app(&[("PAGEVIEWS_DB_TIMEOUT_MS", "20000")]).await?;
    // The INSERT waits for this lock until the request's 10 s are up.
    let mut locker = env.db().await?;
    diesel::sql_query("BEGIN").execute(&mut locker).await?;
    diesel::sql_query("LOCK TABLE page_views IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await?;
    let patient = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
    let started = Instant::now();
    let response = patient.get(app.url("/")).send().await?;
    let took = started.elapsed();
    diesel::sql_query("ROLLBACK").execute(&mut locker).await?;
    assert_eq!(response.status(), 503);
    assert!(took >= Duration::from_secs(9), "answered in {took:?}: not the timeout");

    let metrics = client().get(app.url("/metrics")).send().await?.text().await?;
    assert!(
        metrics.contains("pageviews_http_requests_total{status=\"5xx\"} 1\n"),
        "{metrics}"
    );
    let value = |name: &str| -> u64 {
        let line = metrics.lines().find(|l| l.starts_with(name)).unwrap_or_default();
        line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    let slow = value("pageviews_http_request_duration_seconds_count ")
        - value("pageviews_http_request_duration_seconds_bucket{le=\"5.0\"} ");
    assert_eq!(slow, 1, "the cut request is in the histogram: {metrics}");
    Ok(())
}

/// The app reached directly keeps a client's request id only if it is plain and
/// short (no forged `key=value` log fields), and closes a connection whose headers never end.
#[tokio::test(flavor = "multi_thread")]
async fn a_direct_client_cannot_forge_log_fields_or_hold_a_connection() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = TestEnv::new().await?;
    env.migrate()?;
    let app = env.app(&[]).await?;
    let id_of = |response: &reqwest::Response| response.headers()["x-request-id"].to_str().unwrap().to_owned();

    let plain = client()
        .get(app.url("/healthz"))
        .header("x-request-id", "4f3c2a1b-0e9d.X_y")
        .send()
        .await?;
    assert_eq!(id_of(&plain), "4f3c2a1b-0e9d.X_y");
    let log = env.log(&format!("app-{}", app.port));
    for forged in ["x status=200 path=/admin", &"a".repeat(200)] {
        let response = client()
            .get(app.url("/healthz"))
            .header("x-request-id", forged)
            .send()
            .await?;
        let replaced = id_of(&response);
        assert_ne!(replaced, forged);
        wait_for_log(&log, &format!("request_id={replaced}"), Duration::from_secs(5)).await?;
    }
    let text = std::fs::read_to_string(&log)?;
    assert!(
        !text.contains("path=/admin") && !text.contains(&"a".repeat(200)),
        "{text}"
    );

    // Slowloris: a request line and one header, then nothing.
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", app.port)).await?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n").await?;
    let started = Instant::now();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut buf)).await;
    let took = started.elapsed();
    assert!(closed.is_ok(), "the connection is still open after {took:?}");
    assert!(took >= Duration::from_secs(9), "closed after {took:?}: {buf:?}");
    assert_eq!(env.counts().await?.0, 0, "the unfinished request stored nothing");
    Ok(())
}

/// SIGTERM while every broker node's host drops SYNs: neither
/// binary waits for a connect attempt (5 s each, one node after another) to end. Before: 14 s
/// with three nodes.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_while_connecting_to_hosts_that_drop_packets_exits_in_time() -> anyhow::Result<()> {
    let blackholes = [SynDropper::start()?, SynDropper::start()?, SynDropper::start()?];
    let dir = ScratchDir::new("pageviews-blackhole")?;
    let nodes: Vec<String> = blackholes
        .iter()
        .map(|b| format!("amqp://app:pw@127.0.0.1:{}/%2f", b.port))
        .collect();
    let urls = Urls {
        database: format!("postgres://app@127.0.0.1:{}/db", free_port()?),
        amqp: nodes.join(","),
    };
    let socket = ListenSocket::loopback()?;
    let app_log = dir.path().join("app.log");
    let worker_log = dir.path().join("worker.log");
    let mut app = stack::start_app_unready(&binaries(), &urls, &socket, &[], &app_log).await?;
    let mut worker = stack::start_worker_unready(&binaries(), &urls, &[], &worker_log)?;
    wait_for_log(&worker_log, "worker started", Duration::from_secs(10)).await?;
    // Into the second node's attempt, so the first has timed out once already.
    tokio::time::sleep(Duration::from_secs(6)).await;

    let started = Instant::now();
    app.signal(libc::SIGTERM);
    worker.signal(libc::SIGTERM);
    // Well under one connect timeout (5 s): nothing waits for an attempt in progress.
    let limit = Duration::from_secs(3);
    let exited = |p: &mut Process| p.try_wait();
    let statuses = wait_until("both to exit", Duration::from_secs(30), || {
        let statuses = (exited(&mut app), exited(&mut worker));
        async move {
            match statuses {
                (Some(a), Some(w)) => Ok((a, w)),
                other => anyhow::bail!("still running: {other:?}"),
            }
        }
    })
    .await?;
    let took = started.elapsed();
    eprintln!("app and worker exited {took:?} after SIGTERM");
    assert!(statuses.0.success() && statuses.1.success(), "{statuses:?}");
    assert!(took < limit, "both exited {took:?} after SIGTERM");
    Ok(())
}

/// The consumer's backoff grows while connections fail, and starts from the shortest
/// delay again after a session that lasted (before: the second outage began at the delay the
/// first one ended with).
#[tokio::test(flavor = "multi_thread")]
async fn the_consumer_backs_off_while_failing_and_starts_over_after_a_lasting_session() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.migrate()?;
    let proxy = Link::start(env.services().rabbitmq.port(), LinkState::Refusing).await?;
    let mut urls = env.urls.clone();
    urls.amqp = urls.amqp.replace(
        &format!(":{}/", env.services().rabbitmq.port()),
        &format!(":{}/", proxy.port),
    );
    let log = env.log("worker");
    let _worker = stack::start_worker_unready(&binaries(), &urls, &[], &log)?;
    let retries = |text: &str| -> Vec<u64> {
        text.lines()
            .filter(|l| l.contains("consumer lost the broker"))
            .filter_map(|l| l.split("retry_in_ms=").nth(1)?.split(' ').next()?.parse().ok())
            .collect()
    };

    // The broker refuses every connection: the waits double, no hot loop.
    let started = Instant::now();
    wait_until("five failed attempts", Duration::from_secs(10), || async {
        let n = retries(&std::fs::read_to_string(&log)?).len();
        anyhow::ensure!(n >= 5, "{n}");
        Ok(())
    })
    .await?;
    assert!(
        proxy.accepted() <= 7,
        "{} attempts in {:?}",
        proxy.accepted(),
        started.elapsed()
    );
    assert_eq!(
        retries(&std::fs::read_to_string(&log)?)[..5],
        [100, 200, 400, 800, 1600]
    );

    // Up, and stays up longer than the longest wait (5 s): that was a recovery.
    proxy.set(LinkState::Up);
    let up = wait_for_log(&log, "consumer connected", Duration::from_secs(10)).await?;
    let failures_before = retries(&up).len();
    tokio::time::sleep(Duration::from_millis(5500)).await;
    proxy.set(LinkState::Refusing);
    let after = wait_until("the second outage noticed", Duration::from_secs(10), || async {
        let all = retries(&std::fs::read_to_string(&log)?);
        anyhow::ensure!(all.len() > failures_before, "not yet");
        Ok(all)
    })
    .await?;
    assert_eq!(after[failures_before], 100, "{after:?}");
    Ok(())
}

/// The throwaway servers admit nobody without the generated credentials, and their
/// files are private.
#[tokio::test(flavor = "multi_thread")]
async fn throwaway_servers_want_generated_credentials_and_keep_files_private() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let services = env.services();
    let trusting = format!("postgres://postgres@127.0.0.1:{}/postgres", services.postgres.port());
    let refused = AsyncPgConnection::establish(&trusting).await;
    assert!(refused.is_err(), "PostgreSQL let a client in without a password");
    let guest = format!("amqp://guest:guest@127.0.0.1:{}/%2f", services.rabbitmq.port());
    let guest_in = tokio::task::spawn_blocking(move || amiquip::Connection::insecure_open(&guest).is_ok()).await?;
    assert!(!guest_in, "RabbitMQ let guest in");
    assert!(!env.urls.amqp.contains("guest"));

    let mode = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0)
    };
    assert_eq!(mode(env.dir.path()), 0o700, "{}", env.dir.path().display());
    let certificates = stack::tls::generate(env.dir.path())?;
    assert_eq!(mode(&certificates.key), 0o600);
    Ok(())
}

/// Every log the stack writes (PostgreSQL, RabbitMQ, nginx, app, worker, migrate), after
/// traffic and both servers going away, holds none of the passwords it generated.
#[tokio::test(flavor = "multi_thread")]
async fn no_log_of_the_stack_holds_a_generated_password() -> anyhow::Result<()> {
    use pageviews_testbed::nginx::NginxOptions;
    let mut env = TestEnv::dedicated().await?;
    let options = NginxOptions::new(free_port()?, free_port()?);
    let deployment = stack::Deployment::start(env.dir.path(), &binaries(), &env.urls, options, &[], &[]).await?;
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&deployment.certificates.ca)?)?;
    let tls = reqwest::Client::builder().add_root_certificate(ca).build()?;
    assert_eq!(tls.get(deployment.https_url("/")).send().await?.status(), 200);
    let app_log = env.dir.path().join("app.log");
    let worker_log = env.dir.path().join("worker.log");

    env.services_mut().rabbitmq.stop();
    wait_for_log(&app_log, "publisher lost the broker", Duration::from_secs(20)).await?;
    wait_for_log(&app_log, "publisher cannot reach the broker", Duration::from_secs(20)).await?;
    wait_for_log(&worker_log, "consumer lost the broker", Duration::from_secs(20)).await?;
    env.services_mut().postgres.stop();
    assert_eq!(tls.get(deployment.https_url("/")).send().await?.status(), 503);
    wait_for_log(&app_log, "database unavailable", Duration::from_secs(20)).await?;

    let passwords = [
        env.services().postgres.password().to_owned(),
        env.services().rabbitmq.password().to_owned(),
    ];
    let secrets: Vec<&str> = passwords.iter().map(String::as_str).collect();
    assert_no_secret_in_logs(env.dir.path(), &secrets);
    Ok(())
}
