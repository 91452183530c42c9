//! `pageviews-app admin` against the real stack: the status, dead letters the worker really
//! made (a malformed task, ids naming no page view), listed without being consumed, and
//! requeued after a fix, repeatedly, without a page view counted twice.

use crate::support::{TestEnv, client};
use diesel_async::RunQueryDsl;
use pageviews::queue::{DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, EXCHANGE, QUEUE, ROUTING_KEY};
use pageviews_testbed::process::wait_until;
use std::time::Duration;

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn admin(env: &TestEnv, amqp: &str, args: &[&str]) -> anyhow::Result<Output> {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_pageviews-app"));
    command
        .arg("admin")
        .args(args)
        .env("DATABASE_URL", &env.urls.database)
        .env("AMQP_URL", amqp)
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(90), command.output()).await??;
    let output = Output {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    let password = env.services().rabbitmq.password();
    assert!(
        !output.stdout.contains(password) && !output.stderr.contains(password),
        "the broker's password in the output"
    );
    Ok(output)
}

async fn ok(env: &TestEnv, args: &[&str]) -> anyhow::Result<String> {
    let output = admin(env, &env.urls.amqp, args).await?;
    anyhow::ensure!(
        output.code == 0,
        "admin {args:?}: exit {}\n{}\n{}",
        output.code,
        output.stdout,
        output.stderr
    );
    Ok(output.stdout)
}

async fn publish(url: &str, messages: Vec<(&'static str, &'static [u8])>) -> anyhow::Result<()> {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let (connection, channel) = pageviews::queue::open(&url, pageviews::config::DEFAULT_QUEUE_TYPE)?;
        for (exchange, body) in messages {
            channel.basic_publish(exchange, amiquip::Publish::new(body, ROUTING_KEY))?;
        }
        connection.close()?;
        Ok(())
    })
    .await?
}

async fn wait_for_depth(env: &TestEnv, queue: &str, depth: u64) -> anyhow::Result<()> {
    wait_until(&format!("{depth} in {queue}"), Duration::from_secs(30), || async {
        let now = env.queue_depth(queue)?;
        anyhow::ensure!(now == depth, "{now}; worker log:\n{}", env.log_text("worker"));
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_shows_the_backlog_lists_dead_letters_and_requeues_them_idempotently() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.migrate()?;
    let app = env.app(&[]).await?;
    let _worker = env.worker("worker", &[]).await?;
    for _ in 0..3 {
        assert_eq!(client().get(app.url("/")).send().await?.status(), 200);
    }
    env.all_processed(Duration::from_secs(20)).await?;

    // Dead letters as the worker makes them: a malformed task and a task of one unknown id
    // rejected (x-death), an unknown id of a larger task republished on its own; and a leftover
    // naming a page view processed since.
    publish(
        &env.urls.amqp,
        vec![
            (EXCHANGE, b"not json"),
            (EXCHANGE, br#"{"v": 2, "page_view_ids": [900001]}"#),
            (EXCHANGE, br#"{"v": 2, "page_view_ids": [1, 900002]}"#),
            (DEAD_LETTER_EXCHANGE, br#"{"v": 2, "page_view_ids": [1]}"#),
        ],
    )
    .await?;
    wait_for_depth(&env, DEAD_LETTER_QUEUE, 4).await?;

    let status = ok(&env, &["status"]).await?;
    for line in [
        "database: ok",
        "page views: 3 recorded, 3 processed, 0 unprocessed",
        "broker: ok",
        "pageviews.tasks: 0 ready, 1 consumers",
        "pageviews.dead: 4 dead letters",
    ] {
        assert!(status.contains(line), "{line:?} in\n{status}");
    }

    // Listed with the reason of each, and left in the queue, in the same order.
    let listed = ok(&env, &["dead-letters"]).await?;
    for line in [
        "4 dead letters in pageviews.dead; 4 listed",
        "\"not json\"",
        "malformed, rejected again if requeued: not a task",
        "dead-lettered: rejected in pageviews.tasks (1 times)",
        "names no page view: 900001",
        "names no page view: 900002",
        "no x-death header",
        "every page view it names is processed: requeuing it changes nothing",
    ] {
        assert!(listed.contains(line), "{line:?} in\n{listed}");
    }
    assert_eq!(env.queue_depth(DEAD_LETTER_QUEUE)?, 4);
    assert_eq!(ok(&env, &["dead-letters"]).await?, listed, "a listing changes nothing");
    let first_two = ok(&env, &["dead-letters", "--limit", "2"]).await?;
    assert!(
        first_two.contains("4 dead letters in pageviews.dead; 2 listed"),
        "{first_two}"
    );
    // Moved to the end: one more listing of two puts the queue back in its order.
    ok(&env, &["dead-letters", "--limit", "2"]).await?;
    assert_eq!(ok(&env, &["dead-letters"]).await?, listed);

    // The fix: the missing page views are restored.
    let mut conn = env.db().await?;
    diesel::sql_query("INSERT INTO page_views (id, data) VALUES (900001, '{}'), (900002, '{}')")
        .execute(&mut conn)
        .await?;
    let requeued = ok(&env, &["requeue", "--id", "900001"]).await?;
    assert!(requeued.contains("1 of 4 dead letters requeued"), "{requeued}");
    let again = ok(&env, &["requeue", "--id", "900001"]).await?;
    assert!(again.contains("0 of 3 dead letters requeued"), "{again}");
    wait_until("900001 processed", Duration::from_secs(20), || async {
        let processed = pageviews::db::page_views::is_processed(&mut env.db().await?, 900001).await?;
        anyhow::ensure!(processed == Some(true), "{processed:?}");
        Ok(())
    })
    .await?;

    // Everything else: the malformed one comes back, the duplicate changes nothing.
    for _ in 0..2 {
        let all = ok(&env, &["requeue", "--all"]).await?;
        assert!(all.contains("dead letters requeued to pageviews.tasks"), "{all}");
        wait_for_depth(&env, DEAD_LETTER_QUEUE, 1).await?;
        wait_for_depth(&env, QUEUE, 0).await?;
        assert_eq!(env.all_processed(Duration::from_secs(20)).await?, 5);
        assert_eq!(env.counts().await?, (5, 5), "a page view counted twice");
    }
    let last = ok(&env, &["dead-letters"]).await?;
    assert!(
        last.contains("1 dead letters in pageviews.dead") && last.contains("\"not json\""),
        "{last}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_says_what_does_not_answer_and_refuses_bad_arguments() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.migrate()?;
    // Nothing listens on port 1.
    let down = admin(&env, "amqp://u:secret@127.0.0.1:1/%2f", &["status"]).await?;
    assert_eq!(down.code, 1, "{}{}", down.stdout, down.stderr);
    assert!(down.stdout.contains("database: ok"), "{}", down.stdout);
    assert!(
        down.stdout
            .contains("broker: unavailable (127.0.0.1:1/%2f did not answer"),
        "{}",
        down.stdout
    );
    assert!(down.stderr.contains("the broker did not answer"), "{}", down.stderr);
    assert!(!down.stdout.contains("secret"));

    let usage = admin(&env, &env.urls.amqp, &["requeue"]).await?;
    assert_eq!(usage.code, 2);
    assert!(
        usage
            .stderr
            .contains("pageviews-app admin: requeue needs --all or --id PAGE_VIEW_ID; usage:"),
        "{}",
        usage.stderr
    );
    Ok(())
}
