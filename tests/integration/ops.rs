//! What operators get: the Prometheus alert rules (ops/prometheus) and the Grafana dashboard
//! (ops/grafana) parse, the alerts fire in their unit tests, and every metric they name is
//! exported by the real app and worker.

use crate::support::TestEnv;
use anyhow::Context;
use pageviews_testbed::process::{find_program, wait_until};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn ops(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("ops").join(path)
}

fn promtool(args: &[&str], dir: &Path) -> anyhow::Result<String> {
    let promtool = find_program("promtool", &[], "prometheus")?;
    let output = Command::new(promtool).args(args).current_dir(dir).output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    anyhow::ensure!(output.status.success(), "promtool {args:?} failed:\n{text}");
    Ok(text)
}

/// Every `pageviews_*` name in `text` (metric names; alert names are CamelCase).
fn metric_names(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("pageviews_"))
        .map(str::to_owned)
        .collect()
}

/// The metrics of the exporters services.pageviews.monitoring scrapes (nix/modules/monitoring.nix),
/// by the job the rules select them with and the first word of their names. Each list holds
/// what the exporter exports of the names the rules may use, read from its source: RabbitMQ's
/// rabbitmq_prometheus plugin (aggregated /metrics: prometheus_rabbitmq_alarm_metrics_collector,
/// prometheus_rabbitmq_core_metrics_collector), postgres_exporter (pg_up; collectors
/// stat_database, replication; pg_settings), nginx-prometheus-exporter (stub_status collector)
/// and prometheus-nginxlog-exporter (namespace `nginxlog`, labels method and status).
const EXPORTERS: &[(&str, &str, &[&str])] = &[
    (
        "rabbitmq",
        "rabbitmq",
        &[
            "rabbitmq_alarms_memory_used_watermark",
            "rabbitmq_alarms_free_disk_space_watermark",
            "rabbitmq_alarms_file_descriptor_limit",
            "rabbitmq_queue_messages_ready",
            "rabbitmq_queue_messages_unacked",
            "rabbitmq_queue_messages",
        ],
    ),
    (
        "postgres",
        "pg",
        &[
            "pg_up",
            "pg_stat_database_numbackends",
            "pg_settings_max_connections",
            "pg_replication_lag_seconds",
            "pg_replication_is_replica",
        ],
    ),
    (
        "nginx",
        "nginx",
        &[
            "nginx_up",
            "nginx_connections_active",
            "nginx_connections_accepted",
            "nginx_connections_handled",
            "nginx_http_requests_total",
        ],
    ),
    (
        "nginxlog",
        "nginxlog",
        &[
            "nginxlog_http_response_count_total",
            "nginxlog_http_response_size_bytes",
            "nginxlog_http_upstream_time_seconds",
            "nginxlog_http_response_time_seconds",
        ],
    ),
];

/// Every name in `text` that starts with one of the exporters' first words and an underscore,
/// with the exporter's job.
fn exporter_metric_names(text: &str) -> BTreeSet<(&'static str, String)> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter_map(|word| {
            let first = word.split('_').next()?;
            let (job, _, _) = EXPORTERS.iter().find(|(_, prefix, _)| *prefix == first)?;
            word.contains('_').then(|| (*job, word.to_owned()))
        })
        .collect()
}

#[test]
fn every_exporter_metric_the_alerts_use_is_one_its_exporter_exports() {
    let alerts = std::fs::read_to_string(ops("prometheus/alerts.yml")).unwrap();
    let rules: String = alerts
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    let used = exporter_metric_names(&rules);
    for (job, prefix, _) in EXPORTERS {
        assert!(
            used.iter().any(|(j, _)| j == job),
            "alerts.yml has no rule on the {job} exporter ({prefix}_*)"
        );
    }
    for (job, name) in &used {
        let (_, _, names) = EXPORTERS.iter().find(|(j, _, _)| j == job).unwrap();
        assert!(
            names.contains(&name.as_str()),
            "alerts.yml: {name} is not a metric of the {job} exporter"
        );
        // The rule selects the exporter's own scrape job (the ones monitoring.nix defines).
        assert!(
            alerts.contains(&format!("{name}{{job=\"{job}\"")),
            "alerts.yml: {name} without job=\"{job}\""
        );
    }
}

