//! Backups with pgBackRest on the real engines: WAL archiving, full and differential backups,
//! a restore to a point in time and one to the end of the archive after the data directory is
//! gone, and retention. README's runbook ("Backups and restore") has the same command lines
//! (checked below), so the drill is the runbook.

use crate::support::{TestEnv, binaries};
use diesel_async::RunQueryDsl;
use pageviews_testbed::nginx::NginxOptions;
use pageviews_testbed::pgbackrest::{BackupType, Settings, Step, command_line, wait_for_promotion};
use pageviews_testbed::process::{free_port, wait_until};
use pageviews_testbed::{BackupRepository, Deployment, Postgres, ScratchDir};
use std::time::{Duration, Instant};

/// The runbook's check after a restore: the rows, the processed ones, what the counters say
/// (the same figures when the restore is consistent) and the newest row.
const VERIFY: &str = "SELECT count(*) AS rows, count(processed_at) AS processed, \
    (SELECT sum(recorded)::bigint FROM page_view_counts) AS counted, \
    (SELECT sum(processed)::bigint FROM page_view_counts) AS counted_processed, \
    max(created_at)::text AS newest FROM page_views";

#[derive(Debug, PartialEq, diesel::QueryableByName)]
struct Verified {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    rows: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    processed: i64,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::BigInt>)]
    counted: Option<i64>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::BigInt>)]
    counted_processed: Option<i64>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    newest: Option<String>,
}

async fn verify(env: &TestEnv) -> anyhow::Result<Verified> {
    Ok(diesel::sql_query(VERIFY).get_result(&mut env.db().await?).await?)
}

async fn ids(env: &TestEnv) -> anyhow::Result<Vec<i64>> {
    #[derive(diesel::QueryableByName)]
    struct Id {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        id: i64,
    }
    let rows: Vec<Id> = diesel::sql_query("SELECT id FROM page_views ORDER BY id")
        .load(&mut env.db().await?)
        .await?;
    Ok(rows.into_iter().map(|r| r.id).collect())
}

/// The server's clock now, as `--target` takes it (with its time zone).
async fn server_time(env: &TestEnv) -> anyhow::Result<String> {
    #[derive(diesel::QueryableByName)]
    struct Now {
        #[diesel(sql_type = diesel::sql_types::Text)]
        now: String,
    }
    let row: Now = diesel::sql_query("SELECT clock_timestamp()::text AS now")
        .get_result(&mut env.db().await?)
        .await?;
    Ok(row.now)
}

/// Whole seconds, rounded down (a cast would round 51.5 up to 52, a second early).
async fn server_epoch(env: &TestEnv) -> anyhow::Result<i64> {
    crate::support::count_on(
        &mut env.db().await?,
        "SELECT floor(extract(epoch FROM clock_timestamp()))::bigint AS n",
    )
    .await
}

/// The sweep every second, so restored rows whose tasks were consumed are offered soon.
fn app_env() -> Vec<(&'static str, String)> {
    vec![("PAGEVIEWS_SWEEP_INTERVAL_SECS", "1".to_owned())]
}

/// `n` page views through nginx over TLS, 4 at a time; each must be answered 200.
async fn visit(d: &Deployment, n: usize) -> anyhow::Result<()> {
    use futures_util::StreamExt;
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&d.certificates.ca)?)?;
    let client = reqwest::Client::builder()
        .add_root_certificate(ca)
        .timeout(Duration::from_secs(10))
        .build()?;
    let url = d.https_url("/");
    let statuses: Vec<_> = futures_util::stream::iter(0..n)
        .map(|_| {
            let request = client.get(&url).send();
            async move { request.await.map(|r| r.status().as_u16()).map_err(|e| e.to_string()) }
        })
        .buffer_unordered(4)
        .collect()
        .await;
    anyhow::ensure!(statuses.iter().all(|s| s == &Ok(200)), "{statuses:?}");
    Ok(())
}

/// The host lost: app and worker stopped (as the runbook stops their units), PostgreSQL
/// stopped and its data directory gone.
async fn lose_the_database(env: &mut TestEnv, d: &mut Deployment) -> anyhow::Result<()> {
    d.app.stop_async(libc::SIGTERM, Duration::from_secs(30)).await;
    d.worker.stop_async(libc::SIGTERM, Duration::from_secs(30)).await;
    let pg = &mut env.services_mut().postgres;
    pg.stop();
    std::fs::remove_dir_all(pg.data_dir())?;
    Ok(())
}

