//! A throwaway Prometheus (Debian's `prometheus`): its own config, data and loopback port,
//! scraping the given targets and evaluating the given rule files at a short interval, so a
//! test sees an alert within seconds of the fault.

use super::process::{Process, find_program, free_port, tail, wait_until};
use anyhow::Context;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const PACKAGE: &str = "prometheus";

/// One scrape job: its name (what the rules select on) and `host:port` targets.
pub struct ScrapeJob {
    pub name: String,
    pub targets: Vec<String>,
}

pub struct Prometheus {
    port: u16,
    log: PathBuf,
    client: reqwest::Client,
    _process: Process,
}

impl Prometheus {
    /// Starts Prometheus in `dir` (created 0700 if missing) and waits until it is ready.
    /// `interval` is both the scrape and the evaluation interval.
    pub async fn start(
        dir: &Path,
        jobs: &[ScrapeJob],
        rule_files: &[PathBuf],
        interval: Duration,
    ) -> anyhow::Result<Prometheus> {
        if !dir.exists() {
            crate::private_dir(dir)?;
        }
        let interval = format!("{}ms", interval.as_millis().max(1));
        // JSON is YAML: the config is built as a value, so paths and names need no quoting.
        let config = serde_json::json!({
            "global": {
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "evaluation_interval": interval,
            },
            "rule_files": rule_files,
            "scrape_configs": jobs.iter().map(|job| serde_json::json!({
                "job_name": job.name,
                "static_configs": [{"targets": job.targets}],
            })).collect::<Vec<_>>(),
        });
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, serde_json::to_vec_pretty(&config)?)?;
        let port = free_port()?;
        let mut command = Command::new(find_program("prometheus", &[], PACKAGE)?);
        command
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .current_dir(dir);
        let log = dir.join("prometheus.log");
        let process = Process::spawn("prometheus", &mut command, &log)?;
        let prometheus = Prometheus {
            port,
            log,
            client: reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?,
            _process: process,
        };
        let ready = format!("http://127.0.0.1:{port}/-/ready");
        wait_until("Prometheus", Duration::from_secs(30), || async {
            Ok(prometheus.client.get(&ready).send().await?.error_for_status()?)
        })
        .await
        .with_context(|| format!("Prometheus log:\n{}", tail(&prometheus.log, 20)))?;
        Ok(prometheus)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// `data` of an HTTP API answer (`/api/v1/...`), after checking its `status`.
    pub async fn api(&self, path: &str) -> anyhow::Result<Value> {
        let answer: Value = self
            .client
            .get(self.url(path))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        anyhow::ensure!(answer["status"] == "success", "{path}: {answer}");
        Ok(answer["data"].clone())
    }

    /// The last lines of its log, for a failure message.
    pub fn log_tail(&self) -> String {
        tail(&self.log, 20)
    }
}
