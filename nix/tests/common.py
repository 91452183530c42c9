# Helpers shared by the pageviews VM test scripts. nodes.nix `script` puts this file between
# the generated constants and the test's own script, so everything here runs in the NixOS
# test driver's namespace. Machine arguments are left unannotated on purpose: the driver's
# class name differs between nixpkgs releases (Machine / QemuMachine), and an annotation naming the
# wrong one would break the build-time type check or the script itself.
import re
import shlex
from collections.abc import Callable

# The values of the Nix side (DOMAIN, CA_FILE, ports, listen addresses, SECURITY_THRESHOLD)
# stand before this file as constants, written by `script` in nodes.nix from the nodes'
# own configuration.
ORIGIN = f"https://{DOMAIN}"

CURL = "curl -sS --max-time 20"
VISIT_RE = re.compile(r'<strong id="visit">#(\d+)</strong>')
RECORDED_RE = re.compile(r'<dd id="recorded">(\d+)</dd>')
PROCESSED_RE = re.compile(r'<dd id="processed">(\d+)</dd>')


def ipv4(machine, host: str) -> str:
    """IPv4 address of a node, from the /etc/hosts the test framework writes."""
    return machine.succeed(f"getent ahostsv4 {shlex.quote(host)}").split()[0]


def sql(machine, query: str) -> str:
    """One query on the pageviews database (as the superuser), unaligned output."""
    return machine.succeed(f"pageviews-sql {shlex.quote(query)}").strip()


def wait_sql(machine, query: str, expected: str, timeout: int = 180) -> None:
    """Waits until `query` returns exactly `expected`."""
    machine.wait_until_succeeds(
        f"test \"$(pageviews-sql {shlex.quote(query)})\" = {shlex.quote(expected)}",
        timeout=timeout,
    )


def visit_number(page: str) -> int:
    match = VISIT_RE.search(page)
    assert match is not None, f"no visit number in the page: {page[:400]!r}"
    return int(match.group(1))


def totals(page: str) -> tuple[int, int]:
    """(recorded, processed) as the page shows them."""
    recorded = RECORDED_RE.search(page)
    processed = PROCESSED_RE.search(page)
    assert recorded is not None and processed is not None, f"no totals: {page[:400]!r}"
    return int(recorded.group(1)), int(processed.group(1))


def wait_processed(data, visit_id: int, timeout: int = 180) -> None:
    """Waits until the worker has marked page view `visit_id` processed."""
    query = f"SELECT processed_at IS NOT NULL FROM page_views WHERE id = {visit_id}"
    wait_sql(data, query, "t", timeout)


def check_page_view(client, data, base: str) -> None:
    """A page view is recorded with the user agent and cookie *names* only, processed by
    the worker, and the page later shows processed views."""
    page = client.succeed(
        f"{CURL} --fail -A pageviews-vm-test"
        f" -b 'session=s3cret-cookie-value; theme=dark' {base}/"
    )
    visit_id = visit_number(page)
    wait_processed(data, visit_id)
    stored = sql(data, f"SELECT data::text FROM page_views WHERE id = {visit_id}")
    assert "pageviews-vm-test" in stored, f"user agent not stored: {stored}"
    assert "session" in stored and "theme" in stored, f"cookie names not stored: {stored}"
    assert "s3cret-cookie-value" not in stored, f"a cookie value was stored: {stored}"
    recorded, processed = totals(client.succeed(f"{CURL} --fail {base}/"))
    assert recorded >= 1 and 1 <= processed <= recorded, (recorded, processed)


