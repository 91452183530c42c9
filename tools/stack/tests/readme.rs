//! The `pageviews-stack` commands README.md gives, run as written (the built binary stands for
//! `cargo run --release -p pageviews-stack`, with the same environment): each prints its
//! URL, serves the page there, and on SIGTERM stops everything and removes its files.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};

/// What the stack printed once it was up.
#[derive(Debug)]
struct Up {
    url: String,
    ca: PathBuf,
    dir: PathBuf,
}

/// Reads the "pageviews is up" block from the stack's stdout.
fn parse_up(lines: &[String]) -> Option<Up> {
    let after = |prefix: &str| {
        lines
            .iter()
            .find_map(|l| l.trim().strip_prefix(prefix).map(str::to_owned))
    };
    let url = after("pageviews is up: ")?;
    let redirect = after("(HTTP ")?;
    let (_, ca) = redirect.rsplit_once("CA at ")?;
    let logs = after("logs: ")?;
    let dir = logs.split("/{app,worker}.log").next()?;
    Some(Up {
        url,
        ca: PathBuf::from(ca.trim_end_matches(')')),
        dir: PathBuf::from(dir),
    })
}

/// Whether `port` on loopback is free for the stack's default ports.
fn free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A stack started as README says, up: its URL printed.
struct Launched {
    env: Vec<(String, String)>,
    stack: tokio::process::Child,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    stderr: tokio::task::JoinHandle<String>,
    /// What it printed so far.
    printed: Vec<String>,
    up: Up,
    started: Instant,
    /// One at a time: each wants README's ports.
    _alone: tokio::sync::MutexGuard<'static, ()>,
}

