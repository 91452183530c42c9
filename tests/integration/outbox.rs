//! The outbox and the counters: exact figures under concurrency, tasks lost after their
//! confirm, a backlog only the sweep can find, a broker dying while idle, a broker refusing
//! publishes.

use crate::support::{TestEnv, client, hammer};
use pageviews::queue::QUEUE;
use pageviews_testbed::process::wait_until;
use std::time::{Duration, Instant};

/// Runs `f` on a channel of the test's vhost (amiquip is blocking).
async fn on_channel(
    env: &TestEnv,
    f: impl FnOnce(&amiquip::Channel) -> amiquip::Result<()> + Send + 'static,
) -> anyhow::Result<()> {
    let url = env.urls.amqp.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let (connection, channel) = pageviews::queue::open(&url, pageviews::config::DEFAULT_QUEUE_TYPE)?;
        f(&channel)?;
        connection.close()?;
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread")]
async fn counters_equal_count_star_after_concurrent_load_and_a_worker_kill() -> anyhow::Result<()> {
    let env = TestEnv::dedicated().await?;
    env.migrate()?;
    let app = env.app(&[]).await?;
    // Small prefetch: many concurrent transactions, each adding to a counter row.
    let small = [("PAGEVIEWS_PREFETCH", "2")];
    let _a = env.worker("worker-a", &small).await?;
    let mut b = env.worker("worker-b", &small).await?;
    let _c = env.worker("worker-c", &small).await?;
    let load = tokio::spawn({
        let url = app.url("/");
        async move { hammer(&url, 4_000, 32).await }
    });
    wait_until("some page views processed", Duration::from_secs(30), || async {
        let (_, processed) = env.exact_counts().await?;
        anyhow::ensure!(processed >= 500, "{processed}");
        Ok(())
    })
    .await?;
    b.stop_with(libc::SIGKILL, Duration::from_secs(5));
    let _d = env.worker("worker-d", &small).await?;
    let results = load.await?;
    let ok = results.iter().filter(|r| r == &&Ok(200)).count() as i64;
    assert_eq!(ok, 4_000, "{:?}", results.iter().find(|r| r != &&Ok(200)));
    // all_processed compares the counters with count(*) and count(processed_at).
    assert_eq!(env.all_processed(Duration::from_secs(60)).await?, ok);
    Ok(())
}

/// The broker confirmed the tasks, then lost them (purge; queue deleted, so
/// publishes are unroutable until the app declares it again).
#[tokio::test(flavor = "multi_thread")]
async fn tasks_lost_after_their_confirm_are_processed_anyway() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.migrate()?;
    let app = env.app(&[("PAGEVIEWS_SWEEP_INTERVAL_SECS", "1")]).await?;
    let confirmed = |n: u64| {
        let (env, app) = (&env, &app);
        async move {
            wait_until("tasks confirmed", Duration::from_secs(20), || async {
                let c = env.app_metric(app, "pageviews_publish_confirmed_total").await?;
                anyhow::ensure!(c >= n, "{c} of {n} confirmed");
                Ok(())
            })
            .await
        }
    };
    assert!(hammer(&app.url("/"), 200, 8).await.iter().all(|r| r == &Ok(200)));
    confirmed(200).await?;
    on_channel(&env, |ch| ch.queue_purge(QUEUE).map(|_| ())).await?;
    // Deleted: the next publishes are unroutable (returned), then the app declares it again.
    on_channel(&env, |ch| ch.queue_delete(QUEUE, Default::default()).map(|_| ())).await?;
    assert!(hammer(&app.url("/"), 100, 8).await.iter().all(|r| r == &Ok(200)));
    let _worker = env.worker("worker", &[]).await?;
    assert_eq!(env.all_processed(Duration::from_secs(30)).await?, 300);
    Ok(())
}

