//! Through nginx over real TLS, with the snippets NixOS deploys: each hardening item asserted.

use crate::support::{TestEnv, binaries};
use pageviews_probe::{Probe, check_headers};
use pageviews_testbed::Deployment;
use pageviews_testbed::nginx::NginxOptions;
use pageviews_testbed::process::{free_port, wait_until};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

async fn deploy(env: &TestEnv, tweak: impl FnOnce(&mut NginxOptions)) -> anyhow::Result<Deployment> {
    let mut options = NginxOptions::new(free_port()?, free_port()?);
    tweak(&mut options);
    Deployment::start(env.dir.path(), &binaries(), &env.urls, options, &[], &[]).await
}

fn client(d: &Deployment, http1: bool) -> anyhow::Result<reqwest::Client> {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&d.certificates.ca)?)?;
    let builder = reqwest::Client::builder()
        .add_root_certificate(ca)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(15));
    Ok(if http1 { builder.http1_only() } else { builder }.build()?)
}

/// Whether `openssl s_client` completes a handshake with only `flags` allowed.
fn handshake(d: &Deployment, flags: &[&str]) -> bool {
    let output = std::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{}", d.options.https_port),
            "-servername",
            "localhost",
        ])
        .args(flags)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl runs");
    output.status.success() && String::from_utf8_lossy(&output.stdout).contains("Cipher is ")
}

