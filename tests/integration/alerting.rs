//! The alert rules against the real thing: a real Prometheus scrapes the real app and worker,
//! loads ops/prometheus/alerts.yml, and sees the broker alert fire when RabbitMQ stops.

use crate::support::{TestEnv, client};
use pageviews_testbed::process::wait_until;
use pageviews_testbed::prometheus::{Prometheus, ScrapeJob};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

const ALERT: &str = "PageviewsBrokerDisconnected";

fn alerts_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("ops/prometheus/alerts.yml")
}

/// The rules with every `for:` of minutes read as seconds (and the group renamed): the same
/// expressions, loaded beside the real file, so the test need not wait out `for: 2m`.
fn minutes_as_seconds(rules: &str) -> String {
    rules
        .lines()
        .map(|line| {
            let trimmed = line.trim_start();
            let indent = &line[..line.len() - trimmed.len()];
            match trimmed.strip_prefix("for: ").and_then(|d| d.strip_suffix('m')) {
                Some(minutes) if minutes.parse::<u32>().is_ok() => format!("{indent}for: {minutes}s"),
                _ if trimmed.starts_with("- name: ") => format!("{line}-fast"),
                _ => line.to_owned(),
            }
        })
        .map(|line| line + "\n")
        .collect()
}

/// Alert names in a rule file by group (`- name: group`, then its `- alert: Name` lines).
fn alert_names(rules: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut groups: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut group = String::new();
    for line in rules.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("- name: ") {
            group = name.to_owned();
        } else if let Some(alert) = line.strip_prefix("- alert: ") {
            groups.entry(group.clone()).or_default().insert(alert.to_owned());
        }
    }
    groups
}

/// `group name -> [(rule name, health, state)]` from `/api/v1/rules`.
async fn alerting_rules(prometheus: &Prometheus) -> anyhow::Result<Vec<(String, String, String, String)>> {
    let data = prometheus.api("/api/v1/rules?type=alert").await?;
    let mut rules = Vec::new();
    for group in data["groups"].as_array().into_iter().flatten() {
        for rule in group["rules"].as_array().into_iter().flatten() {
            let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
            rules.push((
                text(&group["name"]),
                text(&rule["name"]),
                text(&rule["health"]),
                text(&rule["state"]),
            ));
        }
    }
    Ok(rules)
}