def check_https_edge(client) -> None:
    """What nginx promises at the edge, seen from outside."""
    # HTTP -> 308 to the same path and query on HTTPS
    got = client.succeed(
        f"{CURL} -o /dev/null -w '%{{http_code}} %{{redirect_url}}'"
        f" 'http://{DOMAIN}/a/b?c=d'"
    )
    assert got == f"308 https://{DOMAIN}/a/b?c=d", f"HTTP redirect: {got!r}"

    # Security headers on the page; the version is hidden
    raw = client.succeed(f"{CURL} --fail -D - -o /dev/null {ORIGIN}/")
    headers: dict[str, str] = {}
    for line in raw.splitlines()[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    expected = {
        "strict-transport-security": "max-age=",
        "content-security-policy": "default-src 'none'",
        "x-frame-options": "DENY",
        "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer",
        "cross-origin-opener-policy": "same-origin",
    }
    for name, fragment in expected.items():
        assert fragment in headers.get(name, ""), f"header {name}: {headers.get(name)!r}"
    assert headers.get("server") == "nginx", f"server header: {headers.get('server')!r}"
    assert "x-powered-by" not in headers

    # Methods other than GET/HEAD/POST: connection closed without a response (444),
    # which curl reports as exit 52 "empty reply" over HTTP/1.1
    for method in ("PUT", "DELETE", "TRACE", "PATCH"):
        status, _ = client.execute(f"{CURL} --http1.1 -o /dev/null -X {method} {ORIGIN}/")
        assert status == 52, f"{method}: curl exit {status}, want 52 (empty reply)"

    # Internal endpoints are not public
    for path in ("/metrics", "/readyz"):
        code = client.succeed(f"{CURL} -o /dev/null -w '%{{http_code}}' {ORIGIN}{path}")
        assert code == "404", f"{path} answered {code} publicly"


def check_burst(client) -> None:
    """80 back-to-back requests on one connection: the per-client limit answers 429."""
    codes = client.succeed(
        "args=(); for i in $(seq 80); do"
        f" args+=(-o /dev/null '{ORIGIN}/healthz?burst='$i); done;"
        f" {CURL} --http1.1 -w '%{{http_code}}\\n' \"${{args[@]}}\""
    ).split()
    assert len(codes) == 80, codes
    assert "429" in codes, f"no 429 in a burst of 80: {codes}"
    assert "200" in codes, f"no 200 at all in the burst: {codes}"
    assert set(codes) <= {"200", "429"}, codes
    # let the bucket drain (rate 10r/s, burst 20)
    client.sleep(4)
    client.succeed(f"{CURL} --fail -o /dev/null {ORIGIN}/healthz")


def assert_unreachable(machine, host_ip: str, port: int) -> None:
    """A TCP connect to host_ip:port does not succeed within 2 seconds."""
    status, _ = machine.execute(f"timeout 2 bash -c 'exec 3<>/dev/tcp/{host_ip}/{port}'")
    assert status != 0, f"{machine.name} reached {host_ip}:{port}, expected it blocked"


def assert_reachable(machine, host_ip: str, port: int) -> None:
    machine.succeed(f"timeout 2 bash -c 'exec 3<>/dev/tcp/{host_ip}/{port}'")


def start_load(client, agent: str, key: str) -> str:
    """The client loads pages as user agent `agent`, about 5 a second (below the rate limit),
    `?<key>=<n>` the n-th, until stop_load; returns the log of the HTTP codes."""
    log = f"/tmp/{agent}.log"
    stop = f"/tmp/{agent}.stop"
    client.succeed(
        f"rm -f {stop}; (i=0; while [ ! -e {stop} ]; do i=$((i + 1));"
        f" {CURL} -o /dev/null -w '%{{http_code}}\\n' -A {agent} '{ORIGIN}/?{key}='$i;"
        f" sleep 0.2; done; echo done) >{log} 2>&1 &"
    )
    return log


def stop_load(client, agent: str) -> list[str]:
    """Stops start_load's load; the HTTP code of every request it sent."""
    log = f"/tmp/{agent}.log"
    client.succeed(f"touch /tmp/{agent}.stop")
    client.wait_until_succeeds(f"tail -n 1 {log} | grep -qx done", timeout=120)
    return client.succeed(f"head -n -1 {log}").split()


def traffic_across(client, data, agent: str, disrupt: Callable[[], None]) -> None:
    """A client keeps loading pages (about 5 a second, below the rate limit) from before
    `disrupt()` until 5 s after it: every request succeeds, and every page view of that
    traffic (user agent `agent`) is recorded once and processed."""
    start_load(client, agent, "traffic")
    client.sleep(3)
    disrupt()
    client.sleep(5)
    codes = stop_load(client, agent)
    requests = len(codes)
    assert requests >= 20, f"only {requests} requests across the disruption ({agent})"
    assert set(codes) == {"200"}, f"not all 200 across the disruption ({agent}): {codes}"

    by_agent = f"FROM page_views WHERE data->>'user_agent' = '{agent}'"
    wait_sql(data, f"SELECT count(*) {by_agent} AND processed_at IS NOT NULL", str(requests), 300)
    assert sql(data, f"SELECT count(*) {by_agent}") == str(requests)
    wait_sql(data, "SELECT count(*) FROM page_views WHERE processed_at IS NULL", "0", 120)


def under_traffic(
    client,
    label: str,
    action: Callable[[], object],
    max_failures: int,
    primary: Callable[[], object],
    until_recovered: bool = False,
) -> None:
    """Pages load (about 5 a second) before, during and after `action`; then every page view
    answered 200 is stored once and processed on `primary()` (the host of the database's
    primary), none lost, and at most `max_failures` requests failed. After `action` the load
    goes on for 5 s, or with `until_recovered` until the answers are 200 again and a few
    seconds more."""
    agent = f"pageviews-{label}"
    log = start_load(client, agent, label)
    client.sleep(3)
    action()
    if until_recovered:
        client.wait_until_succeeds(f"test \"$(tail -n 5 {log} | grep -cx 200)\" = 5", timeout=180)
    else:
        client.sleep(5)
    codes = stop_load(client, agent)
    ok = codes.count("200")
    failed = len(codes) - ok
    client.log(f"{label}: {ok} of {len(codes)} answered 200, {failed} failed")
    assert ok >= 20, f"{label}: only {ok} answered requests"
    assert failed <= max_failures, f"{label}: {failed} failed requests: {codes}"
    data = primary()
    by_agent = f"FROM page_views WHERE data->>'user_agent' = '{agent}'"
    wait_sql(data, f"SELECT count(*) >= {ok} AND count(*) <= {ok + failed} {by_agent}", "t", 120)
    wait_sql(data, f"SELECT count(*) = count(processed_at) {by_agent}", "t", 300)
    twice = f"SELECT 1 {by_agent} GROUP BY data->>'request_id' HAVING count(*) > 1"
    assert sql(data, f"SELECT count(*) FROM ({twice}) d") == "0", f"{label}: stored twice"


def restart_broker_under_traffic(client, broker, data) -> None:
    """RabbitMQ restarts under traffic and nothing is lost."""

    def disrupt() -> None:
        broker.succeed("systemctl restart rabbitmq.service")
        broker.wait_for_unit("rabbitmq.service")
        broker.wait_for_unit("pageviews-rabbitmq-setup.service")

    traffic_across(client, data, "pageviews-restart-traffic", disrupt)


def deploy_under_traffic(client, app, proxy, data) -> None:
    """A deploy under traffic, twice: the app restarted on the socket systemd keeps open
    (connections wait in its backlog meanwhile), nginx reloaded; no request fails."""
    app.succeed("systemctl is-active pageviews-app.socket")

    def deploy() -> None:
        for _ in range(2):
            restart_unit(app, "pageviews-app.service")
            proxy.succeed("systemctl reload nginx.service")
            proxy.sleep(1)

    traffic_across(client, data, "pageviews-deploy-traffic", deploy)


def check_notify_unit(machine, unit: str, watchdog: str) -> None:
    """`unit` is Type=notify with the module's watchdog (`watchdog`: its WatchdogSec)."""
    shown = machine.succeed(f"systemctl show -p Type,WatchdogUSec {unit}").split()
    assert sorted(shown) == ["Type=notify", f"WatchdogUSec={watchdog}"], f"{unit}: {shown}"


def restart_unit(machine, unit: str) -> None:
    """`systemctl restart`, which for a Type=notify unit returns once the new process sent
    READY=1; the main PID changes."""
    before = machine.succeed(f"systemctl show -p MainPID --value {unit}")
    machine.succeed(f"systemctl restart {unit}")
    after = machine.succeed(f"systemctl show -p MainPID --value {unit}")
    assert before != after, f"{unit} kept its main PID {before.strip()}"
def check_stack(client, app, data) -> None:
    """What every deployment of the module must do, seen from `client`: `app` runs the app
    and the worker, `data` PostgreSQL and RabbitMQ (the same node on one host)."""
    with subtest("a page view is recorded and processed by the worker"):
        check_page_view(client, data, ORIGIN)

    with subtest("the worker runs its scheduled rollup"):
        wait_sql(data, "SELECT runs > 0 FROM scheduled_jobs WHERE name = 'rollup'", "t", 180)
        app.succeed(f"curl -sS --fail http://{WORKER_METRICS}/metrics")

    with subtest("the end-to-end probe passes from the client"):
        client.succeed(f"pageviews-probe {ORIGIN} --ca-file {CA_FILE}", timeout=600)

    with subtest("HTTPS edge: redirect, headers, dropped methods, private endpoints"):
        check_https_edge(client)

    with subtest("a burst from one client gets 429"):
        check_burst(client)


def check_operations(client, app, proxy, data, app_watchdog: str, worker_watchdog: str) -> None:
    """What operating a deployment of the module does, under traffic from `client`: `app`
    runs the app and the worker (their units' WatchdogSec `app_watchdog`, `worker_watchdog`),
    `proxy` nginx, `data` PostgreSQL and RabbitMQ (the same node on one host)."""
    with subtest("RabbitMQ restarts under traffic and nothing is lost"):
        restart_broker_under_traffic(client, data, data)

    with subtest("a deploy under traffic: app restarts, nginx reloads, no request fails"):
        check_notify_unit(app, "pageviews-app.service", app_watchdog)
        check_notify_unit(app, "pageviews-worker.service", worker_watchdog)
        deploy_under_traffic(client, app, proxy, data)

    with subtest("app and worker units are sandboxed"):
        check_sandbox(app, ["pageviews-app.service", "pageviews-worker.service"])


def check_sandbox(machine, units: list[str]) -> None:
    """systemd-analyze security at or below the threshold the module promises."""
    for unit in units:
        out = machine.succeed(
            f"systemd-analyze security --no-pager --threshold={SECURITY_THRESHOLD}"
            f" {unit} 2>&1"
        )
        machine.log(out.strip().splitlines()[-1])