async fn app_requests(d: &Deployment) -> anyhow::Result<u64> {
    let metrics = reqwest::get(d.app_url("/metrics")).await?.text().await?;
    Ok(metrics
        .lines()
        .filter(|l| l.starts_with("pageviews_http_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_probe_passes_and_a_visit_is_processed_end_to_end() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let d = deploy(&env, |_| {}).await?;
    let probe = Probe::new(
        &d.https_url("/"),
        Some(&d.http_url("/")),
        Some(&std::fs::read(&d.certificates.ca)?),
    )?;
    for outcome in probe.run().await {
        assert!(outcome.result.is_ok(), "{}: {:?}", outcome.name, outcome.result);
    }
    // Following its visit through /visits/{id} records no more.
    assert_eq!(
        env.all_processed(Duration::from_secs(20)).await?,
        1,
        "the probe records one visit"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn modern_tls_offers_only_tls13_over_http2() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let d = deploy(&env, |_| {}).await?;
    assert!(handshake(&d, &["-tls1_3"]), "TLS 1.3 refused");
    assert!(!handshake(&d, &["-tls1_2"]), "TLS 1.2 offered by the modern profile");
    assert!(!handshake(&d, &["-tls1_1"]), "TLS 1.1 offered");
    let response = client(&d, false)?.get(d.https_url("/")).send().await?;
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    check_headers(response.headers())?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn intermediate_tls_adds_tls12_with_only_aead_suites() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let d = deploy(&env, |o| o.tls_profile = "intermediate".into()).await?;
    assert!(handshake(&d, &["-tls1_3"]));
    assert!(handshake(&d, &["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"]));
    assert!(
        !handshake(&d, &["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA"]),
        "CBC suite offered"
    );
    assert!(!handshake(&d, &["-tls1_1"]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn headers_redirect_and_internal_endpoints() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let d = deploy(&env, |_| {}).await?;
    let c = client(&d, false)?;
    for path in ["/", "/static/app.css", "/no-such-page", "/static/missing.css"] {
        let response = c.get(d.https_url(path)).send().await?;
        check_headers(response.headers()).map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
    }
    let redirect = c.get(d.http_url("/a?b=c")).send().await?;
    assert_eq!(redirect.status(), 308);
    assert_eq!(redirect.headers()["location"], d.https_url("/a?b=c").as_str());
    for path in ["/metrics", "/readyz"] {
        assert_eq!(c.get(d.https_url(path)).send().await?.status(), 404, "{path} is public");
        assert_eq!(
            reqwest::get(d.app_url(path)).await?.status(),
            200,
            "{path} missing on the app"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn static_files_are_served_by_nginx_and_never_reach_the_app() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let d = deploy(&env, |_| {}).await?;
    let c = client(&d, false)?;
    let before = app_requests(&d).await?;
    for name in ["app.css", "app.js", "logo.svg"] {
        let response = c.get(d.https_url(&format!("/static/{name}?v=1"))).send().await?;
        assert_eq!(response.status(), 200, "{name}");
        assert_eq!(
            response.headers()["cache-control"],
            "public, max-age=31536000, immutable"
        );
        let served = response.bytes().await?;
        assert_eq!(
            served.as_ref(),
            std::fs::read(d.options.static_root.join(name))?.as_slice()
        );
    }
    // The /metrics read itself is the only request the app saw.
    assert_eq!(app_requests(&d).await?, before + 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn disallowed_methods_are_dropped_and_oversized_input_refused() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let d = deploy(&env, |_| {}).await?;
    for http1 in [true, false] {
        let c = client(&d, http1)?;
        for method in ["PUT", "DELETE", "TRACE", "OPTIONS"] {
            let result = c.request(method.parse()?, d.https_url("/")).send().await;
            let error = result.expect_err(&format!("{method} got an answer (http1: {http1})"));
            assert!(!error.is_timeout(), "{method}: {error}");
        }
    }
    let c = client(&d, true)?;
    let random: String = (0..3000)
        .map(|i| char::from(b'a' + ((i * 7919 + i / 3) % 26) as u8))
        .collect();
    assert_eq!(
        c.get(d.https_url("/")).header("x-big", &random).send().await?.status(),
        400
    );
    assert_eq!(c.get(d.https_url(&format!("/{random}"))).send().await?.status(), 414);
    assert_eq!(
        c.post(d.https_url("/")).body(vec![b'x'; 40_000]).send().await?.status(),
        413
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_beyond_the_rate_limit_gets_429() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let d = deploy(&env, |o| {
        o.rate = 5;
        o.burst = 10;
    })
    .await?;
    let c = client(&d, true)?;
    let mut statuses = Vec::new();
    for _ in 0..30 {
        statuses.push(c.get(d.https_url("/static/app.css")).send().await?.status().as_u16());
    }
    assert!(statuses[..10].iter().all(|s| *s == 200), "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(d.nginx.error_log().contains("limiting requests"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_client_is_cut_off_and_the_request_id_is_logged() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let d = deploy(&env, |_| {}).await?;
    // Slowloris: half a request line, then silence.
    let mut slow = std::net::TcpStream::connect(("127.0.0.1", d.options.http_port))?;
    slow.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n")?;
    let started = Instant::now();
    slow.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(15),
        "closed after {waited:?}"
    );

    // A client cannot choose the id the app logs: nginx replaces it.
    let response = client(&d, false)?
        .get(d.https_url("/"))
        .header("x-request-id", "forged-by-client")
        .send()
        .await?;
    let id = response.headers()["x-request-id"].to_str()?.to_owned();
    assert_eq!(id.len(), 32, "nginx's own id: {id}");
    // nginx writes the access log line after the response has gone out.
    let logged = format!("\"request_id\":\"{id}\"");
    pageviews_testbed::process::wait_until("the access log line", Duration::from_secs(5), || async {
        anyhow::ensure!(d.nginx.access_log().contains(&logged), "not logged yet");
        Ok(())
    })
    .await?;
    let app_log = std::fs::read_to_string(env.dir.path().join("app.log"))?;
    assert!(app_log.contains(&id), "the app's log lines do not carry {id}");
    assert!(
        !app_log.contains("forged-by-client"),
        "a client-supplied request id reached the app"
    );
    Ok(())
}

/// TCP connections of this host with `port` at one end: (local port, remote port, state),
/// state as /proc/net/tcp writes it ("01" established, "06" TIME_WAIT).
fn connections_on(port: u16) -> anyhow::Result<Vec<(u16, u16, String)>> {
    let table = std::fs::read_to_string("/proc/net/tcp")?;
    let port_of = |address: &str| u16::from_str_radix(address.rsplit(':').next().unwrap_or(""), 16).ok();
    Ok(table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, remote) = (port_of(fields.get(1)?)?, port_of(fields.get(2)?)?);
            let state = fields.get(3)?.to_string();
            (local == port || remote == port).then_some((local, remote, state))
        })
        .collect())
}

/// Nginx closes the upstream connections it keeps idle before the app would: with
/// `proxy_next_upstream off` a request nginx sends on a connection the app is closing is a
/// 502. The side that closes first keeps the connection in TIME_WAIT: it must be nginx's.
#[tokio::test(flavor = "multi_thread")]
async fn nginx_closes_idle_upstream_connections_before_the_app_does() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let d = deploy(&env, |_| {}).await?;
    let port = d.app_port;
    let time_wait = |local: bool| -> anyhow::Result<Vec<(u16, u16)>> {
        Ok(connections_on(port)?
            .into_iter()
            .filter(|(l, r, state)| state == "06" && (if local { *l == port } else { *r == port }))
            .map(|(l, r, _)| (l, r))
            .collect())
    };
    let (app_before, nginx_before) = (time_wait(true)?, time_wait(false)?);
    let c = client(&d, true)?;
    assert_eq!(c.get(d.https_url("/healthz")).send().await?.status(), 200);
    // The upstream connection nginx keeps, until one side closes it (the app's idle timeout
    // is 10 s).
    wait_until(
        "the idle upstream connection closed",
        Duration::from_secs(30),
        || async {
            let open: Vec<_> = connections_on(port)?
                .into_iter()
                .filter(|(l, _, state)| state == "01" && *l == port)
                .collect();
            anyhow::ensure!(open.is_empty(), "open: {open:?}");
            Ok(())
        },
    )
    .await?;
    let closed_by_app: Vec<_> = time_wait(true)?
        .into_iter()
        .filter(|c| !app_before.contains(c))
        .collect();
    let closed_by_nginx: Vec<_> = time_wait(false)?
        .into_iter()
        .filter(|c| !nginx_before.contains(c))
        .collect();
    assert!(
        closed_by_app.is_empty() && !closed_by_nginx.is_empty(),
        "closed first by the app: {closed_by_app:?}; by nginx: {closed_by_nginx:?}"
    );
    assert_eq!(c.get(d.https_url("/healthz")).send().await?.status(), 200);
    Ok(())
}

/// The rate limit counts an IPv6 client per /64 (what one subscriber gets: a /128 key
/// gave one host 2^64 budgets), an IPv4 client per address. The test acts as several
/// clients through a header only the test configuration trusts (nginx's realip module).
#[tokio::test(flavor = "multi_thread")]
async fn ipv6_clients_are_rate_limited_per_64() -> anyhow::Result<()> {
    const HEADER: &str = "x-test-client-address";
    let env = TestEnv::new().await?;
    let d = deploy(&env, |o| {
        o.rate = 1;
        o.burst = 5;
        o.client_address_header = Some(HEADER.into());
    })
    .await?;
    let c = client(&d, true)?;
    let statuses = |client: &'static str, n: usize| {
        let (c, url) = (c.clone(), d.https_url("/static/app.css"));
        async move {
            let mut statuses = Vec::new();
            for _ in 0..n {
                statuses.push(c.get(&url).header(HEADER, client).send().await?.status().as_u16());
            }
            anyhow::Ok(statuses)
        }
    };
    for (spent, same_budget, own_budget) in [
        ("2001:db8:0:0::1", "2001:db8::ffff:2", "2001:db8:0:1::1"),
        ("192.0.2.1", "192.0.2.1", "192.0.2.2"),
    ] {
        let first = statuses(spent, 20).await?;
        assert!(first.contains(&429), "{spent}: {first:?}");
        // Within the second the budget takes to grow by one request.
        let same = statuses(same_budget, 3).await?;
        assert!(same.contains(&429), "{same_budget} after {spent}: {same:?}");
        let own = statuses(own_budget, 3).await?;
        assert_eq!(own, [200, 200, 200], "{own_budget} after {spent}");
    }
    Ok(())
}
