//! Deploys drop no request: under a steady load through nginx over TLS, the app is restarted
//! three times on the socket the launcher holds (what `systemctl restart pageviews-app` does
//! with `pageviews-app.socket`), nginx is reloaded (SIGHUP) and the worker restarted; every
//! request is answered 200 and is exactly one stored, processed page view.

use crate::support::{TestEnv, binaries};
use pageviews_testbed::Deployment;
use pageviews_testbed::nginx::NginxOptions;
use pageviews_testbed::process::{free_port, tail};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Requests per second the load sends, in turn over each client of `clients`.
const RATE: u32 = 250;
/// Requests in flight at most per client: one over HTTP/1.1 (a connection per request in
/// flight), three over HTTP/2 (one connection each); beyond that the load waits. HTTP/2 stays
/// below nginx's 128 concurrent streams, so no request waits inside the client for a stream
/// when nginx closes the connection, and with their upstream connections they stay below
/// nginx's 512 connections per worker. Requests wait while the app restarts: this lets the
/// load go on at `RATE` through a restart of about 1.5 s.
const MAX_IN_FLIGHT: [usize; 4] = [150, 80, 80, 80];
/// Load before, between and after the events.
const PAUSE: Duration = Duration::from_millis(1500);
const MIN_LOAD: Duration = Duration::from_secs(10);

/// When a request was sent and finished (since the load started), and its status or error;
/// `retried` when the HTTP/1.1 client resent it (see `send`).
struct Outcome {
    sent: Duration,
    done: Duration,
    result: Result<u16, String>,
    retried: bool,
}

/// Sends `RATE` requests a second until stopped, each on its own task.
struct Load {
    stop: tokio::sync::watch::Sender<bool>,
    pacer: tokio::task::JoinHandle<()>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    started: Instant,
}

impl Load {
    fn start(clients: [Client; 4], url: String) -> Load {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let started = Instant::now();
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let pacer = tokio::spawn({
            let outcomes = outcomes.clone();
            async move {
                let permits = MAX_IN_FLIGHT.map(|n| Arc::new(tokio::sync::Semaphore::new(n)));
                let mut ticks = tokio::time::interval(Duration::from_secs(1) / RATE);
                let mut tasks = tokio::task::JoinSet::new();
                for n in 0usize.. {
                    tokio::select! {
                        _ = ticks.tick() => {}
                        _ = stopped.wait_for(|s| *s) => break,
                    }
                    let permit = permits[n % 4].clone().acquire_owned().await.expect("never closed");
                    let (client, url, outcomes) = (clients[n % 4].clone(), url.clone(), outcomes.clone());
                    tasks.spawn(async move {
                        let sent = started.elapsed();
                        let (result, retried) = send(&client, &url).await;
                        let done = started.elapsed();
                        outcomes.lock().unwrap().push(Outcome {
                            sent,
                            done,
                            result,
                            retried,
                        });
                        drop(permit);
                    });
                }
                while tasks.join_next().await.is_some() {}
            }
        });
        Load {
            stop,
            pacer,
            outcomes,
            started,
        }
    }

    /// Stops sending, waits for the answers; the outcomes and how long the load ran.
    async fn finish(self) -> (Vec<Outcome>, Duration) {
        let _ = self.stop.send(true);
        let elapsed = self.started.elapsed();
        self.pacer.await.expect("the load task does not panic");
        let outcomes = std::mem::take(&mut *self.outcomes.lock().unwrap());
        (outcomes, elapsed)
    }
}

/// A load client: `pooled` keeps its connections; `fresh` opens a new one for every request
/// (a resend on `pooled` could take another idle connection the same nginx worker is closing).
#[derive(Clone)]
struct Client {
    pooled: reqwest::Client,
    fresh: reqwest::Client,
}

/// One GET. An HTTP/1.1 connection that nginx closes while idle can cross a request sent on
/// it (HTTP/1.1 has no way to announce the close; HTTP/2 has GOAWAY): then, and only then,
/// the request is sent again on a new connection, as RFC 9112 section 9.3.1 allows for
/// idempotent requests and as browsers do. nginx closes idle client connections when its old
/// workers exit after a reload; the test checks that retries happen only then.
async fn send(client: &Client, url: &str) -> (Result<u16, String>, bool) {
    let status = |r: reqwest::Response| r.status().as_u16();
    match client.pooled.get(url).send().await {
        Ok(response) => (Ok(status(response)), false),
        Err(e) if closed_before_answer(&e) => (
            client
                .fresh
                .get(url)
                .send()
                .await
                .map(status)
                .map_err(|e| format!("{e:?}")),
            true,
        ),
        Err(e) => (Err(format!("{e:?}")), false),
    }
}

/// hyper's IncompleteMessage: the connection closed before any response came.
fn closed_before_answer(error: &reqwest::Error) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(error);
    while let Some(e) = source {
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_incomplete_message())
        {
            return true;
        }
        source = e.source();
    }
    false
}