/// Jobs for which `alert` is in `state` (`pending`, `firing`), from `/api/v1/alerts`.
async fn alert_jobs(prometheus: &Prometheus, alert: &str, state: &str) -> anyhow::Result<BTreeSet<String>> {
    let data = prometheus.api("/api/v1/alerts").await?;
    Ok(data["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["labels"]["alertname"] == alert && a["state"] == state)
        .filter_map(|a| a["labels"]["job"].as_str().map(str::to_owned))
        .collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_prometheus_loads_the_rules_and_fires_the_broker_alert_when_rabbitmq_stops() -> anyhow::Result<()> {
    let mut env = TestEnv::dedicated().await?;
    env.migrate()?;
    let running = env.app_and_worker_with_metrics().await?;
    let (app_listen, worker_listen) = (&running.app_listen, &running.worker_listen);
    // The publisher's gauge is 1 once it holds a connection: /readyz (on the operators'
    // listener) says so.
    let readyz = format!("http://{app_listen}/readyz");
    wait_until("the app ready", Duration::from_secs(20), || async {
        let status = client().get(&readyz).send().await?.status();
        anyhow::ensure!(status == 200, "status {status}");
        Ok(())
    })
    .await?;

    let real = std::fs::read_to_string(alerts_file())?;
    let fast_file = env.dir.path().join("alerts-fast.yml");
    std::fs::write(&fast_file, minutes_as_seconds(&real))?;
    let jobs = [
        ScrapeJob {
            name: "pageviews-app".into(),
            targets: vec![app_listen.clone()],
        },
        ScrapeJob {
            name: "pageviews-worker".into(),
            targets: vec![worker_listen.clone()],
        },
    ];
    let prometheus = Prometheus::start(
        &env.dir.path().join("prometheus"),
        &jobs,
        &[alerts_file(), fast_file],
        Duration::from_millis(500),
    )
    .await?;

    // Every rule of the file, in both groups, loaded and evaluated without error.
    let names = alert_names(&real);
    assert!(
        names["pageviews"].contains(ALERT) && names["pageviews"].len() >= 8 && names.len() >= 2,
        "{names:?}"
    );
    wait_until("every rule evaluated", Duration::from_secs(30), || async {
        let rules = alerting_rules(&prometheus).await?;
        for (group, alerts) in names
            .iter()
            .flat_map(|(g, a)| [(g.clone(), a), (format!("{g}-fast"), a)])
        {
            let loaded: BTreeSet<String> = rules.iter().filter(|r| r.0 == group).map(|r| r.1.clone()).collect();
            anyhow::ensure!(&loaded == alerts, "group {group}: {loaded:?}");
        }
        let unhealthy: Vec<_> = rules.iter().filter(|r| r.2 != "ok").collect();
        anyhow::ensure!(unhealthy.is_empty(), "not evaluated or failing: {unhealthy:?}");
        Ok(())
    })
    .await?;

    // Both targets scraped, and both report a broker connection.
    wait_until("both targets up", Duration::from_secs(30), || async {
        let data = prometheus.api("/api/v1/targets?state=active").await?;
        let targets = data["activeTargets"].as_array().cloned().unwrap_or_default();
        let up: BTreeSet<&str> = targets
            .iter()
            .filter(|t| t["health"] == "up")
            .filter_map(|t| t["labels"]["job"].as_str())
            .collect();
        anyhow::ensure!(
            targets.len() == 2 && up == BTreeSet::from(["pageviews-app", "pageviews-worker"]),
            "{targets:?}"
        );
        let connected = prometheus
            .api("/api/v1/query?query=pageviews_broker_connected%3D%3D1")
            .await?;
        let series = connected["result"].as_array().map_or(0, Vec::len);
        anyhow::ensure!(series == 2, "pageviews_broker_connected == 1: {connected}");
        Ok(())
    })
    .await?;
    assert!(alert_jobs(&prometheus, ALERT, "pending").await?.is_empty());
    assert!(alert_jobs(&prometheus, ALERT, "firing").await?.is_empty());

    env.services_mut().rabbitmq.stop();
    let both = BTreeSet::from(["pageviews-app".to_owned(), "pageviews-worker".to_owned()]);
    wait_until(&format!("{ALERT} firing"), Duration::from_secs(60), || async {
        let firing = alert_jobs(&prometheus, ALERT, "firing").await?;
        anyhow::ensure!(firing == both, "firing for {firing:?}");
        Ok(())
    })
    .await
    .map_err(|e| e.context(prometheus.log_tail()))?;
    // The real rule, whose `for: 2m` has not passed yet, has seen the same: pending.
    let real_rule = alerting_rules(&prometheus)
        .await?
        .into_iter()
        .find(|r| r.0 == "pageviews" && r.1 == ALERT);
    assert_eq!(
        real_rule.map(|r| r.3),
        Some("pending".to_owned()),
        "the real rule's state"
    );
    Ok(())
}

#[test]
fn the_derived_rules_differ_only_in_their_waits() {
    let real = std::fs::read_to_string(alerts_file()).unwrap();
    let fast = minutes_as_seconds(&real);
    assert!(fast.contains("for: 2s") && !fast.contains("for: 2m"), "{fast}");
    let differing: Vec<(&str, &str)> = real.lines().zip(fast.lines()).filter(|(a, b)| a != b).collect();
    assert!(
        differing
            .iter()
            .all(|(a, b)| a.trim().starts_with("for: ") || *b == format!("{a}-fast")),
        "{differing:?}"
    );
    assert_eq!(real.lines().count(), fast.lines().count());
}
