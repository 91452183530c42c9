# vm-ha: client -> proxy -> app (app, worker) -> db1..3 (PostgreSQL under Patroni, an etcd
# member each, synchronous replication) and broker (RabbitMQ); backup holds the pgBackRest
# repository. The constants of the Nix side and common.py come first (nodes.nix `script`).
import json  # noqa: E402 (after the constants and common.py)

DBS = {"db1": db1, "db2": db2, "db3": db3}
ADDRESSES = {
    "db1": ipv4(client, "db1"),
    "db2": ipv4(client, "db2"),
    "db3": ipv4(client, "db3"),
}
INFO = f"runuser -u pgbackrest -- pgbackrest --stanza={STANZA} --output=json info"
STORED = "SELECT count(*) FROM page_views"
# Requests that may fail (quick 503s) while no node accepts writes: the client sends about 5 a
# second for as long as a crashed leader's key lives, one more Patroni loop and 10 s to promote.
FAILOVER_FAILURES = (LEADER_TTL + LOOP_WAIT + 10) * 5

start_all()


def members() -> list[dict]:
    """Patroni's members (GET /cluster, from the first node that answers)."""
    for name, machine in DBS.items():
        if not machine.booted:
            continue
        url = f"http://{ADDRESSES[name]}:{REST_PORT}/cluster"
        status, out = machine.execute(f"curl -sf --max-time 5 {url}")
        if status == 0:
            return json.loads(out)["members"]
    raise AssertionError("no Patroni REST API answers")


def leader_name() -> str | None:
    running = [m["name"] for m in members() if m["role"] == "leader" and m["state"] == "running"]
    return running[0] if running else None


def wait_leader(not_name: str | None = None, timeout: int = 180) -> str:
    """The running leader (another than `not_name`), once there is one."""
    found: list[str] = []

    def elected(_: bool) -> bool:
        name = leader_name()
        if name is None or name == not_name:
            return False
        found.append(name)
        return True

    retry(elected, timeout)
    return found[-1]


def wait_healthy(replicas: int = 2, timeout: int = 300) -> str:
    """A running leader, `replicas` streaming standbys, one of them synchronous."""
    found: list[str] = []

    def healthy(_: bool) -> bool:
        ms = members()
        leaders = [m["name"] for m in ms if m["role"] == "leader" and m["state"] == "running"]
        standbys = [
            m for m in ms if m["role"] in ("replica", "sync_standby") and m["state"] == "streaming"
        ]
        synchronous = [m for m in standbys if m["role"] == "sync_standby"]
        if len(leaders) != 1 or len(standbys) != replicas or not synchronous:
            return False
        found.append(leaders[0])
        return True

    retry(healthy, timeout)
    return found[-1]


def load_across(label: str, action, max_failures: int) -> None:
    """Pages load before, during and after `action` and until the answers are 200 again
    (common.py under_traffic, on the primary once it is over): at most `max_failures` failed
    (the quick 503s while no primary accepts writes)."""
    under_traffic(
        client, label, action, max_failures, lambda: DBS[wait_leader()], until_recovered=True
    )


with subtest("three Patroni nodes elect a leader with a synchronous standby; the stack runs"):
    backup.wait_for_open_port(22)
    for machine in DBS.values():
        machine.wait_for_unit("etcd.service")
        machine.wait_for_unit("patroni.service")
    leader = wait_healthy()
    DBS[leader].wait_for_unit("pageviews-db-setup.service")
    broker.wait_for_unit("rabbitmq.service")
    app.wait_for_unit("pageviews-app.service")
    app.wait_for_unit("pageviews-worker.service")
    proxy.wait_for_unit("nginx.service")
    client.wait_until_succeeds(f"{CURL} --fail {ORIGIN}/healthz", timeout=300)
    check_page_view(client, DBS[leader], ORIGIN)
    config_url = f"http://{ADDRESSES[leader]}:{REST_PORT}/config"
    settings = json.loads(DBS[leader].succeed(f"curl -sf {config_url}"))
    assert settings["synchronous_mode"] is True, settings

