# The whole stack on one host, as `nixos-rebuild switch` gives it with nothing but
# `services.pageviews.enable` and a certificate: app on a Unix socket, PostgreSQL and
# RabbitMQ on loopback, broker passwords generated at first boot. `client` is the internet.
{
  pkgs,
  module,
  # Lazy: only the client nodes read it (the nixos-eval harness evaluates the others without it).
  probe ? throw "nix/tests: the probe package is an argument (flake.nix passes build.probe)",
  tls,
  ...
}: let
  shared = import ./nodes.nix {inherit pkgs probe tls;};

  # What the script needs to know of the Nix side, from the nodes themselves.
  constants = nodes: let
    inherit (nodes.server.services) pageviews;
  in {
    PUBLIC_PORTS = nodes.server.networking.firewall.allowedTCPPorts;
    APP_PORT = pageviews.network.appPort;
    APP_LISTEN = pageviews.settings.PAGEVIEWS_LISTEN;
    PG_PORT = pageviews.database.port;
    AMQP_PORT = pageviews.rabbitmq.port;
    # RabbitMQ's inter-node port: the AMQP port + 20000.
    ERLANG_DIST_PORT = pageviews.rabbitmq.port + 20000;
    WORKER_METRICS = pageviews.settings.PAGEVIEWS_METRICS_LISTEN;
    # The units' WatchdogSec, as `systemctl show` prints WatchdogUSec.
    APP_WATCHDOG = nodes.server.systemd.services.pageviews-app.serviceConfig.WatchdogSec;
    WORKER_WATCHDOG = nodes.server.systemd.services.pageviews-worker.serviceConfig.WatchdogSec;
  };
in {
  name = "pageviews-vm-single";

  nodes = {
    client = shared.client "server";

    server = {
      imports = [module shared.certificate shared.sql shared.tools (shared.sized 2048)];
      services.pageviews = {
        enable = true;
        inherit (tls) domain;
      };
    };
  };

  testScript = shared.script ./vm-single.py constants;
}