impl Launched {
    /// Runs the binary with `env`, as a user would, until it prints that it is up.
    async fn start(env: &[(&str, &str)]) -> anyhow::Result<Launched> {
        static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let alone = ONE_AT_A_TIME.lock().await;
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_pageviews-stack"));
        command
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // README's ports, unless something on this machine holds them: then the variables
        // README names for that.
        for (port, variable) in [(8443, "PAGEVIEWS_HTTPS_PORT"), (8080, "PAGEVIEWS_HTTP_PORT")] {
            if !free(port) {
                let other = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
                eprintln!("port {port} is in use here: {variable}={other}");
                command.env(variable, other.to_string());
            }
        }
        let started = Instant::now();
        let mut stack = command.kill_on_drop(true).spawn()?;
        let mut stdout = BufReader::new(stack.stdout.take().expect("piped")).lines();
        let stderr = stack.stderr.take().expect("piped");
        let stderr = tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            let mut all = String::new();
            while let Ok(Some(line)) = lines.next_line().await {
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let mut printed = Vec::new();
        // Three-node clusters (brokers, or PostgreSQL under Patroni) boot in well under a
        // minute, even on a busy machine; four minutes leave room for a machine shared with
        // heavy tests.
        let up = tokio::time::timeout(Duration::from_secs(240), async {
            while let Some(line) = stdout.next_line().await? {
                printed.push(line);
                if let Some(up) = parse_up(&printed) {
                    return anyhow::Ok(Some(up));
                }
            }
            Ok(None)
        })
        .await;
        let up = match up {
            Ok(Ok(Some(up))) => up,
            other => {
                let _ = stack.start_kill();
                let status = stack.wait().await?;
                anyhow::bail!(
                    "no URL printed ({other:?}); exited {status} after {:?}\nstdout:\n{}\nstderr:\n{}",
                    started.elapsed(),
                    printed.join("\n"),
                    stderr.await?
                );
            }
        };
        eprintln!("{env:?}: up after {:?} at {}", started.elapsed(), up.url);
        Ok(Launched {
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            stack,
            stdout,
            stderr,
            printed,
            up,
            started,
            _alone: alone,
        })
    }

    /// The printed URL serves the page.
    async fn serves_the_page(&self) -> anyhow::Result<()> {
        let ca = reqwest::Certificate::from_pem(&std::fs::read(&self.up.ca)?)?;
        let client = reqwest::Client::builder()
            .add_root_certificate(ca)
            .timeout(Duration::from_secs(10))
            .build()?;
        let page = client.get(&self.up.url).send().await?;
        assert_eq!(page.status(), 200);
        let body = page.text().await?;
        assert!(body.contains(r#"<dd id="recorded">"#), "not the page: {body}");
        Ok(())
    }

    /// Reads what the stack prints after the URL, up to and including the first line that
    /// starts (indentation aside) with `prefix`; returns everything printed so far.
    async fn printed_through(&mut self, prefix: &str) -> anyhow::Result<&[String]> {
        let seen = |printed: &[String]| printed.iter().any(|l| l.trim_start().starts_with(prefix));
        while !seen(&self.printed) {
            let line = tokio::time::timeout(Duration::from_secs(30), self.stdout.next_line()).await??;
            let Some(line) = line else {
                anyhow::bail!("stdout ended before a line {prefix:?}:\n{}", self.printed.join("\n"));
            };
            self.printed.push(line);
        }
        Ok(&self.printed)
    }

    /// SIGTERM stops everything: a clean exit, its files removed.
    async fn stops_cleanly(mut self) -> anyhow::Result<()> {
        let pid = self.stack.id().expect("running") as i32;
        // SAFETY: kill(2) on the child this test started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let status = tokio::time::timeout(Duration::from_secs(120), self.stack.wait()).await??;
        let stderr = self.stderr.await?;
        assert!(status.success(), "exited {status}:\n{stderr}");
        assert!(!self.up.dir.exists(), "{} is still there", self.up.dir.display());
        eprintln!("{:?}: {:?} in all", self.env, self.started.elapsed());
        Ok(())
    }
}

/// Runs the binary with `env`, as a user would, and checks what README promises.
async fn as_in_readme(env: &[(&str, &str)]) -> anyhow::Result<()> {
    let stack = Launched::start(env).await?;
    stack.serves_the_page().await?;
    stack.stops_cleanly().await
}

const README: &str = include_str!("../../../README.md");
const RUN: &str = "cargo run --release -p pageviews-stack";

/// The command README gives, with `env` before it: the one these tests run.
fn in_readme(env: &[(&str, &str)]) -> String {
    let command: String = env.iter().map(|(k, v)| format!("{k}={v} ")).collect::<String>() + RUN;
    assert!(
        README.contains(&format!("`{command}`")),
        "README.md no longer gives `{command}`"
    );
    command
}

/// README, "Scaling out".
#[tokio::test(flavor = "multi_thread")]
async fn the_stack_on_a_three_node_cluster_starts_serves_and_stops() -> anyhow::Result<()> {
    let env = [("PAGEVIEWS_STACK_BROKERS", "3")];
    in_readme(&env);
    as_in_readme(&env).await
}

/// README, "Scaling out": the database as three PostgreSQL nodes under Patroni. The nodes
/// are printed after the URL; the REST API printed for the node printed as the leader answers
/// 200 on `/primary`, the others' do not.
#[tokio::test(flavor = "multi_thread")]
async fn the_stack_on_a_patroni_cluster_starts_serves_and_stops() -> anyhow::Result<()> {
    let env = [("PAGEVIEWS_STACK_PATRONI", "1")];
    in_readme(&env);
    let mut stack = Launched::start(&env).await?;
    stack.serves_the_page().await?;
    let printed = stack.printed_through("etcd: ").await?;
    let leader = printed
        .iter()
        .find_map(|l| l.trim().strip_prefix("leader now: "))
        .expect("the leader printed")
        .to_owned();
    let nodes: Vec<(String, String)> = printed
        .iter()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            let rest = fields.iter().find(|f| f.starts_with("http://"))?;
            (fields.first()?.starts_with("node")).then(|| (fields[0].to_owned(), rest.to_string()))
        })
        .collect();
    assert_eq!(nodes.len(), 3, "three nodes printed:\n{}", printed.join("\n"));
    assert!(
        nodes.iter().any(|(name, _)| *name == leader),
        "leader {leader} is no node printed"
    );
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    for (name, rest) in &nodes {
        let status = client.get(format!("{rest}primary")).send().await?.status();
        assert_eq!(
            status.as_u16() == 200,
            *name == leader,
            "{name} (leader printed: {leader}): GET {rest}primary answered {status}"
        );
    }
    stack.stops_cleanly().await
}

/// README, "Quick start".
#[tokio::test(flavor = "multi_thread")]
async fn the_stack_on_one_broker_starts_serves_and_stops() -> anyhow::Result<()> {
    in_readme(&[]);
    as_in_readme(&[]).await
}

/// The package that has `pageviews-stack` is the one README names (cargo runs a binary of a
/// member other than the default one only with `-p`).
#[test]
fn readme_names_the_package_of_the_stack() {
    assert_eq!(env!("CARGO_PKG_NAME"), "pageviews-stack");
    in_readme(&[]);
}

/// README, "Backups and restore": `PAGEVIEWS_STACK_BACKUP=1 cargo run --release -p
/// pageviews-stack` (PostgreSQL restarted with WAL archiving, a full backup, before the URL).
#[tokio::test(flavor = "multi_thread")]
async fn the_stack_with_a_backup_repository_starts_serves_and_stops() -> anyhow::Result<()> {
    let env = [("PAGEVIEWS_STACK_BACKUP", "1")];
    in_readme(&env);
    as_in_readme(&env).await
}