/// After an outage and a restart, the sweep catches up at full speed.
#[tokio::test(flavor = "multi_thread")]
async fn a_backlog_only_in_the_database_is_caught_up_at_full_speed() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.migrate()?;
    const BACKLOG: i64 = 30_000;
    env.backlog_in_db(BACKLOG).await?;
    let _worker = env.worker("worker", &[]).await?;
    let started = Instant::now();
    let _app = env.app(&[("PAGEVIEWS_SWEEP_INTERVAL_SECS", "2")]).await?;
    // The old sweep offered 2 000 rows per interval, and none while the queue was non-empty.
    env.all_processed(Duration::from_secs(20)).await?;
    eprintln!("{BACKLOG} rows caught up in {:?}", started.elapsed());
    Ok(())
}

/// A broker that stops answering is noticed while nothing is published.
#[tokio::test(flavor = "multi_thread")]
async fn readiness_notices_a_hung_broker_while_idle() -> anyhow::Result<()> {
    let env = TestEnv::dedicated().await?;
    env.migrate()?;
    let app = env.app(&[]).await?;
    assert_eq!(client().get(app.url("/")).send().await?.status(), 200);
    wait_until("ready", Duration::from_secs(10), || async {
        let status = client().get(app.url("/readyz")).send().await?.status();
        anyhow::ensure!(status == 200, "{status}");
        Ok(())
    })
    .await?;
    let pid = env.services().rabbitmq.pid().expect("the test's broker runs") as i32;
    // SAFETY: kill(2) on the test's own broker's process group; no RST, no close frame.
    unsafe { libc::kill(-pid, libc::SIGSTOP) };
    let started = Instant::now();
    // Heartbeat 5 s: amiquip gives up after two missed beats.
    let noticed = wait_until("readyz 503 and the gauge at 0", Duration::from_secs(20), || async {
        let ready = client().get(app.url("/readyz")).send().await?.status();
        let gauge = env.app_metric(&app, "pageviews_broker_connected").await?;
        anyhow::ensure!(ready == 503 && gauge == 0, "readyz {ready}, gauge {gauge}");
        Ok(())
    })
    .await;
    // SAFETY: kill(2) on the process group of the broker this test started.
    unsafe { libc::kill(-pid, libc::SIGCONT) };
    noticed?;
    eprintln!("noticed after {:?}", started.elapsed());
    Ok(())
}

/// A queue that refuses publishes (nacks) makes the publisher back off, not
/// retry in a loop; once it accepts again, everything is delivered. A quorum queue (the
/// default): it went on refusing the publisher's channel after the policy was cleared, until
/// the publisher took a new channel after a refusal.
#[tokio::test(flavor = "multi_thread")]
async fn persistent_nacks_back_off_and_recover() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.migrate()?;
    let rabbit = &env.services().rabbitmq;
    rabbit.ctl(&[
        "set_policy",
        "-p",
        &env.vhost,
        "--apply-to",
        "queues",
        "refuse",
        "^pageviews\\.tasks$",
        r#"{"max-length": 1, "overflow": "reject-publish"}"#,
    ])?;
    let app = env.app(&[]).await?;
    // Page views until a publish is refused: a quorum queue lets its length pass the limit by
    // what is in flight, so how many it takes first varies.
    let log_name = format!("app-{}", app.port);
    let stored = std::sync::atomic::AtomicI64::new(0);
    wait_until("a refusal", Duration::from_secs(20), || async {
        let results = hammer(&app.url("/"), 10, 2).await;
        assert!(results.iter().all(|r| r == &Ok(200)), "{results:?}");
        stored.fetch_add(10, std::sync::atomic::Ordering::Relaxed);
        anyhow::ensure!(env.log_text(&log_name).contains("broker refused tasks"), "none yet");
        Ok(())
    })
    .await?;
    // A window of 3 s to count retries in (the old publisher retried in a hot loop).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = env.log_text(&log_name);
    let refusals = log.matches("broker refused tasks").count();
    assert!((1..=8).contains(&refusals), "{refusals} refusal lines in 3 s:\n{log}");
    rabbit.ctl(&["clear_policy", "-p", &env.vhost, "refuse"])?;
    let _worker = env.worker("worker", &[]).await?;
    assert_eq!(env.all_processed(Duration::from_secs(30)).await?, stored.into_inner());
    Ok(())
}

