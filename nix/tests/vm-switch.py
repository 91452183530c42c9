# vm-switch: `nixos-rebuild switch` under load. The constants and common.py come first
# (nodes.nix `script`).

start_all()

with subtest("the stack is up"):
    server.wait_for_unit("pageviews-app.service")
    server.wait_for_unit("pageviews-worker.service")
    server.wait_for_unit("nginx.service")
    client.wait_for_unit("multi-user.target")
    client.wait_until_succeeds(f"{CURL} --fail {ORIGIN}/healthz", timeout=300)
    assert sorted(SPECIALISATIONS) == ["app-setting", "nginx-config"], SPECIALISATIONS
    assert int(RATE_LIMIT.removesuffix("r/s")) > int(LOAD_RATE.removesuffix("/s")), RATE_LIMIT

# The load's source addresses, on the client's test network interface.
load_net = client.succeed("ip -4 -o addr show | awk '$4 ~ /^192\\.168\\.1\\./ {print $2; exit}'")
load_dev = load_net.strip()
for i in range(LOAD_ADDRESSES):
    client.succeed(f"ip addr replace 192.168.1.{100 + i}/24 dev {load_dev}")


def show(unit: str, prop: str) -> str:
    return server.succeed(f"systemctl show -p {prop} --value {unit}").strip()


def nginx_workers() -> set[str]:
    master = show("nginx.service", "MainPID")
    return set(server.succeed(f"pgrep -P {master}").split())


def switch_under_load(name: str) -> None:
    """Switches `server` to specialisation `name` while the client sends ~200 requests/s to
    /healthz and a page-view stream (traffic_across: every view recorded once and processed);
    every answer is 200."""
    logs = "/tmp/load-" + name
    client.succeed(f"mkdir -p {logs}")
    for i in range(LOAD_ADDRESSES):
        client.succeed(
            f"(curl -sS --rate {LOAD_RATE} --interface 192.168.1.{100 + i} --max-time 20"
            f" -o /dev/null -w '%{{http_code}}\\n' '{ORIGIN}/healthz?n=[1-100000]'"
            f" >{logs}/{i}.log 2>&1 &)"
        )

    def uptime() -> float:
        return float(client.succeed("cut -d' ' -f1 /proc/uptime"))

    started = uptime()
    elapsed = 0.0

    def switch() -> None:
        nonlocal elapsed
        server.succeed(
            f"/run/current-system/specialisation/{name}/bin/switch-to-configuration test"
        )
        # The load goes on for 5 s after the switch, then stops; the page-view stream
        # goes on as traffic_across says.
        client.sleep(5)
        client.succeed("pkill -f 'healthz[?]n=' || true")
        elapsed = uptime() - started

    traffic_across(client, server, f"pageviews-switch-{name}", switch)
    codes = client.succeed(f"cat {logs}/*.log").split()
    assert len(codes) >= 150 * elapsed, f"{len(codes)} requests in {elapsed:.0f} s ({name})"
    failed = [c for c in codes if c != "200"]
    assert not failed, f"{len(failed)} of {len(codes)} not 200 ({name}): {sorted(set(failed))}"


with subtest("a switch that changes every pageviews unit restarts them in place"):
    socket = show("pageviews-app.socket", "InvocationID")
    app = show("pageviews-app.service", "MainPID")
    worker = show("pageviews-worker.service", "MainPID")
    nginx = show("nginx.service", "MainPID")
    switch_under_load("app-setting")
    assert show("pageviews-app.socket", "InvocationID") == socket, "the app's socket was stopped"
    assert show("pageviews-app.service", "MainPID") != app, "the app was not restarted"
    assert show("pageviews-worker.service", "MainPID") != worker, "the worker was not restarted"
    assert show("nginx.service", "MainPID") == nginx, "nginx was restarted"
    server.succeed("systemctl is-active pageviews-migrate.service")
    server.succeed("systemctl show -p Environment pageviews-app.service | grep -q pageviews=debug")

with subtest("a switch that changes the nginx configuration reloads nginx"):
    socket = show("pageviews-app.socket", "InvocationID")
    nginx = show("nginx.service", "MainPID")
    workers = nginx_workers()
    reloaded = show("nginx-config-reload.service", "ActiveEnterTimestampMonotonic")
    switch_under_load("nginx-config")
    assert show("nginx.service", "MainPID") == nginx, "nginx was restarted, not reloaded"
    assert not (nginx_workers() & workers), "nginx kept its old workers: not reloaded"
    assert show("pageviews-app.socket", "InvocationID") == socket, "the app's socket was stopped"
    assert show("nginx-config-reload.service", "ActiveEnterTimestampMonotonic") != reloaded, (
        "nginx-config-reload did not run"
    )
