//! The page people look at: the chart and the live figures, through nginx over TLS, in a real
//! browser and without one.

use crate::browser::Browser;
use crate::support::{TestEnv, binaries};
use pageviews_testbed::Deployment;
use pageviews_testbed::nginx::NginxOptions;
use pageviews_testbed::process::{free_port, wait_until};
use serde_json::Value;
use std::time::{Duration, Instant};

/// Page views in each of the last 40 minutes before the test, recorded straight into the table
/// so the chart has a history to show: 2 to 12 a minute, rising towards now.
const HISTORY_MINUTES: i64 = 40;

fn history_views(minutes_ago: i64) -> i64 {
    2 + (minutes_ago * 13) % 7 + (HISTORY_MINUTES - minutes_ago) / 8
}

async fn seed_history(env: &TestEnv) -> anyhow::Result<i64> {
    env.migrate()?;
    let mut conn = env.db().await?;
    let mut total = 0;
    for minutes_ago in 1..=HISTORY_MINUTES {
        let n = history_views(minutes_ago);
        total += n;
        diesel_async::RunQueryDsl::execute(
            diesel::sql_query(
                // Counted like the app counts them (page_view_counts), so the figures agree.
                "WITH inserted AS (INSERT INTO page_views (created_at, data) \
                 SELECT date_trunc('minute', now()) - make_interval(mins => $1) + interval '30 seconds', '{}' \
                 FROM generate_series(1, $2)) \
                 UPDATE page_view_counts SET recorded = recorded + $2 WHERE shard = 0",
            )
            .bind::<diesel::sql_types::Integer, _>(minutes_ago as i32)
            .bind::<diesel::sql_types::Integer, _>(n as i32),
            &mut conn,
        )
        .await?;
    }
    Ok(total)
}

async fn deploy(env: &TestEnv, tweak: impl FnOnce(&mut NginxOptions)) -> anyhow::Result<Deployment> {
    let mut options = NginxOptions::new(free_port()?, free_port()?);
    tweak(&mut options);
    // The rollup every second, so the chart follows the visits within the test; the sweep
    // every second, so the seeded rows (which have no task) are handed over soon.
    let app_env = [("PAGEVIEWS_SWEEP_INTERVAL_SECS", "1".to_owned())];
    let worker_env = [("PAGEVIEWS_ROLLUP_INTERVAL_SECS", "1".to_owned())];
    Deployment::start(env.dir.path(), &binaries(), &env.urls, options, &app_env, &worker_env).await
}

fn client(d: &Deployment) -> anyhow::Result<reqwest::Client> {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&d.certificates.ca)?)?;
    Ok(reqwest::Client::builder()
        .add_root_certificate(ca)
        .timeout(Duration::from_secs(10))
        .build()?)
}

/// Views in the chart's bars of a `/stats` answer.
fn charted(stats: &Value) -> i64 {
    stats["chart"]["bars"]
        .as_array()
        .map(|bars| bars.iter().filter_map(|b| b["views"].as_i64()).sum())
        .unwrap_or(0)
}

