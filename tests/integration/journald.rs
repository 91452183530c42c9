//! `PAGEVIEWS_LOG_FORMAT=journald` against a real systemd-journald: one started for the test in
//! a mount namespace of its own (a tmpfs over /run and /var/log/journal), so the machine's
//! journal, if any, is never touched. journalctl, in the same namespace, finds one request's
//! lines by their `F_REQUEST_ID` field. Needs root (the namespace) and Debian's `systemd`.

use crate::support::{TestEnv, binaries, client};
use pageviews_testbed::process::{Process, find_program, free_port, is_root, wait_until};
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

const JOURNALD_DIRS: &[&str] = &["/lib/systemd", "/usr/lib/systemd"];

/// In a private mount namespace: an empty /run (and journal directory), then `$@`.
const EMPTY_RUN: &str = r#"set -e
mount -t tmpfs -o mode=0755 tmpfs /run
if [ -d /var/log/journal ]; then mount -t tmpfs tmpfs /var/log/journal; fi
"#;

/// Then a journald, waited for (its socket exists once it listens), then the app.
const WITH_JOURNALD: &str = r#"
"$JOURNALD" &
tries=0
until [ -S /run/systemd/journal/socket ]; do
    tries=$((tries + 1))
    if [ "$tries" -gt 300 ]; then echo "systemd-journald did not listen within 30 s" >&2; exit 1; fi
    sleep 0.1
done
"#;

fn in_namespace(script: &str) -> anyhow::Result<Command> {
    anyhow::ensure!(is_root(), "a mount namespace needs root");
    let unshare = find_program("unshare", &[], "util-linux")?;
    let mut command = Command::new(unshare);
    command
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!("{script}exec \"$0\""))
        .arg(binaries().app.0);
    Ok(command)
}

/// `journalctl` in the namespace of `pid`, as JSON entries.
fn journal(pid: u32, matches: &[&str]) -> anyhow::Result<Vec<Value>> {
    let output = Command::new(find_program("nsenter", &[], "util-linux")?)
        .args(["-t", &pid.to_string(), "-m", "journalctl", "--no-pager", "-o", "json"])
        .args(matches)
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "journalctl: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?)
}

#[tokio::test(flavor = "multi_thread")]
async fn journalctl_finds_one_requests_lines_by_its_request_id() -> anyhow::Result<()> {
    let journald = find_program("systemd-journald", JOURNALD_DIRS, "systemd")?;
    let env = TestEnv::new().await?;
    env.migrate()?;
    let port = free_port()?;
    let mut command = in_namespace(&format!("{EMPTY_RUN}{WITH_JOURNALD}"))?;
    command
        .env("JOURNALD", &journald)
        .env("DATABASE_URL", &env.urls.database)
        .env("AMQP_URL", &env.urls.amqp)
        .env("PAGEVIEWS_LISTEN", format!("127.0.0.1:{port}"))
        .env("PAGEVIEWS_LOG_FORMAT", "journald");
    let log = env.log("app-journald");
    let app = Process::spawn("pageviews-app in a namespace", &mut command, &log)?;
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    wait_until("the app", Duration::from_secs(30), || async {
        Ok(client().get(url("/healthz")).send().await?.error_for_status()?)
    })
    .await
    .map_err(|e| e.context(env.log_text("app-journald")))?;

    let ids = [
        format!("journald-{}-a", std::process::id()),
        format!("journald-{}-b", std::process::id()),
    ];
    for id in &ids {
        let answer = client().get(url("/")).header("x-request-id", id).send().await?;
        assert_eq!(answer.status(), 200);
    }
    for id in &ids {
        let entries = wait_until(
            "the request's lines in the journal",
            Duration::from_secs(20),
            || async {
                let entries = journal(app.pid(), &[&format!("F_REQUEST_ID={id}")])?;
                anyhow::ensure!(!entries.is_empty(), "none yet");
                Ok(entries)
            },
        )
        .await?;
        for entry in &entries {
            assert_eq!(entry["F_REQUEST_ID"], id.as_str(), "{entry}");
            assert_eq!(entry["SYSLOG_IDENTIFIER"], "pageviews-app", "{entry}");
            assert_eq!(entry["F_PATH"], "/", "{entry}");
            assert!(entry["MESSAGE"].as_str().is_some_and(|m| !m.is_empty()), "{entry}");
            assert!(entry["PRIORITY"].is_string(), "{entry}");
        }
        // The INFO line of the answer, with its status as a field of its own.
        assert!(entries.iter().any(|e| e["F_STATUS"] == "200"), "{entries:#?}");
    }
    // Nothing went to stderr instead.
    assert!(!env.log_text("app-journald").contains("app listening"));
    let started = journal(app.pid(), &["SYSLOG_IDENTIFIER=pageviews-app"])?;
    assert!(started.iter().any(|e| e["MESSAGE"] == "app listening"), "{started:#?}");
    Ok(())
}

#[test]
fn journald_asked_for_and_absent_stops_the_app_naming_the_setting() -> anyhow::Result<()> {
    let (code, stderr) = crate::config_errors::run(
        in_namespace(EMPTY_RUN)?,
        &[
            ("DATABASE_URL", "postgres://u@127.0.0.1:1/db"),
            ("AMQP_URL", "amqp://u:p@127.0.0.1:1/%2f"),
            ("PAGEVIEWS_LOG_FORMAT", "journald"),
        ],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(
            "pageviews-app: configuration error: PAGEVIEWS_LOG_FORMAT: \"journald\", but journald's socket /run/systemd/journal/socket does not answer"
        ),
        "{stderr}"
    );
    Ok(())
}
