# vm-images: the app and worker OCI images under podman on `images`, against the module's
# data role on `data`. The constants and common.py come first (nodes.nix `script`).

start_all()

with subtest("data host up"):
    data.wait_for_unit("postgresql.target")
    data.wait_for_unit("rabbitmq.service")
    data.wait_for_unit("pageviews-rabbitmq-setup.service")

with subtest("the migration runs from the app image, then both containers start"):
    images.wait_for_unit("pageviews-image-migrate.service", timeout=600)
    images.wait_for_unit("podman-pageviews-app.service")
    images.wait_for_unit("podman-pageviews-worker.service")
    images.wait_until_succeeds(
        f"curl -sS --fail http://127.0.0.1:{APP_PORT}/healthz", timeout=300
    )
    images.wait_until_succeeds(
        f"curl -sS --fail http://{WORKER_METRICS}/metrics", timeout=300
    )

with subtest("the containers run as the image's non-root user, with no shell inside"):
    for name in ("pageviews-app", "pageviews-worker"):
        user = images.succeed(f"podman inspect --format '{{{{.Config.User}}}}' {name}").strip()
        assert user == "65534:65534", f"{name} runs as {user!r}"
        image = images.succeed(f"podman inspect --format '{{{{.Image}}}}' {name}").strip()
        status, out = images.execute(
            f"podman run --rm --pull=never --entrypoint /bin/sh {image} -c true 2>&1"
        )
        assert status != 0 and ("not found" in out or "No such file" in out), out

with subtest("a page view through the app container is processed by the worker container"):
    page = images.succeed(
        f"{CURL} --fail -A pageviews-vm-images http://127.0.0.1:{APP_PORT}/"
    )
    visit_id = visit_number(page)
    wait_processed(data, visit_id)
    stored = sql(data, f"SELECT data->>'user_agent' FROM page_views WHERE id = {visit_id}")
    assert stored == "pageviews-vm-images", stored
    recorded, processed = totals(images.succeed(f"{CURL} --fail http://127.0.0.1:{APP_PORT}/"))
    assert processed >= 1 and recorded >= processed, (recorded, processed)

with subtest("the images host reaches the data ports through the data host's firewall"):
    data_ip = ipv4(images, "data")
    for port in (PG_PORT, AMQP_PORT):
        assert_reachable(images, data_ip, port)
