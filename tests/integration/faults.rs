//! Nothing is lost: broker restarts, database restarts, a worker killed mid-backlog, poison
//! messages. Each test has servers of its own so it can stop them.

use crate::support::{TestEnv, client, hammer, wait_for_log};
use pageviews::queue::{DEAD_LETTER_QUEUE, EXCHANGE, QUEUE, ROUTING_KEY};
use pageviews_testbed::process::wait_until;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_restart_under_load_loses_no_page_view() -> anyhow::Result<()> {
    let _alone = crate::support::load_alone().await;
    let mut env = TestEnv::dedicated().await?;
    env.migrate()?;
    let app = env.app(&[("PAGEVIEWS_SWEEP_INTERVAL_SECS", "1")]).await?;
    let _worker = env.worker("worker", &[]).await?;
    let url = app.url("/");

    let load = tokio::spawn({
        let url = url.clone();
        async move {
            let mut results = Vec::new();
            for _ in 0..30 {
                results.extend(hammer(&url, 20, 4).await);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            results
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.services_mut().rabbitmq.stop();
    // With the broker away, pages are still served and rows stored.
    let during = hammer(&url, 20, 4).await;
    assert!(during.iter().all(|r| r == &Ok(200)), "{during:?}");
    let ready = client().get(app.url("/readyz")).send().await?;
    assert_eq!(ready.status(), 503);
    assert!(ready.text().await?.contains("broker: unavailable"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.services_mut().rabbitmq.start_again().await?;

    let results = load.await?;
    let ok = results.iter().filter(|r| r == &&Ok(200)).count() + during.len();
    assert_eq!(ok, results.len() + during.len(), "failed requests: {results:?}");
    let rows = env.all_processed(Duration::from_secs(60)).await?;
    assert_eq!(
        rows as usize, ok,
        "every 200 is exactly one stored, processed page view"
    );
    assert!(
        env.log_text(&format!("app-{}", app.port))
            .contains("publisher lost the broker")
    );
    assert!(env.log_text("worker").contains("consumer lost the broker"));
    Ok(())
}

/// PostgreSQL with fsync on restarted while a worker holds a backlog: quick 503s, then recovery
/// without restarting anything; every stored row survives and is processed once. The worker
/// starts only once the database is down, so it surely holds tasks it cannot process (started
/// before, it could drain the whole backlog first).
#[tokio::test(flavor = "multi_thread")]
async fn a_database_restart_gives_quick_503s_then_recovers() -> anyhow::Result<()> {
    let mut env = TestEnv::dedicated_with(true).await?;
    env.migrate()?;
    let app = env.app(&[]).await?;
    let backlog = hammer(&app.url("/"), 300, 8).await;
    assert!(backlog.iter().all(|r| r == &Ok(200)), "{backlog:?}");
    let app_pid = app.process.pid();

    env.services_mut().postgres.stop();
    let started = Instant::now();
    let response = client().get(app.url("/")).send().await?;
    let took = started.elapsed();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "5");
    assert!(response.text().await?.contains("Temporarily unavailable"));
    assert!(took < Duration::from_secs(3), "503 took {took:?}");
    let ready = client().get(app.url("/readyz")).send().await?;
    assert_eq!(ready.status(), 503);
    let ready = ready.text().await?;
    assert!(
        ready.starts_with("database: unavailable (") && ready.ends_with("broker: ok\n"),
        "{ready}"
    );
    let metrics = client().get(app.url("/metrics")).send().await?.text().await?;
    assert!(metrics.contains("\npageviews_database_up 0\n"), "{metrics}");
    let mut worker = env.worker("worker", &[("PAGEVIEWS_PREFETCH", "5")]).await?;
    wait_for_log(
        &env.log("worker"),
        "cannot process tasks; retrying",
        Duration::from_secs(20),
    )
    .await?;

    env.services_mut().postgres.start_again().await?;
    let stored_after = std::sync::atomic::AtomicI64::new(0);
    wait_until("the app to serve again", Duration::from_secs(20), || async {
        let status = client().get(app.url("/")).send().await?.status();
        anyhow::ensure!(status == 200, "status {status}");
        stored_after.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    })
    .await?;
    assert_eq!(app.process.pid(), app_pid, "recovered without a restart");
    let metrics = client().get(app.url("/metrics")).send().await?.text().await?;
    assert!(metrics.contains("\npageviews_database_up 1\n"), "{metrics}");
    assert!(worker.try_wait().is_none(), "the worker kept running");
    let expected = 300 + stored_after.into_inner();
    assert_eq!(env.all_processed(Duration::from_secs(30)).await?, expected);
    assert!(
        env.log_text(&format!("app-{}", app.port))
            .contains("database unavailable")
    );
    Ok(())
}

/// The app SIGKILLed while the broker is away: its tasks existed only in its memory. After
/// everything is back, the next app's sweep publishes them and every row is processed.
#[tokio::test(flavor = "multi_thread")]
async fn an_app_killed_while_the_broker_is_away_loses_no_task() -> anyhow::Result<()> {
    let mut env = TestEnv::dedicated().await?;
    env.migrate()?;
    let sweep = [("PAGEVIEWS_SWEEP_INTERVAL_SECS", "1")];
    let mut app = env.app(&sweep).await?;
    let _worker = env.worker("worker", &[]).await?;
    env.services_mut().rabbitmq.stop();
    let results = hammer(&app.url("/"), 50, 4).await;
    assert!(results.iter().all(|r| r == &Ok(200)), "{results:?}");
    app.process.stop_with(libc::SIGKILL, Duration::from_secs(5));
    // The broker never saw them: their ids were only in the killed app's memory.
    let unprocessed = env
        .sql_count("SELECT count(*) AS n FROM page_views WHERE processed_at IS NULL")
        .await?;
    assert_eq!(unprocessed, 50, "the tasks were only in the killed app");

    env.services_mut().rabbitmq.start_again().await?;
    let _app = env.app(&sweep).await?;
    assert_eq!(env.all_processed(Duration::from_secs(30)).await?, 50);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_mid_backlog_leaves_every_task_processed_once() -> anyhow::Result<()> {
    let _alone = crate::support::load_alone().await;
    let env = TestEnv::dedicated().await?;
    env.migrate()?;
    // A backlog big enough to kill a worker half-way (tasks carry up to 64 ids): made in the
    // database and published by the sweep.
    const BACKLOG: i64 = 20_000;
    env.backlog_in_db(BACKLOG).await?;
    let app = env.app(&[("PAGEVIEWS_SWEEP_INTERVAL_SECS", "1")]).await?;
    wait_until("the backlog to be queued", Duration::from_secs(30), || async {
        let confirmed = env.app_metric(&app, "pageviews_publish_confirmed_total").await?;
        anyhow::ensure!(confirmed >= BACKLOG as u64, "{confirmed} confirmed");
        Ok(())
    })
    .await?;

    // Prefetch 1 makes the first worker slow enough to be killed half-way.
    let mut first = env.worker("worker-1", &[("PAGEVIEWS_PREFETCH", "1")]).await?;
    wait_until("some tasks processed", Duration::from_secs(30), || async {
        let (_, processed) = env.counts().await?;
        anyhow::ensure!(processed >= 1_000, "{processed}");
        Ok(())
    })
    .await?;
    first.stop_with(libc::SIGKILL, Duration::from_secs(5));
    let (_, processed_before) = env.counts().await?;
    assert!(
        processed_before < BACKLOG,
        "the worker finished before it was killed; nothing was tested"
    );
    let snapshot = "SELECT count(*) AS n FROM page_views WHERE processed_at IS NOT NULL";
    // Reduced per row: the sum of the raw microseconds passes bigint at about 5 000 rows.
    let fingerprint = "SELECT COALESCE(sum((extract(epoch FROM processed_at) * 1000000)::bigint % 1000000007), 0)::bigint AS n \
                       FROM page_views WHERE processed_at IS NOT NULL";
    let before = env.sql_count(fingerprint).await?;

    let _second = env.worker("worker-2", &[]).await?;
    env.all_processed(Duration::from_secs(60)).await?;
    // Rows processed before the kill kept their processed_at: none was processed twice.
    let again =
        format!("{fingerprint} AND id IN (SELECT id FROM page_views ORDER BY processed_at LIMIT {processed_before})");
    assert_eq!(env.sql_count(&again).await?, before);
    assert_eq!(env.sql_count(snapshot).await?, BACKLOG);
    wait_until("the queue to drain", Duration::from_secs(10), || async {
        let depth = env.queue_depth(QUEUE)?;
        anyhow::ensure!(depth == 0, "{depth} left");
        Ok(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_and_bogus_tasks_are_dead_lettered_and_the_worker_keeps_going() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.migrate()?;
    let app = env.app(&[]).await?;
    let _worker = env.worker("worker", &[]).await?;
    let url = env.urls.amqp.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let (connection, channel) = pageviews::queue::open(&url, pageviews::config::DEFAULT_QUEUE_TYPE)?;
        for body in [
            &b"not json"[..],
            br#"{"page_view_id": 424242}"#,
            br#"{"page_view_id": -3}"#,
        ] {
            channel.basic_publish(EXCHANGE, amiquip::Publish::new(body, ROUTING_KEY))?;
        }
        connection.close()?;
        Ok(())
    })
    .await??;
    assert_eq!(client().get(app.url("/")).send().await?.status(), 200);
    env.all_processed(Duration::from_secs(20)).await?;
    // 60 s: twice in about ten runs under the whole suite's load, one of the three was still
    // missing after 20 s (cause not found; the worker's log is in the error for next time).
    wait_until("three dead letters", Duration::from_secs(60), || async {
        let depth = env.queue_depth(DEAD_LETTER_QUEUE)?;
        anyhow::ensure!(
            depth == 3,
            "{depth} dead-lettered; worker log:\n{}",
            env.log_text("worker")
        );
        Ok(())
    })
    .await?;
    let log = env.log_text("worker");
    assert!(
        log.contains("malformed task sent to the dead-letter queue") && log.contains(r#"body "not json""#),
        "{log}"
    );
    assert!(log.contains("page_view_id -3 is not positive"), "{log}");
    assert!(
        log.contains("task names no page view") && log.contains("424242"),
        "{log}"
    );
    Ok(())
}

/// Peak resident memory (VmHWM) of a process, in bytes.
fn peak_rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmHWM in /proc/{pid}/status"))?;
    Ok(kib * 1024)
}

/// Publishes each body to the task exchange on a fresh connection; the error of the first
/// publish the broker refuses (it closes the channel, seen at the next synchronous call).
async fn publish_raw(url: &str, bodies: Vec<Vec<u8>>) -> anyhow::Result<()> {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let (connection, channel) = pageviews::queue::open(&url, pageviews::config::DEFAULT_QUEUE_TYPE)?;
        for body in &bodies {
            channel.basic_publish(EXCHANGE, amiquip::Publish::new(body, ROUTING_KEY))?;
            channel.queue_declare_passive(QUEUE)?;
        }
        connection.close()?;
        Ok(())
    })
    .await?
}

/// A task body far over what 1 000 ids take is dead-lettered unread (before:
/// parsed whole, 30 MB took the worker from 7 MB to 622 MB), and the broker refuses bodies
/// over its configured `max_message_size` at publish.
#[tokio::test(flavor = "multi_thread")]
async fn an_oversize_task_is_refused_by_the_broker_or_dead_lettered_unread() -> anyhow::Result<()> {
    const HUGE: usize = 30 << 20;
    // "1,1,1,...": the most ids per byte, the worst case for a parser.
    let ids_body = |len: usize| {
        let mut body = br#"{"v":2,"page_view_ids":["#.to_vec();
        while body.len() < len - 3 {
            body.extend_from_slice(b"1,");
        }
        body.truncate(len - 3);
        body.extend_from_slice(b"1]}");
        assert_eq!(body.len(), len);
        body
    };
    let env = TestEnv::dedicated().await?;
    env.migrate()?;
    let refused = publish_raw(&env.urls.amqp, vec![ids_body(HUGE)]).await;
    let refusal = format!("{:#}", refused.expect_err("the broker took a 30 MB message"));
    assert!(refusal.contains("larger than configured max size"), "{refusal}");

    // A broker without that setting (RabbitMQ's default takes 128 MB): the worker's own bound.
    let rabbit = &env.services().rabbitmq;
    rabbit.ctl(&["eval", "application:set_env(rabbit, max_message_size, 134217728)."])?;
    let app = env.app(&[]).await?;
    let mut worker = env.worker("worker", &[]).await?;
    let before = peak_rss(worker.pid())?;
    let just_over = pageviews::queue::MAX_TASK_BYTES + 1;
    publish_raw(&env.urls.amqp, vec![ids_body(HUGE), ids_body(just_over)]).await?;
    assert_eq!(client().get(app.url("/")).send().await?.status(), 200);
    assert_eq!(
        env.all_processed(Duration::from_secs(30)).await?,
        1,
        "the worker kept going"
    );
    wait_until("two dead letters", Duration::from_secs(30), || async {
        let depth = env.queue_depth(DEAD_LETTER_QUEUE)?;
        anyhow::ensure!(depth == 2, "{depth} dead-lettered");
        Ok(())
    })
    .await?;
    assert!(worker.try_wait().is_none(), "the worker exited");
    // amiquip holds the 30 MB body once; nothing beyond that is proportional to it.
    let peak = peak_rss(worker.pid())?;
    eprintln!(
        "worker peak RSS {} MB before, {} MB after a {} MB body",
        before >> 20,
        peak >> 20,
        HUGE >> 20
    );
    assert!(peak < before + 3 * HUGE as u64, "peak RSS {peak} bytes");
    let log = env.log_text("worker");
    for size in [HUGE, just_over] {
        let line = format!("task body of {size} bytes is over the limit");
        assert!(log.contains(&line), "no {line:?} in:\n{log}");
    }
    Ok(())
}
