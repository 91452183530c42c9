# vm-cluster: client -> proxy (nginx over app1, app2) -> app hosts -> broker1..3 (a RabbitMQ
# cluster, quorum queues) and db (PostgreSQL). The constants of the Nix side and common.py
# come first (nodes.nix `script`).
import json  # noqa: E402 (after the constants and common.py)

# rabbitmqctl needs the node's Erlang cookie, in the rabbitmq user's home.
RABBITMQCTL = f"runuser -u rabbitmq -- env HOME={RABBITMQ_HOME} rabbitmqctl"
TASKS = "pageviews.tasks"  # src/queue/mod.rs QUEUE
BROKERS = {"broker1": broker1, "broker2": broker2, "broker3": broker3}
APPS = {"app1": app1, "app2": app2}
ADDRESSES = {
    "broker1": ipv4(client, "broker1"),
    "broker2": ipv4(client, "broker2"),
    "broker3": ipv4(client, "broker3"),
    "app1": ipv4(client, "app1"),
    "app2": ipv4(client, "app2"),
    "db": ipv4(client, "db"),
}

# The first broker starts alone; the others join it from the node list at their first boot.
broker1.start()
broker1.wait_for_unit("rabbitmq.service")
start_all()


def running_nodes() -> list[str]:
    out = broker_up().succeed(f"{RABBITMQCTL} cluster_status --formatter json")
    return sorted(json.loads(out)["running_nodes"])


def broker_up():
    """A broker whose RabbitMQ is running (for rabbitmqctl)."""
    for machine in BROKERS.values():
        active = "systemctl is-active --quiet rabbitmq.service"
        if machine.booted and machine.execute(active)[0] == 0:
            return machine
    raise AssertionError("no broker is running")


def wait_cluster(size: int) -> None:
    def formed(_: bool) -> bool:
        return len(running_nodes()) == size

    retry(formed, timeout_seconds=300)


def tasks_queue() -> dict:
    out = broker_up().succeed(
        f"{RABBITMQCTL} list_queues -q -p {VHOST} --formatter json name type leader members"
    )
    return next(q for q in json.loads(out) if q["name"] == TASKS)


def connected_broker(app) -> str:
    """The broker host the app's publisher is connected to (its last such log line)."""
    line = app.succeed("journalctl -u pageviews-app -o cat | grep 'publisher connected' | tail -n1")
    address = json.loads(line)["fields"]["broker"].split(":")[0]
    return next(name for name in BROKERS if ADDRESSES[name] == address)


def load_across(label: str, action, max_failures: int = 0) -> None:
    """Pages load before, during and after `action` (common.py under_traffic, db the database)."""
    under_traffic(client, label, action, max_failures, lambda: db)


with subtest("every host reaches its units"):
    for machine in BROKERS.values():
        machine.wait_for_unit("rabbitmq.service")
    broker1.wait_for_unit("pageviews-rabbitmq-setup.service")
    db.wait_for_unit("postgresql.target")
    for machine in APPS.values():
        machine.wait_for_unit("pageviews-app.service")
        machine.wait_for_unit("pageviews-worker.service")
    proxy.wait_for_unit("nginx.service")
    client.wait_for_unit("multi-user.target")
    client.wait_until_succeeds(f"{CURL} --fail {ORIGIN}/healthz", timeout=300)

with subtest("three brokers form one cluster; the task queue is a quorum queue on all of them"):
    wait_cluster(3)
    assert running_nodes() == [f"rabbit@{name}" for name in BROKERS]

    def replicated(_: bool) -> bool:
        queue = tasks_queue()
        return queue["type"] == "quorum" and len(queue["members"]) == 3

    retry(replicated, timeout_seconds=180)

with subtest("a page view is recorded on db and processed by a worker"):
    check_page_view(client, db, ORIGIN)

with subtest("firewall: brokers only from the app hosts and each other, db from the app hosts"):
    for name in BROKERS:
        address = ADDRESSES[name]
        peers = [m for n, m in BROKERS.items() if n != name]
        for app in APPS.values():
            assert_reachable(app, address, AMQP_PORT)
            for port in (EPMD_PORT, ERLANG_DIST_PORT):
                assert_unreachable(app, address, port)
        for peer in peers:
            for port in (EPMD_PORT, ERLANG_DIST_PORT):
                assert_reachable(peer, address, port)
        for outsider in (client, proxy, db):
            for port in (AMQP_PORT, EPMD_PORT, ERLANG_DIST_PORT):
                assert_unreachable(outsider, address, port)
    for app in APPS.values():
        assert_reachable(app, ADDRESSES["db"], PG_PORT)
    for outsider in (client, proxy, broker1):
        assert_unreachable(outsider, ADDRESSES["db"], PG_PORT)
    for address in (ADDRESSES["app1"], ADDRESSES["app2"]):
        assert_reachable(proxy, address, APP_PORT)
        assert_unreachable(client, address, APP_PORT)
        assert_unreachable(broker1, address, APP_PORT)

with subtest("the broker the apps use stops (systemctl stop): nothing lost, no request fails"):
    name = connected_broker(app1)
    machine = BROKERS[name]
    load_across("stop-connected", lambda: machine.succeed("systemctl stop rabbitmq.service"))
    assert connected_broker(app1) != name
    machine.succeed("systemctl start rabbitmq.service")
    wait_cluster(3)

with subtest("the node leading the task queue stops: nothing lost, no request fails"):
    name = tasks_queue()["leader"].split("@")[1]
    machine = BROKERS[name]
    load_across("stop-leader", lambda: machine.succeed("systemctl stop rabbitmq.service"))
    assert tasks_queue()["leader"] != f"rabbit@{name}"
    machine.succeed("systemctl start rabbitmq.service")
    wait_cluster(3)

with subtest("a broker node crashes: nothing lost, no request fails"):
    name = connected_broker(app2)
    machine = BROKERS[name]
    load_across("crash-broker", machine.crash)
    machine.start()
    machine.wait_for_unit("rabbitmq.service")
    wait_cluster(3)

with subtest("an app host crashes: only requests to it fail, nothing answered is lost"):
    # nginx waits proxy_connect_timeout (3 s) for the dead host, answers 502 (never retrying
    # a request the host may have stored), and leaves it out for fail_timeout (10 s).
    load_across("crash-app", app2.crash, max_failures=3)
    app2.start()
    app2.wait_for_unit("pageviews-app.service")
