//! Checks a deployed stack from the outside, as a visitor would: used by the integration
//! tests, the NixOS VM tests and operators after a deploy (`pageviews-probe URL`).

use anyhow::{Context, bail, ensure};
use reqwest::{Client, Method, StatusCode, header};
use std::time::{Duration, Instant};

/// Response headers every page must carry (nginx adds them; see nix/nginx/headers.conf).
pub const SECURITY_HEADERS: &[(&str, &str)] = &[
    ("strict-transport-security", "max-age=63072000; includeSubDomains"),
    ("x-frame-options", "DENY"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-origin"),
];

pub struct Probe {
    client: Client,
    base: url::Url,
    http: Option<url::Url>,
    /// How long to wait for the worker to process the probe's visit.
    pub patience: Duration,
}

/// The result of one check, printed as `ok NAME` or `FAIL NAME: why`.
pub struct Outcome {
    pub name: &'static str,
    pub result: anyhow::Result<String>,
}

impl Probe {
    /// `base`: the HTTPS URL. `http`: the plain-HTTP URL that must redirect (derived from
    /// `base` when it uses the default port). `ca_pem`: extra trusted CA (self-signed setups).
    pub fn new(base: &str, http: Option<&str>, ca_pem: Option<&[u8]>) -> anyhow::Result<Probe> {
        let base = url::Url::parse(base).with_context(|| format!("{base:?} is not a URL"))?;
        ensure!(
            base.scheme() == "https",
            "the base URL must be https://, not {}",
            base.scheme()
        );
        let http = match http {
            Some(h) => Some(url::Url::parse(h).with_context(|| format!("{h:?} is not a URL"))?),
            None if base.port().is_none() => {
                let mut h = base.clone();
                h.set_scheme("http").expect("https -> http is a valid change");
                Some(h)
            }
            None => None,
        };
        let mut builder = Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("pageviews-probe/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = ca_pem {
            builder =
                builder.add_root_certificate(reqwest::Certificate::from_pem(pem).context("the CA file is not PEM")?);
        }
        Ok(Probe {
            client: builder.build()?,
            base,
            http,
            patience: Duration::from_secs(30),
        })
    }

    fn url(&self, path: &str) -> String {
        self.base
            .join(path)
            .map(String::from)
            .unwrap_or_else(|_| format!("{}{path}", self.base))
    }

    /// Runs every check; all must be `ok`.
    pub async fn run(&self) -> Vec<Outcome> {
        let mut outcomes = Vec::new();
        let page = self.page().await;
        let visit = page.as_ref().ok().map(|(_, visit, recorded)| (*visit, *recorded));
        let assets = page
            .as_ref()
            .ok()
            .map(|(assets, _, _)| assets.clone())
            .unwrap_or_default();
        outcomes.push(Outcome {
            name: "page over https with security headers",
            result: page.map(|(_, v, r)| format!("visit #{v} of {r}")),
        });
        outcomes.push(Outcome {
            name: "static files from nginx, cached",
            result: self.statics(&assets).await,
        });
        outcomes.push(Outcome {
            name: "internal endpoints hidden",
            result: self.internal_hidden().await,
        });
        outcomes.push(Outcome {
            name: "disallowed methods dropped",
            result: self.methods_dropped().await,
        });
        outcomes.push(Outcome {
            name: "http redirects to https",
            result: self.redirect().await,
        });
        let processed = match visit {
            Some((visit, _)) => self.processed(visit).await,
            None => Err(anyhow::anyhow!("no visit was recorded")),
        };
        outcomes.push(Outcome {
            name: "visit processed by the worker",
            result: processed,
        });
        outcomes
    }

    /// The page: 200, headers, the visit id and the totals; returns the asset links too.
    async fn page(&self) -> anyhow::Result<(Vec<String>, i64, i64)> {
        let response = self.client.get(self.url("/")).send().await?;
        ensure!(
            response.status() == StatusCode::OK,
            "GET / answered {}",
            response.status()
        );
        check_headers(response.headers())?;
        let body = response.text().await?;
        let visit = number_after(&body, r#"<strong id="visit">#"#).context("no visit id on the page")?;
        let recorded = number_after(&body, r#"<dd id="recorded">"#).context("no recorded total on the page")?;
        let assets = body
            .split("\"/static/")
            .skip(1)
            .filter_map(|rest| rest.split('"').next())
            .map(|path| format!("/static/{path}"))
            .collect();
        Ok((assets, visit, recorded))
    }

    async fn statics(&self, assets: &[String]) -> anyhow::Result<String> {
        ensure!(
            assets.len() >= 3,
            "the page links {} static files, expected CSS, JS and the logo",
            assets.len()
        );
        for asset in assets {
            let response = self.client.get(self.url(asset)).send().await?;
            ensure!(
                response.status() == StatusCode::OK,
                "{asset} answered {}",
                response.status()
            );
            check_headers(response.headers())?;
            let cache = header_str(response.headers(), header::CACHE_CONTROL.as_str());
            ensure!(cache.contains("immutable"), "{asset} has Cache-Control {cache:?}");
        }
        Ok(format!("{} files", assets.len()))
    }

    async fn internal_hidden(&self) -> anyhow::Result<String> {
        for path in ["/metrics", "/readyz"] {
            let status = self.client.get(self.url(path)).send().await?.status();
            ensure!(status == StatusCode::NOT_FOUND, "{path} answered {status} publicly");
        }
        Ok("/metrics and /readyz answer 404".into())
    }

    async fn methods_dropped(&self) -> anyhow::Result<String> {
        // A failure below only counts as "dropped" if the server answers otherwise.
        self.client.head(self.url("/")).send().await.context("HEAD / failed")?;
        for method in [Method::PUT, Method::DELETE, Method::PATCH] {
            match self.client.request(method.clone(), self.url("/")).send().await {
                Ok(response) => bail!("{method} answered {} instead of closing", response.status()),
                Err(e) if e.is_timeout() => bail!("{method} timed out instead of closing"),
                Err(_) => {}
            }
        }
        Ok("PUT, DELETE, PATCH closed without an answer".into())
    }

    async fn redirect(&self) -> anyhow::Result<String> {
        let Some(http) = &self.http else {
            return Ok("skipped: the base URL has a port; pass --http-url".into());
        };
        let response = self.client.get(http.join("/probe?x=1")?).send().await?;
        ensure!(
            response.status() == StatusCode::PERMANENT_REDIRECT,
            "HTTP answered {}",
            response.status()
        );
        let location = header_str(response.headers(), "location");
        ensure!(
            location.starts_with("https://") && location.ends_with("/probe?x=1"),
            "redirects to {location:?}"
        );
        Ok(format!("308 to {location}"))
    }

    /// Waits until the probe's own visit is processed (`GET /visits/{id}`); an answer other
    /// than "processed" (a 503 while the database restarts, a 429) is retried until
    /// `patience` runs out, and the last one is reported.
    async fn processed(&self, visit: i64) -> anyhow::Result<String> {
        let started = Instant::now();
        loop {
            let last = match self.client.get(self.url(&format!("/visits/{visit}"))).send().await {
                Ok(response) if response.status() == StatusCode::OK => {
                    let state: serde_json::Value = response
                        .json()
                        .await
                        .with_context(|| format!("/visits/{visit} did not answer JSON"))?;
                    if state["processed"] == true {
                        return Ok(format!(
                            "visit #{visit} processed after {:.1} s",
                            started.elapsed().as_secs_f64()
                        ));
                    }
                    "not processed yet".to_owned()
                }
                Ok(response) => format!("GET /visits/{visit} answered {}", response.status()),
                Err(e) => format!("GET /visits/{visit} failed: {e}"),
            };
            ensure!(
                started.elapsed() < self.patience,
                "visit #{visit} not processed after {:?} ({last})",
                self.patience
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

pub fn check_headers(headers: &header::HeaderMap) -> anyhow::Result<()> {
    for (name, expected) in SECURITY_HEADERS {
        let value = header_str(headers, name);
        ensure!(value == *expected, "{name} is {value:?}, expected {expected:?}");
    }
    let csp = header_str(headers, "content-security-policy");
    ensure!(
        csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"),
        "weak CSP {csp:?}"
    );
    let server = header_str(headers, "server");
    ensure!(!server.contains('/'), "Server header shows a version: {server:?}");
    Ok(())
}

fn header_str<'a>(headers: &'a header::HeaderMap, name: &str) -> &'a str {
    headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

fn number_after(body: &str, marker: &str) -> Option<i64> {
    let rest = body.split(marker).nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}