fn number(text: &str) -> anyhow::Result<i64> {
    text.trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("{text:?} is not a number: {e}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn in_chromium_the_page_shows_the_chart_and_follows_other_visits_without_csp_violations() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let seeded = seed_history(&env).await?;
    let d = deploy(&env, |_| {}).await?;
    let browser = Browser::start(env.dir.path(), &d.certificates.ca_spki_sha256).await?;

    browser.client.goto(&d.https_url("/")).await?;
    assert_eq!(browser.client.title().await?, "pageviews");
    // The chart: 60 bars, a text alternative, the history drawn to scale.
    let bars = browser
        .client
        .execute(
            "return [...document.querySelectorAll('#chart-bars rect')].map(r => r.getBBox().height);",
            vec![],
        )
        .await?;
    let heights: Vec<f64> = serde_json::from_value(bars)?;
    assert_eq!(heights.len(), 60, "{heights:?}");
    let drawn = heights.iter().filter(|h| **h > 0.0).count();
    assert!(drawn >= HISTORY_MINUTES as usize, "{drawn} bars drawn: {heights:?}");
    let chart = browser
        .client
        .execute("return document.querySelector('svg#chart[role=img]') !== null;", vec![])
        .await?;
    assert_eq!(chart, true, "no SVG chart with role=img");
    let desc = browser
        .client
        .execute("return document.getElementById('chart-desc').textContent;", vec![])
        .await?;
    assert!(
        desc.as_str().is_some_and(|d| d.contains("views from")),
        "text alternative: {desc}"
    );

    // Another client records visits; the page follows without a reload.
    let before = number(&browser.text("#recorded").await?)?;
    let other = client(&d)?;
    for _ in 0..3 {
        assert_eq!(other.get(d.https_url("/")).send().await?.status(), 200);
    }
    let expected = seeded + 1 + 3; // the history, the browser's visit, the other client's
    let (recorded, charted_rows) = wait_until("the page to show the other visits", Duration::from_secs(30), || async {
        let recorded = number(&browser.text("#recorded").await?)?;
        let processed = number(&browser.text("#processed").await?)?;
        let rows = browser
            .client
            .execute(
                "return [...document.querySelectorAll('#chart-rows tr td:last-child')].map(td => Number(td.textContent));",
                vec![],
            )
            .await?;
        let charted: i64 = serde_json::from_value::<Vec<i64>>(rows)?.iter().sum();
        anyhow::ensure!(
            recorded == expected && processed == expected && charted == expected,
            "recorded {recorded}, processed {processed}, charted {charted}; expected {expected}"
        );
        Ok((recorded, charted))
    })
    .await?;
    println!(
        "browser: recorded {before} before, {recorded} after another client's 3 visits; chart total {charted_rows}"
    );
    // Polling recorded nothing: still exactly the visits made.
    assert_eq!(env.counts().await?.0, expected);
    let polls = d.nginx.access_log().matches("\"uri\":\"/stats\"").count();
    assert!(polls >= 1, "the page never polled /stats");

    let console = browser.console().await?;
    let errors: Vec<_> = console.iter().filter(|e| e.level == "SEVERE").collect();
    let violations = browser.csp_violations().await?;
    println!(
        "browser: {} console entries, {} errors, {} CSP violations, {polls} polls of /stats",
        console.len(),
        errors.len(),
        violations.len()
    );
    assert!(errors.is_empty(), "console errors: {errors:?}");
    assert!(violations.is_empty(), "CSP violations: {violations:?}");

    let screenshot = browser.client.screenshot().await?;
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("../screenshots");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("page.png");
    std::fs::write(&path, &screenshot)?;
    assert!(screenshot.starts_with(b"\x89PNG"), "not a PNG");
    println!("browser: screenshot at {}", path.canonicalize()?.display());

    // The collectors do catch a violation: an inline style is refused and reported by both.
    browser
        .client
        .execute("document.body.setAttribute('style', 'color: red');", vec![])
        .await?;
    let violations = wait_until("the CSP listener to report", Duration::from_secs(5), || async {
        let v = browser.csp_violations().await?;
        anyhow::ensure!(!v.is_empty(), "nothing reported");
        Ok(v)
    })
    .await?;
    assert!(violations[0].starts_with("style-src"), "{violations:?}");
    let console = browser.console().await?;
    assert!(
        console
            .iter()
            .any(|e| e.level == "SEVERE" && e.message.contains("Content Security Policy")),
        "the console log missed the violation: {console:?}"
    );
    browser.close().await
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_records_nothing_is_cached_for_a_second_and_rate_limited() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let seeded = seed_history(&env).await?;
    let d = deploy(&env, |_| {}).await?;
    let c = client(&d)?;

    // Without JavaScript the page is complete: figures and the whole chart in the HTML.
    let page = c.get(d.https_url("/")).send().await?.text().await?;
    assert!(page.contains(r#"<dd id="recorded">"#), "{page}");
    assert!(page.contains("<svg viewBox=") && page.contains(r#"<desc id="chart-desc">"#));
    assert_eq!(page.matches("<rect ").count(), 60);
    assert!(!page.contains("style="), "inline style on the page");

    // Polls within the rate limit, with cache-busting query strings: the app answers about
    // once a second, nginx the rest.
    let app_requests = || async {
        let metrics = reqwest::get(d.app_url("/metrics")).await?.text().await?;
        anyhow::Ok(
            metrics
                .lines()
                .filter(|l| l.starts_with("pageviews_http_requests_total{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum::<u64>(),
        )
    };
    let before = app_requests().await?;
    let started = Instant::now();
    for i in 0..15 {
        let response = c.get(d.https_url(&format!("/stats?n={i}"))).send().await?;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "application/json");
    }
    let seconds = started.elapsed().as_secs() + 1;
    // Minus the /metrics read before this one.
    let reached = app_requests().await? - before - 1;
    assert!(
        reached <= seconds + 1,
        "{reached} of 15 polls reached the app in {seconds} s"
    );

    // Beyond the burst: 429, like `/`.
    let mut statuses = Vec::new();
    for _ in 0..30 {
        statuses.push(c.get(d.https_url("/stats")).send().await?.status().as_u16());
    }
    assert!(statuses.contains(&429), "no 429 for /stats: {statuses:?}");

    // The JSON agrees with the database once the rollup has run (429s are retried).
    let stats = wait_until("the rollup to count the history", Duration::from_secs(20), || async {
        let stats: Value = c
            .get(d.https_url("/stats"))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        anyhow::ensure!(charted(&stats) == seeded + 1, "charted {}", charted(&stats));
        Ok(stats)
    })
    .await?;
    assert_eq!(stats["recorded"], seeded + 1);
    assert_eq!(stats["chart"]["bars"].as_array().map(Vec::len), Some(60));
    let peak = (1..=HISTORY_MINUTES).map(history_views).max();
    assert_eq!(stats["chart"]["peak"].as_i64(), peak);
    assert_eq!(env.counts().await?.0, seeded + 1, "/stats recorded a visit");
    Ok(())
}

const FIGURES_AWAY: &str = "ALTER TABLE page_view_rollups RENAME TO page_view_rollups_away";
const FIGURES_BACK: &str = "ALTER TABLE page_view_rollups_away RENAME TO page_view_rollups";

async fn sql(env: &TestEnv, statement: &str) -> anyhow::Result<()> {
    diesel_async::RunQueryDsl::execute(diesel::sql_query(statement), &mut env.db().await?).await?;
    Ok(())
}

/// When the figures cannot be refreshed, `/stats` still answers with the last ones read,
/// marked `"stale": true` with the time they were read (`as_of`), and not cacheable: never as
/// fresh figures for another second.
#[tokio::test(flavor = "multi_thread")]
async fn stats_marks_figures_it_could_not_refresh() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.migrate()?;
    let app = env.app(&[]).await?;
    let stats = || async {
        let response = crate::support::client().get(app.url("/stats")).send().await?;
        anyhow::ensure!(response.status() == 200, "status {}", response.status());
        let cache = response.headers()["cache-control"].to_str()?.to_owned();
        anyhow::Ok((cache, response.json::<Value>().await?))
    };
    let (cache, fresh) = stats().await?;
    assert_eq!(cache, "public, max-age=1");
    assert_eq!(fresh["stale"], false, "{fresh}");
    let as_of = chrono::DateTime::parse_from_rfc3339(fresh["as_of"].as_str().unwrap_or_default())?;
    let age = chrono::Utc::now().signed_duration_since(as_of);
    assert!(age.num_seconds().abs() < 60, "as_of {as_of}");

    sql(&env, FIGURES_AWAY).await?;
    let stale = wait_until("/stats to mark its figures stale", Duration::from_secs(10), || async {
        let (cache, body) = stats().await?;
        anyhow::ensure!(body["stale"] == true, "{body}");
        Ok((cache, body))
    })
    .await;
    sql(&env, FIGURES_BACK).await?;
    let (cache, stale) = stale?;
    assert_eq!(cache, "no-store");
    assert_eq!(stale["as_of"], fresh["as_of"], "the time the shown figures were read");
    assert_eq!(stale["recorded"], fresh["recorded"]);
    assert_eq!(stale["chart"]["bars"].as_array().map(Vec::len), Some(60));
    wait_until("/stats fresh again", Duration::from_secs(10), || async {
        let (cache, body) = stats().await?;
        anyhow::ensure!(
            body["stale"] == false && cache == "public, max-age=1",
            "{cache}: {body}"
        );
        Ok(())
    })
    .await?;
    Ok(())
}

/// The script says so when the server could not refresh the figures, on a page that
/// showed fresh ones and on a page rendered with stale ones (before: "Figures updated 0 s
/// ago" in both cases).
#[tokio::test(flavor = "multi_thread")]
async fn in_chromium_figures_that_could_not_be_refreshed_are_said_to_be_so() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.migrate()?;
    let d = deploy(&env, |_| {}).await?;
    let browser = Browser::start(env.dir.path(), &d.certificates.ca_spki_sha256).await?;
    browser.client.goto(&d.https_url("/")).await?;
    let note_says = |words: &'static str| {
        let browser = &browser;
        move || async move {
            let note = browser.text("#age").await?;
            anyhow::ensure!(note.contains(words), "{note:?}");
            Ok(note)
        }
    };
    wait_until(
        "the fresh figures",
        Duration::from_secs(10),
        note_says("Figures updated"),
    )
    .await?;

    sql(&env, FIGURES_AWAY).await?;
    let followed = wait_until(
        "the note on stale figures",
        Duration::from_secs(20),
        note_says("could not be refreshed"),
    )
    .await;
    let reloaded = match followed {
        Ok(_) => {
            // Loaded with stale figures: the script's first words keep saying so.
            browser.client.goto(&d.https_url("/")).await?;
            note_says("could not be refreshed")().await
        }
        Err(e) => Err(e),
    };
    sql(&env, FIGURES_BACK).await?;
    let note = reloaded?;
    assert!(note.contains(" UTC"), "the time the figures were read: {note:?}");
    wait_until(
        "the fresh figures again",
        Duration::from_secs(20),
        note_says("Figures updated"),
    )
    .await?;
    browser.close().await
}