/// A locked table answers 503 within `PAGEVIEWS_DB_TIMEOUT_MS`, and the
/// request answered 503 leaves no row once the lock is gone.
#[tokio::test(flavor = "multi_thread")]
async fn a_locked_table_gives_a_quick_503_and_no_row_later() -> anyhow::Result<()> {
    use diesel_async::{AsyncConnection, RunQueryDsl};
    let env = TestEnv::new().await?;
    env.migrate()?;
    let app = env.app(&[("PAGEVIEWS_DB_TIMEOUT_MS", "1000")]).await?;
    assert_eq!(client().get(app.url("/")).send().await?.status(), 200);
    let mut locker = env.db().await?;
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let (locked, is_locked) = tokio::sync::oneshot::channel::<()>();
    let holder = tokio::spawn(async move {
        locker
            .transaction(async |conn| {
                diesel::sql_query("LOCK TABLE page_views IN ACCESS EXCLUSIVE MODE")
                    .execute(conn)
                    .await?;
                let _ = locked.send(());
                let _ = released.await;
                Ok::<_, diesel::result::Error>(())
            })
            .await
    });
    is_locked.await?;
    let started = Instant::now();
    let status = client().get(app.url("/")).send().await?.status();
    let took = started.elapsed();
    assert_eq!(status, 503);
    assert!(took < Duration::from_millis(1_800), "503 took {took:?}");
    let _ = release.send(());
    holder.await??;
    // The next view queues behind the released INSERT, so once it is answered that one is done.
    let page = client().get(app.url("/")).send().await?;
    assert_eq!(page.status(), 200);
    assert_eq!(env.exact_counts().await?.0, 2, "the request answered 503 left a row");
    assert_eq!(env.counts().await?.0, 2);
    Ok(())
}

/// `/readyz` status and body.
async fn readiness(app: &crate::support::RunningApp) -> anyhow::Result<(u16, String)> {
    let response = client().get(app.url("/readyz")).send().await?;
    Ok((response.status().as_u16(), response.text().await?))
}

/// A resource alarm (connection.blocked): readiness and the gauge say so and
/// why, the failure is counted, a SIGTERM ends the app in time, and once the alarm clears
/// every page view is processed. Before: still "ready", failures 0, and SIGTERM waited for
/// the alarm to clear (the publisher thread stuck in a channel close).
#[tokio::test(flavor = "multi_thread")]
async fn a_resource_alarm_is_not_ready_and_sigterm_still_ends_the_app() -> anyhow::Result<()> {
    let env = TestEnv::dedicated().await?;
    env.migrate()?;
    let sweep = [("PAGEVIEWS_SWEEP_INTERVAL_SECS", "1")];
    let mut app = env.app(&sweep).await?;
    let _worker = env.worker("worker", &[]).await?;
    let rabbit = &env.services().rabbitmq;
    let alarm = || rabbit.ctl(&["set_vm_memory_high_watermark", "0.0000001"]);
    let clear = || rabbit.ctl(&["set_vm_memory_high_watermark", "0.4"]);
    views(&app, 10).await;
    assert_eq!(env.all_processed(Duration::from_secs(20)).await?, 10);

    // The alarm while publishing: not ready, with the broker's reason, and counted.
    alarm()?;
    let outcome = async {
        views(&app, 20).await;
        wait_until("not ready, blocked", Duration::from_secs(20), || async {
            let (status, body) = readiness(&app).await?;
            let gauge = env.app_metric(&app, "pageviews_broker_connected").await?;
            anyhow::ensure!(status == 503 && gauge == 0, "readyz {status} {body:?}, gauge {gauge}");
            Ok(body)
        })
        .await
    }
    .await;
    let body = match outcome {
        Ok(body) => body,
        Err(e) => {
            clear()?;
            return Err(e);
        }
    };
    assert!(
        body.contains("broker: blocked by the broker (") && body.contains("memory"),
        "{body}"
    );
    assert!(env.app_metric(&app, "pageviews_publish_failures_total").await? >= 1);
    // Nothing is known of the queue meanwhile: the sweep does not offer the rows the
    // publisher holds again and again (three intervals).
    let republished = env.app_metric(&app, "pageviews_republished_total").await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let again = env.app_metric(&app, "pageviews_republished_total").await?;
    // Cleared: the same app publishes again, and is ready again.
    clear()?;
    assert_eq!(again, republished, "the sweep offered rows again during the alarm");
    assert_eq!(env.all_processed(Duration::from_secs(30)).await?, 30);
    wait_until("ready again", Duration::from_secs(20), || async {
        let (status, body) = readiness(&app).await?;
        anyhow::ensure!(status == 200, "{status} {body:?}");
        Ok(())
    })
    .await?;

    // Again, and SIGTERM during the alarm: the app holds unconfirmed tasks and exits anyway.
    alarm()?;
    views(&app, 20).await;
    let blocked = wait_until("blocked again", Duration::from_secs(20), || async {
        let (status, body) = readiness(&app).await?;
        anyhow::ensure!(status == 503, "{status} {body:?}");
        Ok(())
    })
    .await;
    let started = Instant::now();
    let status = app.process.stop_with(libc::SIGTERM, Duration::from_secs(30));
    let took = started.elapsed();
    let log = env.log_text(&format!("app-{}", app.port));
    let replacement = env.app(&sweep).await;
    clear()?;
    blocked?;
    eprintln!("SIGTERM during the alarm: exit after {took:?}");
    assert!(status.is_some_and(|s| s.success()), "{status:?}: {log}");
    assert!(took < Duration::from_secs(5), "SIGTERM took {took:?}: {log}");
    assert!(log.contains("stopping with unpublished tasks"), "{log}");
    // The replacement's sweep publishes what the stopped app held; nothing is lost.
    let _replacement = replacement?;
    assert_eq!(env.all_processed(Duration::from_secs(30)).await?, 50);
    Ok(())
}

