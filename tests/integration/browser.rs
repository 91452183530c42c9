//! Headless Chromium driven over WebDriver (chromedriver + fantoccini), trusting the stack's
//! generated CA by its key (`--ignore-certificate-errors-spki-list`), with two collectors
//! installed by the driver, never by the page: the browser's console log and a
//! `securitypolicyviolation` listener evaluated before any script of the page.

use anyhow::{Context, bail};
use fantoccini::wd::WebDriverCompatibleCommand;
use pageviews_testbed::process::{Process, find_program, free_port, wait_until};
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

const INSTALL: &str = "the browser tests need Chromium and its WebDriver: apt-get install chromium chromium-driver";

/// Runs in every document before the page's own scripts; CSP does not apply to it.
const CSP_LISTENER: &str = r#"
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__cspViolations.push(`${e.violatedDirective} blocked ${e.blockedURI || "inline"} at ${e.sourceFile}:${e.lineNumber}`);
}, true);
"#;

pub struct Browser {
    pub client: fantoccini::Client,
    // Dropped after the client: stops chromedriver and the Chromium it started.
    _driver: Process,
}

/// One entry of Chromium's console log.
#[derive(Debug, serde::Deserialize)]
pub struct LogEntry {
    pub level: String,
    pub message: String,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium that trusts the CA with this SPKI hash.
    pub async fn start(dir: &Path, ca_spki_sha256: &str) -> anyhow::Result<Browser> {
        let chromium = find_program("chromium", &[], "chromium").context(INSTALL)?;
        let chromedriver = find_program("chromedriver", &[], "chromium-driver").context(INSTALL)?;
        let port = free_port()?;
        let mut command = std::process::Command::new(chromedriver);
        command.arg(format!("--port={port}"));
        let driver = Process::spawn("chromedriver", &mut command, &dir.join("chromedriver.log"))?;
        let url = format!("http://127.0.0.1:{port}");
        let status = reqwest::Client::new();
        wait_until("chromedriver", Duration::from_secs(20), || {
            let request = status.get(format!("{url}/status")).send();
            async move {
                let body: Value = request.await?.json().await?;
                anyhow::ensure!(body["value"]["ready"] == true, "not ready: {body}");
                Ok(())
            }
        })
        .await?;

        let profile = dir.join("chromium-profile");
        let args = vec![
            "--headless=new".to_owned(),
            // Chromium's own sandbox cannot start as root (CI) nor in the Nix build sandbox;
            // the only page loaded is ours.
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--window-size=900,760".to_owned(),
            format!("--user-data-dir={}", profile.display()),
            format!("--ignore-certificate-errors-spki-list={ca_spki_sha256}"),
        ];
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": chromium, "args": args },
            "goog:loggingPrefs": { "browser": "ALL" },
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!()
        };
        let client = fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&url)
            .await
            .with_context(|| format!("chromedriver could not start Chromium ({INSTALL})"))?;
        client
            .issue_cmd(Chromedriver::post(
                "goog/cdp/execute",
                json!({ "cmd": "Page.addScriptToEvaluateOnNewDocument", "params": { "source": CSP_LISTENER } }),
            ))
            .await?;
        Ok(Browser {
            client,
            _driver: driver,
        })
    }

    /// Console entries since the last call (chromedriver hands each out once).
    pub async fn console(&self) -> anyhow::Result<Vec<LogEntry>> {
        let entries = self
            .client
            .issue_cmd(Chromedriver::post("se/log", json!({ "type": "browser" })))
            .await?;
        Ok(serde_json::from_value(entries)?)
    }

    /// What the listener saw in the current document.
    pub async fn csp_violations(&self) -> anyhow::Result<Vec<String>> {
        let seen = self.client.execute("return window.__cspViolations;", vec![]).await?;
        match seen {
            Value::Null => bail!("the CSP listener is not installed in this document"),
            seen => Ok(serde_json::from_value(seen)?),
        }
    }

    pub async fn text(&self, css: &str) -> anyhow::Result<String> {
        Ok(self.client.find(fantoccini::Locator::Css(css)).await?.text().await?)
    }

    pub async fn close(self) -> anyhow::Result<()> {
        self.client.close().await?;
        Ok(())
    }
}

/// A chromedriver extension command under `/session/{id}/`.
#[derive(Debug)]
struct Chromedriver {
    path: &'static str,
    body: Value,
}

impl Chromedriver {
    fn post(path: &'static str, body: Value) -> Self {
        Chromedriver { path, body }
    }
}

impl WebDriverCompatibleCommand for Chromedriver {
    fn endpoint(&self, base: &url::Url, session: Option<&str>) -> Result<url::Url, url::ParseError> {
        base.join(&format!("session/{}/{}", session.unwrap_or_default(), self.path))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(self.body.to_string()))
    }
}
