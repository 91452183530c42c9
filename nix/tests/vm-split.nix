# The split deployment: `client` (the internet), `proxy` (nginx, TLS), `app` (app, worker,
# migrations) and `data` (PostgreSQL, RabbitMQ), all on one VLAN so that only the
# firewall and the listen addresses keep client and proxy away from the data ports (nftables
# on data, iptables on app).
{
  pkgs,
  module,
  # Lazy: only the client nodes read it (the nixos-eval harness evaluates the others without it).
  probe ? throw "nix/tests: the probe package is an argument (flake.nix passes build.probe)",
  tls,
  secrets,
  ...
}: let
  shared = import ./nodes.nix {inherit pkgs probe tls;};
  ip = nodes: name: nodes.${name}.networking.primaryIPAddress;

  # What every pageviews host of this deployment agrees on.
  pageviews = roles: {nodes, ...}: {
    imports = [module shared.tools];
    services.pageviews = {
      enable = true;
      inherit roles;
      inherit (tls) domain;
      network = {
        appAddress = ip nodes "app";
        dataAddress = ip nodes "data";
        proxyAddresses = [(ip nodes "proxy")];
      };
      database.passwordFiles = secrets.database;
      rabbitmq.passwordFiles = secrets.rabbitmq;
    };
  };

  # What the script needs to know of the Nix side, from the nodes themselves.
  constants = nodes: let
    app = nodes.app.services.pageviews;
    data = nodes.data.services.pageviews;
  in {
    PUBLIC_PORTS = nodes.proxy.networking.firewall.allowedTCPPorts;
    APP_PORT = app.network.appPort;
    PG_PORT = data.database.port;
    AMQP_PORT = data.rabbitmq.port;
    # RabbitMQ's inter-node port: the AMQP port + 20000.
    ERLANG_DIST_PORT = data.rabbitmq.port + 20000;
    WORKER_METRICS = app.settings.PAGEVIEWS_METRICS_LISTEN;
    # The units' WatchdogSec, as `systemctl show` prints WatchdogUSec.
    APP_WATCHDOG = nodes.app.systemd.services.pageviews-app.serviceConfig.WatchdogSec;
    WORKER_WATCHDOG = nodes.app.systemd.services.pageviews-worker.serviceConfig.WatchdogSec;
  };
in {
  name = "pageviews-vm-split";

  nodes = {
    client = shared.client "proxy";

    proxy = {
      imports = [(pageviews ["proxy"]) shared.certificate];
    };

    app = {
      imports = [(pageviews ["app"]) (shared.sized 1536)];
    };

    # The two firewall backends the module writes source-address rules for: the data host
    # chooses nftables, the app host keeps the NixOS default (iptables). The firewall
    # subtest checks both.
    data = {
      imports = [(pageviews ["data"]) shared.sql (shared.sized 2048)];
      networking.nftables.enable = true;
    };
  };

  testScript = shared.script ./vm-split.py constants;
}