/// The dashboard's panels, checked for the fields Grafana needs to place and query them.
fn dashboard_queries() -> anyhow::Result<Vec<(String, String)>> {
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(ops("grafana/pageviews.json"))?)
        .context("ops/grafana/pageviews.json is not JSON")?;
    anyhow::ensure!(dashboard["uid"].is_string() && dashboard["title"].is_string());
    anyhow::ensure!(dashboard["schemaVersion"].is_u64());
    let panels = dashboard["panels"].as_array().context("no panels")?;
    let mut ids = BTreeSet::new();
    let mut queries = Vec::new();
    for panel in panels {
        let title = panel["title"].as_str().context("a panel without a title")?;
        anyhow::ensure!(ids.insert(panel["id"].as_u64()), "{title}: duplicate or missing id");
        anyhow::ensure!(panel["type"].is_string(), "{title}: no type");
        for field in ["h", "w", "x", "y"] {
            anyhow::ensure!(panel["gridPos"][field].is_u64(), "{title}: gridPos.{field}");
        }
        let targets = panel["targets"].as_array().context("no targets")?;
        anyhow::ensure!(!targets.is_empty(), "{title}: no queries");
        for target in targets {
            anyhow::ensure!(
                target["datasource"]["uid"] == "${datasource}",
                "{title}: not on the dashboard's datasource variable"
            );
            let expr = target["expr"].as_str().context("a target without expr")?;
            queries.push((title.to_owned(), expr.to_owned()));
        }
    }
    Ok(queries)
}

#[test]
fn the_alert_rules_parse_and_fire_in_their_unit_tests() -> anyhow::Result<()> {
    let dir = ops("prometheus");
    let checked = promtool(&["check", "rules", "alerts.yml"], &dir)?;
    let rules = std::fs::read_to_string(dir.join("alerts.yml"))?
        .matches("- alert:")
        .count();
    assert!(rules >= 8, "{rules} alert rules");
    assert!(checked.contains(&format!("SUCCESS: {rules} rules found")), "{checked}");
    let tested = promtool(&["test", "rules", "alerts.test.yml"], &dir)?;
    assert!(tested.contains("SUCCESS"), "{tested}");
    Ok(())
}

#[test]
fn the_dashboard_is_well_formed_and_its_queries_parse() -> anyhow::Result<()> {
    let queries = dashboard_queries()?;
    assert!(queries.len() >= 10, "{queries:?}");
    // promtool has no query checker: each query becomes a recording rule, with Grafana's
    // interval variable replaced by a duration.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in queries.iter().enumerate() {
        let expr = expr.replace("$__rate_interval", "5m");
        rules.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {}\n",
            serde_json::to_string(&expr)?
        ));
    }
    let dir = tempdir()?;
    std::fs::write(dir.join("dashboard.yml"), rules)?;
    let checked = promtool(&["check", "rules", "dashboard.yml"], &dir)?;
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", queries.len())),
        "{checked}"
    );
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

fn tempdir() -> anyhow::Result<PathBuf> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("ops-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metric_the_alerts_and_the_dashboard_use_is_exported() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.migrate()?;
    let running = env.app_and_worker_with_metrics().await?;
    let app = &running.app;
    let c = crate::support::client();
    assert_eq!(c.get(app.url("/")).send().await?.status(), 200);

    // The operators' listener: metrics and health, never the page.
    let operations = |path: &str| format!("http://{}{path}", running.app_listen);
    assert_eq!(c.get(operations("/")).send().await?.status(), 404);
    // Ready once the publisher has connected to the broker.
    wait_until("readyz on the operators' listener", Duration::from_secs(20), || async {
        let status = c.get(operations("/readyz")).send().await?.status();
        anyhow::ensure!(status == 200, "status {status}");
        Ok(())
    })
    .await?;
    let mut exported = BTreeSet::new();
    for url in [
        operations("/metrics"),
        format!("http://{}/metrics", running.worker_listen),
    ] {
        let text = wait_until("metrics", Duration::from_secs(20), || async {
            Ok(c.get(&url).send().await?.error_for_status()?.text().await?)
        })
        .await?;
        // Sample names: the first word of each line that is not a comment.
        exported.extend(
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| l.split(['{', ' ']).next())
                .map(str::to_owned),
        );
    }

    let alerts = std::fs::read_to_string(ops("prometheus/alerts.yml"))?;
    let dashboard: String = dashboard_queries()?.into_iter().map(|(_, q)| q + "\n").collect();
    for (source, text) in [("alerts.yml", &alerts), ("pageviews.json", &dashboard)] {
        let used = metric_names(text);
        assert!(!used.is_empty(), "{source} names no metric");
        let missing: Vec<_> = used.difference(&exported).collect();
        assert!(missing.is_empty(), "{source} uses metrics nobody exports: {missing:?}");
    }

    // The rules and the dashboard select these scrape jobs; that NixOS defines exactly these
    // is the nixos-eval scenario `prometheusJobs` (nix/ is not in the tests' Nix source).
    for job in ["pageviews-app", "pageviews-worker"] {
        assert!(alerts.contains(job) && dashboard.contains(job), "{job} unused");
    }
    Ok(())
}