fn https_client(d: &Deployment, http1: bool) -> anyhow::Result<Client> {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&d.certificates.ca)?)?;
    let build = |idle_per_host: usize| {
        let builder = reqwest::Client::builder()
            .add_root_certificate(ca.clone())
            .timeout(Duration::from_secs(20))
            .pool_max_idle_per_host(idle_per_host);
        match http1 {
            true => builder.http1_only(),
            false => builder.http2_prior_knowledge(),
        }
        .build()
    };
    Ok(Client {
        pooled: build(usize::MAX)?,
        fresh: build(0)?,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn restarts_and_reloads_under_load_drop_no_request() -> anyhow::Result<()> {
    let _alone = crate::support::load_alone().await;
    let env = TestEnv::new().await?;
    let mut options = NginxOptions::new(free_port()?, free_port()?);
    // One client sends it all: the per-client limits would answer 429.
    (options.rate, options.burst, options.conn_limit) = (100_000, 100_000, 10_000);
    let mut d = Deployment::start(env.dir.path(), &binaries(), &env.urls, options, &[], &[]).await?;
    let clients = [
        https_client(&d, true)?,
        https_client(&d, false)?,
        https_client(&d, false)?,
        https_client(&d, false)?,
    ];
    let load = Load::start(clients, d.https_url("/"));

    // (what, started, finished), since the load started
    let mut events: Vec<(&str, Duration, Duration)> = Vec::new();
    let at = |load: &Load| load.started.elapsed();
    tokio::time::sleep(PAUSE).await;
    for _ in 0..3 {
        let (old, from) = (d.app.pid(), at(&load));
        let status = d.restart_app().await?;
        assert!(status.success(), "the old app exited with {status}");
        assert_ne!(d.app.pid(), old);
        events.push(("app restart", from, at(&load)));
        tokio::time::sleep(PAUSE).await;
    }
    let from = at(&load);
    d.nginx.reload().await?;
    events.push(("nginx reload", from, at(&load)));
    tokio::time::sleep(PAUSE).await;
    let (old, from) = (d.worker.pid(), at(&load));
    let status = d.restart_worker().await?;
    assert!(status.success(), "the old worker exited with {status}");
    assert_ne!(d.worker.pid(), old);
    events.push(("worker restart", from, at(&load)));
    tokio::time::sleep(PAUSE.max(MIN_LOAD.saturating_sub(at(&load)))).await;

    let (outcomes, elapsed) = load.finish().await;
    let ok = outcomes.iter().filter(|o| o.result == Ok(200)).count();
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|o| o.result != Ok(200))
        .map(|o| format!("{:?} sent at {:.2?}, done at {:.2?}", o.result, o.sent, o.done))
        .collect();
    let retried: Vec<&Outcome> = outcomes.iter().filter(|o| o.retried).collect();
    // The load offered (requests sent per second while it ran) and the answers per second.
    let last_sent = outcomes.iter().map(|o| o.sent).max().unwrap_or_default();
    let rate = outcomes.len() as f64 / last_sent.as_secs_f64();
    let answered = ok as f64 / elapsed.as_secs_f64();
    let timeline: Vec<String> = events
        .iter()
        .map(|(what, from, to)| format!("{what} {from:.1?}..{to:.1?}"))
        .collect();
    eprintln!(
        "deploys under load: {} requests sent over {last_sent:.1?} ({rate:.0} req/s), {ok} answered 200 ({answered:.0}/s over {elapsed:.1?}), {} failed, {} resent after nginx closed an idle HTTP/1.1 connection; {}",
        outcomes.len(),
        failed.len(),
        retried.len(),
        timeline.join(", ")
    );
    assert!(
        failed.is_empty(),
        "{failed:#?}\nnginx error log:\n{}\napp log, the lines other than requests:\n{}",
        tail(&d.nginx.dir.join("error.log"), 20),
        std::fs::read_to_string(env.dir.path().join("app.log"))?
            .lines()
            .filter(|l| !l.contains("finished processing request"))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    // Resent requests crossed the reload's closing of idle connections, nothing else.
    let (_, reload_from, reload_to) = events[3];
    for o in retried {
        assert!(
            o.sent <= reload_to && o.done >= reload_from,
            "a request sent at {:.2?} was resent outside the nginx reload ({reload_from:.2?}..{reload_to:.2?})",
            o.sent
        );
    }
    assert!(
        last_sent >= MIN_LOAD && rate >= 200.0,
        "only {rate:.0} requests/s sent over {last_sent:?}"
    );
    let rows = env.all_processed(Duration::from_secs(30)).await?;
    assert_eq!(
        rows as usize, ok,
        "every 200 is exactly one stored, processed page view"
    );
    // Every app process served the socket the launcher bound, not one of its own.
    let log = std::fs::read_to_string(env.dir.path().join("app.log"))?;
    let listening = format!("listen=127.0.0.1:{}", d.app_port);
    assert_eq!(log.matches(&listening).count(), 4, "{log}");
    Ok(())
}