/// The runbook's `restore`, then PostgreSQL started and promoted; how long that took.
async fn restore(env: &mut TestEnv, repo: &BackupRepository, step: Step) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let info = repo.run(&Step::Info).await?;
    anyhow::ensure!(info.contains("status: ok") && info.contains("full backup: "), "{info}");
    repo.run(&step).await?;
    let pg = &mut env.services_mut().postgres;
    pg.start_again().await?;
    wait_for_promotion(pg, Duration::from_secs(120)).await?;
    Ok(started.elapsed())
}

/// The runbook's last step: the units started again on the restored database.
async fn start_service(env: &TestEnv, d: &mut Deployment) -> anyhow::Result<()> {
    d.app = pageviews_testbed::start_app(&binaries(), &env.urls, &d.app_socket, &app_env(), &env.log("app")).await?;
    d.worker = pageviews_testbed::start_worker(&binaries(), &env.urls, &[], &env.log("worker")).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restore_to_a_point_in_time_brings_back_what_was_committed_before_it_and_no_more() -> anyhow::Result<()> {
    let mut env = TestEnv::dedicated_with(true).await?;
    let repo = BackupRepository::new(&env.dir.path().join("pgbackrest"), Settings::default())?;
    env.services_mut()
        .postgres
        .set_archiving(Some(repo.archiving()))
        .await?;
    repo.attach(&env.services().postgres).await?;
    let mut options = NginxOptions::new(free_port()?, free_port()?);
    // One client sends all the page views; the per-client limit is not what is tested here.
    (options.rate, options.burst) = (1000, 1000);
    let mut d = Deployment::start(env.dir.path(), &binaries(), &env.urls, options, &app_env(), &[]).await?;

    // Processed page views, then the full backup.
    visit(&d, 30).await?;
    env.all_processed(Duration::from_secs(30)).await?;
    repo.backup(BackupType::Full).await?;
    // Page views the worker has not processed yet at T (it is stopped).
    d.worker.stop_async(libc::SIGTERM, Duration::from_secs(30)).await;
    visit(&d, 40).await?;
    let before_t = ids(&env).await?;
    // pgBackRest keeps a backup's end to the second and picks one that ended before the
    // target's second.
    let backup_end = repo.info().await?.backup[0].timestamp.stop;
    wait_until("a second after the backup's end", Duration::from_secs(5), || async {
        let now = server_epoch(&env).await?;
        anyhow::ensure!(now > backup_end, "{now}");
        Ok(())
    })
    .await?;
    let target = server_time(&env).await?;
    // After T: the worker processes those (its marks are lost by the restore, and so are the
    // tasks it consumed), and more page views come.
    d.worker = pageviews_testbed::start_worker(&binaries(), &env.urls, &[], &env.log("worker")).await?;
    visit(&d, 25).await?;
    let total = env.all_processed(Duration::from_secs(30)).await?;
    assert_eq!(total, before_t.len() as i64 + 25);
    // Everything up to here is archived (the WAL switched and the segment in the repository).
    repo.run(&Step::Check).await?;

    lose_the_database(&mut env, &mut d).await?;
    let took = restore(&mut env, &repo, Step::RestoreToTime(target.clone())).await?;
    assert_eq!(ids(&env).await?, before_t, "exactly the rows committed before {target}");
    let restored = verify(&env).await?;
    assert_eq!(
        (
            restored.rows,
            restored.processed,
            restored.counted,
            restored.counted_processed
        ),
        (70, 30, Some(70), Some(30)),
        "as at T: 40 rows unprocessed, the counters equal to count(*); {restored:?}"
    );
    assert!(
        restored.newest.as_deref() <= Some(target.as_str()),
        "{restored:?} after {target}"
    );
    eprintln!(
        "restore drill: {} rows before T, {} after; restored to T in {took:.1?}: {restored:?}",
        before_t.len(),
        total - before_t.len() as i64
    );

    // The service again: the sweep offers the 40 unprocessed rows (their tasks were consumed
    // before the loss), and new page views are recorded on the new timeline.
    start_service(&env, &mut d).await?;
    assert_eq!(env.all_processed(Duration::from_secs(60)).await?, 70);
    visit(&d, 5).await?;
    assert_eq!(env.all_processed(Duration::from_secs(30)).await?, 75);

    // A differential backup on the full one, more page views, the data directory lost again:
    // a restore to the end of the archive brings back every row.
    repo.backup(BackupType::Diff).await?;
    let info = repo.info().await?;
    let (full, diff) = (&info.backup[0], &info.backup[1]);
    assert_eq!((full.kind.as_str(), diff.kind.as_str()), ("full", "diff"), "{info:?}");
    assert_eq!(diff.reference.as_deref(), Some(&[full.label.clone()][..]), "{info:?}");
    visit(&d, 10).await?;
    assert_eq!(env.all_processed(Duration::from_secs(30)).await?, 85);
    let latest = ids(&env).await?;
    repo.run(&Step::Check).await?;
    lose_the_database(&mut env, &mut d).await?;
    let took = restore(&mut env, &repo, Step::RestoreLatest).await?;
    assert_eq!(ids(&env).await?, latest);
    let restored = verify(&env).await?;
    assert_eq!(
        (
            restored.rows,
            restored.processed,
            restored.counted,
            restored.counted_processed
        ),
        (85, 85, Some(85), Some(85)),
        "{restored:?}"
    );
    eprintln!("restore drill: latest (full + diff + WAL) restored in {took:.1?}: {restored:?}");
    start_service(&env, &mut d).await?;
    visit(&d, 5).await?;
    assert_eq!(env.all_processed(Duration::from_secs(30)).await?, 90);
    Ok(())
}

/// With `repo1-retention-full = 2`, the third full backup expires the first and the
/// differential one that depends on it, and the WAL only they needed; what is kept can still
/// be restored from (its WAL is all there).
#[tokio::test(flavor = "multi_thread")]
async fn expire_keeps_the_newest_full_backups_and_what_depends_on_them() -> anyhow::Result<()> {
    let dir = ScratchDir::new("pageviews-test-retention")?;
    let settings = Settings {
        retention_full: 2,
        ..Settings::default()
    };
    let repo = BackupRepository::new(&dir.path().join("pgbackrest"), settings)?;
    let pg = Postgres::start_with(&dir.path().join("postgres"), false, Some(repo.archiving())).await?;
    repo.attach(&pg).await?;
    // A mistake in the runbook's order (the server still running) is refused, with
    // pgBackRest's own message.
    let refused = repo
        .run(&Step::RestoreLatest)
        .await
        .expect_err("a restore under a running server");
    let message = format!("{refused:#}");
    assert!(
        message.contains("pgbackrest --stanza=pageviews --delta restore failed") && message.contains("ERROR: [038]"),
        "{message}"
    );
    for kind in [
        BackupType::Full,
        BackupType::Diff,
        BackupType::Full,
        BackupType::Diff,
        BackupType::Incr,
    ] {
        repo.backup(kind).await?;
    }
    let before = repo.info().await?;
    assert_eq!(before.backup.len(), 5, "two full backups kept so far: {before:?}");
    repo.backup(BackupType::Full).await?;
    repo.run(&Step::Expire).await?;
    let after = repo.info().await?;
    let kept: Vec<&str> = before.labels()[2..].to_vec();
    let newest = after.backup.last().expect("a backup").label.as_str();
    assert_eq!(after.labels(), [&kept[..], &[newest]].concat(), "{after:?}");
    assert_eq!(after.backup[0].kind, "full");
    assert_eq!(
        after.archive_min(),
        after.backup[0].archive.start.as_deref(),
        "the WAL from the oldest kept backup on, none before: {after:?}"
    );
    assert!(after.archive_min() > before.archive_min(), "{before:?} {after:?}");
    Ok(())
}

/// README's runbook has the command lines the drill runs.
#[test]
fn the_runbook_in_readme_runs_what_the_drill_runs() {
    let readme = include_str!("../../README.md");
    let stanza = Settings::default().stanza;
    for step in [
        Step::Info,
        Step::Check,
        Step::Backup(BackupType::Full),
        Step::Backup(BackupType::Diff),
        Step::Expire,
        Step::RestoreToTime("$TARGET".to_owned()),
        Step::RestoreLatest,
    ] {
        let line = format!("runuser -u postgres -- {}", command_line(&step.args(&stanza)));
        assert!(readme.contains(&line), "README lacks `{line}`");
    }
    let verify = format!(
        "psql -X -d pageviews -c \"{}\"",
        VERIFY.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    assert!(readme.contains(&verify), "README lacks `{verify}`");
}
