# vm-monitoring: Prometheus, the exporters and Grafana on one host. The constants and
# common.py come first (nodes.nix `script`).
import json  # noqa: E402 (after the constants and common.py)
import urllib.parse  # noqa: E402

# What the infrastructure rules of ops/prometheus/alerts.yml read, by scrape job: each must
# have a series once the stack is up (the exporters' real names, not only the rules' spelling).
INFRASTRUCTURE_METRICS = {
    "rabbitmq": [
        "rabbitmq_alarms_memory_used_watermark",
        "rabbitmq_alarms_free_disk_space_watermark",
        "rabbitmq_queue_messages_ready",
        "rabbitmq_queue_messages_unacked",
    ],
    "postgres": [
        "pg_up",
        "pg_stat_database_numbackends",
        "pg_settings_max_connections",
        "pg_replication_lag_seconds",
        "pg_replication_is_replica",
    ],
    "nginx": ["nginx_up"],
    "nginxlog": ["nginxlog_http_response_count_total"],
}


def prometheus(path: str) -> dict:
    out = json.loads(server.succeed(f"{CURL} --fail 'http://{PROMETHEUS}{path}'"))
    assert out["status"] == "success", out
    return out["data"]


def query(expr: str) -> list:
    return prometheus("/api/v1/query?query=" + urllib.parse.quote(expr))["result"]


start_all()

with subtest("the stack, Prometheus, the exporters and Grafana run"):
    for unit in ["pageviews-app.service", "pageviews-worker.service", "nginx.service",
                 "prometheus.service", "grafana.service", *EXPORTER_UNITS]:
        server.wait_for_unit(unit)
    server.wait_for_open_port(int(PROMETHEUS.rsplit(":", 1)[1]), "127.0.0.1")
    # Requests through nginx, so the access log the nginxlog exporter reads has lines.
    server.wait_until_succeeds(
        f"{CURL} --fail --resolve {DOMAIN}:443:127.0.0.1 --cacert {CA_FILE} https://{DOMAIN}/healthz",
        timeout=300,
    )
    server.succeed(f"{CURL} --fail --resolve {DOMAIN}:443:127.0.0.1 --cacert {CA_FILE} https://{DOMAIN}/")

with subtest("every scrape target is up"):

    def all_up(last: bool) -> bool:
        targets = prometheus("/api/v1/targets")["activeTargets"]
        health = {t["labels"]["job"]: t["health"] for t in targets}
        if last:
            server.log(f"targets: {health}")
        return sorted(health) == sorted(JOBS) and set(health.values()) == {"up"}

    retry(all_up, 300)
    ups = {r["metric"]["job"]: r["value"][1] for r in query("up")}
    assert ups == {job: "1" for job in JOBS}, ups

with subtest("every infrastructure metric the rules read is exported"):
    for job, names in INFRASTRUCTURE_METRICS.items():
        assert job in JOBS, f"no scrape job {job}: {JOBS}"
        for name in names:

            def present(last: bool, name: str = name, job: str = job) -> bool:
                found = query(f'{name}{{job="{job}"}}')
                if last:
                    server.log(f"{name}{{job={job!r}}}: {found}")
                return found != []

            retry(present, 120)
    # The database is reachable, the broker has no alarm, nginx answers its status page.
    assert query('pg_up{job="postgres"} == 1') != []
    assert query('nginx_up{job="nginx"} == 1') != []
    assert query('rabbitmq_alarms_memory_used_watermark{job="rabbitmq"} == 0') != []

with subtest("the alert rules are loaded and none fires"):
    groups = prometheus("/api/v1/rules")["groups"]
    assert sorted(g["name"] for g in groups) == sorted(RULE_GROUPS), [g["name"] for g in groups]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == RULES, f"{len(rules)} rules loaded, alerts.yml has {RULES}"
    assert all(r["health"] == "ok" for r in rules), [r for r in rules if r["health"] != "ok"]
    firing = [a for a in prometheus("/api/v1/alerts")["alerts"] if a["state"] == "firing"]
    assert firing == [], firing

with subtest("Grafana serves the provisioned dashboard and datasource to its admin only"):
    server.wait_for_open_port(int(GRAFANA.rsplit(":", 1)[1]), GRAFANA.rsplit(":", 1)[0])
    mode = server.succeed(f"stat -c '%a %U %G' {GRAFANA_PASSWORD_FILE}").strip()
    assert mode == "640 root grafana", f"{GRAFANA_PASSWORD_FILE}: {mode}"
    password = server.succeed(f"cat {GRAFANA_PASSWORD_FILE}").strip()
    assert len(password) >= 32, "generated password too short"
    auth = f"-u {GRAFANA_ADMIN}:{password}"
    dashboard = json.loads(
        server.wait_until_succeeds(
            f"{CURL} --fail {auth} http://{GRAFANA}/api/dashboards/uid/{DASHBOARD_UID}", timeout=120
        )
    )
    assert dashboard["dashboard"]["uid"] == DASHBOARD_UID, dashboard["meta"]
    assert dashboard["meta"]["provisioned"] is True, dashboard["meta"]
    datasources = f"http://{GRAFANA}/api/datasources/uid/{DATASOURCE_UID}"
    datasource = json.loads(server.succeed(f"{CURL} --fail {auth} {datasources}"))
    assert datasource["type"] == "prometheus", datasource
    assert datasource["url"] == f"http://{PROMETHEUS}", datasource
    # The datasource answers through Grafana: Prometheus is reachable from it.
    health = json.loads(server.succeed(f"{CURL} --fail {auth} {datasources}/health"))
    assert health.get("status") == "OK", health
    for who in ["", f"-u {GRAFANA_ADMIN}:admin"]:
        code = server.succeed(
            f"{CURL} -o /dev/null -w '%{{http_code}}' {who} http://{GRAFANA}/api/dashboards/uid/{DASHBOARD_UID}"
        )
        assert code == "401", f"dashboard answered {code} to {who or 'no credentials'}"

with subtest("Prometheus, Grafana, the exporters and stub_status listen on loopback only"):
    ports = {addr.rsplit(":", 1)[1] for addr in [PROMETHEUS, GRAFANA, NGINX_STATUS, *TARGETS]}
    listening = server.succeed("ss -Htln | awk '{print $4}'").split()
    for addr in [PROMETHEUS, GRAFANA, NGINX_STATUS, *TARGETS]:
        assert addr in listening, (addr, listening)
    exposed = [
        a for a in listening if a.rsplit(":", 1)[1] in ports and not a.startswith("127.0.0.1:")
    ]
    assert exposed == [], f"listening beyond loopback: {exposed}"
