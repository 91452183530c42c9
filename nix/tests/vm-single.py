# vm-single: the whole stack on `server` (app on a Unix socket, PostgreSQL and RabbitMQ on
# loopback); `client` is the outside. The constants and common.py come first (nodes.nix `script`).

import json  # noqa: E402 (after the constants and common.py)

start_all()

with subtest("the server reaches its units"):
    server.wait_for_unit("postgresql.target")
    server.wait_for_unit("rabbitmq.service")
    server.wait_for_unit("pageviews-secrets.service")
    server.wait_for_unit("pageviews-rabbitmq-setup.service")
    server.wait_for_unit("pageviews-migrate.service")
    server.wait_for_unit("pageviews-app.service")
    server.wait_for_unit("pageviews-worker.service")
    server.wait_for_unit("nginx.service")
    client.wait_for_unit("multi-user.target")
    client.wait_until_succeeds(f"{CURL} --fail {ORIGIN}/healthz", timeout=300)

server_ip = ipv4(client, "server")

check_stack(client, server, server)

with subtest("only 80 and 443 face the network; the rest is loopback or a Unix socket"):
    assert sorted(PUBLIC_PORTS) == [80, 443], PUBLIC_PORTS
    for port in (PG_PORT, AMQP_PORT, EPMD_PORT, ERLANG_DIST_PORT, APP_PORT):
        assert_unreachable(client, server_ip, port)
    for port in PUBLIC_PORTS:
        assert_reachable(client, server_ip, port)
    for port in (PG_PORT, AMQP_PORT):
        listeners = server.succeed(f"ss -Hltn 'sport = :{port}'")
        assert listeners.strip(), f"nothing listens on {port}"
        for line in listeners.splitlines():
            local = line.split()[3]
            assert local.startswith(("127.0.0.1:", "[::1]:")), f"{port} listens on {local}"
    server.succeed(f"test -S {APP_LISTEN}")
    server.fail(f"ss -Hltn 'sport = :{APP_PORT}' | grep -q .")

check_operations(client, server, server, server, APP_WATCHDOG, WORKER_WATCHDOG)

with subtest("the daily logical backup restores: the same rows and counters"):
    dump = "/var/backup/postgresql/pageviews.sql.gz"
    server.succeed("systemctl start postgresqlBackup-pageviews.service")
    server.succeed(f"test -s {dump}")
    psql = "runuser -u postgres -- psql -X -q -t -A -v ON_ERROR_STOP=1"
    server.succeed("runuser -u postgres -- createdb -O pageviews pageviews_drill")
    server.succeed(f"zcat {dump} | {psql} -d pageviews_drill")
    for query in (
        "SELECT count(*), count(processed_at), max(id) FROM page_views",
        "SELECT sum(recorded), sum(processed) FROM page_view_counts",
        "SELECT count(*) FROM __diesel_schema_migrations",
    ):
        live = server.succeed(f"{psql} -d pageviews -c '{query}'")
        restored = server.succeed(f"{psql} -d pageviews_drill -c '{query}'")
        assert live == restored, f"{query}: {live.strip()} live, {restored.strip()} restored"
    server.succeed("runuser -u postgres -- dropdb pageviews_drill")

with subtest("the journal finds one request's lines by its request-id field"):
    # nginx makes the id (a client's own is overwritten) and returns it in X-Request-Id.
    headers = client.succeed(f"{CURL} --fail -o /dev/null -D - {ORIGIN}/")
    ids = re.findall(r"(?im)^x-request-id: *([0-9a-f]{32})\s*$", headers)
    assert len(ids) == 1, headers
    request_id = ids[0]
    lines = server.wait_until_succeeds(
        f"journalctl -u pageviews-app.service -o json F_REQUEST_ID={request_id} | grep .",
        timeout=30,
    )
    fields = [json.loads(line) for line in lines.splitlines()]
    assert all(f["SYSLOG_IDENTIFIER"] == "pageviews-app" for f in fields), fields
    assert any(f.get("F_STATUS") == "200" for f in fields), fields

with subtest("the admin tool runs with the app's credentials"):
    status = server.succeed("pageviews-admin status")
    assert "database: ok" in status and "broker: ok" in status, status
    server.succeed("test ! -e /run/credentials/pageviews-admin.service")
