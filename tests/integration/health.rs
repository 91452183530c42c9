//! What the operators' routes tell, and to whom: `/metrics` and `/readyz` only where the
//! operators asked for them, readiness that says what failed without quoting the database,
//! checks that cannot take the request path's connections, and no input reflected.

use crate::support::{TestEnv, binaries, client, count_on, hammer, wait_for_log};
use diesel_async::{AsyncConnection, AsyncPgConnection};
use pageviews_testbed::activation::ListenSocket;
use pageviews_testbed::process::{free_port, wait_until};
use pageviews_testbed::{self as stack, Urls};
use std::time::Duration;

/// Waits until `/readyz` at `url` answers 200 (the publisher connects after the start).
async fn ready(url: &str) -> anyhow::Result<()> {
    wait_until("ready", Duration::from_secs(20), || async {
        let status = client().get(url).send().await?.status();
        anyhow::ensure!(status == 200, "{status}");
        Ok(())
    })
    .await
}

/// With `PAGEVIEWS_APP_METRICS_LISTEN` set, `/metrics` and `/readyz` are served there
/// and nowhere else (the main listener is reachable by whoever reaches the app: the images
/// publish its port).
#[tokio::test(flavor = "multi_thread")]
async fn with_an_operators_listener_metrics_and_readiness_are_only_there() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.migrate()?;
    let operations = format!("127.0.0.1:{}", free_port()?);
    let app = env.app(&[("PAGEVIEWS_APP_METRICS_LISTEN", &operations)]).await?;
    let c = client();
    for path in ["/metrics", "/readyz"] {
        assert_eq!(
            c.get(app.url(path)).send().await?.status(),
            404,
            "{path} on the main listener"
        );
    }
    assert_eq!(c.get(app.url("/healthz")).send().await?.status(), 200);
    assert_eq!(c.get(app.url("/")).send().await?.status(), 200);
    let on_operations = |path: &str| format!("http://{operations}{path}");
    assert_eq!(c.get(on_operations("/metrics")).send().await?.status(), 200);
    assert_eq!(c.get(on_operations("/healthz")).send().await?.status(), 200);
    assert_eq!(c.get(on_operations("/")).send().await?.status(), 404);
    ready(&on_operations("/readyz")).await?;
    Ok(())
}

/// `/readyz` says which dependency is missing in its own words; what the database or the
/// pool said goes to the log only.
#[tokio::test(flavor = "multi_thread")]
async fn readiness_names_what_failed_and_logs_why() -> anyhow::Result<()> {
    let dir = pageviews_testbed::ScratchDir::new("pageviews-readiness")?;
    let urls = Urls {
        database: format!("postgres://app:pw@127.0.0.1:{}/db", free_port()?),
        amqp: format!("amqp://app:pw@127.0.0.1:{}/%2f", free_port()?),
    };
    let socket = ListenSocket::loopback()?;
    let log = dir.path().join("app.log");
    let _app = stack::start_app_unready(&binaries(), &urls, &socket, &[], &log).await?;
    let ready = client()
        .get(format!("http://127.0.0.1:{}/readyz", socket.port()))
        .send()
        .await?;
    assert_eq!(ready.status(), 503);
    assert_eq!(
        ready.text().await?,
        "database: unavailable (no connection)\nbroker: unavailable\n"
    );
    let log = wait_for_log(
        &log,
        "readiness check: the database did not answer",
        Duration::from_secs(5),
    )
    .await?;
    assert!(log.contains("Timed out in bb8"), "{log}");
    Ok(())
}

/// Transactions run in the database `name`, once every connection to it has ended (a
/// backend reports its statistics before it leaves pg_stat_activity).
async fn transactions(admin: &mut AsyncPgConnection, name: &str) -> anyhow::Result<i64> {
    let connected = format!("SELECT count(*) AS n FROM pg_stat_activity WHERE datname = '{name}'");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n = count_on(admin, &connected).await?;
        if n == 0 {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{n} connections to {name} after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let query = format!("SELECT xact_commit + xact_rollback AS n FROM pg_stat_database WHERE datname = '{name}'");
    count_on(admin, &query).await
}

/// Readiness checks share one query at a time, and reuse its answer for a second: a
/// burst of `/readyz` (or of scrapes) costs the request pool one connection, not one each.
#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_readiness_checks_costs_a_few_queries() -> anyhow::Result<()> {
    const CHECKS: usize = 500;
    let env = TestEnv::new().await?;
    env.migrate()?;
    let mut admin = AsyncPgConnection::establish(&env.services().postgres.admin_url()).await?;
    let before = transactions(&mut admin, &env.vhost).await?;
    let mut app = env.app(&[]).await?;
    ready(&app.url("/readyz")).await?;
    let statuses = hammer(&app.url("/readyz"), CHECKS, 50).await;
    assert!(statuses.iter().all(|s| s == &Ok(200)), "{statuses:?}");
    let status = app.process.stop_async(libc::SIGTERM, Duration::from_secs(30)).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let spent = transactions(&mut admin, &env.vhost).await? - before;
    eprintln!("{CHECKS} readiness checks: the app ran {spent} transactions in all");
    // The app's own start and stop take a few dozen (connection setup, the sweep).
    assert!(spent < 200, "{spent} transactions for {CHECKS} readiness checks");
    Ok(())
}

/// A visit id that is not a number is refused without echoing it back.
#[tokio::test(flavor = "multi_thread")]
async fn a_bad_visit_id_is_not_reflected() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.migrate()?;
    let app = env.app(&[]).await?;
    let input = "%3Cscript%3Ealert(1)%3C%2Fscript%3E";
    let response = client().get(app.url(&format!("/visits/{input}"))).send().await?;
    assert_eq!(response.status(), 400);
    let body = response.text().await?;
    assert!(!body.contains("script") && !body.contains("alert"), "{body}");
    assert_eq!(body, "a visit id is a whole number\n");
    Ok(())
}