/// `n` page views, each answered 200.
async fn views(app: &crate::support::RunningApp, n: usize) {
    let results = hammer(&app.url("/"), n, 4).await;
    assert!(results.iter().all(|r| r == &Ok(200)), "{results:?}");
}

/// Rows without a task while the queue is never empty (no worker keeps up,
/// here none runs) are offered again after the maximum wait (6 sweep intervals), and each row
/// only once however long the queue stays full. Before: never, while any message was ready.
#[tokio::test(flavor = "multi_thread")]
async fn lost_tasks_are_offered_again_within_the_maximum_wait_even_if_the_queue_never_empties() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.migrate()?;
    // 1 s: the maximum wait is 6 s.
    let app = env.app(&[("PAGEVIEWS_SWEEP_INTERVAL_SECS", "1")]).await?;
    views(&app, 20).await;
    wait_until("tasks confirmed", Duration::from_secs(20), || async {
        let c = env.app_metric(&app, "pageviews_publish_confirmed_total").await?;
        anyhow::ensure!(c >= 20, "{c} of 20 confirmed");
        Ok(())
    })
    .await?;
    // A quorum queue's count follows the confirm shortly. From now on it never empties:
    // nothing consumes it.
    wait_until("the tasks counted in the queue", Duration::from_secs(10), || async {
        let depth = env.queue_depth(QUEUE)?;
        anyhow::ensure!(depth > 0, "{depth}");
        Ok(())
    })
    .await?;
    // Rows whose tasks were lost (never published, or purged after their confirm).
    env.backlog_in_db(10).await?;
    let lost_at = Instant::now();
    let republished = || env.app_metric(&app, "pageviews_republished_total");
    // Every row is unprocessed and older than the maximum wait by then: all 30 offered, the
    // 10 without a task among them.
    // The maximum wait, an interval, and a margin for a busy machine.
    let offered = wait_until("the lost rows offered again", Duration::from_secs(12), || async {
        assert!(env.queue_depth(QUEUE)? > 0, "the queue emptied: the test tests nothing");
        let n = republished().await?;
        anyhow::ensure!(n >= 30, "{n} offered again");
        Ok(lost_at.elapsed())
    })
    .await?;
    eprintln!("lost tasks offered again {offered:?} after the rows were made");
    // Three more intervals: no row is offered a second time while the queue stays full.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(env.queue_depth(QUEUE)? > 0);
    assert_eq!(republished().await?, 30, "a row offered twice");
    let _worker = env.worker("worker", &[]).await?;
    assert_eq!(env.all_processed(Duration::from_secs(30)).await?, 30);
    Ok(())
}