with subtest("firewall: PostgreSQL from the app and peers, Patroni and etcd from peers only"):
    for name in DBS:
        address = ADDRESSES[name]
        assert_reachable(app, address, PG_PORT)
        for port in (REST_PORT, ETCD_CLIENT_PORT, ETCD_PEER_PORT):
            assert_unreachable(app, address, port)
        for peer_name, peer in DBS.items():
            if peer_name != name:
                for port in (PG_PORT, REST_PORT, ETCD_CLIENT_PORT, ETCD_PEER_PORT):
                    assert_reachable(peer, address, port)
        for outsider in (client, proxy, broker):
            for port in (PG_PORT, REST_PORT, ETCD_CLIENT_PORT, ETCD_PEER_PORT):
                assert_unreachable(outsider, address, port)

with subtest("a full backup on the primary; a standby's timer job skips"):
    leader = wait_leader()
    DBS[leader].succeed(f"systemctl start pgbackrest-{STANZA}-full.service")
    info = json.loads(DBS[leader].succeed(INFO))
    assert [b["type"] for b in info[0]["backup"]] == ["full"], info
    # in the repository host's directory, WAL archived from the primary beside it
    backup.succeed(f"test -d {REPO_PATH}/backup/{STANZA} && test -d {REPO_PATH}/archive/{STANZA}")
    skipper = DBS[next(name for name in DBS if name != leader)]
    skipper.succeed(f"systemctl start pgbackrest-{STANZA}-diff.service")
    result = skipper.succeed(f"systemctl show -p Result --value pgbackrest-{STANZA}-diff.service")
    assert result.strip() == "exec-condition", f"a standby's backup job was not skipped: {result}"
    info = json.loads(DBS[leader].succeed(INFO))
    assert [b["type"] for b in info[0]["backup"]] == ["full"], info

with subtest("the primary's host crashes: a standby takes over, no answered page view is lost"):
    old = wait_leader()
    load_across("crash-primary", DBS[old].crash, max_failures=FAILOVER_FAILURES)
    new = wait_leader(not_name=old)
    DBS[old].start()
    DBS[old].wait_for_unit("patroni.service")
    # the old primary rejoins as a standby (pg_rewind)
    wait_healthy()
    assert wait_leader() == new

with subtest("the leader's Patroni stops: a standby takes over, no answered page view is lost"):
    old = wait_leader()
    stop = "systemctl stop patroni.service"
    load_across("stop-patroni", lambda: DBS[old].succeed(stop), max_failures=FAILOVER_FAILURES)
    wait_leader(not_name=old)
    DBS[old].succeed("systemctl start patroni.service")
    wait_healthy()

with subtest("the primary's postmaster is killed: Patroni restarts it, no answered view lost"):
    old = wait_leader()
    kill = "pkill -KILL -o -u patroni -x postgres"
    load_across("kill-postmaster", lambda: DBS[old].succeed(kill), max_failures=FAILOVER_FAILURES)
    wait_healthy()

with subtest("an etcd member crashes: the cluster keeps its leader and takes writes"):
    leader = wait_healthy()

    def crash_etcd() -> None:
        # on the leader's host; systemd restarts it after RestartSec (30 s): traffic runs
        # through the whole outage
        DBS[leader].succeed("systemctl kill --signal=SIGKILL etcd.service")
        DBS[leader].wait_until_fails("systemctl is-active --quiet etcd.service", timeout=30)
        DBS[leader].wait_until_succeeds("systemctl is-active --quiet etcd.service", timeout=120)

    load_across("crash-etcd", crash_etcd, max_failures=0)
    assert wait_leader() == leader

with subtest("a standby whose data is gone is rebuilt from the pgBackRest backup"):
    leader = wait_healthy()
    DBS[leader].succeed(f"systemctl start pgbackrest-{STANZA}-diff.service")
    check_page_view(client, DBS[leader], ORIGIN)
    last = sql(DBS[leader], "SELECT max(id) FROM page_views")
    name = next(n for n in DBS if n != leader)
    standby = DBS[name]
    standby.succeed("systemctl stop patroni.service")
    standby.succeed(f"find {PG_DATA} -mindepth 1 -delete")
    standby.succeed("systemctl start patroni.service")
    standby.wait_until_succeeds(
        "journalctl -u patroni.service --since=-5min"
        " | grep -q 'replica has been created using pgbackrest'",
        timeout=300,
    )
    wait_healthy()
    # every row committed before the rebuild is on the rebuilt standby
    wait_sql(standby, f"SELECT max(id) >= {last} FROM page_views", "t", 120)
    wait_sql(standby, STORED, sql(DBS[leader], STORED), 120)
