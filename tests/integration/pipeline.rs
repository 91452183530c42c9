//! The happy path through the real binaries: record, publish, process, roll up, observe.

use crate::support::{TestEnv, client, count_on, hammer};
use pageviews_testbed::process::wait_until;
use std::time::Duration;

/// `/visits/{id}` follows one visit: unprocessed while no worker runs, processed once one
/// does; only the boolean, never the row; clear answers for ids that are not visits.
#[tokio::test(flavor = "multi_thread")]
async fn a_visit_can_be_followed_until_it_is_processed() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.migrate()?;
    let app = env.app(&[]).await?;
    let page = client()
        .get(app.url("/"))
        .header("user-agent", "visit-follower/1.0")
        .send()
        .await?
        .text()
        .await?;
    assert!(page.contains(r#"<strong id="visit">#1</strong>"#), "{page}");

    let response = client().get(app.url("/visits/1")).send().await?;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let body = response.text().await?;
    assert_eq!(body, r#"{"id":1,"processed":false}"#, "the row's data must not show");

    let _worker = env.worker("worker", &[]).await?;
    wait_until("visit #1 processed", Duration::from_secs(20), || async {
        let body = client().get(app.url("/visits/1")).send().await?.text().await?;
        anyhow::ensure!(body == r#"{"id":1,"processed":true}"#, "{body}");
        Ok(())
    })
    .await?;

    let unknown = client().get(app.url("/visits/2")).send().await?;
    assert_eq!(unknown.status(), 404);
    assert_eq!(unknown.text().await?, "no visit #2\n");
    let malformed = client().get(app.url("/visits/one")).send().await?;
    assert_eq!(malformed.status(), 400);
    assert_eq!(malformed.text().await?, "a visit id is a whole number\n");
    assert_eq!(env.exact_counts().await?, (1, 1), "following a visit records none");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_page_view_is_recorded_published_and_processed() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.migrate()?;
    let app = env.app(&[]).await?;
    let _worker = env.worker("worker", &[]).await?;

    let response = client()
        .get(app.url("/"))
        .header("cookie", "session=s3cr3t-value; theme=dark")
        .header("user-agent", "integration-test/1.0")
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers().contains_key("x-request-id"),
        "no request id in {:?}",
        response.headers()
    );
    let page = response.text().await?;
    assert!(page.contains(r#"<strong id="visit">#1</strong>"#), "{page}");
    for asset in ["/static/app.css?v=", "/static/app.js?v=", "/static/logo.svg?v="] {
        assert!(page.contains(asset), "page does not load {asset}");
    }
    assert!(
        !page.contains("<script>") && !page.contains("style="),
        "inline script or style breaks the CSP"
    );

    let mut conn = env.db().await?;
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Text)]
        data: String,
    }
    use diesel_async::RunQueryDsl;
    let row: Row = diesel::sql_query("SELECT data::text AS data FROM page_views WHERE id = 1")
        .get_result(&mut conn)
        .await?;
    let data: serde_json::Value = serde_json::from_str(&row.data)?;
    assert_eq!(data["user_agent"], "integration-test/1.0");
    assert_eq!(data["cookie_names"], serde_json::json!(["session", "theme"]));
    assert!(
        !row.data.contains("s3cr3t") && !row.data.contains("dark"),
        "cookie values stored: {}",
        row.data
    );

    env.all_processed(Duration::from_secs(20)).await?;

    // The page now shows the worker's work (after the one-second figures cache).
    wait_until(
        "the page showing the processed visit",
        Duration::from_secs(5),
        || async {
            let page = client().get(app.url("/")).send().await?.text().await?;
            let processed = page
                .split(r#"<dd id="processed">"#)
                .nth(1)
                .and_then(|rest| rest.split('<').next()?.parse::<i64>().ok());
            anyhow::ensure!(processed >= Some(1), "{page}");
            Ok(())
        },
    )
    .await?;

    let metrics = client().get(app.url("/metrics")).send().await?.text().await?;
    let (rows, _) = env.counts().await?;
    assert!(
        metrics.contains(&format!("pageviews_page_views_recorded_total {rows}\n")),
        "{metrics}"
    );
    assert!(metrics.contains("pageviews_broker_connected 1\n"), "{metrics}");
    let ready = client().get(app.url("/readyz")).send().await?;
    assert_eq!(ready.status(), 200);
    assert_eq!(ready.text().await?, "database: ok\nbroker: ok\n");
    // HEAD checks the page without recording a visit.
    assert_eq!(client().head(app.url("/")).send().await?.status(), 200);
    assert_eq!(env.counts().await?.0, rows);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rollup_runs_once_per_interval_with_two_workers() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.migrate()?;
    let app = env.app(&[]).await?;
    let results = hammer(&app.url("/"), 40, 8).await;
    assert!(results.iter().all(|r| r == &Ok(200)), "{results:?}");
    let fast = [("PAGEVIEWS_ROLLUP_INTERVAL_SECS", "1")];
    let started = std::time::Instant::now();
    let mut one = env.worker("worker-1", &fast).await?;
    let mut two = env.worker("worker-2", &fast).await?;
    let runs = wait_until("three rollup runs", Duration::from_secs(10), || async {
        let runs = env
            .sql_count("SELECT runs AS n FROM scheduled_jobs WHERE name = 'rollup'")
            .await?;
        anyhow::ensure!(runs >= 3, "{runs} runs");
        Ok(runs)
    })
    .await?;
    let elapsed = started.elapsed().as_secs_f64();
    // Each worker ticks every second; without the claim there would be about twice as many.
    assert!((runs as f64) <= elapsed / 0.9 + 1.0, "{runs} runs in {elapsed:.1} s");
    let rolled = env
        .sql_count("SELECT COALESCE(sum(views), 0)::bigint AS n FROM page_view_rollups")
        .await?;
    assert_eq!(rolled, 40);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let page = client().get(app.url("/")).send().await?.text().await?;
    assert!(
        page.contains(r#"<tbody id="chart-rows">"#) && page.contains("<td>40</td>"),
        "{page}"
    );
    assert!(one.stop().is_some_and(|s| s.success()) && two.stop().is_some_and(|s| s.success()));
    Ok(())
}

/// SIGTERM in the middle of the load: the worker with a backlog and a batch in hand, then the
/// app with requests in flight; both exit 0, every answered request is a row, every row is
/// processed by the next worker.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_mid_load_drains_and_exits_zero() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.migrate()?;
    let mut app = env.app(&[]).await?;
    let mut worker = env.worker("worker", &[("PAGEVIEWS_PREFETCH", "10")]).await?;
    let load = tokio::spawn(hammer_url(app.url("/"), 1500, 8));
    wait_until("the worker busy with a backlog", Duration::from_secs(20), || async {
        let (rows, processed) = env.counts().await?;
        anyhow::ensure!(processed >= 20 && rows > processed + 20, "{processed} of {rows}");
        Ok(())
    })
    .await?;
    let worker_status = worker.stop().expect("worker was running");
    assert!(worker_status.success(), "worker exited with {worker_status:?}");
    assert!(env.log_text("worker").contains("worker stopped"));
    wait_until("more load", Duration::from_secs(20), || async {
        let (rows, _) = env.counts().await?;
        anyhow::ensure!(rows >= 300, "{rows}");
        Ok(())
    })
    .await?;
    anyhow::ensure!(!load.is_finished(), "the load ended before the app's SIGTERM");
    let app_status = app.process.stop().expect("app was running");
    assert!(
        app_status.success(),
        "app exited with {app_status:?}: {}",
        env.log_text(&format!("app-{}", app.port))
    );
    // `systemctl stop pageviews-app.socket` too: what waits in its backlog is refused.
    drop(app._socket);
    let results = load.await?;
    let answered = results.iter().filter(|r| r == &&Ok(200)).count();
    assert!(
        results.iter().all(|r| r == &Ok(200) || r.is_err()),
        "only 200s or refused connections: {results:?}"
    );
    // Every task the app accepted was handed to the broker before it exited.
    let _next = env.worker("worker-2", &[]).await?;
    assert_eq!(env.all_processed(Duration::from_secs(30)).await?, answered as i64);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn app_and_worker_ping_the_watchdog_and_announce_stopping() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.migrate()?;
    // 300 ms: a ping every 150 ms, from a task on each binary's runtime.
    let watchdog = [("WATCHDOG_USEC", "300000")];
    let mut app = env.app(&watchdog).await?;
    let mut worker = env.worker("worker", &watchdog).await?;
    for process in [&app.process, &worker] {
        let ready = process.notified().expect("started by the launcher");
        assert!(ready.ready && !ready.stopping, "{ready:?}");
        wait_until("three watchdog pings", Duration::from_secs(10), || async {
            let pings = process.notified().unwrap().watchdog_pings;
            anyhow::ensure!(pings >= 3, "{pings} pings");
            Ok(())
        })
        .await?;
    }
    assert!(
        app.process
            .notified()
            .unwrap()
            .status
            .starts_with("serving on 127.0.0.1:")
    );
    for process in [&mut app.process, &mut worker] {
        let status = process.stop_async(libc::SIGTERM, Duration::from_secs(20)).await;
        assert!(status.is_some_and(|s| s.success()), "{status:?}");
        // Sent before the exit; the launcher's reader may still be handling it.
        wait_until("STOPPING=1", Duration::from_secs(5), || async {
            anyhow::ensure!(process.notified().unwrap().stopping, "not yet");
            Ok(())
        })
        .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_passed_socket_the_app_binds_its_own_unix_socket() -> anyhow::Result<()> {
    use std::io::{Read, Write};
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let env = TestEnv::new().await?;
    env.migrate()?;
    let socket = env.dir.path().join("app.sock");
    // A socket file left by an earlier process, which nothing listens on: replaced.
    drop(std::os::unix::net::UnixListener::bind(&socket)?);
    let mut command = crate::support::binaries().app_command();
    command
        .env("DATABASE_URL", &env.urls.database)
        .env("AMQP_URL", &env.urls.amqp)
        .env("PAGEVIEWS_LISTEN", &socket);
    let mut app = pageviews_testbed::activation::start(
        "pageviews-app",
        command,
        None,
        env.dir.path(),
        &env.log("app-unix"),
        Duration::from_secs(30),
    )
    .await?;
    let meta = std::fs::symlink_metadata(&socket)?;
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    let answer = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        let mut stream = std::os::unix::net::UnixStream::connect(&socket)?;
        stream.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer)
    })
    .await??;
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    assert!(
        env.log_text("app-unix")
            .contains(&format!("listen=unix:{}", env.dir.path().join("app.sock").display()))
    );
    let status = app.stop_async(libc::SIGTERM, Duration::from_secs(20)).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    Ok(())
}

async fn hammer_url(url: String, n: usize, concurrency: usize) -> Vec<Result<u16, String>> {
    hammer(&url, n, concurrency).await
}

/// The two statements of every batch are prepared once per connection and reused, not parsed
/// and planned again for each batch (diesel never caches the text of a `sql_query`).
#[tokio::test(flavor = "multi_thread")]
async fn the_batch_statements_are_prepared_once_per_connection() -> anyhow::Result<()> {
    use pageviews::db::page_views;
    let env = TestEnv::new().await?;
    env.migrate()?;
    let mut conn = env.db().await?;
    for _ in 0..3 {
        let rows = [serde_json::json!({"n": 1}), serde_json::json!({"n": 2})];
        let give_up = tokio::time::Instant::now() + Duration::from_secs(5);
        let ids = page_views::insert(&mut conn, &rows, Duration::from_secs(5), give_up).await?;
        assert_eq!(page_views::process(&mut conn, &ids).await?.done.len(), 2);
    }
    // Only named (prepared) statements are listed; an unnamed one per call would leave none.
    let prepared = count_on(
        &mut conn,
        "SELECT count(*) AS n FROM pg_prepared_statements \
         WHERE statement LIKE 'INSERT INTO page_views (data) SELECT d%' \
         OR statement LIKE 'UPDATE page_views SET processed_at%'",
    )
    .await?;
    assert_eq!(prepared, 2, "the INSERT and the UPDATE, each prepared once");
    Ok(())
}
