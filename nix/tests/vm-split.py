# vm-split: client -> proxy (nginx, TLS) -> app (app, worker, migrations) -> data
# (PostgreSQL, RabbitMQ). The constants of the Nix side and common.py come first
# (nodes.nix `script`).

start_all()

with subtest("every host reaches its units"):
    data.wait_for_unit("postgresql.target")
    data.wait_for_unit("rabbitmq.service")
    data.wait_for_unit("pageviews-rabbitmq-setup.service")
    app.wait_for_unit("pageviews-migrate.service")
    app.wait_for_unit("pageviews-app.service")
    app.wait_for_unit("pageviews-worker.service")
    proxy.wait_for_unit("nginx.service")
    client.wait_for_unit("multi-user.target")
    client.wait_until_succeeds(f"{CURL} --fail {ORIGIN}/healthz", timeout=300)

app_ip = ipv4(client, "app")
data_ip = ipv4(client, "data")

check_stack(client, app, data)

with subtest("firewall: only the app host reaches the data ports, only the proxy the app"):
    for port in (PG_PORT, AMQP_PORT, EPMD_PORT, ERLANG_DIST_PORT):
        assert_unreachable(client, data_ip, port)
        assert_unreachable(proxy, data_ip, port)
    for port in (PG_PORT, AMQP_PORT):
        assert_reachable(app, data_ip, port)
    assert_unreachable(client, app_ip, APP_PORT)
    assert_unreachable(data, app_ip, APP_PORT)
    assert_reachable(proxy, app_ip, APP_PORT)
    # the peer rules sit in the backend each host chose: nftables on data, iptables on app
    data.succeed(
        "nft list chain inet nixos-fw input-allow"
        f" | grep -qF 'tcp dport {{ {PG_PORT}, {AMQP_PORT} }} accept'"
    )
    app.succeed(f"iptables -S nixos-fw | grep -qF -- '--dport {APP_PORT} -j nixos-fw-accept'")
    # the data ports do listen on the private address: only the firewall keeps others out
    data.succeed(f"ss -Hltn 'sport = :{PG_PORT}' | grep -q .")
    data.succeed(f"ss -Hltn 'sport = :{AMQP_PORT}' | grep -qF '{data_ip}:{AMQP_PORT}'")

check_operations(client, app, proxy, data, APP_WATCHDOG, WORKER_WATCHDOG)
