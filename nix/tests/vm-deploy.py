# vm-deploy: deploy-rs rolls a new generation to the app host under load. The constants and
# common.py come first (nodes.nix `script`).

start_all()

with subtest("the split stack serves pages"):
    data.wait_for_unit("postgresql.target")
    data.wait_for_unit("rabbitmq.service")
    app.wait_for_unit("pageviews-app.service")
    app.wait_for_unit("pageviews-worker.service")
    app.wait_for_open_port(22)
    proxy.wait_for_unit("nginx.service")
    client.wait_until_succeeds(f"{CURL} --fail {ORIGIN}/healthz", timeout=300)

with subtest("the deployer reaches the app host as root over SSH"):
    deployer.succeed("mkdir -p -m 700 /root/.ssh /root/deploy")
    deployer.succeed(f"install -m 600 {SSH_KEY} /root/.ssh/id_ed25519")
    for name, path in DEPLOY_FILES.items():
        deployer.succeed(f"cp --no-preserve=mode {path} /root/deploy/{shlex.quote(name)}")
    deployer.succeed("cd /root/deploy && nix flake lock", timeout=600)
    deployer.wait_until_succeeds(
        "ssh -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null app true", timeout=60
    )

system_before = app.succeed("readlink -f /run/current-system").strip()
generation_before = app.succeed("readlink /nix/var/nix/profiles/system").strip()
app_pid = app.succeed("systemctl show -p MainPID --value pageviews-app.service").strip()
socket_id = app.succeed("systemctl show -p InvocationID --value pageviews-app.socket").strip()

with subtest("deploy-rs rolls the new generation to the app host while the load runs"):

    def deploy() -> None:
        # -s: `nix flake check` would build the VM tests; the offline store has what
        # the app host's system needs.
        deployer.succeed("cd /root/deploy && deploy -s .#app -- --offline >&2", timeout=1800)

    traffic_across(client, data, "pageviews-deploy-rs-traffic", deploy)

with subtest("the app host runs the new generation, its socket kept"):
    system_after = app.succeed("readlink -f /run/current-system").strip()
    assert system_after != system_before, "the running system did not change"
    generation_after = app.succeed("readlink /nix/var/nix/profiles/system").strip()
    assert generation_after != generation_before, (generation_before, generation_after)
    # magic rollback confirmed the generation: it is still the running one
    app.sleep(5)
    assert app.succeed("readlink -f /run/current-system").strip() == system_after
    environment = app.succeed("systemctl show -p Environment pageviews-app.service")
    for key, value in CHANGE.items():
        assert f"{key}={value}" in environment, (key, environment)
    assert app.succeed("systemctl show -p MainPID --value pageviews-app.service").strip() != app_pid
    assert (
        app.succeed("systemctl show -p InvocationID --value pageviews-app.socket").strip()
        == socket_id
    ), "the app's socket was stopped"
    check_page_view(client, data, ORIGIN)
