# The scaled-out deployment: `client` (the internet), `proxy` (nginx over both app hosts),
# `app1`/`app2` (app, worker), `broker1..3` (a RabbitMQ cluster with quorum queues) and
# `db` (PostgreSQL, one primary), all on one VLAN: only the firewall and the listen
# addresses keep the others away from the broker and database ports.
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
  brokers = ["broker1" "broker2" "broker3"];

  # What every pageviews host of this deployment agrees on.
  pageviews = roles: {
    nodes,
    config,
    ...
  }: {
    imports = [module shared.tools];
    services.pageviews = {
      enable = true;
      inherit roles;
      inherit (tls) domain;
      network = {
        # Its own address on an app host (the listen address); unused elsewhere.
        appAddress =
          if builtins.elem "app" roles
          then config.networking.primaryIPAddress
          else null;
        appAddresses = [(ip nodes "app1") (ip nodes "app2")];
        dataAddress = ip nodes "db";
        proxyAddresses = [(ip nodes "proxy")];
      };
      database.passwordFiles = secrets.database;
      rabbitmq.passwordFiles = secrets.rabbitmq;
      rabbitmq.cluster.nodes =
        map (name: {
          hostName = name;
          address = ip nodes name;
        })
        brokers;
      rabbitmq.cluster.cookieFile = secrets.erlangCookie;
    };
  };

  # What the script needs to know of the Nix side, from the nodes themselves.
  constants = nodes: let
    app = nodes.app1.services.pageviews;
    broker = nodes.broker1.services.pageviews;
  in {
    APP_PORT = app.network.appPort;
    PG_PORT = nodes.db.services.pageviews.database.port;
    AMQP_PORT = broker.rabbitmq.port;
    # RabbitMQ's inter-node port: the AMQP port + 20000.
    ERLANG_DIST_PORT = broker.rabbitmq.port + 20000;
    VHOST = broker.rabbitmq.vhost;
    WORKER_METRICS = app.settings.PAGEVIEWS_METRICS_LISTEN;
    RABBITMQ_HOME = nodes.broker1.services.rabbitmq.dataDir;
  };
in {
  name = "pageviews-vm-cluster";

  nodes = {
    client = shared.client "proxy";

    proxy = {
      imports = [(pageviews ["proxy"]) shared.certificate];
    };

    app1 = {
      imports = [(pageviews ["app"]) (shared.sized 1024)];
    };
    app2 = {
      imports = [(pageviews ["app"]) (shared.sized 1024)];
    };

    broker1 = {
      imports = [(pageviews ["broker"]) (shared.sized 1024)];
    };
    broker2 = {
      imports = [(pageviews ["broker"]) (shared.sized 1024)];
    };
    broker3 = {
      imports = [(pageviews ["broker"]) (shared.sized 1024)];
    };

    db = {
      imports = [(pageviews ["data"]) shared.sql (shared.sized 1536)];
    };
  };

  testScript = shared.script ./vm-cluster.py constants;
}
